"""One process or several: everything the loop does differently under `torchrun --nproc_per_node N`.

`Parallel` is the one-process form: every method is a no-op or the identity, so the trainer's loop reads
the same for 1 and N processes. `FSDP2` is the data-parallel form with the model sharded by FSDP2
(`fully_shard`), over the default process group (nccl on CUDA, gloo on the CPU):

1. Set-up (`shard`): the same initial weights on every process (broadcast from rank 0), then each decoder
   layer and the root (embedding, final norm, lm-head) sharded, before the trainer builds its optimizer.
2. Data (`share`, `refill_split`): every process draws the prompts of all processes from the shared seeded
   data stream (so the data position is the same everywhere) and keeps its contiguous share; a group never
   crosses processes, so rewards, group filters, advantages and hooks work on whole groups, locally. A
   refill round draws the number of groups missing on all processes together and hands each its own part:
   every process runs the same number of rounds, and the prompts are those a single process would draw.
3. Rollouts, rewards, hooks, old / reference log-probs, evaluation (`gathered`): on the gathered model.
   Every FSDP module is all-gathered once (the same collectives, in the same order, everywhere) and kept
   unsharded, so generation and scoring need no collective and processes may generate different numbers
   of sequences and tokens. Cost: one full copy of the model per process during these phases.
4. Update (`root_call`, `sum`, `pad`): sharded. Every forward with gradients (the policy loss of each
   micro-batch, a hook's extra loss such as DPO) runs as one forward of the FSDP2 root
   (`fused_rlvr.fsdp.fsdp2_lm_head_call`), so the fused op sees the gathered [V, H] weight and its gradient
   is reduce-scattered. The whole-batch normaliser is global (token / sequence counts summed) and FSDP2
   sums the gradients (divide factor 1), so the gradient is that of one process on the whole batch. A
   process with fewer minibatches or micro-batches pads with zero-weighted passes (a hook's extra loss
   does the same: `StepContext.zero_loss`), so every process runs the same forwards and backwards.
   Gradient clipping uses the global norm.
5. Metrics and evaluation (`merge_step`, `eval_share`, `merge_eval`): counts and the loss summed, times the
   maximum, the rest the mean over processes; each process decodes a slice of the held-out set.
6. Checkpoints (`model_state`, `load_model_state`): sharded through torch.distributed.checkpoint; a resume
   needs the same number of processes. Outputs come from rank 0 only.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Optional, TypeVar

import torch

if TYPE_CHECKING:  # pragma: no cover
    from fused_rlvr.train.checkpoint import Checkpointer
    from fused_rlvr.train.config import TrainConfig

T = TypeVar("T")
# counts (and the loss: each process's is its share of the globally normalised loss), summed over processes
SUM_KEYS = (
    "loss",
    "n_samples",
    "n_groups",
    "groups_dropped",
    "skipped_updates",
    "dars_extra_rollouts",
    "guided_groups",
    "guided_samples",
    "dpo_pairs",
    "std_filter_candidates",
)


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 of torchrun (or no torchrun): the process that prints the run's results."""
    return int(os.environ.get("RANK", "0")) == 0


