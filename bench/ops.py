"""The benchmarked operations, each with its providers: build inputs once, then `step(provider, grad)`.

ops: "logprob" (per-token log-probs), "logprob_entropy" (log-probs + entropy), "grpo" (the GRPO loss,
TRL's dapo aggregation, k3 KL with beta 0.04, clip 0.2/0.28), its variants GRPO_VARIANTS (the same loss with
one option changed: policy_loss "cispo" / "sapo", token pg_weights, the ratio-weighted KL), "pacs" (the PACS
loss, groups of 8), and two variants of log-probs + entropy timed against the plain op in the same run:
  "temperature"  temperature 0.7 as a float ("fused-rlvr") vs a per-token tensor of about 0.7
                 ("fused-rlvr-token-temperature"), and plain torch with the per-token divisor;
  "lora"         a rank-16 LoRA adapter on a frozen lm-head (gradients: hidden, A, B), as PEFT trains it:
                 fused ("fused-rlvr"), the same op without the adapter ("fused-rlvr-no-adapter": the cost
                 the adapter adds), the op on the materialised W + s B A ("fused-rlvr-merged-weight") and
                 PEFT's arithmetic on materialised logits ("torch").
A step returns a scalar to backpropagate (for the per-token ops: a random weighting of the outputs);
`grads(provider)` are the tensors it is differentiated against.
"""

from __future__ import annotations

import torch

from bench.providers import PROVIDERS, NotSupported
from bench.shapes import ModelShape

# "grpo" with one option changed (linear_grpo_loss keywords; "pg_weights" is filled in by Problem)
GRPO_VARIANTS = {
    "grpo_cispo": dict(policy_loss="cispo", eps_high=5.0),
    "grpo_sapo": dict(policy_loss="sapo"),
    "grpo_pg_weights": dict(pg_weights="token"),
    "grpo_kl_ratio": dict(kl_ratio_weighted=True),
}
OPS = ("logprob", "logprob_entropy", "grpo", *GRPO_VARIANTS, "pacs", "temperature", "lora")
OP_PROVIDERS = {
    "logprob": ("fused-rlvr", "torch", "torch-compile-chunked", "liger", "cce"),
    "logprob_entropy": ("fused-rlvr", "torch", "torch-compile-chunked"),
    "grpo": ("fused-rlvr", "torch", "liger"),
    **{name: ("fused-rlvr", "torch") for name in GRPO_VARIANTS},
    "pacs": ("fused-rlvr", "torch"),
    "temperature": ("fused-rlvr", "fused-rlvr-token-temperature", "torch"),
    "lora": ("fused-rlvr", "fused-rlvr-no-adapter", "fused-rlvr-merged-weight", "torch"),
}
GRPO_BASE = dict(beta=0.04, eps_low=0.2, eps_high=0.28, kl="k3")
GROUP = 8
TEMPERATURE = 0.7
LORA_RANK, LORA_SCALE = 16, 2.0  # PEFT's r=16, lora_alpha=32


