# cython: language_level=3
"""The training glue on the CPU: embedding backward, softmax cross-entropy (alone and fused with
the linear layer before it), gradient-norm clipping and the optimizers' updates, without NumPy
temporaries.

The Python callers (fastrnn/nn/linear.py, fastrnn/nn/functional.py, fastrnn/optim.py) validate
and hand over C-contiguous arrays of one float dtype; the NumPy code they run otherwise (CuPy
arrays, ``fastrnn.use_backend("numpy")``) is the oracle these kernels are tested against
(tests/test_train_kernels.py, tests/test_optim.py).

Multi-tensor ops (norm, scale, optimizer updates) take a *plan*: the tensors' addresses
(``int64`` arrays, one per role: parameter, gradient, state buffers; 0 for "absent") and a chunk
table that cuts every tensor into pieces of at most CHUNK elements (chunk -> tensor, start,
length). One ``prange`` over the chunks updates all parameters in one call. Every element's
update is the same arithmetic, in the same order, as the NumPy code of fastrnn/optim.py (scalars
rounded to the array's dtype first, as NumPy does with a Python float), so results do not depend
on the thread count and equal the NumPy path (float64 to rounding).
"""

from cython.parallel cimport parallel, prange, threadid
from libc.math cimport INFINITY, exp, fabs, fabsf, log, logf, sqrt, sqrtf
from libc.stdint cimport int64_t
from libc.string cimport memset

import numpy as np

from fastrnn._cpu._blas cimport floating, gemm, load_scipy_blas

load_scipy_blas()  # SciPy's sgemm / dgemm for gemm (fastrnn/_cpu/_blas.pxd)

cdef enum:
    _CHUNK = 1 << 14  # elements per chunk of a multi-tensor op (64 KB of float32)
    # rows per tile of the fused linear + cross-entropy: 512 ran (2048,192)->96 at the speed of
    # the three unfused GEMMs on one thread; 128 and 256 were 15% and 5% slower (per-call and
    # dW read-modify-write overhead of smaller GEMMs)
    _TILE = 512

CHUNK = _CHUNK
TILE = _TILE


