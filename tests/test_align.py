"""Tests of ``gkd.align``: the vocabulary map and its coverage, the alignment of two tokenizations by offsets, the
projection of the teacher onto the student's vocabulary, and its loss for every registered divergence.

The three cases of docs/teachers.md ("Another tokenizer"): the same tokens under other ids (equal to the
same-tokenizer loss and gradients to 1e-6), a teacher vocabulary that holds the student's plus extra tokens (exact
on the shared tokens, the extra mass in one tail bucket, against a float64 reference written here), and different
segmentations (an approximation whose error against an exact sequence-level reference is measured by
``benchmarks/xtok_error.py`` and bounded here).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from gkd.align import (
    Coverage,
    ProjectedTeacher,
    VocabPair,
    align_spans,
    project_teacher,
    projected_divergence,
    spans_from_surfaces,
)
from gkd.divergences import DIVERGENCES, get_divergence
from gkd.losses import LossTerms, logits_loss
from gkd.outputs import TeacherTopK

ROOT = Path(__file__).resolve().parent.parent

# Every registered divergence with the parameters under test (a divergence registered without a case here fails
# test_every_divergence_is_covered).
CASES: list[tuple[str, dict[str, object]]] = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.9}),
    ("jsd", {"beta": 0.1, "normalize": True}),
    ("tvd", {}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.3}),
]
IDS = [f"{n}{''.join(f'-{k}={v}' for k, v in p.items())}" for n, p in CASES]


def _xlogy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x * torch.log(torch.where(x > 0, y, torch.ones_like(y))), torch.zeros_like(x))


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (_xlogy(a, a) - _xlogy(a, b)).sum(-1)


def reference(name: str, p: torch.Tensor, q: torch.Tensor, **params: object) -> torch.Tensor:
    """The divergence of probability vectors ``p`` (teacher) and ``q`` (student), written from the definitions in
    float64, independently of gkd.divergences."""
    p, q = p.double(), q.double()
    if name == "forward_kl":
        return _kl(p, q)
    if name == "reverse_kl":
        return _kl(q, p)
    if name == "jsd":
        beta = float(params.get("beta", 0.5))
        m = beta * p + (1 - beta) * q
        value = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
        return value / (beta * (1 - beta)) if params.get("normalize") else value
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "skew_forward_kl":
        alpha = float(params.get("alpha", 0.1))
        return _kl(p, alpha * p + (1 - alpha) * q)
    if name == "skew_reverse_kl":
        alpha = float(params.get("alpha", 0.1))
        return _kl(q, alpha * q + (1 - alpha) * p)
    raise KeyError(name)


def test_every_divergence_is_covered():
    assert {n for n, _ in CASES} == set(DIVERGENCES)


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary mapping and coverage
# ---------------------------------------------------------------------------------------------------------------


def test_vocabulary_map_and_coverage():
    student = ["<eos>", "a", "b", "ab", "xyz", "ab"]  # "ab" twice: teacher tokens map to the lowest id
    teacher = ["b", "abc", "<|end|>", "a", "ab", None, "q"]
    pair = VocabPair(student, teacher, special={2: 0})
    assert pair.teacher_to_student.tolist() == [2, -1, 0, 1, 3, -1, -1]
    assert pair.teacher_to_student_prefix.tolist() == [
        2,
        3,
        0,
        1,
        3,
        -1,
        -1,
    ]  # "abc" starts with student "ab"
    cov = pair.coverage()
    # student: <eos>, a, b, ab, ab map (5 of 6 tokens; "xyz" does not); teacher: 4 of 6 with a surface
    assert (cov.student_tokens, cov.student_mapped, cov.teacher_tokens, cov.teacher_mapped) == (6, 5, 6, 4)
    assert cov.student_share == pytest.approx(5 / 6) and cov.teacher_share == pytest.approx(4 / 6)
    assert (
        "83.3% of the student's 6 tokens" in cov.describe() and "66.7% of the teacher's 6" in cov.describe()
    )
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.1, 0.1, 0.0, 0.2], [0.0, 0.5, 0.0, 0.0, 0.5, 0.0, 0.0]])
    mass = pair.mass_coverage(probs.clamp(min=1e-300).log())
    assert mass.teacher_mass == pytest.approx((0.6 + 0.5) / 2)
    assert "55.0% of the teacher's probability mass" in mass.describe()
    assert isinstance(mass, Coverage) and mass.student_mapped == 5


def test_vocabulary_surfaces_must_share_a_type():
    with pytest.raises(TypeError, match="all be str or all be bytes"):
        VocabPair(["a"], [b"a"])
    with pytest.raises(ValueError, match="outside the vocabularies"):
        VocabPair(["a"], ["a"], special={3: 0})


# ---------------------------------------------------------------------------------------------------------------
# Alignment by offsets
# ---------------------------------------------------------------------------------------------------------------


def test_alignment_same_tokenization_is_all_matched():
    spans = spans_from_surfaces(["ab", "c", "de"])
    al = align_spans(spans, spans)
    assert al.matched.all() and al.start_matched.all()
    assert al.teacher_index.tolist() == [0, 1, 2] and al.teacher_stop.tolist() == [1, 2, 3]
    assert (
        al.describe()
        == "3 of 3 student positions matched (same span), 3 start on a teacher boundary, 0 without a teacher token"
    )


def test_alignment_student_token_spanning_several_teacher_tokens():
    # word-level student, character-level teacher
    al = align_spans(spans_from_surfaces(["abc", "d"]), spans_from_surfaces(list("abcd")))
    assert al.teacher_index.tolist() == [0, 3]
    assert al.start_matched.tolist() == [True, True] and al.matched.tolist() == [False, True]
    assert al.teacher_stop.tolist() == [3, 4]  # the spine of "abc" is teacher tokens 0:3


def test_alignment_teacher_token_spanning_several_student_tokens():
    al = align_spans(spans_from_surfaces(list("abcd")), spans_from_surfaces(["abc", "d"]))
    assert al.teacher_index.tolist() == [0, 0, 0, 1]
    assert al.start_matched.tolist() == [True, False, False, True]
    assert al.matched.tolist() == [False, False, False, True]


def test_alignment_empty_completion_and_gaps():
    empty = align_spans([], spans_from_surfaces(["a"]))
    assert empty.teacher_index.numel() == 0 and empty.matched.numel() == 0
    none = align_spans(spans_from_surfaces(["a"]), [])
    assert none.teacher_index.tolist() == [-1] and not none.start_matched.any()
    # a teacher that skipped the space (a whitespace pre-tokenizer): the student's " b" starts in the gap
    al = align_spans([(0, 1), (1, 3)], [(0, 1), (2, 3)])
    assert al.teacher_index.tolist() == [0, -1]


def test_alignment_rejects_spans_it_cannot_align():
    with pytest.raises(ValueError, match="zero-width"):
        align_spans([(0, 0)], [(0, 1)])
    with pytest.raises(ValueError, match="must not overlap"):
        align_spans([(0, 2), (1, 3)], [(0, 3)])
    # byte-level tokens inside one character given character offsets: both claim the same character
    with pytest.raises(ValueError, match="must not overlap"):
        align_spans([(0, 1)], [(0, 1), (0, 1)])


def test_alignment_unicode_characters_and_bytes():
    text = "naïve 日本語"
    word = ["naïve", " 日本", "語"]
    assert "".join(word) == text
    al = align_spans(spans_from_surfaces(word), spans_from_surfaces(list(text)))
    assert al.teacher_index.tolist() == [0, 5, 8] and al.teacher_stop.tolist() == [5, 8, 9]
    # the same text in bytes: a byte-level teacher against the student's characters
    student = [w.encode() for w in word]
    teacher = [bytes([b]) for b in text.encode()]
    al = align_spans(spans_from_surfaces(student), spans_from_surfaces(teacher))
    assert al.teacher_index.tolist() == [0, 6, 13] and al.teacher_stop.tolist() == [6, 13, 16]
    assert al.start_matched.all() and not al.matched.any()


# ---------------------------------------------------------------------------------------------------------------
# Case 1: the same tokens under other ids
# ---------------------------------------------------------------------------------------------------------------


def _permuted_case(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = ["<eos>", "a", "b", "c", "ab", "bc", "ca", "abc", "é", "日本"]
    perm = torch.randperm(len(student), generator=g)  # teacher id t is student token perm[t]
    teacher = [student[int(i)] for i in perm]
    eos_t = teacher.index("<eos>")
    pair = VocabPair(student, teacher, special={eos_t: 0})
    words = ["abc", "a", "日本", "bc", "é", "ca", "b"]
    sentinel = pair.special_surface(0)
    text = "".join(words) + sentinel
    s_ids = [student.index(w) for w in words] + [0]
    t_ids = [teacher.index(w) for w in words] + [eos_t]
    spans = spans_from_surfaces([*words, sentinel])
    zt = torch.randn(len(s_ids), len(student), generator=g, dtype=dtype) * 2  # teacher logits, student order
    inverse = torch.argsort(perm)
    teacher_logits = zt[:, perm]  # teacher order: column t holds student token perm[t]
    assert torch.equal(teacher_logits[:, inverse], zt)
    zs = torch.randn(len(s_ids), len(student), generator=g, dtype=dtype)
    return pair, text, spans, s_ids, t_ids, teacher_logits, zt, zs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_permuted_vocabulary_equals_the_same_tokenizer_path(name, params, temperature, dtype):
    pair, text, spans, s_ids, t_ids, teacher_logits, zt, zs = _permuted_case(dtype)
    div = get_divergence(name, **params)
    teacher_lp = torch.log_softmax(teacher_logits / temperature, -1)
    proj = project_teacher(pair, text, spans, s_ids, spans, t_ids, teacher_lp)
    assert proj.valid.all() and bool(torch.isinf(proj.tail).all())
    weights = torch.rand(len(s_ids), generator=torch.Generator().manual_seed(1), dtype=dtype)

    z1 = zs.clone().requires_grad_(True)
    ours = (weights * projected_divergence(z1, proj, div, temperature=temperature)).sum()
    (g1,) = torch.autograd.grad(ours, z1)
    z2 = zs.clone().requires_grad_(True)
    same = logits_loss(
        z2, LossTerms(divergence=weights), divergence=div, teacher_logits=zt, temperature=temperature
    )
    (g2,) = torch.autograd.grad(same, z2)
    torch.testing.assert_close(ours, same.to(ours.dtype), rtol=0, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-6)

    # The existing top-k path consumes the projection as it is (the support is the whole vocabulary).
    z3 = zs.clone().requires_grad_(True)
    topk = logits_loss(
        z3,
        LossTerms(divergence=weights),
        divergence=div,
        teacher_topk=proj.to_topk(),
        temperature=temperature,
    )
    (g3,) = torch.autograd.grad(topk, z3)
    torch.testing.assert_close(topk, same, rtol=0, atol=1e-6)
    torch.testing.assert_close(g3, g2, rtol=0, atol=1e-6)


def test_permuted_vocabulary_loss_is_zero_when_the_student_is_the_teacher():
    pair, text, spans, s_ids, t_ids, teacher_logits, zt, _ = _permuted_case(torch.float64)
    proj = project_teacher(pair, text, spans, s_ids, spans, t_ids, torch.log_softmax(teacher_logits, -1))
    for name, params in CASES:
        values = projected_divergence(zt, proj, get_divergence(name, **params))
        assert values.abs().max() < 1e-12, name


# ---------------------------------------------------------------------------------------------------------------
# Case 2: the teacher's vocabulary is the student's plus extra tokens
# ---------------------------------------------------------------------------------------------------------------

STUDENT2 = ["<eos>", "a", "b", "c", "ab", "bc"]
EXTRA2 = ["abc", "ca", "zz", "bca"]  # "zz" starts with no student token; the others do
LONGEST_PREFIX2 = {"abc": "ab", "ca": "c", "zz": None, "bca": "bc"}


def _superset_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    teacher = [*EXTRA2[:2], *STUDENT2[::-1], *EXTRA2[2:]]  # other ids, extra tokens interleaved
    eos_t = teacher.index("<eos>")
    pair = VocabPair(STUDENT2, teacher, special={eos_t: 0})
    words = ["ab", "c", "a", "bc", "b"]  # the same segmentation on both sides
    sentinel = pair.special_surface(0)
    spans = spans_from_surfaces([*words, sentinel])
    s_ids = [STUDENT2.index(w) for w in words] + [0]
    t_ids = [teacher.index(w) for w in words] + [eos_t]
    teacher_lp = torch.log_softmax(
        torch.randn(len(t_ids), len(teacher), generator=g, dtype=torch.float64) * 2, -1
    )
    zs = torch.randn(len(s_ids), len(STUDENT2), generator=g, dtype=torch.float64)
    return pair, teacher, "".join(words) + sentinel, spans, s_ids, t_ids, teacher_lp, zs


def _superset_reference(teacher: list[str], teacher_lp: torch.Tensor, fold: str):
    """(P over the student's tokens plus a tail, teacher mass of the tail) computed from the surfaces directly."""
    p = teacher_lp.exp()
    n = p.shape[0]
    out = torch.zeros(n, len(STUDENT2) + 1, dtype=torch.float64)
    for t, surface in enumerate(teacher):
        if surface in STUDENT2:
            out[:, STUDENT2.index(surface)] += p[:, t]
        elif fold == "prefix" and LONGEST_PREFIX2[surface] is not None:
            out[:, STUDENT2.index(LONGEST_PREFIX2[surface])] += p[:, t]
        else:
            out[:, -1] += p[:, t]
    return out


@pytest.mark.parametrize("fold", ["tail", "prefix"])
@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_superset_vocabulary_is_exact_on_shared_tokens_with_one_tail(name, params, fold):
    pair, teacher, text, spans, s_ids, t_ids, teacher_lp, zs = _superset_case()
    proj = project_teacher(pair, text, spans, s_ids, spans, t_ids, teacher_lp, fold=fold)
    ref_p = _superset_reference(teacher, teacher_lp, fold)
    tau = ref_p[:, -1]
    if fold == "tail":
        assert (tau > 0.05).all()  # the extra tokens carry real mass
        # exact on the shared tokens: the projected log-probs are the teacher's own, re-indexed
        for i in range(len(s_ids)):
            for k, sid in enumerate(proj.ids[i][proj.mask[i]].tolist()):
                tid = teacher.index(STUDENT2[sid])
                assert float(proj.logprobs[i, k]) == float(teacher_lp[i, tid])
    torch.testing.assert_close(proj.tail.exp(), tau, rtol=1e-12, atol=1e-15)

    # float64 reference: P~ = (P on the student's tokens, tau), Q~ = ((1 - tau) Q, tau)
    z_ref = zs.clone().requires_grad_(True)
    q = torch.softmax(z_ref, -1)
    q_ref = torch.cat([(1 - tau)[:, None] * q, tau[:, None]], -1)
    expected = reference(name, ref_p, q_ref, **params)
    (g_ref,) = torch.autograd.grad(expected.sum(), z_ref)
    z = zs.clone().requires_grad_(True)
    ours = projected_divergence(z, proj, get_divergence(name, **params))
    (g,) = torch.autograd.grad(ours.sum(), z)
    torch.testing.assert_close(ours, expected.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)

    # ... which is (1 - tau) D(P(. | shared) || Q): the tail neither rewards nor punishes the student.
    conditional = ref_p[:, :-1] / (1 - tau)[:, None]
    scaled = (1 - tau) * reference(name, conditional, torch.softmax(zs, -1), **params)
    torch.testing.assert_close(ours.detach(), scaled, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Case 3: different segmentations, by hand on small examples
# ---------------------------------------------------------------------------------------------------------------


def _rows_as_dicts(proj: ProjectedTeacher, surfaces: list) -> list[dict]:
    out = []
    for i in range(proj.ids.shape[0]):
        row = {
            surfaces[int(s)]: math.exp(float(v))
            for s, v, m in zip(proj.ids[i], proj.logprobs[i], proj.mask[i])
            if m
        }
        row["<tail>"] = math.exp(float(proj.tail[i]))
        out.append(row)
    return out


def test_word_student_over_character_teacher_uses_the_chain_rule():
    # teacher: characters a, b (+ EOS); student: a, b, ab, ba (+ EOS); text "ab" then EOS.
    student = ["<eos>", "a", "b", "ab", "ba"]
    teacher = ["a", "b", "<eos>"]
    pair = VocabPair(student, teacher, special={2: 0})
    sent = pair.special_surface(0)
    p = torch.tensor(
        [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]], dtype=torch.float64
    )  # at "", "a", "ab"
    proj = project_teacher(
        pair, "ab" + sent, [(0, 2), (2, 3)], [3, 0], [(0, 1), (1, 2), (2, 3)], [0, 1, 2], p.log()
    )
    row = _rows_as_dicts(proj, pair.student_surfaces)[0]
    # "ab" = P(a) P(b | a) (the chain rule); "b" and EOS: the first step off the text; "a" then "a" or EOS: the
    # longest student token that starts "aa" / "a<eos>" is "a".
    assert row["ab"] == pytest.approx(0.6 * 0.7)
    assert row["b"] == pytest.approx(0.3) and row[sent] == pytest.approx(0.1)
    assert row["a"] == pytest.approx(0.6 * 0.2 + 0.6 * 0.1)
    assert row["<tail>"] == 0 and sum(row.values()) == pytest.approx(1.0)
    # categories: "ba" begins with the teacher's "b", a leaf whose label is "b", so it joins "b"
    assert proj.members[0].tolist() == [0, 1, 2, 3, 2]
    # with fold="tail" the strings "aa..." and "a<eos>" (not student tokens) are the tail
    tail = _rows_as_dicts(
        project_teacher(
            pair,
            "ab" + sent,
            [(0, 2), (2, 3)],
            [3, 0],
            [(0, 1), (1, 2), (2, 3)],
            [0, 1, 2],
            p.log(),
            fold="tail",
        ),
        pair.student_surfaces,
    )[0]
    assert tail["<tail>"] == pytest.approx(0.6 * 0.3) and "a" not in tail


def test_character_student_under_word_teacher_conditions_on_what_is_written():
    # teacher: a, b, ab, abb (+ EOS); student: characters; text "ab" then EOS. The teacher's "ab" straddles the
    # student boundary at 1: there the teacher tokens that start with "a" are kept and renormalised.
    student = ["<eos>", "a", "b"]
    teacher = ["a", "b", "ab", "abb", "<eos>"]
    pair = VocabPair(student, teacher, special={4: 0})
    sent = pair.special_surface(0)
    p0 = torch.tensor([0.1, 0.2, 0.4, 0.2, 0.1], dtype=torch.float64)  # at "": predicts "ab"
    p1 = torch.tensor([0.3, 0.3, 0.1, 0.1, 0.2], dtype=torch.float64)  # at "ab": predicts EOS
    proj = project_teacher(
        pair,
        "ab" + sent,
        [(0, 1), (1, 2), (2, 3)],
        [1, 2, 0],
        [(0, 2), (2, 3)],
        [2, 4],
        torch.stack([p0, p1]).log(),
    )
    rows = _rows_as_dicts(proj, pair.student_surfaces)
    # position 0 (start matched): "a", "ab", "abb" all begin with the student's "a"
    assert rows[0]["a"] == pytest.approx(0.1 + 0.4 + 0.2) and rows[0]["b"] == pytest.approx(0.2)
    # position 1: kept "a" (ends at the boundary: unknown, tail), "ab" (realized: "b"), "abb" ("bb" -> "b")
    kept = 0.1 + 0.4 + 0.2
    assert rows[1]["b"] == pytest.approx((0.4 + 0.2) / kept) and rows[1]["<tail>"] == pytest.approx(
        0.1 / kept
    )
    assert rows[2][sent] == pytest.approx(0.2) and rows[2]["a"] == pytest.approx(0.3 + 0.1 + 0.1)
    assert proj.valid.all()


def test_unicode_and_bytes_give_the_same_projection():
    # A character-level teacher and a word-level student over "é日本": once in characters, once in UTF-8 bytes with a
    # teacher of one token per character (its surface is the character's bytes).
    chars = ["é", "日", "本", "x"]
    words = ["é", "日本", "x", "日"]
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(3, len(chars) + 1, generator=g, dtype=torch.float64), -1)
    results = []
    for enc in (lambda s: s, lambda s: s.encode()):
        student = [enc("<eos>"), *[enc(w) for w in words]]
        teacher = [*[enc(c) for c in chars], enc("<eos>")]
        pair = VocabPair(student, teacher, special={len(chars): 0})
        text = enc("é日本")
        s_spans = spans_from_surfaces([enc("é"), enc("日本")])
        t_spans = spans_from_surfaces([enc("é"), enc("日"), enc("本")])
        proj = project_teacher(pair, text, s_spans, [1, 2], t_spans, [0, 1, 2], lp)
        results.append(proj)
    a, b = results
    assert torch.equal(a.ids, b.ids) and torch.equal(a.mask, b.mask) and torch.equal(a.members, b.members)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=0)
    # the realized "日本" (student id 2) at position 1: P(日) P(本 | 日)
    k = a.ids[1].tolist().index(2)
    assert float(a.logprobs[1, k]) == pytest.approx(float(lp[1, 1] + lp[2, 2]))


def test_every_row_holds_all_the_teacher_mass():
    """Leaves partition the teacher's mass: support plus tail sum to one at every position, whatever the pair."""
    student = ["<eos>", "a", "b", "c", "ab", "bca", "cc"]
    teacher = ["a", "b", "c", "bc", "abc", "ca", "<eos>"]
    pair = VocabPair(student, teacher, special={6: 0})
    sent = pair.special_surface(0)
    text = "abcabcc"
    s_words = ["ab", "c", "ab", "c", "c"]
    t_words = ["abc", "a", "bc", "c"]
    assert "".join(s_words) == "".join(t_words) == text
    g = torch.Generator().manual_seed(3)
    lp = torch.log_softmax(
        torch.randn(len(t_words) + 1, len(teacher), generator=g, dtype=torch.float64) * 2, -1
    )
    for fold in ("prefix", "tail"):
        proj = project_teacher(
            pair,
            text + sent,
            spans_from_surfaces([*s_words, sent]),
            [student.index(w) for w in s_words] + [0],
            spans_from_surfaces([*t_words, sent]),
            [teacher.index(w) for w in t_words] + [6],
            lp,
            fold=fold,
        )
        total = torch.logsumexp(torch.cat([proj.logprobs, proj.tail[:, None]], -1), -1).exp()
        torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)
        # every support id is its own category; every other member points at a support id
        for i in range(proj.ids.shape[0]):
            support = set(proj.ids[i][proj.mask[i]].tolist())
            members = proj.members[i]
            assert all(int(members[s]) == s for s in support)
            assert set(members[members >= 0].tolist()) <= support


