"""DARS depth: extra rollouts for hard prompts, joining their groups (docs/methods.md, section 5)."""

from __future__ import annotations

import math
from fractions import Fraction

from fused_rlvr.train.hooks.base import Hook, RolloutRequest


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

    def extra_rollouts(self, ctx, batch):
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