cdef extern from *:
    """
    #include <string.h>
    /* exp for float32 without a libm call, so that loops over it vectorise (setup.py builds
       this module with -fno-trapping-math so the selects are if-converted): Cephes' expf
       (range reduction by ln 2 in two parts, degree-6 polynomial, 2^n through the exponent
       bits), relative error about 1e-7; 0 below -87.3 (where expf underflows). */
    static inline float fastrnn_expf(float x) {
        /* branch-free (selects as arithmetic) so that GCC if-converts and vectorises it */
        float xc = x > 88.3762626647949f ? 88.3762626647949f : x;
        xc = xc < -87.3365447505531f ? -87.3365447505531f : xc;
        float fx = xc * 1.44269504088896341f + 0.5f;
        int n = (int) fx;
        n -= (float) n > fx;
        float r = xc - (float) n * 0.693359375f + (float) n * 2.12194440e-4f;
        float r2 = r * r;
        float y = ((((1.9875691500E-4f * r + 1.3981999507E-3f) * r + 8.3334519073E-3f) * r
                    + 4.1665795894E-2f) * r + 1.6666665459E-1f) * r + 5.0000001201E-1f;
        y = y * r2 + r + 1.0f;
        float scale;
        int bits = (n + 127) << 23;
        memcpy(&scale, &bits, sizeof scale);
        return y * scale * (float) (x >= -87.3365447505531f);
    }

    /* _ce_rows for float32 (see there) with AVX-512 intrinsics: this module is built for the
       baseline ISA, where GCC runs the exp loop 4 lanes wide (and left it scalar when asked to
       clone the function for AVX-512). exp as in fastrnn_expf (_vexp.h, 0 where it
       underflows); sums and maxima over 16 lanes. */
    #if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__)
    #include <immintrin.h>
    #include <math.h>
    #include <stdint.h>
    #include "_vexp.h"
    /* the lanes of a row's vector at column j: all 16, or the C - j left */
    static inline __mmask16 fr_ce_lanes(Py_ssize_t left) {
        return left >= 16 ? (__mmask16) 0xffff : (__mmask16) ((1u << left) - 1u);
    }
    static __attribute__((target("avx512f"))) double fastrnn_ce_rows_avx512(
        const float *z, const float *bias, const int64_t *t, Py_ssize_t rows, Py_ssize_t C,
        float count, float *d, float *db)
    {
        double total = 0.0;
        float inv_count = 1.0f / count;
        for (Py_ssize_t r = 0; r < rows; r++) {
            float *dr = d + r * C;
            const float *zr = z + r * C;
            int64_t tr = t[r];
            __m512 mx = _mm512_set1_ps(-INFINITY), acc = _mm512_setzero_ps();
            for (Py_ssize_t j = 0; j < C; j += 16) {
                __mmask16 k = fr_ce_lanes(C - j);
                __m512 v = _mm512_maskz_loadu_ps(k, zr + j);
                if (bias != NULL) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, bias + j));
                _mm512_mask_storeu_ps(dr + j, k, v);
                mx = _mm512_mask_max_ps(mx, k, v, mx);  /* a NaN v leaves mx */
            }
            float m = _mm512_reduce_max_ps(mx);
            float zt = dr[tr] - m;
            __m512 vm = _mm512_set1_ps(m);
            for (Py_ssize_t j = 0; j < C; j += 16) {
                __mmask16 k = fr_ce_lanes(C - j);
                __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, dr + j), vm);
                x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);  /* <= 0: m is the maximum */
                __m512 e = _mm512_maskz_mov_ps(k, fr_v16_exp(x));
                _mm512_mask_storeu_ps(dr + j, k, e);
                acc = _mm512_add_ps(acc, e);
            }
            float s = _mm512_reduce_add_ps(acc);
            total += (double) (logf(s) - zt);
            __m512 sc = _mm512_set1_ps(inv_count / s);
            for (Py_ssize_t j = 0; j < C; j += 16) {
                __mmask16 k = fr_ce_lanes(C - j);
                __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, dr + j), sc);
                _mm512_mask_storeu_ps(dr + j, k, v);
                if (db != NULL)
                    _mm512_mask_storeu_ps(db + j, k,
                                          _mm512_add_ps(_mm512_maskz_loadu_ps(k, db + j), v));
            }
            dr[tr] -= inv_count;
            if (db != NULL) db[tr] -= inv_count;
        }
        return total;
    }
    static int fastrnn_ce_avx512_ok(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f");
    }
    #else
    static double fastrnn_ce_rows_avx512(
        const float *z, const float *bias, const int64_t *t, Py_ssize_t rows, Py_ssize_t C,
        float count, float *d, float *db) { return 0.0; }
    static int fastrnn_ce_avx512_ok(void) { return 0; }
    #endif
    """
    float fastrnn_expf(float x) noexcept nogil
    double fastrnn_ce_rows_avx512(const float* z, const float* bias, const int64_t* t,
                                  Py_ssize_t rows, Py_ssize_t C, float count, float* d,
                                  float* db) noexcept nogil
    int fastrnn_ce_avx512_ok() noexcept nogil


cdef bint _ce_avx512 = fastrnn_ce_avx512_ok() != 0


cdef inline floating _exp(floating x) noexcept nogil:
    if floating is float:
        return fastrnn_expf(x)
    else:
        return exp(x)


cdef inline floating _log(floating x) noexcept nogil:
    if floating is float:
        return logf(x)
    else:
        return log(x)


