"""Every TRL dataset format end to end: tokenisation, on- and off-policy training, evaluation and rewards; plus the
TRL-style data options: apply_chat_template, chat_template_path, dataset_adapter and local dataset folders.

A word-level tokenizer with a chat template that writes role markers (``<|user|> ... <|end|> <|assistant|>``), so a
rendered prompt is visibly different from the plain one, and the tiny models of ``tiny.py`` built for it.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_config, make_model

import gkd
from gkd.data import tokenize_records
from gkd.errors import ConfigError, DataError
from gkd.metrics import prompt_text_of, references_of

MARKERS = ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
FORMATS = ["prompt_completion", "conversational", "messages", "prompt_only", "conversational_prompt_only"]


def fmt(record: dict, name: str) -> dict:
    """``record`` (prompt/completion strings and references) in TRL format ``name``."""
    p, c = record["prompt"], record["completion"]
    user, assistant = {"role": "user", "content": p}, {"role": "assistant", "content": c}
    return {
        "prompt_completion": {"prompt": p, "completion": c},
        "conversational": {"prompt": [user], "completion": [assistant]},
        "messages": {"messages": [user, assistant]},
        "prompt_only": {"prompt": p, "references": record["references"]},
        "conversational_prompt_only": {"prompt": [user], "references": record["references"]},
    }[name]


@pytest.fixture(scope="module")
def words(task):
    return task.vocabulary() + MARKERS


@pytest.fixture(scope="module")
def chat_tok(words):
    from gkd.tasks.base import build_word_tokenizer

    tok = build_word_tokenizer(words)
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def plain_tok(words):
    from gkd.tasks.base import build_word_tokenizer

    tok = build_word_tokenizer(words)
    tok.chat_template = None
    return tok


@pytest.fixture(scope="module")
def recs(task):
    return task.generate("train", 16, seed=0)


@pytest.fixture(scope="module")
def evals(task):
    return task.generate("test", 8, seed=0)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def chat(p: str) -> str:
    return f"<|user|> {p} <|end|> <|assistant|>"


def trainer(tmp_path, tok, train, name="out", evals=None, reward_fn=None, **cfg):
    settings = {"max_steps": 2, "max_prompt_length": 40, "max_new_tokens": 6, **cfg}
    config = base_config(output_dir=str(tmp_path / name), **settings)
    return gkd.GKDTrainer(
        config,
        student=make_model("llama_student", tok, seed=1),
        teacher=make_model("llama_teacher", tok, seed=0),
        tokenizer=tok,
        train_records=train,
        eval_records=evals,
        reward_fn=reward_fn,
        log=lambda m: None,
    )


def rows(tmp_path, name="out") -> list[dict]:
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# tokenisation
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FORMATS)
def test_each_format_tokenizes_to_the_expected_ids(name, chat_tok, recs):
    data = tokenize_records(
        [fmt(r, name) for r in recs[:4]], chat_tok, max_prompt_length=64, max_completion_length=16
    )
    eos = chat_tok.eos_token_id
    conversational = name in ("conversational", "messages", "conversational_prompt_only")
    for e, r in zip(data.examples, recs):
        assert e.prompt == ids(chat_tok, chat(r["prompt"]) if conversational else r["prompt"])
        if name.endswith("prompt_only"):
            assert e.completion is None
        else:
            assert e.completion == [*ids(chat_tok, r["completion"]), eos]  # the assistant content + EOS


def test_conversational_prompt_completion_gives_the_ids_of_the_messages_record(chat_tok, recs):
    a, b, c = tokenize_records(
        [fmt(recs[0], "messages"), fmt(recs[0], "conversational"), fmt(recs[0], "prompt_completion")],
        chat_tok,
        max_prompt_length=64,
        max_completion_length=16,
        apply_chat_template=True,
    ).examples
    assert (a.prompt, a.completion) == (b.prompt, b.completion) == (c.prompt, c.completion)


def test_apply_chat_template_wraps_string_prompts_only_when_asked(chat_tok, plain_tok, recs):
    rec = fmt(recs[0], "prompt_completion")
    off = tokenize_records([rec], chat_tok, max_prompt_length=64, max_completion_length=16).examples[0]
    on = tokenize_records(
        [rec], chat_tok, max_prompt_length=64, max_completion_length=16, apply_chat_template=True
    ).examples[0]
    assert off.prompt == ids(chat_tok, recs[0]["prompt"])
    assert on.prompt == ids(chat_tok, chat(recs[0]["prompt"])) and on.completion == off.completion
    with pytest.raises(ConfigError, match=r"apply_chat_template: true.*set chat_template_path") as e:
        tokenize_records(
            [rec], plain_tok, max_prompt_length=64, max_completion_length=16, apply_chat_template=True
        )
    assert "\n" not in str(e.value)
    # records with messages and no template: the one-line data error
    with pytest.raises(DataError, match="no chat template"):
        tokenize_records(
            [fmt(recs[0], "messages")], plain_tok, max_prompt_length=64, max_completion_length=16
        )


def test_conversational_details(chat_tok, recs):
    p, c = recs[0]["prompt"], recs[0]["completion"]
    system = {"role": "system", "content": "a"}
    first, answer = c.split()[0], " ".join(c.split()[1:])
    records = [
        # a system turn; the completion as several assistant messages (joined by a newline, as references_of does)
        {
            "prompt": [system, {"role": "user", "content": p}],
            "completion": [{"role": "assistant", "content": c}, {"role": "assistant", "content": "b"}],
        },
        # a prefilled answer: the final assistant turn of the prompt is continued, not closed
        {
            "prompt": [{"role": "user", "content": p}, {"role": "assistant", "content": first}],
            "completion": [{"role": "assistant", "content": answer}],
        },
        # content parts
        {
            "prompt": [{"role": "user", "content": p}],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": c}]}],
        },
    ]
    data = tokenize_records(records, chat_tok, max_prompt_length=64, max_completion_length=16)
    eos = chat_tok.eos_token_id
    a, b, d = data.examples
    assert a.prompt == ids(chat_tok, f"<|system|> a <|end|> {chat(p)}")
    assert a.completion == [*ids(chat_tok, c + "\nb"), eos] and references_of(records[0])[0] == c + "\nb"
    assert b.prompt == ids(chat_tok, f"<|user|> {p} <|end|> <|assistant|> {first}")
    assert b.completion == [*ids(chat_tok, answer), eos]
    assert d.completion == [*ids(chat_tok, c), eos] and references_of(records[2]) == [c]
    assert prompt_text_of(records[0]) == prompt_text_of(records[1]) == p
    bad = {"prompt": [{"role": "user", "content": p}], "completion": [{"role": "tool", "content": "x"}]}
    with pytest.raises(DataError, match="record 0: 'completion' messages must be assistant turns"):
        tokenize_records([bad], chat_tok, max_prompt_length=64, max_completion_length=16)
    with pytest.raises(DataError, match="record 0: the chat template failed"):
        tokenize_records(
            [{"prompt": [{"role": "user", "content": None}]}],
            chat_tok,
            max_prompt_length=64,
            max_completion_length=16,
        )


def test_references_and_prompt_text_of_every_format(recs):
    r = recs[0]
    for name in FORMATS:
        rec = fmt(r, name)
        assert prompt_text_of(rec) == r["prompt"], name
        assert references_of(rec)[0] == (
            r["references"][0] if name.endswith("prompt_only") else r["completion"]
        )


def test_records_of_mixed_formats_from_arrow_files(chat_tok, recs, tmp_path, monkeypatch):
    """A parquet file of several formats gives every row every column (None where absent): still each row's own."""
    import datasets

    from gkd.data import load_records

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    rows_in = [fmt(recs[0], "messages"), fmt(recs[1], "prompt_completion")]
    path = tmp_path / "mixed.parquet"
    columns = {k: [r.get(k) for r in rows_in] for k in ("messages", "prompt", "completion")}
    datasets.Dataset.from_dict(columns).to_parquet(str(path))
    loaded, _ = load_records(str(path))
    assert loaded[0]["prompt"] is None and loaded[1]["messages"] is None  # what Arrow does
    mixed = tokenize_records(loaded, chat_tok, max_prompt_length=64, max_completion_length=16).examples
    plain = tokenize_records(rows_in, chat_tok, max_prompt_length=64, max_completion_length=16).examples
    assert [(e.prompt, e.completion) for e in mixed] == [(e.prompt, e.completion) for e in plain]
    assert [references_of(r)[0] for r in loaded] == [recs[0]["completion"], recs[1]["completion"]]
    assert [prompt_text_of(r) for r in loaded] == [recs[0]["prompt"], recs[1]["prompt"]]


