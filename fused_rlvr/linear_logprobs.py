"""The fused primitive: per-token log-probs and entropy straight from hidden states and the lm-head."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch

from fused_rlvr import _torch_backend, _triton_backend
from fused_rlvr._kernels import triton_available
from fused_rlvr._partials import finalize
from fused_rlvr._validation import (
    check_linear_inputs,
    check_lora,
    check_target_range,
    check_temperature,
    check_token_temperature,
    integer_targets,
    positive_finite,
    tracing,
)
from fused_rlvr.lora import LoRA
from fused_rlvr.types import IGNORE_INDEX, TokenStats
from fused_rlvr.vocab_parallel import VocabParallel, VocabShard, vocab_shard


@dataclass(frozen=True)
class LogprobParams:
    """Everything the autograd function needs besides the differentiable tensors; `backend` is resolved.

    temperature: a float, or a detached per-token tensor shaped like targets. The backends receive the
    params of the valid rows (`for_rows`), whose per-token temperature is then a 1-D tensor aligned with
    their rows.
    """

    temperature: Union[float, torch.Tensor] = 1.0
    softcap: Optional[float] = None
    ignore_index: int = IGNORE_INDEX
    backend: str = "torch"  # "triton" or "torch"
    interpret: bool = False  # Triton kernels run by the interpreter (CPU tensors)
    moments: bool = False  # also return sum p^2 and sum p^2 log p (forward only)
    shard: Optional[VocabShard] = None  # vocabulary-parallel: weight/bias hold these rows of the lm-head
    lora: Optional[LoRA] = None  # a LoRA adapter on the head: u = h W^T + scale (h A^T) B^T + b

    def for_rows(self, rows: Optional[torch.Tensor]) -> LogprobParams:
        """These params for the valid rows `rows` of the flattened tokens (None: every row)."""
        if not isinstance(self.temperature, torch.Tensor):
            return self
        t = self.temperature.reshape(-1)
        return replace(self, temperature=(t if rows is None else t.index_select(0, rows)).contiguous())

    def inv_temperature(self) -> Union[float, torch.Tensor]:
        """1 / temperature: a float, or per row fp32 (computed in float64, rounded once, as the float's)."""
        if isinstance(self.temperature, torch.Tensor):
            return (1.0 / self.temperature.double()).float()
        return 1.0 / self.temperature


def resolve_backend(backend: str, device: torch.device) -> tuple[str, bool]:
    """("triton" | "torch", interpret) for a requested backend and the tensors' device."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":  # a missing triton package is reported when the kernels are first loaded
        return "triton", device.type != "cuda"
    return "torch", False


def _impl(params: LogprobParams):
    return _triton_backend if params.backend == "triton" else _torch_backend


def _flatten(hidden, targets, ignore_index):
    """2-D hidden, 1-D int64 targets, the indices of valid rows (None: all), and the valid rows' hidden states
    and contiguous int64 targets.

    Targets are compared in int64 whatever their dtype (in uint8, -100 would read as 156)."""
    h2 = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1).long()
    rows = (y != ignore_index).nonzero().squeeze(1)
    if rows.numel() == y.numel():
        return h2, y, None, h2, y.contiguous()
    return h2, y, rows, h2.index_select(0, rows), y.index_select(0, rows)


def _scatter_rows(values: torch.Tensor, rows: Optional[torch.Tensor], n: int) -> torch.Tensor:
    if rows is None:
        return values
    return values.new_zeros(n).index_copy_(0, rows, values)


def _autocast_off(fn):
    """Run `fn(hidden, ...)` with autocast off for hidden's device: the op computes in the inputs' own dtypes
    (fp32 statistics, fp32 accumulation) inside an autocast region too, forward and backward."""

    @functools.wraps(fn)
    def wrapper(hidden, *args, **kwargs):
        dev = hidden.device.type
        off = (
            torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else contextlib.nullcontext()
        )
        with off:
            return fn(hidden, *args, **kwargs)

    return wrapper


@_autocast_off
def forward_stats(hidden, weight, bias, targets, params: LogprobParams) -> dict[str, torch.Tensor]:
    """Forward only: dict of fp32 per-token tensors shaped like targets (0 on ignored tokens).

    Keys: logprob, entropy, lse (and sum_p2, sum_p2_logp with params.moments).
    """
    h2, y, rows, hv, yv = _flatten(hidden, targets, params.ignore_index)
    n = y.numel()
    if yv.numel() == 0:
        keys = ["logprob", "entropy", "lse"] + (["sum_p2", "sum_p2_logp"] if params.moments else [])
        return {k: torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device) for k in keys}
    rp = params.for_rows(rows)
    if params.shard is None:
        stats = _impl(params).forward(hv, weight, bias, yv, rp)
    else:  # this shard's partials, merged with the other ranks' (fused_rlvr.vocab_parallel)
        part = _impl(params).forward_partials(hv, weight, bias, params.shard.local_targets(yv), rp)
        stats = finalize(params.shard.all_reduce_partials(part))
    return {k: _scatter_rows(v, rows, n).view(targets.shape) for k, v in stats.items()}


class LinearLogprobFunction(torch.autograd.Function):
    """(hidden, weight, bias, targets, params, lora_a, lora_b) -> (logprobs, entropy); see `linear_logprobs`.

    lora_a / lora_b are params.lora's tensors (None without an adapter), inputs here so that autograd
    tracks them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, params: LogprobParams, lora_a=None, lora_b=None):
        stats = forward_stats(hidden, weight, bias, targets, params)
        # the adapter's tensors are saved as tensors (version-checked), not kept inside ctx.params
        ctx.params = params if params.lora is None else replace(params, lora=None)
        ctx.lora_scale = None if params.lora is None else params.lora.scale
        ctx.save_for_backward(hidden, weight, bias, targets, stats["lse"], stats["entropy"], lora_a, lora_b)
        ctx.set_materialize_grads(False)
        if params.moments:  # (sum p^2, sum p^2 log p) ride along, not differentiable
            ctx.mark_non_differentiable(stats["sum_p2"], stats["sum_p2_logp"])
            return stats["logprob"], stats["entropy"], stats["sum_p2"], stats["sum_p2_logp"]
        return stats["logprob"], stats["entropy"]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprob, grad_entropy, *_moment_grads):
        hidden, weight, bias, targets, lse, entropy, lora_a, lora_b = ctx.saved_tensors
        need_h, need_w, need_b, _, _, need_a, need_lb = ctx.needs_input_grad
        lora = None if lora_a is None else LoRA(lora_a, lora_b, ctx.lora_scale)
        needs = (
            need_h,
            need_w,
            bias is not None and need_b,
            lora is not None and need_a,
            lora is not None and need_lb,
        )
        if (grad_logprob is None and grad_entropy is None) or not any(needs):
            return (None,) * 7
        params = ctx.params if lora is None else replace(ctx.params, lora=lora)
        dh, dw, db, da, dlb = backward_grads(
            hidden, weight, bias, targets, lse, entropy, grad_logprob, grad_entropy, params, needs
        )
        return dh, dw, db, None, None, da, dlb


