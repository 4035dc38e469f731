"""Drop-in use of the fused op in existing stacks.

- `fused_rlvr.integrations.hf`: hidden states and lm-head of any Hugging Face causal LM, fused per-token
  log-probs / entropy of a batch of sequences.
- `fused_rlvr.integrations.trl`: `FusedGRPOTrainer`, TRL's GRPOTrainer with the fused op (needs `trl`).
- `fused_rlvr.integrations.verl`: verl's fused log-prob + entropy call, `linear_logprobs_entropy`.

Only `hf` is imported here; `trl` is imported on use so that the package works without TRL installed.
"""

from fused_rlvr.integrations.hf import LMHead, last_hidden_states, lm_head, sequence_token_stats

__all__ = ["LMHead", "last_hidden_states", "lm_head", "sequence_token_stats"]
