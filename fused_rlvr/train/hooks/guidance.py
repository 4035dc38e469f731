"""Agent-RLVR guidance (docs/methods.md, section 5): failed prompts are re-attempted with the verifier's
feedback and a plan hint; the guided samples join their group (GRPO) or feed a DPO loss."""

from __future__ import annotations

from itertools import cycle
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch

from fused_rlvr.dpo import linear_dpo_loss
from fused_rlvr.train.hooks.base import Hook, PerStep, RolloutRequest
from fused_rlvr.train.tasks import plan_hint, verifier_feedback

if TYPE_CHECKING:  # pragma: no cover
    from fused_rlvr.train.hooks.base import StepContext
    from fused_rlvr.train.rollout import RolloutBatch


class _Pairs(NamedTuple):
    batch: RolloutBatch
    chosen: torch.Tensor  # [P] rows
    rejected: torch.Tensor  # [P] rows
    ref_chosen: torch.Tensor  # [P] fp32 pre-update policy's sequence log-probs of the chosen rows
    ref_rejected: torch.Tensor  # [P]


class GuidanceHook(Hook):
    """Agent-RLVR guidance: a group whose samples all failed gets `samples` more, generated from a guided
    prompt (the question, the verifier's feedback on the failed attempts, a plan hint unless hint=False,
    the usual suffix; `guided_prompt`) and tagged "guided". They join the group under its own, unguided
    prompt: the trainer packs and scores every sample with the group's prompt, so the policy learns to
    produce the guided answer without the guidance.

    mode="grpo": the guided samples are ordinary group members (verified, in the group baseline).
    mode="dpo": the groups that received guidance leave the policy-gradient loss (their advantages are set
    to 0: unguided, such a group had no signal anyway) and a DPO loss is added instead, on fused sequence
    log-probs under the unguided prompt: each guided success (chosen) is paired with a failed sample of the
    same group (rejected; the unguided failures, cycled), the reference being the pre-update policy's
    sequence log-probs taken before the first optimizer step of the batch. loss = coef * dpo_loss, the
    mean over the pairs of all processes (each process adds its pairs' share).
    Success is the task verifier's outcome (whatever reward hooks do afterwards).
    """

    name = "guidance"

    def __init__(
        self, mode: str = "grpo", samples: int = 4, beta: float = 0.1, coef: float = 1.0, hint: bool = True
    ):
        if mode not in ("grpo", "dpo"):
            raise ValueError(f"guidance mode must be 'grpo' or 'dpo', got {mode!r}")
        self.mode, self.samples, self.beta, self.coef = mode, int(samples), float(beta), float(coef)
        self.hint = bool(hint)
        self._pairs: Optional[_Pairs] = None
        self._m = PerStep()
        self._dpo: dict[str, float] = {}

    def guided_prompt(self, ctx: StepContext, batch: RolloutBatch, g: int) -> str:
        p = batch.problems[g]
        texts = [batch.texts[int(i)] for i in batch.group_rows(g)]
        parts = [p.question, verifier_feedback(ctx.verifier, texts)]
        hint = plan_hint(p.question) if self.hint else None
        if hint:
            parts.append(hint)
        return "\n".join(parts) + ctx.config.prompt_suffix

    def extra_rollouts(self, ctx, batch):
        out = []
        for g in range(batch.n_groups):
            if not bool((batch.rewards[batch.group_rows(g)] > 0.5).any()):
                out.append(RolloutRequest(g, self.samples, self.guided_prompt(ctx, batch, g), "guided"))
        self._m.at(ctx.step).add(groups=batch.n_groups, guided_groups=len(out))
        return out

    def rewards(self, ctx, batch, rewards):
        rows = [i for i, t in enumerate(batch.tags) if t == "guided"]
        if rows:
            self._m.at(ctx.step).add(guided=len(rows), guided_ok=ctx.verify(batch, rows).sum())
        return rewards

    def pairs(self, ctx: StepContext, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen rows, rejected rows) of the DPO pairs in `batch` (see the class docstring)."""
        chosen, rejected = [], []
        guided = torch.tensor([t == "guided" for t in batch.tags], dtype=torch.bool)
        for g in sorted(set(batch.group[guided].tolist())):
            rows = batch.group_rows(g)
            ok = ctx.verify(batch, rows.tolist()) > 0.5
            good = rows[guided[rows] & ok].tolist()
            bad = rows[~guided[rows] & ~ok].tolist() or rows[guided[rows] & ~ok].tolist()
            if good and bad:
                chosen += good
                rejected += [r for r, _ in zip(cycle(bad), good)]
        return torch.tensor(chosen, dtype=torch.long), torch.tensor(rejected, dtype=torch.long)

    def _prepare(self, ctx: StepContext, batch: RolloutBatch) -> _Pairs:
        if self._pairs is None or self._pairs.batch is not batch:
            chosen, rejected = self.pairs(ctx, batch)
            ref = [lp.sum() for lp in ctx.score.logprobs(batch, torch.cat([chosen, rejected]))[0]]
            ref = torch.stack(ref) if ref else torch.zeros(0)
            self._pairs = _Pairs(batch, chosen, rejected, ref[: len(chosen)], ref[len(chosen) :])
        return self._pairs

    def advantages(self, ctx, batch, adv):
        if self.mode != "dpo":
            return adv
        guided_groups = batch.group[torch.tensor([t == "guided" for t in batch.tags], dtype=torch.bool)]
        adv = adv.clone()
        adv[torch.isin(batch.group, guided_groups).to(adv.device)] = 0.0
        self._prepare(ctx, batch)  # reference log-probs: the policy before this batch's update
        return adv

    def extra_loss(self, ctx, batch):
        if self.mode != "dpo":
            return None
        pr = self._prepare(ctx, batch)
        n_pairs = len(pr.chosen)
        total = ctx.global_sum(float(n_pairs))  # every process asks, pairs or not
        if n_pairs == 0:
            self._dpo = {"dpo_pairs": 0.0}
            return None if total == 0 else ctx.zero_loss()  # another process has pairs: join its forward
        cfg = ctx.config
        ref = torch.cat([pr.ref_chosen, pr.ref_rejected])

        def dpo(out):
            return linear_dpo_loss(
                out.hidden,
                out.head.weight,
                out.targets,
                out.mask,
                ref.to(out.hidden.device),
                beta=self.beta,
                bias=out.head.bias,
                temperature=cfg.temperature,
                softcap=out.head.softcap,
                backend=cfg.backend,
            )

        loss, st = ctx.policy_loss(batch, torch.cat([pr.chosen, pr.rejected]), dpo)
        self._dpo = {
            "dpo_loss": float(st.loss),
            "dpo_pairs": float(st.n_pairs),
            "dpo_accuracy": float(st.accuracy),
            "dpo_margin": float(st.reward_margin),
        }
        return self.coef * (loss * (n_pairs / total))

    def metrics(self):
        m = self._m
        out = {
            "guided_groups": m.sums.get("guided_groups", 0.0),
            "guided_group_frac": m.ratio("guided_groups", "groups"),
            "guided_samples": m.sums.get("guided", 0.0),
            "guided_success_rate": m.ratio("guided_ok", "guided"),
        }
        if self.mode == "dpo":
            out.update(self._dpo)
        return out
