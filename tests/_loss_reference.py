"""Float64 references for the losses, written from the formulas of docs/methods.md token by token (slow, obvious)."""

from __future__ import annotations

import math

import torch

from fused_rlvr.reference import reference_logprobs


def ref_token_stats(hidden, weight, targets, mask, *, temperature=1.0, bias=None, softcap=None):
    y = torch.where(mask.bool(), targets, torch.full_like(targets, -100))
    return reference_logprobs(hidden, weight, y, bias=bias, temperature=temperature, softcap=softcap)


def _kl(x, kind, clamp=10.0):
    base = kind.rstrip("+")
    if base == "k1":
        val = x
    elif base == "k2":
        val = x * x / 2
    else:
        val = torch.exp(-x) + x - 1
        if clamp is not None:
            val = torch.clamp(val, -clamp, clamp)
    if kind.endswith("+"):
        val = val.detach() + (x * x / 2 - (x * x / 2).detach())
    return val


def ref_grpo_loss(
    lp,
    ent,
    adv,
    mask,
    old,
    ref,
    *,
    beta=0.0,
    kl="k3",
    eps_low=0.2,
    eps_high=0.2,
    dual_clip=None,
    importance="token",
    agg="token-mean",
    entropy_coef=0.0,
    steer_w=None,
    normalizer=None,
    max_len=None,
    policy_loss="ppo",
    ratio_cap=None,
    sapo_tau_pos=1.0,
    sapo_tau_neg=1.05,
    pg_weights=None,
    kl_ratio_weighted=False,
    kl_clamp=10.0,
    log_ratio_clamp=20.0,
):
    """Loss from per-token lp / entropy tensors (float64, differentiable), one token at a time.

    pg_weights: [B, T] or [B, 1] (already evaluated). The sequence ratio of importance="sequence" is applied
    per token as sg[s] exp(lp - sg[lp]); that of "sequence-mean" keeps the graph through the mean.
    """
    B, T = mask.shape
    L = T if max_len is None else max_len

    def clamp(x):
        return x if log_ratio_clamp is None else torch.clamp(x, -log_ratio_clamp, log_ratio_clamp)

    per_seq_sums, per_seq_counts = [], []
    for i in range(B):
        toks = [t for t in range(T) if mask[i, t]]
        n_i = len(toks)
        seq_ratio = None
        if importance in ("sequence", "sequence-mean"):
            total_lr = torch.zeros((), dtype=lp.dtype)
            for t in toks:
                o = lp[i, t].detach() if old is None else old[i, t]
                total_lr = total_lr + (lp[i, t] - o)
            mean_lr = total_lr / max(n_i, 1)
            if importance == "sequence":
                mean_lr = mean_lr.detach()
            seq_ratio = torch.exp(clamp(mean_lr))
        total = torch.zeros((), dtype=lp.dtype)
        for t in toks:
            a = adv[i, t] if adv.dim() == 2 else adv[i]
            o = lp[i, t].detach() if old is None else old[i, t]
            if importance == "sequence":
                r = seq_ratio * torch.exp(lp[i, t] - lp[i, t].detach())
            elif importance == "sequence-mean":
                r = seq_ratio
            else:
                r = torch.exp(clamp(lp[i, t] - o))
            if policy_loss == "ppo":
                r1 = r if ratio_cap is None else torch.clamp(r, max=ratio_cap)
                s1 = -a * r1
                s2 = -a * torch.clamp(r, 1 - eps_low, 1 + eps_high)
                loss_t = s1 if s1 >= s2 else s2
                if dual_clip is not None and a < 0:
                    cap = -a * dual_clip
                    if cap < loss_t:
                        loss_t = cap * torch.ones((), dtype=lp.dtype)
            elif policy_loss == "cispo":
                loss_t = -torch.clamp(r, max=eps_high).detach() * a * lp[i, t]
            else:
                tau = sapo_tau_pos if a > 0 else sapo_tau_neg
                loss_t = -a * torch.sigmoid(tau * (r - 1)) * 4 / tau
            if steer_w is not None:
                loss_t = loss_t * steer_w[i, t]
            if pg_weights is not None:
                loss_t = loss_t * pg_weights[i, t if pg_weights.shape[1] > 1 else 0]
            if beta > 0:
                k = _kl(lp[i, t] - ref[i, t], kl, kl_clamp)
                loss_t = loss_t + beta * (k * r if kl_ratio_weighted else k)
            if entropy_coef:
                loss_t = loss_t - entropy_coef * ent[i, t]
            total = total + loss_t
        per_seq_sums.append(total)
        per_seq_counts.append(n_i)
    all_tokens = sum(per_seq_counts)
    if agg in ("token-mean", "bnpo", "dapo"):
        return sum(per_seq_sums) / (normalizer or max(all_tokens, 1))
    if agg in ("seq-mean-token-mean", "grpo"):
        return sum(s / max(c, 1) for s, c in zip(per_seq_sums, per_seq_counts)) / (normalizer or B)
    if agg == "seq-mean-token-sum":
        return sum(per_seq_sums) / (normalizer or B)
    if agg == "seq-mean-token-sum-norm":
        return sum(per_seq_sums) / (normalizer or L)
    if agg == "dr_grpo":
        return sum(per_seq_sums) / (normalizer or B * L)
    raise ValueError(agg)


