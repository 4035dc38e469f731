"""Atomic, verified, resumable checkpoints that never run code: one protocol for one process and for many.

On disk, under `root` (the trainer's out_dir/checkpoints)::

    step_000010/
        state.pt        rank 0's state (torch.save of plain data: tensors, numbers, str, lists, dicts, tuples)
        rank00000.pt    each rank's own state (RNG, hook states), when the caller passes one
        sharded/        torch.distributed.checkpoint (model and optimizer shards), when the caller passes one
        manifest.json   written last: step, world size, and the size and SHA-256 of every other file
    step_000020/ ...
    latest              the name of the last folder written (for people and older tools; a resume does not
                        need it)

A step folder exists under its `step_N` name only once it is complete: it is written as `.tmp-step_N`, every
file fsync'd, the manifest last, then renamed into place (one rename is atomic on one file system). A
checkpoint is *valid* when its manifest names its own step and every file it lists is there with its size and
SHA-256; `Checkpointer.latest` returns the newest valid one, and when a newer one is not valid it says which
file is bad and falls back to the next. Loading uses `torch.load(weights_only=True)` (and a restricted
unpickler for torch.distributed.checkpoint's metadata), so a file planted in a checkpoint folder is refused
instead of run.

The save protocol, one file-system operation at a time (rank 0 does all but the shard and rank files):

    1. remove a leftover `.tmp-step_N` (a save of this step that was cut short), mkdir `.tmp-step_N`
    2. every rank: torch.distributed.checkpoint into `.tmp-step_N/sharded`, then its `rankRRRRR.pt` (fsync'd)
    3. `state.pt` (fsync'd), `manifest.json` (fsync'd), fsync the folder
    4. re-saving a step that exists: rename `step_N` -> `.old-step_N`
    5. rename `.tmp-step_N` -> `step_N`, fsync root          (the commit)
    6. `latest.tmp-PID` (fsync'd), rename -> `latest`, fsync root
    7. remove `.old-step_N`
    8. prune: of the valid-or-unchecked folders of earlier steps keep the keep - 1 newest; each other one is
       renamed to `.del-step_M`, then removed. Folders of later steps are never touched.

Why a kill between any two of these operations resumes: before 5 the new folder has a dot name, which no
reader counts, and every earlier checkpoint is untouched; between 4 and 5 the only copy of step N is
`.old-step_N`, which `latest` counts as step N and `prepare` renames back; from 5 on `step_N` is complete and
the newest; a half-removed `.old-` or `.del-` folder is either redundant or no longer counted. `prepare()` (at
start) removes `.tmp-`, `.del-` and `latest.tmp-` leftovers and puts a lone `.old-step_N` back.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import sys
from collections.abc import Callable
from typing import Any, Optional

import torch

from fused_rlvr.train.files import atomic_write_text, fsync_dir

__all__ = [
    "FORMAT_VERSION",
    "LATEST",
    "MANIFEST",
    "SHARDED",
    "STATE",
    "CheckpointError",
    "Checkpointer",
    "atomic_write_text",
    "capture_rng",
    "restore_rng",
    "step_name",
]

LATEST = "latest"
MANIFEST = "manifest.json"
STATE = "state.pt"
SHARDED = "sharded"
FORMAT_VERSION = 2

_STEP_RE = re.compile(r"step_(\d+)")
_TMP, _OLD, _DEL = ".tmp-", ".old-", ".del-"


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be used (incomplete, corrupt, not plain data), or none to resume."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def step_name(step: int) -> str:
    """The folder name of a step's checkpoint: step_000010."""
    return f"step_{step:06d}"


def _rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


