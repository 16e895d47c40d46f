"""Measured error of the cross-tokenizer projection (gkd.align) against an exact sequence-level reference.

A case small enough to enumerate: texts over the alphabet {a, b}, at most ``--max-len`` characters, then EOS. The
teacher is a random language model over its *own* tokens (a table of random logits per token context, a penalty
on tokenizations of a string that are not its tokenizer's, EOS allowed anywhere, nothing past the length limit).
Enumerating every teacher token sequence gives the exact probability of every text; tokenizing every text with the
student's tokenizer (a real ``tokenizers`` BPE wrapped in ``PreTrainedTokenizerFast``) gives the exact
distribution of the student's next token after every student token prefix, ``P(s_n | s_<n)``: the target a
student must match for its sequences to have the teacher's text distribution.

The approximation sees what training sees: the text, both tokenizations and the teacher's distributions along the
teacher's tokenization of the text. At every student position it builds ``project_teacher`` and the loss
``projected_divergence`` against a student ``Q`` near the target (log of the target mixed with 10% uniform, plus
Gaussian noise of standard deviation 0.5 on the logits: full support, like a real model); the reference is the
registered divergence between the exact target and the same ``Q`` over the whole student vocabulary. Printed per
tokenizer pair and divergence: the mean exact loss; the absolute error of the loss, mean and max over positions
and mean weighted by the text's probability; the mean relative error of the gradient w.r.t. the student logits;
then the mean absolute error of three variants: ``fold="tail"``, a baseline without the chain rule (the teacher's
distribution at the position mapped by identical surface, the rest in the tail: the exact-match part of TRL's
GOLD), and ``adjacency`` (the default projection ``restrict``-ed to the tokens the student's tokenizer keeps
separate after the previous token, ``tokenize(prev + token) == [prev, token]``: what knowing the student's
tokenizer adds). Positions whose start leaves less room than the longest student plus the longest teacher token
before the length limit are left out (there the limit, not the tokenizers, shapes the target). Where the exact
target gives a token zero probability (the student's tokenizer never produces it after that prefix), the exact
reverse KL is infinite for any student with full support, and where the teacher's projection gives a category
zero probability, the approximate one is: such positions are counted and left out of that divergence's row.
Everything runs in float64.

    python benchmarks/xtok_error.py                # texts of <= 7 characters: about 1 min on 2 cores
    python benchmarks/xtok_error.py --max-len 9    # 4x the texts, about 1.5 min
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gkd.align import ProjectedTeacher, VocabPair, project_teacher, projected_divergence
from gkd.divergences import DIVERGENCES, get_divergence

EOS = "<eos>"
ALPHABET = "ab"

# Tokenizer pairs: (name, teacher merges, student merges); merges over ALPHABET, applied in order (BPE priority).
PAIRS = {
    "char teacher -> BPE student": ([], [("a", "b"), ("b", "a"), ("b", "b"), ("ab", "a")]),
    "BPE teacher -> char student": ([("a", "a"), ("a", "b"), ("b", "a")], []),
    "BPE -> BPE, other merges": (
        [("a", "a"), ("b", "a"), ("aa", "b")],
        [("a", "b"), ("b", "a"), ("b", "b"), ("ab", "a")],
    ),
    "same tokenizer, permuted ids": ([("a", "b"), ("b", "a")], [("a", "b"), ("b", "a")]),
}


def build_tokenizer(merges: list[tuple[str, str]], permute: bool = False):
    """A BPE tokenizer over ALPHABET with ``merges`` (no merges: character level), EOS as a special token."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokens = list(ALPHABET) + [x + y for x, y in merges]
    if permute:
        tokens = tokens[::-1]
    vocab = {EOS: 0} if not permute else {}
    for t in tokens:
        vocab[t] = len(vocab)
    if permute:
        vocab[EOS] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS)


