"""Several teachers at once (config key ``teachers``), routed per record: config checks, the routed loss against the
single-teacher path, the dataset check before any weights load, and ``gkd distill`` end to end."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from tiny import base_config, make_model, micro_batch_loss

from gkd.build import build_run
from gkd.config import GKDConfig
from gkd.data import collate
from gkd.errors import ConfigError, DataError
from gkd.step import gkd_step
from gkd.teachers import RoutedTeachers, RoutedView, route_of, sub_batch


@pytest.fixture(scope="module")
def two(tmp_path_factory, model_dir, tokenizer, records) -> Path:
    """``model_dir`` plus a second teacher (another seed) and training files: routed (every third record names
    ``a``, every third ``b``, the rest none), unrouted (no record names one), one naming an unknown teacher, and
    only_a (every other record names ``a``)."""
    root = tmp_path_factory.mktemp("two_teachers")
    other = make_model("llama_teacher", tokenizer, seed=2)
    other.save_pretrained(root / "teacher_b")
    tokenizer.save_pretrained(root / "teacher_b")
    routed = [dict(r, teacher=("a", "b", None)[i % 3]) for i, r in enumerate(records[:48])]
    unknown = [dict(r) for r in records[:8]]
    unknown[5]["teacher"] = "c"
    only_a = [dict(r, teacher="a") if i % 2 else dict(r) for i, r in enumerate(records[:48])]
    for name, recs in (
        ("routed", routed),
        ("unrouted", records[:48]),
        ("unknown", unknown),
        ("only_a", only_a),
    ):
        with (root / f"{name}.jsonl").open("w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in recs)
    return root


def _teachers(model_dir: Path, two: Path, wa: float = 1.0, wb: float = 1.0) -> list[dict]:
    return [
        {"name": "a", "model_name_or_path": str(model_dir / "teacher"), "weight": wa},
        {"name": "b", "model_name_or_path": str(two / "teacher_b"), "weight": wb},
    ]


def _config(model_dir: Path, out: Path, data: Path, **kw) -> GKDConfig:
    return base_config(
        model_name_or_path=str(model_dir / "student"),
        dataset=str(data),
        output_dir=str(out),
        per_device_train_batch_size=6,
        **kw,
    )


# ---------------------------------------------------------------------------------------------------------------
# the config
# ---------------------------------------------------------------------------------------------------------------
_T = {"name": "a", "model_name_or_path": "x"}


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"teachers": [dict(_T, wieght=1)]}, r"unknown key 'wieght' \(did you mean 'weight'\?\)"),
        ({"teachers": [_T, dict(_T)]}, "names 'a' twice"),
        ({"teachers": [{"name": "a"}]}, "neither model_name_or_path nor teacher_url"),
        ({"teachers": [dict(_T, teacher_url="http://h:1")]}, "both model_name_or_path and teacher_url"),
        ({"teachers": [dict(_T, weight=-1)]}, "'weight' must be a finite number >= 0"),
        ({"teachers": [dict(_T, weight=0), dict(_T, name="b", weight=0)]}, "every weight is 0"),
        (
            {"teachers": [_T], "teacher_model_name_or_path": "y"},
            "'teachers' and 'teacher_model_name_or_path'",
        ),
        ({"teachers": [_T], "teacher_url": "http://h:1"}, "'teachers' and 'teacher_url'"),
        ({"teachers": []}, "empty list"),
        ({"teachers": [dict(_T, name="a b")]}, "needs a 'name'"),
        ({"teachers": ["x"]}, "must be a mapping"),
        ({"teachers": [_T], "seq_kd": True}, "cannot be used with seq_kd"),
        ({"teachers": [_T], "teacher_field": " "}, "'teacher_field' is empty"),
    ],
)
def test_bad_teachers_are_one_line_config_errors(keys, message):
    with pytest.raises(ConfigError, match=message) as e:
        GKDConfig(model_name_or_path="s", dataset="d", **keys)
    assert "\n" not in str(e.value)


def test_teacher_specs_fill_in_the_weight():
    cfg = GKDConfig(teachers=[_T, {"name": "b", "teacher_url": "http://h:1", "weight": 3}])
    specs = cfg.teacher_specs()
    assert [(s.name, s.model_name_or_path, s.teacher_url, s.weight) for s in specs] == [
        ("a", "x", None, 1.0),
        ("b", None, "http://h:1", 3.0),
    ]


def test_teachers_from_a_yaml_file_and_a_command_line_override(tmp_path):
    from gkd.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(
        "teachers:\n  - {name: a, model_name_or_path: x}\n  - {name: b, teacher_url: 'http://h:1'}\n"
    )
    assert [s.name for s in load_config(path).teacher_specs()] == ["a", "b"]
    cfg = load_config(
        path, ["teachers=[{name: c, model_name_or_path: self, weight: 2}]", "teacher_field=src"]
    )
    assert [(s.name, s.weight) for s in cfg.teacher_specs()] == [("c", 2.0)] and cfg.teacher_field == "src"


def test_route_of_reads_the_field():
    assert route_of({"teacher": "a"}, "teacher") == "a"
    assert route_of({"teacher": None}, "teacher") is None  # Arrow rows carry every column, None where absent
    assert route_of({"prompt": "p"}, "teacher") is None
    assert route_of({"who": "b"}, "who") == "b"


# ---------------------------------------------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------------------------------------------
def test_one_teacher_in_teachers_is_the_single_teacher_run_bit_for_bit(model_dir, two, tmp_path):
    common = {"lmbda": 0.5, "max_steps": 3}
    single = build_run(
        _config(
            model_dir,
            tmp_path / "s",
            two / "only_a.jsonl",
            teacher_model_name_or_path=str(model_dir / "teacher"),
            **common,
        )
    )
    one = build_run(
        _config(
            model_dir,
            tmp_path / "o",
            two / "only_a.jsonl",
            teachers=[dict(_teachers(model_dir, two)[0], weight=2.5)],
            **common,
        )
    )
    got = [gkd_step(one, s) for s in range(3)]
    want = [gkd_step(single, s) for s in range(3)]
    assert {r["on_policy"] for r in want} == {True, False}  # both kinds of step compared
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    for g, w in zip(got, want):
        assert g["teacher_loss"]["a"] == g["loss"]
        for key, parts in w["stats"].items():
            assert torch.equal(torch.cat(g["stats"][key]), torch.cat(parts)), key
            assert torch.equal(torch.cat(g["stats"][f"teacher/a/{key}"]), torch.cat(parts)), key


def _batch(run, tokenizer, rows):
    return collate([run.train_data.examples[i] for i in rows], tokenizer.pad_token_id, list(rows))


def _single_runs(model_dir, two, tmp_path, data, **kw):
    return {
        name: build_run(
            _config(model_dir, tmp_path / f"single_{name}", data, teacher_model_name_or_path=path, **kw)
        )
        for name, path in (("a", str(model_dir / "teacher")), ("b", str(two / "teacher_b")))
    }


@pytest.mark.parametrize("divergence", ["jsd", "reverse_kl"])
def test_two_routed_teachers_give_the_per_row_combination_of_single_teacher_losses(
    model_dir, two, tmp_path, tokenizer, divergence
):
    kw = {"divergence": divergence, "lmbda": 0.0}
    routed = build_run(
        _config(
            model_dir, tmp_path / "r", two / "routed.jsonl", teachers=_teachers(model_dir, two, 3, 1), **kw
        )
    )
    single = _single_runs(model_dir, two, tmp_path, two / "routed.jsonl", **kw)
    batch = _batch(routed, tokenizer, range(12))  # rows 0, 3, 6, 9 name a; 1, 4, 7, 10 name b; the rest none
    denominator = float(batch.num_tokens())
    losses: dict[str, float] = {}
    got = micro_batch_loss(routed, batch, denominator)
    with torch.no_grad():
        got_parts = routed.objective.loss(
            batch,
            routed.student_forward(
                batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask
            ),
            routed.teacher.view(batch),
            denominator,
            teacher_losses=losses,
        )
    names = [route_of(r, "teacher") for r in batch.records]
    expected = torch.zeros(())
    by_teacher = {}
    for name, share in (("a", 0.75), ("b", 0.25)):
        mine = torch.tensor([i for i, n in enumerate(names) if n == name])
        unrouted = torch.tensor([i for i, n in enumerate(names) if n is None])
        own = micro_batch_loss(single[name], sub_batch(batch, mine), denominator)
        shared = micro_batch_loss(single[name], sub_batch(batch, unrouted), denominator)
        by_teacher[name] = own + share * shared
        expected = expected + by_teacher[name]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_parts, got)
    for name in ("a", "b"):
        assert losses[name] == pytest.approx(float(by_teacher[name].detach()), rel=1e-5)


def test_unrouted_records_get_the_weighted_sum_of_every_teachers_loss(model_dir, two, tmp_path, tokenizer):
    kw = {"lmbda": 0.0}
    routed = build_run(
        _config(
            model_dir, tmp_path / "r", two / "unrouted.jsonl", teachers=_teachers(model_dir, two, 1, 4), **kw
        )
    )
    single = _single_runs(model_dir, two, tmp_path, two / "unrouted.jsonl", **kw)
    batch = _batch(routed, tokenizer, range(8))
    denominator = float(batch.num_tokens())
    stats: dict[str, list] = defaultdict(list)
    got = micro_batch_loss(routed, batch, denominator, stats=stats)
    a, b = (micro_batch_loss(single[n], batch, denominator) for n in ("a", "b"))
    torch.testing.assert_close(got, 0.2 * a + 0.8 * b, rtol=1e-5, atol=1e-7)
    # the plain diagnostics are the weighted sum per position of each teacher's
    fa, fb = (torch.cat(stats[f"teacher/{n}/forward_kl"]) for n in ("a", "b"))
    torch.testing.assert_close(torch.cat(stats["forward_kl"]), 0.2 * fa + 0.8 * fb)


def test_teachers_score_only_the_rows_routed_to_them(model_dir, two, tmp_path, tokenizer):
    teachers = _teachers(model_dir, two, 1, 0)  # b has no share of unrouted records: only rows naming it
    run = build_run(_config(model_dir, tmp_path / "r", two / "routed.jsonl", teachers=teachers, lmbda=0.0))
    assert isinstance(run.teacher, RoutedTeachers)
    seen: dict[str, list] = {"a": [], "b": []}
    for name, teacher in run.teacher.teachers.items():
        original = teacher.view

        def spy(batch, name=name, original=original):
            seen[name] += [route_of(r, "teacher") for r in batch.records]
            return original(batch)

        teacher.view = spy
    batch = _batch(run, tokenizer, range(12))
    view = run.teacher.view(batch)
    assert isinstance(view, RoutedView) and [p.name for p in view.parts] == ["a", "b"]
    assert sorted(seen["a"], key=str) == sorted(["a"] * 4 + [None] * 4, key=str)
    assert seen["b"] == ["b"] * 4
    only_a = _batch(run, tokenizer, [0, 3, 6])
    seen = {"a": [], "b": []}
    assert [p.name for p in run.teacher.view(only_a).parts] == ["a"] and seen["b"] == []


def test_a_record_naming_an_unknown_teacher_fails_before_any_weights_load(
    model_dir, two, tmp_path, monkeypatch
):
    import gkd.loading

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the data was checked")

    monkeypatch.setattr(gkd.loading, "load_model", no_weights)
    cfg = _config(model_dir, tmp_path / "r", two / "unknown.jsonl", teachers=_teachers(model_dir, two))
    with pytest.raises(
        DataError, match=r"record 6 names teacher 'c' in its 'teacher' field.*teachers are a, b"
    ):
        build_run(cfg)


def test_the_routed_loss_from_full_logits_is_the_per_row_combination():
    """The objective's math alone (pure tensors, the full-logits path): parts built by hand."""
    from gkd.data import Batch
    from gkd.objective import Objective
    from gkd.outputs import ScoringOutput
    from gkd.teachers import RoutedPart

    torch.manual_seed(0)
    lengths = [3, 0, 5, 2]
    mask = torch.tensor([[j < n for j in range(5)] for n in lengths])
    batch = Batch(
        torch.ones(4, 1, dtype=torch.long),
        torch.ones(4, 1, dtype=torch.bool),
        torch.randint(0, 11, (4, 5)),
        mask,
        [{"teacher": "a"}, {}, {}, {"teacher": "b"}],
    )
    n = int(mask.sum())
    student = torch.randn(n, 11, requires_grad=True)
    t = {"a": torch.randn(n, 11), "b": torch.randn(n, 11)}
    objective = Objective.from_config(GKDConfig(divergence="jsd"))
    row_w = {"a": torch.tensor([1.0, 0.4, 0.4, 0.0]), "b": torch.tensor([0.0, 0.6, 0.6, 1.0])}
    parts = []
    for name, w in row_w.items():
        per_position = w[:, None].expand_as(mask)[mask]
        pos = per_position > 0
        parts.append(RoutedPart(name, pos, per_position[pos], ScoringOutput(None, None, t[name][pos])))
    got = objective.loss(batch, ScoringOutput(None, None, student), RoutedView(parts, ["a", "b"]), 10.0)
    row_of = torch.arange(4)[:, None].expand_as(mask)[mask]
    expected = torch.zeros(())
    for name, w in row_w.items():
        for row in range(4):
            if w[row] > 0 and lengths[row]:
                at = row_of == row
                one = sub_batch(batch, torch.tensor([row]))
                part = objective.loss(
                    one, ScoringOutput(None, None, student[at]), ScoringOutput(None, None, t[name][at]), 10.0
                )
                expected = expected + w[row] * part
    torch.testing.assert_close(got, expected)
    got.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_self_can_be_one_of_the_teachers(model_dir, two, tmp_path):
    teachers = [{"name": "a", "model_name_or_path": "self"}, _teachers(model_dir, two)[1]]
    run = build_run(_config(model_dir, tmp_path / "r", two / "routed.jsonl", teachers=teachers, lmbda=0.0))
    me = run.teacher.teachers["a"].model
    start = {n: p.detach().clone() for n, p in run.student.named_parameters()}
    assert all(torch.equal(p, start[n]) for n, p in me.named_parameters())  # a frozen copy of the start
    gkd_step(run, 0)
    assert any(not torch.equal(p, start[n]) for n, p in run.student.named_parameters())
    assert all(torch.equal(p, start[n]) for n, p in me.named_parameters())


