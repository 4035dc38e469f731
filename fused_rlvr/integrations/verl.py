"""verl-style entry points: the fused log-prob + entropy call with verl's shapes and argument order.

verl scores the actor with `use_fused_kernels=True` through one of two calls, both
`(hidden_states [..., H], weight [V, H], labels [...], temperature) -> (log_probs [...], entropy [...])`:

- `verl.utils.kernel.linear_cross_entropy.linear_cross_entropy(hidden, weight, labels, temperature,
  reduction)` (its Triton kernel; needs H % 128 == 0, no ignore_index; a vocabulary tail bug in its
  history), and
- `verl.utils.experimental.torch_functional.FusedLinearForPPO(chunk_size)(hidden_states, vocab_weights,
  input_ids, temperature)` (chunked torch, which still builds [chunk, V] logits).

`linear_logprobs_entropy` / `linear_cross_entropy` / `FusedLinearForPPO` below take the same arguments and
return the same pair, computed by `fused_rlvr.linear_logprobs`: no [tokens x V] logits in forward or backward,
any H, any V. To swap them in, replace verl's names before the actor runs its first forward::

    import verl.utils.kernel.linear_cross_entropy as verl_lce
    import verl.utils.experimental.torch_functional as verl_tf
    from fused_rlvr.integrations import verl as fused
    verl_lce.linear_cross_entropy = fused.linear_cross_entropy
    verl_tf.FusedLinearForPPO = fused.FusedLinearForPPO

Differences: outputs are fp32 (verl's torch path returns the logits' dtype). verl's tensor-parallel path
(`dist_process_group`: each rank holds an equal, contiguous vocabulary shard of the weight) maps to the
vocabulary-parallel op (`VocabParallel(group, vocab_start=rank * shard rows, reduce_grad_hidden=False)`),
following verl's convention for the hidden-state gradient: its kernel returns each rank's partial
d_hidden and its Megatron path sums it outside, in the backward of the sequence-parallel gather.
"""

from __future__ import annotations

from typing import Optional

import torch

from fused_rlvr._validation import one_of
from fused_rlvr.linear_logprobs import linear_logprobs
from fused_rlvr.types import IGNORE_INDEX
from fused_rlvr.vocab_parallel import VocabParallel

REDUCTIONS = ("none", "sum", "mean")


def linear_logprobs_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    reduction: str = "none",
    *,
    bias: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    ignore_index: Optional[int] = None,
    backend: str = "auto",
    vocab_parallel: Optional[VocabParallel] = None,
    lora_a: Optional[torch.Tensor] = None,
    lora_b: Optional[torch.Tensor] = None,
    lora_scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_probs, entropy) of `labels` under `hidden_states @ weight.T / temperature`, without the logits.

    Equals verl's reference (`_fused_linear_for_ppo_fwd`) in plain torch::

        logits = (hidden_states @ weight.T) / temperature
        log_probs = logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
        entropy = logits.logsumexp(-1) - (logits.softmax(-1) * logits).sum(-1)

    hidden_states [..., H] (e.g. [B, T, H] or packed [1, N, H]), labels [...] (e.g. verl's
    `torch.roll(input_ids, -1, -1)`), outputs fp32 shaped like labels, differentiable w.r.t. hidden_states
    and weight. reduction "sum" / "mean" reduces both outputs over all tokens (over the non-ignored ones for
    "mean"). Extras verl's call lacks: bias, softcap (Gemma-2), ignore_index (those labels give 0 and cost
    no vocabulary work) and a per-token temperature (a tensor shaped like labels). vocab_parallel: `weight`
    is this rank's vocabulary shard (a `fused_rlvr.VocabParallel`, see `fused_rlvr.linear_logprobs`); the
    outputs are the full-vocabulary values on every rank. lora_a [r, H], lora_b [V, r], lora_scale: a LoRA
    adapter on the lm-head (logits + lora_scale (h A^T) B^T), as in `fused_rlvr.linear_logprobs`.
    """
    one_of("reduction", reduction, REDUCTIONS)
    ignore = IGNORE_INDEX if ignore_index is None else ignore_index
    log_probs, entropy = linear_logprobs(
        hidden_states,
        weight,
        labels,
        bias=bias,
        temperature=temperature,
        softcap=softcap,
        ignore_index=ignore,
        return_entropy=True,
        backend=backend,
        vocab_parallel=vocab_parallel,
        lora_a=lora_a,
        lora_b=lora_b,
        lora_scale=lora_scale,
    )
    if reduction == "none":
        return log_probs, entropy
    if reduction == "sum":
        return log_probs.sum(), entropy.sum()
    count = (labels.long() != ignore).sum().clamp(min=1)
    return log_probs.sum() / count, entropy.sum() / count


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    reduction: str = "none",
    dist_process_group=None,
    *,
    lora_a: Optional[torch.Tensor] = None,
    lora_b: Optional[torch.Tensor] = None,
    lora_scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for `verl.utils.kernel.linear_cross_entropy.linear_cross_entropy` (same positional order).

    With `dist_process_group` (verl's tensor-parallel lm-head) `weight` is this rank's equal, contiguous
    vocabulary shard: rows [rank * V_r, (rank + 1) * V_r) of the full head; `labels` are global token ids.
    The vocabulary-parallel op checks across ranks that the shards tile the vocabulary. As verl's own
    kernel, the hidden-state gradient is this rank's partial sum over its shard (verl's Megatron path sums
    it over the group in the backward of its sequence-parallel gather): no all-reduce happens here.
    lora_a, lora_b, lora_scale: a LoRA adapter on the head (with dist_process_group: lora_b holds the
    weight's rows, lora_a is replicated and gets its full gradient on every rank).
    """
    vp = None
    if dist_process_group is not None:
        import torch.distributed as dist

        start = dist.get_rank(dist_process_group) * weight.shape[0]
        vp = VocabParallel(dist_process_group, start, reduce_grad_hidden=False)
    return linear_logprobs_entropy(
        hidden,
        weight,
        labels,
        temperature,
        reduction,
        vocab_parallel=vp,
        lora_a=lora_a,
        lora_b=lora_b,
        lora_scale=lora_scale,
    )


class FusedLinearForPPO(torch.nn.Module):
    """Drop-in for `verl.utils.experimental.torch_functional.FusedLinearForPPO`.

    `chunk_size` is accepted for compatibility and ignored: the fused op picks its own tiles.
    """

    def __init__(self, chunk_size: int = 512, backend: str = "auto"):
        super().__init__()
        self.chunk_size = chunk_size
        self.backend = backend

    def forward(
        self,
        hidden_states: torch.Tensor,
        vocab_weights: torch.Tensor,
        input_ids: torch.Tensor,
        temperature: float | torch.Tensor = 1.0,
        *,
        lora_a: Optional[torch.Tensor] = None,
        lora_b: Optional[torch.Tensor] = None,
        lora_scale: Optional[float] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log_probs, entropy) as `linear_logprobs_entropy`, with an optional LoRA adapter on the head."""
        return linear_logprobs_entropy(
            hidden_states,
            vocab_weights,
            input_ids,
            temperature,
            backend=self.backend,
            lora_a=lora_a,
            lora_b=lora_b,
            lora_scale=lora_scale,
        )
