"""Cross-tokenizer distillation: the teacher's distribution at every student position, on the student's vocabulary.

When the teacher's tokenizer differs from the student's, both score the same completion text, each in its own
tokens, and this module turns the teacher's per-position distributions into a distribution over the *student's*
next token at every student position. It is pure math: it takes token surface strings, ids, character (or byte)
offsets and log-probabilities, never a tokenizer object. Three pieces:

1. **Vocabulary mapping** (``VocabPair``): teacher id -> student id for tokens with the same surface string (what
   the token contributes to the decoded text), the longest student token that starts each teacher token, and the
   coverage report (``Coverage``: share of student tokens with a teacher counterpart, share of teacher tokens and of
   teacher probability mass that map).
2. **Position alignment** (``align_spans``): for every student token, the teacher token that contains its start,
   whether a teacher token starts at the same offset, and whether one has exactly the same span (``matched``).
3. **Projection** (``project_teacher``) and its **loss** (``projected_divergence``), for every registered divergence.

What the loss is (docs/teachers.md, "Another tokenizer", has the derivation and measured errors)
-----------------------------------------------------------------------------------------------
At a student position with span ``[a, b)`` (string ``σ``), the teacher tokens ``t_m, t_m+1, ...`` that cover
``[a, b)`` form the *spine*. Walking it, the teacher's probability mass splits exactly into **leaves**: at every
spine depth ``j`` each teacher token ``τ`` other than the realized ``t_j`` is a leaf with mass
``P(t_m) ... P(t_j-1) * P_j(τ)`` (the chain rule along the realized text, then one step off it) and string
``text[a:start_j] + τ``; the realized spine itself, once it reaches ``b``, is the last leaf and belongs to the
realized student token. The masses of all leaves sum to one. Each leaf goes to one student token: the one whose
surface *is* the leaf's string; otherwise (``fold``) the longest student token that starts the leaf's string
(``"prefix"``: the token the student would begin it with) or the tail bucket (``"tail"``). Leaf masses are summed
per student token, which gives the support ``K`` (student ids) with teacher log-probs, plus a tail mass ``τ``.

**Categories on the student's side.** A student token that is no leaf's target joins the category of the leaf its
text begins in: follow the realized teacher tokens as far as the token's text does, then take the longest teacher
token that starts the rest (``ProjectedTeacher.members``). With a character-level teacher, the student's ``"ba"``
and ``"bb"`` join ``"b"``: the leaf ``"b"`` holds the teacher's mass of every text that starts with ``b``, and it
is compared with ``Q(b) + Q(ba) + Q(bb)``; within a category the teacher, not asked how the text goes on, defers to
the student's own split. Every target keeps its own category.

**The student's tail.** The loss compares the two distributions on the categories ``K`` plus the tail. The
student's tail is the teacher's tail ``τ`` (a constant), and its mass on ``K`` is its own distribution conditioned
on ``K`` (tokens in no category are left out)::

    P̃ = (P_K, τ)        Q̃ = ((1 - τ) Q(· | K), τ)        loss = D(P̃ || Q̃) = (1 - τ) D(P(· | K) || Q(· | K))

(the identity holds for every f-divergence, hence every registered divergence). Why: the tail holds strings the
student cannot write as one token here; its probability of them is spread over several of its tokens and is not
observable at this position, so the loss neither rewards nor punishes it for the tail: it compares the teacher's
and the student's distributions where both are defined, weighted by the share of the teacher's mass that is
comparable. A student tail of zero (the mass of its tokens outside ``K``, which is zero when ``K`` is the whole
vocabulary) would make every forward-type KL infinite as soon as the teacher has an extra token.

- *Same tokens under other ids* (a permuted vocabulary): every spine has one token, every leaf is a whole teacher
  token whose surface is a student token, every category one token, ``τ = 0``: the projection is the teacher's
  distribution re-indexed and ``Q̃ = Q``, so the loss and its gradients are the same-tokenizer path's.
- *The teacher's vocabulary is the student's plus extra tokens* (same segmentation): exact on the shared tokens;
  with ``fold="tail"`` the extra tokens' mass is the tail, and the loss is ``(1 - τ) D(P(· | shared) || Q)``.
- *Different segmentations*: the chain rule gives the teacher's exact probability of every leaf; what is
  approximate is the assignment of leaves and categories to student tokens, which cannot see which tokens the
  student's tokenizer would produce after its previous ones (``ProjectedTeacher.restrict`` takes that as a mask).
  Where no teacher token starts at ``a`` (a teacher token straddles the student boundary), the teacher's first
  distribution is conditioned on the part already written: the teacher tokens that start with ``text[start_m:a]``
  are kept (renormalised), their remainders are the leaves' strings, and one that ends exactly at ``a`` is tail (what
  follows it is unknown). A position whose start no teacher token covers has no teacher (``valid`` False, loss 0).

The teacher's log-probabilities are taken as given, at the loss temperature (as for ``TeacherTopK``); the student's
are computed at ``temperature`` inside ``projected_divergence``.

``token_surfaces(tokenizer)`` reads the surfaces of a transformers tokenizer (the one function here that takes a
tokenizer object); :mod:`gkd.xtok` wires all of this into ``gkd distill``.

Special tokens (EOS): a pair given to ``VocabPair(special={teacher_id: student_id})`` shares a sentinel surface
(``pair.special_surface(student_id)``); the caller appends it to the text and gives both EOS tokens its span, so EOS
is one more token of the text. Tokens whose surface is ``None`` (padding, unknown) never match anything.
"""

from gkd.align.project import ProjectedTeacher, project_teacher, projected_divergence
from gkd.align.spans import SpanAlignment, align_spans, spans_from_surfaces
from gkd.align.vocab import Coverage, Fold, VocabPair, token_surfaces

__all__ = [
    "Coverage",
    "Fold",
    "ProjectedTeacher",
    "SpanAlignment",
    "VocabPair",
    "align_spans",
    "project_teacher",
    "projected_divergence",
    "spans_from_surfaces",
    "token_surfaces",
]
