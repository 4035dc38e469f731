"""The seed papers' methods as trainer hooks, on a tiny random model (no download): RLPR's reward and std
filter with refill, VERL's rank shaping, Agent-RLVR's guidance (GRPO and DPO forms), and exact resumes.

A hook's own behaviour is tested with a StepContext of a policy and no Trainer (`HookBench`); its effect on
a training step with the Trainer."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("math_verify")

from _train_helpers import DigitReward, HookBench, SignalAt, params, tiny_config  # noqa: E402

from fused_rlvr.dpo import dpo_loss  # noqa: E402
from fused_rlvr.effective_rank import EffectiveRankShaper, erv_era  # noqa: E402
from fused_rlvr.integrations.hf import last_hidden_states, sequence_token_stats  # noqa: E402
from fused_rlvr.train import Hook, make_config  # noqa: E402
from fused_rlvr.train.hooks import (  # noqa: E402
    GuidanceHook,
    RankShapingHook,
    RLPRReward,
    StdFilterHook,
    build_hooks,
    splice_reference,
)
from fused_rlvr.train.rollout import RolloutBatch, format_prompt  # noqa: E402
from fused_rlvr.train.tasks import ArithmeticTask, Problem, plan_hint  # noqa: E402
from fused_rlvr.train.trainer import Trainer  # noqa: E402

P_SUM = Problem("47 + 25", "What is 47 + 25?", "72")
P_SMALL = Problem("3 + 4", "What is 3 + 4?", "7")
P_MUL = Problem("6 * 8", "What is 6 * 8?", "48")


def tiny(tmp_path, name="run", **kw):
    return tiny_config(tmp_path / name, **{"n_eval": 4, **kw})


def hook_of(hooks, cls):
    (h,) = [h for h in getattr(hooks, "hooks", hooks) if isinstance(h, cls)]
    return h


class StubVerifier:
    """Correct when `correct(text, answer)` says so; every final answer reads as `final`."""

    def __init__(self, correct, final=None):
        self.correct, self.final = correct, final

    def __call__(self, text, answer):
        return float(self.correct(text, answer))

    def final_answer(self, text):
        return self.final


def materialised_logprobs(model, enc, temperature=1.0):
    """[b, T-1] log-probs of the packed tokens from the model's own logits (masked to the response)."""
    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, :-1]
    logp = torch.log_softmax(logits.double() / temperature, -1)
    lp = logp.gather(-1, enc["input_ids"][:, 1:, None])[..., 0]
    return lp * enc["response_mask"][:, 1:]


