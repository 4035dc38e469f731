"""DPO on fused sequence log-probs against a float64 reference that materialises the logits."""

import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import BACKENDS, rel_err

from fused_rlvr.dpo import dpo_loss, linear_dpo_loss, sequence_logprobs
from fused_rlvr.reference import reference_logprobs

P, T, H, V = 2, 5, 16, 37


def _batch(seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * P, T, H, generator=g) * 0.7
    weight = torch.randn(V, H, generator=g) * 0.7
    targets = torch.randint(0, V, (2 * P, T), generator=g)
    mask = torch.ones(2 * P, T, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, :2] = False  # a masked prompt part
    mask[3, 4] = False
    ref = torch.randn(2 * P, generator=g) * 2 - 8
    b = torch.randn(V, generator=g) if bias else None
    return hidden, weight, targets, mask, ref, b


def ref_sequence_logprobs(hidden, weight, targets, mask, bias=None, **kw):
    """float64, materialised: sum_t mask * log_softmax(logits)[target]."""
    y = torch.where(mask, targets, torch.full_like(targets, -100))
    lp = reference_logprobs(hidden, weight, y, bias=bias, **kw).logprobs
    return (lp * mask).sum(1)


def ref_dpo(pc, pr, rc, rr, beta, eps=0.0):
    z = beta * ((pc - rc) - (pr - rr))
    return (-(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)).mean()


def _grads(fn, *tensors):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return loss.detach(), [None if t is None else t.grad for t in leaves], out


