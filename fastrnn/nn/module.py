"""``Parameter`` and ``Module``: the PyTorch-shaped base of every layer.

A module's ``forward`` saves what its ``backward`` needs (the last forward only); ``backward(dy)``
returns the gradient with respect to the input and *adds* the parameter gradients into each
``Parameter.grad`` (so they accumulate over calls until ``zero_grad()``). Inside
``fastrnn.nn.no_grad()`` forward passes save nothing and the kernels run with ``training=False``.

State dicts map dotted names (``"0.weight"``, ``"lstm.weight_ih_l0"``) to arrays, exactly as
``torch.nn.Module.state_dict()`` names them, so a PyTorch state dict (tensors converted with
``.numpy()``) loads into the matching fastrnn model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from fastrnn.backends.validation import is_cupy_array
from fastrnn.nn._xp import array_module, module_named, move


class Parameter:
    """A trainable array: ``data`` and ``grad`` (same shape and dtype; starts at zero and
    accumulates). ``requires_grad=False`` freezes it: backward passes leave its ``grad`` alone
    and optimizers skip it."""

    __slots__ = ("data", "grad", "requires_grad")

    def __init__(self, data: Any, requires_grad: bool = True) -> None:
        if not (isinstance(data, np.ndarray) or is_cupy_array(data)):
            raise TypeError(
                f"data: expected a numpy.ndarray or cupy.ndarray, got {type(data).__name__}"
            )
        if data.dtype.kind != "f":
            raise TypeError(f"data: expected a floating-point dtype, got {data.dtype}")
        xp = array_module(data)
        self.data = data
        self.grad = xp.zeros_like(data)
        self.requires_grad = bool(requires_grad)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> Any:
        return self.data.dtype

    def accumulate(self, g: Any) -> None:
        """``grad += g`` unless the parameter is frozen."""
        if self.requires_grad:
            self.grad += g

    def __repr__(self) -> str:
        kind = "cupy" if is_cupy_array(self.data) else "numpy"
        frozen = "" if self.requires_grad else ", requires_grad=False"
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, {kind}{frozen})"


class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def _state_array(name: str, value: Any) -> Any:
    """A state-dict value as a NumPy or CuPy array (accepts anything with ``__array__`` or
    ``__dlpack__``, e.g. a CPU torch tensor)."""
    if isinstance(value, np.ndarray) or is_cupy_array(value):
        return value
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        return np.asarray(value)
    if hasattr(value, "__array__"):
        try:
            return np.asarray(value)
        except Exception as exc:  # e.g. a torch tensor that requires grad
            raise TypeError(f"state_dict[{name!r}]: cannot convert to an array ({exc})") from exc
    if hasattr(value, "__dlpack__"):
        return np.from_dlpack(value)
    raise TypeError(f"state_dict[{name!r}]: expected an array, got {type(value).__name__}")


class Module:
    """Base class of every layer: parameters, buffers and sub-modules registered by assignment
    (as in ``torch.nn.Module``); ``__call__`` is ``forward``."""

    training: bool

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    # -- registration ----------------------------------------------------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        d = self.__dict__
        if "_parameters" not in d:
            raise RuntimeError(
                f"{type(self).__name__}: call Module.__init__() before assigning attributes"
            )
        if isinstance(value, Parameter):
            d["_buffers"].pop(name, None)
            d["_modules"].pop(name, None)
            d["_parameters"][name] = value
        elif isinstance(value, Module):
            d["_parameters"].pop(name, None)
            d["_buffers"].pop(name, None)
            d["_modules"][name] = value
        elif name in d["_parameters"]:
            raise TypeError(f"{name}: expected a Parameter, got {type(value).__name__}")
        elif name in d["_buffers"]:
            d["_buffers"][name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        for table in ("_parameters", "_buffers", "_modules"):
            if table in d and name in d[table]:
                return d[table][name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def register_buffer(self, name: str, value: Any) -> None:
        """A non-trainable array that belongs to the state dict (e.g. running statistics)."""
        self.__dict__.pop(name, None)
        self._buffers[name] = value

    # -- traversal -------------------------------------------------------------------------------

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def children(self) -> Iterator[Module]:
        yield from self._modules.values()

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        seen: set[int] = set()
        for mname, m in self.named_modules(prefix):
            for name, p in m._parameters.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{mname}.{name}" if mname else name), p

    def parameters(self) -> Iterator[Parameter]:
        for _, p in self.named_parameters():
            yield p

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, Any]]:
        for mname, m in self.named_modules(prefix):
            for name, b in m._buffers.items():
                if b is not None:
                    yield (f"{mname}.{name}" if mname else name), b

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Name -> array for every parameter and buffer, in registration order (torch.nn's
        names). The arrays are the live ones, not copies (as in PyTorch)."""
        out: dict[str, Any] = {}
        for mname, m in self.named_modules():
            for name, p in m._parameters.items():
                out[f"{mname}.{name}" if mname else name] = p.data
            for name, b in m._buffers.items():
                if b is not None:
                    out[f"{mname}.{name}" if mname else name] = b
        return out

    def _state_slots(self) -> dict[str, tuple[Module, str, bool]]:
        slots: dict[str, tuple[Module, str, bool]] = {}
        for mname, m in self.named_modules():
            for name in m._parameters:
                slots[f"{mname}.{name}" if mname else name] = (m, name, True)
            for name, b in m._buffers.items():
                if b is not None:
                    slots[f"{mname}.{name}" if mname else name] = (m, name, False)
        return slots

    def load_state_dict(self, state_dict: Any, strict: bool = True) -> IncompatibleKeys:
        """Copy arrays into this module's parameters and buffers (in place, cast to their dtype
        and moved to their array module).

        ``strict`` (default): every key must match; otherwise missing and unexpected keys are
        returned. Shapes must always match. Raises ``ValueError`` naming every missing,
        unexpected and mis-shaped key, before anything is copied.
        """
        if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
            raise TypeError(
                "state_dict: expected a mapping of names to arrays, "
                f"got {type(state_dict).__name__}"
            )
        slots = self._state_slots()
        given = list(state_dict.keys())
        missing = [k for k in slots if k not in state_dict]
        unexpected = [k for k in given if k not in slots]
        arrays: dict[str, Any] = {}
        misshaped = []
        for key in given:
            if key not in slots:
                continue
            arr = _state_array(key, state_dict[key])
            m, name, is_param = slots[key]
            target = m._parameters[name].data if is_param else m._buffers[name]
            if tuple(arr.shape) != tuple(target.shape):
                misshaped.append(f"{key}: expected shape {tuple(target.shape)}, got {arr.shape}")
            arrays[key] = arr
        problems = []
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if misshaped:
            problems.append("mis-shaped keys: " + "; ".join(misshaped))
        if problems:
            raise ValueError(
                f"state_dict does not match {type(self).__name__}: " + " | ".join(problems)
            )
        for key, arr in arrays.items():
            m, name, is_param = slots[key]
            target = m._parameters[name].data if is_param else m._buffers[name]
            xp = array_module(target)
            target[...] = move(arr, xp).astype(target.dtype, copy=False)
        return IncompatibleKeys(missing, unexpected)

    # -- modes and gradients ---------------------------------------------------------------------

    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad[...] = 0

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        """Freeze (False) or unfreeze (True) every parameter of this module."""
        for p in self.parameters():
            p.requires_grad = bool(requires_grad)
        return self

    # -- devices and dtypes ----------------------------------------------------------------------

    def to(self, target: Any) -> Module:
        """Move parameters, gradients and buffers to ``"numpy"``/``"cupy"`` (or the module
        itself), or cast floating-point ones to a dtype (``m.to(np.float64)``). Parameter objects
        keep their identity, but an optimizer's state made before a move stays where it was:
        create optimizers after moving."""
        if getattr(target, "__name__", target) in ("numpy", "cupy"):
            xp = module_named(target)
            for m in self.modules():
                for p in m._parameters.values():
                    p.data, p.grad = move(p.data, xp), move(p.grad, xp)
                for name, b in list(m._buffers.items()):
                    m._buffers[name] = move(b, xp)
                m._moved()
            return self
        try:
            dtype = np.dtype(target)
        except TypeError:
            raise TypeError(
                "target: expected 'numpy', 'cupy', an array module or a float dtype, "
                f"got {target!r}"
            ) from None
        if dtype.kind != "f":
            raise TypeError(f"target: expected a floating-point dtype, got {dtype}")
        for m in self.modules():
            for p in m._parameters.values():
                p.data, p.grad = p.data.astype(dtype), p.grad.astype(dtype)
            for name, b in list(m._buffers.items()):
                if b is not None and b.dtype.kind == "f":
                    m._buffers[name] = b.astype(dtype)
            m._moved()
        return self

    def float(self) -> Module:
        return self.to(np.float32)

    def double(self) -> Module:
        return self.to(np.float64)

    def _moved(self) -> None:
        """Hook: parameters were moved or cast; drop anything cached for backward."""
        object.__setattr__(self, "_cache", None)

    # -- compute ---------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def backward(self, dy: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__}.backward")

    def _saved(self) -> Any:
        cache = self.__dict__.get("_cache")
        if cache is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward: no forward pass to differentiate (call forward "
                "first, outside fastrnn.nn.no_grad())"
            )
        return cache

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        if self._modules:
            for name, m in self._modules.items():
                sub = repr(m).replace("\n", "\n  ")
                lines.append(f"\n  ({name}): {sub}")
            lines.append("\n")
        return "".join(lines) + ")"
