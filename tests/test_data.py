"""Data: reading records (JSONL, saved datasets, folders), tokenizing them, padding, collating and the batch stream."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from gkd.data import (
    BatchStream,
    Example,
    TokenizedDataset,
    collate,
    load_records,
    pad_left,
    pad_right,
    read_jsonl,
    split_record,
    tokenize_records,
)
from gkd.errors import DataError

RECS = [
    {"prompt": "a b c", "completion": "d e"},
    {"prompt": "f", "completion": "g h i", "references": ["g h i"]},
    {"prompt": "j k"},
]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep the ``datasets`` builder cache inside tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def test_gkd_data_offers_every_name_of_its_files():
    """``gkd.data`` is one package of four files; every public name of each is importable from ``gkd.data``."""
    import gkd.data
    from gkd.data import arrow, batch, records, tokenize

    for part in (records, tokenize, arrow, batch):
        for name in part.__all__:
            assert getattr(gkd.data, name) is getattr(part, name), name
    assert set(gkd.data.__all__) == {n for part in (records, tokenize, arrow, batch) for n in part.__all__}


# ---------------------------------------------------------------------------------------------------------------
# reading records
# ---------------------------------------------------------------------------------------------------------------
def test_read_jsonl_names_file_and_line_of_a_bad_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [RECS[0], "", "{not json", RECS[1]])
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: not valid JSON") and "skip_bad_lines: true" in msg
    assert "\n" not in msg

    path = write_jsonl(tmp_path / "list.jsonl", [RECS[0], "[1, 2]"])
    with pytest.raises(DataError, match=r"list\.jsonl:2: a record must be a JSON object, got list"):
        read_jsonl(path)


def test_read_jsonl_skip_bad_lines_counts_them(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [RECS[0], "{oops", "", '"a string"', RECS[1], "   ", "7"])
    records, skipped = read_jsonl(path, skip_bad_lines=True)
    assert records == [RECS[0], RECS[1]]
    assert skipped == 3  # blank lines are neither records nor bad lines
    assert read_jsonl(write_jsonl(tmp_path / "ok.jsonl", RECS)) == (RECS, 0)


def test_read_jsonl_of_a_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot read dataset file"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_load_records_from_jsonl_and_json_files(tmp_path, hf_cache):
    assert load_records(str(write_jsonl(tmp_path / "d.jsonl", RECS))) == (RECS, 0)
    # a .json file holding JSON lines is read line by line (bad lines can be skipped and counted)
    lines = write_jsonl(tmp_path / "lines.json", [RECS[0], "{bad", RECS[1]])
    assert load_records(str(lines), skip_bad_lines=True) == ([RECS[0], RECS[1]], 1)
    # a .json file holding one array goes through the local ``json`` builder
    array = tmp_path / "array.json"
    array.write_text(json.dumps(RECS[:2]))
    records, skipped = load_records(str(array))
    assert skipped == 0
    assert [(r["prompt"], r["completion"]) for r in records] == [
        (r["prompt"], r["completion"]) for r in RECS[:2]
    ]


def test_load_records_from_a_saved_dataset(tmp_path):
    import datasets

    rows = RECS[:2]
    plain = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    datasets.Dataset.from_list(plain).save_to_disk(str(tmp_path / "single"))
    assert load_records(str(tmp_path / "single")) == (plain, 0)

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(plain), "test": datasets.Dataset.from_list(plain[1:])}
    )
    dd.save_to_disk(str(tmp_path / "dict"))
    assert load_records(str(tmp_path / "dict"), split="test") == (plain[1:], 0)
    assert load_records(str(tmp_path / "dict"), split="train") == (plain, 0)
    with pytest.raises(DataError, match="has no split 'validation'; available: train, test"):
        load_records(str(tmp_path / "dict"), split="validation")


def test_load_records_from_a_folder_of_jsonl_files(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train-00.jsonl", [RECS[0], "{bad"])
    write_jsonl(folder / "train-01.jsonl", [RECS[1]])
    write_jsonl(folder / "test.jsonl", [RECS[2]])
    assert load_records(str(folder), "train", skip_bad_lines=True) == ([RECS[0], RECS[1]], 1)
    assert load_records(str(folder), "test") == ([RECS[2]], 0)
    # a folder of one unnamed file serves every split
    single = tmp_path / "single"
    single.mkdir()
    write_jsonl(single / "data.jsonl", RECS)
    assert load_records(str(single), "validation") == (RECS, 0)


def test_a_missing_split_in_a_folder_does_not_return_other_splits(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [RECS[0]])
    write_jsonl(folder / "test.jsonl", [RECS[1]])
    with pytest.raises(
        DataError, match=r"no 'validation\*\.jsonl' file \(it has test\.jsonl, train\.jsonl\)"
    ):
        load_records(str(folder), "validation")
    assert load_records(str(folder), "test")[0] == [RECS[1]]


def test_folder_files_are_split_by_the_names_datasets_understands(tmp_path):
    """``dev``/``val``/``valid`` files are the validation split and ``eval``/``testing`` the test split, as
    ``datasets.load_dataset(folder)`` reads them; the hub layout's ``data/`` subfolder is read too."""
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "my_train.jsonl", [RECS[0]])
    write_jsonl(folder / "dev.jsonl", [RECS[1]])
    write_jsonl(folder / "eval-00.jsonl", [RECS[2]])
    assert load_records(str(folder), "train")[0] == [RECS[0]]
    assert load_records(str(folder), "validation")[0] == [RECS[1]]
    assert load_records(str(folder), "dev")[0] == [RECS[1]]
    assert load_records(str(folder), "test")[0] == [RECS[2]]
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    write_jsonl(hub / "data" / "train-00000-of-00001.jsonl", [RECS[0], "{bad"])
    write_jsonl(hub / "data" / "test-00000-of-00001.jsonl", [RECS[1]])
    assert load_records(str(hub), "train", skip_bad_lines=True) == ([RECS[0]], 1)
    with pytest.raises(
        DataError, match=r"has no 'validation\*\.jsonl' file .* set eval_split to one of test, train"
    ):
        load_records(str(hub), "validation", split_key="eval_split")


