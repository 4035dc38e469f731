"""GRPO-family per-token loss epilogue: one program per sequence, loss value and d(loss)/d(lp, H) at once.

Inputs are the [B, T] per-token log-probs (and entropies) of the fused op plus old / reference log-probs,
advantages ([B] or [B, T]), a 0/1 mask and optional STEER weights. Per sequence i:
  pass 1 (sequence ratio or seq-mean aggregation): n_i = sum_t m_t, slr_i = sum_t m_t (lp_t - old_t)
  pass 2, per token:  r = exp(clamp(lp - old, +-C))  (GSPO: r = exp(clamp(slr_i / n_i, +-C)), dr/dlp = r)
     pg = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), dual clip for A < 0: min(pg, -A c)
     total = w_steer pg + beta KL(lp - ref) - coef H
     loss += c_i m_t total / divisor   with c_i = 1 / n_i for seq-mean-token-mean, else 1
     g_lp  = c_i m_t (w_steer d pg / dlp + beta dKL/dx) / divisor,  g_H = -c_i m_t coef / divisor
and per-sequence partial sums of the loss parts and the metrics (clip fractions, ratio, KL, entropy).
Flops and bytes: O(B T), a few reads and two writes per token; this replaces ~30 small torch kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# partial sums per sequence, in this order
PARTS = (
    "loss",
    "pg",
    "kl_term",
    "ent_term",
    "tokens",
    "ratio",
    "clip_low",
    "clip_high",
    "clip_dual",
    "approx_kl",
    "entropy",
    "ref_kl",
)
KL_KINDS = {"k1": 1, "k2": 2, "k3": 3}


@triton.jit
def _grpo_token_kernel(
    lp_ptr,
    ent_ptr,
    old_ptr,
    ref_ptr,
    adv_ptr,
    mask_ptr,
    steer_ptr,
    glp_ptr,
    gent_ptr,
    part_ptr,
    T,
    stride_adv_b,
    stride_adv_t,
    eps_low,
    eps_high,
    dual_c,
    beta,
    ent_coef,
    inv_divisor,
    clamp_c,
    HAS_OLD: tl.constexpr,
    HAS_ENT: tl.constexpr,
    ENT_GRAD: tl.constexpr,
    HAS_STEER: tl.constexpr,
    SEQ_RATIO: tl.constexpr,
    SEQ_MEAN: tl.constexpr,
    DUAL: tl.constexpr,
    KL_KIND: tl.constexpr,
    KL_PLUS: tl.constexpr,
    NUM_PARTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    n_vec = tl.zeros((BLOCK_T,), dtype=tl.float32)
    slr_vec = tl.zeros((BLOCK_T,), dtype=tl.float32)
    if SEQ_RATIO or SEQ_MEAN:
        for t0 in range(0, T, BLOCK_T):
            offs = t0 + tl.arange(0, BLOCK_T)
            inb = offs < T
            m = tl.load(mask_ptr + base + offs, mask=inb, other=0.0)
            n_vec += m
            if SEQ_RATIO and HAS_OLD:
                lp = tl.load(lp_ptr + base + offs, mask=inb, other=0.0)
                old = tl.load(old_ptr + base + offs, mask=inb, other=0.0)
                slr_vec += tl.where(m > 0, lp - old, 0.0)
    n_tok = tl.sum(n_vec, axis=0)
    slr = tl.sum(slr_vec, axis=0)
    seq_ratio = tl.exp(tl.minimum(tl.maximum(slr / tl.maximum(n_tok, 1.0), -clamp_c), clamp_c))
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
    for t0 in range(0, T, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        inb = offs < T
        m = tl.load(mask_ptr + base + offs, mask=inb, other=0.0)
        valid = m > 0
        lp = tl.load(lp_ptr + base + offs, mask=inb, other=0.0)
        adv = tl.load(adv_ptr + row * stride_adv_b + offs * stride_adv_t, mask=inb, other=0.0)
        w = m * row_w
        if HAS_OLD:
            old = tl.load(old_ptr + base + offs, mask=inb, other=0.0)
            x_old = tl.where(valid, lp - old, 0.0)
        else:
            x_old = tl.zeros((BLOCK_T,), dtype=tl.float32)
        if SEQ_RATIO:
            ratio = tl.zeros((BLOCK_T,), dtype=tl.float32) + seq_ratio
            dratio = ratio  # GSPO-token: sg[s] exp(lp - sg[lp]) has d/dlp = s
        else:
            clamped = tl.minimum(tl.maximum(x_old, -clamp_c), clamp_c)
            ratio = tl.exp(clamped)
            dratio = tl.where(clamped == x_old, ratio, 0.0)
        surr1 = -adv * ratio
        surr2 = -adv * tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
        unclipped = surr1 >= surr2
        pg = tl.where(unclipped, surr1, surr2)
        dpg = tl.where(unclipped, -adv * dratio, 0.0)
        dual_hit = tl.zeros((BLOCK_T,), dtype=tl.int1)
        if DUAL:
            cap = -adv * dual_c
            dual_hit = (adv < 0) & (cap < pg)
            pg = tl.where(dual_hit, cap, pg)
            dpg = tl.where(dual_hit, 0.0, dpg)
        if HAS_STEER:
            sw = tl.load(steer_ptr + base + offs, mask=inb, other=0.0)
            pg = pg * sw
            dpg = dpg * sw
        total = pg
        grad = dpg
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
                kl_val = tl.minimum(tl.maximum(raw, -10.0), 10.0)
                dkl = tl.where(raw == kl_val, 1.0 - e, 0.0)
            if KL_PLUS:
                dkl = x
            total += beta * kl_val
            grad += beta * dkl
        ent = tl.zeros((BLOCK_T,), dtype=tl.float32)
        if HAS_ENT:
            ent = tl.load(ent_ptr + base + offs, mask=inb, other=0.0)
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
        s_low += tl.where(valid & (ratio < 1.0 - eps_low) & (adv < 0), 1.0, 0.0)
        s_high += tl.where(valid & (ratio > 1.0 + eps_high) & (adv > 0), 1.0, 0.0)
        s_dual += tl.where(valid & dual_hit, 1.0, 0.0)
        s_akl += mf * -x_old
        s_h += mf * ent
        s_rkl += mf * kl_val
    out = part_ptr + row * NUM_PARTS
    tl.store(out + 0, tl.sum(s_loss, axis=0))
    tl.store(out + 1, tl.sum(s_pg, axis=0))
    tl.store(out + 2, tl.sum(s_kl, axis=0))
    tl.store(out + 3, tl.sum(s_ent, axis=0))
    tl.store(out + 4, tl.sum(s_tok, axis=0))
    tl.store(out + 5, tl.sum(s_ratio, axis=0))
    tl.store(out + 6, tl.sum(s_low, axis=0))
    tl.store(out + 7, tl.sum(s_high, axis=0))
    tl.store(out + 8, tl.sum(s_dual, axis=0))
    tl.store(out + 9, tl.sum(s_akl, axis=0))
    tl.store(out + 10, tl.sum(s_h, axis=0))
    tl.store(out + 11, tl.sum(s_rkl, axis=0))


def grpo_token_loss(
    logprobs: torch.Tensor,
    entropy: torch.Tensor | None,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    steer: torch.Tensor | None,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
    beta: float,
    kl: str,
    entropy_coef: float,
    inv_divisor: float,
    seq_ratio: bool,
    seq_mean: bool,
    clamp: float,
    interpret: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(g_lp [B, T], g_H [B, T] or None, partials [B, len(PARTS)]); all inputs fp32, contiguous [B, T]."""
    B, T = logprobs.shape
    g_lp = torch.empty_like(logprobs)
    ent_grad = entropy_coef != 0.0
    if ent_grad and entropy is None:
        raise ValueError("entropy_coef != 0 needs the entropy")
    g_ent = torch.empty_like(logprobs) if ent_grad else None
    parts = torch.empty((B, len(PARTS)), device=logprobs.device, dtype=torch.float32)
    kind = KL_KINDS[kl.rstrip("+")] if beta > 0 else 0
    block = min(1024, max(16, triton.next_power_of_2(T))) if not interpret else 32
    _grpo_token_kernel[(B,)](
        logprobs,
        entropy if entropy is not None else logprobs,
        old_logprobs if old_logprobs is not None else logprobs,
        ref_logprobs if ref_logprobs is not None else logprobs,
        advantages,
        mask,
        steer if steer is not None else logprobs,
        g_lp,
        g_ent if g_ent is not None else g_lp,
        parts,
        T,
        advantages.stride(0),
        advantages.stride(1) if advantages.dim() == 2 else 0,
        float(eps_low),
        float(eps_high),
        float(dual_clip or 0.0),
        float(beta),
        float(entropy_coef),
        float(inv_divisor),
        float(clamp),
        HAS_OLD=old_logprobs is not None,
        HAS_ENT=entropy is not None,
        ENT_GRAD=ent_grad,
        HAS_STEER=steer is not None,
        SEQ_RATIO=seq_ratio,
        SEQ_MEAN=seq_mean,
        DUAL=dual_clip is not None,
        KL_KIND=kind,
        KL_PLUS=kl.endswith("+"),
        NUM_PARTS=len(PARTS),
        BLOCK_T=block,
    )
    return g_lp, g_ent, parts
