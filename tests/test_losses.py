"""GRPO-family, PACS, STEER and advantages against float64 references written from the formulas."""

import math

import pytest
import torch
from _helpers import BACKENDS, rel_err
from _loss_reference import (
    ref_grpo_loss,
    ref_pacs_loss,
    ref_rollout_correction,
    ref_steer_exp,
    ref_token_stats,
)
from hypothesis import given
from hypothesis import strategies as st

import fused_rlvr as F
from fused_rlvr.grpo import AGGREGATIONS

B, T, H, V = 4, 9, 16, 37


def _batch(seed=0, per_token_adv=False, bias=False, old_noise=0.4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g) * 0.6
    weight = torch.randn(V, H, generator=g) * 0.6
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    mask[2, 5:] = False  # sequences of different lengths
    adv = torch.randn(B, T, generator=g) if per_token_adv else torch.randn(B, generator=g)
    with torch.no_grad():
        lp0, _ = ref_token_stats(hidden.double(), weight.double(), targets, mask)
    # old / ref policies near the current one, far enough that some tokens clip
    old = (lp0 + old_noise * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (lp0 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    b = torch.randn(V, generator=g) if bias else None
    return hidden, weight, targets, mask, adv, old, ref, b


def _grads(loss_fn, hidden, weight, bias=None):
    leaves = [hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()]
    if bias is not None:
        leaves.append(bias.detach().clone().requires_grad_())
    loss, stats = loss_fn(*leaves)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves], stats


GRPO_OPTIONS = [
    dict(),
    dict(beta=0.1, kl="k1"),
    dict(beta=0.1, kl="k2"),
    dict(beta=0.1, kl="k3"),
    dict(beta=0.1, kl="k3+"),
    dict(beta=0.05, kl="k1+", eps_high=0.28),
    dict(dual_clip=3.0, eps_high=0.28),
    dict(dual_clip=2.0, old_noise=1.5, beta=0.1, kl="k3"),  # ratios past the dual-clip cap
    dict(importance="sequence", eps_low=3e-4, eps_high=4e-4, agg="seq-mean-token-mean"),
    dict(importance="sequence", eps_low=0.2, eps_high=0.2),
    dict(entropy_coef=0.01, agg="seq-mean-token-sum"),
    dict(agg="seq-mean-token-sum-norm", max_len=12),
    dict(agg="dr_grpo", max_len=12, beta=0.04),
    dict(agg="dapo", eps_high=0.28),
    dict(agg="bnpo"),
    dict(agg="grpo", beta=0.04),
    dict(no_old=True),
    dict(per_token_adv=True, dual_clip=10.0, entropy_coef=0.001),
    dict(temperature=0.7, softcap=5.0, bias=True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "opts", GRPO_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain"
)
def test_grpo_matches_float64_reference(backend, opts):
    opts = dict(opts)
    no_old = opts.pop("no_old", False)
    per_token_adv = opts.pop("per_token_adv", False)
    use_bias = opts.pop("bias", False)
    old_noise = opts.pop("old_noise", 0.4)
    lp_kw = {k: opts.pop(k) for k in ("temperature", "softcap") if k in opts}
    hidden, weight, targets, mask, adv, old, ref, b = _batch(1, per_token_adv, use_bias, old_noise)
    old_in = None if no_old else old
    ref_in = ref if opts.get("beta", 0) > 0 else None

    def ours(h, w, bb=None):
        return F.linear_grpo_loss(
            h,
            w,
            targets,
            adv,
            mask,
            old_logprobs=old_in,
            ref_logprobs=ref_in,
            bias=bb,
            backend=backend,
            **lp_kw,
            **opts,
        )

    def reference(h, w, bb=None):
        lp, ent = ref_token_stats(h, w, targets, mask, bias=bb, **lp_kw)
        loss = ref_grpo_loss(
            lp,
            ent,
            adv.double(),
            mask,
            None if no_old else old.double(),
            None if ref_in is None else ref.double(),
            **opts,
        )
        return loss, None

    loss, grads, stats = _grads(ours, hidden, weight, b)
    to64 = lambda t: None if t is None else t.double()
    ref_loss, ref_grads, _ = _grads(reference, to64(hidden), to64(weight), to64(b))
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item()))
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-5
    assert torch.isfinite(torch.stack([s.float() for s in stats])).all()
    assert stats.n_tokens == mask.sum()
    if old_noise > 1:
        assert stats.clip_frac_dual > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_stats_values(backend):
    hidden, weight, targets, mask, adv, old, ref, _ = _batch(2)
    loss, st = F.linear_grpo_loss(
        hidden,
        weight,
        targets,
        adv,
        mask,
        old_logprobs=old,
        ref_logprobs=ref,
        beta=0.1,
        dual_clip=3.0,
        backend=backend,
    )
    lp, ent = ref_token_stats(hidden.double(), weight.double(), targets, mask)
    m = mask.bool()
    r = torch.exp(lp - old.double())
    a = adv[:, None].expand(B, T).double()
    n = m.sum()
    torch.testing.assert_close(st.mean_ratio.double(), r[m].mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.clip_frac_low.double(), ((r < 0.8) & (a < 0))[m].double().sum() / n)
    torch.testing.assert_close(st.clip_frac_high.double(), ((r > 1.2) & (a > 0))[m].double().sum() / n)
    torch.testing.assert_close(st.approx_kl.double(), (old.double() - lp)[m].mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.mean_entropy.double(), ent[m].mean(), rtol=1e-5, atol=1e-6)
    assert 0 < st.clip_frac_low + st.clip_frac_high < 1  # the batch does exercise clipping
    torch.testing.assert_close(st.pg_loss + st.kl_loss - st.entropy_loss, loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_micro_batches_sum_to_the_full_batch(backend, agg):
    """Gradient accumulation: the whole-batch normaliser makes micro-batch losses add up exactly."""
    hidden, weight, targets, mask, adv, old, ref, _ = _batch(3)
    kw = dict(old_logprobs=old, ref_logprobs=ref, beta=0.05, agg=agg, max_len=T, backend=backend)
    full_loss, full_grads, _ = _grads(
        lambda h, w: F.linear_grpo_loss(h, w, targets, adv, mask, **kw), hidden, weight
    )
    if agg in ("token-mean", "bnpo", "dapo"):
        norm = float(mask.sum())
    elif agg in ("seq-mean-token-sum-norm",):
        norm = float(T)
    elif agg == "dr_grpo":
        norm = float(B * T)
    else:
        norm = float(B)
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    total = 0.0
    for sl in (slice(0, 1), slice(1, 3), slice(3, 4)):
        kw_mb = dict(kw, old_logprobs=old[sl], ref_logprobs=ref[sl], normalizer=norm)
        loss, _ = F.linear_grpo_loss(h[sl], w, targets[sl], adv[sl], mask[sl], **kw_mb)
        loss.backward()
        total += loss.item()
    assert abs(total - full_loss.item()) < 1e-5 * max(1, abs(full_loss.item()))
    assert rel_err(h.grad, full_grads[0]) < 1e-5 and rel_err(w.grad, full_grads[1]) < 1e-5


def test_steer_weights_hand_computed():
    # two tokens: p = 0.5 and 0.25, old policy pi_old = 0.5 and 0.5, H_old = 1, A = 1
    lp = torch.log(torch.tensor([[0.5, 0.25]]))
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    old_ent = torch.ones(1, 2)
    adv = torch.tensor([1.0])
    mask = torch.ones(1, 2)
    om1 = 1 / 0.5 * 0.5 * 0.5 * (math.log(0.5) + 1)  # 0.1534
    om2 = 1 / 0.5 * 0.25 * 0.75 * (math.log(0.25) + 1)  # -0.1448 -> |.| 0.1448
    k = -math.log(0.8) / max(abs(om1), abs(om2))
    expected = torch.tensor([[max(math.exp(-k * abs(om1)), 0.8), max(math.exp(-k * abs(om2)), 0.8)]])
    got = F.steer_weights(lp, old, old_ent, adv, mask)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert abs(got[0, 0].item() - 0.8) < 1e-6  # the token of largest |Omega| gets lambda_min
    # linear mapping: largest |Omega| -> lambda_min, smallest -> lambda_max
    lin = F.steer_weights(lp, old, old_ent, adv, mask, mode="linear")
    torch.testing.assert_close(lin, torch.tensor([[0.8, 1.0]]))
    # all |Omega| equal -> 1.0 midpoint; padded tokens -> 0; tiny |Omega| -> floor of 0.02 on the max
    same = F.steer_weights(
        lp[:, :1].repeat(1, 2), old, old_ent, adv, torch.tensor([[1.0, 0.0]]), mode="linear"
    )
    torch.testing.assert_close(same, torch.tensor([[1.0, 0.0]]))
    tiny = F.steer_weights(lp, lp, -lp, adv * 1e-6, mask)
    assert (tiny > 0.99).all()


def test_steer_weights_match_reference_on_random_batch():
    g = torch.Generator().manual_seed(5)
    lp = -torch.rand(3, 6, generator=g) * 4
    old = lp + 0.3 * torch.randn(3, 6, generator=g)
    ent = torch.rand(3, 6, generator=g) * 3
    adv = torch.randn(3, generator=g)
    mask = torch.rand(3, 6, generator=g) > 0.3
    torch.testing.assert_close(
        F.steer_weights(lp, old, ent, adv, mask),
        ref_steer_exp(lp, old, ent, adv[:, None].expand(3, 6), mask),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_steer_in_the_loss(backend):
    hidden, weight, targets, mask, adv, old, ref, _ = _batch(6)
    old_ent = torch.rand(B, T) * 2

    def ours(h, w):
        return F.linear_grpo_loss(
            h,
            w,
            targets,
            adv,
            mask,
            old_logprobs=old,
            dual_clip=10.0,
            eps_high=0.28,
            steer=F.SteerConfig(),
            old_entropy=old_ent,
            backend=backend,
        )

    def reference(h, w):
        lp, ent = ref_token_stats(h, w, targets, mask)
        sw = ref_steer_exp(
            lp.detach(), old.double(), old_ent.double(), adv[:, None].expand(B, T), mask
        ).double()
        return ref_grpo_loss(
            lp, ent, adv.double(), mask, old.double(), None, dual_clip=10.0, eps_high=0.28, steer_w=sw
        ), None

    loss, grads, st = _grads(ours, hidden, weight)
    ref_loss, ref_grads, _ = _grads(reference, hidden.double(), weight.double())
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(grads, ref_grads))
    assert 0.8 - 1e-6 <= st.steer_weight_min <= st.steer_weight_mean <= st.steer_weight_max <= 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_steer_exact_mode_uses_the_first_order_entropy_change(backend):
    hidden, weight, targets, mask, adv, old, _, _ = _batch(7)
    loss, st = F.linear_grpo_loss(
        hidden,
        weight,
        targets,
        adv,
        mask,
        old_logprobs=old,
        steer=F.SteerConfig(mode="exact"),
        backend=backend,
    )
    # reference: dH = -eta A r [p_y (log p_y + H) - sum_v p_v^2 (log p_v + H)], from materialised logits
    y = torch.where(mask, targets, -100)
    logits = hidden.double() @ weight.double().T
    logp = logits.log_softmax(-1)
    p = logp.exp()
    ent = -(p * logp).sum(-1)
    lp = logp.gather(-1, y.clamp_min(0)[..., None])[..., 0]
    r = torch.exp(lp - old.double())
    omega = adv.double()[:, None] * r * (lp.exp() * (lp + ent) - (p * p * (logp + ent[..., None])).sum(-1))
    omega = omega.abs() * mask
    k = -math.log(0.8) / max(omega[mask].max().item(), 0.02)
    w = torch.exp(-k * omega).clamp(0.8, 1.0)[mask]
    torch.testing.assert_close(st.steer_weight_mean.double(), w.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.steer_weight_min.double(), w.min(), rtol=1e-5, atol=1e-6)


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.5, 0.5])
    gid = torch.tensor([7, 7, 7, 3, 3, 9, 9])  # groups of 3, 2, 2 with arbitrary labels
    a = F.group_advantages(r, gid)
    # group 7: mean 2/3, unbiased std sqrt(1/3)
    torch.testing.assert_close(a[:3], (r[:3] - 2 / 3) / (math.sqrt(1 / 3) + 1e-6))
    torch.testing.assert_close(a[5:], torch.zeros(2))  # all-same group: 0
    a = F.group_advantages(r, gid, scale="none")
    torch.testing.assert_close(a[3:5], torch.tensor([0.5, -0.5]))
    a = F.group_advantages(r, gid, estimator="rloo", scale="none")
    torch.testing.assert_close(a[:3], torch.tensor([1 - 0.5, 0 - 1.0, 1 - 0.5]))
    a = F.group_advantages(r, gid, scale="batch")
    torch.testing.assert_close(a[:3], (r[:3] - 2 / 3) / (r.std() + 1e-6))
    single = F.group_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]))
    assert single[2] == 0  # a group of one has std 0 and advantage 0 under GRPO
    with pytest.raises(
        ValueError, match="estimator='rloo' needs groups of at least 2 samples; group 1 has one"
    ):
        F.group_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]), estimator="rloo")
    with pytest.raises(ValueError, match="scale must be one of 'group', 'batch', 'none'; got 'std'"):
        F.group_advantages(r, gid, scale="std")


