"""The one vocabulary of metrics, task metrics and rewards (gkd.scoring): every name as a metric and as a reward on
every record format, reward == metric / 100, one-line errors for typos, and cheap checks of records against a name."""

from __future__ import annotations

import pytest

from gkd import metrics as M
from gkd import rl, scoring
from gkd.errors import ConfigError, DataError
from gkd.scoring import (
    BUILTIN_REWARDS,
    check_metric_name,
    check_records,
    check_reward_name,
    get_scorer,
    load_reward,
    names,
    resolve_scorer,
)
from gkd.tasks import TASKS, get_task

GENERIC = [
    "exact_match",
    "final_answer",
    "bleu",
    "rouge1",
    "rouge2",
    "rougeL",
    "rougeLsum",
    "rouge1_stemmed",
    "rouge2_stemmed",
    "rougeL_stemmed",
    "rougeLsum_stemmed",
    "chrf",
    "gsm8k_answer",
]
TASK_METRICS = ["set_match", "item_f1", "faithfulness", "dup_rate", "chain_valid", "agreement"]
FORMATS = ["prompt_completion", "messages", "conversational", "prompt_only_with_references"]
SYSTEM = {"role": "system", "content": "answer briefly"}


def as_format(rec: dict, fmt: str) -> dict:
    """A prompt/completion task record rewritten in another record format, with the same targets."""
    user = {"role": "user", "content": rec["prompt"]}
    assistant = {"role": "assistant", "content": rec["completion"]}
    refs = list(rec["references"])
    if fmt == "prompt_completion":
        return dict(rec)
    if fmt == "messages":
        return {"messages": [SYSTEM, user, assistant], "references": refs}
    if fmt == "conversational":
        return {"prompt": [SYSTEM, user], "completion": [assistant], "references": refs}
    if fmt == "prompt_only_with_references":
        return {"prompt": rec["prompt"], "references": refs}
    raise AssertionError(fmt)


def data_task(name: str) -> str:
    """The task whose data suits a name: its own task, arithmetic for final_answer, translation for the rest."""
    entry = get_scorer(name)
    if entry.task is not None:
        return entry.task
    return "arithmetic" if name == "final_answer" else "translation"


_CACHE: dict[str, tuple[list[dict], list[str]]] = {}


def records_and_predictions(task_name: str) -> tuple[list[dict], list[str]]:
    """Task records and predictions of every quality: gold, another reference, a cut target, a repeat, empty."""
    if task_name not in _CACHE:
        recs = get_task(task_name).generate("test", 6, seed=0)
        preds = [
            recs[0]["completion"],
            recs[1]["references"][-1],
            " ".join(recs[2]["completion"].split()[:-1]),
            recs[3]["completion"] + " " + recs[3]["completion"].split()[0],
            "",
            recs[4]["completion"],  # the wrong record's target
        ]
        _CACHE[task_name] = (recs, preds)
    return _CACHE[task_name]


def headline(name: str) -> str:
    entry = get_scorer(name)
    return get_task(name).metric if entry.kind == "task" else name


# --------------------------------------------------------------------------------------------------- vocabulary


def test_vocabulary_lists_metrics_task_metrics_and_tasks():
    assert names("metric") == GENERIC
    assert names("task_metric") == TASK_METRICS
    assert names("task") == list(TASKS)
    assert names() == GENERIC + TASK_METRICS + list(TASKS)
    assert get_scorer("set_match").task == "summarization" and get_scorer("chain_valid").task == "arithmetic"
    assert get_scorer("bleu").task is None and get_scorer("bleu").needs_references
    assert not get_scorer("faithfulness").needs_references
    # a task name needs references as a metric when any of its metrics does; as a reward only its headline counts
    summ = get_scorer("summarization")
    assert summ.needs_references and not summ.reward_needs_references


def test_rl_reexports_the_scoring_vocabulary():
    assert rl.load_reward is scoring.load_reward and rl.BUILTIN_REWARDS is BUILTIN_REWARDS
    assert list(BUILTIN_REWARDS) == names() and len(BUILTIN_REWARDS) == len(names())
    reward = BUILTIN_REWARDS["exact_match"]()
    assert reward(["p"], ["a b"], [{"prompt": "p", "completion": "a  b"}]) == [1.0]
    assert "nope" not in BUILTIN_REWARDS


