"""gkd vs Hugging Face TRL: on-policy distillation step time, memory, loss equality, rollout and loss memory.

What is measured (everything on the CPU, float32, ``--threads`` torch threads, default 2):

* **Models and data, identical for both libraries.** Llama-style models built from a config with fixed seeds
  (teacher hidden 384, 8 layers, 6 heads, MLP 1536; student hidden 256, 4 layers, 4 heads, MLP 768; untied
  embeddings; SDPA attention), at vocab 8,192 and 65,536. A local WordLevel tokenizer (7 special tokens, 12 words
  and the numbers 0..N, so its length equals the model vocab) with a small chat template, saved and loaded with
  ``AutoTokenizer``. Synthetic "add the numbers" conversations in the ``messages`` format: a 48-token prompt and a
  64-token assistant turn. gkd reads the same ``messages`` records; TRL's ``DistillationTrainer`` gets the prompt
  turns as ``prompt`` records. Batch 8, 64 new tokens per row.
* **On-policy step (λ=1, JSD β=0.5, sampling temperature 1.0, lr 1e-4, grad clip 1.0).** gkd ``GKDTrainer.train()``
  against TRL 1.16's ``GKDTrainer`` in its fair configuration (``bf16=False, gradient_checkpointing=False``) and
  TRL's ``DistillationTrainer``. Each run is its own subprocess (so peak RSS, ``ru_maxrss``, is per trainer); runs
  alternate between the trainers round by round. A step's time is the interval between consecutive step ends
  (TRL: ``on_step_end`` callbacks; gkd: returns of ``train_step`` inside ``train()``), so it covers data, rollout,
  forwards, loss, backward, clipping, optimizer and the loop's own overhead. Warm-up steps are dropped and the
  median over the measured steps of all rounds is reported. Random-init models almost never sample EOS, so
  completions are (almost always) the full 64 tokens; tok/s counts 8 x 112 sequence tokens ("all") and
  8 x 64 completion tokens ("loss") per step.
* **Same loss on the same samples.** One batch is rolled out by gkd; gkd's training loss (``run.objective.loss`` on the step's teacher view and student forward, the
  fused chunked JSD from hidden states) and TRL's ``GKDTrainer.generalized_jsd_loss`` on the full logits of the
  same models and sequences are compared, values and student gradients.
* **gkd's step, part by part.** The parts a step cannot avoid are timed in isolation on the same kind of batch:
  rollout, teacher forward (no grad), student forward, loss (the fused forward that also forms the gradient),
  student backward, clip + optimizer. Their medians are summed and compared with full ``train_step`` calls made
  in the same process, alternating with the parts: ``step_over_parts = step / sum``. The trainer's own per-part
  timers (``time_*`` of the step record) are shown next to them.
* **Rollout.** ``benchmarks/bench_rollout.py``: gkd's ``sample_completions(backend="fast")`` vs ``model.generate``
  on the student (batch 8, prompt 48, 64 new tokens).
* **Loss memory.** gkd's chunked loss from hidden states (``benchmarks/bench_loss_memory.py --modes chunked``:
  8 x 512 positions, the first 1/8 masked, hidden 1024, β=0.5, forward + backward) at V=32,000 and 128,000, and
  TRL's ``generalized_jsd_loss`` from logits [8, 512, 32,000] (forward + backward), each in a fresh subprocess
  under ``RLIMIT_AS``; the peak RSS above the inputs is compared.

TRL is not a gkd dependency: when the running interpreter cannot import it, a separate venv is created once and
reused (``benchmarks/_trl_env.py``; ``$GKD_TRL_VENV``, default ``~/.cache/gkd/bench-venv-trl``). All children,
gkd's included, run in that interpreter, so both libraries use the same torch and transformers.

Usage (from the repository root; about 10-20 minutes on an idle 2-core machine):

    python benchmarks/bench_vs_trl.py                 # everything
    python benchmarks/bench_vs_trl.py --quick         # fewer rounds and steps
    python benchmarks/bench_vs_trl.py --only step8k   # step8k step65k parts check rollout lossmem

The run ends with machine-readable lines::

    onpolicy_speedup_vs_trl_gkd=X  onpolicy_speedup_vs_trl_gkd_v65k=X  onpolicy_speedup_vs_trl_distillation=X
    rollout_speedup_vs_generate=X  step_over_parts=X  loss_peak_memory_ratio_vs_trl=X
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULT_TAG = "BENCH_RESULT "
GIB = 1 << 30

SPECIAL = ["<pad>", "<unk>", "<bos>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
WORDS = ["add", "the", "numbers", ":", "+", "=", "?", "so", "is", "sum", "and", "then"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TEACHER = {"hidden_size": 384, "num_hidden_layers": 8, "num_attention_heads": 6, "intermediate_size": 1536}
STUDENT = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 768}
BATCH, PROMPT_LEN, NEW_TOKENS, BETA, LR = 8, 48, 64, 0.5, 1e-4
N_RECORDS = 256
TRAINERS = {"gkd": "gkd GKDTrainer", "trl_gkd": "TRL GKDTrainer", "trl_distill": "TRL DistillationTrainer"}


# ================================================================================================================
# Shared set-up (runs in the children)
# ================================================================================================================
def build_tokenizer(vocab: int, workdir: Path) -> Any:
    """The WordLevel tokenizer of ``vocab`` entries, saved once under ``workdir`` and loaded with AutoTokenizer."""
    from transformers import AutoTokenizer

    path = workdir / f"tokenizer-v{vocab}"
    if not (path / "tokenizer_config.json").exists():
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        table = {t: i for i, t in enumerate(SPECIAL + WORDS)}
        for n in range(vocab - len(table)):
            table[str(n)] = len(table)
        backend = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            pad_token="<pad>",
            unk_token="<unk>",
            bos_token="<bos>",
            eos_token="<|end|>",
        )
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))
    assert len(tok) == vocab, (len(tok), vocab)
    return tok


def build_records(n: int = N_RECORDS, seed: int = 0) -> list[dict]:
    """``messages`` conversations: a 48-token prompt (with the template) and a 64-token assistant turn (with EOS)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        numbers = [rng.randint(0, 99) for _ in range(20)]
        user = "add the numbers : " + " + ".join(map(str, numbers)) + " = ?"
        words, total = [], 0
        for x in numbers:
            total += x
            words += [str(x), "=", str(total), "so"]
        records.append(
            {
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": " ".join(words[:63])},
                ]
            }
        )
    return records


