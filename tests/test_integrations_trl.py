"""FusedGRPOTrainer against TRL's own GRPOTrainer on a tiny randomly initialised Qwen2 (nothing downloaded).

Both trainers load the same saved weights. The loss tests call `compute_loss` of each on the same prepared
batch (TRL's own rollout: completions, advantages, old / reference log-probs), perturbed so that ratios clip on
both sides, sequences have different lengths and the KL term is not zero, and compare the loss and the gradient
of every parameter. The no-logits test runs our loss under a dispatch mode that fails on any tensor with a
vocabulary-sized dimension larger than the lm-head weight itself (TRL's own path trips it: positive control).
"""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

trl = pytest.importorskip("trl", reason="TRL is not installed: pip install 'fused-rlvr[trl]'")

from _helpers import rel_err  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import fused_rlvr as F  # noqa: E402
from fused_rlvr.integrations.trl import FusedGRPOTrainer, add_fused_lm_head  # noqa: E402

V = 300  # the chunked torch path below splits it into 64-column tiles; H = 16, so no other dim is 300
H = 16
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +=?"


def _tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in CHARS:
        vocab[c] = len(vocab)
    while len(vocab) < V:
        vocab[f"<x{len(vocab)}>"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _reward(completions, **kwargs):
    return [float(sum(ch in "aeiou" for ch in c)) + 0.1 * len(c) for c in completions]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny-qwen2"))
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=False,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


def _trainer(cls, model_dir, tmp_dir, **config):
    cfg = dict(
        output_dir=tmp_dir,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        beta=0.04,
        num_iterations=2,
        loss_type="dapo",
        seed=0,
        bf16=False,
        disable_tqdm=True,
    )
    cfg.update(config)
    ds = Dataset.from_dict({"prompt": ["1+2=", "3+4=", "ab?", "cd?"]})
    trainer = cls(
        model=model_dir,
        reward_funcs=_reward,
        args=GRPOConfig(**cfg),
        train_dataset=ds,
        processing_class=_tokenizer(),
    )
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
    return trainer


def _rollout(trainer):
    """TRL's own rollout (generation, rewards, advantages, old and reference log-probs) from a fixed seed."""
    torch.manual_seed(123)
    trainer.model.train()
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


@pytest.fixture(scope="module")
def pair(model_dir, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("out"))
    stock = _trainer(GRPOTrainer, model_dir, tmp)
    ours = _trainer(FusedGRPOTrainer, model_dir, tmp)
    return stock, ours, _rollout(stock), _rollout(ours)


def _perturbed(inputs, seed=0):
    """Different lengths, ratios off 1 on both sides of the clip range, random advantages, reference != policy."""
    g = torch.Generator().manual_seed(seed)
    x = copy.copy(inputs)
    b, c = x["completion_ids"].shape
    lengths = torch.randint(2, c + 1, (b,), generator=g)
    lengths[0] = c
    x["completion_mask"] = (torch.arange(c)[None, :] < lengths[:, None]).to(x["completion_mask"].dtype)
    x["num_items_in_batch"] = x["completion_mask"].sum()
    x["advantages"] = torch.randn(b, generator=g)
    x["old_per_token_logps"] = inputs["old_per_token_logps"] + 0.3 * torch.randn(b, c, generator=g)
    x["ref_per_token_logps"] = inputs["old_per_token_logps"] + 0.2 * torch.randn(b, c, generator=g)
    return x


def _loss_and_grads(trainer, inputs):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _compare(stock, ours, inputs, monkeypatch, *, expect_fused=True, bias_correction_kl=False, **attrs):
    for trainer in (stock, ours):
        for key, value in attrs.items():
            monkeypatch.setattr(trainer, key, value)
        monkeypatch.setattr(trainer.args, "use_bias_correction_kl", bias_correction_kl)
    fused, reason = ours.fused_loss_path(inputs)
    assert fused == expect_fused, reason
    ref_loss, ref_grads = _loss_and_grads(stock, inputs)
    loss, grads = _loss_and_grads(ours, inputs)
    assert ref_loss.abs() > 1e-4  # a real loss, not 0 = 0
    assert abs(loss.item() - ref_loss.item()) <= 2e-6 * abs(ref_loss.item()) + 1e-7, (loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(ours.model.parameters()))
    worst = max(rel_err(grads[k], ref_grads[k]) for k in ref_grads)
    assert worst < 1e-5, worst  # observed <= 6e-7 (fp32)
    return loss, ref_loss


def test_rollout_old_and_reference_logprobs_match_trl(pair):
    stock, ours, a, b = pair
    assert torch.equal(a["completion_ids"], b["completion_ids"])  # same seed, same weights, same samples
    torch.testing.assert_close(b["advantages"], a["advantages"])
    m = a["completion_mask"].bool()
    assert m.sum() > 20
    for key in ("old_per_token_logps", "ref_per_token_logps"):
        assert rel_err(b[key][m], a[key][m]) < 1e-6, key
        assert (b[key][~m] == 0).all()


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "bnpo"])
@pytest.mark.parametrize("beta, bias_correction_kl", [(0.0, False), (0.04, False), (0.04, True)])
def test_loss_and_grads_match_trl(pair, monkeypatch, loss_type, beta, bias_correction_kl):
    """linear_grpo_loss computes the loss, TRL's default bias-corrected KL (ratio * k3) included."""
    stock, ours, inputs, _ = pair
    eps_high = 0.28 if loss_type == "dapo" else 0.2
    _compare(
        stock,
        ours,
        _perturbed(inputs),
        monkeypatch,
        expect_fused=True,
        bias_correction_kl=bias_correction_kl,
        loss_type=loss_type,
        beta=beta,
        epsilon_high=eps_high,
        current_gradient_accumulation_steps=2,
    )


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_sequence_level_importance_sampling_matches_trl(pair, monkeypatch, loss_type):
    stock, ours, inputs, _ = pair
    x = _perturbed(inputs, seed=1)
    x["old_per_token_logps"] = inputs["old_per_token_logps"] + 0.05 * torch.randn_like(
        x["old_per_token_logps"]
    )
    _compare(
        stock,
        ours,
        x,
        monkeypatch,
        loss_type=loss_type,
        importance_sampling_level="sequence",
        epsilon_low=3e-3,
        epsilon_high=4e-3,
    )


