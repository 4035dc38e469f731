"""GRPO-family per-token loss epilogue: one program per sequence, loss value and d(loss)/d(lp, H) at once.

Inputs are the [B, T] per-token log-probs (and entropies) of the fused op plus old / reference log-probs,
advantages ([B] or [B, T]), a 0/1 mask, optional STEER weights and optional policy-gradient weights
([B, T] or [B, 1]). Every per-token input is read through `where(mask, value, 0)`: values at masked
positions (NaN, inf, anything) never reach the loss, its gradient or the metrics. Per sequence i:
  pass 1 (sequence ratio or seq-mean aggregation): n_i = sum_t m_t, slr_i = sum_t m_t (lp_t - old_t)
  pass 2, per token:  r = exp(clamp(lp - old, +-C))  (sequence: r = exp(clamp(slr_i / n_i, +-C)))
     ppo:   pg = max(-A min(r, cap), -A clip(r, 1 - eps_low, 1 + eps_high)), dual clip for A < 0: min(pg, -A c)
     cispo: pg = -sg[min(r, eps_high)] A lp
     sapo:  pg = -A sigmoid(tau (r - 1)) 4 / tau, tau = tau_pos if A > 0 else tau_neg
     total = w_steer w_pg pg + beta KL(lp - ref) [* r with KL_RATIO] - coef H
     loss += c_i m_t total / divisor   with c_i = 1 / n_i for seq-mean-token-mean, else 1
     g_lp  = c_i m_t d total / d lp / divisor,  g_H = -c_i m_t coef / divisor
  r's own gradient: token level d r / d lp_t = r (0 where the clamp binds); "sequence" (GSPO-token)
  d r / d lp_t = r_i; "sequence-mean" differentiates r_i = exp(slr_i / n_i) through the mean, so every token
  of the sequence also gets (m_t / n_i) r_i sum_t' c_i m_t' d total_t' / d r_i / divisor: pass 2 sums it
  and pass 3 adds it to the stored g_lp.
and the per-sequence table of kernels/grpo_spec.py's GRPO_PARTS (loss parts, clip fractions, ratio, KL...).
Flops and bytes: O(B T), a few reads and two writes per token; this replaces ~30 small torch kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_rlvr.kernels.grpo_spec import GRPO_PARTS, IMPORTANCE, POLICY_LOSSES

KL_KINDS = {"k1": 1, "k2": 2, "k3": 3}

# column offsets of the per-sequence table (one writer: kernels/grpo_spec.py's GRPO_PARTS)
P_LOSS = tl.constexpr(GRPO_PARTS.index("loss"))
P_PG = tl.constexpr(GRPO_PARTS.index("pg"))
P_KL_TERM = tl.constexpr(GRPO_PARTS.index("kl_term"))
P_ENT_TERM = tl.constexpr(GRPO_PARTS.index("ent_term"))
P_TOKENS = tl.constexpr(GRPO_PARTS.index("tokens"))
P_RATIO = tl.constexpr(GRPO_PARTS.index("ratio"))
P_CLIP_LOW = tl.constexpr(GRPO_PARTS.index("clip_low"))
P_CLIP_HIGH = tl.constexpr(GRPO_PARTS.index("clip_high"))
P_CLIP_DUAL = tl.constexpr(GRPO_PARTS.index("clip_dual"))
P_APPROX_KL = tl.constexpr(GRPO_PARTS.index("approx_kl"))
P_ENTROPY = tl.constexpr(GRPO_PARTS.index("entropy"))
P_REF_KL = tl.constexpr(GRPO_PARTS.index("ref_kl"))
P_RATIO_CAP = tl.constexpr(GRPO_PARTS.index("ratio_cap"))
P_PG_WEIGHT = tl.constexpr(GRPO_PARTS.index("pg_weight"))
P_SAPO_GATE = tl.constexpr(GRPO_PARTS.index("sapo_gate"))
P_RATIO_MIN = tl.constexpr(GRPO_PARTS.index("ratio_min"))
P_RATIO_MAX = tl.constexpr(GRPO_PARTS.index("ratio_max"))


@triton.jit
def _grpo_token_kernel(
    lp_ptr,
    ent_ptr,
    old_ptr,
    ref_ptr,
    adv_ptr,
    mask_ptr,
    steer_ptr,
    pgw_ptr,
    glp_ptr,
    gent_ptr,
    part_ptr,
    T,
    stride_adv_b,
    stride_adv_t,
    stride_pgw_b,
    stride_pgw_t,
    eps_low,
    eps_high,
    dual_c,
    ratio_cap,
    tau_pos,
    tau_neg,
    beta,
    ent_coef,
    inv_divisor,
    clamp_c,
    kl_clamp,
    POLICY: tl.constexpr,  # index in POLICY_LOSSES: 0 ppo, 1 cispo, 2 sapo
    IMPORTANCE_LEVEL: tl.constexpr,  # index in IMPORTANCE: 0 token, 1 sequence, 2 sequence-mean
    HAS_OLD: tl.constexpr,
    HAS_ENT: tl.constexpr,
    ENT_GRAD: tl.constexpr,
    HAS_STEER: tl.constexpr,
    HAS_PGW: tl.constexpr,
    SEQ_MEAN: tl.constexpr,
    DUAL: tl.constexpr,
    CAP: tl.constexpr,
    KL_KIND: tl.constexpr,
    KL_PLUS: tl.constexpr,
    KL_CLAMP: tl.constexpr,
    KL_RATIO: tl.constexpr,
    LR_CLAMP: tl.constexpr,
    NUM_PARTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    n_vec = tl.zeros((BLOCK_T,), dtype=tl.float32)
    slr_vec = tl.zeros((BLOCK_T,), dtype=tl.float32)
    if IMPORTANCE_LEVEL > 0 or SEQ_MEAN:
        for t0 in range(0, T, BLOCK_T):
            offs = t0 + tl.arange(0, BLOCK_T)
            inb = offs < T
            m = tl.load(mask_ptr + base + offs, mask=inb, other=0.0)
            n_vec += m
            if IMPORTANCE_LEVEL > 0 and HAS_OLD:
                lp = tl.load(lp_ptr + base + offs, mask=inb, other=0.0)
                old = tl.load(old_ptr + base + offs, mask=inb, other=0.0)
                slr_vec += tl.where(m > 0, lp - old, 0.0)
    n_tok = tl.sum(n_vec, axis=0)
    slr = tl.sum(slr_vec, axis=0) / tl.maximum(n_tok, 1.0)
    slr_c = slr
    if LR_CLAMP:
        slr_c = tl.minimum(tl.maximum(slr, -clamp_c), clamp_c)
    seq_ratio = tl.exp(slr_c)
    row_w = inv_divisor
    if SEQ_MEAN:
        row_w = inv_divisor / tl.maximum(n_tok, 1.0)

    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    s_loss = acc
    s_pg = acc
    s_kl = acc
    s_ent = acc
    s_tok = acc
    s_ratio = acc
    s_low = acc
    s_high = acc
    s_dual = acc
    s_akl = acc
    s_h = acc
    s_rkl = acc
    s_cap = acc
    s_pgw = acc
    s_gate = acc
    s_shared = acc  # sequence-mean: sum_t w_t d total_t / d r_i * r_i
    s_rmin = acc + float("inf")
    s_rmax = acc - float("inf")
    for t0 in range(0, T, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        inb = offs < T
        m = tl.load(mask_ptr + base + offs, mask=inb, other=0.0)
        valid = m > 0
        lp = tl.where(valid, tl.load(lp_ptr + base + offs, mask=inb, other=0.0), 0.0)
        adv = tl.load(adv_ptr + row * stride_adv_b + offs * stride_adv_t, mask=inb, other=0.0)
        adv = tl.where(valid, adv, 0.0)
        w = tl.where(valid, m * row_w, 0.0)
        if HAS_OLD:
            old = tl.load(old_ptr + base + offs, mask=inb, other=0.0)
            x_old = tl.where(valid, lp - old, 0.0)
        else:
            x_old = tl.zeros((BLOCK_T,), dtype=tl.float32)
        if IMPORTANCE_LEVEL == 0:
            if LR_CLAMP:
                clamped = tl.minimum(tl.maximum(x_old, -clamp_c), clamp_c)
                ratio = tl.exp(clamped)
                dratio = tl.where(clamped == x_old, ratio, 0.0)
            else:
                ratio = tl.exp(x_old)
                dratio = ratio
        elif IMPORTANCE_LEVEL == 1:
            ratio = tl.zeros((BLOCK_T,), dtype=tl.float32) + seq_ratio
            dratio = ratio  # GSPO-token: sg[s] exp(lp - sg[lp]) has d/dlp = s
        else:
            ratio = tl.zeros((BLOCK_T,), dtype=tl.float32) + seq_ratio
            dratio = tl.zeros((BLOCK_T,), dtype=tl.float32)  # through the mean: pass 3
        # policy-gradient term pg, its derivative w.r.t. r (dpg) and w.r.t. lp directly (dpg_lp)
        dpg_lp = tl.zeros((BLOCK_T,), dtype=tl.float32)
        low_hit = tl.zeros((BLOCK_T,), dtype=tl.int1)
        high_hit = tl.zeros((BLOCK_T,), dtype=tl.int1)
        dual_hit = tl.zeros((BLOCK_T,), dtype=tl.int1)
        cap_hit = tl.zeros((BLOCK_T,), dtype=tl.int1)
        gate = tl.zeros((BLOCK_T,), dtype=tl.float32)
        if POLICY == 0:
            r1 = ratio
            dr1 = tl.zeros((BLOCK_T,), dtype=tl.float32) + 1.0
            if CAP:
                r1 = tl.minimum(ratio, ratio_cap)
                dr1 = tl.where(ratio <= ratio_cap, 1.0, 0.0)
                cap_hit = ratio > ratio_cap
            surr1 = -adv * r1
            surr2 = -adv * tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
            unclipped = surr1 >= surr2
            pg = tl.where(unclipped, surr1, surr2)
            if CAP:  # surr2 wins with r inside the clip range when the cap binds (A < 0)
                inside = (ratio >= 1.0 - eps_low) & (ratio <= 1.0 + eps_high)
                dpg = tl.where(unclipped, -adv * dr1, tl.where(inside, -adv, 0.0))
            else:  # surr2 wins only with r outside the clip range: no gradient
                dpg = tl.where(unclipped, -adv * dr1, 0.0)
            if DUAL:
                cap = -adv * dual_c
                dual_hit = (adv < 0) & (cap < pg)
                pg = tl.where(dual_hit, cap, pg)
                dpg = tl.where(dual_hit, 0.0, dpg)
            low_hit = (r1 < 1.0 - eps_low) & (adv < 0)
            high_hit = (r1 > 1.0 + eps_high) & (adv > 0)
        elif POLICY == 1:
            coef = tl.minimum(ratio, eps_high)
            pg = -coef * adv * lp
            dpg = tl.zeros((BLOCK_T,), dtype=tl.float32)
            dpg_lp = -coef * adv
            high_hit = (ratio > eps_high) & (adv > 0)
        else:
            tau = tl.where(adv > 0, tau_pos, tau_neg)
            sig = tl.sigmoid(tau * (ratio - 1.0))
            pg = -adv * sig * 4.0 / tau
            gate = 4.0 * sig * (1.0 - sig)
            dpg = -adv * gate
        pgw = tl.zeros((BLOCK_T,), dtype=tl.float32) + 1.0
        if HAS_PGW:
            pw = tl.load(pgw_ptr + row * stride_pgw_b + offs * stride_pgw_t, mask=inb, other=0.0)
            pgw = tl.where(valid, pw, 0.0)
        scale = pgw
        if HAS_STEER:
            sw = tl.load(steer_ptr + base + offs, mask=inb, other=0.0)
            scale = scale * tl.where(valid, sw, 0.0)
        grad = dpg * dratio + dpg_lp
        shared = dpg * ratio
        if HAS_STEER or HAS_PGW:
            pg = pg * scale
            grad = grad * scale
            shared = shared * scale
        total = pg
        kl_val = tl.zeros((BLOCK_T,), dtype=tl.float32)
        if KL_KIND > 0:
            ref = tl.load(ref_ptr + base + offs, mask=inb, other=0.0)
            x = tl.where(valid, lp - ref, 0.0)
            if KL_KIND == 1:
                kl_val = x
                dkl = tl.zeros((BLOCK_T,), dtype=tl.float32) + 1.0
            elif KL_KIND == 2:
                kl_val = 0.5 * x * x
                dkl = x
            else:
                e = tl.exp(-x)
                raw = e + x - 1.0
                dkl = 1.0 - e
                kl_val = raw
                if KL_CLAMP:
                    kl_val = tl.minimum(tl.maximum(raw, -kl_clamp), kl_clamp)
                    dkl = tl.where(raw == kl_val, dkl, 0.0)
            if KL_PLUS:
                dkl = x
            if KL_RATIO:
                dkl = dkl * ratio + kl_val * dratio
                shared += beta * kl_val * ratio
                kl_val = kl_val * ratio
            total += beta * kl_val
            grad += beta * dkl
        ent = tl.zeros((BLOCK_T,), dtype=tl.float32)
        if HAS_ENT:
            ent = tl.where(valid, tl.load(ent_ptr + base + offs, mask=inb, other=0.0), 0.0)
            total -= ent_coef * ent
        if ENT_GRAD:
            tl.store(gent_ptr + base + offs, -ent_coef * w, mask=inb)
        tl.store(glp_ptr + base + offs, w * grad, mask=inb)
        mf = tl.where(valid, 1.0, 0.0)
        s_loss += w * total
        s_pg += w * pg
        s_kl += w * beta * kl_val
        s_ent += w * ent_coef * ent
        s_tok += mf
        s_ratio += mf * ratio
        s_low += tl.where(valid & low_hit, 1.0, 0.0)
        s_high += tl.where(valid & high_hit, 1.0, 0.0)
        s_dual += tl.where(valid & dual_hit, 1.0, 0.0)
        s_akl += mf * -x_old
        s_h += mf * ent
        s_rkl += mf * kl_val
        s_cap += tl.where(valid & cap_hit, 1.0, 0.0)
        s_pgw += mf * pgw
        s_gate += mf * gate
        s_shared += w * shared
        s_rmin = tl.minimum(s_rmin, tl.where(valid, ratio, float("inf")))
        s_rmax = tl.maximum(s_rmax, tl.where(valid, ratio, -float("inf")))
    if IMPORTANCE_LEVEL == 2:
        # d r_i / d lp_t = r_i m_t / n_i (0 where the log-ratio clamp binds): add the shared term
        g_seq = tl.sum(s_shared, axis=0) / tl.maximum(n_tok, 1.0)
        if LR_CLAMP:
            g_seq = tl.where(slr_c == slr, g_seq, 0.0)
        tl.debug_barrier()
        for t0 in range(0, T, BLOCK_T):
            offs = t0 + tl.arange(0, BLOCK_T)
            inb = offs < T
            m = tl.load(mask_ptr + base + offs, mask=inb, other=0.0)
            g = tl.load(glp_ptr + base + offs, mask=inb, other=0.0)
            tl.store(glp_ptr + base + offs, g + tl.where(m > 0, g_seq, 0.0), mask=inb)
    out = part_ptr + row * NUM_PARTS
    tl.store(out + P_LOSS, tl.sum(s_loss, axis=0))
    tl.store(out + P_PG, tl.sum(s_pg, axis=0))
    tl.store(out + P_KL_TERM, tl.sum(s_kl, axis=0))
    tl.store(out + P_ENT_TERM, tl.sum(s_ent, axis=0))
    tl.store(out + P_TOKENS, tl.sum(s_tok, axis=0))
    tl.store(out + P_RATIO, tl.sum(s_ratio, axis=0))
    tl.store(out + P_CLIP_LOW, tl.sum(s_low, axis=0))
    tl.store(out + P_CLIP_HIGH, tl.sum(s_high, axis=0))
    tl.store(out + P_CLIP_DUAL, tl.sum(s_dual, axis=0))
    tl.store(out + P_APPROX_KL, tl.sum(s_akl, axis=0))
    tl.store(out + P_ENTROPY, tl.sum(s_h, axis=0))
    tl.store(out + P_REF_KL, tl.sum(s_rkl, axis=0))
    tl.store(out + P_RATIO_CAP, tl.sum(s_cap, axis=0))
    tl.store(out + P_PG_WEIGHT, tl.sum(s_pgw, axis=0))
    tl.store(out + P_SAPO_GATE, tl.sum(s_gate, axis=0))
    tl.store(out + P_RATIO_MIN, tl.min(s_rmin, axis=0))
    tl.store(out + P_RATIO_MAX, tl.max(s_rmax, axis=0))


def _strides(t: torch.Tensor) -> tuple[int, int]:
    """(row stride, token stride) of a [B], [B, 1] or [B, T] tensor; 0 along a broadcast dimension."""
    if t.dim() == 1:
        return t.stride(0), 0
    return t.stride(0), (t.stride(1) if t.shape[1] > 1 else 0)


def grpo_token_loss(
    logprobs: torch.Tensor,
    entropy: torch.Tensor | None,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    steer: torch.Tensor | None,
    pg_weights: torch.Tensor | None = None,
    *,
    policy_loss: str = "ppo",
    importance: str = "token",
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
    ratio_cap: float | None = None,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    beta: float,
    kl: str,
    kl_clamp: float | None = 10.0,
    kl_ratio_weighted: bool = False,
    entropy_coef: float,
    inv_divisor: float,
    seq_mean: bool,
    clamp: float | None,
    interpret: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(g_lp [B, T], g_H [B, T] or None, per-sequence table [B, len(GRPO_PARTS)]).

    All inputs fp32; logprobs, entropy, old / ref log-probs, mask and steer contiguous [B, T]; advantages
    [B] or [B, T] and pg_weights [B, 1] or [B, T], any strides. `clamp` None: no log-ratio clamp.
    """
    B, T = logprobs.shape
    g_lp = torch.empty_like(logprobs)
    ent_grad = entropy_coef != 0.0
    if ent_grad and entropy is None:
        raise ValueError("entropy_coef != 0 needs the entropy")
    g_ent = torch.empty_like(logprobs) if ent_grad else None
    parts = torch.empty((B, len(GRPO_PARTS)), device=logprobs.device, dtype=torch.float32)
    kind = KL_KINDS[kl.rstrip("+")] if beta > 0 else 0
    block = min(1024, max(16, triton.next_power_of_2(T))) if not interpret else 32
    adv_b, adv_t = _strides(advantages)
    pgw_b, pgw_t = _strides(pg_weights) if pg_weights is not None else (0, 0)
    _grpo_token_kernel[(B,)](
        logprobs,
        entropy if entropy is not None else logprobs,
        old_logprobs if old_logprobs is not None else logprobs,
        ref_logprobs if ref_logprobs is not None else logprobs,
        advantages,
        mask,
        steer if steer is not None else logprobs,
        pg_weights if pg_weights is not None else logprobs,
        g_lp,
        g_ent if g_ent is not None else g_lp,
        parts,
        T,
        adv_b,
        adv_t,
        pgw_b,
        pgw_t,
        float(eps_low),
        float(eps_high),
        float(dual_clip or 0.0),
        float(ratio_cap or 0.0),
        float(sapo_tau_pos),
        float(sapo_tau_neg),
        float(beta),
        float(entropy_coef),
        float(inv_divisor),
        float(clamp or 0.0),
        float(kl_clamp or 0.0),
        POLICY=POLICY_LOSSES.index(policy_loss),
        IMPORTANCE_LEVEL=IMPORTANCE.index(importance),
        HAS_OLD=old_logprobs is not None,
        HAS_ENT=entropy is not None,
        ENT_GRAD=ent_grad,
        HAS_STEER=steer is not None,
        HAS_PGW=pg_weights is not None,
        SEQ_MEAN=seq_mean,
        DUAL=dual_clip is not None,
        CAP=ratio_cap is not None,
        KL_KIND=kind,
        KL_PLUS=kl.endswith("+"),
        KL_CLAMP=kl_clamp is not None,
        KL_RATIO=bool(kl_ratio_weighted),
        LR_CLAMP=clamp is not None,
        NUM_PARTS=len(GRPO_PARTS),
        BLOCK_T=block,
    )
    return g_lp, g_ent, parts