def test_a_missing_split_of_a_data_file_folder_names_the_setting(tmp_path, hf_cache):
    import datasets

    folder = tmp_path / "pq"
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_list(RECS[:2]).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(RECS[2:]).to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    assert [r["prompt"] for r in load_records(str(folder), "test")[0]] == ["j k"]
    with pytest.raises(DataError) as e:
        load_records(str(folder), "validation", split_key="dataset_test_split")
    assert str(e.value) == (
        f"dataset '{folder}' has no split 'validation' (it has train, test); set dataset_test_split to one of them"
    )


def test_load_records_of_a_missing_path_is_a_data_error(tmp_path):
    for spec in (str(tmp_path / "nope.jsonl"), "./nope", "nope.parquet"):
        with pytest.raises(DataError, match="does not exist; check the path"):
            load_records(spec)


# ---------------------------------------------------------------------------------------------------------------
# records -> token ids
# ---------------------------------------------------------------------------------------------------------------
def test_split_record_prompt_completion_and_prompt_only(tokenizer):
    assert split_record(RECS[0], tokenizer, 0, "d") == ("a b c", "d e", False)
    assert split_record(RECS[2], tokenizer, 2, "d") == ("j k", None, False)


def test_split_record_messages_use_the_chat_template(tokenizer):
    msgs = [
        {"role": "user", "content": "a b"},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d e"},
        {"role": "assistant", "content": "f g"},
    ]
    prompt, completion, special = split_record({"messages": msgs}, tokenizer, 0, "d")
    assert completion == "f g" and special is True  # the last assistant turn is the target
    assert prompt == tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt == "a b c d e"  # the tiny template joins contents with spaces
    # ending with a user turn: prompt-only, the whole conversation is the prompt
    prompt, completion, _ = split_record({"messages": msgs[:-1]}, tokenizer, 0, "d")
    assert completion is None and prompt == "a b c d e"


