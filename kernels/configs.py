"""Every block size and launch setting of the Triton kernels, in one place.

Fixed defaults that were measured to be good on Hopper (H100/H200, bf16) and that stay small under the
Triton interpreter (CPU tests). Set ``FUSED_RLVR_AUTOTUNE=1`` to let the launchers pick among
``*_CANDIDATES`` by timing them on the first call of each (shape bucket, dtype) key; the token count is
bucketed to the next power of two so a new batch size does not retune.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class TileConfig:
    BLOCK_N: int
    BLOCK_V: int
    BLOCK_K: int
    num_warps: int = 8
    num_stages: int = 3
    GROUP_N: int = 8
    # forward: let the pipeliner flatten the vocab-tile and K loops into one. Off: on an H100 (triton 3.6)
    # it took the forward from 18.1 ms to 30.8 ms (bench/results/h100-run2).
    FLATTEN: bool = False

    def as_launch(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


# Forward: one program streams BLOCK_N rows over a range of the vocabulary.
# H100 (bench/results/h100-run1, N=8192 H=4096 V=151936 bf16): 128x256 tiles 18.2 ms, 128x128 21.0 ms.
FWD_GPU = TileConfig(BLOCK_N=128, BLOCK_V=256, BLOCK_K=64, num_warps=8, num_stages=3, GROUP_N=8)
# Backward logit-gradient tiles: a plain GEMM tile with a softmax-gradient epilogue.
# H100, same shape: fwd+bwd 73.8 ms with 128x256 tiles, 79.9 ms with 128x128 (run 1); num_stages=4: 78.1 vs
# 71.5 ms (run 2).
BWD_GPU = TileConfig(BLOCK_N=128, BLOCK_V=256, BLOCK_K=64, num_warps=8, num_stages=3, GROUP_N=8)
# Interpreter (CPU): small tiles so odd shapes exercise the masks, large enough to stay quick.
INTERPRET = TileConfig(BLOCK_N=16, BLOCK_V=32, BLOCK_K=16, num_warps=1, num_stages=1, GROUP_N=2)

FWD_CANDIDATES = (
    FWD_GPU,
    replace(FWD_GPU, num_stages=4),
    replace(FWD_GPU, BLOCK_N=256, BLOCK_V=128),
    replace(FWD_GPU, BLOCK_V=128),
)
BWD_CANDIDATES = (
    BWD_GPU,
    replace(BWD_GPU, num_stages=4),
    replace(BWD_GPU, BLOCK_N=256, BLOCK_V=128),
    replace(BWD_GPU, BLOCK_V=128),
)

# Width of one vocabulary chunk of logit gradients staged for the d_hidden / d_weight GEMMs in the
# backward; the staging buffer is [valid rows, chunk] in the input dtype. H100 run 2: 4096 gives fwd+bwd
# 68.6 ms vs 72.0 ms at 2048 (fewer read-modify-writes of the fp32 d_hidden accumulator) for 32 MiB more
# staging at N=8192; 2048 stays the default for memory, the variable trades it for speed.
# The chunk comes from a staging budget of BWD_STAGING_ELEMS elements (32 MiB in bf16): 2048 columns at
# N=8192, more at small N, where 75 chunks of tiny GEMMs made 1024 tokens slower than plain torch
# (h100-run3: 15.2 vs 8.7 ms). FUSED_RLVR_BWD_VOCAB_CHUNK fixes the width instead.
BWD_STAGING_ELEMS = 2048 * 8192
BWD_VOCAB_CHUNK_MIN = 2048
BWD_VOCAB_CHUNK_MAX = 16384
BWD_VOCAB_CHUNK = int(os.environ.get("FUSED_RLVR_BWD_VOCAB_CHUNK", "0"))  # 0: from the budget


def bwd_vocab_chunk(n_rows: int) -> int:
    """Vocabulary columns per backward chunk for n_rows valid rows (a multiple of 256)."""
    if BWD_VOCAB_CHUNK > 0:
        return BWD_VOCAB_CHUNK
    width = (BWD_STAGING_ELEMS // max(n_rows, 1)) // 256 * 256
    return max(BWD_VOCAB_CHUNK_MIN, min(BWD_VOCAB_CHUNK_MAX, width))


# Target number of programs for the forward's vocabulary split (fills the SMs when N is small).
FWD_TARGET_PROGRAMS = 1024
FWD_MAX_SPLITS = 64


def autotune_enabled() -> bool:
    return os.environ.get("FUSED_RLVR_AUTOTUNE", "0") == "1"


def bucket_tokens(n: int) -> int:
    """Next power of two at or above n (minimum 64), the autotune key's token dimension."""
    b = 64
    while b < n:
        b *= 2
    return b


# Numerics shared by the Triton kernels and the chunked torch path (-inf logits: masked vocabulary entries).
# The running max is floored here, so a row whose logits so far are all -inf keeps a finite max and
# exp(z - max) = 0 (never exp(-inf + inf)).
MAX_FLOOR = -3.4028234663852886e38  # -FLT_MAX
# log p is floored here where it multiplies p in the entropy gradient: p = exp(log p) is exactly 0 in fp32
# below about -103.3, so the floor changes no value and turns 0 * (-inf) into 0.
LOGP_FLOOR = -200.0
