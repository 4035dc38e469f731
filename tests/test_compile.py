"""torch.compile(fullgraph=True) of code calling the fused ops: the custom ops fused_rlvr::token_stats and
fused_rlvr::token_stats_backward stand in the graph, and values and gradients equal the eager call's.

The torch backend everywhere; the Triton kernels (the interpreter on CPU) through the same op where triton
is installed, compiled by inductor on a GPU in the gpu-marked test.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
from _helpers import BACKENDS, make_inputs

import fused_rlvr as F
from fused_rlvr import _torch_backend
from fused_rlvr.dpo import linear_dpo_loss
from fused_rlvr.linear_logprobs import VOCAB_PARALLEL_EAGER

COMPILERS = ["eager", "aot_eager"]
B, T, H, V = 4, 8, 16, 50


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: the step functions below share code objects across parameters, and
    dynamo's per-code cache would otherwise fill up (and fall back to eager) over a run."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _outputs_and_grads(fn, tensors, grad_of):
    """fn(*leaves) -> (loss, outputs...): the detached outputs and the grads of the leaves named in grad_of."""
    leaves = {
        k: None if t is None else t.detach().clone().requires_grad_(k in grad_of) for k, t in tensors.items()
    }
    loss, *outs = fn(**leaves)
    loss.backward()
    flat = [loss.detach()] + [o.detach() for o in outs if o is not None]
    return flat, {k: leaves[k].grad for k in grad_of}


def _assert_same(eager, compiled, rtol=None, atol=None):
    (e_out, e_grads), (c_out, c_grads) = eager, compiled
    assert len(e_out) == len(c_out)
    for i, (e, c) in enumerate(zip(e_out, c_out)):
        torch.testing.assert_close(c, e, rtol=rtol, atol=atol, msg=lambda m, i=i: f"output {i}: {m}")
    assert set(e_grads) == set(c_grads)
    for k in e_grads:
        assert e_grads[k] is not None and c_grads[k] is not None, k
        torch.testing.assert_close(
            c_grads[k], e_grads[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"d_{k}: {m}"
        )


def _compare(fn, tensors, grad_of, compiler, rtol=None, atol=None):
    eager = _outputs_and_grads(fn, tensors, grad_of)
    compiled = _outputs_and_grads(torch.compile(fn, fullgraph=True, backend=compiler), tensors, grad_of)
    _assert_same(eager, compiled, rtol, atol)
    return compiled


def _lp_problem(seed=0, bias=True, lead=(B, T)):
    h, w, y, b = make_inputs(B * T, H, V, torch.float32, seed=seed, bias=bias, ignore_frac=0.25, lead=lead)
    g = torch.Generator().manual_seed(seed + 1)
    weights = (torch.randn(y.shape, generator=g), torch.randn(y.shape, generator=g))
    return h, w, y, b, weights


def _token_temperature(targets, seed=3):
    g = torch.Generator().manual_seed(seed)
    temp = (0.5 + torch.rand(targets.shape, generator=g)).to(targets.device)
    return torch.where(targets == -100, -1.0, temp)  # anything is allowed on ignored tokens


LP_CASES = {
    # name: (linear_logprobs options, the loss uses the entropy, grads of)
    "float-temperature-softcap-bias": (
        dict(temperature=0.7, softcap=5.0),
        True,
        ("hidden", "weight", "bias"),
    ),
    "logprobs-only": (dict(temperature=1.3, return_entropy=False), False, ("hidden", "weight", "bias")),
    "entropy-unused": (dict(softcap=3.0), False, ("hidden", "weight", "bias")),
    "per-token-temperature": (dict(temperature="per-token", softcap=4.0), True, ("hidden", "weight", "bias")),
    "lora-frozen-weight": (dict(temperature=0.9, lora_scale=0.5), True, ("hidden", "lora_a", "lora_b")),
}


def _lp_case(name, backend="torch", device="cpu"):
    kw, use_entropy, grad_of = LP_CASES[name]
    kw = dict(kw, backend=backend)
    h, w, y, b, weights = _lp_problem()
    h, w, y, b, g_lp, g_ent = (t.to(device) for t in (h, w, y, b, *weights))
    if kw.get("temperature") == "per-token":
        kw["temperature"] = _token_temperature(y)
    tensors = {"hidden": h, "weight": w, "bias": b, "lora_a": None, "lora_b": None}
    if "lora_scale" in kw:
        g = torch.Generator().manual_seed(5)
        tensors["lora_a"] = torch.randn(4, H, generator=g).to(device)
        tensors["lora_b"] = torch.randn(V, 4, generator=g).to(device)

    def step(hidden, weight, bias, lora_a, lora_b):
        lp, ent = F.linear_logprobs(hidden, weight, y, bias=bias, lora_a=lora_a, lora_b=lora_b, **kw)
        loss = (lp * g_lp).sum()
        if use_entropy:
            loss = loss + (ent * g_ent).sum()
        return loss, lp, ent

    return step, tensors, grad_of


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("case", list(LP_CASES))
def test_linear_logprobs_compiles_to_eager_values_and_grads(case, compiler):
    step, tensors, grad_of = _lp_case(case)
    _compare(step, tensors, grad_of, compiler)


@pytest.mark.slow
def test_linear_logprobs_inductor():
    step, tensors, grad_of = _lp_case("per-token-temperature")
    _compare(step, tensors, grad_of, "inductor", rtol=1e-5, atol=1e-6)


def test_graph_holds_the_custom_op_and_no_logits():
    """The compiled graph calls the op (forward and, through aot autograd, its backward) and holds no
    [tokens, V] tensor."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    from torch._dynamo.backends.common import aot_autograd

    step, tensors, grad_of = _lp_case("float-temperature-softcap-bias")
    compiled = torch.compile(
        step, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record)
    )
    _outputs_and_grads(compiled, tensors, grad_of)
    fw, bw = graphs
    assert torch.ops.fused_rlvr.token_stats.default in {n.target for n in fw.graph.nodes}
    assert torch.ops.fused_rlvr.token_stats_backward.default in {n.target for n in bw.graph.nodes}
    for gm in graphs:
        for node in gm.graph.nodes:
            val = node.meta.get("val")
            for t in val if isinstance(val, (tuple, list)) else (val,):
                if isinstance(t, torch.Tensor):
                    assert V not in t.shape or t.dim() < 2 or tuple(t.shape) == (V, H), (node, t.shape)


