"""gkd serve-teacher (vLLM-compatible prompt_logprobs over HTTP) and the served teacher of a training run."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from gkd.serve import TeacherServer, make_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(server: TeacherServer, api_key: str | None = None):
    """``server`` behind uvicorn in a thread on a free loopback port; yields (base URL, uvicorn server)."""
    port = _free_port()
    uv = make_server(server, host="127.0.0.1", port=port, api_key=api_key)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        if uv.started:
            break
        time.sleep(0.05)
    try:
        yield url, uv
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


def _teacher_server(model_dir: Path, **kw) -> TeacherServer:
    from gkd.models import load_model, load_tokenizer

    path = str(model_dir / "teacher")
    return TeacherServer(load_model(path, what="teacher"), load_tokenizer(path), model_name="teacher", **kw)


def _call(url: str, payload=None, *, key: str | None = None, raw: bytes | None = None):
    """(status, decoded JSON body or None)."""
    data = raw if raw is not None else (None if payload is None else json.dumps(payload).encode())
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            body = r.read()
            return r.status, json.loads(body) if body else None
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, json.loads(body) if body else None


@pytest.fixture(scope="module")
def served(model_dir):
    with running(_teacher_server(model_dir, max_batch_tokens=256)) as (url, _):
        yield url


def test_response_shape_is_vllms(served, model_dir, tokenizer):
    """The shape of vllm/entrypoints/openai/protocol.py: choices[i].prompt_logprobs is a list with None first,
    then {token id (a string in JSON): {logprob, rank, decoded_token}} with the actual token and the top K."""
    from gkd.models import load_model

    assert _call(served + "/health")[0] == 200
    status, models = _call(served + "/v1/models")
    assert status == 200 and models["object"] == "list" and models["data"][0]["id"] == "teacher"
    assert models["gkd"]["vocab_size"] == len(tokenizer)
    ids = tokenizer("the cat sat on the mat")["input_ids"][:12]
    status, out = _call(
        served + "/v1/completions", {"model": "teacher", "prompt": ids, "max_tokens": 0, "prompt_logprobs": 5}
    )
    assert status == 200, out
    assert out["object"] == "text_completion" and len(out["choices"]) == 1
    plp = out["choices"][0]["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    model = load_model(str(model_dir / "teacher"), what="teacher")
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0, :, : len(tokenizer)].float(), -1)
    for pos in range(1, len(ids)):
        entry = plp[pos]
        assert str(ids[pos]) in entry and len(entry) in (5, 6)
        ranks = sorted(v["rank"] for v in entry.values())
        assert ranks[:5] == [1, 2, 3, 4, 5]
        for tok, v in entry.items():
            assert set(v) == {"logprob", "rank", "decoded_token"} and isinstance(v["decoded_token"], str)
            assert abs(v["logprob"] - float(ref[pos - 1, int(tok)])) < 1e-5
            assert v["rank"] == int((ref[pos - 1] > ref[pos - 1, int(tok)]).sum()) + 1
    # several prompts in one request (vLLM's list of token lists); max_tokens 1 accepted as well
    status, out = _call(
        served + "/v1/completions", {"prompt": [ids, ids[:4]], "max_tokens": 1, "prompt_logprobs": 2}
    )
    assert status == 200 and [len(c["prompt_logprobs"]) for c in out["choices"]] == [len(ids), 4]
    # gkd extension: log-probs at extra ids per position from gkd_prompt_logprobs_from on
    extra = [[0, 3], [7]]
    body = {
        "prompt": ids[:6],
        "prompt_logprobs": 1,
        "gkd_prompt_logprobs_from": 4,
        "gkd_extra_token_ids": extra,
    }
    status, out = _call(served + "/v1/completions", body)
    assert status == 200, out
    choice = out["choices"][0]
    assert choice["prompt_logprobs"][:4] == [None] * 4 and choice["gkd_extra_logprobs"][:4] == [None] * 4
    for pos, wanted in zip((4, 5), extra):
        got = choice["gkd_extra_logprobs"][pos]
        assert got == pytest.approx([float(ref[pos - 1, t]) for t in wanted], abs=1e-5)
    assert _call(served + "/v1/completions", {"model": "other", "prompt": ids})[0] == 404


def test_malformed_requests_are_400_and_never_evaluated(served, tmp_path):
    marker = tmp_path / "evaluated"
    code = f"__import__('pathlib').Path('{marker}').touch()"
    bad = [
        {"prompt": "hello"},
        {"prompt": [code]},
        {"prompt": ["1", "2"]},
        {"prompt": [1, 2.5]},
        {"prompt": [1, True]},
        {"prompt": [1, 10**9]},
        {"prompt": [-1, 2]},
        {"prompt": [[1, 2], "x"]},
        {"prompt": []},
        {"prompt": [1, 2], "max_tokens": 16},
        {"prompt": [1, 2], "prompt_logprobs": "5"},
        {"prompt": [1, 2], "prompt_logprobs": {"__class__": code}},
        {"prompt": [1, 2, 3], "gkd_extra_token_ids": [[1], ["x"]]},
        {"prompt": [1, 2, 3], "gkd_temperature": 0},
        [1, 2, 3],
    ]
    for payload in bad:
        status, out = _call(served + "/v1/completions", payload)
        assert status == 400, (payload, out)
        assert out["error"]["message"]
    assert _call(served + "/v1/completions", raw=code.encode())[0] == 400
    assert not marker.exists()


def test_request_over_the_size_limit_is_413(served):
    status, out = _call(served + "/v1/completions", {"prompt": [[1] * 60] * 5, "prompt_logprobs": 1})
    assert status == 413 and "256" in out["error"]["message"]


def test_non_loopback_needs_an_api_key_and_a_wrong_key_is_401(model_dir, capsys):
    from gkd.cli import main

    assert main(["serve-teacher", str(model_dir / "teacher"), "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err
    with running(_teacher_server(model_dir), api_key="s3cret") as (url, _):
        assert _call(url + "/health")[0] == 200  # open, as vLLM's
        assert _call(url + "/v1/models")[0] == 401
        assert _call(url + "/v1/completions", {"prompt": [1, 2]}, key="wrong")[0] == 401
        assert _call(url + "/v1/completions", {"prompt": [1, 2]}, key="s3cret")[0] == 200


def _config(model_dir: Path, out: Path, **kw):
    from tiny import base_config

    return base_config(
        model_name_or_path=str(model_dir / "student"),
        dataset=str(model_dir / "train.jsonl"),
        output_dir=str(out),
        lmbda=1.0,
        max_steps=3,
        per_device_train_batch_size=4,
        **kw,
    )


def _losses(cfg, steps: int) -> list[float]:
    from gkd.trainer import GKDTrainer

    torch.manual_seed(0)
    t = GKDTrainer(cfg)
    return [t.train_step()["loss"] for _ in range(steps)]


@pytest.mark.parametrize("divergence", ["jsd", "reverse_kl"])
def test_on_policy_loss_matches_the_local_teacher_at_full_k(
    served, model_dir, tmp_path, tokenizer, divergence
):
    local = _losses(
        _config(
            model_dir,
            tmp_path / "local",
            divergence=divergence,
            teacher_model_name_or_path=str(model_dir / "teacher"),
        ),
        3,
    )
    remote = _losses(
        _config(
            model_dir,
            tmp_path / "served",
            divergence=divergence,
            teacher_url=served,
            teacher_topk=len(tokenizer),
        ),
        3,
    )
    assert all(v > 0 for v in local)
    assert remote == pytest.approx(local, rel=1e-5)


def test_served_teacher_support_at_small_k(served, model_dir, tokenizer):
    """At K < vocab: fixed-size supports (actual token + top K + the student's top-k), exact log-probs on them."""
    from gkd.data import Batch
    from gkd.models import load_model
    from gkd.teacher import Teacher
    from gkd.teacher_client import ServedTeacher

    student = load_model(str(model_dir / "student"), what="student")
    vocab = len(tokenizer)
    client = ServedTeacher(served, vocab=vocab, topk=4, student_topk=3, student=student).connect(tokenizer)
    assert client.support == 8
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (2, 5), generator=g)
    completion = torch.randint(3, vocab, (2, 4), generator=g)
    cmask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    batch = Batch(prompt, torch.ones_like(prompt, dtype=torch.bool), completion, cmask, [{}, {}])
    top = client.topk(batch)
    assert top.ids.shape == (6, 8) and top.logprobs.shape == (6, 8)
    out = Teacher(load_model(str(model_dir / "teacher"), what="teacher"), vocab).score(batch)
    ref = torch.log_softmax(out.head.logits(out.hidden).float(), -1)
    assert torch.allclose(top.logprobs, ref.gather(-1, top.ids), atol=1e-5)
    targets = completion[cmask]
    assert (top.ids[:, 0] == targets).all()  # the actual token first
    for row in top.ids:
        assert len(set(row.tolist())) == 8
    assert (top.ids[:, 1:4] == ref.topk(4, -1).indices[:, :3]).any()  # the teacher's top tokens are in


