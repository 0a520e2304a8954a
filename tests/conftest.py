"""Shared test fixtures: the backends every op is tested on, with CUDA visibly skipped."""

from __future__ import annotations

import numpy as np
import pytest


def _cuda_available() -> bool:
    try:
        import cupy
    except Exception:
        return False
    try:
        return bool(cupy.is_available())
    except Exception:
        return False


CUDA = _cuda_available()

# The kernel backends compared with the reference. CUDA shows as skipped without a GPU.
KERNEL_BACKENDS = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not CUDA, reason="cupy.is_available() is False"),
        ],
    ),
]

DTYPES = [np.float32, np.float64]


def to_backend(backend: str, a):
    """Move a NumPy array (or None) to the backend's array type."""
    if a is None or backend != "cuda":
        return a
    import cupy

    return cupy.asarray(a)


def to_numpy(a):
    if a is None:
        return None
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)
