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
#include "_recurrent_cells.h"

/* Small-batch products against the prepared, transposed weights wt (K1 + K2, M), row-major:
   out[n, :] = bias + a1[n, :] wt[:K1, :] + a2[n, :] wt[K1:, :]. Register-blocked: four rows
   of the batch times 32 output columns are accumulated in registers over all of K, so each
   element of wt is loaded once per four rows and the outputs are stored once; the fixed-size
   inner loops are vectorised by the compiler, and GCC's target_clones picks AVX-512, AVX2
   or baseline code at run time. Edges (fewer rows or columns) take the plain loop. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FR_CLONES
#endif
#define FR_JB 32
/* inlined into each clone of its callers, so it runs with their instruction set */
#if defined(__GNUC__)
#define FR_INLINE static inline __attribute__((always_inline))
#else
#define FR_INLINE static inline
#endif
/* One row of the batch, columns [j0, j0 + jb) into o[0, jb): blocks of 128, then 64, 32 and 16
   columns accumulated in registers over all of K (fixed sizes, so the compiler keeps the
   accumulators in vector registers; 128 are enough independent sums to cover the FMA
   latency), the last few columns in a plain loop. Every column is the same sequence of
   multiply-adds whatever block it falls in. */
#define FR_JB1 128
#define FR_ROW(T) fr_row_##T
#define FR_ROW_BLOCK(T, W)                                                                   \
    if (j0 + jb - c0 >= (W)) {                                                               \
        T c[W];                                                                              \
        for (int j = 0; j < (W); j++) c[j] = bias ? bias[c0 + j] : (T) 0;                    \
        for (int k = 0; k < K1; k++) {                                                       \
            const T *restrict w = wt + (long) k * M + c0;                                    \
            T sr = a1r[k];                                                                   \
            for (int j = 0; j < (W); j++) c[j] += sr * w[j];                                 \
        }                                                                                    \
        for (int k = 0; k < K2; k++) {                                                       \
            const T *restrict w = wt + (long) (K1 + k) * M + c0;                             \
            T sr = a2r[k];                                                                   \
            for (int j = 0; j < (W); j++) c[j] += sr * w[j];                                 \
        }                                                                                    \
        for (int j = 0; j < (W); j++) o[c0 - j0 + j] = c[j];                                 \
        c0 += (W);                                                                           \
        continue;                                                                            \
    }
