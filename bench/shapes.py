"""Registry of real model shapes: benchmarks pick shapes from here, never hard-coded in a script body."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    vocab: int
    softcap: Optional[float] = None


MODELS = {
    "smollm2-135m": ModelShape("smollm2-135m", 576, 49152),
    "qwen2.5-0.5b": ModelShape("qwen2.5-0.5b", 896, 151936),
    "qwen2.5-7b": ModelShape("qwen2.5-7b", 3584, 152064),
    "qwen2.5-h4096": ModelShape("qwen2.5-h4096", 4096, 151936),
    "qwen2.5-14b": ModelShape("qwen2.5-14b", 5120, 152064),
    "llama3-8b": ModelShape("llama3-8b", 4096, 128256),
    "gemma2-9b": ModelShape("gemma2-9b", 3584, 256000, softcap=30.0),
}

# The shape every GPU target is stated at (H100/H200, bf16): 8192 tokens.
GPU_TARGET = ("qwen2.5-h4096", 8192)
CPU_MEMORY_TARGET = ("smollm2-135m", 4096)
# The CPU comparison: Qwen2.5's vocabulary (V=151936) at a hidden size a CPU can turn over.
CPU_TARGET = ("qwen2.5-0.5b", 1024)
# Scaling grids: tokens at a fixed model, and vocabularies of real models at a fixed token count.
GPU_TOKEN_GRID = (1024, 2048, 4096, 8192, 16384)
GPU_VOCAB_MODELS = ("smollm2-135m", "llama3-8b", "qwen2.5-h4096", "gemma2-9b")
CPU_TOKEN_GRID = (256, 512, 1024, 2048)
CPU_VOCAB_MODELS = ("smollm2-135m", "qwen2.5-0.5b")