def test_a_served_teacher_entry_is_checked_like_teacher_url(model_dir, two, tmp_path):
    teachers = [_teachers(model_dir, two)[0], {"name": "b", "teacher_url": "127.0.0.1:8000"}]
    with pytest.raises(ConfigError, match="'teacher_url' must be an http:// or https:// URL"):
        build_run(_config(model_dir, tmp_path / "r", two / "routed.jsonl", teachers=teachers))


# ---------------------------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------------------------
def _two_teacher_yaml(model_dir: Path, two: Path, out: Path, path: Path, extra: str = "") -> Path:
    path.write_text(
        f"model_name_or_path: {model_dir / 'student'}\n"
        f"dataset: {two / 'routed.jsonl'}\n"
        f"output_dir: {out}\n"
        "teachers:\n"
        f"  - {{name: a, model_name_or_path: {model_dir / 'teacher'}, weight: 2}}\n"
        f"  - {{name: b, model_name_or_path: {two / 'teacher_b'}}}\n"
        "lmbda: 0.5\nmax_steps: 3\nper_device_train_batch_size: 4\nmax_new_tokens: 8\nlogging_steps: 1\n"
        "save_steps: 0\nprogress: false\nlearning_rate: 0.003\n" + extra
    )
    return path


def _check_teacher_losses(out: Path, diagnostics: bool = True) -> None:
    """Every step of metrics.jsonl logs both teachers' losses, which sum to the step's loss (no reward), and (with
    ``diagnostics``) each teacher's diagnostics."""
    from gkd.reporting import read_metrics

    steps = [r for r in read_metrics(out) if "teacher/a/loss" in r]
    assert len(steps) == 3
    for r in steps:
        parts = r["teacher/a/loss"] + r["teacher/b/loss"]
        assert math.isfinite(parts) and r["loss"] == pytest.approx(parts, rel=1e-6)
        assert "forward_kl" in r
        if diagnostics:
            assert "teacher/a/forward_kl" in r and "teacher/b/forward_kl" in r


