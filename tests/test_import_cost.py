"""`import fused_rlvr` costs little more than `import torch`: the compiler stack (torch._dynamo, sympy),
Triton, transformers / TRL and the trainer load only when something uses them."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = (
    "torch._dynamo",
    "torch._inductor",
    "sympy",
    "triton",
    "transformers",
    "trl",
    "peft",
    "fused_rlvr.train",
    "fused_rlvr.integrations",
    "fused_rlvr.fsdp",
)

_PROBE = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import fused_rlvr
t2 = time.perf_counter()
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print(json.dumps({{"torch": t1 - t0, "fused_rlvr": t2 - t1, "heavy": heavy}}))
"""


def _probe() -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=HEAVY)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_loads_no_heavy_module():
    assert _probe()["heavy"] == []


def test_import_costs_little_more_than_torch():
    """The best of three fresh processes (a busy machine slows single runs): fused-rlvr's own import adds
    under half of torch's import time, and under a second."""
    runs = [_probe() for _ in range(3)]
    extra = min(r["fused_rlvr"] for r in runs)
    torch_time = min(r["torch"] for r in runs)
    assert extra < min(0.5 * torch_time, 1.0), runs


def test_the_public_names_work_after_a_plain_import():
    code = (
        "import torch, fused_rlvr; h = torch.randn(3, 4); w = torch.randn(5, 4); y = torch.tensor([0, 4, -100]);"
        "lp, ent = fused_rlvr.linear_logprobs(h, w, y); print(lp.shape[0], sorted(fused_rlvr.__all__) == "
        "sorted(n for n in fused_rlvr.__all__ if hasattr(fused_rlvr, n)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["3", "True"]
