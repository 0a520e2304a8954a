/* The input and output transforms of Winograd F(2x2, 3x3) on vectors of WVB bytes, included
 * by conv_winograd.h once per vector size with T, TS, WVB and WX (the names' suffix) defined:
 * a row of tiles runs through vectors of WVB / sizeof(T) tiles, so narrow images (few tiles
 * a row) take the narrower vectors. */

/* WVB-byte vectors (GCC vector extensions): with WVB 64 one zmm, two ymm or four xmm registers,
 * as each clone of the transforms compiles them. */
typedef T WX(wvec) __attribute__((vector_size(WVB)));
#define WV WX(wvec)
#define WVW ((idx_t)(WVB / sizeof(T)))

static inline __attribute__((always_inline)) WV WX(wload)(const T* p)
{
    WV v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) void WX(wstore)(T* p, WV v)
{
    memcpy(p, &v, sizeof v);
}

/* Input transform of tile rows th0 .. th1 of all channels of one image, a vector of tiles of
 * one tile row at a time (a row of tiles is contiguous in the phase planes and in V).
 * xq : IN  the image's stride-2 phase planes (geometry gw: stride 2), zero slack after them
 * v  : OUT V[xi][c] at xi * vs + c * ldv, tile t = (th - th0) * TW + tw (ldv >= the band's
 *      tiles + WVW: the last vector of a row writes past the row's end, into the next row,
 *      which is written after it, or past the band's tiles, which the caller zeroes after)
 */
__attribute__((target_clones("avx512f", "avx2", "default")))
void WX(fr_winograd_input)(const fr_geom* gw, const T* xq, idx_t TW, idx_t th0, idx_t th1,
                           T* v, idx_t ldv, idx_t vs)
{
    const idx_t plane = gw->Hq * gw->Wq, Wq = gw->Wq, C = gw->C;
    const idx_t xs = vs;  /* stride between the 16 xi */
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
                    const WV d0 = WX(wload)(r[0][k] + tw), d1 = WX(wload)(r[1][k] + tw),
                             d2 = WX(wload)(r[2][k] + tw), d3 = WX(wload)(r[3][k] + tw);
                    t[0][k] = d0 - d2;
                    t[1][k] = d1 + d2;
                    t[2][k] = d2 - d1;
                    t[3][k] = d1 - d3;
                }
                for (int i = 0; i < 4; ++i) {
                    WX(wstore)(out + (i * 4 + 0) * xs + tw, t[i][0] - t[i][2]);
                    WX(wstore)(out + (i * 4 + 1) * xs + tw, t[i][1] + t[i][2]);
                    WX(wstore)(out + (i * 4 + 2) * xs + tw, t[i][2] - t[i][1]);
                    WX(wstore)(out + (i * 4 + 3) * xs + tw, t[i][1] - t[i][3]);
                }
            }
        }
    }
}

/* Output transform of nf filters for tile rows th0 .. th1, plus bias, a vector of tiles of one
 * tile row at a time (its two output rows interleaved through a small buffer).
 * m : IN  [16][6][ldv] the products of one block of filters (read a vector past each row)
 * y : OUT [F, OH, OW] the image's output; writes filters f0 .. f0 + nf of those rows
 */
__attribute__((target_clones("avx512f", "avx2", "default")))
void WX(fr_winograd_output)(const fr_geom* g, const T* m, idx_t ldv, idx_t TW, idx_t th0,
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
                    const WV m0 = WX(wload)(mt + (0 + k) * xs + tw),
                             m1 = WX(wload)(mt + (4 + k) * xs + tw),
                             m2 = WX(wload)(mt + (8 + k) * xs + tw),
                             m3 = WX(wload)(mt + (12 + k) * xs + tw);
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
                    if (g->act)  /* ReLU in the store, NaN kept (conv_direct.h) */
                        for (idx_t i = 0; i < 2 * WVW; ++i)
                            both[i] = both[i] < 0 ? (T)0 : both[i];
                    T* dst = yf + (oh + r) * OW + ow;
                    if (n == 2 * WVW) {  /* whole vectors: inlined, no library call */
                        WX(wstore)(dst, WX(wload)(both));
                        WX(wstore)(dst + WVW, WX(wload)(both + WVW));
                    } else if (n >= WVW) {  /* the row's tail: two vectors that overlap */
                        WX(wstore)(dst, WX(wload)(both));
                        WX(wstore)(dst + n - WVW, WX(wload)(both + n - WVW));
                    } else {
                        memcpy(dst, both, n * sizeof(T));
                    }
                }
            }
        }
    }
}

#undef WV
#undef WVW
