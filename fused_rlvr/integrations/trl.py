"""TRL: GRPOTrainer (and other TRL trainers) on the fused op, without any [tokens x vocab] logits.

Two levels, both tested against TRL's own trainer (tests/test_integrations_trl.py; TRL 1.16):

1. `add_fused_lm_head(model, temperature=...)`: the seam TRL itself uses. TRL >= 1.15 patches the policy and
   the reference model so that `model(..., labels=labels, fused_lm_head=True)` returns per-token `log_probs`
   and `entropy` (a `trl.trainer.utils.FusedCausalLMOutput`) from its own chunked kernel, which still builds
   [chunk x V] logits. Ours has the same signature and output and computes them with
   `fused_rlvr.linear_logprobs`. Patch a model after TRL's own patch and every TRL trainer that scores
   through this seam (GRPO, RLOO) uses it.

2. `FusedGRPOTrainer(GRPOTrainer)`: GRPOTrainer with (1) applied to its policy and reference models (old and
   reference log-probs, entropies), and its training loss computed by `fused_rlvr.linear_grpo_loss` from the
   last hidden states and the lm-head weight, with TRL's semantics for loss_type ("grpo", "bnpo", "dr_grpo",
   "dapo"), beta (k3 against the reference, with use_bias_correction_kl=False), epsilon / epsilon_high,
   importance_sampling_level, temperature, num_items_in_batch, gradient accumulation and the static entropy
   bonus (entropy_coef; not with "grpo"). scale_rewards and the advantages are TRL's own (computed at rollout
   time, unchanged). What linear_grpo_loss does not express runs TRL's own loss code on the fused per-token
   log-probs and entropies of (1): still no logits, TRL's exact semantics. That covers entropy masks
   (top_entropy_quantile), the adaptive entropy bonus, the entropy bonus with "grpo", off-policy masks, vLLM
   importance-sampling correction, the bias-corrected KL (ratio * k3: TRL's default when beta > 0),
   two-sided clipping `delta`, the MoE aux loss, multimodal inputs and the loss types cispo / sapo / vespo /
   luspo. `FusedGRPOTrainer.fused_loss_path(inputs)` says which one runs, and why.

Differences from TRL, by design (from verl): the log-ratio lp - lp_old is clamped to +-20 before exp and the
k3 KL to [-10, 10]; values agree whenever |lp - lp_old| <= 20 and k3 <= 10.

A PEFT LoRA adapter on the lm-head (target_modules including "lm_head"), which TRL's own trainer refuses, is
trained through the fused op (its A and B get their gradients from the op; lora_dropout must be 0 there).

Not supported (clear errors): DoRA or other PEFT variants on the lm-head, several active adapters on it, an
adapter on the head with cast_lm_head_to_fp32 (TRL's refusal), DeepSpeed ZeRO-3 (the fused backward re-reads
the lm-head weight outside the module's gather hooks), models that rescale their logits (Cohere, Granite).
"""

from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import replace
from typing import Any, Optional

import torch

try:
    from trl import GRPOTrainer
    from trl.trainer.utils import FusedCausalLMOutput
except ImportError as err:  # pragma: no cover - exercised only without trl
    raise ImportError(
        "fused_rlvr.integrations.trl needs TRL: pip install 'fused-rlvr[trl]' (tested with trl 1.16)"
    ) from err

from fused_rlvr.grpo import linear_grpo_loss
from fused_rlvr.integrations.hf import IGNORE_INDEX, _backbone, lm_head, unwrap_model
from fused_rlvr.linear_logprobs import linear_logprobs

SUPPORTED_OUTPUTS = ("log_probs", "entropy")
FUSED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
    "num_images",
    "num_tiles",
)


def _check_not_zero3(model) -> None:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return
    if is_deepspeed_zero3_enabled():
        raise NotImplementedError(
            f"fused_rlvr cannot score {type(model).__name__} under DeepSpeed ZeRO-3: its backward re-reads "
            "the lm-head weight outside the module's gather hooks. Use ZeRO-2, FSDP2 or DDP"
        )


