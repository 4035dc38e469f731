"""What a run writes into its out_dir besides checkpoints: config.json, metrics.jsonl / metrics.csv (one
record per step), samples.jsonl (a few responses per step), training.png and summary.json.

JSONL files are appended and flushed line by line. A resumed run keeps the lines of the steps its checkpoint
covers and drops the rest; a last line cut short by a kill mid-write is dropped with a note (any other
unreadable line is an error naming the file and line). Only one process of a run writes (`enabled`), and
only it shows progress bars (tqdm; the config's `progress`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Optional

from fused_rlvr.train.files import atomic_write_text
from fused_rlvr.train.plot import plot_training

if TYPE_CHECKING:  # pragma: no cover
    from fused_rlvr.train.rollout import RolloutBatch

METRICS, SAMPLES, SUMMARY, CONFIG, PLOT = (
    "metrics.jsonl",
    "samples.jsonl",
    "summary.json",
    "config.json",
    "training.png",
)


def read_jsonl_steps(path: str, max_step: int) -> list[dict[str, Any]]:
    """The records of `path` whose "step" is <= max_step; a partial last line is dropped with a note."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if any(rest.strip() for rest in lines[i + 1 :]):
                raise ValueError(
                    f"{path}:{i + 1}: not valid JSON ({e.msg}); remove or fix that line"
                ) from None
            print(f"{path}:{i + 1}: a partial last line (cut short mid-write) is dropped", file=sys.stderr)
            continue
        if rec.get("step", 0) <= max_step:
            out.append(rec)
    return out


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass


class RunLog:
    """The run's files in `out_dir` (nothing is written, no bar shown, when `enabled` is False)."""

    def __init__(self, out_dir: str, *, enabled: bool = True, progress: bool = True):
        self.out_dir, self.enabled, self.show_progress = out_dir, enabled, progress
        self.records: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def progress(self, desc: Optional[str], total: int, unit: str, initial: int = 0) -> Iterator[Any]:
        """A tqdm bar for our own long work (held-out evaluations, the training steps), or one that shows
        nothing (desc None, progress off, not the main process); it has `update(n)` and `set_postfix`."""
        if desc is None or not (self.enabled and self.show_progress) or total <= initial:
            yield _NoBar()
            return
        from tqdm.auto import tqdm

        with tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True) as bar:
            yield bar

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def open(self, config: dict[str, Any], resume_step: int) -> None:
        """Write config.json; keep the metrics and samples of steps <= resume_step (none on a fresh run)."""
        if not self.enabled:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        atomic_write_text(self.path(CONFIG), json.dumps(config, indent=2))
        self.records = read_jsonl_steps(self.path(METRICS), resume_step) if resume_step else []
        self._rewrite(METRICS, self.records)
        samples = read_jsonl_steps(self.path(SAMPLES), resume_step) if resume_step else []
        self._rewrite(SAMPLES, samples)

    def _rewrite(self, name: str, records: list[dict[str, Any]]) -> None:
        atomic_write_text(self.path(name), "".join(json.dumps(r) + "\n" for r in records))

    def _append(self, name: str, records: list[dict[str, Any]]) -> None:
        if self.enabled and records:
            with open(self.path(name), "a", encoding="utf-8") as fh:
                fh.write("".join(json.dumps(r) + "\n" for r in records))
                fh.flush()

    def log(self, record: dict[str, Any]) -> None:
        """One step's metrics."""
        self.records.append(record)
        self._append(METRICS, [record])

    def update_last(self, **values: Any) -> None:
        """Add values to the last record (the final evaluation) and rewrite metrics.jsonl."""
        self.records[-1].update(values)
        if self.enabled:
            self._rewrite(METRICS, self.records)

    def log_samples(self, step: int, batch: Optional[RolloutBatch], n: int) -> None:
        """The first `n` responses of the step's batch, with their question, answer and reward."""
        rows = range(min(n, len(batch))) if batch is not None else range(0)
        self._append(
            SAMPLES,
            [
                {
                    "step": step,
                    "question": batch.problems[int(batch.group[i])].question,
                    "answer": batch.problems[int(batch.group[i])].answer,
                    "response": batch.texts[i],
                    "reward": float(batch.rewards[i]),
                }
                for i in rows
            ],
        )

    def finish(self, summary: dict[str, Any], title: str) -> None:
        """metrics.csv, training.png and summary.json."""
        if not self.enabled:
            return
        keys: list[str] = []
        for r in self.records:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.records)
        atomic_write_text(self.path("metrics.csv"), buf.getvalue())
        try:
            plot_training(self.records, self.path(PLOT), title=title)
        except ImportError:
            print("matplotlib is not installed: no training.png", file=sys.stderr)
        atomic_write_text(self.path(SUMMARY), json.dumps(summary, indent=2))
