"""GKDTrainer: the training loop around :func:`gkd.step.gkd_step` (Algorithm 1 of the GKD paper, in ``step.py``).

One trainer, many methods (see the presets in ``configs/presets``):

    SFT              divergence: nll, lmbda: 0                 supervised KD    divergence: forward_kl, lmbda: 0
    SeqKD            divergence: nll, lmbda: 0, seq_kd: true   ImitKD           divergence: forward_kl, lmbda: 0.5
    f-distill        divergence: tvd, lmbda: 0.5               on-policy GKD    lmbda: 1 (any divergence)
    RL + GKD         lmbda: 1, alpha < 1, reward: ...          (add kl_to_initial for the RLEF* baseline)

The trainer owns only the loop: logging, evaluation and checkpoint cadence (``run.plan``, see
:func:`gkd.config.training_plan`), the best evaluation (``metric_for_best_model``), the final model in ``output_dir``
(:meth:`GKDTrainer.save_model`, uploaded with ``push_to_hub``), the non-finite policy and signals. The components it
drives are built by :func:`gkd.build.build_run` (``trainer.run`` after :meth:`setup`); the step is
:func:`gkd.step.gkd_step`; checkpoints, resume and the best evaluation are :mod:`gkd.state`; the final model (the
best one loaded back with ``load_best_model_at_end``) and its upload are :mod:`gkd.final_model`; the arguments in
TRL's shapes and the ``TrainResult`` are :mod:`gkd.trl_trainer`.

Not supported / untested here (2 CPU cores, no GPU): CUDA and mixed precision have never run; FSDP and DeepSpeed
through ``accelerate config`` are documented but only CPU DDP (gloo, 2 processes) is tested; vLLM rollouts are
import-guarded and untested. Model families off the fast sampler (anything but Llama, Mistral, Qwen2/3, GPT-2,
plain LoRA on them included; DoRA; dropout on) sample with ``model.generate``; seq2seq students and heads with a logit transform
(softcapping) score from full logits instead of the chunked fused path.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from torch import nn

from gkd import final_model
from gkd import state as run_state
from gkd.build import build_run
from gkd.config import GKDConfig
from gkd.errors import GKDError, TrainingError, TrainingInterrupted
from gkd.evaluation import evaluate, flatten
from gkd.models import save_merged
from gkd.reporting import Progress, Tracker, banner, format_record, log_record
from gkd.run import Run
from gkd.sampling import Sampler
from gkd.state import BestMetric, TrainState, metric_names
from gkd.step import gkd_step
from gkd.trl_trainer import TrainResult, trainer_arguments

__all__ = ["GKDTrainer", "TrainResult", "TrainingInterrupted"]


class GKDTrainer:
    """Distil ``teacher`` into ``student`` with the GKD objective of ``config``.

    Two ways to call it, mixable::

        GKDTrainer(GKDConfig(model_name_or_path=..., teacher_model_name_or_path=..., dataset=...)).train()
        GKDTrainer(model=..., teacher_model=..., args=GKDConfig(...), train_dataset=hf_dataset,   # TRL's names
                   processing_class=tokenizer, peft_config=peft.LoraConfig(r=16)).train()

    Models, tokenizer and data are loaded from the paths in ``config`` unless given here:

    * ``config`` / ``args`` (TRL's name; give one): a :class:`GKDConfig`, or a dict of its keys (TRL's key names are
      accepted there, see :func:`gkd.config.config_from_dict`). Neither: ``GKDConfig()``. The caller's config object
      is never changed: arguments that set a config key work on a copy (``dataclasses.replace``).
    * ``model`` / ``student``, ``teacher_model`` / ``teacher``: a transformers model object, or a local path / hub
      id string (it sets ``model_name_or_path`` / ``teacher_model_name_or_path``).
    * ``processing_class`` / ``tokenizer``: the tokenizer (a processor's tokenizer is used), or its path (sets
      ``tokenizer_name_or_path``).
    * ``train_dataset`` / ``eval_dataset``: a ``datasets.Dataset`` (its rows are the records; a ``DatasetDict``
      needs one split chosen), a list of records (dicts in any of gkd's formats: prompt/completion, ``messages``,
      conversational, prompt-only), or a tokenized :class:`gkd.data.TokenizedDataset`. ``train_records`` /
      ``eval_records`` are the older names for lists of records.
    * ``peft_config``: a ``peft.LoraConfig`` (r, lora_alpha, lora_dropout, target_modules; None = peft's default
      modules for the architecture) trains a LoRA adapter, as the config key ``lora`` does (give one of them).
      Settings gkd cannot honour (``use_dora``, ``modules_to_save``, a non-LM ``task_type``, ...) are an error.
    * ``reward_funcs`` / ``reward_fn``: one reward (RL + GKD, ``lmbda: 1``): a built-in name or ``module:function``
      (sets ``reward``), or a function ``(prompts, completions, records) -> floats`` (TRL-style functions taking
      keywords, ``completions=``, ``prompts=`` and one list per dataset column, work too). A function is named
      ``module:qualname`` in the config's ``reward`` unless the config names it; as the config checks ``alpha < 1``
      against ``reward`` when it is built, a run that optimises the reward (``alpha < 1``) names it there.
    * ``sampler``: any :class:`gkd.sampling.Sampler`, e.g. to plug in a rollout backend; ``log``: where the
      console lines go (stderr by default).

    A wrong type or a clash (both names of one argument given) is a one-line :class:`gkd.errors.ConfigError` naming
    the argument.
    """

    def __init__(
        self,
        config: GKDConfig | dict[str, Any] | None = None,
        *,
        args: GKDConfig | dict[str, Any] | None = None,
        model: nn.Module | str | None = None,
        teacher_model: nn.Module | str | None = None,
        processing_class: Any = None,
        peft_config: Any = None,
        reward_funcs: Any = None,
        student: nn.Module | str | None = None,
        teacher: nn.Module | str | None = None,
        tokenizer: Any = None,
        train_records: list[dict] | None = None,
        eval_records: list[dict] | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        reward_fn: Any = None,
        sampler: Sampler | None = None,
        log: Any = None,
    ) -> None:
        self.cfg, given = trainer_arguments(
            config,
            args,
            model=model,
            teacher_model=teacher_model,
            processing_class=processing_class,
            peft_config=peft_config,
            reward_funcs=reward_funcs,
            student=student,
            teacher=teacher,
            tokenizer=tokenizer,
            train_records=train_records,
            eval_records=eval_records,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            reward_fn=reward_fn,
        )
        self.given = {**given, "sampler": sampler}
        """What was given here instead of a path in the config (the student, teacher, tokenizer, records or tokenized
        datasets, reward function and sampler; None: loaded or built from the config), as ``build_run`` takes it."""
        self._log_fn = log
        self.run: Run | None = None
        self.state = TrainState()
        """The loop's counters: ``state.global_step`` and ``state.log_history`` as in transformers' Trainer."""

    def log(self, msg: str) -> None:
        """A console line (banner, warnings, steps, evaluations): stderr, or the ``log`` callable given."""
        main = self.run.dist.is_main if self.run is not None else int(os.environ.get("RANK", "0")) == 0
        if not main:  # one console for a multi-process run (before setup ends, the launcher's RANK says)
            return
        if self._log_fn is not None:
            self._log_fn(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def setup(self) -> Run:
        """Check the inputs, load models and data, build the components, resume. Idempotent."""
        if self.run is None:
            run = build_run(self.cfg, **self.given, log=self.log)
            self._best = BestMetric.of(self.cfg, run)
            self.tracker = Tracker(
                run.output_dir,
                self.cfg.report_to,
                enabled=run.dist.is_main,
                config=run_state.public_config(self.cfg),
                accelerator=run.accelerator,
                project_name=self.cfg.run_name or run.output_dir.resolve().name,
                log=self.log,
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
    def model(self) -> nn.Module:
        """The student being trained (transformers' / TRL's ``trainer.model``; a peft model for LoRA runs)."""
        return self.setup().student

    @property
    def args(self) -> GKDConfig:
        """The run's config (TRL's ``trainer.args``)."""
        return self.cfg

    @property
    def processing_class(self) -> Any:
        """The run's tokenizer (TRL's ``trainer.processing_class``; ``trainer.tokenizer`` is the older name)."""
        return self.setup().tokenizer

    @property
    def tokenizer(self) -> Any:
        return self.processing_class

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
        run, st = self.setup(), self.state
        t0 = time.perf_counter()
        # logging_steps 0: never (logging_strategy: no); else every that many steps, and the first one
        every = run.plan.logging_steps
        logging_step = every > 0 and ((st.step + 1) % every == 0 or st.step == 0)
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
        """Run for the plan's ``max_steps`` (``max_steps``, or ``num_train_epochs`` passes over the data); log,
        evaluate and checkpoint on the plan's cadence. At the end: the final checkpoint, the final model in
        ``output_dir`` (:meth:`save_model`; the best evaluated one with ``load_best_model_at_end``), a last
        evaluation, and the upload with ``push_to_hub``. Ctrl-C / SIGTERM save a checkpoint and stop."""
        run, cfg, st = self.setup(), self.cfg, self.state
        plan = run.plan
        t_begin = time.perf_counter()
        if st.step >= plan.max_steps:
            return self._already_finished()
        if cfg.push_to_hub:  # the token and the repo, before hours of training
            self._created_repo = (cfg.hub_model_id, final_model.hub_repo(run, cfg, before_training=True))
        self.log(banner(run))
        progress = Progress(plan.max_steps, st.step, show_bar=cfg.progress and run.dist.is_main, log=self.log)
        interrupted = _catch_signals(run.dist.is_main)
        first_step, losses = st.step, []
        try:
            while st.step < plan.max_steps:
                record = self.train_step()
                if not record.get("nonfinite") and math.isfinite(record["loss"]):
                    losses.append(record["loss"])
                progress.update(st.step, record)
                if record.pop("logged"):
                    self.tracker.log(record)
                    st.log_history.append(self._history(record))
                    progress.print(format_record(record))
                if record.get("nonfinite"):
                    self._skipped(record["nonfinite"])
                if st.step < plan.max_steps:  # the last step's evaluation and checkpoint come below
                    self._evaluate_and_save_on_cadence()
                if interrupted.flag:
                    raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            progress.close()
            raise self._stopped(e) from None
        finally:
            progress.close()
            interrupted.restore()
        final = self._finish()
        wall = time.perf_counter() - t_begin
        done = f"done: {st.step} steps in {wall:.1f}s, final loss {st.last_loss:.4f}; model saved to {final}"
        self.log(done)
        if cfg.push_to_hub:
            self.push_to_hub()
        result = TrainResult.of_run(run, cfg, st, wall, trained=st.step - first_step, losses=losses)
        st.log_history.append({**result.metrics, "step": st.step})
        return result

    def _already_finished(self) -> TrainResult:
        """The result of a run already at its last step, saying which key trains further; nothing is trained."""
        run, cfg, st = self.setup(), self.cfg, self.state
        plan = run.plan
        length, knob = (
            (f"max_steps={plan.max_steps}", "max_steps")
            if cfg.max_steps > 0
            else (f"num_train_epochs={cfg.num_train_epochs:g}: {plan.max_steps} steps", "num_train_epochs")
        )
        self.log(
            f"nothing to do: the run is already at step {st.step} ({length}); raise {knob} to train further"
        )
        return TrainResult(
            st.step,
            st.last_loss,
            st.skipped_steps,
            run.output_dir,
            0.0,
            already_finished=True,
            metrics={"train_runtime": 0.0, "epoch": st.step / plan.steps_per_epoch},
        )

    def _stopped(self, e: KeyboardInterrupt) -> GKDError:
        """The one-line error of a run stopped mid-way (Ctrl-C, SIGTERM or an error), after its checkpoint."""
        if self._checkpoints:
            saved = f"checkpoint saved to {self.save()}. Resume with resume_from_checkpoint=latest"
        else:
            saved = "no checkpoint written (save_strategy: no), so the run cannot be resumed"
        if isinstance(e, GKDError):  # e.g. the served teacher stopped answering: an error (exit 2)
            return TrainingError(f"{e}; stopped at step {self.state.step}; {saved}")
        return TrainingInterrupted(f"interrupted at step {self.state.step}; {saved}")

    def _finish(self) -> Path:
        """After the last step: the last evaluation, checkpoint and final model; returns the final model's folder."""
        run, cfg, st = self.setup(), self.cfg, self.state
        evaluated = run.plan.evaluate and self._best is not None
        if evaluated:  # the last evaluation may be the best: before the save
            self._evaluate_and_track()
        if self._checkpoints:
            self.save()
        if cfg.load_best_model_at_end:
            final_model.load_best(run, st, self._best, self.log)
        if cfg.lora is not None and cfg.lora.save_merged and run.dist.is_main:
            merged = save_merged(run.student, run.tokenizer, run.output_dir / "merged")
            self.log(f"LoRA adapter merged into the base model: {merged}")
        final = self.save_model()
        if run.plan.evaluate and not evaluated:
            self.evaluate()
        self.tracker.close()
        return final

    def _history(self, record: dict[str, Any]) -> dict[str, Any]:
        """A logged step's record as a ``log_history`` entry: transformers' names (``learning_rate``, ``epoch``)
        first, then gkd's own diagnostics."""
        out = {"loss": record["loss"], "grad_norm": record.get("grad_norm"), "learning_rate": record["lr"]}
        out.update({k: v for k, v in record.items() if k not in ("lr", "step")})
        out.update(epoch=self.state.step / self.setup().plan.steps_per_epoch, step=record["step"])
        return out

    @property
    def _checkpoints(self) -> bool:
        """Does the run write ``checkpoint-N`` folders? Not with ``save_strategy: no`` (transformers' meaning: none at
        all; the final model is still saved in ``output_dir``)."""
        return self.cfg.save_strategy != "no"

    def _evaluate_and_save_on_cadence(self) -> None:
        """After a step before the last: evaluate every ``eval_steps``; checkpoint every ``save_steps``, at every
        evaluation with ``load_best_model_at_end``, and when the metric improved with ``save_strategy: best``."""
        plan, st = self.setup().plan, self.state
        evaluated = improved = False
        if plan.eval_steps and st.step % plan.eval_steps == 0:
            improved = self._evaluate_and_track()
            evaluated = True
        if self._checkpoints and (
            (plan.save_steps and st.step % plan.save_steps == 0)
            or (evaluated and self.cfg.load_best_model_at_end)
            or (improved and plan.save_best)
        ):
            self.save()

    def _skipped(self, what: str) -> None:
        """A step was skipped (non-finite): warn; after ``max_consecutive_nonfinite`` in a row, save and stop."""
        st = self.state
        self.log(f"warning: step {st.step} skipped: non-finite {what}")
        if st.nonfinite_in_a_row >= self.cfg.max_consecutive_nonfinite:
            where = (
                f"checkpoint {self.save()}" if self._checkpoints else "no checkpoint: save_strategy is 'no'"
            )
            raise TrainingError(
                f"{st.nonfinite_in_a_row} consecutive steps had a non-finite {what}; stopped at step {st.step} "
                f"({where}). Lower learning_rate or check the data"
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
            tokenize=cfg.eval_tokenize,
            num_beams=cfg.eval_num_beams,
            length_penalty=cfg.eval_length_penalty,
            bootstrap=cfg.eval_bootstrap,
            bootstrap_seed=cfg.seed,
        )
        out: dict[str, float] = {"step": self.state.step, **flatten(scores, prefix="eval/")}
        self.tracker.log(out)
        named = {"eval_" + name: out[key] for key, name in zip(out, metric_names(list(out))) if key != "step"}
        self.state.log_history.append(
            {**named, "epoch": self.state.step / run.plan.steps_per_epoch, "step": self.state.step}
        )
        self.log("eval: " + ", ".join(f"{k}={v:.2f}" for k, v in out.items() if k != "step"))
        return out

    def _evaluate_and_track(self) -> bool:
        """:meth:`evaluate`, noting a new best ``metric_for_best_model`` in the state; True (on every process) when
        this evaluation is the best so far."""
        out = self.evaluate()
        return self._best is not None and self._best.track(out, self.state, self.setup())

    def save(self) -> Path | None:
        """Write ``checkpoint-STEP`` atomically (main process only); returns its path."""
        return run_state.save(self.setup(), self.state)

    def save_model(self, output_dir: str | os.PathLike | None = None) -> Path:
        """Save the student as it is now (its LoRA adapter for LoRA runs; with ``merge_lora`` the adapter merged into
        plain weights) and the tokenizer in ``output_dir`` (default: the run's), as TRL's ``trainer.save_model``: the
        folder loads with ``AutoModelForCausalLM.from_pretrained`` / ``PeftModel.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``. Written atomically by the main process (its files are listed in
        ``final_model.json``); checkpoints are untouched. ``train()`` calls it at the end."""
        return final_model.save(self.setup(), self.cfg, self.state, self._best, output_dir)

    def push_to_hub(self) -> str | None:
        """Upload the final model and tokenizer of ``output_dir`` (the files :meth:`save_model` wrote, not the
        checkpoints) to the hub repo ``hub_model_id`` (default: the output folder's name), created if needed
        (private with ``hub_private_repo``; token ``hub_token``, else the stored login). Main process only; returns
        the repo id there. A failure (no token, no network) raises a one-line error; the model stays saved."""
        created = getattr(self, "_created_repo", None)  # made before training, for this hub_model_id
        return final_model.push_to_hub(self.setup(), self.cfg, self.state.step, created, self.log)


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
