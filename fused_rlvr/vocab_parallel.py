"""A vocabulary-parallel lm-head: the fused ops on a weight split by rows over a process group.

Pass `vocab_parallel=VocabParallel(group, vocab_start)` to `linear_logprobs`, `linear_entropy_moments`,
`linear_grpo_loss`, `linear_pacs_loss` or their modules (tensor-parallel lm-head, as in Megatron's
vocab-parallel cross-entropy and verl's `dist_process_group`). Every rank of `group` holds a contiguous
shard W[start : start + V_r] of the lm-head weight (and the same rows of the bias); hidden states and
targets are replicated on all ranks. Each rank names its first row (`vocab_start`; no default, so that a
full weight passed on every rank, or a group other than the one the weight was split over, is an error and
not a silently larger vocabulary).
Shards may be uneven (V not divisible by the group size) and in any order. Per row, each rank streams its
shard into the online-softmax partials of `fused_rlvr._partials` (max m, S = sum e^(z-m),
Sd = sum e^(z-m)(z-m), target logit z_y), then
    1. all-reduce MAX of m                      -> the global max M (N fp32)
    2. rescale S, Sd to M; all-reduce SUM of the packed [S, Sd, z_y] (3N fp32; 5N with the entropy moments),
       z_y being contributed by the one rank whose shard holds the target (0 elsewhere)
    3. lse, log-prob and entropy follow on every rank, equal to a single-process run on the full vocabulary.
Backward: each rank recomputes its shard's logit gradient dz_v = g_lp (1[v = y] - p_v) - g_H p_v (log p_v + H)
from the global lse and entropy saved by the forward, so d_weight and d_bias of its shard are complete
locally (no communication). d_hidden = sum_v dz_v W_v is only a partial sum over the shard: the op
all-reduces it (SUM, N_valid x H fp32) inside its backward, so every rank's replicated hidden states receive
the full gradient, exactly as without the split. Pass VocabParallel(..., reduce_grad_hidden=False) when the
caller reduces it (e.g. sequence parallelism, where the all-gather that replicated the hidden states
reduce-scatters the gradient in its own backward).
A LoRA adapter on the head (`lora_a`, `lora_b`): lora_b [V_r, r] is split by rows with the weight and lora_a
[r, H] is replicated. Each rank adds its rows' term scale (h A^T) B_r^T to its logits; in the backward
d_lora_b is complete locally, g = du B_r is the shard's part of d(hA), so d_lora_a = scale g^T h is a partial
sum that the op always all-reduces (SUM, r x H fp32): lora_a, like a replicated parameter, gets its full
gradient on every rank. The adapter's part of d_hidden, scale g A, is added to the shard's partial d_hidden
and reduced with it, by the op or, with reduce_grad_hidden=False, by the caller, as for the weight's part.

Checks: each call all-gathers a dozen int64 per rank (one host sync) and raises the same error on every rank
(so no rank is left waiting in a collective) when the shards do not tile [0, V) exactly, N, H, targets,
temperature (a float, or a per-token tensor's values on the scored tokens, through a checksum), softcap,
dtype or bias presence differ across ranks, the group is not the one the weight was
split over (overlapping or missing rows), or a target lies outside [0, V) (owned by no rank). With
`fused_rlvr.set_target_check(False)` the gather is skipped and the layout trusted (no host sync).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from fused_rlvr._partials import rescale_partials
from fused_rlvr._validation import target_check_enabled

_NO_TARGET = -1  # local target of a row whose target another rank owns: never matches a column


@dataclass(frozen=True)
class VocabParallel:
    """Options of a vocabulary-parallel call: `weight` (and `bias`) hold rows [vocab_start, vocab_start +
    weight.shape[0]) of an lm-head split over the ranks of `group`.

    group: a ProcessGroup or a 1-D DeviceMesh (the tensor-parallel group the weight was split over).
    vocab_start: this rank's first vocabulary row (no default: a full weight passed on every rank, or the
        wrong group, is then an error and not a silently larger vocabulary). Shards may be uneven and in any
        rank order, but must tile [0, V_total) exactly.
    reduce_grad_hidden: True (default) all-reduces d_hidden over the group inside the backward, so every
        rank's replicated hidden states get the full gradient; False leaves this shard's partial sum, for
        callers that reduce it themselves (Megatron / verl sequence parallelism).
    Fields are checked on every rank together by the call that receives them.
    """

    group: Any
    vocab_start: int
    reduce_grad_hidden: bool = True


@dataclass(frozen=True)
class VocabShard:
    """This rank's piece of a vocabulary-parallel lm-head: rows [vocab_start, vocab_start + vocab_size)."""

    process_group: Any
    vocab_start: int
    vocab_size: int
    vocab_total: int  # -1 when the layout was trusted, not gathered
    rank: int
    world_size: int
    reduce_grad_hidden: bool = True

    def local_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Global target ids (valid rows) as this shard's column indices; -1 where another rank owns them."""
        local = targets - self.vocab_start
        return torch.where((local >= 0) & (local < self.vocab_size), local, _NO_TARGET)

    def all_reduce_partials(self, part: torch.Tensor) -> torch.Tensor:
        """This rank's partials [stats, N] merged with the other ranks': those of the whole vocabulary."""
        big_m = part[0].clone()
        dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=self.process_group)
        rest = rescale_partials(part, big_m).contiguous()
        dist.all_reduce(rest, op=dist.ReduceOp.SUM, group=self.process_group)
        return torch.cat([big_m.unsqueeze(0), rest])

    def all_reduce_replicated_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """Sum (in place) the shards' partial gradients of a tensor replicated on every rank (a LoRA factor
        A of the head): every rank then holds the full gradient, whatever reduce_grad_hidden says."""
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=self.process_group)
        return grad

    def all_reduce_grad_hidden(self, grad: torch.Tensor) -> torch.Tensor:
        """Sum the shards' partial d_hidden (in place) unless the caller reduces it."""
        if self.reduce_grad_hidden:
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=self.process_group)
        return grad


