"""VERL: effective rank of hidden states, its velocity / acceleration along a response, and the advantage
shaping built on them (docs/methods.md section 5; "Beyond the Exploration-Exploitation Trade-off: A Hidden
State Approach for LLM Reasoning in RLVR", code at github.com/hf618/VERL).

Where the paper's text and the authors' code differ, the code (which produced the published numbers) is the
default here and the difference is named in the docstring.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import NamedTuple, Optional

import torch

from fused_rlvr._validation import as_mask, check_tensor, one_of, positive_finite

SCHEDULES = ("authors", "ema")


def _window(h: torch.Tensor, name: str = "h") -> torch.Tensor:
    check_tensor(name, h)
    if h.dim() != 2:
        raise ValueError(f"{name} must be [T, d] (one response's hidden states), got shape {tuple(h.shape)}")
    if not h.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {h.dtype}")
    return h


def _max_tokens(value, name: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


def _rank_of(x: torch.Tensor, dtype: torch.dtype) -> float:
    if x.shape[0] < 2:
        return 0.0
    x = x.to(dtype)
    s = torch.linalg.svdvals(x - x.mean(dim=0, keepdim=True))
    total = s.sum()
    if not bool(total > 0):
        return 0.0
    p = s / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


@torch.no_grad()
def effective_rank(
    h: torch.Tensor, *, max_tokens: Optional[int] = 512, dtype: torch.dtype = torch.float32
) -> float:
    """ER = exp(-sum_i p_i log p_i), p = s / sum(s), s = singular values of the token-centred h.

    h: [T, d] hidden states of one response (after the final norm). Only the last `max_tokens` tokens are used
    (None: all). Computed in `dtype` (fp32, or fp64 for a reference); zero singular values are skipped in
    the sum (0 log 0 = 0), where the authors' code adds 1e-8 inside the log and to sum(s) (a difference of
    order 1e-7). Fewer than 2 tokens, or tokens that are all equal, give 0.0. ER lies in [1, min(T - 1, d)]
    otherwise: 1 for a rank-1 spread, k for k equal singular values.
    """
    h = _window(h)
    max_tokens = _max_tokens(max_tokens, "max_tokens")
    if max_tokens is not None:
        h = h[-max_tokens:]
    return _rank_of(h, dtype)


class RankDynamics(NamedTuple):
    er: float  # effective rank of the response (see er_max_tokens)
    erv: float  # velocity: mean_j ERV_j
    era: float  # acceleration: mean_j ERA_j


@torch.no_grad()
def erv_era(
    h: torch.Tensor,
    *,
    stride: int = 40,
    min_tokens: int = 80,
    max_tokens: Optional[int] = 512,
    er_max_tokens: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
) -> RankDynamics:
    """(ER, ERV, ERA) of one response's hidden states h [T, d], as the authors' code computes them.

    Window: the last `max_tokens` tokens, L = min(T, max_tokens). If L < min_tokens, ERV = ERA = 0.
    Prefixes: for t = stride, 2 stride, ... while t < L, prefix j = 0, 1, ..., J-1 holds the first t + 1
    tokens of the window (lengths 41, 81, 121, ... for stride 40: the authors slice `[:t+1]`), and
    ER_j = effective_rank(prefix j).
    Velocity: ERV_j = ER_j - mean(ER_0, ..., ER_{j-1}) for j = 1 .. J-1 (no ERV_0: it has no history);
    ERV = mean of ERV_1 .. ERV_{J-1}, or 0 when J < 2.
    Acceleration: ERA_j = ERV_j - ERV_{j-1} for j = 2 .. J-1 (both velocities must exist);
    ERA = mean of ERA_2 .. ERA_{J-1}, or 0 when J < 3 (so ERA needs L > 3 stride, i.e. 121+ tokens).
    ER: effective_rank of the last `er_max_tokens` tokens (default None: the whole response, as the
    authors' "Effective Rank" metric; their velocity/acceleration use the last 512).
    """
    h = _window(h)
    for name, v in (("stride", stride), ("min_tokens", min_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    max_tokens = _max_tokens(max_tokens, "max_tokens")
    er_max_tokens = _max_tokens(er_max_tokens, "er_max_tokens")
    er = _rank_of(h if er_max_tokens is None else h[-er_max_tokens:], dtype)
    win = h if max_tokens is None else h[-max_tokens:]
    length = win.shape[0]
    if length < min_tokens:
        return RankDynamics(er, 0.0, 0.0)
    ranks = [_rank_of(win[: t + 1], dtype) for t in range(stride, length, stride)]
    velocities = [ranks[j] - sum(ranks[:j]) / j for j in range(1, len(ranks))]
    accels = [velocities[j] - velocities[j - 1] for j in range(1, len(velocities))]
    erv = sum(velocities) / len(velocities) if velocities else 0.0
    era = sum(accels) / len(accels) if accels else 0.0
    return RankDynamics(er, erv, era)


@torch.no_grad()
def erv_era_batch(
    hidden: torch.Tensor, mask: torch.Tensor, **kwargs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`erv_era` of each response in a batch: hidden [B, T, d], mask [B, T] (1 on response tokens).

    Returns (er, erv, era), fp32 [B] tensors on hidden's device; keyword arguments go to `erv_era`.
    """
    check_tensor("hidden", hidden)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, d], got shape {tuple(hidden.shape)}")
    m = as_mask("mask", mask, hidden.shape[:2]) > 0
    out = [erv_era(hidden[i][m[i]], **kwargs) for i in range(hidden.shape[0])]
    cols = list(zip(*out)) if out else [(), (), ()]
    return tuple(torch.tensor(c, dtype=torch.float32, device=hidden.device) for c in cols)


