"""``summarization``: the "salient set" task, a stand-in for XSum with a multi-modal teacher.

The input lists L=16 distinct items (letters); k in {2..6} of them are *salient* and written in upper case, the rest
are distractors in lower case, all in random positions. The summary lists the salient items in lower case::

    prompt      Q z q x S B h k f D m p A C l y j :
    completion  d a c s b                     (any of the 5! orders is valid; the trainer appends EOS)

Why this design (see the toy-scale notes, Part 2): on deterministic, one-answer tasks the teacher is nearly one-hot
and supervised KD is SFT in disguise. Here the target order is free, so the teacher's next-token distribution is
genuinely multi-modal (uniform over the salient items not yet listed, EOS when none is left) and carries information
one ground-truth token does not.

Where on-policy data matters (measured in RESULTS.md, sections 0, 3 and 10):

* ``target_order: random`` (the default): the training completions are a fresh random permutation per record, i.e.
  drawn from the teacher's own policy. The student's prefixes then look like the dataset's, and λ does not matter:
  the divergence carries the whole gain. A mistake (a repeat, a distractor) is final for ``set_match``.
* ``target_order: prompt``: the completions list the items in the input's order, another policy than the teacher's.
  A student distilled on them (λ = 0) learns the teacher's answer only on input-ordered prefixes, where a shortcut
  ("the salient items to the right of the last one listed") fits, and fails on its own out-of-order prefixes; on its
  own samples (λ = 1) it learns the real rule. This is the demo's regime.

Self-correction (``undo=True``): the output language gains an undo token ``<`` that deletes the item before it, so
``d x < a c`` means ``d a c``: a mistake can be taken back, as a reasoning model writes "wait, no". The fixed
dataset's completions never use it (people write clean answers); ``noisy_prefix_prob`` > 0 gives a *teacher's*
training data records whose prompt ends in a partial answer from a noisy writer (repeats, distractors, items not in
the input, undos) and whose completion is the best way to finish it (undo back to the first mistake, then the missing
items; :func:`best_continuation`): a teacher that can steer back from mistakes.
A student trained on the clean dataset (λ = 0) never sees a mistaken prefix, whatever the divergence; a student
trained on its own samples (λ = 1) meets its own mistakes and the teacher's ``<`` there. ``gkd diagnose`` predicts
on-policy data to help here (the teacher steers back from 96 % of the student's mistakes, the student from none), but
in a pilot (RESULTS.md section 0) a 1-layer student did not learn to use the correction: a measured negative result.

Optional paraphrases (``paraphrase_prob`` > 0): each output fact may be written ``a~`` instead of ``a``, which adds
surface-form variety to the teacher's distribution. Every metric canonicalises ``a~`` to ``a``.

Metrics (percent; the per-example functions return [0, 1] and are meant as RL rewards):

* ``set_match`` (headline): the multiset of canonical output items equals the salient set -- nothing missing, no
  extras, no repeats. Per example: :func:`set_match_score`.
* ``item_f1``: multiset F1 of output items against the salient set; repeats and non-item tokens are false
  positives. Per example: :func:`item_f1_score`.
* ``rouge2``: ROUGE-2 F1 on canonicalised text, best over the references (several orders of the set).
* ``faithfulness``: share of output facts present anywhere in the input (salient or distractor), i.e. not
  hallucinated. **An empty summary scores 0**: it supports no fact, and a reward of 1 for stopping at once would be
  trivially hackable. Per example: :func:`faithfulness_score`.
* ``dup_rate``: share of outputs that repeat an item (lower is better; on-policy forward KL tends to raise it).
  Per example: :func:`duplicate_score`.

The per-example functions read the prompt with :func:`gkd.metrics.prompt_text_of` and the targets with
:func:`gkd.metrics.references_of`, so they score every record format (prompt/completion, ``messages``,
conversational prompt/completion, prompt-only with ``references``).

Diversity: draw several samples per prompt and call ``gkd.metrics.self_bleu(samples_per_input)`` (100 = identical
samples). Self-BLEU is order-sensitive, so on this task it measures how varied the sampled *orders* are.
"""

from __future__ import annotations

import itertools
import math
import random
import string
from collections import Counter
from dataclasses import dataclass

from gkd import metrics as M
from gkd.tasks.base import Task

LETTERS = list(string.ascii_lowercase)
PARAPHRASE_SUFFIX = "~"
PREFIX, SUFFIX = "Q", ":"
UNDO = "<"  # with ``undo``: deletes the previous output item (the output language can correct itself)

