"""experiments/teachers.py (RESULTS.md section 15) runs as written: its quick sizes, through the command line it
drives (``gkd sft``, ``gkd distill``, ``gkd eval``, ``gkd generate``), end to end. The numbers at quick sizes mean
nothing; the test checks that every row's pipeline runs, resumes from what it wrote, and reports paired intervals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

import teachers


@pytest.mark.slow
def test_the_context_and_tokenizer_rows_run_and_resume(tmp_path, capsys):
    ws = tmp_path / "teachers"
    teachers.main(["context", "--quick", "--seeds", "2", "--out", str(ws)])
    text = (ws / "report.md").read_text()
    assert "| distill_hint − sft (greedy) |" in text and "95 % interval" in text
    assert (ws / "runs" / "distill_hint-seed1.eval.json").exists()
    finished = {p: p.stat().st_mtime for p in (ws / "runs").glob("*.eval.json")}
    teachers.main(["tokenizer", "--quick", "--seeds", "2", "--out", str(ws)])
    text = (ws / "report.md").read_text()
    assert "| distill_gpt2bpe − distill_plain (greedy) |" in text
    log = (ws / "runs" / "distill_gpt2bpe-seed0.log").read_text()
    assert "projected onto the student's vocabulary" in log  # the teacher's other tokenizer was aligned
    # the context row's runs were reused, not run again
    assert all(p.stat().st_mtime == t for p, t in finished.items())