def test_entropy_bonus_on_the_fused_path_matches_trl(pair, monkeypatch):
    stock, ours, inputs, _ = pair
    _compare(
        stock,
        ours,
        _perturbed(inputs, seed=2),
        monkeypatch,
        loss_type="dapo",
        entropy_coef=0.05,
        _entropy_bonus_enabled=True,
        current_gradient_accumulation_steps=2,
    )


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_entropy_mask_and_bonus_match_trl(pair, monkeypatch, loss_type):
    """top_entropy_quantile and entropy_coef run TRL's loss code on our fused log-probs and entropies."""
    stock, ours, inputs, _ = pair
    _compare(
        stock,
        ours,
        _perturbed(inputs, seed=3),
        monkeypatch,
        expect_fused=False,
        loss_type=loss_type,
        top_entropy_quantile=0.5,
        entropy_coef=0.05,
        _entropy_bonus_enabled=True,
    )


def test_vespo_uses_trl_code_on_fused_logprobs(pair, monkeypatch):
    stock, ours, inputs, _ = pair
    _compare(stock, ours, _perturbed(inputs, seed=4), monkeypatch, expect_fused=False, loss_type="vespo")
    assert "vespo" in ours.fused_loss_path(inputs)[1]


def test_one_training_step_matches_trl(model_dir, tmp_path):
    """A full GRPOTrainer.train() step (SGD), temperature 0.7, beta 0.04, grpo: same loss, metrics, update."""
    cfg = dict(
        temperature=0.7,
        loss_type="grpo",
        optim="sgd",
        learning_rate=1.0,
        num_iterations=1,
        use_bias_correction_kl=False,
    )
    runs = []
    for cls in (GRPOTrainer, FusedGRPOTrainer):
        trainer = _trainer(cls, model_dir, str(tmp_path), **cfg)
        if cls is FusedGRPOTrainer:
            assert trainer.fused_loss_path({}) == (True, "")
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        torch.manual_seed(7)
        trainer.train()
        step = {n: (p.detach() - before[n]) for n, p in trainer.model.named_parameters()}
        log = next(r for r in trainer.state.log_history if "loss" in r)
        runs.append((step, log))
    (ref_step, ref_log), (step, log) = runs
    assert log["loss"] == pytest.approx(ref_log["loss"], abs=1e-6)  # on-policy first step: ~0 by design
    for key in ("kl", "entropy", "clip_ratio/region_mean"):
        assert log[key] == pytest.approx(ref_log[key], rel=1e-4, abs=1e-7), key
    assert max(ref_step[k].abs().max().item() for k in ref_step) > 1e-6  # the step moved the weights
    assert max(rel_err(step[k], ref_step[k]) for k in ref_step) < 1e-4