@_autocast_off
def backward_grads(
    hidden, weight, bias, targets, lse, entropy, grad_logprob, grad_entropy, params: LogprobParams, needs
):
    """(d_hidden, d_weight, d_bias, d_lora_a, d_lora_b) for upstream grads of the per-token outputs (None
    where `needs` says a gradient is not needed).

    Vocabulary-parallel: d_weight, d_bias and d_lora_b are this rank's shard; d_hidden is all-reduced over the
    group (in fp32, before the cast to hidden's dtype) unless the shard says the caller does it; d_lora_a
    (A is replicated on every rank) is always all-reduced, so every rank holds the full gradient of A.
    """
    h2, y, rows, hv, yv = _flatten(hidden, targets, params.ignore_index)
    if yv.numel() == 0:
        lora = params.lora
        inputs = (hidden, weight, bias) + ((None, None) if lora is None else (lora.a, lora.b))
        return tuple(torch.zeros_like(t) if need else None for t, need in zip(inputs, needs))

    def valid(t):
        t = t.reshape(-1)
        return (t if rows is None else t.index_select(0, rows)).float().contiguous()

    shard = params.shard
    dhv, dw, db, da, dlb = _impl(params).backward(
        hv,
        weight,
        bias,
        yv if shard is None else shard.local_targets(yv),
        valid(lse),
        valid(entropy),
        None if grad_logprob is None else valid(grad_logprob),
        None if grad_entropy is None else valid(grad_entropy),
        params.for_rows(rows),
        needs,
    )
    dh = None
    if dhv is not None:
        if shard is not None:
            dhv = shard.all_reduce_grad_hidden(dhv)
        dhv = dhv.to(hidden.dtype)
        dh = dhv if rows is None else h2.new_zeros(h2.shape).index_copy_(0, rows, dhv)
        dh = dh.view(hidden.shape)
    if db is not None:
        db = db.to(bias.dtype)
    if da is not None:  # fp32 until the shards' parts are summed
        if shard is not None:
            da = shard.all_reduce_replicated_grad(da)
        da = da.to(params.lora.a.dtype)
    return dh, dw, db, da, dlb