def build_model(
    spec: dict[str, int],
    vocab: int,
    tok: Any,
    seed: int,
    *,
    max_positions: int = 512,
    tied: bool = False,
    kv_heads: int | None = None,
) -> Any:
    """A Llama-style model from ``spec``; the keyword options (used by ``bench_memory.py``) default to this
    benchmark's setup: 512 positions, untied embeddings, as many key/value heads as attention heads."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab,
        num_key_value_heads=kv_heads or spec["num_attention_heads"],
        tie_word_embeddings=tied,
        max_position_embeddings=max_positions,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **spec,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def build_models(vocab: int, tok: Any) -> tuple[Any, Any]:
    return build_model(TEACHER, vocab, tok, seed=1), build_model(STUDENT, vocab, tok, seed=2)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.disable(logging.WARNING)


def _report(result: dict[str, Any]) -> None:
    print(RESULT_TAG + json.dumps(result), flush=True)


class _Clock:
    """Per-step end times (wall and process CPU) and the peak RSS so far."""

    def __init__(self) -> None:
        self.wall = [time.perf_counter()]
        self.cpu = [time.process_time()]
        self.rss: list[float] = []

    def tick(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.rss.append(_maxrss_mb())

    def result(self, warmup: int) -> dict[str, Any]:
        wall = [b - a for a, b in zip(self.wall, self.wall[1:])]
        cpu = [b - a for a, b in zip(self.cpu, self.cpu[1:])]
        return {
            "wall": wall[warmup:],
            "cpu": cpu[warmup:],
            "peak_rss_mb": max(self.rss),
            "warmup_wall": wall[:warmup],
        }


# ================================================================================================================
# Children: one measurement each
# ================================================================================================================
def child_gkd(args: argparse.Namespace) -> dict[str, Any]:
    """gkd's GKDTrainer.train() for warmup + steps on-policy steps; step ends timed around train_step."""
    trainer = _gkd_trainer(args, steps=args.warmup + args.steps)
    rss_before = _maxrss_mb()
    records: list[dict[str, Any]] = []
    step = trainer.train_step

    def timed_step() -> dict[str, Any]:
        record = step()
        clock.tick()
        records.append(record)
        return record

    trainer.train_step = timed_step  # type: ignore[method-assign]
    clock = _Clock()
    trainer.train()
    measured = records[args.warmup :]
    parts = {
        k[5:]: statistics.median(r.get(k, 0.0) for r in measured)
        for k in (
            "time_rollout",
            "time_teacher",
            "time_student_forward",
            "time_loss",
            "time_backward",
            "time_optimizer",
        )
    }
    return {
        **clock.result(args.warmup),
        "rss_before_mb": rss_before,
        "losses": [r["loss"] for r in records],
        "completion_tokens": [r["completion_tokens"] for r in measured],
        "trainer_parts": parts,
        "trainer_step_s": statistics.median(r["step_s"] for r in measured),
    }


