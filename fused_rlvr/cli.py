"""Command line: `fused-rlvr train` (RLVR training, also `python -m fused_rlvr.train`), `fused-rlvr eval`
(base vs trained: pass@k, entropies, the Invisible-Leash tables), `fused-rlvr demo`."""

from __future__ import annotations

import argparse
import sys
import time

from fused_rlvr._memory import PeakRSS


def demo(args) -> int:
    """Per-token log-probs and entropy of SmolLM2 on real text, fused vs materialised logits, on CPU."""
    import torch

    from fused_rlvr import IGNORE_INDEX, linear_logprobs
    from fused_rlvr.train.models import load_smollm2

    torch.manual_seed(0)
    t0 = time.time()
    model, tok = load_smollm2()
    model.eval()
    print(
        f"loaded SmolLM2-135M-Instruct ({type(model).__name__}, vocab {model.config.vocab_size}, "
        f"hidden {model.config.hidden_size}) in {time.time() - t0:.1f}s"
    )
    texts = [
        f"Question: what is {a} + {b}? Answer: {a + b}. Then {a} times {b} is {a * b}."
        for a in range(3, 40)
        for b in (7, 12, 29)
    ]
    batch = tok(texts, return_tensors="pt", padding=True)
    ids, attn = batch["input_ids"][:, : args.max_len], batch["attention_mask"][:, : args.max_len]
    targets = torch.where(attn[:, 1:] > 0, ids[:, 1:], IGNORE_INDEX)
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
    weight = model.get_output_embeddings().weight
    n = int((targets != IGNORE_INDEX).sum())
    vocab = weight.shape[0]
    print(
        f"{n} scored tokens; their fp32 logits would take {n * vocab * 4 / 2**20:.0f} MiB "
        f"(all {targets.numel()} positions: {targets.numel() * vocab * 4 / 2**20:.0f} MiB)"
    )

    def run(fused: bool):
        h = hidden.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        t = time.time()
        with PeakRSS() as mem:
            if fused:
                lp, ent = linear_logprobs(h, w, targets)
            else:
                logp = torch.log_softmax(h @ w.T, -1)
                valid = targets != IGNORE_INDEX
                lp = torch.where(valid, logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0], 0.0)
                ent = torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0)
            (lp.sum() + 0.01 * ent.sum()).backward()
        return lp.detach(), ent.detach(), h.grad, time.time() - t, mem.extra / 2**20

    run(True)  # warm-up: thread pools and library code pages are touched once, outside the measurement
    ours = run(True)
    naive = run(False)
    m = targets != IGNORE_INDEX
    print(
        f"mean log-prob {ours[0][m].mean():.4f} (naive {naive[0][m].mean():.4f}); mean entropy "
        f"{ours[1][m].mean():.4f} (naive {naive[1][m].mean():.4f})"
    )
    print(
        f"max |difference|: log-prob {(ours[0] - naive[0]).abs().max():.2e}, entropy "
        f"{(ours[1] - naive[1]).abs().max():.2e}, d_hidden {(ours[2] - naive[2]).abs().max():.2e}"
    )
    grads = (hidden.numel() + weight.numel()) * 4 / 2**20
    print(
        f"forward+backward: fused {ours[3]:.2f}s, peak +{ours[4]:.0f} MiB | materialised logits "
        f"{naive[3]:.2f}s, peak +{naive[4]:.0f} MiB | memory saved {naive[4] - ours[4]:.0f} MiB "
        f"(both peaks include the {grads:.0f} MiB of gradients)"
    )
    ok = (ours[0] - naive[0]).abs().max() < 1e-3
    print("agreement:", "OK" if ok else "MISMATCH")
    return 0 if ok else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # the trainer's flags are generated from its config dataclass
        from fused_rlvr.train import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["eval"]:
        from fused_rlvr.train.evaluate import main as eval_main

        return eval_main(argv[1:])
    ap = argparse.ArgumentParser(prog="fused-rlvr", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="RLVR training (GRPO / PACS / STEER / DARS); see `fused-rlvr train --help`")
    sub.add_parser("eval", help="base vs trained: pass@k, entropies, P/E/S/O; see `fused-rlvr eval --help`")
    d = sub.add_parser("demo", help="fused vs materialised log-probs of SmolLM2 on CPU, and the memory saved")
    d.add_argument("--max-len", type=int, default=64, help="tokens per sequence (111 sequences)")
    d.set_defaults(func=demo)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
