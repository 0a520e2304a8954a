# cython: language_level=3
"""2-D convolution on the CPU: the algorithms and their dispatch.

Contract (the backend interface, fastrnn/backends/base.py; arguments validated and made
C-contiguous by fastrnn.backends.ops):

    x  : [N, C, H, W]       input
    w  : [F, Cg, KH, KW]    weights, Cg = C / groups
    b  : [F] or None        bias
    y  : [N, F, OH, OW]     output
    stride, padding, dilation : (h, w) int pairs; groups divides C and F

Steps cite fastrnn/reference/conv2d.py (C1..C4 forward, CB1..CB5 backward).

* "direct": our micro-kernels (conv_direct.c), below;
* "winograd": F(2x2, 3x3) on the same micro-kernel (conv_winograd.h), below; its backward
  computes dx by Winograd as well and dw by the direct kernels;
* "im2col": column tiles + BLAS GEMM, in fastrnn/_cpu/conv2d_im2col.pyx, imported on first use:
  it needs SciPy's BLAS, whose import (scipy.linalg, 120-400 ms here) a first call of the
  other algorithms then does not pay.

Threads: fastrnn.get_num_threads(); work is split by sizes, never by the thread count, so 1 and
N threads give bitwise the same results.
"""

from cython.parallel cimport parallel, prange
from libc.string cimport memset

import importlib
import threading

import numpy as np

from fastrnn._cpu._openmp cimport omp_get_thread_num
from fastrnn._cpu._pool_plane cimport PoolGeom, max_argmax_plane, pool_geometry

from fastrnn._cpu._buffers import empty as output
from fastrnn._threads import get_num_threads
from fastrnn.context import Context

ctypedef fused floating:
    float
    double


cdef tuple _shape(const floating[:, :, :, ::1] a):
    return (a.shape[0], a.shape[1], a.shape[2], a.shape[3])


# Below this many multiply-adds a call runs on one thread: the parallel region costs more than
# it saves (measured: 32x1x8x8 -> 32, k3, 590K multiply-adds, forward and backward take as
# long on 2 threads as on 1).
MIN_PARALLEL_MACS = 1 << 21
# Images of a backward pass are split into at most this many chunks, each with its own dw
# partial; the number depends on the sizes only, never on the thread count, so results are
# the same with any number of threads.
MAX_CHUNKS = 8
# ... and the partials together stay below this many bytes.
MAX_PARTIAL_BYTES = 64 << 20
# Past MIN_CHUNKS (enough to share out evenly over 2 or 4 threads), only as many chunks as keep
# their partials within PARTIAL_BYTES, in a power of two: each partial is zeroed, accumulated
# image by image and summed, memory traffic that wide weights pay per chunk (a (256,256,3,3)
# partial is 2.4 MB, more than a core's L2). 8 -> 4 chunks: backward of (16,256,14x14)->256
# 1.05-1.11x, (32,64,56x56)->128 stride 2 1.00-1.09x; benchmarks/NOTES-conv.md.
MIN_CHUNKS = 4
PARTIAL_BYTES = 2 << 20


