"""RLPR (docs/methods.md, section 5): a verifier-free reward and the reward-std filter.

- `RLPRReward`: the policy's mean probability of the reference answer spliced in place of the generated
  one, debiased by the initial policy's no-reasoning score (cached per problem), mixed with a format reward;
- `StdFilterHook`: drop prompts whose reward std is low against a moving mean (the trainer refills them).

Every policy score is a no-grad fused pass (`ctx.score.answer_scores`): no [tokens x vocab] logits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional

import torch

from fused_rlvr.rlpr import StdFilter, rlpr_reward, splice_answer
from fused_rlvr.train.hooks.base import Hook, PerStep
from fused_rlvr.train.tasks import final_number_span

if TYPE_CHECKING:  # pragma: no cover
    from fused_rlvr.train.hooks.base import StepContext
    from fused_rlvr.train.rollout import RolloutBatch
    from fused_rlvr.train.tasks import Problem


class SplicedAnswer(NamedTuple):
    input_ids: torch.Tensor  # [L] prompt + response up to the answer + reference answer tokens
    answer_mask: torch.Tensor  # [L] bool, True on the tokens that carry the reference answer's characters


def _reference_tokens(tok, lead: str, reference: str) -> tuple[list[int], list[bool]]:
    """Tokens of lead + reference and which of them carry reference characters (not only the lead)."""
    ids = tok(lead + reference, add_special_tokens=False)["input_ids"]
    mask = [len(tok.decode(ids[: j + 1])) > len(lead) for j in range(len(ids))]
    return ids, (mask if any(mask) else [True] * len(ids))


def splice_reference(
    tok, prompt_ids: list[int], response_ids: list[int], reference: str
) -> Optional[SplicedAnswer]:
    """The sequence RLPR scores: the prompt, the response up to its final answer, then the reference answer.

    Token boundaries: the final number is found in the decoded response text; the response is cut at the
    last token that ends at or before the number's first character (prefix decodes, scanned from the end),
    and whatever text lies between that cut and the number (e.g. the space that a GPT-2-style tokenizer
    merges into " 72") is re-tokenised together with the reference answer, so the reference is tokenised as
    it would appear in that context. Only tokens carrying reference characters are scored (a merged " 72"
    token counts; a lone space token does not). Tokens after the generated answer are dropped: under causal
    attention they cannot change the answer's log-probs. Returns None when the response has no number (the
    authors give such a response scoreB = 0). Tokenizers that prepend a word-start marker to every call
    (SentencePiece "legacy" mode) add that marker before the reference: a known approximation."""
    text = tok.decode(response_ids, skip_special_tokens=True)
    span = final_number_span(text, reference)
    if span is None:
        return None
    start = span[0]
    k = len(response_ids)
    pre = text
    while k > 0:
        pre = tok.decode(response_ids[:k], skip_special_tokens=True)
        if len(pre) <= start and text.startswith(pre):
            break
        k -= 1
    if k == 0:
        pre = ""
    ref_ids, ref_mask = _reference_tokens(tok, text[len(pre) : start], reference)
    sp = splice_answer(prompt_ids, response_ids, (k, len(response_ids)), ref_ids)
    mask = sp.answer_mask.clone()
    mask[len(prompt_ids) + k :] = torch.tensor(ref_mask, dtype=torch.bool)
    return SplicedAnswer(sp.input_ids, mask)


def no_reasoning_sequence(tok, prompt_ids: list[int], reference: str) -> SplicedAnswer:
    """scoreA's sequence: the prompt followed directly by the reference answer (no reasoning)."""
    ref_ids, ref_mask = _reference_tokens(tok, "", reference)
    ids = torch.tensor(list(prompt_ids) + ref_ids, dtype=torch.long)
    mask = torch.tensor([False] * len(prompt_ids) + ref_mask, dtype=torch.bool)
    return SplicedAnswer(ids, mask)


def _problem_key(p: Problem) -> str:
    return f"{p.question}\x1f{p.answer}"


