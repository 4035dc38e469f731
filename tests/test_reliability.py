"""Reliability regressions of the fused op: any memory layout of the inputs, autocast, -inf logits and
integer target dtypes give the answer of contiguous, autocast-free, in-range inputs (float64 ground truth)."""

import pytest
import torch
from _helpers import BACKENDS, check_fp32, fused, ground_truth, make_inputs, run

from fused_rlvr import linear_logprobs
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
