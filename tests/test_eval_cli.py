"""`fused-rlvr eval` on a tiny random model (no download): the run loader, the pass@k / P-E-S-O tables with
forced correctness, the fused token entropy against materialised logits, and the files written."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("math_verify")

from fused_rlvr import cli  # noqa: E402
from fused_rlvr.train import Hook, make_config  # noqa: E402
from fused_rlvr.train import evaluate as ev  # noqa: E402
from fused_rlvr.train.models import tiny_random_model  # noqa: E402
from fused_rlvr.train.tasks import Problem  # noqa: E402
from fused_rlvr.train.trainer import Trainer  # noqa: E402


class DigitReward(Hook):
    def rewards(self, trainer, batch, rewards):
        return torch.tensor([float(t[:1].isdigit()) for t in batch.texts])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A one-step tiny run that trains only its top layer."""
    out = tmp_path_factory.mktemp("evalrun") / "run"
    cfg = make_config(
        "tiny",
        {
            "out_dir": str(out),
            "steps": 1,
            "n_eval": 4,
            "prompts_per_step": 2,
            "group_size": 4,
            "max_new_tokens": 5,
            "train_layers": 1,
            "lr": 1e-2,
        },
    )
    torch.manual_seed(0)
    tr = Trainer(cfg, hooks=[DigitReward()])
    tr.train()
    return str(out), {n: p.detach().clone() for n, p in tr.model.named_parameters()}


