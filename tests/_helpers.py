"""Shared test utilities: input builders and the error rules of the tests (CCE's elementwise rule, relative error)."""

from __future__ import annotations

import importlib.util

import torch

from fused_rlvr import linear_logprobs
from fused_rlvr.reference import reference_logprobs

BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") else [])


def make_inputs(
    n, h, v, dtype, *, seed=0, bias=False, ignore_frac=0.0, peaked=False, negative=False, scale=1.0, lead=None
):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g) * scale / h**0.25
    weight = torch.randn(v, h, generator=g) * scale / h**0.25
    targets = torch.randint(0, v, (n,), generator=g)
    if peaked:  # rows of h copied into W: the softmax of those rows peaks hard on their target
        k = min(n, v)
        weight[targets[:k]] = hidden[:k] * 8.0
    b = torch.randn(v, generator=g) if bias else None
    if negative:  # every logit far below zero
        b = (b if b is not None else torch.zeros(v)) - 60.0
    if ignore_frac:
        targets[torch.rand(n, generator=g) < ignore_frac] = -100
    cast = [hidden.to(dtype), weight.to(dtype), targets, None if b is None else b.to(dtype)]
    if lead is not None:
        cast[0] = cast[0].reshape(*lead, h)
        cast[2] = cast[2].reshape(*lead)
    return cast


def run(fn, hidden, weight, targets, bias, g_lp, g_ent, **kw):
    """Outputs and grads of (sum g_lp lp + sum g_ent ent) for an op with linear_logprobs' signature."""
    leaves = [hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()]
    if bias is not None:
        leaves.append(bias.detach().clone().requires_grad_())
    lp, ent = fn(leaves[0], leaves[1], targets, bias=leaves[2] if bias is not None else None, **kw)
    loss = 0.0
    if g_lp is not None:
        loss = loss + (lp.double() * g_lp.double()).sum()
    if g_ent is not None:
        loss = loss + (ent.double() * g_ent.double()).sum()
    loss.backward()
    return [lp.detach(), ent.detach()] + [x.grad for x in leaves]


def fused(hidden, weight, targets, *, backend, bias=None, **kw):
    return linear_logprobs(hidden, weight, targets, bias=bias, backend=backend, **kw)


def ground_truth(hidden, weight, targets, bias, g_lp, g_ent, **kw):
    kw.pop("backend", None)
    to64 = lambda t: None if t is None else t.double()
    return run(reference_logprobs, to64(hidden), to64(weight), targets, to64(bias), g_lp, g_ent, **kw)


def naive(hidden, weight, targets, bias, g_lp, g_ent, **kw):
    kw.pop("backend", None)
    return run(reference_logprobs, hidden, weight, targets, bias, g_lp, g_ent, **kw)


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    denom = ref.norm()
    if denom == 0:
        return (out - ref).norm().item()
    return ((out - ref).norm() / denom).item()


def check_fp32(outs, refs, tol=1e-5, names=("logprobs", "entropy", "d_hidden", "d_weight", "d_bias")):
    for name, o, r in zip(names, outs, refs):
        assert torch.isfinite(o).all(), f"{name} has non-finite values"
        err = rel_err(o, r)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def check_cce_rule(
    outs, refs, naives, rel_tol, atol=0.0, names=("logprobs", "entropy", "d_hidden", "d_weight", "d_bias")
):
    """CCE's rule, elementwise: |gt - fused| <= |gt - naive_same_dtype| + rel_tol * max|gt| + atol."""
    for name, o, r, nv in zip(names, outs, refs, naives):
        o, r, nv = o.double(), r.double(), nv.double()
        assert torch.isfinite(o).all(), f"{name} has non-finite values"
        slack = (r - nv).abs() + rel_tol * r.abs().max() + atol
        excess = (r - o).abs() - slack
        worst = excess.max().item()
        assert worst <= 0, (
            f"{name}: exceeds the naive same-dtype error by {worst:.3e} (max|gt|={r.abs().max():.3e})"
        )


def loss_and_grads(fn, *leaves):
    """(detached fn(*leaves), the gradients of fresh leaf copies of `leaves`) for a scalar loss fn."""
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves]
