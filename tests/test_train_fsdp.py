"""The trainer under FSDP2 (fused_rlvr.train.parallel.FSDP2) on 2 gloo CPU processes and a tiny random Llama.

- One training step on 2 ranks (fixed rollouts, uneven groups so that the ranks run different numbers of
  micro-batches) gives the same updated weights, loss and gradient norm as the single-process Trainer's step
  on the full batch (SGD, so that a wrong gradient scale is not hidden by Adam's normalisation); also when
  one rank's groups are all dropped, with two epochs (only the other rank scores old log-probs).
- The same for whole steps whose rollouts depend only on the prompt (a scripted generator): with refills
  after dropped groups (the ranks miss different numbers of groups, and must run the same refill rounds), and
  with guidance='dpo' (DPO pairs on both ranks; on one only, the other joining with a zero pass).
- A run interrupted by SIGINT on rank 1 only stops both ranks after the same step and saves a sharded
  checkpoint (torch.distributed.checkpoint); resumed in fresh processes it ends exactly where the
  uninterrupted 4-step run ends (weights, metrics).
- prompts_per_step not divisible by the number of processes is an error naming the field.
- `torchrun --nproc_per_node 2 -m fused_rlvr.train --preset tiny --fsdp true` trains and writes its outputs.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("math_verify")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from _train_helpers import DigitReward, params, scripted_generate, tiny_config  # noqa: E402

from fused_rlvr.train import Hook  # noqa: E402
from fused_rlvr.train.rollout import RolloutBatch  # noqa: E402
from fused_rlvr.train.trainer import Trainer  # noqa: E402

WORLD = 2
TIMEOUT_S = 240
LR = 0.5
GROUP_SIZES = (4, 4, 4, 7)  # rank 0: groups 0-1 (8 samples), rank 1: groups 2-3 (11 samples)
CASES = {
    "token-mean": {"loss_agg": "token-mean", "micro_batch": 3, "grad_clip": 1e6},
    "seq-mean-clipped": {"loss_agg": "seq-mean-token-mean", "micro_batch": 4, "grad_clip": 0.05},
    "pacs": {"algorithm": "pacs", "advantage": "rloo", "micro_batch": 5, "grad_clip": 0.0},
    "kl-2-epochs": {"beta": 0.1, "epochs": 2, "micro_batch": 16, "grad_clip": 0.0, "entropy_coef": 0.01},
    # rank 0's groups are uniform and dropped: it joins rank 1's update with zero-weighted dummy passes
    "rank0-empty": {"drop_uniform_groups": True, "micro_batch": 4, "grad_clip": 1e6},
    # the same with old log-probs: rank 1 scores its samples on the gathered model, rank 0 has none to score
    "rank0-empty-2-epochs": {"drop_uniform_groups": True, "epochs": 2, "micro_batch": 4, "grad_clip": 1e6},
}
UNIFORM = {"rank0-empty": (0, 1), "rank0-empty-2-epochs": (0, 1)}  # groups whose rewards are all 1
# whole steps on scripted rollouts: (config, the generator's digit-first probabilities (plain, guided))
STEP_CASES = {
    "refill": (
        {"drop_uniform_groups": True, "refill_rounds": 3, "micro_batch": 3, "grad_clip": 1e6},
        (0.3, None),
    ),
    # DPO pairs in a group of each rank (the loss is the mean over the pairs of both)
    "dpo": ({"guidance": "dpo", "guidance_samples": 2, "micro_batch": 4, "grad_clip": 1e6}, (0.15, 0.8)),
    # DPO pairs on rank 0 only: rank 1 pads the DPO forward with a zero pass
    "dpo-one-rank": (
        {"guidance": "dpo", "guidance_samples": 2, "micro_batch": 4, "grad_clip": 0.0},
        (0.3, 0.8),
    ),
}


def tiny(out_dir, **kw):
    return tiny_config(out_dir, **{"steps": 4, "n_eval": 6, "prompts_per_step": 4, **kw})


class SignalOnRank(Hook):
    """SIGINT to this process during step `at_step`, on one rank only."""

    def __init__(self, at_step, rank):
        self.at_step, self.rank = at_step, rank

    def extra_rollouts(self, ctx, batch):
        if ctx.step + 1 == self.at_step and dist.is_initialized() and dist.get_rank() == self.rank:
            os.kill(os.getpid(), signal.SIGINT)
        return []


class Candidates(Hook):
    """Counts the candidate groups the filters see (the first groups and the refills)."""

    def __init__(self):
        self.n = 0

    def keep_groups(self, ctx, batch):
        self.n += batch.n_groups
        return None


class DigitVerifier:
    """Correct when the response starts with a digit (a verifier for scripted rollouts)."""

    def __call__(self, text, answer):
        return float(text[:1].isdigit())

    def final_answer(self, text):
        return None


def fixed_batch(tr, uniform=()) -> RolloutBatch:
    """The same rollouts in every process: 4 held-out problems, groups of GROUP_SIZES random responses, a
    reward signal in every group except those in `uniform` (all rewards 1)."""
    g = torch.Generator().manual_seed(11)
    problems = list(tr.heldout[: len(GROUP_SIZES)])
    tok = tr.policy.tok
    vocab = len(tok)
    response_ids, group, rewards = [], [], []
    for k, size in enumerate(GROUP_SIZES):
        for j in range(size):
            n = int(torch.randint(1, tr.cfg.max_new_tokens + 1, (1,), generator=g))
            response_ids.append(torch.randint(3, vocab, (n,), generator=g).tolist())
            group.append(k)
            r = float(j % 2 == 0) if j < 2 else float(torch.rand(1, generator=g) < 0.5)
            rewards.append(1.0 if k in uniform else r)
    return RolloutBatch(
        problems=problems,
        prompt_ids=[tr.policy.prompt_ids(p.question) for p in problems],
        group=torch.tensor(group),
        response_ids=response_ids,
        texts=[tok.decode(r) for r in response_ids],
        truncated=torch.zeros(len(group), dtype=torch.bool),
        rewards=torch.tensor(rewards),
        tags=["base"] * len(group),
    )


def sgd_step(tr, batch=None) -> dict:
    """One train_step with SGD at a constant LR, on the given rollouts (the groups of this rank) if any."""
    tr.optimizer = torch.optim.SGD(tr.params, lr=LR)
    tr.scheduler = torch.optim.lr_scheduler.LambdaLR(tr.optimizer, lambda s: 1.0)
    if batch is not None:
        tr.collector.rollouts = lambda ctx, problems: batch
    return tr.train_step()


def scripted(tr, case):
    """`tr` with the scripted generator and verifier of STEP_CASES[case]."""
    plain, guided = STEP_CASES[case][1]
    tr.policy.generate = scripted_generate(tr.policy.tok, tr.cfg.max_new_tokens, plain, guided)
    tr.verifier = DigitVerifier()
    return tr


def _worker(rank, init_file, tmp, phase):
    from fused_rlvr.train.trainer import Trainer

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    torch.set_num_threads(1)
    res = {}
    try:
        if phase == "a":
            try:
                Trainer(tiny(os.path.join(tmp, "bad"), prompts_per_step=3, fsdp=True))
            except ValueError as exc:
                res["config_error"] = str(exc)
            for name, kw in CASES.items():
                tr = Trainer(tiny(os.path.join(tmp, name), fsdp=True, **kw))
                full = fixed_batch(tr, UNIFORM.get(name, ()))
                mine = torch.arange(rank * 2, rank * 2 + 2)
                rec = sgd_step(tr, full.select(torch.nonzero(torch.isin(full.group, mine)).flatten()))
                res[name] = {"params": params(tr.model), "rec": rec}
                tr.close()
            for name, (kw, _) in STEP_CASES.items():
                seen = Candidates()
                tr = scripted(Trainer(tiny(os.path.join(tmp, name), fsdp=True, **kw), hooks=[seen]), name)
                rec = sgd_step(tr)
                local = {k: v for h in tr.hooks for k, v in h.metrics().items()}  # this rank's, unmerged
                res[name] = {"params": params(tr.model), "rec": rec, "candidates": seen.n, "local": local}
                tr.close()
            tr = Trainer(
                tiny(os.path.join(tmp, "full"), fsdp=True), hooks=[DigitReward(), SignalOnRank(-1, 1)]
            )
            res["full_summary"] = tr.train()
            res["full"] = params(tr.model)
            tr.close()
            tr = Trainer(
                tiny(os.path.join(tmp, "part"), fsdp=True), hooks=[DigitReward(), SignalOnRank(2, 1)]
            )
            res["part_summary"] = tr.train()
            tr.close()
        else:
            tr = Trainer(
                tiny(os.path.join(tmp, "part"), resume=True, fsdp=True),
                hooks=[DigitReward(), SignalOnRank(-1, 1)],
            )
            res["resumed_summary"] = tr.train()
            res["resumed"] = params(tr.model)
            tr.close()
    except Exception as exc:  # reported to the parent instead of hanging the other rank
        import traceback

        res["worker_error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    torch.save(res, os.path.join(tmp, f"{phase}-rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _spawn(tmp, phase):
    init = os.path.join(tmp, f"rendezvous-{phase}")
    ctx = mp.start_processes(_worker, args=(init, tmp, phase), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} gloo processes of phase {phase} did not finish within {TIMEOUT_S} s")
    out = [torch.load(os.path.join(tmp, f"{phase}-rank{r}.pt"), weights_only=True) for r in range(WORLD)]
    for r, res in enumerate(out):
        assert "worker_error" not in res, f"phase {phase} rank {r}: {res['worker_error']}"
    return out


@pytest.fixture(scope="module")
def runs():
    tmp = tempfile.mkdtemp(prefix="test-train-fsdp-")
    try:
        a = _spawn(tmp, "a")
        b = _spawn(tmp, "b")  # fresh processes: the resume
        yield {"tmp": tmp, "a": a, "b": b}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("case", list(CASES))
def test_two_rank_step_equals_single_process_step(runs, tmp_path, case):
    tr = Trainer(tiny(tmp_path, **CASES[case]))
    start = params(tr.model)
    rec = sgd_step(tr, fixed_batch(tr, UNIFORM.get(case, ())))
    ref = params(tr.model)
    got = runs["a"][0][case]
    moved = max(float((ref[n] - start[n]).abs().max()) for n in ref)
    assert moved > 1e-3  # the step is not trivially zero
    for n in ref:
        err = float((got["params"][n] - ref[n]).abs().max())
        assert err <= 1e-5, f"{case} {n}: max abs diff {err:.2e} (step moved weights by up to {moved:.2e})"
    assert (got["rec"]["n_samples"], got["rec"]["n_groups"]) == (rec["n_samples"], rec["n_groups"])
    assert abs(got["rec"]["loss"] - rec["loss"]) <= 1e-5 * max(1.0, abs(rec["loss"]))
    if CASES[case]["grad_clip"] > 0:  # the global gradient norm, not a rank's
        assert abs(got["rec"]["grad_norm"] - rec["grad_norm"]) <= 1e-5 * rec["grad_norm"]


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_two_rank_scripted_step_equals_single_process_step(runs, tmp_path, case):
    seen = Candidates()
    tr = scripted(Trainer(tiny(tmp_path, **STEP_CASES[case][0]), hooks=[seen]), case)
    start = params(tr.model)
    rec = sgd_step(tr)
    ref = params(tr.model)
    got = runs["a"][0][case]
    moved = max(float((ref[n] - start[n]).abs().max()) for n in ref)
    assert moved > 1e-3  # the step is not trivially zero
    for n in ref:
        err = float((got["params"][n] - ref[n]).abs().max())
        assert err <= 1e-5, f"{case} {n}: max abs diff {err:.2e} (step moved weights by up to {moved:.2e})"
    keys = ("n_samples", "n_groups", "groups_dropped", "refill_rounds", "dpo_pairs", "guided_groups")
    assert {k: got["rec"].get(k) for k in keys} == {k: rec.get(k) for k in keys}
    assert abs(got["rec"]["loss"] - rec["loss"]) <= 1e-5 * max(1.0, abs(rec["loss"]))
    if case == "refill":
        # the ranks refilled different numbers of groups, in the same number of rounds, and drew together the
        # prompts the single process drew
        assert rec["refill_rounds"] >= 1 and rec["groups_dropped"] >= 1
        candidates = [res["refill"]["candidates"] for res in runs["a"]]
        assert candidates[0] != candidates[1] and sum(candidates) == seen.n
    else:
        pairs = [res[case]["local"]["dpo_pairs"] for res in runs["a"]]
        assert sum(pairs) == rec["dpo_pairs"] and (
            pairs[1] == 0 if case == "dpo-one-rank" else min(pairs) > 0
        )


def test_sharded_checkpoint_resumes_exactly(runs):
    a, b = runs["a"], runs["b"]
    for res in a:
        s = res["part_summary"]  # SIGINT on rank 1 only: both ranks stopped after step 2
        assert s["status"] == "interrupted (SIGINT)" and s["step"] == 2 and "after" not in s
    ckpt = a[0]["part_summary"]["checkpoint"]
    names = sorted(os.listdir(ckpt))
    assert names == ["manifest.json", "rank00000.pt", "rank00001.pt", "sharded", "state.pt"]
    assert b[0]["resumed_summary"]["status"] == "finished" and b[0]["resumed_summary"]["step"] == 4
    full, resumed = a[0]["full"], b[0]["resumed"]
    for n in full:
        torch.testing.assert_close(resumed[n], full[n], rtol=0, atol=0, msg=n)
    tmp = runs["tmp"]
    recs = [json.loads(x) for x in open(os.path.join(tmp, "part", "metrics.jsonl"))]
    full_recs = [json.loads(x) for x in open(os.path.join(tmp, "full", "metrics.jsonl"))]
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4]
    for key in ("reward_mean", "loss", "grad_norm", "n_samples"):
        assert [r.get(key) for r in recs] == [r.get(key) for r in full_recs], key
    assert recs[-1]["eval_accuracy"] == full_recs[-1]["eval_accuracy"]
    # rank 0 writes the outputs; a rank's summary carries the held-out set of all ranks
    assert a[0]["full_summary"]["before"]["n"] == 6 and a[1]["full_summary"]["before"]["n"] == 6
    for f in ("metrics.csv", "summary.json", "config.json", "samples.jsonl"):
        assert os.path.exists(os.path.join(tmp, "full", f)), f


def test_prompts_per_step_not_divisible_names_the_field(runs):
    for res in runs["a"]:
        assert "'prompts_per_step' must be divisible by the number of processes (2)" in res["config_error"]


def test_torchrun_smoke(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this interpreter")
    out = tmp_path / "run"
    cmd = [
        torchrun,
        "--nproc_per_node",
        "2",
        "-m",
        "fused_rlvr.train",
        "--preset",
        "tiny",
        "--fsdp",
        "true",
        "--steps",
        "2",
        "--n-eval",
        "4",
        "--threads",
        "1",
        "--out-dir",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "held-out accuracy:" in p.stdout and p.stdout.count('"status": "finished"') == 1  # rank 0 only
    recs = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [0, 1, 2] and recs[1]["n_samples"] == 16
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["n"] == 4
    assert sorted(os.listdir(out / "checkpoints" / "step_000002")) == [
        "manifest.json",
        "rank00000.pt",
        "rank00001.pt",
        "sharded",
        "state.pt",
    ]
