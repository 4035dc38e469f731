"""fused-rlvr: fused lm-head log-probs, entropy and RLVR losses without materialising logits."""

import importlib.util as _ilu
import os as _os
import sys as _sys

if _ilu.find_spec("fused_rlvr.kernels") is None:  # a source checkout used without `pip install`:
    # kernels/ lies beside this package; map it as fused_rlvr.kernels, as setup.py's package_dir does.
    _src = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    _spec = _ilu.spec_from_file_location(
        "fused_rlvr.kernels", _os.path.join(_src, "__init__.py"), submodule_search_locations=[_src]
    )
    _sys.modules["fused_rlvr.kernels"] = _ilu.module_from_spec(_spec)
    _spec.loader.exec_module(_sys.modules["fused_rlvr.kernels"])

from fused_rlvr._validation import set_target_check  # noqa: E402
from fused_rlvr.advantages import SteerConfig, group_advantages, steer_weights  # noqa: E402
from fused_rlvr.grpo import GRPO_PARTS, POLICY_LOSSES, GRPOStats, linear_grpo_loss  # noqa: E402
from fused_rlvr.linear_logprobs import linear_entropy_moments, linear_logprobs  # noqa: E402
from fused_rlvr.modules import LinearGRPOLoss, LinearPACSLoss  # noqa: E402
from fused_rlvr.off_policy import ROLLOUT_CORRECTION_MODES, rollout_correction  # noqa: E402
from fused_rlvr.pacs import PACSStats, linear_pacs_loss  # noqa: E402
from fused_rlvr.types import IGNORE_INDEX, TokenStats  # noqa: E402
from fused_rlvr.vocab_parallel import VocabParallel  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "GRPO_PARTS",
    "IGNORE_INDEX",
    "POLICY_LOSSES",
    "ROLLOUT_CORRECTION_MODES",
    "GRPOStats",
    "LinearGRPOLoss",
    "LinearPACSLoss",
    "PACSStats",
    "SteerConfig",
    "TokenStats",
    "VocabParallel",
    "group_advantages",
    "linear_entropy_moments",
    "linear_grpo_loss",
    "linear_logprobs",
    "linear_pacs_loss",
    "rollout_correction",
    "set_target_check",
    "steer_weights",
]
