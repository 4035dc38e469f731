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
   "dapo", "luspo": policy_loss="ppo"; "cispo"; "sapo" with sapo_temperature_pos/neg), beta (k3 against the
   reference, ratio-weighted with use_bias_correction_kl, TRL's default), epsilon / epsilon_high, delta
   (ratio_cap), importance_sampling_level ("sequence" -> importance="sequence-mean"), temperature,
   num_items_in_batch, gradient accumulation, the static entropy bonus (entropy_coef; not with the
   sequence-mean losses "grpo" / "sapo"), and, as pg_weights, entropy masks (top_entropy_quantile, from the
   entropies of the current batch), off-policy masks (off_policy_mask_threshold) and vLLM importance
   sampling (vllm_importance_sampling_correction: the ratio TRL stored at rollout time in
   inputs["importance_sampling_ratio"], from its mode / clip settings; `fused_rlvr.rollout_correction`
   computes the same weights). No clamps: TRL clamps neither the log-ratio nor k3. scale_rewards and the
   advantages are TRL's own (computed at rollout time, unchanged). The metrics TRL's loss logs (kl, entropy,
   clip_ratio/low_mean, high_mean, region_mean, low_min, high_max, cispo_clip_ratio, policy_loss,
   entropy_coef) are logged under TRL's names. What linear_grpo_loss does not express runs TRL's own loss code
   on the fused per-token log-probs and entropies of (1): still no logits, TRL's exact semantics. That covers
   the loss type vespo, the adaptive entropy bonus, the entropy bonus with "grpo" / "sapo" or with an entropy
   mask, and multimodal inputs. The MoE load-balancing loss (router_aux_loss_coef) is added as TRL adds it
   (metric aux_loss). `FusedGRPOTrainer.fused_loss_path(inputs)` says which one runs, and why.

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
    from trl.trainer.utils import FusedCausalLMOutput, nanmax, nanmin
except ImportError as err:  # pragma: no cover - exercised only without trl
    raise ImportError(
        "fused_rlvr.integrations.trl needs TRL: pip install 'fused-rlvr[trl]' (tested with trl 1.16)"
    ) from err

from fused_rlvr.grpo import linear_grpo_loss
from fused_rlvr.integrations.hf import IGNORE_INDEX, _backbone, lm_head, unwrap_model
from fused_rlvr.linear_logprobs import linear_logprobs

SUPPORTED_OUTPUTS = ("log_probs", "entropy")
# TRL's loss_type -> (linear_grpo_loss's policy_loss, agg): TRL aggregates sapo like grpo, cispo like dapo,
# and luspo as sum_t m l averaged over sequences
_LOSS_TYPES = {
    "grpo": ("ppo", "grpo"),
    "bnpo": ("ppo", "bnpo"),
    "dr_grpo": ("ppo", "dr_grpo"),
    "dapo": ("ppo", "dapo"),
    "luspo": ("ppo", "seq-mean-token-sum"),
    "cispo": ("cispo", "dapo"),
    "sapo": ("sapo", "grpo"),
}
_PPO_LOSS_TYPES = tuple(k for k, (policy, _) in _LOSS_TYPES.items() if policy == "ppo")
FUSED_LOSS_TYPES = tuple(_LOSS_TYPES)
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
        ppo_type = self.loss_type in _PPO_LOSS_TYPES
        is_correction = self.use_vllm and self.vllm_importance_sampling_correction
        checks = [
            (not self.fused_loss, "fused_loss=False"),
            (
                self.loss_type not in _LOSS_TYPES,
                f"loss_type={self.loss_type!r} (its weights of the sequence ratio have no fused form here)",
            ),
            (ppo_type and not 0 < self.epsilon_high <= 1, f"epsilon_high={self.epsilon_high} outside (0, 1]"),
            (self._entropy_bonus_enabled and self.use_adaptive_entropy, "adaptive entropy bonus"),
            (
                self._entropy_bonus_enabled and _LOSS_TYPES.get(self.loss_type, ("", ""))[1] == "grpo",
                f"entropy bonus with loss_type={self.loss_type!r} (TRL's bonus is a token mean, the loss a "
                "sequence mean)",
            ),
            (
                self._entropy_bonus_enabled and self.top_entropy_quantile < 1.0,
                "entropy bonus with top_entropy_quantile < 1 (TRL averages the bonus over the entropy-masked "
                "tokens)",
            ),
            (
                is_correction and "importance_sampling_ratio" not in inputs,
                "vLLM importance-sampling correction without inputs['importance_sampling_ratio']",
            ),
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
        agg = _LOSS_TYPES[self.loss_type][1]
        if agg in ("grpo", "seq-mean-token-sum"):  # grpo, sapo, luspo: a mean over sequences
            return float(mask.shape[0] * accum)
        if agg == "bnpo":
            return max(float(mask.sum()), 1.0) * accum
        if agg == "dr_grpo":
            return float(mask.shape[0] * self.max_completion_length * accum)
        normalizer = float(num_items_in_batch.clamp(min=1.0)) / self.accelerator.num_processes  # dapo, cispo
        if mode == "train":
            normalizer = normalizer * accum / self.args.steps_per_generation
        return normalizer

    def _pg_weights(self, inputs, mask, advantages):
        """TRL's multipliers of the per-token policy loss (off-policy mask, entropy mask, vLLM importance
        sampling ratio) as linear_grpo_loss's pg_weights: None, a tensor, or a function of the call's
        log-probs and entropies (the two masks read the current policy, as TRL computes them)."""
        is_ratio = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            is_ratio = inputs["importance_sampling_ratio"]
        threshold = self.off_policy_mask_threshold
        quantile = self.top_entropy_quantile
        if threshold is None and quantile >= 1.0:
            return is_ratio
        old = inputs.get("old_per_token_logps")
        adv = advantages if advantages.dim() == 2 else advantages.unsqueeze(1)

        def weights(lp: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
            w = torch.ones_like(lp)
            if threshold is not None:  # TRL: the rollout log-probs when present, else the old ones
                sampling = inputs.get("sampling_per_token_logps", lp if old is None else old)
                keep = self.get_off_policy_mask(adv, lp, sampling, mask, threshold)
                w = w * keep.to(lp.dtype)
            if quantile < 1.0:
                w = w * self.get_high_entropy_mask(entropy, mask, 1 - quantile).to(lp.dtype)
            if is_ratio is not None:
                w = w * is_ratio.to(lp.dtype)
            return w

        return weights

    def _fused_grpo_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        n_completion = completion_ids.size(1)

        # 1. last hidden states through the (possibly DDP-wrapped) model, so its hooks run as in TRL
        extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, fused_lm_head="hidden", **extra)
        hidden = out.last_hidden_state[:, -n_completion - 1 : -1]  # position t scores completion token t
        unwrapped = unwrap_model(self.accelerator.unwrap_model(model))
        hidden, weight, head_kwargs, ctx = head_inputs(
            unwrapped, hidden, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32
        )

        # 2. TRL's loss type, normaliser, clipping, KL and entropy bonus expressed for linear_grpo_loss
        policy_loss, agg = _LOSS_TYPES[self.loss_type]
        divisor = self._normalizer(mask, inputs.get("num_items_in_batch"), mode)
        entropy_coef = 0.0
        if self._entropy_bonus_enabled:  # TRL: - coef * sum(m H) / sum(m) / accum, whatever the loss type
            accum = self.current_gradient_accumulation_steps if mode == "train" else 1
            entropy_coef = self.entropy_coef * divisor / (max(float(mask.sum()), 1.0) * accum)
        advantages = inputs["advantages"]
        delta = getattr(self.args, "delta", None)
        bias_corrected_kl = self.beta != 0.0 and bool(getattr(self.args, "use_bias_correction_kl", False))
        with ctx:
            loss, stats = linear_grpo_loss(
                hidden,
                weight,
                completion_ids.to(weight.device),
                advantages,
                mask,
                old_logprobs=inputs.get("old_per_token_logps"),
                ref_logprobs=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
                policy_loss=policy_loss,
                beta=self.beta,
                kl="k3",
                kl_ratio_weighted=bias_corrected_kl,
                kl_clamp=None,  # TRL clamps neither k3 nor the log-ratio
                log_ratio_clamp=None,
                eps_low=self.epsilon_low,
                eps_high=self.epsilon_high,
                ratio_cap=delta if policy_loss == "ppo" else None,  # TRL applies delta to its PPO losses
                sapo_tau_pos=self.args.sapo_temperature_pos,
                sapo_tau_neg=self.args.sapo_temperature_neg,
                importance="sequence-mean" if self.importance_sampling_level == "sequence" else "token",
                agg=agg,
                entropy_coef=entropy_coef,
                pg_weights=self._pg_weights(inputs, mask, advantages),
                temperature=self.temperature,
                backend=self.fused_backend,
                normalizer=divisor,
                max_len=self.max_completion_length,
                **head_kwargs,  # bias, softcap, a LoRA adapter on the head (LMHead.op_kwargs)
            )
        self._log_fused_metrics(mode, stats, mask, advantages)
        if self.aux_loss_enabled:  # TRL: + coef * load-balancing loss, scaled for gradient accumulation
            aux_loss = _router_aux_loss(unwrapped, out, attention_mask)
            accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / accum
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(aux_loss).mean().item()
            )
        return loss

    def _log_fused_metrics(self, mode: str, stats, mask, advantages) -> None:
        """The metrics TRL's loss logs, under TRL's names, from GRPOStats (reduced over processes as TRL
        does: token means, or sequence means where TRL's clip flags are one per sequence)."""
        n = stats.n_tokens.detach().float()
        n_seqs = torch.tensor(float(mask.shape[0]), device=n.device)
        per_sequence = self.importance_sampling_level == "sequence" and (
            advantages.dim() == 1 or advantages.shape[1] == 1
        )

        def global_mean(local_mean, count):
            local = torch.stack([local_mean.detach().float() * count, count])
            totals = self.accelerator.reduce(local, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def clip_mean(token_mean, seq_mean):
            return global_mean(seq_mean, n_seqs) if per_sequence else global_mean(token_mean, n)

        def seq_extreme(value, lowest):
            # TRL: nanmin / nanmax over every process's per-sequence fractions; a sequence without tokens is
            # NaN at token level (skipped) and 0 at sequence level (its ratio is exp(0) = 1)
            v = value.detach().float()
            if per_sequence:
                v = torch.where(n > 0, v, 0.0)
                if lowest and bool((mask.sum(1) == 0).any()):
                    v = torch.zeros_like(v)  # fractions are >= 0: an empty sequence's 0 is the minimum
            else:
                v = torch.where(n > 0, v, float("nan"))
            gathered = self.accelerator.gather(v.reshape(1))
            return (nanmin(gathered) if lowest else nanmax(gathered)).item()

        metrics = self._metrics[mode]
        if self.beta != 0.0:
            metrics["kl"].append(global_mean(stats.ref_kl, n))
        metrics["entropy"].append(global_mean(stats.mean_entropy, n))
        if self.loss_type in _PPO_LOSS_TYPES:
            low = clip_mean(stats.clip_frac_low, stats.clip_frac_low_seq_mean)
            high = clip_mean(stats.clip_frac_high, stats.clip_frac_high_seq_mean)
            region = clip_mean(
                stats.clip_frac_low + stats.clip_frac_high,
                stats.clip_frac_low_seq_mean + stats.clip_frac_high_seq_mean,
            )
            metrics["clip_ratio/low_mean"].append(low)
            metrics["clip_ratio/high_mean"].append(high)
            metrics["clip_ratio/region_mean"].append(region)
            metrics["clip_ratio/low_min"].append(seq_extreme(stats.clip_frac_low_min, True))
            metrics["clip_ratio/high_max"].append(seq_extreme(stats.clip_frac_high_max, False))
        elif self.loss_type == "cispo":
            metrics["cispo_clip_ratio"].append(clip_mean(stats.clip_frac_high, stats.clip_frac_high_seq_mean))
        if self._entropy_bonus_enabled:
            policy = stats.pg_loss + stats.kl_loss
            if self.loss_type not in ("dapo", "cispo") and mode == "train":  # logged before the accum divide
                policy = policy * self.current_gradient_accumulation_steps
            metrics["policy_loss"].append(self.accelerator.gather(policy.detach()).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                metrics["entropy_coef"].append(self.entropy_coef)
