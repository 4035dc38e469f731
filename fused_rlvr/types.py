"""Result types shared by the public API."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class TokenStats(NamedTuple):
    """Per-token statistics, fp32, shaped like the targets (0 on ignored tokens)."""

    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor]
