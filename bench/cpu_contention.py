"""Training-step time on a quiet CPU and next to CPU-bound competitor processes, per thread policy.

    python -m bench.cpu_contention                                   # tiny model, a few seconds per run
    python -m bench.cpu_contention --preset default --steps 3        # SmolLM2-135M, the `make train` step
    python -m bench.cpu_contention --preset default --set prompts_per_step=4 --competitors 2 --nice 10

Each (policy, load) pair runs in a fresh process: it builds the trainer of the given config, runs --warmup
training steps, then times --steps more (wall and this process's CPU time per step). "loaded" starts
--competitors pure-Python busy loops (one core each, at --nice) before the process and stops them after.
Policies:

- torch-default: no OpenMP wait settings, torch's own thread count (what a run did before
  fused_rlvr._threads existed);
- auto: what the command-line entry points do: `openmp_env_defaults()` before torch loads, then
  `configure_threads(0)`;
- passive (OMP_WAIT_POLICY=PASSIVE), active (OMP_WAIT_POLICY=ACTIVE), one-thread (auto's environment, 1
  thread): for comparison;
- any `KEY=VALUE[,KEY=VALUE...][@THREADS]`, e.g. `GOMP_SPINCOUNT=1000@2`: those variables (and torch's
  default threads, or THREADS).

OMP_NUM_THREADS, OMP_WAIT_POLICY, GOMP_SPINCOUNT and KMP_BLOCKTIME of the calling shell are removed from
every run, so each policy sees the same start. Besides the step times, each run records how busy the rest
of the machine was while it ran ("background CPUs": all CPU time of the machine from /proc/stat minus
this process's, per second of wall time): on a shared machine, a "quiet" run is only as quiet as that.

Results: bench/results/cpu-contention-<model>/contention.{csv,json} (or --out). The summary line per policy
is the median step time loaded / quiet.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CLEARED = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS")
POLICIES = ("torch-default", "auto", "passive", "active", "one-thread")


def policy_env(policy: str, base: dict[str, str]) -> tuple[dict[str, str], int | None]:
    """(environment of the run, threads to configure: None = leave torch's default, 0 = automatic)."""
    from fused_rlvr._threads import openmp_env_defaults

    env = {k: v for k, v in base.items() if k not in _CLEARED}
    if policy == "torch-default":
        return env, None
    if policy == "auto":
        openmp_env_defaults(env)
        return env, 0
    if policy == "passive":
        return {**env, "OMP_WAIT_POLICY": "PASSIVE"}, 0
    if policy == "active":
        return {**env, "OMP_WAIT_POLICY": "ACTIVE"}, 0
    if policy == "one-thread":
        openmp_env_defaults(env)
        return env, 1
    spec, _, threads = policy.partition("@")
    pairs = [kv.partition("=") for kv in spec.split(",") if kv]
    if not pairs or any(not sep or not k for k, sep, _ in pairs) or (threads and not threads.isdigit()):
        raise ValueError(f"unknown policy {policy!r}; policies: {POLICIES} or KEY=VALUE[,...][@THREADS]")
    env.update({k: v for k, _, v in pairs})
    return env, int(threads) if threads else None


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])  # guest time is already inside user
    return total - idle, total


def worker(args: argparse.Namespace) -> dict:
    import torch

    from fused_rlvr._threads import configure_threads
    from fused_rlvr.train import make_config
    from fused_rlvr.train.trainer import Trainer

    threads = None if args.threads == "default" else int(args.threads)
    if threads is not None:
        configure_threads(threads)
    overrides = dict(_parse_set(args.set))
    with tempfile.TemporaryDirectory() as tmp:
        overrides.update(out_dir=tmp, progress=False, n_eval=0, steps=args.warmup + args.steps)
        cfg = make_config(args.preset, overrides)
        torch.manual_seed(cfg.seed)
        tr = Trainer(cfg)
        hz = os.sysconf("SC_CLK_TCK")
        steps = []
        for i in range(args.warmup + args.steps):
            busy0, _ = _cpu_ticks()
            t0, c0 = time.perf_counter(), os.times()
            rec = tr.train_step()
            t1, c1 = time.perf_counter(), os.times()
            busy1, _ = _cpu_ticks()
            tr.step += 1
            wall = t1 - t0
            own = (c1.user - c0.user) + (c1.system - c0.system)
            steps.append(
                dict(
                    step=i,
                    warmup=i < args.warmup,
                    wall_s=wall,
                    cpu_s=own,
                    rollout_s=rec.get("time_rollout"),
                    background_cpus=max(0.0, ((busy1 - busy0) / hz - own) / wall),
                )
            )
    return dict(
        torch_threads=torch.get_num_threads(),
        env={k: os.environ[k] for k in _CLEARED if k in os.environ},
        steps=steps,
    )