def _pacs_batch(seed=8):
    hidden, weight, targets, mask, _, old, _, _ = _batch(seed)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1])
    hidden = torch.cat([hidden, hidden[:1] * 0.9])  # a 5th sequence so group 1 has two members
    targets = torch.cat([targets, targets[:1]])
    mask = torch.cat([mask, mask[:1]])
    old = torch.cat([old, old[:1]])
    return (
        hidden,
        weight,
        targets,
        mask,
        old,
        torch.cat([rewards, torch.tensor([0.0])]),
        torch.cat([groups, torch.tensor([1])]),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "opts", [dict(), dict(beta=2.0), dict(baseline="grpo"), dict(baseline="none"), dict(class_balance=False)]
)
def test_pacs_matches_float64_reference(backend, opts):
    hidden, weight, targets, mask, old, rewards, groups = _pacs_batch()

    def ours(h, w):
        return F.linear_pacs_loss(
            h, w, targets, rewards, mask, groups, old_logprobs=old, backend=backend, **opts
        )

    def reference(h, w):
        lp, _ = ref_token_stats(h, w, targets, mask)
        return ref_pacs_loss(lp, old.double(), rewards, mask, groups, **opts), None

    loss, grads, st = _grads(ours, hidden, weight)
    ref_loss, ref_grads, _ = _grads(reference, hidden.double(), weight.double())
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * max(1, abs(ref_loss.item()))
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(grads, ref_grads))
    assert st.n_sequences == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_pacs_gradient_closed_form(backend):
    """d loss / d lp_{i,t} = beta (e_i - mean_{j != i} e_j) m_t with e_i = w_i (sigmoid(psi_i) - R_i) / N."""
    hidden, weight, targets, mask, old, rewards, groups = _pacs_batch()
    beta = 1.5
    lp_ref, _ = ref_token_stats(hidden.double(), weight.double(), targets, mask)
    lp_leaf = lp_ref.detach().float().requires_grad_()
    from fused_rlvr.pacs import pacs_loss_from_scores

    scores = beta * ((lp_leaf - old) * mask).sum(1)
    loss, _ = pacs_loss_from_scores(scores, rewards, groups)
    loss.backward()
    # closed form
    s = scores.detach().double()
    n = len(s)
    members = {int(g): [j for j in range(n) if groups[j] == g] for g in groups}
    e = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        grp = members[int(groups[i])]
        psi = s[i] - sum(s[j] for j in grp if j != i) / (len(grp) - 1)
        k = sum(1 for j in grp if rewards[j] > 0.5)
        g = len(grp)
        w = 1.0 if k in (0, g) else (g / (2 * k) if rewards[i] > 0.5 else g / (2 * (g - k)))
        e[i] = w * (torch.sigmoid(psi) - rewards[i]) / n
    want = torch.stack(
        [
            beta
            * (
                e[i]
                - sum(e[j] for j in members[int(groups[i])] if j != i) / (len(members[int(groups[i])]) - 1)
            )
            * mask[i]
            for i in range(n)
        ]
    )
    torch.testing.assert_close(lp_leaf.grad.double(), want, rtol=1e-5, atol=1e-7)
    # and the fused loss routes exactly that gradient into the lm-head: compare d hidden both ways
    h = hidden.detach().clone().requires_grad_()
    fused_loss, _ = F.linear_pacs_loss(
        h, weight, targets, rewards, mask, groups, old_logprobs=old, beta=beta, backend=backend
    )
    fused_loss.backward()
    h2 = hidden.double().requires_grad_()
    lp2, _ = ref_token_stats(h2, weight.double(), targets, mask)
    (lp2 * want).sum().backward()
    assert rel_err(h.grad, h2.grad) < 1e-5


