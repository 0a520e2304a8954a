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

/* Input transform of tile rows th0 .. th1 of all channels of one image.
 * xq : IN  the image's stride-2 phase planes (geometry gw: stride 2)
 * v  : OUT [16][C][ldv], tile t = (th - th0) * TW + tw; columns past the band's tiles zeroed
 */
__attribute__((target_clones("avx512f", "avx2", "default")))
void WN(fr_winograd_input)(const fr_geom* gw, const T* xq, idx_t TW, idx_t th0, idx_t th1,
                           T* v, idx_t ldv)
{
    const idx_t plane = gw->Hq * gw->Wq, Wq = gw->Wq, C = gw->C;
    const idx_t nt = (th1 - th0) * TW;
    for (idx_t c = 0; c < C; ++c) {
        const T* pc = xq + c * 4 * plane;  /* phases (a, b) at (2a + b) * plane */
        for (idx_t th = th0; th < th1; ++th) {
            const T* r[4][4];
            for (int i = 0; i < 4; ++i)
                for (int k = 0; k < 4; ++k)
                    r[i][k] = pc + ((i & 1) * 2 + (k & 1)) * plane + (th + (i >> 1)) * Wq
                              + (k >> 1);
            T* out = v + c * ldv + (th - th0) * TW;
            const idx_t xs = C * ldv;  /* stride between the 16 xi */
#pragma GCC ivdep
            for (idx_t tw = 0; tw < TW; ++tw) {
                T t[4][4];
                for (int k = 0; k < 4; ++k) {
                    const T d0 = r[0][k][tw], d1 = r[1][k][tw], d2 = r[2][k][tw],
                            d3 = r[3][k][tw];
                    t[0][k] = d0 - d2;
                    t[1][k] = d1 + d2;
                    t[2][k] = d2 - d1;
                    t[3][k] = d1 - d3;
                }
                for (int i = 0; i < 4; ++i) {
                    out[(i * 4 + 0) * xs + tw] = t[i][0] - t[i][2];
                    out[(i * 4 + 1) * xs + tw] = t[i][1] + t[i][2];
                    out[(i * 4 + 2) * xs + tw] = t[i][2] - t[i][1];
                    out[(i * 4 + 3) * xs + tw] = t[i][1] - t[i][3];
                }
            }
        }
        for (int xi = 0; xi < 16; ++xi)
            memset(v + (xi * C + c) * ldv + nt, 0, (ldv - nt) * sizeof(T));
    }
}

/* Output transform of nf filters for tile rows th0 .. th1, plus bias.
 * m : IN  [16][6][ldv] the products of one block of filters
 * y : OUT [F, OH, OW] the image's output; writes filters f0 .. f0 + nf of those rows
 */
__attribute__((target_clones("avx512f", "avx2", "default")))
void WN(fr_winograd_output)(const fr_geom* g, const T* m, idx_t ldv, idx_t TW, idx_t th0,
                            idx_t th1, const T* b, T* y, idx_t f0, int nf)
{
    const idx_t xs = 6 * ldv;
    for (int f = 0; f < nf; ++f) {
        const T bias = b ? b[f0 + f] : (T)0;
        T* yf = y + (f0 + f) * g->OH * g->OW;
        for (idx_t th = th0; th < th1; ++th) {
            const T* mt = m + f * ldv + (th - th0) * TW;
            const idx_t oh = 2 * th;
            T* y0 = yf + oh * g->OW;
            T* y1 = oh + 1 < g->OH ? y0 + g->OW : NULL;
            for (idx_t tw = 0; tw < TW; ++tw) {
                T s[2][4];
                for (int k = 0; k < 4; ++k) {
                    const T m0 = mt[(0 + k) * xs + tw], m1 = mt[(4 + k) * xs + tw],
                            m2 = mt[(8 + k) * xs + tw], m3 = mt[(12 + k) * xs + tw];
                    s[0][k] = m0 + m1 + m2;
                    s[1][k] = m1 - m2 - m3;
                }
                const idx_t ow = 2 * tw;
                const T a00 = s[0][0] + s[0][1] + s[0][2] + bias;
                const T a01 = s[0][1] - s[0][2] - s[0][3] + bias;
                const T a10 = s[1][0] + s[1][1] + s[1][2] + bias;
                const T a11 = s[1][1] - s[1][2] - s[1][3] + bias;
                y0[ow] = a00;
                if (ow + 1 < g->OW) y0[ow + 1] = a01;
                if (y1) {
                    y1[ow] = a10;
                    if (ow + 1 < g->OW) y1[ow + 1] = a11;
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

#undef WN
#undef WCAT
#undef WCAT_
