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
 * U = G w G^T (G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]) is computed once per call, by
 * fr_winograd_weights below. 16 multiplies per tile, channel and filter instead of 36.
 */

#define WCAT_(a, b) a##_##b
#define WCAT(a, b) WCAT_(a, b)
#define WN(n) WCAT(n, TS)

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

/* The transforms on 64-byte vectors, and on 32-byte ones for rows of at most 32 bytes of tiles
 * (a 14x14 image's 7 tiles a row fill 7 of 8 float lanes instead of 7 of 16) */
#define WVB 64
#define WX(n) WCAT(WN(n), v64)
#include "conv_winograd_vec.h"
#undef WX
#undef WVB
#define WVB 32
#define WX(n) WCAT(WN(n), v32)
#include "conv_winograd_vec.h"
#undef WX
#undef WVB

/* Input transform of tile rows th0 .. th1 (conv_winograd_vec.h) */
static void WN(fr_winograd_input)(const fr_geom* gw, const T* xq, idx_t TW, idx_t th0,
                                  idx_t th1, T* v, idx_t ldv, idx_t vs)
{
    if (TW * (idx_t)sizeof(T) <= 32)
        WCAT(WN(fr_winograd_input), v32)(gw, xq, TW, th0, th1, v, ldv, vs);
    else
        WCAT(WN(fr_winograd_input), v64)(gw, xq, TW, th0, th1, v, ldv, vs);
}

/* Output transform of nf filters for tile rows th0 .. th1 (conv_winograd_vec.h) */
static void WN(fr_winograd_output)(const fr_geom* g, const T* m, idx_t ldv, idx_t TW, idx_t th0,
                                   idx_t th1, const T* b, T* y, idx_t f0, int nf)
{
    if (TW * (idx_t)sizeof(T) <= 32)
        WCAT(WN(fr_winograd_output), v32)(g, m, ldv, TW, th0, th1, b, y, f0, nf);
    else
        WCAT(WN(fr_winograd_output), v64)(g, m, ldv, TW, th0, th1, b, y, f0, nf);
}

/* One band: tile rows r0 .. r1 of a batch's images taken as one sequence (image i's tile row
 * th is row i * TH + th), so that a band may end inside one image and go on into the next:
 * the products then run over as many tiles as fill their blocks of positions, whatever the
 * tiles per image (a 14x14 output has 49, a quarter of a 64-position block left empty when
 * each image runs alone). Per band the input transform of each image's rows, then per block of
 * 6 filters the 16 products over all the band's tiles and each image's output transform.
 * g    : the convolution's geometry; gw : the same input with stride 2 (phase planes)
 * x    : IN  the batch's images [*, C, H, W] (image i at x + i * C * H * W)
 * y    : OUT image i's output at y + (ring ? i % ring : i) * F * OH * OW
 * xq   : scratch [gw->x_size], the phase planes of image ``packed`` (-1: none) on entry
 * v    : scratch [16][vs], V[xi][c] at xi * vs + c * ldv; m : scratch [16][6][ldv]
 * u    : IN  [16][nfb][C][6] packed transformed weights
 * off  : IN  [C] offsets c * ldv
 * Returns the image whose planes xq holds on exit.
 */