class VocabGuard(TorchDispatchMode):
    """Fails on any op output with a vocabulary-sized dimension and more elements than the lm-head weight."""

    def __init__(self, vocab, limit):
        super().__init__()
        self.vocab, self.limit, self.largest = vocab, limit, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and self.vocab in t.shape:
                self.largest = max(self.largest, t.numel())
                if t.numel() > self.limit:
                    raise AssertionError(f"{func} made a {tuple(t.shape)} tensor: logits are materialised")
        return out


def _no_lm_head_call(module, args, output):
    raise AssertionError("lm_head module was called: logits computed")


def test_no_logits_are_materialised(pair, monkeypatch):
    stock, ours, inputs, _ = pair
    monkeypatch.setenv("FUSED_RLVR_TORCH_CHUNK_BYTES", "4096")  # 64-column vocab tiles on the chunked path
    x = _perturbed(inputs)
    limit = V * H  # the lm-head weight and its gradient are the largest legal [.., V] tensors
    input_ids = torch.cat([x["prompt_ids"], x["completion_ids"]], 1)
    attention_mask = torch.cat([x["prompt_mask"], x["completion_mask"]], 1)
    assert x["completion_mask"].sum() > H  # so logits of the scored tokens would exceed the limit

    hook = ours.model.lm_head.register_forward_hook(_no_lm_head_call)
    try:
        for kwargs in (
            dict(),
            dict(top_entropy_quantile=0.5, entropy_coef=0.05, _entropy_bonus_enabled=True),
        ):  # the fused loss and TRL's code on fused stats
            with monkeypatch.context() as m:
                for key, value in kwargs.items():
                    m.setattr(ours, key, value)
                with VocabGuard(V, limit) as guard:
                    ours.compute_loss(ours.model, x).backward()
                assert 0 < guard.largest <= limit
        with VocabGuard(V, limit), torch.no_grad():  # old / reference log-probs
            lp, ent, _ = ours._get_per_token_logps_and_entropies(
                ours.model, input_ids, attention_mask, x["completion_ids"].size(1), compute_entropy=True
            )
            ref_lp, _, _ = ours._get_per_token_logps_and_entropies(
                ours.ref_model, input_ids, attention_mask, x["completion_ids"].size(1)
            )
    finally:
        hook.remove()
    assert lp.shape == ent.shape == ref_lp.shape == x["completion_ids"].shape

    with pytest.raises(AssertionError, match="logits are materialised"), VocabGuard(V, limit):
        stock.compute_loss(stock.model, x)  # positive control: TRL's chunked head builds [tokens, V] logits


def test_add_fused_lm_head_refuses_unsupported_outputs(model_dir):
    model = Qwen2ForCausalLM.from_pretrained(model_dir)
    with pytest.raises(NotImplementedError, match="is_top1"):
        add_fused_lm_head(model, outputs=("log_probs", "is_top1"))