# --------------------------------------------------------------------------------------- small file helpers
def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _torch_save(obj: Any, path: str) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _remove_tree(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.unlink(path)
        except OSError:
            pass


def _sha256(path: str) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(1 << 22)
            if not block:
                break
            h.update(block)
            n += len(block)
    return n, h.hexdigest()


def _files_under(folder: str) -> list[str]:
    """Relative paths ('/'-separated) of every file under `folder` except the manifest, sorted."""
    out = []
    for dirpath, _dirs, files in os.walk(folder):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), folder).replace(os.sep, "/")
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# ------------------------------------------------------------------------------------------------ RNG state
def _python_rng(state: tuple) -> dict[str, Any]:
    version, internal, gauss = state
    return {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_rng_state(d: Any, what: str) -> tuple:
    ok = (
        isinstance(d, dict)
        and isinstance(d.get("version"), int)
        and isinstance(d.get("state"), torch.Tensor)
        and d["state"].dtype == torch.int64
        and d["state"].dim() == 1
        and (d.get("gauss") is None or isinstance(d.get("gauss"), float))
    )
    if not ok:
        raise CheckpointError(f"checkpoint RNG state {what!r} is malformed: expected version, state, gauss")
    return (d["version"], tuple(int(x) for x in d["state"].tolist()), d["gauss"])


def capture_rng(data_rng: random.Random) -> dict[str, Any]:
    """Every random stream a run draws from, as tensors and plain types (loadable with weights_only=True):
    "python" (the `random` module), "data" (`data_rng`: the prompt order), "torch" (CPU) and, when CUDA is
    available, "cuda" (one state per device). `restore_rng` puts them back."""
    out: dict[str, Any] = {
        "python": _python_rng(random.getstate()),
        "data": _python_rng(data_rng.getstate()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = list(torch.cuda.get_rng_state_all())
    return out


def restore_rng(data_rng: random.Random, state: dict[str, Any]) -> None:
    """Restore what `capture_rng` returned: the `random` module, `data_rng`, torch's CPU generator and (when
    both the state and this machine have them) the CUDA generators."""
    if not isinstance(state, dict) or not {"python", "data", "torch"} <= set(state):
        raise CheckpointError("checkpoint RNG state must hold 'python', 'data' and 'torch'")
    py, data = _python_rng_state(state["python"], "python"), _python_rng_state(state["data"], "data")
    cpu = state["torch"]
    if not isinstance(cpu, torch.Tensor) or cpu.dtype != torch.uint8:
        raise CheckpointError("checkpoint RNG state 'torch' must be a uint8 tensor")
    try:
        random.setstate(py)
        data_rng.setstate(data)
        torch.set_rng_state(cpu)
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint RNG state cannot be restored: {_first_line(e)}") from None
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------- torch.distributed.checkpoint, plain data
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_PATH_CLASSES = ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")


class _PlainMetadataUnpickler(pickle.Unpickler):
    """Unpickles torch.distributed.checkpoint's `.metadata`, which it writes with plain pickle, allowing only
    the globals such metadata holds: its own dataclasses and enums, torch.Size / dtypes / device / layout,
    and paths. Anything else (a callable that would run on load) is refused."""

    def find_class(self, module: str, name: str):
        import dataclasses
        import enum

        obj = None
        if module in _DCP_MODULES:
            cand = getattr(sys.modules.get(module) or __import__(module, fromlist=[name]), name, None)
            if isinstance(cand, type) and (dataclasses.is_dataclass(cand) or issubclass(cand, enum.Enum)):
                obj = cand
        elif module == "torch" and name in ("Size", "device"):
            obj = getattr(torch, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            obj = getattr(torch, name)
        elif module == "torch.serialization" and name == "_get_layout":  # (how a pickle names a layout)
            obj = getattr(torch.serialization, name)
        elif module == "pathlib" and name in _PATH_CLASSES:
            import pathlib

            obj = getattr(pathlib, name)
        elif module == "collections" and name == "OrderedDict":
            import collections

            obj = collections.OrderedDict
        if obj is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in checkpoint metadata")
        return obj


def _dcp_reader_and_planner(path: str):
    """A FileSystemReader and DefaultLoadPlanner that refuse anything but plain data (the metadata through
    `_PlainMetadataUnpickler`, every non-tensor item through torch.load(weights_only=True)) before the
    library's own loaders read it, and the list of refusals they made."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    refused: list[str] = []  # (the library wraps what its reader / planner raise in its own exception)

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            meta = os.path.join(str(self.path), ".metadata")
            try:
                with open(meta, "rb") as fh:
                    _PlainMetadataUnpickler(fh).load()
            except Exception as e:
                refused.append(
                    f"checkpoint file {meta} is not plain checkpoint metadata ({_first_line(e)}): refused "
                    "(a checkpoint never runs code)"
                )
                raise CheckpointError(refused[-1]) from None
            return super().read_metadata(*args, **kwargs)

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                torch.load(value, map_location="cpu", weights_only=True)
            except Exception as e:
                refused.append(
                    f"checkpoint item {read_item.dest_index.fqn!r} in {path} is not plain data "
                    f"({_first_line(e)}): refused (a checkpoint never runs code)"
                )
                raise CheckpointError(refused[-1]) from None
            value.seek(0)  # proven plain data: the library's own loader then builds the same objects
            super().load_bytes(read_item, value)

    return Reader(path), Planner(), refused


# ------------------------------------------------------------------------------------------- Checkpointer
class Checkpointer:
    """Saves, finds, verifies and loads the checkpoints under `root` (module docstring: layout, protocol).

    `keep`: checkpoints kept (the one just written and the keep - 1 newest of earlier steps). With several
    processes every rank constructs one with its `rank`, the `world_size` and a `barrier` (e.g.
    torch.distributed.barrier) and calls every method; rank 0 alone renames and deletes. `log` receives the
    one-line notes (a fallback, a cleaned-up leftover)."""

    def __init__(
        self,
        root: str,
        keep: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] = lambda: None,
        log: Callable[[str], None] = _stderr,
    ):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
        self.root, self.keep, self.rank, self.world_size = str(root), keep, rank, world_size
        self._barrier, self._log = barrier, log
        self._verified: dict[str, dict[str, Any]] = {}  # folder -> its manifest, verified by this object
        self._invalid: dict[str, str] = {}  # folder -> why it is not usable

    # ----------------------------------------------------------------------------------------- listing
    def _entries(self) -> list[str]:
        try:
            return os.listdir(self.root)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _step_folders(self) -> dict[int, str]:
        out = {}
        for e in self._entries():
            m = _STEP_RE.fullmatch(e)
            if m and os.path.isdir(os.path.join(self.root, e)):
                out[int(m.group(1))] = os.path.join(self.root, e)
        return out

    def _lone_old(self) -> dict[int, list[str]]:
        """`.old-step_N` folders (a re-save cut between its two renames) of steps with no `step_N` folder."""
        have = self._step_folders()
        out: dict[int, list[str]] = {}
        for e in sorted(self._entries()):
            m = re.fullmatch(r"\.old-step_(\d+)(-\d+)?", e)
            if m and int(m.group(1)) not in have and os.path.isdir(os.path.join(self.root, e)):
                out.setdefault(int(m.group(1)), []).append(os.path.join(self.root, e))
        return out

    def _candidates(self) -> list[tuple[int, str]]:
        """(step, folder) of every checkpoint there may be, newest first."""
        found = [(s, f) for s, f in self._step_folders().items()]
        found += [(s, f) for s, fs in self._lone_old().items() for f in fs]
        return sorted(found, key=lambda sf: -sf[0])

    def has_checkpoints(self) -> bool:
        """True when `root` holds a step folder, a recoverable `.old-` one or a `latest` pointer (valid or
        not): a fresh run refuses to start there."""
        return bool(self._candidates()) or os.path.lexists(os.path.join(self.root, LATEST))

    # ----------------------------------------------------------------------------------------- cleanup
    def prepare(self) -> None:
        """At start (every rank calls it): remove what an interrupted save or prune left (`.tmp-`, `.del-`
        folders, `latest.tmp-` files) and rename a lone `.old-step_N` back to `step_N`."""
        if self.rank == 0:
            lone = {f for fs in self._lone_old().values() for f in fs[:1]}
            for e in sorted(self._entries()):
                path = os.path.join(self.root, e)
                if path in lone:
                    dest = os.path.join(self.root, re.fullmatch(r"\.old-(step_\d+)(-\d+)?", e).group(1))
                    os.rename(path, dest)
                    fsync_dir(self.root)
                    self._log(f"checkpoint: restored {dest} (a re-save of it was interrupted)")
                elif e.startswith((_TMP, _DEL, _OLD, f"{LATEST}.tmp-")):
                    _remove_tree(path)
                    self._log(f"checkpoint: removed {path}, left over from an interrupted save")
        self._barrier()

    # -------------------------------------------------------------------------------------- verifying
    def _verify(self, folder: str) -> dict[str, Any]:
        """The folder's manifest when every file it lists matches; a CheckpointError naming the bad file."""
        folder = os.path.normpath(folder)
        if folder in self._verified:
            return self._verified[folder]
        if folder in self._invalid:
            raise CheckpointError(self._invalid[folder])
        try:
            manifest = self._check(folder)
        except CheckpointError as e:
            self._invalid[folder] = str(e)
            raise
        self._verified[folder] = manifest
        return manifest

    @staticmethod
    def _check(folder: str) -> dict[str, Any]:
        path = os.path.join(folder, MANIFEST)
        if not os.path.isdir(folder):
            raise CheckpointError(f"checkpoint {folder} does not exist")
        try:
            with open(path, "rb") as fh:
                manifest = json.loads(fh.read().decode("utf-8"))
        except FileNotFoundError:
            raise CheckpointError(
                f"checkpoint {folder} has no {MANIFEST}: it is incomplete or written by an older version, "
                "and cannot be verified"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"checkpoint file {path} is not readable JSON ({_first_line(e)})") from None
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if (
            not isinstance(files, dict)
            or manifest.get("version") != FORMAT_VERSION
            or not isinstance(manifest.get("step"), int)
            or STATE not in files
        ):
            raise CheckpointError(f"checkpoint file {path} is not a version-{FORMAT_VERSION} manifest")
        m = re.search(r"step_(\d+)", os.path.basename(folder))
        if m is None or int(m.group(1)) != manifest["step"]:
            raise CheckpointError(
                f"checkpoint {folder}: its {MANIFEST} is for step {manifest['step']}, not this folder's step"
            )
        for rel, info in sorted(files.items()):
            parts = rel.split("/")
            if os.path.isabs(rel) or ".." in parts or not isinstance(info, dict):
                raise CheckpointError(f"checkpoint file {path} lists an invalid entry {rel!r}")
            fp = os.path.join(folder, *parts)
            if not os.path.isfile(fp):
                raise CheckpointError(f"checkpoint {folder}: file {rel} is missing")
            size = os.path.getsize(fp)
            if size != info.get("bytes"):
                raise CheckpointError(
                    f"checkpoint {folder}: file {rel} has {size} bytes, the manifest says "
                    f"{info.get('bytes')} (truncated or overwritten)"
                )
            if _sha256(fp)[1] != info.get("sha256"):
                raise CheckpointError(
                    f"checkpoint {folder}: file {rel} does not match its SHA-256 in {MANIFEST} (corrupt)"
                )
        return manifest

    def latest(self) -> Optional[str]:
        """The newest valid checkpoint folder (its manifest and every file's checksum verified). A newer one
        that is not valid is reported through `log` (which file, why) and the next older one is tried. None
        when `root` holds no checkpoint; CheckpointError when it holds some but none is valid."""
        bad = []
        for _step, folder in self._candidates():
            try:
                self._verify(folder)
            except CheckpointError as e:
                bad.append(str(e))
                continue
            for why in bad:
                self._log(f"{why}: not usable, falling back to {folder}")
            return folder
        if bad:
            raise CheckpointError(f"no valid checkpoint in {self.root}: " + "; ".join(bad))
        pointer = os.path.join(self.root, LATEST)
        if os.path.lexists(pointer):
            raise CheckpointError(
                f"no checkpoint in {self.root}, but {pointer} exists: the step folders were removed"
            )
        return None

    # ----------------------------------------------------------------------------------------- loading
    def _load_file(self, folder: str, rel: str) -> Any:
        path = os.path.join(folder, *rel.split("/"))
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"checkpoint file {path} cannot be loaded as plain data (tensors, numbers, strings, lists, "
                f"dicts) ({_first_line(e)}): refused (a checkpoint never runs code)"
            ) from None
        if not isinstance(obj, dict):
            raise CheckpointError(f"checkpoint file {path} holds a {type(obj).__name__}, not a dict")
        return obj

    def load(self, folder: str) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
        """(rank 0's state, this rank's rank_state or None) of a checkpoint folder, after verifying it
        (CheckpointError naming the bad file); torch.load(weights_only=True), on the CPU."""
        manifest = self._verify(folder)
        state = self._load_file(folder, STATE)
        mine = _rank_file(self.rank)
        return state, (self._load_file(folder, mine) if mine in manifest["files"] else None)

    def load_sharded(self, folder: str, template: dict[str, Any]) -> None:
        """torch.distributed.checkpoint.load of the folder's `sharded/` into `template` (state dicts, e.g.
        {"model": ..., "optimizer": ...} from get_state_dict), in place; every rank calls it."""
        manifest = self._verify(folder)
        if not any(rel.startswith(SHARDED + "/") for rel in manifest["files"]):
            raise CheckpointError(f"checkpoint {folder} has no sharded state ({SHARDED}/)")
        import torch.distributed.checkpoint as dcp

        path = os.path.join(folder, SHARDED)
        reader, planner, refused = _dcp_reader_and_planner(path)
        try:
            dcp.load(template, checkpoint_id=path, storage_reader=reader, planner=planner)
        except (Exception, dcp.CheckpointException) as e:  # (the latter is a BaseException)
            if refused:
                raise CheckpointError(refused[0]) from None
            raise CheckpointError(f"checkpoint {path} cannot be loaded: {_first_line(e)}") from e

    # ------------------------------------------------------------------------------------------ saving
    def save(
        self,
        step: int,
        state: dict[str, Any],
        *,
        rank_state: Optional[dict[str, Any]] = None,
        sharded: Optional[dict[str, Any]] = None,
    ) -> str:
        """Write the checkpoint of `step` (module docstring: the protocol) and prune; returns its folder.

        state: rank 0's plain state (other ranks' is ignored). rank_state: this rank's own state, a file per
        rank. sharded: state dicts for torch.distributed.checkpoint (every rank calls save). All must be
        plain data (tensors, numbers, str, lists, dicts, tuples)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        name = step_name(step)
        final = os.path.join(self.root, name)
        tmp, old = os.path.join(self.root, _TMP + name), os.path.join(self.root, _OLD + name)
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            if os.path.lexists(tmp):
                _remove_tree(tmp)
            os.mkdir(tmp)
        self._barrier()
        try:
            if sharded is not None:
                import torch.distributed.checkpoint as dcp

                dcp.save(sharded, checkpoint_id=os.path.join(tmp, SHARDED))
            if rank_state is not None:
                _torch_save(rank_state, os.path.join(tmp, _rank_file(self.rank)))
        except OSError as e:
            if self.rank == 0:
                _remove_tree(tmp)  # e.g. a full disk: free what this save took
            raise OSError(e.errno, f"cannot write checkpoint {final}: {e.strerror or e}") from e
        self._barrier()
        if self.rank == 0:
            try:
                _torch_save(state, os.path.join(tmp, STATE))
                files = {}
                for rel in _files_under(tmp):
                    size, digest = _sha256(os.path.join(tmp, *rel.split("/")))
                    files[rel] = {"bytes": size, "sha256": digest}
                manifest = {"version": FORMAT_VERSION, "step": step, "world_size": self.world_size}
                manifest["files"] = files
                _write_bytes(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1).encode("utf-8"))
                for dirpath, _dirs, _files in os.walk(tmp):
                    fsync_dir(dirpath)
            except OSError as e:
                _remove_tree(tmp)
                raise OSError(e.errno, f"cannot write checkpoint {final}: {e.strerror or e}") from e
            self._commit(step, tmp, final, old)
            self._verified[os.path.normpath(final)] = manifest
            self._invalid.pop(os.path.normpath(final), None)
            self._prune(step)
        self._barrier()
        return final

    def _commit(self, step: int, tmp: str, final: str, old: str) -> None:
        if os.path.isdir(final):  # re-saving a step: the old folder stays (aside) until the new one is in
            if os.path.lexists(old):
                _remove_tree(old)
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(self.root)
        atomic_write_text(os.path.join(self.root, LATEST), os.path.basename(final) + "\n")
        fsync_dir(self.root)
        if os.path.lexists(old):
            _remove_tree(old)

    def _prune(self, step: int) -> None:
        """Keep the keep - 1 newest earlier checkpoints not known to be invalid; never touch later steps."""
        older = sorted(((s, f) for s, f in self._step_folders().items() if s < step), reverse=True)
        kept = 0
        for _s, folder in older:
            if os.path.normpath(folder) not in self._invalid and kept < self.keep - 1:
                kept += 1
                continue
            doomed = os.path.join(self.root, _DEL + os.path.basename(folder))
            _remove_tree(doomed)
            os.rename(folder, doomed)
            _remove_tree(doomed)
            self._verified.pop(os.path.normpath(folder), None)
