"""Max and average pooling references: readable NumPy, PyTorch's defaults, NCHW.

PyTorch's defaults: the output size is floored, ``stride`` defaults to ``kernel_size``,
``padding`` is at most half the kernel (so every window holds at least one real element),
a padded position never wins a max, and the average divides by ``KH * KW`` even where the
window covers padding (``count_include_pad=True``).

The numbered steps (P1..P4 forward, PB1..PB3 backward) are cited by the CPU and CUDA kernels::

    P1  xp = x padded by (ph, pw) on each side (-inf for max, 0 for average)
    P2  window taps: win[n, c, t, oh, ow] = xp[n, c, oh*sh + i, ow*sw + j],  t = i*KW + j
    P3  max: y = max over t of the real (unpadded) taps; arg = the first tap t (row-major
        order i, then j) holding that maximum -- PyTorch's CPU tie rule. A NaN is a maximum:
        y is NaN and arg is the first NaN tap.
    P4  average: y = (sum over t of win) / (KH * KW)

    PB1 max: dxp[n, c, oh*sh + i, ow*sw + j] += dy[n, c, oh, ow] where arg == t
    PB2 average: dxp[n, c, oh*sh + i, ow*sw + j] += dy[n, c, oh, ow] / (KH * KW) for every tap
    PB3 dx = dxp without the padding (gradient that lands on padding is dropped)
"""

from __future__ import annotations

from typing import Any

from fastrnn.context import Context
from fastrnn.reference._common import get_xp


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _geometry(x: Any, kernel_size: Any, stride: Any, padding: Any):
    k = _pair(kernel_size)
    s = k if stride is None else _pair(stride)
    p = _pair(padding)
    _, _, H, W = x.shape
    OH = (H + 2 * p[0] - k[0]) // s[0] + 1
    OW = (W + 2 * p[1] - k[1]) // s[1] + 1
    return k, s, p, OH, OW


def _tap(i: int, j: int, OH: int, OW: int, stride) -> tuple[slice, slice]:
    """The (rows, cols) slice of the padded input that window tap (i, j) covers (P2, PB1, PB2)."""
    sh, sw = stride
    return slice(i, i + sh * (OH - 1) + 1, sh), slice(j, j + sw * (OW - 1) + 1, sw)


def _windows(xp: Any, a: Any, k, s, OH: int, OW: int) -> Any:
    """P2: (N, C, Hp, Wp) padded input -> (N, C, KH*KW, OH, OW) window taps."""
    N, C = a.shape[:2]
    win = xp.empty((N, C, k[0] * k[1], OH, OW), dtype=a.dtype)
    for i in range(k[0]):
        for j in range(k[1]):
            rows, cols = _tap(i, j, OH, OW, s)
            win[:, :, i * k[1] + j] = a[:, :, rows, cols]
    return win


def _context(op: str, xp: Any, x: Any, y: Any, **saved: Any) -> Context:
    return Context(
        op=op,
        backend="numpy",
        dtype=x.dtype,
        cupy=xp.__name__ == "cupy",
        grad_shapes={"dy": y.shape},
        saved=dict(x_shape=x.shape, **saved),
    )


def max_pool2d_forward(x, kernel_size, stride=None, padding=0, *, training=True):
    """x (N,C,H,W) -> y (N,C,OH,OW), ctx (None when training=False)."""
    xp = get_xp(x)
    k, s, p, OH, OW = _geometry(x, kernel_size, stride, padding)
    _, _, H, W = x.shape
    pad = ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1]))
    xpad = xp.pad(x, pad, constant_values=-xp.inf)  # P1
    win = _windows(xp, xpad, k, s, OH, OW)  # P2
    # Which taps are real input (not padding): the same for every (n, c).
    real = xp.pad(xp.ones((1, 1, H, W), dtype=bool), pad, constant_values=False)
    real = _windows(xp, real, k, s, OH, OW)
    # P3: the maximum of the real taps (-inf padding cannot exceed a real value; a window always
    # holds a real tap), then the first real tap that holds it (a NaN counts as the maximum).
    y = win.max(axis=2)
    hit = real & ((win == y[:, :, None]) | (xp.isnan(win) & xp.isnan(y)[:, :, None]))
    arg = hit.view(xp.uint8).argmax(axis=2)  # the first True (as bytes: CuPy-safe argmax)
    ctx = _context("max_pool2d", xp, x, y, arg=arg, k=k, s=s, p=p) if training else None
    return y, ctx


def max_pool2d_backward(ctx, dy):
    """dy (N,C,OH,OW) -> dx (N,C,H,W)."""
    xp = get_xp(dy)
    sv = ctx.saved
    N, C, H, W = sv["x_shape"]
    k, s, p, arg = sv["k"], sv["s"], sv["p"], sv["arg"]
    OH, OW = dy.shape[2:]
    dxp = xp.zeros((N, C, H + 2 * p[0], W + 2 * p[1]), dtype=dy.dtype)
    for i in range(k[0]):  # PB1: one tap at a time, so overlapping windows add up exactly
        for j in range(k[1]):
            rows, cols = _tap(i, j, OH, OW, s)
            dxp[:, :, rows, cols] += xp.where(arg == i * k[1] + j, dy, 0)
    return xp.ascontiguousarray(dxp[:, :, p[0] : p[0] + H, p[1] : p[1] + W])  # PB3


def avg_pool2d_forward(x, kernel_size, stride=None, padding=0, *, training=True):
    """x (N,C,H,W) -> y (N,C,OH,OW), ctx (None when training=False)."""
    xp = get_xp(x)
    k, s, p, OH, OW = _geometry(x, kernel_size, stride, padding)
    xpad = xp.pad(x, ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])))  # P1
    win = _windows(xp, xpad, k, s, OH, OW)  # P2
    y = win.sum(axis=2) / (k[0] * k[1])  # P4: padding counts in the divisor
    ctx = _context("avg_pool2d", xp, x, y, k=k, s=s, p=p) if training else None
    return y.astype(x.dtype, copy=False), ctx


def avg_pool2d_backward(ctx, dy):
    """dy (N,C,OH,OW) -> dx (N,C,H,W)."""
    xp = get_xp(dy)
    sv = ctx.saved
    N, C, H, W = sv["x_shape"]
    k, s, p = sv["k"], sv["s"], sv["p"]
    OH, OW = dy.shape[2:]
    dxp = xp.zeros((N, C, H + 2 * p[0], W + 2 * p[1]), dtype=dy.dtype)
    share = dy / (k[0] * k[1])
    for i in range(k[0]):  # PB2
        for j in range(k[1]):
            rows, cols = _tap(i, j, OH, OW, s)
            dxp[:, :, rows, cols] += share
    return xp.ascontiguousarray(dxp[:, :, p[0] : p[0] + H, p[1] : p[1] + W])  # PB3
