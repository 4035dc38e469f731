"""RLPR: a verifier-free reward from the policy's own probability of the reference answer (docs/methods.md
section 5; "RLPR: Extrapolating RLVR to General Domains without Verifiers", code at github.com/OpenBMB/RLPR).

Pipeline: splice the reference answer y* in place of the generated answer (`splice_answer`), run one no-grad
forward of the policy over the spliced sequences (`fused_rlvr.linear_logprobs`), score the y* tokens
(`rlpr_score`), debias with the same score computed once without reasoning (scoreA) and mix in the format
reward (`rlpr_reward`); `StdFilter` drops prompts whose rewards barely vary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import NamedTuple, Optional, Union

import torch

from fused_rlvr._validation import as_mask, check_tensor, positive_finite

TokenIds = Union[Sequence[int], torch.Tensor]


@torch.no_grad()
def rlpr_score(answer_logprobs: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """scoreB_b = mean over the valid answer tokens i of exp(lp_{b,i}): the mean probability, not the mean
    log-probability.

    answer_logprobs: [B, L] per-token log-probs of the spliced reference answer tokens (e.g. the
    `linear_logprobs` of the spliced sequences, positions outside the answer arbitrary);
    answer_mask: [B, L] 1 on reference-answer tokens. Returns fp32 [B]; a row with no answer token scores 0
    (as the authors' code does for a response whose answer could not be located).
    """
    check_tensor("answer_logprobs", answer_logprobs)
    if answer_logprobs.dim() != 2 or not answer_logprobs.is_floating_point():
        raise ValueError(
            f"answer_logprobs must be a floating [B, L] tensor, got {answer_logprobs.dtype} "
            f"shape {tuple(answer_logprobs.shape)}"
        )
    m = as_mask("answer_mask", answer_mask, answer_logprobs.shape).to(answer_logprobs.device)
    lp = answer_logprobs.detach().float()
    probs = torch.where(m > 0, lp.exp(), torch.zeros_like(lp))
    return probs.sum(1) / m.sum(1).clamp_min(1.0)


def rlpr_reward(
    score_b: torch.Tensor,
    score_a: Union[torch.Tensor, float],
    format_ok: Optional[torch.Tensor] = None,
    w: float = 0.9,
) -> torch.Tensor:
    """r = max(0, scoreB - scoreA); with format_ok, reward = w r + (1 - w) format (authors: w = 0.9).

    score_b: [B] (`rlpr_score` of the spliced sequences); score_a: [B] or a scalar, the same statistic with
    no reasoning before the answer, computed once with the initial policy and cached per prompt;
    format_ok: optional [B] 0/1 (or bool) format reward. Without format_ok the reward is r itself.
    Returns fp32 [B].
    """
    check_tensor("score_b", score_b)
    if score_b.dim() != 1:
        raise ValueError(f"score_b must be [B], got shape {tuple(score_b.shape)}")
    sb = score_b.detach().float()
    if isinstance(score_a, torch.Tensor):
        if score_a.dim() > 0 and tuple(score_a.shape) != tuple(sb.shape):
            raise ValueError(
                f"score_a must be a scalar or [B] = {tuple(sb.shape)}, got {tuple(score_a.shape)}"
            )
        sa = score_a.detach().float().to(sb.device)
    elif isinstance(score_a, Real) and not isinstance(score_a, bool):
        sa = torch.tensor(float(score_a), device=sb.device)
    else:
        raise TypeError(f"score_a must be a tensor or a number, got {type(score_a).__name__}")
    r = (sb - sa).clamp_min(0.0)
    if format_ok is None:
        return r
    if isinstance(w, bool) or not isinstance(w, Real) or not 0 <= w <= 1:
        raise ValueError(f"w must be a number in [0, 1], got {w!r}")
    fmt = as_mask("format_ok", format_ok, sb.shape).to(sb.device)
    return w * r + (1 - w) * fmt


class Splice(NamedTuple):
    input_ids: torch.Tensor  # [L] int64: prompt + response with the reference answer in place
    answer_mask: torch.Tensor  # [L] bool: True on the reference answer's tokens
    prompt_len: int  # len(prompt_ids): the response part starts here
    parsed: bool  # False when answer_span was None (the answer was appended instead)


def _ids(name: str, value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.is_floating_point() or value.dtype == torch.bool:
            raise ValueError(
                f"{name} must be a 1-D integer tensor or a list of ints, got {value.dtype} "
                f"shape {tuple(value.shape)}"
            )
        return value.detach().to("cpu", torch.int64)
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else None
    if values is None or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{name} must be a list of token ids (ints) or a 1-D integer tensor")
    return torch.tensor([int(v) for v in values], dtype=torch.int64)


def splice_answer(
    prompt_ids: TokenIds,
    response_ids: TokenIds,
    answer_span: Optional[tuple[int, int]],
    reference_ids: TokenIds,
    *,
    answer_prefix_ids: TokenIds = (),
    answer_suffix_ids: TokenIds = (),
    strip_ids: Sequence[int] = (),
) -> Splice:
    """Token-level splice: the sequence the policy scores, the reference answer in place of the generated one.

    prompt_ids: the prompt's tokens (no padding); response_ids: the generated tokens (no padding; a final
    eos may stay); reference_ids: the tokens of the reference answer y* as it should appear in context
    (tokenise it with the leading space / newline the answer slot has).
    answer_span = (start, end): the generated answer occupies response_ids[start:end] (e.g. the tokens
    between "<answer>" and "</answer>"); the result is
        prompt + response[:start] + reference + response[end:]
    (the tokens after the answer do not change the answer's log-probs under causal attention; keep them or
    cut them as you like). answer_span = None: the response has no parsable answer; trailing tokens found
    in `strip_ids` (eos, pad) are removed from the response and the result is
        prompt + response + answer_prefix + reference + answer_suffix
    with answer_prefix the answer marker (e.g. the ids of "</think><answer>") and answer_suffix its closing
    (e.g. "</answer>" + eos). The authors' code instead gives such a response scoreB = 0 (an empty mask):
    zero the mask of splices with `parsed=False` to reproduce that.

    answer_mask marks the reference tokens in input_ids. For the log-probs of a causal LM, position p of the
    logits predicts token p + 1: score `linear_logprobs(h[:-1], W, input_ids[1:])` against answer_mask[1:].
    """
    prompt = _ids("prompt_ids", prompt_ids)
    response = _ids("response_ids", response_ids)
    reference = _ids("reference_ids", reference_ids)
    prefix = _ids("answer_prefix_ids", answer_prefix_ids)
    suffix = _ids("answer_suffix_ids", answer_suffix_ids)
    if reference.numel() == 0:
        raise ValueError("reference_ids must hold at least one token")
    if answer_span is not None:
        pair = isinstance(answer_span, Sequence) and len(answer_span) == 2
        if not pair or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in answer_span):
            raise TypeError(f"answer_span must be None or a (start, end) pair of ints, got {answer_span!r}")
        start, end = int(answer_span[0]), int(answer_span[1])
        if not 0 <= start <= end <= response.numel():
            raise ValueError(
                f"answer_span must satisfy 0 <= start <= end <= len(response_ids) = "
                f"{response.numel()}, got ({start}, {end})"
            )
        head, tail = response[:start], response[end:]
    else:
        strip = {int(s) for s in strip_ids}
        keep = response.numel()
        while keep > 0 and int(response[keep - 1]) in strip:
            keep -= 1
        head, tail = torch.cat([response[:keep], prefix]), suffix
    parts = [prompt, head, reference, tail]
    input_ids = torch.cat(parts)
    mask = torch.zeros(input_ids.numel(), dtype=torch.bool)
    start_ref = prompt.numel() + head.numel()
    mask[start_ref : start_ref + reference.numel()] = True
    return Splice(input_ids, mask, prompt.numel(), answer_span is not None)


class StdFilter:
    """Keep a prompt only if the std of its rewards >= beta * EMA(mean std) (authors: beta 0.5 for Qwen,
    EMA ratio 0.99); the trainer refills the batch with new prompts until it is full.

    The threshold is fixed within a training step. `keep` filters one group of candidate prompts against it
    and records the std of every candidate (kept or not); `step()`, called once per training step, folds
    the mean of the recorded stds into the EMA:
        first step:  ema = mean std of that step's candidates  (before it: threshold 0, every prompt kept)
        later steps: ema = ema_ratio * ema + (1 - ema_ratio) * mean std of that step's candidates
    as the authors' trainer does (their list of per-prompt stds is averaged and folded in at the start of
    the next step). Stds are unbiased (N - 1) over a group's responses; non-finite stds are ignored in the
    EMA; a group of one response has no std and raises.
    """

    def __init__(self, beta: float = 0.5, ema: float = 0.99):
        self.beta = positive_finite("beta", beta)
        if isinstance(ema, bool) or not isinstance(ema, Real) or not 0 <= ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {ema!r}")
        self.ema_ratio = float(ema)
        self.ema_mean: Optional[float] = None
        self.pending_sum = 0.0
        self.pending_count = 0
        self.steps = 0

    @property
    def threshold(self) -> float:
        """beta * EMA(mean std), or 0.0 before the first `step()` (nothing filtered yet)."""
        return 0.0 if self.ema_mean is None else self.beta * self.ema_mean

    @staticmethod
    def group_stds(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stds [G], inverse [N]): unbiased std of each group's rewards; inverse maps a response to its group
        (groups in ascending order of group id)."""
        check_tensor("rewards", rewards)
        check_tensor("group_ids", group_ids)
        if rewards.dim() != 1 or not rewards.is_floating_point():
            raise ValueError(
                f"rewards must be a floating [N] tensor, got {rewards.dtype} shape {tuple(rewards.shape)}"
            )
        if tuple(group_ids.shape) != tuple(rewards.shape) or group_ids.is_floating_point():
            raise ValueError(
                f"group_ids must be an integer [N] = {tuple(rewards.shape)} tensor, got "
                f"{group_ids.dtype} shape {tuple(group_ids.shape)}"
            )
        uniq, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
        if bool((counts < 2).any()):
            bad = uniq[counts < 2][0].item()
            raise ValueError(f"every group needs at least 2 responses for a std; group_ids={bad} has 1")
        r = rewards.detach().double()
        g = uniq.numel()
        n = counts.to(r.dtype)
        mean = torch.zeros(g, dtype=r.dtype, device=r.device).index_add(0, inverse, r) / n
        dev = r - mean[inverse]
        var = torch.zeros(g, dtype=r.dtype, device=r.device).index_add(0, inverse, dev * dev) / (n - 1)
        return var.sqrt().float(), inverse

    def keep(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """bool [N]: True for the responses of groups with std >= threshold; records the stds for `step()`."""
        stds, inverse = self.group_stds(rewards, group_ids)
        finite = torch.isfinite(stds)
        self.pending_sum += float(stds[finite].double().sum())
        self.pending_count += int(finite.sum())
        keep_group = finite & (stds >= self.threshold)
        return keep_group[inverse]

    def step(self) -> float:
        """Fold this step's recorded stds into the EMA; returns the new threshold."""
        if self.pending_count:
            mean = self.pending_sum / self.pending_count
            if self.ema_mean is None:
                self.ema_mean = mean
            else:
                self.ema_mean = self.ema_ratio * self.ema_mean + (1 - self.ema_ratio) * mean
        self.pending_sum, self.pending_count = 0.0, 0
        self.steps += 1
        return self.threshold

    def state_dict(self) -> dict:
        return {
            "beta": self.beta,
            "ema": self.ema_ratio,
            "ema_mean": self.ema_mean,
            "pending_sum": self.pending_sum,
            "pending_count": self.pending_count,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        missing = {"beta", "ema", "ema_mean", "pending_sum", "pending_count", "steps"} - set(state)
        if missing:
            raise KeyError(f"state is missing {sorted(missing)}")
        fresh = StdFilter(state["beta"], state["ema"])
        ema_mean = state["ema_mean"]
        if ema_mean is not None and (not isinstance(ema_mean, Real) or not math.isfinite(ema_mean)):
            raise ValueError(f"state['ema_mean'] must be None or a finite number, got {ema_mean!r}")
        self.__dict__.update(fresh.__dict__)
        self.ema_mean = None if ema_mean is None else float(ema_mean)
        self.pending_sum = float(state["pending_sum"])
        self.pending_count = int(state["pending_count"])
        self.steps = int(state["steps"])