class ShapingStats(NamedTuple):
    """Detached per-response values of one shaping call (all [B] tensors, fp32)."""

    aux: torch.Tensor  # tau tanh(d_ER) + (1 - tau) tanh(d_ERV); 0 on an unshaped call
    bonus: torch.Tensor  # relu(aux) before the |A| / kappa cap
    tau: torch.Tensor
    d_er: torch.Tensor
    d_erv: torch.Tensor
    d_era: torch.Tensor
    shaped: bool  # False on the first call of the "authors" schedule (no baseline yet)


class EffectiveRankShaper:
    """Advantage shaping from (ER, ERV, ERA) against moving means, as in the authors' code.

    Per response, with x in (ER, ERV, ERA) and its moving mean mu_x:
        d_x = clamp((x - mu_x) / (|mu_x| + eps), -clip, clip)
        tau = sigmoid(gain * d_ERA)
        aux = tau * tanh(d_ER) + (1 - tau) * tanh(d_ERV)
        A'  = A + min(relu(aux), |A| / kappa)
    Defaults (the authors' train.sh): momentum 0.7 (mu <- 0.7 mu + 0.3 batch mean), gain 2, kappa 2, clip 5.

    Order of update (hf618/VERL, RewardManager.__call__ + ray_trainer.fit): d uses mu BEFORE the update, and
    the update comes after the shaping. The authors' schedule has two more details, kept by the default
    schedule="authors":
      - mu starts at 0 and the first call is not shaped (their step 1 has no previous metrics), so the
        second call compares against mu = 0 (every d saturates at +-clip);
      - the batch mean folded into mu is that of the PREVIOUS call (they read it from the last step's logged
        metrics), so call t uses mu built from the means of calls 1 .. t-2.
    schedule="ema" is the plain reading of the paper: the first call initialises mu to its own batch means;
    every call computes d against mu before folding in its own batch means.

    `advantages` may be [B] or [B, T] (the bonus of response i is capped by |A| element-wise, so padded
    tokens with A = 0 get nothing). The authors add the bonus at each response's LAST token only (their aux
    reward lives in a token-level reward tensor at the final position); to reproduce that, pass the
    last-token advantages or mask the returned bonus yourself.
    """

    def __init__(
        self,
        *,
        momentum: float = 0.7,
        gain: float = 2.0,
        kappa: float = 2.0,
        clip: float = 5.0,
        eps: float = 1e-8,
        schedule: str = "authors",
    ):
        if isinstance(momentum, bool) or not isinstance(momentum, Real) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.gain = positive_finite("gain", gain)
        self.kappa = positive_finite("kappa", kappa)
        self.clip = positive_finite("clip", clip)
        self.eps = positive_finite("eps", eps)
        one_of("schedule", schedule, SCHEDULES)
        self.schedule = schedule
        self.mu: Optional[list[float]] = [0.0, 0.0, 0.0] if schedule == "authors" else None
        self.pending: Optional[list[float]] = None  # "authors": the previous call's batch means
        self.calls = 0

    def _fold(self, means: list[float]) -> None:
        m = self.momentum
        self.mu = [m * mu + (1 - m) * x for mu, x in zip(self.mu, means)]

    def __call__(
        self, advantages: torch.Tensor, er: torch.Tensor, erv: torch.Tensor, era: torch.Tensor
    ) -> tuple[torch.Tensor, ShapingStats]:
        """(shaped advantages, ShapingStats); updates the moving means (see the class docstring)."""
        check_tensor("advantages", advantages)
        if advantages.dim() not in (1, 2) or not advantages.is_floating_point():
            raise ValueError(
                f"advantages must be a floating [B] or [B, T] tensor, got {advantages.dtype} "
                f"shape {tuple(advantages.shape)}"
            )
        b = advantages.shape[0]
        xs = []
        for name, x in (("er", er), ("erv", erv), ("era", era)):
            check_tensor(name, x)
            if tuple(x.shape) != (b,):
                raise ValueError(
                    f"{name} must be [B] = ({b},) like advantages' first dim, got {tuple(x.shape)}"
                )
            xs.append(x.detach().to(device=advantages.device, dtype=torch.float32))
        means = [float(x.mean()) if b else 0.0 for x in xs]
        if self.schedule == "ema" and self.mu is None:
            self.mu = list(means)
        shaped = not (self.schedule == "authors" and self.pending is None)
        d = [((x - mu) / (abs(mu) + self.eps)).clamp(-self.clip, self.clip) for x, mu in zip(xs, self.mu)]
        tau = torch.sigmoid(self.gain * d[2])
        aux = tau * torch.tanh(d[0]) + (1 - tau) * torch.tanh(d[1])
        if not shaped:
            aux = torch.zeros_like(aux)
        bonus = torch.relu(aux)
        cap = advantages.detach().abs().float() / self.kappa
        add = torch.minimum(bonus if advantages.dim() == 1 else bonus[:, None], cap)
        out = advantages + add.to(advantages.dtype)
        # the update comes after the shaping: d above used mu before it
        if self.schedule == "authors":
            if self.pending is not None:
                self._fold(self.pending)
            self.pending = means
        else:
            self._fold(means)
        self.calls += 1
        return out, ShapingStats(aux, bonus, tau, d[0], d[1], d[2], shaped)

    def state_dict(self) -> dict:
        """Plain-Python state (JSON- and torch.save-able): hyper-parameters, moving means, pending means."""
        return {
            "momentum": self.momentum,
            "gain": self.gain,
            "kappa": self.kappa,
            "clip": self.clip,
            "eps": self.eps,
            "schedule": self.schedule,
            "mu": None if self.mu is None else list(self.mu),
            "pending": None if self.pending is None else list(self.pending),
            "calls": self.calls,
        }

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.state_dict()) - set(state)
        if missing:
            raise KeyError(f"state is missing {sorted(missing)}")
        fresh = EffectiveRankShaper(
            momentum=state["momentum"],
            gain=state["gain"],
            kappa=state["kappa"],
            clip=state["clip"],
            eps=state["eps"],
            schedule=state["schedule"],
        )
        for key in ("mu", "pending"):
            v = state[key]
            if v is not None and (len(v) != 3 or not all(isinstance(x, Real) for x in v)):
                raise ValueError(f"state[{key!r}] must be None or 3 numbers (ER, ERV, ERA), got {v!r}")
        self.__dict__.update(fresh.__dict__)
        self.mu = None if state["mu"] is None else [float(x) for x in state["mu"]]
        self.pending = None if state["pending"] is None else [float(x) for x in state["pending"]]
        self.calls = int(state["calls"])
