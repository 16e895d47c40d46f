"""Peak memory of one on-policy training step at Qwen2.5-0.5B's vocabulary, by completion length: gkd vs TRL.

What is measured (CPU, float32, ``--threads`` torch threads, default 2):

* **Models.** Llama-style models built from a config with fixed seeds (``bench_vs_trl.build_model``), with
  Qwen2.5-0.5B's vocabulary (151,936), hidden size (896), 14 attention heads, 2 key/value heads, MLP 4864 and
  tied input/output embeddings, but only a few layers so that the run fits on a small machine: the student has
  2 layers (166M parameters, 136M of them the embedding/head), the teacher 4 (196M). The tokenizer is
  ``bench_vs_trl``'s local WordLevel tokenizer grown to 151,936 entries (student and teacher share it); the data
  are ``bench_vs_trl``'s "add the numbers" conversations (a 48-token prompt with the chat template).
* **One on-policy step** (λ=1, JSD β=0.5, sampling temperature 1, lr 1e-4, grad clip 1.0, Adam), batch 2,
  ``max_new_tokens`` = the completion length L (512, 1024, 2048, 4096 by default): the student samples L tokens
  per row, the teacher scores the sequences, the loss is formed over the L completion positions, backward,
  optimizer step. gkd runs ``gkd.GKDTrainer(gkd.GKDConfig(...)).train_step()``; TRL 1.16 runs ``GKDTrainer`` and
  ``DistillationTrainer`` for ``max_steps=1`` in their fair configuration (``bf16=False,
  gradient_checkpointing=False``, as in ``bench_vs_trl.py``). gkd's only step is also its first logging step
  (per-position statistics are computed), TRL's has no logging.
* **The length is really L.** Nothing stops generation but EOS, and a random-init model almost never samples it
  (p ≈ 1/151,936 per token), so the rollout runs the full ``max_new_tokens``. Every child verifies it: a hook on the
  student's input embedding records the longest sequence fed to it with gradients enabled (the training forward);
  the table prints it as ``tokens trained`` (batch x (prompt + completion); gkd does not feed the last sampled
  token, so its count is one less), and the framework's own count of completion tokens (gkd: the step record's
  ``completion_tokens``; TRL: the columns ``generate`` returned) is checked against L: a shorter one is flagged.
* **Capped rollouts (``--rollout-tokens N``, off by default).** Sampling dominates the time: every new token reads
  the 545 MB head, ~0.1-0.3 s per token on 2 cores, so a 4096-token rollout takes 7-20 minutes per framework. With
  ``--rollout-tokens N`` each framework's own rollout samples ``min(N, L)`` tokens (gkd through the public
  ``sampler=`` seam of ``GKDTrainer``, wrapping gkd's own sampler; TRL through a wrapper around ``student.generate``,
  which both trainers call) and the other ``L - N`` are uniformly random non-special ids appended as if sampled; the
  training step (teacher forward, loss, backward, optimizer) runs on the full L. Lengths <= N are untouched; for
  longer ones only the rollout's own memory differs, a KV cache of a few MB and one logits row per sequence, which
  the ``rollout peak`` column (peak RSS before the training forward) shows to be far below the step's peak.
* **One child process per (framework, length)**, in the TRL interpreter (``benchmarks/_trl_env.py``, as
  ``bench_vs_trl.py`` does; with ``--frameworks gkd`` alone, the running interpreter), so that the peak is the
  run's own. The peak RSS is the child's ``ru_maxrss`` (``os.wait4``), which covers everything the process held:
  interpreter, libraries, both models, tokenizer, data, optimizer state and the step.
* **The 16 GiB limit.** Each child limits its address space with ``RLIMIT_AS`` after its imports (no cgroup, no
  watchdog). ``RLIMIT_AS`` counts virtual memory, and a CPU torch process maps address space that is never resident
  (shared libraries, thread stacks, malloc arenas: ~0.5 GiB for a gkd child, ~1.6 GiB for one that imports TRL), so
  a flat 16 GiB address-space limit would allow only 14.4-15.5 GiB of RSS, unequally. By default the limit applied
  is therefore ``16 GiB + the child's non-resident address space measured after its imports`` (the output prints
  both numbers): the run fails when its resident memory would pass ≈16 GiB. ``--flat-limit`` applies exactly
  ``--limit-gib`` of address space instead (stricter). The limit is never more than 90% of the memory available at
  start (the output says so when it had to be lowered). An allocation past the limit fails inside the child (torch
  raises ``RuntimeError: ... can't allocate memory``), which reports "OOM (16 GiB limit)" with where it failed
  (rollout, or the training forward/backward); a child killed by a signal or aborting with an allocation error is
  also recorded as OOM. Memory grows with L, so once a framework runs out of memory at L its longer lengths are
  not run (recorded as OOM; ``--no-skip`` runs them anyway).

Usage (from the repository root):

    python benchmarks/bench_memory.py                          # 512 1024 2048 4096, all three: 70-90 min
    python benchmarks/bench_memory.py --rollout-tokens 1024    # the same, rollouts capped: 45-60 min
    python benchmarks/bench_memory.py --quick --frameworks gkd   # lengths 64 128, gkd only, ~2 min, no TRL
    python benchmarks/bench_memory.py --lengths 512 2048 --frameworks gkd trl_distillation

The run ends with a table (framework x length: peak RSS GiB and the step's seconds, or "OOM (16 GiB limit)") and
the machine-readable lines ``max_len_16g_gkd=N``, ``max_len_16g_trl_gkd=N``, ``max_len_16g_trl_distillation=N``
(the longest length measured that trained within the limit, 0 if none; one line per framework run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_loss_memory import OOM_MARKERS, _status_kib  # noqa: E402
from bench_vs_trl import (  # noqa: E402
    BETA,
    GIB,
    LR,
    RESULT_TAG,
    SPECIAL,
    WORDS,
    Runner,
    _available_bytes,
    _maxrss_mb,
    _quiet,
    _report,
    _table,
    _trl_common,
    build_model,
    build_records,
    build_tokenizer,
)

VOCAB = 151_936  # Qwen2.5-0.5B
QWEN_05B = {"hidden_size": 896, "num_attention_heads": 14, "intermediate_size": 4864}
KV_HEADS = 2
STUDENT = {**QWEN_05B, "num_hidden_layers": 2}
TEACHER = {**QWEN_05B, "num_hidden_layers": 4}
MAX_POSITIONS = 32_768  # Qwen2.5-0.5B's context
BATCH = 2
LENGTHS = [512, 1024, 2048, 4096]
QUICK_LENGTHS = [64, 128]
FRAMEWORKS = {
    "gkd": "gkd GKDTrainer",
    "trl_gkd": "TRL GKDTrainer",
    "trl_distillation": "TRL DistillationTrainer",
}


# ================================================================================================================
# Children: one (framework, length) each
# ================================================================================================================
class _Probe:
    """Records, from the student's input embedding, the longest sequence fed with gradients enabled (the training
    forward) and the peak RSS just before the first such call (the peak of set-up and rollout)."""

    def __init__(self, student: Any) -> None:
        import torch

        self._grad = torch.is_grad_enabled
        self.seq_len = 0
        self.rows = 0
        self.peak_before_train_mb: float | None = None
        student.get_input_embeddings().register_forward_pre_hook(self._hook)

    def _hook(self, _module: Any, inputs: tuple) -> None:
        if not self._grad():
            return
        if self.peak_before_train_mb is None:
            self.peak_before_train_mb = _maxrss_mb()
        ids = inputs[0]
        if ids.shape[-1] > self.seq_len:
            self.seq_len, self.rows = int(ids.shape[-1]), int(ids.shape[0])

    @property
    def stage(self) -> str:
        return "rollout" if self.peak_before_train_mb is None else "training forward/backward"


def _filler(rows: int, n: int, seed: int) -> Any:
    """``n`` token ids per row standing in for the tokens the capped rollout did not sample: uniformly random over
    the number part of the vocabulary (never a special token, so never EOS)."""
    import torch

    first = len(SPECIAL) + len(WORDS)
    return torch.randint(first, VOCAB, (rows, n), generator=torch.Generator().manual_seed(seed))


class _CappedSampler:
    """A gkd Sampler (the public ``sampler=`` seam): gkd's own sampler draws ``cap`` tokens per row, the rest of
    the ``max_new_tokens`` is filled by :func:`_filler` (``--rollout-tokens``)."""

    def __init__(self, cap: int) -> None:
        from gkd.sampling import LocalSampler

        self.inner, self.cap, self.sampled = LocalSampler("auto"), cap, 0

    def sample(
        self, model: Any, prompt_ids: Any, prompt_mask: Any, params: Any, generator: Any = None
    ) -> Any:
        import dataclasses

        import torch

        from gkd.sampling import Rollout

        short = dataclasses.replace(params, max_new_tokens=min(self.cap, params.max_new_tokens))
        roll = self.inner.sample(model, prompt_ids, prompt_mask, short, generator)
        self.sampled = roll.completion_ids.shape[1]
        extra = params.max_new_tokens - self.sampled
        if extra <= 0:
            return roll
        alive = roll.completion_mask[:, -1:].expand(-1, extra)  # rows that stopped at an EOS stay stopped
        ids = _filler(prompt_ids.shape[0], extra, seed=self.sampled).masked_fill(~alive, params.pad_token_id)
        return Rollout(torch.cat([roll.completion_ids, ids], 1), torch.cat([roll.completion_mask, alive], 1))

    def sync(self, model: Any) -> None:
        return None


def _wrap_generate(student: Any, cap: int, state: dict[str, Any]) -> None:
    """Time TRL's rollout (``student.generate``) and record its completion columns; with ``cap``, generate only
    ``cap`` new tokens and append :func:`_filler` tokens up to the requested ``max_new_tokens``."""
    import copy

    import torch

    generate = student.generate

    def timed_generate(*args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        prompt = kw["input_ids"] if "input_ids" in kw else args[0]
        wanted = kw["generation_config"].max_new_tokens
        if cap:
            kw["generation_config"] = copy.deepcopy(kw["generation_config"])
            kw["generation_config"].max_new_tokens = min(cap, wanted)
        out = generate(*args, **kw)
        seq = out.sequences if hasattr(out, "sequences") else out
        state["sampled"] = seq.shape[1] - prompt.shape[1]
        if cap and state["sampled"] < wanted:
            seq = torch.cat([seq, _filler(seq.shape[0], wanted - state["sampled"], seed=state["sampled"])], 1)
            if hasattr(out, "sequences"):
                out.sequences = seq
            else:
                out = seq
        state["completion"] = seq.shape[1] - prompt.shape[1]
        state["rollout_s"] = time.perf_counter() - t0
        return out

    student.generate = timed_generate


def _models(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    tok = build_tokenizer(VOCAB, args.workdir)
    kw = {"max_positions": MAX_POSITIONS, "tied": True, "kv_heads": KV_HEADS}
    teacher = build_model(TEACHER, VOCAB, tok, seed=1, **kw)
    student = build_model(STUDENT, VOCAB, tok, seed=2, **kw)
    return tok, teacher, student


def child_gkd(args: argparse.Namespace, state: dict[str, Any]) -> dict[str, Any]:
    """gkd's public API: GKDConfig, GKDTrainer, one train_step()."""
    import gkd

    tok, teacher, student = _models(args)
    state["probe"] = _Probe(student)
    sampler = _CappedSampler(args.rollout_tokens) if args.rollout_tokens else None
    cfg = gkd.GKDConfig(
        output_dir=tempfile.mkdtemp(prefix="gkd-", dir=args.workdir),
        lmbda=1.0,
        divergence="jsd",
        beta=BETA,
        temperature=1.0,
        max_new_tokens=args.length,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_steps=1,
        num_threads=args.threads,
        logging_steps=10**9,
        save_steps=0,
        progress=False,
    )
    trainer = gkd.GKDTrainer(
        cfg,
        student=student,
        teacher=teacher,
        tokenizer=tok,
        train_records=build_records(),
        sampler=sampler,
        log=lambda _m: None,
    )
    trainer.setup()
    state["rss_setup_mb"] = _status_kib("VmRSS") / 1024
    t0 = time.perf_counter()
    record = trainer.train_step()
    return {
        "step_s": time.perf_counter() - t0,
        "rollout_s": record.get("time_rollout"),
        "loss": record["loss"],
        "completion": record["completion_tokens"] / BATCH,  # mean over the rows (EOS included)
        "sampled": sampler.sampled if sampler else None,
        "parts": {k[5:]: v for k, v in record.items() if k.startswith("time_")},
    }


