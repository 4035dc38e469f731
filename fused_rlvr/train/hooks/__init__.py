"""Hooks: what the seed papers add to the loop, without branches in the loop (docs/methods.md, section 5).

    base.py          Hook (the phases a method may join), RolloutRequest, StepContext (what a hook may use)
    dars.py          DARS depth: extra rollouts for hard prompts (`dars_extra`, `DarsHook`)
    rlpr.py          RLPR: verifier-free probability reward (`RLPRReward`), reward-std filter
                     (`StdFilterHook`)
    rank_shaping.py  VERL: advantages shaped by the effective rank of the final hidden states
    guidance.py      Agent-RLVR: guided re-attempts of failed prompts, joining the group or a DPO loss

`build_hooks(cfg, initial_model)` makes the ones the config asks for; the trainer runs them after the
caller's own hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from fused_rlvr.train.hooks.base import Hook, PerStep, RolloutRequest, StepContext
from fused_rlvr.train.hooks.dars import DarsHook, dars_extra
from fused_rlvr.train.hooks.guidance import GuidanceHook
from fused_rlvr.train.hooks.rank_shaping import RankShapingHook
from fused_rlvr.train.hooks.rlpr import RLPRReward, StdFilterHook, no_reasoning_sequence, splice_reference

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fused_rlvr.train.config import TrainConfig

__all__ = [
    "DarsHook",
    "GuidanceHook",
    "Hook",
    "PerStep",
    "RLPRReward",
    "RankShapingHook",
    "RolloutRequest",
    "StdFilterHook",
    "StepContext",
    "build_hooks",
    "dars_extra",
    "no_reasoning_sequence",
    "splice_reference",
]


def build_hooks(cfg: TrainConfig, initial_model: Optional[torch.nn.Module] = None) -> list[Hook]:
    """The hooks the config asks for, in the order they run: DARS (extra rollouts), guidance (extra
    rollouts, verified), RLPR (replaces the rewards; scores the initial policy `initial_model`), the std
    filter (on the final rewards), rank shaping (on the advantages)."""
    hooks: list[Hook] = []
    if cfg.dars:
        hooks.append(DarsHook(cfg.dars))
    if cfg.guidance:
        hooks.append(
            GuidanceHook(cfg.guidance, cfg.guidance_samples, cfg.dpo_beta, cfg.dpo_coef, cfg.guidance_hint)
        )
    if cfg.reward == "rlpr":
        if initial_model is None:
            raise ValueError("reward='rlpr' needs the initial policy (initial_model) for its scoreA")
        hooks.append(RLPRReward(initial_model, cfg.rlpr_weight))
    if cfg.rlpr_std_filter:
        hooks.append(StdFilterHook(cfg.rlpr_std_beta, cfg.rlpr_std_ema))
    if cfg.rank_shaping:
        hooks.append(RankShapingHook())
    return hooks