def test_gkd_distill_with_two_routed_teachers_logs_each_teachers_loss(model_dir, two, tmp_path):
    from gkd.cli import main

    out = tmp_path / "run"
    assert (
        main(["distill", "--config", str(_two_teacher_yaml(model_dir, two, out, tmp_path / "two.yaml"))]) == 0
    )
    _check_teacher_losses(out)


@pytest.mark.slow
def test_two_routed_teachers_in_two_processes(model_dir, two, tmp_path):
    """DDP (2 CPU processes): each rank routes its own rows; the logged teachers' losses are over both ranks."""
    from launch import two_processes

    out = tmp_path / "run"
    config = _two_teacher_yaml(model_dir, two, out, tmp_path / "two.yaml", "num_threads: 1\n")
    script = tmp_path / "distill.py"
    script.write_text("import sys\nfrom gkd.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    proc = two_processes(script, "distill", "--config", config, port=29541)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_teacher_losses(
        out, diagnostics=False
    )  # (rank 0's diagnostics: its rows may name one teacher only)


def test_a_served_teacher_mixes_with_a_local_one(model_dir, two, tmp_path, tokenizer):
    """Teacher b served over HTTP (gkd serve-teacher at full top-k: the local teacher's loss up to rounding)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import socket
    import threading
    import time

    from gkd.models import load_model, load_tokenizer
    from gkd.serve import TeacherServer, make_server

    path = str(two / "teacher_b")
    server = TeacherServer(load_model(path, what="teacher"), load_tokenizer(path), model_name="b")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = make_server(server, host="127.0.0.1", port=port)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if uv.started:
                break
            time.sleep(0.05)
        served = _teachers(model_dir, two, 3, 1)
        served[1] = {"name": "b", "teacher_url": f"http://127.0.0.1:{port}", "weight": 1}
        kw = {"lmbda": 0.5, "teacher_topk": len(tokenizer)}
        mixed = build_run(_config(model_dir, tmp_path / "m", two / "routed.jsonl", teachers=served, **kw))
        local = build_run(
            _config(
                model_dir,
                tmp_path / "l",
                two / "routed.jsonl",
                teachers=_teachers(model_dir, two, 3, 1),
                **kw,
            )
        )
        got = [gkd_step(mixed, s) for s in range(2)]
        want = [gkd_step(local, s) for s in range(2)]
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-4)
    for g, w in zip(got, want):
        assert g["teacher_loss"] == pytest.approx(w["teacher_loss"], rel=1e-4)
