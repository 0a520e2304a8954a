/* fastrnn's small float32 GEMM kernels (AVX-512 and AVX2, chosen at run time: fr_small_gemm_isa):
 * register tiles of C (_small_gemm_kernels.h), B read in place or from packed 32-column panels.
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

/* F(rows, args...) with ``rows`` in 1..7 a compile-time constant in each case (the tiles
   unroll over their rows): the rows past the last full row tile, in one tile (a single-row
   tile per row would stream B once per row). */
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

/* AVX-512: 8 rows x 32 columns of C in 16 zmm accumulators. */
typedef float fr_v16 __attribute__((vector_size(64)));
typedef float fr_v16u __attribute__((vector_size(64), aligned(4)));
#define FR_SUF avx512
#define FR_TARGET "avx512f,fma"
#define FR_LANES 16
#define FR_VT fr_v16
#define FR_VTU fr_v16u
#define FR_MR 8
#define FR_SEQ_PACK_A 0
#define FR_MVEC __m512
#define FR_MLOAD(p, w) _mm512_maskz_loadu_ps((__mmask16) ((1u << (w)) - 1u), (p))
#define FR_MSTORE(p, w, v) _mm512_mask_storeu_ps((p), (__mmask16) ((1u << (w)) - 1u), (v))
#define FR_SET1 _mm512_set1_ps
#define FR_FMA _mm512_fmadd_ps
#define FR_ZERO _mm512_setzero_ps
#include "_small_gemm_kernels.h"

/* AVX2: 6 rows x 16 columns in 12 ymm accumulators (two tiles per 32-column block), or up to
   3 rows x 32 columns; the lanes past w masked by a vector of the lane indices. */
typedef float fr_v8 __attribute__((vector_size(32)));
typedef float fr_v8u __attribute__((vector_size(32), aligned(4)));
static inline __attribute__((always_inline, target("avx2,fma"))) __m256i fr_mask8(int w) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(w), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#define FR_SUF avx2
#define FR_TARGET "avx2,fma"
#define FR_LANES 8
#define FR_VT fr_v8
#define FR_VTU fr_v8u
#define FR_MR 6
#define FR_SEQ_PACK_A 1
#define FR_MVEC __m256
#define FR_MLOAD(p, w) _mm256_maskload_ps((p), fr_mask8(w))
#define FR_MSTORE(p, w, v) _mm256_maskstore_ps((p), fr_mask8(w), (v))
#define FR_SET1 _mm256_set1_ps
#define FR_FMA _mm256_fmadd_ps
#define FR_ZERO _mm256_setzero_ps
#include "_small_gemm_kernels.h"

/* The kernels by instruction set: ``isa`` 2 AVX-512, 1 AVX2 (a level this CPU runs, at most
   fr_small_gemm_isa; the recurrent engine passes the cells' level, which FASTRNN_SIMD can
   lower, so every machine tests the AVX2 kernels too). */
