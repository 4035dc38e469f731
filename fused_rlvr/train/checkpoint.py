"""Atomic, resumable checkpoints: out_dir/checkpoints/step_000010/ and a `latest` pointer, 1 or N processes.

A checkpoint folder holds state.pt (rank 0's plain state), rankRRRRR.pt (each process's own state: RNG
streams, hook states) and, with several processes, sharded/ (torch.distributed.checkpoint: model and
optimizer shards). It is written into a temporary folder, fsync'd, then renamed into place (rename is atomic
on one file system); the `latest` pointer is replaced the same way only afterwards. A crash at any point
leaves the previous checkpoint intact. After a save, folders of later steps (an abandoned run past the one
resumed) are removed, and of the earlier ones the `keep - 1` newest are kept: never the one just written.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from collections.abc import Callable
from typing import Any, Optional

import torch

from fused_rlvr.train.files import atomic_write_text, fsync_dir

LATEST = "latest"
STATE = "state.pt"
SHARDED = "sharded"


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be used."""


def _print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _fsync_save(obj: Any, path: str) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _step_of(name: str) -> Optional[int]:
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None


class Checkpointer:
    """Saves and finds the checkpoints under `root`; every process of a run makes one with its rank."""

    def __init__(
        self,
        root: str,
        keep: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] = lambda: None,
        log: Callable[[str], None] = _print_to_stderr,
    ):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root, self.keep, self.rank, self.world_size = root, keep, rank, world_size
        self.barrier, self.log = barrier, log

    def _rank_file(self, folder: str, rank: int) -> str:
        return os.path.join(folder, f"rank{rank:05d}.pt")

    def _steps(self) -> list[tuple[int, str]]:
        if not os.path.isdir(self.root):
            return []
        return sorted((s, d) for d in os.listdir(self.root) if (s := _step_of(d)) is not None)

    def prepare(self) -> None:
        """Remove temporary folders a crash left behind (every process calls it)."""
        if self.rank == 0 and os.path.isdir(self.root):
            for d in os.listdir(self.root):
                if d.startswith((".tmp-", ".old-")):
                    shutil.rmtree(os.path.join(self.root, d), ignore_errors=True)
        self.barrier()

    def has_checkpoints(self) -> bool:
        return os.path.exists(os.path.join(self.root, LATEST)) or bool(self._steps())

    def _valid(self, folder: str) -> bool:
        if not os.path.exists(os.path.join(folder, STATE)):
            return False
        return self.world_size == 1 or os.path.exists(os.path.join(folder, SHARDED))

    def latest(self) -> Optional[str]:
        """The newest valid checkpoint folder (an older valid one, saying so, when the newest is not), None
        when there is none; CheckpointError when checkpoints exist but none is valid."""
        steps = self._steps()
        if not steps:
            return None
        for i, (_, d) in enumerate(reversed(steps)):
            folder = os.path.join(self.root, d)
            if self._valid(folder):
                if i:
                    self.log(f"checkpoint: {steps[-1][1]} is incomplete, using {d}")
                return folder
        raise CheckpointError(f"no usable checkpoint in {self.root}: {[d for _, d in steps]} are incomplete")

    def save(
        self,
        step: int,
        state: dict[str, Any],
        *,
        rank_state: Optional[dict[str, Any]] = None,
        sharded: Optional[dict[str, Any]] = None,
    ) -> str:
        """Write the checkpoint of `step` (every process calls it); returns its folder."""
        name = f"step_{step:06d}"
        final, tmp = os.path.join(self.root, name), os.path.join(self.root, f".tmp-{name}")
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        self.barrier()
        if sharded is not None:
            import torch.distributed.checkpoint as dcp

            dcp.save(sharded, checkpoint_id=os.path.join(tmp, SHARDED))
        if rank_state is not None:
            _fsync_save(rank_state, self._rank_file(tmp, self.rank))
        self.barrier()
        if self.rank == 0:
            _fsync_save(state, os.path.join(tmp, STATE))
            fsync_dir(tmp)
            if os.path.exists(final):  # re-saving a step: move the old folder aside first
                aside = os.path.join(self.root, f".old-{name}")
                shutil.rmtree(aside, ignore_errors=True)
                os.rename(final, aside)
                os.rename(tmp, final)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.rename(tmp, final)
            fsync_dir(self.root)
            atomic_write_text(os.path.join(self.root, LATEST), name + "\n")
            self._rotate(step)
        self.barrier()
        return final

    def _rotate(self, step: int) -> None:
        steps = self._steps()
        older = [d for s, d in steps if s < step]
        for stale in [d for s, d in steps if s > step] + older[: max(0, len(older) - (self.keep - 1))]:
            shutil.rmtree(os.path.join(self.root, stale), ignore_errors=True)

    def load(self, folder: str) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
        """(rank 0's state, this process's rank_state or None)."""
        try:
            with open(os.path.join(folder, STATE), "rb") as fh:
                state = torch.load(fh, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"{folder} has no {STATE}") from None
        path = self._rank_file(folder, self.rank)
        mine = torch.load(path, map_location="cpu", weights_only=True) if os.path.exists(path) else None
        return state, mine

    def load_sharded(self, folder: str, template: dict[str, Any]) -> None:
        """torch.distributed.checkpoint.load of the shards into `template`, in place."""
        import torch.distributed.checkpoint as dcp

        dcp.load(template, checkpoint_id=os.path.join(folder, SHARDED))


def capture_rng(data_rng: random.Random) -> dict[str, Any]:
    """The data stream's, Python's, torch's and CUDA's RNG states, as plain values."""
    rng = {"data": data_rng.getstate(), "python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(data_rng: random.Random, state: dict[str, Any]) -> None:
    """Put back the RNG states `capture_rng` took."""
    data_rng.setstate(_as_tuple(state["data"]))
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    """random.setstate wants tuples; a round trip through some formats gives lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
