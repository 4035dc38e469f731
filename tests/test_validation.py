"""Bad input gives a clear error naming the argument and what was expected."""

import re

import pytest
import torch

import fused_rlvr
from fused_rlvr import linear_logprobs


def _ok(n=4, h=8, v=11, dtype=torch.float32):
    return torch.randn(n, h, dtype=dtype), torch.randn(v, h, dtype=dtype), torch.randint(0, v, (n,))


CASES = [
    (
        "width",
        lambda h, w, y: (h, w[:, :5], y),
        {},
        ValueError,
        r"hidden width H=8 .* weight \[V, H\] = \(11, 5\)",
    ),
    (
        "weight 3-D",
        lambda h, w, y: (h, w[None], y),
        {},
        ValueError,
        r"weight must be 2-D \[V, H\], got shape \(1, 11, 8\)",
    ),
    (
        "bias shape",
        lambda h, w, y: (h, w, y),
        {"bias": torch.zeros(10)},
        ValueError,
        r"bias must be \[V\] = \(11,\), got shape \(10,\)",
    ),
    (
        "bias dtype",
        lambda h, w, y: (h, w, y),
        {"bias": torch.zeros(11, dtype=torch.float64)},
        TypeError,
        r"bias must match weight's dtype",
    ),
    (
        "targets float",
        lambda h, w, y: (h, w, y.float()),
        {},
        TypeError,
        r"targets must be an integer tensor, got torch.float32",
    ),
    (
        "targets bool",
        lambda h, w, y: (h, w, y > 0),
        {},
        TypeError,
        r"targets must be an integer tensor, got torch.bool",
    ),
    (
        "targets shape",
        lambda h, w, y: (h, w, y[:3]),
        {},
        ValueError,
        r"targets must have the shape of hidden\[\.\.\., 0\] = \(4,\), got \(3,\)",
    ),
    (
        "dtype mismatch",
        lambda h, w, y: (h, w.half(), y),
        {},
        TypeError,
        r"weight dtype torch.float16 differs from hidden dtype torch.float32",
    ),
    (
        "hidden dtype",
        lambda h, w, y: (h.double(), w.double(), y),
        {},
        TypeError,
        r"hidden must be bfloat16, float16 or float32, got torch.float64",
    ),
    (
        "hidden int",
        lambda h, w, y: (h.long(), w, y),
        {},
        TypeError,
        r"hidden must be bfloat16, float16 or float32",
    ),
    (
        "hidden not tensor",
        lambda h, w, y: (h.tolist(), w, y),
        {},
        TypeError,
        r"hidden must be a torch.Tensor, got list",
    ),
    (
        "temperature 0",
        lambda h, w, y: (h, w, y),
        {"temperature": 0.0},
        ValueError,
        r"temperature must be a finite positive number, got 0.0",
    ),
    (
        "temperature nan",
        lambda h, w, y: (h, w, y),
        {"temperature": float("nan")},
        ValueError,
        r"temperature must be a finite positive number, got nan",
    ),
    (
        "temperature str",
        lambda h, w, y: (h, w, y),
        {"temperature": "1"},
        TypeError,
        r"temperature must be a finite positive number, got str",
    ),
    (
        "softcap negative",
        lambda h, w, y: (h, w, y),
        {"softcap": -3.0},
        ValueError,
        r"softcap must be a finite positive number, got -3.0",
    ),
    (
        "softcap inf",
        lambda h, w, y: (h, w, y),
        {"softcap": float("inf")},
        ValueError,
        r"softcap must be a finite positive number, got inf",
    ),
    (
        "backend",
        lambda h, w, y: (h, w, y),
        {"backend": "cuda"},
        ValueError,
        r"backend must be one of 'auto', 'triton', 'torch'; got 'cuda'",
    ),
    (
        "ignore_index",
        lambda h, w, y: (h, w, y),
        {"ignore_index": 1.5},
        TypeError,
        r"ignore_index must be an int, got float",
    ),
    (
        "target too big",
        lambda h, w, y: (h, w, torch.tensor([0, 1, 11, 2])),
        {},
        ValueError,
        r"targets must lie in \[0, 11\) or equal ignore_index=-100; targets\[2\] = 11",
    ),
    (
        "target negative",
        lambda h, w, y: (h, w, torch.tensor([0, -1, 3, 2])),
        {},
        ValueError,
        r"targets must lie in \[0, 11\) .* targets\[1\] = -1",
    ),
]


@pytest.mark.parametrize("name,build,kwargs,exc,pattern", CASES, ids=[c[0] for c in CASES])
def test_errors(name, build, kwargs, exc, pattern):
    h, w, y = build(*_ok())
    with pytest.raises(exc, match=pattern):
        linear_logprobs(h, w, y, **kwargs)


def test_device_mismatch_message():
    h, w, y = _ok()
    meta_w = torch.empty(11, 8, device="meta")
    with pytest.raises(ValueError, match=re.escape("weight is on meta but hidden is on cpu")):
        linear_logprobs(h, meta_w, y)


