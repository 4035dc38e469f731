"""Invisible-Leash evaluation math: unbiased pass@k, answer entropy, the P/E/S/O split and its ratios.

Pure functions on counts and lists (numpy inside); no model, no trainer. The report helpers turn per-problem
counts into a table and a summary, render them as CSV or Markdown, and plot pass@k curves (matplotlib is
imported only inside `plot_pass_at_k`).

Definitions (docs/methods.md, section 6, "The Invisible Leash"):
- pass@k = 1 - C(n - c, k) / C(n, k) for a problem with c correct answers among n samples (unbiased).
- per problem, "solved" by base and by trained give P (both), E (only trained), S (only base), O (neither);
  SRR = P / (P + S), NDR = E / (P + E), SDS = harmonic mean of SRR and NDR, NSCR = (E - S) / (P + E + S).
- answer entropy = -sum_j p_j log p_j over the distinct final answers of the n samples (natural log).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import NamedTuple, Optional, Union

import numpy as np

from fused_rlvr._validation import one_of

ArrayLike = Union[int, Sequence[int], np.ndarray]
NONE_MODES = ("bucket", "drop", "distinct")
PESO_LABELS = ("P", "E", "S", "O")


def _as_counts(name: str, value) -> np.ndarray:
    """An int64 array of non-negative integers (integral floats accepted); errors name the argument."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    numeric = np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    if arr.dtype == bool or not numeric:
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            bad = arr[~np.isfinite(arr) | (arr != np.round(arr))][:3]
            raise ValueError(f"{name} must hold whole numbers, got values such as {bad.tolist()}")
    arr = arr.astype(np.int64)
    if np.any(arr < 0):
        raise ValueError(f"{name} must be >= 0, got {arr[arr < 0][:3].tolist()}")
    return arr


def _as_k(value, name: str = "k") -> int:
    if isinstance(value, bool) or not isinstance(value, (Integral, np.integer)):
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value}")
    return int(value)


def pass_at_k(n: ArrayLike, c: ArrayLike, k: int) -> Union[float, np.ndarray]:
    """Unbiased pass@k = 1 - C(n - c, k) / C(n, k), vectorised over problems.

    n: samples per problem, c: correct samples per problem (ints or arrays that broadcast), k: an int
    with 1 <= k <= n. Computed in the numerically stable product form (Chen et al., 2021)
    C(n - c, k) / C(n, k) = prod_{i = n - c + 1}^{n} (1 - k / i), which is 1 - pass@k; when n - c < k every
    k-subset holds a correct sample and pass@k = 1. Returns a float for scalar inputs, else an array.
    """
    n_arr = _as_counts("n", n)
    c_arr = _as_counts("c", c)
    k = _as_k(k)
    scalar = n_arr.ndim == 0 and c_arr.ndim == 0
    try:
        n_arr, c_arr = np.broadcast_arrays(n_arr, c_arr)
    except ValueError:
        raise ValueError(f"n (shape {n_arr.shape}) and c (shape {c_arr.shape}) must broadcast") from None
    if np.any(c_arr > n_arr):
        i = int(np.argmax((c_arr > n_arr).ravel()))
        raise ValueError(f"c must be <= n; problem {i} has c={c_arr.ravel()[i]} > n={n_arr.ravel()[i]}")
    if np.any(k > n_arr):
        raise ValueError(f"k must be <= n (the samples per problem); got k={k} and n={int(n_arr.min())}")
    n_flat, c_flat = n_arr.ravel(), c_arr.ravel()
    width = int(c_flat.max()) if c_flat.size else 0
    j = np.arange(width)
    i = (n_flat - c_flat + 1)[:, None] + j[None, :]  # i runs over n - c + 1 .. n (>= 1)
    factors = np.where(j[None, :] < c_flat[:, None], 1.0 - k / np.maximum(i, 1), 1.0)
    out = np.where(n_flat - c_flat < k, 1.0, 1.0 - factors.prod(axis=1)).reshape(n_arr.shape)
    return float(out) if scalar else out


def default_ks(n: int) -> list[int]:
    """Powers of two up to n, and n itself: 1, 2, 4, ..., n."""
    n = _as_k(n, "n")
    ks = [1 << p for p in range(n.bit_length()) if (1 << p) <= n]
    return ks if ks[-1] == n else ks + [n]