cdef inline floating _sqrt(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline floating _abs(floating x) noexcept nogil:
    if floating is float:
        return fabsf(x)
    else:
        return fabs(x)


# ------------------------------------------------------------------------------------------------
# embedding backward: counting sort of the indices, then one row of the gradient per task
# ------------------------------------------------------------------------------------------------


def embedding_backward(
    const int64_t[::1] indices,   # IN  (M,) each in 0..V-1 (checked by the caller)
    const floating[:, ::1] dy,    # IN  (M, E)
    floating[:, ::1] grad,        # INOUT (V, E): grad[v] += sum of dy[i] with indices[i] == v
    Py_ssize_t padding_idx,       # IN  row that gets no gradient, or -1
    int64_t[::1] counts,          # SCRATCH (V + 1,)
    int64_t[::1] order,           # SCRATCH (M,)
    int nthreads,
):
    """``grad[indices[i]] += dy[i]`` for every i (repeated indices summed in order of i).

    A stable counting sort groups the positions of each row; then the rows are independent and
    run in parallel with no atomics (np.add.at's semantics, without its per-element dispatch).
    """
    cdef Py_ssize_t M = indices.shape[0], E = grad.shape[1], V = grad.shape[0]
    cdef Py_ssize_t i, j, v, e, lo, hi, pos
    cdef floating* g
    cdef const floating* d
    with nogil:
        memset(&counts[0], 0, (V + 1) * sizeof(int64_t))
        for i in range(M):
            counts[indices[i] + 1] += 1
        for v in range(V):
            counts[v + 1] += counts[v]
        for i in range(M):  # counts[v] moves from the start of row v's run to its end
            pos = counts[indices[i]]
            order[pos] = i
            counts[indices[i]] = pos + 1
        for v in prange(V, num_threads=nthreads, schedule="dynamic", chunksize=16):
            if v == padding_idx:
                continue
            lo = 0 if v == 0 else counts[v - 1]
            hi = counts[v]
            g = &grad[v, 0]
            for j in range(lo, hi):
                d = &dy[order[j], 0]
                for e in range(E):
                    g[e] = g[e] + d[e]


# ------------------------------------------------------------------------------------------------
# softmax cross-entropy
# ------------------------------------------------------------------------------------------------


cdef inline floating _sum(const floating* a, Py_ssize_t n) noexcept nogil:
    """Sum of a[0:n] over 8 interleaved partial sums (independent adds: vector lanes)."""
    cdef floating acc[8]
    cdef Py_ssize_t j, k
    for k in range(8):
        acc[k] = 0
    j = 0
    while j + 8 <= n:
        for k in range(8):
            acc[k] = acc[k] + a[j + k]
        j += 8
    while j < n:
        acc[0] = acc[0] + a[j]
        j += 1
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))


cdef inline floating _max(const floating* a, Py_ssize_t n) noexcept nogil:
    """max of a[0:n] (NaNs skipped, as ``if v > m: m = v``) over 16 lanes: elementwise selects,
    which vectorise, instead of one running maximum, which does not."""
    cdef floating acc[16]
    cdef floating m = -INFINITY, v
    cdef Py_ssize_t j, k
    for k in range(16):
        acc[k] = -INFINITY
    j = 0
    while j + 16 <= n:
        for k in range(16):
            v = a[j + k]
            acc[k] = v if v > acc[k] else acc[k]
        j += 16
    while j < n:
        if a[j] > m:
            m = a[j]
        j += 1
    for k in range(16):
        if acc[k] > m:
            m = acc[k]
    return m


