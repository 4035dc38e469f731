"""Reliability regressions of the fused op: any memory layout of the inputs, autocast, -inf logits and
integer target dtypes give the answer of contiguous, autocast-free, in-range inputs (float64 ground truth)."""

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

from fused_rlvr import linear_entropy_moments, linear_logprobs
from fused_rlvr.reference import reference_logprobs


def _grads(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# ---- layouts ---------------------------------------------------------------------------------------------
N, H, V = 24, 20, 45


def _strided_targets(g):
    return torch.randint(0, V, (2 * N,), generator=g)[::2]


# name -> (shapes of the hidden / weight / bias buffers, view of each buffer the op receives, targets)
LAYOUTS = {
    "targets_step2": ((N, H), (V, H), (V,), None, None, None, lambda g: _strided_targets(g)),
    "targets_expanded": ((N, H), (V, H), (V,), None, None, None, lambda g: torch.tensor([5]).expand(N)),
    "targets_transposed": (
        (6, 4, H),
        (V, H),
        (V,),
        lambda t: t.transpose(0, 1),
        None,
        None,
        lambda g: torch.randint(0, V, (6, 4), generator=g).T,
    ),
    "hidden_odd_strides": ((N, 3 * H), (V, H), (V,), lambda t: t[:, ::3].flip(0), None, None, None),
    "hidden_transposed_batch": ((6, 4, H), (V, H), (V,), lambda t: t.transpose(0, 1), None, None, None),
    "hidden_expanded": ((1, 6, H), (V, H), (V,), lambda t: t.expand(4, 6, H), None, None, None),
    "weight_transposed": ((N, H), (H, V), (V,), None, lambda t: t.T, None, None),
    "weight_sliced": ((N, H), (2 * V, H + 5), (V,), None, lambda t: t[::2, 2 : 2 + H], None, None),
    "weight_expanded_columns": ((N, H), (V, 1), (V,), None, lambda t: t.expand(V, H), None, None),
    "bias_strided": ((N, H), (V, H), (2 * V,), None, None, lambda t: t[::2], None),
    "all_at_once": (
        (N, 3 * H),
        (H, V),
        (2 * V,),
        lambda t: t[:, ::3],
        lambda t: t.T,
        lambda t: t[::2],
        lambda g: _strided_targets(g),
    ),
}


def _run_layout(name, dtype, op, **kw):
    """Outputs and gradients (w.r.t. the buffers) of sum(g_lp lp + g_ent ent) for the views of `name`."""
    h_shape, w_shape, b_shape, h_view, w_view, b_view, make_y = LAYOUTS[name]
    g = torch.Generator().manual_seed(11)
    bufs = [torch.randn(s, generator=g, dtype=torch.float64) * 0.5 for s in (h_shape, w_shape, b_shape)]
    bufs = [t.to(dtype).requires_grad_() for t in bufs]
    same = lambda t: t  # noqa: E731
    hid, w, b = ((f or same)(t) for f, t in zip((h_view, w_view, b_view), bufs))
    if make_y is None:
        y = torch.randint(0, V, hid.shape[:-1], generator=g)
    else:
        y = make_y(g)
    g_lp, g_ent = _grads(y.shape)
    lp, ent = op(hid, w, y, bias=b, **kw)
    (lp.double() * g_lp.double() + ent.double() * g_ent.double()).sum().backward()
    return [lp.detach(), ent.detach()] + [t.grad for t in bufs]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("opts", [dict(), dict(softcap=5.0, temperature=0.8)], ids=["plain", "cap-temp"])
def test_any_layout_gives_the_contiguous_answer(backend, layout, opts):
    out = _run_layout(layout, torch.float32, linear_logprobs, backend=backend, **opts)
    ref = _run_layout(layout, torch.float64, reference_logprobs, **opts)
    check_fp32(out, ref)


# ---- autocast ----------------------------------------------------------------------------------------------


def _autocast_run(backend, dtype, device, *, backward_inside, **kw):
    h, w, y, b = make_inputs(21, 24, 70, dtype, seed=12, bias=True, ignore_frac=0.2)
    h, w, y, b = (t.to(device) for t in (h, w, y, b))
    g_lp, g_ent = (t.to(device) for t in _grads(21))
    leaves = [t.detach().clone().requires_grad_() for t in (h, w, b)]
    with torch.autocast(device, dtype=torch.bfloat16):
        lp, ent = linear_logprobs(leaves[0], leaves[1], y, bias=leaves[2], backend=backend, **kw)
        loss = (lp.double() * g_lp.double() + ent.double() * g_ent.double()).sum()
        if backward_inside:  # as Liger-Kernel's test_amp does
            loss.backward()
    if not backward_inside:
        loss.backward()
    out = [lp.detach(), ent.detach()] + [t.grad for t in leaves]
    return out, ground_truth(h, w, y, b, g_lp, g_ent, **kw), (h, w, y, b, g_lp, g_ent)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("backward_inside", [True, False], ids=["bwd-in-autocast", "bwd-outside"])
@pytest.mark.parametrize("opts", [dict(), dict(softcap=5.0, temperature=0.8)], ids=["plain", "cap-temp"])
def test_autocast_keeps_the_fp32_answer(backend, backward_inside, opts):
    """fp32 inputs under a bf16 autocast region: the op computes what it computes without autocast."""
    out, ref, _ = _autocast_run(backend, torch.float32, "cpu", backward_inside=backward_inside, **opts)
    for o in out:
        assert o.dtype == torch.float32
    check_fp32(out, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bf16_inputs_unchanged(backend):
    """bf16 inputs: the same values and gradients with and without an autocast region."""
    out, _, (h, w, y, b, g_lp, g_ent) = _autocast_run(backend, torch.bfloat16, "cpu", backward_inside=True)
    plain = run(fused, h, w, y, b, g_lp, g_ent, backend=backend)
    for o, p in zip(out, plain):
        assert o.dtype == p.dtype and torch.equal(o, p)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_autocast_cuda_keeps_the_fp32_answer(backend):
    out, ref, _ = _autocast_run(backend, torch.float32, "cuda", backward_inside=True, temperature=0.9)
    check_fp32(out, ref)


# ---- -inf logits (masked vocabulary entries) ---------------------------------------------------------------

NEG_INF = float("-inf")
MASK_OPTS = [dict(), dict(temperature=0.7), dict(softcap=4.0), dict(softcap=4.0, temperature=1.3)]
MASK_IDS = ["plain", "temp", "softcap", "softcap-temp"]


def _masked_problem(seed=13, n=19, h=16, v=70):
    """bias = -inf on a third of the vocabulary (a whole interpreter tile included); targets elsewhere."""
    hid, w, _, b = make_inputs(n, h, v, torch.float32, seed=seed, bias=True)
    masked = torch.zeros(v, dtype=torch.bool)
    masked[torch.randperm(v, generator=torch.Generator().manual_seed(seed))[: v // 3]] = True
    masked[32:64] = True  # one whole Triton tile (BLOCK_V = 32 under the interpreter) of -inf
    b = b.masked_fill(masked, NEG_INF)
    allowed = (~masked).nonzero().squeeze(1)
    y = allowed[torch.randint(0, len(allowed), (n,), generator=torch.Generator().manual_seed(seed + 1))]
    y[2] = -100
    return hid, w, y, b, masked


def _truth_ok(ref):
    for t in ref:
        assert torch.isfinite(t).all()  # the float64 reference handles -inf (0 log 0 = 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", MASK_OPTS, ids=MASK_IDS)
def test_minus_inf_bias_entries(backend, opts):
    hid, w, y, b, masked = _masked_problem()
    g_lp, g_ent = _grads(y.shape)
    out = run(fused, hid, w, y, b, g_lp, g_ent, backend=backend, **opts)
    ref = ground_truth(hid, w, y, b, g_lp, g_ent, **opts)
    _truth_ok(ref)
    check_fp32(out, ref)
    if "softcap" not in opts:  # softcap(-inf) = -cap is a finite logit with a zero derivative
        assert torch.equal(out[4][masked], torch.zeros(int(masked.sum())))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", MASK_OPTS, ids=MASK_IDS)
def test_minus_inf_moments(backend, opts):
    hid, w, y, b, _ = _masked_problem(seed=14)
    got = linear_entropy_moments(hid, w, y, bias=b, backend=backend, **opts)
    ref = reference_logprobs(hid.double(), w.double(), y, bias=b.double(), moments=True, **opts)
    for key, r in zip(("logprob", "entropy", "sum_p2", "sum_p2_logp"), ref):
        assert torch.isfinite(r).all() and torch.isfinite(got[key]).all(), key
        assert rel_err(got[key], r) < 1e-5, key


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_weight_row(backend):
    """A weight row that gives -inf logits: values and the (finite) weight / bias gradients."""
    hid, w, y, b = make_inputs(17, 12, 50, torch.float32, seed=15, bias=True)
    hid[:, 0] = hid[:, 0].abs() + 0.1
    w[7] = 0.0
    w[7, 0] = NEG_INF  # h . w_7 = -inf on every row
    y[y == 7] = 8
    g_lp, g_ent = _grads(17)
    out = run(fused, hid, w, y, b, g_lp, g_ent, backend=backend, temperature=0.8)
    ref = ground_truth(hid, w, y, b, g_lp, g_ent, temperature=0.8)
    # d_hidden = sum_v dz_v w_v holds 0 * (-inf) in plain torch too; compare the others
    keep = [0, 1, 3, 4]
    out, ref = [out[i] for i in keep], [ref[i] for i in keep]
    _truth_ok(ref)
    check_fp32(out, ref, names=("logprobs", "entropy", "d_weight", "d_bias"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [dict(), dict(temperature=0.7)], ids=["plain", "temp"])
def test_target_on_minus_inf_logit(backend, opts):
    """A target whose logit is -inf has log-prob -inf (as the reference); the rest stays exact."""
    hid, w, y, b, masked = _masked_problem(seed=16)
    y[5] = int(masked.nonzero()[0])
    g_lp, g_ent = _grads(y.shape)
    out = run(fused, hid, w, y, b, g_lp, g_ent, backend=backend, **opts)
    ref = ground_truth(hid, w, y, b, g_lp, g_ent, **opts)
    assert out[0][5] == NEG_INF and ref[0][5] == NEG_INF
    keep = torch.arange(len(y)) != 5
    check_fp32([out[0][keep]] + out[1:], [ref[0][keep]] + ref[1:])


@given(
    n=st.integers(1, 24),
    h=st.integers(1, 24),
    v=st.integers(2, 100),
    frac=st.floats(0.0, 0.95),
    softcap=st.one_of(st.none(), st.floats(2.0, 30.0)),
    temperature=st.floats(0.3, 2.0),
    backend=st.sampled_from(BACKENDS),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_masked_vocabulary(n, h, v, frac, softcap, temperature, backend, seed):
    hid, w, _, b = make_inputs(n, h, v, torch.float32, seed=seed, bias=True)
    g = torch.Generator().manual_seed(seed)
    masked = torch.rand(v, generator=g) < frac
    masked[int(torch.randint(0, v, (1,), generator=g))] = False  # one allowed entry at least
    b = b.masked_fill(masked, NEG_INF)
    allowed = (~masked).nonzero().squeeze(1)
    y = allowed[torch.randint(0, len(allowed), (n,), generator=g)]
    g_lp, g_ent = _grads(n, seed + 1)
    kw = dict(softcap=softcap, temperature=temperature)
    out = run(fused, hid, w, y, b, g_lp, g_ent, backend=backend, **kw)
    ref = ground_truth(hid, w, y, b, g_lp, g_ent, **kw)
    nv = naive(hid, w, y, b, g_lp, g_ent, **kw)
    _truth_ok(ref)
    # CCE's rule against plain fp32 torch on the same masked logits, plus fp32 rounding of the largest value
    # and of the O(1) intermediates (upstream gradients, hidden states: 1e-7) where a near-certain softmax
    # makes the outputs small (1 - p cancels in fp32 in both the fused and the plain computation)
    check_cce_rule(out, ref, nv, rel_tol=1e-5, atol=1e-7)


# ---- integer target dtypes ---------------------------------------------------------------------------------

DTYPE_CASES = [  # (dtype, V, ids): every id valid for V, some past what V wraps to in the target's dtype
    (torch.uint8, 300, [0, 43, 44, 200, 255]),
    (torch.int16, 40000, [0, 5, 32767, 20000]),
    (torch.int8, 130, [0, 2, 127, 64]),
    (torch.int32, 70, [0, 69, 33, 1]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, vocab, ids", DTYPE_CASES, ids=lambda x: str(x))
def test_target_dtypes_checked_in_int64(backend, dtype, vocab, ids):
    hid = torch.randn(len(ids), 8)
    w = torch.randn(vocab, 8) * 0.3
    y = torch.tensor(ids, dtype=dtype)
    lp, ent = linear_logprobs(hid, w, y, backend=backend)
    ref_lp, ref_ent = reference_logprobs(hid.double(), w.double(), y.long())
    assert rel_err(lp, ref_lp) < 1e-5 and rel_err(ent, ref_ent) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_outside_the_target_dtype(backend):
    """ignore_index=-100 with uint8 targets: no uint8 id equals -100, so 156 (-100 mod 256) is scored."""
    hid, w = torch.randn(3, 8), torch.randn(200, 8)
    y = torch.tensor([156, 3, 199], dtype=torch.uint8)
    lp, _ = linear_logprobs(hid, w, y, backend=backend)
    ref_lp, _ = reference_logprobs(hid.double(), w.double(), y.long())
    assert rel_err(lp, ref_lp) < 1e-5 and (lp != 0).all()
    y8 = torch.tensor([5, -100, 7], dtype=torch.int8)  # inside int8's range: ignored as usual
    lp8, _ = linear_logprobs(hid, w, y8, backend=backend)
    assert lp8[1] == 0 and rel_err(lp8, reference_logprobs(hid.double(), w.double(), y8.long())[0]) < 1e-5
    y_wide = torch.tensor([5, 6, 7], dtype=torch.int8)
    lp_wide, _ = linear_logprobs(hid, w, y_wide, ignore_index=1000, backend=backend)
    assert (lp_wide != 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int8])
@pytest.mark.parametrize("loss", ["grpo", "pacs"])
def test_losses_mask_small_integer_targets_in_int64(loss, dtype, backend):
    """A masked position of uint8 targets with V < 156 made the losses reject id 156 (-100 read as uint8);
    any integer dtype gives the int64 targets' loss and gradient."""
    from fused_rlvr import linear_grpo_loss, linear_pacs_loss

    g = torch.Generator().manual_seed(0)
    hid = torch.randn(2, 5, 8, generator=g)
    w = torch.randn(100, 8, generator=g) * 0.3
    y = torch.randint(0, 100, (2, 5), generator=g)
    mask = torch.ones(2, 5)
    mask[0, 3:] = 0
    old = torch.randn(2, 5, generator=g) * 0.1 - 4.0

    def run(targets):
        h = hid.clone().requires_grad_()
        if loss == "grpo":
            out, _ = linear_grpo_loss(
                h, w, targets, torch.tensor([1.0, -0.5]), mask, old_logprobs=old, backend=backend
            )
        else:
            out, _ = linear_pacs_loss(
                h,
                w,
                targets,
                torch.tensor([1.0, 0.0]),
                mask,
                torch.tensor([0, 0]),
                old_logprobs=old,
                backend=backend,
            )
        out.backward()
        return out.detach(), h.grad

    want, want_grad = run(y)
    got, got_grad = run(y.to(dtype))
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)


@pytest.mark.parametrize(
    "dtype, vocab, bad", [(torch.uint8, 200, 250), (torch.int16, 100, 30000), (torch.int8, 50, -3)]
)
def test_out_of_range_targets_rejected_whatever_the_dtype(dtype, vocab, bad):
    hid, w = torch.randn(3, 8), torch.randn(vocab, 8)
    y = torch.tensor([1, bad, 2], dtype=dtype)
    with pytest.raises(ValueError, match=rf"targets must lie in \[0, {vocab}\).*targets\[1\] = {bad}"):
        linear_logprobs(hid, w, y, backend="torch")
