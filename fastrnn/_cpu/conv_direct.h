/* Direct convolution on pitched planes: declarations shared by conv_direct.c and conv2d.pyx.
 *
 * Geometry (all sizes in elements; steps cite fastrnn/reference/conv2d.py):
 *   Hq, Wq  rows and columns of one stride phase of the padded input:
 *           ceil((H + 2ph) / sh), ceil((W + 2pw) / sw)
 *   Pf_r    forward positions per output channel, OH * Wq, rounded up to 64
 *   QH, QW  dh (KH - 1) / sh and dw (KW - 1) / sw: the output-gradient planes' top/left margin
 *   Hd, Wd  Hq + QH, Wq + QW: rows and columns of one output-gradient plane
 *   Pd_r    input-gradient positions per channel and phase, Hq * Wd, rounded up to 64
 *   Kg, Kg_r  taps per group, Cg * KH * KW, and that rounded up to 12
 *   Fg_r    filters per group rounded up to 32 (the filters-in-lanes weight gradient)
 *   wgt     1: the weight gradient runs with the filters in lanes (Fg >= 16)
 *   x_size, d_size  elements of one image's input planes and output-gradient planes, slack
 *           included (the kernels read whole vectors past the last position)
 */
#ifndef FASTRNN_CONV_DIRECT_H
#define FASTRNN_CONV_DIRECT_H

#include <stddef.h>

typedef ptrdiff_t idx_t;

enum { FR_ISA_PORTABLE = 1, FR_ISA_AVX2 = 2, FR_ISA_AVX512 = 3 };

typedef struct fr_geom {
    idx_t N, C, H, W, F, KH, KW, OH, OW;
    idx_t sh, sw, ph, pw, dh, dw, G, Cg, Fg;
    idx_t Hq, Wq, Pf_r, QH, QW, Hd, Wd, Pd_r, Kg, Kg_r, Fg_r, wgt;
    idx_t x_slack, x_size, d_slack, d_size;
    idx_t act;  /* forward epilogue: 1 applies ReLU after the bias (max(v, 0), NaN kept) */
} fr_geom;

extern idx_t fr_fwd_taps;          /* taps per pass of the forward kernel (0: all) */
idx_t fr_set_fwd_taps(idx_t n);    /* sets it, returns the previous value */
int fr_isa_supported(int isa);   /* 1 when this CPU (and build) runs that instruction set */
int fr_isa_best(void);           /* the best supported one */
int fr_wgrad_rf(int isa);        /* filters per weight-gradient block (lanes reduced) */
int fr_wgradt_nt(int isa);       /* taps per weight-gradient block (filters in lanes) */
int fr_wgradt_nf(int isa, int dsize); /* filters per such block, dsize = sizeof(T) */

double fr_sum8_f32(int isa, const float* a, idx_t n);
double fr_sum8_f64(int isa, const double* a, idx_t n);
void fr_pack_input_f32(int isa, const fr_geom* g, const float* x, float* xq);
void fr_pack_input_f64(int isa, const fr_geom* g, const double* x, double* xq);
void fr_pack_dy_forward_pitch_f32(const fr_geom* g, const float* dy, float* dyf);
void fr_pack_dy_forward_pitch_f64(const fr_geom* g, const double* dy, double* dyf);
void fr_pack_dy_planes_f32(const fr_geom* g, const float* dy, float* dyq);
void fr_pack_dy_planes_f64(const fr_geom* g, const double* dy, double* dyq);
void fr_forward_block_f32(int isa, const fr_geom* g, const float* xq, const idx_t* off,
                          const float* wblk, const float* b, float* y, idx_t grp, idx_t f0,
                          int nf, float* tile);
void fr_forward_block_f64(int isa, const fr_geom* g, const double* xq, const idx_t* off,
                          const double* wblk, const double* b, double* y, idx_t grp, idx_t f0,
                          int nf, double* tile);
void fr_dgrad_block_f32(int isa, const fr_geom* g, const float* dyq, const idx_t* off, idx_t K,
                        const float* wblk, float* dx, idx_t grp, idx_t c0, int nc, idx_t a,
                        idx_t b, float* tile);
