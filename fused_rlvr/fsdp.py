"""FSDP2-sharded modules: run a fused loss as the forward of the module that owns the lm-head."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def fsdp2_lm_head_call(lm_head: torch.nn.Module, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """`fn(lm_head, *args, **kwargs)` run as the forward of `lm_head`, through `lm_head.__call__`.

    FSDP2 (`torch.distributed.fsdp.fully_shard`) all-gathers a module's sharded parameters in its forward
    pre-hook, frees them after the forward, and registers the hooks that re-gather them for the backward
    and reduce-scatter their gradients on the forward's inputs and outputs. A fused loss that reads
    `lm_head.weight` outside `lm_head(...)` would see a sharded DTensor; through this call, `fn` sees the
    full [V, H] weight and the weight gradient of the fused op lands, reduce-scattered, in
    `lm_head.weight.grad` like that of any FSDP2 module. Tensors that need gradients (the hidden states)
    must be passed in args/kwargs, not captured by `fn`. Example::

        loss, stats = fsdp2_lm_head_call(
            model.lm_head,
            lambda head, h: linear_grpo_loss(h, head.weight, targets, adv, mask, bias=head.bias),
            hidden,
        )

    Without FSDP it is a plain call of fn (other forward hooks of lm_head run too).
    """
    had_own = "forward" in lm_head.__dict__
    original = lm_head.__dict__.get("forward")

    def restore():
        if had_own:
            lm_head.forward = original
        else:
            lm_head.__dict__.pop("forward", None)

    def forward(*a, **k):
        restore()  # fn may call lm_head.forward itself
        return fn(lm_head, *a, **k)

    lm_head.forward = forward
    try:
        return lm_head(*args, **kwargs)
    finally:
        restore()
