"""GPU check in one call: correctness of the op and the losses at the target shape, the floor, a sweep.

    python -m bench.gpu_check --out bench/results/<gpu>     # about 1 minute on an H100

Target shape (bench.shapes.GPU_TARGET): N=8192 tokens, H=4096, V=151936, bf16, every row scored.
1. Correctness: ours vs an fp32 ground truth (TF32 off) and the naive bf16 path, for log-probs, entropy,
   d_hidden and d_weight (norm errors and CCE's elementwise rule); GRPO and PACS through the Triton
   epilogue vs plain torch.
2. Ceilings: a bf16 8192^3 GEMM (TFLOP/s) and the bare lm-head GEMM forward+backward of the target shape
   (the floor: 3 GEMMs, 6 N H V flops).
3. A sweep of the kernels' tile configs and the backward's vocabulary chunk (ours, no-grad and fwd+bwd).
Every provider side by side (timings, memory, scaling) is bench.run's job.
Writes gpu_check.csv (bench.harness format) and summary.json under --out; prints a table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

import torch

from bench.harness import Recorder, device_name, time_fn, versions
from bench.providers import PROVIDERS
from bench.shapes import GPU_TARGET, MODELS
from fused_rlvr.kernels import configs
from fused_rlvr.reference import reference_logprobs

MIB = 1 << 20
DEV = "cuda"  # --device cpu runs the same code at a small shape: a smoke test before using a GPU


def make_inputs(n, shape, dtype, seed=0, ignore_frac=0.02):
    g = torch.Generator(device=DEV).manual_seed(seed)
    h = torch.randn(n, shape.hidden, device=DEV, generator=g, dtype=torch.float32)
    w = torch.randn(shape.vocab, shape.hidden, device=DEV, generator=g, dtype=torch.float32)
    # logits with std ~2.5: a realistic spread (peaked for some rows, flat for others)
    h.mul_(2.5 / shape.hidden**0.5)
    y = torch.randint(0, shape.vocab, (n,), device=DEV, generator=g)
    y[torch.rand(n, device=DEV, generator=g) < ignore_frac] = -100
    return h.to(dtype), w.to(dtype), y


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def grads_of(fn, h, w, y, g_lp, g_ent, **kw):
    hh = h.detach().clone().requires_grad_()
    ww = w.detach().clone().requires_grad_()
    lp, ent = fn(hh, ww, y, **kw)
    loss = (lp.float() * g_lp).sum() + ((ent.float() * g_ent).sum() if ent is not None else 0.0)
    loss.backward()
    return lp.detach().float(), None if ent is None else ent.detach().float(), hh.grad, ww.grad


def check_correctness(rec, summary, shape, n):
    h, w, y = make_inputs(n, shape, torch.bfloat16, seed=1)
    g = torch.Generator(device=DEV).manual_seed(2)
    g_lp = torch.randn(n, device=DEV, generator=g)
    g_ent = torch.randn(n, device=DEV, generator=g)
    ours = grads_of(PROVIDERS["fused-rlvr"], h, w, y, g_lp, g_ent)
    torch.backends.cuda.matmul.allow_tf32 = False
    gt = grads_of(lambda a, b, t: reference_logprobs(a, b, t), h.float(), w.float(), y, g_lp, g_ent)
    gt = tuple(t.float() for t in gt)
    _empty_cache()
    naive = grads_of(lambda a, b, t: reference_logprobs(a, b, t), h, w, y, g_lp, g_ent)
    out = {}
    for name, o, r, nv in zip(("logprobs", "entropy", "d_hidden", "d_weight"), ours, gt, naive):
        o, nv = o.float(), nv.float()
        slack = (r - nv).abs() + 2**-7 * r.abs().max()
        violations = ((r - o).abs() > slack).float().mean().item()
        out[name] = dict(
            ours_rel_err=rel(o, r),
            naive_bf16_rel_err=rel(nv, r),
            cce_rule_violation_frac=violations,
            finite=bool(torch.isfinite(o).all()),
        )
        for metric, value in out[name].items():
            rec.add(
                "logprob_entropy",
                "fused-rlvr",
                "fwd+bwd",
                f"{name}_{metric}",
                float(value),
                x_name="N",
                x=n,
                shape=f"H={shape.hidden},V={shape.vocab}",
                dtype="bf16",
            )
    out["passed"] = all(
        v["finite"]
        and v["ours_rel_err"] <= 1.05 * v["naive_bf16_rel_err"] + 1e-3
        and v["cce_rule_violation_frac"] == 0
        for v in out.values()
    )
    summary["correctness"] = out
    del h, w, y, ours, gt, naive
    _empty_cache()


def check_losses(rec, summary, shape, n):
    """GRPO (dapo, k3, dual clip, entropy bonus; cispo, sapo, ratio cap, pg_weights, sequence-mean,
    ratio-weighted KL) and PACS through the Triton epilogue vs plain torch, bf16."""
    from fused_rlvr import linear_grpo_loss, linear_pacs_loss
    from fused_rlvr.grpo import GRPOParams, grpo_token_loss_torch
    from fused_rlvr.pacs import pacs_loss_from_scores

    seq = 512
    b = n // seq
    h, w, y = make_inputs(n, shape, torch.bfloat16, seed=4, ignore_frac=0.0)
    h = h.view(b, seq, shape.hidden)
    y = y.view(b, seq)
    g = torch.Generator(device=DEV).manual_seed(5)
    mask = torch.rand(b, seq, device=DEV, generator=g) > 0.1
    adv = torch.randn(b, device=DEV, generator=g)
    with torch.no_grad():
        lp0 = reference_logprobs(h.float(), w.float(), torch.where(mask, y, -100))[0]
    old = lp0 + 0.2 * torch.randn(b, seq, device=DEV, generator=g)
    ref = lp0 + 0.2 * torch.randn(b, seq, device=DEV, generator=g)
    rewards = (torch.rand(b, device=DEV, generator=g) > 0.5).float()
    groups = torch.arange(b, device=DEV) // 4
    out = {}

    def grads(fn):
        hh = h.detach().clone().requires_grad_()
        ww = w.detach().clone().requires_grad_()
        loss = fn(hh, ww)
        loss.backward()
        return loss.detach().double(), hh.grad, ww.grad

    def errors(a, b):
        return {
            "loss_rel_err": abs((a[0] - b[0]) / b[0]).item(),
            "d_hidden_rel_err": rel(a[1], b[1]),
            "d_weight_rel_err": rel(a[2], b[2]),
        }

    def ref_lp(hh, ww):
        z = (hh.float() @ ww.float().T).log_softmax(-1)
        lp = z.gather(-1, y[..., None])[..., 0]
        return lp, -(z.exp() * z).sum(-1)

    kw = dict(eps_low=0.2, eps_high=0.28, dual_clip=3.0, beta=0.04, kl="k3", entropy_coef=0.001)
    ours = grads(
        lambda hh, ww: linear_grpo_loss(
            hh, ww, y, adv, mask, old_logprobs=old, ref_logprobs=ref, agg="dapo", **kw
        )[0]
    )
    m = mask.float()

    def torch_grpo(hh, ww):
        lp, ent = ref_lp(hh, ww)
        params = GRPOParams(**kw)
        return grpo_token_loss_torch(lp, ent, old, ref, adv, m, None, params, 1.0 / float(m.sum()))[0]

    torch.backends.cuda.matmul.allow_tf32 = False
    gt = grads(torch_grpo)
    out["grpo"] = errors(ours, gt)
    # the other policy losses and weights through the Triton epilogue vs the torch one
    pgw = torch.exp(0.1 * torch.randn(b, seq, device=DEV, generator=g)).clamp(max=2.0)
    variants = {
        "grpo_cispo": dict(policy_loss="cispo", eps_high=5.0, beta=0.04, kl_ratio_weighted=True),
        "grpo_sapo_seq": dict(
            policy_loss="sapo", importance="sequence-mean", beta=0.04, kl_ratio_weighted=True
        ),
        "grpo_cap_pgw": dict(ratio_cap=1.1, dual_clip=3.0, eps_high=0.28, beta=0.04, kl_clamp=None),
    }
    for name, vkw in variants.items():
        ours = grads(
            lambda hh, ww, vkw=vkw: linear_grpo_loss(
                hh, ww, y, adv, mask, old_logprobs=old, ref_logprobs=ref, agg="dapo", pg_weights=pgw, **vkw
            )[0]
        )

        def torch_variant(hh, ww, vkw=vkw):
            lp, ent = ref_lp(hh, ww)
            params = GRPOParams(**vkw)
            return grpo_token_loss_torch(lp, ent, old, ref, adv, m, None, params, 1.0 / float(m.sum()), pgw)[
                0
            ]

        out[name] = errors(ours, grads(torch_variant))
    ours = grads(lambda hh, ww: linear_pacs_loss(hh, ww, y, rewards, mask, groups, old_logprobs=old)[0])
    gt = grads(
        lambda hh, ww: pacs_loss_from_scores(((ref_lp(hh, ww)[0] - old) * m).sum(1), rewards, groups)[0]
    )
    out["pacs"] = errors(ours, gt)
    torch.backends.cuda.matmul.allow_tf32 = True
    for op, vals in out.items():
        for metric, v in vals.items():
            rec.add(op, "fused-rlvr", "fwd+bwd", metric, v, x_name="N", x=n, dtype="bf16")
    out["passed"] = all(
        v["loss_rel_err"] < 1e-2 and v["d_hidden_rel_err"] < 2e-2 and v["d_weight_rel_err"] < 2e-2
        for v in out.values()
    )
    summary["losses"] = out


def gemm_ceiling(rec, summary):
    size = 8192 if DEV == "cuda" else 512
    a = torch.randn(size, size, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=DEV, dtype=torch.bfloat16)
    t = time_fn(lambda: a @ b, DEV)
    tflops = 2 * size**3 / (t.median_ms * 1e-3) / 1e12
    rec.add("gemm", "cublas", "fwd", "tflops", tflops, x_name="size", x=size, dtype="bf16")
    summary["gemm_8192_tflops"] = tflops


def bare_gemm(rec, summary, shape, n, h, w):
    g = torch.randn(n, shape.vocab, device=DEV, dtype=h.dtype)
    fwd = time_fn(lambda: h @ w.T, DEV)
    full = time_fn(lambda: (h @ w.T, g @ w, g.T @ h), DEV)
    flops = 6 * n * shape.hidden * shape.vocab
    tag = f"H={shape.hidden},V={shape.vocab}"
    rec.add(
        "lm_head_gemm", "cublas", "fwd", "median_ms", fwd.median_ms, x_name="N", x=n, shape=tag, dtype="bf16"
    )
    rec.add(
        "lm_head_gemm",
        "cublas",
        "fwd+bwd",
        "median_ms",
        full.median_ms,
        x_name="N",
        x=n,
        shape=tag,
        dtype="bf16",
    )
    summary["lm_head_gemm"] = {
        "fwd_ms": fwd.median_ms,
        "fwd+bwd_ms": full.median_ms,
        "fwd+bwd_tflops": flops / (full.median_ms * 1e-3) / 1e12,
    }
    return full.median_ms


def sweep(rec, summary, shape, n, h, w, y, full=False):
    """Time ours fwd+bwd under each tile config and vocabulary chunk; keep the defaults afterwards."""
    prov = PROVIDERS["fused-rlvr"]
    hh = h.detach().requires_grad_()
    ww = w.detach().requires_grad_()
    g_lp = torch.randn(n, device=DEV)
    g_ent = torch.randn(n, device=DEV)
    out = {}
    saved = (configs.FWD_GPU, configs.BWD_GPU, configs.BWD_VOCAB_CHUNK)

    def timed(label):
        def fwd():
            return prov(hh, ww, y)

        def full():
            lp, ent = fwd()
            return torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), (hh, ww))

        try:
            with torch.no_grad():
                t_fwd = time_fn(fwd, DEV, budget_ms=200)
            t_full = time_fn(full, DEV, budget_ms=200)
            out[label] = {"nograd_fwd_ms": t_fwd.median_ms, "fwd+bwd_ms": t_full.median_ms}
            rec.add("sweep", "fused-rlvr", "nograd", "median_ms", t_fwd.median_ms, x_name="config", x=label)
            rec.add("sweep", "fused-rlvr", "fwd+bwd", "median_ms", t_full.median_ms, x_name="config", x=label)
        except Exception as e:  # noqa: BLE001 - a config that does not fit the GPU is reported, not fatal
            out[label] = {"error": repr(e)[:300]}

    try:
        for cfg in configs.FWD_CANDIDATES if full else configs.FWD_CANDIDATES[:2]:
            configs.FWD_GPU = cfg
            timed("fwd " + json.dumps(dataclasses.asdict(cfg)))
        configs.FWD_GPU = saved[0]
        for cfg in configs.BWD_CANDIDATES if full else configs.BWD_CANDIDATES[:2]:
            configs.BWD_GPU = cfg
            timed("bwd " + json.dumps(dataclasses.asdict(cfg)))
        configs.BWD_GPU = saved[1]
        for chunk in (1024, 4096, 8192) if full else (4096,):
            configs.BWD_VOCAB_CHUNK = chunk
            timed(f"chunk {chunk}")
    finally:
        configs.FWD_GPU, configs.BWD_GPU, configs.BWD_VOCAB_CHUNK = saved
    summary["sweep"] = out


def _empty_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()


def section(summary, name, fn, *args):
    t0 = time.time()
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - one broken section must not hide the others' results
        summary.setdefault("errors", {})[name] = traceback.format_exc()[-3000:]
        print(f"[{name}] FAILED\n{summary['errors'][name]}", flush=True)
    print(f"[{name}] {time.time() - t0:.1f}s", flush=True)
    _empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results/gpu"))
    ap.add_argument("--model", default=GPU_TARGET[0], choices=sorted(MODELS))
    ap.add_argument("--tokens", type=int, default=GPU_TARGET[1])
    ap.add_argument("--skip", nargs="*", default=[], help="sections to skip: correctness losses sweep")
    ap.add_argument("--full-sweep", action="store_true", help="every tile candidate, chunks 1024/4096/8192")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args(argv)
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        print("gpu_check needs a CUDA device (or --device cpu for a smoke test)", file=sys.stderr)
        return 2
    shape, n = MODELS[args.model], args.tokens
    rec = Recorder(device_name(DEV))
    summary = {"device": device_name(DEV), "versions": versions(), "shape": dataclasses.asdict(shape), "N": n}
    print(summary["device"], summary["versions"], flush=True)
    t_start = time.time()
    if "correctness" not in args.skip:
        section(summary, "correctness", check_correctness, rec, summary, shape, n)
    if "losses" not in args.skip:
        section(summary, "losses", check_losses, rec, summary, shape, n)
    section(summary, "gemm_ceiling", gemm_ceiling, rec, summary)
    torch.backends.cuda.matmul.allow_tf32 = True
    h, w, y = make_inputs(n, shape, torch.bfloat16, seed=3, ignore_frac=0.0)
    section(summary, "bare_gemm", bare_gemm, rec, summary, shape, n, h, w)
    if "sweep" not in args.skip:
        section(summary, "sweep", sweep, rec, summary, shape, n, h, w, y, args.full_sweep)
    summary["wall_s"] = time.time() - t_start
    os.makedirs(args.out, exist_ok=True)
    rec.write(os.path.join(args.out, "gpu_check.csv"))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print_table(summary)
    ok = all(summary.get(k, {}).get("passed", True) for k in ("correctness", "losses"))
    return 0 if ok and "errors" not in summary else 1


def print_table(summary):
    shape = summary["shape"]
    print(f"\n== {summary['device']}  N={summary['N']} H={shape['hidden']} V={shape['vocab']}")
    if "correctness" in summary:
        c = summary["correctness"]
        print(f"correctness passed={c['passed']}")
        for k, v in c.items():
            if isinstance(v, dict):
                print(
                    f"  {k:10s} ours {v['ours_rel_err']:.2e}  naive-bf16 {v['naive_bf16_rel_err']:.2e}  "
                    f"rule-violations {v['cce_rule_violation_frac']:.1e}"
                )
    if "losses" in summary:
        print(
            f"losses passed={summary['losses']['passed']}: "
            + "; ".join(
                f"{k} " + " ".join(f"{m}={v:.1e}" for m, v in vals.items())
                for k, vals in summary["losses"].items()
                if isinstance(vals, dict)
            )
        )
    floor = summary.get("lm_head_gemm", {}).get("fwd+bwd_ms")
    if "gemm_8192_tflops" in summary:
        print(
            f"bf16 GEMM ceiling {summary['gemm_8192_tflops']:.0f} TFLOP/s; "
            f"lm-head GEMM fwd+bwd floor {floor} ms"
        )
    for k, v in summary.get("sweep", {}).items():
        print(f"  sweep {k}: {v}")
    for k in summary.get("errors", {}):
        print(f"  ERROR in {k}")


if __name__ == "__main__":
    sys.exit(main())
