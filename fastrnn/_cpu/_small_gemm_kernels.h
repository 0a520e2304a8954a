/* fastrnn's small float32 GEMM kernels, one instruction set per inclusion (_small_gemm.h
 * includes this file once for AVX-512 and once for AVX2). The including file defines:
 *   FR_SUF     name suffix (avx512, avx2)
 *   FR_TARGET  the functions' target attribute string
 *   FR_LANES   float lanes of a vector (16, 8); FR_VT / FR_VTU its GCC vector types
 *              (aligned / unaligned)
 *   FR_MR      rows of C in a full register tile (8: 8 x 32 in 16 zmm; 6: 6 x 16 in 12 ymm)
 *   FR_SEQ_PACK_A  1: the weight-gradient blocks copy their transposed A first
 *   FR_MVEC, FR_MLOAD(p, w), FR_MSTORE(p, w, v), FR_SET1(x), FR_FMA(a, b, c), FR_ZERO()
 *              the intrinsics of one vector with only its first w lanes read and written
 * and this file undefines them at its end.
 * Every function works on 32-column blocks of C: B read in place (rows ldb apart) or from
 * packed 32-column panels (fr_pack_panels); the layout is the same for every instruction set. */

#define FR_CAT_(a, b) a##_##b
#define FR_CAT(a, b) FR_CAT_(a, b)
#define FR_FN(name) FR_CAT(name, FR_SUF)
/* vectors per row of a 32-column block */
#define FR_NV32 (32 / FR_LANES)

/* R rows x NV vectors of columns of C = A @ B + beta C, k in [k0, k1): A[r][k] at
   a[r * ars + k * aks] (row-major: ars = lda, aks = 1; A given as its transpose: ars = 1,
   aks = its leading dimension), B's rows ldb apart (in place, or 32 in a packed panel);
   ``first``: the chunk starting at k = 0 (C is read for beta), otherwise the accumulation
   continues from C. ``init`` (NULL: zeros): the first chunk starts row r from the floats at
   init + tok[r] * ldi instead (a row of a table, per row of C; beta must be 0). R * NV
   accumulators stay in registers (at most 16 zmm / 12 ymm: the callers see to it). */
static inline __attribute__((always_inline, target(FR_TARGET))) void FR_FN(fr_tile)(
    int R, int NV, Py_ssize_t k0, Py_ssize_t k1, const float *a, Py_ssize_t ars,
    Py_ssize_t aks, const float *b, Py_ssize_t ldb, int first, float beta, float *C,
    Py_ssize_t ldc, const float *init, const long long *tok, Py_ssize_t ldi)
{
    FR_VT c[8][FR_NV32];
    #pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        #pragma GCC unroll 4
        for (int v = 0; v < NV; v++) {
            if (first && init != NULL)
                c[r][v] = *(const FR_VTU *)(init + tok[r] * ldi + v * FR_LANES);
            else if (first)
                c[r][v] = (FR_VT){0};
            else
                c[r][v] = *(const FR_VTU *)(C + r * ldc + v * FR_LANES);
        }
    }
    b += k0 * ldb;
    a += k0 * aks;
    #pragma GCC unroll 4
    for (Py_ssize_t k = k0; k < k1; k++, b += ldb, a += aks) {
        FR_VT bv[FR_NV32];
        #pragma GCC unroll 4
        for (int v = 0; v < NV; v++)
            bv[v] = *(const FR_VTU *)(b + v * FR_LANES);
        #pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            float ar = a[r * ars];
            #pragma GCC unroll 4
            for (int v = 0; v < NV; v++)
                c[r][v] += bv[v] * ar;
        }
    }
    #pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        #pragma GCC unroll 4
        for (int v = 0; v < NV; v++) {
            FR_VTU *q = (FR_VTU *)(C + r * ldc + v * FR_LANES);
            if (first && beta != 0.0f)
                *q = c[r][v] + beta * *q;
            else
                *q = c[r][v];
        }
    }
}

/* R rows x 32 columns: one tile, or (R * FR_NV32 accumulators too many: AVX2 past 3 rows) two
   tiles of 16 columns. */
