"""Per-token temperature: `temperature` a tensor shaped like targets, against float64 logits materialised
with one divisor per row (fused_rlvr.reference), values and gradients, both backends."""

import pytest
import torch
from _helpers import (
    BACKENDS,
    check_cce_rule,
    check_fp32,
    fused,
    ground_truth,
    loss_and_grads,
    make_inputs,
    naive,
    rel_err,
    run,
)
from hypothesis import given
from hypothesis import strategies as st

import fused_rlvr
from fused_rlvr import linear_entropy_moments, linear_logprobs
from fused_rlvr.reference import reference_logprobs


def _temps(shape, seed=3, lo=0.3, hi=2.0):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def _grads(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_reference_divides_each_row():
    """The float64 reference itself: row i equals the float-temperature reference at T_i."""
    h, w, y, b = make_inputs(6, 8, 20, torch.float64, seed=1, bias=True)
    t = _temps(6).double()
    lp, ent = reference_logprobs(h, w, y, bias=b, temperature=t)
    for i in range(6):
        lp_i, ent_i = reference_logprobs(h[i : i + 1], w, y[i : i + 1], bias=b, temperature=float(t[i]))
        torch.testing.assert_close(lp[i : i + 1], lp_i, rtol=0, atol=1e-12)
        torch.testing.assert_close(ent[i : i + 1], ent_i, rtol=0, atol=1e-12)


OPTIONS = [
    dict(),
    dict(bias=True),
    dict(softcap=6.0),
    dict(bias=True, softcap=20.0, ignore_frac=0.3),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_fp32_matches_float64(backend, opts):
    make = {k: opts[k] for k in ("bias", "ignore_frac") if k in opts}
    call = {k: opts[k] for k in ("softcap",) if k in opts}
    h, w, y, b = make_inputs(37, 40, 203, torch.float32, seed=3, lead=(37,), **make)
    t = _temps(37)
    t[y == -100] = float("nan")  # ignored tokens may hold anything
    g_lp, g_ent = _grads(37)
    out = run(fused, h, w, y, b, g_lp, g_ent, backend=backend, temperature=t, **call)
    ref = ground_truth(h, w, y, b, g_lp, g_ent, temperature=t.double(), **call)
    check_fp32(out, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_dims_and_strided_temperature(backend):
    h, w, y, b = make_inputs(24, 20, 50, torch.float32, seed=8, bias=True, ignore_frac=0.2, lead=(4, 6))
    g_lp, g_ent = _grads((4, 6))
    transposed = _temps((6, 4)).T  # a transposed view shaped like targets
    expanded = _temps((1, 6)).expand(4, 6)  # stride 0 over the batch
    for t in (transposed, expanded):
        out = run(fused, h, w, y, b, g_lp, g_ent, backend=backend, temperature=t, softcap=5.0)
        ref = ground_truth(h, w, y, b, g_lp, g_ent, temperature=t.contiguous().double(), softcap=5.0)
        check_fp32(out, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_naive(backend, dtype):
    h, w, y, b = make_inputs(45, 64, 300, dtype, seed=5, bias=True, ignore_frac=0.25)
    t = _temps(45, seed=6)
    g_lp, g_ent = _grads(45)
    kw = dict(temperature=t, softcap=20.0)
    out = run(fused, h, w, y, b, g_lp, g_ent, backend=backend, **kw)
    ref = ground_truth(h, w, y, b, g_lp, g_ent, **dict(kw, temperature=t.double()))
    nv = naive(h, w, y, b, g_lp, g_ent, **dict(kw, temperature=t.to(dtype)))
    check_cce_rule(out, ref, nv, rel_tol=2**-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_tensor_equals_the_float(backend):
    """A tensor holding one value everywhere gives the float temperature's answer (T = 0.5: 1/T exact)."""
    h, w, y, b = make_inputs(30, 24, 90, torch.float32, seed=9, bias=True, ignore_frac=0.2)
    g_lp, g_ent = _grads(30)
    per_token = run(fused, h, w, y, b, g_lp, g_ent, backend=backend, temperature=torch.full((30,), 0.5))
    scalar = run(fused, h, w, y, b, g_lp, g_ent, backend=backend, temperature=0.5)
    for a, s in zip(per_token, scalar):
        if backend == "triton":  # the same kernel arithmetic: 1/T scales the fp32 tile in both
            assert torch.equal(a, s)
        else:  # the float path folds 1/T into the operands, the per-token one scales the logits
            torch.testing.assert_close(a, s, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moments(backend):
    h, w, y, b = make_inputs(26, 24, 90, torch.float32, seed=11, bias=True, ignore_frac=0.3)
    t = _temps(26, seed=12)
    got = linear_entropy_moments(h, w, y, bias=b, backend=backend, temperature=t, softcap=10.0)
    ref = reference_logprobs(
        h.double(), w.double(), y, bias=b.double(), moments=True, temperature=t.double(), softcap=10.0
    )
    for key, r in zip(("logprob", "entropy", "sum_p2", "sum_p2_logp"), ref):
        torch.testing.assert_close(got[key].double(), r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_to_the_temperature_and_no_grad_path(backend):
    h, w, y, _ = make_inputs(10, 16, 30, torch.float32)
    t = _temps(10).requires_grad_()
    hh = h.clone().requires_grad_()
    lp, ent = linear_logprobs(hh, w, y, temperature=t, backend=backend)
    (lp.sum() + ent.sum()).backward()
    assert t.grad is None and hh.grad is not None
    with torch.no_grad():
        lp2, ent2 = linear_logprobs(h, w, y, temperature=t, backend=backend)
    assert torch.equal(lp2, lp.detach()) and torch.equal(ent2, ent.detach())


@given(
    lead=st.sampled_from([(1,), (7,), (3, 5), (2, 2, 4)]),
    h=st.integers(1, 40),
    v=st.integers(1, 120),
    bias=st.booleans(),
    softcap=st.one_of(st.none(), st.floats(2.0, 50.0)),
    t_range=st.sampled_from([(0.2, 0.4), (0.5, 2.0), (1.0, 1.0), (3.0, 8.0)]),
    ignore_frac=st.sampled_from([0.0, 0.4]),
    grads=st.sampled_from(["both", "logprobs", "entropy"]),
    backend=st.sampled_from(BACKENDS),
    seed=st.integers(0, 2**16),
)
def test_hypothesis(lead, h, v, bias, softcap, t_range, ignore_frac, grads, backend, seed):
    n = 1
    for d in lead:
        n *= d
    hid, w, y, b = make_inputs(
        n, h, v, torch.float32, seed=seed, bias=bias, ignore_frac=ignore_frac, lead=lead
    )
    t = _temps(lead, seed=seed + 2, lo=t_range[0], hi=t_range[1])
    t = torch.where(y == -100, -1.0, t)  # ignored tokens: any value
    g_lp, g_ent = _grads(lead, seed + 1)
    g_lp = None if grads == "entropy" else g_lp
    g_ent = None if grads == "logprobs" else g_ent
    out = run(fused, hid, w, y, b, g_lp, g_ent, backend=backend, temperature=t, softcap=softcap)
    ref = ground_truth(hid, w, y, b, g_lp, g_ent, temperature=t.double(), softcap=softcap)
    nv = naive(hid, w, y, b, g_lp, g_ent, temperature=t, softcap=softcap)
    # CCE's rule against plain fp32 torch with the same per-row divisor; fp32 rounding of the largest value
    # and of the O(1) intermediates where a near-certain softmax makes the outputs small
    check_cce_rule(out, ref, nv, rel_tol=1e-5, atol=1e-7)


VALIDATION = [
    (
        lambda y: torch.rand(y.shape[0] + 1) + 0.5,
        ValueError,
        r"temperature must be a finite positive number or a",
    ),
    (
        lambda y: torch.ones(y.shape, dtype=torch.long),
        TypeError,
        r"temperature must be a floating-point tensor",
    ),
    (lambda y: torch.where(torch.arange(len(y)) == 3, 0.0, 1.0), ValueError, r"temperature\[3\] = 0.0"),
    (lambda y: torch.where(torch.arange(len(y)) == 2, -1.0, 1.0), ValueError, r"finite and > 0 on every"),
    (
        lambda y: torch.where(torch.arange(len(y)) == 1, float("inf"), 1.0),
        ValueError,
        r"temperature\[1\] = inf",
    ),
]


@pytest.mark.parametrize("make_t, exc, pattern", VALIDATION)
def test_validation_names_temperature(make_t, exc, pattern):
    h, w, y, _ = make_inputs(8, 12, 20, torch.float32)
    with pytest.raises(exc, match=pattern):
        linear_logprobs(h, w, y, temperature=make_t(y), backend="torch")
    with pytest.raises(exc, match=pattern):
        linear_entropy_moments(h, w, y, temperature=make_t(y), backend="torch")


def test_ignored_tokens_may_hold_anything():
    h, w, y, _ = make_inputs(8, 12, 20, torch.float32)
    y[[1, 4]] = -100
    t = torch.ones(8)
    t[1], t[4] = float("nan"), -3.0
    lp, ent = linear_logprobs(h, w, y, temperature=t, backend="torch")
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and lp[1] == 0 and lp[4] == 0


def test_value_check_follows_the_target_check():
    h, w, y, _ = make_inputs(8, 12, 20, torch.float32)
    t = torch.ones(8)
    t[0] = 0.0
    fused_rlvr.set_target_check(False)
    try:
        linear_logprobs(h, w, y, temperature=t, backend="torch")  # unchecked: no sync, no error
    finally:
        fused_rlvr.set_target_check(True)
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(h, w, y, temperature=t, backend="torch")


# ---- through the losses, DPO, the modules and verl's entry point ------------------------------------------


def _loss_batch(seed=0, b=4, t=9, h=16, v=37):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g) * 0.6
    weight = torch.randn(v, h, generator=g) * 0.6
    bias = torch.randn(v, generator=g) * 0.3
    targets = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[:, 0] = True
    temp = 0.4 + 1.2 * torch.rand(b, t, generator=g)
    temp[~mask] = 0.0  # masked tokens: any value
    with torch.no_grad():  # old / reference policies near the current one, so that some ratios clip
        y = torch.where(mask, targets, -100)
        lp0 = reference_logprobs(hidden.double(), weight.double(), y, temperature=temp.double()).logprobs
    old = (lp0 + 0.4 * torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    ref = (lp0 + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(b, generator=g)
    return hidden, weight, bias, targets, mask, temp, old, ref, adv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["function", "module"])
def test_grpo_loss(backend, kind):
    from _loss_reference import ref_grpo_loss, ref_token_stats

    hidden, weight, bias, targets, mask, temp, old, ref, adv = _loss_batch(1)
    kw = dict(beta=0.05, kl="k3", entropy_coef=0.01, eps_high=0.28)

    def ours(h, w, b):
        if kind == "module":
            module = fused_rlvr.LinearGRPOLoss(backend=backend, softcap=5.0, temperature=0.3, **kw)
            out = module(
                h, w, targets, adv, mask, old_logprobs=old, ref_logprobs=ref, bias=b, temperature=temp
            )
        else:
            out = fused_rlvr.linear_grpo_loss(
                h,
                w,
                targets,
                adv,
                mask,
                old_logprobs=old,
                ref_logprobs=ref,
                bias=b,
                softcap=5.0,
                temperature=temp,
                backend=backend,
                **kw,
            )
        return out[0]

    def reference(h, w, b):
        lp, ent = ref_token_stats(h, w, targets, mask, bias=b, softcap=5.0, temperature=temp.double())
        return ref_grpo_loss(lp, ent, adv.double(), mask, old.double(), ref.double(), **kw)

    loss, grads = loss_and_grads(ours, hidden, weight, bias)
    want, want_grads = loss_and_grads(reference, hidden.double(), weight.double(), bias.double())
    assert abs(loss.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))
    for got, w in zip(grads, want_grads):
        assert rel_err(got, w) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["function", "module"])
def test_pacs_loss(backend, kind):
    from _loss_reference import ref_pacs_loss, ref_token_stats

    hidden, weight, bias, targets, mask, temp, old, _, _ = _loss_batch(2)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1])

    def ours(h, w):
        if kind == "module":
            module = fused_rlvr.LinearPACSLoss(beta=1.5, backend=backend)
            return module(h, w, targets, rewards, mask, groups, old_logprobs=old, temperature=temp)[0]
        return fused_rlvr.linear_pacs_loss(
            h,
            w,
            targets,
            rewards,
            mask,
            groups,
            old_logprobs=old,
            beta=1.5,
            temperature=temp,
            backend=backend,
        )[0]

    def reference(h, w):
        lp, _ = ref_token_stats(h, w, targets, mask, temperature=temp.double())
        return ref_pacs_loss(lp, old.double(), rewards, mask, groups, beta=1.5)

    loss, grads = loss_and_grads(ours, hidden, weight)
    want, want_grads = loss_and_grads(reference, hidden.double(), weight.double())
    assert abs(loss.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))
    for got, w in zip(grads, want_grads):
        assert rel_err(got, w) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpo(backend):
    from fused_rlvr.dpo import linear_dpo_loss, sequence_logprobs

    hidden, weight, bias, targets, mask, temp, _, _, _ = _loss_batch(3)
    ref_seq = torch.randn(4) - 8

    def seq_ref(h, w, b):
        y = torch.where(mask, targets, -100)
        lp = reference_logprobs(h, w, y, bias=b, temperature=temp.double()).logprobs
        return (lp * mask).sum(1)

    got = sequence_logprobs(hidden, weight, targets, mask, bias=bias, temperature=temp, backend=backend)
    want = seq_ref(hidden.double(), weight.double(), bias.double())
    assert rel_err(got, want) < 1e-6

    def ours(h, w):
        return linear_dpo_loss(h, w, targets, mask, ref_seq, beta=0.3, temperature=temp, backend=backend)[0]

    def reference(h, w):
        s = seq_ref(h, w, None)
        z = 0.3 * ((s[:2] - ref_seq[:2].double()) - (s[2:] - ref_seq[2:].double()))
        return -torch.nn.functional.logsigmoid(z).mean()

    loss, grads = loss_and_grads(ours, hidden, weight)
    want_loss, want_grads = loss_and_grads(reference, hidden.double(), weight.double())
    assert abs(loss.item() - want_loss.item()) < 1e-6
    for got_g, want_g in zip(grads, want_grads):
        assert rel_err(got_g, want_g) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_verl_entry_points(backend):
    from fused_rlvr.integrations.verl import FusedLinearForPPO, linear_logprobs_entropy

    hidden, weight, _, targets, _, temp, _, _, _ = _loss_batch(4)
    temp = temp.clamp_min(0.5)
    logits = (hidden.double() @ weight.double().T) / temp.double()[..., None]  # verl's math, per-row divisor
    want_lp = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    want_ent = logits.logsumexp(-1) - (logits.softmax(-1) * logits).sum(-1)
    for lp, ent in (
        linear_logprobs_entropy(hidden, weight, targets, temp, backend=backend),
        FusedLinearForPPO(backend=backend)(hidden, weight, targets, temp),
    ):
        assert rel_err(lp, want_lp) < 1e-6 and rel_err(ent, want_ent) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_compiled_kernels(dtype):
    h, w, y, b = make_inputs(1000, 512, 5003, dtype, seed=12, bias=True, ignore_frac=0.1)
    t = _temps(1000, seed=13)
    h, w, y, b, t = (x.cuda() for x in (h, w, y, b, t))
    g_lp, g_ent = (x.cuda() for x in _grads(1000))
    out = run(fused, h, w, y, b, g_lp, g_ent, backend="triton", softcap=30.0, temperature=t)
    ref = ground_truth(h, w, y, b, g_lp, g_ent, softcap=30.0, temperature=t.double())
    if dtype == torch.float32:
        check_fp32(out, ref)
    else:
        check_cce_rule(out, ref, naive(h, w, y, b, g_lp, g_ent, softcap=30.0, temperature=t), rel_tol=2**-7)
