"""Phases 1-6 of a training step: the batch of verified, filtered groups the update trains on.

    1. sample prompts (this process's share of those all processes draw)
    2. roll out G samples each            3. verify (the task's checker)
    4. extra rollouts the hooks ask for (DARS depth, guidance)        5. rewards from the hooks (RLPR)
    6. group filters (uniform groups, the hooks' keep_groups: RLPR's std filter); new prompts through phases
       2-5 refill the dropped groups while refill rounds remain

All of it runs on the gathered model (no collective inside generation or scoring); the refill rounds are
counted over all processes (`Parallel.refill_split`), so each runs as many.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Any

import torch

from fused_rlvr.train.rollout import RolloutBatch

if TYPE_CHECKING:  # pragma: no cover
    from fused_rlvr.train.config import TrainConfig
    from fused_rlvr.train.hooks import Hook, RolloutRequest, StepContext
    from fused_rlvr.train.parallel import Parallel
    from fused_rlvr.train.policy import Policy
    from fused_rlvr.train.tasks import Problem


class RolloutCollector:
    """Collects one step's batch from the policy, the task and the hooks (a list shared with the trainer)."""

    def __init__(self, cfg: TrainConfig, policy: Policy, task, hooks: list[Hook], parallel: Parallel):
        self.cfg, self.policy, self.task, self.hooks, self.parallel = cfg, policy, task, hooks, parallel

    def rollouts(self, ctx: StepContext, problems: list[Problem]) -> RolloutBatch:
        """Phases 2-3: G samples of each problem, verified."""
        g = self.cfg.group_size
        prompts = [self.policy.prompt_ids(p.question) for p in problems]
        ids, texts, trunc = self.policy.generate([p for p in prompts for _ in range(g)])
        batch = RolloutBatch(
            problems=problems,
            prompt_ids=prompts,
            group=torch.arange(len(problems)).repeat_interleave(g),
            response_ids=ids,
            texts=texts,
            truncated=torch.tensor(trunc, dtype=torch.bool),
            tags=["base"] * len(ids),
        )
        batch.rewards = ctx.verify(batch, range(len(batch)))
        return batch

    def extra_rollouts(self, ctx: StepContext, batch: RolloutBatch, requests: list[RolloutRequest]) -> None:
        """Phase 4: the requested samples join their groups, verified (generated from `gen_prompt` if set,
        packed and scored under the group's own prompt)."""
        prompts, groups, tags = [], [], []
        for r in requests:
            if not 0 <= r.group < batch.n_groups or r.n < 0:
                raise ValueError(
                    f"a hook asked for {r.n} rollouts in group {r.group}; "
                    f"the batch has {batch.n_groups} groups"
                )
            p = (
                batch.prompt_ids[r.group]
                if r.gen_prompt is None
                else self.policy.text_prompt_ids(r.gen_prompt)
            )
            prompts += [p] * r.n
            groups += [r.group] * r.n
            tags += [r.tag] * r.n
        if prompts:
            n0 = len(batch)
            batch.extend(groups, *self.policy.generate(prompts), tags)
            batch.rewards = torch.cat([batch.rewards, ctx.verify(batch, range(n0, len(batch)))])

    def hook_rollouts_and_rewards(self, ctx: StepContext, batch: RolloutBatch) -> None:
        """Phases 4-5."""
        self.extra_rollouts(ctx, batch, [r for h in self.hooks for r in h.extra_rollouts(ctx, batch)])
        for h in self.hooks:
            batch.rewards = h.rewards(ctx, batch, batch.rewards)

    def keep_groups(self, ctx: StepContext, batch: RolloutBatch) -> torch.Tensor:
        """bool [n_groups]: not uniform (when drop_uniform_groups) and kept by every hook's keep_groups."""
        keep = torch.ones(batch.n_groups, dtype=torch.bool)
        if self.cfg.drop_uniform_groups:
            for g in range(batch.n_groups):
                keep[g] = batch.rewards[batch.group_rows(g)].unique().numel() > 1
        for h in self.hooks:
            k = h.keep_groups(ctx, batch)
            if k is not None:
                k = torch.as_tensor(k, dtype=torch.bool).flatten().cpu()
                if k.numel() != batch.n_groups:
                    raise ValueError(
                        f"hook {h.name!r}: keep_groups returned {k.numel()} values for "
                        f"{batch.n_groups} groups"
                    )
                keep &= k
        return keep

    def collect(self, ctx: StepContext, data_rng: random.Random) -> tuple[RolloutBatch, dict[str, Any]]:
        """Phases 1-6: (the batch, its metrics: rewards and lengths of the first rollouts, groups dropped,
        refill rounds, samples and groups kept)."""
        c, par, t0 = self.cfg, self.parallel, time.time()
        batch = self.rollouts(ctx, par.share(self.task.sample(data_rng, c.prompts_per_step)))
        rec: dict[str, Any] = {
            "reward_mean": float(batch.rewards.mean()),
            "reward_std": float(batch.rewards.std()) if len(batch) > 1 else 0.0,
            "response_length": float(batch.response_lengths().mean()),
            "truncated_frac": float(batch.truncated.float().mean()),
        }
        self.hook_rollouts_and_rewards(ctx, batch)
        keep = self.keep_groups(ctx, batch)
        dropped, rounds = int((~keep).sum()), 0
        batch = batch.select_groups(keep)
        target = par.per_process(c.prompts_per_step)
        missing = par.refill_split(target - batch.n_groups) if c.refill_rounds else (0, slice(0))
        while (
            missing[0] and rounds < c.refill_rounds
        ):  # every process draws all missing prompts, keeps its own
            rounds += 1
            new = self.rollouts(ctx, self.task.sample(data_rng, missing[0])[missing[1]])
            if len(new):
                self.hook_rollouts_and_rewards(ctx, new)
                keep = self.keep_groups(ctx, new)
                dropped += int((~keep).sum())
                batch = batch.concat(new.select_groups(keep))
            missing = par.refill_split(target - batch.n_groups)
        rec.update(groups_dropped=float(dropped), refill_rounds=float(rounds))
        rec.update(n_samples=len(batch), n_groups=batch.n_groups, time_rollout=time.time() - t0)
        return batch, rec
