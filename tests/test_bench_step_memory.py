"""bench.step_memory: the providers' losses and gradient norms must agree or the run fails and writes nothing;
a small run of the real worker processes (tiny vocabulary, one layer) agrees and writes its CSV / JSON."""

from __future__ import annotations

import json
import os
import sys

import pytest

pytest.importorskip("transformers")
# bench/ is a folder of scripts beside the package (run as `python -m bench.step_memory` from the repository)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import step_memory  # noqa: E402


def _row(provider, loss, norm=1.0, extra=100 << 20):
    return dict(provider=provider, loss=loss, grad_norm=norm, base=0, peak=extra, extra=extra, seconds=1.0)


def test_disagreeing_providers_fail_and_write_nothing(monkeypatch, tmp_path, capsys):
    rows = {
        "floor": _row("floor", 5.0),
        "fused-rlvr": _row("fused-rlvr", -0.4321),
        "torch": _row("torch", -0.4321),
        "liger": _row("liger", -0.4400),
    }
    monkeypatch.setattr(step_memory, "measure", lambda p, args: rows[p])
    out = tmp_path / "out"
    rc = step_memory.main(["--providers", "floor", "fused-rlvr", "liger", "torch", "--out", str(out)])
    assert rc == 1 and not out.exists()
    err = capsys.readouterr().err
    assert "liger loss" in err and "fused-rlvr" not in err.split("disagree")[1]
    # a gradient norm off is a failure too; the floor's loss is never compared
    rows["liger"] = _row("liger", -0.4321, norm=1.01)
    assert step_memory.main(["--providers", "floor", "liger", "torch", "--out", str(out)]) == 1
    rows["liger"] = _row("liger", -0.4321)
    assert step_memory.main(["--providers", "floor", "fused-rlvr", "liger", "torch", "--out", str(out)]) == 0
    meta = json.load(open(out / "step_memory.json"))
    assert [r["above_floor"] for r in meta["rows"]] == [0, 0, 0, 0]


def test_tolerance_scales_with_the_dtype():
    a, b = _row("torch", 1.0), _row("fused-rlvr", 1.0 + 5e-3)
    assert step_memory.check_agreement([a, b], "float32")
    assert not step_memory.check_agreement([a, b], "bfloat16")


@pytest.mark.slow
def test_small_run_of_the_worker_processes_agrees(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "res"
    argv = [
        "--layers",
        "1",
        "--batch",
        "2",
        "--seq",
        "24",
        "--prompt",
        "4",
        "--vocab",
        "300",
        "--out",
        str(out),
    ]
    assert step_memory.main([*argv, "--providers", "floor", "fused-rlvr", "trl", "torch"]) == 0
    meta = json.load(open(out / "step_memory.json"))
    rows = {r["provider"]: r for r in meta["rows"]}
    assert rows.keys() == {"floor", "fused-rlvr", "trl", "torch"}
    assert abs(rows["fused-rlvr"]["loss"] - rows["torch"]["loss"]) < 1e-5
    assert rows["torch"]["loss"] != 0 and all(r["extra"] > 0 and r["seconds"] > 0 for r in rows.values())
    assert os.path.getsize(out / "step_memory.csv") > 0
