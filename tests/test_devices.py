"""Device discipline without a GPU: gkd trains on a pretend accelerator, and every device mix CUDA rejects fails here.

CI has no GPU, so the guard is a pretend device (``tests/pretend_device.py``): tensors that report device ``meta``
while computing on the CPU, a dispatch mode that builds them wherever gkd asks for "the data's device", and
``torch.Generator(device=...)`` generators of that device. A run is put on it the way a GPU run is: the trainer's
``Accelerator`` reports the pretend device, so ``gkd.build.build_run`` moves the student, teacher and reference
there, batches follow ``run.device`` and generators are created on it.

What the guard catches (each raises ``DeviceMixError``), as CUDA would:
    * a CPU tensor of one or more dimensions meeting a tensor of the device in any op (``isin``, ``gather``,
      indexing a CPU tensor with a device mask, embedding CPU ids with device weights, ...);
    * a CPU tensor written in place or used as ``out=`` by an op with device inputs (e.g. a CPU accumulator
      ``total += loss``); a 0-dim CPU *input* is allowed, as CUDA allows a CPU scalar;
    * a CPU ``torch.Generator`` drawing for the device, or a device generator drawing for the CPU.
What it cannot catch: anything about CUDA itself (kernels, numerics of GPU reductions, memory, speed, streams,
non-blocking copies, NCCL), ops whose device rules differ from the ones above, code paths taken only when
``device.type == "cuda"`` (the pretend device is neither ``cpu`` nor ``cuda``; gkd's "not CPU" branches run), vLLM,
and checkpoint writing (``save_pretrained`` of device tensors is not exercised: the runs here never save).

The §0 paths of the feature audit run under it (fused loss with its statistics, the fast sampler, evaluation
sampling, SeqKD, the top-k cache build and reload, RL rewards and their EOS mask, the discounted reverse-KL
returns, the KL to the initial student, a LoRA student on the ``generate`` sampler), and
``test_the_guard_catches_each_device_bug_of_the_audit`` puts each of the audit's bugs back and checks it fails.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import accelerate
import pytest
import torch
from device_paths import SCENARIOS, run_scenario, scenario_trainer
from pretend_device import PRETEND, DeviceMixError, PretendGenerator, is_pretend, pretend_device, real
from tiny import micro_batch_loss

import gkd.build
import gkd.fused
import gkd.objective
import gkd.rl
import gkd.sampling
import gkd.sampling.local
from gkd.teacher import Teacher, TopKCache
from gkd.trainer import GKDTrainer


class _PretendAccelerator(accelerate.Accelerator):
    """The trainer's Accelerator (a CPU one here), reporting the pretend device as the run's device."""

    @property
    def device(self) -> torch.device:
        return PRETEND


@contextlib.contextmanager
def on_device() -> Iterator[torch.device]:
    """Inside: the pretend device exists, and runs built by ``gkd.build.build_run`` live on it."""
    saved = accelerate.Accelerator
    accelerate.Accelerator = _PretendAccelerator  # type: ignore[misc]
    try:
        with pretend_device() as device:
            yield device
    finally:
        accelerate.Accelerator = saved  # type: ignore[misc]


@pytest.fixture
def samplers(monkeypatch):
    """Counts which in-process sampling path ran (``fast`` or ``generate``)."""
    calls: Counter = Counter()
    for name in ("fast", "generate"):
        original = getattr(gkd.sampling.local, f"sample_{name}")

        def spy(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(gkd.sampling.local, f"sample_{name}", spy)
    return calls


def _trainer(tokenizer, records, eval_records, out: Path, log: list[str] | None = None, **cfg) -> GKDTrainer:
    return scenario_trainer(tokenizer, records, eval_records, out, log=log, **cfg)


def _check_on_device(trainer: GKDTrainer) -> None:
    run = trainer.run
    assert run is not None
    assert all(is_pretend(p) for p in run.student.parameters())
    for frozen in (run.teacher, run.reference):
        if frozen is not None:
            assert all(is_pretend(p) for p in frozen.model.parameters())
    assert isinstance(run.rollout_gen, PretendGenerator)
    if run.topk_cache is not None:
        assert all(
            is_pretend(t) for t in (run.topk_cache.ids, run.topk_cache.logprobs, run.topk_cache.offsets)
        )


def _run_scenario(
    name: str, tokenizer, records, eval_records, tmp_path: Path, check: bool = True
) -> list[dict]:
    """The scenario's run (tests/device_paths.py), asserting (``check``) that every component is on the device."""
    return run_scenario(
        name, tokenizer, records, eval_records, tmp_path / "out", check=_check_on_device if check else None
    )


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_path_of_the_audit_runs_on_a_pretend_device(
    name, samplers, tokenizer, records, eval_records, tmp_path
):
    with on_device():
        steps = _run_scenario(name, tokenizer, records, eval_records, tmp_path)
    for record in steps:
        assert torch.isfinite(torch.tensor(record["loss"]))
        assert record["completion_tokens"] > 0
    if name == "on_policy_fast_sampler":
        assert samplers["fast"] >= 3 and not samplers["generate"]  # rollout, greedy and sampled evaluation
    if name == "lora_generate_sampler":
        assert samplers["generate"] and not samplers["fast"]
    if name in ("rl_rewards", "kl_to_initial"):
        assert "reward_mean" in steps[0] and "kl_to_initial" in steps[0]