def test_teacher_going_down_saves_a_checkpoint_and_names_the_url(model_dir, tmp_path, capsys):
    """The server stops after answering the first step: the run ends with one line naming the URL and a
    checkpoint on disk."""
    from gkd.cli import main

    server = _teacher_server(model_dir)
    answered = threading.Event()
    run_batch = server.run_batch

    def once(jobs):
        result = run_batch(jobs)
        answered.set()
        return result

    server.run_batch = once  # type: ignore[method-assign]
    with running(server) as (url, uv):

        def stop_after_first_answer():
            answered.wait(120)
            uv.should_exit = True

        threading.Thread(target=stop_after_first_answer, daemon=True).start()
        out = tmp_path / "run"
        code = main(
            [
                "distill",
                f"model_name_or_path={model_dir / 'student'}",
                f"dataset={model_dir / 'train.jsonl'}",
                f"output_dir={out}",
                f"teacher_url={url}",
                "teacher_max_retries=1",
                "teacher_timeout=5",
                "lmbda=1",
                "max_steps=300",  # far more than run before the server is gone (a shutdown takes ~0.1 s)
                "max_new_tokens=8",
                "per_device_train_batch_size=4",
                "save_steps=0",
                "progress=false",
            ]
        )
    err = capsys.readouterr().err
    assert code == 2  # an error (the teacher is gone), not an interrupt (130)
    lines = [ln for ln in err.splitlines() if url in ln]
    assert len(lines) == 1 and "did not answer" in lines[0] and "checkpoint saved" in lines[0], err
    assert lines[0].count("resume_from_checkpoint") == 1, err  # the resume advice once
    assert any(p.name.startswith("checkpoint-") for p in out.iterdir())