@pytest.mark.parametrize(
    ("record", "fragment"),
    [
        ({"text": "a", "label": 1}, "record 3 has no 'prompt' field (keys: label, text)"),
        ({}, "(keys: none)"),
        ({"prompt": ["a"]}, "'prompt' must be a non-empty list of {role, content} messages"),
        ({"prompt": 5}, "'prompt' must be a string or a list of {role, content} messages, got int"),
        (
            {"prompt": "a", "completion": 5},
            "'completion' must be a string or a list of assistant messages, got int",
        ),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": ["a"]}, "'messages' must be a non-empty list"),
    ],
)
def test_split_record_errors_name_the_record(tokenizer, record, fragment):
    with pytest.raises(DataError) as e:
        split_record(record, tokenizer, 3, "train.jsonl")
    assert fragment in str(e.value) and str(e.value).startswith("train.jsonl")


def test_messages_need_a_chat_template():
    no_template = SimpleNamespace(chat_template=None)
    with pytest.raises(DataError, match="the tokenizer has no chat template"):
        split_record({"messages": [{"role": "user", "content": "a"}]}, no_template, 0, "d")


def test_read_chat_template_from_files_and_tokenizer_folders(tmp_path, tokenizer):
    from gkd.data import read_chat_template, with_chat_template
    from gkd.errors import ConfigError

    (tmp_path / "t.j2").write_text("{{ messages[0]['content'] }}")
    assert read_chat_template(str(tmp_path / "t.j2")) == "{{ messages[0]['content'] }}"
    saved = tmp_path / "saved"
    tokenizer.save_pretrained(saved)  # chat_template.jinja
    assert read_chat_template(str(saved)) == tokenizer.chat_template
    legacy = tmp_path / "legacy"  # older tokenizers: the template(s) in tokenizer_config.json
    legacy.mkdir()
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (legacy / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert read_chat_template(str(legacy)) == "D"
    assert read_chat_template(str(legacy / "tokenizer_config.json")) == "D"
    for bad, fragment in (
        (tmp_path / "missing.jinja", "does not exist"),
        (tmp_path, "has no chat template"),
        (tmp_path / "empty.jinja", "is empty"),
    ):
        if bad.name == "empty.jinja":
            bad.write_text("  ")
        with pytest.raises(ConfigError, match=fragment):
            read_chat_template(str(bad))
    copy = with_chat_template(tokenizer, str(tmp_path / "t.j2"))
    assert (
        copy.chat_template == "{{ messages[0]['content'] }}" and tokenizer.chat_template != copy.chat_template
    )
    assert copy("a b")["input_ids"] == tokenizer("a b")["input_ids"]


def test_tokenize_records_appends_eos_once_and_keeps_records(tokenizer):
    eos = tokenizer.eos_token_id
    recs = [*RECS, {"prompt": "a", "completion": "b <eos>"}]
    data = tokenize_records(recs, tokenizer, max_prompt_length=16, max_completion_length=16)
    ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert [e.prompt for e in data.examples] == [ids("a b c"), ids("f"), ids("j k"), ids("a")]
    assert [e.completion for e in data.examples] == [
        [*ids("d e"), eos],
        [*ids("g h i"), eos],
        None,
        [*ids("b"), eos],
    ]
    assert [e.record for e in data.examples] == recs  # extra fields (references) are kept
    assert (data.truncated_prompts, data.truncated_completions) == (0, 0)
    assert len(data) == 4 and not data.has_targets
    assert tokenize_records(RECS[:2], tokenizer, max_prompt_length=16, max_completion_length=16).has_targets


def test_messages_and_prompt_completion_records_give_the_same_ids(tokenizer):
    msgs = {"messages": [{"role": "user", "content": "a b c"}, {"role": "assistant", "content": "d e"}]}
    a, b = tokenize_records(
        [msgs, RECS[0]], tokenizer, max_prompt_length=16, max_completion_length=16
    ).examples
    assert (a.prompt, a.completion) == (b.prompt, b.completion)


def test_long_prompts_are_truncated_from_the_left_and_counted(tokenizer):
    eos = tokenizer.eos_token_id
    recs = [
        {"prompt": "a b c d e f g", "completion": "h i j k"},
        {"prompt": "a b", "completion": "c"},
        {"prompt": "q r s t", "completion": "u"},
    ]
    data = tokenize_records(recs, tokenizer, max_prompt_length=3, max_completion_length=3)
    full = tokenizer("a b c d e f g", add_special_tokens=False)["input_ids"]
    assert data.examples[0].prompt == full[-3:]  # the end of the prompt (next to the completion) is kept
    assert data.examples[2].prompt == tokenizer("r s t", add_special_tokens=False)["input_ids"]
    assert data.truncated_prompts == 2
    # long completions are cut from the right (here the EOS falls off) and counted too
    assert data.examples[0].completion == tokenizer("h i j", add_special_tokens=False)["input_ids"]
    assert data.examples[1].completion == [*tokenizer("c", add_special_tokens=False)["input_ids"], eos]
    assert data.truncated_completions == 1


def test_tokenize_records_errors(tokenizer):
    with pytest.raises(DataError, match="train data is empty"):
        tokenize_records([], tokenizer, max_prompt_length=4, max_completion_length=4, source="train data")
    with pytest.raises(DataError, match=r"every prompt .* max_prompt_length=2 \(e.g. 3 tokens\)"):
        tokenize_records(
            [{"prompt": "a b c"}, {"prompt": "a b c"}],
            tokenizer,
            max_prompt_length=2,
            max_completion_length=4,
        )


def test_seq2seq_prompts_end_with_eos_and_empty_prompts_get_one_token(tokenizer):
    eos = tokenizer.eos_token_id
    data = tokenize_records(
        [{"prompt": "a b"}, {"prompt": "a <eos>"}],
        tokenizer,
        max_prompt_length=8,
        max_completion_length=4,
        seq2seq=True,
    )
    a = tokenizer("a", add_special_tokens=False)["input_ids"]
    assert data.examples[0].prompt[-1] == eos and data.examples[1].prompt == [*a, eos]
    empty = tokenize_records([{"prompt": ""}], tokenizer, max_prompt_length=8, max_completion_length=4)
    assert empty.examples[0].prompt == [eos]  # no BOS in this tokenizer: the EOS stands in


# ---------------------------------------------------------------------------------------------------------------
# padding and batching
# ---------------------------------------------------------------------------------------------------------------
def test_pad_left_and_pad_right():
    ids, mask = pad_left([[1, 2, 3], [4], []], pad=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4], [0, 0, 0]]
    assert mask.tolist() == [[True] * 3, [False, False, True], [False] * 3]
    assert ids.dtype == torch.long and mask.dtype == torch.bool

    ids, mask = pad_right([[1, 2, 3], [4], []], pad=9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9], [9, 9, 9]]
    assert mask.tolist() == [[True] * 3, [True, False, False], [False] * 3]
    # all-empty completions still give one (masked) column
    ids, mask = pad_right([[], []], pad=9)
    assert ids.shape == (2, 1) and not mask.any()


