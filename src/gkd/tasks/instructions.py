"""``instructions``: instruction-following over item lists, with held-out instructions (the paper's FLAN → MMLU/BBH).

The GKD paper's task-agnostic experiment distils a student on a *mixture* of instruction-formatted tasks and scores
it on tasks held out of that mixture. This task is that setting in miniature. An input lists ``n_items`` distinct
letters, each written in upper or lower case; the instruction names which items to list::

    prompt      upper late : b Q z K m d R a :
    completion  q r                                   (any order is valid; the trainer appends EOS)

An item has two attributes: its **case** (``upper`` / ``lower``) and its **half** of the alphabet (``early`` = a-m,
``late`` = n-z). The eight instructions are the four single filters (``upper``, ``lower``, ``early``, ``late``) and
the four pairs (``upper early``, ``upper late``, ``lower early``, ``lower late``, both conditions at once). The output
lists the selected items in lower case, in a fresh random order per record, as the ``summarization`` task does: its
task is this one's ``upper`` instruction. So every instruction is multi-modal and its errors are recoverable, the
regime where on-policy distillation has something to add (see the summarization module).

**Held out** (``held_out``, default ``upper late`` and ``lower early``): the training and validation splits never
contain those instructions; the test split draws them for ``held_out_share`` of its prompts. The held-out
instructions are new *combinations* of conditions the mixture teaches one at a time and in the other two pairs, so a
student can only solve them by composing what it learned. ``held_out=[]`` gives the full mixture (the experiment
trains its teacher on it: the stand-in for a teacher that, like the paper's FLAN-T5, knows more than the mixture).

Metrics (percent): ``set_match`` over every test prompt (headline), ``held_in`` and ``held_out`` (``set_match`` over
the prompts whose instruction is in / out of the mixture; NaN when there are none), ``held_out_f1`` (multiset F1 of
the output items against the selected set on the held-out prompts: partial credit, e.g. for applying one of the two
conditions) and ``item_f1`` (the same F1 on every prompt).
"""

from __future__ import annotations

import math
import random
import string
from collections import Counter
from dataclasses import dataclass, field

from gkd import metrics as M
from gkd.tasks.base import SPLITS, Task

__all__ = ["INSTRUCTIONS", "InstructionMixture", "instruction_of", "selected_items"]

LETTERS = list(string.ascii_lowercase)
SEP = ":"
# the attribute words and the filter each applies to an input item (a letter written in upper or lower case)
CONDITIONS = {
    "upper": str.isupper,
    "lower": str.islower,
    "early": lambda item: item.lower() <= "m",
    "late": lambda item: item.lower() > "m",
}
INSTRUCTIONS = (
    "upper",
    "lower",
    "early",
    "late",
    "upper early",
    "upper late",
    "lower early",
    "lower late",
)


def _parse(prompt: str) -> tuple[str, list[str]]:
    toks = prompt.split()
    if SEP not in toks or toks[-1] != SEP:
        raise ValueError(f"not an instructions prompt: {prompt!r}")
    i = toks.index(SEP)
    instruction = " ".join(toks[:i])
    if instruction not in INSTRUCTIONS:
        raise ValueError(f"not an instructions prompt (unknown instruction {instruction!r}): {prompt!r}")
    return instruction, toks[i + 1 : -1]


def instruction_of(record: dict) -> str:
    """The instruction of a record (any record format: the prompt is read with :func:`gkd.metrics.prompt_text_of`)."""
    return _parse(M.prompt_text_of(record))[0]


def selected_items(prompt: str) -> list[str]:
    """The items the prompt's instruction selects, lower-cased, in input order."""
    instruction, items = _parse(prompt)
    tests = [CONDITIONS[word] for word in instruction.split()]
    return [item.lower() for item in items if all(t(item) for t in tests)]


def _set_match_score(record: dict, prediction: str) -> float:
    return float(Counter(prediction.split()) == Counter(selected_items(M.prompt_text_of(record))))


def _item_f1_score(record: dict, prediction: str) -> float:
    pred, gold = Counter(prediction.split()), Counter(selected_items(M.prompt_text_of(record)))
    denom = sum(pred.values()) + sum(gold.values())
    return 1.0 if denom == 0 else 2.0 * sum((pred & gold).values()) / denom


def _mean(fn, predictions: list[str], records: list[dict]) -> float:
    if not records:
        return math.nan
    return 100.0 * sum(fn(r, p) for p, r in zip(predictions, records)) / len(records)


def _corpus(fn):
    def metric(predictions: list[str], records: list[dict]) -> float:
        M.check_inputs(predictions, records)
        return _mean(fn, predictions, records)

    return metric


