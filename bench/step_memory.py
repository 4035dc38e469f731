"""Peak memory and time of one whole GRPO optimizer step, per provider, each in a fresh process.

    python -m bench.step_memory                       # CPU: fp32, 2 layers, 8 sequences x 512 tokens
    python -m bench.step_memory --device cuda         # GPU: bf16, all 24 layers
    python -m bench.step_memory --layers 4 --providers floor fused-rlvr torch

The model is Qwen2.5-0.5B-shaped with random weights, its config built here (hidden 896, 24 layers, 14 query
/ 2 key-value heads, intermediate 4864, vocabulary 151936, tied embeddings); --layers keeps the first N
layers (default: 2 on CPU, where each step of the full model would take many minutes, 24 on GPU). The
rollouts are given: B sequences of P prompt + C completion tokens (random ids), completions of random
lengths between C/2 and C, random advantages, old and reference log-probs from the policy itself (no-grad
fused forward) plus small noise, so ratios clip on both sides and the KL term is not zero. The loss is
TRL's: loss_type "dapo", beta 0.04 (k3), epsilon 0.2 / 0.28, token-level ratios, temperature 1.

One step = the body's forward, the loss, backward, AdamW step. Providers:

- floor: the body's forward and backward alone (a fixed linear function of the completion's last hidden
  states as the loss: no lm-head at all) and the AdamW step: what every provider pays;
- fused-rlvr: last hidden states -> fused_rlvr.linear_grpo_loss -> backward;
- trl: TRL's GRPOTrainer.compute_loss (TRL 1.16 scores with its own chunked lm-head);
- trl-fused: fused_rlvr.integrations.trl.FusedGRPOTrainer.compute_loss;
- liger: Liger-Kernel's LigerFusedLinearGRPOLoss on the last hidden states (its defaults: chunk_size 1,
  torch.compile'd);
- torch: fully materialised logits [B, C, V] in the model's dtype, log_softmax in fp32, the loss formula.

Every process builds the same model (seeded), runs one warm-up step of its provider on a small slice of
the batch with learning rate 0 (code paths, compilation, thread pools and the AdamW state exist before the
measurement; the weights do not move), frees the gradients, then measures one step on the whole batch:
peak resident memory above the memory before the step on CPU (fused_rlvr._memory.PeakRSS), CUDA
max_memory_allocated above memory_allocated before the step on GPU, and wall time (CUDA synchronised).
The loss and the gradient norm of every provider must agree with the reference provider (torch when run,
else the first one): the run fails with a non-zero exit status otherwise, and writes nothing.

Results: bench/results/<device>-step-memory/step_memory.{csv,json} (or --out); plot them with
`python -m bench.plot_step_memory DIR`.
"""

from __future__ import annotations

import argparse
import csv
import gc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROVIDERS = ("floor", "fused-rlvr", "trl", "trl-fused", "liger", "torch")
_REQUIRES = {"trl": "trl", "trl-fused": "trl", "liger": "liger_kernel"}
QWEN25_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    attention_dropout=0.0,
)
LOSS = dict(loss_type="dapo", beta=0.04, eps_low=0.2, eps_high=0.28)
# |loss - reference| <= rtol |reference| + atol, and the same for the gradient norm
TOLERANCE = {"float32": (1e-4, 1e-6), "bfloat16": (3e-2, 3e-3)}


def model_config(args):
    from transformers import Qwen2Config

    return Qwen2Config(**{**QWEN25_05B, "num_hidden_layers": args.layers, "vocab_size": args.vocab})