# torch.compile. The op is also registered as two torch.library custom ops, fused_rlvr::token_stats (forward)
# and fused_rlvr::token_stats_backward, which torch.compile keeps as opaque nodes of its graph: their fake
# implementations give shapes and dtypes, their real ones (forward_stats, backward_grads: chunk loops and
# kernel launches, either backend) run eagerly inside the compiled code. Custom ops take tensors and
# primitives only, so LogprobParams travels flattened (`_op_args`). Eager calls keep LinearLogprobFunction
# (no dispatcher round trip); a vocabulary-parallel call runs eagerly under torch.compile (`_eagerly`).

VOCAB_PARALLEL_EAGER = (
    "vocab_parallel= runs eagerly under torch.compile (its collectives and cross-rank checks are not "
    "traced): a graph break, an error with fullgraph=True; compile the code around the call instead"
)


def _eagerly(fn, *args, **kwargs):
    """fn(*args, **kwargs) outside torch.compile's graph: a graph break (an error with fullgraph=True).

    Only called while torch.compile traces, so torch._dynamo is loaded already."""
    from torch._dynamo import graph_break

    graph_break(msg=VOCAB_PARALLEL_EAGER)  # fullgraph=True stops here, with this message
    return torch.compiler.disable(fn, reason=VOCAB_PARALLEL_EAGER)(*args, **kwargs)


def _op_args(params: LogprobParams) -> tuple:
    """params as the custom ops' (temperature, token_temperature, softcap, ignore_index, backend, interpret,
    moments, lora_a, lora_b, lora_scale)."""
    per_token = isinstance(params.temperature, torch.Tensor)
    lora = params.lora
    return (
        1.0 if per_token else params.temperature,
        params.temperature if per_token else None,
        params.softcap,
        params.ignore_index,
        params.backend,
        params.interpret,
        params.moments,
        None if lora is None else lora.a,
        None if lora is None else lora.b,
        1.0 if lora is None else lora.scale,
    )


def _params_of(
    temperature,
    token_temperature,
    softcap,
    ignore_index,
    backend,
    interpret,
    moments,
    lora_a,
    lora_b,
    lora_scale,
) -> LogprobParams:
    """The LogprobParams that `_op_args` flattened."""
    lora = None if lora_a is None else LoRA(lora_a, lora_b, lora_scale)
    temp = temperature if token_temperature is None else token_temperature
    return LogprobParams(temp, softcap, ignore_index, backend, interpret, moments, lora=lora)


_OUT = ("logprob", "entropy", "lse", "sum_p2", "sum_p2_logp")