def _trl_common(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "output_dir": tempfile.mkdtemp(prefix="trl-", dir=args.workdir),
        "per_device_train_batch_size": BATCH,
        "gradient_accumulation_steps": 1,
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 1.0,
        "max_steps": args.warmup + args.steps,
        "bf16": False,
        "gradient_checkpointing": False,
        "use_cpu": True,
        "logging_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 42,
        "beta": BETA,
        "temperature": 1.0,
    }


def _trl_run(trainer: Any, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import TrainerCallback

    clock = _Clock()

    class StepClock(TrainerCallback):
        def on_train_begin(self, *_a: Any, **_k: Any) -> None:
            nonlocal clock
            clock = _Clock()

        def on_step_end(self, *_a: Any, **_k: Any) -> None:
            clock.tick()

    trainer.add_callback(StepClock())
    rss_before = _maxrss_mb()
    trainer.train()
    return {**clock.result(args.warmup), "rss_before_mb": rss_before}


def child_trl_gkd(args: argparse.Namespace) -> dict[str, Any]:
    """TRL's experimental GKDTrainer, fair configuration (fp32, no gradient checkpointing), λ=1, β=0.5, T=1."""
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tok = build_tokenizer(args.vocab, args.workdir)
    teacher, student = build_models(args.vocab, tok)
    config = GKDConfig(**_trl_common(args), lmbda=1.0, max_new_tokens=NEW_TOKENS, disable_dropout=True)
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=Dataset.from_list(build_records()),
        processing_class=tok,
    )
    return _trl_run(trainer, args)


def child_trl_distill(args: argparse.Namespace) -> dict[str, Any]:
    """TRL's DistillationTrainer (on-policy, chunked JSD from hidden states), β=0.5, T=1."""
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    tok = build_tokenizer(args.vocab, args.workdir)
    tok.padding_side = "left"
    teacher, student = build_models(args.vocab, tok)
    config = DistillationConfig(**_trl_common(args), max_completion_length=NEW_TOKENS, disable_dropout=True)
    prompts = [{"prompt": r["messages"][:-1]} for r in build_records()]
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=Dataset.from_list(prompts),
        processing_class=tok,
    )
    return _trl_run(trainer, args)


def _gkd_trainer(args: argparse.Namespace, steps: int = 10**6) -> Any:
    from gkd.config import GKDConfig
    from gkd.trainer import GKDTrainer

    tok = build_tokenizer(args.vocab, args.workdir)
    teacher, student = build_models(args.vocab, tok)
    cfg = GKDConfig(
        output_dir=tempfile.mkdtemp(prefix="gkd-", dir=args.workdir),
        lmbda=1.0,
        divergence="jsd",
        beta=BETA,
        temperature=1.0,
        max_new_tokens=NEW_TOKENS,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_steps=steps,
        num_threads=args.threads,
        logging_steps=10**9,  # like the TRL runs: no logging (gkd logs step 1 only, a warm-up step)
        save_steps=0,
        progress=False,
    )
    trainer = GKDTrainer(
        cfg,
        student=student,
        teacher=teacher,
        tokenizer=tok,
        train_records=build_records(),
        log=lambda _m: None,
    )
    trainer.setup()
    return trainer


