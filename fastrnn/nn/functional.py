"""Stateless functions of the layer API: the fused softmax + cross-entropy loss and activations.

Every function takes NumPy or CuPy arrays and returns arrays of the same kind.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastrnn.backends import training
from fastrnn.backends.validation import is_cupy_array
from fastrnn.nn._xp import array_module, move


def _float_array(name: str, a: Any) -> Any:
    if not (isinstance(a, np.ndarray) or is_cupy_array(a)):
        raise TypeError(f"{name}: expected a numpy.ndarray or cupy.ndarray, got {type(a).__name__}")
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point dtype, got {a.dtype}")
    return array_module(a)


def _targets(logits: Any, targets: Any, xp: Any) -> Any:
    """``targets`` checked against ``logits`` (..., C): an integer array of the leading shape,
    every value in 0..C-1; returned flat, on ``xp``."""
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
    t = targets.reshape(-1)
    if t.size == 0 or C == 0:
        raise ValueError(f"logits: expected at least one row and one class, got {logits.shape}")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= C:
        raise ValueError(f"targets: every class index must be in 0..{C - 1}, got min {lo} max {hi}")
    return t


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
    log-probability of the target is ``z_t - log(sum exp z)``, never ``log(softmax)``. NumPy
    arrays run the CPU kernel (fastrnn/_cpu/_train.pyx, no temporaries); the NumPy code below
    is its oracle (CuPy arrays, ``fastrnn.use_backend("numpy")``).
    """
    xp = _float_array("logits", logits)
    if logits.ndim < 1:
        raise ValueError("logits: expected shape (..., C), got a 0-d array")
    t = _targets(logits, targets, xp)
    C = logits.shape[-1]
    z = logits.reshape(-1, C)
    M = z.shape[0]
    kern = training.cpu_kernels(z)
    if kern is not None:
        z = np.ascontiguousarray(z)
        d = np.empty_like(z)
        nt = min(training.threads(), M)
        partial = training.scratch("partial", np.float64, nt)
        t64 = np.ascontiguousarray(t, dtype=np.int64)
        loss = kern.cross_entropy(z, t64, d, partial, nt)
        return float(loss), d.reshape(logits.shape)
    z = z - z.max(axis=1, keepdims=True)
    e = xp.exp(z)
    s = e.sum(axis=1, keepdims=True)
    rows = xp.arange(M)
    loss = float(xp.mean(xp.log(s[:, 0]) - z[rows, t]))
    d = e / s
    d[rows, t] -= 1
    d /= M
    return loss, d.reshape(logits.shape)


def linear_cross_entropy(
    x: Any,
    weight: Any,
    bias: Any,
    targets: Any,
    *,
    dweight: Any = None,
    dbias: Any = None,
) -> tuple[float, Any]:
    """A linear layer followed by the mean softmax cross-entropy, forward and backward at once.

    Parameters
    ----------
    x : ndarray of shape (..., K)
    weight : ndarray of shape (C, K); bias : ndarray of shape (C,) or None
    targets : integer ndarray of shape (...) (x's leading shape), each in 0..C-1
    dweight, dbias : None, or arrays shaped like weight / bias that the gradients are *added*
        to (a Parameter's ``.grad``)

    Returns
    -------
    loss : float, ``softmax_cross_entropy(x @ weight.T + bias, targets)[0]``
    dx : ndarray shaped like x

    NumPy arrays run the fused CPU kernel: row tiles of the logits are made, turned into their
    gradient and consumed (dx, dweight, dbias) while in cache, so the whole logits matrix never
    exists (fastrnn/_cpu/_train.pyx). Otherwise: the unfused NumPy/CuPy steps (the oracle).
    """
    xp = _float_array("x", x)
    if _float_array("weight", weight) is not xp:
        raise TypeError("weight: NumPy and CuPy arrays cannot be mixed (x's kind differs)")
    if weight.ndim != 2:
        raise ValueError(f"weight: expected shape (C, K), got {tuple(weight.shape)}")
    C, K = weight.shape
    if x.ndim < 1 or x.shape[-1] != K:
        raise ValueError(f"x: expected shape (..., {K}) (weight's K), got {tuple(x.shape)}")
    if bias is None and dbias is not None:
        raise ValueError("dbias: given without a bias")
    for name, a, shape in (
        ("weight", weight, (C, K)),
        ("bias", bias, (C,)),
        ("dweight", dweight, (C, K)),
        ("dbias", dbias, (C,)),
    ):
        if a is None:
            continue
        if _float_array(name, a) is not xp:
            raise TypeError(f"{name}: NumPy and CuPy arrays cannot be mixed (x's kind differs)")
        if a.dtype != x.dtype:
            raise TypeError(f"{name}: dtype {a.dtype} differs from x's {x.dtype}")
        if tuple(a.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(a.shape)}")
    t = _targets(_LeadingShape(x.shape[:-1], C), targets, xp)
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    arrays = [x2, weight] + [a for a in (bias, dweight, dbias) if a is not None]
    kern = training.cpu_kernels(*arrays)
    if kern is None or max(M, C, K) >= 2**31:
        logits = x2 @ weight.T
        if bias is not None:
            logits += bias
        loss, d = softmax_cross_entropy(logits, t)
        if dweight is not None:
            dweight += d.T @ x2
        if dbias is not None:
            dbias += d.sum(axis=0)
        return loss, (d @ weight).reshape(x.shape)
    dtype = x.dtype
    nt = max(1, min(training.threads(), -(-M // kern.TILE)))
    dx = np.empty((M, K), dtype)
    work = training.scratch("linear_ce", dtype, kern.linear_cross_entropy_workspace(C, K, nt))
    partial = training.scratch("partial", np.float64, nt)
    t64 = np.ascontiguousarray(t, dtype=np.int64)
    empty = training.scratch("empty", dtype, 0)
    with training.blas_pinned():
        loss = kern.linear_cross_entropy(
            x2,
            weight,
            empty if bias is None else bias,
            t64,
            dx,
            weight if dweight is None else dweight,
            empty if dbias is None else dbias,
            work,
            partial,
            bias is not None,
            dweight is not None,
            dbias is not None,
            nt,
        )
    return float(loss), dx.reshape(x.shape)


class _LeadingShape:
    """Stands in for a logits array in :func:`_targets`: only ``shape`` is read."""

    def __init__(self, lead: tuple[int, ...], C: int) -> None:
        self.shape = tuple(lead) + (C,)


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
