"""A LoRA adapter on the lm-head, fused into the logit tiles: u = h W^T + scale (h A^T) B^T + b.

PEFT's layout: `a` is `lora_A.weight` [r, H], `b` is `lora_B.weight` [V, r], `scale` is `scaling`. Both
backends add the rank-r term inside each logit tile from the projection `hA = scale * h A^T` [N, r] (fp32,
computed once per call), so neither the merged [V, H] weight W + scale B A nor the [N, V] logits exist.

Backward (docs/methods.md, section 1): per vocabulary chunk of logit gradients du [N, C],
    dB[chunk] = du^T hA            and    g += du B[chunk]        (g = d(hA), [N, r], fp32)
then once, after the chunks,
    dA = scale g^T h               and    d_hidden += scale g A.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

_ROW_BLOCK = 2048  # rows upcast to fp32 at a time for the [N, H] x [H, r] products


@dataclass(frozen=True)
class LoRA:
    """The adapter's tensors and scale, as the fused op's params carry them."""

    a: torch.Tensor  # [r, H]
    b: torch.Tensor  # [V, r] (vocabulary-parallel: this rank's rows, as the weight)
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """hA = scale * hidden @ a.T, fp32 [N, r] contiguous (rows upcast a block at a time)."""
        a = self.a.float()
        out = torch.empty((hidden.shape[0], self.rank), dtype=torch.float32, device=hidden.device)
        for r0 in range(0, hidden.shape[0], _ROW_BLOCK):
            r1 = min(hidden.shape[0], r0 + _ROW_BLOCK)
            torch.mm(hidden[r0:r1].float(), a.T, out=out[r0:r1])
        return out.mul_(self.scale)

    def input_grads(
        self, g: torch.Tensor, hidden: torch.Tensor, dh: Optional[torch.Tensor], need_a: bool
    ) -> Optional[torch.Tensor]:
        """From g = d(hA) [N, r] fp32: d_hidden += scale g A (in place, fp32) and dA = scale g^T h (fp32: the
        caller sums it over vocabulary shards, then casts it to a's dtype; None without need_a)."""
        if dh is not None:
            dh.addmm_(g, self.a.float(), alpha=self.scale)
        if not need_a:
            return None
        da = torch.zeros((self.rank, hidden.shape[1]), dtype=torch.float32, device=hidden.device)
        for r0 in range(0, hidden.shape[0], _ROW_BLOCK):
            r1 = min(hidden.shape[0], r0 + _ROW_BLOCK)
            da.addmm_(g[r0:r1].T, hidden[r0:r1].float())
        return da.mul_(self.scale)
