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
        policy_loss: str = "ppo",
        beta: float = 0.0,
        kl: str = "k3",
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        dual_clip: Optional[float] = None,
        ratio_cap: Optional[float] = None,
        sapo_tau_pos: float = 1.0,
        sapo_tau_neg: float = 1.05,
        importance: str = "token",
        agg: str = "token-mean",
        entropy_coef: float = 0.0,
        steer: Optional[SteerConfig] = None,
        kl_ratio_weighted: bool = False,
        kl_clamp: Optional[float] = 10.0,
        log_ratio_clamp: Optional[float] = 20.0,
        temperature: float = 1.0,
        softcap: Optional[float] = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.kwargs = dict(
            policy_loss=policy_loss,
            beta=beta,
            kl=kl,
            eps_low=eps_low,
            eps_high=eps_high,
            dual_clip=dual_clip,
            ratio_cap=ratio_cap,
            sapo_tau_pos=sapo_tau_pos,
            sapo_tau_neg=sapo_tau_neg,
            importance=importance,
            agg=agg,
            entropy_coef=entropy_coef,
            steer=steer,
            kl_ratio_weighted=kl_ratio_weighted,
            kl_clamp=kl_clamp,
            log_ratio_clamp=log_ratio_clamp,
            temperature=temperature,
            softcap=softcap,
            backend=backend,
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
        pg_weights=None,
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
        """The per-batch inputs of `linear_grpo_loss` (pg_weights: policy-gradient weights, e.g. from
        `rollout_correction`); vocab_parallel: `weight` is this rank's vocabulary shard (see linear_logprobs).
        temperature: this call's (a float or a per-token [B, T] tensor) instead of the one given at
        construction. lora_a, lora_b, lora_scale: a LoRA adapter on the lm-head (see linear_logprobs)."""
        return linear_grpo_loss(
            hidden,
            weight,
            targets,
            advantages,
            mask,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            pg_weights=pg_weights,
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