#define FR_DISPATCH(name, isa, ...) \
    do { if ((isa) >= 2) name##_avx512(__VA_ARGS__); else name##_avx2(__VA_ARGS__); } while (0)

__attribute__((unused)) static void fr_sgemm(
    int isa, Py_ssize_t M, Py_ssize_t n, Py_ssize_t K, const float *A, Py_ssize_t ars,
    Py_ssize_t aks, const float *B, Py_ssize_t ldb, float beta, float *C, Py_ssize_t ldc,
    Py_ssize_t chunk) {
    FR_DISPATCH(fr_sgemm, isa, M, n, K, A, ars, aks, B, ldb, beta, C, ldc, chunk);
}
__attribute__((unused)) static void fr_small_sgemm(
    int isa, Py_ssize_t M, Py_ssize_t n, Py_ssize_t K, const float *A, Py_ssize_t lda,
    const float *B, Py_ssize_t ldb, float beta, float *C, Py_ssize_t ldc) {
    FR_DISPATCH(fr_small_sgemm, isa, M, n, K, A, lda, B, ldb, beta, C, ldc);
}
__attribute__((unused)) static void fr_panel_sgemm(
    int isa, Py_ssize_t M, Py_ssize_t np_, Py_ssize_t K, const float *A, Py_ssize_t lda,
    const float *P, float beta, float *C, Py_ssize_t ldc) {
    FR_DISPATCH(fr_panel_sgemm, isa, M, np_, K, A, lda, P, beta, C, ldc);
}
__attribute__((unused)) static void fr_panel_sgemm_rows(
    int isa, Py_ssize_t M, Py_ssize_t np_, Py_ssize_t K, const float *A, Py_ssize_t lda,
    const float *P, const float *init, const long long *tok, Py_ssize_t ldi, float *C,
    Py_ssize_t ldc) {
    FR_DISPATCH(fr_panel_sgemm_rows, isa, M, np_, K, A, lda, P, init, tok, ldi, C, ldc);
}
__attribute__((unused)) static void fr_seq_sgemm(
    int isa, Py_ssize_t M, Py_ssize_t n, Py_ssize_t K, const float *A, Py_ssize_t ars,
    Py_ssize_t aks, const float *B, Py_ssize_t ldb, const float *P, float *C, Py_ssize_t ldc) {
    FR_DISPATCH(fr_seq_sgemm, isa, M, n, K, A, ars, aks, B, ldb, P, C, ldc);
}
#undef FR_DISPATCH

/* Whether fr_seq_sgemm of level ``isa`` keeps its L2-resident operand (dX: B's panels, K x n;
   dW: C, M x n; for AVX2 the dX case, see fr_seq_fits_dw) within 1 MB for AVX-512 (measured with 2 MB of L2 per core) and 256 KB for AVX2
   (CPUs with 256-512 KB: on a Zen 3, 512 KB, operands of 576 KB-1 MB ran 4-16% slower than
   OpenBLAS), with n in whole vectors (AVX-512: 16-column halves of panels; a few columns past
   them ran 2-3% slower there); other problems go to BLAS (its blocking handles large ones). */
static inline int fr_seq_fits(int isa, Py_ssize_t rows, Py_ssize_t n) {
    return n % (isa >= 2 ? 16 : 8) == 0
        && (double) rows * (double) n * sizeof(float) <= (double) (isa >= 2 ? 1 << 20 : 1 << 18);
}
/* The same for a weight gradient (dW: C, rows x n, k outermost). AVX2 copies each block of the
   transposed A first (FR_SEQ_PACK_A), which keeps it ahead of OpenBLAS up to 1 MB of C even
   with 512 KB of L2 (Zen 3, one thread: (100,16,256,256) 79 vs 93 ms, (64,32,192,192) 70 vs
   76; 4 MB, (100,64,512,512): 1440 vs 1238 ms, so not beyond). */
static inline int fr_seq_fits_dw(int isa, Py_ssize_t rows, Py_ssize_t n) {
    return isa >= 2 ? fr_seq_fits(isa, rows, n)
                    : n % 8 == 0 && (double) rows * (double) n * sizeof(float) <= (1 << 20);
}
/* The best level this CPU runs: 2 AVX-512, 1 AVX2 (with FMA), 0 none (BLAS runs every GEMM). */
static int fr_small_gemm_isa = 0;
static void fr_small_gemm_init(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma"))
        fr_small_gemm_isa = 2;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        fr_small_gemm_isa = 1;
}
#else
#define FR_HAVE_SMALL_GEMM 0
static int fr_small_gemm_isa = 0;
static void fr_small_gemm_init(void) {}
__attribute__((unused)) static void fr_sgemm(
    int isa, Py_ssize_t M, Py_ssize_t n, Py_ssize_t K, const float *A, Py_ssize_t ars,
    Py_ssize_t aks, const float *B, Py_ssize_t ldb, float beta, float *C, Py_ssize_t ldc,
    Py_ssize_t chunk) {}
__attribute__((unused)) static void fr_small_sgemm(
    int isa, Py_ssize_t M, Py_ssize_t n, Py_ssize_t K, const float *A, Py_ssize_t lda,
    const float *B, Py_ssize_t ldb, float beta, float *C, Py_ssize_t ldc) {}
__attribute__((unused)) static void fr_panel_sgemm(
    int isa, Py_ssize_t M, Py_ssize_t np_, Py_ssize_t K, const float *A, Py_ssize_t lda,
    const float *P, float beta, float *C, Py_ssize_t ldc) {}
__attribute__((unused)) static void fr_panel_sgemm_rows(
    int isa, Py_ssize_t M, Py_ssize_t np_, Py_ssize_t K, const float *A, Py_ssize_t lda,
    const float *P, const float *init, const long long *tok, Py_ssize_t ldi, float *C,
    Py_ssize_t ldc) {}
__attribute__((unused)) static void fr_seq_sgemm(
    int isa, Py_ssize_t M, Py_ssize_t n, Py_ssize_t K, const float *A, Py_ssize_t ars,
    Py_ssize_t aks, const float *B, Py_ssize_t ldb, const float *P, float *C, Py_ssize_t ldc) {}
static inline int fr_seq_fits(int isa, Py_ssize_t rows, Py_ssize_t n) { return 0; }
static inline int fr_seq_fits_dw(int isa, Py_ssize_t rows, Py_ssize_t n) { return 0; }
#endif

/* Columns [0, 32 np) of B (K rows, leading dimension ldb) as np panels of K x 32. */
__attribute__((unused)) static void fr_pack_panels(Py_ssize_t K, Py_ssize_t np_, const float *B, Py_ssize_t ldb,
                           float *P) {
    for (Py_ssize_t p = 0; p < np_; p++)
        for (Py_ssize_t k = 0; k < K; k++)
            memcpy(P + (p * K + k) * 32, B + k * ldb + p * 32, 32 * sizeof(float));
}

#endif /* FR_SMALL_GEMM_H */
