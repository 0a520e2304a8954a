# cython: language_level=3
"""Max and average pooling on the CPU: direct loops, OpenMP over the N*C image planes.

Contract (the backend interface, fastrnn/backends/base.py; arguments validated and made
C-contiguous by fastrnn.backends.ops):

    x : [N, C, H, W]   input
    y : [N, C, OH, OW] output (floor output size)
    kernel_size, stride, padding : (h, w) int pairs, padding <= kernel / 2

Steps cite fastrnn/reference/pool2d.py (P1..P4 forward, PB1..PB3 backward). No padded copy of
x is made (P1): each window is clipped to the real input instead, which is the same thing for a
max (padding never wins) and for the average (padding adds zeros; the divisor stays KH*KW).

Max pooling saves, for backward, the flat position (int32) of each maximum in its plane, found
in the same branch-free pass as the values (max_argmax_plane, _pool_plane.pxd); inference computes the values
alone (_max_plane).

Each plane is independent in both directions (backward scatters only into its own plane of dx),
so planes run in parallel with no races and the result does not depend on the thread count.
"""

from cython.parallel cimport prange
from libc.math cimport INFINITY
from libc.string cimport memset

import numpy as np

from fastrnn._cpu._buffers import empty as output
from fastrnn._threads import get_num_threads
from fastrnn.context import Context

from fastrnn._cpu._pool_plane cimport (
    PoolGeom,
    max_argmax_plane,
    max_scatter_plane,
    pool_geometry,
    valid_outputs,
    pool_window,
    real as floating,
)


cdef PoolGeom _geometry(tuple x_shape, kernel_size, stride, padding):
    return pool_geometry(x_shape[2], x_shape[3], kernel_size, stride, padding)


cdef void _max_plane(
    const floating* x,     # IN  [H, W]
    floating* y,           # OUT [OH, OW]
    const PoolGeom* g,
) noexcept nogil:
    """P3, the values: the maximum of each window's real taps; a NaN tap makes it NaN.

    The taps are the outer loops and a whole output row the inner one, with branch-free
    updates, so the compiler vectorises across outputs (a running max with data-dependent
    branches mispredicts on every other element: 6x slower, measured on 64x32x32x32, k2)."""
    cdef Py_ssize_t oh, ow, h0, h1, ih, j, offw, ow0, ow1
    cdef floating* yrow
    cdef const floating* xrow
    cdef floating v, m
    for oh in range(g.OH):
        pool_window(oh, g.sh, g.ph, g.KH, g.H, &h0, &h1)
        yrow = y + oh * g.OW
        for ow in range(g.OW):
            yrow[ow] = -INFINITY
        for ih in range(h0, h1):
            xrow = x + ih * g.W
            for j in range(g.KW):
                offw = j - g.pw
                valid_outputs(offw, g.sw, g.W, g.OW, &ow0, &ow1)
                for ow in range(ow0, ow1):
                    v = xrow[ow * g.sw + offw]
                    m = yrow[ow]
                    yrow[ow] = v if ((v > m) | (v != v)) else m


cdef void _avg_plane(
    const floating* x,     # IN  [H, W]
    floating* y,           # OUT [OH, OW]
    const PoolGeom* g,
) noexcept nogil:
    """P4: sum of the real taps (padding adds zeros) in double, divided by KH*KW."""
    cdef Py_ssize_t oh, ow, h0, h1, w0, w1, ih, iw
    cdef double s
    cdef double area = <double> (g.KH * g.KW)
    for oh in range(g.OH):
        pool_window(oh, g.sh, g.ph, g.KH, g.H, &h0, &h1)
        for ow in range(g.OW):
            pool_window(ow, g.sw, g.pw, g.KW, g.W, &w0, &w1)
            s = 0
            for ih in range(h0, h1):
                for iw in range(w0, w1):
                    s += x[ih * g.W + iw]
            y[oh * g.OW + ow] = <floating> (s / area)


