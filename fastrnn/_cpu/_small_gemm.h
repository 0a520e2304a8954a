/* fastrnn's small float32 GEMM kernels (AVX-512, chosen at run time through fr_small_gemm_ok):
 * register tiles of 8 rows x 32 columns of C, B read in place or from packed 32-column panels.
 * Used by the recurrent engine's per-step GEMMs (_recurrent_common.pxd) and by the pointwise
 * convolution (conv2d_im2col.pyx). Each including module calls fr_small_gemm_init() once.
 * Measured: benchmarks/NOTES-cpu.md ("Per-step GEMMs"), benchmarks/NOTES-conv.md. */
#ifndef FR_SMALL_GEMM_H
#define FR_SMALL_GEMM_H
#include <stddef.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
/* (included from Cython modules, after Python.h: Py_ssize_t is defined) */

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__)
#define FR_HAVE_SMALL_GEMM 1
typedef float fr_v16 __attribute__((vector_size(64)));
typedef float fr_v16u __attribute__((vector_size(64), aligned(4)));

#define FR_ROW_UPDATE(cp, acc)                                        \
    do {                                                              \
        fr_v16u *q_ = (fr_v16u *)(cp);                                \
        *q_ = beta == 0.0f ? (acc) : (acc) + beta * *q_;              \
    } while (0)

/* R (<= 8) rows x 32 columns of C = A @ B + beta C, k in [k0, k1): A[r][k] at
   a[r * ars + k * aks] (row-major: ars = lda, aks = 1; A given as its transpose: ars = 1,
   aks = its leading dimension), B's rows ldb apart (in place, or 32 in a packed panel);
   ``first``: the chunk starting at k = 0 (C is read for beta), otherwise the accumulation
   continues from C. ``init`` (NULL: zeros): the first chunk starts row r from the 32 floats
   at init + tok[r] * ldi instead (a row of a table, per row of C; beta must be 0). */
static inline __attribute__((always_inline, target("avx512f,fma"))) void fr_tile(
    int R, Py_ssize_t k0, Py_ssize_t k1, const float *a, Py_ssize_t ars, Py_ssize_t aks,
    const float *b, Py_ssize_t ldb, int first, float beta, float *C, Py_ssize_t ldc,
    const float *init, const long long *tok, Py_ssize_t ldi)
{
    fr_v16 c[8][2];
    #pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        if (first && init != NULL) {
            c[r][0] = *(const fr_v16u *)(init + tok[r] * ldi);
            c[r][1] = *(const fr_v16u *)(init + tok[r] * ldi + 16);
        } else if (first) {
            c[r][0] = (fr_v16){0}; c[r][1] = (fr_v16){0};
        } else {
            c[r][0] = *(const fr_v16u *)(C + r * ldc);
            c[r][1] = *(const fr_v16u *)(C + r * ldc + 16);
        }
    }
    b += k0 * ldb;
    a += k0 * aks;
    #pragma GCC unroll 4
    for (Py_ssize_t k = k0; k < k1; k++, b += ldb, a += aks) {
        fr_v16 b0 = *(const fr_v16u *)b, b1 = *(const fr_v16u *)(b + 16);
        #pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            float ar = a[r * ars];
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

/* F(rows, args...) with ``rows`` in 1..7 a compile-time constant in each case (the tiles
   unroll over their rows): the rows past the last full 8-row tile, in one tile (a
   single-row tile per row would stream B once per row). */
#define FR_LAST_ROWS(rows, F, ...)                                                    \
    switch (rows) {                                                                   \
    case 7: F(7, __VA_ARGS__); break;                                                 \
    case 6: F(6, __VA_ARGS__); break;                                                 \
    case 5: F(5, __VA_ARGS__); break;                                                 \
    case 4: F(4, __VA_ARGS__); break;                                                 \
    case 3: F(3, __VA_ARGS__); break;                                                 \
    case 2: F(2, __VA_ARGS__); break;                                                 \
    case 1: F(1, __VA_ARGS__); break;                                                 \
    default: break;                                                                   \
    }

/* M rows x 32 columns of C, k in chunks of ``chunk`` (the chunk of B stays in L1 across
   all the rows' tiles), 8 rows at a time then the rest; at least one chunk, so K = 0
   still writes beta C. */
static inline __attribute__((always_inline, target("avx512f,fma"))) void fr_tiles(
    Py_ssize_t M, Py_ssize_t K, Py_ssize_t chunk, const float *A, Py_ssize_t ars,
    Py_ssize_t aks, const float *b, Py_ssize_t ldb, float beta, float *C, Py_ssize_t ldc,
    const float *init, const long long *tok, Py_ssize_t ldi)
{
    Py_ssize_t k0 = 0;
    do {
        Py_ssize_t k1 = K - k0 < chunk ? K : k0 + chunk;
        int first = k0 == 0;
        Py_ssize_t i = 0;
        for (; i + 8 <= M; i += 8)
            fr_tile(8, k0, k1, A + i * ars, ars, aks, b, ldb, first, beta, C + i * ldc,
                    ldc, init, init ? tok + i : tok, ldi);
        FR_LAST_ROWS(M - i, fr_tile, k0, k1, A + i * ars, ars, aks, b, ldb, first, beta,
                     C + i * ldc, ldc, init, init ? tok + i : tok, ldi)
        k0 = k1;
    } while (k0 < K);
}

/* R rows x (the lanes of mask, <= 16) columns of C = A @ B + beta C over all of K: the
   masked lanes are neither read nor written. */
static inline __attribute__((always_inline, target("avx512f,fma"))) void fr_tail_tile(
    int R, Py_ssize_t K, const float *a, Py_ssize_t ars, Py_ssize_t aks, const float *b,
    Py_ssize_t ldb, __mmask16 mask, float beta, float *C, Py_ssize_t ldc)
{
    __m512 c[8];
    #pragma GCC unroll 8
    for (int r = 0; r < R; r++) c[r] = _mm512_setzero_ps();
    for (Py_ssize_t k = 0; k < K; k++, b += ldb, a += aks) {
        __m512 bv = _mm512_maskz_loadu_ps(mask, b);
        #pragma GCC unroll 8
        for (int r = 0; r < R; r++)
            c[r] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * ars]), bv, c[r]);
    }
    #pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        __m512 v = c[r];
        if (beta != 0.0f)
            v = _mm512_fmadd_ps(_mm512_set1_ps(beta),
                                _mm512_maskz_loadu_ps(mask, C + r * ldc), v);
        _mm512_mask_storeu_ps(C + r * ldc, mask, v);
    }
}

