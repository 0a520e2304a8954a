# cython: language_level=3
"""What the recurrent kernels (lstm.pyx, gru.pyx, rnn.pyx) share.

* Fast gate nonlinearities: float32 uses a branch-free Cephes-style exp (rel. error < 2 ulp on
  [-87, 88], clamped outside) that the compiler vectorises; float64 uses libm, for accuracy.
* The blocked gate layout. The weights' G gate rows (LSTM G=4 i,f,g,o; GRU G=3 r,z,n) are
  permuted once per call so that hidden units come in blocks of BLOCK units and each block
  holds all G gates of its units::

      natural row  k*H + j              (gate k, unit j)
      blocked row  G*b*BLOCK + k*sz + u (j = b*BLOCK + u, sz = min(BLOCK, H - b*BLOCK))

  A contiguous range of hidden units [u0, u1) starting on a block boundary owns the contiguous
  gate rows [G*u0, G*u1). So a thread can compute the recurrent GEMM of its own gate rows and
  then, with no barrier, the pointwise pass of its own units: one barrier per time step. The
  layout does not depend on the number of threads (backward may use another count than
  forward). G=1 (the Elman RNN) is the natural layout.
* Work partitions: OpenMP thread p of nt owns the unit blocks [nb*p/nt, nb*(p+1)/nt).
* BLAS thread pinning without the GIL: the kernels call BLAS from inside OpenMP regions, where
  BLAS must run single-threaded (nesting BLAS threads in OpenMP threads is slower than either,
  FACTS.md). fastrnn/_cpu/_recurrent_threads.py finds each loaded BLAS library's
  set/get-num-threads functions (through threadpoolctl's library list) once; the kernels then
  pin and restore them in C, ~0.1 us per call instead of ~16 us for a reused
  ThreadpoolController.limit (that matters for the single-step call).
"""

from fastrnn._cpu._blas cimport floating, gemm

cdef extern from *:
    """
    #include <math.h>
    #include <stdint.h>
    #include <string.h>

    /* Branch-free expf: Cody-Waite reduction + Cephes polynomial; the clamps keep 2^n normal. */
    static inline float fr_expf(float x) {
        x = x < -87.0f ? -87.0f : x;
        x = x > 88.0f ? 88.0f : x;
        float t = x * 1.44269504088896341f + 12582912.0f;   /* round to nearest via 1.5*2^23 */
        float n = t - 12582912.0f;
        float r = x - n * 0.693359375f;
        r = r + n * 2.12194440e-4f;
        float p = 1.9875691500e-4f;
        p = p * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        float y = p * r * r + r + 1.0f;
        union { int32_t i; float f; } s;
        s.i = ((int32_t) n + 127) << 23;
        return y * s.f;
    }
    static inline float fr_sigmoidf(float x) { return 1.0f / (1.0f + fr_expf(-x)); }
    /* tanh x = 1 - 2 / (1 + e^{2x}): absolute error ~1e-7 near 0, exact limits at +-inf. */
    static inline float fr_tanhf(float x) { return 1.0f - 2.0f / (1.0f + fr_expf(2.0f * x)); }
    static inline double fr_sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
    static inline double fr_tanh(double x) { return tanh(x); }

    /* An orphaned barrier: binds to the innermost enclosing parallel region, a no-op outside. */
    static inline void fr_barrier(void) {
    #ifdef _OPENMP
    #pragma omp barrier
    #endif
    }

    /* BLAS thread pinning through the libraries' own set/get functions (registered once). */
    typedef void (*fr_blas_set_fn)(int);
    typedef int (*fr_blas_get_fn)(void);
    #define FR_MAX_BLAS 8
    static fr_blas_set_fn fr_blas_set[FR_MAX_BLAS];
    static fr_blas_get_fn fr_blas_get[FR_MAX_BLAS];
    static int fr_blas_count = 0;
    static void fr_blas_register(size_t set_addr, size_t get_addr) {
        if (fr_blas_count < FR_MAX_BLAS && set_addr && get_addr) {
            fr_blas_set[fr_blas_count] = (fr_blas_set_fn) set_addr;
            fr_blas_get[fr_blas_count] = (fr_blas_get_fn) get_addr;
            fr_blas_count++;
        }
    }
    /* saved must hold FR_MAX_BLAS ints; the caller's stack, so concurrent calls do not race
       on it (they may still race on the libraries' global setting: last restore wins). */
    static void fr_blas_pin(int n, int *saved) {
        for (int i = 0; i < fr_blas_count; i++) {
            saved[i] = fr_blas_get[i]();
            if (saved[i] != n) fr_blas_set[i](n);
        }
    }
    static void fr_blas_pin_one(int *saved) { fr_blas_pin(1, saved); }
    static void fr_blas_restore(const int *saved) {
        for (int i = 0; i < fr_blas_count; i++)
            if (fr_blas_get[i]() != saved[i]) fr_blas_set[i](saved[i]);
    }
    """
    float fr_expf(float x) noexcept nogil
    float fr_sigmoidf(float x) noexcept nogil
    float fr_tanhf(float x) noexcept nogil
    double fr_sigmoid(double x) noexcept nogil
    double fr_tanh(double x) noexcept nogil
    void fr_barrier() noexcept nogil
    int FR_MAX_BLAS
    int fr_blas_count
    void fr_blas_register(size_t set_addr, size_t get_addr) noexcept nogil
    void fr_blas_pin(int n, int* saved) noexcept nogil
    void fr_blas_pin_one(int* saved) noexcept nogil
    void fr_blas_restore(const int* saved) noexcept nogil

