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

    """
    float fr_expf(float x) noexcept nogil
    float fr_sigmoidf(float x) noexcept nogil
    float fr_tanhf(float x) noexcept nogil
    double fr_sigmoid(double x) noexcept nogil
    double fr_tanh(double x) noexcept nogil
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


# The float32 pointwise passes in C: restrict-qualified, so they vectorise without alias checks,
# and compiled for AVX-512, AVX2+FMA and baseline x86-64 with run-time dispatch (GCC
# target_clones), since wheels are built for baseline x86-64. The float64 passes stay in Cython
# (libm accuracy matters more there than speed). One call handles one sequence n and the units
# [u0, u1) of one thread; pointers point at row n. Same math as the Cython passes in lstm.pyx /
# gru.pyx, whose comments cite the reference's steps.
cdef extern from *:
    """
    #if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) \
        && defined(__linux__)
    #define FR_CLONES __attribute__((unused, \
        target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
    #elif defined(__GNUC__)
    #define FR_CLONES __attribute__((unused))
    #else
    #define FR_CLONES
    #endif

    /* LSTM L3-L4; gt: (4H) blocked pre-activations in, activations out. */
    FR_CLONES static void fr_lstm_fwd_row_f(
        float *restrict gt, const float *restrict bias, const float *restrict cp,
        float *restrict cn, float *restrict hn, float *restrict yt, Py_ssize_t H, Py_ssize_t bs,
        Py_ssize_t u0, Py_ssize_t u1)
    {
        for (Py_ssize_t j0 = u0; j0 < u1; j0 += bs) {
            Py_ssize_t sz = H - j0 < bs ? H - j0 : bs;
            float *restrict a = gt + 4 * j0;
            const float *restrict bb = bias + 4 * j0;
            for (Py_ssize_t u = 0; u < sz; u++) {
                Py_ssize_t j = j0 + u;
                float i = fr_sigmoidf(a[u] + bb[u]);
                float f = fr_sigmoidf(a[sz + u] + bb[sz + u]);
                float g = fr_tanhf(a[2 * sz + u] + bb[2 * sz + u]);
                float o = fr_sigmoidf(a[3 * sz + u] + bb[3 * sz + u]);
                a[u] = i; a[sz + u] = f; a[2 * sz + u] = g; a[3 * sz + u] = o;
                float c = f * cp[j] + i * g;
                float h = o * fr_tanhf(c);
                cn[j] = c; hn[j] = h; yt[j] = h;
            }
        }
    }

    /* LSTM LB1-LB4; dh keeps only what the GEMM does not add (0 here). */
    FR_CLONES static void fr_lstm_bwd_row_f(
        const float *restrict at, const float *restrict cp, const float *restrict cn,
        const float *restrict dyt, float *restrict dh, float *restrict dc,
        float *restrict dat, Py_ssize_t H, Py_ssize_t bs, Py_ssize_t u0, Py_ssize_t u1)
    {
        for (Py_ssize_t j0 = u0; j0 < u1; j0 += bs) {
            Py_ssize_t sz = H - j0 < bs ? H - j0 : bs;
            const float *restrict a = at + 4 * j0;
            float *restrict d = dat + 4 * j0;
            for (Py_ssize_t u = 0; u < sz; u++) {
                Py_ssize_t j = j0 + u;
                float i = a[u], f = a[sz + u], g = a[2 * sz + u], o = a[3 * sz + u];
                float dhs = dyt[j] + dh[j];
                float tc = fr_tanhf(cn[j]);
                float dout = dhs * tc;
                float dct = dc[j] + dhs * o * (1.0f - tc * tc);
                d[u] = dct * g * i * (1.0f - i);
                d[sz + u] = dct * cp[j] * f * (1.0f - f);
                d[2 * sz + u] = dct * i * (1.0f - g * g);
                d[3 * sz + u] = dout * o * (1.0f - o);
                dc[j] = dct * f;
                dh[j] = 0.0f;
            }
        }
    }

    /* GRU G3-G4; st: (4H) blocked r, z, n, hn out, or NULL. */
    FR_CLONES static void fr_gru_fwd_row_f(
        const float *restrict xt, const float *restrict hw, const float *restrict b_ih,
        const float *restrict b_hh, const float *restrict hp, float *restrict hn,
        float *restrict yt, float *restrict st, Py_ssize_t H, Py_ssize_t bs, Py_ssize_t u0,
        Py_ssize_t u1)
    {
        for (Py_ssize_t j0 = u0; j0 < u1; j0 += bs) {
            Py_ssize_t sz = H - j0 < bs ? H - j0 : bs;
            const float *restrict xa = xt + 3 * j0;
            const float *restrict ha = hw + 3 * j0;
            const float *restrict bi = b_ih + 3 * j0;
            const float *restrict bh = b_hh + 3 * j0;
            float *restrict sa = st ? st + 4 * j0 : NULL;
            for (Py_ssize_t u = 0; u < sz; u++) {
                Py_ssize_t j = j0 + u;
                float r = fr_sigmoidf(xa[u] + bi[u] + ha[u] + bh[u]);
                float z = fr_sigmoidf(xa[sz + u] + bi[sz + u] + ha[sz + u] + bh[sz + u]);
                float hh = ha[2 * sz + u] + bh[2 * sz + u];
                float nn = fr_tanhf(xa[2 * sz + u] + bi[2 * sz + u] + r * hh);
                float h = (1.0f - z) * nn + z * hp[j];
                hn[j] = h; yt[j] = h;
                if (sa) {
                    sa[u] = r; sa[sz + u] = z; sa[2 * sz + u] = nn; sa[3 * sz + u] = hh;
                }
            }
        }
    }

    /* GRU GB1-GB4; dh keeps the direct path z * dh_step (the GEMM adds da_h W_hh). */
    FR_CLONES static void fr_gru_bwd_row_f(
        const float *restrict st, const float *restrict hp, const float *restrict dyt,
        float *restrict dh, float *restrict dxt, float *restrict dht, Py_ssize_t H, Py_ssize_t bs,
        Py_ssize_t u0, Py_ssize_t u1)
    {
        for (Py_ssize_t j0 = u0; j0 < u1; j0 += bs) {
            Py_ssize_t sz = H - j0 < bs ? H - j0 : bs;
            const float *restrict sa = st + 4 * j0;
            float *restrict dxa = dxt + 3 * j0;
            float *restrict dha = dht + 3 * j0;
            for (Py_ssize_t u = 0; u < sz; u++) {
                Py_ssize_t j = j0 + u;
                float r = sa[u], z = sa[sz + u], nn = sa[2 * sz + u], hh = sa[3 * sz + u];
                float dhs = dyt[j] + dh[j];
                float dn = dhs * (1.0f - z);
                float dz = dhs * (hp[j] - nn);
                float dan = dn * (1.0f - nn * nn);
                float dar = dan * hh * r * (1.0f - r);
                float daz = dz * z * (1.0f - z);
                dxa[u] = dar; dxa[sz + u] = daz; dxa[2 * sz + u] = dan;
                dha[u] = dar; dha[sz + u] = daz; dha[2 * sz + u] = dan * r;
                dh[j] = dhs * z;
            }
        }
    }

    /* Elman RNN R3 (tanh) on units [u0, u1) of one row. */
    FR_CLONES static void fr_rnn_tanh_row_f(
        const float *restrict at, const float *restrict b, float *restrict hn,
        float *restrict yt, Py_ssize_t u0, Py_ssize_t u1)
    {
        for (Py_ssize_t j = u0; j < u1; j++) {
            float h = fr_tanhf(at[j] + b[j]);
            hn[j] = h; yt[j] = h;
        }
    }
    """
    void fr_lstm_fwd_row_f(float* gt, const float* bias, const float* cp, float* cn, float* hn,
                           float* yt, Py_ssize_t H, Py_ssize_t bs, Py_ssize_t u0,
                           Py_ssize_t u1) noexcept nogil
    void fr_lstm_bwd_row_f(const float* at, const float* cp, const float* cn, const float* dyt,
                           float* dh, float* dc, float* dat, Py_ssize_t H, Py_ssize_t bs,
                           Py_ssize_t u0, Py_ssize_t u1) noexcept nogil
    void fr_gru_fwd_row_f(const float* xt, const float* hw, const float* b_ih,
                          const float* b_hh, const float* hp, float* hn, float* yt, float* st,
                          Py_ssize_t H, Py_ssize_t bs, Py_ssize_t u0, Py_ssize_t u1) noexcept nogil
    void fr_gru_bwd_row_f(const float* st, const float* hp, const float* dyt, float* dh,
                          float* dxt, float* dht, Py_ssize_t H, Py_ssize_t bs, Py_ssize_t u0,
                          Py_ssize_t u1) noexcept nogil
    void fr_rnn_tanh_row_f(const float* at, const float* b, float* hn, float* yt, Py_ssize_t u0,
                           Py_ssize_t u1) noexcept nogil

# The per-step GEMMs of small batches without BLAS: OpenBLAS re-packs the weight matrix on every
# call, which measured 32% of an LSTM (T,N,D,H)=(100,16,256,256) forward+backward on one thread
# (perf: sgemm_itcopy), as much as half of each step's GEMM. This kernel reads the weights in
# place (8 rows x 32 columns of C in 16 AVX-512 registers, one k at a time), so nothing is packed.
# Only with AVX-512 (checked at run time); otherwise, and for float64, BLAS runs the step.
cdef extern from *:
    """
    #if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__)
    #define FR_HAVE_SMALL_GEMM 1
    typedef float fr_v16 __attribute__((vector_size(64)));
    typedef float fr_v16u __attribute__((vector_size(64), aligned(4)));

    #define FR_ROW_UPDATE(cp, acc)                                        \
        do {                                                              \
            fr_v16u *q_ = (fr_v16u *)(cp);                                \
            *q_ = beta == 0.0f ? (acc) : (acc) + beta * *q_;              \
        } while (0)

    /* C (M x n) = A (M x K) @ B (K x n) + beta C, all row-major with leading dimensions. */
    __attribute__((target("avx512f,fma"))) static void fr_small_sgemm_avx512(
        Py_ssize_t M, Py_ssize_t n, Py_ssize_t K, const float *A, Py_ssize_t lda,
        const float *B, Py_ssize_t ldb, float beta, float *C, Py_ssize_t ldc)
    {
        Py_ssize_t j = 0;
        for (; j + 32 <= n; j += 32) {
            Py_ssize_t i = 0;
            /* 8 rows at a time, 16 accumulators: each B row is loaded once per 8 rows; k in
               chunks of 256 so a 32-column chunk of B (32 KB) stays in L1 across the rows. */
            Py_ssize_t M8 = M - M % 8;
            for (Py_ssize_t k0 = 0; k0 < K && M8 > 0; k0 += 256) {
                Py_ssize_t k1 = K - k0 < 256 ? K : k0 + 256;
                for (i = 0; i < M8; i += 8) {
                    fr_v16 c[8][2];
                    #pragma GCC unroll 8
                    for (int r = 0; r < 8; r++) {
                        if (k0 == 0) {
                            c[r][0] = (fr_v16){0}; c[r][1] = (fr_v16){0};
                        } else {
                            c[r][0] = *(const fr_v16u *)(C + (i + r) * ldc + j);
                            c[r][1] = *(const fr_v16u *)(C + (i + r) * ldc + j + 16);
                        }
                    }
                    const float *a = A + i * lda;
                    const float *b = B + k0 * ldb + j;
                    for (Py_ssize_t k = k0; k < k1; k++, b += ldb) {
                        fr_v16 b0 = *(const fr_v16u *)b, b1 = *(const fr_v16u *)(b + 16);
                        #pragma GCC unroll 8
                        for (int r = 0; r < 8; r++) {
                            float ar = a[r * lda + k];
                            c[r][0] += b0 * ar;
                            c[r][1] += b1 * ar;
                        }
                    }
                    #pragma GCC unroll 8
                    for (int r = 0; r < 8; r++) {
                        if (k0 == 0) {
                            FR_ROW_UPDATE(C + (i + r) * ldc + j, c[r][0]);
                            FR_ROW_UPDATE(C + (i + r) * ldc + j + 16, c[r][1]);
                        } else {
                            *(fr_v16u *)(C + (i + r) * ldc + j) = c[r][0];
                            *(fr_v16u *)(C + (i + r) * ldc + j + 16) = c[r][1];
                        }
                    }
                }
            }
            i = M8;
            for (; i + 4 <= M; i += 4) {
                fr_v16 c00 = {0}, c01 = {0}, c10 = {0}, c11 = {0};
                fr_v16 c20 = {0}, c21 = {0}, c30 = {0}, c31 = {0};
                const float *a0 = A + i * lda, *a1 = a0 + lda, *a2 = a1 + lda, *a3 = a2 + lda;
                const float *b = B + j;
                for (Py_ssize_t k = 0; k < K; k++, b += ldb) {
                    fr_v16 b0 = *(const fr_v16u *)b, b1 = *(const fr_v16u *)(b + 16);
                    c00 += b0 * a0[k]; c01 += b1 * a0[k];
                    c10 += b0 * a1[k]; c11 += b1 * a1[k];
                    c20 += b0 * a2[k]; c21 += b1 * a2[k];
                    c30 += b0 * a3[k]; c31 += b1 * a3[k];
                }
                float *c = C + i * ldc + j;
                FR_ROW_UPDATE(c, c00); FR_ROW_UPDATE(c + 16, c01); c += ldc;
                FR_ROW_UPDATE(c, c10); FR_ROW_UPDATE(c + 16, c11); c += ldc;
                FR_ROW_UPDATE(c, c20); FR_ROW_UPDATE(c + 16, c21); c += ldc;
                FR_ROW_UPDATE(c, c30); FR_ROW_UPDATE(c + 16, c31);
            }
            for (; i < M; i++) {
                fr_v16 c0 = {0}, c1 = {0};
                const float *a0 = A + i * lda, *b = B + j;
                for (Py_ssize_t k = 0; k < K; k++, b += ldb) {
                    c0 += *(const fr_v16u *)b * a0[k];
                    c1 += *(const fr_v16u *)(b + 16) * a0[k];
                }
                FR_ROW_UPDATE(C + i * ldc + j, c0); FR_ROW_UPDATE(C + i * ldc + j + 16, c1);
            }
        }
        for (; j + 16 <= n; j += 16) {
            for (Py_ssize_t i = 0; i < M; i++) {
                fr_v16 c0 = {0};
                const float *a0 = A + i * lda, *b = B + j;
                for (Py_ssize_t k = 0; k < K; k++, b += ldb) c0 += *(const fr_v16u *)b * a0[k];
                FR_ROW_UPDATE(C + i * ldc + j, c0);
            }
        }
        for (; j < n; j++) {
            for (Py_ssize_t i = 0; i < M; i++) {
                float acc = 0.0f;
                for (Py_ssize_t k = 0; k < K; k++) acc += A[i * lda + k] * B[k * ldb + j];
                float *c = C + i * ldc + j;
                *c = beta == 0.0f ? acc : acc + beta * *c;
            }
        }
    }

    /* R rows x 32 columns of C over k in [k0, k1), B packed as rows of 32 (a panel). */
    static inline __attribute__((always_inline, target("avx512f,fma"))) void fr_panel_tile(
        int R, Py_ssize_t k0, Py_ssize_t k1, const float *a, Py_ssize_t lda, const float *b,
        int first, float beta, float *C, Py_ssize_t ldc)
    {
        fr_v16 c[8][2];
        #pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            if (first) {
                c[r][0] = (fr_v16){0}; c[r][1] = (fr_v16){0};
            } else {
                c[r][0] = *(const fr_v16u *)(C + r * ldc);
                c[r][1] = *(const fr_v16u *)(C + r * ldc + 16);
            }
        }
        b += k0 * 32;
        for (Py_ssize_t k = k0; k < k1; k++, b += 32) {
            fr_v16 b0 = *(const fr_v16u *)b, b1 = *(const fr_v16u *)(b + 16);
            #pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                float ar = a[r * lda + k];
                c[r][0] += b0 * ar;
                c[r][1] += b1 * ar;
            }
        }
        #pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            if (first) {
                FR_ROW_UPDATE(C + r * ldc, c[r][0]);
                FR_ROW_UPDATE(C + r * ldc + 16, c[r][1]);
            } else {
                *(fr_v16u *)(C + r * ldc) = c[r][0];
                *(fr_v16u *)(C + r * ldc + 16) = c[r][1];
            }
        }
    }

    /* C (M x 32 np) = A (M x K) @ B + beta C, B given as np packed panels (K x 32 each,
       contiguous: fr_pack_panels). k in chunks of 128, so a panel chunk (16 KB, contiguous: no
       cache-set conflicts of a large row stride) stays in L1 across all M rows. */
    __attribute__((target("avx512f,fma"))) static void fr_panel_sgemm_avx512(
        Py_ssize_t M, Py_ssize_t np_, Py_ssize_t K, const float *A, Py_ssize_t lda,
        const float *P, float beta, float *C, Py_ssize_t ldc)
    {
        for (Py_ssize_t p = 0; p < np_; p++) {
            const float *b = P + p * K * 32;
            float *Cp = C + p * 32;
            for (Py_ssize_t k0 = 0; k0 < K; k0 += 128) {
                Py_ssize_t k1 = K - k0 < 128 ? K : k0 + 128;
                int first = k0 == 0;
                Py_ssize_t i = 0;
                for (; i + 8 <= M; i += 8)
                    fr_panel_tile(8, k0, k1, A + i * lda, lda, b, first, beta, Cp + i * ldc, ldc);
                for (; i + 4 <= M; i += 4)
                    fr_panel_tile(4, k0, k1, A + i * lda, lda, b, first, beta, Cp + i * ldc, ldc);
                for (; i < M; i++)
                    fr_panel_tile(1, k0, k1, A + i * lda, lda, b, first, beta, Cp + i * ldc, ldc);
            }
        }
    }
    static int fr_small_gemm_ok = 0;
    static void fr_small_gemm_init(void) {
        __builtin_cpu_init();
        fr_small_gemm_ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
    }
    #else
    #define FR_HAVE_SMALL_GEMM 0
    static int fr_small_gemm_ok = 0;
    static void fr_small_gemm_init(void) {}
    static void fr_small_sgemm_avx512(
        Py_ssize_t M, Py_ssize_t n, Py_ssize_t K, const float *A, Py_ssize_t lda,
        const float *B, Py_ssize_t ldb, float beta, float *C, Py_ssize_t ldc) {}
    static void fr_panel_sgemm_avx512(
        Py_ssize_t M, Py_ssize_t np_, Py_ssize_t K, const float *A, Py_ssize_t lda,
        const float *P, float beta, float *C, Py_ssize_t ldc) {}
    #endif

    /* Columns [0, 32 np) of B (K rows, leading dimension ldb) as np panels of K x 32. */
    static void fr_pack_panels(Py_ssize_t K, Py_ssize_t np_, const float *B, Py_ssize_t ldb,
                               float *P) {
        for (Py_ssize_t p = 0; p < np_; p++)
            for (Py_ssize_t k = 0; k < K; k++)
                memcpy(P + (p * K + k) * 32, B + k * ldb + p * 32, 32 * sizeof(float));
    }
    """
    int fr_small_gemm_ok
    void fr_small_gemm_init() noexcept nogil
    void fr_small_sgemm_avx512(Py_ssize_t M, Py_ssize_t n, Py_ssize_t K, const float* A,
                               Py_ssize_t lda, const float* B, Py_ssize_t ldb, float beta,
                               float* C, Py_ssize_t ldc) noexcept nogil
    void fr_panel_sgemm_avx512(Py_ssize_t M, Py_ssize_t np_, Py_ssize_t K, const float* A,
                               Py_ssize_t lda, const float* P, float beta, float* C,
                               Py_ssize_t ldc) noexcept nogil
    void fr_pack_panels(Py_ssize_t K, Py_ssize_t np_, const float* B, Py_ssize_t ldb,
                        float* P) noexcept nogil

# The batch size up to which the per-step GEMMs use fr_small_sgemm_avx512 instead of BLAS. On
# one thread, fwd+bwd, BLAS -> this kernel: LSTM (T,N,D,H)=(100,16,256,256) 61.7 -> 33.6 ms, GRU
# 45.9 -> 27.7, RNN 13.4 -> 8.2, LSTM (200,32,64,64) 14.9 -> 11.8 (torch.nn.LSTM: 40.9 and
# 15.5). Allowing 64 rows made (100,64,512,512) slower (LSTM 605 -> 749 ms: the weights stream
# from L2 once per 8 rows), so larger batches stay with BLAS here. The recurrent kernels now
# use the packed-panel kernel below (use_panels) for batches of 4+ rows of sequences; this one
# remains for short sequences and the dispatch's fallback.
cdef enum:
    SMALL_GEMM_MAX_ROWS = 32


cdef inline void step_mm(
    Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const floating* a, Py_ssize_t lda,
    const floating* b, Py_ssize_t ldb, floating beta, floating* c, Py_ssize_t ldc,
) noexcept nogil:
    """Row-major C = A @ B + beta C for one time step: the small-batch kernel when it applies,
    else BLAS."""
    if floating is float:
        if fr_small_gemm_ok and m <= SMALL_GEMM_MAX_ROWS and n > 0 and m > 0:
            fr_small_sgemm_avx512(m, n, k, a, lda, b, ldb, beta, c, ldc)
            return
    mm(False, False, m, n, k, <floating> 1, a, lda, b, ldb, beta, c, ldc)


# Batches of 4 rows or more: the per-step GEMMs of a sequence (T >= 4) read the recurrent
# weights from panels packed once per call (fr_pack_panels). Above SMALL_GEMM_MAX_ROWS this
# replaces OpenBLAS, which re-packed them on every step (perf: sgemm_itcopy ~10% of a
# (100,64,512,512) LSTM fwd+bwd; 2 threads 373-390 -> 311-324 ms); below, it replaces
# fr_small_sgemm_avx512's in-place reads of W^T, whose rows lie G*H*4 bytes apart (4 KB at
# H=256: the same L1 sets), e.g. LSTM (100,16,256,256) 26.6/24.9 -> 25.9/24.4 ms and
# (200,32,64,64) 12.3/10.9 -> 11.6/10.9 ms (two alternating runs, medians, 2 threads).
cdef inline bint use_panels(Py_ssize_t m, Py_ssize_t T) noexcept nogil:
    return fr_small_gemm_ok != 0 and m >= 4 and T >= 4


cdef inline void pack_panels(
    Py_ssize_t k, Py_ssize_t n, const float* b, Py_ssize_t ldb, float* panels
) noexcept nogil:
    """The full 32-column panels of the (k, n) matrix b (leading dimension ldb)."""
    fr_pack_panels(k, n // 32, b, ldb, panels)


cdef inline void panel_mm(
    Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const float* a, Py_ssize_t lda,
    const float* b, Py_ssize_t ldb, const float* panels, float beta, float* c, Py_ssize_t ldc,
) noexcept nogil:
    """C = A @ B + beta C with B's full 32-column panels read from ``panels`` (pack_panels);
    the last n % 32 columns from b itself."""
    cdef Py_ssize_t nf = (n // 32) * 32
    if nf > 0 and m > 0:
        fr_panel_sgemm_avx512(m, n // 32, k, a, lda, panels, beta, c, ldc)
    if n > nf:
        step_mm(m, n - nf, k, a, lda, b + nf, ldb, beta, c + nf, ldc)


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
    int p, int nt, int G, Py_ssize_t TN, Py_ssize_t D, Py_ssize_t H, Py_ssize_t bs,
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
    floating* scratch,        # scratch (G*H, D + H + 2) for a blocked layout, else unused
) noexcept nogil:
    """The weight, bias and input gradients as whole-sequence GEMMs (LB5, GB5, RB4), thread p's
    share: rows of dx, gate rows of dw_ih, dw_hh and the biases. Single-threaded BLAS each."""
    cdef Py_ssize_t r0, r1, GH = G * H, c
    cdef floating* sw_ih
    cdef floating* sw_hh
    cdef floating* sb_x
    cdef floating* sb_h
    cdef bint natural = G == 1 or bs >= H
    split(TN, nt, p, &r0, &r1)
    # dx = da_x @ W_ih (blocked rows of W_ih match da_x's blocked columns)
    mm(False, False, r1 - r0, D, GH, <floating> 1, da_x + r0 * GH, GH, w_ih_b, D,
       <floating> 0, dx + r0 * D, D)
    split(GH, nt, p, &r0, &r1)
    if natural:
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
    if not natural:
        from_blocked(sw_ih, dw_ih, G, H, D, bs, r0, r1)
        from_blocked(sw_hh, dw_hh, G, H, H, bs, r0, r1)
        for c in range(r0, r1):
            db_x[natural_row(c, G, H, bs)] = sb_x[c]
            if db_h != NULL:
                db_h[natural_row(c, G, H, bs)] = sb_h[c]


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


cdef inline void step_gemm(
    bint use_t, Py_ssize_t N, Py_ssize_t H, Py_ssize_t GH, Py_ssize_t r0, Py_ssize_t r1,
    const floating* h,     # IN  (N, H)
    const floating* w,     # IN  (GH, H) the recurrent weights (blocked gate rows)
    const floating* wt,    # IN  (H, GH) their transpose, when use_t
    floating beta,
    floating* out,         # INOUT (N, GH): columns r0..r1 = h W[r0:r1]^T + beta out
) noexcept nogil:
    """The recurrent GEMM of one step (L2, G2, R2), gate columns r0..r1.

    With W^T stored (H, GH) the call is BLAS's plain NN case, which OpenBLAS runs about twice as
    fast as the transposed one for small batches (16 x 256 @ 256 x 1024: 71 vs 135 us; 32 x 64
    @ 64 x 256: 6.0 vs 12.8 us; batch 1: the same), so the forward transposes W_hh once per call
    when the batch and sequence are long enough to repay it."""
    if use_t:
        step_mm(N, r1 - r0, H, h, H, wt + r0, GH, beta, out + r0, GH)
    else:
        mm(False, True, N, r1 - r0, H, <floating> 1, h, H, w + r0 * H, H, beta, out + r0, GH)


cdef inline void project_rows(
    int p, int nt, Py_ssize_t TN, Py_ssize_t D, Py_ssize_t GH,
    const floating* x,     # IN  (TN, D)
    const floating* w,     # IN  (GH, D)
    floating* out,         # OUT (TN, GH) = x W^T, rows of thread p of nt
) noexcept nogil:
    """The input projection of all steps (L1, G1, R1) split by rows, for a call whose time loop
    runs on one thread: the other threads help with this one large GEMM only."""
    cdef Py_ssize_t r0, r1
    split(TN, nt, p, &r0, &r1)
    mm(False, True, r1 - r0, GH, D, <floating> 1, x + r0 * D, D, w, D, <floating> 0,
       out + r0 * GH, GH)
