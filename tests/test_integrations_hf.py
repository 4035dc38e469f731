"""fused_rlvr.integrations.hf against the models' own logits, on tiny randomly initialised HF models."""

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from _helpers import BACKENDS, rel_err  # noqa: E402

from fused_rlvr.integrations.hf import (  # noqa: E402
    LMHead,
    last_hidden_states,
    lm_head,
    sequence_token_stats,
    shifted_targets,
)

V = 101  # not a multiple of any tile
SMALL = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _model(arch):
    t = transformers
    if arch == "llama":  # untied head (SmolLM2 is a Llama)
        return t.LlamaForCausalLM(t.LlamaConfig(**SMALL, tie_word_embeddings=False))
    if arch == "qwen2-tied":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**SMALL, tie_word_embeddings=True))
    if arch == "gemma2-softcap":  # tied, final_logit_softcapping, embedding normaliser on the inputs
        return t.Gemma2ForCausalLM(t.Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=2.0))
    if arch == "gpt2":  # tied, base model under .transformer, final LayerNorm ln_f
        return t.GPT2LMHeadModel(
            t.GPT2Config(
                vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
            )
        )
    if arch == "phi-bias":  # lm_head with a bias
        return t.PhiForCausalLM(
            t.PhiConfig(
                vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
            )
        )
    raise AssertionError(arch)


ARCHS = ["llama", "qwen2-tied", "gemma2-softcap", "gpt2", "phi-bias"]


def _batch(b=3, t=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :3] = 0  # left padding
    resp = torch.zeros_like(ids)
    resp[:, 6:] = 1  # the last 5 tokens are the response
    resp[1, -2:] = 0  # right padding of the response
    return ids, attn, resp


