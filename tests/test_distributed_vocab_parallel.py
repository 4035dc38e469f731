"""Vocabulary-parallel lm-head over 2 CPU processes (gloo) against the single-process op.

One spawn runs every case on both ranks (each rank builds the same seeded problem and keeps its vocabulary
shard); the results come back through files and each test compares one case against the single-process
op on the whole weight (values and gradients), or checks that an error was raised on every rank.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _helpers import make_inputs, rel_err

import fused_rlvr as F
from fused_rlvr.reference import reference_logprobs

WORLD = 2
V = 37
SPLIT = (20, 17)  # uneven: V is not divisible by the world size
TIMEOUT_S = 120
DEVICE = "cpu"  # "cuda" in the GPU variant: every case then runs the compiled Triton kernels


@contextlib.contextmanager
def _on(device):
    global DEVICE
    old, DEVICE = DEVICE, device
    try:
        yield
    finally:
        DEVICE = old


def _backend(name):
    return "triton" if DEVICE == "cuda" else name


def _kw(case):
    kw = dict(LP_CASES[case]["kw"], backend=_backend(LP_CASES[case]["kw"]["backend"]))
    if LP_CASES[case].get("token_temperature"):
        kw["temperature"] = _token_temperature(case)
    return kw


def _token_temperature(case, rank=0):
    """A per-token temperature shaped like the case's targets; each rank writes its own (different) value
    on the ignored tokens, where any value is allowed."""
    _, _, targets, _, _, _ = _lp_problem(case)
    g = torch.Generator().manual_seed(7)
    temp = (0.4 + torch.rand(targets.shape, generator=g)).to(DEVICE)
    return torch.where(targets == -100, -1.0 - rank, temp)


# name -> problem; `starts` None: rank-ordered shards [0, 20), [20, 37), else each rank's vocab_start
LP_CASES = {
    "torch_bias_temperature_ignored": dict(
        lead=(4, 6), h=16, bias=True, ignore=0.3, starts=None, kw=dict(temperature=0.7, backend="torch")
    ),
    "torch_softcap_reversed_layout": dict(
        lead=(20,),
        h=24,
        bias=False,
        ignore=0.0,
        starts=(17, 0),
        kw=dict(temperature=1.3, softcap=3.0, backend="torch"),
    ),
    "torch_logprobs_only": dict(
        lead=(3, 5),
        h=16,
        bias=True,
        ignore=0.2,
        starts=None,
        no_entropy=True,
        kw=dict(backend="torch", return_entropy=False),
    ),
    "torch_bf16": dict(
        lead=(2, 7),
        h=32,
        bias=True,
        ignore=0.2,
        starts=None,
        dtype=torch.bfloat16,
        kw=dict(temperature=0.8, softcap=5.0, backend="torch"),
    ),
    "triton_interpreter": dict(
        lead=(10,),
        h=16,
        bias=True,
        ignore=0.2,
        starts=None,
        kw=dict(temperature=0.9, softcap=4.0, backend="triton"),
    ),
    # rank 1's whole shard masked (bias -inf): its partials hold no mass for any row
    "torch_masked_shard": dict(
        lead=(3, 6), h=16, bias=True, ignore=0.2, starts=None, mask_shard=True, kw=dict(backend="torch")
    ),
    "triton_masked_shard": dict(
        lead=(12,), h=16, bias=True, ignore=0.0, starts=None, mask_shard=True, kw=dict(backend="triton")
    ),
    "torch_token_temperature": dict(
        lead=(4, 5),
        h=16,
        bias=True,
        ignore=0.3,
        starts=None,
        token_temperature=True,
        kw=dict(backend="torch"),
    ),
    # a LoRA adapter on the head: lora_b split by rows with the weight, lora_a replicated
    "torch_lora": dict(
        lead=(4, 6),
        h=16,
        bias=True,
        ignore=0.3,
        starts=None,
        lora=3,
        kw=dict(temperature=0.7, backend="torch"),
    ),
    "triton_lora_token_temperature": dict(
        lead=(10,),
        h=16,
        bias=True,
        ignore=0.2,
        starts=(17, 0),
        lora=2,
        token_temperature=True,
        kw=dict(softcap=4.0, backend="triton"),
    ),
    "triton_token_temperature_softcap": dict(
        lead=(10,),
        h=16,
        bias=False,
        ignore=0.2,
        starts=(17, 0),
        token_temperature=True,
        kw=dict(softcap=4.0, backend="triton"),
    ),
}


def _shard(rank, starts):
    start = sum(SPLIT[:rank]) if starts is None else starts[rank]
    return start, SPLIT[rank]


def _lp_problem(case, seed=1):
    c = LP_CASES[case]
    n = 1
    for d in c["lead"]:
        n *= d
    hidden, weight, targets, bias = make_inputs(
        n,
        c["h"],
        V,
        c.get("dtype", torch.float32),
        seed=seed,
        bias=c["bias"],
        ignore_frac=c["ignore"],
        lead=c["lead"],
    )
    if c.get("mask_shard"):  # -inf logits on rows [20, 37), targets in [0, 20)
        bias[SPLIT[0] :] = float("-inf")
        targets = torch.where(targets == -100, targets, targets % SPLIT[0])
    g = torch.Generator().manual_seed(seed + 100)
    g_lp = torch.randn(c["lead"], generator=g)
    g_ent = None if c.get("no_entropy") else torch.randn(c["lead"], generator=g)
    return [None if t is None else t.to(DEVICE) for t in (hidden, weight, targets, bias, g_lp, g_ent)]


def _lora_factors(case):
    """(lora_a [r, H], lora_b [V, r]) of a case with an adapter (seeded: the same on every rank)."""
    c = LP_CASES[case]
    g = torch.Generator().manual_seed(11)
    a = torch.randn(c["lora"], c["h"], generator=g) * 0.4
    b = torch.randn(V, c["lora"], generator=g) * 0.4
    dtype = c.get("dtype", torch.float32)
    return a.to(DEVICE, dtype), b.to(DEVICE, dtype)


LORA_SCALE = 1.5


def _run_lp(hidden, weight, targets, bias, g_lp, g_ent, op=F.linear_logprobs, lora=None, **kw):
    """Outputs and gradients; `lora` = (lora_a, lora_b) adds d_lora_a / d_lora_b (the reference op gets
    the merged weight W + scale B A, differentiable w.r.t. both factors)."""
    leaves = [hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()]
    if bias is not None:
        leaves.append(bias.detach().clone().requires_grad_())
    w = leaves[1]
    if lora is not None:
        lora = [t.detach().clone().requires_grad_() for t in lora]
        if op is reference_logprobs:
            w = w + LORA_SCALE * lora[1] @ lora[0]
        else:
            kw = dict(kw, lora_a=lora[0], lora_b=lora[1], lora_scale=LORA_SCALE)
    lp, ent = op(leaves[0], w, targets, bias=leaves[2] if bias is not None else None, **kw)
    loss = (lp.double() * g_lp.double()).sum()
    if g_ent is not None:
        loss = loss + (ent.double() * g_ent.double()).sum()
    loss.backward()
    out = {"logprobs": lp.detach(), "d_hidden": leaves[0].grad, "d_weight": leaves[1].grad}
    if ent is not None:
        out["entropy"] = ent.detach()
    if bias is not None:
        out["d_bias"] = leaves[2].grad
    if lora is not None:
        out["d_lora_a"], out["d_lora_b"] = lora[0].grad, lora[1].grad
    return out


def _loss_problem(seed=3):
    b, t, h = 4, 6, 16
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g) * 0.6
    weight = torch.randn(V, h, generator=g) * 0.6
    bias = torch.randn(V, generator=g) * 0.3
    targets = torch.randint(0, V, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[:, 0] = True
    with torch.no_grad():
        lp0, _ = reference_logprobs(hidden.double(), weight.double(), targets, bias=bias.double())
    old = (lp0 + 0.4 * torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    ref = (lp0 + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(b, generator=g)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1])
    p = dict(
        hidden=hidden,
        weight=weight,
        bias=bias,
        targets=targets,
        mask=mask,
        old=old,
        ref=ref,
        adv=adv,
        rewards=rewards,
        groups=groups,
    )
    return {k: v.to(DEVICE) for k, v in p.items()}


def _run_loss(kind, p, weight, bias, **kw):
    leaves = [
        p["hidden"].clone().requires_grad_(),
        weight.clone().requires_grad_(),
        bias.clone().requires_grad_(),
    ]
    if kind == "grpo_module":  # the nn.Module form, same hyper-parameters as "grpo"
        module = F.LinearGRPOLoss(
            beta=0.05,
            entropy_coef=0.01,
            dual_clip=3.0,
            eps_high=0.28,
            steer=F.SteerConfig(mode="exact"),
            temperature=0.9,
            backend=_backend("torch"),
        )
        loss, stats = module(
            leaves[0],
            leaves[1],
            p["targets"],
            p["adv"],
            p["mask"],
            old_logprobs=p["old"],
            ref_logprobs=p["ref"],
            bias=leaves[2],
            **kw,
        )
    elif kind == "pacs_module":
        module = F.LinearPACSLoss(beta=2.0, temperature=0.9, backend=_backend("torch"))
        loss, stats = module(
            leaves[0],
            leaves[1],
            p["targets"],
            p["rewards"],
            p["mask"],
            p["groups"],
            old_logprobs=p["old"],
            bias=leaves[2],
            **kw,
        )
    elif kind == "grpo":
        loss, stats = F.linear_grpo_loss(
            leaves[0],
            leaves[1],
            p["targets"],
            p["adv"],
            p["mask"],
            old_logprobs=p["old"],
            ref_logprobs=p["ref"],
            beta=0.05,
            entropy_coef=0.01,
            dual_clip=3.0,
            eps_high=0.28,
            steer=F.SteerConfig(mode="exact"),
            temperature=0.9,
            bias=leaves[2],
            backend=_backend("torch"),
            **kw,
        )
    else:
        loss, stats = F.linear_pacs_loss(
            leaves[0],
            leaves[1],
            p["targets"],
            p["rewards"],
            p["mask"],
            p["groups"],
            old_logprobs=p["old"],
            beta=2.0,
            temperature=0.9,
            bias=leaves[2],
            backend=_backend("torch"),
            **kw,
        )
    loss.backward()
    out = {
        "loss": loss.detach(),
        "d_hidden": leaves[0].grad,
        "d_weight": leaves[1].grad,
        "d_bias": leaves[2].grad,
    }
    out.update({f"stat_{k}": v.detach().float() for k, v in stats._asdict().items()})
    return out


# ---- what each rank runs -------------------------------------------------------------------------------------


def _rank_lp(case, rank, group):
    hidden, weight, targets, bias, g_lp, g_ent = _lp_problem(case)
    start, size = _shard(rank, LP_CASES[case]["starts"])
    kw = dict(_kw(case), vocab_parallel=F.VocabParallel(group, start))
    if LP_CASES[case].get("token_temperature"):  # differs across ranks on the ignored tokens only
        kw["temperature"] = _token_temperature(case, rank)
    lora = None
    if LP_CASES[case].get("lora"):  # lora_b: this rank's rows, as the weight; lora_a: replicated
        a, b = _lora_factors(case)
        lora = (a, b[start : start + size])
    return _run_lp(
        hidden,
        weight[start : start + size],
        targets,
        None if bias is None else bias[start : start + size],
        g_lp,
        g_ent,
        lora=lora,
        **kw,
    )


def _rank_moments(rank, group):
    hidden, weight, targets, bias, _, _ = _lp_problem("torch_bias_temperature_ignored")
    start, size = _shard(rank, None)
    return F.linear_entropy_moments(
        hidden,
        weight[start : start + size],
        targets,
        bias=bias[start : start + size],
        temperature=0.7,
        backend=_backend("torch"),
        vocab_parallel=F.VocabParallel(group, start),
    )


def _rank_partial_dh(rank, group):
    hidden, weight, targets, bias, g_lp, g_ent = _lp_problem("torch_bias_temperature_ignored")
    start, size = _shard(rank, None)
    return _run_lp(
        hidden,
        weight[start : start + size],
        targets,
        bias[start : start + size],
        g_lp,
        g_ent,
        temperature=0.7,
        backend=_backend("torch"),
        vocab_parallel=F.VocabParallel(group, start, reduce_grad_hidden=False),
    )


def _rank_partial_dh_lora(rank, group):
    """reduce_grad_hidden=False with an adapter: d_hidden (the adapter's part included) stays partial,
    d_lora_a is complete on every rank."""
    case = "torch_lora"
    hidden, weight, targets, bias, g_lp, g_ent = _lp_problem(case)
    start, size = _shard(rank, None)
    a, b = _lora_factors(case)
    return _run_lp(
        hidden,
        weight[start : start + size],
        targets,
        bias[start : start + size],
        g_lp,
        g_ent,
        lora=(a, b[start : start + size]),
        temperature=0.7,
        backend=_backend("torch"),
        vocab_parallel=F.VocabParallel(group, start, reduce_grad_hidden=False),
    )


def _rank_loss(kind, rank, group):
    p = _loss_problem()
    start, size = _shard(rank, None)
    return _run_loss(
        kind,
        p,
        p["weight"][start : start + size],
        p["bias"][start : start + size],
        vocab_parallel=F.VocabParallel(group, start),
    )


def _error_call(
    rank,
    group,
    *,
    starts=None,
    targets_fn=None,
    hidden_fn=None,
    weight_fn=None,
    temperature=1.0,
    full_weight=False,
    lora_fn=None,
):
    hidden, weight, targets, bias, _, _ = _lp_problem("torch_bias_temperature_ignored")
    start, size = _shard(rank, None)
    w = weight if full_weight else weight[start : start + size]
    vocab_start = 0 if full_weight else start if starts is None else starts[rank]
    if targets_fn is not None:
        targets = targets_fn(rank, targets)
    if hidden_fn is not None:
        hidden = hidden_fn(rank, hidden)
    if weight_fn is not None:
        w = weight_fn(rank, w)
    lora = {} if lora_fn is None else lora_fn(rank, hidden.shape[-1], w.shape[0])
    F.linear_logprobs(
        hidden,
        w,
        targets,
        temperature=temperature,
        backend=_backend("torch"),
        vocab_parallel=F.VocabParallel(group, vocab_start),
        **lora,
    )


def _scored_temperature(value_at_0):
    """Ones shaped like the error cases' targets, `value_at_0` at the first scored token."""
    _, _, targets, _, _, _ = _lp_problem("torch_bias_temperature_ignored")
    temp = torch.ones(targets.shape, device=targets.device)
    temp.view(-1)[int((targets.view(-1) != -100).nonzero()[0])] = value_at_0
    return temp


def _set_target(t, value):
    t = t.clone()
    t.view(-1)[3] = value
    return t


ERROR_CASES = {
    "gap": dict(starts=(0, 21)),
    "overlap": dict(starts=(0, 0)),
    "no_vocab_start_on_rank_1": dict(starts=(0, None)),
    "target_owned_by_no_rank": dict(targets_fn=lambda r, t: _set_target(t, V)),
    "negative_target": dict(targets_fn=lambda r, t: _set_target(t, -5)),
    "targets_differ": dict(targets_fn=lambda r, t: _set_target(t, 5 + r)),
    "hidden_rows_differ": dict(hidden_fn=lambda r, h: h[: 3 + r], targets_fn=lambda r, t: t[: 3 + r]),
    "temperature_differs": dict(),  # temperature set per rank below
    "token_temperature_differs": dict(),  # a per-token temperature, one scored token differs (below)
    "float_vs_token_temperature": dict(),  # rank 0 a float, rank 1 a tensor (below)
    "local_error_on_rank_1": dict(weight_fn=lambda r, w: w.double() if r == 1 else w),
    "full_weight_on_every_rank": dict(full_weight=True),
    "lora_a_differs": dict(
        lora_fn=lambda r, h, v: dict(
            lora_a=torch.full((2, h), 0.1 * (1 + r), device=DEVICE), lora_b=torch.ones(v, 2, device=DEVICE)
        )
    ),
    "lora_rank_differs": dict(
        lora_fn=lambda r, h, v: dict(
            lora_a=torch.ones(2 + r, h, device=DEVICE), lora_b=torch.ones(v, 2 + r, device=DEVICE)
        )
    ),
    "lora_on_one_rank": dict(
        lora_fn=lambda r, h, v: (
            dict(lora_a=torch.ones(2, h, device=DEVICE), lora_b=torch.ones(v, 2, device=DEVICE)) if r else {}
        )
    ),
}


def _verl_problem():
    """An even vocabulary (36 of the 37 rows, 18 per rank), no ignored labels."""
    hidden, weight, targets, _, g_lp, g_ent = _lp_problem("torch_softcap_reversed_layout")
    v = (V // WORLD) * WORLD
    return hidden, weight[:v], targets % v, g_lp, g_ent


def _rank_verl(rank, group):
    """verl's tensor-parallel call: equal contiguous shards, vocab_start derived from the rank."""
    from fused_rlvr.integrations.verl import linear_cross_entropy

    hidden, weight, y, g_lp, g_ent = _verl_problem()
    shard = weight.shape[0] // WORLD
    w = weight[rank * shard : (rank + 1) * shard]
    h = hidden.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    lp, ent = linear_cross_entropy(h, w, y, 0.7, "none", dist_process_group=group)
    (lp * g_lp + ent * g_ent).sum().backward()
    return {"logprobs": lp.detach(), "entropy": ent.detach(), "d_hidden": h.grad, "d_weight": w.grad}


def _worker(rank, init_file, out_dir, device):
    global DEVICE
    DEVICE = device
    backend = "gloo"
    if device == "cuda":  # NCCL with a GPU per rank; else both ranks share the GPU and gloo moves the data
        torch.cuda.set_device(rank % torch.cuda.device_count())
        backend = "nccl" if torch.cuda.device_count() >= WORLD else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    torch.manual_seed(0)
    group = dist.group.WORLD
    results = {}

    def record(name, fn):
        try:
            results[name] = ("ok", fn())
        except Exception as exc:  # every case must finish on both ranks: errors are results here
            results[name] = ("error", type(exc).__name__, str(exc))

    for case in LP_CASES:
        record(case, lambda case=case: _rank_lp(case, rank, group))
    record("moments", lambda: _rank_moments(rank, group))
    record("verl_tp", lambda: _rank_verl(rank, group))
    record("partial_d_hidden", lambda: _rank_partial_dh(rank, group))
    record("partial_d_hidden_lora", lambda: _rank_partial_dh_lora(rank, group))
    record("grpo", lambda: _rank_loss("grpo", rank, group))
    record("pacs", lambda: _rank_loss("pacs", rank, group))
    record("grpo_module", lambda: _rank_loss("grpo_module", rank, group))
    record("pacs_module", lambda: _rank_loss("pacs_module", rank, group))
    for name, spec in ERROR_CASES.items():
        spec = dict(spec)
        if name == "temperature_differs":
            spec["temperature"] = 1.0 + rank
        if name == "token_temperature_differs":
            spec["temperature"] = _scored_temperature(0.5 + 0.25 * rank)
        if name == "float_vs_token_temperature":
            spec["temperature"] = 0.7 if rank == 0 else _scored_temperature(0.7)
        record("error_" + name, lambda spec=spec: _error_call(rank, group, **spec))
    # a group that is not the one the weight was split over: rank 0 alone, rank 1 not a member
    solo = dist.new_group([0])
    record("error_subgroup", lambda: _error_call(rank, solo))
    record("after_errors", lambda: _rank_lp("torch_bias_temperature_ignored", rank, group))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(DEVICE, (WORLD,))  # a 1-D DeviceMesh is accepted as the group
    record("device_mesh", lambda: _rank_lp("torch_bias_temperature_ignored", rank, mesh))
    F.set_target_check(False)  # hot path: the layout is trusted, no all_gather
    record("unchecked", lambda: _rank_lp("torch_bias_temperature_ignored", rank, group))
    F.set_target_check(True)
    results = {k: _to_cpu(v) for k, v in results.items()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_to_cpu(v) for v in value)
    return value


def _spawn(device):
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _worker,
            args=(os.path.join(tmp, "rendezvous"), tmp, device),
            nprocs=WORLD,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + TIMEOUT_S
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"the {WORLD} processes did not finish within {TIMEOUT_S} s")
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ranks():
    return _spawn("cpu")


def _ok(ranks, name):
    out = []
    for r, res in enumerate(ranks):
        assert res[name][0] == "ok", f"rank {r} raised in {name}: {res[name][1:]}"
        out.append(res[name][1])
    return out


def _compare(dist_out, single, starts, tol):
    """Replicated outputs equal on every rank; weight/bias gradients concatenated over the shards."""
    for key, ref in single.items():
        if key in ("d_weight", "d_bias", "d_lora_b"):
            got = torch.empty_like(ref)
            for r, out in enumerate(dist_out):
                start, size = _shard(r, starts)
                got[start : start + size] = out[key]
            pieces = [got]
        else:
            pieces = [out[key] for out in dist_out]
        for r, got in enumerate(pieces):
            assert got.dtype == ref.dtype and got.shape == ref.shape, key
            err = rel_err(got.cpu(), ref.cpu())
            assert err <= tol, f"{key} (rank {r}): relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("case", list(LP_CASES))
def test_vocab_parallel_equals_single_process(ranks, case):
    hidden, weight, targets, bias, g_lp, g_ent = _lp_problem(case)
    lora = _lora_factors(case) if LP_CASES[case].get("lora") else None
    single = _run_lp(hidden, weight, targets, bias, g_lp, g_ent, lora=lora, **_kw(case))
    bf16 = LP_CASES[case].get("dtype") == torch.bfloat16
    # fp32: only the order of the vocabulary sums differs (observed <= 2.5e-7); bf16: one ulp of the
    # bf16 gradients at most (observed: equal)
    _compare(_ok(ranks, case), single, LP_CASES[case]["starts"], 4e-3 if bf16 else 1e-6)
    if not bf16:  # and the float64 ground truth, as for the single-process op
        kw = {k: v for k, v in _kw(case).items() if k in ("temperature", "softcap")}
        truth = _run_lp(
            hidden.double(),
            weight.double(),
            targets,
            None if bias is None else bias.double(),
            g_lp,
            g_ent,
            op=reference_logprobs,
            lora=None if lora is None else tuple(t.double() for t in lora),
            **kw,
        )
        if g_ent is None:
            truth.pop("entropy")
        _compare(_ok(ranks, case), {k: v.float() for k, v in truth.items()}, LP_CASES[case]["starts"], 1e-5)


def test_ignored_rows_stay_zero(ranks):
    _, _, targets, _, _, _ = _lp_problem("torch_bias_temperature_ignored")
    ignored = targets == -100
    assert ignored.any()
    for out in _ok(ranks, "torch_bias_temperature_ignored"):
        assert (out["logprobs"][ignored] == 0).all() and (out["d_hidden"][ignored] == 0).all()


def test_entropy_moments(ranks):
    hidden, weight, targets, bias, _, _ = _lp_problem("torch_bias_temperature_ignored")
    single = F.linear_entropy_moments(hidden, weight, targets, bias=bias, temperature=0.7, backend="torch")
    for out in _ok(ranks, "moments"):
        for key, ref in single.items():
            assert rel_err(out[key], ref) <= 1e-6, key


def test_partial_d_hidden_without_reduce(ranks):
    """reduce_grad_hidden=False: each rank keeps its shard's partial d_hidden; their sum is the full one."""
    full = _ok(ranks, "torch_bias_temperature_ignored")[0]["d_hidden"]
    parts = [out["d_hidden"] for out in _ok(ranks, "partial_d_hidden")]
    assert rel_err(parts[0], full) > 1e-2  # a partial sum, not the full gradient
    assert rel_err(parts[0] + parts[1], full) <= 1e-6


def test_partial_d_hidden_with_lora(ranks):
    """reduce_grad_hidden=False: the partial d_hidden (the adapter's term scale g A included) sums to the
    full one over the ranks; d_lora_a (A replicated) is the full gradient on every rank."""
    full = _ok(ranks, "torch_lora")[0]
    parts = _ok(ranks, "partial_d_hidden_lora")
    assert rel_err(parts[0]["d_hidden"], full["d_hidden"]) > 1e-2
    assert rel_err(parts[0]["d_hidden"] + parts[1]["d_hidden"], full["d_hidden"]) <= 1e-6
    for out in parts:
        assert rel_err(out["d_lora_a"], full["d_lora_a"]) <= 1e-6


@pytest.mark.parametrize("kind", ["grpo", "pacs"])
def test_losses_through_vocab_parallel(ranks, kind):
    p = _loss_problem()
    single = _run_loss(kind, p, p["weight"], p["bias"])
    _compare(_ok(ranks, kind), single, None, 2e-6)  # observed <= 5.3e-7 (loss, stats and gradients)
    # the nn.Module forms pass vocab_parallel through: same as the single-process function
    _compare(_ok(ranks, kind + "_module"), single, None, 2e-6)


def _errors(ranks, name):
    out = [res["error_" + name] for res in ranks]
    for r, res in enumerate(out):
        assert res[0] == "error", f"rank {r} did not raise for {name}"
    return [(kind, msg) for _, kind, msg in out]


ERROR_EXPECTATIONS = [  # (case, error type per rank, fragments of the messages)
    ("gap", ("ValueError",) * 2, ["do not cover rows [20, 21)", "rank 1: [21, 38)"]),
    ("overlap", ("ValueError",) * 2, ["rank 0 and rank 1 of vocab_parallel.group overlap"]),
    (
        "no_vocab_start_on_rank_1",
        ("RuntimeError", "ValueError"),
        ["failed on rank(s) [1]", "vocab_parallel.vocab_start must be an int >= 0"],
    ),
    ("target_owned_by_no_rank", ("ValueError",) * 2, ["target 37 is owned by no rank", "rank 1: [20, 37)"]),
    ("negative_target", ("ValueError",) * 2, ["target -5 is owned by no rank"]),
    ("targets_differ", ("ValueError",) * 2, ["targets differ across the ranks"]),
    ("hidden_rows_differ", ("ValueError",) * 2, ["rank 0: N=18 rows", "rank 1: N=24 rows"]),
    ("temperature_differs", ("ValueError",) * 2, ["temperature, softcap"]),
    ("token_temperature_differs", ("ValueError",) * 2, ["per-token temperature differs across the ranks"]),
    ("float_vs_token_temperature", ("ValueError",) * 2, ["temperature, softcap"]),
    ("local_error_on_rank_1", ("RuntimeError", "TypeError"), ["failed on rank(s) [1]", "weight dtype"]),
    ("full_weight_on_every_rank", ("ValueError",) * 2, ["overlap", "is vocab_parallel.group the group"]),
    ("lora_a_differs", ("ValueError",) * 2, ["lora_a differs across the ranks"]),
    ("lora_rank_differs", ("ValueError",) * 2, ["the LoRA adapter"]),
    ("lora_on_one_rank", ("ValueError",) * 2, ["the LoRA adapter"]),
    ("subgroup", ("ValueError",) * 2, ["is owned by no rank", "not a member of vocab_parallel.group"]),
]


@pytest.mark.parametrize("name, kinds, fragments", ERROR_EXPECTATIONS)
def test_errors_raised_on_every_rank(ranks, name, kinds, fragments):
    _check_errors(ranks, name, kinds, fragments)


def _check_errors(ranks, name, kinds, fragments):
    errors = _errors(ranks, name)
    assert tuple(kind for kind, _ in errors) == kinds, errors
    text = " | ".join(msg for _, msg in errors)
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


@pytest.mark.parametrize("name", ["after_errors", "unchecked", "device_mesh"])
def test_same_results_after_errors_and_without_checks(ranks, name):
    before = _ok(ranks, "torch_bias_temperature_ignored")
    after = _ok(ranks, name)
    for b, a in zip(before, after):
        for key in b:
            assert torch.equal(a[key], b[key]), key


def test_errors_without_a_process_group():
    hidden, weight, targets, _, _, _ = _lp_problem("torch_bias_temperature_ignored")
    with pytest.raises(TypeError, match="vocab_parallel must be a fused_rlvr.VocabParallel"):
        F.linear_logprobs(hidden, weight, targets, vocab_parallel=(object(), 3))
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
            F.linear_logprobs(hidden, weight, targets, vocab_parallel=F.VocabParallel(object(), 0))


# ---- GPU: the same cases with the compiled Triton kernels (2 processes on one GPU over gloo, or NCCL) ------


@pytest.fixture(scope="module")
def gpu_ranks():
    return _spawn("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(LP_CASES) + ["grpo", "pacs"])
def test_gpu_vocab_parallel_equals_single_process(gpu_ranks, case):
    with _on("cuda"):
        if case in ("grpo", "pacs"):
            p = _loss_problem()
            single, starts, bf16 = _run_loss(case, p, p["weight"], p["bias"]), None, False
        else:
            hidden, weight, targets, bias, g_lp, g_ent = _lp_problem(case)
            lora = _lora_factors(case) if LP_CASES[case].get("lora") else None
            single = _run_lp(hidden, weight, targets, bias, g_lp, g_ent, lora=lora, **_kw(case))
            starts, bf16 = LP_CASES[case]["starts"], LP_CASES[case].get("dtype") == torch.bfloat16
    # fp32 kernels use IEEE dots; the split of the vocabulary over programs differs from the shards'
    _compare(_ok(gpu_ranks, case), single, starts, 1e-2 if bf16 else 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name, kinds, fragments", ERROR_EXPECTATIONS)
def test_gpu_errors_raised_on_every_rank(gpu_ranks, name, kinds, fragments):
    _check_errors(gpu_ranks, name, kinds, fragments)


def test_verl_tensor_parallel_call_equals_single_process(ranks):
    # verl's linear_cross_entropy(..., dist_process_group=tp_group) with equal contiguous shards; as verl's own
    # kernel, each rank's d_hidden is its shard's partial sum (verl reduces it outside: 2x too large otherwise)
    hidden, weight, y, g_lp, g_ent = _verl_problem()
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    lp, ent = F.linear_logprobs(h, w, y, temperature=0.7, backend="torch")
    (lp * g_lp + ent * g_ent).sum().backward()
    outs = _ok(ranks, "verl_tp")
    shard = weight.shape[0] // WORLD
    for r, out in enumerate(outs):
        torch.testing.assert_close(out["logprobs"], lp.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out["entropy"], ent.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out["d_weight"], w.grad[r * shard : (r + 1) * shard], rtol=1e-6, atol=1e-6)
        assert rel_err(out["d_hidden"], h.grad) > 1e-2  # a partial sum, not the full gradient
    torch.testing.assert_close(sum(out["d_hidden"] for out in outs), h.grad, rtol=1e-6, atol=1e-6)
