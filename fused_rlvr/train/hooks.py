"""Hooks: what the seed papers add to the loop, without branches in the loop.

A hook overrides any of the methods below; the trainer calls every hook at the matching phase, in order.
Hooks with state (moving averages, caches, thresholds) return it from `state_dict` and get it back from
`load_state_dict`: it is part of every checkpoint, so `--resume` continues exactly.

    class MyReward(Hook):
        def rewards(self, trainer, batch, rewards):        # may call trainer.score(...) (policy log-probs)
            return rewards + 0.1 * batch.response_lengths().lt(8).float()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from fused_rlvr.train.rollout import RolloutBatch
    from fused_rlvr.train.trainer import Trainer


@dataclass(frozen=True)
class RolloutRequest:
    """Ask for `n` more samples in group `group`. `gen_prompt` (text) replaces the prompt used for
    generation only (guidance): the samples are scored, and join the group, under the group's own prompt."""

    group: int
    n: int
    gen_prompt: Optional[str] = None
    tag: str = "extra"


class Hook:
    name = "hook"

    def extra_rollouts(self, trainer: Trainer, batch: RolloutBatch) -> list[RolloutRequest]:
        """After the first rollouts are verified: more samples for some groups (DARS, guidance)."""
        return []

    def rewards(self, trainer: Trainer, batch: RolloutBatch, rewards: torch.Tensor) -> torch.Tensor:
        """Replace or adjust the [B] rewards (verifier outcomes on entry). May score with the policy."""
        return rewards

    def keep_groups(self, trainer: Trainer, batch: RolloutBatch) -> Optional[torch.Tensor]:
        """After the reward hooks: a bool [n_groups] tensor, False for groups to drop (e.g. RLPR's reward-std
        filter), or None to keep them all. Every hook sees every candidate group; a group is kept only if
        no hook (and not `drop_uniform_groups`) drops it. When groups are dropped and `refill_rounds`
        allows, the trainer samples new prompts for the missing groups, rolls them out, verifies them, runs
        the extra-rollout and reward hooks on them and asks this method again about the new groups only."""
        return None

    def advantages(self, trainer: Trainer, batch: RolloutBatch, advantages: torch.Tensor) -> torch.Tensor:
        """Shape the [B] (or [B, T]) advantages."""
        return advantages

    def extra_loss(self, trainer: Trainer, batch: RolloutBatch) -> Optional[torch.Tensor]:
        """An extra differentiable loss added once per optimizer step (e.g. DPO on guided pairs)."""
        return None

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def dars_extra(correct: int, n: int, schedule: str) -> int:
    """DARS extra rollouts for a prompt with `correct` of `n` pre-rollouts right (docs/methods.md, section 5).

    a = correct / n (a = 0 counts as 0.5 / n); only prompts with a < 0.5 get extras.
    Equal treatment ("et"): ceil(n / (4 a (1 - a)) - n), capped at 32 - n.
    Hardness weighted ("hw"): ceil(n / (2 a) - n), capped at 64 - n. Exact rational arithmetic.
    """
    if schedule not in ("et", "hw"):
        raise ValueError(f"DARS schedule must be 'et' or 'hw', got {schedule!r}")
    if not (0 <= correct <= n) or n < 1:
        raise ValueError(f"DARS needs 0 <= correct <= n and n >= 1, got correct={correct}, n={n}")
    a = Fraction(correct, n) if correct else Fraction(1, 2 * n)
    if a >= Fraction(1, 2):
        return 0
    if schedule == "et":
        dn, cap = n / (4 * a * (1 - a)) - n, 32 - n
    else:
        dn, cap = n / (2 * a) - n, 64 - n
    return max(0, min(math.ceil(dn), cap))


class DarsHook(Hook):
    """DARS depth: extra rollouts for hard prompts, joining their groups (variable group sizes)."""

    name = "dars"

    def __init__(self, schedule: str = "et"):
        dars_extra(0, 1, schedule)  # validates
        self.schedule = schedule
        self._last = {"dars_extra_rollouts": 0.0}

    def extra_rollouts(self, trainer, batch):
        out = []
        for g in range(batch.n_groups):
            rows = batch.group_rows(g)
            n = len(rows)
            c = int((batch.rewards[rows] > 0.5).sum())
            dn = dars_extra(c, n, self.schedule)
            if dn:
                out.append(RolloutRequest(group=g, n=dn, tag="dars"))
        self._last = {"dars_extra_rollouts": float(sum(r.n for r in out))}
        return out

    def metrics(self):
        return dict(self._last)