class Tok:
    """A tokenizer's surfaces and a cached ``text -> (ids, spans)`` (EOS appended by the caller)."""

    def __init__(self, tokenizer) -> None:
        self.tk = tokenizer
        vocab = tokenizer.get_vocab()
        self.size = len(vocab)
        self.surfaces: list[str | None] = [None] * self.size
        for tok, i in vocab.items():
            self.surfaces[i] = tok
        self.eos = vocab[EOS]
        self._cache: dict[str, tuple[tuple[int, ...], tuple[tuple[int, int], ...]]] = {}

    def encode(self, text: str) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
        hit = self._cache.get(text)
        if hit is None:
            enc = self.tk(text, add_special_tokens=False, return_offsets_mapping=True)
            hit = (tuple(enc["input_ids"]), tuple(tuple(o) for o in enc["offset_mapping"]))
            self._cache[text] = hit
        return hit

    def max_len(self) -> int:
        return max(len(s) for s in self.surfaces if s and s != EOS)


@dataclass
class TeacherLM:
    """A random language model over a tokenizer's ids: ``logprobs(context)`` is a table entry per context."""

    tok: Tok
    max_len: int
    seed: int = 0
    scale: float = 1.5
    noncanonical: float = (
        -math.inf
    )  # logit penalty on a token that makes the context a non-canonical tokenization
    eos_bias: float = -1.0
    _cache: dict = field(default_factory=dict)

    def logprobs(self, context: tuple[int, ...]) -> np.ndarray:
        hit = self._cache.get(context)
        if hit is not None:
            return hit
        rng = np.random.default_rng([self.seed, zlib.crc32(repr(context).encode())])
        logits = rng.normal(size=self.tok.size) * self.scale
        text = "".join(self.tok.surfaces[i] for i in context)
        for i, s in enumerate(self.tok.surfaces):
            if i == self.tok.eos:
                logits[i] += self.eos_bias
            elif s is None or len(text) + len(s) > self.max_len:
                logits[i] = -math.inf
            elif self.tok.encode(text + s)[0] != (*context, i):
                logits[i] += self.noncanonical
        out = logits - np.logaddexp.reduce(logits)
        self._cache[context] = out
        return out

    def texts(self) -> dict[str, float]:
        """Every text (EOS-terminated) and its exact probability, summed over all token sequences that spell it."""
        probs: dict[str, float] = {}
        stack: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
        while stack:
            context, lp = stack.pop()
            row = self.logprobs(context)
            text = "".join(self.tok.surfaces[i] for i in context)
            for i in range(self.tok.size):
                if not math.isfinite(row[i]):
                    continue
                if i == self.tok.eos:
                    probs[text] = probs.get(text, 0.0) + math.exp(lp + row[i])
                else:
                    stack.append(((*context, i), lp + row[i]))
        return probs


def exact_targets(texts: dict[str, float], student: Tok) -> dict[tuple[int, ...], np.ndarray]:
    """``P(s_n | s_<n)`` for every student token prefix, from the exact text probabilities."""
    acc: dict[tuple[int, ...], np.ndarray] = {}
    for text, p in texts.items():
        ids = (*student.encode(text)[0], student.eos)
        for n in range(len(ids)):
            row = acc.setdefault(ids[:n], np.zeros(student.size))
            row[ids[n]] += p
    return {k: v / v.sum() for k, v in acc.items()}


@dataclass
class Case:
    name: str
    teacher: Tok
    student: Tok
    lm: TeacherLM
    texts: dict[str, float]
    targets: dict[tuple[int, ...], np.ndarray]
    pair: VocabPair
    max_len: int


def build_case(name: str, max_len: int = 7, seed: int = 0) -> Case:
    t_merges, s_merges = PAIRS[name]
    teacher = Tok(build_tokenizer(t_merges, permute=name.startswith("same")))
    student = Tok(build_tokenizer(s_merges))
    lm = TeacherLM(teacher, max_len, seed=seed)
    texts = lm.texts()
    pair = VocabPair(student.surfaces, teacher.surfaces, special={teacher.eos: student.eos})
    return Case(name, teacher, student, lm, texts, exact_targets(texts, student), pair, max_len)