# ------------------------------------------------------------------------------------------------ guidance
def test_guidance_adds_guided_samples_to_failed_groups_only_scored_under_the_unguided_prompt(tmp_path):
    cfg = tiny(tmp_path, guidance="grpo", guidance_samples=3)
    # group 0 right, 1 and 2 wrong
    tr = HookBench(cfg, StubVerifier(lambda text, answer: answer == "7", final="13"))
    prompts_seen = []
    generate = tr.policy.generate

    def spy(prompts, greedy=False, on_batch=None):
        prompts_seen.append(prompts)
        return generate(prompts, greedy)

    tr.policy.generate = spy
    hook = hook_of(build_hooks(cfg), GuidanceHook)
    ctx = tr.ctx()
    batch = tr.rollouts([P_SMALL, P_SUM, P_MUL])
    requests = hook.extra_rollouts(ctx, batch)
    assert [(r.group, r.n, r.tag) for r in requests] == [(1, 3, "guided"), (2, 3, "guided")]
    # the guided prompt: the question, the verifier's feedback, a plan hint, the usual suffix
    g1, g2 = requests[0].gen_prompt, requests[1].gen_prompt
    assert g1 == (
        "What is 47 + 25?\nYour previous answer, 13, is wrong.\n"
        "Plan: 47 + 25 = (47 + 20) + 5. First 47 + 20 = 67; then add 5." + tr.cfg.prompt_suffix
    )
    assert "Plan: 6 * 8 = 6 * 7 + 6. First 6 * 7 = 42; then add 6." in g2 and "48" not in g2
    hook.hint = False  # guidance_hint=False: the verifier's feedback only
    assert hook.guided_prompt(ctx, batch, 1) == "What is 47 + 25?\nYour previous answer, 13, is wrong." + (
        tr.cfg.prompt_suffix
    )
    hook.hint = True
    tr.collector.extra_rollouts(ctx, batch, requests)
    guided = [i for i, t in enumerate(batch.tags) if t == "guided"]
    assert len(batch) == 12 + 6 and guided == list(range(12, 18))
    assert batch.group[guided].tolist() == [1, 1, 1, 2, 2, 2]  # the failed groups only, 3 each
    assert batch.rewards[guided].tolist() == [0.0] * 6  # verified like the others
    # generated from the guided prompts ...
    want = [format_prompt(tr.policy.tok, g, "", tr.cfg.system_prompt) for g in (g1,) * 3 + (g2,) * 3]
    assert prompts_seen[1] == want
    hook.rewards(ctx, batch, batch.rewards)
    # ... but packed (hence scored and trained) under the group's own, unguided prompt
    enc = batch.pack(torch.tensor(guided), tr.policy.pad_id, tr.policy.device)
    for j, i in enumerate(guided):
        p = batch.prompt_ids[int(batch.group[i])]
        seq = p + batch.response_ids[i]
        assert enc["input_ids"][j, : len(seq)].tolist() == seq
        assert enc["response_mask"][j].tolist() == [0] * len(p) + [1] * len(batch.response_ids[i]) + [0] * (
            enc["input_ids"].shape[1] - len(seq)
        )
    assert p == tr.policy.prompt_ids(P_MUL.question) and "Plan" not in tr.policy.tok.decode(p)
    m = hook.metrics()
    assert (m["guided_groups"], m["guided_samples"], m["guided_success_rate"]) == (2.0, 6.0, 0.0)
    assert m["guided_group_frac"] == pytest.approx(2 / 3)


def test_plan_hint_breaks_the_problem_down_without_stating_the_answer():
    problems = ArithmeticTask(seed=0, n_heldout=10).sample(random.Random(0), 400)
    for p in problems:
        hint = plan_hint(p.question)
        assert hint is not None and hint.startswith("Plan: ")
        given = set(re.findall(r"\d+", p.question))
        assert p.answer not in set(re.findall(r"\d+", hint)) - given, (p.question, hint)
        for lhs, rhs in re.findall(r"First ([\d +*-]+) = (\d+)", hint):  # its partial result is right
            assert eval(lhs) == int(rhs), hint  # noqa: S307 - our own generated text
    assert (
        plan_hint("What is 83 - 20?")
        == "Plan: 83 - 20 = (83 - 10) - 10. First 83 - 10 = 73; then take away 10."
    )
    assert plan_hint("Name the capital of France.") is None


def test_guidance_dpo_loss_equals_dpo_loss_on_the_pairs(tmp_path):
    cfg = tiny(tmp_path, guidance="dpo", guidance_samples=2, dpo_beta=0.2, dpo_coef=0.5)
    # a guided sample succeeds when its text is "OK"; group 2 (6 * 8) succeeds without guidance
    tr = HookBench(cfg, StubVerifier(lambda text, answer: text == "OK" or answer == "48"))
    ctx = tr.ctx()
    batch = tr.rollouts([P_SMALL, P_SUM, P_MUL])
    hook = hook_of(build_hooks(cfg), GuidanceHook)
    tr.collector.extra_rollouts(ctx, batch, hook.extra_rollouts(ctx, batch))
    assert batch.tags[12:] == ["guided"] * 4 and batch.group[12:].tolist() == [0, 0, 1, 1]
    batch.texts[12] = batch.texts[14] = batch.texts[15] = "OK"  # group 0: 1 success, group 1: 2
    chosen, rejected = hook.pairs(ctx, batch)
    assert chosen.tolist() == [12, 14, 15] and rejected.tolist() == [0, 4, 5]
    adv = torch.arange(len(batch), dtype=torch.float32) + 1
    out = hook.advantages(ctx, batch, adv)  # takes the reference log-probs (pre-update policy)
    assert out[batch.group < 2].eq(0).all() and torch.equal(out[batch.group == 2], adv[batch.group == 2])
    rows = torch.cat([chosen, rejected])
    model, params_ = tr.policy.model, tr.policy.params
    enc = batch.pack(rows, tr.policy.pad_id, tr.policy.device)
    with torch.no_grad():
        ref = materialised_logprobs(model, enc).sum(1)
        for p in params_:  # an optimizer step happens between the rollout and this loss
            p.add_(0.05 * torch.randn_like(p))
    loss = hook.extra_loss(ctx, batch)
    pol = materialised_logprobs(model, enc).sum(1)
    want, _ = dpo_loss(pol[:3], pol[3:], ref[:3], ref[3:], beta=0.2)
    assert loss.requires_grad and abs(float(loss.detach()) - 0.5 * float(want.detach())) < 1e-5
    assert abs(float(want.detach()) - math.log(2)) > 1e-3  # the policy moved away from the reference
    g = torch.autograd.grad(loss, params_)
    g_want = torch.autograd.grad(0.5 * want, params_)
    for a, b in zip(g, g_want):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-6)
    m = hook.metrics()
    assert m["dpo_pairs"] == 3.0 and abs(m["dpo_loss"] - float(want.detach())) < 1e-5


def test_guidance_dpo_runs_through_the_trainer(tmp_path):
    tr = Trainer(tiny(tmp_path, guidance="dpo", guidance_samples=2, steps=1))
    tr.verifier = StubVerifier(lambda text, answer: text[:1].isdigit())  # a signal a random model finds
    before = params(tr.model)
    rec = tr.train_step()
    assert rec["guided_groups"] >= 1 and rec["guided_samples"] == 2 * rec["guided_groups"]
    assert rec["dpo_pairs"] >= 1 and math.isfinite(rec["loss"])
    # one optimizer step per batch: the DPO loss is taken where policy = reference (pre-update), log 2
    assert rec["dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert any(not torch.equal(before[n], p) for n, p in tr.model.named_parameters())


# ---------------------------------------------------------------------------------------------------- RLPR
def _char_batch(policy, problem, responses):
    tok = policy.tok
    ids = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in responses]
    return RolloutBatch(
        problems=[problem],
        prompt_ids=[policy.prompt_ids(problem.question)],
        group=torch.zeros(len(ids), dtype=torch.long),
        response_ids=ids,
        texts=[tok.decode(i, skip_special_tokens=True) for i in ids],
        truncated=torch.zeros(len(ids), dtype=torch.bool),
        rewards=torch.zeros(len(ids)),
        tags=["base"] * len(ids),
    )


def _mean_prob(model, tok, ids, answer_from):
    """Mean probability of the tokens ids[answer_from:] given the ones before (sequence_token_stats)."""
    x = torch.tensor([ids])
    mask = torch.zeros_like(x)
    mask[0, answer_from:] = 1
    with torch.no_grad():
        st = sequence_token_stats(model, x, torch.ones_like(x), mask, return_entropy=False)
    return float(st.logprobs[0, answer_from - 1 :].exp().mean())


def test_rlpr_reward_is_the_mean_probability_of_the_spliced_answer_minus_cached_score_a(tmp_path):
    cfg = tiny(tmp_path, reward="rlpr")
    tr = HookBench(cfg)
    policy = tr.policy
    hook = hook_of(build_hooks(cfg, policy.frozen_copy()), RLPRReward)
    tok, model, ctx = policy.tok, policy.model, tr.ctx()
    initial = params(model)
    batch = _char_batch(policy, P_SUM, [" 5 + 9 = 12.", "no number", "7"])
    prompt = batch.prompt_ids[0]
    ref = tok("72", add_special_tokens=False)["input_ids"]
    score_a = _mean_prob(model, tok, prompt + ref, len(prompt))
    head = tok(" 5 + 9 = ", add_special_tokens=False)["input_ids"]
    score_b = _mean_prob(model, tok, prompt + head + ref, len(prompt) + len(head))
    r = hook.rewards(ctx, batch, batch.rewards)
    assert hook.score_a == {"What is 47 + 25?\x1f72": pytest.approx(score_a, abs=1e-6)}
    want = [0.9 * max(0.0, score_b - score_a) + 0.1, 0.0, 0.1]  # "7" -> spliced "72": scoreB = scoreA
    torch.testing.assert_close(r, torch.tensor(want), rtol=0, atol=1e-6)
    torch.testing.assert_close(hook.last["score_b"], torch.tensor([score_b, 0.0, score_a]), rtol=0, atol=1e-6)
    # the cached scoreA is what gets subtracted (set it low so the clamp at 0 does not hide the difference)
    hook.score_a["What is 47 + 25?\x1f72"] = 0.001
    r = hook.rewards(ctx, batch, batch.rewards)
    assert float(r[0]) == pytest.approx(0.9 * (score_b - 0.001) + 0.1, abs=1e-6)
    # a problem first seen after the policy moved is debiased with the INITIAL policy's scoreA
    with torch.no_grad():
        for p in policy.params:
            p.add_(0.1 * torch.randn_like(p))
    batch2 = _char_batch(policy, P_SMALL, ["9"])
    hook.rewards(ctx, batch2, batch2.rewards)
    prompt2, ref2 = batch2.prompt_ids[0], tok("7", add_special_tokens=False)["input_ids"]
    moved = _mean_prob(model, tok, prompt2 + ref2, len(prompt2))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(initial[n])
    assert hook.score_a["What is 3 + 4?\x1f7"] == pytest.approx(
        _mean_prob(model, tok, prompt2 + ref2, len(prompt2))
    )
    assert abs(hook.score_a["What is 3 + 4?\x1f7"] - moved) > 1e-6
    m = hook.metrics()
    assert m["rlpr_cached_problems"] == 2.0 and m["rlpr_format"] == pytest.approx(5 / 7)


class _MergingTokenizer:
    """Greedy longest-match tokenizer over a fixed vocabulary (GPT-2-like: " 72" can be one token)."""

    def __init__(self, vocab):
        self.vocab = sorted(vocab, key=len, reverse=True)
        self.ids = {t: i for i, t in enumerate(vocab)}
        self.inv = dict(enumerate(vocab))

    def __call__(self, text, add_special_tokens=False):
        out = []
        while text:
            t = next(t for t in self.vocab if text.startswith(t))
            out.append(self.ids[t])
            text = text[len(t) :]
        return {"input_ids": out}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.inv[i] for i in ids)


def test_splice_reference_handles_merged_and_separate_number_tokens():
    tok = _MergingTokenizer(["The", " answer", " is", " 72", " 8", " ", "7", "2", "8", "1", "."])
    t = tok.ids
    prompt = [t["The"]]
    # " 72" is one token: cut before it, re-tokenise " " + "81" -> " 8", "1"; both carry answer characters
    resp = [t[" answer"], t[" is"], t[" 72"], t["."]]
    sp = splice_reference(tok, prompt, resp, "81")
    assert sp.input_ids.tolist() == [t["The"], t[" answer"], t[" is"], t[" 8"], t["1"]]
    assert sp.answer_mask.tolist() == [False, False, False, True, True]
    # a separate space token stays in the response; only the digits are the answer
    resp = [t[" answer"], t[" is"], t[" "], t["7"], t["2"], t["."]]
    sp = splice_reference(tok, prompt, resp, "81")
    assert sp.input_ids.tolist() == [t["The"], t[" answer"], t[" is"], t[" "], t["8"], t["1"]]
    assert sp.answer_mask.tolist() == [False] * 4 + [True, True]
    assert splice_reference(tok, prompt, [t[" answer"], t["."]], "81") is None


# ------------------------------------------------------------------------------------------ std filter
class ScriptedRewards(Hook):
    """Rewards per group from a script, one entry per reward call (a rollout collection)."""

    def __init__(self, script):
        self.script = list(script)
        self.seen = []

    def rewards(self, ctx, batch, rewards):
        groups = self.script.pop(0)
        self.seen.append([p.question for p in batch.problems])
        assert len(groups) == batch.n_groups
        return torch.tensor([v for g in groups for v in g], dtype=torch.float32)


def test_std_filter_drops_low_std_groups_and_refills(tmp_path):
    flat, mixed = [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]
    script = ScriptedRewards([[flat, mixed, flat], [flat, mixed], [flat]])
    tr = Trainer(tiny(tmp_path, rlpr_std_filter=True, refill_rounds=2), hooks=[script])
    hook = hook_of(tr.hooks, StdFilterHook)
    hook.filter.ema_mean, hook.last_step = 0.4, tr.step  # threshold 0.5 * 0.4 = 0.2 for this step
    seen = {}

    class Spy(Hook):
        def advantages(self, ctx, batch, adv):
            seen["batch"] = batch
            return adv

    tr.hooks.append(Spy())
    rec = tr.train_step()
    # 3 candidates (1 kept), refill 2 (1 kept), refill 1 (0 kept): rounds exhausted with 2 of 3 groups
    assert [len(s) for s in script.seen] == [3, 2, 1]
    b = seen["batch"]
    assert b.n_groups == 2 and [p.question for p in b.problems] == [script.seen[0][1], script.seen[1][1]]
    assert b.rewards.tolist() == mixed + mixed
    assert (rec["groups_dropped"], rec["refill_rounds"], rec["n_groups"], rec["n_samples"]) == (
        4.0,
        2.0,
        2,
        8,
    )
    assert rec["std_filter_candidates"] == 6.0 and rec["std_filter_keep_rate"] == pytest.approx(2 / 6)
    assert rec["std_filter_threshold"] == pytest.approx(0.2)
    # every candidate's std is pending for the next step's EMA; the next step folds it in first
    assert hook.filter.pending_count == 6
    std_mixed = float(torch.tensor(mixed).std())
    assert hook.filter.pending_sum == pytest.approx(2 * std_mixed)
    tr.step += 1
    hook.keep_groups(tr.context(), b)
    assert hook.filter.ema_mean == pytest.approx(0.99 * 0.4 + 0.01 * (2 * std_mixed / 6))


# ------------------------------------------------------------------------------------------ rank shaping
def test_rank_shaping_changes_advantages_as_the_shaper_says(tmp_path):
    cfg = tiny(tmp_path, rank_shaping=True, max_new_tokens=8)
    tr = HookBench(cfg)
    hook = hook_of(build_hooks(cfg), RankShapingHook)
    batch = tr.rollouts([P_SMALL, P_SUM, P_MUL])
    enc = batch.pack(None, tr.policy.pad_id, tr.policy.device)
    with torch.no_grad():  # the rows the fused op receives for the response tokens
        h = last_hidden_states(tr.policy.model, enc["input_ids"], enc["attention_mask"])[:, :-1]
    m = enc["response_mask"][:, 1:].bool()
    dyn = [erv_era(h[i][m[i]]) for i in range(len(batch))]
    er, erv, era = (torch.tensor([d[k] for d in dyn]) for k in range(3))
    assert (er > 1).all() and erv.eq(0).all()  # < 80 tokens: no velocity / acceleration
    ref = EffectiveRankShaper()
    adv = torch.linspace(-1, 1, len(batch))
    for call in range(3):
        want, st = ref(adv, er, erv, era)
        got = hook.advantages(tr.ctx(call), batch, adv)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert hook.shaper.mu == pytest.approx(ref.mu) and hook.shaper.calls == call + 1
        if call == 0:
            assert torch.equal(got, adv)  # the authors' schedule: no baseline yet
        else:
            assert st.shaped and (got - adv).max() > 0.1 and ((got - adv) <= adv.abs() / 2 + 1e-7).all()
    assert hook.metrics()["er_mean"] == pytest.approx(float(er.mean()), abs=1e-5)


