"""What each ``gkd`` command does once its command line is parsed (:mod:`gkd.cli` parses it and calls these).

Each ``cmd_*`` takes the parsed arguments (``gkd distill`` / ``gkd sft``: the validated config) and returns the exit
code; errors the user can fix are raised as :class:`gkd.errors.GKDError`, which the command line prints as one line.
The heavy modules (torch, transformers, the trainer) are imported inside the commands, so ``gkd --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gkd.errors import ConfigError, GKDError
from gkd.io import atomic_open

if TYPE_CHECKING:
    from gkd.config import GKDConfig

__all__ = [
    "cmd_demo",
    "cmd_diagnose",
    "cmd_distill",
    "cmd_eval",
    "cmd_experiment",
    "cmd_generate",
    "cmd_prepare",
    "cmd_serve_teacher",
    "generated_record",
    "watch_launcher",
]


def watch_launcher(interval: float = 1.0) -> threading.Thread | None:
    """Under a launcher (torchrun / accelerate launch: ``LOCAL_RANK`` set), stop this worker when the launcher
    dies: a ``kill -9`` of torchrun otherwise leaves the workers training on, and a resumed run would share
    ``output_dir`` with them. A daemon thread polls the parent's pid; the checkpoints already written are complete
    (written atomically), so the run resumes from the last one."""
    if "LOCAL_RANK" not in os.environ:
        return None
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:  # re-parented: the launcher is gone
                print(
                    f"error: the launcher (pid {parent}) is gone; this worker stops (resume with "
                    "resume_from_checkpoint=latest)",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(2)
                return  # (only reached where os._exit is replaced, in tests)

    thread = threading.Thread(target=watch, name="gkd-launcher-watch", daemon=True)
    thread.start()
    return thread


def cmd_distill(cfg: GKDConfig) -> int:
    """gkd distill / gkd sft: train with ``cfg`` (stopping with the launcher, if any); one JSON result line."""
    from gkd.trainer import GKDTrainer

    watch_launcher()
    result = GKDTrainer(cfg).train()
    loss = result.final_loss if math.isfinite(result.final_loss) else None  # strict JSON has no NaN
    status = "already_finished" if result.already_finished else "finished"
    if int(os.environ.get("RANK", "0")) != 0:  # one result line for a multi-process run
        return 0
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

    shots = []
    if args.fewshot_k is not None and args.fewshot_file is None:
        raise GKDError("--fewshot-k needs --fewshot-file")
    if args.fewshot_k is not None and args.fewshot_k <= 0:
        raise GKDError(f"--fewshot-k must be a positive integer, got {args.fewshot_k}")
    if args.fewshot_file is not None:
        from gkd.evaluation import load_fewshot

        shots = load_fewshot(args.fewshot_file, args.fewshot_k, key="--fewshot-file")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise GKDError(f"--device {device}: no CUDA GPU is available here; use --device cpu (or auto)")
    tok = load_tokenizer(args.model, chat_template_path=args.chat_template_path)
    seq2seq = bool(getattr(load_config(args.model), "is_encoder_decoder", False))
    records, _ = load_records(args.dataset, args.split, split_key="--split")
    if args.max_samples:
        records = records[: args.max_samples]
    if shots:
        from gkd.evaluation import with_fewshot

        records = with_fewshot(records, shots)
    data = tokenize_records(
        records,
        tok,
        max_prompt_length=args.max_prompt_length,
        max_completion_length=1 << 20,
        source=f"dataset '{args.dataset}'",
        seq2seq=seq2seq,
        apply_chat_template=args.apply_chat_template,
    )
    dtype = resolve_dtype(args.dtype, device)  # auto: bfloat16 on a GPU that has it, else float32
    model = load_model(args.model, what="model", dtype=dtype).to(device)
    return tok, model, data


def cmd_generate(args: argparse.Namespace) -> int:
    from gkd.evaluation import generate_texts
    from gkd.sampling import local_sampler

    _check_sampling_args(args)
    target = Path(os.path.expanduser(args.out))
    if target.is_dir():
        raise GKDError(
            f"--out '{args.out}' is a folder; give a file name for the JSONL, e.g. --out {target / 'generations.jsonl'}"
        )
    tok, model, data = _load_for_inference(args)
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


def cmd_eval(args: argparse.Namespace) -> int:
    from gkd.evaluation import evaluate, flatten
    from gkd.sampling import local_sampler
    from gkd.scoring import check_metric_name, check_records

    _check_sampling_args(args)
    check_metric_name(args.metric, key="--metric")
    if args.num_beams < 1:
        raise GKDError(f"--num-beams must be a positive integer (1: greedy decoding), got {args.num_beams}")
    if args.bootstrap < 0:
        raise GKDError(
            f"--bootstrap must be a number of resamples >= 0 (0: no intervals), got {args.bootstrap}"
        )
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
        tokenize=args.tokenize,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        bootstrap=args.bootstrap,
        bootstrap_seed=args.seed,
    )
    print(json.dumps(flatten(results), indent=2))
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    """gkd diagnose: everything is checked (flags, metric name, paths, records, tokenizers) before a model loads."""
    import torch

    from gkd.build import resolve_dtype
    from gkd.data import load_records
    from gkd.diagnose import diagnose, format_report
    from gkd.models import load_model, load_tokenizer
    from gkd.scoring import load_reward

    if (
        args.metric is not None
    ):  # a metric / task name, or module:function (imported now, to fail before loading)
        try:
            load_reward(args.metric, key="--metric")
        except ConfigError as e:
            raise ConfigError(
                str(e).replace(f"reward '{args.metric}'", f"--metric '{args.metric}'", 1)
            ) from e
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise GKDError(f"--device {device}: no CUDA GPU is available here; use --device cpu (or auto)")
    records, _ = load_records(args.dataset, args.split, split_key="--split")
    tok = load_tokenizer(args.student, "student tokenizer", chat_template_path=args.chat_template_path)
    # gkd distill's rule: a teacher folder without tokenizer files uses the student's; one with them (or a hub id)
    # must have the student's vocabulary (models.check_teacher_student, one line)
    folder = Path(os.path.expanduser(args.teacher))
    files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")
    bare = folder.is_dir() and not any((folder / f).exists() for f in files)
    teacher_tok = None if bare else load_tokenizer(args.teacher, "teacher tokenizer")
    if teacher_tok is not None and tok.get_vocab() != teacher_tok.get_vocab():
        raise GKDError(
            "teacher and student tokenizers differ (different vocabularies); gkd diagnose compares distributions "
            "token by token, so use a teacher and student that share a tokenizer"
        )
    dtype = resolve_dtype(args.dtype, device)
    student = load_model(args.student, what="student", dtype=dtype).to(device)
    teacher = load_model(args.teacher, what="teacher", dtype=dtype).to(device)
    result = diagnose(
        teacher,
        student,
        tok,
        records,
        args.metric,
        num_prompts=args.num_prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        batch_size=args.batch_size,
        off_track=args.off_track,
        max_prompt_length=args.max_prompt_length,
        apply_chat_template=args.apply_chat_template,
        teacher_tokenizer=teacher_tok,
    )
    result["settings"].update(teacher=args.teacher, student=args.student, dataset=args.dataset)
    if args.out:  # written before the report is printed: a closed pipe on stdout does not lose it
        out = Path(args.out) / "diagnose.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(out) as fh:
            fh.write(json.dumps(result, indent=2) + "\n")
    print(format_report(result))
    if args.out:
        print(f"wrote {out}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from gkd.experiments.common import prepare_task

    if args.n_train <= 0 or args.n_eval <= 0:
        raise GKDError(f"--n-train and --n-eval must be positive, got {args.n_train} and {args.n_eval}")
    paths = prepare_task(
        args.task, Path(args.out), n_train=args.n_train, n_eval=args.n_eval, seed=args.seed, force=args.force
    )
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
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


def cmd_serve_teacher(args: argparse.Namespace) -> int:
    from gkd.serve import serve_teacher

    return serve_teacher(
        args.model,
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        device=args.device,
        api_key=args.api_key,
        max_batch_tokens=args.max_batch_tokens,
        served_model_name=args.served_model_name,
    )


def cmd_experiment(args: argparse.Namespace) -> int:
    from gkd.experiments import run_experiment

    out = Path(args.output_dir) if args.output_dir else None
    run_experiment(args.name, output_dir=out, quick=args.quick, workers=args.workers)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """gkd study FILE.yaml: paired multi-seed comparisons on the user's own models and data (docs/studies.md)."""
    from gkd.experiments.userstudy import run_study_file

    run_study_file(args.file, output_dir=args.out, workers=args.workers)
    return 0