#define FR_DEFINE_ROW(T)                                                                     \
FR_INLINE void fr_row_##T(int K1, int K2, int M, int j0, int jb, const T* a1r, const T* a2r, \
                          const T* wt, const T* bias, T* o) {                                \
    int c0 = j0;                                                                             \
    while (c0 < j0 + jb) {                                                                   \
        FR_ROW_BLOCK(T, 128)                                                                 \
        FR_ROW_BLOCK(T, 64)                                                                  \
        FR_ROW_BLOCK(T, 32)                                                                  \
        FR_ROW_BLOCK(T, 16)                                                                  \
        int cb = j0 + jb - c0;                                                               \
        T c[16];                                                                             \
        for (int j = 0; j < cb; j++) c[j] = bias ? bias[c0 + j] : (T) 0;                     \
        for (int k = 0; k < K1 + K2; k++) {                                                  \
            const T *restrict w = wt + (long) k * M + c0;                                    \
            T sr = k < K1 ? a1r[k] : a2r[k - K1];                                            \
            for (int j = 0; j < cb; j++) c[j] += sr * w[j];                                  \
        }                                                                                    \
        for (int j = 0; j < cb; j++) o[c0 - j0 + j] = c[j];                                  \
        c0 += cb;                                                                            \
    }                                                                                        \
}
#define FR_DEFINE_ROWS(NAME, T)                                                          \
FR_CLONES static void NAME(int N, int K1, int K2, int M, const T* a1, const T* a2,       \
                           const T* wt, const T* bias, T* out) {                         \
    for (int n0 = 0; n0 < N; n0 += 4) {                                                  \
        int nb = N - n0 < 4 ? N - n0 : 4;                                                \
        if (nb < 4) {                                                                    \
            for (int r = 0; r < nb; r++)                                                 \
                FR_ROW(T)(K1, K2, M, 0, M, a1 + (long) (n0 + r) * K1,                    \
                          a2 + (long) (n0 + r) * K2, wt, bias, out + (long) (n0 + r) * M); \
            continue;                                                                    \
        }                                                                                \
        for (int j0 = 0; j0 < M; j0 += FR_JB) {                                          \
            int jb = M - j0 < FR_JB ? M - j0 : FR_JB;                                    \
            if (nb == 4 && jb == FR_JB) {                                                \
                T c0[FR_JB], c1[FR_JB], c2[FR_JB], c3[FR_JB];                            \
                for (int j = 0; j < FR_JB; j++)                                          \
                    c0[j] = c1[j] = c2[j] = c3[j] = bias ? bias[j0 + j] : (T) 0;         \
                for (int part = 0; part < 2; part++) {                                   \
                    int K = part ? K2 : K1;                                              \
                    const T* a = part ? a2 : a1;                                         \
                    const T* wp = wt + (long) (part ? K1 : 0) * M + j0;                  \
                    for (int k = 0; k < K; k++) {                                        \
                        const T *restrict w = wp + (long) k * M;                         \
                        T s0 = a[n0 * K + k], s1 = a[(n0 + 1) * K + k];                  \
                        T s2 = a[(n0 + 2) * K + k], s3 = a[(n0 + 3) * K + k];            \
                        for (int j = 0; j < FR_JB; j++) {                                \
                            T v = w[j];                                                  \
                            c0[j] += s0 * v; c1[j] += s1 * v;                            \
                            c2[j] += s2 * v; c3[j] += s3 * v;                            \
                        }                                                                \
                    }                                                                    \
                }                                                                        \
                for (int j = 0; j < FR_JB; j++) {                                        \
                    out[n0 * M + j0 + j] = c0[j];                                        \
                    out[(n0 + 1) * M + j0 + j] = c1[j];                                  \
                    out[(n0 + 2) * M + j0 + j] = c2[j];                                  \
                    out[(n0 + 3) * M + j0 + j] = c3[j];                                  \
                }                                                                        \
            } else {                                                                     \
                for (int r = 0; r < nb; r++)                                             \
                    FR_ROW(T)(K1, K2, M, j0, jb, a1 + (long) (n0 + r) * K1,              \
                              a2 + (long) (n0 + r) * K2, wt, bias,                           \
                              out + (long) (n0 + r) * M + j0);                               \
            }                                                                            \
        }                                                                                \
    }                                                                                    \
}
FR_DEFINE_ROW(float)
FR_DEFINE_ROW(double)
FR_DEFINE_ROWS(fr_rows_f, float)
FR_DEFINE_ROWS(fr_rows_d, double)

/* Columns [j0, j0 + jb) of one row's product, bias NULL: o[0, jb) = a1 wt[:K1, j] + a2 wt[K1:, j].
   The same arithmetic per column as fr_rows_* at N = 1, so a step split over threads gives the
   values of the one-thread step. */
#define FR_DEFINE_COLS(NAME, T)                                                              \
FR_CLONES static void NAME(int K1, int K2, int M, int j0, int jb, const T* a1, const T* a2,  \
                           const T* wt, const T* bias, T* o) {                               \
    FR_ROW(T)(K1, K2, M, j0, jb, a1, a2, wt, bias, o);                                       \
}
FR_DEFINE_COLS(fr_cols_f, float)
FR_DEFINE_COLS(fr_cols_d, double)

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

/* One layer of the sampler's stack (no projection): wt (D + H, G H) as prepared; b1 the summed
   bias (LSTM, RNN) or b_ih (GRU), b2 b_hh (GRU) or NULL; h, c the state, updated in place (c
   only for the LSTM). */
