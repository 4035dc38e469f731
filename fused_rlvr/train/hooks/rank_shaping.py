"""VERL: advantages shaped by the effective rank of each response's final hidden states
(docs/methods.md, section 5)."""

from __future__ import annotations

from typing import Any

import torch

from fused_rlvr.effective_rank import EffectiveRankShaper, erv_era
from fused_rlvr.train.hooks.base import Hook


class RankShapingHook(Hook):
    """VERL advantage shaping: per response, (ER, ERV, ERA) of its final hidden states (`erv_era`: last 512
    tokens, prefixes every 40 tokens, ERV = ERA = 0 below 80 tokens) go through `EffectiveRankShaper`
    (moving means, A' = A + min(relu(aux), |A| / 2)); the shaper's moving statistics are checkpointed.
    The hidden states are the rows the fused op receives for the response (`Scorer.hidden_states`)."""

    name = "rank_shaping"

    def __init__(self, max_tokens: int = 512, **shaper_kwargs: Any):
        self.max_tokens = max_tokens
        self.shaper = EffectiveRankShaper(**shaper_kwargs)
        self._last: dict[str, float] = {}

    def rank_dynamics(self, ctx, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 [B] each: ER, ERV, ERA of every response."""
        dyn = [
            erv_era(h, max_tokens=self.max_tokens)
            for h in ctx.score.hidden_states(batch, max_tokens=self.max_tokens)
        ]
        return tuple(torch.tensor([d[i] for d in dyn], dtype=torch.float32) for i in range(3))

    def advantages(self, ctx, batch, adv):
        er, erv, era = self.rank_dynamics(ctx, batch)
        out, st = self.shaper(adv, er.to(adv.device), erv.to(adv.device), era.to(adv.device))
        bonus = (out - adv).float()
        self._last = {
            "er_mean": float(er.mean()),
            "erv_mean": float(erv.mean()),
            "era_mean": float(era.mean()),
            "rank_bonus_mean": float(bonus.mean()),
            "rank_shaped_frac": float((bonus != 0).float().mean()),
        }
        return out

    def metrics(self):
        return dict(self._last)

    def state_dict(self):
        return {"shaper": self.shaper.state_dict()}

    def load_state_dict(self, state):
        self.shaper.load_state_dict(state["shaper"])
