"""Tolerances from one table: per op, direction and dtype (rtol, atol).

Kernels are compared with the reference's result computed in float64 and cast; float32 errors
grow with the reduction length (T*N for weight gradients), hence the looser backward entries.
"""

from __future__ import annotations

import numpy as np

TOL = {
    # (op, direction): {dtype: (rtol, atol)}
    ("recurrent", "forward"): {np.float32: (1e-4, 1e-5), np.float64: (1e-10, 1e-12)},
    ("recurrent", "backward"): {np.float32: (1e-3, 1e-4), np.float64: (1e-9, 1e-11)},
    ("conv", "forward"): {np.float32: (1e-4, 1e-5), np.float64: (1e-10, 1e-12)},
    ("conv", "backward"): {np.float32: (1e-3, 1e-4), np.float64: (1e-9, 1e-11)},
    ("pool", "forward"): {np.float32: (1e-6, 1e-7), np.float64: (1e-12, 1e-14)},
    ("pool", "backward"): {np.float32: (1e-5, 1e-6), np.float64: (1e-12, 1e-14)},
    ("nn", "forward"): {np.float32: (1e-4, 1e-5), np.float64: (1e-10, 1e-12)},
    ("nn", "backward"): {np.float32: (1e-3, 1e-4), np.float64: (1e-9, 1e-11)},
    # the fused training kernels (fastrnn/_cpu/_train.pyx) against the unfused NumPy code
    ("fused", "vs unfused"): {np.float32: (1e-5, 1e-6), np.float64: (1e-12, 1e-14)},
    # central finite differences of the float64 reference
    ("fd", "backward"): {np.float64: (1e-6, 1e-8)},
}


def tol(op: str, direction: str, dtype) -> dict[str, float]:
    rtol, atol = TOL[(op, direction)][np.dtype(dtype).type]
    return {"rtol": rtol, "atol": atol}


def assert_close(actual, desired, op: str, direction: str, dtype, name: str = "") -> None:
    """np.testing.assert_allclose with the table's tolerances; ``name`` labels the failure."""
    if hasattr(actual, "get") and not isinstance(actual, np.ndarray):
        actual = actual.get()
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(desired), err_msg=name, **tol(op, direction, dtype)
    )
