"""Regression tests, one per bug that peer kernels shipped (docs/methods.md, section 1)."""

import pytest
import torch
from _helpers import BACKENDS, check_fp32, fused, ground_truth, make_inputs, rel_err, run

from fused_rlvr import _torch_backend, _triton_backend, linear_logprobs
from fused_rlvr.reference import reference_logprobs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [33, 65, 97])  # one column past a multiple of the interpreter's tile (32)
def test_vocab_tail_is_minus_inf(backend, vocab):
    """verl: tail columns read as 0 added exp(0) per phantom column and gave positive log-probs."""
    n, h = 6, 16
    hidden = torch.randn(n, h) * 0.1 - 3.0  # strongly negative logits make phantom zeros dominate
    weight = torch.randn(vocab, h).abs()
    rows = hidden.repeat_interleave(vocab, 0)
    targets = torch.arange(vocab).repeat(n)  # every vocabulary entry as a target
    lp, _ = linear_logprobs(rows, weight, targets, backend=backend)
    lp = lp.view(n, vocab)
    assert (lp <= 0).all()
    torch.testing.assert_close(
        lp.double().exp().sum(1), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_max_starts_at_minus_inf(backend):
    """A running max initialised at 0 breaks rows whose logits are all negative."""
    h, w, y, b = make_inputs(20, 16, 70, torch.float32, seed=2, bias=True)
    b = b - 1000.0
    lp, ent = linear_logprobs(h, w, y, bias=b, backend=backend)
    ref_lp, ref_ent = reference_logprobs(h.double(), w.double(), y, bias=b.double())
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_d_hidden_accumulates_in_fp32_across_vocab_chunks(backend, monkeypatch):
    """d_hidden summed over many vocabulary chunks in bf16 loses bits at each chunk; ours sums in fp32."""
    monkeypatch.setenv("FUSED_RLVR_TORCH_CHUNK_BYTES", str(64 * 4 * 64))  # 64-column chunks, 64 rows
    monkeypatch.setattr(_triton_backend, "INTERPRET_VOCAB_CHUNK", 16)
    h, w, y, _ = make_inputs(64, 32, 2048, torch.bfloat16, seed=3)
    g_lp = torch.randn(64, generator=torch.Generator().manual_seed(4))
    out = run(fused, h, w, y, None, g_lp, None, backend=backend)
    ref = ground_truth(h, w, y, None, g_lp, None)
    err = rel_err(out[2], ref[2])
    # emulate a bf16 running sum over 128 chunks of 16 columns to show what the bug would cost
    z = (h.double() @ w.double().T).log_softmax(-1)
    dz = -z.exp() * g_lp.double()[:, None]
    dz[torch.arange(64), y] += g_lp.double()
    running = torch.zeros(64, 32, dtype=torch.bfloat16)
    for c in range(0, 2048, 16):
        running = (
            running.double() + dz[:, c : c + 16].to(torch.bfloat16).double() @ w[c : c + 16].double()
        ).to(torch.bfloat16)
    bug_err = rel_err(running, ref[2])
    assert err < 2**-7, err  # bf16 output rounding plus the bf16 staging of the logit gradient
    assert err < bug_err / 3, (err, bug_err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_upstream_gradients_reach_d_weight(backend):
    """Liger FLCE with reduction='none' gave a wrong dW until per-token upstream grads were folded in."""
    h, w, y, _ = make_inputs(40, 24, 60, torch.float32, seed=4)
    y[:20] = 5  # many tokens share a target row of W
    g_lp = torch.linspace(-3, 5, 40)  # very different per-token weights
    out = run(fused, h, w, y, None, g_lp, None, backend=backend)
    ref = ground_truth(h, w, y, None, g_lp, None)
    check_fp32(out, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hyper_parameters_from_tensors_and_compile(backend):
    """Liger: python float hyper-parameters became fp64 under torch.compile and broke the kernels."""
    h, w, y, _ = make_inputs(16, 16, 40, torch.float32, seed=5)
    temp64 = torch.tensor(0.7, dtype=torch.float64)
    lp, _ = linear_logprobs(
        h, w, y, temperature=temp64, softcap=torch.tensor(9.0, dtype=torch.float64), backend=backend
    )
    ref_lp, _ = reference_logprobs(h.double(), w.double(), y, temperature=0.7, softcap=9.0)
    assert rel_err(lp, ref_lp) < 1e-5

    def step(hidden):
        return linear_logprobs(hidden, w, y, temperature=0.7, backend=backend).logprobs.sum()

    hidden = h.clone().requires_grad_()
    compiled = torch.compile(step, backend="eager")
    compiled(hidden).backward()
    ref_h = h.double().requires_grad_()
    reference_logprobs(ref_h, w.double(), y, temperature=0.7).logprobs.sum().backward()
    assert rel_err(hidden.grad, ref_h.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_cost_no_vocab_work(backend, monkeypatch):
    """Prompt tokens are masked in RL: only valid rows reach the kernels, forward and backward."""
    seen = []
    impl = _triton_backend if backend == "triton" else _torch_backend
    real_fwd, real_bwd = impl.forward, impl.backward

    def spy_fwd(hidden, *a, **k):
        seen.append(("fwd", hidden.shape[0]))
        return real_fwd(hidden, *a, **k)

    def spy_bwd(hidden, *a, **k):
        seen.append(("bwd", hidden.shape[0]))
        return real_bwd(hidden, *a, **k)

    monkeypatch.setattr(impl, "forward", spy_fwd)
    monkeypatch.setattr(impl, "backward", spy_bwd)
    h, w, y, _ = make_inputs(30, 16, 50, torch.float32, seed=6)
    y[:22] = -100
    out = run(fused, h, w, y, None, torch.randn(30), torch.randn(30), backend=backend)
    assert seen == [("fwd", 8), ("bwd", 8)]
    assert torch.equal(out[2][:22], torch.zeros(22, 16))


@pytest.mark.slow
def test_int64_offsets_past_2_31_elements_torch():
    """N x V past 2^31 elements: every index and offset must be 64-bit (checked on a subset of rows)."""
    n, h, v = 65_600, 2, 32_771  # N * V = 2.15e9 > 2^31
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    with torch.no_grad():
        lp, ent = linear_logprobs(hidden, weight, targets, backend="torch")
    rows = torch.tensor([0, 1, n // 2, n - 2, n - 1])
    ref_lp, ref_ent = reference_logprobs(hidden[rows].double(), weight.double(), targets[rows])
    torch.testing.assert_close(lp[rows].double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent[rows].double(), ref_ent, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_int64_offsets_past_2_31_elements_triton():
    n, h, v = 1_100_000, 16, 2_053  # staging buffer N x chunk and N x V both past 2^31
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(n, h, generator=g).cuda().bfloat16().requires_grad_()
    weight = torch.randn(v, h, generator=g).cuda().bfloat16()
    targets = torch.randint(0, v, (n,), generator=g).cuda()
    lp, ent = linear_logprobs(hidden, weight, targets, backend="triton")
    (lp.sum() + ent.sum()).backward()
    rows = torch.tensor([0, 1, n // 2, n - 2, n - 1], device="cuda")
    ref_h = hidden.detach()[rows].double().requires_grad_()
    ref_lp, ref_ent = reference_logprobs(ref_h, weight.double(), targets[rows])
    (ref_lp.sum() + ref_ent.sum()).backward()
    torch.testing.assert_close(lp[rows].double(), ref_lp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hidden.grad[rows].double(), ref_h.grad, rtol=2e-2, atol=2e-2)