# ---------------------------------------------------------------------------------------------------------------
# training, evaluation, rewards
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FORMATS)
def test_each_format_trains_on_and_off_policy(name, chat_tok, recs, tmp_path):
    train = [fmt(r, name) for r in recs]
    for policy, lmbda in (("on", 1.0), ("off", 0.0)):
        extra = {"seq_kd": True} if policy == "off" and name.endswith("prompt_only") else {}
        t = trainer(tmp_path, chat_tok, train, name=policy, lmbda=lmbda, **extra)
        result = t.train()
        assert result.step == 2 and torch.isfinite(torch.tensor(result.final_loss)), (name, policy)
        steps = [m for m in rows(tmp_path, policy) if "on_policy" in m]
        assert [m["on_policy"] for m in steps] == [policy == "on"] * 2
        assert all(m["completion_tokens"] > 0 for m in steps)


def test_evaluation_scores_conversational_data_like_the_messages_format(chat_tok, recs, evals, tmp_path):
    scores = {}
    for name in ("messages", "conversational"):
        t = trainer(
            tmp_path,
            chat_tok,
            [fmt(r, name) for r in recs],
            name=name,
            evals=[fmt(r, name) for r in evals],
            eval_metric="summarization",
            lmbda=0.0,
            max_steps=1,
        )
        scores[name] = t.evaluate()
        assert "greedy/set_match" in "".join(scores[name]), scores[name]
    assert scores["messages"] == scores["conversational"]


