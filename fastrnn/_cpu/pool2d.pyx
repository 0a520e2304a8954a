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
in the same branch-free pass as the values (_max_argmax_plane); inference computes the values
alone (_max_plane).

Each plane is independent in both directions (backward scatters only into its own plane of dx),
so planes run in parallel with no races and the result does not depend on the thread count.
"""

from cython.parallel cimport prange
from libc.math cimport INFINITY
from libc.string cimport memset

import numpy as np

from fastrnn._threads import get_num_threads
from fastrnn.context import Context

# (its own fused type: cimporting _blas.pxd for it would load SciPy's BLAS, ~0.2-0.4 s on the
# first pooling call of a process, for a module that calls no BLAS)
ctypedef fused floating:
    float
    double


cdef struct PoolGeom:
    Py_ssize_t H, W, OH, OW, KH, KW, sh, sw, ph, pw


cdef PoolGeom _geometry(tuple x_shape, kernel_size, stride, padding):
    cdef PoolGeom g
    _, _, g.H, g.W = x_shape
    g.KH, g.KW = kernel_size
    g.sh, g.sw = stride
    g.ph, g.pw = padding
    g.OH = (g.H + 2 * g.ph - g.KH) // g.sh + 1
    g.OW = (g.W + 2 * g.pw - g.KW) // g.sw + 1
    return g


cdef inline void _window(
    Py_ssize_t o, Py_ssize_t s, Py_ssize_t p, Py_ssize_t k, Py_ssize_t n,
    Py_ssize_t* lo, Py_ssize_t* hi,
) noexcept nogil:
    """The real input rows (or columns) [lo, hi) of output o's window (P2 clipped to x)."""
    cdef Py_ssize_t a = o * s - p
    cdef Py_ssize_t b = a + k
    lo[0] = a if a > 0 else 0
    hi[0] = b if b < n else n


cdef inline void _valid(
    Py_ssize_t off, Py_ssize_t s, Py_ssize_t n_in, Py_ssize_t n_out,
    Py_ssize_t* lo, Py_ssize_t* hi,
) noexcept nogil:
    """Outputs o in [lo, hi) read input o*s + off inside 0 .. n_in - 1."""
    cdef Py_ssize_t a = 0, b = 0
    if off < 0:
        a = (-off + s - 1) // s
    if n_in - 1 - off >= 0:
        b = (n_in - 1 - off) // s + 1
    if b > n_out:
        b = n_out
    if a > b:
        a = b
    lo[0] = a
    hi[0] = b


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
        _window(oh, g.sh, g.ph, g.KH, g.H, &h0, &h1)
        yrow = y + oh * g.OW
        for ow in range(g.OW):
            yrow[ow] = -INFINITY
        for ih in range(h0, h1):
            xrow = x + ih * g.W
            for j in range(g.KW):
                offw = j - g.pw
                _valid(offw, g.sw, g.W, g.OW, &ow0, &ow1)
                for ow in range(ow0, ow1):
                    v = xrow[ow * g.sw + offw]
                    m = yrow[ow]
                    yrow[ow] = v if ((v > m) | (v != v)) else m


