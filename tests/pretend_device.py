"""A pretend accelerator for CPU-only tests: tensors that report a non-CPU device, computed on the CPU.

CI has no GPU, and on a CPU build of torch nothing that reports device ``cuda`` can run. The pretend device is
``meta``, which has a device guard on every build (so autograd runs), and is made real here:

* :class:`PretendTensor` is a ``__torch_dispatch__`` wrapper subclass that reports device ``meta`` while holding a
  real CPU tensor (``elem``). Every op on it unwraps, runs on the CPU and wraps the result again, so forward,
  backward, optimizers, ``.item()``, ``.tolist()`` and ``float()`` give real values.
* :func:`pretend_device` is a context manager that makes the device reachable the way gkd reaches a device: a
  ``TorchDispatchMode`` turns factory calls on it (``torch.zeros(..., device=x.device)``, ``torch.tensor(...,
  device=...)``, ``x.to(device)``, ``module.to(device)``) into pretend tensors, and ``torch.Generator(device=...)``
  builds a :class:`PretendGenerator` (a CPU generator that reports the pretend device and draws exactly the CPU
  sequence of the same seed).
* Both raise :class:`DeviceMixError` on every op that CUDA rejects: a CPU tensor of one or more dimensions meeting
  a pretend one (CPU index tensors of ``x[idx]`` / ``x[idx] = v`` on a pretend ``x`` are allowed, as on CUDA); a CPU
  tensor written in place or used as ``out=`` by an op with pretend inputs (a 0-dim CPU *input* is allowed, as
  CUDA allows a CPU scalar); a CPU ``torch.Generator`` used for a draw on the pretend device, or a pretend
  generator used for a CPU draw. Explicit copies between devices (``.to``, ``copy_``, ``.cpu()``) are allowed.

What it cannot tell: anything about CUDA itself (kernels, numerics, memory, speed, streams, non-blocking copies),
ops whose device rules differ from the ones above, and code that branches on ``device.type == "cuda"`` (the
pretend device is neither ``cpu`` nor ``cuda``: code written for "any accelerator" takes its non-CPU branch).
Real ``meta`` tensors cannot be used inside the context (they would be taken for the pretend device).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = [
    "PRETEND",
    "DeviceMixError",
    "PretendGenerator",
    "PretendTensor",
    "is_pretend",
    "pretend_device",
    "real",
]

PRETEND = torch.device("meta")
aten = torch.ops.aten

_RealGenerator = torch._C.Generator


class DeviceMixError(RuntimeError):
    """An op that CUDA would reject: tensors (or a generator) of the pretend device meeting CPU ones."""


# ---------------------------------------------------------------------------------------------------------------
# the tensor
# ---------------------------------------------------------------------------------------------------------------
class PretendTensor(torch.Tensor):
    """A tensor on the pretend device (reports ``meta``) whose values live in the CPU tensor ``elem``."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> PretendTensor:
        r = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.size(),
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            layout=elem.layout,
            device=PRETEND,
            requires_grad=False,
        )
        r.elem = elem
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    # A traceable wrapper subclass: ``module.to(device)`` then swaps each parameter in place
    # (``torch.utils.swap_tensors``), so tied weights stay one parameter, as with a real device.
    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return ["elem"], None

    @staticmethod
    def __tensor_unflatten__(inner: dict, ctx: Any, size: Any, stride: Any) -> PretendTensor:
        return PretendTensor(inner["elem"])

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"PretendTensor({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})

    # Methods that read the data without dispatching anything: as on CUDA, .tolist() copies to the host and
    # .numpy() refuses.
    def tolist(self) -> Any:
        return self.elem.tolist()

    def numpy(self, *, force: bool = False) -> Any:
        raise TypeError(
            "can't convert a pretend-device tensor to numpy; use Tensor.cpu() first (as for CUDA)"
        )


def is_pretend(t: Any) -> bool:
    return isinstance(t, PretendTensor)


def real(t: torch.Tensor) -> torch.Tensor:
    """The CPU tensor behind a pretend tensor (a plain tensor is returned as it is)."""
    return t.elem if isinstance(t, PretendTensor) else t