def test_add_fused_lm_head_contract(model_dir):
    """Same outputs as TRL's add_fused_lm_head; generation (the unpatched path) is unchanged."""
    from trl.trainer.utils import add_fused_lm_head as trl_add_fused_lm_head

    theirs = Qwen2ForCausalLM.from_pretrained(model_dir)
    mine = Qwen2ForCausalLM.from_pretrained(model_dir)
    trl_add_fused_lm_head(theirs, temperature=0.8, outputs=("log_probs", "entropy"))
    add_fused_lm_head(mine, temperature=0.8, outputs=("log_probs", "entropy"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    a = theirs(input_ids=ids, labels=labels, fused_lm_head=True)
    b = mine(input_ids=ids, labels=labels, fused_lm_head=True)
    for key in ("log_probs", "entropy", "loss"):
        assert rel_err(getattr(b, key), getattr(a, key)) < 1e-6, key
    assert torch.equal(a.label_mask, b.label_mask)
    torch.testing.assert_close(mine(input_ids=ids).logits, theirs(input_ids=ids).logits)


# ---------------------------------------------------------------------------------------------------------
# TRL's other loss types, delta, masks and vLLM importance sampling on the fused path: loss, gradient of
# every parameter and every metric TRL's loss logs, against TRL's own compute_loss.


def _compare_fused(stock, ours, inputs, monkeypatch, *, args=None, **attrs):
    """Like _compare, with `args` set on both configs, the fused path required, and the metrics appended by
    compute_loss (names and values) equal to TRL's."""
    for trainer in (stock, ours):
        for key, value in (args or {}).items():
            monkeypatch.setattr(trainer.args, key, value)
        for key, value in attrs.items():
            monkeypatch.setattr(trainer, key, value)
    before = [{k: len(v) for k, v in t._metrics["train"].items()} for t in (stock, ours)]
    fused, reason = ours.fused_loss_path(inputs)
    assert fused, reason
    ref_loss, ref_grads = _loss_and_grads(stock, inputs)
    loss, grads = _loss_and_grads(ours, inputs)
    assert ref_loss.abs() > 1e-4
    assert abs(loss.item() - ref_loss.item()) <= 2e-6 * abs(ref_loss.item()) + 1e-7, (loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(ours.model.parameters()))
    worst = max(rel_err(grads[k], ref_grads[k]) for k in ref_grads)
    assert worst < 1e-5, worst
    logged = []
    for trainer, lengths in zip((stock, ours), before):
        logged.append({k: v[lengths.get(k, 0) :] for k, v in trainer._metrics["train"].items()})
        logged[-1] = {k: v for k, v in logged[-1].items() if v}
    assert logged[1].keys() == logged[0].keys(), (sorted(logged[1]), sorted(logged[0]))
    for key in logged[0]:
        assert logged[1][key] == pytest.approx(logged[0][key], rel=1e-5, abs=1e-6), key
    return logged[0]


def _with_empty_sequence(x):
    x = dict(x)
    x["completion_mask"] = x["completion_mask"].clone()
    x["completion_mask"][3] = 0  # a completion with no scored token
    x["num_items_in_batch"] = x["completion_mask"].sum()
    return x


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "luspo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_cispo_sapo_luspo_match_trl(pair, monkeypatch, loss_type, level, beta):
    stock, ours, inputs, _ = pair
    x = _perturbed(inputs, seed=4)
    if level == "sequence":
        x["old_per_token_logps"] = inputs["old_per_token_logps"] + 0.1 * torch.randn_like(
            x["old_per_token_logps"]
        )
    logged = _compare_fused(
        stock,
        ours,
        x,
        monkeypatch,
        args=dict(use_bias_correction_kl=True, sapo_temperature_pos=1.5, sapo_temperature_neg=0.7),
        loss_type=loss_type,
        beta=beta,
        importance_sampling_level=level,
        epsilon_high=(1.05 if level == "token" else 1.01) if loss_type == "cispo" else 0.2,
        current_gradient_accumulation_steps=2,
    )
    if loss_type == "cispo":
        assert 0 < logged["cispo_clip_ratio"][0] < 1  # the cap binds on some tokens (sequences)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_bias_corrected_kl_delta_and_clip_metrics_match_trl(pair, monkeypatch, level, loss_type):
    """dapo / grpo + beta with TRL's bias-corrected KL and two-sided clipping delta; a completion without
    scored tokens; clip_ratio/low_min and high_max among the metrics."""
    stock, ours, inputs, _ = pair
    x = _with_empty_sequence(_perturbed(inputs, seed=5))
    noise = 0.6 if level == "token" else 0.1
    x["old_per_token_logps"] = inputs["old_per_token_logps"] + noise * torch.randn_like(
        x["old_per_token_logps"]
    )
    logged = _compare_fused(
        stock,
        ours,
        x,
        monkeypatch,
        args=dict(use_bias_correction_kl=True, delta=1.15),
        loss_type=loss_type,
        beta=0.04,
        importance_sampling_level=level,
        epsilon_high=0.28 if level == "token" else 0.04,
        epsilon_low=0.2 if level == "token" else 0.03,
        current_gradient_accumulation_steps=2,
    )
    assert {"kl", "clip_ratio/low_min", "clip_ratio/high_max"} <= logged.keys()
    assert logged["clip_ratio/region_mean"][0] > 0


def test_large_k3_matches_trl_without_clamps(pair, monkeypatch):
    """Reference log-probs far from the policy: k3 in the hundreds, where verl's clamp (our default) would
    change the loss; the trainer passes TRL's definition (no clamps)."""
    stock, ours, inputs, _ = pair
    x = _perturbed(inputs, seed=6)
    x["ref_per_token_logps"] = inputs["old_per_token_logps"] + 2.5 * torch.randn_like(
        x["old_per_token_logps"]
    )
    m = x["completion_mask"].bool()
    d = x["ref_per_token_logps"] - inputs["old_per_token_logps"]
    assert (torch.exp(d) - d - 1)[m].max() > 100
    _compare_fused(stock, ours, x, monkeypatch, args=dict(use_bias_correction_kl=True), beta=0.04)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_entropy_mask_matches_trl(pair, monkeypatch, loss_type, level):
    """top_entropy_quantile: TRL's mask from the entropies of the current batch, as pg_weights."""
    stock, ours, inputs, _ = pair
    _compare_fused(
        stock,
        ours,
        _perturbed(inputs, seed=7),
        monkeypatch,
        loss_type=loss_type,
        importance_sampling_level=level,
        top_entropy_quantile=0.4,
        epsilon_high=1.1 if loss_type == "cispo" else 0.2,
    )


@pytest.mark.parametrize("with_sampling_logps", [False, True])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_off_policy_mask_matches_trl(pair, monkeypatch, with_sampling_logps, level):
    """off_policy_mask_threshold: negative-advantage sequences whose mean KL to the sampling policy exceeds the
    threshold are dropped (from the current log-probs, as TRL computes it)."""
    stock, ours, inputs, _ = pair
    x = _perturbed(inputs, seed=8)
    g = torch.Generator().manual_seed(9)
    if with_sampling_logps:
        x["sampling_per_token_logps"] = inputs["old_per_token_logps"] + 0.5 * torch.rand(
            x["advantages"].shape[0], 1, generator=g
        )
    else:
        x["old_per_token_logps"] = inputs["old_per_token_logps"] + 0.5 * torch.rand(
            x["advantages"].shape[0], 1, generator=g
        )
    _compare_fused(
        stock, ours, x, monkeypatch, importance_sampling_level=level, off_policy_mask_threshold=0.25
    )
    # the mask does drop sequences here
    from trl import GRPOTrainer as _T  # noqa: N814

    sampling = x.get("sampling_per_token_logps", x["old_per_token_logps"])
    keep = _T.get_off_policy_mask(
        x["advantages"][:, None], inputs["old_per_token_logps"], sampling, x["completion_mask"], 0.25
    )
    assert 0 < keep.sum() < len(keep)


def _vllm_inputs(trainer, mode, clip_min, clip_max):
    """TRL's own rollout with vLLM's importance-sampling correction on: the rollout engine's log-probs are
    made up (the trainer's old log-probs of the same completions plus noise, one of them NaN, as vLLM reports
    a token it cannot score), and TRL computes importance_sampling_ratio from them with its own code."""
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    torch.manual_seed(123)
    plain = trainer._generate_and_score_completions(batch)  # the same completions and their old log-probs
    original = trainer._generate
    g = torch.Generator().manual_seed(11)

    def generate_with_logprobs(prompts):
        trainer.use_vllm = False  # generate with transformers; TRL's vLLM-only steps come after
        try:
            out = list(original(prompts))
        finally:
            trainer.use_vllm = True
        logps = []
        for i, ids in enumerate(out[1]):
            row = (
                plain["old_per_token_logps"][i, : len(ids)] + 0.4 * torch.randn(len(ids), generator=g)
            ).tolist()
            if i == 1:
                row[0] = None
            logps.append(row)
        out[4] = logps
        return tuple(out)

    saved = {k: getattr(trainer, k) for k in _VLLM_ATTRS}
    try:
        trainer._generate = generate_with_logprobs
        trainer.use_vllm = True
        trainer.vllm_importance_sampling_correction = True
        trainer.vllm_importance_sampling_mode = mode
        trainer.vllm_importance_sampling_clip_min = clip_min
        trainer.vllm_importance_sampling_clip_max = clip_max
        torch.manual_seed(123)
        x = trainer._generate_and_score_completions(batch)
    finally:
        del trainer._generate
        for k, v in saved.items():
            setattr(trainer, k, v)
    assert torch.equal(x["completion_ids"], plain["completion_ids"])
    return x


_VLLM_ATTRS = (
    "use_vllm",
    "vllm_importance_sampling_correction",
    "vllm_importance_sampling_mode",
    "vllm_importance_sampling_clip_min",
    "vllm_importance_sampling_clip_max",
)


@pytest.mark.parametrize(
    "mode, clip_min, clip_max",
    [
        ("token_truncate", None, 1.2),
        ("token_mask", 0.7, 1.4),
        ("sequence_truncate", 0.6, 2.0),
        ("sequence_mask", 0.3, 3.0),
    ],
)
def test_vllm_importance_sampling_matches_trl(pair, monkeypatch, mode, clip_min, clip_max):
    """rollout_correction reproduces the ratio TRL stored at rollout time; the fused loss weighted by it (the
    trainer passes TRL's stored ratio as pg_weights) equals TRL's loss."""
    stock, ours, _, _ = pair
    x = _vllm_inputs(stock, mode, clip_min, clip_max)
    mask = x["completion_mask"]
    assert torch.isnan(x["sampling_per_token_logps"][1, 0])
    weights = F.rollout_correction(
        x["old_per_token_logps"],
        x["sampling_per_token_logps"],
        mask,
        mode=mode,
        clip_min=clip_min,
        clip_max=clip_max,
    )
    stored = x["importance_sampling_ratio"]
    assert weights.shape == stored.shape
    if mode.startswith("token"):
        weights, stored = weights[mask.bool()], stored[mask.bool()]  # TRL leaves exp(0) where masked
    torch.testing.assert_close(weights, stored, rtol=1e-6, atol=0)
    assert (stored != 1).any() and (stored > 0).any()
    if mode.endswith("mask"):
        assert (stored == 0).any()  # something is masked
    y = dict(x)
    y["advantages"] = torch.randn(x["advantages"].shape, generator=torch.Generator().manual_seed(3))
    _compare_fused(
        stock,
        ours,
        y,
        monkeypatch,
        use_vllm=True,
        vllm_importance_sampling_correction=True,
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=clip_min,
        vllm_importance_sampling_clip_max=clip_max,
    )


def test_everything_at_once_matches_trl(pair, monkeypatch):
    """Sequence level, bias-corrected KL, delta, entropy mask, off-policy mask and token-level vLLM IS together."""
    stock, ours, _, _ = pair
    x = _vllm_inputs(stock, "token_mask", 0.6, 1.6)
    x = _with_empty_sequence(
        dict(x, advantages=torch.randn(x["advantages"].shape, generator=torch.Generator().manual_seed(4)))
    )
    x["ref_per_token_logps"] = x["old_per_token_logps"] + 0.3 * torch.randn_like(x["old_per_token_logps"])
    _compare_fused(
        stock,
        ours,
        x,
        monkeypatch,
        args=dict(use_bias_correction_kl=True, delta=1.3),
        loss_type="grpo",
        beta=0.04,
        importance_sampling_level="sequence",
        top_entropy_quantile=0.6,
        off_policy_mask_threshold=0.05,
        use_vllm=True,
        vllm_importance_sampling_correction=True,
        vllm_importance_sampling_mode="token_mask",
        vllm_importance_sampling_clip_min=0.6,
        vllm_importance_sampling_clip_max=1.6,
        current_gradient_accumulation_steps=2,
    )


@pytest.mark.parametrize(
    "attrs",
    [
        dict(loss_type="cispo", epsilon_high=1.1),
        dict(loss_type="sapo", beta=0.04),
        dict(top_entropy_quantile=0.5, off_policy_mask_threshold=0.1, importance_sampling_level="sequence"),
    ],
    ids=["cispo", "sapo-kl", "masks-sequence"],
)
def test_no_logits_on_the_new_fused_paths(pair, monkeypatch, attrs):
    stock, ours, inputs, _ = pair
    monkeypatch.setenv("FUSED_RLVR_TORCH_CHUNK_BYTES", "4096")
    monkeypatch.setattr(ours.args, "use_bias_correction_kl", True)
    for key, value in attrs.items():
        monkeypatch.setattr(ours, key, value)
    x = _perturbed(inputs)
    assert ours.fused_loss_path(x) == (True, "")
    hook = ours.model.lm_head.register_forward_hook(_no_lm_head_call)
    try:
        with VocabGuard(V, V * H) as guard:
            ours.compute_loss(ours.model, x).backward()
    finally:
        hook.remove()
    assert 0 < guard.largest <= V * H


@pytest.fixture(scope="module")
def moe_pair(tmp_path_factory):
    """A tiny randomly initialised Mixtral (4 experts, 2 per token): TRL adds its load-balancing loss."""
    from transformers import MixtralConfig, MixtralForCausalLM

    folder = str(tmp_path_factory.mktemp("tiny-mixtral"))
    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.05,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=False,
    )
    MixtralForCausalLM(cfg).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    tmp = str(tmp_path_factory.mktemp("out-moe"))
    stock = _trainer(GRPOTrainer, folder, tmp)
    ours = _trainer(FusedGRPOTrainer, folder, tmp)
    ours.model.train()  # as _rollout leaves the stock model
    return stock, ours, _rollout(stock)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_moe_aux_loss_matches_trl(moe_pair, monkeypatch, loss_type):
    stock, ours, inputs = moe_pair
    assert ours.aux_loss_enabled and ours.router_aux_loss_coef == 0.05
    logged = _compare_fused(
        stock,
        ours,
        _perturbed(inputs),
        monkeypatch,
        loss_type=loss_type,
        current_gradient_accumulation_steps=2,
    )
    assert logged["aux_loss"][0] > 0


def test_add_fused_lm_head_per_token_temperature(model_dir):
    """temperature= per call, a tensor aligned with labels[:, 1:]: the model's logits divided row by row."""
    model = Qwen2ForCausalLM.from_pretrained(model_dir)
    add_fused_lm_head(model, temperature=0.8, outputs=("log_probs", "entropy"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 40, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    temp = 0.5 + torch.rand(3, 11, generator=g)
    out = model(input_ids=ids, labels=labels, fused_lm_head=True, temperature=temp)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].double() / temp.double()[..., None]
    logp = logits.log_softmax(-1)
    mask = labels[:, 1:] != -100
    want_lp = torch.where(mask, logp.gather(-1, ids[:, 1:, None])[..., 0], 0.0)
    want_ent = torch.where(mask, -(logp.exp() * logp).sum(-1), 0.0)
    assert rel_err(out.log_probs, want_lp) < 1e-5 and rel_err(out.entropy, want_ent) < 1e-5
    default = model(input_ids=ids, labels=labels, fused_lm_head=True)  # the patch-time float otherwise
    scalar = model(input_ids=ids, labels=labels, fused_lm_head=True, temperature=torch.full((3, 11), 0.8))
    assert rel_err(default.log_probs, scalar.log_probs) < 1e-6


# --- a PEFT LoRA adapter on lm_head: trained through the fused op (TRL's own trainer refuses it) ----------


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["lm_head", "q_proj"])


def _random_adapters(trainer):
    """The same non-zero adapter factors in both trainers (PEFT starts B at 0, where dA vanishes)."""
    for name, p in trainer.model.named_parameters():
        if "lora_" in name:
            g = torch.Generator().manual_seed(sum(map(ord, name)))
            p.data = torch.randn(p.shape, generator=g) * 0.3


def _materialised_fused_head(model, temperature):
    """TRL's fused-head contract computed from the model's own logits (its lm_head module: PEFT's LoRA Linear),
    materialised: the reference for TRL's loss code, whose own fused head reads lm_head.weight only."""
    from trl.trainer.utils import FusedCausalLMOutput

    previous = model.forward

    def forward(
        self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kw
    ):
        if not fused_lm_head:
            return previous(*args, labels=labels, **kw)
        kw["use_cache"] = False
        logits = type(self).forward(self, *args, **kw).logits[:, :-1].float() / temperature
        targets = labels[:, 1:]
        mask = targets != -100
        logp = logits.log_softmax(-1)
        lp = torch.where(mask, logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0], 0.0)
        ent = torch.where(mask, -(logp.exp() * logp).sum(-1), 0.0)
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-lp.sum() / denom, log_probs=lp, entropy=ent, label_mask=mask)

    import types

    model.forward = types.MethodType(forward, model)


