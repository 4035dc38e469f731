"""The names the GRPO-family epilogue and its callers share (no Triton here: importable anywhere).

GRPO_PARTS: the per-sequence results of the per-token loss epilogue, in column order. Both the Triton
kernel (kernels/grpo_loss.py, which stores column GRPO_PARTS.index(name)) and the torch epilogue
(fused_rlvr/grpo.py, which stacks its columns in this order) write a [B, len(GRPO_PARTS)] table; every reader
looks columns up by name. Most columns are sums over the valid tokens of the sequence; the ones in
MIN_PARTS / MAX_PARTS are a minimum / maximum over them (+inf / -inf for a sequence without valid tokens)
and reduce across sequences with min / max.

POLICY_LOSSES and IMPORTANCE: the accepted values of `policy_loss` and `importance`; the kernel receives
their index in these tuples as a compile-time constant.
"""

from __future__ import annotations

POLICY_LOSSES = ("ppo", "cispo", "sapo")
IMPORTANCE = ("token", "sequence", "sequence-mean")

GRPO_PARTS = (
    "loss",  # sum_t w_t l_t: the sequence's share of the loss
    "pg",  # sum_t w_t pg_weight_t l_pg,t: policy-gradient part
    "kl_term",  # sum_t w_t beta KL_t (ratio-weighted with kl_ratio_weighted)
    "ent_term",  # sum_t w_t entropy_coef H_t
    "tokens",  # number of valid tokens
    "ratio",  # sum of the importance ratio r
    "clip_low",  # ppo: r' < 1 - eps_low with A < 0 (r' = min(r, ratio_cap))
    "clip_high",  # ppo: r' > 1 + eps_high with A > 0; cispo: r > eps_high with A > 0
    "clip_dual",  # ppo: the dual-clip cap is active (A < 0)
    "approx_kl",  # sum of lp_old - lp
    "entropy",  # sum of H
    "ref_kl",  # sum of the KL term as it enters the loss (times r with kl_ratio_weighted)
    "ratio_cap",  # ppo: r > ratio_cap
    "pg_weight",  # sum of pg_weights (1 per token without)
    "sapo_gate",  # sapo: sum of the soft gate 4 s (1 - s), s = sigmoid(tau (r - 1)); 0 otherwise
    "ratio_min",  # min of r
    "ratio_max",  # max of r
)
MIN_PARTS = ("ratio_min",)
MAX_PARTS = ("ratio_max",)
PART = {name: i for i, name in enumerate(GRPO_PARTS)}