# --------------------------------------------------------------------------------------------------- as metrics


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", GENERIC + TASK_METRICS + list(TASKS))
def test_every_name_is_a_metric_on_every_format(name, fmt):
    recs, preds = records_and_predictions(data_task(name))
    scorer = resolve_scorer(name)
    converted = [as_format(r, fmt) for r in recs]
    expected = scorer(recs, preds)
    got = scorer(converted, preds)
    assert got == expected
    keys = get_task(name).metrics if name in TASKS else [name]
    assert list(got) == keys
    assert all(0.0 <= v <= 100.0 for v in got.values())
    # gold targets score perfectly in this format too (dup_rate: lower is better)
    gold = scorer(converted, [r["completion"] for r in recs])
    for metric, value in gold.items():
        assert value == pytest.approx(0.0 if metric == "dup_rate" else 100.0), metric


def test_a_task_name_as_metric_is_task_score():
    recs, preds = records_and_predictions("arithmetic")
    assert resolve_scorer("arithmetic")(recs, preds) == get_task("arithmetic").score(recs, preds)
    assert resolve_scorer("chain_valid")(recs, preds) == {
        "chain_valid": get_task("arithmetic").score(recs, preds)["chain_valid"]
    }


def test_messages_records_without_references_use_the_final_assistant_turn():
    recs, _ = records_and_predictions("translation")
    msgs = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["completion"]},
            ]
        }
        for r in recs
    ]
    preds = [r["completion"] for r in recs[:3]] + [r["references"][-1] for r in recs[3:]]
    # only the final turn is a reference now, so the other synonyms no longer count as exact matches
    assert resolve_scorer("exact_match")(msgs, preds) == {"exact_match": 50.0}
    assert resolve_scorer("translation")(msgs, [r["completion"] for r in recs])["bleu"] == pytest.approx(
        100.0
    )


# --------------------------------------------------------------------------------------------------- as rewards


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", GENERIC + TASK_METRICS + list(TASKS))
def test_every_name_is_a_reward_on_every_format(name, fmt):
    recs, preds = records_and_predictions(data_task(name))
    converted = [as_format(r, fmt) for r in recs]
    prompts = [r["prompt"] for r in recs]
    reward = load_reward(name)
    values = rl.compute_rewards(reward, name, prompts, preds, converted).tolist()
    assert len(values) == len(preds) and all(0.0 <= v <= 1.0 for v in values)
    assert reward(prompts, preds, converted) == reward(prompts, preds, recs)  # same value in every format
    if name == "bleu":
        from sacrebleu.metrics import BLEU

        sentence = BLEU(tokenize="13a", effective_order=True)  # the standard tokenisation by default
        for value, rec, pred in zip(values, recs, preds):
            assert value == pytest.approx(sentence.sentence_score(pred, M.references_of(rec)).score / 100)
        return
    metric = resolve_scorer(name)
    for value, rec, pred in zip(values, converted, preds):
        assert value == pytest.approx(metric([rec], [pred])[headline(name)] / 100, abs=1e-6)


@pytest.mark.parametrize("name", GENERIC + TASK_METRICS + list(TASKS))
def test_gold_targets_get_the_top_reward(name):
    recs, _ = records_and_predictions(data_task(name))
    values = load_reward(name)([r["prompt"] for r in recs], [r["completion"] for r in recs], recs)
    assert values == pytest.approx([0.0 if headline(name) == "dup_rate" else 1.0] * len(recs))


@pytest.mark.parametrize(("tokenize", "expected"), [("standard", 60.0), ("whitespace", 40.0)])
def test_rouge2_reward_equals_the_rouge2_metric(tokenize, expected):
    """The reward is the metric's own ROUGE-2, with the same tokenisation (standard: rouge-score lower-cases)."""
    rec = {"prompt": "p", "completion": "The cat sat on the mat"}
    pred = "the cat sat on a mat"  # bigrams: cat sat, sat on shared of 5 each -> F1 0.4 (0.6 if lower-cased)
    metric = resolve_scorer("rouge2", tokenize=tokenize)([rec], [pred])["rouge2"]
    assert metric == pytest.approx(expected)
    assert load_reward("rouge2", tokenize=tokenize)(["p"], [pred], [rec]) == [pytest.approx(metric / 100)]
    if tokenize == "standard":
        assert resolve_scorer("rouge2")([rec], [pred])["rouge2"] == metric  # the default
        assert load_reward("rouge2")(["p"], [pred], [rec]) == [pytest.approx(metric / 100)]


