"""fused_rlvr.integrations.verl against verl's own reference math, materialised in float64."""

import pytest
import torch
from _helpers import BACKENDS, rel_err

from fused_rlvr.integrations.verl import FusedLinearForPPO, linear_cross_entropy, linear_logprobs_entropy


def _verl_reference(hidden, weight, labels, temperature):
    """verl's `_fused_linear_for_ppo_fwd`, written out: materialised logits in float64."""
    logits = (hidden.double() @ weight.double().T) / temperature
    log_probs = logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    entropy = logits.logsumexp(-1) - (logits.softmax(-1) * logits).sum(-1)
    return log_probs, entropy


def _inputs(shape, h, v, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, h, generator=g) / h**0.25
    weight = torch.randn(v, h, generator=g) / h**0.25
    labels = torch.randint(0, v, shape, generator=g)
    if offset:  # every logit far below zero: a vocab tail padded with 0 instead of -inf would show up here
        hidden = torch.cat([hidden, torch.ones(*shape, 1)], -1)
        weight = torch.cat([weight, torch.full((v, 1), offset)], -1)
    return hidden, weight, labels


def _run(fn, hidden, weight, labels, g_lp, g_ent, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    lp, ent = fn(h, w, labels, **kw)
    ((lp.double() * g_lp).sum() + (ent.double() * g_ent).sum()).backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, h, v, temperature", [((3, 7), 48, 257, 0.6), ((1, 19), 40, 130, 1.0)])
def test_matches_verl_reference(backend, shape, h, v, temperature):
    """[B, T, H] and verl's packed [1, N, H]; H not a multiple of 128 (verl's kernel needs it), odd V."""
    hidden, weight, labels = _inputs(shape, h, v)
    g_lp, g_ent = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    ours = _run(
        linear_logprobs_entropy, hidden, weight, labels, g_lp, g_ent, temperature=temperature, backend=backend
    )
    ref = _run(
        _verl_reference, hidden.double(), weight.double(), labels, g_lp, g_ent, temperature=temperature
    )
    assert ours[0].shape == ours[1].shape == labels.shape and ours[0].dtype == torch.float32
    for name, o, r in zip(("log_probs", "entropy", "d_hidden", "d_weight"), ours, ref):
        assert rel_err(o, r) < 1e-5, name


def test_all_negative_logits_give_non_positive_logprobs():
    hidden, weight, labels = _inputs((2, 9), 32, 200, offset=-80.0)
    lp, ent = linear_logprobs_entropy(hidden, weight, labels)
    r_lp, r_ent = _verl_reference(hidden, weight, labels, 1.0)
    assert (lp <= 0).all() and (ent >= 0).all()
    assert rel_err(lp, r_lp) < 1e-5 and rel_err(ent, r_ent) < 1e-5


def test_drop_ins_have_verl_signatures():
    hidden, weight, labels = _inputs((2, 5), 32, 100)
    a = linear_cross_entropy(hidden, weight, labels, 0.8, "none")
    b = FusedLinearForPPO(chunk_size=512)(hidden, weight, labels, temperature=0.8)
    r = _verl_reference(hidden, weight, labels, 0.8)
    for x, y, z in zip(a, b, r):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
        assert rel_err(x, z) < 1e-5


def test_reductions_and_ignore_index():
    hidden, weight, labels = _inputs((2, 6), 32, 100)
    lp, ent = linear_logprobs_entropy(hidden, weight, labels)
    s = linear_logprobs_entropy(hidden, weight, labels, reduction="sum")
    m = linear_logprobs_entropy(hidden, weight, labels, reduction="mean")
    torch.testing.assert_close(s[0], lp.sum())
    torch.testing.assert_close(m[1], ent.mean())
    masked = labels.clone()
    masked[:, :2] = -1
    lp_m, ent_m = linear_logprobs_entropy(hidden, weight, masked, ignore_index=-1)
    assert (lp_m[:, :2] == 0).all() and (ent_m[:, :2] == 0).all()
    torch.testing.assert_close(lp_m[:, 2:], lp[:, 2:])
    mean_m = linear_logprobs_entropy(hidden, weight, masked, reduction="mean", ignore_index=-1)
    torch.testing.assert_close(mean_m[0], lp[:, 2:].mean())
    with pytest.raises(ValueError, match="reduction"):
        linear_logprobs_entropy(hidden, weight, labels, reduction="avg")
