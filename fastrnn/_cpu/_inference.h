/* The prepared inference kernels (fastrnn/_cpu/inference.pyx): small-batch products against
   prepared weights, and the sampling loop of an embedding -> recurrent stack -> linear model. */
#ifndef FASTRNN_INFERENCE_H
#define FASTRNN_INFERENCE_H

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include "_recurrent_cells.h"

/* Memory for weights a loop streams through at every step: from 256 KiB up, 2 MiB-aligned and
   offered to transparent huge pages (physically contiguous, so no placement of 4 KiB pages
   makes some copies slower than others); free() releases it. */
static void* fr_weights_alloc(size_t bytes) {
    const size_t huge = (size_t) 1 << 21;
    if (bytes < ((size_t) 1 << 18)) return malloc(bytes);
    size_t size = (bytes + huge - 1) / huge * huge;
    void* p = NULL;
    if (posix_memalign(&p, huge, size) != 0) return NULL;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, size, MADV_HUGEPAGE);
#endif
    return p;
}

/* Small-batch products against prepared weights.

   The weights are the transposed matrix wt (K, M) (K inputs, M outputs) stored as panels of
   FR_PW columns: panel p holds columns [p FR_PW, p FR_PW + wd), wd = min(FR_PW, M - p FR_PW),
   at offset p FR_PW K, one row of wd values per input k. A product streams each panel from
   contiguous memory (no 4 KiB-strided rows to defeat the prefetcher and the TLB).

   out[n, :] = bias + a1[n, :] wt[:K1, :] + a2[n, :] wt[K1:, :]: register-blocked over the
   columns of a panel (blocks of 128, 64, 32, 16 columns: fixed sizes, so the accumulators
   stay in vector registers), four rows of the batch at a time where there are four (each
   weight loaded once per four rows). Every output is the same sequence of multiply-adds,
   k = 0, 1, ..., whatever block it falls in. GCC's target_clones compiles AVX-512, AVX2 and
   baseline versions, picked at run time. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FR_CLONES
#endif
/* inlined into each clone of its callers, so it runs with their instruction set */
#if defined(__GNUC__)
#define FR_INLINE static inline __attribute__((always_inline))
#else
#define FR_INLINE static inline
#endif
#define FR_PW 128
#define FR_JB 32

/* Offset of element (k, j) of a (K, M) panel-packed matrix. */
/* The sampler's gates per hidden unit, and thread tid's hidden units [u0, u1) of a layer of H
   (nt chunks rounded up to `align` units; the last threads may get none). */
static inline int fr_gen_gates(int cell) {
    return cell == FR_LSTM ? 4 : cell == FR_GRU ? 3 : 1;
}
static inline void fr_gen_units(int H, int nt, int tid, int align, int *u0, int *u1) {
    int chunk = (H + nt - 1) / nt;
    chunk = (chunk + align - 1) / align * align;
    *u0 = tid * chunk < H ? tid * chunk : H;
    *u1 = *u0 + chunk < H ? *u0 + chunk : H;
}

static inline long fr_panel_at(long K, long M, long k, long j) {
    long p0 = j / FR_PW * FR_PW;
    long wd = M - p0 < FR_PW ? M - p0 : FR_PW;
    return p0 * K + k * wd + (j - p0);
}

/* 64-byte vectors of GCC's vector extension: explicit accumulators the compiler keeps in
   registers (a zmm each under AVX-512, two ymm under AVX2, four xmm otherwise); loads and
   stores through memcpy (unaligned, no aliasing question). */
typedef float fr_vec_float __attribute__((vector_size(64)));
typedef double fr_vec_double __attribute__((vector_size(64)));
#define FR_VL(T) ((int) (64 / sizeof(T)))
#define FR_VLOAD(VT, p) ({ VT v_; memcpy(&v_, (p), 64); v_; })

/* One row, columns [jj, wd) of one panel (base, K1 + K2 rows of wd): o[jj, wd) = (acc ? o :
   bias or 0) + the products. */