def test_bleu_reward_is_sentence_bleu_with_the_metric_tokenisation():
    rec = {"prompt": "p", "completion": "#### 9 0"}
    # whitespace: three tokens, corpus BLEU-4 needs a 4-gram; standard (13a) splits "####" into four "#"
    assert resolve_scorer("bleu", tokenize="whitespace")([rec], ["#### 9 0"])["bleu"] == 0.0
    assert resolve_scorer("bleu")([rec], ["#### 9 0"])["bleu"] == pytest.approx(100.0)
    for tokenize in ("standard", "whitespace"):
        reward = load_reward("bleu", tokenize=tokenize)
        assert reward(["p"], ["#### 9 0"], [rec]) == [pytest.approx(1.0)]  # effective order
    # whitespace: "x~" and "x" are different tokens, as in the corpus metric; 13a splits "~" off
    x = [{"prompt": "p", "completion": "x b"}]
    assert load_reward("bleu", tokenize="whitespace")(["p"], ["x~ b"], x)[0] < 0.9
    standard, whitespace = load_reward("bleu"), load_reward("bleu", tokenize="whitespace")
    assert standard(["p"], ["x b."], x) == whitespace(["p"], ["x b ."], x)  # 13a splits the period off
    assert whitespace(["p"], ["x b."], x)[0] < standard(["p"], ["x b."], x)[0]  # "b." is not "b"


# real text: punctuation glued to words, capitals
REAL_TEXT = [
    (
        {"prompt": "Q1", "completion": "The cat sat on the mat, didn't it?"},
        "the cat sat on the mat didn't it",
    ),
    ({"prompt": "Q2", "completion": "Paris is the capital of France."}, "Paris is France's capital."),
    ({"prompt": "Q3", "completion": "Well... I think so! Yes, I do."}, "Well, I think so. Yes I do!"),
]


class _Split:
    def tokenize(self, text):
        return text.split()


def _direct(name: str, tokenize: str, records: list[dict], preds: list[str]) -> tuple[float, list[float]]:
    """The corpus value and per-example rewards of a text metric, computed with sacrebleu / rouge-score directly."""
    refs = [r["completion"] for r in records]
    if name == "bleu":
        from sacrebleu.metrics import BLEU

        sacre = {"standard": "13a", "whitespace": "none"}[tokenize]
        corpus = BLEU(tokenize=sacre).corpus_score(preds, [refs]).score
        sentence = BLEU(tokenize=sacre, effective_order=True)
        return corpus, [sentence.sentence_score(p, [r]).score / 100 for p, r in zip(preds, refs)]
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer([name], tokenizer=None if tokenize == "standard" else _Split())
    each = [scorer.score(r, p)[name].fmeasure for r, p in zip(refs, preds)]
    return 100 * sum(each) / len(each), each


@pytest.mark.parametrize("name", ["bleu", "rouge1", "rouge2", "rougeL", "rougeLsum"])
def test_text_metrics_score_real_text_with_the_standard_tokenisation_by_default(name):
    records, preds = [r for r, _ in REAL_TEXT], [p for _, p in REAL_TEXT]
    std, std_rewards = _direct(name, "standard", records, preds)
    ws, ws_rewards = _direct(name, "whitespace", records, preds)
    assert std != pytest.approx(ws)
    assert resolve_scorer(name)(records, preds) == {
        name: pytest.approx(std)
    }  # eval_tokenize: standard (default)
    assert resolve_scorer(name, tokenize="standard")(records, preds) == {name: pytest.approx(std)}
    assert resolve_scorer(name, tokenize="whitespace")(records, preds) == {name: pytest.approx(ws)}
    # a reward of the same name follows the same rule
    prompts = [r["prompt"] for r in records]
    assert load_reward(name)(prompts, preds, records) == pytest.approx(std_rewards)
    assert load_reward(name, tokenize="whitespace")(prompts, preds, records) == pytest.approx(ws_rewards)
    assert get_scorer(name, tokenize="whitespace").example(records[0], preds[0]) == pytest.approx(
        ws_rewards[0]
    )
    assert repr(load_reward(name, tokenize="whitespace")) == f"BuiltinReward({name!r}, tokenize='whitespace')"


def _punctuated_translation() -> tuple[list[dict], list[str]]:
    """Translation records and predictions with a full stop glued to the last word: 13a splits it off, whitespace
    mode does not, so the two tokenisations give different BLEU."""
    recs = get_task("translation").generate("test", 6, seed=0)
    return recs, [r["completion"] + "." for r in recs]