def test_modules_only_hold_hyper_parameters():
    hidden, weight, targets, mask, adv, old, ref, _ = _batch(9)
    mod = F.LinearGRPOLoss(beta=0.1, agg="dapo", eps_high=0.28)
    assert list(mod.parameters()) == [] and list(mod.buffers()) == []
    a, _ = mod(hidden, weight, targets, adv, mask, old_logprobs=old, ref_logprobs=ref)
    b, _ = F.linear_grpo_loss(
        hidden,
        weight,
        targets,
        adv,
        mask,
        old_logprobs=old,
        ref_logprobs=ref,
        beta=0.1,
        agg="dapo",
        eps_high=0.28,
    )
    assert torch.equal(a, b)
    kw = dict(policy_loss="sapo", importance="sequence-mean", beta=0.1, kl_ratio_weighted=True, kl_clamp=None)
    mod = F.LinearGRPOLoss(log_ratio_clamp=None, sapo_tau_neg=2.0, **kw)
    w = _pg_weights("token")
    a, _ = mod(hidden, weight, targets, adv, mask, old_logprobs=old, ref_logprobs=ref, pg_weights=w)
    b, _ = F.linear_grpo_loss(
        hidden,
        weight,
        targets,
        adv,
        mask,
        old_logprobs=old,
        ref_logprobs=ref,
        pg_weights=w,
        log_ratio_clamp=None,
        sapo_tau_neg=2.0,
        **kw,
    )
    assert torch.equal(a, b) and "policy_loss=sapo" in repr(mod)
    pacs = F.LinearPACSLoss(beta=2.0)
    hidden, weight, targets, mask, old, rewards, groups = _pacs_batch()
    a, _ = pacs(hidden, weight, targets, rewards, mask, groups, old_logprobs=old)
    b, _ = F.linear_pacs_loss(hidden, weight, targets, rewards, mask, groups, old_logprobs=old, beta=2.0)
    assert torch.equal(a, b) and "beta=2.0" in repr(pacs)