def child_parts(args: argparse.Namespace) -> dict[str, Any]:
    """gkd's real step (``GKDTrainer.train_step`` -> ``gkd.step.gkd_step``) vs the sum of its parts, each timed in
    isolation through the same public pieces the step calls, alternating round by round."""
    import dataclasses

    from gkd.step import optimizer_step, student_samples

    trainer = _gkd_trainer(args)
    run = trainer.setup()
    objective = run.objective
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    names = ("rollout", "teacher_forward", "student_forward", "loss", "backward", "optimizer")
    parts: dict[str, list[float]] = {k: [] for k in (*names, "loss_with_stats")}
    steps: list[float] = []
    trainer_parts: list[dict[str, float]] = []
    for r in range(args.warmup + args.steps):
        t0 = clock()
        record = trainer.train_step()
        step_s = clock() - t0

        times: dict[str, float] = {}
        t0 = clock()
        batch = student_samples(run, run.stream.next())
        times["rollout"] = clock() - t0
        terms = objective.terms(batch, float(batch.num_tokens()), None)
        targets = batch.completion_ids[batch.completion_mask]
        t0 = clock()
        t_out = run.teacher.view(batch)
        times["teacher_forward"] = clock() - t0
        t0 = clock()
        s_out = run.student_forward(
            batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask
        )
        times["student_forward"] = clock() - t0
        t0 = clock()
        detached = dataclasses.replace(s_out, hidden=s_out.hidden.detach())
        objective.from_outputs(detached, t_out, terms, targets, stats={})
        times["loss_with_stats"] = clock() - t0
        t0 = clock()
        loss = objective.from_outputs(s_out, t_out, terms, targets, None)
        times["loss"] = clock() - t0
        t0 = clock()
        loss.backward()
        times["backward"] = clock() - t0
        t0 = clock()
        optimizer_step(run, True)
        times["optimizer"] = clock() - t0
        if r >= args.warmup:
            steps.append(step_s)
            trainer_parts.append({k[5:]: v for k, v in record.items() if k.startswith("time_")})
            for k, v in times.items():
                parts[k].append(v)
    med = {k: statistics.median(v) for k, v in parts.items()}
    in_trainer = {k: statistics.median(p.get(k, 0.0) for p in trainer_parts) for k in trainer_parts[0]}
    return {"step": steps, "parts": parts, "median_parts": med, "trainer_parts": in_trainer}


def child_check(args: argparse.Namespace) -> dict[str, Any]:
    """gkd's training loss vs TRL's generalized_jsd_loss on one identical batch: values and student gradients."""
    import torch
    from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer

    from gkd.step import student_samples

    trainer = _gkd_trainer(args)
    batch = student_samples(trainer.setup(), trainer.stream.next())
    valid = batch.completion_mask
    n_valid = float(valid.sum())
    params = [p for p in trainer.student.parameters() if p.requires_grad]

    def grads() -> torch.Tensor:
        flat = torch.cat([p.grad.flatten() for p in params])
        trainer.optimizer.zero_grad(set_to_none=True)
        return flat

    trainer.optimizer.zero_grad(set_to_none=True)
    run = (
        trainer.run
    )  # the step's three data-flow lines: the teacher's view, the student's forward, the objective
    p_t = run.teacher.view(batch)
    p_s = run.student_forward(
        batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask
    )
    gkd_loss = run.objective.loss(batch, p_s, p_t, n_valid)
    gkd_loss.backward()
    g_gkd = grads()

    # TRL: full sequences, logits at every position, labels -100 on the prompt and after EOS.
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
    mask = torch.cat([batch.prompt_mask, batch.completion_mask], 1).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : batch.prompt_ids.shape[1]] = -100
    student_logits = trainer.student(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        teacher_logits = trainer.teacher.model(input_ids=ids, attention_mask=mask).logits
    trl_loss = TRLGKDTrainer.generalized_jsd_loss(
        student_logits[:, :-1], teacher_logits[:, :-1], labels=labels[:, 1:], beta=BETA
    )
    trl_loss.backward()
    g_trl = grads()
    # Float64 reference on the same logits: which of the two float32 results is closer to the exact value.
    exact = TRLGKDTrainer.generalized_jsd_loss(
        student_logits[:, :-1].detach().double(),
        teacher_logits[:, :-1].double(),
        labels=labels[:, 1:],
        beta=BETA,
    )
    return {
        "float64_loss": float(exact),
        "gkd_err_vs_float64": abs(float(gkd_loss) - float(exact)) / float(exact),
        "trl_err_vs_float64": abs(float(trl_loss) - float(exact)) / float(exact),
        "gkd_loss": float(gkd_loss),
        "trl_loss": float(trl_loss),
        "loss_rel_diff": abs(float(gkd_loss) - float(trl_loss)) / abs(float(trl_loss)),
        "grad_rel_diff": float((g_gkd - g_trl).norm() / g_trl.norm()),
        "grad_cosine": float(torch.nn.functional.cosine_similarity(g_gkd.double(), g_trl.double(), dim=0)),
        "tokens": int(n_valid),
        "shape": [int(ids.shape[0]), int(ids.shape[1])],
    }


def child_trl_loss(args: argparse.Namespace) -> dict[str, Any]:
    """TRL's generalized_jsd_loss, forward + backward, on logits [B, T, V]; peak RSS above the inputs."""
    import torch
    from bench_loss_memory import _peak_kib, _reset_peak, _status_kib
    from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer

    b, t, v = args.loss_batch, args.loss_seq, args.vocab
    result: dict[str, Any] = {"vocab": v, "positions": b * t}
    try:
        zs = torch.randn(b, t, v).requires_grad_(True)
        zt = torch.randn(b, t, v)
        labels = torch.zeros(b, t, dtype=torch.long)
        labels[:, : t // 8] = -100
        baseline = _status_kib("VmRSS")
        method = _reset_peak()
        start = time.perf_counter()
        loss = TRLGKDTrainer.generalized_jsd_loss(zs, zt, labels=labels, beta=BETA)
        forward = time.perf_counter() - start
        loss.backward()
        elapsed = time.perf_counter() - start
        result.update(
            ok=True,
            seconds=elapsed,
            forward_s=forward,
            peak_above_inputs_mb=(_peak_kib(method) - baseline) / 1024,
            inputs_mb=baseline / 1024,
            logits_mb=b * t * v * 4 / 2**20,
        )
    except (RuntimeError, MemoryError) as err:
        result.update(ok=False, error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    return result


CHILDREN = {
    "gkd": child_gkd,
    "trl_gkd": child_trl_gkd,
    "trl_distill": child_trl_distill,
    "parts": child_parts,
    "check": child_check,
    "trl_loss": child_trl_loss,
}


def run_child(args: argparse.Namespace) -> None:
    if args.mem_limit_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (args.mem_limit_bytes, args.mem_limit_bytes))
    _quiet()
    import torch

    torch.set_num_threads(args.threads)
    args.workdir = Path(args.workdir)
    _report(CHILDREN[args.child](args))


# ================================================================================================================
# Parent: orchestrate, alternate, print
# ================================================================================================================
def _available_bytes() -> int:
    match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def _load() -> float:
    return os.getloadavg()[0]


class Runner:
    def __init__(self, args: argparse.Namespace, python: str) -> None:
        self.args = args
        self.python = python
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO / "src"), str(HERE), os.environ.get("PYTHONPATH", "")) if p
        )

    def child(self, mode: str, **kw: Any) -> dict[str, Any]:
        a = self.args
        cmd = [self.python, str(Path(__file__).resolve()), "--child", mode, "--workdir", str(a.workdir)]
        cmd += ["--threads", str(a.threads), "--clock", a.clock, "--mem-limit-bytes", str(a.mem_limit_bytes)]
        for key, value in kw.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        load0 = _load()
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env)
        for line in proc.stdout.splitlines():
            if line.startswith(RESULT_TAG):
                result = json.loads(line[len(RESULT_TAG) :])
                result["load"] = (load0 + _load()) / 2
                result["child_s"] = time.perf_counter() - start
                return result
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return {"ok": False, "error": f"child {mode} exited {proc.returncode}:\n{tail}"}

    def script(self, name: str, *script_args: str) -> tuple[str, dict[str, float]]:
        cmd = [self.python, str(HERE / name), *script_args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env)
        values = {}
        for line in proc.stdout.splitlines():
            m = re.fullmatch(r"(\w+)=([-+0-9.eE]+|NA)", line.strip())
            if m and m.group(2) != "NA":
                values[m.group(1)] = float(m.group(2))
        text = proc.stdout + (
            f"\n[{name} exited {proc.returncode}] {proc.stderr[-2000:]}" if proc.returncode else ""
        )
        return text, values


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join("  " + line for line in lines)


