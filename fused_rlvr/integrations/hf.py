"""Hugging Face causal LMs: last hidden states and the lm-head, without the [B, T, V] logits.

`lm_head(model)` reads what the fused op needs from a model's output layer (weight, bias, Gemma-2's logit
soft-cap; a tied embedding is the same tensor as the input embedding, so its gradient reaches both uses).
`last_hidden_states(model, ...)` runs the body below the head (`model.base_model`: the decoder with its final
norm) and returns what the head would see. `sequence_token_stats` puts the two together with the shift that
causal LMs use: the hidden state at position t scores the token at t + 1.

    head = lm_head(model)
    hidden = last_hidden_states(model, input_ids, attention_mask)          # [B, T, H], final norm applied
    targets = input_ids[:, 1:].masked_fill(response_mask[:, 1:] == 0, -100)
    lp, ent = linear_logprobs(hidden[:, :-1], head.weight, targets, **head.op_kwargs())

A PEFT LoRA adapter on the lm-head (`target_modules` including "lm_head") is read into the head and fused:
logits = softcap(h W^T + scaling (h A^T) B^T + b), trained through the op's LoRA gradients. Models whose head
does something else (Cohere's `logit_scale`, Granite's `logits_scaling`, DoRA or other PEFT variants, several
active adapters, active LoRA dropout) are refused with an error naming the model class rather than scored
wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn

from fused_rlvr.linear_logprobs import linear_logprobs
from fused_rlvr.lora import LoRA
from fused_rlvr.types import IGNORE_INDEX, TokenStats

# config attributes that rescale the logits in some model families; the fused op has no such term
_LOGIT_SCALES = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")


@dataclass(frozen=True)
class LMHead:
    """What the fused op needs from a model's output layer:
    logits = softcap(hidden @ weight.T + lora.scale * (hidden @ lora.a.T) @ lora.b.T + bias).

    The tensors are the model's own parameters (not copies), so gradients computed through them land in the
    model's `.grad` fields; with tied embeddings `weight` is the input embedding matrix. `lora` is the active
    PEFT LoRA adapter of the head (lora_A.weight, lora_B.weight, scaling), or None.
    """

    weight: torch.Tensor  # [V, H]
    bias: Optional[torch.Tensor]  # [V] or None
    softcap: Optional[float]  # e.g. Gemma-2's final_logit_softcapping, else None
    lora: Optional[LoRA] = None

    def op_kwargs(self) -> dict:
        """The fused op's keyword arguments for this head: bias, softcap, lora_a, lora_b, lora_scale.

        `fused_rlvr.linear_logprobs(hidden, head.weight, targets, **head.op_kwargs())` scores with this head;
        the losses (`linear_grpo_loss`, `linear_pacs_loss`, DPO) take the same keywords.
        """
        lora = self.lora
        return dict(
            bias=self.bias,
            softcap=self.softcap,
            lora_a=None if lora is None else lora.a,
            lora_b=None if lora is None else lora.b,
            lora_scale=None if lora is None else lora.scale,
        )

    def cast(self, hidden: torch.Tensor, *, fp32: bool = False) -> tuple[torch.Tensor, LMHead]:
        """(hidden, head) in the dtype the model's own head computes in, hidden on the head's device.

        That dtype is the autocast dtype inside an autocast region, float32 with fp32=True (TRL's
        cast_lm_head_to_fp32), else the weight's. Outside autocast a LoRA adapter keeps its own dtype (PEFT
        casts the input to the adapter's dtype, e.g. fp32 adapters on a bf16 model).
        """
        dev = hidden.device.type
        if fp32:
            dtype = torch.float32
        elif torch.is_autocast_enabled(dev):
            dtype = torch.get_autocast_dtype(dev)
        else:
            dtype = None
        hidden, weight, bias = _match_head_dtype(hidden, self.weight, self.bias, dtype)
        lora = self.lora
        if lora is not None and dtype is not None:
            lora = replace(lora, a=lora.a.to(dtype), b=lora.b.to(dtype))
        return hidden, replace(self, weight=weight, bias=bias, lora=lora)

    def token_stats(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        *,
        temperature: float | torch.Tensor = 1.0,
        ignore_index: int = IGNORE_INDEX,
        return_entropy: bool = True,
        backend: str = "auto",
    ) -> TokenStats:
        """`fused_rlvr.linear_logprobs` of `targets` [...] given `hidden` [..., H] under this head.

        temperature: a float or a per-token tensor shaped like `targets`."""
        hidden, head = self.cast(hidden)
        return linear_logprobs(
            hidden,
            head.weight,
            targets,
            temperature=temperature,
            ignore_index=ignore_index,
            return_entropy=return_entropy,
            backend=backend,
            **head.op_kwargs(),
        )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT `PeftModel` (its LoRA layers stay injected in place)."""
    if type(model).__name__.startswith("Peft") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def lm_head(model: nn.Module) -> LMHead:
    """The lm-head of a Hugging Face causal LM (or a PEFT model wrapping one) as an `LMHead`.

    A PEFT LoRA adapter on the head (peft.tuners.lora.Linear) becomes `LMHead.lora` when it is active: one
    active adapter, plain LoRA (no DoRA or other variant, no lora_bias), not merged, and its dropout inactive
    (p = 0 or the layer in eval mode). Disabled adapters (PEFT's disable_adapter(), which TRL uses for
    reference log-probs) give the plain head; an adapter merged into the weight is already in it.
    Raises a ValueError / TypeError / NotImplementedError naming the model class when the model has no output
    embedding, when the head carries a PEFT layer or adapter configuration the fused op cannot express
    (saying which and what to do), when the head is not a plain linear layer with a floating-point [V, H]
    weight, or when the model rescales its logits (Cohere's `logit_scale`, Granite's `logits_scaling`).
    The adapter's state is read on every call: call it where the head is used (as the integrations do).
    """
    inner = unwrap_model(model)
    name = type(inner).__name__
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise ValueError(
            f"{name} has no output embedding (get_output_embeddings() returned None): the fused log-probs "
            "need a causal LM with an lm-head, e.g. AutoModelForCausalLM rather than AutoModel"
        )
    lora = None
    if (
        type(head).__module__.split(".")[0] == "peft"
        or hasattr(head, "lora_A")
        or hasattr(head, "base_layer")
    ):
        head, lora = _peft_lm_head(head, name)
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"the lm-head of {name} is a {type(head).__name__}, not a torch.nn.Linear: the fused op needs "
            "logits = hidden @ weight.T + bias"
        )
    weight = head.weight
    if weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError(
            f"the lm-head weight of {name} must be a floating-point [V, H] tensor, got dtype {weight.dtype} "
            f"and shape {tuple(weight.shape)} (quantised heads are not supported)"
        )
    config = _text_config(inner)
    for attr in _LOGIT_SCALES:
        value = getattr(config, attr, None)
        if value is not None and not isinstance(value, bool) and float(value) != 1.0:
            raise NotImplementedError(
                f"{name} rescales its logits by config.{attr}={value}: the fused op computes "
                "softcap(hidden @ weight.T + bias) / temperature only, so this model would be scored wrongly"
            )
    softcap = getattr(config, "final_logit_softcapping", None)
    softcap = float(softcap) if softcap else None
    return LMHead(weight=weight, bias=head.bias, softcap=softcap, lora=lora)


