"""All providers side by side: speed, memory and scaling of every op, on CPU or GPU, in one run.

    python -m bench.run --device cpu  --out bench/results/cpu      # ~20 min on 2 cores
    python -m bench.run --device cuda --out $OUT                   # ~3 min on an H100
    python -m bench.run --device cpu --sections target epilogue --ops grpo grpo_cispo grpo_sapo \
        grpo_pg_weights grpo_kl_ratio --target-model smollm2-135m --target-tokens 512 --no-memory
                                                                   # the GRPO variants against ppo

Sections (--sections):
  target   each op (logprob, logprob_entropy, grpo and its variants, pacs, and the per-token temperature
           and LoRA variants of logprob_entropy: see bench.ops) x provider at the device's target shape
           (GPU: N=8192, H=4096, V=151936, bf16; CPU: N=1024, H=896, V=151936, fp32; or --target-model /
           --target-tokens): modes fwd+bwd and
           fwd for every provider, plus bwd and no-grad for ours; 1/8 of each sequence is a masked prompt
           (as in RL: those rows are not scored); peak extra memory (CUDA allocator, or a fresh process's
           peak RSS on CPU); the bare lm-head GEMM forward+backward of the same shape (the floor).
  scaling  log-prob+entropy, ours vs plain torch: time and memory against tokens, and against the
           vocabularies of real models.
  epilogue the per-token GRPO loss epilogue alone (16 x 512 tokens, no lm-head), forward + gradient, for
           plain ppo and each of bench.ops.GRPO_VARIANTS (cispo, sapo, pg_weights, ratio-weighted KL) in the
           same run: torch, and the Triton kernel on GPU. The target section times the same variants through
           the whole fused loss (ops grpo_*).
  paired   the variants' cost ratios (per-token / float temperature; fused LoRA / the same op without
           the adapter, / the op on a merged W + s B A, / PEFT on materialised logits; each GRPO variant /
           plain ppo, whole fused loss) at the target shape, timed in interleaved rounds (every contender
           once per round, in rotated order) so that a load change on a shared machine hits both sides of a
           ratio: median and p20/p80 of the per-round ratios.
Rows go to results.csv (bench.harness format: ratios are derived from rows of the same run); `python -m
bench.plot DIR` draws them. Timings are medians with p20/p80; on CPU compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch

from bench.harness import Recorder, cuda_peak_extra, device_name, time_fn, versions
from bench.ops import GRPO_BASE, GRPO_VARIANTS, OP_PROVIDERS, OPS, Problem
from bench.providers import NotSupported, available
from bench.shapes import (
    CPU_TARGET,
    CPU_TOKEN_GRID,
    CPU_VOCAB_MODELS,
    GPU_TARGET,
    GPU_TOKEN_GRID,
    GPU_VOCAB_MODELS,
    MODELS,
    ModelShape,
)


class Bench:
    def __init__(self, device: str, out: str, quick: bool):
        self.device, self.out, self.quick = device, out, quick
        self.cuda = device == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.rec = Recorder(device_name(device))
        self.summary = {"device": device_name(device), "versions": versions(), "results": {}}
        self.budget = 300.0 if self.cuda else 0.0
        self.reps = dict(warmup=1, rep=2 if quick else 3)

    def timing(self, fn):
        if self.cuda:
            return time_fn(fn, "cuda", budget_ms=self.budget)
        return time_fn(fn, "cpu", **self.reps)

    def memory(self, prob: Problem, provider: str, model: str) -> float | None:
        if self.cuda:
            prob.hidden.grad = prob.weight.grad = None

            def full():
                loss = prob.step(provider)
                return torch.autograd.grad(loss, prob.grads(provider))

            grads = sum(t.numel() * t.element_size() for t in prob.grads(provider))
            return float(cuda_peak_extra(full, "cuda") - grads)
        from bench.memory_cpu import measure

        r = measure(provider, model, prob.n_tokens, "fp32", prob.op)
        return None if "not_supported" in r else float(r["added"])

    def gemm_floor(self, shape: ModelShape, n: int) -> float:
        h = torch.randn(n, shape.hidden, device=self.device, dtype=self.dtype)
        w = torch.randn(shape.vocab, shape.hidden, device=self.device, dtype=self.dtype)
        g = torch.randn(n, shape.vocab, device=self.device, dtype=self.dtype)
        t = self.timing(lambda: (h @ w.T, g @ w, g.T @ h))
        tag = f"N={n},H={shape.hidden},V={shape.vocab}"
        flops = 6 * n * shape.hidden * shape.vocab
        self.rec.add(
            "lm_head_gemm",
            "torch",
            "fwd+bwd",
            "median_ms",
            t.median_ms,
            x_name="model",
            x=shape.name,
            shape=tag,
            dtype=str(self.dtype),
        )
        self.rec.add(
            "lm_head_gemm",
            "torch",
            "fwd+bwd",
            "tflops",
            flops / t.median_ms / 1e9,
            x_name="model",
            x=shape.name,
            shape=tag,
            dtype=str(self.dtype),
        )
        return t.median_ms

    def one(self, op, provider, shape, n, *, modes=("fwd+bwd",), mem=True, x_name="model", x=None):
        """Time (and measure) one op/provider; returns {mode: median ms, 'added_bytes': ...} or None."""
        prob = Problem(op, shape, n, self.dtype, self.device)
        tag = f"N={prob.n_tokens},H={shape.hidden},V={shape.vocab}"
        x = shape.name if x is None else x
        res = {}
        try:
            prob.step(provider)  # warm-up / compile; raises NotSupported early
        except NotSupported as e:
            self.summary.setdefault("not_supported", {})[f"{op}/{provider}"] = str(e)
            return None

        def full():
            return torch.autograd.grad(prob.step(provider), prob.grads(provider))

        retained = {}

        def bwd():
            if "loss" not in retained:
                retained["loss"] = prob.step(provider)
            return torch.autograd.grad(retained["loss"], prob.grads(provider), retain_graph=True)

        for mode in modes:
            fn = {
                "fwd+bwd": full,
                "fwd": lambda: prob.step(provider),
                "bwd": bwd,
                "nograd": lambda: prob.step(provider, grad=False),
            }[mode]
            t = self.timing(fn)
            res[mode] = t.median_ms
            for metric in ("median_ms", "p20_ms", "p80_ms"):
                self.rec.add(
                    op,
                    provider,
                    mode,
                    metric,
                    getattr(t, metric),
                    x_name=x_name,
                    x=x,
                    shape=tag,
                    dtype=str(self.dtype),
                )
        if mem:
            added = self.memory(prob, provider, shape.name)
            if added is not None:
                logits = prob.n_tokens * shape.vocab * 4
                res["added_over_fp32_logits"] = added / logits
                self.rec.add(
                    op,
                    provider,
                    "fwd+bwd",
                    "added_bytes",
                    added,
                    x_name=x_name,
                    x=x,
                    shape=tag,
                    dtype=str(self.dtype),
                )
                self.rec.add(
                    op,
                    provider,
                    "fwd+bwd",
                    "added_over_fp32_logits",
                    added / logits,
                    x_name=x_name,
                    x=x,
                    shape=tag,
                    dtype=str(self.dtype),
                )
        prob.hidden.grad = prob.weight.grad = None
        if self.cuda:
            torch.cuda.empty_cache()
        return res

    def guarded(self, name, fn, *args, **kw):
        t0 = time.time()
        try:
            return fn(*args, **kw)
        except Exception:  # noqa: BLE001 - report and continue: one failure must not hide the rest
            self.summary.setdefault("errors", {})[name] = traceback.format_exc()[-2500:]
            print(f"[{name}] FAILED\n{self.summary['errors'][name]}", flush=True)
        finally:
            print(f"[{name}] {time.time() - t0:.1f}s", flush=True)
            self.write()  # rows so far survive a run cut short by a time limit

    def target(self, ops, model=None, n=None, mem=True):
        """Each op x provider at the device's target shape (or `model` / `n` tokens when given)."""
        default = GPU_TARGET if self.cuda else CPU_TARGET
        model, n = model or default[0], n or default[1]
        shape = MODELS[model]
        floor = self.guarded("gemm_floor", self.gemm_floor, shape, n)
        self.summary["target"] = {"model": model, "tokens": n, "gemm_floor_ms": floor}
        for op in ops:
            for provider in OP_PROVIDERS[op]:
                if not available(provider):
                    continue
                ours = provider == "fused-rlvr"
                modes = ("fwd+bwd", "fwd", "bwd", "nograd") if ours else ("fwd+bwd", "fwd")
                r = self.guarded(f"{op}/{provider}", self.one, op, provider, shape, n, modes=modes, mem=mem)
                if r:
                    if floor:
                        r["x_floor"] = r["fwd+bwd"] / floor
                    self.summary["results"][f"{op}/{provider}"] = r
        self.summary["variants"] = variant_costs(self.summary["results"])

    def paired(self, rounds: int, model=None, n=None):
        """The variants' cost ratios (PAIRED_RATIOS) at the device's target shape (or `model` / `n` tokens
        when given): per group, every (op, provider) once per round in rotated order, forward + backward."""
        default = GPU_TARGET if self.cuda else CPU_TARGET
        model, n = model or default[0], n or default[1]
        shape = MODELS[model]
        out = self.summary.setdefault("paired", {})
        for group, contenders in PAIRED_GROUPS.items():
            probs = {op: Problem(op, shape, n, self.dtype, self.device) for op, _ in contenders}

            def full(contender, probs=probs):
                op, provider = contender
                return torch.autograd.grad(probs[op].step(provider), probs[op].grads(provider))

            for contender in contenders:  # warm-up (compilation, allocator)
                full(contender)
            times = {contender: [] for contender in contenders}
            for r in range(rounds):
                order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
                for contender in order:
                    if self.cuda:
                        t = time_fn(lambda c=contender: full(c), "cuda", budget_ms=self.budget).median_ms
                    else:
                        t = time_fn(lambda c=contender: full(c), "cpu", warmup=0, rep=1).median_ms
                    times[contender].append(t)
            tag = f"N={next(iter(probs.values())).n_tokens},H={shape.hidden},V={shape.vocab}"
            for key, num, den in PAIRED_RATIOS:
                if num not in times or den not in times:
                    continue
                ratios = sorted(a / b for a, b in zip(times[num], times[den]))
                q = statistics.quantiles(ratios, n=5, method="inclusive") if len(ratios) > 1 else ratios * 4
                out[key] = dict(median=statistics.median(ratios), p20=q[0], p80=q[3], rounds=len(ratios))
                for metric, value in (
                    ("ratio_median", out[key]["median"]),
                    ("ratio_p20", q[0]),
                    ("ratio_p80", q[3]),
                ):
                    self.rec.add(
                        group,
                        f"{'/'.join(num)} / {'/'.join(den)}",
                        "fwd+bwd",
                        metric,
                        value,
                        x_name="model",
                        x=shape.name,
                        shape=tag,
                        dtype=str(self.dtype),
                    )
            self.write()

    def scaling(self):
        model, n = GPU_TARGET if self.cuda else CPU_TARGET
        grid = GPU_TOKEN_GRID if self.cuda else CPU_TOKEN_GRID
        vocab_models = GPU_VOCAB_MODELS if self.cuda else CPU_VOCAB_MODELS
        if self.quick:
            grid = grid[:2]
        elif self.cuda:
            grid = grid[::2]  # 1024, 4096, 16384: keeps the GPU call within its time limit
        out = self.summary.setdefault("scaling", {})
        for provider in ("fused-rlvr", "torch"):
            for tokens in grid:
                r = self.guarded(
                    f"scale-tokens/{provider}/{tokens}",
                    self.one,
                    "logprob_entropy",
                    provider,
                    MODELS[model],
                    tokens,
                    x_name="tokens",
                    x=tokens,
                    mem=True,
                )
                out[f"tokens/{provider}/{tokens}"] = r
            for vm in vocab_models:
                # the target's hidden size with each model's vocabulary (and softcap): only V varies
                shape = ModelShape(vm, MODELS[model].hidden, MODELS[vm].vocab, MODELS[vm].softcap)
                r = self.guarded(
                    f"scale-vocab/{provider}/{vm}",
                    self.one,
                    "logprob_entropy",
                    provider,
                    shape,
                    n // 2 if not self.cuda else n,
                    x_name="vocab",
                    x=shape.vocab,
                    mem=True,
                )
                out[f"vocab/{provider}/{shape.vocab}"] = r

    def epilogue(self):
        """Time the per-token GRPO epilogue (loss and d loss / d lp) of plain ppo and of each variant."""
        from fused_rlvr._kernels import kernel_module
        from fused_rlvr.grpo import GRPOParams, grpo_token_loss_torch

        b, t = 16, 512
        dev = self.device
        g = torch.Generator(device=dev).manual_seed(0)
        lp = (-torch.rand(b, t, generator=g, device=dev) * 8).requires_grad_()
        old = lp.detach() + 0.1 * torch.randn(b, t, generator=g, device=dev)
        ref = lp.detach() + 0.1 * torch.randn(b, t, generator=g, device=dev)
        adv = torch.randn(b, generator=g, device=dev)
        mask = torch.ones(b, t, device=dev)
        mask[:, : t // 8] = 0
        pgw = torch.exp(0.05 * torch.randn(b, t, generator=g, device=dev)).clamp(max=2.0)
        inv = 1.0 / float(mask.sum())
        out = self.summary.setdefault("epilogue", {})
        for provider in ("torch", "triton") if self.cuda else ("torch",):
            for variant in ("grpo", *GRPO_VARIANTS):
                kw = dict(GRPO_BASE, **GRPO_VARIANTS.get(variant, {}))
                weights = pgw if kw.pop("pg_weights", None) else None
                params = GRPOParams(**kw)

                def fn(params=params, weights=weights, provider=provider):
                    if provider == "torch":
                        loss, _ = grpo_token_loss_torch(
                            lp, None, old, ref, adv, mask, None, params, inv, weights
                        )
                        return torch.autograd.grad(loss, lp)
                    return kernel_module("grpo_loss", False).grpo_token_loss(
                        lp.detach(),
                        None,
                        old,
                        ref,
                        adv,
                        mask,
                        None,
                        weights,
                        policy_loss=params.policy_loss,
                        eps_low=params.eps_low,
                        eps_high=params.eps_high,
                        dual_clip=None,
                        beta=params.beta,
                        kl=params.kl,
                        kl_ratio_weighted=params.kl_ratio_weighted,
                        entropy_coef=0.0,
                        inv_divisor=inv,
                        seq_mean=False,
                        clamp=params.log_ratio_clamp,
                        interpret=False,
                    )

                timing = self.timing(fn)
                for metric in ("median_ms", "p20_ms", "p80_ms"):
                    self.rec.add(
                        "grpo_epilogue",
                        f"fused-rlvr-{provider}",
                        "fwd+bwd",
                        metric,
                        getattr(timing, metric),
                        x_name="variant",
                        x=variant,
                        shape=f"B={b},T={t}",
                        dtype="torch.float32",
                    )
                out[f"{provider}/{variant}"] = timing.median_ms

    def write(self):
        os.makedirs(self.out, exist_ok=True)
        self.rec.write(os.path.join(self.out, "results.csv"))
        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump(self.summary, f, indent=1)


# Groups timed in interleaved rounds by the paired section: (op, provider) pairs of bench.ops.
PAIRED_GROUPS = {
    "temperature": [("temperature", p) for p in OP_PROVIDERS["temperature"]],
    "lora": [("lora", p) for p in OP_PROVIDERS["lora"]],
    "grpo": [(op, "fused-rlvr") for op in ("grpo", *GRPO_VARIANTS)],
}
PAIRED_RATIOS = (  # (name, numerator (op, provider), denominator (op, provider))
    (
        "temperature: per-token / float",
        ("temperature", "fused-rlvr-token-temperature"),
        ("temperature", "fused-rlvr"),
    ),
    ("lora: fused / same op without adapter", ("lora", "fused-rlvr"), ("lora", "fused-rlvr-no-adapter")),
    ("lora: fused / op on merged W + s B A", ("lora", "fused-rlvr"), ("lora", "fused-rlvr-merged-weight")),
    ("lora: fused / torch (PEFT, materialised)", ("lora", "fused-rlvr"), ("lora", "torch")),
    *(
        (f"grpo: {variant[5:]} / ppo (whole fused loss)", (variant, "fused-rlvr"), ("grpo", "fused-rlvr"))
        for variant in GRPO_VARIANTS
    ),
)


def variant_costs(results: dict) -> dict:
    """Ratios of the variant rows of one run: per-token vs float temperature, LoRA vs the alternatives."""
    out = {}

    def ratio(key, a, b, mode):
        ra, rb = results.get(a, {}).get(mode), results.get(b, {}).get(mode)
        if ra and rb:
            out[f"{key} ({mode})"] = ra / rb

    for mode in ("fwd+bwd", "fwd"):
        ratio(
            "per-token / float temperature",
            "temperature/fused-rlvr-token-temperature",
            "temperature/fused-rlvr",
            mode,
        )
        ratio("fused LoRA / same op without adapter", "lora/fused-rlvr", "lora/fused-rlvr-no-adapter", mode)
        ratio("fused LoRA / op on merged W + s B A", "lora/fused-rlvr", "lora/fused-rlvr-merged-weight", mode)
        ratio("fused LoRA / torch (PEFT, materialised)", "lora/fused-rlvr", "lora/torch", mode)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--sections",
        nargs="+",
        default=["target", "scaling", "epilogue"],
        choices=["target", "scaling", "epilogue", "paired"],
    )
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the paired section")
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and grid points")
    ap.add_argument(
        "--target-model", default=None, choices=sorted(MODELS), help="target / paired sections: this model"
    )
    ap.add_argument("--target-tokens", type=int, default=None, help="target / paired: this many tokens")
    ap.add_argument("--no-memory", action="store_true", help="target section: timings only")
    args = ap.parse_args(argv)
    out = args.out or os.environ.get("OUT") or f"bench/results/{args.device}"
    b = Bench(args.device, out, args.quick)
    print(b.summary["device"], b.summary["versions"], flush=True)
    t0 = time.time()
    if "target" in args.sections:
        b.target(args.ops, args.target_model, args.target_tokens, mem=not args.no_memory)
        b.write()
    if "paired" in args.sections:
        b.guarded("paired", b.paired, args.rounds, args.target_model, args.target_tokens)
    if "scaling" in args.sections:
        b.scaling()
    if "epilogue" in args.sections:
        b.guarded("epilogue", b.epilogue)
    b.summary["wall_s"] = time.time() - t0
    b.write()
    print_summary(b.summary)
    return 1 if "errors" in b.summary else 0