def _reference(model, ids, attn, resp, temperature):
    """Materialised logits from the model's own forward: log_softmax(logits[:, :-1] / T) gathered at ids[:, 1:]."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / temperature
    logp = torch.log_softmax(logits, -1)
    valid = resp[:, 1:] > 0
    lp = logp.gather(-1, ids[:, 1:, None])[..., 0]
    ent = -(logp.exp() * logp).sum(-1)
    return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ARCHS)
def test_sequence_token_stats_match_model_logits(arch):
    ours = _model(arch).float().eval()
    ref = copy.deepcopy(ours)
    ids, attn, resp = _batch()
    temperature = 0.7
    g_lp = torch.randn(ids.shape[0], ids.shape[1] - 1)
    g_ent = torch.randn(ids.shape[0], ids.shape[1] - 1)

    lp, ent = sequence_token_stats(ours, ids, attn, resp, temperature=temperature, backend="torch")
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    r_lp, r_ent = _reference(ref, ids, attn, resp, temperature)
    ((r_lp * g_lp).sum() + (r_ent * g_ent).sum()).backward()

    assert lp.shape == ent.shape == (3, 10)
    valid = resp[:, 1:] > 0
    assert (lp[~valid] == 0).all() and (ent[~valid] == 0).all()
    assert rel_err(lp, r_lp) < 1e-5 and rel_err(ent, r_ent) < 1e-5
    g_ours, g_ref = _grads(ours), _grads(ref)
    assert g_ours.keys() == g_ref.keys() and len(g_ours) > 5
    for name in g_ref:
        assert rel_err(g_ours[name], g_ref[name]) < 1e-5, name  # observed <= 8e-7 (fp32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["llama", "gemma2-softcap"])
def test_per_token_temperature_aligned_with_the_outputs(arch, backend):
    """temperature [B, T-1]: temperature[b, t] divides the logits that score input_ids[b, t + 1]."""
    ours = _model(arch).float().eval()
    ref = copy.deepcopy(ours)
    ids, attn, resp = _batch()
    g = torch.Generator().manual_seed(5)
    temperature = 0.4 + torch.rand(ids.shape[0], ids.shape[1] - 1, generator=g)
    temperature[resp[:, 1:] == 0] = float("nan")  # unscored positions: any value
    g_lp, g_ent = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)
    lp, ent = sequence_token_stats(ours, ids, attn, resp, temperature=temperature, backend=backend)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    safe = torch.where(resp[:, 1:] > 0, temperature, 1.0)
    r_lp, r_ent = _reference(ref, ids, attn, resp, safe[..., None])
    ((r_lp * g_lp).sum() + (r_ent * g_ent).sum()).backward()
    assert rel_err(lp, r_lp) < 1e-5 and rel_err(ent, r_ent) < 1e-5
    g_ours, g_ref = _grads(ours), _grads(ref)
    for name in g_ref:
        assert rel_err(g_ours[name], g_ref[name]) < 1e-5, name


def test_lm_head_reads_bias_softcap_and_tied_weight():
    gemma = _model("gemma2-softcap")
    head = lm_head(gemma)
    assert head.softcap == 2.0 and head.bias is None
    assert head.weight is gemma.get_input_embeddings().weight  # tied: one tensor, both gradients
    phi = lm_head(_model("phi-bias"))
    assert phi.bias is not None and phi.bias.shape == (V,) and phi.softcap is None
    llama = _model("llama")
    assert (
        lm_head(llama).weight is llama.lm_head.weight
        and lm_head(llama).weight is not llama.model.embed_tokens.weight
    )


def test_last_hidden_states_are_what_the_head_sees():
    model = _model("gemma2-softcap").float().eval()
    ids, attn, _ = _batch()
    hidden = last_hidden_states(model, ids, attn)
    out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    head = lm_head(model)
    z = hidden @ head.weight.T
    z = head.softcap * torch.tanh(z / head.softcap)
    assert hidden.shape == (3, 11, 32)
    torch.testing.assert_close(z, out.logits, rtol=1e-5, atol=1e-5)


def test_no_logits_are_computed():
    """The lm-head module is never called: the fused op reads its weight only."""
    model = _model("llama").float()
    model.lm_head.register_forward_hook(
        lambda *a: (_ for _ in ()).throw(AssertionError("lm_head was called"))
    )
    ids, attn, resp = _batch()
    lp, _ = sequence_token_stats(model, ids, attn, resp)
    lp.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_and_masked_rows_are_zero(backend):
    model = _model("qwen2-tied").float().eval()
    ids, attn, resp = _batch(b=2, t=9)
    with torch.no_grad():
        lp, ent = sequence_token_stats(model, ids, attn, resp, backend=backend)
        r_lp, r_ent = _reference(model, ids, attn, resp, 1.0)
        none = sequence_token_stats(model, ids, attn, torch.zeros_like(resp), backend=backend)
    assert rel_err(lp, r_lp) < 1e-5 and rel_err(ent, r_ent) < 1e-5
    assert (none.logprobs == 0).all() and (none.entropy == 0).all()


def test_bf16_autocast_uses_autocast_dtype():
    model = _model("llama").float().eval()
    ids, attn, resp = _batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        lp, _ = sequence_token_stats(model, ids, attn, resp)
        r_lp, _ = _reference(model, ids, attn, resp, 1.0)  # bf16 logits under autocast
    assert lp.dtype == torch.float32
    valid = resp[:, 1:] > 0
    assert (lp[valid] - r_lp[valid]).abs().max() < 0.05  # bf16 matmul on both sides


def test_shift_convention():
    ids = torch.tensor([[5, 6, 7, 8]])
    resp = torch.tensor([[0, 0, 1, 1]])
    assert shifted_targets(ids, resp).tolist() == [[-100, 7, 8]]
    assert shifted_targets(ids, None).tolist() == [[6, 7, 8]]
    with pytest.raises(ValueError, match="aligned with input_ids"):
        shifted_targets(ids, resp[:, 1:])


def test_lm_head_token_stats_equals_sequence_token_stats():
    model = _model("gpt2").float().eval()
    ids, attn, resp = _batch()
    with torch.no_grad():
        head = lm_head(model)
        a = head.token_stats(last_hidden_states(model, ids, attn)[:, :-1], shifted_targets(ids, resp))
        b = sequence_token_stats(model, ids, attn, resp)
    assert isinstance(head, LMHead)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=0)


# --- clear errors, naming the model class -------------------------------------------------------------------


def test_error_without_output_embedding():
    base = transformers.LlamaModel(transformers.LlamaConfig(**SMALL))
    with pytest.raises(ValueError, match="LlamaModel has no output embedding"):
        lm_head(base)


class _FakeLoraLinear(nn.Module):
    """Shaped like peft.tuners.lora.Linear: base_layer plus lora_A / lora_B."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, 2, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(2, base.out_features, bias=False)})

    @property
    def weight(self):
        return self.base_layer.weight

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