@torch.library.custom_op("fused_rlvr::token_stats", mutates_args=())
def _token_stats_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    temperature: float,
    token_temperature: Optional[torch.Tensor],
    softcap: Optional[float],
    ignore_index: int,
    backend: str,
    interpret: bool,
    moments: bool,
    lora_a: Optional[torch.Tensor],
    lora_b: Optional[torch.Tensor],
    lora_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`forward_stats` as a custom op: (logprob, entropy, lse, sum_p2, sum_p2_logp), the two moments empty
    ([0]) unless asked. The value checks that `make_params` leaves out while torch.compile traces (target
    range, per-token temperature) run here, on the real tensors."""
    check_target_range(targets, weight.shape[0], ignore_index)
    if token_temperature is not None:
        check_token_temperature(token_temperature, targets, ignore_index)
    params = _params_of(
        temperature,
        token_temperature,
        softcap,
        ignore_index,
        backend,
        interpret,
        moments,
        lora_a,
        lora_b,
        lora_scale,
    )
    stats = forward_stats(hidden, weight, bias, targets, params)
    return tuple(stats[k] if k in stats else hidden.new_empty(0, dtype=torch.float32) for k in _OUT)


@_token_stats_op.register_fake
def _token_stats_fake(
    hidden,
    weight,
    bias,
    targets,
    temperature,
    token_temperature,
    softcap,
    ignore_index,
    backend,
    interpret,
    moments,
    lora_a,
    lora_b,
    lora_scale,
):
    per_token = [hidden.new_empty(targets.shape, dtype=torch.float32) for _ in range(3)]
    moment_shape = targets.shape if moments else (0,)
    return (*per_token, *(hidden.new_empty(moment_shape, dtype=torch.float32) for _ in range(2)))


def _token_stats_setup(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, token_temperature, softcap, ignore_index, backend = inputs[:9]
    interpret, _, lora_a, lora_b, lora_scale = inputs[9:]
    _, entropy, lse, sum_p2, sum_p2_logp = output
    ctx.save_for_backward(hidden, weight, bias, targets, token_temperature, lora_a, lora_b, lse, entropy)
    ctx.options = (temperature, softcap, ignore_index, backend, interpret, lora_scale)
    ctx.mark_non_differentiable(lse, sum_p2, sum_p2_logp)
    ctx.set_materialize_grads(False)  # an unused entropy gets no gradient (and costs no backward work)


def _token_stats_grads(ctx, grad_logprob, grad_entropy, *_):
    hidden, weight, bias, targets, token_temperature, lora_a, lora_b, lse, entropy = ctx.saved_tensors
    need = ctx.needs_input_grad
    adapter = lora_a is not None
    needs = (need[0], need[1], bias is not None and need[2], adapter and need[11], adapter and need[12])
    if (grad_logprob is None and grad_entropy is None) or not any(needs):
        return (None,) * 14
    temperature, softcap, ignore_index, backend, interpret, lora_scale = ctx.options
    grads = torch.ops.fused_rlvr.token_stats_backward(
        hidden,
        weight,
        bias,
        targets,
        lse,
        entropy,
        grad_logprob,
        grad_entropy,
        temperature,
        token_temperature,
        softcap,
        ignore_index,
        backend,
        interpret,
        lora_a,
        lora_b,
        lora_scale,
        *needs,
    )
    dh, dw, db, da, dlb = (g if n else None for g, n in zip(grads, needs))
    return (dh, dw, db) + (None,) * 8 + (da, dlb, None)


_token_stats_op.register_autograd(_token_stats_grads, setup_context=_token_stats_setup)


@torch.library.custom_op("fused_rlvr::token_stats_backward", mutates_args=())
def _token_stats_backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprob: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
    temperature: float,
    token_temperature: Optional[torch.Tensor],
    softcap: Optional[float],
    ignore_index: int,
    backend: str,
    interpret: bool,
    lora_a: Optional[torch.Tensor],
    lora_b: Optional[torch.Tensor],
    lora_scale: float,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    need_lora_a: bool,
    need_lora_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`backward_grads` as a custom op: (d_hidden, d_weight, d_bias, d_lora_a, d_lora_b), each empty ([0])
    where not needed, laid out as `_grad_layouts` says."""
    params = _params_of(
        temperature,
        token_temperature,
        softcap,
        ignore_index,
        backend,
        interpret,
        False,
        lora_a,
        lora_b,
        lora_scale,
    )
    needs = (need_hidden, need_weight, need_bias, need_lora_a, need_lora_b)
    grads = backward_grads(
        hidden, weight, bias, targets, lse, entropy, grad_logprob, grad_entropy, params, needs
    )
    out = []
    for g, like in zip(grads, _grad_layouts(hidden, weight, bias, lora_a, lora_b, needs, "meta")):
        if g is None:
            g = hidden.new_empty(0)
        elif g.stride() != like.stride():  # only the zeros of a call without scored tokens can differ
            g = torch.empty_strided(like.shape, like.stride(), dtype=g.dtype, device=g.device).copy_(g)
        out.append(g)
    return tuple(out)