cdef double _ce_rows(
    const floating* z,        # IN  (rows, C) logits, row stride C
    const floating* bias,     # IN  (C,) added to every row, or NULL
    const int64_t* t,         # IN  (rows,) targets
    Py_ssize_t rows,
    Py_ssize_t C,
    floating count,           # IN  the loss is a mean over this many rows
    floating* d,              # OUT (rows, C) (softmax - onehot) / count; may be z itself
    floating* db,             # INOUT (C,) += column sums of d, or NULL
) noexcept nogil:
    """Sum over the rows of ``log sum exp(z) - z[t]``, and the gradient of the mean.

    The steps of fastrnn.nn.functional.softmax_cross_entropy (the row maximum subtracted
    before exp, d = e / s, d[t] -= 1, d /= count), with the two divisions as one multiply,
    d = e * (1 / (s count)), d[t] -= 1 / count (within rounding of it). Every pass is a plain
    loop over the row that vectorises; float32 on AVX-512 runs fastrnn_ce_rows_avx512."""
    cdef Py_ssize_t r, j
    cdef floating m, s, v, zt, scale, inv_count = (<floating> 1) / count
    cdef Py_ssize_t tr
    cdef double total = 0.0
    cdef floating* dr
    cdef const floating* zr
    if floating is float and _ce_avx512:  # the same steps, 16 lanes at a time
        return fastrnn_ce_rows_avx512(z, bias, t, rows, C, count, d, db)
    for r in range(rows):
        dr = d + r * C
        zr = z + r * C
        tr = t[r]
        if bias != NULL:
            for j in range(C):
                dr[j] = zr[j] + bias[j]
        elif dr != zr:
            for j in range(C):
                dr[j] = zr[j]
        m = _max(dr, C)
        zt = dr[tr] - m
        for j in range(C):  # no reduction in this loop: it vectorises
            dr[j] = _exp(dr[j] - m)
        s = _sum(dr, C)
        total += <double> (_log(s) - zt)
        scale = inv_count / s
        if db != NULL:
            for j in range(C):
                v = dr[j] * scale
                dr[j] = v
                db[j] = db[j] + v
            db[tr] = db[tr] - inv_count
        else:
            for j in range(C):
                dr[j] = dr[j] * scale
        dr[tr] = dr[tr] - inv_count
    return total


def cross_entropy(
    const floating[:, ::1] z,     # IN  (M, C) logits
    const int64_t[::1] t,         # IN  (M,) targets in 0..C-1 (checked by the caller)
    floating[:, ::1] d,           # OUT (M, C) d mean loss / d z
    double[::1] partial,          # SCRATCH (nthreads,)
    int nthreads,
):
    """Mean softmax cross-entropy of the rows of z; writes its gradient into d. Returns the
    loss (summed in double)."""
    cdef Py_ssize_t M = z.shape[0], C = z.shape[1]
    cdef Py_ssize_t lo, hi, k
    cdef int tid, nt = nthreads
    cdef double total = 0.0
    if M == 0:
        return 0.0
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        lo = M * tid // nt
        hi = M * (tid + 1) // nt
        partial[tid] = _ce_rows(&z[lo, 0], <const floating*> NULL, &t[lo], hi - lo, C,
                                <floating> M, &d[lo, 0], <floating*> NULL) if hi > lo else 0.0
    for k in range(nt):
        total += partial[k]
    return total / M