def _as_group(process_group):
    """A ProcessGroup from a ProcessGroup or a 1-D DeviceMesh."""
    if hasattr(process_group, "get_group") and hasattr(process_group, "ndim"):
        if process_group.ndim != 1:
            raise ValueError(
                f"vocab_parallel.group must be a ProcessGroup or a 1-D DeviceMesh, got a "
                f"{process_group.ndim}-D DeviceMesh; pass mesh['tp'] (or mesh.get_group('tp'))"
            )
        return process_group.get_group()
    return process_group


# meta row fields, one int64 each
_ERR, _START, _SIZE, _N, _H, _VALID, _SUM, _LO, _HI, _CFG, _GRAD, _VALUES, _REPLICATED = range(13)


def _mix(n: int, device) -> torch.Tensor:
    """Position weights 1..8191 (int64) that make a weighted sum an order-sensitive checksum."""
    return torch.arange(n, device=device) % 8191 + 1


def _checksum_bits(values: torch.Tensor) -> torch.Tensor:
    """An order-sensitive float64 checksum of a 1-D tensor, as the int64 of its bits (exact comparison)."""
    return (values.double() * _mix(values.numel(), values.device).double()).sum().view(torch.int64)


def _local_meta(
    ok: bool, vocab_start, hidden, weight, targets, ignore_index, config, token_values, replicated
) -> torch.Tensor:
    device = hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")
    head = torch.zeros(_VALID, dtype=torch.int64)
    tail = torch.zeros(_REPLICATED + 1 - _VALID, dtype=torch.int64, device=device)
    if not ok:
        head[_ERR] = 1
        return torch.cat([head.to(device), tail])
    head[_START] = vocab_start
    head[_SIZE] = weight.shape[0]
    head[_N] = targets.numel()
    head[_H] = hidden.shape[-1]
    t = targets.reshape(-1).long()
    valid = t != ignore_index
    if t.numel():
        tail[_VALID - _VALID] = valid.sum()
        tail[_SUM - _VALID] = (torch.where(valid, t, -7) * _mix(t.numel(), device)).sum()
        tail[_LO - _VALID] = torch.where(valid, t, torch.iinfo(torch.int64).max).min()
        tail[_HI - _VALID] = torch.where(valid, t, -1).max()
    tail[_CFG - _VALID] = zlib.crc32(repr(config).encode())
    tail[_GRAD - _VALID] = int(torch.is_grad_enabled() and hidden.requires_grad)
    if token_values is not None and tuple(token_values.shape) == tuple(targets.shape) and t.numel():
        # per-token values (a per-token temperature) of the scored tokens; ignored ones may differ
        tail[_VALUES - _VALID] = _checksum_bits(torch.where(valid, token_values.reshape(-1).double(), 0.0))
    if replicated is not None and replicated.numel():
        tail[_REPLICATED - _VALID] = _checksum_bits(replicated.detach().reshape(-1).to(device))
    return torch.cat([head.to(device), tail])