static inline __attribute__((always_inline, target(FR_TARGET))) void FR_FN(fr_rows32)(
    int R, Py_ssize_t k0, Py_ssize_t k1, const float *a, Py_ssize_t ars, Py_ssize_t aks,
    const float *b, Py_ssize_t ldb, int first, float beta, float *C, Py_ssize_t ldc,
    const float *init, const long long *tok, Py_ssize_t ldi)
{
    if (R * FR_NV32 <= 16 - 4 * (FR_LANES == 8)) {
        FR_FN(fr_tile)(R, FR_NV32, k0, k1, a, ars, aks, b, ldb, first, beta, C, ldc, init, tok,
                       ldi);
    } else {
        FR_FN(fr_tile)(R, FR_NV32 / 2, k0, k1, a, ars, aks, b, ldb, first, beta, C, ldc, init,
                       tok, ldi);
        FR_FN(fr_tile)(R, FR_NV32 / 2, k0, k1, a, ars, aks, b + 16, ldb, first, beta, C + 16,
                       ldc, init ? init + 16 : NULL, tok, ldi);
    }
}

/* M rows x 32 columns of C, k in chunks of ``chunk`` (the chunk of B stays in L1 across
   all the rows' tiles), FR_MR rows at a time then the rest in one tile; at least one chunk,
   so K = 0 still writes beta C. */
static inline __attribute__((always_inline, target(FR_TARGET))) void FR_FN(fr_tiles)(
    Py_ssize_t M, Py_ssize_t K, Py_ssize_t chunk, const float *A, Py_ssize_t ars,
    Py_ssize_t aks, const float *b, Py_ssize_t ldb, float beta, float *C, Py_ssize_t ldc,
    const float *init, const long long *tok, Py_ssize_t ldi)
{
    Py_ssize_t k0 = 0;
    do {
        Py_ssize_t k1 = K - k0 < chunk ? K : k0 + chunk;
        int first = k0 == 0;
        Py_ssize_t i = 0;
        for (; i + FR_MR <= M; i += FR_MR)
            FR_FN(fr_rows32)(FR_MR, k0, k1, A + i * ars, ars, aks, b, ldb, first, beta,
                             C + i * ldc, ldc, init, init ? tok + i : tok, ldi);
        FR_LAST_ROWS(M - i, FR_FN(fr_rows32), k0, k1, A + i * ars, ars, aks, b, ldb, first,
                     beta, C + i * ldc, ldc, init, init ? tok + i : tok, ldi)
        k0 = k1;
    } while (k0 < K);
}

/* R rows x (the first w <= FR_LANES) columns of C = A @ B + beta C over all of K: the other
   lanes are neither read nor written. */
static inline __attribute__((always_inline, target(FR_TARGET))) void FR_FN(fr_tail_tile)(
    int R, Py_ssize_t K, const float *a, Py_ssize_t ars, Py_ssize_t aks, const float *b,
    Py_ssize_t ldb, int w, float beta, float *C, Py_ssize_t ldc)
{
    FR_MVEC c[8];
    #pragma GCC unroll 8
    for (int r = 0; r < R; r++) c[r] = FR_ZERO();
    for (Py_ssize_t k = 0; k < K; k++, b += ldb, a += aks) {
        FR_MVEC bv = FR_MLOAD(b, w);
        #pragma GCC unroll 8
        for (int r = 0; r < R; r++)
            c[r] = FR_FMA(FR_SET1(a[r * ars]), bv, c[r]);
    }
    #pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        FR_MVEC v = c[r];
        if (beta != 0.0f)
            v = FR_FMA(FR_SET1(beta), FR_MLOAD(C + r * ldc, w), v);
        FR_MSTORE(C + r * ldc, w, v);
    }
}

/* C (M x n) = A (M x K) @ B (K x n) + beta C, A[r][k] at A[r * ars + k * aks] (see
   fr_tile), B and C row-major with leading dimensions; k in chunks of ``chunk``. */
__attribute__((target(FR_TARGET), unused)) static void FR_FN(fr_sgemm)(
    Py_ssize_t M, Py_ssize_t n, Py_ssize_t K, const float *A, Py_ssize_t ars,
    Py_ssize_t aks, const float *B, Py_ssize_t ldb, float beta, float *C, Py_ssize_t ldc,
    Py_ssize_t chunk)
{
    Py_ssize_t j = 0;
    /* 32 columns at a time, each B row loaded once per row tile; k in chunks so a 32-column
       chunk of B (32 KB at 256) stays in L1 across the rows. */
    for (; j + 32 <= n; j += 32)
        FR_FN(fr_tiles)(M, K, chunk, A, ars, aks, B + j, ldb, beta, C + j, ldc, NULL, NULL, 0);
    /* the last n % 32 columns, a vector at a time under a lane mask (e.g. the 8 columns past
       the panels of H = 200), rows in tiles of 8 and one tile of the rest */
    for (; j < n; j += FR_LANES) {
        int w = n - j < FR_LANES ? (int) (n - j) : FR_LANES;
        Py_ssize_t i = 0;
        for (; i + 8 <= M; i += 8)
            FR_FN(fr_tail_tile)(8, K, A + i * ars, ars, aks, B + j, ldb, w, beta,
                                C + i * ldc + j, ldc);
        FR_LAST_ROWS(M - i, FR_FN(fr_tail_tile), K, A + i * ars, ars, aks, B + j, ldb, w, beta,
                     C + i * ldc + j, ldc)
    }
}

