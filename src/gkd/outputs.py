"""What a model hands the loss: its output head, its scores at the completion positions, or a teacher's top-k.

Every kind of teacher (local, top-k cache, served, the RL reference) and the student hand the objective one of
these, so the objective is math over them and never calls a model: :class:`ScoringOutput` (hidden states at the
valid completion positions plus the :class:`Head`, or full logits where the head cannot run chunked) or
:class:`TeacherTopK` (top-k log-probabilities plus a tail bucket: the top-k cache and the served teacher).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Head", "ScoringOutput", "TeacherTopK", "TeacherView"]


@dataclass
class Head:
    """An output head: logits = transform(hidden @ weight[:vocab].T + bias[:vocab]).

    ``vocab`` limits the comparison to the tokenizer's real length when the matrices carry padding rows
    (e.g. 151,936 vs 152,064 rows for one tokenizer). ``scale`` multiplies the hidden states first (T5 with tied
    embeddings uses d_model ** -0.5). The transform applied to the logits, as the model's own forward does:
    ``logit_scale`` multiplies them (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``), then ``softcap``
    squashes them to ``softcap * tanh(z / softcap)`` (Gemma 2's ``final_logit_softcapping``). A transformed head
    still runs chunked, through autograd inside each chunk (no closed-form gradient for it).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    vocab: int | None = None
    scale: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None

    @property
    def size(self) -> int:
        return self.vocab if self.vocab is not None else self.weight.shape[0]

    @property
    def transformed(self) -> bool:
        return self.logit_scale != 1.0 or self.softcap is not None

    def w(self) -> torch.Tensor:
        return self.weight if self.vocab is None else self.weight[: self.vocab]

    def b(self) -> torch.Tensor | None:
        if self.bias is None:
            return None
        return self.bias if self.vocab is None else self.bias[: self.vocab]

    def raw_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden @ W.T + b`` before the transform."""
        h = hidden * self.scale if self.scale != 1.0 else hidden
        z = h.to(self.weight.dtype) @ self.w().t()
        b = self.b()
        if b is not None:
            z = z + b
        return z

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        """The model's logit transform (identity for a plain head)."""
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.transform(self.raw_logits(hidden))


@dataclass
class TeacherTopK:
    """A teacher stored as its top-k log-probabilities per position plus the remaining mass (a tail bucket).

    The divergence is then computed on the (k + 1)-category distribution: the k token ids and "everything else".
    """

    ids: torch.Tensor  # [N, k] long
    logprobs: torch.Tensor  # [N, k] float, log p_T of those ids (at the loss temperature)


@dataclass
class ScoringOutput:
    """What the loss needs from a model at the ``N`` valid positions of a batch."""

    hidden: torch.Tensor | None  # [N, H] (fused path), with ``head``
    head: Head | None
    logits: torch.Tensor | None  # [N, V] (plain path)

    def full_logits(self) -> torch.Tensor:
        """The ``[N, V]`` logits (formed from the hidden states and head on the fused path)."""
        if self.logits is not None:
            return self.logits
        assert self.hidden is not None and self.head is not None
        return self.head.logits(self.hidden)


# What a teacher's ``view(batch)`` returns: its scores, or its top-k log-probabilities plus a tail bucket.
TeacherView = ScoringOutput | TeacherTopK
