"""VERL effective rank, its velocity / acceleration, and the advantage shaper."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fused_rlvr.effective_rank as er_mod
from fused_rlvr.effective_rank import EffectiveRankShaper, effective_rank, erv_era, erv_era_batch


def numpy_effective_rank(x):
    x = np.asarray(x, dtype=np.float64)
    s = np.linalg.svd(x - x.mean(axis=0, keepdims=True), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


@given(st.integers(2, 40), st.integers(1, 24), st.integers(0, 2**31 - 1), st.floats(0.01, 100.0))
def test_effective_rank_matches_numpy_svd(t, d, seed, scale):
    h = np.random.default_rng(seed).standard_normal((t, d)) * scale
    want = numpy_effective_rank(h)
    assert effective_rank(torch.from_numpy(h), dtype=torch.float64) == pytest.approx(want, rel=1e-10)
    assert effective_rank(torch.from_numpy(h).float()) == pytest.approx(want, rel=1e-4)
    assert 1.0 - 1e-9 <= want <= min(t - 1, d) + 1e-9


def test_effective_rank_uses_the_last_max_tokens():
    h = torch.randn(30, 6, dtype=torch.float64)
    assert effective_rank(h, max_tokens=8, dtype=torch.float64) == pytest.approx(numpy_effective_rank(h[-8:]))
    assert effective_rank(h, max_tokens=None, dtype=torch.float64) == pytest.approx(numpy_effective_rank(h))
    assert effective_rank(h, dtype=torch.float64) == pytest.approx(numpy_effective_rank(h))  # 30 < 512
    long = torch.randn(600, 4, dtype=torch.float64)
    assert effective_rank(long, dtype=torch.float64) == pytest.approx(numpy_effective_rank(long[-512:]))


def test_effective_rank_rank_one_and_isotropic():
    g = torch.Generator().manual_seed(1)
    u, v = (
        torch.randn(20, 1, generator=g, dtype=torch.float64),
        torch.randn(1, 16, generator=g, dtype=torch.float64),
    )
    offset = torch.randn(1, 16, generator=g, dtype=torch.float64)
    assert effective_rank(u * v + offset, dtype=torch.float64) == pytest.approx(1.0, abs=1e-9)
    # rows +-3 e_i: centred already, four equal singular values
    e = torch.eye(4, dtype=torch.float64) * 3
    iso = torch.cat([e, -e])
    assert effective_rank(iso, dtype=torch.float64) == pytest.approx(4.0, abs=1e-12)
    # the same spread embedded in 10 dims and rotated: still 4
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    assert effective_rank(
        torch.cat([iso, torch.zeros(8, 6, dtype=torch.float64)], 1) @ q, dtype=torch.float64
    ) == pytest.approx(4.0, abs=1e-9)
    # singular values (2, 1): p = (2/3, 1/3)
    two = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    want = math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    assert effective_rank(two, dtype=torch.float64) == pytest.approx(want, rel=1e-12)


def test_effective_rank_degenerate_and_errors():
    assert effective_rank(torch.randn(1, 5)) == 0.0
    assert effective_rank(torch.ones(7, 5)) == 0.0
    with pytest.raises(ValueError, match=r"h must be \[T, d\]"):
        effective_rank(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="max_tokens must be a positive int or None"):
        effective_rank(torch.randn(4, 3), max_tokens=0)
    with pytest.raises(TypeError, match="h must be a floating-point tensor"):
        effective_rank(torch.ones(4, 3, dtype=torch.long))


def test_erv_era_hand_checked_with_known_prefix_ranks(monkeypatch):
    """ER of the prefixes fixed by length: the aggregation is checked against hand arithmetic."""
    table = {41: 2.0, 81: 3.0, 121: 5.0, 161: 4.0, 170: 7.0}
    seen = []

    def fake_rank(x, dtype):
        seen.append(x.shape[0])
        return table[x.shape[0]]

    monkeypatch.setattr(er_mod, "_rank_of", fake_rank)
    out = erv_era(torch.zeros(170, 3))
    # prefixes of t + 1 tokens for t = 40, 80, 120, 160 (< 170); ER of the whole response first
    assert seen == [170, 41, 81, 121, 161]
    # ERV_1 = 3 - 2 = 1; ERV_2 = 5 - (2+3)/2 = 2.5; ERV_3 = 4 - (2+3+5)/3 = 2/3
    erv = (1 + 2.5 + 2 / 3) / 3
    # ERA_2 = 2.5 - 1 = 1.5; ERA_3 = 2/3 - 2.5
    era = (1.5 + (2 / 3 - 2.5)) / 2
    assert out.er == 7.0
    assert out.erv == pytest.approx(erv) and out.erv == pytest.approx(1.3888888888888888)
    assert out.era == pytest.approx(era) and out.era == pytest.approx(-1 / 6)

    # a 600-token response: velocities on the last 512 tokens, ER on all (or on er_max_tokens)
    seen.clear()
    table.update({600: 1.0, 300: 1.5})
    table.update({t + 1: float(t) for t in range(200, 512, 40)})
    erv_era(torch.zeros(600, 3))
    assert seen == [600] + [t + 1 for t in range(40, 512, 40)]
    seen.clear()
    erv_era(torch.zeros(600, 3), er_max_tokens=300)
    assert seen[0] == 300


def test_erv_era_token_thresholds(monkeypatch):
    monkeypatch.setattr(er_mod, "_rank_of", lambda x, dtype: float(x.shape[0]))
    assert erv_era(torch.zeros(79, 2)) == (79.0, 0.0, 0.0)  # < min_tokens: no velocities
    assert erv_era(torch.zeros(80, 2)) == (80.0, 0.0, 0.0)  # one prefix (41 tokens) only
    assert erv_era(torch.zeros(81, 2)) == (81.0, 40.0, 0.0)  # prefixes 41, 81: ERV_1 = 40, no ERA
    # prefixes 41, 81, 121: ERV = (40, 121 - 61 = 60), ERA = 20
    assert erv_era(torch.zeros(121, 2)) == (121.0, 50.0, 20.0)
    # stride / min_tokens are parameters
    assert erv_era(torch.zeros(9, 2), stride=2, min_tokens=4) == pytest.approx(
        (9.0, np.mean([5 - 3, 7 - 4, 9 - 5]), np.mean([1, 1]))
    )


def test_erv_era_on_real_states_matches_the_formula():
    h = torch.randn(130, 12, dtype=torch.float64)
    ranks = [numpy_effective_rank(h[: t + 1]) for t in (40, 80, 120)]
    v1 = ranks[1] - ranks[0]
    v2 = ranks[2] - (ranks[0] + ranks[1]) / 2
    out = erv_era(h, dtype=torch.float64)
    assert out.er == pytest.approx(numpy_effective_rank(h))
    assert out.erv == pytest.approx((v1 + v2) / 2, rel=1e-9)
    assert out.era == pytest.approx(v2 - v1, rel=1e-9)


def test_erv_era_batch_uses_each_rows_valid_tokens():
    h = torch.randn(3, 140, 6, dtype=torch.float64)
    mask = torch.zeros(3, 140, dtype=torch.bool)
    mask[0, :] = True
    mask[1, 10:100] = True
    mask[2, :50] = True
    er, erv, era = erv_era_batch(h, mask, dtype=torch.float64)
    for i in range(3):
        want = erv_era(h[i][mask[i]], dtype=torch.float64)
        assert (er[i].item(), erv[i].item(), era[i].item()) == pytest.approx(tuple(want), rel=1e-6)
    assert er.dtype == torch.float32 and erv[2] == 0 and era[1] == 0 and erv[1] != 0


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_shaper_ema_schedule_hand_computed():
    sh = EffectiveRankShaper(schedule="ema")
    adv = torch.tensor([1.0, -0.5, 0.2])
    er = torch.tensor([2.0, 4.0, 3.0])  # mean 3
    erv = torch.tensor([0.5, -0.5, 0.3])  # mean 0.1
    era = torch.tensor([0.5, 1.5, 1.0])  # mean 1
    out, stats = sh(adv, er, erv, era)
    # first call: mu initialised to the batch means (3, 0.1, 1), then d against it
    d_er = [-1 / 3, 1 / 3, 0.0]
    d_erv = [min((0.5 - 0.1) / 0.1, 5), max((-0.5 - 0.1) / 0.1, -5), (0.3 - 0.1) / 0.1]  # 4, -5 (clamped), 2
    d_era = [-0.5, 0.5, 0.0]
    tau = [_sig(2 * d) for d in d_era]
    aux = [t * math.tanh(a) + (1 - t) * math.tanh(b) for t, a, b in zip(tau, d_er, d_erv)]
    want = [a + min(max(x, 0.0), abs(a) / 2) for a, x in zip(adv.tolist(), aux)]
    assert stats.shaped
    np.testing.assert_allclose(stats.d_erv.numpy(), d_erv, rtol=1e-5)
    np.testing.assert_allclose(stats.aux.numpy(), aux, rtol=1e-5)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-6)
    assert aux[1] < 0 and out[1] == adv[1]  # negative aux: no bonus
    assert out[0] == pytest.approx(1.0 + min(aux[0], 0.5))
    assert sh.mu == pytest.approx([3.0, 0.1, 1.0])  # 0.7 mu + 0.3 mean with mu = mean

    # second call compares against mu before its update, then folds its own means in
    er2, erv2, era2 = (
        torch.tensor([6.0, 0.0, 3.0]),
        torch.tensor([0.1, 0.1, 0.1]),
        torch.tensor([1.0, 3.0, 2.0]),
    )
    out2, stats2 = sh(adv, er2, erv2, era2)
    np.testing.assert_allclose(stats2.d_er.numpy(), [1.0, -1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(stats2.d_era.numpy(), [0.0, 2.0, 1.0], atol=1e-6)
    assert sh.mu == pytest.approx([0.7 * 3 + 0.3 * 3, 0.1, 0.7 * 1 + 0.3 * 2])
    aux0 = 0.5 * math.tanh(1.0) + 0.5 * math.tanh(0.0)
    assert out2[0].item() == pytest.approx(1.0 + min(aux0, 0.5), rel=1e-6)


def test_shaper_authors_schedule_lags_one_call():
    sh = EffectiveRankShaper()  # schedule="authors"
    adv = torch.tensor([1.0, -1.0])
    b1 = [torch.tensor([2.0, 4.0]), torch.tensor([1.0, -1.0]), torch.tensor([0.0, 2.0])]  # means 3, 0, 1
    b2 = [torch.tensor([3.0, 3.0]), torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0])]  # means 3, 2, 1
    b3 = [torch.tensor([0.9, 1.8]), torch.tensor([0.0, 0.0]), torch.tensor([0.3, 0.3])]
    out1, s1 = sh(adv, *b1)  # first call: no baseline, A unchanged
    assert not s1.shaped and torch.equal(out1, adv) and float(s1.aux.abs().max()) == 0.0
    assert sh.mu == [0.0, 0.0, 0.0] and sh.pending == [3.0, 0.0, 1.0]
    out2, s2 = sh(adv, *b2)  # against mu = 0: every d saturates at +-5
    assert s2.shaped
    np.testing.assert_array_equal(s2.d_er.numpy(), [5.0, 5.0])
    aux = _sig(10) * math.tanh(5) + (1 - _sig(10)) * math.tanh(5)
    np.testing.assert_allclose(out2.numpy(), [1.0 + min(aux, 0.5), -1.0 + min(aux, 0.5)], rtol=1e-6)
    # then mu folds in the PREVIOUS call's means: 0.7 * 0 + 0.3 * (3, 0, 1)
    assert sh.mu == pytest.approx([0.9, 0.0, 0.3]) and sh.pending == [3.0, 2.0, 1.0]
    _, s3 = sh(adv, *b3)
    np.testing.assert_allclose(s3.d_er.numpy(), [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(s3.d_era.numpy(), [0.0, 0.0], atol=1e-6)
    assert sh.mu == pytest.approx([0.7 * 0.9 + 0.3 * 3, 0.3 * 2, 0.7 * 0.3 + 0.3 * 1])


def test_shaper_per_token_advantages_cap_elementwise():
    sh = EffectiveRankShaper(schedule="ema")
    adv = torch.tensor([[1.0, 1.0, 0.0], [0.4, 0.4, 0.4]])
    out, st_ = sh(adv, torch.tensor([4.0, 2.0]), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]))
    # row 0: d_er = 1/3, d_erv = 0, d_era = 0 -> aux = 0.5 tanh(1/3) > 0; row 1: aux < 0
    a0 = 0.5 * math.tanh(1 / 3)
    np.testing.assert_allclose(out[0].numpy(), [1 + a0, 1 + a0, 0.0], rtol=1e-6)
    assert torch.equal(out[1], adv[1])


def test_shaper_state_round_trip():
    g = torch.Generator().manual_seed(3)
    batches = [
        (
            torch.randn(4, generator=g),
            torch.rand(4, generator=g) * 5,
            torch.randn(4, generator=g),
            torch.randn(4, generator=g),
        )
        for _ in range(4)
    ]
    for schedule in ("authors", "ema"):
        a = EffectiveRankShaper(schedule=schedule, momentum=0.6, gain=1.5)
        for batch in batches[:2]:
            a(*batch)
        state = json.loads(json.dumps(a.state_dict()))
        b = EffectiveRankShaper()
        b.load_state_dict(state)
        assert b.state_dict() == a.state_dict()
        for batch in batches[2:]:
            out_a, _ = a(*batch)
            out_b, _ = b(*batch)
            assert torch.equal(out_a, out_b)
        assert a.mu == b.mu and b.calls == 4


def test_shaper_errors():
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        EffectiveRankShaper(momentum=1.0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        EffectiveRankShaper(schedule="paper")
    sh = EffectiveRankShaper()
    with pytest.raises(ValueError, match=r"erv must be \[B\] = \(2,\)"):
        sh(torch.zeros(2), torch.zeros(2), torch.zeros(3), torch.zeros(2))
    with pytest.raises(KeyError, match="state is missing"):
        sh.load_state_dict({"mu": [0, 0, 0]})
    bad = sh.state_dict() | {"mu": [1.0, 2.0]}
    with pytest.raises(ValueError, match=r"state\['mu'\] must be None or 3 numbers"):
        sh.load_state_dict(bad)
