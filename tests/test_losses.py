"""GRPO-family, PACS, STEER and advantages against float64 references written from the formulas."""

import math

import pytest
import torch
from _helpers import BACKENDS, rel_err
from _loss_reference import ref_grpo_loss, ref_pacs_loss, ref_steer_exp, ref_token_stats

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