def test_the_pretend_device_computes_the_cpu_values(tokenizer, records, eval_records, tmp_path):
    """Not a mock: the loss of a batch (teacher forward, student forward, fused loss) and the gradient of every
    parameter are the CPU run's, up to float rounding (attention takes SDPA's math path off the CPU)."""
    cfg = SCENARIOS["fused_loss_off_policy"]
    results = []
    for where in ("cpu", "device"):
        with on_device() if where == "device" else contextlib.nullcontext():
            trainer = _trainer(tokenizer, records, eval_records, tmp_path / where, **cfg)
            run = trainer.run
            batch = run.stream.next().to(run.device)
            loss = micro_batch_loss(run, batch, float(batch.num_tokens()))
            loss.backward()
            grads = {n: real(p.grad).clone() for n, p in run.student.named_parameters()}
            results.append((float(loss.detach()), grads))
    (cpu_loss, cpu_grads), (dev_loss, dev_grads) = results
    assert dev_loss == pytest.approx(cpu_loss, rel=1e-5)
    assert cpu_grads.keys() == dev_grads.keys()
    for name, g in cpu_grads.items():
        torch.testing.assert_close(dev_grads[name], g, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# the audit's §0 bugs, put back one at a time
# ---------------------------------------------------------------------------------------------------------------
class _TorchForgettingDevice:
    """``torch`` as a module sees it, except that ``factory`` ignores ``device=`` (the device-ignorant form)."""

    def __init__(self, factory: str) -> None:
        setattr(self, factory, lambda *args, device=None, **kwargs: getattr(torch, factory)(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _forget_device(monkeypatch, module: Any, factory: str) -> None:
    monkeypatch.setattr(module, "torch", _TorchForgettingDevice(factory))


def _cache_reloaded_on_the_cpu(monkeypatch) -> None:
    load = TopKCache.load.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(TopKCache, "load", classmethod(lambda cls, path, device="cpu": load(cls, path)))


def _teacher_on_the_cpu(monkeypatch) -> None:
    monkeypatch.setattr(Teacher, "device", property(lambda self: torch.device("cpu")))


# bug -> (what puts it back, the scenario that hits it, the gkd function it must be caught in)
BUGS = {
    "fused loss accumulates into a CPU total": (
        lambda mp: _forget_device(mp, gkd.fused, "zeros"),
        "fused_loss_off_policy",
        "chunked_loss",
    ),
    "rollout generator on the CPU": (
        lambda mp: _forget_device(mp, gkd.build, "Generator"),
        "on_policy_fast_sampler",
        "student_samples",
    ),
    "evaluation generator on the CPU": (
        lambda mp: _forget_device(mp, gkd.sampling, "Generator"),
        "on_policy_fast_sampler",
        "generate_ids",
    ),
    "SeqKD generator on the CPU": (
        lambda mp: _forget_device(mp, gkd.sampling, "Generator"),
        "seqkd",
        "seqkd_dataset",
    ),
    "top-k cache built from CPU batches": (_teacher_on_the_cpu, "topk_cache", "build_topk_cache"),
    "top-k cache reloaded on the CPU": (_cache_reloaded_on_the_cpu, "topk_cache", "topk_tail"),
    "RL EOS mask on the CPU": (
        lambda mp: _forget_device(mp, gkd.rl, "tensor"),
        "rl_rewards",
        "score_samples",
    ),
    "discounted RKL returns on the CPU": (
        lambda mp: _forget_device(mp, gkd.objective, "zeros"),
        "discounted_rkl",
        "discounted_rkl_returns",
    ),
}


@pytest.mark.parametrize("bug", list(BUGS))
def test_the_guard_catches_each_device_bug_of_the_audit(
    bug, monkeypatch, tokenizer, records, eval_records, tmp_path
):
    """Each bug of the audit's §0, put back in its old device-ignorant form, fails on the pretend device, in the
    function where it lives (the same scenarios pass with the fixes: the test above)."""
    put_back, scenario, where = BUGS[bug]
    put_back(monkeypatch)
    with on_device(), pytest.raises(DeviceMixError) as caught:
        _run_scenario(scenario, tokenizer, records, eval_records, tmp_path, check=False)
    assert where in [entry.name for entry in caught.traceback if "gkd" in str(entry.path)]


# ---------------------------------------------------------------------------------------------------------------
# the guard's own rules
# ---------------------------------------------------------------------------------------------------------------
def test_the_guard_refuses_what_cuda_refuses_and_allows_what_it_allows():
    with pretend_device() as dev:
        x = torch.arange(6.0).reshape(2, 3).to(dev)
        cpu = torch.ones(3)
        allowed = {
            "a 0-dim CPU input": lambda: x * torch.tensor(2.0),
            "a CPU index into a device tensor": lambda: x[torch.tensor([1, 0])],
            "a CPU mask assigning into a device tensor": lambda: x.__setitem__(
                torch.tensor([True, False]), 0.0
            ),
            "moves both ways": lambda: (cpu.to(dev), x.cpu(), x.to("cpu"), torch.zeros(2).copy_(x[0, :2])),
            "a device generator drawing on the device": lambda: torch.rand(
                2, device=dev, generator=torch.Generator(device=dev)
            ),
            "reading values back": lambda: (x.sum().item(), x.tolist(), float(x[0, 0]), bool(x.any())),
        }
        for op in allowed.values():
            op()
        refused = {
            "a 1-dim CPU input": lambda: x + cpu,
            "a CPU output": lambda: torch.zeros((), dtype=torch.float64).add_(x.sum()),
            "a CPU out=": lambda: torch.mul(x, 2, out=torch.empty(2, 3)),
            "a device mask into a CPU tensor": lambda: torch.zeros(2, 3)[x > 1],
            "isin with CPU test elements": lambda: torch.isin(x, torch.tensor([1.0])),
            "a CPU generator drawing on the device": lambda: torch.rand(
                2, device=dev, generator=torch.Generator()
            ),
            "a device generator drawing on the CPU": lambda: torch.rand(
                2, generator=torch.Generator(device=dev)
            ),
        }
        for what, op in refused.items():
            try:
                op()
            except DeviceMixError:
                continue
            pytest.fail(f"the guard let {what} through")
        with pytest.raises(TypeError):
            x.numpy()
        # a device generator draws the CPU sequence of its seed: CPU runs and the guard see the same numbers
        draws = torch.rand(4, device=dev, generator=torch.Generator(device=dev).manual_seed(3))
    assert torch.equal(real(draws), torch.rand(4, generator=torch.Generator().manual_seed(3)))
    assert torch.Generator is torch._C.Generator  # restored on exit


def test_auto_takes_the_fast_loop_only_on_devices_it_is_validated_on(
    samplers, tokenizer, records, eval_records, tmp_path
):
    """On a device the fast loop has not been checked on (the pretend device here, CUDA until
    benchmarks/gpu_check.py has passed there), ``rollout_backend: auto`` samples with model.generate and says so."""
    from gkd.sampling.fast import auto_fast_reason

    log: list[str] = []
    with on_device():
        trainer = _trainer(
            tokenizer, records, eval_records, tmp_path / "out", log=log, lmbda=1.0, rollout_backend="auto"
        )
        assert "validated on cpu only" in (auto_fast_reason(trainer.run.sampling_model, 32) or "")
        trainer.train_step()
    assert samplers["generate"] >= 1 and not samplers["fast"]
    assert any(line.startswith("rollouts: model.generate") and "validated" in line for line in log)