def test_unused_entropy_gets_no_backward_work(monkeypatch):
    """An entropy that does not reach the loss sends no (zero) gradient into the backward kernels."""
    seen = []
    real = _torch_backend.backward

    def spy(hidden, weight, bias, targets, lse, entropy, grad_logprob, grad_entropy, params, needs):
        seen.append((grad_logprob is None, grad_entropy is None, needs))
        return real(hidden, weight, bias, targets, lse, entropy, grad_logprob, grad_entropy, params, needs)

    monkeypatch.setattr(_torch_backend, "backward", spy)
    h, w, y, b, (g_lp, _) = _lp_problem()

    def step(hidden, weight, bias):
        lp, ent = F.linear_logprobs(hidden, weight, y, bias=bias, softcap=3.0, backend="torch")
        # a compiled region's outputs all get a gradient (zeros when unused): a metric leaves detached
        return (lp * g_lp).sum(), ent.detach()

    grad_of = ("hidden", "weight")
    compiled = _compare(step, {"hidden": h, "weight": w, "bias": b}, grad_of, "aot_eager")
    assert seen == [(False, True, (True, True, False, False, False))] * 2  # eager, then compiled
    assert compiled[1]["weight"].abs().sum() > 0


def test_dynamic_shapes():
    h, w, y, b, (g_lp, _) = _lp_problem(lead=None)

    def step(hidden, weight, targets):
        return (
            F.linear_logprobs(hidden, weight, targets, temperature=0.8, backend="torch").logprobs * 2
        ).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    for n in (32, 19):
        hh = h[:n].clone().requires_grad_()
        ww = w.clone().requires_grad_()
        got = compiled(hh, ww, y[:n])
        got.backward()
        he, we = h[:n].clone().requires_grad_(), w.clone().requires_grad_()
        ref = step(he, we, y[:n])
        ref.backward()
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(hh.grad, he.grad)
        torch.testing.assert_close(ww.grad, we.grad)