# ---------------------------------------------------------------------------------------------------------------
# the generator
# ---------------------------------------------------------------------------------------------------------------
class PretendGenerator(_RealGenerator):
    """A generator of the pretend device: a CPU generator (the same seed draws the same numbers as on the CPU)
    that reports the pretend device. Draws on the CPU with it raise, as a CUDA generator's would."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return PRETEND


class _GeneratorMeta(type):
    """``torch.Generator`` inside :func:`pretend_device`: ``torch.Generator(device=pretend)`` is a
    :class:`PretendGenerator`, anything else a real generator; ``isinstance`` checks keep working."""

    def __call__(cls, device: Any = "cpu") -> _RealGenerator:
        if device is not None and torch.device(device).type == PRETEND.type:
            return PretendGenerator()
        return _RealGenerator() if device is None else _RealGenerator(device)

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, _RealGenerator)

    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, _RealGenerator)


class _Generator(metaclass=_GeneratorMeta):
    pass


# ---------------------------------------------------------------------------------------------------------------
# the rules
# ---------------------------------------------------------------------------------------------------------------
# ops that move data between devices (any mix is fine) or only read a scalar back
_CROSS_DEVICE = {
    aten.to,
    aten._to_copy,
    aten.copy_,
    aten._copy_from,
    aten._copy_from_and_resize,
    aten._local_scalar_dense,
}
# indexing ops whose ``indices`` may be CPU tensors when ``self`` is on the device
_INDEXING = {
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
}


def _describe(func: Any) -> str:
    return str(func).replace("aten.", "torch.ops.aten.")


def _check_generator(func: Any, generator: Any, pretend_op: bool) -> None:
    """A draw on the pretend device needs a pretend generator, a CPU draw a CPU generator (as on CUDA)."""
    name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
    if pretend_op and not isinstance(generator, PretendGenerator):
        raise DeviceMixError(
            f"{name}: a CPU torch.Generator draws for the pretend device (on CUDA: \"Expected a 'cuda' device type "
            "for generator but found 'cpu'\"); create it with torch.Generator(device=<the data's device>)"
        )
    if not pretend_op and isinstance(generator, PretendGenerator):
        raise DeviceMixError(
            f"{name}: a pretend-device generator draws for the CPU (on CUDA: \"Expected a 'cpu' device type for "
            "generator but found 'cuda'\")"
        )


def _check(func: Any, args: tuple, kwargs: dict) -> None:
    """Raise :class:`DeviceMixError` where CUDA would refuse an op of the pretend device (module docstring)."""
    if func.overloadpacket in _CROSS_DEVICE:
        return
    schema = func._schema
    for i, arg in enumerate(schema.arguments):
        value = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
        written = arg.alias_info is not None and arg.alias_info.is_write
        for t in tree_flatten(value)[0]:
            if not isinstance(t, torch.Tensor) or isinstance(t, PretendTensor) or t.device.type != "cpu":
                continue
            if func in _INDEXING and arg.name == "indices":
                continue
            if t.dim() == 0 and not written:
                continue  # a CPU scalar as an input: CUDA allows it
            what = "written by" if written else f"{t.dim()}-dim input '{arg.name}' of"
            raise DeviceMixError(
                f"{_describe(func)}: a CPU tensor {tuple(t.shape)} ({what} the op) meets tensors of the pretend "
                'device; on CUDA: "Expected all tensors to be on the same device"'
            )


def _placement(func: Any, args: tuple, kwargs: dict) -> tuple[bool, tuple, dict]:
    """Whether ``func`` runs on (or moves data to) the pretend device, and its arguments with the pretend device
    replaced by the CPU. The device is the op's ``Device`` argument when it has one (factories, ``.to``), else
    the pretend device when a pretend tensor takes part."""
    target = None
    args, kwargs = list(args), dict(kwargs)
    for i, arg in enumerate(func._schema.arguments):
        if "Device" not in str(arg.type):
            continue
        positional = i < len(args) and not arg.kwarg_only
        value = args[i] if positional else kwargs.get(arg.name)
        if value is None:
            continue
        target = torch.device(value)
        if target.type == PRETEND.type:
            if positional:
                args[i] = torch.device("cpu")
            else:
                kwargs[arg.name] = torch.device("cpu")
    if func is aten.to.other:
        target = args[1].device
    if target is not None:
        return target.type == PRETEND.type, tuple(args), kwargs
    pretend = any(isinstance(t, PretendTensor) for t in tree_flatten((args, kwargs))[0])
    return pretend, tuple(args), kwargs


def _dispatch(func: Any, args: tuple, kwargs: dict) -> Any:
    """Run ``func`` on the CPU tensors behind its arguments; its results are pretend tensors when it runs on the
    pretend device (see :func:`_placement`)."""
    flat = tree_flatten((args, kwargs))[0]
    pretend_op, args, kwargs = _placement(func, args, kwargs)
    if pretend_op:
        _check(func, args, kwargs)
    originals = {id(real(t)): t for t in flat if isinstance(t, torch.Tensor)}
    cpu_args, cpu_kwargs = tree_map(real, (args, kwargs))
    out = func(*cpu_args, **cpu_kwargs)
    if func is aten._local_scalar_dense.default:
        return out

    def wrap(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if id(x) in originals:  # an in-place op, out=, copy_, or a .to() that had nothing to do
            original = originals[id(x)]
            if func.overloadpacket is not aten.to or isinstance(original, PretendTensor) == pretend_op:
                if original.shape != x.shape:  # the wrapper's metadata cannot follow a resize of its data
                    raise NotImplementedError(
                        f"{_describe(func)} resized a pretend tensor (out=?); not supported"
                    )
                return original
            x = x.clone()  # .to() between the CPU and the pretend device: a copy, as between devices
        if not pretend_op or x.device.type != "cpu":
            return x
        return PretendTensor(x)

    if torch.is_inference_mode_enabled() and _is_view(func):
        # A view of a normal tensor is a normal tensor, even in inference mode (torch then shares the base's
        # version counter with it, which an inference tensor does not have).
        base = next((t for t in flat if isinstance(t, PretendTensor)), None)
        if base is not None and not base.is_inference():
            with torch.inference_mode(False):
                return tree_map(wrap, out)
    return tree_map(wrap, out)


def _is_view(func: Any) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


class _GeneratorMode(TorchFunctionMode):
    """Checks the generator of every draw. The check needs the caller's generator object (a dispatch mode sees a
    fresh one), so it runs at the level of torch functions: the draw is on the pretend device when ``device=``
    says so or, without ``device=``, when a pretend tensor takes part."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        generator = kwargs.get("generator")
        if isinstance(generator, _RealGenerator):
            device = kwargs.get("device")
            if device is not None:
                pretend_op = torch.device(device).type == PRETEND.type
            else:
                pretend_op = any(isinstance(t, PretendTensor) for t in tree_flatten((args, kwargs))[0])
            _check_generator(func, generator, pretend_op)
        return func(*args, **kwargs)


