"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``), config key ``fsdp`` (TRL's ``fsdp:
full_shard``).

accelerate cannot shard on the CPU, so gkd shards the student itself, as torchtune and torchtitan do: every decoder
layer (the classes of the model's ``_no_split_modules``) is one FSDP unit and the model's root (embeddings, final
norm, head) another, over a 1-D device mesh of all processes (``torchrun`` / ``accelerate launch`` set up the process
group). The optimizer holds the sharded parameters (DTensors), so its state is sharded too.

* **The loss.** gkd's fused loss runs the base model and applies the head later, in chunks, outside the model's
  ``forward``. :class:`ShardedStudentForward` therefore runs the scoring as a registered FSDP forward method of the root
  (:func:`torch.distributed.fsdp.register_fsdp_forward_method`): the root's weights (the head among them) are
  all-gathered before it and, as FSDP2 does for the root, stay gathered until the backward pass, which reduce-scatters
  their gradients after the loss has used them.
* **Rollouts and evaluation** sample from a full, unsharded copy of the student (:attr:`ShardedStudent.module`, what
  :func:`gkd.models.unwrap` returns), refreshed by one all-gather after every optimizer step. Sampling through the
  sharded module would all-gather every layer at every generated token, and all ranks would have to generate the
  same number of tokens in lockstep (they stop at different EOS); the copy needs no collective while sampling, so
  rank 0 can also evaluate alone. Its cost: one full copy of the weights per rank (gradients and optimizer state stay
  sharded).
* **Clipping** (:func:`clip_grad_norm_`): the norm over all shards (a DTensor reduced to the global value).
* **Checkpoints**: every rank writes its own shards (``shard-rank{R}.pt``: model and optimizer, as local tensors) and
  its own RNG state into the checkpoint's temporary folder (see :mod:`gkd.checkpoint`); rank 0 also writes the full
  weights from the gathered copy with ``save_pretrained``, so a checkpoint still loads anywhere. A sharded
  checkpoint resumes with the same number of processes.
* **The teacher** is not sharded: every rank holds a full copy (inference only, no gradients or optimizer state).

Tested on the CPU with gloo (2 processes); GPU / NCCL runs have not been run.
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from gkd.errors import ConfigError
from gkd.forward import StudentForward, fused_head_supported, head_of, is_seq2seq, score_positions
from gkd.outputs import ScoringOutput

__all__ = [
    "ShardedScorer",
    "ShardedStudent",
    "ShardedStudentForward",
    "clip_grad_norm_",
    "fsdp_accelerator",
    "is_sharded",
    "load_shards",
    "local_shards",
    "shard_student",
]


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


class ShardedStudent(nn.Module):
    """The student sharded with FSDP2 (``sharded``: its parameters are what the optimizer trains) and a full copy of
    its weights (``module``, not a registered sub-module: no gradients, not in the optimizer) for rollouts,
    evaluation and ``save_pretrained``. :meth:`refresh` all-gathers the shards into the copy (every rank).

    The full copy is the model object given (a student passed from Python stays a plain model and holds the trained
    weights after every step); the sharded one is a copy of it."""

    def __init__(self, full: nn.Module, mesh: Any) -> None:
        super().__init__()
        model = copy.deepcopy(full)
        full.requires_grad_(False)
        layers = set(getattr(model, "_no_split_modules", None) or ())
        units = [m for m in model.modules() if type(m).__name__ in layers]
        if not units:
            raise ConfigError(
                f"config key 'fsdp': the student ({type(model).__name__}) names no decoder layer class "
                "(_no_split_modules) to shard; drop the key"
            )
        from torch.distributed.fsdp import fully_shard

        for unit in units:
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.sharded = model
        object.__setattr__(self, "module", full)  # gkd.models.unwrap() returns it; not a sub-module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.sharded(*args, **kwargs)

    @property
    def config(self) -> Any:
        return self.module.config

    @property
    def generation_config(self) -> Any:
        return getattr(self.module, "generation_config", None)

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        """The full weights (the gathered copy), as transformers writes them."""
        return self.module.save_pretrained(*args, **kwargs)

    @torch.no_grad()
    def refresh(self) -> None:
        """All-gather every sharded parameter into the full copy (a collective: every rank calls it)."""
        full = dict(self.module.named_parameters())
        for name, p in self.sharded.named_parameters():
            full[name].copy_(p.full_tensor() if _is_dtensor(p) else p)

    @torch.no_grad()
    def load_full(self) -> None:
        """The reverse of :meth:`refresh`: the full copy's weights into the shards (after loading the copy)."""
        from torch.distributed.tensor import distribute_tensor

        full = dict(self.module.named_parameters())
        for name, p in self.sharded.named_parameters():
            if _is_dtensor(p):
                p.to_local().copy_(distribute_tensor(full[name], p.device_mesh, p.placements).to_local())
            else:
                p.copy_(full[name])


def is_sharded(model: Any) -> bool:
    return isinstance(model, ShardedStudent)


def shard_student(model: nn.Module, device: Any) -> ShardedStudent:
    """``model`` (on ``device``) sharded over every process of the run (needs the process group)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError(
            "config key 'fsdp' needs a distributed launch (torchrun or accelerate launch with several processes)"
        )
    if hasattr(model, "peft_config"):
        raise ConfigError("config key 'fsdp' with a LoRA adapter is not supported yet; drop one of the two")
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    return ShardedStudent(model, mesh)


class ShardedStudentForward(StudentForward):
    """:class:`gkd.models.StudentForward` over the sharded student: the scoring runs as an FSDP forward method of the root,
    so the head weight the fused loss reads after it is the gathered one and its gradient is reduce-scattered."""

    def __init__(self, model: nn.Module, vocab: int | None, fused: bool, autocast: Any = None) -> None:
        super().__init__(model, vocab, fused)
        self._autocast = autocast or contextlib.nullcontext
        if not hasattr(model, "gkd_score"):
            from torch.distributed.fsdp import register_fsdp_forward_method

            def gkd_score(module: nn.Module, *args: Any) -> torch.Tensor:
                return score_positions(module, *args, fused=True).hidden

            model.gkd_score = types.MethodType(gkd_score, model)
            register_fsdp_forward_method(model, "gkd_score")

    def forward(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
    ) -> Any:
        args = (prompt_ids, prompt_mask, completion_ids, completion_mask)
        with self._autocast():
            if self.fused and not is_seq2seq(self.model) and fused_head_supported(self.model):
                hidden = self.model.gkd_score(*args)
                # the root is not resharded after its forward (FSDP2): this is the gathered head, until backward
                head = head_of(self.model, self.model.get_output_embeddings(), self.vocab)
                return ScoringOutput(hidden, head, None)
            return score_positions(self.model, *args, vocab=self.vocab, fused=self.fused)  # model(...) itself

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Gradient accumulation (accelerate's ``no_sync``): no reduce-scatter until the last micro-batch."""
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)


