"""Shared pieces of the trainer tests (tiny random model, no download)."""

from __future__ import annotations

import os
import signal

import torch

from fused_rlvr.train import Hook, make_config


def tiny_config(out_dir, **kw):
    """The `tiny` preset shrunk to seconds per run; keyword arguments override any field."""
    base = {
        "out_dir": str(out_dir),
        "steps": 3,
        "n_eval": 8,
        "prompts_per_step": 3,
        "group_size": 4,
        "max_new_tokens": 5,
        "save_every": 0,
    }
    base.update(kw)
    return make_config("tiny", base)


class DigitReward(Hook):
    """A signal a random model can find: 1 when the response starts with a digit (replaces the verifier)."""

    def rewards(self, trainer, batch, rewards):
        return torch.tensor([float(t[:1].isdigit()) for t in batch.texts])


class SignalAt(Hook):
    """SIGINT to this process once, during step `at_step` (like a user pressing Ctrl-C); refills may call
    extra_rollouts again within a step."""

    def __init__(self, at_step):
        self.at_step = at_step

    def extra_rollouts(self, trainer, batch):
        if trainer.step + 1 == self.at_step:
            self.at_step = None
            os.kill(os.getpid(), signal.SIGINT)
        return []


def params(model) -> dict[str, torch.Tensor]:
    """Detached copies of every parameter (whole tensors for FSDP2-sharded ones)."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }
