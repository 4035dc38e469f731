"""RLPR: probability reward, answer splicing and the std filter, on hand-computed cases."""

import json
import math

import pytest
import torch
from _helpers import BACKENDS

from fused_rlvr import linear_logprobs
from fused_rlvr.reference import reference_logits
from fused_rlvr.rlpr import StdFilter, rlpr_reward, rlpr_score, splice_answer


def test_rlpr_score_is_the_mean_probability():
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.1, 0.2, 0.3], [0.4, 0.4, 0.4]]))
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    score = rlpr_score(lp, mask)
    torch.testing.assert_close(score, torch.tensor([0.375, 0.0, 0.4]))
    assert score[0].item() != pytest.approx(math.sqrt(0.5 * 0.25))  # not exp(mean log-prob)
    assert score.dtype == torch.float32
    with pytest.raises(ValueError, match=r"answer_mask must have shape \(3, 3\)"):
        rlpr_score(lp, mask[:, :2])
    with pytest.raises(ValueError, match="answer_logprobs must be a floating"):
        rlpr_score(torch.zeros(3, dtype=torch.long), mask)


def test_rlpr_reward_hand_computed():
    sb = torch.tensor([0.6, 0.3, 0.5, 0.9])
    sa = torch.tensor([0.4, 0.5, 0.5, 0.2])
    fmt = torch.tensor([1, 1, 0, 0])
    torch.testing.assert_close(rlpr_reward(sb, sa), torch.tensor([0.2, 0.0, 0.0, 0.7]))
    torch.testing.assert_close(rlpr_reward(sb, sa, fmt), torch.tensor([0.9 * 0.2 + 0.1, 0.1, 0.0, 0.9 * 0.7]))
    torch.testing.assert_close(
        rlpr_reward(sb, sa, fmt.bool(), w=0.5), torch.tensor([0.5 * 0.2 + 0.5, 0.5, 0.0, 0.5 * 0.7])
    )
    torch.testing.assert_close(rlpr_reward(sb, 0.5), torch.tensor([0.1, 0.0, 0.0, 0.4]))
    with pytest.raises(ValueError, match=r"w must be a number in \[0, 1\]"):
        rlpr_reward(sb, sa, fmt, w=1.5)
    with pytest.raises(ValueError, match=r"score_a must be a scalar or \[B\]"):
        rlpr_reward(sb, sa[:2])
    with pytest.raises(ValueError, match="format_ok must be boolean or hold only 0 and 1"):
        rlpr_reward(sb, sa, torch.tensor([0.5, 1, 0, 0]))


def test_splice_replaces_the_answer_span():
    prompt = [1, 2, 3]
    response = [10, 11, 20, 21, 22, 12, 99]  # ... <answer> 20 21 22 </answer> eos
    out = splice_answer(prompt, response, (2, 5), [30, 31])
    assert out.input_ids.tolist() == [1, 2, 3, 10, 11, 30, 31, 12, 99]
    assert out.answer_mask.tolist() == [False] * 5 + [True, True] + [False] * 2
    assert out.prompt_len == 3 and out.parsed
    # an empty generated answer (start == end) and tensor inputs
    out = splice_answer(torch.tensor(prompt), torch.tensor(response), (5, 5), torch.tensor([30]))
    assert out.input_ids.tolist() == [1, 2, 3, 10, 11, 20, 21, 22, 30, 12, 99]
    assert out.answer_mask.nonzero().flatten().tolist() == [8]


def test_splice_appends_when_the_answer_cannot_be_parsed():
    out = splice_answer(
        [1, 2, 3],
        [10, 11, 99, 0, 0],
        None,
        [30, 31],
        answer_prefix_ids=[40, 41],
        answer_suffix_ids=[42, 99],
        strip_ids=(99, 0),
    )
    assert out.input_ids.tolist() == [1, 2, 3, 10, 11, 40, 41, 30, 31, 42, 99]
    assert out.answer_mask.nonzero().flatten().tolist() == [7, 8]
    assert not out.parsed and out.prompt_len == 3
    # nothing to strip, no marker
    out = splice_answer([1], [10], None, [30])
    assert out.input_ids.tolist() == [1, 10, 30] and out.answer_mask.tolist() == [False, False, True]


def test_splice_errors():
    with pytest.raises(
        ValueError, match=r"answer_span must satisfy 0 <= start <= end <= len\(response_ids\) = 3"
    ):
        splice_answer([1], [2, 3, 4], (2, 5), [9])
    with pytest.raises(ValueError, match="reference_ids must hold at least one token"):
        splice_answer([1], [2], (0, 1), [])
    with pytest.raises(TypeError, match="answer_span must be None or a"):
        splice_answer([1], [2], 3, [9])
    with pytest.raises(ValueError, match="response_ids must be a 1-D integer tensor"):
        splice_answer([1], torch.zeros(2, 2, dtype=torch.long), None, [9])


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_of_a_splice_from_fused_logprobs(backend):
    """splice -> fused log-probs of the shifted targets -> scoreB equals the materialised softmax's mean p."""
    g = torch.Generator().manual_seed(0)
    V, H = 23, 8
    emb = torch.randn(V, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    sp = splice_answer([1, 2, 3], [4, 5, 6, 7, 8], (2, 4), [9, 10, 11])
    hidden = torch.tanh(emb[sp.input_ids] + 0.1 * torch.arange(len(sp.input_ids))[:, None])  # a "model"
    lp = linear_logprobs(hidden[:-1], weight, sp.input_ids[1:], backend=backend).logprobs
    score = rlpr_score(lp[None], sp.answer_mask[1:][None])
    probs = torch.softmax(reference_logits(hidden.double(), weight.double()), -1)
    pos = sp.answer_mask.nonzero().flatten()  # token p is predicted at position p - 1
    want = probs[pos - 1, sp.input_ids[pos]].mean()
    assert score.item() == pytest.approx(want.item(), rel=1e-5)


REWARDS = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.2, 0.4, 0.6, 0.8])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
STD = [math.sqrt(1 / 3), 0.0, math.sqrt(0.2 / 3)]  # unbiased: 4 * 0.25 / 3 and (0.09+0.01+0.01+0.09) / 3


def test_group_stds_unbiased_and_interleaved_ids():
    stds, inverse = StdFilter.group_stds(REWARDS, GROUPS)
    torch.testing.assert_close(stds, torch.tensor(STD))
    perm = torch.tensor([3, 8, 0, 11, 4, 1, 9, 5, 2, 10, 6, 7])
    stds2, inverse2 = StdFilter.group_stds(REWARDS[perm], GROUPS[perm] * 7 + 5)
    torch.testing.assert_close(stds2, torch.tensor(STD))
    assert inverse2.tolist() == GROUPS[perm].tolist()
    with pytest.raises(ValueError, match="group_ids=1 has 1"):
        StdFilter.group_stds(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match=r"group_ids must be an integer \[N\]"):
        StdFilter.group_stds(REWARDS, GROUPS[:3])


def test_std_filter_keep_drop_and_ema_hand_computed():
    f = StdFilter(beta=0.5, ema=0.99)
    assert f.threshold == 0.0
    assert f.keep(REWARDS, GROUPS).all()  # no EMA yet: every prompt kept, even the zero-std group
    ema1 = sum(STD) / 3  # first step initialises the EMA with the step's mean std
    assert f.step() == pytest.approx(0.5 * ema1)
    assert f.ema_mean == pytest.approx(ema1)  # 0.278516...
    assert f.ema_mean == pytest.approx(0.2785164, rel=1e-6)

    keep = f.keep(REWARDS, GROUPS)  # threshold 0.139258: group 1 (std 0) dropped
    assert keep.tolist() == [True] * 4 + [False] * 4 + [True] * 4
    # refill within the same step: std 0.1414 >= 0.1393 kept, std 0.0707 dropped; the threshold does not move
    keep = f.keep(torch.tensor([0.0, 0.2, 0.0, 0.1]), torch.tensor([3, 3, 4, 4]))
    assert keep.tolist() == [True, True, False, False]
    assert f.threshold == pytest.approx(0.5 * ema1)
    mean2 = (sum(STD) + math.sqrt(0.02) + math.sqrt(0.005)) / 5  # every candidate counts, kept or not
    assert f.step() == pytest.approx(0.5 * (0.99 * ema1 + 0.01 * mean2))
    assert f.ema_mean == pytest.approx(0.2778266, rel=1e-6)
    assert f.steps == 2
    assert f.step() == pytest.approx(0.5 * f.ema_mean)  # a step with nothing recorded leaves the EMA alone
    assert f.ema_mean == pytest.approx(0.2778266, rel=1e-6)


def test_std_filter_state_round_trip_mid_step():
    a = StdFilter(beta=0.9, ema=0.95)
    a.keep(REWARDS, GROUPS)
    a.step()
    a.keep(REWARDS[:8], GROUPS[:8])  # pending stds
    b = StdFilter()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.state_dict() == a.state_dict()
    assert a.step() == b.step()
    assert torch.equal(a.keep(REWARDS, GROUPS), b.keep(REWARDS, GROUPS))
    with pytest.raises(KeyError, match="state is missing"):
        b.load_state_dict({"beta": 0.5})
    with pytest.raises(ValueError, match=r"ema must be in \[0, 1\)"):
        StdFilter(ema=1.0)
