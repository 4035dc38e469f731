"""Triton path: the kernels of `kernels/linear_logprob.py` plus the GEMMs that turn logit gradients into
parameter gradients.

Backward, per vocabulary chunk of width C (configs.bwd_vocab_chunk: 2048 at N=8192): the dlogits kernel
recomputes the logit tiles and writes du [N, C] in the input dtype; then
    d_weight[chunk] = du^T h            (one GEMM over all rows, written straight into the output)
    d_hidden       += du W[chunk]       (fp32 accumulator across chunks, never a bf16 running sum)
    d_bias[chunk]   = sum_rows du       (fp32)
and with a LoRA adapter (fused_rlvr.lora), from the same du:
    d_B[chunk]      = du^T hA           g += du B[chunk]   (g = d(hA), fp32 [N, r])
then d_A = scale g^T h and d_hidden += scale g A once after the chunks.
Extra memory: N x C staging + the fp32 d_hidden accumulator (N x H) when hidden is not fp32 (+ N x r).
"""

from __future__ import annotations

import torch

from fused_rlvr._kernels import kernel_module
from fused_rlvr._partials import finalize, reduce_partials
from fused_rlvr.kernels import configs

INTERPRET_VOCAB_CHUNK = 64  # small under the interpreter so tests cross several chunks


def _module(params):
    return kernel_module("linear_logprob", params.interpret)


def forward(hidden, weight, bias, targets, params) -> dict[str, torch.Tensor]:
    return finalize(forward_partials(hidden, weight, bias, targets, params))


def forward_partials(hidden, weight, bias, targets, params) -> torch.Tensor:
    """Merged partials [stats, N]; a target outside [0, V) must be negative (it is never matched, while a
    target past V could match a masked tail column)."""
    lora = params.lora
    part = _module(params).forward(
        hidden,
        weight,
        bias,
        targets,
        inv_temperature=params.inv_temperature(),
        softcap=params.softcap,
        moments=params.moments,
        interpret=params.interpret,
        lora_ha=None if lora is None else lora.project(hidden),
        lora_b=None if lora is None else lora.b,
    )
    return reduce_partials(part)


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with fp32 accumulation, whatever the dtype of a and b."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def backward(hidden, weight, bias, targets, lse, entropy, grad_logprob, grad_entropy, params, needs):
    """(d_hidden, d_weight, d_bias, d_lora_a, d_lora_b) of valid rows; None where `needs` says so.

    d_hidden and d_bias are fp32; d_lora_a is this call's partial sum over its vocabulary (the rows of B it
    holds), complete unless the call is one shard of a vocabulary-parallel head.
    """
    need_dh, need_dw, need_db, need_da, need_dlb = needs
    n, vocab = hidden.shape[0], weight.shape[0]
    chunk = min(vocab, INTERPRET_VOCAB_CHUNK if params.interpret else configs.bwd_vocab_chunk(n))
    staging = torch.empty((n, chunk), dtype=hidden.dtype, device=hidden.device)
    dh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.empty(vocab, dtype=torch.float32, device=hidden.device) if need_db else None
    lora = params.lora
    ha = g = dlb = None
    if lora is not None:
        ha = lora.project(hidden)  # [N, r] fp32
        ha_staged = ha.to(hidden.dtype)  # for dB[chunk] = du^T hA: the GEMM dtype of d_weight
        if need_dh or need_da:  # g = d(hA) = sum_chunks du B[chunk], fp32 [N, r]
            g = torch.zeros((n, lora.rank), dtype=torch.float32, device=hidden.device)
        dlb = torch.empty_like(lora.b) if need_dlb else None
    mod = _module(params)
    inv_t = params.inv_temperature()
    for v0 in range(0, vocab, chunk):
        v1 = min(vocab, v0 + chunk)
        du = staging[:, : v1 - v0]
        mod.dlogits(
            hidden,
            weight,
            bias,
            targets,
            lse,
            entropy,
            grad_logprob,
            grad_entropy,
            du,
            v0,
            inv_temperature=inv_t,
            softcap=params.softcap,
            interpret=params.interpret,
            lora_ha=ha,
            lora_b=None if lora is None else lora.b,
        )
        if need_dw:
            torch.mm(du.T, hidden, out=dw[v0:v1])
        if need_dh:
            _accumulate_mm(dh, du, weight[v0:v1])
        if need_db:
            db[v0:v1] = du.sum(0, dtype=torch.float32)
        if dlb is not None:
            if dlb.dtype == du.dtype:
                torch.mm(du.T, ha_staged, out=dlb[v0:v1])
            else:  # e.g. PEFT's fp32 adapter on a bf16 model: accumulate and keep dB in fp32
                acc = torch.zeros((v1 - v0, lora.rank), dtype=torch.float32, device=hidden.device)
                _accumulate_mm(acc, du.T, ha_staged)
                dlb[v0:v1] = acc
        if g is not None:
            _accumulate_mm(g, du, lora.b[v0:v1].to(du.dtype))
    da = None
    if g is not None:
        da = lora.input_grads(g, hidden, dh, need_da)
    return dh, dw, db, da, dlb
