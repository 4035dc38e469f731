"""Per-token log-prob (+ entropy) providers side by side: ours, plain torch, torch.compile chunked, peers.

Each provider is `fn(hidden, weight, targets, *, softcap, temperature, entropy) -> (logprobs, entropy|None)`,
differentiable w.r.t. hidden and weight. `available(name)` says whether a peer is installed; a provider
that cannot compute what was asked (a peer without entropy or temperature) raises NotSupported.
"""

from __future__ import annotations

import importlib.util

import torch
from torch.utils.checkpoint import checkpoint

from fused_rlvr import linear_logprobs
from fused_rlvr.reference import reference_logits, reference_logprobs


class NotSupported(Exception):
    pass


def ours(hidden, weight, targets, *, softcap=None, temperature=1.0, entropy=True, backend="auto"):
    lp, ent = linear_logprobs(
        hidden,
        weight,
        targets,
        softcap=softcap,
        temperature=temperature,
        return_entropy=entropy,
        backend=backend,
    )
    return lp, ent


def torch_naive(hidden, weight, targets, *, softcap=None, temperature=1.0, entropy=True):
    """Materialised logits in the input dtype, as an HF model + TRL computes them."""
    if not entropy:  # log_softmax + gather only: no softmax-entropy work
        logits = reference_logits(hidden, weight, softcap=softcap, temperature=temperature)
        lp = torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return torch.where(targets != -100, lp, 0.0).float(), None
    lp, ent = reference_logprobs(hidden, weight, targets, softcap=softcap, temperature=temperature)
    return lp.float(), ent.float()


def _chunk_stats(h, w, y, softcap, temperature):
    z = (h @ w.T).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z / temperature, dim=-1)
    lp = logp.gather(-1, y.clamp_min(0)[:, None])[:, 0]
    ent = -(logp.exp() * logp).sum(-1)
    valid = y != -100
    return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)


_compiled_chunk = None


def torch_compile_chunked(
    hidden, weight, targets, *, softcap=None, temperature=1.0, entropy=True, chunk_rows=1024
):
    """torch.compile'd per-chunk log-softmax with activation checkpointing: bounded memory, recompute."""
    global _compiled_chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk_stats, dynamic=False)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    lps, ents = [], []
    for r0 in range(0, h2.shape[0], chunk_rows):
        lp, ent = checkpoint(
            _compiled_chunk,
            h2[r0 : r0 + chunk_rows],
            weight,
            y[r0 : r0 + chunk_rows],
            softcap,
            temperature,
            use_reentrant=False,
        )
        lps.append(lp)
        ents.append(ent)
    lp = torch.cat(lps).view(targets.shape)
    return lp, torch.cat(ents).view(targets.shape) if entropy else None


def liger_flce(hidden, weight, targets, *, softcap=None, temperature=1.0, entropy=True):
    """Liger's fused linear cross-entropy, reduction='none': per-token -logprob; no entropy/temperature."""
    if entropy or temperature != 1.0:
        raise NotSupported("Liger FLCE has no entropy and no temperature")
    if not hidden.is_cuda:
        raise NotSupported("Liger FLCE is a Triton kernel: GPU only")
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    loss = liger_fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), reduction="none", softcap=softcap
    )
    if isinstance(loss, tuple):
        loss = loss[0]
    return -loss.float().view(targets.shape), None


def cut_cross_entropy(hidden, weight, targets, *, softcap=None, temperature=1.0, entropy=True):
    """Apple CCE (Triton on GPU, torch_compile impl on CPU): per-token -logprob; no entropy/temperature."""
    if entropy or temperature != 1.0:
        raise NotSupported("Cut Cross-Entropy has no entropy and no temperature")
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if hidden.is_cuda else "torch_compile"
    loss = linear_cross_entropy(
        hidden, weight, targets, softcap=softcap, reduction="none", impl=impl, filter_eps=None
    )  # no gradient filtering: exact gradients, as ours
    return -loss.float(), None


PROVIDERS = {
    "fused-rlvr": ours,
    "torch": torch_naive,
    "torch-compile-chunked": torch_compile_chunked,
    "liger": liger_flce,
    "cce": cut_cross_entropy,
}
_REQUIRES = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}


def available(name: str) -> bool:
    mod = _REQUIRES.get(name)
    return mod is None or importlib.util.find_spec(mod) is not None
