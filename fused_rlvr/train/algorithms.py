"""The policy losses the trainer can run, one object per algorithm.

An algorithm builds its loss module once from the config (the single place where config fields become loss
arguments) and owns what differs between losses in the update phase:

- `divisor(n_tokens, n_seqs)`: the whole-minibatch normaliser every micro-batch divides by, so that the
  micro-batch losses add up to the minibatch's loss whatever the micro-batch size;
- `minibatches(batch, k)` / `micro_batches(batch, rows, size)`: how a rollout batch is split (PACS keeps
  groups whole: its baselines are within a group);
- `loss(out, batch, divisor)`: the loss of one micro-batch from the policy's forward outputs and the batch's
  trajectory (advantages, old and reference log-probs; see `RolloutBatch`).

Adding a loss is one subclass registered in ALGORITHMS and its name among `TrainConfig.algorithm`'s choices
(the config does not import this module: algorithms are built from a config, not the other way round).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fused_rlvr.advantages import SteerConfig
from fused_rlvr.grpo import loss_divisor
from fused_rlvr.modules import LinearGRPOLoss, LinearPACSLoss

if TYPE_CHECKING:  # pragma: no cover
    from fused_rlvr.train.config import TrainConfig
    from fused_rlvr.train.policy import ForwardOutputs
    from fused_rlvr.train.rollout import RolloutBatch


class Algorithm:
    """What the update phase asks of a policy loss (GRPO's rules are the defaults)."""

    name: ClassVar[str] = ""

    def __init__(self, cfg: TrainConfig, *, softcap: float | None = None):
        self.cfg = cfg
        self.softcap = softcap

    def needs_old_logprobs(self) -> bool:
        """Whether the update reads the pre-update policy's log-probs (several updates per batch)."""
        return self.cfg.epochs * self.cfg.minibatches > 1

    def divisor(self, n_tokens: float, n_seqs: float) -> float:
        return loss_divisor(self.cfg.loss_agg, n_tokens, n_seqs, self.cfg.max_new_tokens)

    def minibatches(self, batch: RolloutBatch, k: int) -> list[torch.Tensor]:
        """Rows of each non-empty minibatch (one optimizer step each), shuffled when k > 1."""
        order = torch.randperm(len(batch)) if k > 1 else torch.arange(len(batch))
        return [rows for rows in order.tensor_split(k) if len(rows)]

    def micro_batches(self, batch: RolloutBatch, rows: torch.Tensor, size: int) -> list[torch.Tensor]:
        return [rows[s : s + size] for s in range(0, len(rows), size)]

    def loss(
        self, out: ForwardOutputs, batch: RolloutBatch, divisor: float
    ) -> tuple[torch.Tensor, dict[str, float], int]:
        """(loss of the micro-batch `out.rows` already divided by `divisor`, its stats, its token count)."""
        raise NotImplementedError


class GRPO(Algorithm):
    """The GRPO family (`fused_rlvr.LinearGRPOLoss`): clipped surrogate on group advantages, optional KL to
    the initial policy, entropy bonus, STEER weights, any of the eight aggregations."""

    name = "grpo"
    STAT_KEYS = (
        "loss",
        "pg_loss",
        "kl_loss",
        "clip_frac_low",
        "clip_frac_high",
        "clip_frac_dual",
        "approx_kl",
        "ref_kl",
        "mean_ratio",
        "mean_entropy",
        "steer_weight_mean",
    )

    def __init__(self, cfg: TrainConfig, *, softcap: float | None = None):
        super().__init__(cfg, softcap=softcap)
        self.module = LinearGRPOLoss(**self.loss_arguments(cfg, softcap))

    @staticmethod
    def loss_arguments(cfg: TrainConfig, softcap: float | None) -> dict[str, Any]:
        """The config fields as LinearGRPOLoss arguments: the one place that maps one to the other."""
        steer = None if cfg.steer is None else SteerConfig(mode=cfg.steer, lambda_min=cfg.steer_lambda_min)
        return dict(
            policy_loss=cfg.policy_loss,
            sapo_tau_pos=cfg.sapo_tau_pos,
            sapo_tau_neg=cfg.sapo_tau_neg,
            beta=cfg.beta,
            kl=cfg.kl,
            eps_low=cfg.eps_low,
            eps_high=cfg.cispo_cap
            if cfg.policy_loss == "cispo"
            else cfg.eps_high,  # cispo: a cap on r itself
            dual_clip=cfg.dual_clip,
            importance=cfg.importance,
            agg=cfg.loss_agg,
            entropy_coef=cfg.entropy_coef,
            steer=steer,
            temperature=cfg.temperature,
            softcap=softcap,
            backend=cfg.backend,
        )

    def loss(self, out, batch, divisor):
        rows, mask = out.rows, out.mask
        loss, st = self.module(
            out.hidden,
            out.head.weight,
            out.targets,
            batch.advantages[rows].to(mask.device),
            mask,
            old_logprobs=batch.on_tokens(batch.old_logprobs, rows, mask),
            ref_logprobs=batch.on_tokens(batch.ref_logprobs, rows, mask),
            bias=out.head.bias,
            normalizer=divisor,
            max_len=self.cfg.max_new_tokens,
        )
        return loss, {k: float(getattr(st, k)) for k in self.STAT_KEYS}, int(st.n_tokens)


class PACS(Algorithm):
    """PACS (`fused_rlvr.LinearPACSLoss`): the verifier outcome as a classification target of the policy's
    within-group baselined score; averages over sequences and always reads the pre-update log-probs."""

    name = "pacs"

    def __init__(self, cfg: TrainConfig, *, softcap: float | None = None):
        super().__init__(cfg, softcap=softcap)
        self.module = LinearPACSLoss(
            beta=cfg.pacs_beta,
            baseline=cfg.advantage,
            temperature=cfg.temperature,
            softcap=softcap,
            backend=cfg.backend,
        )

    def needs_old_logprobs(self) -> bool:
        return True

    def divisor(self, n_tokens, n_seqs):
        return n_seqs

    def minibatches(self, batch, k):
        groups = torch.randperm(batch.n_groups) if k > 1 else torch.arange(batch.n_groups)
        parts = [torch.nonzero(torch.isin(batch.group, gs)).flatten() for gs in groups.tensor_split(k)]
        return [rows for rows in parts if len(rows)]

    def micro_batches(self, batch, rows, size):
        out, cur = [], []
        for g in sorted(set(batch.group[rows].tolist())):
            members = rows[batch.group[rows] == g].tolist()
            if cur and len(cur) + len(members) > size:
                out.append(torch.tensor(cur))
                cur = []
            cur += members
        if cur:
            out.append(torch.tensor(cur))
        return out

    def loss(self, out, batch, divisor):
        rows, mask = out.rows, out.mask
        loss, st = self.module(
            out.hidden,
            out.head.weight,
            out.targets,
            batch.rewards[rows].to(mask.device),
            mask,
            batch.group[rows].to(mask.device),
            old_logprobs=batch.on_tokens(batch.old_logprobs, rows, mask),
            bias=out.head.bias,
            normalizer=divisor,
        )
        return loss, {"loss": float(st.loss), "pacs_accuracy": float(st.accuracy)}, int(mask.sum())


ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (GRPO, PACS)}


def make_algorithm(cfg: TrainConfig, *, softcap: float | None = None) -> Algorithm:
    """The algorithm `cfg.algorithm` names; `softcap` is the model's logit soft-cap (None for most)."""
    return ALGORITHMS[cfg.algorithm](cfg, softcap=softcap)