def print_summary(summary):
    t = summary.get("target", {})
    print(
        f"\n== {summary['device']}  target {t.get('model')} N={t.get('tokens')}  "
        f"GEMM fwd+bwd floor {t.get('gemm_floor_ms') or float('nan'):.1f} ms"
    )
    for key, r in summary["results"].items():
        op, provider = key.split("/")
        base = summary["results"].get(f"{op}/torch", {}).get("fwd+bwd")
        vs = f"  {r['fwd+bwd'] / base:.2f}x torch" if base else ""
        ppo = summary["results"].get(f"grpo/{provider}", {}).get("fwd+bwd")
        if op in GRPO_VARIANTS and ppo:
            vs += f"  {r['fwd+bwd'] / ppo:.3f}x grpo (ppo)"
        floor = f"  {r['x_floor']:.2f}x floor" if "x_floor" in r else ""
        frac = r.get("added_over_fp32_logits")
        mem = f"  added mem {frac:.2%} of fp32 logits" if frac is not None else ""
        print(f"  {key:34s} fwd+bwd {r['fwd+bwd']:9.1f} ms{vs}{floor}{mem}")
    for key, ms in summary.get("epilogue", {}).items():
        provider = key.split("/")[0]
        ppo = summary["epilogue"].get(f"{provider}/grpo")
        print(f"  epilogue {key:25s} {ms:9.3f} ms  {ms / ppo:.3f}x ppo")
    for key, value in summary.get("variants", {}).items():
        print(f"  {key:60s} {value:6.3f}x")
    for key, r in summary.get("paired", {}).items():
        print(
            f"  {key:60s} {r['median']:6.3f}x  (p20 {r['p20']:.3f}, p80 {r['p80']:.3f}, {r['rounds']} rounds)"
        )
    for key, why in summary.get("not_supported", {}).items():
        print(f"  {key:34s} not supported: {why}")
    for key in summary.get("errors", {}):
        print(f"  ERROR {key}")


if __name__ == "__main__":
    sys.exit(main())