@pytest.mark.parametrize("tokenize", ["standard", "whitespace"])
def test_task_names_always_score_in_whitespace_mode(tokenize):
    recs, preds = _punctuated_translation()
    assert M.bleu(preds, recs, tokenize="standard") != pytest.approx(
        M.bleu(preds, recs, tokenize="whitespace")
    )
    scores = resolve_scorer("translation", tokenize=tokenize)(recs, preds)
    assert scores == get_task("translation").score(recs, preds)
    assert scores["bleu"] == pytest.approx(M.bleu(preds, recs, tokenize="whitespace"))
    rewards = load_reward("translation", tokenize=tokenize)([r["prompt"] for r in recs], preds, recs)
    assert rewards == pytest.approx([M.bleu_score(r, p, tokenize="whitespace") for r, p in zip(recs, preds)])
    summ, _ = records_and_predictions("summarization")
    cut = [r["completion"] + "." for r in summ]  # summarization's own (canonical, whitespace) rouge2
    assert resolve_scorer("summarization", tokenize=tokenize)(summ, cut) == get_task("summarization").score(
        summ, cut
    )


def test_tokenize_must_be_standard_or_whitespace():
    for call in (
        lambda: resolve_scorer("bleu", tokenize="13a"),
        lambda: load_reward("rouge2", tokenize="default"),
        lambda: get_scorer("rougeL", tokenize=None),
    ):
        with pytest.raises(
            ConfigError, match=r"^config key 'eval_tokenize' must be one of standard, whitespace"
        ):
            call()


def test_evaluate_passes_the_tokenisation_on(tokenizer, eval_records):
    from conftest import make_model

    from gkd.data import tokenize_records
    from gkd.evaluation import evaluate, generate_texts

    model = make_model("llama_student", tokenizer, seed=1)
    data = tokenize_records(eval_records[:6], tokenizer, max_prompt_length=64, max_completion_length=16)
    records = [e.record for e in data.examples]
    greedy = generate_texts(model, tokenizer, data, greedy=True, max_new_tokens=8, batch_size=6)
    kw = {"max_new_tokens": 8, "sampled": {}, "batch_size": 6}
    for tokenize in ("standard", "whitespace"):
        got = evaluate(model, tokenizer, data, "rouge1", tokenize=tokenize, **kw)["greedy"]
        assert got == resolve_scorer("rouge1", tokenize=tokenize)(records, greedy)
    assert evaluate(model, tokenizer, data, "rouge1", **kw)["greedy"] == resolve_scorer("rouge1")(
        records, greedy
    )


def test_final_answer_reward_works():
    recs = get_task("arithmetic").generate("test", 4, seed=0)
    answer = recs[1]["completion"].split("####")[1]
    preds = [recs[0]["references"][-1], "1 + 1 = 2 ; ####" + answer, "#### 1 2 3 4 5", "no answer"]
    values = load_reward("final_answer")([r["prompt"] for r in recs], preds, recs)
    assert values == [1.0, 1.0, 0.0, 0.0]
    assert values == [M.final_answer([p], [r]) / 100 for p, r in zip(preds, recs)]
    msgs = [as_format(r, "messages") for r in recs]
    assert load_reward("arithmetic")([""] * 4, preds, msgs) == values  # the task's headline is final_answer


def test_task_name_reward_cuts_the_prediction_at_eos():
    recs, _ = records_and_predictions("summarization")
    pred = recs[0]["completion"] + " <eos> x y"
    assert load_reward("summarization")(["p"], [pred], recs[:1]) == [1.0]
    assert load_reward("set_match")(["p"], [pred], recs[:1]) == [
        0.0
    ]  # a task metric scores the text as given


def test_reward_on_records_without_targets_is_an_error_not_zero():
    from gkd.errors import RewardError

    with pytest.raises(RewardError, match="has no reference"):
        rl.compute_rewards(load_reward("exact_match"), "exact_match", ["p"], ["a"], [{"prompt": "p"}])


def test_custom_reward_specs():
    assert load_reward("gkd.metrics:exact_match") is M.exact_match  # any callable module:function
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module_xyz'"):
        load_reward("no_such_module_xyz:fn")
    with pytest.raises(ConfigError, match=r"module 'gkd\.metrics' has no function 'nope'"):
        load_reward("gkd.metrics:nope")


# --------------------------------------------------------------------------------------------------- name errors


@pytest.mark.parametrize(
    "check, bad, key, suggestion",
    [
        (check_metric_name, "exact_mtch", "eval_metric", "exact_match"),
        (check_metric_name, "set_mach", "eval_metric", "set_match"),
        (check_metric_name, "sumarization", "eval_metric", "summarization"),
        (check_reward_name, "set_mach", "reward", "set_match"),
        (check_reward_name, "final_anwser", "reward", "final_answer"),
        (load_reward, "rouge_2", "reward", "rouge2"),
    ],
)
def test_typos_are_one_line_with_a_suggestion_and_the_valid_list(check, bad, key, suggestion):
    with pytest.raises(ConfigError) as info:
        check(bad)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"'{key}'" in msg and repr(bad) in msg
    assert f"did you mean '{suggestion}'?" in msg
    assert all(n in msg for n in names())