def _grad_layouts(hidden, weight, bias, lora_a, lora_b, needs, device=None) -> tuple[torch.Tensor, ...]:
    """Empty tensors shaped as the backward op's outputs (on `device`, default the inputs'): d_hidden, d_bias
    and d_lora_a contiguous, d_weight and d_lora_b as torch.empty_like(weight / lora_b) (the backends'
    allocations); [0] where not needed."""

    def contiguous(t):
        return torch.empty(t.shape, dtype=t.dtype, device=device or t.device)

    def like(t):
        return torch.empty_like(t, device=device or t.device)

    makers = (contiguous, like, contiguous, contiguous, like)
    inputs = (hidden, weight, bias, lora_a, lora_b)
    return tuple(
        make(t) if need else hidden.new_empty(0, device=device or hidden.device)
        for make, t, need in zip(makers, inputs, needs)
    )


@_token_stats_backward_op.register_fake
def _token_stats_backward_fake(
    hidden,
    weight,
    bias,
    targets,
    lse,
    entropy,
    grad_logprob,
    grad_entropy,
    temperature,
    token_temperature,
    softcap,
    ignore_index,
    backend,
    interpret,
    lora_a,
    lora_b,
    lora_scale,
    need_hidden,
    need_weight,
    need_bias,
    need_lora_a,
    need_lora_b,
):
    needs = (need_hidden, need_weight, need_bias, need_lora_a, need_lora_b)
    return _grad_layouts(hidden, weight, bias, lora_a, lora_b, needs)


def _traced_token_stats(hidden, weight, bias, targets, params: LogprobParams) -> dict[str, torch.Tensor]:
    """forward_stats's dict through the custom op, as torch.compile traces it (autograd included)."""
    out = torch.ops.fused_rlvr.token_stats(hidden, weight, bias, targets, *_op_args(params))
    return dict(zip(_OUT if params.moments else _OUT[:3], out))


