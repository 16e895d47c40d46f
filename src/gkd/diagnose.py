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
   samples, as a percentage (for a 0/1 metric: % right).
3. **Off-track and recovery**: a student token is off-track where the teacher gives it probability < ``off_track``.
   Each sample's prefix up to and including its first off-track token is continued by the student and by the
   teacher (greedy and sampled) and the completed outputs are scored: the recovery rates. Without a metric, the
   teacher's mean per-token log-prob of each continuation is reported instead.
4. **Reading** (:func:`reading`): a heuristic prediction for λ from the *exposure gap* (mean forward KL on student
   prefixes ÷ on dataset prefixes) and the *steer-back gap* (teacher − student greedy recovery, in points).

Samples are drawn by the project's :class:`gkd.sampling.Sampler` (default: the local ``auto`` sampler), one seeded
``torch.Generator`` per run, so ``(seed, batch_size)`` fix them, as in ``gkd eval``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from gkd.data import TokenizedDataset, pad_left, pad_right, tokenize_records
from gkd.divergences import forward_kl, log_probs, reverse_kl
from gkd.errors import ConfigError
from gkd.evaluation import eos_ids
from gkd.models import check_teacher_student, eval_mode, is_seq2seq, score_positions, unwrap
from gkd.sampling import Sampler, SamplingParams, local_sampler

__all__ = ["LARGE_GAP", "SMALL_GAP", "STEER_BACK", "UNRECOVERABLE", "diagnose", "format_report", "reading"]

SMALL_GAP = 1.2  # exposure gap below this: the student's own prefixes look like the dataset's to the teacher
LARGE_GAP = 1.5  # exposure gap at or above this: the student reaches states the dataset does not show
STEER_BACK = (
    10.0  # teacher recovery beats student recovery by at least this many points: the teacher steers back
)
UNRECOVERABLE = 10.0  # both recovery rates below this (%): the mistakes cannot be recovered from
_EPS = 1e-6  # added to both means of the exposure gap (0/0 -> 1: identical models show no gap)
_STATS = ("forward_kl", "reverse_kl", "nll_teacher_argmax")


def _device(model: Any) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _sample(sampler, model, tok, prompts, max_new, temperature, greedy, gen, batch_size) -> list[list[int]]:
    """Completion ids (EOS kept when emitted) of every prompt, ``batch_size`` at a time, drawing from ``gen``."""
    params = SamplingParams(
        max_new_tokens=max_new,
        eos_token_ids=tuple(eos_ids(model, tok)),
        pad_token_id=tok.pad_token_id,
        temperature=temperature,
        greedy=greedy,
        vocab_size=len(tok),
    )
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = pad_left(prompts[start : start + batch_size], tok.pad_token_id)
        roll = sampler.sample(model, ids, mask, params, gen)
        for row, keep in zip(roll.completion_ids.tolist(), roll.completion_mask.tolist()):
            out.append([t for t, k in zip(row, keep) if k])
    return out


@torch.no_grad()
def _force(teacher, student, prompts, completions, vocab, pad, batch_size) -> list[dict[str, list[float]]]:
    """Per sequence and completion position: forward / reverse KL, the student's NLL of the teacher's argmax token and
    the teacher's log-prob of the token itself (both models teacher-forced on prompt + completion)."""
    out: list[dict[str, list[float]]] = []
    for start in range(0, len(prompts), batch_size):
        p_ids, p_mask = pad_left(prompts[start : start + batch_size], pad)
        c_ids, c_mask = pad_right(completions[start : start + batch_size], pad)
        logits = []
        for m in (student, teacher):
            d = _device(m)
            args = (p_ids.to(d), p_mask.to(d), c_ids.to(d), c_mask.to(d))
            logits.append(score_positions(m, *args, vocab=vocab, fused=False).logits)
        zt = logits[1]
        zs = logits[0].to(zt.device)  # computed where the teacher is: only [positions] values come back
        lq, lp = log_probs(zs), log_probs(zt)
        tokens = c_ids[c_mask].to(zt.device)
        cols = {
            "forward_kl": forward_kl(zs, zt),
            "reverse_kl": reverse_kl(zs, zt),
            "nll_teacher_argmax": -lq.gather(-1, zt.argmax(-1, keepdim=True)).squeeze(-1),
            "teacher_logprob": lp.gather(-1, tokens[:, None]).squeeze(-1),
        }
        lengths = c_mask.sum(1).tolist()
        split = {k: torch.split(v.float().cpu(), lengths) for k, v in cols.items()}
        out += [{k: split[k][i].tolist() for k in cols} for i in range(len(lengths))]
    return out