def test_name_errors_without_a_close_match_and_custom_keys():
    with pytest.raises(ConfigError) as info:
        check_metric_name("zzzz", key="--metric")
    assert "did you mean" not in str(info.value) and "'--metric'" in str(info.value)
    with pytest.raises(ConfigError, match="built-in reward"):
        check_reward_name("bogus")
    with pytest.raises(ConfigError, match="must be a metric name"):
        check_metric_name(None)
    with pytest.raises(ConfigError, match="both parts"):
        check_reward_name(":fn")
    with pytest.raises(ConfigError, match="'eval_metric'"):
        resolve_scorer("exact_mtch")
    assert check_reward_name("my.module:score") == "my.module:score"  # importability is load_reward's job
    assert [check_metric_name(n) for n in names()] == names()
    assert [check_reward_name(n) for n in names()] == names()


# --------------------------------------------------------------------------------------------------- check_records


def _prompt_only(records: list[dict]) -> list[dict]:
    return [{"prompt": r["prompt"]} for r in records]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", GENERIC + TASK_METRICS + list(TASKS))
def test_check_records_accepts_fitting_data_in_every_format(name, fmt):
    recs, _ = records_and_predictions(data_task(name))
    converted = [as_format(r, fmt) for r in recs]
    assert check_records(name, converted) is None
    assert check_records(name, converted, key="reward") is None


def test_check_records_catches_prompt_only_records_for_a_reference_metric():
    recs, _ = records_and_predictions("translation")
    with pytest.raises(DataError) as info:
        check_records("exact_match", _prompt_only(recs))
    msg = str(info.value)
    assert "\n" not in msg
    assert (
        msg.startswith("eval_metric 'exact_match'") and "record 0 has none" in msg and "'references'" in msg
    )
    mixed = recs[:2] + _prompt_only(recs[2:])
    with pytest.raises(DataError, match="record 2 has none"):
        check_records("bleu", mixed, key="reward")
    # messages ending with a user turn are prompt-only too
    msgs = [{"messages": [{"role": "user", "content": r["prompt"]}]} for r in recs]
    with pytest.raises(DataError, match="record 0 has none"):
        check_records("translation", msgs)


def test_check_records_prompt_only_summarization():
    recs, _ = records_and_predictions("summarization")
    bare = _prompt_only(recs)
    for name in ("set_match", "item_f1", "faithfulness", "dup_rate"):
        check_records(name, bare)  # these read the prompt only
    check_records("summarization", bare, key="reward")  # the headline (set_match) needs no targets
    with pytest.raises(DataError, match=r"eval_metric 'summarization' .* \(set_match, item_f1, faithfulness"):
        check_records("summarization", bare)  # its rouge2 does


@pytest.mark.parametrize("key", ["eval_metric", "reward"])
def test_check_records_catches_another_tasks_data(key):
    summ, _ = records_and_predictions("summarization")
    with pytest.raises(DataError) as info:
        check_records("arithmetic", summ, key=key)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"{key} 'arithmetic': dataset does not look like task 'arithmetic' data (record 0: " in msg
    assert "not an arithmetic prompt" in msg and msg.endswith("use a metric that fits the data")
    arith, _ = records_and_predictions("arithmetic")
    with pytest.raises(DataError, match="task 'summarization' data"):
        check_records("set_match", [as_format(r, "messages") for r in arith], key=key)
    with pytest.raises(DataError, match="task 'summarization' data"):
        check_records("summarization", _prompt_only(arith), key="reward")


def test_check_records_looks_at_a_handful_of_records_only():
    class Spy(list):
        seen = -1

        def __iter__(self):
            for i, item in enumerate(list.__iter__(self)):
                self.seen = i
                yield item

        def __getitem__(self, index):
            raise AssertionError("check_records must not index the whole dataset")

    recs, _ = records_and_predictions("summarization")
    many = Spy(recs * 1000 + _prompt_only(recs))  # the bad records at the end are never reached
    check_records("summarization", many)
    assert 0 <= many.seen < 16


def test_check_records_name_errors_and_custom_rewards():
    recs, _ = records_and_predictions("summarization")
    with pytest.raises(ConfigError, match="did you mean 'set_match'"):
        check_records("set_mach", recs)
    with pytest.raises(ConfigError, match="'reward'"):
        check_records("set_mach", recs, key="reward")
    assert check_records("my_module:score", _prompt_only(recs), key="reward") is None
    with pytest.raises(ConfigError):
        check_records("my_module:score", recs)  # not a metric