def linear_cross_entropy(
    const floating[:, ::1] x,     # IN  (M, K) inputs of the linear layer
    const floating[:, ::1] w,     # IN  (C, K) weight
    const floating[::1] b,        # IN  (C,) bias (ignored when not has_bias)
    const int64_t[::1] t,         # IN  (M,) targets in 0..C-1 (checked by the caller)
    floating[:, ::1] dx,          # OUT (M, K) d mean loss / d x
    floating[:, ::1] dw,          # INOUT (C, K) += d mean loss / d w (when has_dw)
    floating[::1] db,             # INOUT (C,) += d mean loss / d b (when has_db)
    floating[::1] work,           # SCRATCH see workspace_size()
    double[::1] partial,          # SCRATCH (nthreads,)
    bint has_bias,
    bint has_dw,
    bint has_db,
    int nthreads,
):
    """Linear layer + mean softmax cross-entropy, forward and backward, over row tiles.

    Each thread takes a contiguous block of rows and walks it TILE rows at a time: logits of
    the tile (one GEMM, bias added in the row pass), softmax / loss / d logits in place, then
    dx of the tile (GEMM) and its share of dw (GEMM into the thread's own accumulator; thread 0
    accumulates straight into dw). The (M, C) logits never exist as a whole, and the per-thread
    partial sums are added in thread order after the parallel region, so a given thread count
    always gives the same bits. BLAS must run on one thread meanwhile (the caller pins it).
    Returns the mean loss.
    """
    cdef Py_ssize_t M = x.shape[0], K = x.shape[1], C = w.shape[0]
    cdef Py_ssize_t lo, hi, r0, rows, j, k
    cdef int tid, nt = nthreads
    cdef Py_ssize_t per_thread = _TILE * C + C
    cdef floating* tile
    cdef floating* dbp
    cdef floating* dwp
    cdef floating* base = &work[0]
    cdef double total = 0.0
    cdef const floating* bias = &b[0] if has_bias else NULL
    if M == 0:
        return 0.0
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        lo = M * tid // nt
        hi = M * (tid + 1) // nt
        tile = base + tid * per_thread
        dbp = tile + _TILE * C
        memset(dbp, 0, C * sizeof(floating))
        if tid == 0:
            dwp = &dw[0, 0]
        else:
            dwp = base + nt * per_thread + (tid - 1) * C * K
            if has_dw:
                memset(dwp, 0, C * K * sizeof(floating))
        partial[tid] = 0.0
        r0 = lo
        while r0 < hi:
            rows = hi - r0 if hi - r0 < _TILE else _TILE
            gemm(False, True, <int> rows, <int> C, <int> K, <floating> 1, &x[r0, 0], <int> K,
                 &w[0, 0], <int> K, <floating> 0, tile, <int> C)
            partial[tid] += _ce_rows(tile, bias, &t[r0], rows, C, <floating> M, tile,
                                     dbp if has_db else <floating*> NULL)
            gemm(False, False, <int> rows, <int> K, <int> C, <floating> 1, tile, <int> C,
                 &w[0, 0], <int> K, <floating> 0, &dx[r0, 0], <int> K)
            if has_dw:
                gemm(True, False, <int> C, <int> K, <int> rows, <floating> 1, tile, <int> C,
                     &x[r0, 0], <int> K, <floating> 1, dwp, <int> K)
            r0 = r0 + rows
    for k in range(nt):
        total += partial[k]
        if has_db:
            dbp = base + k * per_thread + _TILE * C
            for j in range(C):
                db[j] = db[j] + dbp[j]
        if k > 0 and has_dw:
            dwp = base + nt * per_thread + (k - 1) * C * K
            for j in range(C * K):
                (&dw[0, 0])[j] = (&dw[0, 0])[j] + dwp[j]
    return total / M


def linear_cross_entropy_workspace(Py_ssize_t C, Py_ssize_t K, int nthreads):
    """Elements of ``work`` that :func:`linear_cross_entropy` needs."""
    return nthreads * (_TILE * C + C) + (nthreads - 1) * C * K


# ------------------------------------------------------------------------------------------------
# multi-tensor plans
# ------------------------------------------------------------------------------------------------


def chunk_table(sizes):
    """(tensor, start, length) int64 arrays cutting tensors of ``sizes`` into CHUNK pieces."""
    tensors, starts, lengths = [], [], []
    for i, n in enumerate(sizes):
        for s in range(0, int(n), CHUNK):
            tensors.append(i)
            starts.append(s)
            lengths.append(min(_CHUNK, int(n) - s))
    return (np.array(tensors, np.int64), np.array(starts, np.int64),
            np.array(lengths, np.int64))


cdef inline floating* _at(int64_t address, Py_ssize_t start, floating* kind) noexcept nogil:
    """Element ``start`` of the tensor at ``address`` (``kind`` only selects the type); NULL
    for an absent tensor (address 0)."""
    if address == 0:
        return NULL
    return (<floating*> <size_t> address) + start


cdef inline double _sumsq(const floating* a, Py_ssize_t n) noexcept nogil:
    """Sum of squares of a[0:n] in double over 8 interleaved partial sums (vector lanes); a
    chunk always runs on one thread, so the result does not depend on the thread count."""
    cdef double acc[8]
    cdef double v
    cdef Py_ssize_t j, k
    for k in range(8):
        acc[k] = 0.0
    j = 0
    while j + 8 <= n:
        for k in range(8):
            v = <double> a[j + k]
            acc[k] = acc[k] + v * v
        j += 8
    while j < n:
        v = <double> a[j]
        acc[0] = acc[0] + v * v
        j += 1
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))