def _summary(rows: list[dict[str, list[float]]]) -> dict[str, Any]:
    flat = {k: [x for r in rows for x in r[k]] for k in _STATS}
    n = len(flat["forward_kl"])
    out: dict[str, Any] = {"sequences": len(rows), "tokens": n}
    out.update({k: (sum(v) / n if n else None) for k, v in flat.items()})
    return out


def _by_position(sources: dict[str, list[dict]], first_off: list[int], max_len: int) -> list[dict]:
    table = []
    for j in range(max_len):
        row: dict[str, Any] = {"position": j + 1}
        for name, rows in sources.items():
            vals = [r for r in rows if len(r["forward_kl"]) > j]
            row[name] = {
                "count": len(vals),
                **{k: (sum(r[k][j] for r in vals) / len(vals) if vals else None) for k in _STATS},
            }
        row["first_off_track"] = sum(1 for f in first_off if f == j)
        table.append(row)
    return table


def _pct(values: Sequence[float]) -> float | None:
    return 100.0 * sum(values) / len(values) if values else None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def reading(result: dict[str, Any]) -> dict[str, Any]:
    """The heuristic λ prediction from a :func:`diagnose` result (its ``divergence`` and ``recovery`` sections).

    * exposure gap ``g`` = (mean forward KL on student prefixes + 1e-6) / (same on dataset prefixes + 1e-6);
    * steer-back gap ``s`` = teacher greedy recovery − student greedy recovery, in points (needs a metric).

    Rules, in order: ``g < SMALL_GAP`` -> λ unlikely to matter; no off-track sample -> λ unlikely to matter; both
    recovery rates < ``UNRECOVERABLE`` or ``s < STEER_BACK`` -> the mistakes cannot be steered back from;
    ``g >= LARGE_GAP`` (or unknown) and ``s >= STEER_BACK`` -> on-policy data should help (λ -> 1); a gap in between
    with ``s >= STEER_BACK`` -> some help (a mixed λ). Without a metric the steer-back is unmeasured.
    """
    div, rec = result["divergence"], result["recovery"]
    ds, st = div.get("dataset"), div["student"]
    gap = None
    if ds is not None and ds["forward_kl"] is not None and st["forward_kl"] is not None:
        gap = (st["forward_kl"] + _EPS) / (ds["forward_kl"] + _EPS)
    t, s = rec.get("teacher_greedy"), rec.get("student_greedy")
    steer = t - s if rec.get("kind") == "recovery_rate" and t is not None and s is not None else None
    g = "unknown (no dataset completions)" if gap is None else f"{gap:.2f}"
    numbers = f"exposure gap {g}"
    if steer is not None:
        numbers += f"; recovery teacher {t:.1f}% vs student {s:.1f}% (steer-back gap {steer:+.1f} points)"
    if gap is not None and gap < SMALL_GAP:
        verdict = "lambda_unlikely_to_matter"
        text = (
            "λ is unlikely to matter here; the divergence is the knob to tune: the student diverges from the "
            f"teacher on its own prefixes about as much as on the dataset's (exposure gap < {SMALL_GAP})."
        )
    elif rec.get("prompts", 0) == 0:
        verdict = "lambda_unlikely_to_matter"
        text = "λ is unlikely to matter here: no student sample went off-track, so there is nothing to steer back from."
    elif steer is None:
        verdict = "on_policy_may_help" if gap is None or gap >= SMALL_GAP else "undetermined"
        text = (
            "The student reaches states the dataset does not show it; whether the teacher can steer it back is "
            "unmeasured without a metric (see the teacher's log-probs of the continuations): try λ = 0.5 and 1."
        )
    elif max(t, s) < UNRECOVERABLE or steer < STEER_BACK:
        verdict = "cannot_steer_back"
        why = (
            "neither model recovers"
            if max(t, s) < UNRECOVERABLE
            else "the teacher recovers no better than the student"
        )
        text = f"The student's mistakes cannot be steered back from ({why}), so on-policy data has little to teach."
    elif gap is None or gap >= LARGE_GAP:
        verdict = "on_policy_helps"
        text = (
            "On-policy data (λ → 1) should help: the student reaches states the dataset never shows it and the "
            "teacher can steer it back from them."
        )
    else:
        verdict = "on_policy_may_help"
        text = (
            "On-policy data may help somewhat: the teacher steers back clearly, but the student's own prefixes "
            "differ only moderately from the dataset's; a mixed λ (e.g. 0.5) is a fair start."
        )
    text += f" ({numbers}.) This is a heuristic prediction, not a measurement of training."
    thresholds = {
        "small_gap": SMALL_GAP,
        "large_gap": LARGE_GAP,
        "steer_back": STEER_BACK,
        "unrecoverable": UNRECOVERABLE,
    }
    return {
        "exposure_gap": gap,
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

    ``records``: prompt[/completion] or ``messages`` records (the first ``num_prompts`` are used), or a dataset
    already tokenized with ``tokenizer``. ``metric``: any name of :mod:`gkd.scoring` or ``module:function`` (the
    reward signature ``(prompts, completions, records) -> floats``, 1.0 = right), scored per example; ``None``
    reports log-probs instead of recovery rates. Returns a JSON-ready dict (keys ``settings``, ``divergence``,
    ``by_position``, ``scores``, ``off_track``, ``recovery``, ``reading``, ``notes``).
    """
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
    vocab = check_teacher_student(student, teacher, tokenizer, teacher_tokenizer)
    reward = None
    if metric is not None:
        from gkd.scoring import check_records, load_reward

        reward = load_reward(metric, "--metric")
    seq2seq = is_seq2seq(student)
    if isinstance(records, TokenizedDataset):
        data = TokenizedDataset(list(records.examples)[:num_prompts])
    else:
        data = tokenize_records(
            list(records)[:num_prompts],
            tokenizer,
            max_prompt_length=max_prompt_length,
            max_completion_length=max_new_tokens,
            source="the diagnose dataset",
            seq2seq=seq2seq,
            apply_chat_template=apply_chat_template,
        )
    examples = data.examples
    recs = [e.record for e in examples]
    if metric is not None:
        check_records(metric, recs, "--metric", as_reward=True)
    sampler = sampler or local_sampler("auto")
    pad, prompts, notes = tokenizer.pad_token_id, [e.prompt for e in examples], []
    texts_of = _texts(tokenizer, eos_ids(student, tokenizer))
    score = _scorer(reward, metric, recs)
    ts, ss = unwrap(teacher), unwrap(student)

    def run(model, greedy, rows=None, max_new=max_new_tokens):
        gen = torch.Generator(device=_device(model)).manual_seed(seed)
        rows = prompts if rows is None else rows
        return _sample(sampler, model, tokenizer, rows, max_new, temperature, greedy, gen, batch_size)

    with eval_mode(teacher), eval_mode(student):
        sampler.sync(ss)
        samples = run(ss, greedy=False)
        with_data = [i for i, e in enumerate(examples) if e.completion]
        sources: dict[str, list[dict]] = {}
        if with_data:
            sources["dataset"] = _force(
                ts,
                ss,
                [prompts[i] for i in with_data],
                [examples[i].completion for i in with_data],
                vocab,
                pad,
                batch_size,
            )
            if len(with_data) < len(examples):
                notes.append(
                    f"{len(examples) - len(with_data)} prompt-only records are left out of the dataset side"
                )
        else:
            notes.append("the records are prompt-only: divergence on dataset prefixes is skipped")
        sources["student"] = _force(ts, ss, prompts, samples, vocab, pad, batch_size)
        student_rows = sources["student"]
        lt = math.log(off_track)
        first_off = [
            next((j for j, lp in enumerate(r["teacher_logprob"]) if lp < lt), -1) for r in student_rows
        ]
        scores = None
        if score is not None:
            scores = {
                "metric": metric,
                "student_sample": _pct(score(range(len(examples)), texts_of(samples))),
                "student_greedy": _pct(score(range(len(examples)), texts_of(run(ss, greedy=True)))),
                "teacher_sample": _pct(score(range(len(examples)), texts_of(run(ts, greedy=False)))),
            }
        recovery = _recover(
            run,
            ts,
            ss,
            prompts,
            samples,
            first_off,
            score,
            texts_of,
            tokenizer,
            vocab,
            max_new_tokens,
            batch_size,
            seq2seq,
            notes,
        )
    n_tok = sum(len(r["teacher_logprob"]) for r in student_rows)
    off_tok = sum(sum(lp < lt for lp in r["teacher_logprob"]) for r in student_rows)
    firsts = sorted(f + 1 for f in first_off if f >= 0)
    result: dict[str, Any] = {
        "settings": {
            "metric": metric,
            "num_prompts": len(examples),
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "seed": seed,
            "batch_size": batch_size,
            "off_track": off_track,
        },
        "divergence": {name: _summary(rows) for name, rows in sources.items()},
        "by_position": _by_position(
            sources,
            first_off,
            max((len(s) for s in samples + [e.completion or [] for e in examples]), default=0),
        ),
        "scores": scores,
        "off_track": {
            "threshold": off_track,
            "sequences": len(student_rows),
            "sequences_off_track": len(firsts),
            "sequence_rate": _pct([f >= 0 for f in first_off]),
            "tokens": n_tok,
            "tokens_off_track": off_tok,
            "token_rate": 100.0 * off_tok / n_tok if n_tok else None,
            "first_position_mean": _mean(firsts),
            "first_position_median": firsts[len(firsts) // 2] if firsts else None,
        },
        "recovery": recovery,
        "notes": notes,
    }
    result["divergence"].setdefault("dataset", None)
    result["reading"] = reading(result)
    return result


def _texts(tok, eos):
    def texts(rows: list[list[int]]) -> list[str]:
        rows = [r[:-1] if r and r[-1] in eos else r for r in rows]
        return [t.strip() for t in tok.batch_decode(rows, skip_special_tokens=True)]

    return texts


def _scorer(reward, name, recs):
    """``(indices, texts) -> per-example scores`` of the metric on the records at ``indices`` (None: no metric)."""
    if reward is None:
        return None
    from gkd.metrics import prompt_text_of
    from gkd.rl import compute_rewards

    def prompt(r: dict) -> str:
        try:
            return prompt_text_of(r)
        except ValueError:
            return ""

    def score(indices, texts: list[str]) -> list[float]:
        rows = [recs[i] for i in indices]
        return compute_rewards(reward, name, [prompt(r) for r in rows], texts, rows).tolist() if rows else []

    return score


def _recover(
    run, ts, ss, prompts, samples, first_off, score, texts_of, tok, vocab, max_new, batch_size, seq2seq, notes
):
    """Continue each off-track sample's prefix (through its first off-track token) with the student and the teacher,
    greedy and sampled, and score the completed outputs (recovery rates) or, without a metric, the teacher's mean
    per-token log-prob of each continuation."""
    idx = [i for i, f in enumerate(first_off) if f >= 0]
    out: dict[str, Any] = {
        "prompts": len(idx),
        "kind": "recovery_rate" if score is not None else "teacher_logprob",
    }
    if seq2seq:
        notes.append("recovery needs a decoder-only model (a decoder prefix cannot be continued): skipped")
        out["prompts"] = 0
        return out
    eos = set(eos_ids(ss, tok))
    prefix = {i: samples[i][: first_off[i] + 1] for i in idx}
    room = {i: 0 if prefix[i][-1] in eos else max_new - len(prefix[i]) for i in idx}
    runs = {
        "student_greedy": (ss, True),
        "student_sample": (ss, False),
        "teacher_greedy": (ts, True),
        "teacher_sample": (ts, False),
    }
    for name, (model, greedy) in runs.items():
        cont: dict[int, list[int]] = {i: [] for i in idx}
        for r in sorted({room[i] for i in idx} - {0}):
            group = [i for i in idx if room[i] == r]
            rows = run(model, greedy, rows=[prompts[i] + prefix[i] for i in group], max_new=r)
            cont.update(zip(group, rows))
        if score is not None:
            out[name] = _pct(score(idx, texts_of([prefix[i] + cont[i] for i in idx])))
        else:
            keep = [i for i in idx if cont[i]]
            forced = _force(
                ts,
                ts,
                [prompts[i] + prefix[i] for i in keep],
                [cont[i] for i in keep],
                vocab,
                tok.pad_token_id,
                batch_size,
            )
            out[name] = _mean([x for f in forced for x in f["teacher_logprob"]])
    if score is not None:
        out["original_sample"] = _pct(score(idx, texts_of([samples[i] for i in idx])))
    else:
        notes.append(
            "no metric: recovery is the teacher's mean per-token log-prob of each continuation, not a rate"
        )
    return out


def format_report(result: dict[str, Any], max_rows: int = 16) -> str:
    """The console report of a :func:`diagnose` result: plain lines under 100 columns."""

    def f(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    lines = ["divergence (mean over completion positions; P teacher, Q student)"]
    lines.append(
        f"  {'prefixes':<10}{'seqs':>6}{'tokens':>8}{'KL(P|Q)':>10}{'KL(Q|P)':>10}{'NLL argmax':>12}"
    )
    for name in ("dataset", "student"):
        d = result["divergence"].get(name)
        if d is None:
            lines.append(f"  {name:<10}  skipped (prompt-only records)")
            continue
        stats = "".join(f"{f(d[k]):>{w}}" for k, w in zip(_STATS, (10, 10, 12)))
        lines.append(f"  {name:<10}{d['sequences']:>6}{d['tokens']:>8}{stats}")
    table = result["by_position"]
    step = max(1, math.ceil(len(table) / max_rows))
    lines.append(
        "by position (KL(P|Q) and count per source; first: samples whose first off-track token is here)"
    )
    lines.append(f"  {'pos':<8}{'dataset':>10}{'n':>6}{'student':>10}{'n':>6}{'first':>7}")
    for start in range(0, len(table), step):
        chunk = table[start : start + step]
        cells = []
        for name in ("dataset", "student"):
            n = sum(r.get(name, {}).get("count", 0) for r in chunk)
            tot = sum(r[name]["forward_kl"] * r[name]["count"] for r in chunk if r.get(name, {}).get("count"))
            cells += [f"{f(tot / n if n else None):>10}", f"{n:>6}"]
        pos = f"{chunk[0]['position']}" + (f"-{chunk[-1]['position']}" if len(chunk) > 1 else "")
        lines.append(f"  {pos:<8}{''.join(cells)}{sum(r['first_off_track'] for r in chunk):>7}")
    if result["scores"] is not None:
        s = result["scores"]
        lines.append(
            f"{s['metric']} (% per example): student sample {f(s['student_sample'], '.1f')}, "
            f"student greedy {f(s['student_greedy'], '.1f')}, teacher sample {f(s['teacher_sample'], '.1f')}"
        )
    o = result["off_track"]
    lines.append(
        f"off-track (teacher prob < {o['threshold']:g}): {o['sequences_off_track']}/{o['sequences']} samples "
        f"({f(o['sequence_rate'], '.1f')}%), {o['tokens_off_track']}/{o['tokens']} tokens ({f(o['token_rate'], '.2f')}%)"
    )
    lines.append(f"  first off-track token at position {f(o['first_position_mean'], '.1f')} on average")
    r = result["recovery"]
    unit, spec = (
        ("% that end right", ".1f") if r["kind"] == "recovery_rate" else ("teacher log-prob/token", ".3f")
    )
    if r["prompts"]:
        lines.append(f"recovery of the {r['prompts']} off-track prefixes ({unit}):")
        for who in ("student", "teacher"):
            lines.append(
                f"  {who:<8} greedy {f(r.get(who + '_greedy'), spec):>8}   sampled {f(r.get(who + '_sample'), spec):>8}"
            )
    for note in result["notes"]:
        lines.append(f"note: {note}")
    lines.append(f"reading [{result['reading']['verdict']}]:")
    import textwrap

    lines += textwrap.wrap(result["reading"]["text"], 96, initial_indent="  ", subsequent_indent="  ")
    return "\n".join(lines)
