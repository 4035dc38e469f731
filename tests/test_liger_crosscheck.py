"""Cross-check against a real peer from PyPI: Liger-Kernel's LigerFusedLinearGRPOLoss (runs on CPU)."""

import pytest
import torch
from _helpers import BACKENDS, rel_err

import fused_rlvr as F

liger = pytest.importorskip("liger_kernel.chunked_loss")

B, T, H, V = 4, 11, 24, 53


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g) * 0.5
    weight = torch.randn(V, H, generator=g) * 0.5
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).long()
    mask[:, 0] = 1
    adv = torch.randn(B, generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[..., None])[..., 0]
    old = lp + 0.3 * torch.randn(B, T, generator=g)
    ref = lp + 0.2 * torch.randn(B, T, generator=g)
    return hidden, weight, targets, mask, adv, old, ref


CASES = [
    dict(loss_type="grpo", beta=0.0),
    dict(loss_type="grpo", beta=0.04),
    dict(loss_type="bnpo", beta=0.04),
    dict(loss_type="dapo", beta=0.0, epsilon_high=0.28),
    dict(loss_type="dapo", beta=0.1),
    dict(loss_type="dr_grpo", beta=0.0),
    dict(loss_type="dr_grpo", beta=0.04),
    dict(
        loss_type="grpo", beta=0.0, importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4
    ),
    dict(loss_type="dapo", beta=0.04, importance_sampling_level="sequence"),
    dict(loss_type="dapo", beta=0.0, temperature=0.7),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_grpo_equals_liger(backend, case):
    hidden, weight, targets, mask, adv, old, ref = _inputs(11)
    beta = case["beta"]
    eps_low = case.get("epsilon_low", 0.2)
    eps_high = case.get("epsilon_high", 0.2)
    level = case.get("importance_sampling_level", "token")
    temperature = case.get("temperature", 1.0)

    peer = liger.LigerFusedLinearGRPOLoss(
        beta=beta,
        compiled=False,
        use_ref_model=beta > 0,
        chunk_size=2,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        loss_type=case["loss_type"],
        max_completion_length=T,
        importance_sampling_level=level,
        temperature=temperature,
    )
    h1 = hidden.clone().requires_grad_()
    w1 = weight.clone().requires_grad_()
    out = peer(
        h1, w1, targets, mask, adv, ref_per_token_logps=ref if beta > 0 else None, old_per_token_logps=old
    )
    peer_loss = out[0] if isinstance(out, tuple) else out
    peer_loss.backward()

    h2 = hidden.clone().requires_grad_()
    w2 = weight.clone().requires_grad_()
    ours, _ = F.linear_grpo_loss(
        h2,
        w2,
        targets,
        adv,
        mask,
        old_logprobs=old,
        ref_logprobs=ref if beta > 0 else None,
        beta=beta,
        kl="k3",
        eps_low=eps_low,
        eps_high=eps_high,
        importance=level,
        agg=case["loss_type"],
        max_len=T,
        temperature=temperature,
        backend=backend,
    )
    ours.backward()
    assert abs(ours.item() - peer_loss.item()) <= 1e-5 * max(1.0, abs(peer_loss.item()))
    assert rel_err(h2.grad, h1.grad) < 1e-4
    assert rel_err(w2.grad, w1.grad) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type,beta", [("bnpo", 0.0), ("dapo", 0.04)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_large_k3_equals_liger_triton_loss_without_clamps(backend, loss_type, beta, seed):
    """Liger's own Triton-loss test setup: raw logits, old / reference log-probs drawn from randn (so k3 reaches
    tens and log-ratios several units). With kl_clamp=None and log_ratio_clamp=None (TRL's and Liger's
    definitions) the loss and the logit gradient equal Liger's; verl's clamps (our defaults) change them."""
    ops = pytest.importorskip("liger_kernel.transformers.grpo_loss")
    g = torch.Generator().manual_seed(seed)
    b, t, v = 2, 4, 16
    logits = torch.randn(b, t + 1, v, generator=g)
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.randint(0, 2, (b, t), generator=g)
    mask[:, 0] = 1
    adv = torch.randn(b, generator=g)
    old = torch.randn(b, t, generator=g)
    ref = torch.randn(b, t, generator=g)

    peer_logits = logits.clone().requires_grad_()
    peer_loss, _ = ops.triton_grpo_loss(
        logits=peer_logits,
        old_logp=old,
        ref_logp=ref if beta else None,
        completion_ids=ids,
        advantages=adv,
        completion_mask=mask,
        temperature=1.0,
        beta=beta,
        eps_low=0.2,
        eps_high=0.2,
        inplace=False,
        loss_type=loss_type,
        max_completion_length=t,
        reduce=True,
    )
    peer_loss.backward()

    def ours(**clamps):
        hidden = logits[:, :-1].clone().requires_grad_()  # lm-head = identity: hidden @ I = the logits
        loss, _ = F.linear_grpo_loss(
            hidden,
            torch.eye(v),
            ids,
            adv,
            mask,
            old_logprobs=old,
            ref_logprobs=ref if beta else None,
            beta=beta,
            agg=loss_type,
            backend=backend,
            **clamps,
        )
        loss.backward()
        return loss.detach(), hidden.grad

    loss, grad = ours(kl_clamp=None, log_ratio_clamp=None)
    assert abs(loss.item() - peer_loss.item()) <= 1e-5 * max(1.0, abs(peer_loss.item())), (loss, peer_loss)
    assert rel_err(grad, peer_logits.grad[:, :-1]) < 1e-5
    if beta:
        clamped, _ = ours()
        assert abs(clamped.item() - peer_loss.item()) > 1e-2 * abs(peer_loss.item())  # the clamp binds here
