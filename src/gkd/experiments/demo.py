"""``gkd demo``: on-policy distillation against the baselines, end to end, in about ten minutes on two CPU cores.

The task is the built-in ``summarization`` task (a stand-in for XSum): list the salient items of the input, in any
order. Why this task (the toy-scale notes record the evidence): on deterministic tasks with a one-hot teacher nothing
separates the methods; here the target order is free, so the teacher's distribution is multi-modal, and errors are
recoverable, so a student sampling its own prefixes meets states that ground-truth data never shows it (exposure
bias). That is the regime where the paper's finding should show, and most clearly when sampling at temperature 1.

Pipeline (everything from the same seeds is reproducible):
1. data: train / test prompts from the task generator (test prompts are disjoint from training prompts);
2. teacher: the 2-layer model that gkd ships (trained by ``gkd demo --train-teacher``, i.e. ``gkd sft`` settings
   below), or trained now if it is missing;
3. the student's start: a 1-layer model SFT-trained to a plateau, clearly below the teacher;
4. per seed, from that same start with equal step budgets: SFT, SFT with twice the steps (equal wall time),
   supervised KD, SeqKD, ImitKD, on-policy GKD (forward KL, reverse KL, JSD(0.9)) and mixed GKD (λ=0.5, JSD(0.9));
5. evaluation on held-out prompts, greedy and sampled at temperature 1; mean ± SE over seeds and paired
   per-seed differences to SFT and to supervised KD.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from gkd.experiments.common import Job, evaluate_model, mean_se, paired, read_jsonl, run_jobs, write_jsonl

__all__ = ["DEMO_METHODS", "DemoSettings", "run_demo"]

ASSET_TEACHER = Path(__file__).resolve().parent.parent / "assets" / "demo_teacher"

# name -> config overrides (on top of DemoSettings.method_config); "steps" multiplies the step budget.
DEMO_METHODS: dict[str, dict[str, Any]] = {
    "sft": {"divergence": "nll", "lmbda": 0.0},
    "sft_2x": {"divergence": "nll", "lmbda": 0.0, "steps": 2},
    "supervised_kd": {"divergence": "forward_kl", "lmbda": 0.0},
    "seqkd": {"divergence": "nll", "lmbda": 0.0, "seqkd": True},
    "imitkd": {"divergence": "forward_kl", "lmbda": 0.5},
    "gkd_forward_kl": {"divergence": "forward_kl", "lmbda": 1.0},
    "gkd_reverse_kl": {"divergence": "reverse_kl", "lmbda": 1.0},
    "gkd_jsd_0.9": {"divergence": "jsd", "beta": 0.9, "lmbda": 1.0},
    "gkd_mixed_jsd_0.9": {"divergence": "jsd", "beta": 0.9, "lmbda": 0.5},
}
# relative cost of a step, for scheduling the longest jobs first
_COST = {"nll": 1.0, "forward_kl": 1.6, "reverse_kl": 1.6, "jsd": 1.6}


@dataclass
class DemoSettings:
    task: str = "summarization"
    seeds: int = 5
    n_train: int = 60_000
    n_test: int = 1000
    teacher_steps: int = 6000
    teacher_lr: float = 2e-3
    start_steps: int = 6000
    start_lr: float = 3e-3
    method_steps: int = 500
    method_lr: float = 1e-3
    batch_size: int = 64
    max_new_tokens: int = 8
    student: dict[str, Any] | None = None
    teacher: dict[str, Any] | None = None

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(
            seeds=2,
            n_train=2000,
            n_test=64,
            teacher_steps=60,
            start_steps=30,
            method_steps=6,
            batch_size=16,
            teacher={
                "architecture": "llama",
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 64,
                "tie_word_embeddings": True,
            },
        )


def _sft_config(out: Path, steps: int, lr: float, s: DemoSettings, warmup: int, seed: int) -> dict[str, Any]:
    return {
        "divergence": "nll",
        "lmbda": 0.0,
        "learning_rate": lr,
        "lr_scheduler_type": "cosine",
        "min_lr_ratio": 0.1,
        "warmup_steps": warmup,
        "max_steps": steps,
        "per_device_train_batch_size": s.batch_size,
        "max_new_tokens": s.max_new_tokens,
        "weight_decay": 0.01,
        "adam_beta2": 0.98,
        "output_dir": str(out),
        "logging_steps": max(1, steps // 10),
        "save_steps": 0,
        "save_total_limit": 1,
        "seed": seed,
        "progress": False,
    }


def method_config(name: str, seed: int, out: Path, s: DemoSettings) -> dict[str, Any]:
    spec = dict(DEMO_METHODS[name])
    mult = spec.pop("steps", 1)
    spec.pop("seqkd", None)
    return {
        **spec,
        "learning_rate": s.method_lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 20 if s.method_steps > 40 else 0,
        "max_steps": s.method_steps * mult,
        "per_device_train_batch_size": s.batch_size,
        "max_new_tokens": s.max_new_tokens,
        "temperature": 1.0,
        "adam_beta2": 0.98,
        "weight_decay": 0.01,
        "output_dir": str(out),
        "logging_steps": max(1, s.method_steps // 5),
        "save_steps": 0,
        "save_total_limit": 1,
        "seed": seed,
        "progress": False,
    }


class _Console:
    """Progress output: a rich console when available, else prints."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=False, highlight=False)

    def say(self, msg: str) -> None:
        self.console.print(msg, markup=False)