def test_load_run_puts_the_checkpoint_over_the_base_model(run_dir):
    path, trained = run_dir
    model, tok, cfg, folder = ev.load_run(path, device="cpu")
    assert cfg.train_layers == 1 and folder.endswith("step_000001")
    base, _ = tiny_random_model(cfg.seed)
    base_p = dict(base.named_parameters())
    moved = set()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, trained[n], rtol=0, atol=0, msg=n)
        if not torch.equal(p, base_p[n]):
            moved.add(n)
    assert moved and all(n.startswith(("model.layers.1.", "model.norm")) for n in moved)
    with pytest.raises(ValueError, match="parameters this model does not have"):
        ev.load_trained_params(model, {"no.such.weight": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="is not a training run"):
        ev.load_run(os.path.dirname(path), device="cpu")


def _scripted_verifier(outcomes, answers):
    """A Verifier stand-in: outcomes and final answers consumed (popped from the lists) in call order."""

    class Stub:
        def __call__(self, text, answer):
            return float(outcomes.pop(0))

        def final_answer(self, text):
            return answers.pop(0)

    return Stub


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_eval_cli_tables_with_forced_correctness(run_dir, tmp_path, monkeypatch):
    path, _ = run_dir
    # call order (documented in sample_model): base samples, base greedy, trained samples, trained greedy;
    # final answers are read after each model's samples are verified
    base = [1, 1, 0, 0] + [0] * 4 + [0] * 4
    trained = [1, 1, 1, 1] + [0, 1, 0, 0] + [0] * 4
    outcomes = base + [1, 0, 0] + trained + [1, 1, 0]
    answers = ["7", "7", "3", None] + ["1", "2", "3", "4"] + [None] * 4
    answers += ["7"] * 4 + ["5", "5", "5", "5"] + [None] * 4
    monkeypatch.setattr(ev, "Verifier", _scripted_verifier(outcomes, answers))
    out = tmp_path / "eval"
    rc = cli.main(
        [
            "eval",
            "--run",
            path,
            "--n",
            "4",
            "--n-problems",
            "3",
            "--ks",
            "1,2,4",
            "--greedy",
            "--out-dir",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    rows = _csv(out / "per_problem.csv")
    assert [r["peso"] for r in rows] == ["P", "E", "O"]
    assert [int(r["base_correct"]) for r in rows] == [2, 0, 0]
    assert [int(r["trained_correct"]) for r in rows] == [4, 1, 0]
    assert float(rows[0]["base_pass@2"]) == pytest.approx(1 - 1 / 6, abs=1e-5)  # 1 - C(2,2)/C(4,2)
    assert float(rows[0]["base_pass@1"]) == pytest.approx(0.5, abs=1e-5)
    assert float(rows[1]["trained_pass@2"]) == pytest.approx(0.5, abs=1e-5)  # 1 - C(3,2)/C(4,2)
    assert float(rows[1]["trained_pass@4"]) == 1.0 and float(rows[2]["trained_pass@4"]) == 0.0
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))  # {7: 2, 3: 1, no answer: 1}
    assert float(rows[0]["base_answer_entropy"]) == pytest.approx(h, abs=1e-5)
    assert float(rows[1]["base_answer_entropy"]) == pytest.approx(math.log(4), abs=1e-5)
    assert float(rows[1]["trained_answer_entropy"]) == 0.0
    assert [r["base_greedy"] for r in rows] == ["1", "0", "0"] and [r["trained_greedy"] for r in rows] == [
        "1",
        "1",
        "0",
    ]
    for r in rows:
        for k in ("base_token_entropy", "trained_token_entropy"):
            assert 0 < float(r[k]) < math.log(80)
    s = json.load(open(out / "summary.json"))
    assert (s["P"], s["E"], s["S"], s["O"]) == (1, 1, 0, 1)
    assert s["SRR"] == 1.0 and s["NDR"] == 0.5 and s["SDS"] == pytest.approx(2 / 3) and s["NSCR"] == 0.5
    assert s["base_avg@n"] == pytest.approx(2 / 12) and s["trained_avg@n"] == pytest.approx(5 / 12)
    assert s["base_pass@4"] == pytest.approx(1 / 3) and s["trained_pass@4"] == pytest.approx(2 / 3)
    assert s["base_greedy_accuracy"] == pytest.approx(1 / 3) and s[
        "trained_greedy_accuracy"
    ] == pytest.approx(2 / 3)
    assert s["n"] == 4 and s["trained_checkpoint"].endswith("step_000001")
    summary_csv = {r["metric"]: r["value"] for r in _csv(out / "summary.csv")}
    assert summary_csv["NDR"] == "0.5" and summary_csv["P"] == "1"
    for f in ("per_problem.md", "summary.md", "pass_at_k.png", "samples.jsonl"):
        assert (out / f).stat().st_size > 0, f
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert len(samples) == 24 and {x["model"] for x in samples} == {"base", "trained"}
    md = (out / "per_problem.md").read_text().splitlines()
    assert md[0].startswith("| problem | base_correct |") and md[2].endswith("| P |") and len(md) == 5
    assert not outcomes and not answers  # every verifier call accounted for


def test_token_entropy_is_the_fused_entropy_of_the_sampled_responses():
    model, tok = tiny_random_model(0)
    problems = [Problem("a", "What is 3 + 4?", "7"), Problem("b", "What is 6 * 8?", "48")]
    s = ev.sample_model(
        model,
        tok,
        problems,
        n=3,
        temperature=0.7,
        max_new_tokens=6,
        prompt_suffix=" Answer:",
        seed=1,
        micro_batch=2,
    )
    prompt = tok("Question: What is 3 + 4? Answer:\nAnswer:", add_special_tokens=False)["input_ids"]
    ents = []
    for resp in s.response_ids[0]:
        ids = torch.tensor([prompt + resp])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double() / 0.7, -1)
        ent = -(logp.exp() * logp).sum(-1)[len(prompt) - 1 :]
        ents.append(ent)
    want = float(torch.cat(ents).mean())
    assert s.token_entropy[0] == pytest.approx(want, rel=1e-5)
    assert len(s.texts) == 2 and all(len(t) == 3 for t in s.texts)
    # the same seed gives the same samples (both models of a comparison see one random stream)
    again = ev.sample_model(
        model, tok, problems, n=3, temperature=0.7, max_new_tokens=6, prompt_suffix=" Answer:", seed=1
    )
    assert again.response_ids == s.response_ids


def test_eval_single_model_and_argument_errors(tmp_path):
    out = tmp_path / "single"
    args = ev.build_parser().parse_args(
        [
            "--base",
            "tiny-random",
            "--n",
            "2",
            "--n-problems",
            "2",
            "--max-new-tokens",
            "4",
            "--out-dir",
            str(out),
            "--no-plot",
        ]
    )
    s = ev.run(args)
    assert (
        s["problems"] == 2 and 0 <= s["avg@n"] <= 1 and set(s) >= {"pass@1", "pass@2", "token_entropy_mean"}
    )
    rows = _csv(out / "per_problem.csv")
    assert len(rows) == 2 and "answer_entropy" in rows[0] and not (out / "pass_at_k.png").exists()
    with pytest.raises(ValueError, match=r"--ks must lie in \[1, --n = 2\]"):
        ev.run(ev.build_parser().parse_args(["--base", "tiny-random", "--n", "2", "--ks", "4"]))
    with pytest.raises(ValueError, match="needs --run"):
        ev.run(ev.build_parser().parse_args([]))
