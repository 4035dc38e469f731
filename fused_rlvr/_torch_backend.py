"""Chunked PyTorch path (CPU users, and the fallback): same algorithm as the Triton kernels.

Logits are computed for one block of rows x one chunk of the vocabulary at a time, so the extra memory
is a few [rows, chunk] fp32 buffers (FUSED_RLVR_TORCH_CHUNK_BYTES each, 2 MiB by default) plus, when the
hidden states are not fp32, an fp32 d_hidden accumulator; never [N, V].
"""

from __future__ import annotations

import os

import torch

from fused_rlvr._partials import STATS_BASIC, STATS_MOMENTS, finalize, reduce_partials

MAX_ROWS = 4096
MIN_CHUNK = 64
_FLOOR = torch.finfo(torch.float32).min
_LOGP_FLOOR = -200.0  # exp(x) is exactly 0 in fp32 below about -103.3


def _chunk_bytes() -> int:
    return int(os.environ.get("FUSED_RLVR_TORCH_CHUNK_BYTES", str(2 << 20)))


def _blocks(n_rows: int, vocab: int) -> tuple[int, int]:
    rows = max(1, min(n_rows, MAX_ROWS))
    chunk = max(MIN_CHUNK, _chunk_bytes() // (4 * rows))
    return rows, min(vocab, chunk)


def _logits(h, weight, bias, v0, v1, params, inv_t):
    """fp32 logits of rows h for vocab [v0, v1), and tanh(u / s) when softcapped (for the chain rule).

    inv_t: 1 / temperature, a float or these rows' [rows] fp32 values (per-token temperature).
    """
    # fp32 logits from fp32 operands: only the [chunk, H] slice of the weight is upcast at a time
    b = None if bias is None else bias[v0:v1].float()
    h = h.float()
    per_row = isinstance(inv_t, torch.Tensor)
    if params.softcap is None:
        if per_row:  # one scale per row: applied to the logits
            return torch.nn.functional.linear(h, weight[v0:v1].float(), b).mul_(inv_t.unsqueeze(1)), None
        if inv_t != 1.0:  # fold 1/T into the small operands: no pass over the logits
            h = h * inv_t
            b = None if b is None else b * inv_t
        return torch.nn.functional.linear(h, weight[v0:v1].float(), b), None
    z = torch.nn.functional.linear(h, weight[v0:v1].float(), b)
    t = z.div_(params.softcap).tanh_()
    z = t * params.softcap
    return z.mul_(inv_t.unsqueeze(1) if per_row else inv_t), t


def _row_slice(inv_t, r0, r1):
    return inv_t[r0:r1] if isinstance(inv_t, torch.Tensor) else inv_t


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
    state = torch.empty((n_stats, n), dtype=torch.float32, device=hidden.device)
    for v0 in range(0, vocab, chunk):
        v1 = min(vocab, v0 + chunk)
        piece = torch.empty_like(state)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            z, _ = _logits(hidden[r0:r1], weight, bias, v0, v1, params, _row_slice(inv_t, r0, r1))
            y = targets[r0:r1] - v0
            inside = (y >= 0) & (y < v1 - v0)
            zy = z.gather(1, y.clamp(0, v1 - v0 - 1).unsqueeze(1)).squeeze(1)
            # -inf logits (masked vocabulary entries) add 0 to every sum: the max is floored at -FLT_MAX and
            # d = z - m at -FLT_MAX, so exp(d) = 0 and d exp(d) = 0 (never -inf * 0)
            m = z.max(dim=1).values.clamp_min_(_FLOOR)
            d = z.sub_(m.unsqueeze(1)).clamp_min_(_FLOOR)
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
    """(d_hidden, d_weight, d_bias) of valid rows; entries are None where `needs` says so."""
    need_dh, need_dw, need_db = needs
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
    for v0 in range(0, vocab, chunk):
        v1 = min(vocab, v0 + chunk)
        w_chunk = weight[v0:v1].float()
        dw_chunk = None
        if need_dw:
            dw_chunk = dw[v0:v1] if fp32_w else torch.zeros_like(w_chunk)
        db_chunk = torch.zeros(v1 - v0, dtype=torch.float32, device=hidden.device) if need_db else None
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            h = hidden[r0:r1]
            inv = _row_slice(inv_t, r0, r1)
            z, t = _logits(h, weight, bias, v0, v1, params, inv)
            logp = z.sub_(lse[r0:r1].unsqueeze(1))
            # du = [g_lp (1[v = y] - p) - g_H p (log p + H)] / T, built in the logp / p buffers (one buffer
            # when only the log-probs have an upstream gradient); the per-row factors carry -1/T
            scale = -inv.unsqueeze(1) if isinstance(inv, torch.Tensor) else -inv
            p = logp.exp() if grad_entropy is not None else logp.exp_()
            if grad_entropy is not None:
                # p (log p + H) with log p floored at -200, where p is already exactly 0 in fp32: -inf
                # logits give 0, not 0 * inf
                logp.clamp_min_(_LOGP_FLOOR)
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
        if need_dw and not fp32_w:
            dw[v0:v1] = dw_chunk
        if need_db:
            db[v0:v1] = db_chunk
    return dh, dw, db
