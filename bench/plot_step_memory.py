"""Plot of `python -m bench.step_memory` results: memory above the floor and step time, per provider.

python -m bench.plot_step_memory bench/results/cpu-step-memory      # writes step_memory.png there
"""

from __future__ import annotations

import argparse
import json
import os
import sys

LABELS = {
    "floor": "floor (body fwd+bwd)",
    "fused-rlvr": "fused-rlvr",
    "trl-fused": "TRL + FusedGRPOTrainer",
    "trl": "TRL GRPOTrainer",
    "liger": "Liger GRPO loss",
    "torch": "materialised logits",
}


def plot(folder: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(folder, "step_memory.json")) as f:
        meta = json.load(f)
    rows = [r for r in meta["rows"] if r["provider"] != "floor"]
    floor = next((r for r in meta["rows"] if r["provider"] == "floor"), None)
    mib = 1 << 20
    names = [LABELS.get(r["provider"], r["provider"]) for r in rows]
    above = [(r["above_floor"] if r["above_floor"] is not None else r["extra"]) / mib for r in rows]
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(12, 0.6 * len(rows) + 2))
    ax_m.barh(names, above, color="tab:blue")
    for y, v in enumerate(above):
        ax_m.text(max(v, 0), y, f" {v:+,.0f}", va="center")
    ax_m.set_xlabel("peak memory above the floor (MiB)" if floor else "peak memory above the start (MiB)")
    ax_m.invert_yaxis()
    ax_m.set_xlim(0, max(above + [1]) * 1.25)
    secs = [r["seconds"] for r in rows]
    ax_t.barh(names, secs, color="tab:orange")
    if floor:
        ax_t.axvline(floor["seconds"], color="grey", ls="--", label=f"floor {floor['seconds']:.2f} s")
        ax_t.legend(loc="lower right")
    ax_t.set_xlabel("step time (s)")
    ax_t.invert_yaxis()
    ax_t.set_yticklabels([])
    where = meta.get("gpu") or f"CPU ({meta['cpus']} cores)"
    title = (
        f"One GRPO step: Qwen2.5-0.5B shape, {meta['layers']} layers, "
        f"{meta['batch']} x {meta['seq']} tokens, {meta['dtype']}, {where}"
    )
    if floor:
        title += f"; floor +{floor['extra'] / mib:,.0f} MiB"
    fig.suptitle(title)
    fig.tight_layout()
    path = os.path.join(folder, "step_memory.png")
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a folder written by bench.step_memory")
    args = ap.parse_args(argv)
    print(plot(args.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
