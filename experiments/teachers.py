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

from gkd.experiments.study import excludes_zero, mean_se, paired_ci  # noqa: E402  (the statistics of every gkd study)

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
# the instruction family's student (RESULTS section 9); with two layers, the context row's teachers
D48 = {**D24, "hidden_size": 48, "intermediate_size": 128}
D48x2 = {**D48, "num_hidden_layers": 2}


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


def paired_line(name: str, a: list[float], b: list[float]) -> str:
    """``| name | Δ ± SE | [low, high] | verdict |`` of the paired differences a − b (gkd's paired t-interval)."""
    ci = paired_ci(a, b)
    verdict = "excludes 0" if excludes_zero(ci) else "includes 0"
    return f"| {name} | {ci['mean']:+.1f} ± {ci['se']:.1f} | [{ci['lo']:+.1f}, {ci['hi']:+.1f}] | {verdict} |"


def mean_cell(values: list[float]) -> str:
    mean, se = mean_se(values)
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
    copy, in any order. Teachers: two 2-layer d48 Llamas with the same initialisation and recipe (SFT, 3,000 steps,
    lr 2e-3 cosine, batch 64), one trained on the plain prompts, one on ``hint + prompt`` (exactly the teacher's view
    that ``teacher_prompt_field: hint`` renders). (A 1-layer d24 teacher trained so did not use the hint: 91.0 greedy
    against 92.7 without it.) Start: a d24 student SFT'd for 1,000 steps (lr 3e-3) on the plain
    prompts. Methods, 500 steps each from the start (lr 1e-3, linear decay to 0, batch 64): ``sft`` (continued SFT on
    the ground truth), ``distill_plain`` (on-policy reverse KL, λ = 1, from the plain teacher) and ``distill_hint``
    (the same, from the hint teacher with ``teacher_prompt_field: hint``). The student never sees the hint: its data,
    rollouts and test prompts are the plain prompts. Metric: ``set_match`` on 1,000 test prompts.
    """
    n_train, n_test = (2000, 100) if quick else (50000, 1000)
    t_steps, s_steps, m_steps = (40, 20, 10) if quick else (3000, 1000, 500)
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
    t_init = init_model(D48x2, tok, models / "teacher-init", seed=1234)
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
# (c) two routed specialists
# ---------------------------------------------------------------------------------------------------------------

PART = {
    "A": ("upper", "lower", "upper early"),  # instructions by case (and one pair)
    "B": ("early", "late", "lower late"),  # instructions by half of the alphabet (and the other pair)
}


def specialists(ws: Path, seeds: int, workers: int, quick: bool) -> str:
    """(c) Two specialists routed per record into one student, on the instruction mixture.

    The instruction task's six held-in instructions are split in two parts: A (``upper``, ``lower``, ``upper
    early``) and B (``early``, ``late``, ``lower late``). Specialist A is the task's teacher size (2-layer d96
    Llama) SFT'd for 2,000 steps (lr 2e-3 cosine, batch 64) on part A's records only, specialist B the same on part
    B's. Start: a 1-layer d48 student SFT'd for 2,000 steps (lr 3e-3) on the whole mixture. Methods, 300 steps each
    from the start (lr 1e-3, linear decay, batch 64): ``sft`` (continued SFT on the mixture), ``routed`` (on-policy
    reverse KL, λ = 1, with ``teachers: [A, B]`` and each record's ``teacher`` field naming its part's specialist)
    and ``unrouted`` (the same two teachers without the field: each record gets the average of both teachers'
    losses, half of it from the specialist that never saw its instruction). Metric: ``set_match`` on each part's
    test prompts (the held-out instructions of the task are left out).
    """
    n_train, n_test = (2000, 200) if quick else (50000, 2000)
    t_steps, s_steps, m_steps = (40, 20, 10) if quick else (2000, 2000, 300)
    task = prepare("instructions", ws, n_train, n_test)
    from gkd.tasks.instructions import instruction_of

    part_of = {i: name for name, instrs in PART.items() for i in instrs}
    data = ws / "data"
    data.mkdir(exist_ok=True)
    records = [r for r in read_jsonl(task / "train.jsonl") if instruction_of(r) in part_of]
    routed = write_jsonl(
        data / "train_routed.jsonl", [{**r, "teacher": part_of[instruction_of(r)]} for r in records]
    )
    mixture = write_jsonl(data / "train.jsonl", records)
    part_train = {
        p: write_jsonl(data / f"train_{p}.jsonl", [r for r in records if part_of[instruction_of(r)] == p])
        for p in PART
    }
    test = [r for r in read_jsonl(task / "test.jsonl") if instruction_of(r) in part_of]
    part_test = {
        p: write_jsonl(data / f"test_{p}.jsonl", [r for r in test if part_of[instruction_of(r)] == p])
        for p in PART
    }
    tok = task / "tokenizer"
    models = ws / "models"
    from gkd.tasks.instructions import InstructionMixture

    teacher_spec = InstructionMixture().teacher_model_config()
    print(f"specialists: two specialists and the start ({t_steps} / {s_steps} SFT steps) ...")
    t_init = init_model(teacher_spec, tok, models / "teacher-init", seed=1234)
    s_init = init_model(D48, tok, models / "student-init", seed=4321)
    spec_a, spec_b, start = parallel(
        [
            *(
                (
                    lambda p=p: train(
                        "sft",
                        {
                            "model_name_or_path": t_init,
                            "dataset": part_train[p],
                            "max_new_tokens": 9,
                            **sft_recipe(t_steps, 2e-3, 1234),
                        },
                        models / f"specialist_{p}",
                    )
                )
                for p in PART
            ),
            lambda: train(
                "sft",
                {
                    "model_name_or_path": s_init,
                    "dataset": mixture,
                    "max_new_tokens": 9,
                    **sft_recipe(s_steps, 3e-3, 4321),
                },
                models / "start",
            ),
        ],
        workers,
    )
    specs = {"A": spec_a, "B": spec_b}
    ref = {}
    for who, model in (("specialist_A", spec_a), ("specialist_B", spec_b), ("start", start)):
        ref[who] = {
            p: evaluate(model, part_test[p], "instructions", 9, models / f"{who}.{p}.eval.json") for p in PART
        }
    teachers = [{"name": p, "model_name_or_path": str(specs[p]), "weight": 1.0} for p in PART]
    methods = {
        "sft": ("sft", {"dataset": mixture}),
        "routed": ("distill", {"dataset": routed, "teachers": teachers}),
        "unrouted": ("distill", {"dataset": mixture, "teachers": teachers}),
    }
    jobs = []
    for seed in range(seeds):
        for name, (kind, cfg) in methods.items():
            out = ws / "runs" / f"{name}-seed{seed}"
            full = {"model_name_or_path": start, "max_new_tokens": 9, **cfg}
            if kind == "distill":
                full.update(divergence="reverse_kl", lmbda=1.0)
            full.update(method_recipe(m_steps, 1e-3, seed))

            def job(kind=kind, full=full, out=out) -> dict:
                t = time.perf_counter()
                model = train(kind, full, out)
                scores = {
                    p: evaluate(
                        model, part_test[p], "instructions", 9, out.parent / f"{out.name}.{p}.eval.json"
                    )
                    for p in PART
                }
                return {**scores, "seconds": time.perf_counter() - t}

            jobs.append((name, seed, job))
    print(f"specialists: {len(jobs)} runs ...")
    results = parallel([j for _, _, j in jobs], workers)
    by = {name: [r for (n, _, _), r in zip(jobs, results) if n == name] for name in methods}
    texts = []
    for p in PART:
        texts.append(
            report(
                f"(c) part {p} ({', '.join(PART[p])}): specialist {p}, the other specialist and the students",
                {who: scores[p] for who, scores in ref.items()},
                {name: [{**r[p], "seconds": r["seconds"]} for r in runs] for name, runs in by.items()},
                [("routed", "sft"), ("routed", "unrouted")],
                "set_match",
            )
        )
        own = ref[f"specialist_{p}"][p]
        gap = [
            f"{m}: routed − specialist {p} {statistics.fmean(r[p][f'{m}/set_match'] for r in by['routed']) - own[f'{m}/set_match']:+.1f}"
            for m in ("greedy", "sample")
        ]
        texts.append(
            "Gap to the specialist on its part (mean over seeds; the specialist is one model): "
            + "; ".join(gap)
        )
    return "\n\n".join(texts)


# ---------------------------------------------------------------------------------------------------------------
# (a) a teacher with another tokenizer
# ---------------------------------------------------------------------------------------------------------------


def bpe_tokenizer(texts: list[str], like: Path, out: Path, *, words: bool, vocab_size: int = 400) -> Path:
    """A byte-level BPE of ``vocab_size`` tokens trained on ``texts``, special tokens and chat template as ``like``'s.

    ``words=True``: GPT-2's convention (the regex pre-split, a space is the start of the next word's token: ``s``,
    ``Ġt``, ``Ġf``), as the byte-level BPEs of Llama 3 and Qwen write text: every student word is straddled by a
    teacher token that starts one character earlier. ``words=False``: no pre-split, so merges cross spaces and a
    space ends the token before it (``sĠ``, ``tĠ``, ``f``; also ``dĠuĠ``): a token then tells whether text follows."""
    if (out / "tokenizer.json").exists():
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    base = AutoTokenizer.from_pretrained(str(like))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=words)
    bpe.decoder = decoders.ByteLevel()
    specials = [base.pad_token, base.eos_token, base.unk_token]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token=base.pad_token, eos_token=base.eos_token, unk_token=base.unk_token
    )
    tok.chat_template = base.chat_template
    tok.save_pretrained(out)
    return out


# teacher name -> (tokenizer folder, GPT-2's word convention?)
BPE_TEACHERS = {"bpe": ("bpe-tokenizer", False), "gpt2bpe": ("gpt2bpe-tokenizer", True)}


def tokenizer(ws: Path, seeds: int, workers: int, quick: bool) -> str:
    """(a) A teacher with another tokenizer, in the context row's workspace (run ``context`` first).

    The student and the same-tokenizer teacher are (b)'s: the d24 start, ``teacher_plain`` and its
    ``distill_plain`` runs. Two other teachers have the same architecture and recipe (SFT, 3,000 steps, lr 2e-3
    cosine, batch 64, seed 1234) but their own tokenizer, a byte-level BPE with 400 tokens trained on the task's
    text (``bpe_tokenizer``): ``teacher_gpt2bpe`` in GPT-2's convention (a space starts the next word's token, as in
    Llama 3's and Qwen's tokenizers) and ``teacher_bpe`` without the pre-split (merges cross spaces, a space ends
    the token before it). gkd aligns both through character offsets (docs/teachers.md). ``distill_gpt2bpe`` and
    ``distill_bpe``: (b)'s ``distill_plain`` recipe (on-policy reverse KL, λ = 1, 500 steps) with those teachers.
    Controls: the same recipe with the same-tokenizer teacher (``distill_plain``), and continued SFT.
    """
    n_train, n_test = (2000, 100) if quick else (50000, 1000)
    t_steps, m_steps = (40, 10) if quick else (3000, 500)
    task = prepare("summarization", ws, n_train, n_test)
    models = ws / "models"
    start, teacher_plain = models / "start", models / "teacher_plain"
    if not (start / "final_model.json").exists():
        raise SystemExit(f"run `python experiments/teachers.py context --out {ws}` first (the shared start)")
    records = read_jsonl(ws / "data" / "train.jsonl")
    texts = [f"{r['prompt']} {r['completion']}" for r in records[:20000]]
    from transformers import AutoTokenizer

    ref = {
        "teacher_plain (student's tokenizer)": evaluate(
            teacher_plain, task / "test.jsonl", "summarization", 8, models / "teacher_plain.eval.json"
        ),
        "start": evaluate(start, task / "test.jsonl", "summarization", 8, models / "start.eval.json"),
    }
    by: dict[str, list[dict]] = {}
    for name, (folder, words) in BPE_TEACHERS.items():
        tok = bpe_tokenizer(texts, task / "tokenizer", models / folder, words=words)
        example = records[0]["prompt"] + " " + records[0]["completion"]
        print(f"tokenizer: {name}: {AutoTokenizer.from_pretrained(str(tok)).tokenize(example)}")
        t_init = init_model(D48x2, tok, models / f"teacher-{name}-init", seed=1234)
        sft = {"model_name_or_path": t_init, "dataset": ws / "data" / "train.jsonl", "max_new_tokens": 16}
        teacher = train("sft", {**sft, **sft_recipe(t_steps, 2e-3, 1234)}, models / f"teacher_{name}")
        ref[f"teacher_{name}"] = evaluate(
            teacher, task / "test.jsonl", "summarization", 16, models / f"teacher_{name}.eval.json"
        )
        jobs = []
        for seed in range(seeds):
            out = ws / "runs" / f"distill_{name}-seed{seed}"
            full = {
                "model_name_or_path": start,
                "max_new_tokens": 8,
                "dataset": ws / "data" / "train.jsonl",
                "teacher_model_name_or_path": teacher,
                "divergence": "reverse_kl",
                "lmbda": 1.0,
                **method_recipe(m_steps, 1e-3, seed),
            }

            def job(full=full, out=out) -> dict:
                t = time.perf_counter()
                model = train("distill", full, out)
                scores = evaluate(
                    model, task / "test.jsonl", "summarization", 8, out.parent / f"{out.name}.eval.json"
                )
                return {**scores, "seconds": time.perf_counter() - t}

            jobs.append(job)
        by[f"distill_{name}"] = parallel(jobs, workers)
    for name in ("distill_plain", "sft"):
        by[name] = []
        for seed in range(seeds):
            path = ws / "runs" / f"{name}-seed{seed}.eval.json"
            if not path.exists():
                raise SystemExit(
                    f"{path} is missing: run `python experiments/teachers.py context --out {ws}` first"
                )
            by[name].append({**json.loads(path.read_text()), "seconds": float("nan")})
    return report(
        "(a) a teacher with another tokenizer: summarization, byte-level BPE teachers and a word-level student",
        ref,
        by,
        [("distill_gpt2bpe", "distill_plain"), ("distill_gpt2bpe", "sft"), ("distill_bpe", "distill_plain")],
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


ROWS = {"context": context, "specialists": specialists, "tokenizer": tokenizer}


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
    ws = (
        args.out or ROOT / "runs" / "experiments" / f"teachers-{args.row}{'-quick' if args.quick else ''}"
    ).resolve()
    ws.mkdir(parents=True, exist_ok=True)
    random.seed(0)
    text = ROWS[args.row](ws, args.seeds, args.workers, args.quick)
    (ws / "report.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