def _full(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """FSDP2 shards parameters as DTensors; the fused op reads the whole lm-head (differentiably gathered)."""
    if t is not None and hasattr(t, "full_tensor"):
        return t.full_tensor()
    return t


def head_inputs(model, hidden: torch.Tensor, *, cast_lm_head_to_fp32: bool = False):
    """(hidden, weight, head_kwargs, autocast-off context): the fused op's inputs for a model's head.

    head_kwargs are `LMHead.op_kwargs()` (bias, softcap and a PEFT LoRA adapter's lora_a, lora_b,
    lora_scale), to pass to the op or a loss as keywords; FSDP2-sharded tensors are gathered, and hidden and
    the head are cast as the model's own head computes (`LMHead.cast`).
    """
    head = lm_head(model)
    lora = head.lora
    if lora is not None:
        lora = replace(lora, a=_full(lora.a), b=_full(lora.b))
    head = replace(head, weight=_full(head.weight), bias=_full(head.bias), lora=lora)
    hidden, head = head.cast(hidden, fp32=cast_lm_head_to_fp32)
    dev = hidden.device.type
    ctx = torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else contextlib.nullcontext()
    return hidden, head.weight, head.op_kwargs(), ctx


def _router_aux_loss(model, backbone_outputs, attention_mask):
    """MoE load-balancing loss as TRL's fused head computes it (Mixtral's function, unweighted)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    cfg = model.config.get_text_config()
    n_experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    return load_balancing_loss_func(
        backbone_outputs.router_logits, n_experts, cfg.num_experts_per_tok, attention_mask
    )


def add_fused_lm_head(
    model,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
    *,
    backend: str = "auto",
) -> None:
    """Make `model(..., labels=labels, fused_lm_head=True)` return fused per-token log-probs / entropy.

    Same contract as `trl.trainer.utils.add_fused_lm_head` (TRL >= 1.15): labels [B, T] with -100 on unscored
    tokens are shifted (out[:, t] scores labels[:, t + 1]; `shift_labels` are taken as already shifted), and
    the output is a `FusedCausalLMOutput` with `log_probs`, `entropy` (when "entropy" is in `outputs`),
    `label_mask`, `loss` (-sum log_probs / num_items_in_batch or the label count) and `aux_loss` (MoE). No
    [B, T, V] or [chunk, V] logits exist: `fused_rlvr.linear_logprobs` streams the vocabulary.
    Without `fused_lm_head=True` the model's previous forward runs (generation is unchanged). Also accepts
    `fused_lm_head="hidden"`: returns the backbone output (last hidden states) for a loss that reads the head
    itself (FusedGRPOTrainer). Patch the transformers model (for PEFT, `peft_model.get_base_model()`).
    The patched forward also takes `temperature=` per call (with fused_lm_head=True): a float, or a per-token
    tensor aligned with the scored positions (labels[:, 1:], or shift_labels), instead of `temperature`.
    """
    unknown = [o for o in outputs if o not in SUPPORTED_OUTPUTS]
    if unknown:
        raise NotImplementedError(
            f"fused_rlvr's fused head computes {SUPPORTED_OUTPUTS}, not {unknown} "
            f"(asked for {type(model).__name__})"
        )
    lm_head(model)  # fail now, naming the model class, rather than at the first training step
    want_entropy = "entropy" in outputs
    default_temperature = temperature
    previous_forward = model.forward
    text_config = model.config.get_text_config()

    @functools.wraps(type(model).forward)
    def _fused_forward(
        self,
        *args,
        fused_lm_head=False,
        labels=None,
        shift_labels=None,
        num_items_in_batch=None,
        temperature=None,
        **kwargs,
    ):
        if temperature is not None and not fused_lm_head:
            raise TypeError("temperature= is a keyword of the fused head: pass it with fused_lm_head=True")
        if not fused_lm_head:
            for key, value in (
                ("labels", labels),
                ("shift_labels", shift_labels),
                ("num_items_in_batch", num_items_in_batch),
            ):
                if value is not None:
                    kwargs[key] = value
            return previous_forward(*args, **kwargs)
        _check_not_zero3(self)
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone_outputs = _backbone(self)(*args, **kwargs)
        if fused_lm_head == "hidden":
            return backbone_outputs
        if shift_labels is None:
            hidden, targets = backbone_outputs.last_hidden_state[:, :-1], labels[:, 1:]
        else:
            hidden, targets = backbone_outputs.last_hidden_state, shift_labels
        hidden, weight, head_kwargs, ctx = head_inputs(
            self, hidden, cast_lm_head_to_fp32=cast_lm_head_to_fp32
        )
        targets = targets.to(weight.device)
        with ctx:
            log_probs, entropy = linear_logprobs(
                hidden,
                weight,
                targets,
                temperature=default_temperature if temperature is None else temperature,
                ignore_index=IGNORE_INDEX,
                return_entropy=want_entropy,
                backend=backend,
                **head_kwargs,
            )
        mask = targets != IGNORE_INDEX
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / denom
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _router_aux_loss(self, backbone_outputs, kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(
            loss=loss, log_probs=log_probs, entropy=entropy, label_mask=mask, aux_loss=aux_loss
        )

    model.forward = types.MethodType(_fused_forward, model)


class _NoLayer:
    """A class no module is an instance of."""


@contextlib.contextmanager
def _peft_lm_head_allowed(trainer_args):
    """Lift GRPOTrainer.__init__'s refusal of a PEFT adapter on the lm-head while it runs.

    TRL refuses it because its own fused head reads lm_head.weight and would ignore (and never train) the
    adapter; this trainer's head reads the adapter into the fused op (`fused_rlvr.integrations.hf.lm_head`,
    which refuses what it cannot express). TRL tests `isinstance(head, BaseTunerLayer)` for the refusal, so
    that name of its module is swapped for the duration. Not with cast_lm_head_to_fp32, which TRL's same
    test guards (it cannot cast an adapter layer): TRL's error then stands.
    """
    import trl.trainer.grpo_trainer as grpo_module

    if getattr(trainer_args, "cast_lm_head_to_fp32", False) or not hasattr(grpo_module, "BaseTunerLayer"):
        yield
        return
    original = grpo_module.BaseTunerLayer
    grpo_module.BaseTunerLayer = _NoLayer
    try:
        yield
    finally:
        grpo_module.BaseTunerLayer = original


class FusedGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer whose log-probs, entropies and loss come from fused_rlvr (no logits anywhere).

    Takes GRPOTrainer's arguments plus:
        fused_backend: "auto" (Triton on CUDA, chunked torch on CPU), "triton" or "torch".
        fused_loss: compute the training loss with `fused_rlvr.linear_grpo_loss` where it expresses the
            configuration (see the module docstring); False always runs TRL's loss code on fused log-probs.

    `fused_loss_path(inputs)` says which of the two computes the loss for a batch, and why.
    """

    def __init__(self, *args, fused_backend: str = "auto", fused_loss: bool = True, **kwargs):
        trainer_args = kwargs.get("args", args[2] if len(args) > 2 else None)
        with _peft_lm_head_allowed(trainer_args):
            super().__init__(*args, **kwargs)
        self.fused_backend = fused_backend
        self.fused_loss = fused_loss
        cast = self.args.cast_lm_head_to_fp32
        policy = unwrap_model(self.model)
        add_fused_lm_head(
            policy,
            temperature=self.temperature,
            cast_lm_head_to_fp32=cast,
            outputs=("log_probs", "entropy"),
            backend=fused_backend,
        )
        if self.ref_model is not None:
            add_fused_lm_head(
                unwrap_model(self.ref_model),
                temperature=self.temperature,
                cast_lm_head_to_fp32=cast,
                backend=fused_backend,
            )

    def fused_loss_path(self, inputs: dict[str, Any]) -> tuple[bool, str]:
        """(True, "") when linear_grpo_loss computes the loss of `inputs`, else (False, the reason)."""
        args = self.args
        checks = [
            (not self.fused_loss, "fused_loss=False"),
            (self.loss_type not in FUSED_LOSS_TYPES, f"loss_type={self.loss_type!r}"),
            (self.top_entropy_quantile < 1.0, "top_entropy_quantile < 1 (entropy mask)"),
            (self._entropy_bonus_enabled and self.use_adaptive_entropy, "adaptive entropy bonus"),
            (
                self._entropy_bonus_enabled and self.loss_type == "grpo",
                "entropy bonus with loss_type='grpo' (TRL's bonus is a token mean, the loss a sequence mean)",
            ),
            (self.off_policy_mask_threshold is not None, "off_policy_mask_threshold"),
            (
                self.use_vllm and self.vllm_importance_sampling_correction,
                "vLLM importance-sampling correction",
            ),
            (
                self.beta != 0.0 and getattr(args, "use_bias_correction_kl", False),
                "use_bias_correction_kl (TRL's default with beta > 0: the KL term is weighted by the ratio)",
            ),
            (getattr(args, "delta", None) is not None, "delta (two-sided clipping)"),
            (self.aux_loss_enabled, "MoE router aux loss"),
            (any(inputs.get(k) is not None for k in _MULTIMODAL_KEYS), "multimodal inputs"),
        ]
        for failed, reason in checks:
            if failed:
                return False, reason
        return True, ""

    def _compute_loss(self, model, inputs):
        use_fused, _ = self.fused_loss_path(inputs)
        if not use_fused:  # TRL's loss code on the fused per-token log-probs / entropies of add_fused_lm_head
            return super()._compute_loss(model, inputs)
        return self._fused_grpo_loss(model, inputs)

    def _normalizer(self, mask: torch.Tensor, num_items_in_batch, mode: str) -> float:
        """TRL's whole-batch divisor for self.loss_type, gradient accumulation included."""
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1
        if self.loss_type == "grpo":
            return float(mask.shape[0] * accum)
        if self.loss_type == "bnpo":
            return max(float(mask.sum()), 1.0) * accum
        if self.loss_type == "dr_grpo":
            return float(mask.shape[0] * self.max_completion_length * accum)
        normalizer = float(num_items_in_batch.clamp(min=1.0)) / self.accelerator.num_processes  # dapo
        if mode == "train":
            normalizer = normalizer * accum / self.args.steps_per_generation
        return normalizer

    def _fused_grpo_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        n_completion = completion_ids.size(1)

        # 1. last hidden states through the (possibly DDP-wrapped) model, so its hooks run as in TRL
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, fused_lm_head="hidden")
        hidden = out.last_hidden_state[:, -n_completion - 1 : -1]  # position t scores completion token t
        hidden, weight, head_kwargs, ctx = head_inputs(
            unwrap_model(self.accelerator.unwrap_model(model)),
            hidden,
            cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32,
        )

        # 2. TRL's normaliser and entropy bonus expressed for linear_grpo_loss
        divisor = self._normalizer(mask, inputs.get("num_items_in_batch"), mode)
        entropy_coef = 0.0
        if self._entropy_bonus_enabled:  # TRL: - coef * sum(m H) / sum(m) / accum, whatever the loss type
            accum = self.current_gradient_accumulation_steps if mode == "train" else 1
            entropy_coef = self.entropy_coef * divisor / (max(float(mask.sum()), 1.0) * accum)
        advantages = inputs["advantages"]
        with ctx:
            loss, stats = linear_grpo_loss(
                hidden,
                weight,
                completion_ids.to(weight.device),
                advantages,
                mask,
                old_logprobs=inputs.get("old_per_token_logps"),
                ref_logprobs=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
                beta=self.beta,
                kl="k3",
                eps_low=self.epsilon_low,
                eps_high=self.epsilon_high,
                importance=self.importance_sampling_level,
                agg=self.loss_type,
                entropy_coef=entropy_coef,
                temperature=self.temperature,
                backend=self.fused_backend,
                normalizer=divisor,
                max_len=self.max_completion_length,
                **head_kwargs,  # bias, softcap, a LoRA adapter on the head (LMHead.op_kwargs)
            )
        self._log_fused_metrics(mode, stats, mask)
        return loss

    def _log_fused_metrics(self, mode: str, stats, mask) -> None:
        """TRL's metric names from GRPOStats (token means reduced over processes)."""
        n = stats.n_tokens.detach().float()

        def global_mean(local_mean):
            local = torch.stack([local_mean.detach().float() * n, n])
            totals = self.accelerator.reduce(local, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        metrics = self._metrics[mode]
        if self.beta != 0.0:
            metrics["kl"].append(global_mean(stats.ref_kl))
        metrics["entropy"].append(global_mean(stats.mean_entropy))
        metrics["clip_ratio/low_mean"].append(global_mean(stats.clip_frac_low))
        metrics["clip_ratio/high_mean"].append(global_mean(stats.clip_frac_high))
        metrics["clip_ratio/region_mean"].append(global_mean(stats.clip_frac_low + stats.clip_frac_high))
        if self._entropy_bonus_enabled:
            policy = stats.pg_loss + stats.kl_loss
            if self.loss_type != "dapo" and mode == "train":  # TRL logs these before the accumulation divide
                policy = policy * self.current_gradient_accumulation_steps
            metrics["policy_loss"].append(self.accelerator.gather(policy.detach()).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                metrics["entropy_coef"].append(self.entropy_coef)