idx_t WN(fr_winograd_band)(int isa, const fr_geom* g, const fr_geom* gw, const T* x,
                           idx_t r0, idx_t r1, idx_t packed, const T* u, const idx_t* off,
                           const T* b, T* y, idx_t ring, T* xq, T* v, T* m, idx_t ldv, idx_t vs)
{
    const idx_t TH = (g->OH + 1) / 2, TW = (g->OW + 1) / 2, C = g->C;
    const idx_t nfb = (g->F + 5) / 6, nt = (r1 - r0) * TW;
    const idx_t xsz = C * g->H * g->W, ysz = g->F * g->OH * g->OW;
    for (idx_t r = r0; r < r1;) {  /* each image's rows of the band */
        const idx_t i = r / TH, th0 = r - i * TH;
        const idx_t th1 = (i + 1) * TH < r1 ? TH : r1 - i * TH;
        if (i != packed) {
            WN(fr_pack_input)(isa, gw, x + i * xsz, xq);
            packed = i;
        }
        WN(fr_winograd_input)(gw, xq, TW, th0, th1, v + (r - r0) * TW, ldv, vs);
        r += th1 - th0;
    }
    for (int xi = 0; xi < 16; ++xi)  /* (after the transforms: their last vectors overrun) */
        for (idx_t c = 0; c < C; ++c)
            memset(v + xi * vs + c * ldv + nt, 0, (ldv - nt) * sizeof(T));
    for (idx_t fb = 0; fb < nfb; ++fb) {
        const int nf = g->F - fb * 6 < 6 ? (int)(g->F - fb * 6) : 6;
        for (int xi = 0; xi < 16; ++xi)
            DN(kfwd)(isa, nf, v + xi * vs, off, C, u + (xi * nfb + fb) * C * 6,
                     m + xi * 6 * ldv, ldv, nt);
        for (idx_t r = r0; r < r1;) {
            const idx_t i = r / TH, th0 = r - i * TH;
            const idx_t th1 = (i + 1) * TH < r1 ? TH : r1 - i * TH;
            WN(fr_winograd_output)(g, m + (r - r0) * TW, ldv, TW, th0, th1, b,
                                   y + (ring ? i % ring : i) * ysz, fb * 6, nf);
            r += th1 - th0;
        }
    }
    return packed;
}

/* ---- the weight gradient by Winograd ----
 * With M = U V per xi (the forward above) and y = A^T M A, the gradients are dM = A dy A^T per
 * output tile and filter, dU[xi][c][f] = sum over tiles of V[xi][c][t] dM[xi][t][f], and
 * dw = G^T dU G per (filter, channel): 16 products of (C x tiles) by (tiles x F) instead of the
 * direct convolution's 9 taps per output position. Each xi is transformed on its own, straight
 * into the blocks its product reads (V[xi] and dM[xi] of a band of tiles stay in L2), so the
 * transformed data never goes to memory. */

/* Rows (or columns) of a 4x4 input tile in row xi of B^T: B^T = [1 0 -1 0; 0 1 1 0;
 * 0 -1 1 0; 0 1 0 -1], its row i is  tile[i0] + sign * tile[i1] */
static const int WN(wb_first)[4] = {0, 1, 2, 1};
static const int WN(wb_second)[4] = {2, 2, 1, 3};
static const int WN(wb_sign)[4] = {-1, 1, -1, -1};

/* V[xi][c][th * Wq + tw] of one image's tiles (Wq the phase planes' width, at least TW: the
 * columns tw >= TW are not tiles and are not read back), from its stride-2 phase planes. Each
 * entry is two rows and two columns of the tile: four planes' values, signed; for a channel
 * they are four contiguous runs of TH * Wq values of the planes, one vector loop. */
__attribute__((target_clones("avx512f", "avx2", "default")))
static void WN(fr_winograd_input_xi)(const fr_geom* gw, const T* xq, idx_t TH, int xi, T* v,
                                     idx_t ldv)
{
    const idx_t plane = gw->Hq * gw->Wq, Wq = gw->Wq, C = gw->C, n = TH * Wq;
    const int i = xi >> 2, j = xi & 3;
    const int r0 = WN(wb_first)[i], r1 = WN(wb_second)[i];
    const int k0 = WN(wb_first)[j], k1 = WN(wb_second)[j];
    const T si = (T)WN(wb_sign)[i], sj = (T)WN(wb_sign)[j];
#define WQ_(r, k) (pc + (((r) & 1) * 2 + ((k) & 1)) * plane + ((r) >> 1) * Wq + ((k) >> 1))
    for (idx_t c = 0; c < C; ++c) {
        const T* pc = xq + c * 4 * plane;
        const T* restrict a = WQ_(r0, k0);
        const T* restrict b = WQ_(r0, k1);
        const T* restrict e = WQ_(r1, k0);
        const T* restrict f = WQ_(r1, k1);
        T* restrict out = v + c * ldv;
        for (idx_t q = 0; q < n; ++q)
            out[q] = (a[q] + sj * b[q]) + si * (e[q] + sj * f[q]);
    }
#undef WQ_
}

