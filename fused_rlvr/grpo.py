"""GRPO-family losses (GRPO, DAPO, Dr. GRPO, GSPO, dual-clip PPO, CISPO, SAPO, STEER) on fused log-probs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch

from fused_rlvr._kernels import kernel_module
from fused_rlvr._validation import (
    as_mask,
    check_tensor,
    non_negative,
    one_of,
    per_token,
    positive_finite,
    token_weights,
    tracing,
)
from fused_rlvr.advantages import SteerConfig, steer_weights
from fused_rlvr.kernels.grpo_spec import GRPO_PARTS, IMPORTANCE, MAX_PARTS, MIN_PARTS, PART, POLICY_LOSSES
from fused_rlvr.linear_logprobs import fused_token_stats, make_params, scored_targets
from fused_rlvr.types import IGNORE_INDEX
from fused_rlvr.vocab_parallel import VocabParallel

__all__ = [
    "AGGREGATIONS",
    "GRPO_PARTS",
    "GRPOParams",
    "GRPOStats",
    "IMPORTANCE",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "grpo_token_loss_torch",
    "kl_estimate",
    "linear_grpo_loss",
    "loss_divisor",
]

KL_ESTIMATORS = ("k1", "k2", "k3", "k1+", "k2+", "k3+")
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

PGWeights = Union[torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


class GRPOStats(NamedTuple):
    """Detached metrics of one call (means over the valid tokens of this call unless said otherwise)."""

    loss: torch.Tensor
    pg_loss: torch.Tensor  # policy-gradient part of the loss (aggregated like the loss)
    kl_loss: torch.Tensor  # beta * KL part
    entropy_loss: torch.Tensor  # entropy_coef * entropy part (subtracted from the loss)
    clip_frac_low: torch.Tensor  # ppo: r' < 1 - eps_low with A < 0 (r' = min(r, ratio_cap)); else 0
    clip_frac_high: torch.Tensor  # ppo: r' > 1 + eps_high with A > 0; cispo: r > eps_high with A > 0
    clip_frac_dual: torch.Tensor  # dual-clip cap active (A < 0)
    approx_kl: torch.Tensor  # mean(old_lp - lp), verl's ppo_kl
    ref_kl: torch.Tensor  # mean KL estimate to the reference as in the loss (times r if kl_ratio_weighted)
    mean_ratio: torch.Tensor
    mean_entropy: torch.Tensor
    steer_weight_mean: torch.Tensor
    steer_weight_min: torch.Tensor
    steer_weight_max: torch.Tensor
    n_tokens: torch.Tensor
    ratio_cap_frac: torch.Tensor  # ppo with ratio_cap: r > ratio_cap
    pg_weight_mean: torch.Tensor  # mean of pg_weights (1 without)
    sapo_gate_mean: torch.Tensor  # sapo: mean soft gate 4 s (1 - s), s = sigmoid(tau (r - 1)); 0 otherwise
    ratio_min: torch.Tensor  # min / max of r over the valid tokens (1 without any)
    ratio_max: torch.Tensor
    # per sequence i: f_i = the fraction of its valid tokens clipped low (high); 0 without valid tokens
    clip_frac_low_min: torch.Tensor  # min_i f_i over sequences with valid tokens (TRL's clip_ratio/low_min)
    clip_frac_high_max: torch.Tensor  # max_i f_i over sequences with valid tokens (TRL's clip_ratio/high_max)
    clip_frac_low_seq_mean: torch.Tensor  # mean_i f_i over all B sequences (TRL's clip means, sequence level)
    clip_frac_high_seq_mean: torch.Tensor


@dataclass(frozen=True)
class GRPOParams:
    """Hyper-parameters of the per-token epilogue (see `linear_grpo_loss` for their meaning)."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: Optional[float] = None
    beta: float = 0.0
    kl: str = "k3"
    importance: str = "token"
    seq_mean: bool = False
    entropy_coef: float = 0.0
    log_ratio_clamp: Optional[float] = 20.0  # |lp - lp_old| clamp before exp (verl); None: no clamp
    policy_loss: str = "ppo"
    ratio_cap: Optional[float] = None
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    kl_clamp: Optional[float] = 10.0  # k3 clamp (verl); None: no clamp
    kl_ratio_weighted: bool = False


