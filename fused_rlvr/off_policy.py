"""Off-policy corrections expressed as policy-gradient weights (`linear_grpo_loss(pg_weights=...)`)."""

from __future__ import annotations

import math
from typing import Optional

import torch

from fused_rlvr._validation import as_mask, check_tensor, finite_where, one_of

ROLLOUT_CORRECTION_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _bound(name: str, value, *, allow_zero: bool) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or None, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        expected = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {expected} or None, got {value}")
    return value


@torch.no_grad()
def rollout_correction(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "token_truncate",
    clip_min: Optional[float] = None,
    clip_max: Optional[float] = 2.0,
) -> torch.Tensor:
    """Importance weights correcting the rollout engine / trainer mismatch, as TRL's vLLM modes define them.

    old_logprobs: the trainer's log-probs of the sampled tokens under the sampling policy [B, T];
    rollout_logprobs: the rollout engine's (e.g. vLLM's) log-probs of the same tokens [B, T], NaN where the
    engine could not score a token; mask: 0/1 [B, T]. With d_t = m_t (old_t - rollout_t) (0 where the
    rollout log-prob is NaN or the mask is 0):
        "token_truncate":    w_t = clip(exp(d_t), clip_min, clip_max)                 -> [B, T]
        "token_mask":        w_t = exp(d_t) if clip_min <= exp(d_t) <= clip_max else 0 -> [B, T]
        "sequence_truncate": w_i = clip(exp(sum_t d_t), clip_min, clip_max)          -> [B, 1]
        "sequence_mask":     w_i = exp(sum_t d_t) if inside [clip_min, clip_max] else 0 -> [B, 1]
    A bound of None is no bound (a "*_truncate" mode needs at least one). Pass the result as
    `linear_grpo_loss(pg_weights=...)`: it multiplies the policy-gradient term only (TRL multiplies its
    per-token policy loss by it, not the KL). In plain torch (TRL's code):
        d = torch.nan_to_num((old - rollout) * mask, nan=0.0)
        w = torch.exp(d.sum(-1, keepdim=True) if mode.startswith("sequence") else d)
        w = w.clamp(clip_min, clip_max) if mode.endswith("truncate") else w.masked_fill(outside, 0.0)
    Values at masked positions are never read. Raises on non-finite old log-probs, or +-inf rollout
    log-probs, where mask is 1.
    """
    check_tensor("old_logprobs", old_logprobs)
    check_tensor("rollout_logprobs", rollout_logprobs)
    one_of("mode", mode, ROLLOUT_CORRECTION_MODES)
    if old_logprobs.dim() != 2:
        raise ValueError(f"old_logprobs must be [B, T], got shape {tuple(old_logprobs.shape)}")
    shape = tuple(old_logprobs.shape)
    if tuple(rollout_logprobs.shape) != shape:
        raise ValueError(
            f"rollout_logprobs must have the shape of old_logprobs {shape}, "
            f"got {tuple(rollout_logprobs.shape)}"
        )
    for name, t in (("old_logprobs", old_logprobs), ("rollout_logprobs", rollout_logprobs)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if rollout_logprobs.device != old_logprobs.device:
        raise ValueError(
            f"rollout_logprobs is on {rollout_logprobs.device} but old_logprobs on {old_logprobs.device}"
        )
    valid = as_mask("mask", mask, shape) > 0
    lo = _bound("clip_min", clip_min, allow_zero=True)
    hi = _bound("clip_max", clip_max, allow_zero=False)
    if lo is not None and hi is not None and lo >= hi:
        raise ValueError(f"clip_min ({lo}) must be less than clip_max ({hi})")
    truncate = mode.endswith("truncate")
    if truncate and lo is None and hi is None:
        raise ValueError(f"mode={mode!r} needs clip_min or clip_max (both are None)")
    finite_where("old_logprobs", old_logprobs, valid)
    finite_where("rollout_logprobs", rollout_logprobs, valid, allow_nan=True)

    dtype = torch.promote_types(old_logprobs.dtype, rollout_logprobs.dtype)
    dtype = torch.promote_types(dtype, torch.float32)
    old, rollout = old_logprobs.to(dtype), rollout_logprobs.to(dtype)
    d = torch.where(valid & ~torch.isnan(rollout), old - rollout, 0.0)
    if mode.startswith("sequence"):
        d = d.sum(-1, keepdim=True)
    w = torch.exp(d)
    if truncate:
        return w.clamp(lo, hi)
    outside = torch.zeros_like(w, dtype=torch.bool)
    if lo is not None:
        outside |= w < lo
    if hi is not None:
        outside |= w > hi
    return w.masked_fill(outside, 0.0)
