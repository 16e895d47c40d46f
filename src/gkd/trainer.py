"""GKDTrainer: the training loop around :func:`gkd.step.gkd_step` (Algorithm 1 of the GKD paper, in ``step.py``).

One trainer, many methods (see the presets in ``configs/presets``):

    SFT              divergence: nll, lmbda: 0                 supervised KD    divergence: forward_kl, lmbda: 0
    SeqKD            divergence: nll, lmbda: 0, seq_kd: true   ImitKD           divergence: forward_kl, lmbda: 0.5
    f-distill        divergence: tvd, lmbda: 0.5               on-policy GKD    lmbda: 1 (any divergence)
    RL + GKD         lmbda: 1, alpha < 1, reward: ...          (add kl_to_initial for the RLEF* baseline)

The trainer owns only the loop: logging and evaluation cadence, checkpoints, the non-finite policy and signals.
The components it drives are built by :func:`gkd.build.build_run` (``trainer.run`` after :meth:`setup`); the step
is :func:`gkd.step.gkd_step`; checkpoints and resume are :mod:`gkd.state`.

Not supported / untested here (2 CPU cores, no GPU): CUDA and mixed precision have never run; FSDP and DeepSpeed
through ``accelerate config`` are documented but only CPU DDP (gloo, 2 processes) is tested; vLLM rollouts are
import-guarded and untested. Model families off the fast sampler (anything but Llama, Mistral, Qwen2/3, GPT-2;
LoRA students; dropout on) sample with ``model.generate``; seq2seq students and heads with a logit transform
(softcapping) score from full logits instead of the chunked fused path.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from gkd import state as run_state
from gkd.build import Run, build_run
from gkd.config import GKDConfig
from gkd.data import TokenizedDataset
from gkd.errors import TrainingError, TrainingInterrupted
from gkd.evaluation import evaluate, flatten
from gkd.models import save_merged
from gkd.reporting import Progress, Tracker, banner, format_record, log_record
from gkd.sampling import Sampler
from gkd.state import TrainState
from gkd.step import gkd_step

__all__ = ["GKDTrainer", "TrainResult", "TrainingInterrupted"]


@dataclass
class TrainResult:
    step: int
    final_loss: float
    skipped_steps: int
    output_dir: Path
    wall_s: float
    finished: bool = False
    """True when the run was already complete (resumed at ``max_steps``): nothing was trained or saved."""


class GKDTrainer:
    """Distil ``teacher`` into ``student`` with the GKD objective of ``config``.

    Models, tokenizer and data are loaded from the paths in ``config`` unless given as objects: ``student`` /
    ``teacher`` (transformers models), ``tokenizer``, ``train_records`` / ``eval_records`` (lists of records),
    ``train_dataset`` / ``eval_dataset`` (tokenized), ``reward_fn`` (``(prompts, completions, records) -> floats``),
    ``sampler`` (any :class:`gkd.sampling.Sampler`, e.g. to plug in a rollout backend), ``log`` (where the console
    lines go; stderr by default).
    """

    def __init__(
        self,
        config: GKDConfig,
        *,
        student: nn.Module | None = None,
        teacher: nn.Module | None = None,
        tokenizer: Any = None,
        train_records: list[dict] | None = None,
        eval_records: list[dict] | None = None,
        train_dataset: TokenizedDataset | None = None,
        eval_dataset: TokenizedDataset | None = None,
        reward_fn: Any = None,
        sampler: Sampler | None = None,
        log: Any = None,
    ) -> None:
        self.cfg = config
        self._given = {
            "student": student,
            "teacher": teacher,
            "tokenizer": tokenizer,
            "train_records": train_records,
            "eval_records": eval_records,
            "train_dataset": train_dataset,
            "eval_dataset": eval_dataset,
            "reward_fn": reward_fn,
            "sampler": sampler,
        }
        self._log_fn = log
        self.run: Run | None = None
        self.state = TrainState()

    def log(self, msg: str) -> None:
        """A console line (banner, warnings, steps, evaluations): stderr, or the ``log`` callable given."""
        if self.run is not None and not self.run.dist.is_main:
            return
        if self._log_fn is not None:
            self._log_fn(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def setup(self) -> Run:
        """Check the inputs, load models and data, build the components, resume. Idempotent."""
        if self.run is None:
            run = build_run(self.cfg, **self._given, log=self.log)
            self.tracker = Tracker(
                run.output_dir, self.cfg.report_to, enabled=run.dist.is_main, config=self.cfg.to_dict()
            )
            if run.resume_dir is not None:
                self.state = run_state.restore(run, run.resume_dir)
                self.log(f"resumed from {run.resume_dir} at step {self.state.step}")
            self.run = run
        return self.run

    # the components, for Python users and tests
    @property
    def student(self) -> nn.Module:
        return self.setup().student

    @property
    def teacher(self) -> Any:
        return self.setup().teacher

    @property
    def stream(self) -> Any:
        return self.setup().stream

    @property
    def optimizer(self) -> Any:
        return self.setup().optimizer

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def skipped_steps(self) -> int:
        return self.state.skipped_steps

    # ------------------------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its log record (diagnostics included on logging steps)."""
        run, cfg, st = self.setup(), self.cfg, self.state
        t0 = time.perf_counter()
        logging_step = (st.step + 1) % cfg.logging_steps == 0 or st.step == 0
        raw = gkd_step(run, st.step, log_stats=logging_step)
        st.step += 1
        if raw["nonfinite"]:
            st.skipped_steps += 1
            st.nonfinite_in_a_row += 1
        else:
            st.nonfinite_in_a_row = 0
        st.last_loss = raw["loss"]
        record = log_record(raw, run.scheduler.get_last_lr()[0], time.perf_counter() - t0, st.skipped_steps)
        record["logged"] = logging_step
        return record

    def train(self) -> TrainResult:
        """Run until ``max_steps``; checkpoint every ``save_steps`` and at the end; Ctrl-C saves and stops."""
        run, cfg, st = self.setup(), self.cfg, self.state
        t_begin = time.perf_counter()
        if st.step >= cfg.max_steps:
            self.log(
                f"nothing to do: the run is already at step {st.step} (max_steps={cfg.max_steps}); raise "
                "max_steps to train further"
            )
            return TrainResult(st.step, st.last_loss, st.skipped_steps, run.output_dir, 0.0, finished=True)
        self.log(banner(run))
        progress = Progress(cfg.max_steps, st.step, show_bar=cfg.progress and run.dist.is_main, log=self.log)
        interrupted = _catch_signals(run.dist.is_main)
        try:
            while st.step < cfg.max_steps:
                record = self.train_step()
                progress.update(st.step, record)
                if record.pop("logged"):
                    self.tracker.log(record)
                    progress.print(format_record(record))
                if record.get("nonfinite"):
                    self._skipped(record["nonfinite"])
                if cfg.eval_steps and st.step % cfg.eval_steps == 0 and st.step < cfg.max_steps:
                    self.evaluate()
                if cfg.save_steps and st.step % cfg.save_steps == 0 and st.step < cfg.max_steps:
                    self.save()
                if interrupted.flag:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            progress.close()
            path = self.save()
            raise TrainingInterrupted(
                f"interrupted at step {st.step}; checkpoint saved to {path}. Resume with resume_from_checkpoint=latest"
            ) from None
        finally:
            progress.close()
            interrupted.restore()
        path = self.save()
        if cfg.lora is not None and cfg.lora.save_merged and run.dist.is_main:
            self.log(
                f"LoRA adapter merged into the base model: {save_merged(run.student, run.tokenizer, run.output_dir / 'merged')}"
            )
        if run.eval_data is not None:
            self.evaluate()
        self.tracker.close()
        wall = time.perf_counter() - t_begin
        self.log(
            f"done: {st.step} steps in {wall:.1f}s, final loss {st.last_loss:.4f}; model saved to {path}"
        )
        return TrainResult(st.step, st.last_loss, st.skipped_steps, run.output_dir, wall)

    def _skipped(self, what: str) -> None:
        """A step was skipped (non-finite): warn; after ``max_consecutive_nonfinite`` in a row, save and stop."""
        st = self.state
        self.log(f"warning: step {st.step} skipped: non-finite {what}")
        if st.nonfinite_in_a_row >= self.cfg.max_consecutive_nonfinite:
            path = self.save()
            raise TrainingError(
                f"{st.nonfinite_in_a_row} consecutive steps had a non-finite {what}; stopped at step {st.step} "
                f"(checkpoint {path}). Lower learning_rate or check the data"
            )

    # ------------------------------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Score the student on the eval split, decoding greedily and by sampling at ``temperature``."""
        run, cfg = self.setup(), self.cfg
        if run.eval_data is None or not run.dist.is_main:
            return {}
        scores = evaluate(
            run.sampling_model,
            run.tokenizer,
            run.eval_data,
            cfg.eval_metric or "exact_match",
            max_new_tokens=cfg.max_new_tokens,
            sampled={"sample": cfg.temperature},
            seeds=(cfg.seed,),
            batch_size=cfg.eval_batch_size,
            sampler=run.sampler,
        )
        out: dict[str, float] = {"step": self.state.step, **flatten(scores, prefix="eval/")}
        self.tracker.log(out)
        self.log("eval: " + ", ".join(f"{k}={v:.2f}" for k, v in out.items() if k != "step"))
        return out

    def save(self) -> Path | None:
        """Write ``checkpoint-STEP`` atomically (main process only); returns its path."""
        return run_state.save(self.setup(), self.state)


class _catch_signals:
    """SIGTERM and the first Ctrl-C only raise a flag: the current step finishes, then a checkpoint is saved (an
    exception raised at an arbitrary point inside library code is not a safe place to save from). A second Ctrl-C
    interrupts at once."""

    def __init__(self, install: bool) -> None:
        self.flag = False
        self._previous: dict[int, Any] = {}
        if not install:
            return
        for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
            if sig is not None:
                with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                    self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.flag = True
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
