/* Winograd F(2x2, 3x3) for 3x3, stride 1, dilation 1 convolutions: one instantiation per float
 * type, included by conv_direct.c with T and TS defined.
 *
 * Output tile (th, tw) is y[2th .. 2th+1, 2tw .. 2tw+1]; it reads the 4x4 input tile
 * xpad[2th .. 2th+3, 2tw .. 2tw+3]. With the input split into its four stride-2 phases
 * (fr_pack_input with stride 2: plane (a, b)[u][v] = xpad[2u + a, 2v + b]), row r and column k
 * of the tiles of one tile row are contiguous runs of a phase plane, so the transforms run
 * along the tiles of a row (vectorisable) and write the tiles of a band of rows contiguously:
 *
 *   V[xi][c][t] = (B^T d B)[xi]      d = the tile's 4x4 input, B^T = [1 0 -1 0; 0 1 1 0;
 *                                                                     0 -1 1 0; 0 1 0 -1]
 *   M[xi][f][t] = sum over c of U[xi][c][f] V[xi][c][t]   (16 products: the direct micro-kernel
 *                                                           with tap c at offset c * ldv)
 *   y tile      = A^T M A + b        A^T = [1 1 1 0; 0 1 -1 -1]
 *
 * U = G w G^T (G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]) is computed once per call by the
 * caller. 16 multiplies per tile, channel and filter instead of 36.
 */

#define WCAT_(a, b) a##_##b
#define WCAT(a, b) WCAT_(a, b)
#define WN(n) WCAT(n, TS)

/* 64-byte vectors (GCC vector extensions): one zmm, two ymm or four xmm registers, as each
 * clone of the transforms compiles them. */
typedef T WN(wvec) __attribute__((vector_size(64)));
#define WV WN(wvec)
#define WVW ((idx_t)(64 / sizeof(T)))

static inline __attribute__((always_inline)) WV WN(wload)(const T* p)
{
    WV v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) void WN(wstore)(T* p, WV v)
{
    memcpy(p, &v, sizeof v);
}

/* Input transform of tile rows th0 .. th1 of all channels of one image, a vector of tiles of
 * one tile row at a time (a row of tiles is contiguous in the phase planes and in V).
 * xq : IN  the image's stride-2 phase planes (geometry gw: stride 2), zero slack after them
 * v  : OUT [16][C][ldv], tile t = (th - th0) * TW + tw; columns past the band's tiles zeroed
 *      (ldv >= the band's tiles + WVW: the last vector of a row writes past the row's end, into
 *      the next row, which is written after it, or past the band's tiles)
 */
__attribute__((target_clones("avx512f", "avx2", "default")))
void WN(fr_winograd_input)(const fr_geom* gw, const T* xq, idx_t TW, idx_t th0, idx_t th1,
                           T* v, idx_t ldv)
{
    const idx_t plane = gw->Hq * gw->Wq, Wq = gw->Wq, C = gw->C;
    const idx_t nt = (th1 - th0) * TW;
    const idx_t xs = C * ldv;  /* stride between the 16 xi */
    for (idx_t c = 0; c < C; ++c) {
        const T* pc = xq + c * 4 * plane;  /* phases (a, b) at (2a + b) * plane */
        for (idx_t th = th0; th < th1; ++th) {
            const T* r[4][4];
            for (int i = 0; i < 4; ++i)
                for (int k = 0; k < 4; ++k)
                    r[i][k] = pc + ((i & 1) * 2 + (k & 1)) * plane + (th + (i >> 1)) * Wq
                              + (k >> 1);
            T* out = v + c * ldv + (th - th0) * TW;
            for (idx_t tw = 0; tw < TW; tw += WVW) {
                WV t[4][4];
                for (int k = 0; k < 4; ++k) {
                    const WV d0 = WN(wload)(r[0][k] + tw), d1 = WN(wload)(r[1][k] + tw),
                             d2 = WN(wload)(r[2][k] + tw), d3 = WN(wload)(r[3][k] + tw);
                    t[0][k] = d0 - d2;
                    t[1][k] = d1 + d2;
                    t[2][k] = d2 - d1;
                    t[3][k] = d1 - d3;
                }
                for (int i = 0; i < 4; ++i) {
                    WN(wstore)(out + (i * 4 + 0) * xs + tw, t[i][0] - t[i][2]);
                    WN(wstore)(out + (i * 4 + 1) * xs + tw, t[i][1] + t[i][2]);
                    WN(wstore)(out + (i * 4 + 2) * xs + tw, t[i][2] - t[i][1]);
                    WN(wstore)(out + (i * 4 + 3) * xs + tw, t[i][1] - t[i][3]);
                }
            }
        }
        for (int xi = 0; xi < 16; ++xi)
            memset(v + (xi * C + c) * ldv + nt, 0, (ldv - nt) * sizeof(T));
    }
}

/* Weight transform U = G w G^T of filter blocks fb0 .. fb1, packed for the products:
 * u[((xi * nfb + fb) * C + c) * 6 + j] = U[xi] of filter 6 fb + j and channel c (zero for
 * filters past F), nfb = ceil(F / 6).
 * w : IN  [F][C][3][3]
 */
