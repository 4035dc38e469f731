"""Online-softmax partial statistics: merge over vocabulary pieces, then turn into per-row results.

A partial for a piece of the vocabulary holds, per row, relative to that piece's max m:
    m,  S = sum exp(z - m),  Sd = sum exp(z - m)(z - m),  zy (the target logit if in the piece, else 0)
and optionally  S2 = sum exp(2(z - m)),  S2d = sum exp(2(z - m))(z - m).
Both the Triton kernels (one partial per vocabulary split) and the chunked torch path (one per chunk)
produce this layout, stacked as [stats, pieces, N]. Across the ranks of a vocabulary-parallel group the same
merge runs as collectives (fused_rlvr.vocab_parallel): an all-reduce MAX of m, `rescale_partials` to that max,
then one all-reduce SUM of the rest.
"""

from __future__ import annotations

import torch

STATS_BASIC = 4
STATS_MOMENTS = 6


def rescale_partials(part: torch.Tensor, big_m: torch.Tensor) -> torch.Tensor:
    """Partials [stats, ...] re-expressed relative to a larger max `big_m` (broadcast against part[0]).

    Returns [stats - 1, ...]: S, Sd, zy (and S2, S2d) relative to big_m, ready to be summed over pieces:
    with shift = m - big_m <= 0 and w = exp(shift), S' = w S and Sd' = w (Sd + shift S) (S2 and S2d use w^2).
    """
    shift, w = _shift(part[0], big_m)
    s = part[1]
    out = [w * s, _scaled(w, part[2], shift, s), part[3]]
    if part.shape[0] == STATS_MOMENTS:
        w2 = w * w
        s2 = part[4]
        out += [w2 * s2, _scaled(w2, part[5], shift, s2)]
    return torch.stack(out)


def _shift(m: torch.Tensor, big_m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m - big_m, exp(m - big_m)); a piece whose logits are all -inf for a row has m = -inf or -FLT_MAX and
    S = Sd = 0: its shift is taken as 0, so it adds exactly 0."""
    shift = m - big_m
    w = torch.exp(shift)
    return torch.where(w > 0, shift, 0.0), w


def _scaled(w: torch.Tensor, sd: torch.Tensor, shift: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """w (Sd + shift S), 0 where w = 0 (never 0 * inf)."""
    return torch.where(w > 0, w * (sd + shift * s), 0.0)


def reduce_partials(part: torch.Tensor) -> torch.Tensor:
    """Merge [stats, pieces, N] into [stats, N], rescaled to the overall max (`rescale_partials`, summed)."""
    big_m = part[0].max(dim=0).values
    rest = rescale_partials(part, big_m)
    return torch.cat([big_m.unsqueeze(0), rest.sum(1)])


def finalize(part: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row lse, logprob, entropy (and sum p^2, sum p^2 log p) from merged partials [stats, N]."""
    m, s, sd, zy = part[0], part[1], part[2], part[3]
    log_s = torch.log(s)
    out = {
        "lse": m + log_s,
        "logprob": (zy - m) - log_s,
        "entropy": (log_s - sd / s).clamp_min(0.0),
    }
    if part.shape[0] == STATS_MOMENTS:
        inv_s_sq = 1.0 / (s * s)
        out["sum_p2"] = part[4] * inv_s_sq
        out["sum_p2_logp"] = (part[5] - part[4] * log_s) * inv_s_sq
    return out