def _parse_set(items: list[str]) -> list[tuple[str, object]]:
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes FIELD=VALUE, got {item!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out.append((key, value))
    return out


def start_competitors(n: int, nice: int) -> list[subprocess.Popen]:
    """n pure-Python busy loops, each one core of CPU-bound work at the given nice level."""

    def lower_priority():
        os.nice(nice)

    return [
        subprocess.Popen(
            [sys.executable, "-c", "while True: pass"], preexec_fn=lower_priority if nice else None
        )
        for _ in range(n)
    ]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait()


def run_one(args: argparse.Namespace, policy: str, loaded: bool) -> dict:
    env, threads = policy_env(policy, dict(os.environ))
    cmd = [sys.executable, "-m", "bench.cpu_contention", "--worker", "--preset", args.preset]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--threads", "default" if threads is None else str(threads)]
    for item in args.set:
        cmd += ["--set", item]
    competitors = start_competitors(args.competitors, args.nice) if loaded else []
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    finally:
        stop(competitors)
    if out.returncode != 0:
        raise RuntimeError(f"{policy} ({'loaded' if loaded else 'quiet'}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM: stop the competitors and the running process on the way out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="trainer preset (default: %(default)s)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument(
        "--policies",
        nargs="+",
        default=["torch-default", "auto"],
        help=f"{', '.join(POLICIES)} or KEY=VALUE[,...][@THREADS] (default: torch-default auto)",
    )
    ap.add_argument("--competitors", type=int, default=1, help="CPU-bound processes in the loaded runs")
    ap.add_argument("--nice", type=int, default=0, help="nice level of the competitors")
    ap.add_argument("--repeats", type=int, default=1, help="runs per (policy, load)")
    ap.add_argument("--loads", nargs="+", default=["quiet", "loaded"], choices=["quiet", "loaded"])
    ap.add_argument("--out", default=None, help="folder (default: bench/results/cpu-contention-<model>)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", default="default", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    from fused_rlvr.train import make_config

    signal.signal(signal.SIGTERM, _raise_interrupt)
    for policy in args.policies:
        policy_env(policy, {})  # an unknown policy fails before any run
    model = make_config(args.preset, dict(_parse_set(args.set))).model.replace("/", "_")
    out_dir = args.out or os.path.join(ROOT, "bench", "results", f"cpu-contention-{model}")
    os.makedirs(out_dir, exist_ok=True)
    rows, runs = [], []
    for rep in range(args.repeats):
        for policy in args.policies:
            for loaded in [load == "loaded" for load in args.loads]:
                load = f"{args.competitors} competitor(s)" if loaded else "quiet"
                r = run_one(args, policy, loaded)
                timed = [s for s in r["steps"] if not s["warmup"]]
                med = statistics.median(s["wall_s"] for s in timed)
                bg = statistics.mean(s["background_cpus"] for s in timed)
                print(
                    f"{policy:14s} {load:16s} threads {r['torch_threads']}  step {med:7.2f} s (median of "
                    f"{len(timed)})  cpu/wall {statistics.mean(s['cpu_s'] / s['wall_s'] for s in timed):.2f}"
                    f"  background CPUs {bg:.2f}",
                    flush=True,
                )
                runs.append(dict(policy=policy, loaded=loaded, repeat=rep, **r))
                for s in r["steps"]:
                    rows.append(
                        dict(
                            policy=policy,
                            load="loaded" if loaded else "quiet",
                            competitors=args.competitors if loaded else 0,
                            repeat=rep,
                            threads=r["torch_threads"],
                            **s,
                        )
                    )
    summary = {}
    for policy in args.policies:
        med = {}
        for load in args.loads:
            walls = [
                r["wall_s"] for r in rows if r["policy"] == policy and r["load"] == load and not r["warmup"]
            ]
            med[f"{load}_s"] = statistics.median(walls)
        if len(med) == 2:
            med["ratio"] = med["loaded_s"] / med["quiet_s"]
            print(f"{policy:14s} loaded / quiet = {med['ratio']:.2f}")
        summary[policy] = med
    with open(os.path.join(out_dir, "contention.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    meta = dict(
        preset=args.preset,
        overrides=args.set,
        steps=args.steps,
        warmup=args.warmup,
        competitors=args.competitors,
        nice=args.nice,
        cpus=os.cpu_count(),
        summary=summary,
        runs=runs,
    )
    with open(os.path.join(out_dir, "contention.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"written to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
