"""Any teacher, shown: the three RESULTS rows of "Distil from any teacher" (issue 24), measured through the CLI.

    python experiments/teachers.py context      # (b) a teacher that sees a privileged field, a student that never does
    python experiments/teachers.py specialists  # (c) two specialists routed per record into one student
    python experiments/teachers.py tokenizer    # (a) a teacher with another tokenizer against one with the student's

Every model is trained and scored by the ``gkd`` command line (``gkd sft``, ``gkd distill``, ``gkd eval``), as a user
would; this script only writes data files, builds randomly initialised tiny models (``gkd.models.build_model``),
schedules the commands and computes the statistics. Each comparison changes one knob against a named control, with
paired seeds from one shared starting student: every method of a seed starts from the same checkpoint and draws the
same batches (``seed``), and every model is scored on the same test prompts with the same sampling seed (common random
numbers). Intervals are t-based 95 % intervals over the seeds' paired differences (scipy).

Everything is written under ``runs/experiments/teachers-<row>/`` and reused when present: a killed run picks up
where it stopped (a run is done when its ``eval.json`` exists). ``--workers`` commands run at once (one torch thread
each). The recipe of each row is in its function's docstring; the numbers are in RESULTS.md, section 15.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
GKD = [str(Path(sys.executable).parent / "gkd")]  # the console script of the interpreter's environment

# the self-distillation family's sizes (RESULTS section 13): a 1-layer d24 Llama for the summarization task
D24 = {
    "architecture": "llama",
    "hidden_size": 24,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 40,
}
# the instruction family's student (RESULTS section 9) and a 2-layer d64 teacher
D48 = {**D24, "hidden_size": 48, "intermediate_size": 128}
D64x2 = {**D24, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 192}


# ---------------------------------------------------------------------------------------------------------------
# Running gkd
# ---------------------------------------------------------------------------------------------------------------


def gkd(args: list[str], log: Path) -> str:
    """Run ``gkd ARGS`` (one torch thread) with its output in ``log``; stdout returned; one line on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as err:
        proc = subprocess.run(GKD + args, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"gkd {args[0]} failed (exit {proc.returncode}); its log: {log}")
    return proc.stdout


def kv(cfg: dict[str, Any]) -> list[str]:
    """A config as gkd's ``key=value`` arguments (values as YAML scalars / flow collections)."""
    return [f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in cfg.items()]


