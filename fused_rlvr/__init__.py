"""fused-rlvr: fused lm-head log-probs, entropy and RLVR losses without materialising logits."""

from fused_rlvr._validation import set_target_check
from fused_rlvr.linear_logprobs import linear_entropy_moments, linear_logprobs
from fused_rlvr.types import TokenStats

__version__ = "0.1.0"

__all__ = [
    "TokenStats",
    "linear_entropy_moments",
    "linear_logprobs",
    "set_target_check",
]
