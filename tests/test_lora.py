"""LoRA on the lm-head, fused: against float64 logits of the merged weight W + scale B A (fused_rlvr.reference),
values and gradients of hidden, W, bias, A and B, both backends."""

import pytest
import torch
from _helpers import BACKENDS, check_cce_rule, check_fp32, loss_and_grads, rel_err
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fused_rlvr
from fused_rlvr import _torch_backend, _triton_backend, linear_entropy_moments, linear_logprobs
from fused_rlvr.reference import reference_logprobs

NAMES = ("logprobs", "entropy", "d_hidden", "d_weight", "d_bias", "d_lora_a", "d_lora_b")


def _problem(
    n, h, v, r, dtype=torch.float32, *, seed=0, bias=False, ignore_frac=0.0, lead=None, lora_dtype=None
):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g) / h**0.25
    weight = torch.randn(v, h, generator=g) / h**0.25
    a = torch.randn(r, h, generator=g) / h**0.5
    b = torch.randn(v, r, generator=g) * 0.5
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore_frac:
        targets[torch.rand(n, generator=g) < ignore_frac] = -100
    bb = torch.randn(v, generator=g) if bias else None
    if lead is not None:
        hidden, targets = hidden.reshape(*lead, h), targets.reshape(lead)
    lora_dtype = lora_dtype or dtype
    cast = lambda t, dt: None if t is None else t.to(dt)  # noqa: E731
    return (
        cast(hidden, dtype),
        cast(weight, dtype),
        targets,
        cast(bb, dtype),
        cast(a, lora_dtype),
        cast(b, lora_dtype),
    )


