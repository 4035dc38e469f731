"""How many CPU threads torch uses, and how its idle OpenMP threads wait.

torch's CPU kernels (and MKL, oneDNN) run on one OpenMP team. Two defaults hurt on a machine shared with
other CPU-bound processes:

- libgomp lets an idle thread spin (GOMP_SPINCOUNT, 300000 iterations by default, milliseconds) before it
  sleeps. When a team member is descheduled by another process, its partners spin on the barrier for the
  whole time slice, burning the CPU the late thread needs: a parallel region then costs a time slice, not
  its work. `openmp_env_defaults` makes idle threads spin briefly and then sleep; it must run before torch
  loads its OpenMP runtime (before `import torch`), and never overrides a value the user set.
- the team is as large as the logical CPUs, even where a CPU affinity mask or a cgroup CPU quota gives the
  process fewer. `default_threads` counts what the process may actually use.

`configure_threads(requested)` applies the thread count; the command-line entry points call
`openmp_env_defaults()` first thing and `configure_threads(cfg.threads)` before any torch work.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Optional

# How long an idle OpenMP thread spins before it sleeps. libgomp (torch's pip wheels): 100 iterations, a few
# microseconds, its own choice when threads outnumber CPUs (the default is 300000, milliseconds). Intel /
# LLVM OpenMP (KMP_BLOCKTIME, default 200 ms): sleep at once. Spinning catches a partner that is a few
# microseconds late; past that, a spinning thread only takes CPU from the descheduled partner it waits for.
WAIT_DEFAULTS = {"GOMP_SPINCOUNT": "100", "KMP_BLOCKTIME": "0"}

# Variables that decide how idle OpenMP threads wait; if the user set any of them, we set none.
_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def openmp_env_defaults(environ: Optional[MutableMapping[str, str]] = None) -> dict[str, str]:
    """Set WAIT_DEFAULTS (GOMP_SPINCOUNT=100, KMP_BLOCKTIME=0) in `environ` (default: os.environ) unless the
    user already chose a wait policy (OMP_WAIT_POLICY, GOMP_SPINCOUNT or KMP_BLOCKTIME set). Returns what
    was set ({} if nothing).

    It only takes effect if torch has not been imported yet in this process (the OpenMP runtime reads it
    when it is loaded); child processes inherit it either way."""
    env = os.environ if environ is None else environ
    if any(k in env for k in _WAIT_VARS):
        return {}
    env.update(WAIT_DEFAULTS)
    return dict(WAIT_DEFAULTS)


def _parse_cpu_list(text: str) -> set[int]:
    """'0-3,8,10-11' -> {0, 1, 2, 3, 8, 10, 11} (the kernel's cpulist format)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def physical_cores(cpus: Iterable[int], sys_cpu: str = "/sys/devices/system/cpu") -> int:
    """Distinct physical cores among the logical `cpus` (SMT siblings count once), from sysfs topology;
    len(cpus) where the topology cannot be read."""
    cpus = list(cpus)
    cores = set()
    for c in cpus:
        topo = os.path.join(sys_cpu, f"cpu{c}", "topology")
        try:
            with open(os.path.join(topo, "core_id")) as f:
                core = f.read().strip()
            with open(os.path.join(topo, "physical_package_id")) as f:
                package = f.read().strip()
        except OSError:
            return len(cpus)
        cores.add((package, core))
    return len(cores) or len(cpus)


def cgroup_cpu_limit(
    cgroup_root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup"
) -> Optional[float]:
    """CPUs the process's cgroup CPU quota allows (quota / period, the smallest along the cgroup's path to
    the root), or None where no quota applies. Reads cgroup v2 `cpu.max` and cgroup v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    candidates: list[tuple[str, str]] = []  # (folder, kind)
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        path = path.lstrip("/")
        if controllers == "":  # v2 unified hierarchy
            candidates += [(os.path.join(cgroup_root, p), "v2") for p in _ancestors(path)]
        elif "cpu" in controllers.split(","):
            for mount in (controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu"):
                candidates += [(os.path.join(cgroup_root, mount, p), "v1") for p in _ancestors(path)]
    candidates += [(cgroup_root, "v2"), (os.path.join(cgroup_root, "cpu"), "v1")]
    limits = []
    for folder, kind in dict.fromkeys(candidates):
        cpus = _read_v2(folder) if kind == "v2" else _read_v1(folder)
        if cpus is not None:
            limits.append(cpus)
    return min(limits) if limits else None


def _ancestors(path: str) -> list[str]:
    """'a/b/c' -> ['a/b/c', 'a/b', 'a', '']."""
    parts = [p for p in path.split("/") if p]
    return ["/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _read_v2(folder: str) -> Optional[float]:
    try:
        with open(os.path.join(folder, "cpu.max")) as f:
            quota, _, period = f.read().strip().partition(" ")
    except OSError:
        return None
    if quota == "max":
        return None
    try:
        q, p = int(quota), int(period or 100000)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _read_v1(folder: str) -> Optional[float]:
    try:
        with open(os.path.join(folder, "cpu.cfs_quota_us")) as f:
            q = int(f.read().strip())
        with open(os.path.join(folder, "cpu.cfs_period_us")) as f:
            p = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return q / p if q > 0 and p > 0 else None


def _omp_num_threads(environ: Mapping[str, str]) -> Optional[int]:
    """The first level of OMP_NUM_THREADS ('4' or '4,2'), None if unset or not a positive integer."""
    text = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    try:
        n = int(text)
    except ValueError:
        return None
    return n if n > 0 else None


def default_threads(
    *,
    environ: Optional[Mapping[str, str]] = None,
    affinity: Optional[Iterable[int]] = None,
    sys_cpu: str = "/sys/devices/system/cpu",
    cgroup_root: str = "/sys/fs/cgroup",
    proc_cgroup: str = "/proc/self/cgroup",
) -> int:
    """Threads for torch when the user asked for none: OMP_NUM_THREADS if set; otherwise the physical cores
    among the CPUs this process may run on (its affinity mask), capped by the cgroup CPU quota rounded down
    (a team larger than the quota is throttled at every barrier); at least 1.

    The arguments exist for tests; by default they read this process's environment, affinity and cgroup."""
    env = os.environ if environ is None else environ
    n = _omp_num_threads(env)
    if n is not None:
        return n
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            affinity = range(os.cpu_count() or 1)
    n = physical_cores(sorted(affinity), sys_cpu)
    quota = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    if quota is not None:
        n = min(n, math.floor(quota))
    return max(1, n)


def configure_threads(requested: int = 0) -> int:
    """Set torch's intra-op threads to `requested`, or to `default_threads()` when it is 0; returns the
    number set. (Plain torch: `torch.set_num_threads(n)`.)"""
    if requested < 0:
        raise ValueError(f"threads must be >= 0 (0: automatic), got {requested}")
    import torch

    n = requested or default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def torch_imported() -> bool:
    """Whether torch is already loaded in this process (then OpenMP environment variables come too late)."""
    return "torch" in sys.modules


def ensure_openmp_env() -> None:
    """For a command-line entry point, first thing: `openmp_env_defaults()`; if that set something and torch
    is already loaded (its OpenMP runtime read the environment without it), re-execute this process's own
    command line (os.execv, same PID) so the runtime starts with it. Runs at most once: the new process
    finds the variable set. Never call it from library code or tests."""
    if openmp_env_defaults() and torch_imported():
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