def test_hyper_parameters_that_change_between_calls():
    """Float arguments of the compiled function become symbolic after a change: the checks still trace."""
    h, w, y, b, (g_lp, g_ent) = _lp_problem()
    _, _, _, _, mask, adv, old, ref = _grpo_problem()

    def lp_step(hidden, weight, temperature, softcap):
        lp, ent = F.linear_logprobs(
            hidden, weight, y, temperature=temperature, softcap=softcap, backend="torch"
        )
        return ((lp * g_lp).sum() + (ent * g_ent).sum(), lp, ent)

    def grpo_step(hidden, weight, beta, eps_high, entropy_coef):
        loss, stats = F.linear_grpo_loss(
            hidden,
            weight,
            y,
            adv,
            mask,
            old_logprobs=old,
            ref_logprobs=ref,
            beta=beta,
            eps_high=eps_high,
            entropy_coef=entropy_coef,
            backend="torch",
        )
        return (loss, *stats)

    tensors = {"hidden": h, "weight": w}
    lp_c = torch.compile(lp_step, fullgraph=True, backend="aot_eager")
    grpo_c = torch.compile(grpo_step, fullgraph=True, backend="aot_eager")
    grad_of = ("hidden", "weight")
    for i, x in enumerate((0.6, 0.9, 1.4)):
        lp_kw = dict(temperature=x, softcap=4.0 + i)
        eager = _outputs_and_grads(functools.partial(lp_step, **lp_kw), tensors, grad_of)
        _assert_same(eager, _outputs_and_grads(functools.partial(lp_c, **lp_kw), tensors, grad_of))
        grpo_kw = dict(beta=0.02 * (i + 1), eps_high=x / 2, entropy_coef=0.01 * i)
        eager = _outputs_and_grads(functools.partial(grpo_step, **grpo_kw), tensors, grad_of)
        _assert_same(eager, _outputs_and_grads(functools.partial(grpo_c, **grpo_kw), tensors, grad_of))


def test_no_grad_and_entropy_moments():
    h, w, y, b, _ = _lp_problem()

    def moments(hidden, weight, bias):
        return F.linear_entropy_moments(hidden, weight, y, bias=bias, temperature=0.7, backend="torch")

    def no_grad(hidden, weight):
        with torch.no_grad():
            return F.linear_logprobs(hidden, weight, y, softcap=2.0, backend="torch")

    got = torch.compile(moments, fullgraph=True, backend="aot_eager")(h, w, b)
    ref = moments(h, w, b)
    assert set(got) == set(ref) == {"logprob", "entropy", "lse", "sum_p2", "sum_p2_logp"}
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])
    hg = h.clone().requires_grad_()
    got = torch.compile(no_grad, fullgraph=True, backend="aot_eager")(hg, w)
    assert not got.logprobs.requires_grad
    ref = no_grad(hg, w)
    torch.testing.assert_close(got.logprobs, ref.logprobs)
    torch.testing.assert_close(got.entropy, ref.entropy)


