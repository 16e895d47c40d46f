"""``gkd serve-teacher``: a frozen teacher behind the subset of vLLM's OpenAI-compatible API that distillation needs.

Endpoints (the request and response shapes are vLLM's; see ``vllm/entrypoints/openai/protocol.py``:
``CompletionRequest.prompt_logprobs``, ``CompletionResponseChoice.prompt_logprobs: list[dict[int, Logprob] | None]``,
``Logprob(logprob, rank, decoded_token)``, and ``vllm/entrypoints/openai/serving_completion.py``, which fills them):

* ``GET /health``: 200 once the model is loaded.
* ``GET /v1/models``: ``{"object": "list", "data": [{"id", "object": "model", "owned_by", "max_model_len", ...}]}``
  plus a ``gkd`` field (a gkd extension): ``vocab_size``, ``eos_token_ids``, ``tokenizer_sha256`` (of the sorted
  vocabulary), ``max_request_tokens``. ``gkd.teacher_client.ServedTeacher`` checks them against the student's
  tokenizer; a stock vLLM server has no such field and those checks are skipped.
* ``POST /v1/completions`` with ``"prompt": [ids...]`` (or a list of such lists), ``"max_tokens": 0`` or ``1``
  (this server never generates: ``text`` is empty), ``"prompt_logprobs": K`` and optionally ``"model"``. Each
  ``choices[i].prompt_logprobs`` has one entry per prompt position: ``None`` for the first, otherwise
  ``{"<token id>": {"logprob", "rank", "decoded_token"}}`` with the actual token plus the top ``K`` (``rank`` is
  1-based, as vLLM's).

gkd extensions of the completion request (a stock vLLM server ignores or refuses them; the client sends them only to
a server whose ``/v1/models`` has the ``gkd`` field):

* ``gkd_prompt_logprobs_from``: an int (or one per prompt): positions before it get ``None`` (saves the prompt's
  positions when only the completion is scored). Default 1.
* ``gkd_extra_token_ids``: per prompt (for a single flat prompt: directly), one list of token ids per position from
  ``gkd_prompt_logprobs_from`` on; the response's ``choices[i].gkd_extra_logprobs`` has one entry per prompt position
  (``None`` before that) with the teacher's log-probs at those ids, in order. Used to score the student's top-k.
* ``gkd_temperature``: log-probs of ``softmax(logits / T)`` (the loss temperature); default 1 (vLLM's raw log-probs).

Requests are queued (bounded: HTTP 503 when full) and a worker thread batches them, one forward pass per batch of up
to ``max_batch_tokens`` tokens. A request over that size is refused with HTTP 413. Nothing from a request is ever
evaluated: only token ids (ints in ``[0, vocab)``) and a few numbers are read, and anything else is HTTP 400.

Security: the server binds 127.0.0.1 unless told otherwise; on any other address an API key is required (vLLM's
``--api-key``: clients send ``Authorization: Bearer KEY``; ``/health`` stays open). SIGTERM shuts it down gracefully
(uvicorn finishes the requests in flight). fastapi and uvicorn are imported only here (``pip install gkd[serve]``).
"""

# no ``from __future__ import annotations``: FastAPI reads the handlers' annotations (``Request``) at runtime
import asyncio
import concurrent.futures
import hashlib
import hmac
import json
import math
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from gkd.errors import ConfigError

__all__ = ["LOOPBACK", "TeacherServer", "build_app", "make_server", "serve_teacher", "tokenizer_sha256"]

LOOPBACK = ("127.0.0.1", "localhost", "::1")
_ROWS_PER_CHUNK = 1 << 22  # logits elements per head chunk on the server


def tokenizer_sha256(tokenizer: Any) -> str:
    """A fingerprint of a tokenizer's vocabulary (the same on the client and the server for the same tokenizer)."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


class RequestError(Exception):
    """A request the server refuses: ``status`` is the HTTP code, the message names the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Job:
    seqs: list[list[int]]
    starts: list[int]
    k: int
    extra: list[list[list[int]] | None]
    temperature: float
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.seqs)