def test_collate_pads_prompts_left_and_completions_right():
    records = [{"i": 0}, {"i": 1}, {"i": 2}]
    examples = [
        Example([5, 6], [7, 1], records[0]),
        Example([8], [9, 10, 11, 1], records[1]),
        Example([3, 4, 5], None, records[2]),
    ]
    batch = collate(examples, pad_id=0, indices=[4, 2, 7])
    assert batch.prompt_ids.tolist() == [[0, 5, 6], [0, 0, 8], [3, 4, 5]]
    assert batch.prompt_mask.sum(-1).tolist() == [2, 1, 3]
    assert batch.prompt_mask[:, -1].all()  # every prompt ends in the last column, next to its completion
    assert batch.completion_ids.tolist() == [[7, 1, 0, 0], [9, 10, 11, 1], [0, 0, 0, 0]]
    assert batch.completion_mask.tolist() == [
        [True, True, False, False],
        [True, True, True, True],
        [False, False, False, False],
    ]
    assert batch.records == records and batch.indices == [4, 2, 7]
    assert batch.size == 3 and batch.num_tokens() == 6 and not batch.on_policy

    rep = batch.repeat(2)
    assert rep.prompt_ids.tolist() == [row for row in batch.prompt_ids.tolist() for _ in range(2)]
    assert rep.indices == [4, 4, 2, 2, 7, 7] and [r["i"] for r in rep.records] == [0, 0, 1, 1, 2, 2]
    assert rep.num_tokens() == 12 and batch.repeat(1) is batch