def test_pacs_grpo_baseline_gradient_is_finite_when_all_scores_are_equal():
    # On the first on-policy update every score is beta * (lp - old) = 0: the group std is 0, and
    # d sqrt(var) / d var = inf made the gradient NaN (found by the trainer's PACS preset).
    from fused_rlvr.pacs import pacs_loss_from_scores

    scores = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    rewards = torch.tensor([1.0, 0, 1, 0, 0, 0], dtype=torch.float64)
    loss, _ = pacs_loss_from_scores(scores, rewards, torch.tensor([0, 0, 0, 1, 1, 1]), baseline="grpo")
    loss.backward()
    assert torch.isfinite(scores.grad).all()
    # psi = 0 everywhere; loss = mean_i w_i softplus(0) with class-balanced weights
    assert abs(float(loss) - math.log(2.0) * (3 * 1.0 + 3 * 1.0) / 6) < 1e-12


# ---------------------------------------------------------------------------------------------------------
# policy losses (ppo / cispo / sapo), ratio cap, pg_weights, ratio-weighted KL, clamps, sequence-mean


def _pg_weights(kind, seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    if kind == "token":
        w = torch.rand(B, T, generator=g) * 2
        w[0, 1] = 0.0  # a masked-out token (entropy / token IS mask)
        return w
    if kind == "sequence":
        w = torch.rand(B, 1, generator=g) * 2
        w[1] = 0.0  # a dropped sequence (sequence IS mask, off-policy mask)
        return w
    return None


NEW_OPTIONS = [
    dict(policy_loss="cispo", eps_high=1.3),
    dict(policy_loss="cispo", eps_high=5.0, agg="dapo", beta=0.04, kl_ratio_weighted=True),
    dict(policy_loss="cispo", eps_high=1.2, importance="sequence-mean", pgw="token"),
    dict(policy_loss="cispo", eps_high=1.2, importance="sequence", per_token_adv=True),
    dict(policy_loss="sapo", agg="grpo"),
    dict(policy_loss="sapo", sapo_tau_pos=2.0, sapo_tau_neg=0.5, old_noise=1.0, pgw="sequence"),
    dict(policy_loss="sapo", importance="sequence-mean", agg="grpo", beta=0.1, kl_ratio_weighted=True),
    dict(policy_loss="sapo", importance="sequence", per_token_adv=True, entropy_coef=0.01),
    dict(ratio_cap=1.5, eps_high=0.28, old_noise=1.0),
    dict(ratio_cap=1.1, importance="sequence-mean", agg="grpo", pgw="token"),
    dict(pgw="token", beta=0.05),
    dict(pgw="sequence", importance="sequence", agg="seq-mean-token-mean"),
    dict(pgw="token", importance="sequence-mean", per_token_adv=True, dual_clip=3.0),
    dict(pgw="token", steer=True, dual_clip=3.0),
    dict(beta=0.1, kl_ratio_weighted=True),
    dict(beta=0.1, kl="k2+", kl_ratio_weighted=True, no_old=True),
    dict(beta=0.1, kl_ratio_weighted=True, importance="sequence", agg="grpo"),
    dict(beta=0.1, kl_ratio_weighted=True, importance="sequence-mean", agg="grpo", pgw="token"),
    dict(beta=0.1, kl_ratio_weighted=True, importance="sequence-mean", no_old=True),
    dict(importance="sequence-mean", eps_low=3e-3, eps_high=4e-3, agg="grpo"),
    dict(importance="sequence-mean", per_token_adv=True, entropy_coef=0.01, agg="dr_grpo", max_len=12),
    dict(beta=0.04, kl_clamp=None, log_ratio_clamp=None, agg="dapo", old_noise=4.0, ref_noise=5.0),
    dict(beta=0.04, kl_clamp=1.0, log_ratio_clamp=0.5, old_noise=1.5, ref_noise=3.0),
    dict(log_ratio_clamp=0.3, importance="sequence-mean", old_noise=2.0, agg="grpo"),
]


def _run_option(backend, opts, *, batch_seed=1):
    opts = dict(opts)
    no_old = opts.pop("no_old", False)
    per_token_adv = opts.pop("per_token_adv", False)
    old_noise = opts.pop("old_noise", 0.4)
    ref_noise = opts.pop("ref_noise", None)
    pgw_kind = opts.pop("pgw", None)
    use_steer = opts.pop("steer", False)
    hidden, weight, targets, mask, adv, old, ref, _ = _batch(batch_seed, per_token_adv, False, old_noise)
    if ref_noise is not None:
        g = torch.Generator().manual_seed(batch_seed + 50)
        ref = old + ref_noise * torch.randn(B, T, generator=g)
    old_in = None if no_old else old
    ref_in = ref if opts.get("beta", 0) > 0 else None
    pgw = _pg_weights(pgw_kind, batch_seed)
    old_ent = torch.rand(B, T, generator=torch.Generator().manual_seed(7)) * 2

    def ours(h, w):
        return F.linear_grpo_loss(
            h,
            w,
            targets,
            adv,
            mask,
            old_logprobs=old_in,
            ref_logprobs=ref_in,
            pg_weights=pgw,
            steer=F.SteerConfig() if use_steer else None,
            old_entropy=old_ent if use_steer else None,
            backend=backend,
            **opts,
        )

    def reference(h, w):
        lp, ent = ref_token_stats(h, w, targets, mask)
        sw = None
        if use_steer:
            o = old.double() if old_in is not None else lp.detach()
            sw = ref_steer_exp(lp.detach(), o, old_ent.double(), adv[:, None].expand(B, T), mask).double()
        loss = ref_grpo_loss(
            lp,
            ent,
            adv.double(),
            mask,
            None if old_in is None else old.double(),
            None if ref_in is None else ref.double(),
            steer_w=sw,
            pg_weights=None if pgw is None else pgw.double(),
            **opts,
        )
        return loss, None

    loss, grads, stats = _grads(ours, hidden, weight)
    ref_loss, ref_grads, _ = _grads(reference, hidden.double(), weight.double())
    return loss, grads, stats, ref_loss, ref_grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", NEW_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_policy_losses_and_weights_match_float64_reference(backend, opts):
    """Values and gradients (w.r.t. hidden and weight, through the whole fused loss) of every new option."""
    loss, grads, stats, ref_loss, ref_grads = _run_option(backend, opts)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item())), (loss, ref_loss)
    for got, want in zip(grads, ref_grads):
        assert want.abs().max() > 0
        assert rel_err(got, want) < 1e-5
    assert torch.isfinite(torch.stack([s.float() for s in stats])).all()