__all__ = [
    "SalientSetSummarization",
    "best_continuation",
    "canonical_items",
    "dup_rate",
    "duplicate_score",
    "faithfulness",
    "faithfulness_score",
    "has_duplicate",
    "input_items",
    "item_f1",
    "item_f1_score",
    "rouge2_canonical",
    "rouge2_canonical_score",
    "salient_items",
    "set_match",
    "set_match_score",
]


# --------------------------------------------------------------------------------------------------- parsing


def _body(prompt: str) -> list[str]:
    """The item tokens of a prompt (``Q`` prefix and ``:`` suffix removed by position: a salient q is also ``Q``)."""
    toks = prompt.split()
    if len(toks) < 2 or toks[0] != PREFIX or toks[-1] != SUFFIX:
        raise ValueError(f"not a salient-set prompt: {prompt!r}")
    return toks[1:-1]


def salient_items(prompt: str) -> list[str]:
    """The salient items of a prompt, lower-cased, in prompt order."""
    return [tok.lower() for tok in _body(prompt) if tok.isupper()]


def input_items(prompt: str) -> set[str]:
    """Every item mentioned in the input (salient or not), lower-cased."""
    return {tok.lower() for tok in _body(prompt)}


def canonical_items(prediction: str) -> list[str]:
    """The output's tokens with paraphrases mapped back (``a~`` -> ``a``) and each undo token ``<`` applied (it
    deletes the item before it; a leading ``<`` deletes nothing); other tokens are kept as they are."""
    out: list[str] = []
    for tok in prediction.split():
        if tok == UNDO:
            if out:
                out.pop()
            continue
        if tok.endswith(PARAPHRASE_SUFFIX) and tok[:-1] in LETTERS:
            tok = tok[:-1]
        out.append(tok)
    return out


def _canonical_text(text: str) -> str:
    return " ".join(canonical_items(text))


# --------------------------------------------------------------------------------------------------- per example


def set_match_score(record: dict, prediction: str) -> float:
    """1.0 if the canonical output items are exactly the salient set (no repeats, extras or gaps), else 0.0."""
    return float(Counter(canonical_items(prediction)) == Counter(salient_items(M.prompt_text_of(record))))


def item_f1_score(record: dict, prediction: str) -> float:
    """Multiset F1 in [0, 1]: each salient item can be matched once; repeats and non-items are false positives."""
    pred = Counter(canonical_items(prediction))
    gold = Counter(salient_items(M.prompt_text_of(record)))
    tp = sum((pred & gold).values())
    denom = sum(pred.values()) + sum(gold.values())
    return 1.0 if denom == 0 else 2.0 * tp / denom


def faithfulness_score(record: dict, prediction: str) -> float:
    """Share in [0, 1] of output facts (tokens) that name an item present in the input; 0.0 for an empty output."""
    items = canonical_items(prediction)
    if not items:
        return 0.0
    present = input_items(M.prompt_text_of(record))
    return sum(tok in present for tok in items) / len(items)


def has_duplicate(prediction: str) -> bool:
    """True if some canonical item occurs more than once in the output."""
    items = canonical_items(prediction)
    return len(items) != len(set(items))


def duplicate_score(record: dict, prediction: str) -> float:
    """1.0 if the output repeats an item, else 0.0 (lower is better: as a reward it would favour repeats)."""
    return float(has_duplicate(prediction))


def _canonical_record(record: dict, index: int | None = None) -> dict:
    """A record whose only targets are the record's references (target first), paraphrases canonicalised."""
    return {"references": [_canonical_text(x) for x in M.require_references(record, index)]}


def rouge2_canonical_score(record: dict, prediction: str) -> float:
    """ROUGE-2 F1 in [0, 1] (best over references) after canonicalising paraphrases on both sides."""
    return M.rouge2_score(_canonical_record(record), _canonical_text(prediction))


def best_continuation(prompt: str, written: list[str], rng: random.Random) -> list[str]:
    """The shortest right way to finish a partial answer ``written``: undo back to its first mistake (an item that
    is not salient, or a repeat), then the salient items not listed yet, in a random order (then EOS)."""
    salient = salient_items(prompt)
    listed = canonical_items(" ".join(written))
    kept: list[str] = []
    for tok in listed:
        if tok not in salient or tok in kept:
            break
        kept.append(tok)
    rest = [t for t in salient if t not in kept]
    rng.shuffle(rest)
    return [UNDO] * (len(listed) - len(kept)) + rest


# --------------------------------------------------------------------------------------------------- corpus