def _train_in_process(cfg: dict[str, Any], start: Any, tok: Any, records: list[dict], teacher: Any = None) -> Any:
    from gkd.config import GKDConfig
    from gkd.trainer import GKDTrainer

    trainer = GKDTrainer(GKDConfig(**cfg), student=start, teacher=teacher, tokenizer=tok, train_records=records, log=lambda m: None)
    trainer.train()
    return trainer.student


def _load_or_train_teacher(root: Path, s: DemoSettings, tok: Any, task: Any, train: list[dict], say: Any, retrain: bool) -> Path:
    from gkd.models import build_model, load_model

    dest = root / "teacher"
    shipped = ASSET_TEACHER if s.teacher is None else None
    if dest.exists() and (dest / "config.json").exists() and not retrain:
        say(f"teacher: reusing {dest}")
        return dest
    if shipped is not None and (shipped / "config.json").exists() and not retrain:
        model = load_model(str(shipped), what="teacher")
        if model.config.vocab_size == len(tok):
            shutil.copytree(shipped, dest, dirs_exist_ok=True)
            tok.save_pretrained(dest)
            say(f"teacher: loaded the shipped checkpoint ({shipped.name}, trained by `gkd demo --train-teacher`)")
            return dest
    spec = s.teacher or task.teacher_model_config()
    say(f"teacher: training {spec.get('num_hidden_layers')}L d{spec.get('hidden_size')} for {s.teacher_steps} steps ...")
    model = build_model(spec, tok, seed=1234)
    cfg = _sft_config(root / "runs" / "teacher", s.teacher_steps, s.teacher_lr, s, warmup=min(100, s.teacher_steps // 10), seed=1234)
    model = _train_in_process(cfg, model, tok, train)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def run_demo(
    output_dir: Path = Path("runs/demo"),
    *,
    quick: bool = False,
    seeds: int | None = None,
    workers: int | None = None,
    settings: DemoSettings | None = None,
    train_teacher_only: bool = False,
    retrain_teacher: bool = False,
) -> dict[str, Any]:
    """Run the demo and write ``results.json``, ``results.png`` and ``REPORT.md`` to ``output_dir``."""
    from gkd.models import build_model, load_model
    from gkd.tasks import get_task

    s = settings or (DemoSettings.quick() if quick else DemoSettings())
    if seeds is not None:
        s = replace(s, seeds=seeds)
    workers = workers or min(2, os.cpu_count() or 1)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    con = _Console()
    say = con.say
    t_begin = time.perf_counter()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    # 1. data ---------------------------------------------------------------------------------------------------
    task = get_task(s.task)
    data = out / "data"
    tok = task.build_tokenizer(str(data / "tokenizer"))
    train_path, test_path = data / "train.jsonl", data / "test.jsonl"
    if not train_path.exists() or len(read_jsonl(train_path)) != s.n_train:
        say(f"data: generating {s.n_train} training and {s.n_test} test prompts ({s.task}) ...")
        write_jsonl(train_path, ({k: v for k, v in r.items() if k != "references"} for r in task.generate("train", s.n_train, 0)))
        write_jsonl(test_path, task.generate("test", s.n_test, 0))
    train = read_jsonl(train_path)
    test = read_jsonl(test_path)

    # 2. teacher ------------------------------------------------------------------------------------------------
    teacher_dir = _load_or_train_teacher(out, s, tok, task, train, say, retrain_teacher or train_teacher_only)
    if train_teacher_only:
        ASSET_TEACHER.mkdir(parents=True, exist_ok=True)
        teacher = load_model(str(teacher_dir), what="teacher")
        teacher.save_pretrained(ASSET_TEACHER)
        say(f"teacher written to {ASSET_TEACHER}")
    teacher = load_model(str(teacher_dir), what="teacher")
    from gkd.data import tokenize_records

    test_ds = tokenize_records(test, tok, max_prompt_length=512, max_completion_length=s.max_new_tokens, source="test")
    teacher_scores = evaluate_model(teacher, tok, task, test_ds, max_new_tokens=s.max_new_tokens, seed=0)
    say(f"teacher: greedy {task.metric} {teacher_scores['greedy'][task.metric]:.1f}, T=1 {teacher_scores['sample'][task.metric]:.1f}")

    # 3. the student's start ------------------------------------------------------------------------------------
    start_dir = out / "start"
    if not (start_dir / "config.json").exists():
        spec = s.student or task.student_model_config()
        say(f"start: SFT of the student ({spec.get('num_hidden_layers')}L d{spec.get('hidden_size')}) for {s.start_steps} steps ...")
        t0 = time.perf_counter()
        model = build_model(spec, tok, seed=4321)
        cfg = _sft_config(out / "runs" / "start", s.start_steps, s.start_lr, s, warmup=min(50, s.start_steps // 10), seed=4321)
        model = _train_in_process(cfg, model, tok, train)
        model.save_pretrained(start_dir)
        tok.save_pretrained(start_dir)
        say(f"start: trained in {time.perf_counter() - t0:.0f}s")
    start = load_model(str(start_dir), what="student")
    start_scores = evaluate_model(start, tok, task, test_ds, max_new_tokens=s.max_new_tokens, seed=0)
    say(f"start: greedy {task.metric} {start_scores['greedy'][task.metric]:.1f}, T=1 {start_scores['sample'][task.metric]:.1f}")

    # SeqKD targets: the teacher samples targets once (as many prompts as a run consumes), shared by all seeds.
    seqkd_path = data / "seqkd.jsonl"
    n_seq = min(len(train), s.method_steps * s.batch_size)
    if not seqkd_path.exists() or len(read_jsonl(seqkd_path)) != n_seq:
        from gkd.teacher import seqkd_dataset

        say(f"seqkd: the teacher writes targets for {n_seq} prompts (T=1, once) ...")
        prompts = tokenize_records(train[:n_seq], tok, max_prompt_length=512, max_completion_length=s.max_new_tokens, source="train")
        ds = seqkd_dataset(
            teacher, tok, prompts, cache_dir=out / "runs", teacher_name=str(teacher_dir), max_new_tokens=s.max_new_tokens,
            temperature=1.0, top_k=0, top_p=1.0, seed=0, batch_size=500, log=lambda m: None,
        )
        rows = []
        for e in ds.examples:
            ids = [t for t in e.completion or [] if t != tok.eos_token_id]
            rows.append({"prompt": e.record["prompt"], "completion": tok.decode(ids)})
        write_jsonl(seqkd_path, rows)

    # 4. the methods ---------------------------------------------------------------------------------------------
    jobs = []
    for seed in range(s.seeds):
        for name, spec in DEMO_METHODS.items():
            cfg = method_config(name, seed, out / "runs" / f"seed{seed}" / name, s)
            cost = cfg["max_steps"] * _COST[cfg["divergence"]] * (1.5 if cfg["lmbda"] > 0 else 1.0)
            jobs.append(
                Job(
                    name=name, seed=seed, config=cfg, start=str(start_dir), teacher=str(teacher_dir),
                    train=str(seqkd_path if spec.get("seqkd") else train_path), test=str(test_path), task=s.task,
                    cost=cost,
                )
            )
    say(f"methods: {len(jobs)} runs ({len(DEMO_METHODS)} methods × {s.seeds} seeds, {s.method_steps} steps each) on {workers} workers ...")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]demo"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[last]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=con.console)
    results: list[dict[str, Any]] = []
    with progress:
        bar = progress.add_task("runs", total=len(jobs), last="")

        def on_result(r: dict[str, Any]) -> None:
            results.append(r)
            g, smp = r["scores"]["greedy"][task.metric], r["scores"]["sample"][task.metric]
            progress.update(bar, advance=1, last=f"{r['name']} seed {r['seed']}: greedy {g:.1f} / T=1 {smp:.1f} ({r['train_s']:.0f}s)")

        ordered = run_jobs(jobs, workers=workers, threads=1, on_result=on_result)

    # 5. report -------------------------------------------------------------------------------------------------
    summary = summarize(task, s, ordered, teacher_scores, start_scores, time.perf_counter() - t_begin)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    plot_results(summary, out / "results.png")
    (out / "REPORT.md").write_text(report_markdown(summary))
    say("")
    say(table_text(summary))
    say(f"\nwrote {out / 'results.json'}, {out / 'results.png'}, {out / 'REPORT.md'} ({summary['wall_s']:.0f}s in all)")
    return summary


# ---------------------------------------------------------------------------------------------------------------
# summarising
# ---------------------------------------------------------------------------------------------------------------
def summarize(task: Any, s: DemoSettings, results: list[dict[str, Any]], teacher: dict, start: dict, wall: float) -> dict[str, Any]:
    metric = task.metric
    methods: dict[str, Any] = {}
    for name in DEMO_METHODS:
        rows = sorted((r for r in results if r["name"] == name), key=lambda r: r["seed"])
        entry: dict[str, Any] = {"steps": rows[0]["steps"], "wall_s": sum(r["train_s"] for r in rows) / len(rows)}
        for mode in ("greedy", "sample"):
            vals = [r["scores"][mode][metric] for r in rows]
            m, se = mean_se(vals)
            entry[mode] = {"mean": m, "se": se, "seeds": vals}
        entry["secondary"] = {
            mode: {k: mean_se([r["scores"][mode][k] for r in rows])[0] for k in rows[0]["scores"][mode]}
            for mode in ("greedy", "sample")
        }
        methods[name] = entry
    for name, entry in methods.items():
        entry["paired"] = {}
        for base in ("sft", "supervised_kd"):
            entry["paired"][base] = {}
            for mode in ("greedy", "sample"):
                d, se = paired(entry[mode]["seeds"], methods[base][mode]["seeds"])
                entry["paired"][base][mode] = {"mean": d, "se": se}
    gkd_names = [n for n in methods if n.startswith("gkd_")]
    best = max(gkd_names, key=lambda n: methods[n]["sample"]["mean"])
    checks = {}
    for base in ("sft", "supervised_kd"):
        p = methods[best]["paired"][base]
        checks[base] = {
            "sample_beats_by_2se": p["sample"]["mean"] > 2 * p["sample"]["se"] and p["sample"]["mean"] > 0,
            "greedy_not_worse": p["greedy"]["mean"] >= -2 * p["greedy"]["se"],
        }
    return {
        "task": s.task,
        "metric": metric,
        "teacher": teacher["greedy"][metric],
        "start": start["greedy"][metric],
        "teacher_sample": teacher["sample"][metric],
        "start_sample": start["sample"][metric],
        "teacher_scores": teacher,
        "start_scores": start,
        "methods": methods,
        "best_gkd": best,
        "finding": {
            "holds": all(c["sample_beats_by_2se"] and c["greedy_not_worse"] for c in checks.values()),
            "checks": checks,
        },
        "seeds": list(range(s.seeds)),
        "settings": asdict(s),
        "wall_s": wall,
    }


def table_text(summary: dict[str, Any]) -> str:
    m = summary["metric"]
    lines = [
        f"{summary['task']}: {m} (%) on held-out prompts, mean ± SE over {len(summary['seeds'])} seeds; "
        "Δ = paired per-seed difference",
        f"teacher: greedy {summary['teacher']:.1f}, T=1 {summary['teacher_sample']:.1f}   "
        f"start: greedy {summary['start']:.1f}, T=1 {summary['start_sample']:.1f}",
        "",
        f"{'method':<20} {'steps':>5} {'greedy':>12} {'T=1 sample':>12} {'Δ sft (T=1)':>13} {'Δ sup.KD (T=1)':>15} "
        f"{'Δ sft (greedy)':>15} {'Δ sup.KD (greedy)':>18} {'s/run':>6}",
    ]
    for name, e in summary["methods"].items():
        p = e["paired"]

        def fmt(d: dict) -> str:
            return f"{d['mean']:+.1f} ± {d['se']:.1f}"

        lines.append(
            f"{name:<20} {e['steps']:>5} {e['greedy']['mean']:>6.1f} ± {e['greedy']['se']:<3.1f} "
            f"{e['sample']['mean']:>6.1f} ± {e['sample']['se']:<3.1f} {fmt(p['sft']['sample']):>13} "
            f"{fmt(p['supervised_kd']['sample']):>15} {fmt(p['sft']['greedy']):>15} {fmt(p['supervised_kd']['greedy']):>18} "
            f"{e['wall_s']:>6.1f}"
        )
    f = summary["finding"]
    verdict = "HOLDS" if f["holds"] else "DOES NOT HOLD"
    lines += [
        "",
        f"paper's finding (best GKD variant, {summary['best_gkd']}, beats SFT and supervised KD by > 2 SE of the paired "
        f"difference on T=1 samples without losing on greedy): {verdict} at this scale",
    ]
    return "\n".join(lines)


def report_markdown(summary: dict[str, Any]) -> str:
    s = summary["settings"]
    m = summary["metric"]
    rows = [
        "| method | steps | greedy | T=1 sample | Δ vs SFT (T=1) | Δ vs sup. KD (T=1) | Δ vs SFT (greedy) | Δ vs sup. KD (greedy) | item F1 (T=1) | s/run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in summary["methods"].items():
        p = e["paired"]

        def fmt(d: dict) -> str:
            return f"{d['mean']:+.1f} ± {d['se']:.1f}"

        f1 = e["secondary"]["sample"].get("item_f1", float("nan"))
        rows.append(
            f"| {name} | {e['steps']} | {e['greedy']['mean']:.1f} ± {e['greedy']['se']:.1f} | "
            f"{e['sample']['mean']:.1f} ± {e['sample']['se']:.1f} | {fmt(p['sft']['sample'])} | "
            f"{fmt(p['supervised_kd']['sample'])} | {fmt(p['sft']['greedy'])} | {fmt(p['supervised_kd']['greedy'])} | "
            f"{f1:.1f} | {e['wall_s']:.1f} |"
        )
    f = summary["finding"]
    verdict = "**holds**" if f["holds"] else "**does not hold**"
    return "\n".join(
        [
            "# gkd demo report",
            "",
            f"Task `{summary['task']}` (headline metric `{m}`, in %), {len(summary['seeds'])} seeds, "
            f"{s['n_test']} held-out prompts, greedy decoding and one sample per prompt at temperature 1.",
            f"Teacher: greedy {summary['teacher']:.1f}, T=1 {summary['teacher_sample']:.1f}. "
            f"Starting student (shared by every run): greedy {summary['start']:.1f}, T=1 {summary['start_sample']:.1f}.",
            f"Every method starts from the same student and trains {s['method_steps']} steps "
            f"(`sft_2x`: twice as many) at batch {s['batch_size']}, lr {s['method_lr']} (constant).",
            "Values are mean ± standard error over seeds; Δ columns are the mean ± SE of the *paired* per-seed "
            "differences.",
            "",
            *rows,
            "",
            f"The paper's finding — the best GKD variant (`{summary['best_gkd']}`) beats SFT and supervised KD by more "
            f"than twice the SE of the paired difference on temperature-1 samples, without losing on greedy — {verdict} "
            "in this run.",
            "",
            f"Total wall time: {summary['wall_s']:.0f} s. Re-run: `gkd demo` (or `make demo`).",
            "",
        ]
    )


def plot_results(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["methods"])
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.4
    for k, (mode, label) in enumerate((("greedy", "greedy"), ("sample", "T=1 sample"))):
        means = [summary["methods"][n][mode]["mean"] for n in names]
        ses = [summary["methods"][n][mode]["se"] for n in names]
        ax.bar([i + (k - 0.5) * width for i in x], means, width, yerr=ses, capsize=3, label=label)
    ax.axhline(summary["teacher_sample"], color="k", ls="--", lw=1, label="teacher (T=1)")
    ax.axhline(summary["start_sample"], color="gray", ls=":", lw=1, label="start (T=1)")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel(f"{summary['metric']} (%)")
    ax.set_title(f"gkd demo: {summary['task']}, mean ± SE over {len(summary['seeds'])} seeds")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
