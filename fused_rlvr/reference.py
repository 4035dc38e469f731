"""Plain-torch references that materialise the [N, V] logits: ground truth for tests and benchmarks.

Call them on float64 copies of the inputs for ground truth, or on the inputs' own dtype for the "naive
same-dtype" baseline of the CCE error rule. They are differentiable through ordinary autograd.
"""

from __future__ import annotations

import torch

from fused_rlvr.types import IGNORE_INDEX, TokenStats


def reference_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """`softcap(hidden @ weight.T + bias) / temperature`, materialised, in the inputs' dtype.

    temperature: a float, or a tensor shaped like hidden[..., 0] (one divisor per row of logits).
    """
    u = hidden @ weight.T
    if bias is not None:
        u = u + bias
    if softcap is not None:
        u = softcap * torch.tanh(u / softcap)
    if isinstance(temperature, torch.Tensor) and temperature.dim():
        return u / temperature.to(u.dtype).unsqueeze(-1)
    return u / temperature


def reference_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    moments: bool = False,
) -> TokenStats | tuple[torch.Tensor, ...]:
    """log_softmax(logits)[targets] and the softmax entropy, with ignored rows set to 0.

    temperature: a float or a per-token tensor shaped like targets (the divisor of each row's logits).
    Logits of -inf are allowed (p log p = 0 there, in values and gradients); a target whose logit is -inf
    has log-prob -inf.

    With `moments=True` returns (logprobs, entropy, sum_v p^2, sum_v p^2 log p) instead of a TokenStats.
    """
    valid = targets.long() != ignore_index
    if isinstance(temperature, torch.Tensor) and temperature.dim():  # per token; ignored ones: anything
        temperature = torch.where(valid, temperature, torch.ones_like(temperature))
    z = reference_logits(hidden, weight, bias=bias, temperature=temperature, softcap=softcap)
    logp = torch.log_softmax(z, dim=-1)
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    p = logp.exp()
    # 0 log 0 = 0: a -inf logit (a masked vocabulary entry) adds nothing, and no NaN reaches the gradients
    logp_finite = torch.where(p > 0, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    ent = -(p * logp_finite).sum(-1)
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    lp = torch.where(valid, lp, zero)
    ent = torch.where(valid, ent, zero)
    if not moments:
        return TokenStats(lp, ent)
    p2 = p * p
    return lp, ent, torch.where(valid, p2.sum(-1), zero), torch.where(valid, (p2 * logp_finite).sum(-1), zero)