def test_value_checks_run_inside_the_compiled_op():
    """The target-range and per-token temperature checks (host syncs) are not traced: the op's
    implementation runs them on the real tensors, with the eager messages."""
    h, w, y, _, _ = _lp_problem(bias=False)
    bad = y.clone()
    bad[1, 2] = V + 3
    temp = _token_temperature(y)
    scored = (y != -100).nonzero()[0].tolist()
    cold = temp.clone()
    cold[tuple(scored)] = 0.0

    def step(targets, temperature):
        return F.linear_logprobs(h, w, targets, temperature=temperature, backend="torch").logprobs.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(y, temp)  # valid: no error
    for targets, temperature in ((bad, temp), (y, cold)):
        with pytest.raises(ValueError) as eager_err:
            step(targets, temperature)
        with pytest.raises(ValueError) as compiled_err:
            compiled(targets, temperature)
        assert str(compiled_err.value) == str(eager_err.value)
    F.set_target_check(False)
    try:
        assert torch.isfinite(compiled(bad, temp))  # the check is off: no error (a wrong value)
    finally:
        F.set_target_check(True)


def _grpo_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w, y, b = make_inputs(B * T, H, V, torch.float32, seed=seed, bias=True, lead=(B, T))
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    adv = torch.randn(B, generator=g)
    # ratios spread around 1 so that the clip branches are taken
    old = -4.0 + 0.3 * torch.randn(B, T, generator=g)
    ref = -4.0 + 0.3 * torch.randn(B, T, generator=g)
    return h, w, y, b, mask, adv, old, ref


GRPO_CASES = {
    "ppo-token-mean-kl-entropy": dict(beta=0.05, kl="k3", entropy_coef=0.01, dual_clip=3.0, ref=True),
    "sequence-importance-seq-mean": dict(
        importance="sequence", agg="seq-mean-token-mean", pg_weights="per-seq"
    ),
    "cispo-pg-weights-dr-grpo": dict(
        policy_loss="cispo", eps_high=5.0, agg="dr_grpo", pg_weights="per-token"
    ),
    "pg-weights-callable-token-temperature": dict(
        pg_weights="callable", temperature="per-token", softcap=6.0, beta=0.1, kl="k2", ref=True
    ),
}


def _grpo_case(name, backend="torch"):
    kw = dict(GRPO_CASES[name], backend=backend)
    h, w, y, b, mask, adv, old, ref = _grpo_problem()
    g = torch.Generator().manual_seed(11)
    if kw.pop("ref", False):
        kw["ref_logprobs"] = ref
    pgw = kw.pop("pg_weights", None)
    if pgw == "per-seq":
        kw["pg_weights"] = torch.rand(B, 1, generator=g)
    elif pgw == "per-token":
        kw["pg_weights"] = torch.rand(B, T, generator=g)
    elif pgw == "callable":  # TRL's top-entropy mask, computed from the current policy
        kw["pg_weights"] = lambda lp, ent: (ent > 1.5).float()
    if kw.get("temperature") == "per-token":
        kw["temperature"] = 0.6 + torch.rand(B, T, generator=g)

    def step(hidden, weight, bias):
        loss, stats = F.linear_grpo_loss(hidden, weight, y, adv, mask, old_logprobs=old, bias=bias, **kw)
        return (loss, *stats)

    return step, {"hidden": h, "weight": w, "bias": b}, ("hidden", "weight", "bias")


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("case", list(GRPO_CASES))
def test_linear_grpo_loss_compiles_to_eager_values_and_grads(case, compiler):
    step, tensors, grad_of = _grpo_case(case)
    (loss, *stats), _ = _compare(step, tensors, grad_of, compiler)
    assert len(stats) == len(F.GRPOStats._fields)
    assert loss != 0


def test_linear_dpo_loss_compiles():
    h, w, y, b, mask, _, old, _ = _grpo_problem()
    ref = old.sum(1) * 0.9

    def step(hidden, weight, bias):
        loss, stats = linear_dpo_loss(hidden, weight, y, mask, ref, bias=bias, beta=0.2, backend="torch")
        return (loss, *stats)

    _compare(step, {"hidden": h, "weight": w, "bias": b}, ("hidden", "weight", "bias"), "aot_eager")


