"""DPO on fused sequence log-probs: the loss straight from hidden states and the lm-head, no [B, T, V] logits.

Used by Agent-RLVR's DPO variant (guided success as chosen, failure as rejected) and usable on its own.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from fused_rlvr._validation import as_mask, check_tensor, non_negative, per_token
from fused_rlvr.linear_logprobs import fused_token_stats, make_params, scored_targets
from fused_rlvr.types import IGNORE_INDEX


class DPOStats(NamedTuple):
    """Detached metrics of one DPO call (means over the pairs)."""

    loss: torch.Tensor
    chosen_reward: torch.Tensor  # beta * (pc - rc)
    rejected_reward: torch.Tensor  # beta * (pr - rr)
    reward_margin: torch.Tensor  # chosen_reward - rejected_reward
    accuracy: torch.Tensor  # fraction of pairs with margin > 0
    n_pairs: torch.Tensor


def _check_hidden(hidden, targets):
    check_tensor("hidden", hidden)
    check_tensor("targets", targets)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"targets must be [B, T] = {tuple(hidden.shape[:2])}, got {tuple(targets.shape)}")


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float | torch.Tensor = 1.0,
    softcap: Optional[float] = None,
    backend: str = "auto",
    lora_a: Optional[torch.Tensor] = None,
    lora_b: Optional[torch.Tensor] = None,
    lora_scale: Optional[float] = None,
) -> torch.Tensor:
    """sum_t mask[b, t] * log_softmax(softcap(hidden[b, t] @ weight.T + bias) / temperature)[targets[b, t]].

    hidden [B, T, H] (positions already aligned with targets: hidden[:, t] predicts targets[:, t]), targets
    [B, T], mask [B, T] 0/1. Returns fp32 [B], differentiable w.r.t. hidden, weight and bias. Masked tokens
    go to the fused op as ignore_index: they cost no vocabulary work and get zero gradient.
    temperature: a float or a per-token [B, T] tensor (any value on masked tokens), as in `linear_logprobs`.
    lora_a, lora_b, lora_scale: a LoRA adapter on the lm-head (logits + lora_scale (h A^T) B^T), as in
    `linear_logprobs`; differentiable w.r.t. both factors.
    """
    _check_hidden(hidden, targets)
    m = as_mask("mask", mask, targets.shape).to(hidden.device)
    y = scored_targets(targets, m)
    params = make_params(
        hidden,
        weight,
        y,
        bias,
        temperature,
        softcap,
        IGNORE_INDEX,
        backend,
        lora_a=lora_a,
        lora_b=lora_b,
        lora_scale=lora_scale,
    )
    lp, _ent, _, _ = fused_token_stats(hidden, weight, bias, y, params)
    return (lp * m).sum(1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    *,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, DPOStats]:
    """DPO: loss = mean_i -logsigmoid(beta ((pc_i - rc_i) - (pr_i - rr_i))).

    Inputs: [P] sequence log-probs of each pair under the policy (differentiable) and the reference
    (detached). label_smoothing e (cDPO, TRL's "sigmoid" loss): loss = mean -(1 - e) logsigmoid(beta z)
    - e logsigmoid(-beta z); e = 0 is plain DPO. Returns (loss, DPOStats).
    """
    names = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
    tensors = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    for name, t in zip(names, tensors):
        check_tensor(name, t)
        if t.dim() != 1 or tuple(t.shape) != tuple(policy_chosen.shape) or not t.is_floating_point():
            raise ValueError(
                f"{name} must be a floating [P] tensor like policy_chosen "
                f"{tuple(policy_chosen.shape)}, got {t.dtype} shape {tuple(t.shape)}"
            )
    if policy_chosen.numel() == 0:
        raise ValueError("dpo_loss needs at least one pair, got P = 0")
    beta = non_negative("beta", beta)
    eps = non_negative("label_smoothing", label_smoothing)
    if eps > 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    pc, pr = policy_chosen.float(), policy_rejected.float()
    rc, rr = ref_chosen.detach().float(), ref_rejected.detach().float()
    z = beta * ((pc - rc) - (pr - rr))
    losses = -F.logsigmoid(z) if eps == 0 else -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    loss = losses.mean()
    chosen = (beta * (pc - rc)).detach()
    rejected = (beta * (pr - rr)).detach()
    margin = chosen - rejected
    stats = DPOStats(
        loss.detach(),
        chosen.mean(),
        rejected.mean(),
        margin.mean(),
        (margin > 0).float().mean(),
        torch.tensor(float(pc.numel())),
    )
    return loss, stats


def linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    bias: Optional[torch.Tensor] = None,
    temperature: float | torch.Tensor = 1.0,
    softcap: Optional[float] = None,
    backend: str = "auto",
    lora_a: Optional[torch.Tensor] = None,
    lora_b: Optional[torch.Tensor] = None,
    lora_scale: Optional[float] = None,
) -> tuple[torch.Tensor, DPOStats]:
    """DPO loss straight from the policy's hidden states of a concatenated pair batch.

    Rows [0, P) of hidden [2P, T, H] / targets / mask are the chosen responses and rows [P, 2P) the rejected
    ones, pair i = (row i, row P + i) (TRL's concatenated forward: one fused call for both halves).
    ref_logprobs: the reference model's log-probs in the same row order, either per sequence [2P] (e.g.
    `sequence_logprobs` of the reference under no_grad, possibly cached) or per token [2P, T] (summed over
    mask here). Equals `dpo_loss(s[:P], s[P:], ref[:P], ref[P:], beta)` with s = `sequence_logprobs(...)`,
    without ever allocating the [2P, T, V] logits. temperature: a float or a per-token [2P, T] tensor.
    lora_a, lora_b, lora_scale: the policy's LoRA adapter on the lm-head, as in `sequence_logprobs`.
    Returns (loss, DPOStats).
    """
    _check_hidden(hidden, targets)
    rows = hidden.shape[0]
    if rows % 2:
        raise ValueError(f"hidden must stack P chosen then P rejected rows (an even B), got B = {rows}")
    ref = per_token(
        "ref_logprobs", ref_logprobs, tuple(targets.shape), allow_none=False, allow_per_sequence=True
    )
    seq = sequence_logprobs(
        hidden,
        weight,
        targets,
        mask,
        bias=bias,
        temperature=temperature,
        softcap=softcap,
        backend=backend,
        lora_a=lora_a,
        lora_b=lora_b,
        lora_scale=lora_scale,
    )
    if ref.dim() == 2:
        ref = (ref.to(seq.device) * as_mask("mask", mask, targets.shape).to(seq.device)).sum(1)
    ref = ref.to(seq.device)
    p = rows // 2
    return dpo_loss(seq[:p], seq[p:], ref[:p], ref[p:], beta, label_smoothing=label_smoothing)
