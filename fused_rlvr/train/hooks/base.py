"""The hook interface: what a method adds to the loop, and the `StepContext` it works with.

A hook overrides any of the `Hook` methods; the trainer calls every hook at the matching phase, in order,
with a `StepContext` (never the trainer). Hooks with state (moving averages, caches, thresholds) return it
from `state_dict` as plain Python values and get it back from `load_state_dict`: it is part of every
checkpoint, so `--resume` continues exactly.

    class ShortAnswerBonus(Hook):
        def rewards(self, ctx, batch, rewards):
            return rewards + 0.1 * batch.response_lengths().lt(8).float()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from fused_rlvr.train.config import TrainConfig
    from fused_rlvr.train.policy import ForwardOutputs, Policy
    from fused_rlvr.train.rollout import RolloutBatch
    from fused_rlvr.train.scoring import Scorer
    from fused_rlvr.train.tasks import Verifier


def _identity(value: float) -> float:
    return value


@dataclass(frozen=True)
class StepContext:
    """What a hook may use during one training step.

    Under FSDP2 every process runs its own hooks on its own groups; the policy is gathered while rollouts,
    rewards, filters and advantages run, so `score` needs no collective. `policy_loss`, `zero_loss` and
    `global_sum` are collectives: every process calls them as often, in the same order (an extra loss
    agrees with `global_sum` whether any process has work; a process without any runs `zero_loss`)."""

    step: int  # training steps completed before this one (0 during the first)
    config: TrainConfig
    tokenizer: Any  # the policy's (Hugging Face) tokenizer
    verifier: Verifier  # the task's checker: verifier(text, answer) -> 0/1; .final_answer(text)
    verify: Callable[[RolloutBatch, Sequence[int]], torch.Tensor]  # fp32 verifier outcomes of some rows
    score: Scorer  # no-grad fused passes of the policy (or of model=...): log-probs, answer scores, states
    # policy_loss(batch, rows, fn) -> fn(ForwardOutputs): a loss with gradients through the policy, run as its
    # root forward (the only way a hook may read the lm-head weight with gradients)
    policy_loss: Callable[[RolloutBatch, torch.Tensor, Callable[[ForwardOutputs], Any]], Any]
    # zero_loss() -> 0-dim tensor: the same root forward on one pad token, times 0 (an exactly zero gradient):
    # what a process without rows of its own computes while another computes policy_loss
    zero_loss: Callable[[], torch.Tensor]
    global_sum: Callable[[float], float] = _identity  # a number summed over the processes

    @classmethod
    def of(
        cls,
        policy: Policy,
        verifier: Verifier,
        *,
        step: int = 0,
        verify: Optional[Callable[[RolloutBatch, Sequence[int]], torch.Tensor]] = None,
        global_sum: Callable[[float], float] = _identity,
    ) -> StepContext:
        """The context of `policy` at `step`; `verify` defaults to `verifier` applied row by row."""
        return cls(
            step=step,
            config=policy.cfg,
            tokenizer=policy.tok,
            verifier=verifier,
            verify=verify or (lambda batch, rows: batch.verified(verifier, rows)),
            score=policy.scorer,
            policy_loss=policy.loss,
            zero_loss=policy.zero_loss,
            global_sum=global_sum,
        )


@dataclass(frozen=True)
class RolloutRequest:
    """Ask for `n` more samples in group `group`. `gen_prompt` (text) replaces the prompt used for
    generation only (guidance): the samples are scored, and join the group, under the group's own prompt."""

    group: int
    n: int
    gen_prompt: Optional[str] = None
    tag: str = "extra"


class Hook:
    """A method added to the loop; every method has a do-nothing default."""

    name = "hook"

    def extra_rollouts(self, ctx: StepContext, batch: RolloutBatch) -> list[RolloutRequest]:
        """After the first rollouts are verified: more samples for some groups (DARS, guidance)."""
        return []

    def rewards(self, ctx: StepContext, batch: RolloutBatch, rewards: torch.Tensor) -> torch.Tensor:
        """Replace or adjust the [B] rewards (verifier outcomes on entry). May score with `ctx.score`."""
        return rewards

    def keep_groups(self, ctx: StepContext, batch: RolloutBatch) -> Optional[torch.Tensor]:
        """After the reward hooks: a bool [n_groups] tensor, False for groups to drop (e.g. RLPR's reward-std
        filter), or None to keep them all. Every hook sees every candidate group; a group is kept only if
        no hook (and not `drop_uniform_groups`) drops it. When groups are dropped and `refill_rounds`
        allows, the trainer samples new prompts for the missing groups, rolls them out, verifies them, runs
        the extra-rollout and reward hooks on them and asks this method again about the new groups only."""
        return None

    def advantages(self, ctx: StepContext, batch: RolloutBatch, advantages: torch.Tensor) -> torch.Tensor:
        """Shape the [B] (or [B, T-1]) advantages."""
        return advantages

    def extra_loss(self, ctx: StepContext, batch: RolloutBatch) -> Optional[torch.Tensor]:
        """An extra differentiable loss added once per optimizer step (e.g. DPO on guided pairs), computed
        through `ctx.policy_loss` (or `ctx.zero_loss` on a process without work while another has some; see
        StepContext); a loss computed there must be returned: its backward is due. None: no loss on any
        process."""
        return None

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class PerStep:
    """Sums of metrics over every call a hook gets within one training step (refill rounds call the reward
    and filter hooks several times); starts afresh when the step changes."""

    def __init__(self):
        self.step: Optional[int] = None
        self.sums: dict[str, float] = {}

    def at(self, step: int) -> PerStep:
        if step != self.step:
            self.step, self.sums = step, {}
        return self

    def add(self, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def ratio(self, num: str, den: str) -> float:
        d = self.sums.get(den, 0.0)
        return self.sums.get(num, 0.0) / d if d else float("nan")