def vocab_shard(
    options: VocabParallel,
    hidden,
    weight,
    targets,
    ignore_index: int,
    *,
    local_check: Callable[[], tuple[Any, Any]],
    token_values: Optional[torch.Tensor] = None,
    replicated: Optional[torch.Tensor] = None,
) -> tuple[Any, VocabShard]:
    """Run `local_check` (-> (result, config)) and resolve this rank's shard; raise on every rank alike.

    `config` is anything whose repr must agree across ranks (temperature, softcap, dtype, ...);
    `token_values` a per-token tensor shaped like targets (a per-token temperature) whose values on the
    scored tokens must agree too (compared through a checksum); `replicated` a tensor that every rank must
    hold the same copy of (a LoRA factor A of the head; compared through a checksum).
    """
    if not isinstance(options, VocabParallel):
        raise TypeError(
            f"vocab_parallel must be a fused_rlvr.VocabParallel(group, vocab_start) or None, "
            f"got {type(options).__name__}"
        )
    vocab_start, reduce_grad_hidden = options.vocab_start, options.reduce_grad_hidden
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "vocab_parallel is given but torch.distributed is not initialized: call "
            "torch.distributed.init_process_group first, or pass vocab_parallel=None"
        )
    group = _as_group(options.group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of vocab_parallel.group: "
            "pass the tensor-parallel group whose ranks hold the vocabulary shards"
        )
    world = dist.get_world_size(group)
    error: Optional[Exception] = None
    result = config = None
    try:
        if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
            raise ValueError(
                f"vocab_parallel.vocab_start must be an int >= 0: this rank's first row of "
                f"the lm-head's vocabulary (e.g. rank * V // world_size), got {vocab_start!r}"
            )
        if not isinstance(reduce_grad_hidden, bool):
            raise TypeError(
                f"vocab_parallel.reduce_grad_hidden must be a bool, got {type(reduce_grad_hidden).__name__}"
            )
        result, config = local_check()
    except (TypeError, ValueError) as exc:
        error = exc

    if error is None and not target_check_enabled():
        # hot path: the layout is trusted, nothing is gathered (no host sync)
        return result, VocabShard(group, vocab_start, weight.shape[0], -1, rank, world, reduce_grad_hidden)

    meta = _local_meta(
        error is None, vocab_start, hidden, weight, targets, ignore_index, config, token_values, replicated
    )
    gathered = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(gathered, meta, group=group)
    rows = torch.stack(gathered).tolist()

    failed = [r for r, row in enumerate(rows) if row[_ERR]]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(
            f"vocabulary-parallel call: the input checks failed on rank(s) {failed} of "
            "vocab_parallel.group (see the error raised there); every rank raises so that none waits "
            "in a collective"
        )

    def differ(*fields):
        return len({tuple(row[f] for f in fields) for row in rows}) > 1

    if differ(_N, _H):
        shapes = "; ".join(f"rank {r}: N={row[_N]} rows, H={row[_H]}" for r, row in enumerate(rows))
        raise ValueError(
            "hidden/targets shapes differ across the ranks of vocab_parallel.group (" + shapes + "): "
            "a vocabulary-parallel lm-head needs the same (replicated) hidden states and "
            "targets on every rank; is vocab_parallel.group the tensor-parallel group?"
        )
    if differ(_CFG):
        raise ValueError(
            f"temperature, softcap, ignore_index, dtype, bias presence or the LoRA adapter (rank, scale, "
            f"dtype, whether lora_a requires grad) differ across the ranks of vocab_parallel.group (this is "
            f"rank {rank} with {config!r})"
        )
    if differ(_REPLICATED):
        raise ValueError(
            "lora_a differs across the ranks of vocab_parallel.group: the LoRA factor A of a "
            "vocabulary-parallel head is replicated (the same [r, H] tensor on every rank; lora_b is split "
            "by rows as the weight)"
        )
    if differ(_VALUES):
        raise ValueError(
            "the per-token temperature differs across the ranks of vocab_parallel.group (compared on "
            "the scored tokens): every rank needs the same temperature tensor"
        )
    if differ(_VALID, _SUM, _LO, _HI):
        counts = ", ".join(f"rank {r}: {row[_VALID]}" for r, row in enumerate(rows))
        raise ValueError(
            f"targets differ across the ranks of vocab_parallel.group (valid targets per rank: "
            f"{counts}); every rank of a vocabulary-parallel group needs the same targets and "
            "hidden states"
        )
    if differ(_GRAD):
        who = [r for r, row in enumerate(rows) if row[_GRAD]]
        raise ValueError(
            f"hidden requires grad on rank(s) {who} only: every rank of vocab_parallel.group must run "
            "the backward (its d_hidden all-reduce) or none"
        )

    sizes = [row[_SIZE] for row in rows]
    starts = [row[_START] for row in rows]
    layout = ", ".join(f"rank {r}: [{starts[r]}, {starts[r] + sizes[r]})" for r in range(world))
    end, prev = 0, None
    for r in sorted(range(world), key=lambda q: (starts[q], q)):
        if starts[r] > end:
            raise ValueError(
                f"the vocabulary shards of vocab_parallel.group do not cover rows [{end}, {starts[r]}) "
                f"(shards {layout}): every row of the lm-head must be on exactly one rank"
            )
        if starts[r] < end:
            raise ValueError(
                f"the vocabulary shards of rank {prev} and rank {r} of vocab_parallel.group overlap "
                f"(shards {layout}); is vocab_parallel.group the group the weight was split over?"
            )
        end, prev = starts[r] + sizes[r], r
    total = end
    n_valid, lo, hi = rows[0][_VALID], rows[0][_LO], rows[0][_HI]
    if n_valid and (lo < 0 or hi >= total):
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"targets must lie in [0, {total}) or equal ignore_index={ignore_index}: target "
            f"{bad} is owned by no rank of vocab_parallel.group (shards {layout})"
        )
    return result, VocabShard(group, starts[rank], sizes[rank], total, rank, world, reduce_grad_hidden)