/* C (M x n) = A (M x K) @ B (K x n) + beta C, A[r][k] at A[r * ars + k * aks] (see
   fr_tile), B and C row-major with leading dimensions; k in chunks of ``chunk``. */
__attribute__((target("avx512f,fma"), unused)) static void fr_sgemm_avx512(
    Py_ssize_t M, Py_ssize_t n, Py_ssize_t K, const float *A, Py_ssize_t ars,
    Py_ssize_t aks, const float *B, Py_ssize_t ldb, float beta, float *C, Py_ssize_t ldc,
    Py_ssize_t chunk)
{
    Py_ssize_t j = 0;
    /* 32 columns at a time: 8 rows x 32 columns in 16 accumulators, each B row loaded once
       per 8 rows; k in chunks so a 32-column chunk of B (32 KB at 256) stays in L1
       across the rows. */
    for (; j + 32 <= n; j += 32)
        fr_tiles(M, K, chunk, A, ars, aks, B + j, ldb, beta, C + j, ldc, NULL, NULL, 0);
    /* the last n % 32 columns, 16 at a time under a lane mask (e.g. the 8 columns past the
       panels of H = 200), rows in tiles of 8 and one tile of the rest */
    for (; j < n; j += 16) {
        int w = n - j < 16 ? (int) (n - j) : 16;
        __mmask16 mask = (__mmask16) ((1u << w) - 1u);
        Py_ssize_t i = 0;
        for (; i + 8 <= M; i += 8)
            fr_tail_tile(8, K, A + i * ars, ars, aks, B + j, ldb, mask, beta,
                         C + i * ldc + j, ldc);
        FR_LAST_ROWS(M - i, fr_tail_tile, K, A + i * ars, ars, aks, B + j, ldb, mask, beta,
                     C + i * ldc + j, ldc)
    }
}

/* C (M x n) = A (M x K) @ B (K x n) + beta C, all row-major with leading dimensions. */
__attribute__((target("avx512f,fma"), unused)) static void fr_small_sgemm_avx512(
    Py_ssize_t M, Py_ssize_t n, Py_ssize_t K, const float *A, Py_ssize_t lda,
    const float *B, Py_ssize_t ldb, float beta, float *C, Py_ssize_t ldc)
{
    fr_sgemm_avx512(M, n, K, A, lda, 1, B, ldb, beta, C, ldc, 256);
}