def test_a_reward_sees_the_prompt_text_and_references_of_conversational_records(chat_tok, recs, tmp_path):
    seen = []

    def reward(prompts, completions, records):
        seen.append((prompts, records))
        return [float(len(c.split())) for c in completions]

    train = [fmt(r, "conversational") for r in recs]
    t = trainer(
        tmp_path,
        chat_tok,
        train,
        lmbda=1.0,
        alpha=0.5,
        reward="my:len",
        reward_fn=reward,
        num_generations=2,
        per_device_train_batch_size=4,
    )
    assert t.train().step == 2
    prompts, records = seen[0]
    assert prompts == [prompt_text_of(r) for r in records] and all(p.endswith(":") for p in prompts)
    by_prompt = {r["prompt"]: r["completion"] for r in recs}
    assert all(references_of(r) == [by_prompt[p]] for p, r in zip(prompts, records))
    # a built-in reward reads the conversational completion as the reference
    t = trainer(
        tmp_path,
        chat_tok,
        train,
        name="bleu",
        lmbda=1.0,
        alpha=0.5,
        reward="bleu",
        num_generations=2,
        per_device_train_batch_size=4,
    )
    assert t.train().step == 2
    steps = [m for m in rows(tmp_path, "bleu") if "on_policy" in m]
    assert len(steps) == 2 and any(m["reward_mean"] > 0 for m in steps)  # some overlap with the references


def test_apply_chat_template_in_training(chat_tok, plain_tok, recs, tmp_path):
    train = [fmt(r, "prompt_completion") for r in recs]
    t = trainer(tmp_path, chat_tok, train, name="on", apply_chat_template=True, lmbda=0.0)
    t.setup()
    assert t.run.train_data.examples[0].prompt == ids(chat_tok, chat(recs[0]["prompt"]))
    t = trainer(tmp_path, chat_tok, train, name="off", lmbda=0.0)
    t.setup()
    assert t.run.train_data.examples[0].prompt == ids(chat_tok, recs[0]["prompt"])
    with pytest.raises(ConfigError, match="apply_chat_template"):
        trainer(tmp_path, plain_tok, train, name="none", apply_chat_template=True).setup()