def _peft_lm_head(layer: nn.Module, name: str) -> tuple[nn.Module, Optional[LoRA]]:
    """(base linear layer, active LoRA adapter or None) of a PEFT layer on the lm-head of model `name`."""
    where = f"the lm-head of {name} carries a PEFT {type(layer).__name__}"
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        LoraLinear = None
    if LoraLinear is None or not isinstance(layer, LoraLinear):
        raise NotImplementedError(
            f"{where}: the fused op reads a plain LoRA adapter (peft.tuners.lora.Linear) on the lm-head, not "
            "this PEFT layer type. Remove 'lm_head' from the adapter's target_modules or modules_to_save, "
            "or merge the adapter"
        )
    base = layer.get_base_layer()
    if getattr(layer, "fan_in_fan_out", False):
        raise NotImplementedError(f"{where} with fan_in_fan_out=True: the fused op needs a [V, H] weight")
    if layer.disable_adapters:
        if layer.merged:  # PEFT's forward would unmerge the weight before using it
            raise NotImplementedError(
                f"{where} with merged adapters while adapters are disabled: unmerge first (its forward "
                "would subtract the merged update from the weight on the fly)"
            )
        return base, None
    if layer.merged:
        if any(a not in layer.merged_adapters for a in layer.active_adapters if a in layer.lora_A):
            raise NotImplementedError(
                f"{where} with adapters {layer.merged_adapters} merged and other active adapters unmerged: "
                "merge all active adapters or none"
            )
        return base, None  # the merged update is part of the weight
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if not active:
        return base, None
    if len(active) > 1:
        raise NotImplementedError(
            f"{where} with {len(active)} active adapters {active}: the fused op takes one LoRA adapter; "
            "activate one (set_adapter) or merge them"
        )
    adapter = active[0]
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is not None or getattr(layer, "use_dora", {}).get(adapter, False):
        kind = "DoRA" if getattr(layer, "use_dora", {}).get(adapter, False) else type(variant).__name__
        raise NotImplementedError(
            f"{where}: adapter {adapter!r} is a {kind} adapter, not plain LoRA (u = h W^T + s h A^T B^T): "
            "the fused op computes plain LoRA only. Remove 'lm_head' from target_modules or merge the adapter"
        )
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        raise NotImplementedError(
            f"{where}: adapter {adapter!r} has lora_bias=True (a bias on lora_B), which the fused op does "
            "not add; merge the adapter or train without lora_bias"
        )
    dropout = layer.lora_dropout[adapter]
    p = float(getattr(dropout, "p", 0.0))
    if p > 0 and dropout.training:
        raise ValueError(
            f"{where}: adapter {adapter!r} applies lora_dropout={p} in training mode, which the fused op "
            "does not do. Set lora_dropout=0 for an adapter on the lm-head, or call model.eval()"
        )
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    return base, LoRA(a=a, b=b, scale=float(layer.scaling[adapter]))