def test_ignore_index_is_not_range_checked():
    h, w, y = _ok()
    y[1] = -100
    lp, _ = linear_logprobs(h, w, y)
    assert lp[1] == 0


def test_target_check_can_be_skipped():
    h, w, y = _ok()
    bad = torch.tensor([0, 1, 99, 2])
    fused_rlvr.set_target_check(False)
    try:
        lp, ent = linear_logprobs(h, w, bad)  # no sync, no crash: indices are clamped in the kernels
        assert torch.isfinite(ent).all()
    finally:
        fused_rlvr.set_target_check(True)
    with pytest.raises(ValueError):
        linear_logprobs(h, w, bad)


def _loss_inputs():
    h = torch.randn(2, 5, 8)
    w = torch.randn(11, 8)
    y = torch.randint(0, 11, (2, 5))
    m = torch.ones(2, 5, dtype=torch.bool)
    return h, w, y, torch.randn(2), m, torch.randn(2, 5) - 2


GRPO_CASES = [
    (
        "mask values",
        dict(mask=torch.full((2, 5), 2.0)),
        ValueError,
        r"mask must be boolean or hold only 0 and 1",
    ),
    ("mask shape", dict(mask=torch.ones(2, 4)), ValueError, r"mask must have shape \(2, 5\)"),
    (
        "advantages shape",
        dict(advantages=torch.randn(3)),
        ValueError,
        r"advantages must have shape \(2, 5\) or \(2,\), got \(3,\)",
    ),
    (
        "old shape",
        dict(old_logprobs=torch.randn(2, 4)),
        ValueError,
        r"old_logprobs must have shape \(2, 5\), got \(2, 4\)",
    ),
    (
        "targets shape",
        dict(targets=torch.zeros(2, 4, dtype=torch.long)),
        ValueError,
        r"targets must be \[B, T\] = \(2, 5\)",
    ),
    ("hidden 2-D", dict(hidden=torch.randn(10, 8)), ValueError, r"hidden must be \[B, T, H\]"),
    ("negative beta", dict(beta=-0.1), ValueError, r"beta must be a finite number >= 0, got -0.1"),
    ("eps_low 0", dict(eps_low=0.0), ValueError, r"eps_low must be in \(0, 1\], got 0.0"),
    ("eps_low big", dict(eps_low=1.5), ValueError, r"eps_low must be in \(0, 1\], got 1.5"),
    ("eps_high neg", dict(eps_high=-0.2), ValueError, r"eps_high must be in \(0, 1\]"),
    (
        "kl name",
        dict(kl="k4"),
        ValueError,
        r"kl must be one of 'k1', 'k2', 'k3', 'k1\+', 'k2\+', 'k3\+'; got 'k4'",
    ),
    (
        "agg name",
        dict(agg="mean"),
        ValueError,
        r"agg must be one of 'token-mean', 'seq-mean-token-mean', .*'dapo'; got 'mean'",
    ),
    (
        "importance",
        dict(importance="seq"),
        ValueError,
        r"importance must be one of 'token', 'sequence', 'sequence-mean'; got 'seq'",
    ),
    ("ref missing", dict(beta=0.1), ValueError, r"ref_logprobs is required when beta > 0 \(beta=0.1\)"),
    ("dual clip", dict(dual_clip=0.5), ValueError, r"dual_clip must be > 1"),
    ("steer type", dict(steer="exp"), TypeError, r"steer must be a fused_rlvr.SteerConfig or None, got str"),
    ("normalizer", dict(normalizer=0), ValueError, r"normalizer must be a finite positive number, got 0.0"),
]


@pytest.mark.parametrize("name,override,exc,pattern", GRPO_CASES, ids=[c[0] for c in GRPO_CASES])
def test_grpo_errors(name, override, exc, pattern):
    h, w, y, a, m, old = _loss_inputs()
    kw = dict(hidden=h, weight=w, targets=y, advantages=a, mask=m, old_logprobs=old)
    kw.update(override)
    args = [kw.pop(k) for k in ("hidden", "weight", "targets", "advantages", "mask")]
    with pytest.raises(exc, match=pattern):
        fused_rlvr.linear_grpo_loss(*args, **kw)


def test_steer_config_errors():
    with pytest.raises(ValueError, match=r"steer.mode must be one of 'exp', 'linear', 'exact'; got 'log'"):
        fused_rlvr.SteerConfig(mode="log")
    with pytest.raises(ValueError, match=r"steer.lambda_min \(0.9\) must not exceed lambda_max \(0.8\)"):
        fused_rlvr.SteerConfig(lambda_min=0.9, lambda_max=0.8)


