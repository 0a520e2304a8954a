"""Stateless functions of the layer API: the fused softmax + cross-entropy loss and activations.

Every function takes NumPy or CuPy arrays and returns arrays of the same kind.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastrnn.backends.validation import is_cupy_array
from fastrnn.nn._xp import array_module, move


def _float_array(name: str, a: Any) -> Any:
    if not (isinstance(a, np.ndarray) or is_cupy_array(a)):
        raise TypeError(f"{name}: expected a numpy.ndarray or cupy.ndarray, got {type(a).__name__}")
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point dtype, got {a.dtype}")
    return array_module(a)


def softmax_cross_entropy(logits: Any, targets: Any) -> tuple[float, Any]:
    """Mean cross-entropy of softmax(logits) against integer class targets, and its gradient.

    Parameters
    ----------
    logits : ndarray of shape (..., C), float32 or float64
    targets : integer ndarray of shape (...) (the leading shape of ``logits``), each in 0..C-1

    Returns
    -------
    loss : float, the mean over all leading positions of ``-log softmax(logits)[target]``
    dlogits : ndarray shaped like ``logits``, d loss / d logits = (softmax - onehot) / count

    One pass, stable for large logits: the row maximum is subtracted before ``exp``, and the
    log-probability of the target is ``z_t - log(sum exp z)``, never ``log(softmax)``.
    """
    xp = _float_array("logits", logits)
    if logits.ndim < 1:
        raise ValueError("logits: expected shape (..., C), got a 0-d array")
    if not (isinstance(targets, (np.ndarray, list, tuple)) or is_cupy_array(targets)):
        raise TypeError(f"targets: expected an integer array, got {type(targets).__name__}")
    targets = move(np.asarray(targets) if isinstance(targets, (list, tuple)) else targets, xp)
    if targets.dtype.kind not in "iu":
        raise TypeError(f"targets: expected an integer dtype (class indices), got {targets.dtype}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets: expected shape {tuple(logits.shape[:-1])} (logits' leading shape), "
            f"got {targets.shape}"
        )
    C = logits.shape[-1]
    z = logits.reshape(-1, C)
    t = targets.reshape(-1)
    M = z.shape[0]
    if M == 0 or C == 0:
        raise ValueError(f"logits: expected at least one row and one class, got {logits.shape}")
    if int(t.min()) < 0 or int(t.max()) >= C:
        raise ValueError(
            f"targets: every class index must be in 0..{C - 1}, got min {int(t.min())} "
            f"max {int(t.max())}"
        )
    z = z - z.max(axis=1, keepdims=True)
    e = xp.exp(z)
    s = e.sum(axis=1, keepdims=True)
    rows = xp.arange(M)
    loss = float(xp.mean(xp.log(s[:, 0]) - z[rows, t]))
    d = e / s
    d[rows, t] -= 1
    d /= M
    return loss, d.reshape(logits.shape)


def log_softmax(x: Any, axis: int = -1) -> Any:
    xp = _float_array("x", x)
    z = x - x.max(axis=axis, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=axis, keepdims=True))


def softmax(x: Any, axis: int = -1) -> Any:
    xp = _float_array("x", x)
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def relu(x: Any) -> Any:
    xp = _float_array("x", x)
    return xp.maximum(x, 0)


def sigmoid(x: Any) -> Any:
    """Stable for large |x|: exp never overflows."""
    xp = _float_array("x", x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


def tanh(x: Any) -> Any:
    xp = _float_array("x", x)
    return xp.tanh(x)