class RLPRReward(Hook):
    """reward = w * max(0, scoreB - scoreA) + (1 - w) * format (authors: w = 0.9).

    scoreB: the policy's (no-grad, fused) mean probability of the reference answer's tokens, spliced in
    place of the response's final number (`splice_reference`); 0 when the response has no number.
    scoreA: the same statistic with no reasoning (`no_reasoning_sequence`) under the INITIAL policy,
    computed the first time a problem is seen and cached per problem (part of the checkpoint). The initial
    policy is the frozen copy of the model the trainer makes when it is built (also the KL reference when
    beta > 0); the model is rebuilt from the config before a resume loads the trained weights, so a resumed
    run scores new problems with the same initial policy.
    format: 1 when the response has a parsable final number.
    """

    name = "rlpr"

    def __init__(self, initial_model, weight: float = 0.9):
        self.initial = initial_model
        self.weight = float(weight)
        self.score_a: dict[str, float] = {}
        self.last: dict[str, torch.Tensor] = {}
        self._m = PerStep()

    def _cache_score_a(self, ctx: StepContext, batch: RolloutBatch) -> None:
        todo = {}
        for g, p in enumerate(batch.problems):
            key = _problem_key(p)
            if key not in self.score_a and key not in todo:
                todo[key] = no_reasoning_sequence(ctx.tokenizer, batch.prompt_ids[g], p.answer)
        if todo:
            scores = ctx.score.answer_scores(list(todo.values()), model=self.initial)
            self.score_a.update({k: float(v) for k, v in zip(todo, scores)})

    def rewards(self, ctx, batch, rewards):
        self._cache_score_a(ctx, batch)
        splices = [
            splice_reference(
                ctx.tokenizer,
                batch.prompt_ids[int(g)],
                batch.response_ids[i],
                batch.problems[int(g)].answer,
            )
            for i, g in enumerate(batch.group.tolist())
        ]
        parsed = torch.tensor([s is not None for s in splices], dtype=torch.bool)
        score_b = torch.zeros(len(batch))
        if bool(parsed.any()):
            score_b[parsed] = ctx.score.answer_scores([s for s in splices if s is not None])
        score_a = torch.tensor([self.score_a[_problem_key(batch.problems[int(g)])] for g in batch.group])
        out = rlpr_reward(score_b, score_a, parsed, w=self.weight)
        self.last = {"score_b": score_b, "score_a": score_a, "format": parsed.float(), "reward": out}
        correct = rewards > 0.5
        self._m.at(ctx.step).add(
            n=len(batch),
            score_b=score_b.sum(),
            score_a=score_a.sum(),
            fmt=parsed.sum(),
            reward=out.sum(),
            n_correct=correct.sum(),
            reward_correct=out[correct].sum(),
            reward_wrong=out[~correct].sum(),
        )
        return out

    def metrics(self):
        m = self._m
        n_wrong = m.sums.get("n", 0.0) - m.sums.get("n_correct", 0.0)
        return {
            "rlpr_reward_mean": m.ratio("reward", "n"),
            "rlpr_score_b": m.ratio("score_b", "n"),
            "rlpr_score_a": m.ratio("score_a", "n"),
            "rlpr_format": m.ratio("fmt", "n"),
            "rlpr_reward_correct": m.ratio("reward_correct", "n_correct"),
            "rlpr_reward_wrong": m.sums.get("reward_wrong", 0.0) / n_wrong if n_wrong else float("nan"),
            "rlpr_cached_problems": float(len(self.score_a)),
        }

    def state_dict(self):
        return {"score_a": dict(self.score_a)}

    def load_state_dict(self, state):
        self.score_a = {str(k): float(v) for k, v in state["score_a"].items()}


class StdFilterHook(Hook):
    """RLPR's reward-std filter (`fused_rlvr.rlpr.StdFilter`): a group is kept when the std of its rewards
    is >= beta * EMA(mean std); every candidate's std (kept or not, refills included) is recorded and folded
    into the EMA at the start of the next training step, as the authors' trainer does. The threshold is 0
    during the first step (every group kept)."""

    name = "std_filter"

    def __init__(self, beta: float = 0.5, ema: float = 0.99):
        self.filter = StdFilter(beta, ema)
        self.last_step: Optional[int] = None  # the training step whose stds are pending
        self._m = PerStep()

    def keep_groups(self, ctx, batch):
        if self.last_step != ctx.step:
            if self.last_step is not None:
                self.filter.step()
            self.last_step = ctx.step
        keep = torch.zeros(batch.n_groups, dtype=torch.bool)
        if batch.n_groups:
            keep[batch.group] = self.filter.keep(batch.rewards, batch.group)
        self._m.at(ctx.step).add(candidates=batch.n_groups, kept=keep.sum())
        return keep

    def metrics(self):
        return {
            "std_filter_threshold": self.filter.threshold,
            "std_filter_keep_rate": self._m.ratio("kept", "candidates"),
            "std_filter_candidates": self._m.sums.get("candidates", 0.0),
        }

    def state_dict(self):
        return {"filter": self.filter.state_dict(), "last_step": self.last_step}

    def load_state_dict(self, state):
        self.filter.load_state_dict(state["filter"])
        self.last_step = state["last_step"]
