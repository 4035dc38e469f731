"""The policy: the model being trained, its tokenizer, and the three ways the trainer runs it.

- `generate(prompts)`: sampling (or greedy decoding) with the model's own `generate`;
- `scorer`: no-grad fused passes (old / reference log-probs, hook scoring; `scoring.Scorer`);
- `loss(batch, rows, fn)`: the one seam for every forward that needs gradients. It packs the rows, runs the
  body and `fn(ForwardOutputs)` (a fused loss on the final hidden states and the lm-head weight) as one
  call of `root_call(model, ...)`. On one process that is a plain call; under FSDP2 it is
  `fused_rlvr.fsdp.fsdp2_lm_head_call`, so the loss sees the gathered [V, H] weight and its gradient is
  reduce-scattered like any other. The policy loss of every algorithm and every hook's extra loss (DPO)
  go through it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import torch

from fused_rlvr.integrations.hf import LMHead, last_hidden_states, lm_head
from fused_rlvr.train.models import load_causal_lm
from fused_rlvr.train.rollout import format_prompt, generate
from fused_rlvr.train.scoring import Scorer

if TYPE_CHECKING:  # pragma: no cover
    from fused_rlvr.train.config import TrainConfig
    from fused_rlvr.train.rollout import RolloutBatch

RootCall = Callable[[torch.nn.Module, Callable[[torch.nn.Module], Any]], Any]


def plain_call(model: torch.nn.Module, fn: Callable[[torch.nn.Module], Any]) -> Any:
    """`fn(model)`: the root call of a model that is not sharded."""
    return fn(model)


def resolve_device(name: str) -> torch.device:
    """The config's `device`: 'auto' is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("config field 'device' is 'cuda' but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The config's `dtype`: 'auto' is bf16 on CUDA, fp32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class ForwardOutputs(NamedTuple):
    """What a loss function receives from `Policy.loss` (positions shifted: index t predicts token t + 1)."""

    hidden: torch.Tensor  # [b, T-1, H] final hidden states (final norm applied), in the lm-head's dtype
    head: LMHead  # weight [V, H] (the gathered one under FSDP2), bias [V] or None, softcap
    targets: torch.Tensor  # [b, T-1] long: the next tokens
    mask: torch.Tensor  # [b, T-1] long: 1 on response tokens
    rows: torch.Tensor  # [b] the batch rows packed


class Policy:
    """The model of `cfg.model` on `cfg.device`, in eval mode (no dropout in any RL forward: rollouts,
    scoring and the loss see one distribution), with the parameters `train_layers` / `train_lm_head` select
    set to require gradients."""

    def __init__(self, cfg: TrainConfig, *, root_call: RootCall = plain_call):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.model, self.tok = load_causal_lm(
            cfg.model, device=str(self.device), dtype=resolve_dtype(cfg.dtype, self.device), seed=cfg.seed
        )
        head = lm_head(self.model)  # refuses heads the fused op cannot express, naming the model class
        self.softcap = head.softcap
        self.model.eval()
        self._select_trainable(head)
        self.root_call = root_call
        self.eos_ids = self._eos_ids()
        self.pad_id = self.tok.pad_token_id
        self.scorer = Scorer(
            self.model,
            pad_id=self.pad_id,
            device=self.device,
            micro_batch=cfg.micro_batch,
            temperature=cfg.temperature,
            backend=cfg.backend,
        )
        self._prompts: dict[str, list[int]] = {}

    def _select_trainable(self, head: LMHead) -> None:
        cfg = self.cfg
        if cfg.train_layers == 0:
            self.model.requires_grad_(True)
            if not cfg.train_lm_head:
                head.weight.requires_grad_(False)
            return
        layers = getattr(getattr(self.model, "model", None), "layers", None)
        if layers is None:
            raise ValueError(
                f"config field 'train_layers' needs a model with .model.layers; "
                f"{type(self.model).__name__} has none (use train_layers=0)"
            )
        if cfg.train_layers > len(layers):
            raise ValueError(
                f"config field 'train_layers' must be <= {len(layers)} (the model's layers), "
                f"got {cfg.train_layers}"
            )
        self.model.requires_grad_(False)
        for layer in layers[-cfg.train_layers :]:
            layer.requires_grad_(True)
        norm = getattr(self.model.model, "norm", None)
        if norm is not None:
            norm.requires_grad_(True)

    def _eos_ids(self) -> list[int]:
        ids = {self.tok.eos_token_id}
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        return sorted(i for i in ids if i is not None)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """The trainable parameters (this process's shards under FSDP2)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def frozen_copy(self) -> torch.nn.Module:
        """A copy of the model as it is now, without gradients (the initial policy: KL reference, RLPR)."""
        return copy.deepcopy(self.model).eval().requires_grad_(False)

    # ------------------------------------------------------------------ prompts and sampling
    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of a task question with the config's suffix and system prompt (cached)."""
        if question not in self._prompts:
            self._prompts[question] = format_prompt(
                self.tok, question, self.cfg.prompt_suffix, self.cfg.system_prompt
            )
        return self._prompts[question]

    def text_prompt_ids(self, text: str) -> list[int]:
        """Token ids of a prompt given as the whole user text (no suffix added)."""
        return format_prompt(self.tok, text, "", self.cfg.system_prompt)

    def generate(
        self,
        prompts: list[list[int]],
        greedy: bool = False,
        on_batch: Optional[Callable[[int], None]] = None,
    ) -> tuple[list[list[int]], list[str], list[bool]]:
        """(response ids, texts, truncated) of one response per prompt (`rollout.generate`)."""
        c = self.cfg
        return generate(
            self.model,
            self.tok,
            prompts,
            max_new_tokens=c.max_new_tokens,
            temperature=c.temperature,
            top_p=c.top_p,
            greedy=greedy,
            batch_size=c.gen_batch,
            eos_ids=self.eos_ids,
            pad_id=self.pad_id,
            on_batch=on_batch,
        )

    # ------------------------------------------------------------------ forwards with gradients
    def loss(self, batch: RolloutBatch, rows: torch.Tensor, fn: Callable[[ForwardOutputs], Any]) -> Any:
        """`fn(ForwardOutputs)` for the samples at `rows`, with gradients, inside the root forward."""
        enc = batch.pack(rows, self.pad_id, self.device)

        def body(model: torch.nn.Module) -> Any:
            hidden = last_hidden_states(model, enc["input_ids"], enc["attention_mask"])[:, :-1]
            head = lm_head(model)
            if hidden.dtype != head.weight.dtype:
                hidden = hidden.to(head.weight.dtype)
            return fn(
                ForwardOutputs(hidden, head, enc["input_ids"][:, 1:], enc["response_mask"][:, 1:], rows)
            )

        return self.root_call(self.model, body)

    def zero_loss(self) -> torch.Tensor:
        """0 x the log-prob of one pad token, through the same root forward: the parameters, hooks and
        collectives of a real pass and an exactly zero gradient (a process with less work pads with it)."""

        def body(model: torch.nn.Module) -> torch.Tensor:
            ids = torch.full((1, 2), self.pad_id, dtype=torch.long, device=self.device)
            hidden = last_hidden_states(model, ids, torch.ones_like(ids))[:, :-1]
            st = lm_head(model).token_stats(
                hidden,
                ids[:, 1:],
                temperature=self.cfg.temperature,
                return_entropy=False,
                backend=self.cfg.backend,
            )
            return st.logprobs.sum() * 0.0

        return self.root_call(self.model, body)