def _mean(fn, predictions: list[str], records: list[dict]) -> float:
    M.check_inputs(predictions, records)
    return 100.0 * sum(fn(r, p) for p, r in zip(predictions, records)) / len(predictions)


def set_match(predictions: list[str], records: list[dict]) -> float:
    """Percent of outputs whose item multiset equals the salient set (the headline metric)."""
    return _mean(set_match_score, predictions, records)


def item_f1(predictions: list[str], records: list[dict]) -> float:
    """Mean multiset item F1, in percent."""
    return _mean(item_f1_score, predictions, records)


def faithfulness(predictions: list[str], records: list[dict]) -> float:
    """Mean share of output facts supported by the input, in percent (empty outputs count 0)."""
    return _mean(faithfulness_score, predictions, records)


def dup_rate(predictions: list[str], records: list[dict]) -> float:
    """Percent of outputs with a repeated item (lower is better)."""
    return _mean(duplicate_score, predictions, records)


def rouge2_canonical(predictions: list[str], records: list[dict]) -> float:
    """ROUGE-2 F1 (best over references) after canonicalising paraphrases on both sides, in percent."""
    M.check_inputs(predictions, records)
    canon = [_canonical_record(r, i) for i, r in enumerate(records)]
    return M.rouge2([_canonical_text(p) for p in predictions], canon)


# --------------------------------------------------------------------------------------------------- the task


