"""Array-module helpers: every layer works on NumPy and CuPy arrays alike.

CuPy is imported only when a CuPy array (or the name "cupy") is actually seen, so a CPU-only
installation never needs it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from fastrnn.backends.validation import array_module, is_cupy_array  # noqa: F401


def module_named(target: Any) -> Any:
    """``numpy``/``cupy`` from a module object or its name ("numpy", "cupy")."""
    name = getattr(target, "__name__", target)
    if name == "numpy":
        return np
    if name == "cupy":
        import cupy

        return cupy
    raise ValueError(f"device: expected 'numpy', 'cupy' or one of those modules, got {target!r}")


def move(a: Any, xp: Any) -> Any:
    """Array ``a`` on the array module ``xp`` (the array itself when it is already there)."""
    if a is None:
        return None
    if xp is np:
        return a.get() if is_cupy_array(a) else np.asarray(a)
    return xp.asarray(a)


def to_host(a: Any) -> np.ndarray:
    return a.get() if is_cupy_array(a) else np.asarray(a)


def scatter_add(xp: Any, target: Any, indices: Any, values: Any) -> None:
    """``target[indices] += values`` with repeated indices summed (np.add.at semantics)."""
    if hasattr(xp.add, "at"):  # NumPy; CuPy >= 13
        xp.add.at(target, indices, values)
    else:  # pragma: no cover - older CuPy
        import cupyx

        cupyx.scatter_add(target, indices, values)


_grad_state = threading.local()


def grad_enabled() -> bool:
    """False inside ``fastrnn.nn.no_grad()``: forward passes then save nothing for backward."""
    return getattr(_grad_state, "enabled", True)


@contextmanager
def no_grad() -> Iterator[None]:
    """Inference mode (thread-local): layers skip saving what backward needs, and the kernels run
    with ``training=False``. ``backward`` after such a forward raises ``RuntimeError``."""
    previous = grad_enabled()
    _grad_state.enabled = False
    try:
        yield
    finally:
        _grad_state.enabled = previous
