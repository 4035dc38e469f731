"""One benchmark harness: timing (CUDA events via do_bench on GPU, wall clock on CPU), peak memory, CSV rows.

Rows are long-format: op, provider, mode, metric, x_name, x, value, plus the device name and package
versions of the run, so a CSV from one machine can never be mistaken for another's.
"""

from __future__ import annotations

import csv
import importlib.metadata
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch

FIELDS = ["op", "provider", "mode", "metric", "x_name", "x", "value", "shape", "dtype", "device", "versions"]


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def versions() -> str:
    out = []
    for pkg in ("torch", "triton", "fused-rlvr", "liger-kernel", "cut-cross-entropy", "transformers"):
        try:
            out.append(f"{pkg}={importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return " ".join(out)


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def time_fn(fn, device, *, warmup: int = 2, rep: int = 5, budget_ms: float = 300.0) -> Timing:
    """Median and p20/p80 of fn() in ms: CUDA events through triton's do_bench on GPU, wall clock on CPU."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        q = do_bench(fn, warmup=max(25, budget_ms / 4), rep=budget_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(*q)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    q = statistics.quantiles(samples, n=5, method="inclusive") if len(samples) > 1 else samples * 4
    return Timing(statistics.median(samples), q[0], q[3])


def cuda_peak_extra(fn, device) -> int:
    """Bytes allocated at peak during fn() above what was allocated before it (CUDA caching allocator)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return peak


@dataclass
class Recorder:
    """Collects rows; `write` saves them as CSV."""

    device: str
    rows: list = field(default_factory=list)
    _versions: str = field(default_factory=versions)

    def add(self, op, provider, mode, metric, value, *, x_name="", x="", shape="", dtype=""):
        self.rows.append(
            dict(
                op=op,
                provider=provider,
                mode=mode,
                metric=metric,
                x_name=x_name,
                x=x,
                value=value,
                shape=shape,
                dtype=dtype,
                device=self.device,
                versions=self._versions,
            )
        )

    def write(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(self.rows)
