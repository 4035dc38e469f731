"""linear_logprobs against a float64 reference: values and gradients, both backends, all options."""

import pytest
import torch
from _helpers import (
    BACKENDS,
    check_cce_rule,
    check_fp32,
    fused,
    ground_truth,
    make_inputs,
    naive,
    rel_err,
    run,
)
from hypothesis import given
from hypothesis import strategies as st

import fused_rlvr
from fused_rlvr import linear_entropy_moments, linear_logprobs
from fused_rlvr.linear_logprobs import LinearLogprobFunction
from fused_rlvr.reference import reference_logprobs

OPTIONS = [
    dict(),
    dict(bias=True),
    dict(temperature=0.7),
    dict(softcap=7.0),
    dict(bias=True, softcap=30.0, temperature=1.3, ignore_frac=0.3),
]


def _split(opts):
    make = {k: opts[k] for k in ("bias", "ignore_frac") if k in opts}
    call = {k: opts[k] for k in ("temperature", "softcap") if k in opts}
    return make, call


def _grads(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g), torch.randn(n, generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_fp32_matches_float64(backend, opts):
    make, call = _split(opts)
    h, w, y, b = make_inputs(37, 40, 203, torch.float32, seed=3, **make)
    g_lp, g_ent = _grads(37)
    out = run(fused, h, w, y, b, g_lp, g_ent, backend=backend, **call)
    ref = ground_truth(h, w, y, b, g_lp, g_ent, **call)
    check_fp32(out, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["logprobs", "entropy"])
def test_gradient_of_one_output(backend, which):
    h, w, y, b = make_inputs(29, 24, 77, torch.float32, seed=4, bias=True, ignore_frac=0.2)
    g_lp, g_ent = _grads(29)
    g_lp, g_ent = (g_lp, None) if which == "logprobs" else (None, g_ent)
    out = run(fused, h, w, y, b, g_lp, g_ent, backend=backend, temperature=0.9)
    ref = ground_truth(h, w, y, b, g_lp, g_ent, temperature=0.9)
    check_fp32(out, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opts", [dict(), dict(bias=True, softcap=20.0, temperature=0.8, ignore_frac=0.25)])
def test_low_precision_no_worse_than_naive(backend, dtype, opts):
    make, call = _split(opts)
    h, w, y, b = make_inputs(45, 64, 300, dtype, seed=5, **make)
    g_lp, g_ent = _grads(45)
    out = run(fused, h, w, y, b, g_lp, g_ent, backend=backend, **call)
    ref = ground_truth(h, w, y, b, g_lp, g_ent, **call)
    nv = naive(h, w, y, b, g_lp, g_ent, **call)
    # tolerance: one bf16 ulp at the largest magnitude; the Triton path stages the logit gradient in the
    # input dtype for the tensor-core GEMMs, one rounding more than the output rounding
    check_cce_rule(out, ref, nv, rel_tol=2**-7)


@given(
    n=st.integers(1, 40),
    h=st.integers(1, 48),
    v=st.integers(1, 150),
    bias=st.booleans(),
    softcap=st.one_of(st.none(), st.floats(2.0, 50.0)),
    temperature=st.floats(0.3, 2.0),
    ignore_frac=st.sampled_from([0.0, 0.3]),
    grads=st.sampled_from(["both", "logprobs", "entropy"]),
    backend=st.sampled_from(BACKENDS),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_fp32(n, h, v, bias, softcap, temperature, ignore_frac, grads, backend, seed):
    hid, w, y, b = make_inputs(n, h, v, torch.float32, seed=seed, bias=bias, ignore_frac=ignore_frac)
    g_lp, g_ent = _grads(n, seed + 1)
    g_lp = None if grads == "entropy" else g_lp
    g_ent = None if grads == "logprobs" else g_ent
    kw = dict(temperature=temperature, softcap=softcap)
    out = run(fused, hid, w, y, b, g_lp, g_ent, backend=backend, **kw)
    ref = ground_truth(hid, w, y, b, g_lp, g_ent, **kw)
    nv = naive(hid, w, y, b, g_lp, g_ent, **kw)
    # fp32: 1e-5 relative error; where the reference itself is near zero (a softmax of a single token,
    # ignored rows) fall back on the same-dtype rule so rounding noise of ~1e-7 is not judged relative to 0
    for name, o, r, naive_o in zip(("lp", "ent", "dh", "dw", "db"), out, ref, nv):
        if r.abs().max() > 1e-3:
            assert rel_err(o, r) < 1e-5, f"{name}: {rel_err(o, r):.2e}"
        else:
            check_cce_rule([o], [r], [naive_o], rel_tol=1e-6, names=(name,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["peaked", "negative", "huge"])
def test_extreme_logits(backend, case):
    """Peaked softmaxes, all logits far below zero, and logits near +-1e4, against the same-dtype rule."""
    kw = dict(peaked=case == "peaked", negative=case == "negative", scale=50.0 if case == "huge" else 1.0)
    h, w, y, b = make_inputs(33, 40, 97, torch.float32, seed=6, bias=case == "negative", **kw)
    if case == "huge":
        z = h @ w.T
        assert 2e3 < z.abs().max() < 2e4
    g_lp, g_ent = _grads(33)
    out = run(fused, h, w, y, b, g_lp, g_ent, backend=backend)
    ref = ground_truth(h, w, y, b, g_lp, g_ent)
    nv = naive(h, w, y, b, g_lp, g_ent)
    assert (out[0] <= 0).all()
    # atol 1e-9: entropies of ~1e-22 nats (peaked rows) are zero for every purpose
    check_cce_rule(out, ref, nv, rel_tol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_batch(backend):
    h, w, y, b = make_inputs(12, 16, 40, torch.float32, bias=True)
    y = torch.full_like(y, -100)
    lp, ent, dh, dw, db = run(fused, h, w, y, b, *_grads(12), backend=backend)
    for t in (lp, ent, dh, dw, db):
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_and_batch_dims(backend):
    h, w, y, b = make_inputs(24, 20, 50, torch.float32, seed=8, lead=(4, 6))
    y[0, :3] = 7  # the padding id is ignored, even though it is a valid vocabulary id
    g_lp, g_ent = torch.randn(4, 6), torch.randn(4, 6)
    out = run(fused, h, w, y, b, g_lp, g_ent, backend=backend, ignore_index=7)
    ref = ground_truth(h, w, y, b, g_lp, g_ent, ignore_index=7)
    assert out[0].shape == (4, 6) and out[1].shape == (4, 6)
    assert torch.equal(out[0][0, :3], torch.zeros(3)) and torch.equal(out[2][0, :3], torch.zeros(3, 20))
    check_fp32(out, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    h, w, y, _ = make_inputs(20, 18, 45, torch.float32, seed=9)
    h_strided = torch.cat([h, h], dim=1)[:, ::2]  # not contiguous
    w_strided = w.T.contiguous().T  # column-major
    g_lp, g_ent = _grads(20)
    out = run(fused, h_strided, w_strided, y, None, g_lp, g_ent, backend=backend)
    check_fp32(out, ground_truth(h_strided, w_strided, y, None, g_lp, g_ent))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_runs_forward_only(backend, monkeypatch):
    h, w, y, _ = make_inputs(10, 16, 30, torch.float32)
    h.requires_grad_()

    def forbidden(*a, **k):
        raise AssertionError("the autograd function (which saves tensors) ran under no_grad")

    monkeypatch.setattr(LinearLogprobFunction, "apply", forbidden)
    with torch.no_grad():
        lp, ent = linear_logprobs(h, w, y, backend=backend)
    assert lp.grad_fn is None and not lp.requires_grad
    ref_lp, ref_ent = reference_logprobs(h.detach().double(), w.double(), y)
    assert rel_err(lp, ref_lp) < 1e-5 and rel_err(ent, ref_ent) < 1e-5


def test_return_entropy_false():
    h, w, y, _ = make_inputs(10, 16, 30, torch.float32)
    stats = linear_logprobs(h, w, y, return_entropy=False)
    assert isinstance(stats, fused_rlvr.TokenStats) and stats.entropy is None
    assert stats.logprobs.dtype == torch.float32 and stats.logprobs.shape == (10,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_bf16(backend):
    h, w, y, b = make_inputs(30, 32, 130, torch.bfloat16, seed=10, bias=True, ignore_frac=0.2)
    lp, ent = linear_logprobs(h, w, y, bias=b, backend=backend, temperature=0.6)
    ref_lp, ref_ent = reference_logprobs(h.double(), w.double(), y, bias=b.double(), temperature=0.6)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    # fp32 statistics over bf16 inputs: the outputs are as accurate as fp32 logits allow
    assert rel_err(lp, ref_lp) < 1e-5 and rel_err(ent, ref_ent) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [dict(), dict(bias=True, softcap=10.0, temperature=0.8, ignore_frac=0.3)])
def test_entropy_moments(backend, opts):
    make, call = _split(opts)
    h, w, y, b = make_inputs(26, 24, 90, torch.float32, seed=11, **make)
    got = linear_entropy_moments(h, w, y, bias=b, backend=backend, **call)
    ref = reference_logprobs(
        h.double(), w.double(), y, bias=None if b is None else b.double(), moments=True, **call
    )
    for key, r in zip(("logprob", "entropy", "sum_p2", "sum_p2_logp"), ref):
        assert rel_err(got[key], r) < 1e-5, key
    # identities: sum p^2 in (0, 1]; sum p^2 log p <= 0
    valid = y != -100
    assert ((got["sum_p2"][valid] > 0) & (got["sum_p2"][valid] <= 1 + 1e-6)).all()
    assert (got["sum_p2_logp"] <= 1e-7).all()


def test_golden_values():
    """A tiny hand-checkable case: uniform logits give lp = -log V and entropy = log V."""
    v = 5
    h = torch.zeros(2, 3)
    w = torch.randn(v, 3)
    y = torch.tensor([1, 4])
    for backend in BACKENDS:
        lp, ent = linear_logprobs(h, w, y, backend=backend)
        expected = torch.full((2,), torch.log(torch.tensor(5.0)).item())
        torch.testing.assert_close(lp, -expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(ent, expected, rtol=0, atol=1e-6)
    # two-token vocabulary with logits (0, log 3): p = (1/4, 3/4)
    h = torch.tensor([[1.0]])
    w = torch.tensor([[0.0], [float(torch.log(torch.tensor(3.0)))]])
    for backend in BACKENDS:
        lp, ent = linear_logprobs(h, w, torch.tensor([0]), backend=backend)
        torch.testing.assert_close(lp, torch.log(torch.tensor([0.25])), rtol=0, atol=1e-6)
        h_ref = -(0.25 * torch.log(torch.tensor(0.25)) + 0.75 * torch.log(torch.tensor(0.75)))
        torch.testing.assert_close(ent, h_ref.reshape(1), rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_triton_matches_reference(dtype):
    h, w, y, b = make_inputs(1000, 512, 5003, dtype, seed=12, bias=True, ignore_frac=0.1)
    h, w, y, b = (t.cuda() for t in (h, w, y, b))
    g_lp, g_ent = (t.cuda() for t in _grads(1000))
    out = run(fused, h, w, y, b, g_lp, g_ent, backend="triton", softcap=30.0, temperature=0.9)
    ref = ground_truth(h, w, y, b, g_lp, g_ent, softcap=30.0, temperature=0.9)
    if dtype == torch.float32:
        check_fp32(out, ref)
    else:
        check_cce_rule(out, ref, naive(h, w, y, b, g_lp, g_ent, softcap=30.0, temperature=0.9), rel_tol=2**-7)


def test_backward_vocab_chunk_from_staging_budget(monkeypatch):
    from fused_rlvr.kernels import configs

    monkeypatch.setattr(configs, "BWD_VOCAB_CHUNK", 0)
    assert configs.bwd_vocab_chunk(8192) == 2048  # the measured target shape keeps its chunk
    assert configs.bwd_vocab_chunk(1024) == 16384  # small batches: fewer, larger GEMMs
    assert configs.bwd_vocab_chunk(3000) == 5376 and configs.bwd_vocab_chunk(3000) % 256 == 0
    assert configs.bwd_vocab_chunk(100_000) == 2048  # floor: staging grows with N past 8192 rows
    monkeypatch.setattr(configs, "BWD_VOCAB_CHUNK", 4096)
    assert configs.bwd_vocab_chunk(1024) == 4096  # FUSED_RLVR_BWD_VOCAB_CHUNK fixes the width