def pass_at_k_curve(
    correct_counts: ArrayLike, n: ArrayLike, ks: Optional[Sequence[int]] = None
) -> dict[int, float]:
    """{k: mean over problems of pass@k} for correct counts [P] out of n samples (an int or [P]).

    ks defaults to `default_ks(min(n))`; each k must be <= every problem's n.
    """
    c = _as_counts("correct_counts", correct_counts)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"correct_counts must be a non-empty 1-D list of counts, got shape {c.shape}")
    n_arr = _as_counts("n", n)
    if ks is None:
        ks = default_ks(int(n_arr.min()))
    return {_as_k(k, "ks[i]"): float(np.mean(pass_at_k(n_arr, c, k))) for k in ks}


def avg_at_n(correct_counts: ArrayLike, n: ArrayLike) -> float:
    """avg@n = mean over problems of c / n (equals the mean unbiased pass@1)."""
    c = _as_counts("correct_counts", correct_counts)
    n_arr = _as_counts("n", n)
    if c.size == 0:
        raise ValueError("correct_counts must not be empty")
    if np.any(n_arr == 0):
        raise ValueError("n must be >= 1 for every problem")
    if np.any(c > n_arr):
        raise ValueError(f"correct_counts must be <= n, got max {int(c.max())} with n={int(np.min(n_arr))}")
    return float(np.mean(c / n_arr))


def answer_entropy(answers: Sequence[Optional[str]], *, none: str = "bucket") -> float:
    """-sum_j p_j log p_j (natural log) over the distinct final answers of one problem's samples.

    p_j is the fraction of samples whose answer is j; answers are compared exactly (normalise them first,
    e.g. with the verifier's canonical form). `None` marks a sample without a parsable answer:
      none="bucket" (default): all unparsable samples form one extra answer, "no answer" (a model that
        never answers has entropy 0; half unparsable, half one answer gives log 2);
      none="drop": they are left out and p is taken over the parsed samples only;
      none="distinct": each counts as its own answer (unparsable output treated as maximally spread).
    An empty list (or nothing left after "drop") gives 0.0.
    """
    one_of("none", none, NONE_MODES)
    if isinstance(answers, (str, bytes)):
        raise TypeError("answers must be a list of answer strings (or None), not a single string")
    answers = list(answers)
    for i, a in enumerate(answers):
        if a is not None and not isinstance(a, str):
            raise TypeError(f"answers[{i}] must be a str or None, got {type(a).__name__}")
    parsed = [a for a in answers if a is not None]
    n_none = len(answers) - len(parsed)
    counts = list(Counter(parsed).values())
    if none == "bucket" and n_none:
        counts.append(n_none)
    elif none == "distinct":
        counts.extend([1] * n_none)
    total = sum(counts)
    if total == 0:
        return 0.0
    p = np.asarray(counts, dtype=np.float64) / total
    return float(-(p * np.log(p)).sum() + 0.0)


class Peso(NamedTuple):
    """The Invisible-Leash split of problems and each problem's label ("P", "E", "S" or "O")."""

    P: int  # solved by both base and trained (preserved)
    E: int  # solved only by trained (expanded)
    S: int  # solved only by base (shrunk)
    O: int  # noqa: E741  solved by neither (out of reach)
    labels: list[str]


