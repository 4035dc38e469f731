"""Checkpoints of the trainer under hostile conditions, end to end through `Trainer` and `fused-rlvr eval`:
a planted pickle never runs, a missing `latest` pointer never costs a checkpoint, a kill between any two
file-system operations of a save (in-process fault injection, and a real SIGKILL of a training process)
resumes to the very weights of an uninterrupted run, stale temporary folders are removed, a corrupt
checkpoint is named and skipped for the previous valid one, and a stale later step folder survives the
pruning.

The fault injection (`_fs_faults.crash_before`) wraps the os functions that change a folder (mkdir, rename,
replace, unlink, remove, rmdir, fsync) and raises a BaseException before the k-th call, for every k a save
makes: the state on disk is then exactly the one a SIGKILL at that point leaves (no cleanup code runs).
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("math_verify")

from _fs_faults import Crash, RunsCode, crash_before, forge_manifest  # noqa: E402
from _train_helpers import DigitReward, params, tiny_config  # noqa: E402

from fused_rlvr.train import Hook  # noqa: E402
from fused_rlvr.train import evaluate as ev  # noqa: E402
from fused_rlvr.train.trainer import Trainer  # noqa: E402


class FirstStep(Hook):
    """Records the step a run starts training at (None: it had nothing left to train)."""

    def __init__(self):
        self.first = None

    def extra_rollouts(self, ctx, batch):
        if self.first is None:
            self.first = ctx.step
        return []


def cfg(out_dir, **kw):
    return tiny_config(out_dir, **{"n_eval": 2, "save_every": 1, **kw})


def run(out_dir, **kw):
    """Train (or resume) a run with DigitReward; returns (summary, trainer, first step trained)."""
    first = FirstStep()
    tr = Trainer(cfg(out_dir, **kw), hooks=[DigitReward(), first])
    return tr.train(), tr, first.first


def ckpt_dir(out_dir):
    return os.path.join(str(out_dir), "checkpoints")


def leftovers(out_dir):
    return sorted(e for e in os.listdir(ckpt_dir(out_dir)) if e.startswith(".") or ".tmp" in e)


def steps_on_disk(out_dir):
    return sorted(int(e[5:]) for e in os.listdir(ckpt_dir(out_dir)) if e.startswith("step_"))


def assert_same_weights(a, b):
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, msg=n)


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """training.png is not under test here (and takes most of a tiny run's time)."""
    from fused_rlvr.train import runlog

    monkeypatch.setattr(runlog, "plot_training", lambda *a, **k: None)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The weights of uninterrupted 2- and 3-step runs."""
    out = {}
    for steps in (2, 3):
        _s, tr, _ = run(tmp_path_factory.mktemp("ref") / "run", steps=steps, save_every=0)
        out[steps] = params(tr.model)
    return out


# ------------------------------------------------------------------------------------ 1. code in a pickle
@pytest.mark.parametrize("how", ["torch.save", "pickle", "torch.save+forged-manifest"])
def test_a_planted_pickle_never_runs_on_resume_or_eval(tmp_path, how):
    out = tmp_path / "run"
    run(out, steps=1)
    state = os.path.join(ckpt_dir(out), "step_000001", "state.pt")
    marker = str(tmp_path / "pwned")
    with open(state, "wb") as fh:
        if how.startswith("torch.save"):
            torch.save({"model": RunsCode(marker)}, fh)
        else:
            pickle.dump(RunsCode(marker), fh)
    if how.endswith("forged-manifest"):
        forge_manifest(os.path.dirname(state))
    with pytest.raises(Exception) as refused:
        run(out, steps=2, resume=True)
    assert not os.path.exists(marker), "loading a checkpoint ran code"
    assert "state.pt" in str(refused.value)
    args = ev.build_parser().parse_args(
        ["--run", str(out), "--n", "1", "--n-problems", "1", "--device", "cpu", "--no-plot"]
    )
    with pytest.raises(Exception) as refused:
        ev.run(args)
    assert not os.path.exists(marker), "fused-rlvr eval --run ran code from a checkpoint"
    assert "state.pt" in str(refused.value)


# ------------------------------------------------------------------------------ 2. a missing `latest` file
def test_resume_without_the_latest_pointer_continues_from_the_newest_checkpoint(tmp_path):
    out = tmp_path / "run"
    run(out, steps=3, keep_checkpoints=3)
    os.unlink(os.path.join(ckpt_dir(out), "latest"))
    s, _tr, first = run(out, steps=4, keep_checkpoints=3, resume=True)
    assert first == 3 and s["status"] == "finished" and s["step"] == 4
    assert steps_on_disk(out) == [2, 3, 4]


def test_a_fresh_run_refuses_a_folder_with_checkpoints_and_no_pointer(tmp_path):
    out = tmp_path / "run"
    run(out, steps=2, keep_checkpoints=2)
    os.unlink(os.path.join(ckpt_dir(out), "latest"))
    with pytest.raises(ValueError, match="already holds a run with checkpoints"):
        run(out, steps=2, keep_checkpoints=2)
    assert steps_on_disk(out) == [1, 2]


def test_a_stale_later_step_folder_is_never_pruned(tmp_path):
    out = tmp_path / "run"
    run(out, steps=1, keep_checkpoints=1)
    root = ckpt_dir(out)
    shutil.copytree(os.path.join(root, "step_000001"), os.path.join(root, "step_000099"))  # stale, later
    s, _tr, first = run(out, steps=2, keep_checkpoints=1, resume=True)
    assert first == 1 and s["step"] == 2
    assert steps_on_disk(out) == [2, 99]  # the one just written stays, and so does the later one


# ------------------------------------------------------------------- 3. a kill between any two operations
@pytest.mark.parametrize("case", ["new-step", "re-save"])
def test_a_kill_at_every_point_of_a_save_resumes_to_the_same_weights(tmp_path, reference, case):
    """new-step: the save of step 2 over step 1 (keep 1: step 1 is pruned); re-save: step 2 saved again
    over itself (the one checkpoint there is)."""
    base, work = tmp_path / "base", tmp_path / "work"
    run(base, steps=1 if case == "new-step" else 2, keep_checkpoints=1)
    shutil.copytree(base, work)
    saver = Trainer(cfg(work, steps=2, keep_checkpoints=1, resume=True), hooks=[DigitReward(), FirstStep()])
    saver.load(os.path.join(ckpt_dir(work), f"step_00000{1 if case == 'new-step' else 2}"))
    if case == "new-step":
        saver.train_step()
        saver.step += 1
    with crash_before(None) as calls:
        saver.save()
    n_ops = len(calls)
    assert n_ops >= 5
    firsts = set()
    for k in range(1, n_ops + 1):
        shutil.rmtree(work)
        shutil.copytree(base, work)
        with pytest.raises(Crash), crash_before(k):
            saver.save()
        s, tr, first = run(work, steps=2, keep_checkpoints=1, resume=True)
        assert s["status"] == "finished" and s["step"] == 2, k
        assert first in ((1, None) if case == "new-step" else (None,)), (k, calls[k - 1], first)
        firsts.add(first)
        assert_same_weights(reference[2], params(tr.model))
        assert leftovers(work) == [], (k, calls[k - 1])
        # (a kill before the pruning may leave step 1 until the next save prunes it)
        assert steps_on_disk(work) in ([2], [1, 2]), (k, calls[k - 1])
    if case == "new-step":
        assert firsts == {1, None}  # killed before the commit, and after it


_KILLED_TRAINER = r"""
import os, sys, time
sys.path.insert(0, {tests!r})
from _train_helpers import DigitReward, tiny_config
from test_checkpoint import FirstStep
from fused_rlvr.train.trainer import Trainer

op, suffix, marker = {op!r}, {suffix!r}, {marker!r}
real = getattr(os, op)

def paused(src, dst, *a, **k):
    if str(dst).endswith(suffix):
        open(marker, "w").close()
        time.sleep(600)  # SIGKILL arrives here
    return real(src, dst, *a, **k)

setattr(os, op, paused)
cfg = tiny_config({out!r}, n_eval=2, save_every=1, steps=3, keep_checkpoints=2, threads=1)
Trainer(cfg, hooks=[DigitReward(), FirstStep()]).train()
"""


@pytest.mark.parametrize(
    "op,suffix,first",
    [
        ("replace", "latest", 1),  # step 1 renamed into place, its `latest` pointer not yet written
        ("rename", "step_000002", 1),  # step 2 complete in its temporary folder, not yet renamed
    ],
)
def test_sigkill_of_a_training_process_during_a_save_resumes_exactly(tmp_path, reference, op, suffix, first):
    out, marker = tmp_path / "run", str(tmp_path / "in-save")
    tests = os.path.dirname(os.path.abspath(__file__))
    code = _KILLED_TRAINER.format(tests=tests, op=op, suffix=suffix, marker=marker, out=str(out))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not os.path.exists(marker):
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"the training process never reached the save: {p.communicate()[1][-3000:]}")
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    s, tr, got_first = run(out, steps=3, keep_checkpoints=2, threads=1, resume=True)
    assert s["status"] == "finished" and got_first == first
    assert_same_weights(reference[3], params(tr.model))
    assert leftovers(out) == []


# ------------------------------------------------------------------------------- 4. stale temporary files
def test_stale_temporary_folders_are_removed_at_start(tmp_path):
    out = tmp_path / "run"
    run(out, steps=1)
    root = ckpt_dir(out)
    os.makedirs(os.path.join(root, ".tmp-step_000002-4242"))
    with open(os.path.join(root, ".tmp-step_000002-4242", "state.pt"), "wb") as fh:
        fh.write(os.urandom(1 << 20))  # what a full disk or a kill leaves
    open(os.path.join(root, "latest.tmp-4242"), "w").close()
    s, _tr, first = run(out, steps=2, resume=True)
    assert first == 1 and s["status"] == "finished"
    assert leftovers(out) == []


def test_a_full_disk_during_a_save_leaves_nothing_behind_and_resumes(tmp_path, monkeypatch, reference):
    out = tmp_path / "run"
    run(out, steps=1)
    tr = Trainer(cfg(out, steps=2, resume=True), hooks=[DigitReward(), FirstStep()])
    tr.load(os.path.join(ckpt_dir(out), "step_000001"))
    tr.train_step()
    tr.step += 1
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        f.write(b"\0" * (1 << 20))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        tr.save()
    monkeypatch.setattr(torch, "save", real_save)
    assert leftovers(out) == [] and steps_on_disk(out) == [1]
    s, tr2, first = run(out, steps=2, resume=True)
    assert first == 1 and s["status"] == "finished"
    assert_same_weights(reference[2], params(tr2.model))


# ------------------------------------------------------------------------------------ 5. corrupt files
def _flip_tensor_bytes(path):
    """Write 1e37 over the first float of the largest tensor in a torch.save zip (its data is stored raw)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        fh.write(struct.pack("<f", 1e37))


def _corrupt(path, how):
    if how == "truncated":
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 2)
    elif how == "garbage":
        with open(path, "wb") as fh:
            fh.write(os.urandom(4096))
    else:
        _flip_tensor_bytes(path)


