"""The trainer on several processes: FSDP2 (`fully_shard`) under `torchrun --nproc_per_node N`.

    torchrun --nproc_per_node 2 -m fused_rlvr.train --preset tiny --fsdp true      (gloo on CPU, nccl on CUDA)

`DistributedTrainer` runs the loop of trainer.py unchanged, phase for phase, on every rank; what differs:

1. Data. Every rank draws the same prompts_per_step prompts from the shared seeded data_rng (so the data
   position is the same on all ranks) and keeps its contiguous share of prompts_per_step / N prompts (a clear
   error names the field when N does not divide it). A group never crosses ranks, so rewards, group filters,
   advantages and hooks work on whole groups, rank-locally. Each rank samples with its own torch RNG.
2. Rollouts, rewards, hooks, old / reference log-probs: on the *gathered* model. At the start of each step
   every FSDP module is all-gathered once (the same collectives, in the same order, on every rank) and kept
   unsharded with reshard_after_forward off; generation (HF `generate`) and scoring then run with no
   collective at all, so ranks may generate different lengths and numbers of sequences (EOS, DARS extra
   rollouts) without deadlock. Cost: the memory of the full model on each rank during these phases, as with
   FSDP1's summon_full_params. (A reference model, beta > 0, is a full unsharded copy on every rank.)
3. Update: sharded. The parameters are resharded and every micro-batch's policy loss is computed inside
   `fused_rlvr.fsdp.fsdp2_lm_head_call(model, ...)`: the body and the fused lm-head loss run as one
   forward of the FSDP2 root, so the fused op sees the gathered [V, H] weight and its gradient is
   reduce-scattered like any other. The whole-batch normaliser is global (token / sequence counts
   all-reduced) and FSDP2 sums the gradients over the ranks (gradient divide factor 1, sum reduction), so
   the gradient is that of the single-process step on the full batch. Ranks with fewer micro-batches or
   minibatches (uneven groups, dropped groups, an empty batch) run zero-weighted dummy micro-batches, so
   every rank runs the same forward / backward passes. Gradient clipping uses the global norm.
4. Evaluation: each rank greedily decodes its contiguous slice of the held-out set on the gathered model;
   the per-problem results are all-gathered, so every rank returns the metrics of the whole set.
5. Checkpoints (checkpoint.Checkpointer, the single-process protocol with every rank taking part):
   checkpoints/step_N/ holds state.pt (rank 0: step, config, scheduler, eval_before), sharded/
   (torch.distributed.checkpoint: model and optimizer, each rank its shards), rankRRRRR.pt (each rank's RNG
   states, data position and hook states) and the manifest of checksums. `--resume` continues exactly on the
   same number of processes.
6. Outputs: metrics, samples, plots, summary and the progress bar come from rank 0 only (the other ranks run
   the same loop with a private scratch out_dir, deleted by `close()`). Metrics are merged over the ranks
   (counts and the loss summed, times the maximum, the rest the mean over ranks). SIGINT / SIGTERM on any
   rank stops every rank after the same step (the stop request is all-gathered at the end of each step);
   under torchrun, Ctrl-C reaches the workers through the agent, which kills them after --shutdown_timeout
   seconds (default 30): raise it when a step and a save take longer.

Refused with an error naming the field: refill_rounds > 0 (a rank-dependent number of new prompts) and
guidance='dpo'; a hook whose extra_loss returns a loss raises (it would read the lm-head weight outside the
root forward, on some ranks only).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import inspect
import itertools
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist

from fused_rlvr.fsdp import fsdp2_lm_head_call
from fused_rlvr.integrations.hf import last_hidden_states, lm_head
from fused_rlvr.train import checkpoint
from fused_rlvr.train.config import TrainConfig, check_compatible
from fused_rlvr.train.hooks import Hook
from fused_rlvr.train.rollout import RolloutBatch
from fused_rlvr.train.trainer import Trainer

_SUM_KEYS = ("loss", "n_samples", "n_groups", "groups_dropped", "dars_extra_rollouts")


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def requested(cfg: TrainConfig) -> bool:
    """True when the config asks for FSDP or the process runs under torchrun with several processes."""
    return bool(getattr(cfg, "fsdp", False)) or env_world_size() > 1


def check_config(cfg: TrainConfig, world_size: int) -> None:
    """Raise a ValueError naming the field for what the FSDP trainer cannot do with `world_size` ranks."""
    if cfg.prompts_per_step % world_size:
        raise ValueError(
            f"config field 'prompts_per_step' must be divisible by the number of processes ({world_size}) "
            f"with FSDP, got {cfg.prompts_per_step}: each rank rolls out prompts_per_step / {world_size} "
            "whole groups"
        )
    if getattr(cfg, "refill_rounds", 0):
        raise ValueError(
            "config field 'refill_rounds' must be 0 with FSDP: a refill draws a rank-dependent number of "
            "new prompts"
        )
    if getattr(cfg, "guidance", None) == "dpo":
        raise ValueError(
            "config field 'guidance' cannot be 'dpo' with FSDP: its DPO loss reads the lm-head weight "
            "outside the sharded model's forward (use guidance='grpo')"
        )


class _RankShare:
    """The task as one rank sees it: `sample` draws the prompts of all ranks from the shared rng (the data
    position stays identical everywhere) and returns this rank's contiguous share."""

    def __init__(self, task, rank: int, world_size: int):
        self.task, self.rank, self.world_size = task, rank, world_size

    def sample(self, rng: random.Random, n: int):
        if n % self.world_size:
            raise ValueError(f"cannot split {n} prompts over {self.world_size} processes")
        k = n // self.world_size
        return self.task.sample(rng, n)[self.rank * k : (self.rank + 1) * k]

    def __getattr__(self, name: str):
        if name == "task":  # not set yet (copy / unpickling)
            raise AttributeError(name)
        return getattr(self.task, name)


