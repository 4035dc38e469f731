"""Atomic, resumable checkpoints: out_dir/checkpoints/step_000010/state.pt and a `latest` pointer.

A checkpoint is written into a temporary folder, fsync'd, then renamed into place (rename is atomic on one
file system); the `latest` file is replaced the same way only afterwards. A crash at any point leaves the
previous checkpoint intact and `latest` pointing at a complete one.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Optional

import torch

LATEST = "latest"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save(ckpt_root: str, step: int, state: dict[str, Any], keep: int) -> str:
    os.makedirs(ckpt_root, exist_ok=True)
    name = f"step_{step:06d}"
    final = os.path.join(ckpt_root, name)
    tmp = os.path.join(ckpt_root, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "state.pt"), "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if os.path.exists(final):  # re-saving a step: move the old folder aside first, so one always exists
        aside = os.path.join(ckpt_root, f".old-{name}-{os.getpid()}")
        os.rename(final, aside)
        os.rename(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    atomic_write_text(os.path.join(ckpt_root, LATEST), name + "\n")
    # folders of later steps are left over from an abandoned run past the one resumed: drop them; of the
    # rest keep the `keep` newest, never the one just written
    others = sorted(
        (int(d[5:]), d) for d in os.listdir(ckpt_root) if d.startswith("step_") and d[5:].isdigit()
    )
    older = [d for s, d in others if s < step]
    for stale in [d for s, d in others if s > step] + older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(os.path.join(ckpt_root, stale), ignore_errors=True)
    return final


def latest(ckpt_root: str) -> Optional[str]:
    path = os.path.join(ckpt_root, LATEST)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        name = fh.read().strip()
    folder = os.path.join(ckpt_root, name)
    if not os.path.exists(os.path.join(folder, "state.pt")):
        raise RuntimeError(f"checkpoint pointer {path} names {name!r}, which is missing or incomplete")
    return folder


def load(folder: str) -> dict[str, Any]:
    with open(os.path.join(folder, "state.pt"), "rb") as fh:
        return torch.load(fh, map_location="cpu", weights_only=False)