cdef void _avg_plane_backward(
    const floating* dy,    # IN  [OH, OW]
    floating* dx,          # OUT [H, W]
    const PoolGeom* g,
) noexcept nogil:
    """PB2 + PB3: each output's gradient / (KH*KW) added to its window's real taps."""
    cdef Py_ssize_t oh, ow, h0, h1, w0, w1, ih, iw
    cdef floating share
    cdef floating area = <floating> (g.KH * g.KW)
    memset(dx, 0, g.H * g.W * sizeof(floating))
    for oh in range(g.OH):
        pool_window(oh, g.sh, g.ph, g.KH, g.H, &h0, &h1)
        for ow in range(g.OW):
            pool_window(ow, g.sw, g.pw, g.KW, g.W, &w0, &w1)
            share = dy[oh * g.OW + ow] / area
            for ih in range(h0, h1):
                for iw in range(w0, w1):
                    dx[ih * g.W + iw] += share


def _max_forward(
    const floating[:, :, :, ::1] x,  # IN
    floating[:, :, :, ::1] y,        # OUT
    int[:, :, :, ::1] arg,           # OUT, or an empty array when not training
    kernel_size, stride, padding, int nthreads,
):
    cdef PoolGeom g = _geometry((x.shape[0], x.shape[1], x.shape[2], x.shape[3]),
                                kernel_size, stride, padding)
    cdef Py_ssize_t planes = x.shape[0] * x.shape[1], p
    cdef Py_ssize_t xs = g.H * g.W, ys = g.OH * g.OW
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef floating* yp = &y[0, 0, 0, 0]
    cdef int* ap = &arg[0, 0, 0, 0] if arg.shape[0] > 0 else NULL
    with nogil:
        for p in prange(planes, num_threads=nthreads, schedule="static"):
            if ap != NULL:
                max_argmax_plane(xp + p * xs, yp + p * ys, ap + p * ys, &g)
            else:
                _max_plane(xp + p * xs, yp + p * ys, &g)


def _max_backward(
    const floating[:, :, :, ::1] dy,  # IN
    const int[:, :, :, ::1] arg,      # IN
    floating[:, :, :, ::1] dx,        # OUT
    int nthreads,
    const floating[:, :, :, ::1] y=None,  # IN, the pooled output: a ReLU's backward folded in
):
    cdef Py_ssize_t planes = dx.shape[0] * dx.shape[1], p
    cdef Py_ssize_t xs = dx.shape[2] * dx.shape[3], ys = dy.shape[2] * dy.shape[3]
    cdef const floating* dyp = &dy[0, 0, 0, 0]
    cdef const int* ap = &arg[0, 0, 0, 0]
    cdef const floating* yp = &y[0, 0, 0, 0] if y is not None else NULL
    cdef floating* dxp = &dx[0, 0, 0, 0]
    with nogil:
        for p in prange(planes, num_threads=nthreads, schedule="static"):
            memset(dxp + p * xs, 0, xs * sizeof(floating))
            max_scatter_plane(dyp + p * ys, ap + p * ys, yp + p * ys if yp != NULL else NULL,
                              dxp + p * xs, ys)


def _avg_forward(
    const floating[:, :, :, ::1] x,  # IN
    floating[:, :, :, ::1] y,        # OUT
    kernel_size, stride, padding, int nthreads,
):
    cdef PoolGeom g = _geometry((x.shape[0], x.shape[1], x.shape[2], x.shape[3]),
                                kernel_size, stride, padding)
    cdef Py_ssize_t planes = x.shape[0] * x.shape[1], p
    cdef Py_ssize_t xs = g.H * g.W, ys = g.OH * g.OW
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef floating* yp = &y[0, 0, 0, 0]
    with nogil:
        for p in prange(planes, num_threads=nthreads, schedule="static"):
            _avg_plane(xp + p * xs, yp + p * ys, &g)


def _avg_backward(
    const floating[:, :, :, ::1] dy,  # IN
    floating[:, :, :, ::1] dx,        # OUT
    kernel_size, stride, padding, int nthreads,
):
    cdef PoolGeom g = _geometry((dx.shape[0], dx.shape[1], dx.shape[2], dx.shape[3]),
                                kernel_size, stride, padding)
    cdef Py_ssize_t planes = dx.shape[0] * dx.shape[1], p
    cdef Py_ssize_t xs = g.H * g.W, ys = g.OH * g.OW
    cdef const floating* dyp = &dy[0, 0, 0, 0]
    cdef floating* dxp = &dx[0, 0, 0, 0]
    with nogil:
        for p in prange(planes, num_threads=nthreads, schedule="static"):
            _avg_plane_backward(dyp + p * ys, dxp + p * xs, &g)