void WN(fr_winograd_weights)(const T* w, idx_t F, idx_t C, idx_t fb0, idx_t fb1, T* u)
{
    const idx_t nfb = (F + 5) / 6;
    for (idx_t fb = fb0; fb < fb1; ++fb)
        for (idx_t c = 0; c < C; ++c)
            for (int j = 0; j < 6; ++j) {
                const idx_t f = fb * 6 + j;
                T U[16];
                if (f < F) {
                    const T* g = w + (f * C + c) * 9;
                    T t[4][3];
                    for (int k = 0; k < 3; ++k) {  /* t = G g */
                        t[0][k] = g[k];
                        t[1][k] = (g[k] + g[3 + k] + g[6 + k]) * (T)0.5;
                        t[2][k] = (g[k] - g[3 + k] + g[6 + k]) * (T)0.5;
                        t[3][k] = g[6 + k];
                    }
                    for (int i = 0; i < 4; ++i) {  /* U = t G^T */
                        U[i * 4 + 0] = t[i][0];
                        U[i * 4 + 1] = (t[i][0] + t[i][1] + t[i][2]) * (T)0.5;
                        U[i * 4 + 2] = (t[i][0] - t[i][1] + t[i][2]) * (T)0.5;
                        U[i * 4 + 3] = t[i][2];
                    }
                } else {
                    memset(U, 0, sizeof U);
                }
                for (int xi = 0; xi < 16; ++xi)
                    u[((xi * nfb + fb) * C + c) * 6 + j] = U[xi];
            }
}

/* Output transform of nf filters for tile rows th0 .. th1, plus bias, a vector of tiles of one
 * tile row at a time (its two output rows interleaved through a small buffer).
 * m : IN  [16][6][ldv] the products of one block of filters (read a vector past each row)
 * y : OUT [F, OH, OW] the image's output; writes filters f0 .. f0 + nf of those rows
 */
__attribute__((target_clones("avx512f", "avx2", "default")))
void WN(fr_winograd_output)(const fr_geom* g, const T* m, idx_t ldv, idx_t TW, idx_t th0,
                            idx_t th1, const T* b, T* y, idx_t f0, int nf)
{
    const idx_t xs = 6 * ldv, OW = g->OW;
    for (int f = 0; f < nf; ++f) {
        const T bias = b ? b[f0 + f] : (T)0;
        T* yf = y + (f0 + f) * g->OH * OW;
        for (idx_t th = th0; th < th1; ++th) {
            const T* mt = m + f * ldv + (th - th0) * TW;
            const idx_t oh = 2 * th;
            const int rows = oh + 1 < g->OH ? 2 : 1;
            for (idx_t tw = 0; tw < TW; tw += WVW) {
                WV s[2][4];
                for (int k = 0; k < 4; ++k) {
                    const WV m0 = WN(wload)(mt + (0 + k) * xs + tw),
                             m1 = WN(wload)(mt + (4 + k) * xs + tw),
                             m2 = WN(wload)(mt + (8 + k) * xs + tw),
                             m3 = WN(wload)(mt + (12 + k) * xs + tw);
                    s[0][k] = m0 + m1 + m2;
                    s[1][k] = m1 - m2 - m3;
                }
                const idx_t ow = 2 * tw;
                const idx_t n = OW - ow < 2 * WVW ? OW - ow : 2 * WVW;
                for (int r = 0; r < rows; ++r) {
                    const WV even = s[r][0] + s[r][1] + s[r][2] + bias;
                    const WV odd = s[r][1] - s[r][2] - s[r][3] + bias;
                    T e[WVW], o[WVW], both[2 * WVW];
                    memcpy(e, &even, sizeof e);
                    memcpy(o, &odd, sizeof o);
                    for (idx_t i = 0; i < WVW; ++i) {
                        both[2 * i] = e[i];
                        both[2 * i + 1] = o[i];
                    }
                    T* dst = yf + (oh + r) * OW + ow;
                    if (n == 2 * WVW) {  /* whole vectors: inlined, no library call */
                        WN(wstore)(dst, WN(wload)(both));
                        WN(wstore)(dst + WVW, WN(wload)(both + WVW));
                    } else {
                        memcpy(dst, both, n * sizeof(T));
                    }
                }
            }
        }
    }
}

/* One image: bands of tile rows; per band the input transform, then per block of 6 filters
 * the 16 products and the output transform.
 * g    : the convolution's geometry; gw : the same input with stride 2 (phase planes)
 * xq   : scratch [gw->x_size]; v : scratch [16][C][ldv]; m : scratch [16][6][ldv]
 * u    : IN  [16][nfb][C][6] packed transformed weights
 * off  : IN  [C] offsets c * ldv
 */
void WN(fr_winograd_image)(int isa, const fr_geom* g, const fr_geom* gw, const T* x, const T* u,
                           const idx_t* off, const T* b, T* y, T* xq, T* v, T* m, idx_t band,
                           idx_t ldv)
{
    const idx_t TH = (g->OH + 1) / 2, TW = (g->OW + 1) / 2, C = g->C;
    const idx_t nfb = (g->F + 5) / 6;
    WN(fr_pack_input)(gw, x, xq);
    for (idx_t th0 = 0; th0 < TH; th0 += band) {
        const idx_t th1 = th0 + band < TH ? th0 + band : TH;
        const idx_t nt = (th1 - th0) * TW;
        WN(fr_winograd_input)(gw, xq, TW, th0, th1, v, ldv);
        for (idx_t fb = 0; fb < nfb; ++fb) {
            const int nf = g->F - fb * 6 < 6 ? (int)(g->F - fb * 6) : 6;
            for (int xi = 0; xi < 16; ++xi)
                DN(kfwd)(isa, nf, v + xi * C * ldv, off, C, u + (xi * nfb + fb) * C * 6,
                         m + xi * 6 * ldv, ldv, nt);
            WN(fr_winograd_output)(g, m, ldv, TW, th0, th1, b, y, fb * 6, nf);
        }
    }
}

#undef WV
#undef WVW
#undef WN
#undef WCAT
#undef WCAT_
