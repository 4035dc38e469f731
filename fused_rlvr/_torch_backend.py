"""Chunked PyTorch path (CPU users, and the fallback): same algorithm as the Triton kernels.

Logits are computed for one block of rows x one chunk of the vocabulary at a time, so the extra memory
is a few [rows, chunk] fp32 buffers (FUSED_RLVR_TORCH_CHUNK_BYTES each, 2 MiB by default) plus, when the
hidden states are not fp32, an fp32 d_hidden accumulator; never [N, V]. A LoRA adapter on the head
(fused_rlvr.lora) adds its rank-r term to each logit chunk from hA = scale h A^T ([N, r], once per call).
"""

from __future__ import annotations

import os

import torch

from fused_rlvr._partials import STATS_BASIC, STATS_MOMENTS, finalize, reduce_partials
from fused_rlvr.kernels.configs import LOGP_FLOOR, MAX_FLOOR

MAX_ROWS = 4096
MIN_CHUNK = 64


def _chunk_bytes() -> int:
    return int(os.environ.get("FUSED_RLVR_TORCH_CHUNK_BYTES", str(2 << 20)))


def _blocks(n_rows: int, vocab: int) -> tuple[int, int]:
    rows = max(1, min(n_rows, MAX_ROWS))
    chunk = max(MIN_CHUNK, _chunk_bytes() // (4 * rows))
    return rows, min(vocab, chunk)


def _logits(h, weight, bias, v0, v1, params, inv_t, ha=None):
    """fp32 logits of rows h for vocab [v0, v1), and tanh(u / s) when softcapped (for the chain rule).

    inv_t: 1 / temperature, a float or these rows' [rows] fp32 values (per-token temperature).
    ha: these rows' LoRA projection scale h A^T (fp32 [rows, r]) when params.lora is set: u += ha B^T.
    """
    # fp32 logits from fp32 operands: only the [chunk, H] slice of the weight is upcast at a time
    b = None if bias is None else bias[v0:v1].float()
    h = h.float()
    per_row = isinstance(inv_t, torch.Tensor)
    if params.softcap is None and not per_row and inv_t != 1.0:
        # fold 1/T into the small operands: no pass over the logits
        h = h * inv_t
        b = None if b is None else b * inv_t
        ha = None if ha is None else ha * inv_t
        inv_t = 1.0
    z = torch.nn.functional.linear(h, weight[v0:v1].float(), b)
    if ha is not None:
        z.addmm_(ha, params.lora.b[v0:v1].float().T)
    t = None
    if params.softcap is not None:
        t = z.div_(params.softcap).tanh_()
        z = t * params.softcap
    if per_row:
        return z.mul_(inv_t.unsqueeze(1)), t
    return (z if inv_t == 1.0 else z.mul_(inv_t)), t


def _row_slice(values, r0, r1):
    """Rows [r0, r1) of a per-row tensor; a float or None as it is."""
    return values[r0:r1] if isinstance(values, torch.Tensor) else values


def _projection(hidden, params):
    """scale h A^T of every row (fp32 [N, r]) when the params carry a LoRA adapter, else None."""
    return None if params.lora is None else params.lora.project(hidden)


def forward(hidden, weight, bias, targets, params) -> dict[str, torch.Tensor]:
    return finalize(forward_partials(hidden, weight, bias, targets, params))


def forward_partials(hidden, weight, bias, targets, params) -> torch.Tensor:
    """Merged online-softmax partials [stats, N] over this weight's rows (see fused_rlvr._partials).

    Targets outside [0, V) (another rank's vocabulary shard) contribute no target logit.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    rows, chunk = _blocks(n, vocab)
    n_stats = STATS_MOMENTS if params.moments else STATS_BASIC
    inv_t = params.inv_temperature()
    ha = _projection(hidden, params)
    state = torch.empty((n_stats, n), dtype=torch.float32, device=hidden.device)
    for v0 in range(0, vocab, chunk):
        v1 = min(vocab, v0 + chunk)
        piece = torch.empty_like(state)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            inv, ha_rows = _row_slice(inv_t, r0, r1), _row_slice(ha, r0, r1)
            z, _ = _logits(hidden[r0:r1], weight, bias, v0, v1, params, inv, ha_rows)
            y = targets[r0:r1] - v0
            inside = (y >= 0) & (y < v1 - v0)
            zy = z.gather(1, y.clamp(0, v1 - v0 - 1).unsqueeze(1)).squeeze(1)
            # -inf logits (masked vocabulary entries) add 0 to every sum: the max is floored at -FLT_MAX and
            # d = z - m at -FLT_MAX, so exp(d) = 0 and d exp(d) = 0 (never -inf * 0)
            m = z.max(dim=1).values.clamp_min_(MAX_FLOOR)
            d = z.sub_(m.unsqueeze(1)).clamp_min_(MAX_FLOOR)
            e = d.exp()  # two [rows, chunk] buffers: d and e; the products below reuse them in place
            piece[0, r0:r1], piece[1, r0:r1], piece[3, r0:r1] = m, e.sum(1), torch.where(inside, zy, 0.0)
            de = d.mul_(e)
            piece[2, r0:r1] = de.sum(1)
            if params.moments:
                piece[5, r0:r1] = de.mul_(e).sum(1)
                piece[4, r0:r1] = e.square_().sum(1)
        state = piece if v0 == 0 else reduce_partials(torch.stack([state, piece], dim=1))
    return state


def backward(hidden, weight, bias, targets, lse, entropy, grad_logprob, grad_entropy, params, needs):
    """(d_hidden, d_weight, d_bias, d_lora_a, d_lora_b) of valid rows; None where `needs` says so.

    d_lora_a is this call's partial sum over its vocabulary rows (complete unless vocabulary-parallel).
    """
    need_dh, need_dw, need_db, need_da, need_dlb = needs
    n, vocab = hidden.shape[0], weight.shape[0]
    rows, chunk = _blocks(n, vocab)
    dh = None
    if need_dh:
        dh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    # an fp32 weight's gradient accumulates in place; other dtypes through one fp32 [chunk, H] buffer
    fp32_w = weight.dtype == torch.float32
    dw = (torch.zeros_like(weight) if fp32_w else torch.empty_like(weight)) if need_dw else None
    db = torch.empty(vocab, dtype=torch.float32, device=hidden.device) if need_db else None
    inv_t = params.inv_temperature()
    lora, ha = params.lora, _projection(hidden, params)
    g = dlb = None
    if lora is not None:
        if need_dh or need_da:  # g = d(hA) = sum_chunks du B[chunk], fp32 [N, r]
            g = torch.zeros((n, lora.rank), dtype=torch.float32, device=hidden.device)
        dlb = torch.empty_like(lora.b) if need_dlb else None
    for v0 in range(0, vocab, chunk):
        v1 = min(vocab, v0 + chunk)
        w_chunk = weight[v0:v1].float()
        dw_chunk = None
        if need_dw:
            dw_chunk = dw[v0:v1] if fp32_w else torch.zeros_like(w_chunk)
        db_chunk = torch.zeros(v1 - v0, dtype=torch.float32, device=hidden.device) if need_db else None
        lb_chunk = None if lora is None else lora.b[v0:v1].float()
        dlb_chunk = None if dlb is None else torch.zeros_like(lb_chunk)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            h = hidden[r0:r1]
            inv, ha_rows = _row_slice(inv_t, r0, r1), _row_slice(ha, r0, r1)
            z, t = _logits(h, weight, bias, v0, v1, params, inv, ha_rows)
            logp = z.sub_(lse[r0:r1].unsqueeze(1))
            # du = [g_lp (1[v = y] - p) - g_H p (log p + H)] / T, built in the logp / p buffers (one buffer
            # when only the log-probs have an upstream gradient); the per-row factors carry -1/T
            scale = -inv.unsqueeze(1) if isinstance(inv, torch.Tensor) else -inv
            p = logp.exp() if grad_entropy is not None else logp.exp_()
            if grad_entropy is not None:
                # p (log p + H) with log p floored (configs.LOGP_FLOOR), where p is already exactly 0 in
                # fp32: -inf logits give 0, not 0 * inf
                logp.clamp_min_(LOGP_FLOOR)
                coef = logp.add_(entropy[r0:r1].unsqueeze(1)).mul_(scale * grad_entropy[r0:r1].unsqueeze(1))
                if grad_logprob is not None:
                    coef.add_(scale * grad_logprob[r0:r1].unsqueeze(1))
            else:
                coef = scale * grad_logprob[r0:r1].unsqueeze(1)
            dz = p.mul_(coef)
            if grad_logprob is not None:
                y = targets[r0:r1] - v0
                hit = ((y >= 0) & (y < v1 - v0)).nonzero().squeeze(1)
                scale_hit = scale[hit, 0] if isinstance(scale, torch.Tensor) else scale
                dz[hit, y[hit]] -= scale_hit * grad_logprob[r0:r1][hit]
            if t is not None:
                dz.mul_(1.0 - t.square_())
            if need_dh:
                dh[r0:r1].addmm_(dz, w_chunk)
            if need_dw:
                dw_chunk.addmm_(dz.T, h.float())
            if need_db:
                db_chunk += dz.sum(0)
            if dlb_chunk is not None:
                dlb_chunk.addmm_(dz.T, ha_rows)
            if g is not None:
                g[r0:r1].addmm_(dz, lb_chunk)
        if need_dw and not fp32_w:
            dw[v0:v1] = dw_chunk
        if need_db:
            db[v0:v1] = db_chunk
        if dlb is not None:
            dlb[v0:v1] = dlb_chunk
    da = None if g is None else lora.input_grads(g, hidden, dh, need_da)
    return dh, dw, db, da, dlb