/* dM[xi][th * Wq + tw][f] of one image's tiles (Wq the phase planes' width; rows of d for
 * tw >= TW are left alone): A^T = [1 1 1 0; 0 1 -1 -1], so dM = A dy A^T has
 * entry (i, j) = sum over r, s < 2 of A^T[r][i] A^T[s][j] dy[2 th + r][2 tw + s]; dy from dyf
 * (fr_pack_dy_forward_pitch: filters contiguous, rows of Wq positions, zero past OW), rows
 * past OH are zero. */
__attribute__((target_clones("avx512f", "avx2", "default")))
static void WN(fr_winograd_dy_xi)(const fr_geom* g, const T* dyf, idx_t TH, idx_t TW, idx_t Wp,
                                  int xi, T* d, idx_t ldd)
{
    static const T at[4][2] = {{1, 0}, {1, 1}, {1, -1}, {0, -1}};
    const int i = xi >> 2, j = xi & 3;
    const idx_t Fr = g->Fg_r, Wq = g->Wq;
    for (idx_t th = 0; th < TH; ++th)
        for (idx_t tw = 0; tw < TW; ++tw) {
            T* restrict out = d + (th * Wp + tw) * ldd;
            T cf[4];
            const T* src[4];
            int n = 0;
            for (int r = 0; r < 2; ++r) {
                if (at[i][r] == 0 || 2 * th + r >= g->OH)
                    continue;
                for (int s_ = 0; s_ < 2; ++s_) {
                    if (at[j][s_] == 0)
                        continue;
                    cf[n] = at[i][r] * at[j][s_];
                    src[n] = dyf + ((2 * th + r) * Wq + 2 * tw + s_) * Fr;
                    ++n;
                }
            }
            if (n == 0) {
                memset(out, 0, Fr * sizeof(T));
            } else if (n == 1) {
                const T* restrict p0 = src[0];
                const T c0 = cf[0];
                for (idx_t f = 0; f < Fr; ++f)
                    out[f] = c0 * p0[f];
            } else if (n == 2) {
                const T* restrict p0 = src[0];
                const T* restrict p1 = src[1];
                const T c0 = cf[0], c1 = cf[1];
                for (idx_t f = 0; f < Fr; ++f)
                    out[f] = c0 * p0[f] + c1 * p1[f];
            } else {
                const T* restrict p0 = src[0];
                const T* restrict p1 = src[1];
                const T* restrict p2 = src[2];
                const T* restrict p3 = src[3];
                const T c0 = cf[0], c1 = cf[1], c2 = cf[2], c3 = cf[3];
                for (idx_t f = 0; f < Fr; ++f)
                    out[f] = (c0 * p0[f] + c1 * p1[f]) + (c2 * p2[f] + c3 * p3[f]);
            }
        }
}

/* One band of ``nimg`` images into a chunk's partial dU: for each xi, V[xi] and dM[xi] of all
 * the band's tiles, then their product added into part[xi] (the filters-in-lanes kernel, the
 * channels as its taps, skipping the positions past TW of every row of Wq).
 * xq   : IN  the images' stride-2 phase planes, gw->x_size apart
 * dyf  : IN  the images' output gradients (fr_pack_dy_forward_pitch), dsz apart
 * off  : IN  [Cr] c * ldv for c < C, C * ldv (a zero row) past C; Cr a multiple of the
 *        kernel's taps per block
 * part : INOUT [16][Cr][Fg_r]
 * v    : scratch [(C + 1) * ldv], ldv >= nimg * TH * Wq; d : scratch [nimg * TH * Wq][Fg_r]
 */
