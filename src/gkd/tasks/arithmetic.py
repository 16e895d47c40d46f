"""``arithmetic``: multi-step sums with a written chain of thought, a stand-in for GSM8K.

One digit per token, so the model must carry digits itself::

    prompt      4 7 + 1 8 + 2 5 =
    completion  4 7 + 1 8 = 6 5 ; 6 5 + 2 5 = 9 0 ; #### 9 0

The first step adds two of the terms, every later step adds one more term to the running sum, and ``####``
introduces the final answer (GSM8K's marker, so :func:`gkd.metrics.final_answer` scores both). Several chains are
valid for each problem: the order in which the terms are added (any permutation) and, from the second step on,
whether the running sum is written first or second. With 3 terms that is 3! x 2 = 12 chains. Each record draws one
at random, so the teacher's distribution over chains is multi-modal, as in the GKD paper's CoT experiments.

Unlike the salient-set task, a wrong digit here usually dooms the final answer (errors compound). The toy-scale
notes found that plain SFT is hard to beat on such tasks at this scale; :func:`step_accuracy` gives the per-step
error profile (the exposure-bias probe of experiment E1).

Splits hash the *multiset* of terms, so ``47+18+25`` and ``18+25+47`` always land in the same split.

Metrics: ``final_answer`` (headline, exact match of the number after ``####``; per example
:func:`gkd.metrics.final_answer_score`) and ``chain_valid`` (the whole output is a valid chain for the problem:
correct, legal steps in the exact format, and the right answer; per example :func:`chain_valid_score`). The prompt is
read with :func:`gkd.metrics.prompt_text_of`, so every record format works.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass

from gkd import metrics as M
from gkd.tasks.base import TASK_STUDENT, TASK_TEACHER, Task

MARKER = "####"
PLUS, EQUALS, SEP = "+", "=", ";"
DIGITS = [str(i) for i in range(10)]

__all__ = [
    "ArithmeticCoT",
    "all_chains",
    "chain_valid",
    "chain_valid_score",
    "format_chain",
    "parse_prompt",
    "step_accuracy",
]


def _spell(n: int) -> str:
    return " ".join(str(n))


def _number(tokens: list[str]) -> int | None:
    """An integer written one digit per token, without leading zeros; ``None`` if malformed."""
    if not tokens or not all(t in DIGITS for t in tokens) or (tokens[0] == "0" and len(tokens) > 1):
        return None
    return int("".join(tokens))


def parse_prompt(prompt: str) -> list[int]:
    """The terms of a prompt ``a a + b b + c c =``."""
    toks = prompt.split()
    if not toks or toks[-1] != EQUALS:
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    groups = [list(g) for is_plus, g in itertools.groupby(toks[:-1], lambda t: t == PLUS) if not is_plus]
    terms = [_number(g) for g in groups]
    if len(terms) < 2 or any(t is None for t in terms):
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    return terms  # type: ignore[return-value]


def format_chain(order: list[int], running_first: list[bool]) -> str:
    """The chain adding ``order`` left to right; ``running_first[j]`` puts the running sum first in step j+2."""
    total = order[0] + order[1]
    steps = [f"{_spell(order[0])} {PLUS} {_spell(order[1])} {EQUALS} {_spell(total)} {SEP}"]
    for term, first in zip(order[2:], running_first):
        a, b = (total, term) if first else (term, total)
        total += term
        steps.append(f"{_spell(a)} {PLUS} {_spell(b)} {EQUALS} {_spell(total)} {SEP}")
    return " ".join([*steps, MARKER, _spell(total)])


def all_chains(terms: list[int]) -> list[str]:
    """Every valid chain for a problem, sorted (n! x 2^(n-2) of them, fewer when terms repeat)."""
    chains = set()
    for order in itertools.permutations(terms):
        for flags in itertools.product([True, False], repeat=len(terms) - 2):
            chains.add(format_chain(list(order), list(flags)))
    return sorted(chains)


def _parse_step(tokens: list[str]) -> tuple[int, int, int] | None:
    if tokens.count(PLUS) != 1 or tokens.count(EQUALS) != 1:
        return None
    i, j = tokens.index(PLUS), tokens.index(EQUALS)
    if not i < j:
        return None
    a, b, c = _number(tokens[:i]), _number(tokens[i + 1 : j]), _number(tokens[j + 1 :])
    return None if a is None or b is None or c is None else (a, b, c)


def _check_steps(terms: list[int], prediction: str) -> tuple[list[bool], bool]:
    """Per-step correctness and overall validity of a predicted chain.

    A step is correct when it is well formed, its sum is right and its operands are legal: two unused terms for the
    first step, then the model's *own* previous result plus one unused term (so a step after a mistake can still be
    locally correct). The chain is valid when every step is correct, all terms are used, the answer after ``####``
    is the true sum, and the text is exactly in the task's format.
    """
    text = M.normalize_whitespace(prediction)
    head, marker, tail = text.partition(MARKER)
    segments = [seg.split() for seg in head.split(SEP)]
    if segments and not segments[-1]:
        segments.pop()  # the empty piece after the last ";"
    unused = Counter(terms)
    running: int | None = None
    ok: list[bool] = []
    for j, seg in enumerate(segments):
        step = _parse_step(seg)
        if step is None:
            ok.append(False)
            continue
        a, b, c = step
        if j == 0:
            legal = unused[a] > 0 and unused[b] > (a == b)
            used = [a, b]
        elif a == running and unused[b] > 0:
            legal, used = True, [b]
        elif b == running and unused[a] > 0:
            legal, used = True, [a]
        else:
            legal, used = False, []
        if legal:
            unused.subtract(used)
        ok.append(legal and a + b == c)
        running = c
    answer = _number(tail.split()) if marker else None
    valid = (
        len(ok) == len(terms) - 1
        and all(ok)
        and answer == sum(terms)
        and head.endswith(SEP + " ")
        and text.count(MARKER) == 1
        and all(_parse_step(seg) is not None for seg in segments)
    )
    return ok, valid


def chain_valid_score(record: dict, prediction: str) -> float:
    """1.0 if the prediction is a valid chain for the record's problem, else 0.0."""
    return float(_check_steps(parse_prompt(M.prompt_text_of(record)), prediction)[1])