def allowed_after(student: Tok, previous: list[int | None]) -> torch.Tensor:
    """``[N, V_s]``: the student tokens its tokenizer keeps as a separate token right after ``previous[n]``
    (``tokenize(prev + token) == [prev, token]``; everything after no previous token; EOS always)."""
    out = torch.ones(len(previous), student.size, dtype=torch.bool)
    for n, prev in enumerate(previous):
        if prev is None or prev == student.eos:
            continue
        for k, surface in enumerate(student.surfaces):
            if surface is None or k == student.eos:
                continue
            out[n, k] = student.encode(student.surfaces[prev] + surface)[0] == (prev, k)
    return out


def positions(case: Case, fold: str, baseline: bool = False, adjacency: bool = False):
    """(projected teacher, exact target log-probs [N, V_s]) over every eligible student position of every text."""
    limit = case.max_len - case.student.max_len() - case.teacher.max_len()
    sentinel = case.pair.special_surface(case.student.eos)
    parts, targets, weights = [], [], []
    for text in sorted(case.texts):
        t_ids, t_spans = case.teacher.encode(text)
        s_ids, s_spans = case.student.encode(text)
        end = (len(text), len(text) + len(sentinel))
        t_ids, t_spans = (*t_ids, case.teacher.eos), (*t_spans, end)
        s_ids, s_spans = (*s_ids, case.student.eos), (*s_spans, end)
        lp = torch.tensor(np.stack([case.lm.logprobs(t_ids[:j]) for j in range(len(t_ids))]))
        keep = [n for n in range(len(s_ids)) if s_spans[n][0] <= limit]
        if not keep:
            continue
        if baseline:
            proj = first_position_projection(case, s_spans, t_spans, lp)
        else:
            proj = project_teacher(case.pair, text + sentinel, s_spans, s_ids, t_spans, t_ids, lp, fold=fold)
        proj = proj.rows(keep)
        if adjacency:
            proj = proj.restrict(allowed_after(case.student, [s_ids[n - 1] if n else None for n in keep]))
        parts.append(proj)
        targets += [case.targets[s_ids[:n]] for n in keep]
        weights += [case.texts[text]] * len(keep)
    return ProjectedTeacher.cat(parts), torch.tensor(np.stack(targets)).log(), torch.tensor(weights)


def _rows(p: ProjectedTeacher, keep: list[int]) -> ProjectedTeacher:
    return ProjectedTeacher(p.ids[keep], p.logprobs[keep], p.mask[keep], p.tail[keep], p.valid[keep])


def first_position_projection(case: Case, s_spans, t_spans, lp: torch.Tensor) -> ProjectedTeacher:
    """The baseline: the teacher's distribution at the teacher token containing the student start, mapped by
    identical surface (no chain rule), everything else in the tail."""
    rows = []
    m_of = [next(j for j, (s, e) in enumerate(t_spans) if s <= a < e) for a, _ in s_spans]
    table = case.pair.teacher_to_student
    for m in m_of:
        named = table >= 0
        ids = table[named]
        rows.append(
            (ids, lp[m][named], torch.logsumexp(lp[m][~named], 0) if bool((~named).any()) else -math.inf)
        )
    k = max(r[0].numel() for r in rows)
    n = len(rows)
    out = ProjectedTeacher(
        ids=torch.zeros(n, k, dtype=torch.long),
        logprobs=torch.full((n, k), -math.inf, dtype=torch.float64),
        mask=torch.zeros(n, k, dtype=torch.bool),
        tail=torch.zeros(n, dtype=torch.float64),
        valid=torch.ones(n, dtype=torch.bool),
    )
    for i, (ids, vals, tail) in enumerate(rows):
        # several teacher ids may share a student id (not in these cases): keep the first, as a baseline would
        out.ids[i, : ids.numel()], out.logprobs[i, : ids.numel()], out.mask[i, : ids.numel()] = (
            ids,
            vals,
            True,
        )
        out.tail[i] = tail
    return out