def _grads(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _run(op, hidden, weight, targets, bias, a, b, scale, g_lp, g_ent, *, frozen_weight=False, **kw):
    """Outputs and gradients of sum(g_lp lp + g_ent ent) w.r.t. hidden, weight, bias, A, B."""
    leaves = [
        None if t is None else t.detach().clone().requires_grad_() for t in (hidden, weight, bias, a, b)
    ]
    if frozen_weight:
        leaves[1].requires_grad_(False)
    lp, ent = op(
        leaves[0],
        leaves[1],
        targets,
        bias=leaves[2],
        lora_a=leaves[3],
        lora_b=leaves[4],
        lora_scale=scale,
        **kw,
    )
    loss = 0.0
    if g_lp is not None:
        loss = loss + (lp.double() * g_lp.double()).sum()
    if g_ent is not None:
        loss = loss + (ent.double() * g_ent.double()).sum()
    loss.backward()
    return [lp.detach(), ent.detach()] + [None if t is None else t.grad for t in leaves]


def merged_reference(hidden, weight, targets, *, bias=None, lora_a, lora_b, lora_scale, **kw):
    """Plain torch on the merged weight W + scale B A (materialised [N, V] logits)."""
    return reference_logprobs(hidden, weight + lora_scale * lora_b @ lora_a, targets, bias=bias, **kw)


def unmerged_naive(hidden, weight, targets, *, bias=None, lora_a, lora_b, lora_scale, **kw):
    """Plain torch in the inputs' dtype, as PEFT computes the head: h W^T + (scale h A^T) B^T."""
    ha = lora_scale * (hidden @ lora_a.T)
    return reference_logprobs(
        torch.cat([hidden, ha], -1), torch.cat([weight, lora_b], -1), targets, bias=bias, **kw
    )


def _truth(hidden, weight, targets, bias, a, b, scale, g_lp, g_ent, **kw):
    to64 = lambda t: None if t is None else t.double()  # noqa: E731
    kw = {k: (to64(v) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return _run(
        merged_reference,
        *(to64(t) for t in (hidden, weight)),
        targets,
        *(to64(t) for t in (bias, a, b)),
        scale,
        g_lp,
        g_ent,
        **kw,
    )


def _check(out, ref, tol=1e-5):
    pairs = [(n, o, r) for n, o, r in zip(NAMES, out, ref) if r is not None]
    check_fp32([o for _, o, _ in pairs], [r for _, _, r in pairs], tol=tol, names=[n for n, _, _ in pairs])


OPTIONS = [
    dict(),
    dict(bias=True),
    dict(temperature=0.7),
    dict(softcap=6.0),
    dict(token_temperature=True, ignore_frac=0.3),
    dict(bias=True, softcap=20.0, temperature=1.3, ignore_frac=0.3),
    dict(bias=True, softcap=8.0, token_temperature=True, ignore_frac=0.2, scale=-0.5),
]


def _split(opts, n):
    make = {k: opts[k] for k in ("bias", "ignore_frac") if k in opts}
    call = {k: opts[k] for k in ("temperature", "softcap") if k in opts}
    if opts.get("token_temperature"):
        call["temperature"] = 0.4 + 1.2 * torch.rand(n, generator=torch.Generator().manual_seed(9))
    return make, call, opts.get("scale", 1.7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_fp32_matches_merged_float64(backend, opts):
    make, call, scale = _split(opts, 37)
    h, w, y, bb, a, b = _problem(37, 40, 203, 6, seed=3, **make)
    g_lp, g_ent = _grads(37)
    out = _run(linear_logprobs, h, w, y, bb, a, b, scale, g_lp, g_ent, backend=backend, **call)
    _check(out, _truth(h, w, y, bb, a, b, scale, g_lp, g_ent, **call))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank", [1, 16, 20])  # the Triton dot pads r to a power of two >= 16
def test_ranks(backend, rank):
    h, w, y, bb, a, b = _problem(21, 24, 70, rank, seed=4, bias=True)
    g_lp, g_ent = _grads(21)
    out = _run(linear_logprobs, h, w, y, bb, a, b, 0.5, g_lp, g_ent, backend=backend, temperature=0.9)
    _check(out, _truth(h, w, y, bb, a, b, 0.5, g_lp, g_ent, temperature=0.9))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["logprobs", "entropy"])
def test_gradient_of_one_output(backend, which):
    h, w, y, bb, a, b = _problem(29, 24, 77, 4, seed=5, bias=True, ignore_frac=0.2)
    g_lp, g_ent = _grads(29)
    g_lp, g_ent = (g_lp, None) if which == "logprobs" else (None, g_ent)
    out = _run(linear_logprobs, h, w, y, bb, a, b, 2.0, g_lp, g_ent, backend=backend, softcap=5.0)
    _check(out, _truth(h, w, y, bb, a, b, 2.0, g_lp, g_ent, softcap=5.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_naive(backend, dtype):
    """16-bit head and adapter: CCE's rule against PEFT's own arithmetic in that dtype."""
    h, w, y, bb, a, b = _problem(45, 64, 300, 8, dtype, seed=6, bias=True, ignore_frac=0.25)
    g_lp, g_ent = _grads(45)
    kw = dict(softcap=20.0, temperature=0.8)
    out = _run(linear_logprobs, h, w, y, bb, a, b, 2.0, g_lp, g_ent, backend=backend, **kw)
    ref = _truth(h, w, y, bb, a, b, 2.0, g_lp, g_ent, **kw)
    nv = _run(unmerged_naive, h, w, y, bb, a, b, 2.0, g_lp, g_ent, **kw)
    check_cce_rule(out, ref, nv, rel_tol=2**-7, names=NAMES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_adapter_on_a_bf16_head(backend):
    """PEFT keeps adapters in fp32 on a bf16 model: accepted, and no less accurate than all-bf16."""
    h, w, y, bb, a, b = _problem(33, 48, 150, 8, torch.bfloat16, seed=7, lora_dtype=torch.float32)
    g_lp, g_ent = _grads(33)
    out = _run(linear_logprobs, h, w, y, None, a, b, 1.5, g_lp, g_ent, backend=backend)
    assert out[5].dtype == torch.float32 and out[6].dtype == torch.float32 and out[3].dtype == torch.bfloat16
    ref = _truth(h, w, y, None, a, b, 1.5, g_lp, g_ent)
    nv = _run(unmerged_naive, h, w, y, None, a.bfloat16(), b.bfloat16(), 1.5, g_lp, g_ent)
    keep = [0, 1, 2, 3, 5, 6]
    check_cce_rule(
        [out[i] for i in keep],
        [ref[i] for i in keep],
        [nv[i] for i in keep],
        rel_tol=2**-7,
        names=[NAMES[i] for i in keep],
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_base_computes_no_weight_gradient(backend, monkeypatch):
    """weight.requires_grad=False (LoRA training): the backward neither computes nor allocates d_weight."""
    impl = _torch_backend if backend == "torch" else _triton_backend
    original, seen = impl.backward, []

    def spy(*args):
        seen.append(args[-1])
        out = original(*args)
        assert out[1] is None
        return out

    monkeypatch.setattr(impl, "backward", spy)
    h, w, y, bb, a, b = _problem(19, 16, 60, 4, seed=8)
    g_lp, g_ent = _grads(19)
    out = _run(linear_logprobs, h, w, y, None, a, b, 1.0, g_lp, g_ent, backend=backend, frozen_weight=True)
    assert seen == [(True, False, False, True, True)]
    assert out[3] is None
    ref = _truth(h, w, y, None, a, b, 1.0, g_lp, g_ent)
    _check(out[:3] + out[5:], ref[:3] + ref[5:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_what_requires_grad(backend):
    h, w, y, _, a, b = _problem(12, 16, 40, 3, seed=9)
    hh = h.clone()
    bb = b.clone().requires_grad_()
    lp, ent = linear_logprobs(hh, w, y, lora_a=a, lora_b=bb, lora_scale=0.7, backend=backend)
    (lp.sum() + ent.sum()).backward()
    assert bb.grad is not None and a.grad is None and w.grad is None
    with torch.no_grad():  # the forward-only path gives the same values
        lp2, ent2 = linear_logprobs(h, w, y, lora_a=a, lora_b=b, lora_scale=0.7, backend=backend)
    assert torch.equal(lp2, lp.detach()) and torch.equal(ent2, ent.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_moments(backend):
    h, w, y, bb, a, b = _problem(26, 24, 90, 5, seed=11, bias=True, ignore_frac=0.3)
    got = linear_entropy_moments(
        h, w, y, bias=bb, lora_a=a, lora_b=b, lora_scale=1.3, backend=backend, softcap=9.0
    )
    ref = merged_reference(
        h.double(),
        w.double(),
        y,
        bias=bb.double(),
        lora_a=a.double(),
        lora_b=b.double(),
        lora_scale=1.3,
        softcap=9.0,
        moments=True,
    )
    for key, r in zip(("logprob", "entropy", "sum_p2", "sum_p2_logp"), ref):
        assert rel_err(got[key], r) < 1e-5, key


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_b_is_the_plain_head(backend):
    """PEFT initialises B = 0: the adapter then changes nothing, and dA = 0 exactly."""
    h, w, y, bb, a, b = _problem(15, 16, 50, 4, seed=12, bias=True)
    b = torch.zeros_like(b)
    out = _run(linear_logprobs, h, w, y, bb, a, b, 2.0, *_grads(15), backend=backend)
    plain = linear_logprobs(h, w, y, bias=bb, backend=backend)
    assert torch.allclose(out[0], plain.logprobs, atol=1e-6) and torch.allclose(
        out[1], plain.entropy, atol=1e-6
    )
    assert torch.equal(out[5], torch.zeros_like(a)) and out[6].abs().sum() > 0


class _Guard(TorchDispatchMode):
    """Fails on any tensor with at least `limit` elements (a [V, H] merged weight, [N, V] logits)."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.largest = limit, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if t.numel() >= self.limit:
                    raise AssertionError(f"{func} made a {tuple(t.shape)} tensor")
        return out


def test_no_merged_weight_and_no_logits(monkeypatch):
    """Torch path, frozen base: nothing as large as the [V, H] weight or the [N, V] logits is ever made."""
    monkeypatch.setenv("FUSED_RLVR_TORCH_CHUNK_BYTES", str(64 * 4 * 48))  # 64-column chunks
    n, h, v, r = 48, 96, 1000, 8
    hid, w, y, bb, a, b = _problem(n, h, v, r, seed=13, bias=True)
    leaves = [t.clone().requires_grad_() for t in (hid, a, b)]
    with _Guard(min(v * h, n * v)) as guard:
        lp, ent = linear_logprobs(
            leaves[0], w, y, bias=bb, lora_a=leaves[1], lora_b=leaves[2], lora_scale=2.0, backend="torch"
        )
        (lp.sum() + ent.sum()).backward()
    assert 0 < guard.largest < min(v * h, n * v)
    assert all(t.grad is not None for t in leaves)
    with pytest.raises(AssertionError, match="made a"), _Guard(min(v * h, n * v)):  # positive control
        merged_reference(hid, w, y, bias=bb, lora_a=a, lora_b=b, lora_scale=2.0)


@given(
    lead=st.sampled_from([(1,), (9,), (3, 5)]),
    h=st.integers(1, 40),
    v=st.integers(1, 120),
    r=st.integers(1, 9),
    scale=st.floats(-3.0, 3.0),
    bias=st.booleans(),
    softcap=st.one_of(st.none(), st.floats(2.0, 50.0)),
    temperature=st.sampled_from(["token", 0.6, 1.0, 1.7]),
    ignore_frac=st.sampled_from([0.0, 0.4]),
    frozen_weight=st.booleans(),
    backend=st.sampled_from(BACKENDS),
    seed=st.integers(0, 2**16),
)
def test_hypothesis(
    lead, h, v, r, scale, bias, softcap, temperature, ignore_frac, frozen_weight, backend, seed
):
    n = 1
    for d in lead:
        n *= d
    hid, w, y, bb, a, b = _problem(n, h, v, r, seed=seed, bias=bias, ignore_frac=ignore_frac, lead=lead)
    if temperature == "token":
        temperature = 0.3 + 1.5 * torch.rand(lead, generator=torch.Generator().manual_seed(seed + 3))
    g_lp, g_ent = _grads(lead, seed + 1)
    kw = dict(softcap=softcap, temperature=temperature)
    out = _run(
        linear_logprobs,
        hid,
        w,
        y,
        bb,
        a,
        b,
        scale,
        g_lp,
        g_ent,
        backend=backend,
        frozen_weight=frozen_weight,
        **kw,
    )
    ref = _truth(hid, w, y, bb, a, b, scale, g_lp, g_ent, frozen_weight=frozen_weight, **kw)
    nv = _run(unmerged_naive, hid, w, y, bb, a, b, scale, g_lp, g_ent, frozen_weight=frozen_weight, **kw)
    keep = [i for i, t in enumerate(ref) if t is not None]
    # CCE's rule against plain fp32 torch (PEFT's arithmetic), plus fp32 rounding of the largest value and
    # of the O(1) intermediates where a near-certain softmax makes the outputs small
    check_cce_rule(
        [out[i] for i in keep],
        [ref[i] for i in keep],
        [nv[i] for i in keep],
        rel_tol=1e-5,
        atol=1e-7,
        names=[NAMES[i] for i in keep],
    )


VALIDATION = [
    (dict(lora_b=None), ValueError, r"lora_a and lora_b go together: lora_b is missing"),
    (dict(lora_a=None), ValueError, r"lora_a and lora_b go together: lora_a is missing"),
    (dict(lora_a=None, lora_b=None), ValueError, r"lora_scale is given without lora_a and lora_b"),
    (dict(lora_a=torch.zeros(3, 7)), ValueError, r"lora_a must be \[r, H\] = \[r, 8\]"),
    (dict(lora_a=torch.zeros(0, 8), lora_b=torch.zeros(11, 0)), ValueError, r"with r >= 1"),
    (dict(lora_b=torch.zeros(10, 3)), ValueError, r"lora_b must be \[V, r\] = \(11, 3\)"),
    (dict(lora_b=torch.zeros(11, 4)), ValueError, r"lora_b must be \[V, r\] = \(11, 3\)"),
    (
        dict(lora_a=torch.zeros(3, 8, dtype=torch.float64)),
        TypeError,
        r"lora_a must be bfloat16, float16 or float32",
    ),
    (
        dict(lora_b=torch.zeros(11, 3, dtype=torch.float16)),
        TypeError,
        r"lora_a dtype torch.float32 differs from lora_b",
    ),
    (dict(lora_scale=float("nan")), ValueError, r"lora_scale must be a finite number, got nan"),
    (dict(lora_scale="2"), ValueError, r"lora_scale must be a finite number"),
    (dict(lora_a=[[0.0] * 8] * 3), TypeError, r"lora_a must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize("override, exc, pattern", VALIDATION)
def test_validation(override, exc, pattern):
    h, w, y = torch.randn(4, 8), torch.randn(11, 8), torch.randint(0, 11, (4,))
    kw = dict(lora_a=torch.zeros(3, 8), lora_b=torch.zeros(11, 3), lora_scale=2.0)
    kw.update(override)
    with pytest.raises(exc, match=pattern):
        linear_logprobs(h, w, y, backend="torch", **kw)
    with pytest.raises(exc, match=pattern):
        linear_entropy_moments(h, w, y, backend="torch", **kw)


# ---- through the losses, DPO, the modules and verl's entry points ------------------------------------------


def _loss_batch(seed=0, b=4, t=9, h=16, v=37, r=4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g) * 0.6
    weight = torch.randn(v, h, generator=g) * 0.6
    lora_a = torch.randn(r, h, generator=g) * 0.3
    lora_b = torch.randn(v, r, generator=g) * 0.3
    targets = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[:, 0] = True
    with torch.no_grad():  # old / reference policies near the current one, so that some ratios clip
        y = torch.where(mask, targets, -100)
        lp0 = merged_reference(
            hidden.double(),
            weight.double(),
            y,
            lora_a=lora_a.double(),
            lora_b=lora_b.double(),
            lora_scale=1.5,
        ).logprobs
    old = (lp0 + 0.4 * torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    ref = (lp0 + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(b, generator=g)
    return hidden, weight, lora_a, lora_b, targets, mask, old, ref, adv


def _compare_loss(ours, reference, leaves):
    loss, grads = loss_and_grads(ours, *leaves)
    want, want_grads = loss_and_grads(reference, *(x.double() for x in leaves))
    assert abs(loss.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))
    for got, w in zip(grads, want_grads):
        assert rel_err(got, w) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["function", "module"])
def test_grpo_loss(backend, kind):
    from _loss_reference import ref_grpo_loss, ref_token_stats

    hidden, weight, lora_a, lora_b, targets, mask, old, ref, adv = _loss_batch(1)
    kw = dict(beta=0.05, kl="k3", entropy_coef=0.01, eps_high=0.28)

    def ours(h, w, a, b):
        lora = dict(lora_a=a, lora_b=b, lora_scale=1.5)
        if kind == "module":
            module = fused_rlvr.LinearGRPOLoss(backend=backend, temperature=0.8, **kw)
            return module(h, w, targets, adv, mask, old_logprobs=old, ref_logprobs=ref, **lora)[0]
        return fused_rlvr.linear_grpo_loss(
            h,
            w,
            targets,
            adv,
            mask,
            old_logprobs=old,
            ref_logprobs=ref,
            temperature=0.8,
            backend=backend,
            **kw,
            **lora,
        )[0]

    def reference(h, w, a, b):
        lp, ent = ref_token_stats(h, w + 1.5 * b @ a, targets, mask, temperature=0.8)
        return ref_grpo_loss(lp, ent, adv.double(), mask, old.double(), ref.double(), **kw)

    _compare_loss(ours, reference, (hidden, weight, lora_a, lora_b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["function", "module"])
def test_pacs_loss(backend, kind):
    from _loss_reference import ref_pacs_loss, ref_token_stats

    hidden, weight, lora_a, lora_b, targets, mask, old, _, _ = _loss_batch(2)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1])

    def ours(h, w, a, b):
        lora = dict(lora_a=a, lora_b=b, lora_scale=1.5)
        if kind == "module":
            module = fused_rlvr.LinearPACSLoss(beta=1.5, backend=backend)
            return module(h, w, targets, rewards, mask, groups, old_logprobs=old, **lora)[0]
        return fused_rlvr.linear_pacs_loss(
            h, w, targets, rewards, mask, groups, old_logprobs=old, beta=1.5, backend=backend, **lora
        )[0]

    def reference(h, w, a, b):
        lp, _ = ref_token_stats(h, w + 1.5 * b @ a, targets, mask)
        return ref_pacs_loss(lp, old.double(), rewards, mask, groups, beta=1.5)

    _compare_loss(ours, reference, (hidden, weight, lora_a, lora_b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpo(backend):
    from fused_rlvr.dpo import linear_dpo_loss

    hidden, weight, lora_a, lora_b, targets, mask, _, _, _ = _loss_batch(3)
    ref_seq = torch.randn(4) - 8

    def ours(h, a, b):
        return linear_dpo_loss(
            h, weight, targets, mask, ref_seq, beta=0.3, backend=backend, lora_a=a, lora_b=b, lora_scale=1.5
        )[0]

    def reference(h, a, b):
        y = torch.where(mask, targets, -100)
        lp = reference_logprobs(h, weight.double() + 1.5 * b @ a, y).logprobs
        s = (lp * mask).sum(1)
        z = 0.3 * ((s[:2] - ref_seq[:2].double()) - (s[2:] - ref_seq[2:].double()))
        return -torch.nn.functional.logsigmoid(z).mean()

    _compare_loss(ours, reference, (hidden, lora_a, lora_b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_verl_entry_points(backend):
    from fused_rlvr.integrations.verl import FusedLinearForPPO, linear_cross_entropy, linear_logprobs_entropy

    hidden, weight, lora_a, lora_b, targets, _, _, _, _ = _loss_batch(4)
    logits = (hidden.double() @ (weight.double() + 1.5 * lora_b.double() @ lora_a.double()).T) / 0.7
    want_lp = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    want_ent = logits.logsumexp(-1) - (logits.softmax(-1) * logits).sum(-1)
    lora = dict(lora_a=lora_a, lora_b=lora_b, lora_scale=1.5)
    for lp, ent in (
        linear_logprobs_entropy(hidden, weight, targets, 0.7, backend=backend, **lora),
        linear_cross_entropy(hidden, weight, targets, 0.7, **lora),
        FusedLinearForPPO(backend=backend)(hidden, weight, targets, 0.7, **lora),
    ):
        assert rel_err(lp, want_lp) < 1e-6 and rel_err(ent, want_ent) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_compiled_kernels(dtype):
    """The compiled kernels (HAS_LORA, PER_ROW_TEMP) at a GPU shape, PEFT's fp32 adapter on the 16-bit head."""
    lora_dtype = torch.float32
    h, w, y, bb, a, b = _problem(
        1000, 512, 5003, 16, dtype, seed=21, bias=True, ignore_frac=0.1, lora_dtype=lora_dtype
    )
    temp = 0.5 + torch.rand(1000, generator=torch.Generator().manual_seed(22))
    h, w, y, bb, a, b, temp = (t.cuda() for t in (h, w, y, bb, a, b, temp))
    g_lp, g_ent = (t.cuda() for t in _grads(1000))
    kw = dict(softcap=30.0, temperature=temp)
    out = _run(linear_logprobs, h, w, y, bb, a, b, 2.0, g_lp, g_ent, backend="triton", **kw)
    ref = _truth(h, w, y, bb, a, b, 2.0, g_lp, g_ent, **kw)
    if dtype == torch.float32:
        _check(out, ref)
    else:
        nv = _run(unmerged_naive, h, w, y, bb, a.to(dtype), b.to(dtype), 2.0, g_lp, g_ent, **kw)
        check_cce_rule(out, ref, nv, rel_tol=2**-7, names=NAMES)