PACS_CASES = [
    ("rewards range", dict(rewards=torch.tensor([1.0, 2.0])), ValueError, r"rewards must lie in \[0, 1\]"),
    (
        "rewards shape",
        dict(rewards=torch.tensor([1.0, 0.0, 1.0])),
        ValueError,
        r"rewards must be \[B\] = \(2,\)",
    ),
    ("negative beta", dict(beta=-1.0), ValueError, r"beta must be a finite number >= 0, got -1.0"),
    (
        "baseline",
        dict(baseline="mean"),
        ValueError,
        r"baseline must be one of 'rloo', 'grpo', 'none'; got 'mean'",
    ),
    (
        "group of one",
        dict(group_ids=torch.tensor([0, 1])),
        ValueError,
        r"baseline='rloo' needs groups of at least 2 sequences; group 0 has one",
    ),
    (
        "group ids float",
        dict(group_ids=torch.tensor([0.0, 0.0])),
        ValueError,
        r"group_ids must be a 1-D integer tensor",
    ),
    ("old missing", dict(old_logprobs=None), ValueError, r"old_logprobs is required"),
]


@pytest.mark.parametrize("name,override,exc,pattern", PACS_CASES, ids=[c[0] for c in PACS_CASES])
def test_pacs_errors(name, override, exc, pattern):
    h, w, y, _, m, old = _loss_inputs()
    kw = dict(rewards=torch.tensor([1.0, 0.0]), group_ids=torch.tensor([0, 0]), old_logprobs=old)
    kw.update(override)
    with pytest.raises(exc, match=pattern):
        fused_rlvr.linear_pacs_loss(h, w, y, kw.pop("rewards"), m, kw.pop("group_ids"), **kw)


def _steer_inputs(b=3, t=5):
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(b, t, generator=g) * 3
    old = lp + 0.1 * torch.randn(b, t, generator=g)
    ent = torch.rand(b, t, generator=g) * 2
    adv = torch.randn(b, generator=g)
    mask = torch.ones(b, t)
    mask[0, 3:] = 0
    return dict(logprobs=lp, old_logprobs=old, old_entropy=ent, advantages=adv, mask=mask)


STEER_CASES = [  # broadcastable but wrong shapes, non-0/1 masks, bounds that give NaN, unknown modes
    (
        "old_logprobs [B, 1]",
        dict(old_logprobs=torch.zeros(3, 1)),
        ValueError,
        r"old_logprobs must have shape",
    ),
    (
        "old_entropy [T]",
        dict(old_entropy=torch.zeros(5)),
        ValueError,
        r"old_entropy must have shape \(3, 5\)",
    ),
    ("mask [1, T]", dict(mask=torch.ones(1, 5)), ValueError, r"mask must have shape \(3, 5\)"),
    ("advantages [B, 1]", dict(advantages=torch.zeros(3, 1)), ValueError, r"advantages must have shape"),
    ("advantages [1]", dict(advantages=torch.zeros(1)), ValueError, r"advantages must have shape"),
    ("logprobs 1-D", dict(logprobs=torch.zeros(15)), ValueError, r"logprobs must be \[B, T\]"),
    (
        "mask 0.5",
        dict(mask=torch.full((3, 5), 0.5)),
        ValueError,
        r"mask must be boolean or hold only 0 and 1",
    ),
    (
        "lambda_min negative",
        dict(lambda_min=-0.5),
        ValueError,
        r"lambda_min must be a finite positive number",
    ),
    ("lambda_max inf", dict(lambda_max=float("inf")), ValueError, r"lambda_max must be a finite positive"),
    ("lambda order", dict(lambda_min=0.9, lambda_max=0.8), ValueError, r"lambda_min \(0.9\) must not exceed"),
    ("mode", dict(mode="log"), ValueError, r"mode must be one of 'exp', 'linear', 'exact'; got 'log'"),
    (
        "int logprobs",
        dict(logprobs=torch.zeros(3, 5, dtype=torch.long)),
        TypeError,
        r"logprobs must be a float",
    ),
    (
        "exact sum_p2 shape",
        dict(
            mode="exact", sum_p2=torch.zeros(3, 1), sum_p2_logp=torch.zeros(3, 5), entropy=torch.zeros(3, 5)
        ),
        ValueError,
        r"sum_p2 must have shape \(3, 5\)",
    ),
    ("exact missing", dict(mode="exact"), ValueError, r"mode='exact' needs sum_p2, sum_p2_logp and entropy"),
]


@pytest.mark.parametrize("name,override,exc,pattern", STEER_CASES, ids=[c[0] for c in STEER_CASES])
def test_steer_weights_errors(name, override, exc, pattern):
    kw = _steer_inputs()
    kw.update(override)
    with pytest.raises(exc, match=pattern):
        fused_rlvr.steer_weights(**kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_losses_refuse_targets_that_are_not_integers(dtype):
    """The losses convert targets to int64 for the op: a float or bool tensor is refused first, not truncated."""
    from fused_rlvr import linear_grpo_loss, linear_pacs_loss
    from fused_rlvr.dpo import sequence_logprobs

    h, w = torch.randn(2, 3, 4), torch.randn(5, 4)
    y = torch.tensor([[1.7, 2.2, 0.9], [1.0, 0.0, 1.0]]).to(dtype)
    m = torch.ones(2, 3)
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        linear_grpo_loss(h, w, y, torch.ones(2), m)
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        linear_pacs_loss(
            h, w, y, torch.ones(2), m, torch.zeros(2, dtype=torch.long), old_logprobs=torch.zeros(2, 3)
        )
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        sequence_logprobs(h, w, y, m)