def student_logits(
    target_logp: torch.Tensor, seed: int = 1, eps: float = 0.1, noise: float = 0.5
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixed = ((1 - eps) * target_logp.exp() + eps / target_logp.shape[-1]).log()
    return mixed + noise * torch.randn(mixed.shape, generator=g, dtype=mixed.dtype)


INFINITE = 1e20  # an exact loss above this is the floored log(0) of gkd.divergences: infinite


def errors(
    proj: ProjectedTeacher, target_logp: torch.Tensor, zs: torch.Tensor, weight: torch.Tensor, name: str
) -> dict[str, float]:
    """Per divergence: mean exact loss, mean / max / probability-weighted absolute loss error, mean relative
    gradient error, and the positions left out because the exact or the approximate loss is infinite."""
    div = get_divergence(name)
    z1 = zs.clone().requires_grad_(True)
    approx = projected_divergence(z1, proj, div)
    (g_approx,) = torch.autograd.grad(approx.sum(), z1)
    z2 = zs.clone().requires_grad_(True)
    exact = div(z2, target_logp)
    (g_exact,) = torch.autograd.grad(exact.sum(), z2)
    exact, approx = exact.detach(), approx.detach()
    exact_inf, approx_inf = exact >= INFINITE, approx >= INFINITE
    ok = ~exact_inf & ~approx_inf
    err = (approx - exact).abs()[ok]
    grad = ((g_approx - g_exact).norm(dim=-1) / g_exact.norm(dim=-1).clamp(min=1e-300))[ok]
    w = weight[ok] / weight[ok].sum()
    return {
        "exact": float(exact[ok].mean()),
        "mean": float(err.mean()),
        "max": float(err.max()),
        "weighted": float((w * err).sum()),
        "grad": float(grad.mean()),
        "exact_inf": int(exact_inf.sum()),
        "approx_inf": int((approx_inf & ~exact_inf).sum()),
        "n": int(ok.numel()),
    }


VARIANTS = ("prefix", "tail", "baseline", "adjacency")


def measure(
    name: str, max_len: int = 7, seed: int = 0, variants: tuple[str, ...] = VARIANTS
) -> dict[str, dict[str, dict[str, float]]]:
    """{divergence: {variant: errors}} for one tokenizer pair; variants: "prefix" (the default projection), "tail"
    (fold="tail"), "baseline" (no chain rule), "adjacency" (prefix, restricted to the tokens the student's tokenizer
    keeps separate after the previous token)."""
    case = build_case(name, max_len, seed)
    out: dict[str, dict[str, dict[str, float]]] = {d: {} for d in DIVERGENCES}
    zs = None
    for label in variants:
        proj, target, weight = positions(
            case,
            "tail" if label == "tail" else "prefix",
            baseline=label == "baseline",
            adjacency=label == "adjacency",
        )
        if zs is None:
            zs = student_logits(target, seed=seed + 1)
        for d in DIVERGENCES:
            out[d][label] = errors(proj, target, zs, weight, d)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-len", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    for name in PAIRS:
        res = measure(name, args.max_len, args.seed)
        any_d = next(iter(res))
        print(
            f"\n## {name}   ({res[any_d]['prefix']['n']} student positions, texts of <= {args.max_len} chars)"
        )
        print(
            f"{'divergence':<16} {'exact':>7} {'|err| mean':>10} {'max':>8} {'weighted':>9} {'grad err':>9} "
            f"{'tail':>9} {'baseline':>9} {'adjacency':>9} {'inf: exact / approx':>19}"
        )
        for d, r in res.items():
            p, t, b, c = r["prefix"], r["tail"], r["baseline"], r["adjacency"]
            print(
                f"{d:<16} {p['exact']:>7.4f} {p['mean']:>10.2e} {p['max']:>8.2e} {p['weighted']:>9.2e} "
                f"{p['grad']:>9.2e} {t['mean']:>9.2e} {b['mean']:>9.2e} {c['mean']:>9.2e} "
                f"{p['exact_inf']:>11} / {p['approx_inf']:<5}"
            )
    print(
        "\nexact: mean exact loss; |err|: |approximate - exact| loss, mean and max over positions, and mean weighted "
        "by the text's probability; grad err: mean |g_approx - g_exact| / |g_exact| (w.r.t. the student logits); "
        "tail: |err| mean with fold='tail'; baseline: |err| mean without the chain rule; adjacency: |err| mean "
        "restricted to the tokens the student's tokenizer keeps after the previous one; inf: positions left out "
        "because the exact (or only the approximate) loss is infinite"
    )
    print(f"time={time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
