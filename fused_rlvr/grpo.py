"""GRPO-family losses (GRPO, DAPO, Dr. GRPO, GSPO, dual-clip PPO, STEER) on the fused log-probs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from fused_rlvr._kernels import kernel_module
from fused_rlvr._validation import (
    as_mask,
    check_tensor,
    non_negative,
    one_of,
    per_token,
    positive_finite,
)
from fused_rlvr.advantages import SteerConfig, steer_weights
from fused_rlvr.linear_logprobs import fused_token_stats, make_params
from fused_rlvr.types import IGNORE_INDEX
from fused_rlvr.vocab_parallel import VocabParallel

KL_ESTIMATORS = ("k1", "k2", "k3", "k1+", "k2+", "k3+")
IMPORTANCE = ("token", "sequence")
AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "grpo",
    "bnpo",
    "dr_grpo",
    "dapo",
)
# TRL's names -> (seq-mean weighting 1/n_i, default divisor)
_AGG = {
    "token-mean": (False, "tokens"),
    "bnpo": (False, "tokens"),
    "dapo": (False, "tokens"),
    "seq-mean-token-mean": (True, "seqs"),
    "grpo": (True, "seqs"),
    "seq-mean-token-sum": (False, "seqs"),
    "seq-mean-token-sum-norm": (False, "max_len"),
    "dr_grpo": (False, "seqs*max_len"),
}


class GRPOStats(NamedTuple):
    """Detached metrics of one call (means over the valid tokens of this call)."""

    loss: torch.Tensor
    pg_loss: torch.Tensor  # policy-gradient part of the loss (aggregated like the loss)
    kl_loss: torch.Tensor  # beta * KL part
    entropy_loss: torch.Tensor  # entropy_coef * entropy part (subtracted from the loss)
    clip_frac_low: torch.Tensor  # r < 1 - eps_low with A < 0
    clip_frac_high: torch.Tensor  # r > 1 + eps_high with A > 0
    clip_frac_dual: torch.Tensor  # dual-clip cap active (A < 0)
    approx_kl: torch.Tensor  # mean(old_lp - lp), verl's ppo_kl
    ref_kl: torch.Tensor  # mean KL estimate to the reference (0 without beta)
    mean_ratio: torch.Tensor
    mean_entropy: torch.Tensor
    steer_weight_mean: torch.Tensor
    steer_weight_min: torch.Tensor
    steer_weight_max: torch.Tensor
    n_tokens: torch.Tensor


@dataclass(frozen=True)
class GRPOParams:
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: Optional[float] = None
    beta: float = 0.0
    kl: str = "k3"
    importance: str = "token"
    seq_mean: bool = False
    entropy_coef: float = 0.0
    clamp: float = 20.0  # |log-ratio| clamp (verl)


def kl_estimate(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL estimate of x = lp - lp_ref; a '+' suffix keeps the value with k2's gradient."""
    base = kind.rstrip("+")
    if base == "k1":
        val = x
    elif base == "k2":
        val = 0.5 * x * x
    else:
        val = (torch.exp(-x) + x - 1).clamp(-10.0, 10.0)
    if kind.endswith("+"):
        k2 = 0.5 * x * x
        val = val.detach() + k2 - k2.detach()
    return val


