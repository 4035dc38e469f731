"""`fused-rlvr eval`: a base model against a trained run, n samples per problem (The Invisible Leash).

    fused-rlvr eval --run runs/default --n 8 --n-problems 30 --out-dir runs/default/eval

For each model, n responses per held-out problem are sampled at the given temperature (the same random
stream for both models) and verified. Reported: unbiased pass@k over a k grid and avg@n; answer-level
entropy over the distinct final answers of each problem's samples; token-level entropy of the sampled
responses from the fused op (`sequence_token_stats`: no [tokens x vocab] logits), at the sampling
temperature; the per-problem P/E/S/O split and SRR, NDR, SDS, NSCR (`fused_rlvr.leash.leash_report`);
optionally greedy accuracy. Written to --out-dir: per_problem.{csv,md}, summary.{csv,md}, pass_at_k.png,
samples.jsonl and summary.json.

A run's out_dir holds config.json and checkpoints/; the newest valid checkpoint (checkpoint.Checkpointer:
verified, loaded as plain data) has a "model" dict of the trainable parameters, which `load_run` loads over
the base model built from the run's config. Without --run, only --base is evaluated (pass@k, avg@n and the
entropies, no P/E/S/O).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields
from typing import Any, NamedTuple, Optional

import torch

from fused_rlvr.leash import LeashReport, avg_at_n, default_ks, leash_report, pass_at_k, write_report
from fused_rlvr.train.checkpoint import Checkpointer, CheckpointError
from fused_rlvr.train.config import ConfigError, TrainConfig, load_config_file
from fused_rlvr.train.files import atomic_write_text
from fused_rlvr.train.models import load_causal_lm
from fused_rlvr.train.rollout import RolloutBatch, format_prompt, generate
from fused_rlvr.train.scoring import Scorer
from fused_rlvr.train.tasks import Problem, Verifier, make_task


# ------------------------------------------------------------------------------------------- loading a run
def read_run_config(run_dir: str) -> TrainConfig:
    """The TrainConfig a run was trained with (run_dir/config.json); fields this version does not know are
    ignored with a note on stderr."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir!r} is not a training run: {path} does not exist")
    data = load_config_file(path)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        print(f"note: {path} has fields this version does not know, ignored: {unknown}", file=sys.stderr)
    return TrainConfig(**{k: v for k, v in data.items() if k in known}).validate()


