"""One vocabulary for evaluation metrics, task metrics and RL rewards.

Every name below can be used as ``eval_metric`` (``gkd eval --metric``) and as ``reward``:

* **metrics** (:mod:`gkd.metrics`): ``exact_match``, ``final_answer``, ``bleu``, ``rouge1``, ``rouge2``, ``rougeL``,
  ``rougeLsum``, their stemmed variants ``rouge1_stemmed``, ``rouge2_stemmed``, ``rougeL_stemmed``,
  ``rougeLsum_stemmed`` (rouge-score's ``use_stemmer=True``: Porter stemming of tokens longer than 3 characters, as
  XSum / CNN-DM papers report ROUGE), ``chrf`` (sacrebleu chrF2) and ``gsm8k_answer`` (the GSM8K answer: after
  ``####``, else after "The answer is", else the last number);
* **task metrics**, every metric a built-in task exposes through ``Task.metric_fns`` (``set_match``, ``item_f1``,
  ``faithfulness``, ``dup_rate``, ``chain_valid``, ``agreement``); a task metric that has the name of a generic
  metric (summarization's paraphrase-aware ``rouge2``) is reached through its task name only;
* **multiple-choice metrics** ``mc_accuracy`` and ``mc_accuracy_norm`` (:mod:`gkd.metrics.choices`): eval metrics
  only, scored from the log-likelihood of each record's ``choices`` (no generation, :func:`gkd.evaluation.evaluate`
  reports both); not rewards, and not in the :class:`MetricEntry` registry (:data:`MC_METRICS`);
* **task names** (``summarization``, ``arithmetic``, ``translation``): as an eval metric, all the task's metrics,
  headline first (exactly :meth:`gkd.tasks.Task.score`); as a reward, the task's headline metric.

Each name is a :class:`MetricEntry` entry that knows its corpus function ``(predictions, records) -> percent``, its
per-example function ``(record, prediction) -> [0, 1]`` (what a reward computes), whether it needs references and
which task it belongs to. The per-example function equals the corpus function on a one-record corpus divided by 100,
except for ``bleu``, whose per-example form is sentence BLEU (sacrebleu's effective order, same tokenisation): corpus
BLEU-4 of one short sentence is mostly 0. Rewards reuse the metric code, never a copy of it.

Tokenisation (``tokenize``, the config's ``eval_tokenize``). The text metrics ``bleu`` and ``rouge*`` score real text
by default: ``"standard"`` is sacrebleu's ``13a`` and rouge-score's default tokenizer; ``"whitespace"`` splits on
spaces and keeps tokens as written (see :mod:`gkd.metrics`). The same rule holds for the metric as an eval metric and
as a reward (:func:`resolve_scorer`, :func:`load_reward` and :func:`get_scorer` all take ``tokenize``). Task names
and task metrics ignore it: the built-in tasks' text is space-separated tokens, so they always score in whitespace
mode (``translation`` as an eval metric or a reward is whitespace BLEU whatever ``tokenize`` says), and their numbers
never change with the setting.

A reward may also be ``package.module:function`` taking ``(prompts, completions, records)`` and returning one float
per completion.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from gkd import metrics as M
from gkd.errors import ConfigError, DataError

__all__ = [
    "BUILTIN_REWARDS",
    "MC_METRICS",
    "MEAN_METRICS",
    "TOKENIZE_MODES",
    "BuiltinReward",
    "MetricEntry",
    "RewardFn",
    "Scorer",
    "check_metric_name",
    "check_records",
    "check_reward_name",
    "check_tokenize",
    "get_scorer",
    "is_mc_metric",
    "load_reward",
    "names",
    "resolve_scorer",
]

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[dict]], Sequence[float]]
CorpusFn = Callable[[list[str], list[dict]], float]
ExampleFn = Callable[[dict, str], float]

# How many records check_records looks at.
CHECK_RECORDS = 8


@dataclass(frozen=True)
class MetricEntry:
    """One name of the vocabulary.

    ``kind`` is ``"metric"`` (generic), ``"task_metric"`` or ``"task"``. ``task`` is the task a task metric belongs
    to, or the task itself for a task name. For a task name, ``corpus`` / ``example`` are the headline metric's
    (:func:`resolve_scorer` returns all the task's metrics), ``needs_references`` says whether any of the task's
    metrics needs them and ``reward_needs_references`` whether the headline does.
    """

    name: str
    kind: str
    corpus: CorpusFn
    example: ExampleFn
    needs_references: bool
    reward_needs_references: bool
    task: str | None = None


# --------------------------------------------------------------------------------------------------- registry

_GENERIC: dict[str, tuple[CorpusFn, ExampleFn]] = {
    "exact_match": (M.exact_match, M.exact_match_score),
    "final_answer": (M.final_answer, M.final_answer_score),
    "bleu": (M.bleu, M.bleu_score),
    "rouge1": (M.rouge1, M.rouge1_score),
    "rouge2": (M.rouge2, M.rouge2_score),
    "rougeL": (M.rougeL, M.rougeL_score),
    "rougeLsum": (M.rougeLsum, M.rougeLsum_score),
    **{
        f"{r}_stemmed": (
            functools.partial(getattr(M, r), use_stemmer=True),
            functools.partial(getattr(M, f"{r}_score"), use_stemmer=True),
        )
        for r in ("rouge1", "rouge2", "rougeL", "rougeLsum")
    },
    "chrf": (M.chrf, M.chrf_score),
    "gsm8k_answer": (M.gsm8k_answer, M.gsm8k_answer_score),
}

# the generic metrics that tokenise text, and so take ``tokenize`` (chrF counts characters: it has no tokenisation)
_TEXT_METRICS = frozenset(
    {"bleu", *(f"{r}{s}" for r in ("rouge1", "rouge2", "rougeL", "rougeLsum") for s in ("", "_stemmed"))}
)

# the generic metrics whose corpus value is the mean of the per-example values (times 100): their bootstrap intervals
# resample per-example values; any other metric is recomputed on each resample (BLEU and chrF pool n-gram counts)
MEAN_METRICS = frozenset(
    {"exact_match", "final_answer", "gsm8k_answer", *(r for r in _TEXT_METRICS if r.startswith("rouge"))}
)

MC_METRICS = M.MC_METRICS


def is_mc_metric(name: object) -> bool:
    """Whether ``name`` is a multiple-choice (log-likelihood) eval metric: scored from ``choices``, not generations."""
    return name in MC_METRICS


TOKENIZE_MODES = M.TOKENIZE_MODES
DEFAULT_TOKENIZE = "standard"
TASK_TOKENIZE = "whitespace"  # the built-in tasks' space-separated token text


def check_tokenize(tokenize: object, key: str = "eval_tokenize") -> str:
    """``tokenize`` if it is ``standard`` or ``whitespace``; else a one-line :class:`ConfigError` naming ``key``."""
    if tokenize not in TOKENIZE_MODES:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(TOKENIZE_MODES)}, got {tokenize!r}")
    return tokenize  # type: ignore[return-value]


@functools.cache
def _generic(name: str, tokenize: str) -> MetricEntry:
    """The :class:`MetricEntry` of a generic metric; the text metrics with ``tokenize`` bound."""
    corpus, example = _GENERIC[name]
    if name in _TEXT_METRICS:
        corpus = functools.partial(corpus, tokenize=tokenize)
        example = functools.partial(example, tokenize=tokenize)
    return MetricEntry(name, "metric", corpus, example, True, True)


def _one_record(corpus: CorpusFn) -> ExampleFn:
    """Per-example form of a corpus metric that has none: the metric of a one-record corpus, in [0, 1]."""

    def example(record: dict, prediction: str) -> float:
        return corpus([prediction], [record]) / 100.0

    return example


def _stripped(example: ExampleFn) -> ExampleFn:
    """``example`` on the prediction cut at ``<eos>`` (as :meth:`Task.score` does)."""
    from gkd.tasks.base import strip_special

    def fn(record: dict, prediction: str) -> float:
        return example(record, strip_special(prediction))

    return fn


@functools.cache
def _registry() -> dict[str, MetricEntry]:
    from gkd.tasks import TASKS, get_task

    reg: dict[str, MetricEntry] = {name: _generic(name, DEFAULT_TOKENIZE) for name in _GENERIC}
    task_entries: dict[str, MetricEntry] = {}
    for task_name in TASKS:
        task = get_task(task_name)
        own = task.metric_fns()
        own_examples = getattr(task, "example_fns", dict)()
        own_refs = set(getattr(task, "reference_metrics", ()))
        report_only = set(
            getattr(task, "report_only_metrics", ())
        )  # averages over a subset, no per-example score
        for name in [*task.metrics, *own]:
            if name in reg or name not in own or name in report_only:
                continue  # generic metrics keep their generic meaning; a task override is reached via the task
            example = own_examples.get(name) or _one_record(own[name])
            reg[name] = MetricEntry(
                name, "task_metric", own[name], example, name in own_refs, name in own_refs, task_name
            )

        def refs(metric: str, own=own, own_refs=own_refs) -> bool:
            return metric in own_refs if metric in own else reg[metric].needs_references

        head = task.metric
        if head in own:
            head_corpus, head_example = own[head], own_examples.get(head) or _one_record(own[head])
        else:  # a generic headline (translation's bleu): in the tasks' whitespace mode, as Task.score computes it
            generic = _generic(head, TASK_TOKENIZE)
            head_corpus, head_example = generic.corpus, generic.example
        task_entries[task_name] = MetricEntry(
            task_name,
            "task",
            head_corpus,
            _stripped(head_example),
            any(refs(m) for m in task.metrics),
            refs(head),
            task_name,
        )
    reg.update(task_entries)
    return reg


def names(kind: str | None = None) -> list[str]:
    """Every valid metric / reward name (metrics, then task metrics, then task names), or those of one ``kind``."""
    return [n for n, s in _registry().items() if kind is None or s.kind == kind]


def _valid_list(reward: bool = False) -> str:
    tasks = "tasks (their headline metric)" if reward else "tasks (all their metrics)"
    groups = [("metrics", "metric"), ("task metrics", "task_metric"), (tasks, "task")]
    listed = [f"{label}: {', '.join(names(kind))}" for label, kind in groups]
    if not reward:
        listed.insert(1, f"multiple choice: {', '.join(MC_METRICS)}")
    return "; ".join(listed)


def _suggest(value: str) -> str:
    close = difflib.get_close_matches(value, [*names(), *MC_METRICS], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def check_metric_name(name: object, key: str = "eval_metric") -> str:
    """``name`` if it is a metric, task metric or task name; else a one-line :class:`ConfigError`."""
    if not isinstance(name, str):
        raise ConfigError(f"config key '{key}' must be a metric name (a string), got {type(name).__name__}")
    if name not in _registry() and not is_mc_metric(name):
        raise ConfigError(
            f"config key '{key}' must be a metric or task name, got {name!r}{_suggest(name)} (valid {_valid_list()})"
        )
    return name


def check_reward_name(spec: object, key: str = "reward") -> str:
    """``spec`` if it is a built-in name or looks like ``module:function``; else a one-line :class:`ConfigError`.

    Whether the module imports and has the function is checked by :func:`load_reward`.
    """
    if not isinstance(spec, str):
        raise ConfigError(
            f"config key '{key}' must be a built-in reward name or module:function (a string), "
            f"got {type(spec).__name__}"
        )
    if spec in _registry():
        return spec
    if is_mc_metric(spec):
        raise ConfigError(
            f"config key '{key}': '{spec}' is a multiple-choice eval metric (log-likelihood of given choices), not a "
            "reward of generated text; use a metric or task name"
        )
    if ":" in spec:
        module_name, _, fn_name = spec.partition(":")
        if module_name.strip() and fn_name.strip():
            return spec
        raise ConfigError(f"config key '{key}': {spec!r} is not module:function (both parts are needed)")
    raise ConfigError(
        f"config key '{key}' must be a built-in reward or module:function, got {spec!r}{_suggest(spec)} "
        f"(built-in {_valid_list(reward=True)})"
    )


def get_scorer(name: str, key: str = "eval_metric", *, tokenize: str = DEFAULT_TOKENIZE) -> MetricEntry:
    """The :class:`MetricEntry` entry of a name (a one-line :class:`ConfigError` naming ``key`` if unknown); a text
    metric (``bleu``, ``rouge*``) scores with ``tokenize``, task names and task metrics ignore it."""
    if is_mc_metric(check_metric_name(name, key)):
        raise ConfigError(
            f"{key} '{name}' scores the log-likelihood of each record's choices, not generated text: evaluate it "
            "with gkd.evaluation.evaluate (gkd eval), which computes the log-likelihoods"
        )
    entry = _registry()[name]
    if entry.kind == "metric" and name in _TEXT_METRICS:
        return _generic(name, check_tokenize(tokenize))
    return entry


# --------------------------------------------------------------------------------------------------- metrics


def resolve_scorer(
    name: str, key: str = "eval_metric", *, tokenize: str = DEFAULT_TOKENIZE
) -> Callable[[list[dict], list[str]], dict[str, float]]:
    """A scoring function ``(records, predictions) -> {metric: percent}`` for any name of the vocabulary.

    A task name gives all the task's metrics, headline first (:meth:`Task.score`, in the tasks' whitespace mode);
    any other name gives ``{name: value}``. ``tokenize`` (``standard`` or ``whitespace``, the config's
    ``eval_tokenize``) is how ``bleu`` / ``rouge*`` tokenise text.
    """
    entry = get_scorer(name, key, tokenize=tokenize)
    if entry.kind == "task":
        from gkd.tasks import get_task

        return get_task(name).score
    corpus = entry.corpus

    def score(records: list[dict], predictions: list[str]) -> dict[str, float]:
        return {name: float(corpus(predictions, records))}

    return score


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_PARSE_ERRORS = (ValueError, KeyError, IndexError, TypeError, AttributeError, StopIteration)


def check_records(
    name: str, records: Sequence[dict], key: str = "eval_metric", *, as_reward: bool | None = None
) -> None:
    """Raise a one-line :class:`DataError` when ``records`` cannot be scored by ``name``; cheap (a handful of records).

    Checks that a metric needing references gets records that have some, and, for task metrics and task names,
    that the records are the task's data (their own targets, or an empty prediction, are scored and a parse error is
    reported). ``as_reward`` (default: whether ``key`` mentions ``reward``) checks the name's reward meaning (for a
    task name, only the headline metric's references are needed). ``module:function`` rewards are not checked.
    """
    if as_reward is None:
        as_reward = "reward" in key
    if as_reward:
        check_reward_name(name, key)
        if name not in _registry():
            return  # module:function
    if is_mc_metric(check_metric_name(name, key)):
        for i, rec in enumerate(itertools.islice(records, CHECK_RECORDS)):
            try:
                M.answer_index(rec, i)  # choices and answer
            except DataError as e:
                raise DataError(f"{key} '{name}': {e}") from None
        return
    entry = get_scorer(name, key)
    sample = list(itertools.islice(records, CHECK_RECORDS))
    needs_refs = entry.reward_needs_references if as_reward else entry.needs_references
    what = "reward" if as_reward else "metric"

    free = [n for n, s in _registry().items() if s.kind == "task_metric" and not s.needs_references]
    if entry.task is not None:
        free = [n for n in free if _registry()[n].task == entry.task]

    def no_refs(index: int) -> DataError:
        return DataError(
            f"{key} '{name}' compares with targets but record {index} has none (no completion, final assistant "
            f"turn or 'references'); use records with one, or a {what} that needs no targets "
            f"({', '.join(free) or 'none for this task'})"
        )

    for i, rec in enumerate(sample):
        if needs_refs and not M.references_of(rec):
            raise no_refs(i)
    refs = [str(r) for rec in sample for r in (M.references_of(rec) or [])]
    if as_reward and name == "final_answer" and refs and not any("####" in r for r in refs):
        raise DataError(
            f"{key} 'final_answer' scores the answer after '####', but none of the first {len(sample)} records' "
            "targets has one: the data does not look like arithmetic / GSM8K data, and every reward would be 0; "
            "use a reward for this data (e.g. rouge2, or the task's name)"
        )
    if entry.task is None:
        return
    if entry.kind == "task":
        from gkd.tasks import get_task

        task = get_task(entry.task)

        def probe(rec: dict, pred: str) -> None:
            task.score([rec], [pred])
    else:

        def probe(rec: dict, pred: str) -> None:
            entry.example(rec, pred)

    for i, rec in enumerate(sample):
        refs = M.references_of(rec)
        try:
            probe(rec, refs[0] if refs else "")
        except M.NoReferenceError:
            if needs_refs or entry.kind != "task":
                raise no_refs(i) from None
            # a task name used as a reward on prompt-only records: only the headline has to work
            try:
                entry.example(rec, "")
            except _PARSE_ERRORS as e:
                raise _not_task_data(key, name, entry.task, i, e) from e
        except _PARSE_ERRORS as e:
            raise _not_task_data(key, name, entry.task, i, e) from e


def _not_task_data(key: str, name: str, task: str, index: int, error: BaseException) -> DataError:
    detail = _one_line(str(error) or type(error).__name__)
    return DataError(
        f"{key} '{name}': dataset does not look like task '{task}' data (record {index}: {detail}); "
        "use a metric that fits the data"
    )


# --------------------------------------------------------------------------------------------------- rewards


class BuiltinReward:
    """A reward from the vocabulary: the name's per-example function on each (record, completion) pair
    (``tokenize``: how ``bleu`` / ``rouge*`` tokenise, as for the eval metric of that name)."""

    def __init__(self, name: str, tokenize: str = DEFAULT_TOKENIZE):
        self.name = name
        self.tokenize = check_tokenize(tokenize)
        self.example = get_scorer(name, "reward", tokenize=tokenize).example

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], records: Sequence[dict]
    ) -> list[float]:
        return [float(self.example(rec, c)) for rec, c in zip(records, completions)]

    def __repr__(self) -> str:
        if self.tokenize != DEFAULT_TOKENIZE and self.name in _TEXT_METRICS:
            return f"BuiltinReward({self.name!r}, tokenize={self.tokenize!r})"
        return f"BuiltinReward({self.name!r})"


class _BuiltinRewards(Mapping[str, Callable[[], RewardFn]]):
    """name -> factory of the built-in reward (the vocabulary, built on first use)."""

    def __getitem__(self, name: str) -> Callable[[], RewardFn]:
        if name not in _registry():
            raise KeyError(name)
        return functools.partial(BuiltinReward, name)

    def __iter__(self) -> Iterator[str]:
        return iter(names())

    def __len__(self) -> int:
        return len(_registry())


BUILTIN_REWARDS: Mapping[str, Callable[[], RewardFn]] = _BuiltinRewards()


def load_reward(spec: str, key: str = "reward", *, tokenize: str = DEFAULT_TOKENIZE) -> RewardFn:
    """A built-in reward by name (any name of the vocabulary), or ``package.module:function``. ``tokenize`` is how
    the rewards ``bleu`` / ``rouge*`` tokenise (the same rule as the eval metrics: pass the config's
    ``eval_tokenize``); task names always score in whitespace mode."""
    check_reward_name(spec, key)
    if spec in _registry():
        return BuiltinReward(spec, tokenize)
    module_name, fn_name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"reward '{spec}': cannot import module '{module_name}' ({e}); check PYTHONPATH"
        ) from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"reward '{spec}': module '{module_name}' has no function '{fn_name}'")
    return fn


Scorer = MetricEntry  # the earlier name
