"""Per-step metrics to JSONL and CSV, and the PNG plots; plotting reads the records, never the loop."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any

from fused_rlvr.train.checkpoint import atomic_write_text


class MetricsLog:
    """metrics.jsonl (one object per step, appended and flushed) and metrics.csv (rewritten atomically)."""

    def __init__(self, out_dir: str, resume_step: int = 0):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.csv_path = os.path.join(out_dir, "metrics.csv")
        self.records: list[dict[str, Any]] = []
        if resume_step and os.path.exists(self.path):  # keep what the checkpoint covers, drop the rest
            with open(self.path, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        rec = json.loads(line)
                        if rec.get("step", 0) <= resume_step:
                            self.records.append(rec)
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def write_csv(self) -> None:
        keys: list[str] = []
        for r in self.records:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.records)
        atomic_write_text(self.csv_path, buf.getvalue())


PANELS = (
    ("reward", ("reward_mean",), "mean reward (train rollouts)"),
    ("held-out accuracy", ("eval_accuracy",), "greedy accuracy"),
    ("entropy", ("entropy",), "mean token entropy (nats)"),
    ("KL", ("approx_kl", "ref_kl"), "KL estimate"),
    ("clip fraction", ("clip_frac_low", "clip_frac_high"), "fraction of tokens"),
)


def plot(records: list[dict[str, Any]], path: str, title: str = "") -> None:
    """training.png: reward, held-out accuracy, entropy, KL and clip fraction against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (name, keys, ylabel) in zip(axes, PANELS):
        for key in keys:
            pts = [
                (r["step"], r[key])
                for r in records
                if key in r and r[key] is not None and math.isfinite(r[key])
            ]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if len(keys) > 1 and ax.get_lines():
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
