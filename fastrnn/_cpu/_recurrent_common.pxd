# cython: language_level=3
"""What the recurrent engine (recurrent.pyx) and its measurement helper (_recurrent_bench.pyx)
share: the GEMM kernels of the time loop, the blocked gate layout, work partitions, BLAS pinning.

* The blocked gate layout. The weights' G gate rows (LSTM G=4 i,f,g,o; GRU G=3 r,z,n) are
  permuted once per call so that hidden units come in blocks of bs units and each block holds
  all G gates of its units::

      natural row  k*H + j              (gate k, unit j)
      blocked row  G*b*bs + k*sz + u    (j = b*bs + u, sz = min(bs, H - b*bs))

  A contiguous range of hidden units [u0, u1) starting on a block boundary owns the contiguous
  gate rows [G*u0, G*u1). So a thread can compute the recurrent GEMM of its own gate rows and
  then, with no barrier, the pointwise pass of its own units: one barrier per time step. The
  forward picks bs (recurrent.pyx, fill_plan: one block per thread, a multiple of BLOCK; H,
  the natural layout, on one thread) and the backward reads the same bs from the context, so
  it may run on another number of threads. G=1 (the Elman RNN) is the natural layout.
* Work partitions: OpenMP thread p of nt owns the unit blocks [nb*p/nt, nb*(p+1)/nt).
* BLAS thread pinning without the GIL: the kernels call BLAS from inside OpenMP regions, where
  BLAS must run single-threaded (nesting BLAS threads in OpenMP threads is slower than either).
  fastrnn/_cpu/_recurrent_threads.py finds each loaded BLAS library's set/get-num-threads
  functions (through threadpoolctl's library list) once; the kernels then pin and restore them
  in C, ~0.1 us per call instead of ~16 us for a reused ThreadpoolController.limit.
"""

from fastrnn._cpu._blas cimport floating, gemm

cdef extern from *:
    """
    #include <math.h>
    #include <stdint.h>
    #include <string.h>
    #if defined(__x86_64__)
    #include <immintrin.h>
    #endif

    /* An orphaned barrier: binds to the innermost enclosing parallel region, a no-op outside. */
    static inline void fr_barrier(void) {
    #ifdef _OPENMP
    #pragma omp barrier
    #endif
    }

    """
    void fr_barrier() noexcept nogil

# BLAS thread pinning: one process-wide counter shared by every kernel module
# (fastrnn/_cpu/_process.pyx), so concurrent calls restore the user's settings exactly once.
# ``saved`` is kept for the callers' signature; the state lives in _process.
from fastrnn._cpu._process cimport blas_pin, blas_register, blas_unpin


cdef inline void fr_blas_register(size_t set_addr, size_t get_addr) noexcept nogil:
    blas_register(set_addr, get_addr)


cdef inline void fr_blas_pin(int n, int* saved) noexcept nogil:
    blas_pin(n)


cdef inline void fr_blas_pin_one(int* saved) noexcept nogil:
    blas_pin(1)


cdef inline void fr_blas_restore(const int* saved) noexcept nogil:
    blas_unpin()