def test_top_k_teacher_puts_the_unseen_mass_in_the_tail():
    student = ["<eos>", "a", "b", "ab"]
    teacher = ["a", "b", "<eos>"]
    pair = VocabPair(student, teacher, special={2: 0})
    sent = pair.special_surface(0)
    full = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]], dtype=torch.float64).log()
    top2 = full.topk(2, -1)
    proj = project_teacher(
        pair,
        "ab" + sent,
        [(0, 2), (2, 3)],
        [3, 0],
        [(0, 1), (1, 2), (2, 3)],
        [0, 1, 2],
        TeacherTopK(top2.indices, top2.values),
    )
    row = _rows_as_dicts(proj, pair.student_surfaces)[0]
    # depth 0 keeps a (0.5, the spine) and b (0.3): EOS's 0.2 is unseen; depth 1 keeps b (0.6, realized), EOS (0.3)
    assert row["b"] == pytest.approx(0.3) and row["ab"] == pytest.approx(0.5 * 0.6)
    assert row["a"] == pytest.approx(0.5 * 0.3)  # "a" then EOS
    assert row["<tail>"] == pytest.approx(0.2 + 0.5 * 0.1)
    # a realized token outside the row: the chain stops, its mass is in the row's tail
    full[1] = torch.tensor([0.6, 0.1, 0.3], dtype=torch.float64).log()  # the top-1 after "a" is "a", not "b"
    top1 = full.topk(1, -1)
    stop = project_teacher(
        pair,
        "ab" + sent,
        [(0, 2), (2, 3)],
        [3, 0],
        [(0, 1), (1, 2), (2, 3)],
        [0, 1, 2],
        TeacherTopK(top1.indices, top1.values),
    )
    row = _rows_as_dicts(stop, pair.student_surfaces)[0]
    assert "ab" not in row and row["a"] == pytest.approx(0.5 * 0.6)
    assert row["<tail>"] == pytest.approx(0.5 + 0.5 * 0.4)