def scored_targets(targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The losses' targets for the op: int64 `targets` where `mask` > 0, IGNORE_INDEX elsewhere (in the
    targets' own dtype -100 would not survive: uint8 reads it as id 156)."""
    return torch.where(mask > 0, integer_targets(targets).long(), IGNORE_INDEX)


def make_params(
    hidden,
    weight,
    targets,
    bias,
    temperature,
    softcap,
    ignore_index,
    backend,
    moments=False,
    *,
    vocab_parallel: Optional[VocabParallel] = None,
    lora_a: Optional[torch.Tensor] = None,
    lora_b: Optional[torch.Tensor] = None,
    lora_scale: Optional[float] = None,
) -> LogprobParams:
    """Validate the public arguments and build the LogprobParams for them.

    With `vocab_parallel`, weight/bias are this rank's vocabulary shard: the checks then run on every rank
    together (fused_rlvr.vocab_parallel.vocab_shard) and the params carry the resolved VocabShard.
    lora_a / lora_b / lora_scale: a LoRA adapter on the head (`linear_logprobs`), carried as params.lora.
    """

    def local_check():
        check_linear_inputs(
            hidden, weight, targets, bias, ignore_index, backend, check_targets=vocab_parallel is None
        )
        temp = check_temperature(temperature, targets, ignore_index, hidden.device)
        cap = positive_finite("softcap", softcap, allow_none=True)
        lora = check_lora(lora_a, lora_b, lora_scale, hidden, weight)
        resolved, interpret = resolve_backend(backend, hidden.device)
        params = LogprobParams(temp, cap, ignore_index, resolved, interpret, moments, lora=lora)
        # what must agree across the ranks of a vocabulary-parallel group (a per-token temperature's values
        # and the replicated lora_a are compared through checksums in the gathered layout)
        temp_kind = "per-token" if isinstance(temp, torch.Tensor) else temp
        adapter = None
        if lora is not None:
            a_grad = torch.is_grad_enabled() and lora.a.requires_grad
            adapter = (lora.rank, lora.scale, str(lora.a.dtype), a_grad)
        return params, (temp_kind, cap, ignore_index, str(hidden.dtype), bias is not None, moments, adapter)

    if vocab_parallel is None:
        return local_check()[0]
    if tracing():
        return _eagerly(
            make_params,
            hidden,
            weight,
            targets,
            bias,
            temperature,
            softcap,
            ignore_index,
            backend,
            moments,
            vocab_parallel=vocab_parallel,
            lora_a=lora_a,
            lora_b=lora_b,
            lora_scale=lora_scale,
        )
    token_temperature = temperature if isinstance(temperature, torch.Tensor) and temperature.dim() else None
    params, shard = vocab_shard(
        vocab_parallel,
        hidden,
        weight,
        targets,
        ignore_index,
        local_check=local_check,
        token_values=token_temperature,
        replicated=lora_a if isinstance(lora_a, torch.Tensor) else None,
    )
    return replace(params, shard=shard)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: Union[float, torch.Tensor] = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = True,
    backend: str = "auto",
    vocab_parallel: Optional[VocabParallel] = None,
    lora_a: Optional[torch.Tensor] = None,
    lora_b: Optional[torch.Tensor] = None,
    lora_scale: Optional[float] = None,
) -> TokenStats:
    """Per-token log-probabilities (and entropy) of `targets` under an lm-head, without the [N, V] logits.

    Equals, in plain torch (but never allocates the logits, forward or backward)::

        z = hidden @ weight.T + bias
        z = z + lora_scale * (hidden @ lora_a.T) @ lora_b.T   # with a LoRA adapter on the head
        z = softcap * tanh(z / softcap)            # if softcap is given
        logp = torch.log_softmax(z / temperature, -1)
        logprobs = logp.gather(-1, targets[..., None])[..., 0]
        entropy = -(logp.exp() * logp).sum(-1)

    with tokens whose target is `ignore_index` giving 0 and receiving no gradient (and costing no vocabulary
    work). Both outputs are fp32, shaped like `targets`, and differentiable w.r.t. hidden, weight, bias,
    lora_a and lora_b (a gradient is computed only for the tensors that require one: a frozen weight under
    a trained adapter costs no d_weight).

    Args:
        hidden: [..., H] last hidden states (bf16, fp16 or fp32).
        weight: [V, H] lm-head weight, same dtype and device as hidden.
        targets: integer [...] token ids in [0, V) or ignore_index.
        bias: optional [V] lm-head bias.
        temperature: finite positive divisor of the (softcapped) logits: a float, or a floating tensor
            shaped like `targets` with one temperature per token (finite and > 0 on scored tokens; ignored
            tokens may hold anything): logp = log_softmax(z / temperature[..., None]). No gradient flows
            to a temperature tensor.
        softcap: optional finite positive logit soft-cap (Gemma-2's final_logit_softcapping).
        return_entropy: if False, `TokenStats.entropy` is None.
        backend: "auto" (Triton on CUDA, chunked torch on CPU), "triton" (on CPU: the Triton interpreter),
            or "torch".
        vocab_parallel: a `fused_rlvr.VocabParallel(group, vocab_start)` when `weight` and `bias` are this
            rank's contiguous shard of the rows of an lm-head split over a process group; hidden states and
            targets (global ids in [0, V_total)) are the same on every rank. The outputs equal the
            single-process op on the whole weight, on every rank; the gradients are this rank's weight/bias
            shard and the full d_hidden (all-reduced over the group inside the backward unless
            `reduce_grad_hidden=False`). See `fused_rlvr.vocab_parallel`. With an adapter, lora_b holds the
            same rows as weight and lora_a is replicated: its gradient is all-reduced, complete on every rank.
        lora_a: optional [r, H] LoRA factor A of the lm-head (PEFT's `lora_A.weight`), r >= 1.
        lora_b: [V, r] LoRA factor B (PEFT's `lora_B.weight`); given together with lora_a. Both floating
            point, of one dtype (which may differ from weight's, as PEFT's fp32 adapters on a bf16 model),
            on hidden's device. The rank-r term is added inside the logit tiles from scale (hidden @ A^T):
            no merged W + scale B A and no logits are formed.
        lora_scale: finite scale of the adapter (PEFT's `scaling`, lora_alpha / r); 1.0 when not given.

    Under `torch.no_grad()` (or when nothing requires grad) only the forward runs and nothing is saved.
    Inside a `torch.autocast` region the op still computes in the inputs' own dtypes, forward and backward
    (cast hidden and weight to the autocast dtype first to score in it, as `fused_rlvr.integrations.hf` does).
    The target-range check costs a device sync: see `fused_rlvr.set_target_check` to skip it.

    torch.compile (fullgraph=True included): the op is the custom op fused_rlvr::token_stats (and
    fused_rlvr::token_stats_backward), opaque to the compiler, whose implementation runs this op's eager code;
    values and gradients equal the eager call's. The target-range and per-token temperature checks then run
    inside the op (same errors); pass temperature, softcap and lora_scale as Python numbers. A vocab_parallel
    call runs eagerly: a graph break, an error with fullgraph=True.
    """
    params = make_params(
        hidden,
        weight,
        targets,
        bias,
        temperature,
        softcap,
        ignore_index,
        backend,
        vocab_parallel=vocab_parallel,
        lora_a=lora_a,
        lora_b=lora_b,
        lora_scale=lora_scale,
    )
    lp, ent, _, _ = fused_token_stats(hidden, weight, bias, targets, params)
    return TokenStats(lp, ent if return_entropy else None)


