"""``translation``: a synthetic language pair, a stand-in for WMT.

Source (English words, 5-12 tokens)::

    det adj* noun verb det adj* noun [prep det noun] :

with 0-2 adjectives per noun phrase, singular or plural nouns (the determiner agrees: a/some, this/these, ...) and
past-tense verbs, which do not mark number. The target language is made of generated pseudo-words:

* a **dictionary** maps each source lemma to 2-3 target synonyms, chosen at random *per occurrence* (so a sentence
  has many valid translations: the teacher is multi-modal, and BLEU uses several references);
* **reordering** is deterministic: SVO -> SOV with the prepositional phrase before the verb, adjectives after the
  noun, prepositions become postpositions;
* **number** is a separate token: plural nouns are followed by ``-ri``;
* **agreement**: the sentence-final verb takes a suffix token that depends on the *subject's* number (``-a``
  singular, ``-en`` plural). The source verb does not show it, so the model has to look back across the object
  and the prepositional phrase: a long-range dependency where early mistakes compound.

Example (with the default lexicon)::

    prompt      every baker loved that blue small dog near this monkey :
    completion  mi fimo si nopu leli mano pi nago pa vonu -a
                (every baker | that dog blue small | this monkey near | loved, singular subject)
    another     bo kudo si zalu gobu polu pi duta la losi -a      (same sentence, other synonyms)

The lexicon is generated once from ``lexicon_seed`` (fixed by default), independently of the data seeds.

Metrics: ``bleu`` (headline: corpus BLEU-4 against all references, whitespace tokenisation), ``exact_match``
(against the stored references only, so it is a lower bound) and ``agreement`` (share of outputs ending in the right
agreement suffix, a probe of the long-range dependency; per example :func:`agreement_score`, which reads the gold
suffix from the record's target via :func:`gkd.metrics.references_of`, so every record format with a target works).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from gkd import metrics as M
from gkd.tasks.base import TASK_STUDENT, TASK_TEACHER, Task

__all__ = ["SyntheticTranslation", "agreement", "agreement_score"]

SUFFIX = ":"
PLURAL = "-ri"
AGREE = {"sg": "-a", "pl": "-en"}

# Determiners by lemma: (singular form, plural form). "the" serves both numbers.
DETERMINERS = {
    "DEF": ("the", "the"),
    "INDEF": ("a", "some"),
    "NEAR": ("this", "these"),
    "FAR": ("that", "those"),
    "ALL": ("every", "all"),
}
NOUNS = [
    ("dog", "dogs"), ("cat", "cats"), ("bird", "birds"), ("horse", "horses"), ("farmer", "farmers"),
    ("king", "kings"), ("queen", "queens"), ("teacher", "teachers"), ("doctor", "doctors"), ("boy", "boys"),
    ("girl", "girls"), ("wolf", "wolves"), ("sailor", "sailors"), ("baker", "bakers"), ("poet", "poets"),
    ("friend", "friends"), ("student", "students"), ("soldier", "soldiers"), ("lion", "lions"),
    ("rabbit", "rabbits"), ("monkey", "monkeys"), ("pilot", "pilots"), ("judge", "judges"), ("child", "children"),
]  # fmt: skip
ADJECTIVES = [
    "big", "small", "old", "young", "red", "blue", "green", "happy", "sad", "quick", "slow", "tall",
    "short", "brave", "quiet", "loud", "kind", "angry", "clever", "lazy", "strong", "weak", "bright", "dark",
]  # fmt: skip
VERBS = [
    "saw", "liked", "followed", "found", "helped", "called", "watched", "knew", "met", "visited",
    "pushed", "heard", "loved", "feared", "chased", "fed", "painted", "greeted", "taught", "carried",
]  # fmt: skip
PREPOSITIONS = ["in", "near", "with", "under", "behind", "from"]

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _make_lexicon(seed: int, min_syn: int, max_syn: int) -> dict[str, list[str]]:
    """Map every source lemma to ``min_syn``..``max_syn`` distinct pseudo-words (CV syllables, unique overall)."""
    rng = random.Random(f"translation-lexicon|{seed}")
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    used: set[str] = set()

    def word(n_syllables: int) -> str:
        while True:
            w = "".join(rng.choice(syllables) for _ in range(n_syllables))
            if w not in used:
                used.add(w)
                return w

    lemmas = (
        [f"DET:{d}" for d in DETERMINERS] + [f"N:{sg}" for sg, _ in NOUNS] + [f"A:{a}" for a in ADJECTIVES]
    )
    lemmas += [f"V:{v}" for v in VERBS] + [f"P:{p}" for p in PREPOSITIONS]
    short = ("DET:", "P:")  # function words get one-syllable forms
    return {
        lemma: [word(1 if lemma.startswith(short) else 2) for _ in range(rng.randint(min_syn, max_syn))]
        for lemma in lemmas
    }


# A parsed sentence: lists of lemma keys; a noun phrase is (det lemma, number, noun lemma, [adjectives]).
NounPhrase = tuple[str, str, str, list[str]]


@dataclass
class SyntheticTranslation(Task):
    """Translate a toy English sentence into a toy SOV language with synonyms, reordering and agreement.

    Args:
        max_adjectives: adjectives per noun phrase are uniform on 0..max_adjectives.
        pp_prob: probability of a trailing prepositional phrase.
        min_synonyms, max_synonyms: target synonyms per source lemma.
        max_references: references per record (distinct synonym variants, completion first).
        lexicon_seed: seed of the generated dictionary (part of the task's definition, not of the data).
    """

    max_adjectives: int = 2
    pp_prob: float = 0.5
    min_synonyms: int = 2
    max_synonyms: int = 3
    max_references: int = 8
    lexicon_seed: int = 0
    lexicon: dict[str, list[str]] = field(init=False, repr=False)

    name = "translation"
    metric = "bleu"
    metrics = ["bleu", "exact_match", "agreement"]  # noqa: RUF012
    reference_metrics = ("agreement",)  # metrics that compare with the record's targets

    def __post_init__(self) -> None:
        if (
            not 1 <= self.min_synonyms <= self.max_synonyms
            or self.max_adjectives < 0
            or self.max_references < 1
        ):
            raise ValueError(
                "need 1 <= min_synonyms <= max_synonyms, max_adjectives >= 0, max_references >= 1"
            )
        self.lexicon = _make_lexicon(self.lexicon_seed, self.min_synonyms, self.max_synonyms)
        self._det_of = {}  # source determiner word -> {number: lemma}
        for lemma, (sg, pl) in DETERMINERS.items():
            self._det_of.setdefault(sg, {})["sg"] = lemma
            self._det_of.setdefault(pl, {})["pl"] = lemma
        self._noun_of = {sg: (sg, "sg") for sg, _ in NOUNS} | {pl: (sg, "pl") for sg, pl in NOUNS}

    # ---- source side

    def _sample_np(self, rng: random.Random, with_adjectives: bool = True) -> str:
        number = rng.choice(["sg", "pl"])
        det = DETERMINERS[rng.choice(list(DETERMINERS))][number == "pl"]
        noun = rng.choice(NOUNS)[number == "pl"]
        n_adj = rng.randint(0, self.max_adjectives) if with_adjectives else 0
        return " ".join([det, *rng.sample(ADJECTIVES, n_adj), noun])

    def sample_prompt(self, rng: random.Random) -> str:
        words = [self._sample_np(rng), rng.choice(VERBS), self._sample_np(rng)]
        if rng.random() < self.pp_prob:
            words += [rng.choice(PREPOSITIONS), self._sample_np(rng, with_adjectives=False)]
        return " ".join([*words, SUFFIX])

    def _parse_np(self, toks: list[str]) -> NounPhrase:
        det, *adjs, noun = toks
        stem, number = self._noun_of[noun]
        return self._det_of[det][number], number, stem, adjs

    def parse(self, prompt: str) -> tuple[NounPhrase, str, NounPhrase, tuple[str, NounPhrase] | None]:
        """Split a prompt into (subject NP, verb, object NP, optional (preposition, NP))."""
        toks = prompt.split()
        if not toks or toks[-1] != SUFFIX:
            raise ValueError(f"not a translation prompt: {prompt!r}")
        toks = toks[:-1]
        verb_at = next(i for i, t in enumerate(toks) if t in VERBS)
        rest = toks[verb_at + 1 :]
        prep_at = next((i for i, t in enumerate(rest) if t in PREPOSITIONS), len(rest))
        pp = (rest[prep_at], self._parse_np(rest[prep_at + 1 :])) if prep_at < len(rest) else None
        return self._parse_np(toks[:verb_at]), toks[verb_at], self._parse_np(rest[:prep_at]), pp

    # ---- target side

    def _pick(self, lemma: str, rng: random.Random) -> str:
        return rng.choice(self.lexicon[lemma])

    def _np_target(self, np: NounPhrase, rng: random.Random) -> list[str]:
        det, number, stem, adjs = np
        out = [self._pick(f"DET:{det}", rng), self._pick(f"N:{stem}", rng)]
        if number == "pl":
            out.append(PLURAL)
        return out + [self._pick(f"A:{a}", rng) for a in adjs]

    def sample_completion(self, prompt: str, rng: random.Random) -> str:
        """A translation with every synonym drawn at random: ``SUBJ OBJ [PP] VERB AGREE``."""
        subj, verb, obj, pp = self.parse(prompt)
        out = self._np_target(subj, rng) + self._np_target(obj, rng)
        if pp is not None:
            out += [*self._np_target(pp[1], rng), self._pick(f"P:{pp[0]}", rng)]
        out += [self._pick(f"V:{verb}", rng), AGREE[subj[1]]]
        return " ".join(out)

    def references(self, prompt: str, completion: str, rng: random.Random) -> list[str]:
        refs = [completion]
        for _ in range(8 * self.max_references):
            if len(refs) >= self.max_references:
                break
            cand = self.sample_completion(prompt, rng)
            if cand not in refs:
                refs.append(cand)
        return refs

    def vocabulary(self) -> list[str]:
        source = sorted({w for pair in DETERMINERS.values() for w in pair})
        source += [w for pair in NOUNS for w in pair] + ADJECTIVES + VERBS + PREPOSITIONS + [SUFFIX]
        target = [w for words in self.lexicon.values() for w in words] + [PLURAL, *AGREE.values()]
        return source + target

    def metric_fns(self) -> dict:
        return {"agreement": agreement}

    def example_fns(self) -> dict:
        """Per-example forms ``(record, prediction) -> [0, 1]`` of :meth:`metric_fns` (the RL rewards)."""
        return {"agreement": agreement_score}

    # ---- sizes

    @property
    def max_prompt_tokens(self) -> int:
        return 2 * (2 + self.max_adjectives) + 1 + 3 + 1  # NP verb NP [prep det noun] :

    @property
    def max_completion_tokens(self) -> int:
        return 2 * (3 + self.max_adjectives) + 4 + 2  # NP NP [det noun -ri postp] verb agree

    def teacher_model_config(self) -> dict:
        return {**TASK_TEACHER, "vocab_size": self.vocab_size}

    def student_model_config(self) -> dict:
        return {**TASK_STUDENT, "vocab_size": self.vocab_size}


def _agreement(prediction: str, refs: list[str]) -> float:
    toks, gold = prediction.split(), refs[0].split()
    return float(bool(toks) and bool(gold) and toks[-1] == gold[-1])


def agreement_score(record: dict, prediction: str) -> float:
    """1.0 if the output's last token is the agreement suffix the subject requires (read from the record's target,
    its first reference), else 0."""
    return _agreement(prediction, M.require_references(record))


def agreement(predictions: list[str], records: list[dict]) -> float:
    """Percent of outputs ending in the right subject-agreement suffix."""
    M.check_inputs(predictions, records)
    return (
        100.0
        * sum(_agreement(p, M.require_references(r, i)) for i, (p, r) in enumerate(zip(predictions, records)))
        / len(predictions)
    )