def test_clamps_change_the_loss_only_when_they_bind():
    """kl_clamp / log_ratio_clamp = None remove the clamps: large k3 and log-ratios then differ from the
    clamped defaults (the reference agrees with each), and agree where nothing reaches the clamp."""
    wild = dict(beta=0.04, agg="dapo", old_noise=4.0, ref_noise=5.0)
    unclamped = _run_option("torch", dict(wild, kl_clamp=None, log_ratio_clamp=None))
    clamped = _run_option("torch", wild)
    assert abs(unclamped[0] - unclamped[3]) < 1e-5 * abs(unclamped[3])
    assert abs(clamped[0] - clamped[3]) < 1e-5 * abs(clamped[3])
    assert abs(unclamped[0] - clamped[0]) > 0.1 * abs(unclamped[0])
    tame = _run_option("torch", dict(beta=0.04, kl_clamp=None, log_ratio_clamp=None))
    default = _run_option("torch", dict(beta=0.04))
    assert torch.equal(tame[0], default[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_and_sequence_mean_agree_on_per_sequence_advantages_and_weights(backend):
    """GSPO-token and GSPO have the same gradient when A and the weights are constant along sequences."""
    outs = []
    for importance in ("sequence", "sequence-mean"):
        kw = dict(importance=importance, agg="grpo", pgw="sequence", dual_clip=3.0, ratio_cap=2.0)
        outs.append(_run_option(backend, kw))
    (la, ga, *_), (lb, gb, *_) = outs
    assert abs(la.item() - lb.item()) < 1e-6 * max(1.0, abs(la.item()))
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(ga, gb))
    # and they differ once the weights vary within a sequence
    outs = [
        _run_option(backend, dict(importance=i, agg="grpo", pgw="token"))
        for i in ("sequence", "sequence-mean")
    ]
    assert rel_err(outs[0][1][0], outs[1][1][0]) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_pg_weights_function_sees_the_current_logprobs_and_entropy(backend):
    """A callable pg_weights gets the detached log-probs and entropies of the call, and its weights are used."""
    hidden, weight, targets, mask, adv, old, _, _ = _batch(12)
    seen = {}

    def entropy_mask(lp, ent):
        seen["lp"], seen["ent"] = lp, ent
        thresh = torch.quantile(ent[mask], 0.5)
        return (ent >= thresh) & mask  # a boolean mask

    kw = dict(old_logprobs=old, backend=backend, agg="dapo")
    loss, st = F.linear_grpo_loss(hidden, weight, targets, adv, mask, pg_weights=entropy_mask, **kw)
    lp, ent = ref_token_stats(hidden.double(), weight.double(), targets, mask)
    assert not seen["lp"].requires_grad and not seen["ent"].requires_grad
    torch.testing.assert_close(seen["lp"].double(), lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["ent"].double(), ent, rtol=1e-5, atol=1e-6)
    fixed = entropy_mask(seen["lp"], seen["ent"]).float()
    loss2, st2 = F.linear_grpo_loss(hidden, weight, targets, adv, mask, pg_weights=fixed, **kw)
    assert torch.equal(loss, loss2)
    assert 0.4 < st.pg_weight_mean < 0.6 and st.pg_weight_mean == st2.pg_weight_mean


def _stats_batch():
    hidden, weight, targets, mask, adv, old, ref, _ = _batch(13, old_noise=0.8)
    mask[3] = False  # a sequence without valid tokens
    return hidden, weight, targets, mask, adv, old, ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy_loss", ["ppo", "cispo", "sapo"])
def test_new_stats_values(backend, policy_loss):
    hidden, weight, targets, mask, adv, old, ref = _stats_batch()
    pgw = _pg_weights("token", 3)
    kw = dict(eps_high=1.3) if policy_loss == "cispo" else dict(eps_high=0.28)
    if policy_loss == "ppo":
        kw["ratio_cap"] = 1.6
    _, st = F.linear_grpo_loss(
        hidden,
        weight,
        targets,
        adv,
        mask,
        old_logprobs=old,
        ref_logprobs=ref,
        beta=0.1,
        kl_ratio_weighted=True,
        policy_loss=policy_loss,
        pg_weights=pgw,
        backend=backend,
        **kw,
    )
    lp, _ = ref_token_stats(hidden.double(), weight.double(), targets, mask)
    m = mask.bool()
    r = torch.exp(lp - old.double())
    a = adv[:, None].expand(B, T).double()
    x = lp - ref.double()
    k3 = (torch.exp(-x) + x - 1).clamp(-10, 10)
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.ratio_min.double(), r[m].min(), **close)
    torch.testing.assert_close(st.ratio_max.double(), r[m].max(), **close)
    torch.testing.assert_close(st.pg_weight_mean.double(), pgw.double()[m].mean(), **close)
    torch.testing.assert_close(st.ref_kl.double(), (k3 * r)[m].mean(), **close)
    if policy_loss == "ppo":
        r1 = r.clamp(max=1.6)
        low, high = (r1 < 0.8) & (a < 0), (r1 > 1.28) & (a > 0)
        torch.testing.assert_close(st.ratio_cap_frac.double(), (r > 1.6)[m].double().mean())
        assert st.ratio_cap_frac > 0
    elif policy_loss == "cispo":
        low, high = torch.zeros_like(m), (r > 1.3) & (a > 0)
    else:
        low = high = torch.zeros_like(m)
        s = torch.sigmoid(torch.where(a > 0, 1.0, 1.05) * (r - 1))
        torch.testing.assert_close(st.sapo_gate_mean.double(), (4 * s * (1 - s))[m].mean(), **close)
    if policy_loss != "sapo":
        assert st.sapo_gate_mean == 0
    n_i = m.sum(1)
    has = n_i > 0
    f_low = ((low & m).sum(1) / n_i.clamp_min(1)).double()
    f_high = ((high & m).sum(1) / n_i.clamp_min(1)).double()
    torch.testing.assert_close(st.clip_frac_low.double(), (low & m).double().sum() / m.sum())
    torch.testing.assert_close(st.clip_frac_high.double(), (high & m).double().sum() / m.sum())
    torch.testing.assert_close(st.clip_frac_low_min.double(), f_low[has].min())
    torch.testing.assert_close(st.clip_frac_high_max.double(), f_high[has].max())
    torch.testing.assert_close(st.clip_frac_low_seq_mean.double(), f_low.mean())
    torch.testing.assert_close(st.clip_frac_high_seq_mean.double(), f_high.mean())
    if policy_loss != "sapo":
        assert st.clip_frac_high > 0