def _merge_records(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """One metrics record from the ranks' records: counts and the loss summed (each rank's loss is its share
    of the globally normalised loss), times the maximum, other numbers the mean over the ranks having them."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for r in recs for k in r):
        vals = [r[key] for r in recs if key in r]
        nums = [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(nums) != len(vals):
            out[key] = vals[0]
        elif key == "skipped":
            if len(vals) == len(recs):  # skipped only when every rank had nothing to train on
                out[key] = 1.0
        elif key in _SUM_KEYS:
            out[key] = sum(vals) if all(isinstance(v, int) for v in vals) else sum(nums)
        elif key.startswith("time_"):
            out[key] = max(nums)
        else:
            out[key] = sum(nums) / len(nums)
    return out


def _merge_eval(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The held-out metrics of the whole set from those of the ranks' contiguous slices (in rank order)."""
    n = sum(p["n"] for p in parts)
    if n == 0:
        return {"accuracy": float("nan"), "n": 0, "correct": []}
    full = [p for p in parts if p["n"]]
    out: dict[str, Any] = {"n": n, "correct": [c for p in parts for c in p["correct"]]}
    out["accuracy"] = sum(out["correct"]) / n
    for key in full[0]:
        if key in out:
            continue
        vals = [p.get(key) for p in full]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[key] = sum(v * p["n"] for v, p in zip(vals, full)) / n
        elif all(isinstance(v, list) for v in vals):
            out[key] = [x for v in vals for x in v][: max(len(v) for v in vals)]
        else:
            out[key] = vals[0]
    return out


def _no_extra_loss(extra_loss, name: str, trainer, batch) -> None:
    if extra_loss(trainer, batch) is not None:
        raise RuntimeError(
            f"hook {name!r} returned an extra_loss: the FSDP trainer does not support one (it would read "
            "sharded parameters outside the root module's forward, on some ranks only)"
        )


class DistributedTrainer(Trainer):
    """The Trainer with the model sharded by FSDP2 over the ranks of the default process group (see the
    module docstring). Initialises the group from torchrun's environment when it is not initialised yet
    (nccl on CUDA, else gloo; a one-process group when WORLD_SIZE is unset); `close()` destroys a group it
    created."""

    def __init__(self, cfg: TrainConfig, hooks: Sequence[Hook] = ()):
        cfg = cfg.validate()
        check_config(cfg, dist.get_world_size() if dist.is_initialized() else env_world_size())
        cuda = cfg.device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self._owns_group = not dist.is_initialized()
        self._scratch: Optional[str] = None
        if self._owns_group:
            self._init_group("nccl" if cuda else "gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        super().__init__(cfg, hooks)
        self._comm_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        for h in self.hooks:
            if type(h).extra_loss is not Hook.extra_loss:
                h.extra_loss = functools.partial(_no_extra_loss, h.extra_loss, h.name)
        self._shard()
        self._gathered = False
        self.head = None  # the lm-head is only read inside a root forward or on the gathered model
        self.task = _RankShare(self.task, self.rank, self.world_size)
        self._stop_request: Optional[str] = None
        self._updated = False
        # generation runs on the gathered weights with no collective: ranks must never sync inside generate
        generate = self.model.generate
        self.model.generate = lambda *a, **k: generate(*a, **{"synced_gpus": False, **k})
        torch.manual_seed(cfg.seed + 1_000_003 * self.rank)  # each rank samples its own rollouts
        self._out_dir = cfg.out_dir
        if self.rank:  # outputs from rank 0 only: the others write into a private folder, deleted by close()
            self._scratch = tempfile.mkdtemp(prefix=f"fused-rlvr-rank{self.rank}-")
            self.cfg = dataclasses.replace(self.cfg, out_dir=self._scratch, progress=False, log_samples=0)

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _init_group(backend: str) -> None:
        timeout = datetime.timedelta(minutes=30)
        if "WORLD_SIZE" in os.environ:  # torchrun (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)
            dist.init_process_group(backend, timeout=timeout)
            return
        store = os.path.join(tempfile.mkdtemp(prefix="fused-rlvr-pg-"), "store")  # --fsdp without torchrun
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1, timeout=timeout)

    def _shard(self) -> None:
        """Same initial weights on every rank (broadcast from rank 0), then fully_shard each decoder layer and
        the root (which keeps the embedding, final norm and lm-head), and a fresh optimizer on the shards."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        with torch.no_grad():
            for m in (self.model, self.ref_model):
                for t in itertools.chain(m.parameters(), m.buffers()) if m is not None else ():
                    dist.broadcast(t.data, src=0)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        for layer in getattr(getattr(self.model, "model", None), "layers", None) or ():
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self._fsdp_modules = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        for m in self._fsdp_modules:  # sum, not average: each rank's loss carries the global normaliser
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
        # the root runs first (FSDP2 picks the first module to run forward as its root), then all is resharded
        with torch.no_grad():
            ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
            self.model(input_ids=ids, use_cache=False)
        self._gathered = True
        self._release()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        kind = type(self.optimizer)  # the same optimizer and hyper-parameters, over the shards
        accepted = inspect.signature(kind).parameters
        hyper = {k: v for k, v in self.optimizer.defaults.items() if k in accepted}
        self.optimizer = kind(self.params, **hyper)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.scheduler.lr_lambdas[0])

    def _gather(self) -> None:
        """All-gather every FSDP module and keep it unsharded: forwards then need no collective."""
        if self._gathered:
            return
        for m in self._fsdp_modules:
            m.set_reshard_after_forward(False, recurse=False)
        for m in self._fsdp_modules:
            m.unshard()
        self._gathered = True
        self.head = lm_head(self.model)

    def _release(self) -> None:
        """Back to sharded parameters and FSDP2's default resharding (the root keeps its parameters between
        forward and backward, the layers free theirs after the forward)."""
        if not self._gathered:
            return
        for m in self._fsdp_modules:
            m.set_reshard_after_forward(m is not self.model, recurse=False)
        for m in self._fsdp_modules:
            m.reshard()
        self._gathered = False
        self.head = None

    def close(self) -> None:
        """Delete a rank's scratch outputs; destroy the process group when this trainer created it."""
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
        if self._owns_group and dist.is_initialized():
            dist.barrier()  # (destroying right after FSDP2's last reduce-scatter aborted once without it)
            dist.destroy_process_group()
            self._owns_group = False

    # ------------------------------------------------------------------ collectives
    def _all_reduce(self, values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def _all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    # ------------------------------------------------------------------ the update, in lockstep
    def _batch_counts(self, batch: RolloutBatch, rows: torch.Tensor) -> tuple[float, float]:
        tokens, seqs = self._all_reduce(list(super()._batch_counts(batch, rows)))
        return tokens, seqs

    def _minibatches(self, batch: RolloutBatch) -> list[torch.Tensor]:
        local = super()._minibatches(batch)
        n = int(self._all_reduce([len(local)], dist.ReduceOp.MAX)[0])
        return local + [torch.zeros(0, dtype=torch.long)] * (n - len(local))

    def _micro_batches(self, batch: RolloutBatch, rows: torch.Tensor) -> list[Optional[torch.Tensor]]:
        local = super()._micro_batches(batch, rows) if len(rows) else []
        n = int(self._all_reduce([len(local)], dist.ReduceOp.MAX)[0])
        return local + [None] * (n - len(local))  # None: a zero-weighted dummy micro-batch

    def _loss(self, batch, rows, adv, old, ref, divisor) -> tuple[torch.Tensor, dict[str, float], int]:
        """The policy loss of a micro-batch as one forward of the FSDP2 root (body + fused lm-head loss)."""
        if rows is None:
            return fsdp2_lm_head_call(self.model, self._dummy_loss), {}, 0
        base_loss = super()._loss

        def forward(model):
            self.head = lm_head(model)  # the gathered weight, inside the root's forward
            try:
                return base_loss(batch, rows, adv, old, ref, divisor)
            finally:
                self.head = None

        return fsdp2_lm_head_call(self.model, forward)

    def _dummy_loss(self, model) -> torch.Tensor:
        """0 x the log-prob of one pad token: the parameters, hooks and collectives of a real micro-batch, and
        an exactly zero gradient."""
        ids = torch.full((1, 2), self.pad_id, dtype=torch.long, device=self.device)
        hidden = last_hidden_states(model, ids, torch.ones_like(ids))[:, :-1]
        c = self.cfg
        st = lm_head(model).token_stats(
            hidden, ids[:, 1:], temperature=c.temperature, return_entropy=False, backend=c.backend
        )
        return st.logprobs.sum() * 0.0

    def _update(self, batch: RolloutBatch, adv: torch.Tensor, old, ref) -> dict[str, float]:
        self._release()
        self._updated = True
        return super()._update(batch, adv, old, ref)

    def train_step(self) -> dict[str, Any]:
        self._updated = False
        self._gather()  # phases 1-8 run on the gathered model, rank-locally
        try:
            rec = super().train_step()
        finally:
            self._release()
        if not self._updated:  # nothing to train on here: join the other ranks' update with dummy passes
            empty = RolloutBatch(
                problems=[],
                prompt_ids=[],
                group=torch.zeros(0, dtype=torch.long),
                response_ids=[],
                texts=[],
                truncated=torch.zeros(0, dtype=torch.bool),
                rewards=torch.zeros(0),
            )
            self._update(empty, torch.zeros(0), None, None)
        got = self._all_gather_object({"rec": rec, "stop": self._stop_request})
        stops = [g["stop"] for g in got if g["stop"]]
        if stops and self._stop is None:  # every rank stops after this same step
            self._stop = stops[0]
        return _merge_records([g["rec"] for g in got])

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, problems=None) -> dict[str, Any]:
        problems = list(self.heldout if problems is None else problems)
        n, r, w = len(problems), self.rank, self.world_size
        was = self._gathered
        self._gather()
        try:
            part = super().evaluate(problems[r * n // w : (r + 1) * n // w])
        finally:
            if not was:
                self._release()
        return _merge_eval(self._all_gather_object(part))

    # ------------------------------------------------------------------ checkpoints
    @property
    def ckpt_root(self) -> str:
        return os.path.join(getattr(self, "_out_dir", self.cfg.out_dir), "checkpoints")

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError(
            "the FSDP trainer's state is sharded: save() writes it with torch.distributed.checkpoint"
        )

    def _make_checkpointer(self) -> checkpoint.Checkpointer:
        def log(msg: str) -> None:
            if self.rank == 0:
                print(msg, file=sys.stderr, flush=True)

        return checkpoint.Checkpointer(
            self.ckpt_root,
            self.cfg.keep_checkpoints,
            rank=self.rank,
            world_size=self.world_size,
            barrier=dist.barrier,
            log=log,
        )

    def save(self) -> str:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self._release()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        meta = {
            "version": 1,
            "format": "dcp",
            "step": self.step,
            "world_size": self.world_size,
            "config": self.cfg.to_dict(),
            "scheduler": self.scheduler.state_dict(),
            "eval_before": self.eval_before,
        }
        mine = {"rank": self.rank, "rng": checkpoint.capture_rng(self.data_rng)}
        mine["hooks"] = [h.state_dict() for h in self.hooks]
        return self.checkpointer.save(
            self.step, meta, rank_state=mine, sharded={"model": model_sd, "optimizer": optim_sd}
        )

    def load(self, folder: str) -> None:
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        meta, mine = self.checkpointer.load(folder)
        if meta.get("format") != "dcp":
            raise ValueError(
                f"cannot resume from {folder}: it was written by a single-process run (the full model in "
                "state.pt); resume it without torchrun and --fsdp"
            )
        check_compatible(meta["config"], self.cfg, folder)
        if meta["world_size"] != self.world_size or mine is None:
            raise ValueError(
                f"cannot resume from {folder}: it was written by {meta['world_size']} processes, this run "
                f"has {self.world_size}; an exact resume needs the same number (each rank's prompts, "
                "sampling RNG and hook states)"
            )
        self._release()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        template = {"model": model_sd, "optimizer": optim_sd}
        self.checkpointer.load_sharded(folder, template)
        model_sd, optim_sd = template["model"], template["optimizer"]
        set_state_dict(self.model, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        self.scheduler.load_state_dict(meta["scheduler"])
        self._restore_run_state(
            folder, meta["config"], mine["rng"], mine["hooks"], meta["step"], meta["eval_before"]
        )

    # ------------------------------------------------------------------ signals
    def _on_signal(self, name: str) -> None:
        """Only a request: it is all-gathered at the end of each step, and every rank stops after the step in
        which any rank got one (Trainer._signals: a second signal aborts now)."""
        self._stop_request = name
        print(
            f"\n[rank {self.rank}] {name}: every rank finishes step {self.step + 1}, then saves a "
            f"checkpoint (signal again to abort without saving)",
            file=sys.stderr,
            flush=True,
        )


def is_main_process() -> bool:
    """Rank 0 of torchrun (or no torchrun): the process that prints the run's results."""
    return int(os.environ.get("RANK", "0")) == 0
