"""training.png: the run's metrics against the step, on a grid; it reads the records, never the loop.

Held-out accuracy is drawn as markers (before, every `eval_every`, after) with their values; a panel whose
series never move from one value (KL and clip fraction of a run with one on-policy update per batch and no
reference) says so in its middle instead of drawing a flat line; a panel with no data is left out.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple


class Panel(NamedTuple):
    title: str
    keys: tuple[str, ...]
    ylabel: str
    markers: bool = False  # points with their values (evaluations), not a line


PANELS = (
    Panel("reward (train rollouts)", ("reward_mean",), "mean reward"),
    Panel("held-out accuracy", ("eval_accuracy",), "greedy accuracy", markers=True),
    Panel("entropy", ("entropy",), "mean token entropy (nats)"),
    Panel("response length", ("response_length",), "tokens"),
    Panel("truncated responses", ("truncated_frac",), "fraction at max_new_tokens"),
    Panel("loss", ("loss",), "loss per optimizer step"),
    Panel("gradient norm", ("grad_norm",), "before clipping"),
    Panel("KL", ("approx_kl", "ref_kl"), "KL estimate"),
    Panel("clip fraction", ("clip_frac_low", "clip_frac_high"), "fraction of tokens"),
)


def _series(records: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    out = []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "step" in r:
            out.append((r["step"], float(v)))
    return out


def plot_training(
    records: list[dict[str, Any]], path: str, title: str = "", columns: int = 3
) -> dict[str, str]:
    """Write training.png (atomically) from the metrics records; returns how each panel drawn shows its data:
    "line", "markers" (evaluations) or "constant" (one value throughout, said in words)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [(p, {k: s for k in p.keys if (s := _series(records, k))}) for p in PANELS]
    panels = [(p, data) for p, data in panels if data]
    shown: dict[str, str] = {}
    if not panels:
        return shown
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (panel, data) in zip(axes.flat, panels):
        values = {v for pts in data.values() for _, v in pts}
        shown[panel.title] = "markers" if panel.markers else "line"
        for key, pts in data.items():
            xs, ys = zip(*pts)
            if panel.markers:
                ax.plot(xs, ys, "o", ms=6, label=key)
                for x, y in pts:
                    ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center")
            else:
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=key)
        if len(values) == 1 and not panel.markers and len(next(iter(data.values()))) > 1:
            shown[panel.title] = "constant"
            ax.text(
                0.5,
                0.5,
                f"{', '.join(data)}: {values.pop():g} at every step",
                transform=ax.transAxes,
                ha="center",
                va="center",
                fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.7"},
            )
        if panel.markers:
            lo, hi = min(values), max(values)
            pad = max(0.05, 0.15 * (hi - lo))
            ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad) + pad / 2)
            steps = [r["step"] for r in records if "step" in r]
            if steps:
                margin = max(0.5, 0.08 * (max(steps) - min(steps)))
                ax.set_xlim(min(steps) - margin, max(steps) + margin)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel, fontsize=8)
        if len(data) > 1:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return shown