class Problem:
    """Inputs of one op at one shape: hidden [B, T, H] with N = B * T tokens, the lm-head, and the rest."""

    def __init__(
        self, op: str, shape: ModelShape, tokens: int, dtype: torch.dtype, device: str, seed: int = 0
    ):
        self.op, self.shape, self.device = op, shape, device
        g = torch.Generator(device=device).manual_seed(seed)
        seq = 512 if tokens >= 4096 else max(16, tokens // 8)
        b = max(GROUP, tokens // seq) if op.startswith("grpo") or op == "pacs" else max(1, tokens // seq)
        t = tokens // b
        self.b, self.t = b, t
        h = torch.randn(b, t, shape.hidden, generator=g, device=device, dtype=torch.float32)
        h.mul_(2.5 / shape.hidden**0.5)
        self.hidden = h.to(dtype).requires_grad_()
        w = torch.randn(shape.vocab, shape.hidden, generator=g, device=device, dtype=torch.float32)
        self.weight = w.to(dtype).requires_grad_()
        del h, w
        self.targets = torch.randint(0, shape.vocab, (b, t), generator=g, device=device)
        self.mask = torch.ones(b, t, dtype=torch.bool, device=device)
        self.mask[:, : t // 8] = False  # a prompt-like prefix that is not scored
        self.g_lp = torch.randn(b, t, generator=g, device=device)
        self.g_ent = torch.randn(b, t, generator=g, device=device)
        self.adv = torch.randn(b, generator=g, device=device)
        base = -torch.rand(b, t, generator=g, device=device) * 8
        self.old = base + 0.1 * torch.randn(b, t, generator=g, device=device)
        self.ref = base + 0.1 * torch.randn(b, t, generator=g, device=device)
        self.rewards = (torch.rand(b, generator=g, device=device) > 0.5).float()
        self.groups = torch.arange(b, device=device) // GROUP
        # rollout-engine mismatch weights, as fused_rlvr.rollout_correction's token_truncate gives them
        self.pg_weights = torch.exp(0.05 * torch.randn(b, t, generator=g, device=device)).clamp(max=2.0)
        if op == "temperature":  # per-token temperatures around the float's value
            self.token_temperature = TEMPERATURE * (0.9 + 0.2 * torch.rand(b, t, generator=g, device=device))
        if op == "lora":  # a frozen head with a trained adapter (B non-zero, as after some training)
            self.weight.requires_grad_(False)
            a = torch.randn(LORA_RANK, shape.hidden, generator=g, device=device) / shape.hidden**0.5
            bb = torch.randn(shape.vocab, LORA_RANK, generator=g, device=device) * 0.1
            self.lora_a = a.to(dtype).requires_grad_()
            self.lora_b = bb.to(dtype).requires_grad_()

    @property
    def n_tokens(self) -> int:
        return self.b * self.t

    def grads(self, provider: str = "fused-rlvr"):
        """The tensors a step of `provider` is differentiated against."""
        if self.op == "lora":
            return (
                (self.hidden,)
                if provider == "fused-rlvr-no-adapter"
                else (self.hidden, self.lora_a, self.lora_b)
            )
        return self.hidden, self.weight

    def step(self, provider: str, grad: bool = True) -> torch.Tensor:
        fn = {
            "logprob": self._per_token,
            "logprob_entropy": self._per_token,
            "grpo": self._grpo,
            **{name: self._grpo for name in GRPO_VARIANTS},
            "pacs": self._pacs,
            "temperature": self._temperature,
            "lora": self._lora,
        }[self.op]
        if grad:
            return fn(provider)
        with torch.no_grad():
            return fn(provider)

    def _per_token(self, provider):
        entropy = self.op == "logprob_entropy"
        y = torch.where(self.mask, self.targets, -100)
        lp, ent = PROVIDERS[provider](
            self.hidden, self.weight, y, softcap=self.shape.softcap, entropy=entropy
        )
        out = (lp * self.g_lp).sum()
        return out + (ent * self.g_ent).sum() if entropy else out

    def _grpo_options(self) -> dict:
        kw = dict(GRPO_BASE, **GRPO_VARIANTS.get(self.op, {}))
        if kw.get("pg_weights") == "token":
            kw["pg_weights"] = self.pg_weights
        return kw

    def _weighted(self, lp, ent):
        return (lp * self.g_lp).sum() + (ent * self.g_ent).sum()

    def _temperature(self, provider):
        y = torch.where(self.mask, self.targets, -100)
        if provider == "torch":  # materialised logits with a per-row divisor
            from fused_rlvr.reference import reference_logprobs

            lp, ent = reference_logprobs(self.hidden, self.weight, y, temperature=self.token_temperature)
            return self._weighted(lp.float(), ent.float())
        if provider not in ("fused-rlvr", "fused-rlvr-token-temperature"):
            raise NotSupported(f"{provider} has no per-token temperature")
        from fused_rlvr import linear_logprobs

        temp = TEMPERATURE if provider == "fused-rlvr" else self.token_temperature
        lp, ent = linear_logprobs(self.hidden, self.weight, y, temperature=temp)
        return self._weighted(lp, ent)

    def _lora(self, provider):
        from fused_rlvr import linear_logprobs

        y = torch.where(self.mask, self.targets, -100)
        if provider == "fused-rlvr":
            lp, ent = linear_logprobs(
                self.hidden, self.weight, y, lora_a=self.lora_a, lora_b=self.lora_b, lora_scale=LORA_SCALE
            )
        elif provider == "fused-rlvr-no-adapter":
            lp, ent = linear_logprobs(self.hidden, self.weight, y)
        elif provider == "fused-rlvr-merged-weight":  # a [V, H] merged weight, then the fused op
            merged = self.weight + LORA_SCALE * (self.lora_b @ self.lora_a)
            lp, ent = linear_logprobs(self.hidden, merged, y)
        elif provider == "torch":  # PEFT's arithmetic on materialised logits
            from fused_rlvr.reference import reference_logprobs

            ha = LORA_SCALE * (self.hidden @ self.lora_a.T)
            h_cat = torch.cat([self.hidden, ha], -1)
            lp, ent = reference_logprobs(h_cat, torch.cat([self.weight, self.lora_b], -1), y)
            lp, ent = lp.float(), ent.float()
        else:
            raise NotSupported(f"{provider} has no LoRA head")
        return self._weighted(lp, ent)

    def _grpo(self, provider):
        kw = self._grpo_options()
        if provider == "fused-rlvr":
            from fused_rlvr import linear_grpo_loss

            return linear_grpo_loss(
                self.hidden,
                self.weight,
                self.targets,
                self.adv,
                self.mask,
                old_logprobs=self.old,
                ref_logprobs=self.ref,
                agg="dapo",
                softcap=self.shape.softcap,
                **kw,
            )[0]
        if provider == "torch":
            from fused_rlvr.grpo import GRPOParams, grpo_token_loss_torch
            from fused_rlvr.reference import reference_logits

            z = reference_logits(self.hidden, self.weight, softcap=self.shape.softcap)
            lp = torch.log_softmax(z.float(), -1).gather(-1, self.targets[..., None])[..., 0]
            m = self.mask.float()
            pgw = kw.pop("pg_weights", None)
            return grpo_token_loss_torch(
                lp, None, self.old, self.ref, self.adv, m, None, GRPOParams(**kw), 1.0 / float(m.sum()), pgw
            )[0]
        if self.op != "grpo":
            raise NotSupported(f"{provider} has no {self.op} variant")
        if provider == "liger":
            if self.shape.softcap is not None:
                raise NotSupported("Liger's GRPO loss has no logit softcap")
            return _liger_grpo(self.hidden.is_cuda)(
                self.hidden,
                self.weight,
                self.targets,
                self.mask.long(),
                self.adv,
                ref_per_token_logps=self.ref,
                old_per_token_logps=self.old,
            )[0]
        raise NotSupported(f"{provider} has no GRPO loss")

    def _pacs(self, provider):
        if provider == "fused-rlvr":
            from fused_rlvr import linear_pacs_loss

            return linear_pacs_loss(
                self.hidden,
                self.weight,
                self.targets,
                self.rewards,
                self.mask,
                self.groups,
                old_logprobs=self.old,
                softcap=self.shape.softcap,
            )[0]
        if provider == "torch":
            from fused_rlvr.pacs import pacs_loss_from_scores
            from fused_rlvr.reference import reference_logits

            z = reference_logits(self.hidden, self.weight, softcap=self.shape.softcap)
            lp = torch.log_softmax(z.float(), -1).gather(-1, self.targets[..., None])[..., 0]
            scores = ((lp - self.old) * self.mask).sum(1)
            return pacs_loss_from_scores(scores, self.rewards, self.groups)[0]
        raise NotSupported(f"{provider} has no PACS loss")


_LIGER = {}


def _liger_grpo(cuda: bool):
    """Liger's GRPO loss with its defaults (torch.compile'd chunks), built once per device kind."""
    if cuda not in _LIGER:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        _LIGER[cuda] = LigerFusedLinearGRPOLoss(
            beta=0.04, use_ref_model=True, epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo"
        )
    return _LIGER[cuda]