cdef void _sumsq_chunks(
    const int64_t[::1] g, const int64_t[::1] ct, const int64_t[::1] cs, const int64_t[::1] cl,
    double[::1] out, bint inf_norm, int nt, floating* kind,
) noexcept nogil:
    cdef Py_ssize_t c, j
    cdef floating* a
    cdef double s, v
    for c in prange(ct.shape[0], num_threads=nt, schedule="static"):
        a = _at(g[ct[c]], cs[c], kind)
        if inf_norm:
            s = 0.0
            for j in range(cl[c]):
                v = <double> _abs(a[j])
                if v > s or v != v:
                    s = v
        else:
            s = _sumsq(a, cl[c])
        out[c] = s


def grad_norm(const int64_t[::1] g, const int64_t[::1] ct, const int64_t[::1] cs,
              const int64_t[::1] cl, double[::1] partial, bint dbl, bint inf_norm, int nthreads):
    """The 2-norm (or max-norm) of all tensors of the plan together, in double: per-chunk sums
    in parallel, added in chunk order (the same bits on any number of threads)."""
    cdef Py_ssize_t c
    cdef double total = 0.0
    with nogil:
        if dbl:
            _sumsq_chunks(g, ct, cs, cl, partial, inf_norm, nthreads, <double*> NULL)
        else:
            _sumsq_chunks(g, ct, cs, cl, partial, inf_norm, nthreads, <float*> NULL)
        for c in range(ct.shape[0]):
            if inf_norm:
                if partial[c] > total or partial[c] != partial[c]:
                    total = partial[c]
            else:
                total += partial[c]
    return total if inf_norm else sqrt(total)


cdef void _scale_chunks(
    const int64_t[::1] g, const int64_t[::1] ct, const int64_t[::1] cs, const int64_t[::1] cl,
    floating coef, int nt,
) noexcept nogil:
    cdef Py_ssize_t c, j
    cdef floating* a
    for c in prange(ct.shape[0], num_threads=nt, schedule="static"):
        a = _at(g[ct[c]], cs[c], &coef)
        for j in range(cl[c]):
            a[j] = a[j] * coef


def scale(const int64_t[::1] g, const int64_t[::1] ct, const int64_t[::1] cs,
          const int64_t[::1] cl, double coef, bint dbl, int nthreads):
    """Every tensor of the plan *= coef (rounded to the dtype first, as NumPy does)."""
    with nogil:
        if dbl:
            _scale_chunks(g, ct, cs, cl, <double> coef, nthreads)
        else:
            _scale_chunks(g, ct, cs, cl, <float> coef, nthreads)


# ------------------------------------------------------------------------------------------------
# optimizers: one element's update each, the arithmetic of fastrnn/optim.py's NumPy code
# ------------------------------------------------------------------------------------------------

# Roles in the address arrays: P parameter, G gradient, S0..S2 state buffers (per optimizer).
# Per-tensor scalars come in a (n_tensors, k) float64 array ``per``; group hyperparameters in
# ``h`` (float64), each rounded to the dtype where NumPy would round it.


cdef void _sgd_chunk(floating* p, floating* g, floating* buf, Py_ssize_t n, const double* h,
                     bint first) noexcept nogil:
    # h: lr, momentum, dampening, weight_decay, nesterov, maximize
    cdef floating lr = <floating> h[0], mom = <floating> h[1]
    cdef floating damp1 = <floating> (1 - h[2]), wd = <floating> h[3]
    cdef bint nesterov = h[4] != 0, maximize = h[5] != 0, use_wd = h[3] != 0
    cdef bint use_mom = h[1] != 0
    cdef Py_ssize_t j
    cdef floating gj
    for j in range(n):
        gj = -g[j] if maximize else g[j]
        if use_wd:
            gj = gj + wd * p[j]
        if use_mom:
            if first:
                buf[j] = gj
            else:
                buf[j] = buf[j] * mom
                buf[j] = buf[j] + damp1 * gj
            if nesterov:
                gj = gj + mom * buf[j]
            else:
                gj = buf[j]
        p[j] = p[j] - lr * gj