void WN(fr_winograd_wgrad_band)(int isa, const fr_geom* g, const fr_geom* gw, const T* xq,
                                const T* dyf, idx_t dsz, idx_t nimg, const idx_t* off,
                                idx_t Cr, T* part, T* v, idx_t ldv, T* d)
{
    const idx_t TH = (g->OH + 1) / 2, TW = (g->OW + 1) / 2, Wp = gw->Wq;
    const idx_t ti = TH * Wp, P = nimg * ti;
    const idx_t Fr = g->Fg_r, C = g->C;
    const int nt = fr_wgradt_nt(isa), nf = fr_wgradt_nf(isa, (int)sizeof(T));
    memset(v + C * ldv, 0, ldv * sizeof(T));
    for (int xi = 0; xi < 16; ++xi) {
        for (idx_t n = 0; n < nimg; ++n) {
            WN(fr_winograd_input_xi)(gw, xq + n * gw->x_size, TH, xi, v + n * ti, ldv);
            WN(fr_winograd_dy_xi)(g, dyf + n * dsz, TH, TW, Wp, xi, d + n * ti * Fr, Fr);
        }
        T* px = part + xi * Cr * Fr;
        for (idx_t t0 = 0; t0 < Cr; t0 += nt)
            for (idx_t f0 = 0; f0 < g->F; f0 += nf)
                DN(kwgradt)(isa, d + f0, Fr, v, off + t0, P, Wp, TW, px + t0 * Fr + f0, Fr);
    }
}

/* dw[f][c] = G^T dU[.][c][f] G (3x3 from 4x4), dU the sum over chunks, in chunk order, of
 * parts[k][xi][c][f], for channels c0 .. c1; 64 filters at a time along the vectors.
 * G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1], so row a of G^T X is
 * X0 + (X1 + X2) / 2, (X1 - X2) / 2, (X1 + X2) / 2 + X3 (X the rows of X; columns alike).
 * dw : OUT [F][C][3][3] */
__attribute__((target_clones("avx512f", "avx2", "default")))
void WN(fr_winograd_wgrad_finish)(const T* parts, idx_t chunks, idx_t psize, idx_t F, idx_t C,
                                  idx_t Cr, idx_t Fr, idx_t c0, idx_t c1, T* dw)
{
    enum { FB = 64 };
    T du[16][FB], t[3][4][FB], o[9][FB];
    const T h = (T)0.5;
    for (idx_t c = c0; c < c1; ++c)
        for (idx_t f0 = 0; f0 < F; f0 += FB) {
            const idx_t nb = F - f0 < FB ? F - f0 : FB;
            for (int xi = 0; xi < 16; ++xi) {
                const T* restrict p = parts + (xi * Cr + c) * Fr + f0;
                T* restrict q = du[xi];
                for (idx_t f = 0; f < nb; ++f)
                    q[f] = p[f];
                for (idx_t k = 1; k < chunks; ++k) {
                    const T* restrict pk = p + k * psize;
                    for (idx_t f = 0; f < nb; ++f)
                        q[f] = q[f] + pk[f];
                }
            }
            for (int j = 0; j < 4; ++j)  /* t = G^T dU: rows of dU are du[i * 4 + j] */
                for (idx_t f = 0; f < nb; ++f) {
                    const T x0 = du[j][f], x1 = du[4 + j][f], x2 = du[8 + j][f],
                            x3 = du[12 + j][f];
                    t[0][j][f] = x0 + (x1 + x2) * h;
                    t[1][j][f] = (x1 - x2) * h;
                    t[2][j][f] = (x1 + x2) * h + x3;
                }
            for (int a = 0; a < 3; ++a)  /* o = t G */
                for (idx_t f = 0; f < nb; ++f) {
                    const T x0 = t[a][0][f], x1 = t[a][1][f], x2 = t[a][2][f], x3 = t[a][3][f];
                    o[a * 3 + 0][f] = x0 + (x1 + x2) * h;
                    o[a * 3 + 1][f] = (x1 - x2) * h;
                    o[a * 3 + 2][f] = (x1 + x2) * h + x3;
                }
            for (idx_t f = 0; f < nb; ++f) {
                T* out = dw + ((f0 + f) * C + c) * 9;
                for (int e = 0; e < 9; ++e)
                    out[e] = o[e][f];
            }
        }
}

#undef WN
#undef WCAT
#undef WCAT_
