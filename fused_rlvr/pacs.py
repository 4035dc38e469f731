"""PACS: RLVR as supervised learning of the verifier outcome from the policy's implicit reward."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from fused_rlvr._kernels import kernel_module
from fused_rlvr._validation import as_mask, check_tensor, non_negative, one_of, per_token, positive_finite
from fused_rlvr.advantages import group_index
from fused_rlvr.linear_logprobs import fused_token_stats, make_params, scored_targets
from fused_rlvr.types import IGNORE_INDEX
from fused_rlvr.vocab_parallel import VocabParallel

BASELINES = ("rloo", "grpo", "none")


class PACSStats(NamedTuple):
    loss: torch.Tensor
    score_mean: torch.Tensor  # mean implicit reward r_hat = beta * sum_t m (lp - old)
    psi_mean: torch.Tensor  # mean of the baselined logit fed to the BCE
    accuracy: torch.Tensor  # mean of sigmoid(psi) > 0.5 agreeing with the reward label
    reward_mean: torch.Tensor
    weight_mean: torch.Tensor  # mean class-balance weight
    n_sequences: torch.Tensor


class _SequenceScoreTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lp, old, mask, beta, interpret):
        ctx.save_for_backward(mask)
        ctx.beta = beta
        return kernel_module("sequence_score", interpret).sequence_score(
            lp.contiguous(), old, mask.contiguous(), beta, interpret=interpret
        )

    @staticmethod
    def backward(ctx, grad_score):
        (mask,) = ctx.saved_tensors
        return ctx.beta * grad_score[:, None] * mask, None, None, None, None


def pacs_loss_from_scores(
    scores, rewards, group_ids, *, baseline="rloo", class_balance=True, normalizer=None, eps=1e-6
):
    """PACS loss from per-sequence implicit rewards `scores` [B] (differentiable) and 0/1 outcomes [B].

    psi_i = score_i - mean_{j != i in group} score_j (rloo) | (score_i - mean_g) / (std_g + eps) (grpo) |
    score_i (none); loss = (1 / N) sum_i w_i BCEWithLogits(psi_i, R_i), N = B unless `normalizer` gives the
    whole batch's sequence count; class balance per group with k correct of G: w_pos = G / (2k),
    w_neg = G / (2 (G - k)), and w = 1 in groups whose labels are all the same.
    """
    index, sizes = group_index(group_ids)
    n_groups = len(sizes)
    g = sizes.to(scores.dtype)

    def gsum(v):
        return torch.zeros(n_groups, dtype=v.dtype, device=v.device).index_add(0, index, v)

    if baseline == "rloo":
        if bool((sizes < 2).any()):
            bad = int(torch.nonzero(sizes < 2)[0])
            raise ValueError(f"baseline='rloo' needs groups of at least 2 sequences; group {bad} has one")
        psi = scores - (gsum(scores)[index] - scores) / (g - 1)[index]
    elif baseline == "grpo":
        mean = gsum(scores) / g
        dev = scores - mean[index]
        var = gsum(dev * dev) / (g - 1).clamp_min(1)
        # d sqrt(var) / d var is infinite at var = 0 (every score equal, as on the first on-policy update):
        # take the zero subgradient there instead of a NaN
        std = torch.where(var > 0, var.clamp_min(torch.finfo(var.dtype).tiny).sqrt(), torch.zeros_like(var))
        psi = dev / (std[index] + eps)
    else:
        psi = scores
    r = rewards.to(scores.dtype)
    label = (r > 0.5).to(scores.dtype)
    if class_balance:
        k = gsum(label)
        w_pos = g / (2 * k.clamp_min(1))
        w_neg = g / (2 * (g - k).clamp_min(1))
        same = (k == 0) | (k == g)
        w = torch.where(label > 0, w_pos[index], w_neg[index])
        w = torch.where(same[index], torch.ones_like(w), w)
    else:
        w = torch.ones_like(psi)
    n = positive_finite("normalizer", normalizer) if normalizer is not None else float(scores.numel())
    bce = torch.nn.functional.softplus(psi) - r * psi
    loss = (w * bce).sum() / n
    acc = ((psi.detach() > 0).to(scores.dtype) == label).to(scores.dtype).mean()
    return loss, PACSStats(
        loss.detach(),
        scores.detach().mean(),
        psi.detach().mean(),
        acc,
        r.mean(),
        w.detach().mean(),
        torch.tensor(float(scores.numel())),
    )


def linear_pacs_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    old_logprobs: torch.Tensor,
    beta: float = 1.0,
    baseline: str = "rloo",
    class_balance: bool = True,
    temperature: float | torch.Tensor = 1.0,
    bias: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    backend: str = "auto",
    normalizer: Optional[float] = None,
    vocab_parallel: Optional[VocabParallel] = None,
    lora_a: Optional[torch.Tensor] = None,
    lora_b: Optional[torch.Tensor] = None,
    lora_scale: Optional[float] = None,
) -> tuple[torch.Tensor, PACSStats]:
    """PACS loss straight from hidden states [B, T, H] and the lm-head (the authors' code is the default).

    score_i = beta * sum_t m_t (lp_t - old_t) (a sum, with old = the pre-update policy), baselined within
    each group (`group_ids` [B], groups may differ in size), then BCE-with-logits against the 0/1
    verifier outcome `rewards` [B]; see `pacs_loss_from_scores`. The gradient w.r.t. each valid token's
    log-prob is beta * (e_i - mean_{j != i} e_j), e_i = w_i (sigmoid(psi_i) - R_i) / N, for rloo.
    vocab_parallel: `weight` (and `bias`) is this rank's vocabulary shard
    of a vocabulary-parallel lm-head, as in `linear_logprobs`; all other inputs are replicated.
    lora_a, lora_b, lora_scale: a LoRA adapter on the lm-head, as in `linear_logprobs`.
    """
    check_tensor("hidden", hidden)
    check_tensor("rewards", rewards)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    b_t = tuple(hidden.shape[:2])
    if tuple(targets.shape) != b_t:
        raise ValueError(f"targets must be [B, T] = {b_t}, got {tuple(targets.shape)}")
    if tuple(rewards.shape) != b_t[:1]:
        raise ValueError(f"rewards must be [B] = {b_t[:1]}, got {tuple(rewards.shape)}")
    if tuple(group_ids.shape) != b_t[:1]:
        raise ValueError(f"group_ids must be [B] = {b_t[:1]}, got {tuple(group_ids.shape)}")
    if bool(((rewards < 0) | (rewards > 1)).any()) or not bool(torch.isfinite(rewards.float()).all()):
        raise ValueError(
            f"rewards must lie in [0, 1] (verifier outcomes), got min {float(rewards.min())} "
            f"max {float(rewards.max())}"
        )
    beta = non_negative("beta", beta)
    one_of("baseline", baseline, BASELINES)
    m = as_mask("mask", mask, b_t)
    old = per_token("old_logprobs", old_logprobs, b_t, allow_none=False)
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
        vocab_parallel=vocab_parallel,
        lora_a=lora_a,
        lora_b=lora_b,
        lora_scale=lora_scale,
    )
    lp, _ent, _, _ = fused_token_stats(hidden, weight, bias, y, params)
    if params.backend == "triton":
        scores = _SequenceScoreTriton.apply(lp, old, m, beta, params.interpret)
    else:
        scores = beta * torch.where(m > 0, lp - old, 0.0).sum(1)  # masked values never read
    return pacs_loss_from_scores(
        scores, rewards, group_ids, baseline=baseline, class_balance=class_balance, normalizer=normalizer
    )