# The per-step GEMMs of small batches without BLAS: OpenBLAS re-packs the weight matrix on every
# call; these kernels read the weights in place (register tiles of C, one k at a time), and the
# panel kernel reads them from panels packed once per call. AVX-512 or AVX2 (``isa`` 2 or 1,
# at most fr_small_gemm_isa, checked at run time); without either, and for float64, BLAS runs
# the step. Measured: benchmarks/NOTES-cpu.md ("Per-step GEMMs", "AVX2").
cdef extern from "_small_gemm.h":
    int fr_small_gemm_isa
    void fr_small_gemm_init() noexcept nogil
    void fr_small_sgemm(int isa, Py_ssize_t M, Py_ssize_t n, Py_ssize_t K, const float* A,
                        Py_ssize_t lda, const float* B, Py_ssize_t ldb, float beta,
                        float* C, Py_ssize_t ldc) noexcept nogil
    void fr_sgemm(int isa, Py_ssize_t M, Py_ssize_t n, Py_ssize_t K, const float* A,
                  Py_ssize_t ars, Py_ssize_t aks, const float* B, Py_ssize_t ldb,
                  float beta, float* C, Py_ssize_t ldc, Py_ssize_t chunk) noexcept nogil
    void fr_panel_sgemm(int isa, Py_ssize_t M, Py_ssize_t np_, Py_ssize_t K, const float* A,
                        Py_ssize_t lda, const float* P, float beta, float* C,
                        Py_ssize_t ldc) noexcept nogil
    void fr_pack_panels(Py_ssize_t K, Py_ssize_t np_, const float* B, Py_ssize_t ldb,
                        float* P) noexcept nogil
    void fr_seq_sgemm(int isa, Py_ssize_t M, Py_ssize_t n, Py_ssize_t K, const float* A,
                      Py_ssize_t ars, Py_ssize_t aks, const float* B, Py_ssize_t ldb,
                      const float* P, float* C, Py_ssize_t ldc) noexcept nogil
    int fr_seq_fits(int isa, Py_ssize_t rows, Py_ssize_t n) noexcept nogil
    int fr_seq_fits_dw(int isa, Py_ssize_t rows, Py_ssize_t n) noexcept nogil
    void fr_panel_sgemm_rows(int isa, Py_ssize_t M, Py_ssize_t np_, Py_ssize_t K,
                             const float* A, Py_ssize_t lda, const float* P, const float* init,
                             const long long* tok, Py_ssize_t ldi, float* C,
                             Py_ssize_t ldc) noexcept nogil

# The batch size up to which the per-step GEMMs use fr_small_sgemm instead of BLAS
# (larger batches stream the weights from L2 once per row tile; NOTES-cpu.md).
cdef enum:
    SMALL_GEMM_MAX_ROWS = 32


cdef inline void step_mm(
    int isa, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const floating* a, Py_ssize_t lda,
    const floating* b, Py_ssize_t ldb, floating beta, floating* c, Py_ssize_t ldc,
) noexcept nogil:
    """Row-major C = A @ B + beta C for one time step: the small-batch kernel of level ``isa``
    (0: none) when it applies, else BLAS."""
    if floating is float:
        if isa > 0 and m <= SMALL_GEMM_MAX_ROWS and n > 0 and m > 0:
            fr_small_sgemm(isa, m, n, k, a, lda, b, ldb, beta, c, ldc)
            return
    mm(False, False, m, n, k, <floating> 1, a, lda, b, ldb, beta, c, ldc)


# Batches of 4 rows or more, sequences of 4+ steps: the per-step GEMMs read the recurrent weights
# from panels packed once per call (fr_pack_panels), contiguous K x 32 blocks that stay in L1
# (NOTES-cpu.md).
cdef inline bint use_panels(int isa, Py_ssize_t m, Py_ssize_t T) noexcept nogil:
    return isa > 0 and m >= 4 and T >= 4