#define FR_DEFINE_GEN(T, t)                                                                   \
typedef struct {                                                                             \
    int cell, D, H;                                                                          \
    const T *wt, *b1, *b2;                                                                   \
    T *h, *c;                                                                                \
} fr_gen_layer_##t;                                                                          \
                                                                                             \
/* ``length`` tokens, each drawn from softmax(logits / temperature) (uniforms u), embedded    \
   (table row), stepped through the L layers and projected by the head (head_t (H_L, V),      \
   head_b (V)); logits0 gives the first draw. On return ids holds the tokens and every        \
   layer's state is the one after the last token. The threads split each layer's hidden      \
   units (all G gates of a unit in one thread, so the cell needs no exchange); one barrier    \
   per layer and one per token, where thread 0 draws. -> 0, or -1 if memory ran out. */      \
static int fr_generate_##t(int isa, int nthreads, int L, fr_gen_layer_##t* layers, int V,   \
                           int E, const T* table, const T* head_t, const T* head_b,          \
                           const T* logits0, double temperature, const double* u,           \
                           long length, long* ids) {                                         \
    int Hl = layers[L - 1].H;                                                                \
    long total = 0;                                                                          \
    for (int l = 0; l < L; l++)                                                              \
        total += 4L * 4 * layers[l].H + layers[l].H;                                         \
    /* per layer: gates (G H), GRU's second product (G H), the biases in the threads'       \
       blocked order (2 x G H), the second state buffer (H) */                                \
    T* buf = (T*) malloc(sizeof(T) * (size_t) (total + E + V));                     \
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
    T* logits = at;                                                                          \
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
            int G = ly->cell == FR_LSTM ? 4 : ly->cell == FR_GRU ? 3 : 1, H = ly->H;         \
            int chunk = (H + nt - 1) / nt;                                                   \
            chunk = (chunk + align - 1) / align * align;                                     \
            int u0 = tid * chunk < H ? tid * chunk : H;                                      \
            int u1 = u0 + chunk < H ? u0 + chunk : H;                                        \
            int sz = u1 - u0, K = ly->D + H;                                                 \
            if (sz == 0) continue;                                                           \
            T* pw = (T*) malloc(sizeof(T) * (size_t) K * (size_t) (G * sz));                 \
            if (!pw) { _Pragma("omp atomic write") failed = 1; break; }                      \
            panel[l] = pw;                                                                   \
            for (int k = 0; k < K; k++)                                                      \
                for (int q = 0; q < G; q++)                                                  \
                    memcpy(pw + (long) k * G * sz + q * sz,                                  \
                           ly->wt + (long) k * G * H + q * H + u0, sizeof(T) * (size_t) sz); \
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
                int G = ly->cell == FR_LSTM ? 4 : ly->cell == FR_GRU ? 3 : 1, H = ly->H;     \
                int chunk = (H + nt - 1) / nt;                                               \
                chunk = (chunk + align - 1) / align * align;                                 \
                int u0 = tid * chunk < H ? tid * chunk : H;                                  \
                int u1 = u0 + chunk < H ? u0 + chunk : H;                                    \
                int sz = u1 - u0, M = G * sz;                                                \
                const T* hp = hb[2 * l + my_cur];                                            \
                T* hn = hb[2 * l + 1 - my_cur];                                              \
                T *g = gates[4 * l], *g2 = gates[4 * l + 1];                                 \
                if (sz > 0) {                                                                \
                    if (ly->cell == FR_GRU) {                                                \
                        FR_COLS(T)(K1, 0, M, 0, M, in, NULL, panel[l], NULL, g + G * u0);    \
                        FR_COLS(T)(H, 0, M, 0, M, hp, NULL, panel[l] + (long) K1 * M, NULL,  \
                                   g2 + G * u0);                                             \
                    } else {                                                                 \
                        FR_COLS(T)(K1, H, M, 0, M, in, hp, panel[l], NULL, g + G * u0);      \
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
                FR_COLS(T)(Hl, 0, V, 0, V, in, NULL, head_t, head_b, logits);                \
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
