"""Fault injection for the checkpoint tests: a kill between two file-system operations, and a pickle that
runs code when loaded."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

# the os functions that change a folder's contents or make them durable
FS_OPS = ("mkdir", "rename", "replace", "unlink", "remove", "rmdir", "fsync")


class Crash(BaseException):
    """The process dies here (not an Exception: no `except` in the code under test catches it)."""


@contextlib.contextmanager
def crash_before(k):
    """Record every call of FS_OPS (name, first two arguments); raise Crash instead of performing the k-th
    one (k=None: never). The files are then exactly what a SIGKILL at that point leaves."""
    calls = []
    real = {n: getattr(os, n) for n in FS_OPS}

    def wrap(name):
        def op(*args, **kwargs):
            calls.append((name, args[:2]))
            if k is not None and len(calls) == k:
                raise Crash(f"killed before {name}{args[:2]}")
            return real[name](*args, **kwargs)

        return op

    try:
        for n in FS_OPS:
            setattr(os, n, wrap(n))
        yield calls
    finally:
        for n, f in real.items():
            setattr(os, n, f)


class RunsCode:
    """Unpickling this calls os.mkdir(marker): the side effect a malicious checkpoint file would have."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def forge_manifest(folder):
    """Recompute a checkpoint manifest's sizes and checksums (when the format has one) after a file was
    replaced: what anyone with write access to the folder can do."""
    path = os.path.join(folder, "manifest.json")
    if not os.path.exists(path):
        return
    with open(path) as fh:
        m = json.load(fh)
    for rel in m["files"]:
        with open(os.path.join(folder, rel), "rb") as fh:
            data = fh.read()
        m["files"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with open(path, "w") as fh:
        json.dump(m, fh)