class _PretendMode(TorchDispatchMode):
    """Routes every op through :func:`_dispatch`, so factories with ``device=`` the pretend device work."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def _from_data(fn: Any, method: bool) -> Any:
    """``torch.tensor``-like factories build a ``device="meta"`` tensor without dispatching anything (so no mode
    sees it); on the pretend device they build on the CPU and move the result instead."""

    def factory(*args: Any, **kwargs: Any) -> Any:
        device = kwargs.get("device")
        if device is None and method:
            device = args[0].device
        if device is None or torch.device(device).type != PRETEND.type:
            return fn(*args, **kwargs)
        requires_grad = kwargs.pop("requires_grad", False)
        kwargs["device"] = "cpu"
        out = fn(*args, **kwargs).to(PRETEND)
        return out.requires_grad_() if requires_grad else out

    return factory


_PATCHES = [
    (torch, "Generator", lambda fn: _Generator),
    (torch, "tensor", lambda fn: _from_data(fn, False)),
    (torch, "as_tensor", lambda fn: _from_data(fn, False)),
    (torch, "asarray", lambda fn: _from_data(fn, False)),
    (torch.Tensor, "new_tensor", lambda fn: _from_data(fn, True)),
]
_LOCK = threading.RLock()


@contextlib.contextmanager
def pretend_device() -> Iterator[torch.device]:
    """Inside: the pretend device exists (factories, ``.to``, ``torch.Generator(device=...)``); yields it."""
    with _LOCK:
        saved = [(owner, name, getattr(owner, name)) for owner, name, _ in _PATCHES]
        for (owner, name, make), (_, _, fn) in zip(_PATCHES, saved):
            setattr(owner, name, make(fn))
        try:
            with _GeneratorMode(), _PretendMode():
                yield PRETEND
        finally:
            for owner, name, fn in saved:
                setattr(owner, name, fn)