/* C (M x n) = A (M x K) @ B (K x n) + beta C, all row-major with leading dimensions. */
__attribute__((target(FR_TARGET), unused)) static void FR_FN(fr_small_sgemm)(
    Py_ssize_t M, Py_ssize_t n, Py_ssize_t K, const float *A, Py_ssize_t lda,
    const float *B, Py_ssize_t ldb, float beta, float *C, Py_ssize_t ldc)
{
    FR_FN(fr_sgemm)(M, n, K, A, lda, 1, B, ldb, beta, C, ldc, 256);
}

/* C (M x 32 np) = A (M x K) @ B + beta C, B given as np packed panels (K x 32 each,
   contiguous: fr_pack_panels). k in chunks of 128, so a panel chunk (16 KB, contiguous: no
   cache-set conflicts of a large row stride) stays in L1 across all M rows. */
__attribute__((target(FR_TARGET), unused)) static void FR_FN(fr_panel_sgemm)(
    Py_ssize_t M, Py_ssize_t np_, Py_ssize_t K, const float *A, Py_ssize_t lda,
    const float *P, float beta, float *C, Py_ssize_t ldc)
{
    for (Py_ssize_t p = 0; p < np_; p++)
        FR_FN(fr_tiles)(M, K, 128, A, lda, 1, P + p * K * 32, 32, beta, C + p * 32, ldc, NULL,
                        NULL, 0);
}
/* The same with each row of C started from a row of a table instead of beta C: C[r] =
   init[tok[r]] (columns as C's) + A[r] @ B. The recurrent step of token inputs: the input
   projection of row r is row tok[r] of E W_ih^T (recurrent.pyx, lookup), added here instead
   of copied into C first. */