class TeacherServer:
    """The model side of the server: validation, the queue, the batching worker and the forward pass (no HTTP)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        model_name: str,
        max_batch_tokens: int = 8192,
        queue_size: int = 64,
        batch_wait_s: float = 0.002,
    ) -> None:
        from gkd.models import context_length, output_rows

        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.vocab = len(tokenizer) if tokenizer is not None else output_rows(model)
        self.max_batch_tokens = max_batch_tokens
        self.max_model_len = context_length(model.config)
        self.batch_wait_s = batch_wait_s
        self.queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._decoded: list[str] | None = None
        self._worker: threading.Thread | None = None
        eos = getattr(model.config, "eos_token_id", None)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = sorted({eos} if isinstance(eos, int) else set(eos or []))
        self.sha = tokenizer_sha256(tokenizer) if tokenizer is not None else None
        self.created = int(time.time())

    @property
    def device(self) -> torch.device:
        p = next(iter(self.model.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    # --- model info -------------------------------------------------------------------------------------------
    def models_response(self) -> dict[str, Any]:
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "gkd",
            "root": self.model_name,
            "parent": None,
            "max_model_len": self.max_model_len,
        }
        gkd = {
            "vocab_size": self.vocab,
            "eos_token_ids": self.eos_ids,
            "tokenizer_sha256": self.sha,
            "max_request_tokens": self.max_batch_tokens,
            "extensions": ["gkd_prompt_logprobs_from", "gkd_extra_token_ids", "gkd_temperature"],
        }
        return {"object": "list", "data": [card], "gkd": gkd}

    # --- validation (only ints and floats are read from a request) ----------------------------------------------
    def _ids(self, value: Any, what: str) -> list[int]:
        if not isinstance(value, list) or not all(type(v) is int for v in value):
            raise RequestError(400, f"{what} must be a list of token ids (integers)")
        if value and (min(value) < 0 or max(value) >= self.vocab):
            raise RequestError(400, f"{what} has a token id outside [0, {self.vocab})")
        return value

    def parse(self, body: Any) -> _Job:
        """A validated job from a decoded JSON body, or :class:`RequestError` (400/404/413)."""
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(404, f"The model `{model}` does not exist.")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(type(v) is int for v in prompt):
            seqs, single = [prompt], True
        elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
            seqs, single = prompt, False
        else:
            raise RequestError(
                400,
                "prompt must be a non-empty list of token ids or a list of such lists (text is not accepted)",
            )
        seqs = [self._ids(s, "prompt") for s in seqs]
        if any(not s for s in seqs):
            raise RequestError(400, "every prompt needs at least one token")
        total = sum(len(s) for s in seqs)
        if total > self.max_batch_tokens:
            raise RequestError(
                413,
                f"the request has {total} tokens, more than this server's limit of {self.max_batch_tokens} "
                "(--max-batch-tokens); send fewer prompts per request",
            )
        longest = max(len(s) for s in seqs)
        if self.max_model_len is not None and longest > self.max_model_len:
            raise RequestError(
                400, f"a prompt has {longest} tokens; the model reads at most {self.max_model_len}"
            )
        max_tokens = body.get("max_tokens", 0)
        if type(max_tokens) is not int or max_tokens not in (0, 1):
            raise RequestError(
                400, "max_tokens must be 0 or 1: this server scores prompts, it does not generate"
            )
        k = body.get("prompt_logprobs")
        if k is None:
            k = 0
        if type(k) is not int or k < 0:
            raise RequestError(400, "prompt_logprobs must be a non-negative integer")
        k = min(k, self.vocab)
        temperature = body.get("gkd_temperature", 1.0)
        if type(temperature) not in (int, float) or not math.isfinite(temperature) or temperature <= 0:
            raise RequestError(400, "gkd_temperature must be a positive number")
        start = body.get("gkd_prompt_logprobs_from", 1)
        starts = start if isinstance(start, list) else [start] * len(seqs)
        if len(starts) != len(seqs) or not all(type(s) is int and s >= 0 for s in starts):
            raise RequestError(400, "gkd_prompt_logprobs_from must be a non-negative int or one per prompt")
        starts = [max(1, s) for s in starts]
        extra_in = body.get("gkd_extra_token_ids")
        extra: list[Any] = [None] * len(seqs)
        if extra_in is not None:
            per_prompt = [extra_in] if single else extra_in
            if not isinstance(per_prompt, list) or len(per_prompt) != len(seqs):
                raise RequestError(400, "gkd_extra_token_ids must have one entry per prompt")
            for i, (rows, s, st) in enumerate(zip(per_prompt, seqs, starts)):
                if not isinstance(rows, list) or len(rows) != max(0, len(s) - st):
                    raise RequestError(
                        400,
                        "gkd_extra_token_ids needs one list of ids per position from gkd_prompt_logprobs_from on",
                    )
                extra[i] = [self._ids(r, "gkd_extra_token_ids") for r in rows]
            if sum(len(r) for rows in extra for r in rows) > self.max_batch_tokens * 64:
                raise RequestError(413, "too many gkd_extra_token_ids in one request")
        return _Job(seqs, starts, k, extra, float(temperature))

    # --- the worker -------------------------------------------------------------------------------------------
    def submit(self, job: _Job) -> concurrent.futures.Future:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise RequestError(503, "the teacher's request queue is full; retry later") from None
        return job.future

    def start(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._loop, name="gkd-teacher-worker", daemon=True)
            self._worker.start()

    def stop(self) -> None:
        if self._worker is not None:
            self.queue.put(None)
            self._worker.join(timeout=30)
            self._worker = None

    def _loop(self) -> None:
        pending: _Job | None = None
        while True:
            job = pending if pending is not None else self.queue.get()
            pending = None
            if job is None:
                return
            batch, tokens = [job], job.tokens
            deadline = time.monotonic() + self.batch_wait_s
            while True:  # gather what is queued (briefly waiting for more) up to max_batch_tokens
                try:
                    nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                if tokens + nxt.tokens > self.max_batch_tokens:
                    pending = nxt
                    break
                batch.append(nxt)
                tokens += nxt.tokens
            try:
                results = self.run_batch(batch)
            except Exception as e:  # one bad batch must not kill the worker: its requests get a 500
                for j in batch:
                    j.future.set_exception(e)
                continue
            for j, r in zip(batch, results):
                j.future.set_result(r)

    # --- the forward pass -------------------------------------------------------------------------------------
    @torch.no_grad()
    def run_batch(self, jobs: list[_Job]) -> list[list[dict[str, Any]]]:
        """One forward pass over every sequence of ``jobs``; the choices of each job."""
        from gkd.forward import fused_head_supported, head_of, unwrap

        seqs = [s for j in jobs for s in j.seqs]
        device = self.device
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        ids, mask = ids.to(device), mask.to(device)
        m = unwrap(self.model)
        if fused_head_supported(m):
            base = getattr(m, m.base_model_prefix)
            hidden = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            head = head_of(m, m.get_output_embeddings(), self.vocab)

            def logits_at(i: int, rows: slice) -> torch.Tensor:
                return head.logits(hidden[i, rows])
        else:
            full = m(input_ids=ids, attention_mask=mask, use_cache=False).logits

            def logits_at(i: int, rows: slice) -> torch.Tensor:
                return full[i, rows, : self.vocab]

        out: list[list[dict[str, Any]]] = []
        row = 0
        for job in jobs:
            choices = []
            for n, (seq, start, extra) in enumerate(zip(job.seqs, job.starts, job.extra)):
                choices.append(
                    self._choice(n, seq, start, extra, job, lambda rows, r=row: logits_at(r, rows))
                )
                row += 1
            out.append(choices)
        return out

    def _decode(self, token: int) -> str:
        if self._decoded is None:
            if self.tokenizer is None:
                self._decoded = [str(i) for i in range(self.vocab)]
            else:
                self._decoded = [self.tokenizer.decode([i]) for i in range(self.vocab)]
        return self._decoded[token]

    def _choice(
        self, index: int, seq: list[int], start: int, extra: Any, job: _Job, logits_at: Any
    ) -> dict[str, Any]:
        from gkd.divergences import log_probs

        n = len(seq)
        prompt_logprobs: list[Any] = [None] * n
        extra_lp: list[Any] | None = [None] * n if extra is not None else None
        chunk = max(1, _ROWS_PER_CHUNK // max(self.vocab, 1))
        device = self.device
        for a in range(start, n, chunk):  # positions a..b-1, predicted by outputs a-1..b-2
            b = min(n, a + chunk)
            lp = log_probs(logits_at(slice(a - 1, b - 1)), job.temperature).float()
            actual = torch.tensor(seq[a:b], device=device)
            lp_actual = lp.gather(-1, actual[:, None])
            rank_actual = ((lp > lp_actual).sum(-1) + 1).tolist()
            lp_actual = lp_actual.squeeze(-1).tolist()
            top_v, top_i = lp.topk(job.k, dim=-1) if job.k > 0 else (None, None)
            top_v = top_v.tolist() if top_v is not None else None
            top_i = top_i.tolist() if top_i is not None else None
            for r in range(b - a):
                entry: dict[str, Any] = {}
                if top_i is not None:
                    for rank, (t, v) in enumerate(zip(top_i[r], top_v[r]), start=1):  # type: ignore[index]
                        entry[str(t)] = {"logprob": v, "rank": rank, "decoded_token": self._decode(t)}
                tok = seq[a + r]
                if str(tok) not in entry:
                    entry[str(tok)] = {
                        "logprob": lp_actual[r],
                        "rank": rank_actual[r],
                        "decoded_token": self._decode(tok),
                    }
                prompt_logprobs[a + r] = entry
            if extra is not None:
                for r in range(b - a):
                    wanted = extra[a + r - start]
                    if wanted:
                        idx = torch.tensor(wanted, device=device)
                        extra_lp[a + r] = lp[r].gather(-1, idx).tolist()  # type: ignore[index]
                    else:
                        extra_lp[a + r] = []  # type: ignore[index]
        choice: dict[str, Any] = {
            "index": index,
            "text": "",
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
            "prompt_logprobs": prompt_logprobs,
        }
        if extra_lp is not None:
            choice["gkd_extra_logprobs"] = extra_lp
        return choice

    def completion_response(self, choices: list[dict[str, Any]], prompt_tokens: int) -> dict[str, Any]:
        return {
            "id": f"cmpl-{time.time_ns():x}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0},
        }


def _error(status: int, message: str) -> Any:
    from fastapi.responses import JSONResponse

    kinds = {400: "BadRequestError", 401: "Unauthorized", 404: "NotFoundError", 413: "RequestTooLarge"}
    kind = kinds.get(status, "ServiceUnavailable" if status == 503 else "InternalServerError")
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": status}}, status_code=status
    )


def build_app(server: TeacherServer, *, api_key: str | None = None) -> Any:
    """The FastAPI app around ``server`` (its worker starts and stops with the app)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        server.start()
        try:
            yield
        finally:
            server.stop()

    app = FastAPI(
        title="gkd serve-teacher", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    max_body = 16 * server.max_batch_tokens * 65 + (1 << 16)  # ids (+ up to 64 extra ids a position) as JSON

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Any:
        if api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "a valid API key is required (Authorization: Bearer KEY)")
        return await call_next(request)

    @app.get("/health")
    async def health() -> Any:
        from fastapi.responses import Response

        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> Any:
        return server.models_response()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body):
            return _error(413, f"the request body is larger than {max_body} bytes")
        raw = await request.body()
        if len(raw) > max_body:
            return _error(413, f"the request body is larger than {max_body} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            return _error(400, "the request body is not valid JSON")
        try:
            job = server.parse(body)
            future = server.submit(job)
        except RequestError as e:
            return _error(e.status, str(e))
        try:
            choices = await asyncio.wrap_future(future)
        except Exception as e:
            return _error(500, f"the teacher failed on this batch: {type(e).__name__}: {e}")
        return server.completion_response(choices, job.tokens)

    return app


def make_server(
    server: TeacherServer, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None
) -> Any:
    """A ``uvicorn.Server`` for ``server`` (``.run()`` blocks; SIGTERM / Ctrl-C shut it down gracefully)."""
    import uvicorn

    check_bind(host, api_key)
    app = build_app(server, api_key=api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
    return uvicorn.Server(config)


def check_bind(host: str, api_key: str | None) -> None:
    if host not in LOOPBACK and not api_key:
        raise ConfigError(
            f"--host {host} exposes the teacher beyond this machine; give --api-key KEY (clients send "
            "'Authorization: Bearer KEY'), or bind 127.0.0.1"
        )


def serve_teacher(
    model_path: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    dtype: str = "auto",
    device: str = "auto",
    api_key: str | None = None,
    max_batch_tokens: int = 8192,
    served_model_name: str | None = None,
    log: Any = print,
) -> int:
    """Load ``model_path`` and serve it until SIGTERM / Ctrl-C (what ``gkd serve-teacher`` runs)."""
    check_bind(host, api_key)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError("gkd serve-teacher needs fastapi and uvicorn: pip install 'gkd[serve]'") from None
    from gkd.forward import is_seq2seq
    from gkd.models import load_model, load_tokenizer

    if max_batch_tokens <= 0:
        raise ConfigError(f"--max-batch-tokens must be positive, got {max_batch_tokens}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":  # as gkd.build.resolve_dtype: bfloat16 on a GPU that has it, else float32
        bf16 = device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if bf16 else "float32"
    tokenizer = load_tokenizer(model_path, "teacher tokenizer")
    model = load_model(model_path, what="teacher", dtype=dtype).to(device)
    if is_seq2seq(model):
        raise ConfigError("gkd serve-teacher serves decoder-only (causal) teachers; this one is seq2seq")
    server = TeacherServer(
        model, tokenizer, model_name=served_model_name or model_path, max_batch_tokens=max_batch_tokens
    )
    log(
        f"gkd serve-teacher: {model_path} on {device}, vocabulary {server.vocab}, at http://{host}:{port} "
        f"({'API key required' if api_key else 'no API key'}); stop with Ctrl-C or SIGTERM"
    )
    uv = make_server(server, host=host, port=port, api_key=api_key)
    if threading.current_thread() is threading.main_thread():
        # uvicorn shuts down gracefully on SIGTERM, then raises the signal again with the handler that was there
        # before it: a no-op one makes that a clean exit (code 0) instead of death by signal
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            uv.run()
        finally:
            signal.signal(signal.SIGTERM, previous)
    else:
        uv.run()
    log("gkd serve-teacher: stopped")
    return 0
