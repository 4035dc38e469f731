"""The thin RLVR trainer: `fused-rlvr train` / `python -m fused_rlvr.train` (see trainer.py for the loop)."""

from fused_rlvr.train.config import PRESETS, TrainConfig, config_from_args, make_config
from fused_rlvr.train.hooks import DarsHook, Hook, RolloutRequest, dars_extra

__all__ = [
    "PRESETS",
    "DarsHook",
    "Hook",
    "RolloutRequest",
    "TrainConfig",
    "config_from_args",
    "dars_extra",
    "main",
    "make_config",
    "train",
]


def train(cfg: TrainConfig, hooks=()) -> dict:
    """Run the trainer on `cfg` with extra `hooks`; returns the summary (also written to out_dir).

    Under torchrun with several processes, or with `cfg.fsdp`, the FSDP2 trainer
    (`fused_rlvr.train.distributed.DistributedTrainer`) runs instead, on every rank."""
    from fused_rlvr.train import distributed

    if distributed.requested(cfg):
        trainer = distributed.DistributedTrainer(cfg, hooks)
        summary = trainer.train()
        trainer.close()
        return summary
    from fused_rlvr.train.trainer import Trainer

    return Trainer(cfg, hooks).train()


def main(argv=None) -> int:
    import json
    import sys

    from fused_rlvr.train.checkpoint import CheckpointError
    from fused_rlvr.train.config import ConfigError
    from fused_rlvr.train.distributed import is_main_process

    try:
        cfg = config_from_args(argv)
        summary = train(cfg)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:  # bad input: one line, no traceback
        print(f"fused-rlvr train: error: {e}", file=sys.stderr)
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