/* C (M x 32 np) = A (M x K) @ B + beta C, B given as np packed panels (K x 32 each,
   contiguous: fr_pack_panels). k in chunks of 128, so a panel chunk (16 KB, contiguous: no
   cache-set conflicts of a large row stride) stays in L1 across all M rows. */
__attribute__((target("avx512f,fma"), unused)) static void fr_panel_sgemm_avx512(
    Py_ssize_t M, Py_ssize_t np_, Py_ssize_t K, const float *A, Py_ssize_t lda,
    const float *P, float beta, float *C, Py_ssize_t ldc)
{
    for (Py_ssize_t p = 0; p < np_; p++)
        fr_tiles(M, K, 128, A, lda, 1, P + p * K * 32, 32, beta, C + p * 32, ldc, NULL, NULL,
                 0);
}
/* The same with each row of C started from a row of a table instead of beta C: C[r] =
   init[tok[r]] (columns as C's) + A[r] @ B. The recurrent step of token inputs: the input
   projection of row r is row tok[r] of E W_ih^T (recurrent.pyx, lookup), added here instead
   of copied into C first. */
__attribute__((target("avx512f,fma"), unused)) static void fr_panel_sgemm_rows_avx512(
    Py_ssize_t M, Py_ssize_t np_, Py_ssize_t K, const float *A, Py_ssize_t lda,
    const float *P, const float *init, const long long *tok, Py_ssize_t ldi, float *C,
    Py_ssize_t ldc)
{
    for (Py_ssize_t p = 0; p < np_; p++)
        fr_tiles(M, K, 128, A, lda, 1, P + p * K * 32, 32, 0.0f, C + p * 32, ldc,
                 init + p * 32, tok, ldi);
}

/* The whole-sequence GEMMs of the recurrent backward (weight gradients dW = dA^T X over all R
   packed rows, input gradients dX = dA W): C (M x n) = A (M x K) @ B (K x n), A[r][k] at
   A[r * ars + k * aks] (read in place, transposed or not), B's full 32-column panels from P
   (fr_pack_panels of B, K rows), the last n % 32 columns from B itself; C is overwritten.
   ``rows_outer``: 48-row blocks of C, each over all of K (B's panels stay in L2: dX);
   else k in blocks of 96 outermost (C stays in L2, each block's A lines -- a transposed A
   reads 8 floats of each of 96 rows -- and 12 KB panel chunk in L1: dW). The caller keeps
   what stays in L2 small (fr_seq_fits). */
static inline __attribute__((always_inline, target("avx512f,fma"))) void fr_seq_block(
    Py_ssize_t i0, Py_ssize_t i1, Py_ssize_t k0, Py_ssize_t k1, Py_ssize_t np_, Py_ssize_t K,
    const float *A, Py_ssize_t ars, Py_ssize_t aks, const float *P, float *C, Py_ssize_t ldc)
{
    int first = k0 == 0;
    for (Py_ssize_t p = 0; p < np_; p++) {
        const float *b = P + p * K * 32;
        float *c = C + p * 32;
        Py_ssize_t i = i0;
        for (; i + 8 <= i1; i += 8)
            fr_tile(8, k0, k1, A + i * ars, ars, aks, b, 32, first, 0.0f, c + i * ldc, ldc,
                    NULL, NULL, 0);
        FR_LAST_ROWS(i1 - i, fr_tile, k0, k1, A + i * ars, ars, aks, b, 32, first, 0.0f,
                     c + i * ldc, ldc, NULL, NULL, 0)
    }
}
static inline __attribute__((always_inline, target("avx512f,fma"))) void fr_seq_tiles(
    Py_ssize_t M, Py_ssize_t n, Py_ssize_t K, const float *A, Py_ssize_t ars, Py_ssize_t aks,
    const float *B, Py_ssize_t ldb, const float *P, float *C, Py_ssize_t ldc, int rows_outer)
{
    Py_ssize_t np_ = n / 32, nf = np_ * 32;
    if (M <= 0 || n <= 0)
        return;
    if (rows_outer) {
        for (Py_ssize_t i0 = 0; i0 < M; i0 += 48) {
            Py_ssize_t i1 = M - i0 < 48 ? M : i0 + 48, k0 = 0;
            do {
                Py_ssize_t k1 = K - k0 < 96 ? K : k0 + 96;
                fr_seq_block(i0, i1, k0, k1, np_, K, A, ars, aks, P, C, ldc);
                k0 = k1;
            } while (k0 < K);
        }
    } else {
        Py_ssize_t k0 = 0;
        do {
            Py_ssize_t k1 = K - k0 < 96 ? K : k0 + 96;
            for (Py_ssize_t i0 = 0; i0 < M; i0 += 48)
                fr_seq_block(i0, M - i0 < 48 ? M : i0 + 48, k0, k1, np_, K, A, ars, aks, P, C,
                             ldc);
            k0 = k1;
        } while (k0 < K);
    }
    if (n > nf)  /* the last columns over all of K, from B in place */
        fr_sgemm_avx512(M, n - nf, K, A, ars, aks, B + nf, ldb, 0.0f, C + nf, ldc, 256);
}
/* Whether fr_seq_sgemm_avx512 keeps its L2-resident operand (dX: B's panels, K x n; dW: C,
   M x n) within 1 MB, with n in whole 16-column halves of panels; other problems go to BLAS
   (its blocking handles large ones; a few columns past the panels ran 2-3% slower here). */