cdef inline void pack_panels(
    Py_ssize_t k, Py_ssize_t n, const float* b, Py_ssize_t ldb, float* panels
) noexcept nogil:
    """The full 32-column panels of the (k, n) matrix b (leading dimension ldb)."""
    fr_pack_panels(k, n // 32, b, ldb, panels)


cdef inline void panel_mm(
    int isa, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const float* a, Py_ssize_t lda,
    const float* b, Py_ssize_t ldb, const float* panels, float beta, float* c, Py_ssize_t ldc,
) noexcept nogil:
    """C = A @ B + beta C with B's full 32-column panels read from ``panels`` (pack_panels);
    the last n % 32 columns from b itself (kernels of level ``isa`` >= 1)."""
    cdef Py_ssize_t nf = (n // 32) * 32
    if nf > 0 and m > 0:
        fr_panel_sgemm(isa, m, n // 32, k, a, lda, panels, beta, c, ldc)
    if n > nf:
        step_mm(isa, m, n - nf, k, a, lda, b + nf, ldb, beta, c + nf, ldc)


cdef extern from "<string.h>" nogil:
    void* memcpy(void* dst, const void* src, size_t n)
    void* memset(void* dst, int c, size_t n)

# The blocked gate layout's unit blocks are a multiple of this: one AVX-512 vector of float32,
# so the pointwise loops over a block's units vectorise, and small H still splits over 2
# threads.
cdef enum:
    BLOCK = 16


cdef inline Py_ssize_t block_size(Py_ssize_t bs, Py_ssize_t H, Py_ssize_t j0) noexcept nogil:
    """Units in the block of bs units starting at unit j0 (a multiple of bs)."""
    return bs if H - j0 > bs else H - j0


cdef inline void unit_range(
    Py_ssize_t H, Py_ssize_t bs, int nt, int p, Py_ssize_t* u0, Py_ssize_t* u1
) noexcept nogil:
    """Thread p of nt owns hidden units [u0, u1): whole blocks of bs units, split as evenly as
    possible."""
    cdef Py_ssize_t nb = (H + bs - 1) // bs
    u0[0] = min(H, (nb * p // nt) * bs)
    u1[0] = min(H, (nb * (p + 1) // nt) * bs)


cdef inline void split(Py_ssize_t n, int nt, int p, Py_ssize_t* r0, Py_ssize_t* r1) noexcept nogil:
    """Rows [r0, r1) of n for thread p of nt."""
    r0[0] = n * p // nt
    r1[0] = n * (p + 1) // nt


cdef inline Py_ssize_t natural_row(Py_ssize_t r, int G, Py_ssize_t H, Py_ssize_t bs) noexcept nogil:
    """The natural gate row (k*H + j) of blocked row r."""
    cdef Py_ssize_t b = r // (G * bs)
    cdef Py_ssize_t j0 = b * bs
    cdef Py_ssize_t sz = block_size(bs, H, j0)
    cdef Py_ssize_t w = r - G * j0
    cdef Py_ssize_t k = w // sz
    return k * H + j0 + (w - k * sz)


cdef inline void to_blocked(
    const floating* src,   # IN  (G*H, cols) natural gate rows
    floating* dst,         # OUT (G*H, cols) blocked gate rows; must not alias src
    int G, Py_ssize_t H, Py_ssize_t cols, Py_ssize_t bs,
) noexcept nogil:
    cdef Py_ssize_t r
    for r in range(G * H):
        memcpy(dst + r * cols, src + natural_row(r, G, H, bs) * cols, cols * sizeof(floating))


cdef inline void from_blocked(
    const floating* src,   # IN  (G*H, cols) blocked gate rows
    floating* dst,         # OUT (G*H, cols) natural gate rows; rows r0..r1 of src only
    int G, Py_ssize_t H, Py_ssize_t cols, Py_ssize_t bs, Py_ssize_t r0, Py_ssize_t r1,
) noexcept nogil:
    cdef Py_ssize_t r
    for r in range(r0, r1):
        memcpy(dst + natural_row(r, G, H, bs) * cols, src + r * cols, cols * sizeof(floating))


cdef inline void mm(
    bint trans_a, bint trans_b, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, floating alpha,
    const floating* a, Py_ssize_t lda, const floating* b, Py_ssize_t ldb, floating beta,
    floating* c, Py_ssize_t ldc,
) noexcept nogil:
    """Row-major C = alpha op(A) op(B) + beta C that also accepts empty sizes (k = 0 scales C by
    beta, as the math says; BLAS itself rejects leading dimensions of 0)."""
    cdef Py_ssize_t i, j
    if m <= 0 or n <= 0:
        return
    if k <= 0:
        for i in range(m):
            for j in range(n):
                c[i * ldc + j] = 0 if beta == 0 else beta * c[i * ldc + j]
        return
    gemm(trans_a, trans_b, <int> m, <int> n, <int> k, alpha, a, <int> max(lda, 1), b,
         <int> max(ldb, 1), beta, c, <int> max(ldc, 1))


cdef inline void transpose_rows(
    const floating* w,   # IN  (rows, cols) row-major
    Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t r0, Py_ssize_t r1,
    floating* wt,        # OUT (cols, rows) row-major: wt[k, r] = w[r, k] for r in [r0, r1)
) noexcept nogil:
    """Rows r0..r1 of w into columns r0..r1 of wt, in 32 x 32 tiles."""
    cdef Py_ssize_t ra, ka, r, k, re, ke
    for ra in range(r0, r1, 32):
        re = min(ra + 32, r1)
        for ka in range(0, cols, 32):
            ke = min(ka + 32, cols)
            for k in range(ka, ke):
                for r in range(ra, re):
                    wt[k * rows + r] = w[r * cols + k]