def test_positions_without_a_teacher_and_empty_completions_contribute_nothing():
    student = ["<eos>", "a", " b"]
    teacher = ["a", "b", "<eos>"]
    pair = VocabPair(student, teacher)
    lp = torch.log_softmax(torch.randn(2, 3, dtype=torch.float64), -1)
    # the teacher skipped the space: the student's " b" starts where no teacher token is
    proj = project_teacher(pair, "a b", [(0, 1), (1, 3)], [1, 2], [(0, 1), (2, 3)], [0, 1], lp)
    assert proj.valid.tolist() == [True, False]
    z = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    for name, params in CASES:
        values = projected_divergence(z, proj, get_divergence(name, **params))
        (g,) = torch.autograd.grad(values.sum(), z)
        assert values[1] == 0 and bool(torch.isfinite(g).all()) and bool((g[1] == 0).all())
    empty = project_teacher(pair, "", [], [], [], [], torch.zeros(0, 3, dtype=torch.float64))
    assert empty.ids.shape == (0, 0)
    z = torch.zeros(0, 3, requires_grad=True)
    assert projected_divergence(z, empty, "forward_kl").shape == (0,)


def test_restrict_drops_tokens_and_penalises_the_students_mass_on_them():
    pair, text, spans, s_ids, t_ids, teacher_logits, zt, zs = _permuted_case(torch.float64)
    lp = torch.log_softmax(teacher_logits, -1)
    proj = project_teacher(pair, text, spans, s_ids, spans, t_ids, lp)
    allowed = torch.ones(len(s_ids), pair.student_size, dtype=torch.bool)
    allowed[:, 3] = False  # student token "c" can never come next
    restricted = proj.restrict(allowed)
    p = torch.softmax(zt, -1)
    p_ref = torch.cat([p[:, [i for i in range(p.shape[1]) if i != 3]], torch.zeros(p.shape[0], 1)], -1)
    p_ref = p_ref / p_ref.sum(-1, keepdim=True)
    q = torch.softmax(zs, -1)
    q_ref = torch.cat([q[:, [i for i in range(q.shape[1]) if i != 3]], q[:, [3]]], -1)
    for name, params in CASES:
        ours = projected_divergence(zs, restricted, get_divergence(name, **params))
        expected = reference(name, p_ref, q_ref, **params)
        finite = expected < 1e20
        torch.testing.assert_close(ours[finite], expected[finite], rtol=1e-9, atol=1e-12)


