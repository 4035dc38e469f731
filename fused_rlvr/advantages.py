"""Group-relative advantages and STEER entropy-change weights (docs/methods.md, sections 2 and 3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fused_rlvr._validation import as_mask, check_per_token, check_tensor, one_of, positive_finite

ESTIMATORS = ("grpo", "rloo")
SCALES = ("group", "batch", "none")
STEER_MODES = ("exp", "linear", "exact")


def group_index(group_ids: torch.Tensor, name: str = "group_ids") -> tuple[torch.Tensor, torch.Tensor]:
    """(dense group index per element, size of each group) for arbitrary integer group labels."""
    check_tensor(name, group_ids)
    if group_ids.dim() != 1 or group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise ValueError(
            f"{name} must be a 1-D integer tensor, got {group_ids.dtype} of shape {tuple(group_ids.shape)}"
        )
    _, index = torch.unique(group_ids, return_inverse=True)
    sizes = torch.bincount(index)
    return index, sizes


def _group_sum(values: torch.Tensor, index: torch.Tensor, n_groups: int) -> torch.Tensor:
    return torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, index, values)


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    estimator: str = "grpo",
    scale: str = "group",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-sample advantages from rewards [B] and group labels [B] (groups may differ in size).

    estimator "grpo": A = R - mean_g(R); "rloo": A_i = R_i - mean_{j != i in g}(R_j).
    scale "group": divide by (unbiased std of the group + eps) (GRPO); "batch": by (std of the batch + eps);
    "none": no division (Dr. GRPO, DARS). A group of one has std 0 (its GRPO advantage is 0); RLOO refuses it.
    """
    check_tensor("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if tuple(group_ids.shape) != tuple(rewards.shape):
        raise ValueError(
            f"group_ids must have the shape of rewards {tuple(rewards.shape)}, got {tuple(group_ids.shape)}"
        )
    one_of("estimator", estimator, ESTIMATORS)
    one_of("scale", scale, SCALES)
    eps = positive_finite("eps", eps)
    r = rewards.to(torch.float32) if rewards.dtype != torch.float64 else rewards
    index, sizes = group_index(group_ids)
    n = sizes.to(r.dtype)
    mean = _group_sum(r, index, len(sizes)) / n
    if estimator == "rloo":
        if bool((sizes < 2).any()):
            g = int(torch.nonzero(sizes < 2)[0])
            raise ValueError(f"estimator='rloo' needs groups of at least 2 samples; group {g} has one")
        adv = (r - mean[index]) * (n / (n - 1))[index]
    else:
        adv = r - mean[index]
    if scale == "group":
        var = _group_sum((r - mean[index]) ** 2, index, len(sizes)) / (n - 1).clamp_min(1)
        adv = adv / (var.sqrt()[index] + eps)
    elif scale == "batch":
        std = r.std() if r.numel() > 1 else torch.zeros((), dtype=r.dtype, device=r.device)
        adv = adv / (std + eps)
    return adv


@dataclass(frozen=True)
class SteerConfig:
    """STEER token reweighting (Stabilizing Token-level Entropy-changE via Reweighting).

    mode "exp" (the authors' main method) and "linear" map |Omega| of the authors' code to weights;
    "exact" uses the first-order entropy change of a policy-gradient step from the fused moments.
    """

    mode: str = "exp"
    lambda_min: float = 0.8
    lambda_max: float = 1.0

    def __post_init__(self):
        _check_steer_options(self.mode, self.lambda_min, self.lambda_max, prefix="steer.")


def _check_steer_options(mode, lambda_min, lambda_max, *, prefix: str = "") -> tuple[float, float]:
    """mode one of STEER_MODES, 0 < lambda_min <= lambda_max, both finite; errors name `prefix` + field."""
    one_of(prefix + "mode", mode, STEER_MODES)
    lo = positive_finite(prefix + "lambda_min", lambda_min)
    hi = positive_finite(prefix + "lambda_max", lambda_max)
    if lo > hi:
        raise ValueError(f"{prefix}lambda_min ({lo}) must not exceed lambda_max ({hi})")
    return lo, hi


@torch.no_grad()
def steer_weights(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    old_entropy: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "exp",
    lambda_min: float = 0.8,
    lambda_max: float = 1.0,
    sum_p2: torch.Tensor | None = None,
    sum_p2_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """Detached per-token STEER weights [B, T] (0 on padded tokens).

    Authors' code ("exp", "linear"): Omega = (A / pi_old(y)) p (1 - p) (log p + H_old), p = exp(logprobs)
    clamped to [1e-8, 1 - 1e-8], pi_old clamped to [1e-8, 1], non-finite -> 0, then |Omega|.
    "exp": k = -ln(lambda_min) / max(max|Omega|, 0.02), weight = clip(exp(-k |Omega|), lambda_min, 1).
    "linear": lambda_max - (|Omega| - min)(lambda_max - lambda_min) / (max - min), clamped to [0.8, 1.2]
    (1.0 when max == min). max/min are over the valid tokens of this call (the micro-batch).
    "exact": Omega = A r [p_y (log p_y + H) - sum_v p_v^2 (log p_v + H)], the first-order entropy change
    of the step (up to the learning rate), from the moments of `linear_entropy_moments` (sum_p2,
    sum_p2_logp) and the current entropy; then the "exp" mapping.

    logprobs, old_logprobs, old_entropy (and sum_p2, sum_p2_logp, entropy) are floating [B, T] tensors,
    advantages [B, T] or [B], mask a 0/1 [B, T] tensor (exact shapes, no broadcasting); mode and the lambda
    bounds are checked as `SteerConfig` checks them (0 < lambda_min <= lambda_max, finite).
    """
    lambda_min, lambda_max = _check_steer_options(mode, lambda_min, lambda_max)
    check_tensor("logprobs", logprobs)
    if not logprobs.is_floating_point():
        raise TypeError(f"logprobs must be a floating-point [B, T] tensor, got {logprobs.dtype}")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    b_t = tuple(logprobs.shape)
    m = as_mask("mask", mask, b_t).to(logprobs.device) > 0
    check_per_token("old_logprobs", old_logprobs, b_t)
    check_per_token("old_entropy", old_entropy, b_t)
    check_per_token("advantages", advantages, b_t, allow_per_sequence=True)
    adv = advantages if advantages.dim() == 2 else advantages[:, None].expand(b_t)
    lp = logprobs.double()
    if mode == "exact":
        if sum_p2 is None or sum_p2_logp is None or entropy is None:
            raise ValueError(
                "mode='exact' needs sum_p2, sum_p2_logp and entropy (from linear_entropy_moments)"
            )
        for name, value in (("sum_p2", sum_p2), ("sum_p2_logp", sum_p2_logp), ("entropy", entropy)):
            check_per_token(name, value, b_t)
        ent = entropy.double()
        p = lp.exp()
        ratio = (lp - old_logprobs.double()).clamp(-20, 20).exp()
        omega = adv.double() * ratio * (p * (lp + ent) - (sum_p2_logp.double() + ent * sum_p2.double()))
    else:
        p = lp.exp().clamp(1e-8, 1 - 1e-8)
        pi_old = old_logprobs.double().exp().clamp(1e-8, 1.0)
        omega = adv.double() / pi_old * p * (1 - p) * (p.log() + old_entropy.double())
    omega = torch.where(torch.isfinite(omega), omega, 0.0).abs()
    omega = torch.where(m, omega, 0.0)
    if not bool(m.any()):
        return torch.zeros_like(logprobs, dtype=torch.float32)
    big = omega[m].max()
    if mode == "linear":
        small = omega[m].min()
        if big == small:
            w = torch.ones_like(omega)
        else:
            w = lambda_max - (omega - small) * (lambda_max - lambda_min) / (big - small)
        w = w.clamp(0.8, 1.2)
    else:
        k = -torch.log(torch.tensor(lambda_min, dtype=torch.float64)) / big.clamp_min(0.02)
        w = torch.exp(-k * omega).clamp(lambda_min, 1.0)
    return torch.where(m, w, 0.0).float()
