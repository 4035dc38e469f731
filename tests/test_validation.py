"""Bad input gives a clear error naming the argument and what was expected."""

import re

import pytest
import torch

import fused_rlvr
from fused_rlvr import linear_logprobs


def _ok(n=4, h=8, v=11, dtype=torch.float32):
    return torch.randn(n, h, dtype=dtype), torch.randn(v, h, dtype=dtype), torch.randint(0, v, (n,))


CASES = [
    ("width", lambda h, w, y: (h, w[:, :5], y), {}, ValueError, r"hidden width H=8 .* weight \[V, H\] = \(11, 5\)"),
    ("weight 3-D", lambda h, w, y: (h, w[None], y), {}, ValueError, r"weight must be 2-D \[V, H\], got shape \(1, 11, 8\)"),
    ("bias shape", lambda h, w, y: (h, w, y), {"bias": torch.zeros(10)}, ValueError,
     r"bias must be \[V\] = \(11,\), got shape \(10,\)"),
    ("bias dtype", lambda h, w, y: (h, w, y), {"bias": torch.zeros(11, dtype=torch.float64)}, TypeError,
     r"bias must match weight's dtype"),
    ("targets float", lambda h, w, y: (h, w, y.float()), {}, TypeError, r"targets must be an integer tensor, got torch.float32"),
    ("targets bool", lambda h, w, y: (h, w, y > 0), {}, TypeError, r"targets must be an integer tensor, got torch.bool"),
    ("targets shape", lambda h, w, y: (h, w, y[:3]), {}, ValueError,
     r"targets must have the shape of hidden\[\.\.\., 0\] = \(4,\), got \(3,\)"),
    ("dtype mismatch", lambda h, w, y: (h, w.half(), y), {}, TypeError,
     r"weight dtype torch.float16 differs from hidden dtype torch.float32"),
    ("hidden dtype", lambda h, w, y: (h.double(), w.double(), y), {}, TypeError,
     r"hidden must be bfloat16, float16 or float32, got torch.float64"),
    ("hidden int", lambda h, w, y: (h.long(), w, y), {}, TypeError, r"hidden must be bfloat16, float16 or float32"),
    ("hidden not tensor", lambda h, w, y: (h.tolist(), w, y), {}, TypeError, r"hidden must be a torch.Tensor, got list"),
    ("temperature 0", lambda h, w, y: (h, w, y), {"temperature": 0.0}, ValueError,
     r"temperature must be a finite positive number, got 0.0"),
    ("temperature nan", lambda h, w, y: (h, w, y), {"temperature": float("nan")}, ValueError,
     r"temperature must be a finite positive number, got nan"),
    ("temperature str", lambda h, w, y: (h, w, y), {"temperature": "1"}, TypeError,
     r"temperature must be a finite positive number, got str"),
    ("softcap negative", lambda h, w, y: (h, w, y), {"softcap": -3.0}, ValueError,
     r"softcap must be a finite positive number, got -3.0"),
    ("softcap inf", lambda h, w, y: (h, w, y), {"softcap": float("inf")}, ValueError,
     r"softcap must be a finite positive number, got inf"),
    ("backend", lambda h, w, y: (h, w, y), {"backend": "cuda"}, ValueError,
     r"backend must be one of 'auto', 'triton', 'torch'; got 'cuda'"),
    ("ignore_index", lambda h, w, y: (h, w, y), {"ignore_index": 1.5}, TypeError, r"ignore_index must be an int, got float"),
    ("target too big", lambda h, w, y: (h, w, torch.tensor([0, 1, 11, 2])), {}, ValueError,
     r"targets must lie in \[0, 11\) or equal ignore_index=-100; targets\[2\] = 11"),
    ("target negative", lambda h, w, y: (h, w, torch.tensor([0, -1, 3, 2])), {}, ValueError,
     r"targets must lie in \[0, 11\) .* targets\[1\] = -1"),
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
