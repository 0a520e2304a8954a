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
            WN(fr_pack_input)(gw, x + i * xsz, xq);
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

#undef WN
#undef WCAT
#undef WCAT_