cdef void _max_argmax_plane(
    const floating* x,     # IN  [H, W]
    floating* y,           # OUT [OH, OW]
    int* arg,              # OUT [OH, OW] flat index into x of each maximum
    const PoolGeom* g,
) noexcept nogil:
    """P3, values and positions in one pass (training): a tap replaces the running maximum
    when it is larger, or NaN over a number, so the first maximum in row-major order (the first
    NaN) keeps its position, and an all -inf window keeps its first real tap. The same values
    as _max_plane, branch-free over a row of outputs (1.35-1.55x the two passes it replaces:
    benchmarks/NOTES-conv.md)."""
    cdef Py_ssize_t oh, ow, h0, h1, ih, j, offw, ow0, ow1, w0
    cdef floating* yrow
    cdef int* arow
    cdef const floating* xrow
    cdef floating v, m
    cdef bint up
    for oh in range(g.OH):
        _window(oh, g.sh, g.ph, g.KH, g.H, &h0, &h1)
        yrow = y + oh * g.OW
        arow = arg + oh * g.OW
        for ow in range(g.OW):
            yrow[ow] = -INFINITY
            w0 = ow * g.sw - g.pw
            arow[ow] = <int> (h0 * g.W + (w0 if w0 > 0 else 0))
        for ih in range(h0, h1):
            xrow = x + ih * g.W
            for j in range(g.KW):
                offw = j - g.pw
                _valid(offw, g.sw, g.W, g.OW, &ow0, &ow1)
                for ow in range(ow0, ow1):
                    v = xrow[ow * g.sw + offw]
                    m = yrow[ow]
                    up = (v > m) | ((v != v) & (m == m))
                    yrow[ow] = v if up else m
                    arow[ow] = <int> (ih * g.W + ow * g.sw + offw) if up else arow[ow]


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
        _window(oh, g.sh, g.ph, g.KH, g.H, &h0, &h1)
        for ow in range(g.OW):
            _window(ow, g.sw, g.pw, g.KW, g.W, &w0, &w1)
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
        _window(oh, g.sh, g.ph, g.KH, g.H, &h0, &h1)
        for ow in range(g.OW):
            _window(ow, g.sw, g.pw, g.KW, g.W, &w0, &w1)
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
                _max_argmax_plane(xp + p * xs, yp + p * ys, ap + p * ys, &g)
            else:
                _max_plane(xp + p * xs, yp + p * ys, &g)


def _max_backward(
    const floating[:, :, :, ::1] dy,  # IN
    const int[:, :, :, ::1] arg,      # IN
    floating[:, :, :, ::1] dx,        # OUT
    int nthreads,
):
    cdef Py_ssize_t planes = dx.shape[0] * dx.shape[1], p, o
    cdef Py_ssize_t xs = dx.shape[2] * dx.shape[3], ys = dy.shape[2] * dy.shape[3]
    cdef const floating* dyp = &dy[0, 0, 0, 0]
    cdef const int* ap = &arg[0, 0, 0, 0]
    cdef floating* dxp = &dx[0, 0, 0, 0]
    with nogil:
        for p in prange(planes, num_threads=nthreads, schedule="static"):
            # PB1 + PB3: each output's gradient to its maximum (never a padded position)
            memset(dxp + p * xs, 0, xs * sizeof(floating))
            for o in range(ys):
                dxp[p * xs + ap[p * ys + o]] += dyp[p * ys + o]


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
    y = np.empty(_out_shape(x, kernel_size, stride, padding), dtype=x.dtype)
    if training and x.shape[2] * x.shape[3] > np.iinfo(np.int32).max:
        raise ValueError(
            f"x: max pooling saves 32-bit positions; an image plane of {x.shape[2]}x{x.shape[3]} "
            "elements is too large for the CPU kernel"
        )
    arg = np.empty(y.shape if training else (0, 0, 0, 0), dtype=np.int32)
    _max_forward(x, y, arg, kernel_size, stride, padding, _threads(x.size, y.size))
    return y, (_context("max_pool2d", x, y, arg=arg) if training else None)


def max_pool2d_backward(ctx, dy):
    """dy (N,C,OH,OW) -> dx (N,C,H,W)."""
    dx = np.empty(ctx.saved["x_shape"], dtype=dy.dtype)
    _max_backward(dy, ctx.saved["arg"], dx, _threads(dx.size, dy.size))
    return dx


def avg_pool2d_forward(x, kernel_size, stride, padding, training):
    """x (N,C,H,W); pairs -> y (N,C,OH,OW), ctx (None when training=False)."""
    y = np.empty(_out_shape(x, kernel_size, stride, padding), dtype=x.dtype)
    _avg_forward(x, y, kernel_size, stride, padding, _threads(x.size, y.size))
    ctx = None
    if training:
        ctx = _context("avg_pool2d", x, y, geometry=(kernel_size, stride, padding))
    return y, ctx


def avg_pool2d_backward(ctx, dy):
    """dy (N,C,OH,OW) -> dx (N,C,H,W)."""
    dx = np.empty(ctx.saved["x_shape"], dtype=dy.dtype)
    _avg_backward(dy, dx, *ctx.saved["geometry"], _threads(dx.size, dy.size))
    return dx