__attribute__((target(FR_TARGET), unused)) static void FR_FN(fr_panel_sgemm_rows)(
    Py_ssize_t M, Py_ssize_t np_, Py_ssize_t K, const float *A, Py_ssize_t lda,
    const float *P, const float *init, const long long *tok, Py_ssize_t ldi, float *C,
    Py_ssize_t ldc)
{
    for (Py_ssize_t p = 0; p < np_; p++)
        FR_FN(fr_tiles)(M, K, 128, A, lda, 1, P + p * K * 32, 32, 0.0f, C + p * 32, ldc,
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
static inline __attribute__((always_inline, target(FR_TARGET))) void FR_FN(fr_seq_block)(
    Py_ssize_t i0, Py_ssize_t i1, Py_ssize_t k0, Py_ssize_t k1, Py_ssize_t np_, Py_ssize_t K,
    const float *A, Py_ssize_t ars, Py_ssize_t aks, const float *P, float *C, Py_ssize_t ldc)
{
    int first = k0 == 0;
    for (Py_ssize_t p = 0; p < np_; p++) {
        const float *b = P + p * K * 32;
        float *c = C + p * 32;
        Py_ssize_t i = i0;
        for (; i + FR_MR <= i1; i += FR_MR)
            FR_FN(fr_rows32)(FR_MR, k0, k1, A + i * ars, ars, aks, b, 32, first, 0.0f,
                             c + i * ldc, ldc, NULL, NULL, 0);
        FR_LAST_ROWS(i1 - i, FR_FN(fr_rows32), k0, k1, A + i * ars, ars, aks, b, 32, first,
                     0.0f, c + i * ldc, ldc, NULL, NULL, 0)
    }
}
/* fr_seq_block for a transposed A (a weight gradient: A[r][k] at A[r + k * aks]) with the
   block's A first copied to buf (48 x 96 floats, k-major): read in place, its rows lie aks
   floats apart (3-4 KB for the gate gradients of H = 192-256), so the block's 96 rows of A
   fall into a few L1 sets and evict one another (FR_SEQ_PACK_A). */
static inline __attribute__((always_inline, target(FR_TARGET))) void FR_FN(fr_seq_block_packed)(
    Py_ssize_t i0, Py_ssize_t i1, Py_ssize_t k0, Py_ssize_t k1, Py_ssize_t np_, Py_ssize_t K,
    const float *A, Py_ssize_t aks, const float *P, float *C, Py_ssize_t ldc, float *buf)
{
    Py_ssize_t rows = i1 - i0, i;
    int first = k0 == 0;
    for (Py_ssize_t k = k0; k < k1; k++)
        memcpy(buf + (k - k0) * 48, A + i0 + k * aks, (size_t) rows * sizeof(float));
    for (Py_ssize_t p = 0; p < np_; p++) {
        const float *b = P + p * K * 32 + k0 * 32;
        float *c = C + p * 32 + i0 * ldc;
        for (i = 0; i + FR_MR <= rows; i += FR_MR)
            FR_FN(fr_rows32)(FR_MR, 0, k1 - k0, buf + i, 1, 48, b, 32, first, 0.0f,
                             c + i * ldc, ldc, NULL, NULL, 0);
        FR_LAST_ROWS(rows - i, FR_FN(fr_rows32), 0, k1 - k0, buf + i, 1, 48, b, 32, first,
                     0.0f, c + i * ldc, ldc, NULL, NULL, 0)
    }
}
static inline __attribute__((always_inline, target(FR_TARGET))) void FR_FN(fr_seq_tiles)(
    Py_ssize_t M, Py_ssize_t n, Py_ssize_t K, const float *A, Py_ssize_t ars, Py_ssize_t aks,
    const float *B, Py_ssize_t ldb, const float *P, float *C, Py_ssize_t ldc, int rows_outer)
{
    Py_ssize_t np_ = n / 32, nf = np_ * 32;
    float buf[FR_SEQ_PACK_A ? 96 * 48 : 1] __attribute__((aligned(64)));
    if (M <= 0 || n <= 0)
        return;
    if (rows_outer) {
        for (Py_ssize_t i0 = 0; i0 < M; i0 += 48) {
            Py_ssize_t i1 = M - i0 < 48 ? M : i0 + 48, k0 = 0;
            do {
                Py_ssize_t k1 = K - k0 < 96 ? K : k0 + 96;
                FR_FN(fr_seq_block)(i0, i1, k0, k1, np_, K, A, ars, aks, P, C, ldc);
                k0 = k1;
            } while (k0 < K);
        }
    } else {
        Py_ssize_t k0 = 0;
        do {
            Py_ssize_t k1 = K - k0 < 96 ? K : k0 + 96;
            for (Py_ssize_t i0 = 0; i0 < M; i0 += 48) {
                if (FR_SEQ_PACK_A && ars == 1)
                    FR_FN(fr_seq_block_packed)(i0, M - i0 < 48 ? M : i0 + 48, k0, k1, np_, K,
                                               A, aks, P, C, ldc, buf);
                else
                    FR_FN(fr_seq_block)(i0, M - i0 < 48 ? M : i0 + 48, k0, k1, np_, K, A, ars,
                                        aks, P, C, ldc);
            }
            k0 = k1;
        } while (k0 < K);
    }
    if (n > nf)  /* the last columns over all of K, from B in place */
        FR_FN(fr_sgemm)(M, n - nf, K, A, ars, aks, B + nf, ldb, 0.0f, C + nf, ldc, 256);
}
/* (compiled once per layout of A, so that the tiles' A addresses are constant offsets) */
__attribute__((target(FR_TARGET), unused)) static void FR_FN(fr_seq_sgemm)(
    Py_ssize_t M, Py_ssize_t n, Py_ssize_t K, const float *A, Py_ssize_t ars, Py_ssize_t aks,
    const float *B, Py_ssize_t ldb, const float *P, float *C, Py_ssize_t ldc)
{
    if (ars == 1)  /* A given as its transpose: a weight gradient, C in L2 */
        FR_FN(fr_seq_tiles)(M, n, K, A, 1, aks, B, ldb, P, C, ldc, 0);
    else if (aks == 1)  /* A row-major: an input gradient, B's panels in L2 */
        FR_FN(fr_seq_tiles)(M, n, K, A, ars, 1, B, ldb, P, C, ldc, 1);
    else
        FR_FN(fr_seq_tiles)(M, n, K, A, ars, aks, B, ldb, P, C, ldc, 1);
}

#undef FR_NV32
#undef FR_FN
#undef FR_CAT
#undef FR_CAT_
/* the parameters of this inclusion */
#undef FR_SUF
#undef FR_TARGET
#undef FR_LANES
#undef FR_VT
#undef FR_VTU
#undef FR_MR
#undef FR_SEQ_PACK_A
#undef FR_MVEC
#undef FR_MLOAD
#undef FR_MSTORE
#undef FR_SET1
#undef FR_FMA
#undef FR_ZERO
