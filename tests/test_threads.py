"""fused_rlvr._threads: the automatic thread count (OMP_NUM_THREADS, CPU affinity, SMT siblings, cgroup v1 / v2
CPU quotas along the cgroup path) on fake sysfs / cgroupfs trees, and the OpenMP wait-policy defaults."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fused_rlvr import _threads


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _topology(root, cores):
    """Fake /sys/devices/system/cpu: cores[i] = (package, core) of logical CPU i."""
    for cpu, (package, core) in enumerate(cores):
        _write(f"{root}/cpu{cpu}/topology/core_id", f"{core}\n")
        _write(f"{root}/cpu{cpu}/topology/physical_package_id", f"{package}\n")
    return str(root)


@pytest.fixture
def smt8(tmp_path):
    """8 logical CPUs = 4 cores x 2 SMT siblings (CPU i and i + 4 share core i), one package."""
    return _topology(tmp_path / "sys", [(0, i % 4) for i in range(8)])


def _no_cgroup(tmp_path):
    return dict(cgroup_root=str(tmp_path / "nocg"), proc_cgroup=str(tmp_path / "nocg.txt"))


def test_physical_cores_count_smt_siblings_once(smt8, tmp_path):
    kw = _no_cgroup(tmp_path)
    assert _threads.default_threads(environ={}, affinity=range(8), sys_cpu=smt8, **kw) == 4
    # an affinity mask of both siblings of two cores: 2 physical cores
    assert _threads.default_threads(environ={}, affinity={0, 4, 1, 5}, sys_cpu=smt8, **kw) == 2
    # one sibling of each of three cores
    assert _threads.default_threads(environ={}, affinity={0, 1, 6}, sys_cpu=smt8, **kw) == 3
    # two packages with the same core ids are different cores
    two = _topology(tmp_path / "sys2", [(0, 0), (0, 1), (1, 0), (1, 1)])
    assert _threads.default_threads(environ={}, affinity=range(4), sys_cpu=two, **kw) == 4


def test_unreadable_topology_counts_logical_cpus(tmp_path):
    kw = _no_cgroup(tmp_path)
    assert _threads.default_threads(environ={}, affinity={2, 3, 7}, sys_cpu=str(tmp_path / "none"), **kw) == 3


@pytest.mark.parametrize(
    "value, expected", [("3", 3), ("2,1", 2), (" 5 ", 5), ("0", 4), ("-2", 4), ("abc", 4), ("", 4)]
)
def test_omp_num_threads_wins_when_valid(smt8, tmp_path, value, expected):
    env = {"OMP_NUM_THREADS": value}
    assert (
        _threads.default_threads(environ=env, affinity=range(8), sys_cpu=smt8, **_no_cgroup(tmp_path))
        == expected
    )


def test_cgroup_v2_quota_caps_threads_rounded_down(smt8, tmp_path):
    root = tmp_path / "cg"
    _write(str(tmp_path / "self.cgroup"), "0::/user.slice/job\n")
    kw = dict(cgroup_root=str(root), proc_cgroup=str(tmp_path / "self.cgroup"))
    _write(f"{root}/user.slice/job/cpu.max", "250000 100000\n")  # 2.5 CPUs
    assert _threads.cgroup_cpu_limit(**kw) == 2.5
    assert _threads.default_threads(environ={}, affinity=range(8), sys_cpu=smt8, **kw) == 2
    # a tighter quota on an ancestor applies too
    _write(f"{root}/user.slice/cpu.max", "150000 100000\n")
    assert _threads.cgroup_cpu_limit(**kw) == 1.5
    assert _threads.default_threads(environ={}, affinity=range(8), sys_cpu=smt8, **kw) == 1
    # a quota below one CPU still runs one thread
    _write(f"{root}/user.slice/job/cpu.max", "50000 100000\n")
    assert _threads.default_threads(environ={}, affinity=range(8), sys_cpu=smt8, **kw) == 1
    # 'max' everywhere: no limit
    _write(f"{root}/user.slice/job/cpu.max", "max 100000\n")
    _write(f"{root}/user.slice/cpu.max", "max 100000\n")
    assert _threads.cgroup_cpu_limit(**kw) is None
    assert _threads.default_threads(environ={}, affinity=range(8), sys_cpu=smt8, **kw) == 4


def test_cgroup_v2_namespace_root(smt8, tmp_path):
    """Inside a container the cgroup namespace makes the path '/': the limit is in the mount's root."""
    _write(str(tmp_path / "self.cgroup"), "0::/\n")
    _write(str(tmp_path / "cg/cpu.max"), "300000 100000\n")
    kw = dict(cgroup_root=str(tmp_path / "cg"), proc_cgroup=str(tmp_path / "self.cgroup"))
    assert _threads.default_threads(environ={}, affinity=range(8), sys_cpu=smt8, **kw) == 3