def _lora_trainer(cls, model_dir, tmp_dir):
    """`_trainer`'s configuration, with the adapter (a trainer argument, not a GRPOConfig field)."""
    cfg = dict(
        output_dir=tmp_dir,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        beta=0.04,
        num_iterations=2,
        loss_type="dapo",
        seed=0,
        bf16=False,
        disable_tqdm=True,
    )
    trainer = cls(
        model=model_dir,
        reward_funcs=_reward,
        args=GRPOConfig(**cfg),
        train_dataset=Dataset.from_dict({"prompt": ["1+2=", "3+4=", "ab?", "cd?"]}),
        processing_class=_tokenizer(),
        peft_config=_lora_config(),
    )
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    return trainer


@pytest.fixture(scope="module")
def lora_pair(model_dir, tmp_path_factory):
    import trl.trainer.grpo_trainer as grpo_module

    tmp = str(tmp_path_factory.mktemp("out-lora"))
    refusal = grpo_module.BaseTunerLayer
    grpo_module.BaseTunerLayer = type("NotAnAdapter", (), {})  # TRL refuses an adapter on lm_head
    try:
        stock = _lora_trainer(GRPOTrainer, model_dir, tmp)
    finally:
        grpo_module.BaseTunerLayer = refusal
    _materialised_fused_head(stock.model.get_base_model(), stock.temperature)
    ours = _lora_trainer(FusedGRPOTrainer, model_dir, tmp)  # no refusal, no patching
    for trainer in (stock, ours):
        _random_adapters(trainer)
    return stock, ours, _rollout(stock)


