"""Masked per-sequence log-ratio sums: score_i = scale * sum_t m_t (lp_t - old_t), one program per sequence.

PACS's implicit reward (docs/methods.md, section 4). The backward of the score is a broadcast,
d score_i / d lp_t = scale * m_t, done by the caller. Flops and bytes: O(B T).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sequence_score_kernel(lp_ptr, old_ptr, mask_ptr, out_ptr, T, scale, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        inb = offs < T
        m = tl.load(mask_ptr + row * T + offs, mask=inb, other=0.0)
        lp = tl.load(lp_ptr + row * T + offs, mask=inb, other=0.0)
        old = tl.load(old_ptr + row * T + offs, mask=inb, other=0.0)
        acc += tl.where(m > 0, lp - old, 0.0)
    tl.store(out_ptr + row, scale * tl.sum(acc, axis=0))


def sequence_score(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, scale: float, *, interpret: bool
) -> torch.Tensor:
    """[B] scores from contiguous fp32 [B, T] log-probs, old log-probs and a 0/1 mask."""
    B, T = logprobs.shape
    out = torch.empty(B, device=logprobs.device, dtype=torch.float32)
    block = 32 if interpret else min(1024, max(16, triton.next_power_of_2(T)))
    _sequence_score_kernel[(B,)](logprobs, old_logprobs, mask, out, T, float(scale), BLOCK_T=block)
    return out
