"""Data at scale: ``datasets.map`` tokenisation (cached, ``num_proc``), one shard per process, streamed prompts.

Run as a script (``torch.distributed.run``) this file is also the worker of the two-process test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from launch import two_processes

from gkd.data import (
    ArrowTokenizedDataset,
    BatchStream,
    PromptStream,
    StreamingDataset,
    TokenizedDataset,
    open_dataset,
    tokenize_dataset,
    tokenize_records,
)
from gkd.errors import ConfigError

LIMITS = {"max_prompt_length": 48, "max_completion_length": 24}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep the ``datasets`` builder cache inside tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    return tmp_path / "hf_cache"


def _ids(data: TokenizedDataset) -> list[tuple[list[int], list[int] | None]]:
    return [(e.prompt, e.completion) for e in data.examples]


# ---------------------------------------------------------------------------------------------------------------
# datasets.map: the same ids as the list path, num_proc, the cache
# ---------------------------------------------------------------------------------------------------------------
def test_the_datasets_path_gives_the_list_paths_ids_and_records(tmp_path, hf_cache, tokenizer, records):
    recs = records[:64]
    path = write_jsonl(tmp_path / "train.jsonl", recs)
    listed = tokenize_records(recs, tokenizer, **LIMITS)
    arrow = tokenize_dataset(open_dataset(str(path)), tokenizer, **LIMITS)
    assert isinstance(arrow, ArrowTokenizedDataset) and len(arrow) == len(listed) == 64
    assert _ids(arrow) == _ids(listed)
    # the other fields stay readable for metrics and rewards
    assert [e.record for e in arrow.examples] == recs
    assert arrow.examples[5] == listed.examples[5] and arrow.examples[-1] == listed.examples[-1]
    assert arrow.examples[2:4] == listed.examples[2:4]
    assert (arrow.truncated_prompts, arrow.truncated_completions) == (
        listed.truncated_prompts,
        listed.truncated_completions,
    )
    assert arrow.has_targets


def test_chat_and_prompt_only_records_give_the_same_ids_through_datasets(tmp_path, hf_cache, tokenizer):
    recs = [
        {"messages": [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c d"}]},
        {"messages": [{"role": "user", "content": "e f g"}, {"role": "assistant", "content": "h"}]},
    ]
    prompts = [{"prompt": "one two"}, {"prompt": "three"}]
    for name, rows in (("chat", recs), ("prompts", prompts)):
        path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        arrow = tokenize_dataset(open_dataset(str(path)), tokenizer, **LIMITS, apply_chat_template=True)
        assert _ids(arrow) == _ids(tokenize_records(rows, tokenizer, **LIMITS, apply_chat_template=True))
    assert not arrow.has_targets


def test_num_proc_gives_the_same_ids_and_a_second_load_reads_the_cache(
    tmp_path, hf_cache, tokenizer, records, monkeypatch
):
    import gkd.data.arrow

    path = write_jsonl(tmp_path / "train.jsonl", records[:40])
    two = tokenize_dataset(open_dataset(str(path)), tokenizer, **LIMITS, num_proc=2)  # tokenised afresh
    assert len(two.ds.cache_files) == 2  # one per process
    assert _ids(two) == _ids(tokenize_records(records[:40], tokenizer, **LIMITS))
    path = write_jsonl(tmp_path / "other.jsonl", records[40:80])
    one = tokenize_dataset(open_dataset(str(path)), tokenizer, **LIMITS)
    cached = [f["filename"] for f in one.ds.cache_files]
    assert cached and all(str(hf_cache) in f for f in cached)  # written next to datasets' Arrow files

    def never(*a, **k):  # a cache hit does not tokenise again
        raise AssertionError("tokenised again")

    monkeypatch.setattr(gkd.data.arrow, "map_tokenize", never)
    again = tokenize_dataset(open_dataset(str(path)), tokenizer, **LIMITS)
    assert _ids(again) == _ids(one)
    with pytest.raises(AssertionError, match="tokenised again"):  # other settings are another cache entry
        tokenize_dataset(open_dataset(str(path)), tokenizer, max_prompt_length=47, max_completion_length=24)


def test_a_shard_is_every_world_th_row_and_its_stream_resumes_exactly(tmp_path, hf_cache, tokenizer, records):
    recs = records[:21]  # shards of 11 and 10 rows: epochs end at different steps
    path = write_jsonl(tmp_path / "train.jsonl", recs)
    listed = tokenize_records(recs, tokenizer, **LIMITS)
    for rank in (0, 1):
        shard = tokenize_dataset(open_dataset(str(path)), tokenizer, **LIMITS, rank=rank, world=2)
        assert shard.shard == (rank, 2) and len(shard) == 21  # the run's plan counts every process's prompts
        assert _ids(shard) == _ids(listed)[rank::2]
        stream = BatchStream(shard, 4, seed=3, pad_id=0, rank=rank, world=2)
        # the shard's stream is a one-process stream over the shard's rows
        alone = BatchStream(TokenizedDataset(listed.examples[rank::2]), 4, seed=3, pad_id=0)
        first = [stream.next() for _ in range(4)]
        for got, want in zip(first, [alone.next() for _ in range(4)]):
            assert got.prompt_ids.tolist() == want.prompt_ids.tolist()
            assert got.indices == [rank + 2 * i for i in want.indices]  # positions in the whole dataset
        # resume from rank 0's saved state (only the main process saves): each rank continues its own stream
        saved = {"epoch": 1, "position": 5, "drawn": 16}
        resumed = BatchStream(shard, 4, seed=3, pad_id=0, rank=rank, world=2)
        resumed.load_state_dict(saved)
        assert [resumed.next().indices for _ in range(3)] == [stream.next().indices for _ in range(3)]


def test_a_100k_record_jsonl_loads_without_a_list_of_records(tmp_path, hf_cache, tokenizer, monkeypatch):
    import gc

    import gkd.data.arrow

    path = tmp_path / "big.jsonl"
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
    with path.open("w") as fh:
        for i in range(100_000):
            fh.write(
                json.dumps({"prompt": f"{words[i % 8]} {words[i % 7]}", "completion": words[i % 5]}) + "\n"
            )
    calls = []
    real = gkd.data.arrow.map_tokenize

    def counting(batch, indices, **kw):
        calls.append(len(indices))
        return real(batch, indices, **kw)

    monkeypatch.setattr(gkd.data.arrow, "map_tokenize", counting)
    gc.collect()
    dicts_before = sum(isinstance(o, dict) for o in gc.get_objects())
    data = tokenize_dataset(open_dataset(str(path)), tokenizer, **LIMITS)
    gc.collect()
    dicts_after = sum(isinstance(o, dict) for o in gc.get_objects())
    assert len(data) == len(data.examples) == 100_000 and sum(calls) == 100_000
    assert max(calls) <= 1000  # records become Python dicts one map batch at a time, never all at once
    assert dicts_after - dicts_before < 5_000  # and none are held: the rows stay in Arrow
    assert data.examples[99_999].record == {"prompt": "ran a", "completion": "a"}
    assert len(data.examples[99_999].prompt) > 0


# ---------------------------------------------------------------------------------------------------------------
# runs: the config keys, streaming, two processes
# ---------------------------------------------------------------------------------------------------------------
def _config(model_dir: Path, out: Path, **kw):
    from conftest import base_config

    settings = {
        "model_name_or_path": str(model_dir / "student"),
        "teacher_model_name_or_path": str(model_dir / "teacher"),
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "max_new_tokens": 4,
        "max_steps": 3,
        "num_threads": 1,
    }
    return base_config(**{**settings, **kw})


def test_dataset_num_proc_trains_on_the_same_batches_as_the_list_path(model_dir, tmp_path, hf_cache):
    from gkd.trainer import GKDTrainer

    batches = []
    for name, extra in (("list", {}), ("arrow", {"dataset_num_proc": 1})):
        cfg = _config(model_dir, tmp_path / name, dataset=str(model_dir / "train.jsonl"), lmbda=0.0, **extra)
        run = GKDTrainer(cfg).setup()
        assert isinstance(run.train_data, ArrowTokenizedDataset) == (name == "arrow")
        batches.append([run.stream.next().prompt_ids.tolist() for _ in range(3)])
    assert batches[0] == batches[1]


def test_streaming_trains_on_policy_and_refuses_off_policy_in_one_line(
    model_dir, tmp_path, hf_cache, records
):
    from gkd.trainer import GKDTrainer

    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in records[:24]])
    cfg = _config(model_dir, tmp_path / "s", dataset=str(path), lmbda=1.0, dataset_streaming=True)
    trainer = GKDTrainer(cfg)
    run = trainer.setup()
    assert isinstance(run.train_data, StreamingDataset) and isinstance(run.stream, PromptStream)
    for _ in range(3):
        assert trainer.train_step()["on_policy"]
    for bad in ({"lmbda": 0.5}, {"lmbda": 1.0, "max_steps": -1, "num_train_epochs": 1}):
        cfg = _config(model_dir, tmp_path / "bad", dataset=str(path), dataset_streaming=True, **bad)
        with pytest.raises(ConfigError, match="dataset_streaming") as e:
            GKDTrainer(cfg).setup()
        assert "\n" not in str(e.value)


def test_a_prompt_stream_is_seeded_and_resumes_by_skipping_the_drawn_prompts(tmp_path, hf_cache, tokenizer):
    rows = [{"prompt": f"p {i}"} for i in range(10)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    data = StreamingDataset(open_dataset(str(path), streaming=True), tokenizer, **LIMITS)
    a = PromptStream(data, 4, seed=1, pad_id=0)
    drawn = [a.next().records for _ in range(5)]  # 20 prompts: two epochs, each a shuffle of the 10
    first_epoch = [r["prompt"] for b in drawn for r in b][:10]
    assert sorted(first_epoch) == sorted(r["prompt"] for r in rows) and first_epoch != [
        r["prompt"] for r in rows
    ]
    b = PromptStream(data, 4, seed=1, pad_id=0)
    assert [b.next().records for _ in range(5)] == drawn  # seeded
    c = PromptStream(data, 4, seed=1, pad_id=0)
    c.load_state_dict({"epoch": 0, "position": 8})
    assert [c.next().records for _ in range(3)] == drawn[2:]


@pytest.mark.slow
def test_two_processes_each_tokenise_only_their_shard(model_dir, tmp_path):
    out = tmp_path / "dist"
    out.mkdir()
    proc = two_processes(
        __file__, model_dir, out, port=29547, env={"HF_DATASETS_CACHE": str(tmp_path / "hf_cache")}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from gkd.models import load_tokenizer

    tok = load_tokenizer(str(model_dir / "student"))
    records = [json.loads(line) for line in (model_dir / "train.jsonl").read_text().splitlines()]
    listed = tokenize_records(records, tok, max_prompt_length=512, max_completion_length=128)
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, got in enumerate(seen):
        assert got["world"] == 2 and got["total"] == len(records)
        assert got["tokenised"] == len(records[rank::2])  # this rank's rows only, not the whole dataset
        alone = BatchStream(TokenizedDataset(listed.examples[rank::2]), 4, seed=0, pad_id=tok.pad_token_id)
        assert got["batches"] == [alone.next().prompt_ids.tolist() for _ in got["batches"]]
    assert seen[0]["weights"] == pytest.approx(seen[1]["weights"], rel=1e-6, abs=1e-7)


def _worker(model_dir: Path, out: Path) -> None:
    """Two processes (gloo): train a few off-policy steps on the JSONL read through datasets, dump what each saw."""
    import torch

    import gkd.data.arrow
    from gkd.trainer import GKDTrainer

    sys.path.insert(0, str(Path(__file__).parent))
    counted = [0]
    real = gkd.data.arrow.map_tokenize

    def counting(batch, indices, **kw):
        counted[0] += len(indices)
        return real(batch, indices, **kw)

    gkd.data.arrow.map_tokenize = counting
    cfg = _config(model_dir, out, dataset=str(model_dir / "train.jsonl"), lmbda=0.0, max_steps=3)
    trainer = GKDTrainer(cfg)
    run = trainer.setup()
    batches = []
    real_next = run.stream.next

    def recording():
        batch = real_next()
        batches.append(batch.prompt_ids.tolist())
        return batch

    run.stream.next = recording
    for _ in range(cfg.max_steps):
        trainer.train_step()
    weights = [p.detach().double().sum().item() for p in trainer.student.parameters()]
    (out / f"rank{run.dist.rank}.json").write_text(
        json.dumps(
            {
                "world": run.dist.world,
                "total": len(run.train_data),
                "tokenised": counted[0],
                "batches": batches,
                "weights": weights,
            }
        )
    )
    torch.distributed.barrier()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
