"""A teacher served over HTTP (``teacher_url``): ``gkd serve-teacher`` or a stock vLLM OpenAI-compatible server.

:class:`ServedTeacher` stands in for :class:`gkd.teacher.Teacher` in the loss: per micro-batch it sends the valid
prompt + completion token ids of every row to ``POST /v1/completions`` (``prompt_logprobs``, vLLM's field) and turns
the answer into the same top-k + tail-bucket support the teacher cache uses (:class:`gkd.losses.TeacherTopK`), so
every divergence runs on it unchanged. Per completion position the support has a fixed number ``M`` of token ids:

* ``gkd serve-teacher``: the actual token, the teacher's top ``teacher_topk``, the student's top
  ``teacher_student_topk`` (a gkd extension: the server scores extra ids per position) and, where those overlap, the
  teacher's next-ranked tokens; ``M = teacher_topk + 1 + teacher_student_topk`` (at most the vocabulary).
* a stock vLLM server: the actual token and the teacher's top tokens, ``M = teacher_topk`` (vLLM's default
  ``--max-logprobs`` is 20): the actual token takes the place of the K-th when it is not among the top K.

The remaining mass ``1 - Σ p`` is the tail bucket. At ``teacher_topk >= vocab`` the support is the whole vocabulary
and the loss is the local teacher's (up to float rounding).

Requests use the standard library only (``urllib.request``), with ``teacher_timeout`` per request and
``teacher_max_retries`` retries with exponential back-off on connection errors, timeouts and HTTP 429/5xx. When the
server stays down, :class:`TeacherUnavailable` (one line naming the URL) is raised; it is also a ``KeyboardInterrupt``,
so the trainer saves a checkpoint and stops as it does on Ctrl-C. The request overlaps the student's forward pass:
:meth:`ServedTeacher.topk` sends it from a worker thread and returns a :class:`PendingTopK`, which the loss reads
(and so waits for) after the student's forward pass. With ``teacher_student_topk`` the student's top-k tokens are
found first, by one extra no-gradient forward pass of the student.
"""

from __future__ import annotations

import json
import math
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from gkd.data import Batch
from gkd.errors import ConfigError, ModelError, TrainingError
from gkd.outputs import TeacherTopK

__all__ = ["PendingTopK", "ServedTeacher", "TeacherUnavailable"]


class PendingTopK(TeacherTopK):
    """A :class:`TeacherTopK` whose tensors come from a request in flight: reading ``ids`` or ``logprobs`` waits
    for it (and raises what the request raised). The loss reads them after the student's forward pass, so the
    request overlaps it. ``dataclasses.replace`` (the loss slices it) builds a plain, resolved one."""

    def __init__(
        self,
        ids: torch.Tensor | None = None,
        logprobs: torch.Tensor | None = None,
        *,
        future: Future | None = None,
    ) -> None:
        self._future, self._ids, self._logprobs = future, ids, logprobs

    def _wait(self) -> None:
        if self._future is not None:
            top = self._future.result()
            self._ids, self._logprobs, self._future = top.ids, top.logprobs, None

    @property  # type: ignore[override]
    def ids(self) -> torch.Tensor:
        self._wait()
        return self._ids  # type: ignore[return-value]

    @property  # type: ignore[override]
    def logprobs(self) -> torch.Tensor:
        self._wait()
        return self._logprobs  # type: ignore[return-value]


class TeacherUnavailable(TrainingError, KeyboardInterrupt):
    """The served teacher did not answer after every retry. A ``KeyboardInterrupt`` as well, so that a training loop
    saves a checkpoint and stops (``GKDTrainer.train`` does)."""


def _retryable(status: int) -> bool:
    return status in (408, 429) or status >= 500