def grpo_token_loss_torch(lp, ent, old, ref, adv, mask, steer, params: GRPOParams, inv_divisor: float):
    """(loss, parts [len(PARTS)]) from per-token tensors in plain torch; differentiable w.r.t. lp and ent."""
    adv2 = adv if adv.dim() == 2 else adv[:, None].expand_as(lp)
    valid = mask > 0
    old_ = lp.detach() if old is None else old
    n_i = mask.sum(1)
    x_old = torch.where(valid, lp - old_, 0.0)
    if params.importance == "sequence":
        slr = x_old.sum(1) / n_i.clamp_min(1)
        s = slr.detach().clamp(-params.clamp, params.clamp).exp()
        ratio = s[:, None] * torch.exp(lp - lp.detach())
    else:
        ratio = torch.exp(x_old.clamp(-params.clamp, params.clamp))
    surr1 = -adv2 * ratio
    surr2 = -adv2 * ratio.clamp(1 - params.eps_low, 1 + params.eps_high)
    pg = torch.maximum(surr1, surr2)
    dual_hit = torch.zeros_like(valid)
    if params.dual_clip is not None:
        cap = -adv2 * params.dual_clip
        dual_hit = (adv2 < 0) & (cap < pg)
        pg = torch.where(dual_hit, cap, pg)
    if steer is not None:
        pg = pg * steer
    total = pg
    kl_val = torch.zeros_like(lp)
    if params.beta > 0:
        kl_val = kl_estimate(torch.where(valid, lp - ref, 0.0), params.kl)
        total = total + params.beta * kl_val
    ent_ = ent if ent is not None else torch.zeros_like(lp)
    if params.entropy_coef:
        total = total - params.entropy_coef * ent_
    row_w = inv_divisor / n_i.clamp_min(1) if params.seq_mean else torch.full_like(n_i, inv_divisor)
    w = mask * row_w[:, None]
    loss = (w * total).sum()
    ratio_d = ratio.detach()
    mf = valid.float()
    parts = torch.stack(
        [
            loss.detach(),
            (w * pg).sum().detach(),
            (w * params.beta * kl_val).sum().detach(),
            (w * params.entropy_coef * ent_).sum().detach(),
            mf.sum(),
            (mf * ratio_d).sum(),
            (valid & (ratio_d < 1 - params.eps_low) & (adv2 < 0)).float().sum(),
            (valid & (ratio_d > 1 + params.eps_high) & (adv2 > 0)).float().sum(),
            (valid & dual_hit).float().sum(),
            -(mf * x_old.detach()).sum(),
            (mf * ent_.detach()).sum(),
            (mf * kl_val.detach()).sum(),
        ]
    )
    return loss, parts