def _backbone(model: nn.Module) -> nn.Module:
    """The body below the lm-head: `base_model` (decoder + final norm; for vision-language models also the
    vision tower), as the model's own forward calls it."""
    inner = unwrap_model(model)
    base = getattr(inner, "base_model", None)
    if isinstance(base, nn.Module) and base is not inner:
        return base
    get_decoder = getattr(inner, "get_decoder", None)
    if callable(get_decoder):
        decoder = get_decoder()
        if decoder is not None and decoder is not inner:
            return decoder
    return inner  # already a bare decoder (e.g. LlamaModel)


def last_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    **forward_kwargs,
) -> torch.Tensor:
    """[B, T, H] hidden states that the lm-head of `model` would see (final norm applied), no logits.

    Runs `model.base_model` (LlamaModel inside LlamaForCausalLM, GPT2Model inside GPT2LMHeadModel, ...) with
    `use_cache=False`; extra keyword arguments (position_ids, pixel_values, ...) go to it unchanged.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = getattr(input_ids, "shape", type(input_ids))
        raise ValueError(f"input_ids must be a [B, T] tensor, got {got}")
    forward_kwargs.setdefault("use_cache", False)
    out = _backbone(model)(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(input_ids.shape):
        raise ValueError(
            f"{type(unwrap_model(model)).__name__}'s body returned hidden states of shape "
            f"{tuple(hidden.shape)} for input_ids {tuple(input_ids.shape)}; expected [B, T, H]"
        )
    return hidden


def _match_head_dtype(hidden, weight, bias, dtype=None):
    """Cast to `dtype`, by default the dtype the model's own lm-head matmul would use (the autocast dtype
    under autocast, else the weight's); hidden moves to the weight's device."""
    if dtype is None:
        dev = hidden.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    hidden = hidden.to(device=weight.device, dtype=dtype)
    weight = weight.to(dtype)
    return hidden, weight, None if bias is None else bias.to(dtype)


def shifted_targets(
    input_ids: torch.Tensor, response_mask: Optional[torch.Tensor], ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """[B, T-1] targets input_ids[:, 1:], with ignore_index where response_mask[:, 1:] == 0."""
    targets = input_ids[:, 1:].long()  # int64: ignore_index need not fit the ids' dtype
    if response_mask is None:
        return targets
    if tuple(response_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"response_mask must be aligned with input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(response_mask.shape)}"
        )
    return targets.masked_fill(response_mask[:, 1:] == 0, ignore_index)


def sequence_token_stats(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    response_mask: Optional[torch.Tensor],
    *,
    temperature: float | torch.Tensor = 1.0,
    return_entropy: bool = True,
    backend: str = "auto",
    **forward_kwargs,
) -> TokenStats:
    """Fused per-token log-probs (and entropy) of a causal LM's own tokens, [B, T-1], without logits.

    Shift convention: `input_ids`, `attention_mask` and `response_mask` are [B, T] and aligned with each other
    (response_mask[b, t] = 1 when token input_ids[b, t] is to be scored, e.g. a completion token). The outputs
    are [B, T-1] and aligned with input_ids[:, 1:]: out[b, t] scores input_ids[b, t + 1] under the model's
    distribution at position t. Equals, in plain torch::

        logits = model(input_ids, attention_mask=attention_mask).logits
        logp = torch.log_softmax(logits[:, :-1] / temperature, -1)
        out[b, t] = logp[b, t, input_ids[b, t + 1]] if response_mask[b, t + 1] else 0

    (the logits including Gemma-2's soft-cap). `temperature` is a float or a per-token [B, T-1] tensor
    aligned with the outputs (temperature[b, t] divides the logits that score input_ids[b, t + 1]; any value
    where the token is not scored). Unscored positions cost no vocabulary work. Differentiable
    w.r.t. the model's parameters; run under torch.no_grad() for old / reference log-probs. A None
    response_mask scores every position.
    """
    head = lm_head(model)
    hidden = last_hidden_states(model, input_ids, attention_mask, **forward_kwargs)
    targets = shifted_targets(input_ids, response_mask).to(head.weight.device)
    return head.token_stats(
        hidden[:, :-1], targets, temperature=temperature, return_entropy=return_entropy, backend=backend
    )