def sft_recipe(steps: int, lr: float, seed: int, batch: int = 64) -> dict[str, Any]:
    """The studies' SFT recipe for teachers and starting students (gkd.experiments.study.sft_config)."""
    return {
        "learning_rate": lr,
        "lr_scheduler_type": "cosine",
        "min_lr_ratio": 0.1,
        "warmup_steps": min(100, max(1, steps // 20)),
        "max_steps": steps,
        "per_device_train_batch_size": batch,
        "weight_decay": 0.01,
        "adam_beta2": 0.98,
        "save_steps": 0,
        "logging_steps": max(1, steps // 10),
        "seed": seed,
        "progress": False,
        "overwrite_output_dir": True,
    }


def method_recipe(steps: int, lr: float, seed: int, batch: int = 64) -> dict[str, Any]:
    """The studies' method phase (gkd.experiments.study.job_config): short warm-up, linear decay to 0, T=1."""
    return {
        "learning_rate": lr,
        "lr_scheduler_type": "linear",
        "warmup_steps": min(20, steps // 10),
        "max_steps": steps,
        "per_device_train_batch_size": batch,
        "temperature": 1.0,
        "adam_beta2": 0.98,
        "weight_decay": 0.01,
        "save_steps": 0,
        "logging_steps": max(1, steps // 5),
        "seed": seed,
        "progress": False,
        "overwrite_output_dir": True,
    }


def init_model(spec: dict[str, Any], tokenizer_dir: Path, out: Path, seed: int) -> Path:
    """A randomly initialised model of ``spec`` with the tokenizer of ``tokenizer_dir``, saved to ``out``."""
    if (out / "config.json").exists():
        return out
    from transformers import AutoTokenizer

    from gkd.models import build_model

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = build_model(spec, tok, seed=seed)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def train(kind: str, cfg: dict[str, Any], out: Path) -> Path:
    """``gkd sft`` / ``gkd distill`` with ``cfg`` into ``out`` (skipped when ``out`` holds a finished model)."""
    if (out / "final_model.json").exists():
        return out
    gkd([kind, *kv({**cfg, "output_dir": str(out)})], out.parent / f"{out.name}.log")
    return out


def evaluate(model: Path, data: Path, metric: str, max_new_tokens: int, out: Path, **flags: Any) -> dict:
    """``gkd eval`` of ``model`` on ``data`` (greedy and T=1, eval seed 0), cached in ``out``."""
    if out.exists():
        return json.loads(out.read_text())
    args = ["eval", "--model", str(model), "--dataset", str(data), "--metric", metric]
    args += ["--max-new-tokens", str(max_new_tokens), "--seed", "0", "--batch-size", "250"]
    for k, v in flags.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    text = gkd(args, out.with_suffix(".log"))
    scores = json.loads(text[text.index("{") :])
    out.write_text(json.dumps(scores, indent=1))
    return scores


def generated_scores(
    model: Path,
    view: Path,
    records: list[dict],
    score: Callable[[dict, str], float],
    out: Path,
    max_new_tokens: int,
) -> dict:
    """Greedy and T=1 scores of a model that reads its own view of the prompts (``view``: records whose prompt is
    the teacher's view), each completion scored by ``score(record, completion)`` on the plain ``records``."""
    if out.exists():
        return json.loads(out.read_text())
    scores = {}
    for mode, flags in (("greedy", ["--greedy"]), ("sample", ["--temperature", "1.0"])):
        gen = out.with_name(f"{out.stem}.{mode}.jsonl")
        args = ["generate", "--model", str(model), "--dataset", str(view), "--out", str(gen), *flags]
        gkd(
            [*args, "--max-new-tokens", str(max_new_tokens), "--seed", "0", "--batch-size", "250"],
            gen.with_suffix(".log"),
        )
        completions = [r["completion"] for r in read_jsonl(gen)]
        assert len(completions) == len(records), (len(completions), len(records))
        scores[mode] = 100 * statistics.fmean(score(r, c) for r, c in zip(records, completions))
    out.write_text(json.dumps(scores, indent=1))
    return scores


def parallel(jobs: list[Callable[[], Any]], workers: int) -> list[Any]:
    """Run the jobs ``workers`` at a time (each a gkd subprocess), in order of the list."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda f: f(), jobs))


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------


def t_interval(values: list[float]) -> tuple[float, float, float, float]:
    """Mean, standard error and the t-based 95 % interval of ``values``."""
    from scipy import stats

    n = len(values)
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / n**0.5 if n > 1 else float("nan")
    half = stats.t.ppf(0.975, n - 1) * se if n > 1 else float("nan")
    return mean, se, mean - half, mean + half


def paired_line(name: str, a: list[float], b: list[float]) -> str:
    """``name: Δ ± SE [low, high]`` of the paired differences a − b, and whether the interval excludes 0."""
    mean, se, low, high = t_interval([x - y for x, y in zip(a, b)])
    verdict = "excludes 0" if low > 0 or high < 0 else "includes 0"
    return f"| {name} | {mean:+.1f} ± {se:.1f} | [{low:+.1f}, {high:+.1f}] | {verdict} |"


def mean_cell(values: list[float]) -> str:
    mean, se, _, _ = t_interval(values)
    return f"{mean:.1f} ± {se:.1f}"


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prepare(task: str, ws: Path, n_train: int, n_test: int) -> Path:
    """``gkd prepare TASK`` into ``ws/task`` (data, tokenizer), once."""
    task_dir = ws / "task"
    if not (task_dir / "test.jsonl").exists():
        gkd(
            ["prepare", task, "--out", str(task_dir), "--n-train", str(n_train), "--n-eval", str(n_test)],
            ws / "prepare.log",
        )
    return task_dir


# ---------------------------------------------------------------------------------------------------------------
# (b) context distillation
# ---------------------------------------------------------------------------------------------------------------


def context(ws: Path, seeds: int, workers: int, quick: bool) -> str:
    """(b) Context distillation on the summarization task (salient set, randomly ordered targets).

    The privileged field ``hint`` holds the answer's items in alphabetical order: a teacher that reads it only has to
    copy, in any order. Teachers: two 1-layer d24 Llamas with the same initialisation and recipe (SFT, 6,000 steps,
    lr 2e-3 cosine, batch 64), one trained on the plain prompts, one on ``hint + prompt`` (exactly the teacher's view
    that ``teacher_prompt_field: hint`` renders). Start: a d24 student SFT'd for 1,000 steps (lr 3e-3) on the plain
    prompts. Methods, 500 steps each from the start (lr 1e-3, linear decay to 0, batch 64): ``sft`` (continued SFT on
    the ground truth), ``distill_plain`` (on-policy reverse KL, λ = 1, from the plain teacher) and ``distill_hint``
    (the same, from the hint teacher with ``teacher_prompt_field: hint``). The student never sees the hint: its data,
    rollouts and test prompts are the plain prompts. Metric: ``set_match`` on 1,000 test prompts.
    """
    n_train, n_test = (2000, 100) if quick else (50000, 1000)
    t_steps, s_steps, m_steps = (40, 20, 10) if quick else (6000, 1000, 500)
    task = prepare("summarization", ws, n_train, n_test)
    data = ws / "data"
    data.mkdir(exist_ok=True)

    def hint(r: dict) -> str:
        return " ".join(sorted(r["completion"].split()))

    records = read_jsonl(task / "train.jsonl")
    plain = write_jsonl(
        data / "train.jsonl", [{"prompt": r["prompt"], "completion": r["completion"]} for r in records]
    )
    with_field = write_jsonl(data / "train_hint_field.jsonl", [{**r, "hint": hint(r)} for r in records])
    teacher_view = write_jsonl(
        data / "train_hint_prompt.jsonl",
        [{"prompt": f"{hint(r)} {r['prompt']}", "completion": r["completion"]} for r in records],
    )
    test = read_jsonl(task / "test.jsonl")
    test_hint = write_jsonl(
        data / "test_hint_prompt.jsonl", [{**r, "prompt": f"{hint(r)} {r['prompt']}"} for r in test]
    )
    tok = task / "tokenizer"
    models = ws / "models"
    from gkd.tasks.summarization import set_match_score

    say = print
    say(f"context: teachers and start ({t_steps} / {s_steps} SFT steps) ...")
    t0 = time.perf_counter()
    t_init = init_model(D24, tok, models / "teacher-init", seed=1234)
    s_init = init_model(D24, tok, models / "student-init", seed=4321)
    teacher_plain, teacher_hint, start = parallel(
        [
            lambda: train(
                "sft",
                {
                    "model_name_or_path": t_init,
                    "dataset": plain,
                    "max_new_tokens": 8,
                    **sft_recipe(t_steps, 2e-3, 1234),
                },
                models / "teacher_plain",
            ),
            lambda: train(
                "sft",
                {
                    "model_name_or_path": t_init,
                    "dataset": teacher_view,
                    "max_new_tokens": 8,
                    **sft_recipe(t_steps, 2e-3, 1234),
                },
                models / "teacher_hint",
            ),
            lambda: train(
                "sft",
                {
                    "model_name_or_path": s_init,
                    "dataset": plain,
                    "max_new_tokens": 8,
                    **sft_recipe(s_steps, 3e-3, 4321),
                },
                models / "start",
            ),
        ],
        workers,
    )
    ref = {
        "teacher_plain": evaluate(
            teacher_plain, task / "test.jsonl", "summarization", 8, models / "teacher_plain.eval.json"
        ),
        "teacher_hint (reads the hint)": {
            f"{m}/set_match": v
            for m, v in generated_scores(
                teacher_hint, test_hint, test, set_match_score, models / "teacher_hint.eval.json", 8
            ).items()
        },
        "start": evaluate(start, task / "test.jsonl", "summarization", 8, models / "start.eval.json"),
    }
    say(f"context: teachers and start in {time.perf_counter() - t0:.0f}s")
    methods = {
        "sft": ("sft", {"dataset": plain}),
        "distill_plain": ("distill", {"dataset": plain, "teacher_model_name_or_path": teacher_plain}),
        "distill_hint": (
            "distill",
            {
                "dataset": with_field,
                "teacher_model_name_or_path": teacher_hint,
                "teacher_prompt_field": "hint",
            },
        ),
    }
    distill = {"divergence": "reverse_kl", "lmbda": 1.0}
    jobs = []
    for seed in range(seeds):
        for name, (kind, cfg) in methods.items():
            out = ws / "runs" / f"{name}-seed{seed}"
            full = {
                "model_name_or_path": start,
                "max_new_tokens": 8,
                **(distill if kind == "distill" else {}),
                **cfg,
            }
            full.update(method_recipe(m_steps, 1e-3, seed))

            def job(kind=kind, full=full, out=out) -> dict:
                t = time.perf_counter()
                model = train(kind, full, out)
                scores = evaluate(
                    model, task / "test.jsonl", "summarization", 8, out.parent / f"{out.name}.eval.json"
                )
                return {**scores, "seconds": time.perf_counter() - t}

            jobs.append((name, seed, job))
    say(f"context: {len(jobs)} runs ...")
    t0 = time.perf_counter()
    results = parallel([j for _, _, j in jobs], workers)
    say(f"context: runs in {time.perf_counter() - t0:.0f}s")
    by = {name: [r for (n, _, _), r in zip(jobs, results) if n == name] for name in methods}
    return report(
        "(b) context distillation: summarization, the teacher reads the answer's items (`hint`), the student never",
        ref,
        by,
        [("distill_hint", "sft"), ("distill_hint", "distill_plain"), ("distill_plain", "sft")],
        "set_match",
    )


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def report(
    title: str,
    ref: dict[str, dict],
    by: dict[str, list[dict]],
    pairs: list[tuple[str, str]],
    metric: str,
    modes: tuple[str, ...] = ("greedy", "sample"),
) -> str:
    """A markdown table of the reference models and the methods (mean ± SE over seeds), then the paired Δs."""
    label = {"greedy": "greedy", "sample": "T=1"}
    lines = [
        f"### {title}",
        "",
        "| model | " + " | ".join(label[m] for m in modes) + " |",
        "|---" * (len(modes) + 1) + "|",
    ]
    for name, scores in ref.items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[f'{m}/{metric}']:.1f}" for m in modes) + " |")
    for name, runs in by.items():
        lines.append(
            f"| {name} | " + " | ".join(mean_cell([r[f"{m}/{metric}"] for r in runs]) for m in modes) + " |"
        )
    n = len(next(iter(by.values())))
    lines += ["", f"Paired Δ of `{metric}` over {n} seeds, t-based 95 % interval:", ""]
    lines += ["| comparison | Δ ± SE | 95 % CI | |", "|---|---|---|---|"]
    for m in modes:
        for a, b in pairs:
            xa, xb = [r[f"{m}/{metric}"] for r in by[a]], [r[f"{m}/{metric}"] for r in by[b]]
            lines.append(paired_line(f"{a} − {b} ({label[m]})", xa, xb))
    secs = {name: statistics.fmean(r["seconds"] for r in runs) for name, runs in by.items()}
    lines += [
        "",
        "Wall time per run (train + eval, one thread): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items()),
    ]
    return "\n".join(lines)


ROWS = {"context": context}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("row", choices=sorted(ROWS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--quick", action="store_true", help="seconds-long sizes (checks the script, no conclusion)"
    )
    parser.add_argument("--out", type=Path, default=None, help="default: runs/experiments/teachers-ROW")
    args = parser.parse_args(argv)
    ws = args.out or ROOT / "runs" / "experiments" / f"teachers-{args.row}{'-quick' if args.quick else ''}"
    ws.mkdir(parents=True, exist_ok=True)
    random.seed(0)
    text = ROWS[args.row](ws, args.seeds, args.workers, args.quick)
    (ws / "report.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
