# cython: language_level=3
"""2-D convolution on the CPU by im2col + BLAS GEMM on tiles of output rows, OpenMP over images
(algorithm="im2col"; fastrnn/_cpu/conv2d.pyx dispatches here).

Contract (the backend interface, fastrnn/backends/base.py; arguments validated and made
C-contiguous by fastrnn.backends.ops):

    x  : [N, C, H, W]       input
    w  : [F, Cg, KH, KW]    weights, Cg = C / groups
    b  : [F] or None        bias
    y  : [N, F, OH, OW]     output
    stride, padding, dilation : (h, w) int pairs; groups divides C and F

Steps cite fastrnn/reference/conv2d.py (C1..C4 forward, CB1..CB5 backward).

Layout of one image: the columns ``cols`` [C*KH*KW, L], rows ordered (c, i, j), L = OH*OW;
group g owns the K = Cg*KH*KW rows from g*K. y[n] viewed as [F, L] is w_g [Fg, K] @ cols_g per
group: already NCHW, no transpose. The columns are built for a tile of whole output rows at a
time (about TILE_COLUMNS positions), so one thread holds at most one tile of columns and the
tile stays in cache from im2col through the GEMMs (and col2im).

Threads (fastrnn.get_num_threads()), never BLAS threads inside OpenMP threads:
* forward: the (image, tile) pairs run in parallel (dynamic schedule), each thread with its own
  column buffer and BLAS pinned to one thread; tiles write disjoint parts of y, so even a
  single image spreads over the threads. With fewer pairs than threads they run one after
  another and BLAS gets the threads.
* backward: chunks of whole images run in parallel the same way (col2im of neighbouring tiles
  adds into the same rows of dx, so an image stays on one thread). Each chunk accumulates dw
  over its images, in order, into its own partial (transposed: cols @ dy^T runs faster in
  OpenBLAS than dy @ cols^T); the partials are summed in chunk order afterwards. The chunks
  depend on the sizes only, so results are bitwise the same for any thread count and run.
  db is a fixed-order sum per channel. With fewer chunks than threads, they run one after
  another and BLAS gets the threads.

Pointwise convolutions (1x1, stride 1, no padding) skip im2col: x[n] viewed as [C, H*W] already
is the column matrix, and the dx GEMM writes dx[n] directly (no col2im).
"""

from cython.parallel cimport parallel, prange
from libc.string cimport memcpy, memset

import contextlib

import numpy as np

from fastrnn._cpu._blas cimport floating, gemm, load_scipy_blas
from fastrnn._cpu._openmp cimport omp_get_thread_num
from fastrnn._cpu._pool_plane cimport valid_outputs
from fastrnn._cpu._sums cimport channel_sum

cdef extern from "_small_gemm.h":
    int fr_small_gemm_isa
    void fr_small_gemm_init() noexcept nogil
    void fr_sgemm(int isa, Py_ssize_t M, Py_ssize_t n, Py_ssize_t K, const float* A,
                  Py_ssize_t ars, Py_ssize_t aks, const float* B, Py_ssize_t ldb,
                  float beta, float* C, Py_ssize_t ldc, Py_ssize_t chunk) noexcept nogil

from fastrnn._cpu._blas_threads import blas_threads
from fastrnn._cpu._buffers import empty as output
from fastrnn._threads import get_num_threads
from fastrnn.context import Context


fr_small_gemm_init()

cdef Py_ssize_t TILE_COLUMNS = 512
# Pointwise float32 forwards multiply on fastrnn's AVX-512 register tiles (_small_gemm.h, B = x
# read in place) instead of BLAS, whose packing of both operands dominates these small GEMMs
# (one thread, (32,256,14x14)->64: 115 against 85 GFLOP/s; benchmarks/NOTES-conv.md). The AVX2
# tiles measured within 6% of OpenBLAS either way on a Zen 3 (5 rounds, 1 and 2 threads:
# (32,256,14x14)->64 3.64 vs 3.45 ms, (64,32,16x16)->64 1.90 vs 2.06 ms), so AVX2 keeps BLAS. False
# (set_pointwise_tiles) pins BLAS, for tests.
cdef bint POINTWISE_TILES = True
# ... on tiles of at least this many columns: narrower ones waste much of their masked last
# vectors ((16,512,7x7)->512, 49 columns: 0.92-0.97x BLAS's speed)
cdef enum:
    POINTWISE_TILES_MIN_COLUMNS = 128
