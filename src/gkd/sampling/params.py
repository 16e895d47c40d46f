"""What a sampler is asked and what it hands back: :class:`SamplingParams` and :class:`Rollout`.

Also the token choice those parameters define (temperature, top-k, top-p, the tokenizer's vocabulary), as the fast
loop of :mod:`gkd.sampling.fast` makes it, and the masking after each row's first EOS that turns sampled tokens into
a :class:`Rollout`. Every backend (:mod:`gkd.sampling.local`, :mod:`gkd.sampling.vllm`) imports them from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Rollout", "SamplingParams", "next_tokens"]


@dataclass
class Rollout:
    """Sampled completions for a batch of prompts.

    ``completion_ids[b, t]`` is the t-th generated token of row b, or ``pad_token_id`` after the row's first EOS.
    ``completion_mask`` is True for generated tokens up to and including the first EOS. Columns that are padding
    in every row are trimmed, so ``T_new <= max_new_tokens``.
    """

    completion_ids: torch.LongTensor  # [B, T_new]
    completion_mask: torch.BoolTensor  # [B, T_new]


@dataclass(frozen=True)
class SamplingParams:
    """How to decode: the same request for every backend.

    Tokens are drawn from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens
    (0 = no limit), then to the smallest set whose probability reaches ``top_p`` (1.0 = no limit); ``greedy``
    (or ``temperature == 0``) takes the argmax. A row stops at its first id in ``eos_token_ids`` (kept, and
    counted in the completion mask) or after ``max_new_tokens``; later positions hold ``pad_token_id``.
    ``vocab_size`` (the tokenizer's length) excludes ids ``>= vocab_size`` (padding rows of a larger output
    layer); ``None`` allows every row of the head.
    """

    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_token_ids", tuple(int(e) for e in self.eos_token_ids))
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1 (the tokenizer's length), got {self.vocab_size}")


# ----------------------------------------------------------------------------------------------------------------
# Choosing the next token (shared by the fast path; mirrors what generate's logits processors do)


def next_tokens(
    logits: torch.Tensor,
    p: SamplingParams,
    generator: torch.Generator | None,
    *,
    rows: torch.Tensor | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Pick one token per row from ``logits`` [B, V] (float32). Returns [B] long.

    ``rows`` (with ``batch_size``): the logits are these rows of a batch of ``batch_size`` rows, the others
    having stopped. The generator still draws one number for every row of the whole batch and each row takes its
    own, so a row's tokens do not depend on which other rows are still being decoded (the fast loop drops finished
    rows and must sample exactly what it would have sampled without dropping them).

    Same semantics as generate's temperature -> top-k -> top-p chain: top-k keeps exactly ``k`` tokens (via
    ``topk``, which also hands top-p its tokens already sorted); top-p keeps a token while the probability of
    the tokens more likely than it is below ``top_p``, so the most likely token always survives. Columns from
    ``p.vocab_size`` on (padding rows of the head) are cut off first, so they are never chosen.
    """
    if p.vocab_size is not None and p.vocab_size < logits.shape[-1]:
        logits = logits[:, : p.vocab_size]
    if p.greedy:
        return logits.argmax(-1)
    if p.temperature != 1.0:
        logits = logits / p.temperature
    ids = None  # token ids of the columns of `probs`, when they are not simply 0..V-1
    if 0 < p.top_k < logits.shape[-1]:
        logits, ids = torch.topk(logits, p.top_k, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        if ids is None:
            probs, ids = torch.sort(probs, dim=-1, descending=True)
        mass_before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(mass_before >= p.top_p, 0.0)
    choice = _draw(probs, generator, rows, batch_size)
    return choice if ids is None else ids.gather(-1, choice[:, None]).squeeze(-1)


def _draw(
    weights: torch.Tensor,
    generator: torch.Generator | None,
    rows: torch.Tensor | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """One index per row with probability proportional to ``weights`` [B, V] (inverse-CDF sampling).

    One uniform number per row is compared against the float64 cumulative sum: tokens of weight 0 occupy an
    empty interval and can never be drawn. On CPU this is ~20x cheaper than ``torch.multinomial`` or
    exponential-race sampling, which draw (and take logs of) a random number per vocabulary entry.
    """
    cdf = weights.cumsum(-1, dtype=torch.float64)
    drawn = cdf.shape[0] if batch_size is None else batch_size  # one number per row of the whole batch
    u = torch.rand(drawn, 1, dtype=torch.float64, device=cdf.device, generator=generator)
    if rows is not None:
        u = u[rows]
    u = u * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max_(cdf.shape[-1] - 1).squeeze(-1)


def _to_rollout(tokens: torch.Tensor, eos_token_ids: list[int], pad_token_id: int) -> Rollout:
    """Mask everything after each row's first EOS, replace it with padding and trim all-padding columns."""
    if eos_token_ids:
        is_eos = torch.isin(tokens, torch.tensor(eos_token_ids, device=tokens.device))
        eos_before = is_eos.long().cumsum(1) - is_eos.long()
        mask = eos_before == 0
    else:
        mask = torch.ones_like(tokens, dtype=torch.bool)
    ids = tokens.masked_fill(~mask, pad_token_id)
    width = int(mask.sum(1).max()) if tokens.numel() else 0
    return Rollout(ids[:, :width].clone(), mask[:, :width].clone())