# ---------------------------------------------------------------------------------------------------------------
# the batch stream
# ---------------------------------------------------------------------------------------------------------------
def _dataset(n: int) -> TokenizedDataset:
    return TokenizedDataset([Example([1 + i % 5], [2, 1], {"i": i}) for i in range(n)])


def _flat(lists: list[list[int]]) -> list[int]:
    return [i for sub in lists for i in sub]


def _indices(stream: BatchStream, steps: int) -> list[list[int]]:
    return [stream.next_indices() for _ in range(steps)]


def test_batch_stream_is_deterministic_per_seed_and_covers_each_epoch():
    data = _dataset(12)
    a = _indices(BatchStream(data, 4, seed=3, pad_id=0), 6)
    assert a == _indices(BatchStream(data, 4, seed=3, pad_id=0), 6)
    assert a != _indices(BatchStream(data, 4, seed=4, pad_id=0), 6)
    # each epoch (3 batches of 4) is a permutation of the 12 examples, and the two epochs are shuffled differently
    epoch0, epoch1 = _flat(a[:3]), _flat(a[3:])
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1


def test_batch_stream_crosses_epochs_mid_batch_and_batches_carry_indices():
    data = _dataset(10)
    stream = BatchStream(data, 4, seed=0, pad_id=0)
    first = _indices(stream, 2)
    assert stream.state_dict() == {"epoch": 0, "position": 8}
    third = stream.next_indices()  # 2 from the end of epoch 0, 2 from the start of epoch 1
    assert stream.state_dict() == {"epoch": 1, "position": 2}
    assert sorted(_flat(first) + third[:2]) == list(range(10))
    batch = stream.next()
    assert batch.size == 4 and [r["i"] for r in batch.records] == batch.indices


def test_batch_stream_resumes_from_its_state():
    data = _dataset(10)
    stream = BatchStream(data, 3, seed=7, pad_id=0)
    _indices(stream, 5)
    state = stream.state_dict()
    expected = _indices(stream, 6)
    resumed = BatchStream(data, 3, seed=7, pad_id=0)
    resumed.load_state_dict(state)
    assert _indices(resumed, 6) == expected


def test_batch_stream_ranks_take_disjoint_slices_of_the_global_batch():
    data = _dataset(16)
    ranks = [BatchStream(data, 2, seed=1, pad_id=0, rank=r, world=4) for r in range(4)]
    single = BatchStream(data, 8, seed=1, pad_id=0)
    for _ in range(3):
        parts = [s.next_indices() for s in ranks]
        assert _flat(parts) == single.next_indices()
        assert len(set(_flat(parts))) == 8


def test_load_records_of_a_mistyped_local_path_never_queries_the_hub(tmp_path, monkeypatch):
    import time

    import datasets

    calls = []

    def boom(*a, **k):
        calls.append(a)
        raise AssertionError("the hub must not be queried")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    for spec in ("runs/nope", "runs/nope/train", "a/b/c", "../nope", "~/gkd-surely-absent-xyz"):
        start = time.perf_counter()
        with pytest.raises(DataError, match="does not exist; check the path") as e:
            load_records(spec)
        assert time.perf_counter() - start < 0.5 and "\n" not in str(e.value)
    assert calls == []
    import gkd.data.records

    monkeypatch.setattr(gkd.data.records, "hub_offline_reason", lambda *a, **k: None)  # as with a network
    with pytest.raises(DataError, match="could not be loaded"):  # a genuine hub name still goes to the hub
        load_records("org/name")
    assert calls