cdef enum:
    KBLOCK = 16  # rows of a dw partial transposed together (_reduce_block)


cdef struct Geom:
    Py_ssize_t N, C, H, W, F, KH, KW, OH, OW
    Py_ssize_t sh, sw, ph, pw, dh, dw
    Py_ssize_t G, Fg, K, L   # groups, output channels per group, column length, OH*OW
    bint pointwise           # 1x1, stride 1, no padding: no im2col
    Py_ssize_t tile_rows     # output rows per column tile


cdef Geom _geometry(tuple x_shape, tuple w_shape, stride, padding, dilation, groups):
    cdef Geom g
    g.N, g.C, g.H, g.W = x_shape
    g.F, _, g.KH, g.KW = w_shape
    g.sh, g.sw = stride
    g.ph, g.pw = padding
    g.dh, g.dw = dilation
    g.G = groups
    g.Fg = g.F // g.G
    g.K = (g.C // g.G) * g.KH * g.KW
    g.OH = (g.H + 2 * g.ph - g.dh * (g.KH - 1) - 1) // g.sh + 1
    g.OW = (g.W + 2 * g.pw - g.dw * (g.KW - 1) - 1) // g.sw + 1
    g.L = g.OH * g.OW
    g.pointwise = (g.KH == 1 and g.KW == 1 and g.sw == 1 and g.sh == 1
                   and g.ph == 0 and g.pw == 0)
    # About TILE_COLUMNS output positions per tile (whole rows): OpenBLAS runs these GEMMs
    # faster on 256-1024 columns than on a whole 56x56 image (single thread, 64x576 @ 576xL:
    # 116 GFLOP/s at L=3136, 140-150 at L=392-784), and the tile's columns stay in cache between
    # im2col, the GEMMs and col2im.
    g.tile_rows = max(1, min(g.OH, TILE_COLUMNS // g.OW)) if g.OW > 0 else 1
    return g


def _load_blas() -> None:
    """Point gemm at SciPy's sgemm and dgemm (once per process), before the first call that
    runs a GEMM: unlike the recurrent modules this one does not load them at import, since a
    float32 pointwise forward on the tiles never needs them."""
    load_scipy_blas()


cdef void _im2col(
    const floating* x,     # IN  [C, H, W] one image
    floating* cols,        # OUT [C*KH*KW, (oh1 - oh0) * OW]: the columns of output rows oh0..oh1
    Py_ssize_t r0,         # IN  first output row of the tile
    Py_ssize_t r1,         # IN  end of the tile's output rows
    const Geom* g,
) noexcept nogil:
    """C1 + C2 on a tile of output rows: cols[(c, i, j), (oh - r0, ow)] =
    x[c, oh*sh + i*dh - ph, ow*sw + j*dw - pw], 0 in the padding. Stride-1 rows are one memcpy
    between two zeroed margins."""
    cdef Py_ssize_t c, i, j, oh, ow, oh0, oh1, ow0, ow1, offh, offw
    cdef Py_ssize_t T = (r1 - r0) * g.OW
    cdef floating* out
    cdef floating* row
    cdef const floating* src
    for c in range(g.C):
        for i in range(g.KH):
            offh = i * g.dh - g.ph
            valid_outputs(offh, g.sh, g.H, g.OH, &oh0, &oh1)
            oh0 = min(max(oh0, r0), r1)
            oh1 = max(min(oh1, r1), oh0)
            for j in range(g.KW):
                offw = j * g.dw - g.pw
                valid_outputs(offw, g.sw, g.W, g.OW, &ow0, &ow1)
                out = cols + ((c * g.KH + i) * g.KW + j) * T - r0 * g.OW  # indexed by oh
                if oh0 > r0:
                    memset(out + r0 * g.OW, 0, (oh0 - r0) * g.OW * sizeof(floating))
                if oh1 < r1:
                    memset(out + oh1 * g.OW, 0, (r1 - oh1) * g.OW * sizeof(floating))
                for oh in range(oh0, oh1):
                    src = x + (c * g.H + oh * g.sh + offh) * g.W
                    row = out + oh * g.OW
                    if ow0 > 0:
                        memset(row, 0, ow0 * sizeof(floating))
                    if ow1 < g.OW:
                        memset(row + ow1, 0, (g.OW - ow1) * sizeof(floating))
                    if g.sw == 1:
                        memcpy(row + ow0, src + ow0 + offw, (ow1 - ow0) * sizeof(floating))
                    else:
                        for ow in range(ow0, ow1):
                            row[ow] = src[ow * g.sw + offw]


cdef void _col2im(
    const floating* cols,  # IN  [C*KH*KW, (r1 - r0) * OW] column gradients of a tile
    floating* dx,          # INOUT [C, H, W] of the image, zeroed before its first tile
    Py_ssize_t r0,         # IN  first output row of the tile
    Py_ssize_t r1,         # IN  end of the tile's output rows
    const Geom* g,
) noexcept nogil:
    """CB4 + CB5: the transpose of _im2col; gradient landing on padding is dropped."""
    cdef Py_ssize_t c, i, j, oh, ow, oh0, oh1, ow0, ow1, offh, offw
    cdef Py_ssize_t T = (r1 - r0) * g.OW
    cdef const floating* row
    cdef floating* dst
    for c in range(g.C):
        for i in range(g.KH):
            offh = i * g.dh - g.ph
            valid_outputs(offh, g.sh, g.H, g.OH, &oh0, &oh1)
            oh0 = min(max(oh0, r0), r1)
            oh1 = max(min(oh1, r1), oh0)
            for j in range(g.KW):
                offw = j * g.dw - g.pw
                valid_outputs(offw, g.sw, g.W, g.OW, &ow0, &ow1)
                for oh in range(oh0, oh1):
                    row = cols + ((c * g.KH + i) * g.KW + j) * T + (oh - r0) * g.OW
                    dst = dx + (c * g.H + oh * g.sh + offh) * g.W + offw
                    if g.sw == 1:
                        for ow in range(ow0, ow1):
                            dst[ow] += row[ow]
                    else:
                        for ow in range(ow0, ow1):
                            dst[ow * g.sw] += row[ow]


cdef void _forward_tile(
    const floating* x,     # IN  [C, H, W] one image
    const floating* w,     # IN  [G, Fg, K]
    const floating* b,     # IN  [F] or NULL
    floating* y,           # OUT [F, L] of the image; this writes the tile's columns
    floating* buf,         # scratch [C*KH*KW, tile columns] (unused when pointwise)
    Py_ssize_t r0,         # IN  first output row of the tile
    Py_ssize_t r1,         # IN  end of the tile's output rows
    const Geom* g,
    bint tiles,            # IN  float32 pointwise: the GEMMs on fastrnn's tiles
    bint relu,             # IN  y = max(y, 0) on the tile (NaN kept)
) noexcept nogil:
    """C1-C4 for output rows r0..r1 of one image. Tiles write disjoint parts of y."""
    cdef floating beta = 0
    cdef Py_ssize_t f, e, grp
    cdef Py_ssize_t T = (r1 - r0) * g.OW
    cdef Py_ssize_t ld = T
    cdef const floating* cols = buf
    cdef floating* yr
    if b != NULL:  # C4, as the GEMM's starting value (beta = 1)
        for f in range(g.F):
            for e in range(T):
                y[f * g.L + r0 * g.OW + e] = b[f]
        beta = 1
    if g.pointwise:  # x itself is the column matrix [C, L]
        cols = x + r0 * g.OW
        ld = g.L
    else:
        _im2col(x, buf, r0, r1, g)  # C1, C2
    for grp in range(g.G):  # C3
        if floating is float and tiles and T >= POINTWISE_TILES_MIN_COLUMNS:
            fr_sgemm(2, g.Fg, T, g.K, w + grp * g.Fg * g.K, g.K, 1,
                     cols + grp * g.K * ld, ld, beta, y + grp * g.Fg * g.L + r0 * g.OW, g.L, 256)
        else:
            gemm(False, False, <int> g.Fg, <int> T, <int> g.K, <floating> 1,
                 w + grp * g.Fg * g.K, <int> g.K, cols + grp * g.K * ld, <int> ld,
                 beta, y + grp * g.Fg * g.L + r0 * g.OW, <int> g.L)
    if relu:  # the fused activation while the tile is in cache
        for f in range(g.F):
            yr = y + f * g.L + r0 * g.OW
            for e in range(T):
                if yr[e] < 0:
                    yr[e] = 0


cdef void _backward_image(
    const floating* x,     # IN  [C, H, W]
    const floating* w,     # IN  [G, Fg, K]
    const floating* dy,    # IN  [F, L]
    floating* dx,          # OUT [C, H, W], or NULL: dw only
    floating* dw_part,     # INOUT [G, K, Fg] this thread's partial sum of dw, transposed per group
    floating* buf,         # scratch [C*KH*KW, tile columns]: the columns, then their gradients
    const Geom* g,
    bint tiles,            # IN  float32 pointwise: dx's GEMM on fastrnn's tiles
) noexcept nogil:
    cdef Py_ssize_t grp, r0, r1, T
    if g.pointwise:
        for grp in range(g.G):
            # CB2, transposed: dw_g^T [K, Fg] += x_g [K, L] @ dy_g^T [L, Fg]
            gemm(False, True, <int> g.K, <int> g.Fg, <int> g.L, <floating> 1,
                 x + grp * g.K * g.L, <int> g.L, dy + grp * g.Fg * g.L, <int> g.L,
                 <floating> 1, dw_part + grp * g.K * g.Fg, <int> g.Fg)
            if dx == NULL:
                continue
            # CB3 straight into dx: dx_g = w_g^T [K, Fg] @ dy_g [Fg, L]
            if floating is float and tiles and g.L >= POINTWISE_TILES_MIN_COLUMNS:
                fr_sgemm(2, g.K, g.L, g.Fg, w + grp * g.Fg * g.K, 1, g.K,
                         dy + grp * g.Fg * g.L, g.L, 0, dx + grp * g.K * g.L, g.L, 256)
            else:
                gemm(True, False, <int> g.K, <int> g.L, <int> g.Fg, <floating> 1,
                     w + grp * g.Fg * g.K, <int> g.K, dy + grp * g.Fg * g.L, <int> g.L,
                     <floating> 0, dx + grp * g.K * g.L, <int> g.L)
        return
    if dx != NULL:
        memset(dx, 0, g.C * g.H * g.W * sizeof(floating))
    r0 = 0
    while r0 < g.OH:
        r1 = min(r0 + g.tile_rows, g.OH)
        T = (r1 - r0) * g.OW
        _im2col(x, buf, r0, r1, g)  # C2, recomputed from x instead of saved
        for grp in range(g.G):  # CB2, transposed: dw_g^T [K, Fg] += cols_g [K, T] @ dy_g^T
            gemm(False, True, <int> g.K, <int> g.Fg, <int> T, <floating> 1,
                 buf + grp * g.K * T, <int> T, dy + grp * g.Fg * g.L + r0 * g.OW, <int> g.L,
                 <floating> 1, dw_part + grp * g.K * g.Fg, <int> g.Fg)
        if dx == NULL:
            r0 = r1
            continue
        for grp in range(g.G):  # CB3 into the (now free) column buffer
            gemm(True, False, <int> g.K, <int> T, <int> g.Fg, <floating> 1,
                 w + grp * g.Fg * g.K, <int> g.K, dy + grp * g.Fg * g.L + r0 * g.OW, <int> g.L,
                 <floating> 0, buf + grp * g.K * T, <int> T)
        _col2im(buf, dx, r0, r1, g)  # CB4, CB5
        r0 = r1


cdef void _reduce_block(
    const floating* parts,  # IN  [P, G, K, Fg] the chunks' partials (transposed per group)
    Py_ssize_t P,           # IN  number of chunks
    floating* dw,           # OUT [G, Fg, K]
    Py_ssize_t block,       # IN  block index: group grp, columns k0 .. k0 + KBLOCK of dw
    const Geom* g,
) noexcept nogil:
    """CB2 across chunks for one block of KBLOCK rows of a partial: dw[grp, f, k] = sum over c
    (in chunk order) of parts[c, grp, k, f]. Blocked so the strided side of the transpose stays
    in L1 (an element-by-element transpose missed the cache on every read: 15% of a backward
    pass for 8x128x28x28 -> 128)."""
    cdef Py_ssize_t nkb = (g.K + KBLOCK - 1) // KBLOCK
    cdef Py_ssize_t grp = block // nkb
    cdef Py_ssize_t k0 = (block - grp * nkb) * KBLOCK
    cdef Py_ssize_t k1 = min(k0 + KBLOCK, g.K)
    cdef Py_ssize_t ps = g.G * g.K * g.Fg
    cdef Py_ssize_t c, f, k
    cdef const floating* src = parts + grp * g.K * g.Fg
    cdef floating* dst = dw + grp * g.Fg * g.K
    cdef floating acc
    for f in range(g.Fg):
        for k in range(k0, k1):
            acc = src[k * g.Fg + f]
            for c in range(1, P):
                acc = acc + src[c * ps + k * g.Fg + f]
            dst[f * g.K + k] = acc


cdef tuple _shape(const floating[:, :, :, ::1] a):
    return (a.shape[0], a.shape[1], a.shape[2], a.shape[3])


def _forward(
    const floating[:, :, :, ::1] x,   # IN
    const floating[:, :, :, ::1] w,   # IN
    const floating[::1] b,            # IN  (length 0 when there is no bias)
    floating[:, :, :, ::1] y,         # OUT
    floating[:, ::1] bufs,            # scratch, one row per thread
    stride, padding, dilation, int groups, int nthreads,
    blas,                             # context manager setting the BLAS threads (see _plan)
    bint use_tiles=False,             # float32 pointwise GEMMs on fastrnn's tiles
    bint relu=False,                  # the fused ReLU
):
    cdef Geom g = _geometry(_shape(x), _shape(w), stride, padding, dilation,
                            groups)
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef const floating* wp = &w[0, 0, 0, 0]
    cdef const floating* bp = &b[0] if b.shape[0] > 0 else NULL
    cdef floating* yp = &y[0, 0, 0, 0]
    cdef floating* bufp = &bufs[0, 0]
    cdef Py_ssize_t xs = g.C * g.H * g.W, ys = g.F * g.L, cs = bufs.shape[1]
    cdef Py_ssize_t tiles = (g.OH + g.tile_rows - 1) // g.tile_rows
    cdef Py_ssize_t item, n, r0
    cdef int tid
    # Work items are (image, tile) pairs: they write disjoint parts of y, so even one image
    # spreads over the threads.
    if bufs.shape[0] > 1:
        with blas:
            with nogil, parallel(num_threads=nthreads):
                tid = omp_get_thread_num()
                for item in prange(g.N * tiles, schedule="dynamic"):
                    n = item // tiles
                    r0 = (item - n * tiles) * g.tile_rows
                    _forward_tile(xp + n * xs, wp, bp, yp + n * ys, bufp + tid * cs,
                                  r0, min(r0 + g.tile_rows, g.OH), &g, use_tiles, relu)
    else:
        with blas:
            with nogil:
                for item in range(g.N * tiles):
                    n = item // tiles
                    r0 = (item - n * tiles) * g.tile_rows
                    _forward_tile(xp + n * xs, wp, bp, yp + n * ys, bufp,
                                  r0, min(r0 + g.tile_rows, g.OH), &g, use_tiles, relu)


def _backward(
    const floating[:, :, :, ::1] x,   # IN
    const floating[:, :, :, ::1] w,   # IN
    const floating[:, :, :, ::1] dy,  # IN
    floating[:, :, :, ::1] dx,        # OUT, or None: dw (and db) only
    floating[:, :, :, ::1] dw,        # OUT
    floating[::1] db,                 # OUT (length 0 when there is no bias)
    floating[:, ::1] parts,           # scratch [chunks, F*K], zeroed by the caller
    floating[:, ::1] bufs,            # scratch, one row per thread
    stride, padding, dilation, int groups, int nthreads,
    blas,                             # context manager setting the BLAS threads (see _plan)
    bint use_tiles=False,             # float32 pointwise dx GEMMs on fastrnn's tiles
):
    cdef Geom g = _geometry(_shape(x), _shape(w), stride, padding, dilation,
                            groups)
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef const floating* wp = &w[0, 0, 0, 0]
    cdef const floating* dyp = &dy[0, 0, 0, 0]
    cdef floating* dxp = &dx[0, 0, 0, 0] if dx is not None else NULL
    cdef floating* dwp = &dw[0, 0, 0, 0]
    cdef floating* partp = &parts[0, 0]
    cdef floating* bufp = &bufs[0, 0]
    cdef Py_ssize_t xs = g.C * g.H * g.W, ys = g.F * g.L, cs = bufs.shape[1]
    cdef Py_ssize_t ps = parts.shape[1], P = parts.shape[0]
    cdef Py_ssize_t c, n, f, e
    cdef int tid
    # Chunk c holds images [c*N/P, (c+1)*N/P) and sums their dw, in image order, into partial
    # c; whichever thread runs it, the arithmetic is the same.
    if bufs.shape[0] > 1:
        with blas:
            with nogil, parallel(num_threads=nthreads):
                tid = omp_get_thread_num()
                for c in prange(P, schedule="dynamic"):
                    for n in range(c * g.N // P, (c + 1) * g.N // P):
                        _backward_image(xp + n * xs, wp, dyp + n * ys, (dxp + n * xs if dxp != NULL else dxp),
                                        partp + c * ps, bufp + tid * cs, &g, use_tiles)
    else:
        with blas:
            with nogil:
                for c in range(P):
                    for n in range(c * g.N // P, (c + 1) * g.N // P):
                        _backward_image(xp + n * xs, wp, dyp + n * ys, (dxp + n * xs if dxp != NULL else dxp),
                                        partp + c * ps, bufp, &g, use_tiles)
    with nogil:
        # CB2 across chunks: the partials summed in chunk order and transposed back.
        for e in prange(g.G * ((g.K + KBLOCK - 1) // KBLOCK), num_threads=nthreads,
                        schedule="static"):
            _reduce_block(partp, P, dwp, e, &g)
        if db.shape[0] > 0:  # CB1
            for f in prange(g.F, num_threads=nthreads, schedule="static"):
                db[f] = <floating> channel_sum(dyp, g.N, g.F, g.L, f)


# Below this many multiply-adds a call runs on one thread: the parallel region and the BLAS
# pinning cost more than they save (measured: 32x1x8x8 -> 32, k3, 590K multiply-adds, forward
# and backward take as long on 2 threads as on 1).
MIN_PARALLEL_MACS = 1 << 21
# Below this many, not even the BLAS pinning is needed: OpenBLAS runs a GEMM with
# m*n*k <= 2^18 on one thread by itself, and a smaller call holds no larger GEMM.
BLAS_SERIAL_MACS = 1 << 18


def _plan(Py_ssize_t macs, Py_ssize_t items) -> tuple:
    """(OpenMP threads, per-thread buffers, BLAS thread context) for a call of ``macs``
    multiply-adds split into ``items`` work items.

    Items run in parallel (one buffer per thread, BLAS pinned to one thread) when there are at
    least as many as threads; otherwise one after another (one buffer) with BLAS on the
    threads."""
    nt = get_num_threads() if macs >= MIN_PARALLEL_MACS else 1
    if nt > 1 and items >= nt:
        return nt, nt, blas_threads(1)
    if nt == 1 and macs < BLAS_SERIAL_MACS:
        return 1, 1, contextlib.nullcontext()
    return nt, 1, blas_threads(nt)


# Images of a backward pass are split into at most this many chunks, each with its own dw
# partial; the number depends on the sizes only, never on the thread count, so results are
# the same with any number of threads. Enough chunks to balance a few threads (dynamic
# schedule: a thread slowed by other load takes fewer chunks).
MAX_CHUNKS = 8
# ... and the partials together stay below this many bytes.
MAX_PARTIAL_BYTES = 64 << 20


def _chunks(Py_ssize_t N, Py_ssize_t weight_bytes) -> int:
    return int(max(1, min(N, MAX_CHUNKS, MAX_PARTIAL_BYTES // max(weight_bytes, 1))))


def _column_size(tuple x_shape, tuple w_shape, tuple geometry) -> int:
    """Length of one thread's column buffer (1 for pointwise convolutions, which need none)."""
    stride, padding, dilation, groups = geometry
    cdef Geom g = _geometry(x_shape, w_shape, stride, padding, dilation, groups)
    return 1 if g.pointwise else g.C * g.KH * g.KW * g.tile_rows * g.OW


# BLAS takes 32-bit sizes and leading dimensions.
INT_MAX = 2147483647


cdef _check_sizes(tuple x_shape, tuple w_shape, padding, const Geom* g):
    """Refuse what the kernel cannot index: an empty image plane (no input behind any
    output), or GEMM sizes beyond BLAS's 32-bit integers (an output plane OH*OW, a column
    length C/groups*KH*KW, or F/groups). fastrnn.backends.ops refuses empty planes first; this
    also guards direct calls of the kernel module."""
    if g.H < 1 or g.W < 1:
        raise ValueError(f"x: expected image planes of at least 1x1, got shape {x_shape}")
    if g.OH < 1 or g.OW < 1:
        raise ValueError(f"w: the kernel {w_shape} is larger than the padded input {x_shape}")
    if g.L > INT_MAX:
        name = "padding" if tuple(padding) != (0, 0) else "x"
        raise ValueError(
            f"{name}: the output plane of {g.OH}x{g.OW} positions (x {x_shape}, padding "
            f"{tuple(padding)}) is more than the CPU kernel's 32-bit BLAS sizes allow (2^31-1)"
        )
    if g.K > INT_MAX or g.Fg > INT_MAX:
        raise ValueError(
            f"w: shape {w_shape} makes GEMMs of {g.Fg} x {g.K}, more than the CPU kernel's "
            "32-bit BLAS sizes allow (2^31-1)"
        )


cdef bint _pointwise_tiles(const Geom* g, dtype, nt, nbuf):
    """Whether this call's pointwise GEMMs run on fastrnn's AVX-512 tiles: float32 on a CPU that has
    them, and not where the items run one after another with BLAS threads (the tiles run on
    the calling thread alone)."""
    return (POINTWISE_TILES and fr_small_gemm_isa == 2 and g.pointwise and dtype == np.float32
            and (nbuf > 1 or nt == 1))


def _im2col_forward(x, w, b, stride, padding, dilation, groups, training, relu=False):
    """im2col + GEMM: x (N,C,H,W); w (F,C/groups,KH,KW); b (F,) or None -> y (N,F,OH,OW), ctx;
    ``relu``: y = max(y, 0) (NaN kept), tile by tile."""
    cdef Geom g = _geometry(x.shape, w.shape, stride, padding, dilation, groups)
    _check_sizes(x.shape, w.shape, padding, &g)
    nt, nbuf, blas = _plan(g.N * g.F * g.L * g.K, g.N * ((g.OH + g.tile_rows - 1) // g.tile_rows))
    tiles = _pointwise_tiles(&g, x.dtype, nt, nbuf)
    last_rows = g.OH - (g.OH - 1) // g.tile_rows * g.tile_rows
    if tiles and min(g.tile_rows, last_rows) * g.OW >= POINTWISE_TILES_MIN_COLUMNS:
        blas = contextlib.nullcontext()  # every GEMM on the tiles: no BLAS to load or pin
    else:
        _load_blas()
    y = output((g.N, g.F, g.OH, g.OW), x.dtype)
    bufs = np.empty((nbuf, _column_size(x.shape, w.shape,
                                        (stride, padding, dilation, groups))), dtype=x.dtype)
    bias = np.empty(0, dtype=x.dtype) if b is None else b
    _forward(x, w, bias, y, bufs, stride, padding, dilation, groups, nt, blas, tiles, relu)
    ctx = None
    if training:
        ctx = Context(
            op="conv2d",
            backend="cpu",
            dtype=x.dtype,
            cupy=False,
            grad_shapes={"dy": y.shape},
            saved=dict(x=x, w=w, has_bias=b is not None,
                       geometry=(stride, padding, dilation, groups), algorithm="im2col"),
        )
    return y, ctx


def _im2col_backward(ctx, dy, input_grad=True):
    """dy (N,F,OH,OW) -> dx (N,C,H,W) (None without ``input_grad``), dw (F,C/groups,KH,KW),
    db (F,) or None."""
    s = ctx.saved
    x, w, geometry = s["x"], s["w"], s["geometry"]
    chunks = _chunks(x.shape[0], w.nbytes)
    F, L = w.shape[0], dy.shape[2] * dy.shape[3]
    nt, nbuf, blas = _plan(x.shape[0] * F * L * (w.size // F), chunks)
    cdef Geom g = _geometry(x.shape, w.shape, geometry[0], geometry[1], geometry[2], geometry[3])
    tiles = _pointwise_tiles(&g, x.dtype, nt, nbuf)
    _load_blas()  # (dw is always BLAS's)
    dx = output(x.shape, x.dtype) if input_grad else None
    dw = np.empty_like(w)
    db = np.empty(w.shape[0] if s["has_bias"] else 0, dtype=x.dtype)
    parts = np.zeros((chunks, w.size), dtype=x.dtype)
    bufs = np.empty((nbuf, _column_size(x.shape, w.shape, geometry)), dtype=x.dtype)
    _backward(x, w, dy, dx, dw, db, parts, bufs, *geometry, nt, blas, tiles)
    return dx, dw, (db if s["has_bias"] else None)


def set_pointwise_tiles(bint on) -> bool:
    """Whether float32 pointwise forwards use fastrnn's tiles (where the CPU has
    AVX-512) or BLAS; returns the previous setting. For tests: both must give the reference's
    result."""
    global POINTWISE_TILES
    previous = POINTWISE_TILES
    POINTWISE_TILES = on
    return previous


def _set_tile_columns(Py_ssize_t n) -> int:
    """Output positions per column tile (rounded to whole rows, at least one row); returns the
    previous value. For tests, which need images spanning several tiles."""
    global TILE_COLUMNS
    if n < 1:
        raise ValueError(f"n: expected at least 1 column per tile, got {n}")
    previous = TILE_COLUMNS
    TILE_COLUMNS = n
    return previous