class _GRPOTokenLossTriton(torch.autograd.Function):
    """Loss of the per-token epilogue kernel; its d(loss)/d(lp, H) come out of the same kernel."""

    @staticmethod
    def forward(ctx, lp, ent, old, ref, adv, mask, steer, params: GRPOParams, inv_divisor: float, interpret):
        mod = kernel_module("grpo_loss", interpret)
        g_lp, g_ent, parts = mod.grpo_token_loss(
            lp.contiguous(),
            None if ent is None else ent.detach().contiguous(),
            old,
            ref,
            adv.contiguous(),
            mask.contiguous(),
            steer,
            eps_low=params.eps_low,
            eps_high=params.eps_high,
            dual_clip=params.dual_clip,
            beta=params.beta,
            kl=params.kl,
            entropy_coef=params.entropy_coef,
            inv_divisor=inv_divisor,
            seq_ratio=params.importance == "sequence",
            seq_mean=params.seq_mean,
            clamp=params.clamp,
            interpret=interpret,
        )
        sums = parts.sum(0)
        ctx.save_for_backward(g_lp, g_ent)
        ctx.mark_non_differentiable(sums)
        return sums[0].clone(), sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_parts):
        g_lp, g_ent = ctx.saved_tensors
        return (
            g_lp * grad_loss,
            None if g_ent is None else g_ent * grad_loss,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def loss_divisor(agg: str, n_tokens: float, n_seqs: float, max_len: float) -> float:
    """The divisor `agg` applies to a batch of n_seqs sequences holding n_tokens valid tokens: the token count
    (token-mean, bnpo, dapo), the sequence count (seq-mean-*, grpo), max_len (seq-mean-token-sum-norm) or
    n_seqs * max_len (dr_grpo). Pass a whole batch's value as `normalizer=` to its micro-batches."""
    kind = _AGG[agg][1]
    if kind == "tokens":
        return max(float(n_tokens), 1.0)
    if kind == "seqs":
        return float(n_seqs)
    if kind == "max_len":
        return float(max_len)
    return float(n_seqs * max_len)


def _divisor(agg: str, mask: torch.Tensor, max_len: Optional[int], normalizer) -> float:
    if normalizer is not None:
        return positive_finite("normalizer", normalizer)
    b, t = mask.shape
    return loss_divisor(agg, float(mask.sum()), b, t if max_len is None else max_len)


def _stats(parts: torch.Tensor, steer: Optional[torch.Tensor], mask: torch.Tensor) -> GRPOStats:
    p = parts.detach()
    tokens = p[4].clamp_min(1.0)
    if steer is not None and bool((mask > 0).any()):
        sw = steer[mask > 0]
        s_mean, s_min, s_max = sw.mean(), sw.min(), sw.max()
    else:
        s_mean = s_min = s_max = torch.ones((), device=p.device)
    return GRPOStats(
        p[0],
        p[1],
        p[2],
        p[3],
        p[6] / tokens,
        p[7] / tokens,
        p[8] / tokens,
        p[9] / tokens,
        p[11] / tokens,
        p[5] / tokens,
        p[10] / tokens,
        s_mean,
        s_min,
        s_max,
        p[4],
    )


def linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    kl: str = "k3",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: Optional[float] = None,
    importance: str = "token",
    agg: str = "token-mean",
    entropy_coef: float = 0.0,
    steer: Optional[SteerConfig] = None,
    temperature: float | torch.Tensor = 1.0,
    bias: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    backend: str = "auto",
    normalizer: Optional[float] = None,
    max_len: Optional[int] = None,
    old_entropy: Optional[torch.Tensor] = None,
    logratio_clamp: float = 20.0,
    vocab_parallel: Optional[VocabParallel] = None,
    lora_a: Optional[torch.Tensor] = None,
    lora_b: Optional[torch.Tensor] = None,
    lora_scale: Optional[float] = None,
) -> tuple[torch.Tensor, GRPOStats]:
    """Clipped-surrogate GRPO-family loss straight from hidden states [B, T, H] and the lm-head.

    Per token (m = mask, lp from `linear_logprobs`, r = exp(clamp(lp - old_logprobs, +-logratio_clamp))):
        l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high));  for A < 0 with dual_clip c: l = min(l, -A c)
        l = steer_weight * l + beta * KL(lp - ref_logprobs) - entropy_coef * H
    importance="sequence" (GSPO) uses r_i = exp(mean_t m (lp - old)) per sequence with d r / d lp_t = r_i.
    loss = sum_i c_i sum_t m l / divisor, c_i = 1 / n_i for seq-mean-token-mean / grpo, else 1; the divisor
    is the token count (token-mean, bnpo, dapo), B (seq-mean-*), max_len (seq-mean-token-sum-norm, verl) or
    B * max_len (dr_grpo), unless `normalizer` gives the whole-batch value: then summing the losses of
    micro-batches gives exactly the full batch's loss and gradient. max_len defaults to T.
    Without old_logprobs the ratio is 1 in value (lp.detach()). KL "k1", "k2", "k3" (clamped to [-10, 10]);
    a "+" suffix keeps the value and uses k2's gradient. `steer` (a SteerConfig) reweights the policy
    loss per token (old_entropy defaults to the current entropy, detached). No [B, T, V] tensor exists.
    vocab_parallel: `weight` (and `bias`) is this rank's vocabulary shard
    of a vocabulary-parallel lm-head, as in `linear_logprobs`; every other input is the same on all ranks,
    and so are the loss and stats; weight/bias get this shard's gradient, hidden the full one.
    lora_a, lora_b, lora_scale: a LoRA adapter on the lm-head, as in `linear_logprobs`.

    Returns (loss, GRPOStats).
    """
    b_t = _check_grpo_inputs(
        hidden,
        targets,
        advantages,
        beta,
        kl,
        eps_low,
        eps_high,
        dual_clip,
        importance,
        agg,
        entropy_coef,
        steer,
        ref_logprobs,
    )
    m = as_mask("mask", mask, b_t)
    adv = per_token("advantages", advantages, b_t, allow_none=False, allow_per_sequence=True)
    old = per_token("old_logprobs", old_logprobs, b_t)
    ref = per_token("ref_logprobs", ref_logprobs, b_t)
    old_ent = per_token("old_entropy", old_entropy, b_t)
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    params = GRPOParams(
        eps_low,
        eps_high,
        dual_clip,
        beta,
        kl,
        importance,
        _AGG[agg][0],
        entropy_coef,
        positive_finite("logratio_clamp", logratio_clamp),
    )
    inv_divisor = 1.0 / _divisor(agg, m, max_len, normalizer)

    # 1. fused per-token log-probs / entropy (masked tokens cost no vocabulary work)
    y = torch.where(m > 0, targets, torch.full_like(targets, IGNORE_INDEX))
    moments = steer is not None and steer.mode == "exact"
    lp_params = make_params(
        hidden,
        weight,
        y,
        bias,
        temperature,
        softcap,
        IGNORE_INDEX,
        backend,
        moments,
        vocab_parallel=vocab_parallel,
        lora_a=lora_a,
        lora_b=lora_b,
        lora_scale=lora_scale,
    )
    lp, ent, p2, p2logp = fused_token_stats(hidden, weight, bias, y, lp_params)

    # 2. STEER weights (no grad) and 3. the per-token epilogue feeding the fused backward
    sw = None
    if steer is not None:
        sw = steer_weights(
            lp.detach(),
            old if old is not None else lp.detach(),
            old_ent if old_ent is not None else ent.detach(),
            adv,
            m,
            mode=steer.mode,
            lambda_min=steer.lambda_min,
            lambda_max=steer.lambda_max,
            sum_p2=p2,
            sum_p2_logp=p2logp,
            entropy=ent.detach(),
        )
    if lp_params.backend == "triton":
        loss, parts = _GRPOTokenLossTriton.apply(
            lp, ent, old, ref, adv, m, sw, params, inv_divisor, lp_params.interpret
        )
    else:
        loss, parts = grpo_token_loss_torch(lp, ent, old, ref, adv, m, sw, params, inv_divisor)
    return loss, _stats(parts, sw, m)


