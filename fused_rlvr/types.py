"""Result types shared by the public API."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

IGNORE_INDEX = -100  # target id of a token that is not scored (PyTorch's and Hugging Face's convention)


class TokenStats(NamedTuple):
    """Per-token statistics, fp32, shaped like the targets (0 on ignored tokens)."""

    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor]