class ServedTeacher:
    """The teacher's top-k log-probs (+ tail) per completion position, from a server (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        vocab: int,
        topk: int = 20,
        student_topk: int = 0,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 3,
        temperature: float = 1.0,
        student: nn.Module | None = None,
        backoff: float = 0.5,
        overlap: bool = True,
        log: Any = None,
    ) -> None:
        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[: -len("/v1")]
        self.vocab = vocab
        self.k = topk
        self.student_topk = student_topk
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.temperature = temperature
        self.student = student
        self.backoff = backoff
        self.overlap = overlap
        self._pool: ThreadPoolExecutor | None = None
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.model_name: str | None = None
        self.gkd: dict[str, Any] | None = None  # the server's gkd field (None: a stock vLLM server)
        self.max_request_tokens: int | None = None

    # --- HTTP -------------------------------------------------------------------------------------------------
    def _request(self, path: str, payload: Any = None, *, first: bool = False) -> Any:
        """One JSON request with retries. ``first``: the run's first contact, before any step: a refused connection
        (nothing listens at the URL) fails at once, and no error there speaks of resuming (nothing was trained)."""
        url = self.url + path
        data = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 30.0))
            req = urllib.request.Request(
                url, data=data, headers=headers, method="GET" if data is None else "POST"
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                message = _server_message(e)
                if e.code == 401:
                    raise ConfigError(
                        f"the teacher at {self.url} refused the API key (HTTP 401); set teacher_api_key (or "
                        "GKD_TEACHER_API_KEY) to the server's --api-key"
                    ) from None
                if not _retryable(e.code):
                    raise ModelError(
                        f"the teacher at {url} refused the request (HTTP {e.code}): {message}"
                    ) from None
                last = f"HTTP {e.code}: {message}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                if first and isinstance(reason, ConnectionRefusedError):
                    raise ConfigError(
                        f"nothing listens at {self.url} (connection refused); start the teacher there (gkd "
                        "serve-teacher or vllm serve) or fix teacher_url (host and port)"
                    ) from None
                last = f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason
            except json.JSONDecodeError:
                raise ModelError(f"the teacher at {url} did not answer with JSON") from None
        if first:
            raise ModelError(
                f"the teacher at {self.url} did not answer after {self.max_retries + 1} attempts ({last}); check "
                "that it is running and that teacher_url is right"
            )
        raise TeacherUnavailable(
            f"the teacher at {self.url} did not answer after {self.max_retries + 1} attempts ({last}); start it again"
        )

    # --- checks -----------------------------------------------------------------------------------------------
    def connect(self, tokenizer: Any = None, eos_ids: list[int] | None = None) -> ServedTeacher:
        """``GET /v1/models``: the served model's name and, from ``gkd serve-teacher``, its vocabulary, tokenizer and
        EOS ids checked against the student's (a stock vLLM server gives none of them: those checks are skipped)."""
        info = self._request("/v1/models", first=True)
        try:
            self.model_name = info["data"][0]["id"]
        except (KeyError, IndexError, TypeError):
            raise ModelError(
                f"{self.url}/v1/models does not list a model; is it an OpenAI-compatible server?"
            ) from None
        self.gkd = info.get("gkd") if isinstance(info.get("gkd"), dict) else None
        if self.gkd is None:
            if self.student_topk > 0:
                raise ConfigError(
                    f"teacher_student_topk needs gkd serve-teacher, but {self.url} is another server (vLLM?); "
                    "set teacher_student_topk: 0"
                )
            if self.temperature != 1.0:
                raise ConfigError(
                    f"loss_temperature {self.temperature} needs gkd serve-teacher: a vLLM server returns log-probs "
                    "at temperature 1; set loss_temperature: 1"
                )
            return self
        served_vocab = self.gkd.get("vocab_size")
        if served_vocab != self.vocab:
            raise ModelError(
                f"the teacher at {self.url} ({self.model_name}) has a vocabulary of {served_vocab} tokens, the "
                f"student's tokenizer {self.vocab}; a served teacher must share the student's tokenizer (a teacher with "
                "another tokenizer is aligned only as a local teacher: teacher_model_name_or_path)"
            )
        sha = self.gkd.get("tokenizer_sha256")
        if tokenizer is not None and sha is not None:
            from gkd.serve import tokenizer_sha256

            if tokenizer_sha256(tokenizer) != sha:
                raise ModelError(
                    f"the teacher at {self.url} ({self.model_name}) uses a different tokenizer than the student "
                    "(same size, different vocabulary); a served teacher must share the student's tokenizer (a teacher "
                    "with another tokenizer is aligned only as a local teacher: teacher_model_name_or_path)"
                )
        served_eos = self.gkd.get("eos_token_ids") or []
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None and served_eos and eos not in served_eos:
            raise ModelError(
                f"the teacher at {self.url} stops at EOS ids {served_eos}, the student's tokenizer at {eos}; "
                "use the same tokenizer for both"
            )
        self.max_request_tokens = self.gkd.get("max_request_tokens")
        return self

    # --- the loss's interface -----------------------------------------------------------------------------------
    @property
    def support(self) -> int:
        """Token ids per position in the support (the tail bucket not counted)."""
        extra = 1 + self.student_topk if self.gkd is not None else 0
        return min(self.vocab, self.k + extra)

    def score(self, batch: Batch) -> Any:
        raise ModelError(
            "a served teacher (teacher_url) gives top-k log-probs, not logits; this loss needs a local teacher"
        )

    @torch.no_grad()
    def student_top(self, batch: Batch) -> torch.Tensor:
        """The student's top ``student_topk`` token ids at the batch's valid positions ``[N, k]``."""
        from gkd.forward import score_positions

        assert self.student is not None
        out = score_positions(
            self.student,
            batch.prompt_ids,
            batch.prompt_mask,
            batch.completion_ids,
            batch.completion_mask,
            vocab=self.vocab,
        )
        rows = out.hidden if out.hidden is not None else out.logits
        assert rows is not None
        parts = []
        chunk = max(16, (1 << 23) // max(self.vocab, 1))
        for a in range(0, rows.shape[0], chunk):
            z = out.head.logits(rows[a : a + chunk]) if out.hidden is not None else rows[a : a + chunk]  # type: ignore[union-attr]
            parts.append(z[:, : self.vocab].topk(min(self.student_topk, self.vocab), dim=-1).indices)
        if not parts:
            return torch.zeros(0, self.student_topk, dtype=torch.long)
        return torch.cat(parts).cpu()

    def view(self, batch: Batch) -> TeacherTopK:
        """A served teacher's view (:mod:`gkd.teacher`): its top-k + tail, requested over HTTP."""
        return self.topk(batch)

    def topk(self, batch: Batch) -> TeacherTopK:
        """The teacher's support (``M`` ids + log-probs) at the batch's valid completion positions, in the loss's
        row-major order, on the batch's device."""
        device = batch.completion_ids.device
        t_ids, t_mask = batch.teacher_prompt()  # the teacher's own prompts where the batch has them
        pm, cm = t_mask.bool().cpu(), batch.completion_mask.bool().cpu()
        p_ids, c_ids = t_ids.cpu(), batch.completion_ids.cpu()
        rows = [(p_ids[b][pm[b]].tolist(), c_ids[b][cm[b]].tolist()) for b in range(p_ids.shape[0])]
        rows = [(p, c) for p, c in rows if c]
        extra_all = None
        if self.gkd is not None and self.student_topk > 0 and self.student is not None:
            extra_all = self.student_top(batch).tolist()
        if not self.overlap:
            return self.fetch(rows, extra_all, device)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gkd-teacher-request")
        return PendingTopK(future=self._pool.submit(self.fetch, rows, extra_all, device))

    def fetch(
        self, rows: list[tuple[list[int], list[int]]], extra_all: list[list[int]] | None, device: torch.device
    ) -> TeacherTopK:
        """The server's answer for ``rows`` (the teacher's prompt ids, the completion ids), in requests of bounded
        size: the support of every valid position, in row-major order, on ``device``."""
        m = self.support
        ids_out: list[list[int]] = []
        lp_out: list[list[float]] = []
        offset = 0
        for group in self._groups(rows):
            prompts = [p + c for p, c in group]
            starts = [len(p) for p, _ in group]
            extra = None
            if extra_all is not None:
                extra = []
                for _, c in group:
                    extra.append(extra_all[offset : offset + len(c)])
                    offset += len(c)
            # TeacherUnavailable propagates: the trainer saves a checkpoint and its one line names the URL and the path
            choices = self._complete(prompts, starts, extra)
            for (p, c), choice, ex in zip(group, choices, extra or [None] * len(group)):
                plp = choice.get("prompt_logprobs") or []
                elp = choice.get("gkd_extra_logprobs")
                for t, token in enumerate(c):
                    pos = len(p) + t
                    entry = plp[pos] if pos < len(plp) else None
                    if not isinstance(entry, dict) or str(token) not in entry:
                        raise ModelError(
                            f"the teacher at {self.url} returned no log-prob for the token at position {pos}"
                        )
                    ranked = sorted(
                        ((int(i), float(v["logprob"]), v.get("rank") or 0) for i, v in entry.items()),
                        key=lambda x: (x[2] if x[2] else math.inf, -x[1]),
                    )
                    known = {i: lp for i, lp, _ in ranked}
                    order = [token] + [i for i, _, _ in ranked[: self.k]]
                    if ex is not None and elp is not None:
                        for i, lp in zip(ex[t], elp[pos] or []):
                            known.setdefault(int(i), float(lp))
                        order += [int(i) for i in ex[t]]
                    order += [i for i, _, _ in ranked[self.k :]]
                    chosen: list[int] = []
                    seen: set[int] = set()
                    for i in order:
                        if i not in seen:
                            seen.add(i)
                            chosen.append(i)
                            if len(chosen) == m:
                                break
                    if len(chosen) < m:
                        raise ModelError(
                            f"the teacher at {self.url} returned {len(chosen)} log-probs at a position, fewer than "
                            f"the {m} asked for (is its --max-logprobs below teacher_topk?)"
                        )
                    ids_out.append(chosen)
                    lp_out.append([known[i] for i in chosen])
        ids = torch.tensor(ids_out, dtype=torch.long).reshape(-1, m)
        logprobs = torch.tensor(lp_out, dtype=torch.float32).reshape(-1, m)
        return TeacherTopK(ids.to(device), logprobs.to(device))

    def _groups(self, rows: list[tuple[list[int], list[int]]]) -> list[list[tuple[list[int], list[int]]]]:
        """The rows split into requests under the server's ``max_request_tokens`` (one request without a limit)."""
        limit = self.max_request_tokens
        groups: list[list[Any]] = []
        current: list[Any] = []
        size = 0
        for r in rows:
            n = len(r[0]) + len(r[1])
            if limit is not None and n > limit:
                raise ModelError(
                    f"a prompt + completion of {n} tokens is more than the teacher at {self.url} accepts "
                    f"({limit}: its --max-batch-tokens)"
                )
            if current and limit is not None and size + n > limit:
                groups.append(current)
                current, size = [], 0
            current.append(r)
            size += n
        if current:
            groups.append(current)
        return groups

    def _complete(
        self, prompts: list[list[int]], starts: list[int], extra: list[list[list[int]]] | None
    ) -> list[dict[str, Any]]:
        payload: dict[str, Any] = {"model": self.model_name, "prompt": prompts}
        if self.gkd is not None:
            payload.update(
                max_tokens=0,
                prompt_logprobs=self.support,
                gkd_prompt_logprobs_from=starts,
                gkd_temperature=self.temperature,
            )
            if extra is not None:
                payload["gkd_extra_token_ids"] = extra
        else:  # vLLM: max_tokens >= 1 in many versions; the generated token is ignored
            payload.update(max_tokens=1, prompt_logprobs=self.support, temperature=0.0)
        answer = self._request("/v1/completions", payload)
        try:
            choices = sorted(answer["choices"], key=lambda c: c.get("index", 0))
        except (KeyError, TypeError, AttributeError):
            raise ModelError(f"the teacher at {self.url} answered without choices") from None
        if len(choices) != len(prompts):
            raise ModelError(
                f"the teacher at {self.url} answered {len(choices)} choices for {len(prompts)} prompts"
            )
        return choices


def _server_message(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read())
    except Exception:
        return str(e.reason)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if "message" in body:
            return str(body["message"])
    return str(e.reason)
