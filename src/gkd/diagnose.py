"""``gkd diagnose``: will on-policy data help this teacher and student, before anyone spends GPU hours on it?

On-policy distillation (λ > 0) trains the student on its own samples. The paper's argument: a student trained only on
fixed data meets, at generation time, prefixes the data never showed it, and its errors compound there. On-policy
data helps only where (1) the student's own prefixes differ from the dataset's, and (2) the teacher can steer the
student back from where its samples go wrong. :func:`diagnose` measures both, for any teacher, student and records:

1. **Divergence by position**: both models teacher-forced on the dataset's completions and on the student's own
   samples (``temperature``) of the same prompts; at every completion position the exact forward KL(P‖Q) and reverse
   KL(Q‖P) over the vocabulary (:mod:`gkd.divergences`, P the teacher, Q the student) and the student's NLL of the
   teacher's argmax token. Prompt-only records skip the dataset side.
2. **Scores** (with a metric): the per-example metric of the student's samples, its greedy output and the teacher's
   samples, in percent (for a 0/1 metric: % right).
3. **Off-track and recovery**: a student token is off-track where the teacher gives it probability < ``off_track``.
   Each sample's prefix up to and including its first off-track token is continued by the student and by the
   teacher (greedy and sampled) and the completed outputs are scored: the recovery rates. Without a metric, the
   teacher's mean per-token log-prob of each continuation is reported instead.
4. **Reading** (:func:`reading`): a heuristic prediction for λ from the *exposure gap* (mean forward KL on student
   prefixes ÷ on dataset prefixes) and the *steer-back gap* (teacher − student greedy recovery, in points).

Samples come from a :class:`gkd.sampling.Sampler` (default: the local ``auto`` sampler; it must sample both models,
so an in-process one), one ``torch.Generator`` seeded with ``seed`` per run: ``(seed, batch_size)`` fix them, as in
``gkd eval``.

The console report of a result, :func:`format_report`, is :mod:`gkd.diagnose_report` (re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from gkd.data import TokenizedDataset, pad_left, pad_right, tokenize_records
from gkd.diagnose_report import format_report
from gkd.divergences import forward_kl, log_probs, reverse_kl
from gkd.errors import ConfigError
from gkd.forward import is_seq2seq, score_positions, unwrap
from gkd.models import check_teacher_student, eval_mode
from gkd.sampling import Sampler, SamplingParams, eos_ids, local_sampler

__all__ = [
    "ERROR_SHIFT",
    "LARGE_GAP",
    "MIN_ERROR_RISE",
    "READINGS",
    "SMALL_GAP",
    "STEER_BACK",
    "UNRECOVERABLE",
    "diagnose",
    "format_report",
    "reading",
]

SMALL_GAP = 1.2  # exposure gap below this: the student's own prefixes are no harder for it than the dataset's
LARGE_GAP = 1.5  # exposure gap at or above this: the student reaches states the dataset does not show
STEER_BACK = 10.0  # teacher recovery beats student recovery by at least this many points: it steers back
UNRECOVERABLE = 10.0  # both recovery rates below this (%): the mistakes cannot be recovered from
_EPS = 1e-6  # added to both means of the exposure gap (0/0 -> 1: identical models show no gap)
_STATS = ("forward_kl", "reverse_kl", "nll_teacher_argmax", "error_mass")
ERROR_SHIFT = (
    1.3  # error mass off the data's prefixes ÷ on them at or above this (with MIN_ERROR_RISE): a shift
)
MIN_ERROR_RISE = 0.02  # the on-track error mass must also exceed the dataset's by this much (absolute)
# (ERROR_SHIFT and MIN_ERROR_RISE separate the two cases of RESULTS.md section 0: 1.47 / +2.9 points where λ = 1 won
# by 16-23 points, 1.12 / +0.7 points where λ did not matter; two cases are a calibration, not a validation)
_CHUNK = 1024  # completion positions whose [positions, vocabulary] logits exist at once
_RUNS = {
    "student_greedy": (0, True),
    "student_sample": (0, False),
    "teacher_greedy": (1, True),
    "teacher_sample": (1, False),
}


def _pct(values: Sequence[float]) -> float | None:
    return 100.0 * sum(values) / len(values) if values else None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _logits(scored: Any, start: int) -> torch.Tensor:
    """Logits of positions ``start : start + _CHUNK`` of a :class:`gkd.models.ScoringOutput`."""
    if scored.logits is not None:
        return scored.logits[start : start + _CHUNK]
    return scored.head.logits(scored.hidden[start : start + _CHUNK])


def _device(model: Any) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


class _Probe:
    """The two models, the tokenizer and the settings every measurement shares."""

    def __init__(
        self,
        student,
        teacher,
        tok,
        sampler,
        vocab,
        temperature,
        seed,
        batch_size,
        reward,
        metric,
        recs,
        off_track,
    ):
        self.models, self.tok, self.sampler, self.vocab = (student, teacher), tok, sampler, vocab
        self.temperature, self.seed, self.batch_size = temperature, seed, batch_size
        self.reward, self.metric, self.recs = reward, metric, recs
        self.eos = set(eos_ids(student, tok))
        self.log_off_track = math.log(off_track)

    def sample(self, who: int, prompts: list[list[int]], greedy: bool, max_new: int) -> list[list[int]]:
        """Completion ids (EOS kept when emitted) of ``prompts`` by model ``who`` (0 student, 1 teacher)."""
        model, tok = self.models[who], self.tok
        params = SamplingParams(
            max_new_tokens=max_new,
            eos_token_ids=tuple(eos_ids(model, tok)),
            pad_token_id=tok.pad_token_id,
            temperature=self.temperature,
            greedy=greedy,
            vocab_size=len(tok),
        )
        gen = torch.Generator(device=_device(model)).manual_seed(self.seed)
        out: list[list[int]] = []
        for start in range(0, len(prompts), self.batch_size):
            ids, mask = pad_left(prompts[start : start + self.batch_size], tok.pad_token_id)
            roll = self.sampler.sample(model, ids, mask, params, gen)
            for row, keep in zip(roll.completion_ids.tolist(), roll.completion_mask.tolist()):
                out.append([t for t, k in zip(row, keep) if k])
        return out

    @torch.no_grad()
    def force(
        self, prompts: list[list[int]], completions: list[list[int]], teacher_only: bool = False
    ) -> list[dict]:
        """Per sequence and completion position (both models teacher-forced on prompt + completion): forward and
        reverse KL, the student's NLL of the teacher's argmax token, the student's *error mass* (its probability of
        the tokens the teacher gives less than the off-track threshold: its chance to go off-track there), and the
        teacher's log-prob of the token itself.

        Logits exist only for ``_CHUNK`` positions at a time (from the hidden states and the head where the model
        allows it, :func:`gkd.models.score_positions`), so memory does not grow with batch x vocabulary."""
        out: list[dict] = []
        pad, b = self.tok.pad_token_id, self.batch_size
        student, teacher = self.models
        for start in range(0, len(prompts), b):
            p_ids, p_mask = pad_left(prompts[start : start + b], pad)
            c_ids, c_mask = pad_right(completions[start : start + b], pad)
            scored = {}
            for m in dict.fromkeys([teacher] if teacher_only else [teacher, student]):
                d = _device(m)
                scored[m] = score_positions(
                    m, p_ids.to(d), p_mask.to(d), c_ids.to(d), c_mask.to(d), vocab=self.vocab
                )
            tokens, parts = c_ids[c_mask], []
            for a in range(0, len(tokens), _CHUNK):
                zt = _logits(scored[teacher], a)
                zs = _logits(scored.get(student, scored[teacher]), a).to(
                    zt.device
                )  # compared where the teacher is
                lq, lp = log_probs(zs), log_probs(zt)
                chunk = tokens[a : a + _CHUNK].to(zt.device)
                parts.append(
                    torch.stack(
                        [
                            forward_kl(zs, zt),
                            reverse_kl(zs, zt),
                            -lq.gather(-1, zt.argmax(-1, keepdim=True)).squeeze(-1),
                            (lq.exp() * (lp < self.log_off_track)).sum(-1),
                            lp.gather(-1, chunk[:, None]).squeeze(-1),
                        ],
                        -1,
                    ).cpu()
                )
            values = torch.cat(parts) if parts else torch.zeros(0, len(_STATS) + 1)
            for row in torch.split(values, c_mask.sum(1).tolist()):
                out.append({k: row[:, n].tolist() for n, k in enumerate((*_STATS, "teacher_logprob"))})
        return out

    def texts(self, rows: list[list[int]]) -> list[str]:
        rows = [r[:-1] if r and r[-1] in self.eos else r for r in rows]
        return [t.strip() for t in self.tok.batch_decode(rows, skip_special_tokens=True)]

    def score(self, indices: Sequence[int], rows: list[list[int]]) -> float | None:
        """The metric of completions ``rows`` of the records at ``indices``: the mean per-example score, in %."""
        from gkd.metrics import prompt_text_of
        from gkd.rl import compute_rewards

        recs = [self.recs[i] for i in indices]
        prompts = []
        for r in recs:
            try:
                prompts.append(prompt_text_of(r))
            except ValueError:
                prompts.append("")
        return (
            _pct(compute_rewards(self.reward, self.metric, prompts, self.texts(rows), recs).tolist())
            if recs
            else None
        )


def _recover(
    probe: _Probe, prompts, samples, first_off, max_new: int, seq2seq: bool, notes: list[str]
) -> dict:
    """Continue each off-track sample's prefix (through its first off-track token) with the student and the teacher,
    greedy and sampled, and score the completed outputs (recovery rates) or, without a metric, the teacher's mean
    per-token log-prob of each continuation."""
    idx = [i for i, f in enumerate(first_off) if f >= 0]
    out: dict[str, Any] = {
        "prompts": len(idx),
        "kind": "recovery_rate" if probe.reward else "teacher_logprob",
    }
    if seq2seq:
        notes.append(
            "recovery needs a decoder-only model (a decoder prefix cannot be continued): not measured"
        )
        return {**out, "kind": "skipped"}
    prefix = {i: samples[i][: first_off[i] + 1] for i in idx}
    # a prefix that ends in EOS (or fills max_new_tokens) is complete: both continuations are empty
    room = {i: 0 if prefix[i][-1] in probe.eos else max_new - len(prefix[i]) for i in idx}
    for name, (who, greedy) in _RUNS.items():
        cont: dict[int, list[int]] = {i: [] for i in idx}
        for r in sorted(
            {room[i] for i in idx} - {0}
        ):  # one group per length left: the context never overflows
            group = [i for i in idx if room[i] == r]
            cont.update(zip(group, probe.sample(who, [prompts[i] + prefix[i] for i in group], greedy, r)))
        if probe.reward is not None:
            out[name] = probe.score(idx, [prefix[i] + cont[i] for i in idx])
        else:
            keep = [i for i in idx if cont[i]]
            forced = probe.force(
                [prompts[i] + prefix[i] for i in keep], [cont[i] for i in keep], teacher_only=True
            )
            out[name] = _mean([x for f in forced for x in f["teacher_logprob"]])
    if probe.reward is not None:
        out["original_sample"] = probe.score(idx, [samples[i] for i in idx])
    elif idx:
        notes.append(
            "no metric: recovery is the teacher's mean per-token log-prob of each continuation, not a rate"
        )
    return out


def _by_position(sources: dict[str, list[dict]], first_off: list[int], log_threshold: float) -> list[dict]:
    """One row per completion position: each source's mean statistics and count, the student samples' off-track
    tokens there and how many samples go off-track there first."""
    length = max((len(r["forward_kl"]) for rows in sources.values() for r in rows), default=0)
    table = []
    for j in range(length):
        row: dict[str, Any] = {"position": j + 1}
        for name, rows in sources.items():
            vals = [r for r in rows if len(r["forward_kl"]) > j]
            row[name] = {"count": len(vals), **{k: _mean([r[k][j] for r in vals]) for k in _STATS}}
        student = [r["teacher_logprob"][j] for r in sources["student"] if len(r["teacher_logprob"]) > j]
        row["off_track_tokens"] = sum(lp < log_threshold for lp in student)
        row["first_off_track"] = first_off.count(j)
        table.append(row)
    return table


# what each verdict of :func:`reading` says (the numbers that drove it are appended)
READINGS = {
    "on_policy_helps": "On-policy data (λ → 1) should help: the student reaches states the dataset never shows it "
    "and the teacher can steer it back from them.",
    "on_policy_covers": "On-policy data (λ → 1) should help: on valid prefixes the dataset does not show (its own, "
    "before any mistake, or the teacher's, where distillation takes it) the student goes off-track more often than "
    "on the dataset's. The dataset comes from another policy; only the student's own samples cover the states it "
    "will be in, whether or not a mistake can be undone later.",
    "on_policy_may_help": "On-policy data may help: the student's own prefixes differ from the dataset's, but either "
    "only moderately or without a measured steer-back; a mixed λ (e.g. 0.5) against λ = 0 is worth a short run.",
    "lambda_unlikely_to_matter": "λ is unlikely to matter here; the divergence is the knob to tune: the student "
    "diverges from the teacher on its own prefixes about as much as on the dataset's.",
    "never_off_track": "λ is unlikely to matter here: no student sample went off-track, so there is nothing for the "
    "teacher to steer back from; the divergence is the knob to tune.",
    "cannot_steer_back": "The student's mistakes cannot be steered back from (the teacher recovers no better than "
    "the student), so on-policy data has little to teach.",
    "unrecoverable": "The student's mistakes cannot be steered back from (neither model recovers from the first "
    "off-track token), so on-policy data has little to teach.",
    "undetermined": "Undetermined: whether the teacher can steer the student back is unmeasured (no metric, or an "
    "encoder-decoder model) and the exposure gap is not large (or unknown).",
}


def reading(result: dict[str, Any]) -> dict[str, Any]:
    """The heuristic λ prediction from a :func:`diagnose` result (its ``divergence`` and ``recovery`` sections).

    * exposure gap ``g`` = (mean forward KL on student prefixes + 1e-6) / (same on dataset prefixes + 1e-6);
    * error shift ``o`` = (the student's error mass on its own on-track states, or on the teacher's samples if
      higher, + 1e-3) / (its error mass on the dataset's prefixes + 1e-3), where the error mass is its probability of
      tokens the teacher gives less than the off-track threshold, its on-track states are its positions up to its
      first off-track token (reached by valid steps: the decision there counts, what follows a mistake does not),
      and the teacher's samples are where distillation takes it;
    * steer-back gap ``s`` = teacher greedy recovery − student greedy recovery, in points (needs a metric).

    Rules, in order (verdicts of :data:`READINGS`): ``g < SMALL_GAP`` -> ``lambda_unlikely_to_matter``;
    ``o >= ERROR_SHIFT`` and the error mass higher by at least ``MIN_ERROR_RISE`` -> ``on_policy_covers`` (the student
    errs more on its own valid states than on the data's); no sample
    off-track -> ``never_off_track``; no recovery rate (no metric, or a seq2seq model) -> ``on_policy_may_help`` if
    ``g >= LARGE_GAP``, else ``undetermined``; both greedy recovery rates < ``UNRECOVERABLE`` -> ``unrecoverable``;
    ``s < STEER_BACK`` -> ``cannot_steer_back``; else ``on_policy_helps`` when ``g >= LARGE_GAP`` (or unknown:
    prompt-only data), ``on_policy_may_help`` for a gap in between.
    """
    div, rec = result["divergence"], result["recovery"]
    ds, st = div.get("dataset"), div["student"]
    gap = on_track = rise = None
    if ds is not None and ds["forward_kl"] is not None and st["forward_kl"] is not None:
        gap = (st["forward_kl"] + _EPS) / (ds["forward_kl"] + _EPS)
        e_own, e_data = st.get("error_mass_on_track"), ds.get("error_mass")
        e_teacher = (div.get("teacher") or {}).get("error_mass")
        if e_own is not None and e_data is not None:
            # the larger of the two shifts: the student's own valid states, and the teacher's (where it is headed)
            e_own = max(e_own, e_teacher) if e_teacher is not None else e_own
            on_track = (e_own + 1e-3) / (e_data + 1e-3)
            rise = e_own - e_data
    t, s = rec.get("teacher_greedy"), rec.get("student_greedy")
    steer = t - s if rec.get("kind") == "recovery_rate" and t is not None and s is not None else None
    numbers = "exposure gap " + ("unknown (no dataset completions)" if gap is None else f"{gap:.2f}")
    if on_track is not None:
        numbers += (
            f"; the student's error mass on its own on-track or the teacher's prefixes {100 * e_own:.1f}% vs "
            f"{100 * e_data:.1f}% on the dataset's (shift {on_track:.2f})"
        )
    if steer is not None:
        numbers += f"; greedy recovery teacher {t:.1f}% vs student {s:.1f}% (steer-back gap {steer:+.1f})"
    if gap is not None and gap < SMALL_GAP:
        verdict = "lambda_unlikely_to_matter"
    elif on_track is not None and on_track >= ERROR_SHIFT and rise >= MIN_ERROR_RISE:
        verdict = "on_policy_covers"
    elif rec.get("prompts", 0) == 0:
        verdict = "never_off_track"
    elif steer is None:
        verdict = "on_policy_may_help" if gap is not None and gap >= LARGE_GAP else "undetermined"
    elif max(t, s) < UNRECOVERABLE:
        verdict = "unrecoverable"
    elif steer < STEER_BACK:
        verdict = "cannot_steer_back"
    else:
        verdict = "on_policy_helps" if gap is None or gap >= LARGE_GAP else "on_policy_may_help"
    text = READINGS[verdict] + f" ({numbers}.) This is a heuristic prediction, not a measurement of training."
    thresholds = dict(
        small_gap=SMALL_GAP,
        large_gap=LARGE_GAP,
        steer_back=STEER_BACK,
        unrecoverable=UNRECOVERABLE,
        error_shift=ERROR_SHIFT,
        min_error_rise=MIN_ERROR_RISE,
    )
    return {
        "exposure_gap": gap,
        "on_track_error_shift": on_track,
        "steer_back_gap": steer,
        "verdict": verdict,
        "text": text,
        "thresholds": thresholds,
    }


@torch.no_grad()
def diagnose(
    teacher: Any,
    student: Any,
    tokenizer: Any,
    records: Sequence[dict] | TokenizedDataset,
    metric: str | None = None,
    *,
    num_prompts: int = 200,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    off_track: float = 0.05,
    max_prompt_length: int = 1024,
    apply_chat_template: bool = False,
    teacher_tokenizer: Any = None,
    sampler: Sampler | None = None,
) -> dict[str, Any]:
    """Measure whether on-policy data should help distil ``teacher`` into ``student`` (see the module docstring).

    ``records``: prompt[/completion] or ``messages`` records (the first ``num_prompts`` are used; completions are
    cut to ``max_new_tokens``), or a dataset already tokenized with ``tokenizer``. ``metric``: a name of
    :mod:`gkd.scoring` or ``module:function`` (the reward signature ``(prompts, completions, records) -> floats``,
    1.0 = right), scored per example; ``None`` reports log-probs instead of recovery rates. ``teacher_tokenizer``
    (optional) must have the tokenizer's vocabulary. Returns a JSON-ready dict: ``settings``, ``divergence``,
    ``by_position``, ``scores``, ``off_track``, ``recovery``, ``reading``, ``notes`` (docs/diagnose.md).
    """
    _check_settings(num_prompts, max_new_tokens, batch_size, temperature, off_track)
    vocab = check_teacher_student(student, teacher, tokenizer, teacher_tokenizer)
    reward = None
    if metric is not None:
        from gkd.scoring import check_records, load_reward

        reward = load_reward(metric, "--metric")
    seq2seq = is_seq2seq(student)
    examples = _examples(
        records, tokenizer, num_prompts, max_new_tokens, max_prompt_length, seq2seq, apply_chat_template
    )
    recs = [e.record for e in examples]
    if metric is not None:
        check_records(metric, recs, "--metric", as_reward=True)
    ss, ts = unwrap(student), unwrap(teacher)
    sampler = sampler or local_sampler("auto")
    probe = _Probe(
        ss, ts, tokenizer, sampler, vocab, temperature, seed, batch_size, reward, metric, recs, off_track
    )
    prompts, notes = [e.prompt for e in examples], []
    with eval_mode(teacher), eval_mode(student):
        sampler.sync(ss)
        samples = probe.sample(0, prompts, False, max_new_tokens)
        sources = _dataset_side(probe, examples, notes)
        sources["student"] = probe.force(prompts, samples)
        # where distillation takes the student: the teacher's own samples, scored by both models
        teacher_samples = probe.sample(1, prompts, False, max_new_tokens)
        sources["teacher"] = probe.force(prompts, teacher_samples)
        lt = math.log(off_track)
        first_off = [
            next((j for j, lp in enumerate(r["teacher_logprob"]) if lp < lt), -1) for r in sources["student"]
        ]
        scores = None
        if reward is not None:
            scores = _scores(probe, prompts, samples, teacher_samples, max_new_tokens)
        recovery = _recover(probe, prompts, samples, first_off, max_new_tokens, seq2seq, notes)
    settings = {"metric": metric, "num_prompts": len(examples), "max_new_tokens": max_new_tokens}
    settings.update(temperature=temperature, seed=seed, batch_size=batch_size, off_track=off_track)
    result: dict[str, Any] = {
        "settings": settings,
        "divergence": _divergence(sources, first_off),
        "by_position": _by_position(sources, first_off, lt),
        "scores": scores,
        "off_track": _off_track(sources["student"], first_off, off_track, len(samples)),
        "recovery": recovery,
        "notes": notes,
    }
    result["reading"] = reading(result)
    return result


def _check_settings(
    num_prompts: int, max_new_tokens: int, batch_size: int, temperature: float, off_track: float
) -> None:
    """The settings' ranges, each error naming its ``gkd diagnose`` flag."""
    checks = [
        (num_prompts > 0, "--num-prompts", "a positive integer", num_prompts),
        (max_new_tokens > 0, "--max-new-tokens", "a positive integer", max_new_tokens),
        (batch_size > 0, "--batch-size", "a positive integer", batch_size),
        (math.isfinite(temperature) and temperature > 0, "--temperature", "> 0", temperature),
        (0.0 < off_track < 1.0, "--off-track", "in (0, 1)", off_track),
    ]
    for ok, flag, allowed, value in checks:
        if not ok:
            raise ConfigError(f"{flag} must be {allowed}, got {value}")


def _examples(
    records: Sequence[dict] | TokenizedDataset,
    tokenizer: Any,
    num_prompts: int,
    max_new_tokens: int,
    max_prompt_length: int,
    seq2seq: bool,
    apply_chat_template: bool,
) -> list[Any]:
    """The first ``num_prompts`` examples of ``records`` (tokenized here unless they already are)."""
    if isinstance(records, TokenizedDataset):
        return list(records.examples)[:num_prompts]
    return tokenize_records(
        list(records)[:num_prompts],
        tokenizer,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_new_tokens,
        source="the diagnose dataset",
        seq2seq=seq2seq,
        apply_chat_template=apply_chat_template,
    ).examples


def _dataset_side(probe: _Probe, examples: list[Any], notes: list[str]) -> dict[str, list[dict]]:
    """``{"dataset": ...}``: both models forced on the dataset's completions (empty for prompt-only records)."""
    with_data = [i for i, e in enumerate(examples) if e.completion]
    if not with_data:
        notes.append("the records are prompt-only: divergence on dataset prefixes is skipped")
        return {}
    if len(with_data) < len(examples):
        notes.append(f"{len(examples) - len(with_data)} prompt-only records are left out of the dataset side")
    return {
        "dataset": probe.force(
            [examples[i].prompt for i in with_data], [examples[i].completion for i in with_data]
        )
    }


def _scores(probe: _Probe, prompts, samples, teacher_samples, max_new: int) -> dict[str, Any]:
    """The metric (% per example) of the student's samples, its greedy output and the teacher's samples."""
    everyone = range(len(prompts))
    return {
        "metric": probe.metric,
        "student_sample": probe.score(everyone, samples),
        "student_greedy": probe.score(everyone, probe.sample(0, prompts, True, max_new)),
        "teacher_sample": probe.score(everyone, teacher_samples),
    }


def _divergence(sources: dict[str, list[dict]], first_off: list[int]) -> dict[str, Any]:
    """Each source's mean statistics over its positions; the student's also over its on-track positions."""
    divergence: dict[str, Any] = {
        name: {
            "sequences": len(rows),
            "tokens": sum(len(r["forward_kl"]) for r in rows),
            **{k: _mean([x for r in rows for x in r[k]]) for k in _STATS},
        }
        for name, rows in sources.items()
    }
    divergence.setdefault("dataset", None)
    # the student's states reached by valid steps: its positions up to and including the first off-track token
    cut = [f + 1 if f >= 0 else None for f in first_off]
    student_div = divergence["student"]
    for key in ("forward_kl", "error_mass"):
        student_div[f"{key}_on_track"] = _mean(
            [x for r, c in zip(sources["student"], cut) for x in r[key][:c]]
        )
    student_div["tokens_on_track"] = sum(len(r["forward_kl"][:c]) for r, c in zip(sources["student"], cut))
    return divergence


def _off_track(student: list[dict], first_off: list[int], off_track: float, sequences: int) -> dict[str, Any]:
    """How many of the student's samples and tokens are off-track, and where a sample first goes off-track."""
    lt = math.log(off_track)
    n_tok = sum(len(r["teacher_logprob"]) for r in student)
    off_tok = sum(sum(lp < lt for lp in r["teacher_logprob"]) for r in student)
    firsts = sorted(f + 1 for f in first_off if f >= 0)
    return {
        "threshold": off_track,
        "sequences": sequences,
        "sequences_off_track": len(firsts),
        "sequence_rate": _pct([f >= 0 for f in first_off]),
        "tokens": n_tok,
        "tokens_off_track": off_tok,
        "token_rate": 100.0 * off_tok / n_tok if n_tok else None,
        "first_position_mean": _mean(firsts),
        "first_position_median": firsts[len(firsts) // 2] if firsts else None,
    }