#define FR_COLS_BLOCK(T, W)                                                                  \
    if (wd - jj >= (W)) {                                                                    \
        enum { NV = (W) / FR_VL(T) };                                                        \
        fr_vec_##T c[NV];                                                                    \
        for (int v = 0; v < NV; v++)                                                         \
            c[v] = acc ? FR_VLOAD(fr_vec_##T, o + jj + v * FR_VL(T))                         \
                 : bias ? FR_VLOAD(fr_vec_##T, bias + jj + v * FR_VL(T))                     \
                        : (fr_vec_##T) {0};                                                  \
        for (int k = 0; k < K1 + K2; k++) {                                                  \
            const T *w = base + (long) k * wd + jj;                                          \
            T sr = k < K1 ? a1r[k] : a2r[k - K1];                                            \
            for (int v = 0; v < NV; v++)                                                     \
                c[v] += sr * FR_VLOAD(fr_vec_##T, w + v * FR_VL(T));                         \
        }                                                                                    \
        for (int v = 0; v < NV; v++) memcpy(o + jj + v * FR_VL(T), &c[v], 64);               \
        jj += (W);                                                                           \
        continue;                                                                            \
    }
#define FR_DEFINE_PANEL_COLS(T)                                                              \
FR_INLINE void fr_panel_cols_##T(int K1, int K2, int wd, int jj, const T* a1r, const T* a2r, \
                                 const T* base, const T* bias, int acc, T* o) {              \
    while (jj < wd) {                                                                        \
        FR_COLS_BLOCK(T, 128)                                                                \
        FR_COLS_BLOCK(T, 64)                                                                 \
        FR_COLS_BLOCK(T, 32)                                                                 \
        FR_COLS_BLOCK(T, 16)                                                                 \
        int cb = wd - jj;                                                                    \
        T c[16];                                                                             \
        for (int j = 0; j < cb; j++) c[j] = acc ? o[jj + j] : bias ? bias[jj + j] : (T) 0;   \
        for (int k = 0; k < K1 + K2; k++) {                                                  \
            const T *restrict w = base + (long) k * wd + jj;                                 \
            T sr = k < K1 ? a1r[k] : a2r[k - K1];                                            \
            for (int j = 0; j < cb; j++) c[j] += sr * w[j];                                  \
        }                                                                                    \
        for (int j = 0; j < cb; j++) o[jj + j] = c[j];                                       \
        jj += cb;                                                                            \
    }                                                                                        \
}                                                                                            \
/* One row of the batch, all M columns. */                                                   \
FR_INLINE void fr_row_##T(int K1, int K2, int M, const T* a1r, const T* a2r, const T* wp,    \
                          const T* bias, int acc, T* o) {                                    \
    long K = K1 + K2;                                                                        \
    for (int p0 = 0; p0 < M; p0 += FR_PW) {                                                  \
        int wd = M - p0 < FR_PW ? M - p0 : FR_PW;                                            \
        fr_panel_cols_##T(K1, K2, wd, 0, a1r, a2r, wp + p0 * K, bias ? bias + p0 : NULL,     \
                          acc, o + p0);                                                      \
    }                                                                                        \
}
FR_DEFINE_PANEL_COLS(float)
FR_DEFINE_PANEL_COLS(double)

#define FR_DEFINE_ROWS(NAME, ROWNAME, T)                                                     \
FR_CLONES static void ROWNAME(int K1, int K2, int M, const T* a1r, const T* a2r,             \
                              const T* wp, const T* bias, T* o) {                            \
    fr_row_##T(K1, K2, M, a1r, a2r, wp, bias, 0, o);                                         \
}                                                                                            \
/* out (N, M) = (acc ? out : bias or 0) + a1 wt[:K1] + a2 wt[K1:] */                        \
FR_CLONES static void NAME##_acc(int N, int K1, int K2, int M, const T* a1, const T* a2,     \
                                 const T* wp, const T* bias, int acc, T* out) {              \
    long K = K1 + K2;                                                                        \
    for (int n0 = 0; n0 < N; n0 += 4) {                                                      \
        if (N - n0 < 4) {                                                                    \
            for (int n = n0; n < N; n++)                                                     \
                fr_row_##T(K1, K2, M, a1 + (long) n * K1, a2 + (long) n * K2, wp, bias, acc, \
                           out + (long) n * M);                                              \
            break;                                                                           \
        }                                                                                    \
        for (int p0 = 0; p0 < M; p0 += FR_PW) {                                              \
            int wd = M - p0 < FR_PW ? M - p0 : FR_PW;                                        \
            const T* base = wp + p0 * K;                                                     \
            const T* bp = bias ? bias + p0 : NULL;                                           \
            int jj = 0;                                                                      \
            for (; jj + FR_JB <= wd; jj += FR_JB) {                                          \
                enum { NV = FR_JB / FR_VL(T) };                                              \
                fr_vec_##T c[4][NV];                                                         \
                for (int r = 0; r < 4; r++)                                                  \
                    for (int v = 0; v < NV; v++)                                             \
                        c[r][v] = acc ? FR_VLOAD(fr_vec_##T, out + (long) (n0 + r) * M + p0  \
                                                                + jj + v * FR_VL(T))         \
                                : bp ? FR_VLOAD(fr_vec_##T, bp + jj + v * FR_VL(T))          \
                                     : (fr_vec_##T) {0};                                     \
                for (int part = 0; part < 2; part++) {                                       \
                    int Kp = part ? K2 : K1;                                                 \
                    const T* a = part ? a2 : a1;                                             \
                    const T* w0 = base + (long) (part ? K1 : 0) * wd + jj;                   \
                    for (int k = 0; k < Kp; k++) {                                           \
                        const T* w = w0 + (long) k * wd;                                     \
                        T s[4] = {a[n0 * Kp + k], a[(n0 + 1) * Kp + k],                      \
                                  a[(n0 + 2) * Kp + k], a[(n0 + 3) * Kp + k]};               \
                        for (int v = 0; v < NV; v++) {                                       \
                            fr_vec_##T wv = FR_VLOAD(fr_vec_##T, w + v * FR_VL(T));          \
                            for (int r = 0; r < 4; r++) c[r][v] += s[r] * wv;                \
                        }                                                                    \
                    }                                                                        \
                }                                                                            \
                for (int r = 0; r < 4; r++)                                                  \
                    for (int v = 0; v < NV; v++)                                             \
                        memcpy(out + (long) (n0 + r) * M + p0 + jj + v * FR_VL(T), &c[r][v], \
                               64);                                                          \
            }                                                                                \
            if (jj < wd) /* the panel's last columns, row by row */                          \
                for (int n = n0; n < n0 + 4; n++)                                            \
                    fr_panel_cols_##T(K1, K2, wd, jj, a1 + (long) n * K1,                    \
                                      a2 + (long) n * K2, base, bp, acc,                     \
                                      out + (long) n * M + p0);                              \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
FR_CLONES static void NAME(int N, int K1, int K2, int M, const T* a1, const T* a2,           \
                           const T* wp, const T* bias, T* out) {                             \
    NAME##_acc(N, K1, K2, M, a1, a2, wp, bias, 0, out);                                      \
}
FR_DEFINE_ROWS(fr_rows_f, fr_cols_f, float)
FR_DEFINE_ROWS(fr_rows_d, fr_cols_d, double)

/* Pack a natural (K, M) matrix (row stride ld) as panels into dst (K M elements). */
#define FR_DEFINE_PACK(NAME, T)                                                              \
static void NAME(const T* src, long ld, int K, int M, T* dst) {                              \
    for (int p0 = 0; p0 < M; p0 += FR_PW) {                                                  \
        int wd = M - p0 < FR_PW ? M - p0 : FR_PW;                                            \
        for (int k = 0; k < K; k++)                                                          \
            memcpy(dst + (long) p0 * K + (long) k * wd, src + (long) k * ld + p0,            \
                   sizeof(T) * (size_t) wd);                                                 \
    }                                                                                        \
}
FR_DEFINE_PACK(fr_pack_f, float)
FR_DEFINE_PACK(fr_pack_d, double)

/* numpy's sum of a contiguous float64 array (first element, then the pairwise sum of the rest,
   eight accumulators per block of up to 128), so the sampler's probabilities round as
   numpy.sum's do. */
static double fr_pairwise_sum(const double* a, long n) {
    if (n < 8) {
        double r = 0.;
        for (long i = 0; i < n; i++) r += a[i];
        return r;
    }
    if (n <= 128) {
        double r[8];
        long i;
        for (int k = 0; k < 8; k++) r[k] = a[k];
        for (i = 8; i < n - (n % 8); i += 8)
            for (int k = 0; k < 8; k++) r[k] += a[i + k];
        double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) res += a[i];
        return res;
    }
    long n2 = n / 2;
    n2 -= n2 % 8;
    return fr_pairwise_sum(a, n2) + fr_pairwise_sum(a + n2, n - n2);
}

static double fr_numpy_sum(const double* a, long n) {
    return n == 0 ? 0. : a[0] + fr_pairwise_sum(a + 1, n - 1);
}

/* One draw from softmax(logits / temperature) with the uniform u in [0, 1): the first index
   whose cumulative probability reaches u * sum(p) (numpy.searchsorted, side "left"), at most
   V - 1. p and cum are scratch of V doubles. */
static long fr_draw(long V, const double* z, double u, double* p, double* cum) {
    double m = z[0];
    for (long i = 1; i < V; i++) m = z[i] > m ? z[i] : m;
    for (long i = 0; i < V; i++) p[i] = exp(z[i] - m);
    double s = fr_numpy_sum(p, V);
    double run = 0.;
    for (long i = 0; i < V; i++) {
        p[i] /= s;
        run += p[i];
        cum[i] = run;
    }
    double v = u * fr_numpy_sum(p, V);
    long lo = 0, hi = V;  /* first index with cum >= v */
    while (lo < hi) {
        long mid = lo + (hi - lo) / 2;
        if (cum[mid] < v) lo = mid + 1; else hi = mid;
    }
    return lo < V - 1 ? lo : V - 1;
}

/* One layer of the sampler's stack (no projection): w_ih (G H, D), w_hh (G H, H); b1 the summed
   bias (LSTM, RNN) or b_ih (GRU), b2 b_hh (GRU) or NULL; h, c the state, updated in place (c
   only for the LSTM). */
#define FR_DEFINE_GEN(T, t)                                                                   \
typedef struct {                                                                             \
    int cell, D, H;                                                                          \
    const T *w_ih, *w_hh, *b1, *b2;                                                          \
    T *h, *c;                                                                                \
} fr_gen_layer_##t;                                                                          \
                                                                                             \
/* ``length`` tokens, each drawn from softmax(logits / temperature) (uniforms u), embedded    \
   (table row), stepped through the L layers and projected by the head (head_w (V, H_L),      \
   head_b (V)); logits0 gives the first draw. On return ids holds the tokens and every        \
   layer's state is the one after the last token. The threads split each layer's hidden      \
   units (all G gates of a unit in one thread, so the cell needs no exchange); one barrier    \
   per layer and one per token, where thread 0 draws. -> 0, or -1 if memory ran out. */      \
static int fr_generate_##t(int isa, int nthreads, int L, fr_gen_layer_##t* layers, int V,   \
                           int E, const T* table, const T* head_w, const T* head_b,          \
                           const T* logits0, double temperature, const double* u,           \
                           long length, long* ids) {                                         \
    int Hl = layers[L - 1].H;                                                                \
    long total = 0;                                                                          \
    for (int l = 0; l < L; l++)                                                              \
        total += 4L * 4 * layers[l].H + layers[l].H;                                         \
    /* per layer: gates (G H), GRU's second product (G H), the biases in the threads'       \
       blocked order (2 x G H), the second state buffer (H) */                                \
    T* buf = (T*) malloc(sizeof(T) * (size_t) (total + E + V + (long) Hl * V));               \
    double* dz = (double*) malloc(sizeof(double) * (size_t) (3 * V));                        \
    T** hb = (T**) malloc(sizeof(T*) * (size_t) (2 * L));                                    \
    T** gates = (T**) malloc(sizeof(T*) * (size_t) (4 * L));                                 \
    if (!buf || !dz || !hb || !gates) {                                                      \
        free(buf); free(dz); free(hb); free(gates);                                          \
        return -1;                                                                           \
    }                                                                                        \
    T* at = buf;                                                                             \
    for (int l = 0; l < L; l++) {                                                            \
        long GH = (long) (layers[l].cell == FR_LSTM ? 4 : layers[l].cell == FR_GRU ? 3 : 1)  \
                  * layers[l].H;                                                             \
        gates[4 * l] = at; at += GH;                                                         \
        gates[4 * l + 1] = at; at += GH;                                                     \
        gates[4 * l + 2] = at; at += GH;                                                     \
        gates[4 * l + 3] = at; at += GH;                                                     \
        hb[2 * l] = layers[l].h;                                                             \
        hb[2 * l + 1] = at; at += layers[l].H;                                               \
    }                                                                                        \
    T* x = at; at += E;                                                                      \
    T* logits = at; at += V;                                                                 \
    T* head_p = at; /* the head's transpose (H_L, V), panel-packed */                        \
    for (int j = 0; j < V; j++)                                                              \
        for (int k = 0; k < Hl; k++)                                                         \
            head_p[fr_panel_at(Hl, V, k, j)] = head_w[(long) j * Hl + k];                    \
    double *z = dz, *p = dz + V, *cum = dz + 2 * V;                                          \
    int cur = 0;                                                                             \
    const int align = (int) (64 / sizeof(T));                                                \
    int failed = 0;                                                                          \
    _Pragma("omp parallel num_threads(nthreads)")                                            \
    {                                                                                        \
        int tid = 0, nt = 1;                                                                 \
        FR_OMP_IDS(tid, nt);                                                                 \
        int my_cur = 0;                                                                      \
        /* this thread's columns of every layer's weights, packed by the thread itself (so   \
           they are read from its own cache): row k holds the G gates' columns of its units  \
           side by side, in the order of its block of the gates' buffer */                  \
        T** panel = (T**) calloc((size_t) L, sizeof(T*));                                    \
        if (!panel) { _Pragma("omp atomic write") failed = 1; }                              \
        for (int l = 0; panel && l < L; l++) {                                               \
            fr_gen_layer_##t* ly = &layers[l];                                               \
            int G = fr_gen_gates(ly->cell), H = ly->H, u0, u1;                               \
            fr_gen_units(H, nt, tid, align, &u0, &u1);                                       \
            int sz = u1 - u0, K = ly->D + H;                                                 \
            if (sz == 0) continue;                                                           \
            int M = G * sz, D = ly->D;                                                       \
            T* pw = (T*) fr_weights_alloc(sizeof(T) * (size_t) K * (size_t) M);              \
            if (!pw) { _Pragma("omp atomic write") failed = 1; break; }                      \
            panel[l] = pw;                                                                   \
            /* GRU: x's rows and h's rows as two matrices (the cell takes them apart) */     \
            int gru = ly->cell == FR_GRU;                                                    \
            T* ph = gru ? pw + (long) D * M : pw;                                            \
            for (int j = 0; j < M; j++) {                                                    \
                long col = (long) (j / sz) * H + u0 + j % sz;                                \
                for (int k = 0; k < D; k++)                                                  \
                    pw[fr_panel_at(gru ? D : K, M, k, j)] = ly->w_ih[col * D + k];           \
                for (int k = 0; k < H; k++)                                                  \
                    ph[fr_panel_at(gru ? H : K, M, gru ? k : D + k, j)] =                    \
                        ly->w_hh[col * H + k];                                               \
            }                                                                                \
            for (int q = 0; q < G; q++) /* the biases in the same order */                   \
                for (int v = 0; v < sz; v++) {                                               \
                    gates[4 * l + 2][G * u0 + q * sz + v] = ly->b1[q * H + u0 + v];          \
                    gates[4 * l + 3][G * u0 + q * sz + v] =                                  \
                        ly->b2 ? ly->b2[q * H + u0 + v] : (T) 0;                             \
                }                                                                            \
        }                                                                                    \
        _Pragma("omp barrier")                                                               \
        int stop;                                                                            \
        _Pragma("omp atomic read") stop = failed;                                            \
        for (long s = 0; !stop && s < length; s++) {                                         \
            if (tid == 0) {                                                                  \
                const T* lg = s == 0 ? logits0 : logits;                                     \
                for (int i = 0; i < V; i++) z[i] = (double) lg[i] / temperature;             \
                long id = fr_draw(V, z, u[s], p, cum);                                       \
                ids[s] = id;                                                                 \
                memcpy(x, table + id * E, sizeof(T) * (size_t) E);                           \
            }                                                                                \
            _Pragma("omp barrier")                                                           \
            const T* in = x;                                                                 \
            int K1 = E;                                                                      \
            for (int l = 0; l < L; l++) {                                                    \
                fr_gen_layer_##t* ly = &layers[l];                                           \
                int G = fr_gen_gates(ly->cell), H = ly->H, u0, u1;                           \
                fr_gen_units(H, nt, tid, align, &u0, &u1);                                   \
                int sz = u1 - u0, M = G * sz;                                                \
                const T* hp = hb[2 * l + my_cur];                                            \
                T* hn = hb[2 * l + 1 - my_cur];                                              \
                T *g = gates[4 * l], *g2 = gates[4 * l + 1];                                 \
                if (sz > 0) {                                                                \
                    if (ly->cell == FR_GRU) {                                                \
                        FR_COLS(T)(K1, 0, M, in, NULL, panel[l], NULL, g + G * u0);          \
                        FR_COLS(T)(H, 0, M, hp, NULL, panel[l] + (long) K1 * M, NULL,        \
                                   g2 + G * u0);                                             \
                    } else {                                                                 \
                        FR_COLS(T)(K1, H, M, in, hp, panel[l], NULL, g + G * u0);            \
                    }                                                                        \
                    fr_cell_fwd_##t(isa, ly->cell, 1, g, g2, gates[4 * l + 2],               \
                                    gates[4 * l + 3], hp, ly->c, hn, ly->c, NULL, H, sz, u0, \
                                    u1);                                                     \
                }                                                                            \
                _Pragma("omp barrier")                                                       \
                in = hn;                                                                     \
                K1 = H;                                                                      \
            }                                                                                \
            my_cur = 1 - my_cur;                                                             \
            if (tid == 0 && s + 1 < length)                                                  \
                FR_COLS(T)(Hl, 0, V, in, NULL, head_p, head_b, logits);                      \
        }                                                                                    \
        if (tid == 0) cur = my_cur;                                                          \
        for (int l = 0; panel && l < L; l++) free(panel[l]);                                 \
        free(panel);                                                                         \
    }                                                                                        \
    if (failed) {                                                                            \
        free(buf); free(dz); free(hb); free(gates);                                          \
        return -1;                                                                           \
    }                                                                                        \
    if (cur == 1) /* the last states sit in the second buffers */                            \
        for (int l = 0; l < L; l++)                                                          \
            memcpy(layers[l].h, hb[2 * l + 1], sizeof(T) * (size_t) layers[l].H);            \
    free(buf); free(dz); free(hb); free(gates);                                              \
    return 0;                                                                                \
}

#ifdef _OPENMP
#define FR_OMP_IDS(tid, nt) do { tid = omp_get_thread_num(); nt = omp_get_num_threads(); } while (0)
#else
#define FR_OMP_IDS(tid, nt) do { (void) nthreads; } while (0)
#endif
#define FR_COLS(T) FR_COLS_##T
#define FR_COLS_float fr_cols_f
#define FR_COLS_double fr_cols_d
FR_DEFINE_GEN(float, f)
FR_DEFINE_GEN(double, d)

#endif /* FASTRNN_INFERENCE_H */
