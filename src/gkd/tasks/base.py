"""The ``Task`` interface: a synthetic data generator, its word-level tokenizer, its metrics and model sizes.

A task is a small, fully known "language": it can sample prompts, sample *one* valid target for a prompt (several
targets are valid on purpose, so the teacher learns a multi-modal distribution), list valid targets for metrics, and
score predictions. Everything is plain Python and deterministic per ``(split, seed)``, so experiments are
reproducible without a data download.

Records use the trainer's data format::

    {"prompt": "Q z q x S B ... :", "completion": "d a c s b", "references": ["d a c s b", "a b c d s", ...]}

Text is space-separated tokens and every token is a word of :meth:`Task.vocabulary`, so the word-level tokenizer
from :meth:`Task.build_tokenizer` maps one word to one id and sacrebleu / rouge-score see the same words.

Splits. Each prompt is hashed (via :meth:`Task.split_key`, by default the prompt itself) into a fixed bucket:
10 % test, 10 % validation, 80 % train. :meth:`Task.generate` rejects prompts whose bucket is not the requested
split, so the three splits never share a prompt whatever the seeds and sizes, and "fresh samples every step" from
the train split never leak test prompts.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from gkd.metrics import get_metric

if TYPE_CHECKING:  # transformers is imported lazily: building records must not pay for it
    from transformers import PreTrainedTokenizerFast

SPLITS = ("train", "validation", "test")
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)

# Jinja chat template: the messages' contents joined by single spaces, nothing else. A conversation
# [user: prompt, assistant: completion] therefore renders to "prompt completion" and tokenizes to exactly the
# prompt's ids followed by the completion's ids; ``add_generation_prompt`` adds nothing. The assistant turn is
# wrapped in {% generation %} so ``return_assistant_tokens_mask=True`` marks the completion tokens. No EOS is added:
# the trainer appends EOS itself.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %} {% endif %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
)

# The teacher and student that arithmetic and translation share (:func:`gkd.models.build_model` specs; each task adds
# its vocabulary size). The tasks' measured results depend on these sizes.
TASK_TEACHER = {
    "architecture": "llama",
    "hidden_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "max_position_embeddings": 64,
}
TASK_STUDENT = {
    "architecture": "llama",
    "hidden_size": 48,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
}


def split_of(key: str, test_fraction: float = 0.1, validation_fraction: float = 0.1) -> str:
    """The split a prompt key belongs to: a stable hash (blake2b, not Python's salted ``hash``) mapped to [0, 1)."""
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") / 2**64
    if h < test_fraction:
        return "test"
    if h < test_fraction + validation_fraction:
        return "validation"
    return "train"


def build_word_tokenizer(words: list[str], path: str | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: ids 0, 1, 2 are ``<pad>``, ``<eos>``, ``<unk>``; then ``words`` in order.

    WordLevel model + WhitespaceSplit pre-tokenizer, so ``"a b"`` -> two ids and decoding joins tokens with
    spaces. No BOS, and no post-processor, so ``add_special_tokens=True`` appends nothing. Saved with
    ``save_pretrained(path)`` when ``path`` is given, so ``AutoTokenizer.from_pretrained(path)`` loads it offline.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        if word in vocab or not word or any(c.isspace() for c in word):
            raise ValueError(f"bad or duplicate vocabulary word {word!r}")
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: the tokenizers library then joins tokens with single spaces, verbatim (a WordPiece decoder would
    # eat the "##" of "####").
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if path is not None:
        tokenizer.save_pretrained(path)
    return tokenizer


def strip_special(prediction: str) -> str:
    """Cut a decoded prediction at its first ``<eos>`` and drop ``<pad>`` tokens (harmless if already clean)."""
    pos = prediction.find(EOS)
    if pos >= 0:
        prediction = prediction[:pos]
    return " ".join(tok for tok in prediction.split() if tok != PAD)


@dataclass
class Task(ABC):
    """Base class of the synthetic tasks. Subclasses are dataclasses whose fields are the task's parameters.

    Subclasses implement :meth:`sample_prompt`, :meth:`sample_completion`, :meth:`references`,
    :meth:`vocabulary` and the model-size hints; everything else (splits, records, tokenizer, scoring) is shared.
    """

    name: ClassVar[str]
    metric: ClassVar[str]  # headline metric, first in ``metrics``
    metrics: ClassVar[list[str]]

    # ------------------------------------------------------------------------------------------- to implement

    @abstractmethod
    def sample_prompt(self, rng: random.Random) -> str:
        """One random prompt (any split)."""

    @abstractmethod
    def sample_completion(self, prompt: str, rng: random.Random) -> str:
        """One valid target for ``prompt``, drawn at random among the valid ones (without EOS).

        Exposed so a data pipeline can draw a *fresh* valid target each time a prompt is reused.
        """

    @abstractmethod
    def references(self, prompt: str, completion: str, rng: random.Random) -> list[str]:
        """Valid targets for metrics, ``completion`` first, possibly capped."""

    @abstractmethod
    def vocabulary(self) -> list[str]:
        """Every word prompts and targets can contain (special tokens excluded)."""

    @property
    @abstractmethod
    def max_prompt_tokens(self) -> int:
        """Longest possible prompt, in tokens."""

    @property
    @abstractmethod
    def max_completion_tokens(self) -> int:
        """Longest possible target, in tokens, without the EOS the trainer appends."""

    @abstractmethod
    def teacher_model_config(self) -> dict:
        """Size of the teacher: a plain dict describing a tiny decoder-only model."""

    @abstractmethod
    def student_model_config(self) -> dict:
        """Size of the student: a plain dict describing a (smaller) decoder-only model."""

    def metric_fns(self) -> dict[str, Callable[[list[str], list[dict]], float]]:
        """Task-specific metrics by name (same signature as :mod:`gkd.metrics`); override to add some."""
        return {}

    def split_key(self, prompt: str) -> str:
        """What is hashed to pick a prompt's split; override when distinct prompts pose the same problem."""
        return prompt

    # ------------------------------------------------------------------------------------------- shared

    def generate(self, split: str, n: int, seed: int, *, unique: bool = True) -> list[dict]:
        """``n`` records of ``split``, deterministic per ``(split, seed)``.

        Prompts are drawn until their hash bucket matches ``split`` (so splits never share prompts) and, with
        ``unique``, until ``n`` distinct prompts are found. Raises ``ValueError`` if the split's prompt space is too
        small to supply them.
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        rng = random.Random(f"{self.name}|{split}|{seed}")
        records: list[dict] = []
        seen: set[str] = set()
        budget = 100 * n + 10_000
        while len(records) < n:
            budget -= 1
            if budget < 0:
                raise ValueError(
                    f"{self.name}: could not draw {n} distinct {split} prompts; the space is too small"
                )
            prompt = self.sample_prompt(rng)
            if split_of(self.split_key(prompt)) != split or (unique and prompt in seen):
                continue
            seen.add(prompt)
            completion = self.sample_completion(prompt, rng)
            refs = self.references(prompt, completion, rng)
            records.append({"prompt": prompt, "completion": completion, "references": refs})
        return records

    def build_tokenizer(self, path: str | None = None) -> PreTrainedTokenizerFast:
        """Word-level tokenizer over :meth:`vocabulary` (see :func:`build_word_tokenizer`)."""
        return build_word_tokenizer(self.vocabulary(), path)

    @property
    def vocab_size(self) -> int:
        """Tokenizer size: the vocabulary plus ``<pad>``, ``<eos>``, ``<unk>``."""
        return len(self.vocabulary()) + len(SPECIAL_TOKENS)

    def score(self, records: list[dict], predictions: list[str]) -> dict[str, float]:
        """All of :attr:`metrics` (headline first), each in percent. Predictions are cut at ``<eos>`` first."""
        predictions = [strip_special(p) for p in predictions]
        own = self.metric_fns()
        return {
            name: float((own.get(name) or get_metric(name))(predictions, records)) for name in self.metrics
        }


__all__ = [
    "CHAT_TEMPLATE",
    "EOS",
    "PAD",
    "SPECIAL_TOKENS",
    "SPLITS",
    "UNK",
    "Task",
    "build_word_tokenizer",
    "split_of",
    "strip_special",
]