@pytest.mark.parametrize("loss_type, beta", [("dapo", 0.04), ("grpo", 0.0), ("bnpo", 0.04)])
def test_peft_lora_lm_head_matches_trl(lora_pair, monkeypatch, loss_type, beta):
    """Loss and the gradients of every adapter factor (lm_head's A and B included) equal TRL's compute_loss
    on the PEFT model's own head; the fused loss path runs (no fallback)."""
    stock, ours, inputs = lora_pair
    x = _perturbed(inputs, seed=5)
    for trainer in (stock, ours):
        for key, value in dict(loss_type=loss_type, beta=beta, current_gradient_accumulation_steps=2).items():
            monkeypatch.setattr(trainer, key, value)
        monkeypatch.setattr(trainer.args, "use_bias_correction_kl", False)
    assert ours.fused_loss_path(x) == (True, "")
    ref_loss, ref_grads = _loss_and_grads(stock, x)
    loss, grads = _loss_and_grads(ours, x)
    assert ref_loss.abs() > 1e-4
    assert abs(loss.item() - ref_loss.item()) <= 2e-6 * abs(ref_loss.item()) + 1e-7, (loss, ref_loss)
    trainable = {n for n, p in ours.model.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys() == trainable
    assert {n for n in trainable if "lm_head.lora_A" in n or "lm_head.lora_B" in n} and len(trainable) == 4
    for name in ref_grads:
        assert ref_grads[name].abs().sum() > 0, name
        assert rel_err(grads[name], ref_grads[name]) < 1e-5, name


def test_peft_lora_lm_head_no_logits(lora_pair, monkeypatch):
    """With the adapter on the head, no [tokens, V] logits and no merged [V, H] weight exist (frozen base)."""
    _, ours, inputs = lora_pair
    monkeypatch.setenv("FUSED_RLVR_TORCH_CHUNK_BYTES", "4096")
    x = _perturbed(inputs)
    head = ours.model.get_base_model().lm_head
    hook = head.register_forward_hook(_no_lm_head_call)
    try:
        with VocabGuard(V, V * H - 1) as guard:  # strictly smaller than the weight: no merged W + s B A
            ours.compute_loss(ours.model, x).backward()
    finally:
        hook.remove()
    assert 0 < guard.largest < V * H
    assert head.lora_B["default"].weight.grad.abs().sum() > 0