def _check_grpo_inputs(
    hidden,
    targets,
    advantages,
    beta,
    kl,
    eps_low,
    eps_high,
    dual_clip,
    importance,
    agg,
    entropy_coef,
    steer,
    ref_logprobs,
):
    check_tensor("hidden", hidden)
    check_tensor("targets", targets)
    check_tensor("advantages", advantages)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"targets must be [B, T] = {tuple(hidden.shape[:2])}, got {tuple(targets.shape)}")
    one_of("kl", kl, KL_ESTIMATORS)
    one_of("importance", importance, IMPORTANCE)
    one_of("agg", agg, AGGREGATIONS)
    non_negative("beta", beta)
    for name, eps in (("eps_low", eps_low), ("eps_high", eps_high)):
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {eps!r}")
    if dual_clip is not None and positive_finite("dual_clip", dual_clip) <= 1:
        raise ValueError(f"dual_clip must be > 1 (verl's default is 3), got {dual_clip}")
    if isinstance(entropy_coef, bool) or not isinstance(entropy_coef, (int, float)):
        raise TypeError(f"entropy_coef must be a number, got {type(entropy_coef).__name__}")
    if steer is not None and not isinstance(steer, SteerConfig):
        raise TypeError(f"steer must be a fused_rlvr.SteerConfig or None, got {type(steer).__name__}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"ref_logprobs is required when beta > 0 (beta={beta})")
    return tuple(targets.shape)
