"""The FSDP2 trainer's checkpoints on 2 gloo CPU processes: with keep_checkpoints=1 and a stale later step
folder, the resumed run keeps the checkpoint it just wrote (and the later folder), and that checkpoint is
complete and valid (every rank's file, the shards, the manifest)."""

from __future__ import annotations

import datetime
import os
import shutil
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("math_verify")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from _train_helpers import DigitReward, tiny_config  # noqa: E402

WORLD = 2
TIMEOUT_S = 240


def _cfg(out, **kw):
    return tiny_config(out, **{"n_eval": 2, "prompts_per_step": 4, "keep_checkpoints": 1, "fsdp": True, **kw})


def _worker(rank, init_file, tmp):
    from fused_rlvr.train.trainer import Trainer

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    torch.set_num_threads(1)
    out, res = os.path.join(tmp, "run"), {}
    try:
        tr = Trainer(_cfg(out, steps=1), hooks=[DigitReward()])
        tr.train()
        tr.close()
        dist.barrier()
        if rank == 0:  # a stale later folder, e.g. left by a run abandoned past the checkpoint resumed
            root = os.path.join(out, "checkpoints")
            shutil.copytree(os.path.join(root, "step_000001"), os.path.join(root, "step_000099"))
        dist.barrier()
        tr = Trainer(_cfg(out, steps=2, resume=True), hooks=[DigitReward()])
        res["summary"] = tr.train()
        tr.close()
    except Exception as exc:  # reported to the parent instead of hanging the other rank
        import traceback

        res["worker_error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    torch.save(res, os.path.join(tmp, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_keep_1_with_a_stale_later_folder_keeps_the_checkpoint_just_written(tmp_path):
    tmp = str(tmp_path)
    ctx = mp.start_processes(
        _worker, args=(os.path.join(tmp, "rendezvous"), tmp), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} gloo processes did not finish within {TIMEOUT_S} s")
    res = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]
    for r in range(WORLD):
        assert "worker_error" not in res[r], f"rank {r}: {res[r]['worker_error']}"
    root = os.path.join(tmp, "run", "checkpoints")
    s = res[0]["summary"]
    assert (
        s["status"] == "finished" and s["step"] == 2 and s["checkpoint"] == os.path.join(root, "step_000002")
    )
    assert sorted(e for e in os.listdir(root) if e.startswith("step_")) == ["step_000002", "step_000099"]
    assert sorted(os.listdir(os.path.join(root, "step_000002"))) == [
        "manifest.json",
        "rank00000.pt",
        "rank00001.pt",
        "sharded",
        "state.pt",
    ]
    from fused_rlvr.train.checkpoint import Checkpointer

    log = []
    assert Checkpointer(root, 1, log=log.append).latest() == os.path.join(root, "step_000002")
    assert len(log) == 1 and "step_000099" in log[0] and "is for step 1" in log[0], log