def _step_timer(state: dict[str, Any]) -> Any:
    """A transformers TrainerCallback that times the (single) step, on_step_begin .. on_step_end, and takes the RSS
    when training begins (models, data and trainer built)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *_a: Any, **_k: Any) -> None:
            state["rss_setup_mb"] = _status_kib("VmRSS") / 1024

        def on_step_begin(self, *_a: Any, **_k: Any) -> None:
            state["t0"] = time.perf_counter()

        def on_step_end(self, *_a: Any, **_k: Any) -> None:
            state["step_s"] = time.perf_counter() - state["t0"]

    return StepTimer()


def _trl_config_kw(args: argparse.Namespace) -> dict[str, Any]:
    common = _trl_common(argparse.Namespace(workdir=args.workdir, warmup=0, steps=1))
    common["per_device_train_batch_size"] = BATCH
    return common


def _trl_train(trainer: Any, state: dict[str, Any]) -> dict[str, Any]:
    trainer.add_callback(_step_timer(state))
    out = trainer.train()
    return {
        "step_s": state.get("step_s"),
        "rollout_s": state.get("rollout_s"),
        "loss": float(out.training_loss),
        "completion": state.get("completion"),
        "sampled": state.get("sampled"),
    }


def child_trl_gkd(args: argparse.Namespace, state: dict[str, Any]) -> dict[str, Any]:
    """TRL's experimental GKDTrainer (full logits), fair configuration, λ=1, β=0.5, T=1."""
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tok, teacher, student = _models(args)
    state["probe"] = _Probe(student)
    _wrap_generate(student, args.rollout_tokens, state)
    config = GKDConfig(**_trl_config_kw(args), lmbda=1.0, max_new_tokens=args.length, disable_dropout=True)
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=Dataset.from_list(build_records()),
        processing_class=tok,
    )
    return _trl_train(trainer, state)