def test_epilogue_tables_agree_by_name():
    """The Triton kernel and the torch epilogue write the same per-sequence table, column by column."""
    pytest.importorskip("triton")
    from fused_rlvr._kernels import kernel_module
    from fused_rlvr.grpo import GRPOParams, grpo_token_loss_torch

    g = torch.Generator().manual_seed(3)
    b, t = 3, 40  # more than one interpreter block per sequence
    lp = -torch.rand(b, t, generator=g) * 3
    ent = torch.rand(b, t, generator=g) * 2
    old = lp + 0.5 * torch.randn(b, t, generator=g)
    ref = lp + 0.5 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, t, generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.3).float()
    steer = torch.rand(b, t, generator=g)
    pgw = torch.rand(b, t, generator=g)
    mod = kernel_module("grpo_loss", True)
    for params in (
        GRPOParams(beta=0.1, dual_clip=2.0, ratio_cap=1.5, entropy_coef=0.01, kl_ratio_weighted=True),
        GRPOParams(policy_loss="cispo", eps_high=1.4, importance="sequence-mean", seq_mean=True, beta=0.1),
        GRPOParams(policy_loss="sapo", importance="sequence", log_ratio_clamp=None, kl_clamp=None, beta=0.1),
    ):
        _, want = grpo_token_loss_torch(lp, ent, old, ref, adv, mask, steer, params, 0.1, pgw)
        _, _, got = mod.grpo_token_loss(
            lp,
            ent,
            old,
            ref,
            adv,
            mask,
            steer,
            pgw,
            policy_loss=params.policy_loss,
            importance=params.importance,
            eps_low=params.eps_low,
            eps_high=params.eps_high,
            dual_clip=params.dual_clip,
            ratio_cap=params.ratio_cap,
            beta=params.beta,
            kl=params.kl,
            kl_clamp=params.kl_clamp,
            kl_ratio_weighted=params.kl_ratio_weighted,
            entropy_coef=params.entropy_coef,
            inv_divisor=0.1,
            seq_mean=params.seq_mean,
            clamp=params.log_ratio_clamp,
            interpret=True,
        )
        for j, name in enumerate(F.GRPO_PARTS):
            torch.testing.assert_close(got[:, j], want[:, j], rtol=1e-5, atol=1e-6, msg=name)


@st.composite
def _grpo_case(draw):
    policy = draw(st.sampled_from(F.POLICY_LOSSES))
    opts = dict(
        policy_loss=policy,
        importance=draw(st.sampled_from(["token", "sequence", "sequence-mean"])),
        agg=draw(st.sampled_from(AGGREGATIONS)),
        eps_low=draw(st.sampled_from([0.2, 0.1])),
        eps_high=draw(st.sampled_from([1.3, 4.0]))
        if policy == "cispo"
        else draw(st.sampled_from([0.2, 0.28])),
        entropy_coef=draw(st.sampled_from([0.0, 0.01])),
        kl_clamp=draw(st.sampled_from([10.0, None, 0.5])),
        log_ratio_clamp=draw(st.sampled_from([20.0, None, 0.4])),
    )
    if draw(st.booleans()):
        opts.update(beta=0.1, kl=draw(st.sampled_from(["k1", "k2", "k3", "k3+"])))
        opts["kl_ratio_weighted"] = draw(st.booleans())
    if policy == "ppo":
        opts["ratio_cap"] = draw(st.sampled_from([None, 1.4]))
        opts["dual_clip"] = draw(st.sampled_from([None, 2.5]))
    if policy == "sapo":
        opts.update(
            sapo_tau_pos=draw(st.sampled_from([1.0, 3.0])), sapo_tau_neg=draw(st.sampled_from([1.05, 0.5]))
        )
    shape = dict(
        b=draw(st.integers(1, 3)),
        t=draw(st.integers(1, 7)),
        v=draw(st.integers(2, 19)),
        seed=draw(st.integers(0, 2**16)),
        per_token_adv=draw(st.booleans()),
        pgw=draw(st.sampled_from([None, "token", "sequence"])),
        no_old=draw(st.booleans()),
        backend=draw(st.sampled_from(BACKENDS)),
    )
    return opts, shape


@given(_grpo_case())
def test_grpo_options_hypothesis(case):
    """Random shapes, masks (empty sequences included) and option combinations vs the float64 reference."""
    opts, sh = case
    b, t, v, h = sh["b"], sh["t"], sh["v"], 6
    g = torch.Generator().manual_seed(sh["seed"])
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g)
    targets = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    adv = torch.randn(b, t, generator=g) if sh["per_token_adv"] else torch.randn(b, generator=g)
    with torch.no_grad():
        lp0, _ = ref_token_stats(hidden.double(), weight.double(), targets, mask)
    old = None if sh["no_old"] else (lp0 + 0.6 * torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    ref = (lp0 + 0.6 * torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    pgw = None
    if sh["pgw"] is not None:
        pgw = torch.rand(b, t if sh["pgw"] == "token" else 1, generator=g) * 2
    ref_in = ref if opts.get("beta", 0) > 0 else None

    def ours(hh, ww):
        return F.linear_grpo_loss(
            hh,
            ww,
            targets,
            adv,
            mask,
            old_logprobs=old,
            ref_logprobs=ref_in,
            pg_weights=pgw,
            backend=sh["backend"],
            **opts,
        )

    def reference(hh, ww):
        lp, ent = ref_token_stats(hh, ww, targets, mask)
        return ref_grpo_loss(
            lp,
            ent,
            adv.double(),
            mask,
            None if old is None else old.double(),
            None if ref_in is None else ref_in.double(),
            pg_weights=None if pgw is None else pgw.double(),
            **opts,
        ) + 0.0 * lp.sum(), None  # (a graph even when every token is masked)

    loss, grads, stats = _grads(ours, hidden, weight)
    ref_loss, ref_grads, _ = _grads(reference, hidden.double(), weight.double())
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item()))
    for got, want in zip(grads, ref_grads):
        assert (got.double() - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())
    assert torch.isfinite(torch.stack([s.float() for s in stats])).all()
    assert stats.n_tokens == mask.sum()


# ---------------------------------------------------------------------------------------------------------
# values at masked positions never matter; any layout of the per-token inputs gives the contiguous answer

GARBAGE = (float("nan"), float("inf"), -float("inf"), 1e30)


def _poison(t, mask, value):
    """t with `value` written at every masked-out position (per-token [B, T]) or in masked-out rows ([B])."""
    t = t.clone()
    if t.dim() == 1 or t.shape[1] == 1:
        empty = ~mask.bool().any(1)
        t[empty] = value
        return t
    t[~mask.bool()] = value
    return t


