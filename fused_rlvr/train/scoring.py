"""Every no-grad forward the trainer and its hooks run, micro-batched the same way.

`Scorer` packs sequences right-padded into [b, T] micro-batches of at most `micro_batch` rows and runs one
fused, no-grad pass per micro-batch: the log-probs (and entropies) of the responses (old / reference
log-probs, hook scoring), the mean probability of spliced answer tokens (RLPR), or the final hidden states
of the responses (the effective rank). Every log-prob comes from `sequence_token_stats`: the fused op on
the last hidden states and the lm-head weight, no [tokens x vocab] logits, at the sampling temperature.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Optional, Protocol

import torch

from fused_rlvr.integrations.hf import last_hidden_states, sequence_token_stats
from fused_rlvr.rlpr import rlpr_score

if TYPE_CHECKING:  # pragma: no cover
    from fused_rlvr.train.rollout import RolloutBatch


class MaskedSequence(Protocol):
    input_ids: torch.Tensor  # [L] long
    answer_mask: torch.Tensor  # [L] bool: the tokens to score


class Scorer:
    """No-grad fused passes of `model` (default: the policy it was built with) over micro-batches."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        pad_id: int,
        device: torch.device,
        micro_batch: int,
        temperature: float,
        backend: str = "auto",
    ):
        self.model, self.pad_id, self.device = model, pad_id, device
        self.micro_batch, self.temperature, self.backend = micro_batch, temperature, backend

    def _chunks(self, rows: torch.Tensor) -> Iterator[torch.Tensor]:
        for s in range(0, len(rows), self.micro_batch):
            yield rows[s : s + self.micro_batch]

    def _stats(self, model, ids, attn, mask, entropy: bool):
        return sequence_token_stats(
            self.model if model is None else model,
            ids,
            attn,
            mask,
            temperature=self.temperature,
            return_entropy=entropy,
            backend=self.backend,
        )

    @torch.no_grad()
    def logprobs(
        self,
        batch: RolloutBatch,
        rows: Optional[torch.Tensor] = None,
        *,
        model: Optional[torch.nn.Module] = None,
        entropy: bool = False,
    ) -> tuple[list[torch.Tensor], Optional[list[torch.Tensor]]]:
        """([n] x fp32 [L_i] response-token log-probs, the same for entropies or None) of the samples at
        `rows` (default: all), each under its group's prompt, on the CPU."""
        rows = torch.arange(len(batch)) if rows is None else rows
        lps, ents = [], []
        for mb in self._chunks(rows):
            enc = batch.pack(mb, self.pad_id, self.device)
            st = self._stats(model, enc["input_ids"], enc["attention_mask"], enc["response_mask"], entropy)
            m = enc["response_mask"][:, 1:].bool()
            for j in range(len(mb)):
                lps.append(st.logprobs[j][m[j]].float().cpu())
                if entropy:
                    ents.append(st.entropy[j][m[j]].float().cpu())
        return lps, (ents if entropy else None)

    @torch.no_grad()
    def answer_scores(
        self, seqs: Sequence[MaskedSequence], *, model: Optional[torch.nn.Module] = None
    ) -> torch.Tensor:
        """fp32 [n] on the CPU: `rlpr_score` (the mean probability of the tokens where answer_mask is True)
        of each sequence. Only those tokens are scored (the others cost no vocabulary work)."""
        out = []
        for mb in self._chunks(torch.arange(len(seqs))):
            chunk = [seqs[int(i)] for i in mb]
            t = max(len(x.input_ids) for x in chunk)
            ids = torch.full((len(chunk), t), self.pad_id, dtype=torch.long)
            attn = torch.zeros((len(chunk), t), dtype=torch.long)
            amask = torch.zeros((len(chunk), t), dtype=torch.long)
            for j, x in enumerate(chunk):
                n = len(x.input_ids)
                ids[j, :n], attn[j, :n], amask[j, :n] = x.input_ids, 1, x.answer_mask.long()
            dev = self.device
            st = self._stats(model, ids.to(dev), attn.to(dev), amask.to(dev), False)
            out.append(rlpr_score(st.logprobs.float(), amask[:, 1:].to(dev)).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    @torch.no_grad()
    def hidden_states(self, batch: RolloutBatch, *, max_tokens: int = 512) -> list[torch.Tensor]:
        """[B] x fp32 [min(L_i, max_tokens), H] on the CPU: the final hidden states the fused op receives for
        each response (hidden[:, :-1] at the positions that predict its tokens, final norm applied), the
        last `max_tokens` of them."""
        out = []
        for mb in self._chunks(torch.arange(len(batch))):
            enc = batch.pack(mb, self.pad_id, self.device)
            h = last_hidden_states(self.model, enc["input_ids"], enc["attention_mask"])[:, :-1]
            m = enc["response_mask"][:, 1:].bool()
            out += [h[j][m[j]][-max_tokens:].float().cpu() for j in range(len(mb))]
        return out
