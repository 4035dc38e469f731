"""The thin RLVR trainer: one loop, in phases, the same for one process and for N under FSDP2.

    train()       resume? -> held-out eval (before) -> train_step() x steps (checkpoint every save_every)
                  -> checkpoint -> held-out eval (after) -> metrics.csv, training.png, summary.json
    train_step()  1-6. a batch of verified, filtered groups (collect.py: rollouts, hooks, refills)
                  7. advantages, then the shaping hooks       8. old / reference log-probs (no grad)
                  9. update: epochs x minibatches optimizer steps of micro-batches (whole-batch normaliser)

Phases 1-8 run on the gathered model, phase 9 on the shards (parallel.py). Every forward with gradients
goes through `Policy.loss` (policy.py), every no-grad one through `Scorer` (scoring.py); the loss itself
is the algorithm's (algorithms.py), the methods are hooks (hooks/).
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, Optional

import torch

from fused_rlvr._threads import configure_threads
from fused_rlvr.advantages import group_advantages
from fused_rlvr.train.algorithms import make_algorithm
from fused_rlvr.train.checkpoint import Checkpointer, CheckpointError, capture_rng, restore_rng
from fused_rlvr.train.collect import RolloutCollector
from fused_rlvr.train.config import TrainConfig, check_compatible, ensure_out_dir
from fused_rlvr.train.guard import UpdateGuard, check_finite_weights
from fused_rlvr.train.hooks import Hook, StepContext, build_hooks
from fused_rlvr.train.parallel import Parallel, make_parallel
from fused_rlvr.train.policy import Policy
from fused_rlvr.train.rollout import RolloutBatch
from fused_rlvr.train.runlog import RunLog
from fused_rlvr.train.signals import StopSignals
from fused_rlvr.train.tasks import Problem, Verifier, make_task


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quiet(message: str) -> None:
    pass


class Trainer:
    """Builds the policy, algorithm, task, hooks, optimizer and outputs from a TrainConfig; `train()` runs
    the loop. `parallel` defaults to what the config and the environment ask for (`make_parallel`)."""

    def __init__(self, cfg: TrainConfig, hooks: Sequence[Hook] = (), *, parallel: Optional[Parallel] = None):
        self.cfg = c = cfg.validate()
        configure_threads(c.threads)  # 0: OMP_NUM_THREADS, else the physical cores this process may use
        self.parallel = par = parallel or make_parallel(c)
        self.policy = Policy(c, root_call=par.root_call)
        self.initial = self.policy.frozen_copy() if c.beta > 0 or c.reward == "rlpr" else None
        par.shard(self.policy.model, [self.initial])  # before the optimizer sees the parameters
        self.params = self.policy.params
        self.algorithm = make_algorithm(c, softcap=self.policy.softcap)
        self.task = make_task(c.task, c.n_eval, c.seed, c.eval_task)
        self.heldout = self.task.heldout()[: c.n_eval]
        self.verifier = Verifier()
        self.hooks: list[Hook] = list(hooks) + build_hooks(c, self.initial)
        self.collector = RolloutCollector(c, self.policy, self.task, self.hooks, par)
        self.optimizer = torch.optim.AdamW(self.params, lr=c.lr, weight_decay=c.weight_decay)
        warm = c.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / (warm + 1)) if warm else 1.0
        )
        root = os.path.join(c.out_dir, "checkpoints")
        self.checkpointer = Checkpointer(
            root,
            c.keep_checkpoints,
            rank=par.rank,
            world_size=par.world_size,
            barrier=par.barrier,
            log=_say if par.is_main else _quiet,  # (a fallback or a cleaned-up leftover, said once)
        )
        self.log = RunLog(c.out_dir, enabled=par.is_main, progress=c.progress)
        self.data_rng = random.Random(c.seed)
        torch.manual_seed(c.seed + 1_000_003 * par.rank)  # each process samples its own rollouts
        self.step = 0
        self.guard = UpdateGuard(c.max_bad_updates, lr=c.lr, verbose=par.is_main)
        self.eval_before: Optional[dict[str, Any]] = None
        self.saved_step: Optional[int] = None
        self.saved_folder: Optional[str] = None  # the checkpoint of `saved_step`
        self.last_batch: Optional[RolloutBatch] = None
        self.signals = StopSignals(
            lambda name: (
                f"\n[rank {par.rank}] {name}: finishing step {self.step + 1}, then saving a "
                "checkpoint (signal again to abort without saving)"
            )
        )

    @property
    def model(self) -> torch.nn.Module:
        return self.policy.model

    def close(self) -> None:
        """Release the process group this trainer created (FSDP2), if any."""
        self.parallel.close()

    def verify(self, batch: RolloutBatch, rows: Sequence[int]) -> torch.Tensor:
        return batch.verified(self.verifier, rows)

    def context(self) -> StepContext:
        """What the hooks get during the current step."""
        par = self.parallel
        return StepContext.of(
            self.policy, self.verifier, step=self.step, verify=self.verify, global_sum=par.global_sum
        )

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, Any]:
        """Phases 1-9; returns the step's metrics, merged over the processes."""
        c, t0, ctx = self.cfg, time.time(), self.context()
        with self.parallel.gathered():
            batch, rec = self.collector.collect(ctx, self.data_rng)  # 1-6
            t1 = time.time()
            if len(batch):
                # 7. advantages: group baseline, then the shaping hooks
                adv = group_advantages(batch.rewards, batch.group, estimator=c.advantage, scale=c.adv_scale)
                for h in self.hooks:
                    adv = h.advantages(ctx, batch, adv)
                batch.advantages = adv
                # 8. old (several updates per batch, PACS) and reference (beta > 0) log-probs
                if self.algorithm.needs_old_logprobs():
                    batch.old_logprobs, ents = self.policy.scorer.logprobs(batch, entropy=True)
                    rec["entropy"] = float(torch.cat(ents).mean())
                if c.beta > 0:
                    batch.ref_logprobs = self.policy.scorer.logprobs(batch, model=self.initial)[0]
        stats = self.update(batch)  # 9, on every process (one without samples pads the collectives)
        if len(batch):
            if "mean_entropy" in stats and "entropy" not in rec:
                rec["entropy"] = stats["mean_entropy"]
            rec.update(stats)
        else:
            rec["skipped"] = 1.0
        for h in self.hooks:
            rec.update(h.metrics())
        if len(batch):
            rec.update(
                lr=self.scheduler.get_last_lr()[0], time_update=time.time() - t1, time_step=time.time() - t0
            )
        self.last_batch = batch
        return self.parallel.merge_step(rec)

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """Phase 9: epochs x minibatches optimizer steps on the batch's trajectory. Each sums the gradients of
        its micro-batches (each divided by the whole minibatch's divisor) and of the hooks' extra losses; a
        step whose loss or gradient norm is not finite is skipped (`max_bad_updates` in a row stop)."""
        c, alg, par, policy = self.cfg, self.algorithm, self.parallel, self.policy
        ctx = self.context()
        sums: dict[str, float] = {}
        tokens, norms, attempted, skipped = 0, [], 0, 0
        for _epoch in range(c.epochs):
            for rows in par.pad(alg.minibatches(batch, c.minibatches), torch.zeros(0, dtype=torch.long)):
                divisor = alg.divisor(*par.sum(batch.counts(rows)))
                self.optimizer.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for mb in par.pad(alg.micro_batches(batch, rows, c.micro_batch) if len(rows) else [], None):
                    if mb is None:  # another process has more micro-batches: a pass that adds nothing
                        loss = policy.zero_loss()
                    else:
                        loss, stats, k = policy.loss(
                            batch, mb, partial(alg.loss, batch=batch, divisor=divisor)
                        )
                        tokens += k
                        for key, v in stats.items():
                            sums[key] = sums.get(key, 0.0) + v * (k if key != "loss" else 1.0)
                    loss.backward()
                    loss_sum += float(loss.detach())
                for h in self.hooks:
                    extra = h.extra_loss(ctx, batch)
                    if extra is not None:
                        extra.backward()
                        loss_sum += float(extra.detach())
                attempted += 1
                norm = self._grad_norm()
                norms += [norm] if c.grad_clip > 0 else []
                if self.guard.allows(par.global_sum(loss_sum), norm, self.step + 1):
                    self.optimizer.step()
                    self.scheduler.step()
                else:
                    self.optimizer.zero_grad(set_to_none=True)
                    skipped += 1
        out = {k: v / max(tokens, 1) for k, v in sums.items() if k != "loss"}
        out["loss"] = sums.get("loss", 0.0) / max(attempted, 1)
        if norms:
            out["grad_norm"] = sum(norms) / len(norms)
        if skipped:
            out["skipped_updates"] = float(skipped)
        return out

    def _grad_norm(self) -> float:
        """The global gradient norm, the gradients clipped to grad_clip when that is > 0."""
        if self.cfg.grad_clip > 0:
            return float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip))
        grads = [p.grad for p in self.params if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(
        self, problems: Optional[list[Problem]] = None, *, bar: Optional[str] = None
    ) -> dict[str, Any]:
        """Greedy accuracy on the held-out problems (each process decodes its slice; the result covers all);
        `bar`: a progress bar's title."""
        mine = self.parallel.eval_share(list(self.heldout if problems is None else problems))
        with self.parallel.gathered(), self.log.progress(bar, len(mine), "problem") as pb:
            prompts = [self.policy.prompt_ids(p.question) for p in mine]
            ids, texts, truncated = self.policy.generate(prompts, greedy=True, on_batch=pb.update)
        correct = [self.verifier(t, p.answer) for t, p in zip(texts, mine)]
        n, nan = len(mine), float("nan")
        return self.parallel.merge_eval(
            {
                "accuracy": sum(correct) / n if n else nan,
                "n": n,
                "correct": correct,
                "mean_length": sum(len(i) for i in ids) / n if n else nan,
                "truncated": sum(truncated) / n if n else nan,
                "examples": [
                    {"question": p.question, "answer": p.answer, "response": t}
                    for p, t in zip(mine[:5], texts)
                ],
            }
        )

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str:
        """Checkpoint the current step (every process calls it); refuses a model with non-finite weights."""
        check_finite_weights(self.params, self.step, self.checkpointer.root, self.parallel.all_true)
        plain, sharded = self.parallel.model_state(self.policy.model, self.optimizer)
        state = {
            "version": 2,
            "step": self.step,
            "config": self.cfg.to_dict(),
            "scheduler": self.scheduler.state_dict(),
            "eval_before": self.eval_before,
            "bad_updates": self.guard.bad,
            **plain,
        }
        rank_state = {"rng": capture_rng(self.data_rng), "hooks": [h.state_dict() for h in self.hooks]}
        folder = self.checkpointer.save(self.step, state, rank_state=rank_state, sharded=sharded)
        self.saved_step, self.saved_folder = self.step, folder
        return folder

    def load(self, folder: str) -> None:
        """Resume from `folder`: weights, optimizer, scheduler (a new --lr applies, not the saved one), RNG
        streams, data position, hook states, step."""
        state, mine = self.checkpointer.load(folder)
        self.parallel.check_state(state, folder)
        if mine is None:  # a single-process checkpoint that keeps everything in state.pt
            if "rng" not in state:
                raise CheckpointError(
                    f"checkpoint {folder} holds no state of process {self.parallel.rank} (its RNG streams "
                    "and hook states)"
                )
            mine = state
        check_compatible(state["config"], self.cfg, folder)
        self.parallel.load_model_state(self.policy.model, self.optimizer, state, folder, self.checkpointer)
        self.scheduler.load_state_dict(state["scheduler"])
        if state["config"].get("lr") != self.cfg.lr:
            _say(f"resume: lr {state['config'].get('lr')} -> {self.cfg.lr}")
            self.scheduler.base_lrs = [self.cfg.lr for _ in self.scheduler.base_lrs]
            for g, f in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
                g["lr"] = self.cfg.lr * f(self.scheduler.last_epoch)
        restore_rng(self.data_rng, mine["rng"])
        if len(mine["hooks"]) != len(self.hooks):
            raise ValueError(
                f"cannot resume from {folder}: it holds the state of {len(mine['hooks'])} hooks, "
                f"this run has {len(self.hooks)}"
            )
        for h, s in zip(self.hooks, mine["hooks"]):
            h.load_state_dict(s)
        self.step = self.saved_step = state["step"]
        self.saved_folder = folder
        self.eval_before = state["eval_before"]
        self.guard.bad = state.get("bad_updates", 0)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        """Run (or resume) the whole training; returns the summary, also written to out_dir/summary.json."""
        c = self.cfg
        ensure_out_dir(c.out_dir)
        if not c.resume and self.checkpointer.has_checkpoints():  # (before prepare: nothing is touched)
            raise ValueError(
                f"out_dir {c.out_dir!r} already holds a run with checkpoints; pass --resume to "
                f"continue it, or choose another --out-dir (nothing there is overwritten)"
            )
        self.checkpointer.prepare()  # every process, before any of them looks for the latest
        folder = self.checkpointer.latest() if c.resume else None
        if folder is not None:
            self.load(folder)
            _say(f"resumed from {folder} (step {self.step})")
        elif c.resume:
            _say(f"resume: no checkpoint in {self.checkpointer.root}, starting from step 0")
        self.log.open(c.to_dict(), resume_step=self.step)
        t_start = time.time()
        if self.eval_before is None:
            ev = self.evaluate(bar="held-out eval (before)")
            self.eval_before = {k: v for k, v in ev.items() if k != "correct"}
            self.log.log({"step": 0, "eval_accuracy": ev["accuracy"], "eval_length": ev.get("mean_length")})
            if self.parallel.is_main:
                _say(f"held-out accuracy before training: {ev['accuracy']:.3f} ({ev['n']} problems)")
        status = "finished"
        with self.log.progress("train", c.steps, "step", initial=self.step) as bar, self.signals:
            while self.step < c.steps:
                rec = {"step": self.step + 1, **self.train_step()}
                self.step += 1
                if c.eval_every and self.step % c.eval_every == 0 and self.step < c.steps:
                    ev = self.evaluate()
                    rec.update(eval_accuracy=ev["accuracy"], eval_length=ev["mean_length"])
                self.log.log(rec)
                self.log.log_samples(self.step, self.last_batch, c.log_samples)
                bar.update(1)
                bar.set_postfix(reward=f"{rec['reward_mean']:.2f}", ent=f"{rec.get('entropy', math.nan):.2f}")
                stop = self.parallel.any_stop(self.signals.request)
                if stop is not None:
                    status = f"interrupted ({stop})"
                    break
                if c.save_every and self.step % c.save_every == 0 and self.step < c.steps:
                    self.save()
        # (a resumed run that had nothing left to do keeps its checkpoint as it is)
        ckpt = self.saved_folder if self.saved_step == self.step else self.save()
        summary: dict[str, Any] = {
            "status": status,
            "step": self.step,
            "checkpoint": ckpt,
            "train_seconds": time.time() - t_start,
            "model": c.model,
            "task": c.task,
            "algorithm": c.algorithm,
            "before": self.eval_before,
        }
        if status == "finished":
            ev = self.evaluate(bar="held-out eval (after)")
            self.log.update_last(eval_accuracy=ev["accuracy"], eval_length=ev["mean_length"])
            summary["after"] = {k: v for k, v in ev.items() if k != "correct"}
            summary["gain_points"] = 100 * (ev["accuracy"] - self.eval_before["accuracy"])
        summary["total_seconds"] = time.time() - t_start
        title = f"{c.model} / {c.task} / {c.algorithm}" + (f" + STEER {c.steer}" if c.steer else "")
        self.log.finish(summary, title + (f" + DARS {c.dars}" if c.dars else ""))
        return summary
