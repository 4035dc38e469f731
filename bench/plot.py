"""Plots from a results.csv of bench.run (never measures anything itself).

python -m bench.plot bench/results/cpu        # writes target.png and scaling.png beside the CSV
"""

from __future__ import annotations

import csv
import os
import sys
from collections import defaultdict


def load(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    folder = argv[0] if argv else "bench/results/cpu"
    rows = load(os.path.join(folder, "results.csv"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = rows[0]["device"] if rows else "?"
    # 1. target shape: fwd+bwd time per provider, per op
    target = [
        r
        for r in rows
        if r["x_name"] == "model"
        and r["mode"] == "fwd+bwd"
        and r["metric"] == "median_ms"
        and r["op"] != "lm_head_gemm"
    ]
    floor = [float(r["value"]) for r in rows if r["op"] == "lm_head_gemm" and r["metric"] == "median_ms"]
    ops = sorted({r["op"] for r in target})
    if ops:
        fig, axes = plt.subplots(1, len(ops), figsize=(4.2 * len(ops), 3.6), squeeze=False)
        for ax, op in zip(axes[0], ops):
            rs = [r for r in target if r["op"] == op]
            ax.barh([r["provider"] for r in rs], [float(r["value"]) for r in rs], color="tab:blue")
            if floor:
                ax.axvline(floor[0], color="k", ls="--", lw=1, label="bare lm-head GEMM fwd+bwd")
                ax.legend(fontsize=7, loc="lower right")
            ax.set_title(op, fontsize=10)
            ax.set_xlabel("fwd+bwd ms (lower is better)")
        fig.suptitle(f"{device}: {target[0]['shape']}, {target[0]['dtype']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(folder, "target.png"), dpi=110)
    # 2. scaling: time and added memory against tokens and vocabulary
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5))
    for col, x_name in enumerate(("tokens", "vocab")):
        for row, metric in enumerate(("median_ms", "added_over_fp32_logits")):
            ax = axes[row][col]
            series = defaultdict(list)
            for r in rows:
                if r["x_name"] == x_name and r["metric"] == metric and r["mode"] == "fwd+bwd":
                    series[r["provider"]].append((float(r["x"]), float(r["value"])))
            for provider, pts in sorted(series.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
            ax.set_xscale("log", base=2)
            if metric == "median_ms":
                ax.set_yscale("log")
            ax.set_xlabel(x_name)
            ax.set_ylabel("fwd+bwd ms" if metric == "median_ms" else "added memory / fp32 logits")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"log-prob + entropy scaling, {device}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "scaling.png"), dpi=110)
    print("wrote", os.path.join(folder, "target.png"), os.path.join(folder, "scaling.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