@dataclass
class InstructionMixture(Task):
    """List the items of an input that an instruction selects, in any order; some instructions held out.

    Args:
        n_items: letters per input (distinct; each upper case with probability 1/2), at most 26.
        held_out: instructions never drawn for the train and validation splits (each one of :data:`INSTRUCTIONS`).
        held_out_share: share of test prompts drawn from ``held_out`` (the rest from the mixture).
        max_references: references per record: distinct orders of the selected items, the completion first.
    """

    n_items: int = 8
    held_out: list[str] = field(default_factory=lambda: ["upper late", "lower early"])
    held_out_share: float = 0.5
    max_references: int = 6

    name = "instructions"
    metric = "set_match"
    metrics = ["set_match", "held_in", "held_out", "held_out_f1", "item_f1"]  # noqa: RUF012
    # averages over a subset of the prompts, with no score for one example: reported by Task.score, but not metric
    # or reward names (gkd.scoring)
    report_only_metrics = ("held_in", "held_out", "held_out_f1")

    def __post_init__(self) -> None:
        if not 1 <= self.n_items <= len(LETTERS):
            raise ValueError("need 1 <= n_items <= 26")
        self.held_out = list(self.held_out)
        unknown = [h for h in self.held_out if h not in INSTRUCTIONS]
        if unknown:
            raise ValueError(f"unknown held-out instruction(s) {unknown}; valid: {', '.join(INSTRUCTIONS)}")
        if len(set(self.held_out)) == len(INSTRUCTIONS):
            raise ValueError("held_out names every instruction; the mixture would be empty")
        if not 0.0 <= self.held_out_share <= 1.0 or self.max_references < 1:
            raise ValueError("need 0 <= held_out_share <= 1 and max_references >= 1")
        self._split: str | None = None

    @property
    def mixture(self) -> list[str]:
        """The instructions of the training mixture."""
        return [i for i in INSTRUCTIONS if i not in self.held_out]

    # ---- data

    def generate(self, split: str, n: int, seed: int, *, unique: bool = True) -> list[dict]:
        """As :meth:`Task.generate`; the split decides which instructions are drawn (see the module docstring)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        self._split = split
        try:
            return super().generate(split, n, seed, unique=unique)
        finally:
            self._split = None

    def _instruction(self, rng: random.Random) -> str:
        if (
            self._split not in ("train", "validation")
            and self.held_out
            and rng.random() < self.held_out_share
        ):
            return rng.choice(self.held_out)  # the test split (or a prompt drawn outside generate)
        return rng.choice(self.mixture)

    def sample_prompt(self, rng: random.Random) -> str:
        instruction = self._instruction(rng)
        while True:  # an instruction that selects nothing would make an empty target: draw the input again
            items = [c.upper() if rng.random() < 0.5 else c for c in rng.sample(LETTERS, self.n_items)]
            prompt = f"{instruction} {SEP} {' '.join(items)} {SEP}"
            if selected_items(prompt):
                return prompt

    def sample_completion(self, prompt: str, rng: random.Random) -> str:
        items = selected_items(prompt)
        rng.shuffle(items)
        return " ".join(items)

    def references(self, prompt: str, completion: str, rng: random.Random) -> list[str]:
        items, refs = selected_items(prompt), [completion]
        for _ in range(8 * self.max_references):
            if len(refs) >= min(self.max_references, math.factorial(len(items))):
                break
            order = " ".join(rng.sample(items, len(items)))
            if order not in refs:
                refs.append(order)
        return refs

    def vocabulary(self) -> list[str]:
        return [*CONDITIONS, SEP, *LETTERS, *(c.upper() for c in LETTERS)]

    # ---- metrics

    def metric_fns(self) -> dict:
        def subset(score, out: bool):
            def fn(predictions: list[str], records: list[dict]) -> float:
                M.check_inputs(predictions, records)
                pairs = [
                    (p, r)
                    for p, r in zip(predictions, records)
                    if (instruction_of(r) in self.held_out) == out
                ]
                return _mean(score, [p for p, _ in pairs], [r for _, r in pairs])

            return fn

        return {
            "set_match": _corpus(_set_match_score),
            "held_in": subset(_set_match_score, False),
            "held_out": subset(_set_match_score, True),
            "held_out_f1": subset(_item_f1_score, True),
            "item_f1": _corpus(_item_f1_score),
        }

    def example_fns(self) -> dict:
        """Per-example forms ``(record, prediction) -> [0, 1]`` (the RL rewards)."""
        return {"set_match": _set_match_score, "item_f1": _item_f1_score}

    # ---- sizes

    @property
    def max_prompt_tokens(self) -> int:
        return self.n_items + 4  # two instruction words, two separators

    @property
    def max_completion_tokens(self) -> int:
        return self.n_items

    def teacher_model_config(self) -> dict:
        return {
            "architecture": "llama",
            "hidden_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 384,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": 32,
        }

    def student_model_config(self) -> dict:
        return {
            "architecture": "llama",
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 96,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": 32,
        }
