"""Shared pieces of the trainer tests (tiny random model, no download)."""

from __future__ import annotations

import os
import signal
import zlib

import torch

from fused_rlvr.train import Hook, StepContext, make_config
from fused_rlvr.train.collect import RolloutCollector
from fused_rlvr.train.parallel import Parallel
from fused_rlvr.train.policy import Policy
from fused_rlvr.train.tasks import Verifier, make_task


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

    def rewards(self, ctx, batch, rewards):
        return torch.tensor([float(t[:1].isdigit()) for t in batch.texts])


class SignalAt(Hook):
    """SIGINT to this process once, during step `at_step` (like a user pressing Ctrl-C); refills may call
    extra_rollouts again within a step."""

    def __init__(self, at_step):
        self.at_step = at_step

    def extra_rollouts(self, ctx, batch):
        if ctx.step + 1 == self.at_step:
            self.at_step = None
            os.kill(os.getpid(), signal.SIGINT)
        return []


def params(model) -> dict[str, torch.Tensor]:
    """Detached copies of every parameter (whole tensors for FSDP2-sharded ones)."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }


class HookBench:
    """What a hook works with, without a Trainer: the policy of a config (tiny model), a verifier, the
    rollout phases on one process, and the StepContext of any step."""

    def __init__(self, cfg, verifier=None):
        self.cfg = cfg.validate()
        self.policy = Policy(self.cfg)
        self.verifier = verifier or Verifier()
        self.hooks: list[Hook] = []
        task = make_task(self.cfg.task, self.cfg.n_eval, self.cfg.seed, self.cfg.eval_task)
        self.collector = RolloutCollector(self.cfg, self.policy, task, self.hooks, Parallel())
        torch.manual_seed(self.cfg.seed)

    def ctx(self, step: int = 0) -> StepContext:
        return StepContext.of(self.policy, self.verifier, step=step)

    def rollouts(self, problems):
        """G samples of each problem, verified by `verifier` (phases 2-3)."""
        return self.collector.rollouts(self.ctx(), problems)


def scripted_generate(tok, max_new_tokens, digit_first=0.3, guided_digit_first=None):
    """A stand-in for Policy.generate whose responses depend only on the prompt and how many times that
    prompt came before in the same call (not on any RNG or process): the same rollouts on 1 and N
    processes. A response starts with a digit with probability `digit_first` (`guided_digit_first` when the
    prompt holds a guidance plan)."""
    chars = list("abcdefghij+-=. ")

    def generate(prompts, greedy=False, on_batch=None):
        seen: dict[tuple, int] = {}
        ids, texts, truncated = [], [], []
        for p in prompts:
            key = tuple(p)
            k = seen.get(key, 0)
            seen[key] = k + 1
            h = zlib.crc32(repr((key, k)).encode())
            rnd = torch.Generator().manual_seed(h)
            p_digit = digit_first
            if guided_digit_first is not None and "Plan" in tok.decode(p):
                p_digit = guided_digit_first
            n = 1 + int(torch.randint(max_new_tokens, (1,), generator=rnd))
            first = (
                str(int(torch.randint(10, (1,), generator=rnd)))
                if float(torch.rand(1, generator=rnd)) < p_digit
                else chars[int(torch.randint(len(chars), (1,), generator=rnd))]
            )
            rest = "".join(chars[int(i)] for i in torch.randint(len(chars), (n - 1,), generator=rnd))
            resp = tok(first + rest, add_special_tokens=False)["input_ids"]
            ids.append(resp)
            texts.append(tok.decode(resp, skip_special_tokens=True))
            truncated.append(True)
        if on_batch is not None:
            on_batch(len(prompts))
        return ids, texts, truncated

    return generate