void fr_dgrad_block_f64(int isa, const fr_geom* g, const double* dyq, const idx_t* off, idx_t K,
                        const double* wblk, double* dx, idx_t grp, idx_t c0, int nc, idx_t a,
                        idx_t b, double* tile);
void fr_dgrad_pair_f32(int isa, const fr_geom* g, const float* dyq, const idx_t* off0,
                       idx_t K0, const float* wblk0, const idx_t* off1, idx_t K1,
                       const float* wblk1, float* dx, idx_t grp, idx_t c0, int nc, idx_t a,
                       float* tile);
void fr_dgrad_pair_f64(int isa, const fr_geom* g, const double* dyq, const idx_t* off0,
                       idx_t K0, const double* wblk0, const idx_t* off1, idx_t K1,
                       const double* wblk1, double* dx, idx_t grp, idx_t c0, int nc, idx_t a,
                       double* tile);
void fr_wgrad_image_f32(int isa, const fr_geom* g, const float* xq, const float* dyf,
                        const idx_t* off, float* part);
void fr_wgrad_image_f64(int isa, const fr_geom* g, const double* xq, const double* dyf,
                        const idx_t* off, double* part);
void fr_depthwise_planes_f32(int isa, const fr_geom* g, const float* x, const float* w,
                             const float* b, float* y, idx_t q0, idx_t q1, float* pad,
                             idx_t Wp);
void fr_depthwise_planes_f64(int isa, const fr_geom* g, const double* x, const double* w,
                             const double* b, double* y, idx_t q0, idx_t q1, double* pad,
                             idx_t Wp);
void fr_depthwise_wgrad_f32(int isa, const fr_geom* g, const float* x, const float* dy,
                            float* dw, float* db, idx_t c0, idx_t c1, float* pad, idx_t Wp,
                            float* dyp, idx_t OWp, float* acc);
void fr_depthwise_wgrad_f64(int isa, const fr_geom* g, const double* x, const double* dy,
                            double* dw, double* db, idx_t c0, idx_t c1, double* pad, idx_t Wp,
                            double* dyp, idx_t OWp, double* acc);
idx_t fr_dy_size(const fr_geom* g);
void fr_winograd_weights_f32(const float* w, idx_t F, idx_t C, idx_t fb0, idx_t fb1, float* u);
void fr_winograd_weights_f64(const double* w, idx_t F, idx_t C, idx_t fb0, idx_t fb1,
                             double* u);
idx_t fr_winograd_band_f32(int isa, const fr_geom* g, const fr_geom* gw, const float* x,
                           idx_t r0, idx_t r1, idx_t packed, const float* u, const idx_t* off,
                           const float* b, float* y, idx_t ring, float* xq, float* v, float* m,
                           idx_t ldv, idx_t vs);
idx_t fr_winograd_band_f64(int isa, const fr_geom* g, const fr_geom* gw, const double* x,
                           idx_t r0, idx_t r1, idx_t packed, const double* u,
                           const idx_t* off, const double* b, double* y, idx_t ring,
                           double* xq, double* v, double* m, idx_t ldv, idx_t vs);
void fr_winograd_wgrad_band_f32(int isa, const fr_geom* g, const fr_geom* gw, const float* xq,
                                const float* dyf, idx_t dsz, idx_t nimg, const idx_t* off,
                                idx_t Cr, float* part, float* v, idx_t ldv, float* d);
void fr_winograd_wgrad_band_f64(int isa, const fr_geom* g, const fr_geom* gw, const double* xq,
                                const double* dyf, idx_t dsz, idx_t nimg, const idx_t* off,
                                idx_t Cr, double* part, double* v, idx_t ldv, double* d);
void fr_winograd_wgrad_finish_f32(const float* parts, idx_t chunks, idx_t psize, idx_t F,
                                  idx_t C, idx_t Cr, idx_t Fr, idx_t c0, idx_t c1, float* dw);
void fr_winograd_wgrad_finish_f64(const double* parts, idx_t chunks, idx_t psize, idx_t F,
                                  idx_t C, idx_t Cr, idx_t Fr, idx_t c0, idx_t c1, double* dw);

#endif
