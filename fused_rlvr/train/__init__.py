"""The thin RLVR trainer: `fused-rlvr train` / `python -m fused_rlvr.train`.

One loop in phases, the same for one process and for N processes under FSDP2 (trainer.py):

    train():  resume? -> held-out eval (before) -> train_step() x steps -> checkpoint -> eval (after)
    train_step():
      1. sample prompts (this process's share)                collect.py, tasks.py, parallel.py
      2. roll out G samples each                              policy.py (generate), rollout.py
      3. verify                                               tasks.py (Verifier)
      4. extra rollouts the hooks ask for (DARS, guidance)    hooks/
      5. rewards from the hooks (RLPR)                        hooks/
      6. group filters (uniform groups, hooks), refills       collect.py
      7. advantages (group baseline), shaping hooks (VERL)    fused_rlvr.advantages, hooks/
      8. old / reference log-probs, no grad                   scoring.py (Scorer)
      9. update: epochs x minibatches optimizer steps of      trainer.py
         micro-batches (whole-batch normaliser); the loss     algorithms.py
         through the policy's root forward                    policy.py (Policy.loss)
         skipped when its loss or gradient is not finite      guard.py
      10. metrics, samples, checkpoint                        runlog.py, checkpoint.py

Where each piece lives:

    config.py      TrainConfig (every field, its help and allowed values), presets, the command line
    algorithms.py  GRPO, PACS: the loss module, its divisor, minibatch / micro-batch rules
    policy.py      the model, tokenizer, sampling, the loss seam (`Policy.loss`)
    scoring.py     every micro-batched no-grad fused pass
    rollout.py     RolloutBatch (groups, rewards, trajectory), prompt formatting, generation
    collect.py     phases 1-6
    hooks/         Hook, StepContext; DARS, RLPR, VERL rank shaping, Agent-RLVR guidance
    tasks.py       arithmetic / JSONL tasks, the verifier, task-text helpers for the hooks
    parallel.py    one process (Parallel) or FSDP2: sharding, shares, collectives, merged metrics
    checkpoint.py  Checkpointer: atomic step folders, rotation, RNG capture
    runlog.py      metrics.jsonl / csv, samples.jsonl, summary.json, progress bars; plot.py: training.png
    guard.py       the divergence guard: skipped non-finite updates, no checkpoint of non-finite weights
    signals.py     Ctrl-C / SIGTERM: finish the step, save, stop
    files.py       atomic file writes
    models.py      the embedded SmolLM2 and the tiny test model; evaluate.py: `fused-rlvr eval`
"""

from fused_rlvr.train.config import PRESETS, TrainConfig, config_from_args, make_config
from fused_rlvr.train.hooks import DarsHook, Hook, RolloutRequest, StepContext, dars_extra

__all__ = [
    "PRESETS",
    "DarsHook",
    "Hook",
    "RolloutRequest",
    "StepContext",
    "TrainConfig",
    "config_from_args",
    "dars_extra",
    "main",
    "make_config",
    "train",
]


def train(cfg: TrainConfig, hooks=()) -> dict:
    """Run the trainer on `cfg` with extra `hooks`; returns the summary (also written to out_dir).

    Under torchrun with several processes, or with `cfg.fsdp`, every process runs it, with the model
    sharded by FSDP2 (`fused_rlvr.train.parallel`)."""
    from fused_rlvr.train.trainer import Trainer

    trainer = Trainer(cfg, hooks)
    try:
        return trainer.train()
    finally:
        trainer.close()


def main(argv=None) -> int:
    import json
    import os
    import sys

    from fused_rlvr.cli import input_error_line
    from fused_rlvr.train.checkpoint import CheckpointError
    from fused_rlvr.train.config import ConfigError
    from fused_rlvr.train.parallel import is_main_process

    try:
        cfg = config_from_args(argv)
        summary = train(cfg)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:  # bad input: one line, no traceback
        if os.environ.get("FUSED_RLVR_TRACEBACK"):
            raise
        print(input_error_line("fused-rlvr train", e), file=sys.stderr)
        return 2
    if not is_main_process():  # rank 0 reports
        return 0 if summary["status"] == "finished" else 130
    before, after = summary["before"]["accuracy"], summary.get("after", {}).get("accuracy")
    print(json.dumps({k: summary[k] for k in ("status", "step", "checkpoint", "total_seconds")}, indent=None))
    if after is not None:
        print(
            f"held-out accuracy: {before:.3f} -> {after:.3f} ({summary['gain_points']:+.1f} points, "
            f"{summary['before']['n']} problems); metrics, plot and summary in {cfg.out_dir}"
        )
        return 0
    return 130