def _as_bools(name: str, value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D [problems], got shape {arr.shape}")
    if arr.dtype != bool:
        if not (np.issubdtype(arr.dtype, np.number) and np.all((arr == 0) | (arr == 1))):
            raise TypeError(f"{name} must be booleans (or 0/1), got dtype {arr.dtype}")
        arr = arr.astype(bool)
    return arr


def peso(base_solved, trained_solved) -> Peso:
    """Count P (both solve), E (only trained), S (only base), O (neither) over problems [P] of booleans."""
    b = _as_bools("base_solved", base_solved)
    t = _as_bools("trained_solved", trained_solved)
    if b.shape != t.shape:
        raise ValueError(f"base_solved {b.shape} and trained_solved {t.shape} must have the same length")
    labels = np.where(b & t, "P", np.where(t, "E", np.where(b, "S", "O"))).tolist()
    return Peso(int((b & t).sum()), int((~b & t).sum()), int((b & ~t).sum()), int((~b & ~t).sum()), labels)


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def leash_metrics(counts: Union[Peso, Mapping[str, int]]) -> dict[str, float]:
    """SRR = P/(P+S), NDR = E/(P+E), SDS = 2 SRR NDR / (SRR + NDR), NSCR = (E - S)/(P + E + S).

    A ratio whose denominator is 0 is NaN (undefined: e.g. SRR with no problem the base solved), not 0,
    so a mean over runs does not read "nothing to preserve" as "preserved nothing". SDS is NaN when SRR or
    NDR is NaN, and 0 when both are 0 (the harmonic mean's limit).
    """
    get = counts._asdict() if isinstance(counts, Peso) else counts
    try:
        p, e, s = (get[key] for key in ("P", "E", "S"))
    except KeyError as err:
        raise KeyError(f"counts must hold P, E and S (a Peso or a mapping); missing {err}") from None
    for key, v in (("P", p), ("E", e), ("S", s)):
        if isinstance(v, bool) or not isinstance(v, (Integral, np.integer)) or v < 0:
            raise ValueError(f"counts[{key!r}] must be an int >= 0, got {v!r}")
    srr = _ratio(p, p + s)
    ndr = _ratio(e, p + e)
    if math.isnan(srr) or math.isnan(ndr):
        sds = math.nan
    else:
        sds = 2 * srr * ndr / (srr + ndr) if srr + ndr > 0 else 0.0
    return {"SRR": srr, "NDR": ndr, "SDS": sds, "NSCR": _ratio(e - s, p + e + s)}


class LeashReport(NamedTuple):
    rows: list[dict]  # one dict per problem (same keys, in column order)
    summary: dict  # metric -> value
    curves: dict  # {"base": {k: pass@k}, "trained": {k: pass@k}}


def leash_report(
    problem_ids: Sequence,
    base_correct: ArrayLike,
    trained_correct: ArrayLike,
    *,
    n_base: ArrayLike,
    n_trained: Optional[ArrayLike] = None,
    ks: Optional[Sequence[int]] = None,
    base_answers: Optional[Sequence[Sequence[Optional[str]]]] = None,
    trained_answers: Optional[Sequence[Sequence[Optional[str]]]] = None,
    none: str = "bucket",
) -> LeashReport:
    """Per-problem table, summary and pass@k curves of a base model against a trained one.

    base_correct / trained_correct: correct samples per problem [P] out of n_base / n_trained (an int or
    [P]; n_trained defaults to n_base). A problem counts as solved by a model when at least one of its
    samples is correct, i.e. pass@n > 0: the paper's "solved within k" at k = n. Rows hold the counts,
    pass@k for each k (default: powers of two up to the smaller n), the answer entropies when answers are
    given (one list of final answers, None for unparsable, per problem) and the P/E/S/O label. The summary
    holds P, E, S, O, SRR, NDR, SDS, NSCR, avg@n and mean pass@k of each model, and mean answer entropies.
    """
    ids = list(problem_ids)
    cb = _as_counts("base_correct", base_correct)
    ct = _as_counts("trained_correct", trained_correct)
    if cb.ndim != 1 or ct.shape != cb.shape or len(ids) != cb.size:
        raise ValueError(
            f"problem_ids ({len(ids)}), base_correct {cb.shape} and trained_correct {ct.shape} "
            "must be 1-D of the same length"
        )
    if cb.size == 0:
        raise ValueError("problem_ids must not be empty")
    nb = np.broadcast_to(_as_counts("n_base", n_base), cb.shape)
    nt = nb if n_trained is None else np.broadcast_to(_as_counts("n_trained", n_trained), cb.shape)
    if ks is None:
        ks = default_ks(int(min(nb.min(), nt.min())))
    ks = [_as_k(k, "ks[i]") for k in ks]
    pb = {k: np.atleast_1d(pass_at_k(nb, cb, k)) for k in ks}
    pt = {k: np.atleast_1d(pass_at_k(nt, ct, k)) for k in ks}
    split = peso(cb > 0, ct > 0)
    ent = {}
    for name, answers in (("base", base_answers), ("trained", trained_answers)):
        if answers is not None:
            if len(answers) != len(ids):
                raise ValueError(
                    f"{name}_answers must hold one list per problem ({len(ids)}), got {len(answers)}"
                )
            ent[name] = [answer_entropy(a, none=none) for a in answers]
    rows = []
    for i, pid in enumerate(ids):
        row = {
            "problem": pid,
            "base_correct": int(cb[i]),
            "base_n": int(nb[i]),
            "trained_correct": int(ct[i]),
            "trained_n": int(nt[i]),
        }
        row.update({f"base_pass@{k}": float(pb[k][i]) for k in ks})
        row.update({f"trained_pass@{k}": float(pt[k][i]) for k in ks})
        row.update({f"{name}_answer_entropy": vals[i] for name, vals in ent.items()})
        row["peso"] = split.labels[i]
        rows.append(row)
    summary: dict = {"problems": len(ids), "P": split.P, "E": split.E, "S": split.S, "O": split.O}
    summary.update(leash_metrics(split))
    summary["base_avg@n"] = avg_at_n(cb, nb)
    summary["trained_avg@n"] = avg_at_n(ct, nt)
    curves = {"base": {k: float(pb[k].mean()) for k in ks}, "trained": {k: float(pt[k].mean()) for k in ks}}
    for name in ("base", "trained"):
        summary.update({f"{name}_pass@{k}": v for k, v in curves[name].items()})
    summary.update({f"{name}_answer_entropy_mean": float(np.mean(vals)) for name, vals in ent.items()})
    return LeashReport(rows, summary, curves)


def format_value(value) -> str:
    """How tables print a cell: ints as ints, floats with 6 significant digits, NaN as "nan"."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (Integral, np.integer)):
        return str(int(value))
    if isinstance(value, (Real, np.floating)):
        value = float(value)
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def summary_rows(summary: Mapping) -> list[dict]:
    """A summary dict as rows of {"metric", "value"} for the table writers."""
    return [{"metric": k, "value": v} for k, v in summary.items()]


def _columns(rows: Sequence[Mapping]) -> list[str]:
    if not rows:
        raise ValueError("rows must not be empty")
    cols = list(rows[0].keys())
    for i, row in enumerate(rows):
        if list(row.keys()) != cols:
            raise ValueError(f"rows[{i}] has columns {list(row.keys())}, expected {cols}")
    return cols


def rows_to_csv(rows: Sequence[Mapping]) -> str:
    """CSV text (header + one line per row, "\\n" line ends) of dicts that share their keys."""
    cols = _columns(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for row in rows:
        writer.writerow([format_value(row[c]) for c in cols])
    return buf.getvalue()


def rows_to_markdown(rows: Sequence[Mapping]) -> str:
    """A GitHub Markdown table of dicts that share their keys ("|" in cells escaped)."""
    cols = _columns(rows)

    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    out = [line(cols), "|" + "|".join(" --- " for _ in cols) + "|"]
    out += [line(format_value(row[c]) for c in cols) for row in rows]
    return "\n".join(out) + "\n"


def plot_pass_at_k(
    curves: Mapping[str, Mapping[int, float]], path: str, *, title: Optional[str] = None
) -> str:
    """Write a PNG of pass@k against k (log2 axis), one line per named curve; returns the path."""
    if not curves:
        raise ValueError("curves must hold at least one named {k: pass@k} curve")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ks = sorted(curve)
        ax.plot(ks, [curve[k] for k in ks], marker="o", label=str(name))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def write_report(report: LeashReport, out_dir: str, *, plot: bool = True) -> dict[str, str]:
    """Write per_problem.{csv,md}, summary.{csv,md} and (with plot) pass_at_k.png into out_dir.

    Files are written atomically (temporary file + rename). Returns {name: path}.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for stem, rows in (("per_problem", report.rows), ("summary", summary_rows(report.summary))):
        for ext, render in (("csv", rows_to_csv), ("md", rows_to_markdown)):
            paths[f"{stem}.{ext}"] = os.path.join(out_dir, f"{stem}.{ext}")
            _write_text(paths[f"{stem}.{ext}"], render(rows))
    if plot:
        paths["pass_at_k.png"] = plot_pass_at_k(
            report.curves, os.path.join(out_dir, "pass_at_k.png"), title="pass@k: base vs trained"
        )
    return paths
