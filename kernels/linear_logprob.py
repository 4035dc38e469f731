"""Streaming log-prob / entropy of an lm-head, forward statistics and logit gradients, in Triton.

Math (per row n; all statistics in fp32). With u = h W^T + b, the logits are
    z = softcap(u) / T,  softcap(u) = s * tanh(u / s)  (identity without softcap),
T a scalar or, behind PER_ROW_TEMP, one value per row (its inverse loaded once per row tile); behind
HAS_LORA, u also holds a LoRA adapter's rank-r term hA B^T, hA = scale h A^T precomputed per row ([N, r] fp32),
added to each [BLOCK_N, BLOCK_V] tile by one extra dot (no merged W + scale B A).
    lse = logsumexp(z),  p = softmax(z),  lp = z_y - lse,  H = -sum p log p.

Forward (`forward`): one pass over vocabulary tiles with an online softmax, relative to the running max m:
    S = sum exp(z - m),  Sd = sum exp(z - m) (z - m)        -> lse = m + log S, H = log S - Sd / S
and, behind MOMENTS, S2 = sum exp(2(z - m)), S2d = sum exp(2(z - m))(z - m)
    -> sum p^2 = S2 / S^2,  sum p^2 log p = (S2d - S2 log S) / S^2.
Keeping Sd relative to m (never sum p z) avoids cancellation when logits are ~1e4. Logits of -inf (masked
vocabulary entries) are allowed: they add 0 to every sum (0 log 0 = 0) and the max is floored at -FLT_MAX. The vocabulary is split
across programs (grid = row tiles x splits); the caller merges the splits (fused_rlvr._partials).
Flops: 2 N H V (one GEMM). Bytes: N H + V H inputs (+ L2 re-reads of the row tile per vocab tile),
6 x splits x N fp32 partials. Memory bound: O(N x splits), never N x V.

Backward (`dlogits`): recomputes the logit tiles of one vocabulary chunk [v_start, v_start + chunk) and writes
    dz_v = g_lp (1[v = y] - p_v) - g_H p_v (log p_v + H)      (z_v - sum p z = log p_v + H)
chained through 1/T and the softcap (d tanh = 1 - tanh^2) into du, stored in the input dtype to a
[N, chunk] staging buffer. The caller turns each chunk into d_hidden (fp32 accumulation over chunks),
d_weight[chunk] and d_bias[chunk] with GEMMs, so extra memory is N x chunk, never N x V.
Flops per chunk: 2 N H chunk. Bytes: the same inputs + N x chunk outputs.

Under the Triton interpreter (CPU) `tl.dot` on bf16/fp16 operands is wrong with triton 3.9, so DOT_FP32
upcasts the operands there; on GPUs the dots stay in the input dtype (fp32 inputs use IEEE fp32 dots, not
tf32). Rows and columns past the edges are clamped for loads (no masks in the inner loop) and masked to -inf
or dropped in the epilogue; row/column offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_rlvr.kernels import configs
from fused_rlvr.kernels.configs import TileConfig

MAX_FLOOR = tl.constexpr(configs.MAX_FLOOR)
LOGP_FLOOR = tl.constexpr(configs.LOGP_FLOOR)


@triton.jit
def _grouped_tile(pid, num_pid_n, num_pid_v, GROUP_N: tl.constexpr):
    # Consecutive programs share vocab tiles (the weight) and cycle over GROUP_N row tiles, so both
    # operands of the programs in flight stay in L2.
    pids_in_group = GROUP_N * num_pid_v
    group_id = pid // pids_in_group
    first_n = group_id * GROUP_N
    group_size = tl.minimum(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % pids_in_group) % group_size
    pid_v = (pid % pids_in_group) // group_size
    return pid_n, pid_v


@triton.jit
def _logit_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    offs_n,
    offs_v,
    N,
    V,
    H,
    stride_hn,
    stride_hk,
    stride_wv,
    stride_wk,
    inv_temp,
    inv_temp_ptr,
    softcap,
    ha_ptr,
    lb_ptr,
    R,
    stride_lbv,
    stride_lbr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    PER_ROW_TEMP: tl.constexpr,
    HAS_LORA: tl.constexpr,
    R_PAD: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """z = softcap(h W^T + hA B^T + b) / T for a [BLOCK_N, BLOCK_V] tile, fp32; also tanh(u / s) for the
    chain rule and 1 / T (the scalar, or behind PER_ROW_TEMP each row's value as a [BLOCK_N, 1] column).

    Behind HAS_LORA, hA = scale h A^T is the rows' precomputed fp32 [N, R] projection and B the [V, R] LoRA
    factor: one rank-R dot per tile (R padded to R_PAD >= 16 with zeros), fp32 operands (tf32 on GPUs for
    16-bit inputs, IEEE for fp32 ones)."""
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    cols = tl.minimum(offs_v, V - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows[:, None] * stride_hn + offs_k[None, :] * stride_hk
    b_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + offs_k)[None, :] < H, other=0.0)
            b = tl.load(b_ptrs, mask=(k0 + offs_k)[:, None] < H, other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if DOT_IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_hk
        b_ptrs += BLOCK_K * stride_wk
    if HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        ha = tl.load(ha_ptr + rows[:, None] * R + offs_r[None, :], mask=offs_r[None, :] < R, other=0.0)
        lb = tl.load(
            lb_ptr + offs_r[:, None] * stride_lbr + cols[None, :] * stride_lbv,
            mask=offs_r[:, None] < R,
            other=0.0,
        ).to(tl.float32)
        if DOT_IEEE:
            acc = tl.dot(ha, lb, acc, input_precision="ieee")
        else:
            acc = tl.dot(ha, lb, acc, input_precision="tf32")
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
    t = acc
    if HAS_SOFTCAP:
        x = acc / softcap
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(x < 0, -t, t)
        acc = softcap * t
    if PER_ROW_TEMP:
        inv_t = tl.load(inv_temp_ptr + rows)[:, None]
        return acc * inv_t, t, inv_t
    return acc * inv_temp, t, inv_temp


@triton.jit
def _fwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    part_ptr,
    N,
    V,
    H,
    NUM_SPLITS,
    TILES_PER_SPLIT,
    PLANE,
    stride_hn,
    stride_hk,
    stride_wv,
    stride_wk,
    inv_temp,
    inv_temp_ptr,
    softcap,
    ha_ptr,
    lb_ptr,
    R,
    stride_lbv,
    stride_lbr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    PER_ROW_TEMP: tl.constexpr,
    HAS_LORA: tl.constexpr,
    R_PAD: tl.constexpr,
    MOMENTS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    pid_n, pid_s = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), NUM_SPLITS, GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    y = tl.load(y_ptr + offs_n, mask=mask_n, other=-1)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)  # never 0: all-negative rows stay right
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sd = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s2d = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_first = pid_s * TILES_PER_SPLIT * BLOCK_V
    v_last = tl.minimum(v_first + TILES_PER_SPLIT * BLOCK_V, V)
    for v0 in tl.range(v_first, v_last, BLOCK_V, flatten=FLATTEN):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z, _t, _inv = _logit_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            offs_n,
            offs_v,
            N,
            V,
            H,
            stride_hn,
            stride_hk,
            stride_wv,
            stride_wk,
            inv_temp,
            inv_temp_ptr,
            softcap,
            ha_ptr,
            lb_ptr,
            R,
            stride_lbv,
            stride_lbr,
            HAS_BIAS,
            HAS_SOFTCAP,
            PER_ROW_TEMP,
            HAS_LORA,
            R_PAD,
            DOT_FP32,
            DOT_IEEE,
            EVEN_K,
            BLOCK_N,
            BLOCK_V,
            BLOCK_K,
        )
        z = tl.where(mask_v[None, :], z, float("-inf"))  # vocab tail: -inf, never 0
        zy += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), axis=1)
        # the max stays finite (floored at -FLT_MAX, configs.MAX_FLOOR) when every logit of a row so far is
        # -inf (masked vocabulary entries, a -inf bias): exp(z - m) is then 0, never exp(-inf + inf)
        m_new = tl.maximum(tl.maximum(m, tl.max(z, axis=1)), MAX_FLOOR)
        alpha = tl.exp(m - m_new)
        shift = tl.where(s > 0, m - m_new, 0.0)  # rescale Sd from the old max to the new one
        d = tl.where(z > float("-inf"), z - m_new[:, None], 0.0)  # 0 log 0 = 0 at -inf logits
        e = tl.exp(z - m_new[:, None])
        sd = alpha * (sd + shift * s) + tl.sum(e * d, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        if MOMENTS:
            e2 = e * e
            s2d = alpha * alpha * (s2d + shift * s2) + tl.sum(e2 * d, axis=1)
            s2 = alpha * alpha * s2 + tl.sum(e2, axis=1)
        m = m_new

    out = part_ptr + pid_s.to(tl.int64) * N + offs_n
    tl.store(out, m, mask=mask_n)
    tl.store(out + PLANE, s, mask=mask_n)
    tl.store(out + 2 * PLANE, sd, mask=mask_n)
    tl.store(out + 3 * PLANE, zy, mask=mask_n)
    if MOMENTS:
        tl.store(out + 4 * PLANE, s2, mask=mask_n)
        tl.store(out + 5 * PLANE, s2d, mask=mask_n)


@triton.jit
def _dlogits_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    lse_ptr,
    ent_ptr,
    glp_ptr,
    gent_ptr,
    dz_ptr,
    N,
    V,
    H,
    v_start,
    V_CHUNK,
    stride_hn,
    stride_hk,
    stride_wv,
    stride_wk,
    stride_dzn,
    stride_dzv,
    inv_temp,
    inv_temp_ptr,
    softcap,
    ha_ptr,
    lb_ptr,
    R,
    stride_lbv,
    stride_lbr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    PER_ROW_TEMP: tl.constexpr,
    HAS_LORA: tl.constexpr,
    R_PAD: tl.constexpr,
    HAS_GLP: tl.constexpr,
    HAS_GENT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    pid_n, pid_v = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V_CHUNK, BLOCK_V), GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    local_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_v = v_start + local_v
    mask_n = offs_n < N
    mask_v = (offs_v < V) & (local_v < V_CHUNK)
    z, t, inv_t = _logit_tile(
        h_ptr,
        w_ptr,
        b_ptr,
        offs_n,
        offs_v,
        N,
        V,
        H,
        stride_hn,
        stride_hk,
        stride_wv,
        stride_wk,
        inv_temp,
        inv_temp_ptr,
        softcap,
        ha_ptr,
        lb_ptr,
        R,
        stride_lbv,
        stride_lbr,
        HAS_BIAS,
        HAS_SOFTCAP,
        PER_ROW_TEMP,
        HAS_LORA,
        R_PAD,
        DOT_FP32,
        DOT_IEEE,
        EVEN_K,
        BLOCK_N,
        BLOCK_V,
        BLOCK_K,
    )
    rows = tl.minimum(offs_n, N - 1)
    logp = z - tl.load(lse_ptr + rows)[:, None]
    p = tl.exp(logp)
    dz = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if HAS_GLP:
        g = tl.load(glp_ptr + rows)
        y = tl.load(y_ptr + rows)
        dz = tl.where(offs_v[None, :] == y[:, None], g[:, None], 0.0) - p * g[:, None]
    if HAS_GENT:
        c = tl.load(gent_ptr + rows)
        ent = tl.load(ent_ptr + rows)
        # log p floored (configs.LOGP_FLOOR; p is already 0 there): 0, not 0 * inf, at -inf logits
        dz -= c[:, None] * p * (tl.maximum(logp, LOGP_FLOOR) + ent[:, None])
    du = dz * inv_t
    if HAS_SOFTCAP:
        du = du * (1.0 - t * t)
    out = dz_ptr + offs_n.to(tl.int64)[:, None] * stride_dzn + local_v.to(tl.int64)[None, :] * stride_dzv
    tl.store(out, du.to(dz_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """The 1-D per-row / per-column vectors are read at unit stride: a strided or expanded view is copied
    (a few bytes per row); hidden and weight are read through their strides."""
    return None if t is None else t.contiguous()


def _temperature_args(inv_temperature, hidden: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(scalar 1/T, pointer to per-row 1/T): a float gives a dummy pointer, a [N] tensor a scalar 1.0."""
    if isinstance(inv_temperature, torch.Tensor):
        return 1.0, inv_temperature.to(torch.float32).contiguous()
    return float(inv_temperature), hidden


def _lora_args(lora_ha, lora_b, hidden: torch.Tensor) -> tuple:
    """(hA pointer, B pointer, R, B's strides): dummies (never read) without an adapter."""
    if lora_ha is None:
        return hidden, hidden, 1, 0, 0
    return lora_ha.contiguous(), lora_b, lora_b.shape[1], lora_b.stride(0), lora_b.stride(1)


def _lora_pad(lora_ha) -> int:
    """R_PAD: the rank padded to a power of two >= 16 (the smallest dot width)."""
    if lora_ha is None:
        return 16
    return max(16, triton.next_power_of_2(lora_ha.shape[1]))


def _flags(
    hidden: torch.Tensor, bias, softcap, inv_temperature, lora_ha, cfg: TileConfig, interpret: bool
) -> dict:
    return dict(
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        PER_ROW_TEMP=isinstance(inv_temperature, torch.Tensor),
        HAS_LORA=lora_ha is not None,
        R_PAD=_lora_pad(lora_ha),
        DOT_FP32=interpret and hidden.dtype != torch.float32,
        DOT_IEEE=(not interpret) and hidden.dtype == torch.float32,
        EVEN_K=hidden.shape[1] % cfg.BLOCK_K == 0,
        BLOCK_N=cfg.BLOCK_N,
        BLOCK_V=cfg.BLOCK_V,
        BLOCK_K=cfg.BLOCK_K,
        GROUP_N=cfg.GROUP_N,
    )


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    inv_temperature: float | torch.Tensor,
    softcap: float | None,
    moments: bool,
    interpret: bool,
    lora_ha: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Online-softmax partials [stats, splits, N] (m, S, Sd, z_y[, S2, S2d]) of rows with targets in [0, V).

    inv_temperature: 1 / T, a float or a per-row [N] tensor (one value per row of hidden).
    lora_ha, lora_b: a LoRA adapter on the head, as hA = scale h A^T (fp32 [N, r]) and B [V, r], or None.
    `fused_rlvr._partials.reduce_partials` merges the splits and `finalize` turns them into lp/entropy/lse.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    targets, bias = _dense(targets), _dense(bias)
    inv_scalar, inv_ptr = _temperature_args(inv_temperature, hidden)
    ha_ptr, lb_ptr, rank, stride_lbv, stride_lbr = _lora_args(lora_ha, lora_b, hidden)

    def launch(cfg: TileConfig) -> torch.Tensor:
        n_tiles = triton.cdiv(N, cfg.BLOCK_N)
        v_tiles = triton.cdiv(V, cfg.BLOCK_V)
        splits = max(
            1, min(triton.cdiv(configs.FWD_TARGET_PROGRAMS, n_tiles), v_tiles, configs.FWD_MAX_SPLITS)
        )
        tiles_per_split = triton.cdiv(v_tiles, splits)
        splits = triton.cdiv(v_tiles, tiles_per_split)  # no split without a real column
        part = torch.empty((6 if moments else 4, splits, N), device=hidden.device, dtype=torch.float32)
        _fwd_kernel[(n_tiles * splits,)](
            hidden,
            weight,
            bias if bias is not None else hidden,
            targets,
            part,
            N,
            V,
            H,
            splits,
            tiles_per_split,
            splits * N,
            hidden.stride(0),
            hidden.stride(1),
            weight.stride(0),
            weight.stride(1),
            inv_scalar,
            inv_ptr,
            float(softcap or 1.0),
            ha_ptr,
            lb_ptr,
            rank,
            stride_lbv,
            stride_lbr,
            MOMENTS=moments,
            FLATTEN=cfg.FLATTEN,
            **_flags(hidden, bias, softcap, inv_temperature, lora_ha, cfg, interpret),
            **({} if interpret else cfg.as_launch()),
        )
        return part

    if config is None:
        key = (
            "fwd",
            configs.bucket_tokens(N),
            V,
            H,
            hidden.dtype,
            bias is not None,
            softcap is not None,
            moments,
            isinstance(inv_temperature, torch.Tensor),
            _lora_pad(lora_ha) if lora_ha is not None else 0,
        )
        config = _choose(key, configs.FWD_GPU, configs.FWD_CANDIDATES, launch, interpret)
    return launch(config)


def _choose(key, default: TileConfig, candidates, launch, interpret: bool) -> TileConfig:
    """The configured default, or with FUSED_RLVR_AUTOTUNE=1 the fastest candidate (timed once per key)."""
    if interpret:
        return configs.INTERPRET
    if not configs.autotune_enabled():
        return default
    if key not in _TUNED:
        from triton.testing import do_bench

        timings = {}
        for cand in candidates:
            try:
                timings[cand] = do_bench(lambda c=cand: launch(c), warmup=5, rep=20)
            except Exception:  # a candidate that does not fit this GPU (shared memory) is skipped
                continue
        _TUNED[key] = min(timings, key=timings.get) if timings else default
    return _TUNED[key]


_TUNED: dict = {}


def dlogits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprob: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    out: torch.Tensor,
    v_start: int,
    *,
    inv_temperature: float | torch.Tensor,
    softcap: float | None,
    interpret: bool,
    lora_ha: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Write d(loss)/d(u) for vocab columns [v_start, v_start + out.shape[1]) of valid rows into out.

    inv_temperature, lora_ha, lora_b: as in `forward`.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    chunk = out.shape[1]
    targets, bias, lse, entropy = _dense(targets), _dense(bias), _dense(lse), _dense(entropy)
    grad_logprob, grad_entropy = _dense(grad_logprob), _dense(grad_entropy)
    inv_scalar, inv_ptr = _temperature_args(inv_temperature, hidden)
    ha_ptr, lb_ptr, rank, stride_lbv, stride_lbr = _lora_args(lora_ha, lora_b, hidden)

    def launch(cfg: TileConfig) -> torch.Tensor:
        grid = (triton.cdiv(N, cfg.BLOCK_N) * triton.cdiv(chunk, cfg.BLOCK_V),)
        _dlogits_kernel[grid](
            hidden,
            weight,
            bias if bias is not None else hidden,
            targets,
            lse,
            entropy,
            grad_logprob if grad_logprob is not None else lse,
            grad_entropy if grad_entropy is not None else lse,
            out,
            N,
            V,
            H,
            v_start,
            chunk,
            hidden.stride(0),
            hidden.stride(1),
            weight.stride(0),
            weight.stride(1),
            out.stride(0),
            out.stride(1),
            inv_scalar,
            inv_ptr,
            float(softcap or 1.0),
            ha_ptr,
            lb_ptr,
            rank,
            stride_lbv,
            stride_lbr,
            HAS_GLP=grad_logprob is not None,
            HAS_GENT=grad_entropy is not None,
            **_flags(hidden, bias, softcap, inv_temperature, lora_ha, cfg, interpret),
            **({} if interpret else cfg.as_launch()),
        )
        return out

    if config is None:
        key = (
            "bwd",
            configs.bucket_tokens(N),
            chunk,
            H,
            hidden.dtype,
            bias is not None,
            softcap is not None,
            grad_logprob is not None,
            grad_entropy is not None,
            isinstance(inv_temperature, torch.Tensor),
            _lora_pad(lora_ha) if lora_ha is not None else 0,
        )
        config = _choose(key, configs.BWD_GPU, configs.BWD_CANDIDATES, launch, interpret)
    return launch(config)