def fsdp_accelerator(base: type) -> type:
    """A subclass of accelerate's ``Accelerator`` that prepares the :class:`gkd.models.StudentForward` of a
    sharded student as a :class:`ShardedStudentForward` instead of wrapping it in DDP (everything else as accelerate does it)."""

    class FSDPAccelerator(base):  # type: ignore[misc, valid-type]
        gkd_fsdp = True

        def prepare_model(
            self, model: Any, device_placement: Any = None, evaluation_mode: bool = False
        ) -> Any:
            if isinstance(model, StudentForward) and is_sharded(model.model):
                scorer = ShardedStudentForward(
                    model.model.sharded, model.vocab, model.fused, autocast=self.autocast
                )
                self._models.append(scorer)
                return scorer
            return super().prepare_model(
                model, device_placement=device_placement, evaluation_mode=evaluation_mode
            )

    return FSDPAccelerator


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip the gradients of (sharded) ``params`` to the global norm ``max_norm``; returns that norm (every rank)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if _is_dtensor(total):
        total = total.full_tensor()
    if max_norm != float("inf"):
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
    return float(total)


def has_nonfinite_grad(p: torch.Tensor) -> bool:
    return p.grad is not None and not bool(torch.isfinite(_local(p.grad)).all())


# ---------------------------------------------------------------------------------------------------------------
# sharded checkpoints: local tensors only (torch.load(weights_only=True) reads them back)
# ---------------------------------------------------------------------------------------------------------------
def _to_local(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return _local(obj).detach().clone()
    if isinstance(obj, dict):
        return {k: _to_local(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_local(v) for v in obj)
    return obj


def local_shards(student: ShardedStudent, optimizer: Any) -> dict[str, Any]:
    """This rank's shards of the model and of the optimizer state, as plain tensors."""
    return {
        "model": {n: _local(p).detach().clone() for n, p in student.sharded.named_parameters()},
        "optimizer": _to_local(optimizer.state_dict()),
    }


@torch.no_grad()
def load_shards(student: ShardedStudent, optimizer: Any, shards: dict[str, Any]) -> None:
    """:func:`local_shards` back into the sharded model and the optimizer (same number of processes), then the full
    copy is refreshed."""
    from torch.distributed.tensor import DTensor

    params = dict(student.sharded.named_parameters())
    saved = shards["model"]
    if set(saved) != set(params):
        raise ValueError(f"the shards hold other weights ({sorted(set(saved) ^ set(params))[:3]})")
    for name, p in params.items():
        local = _local(p)
        if tuple(saved[name].shape) != tuple(local.shape):
            raise ValueError(
                f"shard of {name} has shape {tuple(saved[name].shape)}, expected {tuple(local.shape)}"
            )
        local.copy_(saved[name])
    state = shards["optimizer"]
    flat = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state.get("state", {}).items():
        p = flat[int(index)]
        if not _is_dtensor(p):
            continue
        for key, value in list(entry.items()):
            if (
                isinstance(value, torch.Tensor)
                and tuple(value.shape) == tuple(p.to_local().shape)
                and value.dim()
            ):
                entry[key] = DTensor.from_local(
                    value.to(p.to_local().device),
                    p.device_mesh,
                    p.placements,
                    shape=p.shape,
                    stride=p.stride(),
                )
    optimizer.load_state_dict(state)
    student.refresh()


ShardedScorer = ShardedStudentForward  # the earlier name