# -------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize(
    "kw",
    [
        {"rank_shaping": True},
        {
            "reward": "rlpr",
            "rlpr_std_filter": True,
            "rlpr_std_beta": 1.0,
            "refill_rounds": 1,
            "guidance": "grpo",
            "guidance_samples": 1,
        },
    ],
)
def test_interrupted_and_resumed_run_equals_uninterrupted_with_stateful_hooks(tmp_path, kw):
    def run(name, at, **extra):
        tr = Trainer(tiny(tmp_path, name, steps=4, **kw, **extra), hooks=[DigitReward(), SignalAt(at)])
        return tr, tr.train()

    full, _ = run("full", -1)
    _, s = run("part", 2)
    assert s["status"].startswith("interrupted") and s["step"] == 2
    resumed, s2 = run("part", -1, resume=True)
    assert s2["status"] == "finished" and s2["step"] == 4
    a, b = params(full.model), params(resumed.model)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, msg=n)
    for h1, h2 in zip(full.hooks, resumed.hooks):
        assert json.dumps(h1.state_dict(), sort_keys=True) == json.dumps(h2.state_dict(), sort_keys=True)
    states = [h.state_dict() for h in full.hooks]
    if kw.get("rank_shaping"):
        assert states[-1]["shaper"]["calls"] == 4 and states[-1]["shaper"]["mu"] != [0.0, 0.0, 0.0]
    else:
        assert len(states[-2]["score_a"]) >= 3 and states[-1]["filter"]["ema_mean"] is not None
    recs = [json.loads(line) for line in open(tmp_path / "part" / "metrics.jsonl")]
    full_recs = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4]
    for key in (
        "reward_mean",
        "rlpr_reward_mean",
        "er_mean",
        "std_filter_threshold",
        "groups_dropped",
        "loss",
    ):
        assert [r.get(key) for r in recs] == [r.get(key) for r in full_recs], key
    if kw.get("rlpr_std_filter"):  # the filter dropped and the trainer refilled after the resume too
        assert sum(r["refill_rounds"] for r in recs[3:]) >= 1


def test_method_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"'reward' must be one of \['verifier', 'rlpr'\]"):
        make_config("tiny", {"reward": "judge"})
    with pytest.raises(ValueError, match=r"'guidance' must be one of \[None, 'grpo', 'dpo'\]"):
        make_config("tiny", {"guidance": "sft"})
    with pytest.raises(ValueError, match="apply to algorithm='grpo' only"):
        make_config("tiny", {"algorithm": "pacs", "rank_shaping": True})
    with pytest.raises(ValueError, match="'group_size' must be >= 2 with rlpr_std_filter"):
        make_config("tiny", {"rlpr_std_filter": True, "group_size": 1})
    for preset, field, value in (
        ("rlpr", "reward", "rlpr"),
        ("verl", "rank_shaping", True),
        ("guidance", "guidance", "grpo"),
    ):
        assert getattr(make_config(preset), field) == value
    Trainer(tiny(tmp_path, "r", steps=1, rank_shaping=True)).train()
    with pytest.raises(
        ValueError, match="incompatible config.*rank_shaping: checkpoint True vs config False"
    ):
        Trainer(tiny(tmp_path, "r", steps=2, resume=True)).train()
