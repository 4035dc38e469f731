"""Rollouts: prompt formatting, sampling with `generate`, and the batch the losses read.

`RolloutBatch` carries everything one training step knows about its samples: the groups, the responses and
their rewards (phases 1-6), then the trajectory the update reads (advantages, old and reference log-probs;
phases 7-8). `pack` turns rows of it into the [b, T] tensors of one forward.

Sequences are packed right-padded (prompt tokens, then response tokens, then pad), so positions are plain
aranges in every forward, exactly as the prompt was seen during generation (generation itself pads on the
left and HF derives the positions from the attention mask). A response ends at its first EOS (kept: the
model learns to stop) or at max_new_tokens (then it is `truncated`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from fused_rlvr.train.tasks import Problem


def format_prompt(tok, question: str, suffix: str, system: Optional[str]) -> list[int]:
    """Prompt token ids: the chat template when the tokenizer has one, else 'Question: ...\\nAnswer:'."""
    text = question + suffix
    if getattr(tok, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text}
        ]
        ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tok(f"Question: {text}\nAnswer:", add_special_tokens=False)["input_ids"]


@dataclass
class RolloutBatch:
    """B sampled responses in groups (one group per prompt; groups may differ in size), and their trajectory.

    `select`, `select_groups` and `concat` (group filters, refills) carry the rollout fields; the trajectory
    fields are set after the last of them, by the trainer's phases 7 and 8."""

    problems: list[Problem]  # per group
    prompt_ids: list[list[int]]  # per group (the prompt the samples are scored under)
    group: torch.Tensor  # [B] long, group index of each sample
    response_ids: list[list[int]]  # [B] x [L_i] response tokens (EOS kept), L_i <= max_new_tokens
    texts: list[str]  # [B] decoded responses
    truncated: torch.Tensor  # [B] bool
    rewards: torch.Tensor = None  # [B] float, set by the verifier and the reward hooks
    tags: list[str] = field(default_factory=list)  # [B] "base", "dars", "guided", ...
    # --- trajectory (phases 7-8)
    advantages: Optional[torch.Tensor] = None  # [B] fp32 (or [B, T-1] on the packed tokens, from a hook)
    old_logprobs: Optional[list[torch.Tensor]] = None  # [B] x fp32 [L_i]: pre-update policy (None: on-policy)
    ref_logprobs: Optional[list[torch.Tensor]] = None  # [B] x fp32 [L_i]: initial policy (None: no KL term)

    @classmethod
    def empty(cls) -> RolloutBatch:
        return cls(
            problems=[],
            prompt_ids=[],
            group=torch.zeros(0, dtype=torch.long),
            response_ids=[],
            texts=[],
            truncated=torch.zeros(0, dtype=torch.bool),
            rewards=torch.zeros(0),
        )

    @property
    def n_groups(self) -> int:
        return len(self.problems)

    def __len__(self) -> int:
        return len(self.response_ids)

    def group_rows(self, g: int) -> torch.Tensor:
        return torch.nonzero(self.group == g).flatten()

    def response_lengths(self) -> torch.Tensor:
        return torch.tensor([len(r) for r in self.response_ids], dtype=torch.float32)

    def counts(self, rows: torch.Tensor) -> tuple[float, float]:
        """(response tokens, sequences) of the samples at `rows`: what the whole-batch normalisers count."""
        return float(sum(len(self.response_ids[int(i)]) for i in rows)), float(len(rows))

    def verified(self, verifier: Callable[[str, str], float], rows: Sequence[int]) -> torch.Tensor:
        """fp32 [len(rows)]: verifier(response text, reference answer) of the samples at `rows`."""
        return torch.tensor(
            [verifier(self.texts[i], self.problems[int(self.group[i])].answer) for i in rows],
            dtype=torch.float32,
        )

    @staticmethod
    def on_tokens(
        values: Optional[list[torch.Tensor]], rows: torch.Tensor, mask: torch.Tensor
    ) -> Optional[torch.Tensor]:
        """Per-sample response values ([B] x [L_i]) scattered into the [b, T-1] layout of `pack(rows)`
        (mask: its response_mask[:, 1:]), 0 elsewhere; None stays None."""
        if values is None:
            return None
        out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        out[mask.bool()] = torch.cat([values[int(i)] for i in rows]).to(mask.device)
        return out

    def extend(self, group: list[int], response_ids, texts, truncated, tags) -> None:
        self.group = torch.cat([self.group, torch.tensor(group, dtype=torch.long)])
        self.response_ids = self.response_ids + list(response_ids)
        self.texts = self.texts + list(texts)
        self.truncated = torch.cat([self.truncated, torch.as_tensor(truncated, dtype=torch.bool)])
        self.tags = self.tags + list(tags)

    def select(self, rows: torch.Tensor) -> RolloutBatch:
        """The samples at `rows`, with groups renumbered densely (a dropped group disappears)."""
        rows = rows.flatten()
        kept = sorted(set(self.group[rows].tolist()))
        remap = {g: i for i, g in enumerate(kept)}
        idx = rows.tolist()
        out = RolloutBatch(
            problems=[self.problems[g] for g in kept],
            prompt_ids=[self.prompt_ids[g] for g in kept],
            group=torch.tensor([remap[int(self.group[i])] for i in idx], dtype=torch.long),
            response_ids=[self.response_ids[i] for i in idx],
            texts=[self.texts[i] for i in idx],
            truncated=self.truncated[rows],
            tags=[self.tags[i] for i in idx],
        )
        if self.rewards is not None:
            out.rewards = self.rewards[rows]
        return out

    def select_groups(self, keep: torch.Tensor) -> RolloutBatch:
        """The groups where `keep` (bool [n_groups]) is True, renumbered densely in their order."""
        keep = torch.as_tensor(keep, dtype=torch.bool).flatten()
        if keep.numel() != self.n_groups:
            raise ValueError(f"keep must be bool [n_groups] = ({self.n_groups},), got {tuple(keep.shape)}")
        return self.select(torch.nonzero(keep[self.group]).flatten())

    def concat(self, other: RolloutBatch) -> RolloutBatch:
        """This batch followed by `other`; other's groups are numbered after this batch's."""
        if (self.rewards is None) != (other.rewards is None):
            raise ValueError("concat needs both batches with rewards or both without")
        return RolloutBatch(
            problems=self.problems + other.problems,
            prompt_ids=self.prompt_ids + other.prompt_ids,
            group=torch.cat([self.group, other.group + self.n_groups]),
            response_ids=self.response_ids + other.response_ids,
            texts=self.texts + other.texts,
            truncated=torch.cat([self.truncated, other.truncated]),
            rewards=None if self.rewards is None else torch.cat([self.rewards, other.rewards]),
            tags=self.tags + other.tags,
        )

    def pack(self, rows: Optional[torch.Tensor], pad_id: int, device) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask / response_mask [b, T] for the samples at `rows` (all if None)."""
        idx = range(len(self)) if rows is None else rows.tolist()
        seqs, starts = [], []
        for i in idx:
            p = self.prompt_ids[int(self.group[i])]
            seqs.append(p + self.response_ids[i])
            starts.append(len(p))
        t = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), t), dtype=torch.long)
        resp = torch.zeros((len(seqs), t), dtype=torch.long)
        for j, (s, st) in enumerate(zip(seqs, starts)):
            ids[j, : len(s)] = torch.tensor(s, dtype=torch.long)
            attn[j, : len(s)] = 1
            resp[j, st : len(s)] = 1
        return {
            "input_ids": ids.to(device),
            "attention_mask": attn.to(device),
            "response_mask": resp.to(device),
        }


@torch.no_grad()
def generate(
    model,
    tok,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    greedy: bool,
    batch_size: int,
    eos_ids: list[int],
    pad_id: int,
    on_batch: Optional[Callable[[int], None]] = None,
):
    """Sample one response per prompt (token-id lists). Returns (response_ids, texts, truncated).

    Generation runs in chunks of `batch_size` prompts; `on_batch(n)` is called after each (a progress bar).
    Never synchronises with other processes (`synced_gpus=False`): under FSDP2 every rank generates on its
    gathered weights, its own number of sequences and tokens."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    out_ids, texts, truncated = [], [], []
    was_training = model.training
    model.eval()
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        t = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), t), pad_id, dtype=torch.long)
        attn = torch.zeros((len(chunk), t), dtype=torch.long)
        for j, p in enumerate(chunk):
            ids[j, t - len(p) :] = torch.tensor(p, dtype=torch.long)
            attn[j, t - len(p) :] = 1
        # A fresh GenerationConfig, not the model's: a generation_config.json may carry repetition penalties,
        # top_k, min_p... (Qwen's does), and the losses score exactly the plain tempered distribution.
        # generate() fills unset fields from model.generation_config, so that one is swapped out meanwhile.
        if greedy:
            gc = GenerationConfig(do_sample=False, top_k=None)
        else:
            gc = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        gc.update(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_ids)
        own = model.generation_config
        model.generation_config = GenerationConfig(
            pad_token_id=pad_id, eos_token_id=eos_ids, bos_token_id=own.bos_token_id
        )
        try:
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=attn.to(device),
                generation_config=gc,
                synced_gpus=False,
            )
        finally:
            model.generation_config = own
        gen = gen[:, t:].cpu()
        for row in gen.tolist():
            cut = next((k for k, tok_id in enumerate(row) if tok_id in eos_ids), None)
            resp = row if cut is None else row[: cut + 1]
            out_ids.append(resp)
            truncated.append(cut is None)
            texts.append(tok.decode(resp, skip_special_tokens=True))
        if on_batch is not None:
            on_batch(len(chunk))
    model.train(was_training)
    return out_ids, texts, truncated