def test_projected_divergence_takes_a_bound_temperature_and_rejects_unknown_functions():
    pair, text, spans, s_ids, t_ids, teacher_logits, _, zs = _permuted_case(torch.float64)
    proj = project_teacher(pair, text, spans, s_ids, spans, t_ids, torch.log_softmax(teacher_logits / 2, -1))
    bound = projected_divergence(zs, proj, get_divergence("jsd", beta=0.3, temperature=2.0))
    passed = projected_divergence(zs, proj, get_divergence("jsd", beta=0.3), temperature=2.0)
    torch.testing.assert_close(bound, passed, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a registered divergence"):
        projected_divergence(zs, proj, lambda s, t, temperature=1.0: (s - t).sum(-1))
    with pytest.raises(ValueError, match="fold must be one of"):
        project_teacher(pair, text, spans, s_ids, spans, t_ids, teacher_logits, fold="drop")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# Case 3, measured: the approximation against the exact sequence-level reference (benchmarks/xtok_error.py)
# ---------------------------------------------------------------------------------------------------------------

# Mean absolute loss error over positions, measured by `python benchmarks/xtok_error.py` (texts of <= 7
# characters) and pasted in docs/teachers.md. The test allows 25% above these (a regression guard) and, as a bound
# that owes nothing to the measurement, requires the projection to beat the baseline without the chain rule,
# except where docs/teachers.md says it does not.
MEASURED = {
    "char teacher -> BPE student": {
        "forward_kl": 2.67e-01,
        "reverse_kl": 3.81e-02,
        "jsd": 4.66e-02,
        "tvd": 1.20e-01,
        "skew_forward_kl": 1.68e-01,
        "skew_reverse_kl": 1.45e-01,
    },
    "BPE teacher -> char student": {
        "forward_kl": 1.03e-01,
        "reverse_kl": 7.49e-02,
        "jsd": 2.13e-02,
        "tvd": 7.87e-02,
        "skew_forward_kl": 7.32e-02,
        "skew_reverse_kl": 6.83e-02,
    },
    "BPE -> BPE, other merges": {
        "forward_kl": 1.44e-01,
        "reverse_kl": 2.19e-01,
        "jsd": 3.35e-02,
        "tvd": 7.82e-02,
        "skew_forward_kl": 1.07e-01,
        "skew_reverse_kl": 1.18e-01,
    },
}
BASELINE_BETTER = {("BPE -> BPE, other merges", "reverse_kl")}


def _benchmark():
    spec = importlib.util.spec_from_file_location("xtok_error", ROOT / "benchmarks" / "xtok_error.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("xtok_error", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def measured():
    bench = _benchmark()
    names = [*MEASURED, "same tokenizer, permuted ids"]
    return {name: bench.measure(name, max_len=7, variants=("prefix", "baseline")) for name in names}


def test_reference_is_exact_for_the_same_tokenizer(measured):
    """The enumeration and the projection agree to rounding when the tokenizers are the same (other ids)."""
    for name, r in measured["same tokenizer, permuted ids"].items():
        assert r["prefix"]["max"] < 1e-12, name
        assert r["prefix"]["grad"] < 1e-12, name


@pytest.mark.parametrize("pair_name", list(MEASURED))
def test_approximation_error_is_below_its_documented_bound(measured, pair_name):
    for name in DIVERGENCES:
        r = measured[pair_name][name]
        ours, baseline = r["prefix"]["mean"], r["baseline"]["mean"]
        if (pair_name, name) not in BASELINE_BETTER:
            assert ours < baseline, f"{pair_name} {name}: {ours:.3g} not below the baseline's {baseline:.3g}"
        assert ours <= 1.25 * MEASURED[pair_name][name], f"{pair_name} {name}: {ours:.3g}"