def test_dead_teacher_at_start_is_one_line(model_dir, tmp_path, capsys):
    from gkd.cli import main

    url = f"http://127.0.0.1:{_free_port()}"
    args = [
        "distill",
        f"model_name_or_path={model_dir / 'student'}",
        f"dataset={model_dir / 'train.jsonl'}",
        f"output_dir={tmp_path / 'run'}",
        f"teacher_url={url}",
        "teacher_max_retries=0",
        "max_steps=1",
        "max_new_tokens=8",
    ]
    t0 = time.perf_counter()
    assert main([*args, "teacher_max_retries=3"]) == 2
    assert time.perf_counter() - t0 < 30  # refused at once, no retries (the time is the student's loading)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and url in err[-1] and err[-1].startswith("error:")
    assert "nothing listens" in err[-1] and "resume" not in err[-1], err


def test_unsupported_with_teacher_url_is_a_config_error():
    from tiny import base_config

    from gkd.errors import ConfigError
    from gkd.preflight import check_paths

    cfg = base_config(
        model_name_or_path="s", dataset="d", teacher_url="http://127.0.0.1:1", teacher_cache="topk", lmbda=0.5
    )
    with pytest.raises(ConfigError, match="not supported with teacher_url yet"):
        check_paths(cfg, have_student=False, have_teacher=False, have_data=False)


def test_stock_vllm_server_path(model_dir, tokenizer):
    """A server without the gkd field in /v1/models (vLLM): no extensions are sent, the support is K ids (the
    actual token and the teacher's top ones), and what needs gkd serve-teacher is a one-line error."""
    from gkd.data import Batch
    from gkd.errors import ConfigError
    from gkd.teacher_client import ServedTeacher

    server = _teacher_server(model_dir)
    plain = server.models_response
    server.models_response = lambda: {k: v for k, v in plain().items() if k != "gkd"}  # type: ignore[method-assign]
    sent = []
    parse = server.parse
    server.parse = lambda body: sent.append(body) or parse(body)  # type: ignore[method-assign]
    vocab = len(tokenizer)
    with running(server) as (url, _):
        with pytest.raises(ConfigError, match="teacher_student_topk"):
            ServedTeacher(url, vocab=vocab, student_topk=2).connect(tokenizer)
        with pytest.raises(ConfigError, match="loss_temperature"):
            ServedTeacher(url, vocab=vocab, temperature=2.0).connect(tokenizer)
        client = ServedTeacher(url, vocab=vocab, topk=5).connect(tokenizer)
        g = torch.Generator().manual_seed(1)
        prompt, completion = (
            torch.randint(3, vocab, (2, 4), generator=g),
            torch.randint(3, vocab, (2, 3), generator=g),
        )
        mask = torch.ones_like(completion, dtype=torch.bool)
        top = client.topk(
            Batch(prompt, torch.ones_like(prompt, dtype=torch.bool), completion, mask, [{}, {}])
        )
    assert top.ids.shape == (6, 5)
    assert (top.ids[:, 0] == completion.reshape(-1)).all()
    assert not any(k.startswith("gkd_") for k in sent[-1]) and sent[-1]["max_tokens"] == 1


def test_cli_server_in_a_subprocess_stops_on_sigterm(model_dir):
    import os
    import signal
    import subprocess
    import sys

    port = _free_port()
    src = str(Path(__file__).resolve().parent.parent / "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "gkd.cli", "serve-teacher", str(model_dir / "teacher"), "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if _call(url + "/health")[0] == 200:
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.1)
        status, out = _call(url + "/v1/completions", {"prompt": [5, 6, 7], "prompt_logprobs": 1})
        assert status == 200 and len(out["choices"][0]["prompt_logprobs"]) == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0