def steps_section(run: Runner, vocab: int, rounds: int, warmup: int, steps: int) -> dict[str, dict[str, Any]]:
    """Alternate the three trainers for ``rounds`` rounds; pool measured steps; print a table."""
    a = run.args
    order = list(TRAINERS)
    pooled: dict[str, dict[str, Any]] = {
        k: {"times": [], "rss": [], "rss_before": [], "load": []} for k in order
    }
    for r in range(rounds):
        for name in order[r % 3 :] + order[: r % 3]:
            res = run.child(name, vocab=vocab, warmup=warmup, steps=steps)
            if "error" in res:
                print(f"  [{TRAINERS[name]} v{vocab} round {r + 1}] FAILED: {res['error']}", flush=True)
                continue
            p = pooled[name]
            p["times"] += res[a.clock]
            p["rss"].append(res["peak_rss_mb"])
            p["rss_before"].append(res["rss_before_mb"])
            p["load"].append(res["load"])
            for key in ("trainer_parts", "completion_tokens", "losses"):
                if key in res:
                    p.setdefault(key, []).append(res[key])
            times = " ".join(f"{t:.2f}" for t in res[a.clock])
            print(
                f"  round {r + 1}: {TRAINERS[name]:24s} steps {times}  (load {res['load']:.1f})", flush=True
            )
    rows = []
    for name in order:
        p = pooled[name]
        if not p["times"]:
            rows.append((TRAINERS[name], "failed", "", "", "", "", ""))
            continue
        med = p["median"] = statistics.median(p["times"])
        spread = f"{min(p['times']):.2f}-{max(p['times']):.2f}"
        tok_all, tok_loss = BATCH * (PROMPT_LEN + NEW_TOKENS) / med, BATCH * NEW_TOKENS / med
        rss = f"{max(p['rss']):,.0f} ({statistics.median(p['rss_before']):,.0f})"
        rows.append(
            (
                TRAINERS[name],
                f"{med:.3f}",
                spread,
                f"{tok_all:,.0f}",
                f"{tok_loss:,.0f}",
                rss,
                f"{statistics.mean(p['load']):.1f}",
            )
        )
    header = ("trainer", "s/step", "range", "tok/s all", "tok/s loss", "peak RSS MB (before)", "load")
    print(_table(header, rows))
    g = pooled["gkd"]
    if g.get("median"):
        for name in ("trl_gkd", "trl_distill"):
            if pooled[name].get("median"):
                ratio = pooled[name]["median"] / g["median"]
                mem = max(pooled[name]["rss"]) / max(g["rss"])
                print(f"  gkd vs {TRAINERS[name]}: {ratio:.2f}x faster, {mem:.2f}x less peak RSS")
        if g.get("trainer_parts"):
            tp = g["trainer_parts"][-1]
            parts = ", ".join(f"{k} {v:.3f}" for k, v in tp.items())
            print(f"  gkd in-trainer timers (wall clock, median, last round): {parts} s")
        if g.get("completion_tokens"):
            toks = [t for run_toks in g["completion_tokens"] for t in run_toks]
            print(
                f"  gkd completion tokens per measured step: mean {statistics.mean(toks):.1f} of {BATCH * NEW_TOKENS}"
            )
    return pooled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU time (1 thread)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per trainer at vocab 8,192")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="measured steps per round")
    parser.add_argument("--rounds-65k", type=int, default=1)
    parser.add_argument("--warmup-65k", type=int, default=1)
    parser.add_argument("--steps-65k", type=int, default=3)
    parser.add_argument("--parts-rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="1 round, 1 warm-up, 3 steps; 65k: 2 steps")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["check", "step8k", "step65k", "parts", "rollout", "lossmem"],
        default=["check", "step8k", "step65k", "parts", "rollout", "lossmem"],
    )
    parser.add_argument("--mem-limit-gib", type=float, default=20.0, help="RLIMIT_AS of every child")
    parser.add_argument(
        "--workdir", default=None, help="tokenizers and trainer outputs (default: a temp dir)"
    )
    parser.add_argument("--python", default=None, help="interpreter for the children (default: one with TRL)")
    # child-only arguments
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=8192, help=argparse.SUPPRESS)
    parser.add_argument("--loss-batch", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--loss-seq", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--mem-limit-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return
    if args.quick:
        args.rounds, args.warmup, args.steps = 1, 1, 3
        args.rounds_65k, args.warmup_65k, args.steps_65k, args.parts_rounds = 1, 1, 2, 4

    from _trl_env import trl_python

    python = args.python or trl_python(log=lambda m: print(m, flush=True))
    available = _available_bytes()
    limit = int(args.mem_limit_gib * GIB)
    if available:
        limit = min(limit, int(available * 0.9))
    args.mem_limit_bytes = limit
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="gkd-bench-")
        args.workdir = tmp.name
    run = Runner(args, python)
    t_begin = time.perf_counter()
    versions = subprocess.run(
        [
            python,
            "-c",
            "import torch, transformers, trl; print(torch.__version__, transformers.__version__, "
            "trl.__version__)",
        ],
        capture_output=True,
        text=True,
    ).stdout.split()
    print("gkd vs TRL: on-policy distillation on the CPU")
    print(
        f"  torch {versions[0] if versions else '?'}, transformers {versions[1] if len(versions) > 1 else '?'}, "
        f"trl {versions[2] if len(versions) > 2 else '?'}; interpreter {python}"
    )
    print(
        f"  {os.cpu_count()} CPUs, torch threads {args.threads}, clock {args.clock}; load average at start "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; child RLIMIT_AS {limit / GIB:.1f} GiB"
    )
    print(
        f"  batch {BATCH} x (prompt {PROMPT_LEN} + completion {NEW_TOKENS}); λ=1, JSD β={BETA}, T=1, lr {LR}; "
        f"teacher {TEACHER}, student {STUDENT}"
    )
    machine: dict[str, float] = {}
    notes: list[str] = []

    if "check" in args.only:
        print("\n== same loss on the same samples (vocab 8,192; one gkd rollout, both losses) ==")
        res = run.child("check", vocab=8192)
        if "error" in res:
            print("  FAILED:", res["error"])
        else:
            print(
                f"  batch {res['shape'][0]} x {res['shape'][1]}, {res['tokens']} completion tokens: gkd loss "
                f"{res['gkd_loss']:.8f}, TRL generalized_jsd_loss {res['trl_loss']:.8f}, relative difference "
                f"{res['loss_rel_diff']:.1e}; student gradients: relative difference {res['grad_rel_diff']:.1e}, "
                f"cosine {res['grad_cosine']:.7f}"
            )
            print(
                f"  float64 reference (TRL's formula on the same logits in float64): {res['float64_loss']:.8f}; "
                f"relative error of gkd {res['gkd_err_vs_float64']:.1e}, of TRL {res['trl_err_vs_float64']:.1e}"
            )
            machine["loss_rel_diff_vs_trl"] = res["loss_rel_diff"]
            machine["grad_rel_diff_vs_trl"] = res["grad_rel_diff"]

    if "step8k" in args.only:
        print(
            f"\n== on-policy step, vocab 8,192: {args.rounds} round(s) x ({args.warmup} warm-up + {args.steps} "
            "measured steps) per trainer, alternating =="
        )
        pooled = steps_section(run, 8192, args.rounds, args.warmup, args.steps)
        g = pooled["gkd"].get("median")
        if g and pooled["trl_gkd"].get("median"):
            machine["onpolicy_speedup_vs_trl_gkd"] = pooled["trl_gkd"]["median"] / g
        if g and pooled["trl_distill"].get("median"):
            machine["onpolicy_speedup_vs_trl_distillation"] = pooled["trl_distill"]["median"] / g

    if "step65k" in args.only:
        print(
            f"\n== on-policy step, vocab 65,536: {args.rounds_65k} round(s) x ({args.warmup_65k} warm-up + "
            f"{args.steps_65k} measured steps) per trainer =="
        )
        pooled = steps_section(run, 65536, args.rounds_65k, args.warmup_65k, args.steps_65k)
        g = pooled["gkd"].get("median")
        if g and pooled["trl_gkd"].get("median"):
            machine["onpolicy_speedup_vs_trl_gkd_v65k"] = pooled["trl_gkd"]["median"] / g
        if g and pooled["trl_distill"].get("median"):
            machine["onpolicy_speedup_vs_trl_distillation_v65k"] = pooled["trl_distill"]["median"] / g

    if "parts" in args.only:
        print(
            f"\n== gkd's step vs the sum of its parts measured in isolation (vocab 8,192; {args.parts_rounds} "
            "rounds after 2 warm-up rounds, alternating a full train_step and the parts) =="
        )
        res = run.child("parts", vocab=8192, warmup=2, steps=args.parts_rounds)
        if "error" in res:
            print("  FAILED:", res["error"])
        else:
            med = res["median_parts"]
            tp = res["trainer_parts"]
            names = {
                "rollout": "rollout",
                "teacher_forward": "teacher",
                "student_forward": "student_forward",
                "loss": "loss",
                "backward": "backward",
                "optimizer": "optimizer",
            }
            total = sum(med[k] for k in names)
            step = statistics.median(res["step"])
            rows = [(k.replace("_", " "), f"{med[k]:.3f}", f"{tp.get(v, 0.0):.3f}") for k, v in names.items()]
            rows.append(
                ("sum of the parts", f"{total:.3f}", f"{sum(tp.get(v, 0.0) for v in names.values()):.3f}")
            )
            rows.append(("full train_step (median)", f"{step:.3f}", ""))
            print(
                _table(
                    ("part", f"isolated s ({args.clock} clock, median)", "in-trainer timer s (wall)"), rows
                )
            )
            print(
                f"  loss with per-position stats (logging steps): {med['loss_with_stats']:.3f} s vs {med['loss']:.3f}"
                f" s without; student forward + backward {med['student_forward'] + med['backward']:.3f} s"
            )
            machine["step_over_parts"] = step / total

    if "rollout" in args.only:
        print(
            "\n== rollout: gkd sample_completions(backend='fast') vs model.generate (benchmarks/bench_rollout.py, "
            f"{args.threads} thread(s), wall clock) =="
        )
        text, values = run.script("bench_rollout.py", "--threads", str(args.threads), "--runs", "7")
        print("\n".join("  " + line for line in text.strip().splitlines() if line.strip()))
        if "rollout_speedup_vs_generate" in values:
            machine["rollout_speedup_vs_generate"] = values["rollout_speedup_vs_generate"]

    if "lossmem" in args.only:
        print(
            "\n== loss memory: 8 x 512 positions (first 1/8 masked), β=0.5, forward + backward, fresh subprocess each"
            " =="
        )
        trl = run.child("trl_loss", vocab=32000)
        if trl.get("ok"):
            print(
                f"  TRL generalized_jsd_loss, logits [8, 512, 32000] ({trl['logits_mb']:.0f} MB each): peak above "
                f"inputs {trl['peak_above_inputs_mb']:,.0f} MB ({trl['peak_above_inputs_mb'] / trl['logits_mb']:.1f}x "
                f"one logits tensor), {trl['forward_s']:.1f} s forward, {trl['seconds']:.1f} s forward + backward"
            )
        else:
            print("  TRL generalized_jsd_loss FAILED:", trl.get("error"))
        text, values = run.script(
            "bench_loss_memory.py",
            "--modes", "chunked", "--vocab", "32000", "128000", "--threads", str(args.threads),
            "--mem-limit-gib", str(args.mem_limit_gib),
        )  # fmt: skip
        print(
            "  gkd chunked_loss from hidden states [8, 512, 1024] + heads (benchmarks/bench_loss_memory.py):"
        )
        print("\n".join("    " + line for line in text.strip().splitlines() if "=" not in line))
        gkd_peak = values.get("chunked_peak_mb_v32000")
        if trl.get("ok") and gkd_peak is not None:
            machine["loss_peak_memory_ratio_vs_trl"] = gkd_peak / trl["peak_above_inputs_mb"]
            speed = trl["seconds"] / values["chunked_seconds_v32000"]
            print(
                f"  gkd / TRL peak above inputs at V=32,000: {gkd_peak:,.0f} / {trl['peak_above_inputs_mb']:,.0f} MB "
                f"= {gkd_peak / trl['peak_above_inputs_mb']:.3f}; gkd {speed:.2f}x faster (fwd + bwd)"
            )
        ok128 = "chunked_peak_mb_v128000" in values
        machine["loss_v128k_runs"] = 1.0 if ok128 else 0.0
        if ok128:
            notes.append(
                f"gkd loss at 8 x 512 x 128,000 ran: {values['chunked_peak_mb_v128000']:,.0f} MB above inputs, "
                f"{values['chunked_seconds_v128000']:.1f} s"
            )

    print(
        f"\n== targets (load average now {os.getloadavg()[0]:.2f}; total {time.perf_counter() - t_begin:.0f} s) =="
    )
    targets = [
        ("onpolicy_speedup_vs_trl_gkd", 2.0, "on-policy step vs TRL GKDTrainer, vocab 8,192"),
        ("onpolicy_speedup_vs_trl_gkd_v65k", 4.0, "on-policy step vs TRL GKDTrainer, vocab 65,536"),
        (
            "onpolicy_speedup_vs_trl_distillation",
            1.5,
            "on-policy step vs TRL DistillationTrainer, vocab 8,192",
        ),
        ("rollout_speedup_vs_generate", 2.0, "rollout tokens/s vs model.generate"),
    ]
    for key, goal, what in targets:
        if key in machine:
            verdict = "MET" if machine[key] >= goal else "MISSED"
            print(f"  {what}: {machine[key]:.2f}x (target >= {goal}x) {verdict}")
    if "step_over_parts" in machine:
        verdict = "MET" if machine["step_over_parts"] <= 1.25 else "MISSED"
        print(f"  gkd step / sum of its parts: {machine['step_over_parts']:.2f} (target <= 1.25) {verdict}")
    if "loss_peak_memory_ratio_vs_trl" in machine:
        verdict = "MET" if machine["loss_peak_memory_ratio_vs_trl"] <= 0.1 else "MISSED"
        print(
            f"  loss peak memory / TRL's: {machine['loss_peak_memory_ratio_vs_trl']:.3f} (target <= 0.1) {verdict}"
        )
    if "loss_v128k_runs" in machine:
        print(f"  gkd loss at 8 x 512 x 128,000: {'MET' if machine['loss_v128k_runs'] else 'MISSED'}")
    if "loss_rel_diff_vs_trl" in machine:
        verdict = "MET" if machine["loss_rel_diff_vs_trl"] < 1e-4 else "MISSED"
        print(
            f"  same loss as TRL on the same samples: rel. diff {machine['loss_rel_diff_vs_trl']:.1e} {verdict}"
        )
    for note in notes:
        print("  " + note)
    print()
    for key, value in machine.items():
        print(f"{key}={value:.4g}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
