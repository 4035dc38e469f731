"""The divergence guard: no update from a non-finite loss or gradient, no checkpoint of non-finite weights."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence

import torch


class NonFiniteError(RuntimeError):
    """Updates with a non-finite loss or gradient norm in a row, or a model with non-finite weights."""


class UpdateGuard:
    """`allows(loss, norm)` before each optimizer step: False (with a warning) when either is not finite, so
    the caller drops the gradients and leaves the optimizer as it is; the `max_bad` -th such update in a row
    raises NonFiniteError. `bad` (the current run of skipped updates) is part of the checkpoint."""

    def __init__(self, max_bad: int, *, lr: float, verbose: bool = True):
        self.max_bad, self.lr, self.verbose = max_bad, lr, verbose
        self.bad = 0

    def allows(self, loss: float, norm: float, step: int) -> bool:
        if math.isfinite(loss) and math.isfinite(norm):
            self.bad = 0
            return True
        self.bad += 1
        what = f"loss {loss:.4g}, gradient norm {norm:.4g}"
        if self.bad >= self.max_bad:
            raise NonFiniteError(
                f"step {step}: {self.bad} optimizer updates in a row had a non-finite loss or gradient norm "
                f"(last: {what}; max_bad_updates={self.max_bad}): the run stops. Lower --lr (now {self.lr}) "
                "or --entropy-coef; the checkpoints on disk are untouched"
            )
        if self.verbose:
            print(f"step {step}: non-finite update skipped ({what}; {self.bad} in a row)", file=sys.stderr)
        return False


def check_finite_weights(
    params: Sequence[torch.Tensor], step: int, where: str, all_true: Callable[[bool], bool] = bool
) -> None:
    """Raise NonFiniteError unless every parameter (this process's shards; `all_true` agrees over the
    processes) is finite: a checkpoint of `step` must not replace good ones in `where`."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    if not all_true(all(bool(torch.isfinite(p).all()) for p in local)):
        raise NonFiniteError(
            f"step {step}: the model's weights are not all finite: no checkpoint is written (those in "
            f"{where} are untouched)"
        )