cdef extern from "<string.h>" nogil:
    void* memcpy(void* dst, const void* src, size_t n)
    void* memset(void* dst, int c, size_t n)

# Hidden units per block of the blocked gate layout: one AVX-512 vector of float32, so the
# pointwise loops over a block's units vectorise, and small H still splits over 2 threads.
cdef enum:
    BLOCK = 16


cdef inline floating sigmoid(floating x) noexcept nogil:
    if floating is float:
        return fr_sigmoidf(x)
    else:
        return fr_sigmoid(x)


cdef inline floating tanh_(floating x) noexcept nogil:
    if floating is float:
        return fr_tanhf(x)
    else:
        return fr_tanh(x)


cdef inline Py_ssize_t block_size(Py_ssize_t H, Py_ssize_t j0) noexcept nogil:
    """Units in the block starting at unit j0 (a multiple of BLOCK)."""
    return BLOCK if H - j0 > BLOCK else H - j0


cdef inline void unit_range(
    Py_ssize_t H, int nt, int p, Py_ssize_t* u0, Py_ssize_t* u1
) noexcept nogil:
    """Thread p of nt owns hidden units [u0, u1): whole blocks, split as evenly as possible."""
    cdef Py_ssize_t nb = (H + BLOCK - 1) // BLOCK
    u0[0] = min(H, (nb * p // nt) * BLOCK)
    u1[0] = min(H, (nb * (p + 1) // nt) * BLOCK)


cdef inline void split(Py_ssize_t n, int nt, int p, Py_ssize_t* r0, Py_ssize_t* r1) noexcept nogil:
    """Rows [r0, r1) of n for thread p of nt."""
    r0[0] = n * p // nt
    r1[0] = n * (p + 1) // nt


cdef inline Py_ssize_t natural_row(Py_ssize_t r, int G, Py_ssize_t H) noexcept nogil:
    """The natural gate row (k*H + j) of blocked row r."""
    cdef Py_ssize_t b = r // (G * BLOCK)
    cdef Py_ssize_t j0 = b * BLOCK
    cdef Py_ssize_t sz = block_size(H, j0)
    cdef Py_ssize_t w = r - G * j0
    cdef Py_ssize_t k = w // sz
    return k * H + j0 + (w - k * sz)


cdef inline void to_blocked(
    const floating* src,   # IN  (G*H, cols) natural gate rows
    floating* dst,         # OUT (G*H, cols) blocked gate rows; must not alias src
    int G, Py_ssize_t H, Py_ssize_t cols,
) noexcept nogil:
    cdef Py_ssize_t r
    for r in range(G * H):
        memcpy(dst + r * cols, src + natural_row(r, G, H) * cols, cols * sizeof(floating))


cdef inline void from_blocked(
    const floating* src,   # IN  (G*H, cols) blocked gate rows
    floating* dst,         # OUT (G*H, cols) natural gate rows; rows r0..r1 of src only
    int G, Py_ssize_t H, Py_ssize_t cols, Py_ssize_t r0, Py_ssize_t r1,
) noexcept nogil:
    cdef Py_ssize_t r
    for r in range(r0, r1):
        memcpy(dst + natural_row(r, G, H) * cols, src + r * cols, cols * sizeof(floating))


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


cdef inline void column_sums(
    const floating* a,   # IN  (rows, ld) row-major
    Py_ssize_t rows, Py_ssize_t ld, Py_ssize_t c0, Py_ssize_t c1,
    floating* out,       # OUT out[c] = sum over rows of a[:, c], c in [c0, c1)
) noexcept nogil:
    cdef Py_ssize_t r, c
    for c in range(c0, c1):
        out[c] = 0
    for r in range(rows):
        for c in range(c0, c1):
            out[c] += a[r * ld + c]


cdef inline void sequence_grads(
    int p, int nt, int G, Py_ssize_t TN, Py_ssize_t D, Py_ssize_t H,
    const floating* da_x,     # IN  (TN, G*H) blocked: gradient of the input pre-activations
    const floating* da_h,     # IN  (TN, G*H) blocked: gradient of the recurrent GEMM's output
    const floating* x,        # IN  (TN, D)
    const floating* hs,       # IN  (TN, H) the states each step's recurrent GEMM read
    const floating* w_ih_b,   # IN  (G*H, D) blocked
    floating* dx,             # OUT (TN, D)
    floating* dw_ih,          # OUT (G*H, D) natural
    floating* dw_hh,          # OUT (G*H, H) natural
    floating* db_x,           # OUT (G*H,) natural: column sums of da_x
    floating* db_h,           # OUT (G*H,) natural: column sums of da_h, or NULL
    floating* scratch,        # scratch (G*H, D + H + 2) when G > 1, unused when G == 1
) noexcept nogil:
    """The weight, bias and input gradients as whole-sequence GEMMs (LB5, GB5, RB4), thread p's
    share: rows of dx, gate rows of dw_ih, dw_hh and the biases. Single-threaded BLAS each."""
    cdef Py_ssize_t r0, r1, GH = G * H, c
    cdef floating* sw_ih
    cdef floating* sw_hh
    cdef floating* sb_x
    cdef floating* sb_h
    split(TN, nt, p, &r0, &r1)
    # dx = da_x @ W_ih (blocked rows of W_ih match da_x's blocked columns)
    mm(False, False, r1 - r0, D, GH, <floating> 1, da_x + r0 * GH, GH, w_ih_b, D,
       <floating> 0, dx + r0 * D, D)
    split(GH, nt, p, &r0, &r1)
    if G == 1:
        sw_ih, sw_hh, sb_x, sb_h = dw_ih, dw_hh, db_x, db_h
    else:
        sw_ih = scratch
        sw_hh = scratch + GH * D
        sb_x = scratch + GH * (D + H)
        sb_h = sb_x + GH
    # dW_ih = da_x^T @ x and dW_hh = da_h^T @ h_{t-1}, gate rows r0..r1
    mm(True, False, r1 - r0, D, TN, <floating> 1, da_x + r0, GH, x, D, <floating> 0,
       sw_ih + r0 * D, D)
    mm(True, False, r1 - r0, H, TN, <floating> 1, da_h + r0, GH, hs, H, <floating> 0,
       sw_hh + r0 * H, H)
    column_sums(da_x, TN, GH, r0, r1, sb_x)
    if db_h != NULL:
        column_sums(da_h, TN, GH, r0, r1, sb_h)
    if G > 1:
        from_blocked(sw_ih, dw_ih, G, H, D, r0, r1)
        from_blocked(sw_hh, dw_hh, G, H, H, r0, r1)
        for c in range(r0, r1):
            db_x[natural_row(c, G, H)] = sb_x[c]
            if db_h != NULL:
                db_h[natural_row(c, G, H)] = sb_h[c]