def build(args):
    """(model, batch): the seeded random model and the given rollouts, on args.device in args.dtype."""
    import torch
    from transformers import Qwen2ForCausalLM

    from fused_rlvr import linear_logprobs

    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(model_config(args)).to(dev, dt)
    model.train()
    g = torch.Generator().manual_seed(1)
    B, P, C, V = args.batch, args.prompt, args.seq - args.prompt, args.vocab
    prompt_ids = torch.randint(0, V, (B, P), generator=g)
    completion_ids = torch.randint(0, V, (B, C), generator=g)
    lengths = torch.randint(C // 2, C + 1, (B,), generator=g)
    lengths[0] = C
    mask = (torch.arange(C)[None] < lengths[:, None]).long()
    advantages = torch.randn(B, generator=g)
    noise_old, noise_ref = 0.05 * torch.randn(B, C, generator=g), 0.05 * torch.randn(B, C, generator=g)
    batch = dict(
        prompt_ids=prompt_ids,
        prompt_mask=torch.ones(B, P, dtype=torch.long),
        completion_ids=completion_ids,
        completion_mask=mask,
        advantages=advantages,
    )
    batch = {k: v.to(dev) for k, v in batch.items()}
    with torch.no_grad():
        h = completion_hidden(model, batch)
        lp = linear_logprobs(h, model.lm_head.weight, batch["completion_ids"], return_entropy=False)[
            0
        ].float()
        del h
    m = batch["completion_mask"].float()
    batch["old_per_token_logps"] = (lp + noise_old.to(dev)) * m
    batch["ref_per_token_logps"] = (lp + noise_ref.to(dev)) * m
    batch["num_items_in_batch"] = batch["completion_mask"].sum()
    return model, batch


def completion_hidden(model, batch):
    """Last hidden states [B, C, H] at the positions that predict the completion tokens."""
    import torch

    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    P = batch["prompt_ids"].shape[1]
    return model.model(input_ids=ids, attention_mask=attn).last_hidden_state[:, P - 1 : -1]


def small(batch, rows: int = 1):
    """The warm-up slice: the first rows sequences, at full length (shapes per sequence as measured, so a
    compiled provider does not recompile in the measured step)."""
    out = {}
    for k, v in batch.items():
        if k != "num_items_in_batch":
            out[k] = v[:rows]
    out["num_items_in_batch"] = out["completion_mask"].sum()
    return out


def dapo_loss_torch(lp, batch):
    """TRL's dapo loss with k3 KL, from per-token log-probs lp [B, C] (the formula, in plain torch)."""
    import torch

    m = batch["completion_mask"].float()
    ratio = torch.exp(lp - batch["old_per_token_logps"])
    adv = batch["advantages"][:, None]
    clipped = torch.clamp(ratio, 1 - LOSS["eps_low"], 1 + LOSS["eps_high"])
    per_token = -torch.min(ratio * adv, clipped * adv)
    d = batch["ref_per_token_logps"] - lp
    per_token = per_token + LOSS["beta"] * (torch.exp(d) - d - 1)
    return (per_token * m).sum() / m.sum()


class Step:
    """The loss of one provider: `loss(model, batch)` -> scalar, differentiable w.r.t. the model."""

    def __init__(self, provider: str, model, args, tmp: str):
        self.provider = provider
        self.trainer = None
        if provider in ("trl", "trl-fused"):
            self.trainer = _trl_trainer(provider, model, args, tmp)
        if provider == "liger":
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            self.liger = LigerFusedLinearGRPOLoss(
                beta=LOSS["beta"],
                use_ref_model=True,
                epsilon_low=LOSS["eps_low"],
                epsilon_high=LOSS["eps_high"],
                loss_type=LOSS["loss_type"],
            )
        if provider == "floor":
            import torch

            g = torch.Generator().manual_seed(2)
            self.g = torch.randn(QWEN25_05B["hidden_size"], generator=g).to(args.device)

    def loss(self, model, batch):
        import torch

        p = self.provider
        if self.trainer is not None:
            return self.trainer.compute_loss(self.trainer.model, batch)
        h = completion_hidden(model, batch)
        w = model.lm_head.weight
        y, m = batch["completion_ids"], batch["completion_mask"]
        if p == "floor":
            return (h.float() @ self.g * m).sum() / m.sum()
        if p == "fused-rlvr":
            from fused_rlvr import linear_grpo_loss

            return linear_grpo_loss(
                h,
                w,
                y,
                batch["advantages"],
                m,
                old_logprobs=batch["old_per_token_logps"],
                ref_logprobs=batch["ref_per_token_logps"],
                beta=LOSS["beta"],
                kl="k3",
                eps_low=LOSS["eps_low"],
                eps_high=LOSS["eps_high"],
                agg="dapo",
            )[0]
        if p == "liger":
            return self.liger(
                h,
                w,
                y,
                m,
                batch["advantages"],
                ref_per_token_logps=batch["ref_per_token_logps"],
                old_per_token_logps=batch["old_per_token_logps"],
            )[0]
        if p == "torch":
            logits = h @ w.T  # [B, C, V] in the model's dtype, as an HF model's lm-head makes them
            lp = torch.log_softmax(logits.float(), -1).gather(-1, y[..., None])[..., 0]
            return dapo_loss_torch(lp, batch)
        raise ValueError(f"unknown provider {p!r}")


def _trl_trainer(provider: str, model, args, tmp: str):
    """A GRPOTrainer (or FusedGRPOTrainer) around `model`, set for the benchmark's loss; only its
    compute_loss is used (rollouts are given)."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    cls = GRPOTrainer
    if provider == "trl-fused":
        from fused_rlvr.integrations.trl import FusedGRPOTrainer as cls
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    cfg = GRPOConfig(
        output_dir=tmp,
        per_device_train_batch_size=args.batch,
        num_generations=args.batch,
        max_completion_length=args.seq - args.prompt,
        beta=0.0,  # a reference model would be built from a path; the loss below sets beta itself
        loss_type=LOSS["loss_type"],
        epsilon=LOSS["eps_low"],
        epsilon_high=LOSS["eps_high"],
        temperature=1.0,
        use_cpu=args.device == "cpu",
        bf16=False,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_bias_correction_kl=False,
    )
    trainer = cls(
        model=model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=cfg,
        train_dataset=Dataset.from_dict({"prompt": ["x"] * args.batch}),
        processing_class=tok,
    )
    trainer.beta = LOSS["beta"]
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    if trainer.model is not model:
        raise RuntimeError("TRL wrapped the model; the benchmark measures the model it built")
    return trainer


def worker(provider: str, args) -> dict:
    import torch

    from fused_rlvr._memory import PeakRSS

    cuda = args.device == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        model, batch = build(args)
        step = Step(provider, model, args, tmp)
        opt = torch.optim.AdamW(model.parameters(), lr=0.0)

        def one_step(b):
            loss = step.loss(model, b)
            loss.backward()
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach().float()), float(norm)

        one_step(small(batch))  # warm-up at lr 0: code paths, compilation, AdamW state; no weight moves
        for group in opt.param_groups:
            group["lr"] = 1e-6
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            loss, norm = one_step(batch)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated()
        else:
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                loss, norm = one_step(batch)
                seconds = time.perf_counter() - t0
            base, peak = mem.base, mem.peak
    return dict(
        provider=provider, loss=loss, grad_norm=norm, base=base, peak=peak, extra=peak - base, seconds=seconds
    )


def measure(provider: str, args) -> dict:
    cmd = [sys.executable, "-m", "bench.step_memory", "--worker", provider, "--device", args.device]
    cmd += ["--dtype", args.dtype, "--layers", str(args.layers), "--batch", str(args.batch)]
    cmd += ["--seq", str(args.seq), "--prompt", str(args.prompt), "--vocab", str(args.vocab)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{provider} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_agreement(rows: list[dict], dtype: str) -> list[str]:
    """Mismatches of loss and gradient norm against the reference provider (torch, else the first)."""
    scored = [r for r in rows if r["provider"] != "floor"]
    if len(scored) < 2:
        return []
    ref = next((r for r in scored if r["provider"] == "torch"), scored[0])
    rtol, atol = TOLERANCE[dtype]
    bad = []
    for r in scored:
        for key in ("loss", "grad_norm"):
            if not abs(r[key] - ref[key]) <= rtol * abs(ref[key]) + atol:
                bad.append(f"{r['provider']} {key} {r[key]:.8g} vs {ref['provider']} {ref[key]:.8g}")
    return bad


def device_label(device: str) -> str:
    if device == "cpu":
        return "cpu"
    import torch

    name = torch.cuda.get_device_name().lower()
    for short in ("h200", "h100", "a100", "l40s", "l4", "a10g", "b200", "4090", "3090"):
        if short in name:
            return short
    return "cuda"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument(
        "--dtype", default=None, choices=sorted(TOLERANCE), help="default: fp32 on CPU, bf16 on GPU"
    )
    ap.add_argument(
        "--layers", type=int, default=None, help="decoder layers kept (default: 2 on CPU, 24 on GPU)"
    )
    ap.add_argument("--batch", type=int, default=8, help="sequences (default: %(default)s)")
    ap.add_argument("--seq", type=int, default=512, help="tokens per sequence (default: %(default)s)")
    ap.add_argument(
        "--prompt", type=int, default=64, help="prompt tokens of each sequence (default: %(default)s)"
    )
    ap.add_argument(
        "--vocab", type=int, default=QWEN25_05B["vocab_size"], help="vocabulary (smaller: smoke tests)"
    )
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    ap.add_argument("--out", default=None, help="folder (default: bench/results/<device>-step-memory)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    args.layers = args.layers or (2 if args.device == "cpu" else QWEN25_05B["num_hidden_layers"])
    if not 0 < args.prompt < args.seq:
        ap.error(f"--prompt must be in (0, --seq = {args.seq}), got {args.prompt}")
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0
    mib = 1 << 20
    print(
        f"one GRPO step, Qwen2.5-0.5B-shaped ({args.layers} of 24 layers), {args.batch} x {args.seq} tokens "
        f"({args.prompt} prompt), {args.dtype}, {args.device}"
    )
    rows = []
    for p in args.providers:
        if p in _REQUIRES and importlib.util.find_spec(_REQUIRES[p]) is None:
            print(f"{p:12s} skipped: {_REQUIRES[p]} is not installed")
            continue
        r = measure(p, args)
        rows.append(r)
        print(
            f"{p:12s} +{r['extra'] / mib:9.0f} MiB  {r['seconds']:8.2f} s  loss {r['loss']:.6f}", flush=True
        )
    bad = check_agreement(rows, args.dtype)
    if bad:
        print("providers disagree (nothing written):\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    floor = next((r["extra"] for r in rows if r["provider"] == "floor"), None)
    for r in rows:
        r["above_floor"] = None if floor is None else r["extra"] - floor
    if floor is not None:
        print(
            "above the floor: "
            + ", ".join(f"{r['provider']} +{r['above_floor'] / mib:.0f} MiB" for r in rows)
        )
    label = device_label(args.device)
    out_dir = args.out or os.path.join(ROOT, "bench", "results", f"{label}-step-memory")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "step_memory.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    meta = {k: getattr(args, k) for k in ("device", "dtype", "layers", "batch", "seq", "prompt")}
    meta.update(
        model={**QWEN25_05B, "num_hidden_layers": args.layers, "vocab_size": args.vocab},
        loss=LOSS,
        machine=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        versions=_versions(),
        rows=rows,
    )
    if args.device == "cuda":
        import torch

        meta["gpu"] = torch.cuda.get_device_name()
    with open(os.path.join(out_dir, "step_memory.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"written to {out_dir}")
    return 0


def _versions() -> dict[str, str]:
    import importlib.metadata

    out = {}
    for pkg in ("torch", "transformers", "trl", "liger-kernel", "triton", "fused-rlvr"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    sys.exit(main())
