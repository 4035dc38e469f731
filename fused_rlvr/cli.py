"""Command line: `fused-rlvr train` (RLVR training, also `python -m fused_rlvr.train`), `fused-rlvr eval`
(base vs trained: pass@k, entropies, the Invisible-Leash tables), `fused-rlvr export-model` (a model as a
Hugging Face folder other tools load offline), `fused-rlvr demo`."""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Optional

from fused_rlvr._memory import PeakRSS
from fused_rlvr._threads import configure_threads, ensure_openmp_env

# Commands whose process gets the thread count of fused_rlvr._threads and no library progress bars on a
# non-terminal stderr; the long-running ones (TRAINING_COMMANDS) also the OpenMP wait policy.
COMPUTE_COMMANDS = ("train", "eval", "demo", "export-model")
TRAINING_COMMANDS = ("train", "eval", "demo")
# Errors of these types raised by a `raise` statement of fused-rlvr's own code are its input checks (a config
# field, a path, a model name): one line and exit status 2. Raised anywhere else (torch, transformers, a
# failing builtin call inside our code) they keep their traceback.
INPUT_ERRORS = (ValueError, OSError)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


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


def export(args) -> int:
    """Write a model as a Hugging Face folder (config, safetensors, tokenizer, generation config)."""
    import torch

    from fused_rlvr.train.models import export_model

    files = export_model(args.model, args.folder, dtype=getattr(torch, args.dtype))
    print(f"wrote {args.model} to {args.folder}: {', '.join(files)}")
    print(
        f"load it offline with AutoModelForCausalLM.from_pretrained({args.folder!r}) and "
        f"AutoTokenizer.from_pretrained({args.folder!r}), or pass the folder as the model name"
    )
    return 0


def is_input_error(err: BaseException) -> bool:
    """Whether `err` is one of fused-rlvr's own checks of its input: an INPUT_ERRORS type raised by a `raise`
    statement in this package, rather than a failure inside torch, another library or a builtin call."""
    if not isinstance(err, INPUT_ERRORS) or err.__traceback__ is None:
        return False
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return False
    last = frames[-1]
    ours = os.path.abspath(last.filename).startswith(_PACKAGE_DIR + os.sep)
    return ours and (last.line or "").lstrip().startswith("raise ")


def input_error_line(prog: str, err: BaseException) -> str:
    """The one line printed for an input error: the program, then the error's own message."""
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{prog}: error: {text}"


def prepare_process(*, reexec: bool = False) -> int:
    """Process set-up of the compute commands: OpenMP wait policy (`ensure_openmp_env`, which re-executes
    the command once when torch was loaded before the policy was set and `reexec` is True), torch threads
    (`configure_threads(0)`: automatic; the trainer's `threads` field or eval's --threads override it),
    library progress bars off when stderr is not a terminal. Returns the thread count set."""
    from fused_rlvr.train.models import silence_library_progress_bars

    if reexec:
        ensure_openmp_env()
    silence_library_progress_bars()
    return configure_threads(0)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fused-rlvr", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="RLVR training (GRPO / PACS / STEER / DARS); see `fused-rlvr train --help`")
    sub.add_parser("eval", help="base vs trained: pass@k, entropies, P/E/S/O; see `fused-rlvr eval --help`")
    e = sub.add_parser(
        "export-model",
        help="write a model ('smollm2', 'tiny-random' or a local HF model) as a Hugging Face folder",
        description="Write a model as a Hugging Face folder (config.json, model.safetensors, tokenizer, "
        "generation_config.json) that AutoModelForCausalLM / AutoTokenizer, TRL and verl load offline. "
        "'smollm2' is the embedded SmolLM2-135M-Instruct, de-quantised from its GGUF file, bit for bit the "
        "weights `fused-rlvr train` starts from.",
    )
    e.add_argument("model", help="'smollm2', 'tiny-random', or a local HF model name / folder")
    e.add_argument("folder", help="output folder (must not exist, or be empty)")
    e.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="default: %(default)s")
    e.set_defaults(func=export)
    d = sub.add_parser("demo", help="fused vs materialised log-probs of SmolLM2 on CPU, and the memory saved")
    d.add_argument("--max-len", type=int, default=64, help="tokens per sequence (111 sequences)")
    d.set_defaults(func=demo)
    return ap


def main(argv=None, *, reexec: Optional[bool] = None) -> int:
    """`fused-rlvr COMMAND ...` (argv: the arguments after the program name; default sys.argv[1:]).

    reexec: may a training command re-execute this process once to set the OpenMP wait policy before torch
    loads (see prepare_process); default: only when argv is None, i.e. as the installed command. Another
    entry point of a whole process passes reexec=True (`python -m fused_rlvr.train`:
    `main(["train", *sys.argv[1:]], reexec=True)`); tests and library callers leave it False."""
    reexec = argv is None if reexec is None else reexec
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv else None
    if command in COMPUTE_COMMANDS:
        prepare_process(reexec=reexec and command in TRAINING_COMMANDS)
    try:
        if command == "train":  # the trainer's flags are generated from its config dataclass
            from fused_rlvr.train import main as train_main

            return train_main(argv[1:])
        if command == "eval":
            from fused_rlvr.train.evaluate import main as eval_main

            return eval_main(argv[1:])
        args = _parser().parse_args(argv)
        return args.func(args)
    except INPUT_ERRORS as err:
        if not is_input_error(err) or os.environ.get("FUSED_RLVR_TRACEBACK"):
            raise
        print(input_error_line(f"fused-rlvr {command}", err), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