def ref_rollout_correction(old, rollout, mask, mode, clip_min, clip_max):
    """TRL's vLLM importance-sampling weights, one token at a time in python floats ([B, T] or [B, 1])."""
    B, T = mask.shape
    diffs = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            if mask[i, t] and not math.isnan(float(rollout[i, t])):
                diffs[i][t] = float(old[i, t]) - float(rollout[i, t])
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max

    def one(d):
        w = math.exp(d)
        if mode.endswith("truncate"):
            return min(max(w, lo), hi)
        return w if lo <= w <= hi else 0.0

    if mode.startswith("sequence"):
        return torch.tensor([[one(math.fsum(diffs[i]))] for i in range(B)], dtype=torch.float64)
    return torch.tensor([[one(diffs[i][t]) for t in range(T)] for i in range(B)], dtype=torch.float64)


def ref_steer_exp(lp, old, old_ent, adv, mask, lambda_min=0.8):
    """The authors' exponential mapping, one token at a time, in python floats."""
    B, T = mask.shape
    omegas = {}
    for i in range(B):
        for t in range(T):
            if not mask[i, t]:
                continue
            a = float(adv[i, t] if adv.dim() == 2 else adv[i])
            p = min(max(math.exp(float(lp[i, t])), 1e-8), 1 - 1e-8)
            pi_old = min(max(math.exp(float(old[i, t])), 1e-8), 1.0)
            om = a / pi_old * p * (1 - p) * (math.log(p) + float(old_ent[i, t]))
            omegas[i, t] = abs(om) if math.isfinite(om) else 0.0
    k = -math.log(lambda_min) / max(max(omegas.values()), 0.02)
    out = torch.zeros(B, T)
    for key, om in omegas.items():
        out[key] = min(max(math.exp(-k * om), lambda_min), 1.0)
    return out


def ref_pacs_loss(lp, old, rewards, mask, groups, *, beta=1.0, baseline="rloo", class_balance=True):
    B = mask.shape[0]
    scores = [
        beta
        * sum(
            (lp[i, t] - old[i, t] for t in range(mask.shape[1]) if mask[i, t]),
            torch.zeros((), dtype=lp.dtype),
        )
        for i in range(B)
    ]
    members = {}
    for i in range(B):
        members.setdefault(int(groups[i]), []).append(i)
    total = torch.zeros((), dtype=lp.dtype)
    for i in range(B):
        grp = members[int(groups[i])]
        others = [j for j in grp if j != i]
        if baseline == "rloo":
            psi = scores[i] - sum(scores[j] for j in others) / len(others)
        elif baseline == "grpo":
            mean = sum(scores[j] for j in grp) / len(grp)
            std = torch.sqrt(sum((scores[j] - mean) ** 2 for j in grp) / max(len(grp) - 1, 1))
            psi = (scores[i] - mean) / (std + 1e-6)
        else:
            psi = scores[i]
        r = float(rewards[i])
        w = 1.0
        if class_balance:
            k = sum(1 for j in grp if rewards[j] > 0.5)
            g = len(grp)
            if 0 < k < g:
                w = g / (2 * k) if r > 0.5 else g / (2 * (g - k))
        sig = torch.sigmoid(psi)
        total = total + w * (-r * torch.log(sig) - (1 - r) * torch.log(1 - sig))
    return total / B