def _chunks(Py_ssize_t N, Py_ssize_t weight_bytes) -> int:
    """Chunks of a backward pass's images (each with its own dw partial): a function of the
    sizes only, never of the thread count, so results are the same with any number of
    threads."""
    cdef Py_ssize_t fit = max(1, PARTIAL_BYTES // max(weight_bytes, 1))
    fit = 1 << (fit.bit_length() - 1)  # a power of two: even shares over 2, 4, 8 threads
    return int(max(1, min(N, MAX_CHUNKS, MAX_PARTIAL_BYTES // max(weight_bytes, 1),
                          max(MIN_CHUNKS, fit))))


def _im2col():
    """The im2col module, imported on first use (it loads SciPy's BLAS)."""
    module = importlib.import_module("fastrnn._cpu.conv2d_im2col")
    module.MIN_PARALLEL_MACS = MIN_PARALLEL_MACS
    return module


def _set_tile_columns(Py_ssize_t n) -> int:
    """Output positions per im2col column tile; returns the previous value (for tests)."""
    return _im2col()._set_tile_columns(n)


# ------------------------------------------------------------------------------------------------
# Direct convolution: our own micro-kernels over pitched planes (conv_direct.h / .c)
# ------------------------------------------------------------------------------------------------
#
# An image's input channels are laid out as zero-padded planes, one per channel and stride
# phase (a, b): plane[u, v] = xpad[c, u*sh + a, v*sw + b], Hq x Wq. Every kernel tap (c, i, j)
# then reads the input of output position (oh, ow) at one fixed offset from p = oh*Wq + ow, so
# an output channel is a sum over taps of a weight times a contiguous run of the planes: the
# micro-kernel holds 6 output channels x FWD_RV vectors of positions in registers and streams
# the taps (step C3 without im2col). Positions ow >= OW of each pitched row are computed and
# dropped. The input gradient is the same product on the output gradient's planes, one per
# stride phase of dx, with the kernel transposed and flipped; the weight gradient multiplies
# runs of the output gradient (in the forward's pitch, zero where there is no output) with runs
# of the input planes and reduces over positions.

cdef extern from "conv_direct.h" nogil:
    ctypedef Py_ssize_t idx_t
    ctypedef struct fr_geom:
        idx_t N, C, H, W, F, KH, KW, OH, OW
        idx_t sh, sw, ph, pw, dh, dw, G, Cg, Fg
        idx_t Hq, Wq, Pf_r, QH, QW, Hd, Wd, Pd_r, Kg, Kg_r, Fg_r, wgt
        idx_t x_slack, x_size, d_slack, d_size
        idx_t act
    int FR_ISA_PORTABLE, FR_ISA_AVX2, FR_ISA_AVX512
    int fr_isa_supported(int isa)
    int fr_isa_best()
    idx_t fr_set_fwd_taps(idx_t n)
    idx_t fr_dy_size(const fr_geom* g)
    void fr_depthwise_planes_f32(int isa, const fr_geom* g, const float* x, const float* w,
                                 const float* b, float* y, idx_t q0, idx_t q1, float* pad,
                                 idx_t Wp)
    void fr_depthwise_planes_f64(int isa, const fr_geom* g, const double* x, const double* w,
                                 const double* b, double* y, idx_t q0, idx_t q1, double* pad,
                                 idx_t Wp)
    void fr_depthwise_wgrad_f32(int isa, const fr_geom* g, const float* x, const float* dy,
                                float* dw, float* db, idx_t c0, idx_t c1, float* pad, idx_t Wp,
                                float* dyp, idx_t OWp, float* acc)
    void fr_depthwise_wgrad_f64(int isa, const fr_geom* g, const double* x, const double* dy,
                                double* dw, double* db, idx_t c0, idx_t c1, double* pad,
                                idx_t Wp, double* dyp, idx_t OWp, double* acc)
    void fr_winograd_weights_f32(const float* w, idx_t F, idx_t C, idx_t fb0, idx_t fb1,
                                 float* u)
    void fr_winograd_weights_f64(const double* w, idx_t F, idx_t C, idx_t fb0, idx_t fb1,
                                 double* u)
    idx_t fr_winograd_band_f32(int isa, const fr_geom* g, const fr_geom* gw, const float* x,
                               idx_t r0, idx_t r1, idx_t packed, const float* u,
                               const idx_t* off, const float* b, float* y, idx_t ring,
                               float* xq, float* v, float* m, idx_t ldv, idx_t vs)
    idx_t fr_winograd_band_f64(int isa, const fr_geom* g, const fr_geom* gw, const double* x,
                               idx_t r0, idx_t r1, idx_t packed, const double* u,
                               const idx_t* off, const double* b, double* y, idx_t ring,
                               double* xq, double* v, double* m, idx_t ldv, idx_t vs)
    void fr_winograd_wgrad_band_f32(int isa, const fr_geom* g, const fr_geom* gw,
                                    const float* xq, const float* dyf, idx_t dsz, idx_t nimg,
                                    const idx_t* off, idx_t Cr, float* part, float* v, idx_t ldv,
                                    float* d)
    void fr_winograd_wgrad_band_f64(int isa, const fr_geom* g, const fr_geom* gw,
                                    const double* xq, const double* dyf, idx_t dsz, idx_t nimg,
                                    const idx_t* off, idx_t Cr, double* part, double* v,
                                    idx_t ldv, double* d)
    void fr_winograd_wgrad_finish_f32(const float* parts, idx_t chunks, idx_t psize, idx_t F,
                                      idx_t C, idx_t Cr, idx_t Fr, idx_t c0, idx_t c1,
                                      float* dw)
    void fr_winograd_wgrad_finish_f64(const double* parts, idx_t chunks, idx_t psize, idx_t F,
                                      idx_t C, idx_t Cr, idx_t Fr, idx_t c0, idx_t c1,
                                      double* dw)
    int fr_wgradt_nt(int isa)
    double fr_sum8_f32(int isa, const float* a, idx_t n)
    double fr_sum8_f64(int isa, const double* a, idx_t n)
    void fr_pack_input_f32(int isa, const fr_geom* g, const float* x, float* xq)
    void fr_pack_input_f64(int isa, const fr_geom* g, const double* x, double* xq)
    void fr_pack_dy_forward_pitch_f32(const fr_geom* g, const float* dy, float* dyf)
    void fr_pack_dy_forward_pitch_f64(const fr_geom* g, const double* dy, double* dyf)
    void fr_pack_dy_planes_f32(const fr_geom* g, const float* dy, float* dyq)
    void fr_pack_dy_planes_f64(const fr_geom* g, const double* dy, double* dyq)
    void fr_forward_block_f32(int isa, const fr_geom* g, const float* xq, const idx_t* off,
                              const float* wblk, const float* b, float* y, idx_t grp, idx_t f0,
                              int nf, float* tile)
    void fr_forward_block_f64(int isa, const fr_geom* g, const double* xq, const idx_t* off,
                              const double* wblk, const double* b, double* y, idx_t grp,
                              idx_t f0, int nf, double* tile)
    void fr_dgrad_block_f32(int isa, const fr_geom* g, const float* dyq, const idx_t* off,
                            idx_t K, const float* wblk, float* dx, idx_t grp, idx_t c0, int nc,
                            idx_t a, idx_t b, float* tile)
    void fr_dgrad_block_f64(int isa, const fr_geom* g, const double* dyq, const idx_t* off,
                            idx_t K, const double* wblk, double* dx, idx_t grp, idx_t c0,
                            int nc, idx_t a, idx_t b, double* tile)
    void fr_dgrad_pair_f32(int isa, const fr_geom* g, const float* dyq, const idx_t* off0,
                           idx_t K0, const float* wblk0, const idx_t* off1, idx_t K1,
                           const float* wblk1, float* dx, idx_t grp, idx_t c0, int nc,
                           idx_t a, float* tile)
    void fr_dgrad_pair_f64(int isa, const fr_geom* g, const double* dyq, const idx_t* off0,
                           idx_t K0, const double* wblk0, const idx_t* off1, idx_t K1,
                           const double* wblk1, double* dx, idx_t grp, idx_t c0, int nc,
                           idx_t a, double* tile)
    void fr_wgrad_image_f32(int isa, const fr_geom* g, const float* xq, const float* dyf,
                            const idx_t* off, float* part)
    void fr_wgrad_image_f64(int isa, const fr_geom* g, const double* xq, const double* dyf,
                            const idx_t* off, double* part)


ISA_NAMES = {"portable": FR_ISA_PORTABLE, "avx2": FR_ISA_AVX2, "avx512": FR_ISA_AVX512}
_forced_isa = None


# Taps per pass of the forward kernel: the input rows a block of positions reads for 128 taps
# stay in L1, where all channels' rows of a wide layer do not (stride 2 reads four phase planes
# per channel): (32,64,56x56)->128 stride 2, 1.065-1.084x at 1 and 2 threads; the other layers
# measured within noise of one pass (benchmarks/NOTES-conv.md)
FORWARD_TAPS = 128
fr_set_fwd_taps(FORWARD_TAPS)


def set_forward_taps(Py_ssize_t n) -> int:
    """Taps per pass of the forward kernel over an item's positions (0: all taps in one pass);
    returns the previous value. The sums are the same either way, to the last bit."""
    if n < 0:
        raise ValueError(f"n: expected a count of taps >= 0, got {n}")
    return fr_set_fwd_taps(n)


def isa_supported(str name) -> bool:
    """Whether this CPU runs the direct kernels' ``name`` path ("avx512", "avx2", "portable")."""
    return bool(fr_isa_supported(ISA_NAMES[name]))


def force_isa(name):
    """Pin the direct kernels to one instruction-set path ("avx512", "avx2", "portable"), or
    None for the best this CPU supports; returns the previous setting. For tests and
    benchmarks: every path must give the reference's result."""
    global _forced_isa
    if name is not None:
        if name not in ISA_NAMES:
            raise ValueError(f"name: expected one of {sorted(ISA_NAMES)} or None, got {name!r}")
        if not fr_isa_supported(ISA_NAMES[name]):
            raise ValueError(f"name: this CPU does not support the {name!r} path")
    previous = _forced_isa
    _forced_isa = name
    return previous


cdef int _isa():
    return ISA_NAMES[_forced_isa] if _forced_isa is not None else fr_isa_best()


cdef inline idx_t _round(idx_t n, idx_t m) noexcept nogil:
    return (n + m - 1) // m * m


cdef fr_geom _direct_geometry(tuple x_shape, tuple w_shape, tuple geometry):
    cdef fr_geom g
    cdef idx_t Hp, Wp
    stride, padding, dilation, groups = geometry
    g.N, g.C, g.H, g.W = x_shape
    g.F, g.Cg, g.KH, g.KW = w_shape
    g.sh, g.sw = stride
    g.ph, g.pw = padding
    g.dh, g.dw = dilation
    g.G = groups
    g.Fg = g.F // g.G
    g.OH = (g.H + 2 * g.ph - g.dh * (g.KH - 1) - 1) // g.sh + 1
    g.OW = (g.W + 2 * g.pw - g.dw * (g.KW - 1) - 1) // g.sw + 1
    Hp = g.H + 2 * g.ph
    Wp = g.W + 2 * g.pw
    g.Hq = (Hp + g.sh - 1) // g.sh
    g.Wq = (Wp + g.sw - 1) // g.sw
    g.Pf_r = _round(g.OH * g.Wq, 64)
    g.QH = g.dh * (g.KH - 1) // g.sh
    g.QW = g.dw * (g.KW - 1) // g.sw
    g.Hd = g.Hq + g.QH
    g.Wd = g.Wq + g.QW
    g.Pd_r = _round(g.Hq * g.Wd, 64)
    g.Kg = g.Cg * g.KH * g.KW
    g.Kg_r = _round(g.Kg, 12)
    g.Fg_r = _round(g.Fg, 32)
    # Weight gradient with the filters in the vector lanes when they fill vectors; with few
    # filters per group (depthwise), lanes along the positions, reduced at the end.
    g.wgt = g.Fg >= 16
    # Slack after the last plane: whole vectors read past the last position (at most Wq + 64
    # elements), and the zeros that the weight gradient's padding taps read (Pf_r elements).
    g.x_slack = g.Pf_r + g.Wq + 128
    g.x_size = g.C * g.sh * g.sw * g.Hq * g.Wq + g.x_slack
    g.d_slack = g.Wd + 128
    g.d_size = g.F * g.Hd * g.Wd + g.d_slack
    g.act = 0
    return g


def _direct_tables(fr_geom g, w, bint pack=True):
    """Forward tap offsets [Kg], packed forward weights [G, ceil(Fg/6), Kg, 6] (None unless
    ``pack``), and the weight gradient's padded offsets [G, Kg_r]."""
    cdef idx_t plane = g.Hq * g.Wq, c, i, j, t = 0
    off = np.empty(g.Kg, dtype=np.intp)
    cdef idx_t[::1] o = off
    for c in range(g.Cg):  # taps in (c, i, j) order; every operand is non-negative
        for i in range(g.KH):
            for j in range(g.KW):
                o[t] = (((c * g.sh + (i * g.dh) % g.sh) * g.sw + (j * g.dw) % g.sw) * plane
                        + (i * g.dh // g.sh) * g.Wq + (j * g.dw // g.sw))
                t += 1
    nfb = (g.Fg + 5) // 6
    wp = None
    if pack:
        wp = np.empty((g.G, nfb, g.Kg, 6), dtype=w.dtype)
        _pack_rows(w.reshape(g.G, g.Fg, g.Kg), wp)
    planes = g.C * g.sh * g.sw * plane
    woff = np.empty((g.G, g.Kg_r), dtype=np.intp)
    for grp in range(g.G):
        woff[grp, :g.Kg] = off
        woff[grp, g.Kg:] = planes - grp * g.Cg * g.sh * g.sw * plane  # the zeros after the planes
    return off, wp, woff


def _pack_rows(const floating[:, :, ::1] src, floating[:, :, :, ::1] dst):
    """dst[g, b, t, r] = src[g, 6 b + r, t], zero past the last row: a group's rows (filters)
    in blocks of 6 with the 6 contiguous per tap, as the micro-kernel reads them."""
    cdef Py_ssize_t G = src.shape[0], R = src.shape[1], K = src.shape[2]
    cdef Py_ssize_t nb = dst.shape[1], g, blk, t, r, row
    with nogil:
        for g in range(G):
            for blk in range(nb):
                for t in range(K):
                    for r in range(6):
                        row = blk * 6 + r
                        dst[g, blk, t, r] = src[g, row, t] if row < R else 0


def _dgrad_tables(fr_geom g, w):
    """Per stride phase (a, b) of dx: tap offsets into the output-gradient planes and packed,
    transposed weights [G, ceil(Cg/6), K_ab, 6], concatenated; returns (off, wp, starts) with
    starts[ab] = (first tap, first weight, tap count)."""
    f, i, j = np.meshgrid(np.arange(g.Fg), np.arange(g.KH), np.arange(g.KW), indexing="ij")
    f, i, j = f.ravel(), i.ravel(), j.ravel()
    ncb = (g.Cg + 5) // 6
    # [G, Cg, (f, i, j)]: the transposed kernel's rows are input channels
    wt = w.reshape(g.G, g.Fg, g.Cg, g.KH * g.KW).transpose(0, 2, 1, 3).reshape(g.G, g.Cg, -1)
    offs, wps, starts = [], [], []
    t0 = w0 = 0
    for a in range(g.sh):
        for b in range(g.sw):
            sel = ((i * g.dh) % g.sh == a) & ((j * g.dw) % g.sw == b)
            fs, is_, js = f[sel], i[sel], j[sel]
            K = len(fs)
            off = (fs * g.Hd * g.Wd + (g.QH - is_ * g.dh // g.sh) * g.Wd
                   + (g.QW - js * g.dw // g.sw)).astype(np.intp)
            wp = np.empty((g.G, ncb, K, 6), dtype=w.dtype)
            _pack_rows(np.ascontiguousarray(wt[:, :, sel]), wp)
            offs.append(off)
            wps.append(wp.ravel())
            starts.append((t0, w0, K))
            t0 += K
            w0 += wp.size
    off = np.concatenate(offs + [np.zeros(1, np.intp)]).astype(np.intp)
    wp = np.concatenate(wps + [np.zeros(1, w.dtype)])
    return off, wp, np.array(starts, dtype=np.intp).reshape(-1, 3)


cdef inline void _pool_image(const floating* yn, idx_t F, idx_t plane, floating* pooled,
                             int* parg, const PoolGeom* pg) noexcept nogil:
    """Max pool one image's F output planes (in the thread's buffer) into its pooled planes and
    their maxima's positions."""
    cdef idx_t f, pplane = pg.OH * pg.OW
    for f in range(F):
        max_argmax_plane(yn + f * plane, pooled + f * pplane, parg + f * pplane, pg)


def _direct_forward_run(
    const floating[:, :, :, ::1] x,   # IN  [N, C, H, W]
    const floating[:, :, :, ::1] wp,  # IN  [G, nfb, Kg, 6] packed weights
    const floating[::1] b,            # IN  [F] (length 0: no bias)
    floating[:, :, :, ::1] y,         # OUT [N, F, OH, OW] (pooling: unused)
    floating[:, ::1] xq,              # scratch [B, x_size]: the planes of a batch of B images
    floating[:, ::1] tiles,           # scratch [threads, 6 * Pf_r]
    const idx_t[::1] off,             # IN  [Kg]
    tuple w_shape, tuple geometry, int nthreads, int isa, int act,
    pool=None,                        # (kernel_size, stride, padding): max pool each image
    floating[:, ::1] ybuf=None,       # scratch [threads, F * OH * OW] (pooling)
    floating[:, :, :, ::1] pooled=None,  # OUT [N, F, POH, POW] (pooling)
    int[:, :, :, ::1] parg=None,      # OUT [N, F, POH, POW] positions of the maxima (pooling)
):
    """C1-C4 (act 1: then ReLU, in the same store). With at least BATCH_PER_THREAD images per
    thread, each image is one work item: a thread packs its planes into its own row of xq and
    runs every block of filters on them (one parallel region, no barrier but the last: a thread
    descheduled on a busy machine holds up nobody). With fewer, B images at a time: their
    planes are packed in parallel, then the (image, group, block of 6 filters) items run in
    parallel.

    ``pool`` (the per-image schedule only): each image's output goes to the thread's ``ybuf``
    instead of y, and is max pooled from there while in cache, into ``pooled`` and ``parg``
    (the maxima's positions in their planes, as max_pool2d_forward saves them): y is never
    written, nor read back by a pooling pass."""
    cdef fr_geom g = _direct_geometry(_shape(x), w_shape, geometry)
    g.act = act
    cdef idx_t nfb = wp.shape[1], B = xq.shape[0], n0, nb, item, n, r, grp, fb
    cdef const floating* bp = &b[0] if b.shape[0] > 0 else NULL
    cdef int tid, nf
    cdef bint pooling = pool is not None
    cdef PoolGeom pg
    cdef floating* yn
    cdef idx_t plane = g.OH * g.OW
    if pooling:
        pg = pool_geometry(g.OH, g.OW, pool[0], pool[1], pool[2])
    if pooling or (g.N >= BATCH_PER_THREAD * nthreads and B >= nthreads):
        with nogil, parallel(num_threads=nthreads):
            tid = omp_get_thread_num()
            for n in prange(g.N, schedule="dynamic"):
                if floating is float:
                    fr_pack_input_f32(isa, &g, &x[n, 0, 0, 0], &xq[tid, 0])
                else:
                    fr_pack_input_f64(isa, &g, &x[n, 0, 0, 0], &xq[tid, 0])
                yn = &ybuf[tid, 0] if pooling else &y[n, 0, 0, 0]
                for r in range(g.G * nfb):
                    grp = r // nfb
                    fb = r - grp * nfb
                    nf = <int> min(6, g.Fg - fb * 6)
                    if floating is float:
                        fr_forward_block_f32(isa, &g, &xq[tid, 0], &off[0], &wp[grp, fb, 0, 0],
                                             bp, yn, grp, grp * g.Fg + fb * 6, nf,
                                             &tiles[tid, 0])
                    else:
                        fr_forward_block_f64(isa, &g, &xq[tid, 0], &off[0], &wp[grp, fb, 0, 0],
                                             bp, yn, grp, grp * g.Fg + fb * 6, nf,
                                             &tiles[tid, 0])
                if pooling:
                    _pool_image(yn, g.F, plane, &pooled[n, 0, 0, 0], &parg[n, 0, 0, 0], &pg)
        return
    for n0 in range(0, g.N, B):
        nb = min(B, g.N - n0)
        with nogil, parallel(num_threads=nthreads):
            for n in prange(nb, schedule="static"):
                if floating is float:
                    fr_pack_input_f32(isa, &g, &x[n0 + n, 0, 0, 0], &xq[n, 0])
                else:
                    fr_pack_input_f64(isa, &g, &x[n0 + n, 0, 0, 0], &xq[n, 0])
        with nogil, parallel(num_threads=nthreads):
            tid = omp_get_thread_num()
            for item in prange(nb * g.G * nfb, schedule="dynamic"):
                n = item // (g.G * nfb)
                r = item - n * g.G * nfb
                grp = r // nfb
                fb = r - grp * nfb
                nf = <int> min(6, g.Fg - fb * 6)
                if floating is float:
                    fr_forward_block_f32(isa, &g, &xq[n, 0], &off[0], &wp[grp, fb, 0, 0], bp,
                                         &y[n0 + n, 0, 0, 0], grp, grp * g.Fg + fb * 6, nf,
                                         &tiles[tid, 0])
                else:
                    fr_forward_block_f64(isa, &g, &xq[n, 0], &off[0], &wp[grp, fb, 0, 0], bp,
                                         &y[n0 + n, 0, 0, 0], grp, grp * g.Fg + fb * 6, nf,
                                         &tiles[tid, 0])


def _direct_dgrad_run(
    const floating[:, :, :, ::1] dy,  # IN  [N, F, OH, OW]
    const floating[::1] wp,           # IN  every phase's packed weights (_dgrad_tables)
    floating[:, :, :, ::1] dx,        # OUT [N, C, H, W]
    floating[:, ::1] dyq,             # scratch [B, d_size]: the planes of a batch of B images
    floating[:, ::1] tiles,           # scratch [threads, 6 * Pd_r], 12 * Pd_r when paired
    const idx_t[::1] off,             # IN  every phase's tap offsets
    const idx_t[:, ::1] starts,       # IN  [phases, 3] first tap, first weight, tap count
    tuple x_shape, tuple w_shape, tuple geometry, int nthreads, int isa,
):
    """CB3-CB5: dx by one correlation per stride phase; work split as in _direct_forward_run
    (whole images per item, or B images at a time with items: phase, image, group, block of 6
    input channels). At column stride 2 (DGRAD_PAIRS) an item runs both column phases
    of its row phase and writes whole dx rows (fr_dgrad_pair)."""
    cdef fr_geom g = _direct_geometry(x_shape, w_shape, geometry)
    cdef idx_t ncb = (g.Cg + 5) // 6, B = dyq.shape[0], n0, nb, per
    cdef idx_t item, n, r, phases
    cdef int tid
    cdef bint paired = DGRAD_PAIRS and g.sw == 2
    phases = g.sh if paired else g.sh * g.sw
    if g.N >= BATCH_PER_THREAD * nthreads and B >= nthreads:
        with nogil, parallel(num_threads=nthreads):
            tid = omp_get_thread_num()
            for n in prange(g.N, schedule="dynamic"):
                if floating is float:
                    fr_pack_dy_planes_f32(&g, &dy[n, 0, 0, 0], &dyq[tid, 0])
                else:
                    fr_pack_dy_planes_f64(&g, &dy[n, 0, 0, 0], &dyq[tid, 0])
                for item in range(phases * g.G * ncb):
                    _dgrad_item(isa, &g, paired, item, ncb, &dyq[tid, 0], &wp[0], &off[0],
                                &starts[0, 0], &dx[n, 0, 0, 0], &tiles[tid, 0])
        return
    for n0 in range(0, g.N, B):
        nb = min(B, g.N - n0)
        per = nb * g.G * ncb
        with nogil, parallel(num_threads=nthreads):
            for n in prange(nb, schedule="static"):
                if floating is float:
                    fr_pack_dy_planes_f32(&g, &dy[n0 + n, 0, 0, 0], &dyq[n, 0])
                else:
                    fr_pack_dy_planes_f64(&g, &dy[n0 + n, 0, 0, 0], &dyq[n, 0])
        with nogil, parallel(num_threads=nthreads):
            tid = omp_get_thread_num()
            for item in prange(phases * per, schedule="dynamic"):
                # item = (phase, image, group, block): the image's own item number inside
                r = item // per
                n = (item - r * per) // (g.G * ncb)
                _dgrad_item(isa, &g, paired, r * g.G * ncb + (item - r * per) % (g.G * ncb),
                            ncb, &dyq[n, 0], &wp[0], &off[0], &starts[0, 0],
                            &dx[n0 + n, 0, 0, 0], &tiles[tid, 0])


# The input gradient at column stride 2 runs both column phases per item and writes whole dx
# rows (fr_dgrad_pair) instead of each phase's every other column by a scalar loop (8% of the
# (32,64,56x56)->128 stride-2 backward's samples); False: one item per phase (tests).
DGRAD_PAIRS = True


cdef inline void _dgrad_item(int isa, const fr_geom* g, bint paired, idx_t item, idx_t ncb,
                             const floating* dyq, const floating* wp, const idx_t* off,
                             const idx_t* starts, floating* dx, floating* tile) noexcept nogil:
    """Item ``item`` = (phase, group, block of 6 input channels) of one image's dx; the phase
    is (a, b), or with ``paired`` the row phase a (both column phases: ab = 2 a and 2 a + 1).
    starts: [phases][3] (_dgrad_tables)."""
    cdef idx_t ab = item // (g.G * ncb)
    cdef idx_t r = item - ab * g.G * ncb
    cdef idx_t grp = r // ncb
    cdef idx_t cb = r - grp * ncb
    cdef idx_t blk = grp * ncb + cb
    cdef int nc = <int> min(6, g.Cg - cb * 6)
    cdef const idx_t* s0
    cdef const idx_t* s1
    if paired:
        s0 = starts + 3 * (2 * ab)
        s1 = s0 + 3
        if floating is float:
            fr_dgrad_pair_f32(isa, g, dyq, off + s0[0], s0[2], wp + s0[1] + blk * s0[2] * 6,
                              off + s1[0], s1[2], wp + s1[1] + blk * s1[2] * 6, dx, grp,
                              grp * g.Cg + cb * 6, nc, ab, tile)
        else:
            fr_dgrad_pair_f64(isa, g, dyq, off + s0[0], s0[2], wp + s0[1] + blk * s0[2] * 6,
                              off + s1[0], s1[2], wp + s1[1] + blk * s1[2] * 6, dx, grp,
                              grp * g.Cg + cb * 6, nc, ab, tile)
        return
    s0 = starts + 3 * ab
    if floating is float:
        fr_dgrad_block_f32(isa, g, dyq, off + s0[0], s0[2], wp + s0[1] + blk * s0[2] * 6, dx,
                           grp, grp * g.Cg + cb * 6, nc, ab // g.sw, ab % g.sw, tile)
    else:
        fr_dgrad_block_f64(isa, g, dyq, off + s0[0], s0[2], wp + s0[1] + blk * s0[2] * 6, dx,
                           grp, grp * g.Cg + cb * 6, nc, ab // g.sw, ab % g.sw, tile)


cdef inline void _sum_and_pack(int isa, const fr_geom* gx, const fr_geom* g,
                               const floating* xn, const floating* dyn, double* xsum,
                               double* bsum, floating* xq, floating* dyf) noexcept nogil:
    """One image's sums (x: the finiteness probe; dy per filter into bsum unless NULL: CB1),
    taken just before its x is packed as gx's planes and its dy for the weight gradient, while
    they come into the cache anyway."""
    cdef idx_t f, L = g.OH * g.OW
    if floating is float:
        xsum[0] = fr_sum8_f32(isa, xn, g.C * g.H * g.W)
        if bsum != NULL:
            for f in range(g.F):
                bsum[f] = fr_sum8_f32(isa, dyn + f * L, L)
        fr_pack_input_f32(isa, gx, xn, xq)
        fr_pack_dy_forward_pitch_f32(g, dyn, dyf)
    else:
        xsum[0] = fr_sum8_f64(isa, xn, g.C * g.H * g.W)
        if bsum != NULL:
            for f in range(g.F):
                bsum[f] = fr_sum8_f64(isa, dyn + f * L, L)
        fr_pack_input_f64(isa, gx, xn, xq)
        fr_pack_dy_forward_pitch_f64(g, dyn, dyf)


def _direct_wgrad_run(
    const floating[:, :, :, ::1] x,   # IN  [N, C, H, W]
    const floating[:, :, :, ::1] dy,  # IN  [N, F, OH, OW]
    floating[:, ::1] parts,           # OUT [chunks, F * Kg_r] partial sums, zeroed by the caller
    floating[:, ::1] bufs,            # scratch [threads, x_size + fr_dy_size]
    const idx_t[:, ::1] woff,         # IN  [G, Kg_r]
    double[::1] xsums,                # OUT [N] the sum of each image's x
    double[:, ::1] bsums,             # OUT [N, F] the sum of each image's dy[f], or (0, 0)
    tuple w_shape, tuple geometry, int nthreads, int isa,
):
    """CB2: chunk c sums the weight gradients of its images, in order, into parts[c]. Each
    image's x (a finiteness probe) and dy per filter (CB1) are summed just before they are
    packed, while they come into the cache anyway: no pass of their own over x and dy."""
    cdef fr_geom g = _direct_geometry(_shape(x), w_shape, geometry)
    cdef idx_t P = parts.shape[0], c, n
    cdef bint bias = bsums.shape[0] > 0
    cdef int tid
    with nogil, parallel(num_threads=nthreads):
        tid = omp_get_thread_num()
        for c in prange(P, schedule="dynamic"):
            for n in range(c * g.N // P, (c + 1) * g.N // P):
                _sum_and_pack(isa, &g, &g, &x[n, 0, 0, 0], &dy[n, 0, 0, 0], &xsums[n],
                              &bsums[n, 0] if bias else NULL, &bufs[tid, 0],
                              &bufs[tid, g.x_size])
                if floating is float:
                    fr_wgrad_image_f32(isa, &g, &bufs[tid, 0], &bufs[tid, g.x_size],
                                       &woff[0, 0], &parts[c, 0])
                else:
                    fr_wgrad_image_f64(isa, &g, &bufs[tid, 0], &bufs[tid, g.x_size],
                                       &woff[0, 0], &parts[c, 0])


def _reduce_parts(
    const floating[:, ::1] parts,     # IN  [chunks, G*Kg_r*Fg_r] or [chunks, F*Kg_r]
    floating[:, :, ::1] dw,           # OUT [G, Fg, Kg]
    Py_ssize_t Kg_r,                  # IN  taps per group, padded
    Py_ssize_t Fg_r,                  # IN  filters per group, padded; 0: the [F, Kg_r] layout
    int nthreads,
):
    """dw[g, f, t] = sum over chunks c, in order, of the partial's (g, f, t) entry."""
    cdef Py_ssize_t P = parts.shape[0], G = dw.shape[0], Fg = dw.shape[1], Kg = dw.shape[2]
    cdef Py_ssize_t row, grp, f, t, c, e, nb, t0, t1
    cdef floating acc
    with nogil:
        if Fg_r > 0:  # [G, Kg_r, Fg_r]: blocks of 16 taps, so that dw is written by lines
            nb = (Kg + 15) // 16
            for row in prange(G * nb, num_threads=nthreads, schedule="static"):
                grp = row // nb
                t0 = (row - grp * nb) * 16
                t1 = min(t0 + 16, Kg)
                for f in range(Fg):
                    for t in range(t0, t1):
                        e = (grp * Kg_r + t) * Fg_r + f
                        acc = parts[0, e]
                        for c in range(1, P):
                            acc = acc + parts[c, e]
                        dw[grp, f, t] = acc
        else:  # [F, Kg_r]: one filter per iteration, read along t
            for row in prange(G * Fg, num_threads=nthreads, schedule="static"):
                grp = row // Fg
                f = row - grp * Fg
                for t in range(Kg):
                    e = row * Kg_r + t
                    acc = parts[0, e]
                    for c in range(1, P):
                        acc = acc + parts[c, e]
                    dw[grp, f, t] = acc


def _threads(Py_ssize_t macs) -> int:
    return get_num_threads() if macs >= MIN_PARALLEL_MACS else 1


# Images per batch of the direct forward and input gradient, per thread: enough items for
# the dynamic schedule to balance, few enough that a batch's planes stay in cache.
BATCH_PER_THREAD = 2
_scratch_local = threading.local()


def _scratch(dtype, *sizes, str key="buf"):
    """Scratch arrays of these many elements, carved from one buffer per Python thread (and
    ``key``: buffers in use at the same time need different keys) that is kept between calls:
    fresh pages for tens of MB of scratch per call cost more than the kernels on small layers
    (the kernel zeroes every new page)."""
    itemsize = np.dtype(dtype).itemsize
    need = sum(_round(n, 16) for n in sizes) * itemsize + 64
    buf = getattr(_scratch_local, key, None)
    if buf is None or buf.size < need:
        buf = np.empty(need, dtype=np.uint8)
        setattr(_scratch_local, key, buf)
    start = (-buf.ctypes.data) % 64  # 64-byte aligned
    out = []
    for n in sizes:
        out.append(buf[start:start + n * itemsize].view(dtype))
        start += _round(n, 16) * itemsize
    return out


def _context(x, w, b, y, geometry, str algorithm):
    """What backward needs of a direct or Winograd forward (both run the direct backward)."""
    return Context(
        op="conv2d",
        backend="cpu",
        dtype=x.dtype,
        cupy=False,
        grad_shapes={"dy": y.shape},
        saved=dict(x=x, w=w, has_bias=b is not None, geometry=geometry, algorithm=algorithm),
    )


def _depthwise(fr_geom g) -> bool:
    """The depthwise forward's case: one channel per filter and per group, stride 1, dilation
    1 (DEPTHWISE_PLANES)."""
    return (DEPTHWISE_PLANES and g.Cg == 1 and g.Fg == 1 and g.sh == 1 and g.sw == 1
            and g.dh == 1 and g.dw == 1)


# A depthwise layer's forward plane by plane (fr_depthwise_planes: the padded plane in L1, one
# pass writing y) instead of the direct kernels' blocks of 6 filters over packed planes and a
# tile copied out: (32,64,56x56) 3x3, 1 thread: see NOTES-conv.md. False: the direct kernels.
DEPTHWISE_PLANES = True


def _depthwise_forward_run(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] w,
                           const floating[::1] b, floating[:, :, :, ::1] y,
                           floating[:, ::1] pads, tuple geometry, int nthreads, int isa,
                           int act):
    """Depthwise C1-C4 (+ ReLU): the N C planes in nthreads contiguous shares, each thread
    with its own padded plane (``pads`` row)."""
    cdef fr_geom g = _direct_geometry(_shape(x), _shape(w), geometry)
    g.act = act
    cdef const floating* bp = &b[0] if b.shape[0] > 0 else NULL
    cdef idx_t Q = g.N * g.C, Wp = g.W + 2 * g.pw, t, q0, q1
    with nogil:
        for t in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
            q0 = Q * t // nthreads
            q1 = Q * (t + 1) // nthreads
            if floating is float:
                fr_depthwise_planes_f32(isa, &g, &x[0, 0, 0, 0], &w[0, 0, 0, 0], bp,
                                        &y[0, 0, 0, 0], q0, q1, &pads[t, 0], Wp)
            else:
                fr_depthwise_planes_f64(isa, &g, &x[0, 0, 0, 0], &w[0, 0, 0, 0], bp,
                                        &y[0, 0, 0, 0], q0, q1, &pads[t, 0], Wp)


def _depthwise_wgrad_run(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] dy,
                         floating[:, :, :, ::1] dw, floating[::1] db, floating[:, ::1] bufs,
                         tuple w_shape, tuple geometry, int nthreads, int isa):
    """Depthwise CB1-CB2 (fr_depthwise_wgrad): the channels in nthreads contiguous shares, each
    thread with its own padded plane, dy plane and accumulators (``bufs`` row)."""
    cdef fr_geom g = _direct_geometry(_shape(x), w_shape, geometry)
    cdef idx_t OWp = _round(g.OW, 16), Wp = OWp + g.KW - 1
    cdef idx_t npad = (g.H + 2 * g.ph) * Wp + 64, ndy = g.OH * OWp, t, c0, c1
    cdef floating* dbp = &db[0] if db.shape[0] > 0 else NULL
    with nogil:
        for t in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
            c0 = g.C * t // nthreads
            c1 = g.C * (t + 1) // nthreads
            if floating is float:
                fr_depthwise_wgrad_f32(isa, &g, &x[0, 0, 0, 0], &dy[0, 0, 0, 0],
                                       &dw[0, 0, 0, 0], dbp, c0, c1, &bufs[t, 0], Wp,
                                       &bufs[t, npad], OWp, &bufs[t, npad + ndy])
            else:
                fr_depthwise_wgrad_f64(isa, &g, &x[0, 0, 0, 0], &dy[0, 0, 0, 0],
                                       &dw[0, 0, 0, 0], dbp, c0, c1, &bufs[t, 0], Wp,
                                       &bufs[t, npad], OWp, &bufs[t, npad + ndy])


def _depthwise_wgrad(x, dy, w, geometry, bint has_bias, int nt, int isa):
    """dw, db (empty without bias) of a depthwise layer at stride 1 and dilation 1."""
    cdef fr_geom g = _direct_geometry(tuple(x.shape), tuple(w.shape), geometry)
    cdef idx_t OWp = _round(g.OW, 16), Wp = OWp + g.KW - 1
    size = (g.H + 2 * g.ph) * Wp + 64 + g.OH * OWp + (g.KH * g.KW + 1) * 16
    nt = max(1, min(nt, g.C))
    (bufs,) = _scratch(x.dtype, nt * size, key="depthwise")
    dw = np.empty_like(w)
    db = np.empty(g.F if has_bias else 0, dtype=x.dtype)
    _depthwise_wgrad_run(x, np.ascontiguousarray(dy), dw, db, bufs.reshape(nt, size),
                         tuple(w.shape), geometry, nt, isa)
    return dw, db


def _direct_forward(x, w, b, stride, padding, dilation, groups, training, int act=0):
    geometry = (stride, padding, dilation, groups)
    cdef fr_geom g = _direct_geometry(tuple(x.shape), tuple(w.shape), geometry)
    nt = _threads(g.N * g.F * g.OH * g.OW * g.Kg)
    y = output((g.N, g.F, g.OH, g.OW), x.dtype)
    if g.N > 0 and g.OH > 0 and g.OW > 0 and _depthwise(g):
        (pads,) = _scratch(x.dtype, nt * ((g.H + 2 * g.ph) * (g.W + 2 * g.pw) + g.KW + 64))
        bias = np.empty(0, dtype=x.dtype) if b is None else b
        _depthwise_forward_run(x, w, bias, y, pads.reshape(nt, -1), geometry, nt, _isa(), act)
        return y, (_context(x, w, b, y, geometry, "direct") if training else None)
    off, wp, _ = _direct_tables(g, w)
    if g.N > 0:
        B = min(g.N, BATCH_PER_THREAD * nt)
        xq, tiles = _scratch(x.dtype, B * g.x_size, nt * 6 * g.Pf_r)
        xq, tiles = xq.reshape(B, g.x_size), tiles.reshape(nt, 6 * g.Pf_r)
        bias = np.empty(0, dtype=x.dtype) if b is None else b
        _direct_forward_run(x, wp, bias, y, xq, tiles, off, w.shape, geometry, nt, _isa(), act)
    return y, (_context(x, w, b, y, geometry, "direct") if training else None)


def _direct_forward_pooled(x, w, b, stride, padding, dilation, groups, training, int act, pool):
    """max_pool2d(conv2d(x) [ReLU]) by the direct kernels, each image pooled by the thread that
    convolved it (pool: kernel_size, stride, padding pairs) -> pooled, ctx; None when the
    layer has too few images per thread for that schedule."""
    geometry = (stride, padding, dilation, groups)
    cdef fr_geom g = _direct_geometry(tuple(x.shape), tuple(w.shape), geometry)
    nt = _threads(g.N * g.F * g.OH * g.OW * g.Kg)
    if g.N < BATCH_PER_THREAD * nt or g.OH * g.OW > INT32_MAX:
        return None
    off, wp, _ = _direct_tables(g, w)
    pooled, arg = _pool_outputs(g, pool, x.dtype)
    xq, tiles, ybuf = _scratch(x.dtype, nt * g.x_size, nt * 6 * g.Pf_r, nt * g.F * g.OH * g.OW)
    bias = np.empty(0, dtype=x.dtype) if b is None else b
    _direct_forward_run(x, wp, bias, pooled[:0], xq.reshape(nt, g.x_size),
                        tiles.reshape(nt, 6 * g.Pf_r), off, w.shape, geometry, nt, _isa(), act,
                        pool, ybuf.reshape(nt, g.F * g.OH * g.OW), pooled, arg)  # fmt: skip
    if not training:
        return pooled, None
    ctx = _context(x, w, b, pooled, geometry, "direct")
    _save_pool(ctx, (g.N, g.F, g.OH, g.OW), arg, pooled, act)
    return pooled, ctx


# Max pooling saves 32-bit positions in a plane: a convolution whose output planes are larger
# pools after it, where max_pool2d_forward refuses them with its own message
INT32_MAX = 2**31 - 1


def _pool_outputs(fr_geom g, pool, dtype):
    """The pooled output of g's output planes, and its maxima's positions (empty)."""
    cdef PoolGeom pg = pool_geometry(g.OH, g.OW, pool[0], pool[1], pool[2])
    pooled = output((g.N, g.F, pg.OH, pg.OW), dtype)
    return pooled, output(pooled.shape, np.int32)


def _save_pool(ctx, tuple shape, arg, pooled, int act):
    """What the backward needs of the pooling after a convolution: the maxima's positions, the
    pooled output (its sign is the ReLU's mask) and the convolution's output shape."""
    ctx.saved["pool"] = dict(arg=arg, y=pooled if act else None, shape=shape)
    ctx.grad_shapes = {"dy": pooled.shape}


def _direct_backward(ctx, dy, bint input_grad=True):
    """The direct kernels' gradients; after a Winograd forward, dx and dw by Winograd too (dw:
    with at least 16 filters, the filters-in-lanes kernel's case). Without ``input_grad`` dx
    is not computed (None)."""
    s = ctx.saved
    x, w, geometry = s["x"], s["w"], s["geometry"]
    cdef fr_geom g = _direct_geometry(tuple(x.shape), tuple(w.shape), geometry)
    nt = _threads(g.N * g.F * g.OH * g.OW * g.Kg)
    isa = _isa()
    dx = np.empty_like(x) if input_grad and g.N == 0 else None
    db = np.empty(g.F if s["has_bias"] else 0, dtype=x.dtype)
    winograd_dw = g.N > 0 and s["algorithm"] == "winograd" and WINOGRAD_WGRAD and g.wgt
    ph, pw = geometry[1]
    dh, dw_ = geometry[2]
    KH, KW = w.shape[2], w.shape[3]
    if not input_grad or g.N == 0:
        pass
    elif tuple(geometry[0]) == (1, 1) and ph <= dh * (KH - 1) and pw <= dw_ * (KW - 1):
        # At stride 1, dx is the convolution of dy with each group's filters turned 180 degrees
        # and their channels and filters swapped, padded by d (K - 1) - p: by Winograd after a
        # Winograd forward (3x3, d = 1, so p <= 2), else by the forward kernels. Faster than the
        # gradient kernels on every layer measured: 1.00-1.20x (groups = 1), 1.4-2.6x depthwise
        # (which they run one channel per item); benchmarks/NOTES-conv.md.
        wt = w.reshape(g.G, g.Fg, g.Cg, KH, KW).transpose(0, 2, 1, 3, 4)
        wt = np.ascontiguousarray(wt.reshape(g.C, g.Fg, KH, KW)[:, :, ::-1, ::-1])
        pad = (dh * (KH - 1) - ph, dw_ * (KW - 1) - pw)
        if s["algorithm"] == "winograd":
            dx = _winograd_forward(dy, wt, None, (1, 1), pad, (1, 1), 1, False)[0]
        else:
            dx = _direct_forward(dy, wt, None, (1, 1), pad, (dh, dw_), g.G, False)[0]
    else:
        dx = output(x.shape, x.dtype)
        off, wp, starts = _dgrad_tables(g, w)
        B = min(g.N, BATCH_PER_THREAD * nt)
        tile = (12 if DGRAD_PAIRS and g.sw == 2 else 6) * g.Pd_r
        dyq, tiles = _scratch(x.dtype, B * g.d_size, nt * tile)
        dyq, tiles = dyq.reshape(B, g.d_size), tiles.reshape(nt, tile)
        _direct_dgrad_run(dy, wp, dx, dyq, tiles, off, starts, x.shape, w.shape, geometry, nt,
                          isa)
    if winograd_dw:
        dw, dbw, xsums = _winograd_wgrad(x, dy, w, geometry, s["has_bias"], nt)
        if s["has_bias"]:
            db[:] = dbw
    elif g.N > 0 and g.OH > 0 and g.OW > 0 and _depthwise(g):
        dw, db = _depthwise_wgrad(x, dy, w, geometry, s["has_bias"], nt, isa)
        # a NaN or infinity of x reaches dw only by making it non-finite (the check below)
        xsums = np.array([dw.sum(dtype=np.float64)])
    else:
        xsums = np.zeros(g.N)
        psize = g.G * g.Kg_r * g.Fg_r if g.wgt else g.F * g.Kg_r
        parts = np.zeros((_chunks(g.N, psize * x.itemsize), psize), dtype=x.dtype)
        if g.N > 0:
            _, _, woff = _direct_tables(g, w, False)
            (bufs,) = _scratch(x.dtype, nt * (g.x_size + fr_dy_size(&g)))
            bufs = bufs.reshape(nt, g.x_size + fr_dy_size(&g))
            bsums = np.empty((g.N if s["has_bias"] else 0, g.F if s["has_bias"] else 0))
            _direct_wgrad_run(x, dy, parts, bufs, woff, xsums, bsums, w.shape, geometry, nt,
                              isa)
            if s["has_bias"]:  # CB1, the images' sums added in image order
                db[:] = np.add.reduce(bsums, axis=0)
        elif s["has_bias"]:
            db[:] = 0
        # CB2 across chunks, in chunk order, and back to w's layout
        dw = np.empty_like(w)
        _reduce_parts(parts, dw.reshape(g.G, g.Fg, g.Kg), g.Kg_r, g.Fg_r if g.wgt else 0, nt)
    # The gradient kernels multiply by the output gradient spread over the input grid, zero
    # where no output is: 0 * NaN would put a NaN (or an infinity) that no output ever saw
    # into dw (from x) or dx (from w). With such values those gradients come from im2col,
    # which multiplies exactly the (output, tap) pairs the convolution has.
    bad_x = g.N > 0 and not np.isfinite(xsums.sum()) and not np.isfinite(x).all()
    bad_w = g.N > 0 and input_grad and not np.isfinite(w).all()
    if bad_x or bad_w:
        dx_i, dw_i, _ = _im2col()._im2col_backward(ctx, dy, input_grad)
        dx = dx_i if bad_w else dx
        dw = dw_i if bad_x else dw
    return dx, dw, (db if s["has_bias"] else None)


# ------------------------------------------------------------------------------------------------
# Winograd F(2x2, 3x3): 3x3, stride 1, dilation 1, one group (conv_winograd.h)
# ------------------------------------------------------------------------------------------------

# Transformed input kept per band of tile rows, about this many bytes (stays in L2)
WINOGRAD_BAND_BYTES = 1 << 20
# The backward of a Winograd forward computes dw by Winograd too (False: the direct kernels;
# for tests and benchmarks)
WINOGRAD_WGRAD = True


def _winograd_vstride(idx_t C, idx_t ldv, itemsize):
    """Elements between the transformed input's 16 matrices V[xi] (each C rows of ldv): C * ldv
    and 256 bytes more, so that the input transform's 16 store streams (and the products' reads
    of V[xi] across xi) fall in different L1 sets. C * ldv alone is a multiple of 4 KiB whenever
    C is a multiple of 64 (ldv is one of 16), putting all 16 in one set."""
    return C * ldv + 256 // itemsize


def _winograd_weights(const floating[:, :, :, ::1] w, floating[::1] u, int nthreads):
    """U = G w G^T for every (filter, channel), packed for the products as [16, nfb, C, 6]
    (fr_winograd_weights), the blocks of 6 filters shared out between the threads."""
    cdef idx_t F = w.shape[0], C = w.shape[1], nfb = (F + 5) // 6, fb
    with nogil, parallel(num_threads=nthreads):
        for fb in prange(nfb, schedule="static"):
            if floating is float:
                fr_winograd_weights_f32(&w[0, 0, 0, 0], F, C, fb, fb + 1, &u[0])
            else:
                fr_winograd_weights_f64(&w[0, 0, 0, 0], F, C, fb, fb + 1, &u[0])


def winograd_unsupported(tuple w_shape, stride, dilation, groups):
    """Why Winograd F(2x2, 3x3) cannot run this convolution, or None when it can."""
    if tuple(w_shape[2:]) != (3, 3):
        return f"the kernel is {w_shape[2]}x{w_shape[3]}, Winograd F(2x2,3x3) needs 3x3"
    if tuple(stride) != (1, 1):
        return f"stride is {tuple(stride)}, Winograd needs stride 1"
    if tuple(dilation) != (1, 1):
        return f"dilation is {tuple(dilation)}, Winograd needs dilation 1"
    if groups != 1:
        return f"groups is {groups}, Winograd runs ungrouped convolutions only"
    return None


def _winograd_run(
    const floating[:, :, :, ::1] x,   # IN  [N, C, H, W]
    const floating[::1] u,            # IN  [16, nfb, C, 6] packed transformed weights
    const floating[::1] b,            # IN  [F] (length 0: no bias)
    floating[:, :, :, ::1] y,         # OUT [N, F, OH, OW] (pooling: unused)
    floating[:, ::1] bufs,            # scratch, one row per thread: planes, V, M
    const idx_t[::1] off,             # IN  [C] c * ldv
    tuple w_shape, tuple geometry, idx_t band, idx_t ipi, idx_t ldv, idx_t vs, int nthreads,
    int isa, int act,
    pool=None,                        # (kernel_size, stride, padding): max pool each image
    floating[:, ::1] ybuf=None,       # scratch [threads, ring * F * OH * OW] (pooling)
    floating[:, :, :, ::1] pooled=None,  # OUT [N, F, POH, POW] (pooling)
    int[:, :, :, ::1] parg=None,      # OUT [N, F, POH, POW] positions of the maxima (pooling)
):
    """Work items of ``ipi`` whole images, their tile rows in bands of ``band`` rows that run on
    from one image into the next (fr_winograd_band); gw: the input's stride-2 phase planes (the
    tiles' reads); act 1: ReLU in the output transform's store. ``pool``: the images' outputs
    go to a ring of image buffers in the thread's ``ybuf``, each max pooled from there right
    after the band that completes it, as in _direct_forward_run."""
    cdef fr_geom g = _direct_geometry(_shape(x), w_shape, geometry)
    g.act = act
    cdef fr_geom gw = _direct_geometry(_shape(x), w_shape, ((2, 2), geometry[1], (1, 1), 1))
    cdef const floating* bp = &b[0] if b.shape[0] > 0 else NULL
    cdef idx_t vo = gw.x_size, mo = gw.x_size + 16 * vs
    cdef idx_t TH = (g.OH + 1) // 2, ysz = g.F * g.OH * g.OW, items = (g.N + ipi - 1) // ipi
    cdef idx_t it, r, r1, end, done, packed, ring = 0
    cdef int tid
    cdef bint pooling = pool is not None
    cdef PoolGeom pg
    cdef floating* yb
    if pooling:
        pg = pool_geometry(g.OH, g.OW, pool[0], pool[1], pool[2])
        ring = ybuf.shape[1] // ysz
    with nogil, parallel(num_threads=nthreads):
        tid = omp_get_thread_num()
        for it in prange(items, schedule="dynamic"):
            packed = -1
            r = it * ipi * TH
            end = min(g.N, (it + 1) * ipi) * TH
            done = it * ipi  # the next image to pool
            while r < end:
                r1 = min(r + band, end)
                yb = &ybuf[tid, 0] if pooling else &y[0, 0, 0, 0]
                if floating is float:
                    packed = fr_winograd_band_f32(isa, &g, &gw, &x[0, 0, 0, 0], r, r1, packed,
                                                  &u[0], &off[0], bp, yb, ring, &bufs[tid, 0],
                                                  &bufs[tid, vo], &bufs[tid, mo], ldv, vs)
                else:
                    packed = fr_winograd_band_f64(isa, &g, &gw, &x[0, 0, 0, 0], r, r1, packed,
                                                  &u[0], &off[0], bp, yb, ring, &bufs[tid, 0],
                                                  &bufs[tid, vo], &bufs[tid, mo], ldv, vs)
                if pooling:
                    while (done + 1) * TH <= r1:
                        _pool_image(yb + (done % ring) * ysz, g.F, g.OH * g.OW,
                                    &pooled[done, 0, 0, 0], &parg[done, 0, 0, 0], &pg)
                        done = done + 1
                r = r1


def _winograd_plan(idx_t N, idx_t C, idx_t TH, idx_t TW, itemsize, int nthreads):
    """(band, images per work item) of the Winograd schedule. A band's transformed input stays
    within about WINOGRAD_BAND_BYTES; of the band heights from half that size up, the one whose
    tiles fill the products' 16-position vectors best (49 tiles of a 14x14 output alone fill 4
    vectors, 63 tiles of 9 such rows fill 4 all but one position). Items of several small
    images, so that bands run on from one image into the next, two items per thread or more."""
    cdef idx_t most = max(1, WINOGRAD_BAND_BYTES // (16 * C * TW * itemsize))
    cdef idx_t band = most, b, n
    best = None
    for b in range(max(1, most // 2), most + 1):
        n = b * TW
        fill = n / (((n + 15) // 16) * 16)
        if best is None or fill >= best - 1e-9:
            best, band = fill, b
    ipi = max(1, min(-(-N // (2 * nthreads)), -(-4 * band // TH)))
    return band, ipi


# Tiles per band of the Winograd weight gradient (images are added to a band up to this many
# tiles, within WINOGRAD_WGRAD_BYTES of packed input and output gradient)
WINOGRAD_WGRAD_TILES = 400
WINOGRAD_WGRAD_BYTES = 4 << 20


def _winograd_wgrad_run(
    const floating[:, :, :, ::1] x,   # IN  [N, C, H, W]
    const floating[:, :, :, ::1] dy,  # IN  [N, F, OH, OW]
    floating[:, ::1] parts,           # OUT [chunks, 16 * Cr * Fg_r] (each chunk zeroes its own)
    floating[:, ::1] bufs,            # scratch [threads, k * (x_size + dsz) + V + dM]
    const idx_t[::1] off,             # IN  [Cr]
    double[::1] xsums,                # OUT [N] the sum of each image's x
    double[:, ::1] bsums,             # OUT [N, F] the sum of each image's dy[f], or (0, 0)
    tuple w_shape, tuple geometry, idx_t k, idx_t ldv, int nthreads, int isa,
):
    """CB2 by Winograd: chunk c adds the dU of its images, k at a time, into parts[c]
    (fr_winograd_wgrad_band); the sums as in _direct_wgrad_run."""
    cdef fr_geom g = _direct_geometry(_shape(x), w_shape, geometry)
    cdef fr_geom gw = _direct_geometry(_shape(x), w_shape, ((2, 2), geometry[1], (1, 1), 1))
    cdef idx_t P = parts.shape[0], c, n, n0, n1, i, nb
    cdef idx_t dsz = fr_dy_size(&g), Cr = off.shape[0]
    cdef idx_t xo = 0, do = k * gw.x_size, vo = do + k * dsz, mo = vo + (g.C + 1) * ldv
    cdef bint bias = bsums.shape[0] > 0
    cdef int tid
    with nogil, parallel(num_threads=nthreads):
        tid = omp_get_thread_num()
        for c in prange(P, schedule="dynamic"):
            n1 = (c + 1) * g.N // P
            n0 = c * g.N // P
            memset(&parts[c, 0], 0, parts.shape[1] * sizeof(floating))
            while n0 < n1:
                nb = min(k, n1 - n0)
                for i in range(nb):
                    n = n0 + i
                    _sum_and_pack(isa, &gw, &g, &x[n, 0, 0, 0], &dy[n, 0, 0, 0], &xsums[n],
                                  &bsums[n, 0] if bias else NULL, &bufs[tid, xo + i * gw.x_size],
                                  &bufs[tid, do + i * dsz])
                if floating is float:
                    fr_winograd_wgrad_band_f32(isa, &g, &gw, &bufs[tid, xo], &bufs[tid, do], dsz,
                                               nb, &off[0], Cr, &parts[c, 0], &bufs[tid, vo],
                                               ldv, &bufs[tid, mo])
                else:
                    fr_winograd_wgrad_band_f64(isa, &g, &gw, &bufs[tid, xo], &bufs[tid, do], dsz,
                                               nb, &off[0], Cr, &parts[c, 0], &bufs[tid, vo],
                                               ldv, &bufs[tid, mo])
                n0 = n0 + nb


def _winograd_wgrad_finish(const floating[:, ::1] parts, floating[:, :, :, ::1] dw, idx_t Cr,
                           idx_t Fr, int nthreads):
    """dw = G^T dU G, dU the chunks' partials summed in chunk order, channels shared out."""
    cdef idx_t F = dw.shape[0], C = dw.shape[1], c
    with nogil, parallel(num_threads=nthreads):
        for c in prange(C, schedule="static"):
            if floating is float:
                fr_winograd_wgrad_finish_f32(&parts[0, 0], parts.shape[0], parts.shape[1], F, C,
                                             Cr, Fr, c, c + 1, &dw[0, 0, 0, 0])
            else:
                fr_winograd_wgrad_finish_f64(&parts[0, 0], parts.shape[0], parts.shape[1], F, C,
                                             Cr, Fr, c, c + 1, &dw[0, 0, 0, 0])


def _winograd_wgrad(x, dy, w, geometry, bint has_bias, int nt):
    """dw (and the sums: db, the finiteness probe xsums) by Winograd, for the backward of a
    Winograd forward."""
    cdef fr_geom g = _direct_geometry(tuple(x.shape), tuple(w.shape), geometry)
    cdef fr_geom gw = _direct_geometry(tuple(x.shape), tuple(w.shape),
                                       ((2, 2), geometry[1], (1, 1), 1))
    isa = _isa()
    Cr = _round(g.C, fr_wgradt_nt(isa))
    Fr = g.Fg_r
    psize = 16 * Cr * Fr
    # each band reads and writes its chunk's whole partial: wide layers take fewer, longer
    # chunks (a (256, 256) layer's partial is 4.3 MB)
    chunks = _chunks(g.N, psize * x.itemsize)
    if psize * x.itemsize > PARTIAL_BYTES:
        chunks = min(chunks, 2)
    ti = ((g.OH + 1) // 2) * gw.Wq
    dsz = fr_dy_size(&g)
    per = (gw.x_size + dsz) * x.itemsize
    k = int(max(1, min(-(-WINOGRAD_WGRAD_TILES // ti), WINOGRAD_WGRAD_BYTES // per,
                       -(-g.N // chunks))))
    ldv = _round(k * ti, 16)
    row = k * (gw.x_size + dsz) + (g.C + 1) * ldv + k * ti * Fr
    (bufs,) = _scratch(x.dtype, nt * row)
    (parts,) = _scratch(x.dtype, chunks * psize, key="wgrad")
    parts = parts.reshape(chunks, psize)
    off = np.minimum(np.arange(Cr), g.C).astype(np.intp) * ldv
    xsums = np.zeros(g.N)
    bsums = np.empty((g.N if has_bias else 0, g.F if has_bias else 0))
    _winograd_wgrad_run(x, dy, parts, bufs.reshape(nt, row), off, xsums, bsums, tuple(w.shape),
                        geometry, k, ldv, nt, isa)
    dw = np.empty_like(w)
    _winograd_wgrad_finish(parts, dw, Cr, Fr, nt)
    db = np.add.reduce(bsums, axis=0) if has_bias else None
    return dw, db, xsums


def _winograd_forward(x, w, b, stride, padding, dilation, groups, training, int act=0,
                      pool=None):
    """C1-C4 by Winograd F(2x2, 3x3); the backward runs dx by Winograd as well (on dy) and dw
    by the direct kernels. ``pool`` (kernel_size, stride, padding pairs): returns the max
    pooled output instead, each image pooled by the thread that convolved it (None for an
    empty batch or planes past int32 positions: the caller pools after the convolution).

    A NaN or infinity reaches exactly the outputs that read it, as in the direct convolution:
    B^T puts a tile's input row 0 only into transformed row 0 and row 3 only into row 3, and
    A^T reads transformed row 0 only for output row 0 and row 3 only for output row 1 (the same
    for columns), so no output sees an input outside its 3x3 window (tests/test_conv2d.py)."""
    geometry = (stride, padding, dilation, groups)
    cdef fr_geom g = _direct_geometry(tuple(x.shape), tuple(w.shape), geometry)
    cdef fr_geom gw = _direct_geometry(tuple(x.shape), tuple(w.shape),
                                       ((2, 2), padding, (1, 1), 1))
    nt = min(_threads(g.N * g.F * g.OH * g.OW * g.Kg), max(g.N, 1))
    if pool is None:
        y = out = output((g.N, g.F, g.OH, g.OW), x.dtype)
        pooled = arg = ybuf = None
    elif g.N == 0 or g.OH * g.OW > INT32_MAX:
        return None  # (pooled after the convolution)
    else:
        pooled, arg = _pool_outputs(g, pool, x.dtype)
        out, y = pooled, pooled[:0]
    if g.N > 0:
        TH, TW = (g.OH + 1) // 2, (g.OW + 1) // 2
        band, ipi = _winograd_plan(g.N, g.C, TH, TW, x.itemsize, nt)
        ldv = _round(band * TW + 16, 16)  # the input transform writes a vector past a row
        nfb = (g.F + 5) // 6
        vs = _winograd_vstride(g.C, ldv, x.itemsize)
        off = (np.arange(g.C) * ldv).astype(np.intp)
        row = gw.x_size + 16 * vs + 16 * 6 * ldv
        ring = band // TH + 2  # images one band touches, at most
        ysz = ring * g.F * g.OH * g.OW
        up, bufs, ybuf = _scratch(x.dtype, 16 * nfb * g.C * 6, nt * row,
                                  nt * ysz if pool is not None else 0)
        _winograd_weights(w, up, _threads(16 * 9 * g.F * g.C))
        bias = np.empty(0, dtype=x.dtype) if b is None else b
        _winograd_run(x, up, bias, y, bufs.reshape(nt, row), off, tuple(w.shape), geometry,
                      band, ipi, ldv, vs, nt, _isa(), act, pool,
                      None if pool is None else ybuf.reshape(nt, ysz), pooled, arg)
    if not training:
        return out, None
    ctx = _context(x, w, b, out, geometry, "winograd")
    if pool is not None:
        _save_pool(ctx, (g.N, g.F, g.OH, g.OW), arg, pooled, act)
    return out, ctx


# ------------------------------------------------------------------------------------------------
# the backend entry points
# ------------------------------------------------------------------------------------------------

ALGORITHMS = ("auto", "direct", "winograd", "im2col")


# "auto" runs Winograd F(2x2, 3x3) on 3x3 / stride 1 / dilation 1 / ungrouped layers with at
# least WINOGRAD_MIN_CHANNELS input channels, WINOGRAD_MIN_FILTERS filters and
# WINOGRAD_MIN_SUM of the two, outputs at least WINOGRAD_MIN_WIDTH wide (WINOGRAD_MIN_WIDTH_WIDE
# from 64 channels and filters on), padding at most 2 (so that dx runs by Winograd too), on the
# vector paths: there it measured faster than the direct kernels, forward and forward+backward,
# at 1 and 2 threads; on 16 channels, 32 channels with 32 filters (its backward by Winograd),
# or narrow images (fewer tiles than a 64-position block of the products holds), it did not
# (benchmarks/NOTES-conv.md)
WINOGRAD_MIN_CHANNELS = 32
WINOGRAD_MIN_FILTERS = 48
WINOGRAD_MIN_SUM = 96
WINOGRAD_MIN_WIDTH = 16
WINOGRAD_MIN_WIDTH_WIDE = 12


def _choose(tuple x_shape, tuple w_shape, stride, padding, dilation, groups) -> str:
    """The algorithm "auto" runs: GEMMs for pointwise convolutions (1x1, stride 1, no padding:
    x itself is the column matrix), Winograd on wide 3x3 stride-1 layers, the direct kernels
    for everything else."""
    pointwise = (tuple(w_shape[2:]) == (1, 1) and tuple(stride) == (1, 1)
                 and tuple(padding) == (0, 0))
    # The direct kernels copy each image into a zero-padded plane: where the padding dwarfs
    # the image (say 5x5 padded by 2^31) that copy is gigabytes of zeros, while im2col touches
    # only the columns of the outputs it computes.
    H, W = x_shape[2], x_shape[3]
    padded = (H + 2 * padding[0]) * (W + 2 * padding[1])
    if padded > max(4 * H * W, 1 << 20):
        return "im2col"
    F, C = w_shape[0], w_shape[1]
    if (winograd_unsupported(w_shape, stride, dilation, groups) is None
            and C >= WINOGRAD_MIN_CHANNELS and F >= WINOGRAD_MIN_FILTERS
            and C + F >= WINOGRAD_MIN_SUM
            and W + 2 * padding[1] - 2 >= (WINOGRAD_MIN_WIDTH_WIDE if min(C, F) >= 64
                                           else WINOGRAD_MIN_WIDTH)
            and max(padding) <= 2 and _isa() != FR_ISA_PORTABLE):
        return "winograd"
    return "im2col" if pointwise else "direct"


def conv2d_forward_algorithm(x, w, b, stride, padding, dilation, groups, training, algorithm,
                             activation=None, pool=None):
    """x (N,C,H,W); w (F,C/groups,KH,KW); b (F,) or None -> y (N,F,OH,OW), ctx, computed by
    ``algorithm`` (validated by fastrnn.backends.ops). ``activation`` "relu": y = max(y, 0)
    (NaN kept), in the kernels' store for the direct and Winograd algorithms, on each column
    tile right after its GEMM for im2col. ``pool`` (kernel_size, stride, padding pairs,
    validated): y max pooled, inside the direct kernels' schedule where it runs (each image
    pooled while in cache; y never written), and inside Winograd's (one image per work
    item), else by max_pool2d after the convolution; the backward then takes the pooled
    output's gradient."""
    cdef int act = activation == "relu"
    if x.shape[2] < 1 or x.shape[3] < 1:
        # fastrnn.backends.ops refuses empty planes first; this guards direct calls of the
        # kernel module (no input behind any output)
        raise ValueError(f"x: expected image planes of at least 1x1, got shape {x.shape}")
    if x.shape[1] == 0:
        # no input channels: nothing to convolve (y is the bias, dw and dx are empty); the
        # im2col path handles the empty contraction, whichever algorithm was asked for
        algorithm = "im2col"
    if algorithm == "auto":
        algorithm = _choose(x.shape, w.shape, stride, padding, dilation, groups)
    if algorithm == "winograd":
        why = winograd_unsupported(tuple(w.shape), stride, dilation, groups)
        if why is not None:
            raise ValueError(f"algorithm: 'winograd' cannot run this convolution: {why}")
    if pool is not None:
        out = None
        if algorithm == "direct":
            out = _direct_forward_pooled(x, w, b, stride, padding, dilation, groups, training,
                                         act, pool)
        elif algorithm == "winograd":
            out = _winograd_forward(x, w, b, stride, padding, dilation, groups, training, act,
                                    pool)
        if out is not None:
            return out
        y, ctx = conv2d_forward_algorithm(x, w, b, stride, padding, dilation, groups, training,
                                          algorithm, activation)
        pooled, pctx = _pool2d().max_pool2d_forward(y, *pool, training)
        if ctx is not None:
            _save_pool(ctx, y.shape, pctx.saved["arg"], pooled, act)
        return pooled, ctx
    if algorithm == "direct":
        return _direct_forward(x, w, b, stride, padding, dilation, groups, training, act)
    if algorithm == "winograd":
        return _winograd_forward(x, w, b, stride, padding, dilation, groups, training, act)
    if algorithm == "im2col":
        return _im2col()._im2col_forward(x, w, b, stride, padding, dilation, groups, training,
                                         act)
    raise ValueError(f"algorithm: unknown algorithm {algorithm!r}")


def _pool2d():
    from fastrnn._cpu import pool2d

    return pool2d


def conv2d_forward(x, w, b, stride, padding, dilation, groups, training):
    """x (N,C,H,W); w (F,C/groups,KH,KW); b (F,) or None -> y (N,F,OH,OW), ctx."""
    return conv2d_forward_algorithm(x, w, b, stride, padding, dilation, groups, training, "auto")


# The gradients of a direct forward come from im2col's backward when the columns are this short
# (C/groups * KH * KW, one group): a network's first layers (1 or 3 channels). There the GEMMs of
# im2col beat the direct kernels' gradient passes, whose register tiles run on a handful of input
# channels: 1.1-2.8x forward+backward over 18 layers of 1-4 channels (3x3, 5x5, stride 1 and 2,
# 1 and 2 threads), 0.9-1.2x at 8 channels (benchmarks/NOTES-conv.md). 0 turns it off.
IM2COL_BACKWARD_MAX_K = 36


def conv2d_backward(ctx, dy, input_grad=True):
    """dy (N,F,OH,OW) -> dx (N,C,H,W) (None without ``input_grad``), dw (F,C/groups,KH,KW),
    db (F,) or None; by the forward's algorithm, except short columns (IM2COL_BACKWARD_MAX_K)."""
    s = ctx.saved
    pool = s.get("pool")
    if pool is not None:
        # the pooling's backward (with the ReLU's folded in) into a per-thread buffer: the
        # convolution's backward below only reads it
        (dyc,) = _scratch(dy.dtype, int(np.prod(pool["shape"])), key="pool")
        dy = _pool2d().max_pool2d_relu_backward(pool["arg"], pool["y"], dy,
                                                dyc.reshape(pool["shape"]))
    algorithm = s.get("algorithm")
    if algorithm == "direct":
        w, geometry = s["w"], s["geometry"]
        if (geometry[3] == 1 and w.shape[1] * w.shape[2] * w.shape[3] <= IM2COL_BACKWARD_MAX_K
                and dy.shape[2] * dy.shape[3] < 2**31):
            return _im2col()._im2col_backward(ctx, dy, input_grad)
    if algorithm in ("direct", "winograd"):
        return _direct_backward(ctx, dy, input_grad)
    return _im2col()._im2col_backward(ctx, dy, input_grad)


# ------------------------------------------------------------------------------------------------
# the fused ReLU's backward
# ------------------------------------------------------------------------------------------------

# Elements per OpenMP chunk of relu_backward (below four chunks, one thread)
cdef enum:
    RELU_CHUNK = 1 << 15


cdef inline void _relu_mask_run(const floating* y, const floating* dy, floating* out,
                                Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating d
    for i in range(n):  # both loads unconditional: a vectorised select, no branch
        d = dy[i]
        out[i] = d if y[i] > 0 else 0


cdef void _relu_mask(const floating* y, const floating* dy, floating* out, Py_ssize_t n,
                     int nthreads) noexcept nogil:
    cdef Py_ssize_t c, i0
    cdef Py_ssize_t chunks = (n + RELU_CHUNK - 1) // RELU_CHUNK
    for c in prange(chunks, num_threads=nthreads, schedule="static"):
        i0 = c * RELU_CHUNK
        _relu_mask_run(y + i0, dy + i0, out + i0, min(n - i0, <Py_ssize_t> RELU_CHUNK))


def relu_backward(y, dy, bint reuse=False):
    """The gradient through a fused ReLU: dy where the output y is positive, else 0 (torch's
    threshold_backward: 0 even where dy is NaN). NumPy's where with a scalar takes ~8 ns an
    element on a random mask; this ~0.5.

    ``reuse``: the result is a view of a buffer kept per Python thread and overwritten by the
    next such call (conv2d's backward, which only reads it): no fresh pages per call."""
    y = np.ascontiguousarray(y)
    dy = np.ascontiguousarray(dy, dtype=y.dtype)
    if reuse:  # (its own key: the backward's scratch is in use while this is read)
        out = _scratch(y.dtype, y.size, key="relu")[0].reshape(y.shape)
    else:
        out = output(y.shape, y.dtype)
    cdef Py_ssize_t n = y.size
    cdef int nt = get_num_threads() if n >= 4 * RELU_CHUNK else 1
    cdef float[::1] yf, df, of
    cdef double[::1] yd, dd, od
    if n == 0:
        return out
    if y.dtype == np.float32:
        yf, df, of = y.reshape(-1), dy.reshape(-1), out.reshape(-1)
        with nogil:
            _relu_mask(&yf[0], &df[0], &of[0], n, nt)
    else:
        yd, dd, od = y.reshape(-1), dy.reshape(-1), out.reshape(-1)
        with nogil:
            _relu_mask(&yd[0], &dd[0], &od[0], n, nt)
    return out
