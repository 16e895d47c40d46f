"""Real-dataset adapters on tiny local JSONL files shaped exactly like GSM8K, XSum and WMT14 (no download)."""

import json
from pathlib import Path

import pytest

from gkd.metrics import final_answer
from gkd.tasks.adapters import gsm8k_record, load_adapted, wmt14_record, xsum_record

DATA = Path(__file__).parent / "data"


def raw(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def check_format(records: list[dict]) -> None:
    for r in records:
        assert set(r) == {"prompt", "completion", "references"}
        assert r["references"][0] == r["completion"] and r["prompt"] and r["completion"]


def test_gsm8k(tmp_path):
    records = load_adapted("gsm8k", str(DATA / "gsm8k_sample.jsonl"), "test", cache_dir=str(tmp_path))
    check_format(records)
    assert len(records) == 4
    first = records[0]
    assert first["prompt"] == (
        "Question: Mia has 12 apples. She buys 3 bags with 5 apples each. How many apples does she have now?\nAnswer:"
    )
    assert "<<" not in first["completion"] and first["completion"].endswith("#### 27")
    assert "3 * 5 = 15 apples" in first["completion"]
    # the headline metric reads the final answer after "####"
    preds = ["... #### 27", "#### 284", "so #### 3,600", "18"]
    assert final_answer(preds, records) == 50.0


def test_gsm8k_options():
    example = raw("gsm8k_sample.jsonl")[1]
    kept = gsm8k_record(example, template="{question}", strip_calculator=False)
    assert kept["prompt"] == example["question"] and kept["completion"] == example["answer"]


def test_xsum(tmp_path):
    records = load_adapted(
        "xsum", str(DATA / "xsum_sample.jsonl"), "validation", limit=2, cache_dir=str(tmp_path)
    )
    check_format(records)
    assert len(records) == 2
    example = raw("xsum_sample.jsonl")[0]
    assert records[0] == xsum_record(example)
    assert records[0]["prompt"].startswith("Document: The town council voted")
    assert records[0]["prompt"].endswith("\nSummary:")
    assert records[0]["completion"] == example["summary"]


def test_wmt14_directions(tmp_path):
    path = str(DATA / "wmt14_sample.jsonl")
    en_de = load_adapted("wmt14", path, "test", cache_dir=str(tmp_path))
    de_en = load_adapted("wmt14", path, "test", source_lang="de", target_lang="en", cache_dir=str(tmp_path))
    check_format(en_de + de_en)
    assert en_de[0]["completion"] == "Das Wetter ist heute sehr schön."
    assert "English: The weather is very nice today." in en_de[0]["prompt"]
    assert en_de[0]["prompt"].endswith("German:")
    assert de_en[1]["completion"] == "I read the book yesterday."
    assert de_en[1]["prompt"].startswith("Translate from German to English.")
    with pytest.raises(ValueError, match="not in translation keys"):
        wmt14_record(raw("wmt14_sample.jsonl")[0], source_lang="fr")


def test_unknown_adapter():
    with pytest.raises(ValueError, match="valid adapters: gsm8k, wmt14, xsum"):
        load_adapted("squad", str(DATA / "xsum_sample.jsonl"), "train")