GARBAGE_OPTIONS = [
    dict(beta=0.1, entropy_coef=0.01, dual_clip=3.0),
    dict(policy_loss="cispo", eps_high=2.0, importance="sequence-mean", beta=0.1, kl_ratio_weighted=True),
    dict(policy_loss="sapo", importance="sequence", agg="grpo"),
    dict(steer=True, ratio_cap=2.0, beta=0.04, kl_ratio_weighted=True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", GARBAGE, ids=str)
@pytest.mark.parametrize("opts", GARBAGE_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_grpo_ignores_values_at_masked_positions(backend, value, opts):
    """NaN / inf / huge advantages, old / ref log-probs, pg weights and old entropies at masked positions
    change nothing (loss, gradients, stats) on either backend."""
    opts = dict(opts)
    use_steer = opts.pop("steer", False)
    hidden, weight, targets, mask, _, old, ref, _ = _batch(14, per_token_adv=True)
    adv = torch.randn(B, T, generator=torch.Generator().manual_seed(1))
    pgw = _pg_weights("token", 4)
    old_ent = torch.rand(B, T)
    clean = dict(advantages=adv, old_logprobs=old, ref_logprobs=ref, pg_weights=pgw, old_entropy=old_ent)
    dirty = {k: _poison(v, mask, value) for k, v in clean.items()}

    def run(inputs):
        def fn(h, w):
            kw = dict(inputs)
            a = kw.pop("advantages")
            return F.linear_grpo_loss(
                h,
                w,
                targets,
                a,
                mask,
                steer=F.SteerConfig() if use_steer else None,
                backend=backend,
                **kw,
                **opts,
            )

        return _grads(fn, hidden, weight)

    loss, grads, st = run(clean)
    loss2, grads2, st2 = run(dirty)
    assert torch.isfinite(loss2) and all(torch.isfinite(g).all() for g in grads2)
    assert torch.equal(loss, loss2)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2))
    for name, a, b in zip(st._fields, st, st2):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", GARBAGE, ids=str)
def test_pacs_ignores_old_logprobs_at_masked_positions(backend, value):
    hidden, weight, targets, mask, old, rewards, groups = _pacs_batch()

    def run(o):
        return _grads(
            lambda h, w: F.linear_pacs_loss(
                h, w, targets, rewards, mask, groups, old_logprobs=o, backend=backend
            ),
            hidden,
            weight,
        )

    loss, grads, st = run(old)
    loss2, grads2, st2 = run(_poison(old, mask, value))
    assert torch.isfinite(loss2) and torch.equal(loss, loss2)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2))
    assert all(torch.equal(a, b) for a, b in zip(st, st2))


def _view(t, layout):
    """t's values in another memory layout: "expanded" ([B, 1] -> [B, T] with token stride 0), "transposed"
    (2-D storage transposed), else a strided slice of a bigger tensor."""
    if layout == "expanded" and t.dim() == 2 and t.shape[1] == 1:
        return t.expand(-1, T)
    if layout == "transposed" and t.dim() == 2:
        return t.t().contiguous().t()
    big = torch.zeros(*(2 * s for s in t.shape), dtype=t.dtype)
    sl = tuple(slice(None, None, 2) for _ in t.shape)
    big[sl] = t
    return big[sl]