def test_cgroup_v1_cfs_quota(smt8, tmp_path):
    _write(str(tmp_path / "self.cgroup"), "4:memory:/job\n3:cpu,cpuacct:/docker/abc\n1:name=systemd:/\n")
    cg = tmp_path / "cg"
    kw = dict(cgroup_root=str(cg), proc_cgroup=str(tmp_path / "self.cgroup"))
    _write(f"{cg}/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "200000\n")
    _write(f"{cg}/cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    assert _threads.cgroup_cpu_limit(**kw) == 2.0
    assert _threads.default_threads(environ={}, affinity=range(8), sys_cpu=smt8, **kw) == 2
    # quota -1: unlimited
    _write(f"{cg}/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n")
    assert _threads.cgroup_cpu_limit(**kw) is None


def test_omp_num_threads_beats_the_quota(smt8, tmp_path):
    _write(str(tmp_path / "self.cgroup"), "0::/\n")
    _write(str(tmp_path / "cg/cpu.max"), "100000 100000\n")
    kw = dict(cgroup_root=str(tmp_path / "cg"), proc_cgroup=str(tmp_path / "self.cgroup"))
    assert (
        _threads.default_threads(environ={"OMP_NUM_THREADS": "3"}, affinity=range(8), sys_cpu=smt8, **kw) == 3
    )


def test_this_machine_gets_a_sane_count():
    n = _threads.default_threads(environ={})
    assert 1 <= n <= len(os.sched_getaffinity(0))


def test_openmp_env_defaults_respect_the_users_settings():
    env = {"PATH": "/bin"}
    assert _threads.openmp_env_defaults(env) == {"GOMP_SPINCOUNT": "100", "KMP_BLOCKTIME": "0"}
    assert env == {"PATH": "/bin", "GOMP_SPINCOUNT": "100", "KMP_BLOCKTIME": "0"}
    assert _threads.openmp_env_defaults(env) == {}  # already set: nothing again
    for user in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "infinite"}, {"KMP_BLOCKTIME": "0"}):
        env = dict(user)
        assert _threads.openmp_env_defaults(env) == {}
        assert env == user


def test_configure_threads_sets_torch(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert _threads.configure_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(_threads, "default_threads", lambda: 2)
        assert _threads.configure_threads(0) == 2 and torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="threads must be >= 0"):
            _threads.configure_threads(-1)
    finally:
        torch.set_num_threads(before)


def test_ensure_openmp_env_reexecutes_once_with_the_policy(tmp_path):
    """A process that imported torch before the policy was set runs its command line again with it; the
    second process finds it set and goes on."""
    script = tmp_path / "entry.py"
    script.write_text(
        "import os, sys\n"
        "import torch  # noqa: F401\n"
        "from fused_rlvr._threads import ensure_openmp_env\n"
        "print('start', os.environ.get('GOMP_SPINCOUNT'), flush=True)\n"
        "ensure_openmp_env()\n"
        "print('ran', os.environ.get('GOMP_SPINCOUNT'), sys.argv[1:])\n"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    }
    out = subprocess.run(
        [sys.executable, str(script), "a", "b"], env=env, capture_output=True, text=True, check=True
    )
    spin = _threads.WAIT_DEFAULTS["GOMP_SPINCOUNT"]
    assert out.stdout.splitlines() == ["start None", f"start {spin}", f"ran {spin} ['a', 'b']"]
    env["OMP_WAIT_POLICY"] = "PASSIVE"  # the user's choice: no re-execution, nothing set
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["start None", "ran None []"]


def test_a_trainer_built_from_python_picks_its_threads(monkeypatch, tmp_path):
    """Trainer(cfg) outside the command line applies the config's `threads` too (0: automatic)."""
    pytest.importorskip("transformers")
    from _train_helpers import tiny_config

    from fused_rlvr.train.trainer import Trainer

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(_threads, "default_threads", lambda: 2)
        torch.set_num_threads(1)
        Trainer(tiny_config(tmp_path / "auto", steps=1))
        assert torch.get_num_threads() == 2
        Trainer(tiny_config(tmp_path / "one", steps=1, threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