@dataclass
class SalientSetSummarization(Task):
    """Summarise an input by listing its salient (upper-case) items, in any order.

    Args:
        n_items: items per prompt (L), at most 26. Prompt length is ``n_items + 2`` tokens.
        min_salient, max_salient: k is uniform on this inclusive range.
        paraphrase_prob: probability that an output fact is written in its paraphrase form ``x~``.
        max_references: references per record: distinct orders of the set, the completion first.
        undo: add the undo token ``<`` (deletes the previous item) to the output language; every metric applies it.
        noisy_prefix_prob: share of generated records whose prompt carries a noisy partial answer and whose
            completion is the best way to finish it (a teacher's training data; needs ``undo``).
        target_order: the order of the items in a generated completion: ``random`` (a fresh permutation per record,
            the default) or ``prompt`` (the order of the input, as a person copying them out would write them).
            Every order is valid for the metrics either way.
    """

    n_items: int = 16
    min_salient: int = 2
    max_salient: int = 6
    paraphrase_prob: float = 0.0
    max_references: int = 6
    undo: bool = False
    noisy_prefix_prob: float = 0.0
    target_order: str = "random"

    name = "summarization"
    metric = "set_match"
    metrics = ["set_match", "item_f1", "rouge2", "faithfulness", "dup_rate"]  # noqa: RUF012
    reference_metrics = (
        "rouge2",
    )  # metrics that compare with the record's targets (the others read the prompt)

    def __post_init__(self) -> None:
        if not 1 <= self.min_salient <= self.max_salient <= self.n_items <= len(LETTERS):
            raise ValueError("need 1 <= min_salient <= max_salient <= n_items <= 26")
        if not 0.0 <= self.paraphrase_prob <= 1.0:
            raise ValueError("paraphrase_prob must be in [0, 1]")
        if self.max_references < 1:
            raise ValueError("max_references must be >= 1")
        if not 0.0 <= self.noisy_prefix_prob <= 1.0:
            raise ValueError("noisy_prefix_prob must be in [0, 1]")
        if self.target_order not in ("random", "prompt"):
            raise ValueError(f"target_order must be 'random' or 'prompt', got {self.target_order!r}")
        if self.noisy_prefix_prob > 0 and not self.undo:
            raise ValueError(
                "noisy_prefix_prob needs undo=True (the correction is written with the undo token)"
            )

    # ---- data

    def sample_prompt(self, rng: random.Random) -> str:
        items = rng.sample(LETTERS, self.n_items)
        k = rng.randint(self.min_salient, self.max_salient)
        for pos in rng.sample(range(self.n_items), k):
            items[pos] = items[pos].upper()
        return " ".join([PREFIX, *items, SUFFIX])

    def _write(self, items: list[str], rng: random.Random) -> str:
        if self.paraphrase_prob > 0:
            items = [it + PARAPHRASE_SUFFIX if rng.random() < self.paraphrase_prob else it for it in items]
        return " ".join(items)

    def sample_completion(self, prompt: str, rng: random.Random) -> str:
        """The salient items in a fresh random order, or in the input's order (each possibly paraphrased)."""
        items = salient_items(prompt)
        if self.target_order == "random":
            rng.shuffle(items)
        return self._write(items, rng)

    def references(self, prompt: str, completion: str, rng: random.Random) -> list[str]:
        """The completion plus other distinct orders of the set, written canonically, up to ``max_references``."""
        items = salient_items(prompt)
        refs, seen = [completion], {_canonical_text(completion)}
        if math.factorial(len(items)) <= 4 * self.max_references:
            orders = [list(p) for p in itertools.permutations(items)]
            rng.shuffle(orders)
        else:
            orders = [rng.sample(items, len(items)) for _ in range(4 * self.max_references)]
        for order in orders:
            if len(refs) >= self.max_references:
                break
            text = " ".join(order)
            if text not in seen:
                seen.add(text)
                refs.append(text)
        return refs

    def vocabulary(self) -> list[str]:
        words = [PREFIX, SUFFIX] + LETTERS + [c.upper() for c in LETTERS if c.upper() != PREFIX]
        if self.paraphrase_prob > 0:
            words += [c + PARAPHRASE_SUFFIX for c in LETTERS]
        if self.undo:
            words.append(UNDO)
        return words

    def generate(self, split: str, n: int, seed: int, *, unique: bool = True) -> list[dict]:
        """:meth:`Task.generate`; with ``noisy_prefix_prob`` a share of the records become mistake-then-undo records
        (:meth:`noisy_record`), drawn from their own random stream so the clean records are the same either way."""
        records = super().generate(split, n, seed, unique=unique)
        if self.noisy_prefix_prob <= 0:
            return records
        rng = random.Random(f"{self.name}|{split}|{seed}|noisy")
        return [self.noisy_record(r, rng) if rng.random() < self.noisy_prefix_prob else r for r in records]

    def noisy_record(self, record: dict, rng: random.Random) -> dict:
        """A teacher's training record: the prompt plus a partial answer written by a noisy writer (right items, but
        also repeats, distractors, items not in the input, upper-case copies and undos, of correct items too), and
        as completion the best continuation from there (:func:`best_continuation`). Only the continuation is trained
        on, so the teacher learns to steer back from any such state without learning to make mistakes."""
        salient = salient_items(record["prompt"])
        body = _body(record["prompt"])
        distractors = [t for t in body if not t.isupper()]
        absent = [c for c in LETTERS if c not in {t.lower() for t in body}]
        for _ in range(100):
            written: list[str] = []
            for _ in range(rng.randint(1, len(salient) + 3)):
                listed = canonical_items(" ".join(written))
                todo = [t for t in salient if t not in listed]
                r = rng.random()
                if r < 0.55 and todo:
                    written.append(rng.choice(todo))
                elif r < 0.67 and listed:
                    written.append(rng.choice(listed))  # a repeat
                elif r < 0.8 and distractors:
                    written.append(rng.choice(distractors))  # in the input, not salient
                elif r < 0.87 and absent:
                    written.append(rng.choice(absent))  # not in the input at all
                elif r < 0.92:
                    written.append(rng.choice(salient).upper())  # the item copied in the input's case
                else:
                    written.append(UNDO)  # of whatever came last, a right item included
            rest = best_continuation(record["prompt"], written, rng)
            if rest and len(written) + len(rest) <= 2 * self.max_salient + 6:
                return {"prompt": " ".join([record["prompt"], *written]), "completion": " ".join(rest)}
        return record

    # ---- metrics

    def metric_fns(self) -> dict:
        return {
            "set_match": set_match,
            "item_f1": item_f1,
            "rouge2": rouge2_canonical,
            "faithfulness": faithfulness,
            "dup_rate": dup_rate,
        }

    def example_fns(self) -> dict:
        """Per-example forms ``(record, prediction) -> [0, 1]`` of :meth:`metric_fns` (the RL rewards)."""
        return {
            "set_match": set_match_score,
            "item_f1": item_f1_score,
            "rouge2": rouge2_canonical_score,
            "faithfulness": faithfulness_score,
            "dup_rate": duplicate_score,
        }

    # ---- sizes (from the toy-scale notes, run E/F: a 2L d64 teacher vs a 1L d24 student that plateaus below it)

    @property
    def max_prompt_tokens(self) -> int:
        return self.n_items + 2

    @property
    def max_completion_tokens(self) -> int:
        return self.max_salient  # + EOS, appended by the trainer

    def teacher_model_config(self) -> dict:
        return {
            "architecture": "llama",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 256,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": 32,
        }

    def student_model_config(self) -> dict:
        # intermediate 64 keeps the SwiGLU MLP (3 matrices) at the parameter count of the prototype's 4x GELU MLP.
        return {
            "architecture": "llama",
            "hidden_size": 24,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": 32,
        }