def child_trl_distillation(args: argparse.Namespace, state: dict[str, Any]) -> dict[str, Any]:
    """TRL's DistillationTrainer (on-policy, chunked JSD from hidden states), β=0.5, T=1."""
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    tok, teacher, student = _models(args)
    tok.padding_side = "left"
    state["probe"] = _Probe(student)
    _wrap_generate(student, args.rollout_tokens, state)
    config = DistillationConfig(
        **_trl_config_kw(args), max_completion_length=args.length, disable_dropout=True
    )
    prompts = [{"prompt": r["messages"][:-1]} for r in build_records()]
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=Dataset.from_list(prompts),
        processing_class=tok,
    )
    return _trl_train(trainer, state)


CHILDREN = {"gkd": child_gkd, "trl_gkd": child_trl_gkd, "trl_distillation": child_trl_distillation}


def run_child(args: argparse.Namespace) -> None:
    _quiet()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    import transformers  # noqa: F401

    if args.child == "gkd":
        import gkd.trainer  # noqa: F401
    else:
        import datasets  # noqa: F401
        import trl
        import trl.experimental.gkd  # noqa: F401

    torch.set_num_threads(args.threads)
    (torch.randn(256, 256) @ torch.randn(256, 256)).sum()  # start the thread pool before measuring the slack
    slack = max(0, _status_kib("VmSize") - _status_kib("VmRSS")) * 1024
    limit = args.limit_bytes + (0 if args.flat_limit else slack)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    args.workdir = Path(args.workdir)
    result: dict[str, Any] = {"limit_as_bytes": limit, "slack_bytes": slack, "rss_start_mb": _maxrss_mb()}
    state: dict[str, Any] = {}
    try:
        result.update(CHILDREN[args.child](args, state))
        result["ok"] = True
    except (RuntimeError, MemoryError) as err:  # torch reports a failed allocation as RuntimeError
        message = (
            f"{type(err).__name__}: {str(err).splitlines()[0][:300]}" if str(err) else type(err).__name__
        )
        result.update(ok=False, oom=any(m.lower() in message.lower() for m in OOM_MARKERS), error=message)
    probe = state.get("probe")
    if probe is not None:
        result.update(
            seq_len=probe.seq_len,
            rows=probe.rows,
            peak_before_train_mb=probe.peak_before_train_mb,
            stage=probe.stage,
        )
    result.update(
        peak_rss_mb=_maxrss_mb(),
        vm_peak_mb=_status_kib("VmPeak") / 1024,
        rss_setup_mb=state.get("rss_setup_mb"),
    )
    _report(result)