OPTIONS = [
    dict(),
    dict(beta=0.5, label_smoothing=0.1),
    dict(temperature=0.7, softcap=4.0, bias=True),
    dict(per_token_ref=True, beta=0.2),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_linear_dpo_matches_float64_reference(backend, opts):
    opts = dict(opts)
    use_bias = opts.pop("bias", False)
    per_token_ref = opts.pop("per_token_ref", False)
    lp_kw = {k: opts.pop(k) for k in ("temperature", "softcap") if k in opts}
    beta = opts.get("beta", 0.1)
    eps = opts.get("label_smoothing", 0.0)
    hidden, weight, targets, mask, ref, b = _batch(1, use_bias)
    ref_in = ref
    if per_token_ref:  # per-token reference log-probs, summed over the mask inside (padding ignored)
        ref_in = torch.randn(2 * P, T) * 0.5 - 1.5
        ref_in[~mask] = 123.0
        ref = (ref_in * mask).sum(1)

    def ours(h, w, bb=None):
        return linear_dpo_loss(h, w, targets, mask, ref_in, bias=bb, backend=backend, **lp_kw, **opts)

    def reference(h, w, bb=None):
        s = ref_sequence_logprobs(h, w, targets, mask, bias=bb, **lp_kw)
        r = ref.double()
        return ref_dpo(s[:P], s[P:], r[:P], r[P:], beta, eps)

    loss, grads, (_, stats) = _grads(ours, hidden, weight, b)
    to64 = lambda t: None if t is None else t.double()
    want, want_grads, _ = _grads(reference, to64(hidden), to64(weight), to64(b))
    assert loss.dtype == torch.float32
    assert abs(loss.item() - want.item()) <= 1e-6 * max(1.0, abs(want.item()))
    for name, got, exp in zip(("d_hidden", "d_weight", "d_bias"), grads, want_grads):
        if exp is None:
            continue
        assert rel_err(got, exp) < 1e-5, name
    assert torch.all(grads[0][~mask] == 0)  # masked tokens: no gradient
    s = ref_sequence_logprobs(hidden.double(), weight.double(), targets, mask, bias=to64(b), **lp_kw)
    margin = beta * ((s[:P] - ref[:P].double()) - (s[P:] - ref[P:].double()))
    assert stats.reward_margin.item() == pytest.approx(margin.mean().item(), rel=1e-5, abs=1e-7)
    assert stats.accuracy.item() == (margin > 0).double().mean().item()
    assert stats.n_pairs.item() == P


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logprobs_values_and_grads(backend):
    hidden, weight, targets, mask, _, _ = _batch(2)
    g = torch.randn(2 * P, dtype=torch.float64)

    def ours(h, w):
        return (sequence_logprobs(h, w, targets, mask.int(), backend=backend).double() * g).sum()

    def reference(h, w):
        return (ref_sequence_logprobs(h, w, targets, mask) * g).sum()

    with torch.no_grad():
        seq = sequence_logprobs(hidden, weight, targets, mask, backend=backend)
    want = ref_sequence_logprobs(hidden.double(), weight.double(), targets, mask)
    assert seq.shape == (2 * P,) and seq.dtype == torch.float32
    assert rel_err(seq, want) < 1e-6
    _, grads, _ = _grads(ours, hidden, weight)
    _, want_grads, _ = _grads(reference, hidden.double(), weight.double())
    for got, exp in zip(grads, want_grads):
        assert rel_err(got, exp) < 1e-5


def test_dpo_loss_hand_computed():
    pc = torch.tensor([-1.0, -2.0], requires_grad=True)
    pr = torch.tensor([-3.0, -1.0], requires_grad=True)
    rc = torch.tensor([-1.5, -2.0])
    rr = torch.tensor([-2.5, -1.5])
    loss, st = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # z = 0.1 ((0.5) - (-0.5)) = 0.1 and 0.1 ((0) - (0.5)) = -0.05
    sp = lambda x: math.log1p(math.exp(-x))  # -logsigmoid(x)
    assert loss.item() == pytest.approx((sp(0.1) + sp(-0.05)) / 2, rel=1e-6)
    assert st.chosen_reward.item() == pytest.approx((0.05 + 0.0) / 2)
    assert st.rejected_reward.item() == pytest.approx((-0.05 + 0.05) / 2)
    assert st.reward_margin.item() == pytest.approx((0.1 - 0.05) / 2)
    assert st.accuracy.item() == 0.5
    loss.backward()
    # d loss / d pc_i = -beta sigmoid(-z_i) / P; d / d pr_i is its negative
    sig = lambda x: 1 / (1 + math.exp(-x))
    want = [-0.1 * sig(-0.1) / 2, -0.1 * sig(0.05) / 2]
    torch.testing.assert_close(pc.grad, torch.tensor(want))
    torch.testing.assert_close(pr.grad, -torch.tensor(want))
    # label smoothing 0.2: -(0.8 logsig(z) + 0.2 logsig(-z))
    loss_s, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    want_s = (0.8 * sp(0.1) + 0.2 * sp(-0.1) + 0.8 * sp(-0.05) + 0.2 * sp(0.05)) / 2
    assert loss_s.item() == pytest.approx(want_s, rel=1e-6)


def test_dpo_errors_name_the_argument():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=r"ref_rejected must be a floating \[P\] tensor"):
        dpo_loss(x, x, x, torch.zeros(3))
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        dpo_loss(x, x, x, x, beta=-1.0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\]"):
        dpo_loss(x, x, x, x, label_smoothing=0.7)
    hidden, weight, targets, mask, ref, _ = _batch()
    with pytest.raises(ValueError, match="an even B"):
        linear_dpo_loss(hidden[:3], weight, targets[:3], mask[:3], ref[:3], backend="torch")
    with pytest.raises(ValueError, match=r"ref_logprobs must have shape \(4, 5\) or \(4,\)"):
        linear_dpo_loss(hidden, weight, targets, mask, ref[:2], backend="torch")
    with pytest.raises(ValueError, match=r"mask must have shape \(4, 5\)"):
        sequence_logprobs(hidden, weight, targets, mask[:, :2], backend="torch")
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, H\]"):
        sequence_logprobs(hidden[0], weight, targets[0], mask[0], backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_targets_masked_tokens_stay_masked(backend):
    """Masked tokens become ignore_index in int64: in uint8 the -100 would read as id 156 (out of range)."""
    hidden, _, _, mask, _, _ = _batch(seed=4)
    weight = torch.randn(120, H)
    targets = torch.randint(0, 120, (2 * P, T), dtype=torch.uint8)
    got = sequence_logprobs(hidden, weight, targets, mask, backend=backend)
    want = ref_sequence_logprobs(hidden.double(), weight.double(), targets.long(), mask)
    assert rel_err(got, want) < 1e-5
