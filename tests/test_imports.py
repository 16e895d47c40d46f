"""gkd trains where only torch, transformers, accelerate, peft and rich are installed (a locked-down GPU box).

``datasets``, ``rouge_score``, ``sacrebleu`` and ``matplotlib`` are imported only by the features that use them
(hub/parquet datasets, ROUGE/BLEU metrics and rewards, plots). A subprocess that cannot import them still runs a
distillation end to end through the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

BLOCKED = ("datasets", "rouge_score", "sacrebleu", "matplotlib", "nltk", "pyarrow")


def test_a_run_needs_none_of_the_optional_libraries(world, tmp_path):
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        BLOCK = {BLOCKED!r}
        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in BLOCK:
                    raise ModuleNotFoundError(f"{{name}} is not installed here")
        sys.meta_path.insert(0, Blocker())
        from gkd.cli import main
        code = main(sys.argv[1:])
        assert not [m for m in sys.modules if m.split(".")[0] in BLOCK], "an optional library was imported"
        sys.exit(code)
        """
    )
    args = [
        "distill",
        f"model_name_or_path={world.model('llama', 'student')}",
        f"teacher_model_name_or_path={world.model('llama', 'teacher')}",
        f"dataset={world.data('messages')}",
        f"eval_dataset={world.data('messages', 'test')}",
        "eval_metric=exact_match",
        "lmbda=0.5",
        "max_steps=2",
        "max_new_tokens=4",
        "eval_max_samples=4",
        f"output_dir={tmp_path / 'run'}",
    ]
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["status"] == "finished"
