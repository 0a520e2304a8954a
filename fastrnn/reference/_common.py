"""Small helpers the references share. Plain NumPy; CuPy arrays work through ``xp``."""

from __future__ import annotations

from typing import Any

import numpy as np


def get_xp(a: Any) -> Any:
    """The array module of ``a``: numpy, or cupy for a CuPy array."""
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def sigmoid(xp: Any, a: Any) -> Any:
    # Stable for large |a|: exp never overflows.
    e = xp.exp(-xp.abs(a))
    return xp.where(a >= 0, 1 / (1 + e), e / (1 + e))


def step_mask(xp: Any, lengths: Any, T: int, N: int, dtype: Any) -> Any:
    """(T, N, 1) mask: 1 where step t is inside sequence n (t < lengths[n]), else 0."""
    if lengths is None:
        return xp.ones((T, N, 1), dtype=dtype)
    lengths = xp.asarray(np.asarray(lengths) if not hasattr(lengths, "device") else lengths)
    return (xp.arange(T)[:, None] < lengths[None, :]).astype(dtype)[:, :, None]


def zeros_if_none(xp: Any, a: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    return xp.zeros(shape, dtype=dtype) if a is None else a
