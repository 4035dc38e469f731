"""The seed papers' methods as trainer hooks (docs/methods.md, section 5), built from the config:

- reward="rlpr" -> RLPRReward: verifier-free reward, the policy's mean probability of the reference answer
  spliced in place of the generated one, debiased by the initial policy's no-reasoning score (cached per
  problem), mixed with a format reward;
- rlpr_std_filter -> StdFilterHook: RLPR's reward-std filter (the trainer refills the dropped groups);
- rank_shaping -> RankShapingHook: VERL, the effective rank / ERV / ERA of the responses' final hidden states
  shape the advantages against moving means;
- guidance="grpo" | "dpo" -> GuidanceHook: Agent-RLVR, failed prompts are re-attempted with the verifier's
  feedback and a plan hint; the guided samples join the group (scored under the unguided prompt) or feed a
  DPO loss.

`build_hooks(trainer)` makes them; Trainer.__init__ appends them after the caller's hooks. Every policy score
here is the fused op on last hidden states and the lm-head weight: no [tokens x vocab] logits.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from itertools import cycle
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import torch

from fused_rlvr.dpo import linear_dpo_loss
from fused_rlvr.effective_rank import EffectiveRankShaper, erv_era
from fused_rlvr.integrations.hf import last_hidden_states, sequence_token_stats
from fused_rlvr.rlpr import StdFilter, rlpr_reward, rlpr_score, splice_answer
from fused_rlvr.train.hooks import Hook, RolloutRequest

if TYPE_CHECKING:  # pragma: no cover
    from fused_rlvr.train.rollout import RolloutBatch
    from fused_rlvr.train.tasks import Problem
    from fused_rlvr.train.trainer import Trainer

_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_SIGNED_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_ARITHMETIC = re.compile(r"(\d+)\s*([-+*])\s*(\d+)")


class _PerStep:
    """Sums of metrics over every call a hook gets within one training step (refill rounds call the reward
    and filter hooks several times); starts afresh when the trainer's step changes."""

    def __init__(self):
        self.step: Optional[int] = None
        self.sums: dict[str, float] = {}

    def at(self, step: int) -> _PerStep:
        if step != self.step:
            self.step, self.sums = step, {}
        return self

    def add(self, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def ratio(self, num: str, den: str) -> float:
        d = self.sums.get(den, 0.0)
        return self.sums.get(num, 0.0) / d if d else float("nan")


# ---------------------------------------------------------------------------------------------------- RLPR
class SplicedAnswer(NamedTuple):
    input_ids: torch.Tensor  # [L] prompt + response up to the answer + reference answer tokens
    answer_mask: torch.Tensor  # [L] bool, True on the tokens that carry the reference answer's characters


def final_number_span(text: str, reference: str) -> Optional[tuple[int, int]]:
    """Character span of the last number in `text` (the arithmetic verifier's final answer), or None.

    A leading minus sign belongs to the number only when the reference answer is negative (so "83 - 27"
    keeps reading as a difference)."""
    pattern = _SIGNED_NUMBER if reference.strip().startswith("-") else _NUMBER
    last = None
    for m in pattern.finditer(text):
        last = m
    return None if last is None else last.span()


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


@torch.no_grad()
def answer_scores(trainer: Trainer, model, seqs: list[SplicedAnswer]) -> torch.Tensor:
    """rlpr_score (mean probability of the answer tokens) of each sequence under `model`, fp32 [n] on CPU.

    One no-grad fused pass per micro-batch; only answer tokens are scored (the others cost no vocabulary
    work). The distribution is the trainer's tempered one (cfg.temperature), as every other score."""
    out = []
    mb = trainer.cfg.micro_batch
    for s in range(0, len(seqs), mb):
        chunk = seqs[s : s + mb]
        t = max(len(x.input_ids) for x in chunk)
        ids = torch.full((len(chunk), t), trainer.pad_id, dtype=torch.long)
        attn = torch.zeros((len(chunk), t), dtype=torch.long)
        amask = torch.zeros((len(chunk), t), dtype=torch.long)
        for j, x in enumerate(chunk):
            n = len(x.input_ids)
            ids[j, :n], attn[j, :n], amask[j, :n] = x.input_ids, 1, x.answer_mask.long()
        dev = trainer.device
        st = sequence_token_stats(
            model,
            ids.to(dev),
            attn.to(dev),
            amask.to(dev),
            temperature=trainer.cfg.temperature,
            return_entropy=False,
            backend=trainer.cfg.backend,
        )
        out.append(rlpr_score(st.logprobs.float(), amask[:, 1:].to(dev)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _problem_key(p: Problem) -> str:
    return f"{p.question}\x1f{p.answer}"


class RLPRReward(Hook):
    """reward = w * max(0, scoreB - scoreA) + (1 - w) * format (authors: w = 0.9).

    scoreB: the policy's (no-grad, fused) mean probability of the reference answer's tokens, spliced in
    place of the response's final number (`splice_reference`); 0 when the response has no number.
    scoreA: the same statistic with no reasoning (`no_reasoning_sequence`) under the INITIAL policy,
    computed the first time a problem is seen and cached per problem (part of the checkpoint). The initial
    policy is the trainer's frozen reference model when there is one (beta > 0), else a frozen copy made
    when the trainer is built (the model is rebuilt from the config before a resume loads the trained
    weights, so a resumed run scores new problems with the same initial policy).
    format: 1 when the response has a parsable final number.
    """

    name = "rlpr"

    def __init__(self, initial_model, weight: float = 0.9):
        self.initial = initial_model
        self.weight = float(weight)
        self.score_a: dict[str, float] = {}
        self.last: dict[str, torch.Tensor] = {}
        self._m = _PerStep()

    def _cache_score_a(self, trainer: Trainer, batch: RolloutBatch) -> None:
        todo = {}
        for g, p in enumerate(batch.problems):
            key = _problem_key(p)
            if key not in self.score_a and key not in todo:
                todo[key] = no_reasoning_sequence(trainer.tok, batch.prompt_ids[g], p.answer)
        if todo:
            scores = answer_scores(trainer, self.initial, list(todo.values()))
            self.score_a.update({k: float(v) for k, v in zip(todo, scores)})

    def rewards(self, trainer, batch, rewards):
        self._cache_score_a(trainer, batch)
        splices = [
            splice_reference(
                trainer.tok,
                batch.prompt_ids[int(g)],
                batch.response_ids[i],
                batch.problems[int(g)].answer,
            )
            for i, g in enumerate(batch.group.tolist())
        ]
        parsed = torch.tensor([s is not None for s in splices], dtype=torch.bool)
        score_b = torch.zeros(len(batch))
        if bool(parsed.any()):
            score_b[parsed] = answer_scores(trainer, trainer.model, [s for s in splices if s is not None])
        score_a = torch.tensor([self.score_a[_problem_key(batch.problems[int(g)])] for g in batch.group])
        out = rlpr_reward(score_b, score_a, parsed, w=self.weight)
        self.last = {"score_b": score_b, "score_a": score_a, "format": parsed.float(), "reward": out}
        correct = rewards > 0.5
        self._m.at(trainer.step).add(
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
        self._m = _PerStep()

    def keep_groups(self, trainer, batch):
        if self.last_step != trainer.step:
            if self.last_step is not None:
                self.filter.step()
            self.last_step = trainer.step
        keep = torch.zeros(batch.n_groups, dtype=torch.bool)
        if batch.n_groups:
            keep[batch.group] = self.filter.keep(batch.rewards, batch.group)
        self._m.at(trainer.step).add(candidates=batch.n_groups, kept=keep.sum())
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


# ---------------------------------------------------------------------------------------------------- VERL
@torch.no_grad()
def response_hidden_states(
    trainer: Trainer, batch: RolloutBatch, max_tokens: int = 512
) -> list[torch.Tensor]:
    """Each response's final hidden states, fp32 [T_i, d] on CPU, the last `max_tokens` of them.

    These are the rows the fused op receives for the response: hidden[:, :-1] at the positions that predict
    the response tokens (the last prompt position through the second-to-last response token), from one
    no-grad pass of the policy's body (`last_hidden_states`, final norm applied) per micro-batch."""
    out = []
    mb = trainer.cfg.micro_batch
    rows = torch.arange(len(batch))
    for s in range(0, len(batch), mb):
        r = rows[s : s + mb]
        enc = batch.pack(r, trainer.pad_id, trainer.device)
        h = last_hidden_states(trainer.model, enc["input_ids"], enc["attention_mask"])[:, :-1]
        m = enc["response_mask"][:, 1:].bool()
        out += [h[j][m[j]][-max_tokens:].float().cpu() for j in range(len(r))]
    return out


class RankShapingHook(Hook):
    """VERL advantage shaping: per response, (ER, ERV, ERA) of its final hidden states (`erv_era`: last 512
    tokens, prefixes every 40 tokens, ERV = ERA = 0 below 80 tokens) go through `EffectiveRankShaper`
    (moving means, A' = A + min(relu(aux), |A| / 2)); the shaper's moving statistics are checkpointed."""

    name = "rank_shaping"

    def __init__(self, max_tokens: int = 512, **shaper_kwargs: Any):
        self.max_tokens = max_tokens
        self.shaper = EffectiveRankShaper(**shaper_kwargs)
        self._last: dict[str, float] = {}

    def rank_dynamics(self, trainer, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dyn = [
            erv_era(h, max_tokens=self.max_tokens)
            for h in response_hidden_states(trainer, batch, self.max_tokens)
        ]
        return tuple(torch.tensor([d[i] for d in dyn], dtype=torch.float32) for i in range(3))

    def advantages(self, trainer, batch, adv):
        er, erv, era = self.rank_dynamics(trainer, batch)
        out, st = self.shaper(adv, er.to(adv.device), erv.to(adv.device), era.to(adv.device))
        bonus = (out - adv).float()
        self._last = {
            "er_mean": float(er.mean()),
            "erv_mean": float(erv.mean()),
            "era_mean": float(era.mean()),
            "rank_bonus_mean": float(bonus.mean()),
            "rank_shaped_frac": float((bonus != 0).float().mean()),
        }
        return out

    def metrics(self):
        return dict(self._last)

    def state_dict(self):
        return {"shaper": self.shaper.state_dict()}

    def load_state_dict(self, state):
        self.shaper.load_state_dict(state["shaper"])


# ---------------------------------------------------------------------------------------------- Agent-RLVR
def plan_hint(question: str) -> Optional[str]:
    """A plan for an "a op b" question that breaks it into easier steps and leaves the last one to the
    model: it never states the final answer (guidance, not the solution).

        "What is 47 + 25?" -> "Plan: 47 + 25 = (47 + 20) + 5. First 47 + 20 = 67; then add 5."
        "What is 7 * 8?"   -> "Plan: 7 * 8 = 7 * 7 + 7. First 7 * 7 = 49; then add 7."

    Returns None when the question holds no such expression (e.g. a JSONL task): then only the verifier's
    feedback guides. The hint is built from the question alone, as a tutor or a tool could without knowing
    the reference answer; if a partial result happened to equal the answer, a generic hint is used."""
    m = _ARITHMETIC.search(question)
    if m is None:
        return None
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    if op == "*":
        answer = a * b
        hint = f"Plan: {a} * {b} = {a} * {b - 1} + {a}. First {a} * {b - 1} = {a * (b - 1)}; then add {a}."
    else:
        sign = 1 if op == "+" else -1
        answer = a + sign * b
        verb = "add" if op == "+" else "take away"
        if b <= 1:
            where = "after" if op == "+" else "before"
            hint = f"Plan: {a} {op} {b} is the number {b} step {where} {a}." if b else None
        else:
            b1 = (b // 10) * 10 if b >= 10 and b % 10 else b // 2
            hint = (
                f"Plan: {a} {op} {b} = ({a} {op} {b1}) {op} {b - b1}. First {a} {op} {b1} = {a + sign * b1}; "
                f"then {verb} {b - b1}."
            )
    given = set(_NUMBER.findall(question))
    if hint is None or str(answer) in set(_NUMBER.findall(hint)) - given:
        return "Plan: work it out one small step at a time and check each step."
    return hint


def feedback(verifier, failed_texts: list[str]) -> str:
    """What the verifier can say about failed attempts: the most common wrong final answer, or that none
    was given (never the reference)."""
    answers = [a for a in (verifier.final_answer(t) for t in failed_texts) if a is not None]
    if not answers:
        return "Your previous attempt did not end with a final number."
    wrong = Counter(answers).most_common(1)[0][0]
    return f"Your previous answer, {wrong}, is wrong."


class _Pairs(NamedTuple):
    batch: RolloutBatch
    chosen: torch.Tensor  # rows
    rejected: torch.Tensor
    ref_chosen: torch.Tensor  # pre-update policy's sequence log-probs of the rows, fp32
    ref_rejected: torch.Tensor


class GuidanceHook(Hook):
    """Agent-RLVR guidance: a group whose samples all failed gets `samples` more, generated from a guided
    prompt (the question, the verifier's feedback on the failed attempts, a plan hint unless hint=False,
    the usual suffix; `guided_prompt`) and tagged "guided". They join the group under its own, unguided
    prompt: the trainer packs and scores every sample with the group's prompt, so the policy learns to
    produce the guided answer without the guidance.

    mode="grpo": the guided samples are ordinary group members (verified, in the group baseline).
    mode="dpo": the groups that received guidance leave the policy-gradient loss (their advantages are set
    to 0: unguided, such a group had no signal anyway) and a DPO loss is added instead, on fused sequence
    log-probs under the unguided prompt: each guided success (chosen) is paired with a failed sample of the
    same group (rejected; the unguided failures, cycled), the reference being the pre-update policy's
    sequence log-probs taken before the first optimizer step of the batch. loss = coef * dpo_loss.
    Success is the task verifier's outcome (whatever reward hooks do afterwards).
    """

    name = "guidance"

    def __init__(
        self, mode: str = "grpo", samples: int = 4, beta: float = 0.1, coef: float = 1.0, hint: bool = True
    ):
        if mode not in ("grpo", "dpo"):
            raise ValueError(f"guidance mode must be 'grpo' or 'dpo', got {mode!r}")
        self.mode, self.samples, self.beta, self.coef = mode, int(samples), float(beta), float(coef)
        self.hint = bool(hint)
        self._pairs: Optional[_Pairs] = None
        self._m = _PerStep()
        self._dpo: dict[str, float] = {}

    def guided_prompt(self, trainer: Trainer, batch: RolloutBatch, g: int) -> str:
        p = batch.problems[g]
        texts = [batch.texts[int(i)] for i in batch.group_rows(g)]
        parts = [p.question, feedback(trainer.verifier, texts)]
        hint = plan_hint(p.question) if self.hint else None
        if hint:
            parts.append(hint)
        return "\n".join(parts) + trainer.cfg.prompt_suffix

    def extra_rollouts(self, trainer, batch):
        out = []
        for g in range(batch.n_groups):
            if not bool((batch.rewards[batch.group_rows(g)] > 0.5).any()):
                out.append(RolloutRequest(g, self.samples, self.guided_prompt(trainer, batch, g), "guided"))
        self._m.at(trainer.step).add(groups=batch.n_groups, guided_groups=len(out))
        return out

    def rewards(self, trainer, batch, rewards):
        rows = [i for i, t in enumerate(batch.tags) if t == "guided"]
        if rows:
            self._m.at(trainer.step).add(guided=len(rows), guided_ok=trainer._verify(batch, rows).sum())
        return rewards

    def pairs(self, trainer: Trainer, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen rows, rejected rows) of the DPO pairs in `batch` (see the class docstring)."""
        chosen, rejected = [], []
        guided = torch.tensor([t == "guided" for t in batch.tags], dtype=torch.bool)
        for g in sorted(set(batch.group[guided].tolist())):
            rows = batch.group_rows(g)
            ok = trainer._verify(batch, rows.tolist()) > 0.5
            good = rows[guided[rows] & ok].tolist()
            bad = rows[~guided[rows] & ~ok].tolist() or rows[guided[rows] & ~ok].tolist()
            if good and bad:
                chosen += good
                rejected += [r for r, _ in zip(cycle(bad), good)]
        return torch.tensor(chosen, dtype=torch.long), torch.tensor(rejected, dtype=torch.long)

    def _prepare(self, trainer: Trainer, batch: RolloutBatch) -> _Pairs:
        if self._pairs is None or self._pairs.batch is not batch:
            chosen, rejected = self.pairs(trainer, batch)
            ref = [lp.sum() for lp in trainer.score(batch, torch.cat([chosen, rejected]))[0]]
            ref = torch.stack(ref) if ref else torch.zeros(0)
            self._pairs = _Pairs(batch, chosen, rejected, ref[: len(chosen)], ref[len(chosen) :])
        return self._pairs

    def advantages(self, trainer, batch, adv):
        if self.mode != "dpo":
            return adv
        guided_groups = batch.group[torch.tensor([t == "guided" for t in batch.tags], dtype=torch.bool)]
        adv = adv.clone()
        adv[torch.isin(batch.group, guided_groups).to(adv.device)] = 0.0
        self._prepare(trainer, batch)  # reference log-probs: the policy before this batch's update
        return adv

    def extra_loss(self, trainer, batch):
        if self.mode != "dpo":
            return None
        pr = self._prepare(trainer, batch)
        if len(pr.chosen) == 0:
            self._dpo = {"dpo_pairs": 0.0}
            return None
        rows = torch.cat([pr.chosen, pr.rejected])
        enc = batch.pack(rows, trainer.pad_id, trainer.device)
        head = trainer.head
        hidden = last_hidden_states(trainer.model, enc["input_ids"], enc["attention_mask"])[:, :-1]
        if hidden.dtype != head.weight.dtype:
            hidden = hidden.to(head.weight.dtype)
        loss, st = linear_dpo_loss(
            hidden,
            head.weight,
            enc["input_ids"][:, 1:],
            enc["response_mask"][:, 1:],
            torch.cat([pr.ref_chosen, pr.ref_rejected]).to(trainer.device),
            beta=self.beta,
            bias=head.bias,
            temperature=trainer.cfg.temperature,
            softcap=head.softcap,
            backend=trainer.cfg.backend,
        )
        self._dpo = {
            "dpo_loss": float(st.loss),
            "dpo_pairs": float(st.n_pairs),
            "dpo_accuracy": float(st.accuracy),
            "dpo_margin": float(st.reward_margin),
        }
        return self.coef * loss

    def metrics(self):
        m = self._m
        out = {
            "guided_groups": m.sums.get("guided_groups", 0.0),
            "guided_group_frac": m.ratio("guided_groups", "groups"),
            "guided_samples": m.sums.get("guided", 0.0),
            "guided_success_rate": m.ratio("guided_ok", "guided"),
        }
        if self.mode == "dpo":
            out.update(self._dpo)
        return out


def build_hooks(trainer: Trainer) -> list[Hook]:
    """The hooks the config asks for, in the order they run: guidance (extra rollouts, verified), RLPR
    (replaces the rewards), the std filter (on the final rewards), rank shaping (on the advantages)."""
    c = trainer.cfg
    hooks: list[Hook] = []
    if c.guidance:
        hooks.append(GuidanceHook(c.guidance, c.guidance_samples, c.dpo_beta, c.dpo_coef, c.guidance_hint))
    if c.reward == "rlpr":
        initial = trainer.ref_model
        if initial is None:
            initial = copy.deepcopy(trainer.model).eval().requires_grad_(False)
        hooks.append(RLPRReward(initial, c.rlpr_weight))
    if c.rlpr_std_filter:
        hooks.append(StdFilterHook(c.rlpr_std_beta, c.rlpr_std_ema))
    if c.rank_shaping:
        hooks.append(RankShapingHook())
    return hooks
