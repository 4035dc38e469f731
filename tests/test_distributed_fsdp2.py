"""The fused ops on an FSDP2-sharded model (torch.distributed.fsdp.fully_shard), 2 CPU processes over gloo.

A tiny causal-LM-shaped model (embedding, one body layer, lm-head with bias) is sharded by FSDP2 (dim 0 of
every parameter split over the 2 ranks); each rank holds its own data (data parallel). The fused loss runs
inside `fsdp2_lm_head_call(model, fn, ...)`, i.e. as the forward of the FSDP2 root, so the root's hooks
gather the lm-head (and the embedding) and the body's own hooks gather the body. Two layouts:
"root_owns_head" (the lm-head is a parameter of the root group, kept gathered until the backward) and
"head_wrapped" (the lm-head is its own FSDP2 module, called through a nested `fsdp2_lm_head_call`: it is
freed after the forward and re-gathered for the backward). The gradients FSDP2 reduce-scatters must be the
mean over ranks of the single-process gradients, and an SGD step on the shards must give the same next
log-probs as the same step on the full model.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _helpers import rel_err

import fused_rlvr as F
from fused_rlvr.fsdp import fsdp2_lm_head_call

WORLD = 2
B, T, H, V = 3, 5, 16, 37  # V odd: FSDP2 pads the uneven dim-0 shards
LR = 0.5
TIMEOUT_S = 120
LAYOUTS = ("root_owns_head", "head_wrapped")
PARAMS = ("embed.weight", "body.weight", "body.bias", "lm_head.weight", "lm_head.bias")


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.embed = torch.nn.Embedding(V, H)
        self.body = torch.nn.Linear(H, H)
        self.lm_head = torch.nn.Linear(H, V, bias=True)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def hidden(self, ids):
        return torch.tanh(self.body(self.embed(ids)))


def _data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :2] = -100
    g_lp, g_ent = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    adv = torch.randn(B, generator=g)
    return dict(ids=ids, targets=targets, g_lp=g_lp, g_ent=g_ent, mask=mask, adv=adv)


def _head_logprobs(head, hidden, d):
    lp, ent = F.linear_logprobs(
        hidden, head.weight, d["targets"], bias=head.bias, temperature=0.8, backend="torch"
    )
    return lp, ent, (lp * d["g_lp"]).sum() + (ent * d["g_ent"]).sum()


def _head_grpo(head, hidden, d):
    return F.linear_grpo_loss(
        hidden,
        head.weight,
        d["targets"].clamp_min(0),
        d["adv"],
        d["mask"],
        bias=head.bias,
        entropy_coef=0.01,
        temperature=0.8,
        backend="torch",
    )


def _step(kind, nested):
    """fn(model, ids, d) for fsdp2_lm_head_call(model, ...): the body, then the fused loss on the lm-head."""
    head_fn = _head_logprobs if kind == "logprobs" else _head_grpo

    def fn(model, ids, d):
        hidden = model.hidden(ids)
        if nested:  # the lm-head is its own FSDP2 module: through its __call__ too
            return fsdp2_lm_head_call(model.lm_head, head_fn, hidden, d)
        return head_fn(model.lm_head, hidden, d)

    return fn


def _grads(model):
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name] = g.full_tensor() if hasattr(g, "full_tensor") else g.clone()
    return out


def _worker(rank, init_file, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    res = {}
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        d = _data(rank)
        for layout in LAYOUTS:
            nested = layout == "head_wrapped"
            for kind in ("logprobs", "grpo"):
                key = f"{layout}/{kind}"
                model = Tiny()
                fully_shard(model.body, mesh=mesh)
                if nested:
                    fully_shard(model.lm_head, mesh=mesh)
                fully_shard(model, mesh=mesh)
                res[key + "/shard_rows"] = model.lm_head.weight.to_local().shape[0]
                out = fsdp2_lm_head_call(model, _step(kind, nested), d["ids"], d)
                res[key + "/head_freed_after_forward"] = isinstance(model.lm_head.weight, DTensor)
                loss = out[2] if kind == "logprobs" else out[0]
                res[key + "/value"] = out[0].detach()
                loss.backward()
                res[key + "/grads"] = _grads(model)
                if kind == "logprobs":  # one SGD step on the shards, then the next forward
                    torch.optim.SGD(model.parameters(), lr=LR).step()
                    with torch.no_grad():
                        res[key + "/after_step"] = fsdp2_lm_head_call(
                            model, _step(kind, nested), d["ids"], d
                        )[0]
                    if nested:  # a sharded parameter passed directly is refused with a pointer to the helper
                        try:
                            F.linear_logprobs(
                                torch.randn(2, H), model.lm_head.weight, d["targets"][0, :2], backend="torch"
                            )
                        except TypeError as exc:
                            res["direct_call_error"] = str(exc)
    except Exception as exc:  # reported to the parent instead of hanging the other rank's test
        res["worker_error"] = f"{type(exc).__name__}: {exc}"
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # (destroying the group right after FSDP2's last reduce-scatter aborted once without it)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _worker,
            args=(os.path.join(tmp, "rendezvous"), tmp),
            nprocs=WORLD,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + TIMEOUT_S
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"the {WORLD} gloo processes did not finish within {TIMEOUT_S} s")
        out = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]
    for r, res in enumerate(out):
        assert "worker_error" not in res, f"rank {r}: {res['worker_error']}"
    return out


def _single(kind, rank, model=None):
    model = model or Tiny()
    d = _data(rank)
    out = _step(kind, False)(model, d["ids"], d)
    (out[2] if kind == "logprobs" else out[0]).backward()
    return out[0].detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["logprobs", "grpo"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fsdp2_sharded_model_matches_single_process(ranks, layout, kind):
    singles = [_single(kind, r) for r in range(WORLD)]
    key = f"{layout}/{kind}"
    for r, res in enumerate(ranks):
        assert res[key + "/shard_rows"] == (19, 18)[r]  # each rank held its half of the lm-head rows
        # a separately wrapped lm-head is freed (resharded) after its forward and re-gathered for backward;
        # the root keeps its parameters gathered until the backward
        assert res[key + "/head_freed_after_forward"] == (layout == "head_wrapped")
        assert rel_err(res[key + "/value"], singles[r][0]) <= 1e-6  # this rank's log-probs / loss
        for name in PARAMS:  # FSDP2 averages the ranks' gradients
            mean = sum(s[1][name] for s in singles) / WORLD
            err = rel_err(res[key + "/grads"][name], mean)
            assert err <= 1e-6, f"rank {r} {name}: {err:.2e}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fsdp2_optimizer_step_on_shards(ranks, layout):
    singles = [_single("logprobs", r) for r in range(WORLD)]
    model = Tiny()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p -= LR * sum(s[1][name] for s in singles) / WORLD
        for r, res in enumerate(ranks):
            lp = _step("logprobs", False)(model, _data(r)["ids"], _data(r))[0]
            assert rel_err(res[f"{layout}/logprobs/after_step"], lp) <= 1e-6
            assert rel_err(lp, singles[r][0]) > 1e-3  # the step changed them


def test_sharded_parameter_passed_directly_is_refused(ranks):
    for res in ranks:
        assert "is a DTensor" in res["direct_call_error"] and "fsdp2_lm_head_call" in res["direct_call_error"]


def test_lm_head_call_without_fsdp_restores_forward():
    model = Tiny()
    d = _data(0)
    lp = fsdp2_lm_head_call(model, _step("logprobs", False), d["ids"], d)[0]
    assert torch.equal(lp, _step("logprobs", False)(model, d["ids"], d)[0])
    assert "forward" not in model.__dict__
    with pytest.raises(NotImplementedError):  # Module.forward again, not the redirected one
        model(d["ids"])