# ---------------------------------------------------------------------------------------------------------------
# chat_template_path
# ---------------------------------------------------------------------------------------------------------------
def test_chat_template_path_from_a_file_or_a_tokenizer_folder(chat_tok, plain_tok, recs, tmp_path):
    train = [fmt(r, "conversational") for r in recs]
    jinja = tmp_path / "template.jinja"
    jinja.write_text(TEMPLATE)
    folder = tmp_path / "tok"
    chat_tok.save_pretrained(folder)
    expected = ids(chat_tok, chat(recs[0]["prompt"]))
    for spec in (str(jinja), str(folder)):
        t = trainer(tmp_path, plain_tok, train, name=f"run-{len(spec)}", chat_template_path=spec, lmbda=0.0)
        assert t.train().step == 2
        assert t.run.train_data.examples[0].prompt == expected
        assert plain_tok.chat_template is None  # the given tokenizer is left as it was
        # the saved tokenizer carries the template, so the trained model renders prompts the same way
        from transformers import AutoTokenizer

        final = sorted(t.run.output_dir.glob("checkpoint-*"))[-1]
        assert AutoTokenizer.from_pretrained(final).chat_template == TEMPLATE
    # the tokenizer loaded from a path gets it too
    from gkd.models import load_tokenizer

    plain_dir = tmp_path / "plain"
    plain_tok.save_pretrained(plain_dir)
    assert load_tokenizer(str(plain_dir), chat_template_path=str(jinja)).chat_template == TEMPLATE


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("missing.jinja", "does not exist"),
        ("./nowhere/tok", "does not exist"),
        ("EMPTY_DIR", "has no chat template"),
        ("BAD_JINJA", "is not a usable Jinja chat template"),
    ],
)
def test_a_bad_chat_template_path_is_one_line(spec, fragment, plain_tok, recs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    spec = {"EMPTY_DIR": str(tmp_path / "empty"), "BAD_JINJA": str(tmp_path / "bad.jinja")}.get(spec, spec)
    with pytest.raises(ConfigError, match=fragment) as e:
        trainer(tmp_path, plain_tok, [fmt(recs[0], "messages")], chat_template_path=spec).setup()
    assert "chat_template_path" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# dataset_adapter and local dataset folders
# ---------------------------------------------------------------------------------------------------------------
LAYOUTS = {
    "gsm8k": (
        {"question": "Q a b c :", "answer": "a <<1+2=3>> b #### c"},
        ("Question: Q a b c :\nAnswer:", "a  b #### c"),
    ),
    "xsum": ({"document": "d e f g", "summary": "e f"}, ("Document: d e f g\nSummary:", "e f")),
    "wmt14": (
        {"translation": {"de": "h i j", "en": "k l m"}},
        ("Translate from English to German.\nEnglish: k l m\nGerman:", "h i j"),
    ),
}


@pytest.mark.parametrize("adapter", sorted(LAYOUTS))
def test_dataset_adapter_reads_a_benchmark_layout(adapter, chat_tok, tmp_path):
    raw, (prompt, completion) = LAYOUTS[adapter]
    path = tmp_path / f"{adapter}.jsonl"
    path.write_text("".join(json.dumps(raw) + "\n" for _ in range(8)))
    t = trainer(
        tmp_path,
        chat_tok,
        None,
        dataset=str(path),
        dataset_adapter=adapter,
        eval_dataset=str(path),
        eval_metric="rouge2",
        lmbda=0.5,
        per_device_train_batch_size=4,
    )
    t.setup()
    for data in (t.run.train_data, t.run.eval_data):
        rec = data.examples[0].record
        assert rec == {"prompt": prompt, "completion": completion, "references": [completion]}
    assert t.train().step == 2


def test_dataset_adapter_errors_are_one_line(chat_tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(ConfigError, match="'dataset_adapter' must be one of gsm8k, wmt14, xsum, got 'squad'"):
        trainer(tmp_path, chat_tok, None, dataset=str(path), dataset_adapter="squad").setup()
    with pytest.raises(DataError, match=r"record 0 has no 'question' field.*drop dataset_adapter"):
        trainer(tmp_path, chat_tok, None, dataset=str(path), dataset_adapter="gsm8k").setup()


def _write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_local_folder_as_trl_dataset_name_with_train_and_test_splits(
    chat_tok, recs, evals, tmp_path, monkeypatch
):
    """TRL's ``dataset_name`` / ``dataset_train_split`` / ``dataset_test_split`` on folders of data files and on a
    saved DatasetDict, read the way ``datasets.load_dataset(folder)`` reads them."""
    import datasets

    from gkd.config import load_config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    train, test = [fmt(r, "conversational") for r in recs], [fmt(r, "conversational") for r in evals]
    jsonl = tmp_path / "jsonl"
    _write(jsonl / "train.jsonl", train)
    _write(jsonl / "dev.jsonl", test)  # datasets' name for the validation split
    parquet = tmp_path / "parquet"
    (parquet / "data").mkdir(parents=True)
    datasets.Dataset.from_list(train).to_parquet(str(parquet / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(test).to_parquet(str(parquet / "data" / "test-00000-of-00001.parquet"))
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}
    ).save_to_disk(str(saved))
    for folder, test_split in ((jsonl, "validation"), (parquet, "test"), (saved, "test")):
        yaml = tmp_path / f"{folder.name}.yaml"
        yaml.write_text(
            f"dataset_name: {folder}\ndataset_train_split: train\ndataset_test_split: {test_split}\n"
            f"eval_strategy: steps\neval_steps: 2\neval_metric: rouge2\noutput_dir: {tmp_path / ('run-' + folder.name)}\n"
            "max_steps: 2\nmax_new_tokens: 6\nmax_prompt_length: 40\nper_device_train_batch_size: 8\n"
            "lmbda: 0.5\nlogging_steps: 1\nsave_steps: 0\nprogress: false\n"
        )
        cfg = load_config(str(yaml))
        assert (cfg.dataset, cfg.eval_dataset, cfg.eval_split) == (str(folder), str(folder), test_split)
        t = gkd.GKDTrainer(
            cfg,
            student=make_model("llama_student", chat_tok, seed=1),
            teacher=make_model("llama_teacher", chat_tok, seed=0),
            tokenizer=chat_tok,
            log=lambda m: None,
        )
        t.train()
        assert [e.record for e in t.run.train_data.examples] == train, folder
        assert [e.record for e in t.run.eval_data.examples] == test, folder
        assert any("eval/greedy/rouge2" in m for m in rows(tmp_path, "run-" + folder.name)), folder
    # a split the folder does not have names the key that chose it
    with pytest.raises(DataError, match="has no split 'validation' \\(it has train, test\\); set eval_split"):
        trainer(tmp_path, chat_tok, None, dataset=str(parquet), eval_dataset=str(parquet)).setup()