LAYOUT_OPTIONS = [
    dict(importance="sequence", agg="grpo"),
    dict(beta=0.1, entropy_coef=0.01, agg="dapo"),
    dict(beta=0.1, kl_ratio_weighted=True, importance="sequence-mean", agg="grpo", dual_clip=3.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
@pytest.mark.parametrize("per_token_adv", [True, False])
@pytest.mark.parametrize("opts", LAYOUT_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_grpo_inputs_in_any_layout(backend, layout, per_token_adv, opts):
    """Masks, advantages, old / ref log-probs and pg weights as views give the answer of their contiguous
    copies, bit for bit."""
    hidden, weight, targets, mask, _, old, ref, _ = _batch(15)
    g = torch.Generator().manual_seed(2)
    adv = torch.randn(B, T, generator=g) if per_token_adv else torch.randn(B, 1, generator=g)
    inputs = dict(
        mask=mask.float() if layout != "strided" else mask,
        advantages=adv,
        old_logprobs=old,
        ref_logprobs=ref,
        pg_weights=_pg_weights("sequence", 5),
    )
    views = {k: _view(v, layout) for k, v in inputs.items()}
    if views["advantages"].shape == (B, 1):
        views["advantages"] = views["advantages"][:, 0]
    assert any(not v.is_contiguous() for v in views.values())

    def run(kw):
        kw = dict(kw)
        a, m = kw.pop("advantages"), kw.pop("mask")
        return _grads(
            lambda h, w: F.linear_grpo_loss(h, w, targets, a, m, backend=backend, **kw, **opts),
            hidden,
            weight,
        )

    want = run({k: v.contiguous() for k, v in views.items()})
    got = run(views)
    assert torch.equal(want[0], got[0])
    assert all(torch.equal(a, b) for a, b in zip(want[1], got[1]))
    assert all(torch.equal(a, b) for a, b in zip(want[2], got[2]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_pacs_inputs_in_any_layout(backend, layout):
    hidden, weight, targets, mask, old, rewards, groups = _pacs_batch()
    views = [_view(t, layout) for t in (mask.float(), old, rewards, groups)]
    assert any(not v.is_contiguous() for v in views)

    def run(m, o, r, gid):
        return _grads(
            lambda h, w: F.linear_pacs_loss(h, w, targets, r, m, gid, old_logprobs=o, backend=backend),
            hidden,
            weight,
        )

    want = run(*(v.contiguous() for v in views))
    got = run(*views)
    assert torch.equal(want[0], got[0])
    assert all(torch.equal(a, b) for a, b in zip(want[1], got[1]))


# ---------------------------------------------------------------------------------------------------------
# input checks of the new options


@pytest.mark.parametrize(
    "override,exc,pattern",
    [
        (
            dict(policy_loss="ppo2"),
            ValueError,
            r"policy_loss must be one of 'ppo', 'cispo', 'sapo'; got 'ppo2'",
        ),
        (dict(policy_loss="cispo", dual_clip=3.0), ValueError, r"dual_clip=3.0 applies to policy_loss='ppo'"),
        (dict(policy_loss="sapo", ratio_cap=2.0), ValueError, r"ratio_cap=2.0 applies to policy_loss='ppo'"),
        (dict(policy_loss="cispo", eps_high=-1.0), ValueError, r"eps_high must be a finite positive number"),
        (dict(ratio_cap=0.0), ValueError, r"ratio_cap must be a finite positive number, got 0.0"),
        (dict(sapo_tau_neg=float("nan")), ValueError, r"sapo_tau_neg must be a finite positive number"),
        (dict(kl_clamp=-1.0), ValueError, r"kl_clamp must be a finite positive number, got -1.0"),
        (dict(log_ratio_clamp=0), ValueError, r"log_ratio_clamp must be a finite positive number, got 0.0"),
        (dict(kl_ratio_weighted=1), TypeError, r"kl_ratio_weighted must be a bool, got int"),
        (dict(pg_weights=torch.ones(B, 2)), ValueError, r"pg_weights must have shape \(4, 9\), \(4, 1\) or"),
        (
            dict(pg_weights=torch.ones(B, T, dtype=torch.long)),
            TypeError,
            r"pg_weights must be a floating-point",
        ),
        (dict(pg_weights=-torch.ones(B, 1)), ValueError, r"pg_weights must be >= 0 where mask is 1"),
        (
            dict(pg_weights=torch.full((B, T), float("nan"))),
            ValueError,
            r"pg_weights must be finite where mask is 1; pg_weights\[0, 0\] = nan",
        ),
        (
            dict(pg_weights=lambda lp, ent: lp[:, :2]),
            ValueError,
            r"pg_weights \(the value its function returned\) must have shape",
        ),
    ],
    ids=lambda x: str(x)[:40],
)
def test_new_option_errors(override, exc, pattern):
    hidden, weight, targets, mask, adv, old, _, _ = _batch(16)
    with pytest.raises(exc, match=pattern):
        F.linear_grpo_loss(hidden, weight, targets, adv, mask, old_logprobs=old, backend="torch", **override)


# ---------------------------------------------------------------------------------------------------------
# rollout_correction: TRL's vLLM importance-sampling modes


def _rollout_batch(seed=20):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 4
    rollout = old + 0.4 * torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    mask[3] = False  # a sequence without tokens
    rollout[0, 2] = float("nan")  # a token the engine could not score
    rollout[~mask] = float("nan")  # anything at masked positions
    old[1, ~mask[1]] = float("inf")
    return old, rollout, mask


@pytest.mark.parametrize("mode", F.ROLLOUT_CORRECTION_MODES)
@pytest.mark.parametrize("clip_min,clip_max", [(None, 2.0), (0.5, 1.5), (0.8, None), (None, 1.2)])
def test_rollout_correction_matches_reference(mode, clip_min, clip_max):
    old, rollout, mask = _rollout_batch()
    got = F.rollout_correction(old, rollout, mask, mode=mode, clip_min=clip_min, clip_max=clip_max)
    want = ref_rollout_correction(old, rollout, mask, mode, clip_min, clip_max)
    assert got.shape == want.shape == ((B, 1) if mode.startswith("sequence") else (B, T))
    assert got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    if mode.startswith("token"):
        assert got[0, 2] == min(max(1.0, clip_min or 0.0), clip_max or 1.0)  # NaN rollout -> ratio 1
    if mode.endswith("mask") and (clip_min, clip_max) == (0.5, 1.5):
        assert (got == 0).any() and (got > 0).any()  # the bounds do mask something here


def test_rollout_correction_weights_only_the_policy_gradient():
    """pg_weights from rollout_correction multiply the policy term; the KL term is untouched."""
    hidden, weight, targets, mask, adv, old, ref, _ = _batch(21)
    rollout = old + 0.3 * torch.randn(B, T, generator=torch.Generator().manual_seed(1))
    w = F.rollout_correction(old, rollout, mask, mode="token_truncate", clip_max=1.5)
    kw = dict(old_logprobs=old, ref_logprobs=ref, beta=0.1, backend="torch")
    _, st = F.linear_grpo_loss(hidden, weight, targets, adv, mask, pg_weights=w, **kw)
    _, st0 = F.linear_grpo_loss(hidden, weight, targets, adv, mask, **kw)
    assert st.kl_loss == st0.kl_loss and st.pg_loss != st0.pg_loss
    torch.testing.assert_close(st.pg_weight_mean, w[mask].mean())


@pytest.mark.parametrize(
    "kw,exc,pattern",
    [
        (
            dict(mode="token"),
            ValueError,
            r"mode must be one of 'token_truncate', 'token_mask', 'sequence_truncate'",
        ),
        (
            dict(mode="token_truncate", clip_max=None),
            ValueError,
            r"needs clip_min or clip_max \(both are None\)",
        ),
        (
            dict(clip_min=2.0, clip_max=2.0),
            ValueError,
            r"clip_min \(2.0\) must be less than clip_max \(2.0\)",
        ),
        (dict(clip_max=0.0), ValueError, r"clip_max must be a finite number > 0 or None, got 0.0"),
        (dict(clip_min=-1.0), ValueError, r"clip_min must be a finite number >= 0 or None, got -1.0"),
        (dict(clip_max="2"), TypeError, r"clip_max must be a number or None, got str"),
        (
            dict(old=torch.zeros(B, T - 1)),
            ValueError,
            r"rollout_logprobs must have the shape of old_logprobs",
        ),
        (dict(mask=torch.full((B, T), 2.0)), ValueError, r"mask must be boolean or hold only 0 and 1"),
        (
            dict(old_nan=True),
            ValueError,
            r"old_logprobs must be finite where mask is 1; old_logprobs\[0, 3\] = nan",
        ),
        (dict(rollout_inf=True), ValueError, r"rollout_logprobs must be finite or NaN where mask is 1"),
        (dict(old=torch.zeros(B, T, dtype=torch.long)), TypeError, r"old_logprobs must be a floating-point"),
    ],
    ids=lambda x: str(x)[:30],
)
def test_rollout_correction_errors(kw, exc, pattern):
    old, rollout, mask = torch.zeros(B, T), torch.zeros(B, T), torch.ones(B, T)
    kw = dict(kw)
    old = kw.pop("old", old)
    mask = kw.pop("mask", mask)
    if kw.pop("old_nan", False):
        old[0, 3] = float("nan")
    if kw.pop("rollout_inf", False):
        rollout[1, 1] = -float("inf")
    with pytest.raises(exc, match=pattern):
        F.rollout_correction(old, rollout, mask, **kw)
