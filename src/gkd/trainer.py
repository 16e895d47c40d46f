"""GKDTrainer: Algorithm 1 of the GKD paper, on real Hugging Face models.

    for step k = 1..K:
        u ~ Uniform(0, 1)                                    (seeded; rank 0 decides for every rank)
        if u <= λ:  batch = prompts x with y ~ p_S(. | x)   (the student's own samples, no gradient)
        else:       batch = fixed (x, y) pairs              (ground truth, or the teacher's samples for SeqKD)
        θ <- θ - η ∇θ  D(p_T || p_S^θ)(y | x)                 at every completion position, exact over the vocab

One trainer, many methods (see ``configs/presets``):
    SFT              divergence: nll, lmbda: 0                 supervised KD    divergence: forward_kl, lmbda: 0
    SeqKD            divergence: nll, lmbda: 0, seq_kd: true   ImitKD           divergence: forward_kl, lmbda: 0.5
    f-distill        divergence: tvd, lmbda: 0.5               on-policy GKD    lmbda: 1 (any divergence)
    RL + GKD         lmbda: 1, alpha < 1, reward: ...          (add kl_to_initial for the RLEF* baseline)

The loss of a step is normalised by the number of valid completion tokens (or sequences) actually in the step,
counted over all gradient-accumulation micro-batches and all processes *after* the rollout, so on-policy steps are
never normalised by the dataset's completion lengths.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gkd import checkpoint as ckpt
from gkd import preflight
from gkd.config import RESUME_KEYS, GKDConfig
from gkd.data import Batch, BatchStream, TokenizedDataset, load_records, tokenize_records
from gkd.divergences import get_divergence, reduction_weights
from gkd.errors import CheckpointError, ConfigError, GKDError, TrainingError
from gkd.evaluation import eos_ids, generate_texts
from gkd.losses import Head, LossTerms, chunked_loss, logits_loss
from gkd.models import (
    Scorer,
    apply_lora,
    check_teacher_student,
    disable_dropout,
    is_seq2seq,
    load_config,
    load_model,
    load_tokenizer,
    save_merged,
    score_positions,
    unwrap,
)
from gkd.rl import compute_advantages, compute_rewards, discounted_returns, load_reward
from gkd.rollout import sample_completions
from gkd.scoring import resolve_scorer
from gkd.teacher import Teacher, build_topk_cache, seqkd_dataset
from gkd.tracking import Tracker

__all__ = ["GKDTrainer", "TrainResult"]


@dataclass
class TrainResult:
    step: int
    final_loss: float
    skipped_steps: int
    output_dir: Path
    wall_s: float
    finished: bool = False
    """True when the run was already complete (resumed at ``max_steps``): nothing was trained or saved."""


class TrainingInterrupted(GKDError):
    exit_code = 130


class GKDTrainer:
    """Distil ``teacher`` into ``student`` with the GKD objective of ``config``.

    Models, tokenizer and data are loaded from the paths in ``config`` unless given as objects (handy from Python
    and for the built-in tasks): ``student``/``teacher`` are transformers models, ``train_records``/``eval_records``
    lists of records in the trainer's format.
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
        log: Any = None,
    ) -> None:
        self.cfg = config
        self._student_obj = student
        self._teacher_obj = teacher
        self._tokenizer_obj = tokenizer
        self._train_records = train_records
        self._eval_records = eval_records
        self._train_dataset = train_dataset
        self._eval_dataset = eval_dataset
        self._reward_obj = reward_fn
        self._log_fn = log
        self._setup_done = False
        self.step = 0
        self.last_loss = float("nan")
        self._times: dict[str, float] = defaultdict(float)

    # ------------------------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        """Human-readable run log (banner, warnings, step lines, eval lines): stderr, one line per message.

        stdout is left to the caller (``gkd distill`` prints one JSON result there)."""
        if getattr(self, "is_main", True):
            if self._log_fn is not None:
                self._log_fn(msg)
            else:
                print(msg, file=sys.stderr, flush=True)

    def setup(self) -> None:
        """Validate inputs, load models and data, build optimizer and scheduler, resume. Idempotent."""
        if self._setup_done:
            return
        cfg = self.cfg
        from accelerate import Accelerator

        preflight.check_paths(
            cfg,
            have_student=self._student_obj is not None,
            have_teacher=self._teacher_obj is not None,
            have_data=self._train_records is not None or self._train_dataset is not None,
        )
        self.output_dir = Path(os.path.expanduser(cfg.output_dir))
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        self._check_output_dir()
        self.accelerator.wait_for_everyone()
        for warning in cfg.warnings():
            self.log(f"warning: {warning}")
        _seed_everything(cfg.seed + self.rank)

        # everything that can be checked without model weights: tokenizer, config.json files, data ----------------
        tok_path = cfg.tokenizer_name_or_path or cfg.model_name_or_path
        self.tokenizer = self._tokenizer_obj or load_tokenizer(tok_path, "tokenizer")  # type: ignore[arg-type]
        resume_dir = None
        if cfg.resume_from_checkpoint:
            resume_dir = ckpt.resolve_resume(cfg.resume_from_checkpoint, self.output_dir)
            self._check_resume_compat(resume_dir)
        model_configs = self._model_configs()
        preflight.check_backend(cfg, model_configs["student"])
        self.seq2seq = bool(getattr(model_configs["student"], "is_encoder_decoder", False))
        self.train_data = self._train_dataset or self._load_dataset(
            self._train_records, cfg.dataset, cfg.dataset_split, "train"
        )
        self.eval_data = None
        if self._eval_dataset is not None:
            self.eval_data = self._eval_dataset
        elif self._eval_records is not None or cfg.eval_dataset is not None:
            self.eval_data = self._load_dataset(self._eval_records, cfg.eval_dataset, cfg.eval_split, "eval")
            self.eval_data = TokenizedDataset(self.eval_data.examples[: cfg.eval_max_samples])
        preflight.check_data(cfg, self.train_data, self.eval_data)
        preflight.check_context(cfg, model_configs, self.train_data, self.eval_data)
        self.reward_fn = None
        if cfg.reward is not None:
            self.reward_fn = self._reward_obj or load_reward(cfg.reward)

        # models --------------------------------------------------------------------------------------------------
        student = self._load_student(resume_dir)
        teacher_model = None
        if cfg.needs_teacher:
            teacher_model = self._teacher_obj
            if teacher_model is None:
                teacher_model = load_model(
                    cfg.teacher_model_name_or_path, what="teacher", dtype=cfg.teacher_dtype
                )  # type: ignore[arg-type]
            t_tok = None
            if self._teacher_obj is None and cfg.teacher_model_name_or_path is not None:
                t_path = cfg.teacher_model_name_or_path
                if os.path.isdir(os.path.expanduser(t_path)) and _has_tokenizer(t_path):
                    t_tok = load_tokenizer(t_path, "teacher tokenizer")
            self.vocab = check_teacher_student(student, teacher_model, self.tokenizer, t_tok)
            teacher_model.to(self.device)
            self.teacher: Teacher | None = Teacher(teacher_model, self.vocab)
        else:
            self.vocab = len(self.tokenizer)
            self.teacher = None
        self.reference: Teacher | None = None
        if cfg.kl_to_initial > 0 or cfg.reward is not None:  # RL runs log the KL to the initial student
            ref = self._load_reference()
            self.reference = Teacher(ref.to(self.device), self.vocab)
        self.eos = eos_ids(student, self.tokenizer)

        # data the teacher writes -----------------------------------------------------------------------------
        if cfg.seq_kd and cfg.off_policy_possible:
            assert teacher_model is not None
            self.train_data = seqkd_dataset(
                teacher_model,
                self.tokenizer,
                self.train_data,
                cache_dir=self.output_dir,
                teacher_name=str(cfg.teacher_model_name_or_path or "teacher"),
                max_new_tokens=cfg.effective_max_completion_length,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                seed=cfg.seed,
                backend=cfg.rollout_backend,
                log=self.log,
            )
        self.topk_cache = None
        if cfg.teacher_cache == "topk":
            assert self.teacher is not None
            self.topk_cache = build_topk_cache(
                self.teacher,
                self.train_data,
                k=cfg.teacher_cache_topk,
                temperature=cfg.loss_temperature,
                pad_id=self.tokenizer.pad_token_id,
                cache_dir=self.output_dir,
                teacher_name=str(cfg.teacher_model_name_or_path or "teacher"),
                log=self.log,
            )
        self.stream = BatchStream(
            self.train_data,
            cfg.per_device_train_batch_size,
            cfg.seed,
            self.tokenizer.pad_token_id,
            self.rank,
            self.world,
        )

        # loss --------------------------------------------------------------------------------------------------
        self.divergence = None
        if cfg.divergence != "nll":
            self.divergence = get_divergence(cfg.divergence, **cfg.divergence_params())

        # optimisation ------------------------------------------------------------------------------------------
        params = [p for p in student.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the student has no trainable parameters; check lora.target_modules")
        self.optimizer = _adamw(params, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.student = student
        self.scorer, self.optimizer = self.accelerator.prepare(Scorer(student, self.vocab), self.optimizer)
        self.vllm = None
        if cfg.rollout_backend == "vllm":
            if cfg.lora is not None:
                raise ConfigError(
                    "rollout_backend: vllm does not support LoRA students; use rollout_backend: auto"
                )
            from gkd.rollout_vllm import VLLMSampler

            self.vllm = VLLMSampler(str(cfg.model_name_or_path))
        self.coin_rng = random.Random(cfg.seed)
        self.rollout_gen = torch.Generator().manual_seed(cfg.seed * 7919 + self.rank)
        self.nonfinite_in_a_row = 0
        self.skipped_steps = 0
        self.tracker = Tracker(self.output_dir, cfg.report_to, enabled=self.is_main, config=cfg.to_dict())
        if resume_dir is not None:
            self._resume(resume_dir)
        self._setup_done = True

    def _check_output_dir(self) -> None:
        out = self.output_dir
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise ConfigError(
                f"output_dir '{out}' is not writable ({e.strerror}); choose another output_dir"
            ) from e
        ckpt.clean_partial(out)
        previous = ckpt.run_files(out)
        if previous and not self.cfg.resume_from_checkpoint:
            if not self.cfg.overwrite_output_dir:
                names = ", ".join(p.name for p in previous[:3]) + (", ..." if len(previous) > 3 else "")
                raise ConfigError(
                    f"output_dir '{out}' already holds a run ({names}); set resume_from_checkpoint=latest to "
                    "continue it, overwrite_output_dir=true to replace it, or choose another output_dir"
                )
            if self.is_main:
                ckpt.remove_run(out)

    def _model_configs(self) -> dict[str, Any]:
        """The student's (and teacher's) transformers configs, read without loading weights."""
        cfg = self.cfg
        out: dict[str, Any] = {}
        if self._student_obj is not None:
            out["student"] = unwrap(self._student_obj).config
        else:
            out["student"] = load_config(cfg.model_name_or_path, "student")  # type: ignore[arg-type]
        if cfg.needs_teacher:
            if self._teacher_obj is not None:
                out["teacher"] = unwrap(self._teacher_obj).config
            else:
                out["teacher"] = load_config(cfg.teacher_model_name_or_path, "teacher")  # type: ignore[arg-type]
        return out

    def _load_student(self, resume_dir: Path | None) -> nn.Module:
        cfg = self.cfg
        if self._student_obj is not None:
            student = self._student_obj
            if resume_dir is not None and cfg.lora is None:
                from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

                cls = AutoModelForSeq2SeqLM if is_seq2seq(student) else AutoModelForCausalLM
                loaded = cls.from_pretrained(str(resume_dir))
                student.load_state_dict(loaded.state_dict())
        else:
            path = str(resume_dir) if resume_dir is not None and cfg.lora is None else cfg.model_name_or_path
            student = load_model(path, what="student", dtype=cfg.student_dtype)  # type: ignore[arg-type]
        if cfg.lora is not None:
            if resume_dir is not None:
                from peft import PeftModel

                student = PeftModel.from_pretrained(student, str(resume_dir), is_trainable=True)
            else:
                lc = cfg.lora
                student = apply_lora(student, lc.r, lc.alpha, lc.dropout, lc.target_modules)
        if cfg.disable_dropout:
            disable_dropout(student)
        student.train()
        return student.to(self.accelerator.device)

    def _load_reference(self) -> nn.Module:
        if self._student_obj is not None and self.cfg.model_name_or_path is None:
            import copy

            ref = copy.deepcopy(unwrap(self._student_obj))
        else:
            ref = load_model(self.cfg.model_name_or_path, what="student", dtype=self.cfg.student_dtype)  # type: ignore[arg-type]
        return ref

    def _load_dataset(
        self, records: list[dict] | None, spec: str | None, split: str, what: str
    ) -> TokenizedDataset:
        cfg = self.cfg
        skipped = 0
        source = f"{what} data"
        if records is None:
            assert spec is not None
            records, skipped = load_records(
                spec,
                split,
                cfg.dataset_config_name,
                cfg.skip_bad_lines,
                split_key="dataset_split" if what == "train" else "eval_split",
            )
            source = f"dataset '{spec}'"
        data = tokenize_records(
            records,
            self.tokenizer,
            max_prompt_length=cfg.max_prompt_length,
            max_completion_length=cfg.effective_max_completion_length,
            source=source,
            seq2seq=self.seq2seq,
        )
        data.skipped_lines = skipped
        if skipped:
            lines = "1 line that was" if skipped == 1 else f"{skipped} lines that were"
            self.log(f"warning: {source}: skipped {lines} not valid JSON")
        if data.truncated_prompts:
            self.log(
                f"warning: {source}: {data.truncated_prompts} of {len(data)} prompts were longer than "
                f"max_prompt_length={cfg.max_prompt_length} and were truncated from the left"
            )
        if data.truncated_completions:
            self.log(
                f"warning: {source}: {data.truncated_completions} completions were longer than "
                f"{cfg.effective_max_completion_length} tokens and were truncated"
            )
        return data

    def _lr_lambda(self, step: int) -> float:
        cfg = self.cfg
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_scheduler_type == "constant":
            return 1.0
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        floor = cfg.min_lr_ratio
        if cfg.lr_scheduler_type == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def lmbda_at(self, step: int) -> float:
        cfg = self.cfg
        if cfg.lmbda_schedule == "linear" and cfg.lmbda_warmup_steps > 0:
            frac = min(1.0, step / cfg.lmbda_warmup_steps)
            return cfg.lmbda_start + frac * (cfg.lmbda - cfg.lmbda_start)
        return cfg.lmbda

    # ------------------------------------------------------------------------------------------------------------
    # one step of Algorithm 1
    # ------------------------------------------------------------------------------------------------------------
    def _coin(self, lmbda: float) -> bool:
        """Is this step on-policy? Every rank draws (same RNG state); rank 0's draw is broadcast."""
        u = self.coin_rng.random()
        on = u < lmbda if lmbda < 1.0 else True
        if self.world > 1:
            flag = torch.tensor([1 if on else 0], device=self.device)
            torch.distributed.broadcast(flag, src=0)
            on = bool(flag.item())
        return on

    def _rollout(self, batch: Batch) -> Batch:
        """Replace the batch's completions by the student's own samples (no gradient flows through this)."""
        cfg = self.cfg
        batch = batch.repeat(cfg.num_generations)
        if self.vllm is not None:
            self.vllm.sync_weights(unwrap(self.student))
            roll = self.vllm.sample(
                batch.prompt_ids,
                batch.prompt_mask,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                greedy=False,
                eos_token_ids=self.eos,
                pad_token_id=self.tokenizer.pad_token_id,
                seed=int(torch.randint(0, 2**31 - 1, (1,), generator=self.rollout_gen)),
                vocab_size=self.vocab,
            )
            return Batch(
                batch.prompt_ids,
                batch.prompt_mask,
                roll.completion_ids,
                roll.completion_mask,
                batch.records,
                True,
            )
        roll = sample_completions(
            unwrap(self.student) if cfg.lora is None else self.student,
            batch.prompt_ids.to(self.device),
            batch.prompt_mask.to(self.device),
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            eos_token_ids=self.eos,
            pad_token_id=self.tokenizer.pad_token_id,
            generator=self.rollout_gen,
            backend=cfg.rollout_backend,
            vocab_size=self.vocab,
        )
        return Batch(
            batch.prompt_ids,
            batch.prompt_mask,
            roll.completion_ids.detach(),
            roll.completion_mask.detach(),
            batch.records,
            on_policy=True,
        )

    def _global_sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def _advantages(self, batch: Batch, stats: dict[str, list]) -> torch.Tensor:
        assert self.reward_fn is not None
        cfg = self.cfg
        texts = self.tokenizer.batch_decode(
            [
                ids[m].tolist()
                for ids, m in zip(batch.completion_ids, batch.completion_mask & ~self._eos_mask(batch))
            ],
            skip_special_tokens=True,
        )
        prompts = [r.get("prompt", "") for r in batch.records]
        rewards = compute_rewards(self.reward_fn, str(cfg.reward), prompts, texts, batch.records)
        adv = compute_advantages(rewards, cfg.num_generations, cfg.advantage)
        stats["reward"].append(rewards)
        stats["advantage"].append(adv)
        return adv

    def _eos_mask(self, batch: Batch) -> torch.Tensor:
        return torch.isin(batch.completion_ids, torch.tensor(self.eos))

    def _micro_loss(
        self, batch: Batch, denominator: float, advantages: torch.Tensor | None, stats: dict[str, list] | None
    ) -> torch.Tensor:
        """The loss of one micro-batch, already divided by the step-wide denominator."""
        cfg = self.cfg
        valid = batch.completion_mask
        w = reduction_weights(valid, cfg.reduction, denominator)[valid].to(self.device)
        targets = batch.completion_ids[valid].to(self.device)
        terms = LossTerms()
        distill_w = cfg.alpha if self.reward_fn is not None else 1.0
        if cfg.divergence == "nll":
            terms.nll = w
        elif cfg.teacher_kl_estimator == "sampled" and cfg.rkl_discount == 0.0:
            terms.sampled_rkl = distill_w * w
        elif cfg.teacher_kl_estimator == "sampled":
            terms.nll = self._discounted_rkl_weights(batch, distill_w * w)
        elif distill_w > 0:
            terms.divergence = distill_w * w
        if advantages is not None:
            per_pos = advantages.to(self.device)[:, None].expand_as(valid)[valid]
            pg = (1.0 - cfg.alpha) * per_pos * w
            terms.nll = pg if terms.nll is None else terms.nll + pg

        t0 = time.perf_counter()
        teacher_out = None
        teacher_topk = None
        if (
            self.topk_cache is not None
            and not batch.on_policy
            and batch.indices is not None
            and terms.divergence is not None
        ):
            teacher_topk = self.topk_cache.lookup(batch.indices, batch.completion_mask)
        elif self.teacher is not None and terms.needs_teacher():
            teacher_out = self.teacher.score(batch)
        t1 = time.perf_counter()
        student_out = self.scorer(
            batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask
        )
        t2 = time.perf_counter()
        chunk_stats: dict[str, torch.Tensor] | None = {} if stats is not None else None
        loss = self._loss_from_outputs(
            student_out, teacher_out, terms, targets, chunk_stats, teacher_topk=teacher_topk
        )
        if self.reference is not None and (cfg.kl_to_initial > 0 or stats is not None):
            ref_out = self.reference.score(batch)
            ref_stats: dict[str, torch.Tensor] | None = {} if stats is not None else None
            if cfg.kl_to_initial > 0:
                loss = loss + self._loss_from_outputs(
                    student_out,
                    ref_out,
                    LossTerms(divergence=cfg.kl_to_initial * w),
                    targets,
                    ref_stats,
                    divergence=get_divergence("reverse_kl"),
                )
            else:  # logging only: KL(student || initial student), no gradient
                self._loss_from_outputs(
                    _detached(student_out),
                    ref_out,
                    LossTerms(divergence=torch.zeros_like(w)),
                    targets,
                    ref_stats,
                    divergence=get_divergence("reverse_kl"),
                )
            if stats is not None and ref_stats:
                stats["kl_to_initial"].append(ref_stats["reverse_kl"].detach().float().cpu())
        t3 = time.perf_counter()
        self._times["teacher"] += t1 - t0
        self._times["student_forward"] += t2 - t1
        self._times["loss"] += t3 - t2
        if stats is not None and chunk_stats:
            for k, v in chunk_stats.items():
                stats[k].append(v.detach().float().cpu())
        return loss

    def _loss_from_outputs(
        self,
        student_out: Any,
        teacher_out: Any,
        terms: LossTerms,
        targets: torch.Tensor,
        stats: dict[str, torch.Tensor] | None,
        divergence: Any = None,
        teacher_topk: Any = None,
    ) -> torch.Tensor:
        cfg = self.cfg
        div = divergence or self.divergence
        t_hidden = t_head = t_logits = None
        if teacher_out is not None:
            t_hidden, t_head, t_logits = teacher_out.hidden, teacher_out.head, teacher_out.logits
        if student_out.hidden is not None:
            return chunked_loss(
                student_out.hidden,
                student_out.head,
                terms,
                divergence=div,
                targets=targets,
                teacher_hidden=t_hidden,
                teacher_head=t_head,
                teacher_logits=t_logits,
                teacher_topk=teacher_topk,
                temperature=cfg.loss_temperature,
                chunk_size=cfg.loss_chunk_size,
                stats=stats,
            )
        if t_hidden is not None:
            assert isinstance(t_head, Head)
            t_logits = t_head.logits(t_hidden)
        return logits_loss(
            student_out.logits,
            terms,
            divergence=div,
            targets=targets,
            teacher_logits=t_logits,
            teacher_topk=teacher_topk,
            temperature=cfg.loss_temperature,
            stats=stats,
        )

    @torch.no_grad()
    def _discounted_rkl_weights(self, batch: Batch, w: torch.Tensor) -> torch.Tensor:
        """nll weights that implement reverse KL as a discounted per-token reward (advantage = -return)."""
        assert self.teacher is not None
        s = score_positions(
            unwrap(self.student),
            batch.prompt_ids,
            batch.prompt_mask,
            batch.completion_ids,
            batch.completion_mask,
            vocab=self.vocab,
            fused=False,
        )
        t = self.teacher.score(batch)
        t_logits = t.logits if t.logits is not None else t.head.logits(t.hidden)  # type: ignore[union-attr]
        valid = batch.completion_mask
        y = batch.completion_ids[valid]
        lq = torch.log_softmax(s.logits.float(), -1).gather(-1, y[:, None]).squeeze(-1)  # type: ignore[union-attr]
        lp = torch.log_softmax(t_logits.float(), -1).gather(-1, y[:, None]).squeeze(-1)
        per_tok = torch.zeros(valid.shape, dtype=torch.float32)
        per_tok[valid] = -(lq - lp)
        returns = discounted_returns(per_tok, valid, self.cfg.rkl_discount)
        return w * returns[valid]

    def train_step(self) -> dict[str, Any]:
        """One optimizer step (all gradient-accumulation micro-batches). Returns the step's log record."""
        cfg = self.cfg
        t_start = time.perf_counter()
        self._times = defaultdict(float)
        logging_step = (self.step + 1) % cfg.logging_steps == 0 or self.step == 0
        stats: dict[str, list] | None = defaultdict(list) if logging_step else None
        lmbda = self.lmbda_at(self.step)
        on_policy = self._coin(lmbda)

        micro = [self.stream.next().to(self.device) for _ in range(cfg.gradient_accumulation_steps)]
        t0 = time.perf_counter()
        if on_policy:
            micro = [self._rollout(b) for b in micro]
        self._times["rollout"] = time.perf_counter() - t0
        advantages: list[torch.Tensor | None] = [None] * len(micro)
        rl_stats: dict[str, list] = defaultdict(list)
        if self.reward_fn is not None and on_policy:
            advantages = [self._advantages(b, rl_stats) for b in micro]

        valid_tokens = sum(b.num_tokens() for b in micro)
        nonempty = sum(int((b.completion_mask.sum(-1) > 0).sum()) for b in micro)
        global_tokens = self._global_sum(valid_tokens)
        global_seqs = self._global_sum(nonempty)
        denominator = global_tokens if cfg.reduction == "token" else global_seqs

        total_loss = 0.0
        loss_finite = True
        for i, (batch, adv) in enumerate(zip(micro, advantages)):
            sync = i == len(micro) - 1
            ctx = contextlib.nullcontext() if sync else self.accelerator.no_sync(self.scorer)
            with ctx:
                loss = self._micro_loss(batch, denominator, adv, stats)
                t0 = time.perf_counter()
                if not torch.isfinite(loss):
                    loss_finite = False
                if denominator > 0 and loss.requires_grad:
                    self.accelerator.backward(loss * self.world)
                self._times["backward"] += time.perf_counter() - t0
            total_loss += float(loss.detach())
        global_loss = self._global_sum(total_loss) / self.world

        t0 = time.perf_counter()
        grad_norm = self._clip_and_check()
        finite = loss_finite and math.isfinite(grad_norm) and math.isfinite(global_loss)
        finite = self._global_sum(0.0 if finite else 1.0) == 0.0
        if finite:
            self.optimizer.step()
            self.nonfinite_in_a_row = 0
        else:
            self.skipped_steps += 1
            self.nonfinite_in_a_row += 1
        with warnings.catch_warnings():  # a skipped step still advances the schedule (keeps resumes exact)
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._times["optimizer"] = time.perf_counter() - t0
        self.step += 1
        wall = time.perf_counter() - t_start

        record: dict[str, Any] = {
            "step": self.step,
            "loss": global_loss,
            "on_policy": on_policy,
            "lmbda": lmbda,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "completion_tokens": global_tokens,
            "gen_len": global_tokens / max(1.0, self._global_sum(sum(b.size for b in micro))),
            "tokens_per_s": global_tokens / wall if wall > 0 else 0.0,
            "step_s": wall,
            "skipped_steps": self.skipped_steps,
        }
        for k, v in self._times.items():
            record[f"time_{k}"] = v
        if not finite:
            record["nonfinite"] = self._nonfinite_culprit(loss_finite, global_loss)
        if stats:
            for k, parts in stats.items():
                cat = torch.cat(parts) if parts else torch.zeros(0)
                if cat.numel():
                    record[k] = float(cat.mean())
        if rl_stats:
            r = torch.cat(rl_stats["reward"])
            a = torch.cat(rl_stats["advantage"])
            record.update(
                reward_mean=float(r.mean()),
                reward_std=float(r.std(unbiased=False)),
                advantage_mean=float(a.mean()),
                advantage_std=float(a.std(unbiased=False)),
                advantage_abs_max=float(a.abs().max()),
            )
        if valid_tokens == 0:
            record["empty_batch"] = True
        self._last_nonfinite_grads = None
        return record

    def _clip_and_check(self) -> float:
        params = [p for p in self.student.parameters() if p.requires_grad]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm)

    def _nonfinite_culprit(self, loss_finite: bool, loss_value: float) -> str:
        if not loss_finite or not math.isfinite(loss_value):
            return "loss"
        named = unwrap(self.student).named_parameters()
        for name, p in named:
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return f"gradient of {name}"
        return "gradient norm"

    # ------------------------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run until ``max_steps``; checkpoint every ``save_steps`` and at the end; Ctrl-C saves and stops."""
        self.setup()
        cfg = self.cfg
        t_begin = time.perf_counter()
        if self.step >= cfg.max_steps:
            self.log(
                f"nothing to do: the run is already at step {self.step} (max_steps={cfg.max_steps}); raise "
                "max_steps to train further"
            )
            return TrainResult(
                self.step, self.last_loss, self.skipped_steps, self.output_dir, 0.0, finished=True
            )
        self.log(self._banner())
        progress = _Progress(cfg.max_steps, self.step, show_bar=cfg.progress and self.is_main, log=self.log)
        # SIGTERM and the first Ctrl-C only raise a flag: the current step finishes, then a checkpoint is saved
        # (an exception raised at an arbitrary point inside library code is not a safe place to save from).
        # A second Ctrl-C interrupts at once.
        interrupted = {"flag": False}
        previous: dict[int, Any] = {}

        def on_signal(signum: int, _frame: Any) -> None:
            interrupted["flag"] = True
            if signum == signal.SIGINT:
                signal.signal(signal.SIGINT, signal.default_int_handler)

        if self.is_main:
            for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
                if sig is not None:
                    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                        previous[sig] = signal.signal(sig, on_signal)
        try:
            while self.step < cfg.max_steps:
                record = self.train_step()
                self.last_loss = record["loss"]
                progress.update(self.step, record)
                if self.step % cfg.logging_steps == 0 or self.step == 1:
                    self.tracker.log(record)
                    progress.print(_format_record(record))
                if record.get("nonfinite"):
                    self.log(f"warning: step {self.step} skipped: non-finite {record['nonfinite']}")
                    if self.nonfinite_in_a_row >= cfg.max_consecutive_nonfinite:
                        path = self.save()
                        raise TrainingError(
                            f"{self.nonfinite_in_a_row} consecutive steps had a non-finite {record['nonfinite']}; "
                            f"stopped at step {self.step} (checkpoint {path}). Lower learning_rate or check the data"
                        )
                if cfg.eval_steps and self.step % cfg.eval_steps == 0 and self.step < cfg.max_steps:
                    self.evaluate()
                if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < cfg.max_steps:
                    self.save()
                if interrupted["flag"]:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            progress.close()
            path = self.save()
            raise TrainingInterrupted(
                f"interrupted at step {self.step}; checkpoint saved to {path}. "
                "Resume with resume_from_checkpoint=latest"
            ) from None
        finally:
            progress.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        path = self.save()
        if cfg.lora is not None and cfg.lora.save_merged and self.is_main:
            merged = save_merged(self.student, self.tokenizer, self.output_dir / "merged")
            self.log(f"LoRA adapter merged into the base model: {merged}")
        if self.eval_data is not None:
            self.evaluate()
        self.tracker.close()
        wall = time.perf_counter() - t_begin
        self.log(
            f"done: {self.step} steps in {wall:.1f}s, final loss {self.last_loss:.4f}; model saved to {path}"
        )
        return TrainResult(self.step, self.last_loss, self.skipped_steps, self.output_dir, wall)

    def _banner(self) -> str:
        cfg = self.cfg
        n_train = sum(p.numel() for p in self.student.parameters() if p.requires_grad)
        mode = "SFT" if cfg.divergence == "nll" else f"{cfg.divergence}"
        if cfg.divergence == "jsd":
            mode += f"(β={cfg.beta}{', normalized' if cfg.jsd_normalize else ''})"
        extra = f", RL α={cfg.alpha} reward={cfg.reward}" if self.reward_fn is not None else ""
        return (
            f"gkd: {mode}, λ={cfg.lmbda}{' (SeqKD targets)' if cfg.seq_kd else ''}{extra}; "
            f"{len(self.train_data)} examples, {cfg.max_steps} steps × {cfg.per_device_train_batch_size}"
            f"×{cfg.gradient_accumulation_steps}×{self.world}; {n_train:,} trainable parameters; "
            f"output {self.output_dir}"
        )

    # ------------------------------------------------------------------------------------------------------------
    # evaluation and checkpoints
    # ------------------------------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Score the student on the eval split, decoding greedily and by sampling at ``temperature``."""
        if self.eval_data is None or not self.is_main:
            return {}
        cfg = self.cfg
        metric = cfg.eval_metric or "exact_match"
        scorer = resolve_scorer(metric)
        records = [e.record for e in self.eval_data.examples]
        out: dict[str, float] = {"step": self.step}
        for mode, greedy in (("greedy", True), ("sample", False)):
            preds = generate_texts(
                unwrap(self.student) if cfg.lora is None else self.student,
                self.tokenizer,
                self.eval_data,
                max_new_tokens=cfg.max_new_tokens,
                greedy=greedy,
                temperature=cfg.temperature,
                batch_size=cfg.eval_batch_size,
                seed=cfg.seed,
                backend=cfg.rollout_backend,
            )
            for k, v in scorer(records, preds).items():
                out[f"eval/{mode}/{k}"] = v
        self.tracker.log(out)
        self.log("eval: " + ", ".join(f"{k}={v:.2f}" for k, v in out.items() if k != "step"))
        return out

    def save(self) -> Path | None:
        """Write ``checkpoint-STEP`` atomically (main process only); returns its path."""
        self.accelerator.wait_for_everyone()
        path = None
        if self.is_main:
            state = {
                "step": self.step,
                "stream": self.stream.state_dict(),
                "coin_rng": self.coin_rng.getstate(),
                "rollout_gen": self.rollout_gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
                "numpy_rng": np.random.get_state(),
                "skipped_steps": self.skipped_steps,
                "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "last_loss": self.last_loss,
            }
            path = ckpt.save_checkpoint(
                self.output_dir,
                self.step,
                model=self.student,
                tokenizer=self.tokenizer,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                training_state=state,
                info={"fingerprint": self.cfg.fingerprint(RESUME_KEYS), "config": self.cfg.to_dict()},
                keep=self.cfg.save_total_limit,
            )
        self.accelerator.wait_for_everyone()
        return path

    def _check_resume_compat(self, path: Path) -> None:
        info, _, _ = ckpt.load_training_state(path)
        saved = info.get("config", {})
        for key in RESUME_KEYS:
            ours = getattr(self.cfg, key)
            if key == "lora" and ours is not None:
                import dataclasses

                ours = dataclasses.asdict(ours)
            if key in saved and saved[key] != ours:
                raise CheckpointError(
                    f"checkpoint '{path}' was written with {key}={saved[key]!r} but this config has {key}={ours!r}; "
                    "resume with the same config or start a fresh output_dir"
                )

    def _resume(self, path: Path) -> None:
        _, optim, state = ckpt.load_training_state(path)
        self.optimizer.load_state_dict(optim["optimizer"])
        self.scheduler.load_state_dict(optim["scheduler"])
        self.step = int(state["step"])
        self.stream.load_state_dict(state["stream"])
        self.coin_rng.setstate(state["coin_rng"])
        self.rollout_gen.set_state(state["rollout_gen"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.last_loss = float(state.get("last_loss", float("nan")))
        self.log(f"resumed from {path} at step {self.step}")


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def _detached(out: Any) -> Any:
    """A scoring output cut from the autograd graph (for statistics that must not train anything)."""
    from gkd.models import ScoringOutput

    head = out.head
    if head is not None:
        head = Head(
            head.weight.detach(), None if head.bias is None else head.bias.detach(), head.vocab, head.scale
        )
    return ScoringOutput(
        None if out.hidden is None else out.hidden.detach(),
        head,
        None if out.logits is None else out.logits.detach(),
    )


def _adamw(params: list[torch.nn.Parameter], cfg: GKDConfig) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel when every parameter allows it (much faster for large vocabularies)."""
    kwargs = {
        "lr": cfg.learning_rate,
        "betas": (cfg.adam_beta1, cfg.adam_beta2),
        "eps": cfg.adam_epsilon,
        "weight_decay": cfg.weight_decay,
    }
    if all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(params, **kwargs)


def _has_tokenizer(path: str) -> bool:
    p = Path(os.path.expanduser(path))
    return any(
        (p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _format_record(r: dict[str, Any]) -> str:
    keys = [
        ("loss", "loss", ".4f"),
        ("forward_kl", "fkl", ".4f"),
        ("reverse_kl", "rkl", ".4f"),
        ("entropy", "ent", ".3f"),
        ("top1_agree", "top1", ".3f"),
        ("reward_mean", "reward", ".3f"),
        ("gen_len", "len", ".1f"),
        ("tokens_per_s", "tok/s", ".0f"),
        ("lr", "lr", ".2e"),
    ]
    parts = [f"step {r['step']}", "on" if r.get("on_policy") else "off"]
    for key, label, fmt in keys:
        if key in r:
            parts.append(f"{label} {format(r[key], fmt)}")
    times = [
        f"{k[5:]} {r[k]:.2f}s" for k in ("time_rollout", "time_teacher", "time_student_forward") if r.get(k)
    ]
    if times:
        parts.append("(" + ", ".join(times) + ")")
    return " | ".join(parts)


class _Progress:
    """A rich progress bar with ETA on an interactive terminal; nothing otherwise.

    Step lines go through :meth:`print`: above the bar on a terminal, else to ``log`` one unwrapped line each (so a
    log file holds one line per step, greppable). ``show_bar`` (config key ``progress``) hides only the bar.
    """

    def __init__(self, total: int, start: int, show_bar: bool, log: Callable[[str], None]) -> None:
        self._log = log
        self._bar = None
        if not (show_bar and sys.stderr.isatty()):
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("[bold]gkd"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True, soft_wrap=True),
            transient=True,
        )
        self._task = self._bar.add_task("train", total=total, completed=start, info="")
        self._bar.start()

    def update(self, step: int, record: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=f"loss {record['loss']:.4f}")

    def print(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            self._log(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