def chain_valid(predictions: list[str], records: list[dict]) -> float:
    """Percent of predictions that are a fully valid chain (see :func:`chain_valid_score`)."""
    M.check_inputs(predictions, records)
    return 100.0 * sum(chain_valid_score(r, p) for p, r in zip(predictions, records)) / len(predictions)


def step_accuracy(records: list[dict], predictions: list[str]) -> list[float]:
    """Percent of predictions whose j-th step is present and correct, for each step position j (E1's probe)."""
    M.check_inputs(predictions, records)
    n_steps = max(len(parse_prompt(M.prompt_text_of(r))) - 1 for r in records)
    hits = [0] * n_steps
    for pred, rec in zip(predictions, records):
        ok, _ = _check_steps(parse_prompt(M.prompt_text_of(rec)), pred)
        for j, good in enumerate(ok[:n_steps]):
            hits[j] += good
    return [100.0 * h / len(predictions) for h in hits]


@dataclass
class ArithmeticCoT(Task):
    """Sums of ``n_terms`` numbers of ``digits`` digits with a written chain of thought.

    Args:
        n_terms: numbers to add (>= 2).
        digits: digits per term (terms are uniform on [10^(d-1), 10^d - 1], or [0, 9] for d = 1).
        max_references: cap on the number of valid chains stored as references (completion first).
    """

    n_terms: int = 3
    digits: int = 2
    max_references: int = 16

    name = "arithmetic"
    metric = "final_answer"
    metrics = ["final_answer", "chain_valid"]  # noqa: RUF012

    def __post_init__(self) -> None:
        if self.n_terms < 2 or self.digits < 1 or self.max_references < 1:
            raise ValueError("need n_terms >= 2, digits >= 1 and max_references >= 1")

    # ---- data

    def sample_prompt(self, rng: random.Random) -> str:
        lo, hi = (0 if self.digits == 1 else 10 ** (self.digits - 1)), 10**self.digits - 1
        terms = [rng.randint(lo, hi) for _ in range(self.n_terms)]
        return f" {PLUS} ".join(_spell(t) for t in terms) + f" {EQUALS}"

    def split_key(self, prompt: str) -> str:
        return "+".join(str(t) for t in sorted(parse_prompt(prompt)))

    def sample_completion(self, prompt: str, rng: random.Random) -> str:
        """A random chain: a random order of the terms and a random operand order in each later step."""
        terms = parse_prompt(prompt)
        order = rng.sample(terms, len(terms))
        return format_chain(order, [rng.random() < 0.5 for _ in range(len(terms) - 2)])

    def references(self, prompt: str, completion: str, rng: random.Random) -> list[str]:
        others = [c for c in all_chains(parse_prompt(prompt)) if c != completion]
        rng.shuffle(others)
        return [completion, *others[: self.max_references - 1]]

    def vocabulary(self) -> list[str]:
        return [*DIGITS, PLUS, EQUALS, SEP, MARKER]

    def metric_fns(self) -> dict:
        return {"chain_valid": chain_valid}

    def example_fns(self) -> dict:
        """Per-example forms ``(record, prediction) -> [0, 1]`` of :meth:`metric_fns` (the RL rewards)."""
        return {"chain_valid": chain_valid_score}

    # ---- sizes

    @property
    def max_prompt_tokens(self) -> int:
        return self.n_terms * self.digits + self.n_terms

    @property
    def max_completion_tokens(self) -> int:
        top = 10**self.digits - 1
        n = len(str(2 * top)) + 2 * self.digits + 3  # first step: "a + b = c ;"
        for j in range(2, self.n_terms):
            n += len(str(j * top)) + self.digits + len(str((j + 1) * top)) + 3
        return n + 1 + len(str(self.n_terms * top))  # "#### answer"

    def teacher_model_config(self) -> dict:
        return {**TASK_TEACHER, "vocab_size": self.vocab_size}

    def student_model_config(self) -> dict:
        return {**TASK_STUDENT, "vocab_size": self.vocab_size}
