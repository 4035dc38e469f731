"""The trainer on a tiny randomly initialised model (no download): runs, resumes exactly, updates like the
materialised-logits computation, DARS counts, and clear errors for bad input."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("math_verify")

from _loss_reference import ref_grpo_loss, ref_pacs_loss  # noqa: E402
from _train_helpers import DigitReward, SignalAt, params, tiny_config  # noqa: E402

from fused_rlvr import group_advantages  # noqa: E402
from fused_rlvr.train import Hook, config_from_args, dars_extra, make_config  # noqa: E402
from fused_rlvr.train.hooks import RolloutRequest  # noqa: E402
from fused_rlvr.train.tasks import ArithmeticTask, Verifier, load_jsonl  # noqa: E402
from fused_rlvr.train.trainer import Trainer  # noqa: E402


def tiny(tmp_path, name="run", **kw):
    return tiny_config(tmp_path / name, **kw)


def test_short_run_changes_weights_and_logs_finite_metrics(tmp_path):
    cfg = tiny(tmp_path)
    tr = Trainer(cfg, hooks=[DigitReward()])
    before = params(tr.model)
    summary = tr.train()
    after = params(tr.model)
    assert summary["status"] == "finished" and summary["step"] == 3
    assert max(float((after[n] - before[n]).abs().max()) for n in before) > 1e-4
    recs = [json.loads(line) for line in open(os.path.join(cfg.out_dir, "metrics.jsonl"))]
    assert [r["step"] for r in recs] == [0, 1, 2, 3]
    for r in recs[1:]:
        for k in ("reward_mean", "entropy", "approx_kl", "clip_frac_low", "grad_norm", "loss", "time_step"):
            assert math.isfinite(r[k]), (k, r)
        assert r["n_samples"] == 12 and 0 < r["entropy"] < math.log(len(tr.policy.tok)) + 1e-4
    assert "eval_accuracy" in recs[0] and "eval_accuracy" in recs[-1]
    for f in ("metrics.csv", "summary.json", "config.json", "samples.jsonl"):
        assert os.path.exists(os.path.join(cfg.out_dir, f)), f
    header = open(os.path.join(cfg.out_dir, "metrics.csv")).readline().strip().split(",")
    assert "reward_mean" in header and "eval_accuracy" in header
    s = json.load(open(os.path.join(cfg.out_dir, "summary.json")))
    assert s["before"]["n"] == 8 and "after" in s and math.isfinite(s["gain_points"])


@pytest.mark.parametrize("preset_kw", [{}, {"steer": "exp", "dars": "et", "minibatches": 2, "epochs": 2}])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, preset_kw):
    full = Trainer(tiny(tmp_path, "full", steps=4, **preset_kw), hooks=[DigitReward(), SignalAt(-1)])
    full.train()
    # SIGINT during step 2: the step finishes, a checkpoint is written, train() returns "interrupted"
    part = Trainer(tiny(tmp_path, "part", steps=4, **preset_kw), hooks=[DigitReward(), SignalAt(2)])
    s = part.train()
    assert s["status"].startswith("interrupted") and s["step"] == 2 and "after" not in s
    resumed = Trainer(
        tiny(tmp_path, "part", steps=4, resume=True, **preset_kw), hooks=[DigitReward(), SignalAt(-1)]
    )
    s2 = resumed.train()
    assert s2["status"] == "finished" and s2["step"] == 4
    a, b = params(full.model), params(resumed.model)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, msg=n)
    recs = [json.loads(line) for line in open(os.path.join(tmp_path, "part", "metrics.jsonl"))]
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4]
    full_recs = [json.loads(line) for line in open(os.path.join(tmp_path, "full", "metrics.jsonl"))]
    assert [r.get("reward_mean") for r in recs] == [r.get("reward_mean") for r in full_recs]


def _reference_update(tr, batch, adv, lr, algorithm):
    """The same update from materialised logits: model(...).logits -> log_softmax -> float64 loss."""
    c = tr.cfg
    enc = batch.pack(None, tr.policy.pad_id, tr.policy.device)
    logits = tr.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, :-1]
    logp = torch.log_softmax(logits.double() / c.temperature, -1)
    targets = enc["input_ids"][:, 1:]
    mask = enc["response_mask"][:, 1:]
    lp = logp.gather(-1, targets[..., None])[..., 0] * mask
    ent = -(logp.exp() * logp).sum(-1) * mask
    if algorithm == "pacs":
        loss = ref_pacs_loss(
            lp, lp.detach(), batch.rewards.double(), mask, batch.group, beta=c.pacs_beta, baseline=c.advantage
        )
    else:
        a = adv.double()[:, None].expand_as(lp)
        old = batch.on_tokens(batch.old_logprobs, torch.arange(len(batch)), mask)
        loss = ref_grpo_loss(
            lp,
            ent,
            a,
            mask,
            None if old is None else old.double(),
            None,
            eps_low=c.eps_low,
            eps_high=c.cispo_cap if c.policy_loss == "cispo" else c.eps_high,
            agg=c.loss_agg,
            entropy_coef=c.entropy_coef,
            max_len=c.max_new_tokens,
            policy_loss=c.policy_loss,
            sapo_tau_pos=c.sapo_tau_pos,
            sapo_tau_neg=c.sapo_tau_neg,
        )
    loss.backward()
    with torch.no_grad():
        for p in tr.params:
            p -= lr * p.grad
    return float(loss)


@pytest.mark.parametrize(
    "kw",
    [
        {"loss_agg": "token-mean", "micro_batch": 16},
        {"loss_agg": "token-mean", "micro_batch": 3, "entropy_coef": 0.01},
        {"loss_agg": "seq-mean-token-mean", "micro_batch": 5},
        {"loss_agg": "dr_grpo", "micro_batch": 2},
        {"algorithm": "pacs", "advantage": "rloo", "micro_batch": 5},
        {"policy_loss": "cispo", "cispo_cap": 1.1, "micro_batch": 5, "stale": True},
        {"policy_loss": "sapo", "sapo_tau_pos": 0.8, "sapo_tau_neg": 1.3, "micro_batch": 5, "stale": True},
        {"policy_loss": "ppo", "micro_batch": 5, "stale": True},
    ],
)
def test_one_fused_update_equals_materialised_logits_update(tmp_path, kw):
    """stale: old log-probs off the current policy (as after an earlier minibatch), so ratios are not 1 and
    the clip / cap / gate of each policy_loss acts."""
    kw = dict(kw)
    stale = kw.pop("stale", False)
    lr = 0.5
    tr = Trainer(tiny(tmp_path, group_size=4, max_new_tokens=6, grad_clip=0.0, **kw))
    tr.optimizer = torch.optim.SGD(tr.params, lr=lr)
    tr.scheduler = torch.optim.lr_scheduler.LambdaLR(tr.optimizer, lambda s: 1.0)
    torch.manual_seed(3)
    batch = tr.collector.rollouts(tr.context(), tr.task.sample(tr.data_rng, 4))
    batch.rewards = torch.tensor(
        [1.0, 0, 0, 1, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0]
    )  # a signal in every group
    adv = (
        torch.zeros(len(batch))
        if tr.cfg.algorithm == "pacs"
        else group_advantages(batch.rewards, batch.group)
    )
    start = params(tr.model)
    batch.advantages = adv
    batch.old_logprobs = tr.policy.scorer.logprobs(batch)[0] if tr.cfg.algorithm == "pacs" or stale else None
    if stale:
        g = torch.Generator().manual_seed(5)
        batch.old_logprobs = [lp + 0.3 * torch.randn(lp.shape, generator=g) for lp in batch.old_logprobs]
    stats = tr.update(batch)
    fused = params(tr.model)
    with torch.no_grad():
        for n, p in tr.model.named_parameters():
            p.copy_(start[n])
    tr.model.zero_grad(set_to_none=True)
    ref_loss = _reference_update(tr, batch, adv, lr, tr.cfg.algorithm)
    ref = params(tr.model)
    assert abs(stats["loss"] - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
    moved = 0.0
    for n in start:
        torch.testing.assert_close(fused[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)
        moved = max(moved, float((ref[n] - start[n]).abs().max()))
    assert moved > 1e-4  # the update is not trivially zero


def test_dars_rollout_counts_match_the_table():
    # docs/methods.md section 5, N = 8: a = 0, 1/8, 2/8, 3/8, >= 1/2
    assert [dars_extra(c, 8, "et") for c in (0, 1, 2, 3, 4, 5, 8)] == [24, 11, 3, 1, 0, 0, 0]
    assert [dars_extra(c, 8, "hw") for c in (0, 1, 2, 3, 4, 5, 8)] == [56, 24, 8, 3, 0, 0, 0]
    with pytest.raises(ValueError, match="schedule"):
        dars_extra(0, 8, "xx")


def test_dars_hook_grows_hard_groups_and_drops_uniform_ones(tmp_path):
    cfg = tiny(tmp_path, dars="hw", group_size=8, drop_uniform_groups=True, adv_scale="none")
    tr = Trainer(cfg)
    seen = {}

    class Spy(Hook):
        def advantages(self, ctx, batch, adv):
            seen["sizes"] = torch.bincount(batch.group).tolist()
            seen["rewards"] = [batch.rewards[batch.group == g].tolist() for g in range(batch.n_groups)]
            seen["adv"] = adv.clone()
            seen["batch"] = batch
            return adv

    tr.hooks.insert(0, Spy())
    # rewards: group 0 has 1/8 right (-> 24 extra under hw), group 1 0/8 (-> 56), group 2 8/8 (-> 0, dropped
    # later: all equal unless the extras differ -- they get none)
    answers = {}

    def fake_verify(batch, rows):
        out = []
        for i in rows:
            g = int(batch.group[i])
            k = answers.setdefault(g, 0)
            answers[g] = k + 1
            out.append(1.0 if (g == 0 and k in (0, 9)) or g == 2 or (g == 1 and k == 20) else 0.0)
        return torch.tensor(out)

    tr.verify = fake_verify
    rec = tr.train_step()
    assert rec["dars_extra_rollouts"] == 24 + 56
    # group 2 (all right) is dropped; groups 0 and 1 keep their 8 + extra samples
    assert seen["sizes"] == [8 + 24, 8 + 56]
    assert rec["n_samples"] == 8 + 24 + 8 + 56 and rec["n_groups"] == 2
    b = seen["batch"]
    assert b.tags.count("dars") == 80
    r0 = torch.tensor(seen["rewards"][0])
    torch.testing.assert_close(seen["adv"][b.group == 0], r0 - r0.mean())  # R - mean, no std (DARS)


def test_hook_requests_guided_rollouts_scored_under_the_unguided_prompt(tmp_path):
    tr = Trainer(tiny(tmp_path))
    got = {}

    class Guide(Hook):
        def extra_rollouts(self, ctx, batch):
            return [
                RolloutRequest(
                    group=1, n=2, gen_prompt="7 + 1 = 8. " + batch.problems[1].question, tag="guided"
                )
            ]

        def advantages(self, ctx, batch, adv):
            got["batch"] = batch
            return adv

    tr.hooks.append(Guide())
    tr.train_step()
    b = got["batch"]
    rows = [i for i, t in enumerate(b.tags) if t == "guided"]
    assert len(rows) == 2 and all(int(b.group[i]) == 1 for i in rows)
    enc = b.pack(torch.tensor(rows), tr.policy.pad_id, tr.policy.device)
    prompt = b.prompt_ids[1]
    assert enc["input_ids"][0, : len(prompt)].tolist() == prompt  # scored under the group's own prompt


def test_micro_batching_does_not_change_the_update(tmp_path):
    outs = []
    for mb in (1, 4, 64):
        tr = Trainer(
            tiny(tmp_path, f"mb{mb}", micro_batch=mb, loss_agg="dapo", steps=2), hooks=[DigitReward()]
        )
        tr.train()
        outs.append(params(tr.model))
    for n in outs[0]:
        torch.testing.assert_close(outs[0][n], outs[1][n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outs[0][n], outs[2][n], rtol=1e-5, atol=1e-6)


def test_arithmetic_task_heldout_is_fixed_and_disjoint():
    t1, t2 = ArithmeticTask(seed=0, n_heldout=200), ArithmeticTask(seed=0, n_heldout=200)
    assert [p.question for p in t1.heldout()] == [p.question for p in t2.heldout()]
    assert len({p.question for p in t1.heldout()}) == 200
    import random

    train = t1.sample(random.Random(1), 500)
    assert not {p.question for p in train} & {p.question for p in t1.heldout()}
    for p in train[:50]:
        assert int(p.answer) == eval(p.question[len("What is ") : -1])  # noqa: S307 - our own generated text


def test_verifier_uses_the_final_answer():
    v = Verifier()
    assert v("3 + 4 = 7", "7") == 1.0
    assert v("The answer is 12.", "12") == 1.0
    assert v("7 then 8", "7") == 0.0
    assert v("no number here", "7") == 0.0
    # a restated expression is not an answer (math-verify alone evaluates it: a policy learned this exploit)
    assert v("To find 25 - 10, we need", "15") == 0.0
    assert v("25 - 10 = 15", "15") == 1.0 and v("\\boxed{15}", "15") == 1.0 and v("x = 1/2", "0.5") == 1.0


def test_jsonl_task_trains_and_reports_errors_with_file_and_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(
        "\n".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": i + 1}) for i in range(12))
    )
    cfg = tiny(tmp_path, task=str(good), n_eval=4, steps=1)
    s = Trainer(cfg).train()
    assert s["before"]["n"] == 4 and s["step"] == 1
    assert len(load_jsonl(str(good))) == 12
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field\(s\) \['answer'\]"):
        load_jsonl(str(bad))
    bad.write_text('{"prompt": "a", "answer": "1"}\n\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: not valid JSON"):
        load_jsonl(str(bad))
    with pytest.raises(ValueError, match="'task' must be 'arithmetic' or a path"):
        Trainer(tiny(tmp_path, task=str(tmp_path / "missing.json")))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        Trainer(tiny(tmp_path, task=str(tmp_path / "missing.jsonl")))


def test_config_errors_name_the_field_and_range(tmp_path):
    with pytest.raises(ValueError, match="'lr' must be > 0.0"):
        make_config("tiny", {"lr": 0.0})
    with pytest.raises(ValueError, match="'eps_low' must be <= 1.0"):
        make_config("tiny", {"eps_low": 1.5})
    with pytest.raises(ValueError, match=r"'algorithm' must be one of \['grpo', 'pacs'\]"):
        make_config("tiny", {"algorithm": "ppo"})
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['learning_rate'\]"):
        make_config("tiny", {"learning_rate": 1.0})
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        make_config("huge")
    with pytest.raises(ValueError, match="'steps' must be a number"):
        config_from_args(["--steps", "ten"])
    with pytest.raises(ValueError, match="'group_size' must be >= 2 with advantage='rloo'"):
        make_config("tiny", {"advantage": "rloo", "group_size": 1})
    with pytest.raises(ValueError, match=r"'policy_loss' must be one of \['ppo', 'cispo', 'sapo'\]"):
        config_from_args(["--policy-loss", "vespo"])
    with pytest.raises(ValueError, match="'policy_loss' apply to algorithm='grpo' only"):
        make_config("tiny", {"algorithm": "pacs", "policy_loss": "cispo"})
    with pytest.raises(ValueError, match="'dual_clip' applies to policy_loss='ppo' only"):
        make_config("tiny", {"policy_loss": "sapo", "dual_clip": 3.0})
    with pytest.raises(ValueError, match="'cispo_cap' must be > 0.0"):
        make_config("tiny", {"policy_loss": "cispo", "cispo_cap": 0.0})
    cfg = config_from_args(["--preset", "tiny", "--policy-loss", "sapo", "--sapo-tau-neg", "1.2"])
    assert (cfg.policy_loss, cfg.sapo_tau_pos, cfg.sapo_tau_neg) == ("sapo", 1.0, 1.2)
    f = tmp_path / "c.json"
    f.write_text('{"steps": 7, "steer": "linear"}')
    cfg = config_from_args(["--preset", "tiny", "--config", str(f), "--lr", "0.01", "--dual-clip", "none"])
    assert (cfg.steps, cfg.steer, cfg.lr, cfg.model, cfg.dual_clip) == (
        7,
        "linear",
        0.01,
        "tiny-random",
        None,
    )
    f.write_text("{bad")
    with pytest.raises(ValueError, match="not valid JSON: line 1"):
        config_from_args(["--config", str(f)])


def test_unknown_model_and_train_layers_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'no-such-org/no-such-model'.*never downloads"):
        Trainer(tiny(tmp_path, model="no-such-org/no-such-model"))
    with pytest.raises(ValueError, match="'train_layers' must be <= 2"):
        Trainer(tiny(tmp_path, train_layers=5))


def test_train_layers_freezes_the_rest(tmp_path):
    tr = Trainer(tiny(tmp_path, train_layers=1, steps=1), hooks=[DigitReward()])
    before = params(tr.model)
    tr.train()
    after = params(tr.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith(("model.layers.1.", "model.norm")) for n in changed)


def test_resume_refuses_an_incompatible_config_and_a_fresh_run_never_overwrites(tmp_path):
    Trainer(tiny(tmp_path, "r", steps=1)).train()
    with pytest.raises(ValueError, match="already holds a run with checkpoints; pass --resume"):
        Trainer(tiny(tmp_path, "r", steps=1)).train()
    with pytest.raises(ValueError, match="incompatible config.*group_size: checkpoint 4 vs config 2"):
        Trainer(tiny(tmp_path, "r", steps=2, group_size=2, resume=True)).train()


@pytest.mark.parametrize(
    "kw",
    [
        {"algorithm": "pacs", "advantage": "rloo"},
        {"steer": "exact"},
        {"beta": 0.1, "kl": "k3", "epochs": 2},
        {"importance": "sequence"},
        {"algorithm": "pacs", "advantage": "grpo", "minibatches": 2, "epochs": 2},
        {
            "dars": "et",
            "drop_uniform_groups": True,
            "adv_scale": "none",
            "loss_agg": "seq-mean-token-sum-norm",
        },
    ],
)
def test_algorithms_run_with_finite_metrics(tmp_path, kw):
    cfg = tiny(tmp_path, steps=2, **kw)
    s = Trainer(cfg, hooks=[DigitReward()]).train()
    assert s["status"] == "finished"
    recs = [json.loads(line) for line in open(os.path.join(cfg.out_dir, "metrics.jsonl"))]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["entropy"]) for r in recs[1:])
    if kw.get("beta"):
        assert recs[-1]["ref_kl"] > 0  # the second epoch has moved away from the reference


def test_sampling_ignores_the_models_generation_config():
    # a generation_config.json with top_k / repetition penalty would sample from another distribution than
    # the one the losses score: generate() must use the plain tempered softmax
    from fused_rlvr.train.models import tiny_random_model
    from fused_rlvr.train.rollout import generate

    model, tok = tiny_random_model(0)
    kw = dict(
        max_new_tokens=8, temperature=1.0, top_p=1.0, greedy=False, batch_size=64, eos_ids=[1], pad_id=0
    )
    torch.manual_seed(0)
    plain = generate(model, tok, [[5, 6, 7]] * 64, **kw)[0]
    model.generation_config.top_k = 2
    model.generation_config.repetition_penalty = 10.0
    torch.manual_seed(0)
    assert generate(model, tok, [[5, 6, 7]] * 64, **kw)[0] == plain
    assert len({r[0] for r in plain}) > 2  # more first tokens than a top_k=2 sampler could give


def test_no_heldout_problems_and_resume_with_a_new_lr(tmp_path):
    s = Trainer(tiny(tmp_path, "e", n_eval=0, steps=1), hooks=[DigitReward()]).train()
    assert s["before"]["n"] == 0 and math.isnan(s["after"]["accuracy"])
    tr = Trainer(tiny(tmp_path, "e", steps=2, resume=True, lr=0.5), hooks=[DigitReward()])
    tr.load(os.path.join(tr.checkpointer.root, "step_000001"))
    assert tr.optimizer.param_groups[0]["lr"] == 0.5