def fused_token_stats(hidden, weight, bias, targets, params: LogprobParams):
    """(logprob, entropy, sum_p2, sum_p2_logp): through autograd when a parameter needs a gradient, else a
    bare forward that saves nothing. The moments are None unless params.moments (they carry no gradient).
    A LoRA adapter's tensors come from params.lora. While torch.compile traces: the custom op."""
    if tracing():
        if params.shard is not None:
            return _eagerly(fused_token_stats, hidden, weight, bias, targets, params)
        stats = _traced_token_stats(hidden, weight, bias, targets, params)
        return stats["logprob"], stats["entropy"], stats.get("sum_p2"), stats.get("sum_p2_logp")
    lora = params.lora
    adapter = (None, None) if lora is None else (lora.a, lora.b)
    tracked = (hidden, weight) + (() if bias is None else (bias,)) + (() if lora is None else adapter)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
        out = LinearLogprobFunction.apply(hidden, weight, bias, targets, params, *adapter)
        return out if params.moments else (*out, None, None)
    stats = forward_stats(hidden, weight, bias, targets, params)
    return stats["logprob"], stats["entropy"], stats.get("sum_p2"), stats.get("sum_p2_logp")


@torch.no_grad()
def linear_entropy_moments(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: Union[float, torch.Tensor] = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
    vocab_parallel: Optional[VocabParallel] = None,
    lora_a: Optional[torch.Tensor] = None,
    lora_b: Optional[torch.Tensor] = None,
    lora_scale: Optional[float] = None,
) -> dict[str, torch.Tensor]:
    """No-grad forward with the entropy-change moments.

    Returns fp32 tensors shaped like targets: logprob, entropy, lse, sum_p2 = sum_v p_v^2 and
    sum_p2_logp = sum_v p_v^2 log p_v — what the first-order entropy-change estimate needs.
    temperature: a float or a per-token tensor shaped like targets, as in `linear_logprobs`.
    vocab_parallel: a vocabulary-parallel weight shard, as in `linear_logprobs`.
    lora_a, lora_b, lora_scale: a LoRA adapter on the head, as in `linear_logprobs`.
    """
    params = make_params(
        hidden,
        weight,
        targets,
        bias,
        temperature,
        softcap,
        ignore_index,
        backend,
        True,
        vocab_parallel=vocab_parallel,
        lora_a=lora_a,
        lora_b=lora_b,
        lora_scale=lora_scale,
    )
    if tracing():
        if params.shard is not None:
            return _eagerly(forward_stats, hidden, weight, bias, targets, params)
        return _traced_token_stats(hidden, weight, bias, targets, params)
    return forward_stats(hidden, weight, bias, targets, params)