class Parallel:
    """One process: shares are everything, sums are the values, padding adds nothing."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, model: torch.nn.Module, frozen: Sequence[Optional[torch.nn.Module]] = ()) -> None:
        """Make `model` ready for training on the processes (before the optimizer is built)."""

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Within: the model's full weights on this process, forwards without collectives."""
        yield

    def root_call(self, model: torch.nn.Module, fn: Callable[[torch.nn.Module], Any]) -> Any:
        """`fn(model)` as the model's root forward (every forward that needs gradients goes through it)."""
        return fn(model)

    def share(self, items: list[T]) -> list[T]:
        """This process's contiguous share of a list every process drew alike."""
        return items

    def per_process(self, n: int) -> int:
        """This process's share of a count that divides evenly (prompts per step)."""
        return n

    def refill_split(self, missing: int) -> tuple[int, slice]:
        """(how many prompts every process draws, the slice of them that is this process's) for a refill
        round in which this process misses `missing` groups."""
        return missing, slice(0, missing)

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the processes (the whole-batch normaliser's counts)."""
        return [float(v) for v in values]

    def global_sum(self, value: float) -> float:
        return self.sum([value])[0]

    def pad(self, items: list[T], filler: T) -> list[T]:
        """`items` padded with `filler` to the longest list any process has."""
        return items

    def merge_step(self, rec: dict[str, Any]) -> dict[str, Any]:
        """One step's metrics of all processes (`merge_records`)."""
        return rec

    def any_stop(self, request: Optional[str]) -> Optional[str]:
        """A stop request (signal name) if any process got one, else None."""
        return request

    def all_true(self, flag: bool) -> bool:
        """True when `flag` is True on every process."""
        return flag

    def eval_share(self, problems: list[T]) -> list[T]:
        """The contiguous slice of the held-out problems this process decodes."""
        return problems

    def merge_eval(self, part: dict[str, Any]) -> dict[str, Any]:
        """The held-out metrics of the whole set from every process's slice (`merge_eval`)."""
        return part

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ checkpoints
    def model_state(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
        """(entries of rank 0's plain state, the sharded state for torch.distributed.checkpoint or None)."""
        params = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        return {"model": params, "optimizer": optimizer.state_dict()}, None

    def check_state(self, state: dict[str, Any], folder: str) -> None:
        """Refuse a checkpoint written by another number of processes."""
        if state.get("format") == "dcp":
            raise ValueError(
                f"cannot resume from {folder}: it is a sharded FSDP2 checkpoint; resume it with --fsdp true "
                "(under torchrun with as many processes as wrote it)"
            )

    def load_model_state(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        state: dict[str, Any],
        folder: str,
        checkpointer: Checkpointer,
    ) -> None:
        params = dict(model.named_parameters())
        if set(state["model"]) != {n for n, p in params.items() if p.requires_grad}:
            raise ValueError(
                f"cannot resume from {folder}: its trainable parameters differ from this model's"
            )
        with torch.no_grad():
            for n, v in state["model"].items():
                params[n].copy_(v)
        optimizer.load_state_dict(state["optimizer"])


def check_config(cfg: TrainConfig, world_size: int) -> None:
    """Raise a ValueError naming the field for what FSDP2 cannot do with `world_size` processes."""
    if cfg.prompts_per_step % world_size:
        raise ValueError(
            f"config field 'prompts_per_step' must be divisible by the number of processes ({world_size}) "
            f"with FSDP, got {cfg.prompts_per_step}: each rank rolls out prompts_per_step / {world_size} "
            "whole groups"
        )


class FSDP2(Parallel):
    """The model sharded by FSDP2 over the default process group (see the module docstring). Initialises
    the group from torchrun's environment when it is not initialised yet (a one-process group when
    WORLD_SIZE is unset); `close()` destroys a group it created."""

    def __init__(self, cfg: TrainConfig):
        import torch.distributed as dist

        self.dist = dist
        check_config(cfg, dist.get_world_size() if dist.is_initialized() else env_world_size())
        cuda = cfg.device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self.owns_group = not dist.is_initialized()
        if self.owns_group:
            _init_group("nccl" if cuda else "gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.comm_device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
        self.modules: list[torch.nn.Module] = []
        self.is_gathered = False

    def shard(self, model, frozen=()):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        with torch.no_grad():
            for m in (model, *frozen):
                for t in itertools.chain(m.parameters(), m.buffers()) if m is not None else ():
                    self.dist.broadcast(t.data, src=0)
        device = next(model.parameters()).device
        mesh = init_device_mesh(device.type, (self.world_size,))
        for layer in getattr(getattr(model, "model", None), "layers", None) or ():
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.root = model
        self.modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in self.modules:  # sum, not average: each process's loss carries the global normaliser
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
        # the root runs first (FSDP2 picks the first module to run forward as its root), then all is resharded
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)
        self.is_gathered = True
        self._release()

    def _gather(self) -> None:
        for m in self.modules:
            m.set_reshard_after_forward(False, recurse=False)
        for m in self.modules:
            m.unshard()
        self.is_gathered = True

    def _release(self) -> None:
        """Back to sharded parameters and FSDP2's default resharding (the root keeps its parameters between
        forward and backward, the layers free theirs after the forward)."""
        for m in self.modules:
            m.set_reshard_after_forward(m is not self.root, recurse=False)
        for m in self.modules:
            m.reshard()
        # FSDP2 records the order of every forward, the no-grad ones of the gathered phases included, and
        # picks what to prefetch in the next backward from it: a process that scored more sequences (or
        # none) than another would prefetch other modules and the collectives would no longer match.
        # Forget that order here (where FSDPModule.reset_iter_state exists; nothing is in flight now).
        reset = getattr(self.root, "reset_iter_state", None)
        if reset is not None:
            reset()
        self.is_gathered = False

    @contextlib.contextmanager
    def gathered(self):
        if self.is_gathered:  # nested (an evaluation within gathered phases)
            yield
            return
        self._gather()
        try:
            yield
        finally:
            self._release()

    def root_call(self, model, fn):
        from fused_rlvr.fsdp import fsdp2_lm_head_call

        return fsdp2_lm_head_call(model, fn)

    def share(self, items):
        if len(items) % self.world_size:
            raise ValueError(f"cannot split {len(items)} prompts over {self.world_size} processes")
        k = len(items) // self.world_size
        return items[self.rank * k : (self.rank + 1) * k]

    def per_process(self, n):
        return n // self.world_size

    def _all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self.dist.all_gather_object(out, obj)
        return out

    def _all_reduce(self, values: Sequence[float], op) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.comm_device)
        self.dist.all_reduce(t, op=op)
        return t.tolist()

    def refill_split(self, missing):
        counts = [int(c) for c in self._all_gather(int(missing))]
        start = sum(counts[: self.rank])
        return sum(counts), slice(start, start + missing)

    def sum(self, values):
        return self._all_reduce(values, self.dist.ReduceOp.SUM)

    def pad(self, items, filler):
        n = int(self._all_reduce([len(items)], self.dist.ReduceOp.MAX)[0])
        return items + [filler] * (n - len(items))

    def merge_step(self, rec):
        return merge_records(self._all_gather(rec))

    def any_stop(self, request):
        stops = [s for s in self._all_gather(request) if s]
        return stops[0] if stops else None

    def all_true(self, flag):
        return bool(self._all_reduce([0.0 if flag else 1.0], self.dist.ReduceOp.SUM)[0] == 0)

    def eval_share(self, problems):
        n, r, w = len(problems), self.rank, self.world_size
        return problems[r * n // w : (r + 1) * n // w]

    def merge_eval(self, part):
        return merge_eval(self._all_gather(part))

    def barrier(self):
        self.dist.barrier()

    def close(self):
        """Destroy the process group when this object created it."""
        if self.owns_group and self.dist.is_initialized():
            # (destroying right after FSDP2's last reduce-scatter aborted once without this barrier)
            self.dist.barrier()
            self.dist.destroy_process_group()
            self.owns_group = False

    def model_state(self, model, optimizer):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        return {"format": "dcp", "world_size": self.world_size}, {"model": model_sd, "optimizer": optim_sd}

    def check_state(self, state, folder):
        if state.get("format") != "dcp":
            raise ValueError(
                f"cannot resume from {folder}: it was written by a single-process run (the full model in "
                "state.pt); resume it without torchrun and --fsdp"
            )
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"cannot resume from {folder}: it was written by {state['world_size']} processes, this run "
                f"has {self.world_size}; an exact resume needs the same number (each rank's prompts, "
                "sampling RNG and hook states)"
            )

    def load_model_state(self, model, optimizer, state, folder, checkpointer):
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        template = {"model": model_sd, "optimizer": optim_sd}
        checkpointer.load_sharded(folder, template)
        set_state_dict(
            model, optimizer, model_state_dict=template["model"], optim_state_dict=template["optimizer"]
        )


def _init_group(backend: str) -> None:
    import torch.distributed as dist

    timeout = datetime.timedelta(minutes=30)
    if "WORLD_SIZE" in os.environ:  # torchrun (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)
        dist.init_process_group(backend, timeout=timeout)
        return
    store = os.path.join(tempfile.mkdtemp(prefix="fused-rlvr-pg-"), "store")  # --fsdp without torchrun
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1, timeout=timeout)


def make_parallel(cfg: TrainConfig) -> Parallel:
    """FSDP2 when the config asks for it (`fsdp`), under torchrun with several processes, or inside an
    initialised process group of several; else one process."""
    import torch.distributed as dist

    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if cfg.fsdp or env_world_size() > 1 or several:
        return FSDP2(cfg)
    return Parallel()


def merge_records(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """One metrics record from the processes' records: counts and the loss summed (each process's loss is
    its share of the globally normalised loss), times the maximum, other numbers the mean over the
    processes having them."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for r in recs for k in r):
        vals = [r[key] for r in recs if key in r]
        nums = [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(nums) != len(vals):
            out[key] = vals[0]
        elif key == "skipped":
            if len(vals) == len(recs):  # skipped only when every process had nothing to train on
                out[key] = 1.0
        elif key in SUM_KEYS:
            out[key] = sum(vals) if all(isinstance(v, int) for v in vals) else sum(nums)
        elif key.startswith("time_"):
            out[key] = max(nums)
        else:
            out[key] = sum(nums) / len(nums)
    return out


def merge_eval(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The held-out metrics of the whole set from those of the processes' contiguous slices (rank order)."""
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
