"""The ``gkd`` command line.

    gkd distill --config run.yaml [key=value ...]   distil a teacher into a student (any GKD configuration)
    gkd sft --config run.yaml [key=value ...]       supervised fine-tuning (a teacher, or the student's start)
    gkd generate --model M --dataset D --out F      sample completions to JSONL
    gkd eval --model M --dataset D --metric NAME    score a model (greedy and/or sampled)
    gkd prepare TASK --out DIR                      write a built-in task's data, tokenizer and tiny models
    gkd demo                                        the built-in end-to-end comparison of distillation methods
    gkd experiment NAME                             the paper's experiment families at toy scale

Errors the user can fix are printed as one line (exit code 2); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from gkd.errors import GKDError
from gkd.io import quiet_libraries

__all__ = ["main"]


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", "-c", action="append", help="YAML config file; repeat to layer files (later ones win)"
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lmbda=0.5 beta=0.9 lora.r=8")


def _cmd_distill(args: argparse.Namespace, sft: bool = False) -> int:
    from gkd.config import load_config
    from gkd.trainer import GKDTrainer

    defaults: dict[str, Any] = {"divergence": "nll", "lmbda": 0.0} if sft else {}
    if args.config is None and not args.overrides:
        raise GKDError(f"gkd {'sft' if sft else 'distill'} needs --config FILE (and/or key=value overrides)")
    cfg = load_config(args.config or [], args.overrides, **defaults)
    if sft and (cfg.divergence != "nll" or cfg.lmbda != 0.0):
        raise GKDError("gkd sft trains on ground truth: leave divergence and lmbda unset (use gkd distill)")
    result = GKDTrainer(cfg).train()
    loss = result.final_loss if math.isfinite(result.final_loss) else None  # strict JSON has no NaN
    status = "already_finished" if result.finished else "finished"
    print(
        json.dumps(
            {"step": result.step, "final_loss": loss, "output_dir": str(result.output_dir), "status": status}
        )
    )
    return 0


def _check_sampling_args(args: argparse.Namespace) -> None:
    """The same range checks (and one-line errors) ``gkd distill`` gives for these keys."""
    checks = [
        (args.max_new_tokens > 0, "--max-new-tokens", "a positive integer", args.max_new_tokens),
        (args.max_prompt_length > 0, "--max-prompt-length", "a positive integer", args.max_prompt_length),
        (args.batch_size > 0, "--batch-size", "a positive integer", args.batch_size),
        (
            math.isfinite(args.temperature) and args.temperature >= 0,
            "--temperature",
            ">= 0 (0: greedy)",
            args.temperature,
        ),
        (
            args.max_samples is None or args.max_samples > 0,
            "--max-samples",
            "a positive integer",
            args.max_samples,
        ),
    ]
    if hasattr(args, "top_p"):
        checks += [
            (0.0 < args.top_p <= 1.0, "--top-p", "in (0, 1]", args.top_p),
            (args.top_k >= 0, "--top-k", ">= 0 (0 disables top-k)", args.top_k),
            (args.num_samples > 0, "--num-samples", "a positive integer", args.num_samples),
        ]
    for ok, flag, allowed, value in checks:
        if not ok:
            raise GKDError(f"{flag} must be {allowed}, got {value}")


def _load_for_inference(args: argparse.Namespace):
    """Tokenizer, model (on ``--device`` in ``--dtype``) and tokenized records of ``gkd generate`` / ``gkd eval``.
    The records are read and checked before the model loads."""
    import torch

    from gkd.build import resolve_dtype
    from gkd.data import load_records, tokenize_records
    from gkd.models import load_config, load_model, load_tokenizer

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise GKDError(f"--device {device}: no CUDA GPU is available here; use --device cpu (or auto)")
    tok = load_tokenizer(args.model)
    seq2seq = bool(getattr(load_config(args.model), "is_encoder_decoder", False))
    records, _ = load_records(args.dataset, args.split, split_key="--split")
    if args.max_samples:
        records = records[: args.max_samples]
    data = tokenize_records(
        records,
        tok,
        max_prompt_length=args.max_prompt_length,
        max_completion_length=1 << 20,
        source=f"dataset '{args.dataset}'",
        seq2seq=seq2seq,
    )
    dtype = resolve_dtype(args.dtype, device)  # auto: bfloat16 on a GPU that has it, else float32
    model = load_model(args.model, what="model", dtype=dtype).to(device)
    return tok, model, data


def _cmd_generate(args: argparse.Namespace) -> int:
    from gkd.evaluation import generate_texts
    from gkd.sampling import local_sampler

    _check_sampling_args(args)
    tok, model, data = _load_for_inference(args)
    from gkd.io import atomic_open

    sampler = local_sampler("auto")
    out = Path(args.out)
    with atomic_open(out) as fh:
        for k in range(args.num_samples):
            texts = generate_texts(
                model,
                tok,
                data,
                max_new_tokens=args.max_new_tokens,
                greedy=args.greedy,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                batch_size=args.batch_size,
                seed=args.seed + k,
                sampler=sampler,
            )
            for ex, text in zip(data.examples, texts):
                fh.write(json.dumps({**generated_record(ex.record, text), "sample": k}) + "\n")
    print(f"wrote {len(data) * args.num_samples} completions to {out}")
    return 0


def generated_record(record: dict, text: str) -> dict:
    """A training record whose target is ``text``: what ``gkd generate`` writes for each sample.

    Fed back to ``gkd sft`` / ``gkd distill`` it trains on the generation, whatever the source format was: a
    ``messages`` conversation gets the generation as its final assistant turn (replacing the original answer), a
    conversational prompt list gets it as the assistant completion, a text prompt as ``completion``. The source's
    reference answers are not carried over (they are not references of the generation).
    """
    if "messages" in record:
        msgs = list(record["messages"])
        if msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]
        return {"messages": [*msgs, {"role": "assistant", "content": text}]}
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": text}]}
    return {"prompt": prompt, "completion": text}


def _cmd_eval(args: argparse.Namespace) -> int:
    from gkd.evaluation import evaluate, flatten
    from gkd.sampling import local_sampler
    from gkd.scoring import check_metric_name, check_records

    _check_sampling_args(args)
    check_metric_name(args.metric, key="--metric")
    tok, model, data = _load_for_inference(args)
    check_records(args.metric, [e.record for e in data.examples], key="--metric")
    results = evaluate(
        model,
        tok,
        data,
        args.metric,
        max_new_tokens=args.max_new_tokens,
        sampled={} if args.greedy_only else {"sample": args.temperature},
        seeds=(args.seed,),
        batch_size=args.batch_size,
        sampler=local_sampler("auto"),
    )
    print(json.dumps(flatten(results), indent=2))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from gkd.experiments.common import prepare_task

    if args.n_train <= 0 or args.n_eval <= 0:
        raise GKDError(f"--n-train and --n-eval must be positive, got {args.n_train} and {args.n_eval}")
    paths = prepare_task(
        args.task, Path(args.out), n_train=args.n_train, n_eval=args.n_eval, seed=args.seed, force=args.force
    )
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from gkd.experiments.demo import run_demo, train_demo_teacher

    if args.train_teacher:
        train_demo_teacher()
        return 0
    run_demo(
        output_dir=Path(args.output_dir),
        quick=args.quick,
        seeds=args.seeds,
        workers=args.workers,
        retrain_teacher=args.retrain_teacher,
    )
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from gkd.experiments import run_experiment

    run_experiment(args.name, output_dir=Path(args.output_dir) if args.output_dir else None, quick=args.quick)
    return 0


def _version() -> str:
    from gkd import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gkd", description="On-policy distillation of language models (GKD)."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--version", action="version", version=f"gkd {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("distill", help="distil a teacher into a student")
    _add_config_args(p)
    p = sub.add_parser("sft", help="supervised fine-tuning on ground truth (divergence: nll, lmbda: 0)")
    _add_config_args(p)

    for name in ("generate", "eval"):
        p = sub.add_parser(
            name, help="sample completions to JSONL" if name == "generate" else "score a model"
        )
        p.add_argument("--model", required=True)
        p.add_argument("--dataset", required=True)
        p.add_argument("--split", default="test")
        p.add_argument("--max-samples", type=int, default=None)
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--max-prompt-length", type=int, default=1024)
        p.add_argument("--temperature", type=float, default=1.0)
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
        p.add_argument(
            "--dtype",
            default="auto",
            choices=["auto", "float32", "bfloat16", "float16"],
            help="auto: bfloat16 on a CUDA GPU that supports it, float32 on the CPU",
        )
        if name == "generate":
            p.add_argument("--out", required=True)
            p.add_argument("--greedy", action="store_true")
            p.add_argument("--top-k", type=int, default=0)
            p.add_argument("--top-p", type=float, default=1.0)
            p.add_argument("--num-samples", type=int, default=1)
        else:
            p.add_argument("--metric", required=True, help="a metric name or a built-in task name")
            p.add_argument("--greedy-only", action="store_true")

    p = sub.add_parser("prepare", help="write a built-in task's data, tokenizer and tiny models")
    p.add_argument("task")
    p.add_argument("--out", required=True)
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite a folder that holds another task's files")

    p = sub.add_parser(
        "demo", help="the built-in comparison of distillation methods (about 10 minutes on 2 cores)"
    )
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a reduced run that takes seconds (for tests)")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: 2)")
    p.add_argument(
        "--retrain-teacher", action="store_true", help="train the teacher instead of using the shipped one"
    )
    p.add_argument(
        "--train-teacher",
        action="store_true",
        help="(maintainers) train the teacher and write it to gkd's assets",
    )

    p = sub.add_parser("experiment", help="run one of the paper's experiment families at toy scale")
    p.add_argument("name", help="methods, divergences, temperature, data_efficiency or rl")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--quick", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_libraries()
    handlers = {
        "distill": _cmd_distill,
        "sft": lambda a: _cmd_distill(a, sft=True),
        "generate": _cmd_generate,
        "eval": _cmd_eval,
        "prepare": _cmd_prepare,
        "demo": _cmd_demo,
        "experiment": _cmd_experiment,
    }
    try:
        return handlers[args.command](args)
    except GKDError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