def load_trained_params(model: torch.nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's trainable parameters (its "model" dict) into `model` in place; every name must be
    one of the model's parameters, with the same shape."""
    own = dict(model.named_parameters())
    unknown = sorted(set(params) - set(own))
    if unknown:
        raise ValueError(f"the checkpoint holds parameters this model does not have: {unknown[:5]}")
    with torch.no_grad():
        for name, value in params.items():
            if tuple(value.shape) != tuple(own[name].shape):
                raise ValueError(
                    f"checkpoint parameter {name!r} has shape {tuple(value.shape)}, the model's "
                    f"{tuple(own[name].shape)}"
                )
            own[name].copy_(value.to(own[name].device, own[name].dtype))


def _device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    from fused_rlvr.train.policy import resolve_device as _device
    from fused_rlvr.train.policy import resolve_dtype as _dtype

    dev = _device(device)
    return dev, _dtype(dtype, dev)


def run_checkpoint(run_dir: str, checkpoint_dir: Optional[str] = None) -> str:
    """`checkpoint_dir`, else the run's newest valid checkpoint (verified; an unusable newer one is reported
    and skipped)."""
    folder = checkpoint_dir or Checkpointer(os.path.join(run_dir, "checkpoints"), 1).latest()
    if folder is None:
        raise FileNotFoundError(f"run {run_dir!r} has no checkpoint (checkpoints/ holds none)")
    return folder


def checkpoint_params(folder: str) -> dict[str, torch.Tensor]:
    """The trainable parameters (the "model" dict) of a single-process checkpoint folder, verified and
    loaded as plain data (a checkpoint never runs code)."""
    state, _ = Checkpointer(os.path.dirname(os.path.abspath(folder)), 1).load(folder)
    if not isinstance(state.get("model"), dict):
        raise CheckpointError(
            f'checkpoint {folder} holds no full "model" dict (a sharded FSDP2 checkpoint: evaluate a '
            "single-process run's checkpoint)"
        )
    return state["model"]


def load_run(
    run_dir: str, *, checkpoint_dir: Optional[str] = None, device: str = "auto", dtype: str = "auto"
):
    """(model, tokenizer, config, checkpoint folder) of a trained run: the base model of the run's config
    with the checkpoint's trainable parameters loaded over it (default: the newest valid checkpoint)."""
    cfg = read_run_config(run_dir)
    folder = run_checkpoint(run_dir, checkpoint_dir)
    dev, dt = _device_dtype(device, dtype)
    model, tok = load_causal_lm(cfg.model, device=str(dev), dtype=dt, seed=cfg.seed)
    load_trained_params(model, checkpoint_params(folder))
    return model.eval(), tok, cfg, folder


# ---------------------------------------------------------------------------------------------- sampling
class ModelSamples(NamedTuple):
    """One model's samples on P problems, n each, in problem-major order."""

    correct: list[int]  # [P] correct samples per problem
    answers: list[list[Optional[str]]]  # [P][n] verifier's final answers (None: unparsable)
    token_entropy: list[float]  # [P] mean token entropy over the problem's response tokens (nats)
    texts: list[list[str]]  # [P][n]
    response_ids: list[list[list[int]]]  # [P][n]
    mean_length: float  # mean response length in tokens
    greedy_correct: Optional[list[bool]]  # [P] with greedy=True


def _eos_ids(model, tok) -> list[int]:
    ids = {tok.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def token_entropies(
    model, batch: RolloutBatch, pad_id: int, *, temperature: float, micro_batch: int, backend: str = "auto"
) -> list[torch.Tensor]:
    """Per-sample fused token entropies [len(response)] of the responses in `batch`, under their prompts."""
    device = next(model.parameters()).device
    scorer = Scorer(
        model, pad_id=pad_id, device=device, micro_batch=micro_batch, temperature=temperature, backend=backend
    )
    return scorer.logprobs(batch, entropy=True)[1]


def sample_model(
    model,
    tok,
    problems: list[Problem],
    *,
    n: int,
    temperature: float,
    top_p: float = 1.0,
    max_new_tokens: int,
    prompt_suffix: str,
    system_prompt: Optional[str] = None,
    verifier=None,
    greedy: bool = False,
    seed: int = 0,
    gen_batch: int = 64,
    micro_batch: int = 16,
    backend: str = "auto",
) -> ModelSamples:
    """n sampled responses per problem (torch seeded with `seed` first, so two models see the same random
    stream), each verified, then its final answer read, in problem-major order; token entropies from the
    fused op on the sampled responses at `temperature`; with greedy=True one greedy response each too."""
    verifier = Verifier() if verifier is None else verifier
    model.eval()
    pad_id, eos = tok.pad_token_id, _eos_ids(model, tok)
    prompts = [format_prompt(tok, p.question, prompt_suffix, system_prompt) for p in problems]
    gen = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=gen_batch,
        eos_ids=eos,
        pad_id=pad_id,
    )
    torch.manual_seed(seed)
    ids, texts, trunc = generate(model, tok, [p for p in prompts for _ in range(n)], greedy=False, **gen)
    batch = RolloutBatch(
        problems=list(problems),
        prompt_ids=prompts,
        group=torch.arange(len(problems)).repeat_interleave(n),
        response_ids=ids,
        texts=texts,
        truncated=torch.tensor(trunc, dtype=torch.bool),
        tags=["eval"] * len(ids),
    )
    ok = [verifier(t, problems[i // n].answer) > 0.5 for i, t in enumerate(texts)]
    answers = [verifier.final_answer(t) for t in texts]
    ents = token_entropies(
        model, batch, pad_id, temperature=temperature, micro_batch=micro_batch, backend=backend
    )
    greedy_ok = None
    if greedy:
        _, gtexts, _ = generate(model, tok, prompts, greedy=True, **gen)
        greedy_ok = [verifier(t, p.answer) > 0.5 for t, p in zip(gtexts, problems)]
    per = range(len(problems))
    token_entropy = []
    for i in per:
        e = torch.cat(ents[i * n : (i + 1) * n])
        token_entropy.append(float(e.mean()) if e.numel() else 0.0)
    return ModelSamples(
        correct=[sum(ok[i * n : (i + 1) * n]) for i in per],
        answers=[answers[i * n : (i + 1) * n] for i in per],
        token_entropy=token_entropy,
        texts=[texts[i * n : (i + 1) * n] for i in per],
        response_ids=[ids[i * n : (i + 1) * n] for i in per],
        mean_length=sum(len(x) for x in ids) / max(len(ids), 1),
        greedy_correct=greedy_ok,
    )


# ---------------------------------------------------------------------------------------------- reports
def _with_columns(row: dict, extra: dict) -> dict:
    """`row` with `extra` inserted before its "peso" label (kept last)."""
    out = {k: v for k, v in row.items() if k != "peso"}
    out.update(extra)
    if "peso" in row:
        out["peso"] = row["peso"]
    return out


def compare_report(
    problems: list[Problem], base: ModelSamples, trained: ModelSamples, n: int, ks: list[int]
) -> LeashReport:
    """leash_report of the two models, with token entropy (and greedy) columns and summary entries."""
    rep = leash_report(
        [p.id for p in problems],
        base.correct,
        trained.correct,
        n_base=n,
        ks=ks,
        base_answers=base.answers,
        trained_answers=trained.answers,
    )
    rows = []
    for i, row in enumerate(rep.rows):
        extra = {
            "base_token_entropy": base.token_entropy[i],
            "trained_token_entropy": trained.token_entropy[i],
        }
        if base.greedy_correct is not None:
            extra.update(
                base_greedy=int(base.greedy_correct[i]), trained_greedy=int(trained.greedy_correct[i])
            )
        rows.append(_with_columns(row, extra))
    summary = dict(rep.summary)
    for name, s in (("base", base), ("trained", trained)):
        summary[f"{name}_token_entropy_mean"] = sum(s.token_entropy) / len(s.token_entropy)
        summary[f"{name}_mean_length"] = s.mean_length
        if s.greedy_correct is not None:
            summary[f"{name}_greedy_accuracy"] = sum(s.greedy_correct) / len(s.greedy_correct)
    return LeashReport(rows, summary, rep.curves)


def single_report(problems: list[Problem], samples: ModelSamples, n: int, ks: list[int]) -> LeashReport:
    """pass@k, avg@n, answer and token entropy of one model (no comparison)."""
    from fused_rlvr.leash import answer_entropy

    rows = []
    for i, p in enumerate(problems):
        row = {"problem": p.id, "correct": samples.correct[i], "n": n}
        row.update({f"pass@{k}": float(pass_at_k(n, samples.correct[i], k)) for k in ks})
        row["answer_entropy"] = answer_entropy(samples.answers[i])
        row["token_entropy"] = samples.token_entropy[i]
        if samples.greedy_correct is not None:
            row["greedy"] = int(samples.greedy_correct[i])
        rows.append(row)
    curve = {k: sum(r[f"pass@{k}"] for r in rows) / len(rows) for k in ks}
    summary: dict[str, Any] = {"problems": len(problems), "avg@n": avg_at_n(samples.correct, n)}
    summary.update({f"pass@{k}": v for k, v in curve.items()})
    summary["answer_entropy_mean"] = sum(r["answer_entropy"] for r in rows) / len(rows)
    summary["token_entropy_mean"] = sum(samples.token_entropy) / len(samples.token_entropy)
    summary["mean_length"] = samples.mean_length
    if samples.greedy_correct is not None:
        summary["greedy_accuracy"] = sum(samples.greedy_correct) / len(samples.greedy_correct)
    return LeashReport(rows, summary, {"model": curve})


# ---------------------------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fused-rlvr eval",
        description="Base vs trained: n samples per problem, pass@k, avg@n, answer and token entropy, the "
        "Invisible-Leash P/E/S/O table and SRR / NDR / SDS / NSCR, as CSV / Markdown and a pass@k PNG.",
    )
    ap.add_argument("--run", default=None, help="a training run's out_dir (config.json + checkpoints/)")
    ap.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the run's newest valid)")
    ap.add_argument("--base", default=None, help="base model (default: the run's; needed without --run)")
    ap.add_argument("--task", default=None, help="task (default: the run's, else 'arithmetic')")
    ap.add_argument("--eval-task", default=None, help="JSONL of held-out problems (default: the run's)")
    ap.add_argument("--n-problems", type=int, default=30, help="held-out problems (default: %(default)s)")
    ap.add_argument("--n", type=int, default=8, help="samples per problem (default: %(default)s)")
    ap.add_argument("--ks", default=None, help="comma-separated k grid (default: 1, 2, 4, ..., n)")
    ap.add_argument("--temperature", type=float, default=None, help="default: the run's")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's")
    ap.add_argument("--greedy", action="store_true", help="also one greedy response per problem")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed, the same for both models")
    ap.add_argument("--gen-batch", type=int, default=64, help="sequences generated at once")
    ap.add_argument("--micro-batch", type=int, default=16, help="sequences per fused entropy pass")
    ap.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    ap.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: automatic)")
    ap.add_argument("--out-dir", default=None, help="output folder (default: RUN/eval, or runs/eval)")
    ap.add_argument("--no-plot", action="store_true", help="skip pass_at_k.png")
    return ap


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def run(args: argparse.Namespace, verifier=None) -> dict[str, Any]:
    """Evaluate as `args` says (see `build_parser`); returns the summary (also written to the out dir)."""
    _check(args.run is not None or args.base is not None, "fused-rlvr eval needs --run (and/or --base)")
    _check(args.n >= 1, f"--n must be >= 1, got {args.n}")
    _check(args.n_problems >= 1, f"--n-problems must be >= 1, got {args.n_problems}")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = read_run_config(args.run) if args.run else TrainConfig()
    folder = run_checkpoint(args.run, args.checkpoint) if args.run else None
    base_name = args.base or cfg.model
    temperature = cfg.temperature if args.temperature is None else args.temperature
    _check(temperature > 0, f"--temperature must be > 0, got {temperature}")
    max_new = cfg.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
    ks = default_ks(args.n) if args.ks is None else [int(k) for k in args.ks.split(",") if k.strip()]
    _check(all(1 <= k <= args.n for k in ks), f"--ks must lie in [1, --n = {args.n}], got {ks}")
    # the run's own held-out split (n_eval problems: never trained on), its first n_problems
    n_heldout = cfg.n_eval if args.run and not (args.task or args.eval_task) else args.n_problems
    task = make_task(args.task or cfg.task, n_heldout, cfg.seed, args.eval_task or cfg.eval_task)
    problems = task.heldout()[: args.n_problems]
    if len(problems) < args.n_problems:
        print(f"note: the held-out split has {len(problems)} problems; evaluating those", file=sys.stderr)
    _check(bool(problems), "the task has no held-out problems")
    out_dir = args.out_dir or (os.path.join(args.run, "eval") if args.run else "runs/eval")
    verifier = Verifier() if verifier is None else verifier
    dev, dt = _device_dtype(args.device, args.dtype)
    common = dict(
        n=args.n,
        temperature=temperature,
        top_p=args.top_p,
        max_new_tokens=max_new,
        prompt_suffix=cfg.prompt_suffix,
        system_prompt=cfg.system_prompt,
        verifier=verifier,
        greedy=args.greedy,
        seed=args.seed,
        gen_batch=args.gen_batch,
        micro_batch=args.micro_batch,
        backend=args.backend,
    )
    t0 = time.time()
    model, tok = load_causal_lm(base_name, device=str(dev), dtype=dt, seed=cfg.seed)
    print(f"sampling {args.n} x {len(problems)} problems from the base model {base_name}", file=sys.stderr)
    base = sample_model(model, tok, problems, **common)
    results = {"base": base}
    if args.run:
        state = checkpoint_params(folder)
        if base_name != cfg.model:  # another base: build the run's own model for the trained weights
            model, tok = load_causal_lm(cfg.model, device=str(dev), dtype=dt, seed=cfg.seed)
        load_trained_params(model, state)
        print(f"sampling {args.n} x {len(problems)} problems from the trained run {folder}", file=sys.stderr)
        results["trained"] = sample_model(model, tok, problems, **common)
        report = compare_report(problems, base, results["trained"], args.n, ks)
    else:
        report = single_report(problems, base, args.n, ks)
    report.summary.update(
        base_model=base_name,
        trained_checkpoint=folder or "",
        n=args.n,
        temperature=temperature,
        max_new_tokens=max_new,
        seconds=round(time.time() - t0, 1),
    )
    plot = not args.no_plot
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("matplotlib is not installed: no pass_at_k.png", file=sys.stderr)
            plot = False
    paths = write_report(report, out_dir, plot=plot)
    with open(os.path.join(out_dir, "samples.jsonl"), "w", encoding="utf-8") as fh:
        for name, s in results.items():
            for i, p in enumerate(problems):
                for j, text in enumerate(s.texts[i]):
                    rec = {
                        "model": name,
                        "problem": p.id,
                        "answer": p.answer,
                        "sample": j,
                        "response": text,
                        "final_answer": s.answers[i][j],
                    }
                    fh.write(json.dumps(rec) + "\n")
    atomic_write_text(os.path.join(out_dir, "summary.json"), json.dumps(report.summary, indent=2))
    paths.update(
        {
            "samples.jsonl": os.path.join(out_dir, "samples.jsonl"),
            "summary.json": os.path.join(out_dir, "summary.json"),
        }
    )
    report.summary["files"] = paths
    return report.summary


LEGEND = (
    "legend: pass@k = chance that k of a problem's n samples include a correct one (unbiased), avg@n = mean "
    "accuracy of the samples, entropies in nats"
)
LEASH_LEGEND = (
    "P/E/S/O = problems solved (a correct sample among n) by both models / only the trained one / only the "
    "base one / neither; SRR = P/(P+S) support retention; NDR = E/(P+E) net discovery; SDS = harmonic mean "
    "of SRR and NDR; NSCR = (E-S)/(P+E+S) net support change (> 0: the support grew)"
)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"fused-rlvr eval: error: {e}", file=sys.stderr)
        return 2
    keys = [k for k in summary if k.endswith(("avg@n", "_accuracy", "entropy_mean")) or k.startswith("pass@")]
    keys += [k for k in ("P", "E", "S", "O", "SRR", "NDR", "SDS", "NSCR") if k in summary]
    keys += [k for k in summary if "_pass@" in k]
    for k in keys:
        v = summary[k]
        print(f"{k:>28}: {v:.4f}" if isinstance(v, float) else f"{k:>28}: {v}")
    print(LEGEND + ("; " + LEASH_LEGEND if "P" in summary else ""))
    print(f"tables, plot and samples in {os.path.dirname(summary['files']['summary.json'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
