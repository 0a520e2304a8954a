# cython: language_level=3
"""Max pooling of one image plane, shared by pool2d.pyx (max_pool2d) and conv2d.pyx (the
convolution that pools its own output, conv2d_forward(max_pool=...)): one definition, so both
pick the same maximum and save the same position for the backward. Also the windows' bounds
(pool_window, valid_outputs), which conv2d_im2col.pyx's column tiles use too.

Steps cite fastrnn/reference/pool2d.py (P2, P3). Windows are clipped to the real input (no
padded copy): padding never wins a max."""

from libc.math cimport INFINITY

# (its own fused type: cimporting _blas.pxd would load SciPy's BLAS into modules that avoid it)
cdef extern from "pool_plane.h" nogil:
    void fr_max_argmax_2x2_f32(const float* x, float* y, int* arg, Py_ssize_t W, Py_ssize_t OH,
                               Py_ssize_t OW)


ctypedef fused real:
    float
    double


cdef struct PoolGeom:
    Py_ssize_t H, W, OH, OW, KH, KW, sh, sw, ph, pw


cdef inline PoolGeom pool_geometry(Py_ssize_t H, Py_ssize_t W, kernel_size, stride, padding):
    """The planes' geometry: input H x W, PyTorch's floor output size."""
    cdef PoolGeom g
    g.H, g.W = H, W
    g.KH, g.KW = kernel_size
    g.sh, g.sw = stride
    g.ph, g.pw = padding
    g.OH = (g.H + 2 * g.ph - g.KH) // g.sh + 1
    g.OW = (g.W + 2 * g.pw - g.KW) // g.sw + 1
    return g


cdef inline void pool_window(
    Py_ssize_t o, Py_ssize_t s, Py_ssize_t p, Py_ssize_t k, Py_ssize_t n,
    Py_ssize_t* lo, Py_ssize_t* hi,
) noexcept nogil:
    """The real input rows (or columns) [lo, hi) of output o's window (P2 clipped to x)."""
    cdef Py_ssize_t a = o * s - p
    cdef Py_ssize_t b = a + k
    lo[0] = a if a > 0 else 0
    hi[0] = b if b < n else n


cdef inline void valid_outputs(
    Py_ssize_t off, Py_ssize_t s, Py_ssize_t n_in, Py_ssize_t n_out,
    Py_ssize_t* lo, Py_ssize_t* hi,
) noexcept nogil:
    """Outputs o in [lo, hi) read input o*s + off inside 0 .. n_in - 1; the rest read padding
    (also the column tiles' bounds in conv2d_im2col.pyx)."""
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


cdef inline void max_argmax_plane(
    const real* x,         # IN  [H, W]
    real* y,               # OUT [OH, OW]
    int* arg,              # OUT [OH, OW] flat index into x of each maximum
    const PoolGeom* g,
) noexcept nogil:
    """P3, values and positions in one pass (training): a tap replaces the running maximum
    when it is larger, or NaN over a number, so the first maximum in row-major order (the first
    NaN) keeps its position, and an all -inf window keeps its first real tap. Branch-free over
    a row of outputs, so the compiler vectorises across outputs (1.35-1.55x the separate values
    and positions passes: benchmarks/NOTES-conv.md)."""
    cdef Py_ssize_t oh, ow, h0, h1, ih, j, offw, ow0, ow1, w0
    cdef real* yrow
    cdef int* arow
    cdef const real* xrow
    cdef real v, m
    cdef bint up
    if (real is float and g.KH == 2 and g.KW == 2 and g.sh == 2 and g.sw == 2 and g.ph == 0
            and g.pw == 0):
        fr_max_argmax_2x2_f32(<const float*> x, <float*> y, arg, g.W, g.OH, g.OW)
        return
    for oh in range(g.OH):
        pool_window(oh, g.sh, g.ph, g.KH, g.H, &h0, &h1)
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
                valid_outputs(offw, g.sw, g.W, g.OW, &ow0, &ow1)
                for ow in range(ow0, ow1):
                    v = xrow[ow * g.sw + offw]
                    m = yrow[ow]
                    up = (v > m) | ((v != v) & (m == m))
                    yrow[ow] = v if up else m
                    arow[ow] = <int> (ih * g.W + ow * g.sw + offw) if up else arow[ow]


cdef inline void max_scatter_plane(
    const real* dy,        # IN  [OH, OW]
    const int* arg,        # IN  [OH, OW]
    const real* y,         # IN  [OH, OW] the pooled output, or NULL
    real* dx,              # OUT [H, W], zeroed by the caller
    Py_ssize_t n_out,
) noexcept nogil:
    """PB1 + PB3: each output's gradient added at its maximum. With ``y`` (the pooling of a
    ReLU's output) only where y > 0: the ReLU's backward folded in, as torch.relu's (zero where
    the output is 0 or NaN, whatever the gradient)."""
    cdef Py_ssize_t o
    if y == NULL:
        for o in range(n_out):
            dx[arg[o]] += dy[o]
    else:
        for o in range(n_out):
            if y[o] > 0:
                dx[arg[o]] += dy[o]