# ================================================================================================================
# Parent: one child per (framework, length), print
# ================================================================================================================
def measure(
    args: argparse.Namespace, python: str, env: dict[str, str], fw: str, length: int
) -> dict[str, Any]:
    cmd = [python, str(Path(__file__).resolve()), "--child", fw, "--length", str(length)]
    cmd += [
        "--threads",
        str(args.threads),
        "--workdir",
        str(args.workdir),
        "--limit-bytes",
        str(args.limit_bytes),
    ]
    if args.flat_limit:
        cmd.append("--flat-limit")
    if args.rollout_tokens:
        cmd += ["--rollout-tokens", str(args.rollout_tokens)]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    result: dict[str, Any] = {}
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG) :])
    if not result:  # died without reporting: a signal (the kernel's OOM killer sends SIGKILL) or an abort
        tail = (stderr.strip().splitlines() or ["no output"])[-1][:300]
        oom = proc.returncode < 0 or any(m.lower() in stderr.lower() for m in OOM_MARKERS)
        result = {"ok": False, "oom": oom, "error": f"exit {proc.returncode}: {tail}"}
        if not oom:
            result["stderr_tail"] = "\n".join(stderr.strip().splitlines()[-15:])
    result["child_maxrss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    result["child_s"] = time.perf_counter() - start
    result["length"] = length
    return result


def _gib(mb: float | None) -> str:
    return "-" if mb is None else f"{mb / 1024:.2f}"


def _cell(r: dict[str, Any], limit_gib: float) -> str:
    if r.get("ok"):
        return f"{r['child_maxrss_mb'] / 1024:.2f} GiB, {r['step_s']:.0f} s"
    if "skipped_after" in r:
        return f"OOM (not run: OOM at {r['skipped_after']})"
    if r.get("oom"):
        return f"OOM ({limit_gib:g} GiB limit)"
    return "error"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=None, help="completion lengths (default 512..4096)"
    )
    parser.add_argument("--frameworks", nargs="+", choices=list(FRAMEWORKS), default=list(FRAMEWORKS))
    parser.add_argument("--quick", action="store_true", help=f"lengths {QUICK_LENGTHS} (a smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--limit-gib", type=float, default=16.0, help="memory limit of every child (default 16)"
    )
    parser.add_argument(
        "--flat-limit",
        action="store_true",
        help="RLIMIT_AS = exactly --limit-gib (no slack for unmapped memory)",
    )
    parser.add_argument(
        "--rollout-tokens",
        type=int,
        default=0,
        help="cap the rollout: sample only N tokens, fill the rest of L with random ids (default 0: sample all L)",
    )
    parser.add_argument("--no-skip", action="store_true", help="run longer lengths after an OOM too")
    parser.add_argument("--workdir", default=None, help="tokenizer and trainer outputs (default: a temp dir)")
    parser.add_argument("--python", default=None, help="interpreter of the children (default: one with TRL)")
    # child-only arguments
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--limit-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return
    lengths = sorted(args.lengths or (QUICK_LENGTHS if args.quick else LENGTHS))
    frameworks = [f for f in FRAMEWORKS if f in args.frameworks]

    if args.python:
        python = args.python
    elif frameworks == ["gkd"]:
        python = sys.executable  # no TRL needed
    else:
        from _trl_env import trl_python

        python = trl_python(log=lambda m: print(m, flush=True))
    wanted = int(args.limit_gib * GIB)
    available = _available_bytes()
    args.limit_bytes = min(wanted, int(available * 0.9)) if available else wanted
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="gkd-bench-mem-")
        args.workdir = tmp.name
    env = Runner(args, python).env  # PYTHONPATH: src/ and benchmarks/
    versions = subprocess.run(
        [python, "-c", "import torch, transformers; print(torch.__version__, transformers.__version__)"],
        capture_output=True,
        text=True,
        env=env,
    ).stdout.split()
    t_begin = time.perf_counter()
    print(f"Peak memory of one on-policy step at vocab {VOCAB:,} (Qwen2.5-0.5B), CPU, float32", flush=True)
    print(
        f"  torch {versions[0] if versions else '?'}, transformers {versions[1] if len(versions) > 1 else '?'}; "
        f"interpreter {python}; {os.cpu_count()} CPUs, torch threads {args.threads}; load average at start "
        f"{os.getloadavg()[0]:.2f}"
    )
    print(
        f"  student {STUDENT} + teacher {TEACHER}, {KV_HEADS} kv heads, tied embeddings; batch {BATCH}, prompt 48 "
        f"tokens, completion = L (max_new_tokens = L); λ=1, JSD β={BETA}, T=1, lr {LR}, Adam"
    )
    kind = "exactly" if args.flat_limit else "+ the child's non-resident address space after imports (≈ RSS)"
    print(
        f"  limit per child: RLIMIT_AS {args.limit_bytes / GIB:.2f} GiB {kind}; memory available at start "
        f"{available / GIB:.1f} GiB"
    )
    if args.rollout_tokens:
        print(
            f"  rollout CAPPED (--rollout-tokens {args.rollout_tokens}): each framework's own rollout samples "
            f"{args.rollout_tokens} tokens per row, the rest of the L are random ids appended (not sampled); the "
            "training step (teacher, loss, backward, optimizer) runs on the full L"
        )
    else:
        print("  rollout: every framework samples the full L tokens per row (max_new_tokens = L)")
    if args.limit_bytes < wanted:
        print(
            f"  WARNING: the limit was lowered from {args.limit_gib:g} GiB to {args.limit_bytes / GIB:.2f} GiB (90% of"
            " the available memory): the max_len_16g lines below are for this lower limit"
        )

    results: dict[str, dict[int, dict[str, Any]]] = {fw: {} for fw in frameworks}
    oom_at: dict[str, int] = {}
    print(f"\n== runs (framework x length: one child process each; lengths {lengths}) ==", flush=True)
    for length in lengths:
        for fw in frameworks:
            if fw in oom_at and not args.no_skip:
                results[fw][length] = {
                    "ok": False,
                    "oom": True,
                    "skipped_after": oom_at[fw],
                    "length": length,
                }
                print(f"  {FRAMEWORKS[fw]:24s} L={length:5d}: not run (OOM at L={oom_at[fw]})", flush=True)
                continue
            r = measure(args, python, env, fw, length)
            results[fw][length] = r
            if r.get("ok"):
                completion = r.get("completion") or 0
                short = "" if completion >= length else f"  [WARNING: completion only {completion:g} < L]"
                sampled = (
                    f", {r['sampled']} sampled"
                    if args.rollout_tokens and r.get("sampled") is not None
                    else ""
                )
                print(
                    f"  {FRAMEWORKS[fw]:24s} L={length:5d}: peak RSS {_gib(r['child_maxrss_mb'])} GiB, step "
                    f"{r['step_s']:.1f} s (rollout {r.get('rollout_s') or 0:.1f} s), completion {completion:g}"
                    f"{sampled}, training forward {r.get('rows')} x {r.get('seq_len')}, child {r['child_s']:.0f} s"
                    f"{short}",
                    flush=True,
                )
                if r.get("parts"):
                    parts = ", ".join(f"{k} {v:.1f}" for k, v in r["parts"].items())
                    print(f"    {FRAMEWORKS[fw]} step timers (s): {parts}", flush=True)
            elif r.get("oom"):
                oom_at.setdefault(fw, length)
                print(
                    f"  {FRAMEWORKS[fw]:24s} L={length:5d}: OOM at the limit during {r.get('stage', '?')} (peak RSS "
                    f"{_gib(r['child_maxrss_mb'])} GiB, child {r['child_s']:.0f} s): {r.get('error')}",
                    flush=True,
                )
            else:
                print(f"  {FRAMEWORKS[fw]:24s} L={length:5d}: FAILED: {r.get('error')}", flush=True)
                if r.get("stderr_tail"):
                    print("    " + r["stderr_tail"].replace("\n", "\n    "), flush=True)

    print(f"\n== peak RSS of the child (GiB) and the step's seconds, batch {BATCH}, by completion length ==")
    header = ("L", *(FRAMEWORKS[fw] for fw in frameworks))
    rows = [
        (str(length), *(_cell(results[fw][length], args.limit_gib) for fw in frameworks))
        for length in lengths
    ]
    print(_table(header, rows))

    print(
        "\n== details (GiB; 'setup': RSS before the step; 'rollout peak': peak before the training forward) =="
    )
    detail_rows = []
    for fw in frameworks:
        for length in lengths:
            r = results[fw][length]
            if "skipped_after" in r:
                continue
            status = "ok" if r.get("ok") else ("OOM in " + r.get("stage", "?")) if r.get("oom") else "error"
            detail_rows.append(
                (
                    FRAMEWORKS[fw],
                    str(length),
                    status,
                    _gib(r.get("child_maxrss_mb")),
                    _gib(r.get("rss_setup_mb")),
                    _gib(r.get("peak_before_train_mb")),
                    _gib(r.get("vm_peak_mb")),
                    f"{r['rows']} x {r['seq_len']}" if r.get("seq_len") else "-",
                    f"{r['rollout_s']:.1f}" if r.get("rollout_s") else "-",
                    f"{r['step_s']:.1f}" if r.get("step_s") else "-",
                    f"{r['child_s']:.0f}",
                )
            )
    print(
        _table(
            (
                "framework",
                "L",
                "status",
                "peak RSS",
                "setup",
                "rollout peak",
                "peak virtual",
                "tokens trained",
                "rollout s",
                "step s",
                "child s",
            ),
            detail_rows,
        )
    )
    slacks = [r["slack_bytes"] for res in results.values() for r in res.values() if "slack_bytes" in r]
    if slacks:
        print(
            f"  RLIMIT_AS applied: {args.limit_bytes / GIB:.2f} GiB"
            + (
                ""
                if args.flat_limit
                else f" + {min(slacks) / GIB:.2f}-{max(slacks) / GIB:.2f} GiB non-resident slack"
            )
            + f"; total {time.perf_counter() - t_begin:.0f} s; load average now {os.getloadavg()[0]:.2f}"
        )
    print()
    for fw in frameworks:
        for length in lengths:
            r = results[fw][length]
            if r.get("ok"):
                print(f"peak_rss_gib_{fw}_L{length}={r['child_maxrss_mb'] / 1024:.3f}")
    for fw in frameworks:
        fits = [length for length, r in results[fw].items() if r.get("ok")]
        print(f"max_len_{args.limit_gib:g}g_{fw}={max(fits, default=0)}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
