"""Backend registry: which implementation runs a call.

The array type picks the backend: NumPy arrays run the CPU kernels (``cpu``), CuPy arrays the
CUDA kernels (``cuda``). ``use_backend("numpy")`` forces the plain NumPy reference (which also
runs on CuPy arrays); ``use_backend("cpu")`` / ``use_backend("cuda")`` force one kernel backend.
Backward always runs on the backend that made the forward's context.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Iterator
from types import ModuleType

BACKENDS = ("numpy", "cpu", "cuda")
_MODULES = {"numpy": "fastrnn.backends.numpy", "cpu": "fastrnn.backends.cpu",
            "cuda": "fastrnn.backends.cuda"}

_state = threading.local()


def _forced() -> str | None:
    return getattr(_state, "forced", None)


def get_backend() -> str:
    """Name of the active backend: "numpy", "cpu" or "cuda" when forced, else "auto"
    (NumPy arrays -> "cpu", CuPy arrays -> "cuda")."""
    return _forced() or "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block (thread-local)::

        with fastrnn.use_backend("numpy"):
            y, hT, cT, ctx = fastrnn.lstm_forward(...)   # the NumPy reference
    """
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"backend: expected one of {BACKENDS + ('auto',)}, got {name!r}")
    previous = _forced()
    _state.forced = None if name == "auto" else name
    try:
        yield
    finally:
        _state.forced = previous


_LOADED: dict[str, ModuleType] = {}


def backend_module(name: str) -> ModuleType:
    """Import (once) and return the module implementing backend ``name``."""
    module = _LOADED.get(name)
    if module is None:
        module = _LOADED[name] = importlib.import_module(_MODULES[name])
    return module


def select(is_cupy: bool) -> str:
    """The backend for a call whose arrays are CuPy (True) or NumPy (False)."""
    forced = _forced()
    if forced == "numpy":
        return "numpy"
    if forced == "cpu" and is_cupy:
        raise TypeError("backend 'cpu' is forced but the arrays are CuPy arrays")
    if forced == "cuda" and not is_cupy:
        raise TypeError("backend 'cuda' is forced but the arrays are NumPy arrays")
    return "cuda" if is_cupy else "cpu"
