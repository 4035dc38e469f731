"""nn.Module forms of the fused losses: they only hold hyper-parameters (no weights, no state)."""

from __future__ import annotations

from typing import Optional

import torch

from fused_rlvr.advantages import SteerConfig
from fused_rlvr.grpo import GRPOStats, linear_grpo_loss
from fused_rlvr.pacs import PACSStats, linear_pacs_loss


def _with_temperature(kwargs: dict, temperature) -> dict:
    return kwargs if temperature is None else dict(kwargs, temperature=temperature)


class LinearGRPOLoss(torch.nn.Module):
    """`linear_grpo_loss` with its hyper-parameters fixed at construction."""

    def __init__(
        self,
        *,
        beta: float = 0.0,
        kl: str = "k3",
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        dual_clip: Optional[float] = None,
        importance: str = "token",
        agg: str = "token-mean",
        entropy_coef: float = 0.0,
        steer: Optional[SteerConfig] = None,
        temperature: float = 1.0,
        softcap: Optional[float] = None,
        backend: str = "auto",
        logratio_clamp: float = 20.0,
    ):
        super().__init__()
        self.kwargs = dict(
            beta=beta,
            kl=kl,
            eps_low=eps_low,
            eps_high=eps_high,
            dual_clip=dual_clip,
            importance=importance,
            agg=agg,
            entropy_coef=entropy_coef,
            steer=steer,
            temperature=temperature,
            softcap=softcap,
            backend=backend,
            logratio_clamp=logratio_clamp,
        )

    def forward(
        self,
        hidden,
        weight,
        targets,
        advantages,
        mask,
        *,
        old_logprobs=None,
        ref_logprobs=None,
        bias=None,
        normalizer=None,
        max_len=None,
        old_entropy=None,
        vocab_parallel=None,
        temperature=None,
        lora_a=None,
        lora_b=None,
        lora_scale=None,
    ) -> tuple[torch.Tensor, GRPOStats]:
        """vocab_parallel: `weight` is this rank's vocabulary shard (see linear_logprobs). temperature: this
        call's (a float or a per-token [B, T] tensor) instead of the one given at construction. lora_a,
        lora_b, lora_scale: a LoRA adapter on the lm-head (see linear_logprobs)."""
        return linear_grpo_loss(
            hidden,
            weight,
            targets,
            advantages,
            mask,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            bias=bias,
            normalizer=normalizer,
            max_len=max_len,
            old_entropy=old_entropy,
            vocab_parallel=vocab_parallel,
            lora_a=lora_a,
            lora_b=lora_b,
            lora_scale=lora_scale,
            **_with_temperature(self.kwargs, temperature),
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.kwargs.items())


class LinearPACSLoss(torch.nn.Module):
    """`linear_pacs_loss` with its hyper-parameters fixed at construction."""

    def __init__(
        self,
        *,
        beta: float = 1.0,
        baseline: str = "rloo",
        class_balance: bool = True,
        temperature: float = 1.0,
        softcap: Optional[float] = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.kwargs = dict(
            beta=beta,
            baseline=baseline,
            class_balance=class_balance,
            temperature=temperature,
            softcap=softcap,
            backend=backend,
        )

    def forward(
        self,
        hidden,
        weight,
        targets,
        rewards,
        mask,
        group_ids,
        *,
        old_logprobs,
        bias=None,
        normalizer=None,
        vocab_parallel=None,
        temperature=None,
        lora_a=None,
        lora_b=None,
        lora_scale=None,
    ) -> tuple[torch.Tensor, PACSStats]:
        """vocab_parallel: `weight` is this rank's vocabulary shard (see linear_logprobs). temperature: this
        call's (a float or a per-token [B, T] tensor) instead of the one given at construction. lora_a,
        lora_b, lora_scale: a LoRA adapter on the lm-head (see linear_logprobs)."""
        return linear_pacs_loss(
            hidden,
            weight,
            targets,
            rewards,
            mask,
            group_ids,
            old_logprobs=old_logprobs,
            bias=bias,
            normalizer=normalizer,
            vocab_parallel=vocab_parallel,
            lora_a=lora_a,
            lora_b=lora_b,
            lora_scale=lora_scale,
            **_with_temperature(self.kwargs, temperature),
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
