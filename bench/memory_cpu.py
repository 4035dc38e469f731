"""Peak CPU memory of forward+backward, each provider in a fresh process (peak RSS from getrusage).

    python -m bench.memory_cpu                       # SmolLM2 vocabulary, 4096 tokens, fp32
    python -m bench.memory_cpu --model qwen2.5-7b --tokens 1024 --providers fused-rlvr torch

"extra" is the peak RSS during forward+backward minus the RSS before it (inputs already allocated);
"added" subtracts the gradients every method must return (d_hidden, d_weight). Both are reported as a
fraction of the fp32 [N, V] logits, the size the naive path materialises.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys

from bench.shapes import CPU_MEMORY_TARGET, MODELS

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def worker(provider: str, model: str, tokens: int, dtype: str, op: str) -> dict:
    import torch

    from bench.providers import PROVIDERS

    torch.manual_seed(0)
    shape = MODELS[model]
    dt = getattr(torch, DTYPES[dtype])
    # in place, in the final dtype: no transient copy may set an earlier peak than the one measured
    hidden = torch.randn(tokens, shape.hidden, dtype=dt).div_(shape.hidden**0.25).requires_grad_()
    weight = torch.randn(shape.vocab, shape.hidden, dtype=dt).div_(shape.hidden**0.25).requires_grad_()
    targets = torch.randint(0, shape.vocab, (tokens,))
    g_lp, g_ent = torch.randn(tokens), torch.randn(tokens)
    fn = PROVIDERS[provider]
    entropy = op == "logprob_entropy"

    def step(h, w, y):
        lp, ent = fn(h, w, y, softcap=shape.softcap, entropy=entropy)
        loss = (lp * g_lp[: y.numel()]).sum() + ((ent * g_ent[: y.numel()]).sum() if entropy else 0.0)
        loss.backward()

    # Warm up on a small problem of the same kind: library code pages, thread pools and compilation
    # (torch.compile) are first touched there, so the peak below is the provider's working memory.
    small_w = weight[:1000].detach().clone().requires_grad_()
    step(hidden[:256].detach().clone().requires_grad_(), small_w, targets[:256] % 1000)
    del small_w
    gc.collect()
    base = _rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step(hidden, weight, targets)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grads = sum(t.grad.numel() * t.grad.element_size() for t in (hidden, weight))
    logits_fp32 = tokens * shape.vocab * 4
    floor = max(base, peak_before)  # an earlier transient peak (imports) would hide a smaller one
    extra = peak - floor
    return dict(provider=provider, model=model, tokens=tokens, dtype=dtype, op=op, base=base,
                peak_before=peak_before, peak=peak, extra=extra, added=extra - grads, grads=grads,
                logits_fp32=logits_fp32, extra_frac=extra / logits_fp32,
                added_frac=(extra - grads) / logits_fp32,
                masked_by_earlier_peak=peak_before > base + extra)


def measure(provider: str, model: str, tokens: int, dtype: str, op: str) -> dict:
    cmd = [sys.executable, "-m", "bench.memory_cpu", "--worker", provider, "--model", model,
           "--tokens", str(tokens), "--dtype", dtype, "--op", op]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode != 0:
        if "NotSupported" in out.stderr:
            return {"not_supported": out.stderr.strip().splitlines()[-1]}
        raise RuntimeError(f"{provider} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=CPU_MEMORY_TARGET[0], choices=sorted(MODELS))
    ap.add_argument("--tokens", type=int, default=CPU_MEMORY_TARGET[1])
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--op", default="logprob_entropy", choices=["logprob", "logprob_entropy"])
    ap.add_argument("--providers", nargs="+", default=["torch", "fused-rlvr"])
    ap.add_argument("--csv", default=None, help="append rows to this CSV (bench.harness format)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.tokens, args.dtype, args.op)))
        return 0
    from bench.harness import Recorder, device_name

    rec = Recorder(device_name("cpu"))
    mib = 1 << 20
    print(f"{args.op} fwd+bwd, {args.model}, N={args.tokens}, {args.dtype}; fp32 logits = "
          f"{args.tokens * MODELS[args.model].vocab * 4 / mib:.0f} MiB")
    print(f"{'provider':24s} {'extra MiB':>10s} {'added MiB':>10s} {'added / fp32 logits':>20s}")
    for provider in args.providers:
        r = measure(provider, args.model, args.tokens, args.dtype, args.op)
        if "not_supported" in r:
            print(f"{provider:24s} not supported: {r['not_supported']}")
            continue
        print(f"{provider:24s} {r['extra'] / mib:10.1f} {r['added'] / mib:10.1f} {r['added_frac']:19.2%}"
              + ("  (masked by an earlier peak)" if r["masked_by_earlier_peak"] else ""))
        shape = f"N={args.tokens},H={MODELS[args.model].hidden},V={MODELS[args.model].vocab}"
        for metric in ("extra", "added", "added_frac"):
            rec.add(args.op, provider, "fwd+bwd", f"cpu_peak_{metric}", r[metric], x_name="model",
                    x=args.model, shape=shape, dtype=args.dtype)
    if args.csv:
        rec.write(args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