def test_error_with_an_unknown_adapter_layer_on_lm_head():
    """A layer shaped like an adapter but not PEFT's LoRA Linear is refused, not scored as a plain head."""
    model = _model("llama")
    model.lm_head = _FakeLoraLinear(model.lm_head)
    with pytest.raises(
        NotImplementedError, match="lm-head of LlamaForCausalLM carries a PEFT _FakeLoraLinear"
    ):
        lm_head(model)


# --- PEFT LoRA on the lm-head, fused ------------------------------------------------------------------------

peft = pytest.importorskip("peft")


def _peft(arch, *, target=("lm_head",), seed=0, **config):
    """A PEFT LoRA model with random (non-zero) adapter factors, so that A and B both get gradients."""
    torch.manual_seed(seed)
    model = _model(arch).float()
    cfg = dict(r=4, lora_alpha=12, lora_dropout=0.0, target_modules=list(target))
    cfg.update(config)
    pm = peft.get_peft_model(model, peft.LoraConfig(**cfg))
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in pm.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    return pm


@pytest.mark.parametrize("arch", ["llama", "qwen2-tied", "gemma2-softcap", "phi-bias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_peft_lora_head_matches_the_peft_model(arch, backend):
    """LoRA on lm_head (and q_proj): values and the gradients of every adapter factor equal PEFT's own
    forward (materialised logits through peft's LoRA Linear)."""
    ours = _peft(arch, target=("lm_head", "q_proj")).eval()
    ref = copy.deepcopy(ours)
    head = lm_head(ours)
    assert head.lora is not None and head.lora.scale == 3.0 and head.lora.rank == 4
    assert not head.weight.requires_grad  # PEFT freezes the base: no d_weight is computed
    ids, attn, resp = _batch()
    g = torch.Generator().manual_seed(3)
    g_lp, g_ent = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)
    lp, ent = sequence_token_stats(ours, ids, attn, resp, temperature=0.8, backend=backend)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    r_lp, r_ent = _reference(ref, ids, attn, resp, 0.8)
    ((r_lp * g_lp).sum() + (r_ent * g_ent).sum()).backward()
    assert rel_err(lp, r_lp) < 1e-5 and rel_err(ent, r_ent) < 1e-5
    g_ours, g_ref = _grads(ours), _grads(ref)
    assert g_ours.keys() == g_ref.keys()
    assert sum("lm_head.lora_A" in n for n in g_ref) == 1 and sum("lm_head.lora_B" in n for n in g_ref) == 1
    for name in g_ref:
        assert g_ref[name].abs().sum() > 0, name
        assert rel_err(g_ours[name], g_ref[name]) < 1e-5, name


def test_peft_head_op_kwargs_are_what_every_caller_passes():
    pm = _peft("phi-bias")
    head = lm_head(pm)
    layer = pm.get_output_embeddings()
    kw = head.op_kwargs()
    assert kw["lora_a"] is layer.lora_A["default"].weight and kw["lora_b"] is layer.lora_B["default"].weight
    assert kw["lora_scale"] == layer.scaling["default"] and kw["bias"] is layer.base_layer.bias
    assert kw["softcap"] is None and head.weight is layer.base_layer.weight
    assert set(lm_head(_model("llama")).op_kwargs()) == set(kw)  # the same keys without an adapter
    assert lm_head(_model("llama")).op_kwargs()["lora_a"] is None


def test_peft_disabled_and_merged_adapters_give_the_plain_head():
    pm = _peft("llama").eval()
    ids, attn, resp = _batch()
    with pm.disable_adapter(), torch.no_grad():  # as TRL computes reference log-probs
        assert lm_head(pm).lora is None
        lp, _ = sequence_token_stats(pm, ids, attn, resp)
        r_lp, _ = _reference(pm, ids, attn, resp, 1.0)
    assert rel_err(lp, r_lp) < 1e-5
    with torch.no_grad():
        adapted, _ = sequence_token_stats(pm, ids, attn, resp)
        pm.merge_adapter()
        assert lm_head(pm).lora is None  # the update now lives in the weight
        merged, _ = sequence_token_stats(pm, ids, attn, resp)
        r_merged, _ = _reference(pm, ids, attn, resp, 1.0)
    assert rel_err(adapted, r_lp) > 1e-3  # the adapter changes the scores
    assert rel_err(merged, r_merged) < 1e-5 and rel_err(merged, adapted) < 1e-5


def test_peft_lora_dropout_in_training_is_refused_and_fine_in_eval():
    pm = _peft("llama", lora_dropout=0.1)
    ids, attn, resp = _batch()
    pm.train()
    with pytest.raises(ValueError, match=r"applies lora_dropout=0.1 in training mode.*lora_dropout=0"):
        sequence_token_stats(pm, ids, attn, resp)
    pm.eval()
    with torch.no_grad():
        lp, _ = sequence_token_stats(pm, ids, attn, resp)
        r_lp, _ = _reference(pm, ids, attn, resp, 1.0)
    assert rel_err(lp, r_lp) < 1e-5
    zero = _peft("llama", lora_dropout=0.0).train()  # p = 0: fine while training
    assert lm_head(zero).lora is not None


@pytest.mark.parametrize(
    "build, pattern",
    [
        (lambda: _peft("llama", use_dora=True), r"is a DoRA adapter, not plain LoRA"),
        (lambda: _peft("phi-bias", lora_bias=True), r"has lora_bias=True"),
        (
            lambda: peft.get_peft_model(
                _model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
            ),
            r"carries a PEFT ModulesToSaveWrapper.*not this PEFT layer type",
        ),
        (
            lambda: peft.get_peft_model(
                _model("llama"), peft.IA3Config(target_modules=["lm_head"], feedforward_modules=[])
            ),
            r"carries a PEFT Linear.*not this PEFT layer type",
        ),
    ],
    ids=["dora", "lora_bias", "modules_to_save", "ia3"],
)
def test_peft_configurations_the_op_cannot_express_are_refused(build, pattern):
    with pytest.raises(NotImplementedError, match=pattern):
        lm_head(build())


def test_peft_several_active_adapters_refused():
    pm = _peft("llama")
    pm.add_adapter("second", peft.LoraConfig(r=2, target_modules=["lm_head"]))
    pm.base_model.set_adapter(["default", "second"])
    with pytest.raises(NotImplementedError, match=r"2 active adapters \['default', 'second'\]"):
        lm_head(pm)
    pm.base_model.set_adapter("second")  # one active adapter: that one
    assert lm_head(pm).lora.rank == 2


def test_peft_fp32_adapter_under_bf16_autocast():
    """Under autocast the head and its adapter are cast to the autocast dtype, as PEFT's own lora_A / lora_B
    matmuls are; outside autocast an fp32 adapter stays fp32 (PEFT casts the input to it)."""
    from fused_rlvr import linear_logprobs

    pm = _peft("llama").eval()
    ids, attn, resp = _batch()
    head = lm_head(pm)
    assert head.cast(torch.zeros(2, 32, dtype=torch.bfloat16))[1].lora.a.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h16, head16 = head.cast(last_hidden_states(pm, ids, attn)[:, :-1])
        assert {t.dtype for t in (h16, head16.weight, head16.lora.a, head16.lora.b)} == {torch.bfloat16}
        lp, _ = sequence_token_stats(pm, ids, attn, resp)
        r_lp, _ = _reference(pm, ids, attn, resp, 1.0)
    with torch.no_grad():  # the op itself, on the bf16 copies, without autocast: the same numbers
        want = linear_logprobs(h16, head16.weight, shifted_targets(ids, resp), **head16.op_kwargs())
    assert torch.equal(lp, want.logprobs)
    valid = resp[:, 1:] > 0
    # against the model's own bf16 logits (another order of bf16 roundings): two bf16 ulps at |logit| <= 16
    assert (lp[valid] - r_lp[valid]).abs().max() < 2 * 2**-7 * 16


def test_error_with_non_linear_head():
    model = _model("llama")
    model.lm_head = nn.Sequential(nn.Linear(32, V))
    with pytest.raises(TypeError, match="lm-head of LlamaForCausalLM is a Sequential"):
        lm_head(model)


def test_error_with_logit_scale():
    cfg = transformers.CohereConfig(**SMALL, logit_scale=0.0625)
    with pytest.raises(
        NotImplementedError, match="CohereForCausalLM rescales its logits by config.logit_scale"
    ):
        lm_head(transformers.CohereForCausalLM(cfg))