@pytest.mark.slow
def test_linear_grpo_loss_inductor():
    step, tensors, grad_of = _grpo_case("ppo-token-mean-kl-entropy")
    _compare(step, tensors, grad_of, "inductor", rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
def test_triton_backend_goes_through_the_op():
    """backend='triton' (the interpreter on CPU) under torch.compile: the same custom op runs the kernels;
    the GRPO epilogue is then the torch one, equal to the kernel's to rounding."""
    step, tensors, grad_of = _lp_case("per-token-temperature", backend="triton")
    _compare(step, tensors, grad_of, "aot_eager")
    step, tensors, grad_of = _grpo_case("ppo-token-mean-kl-entropy", backend="triton")
    _compare(step, tensors, grad_of, "aot_eager", rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["per-token-temperature", "lora-frozen-weight"])
def test_triton_kernels_under_inductor_on_gpu(case):
    step, tensors, grad_of = _lp_case(case, backend="triton", device="cuda")
    _compare(step, tensors, grad_of, "inductor", rtol=1e-4, atol=1e-5)


def test_opcheck_token_stats():
    """torch.library.opcheck: schema, fake (shapes, dtypes, strides) and autograd registrations of the ops."""
    h, w, y, b, _ = _lp_problem(lead=None)
    temp = _token_temperature(y)
    g = torch.Generator().manual_seed(2)
    a, lb = torch.randn(3, H, generator=g), torch.randn(V, 3, generator=g)
    op = torch.ops.fused_rlvr.token_stats
    leaf = lambda t: t.clone().requires_grad_()  # noqa: E731
    samples = [
        (leaf(h), leaf(w), leaf(b), y, 0.7, None, 5.0, -100, "torch", False, False, None, None, 1.0),
        (leaf(h), w, None, y, 1.0, temp, None, -100, "torch", False, True, leaf(a), leaf(lb), 0.5),
        (
            leaf(h),
            leaf(w.T.contiguous().T),
            None,
            torch.full_like(y, -100),
            1.0,
            None,
            None,
            -100,
            "torch",
            False,
            False,
            None,
            None,
            1.0,
        ),
    ]
    for args in samples:
        torch.library.opcheck(op, args)
    # the backward op alone: a column-major weight (d_weight follows its layout), no entropy gradient
    w_cm = w.T.contiguous().T
    _, ent, lse, _, _ = op(h, w_cm, None, y, 0.7, None, None, -100, "torch", False, False, a, lb, 0.5)
    g_lp = torch.randn(y.shape, generator=g)
    back = torch.ops.fused_rlvr.token_stats_backward
    for needs in ((True, True, False, True, True), (False, True, False, False, False)):
        args = (h, w_cm, None, y, lse, ent, g_lp, None, 0.7, None, None, -100, "torch", False, a, lb, 0.5)
        torch.library.opcheck(back, args + needs)
    dw = back(*args, True, True, False, True, True)[1]
    assert dw.stride() == w_cm.stride()


def test_vocab_parallel_runs_eagerly_under_compile(tmp_path):
    """A vocab_parallel call is a graph break (values as eager), and an error naming it with fullgraph."""
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        h, w, y, b, (g_lp, _) = _lp_problem()
        vp = F.VocabParallel(dist.group.WORLD, 0)

        def step(hidden, weight):
            lp, _ = F.linear_logprobs(hidden, weight, y, vocab_parallel=vp, backend="torch")
            return ((lp * g_lp).sum(),)

        tensors = {"hidden": h, "weight": w}
        eager = _outputs_and_grads(step, tensors, ("hidden", "weight"))
        compiled = _outputs_and_grads(torch.compile(step, backend="aot_eager"), tensors, ("hidden", "weight"))
        _assert_same(eager, compiled)
        torch._dynamo.reset()
        with pytest.raises(Exception, match="vocab_parallel= runs eagerly under torch.compile") as err:
            torch.compile(step, fullgraph=True, backend="eager")(h, w)
        assert VOCAB_PARALLEL_EAGER in str(err.value)
    finally:
        dist.destroy_process_group()