cdef void _adagrad_chunk(floating* p, floating* g, floating* acc, Py_ssize_t n, const double* h,
                         double clr) noexcept nogil:
    # h: lr, lr_decay, weight_decay, eps, maximize
    cdef floating wd = <floating> h[2], eps = <floating> h[3], c = <floating> clr
    cdef bint maximize = h[4] != 0, use_wd = h[2] != 0
    cdef Py_ssize_t j
    cdef floating gj, std
    for j in range(n):
        gj = -g[j] if maximize else g[j]
        if use_wd:
            gj = gj + wd * p[j]
        acc[j] = acc[j] + gj * gj
        std = _sqrt(acc[j]) + eps
        p[j] = p[j] - c * (gj / std)


cdef void _adadelta_chunk(floating* p, floating* g, floating* sq, floating* acc, Py_ssize_t n,
                          const double* h) noexcept nogil:
    # h: lr, rho, eps, weight_decay, maximize
    cdef floating lr = <floating> h[0], rho = <floating> h[1], rho1 = <floating> (1 - h[1])
    cdef floating eps = <floating> h[2], wd = <floating> h[3]
    cdef bint maximize = h[4] != 0, use_wd = h[3] != 0
    cdef Py_ssize_t j
    cdef floating gj, std, delta
    for j in range(n):
        gj = -g[j] if maximize else g[j]
        if use_wd:
            gj = gj + wd * p[j]
        sq[j] = sq[j] * rho
        sq[j] = sq[j] + rho1 * gj * gj
        std = _sqrt(sq[j] + eps)
        delta = _sqrt(acc[j] + eps) / std * gj
        acc[j] = acc[j] * rho
        acc[j] = acc[j] + rho1 * delta * delta
        p[j] = p[j] - lr * delta


cdef void _rmsprop_chunk(floating* p, floating* g, floating* sq, floating* buf, floating* ga,
                         Py_ssize_t n, const double* h) noexcept nogil:
    # h: lr, alpha, eps, weight_decay, momentum, centered, maximize
    cdef floating lr = <floating> h[0], alpha = <floating> h[1], alpha1 = <floating> (1 - h[1])
    cdef floating eps = <floating> h[2], wd = <floating> h[3], mom = <floating> h[4]
    cdef bint centered = h[5] != 0, maximize = h[6] != 0, use_wd = h[3] != 0
    cdef bint use_mom = h[4] > 0
    cdef Py_ssize_t j
    cdef floating gj, avg
    for j in range(n):
        gj = -g[j] if maximize else g[j]
        if use_wd:
            gj = gj + wd * p[j]
        sq[j] = sq[j] * alpha
        sq[j] = sq[j] + alpha1 * gj * gj
        if centered:
            ga[j] = ga[j] + alpha1 * (gj - ga[j])
            avg = _sqrt(sq[j] - ga[j] * ga[j]) + eps
        else:
            avg = _sqrt(sq[j]) + eps
        if use_mom:
            buf[j] = buf[j] * mom
            buf[j] = buf[j] + gj / avg
            p[j] = p[j] - lr * buf[j]
        else:
            p[j] = p[j] - lr * (gj / avg)


