"""Verifiable tasks: the built-in arithmetic generator, JSONL datasets, the math-verify checker, and the
task-text helpers the method hooks read (the final number of a response, a plan hint for a question, the
verifier's feedback on failed attempts).

A task gives a fixed held-out list and an endless, seeded, resumable stream of training problems (the
stream's position is part of every checkpoint). Answers are checked with `math-verify` (the last number or
boxed expression of a response against the reference).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from fused_rlvr.train.config import ConfigError


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str


class ArithmeticTask:
    """Single-digit sums and products plus two-digit sums and differences, generated from a seed.

    The mix is picked so SmolLM2-135M-Instruct starts between 10% and 70% held-out accuracy (measured: about
    a third when forced to answer directly, much less when it starts explaining and runs out of tokens). The
    held-out set is the first `n_heldout` distinct problems of a separate seed; training problems are drawn
    from the same distribution with the held-out ones excluded. `eval_problems` (e.g. a JSONL file's)
    replace the held-out list; training still excludes the generated held-out problems.
    """

    name = "arithmetic"

    def __init__(self, seed: int = 0, n_heldout: int = 200, eval_problems: Optional[list[Problem]] = None):
        self.seed = seed
        self._heldout = []
        rng = random.Random(10_000 + seed)
        seen = set()
        while len(self._heldout) < n_heldout:
            p = self._draw(rng)
            if p.question not in seen:
                seen.add(p.question)
                self._heldout.append(p)
        self._heldout_questions = seen
        if eval_problems is not None:
            self._heldout = list(eval_problems)

    @staticmethod
    def _draw(rng: random.Random) -> Problem:
        kind = rng.randrange(4)
        if kind == 0:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            q, ans = f"{a} + {b}", a + b
        elif kind == 1:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            q, ans = f"{a} * {b}", a * b
        elif kind == 2:
            a, b = rng.randint(10, 60), rng.randint(10, 39)
            q, ans = f"{a} + {b}", a + b
        else:
            a = rng.randint(20, 99)
            b = rng.randint(1, a - 10)
            q, ans = f"{a} - {b}", a - b
        return Problem(id=q, question=f"What is {q}?", answer=str(ans))

    def heldout(self) -> list[Problem]:
        return list(self._heldout)

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        out = []
        while len(out) < n:
            p = self._draw(rng)
            if p.question not in self._heldout_questions:
                out.append(p)
        return out


class JsonlTask:
    """Problems from a JSONL file, one object per line with string-able 'prompt' and 'answer' fields.

    Training samples are drawn (with reshuffling per pass) from the problems not in the held-out split; the
    held-out split is `eval_path`'s problems if given, else the last `n_heldout` lines of the file.
    """

    name = "jsonl"

    def __init__(self, path: str, n_heldout: int = 200, eval_path: Optional[str] = None):
        problems = load_jsonl(path)
        if eval_path:
            self._heldout = load_jsonl(eval_path)[:n_heldout] if n_heldout else []
            self._train = problems
        else:
            if len(problems) <= n_heldout:
                raise ValueError(
                    f"dataset {path!r} has {len(problems)} problems; the held-out split needs "
                    f"n_eval={n_heldout} of them plus at least one to train on (set --n-eval "
                    f"or --eval-task)"
                )
            cut = len(problems) - n_heldout
            self._train, self._heldout = problems[:cut], problems[cut:]
        if not self._train:
            raise ValueError(f"dataset {path!r} has no training problems")

    def heldout(self) -> list[Problem]:
        return list(self._heldout)

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        return [self._train[rng.randrange(len(self._train))] for _ in range(n)]


def load_jsonl(path: str) -> list[Problem]:
    """The problems of a JSONL file (one {"prompt", "answer"[, "id"]} object a line); a file that is
    missing, unreadable or not UTF-8, and a bad line, are one-line errors naming the file (and line)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset file {path!r} does not exist")
    try:
        return _read_jsonl(path)
    except UnicodeDecodeError:  # (the decoder's offset is within a chunk: find the line in the raw bytes)
        with open(path, "rb") as fh:
            raw = fh.read()
        try:
            raw.decode("utf-8")
            where, why = "", "invalid UTF-8"
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            where, why = f":{line}", e.reason
        raise ConfigError(f"{path}{where}: dataset file is not UTF-8 text ({why})") from None
    except OSError as e:
        raise ConfigError(f"dataset file {path!r} cannot be read: {e.strerror or e}") from None


def _read_jsonl(path: str) -> list[Problem]:
    problems = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with 'prompt' and 'answer'")
            missing = [k for k in ("prompt", "answer") if k not in obj]
            if missing:
                raise ValueError(
                    f"{path}:{lineno}: missing field(s) {missing}; each line needs 'prompt' and 'answer'"
                )
            prompt, answer = obj["prompt"], obj["answer"]
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{path}:{lineno}: 'prompt' must be a non-empty string")
            if not isinstance(answer, (str, int, float)) or isinstance(answer, bool) or str(answer) == "":
                raise ValueError(f"{path}:{lineno}: 'answer' must be a non-empty string or number")
            problems.append(
                Problem(id=str(obj.get("id", f"line{lineno}")), question=prompt, answer=str(answer))
            )
    if not problems:
        raise ValueError(f"dataset file {path!r} holds no problems")
    return problems


def make_task(task: str, n_heldout: int, seed: int, eval_path: Optional[str] = None):
    if task == "arithmetic":
        eval_problems = load_jsonl(eval_path)[:n_heldout] if eval_path else None
        return ArithmeticTask(seed=seed, n_heldout=n_heldout, eval_problems=eval_problems)
    if task.endswith(".jsonl") or os.path.exists(task):
        return JsonlTask(task, n_heldout=n_heldout, eval_path=eval_path)
    raise ValueError(
        f"config field 'task' must be 'arithmetic' or a path to a JSONL file, got {task!r} (no such file)"
    )


_NUMBER = re.compile(r"\s*[-+]?\d+(?:\.\d+)?\s*")
_LITERAL = re.compile(r"\s*[-+]?\d+(?:\.\d+)?(?:\s*/\s*\d+)?\s*")  # a number or a fraction a/b


class Verifier:
    """reward(response, answer) in {0, 1}: math-verify's comparison of the response's final answer.

    When the reference answer is a plain number, the response's final answer must be a number too:
    math-verify evaluates expressions, so without this rule "To find 25 - 10, we need" scores as 15 -- a
    policy learns to restate the question within a few steps (seen on the built-in task).
    """

    def __init__(self):
        try:
            from math_verify import parse, verify
        except ImportError:
            raise ImportError(
                "the trainer checks answers with math-verify: pip install 'fused-rlvr[train]' "
                "(or pip install math-verify)"
            ) from None
        self._parse, self._verify = parse, verify
        self._gold: dict[str, object] = {}

    def final_answer(self, response: str) -> Optional[str]:
        parsed = self._parse(response)
        return str(parsed[-1]) if parsed else None

    def __call__(self, response: str, answer: str) -> float:
        gold = self._gold.get(answer)
        if gold is None:
            gold = self._gold[answer] = self._parse(answer)
        try:
            pred = self._parse(response)
            if not pred:
                return 0.0
            if _NUMBER.fullmatch(answer) and not _LITERAL.fullmatch(str(pred[-1])):
                return 0.0
            return float(bool(self._verify(gold, pred)))
        except Exception:  # math-verify raises on exotic expressions; an unverifiable answer scores 0
            return 0.0


# ------------------------------------------------------------------------------------------ task text helpers
_UNSIGNED = re.compile(r"\d+(?:\.\d+)?")
_SIGNED = re.compile(r"-?\d+(?:\.\d+)?")
_EXPRESSION = re.compile(r"(\d+)\s*([-+*])\s*(\d+)")


def final_number_span(text: str, reference: str) -> Optional[tuple[int, int]]:
    """Character span of the last number in `text` (the arithmetic verifier's final answer), or None.

    A leading minus sign belongs to the number only when the reference answer is negative (so "83 - 27"
    keeps reading as a difference)."""
    pattern = _SIGNED if reference.strip().startswith("-") else _UNSIGNED
    last = None
    for m in pattern.finditer(text):
        last = m
    return None if last is None else last.span()


def plan_hint(question: str) -> Optional[str]:
    """A plan for an "a op b" question that breaks it into easier steps and leaves the last one to the
    model: it never states the final answer (guidance, not the solution).

        "What is 47 + 25?" -> "Plan: 47 + 25 = (47 + 20) + 5. First 47 + 20 = 67; then add 5."
        "What is 7 * 8?"   -> "Plan: 7 * 8 = 7 * 7 + 7. First 7 * 7 = 49; then add 7."

    Returns None when the question holds no such expression (e.g. a JSONL task): then only the verifier's
    feedback guides. The hint is built from the question alone, as a tutor or a tool could without knowing
    the reference answer; if a partial result happened to equal the answer, a generic hint is used."""
    m = _EXPRESSION.search(question)
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
    given = set(_UNSIGNED.findall(question))
    if hint is None or str(answer) in set(_UNSIGNED.findall(hint)) - given:
        return "Plan: work it out one small step at a time and check each step."
    return hint


def verifier_feedback(verifier: Verifier, failed_texts: list[str]) -> str:
    """What the verifier can say about failed attempts: the most common wrong final answer, or that none
    was given (never the reference)."""
    answers = [a for a in (verifier.final_answer(t) for t in failed_texts) if a is not None]
    if not answers:
        return "Your previous attempt did not end with a final number."
    wrong = Counter(answers).most_common(1)[0][0]
    return f"Your previous answer, {wrong}, is wrong."
