"""Input checks for the public API: each error names the argument, what it got, and what was expected."""

from __future__ import annotations

import math
import os
import sys
from numbers import Real

import torch

from fused_rlvr.lora import LoRA

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BACKENDS = ("auto", "triton", "torch")

_check_targets = os.environ.get("FUSED_RLVR_CHECK_TARGETS", "1") != "0"
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def set_target_check(enabled: bool) -> None:
    """Turn the target-range check on or off for this process.

    The check (every target in [0, V) or equal to ignore_index) costs one device->host sync per call. On a
    hot GPU path whose targets are known to be valid, turn it off with `set_target_check(False)` or by
    setting FUSED_RLVR_CHECK_TARGETS=0 before import. Unchecked out-of-range targets give a log-prob that
    ignores the target logit (a wrong value), never a memory error: the kernels clamp every index.
    It also turns off the per-call layout/consistency all_gather of a vocabulary-parallel call
    (`vocab_parallel=`), whose shard layout is then trusted.
    """
    global _check_targets
    _check_targets = bool(enabled)


def target_check_enabled() -> bool:
    return _check_targets


def tracing() -> bool:
    """True while torch.compile traces the caller. The checks of tensor values (which read them on the host)
    are then not traced: the target-range and per-token temperature checks run inside the fused op's
    implementation instead (fused_rlvr.linear_logprobs), the value checks of masks and weights are skipped."""
    return torch.compiler.is_compiling()


def finite(value: float) -> bool:
    """math.isfinite as comparisons, which torch.compile can trace when it makes a float argument symbolic."""
    return -math.inf < value < math.inf


def positive_finite(name: str, value, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        expected = "a finite positive number or None" if allow_none else "a finite positive number"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    value = float(value)
    if not finite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value}")
    return value


def one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")


def check_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _is_dtensor(value) -> bool:
    mod = sys.modules.get("torch.distributed.tensor")  # loaded whenever a DTensor can exist
    return mod is not None and isinstance(value, mod.DTensor)


def check_plain(name: str, value) -> None:
    """The fused ops take plain tensors; a DTensor here is an FSDP2- or TP-sharded parameter."""
    if _is_dtensor(value):
        raise TypeError(
            f"{name} is a DTensor (placements {tuple(value.placements)}): an FSDP2-sharded lm-head must be "
            "called through fused_rlvr.fsdp.fsdp2_lm_head_call(lm_head, fn, ...) so that FSDP2 gathers it; "
            "a vocabulary shard goes in as weight.to_local() with vocab_parallel=VocabParallel(...)"
        )


def integer_targets(targets: torch.Tensor) -> torch.Tensor:
    """Raise unless `targets` is a tensor of an integer dtype (not bool); returns it."""
    check_tensor("targets", targets)
    if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    return targets