cdef void _adam_chunk(floating* p, floating* g, floating* m, floating* v, floating* vmax,
                      Py_ssize_t n, const double* h, double step_size,
                      double bc2_sqrt) noexcept nogil:
    # h: lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled
    cdef floating b1 = <floating> (1 - h[1]), beta2 = <floating> h[2]
    cdef floating b2 = <floating> (1 - h[2]), eps = <floating> h[3], wd = <floating> h[4]
    cdef floating decay = <floating> (1 - h[0] * h[4])
    cdef floating ss = <floating> step_size, bc = <floating> bc2_sqrt
    cdef bint amsgrad = h[5] != 0, maximize = h[6] != 0, decoupled = h[7] != 0
    cdef bint use_wd = h[4] != 0
    cdef Py_ssize_t j
    cdef floating gj, denom
    if not (maximize or use_wd or amsgrad):
        # the defaults, without a branch in the loop: GCC vectorises it (the general loop
        # below stays scalar); the same arithmetic as the general loop
        for j in range(n):
            gj = g[j]
            m[j] = m[j] + b1 * (gj - m[j])
            v[j] = v[j] * beta2
            v[j] = v[j] + b2 * gj * gj
            denom = _sqrt(v[j]) / bc + eps
            p[j] = p[j] - ss * (m[j] / denom)
        return
    for j in range(n):
        gj = -g[j] if maximize else g[j]
        if use_wd:
            if decoupled:
                p[j] = p[j] * decay
            else:
                gj = gj + wd * p[j]
        m[j] = m[j] + b1 * (gj - m[j])
        v[j] = v[j] * beta2
        v[j] = v[j] + b2 * gj * gj
        if amsgrad:
            if v[j] > vmax[j] or v[j] != v[j]:
                vmax[j] = v[j]
            denom = _sqrt(vmax[j]) / bc + eps
        else:
            denom = _sqrt(v[j]) / bc + eps
        p[j] = p[j] - ss * (m[j] / denom)


cdef void _step_chunks(
    int kind, const int64_t[:, ::1] ptrs, const int64_t[::1] ct, const int64_t[::1] cs,
    const int64_t[::1] cl, const double[:, ::1] per, const double* h, int nt, floating* ty,
) noexcept nogil:
    cdef Py_ssize_t c, i, s, n
    for c in prange(ct.shape[0], num_threads=nt, schedule="static"):
        i = ct[c]
        s = cs[c]
        n = cl[c]
        if kind == 0:
            _sgd_chunk(_at(ptrs[0, i], s, ty), _at(ptrs[1, i], s, ty), _at(ptrs[2, i], s, ty), n,
                       h, per[i, 0] != 0)
        elif kind == 1:
            _adagrad_chunk(_at(ptrs[0, i], s, ty), _at(ptrs[1, i], s, ty),
                           _at(ptrs[2, i], s, ty), n, h, per[i, 0])
        elif kind == 2:
            _adadelta_chunk(_at(ptrs[0, i], s, ty), _at(ptrs[1, i], s, ty),
                            _at(ptrs[2, i], s, ty), _at(ptrs[3, i], s, ty), n, h)
        elif kind == 3:
            _rmsprop_chunk(_at(ptrs[0, i], s, ty), _at(ptrs[1, i], s, ty),
                           _at(ptrs[2, i], s, ty), _at(ptrs[3, i], s, ty),
                           _at(ptrs[4, i], s, ty), n, h)
        else:
            _adam_chunk(_at(ptrs[0, i], s, ty), _at(ptrs[1, i], s, ty), _at(ptrs[2, i], s, ty),
                        _at(ptrs[3, i], s, ty), _at(ptrs[4, i], s, ty), n, h, per[i, 0],
                        per[i, 1])


KINDS = {"sgd": 0, "adagrad": 1, "adadelta": 2, "rmsprop": 3, "adam": 4}


def optimizer_step(
    str kind,                      # IN  one of KINDS
    const int64_t[:, ::1] ptrs,    # IN  (5, n_tensors) addresses: P, G, S0, S1, S2 (0: absent)
    const int64_t[::1] ct,         # IN  chunk table (chunk_table)
    const int64_t[::1] cs,
    const int64_t[::1] cl,
    const double[:, ::1] per,      # IN  (n_tensors, 2) per-tensor scalars (see _step_chunks)
    const double[::1] h,           # IN  the group's hyperparameters (order: see each chunk fn)
    bint dbl,                      # IN  float64 (else float32) tensors
    int nthreads,
):
    """One update of every tensor of the plan (parameters and state in place)."""
    cdef int k = KINDS[kind]
    with nogil:
        if dbl:
            _step_chunks(k, ptrs, ct, cs, cl, per, &h[0], nthreads, <double*> NULL)
        else:
            _step_chunks(k, ptrs, ct, cs, cl, per, &h[0], nthreads, <float*> NULL)
