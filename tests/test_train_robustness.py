"""The trainer when things go wrong or look wrong, on a tiny random model (no download): a kill mid-write of
metrics.jsonl / samples.jsonl, non-finite losses (skipped updates, then a clear stop; never a non-finite
checkpoint), and the outputs a person reads (training.png as a grid, progress bars)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("math_verify")

from _train_helpers import DigitReward, SignalAt, params, tiny_config  # noqa: E402

from fused_rlvr.train import Hook  # noqa: E402
from fused_rlvr.train.checkpoint import Checkpointer  # noqa: E402
from fused_rlvr.train.guard import NonFiniteError  # noqa: E402
from fused_rlvr.train.plot import plot_training  # noqa: E402
from fused_rlvr.train.runlog import read_jsonl_steps  # noqa: E402
from fused_rlvr.train.trainer import Trainer  # noqa: E402


def tiny(tmp_path, name="run", **kw):
    return tiny_config(tmp_path / name, **kw)


def lines(path):
    return [json.loads(x) for x in open(path, encoding="utf-8")]


# ------------------------------------------------------------------------------ a kill mid-write
def test_resume_drops_a_partial_last_line_of_metrics_and_samples(tmp_path, capfd):
    full = Trainer(tiny(tmp_path, "full", steps=3), hooks=[DigitReward(), SignalAt(-1)])
    full.train()
    part = Trainer(tiny(tmp_path, "part", steps=3), hooks=[DigitReward(), SignalAt(2)])
    assert part.train()["step"] == 2
    out = tmp_path / "part"
    # killed while writing step 3's lines (after the checkpoint of step 2)
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"step": 3, "reward_mean": 0.12')
    with open(out / "samples.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"step": 3, "question": "What is')
    resumed = Trainer(tiny(tmp_path, "part", steps=3, resume=True), hooks=[DigitReward(), SignalAt(-1)])
    assert resumed.train()["status"] == "finished"
    assert "partial last line" in capfd.readouterr().err
    recs, full_recs = lines(out / "metrics.jsonl"), lines(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [0, 1, 2, 3]
    for key in ("reward_mean", "loss", "eval_accuracy"):
        assert [r.get(key) for r in recs] == [r.get(key) for r in full_recs], key
    assert lines(out / "samples.jsonl") == lines(tmp_path / "full" / "samples.jsonl")


def test_an_unreadable_line_inside_a_log_is_an_error_naming_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, oops\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        read_jsonl_steps(str(path), 5)
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    assert [r["step"] for r in read_jsonl_steps(str(path), 2)] == [1, 2]


# ------------------------------------------------------------------------------ non-finite updates
class NaNLoss(Hook):
    """At the steps given: an extra loss that is not a number (a diverging run), through the policy."""

    def __init__(self, steps):
        self.steps = set(steps)

    def extra_loss(self, ctx, batch):
        if ctx.step + 1 not in self.steps:
            return None
        return ctx.policy_loss(batch, torch.arange(1), lambda out: out.hidden.float().sum() * math.nan)


def test_non_finite_updates_are_skipped_then_stop_the_run(tmp_path):
    cfg = tiny(tmp_path, steps=6, save_every=1, max_bad_updates=3)
    tr = Trainer(cfg, hooks=[DigitReward(), NaNLoss(steps=range(2, 7))])
    with pytest.raises(NonFiniteError, match=r"3 optimizer updates in a row .*max_bad_updates=3"):
        tr.train()
    recs = lines(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [0, 1, 2, 3]  # step 4 raised
    assert "skipped_updates" not in recs[1] and recs[2]["skipped_updates"] == recs[3]["skipped_updates"] == 1
    ck = Checkpointer(str(tmp_path / "run" / "checkpoints"), 2)
    s3 = ck.load(ck.latest())[0]
    s2 = ck.load(str(tmp_path / "run" / "checkpoints" / "step_000002"))[0]
    assert s3["step"] == 3 and s3["bad_updates"] == 2
    now = params(tr.model)
    for n, v in s3["model"].items():  # the skipped updates left the weights and the optimizer as they were
        assert torch.isfinite(v).all() and torch.equal(v, s2["model"][n]) and torch.equal(v, now[n]), n
    for a, b in zip(s2["optimizer"]["state"].values(), s3["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_single_non_finite_update_is_skipped_and_the_run_goes_on(tmp_path):
    cfg = tiny(tmp_path, steps=3, max_bad_updates=2)
    s = Trainer(cfg, hooks=[DigitReward(), NaNLoss(steps={2})]).train()
    assert s["status"] == "finished"
    recs = lines(tmp_path / "run" / "metrics.jsonl")
    assert [r.get("skipped_updates") for r in recs[1:]] == [None, 1.0, None]
    assert math.isfinite(recs[3]["loss"]) and math.isfinite(recs[3]["grad_norm"])


def test_a_model_with_non_finite_weights_is_never_saved(tmp_path):
    tr = Trainer(tiny(tmp_path, steps=1), hooks=[DigitReward()])
    first = tr.train()["checkpoint"]
    with torch.no_grad():
        tr.params[0].view(-1)[0] = math.inf
    tr.step = 2
    with pytest.raises(NonFiniteError, match="weights are not all finite: no checkpoint is written"):
        tr.save()
    ck = Checkpointer(tr.checkpointer.root, 2)
    assert ck.latest() == first
    assert all(torch.isfinite(v).all() for v in ck.load(first)[0]["model"].values())


# ------------------------------------------------------------------------------ what a person reads
def test_training_png_is_a_grid_with_evaluation_markers_and_flat_panels_said_in_words(tmp_path):
    import matplotlib.image

    recs = [{"step": 0, "eval_accuracy": 0.155, "eval_length": 11.4}]
    for s in range(1, 21):
        recs.append(
            {"step": s, "reward_mean": 0.1 + 0.02 * s, "entropy": 2.0 - 0.05 * s, "approx_kl": 0.0}
            | {"ref_kl": 0.0, "clip_frac_low": 0.0, "clip_frac_high": 0.0, "loss": 0.01, "grad_norm": 1.0 + s}
        )
    recs[-1]["eval_accuracy"] = 0.605
    path = str(tmp_path / "training.png")
    shown = plot_training(recs, path, title="test")
    assert shown["held-out accuracy"] == "markers"  # two evaluations: points with their values, no line
    assert shown["KL"] == shown["clip fraction"] == shown["loss"] == "constant"
    assert shown["reward (train rollouts)"] == shown["gradient norm"] == "line"
    assert "response length" not in shown  # no data: no panel
    h, w = matplotlib.image.imread(path).shape[:2]
    assert w / h < 2.5  # a grid, not a strip of panels


def test_progress_bars_for_the_evaluations_and_the_steps(tmp_path, capfd):
    Trainer(tiny(tmp_path, steps=1, progress=True, n_eval=4), hooks=[DigitReward()]).train()
    err = capfd.readouterr().err
    assert "held-out eval (before)" in err and "held-out eval (after)" in err and "train" in err
    Trainer(tiny(tmp_path, "quiet", steps=1, progress=False, n_eval=4), hooks=[DigitReward()]).train()
    assert "held-out eval" not in capfd.readouterr().err
    assert os.path.exists(tmp_path / "quiet" / "training.png")