static inline int fr_seq_fits(Py_ssize_t rows, Py_ssize_t n) {
    return n % 16 == 0 && (double) rows * (double) n * sizeof(float) <= (double) (1 << 20);
}
/* (compiled once per layout of A, so that the tiles' A addresses are constant offsets) */
__attribute__((target("avx512f,fma"), unused)) static void fr_seq_sgemm_avx512(
    Py_ssize_t M, Py_ssize_t n, Py_ssize_t K, const float *A, Py_ssize_t ars, Py_ssize_t aks,
    const float *B, Py_ssize_t ldb, const float *P, float *C, Py_ssize_t ldc)
{
    if (ars == 1)  /* A given as its transpose: a weight gradient, C in L2 */
        fr_seq_tiles(M, n, K, A, 1, aks, B, ldb, P, C, ldc, 0);
    else if (aks == 1)  /* A row-major: an input gradient, B's panels in L2 */
        fr_seq_tiles(M, n, K, A, ars, 1, B, ldb, P, C, ldc, 1);
    else
        fr_seq_tiles(M, n, K, A, ars, aks, B, ldb, P, C, ldc, 1);
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
__attribute__((unused)) static void fr_small_sgemm_avx512(
    Py_ssize_t M, Py_ssize_t n, Py_ssize_t K, const float *A, Py_ssize_t lda,
    const float *B, Py_ssize_t ldb, float beta, float *C, Py_ssize_t ldc) {}
__attribute__((unused)) static void fr_sgemm_avx512(
    Py_ssize_t M, Py_ssize_t n, Py_ssize_t K, const float *A, Py_ssize_t ars,
    Py_ssize_t aks, const float *B, Py_ssize_t ldb, float beta, float *C, Py_ssize_t ldc,
    Py_ssize_t chunk) {}
__attribute__((unused)) static void fr_panel_sgemm_avx512(
    Py_ssize_t M, Py_ssize_t np_, Py_ssize_t K, const float *A, Py_ssize_t lda,
    const float *P, float beta, float *C, Py_ssize_t ldc) {}
__attribute__((unused)) static void fr_seq_sgemm_avx512(
    Py_ssize_t M, Py_ssize_t n, Py_ssize_t K, const float *A, Py_ssize_t ars, Py_ssize_t aks,
    const float *B, Py_ssize_t ldb, const float *P, float *C, Py_ssize_t ldc) {}
__attribute__((unused)) static void fr_panel_sgemm_rows_avx512(
    Py_ssize_t M, Py_ssize_t np_, Py_ssize_t K, const float *A, Py_ssize_t lda,
    const float *P, const float *init, const long long *tok, Py_ssize_t ldi, float *C,
    Py_ssize_t ldc) {}
static inline int fr_seq_fits(Py_ssize_t rows, Py_ssize_t n) { return 0; }
#endif

/* Columns [0, 32 np) of B (K rows, leading dimension ldb) as np panels of K x 32. */
__attribute__((unused)) static void fr_pack_panels(Py_ssize_t K, Py_ssize_t np_, const float *B, Py_ssize_t ldb,
                           float *P) {
    for (Py_ssize_t p = 0; p < np_; p++)
        for (Py_ssize_t k = 0; k < K; k++)
            memcpy(P + (p * K + k) * 32, B + k * ldb + p * 32, 32 * sizeof(float));
}

#endif /* FR_SMALL_GEMM_H */