# Below this many input plus output elements a call runs on one thread: the parallel region
# costs more than the few microseconds of work it would split.
MIN_PARALLEL_ELEMENTS = 1 << 16


def _threads(Py_ssize_t inputs, Py_ssize_t outputs) -> int:
    return get_num_threads() if inputs + outputs >= MIN_PARALLEL_ELEMENTS else 1


def _out_shape(x, kernel_size, stride, padding) -> tuple:
    N, C, H, W = x.shape
    if H < 1 or W < 1:
        # An empty plane has no real tap for any window: the max would be -inf with its
        # position (saved for backward) outside the plane. fastrnn.backends.ops refuses it
        # first; this guards direct calls of the kernel module.
        raise ValueError(f"x: expected image planes of at least 1x1, got shape {x.shape}")
    return (N, C, (H + 2 * padding[0] - kernel_size[0]) // stride[0] + 1,
            (W + 2 * padding[1] - kernel_size[1]) // stride[1] + 1)


def _context(op, x, y, **saved):
    return Context(op=op, backend="cpu", dtype=x.dtype, cupy=False,
                   grad_shapes={"dy": y.shape}, saved=dict(x_shape=x.shape, **saved))


def max_pool2d_forward(x, kernel_size, stride, padding, training):
    """x (N,C,H,W); pairs -> y (N,C,OH,OW), ctx (None when training=False)."""
    y = output(_out_shape(x, kernel_size, stride, padding), x.dtype)
    if training and x.shape[2] * x.shape[3] > np.iinfo(np.int32).max:
        raise ValueError(
            f"x: max pooling saves 32-bit positions; an image plane of {x.shape[2]}x{x.shape[3]} "
            "elements is too large for the CPU kernel"
        )
    # (2x2 windows at stride 2 on float32 find values and positions on SSE2 faster than the
    # general loop finds the values alone: inference runs them too, the positions unused)
    fast = x.dtype == np.float32 and tuple(kernel_size) == (2, 2) and tuple(stride) == (2, 2)
    fast = fast and tuple(padding) == (0, 0)
    arg = output(y.shape if training or fast else (0, 0, 0, 0), np.int32)
    _max_forward(x, y, arg, kernel_size, stride, padding, _threads(x.size, y.size))
    return y, (_context("max_pool2d", x, y, arg=arg) if training else None)


def max_pool2d_backward(ctx, dy):
    """dy (N,C,OH,OW) -> dx (N,C,H,W)."""
    dx = output(ctx.saved["x_shape"], dy.dtype)
    _max_backward(dy, ctx.saved["arg"], dx, _threads(dx.size, dy.size))
    return dx


def max_pool2d_relu_backward(arg, y, dy, dx):
    """The gradient of max_pool2d(relu(v)) with respect to v, into ``dx`` (N,C,H,W): dy
    (N,C,OH,OW) at each window's maximum (``arg``, as a training forward saves it) where the
    pooled output ``y`` is positive, zero elsewhere. ``y`` None: no ReLU, max pooling's backward
    alone."""
    _max_backward(dy, arg, dx, _threads(dx.size, dy.size), y)
    return dx


def avg_pool2d_forward(x, kernel_size, stride, padding, training):
    """x (N,C,H,W); pairs -> y (N,C,OH,OW), ctx (None when training=False)."""
    y = output(_out_shape(x, kernel_size, stride, padding), x.dtype)
    _avg_forward(x, y, kernel_size, stride, padding, _threads(x.size, y.size))
    ctx = None
    if training:
        ctx = _context("avg_pool2d", x, y, geometry=(kernel_size, stride, padding))
    return y, ctx


def avg_pool2d_backward(ctx, dy):
    """dy (N,C,OH,OW) -> dx (N,C,H,W)."""
    dx = output(ctx.saved["x_shape"], dy.dtype)
    _avg_backward(dy, dx, *ctx.saved["geometry"], _threads(dx.size, dy.size))
    return dx
