"""Peak CPU memory of forward+backward, each provider in a fresh process (peak RSS from getrusage).

    python -m bench.memory_cpu                       # SmolLM2 vocabulary, 4096 tokens, fp32, log-prob+entropy
    python -m bench.memory_cpu --model qwen2.5-0.5b --tokens 1024 --op grpo --providers fused-rlvr torch liger

"extra" is the peak RSS during forward+backward minus the RSS before it (fused_rlvr._memory.PeakRSS: inputs
already allocated, and a small warm-up of the same provider already run, so library code pages and
compilation do not count);
"added" subtracts the gradients every method must return (d_hidden, d_weight). Both are reported as a
fraction of the fp32 [N, V] logits, the size the naive path materialises.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

from bench.shapes import CPU_MEMORY_TARGET, MODELS

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def worker(provider: str, model: str, tokens: int, dtype: str, op: str) -> dict:
    import torch

    from bench.ops import Problem
    from bench.shapes import ModelShape
    from fused_rlvr._memory import PeakRSS

    shape = MODELS[model]
    dt = getattr(torch, DTYPES[dtype])
    # warm-up on a small problem of the same kind: code pages, thread pools, torch.compile
    small = Problem(op, ModelShape("warm-up", shape.hidden, 1000, shape.softcap), 128, dt, "cpu", seed=1)
    small.step(provider).backward()
    del small
    prob = Problem(op, shape, tokens, dt, "cpu")
    gc.collect()
    with PeakRSS() as mem:
        prob.step(provider).backward()
    grads = sum(t.grad.numel() * t.grad.element_size() for t in prob.grads(provider))
    logits_fp32 = prob.n_tokens * shape.vocab * 4
    return dict(
        provider=provider,
        model=model,
        tokens=prob.n_tokens,
        dtype=dtype,
        op=op,
        base=mem.base,
        peak=mem.peak,
        extra=mem.extra,
        added=mem.extra - grads,
        grads=grads,
        logits_fp32=logits_fp32,
        extra_frac=mem.extra / logits_fp32,
        added_frac=(mem.extra - grads) / logits_fp32,
    )


def measure(provider: str, model: str, tokens: int, dtype: str, op: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "bench.memory_cpu",
        "--worker",
        provider,
        "--model",
        model,
        "--tokens",
        str(tokens),
        "--dtype",
        dtype,
        "--op",
        op,
    ]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=False,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    if out.returncode != 0:
        if "NotSupported" in out.stderr:
            return {"not_supported": out.stderr.strip().splitlines()[-1]}
        raise RuntimeError(f"{provider} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    from bench.ops import OPS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=CPU_MEMORY_TARGET[0], choices=sorted(MODELS))
    ap.add_argument("--tokens", type=int, default=CPU_MEMORY_TARGET[1])
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--op", default="logprob_entropy", choices=OPS)
    ap.add_argument("--providers", nargs="+", default=["torch", "fused-rlvr"])
    ap.add_argument("--csv", default=None, help="write rows to this CSV (bench.harness format)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.tokens, args.dtype, args.op)))
        return 0
    from bench.harness import Recorder, device_name

    rec = Recorder(device_name("cpu"))
    mib = 1 << 20
    print(
        f"{args.op} fwd+bwd, {args.model}, N={args.tokens}, {args.dtype}; fp32 logits = "
        f"{args.tokens * MODELS[args.model].vocab * 4 / mib:.0f} MiB"
    )
    print(f"{'provider':24s} {'extra MiB':>10s} {'added MiB':>10s} {'added / fp32 logits':>20s}")
    for provider in args.providers:
        r = measure(provider, args.model, args.tokens, args.dtype, args.op)
        if "not_supported" in r:
            print(f"{provider:24s} not supported: {r['not_supported']}")
            continue
        print(f"{provider:24s} {r['extra'] / mib:10.1f} {r['added'] / mib:10.1f} {r['added_frac']:19.2%}")
        shape = f"N={r['tokens']},H={MODELS[args.model].hidden},V={MODELS[args.model].vocab}"
        for metric in ("extra", "added", "added_frac"):
            rec.add(
                args.op,
                provider,
                "fwd+bwd",
                f"cpu_peak_{metric}",
                r[metric],
                x_name="model",
                x=args.model,
                shape=shape,
                dtype=args.dtype,
            )
    if args.csv:
        rec.write(args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