def kl_estimate(x: torch.Tensor, kind: str, clamp: Optional[float] = 10.0) -> torch.Tensor:
    """Per-token KL estimate of x = lp - lp_ref; k3 clamped to +-clamp (None: not clamped); a '+' suffix
    keeps the value with k2's gradient."""
    base = kind.rstrip("+")
    if base == "k1":
        val = x
    elif base == "k2":
        val = 0.5 * x * x
    else:
        val = torch.exp(-x) + x - 1
        if clamp is not None:
            val = val.clamp(-clamp, clamp)
    if kind.endswith("+"):
        k2 = 0.5 * x * x
        val = val.detach() + k2 - k2.detach()
    return val


def _valid(valid: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t where the mask is on, else 0: whatever a masked position holds (NaN, inf) never reaches the loss."""
    return torch.where(valid, t, 0.0)


def grpo_token_loss_torch(
    lp,
    ent,
    old,
    ref,
    adv,
    mask,
    steer,
    params: GRPOParams,
    inv_divisor: float | torch.Tensor,
    pg_weights=None,
):
    """(loss, per-sequence table [B, len(GRPO_PARTS)]) from per-token tensors in plain torch.

    Differentiable w.r.t. lp and ent; adv is [B] or [B, T], pg_weights [B, 1] or [B, T] (detached), the rest
    [B, T]; inv_divisor a float or a 0-dim tensor. Values at positions where mask is 0 are never read into
    the result.
    """
    valid = mask > 0
    lp = _valid(valid, lp)
    adv2 = adv if adv.dim() == 2 else adv[:, None].expand_as(lp)
    adv2 = _valid(valid, adv2)
    old_ = lp.detach() if old is None else old
    n_i = mask.sum(1)
    x_old = _valid(valid, lp - old_)
    c = params.log_ratio_clamp

    def clamp(t):
        return t if c is None else t.clamp(-c, c)

    if params.importance == "token":
        ratio = torch.exp(clamp(x_old))
    elif params.importance == "sequence":  # GSPO-token: sg[s_i] exp(lp - sg[lp])
        slr = x_old.sum(1) / n_i.clamp_min(1)
        s = clamp(slr.detach()).exp()
        ratio = s[:, None] * torch.exp(lp - lp.detach())
    else:  # sequence-mean: s_i differentiated through the mean log-ratio
        slr = x_old.sum(1) / n_i.clamp_min(1)
        ratio = clamp(slr).exp()[:, None].expand_as(lp)
    zeros = torch.zeros_like(valid)
    low = high = dual_hit = cap_hit = zeros
    gate = torch.zeros_like(lp)
    if params.policy_loss == "ppo":
        r1 = ratio if params.ratio_cap is None else ratio.clamp(max=params.ratio_cap)
        surr1 = -adv2 * r1
        surr2 = -adv2 * ratio.clamp(1 - params.eps_low, 1 + params.eps_high)
        pg = torch.maximum(surr1, surr2)
        if params.dual_clip is not None:
            cap = -adv2 * params.dual_clip
            dual_hit = (adv2 < 0) & (cap < pg)
            pg = torch.where(dual_hit, cap, pg)
        r1d = r1.detach()
        low = (r1d < 1 - params.eps_low) & (adv2 < 0)
        high = (r1d > 1 + params.eps_high) & (adv2 > 0)
        if params.ratio_cap is not None:
            cap_hit = ratio.detach() > params.ratio_cap
    elif params.policy_loss == "cispo":  # -sg[min(r, eps_high)] A lp
        coef = ratio.clamp(max=params.eps_high).detach()
        pg = -coef * adv2 * lp
        high = (ratio.detach() > params.eps_high) & (adv2 > 0)
    else:  # sapo: -A sigmoid(tau (r - 1)) 4 / tau
        tau = torch.where(adv2 > 0, params.sapo_tau_pos, params.sapo_tau_neg)
        sig = torch.sigmoid(tau * (ratio - 1))
        pg = -adv2 * (sig * 4 / tau)
        sd = sig.detach()
        gate = 4 * sd * (1 - sd)
    if steer is not None:
        pg = pg * _valid(valid, steer)
    pgw = None
    if pg_weights is not None:
        pgw = _valid(valid, pg_weights.expand_as(lp))
        pg = pg * pgw
    total = pg
    kl_val = torch.zeros_like(lp)
    if params.beta > 0:
        kl_val = kl_estimate(_valid(valid, lp - ref), params.kl, params.kl_clamp)
        if params.kl_ratio_weighted:
            kl_val = kl_val * ratio
        total = total + params.beta * kl_val
    ent_ = _valid(valid, ent) if ent is not None else torch.zeros_like(lp)
    if params.entropy_coef:
        total = total - params.entropy_coef * ent_
    if params.seq_mean:
        row_w = inv_divisor / n_i.clamp_min(1)
    else:  # inv_divisor: a float, or a 0-dim tensor (a token count under torch.compile, `_divisor`)
        row_w = torch.as_tensor(inv_divisor, dtype=n_i.dtype, device=n_i.device).expand_as(n_i)
    w = mask * row_w[:, None]
    loss = (w * total).sum()
    with torch.no_grad():
        wd, rd, mf = w.detach(), ratio.detach(), valid.float()
        inf = torch.full_like(rd, float("inf"))
        cols = {
            "loss": (wd * total.detach()).sum(1),
            "pg": (wd * pg.detach()).sum(1),
            "kl_term": (wd * params.beta * kl_val.detach()).sum(1),
            "ent_term": (wd * params.entropy_coef * ent_.detach()).sum(1),
            "tokens": mf.sum(1),
            "ratio": (mf * rd).sum(1),
            "clip_low": (valid & low).float().sum(1),
            "clip_high": (valid & high).float().sum(1),
            "clip_dual": (valid & dual_hit).float().sum(1),
            "approx_kl": -(mf * x_old.detach()).sum(1),
            "entropy": (mf * ent_.detach()).sum(1),
            "ref_kl": (mf * kl_val.detach()).sum(1),
            "ratio_cap": (valid & cap_hit).float().sum(1),
            "pg_weight": (mf if pgw is None else mf * pgw).sum(1),
            "sapo_gate": (mf * gate).sum(1),
            "ratio_min": torch.where(valid, rd, inf).amin(1),
            "ratio_max": torch.where(valid, rd, -inf).amax(1),
        }
        per_seq = torch.stack([cols[name] for name in GRPO_PARTS], 1)
    return loss, per_seq


class _GRPOTokenLossTriton(torch.autograd.Function):
    """Loss of the per-token epilogue kernel; its d(loss)/d(lp, H) come out of the same kernel."""

    @staticmethod
    def forward(
        ctx, lp, ent, old, ref, adv, mask, steer, pg_weights, params: GRPOParams, inv_divisor, interpret
    ):
        mod = kernel_module("grpo_loss", interpret)
        g_lp, g_ent, per_seq = mod.grpo_token_loss(
            lp.contiguous(),
            None if ent is None else ent.detach().contiguous(),
            old,
            ref,
            adv.contiguous(),
            mask.contiguous(),
            None if steer is None else steer.contiguous(),
            pg_weights,
            policy_loss=params.policy_loss,
            importance=params.importance,
            eps_low=params.eps_low,
            eps_high=params.eps_high,
            dual_clip=params.dual_clip,
            ratio_cap=params.ratio_cap,
            sapo_tau_pos=params.sapo_tau_pos,
            sapo_tau_neg=params.sapo_tau_neg,
            beta=params.beta,
            kl=params.kl,
            kl_clamp=params.kl_clamp,
            kl_ratio_weighted=params.kl_ratio_weighted,
            entropy_coef=params.entropy_coef,
            inv_divisor=inv_divisor,
            seq_mean=params.seq_mean,
            clamp=params.log_ratio_clamp,
            interpret=interpret,
        )
        ctx.save_for_backward(g_lp, g_ent)
        ctx.mark_non_differentiable(per_seq)
        return per_seq.sum(0)[PART["loss"]].clone(), per_seq

    @staticmethod
    def backward(ctx, grad_loss, _grad_parts):
        g_lp, g_ent = ctx.saved_tensors
        return (g_lp * grad_loss, None if g_ent is None else g_ent * grad_loss) + (None,) * 9


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


def _divisor(agg: str, mask: torch.Tensor, max_len: Optional[int], normalizer) -> float | torch.Tensor:
    """`loss_divisor` of this call: a float, or while torch.compile traces a token count's 0-dim tensor (no
    host sync inside the graph)."""
    if normalizer is not None:
        return positive_finite("normalizer", normalizer)
    b, t = mask.shape
    n_tokens = 0.0
    if _AGG[agg][1] == "tokens":
        n_tokens = mask.sum()
        if tracing():
            return n_tokens.clamp_min(1.0)
    return loss_divisor(agg, float(n_tokens), b, t if max_len is None else max_len)


def _stats(
    loss: torch.Tensor, per_seq: torch.Tensor, steer: Optional[torch.Tensor], mask: torch.Tensor
) -> GRPOStats:
    p = per_seq.detach()
    tot = p.sum(0)
    for name in MIN_PARTS:
        tot[PART[name]] = p[:, PART[name]].amin() if len(p) else float("inf")
    for name in MAX_PARTS:
        tot[PART[name]] = p[:, PART[name]].amax() if len(p) else -float("inf")

    def mean(name):
        return tot[PART[name]] / tot[PART["tokens"]].clamp_min(1.0)

    if steer is not None and bool((mask > 0).any()):
        sw = steer[mask > 0]
        s_mean, s_min, s_max = sw.mean(), sw.min(), sw.max()
    else:
        s_mean = s_min = s_max = torch.ones((), device=p.device)
    seq_tokens = p[:, PART["tokens"]]
    has = seq_tokens > 0
    any_tokens = tot[PART["tokens"]] > 0

    def seq_frac(name):
        return p[:, PART[name]] / seq_tokens.clamp_min(1.0)

    def seq_extreme(name, lowest):
        frac = seq_frac(name)
        if lowest:
            v = torch.where(has, frac, float("inf")).amin() if len(p) else tot.new_tensor(float("inf"))
        else:
            v = torch.where(has, frac, -float("inf")).amax() if len(p) else tot.new_tensor(-float("inf"))
        return torch.where(any_tokens, v, 0.0)

    def extreme(name):
        return torch.where(any_tokens, tot[PART[name]], 1.0)

    return GRPOStats(
        loss=loss.detach(),
        pg_loss=tot[PART["pg"]],
        kl_loss=tot[PART["kl_term"]],
        entropy_loss=tot[PART["ent_term"]],
        clip_frac_low=mean("clip_low"),
        clip_frac_high=mean("clip_high"),
        clip_frac_dual=mean("clip_dual"),
        approx_kl=mean("approx_kl"),
        ref_kl=mean("ref_kl"),
        mean_ratio=mean("ratio"),
        mean_entropy=mean("entropy"),
        steer_weight_mean=s_mean,
        steer_weight_min=s_min,
        steer_weight_max=s_max,
        n_tokens=tot[PART["tokens"]],
        ratio_cap_frac=mean("ratio_cap"),
        pg_weight_mean=torch.where(any_tokens, mean("pg_weight"), 1.0),
        sapo_gate_mean=mean("sapo_gate"),
        ratio_min=extreme("ratio_min"),
        ratio_max=extreme("ratio_max"),
        clip_frac_low_min=seq_extreme("clip_low", True),
        clip_frac_high_max=seq_extreme("clip_high", False),
        clip_frac_low_seq_mean=seq_frac("clip_low").mean() if len(p) else tot.new_zeros(()),
        clip_frac_high_seq_mean=seq_frac("clip_high").mean() if len(p) else tot.new_zeros(()),
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
    policy_loss: str = "ppo",
    beta: float = 0.0,
    kl: str = "k3",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: Optional[float] = None,
    ratio_cap: Optional[float] = None,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    importance: str = "token",
    agg: str = "token-mean",
    entropy_coef: float = 0.0,
    steer: Optional[SteerConfig] = None,
    pg_weights: Optional[PGWeights] = None,
    kl_ratio_weighted: bool = False,
    kl_clamp: Optional[float] = 10.0,
    log_ratio_clamp: Optional[float] = 20.0,
    temperature: float | torch.Tensor = 1.0,
    bias: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    backend: str = "auto",
    normalizer: Optional[float] = None,
    max_len: Optional[int] = None,
    old_entropy: Optional[torch.Tensor] = None,
    vocab_parallel: Optional[VocabParallel] = None,
    lora_a: Optional[torch.Tensor] = None,
    lora_b: Optional[torch.Tensor] = None,
    lora_scale: Optional[float] = None,
) -> tuple[torch.Tensor, GRPOStats]:
    """GRPO-family policy loss straight from hidden states [B, T, H] and the lm-head (no [B, T, V] tensor).

    Per valid token (m = mask, lp from `linear_logprobs`, A = advantages [B] or [B, T], sg = detach):
        x = clamp(lp - old_logprobs, +-log_ratio_clamp),  r = exp(x)   (log_ratio_clamp=None: no clamp)
    policy_loss (the policy-gradient term l_pg):
        "ppo":   l_pg = max(-A min(r, ratio_cap), -A clip(r, 1 - eps_low, 1 + eps_high));
                 dual_clip c: for A < 0, l_pg = min(l_pg, -A c)  (ratio_cap: TRL's delta, None: no cap)
        "cispo": l_pg = -sg[min(r, eps_high)] A lp   (MiniMax-M1 / TRL: eps_high is the cap on r itself)
        "sapo":  l_pg = -A sigmoid(tau (r - 1)) 4 / tau,  tau = sapo_tau_pos if A > 0 else sapo_tau_neg
    then  l = w_steer pg_weights l_pg + beta KL - entropy_coef H,  KL = k1 | k2 | k3 of x_ref = lp - ref
    (ref = ref_logprobs; k3 = exp(-x_ref) + x_ref - 1 clamped to +-kl_clamp, None: no clamp; a "+" suffix
    keeps the value with k2's gradient), times r (with r's gradient) when kl_ratio_weighted (TRL's
    use_bias_correction_kl).
    importance: "token" as above; "sequence" (GSPO-token, verl) and "sequence-mean" (GSPO, TRL's
    importance_sampling_level="sequence") use one ratio per sequence r_i = exp(clamp(mean_t m (lp - old)));
    "sequence" applies it per token as sg[r_i] exp(lp_t - sg[lp_t]) (d r / d lp_t = r_i), "sequence-mean"
    differentiates r_i through the mean (d r_i / d lp_t = r_i m_t / n_i, so each token's gradient sums the
    whole sequence's d l / d r_i). The two agree when A and the weights are constant along each sequence and
    kl_ratio_weighted is off. Without old_logprobs the ratio is 1 in value (lp.detach()).
    pg_weights: detached weights of the policy-gradient term only (not the KL, not the entropy bonus),
    [B, T], [B, 1] or [B] (floating point or boolean), finite and >= 0 where mask is 1: rollout/trainer
    mismatch correction (`fused_rlvr.rollout_correction`), entropy or off-policy masks. A callable is called
    once with the detached fp32 [B, T] log-probs and entropies of this call (0 at masked positions) and
    returns them, for masks computed from the current policy (TRL's top_entropy_quantile,
    off_policy_mask_threshold).
    `steer` (a SteerConfig) multiplies l_pg by STEER weights (old_entropy defaults to the current entropy).
    loss = sum_i c_i sum_t m l / divisor, c_i = 1 / n_i for seq-mean-token-mean / grpo, else 1; the divisor
    is the token count (token-mean, bnpo, dapo), B (seq-mean-*), max_len (seq-mean-token-sum-norm, verl) or
    B * max_len (dr_grpo), unless `normalizer` gives the whole-batch value: then summing the losses of
    micro-batches gives exactly the full batch's loss and gradient. max_len defaults to T.
    Values of any per-token input at positions where mask is 0 are never read into the loss, its gradient
    or the stats. temperature: a float or a per-token [B, T] tensor, as in `linear_logprobs`.
    vocab_parallel: `weight` (and `bias`) is this rank's vocabulary shard of a vocabulary-parallel lm-head,
    as in `linear_logprobs`; every other input is the same on all ranks, and so are the loss and stats;
    weight/bias get this shard's gradient, hidden the full one. lora_a, lora_b, lora_scale: a LoRA adapter
    on the lm-head, as in `linear_logprobs`.

    In plain torch (token level, ppo, token-mean; lp from materialised logits):
        r = torch.exp((lp - old).clamp(-20, 20)); A = advantages[:, None]
        l = torch.maximum(-A * r, -A * r.clamp(1 - eps_low, 1 + eps_high)) * pg_weights + beta * kl
        loss = (l * mask).sum() / mask.sum()

    Under torch.compile (fullgraph=True included) the log-probs come from the custom op of `linear_logprobs`,
    the token-count divisor stays a tensor, the value checks of mask and pg_weights are skipped, and with
    backend="triton" the per-token epilogue is the torch one (the compiler fuses it); steer= graph-breaks.

    Returns (loss, GRPOStats).
    """
    b_t = _check_grpo_inputs(
        hidden,
        targets,
        advantages,
        policy_loss=policy_loss,
        beta=beta,
        kl=kl,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual_clip,
        ratio_cap=ratio_cap,
        sapo_tau_pos=sapo_tau_pos,
        sapo_tau_neg=sapo_tau_neg,
        importance=importance,
        agg=agg,
        entropy_coef=entropy_coef,
        steer=steer,
        ref_logprobs=ref_logprobs,
        kl_ratio_weighted=kl_ratio_weighted,
    )
    m = as_mask("mask", mask, b_t)
    adv = per_token("advantages", advantages, b_t, allow_none=False, allow_per_sequence=True)
    old = per_token("old_logprobs", old_logprobs, b_t)
    ref = per_token("ref_logprobs", ref_logprobs, b_t)
    old_ent = per_token("old_entropy", old_entropy, b_t)
    pgw_fn = pg_weights if callable(pg_weights) and not isinstance(pg_weights, torch.Tensor) else None
    pgw = None
    if pg_weights is not None and pgw_fn is None:
        pgw = token_weights("pg_weights", pg_weights, b_t, m)
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    params = GRPOParams(
        eps_low=eps_low,
        eps_high=float(eps_high),
        dual_clip=dual_clip,
        beta=beta,
        kl=kl,
        importance=importance,
        seq_mean=_AGG[agg][0],
        entropy_coef=entropy_coef,
        log_ratio_clamp=positive_finite("log_ratio_clamp", log_ratio_clamp, allow_none=True),
        policy_loss=policy_loss,
        ratio_cap=ratio_cap,
        sapo_tau_pos=float(sapo_tau_pos),
        sapo_tau_neg=float(sapo_tau_neg),
        kl_clamp=positive_finite("kl_clamp", kl_clamp, allow_none=True),
        kl_ratio_weighted=kl_ratio_weighted,
    )
    inv_divisor = 1.0 / _divisor(agg, m, max_len, normalizer)

    # 1. fused per-token log-probs / entropy (masked tokens cost no vocabulary work)
    y = scored_targets(targets, m)
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

    # 2. weights from the current policy (no grad): STEER, pg_weights given as a function of (lp, H)
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
    if pgw_fn is not None:
        with torch.no_grad():
            out = pgw_fn(lp.detach(), ent.detach())
        pgw = token_weights("pg_weights (the value its function returned)", out, b_t, m)

    # 3. the per-token epilogue feeding the fused backward
    if lp_params.backend == "triton" and not tracing():  # compiled: the torch epilogue, which compile fuses
        loss, per_seq = _GRPOTokenLossTriton.apply(
            lp, ent, old, ref, adv, m, sw, pgw, params, inv_divisor, lp_params.interpret
        )
    else:
        loss, per_seq = grpo_token_loss_torch(lp, ent, old, ref, adv, m, sw, params, inv_divisor, pgw)
    return loss, _stats(loss, per_seq, sw, m)


def _check_grpo_inputs(
    hidden,
    targets,
    advantages,
    *,
    policy_loss,
    beta,
    kl,
    eps_low,
    eps_high,
    dual_clip,
    ratio_cap,
    sapo_tau_pos,
    sapo_tau_neg,
    importance,
    agg,
    entropy_coef,
    steer,
    ref_logprobs,
    kl_ratio_weighted,
):
    check_tensor("hidden", hidden)
    check_tensor("targets", targets)
    check_tensor("advantages", advantages)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"targets must be [B, T] = {tuple(hidden.shape[:2])}, got {tuple(targets.shape)}")
    one_of("policy_loss", policy_loss, POLICY_LOSSES)
    one_of("kl", kl, KL_ESTIMATORS)
    one_of("importance", importance, IMPORTANCE)
    one_of("agg", agg, AGGREGATIONS)
    non_negative("beta", beta)
    if policy_loss == "cispo":  # eps_high caps the ratio itself (TRL: recommended 5.0)
        positive_finite("eps_high", eps_high)
        checks = (("eps_low", eps_low),)
    else:
        checks = (("eps_low", eps_low), ("eps_high", eps_high))
    for name, eps in checks:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {eps!r}")
    for name, value in (("dual_clip", dual_clip), ("ratio_cap", ratio_cap)):
        if value is not None and policy_loss != "ppo":
            raise ValueError(
                f"{name}={value} applies to policy_loss='ppo' only (TRL clips only its PPO-style losses); "
                f"got policy_loss={policy_loss!r}"
            )
    if dual_clip is not None and positive_finite("dual_clip", dual_clip) <= 1:
        raise ValueError(f"dual_clip must be > 1 (verl's default is 3), got {dual_clip}")
    positive_finite("ratio_cap", ratio_cap, allow_none=True)
    positive_finite("sapo_tau_pos", sapo_tau_pos)
    positive_finite("sapo_tau_neg", sapo_tau_neg)
    if not isinstance(kl_ratio_weighted, bool):
        raise TypeError(f"kl_ratio_weighted must be a bool, got {type(kl_ratio_weighted).__name__}")
    if isinstance(entropy_coef, bool) or not isinstance(entropy_coef, (int, float)):
        raise TypeError(f"entropy_coef must be a number, got {type(entropy_coef).__name__}")
    if steer is not None and not isinstance(steer, SteerConfig):
        raise TypeError(f"steer must be a fused_rlvr.SteerConfig or None, got {type(steer).__name__}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"ref_logprobs is required when beta > 0 (beta={beta})")
    return tuple(targets.shape)