@pytest.mark.parametrize("how", ["truncated", "garbage", "flipped"])
def test_a_corrupt_checkpoint_is_named_and_the_previous_one_resumes(tmp_path, capfd, reference, how):
    out = tmp_path / "run"
    run(out, steps=2, keep_checkpoints=2)
    _corrupt(os.path.join(ckpt_dir(out), "step_000002", "state.pt"), how)
    capfd.readouterr()
    s, tr, first = run(out, steps=2, keep_checkpoints=2, resume=True)
    err = capfd.readouterr().err
    assert "step_000002" in err and "state.pt" in err and "falling back" in err, err
    assert first == 1 and s["status"] == "finished"
    assert_same_weights(reference[2], params(tr.model))
    _s, _tr, first = run(out, steps=2, keep_checkpoints=2, resume=True)  # step 2 was written anew
    assert first is None


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_a_corrupt_only_checkpoint_stops_with_an_error_naming_the_file(tmp_path, capsys, how):
    out = tmp_path / "run"
    run(out, steps=1, keep_checkpoints=1)
    _corrupt(os.path.join(ckpt_dir(out), "step_000001", "state.pt"), how)
    with pytest.raises(RuntimeError, match=r"step_000001.*state\.pt"):
        run(out, steps=2, keep_checkpoints=1, resume=True)
    from fused_rlvr.train import main

    flags = ["--preset", "tiny", "--out-dir", str(out), "--resume", "--n-eval", "2", "--steps", "2"]
    capsys.readouterr()
    assert main(flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fused-rlvr train: error:") and "state.pt" in err[0], err