def check_linear_inputs(hidden, weight, targets, bias, ignore_index, backend, *, check_targets=True) -> None:
    """Shapes, dtypes and devices; with check_targets (and the target check on) every target in [0, V).

    The vocabulary-parallel path passes check_targets=False: its targets range over the whole vocabulary,
    which only the ranks together know (fused_rlvr.vocab_parallel checks them against it). While
    torch.compile traces, the range check is left to the fused op's implementation (`tracing`).
    """
    check_tensor("hidden", hidden)
    check_tensor("weight", weight)
    check_tensor("targets", targets)
    for name, value in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        check_plain(name, value)
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must be [..., H] with H >= 1, got shape {tuple(hidden.shape)}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be bfloat16, float16 or float32, got {hidden.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row, got shape (0, H)")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"hidden width H={hidden.shape[-1]} (shape {tuple(hidden.shape)}) does not match weight "
            f"[V, H] = {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}; cast one to the other"
        )
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        check_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = ({weight.shape[0]},), got shape {tuple(bias.shape)}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise TypeError(
                f"bias must match weight's dtype and device ({weight.dtype}, {weight.device}), "
                f"got ({bias.dtype}, {bias.device})"
            )
    integer_targets(targets)
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have the shape of hidden[..., 0] = {tuple(hidden.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not _INT64_MIN <= ignore_index <= _INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    one_of("backend", backend, BACKENDS)
    if check_targets and not tracing():
        check_target_range(targets, weight.shape[0], ignore_index)


def check_target_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """With the target check on: every target in [0, vocab) or equal to ignore_index (one host sync)."""
    if not (_check_targets and targets.numel()):
        return
    t = targets.long()  # compared in int64: in uint8, `>= 300` would test `>= 44`, and -100 would be 156
    bad = (t != ignore_index) & ((t < 0) | (t >= vocab))
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        raise ValueError(
            f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"targets{where} = {int(t[tuple(where)])}"
        )


def as_mask(name: str, mask, shape) -> torch.Tensor:
    """A [B, T] 0/1 mask as contiguous float32 (any input layout gives the same result); bool or
    integer/float tensors holding only 0 and 1."""
    check_tensor(name, mask)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (that of targets), got {tuple(mask.shape)}")
    if mask.dtype != torch.bool and not tracing() and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(
            f"{name} must be boolean or hold only 0 and 1; got values such as "
            f"{mask[(mask != 0) & (mask != 1)].flatten()[:3].tolist()}"
        )
    return mask.to(torch.float32).contiguous()


def per_token(name: str, value, shape, *, allow_none: bool = True, allow_per_sequence: bool = False):
    """Check a [B, T] (or [B] where allowed) float tensor and return it as contiguous fp32."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} is required")
    check_per_token(name, value, shape, allow_per_sequence=allow_per_sequence)
    return value.detach().to(torch.float32).contiguous()


def check_per_token(name: str, value, shape, *, allow_per_sequence: bool = False) -> None:
    """A floating-point tensor of exactly `shape` (or [B] = shape[:1] where allowed); no broadcasting."""
    check_tensor(name, value)
    ok = tuple(value.shape) == tuple(shape) or (allow_per_sequence and tuple(value.shape) == tuple(shape[:1]))
    if not ok:
        expected = f"{tuple(shape)}" + (f" or {tuple(shape[:1])}" if allow_per_sequence else "")
        raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")


def non_negative(name: str, value) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real) or not finite(float(value)) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def finite_where(name: str, value: torch.Tensor, valid: torch.Tensor, *, allow_nan: bool = False) -> None:
    """Raise unless `value` is finite (or NaN, with allow_nan) wherever `valid` is True (broadcast)."""
    ok = torch.isfinite(value) | (torch.isnan(value) if allow_nan else False)
    bad = valid & ~ok
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        shown = value.expand_as(bad)[tuple(where)].item()
        expected = "finite or NaN" if allow_nan else "finite"
        raise ValueError(f"{name} must be {expected} where mask is 1; {name}{where} = {shown}")


def token_weights(name: str, value, shape, mask: torch.Tensor) -> torch.Tensor:
    """Check per-token [B, T] or per-sequence [B, 1] / [B] weights: floating point (or a boolean mask),
    finite and >= 0 where mask is 1 (anything elsewhere). Returns them detached as contiguous fp32 [B, T] or
    [B, 1]."""
    check_tensor(name, value)
    b, t = shape
    if tuple(value.shape) not in ((b, t), (b, 1), (b,)):
        raise ValueError(f"{name} must have shape {(b, t)}, {(b, 1)} or {(b,)}, got {tuple(value.shape)}")
    if not (value.is_floating_point() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be a floating-point or boolean tensor, got {value.dtype}")
    if value.device != mask.device:
        raise ValueError(f"{name} is on {value.device} but mask is on {mask.device}")
    w = value.detach().to(torch.float32).reshape(b, -1)
    if tracing():
        return w.contiguous()
    valid = mask > 0
    if w.shape[1] == 1:
        valid = valid.any(1, keepdim=True)
    finite_where(name, w, valid)
    neg = valid & (w < 0)
    if bool(neg.any()):
        where = neg.nonzero()[0].tolist()
        raise ValueError(f"{name} must be >= 0 where mask is 1; {name}{where} = {w[tuple(where)].item()}")
    return w.contiguous()


def check_temperature(temperature, targets: torch.Tensor, ignore_index: int, device) -> float | torch.Tensor:
    """A float temperature (a number or a one-element tensor), or a per-token tensor shaped like targets.

    A per-token temperature must be floating point, on `device`, and (with the target check on) finite and
    > 0 on every scored token (targets != ignore_index); ignored tokens may hold anything (that value check
    is left to the fused op's implementation while torch.compile traces). It is returned detached: the op
    has no gradient w.r.t. the temperature.
    """
    per_token = (
        isinstance(temperature, torch.Tensor)
        and temperature.dim() > 0
        and tuple(temperature.shape) == tuple(targets.shape)
    )
    if not per_token:
        if isinstance(temperature, torch.Tensor) and temperature.numel() != 1:
            raise ValueError(
                f"temperature must be a finite positive number or a tensor shaped like targets "
                f"{tuple(targets.shape)}, got a tensor of shape {tuple(temperature.shape)}"
            )
        return positive_finite("temperature", temperature)
    check_plain("temperature", temperature)
    if not temperature.is_floating_point():
        raise TypeError(f"temperature must be a floating-point tensor, got {temperature.dtype}")
    if temperature.device != device:
        raise ValueError(f"temperature is on {temperature.device} but hidden is on {device}")
    temperature = temperature.detach()
    if not tracing():
        check_token_temperature(temperature, targets, ignore_index)
    return temperature


def check_token_temperature(temperature: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> None:
    """With the target check on: a per-token temperature finite and > 0 on every scored token (one host
    sync)."""
    if not (_check_targets and temperature.numel()):
        return
    scored = targets.long() != ignore_index
    bad = scored & ~(torch.isfinite(temperature) & (temperature > 0))
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        raise ValueError(
            f"temperature must be finite and > 0 on every scored token; "
            f"temperature{where} = {float(temperature[tuple(where)])}"
        )


def check_lora(lora_a, lora_b, lora_scale, hidden: torch.Tensor, weight: torch.Tensor) -> LoRA | None:
    """A `fused_rlvr.lora.LoRA` from the public lora_a [r, H], lora_b [V, r], lora_scale, or None.

    Both factors or neither; floating point, one dtype, on hidden's device, plain tensors; r >= 1, H as
    hidden's width, V as weight's rows; lora_scale finite (1.0 when not given), only with the factors.
    """
    if lora_a is None and lora_b is None:
        if lora_scale is not None:
            raise ValueError("lora_scale is given without lora_a and lora_b (the adapter's factors)")
        return None
    if lora_a is None or lora_b is None:
        missing = "lora_a" if lora_a is None else "lora_b"
        raise ValueError(f"lora_a and lora_b go together: {missing} is missing")
    check_tensor("lora_a", lora_a)
    check_tensor("lora_b", lora_b)
    check_plain("lora_a", lora_a)
    check_plain("lora_b", lora_b)
    vocab, width = weight.shape[0], hidden.shape[-1]
    if lora_a.dim() != 2 or lora_a.shape[0] < 1 or lora_a.shape[1] != width:
        raise ValueError(
            f"lora_a must be [r, H] = [r, {width}] with r >= 1 (PEFT's lora_A.weight), "
            f"got shape {tuple(lora_a.shape)}"
        )
    rank = lora_a.shape[0]
    if tuple(lora_b.shape) != (vocab, rank):
        raise ValueError(
            f"lora_b must be [V, r] = ({vocab}, {rank}) (PEFT's lora_B.weight; V as weight's rows, r as "
            f"lora_a's), got shape {tuple(lora_b.shape)}"
        )
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be bfloat16, float16 or float32, got {t.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if lora_a.dtype != lora_b.dtype:
        raise TypeError(f"lora_a dtype {lora_a.dtype} differs from lora_b dtype {lora_b.dtype}")
    scale = 1.0 if lora_scale is None else lora_scale
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, Real) or not finite(float(scale)):
        raise ValueError(f"lora_scale must be a finite number, got {lora_scale!r}")
    return LoRA(lora_a, lora_b, float(scale))
