/* Per-work-item drivers of the direct convolution, one instantiation per float type.
 *
 * Included by conv_direct.c with T (float or double) and TS (f32 or f64) defined. Each function
 * is one work item of a parallel loop in fastrnn/_cpu/conv2d.pyx: it packs what it reads into
 * pitched planes, calls the micro-kernel of the selected instruction set, and scatters its
 * result into the NCHW output. Items write disjoint parts of their outputs.
 */

#define DCAT_(a, b) a##_##b
#define DCAT(a, b) DCAT_(a, b)
#define DN(n) DCAT(n, TS)

/* The instruction set's variant of kernel ``fn`` (conv_direct_kernels.h, built once per
 * instruction set with the same signature): FR_PICK(isa, fwd)(args...). */
#if FR_X86
#define FR_PICK(isa, fn)                                                                       \
    ((isa) == FR_ISA_AVX512 ? DCAT(fn, DCAT(TS, avx512))                                      \
     : (isa) == FR_ISA_AVX2 ? DCAT(fn, DCAT(TS, avx2)) : DCAT(fn, DCAT(TS, portable)))
#else
#define FR_PICK(isa, fn) ((void)(isa), DCAT(fn, DCAT(TS, portable)))
#endif

/* The forward kernel over K taps in chunks of fr_fwd_taps: each chunk sweeps all P positions
 * and adds to what the chunk before stored, so that the input rows one block of positions
 * reads for a chunk (its channels' taps) stay in L1 instead of all channels' at once. The
 * same sums, in the same order, as one pass over all K taps. */
static void DN(kfwd)(int isa, int nf, const T* x, const idx_t* off, idx_t K, const T* w, T* y,
                     idx_t ldy, idx_t P)
{
    const idx_t kc = fr_fwd_taps > 0 ? fr_fwd_taps : K;
    idx_t k0 = 0;
    do {
        const idx_t kn = K - k0 < kc ? K - k0 : kc;
        FR_PICK(isa, fwd)(nf, x, off + k0, kn, w + k0 * 6, y, ldy, P, k0 > 0);
        k0 += kn;
    } while (k0 < K);
}

static void DN(kwgradt)(int isa, const T* dyt, idx_t lddt, const T* x, const idx_t* off, idx_t P,
                        idx_t wq, idx_t ow, T* part, idx_t ldp)
{
    FR_PICK(isa, wgradt)(dyt, lddt, x, off, P, wq, ow, part, ldp);
}

static void DN(kwgrad)(int isa, int nf, const T* dy, idx_t lddy, const T* x, const idx_t* off,
                       idx_t P, T* dw, idx_t ldw)
{
    FR_PICK(isa, wgrad)(nf, dy, lddy, x, off, P, dw, ldw);
}

/* a[0 .. n) summed in double, in a fixed order (see sum8 in conv_direct_kernels.h) */
double DN(fr_sum8)(int isa, const T* a, idx_t n)
{
    return FR_PICK(isa, sum8)(a, n);
}

static void DN(store_rows)(int isa, const T* s, idx_t sp, idx_t n, idx_t rows, T bias, int act,
                           T* d, idx_t dp)
{
    FR_PICK(isa, store_rows)(s, sp, n, rows, bias, act, d, dp);
}

static void DN(split_phases)(int isa, const T* s, idx_t n, T* r0, T* r1)
{
    FR_PICK(isa, split_phases)(s, n, r0, r1);
}

static void DN(merge_phases)(int isa, const T* p, const T* q, idx_t n, T* d)
{
    FR_PICK(isa, merge_phases)(p, q, n, d);
}

/* The two column phases of one input row at stride 2: r0[v] = src[2v - pw],
 * r1[v] = src[2v + 1 - pw], zero outside the row, both in one pass over the row (the inside
 * on instruction set ``isa``: a copy, the same on any). */
static void DN(pack_row_stride2)(int isa, const T* src, idx_t W, idx_t pw, idx_t Wq, T* r0,
                                 T* r1)
{
    /* v in [lo, hi): both 2v - pw and 2v + 1 - pw inside [0, W) */
    idx_t lo = (pw + 1) / 2, hi = (W + pw - 1) / 2;
    lo = lo > Wq ? Wq : lo;
    hi = hi > Wq ? Wq : hi < lo ? lo : hi;
    for (idx_t v = 0; v < lo; ++v) {
        const idx_t w0 = 2 * v - pw, w1 = w0 + 1;
        r0[v] = (w0 >= 0 && w0 < W) ? src[w0] : (T)0;
        r1[v] = (w1 >= 0 && w1 < W) ? src[w1] : (T)0;
    }
    const T* s = src - pw;
    DN(split_phases)(isa, s + 2 * lo, hi - lo, r0 + lo, r1 + lo);
    for (idx_t v = hi; v < Wq; ++v) {
        const idx_t w0 = 2 * v - pw, w1 = w0 + 1;
        r0[v] = (w0 >= 0 && w0 < W) ? src[w0] : (T)0;
        r1[v] = (w1 >= 0 && w1 < W) ? src[w1] : (T)0;
    }
}

/* Depthwise forward (G = C = F, stride 1, dilation 1) of the planes q0 <= q < q1 of x (plane q
 * is image q / C, channel q % C; y's planes in the same order): each plane is copied into
 * ``pad``, the zero-padded plane of Wp columns (its borders zeroed here once, never written),
 * and convolved from there by dw_plane; bias and ReLU (g->act) in the same pass.
 * pad : scratch, (H + 2 ph) Wp + KW + 64 elements (vectors read past the last row). */
void DN(fr_depthwise_planes)(int isa, const fr_geom* g, const T* x, const T* w, const T* b,
                             T* y, idx_t q0, idx_t q1, T* pad, idx_t Wp)
{
    const idx_t H = g->H, W = g->W, taps = g->KH * g->KW;
    memset(pad, 0, ((H + 2 * g->ph) * Wp + g->KW + 64) * sizeof(T));
    for (idx_t q = q0; q < q1; ++q) {
        const idx_t c = q % g->C;
        const T* xp = x + q * H * W;
        for (idx_t h = 0; h < H; ++h)
            memcpy(pad + (h + g->ph) * Wp + g->pw, xp + h * W, W * sizeof(T));
        FR_PICK(isa, dw_plane)(pad, Wp, w + c * taps, g->KH, g->KW, b ? b[c] : (T)0,
                               (int)g->act, y + q * g->OH * g->OW, g->OH, g->OW);
    }
}

/* Depthwise weight (and bias) gradient, stride 1, dilation 1, of the channels c0 <= c < c1:
 * dw[c][t] = sum over images and outputs of dy[n, c, oh, ow] x_pad[n, c, oh + kh, ow + kw],
 * db[c] = sum of dy[n, c] (db may be NULL). Each channel's images in order, on one thread:
 * the same sums on any number of threads. The vectors past a row's OW outputs multiply zeros
 * of dy's copy by inputs that no output reads: a NaN or infinity in x reaches dw that way, so
 * the caller checks dw's finiteness and recomputes where x is not finite.
 * pad : scratch, (H + 2 ph) Wp + 64 elements, Wp = OWp + KW - 1; dyp: OH OWp (OWp a multiple
 * of 16); acc: (KH KW + 1) 16 elements. */
void DN(fr_depthwise_wgrad)(int isa, const fr_geom* g, const T* x, const T* dy, T* dw, T* db,
                            idx_t c0, idx_t c1, T* pad, idx_t Wp, T* dyp, idx_t OWp, T* acc)
{
    const idx_t H = g->H, W = g->W, OH = g->OH, OW = g->OW, C = g->C, taps = g->KH * g->KW;
#if FR_X86  /* the lanes of the kernel FR_PICK chooses */
    const idx_t vw = isa == FR_ISA_AVX512 ? 64 / (idx_t)sizeof(T)
                     : isa == FR_ISA_AVX2 ? 32 / (idx_t)sizeof(T) : 16 / (idx_t)sizeof(T);
#else
    const idx_t vw = 16 / (idx_t)sizeof(T);
#endif
    memset(pad, 0, ((H + 2 * g->ph) * Wp + 64) * sizeof(T));
    memset(dyp, 0, OH * OWp * sizeof(T));
    for (idx_t c = c0; c < c1; ++c) {
        memset(acc, 0, (taps + 1) * vw * sizeof(T));
        for (idx_t n = 0; n < g->N; ++n) {
            const T* xp = x + (n * C + c) * H * W;
            const T* dp = dy + (n * C + c) * OH * OW;
            for (idx_t h = 0; h < H; ++h)
                memcpy(pad + (h + g->ph) * Wp + g->pw, xp + h * W, W * sizeof(T));
            for (idx_t oh = 0; oh < OH; ++oh)
                memcpy(dyp + oh * OWp, dp + oh * OW, OW * sizeof(T));
            FR_PICK(isa, dw_wgrad_plane)(pad, Wp, dyp, OH, OWp, g->KH, g->KW, acc);
        }
        for (idx_t t = 0; t <= taps; ++t) {
            double s = 0;
            for (idx_t l = 0; l < vw; ++l)
                s += acc[t * vw + l];
            if (t < taps)
                dw[c * taps + t] = (T)s;
            else if (db)
                db[c] = (T)s;
        }
    }
}

/* Input planes of one image (step C1 of fastrnn/reference/conv2d.py, split by stride phase):
 *   xq[((c * sh + a) * sw + b) * Hq * Wq + u * Wq + v] = xpad[c, u * sh + a, v * sw + b]
 * (xpad: x zero-padded by (ph, pw)), followed by g->x_slack zeros. At column stride 2 each
 * row's two phases are split on instruction set ``isa`` (the kernels' one).
 * x  : IN  [C, H, W]
 * xq : OUT [g->x_size]
 */
void DN(fr_pack_input)(int isa, const fr_geom* g, const T* x, T* xq)
{
    const idx_t plane = g->Hq * g->Wq;
    T* q = xq;
    for (idx_t c = 0; c < g->C; ++c) {
        const T* xc = x + c * g->H * g->W;
        if (g->sw == 2) {  /* both column phases of a row at once */
            for (idx_t a = 0; a < g->sh; ++a) {
                T* p0 = q + (a * 2) * plane;
                for (idx_t u = 0; u < g->Hq; ++u) {
                    T* r0 = p0 + u * g->Wq;
                    T* r1 = r0 + plane;
                    const idx_t h = u * g->sh + a - g->ph;
                    if (h < 0 || h >= g->H) {
                        memset(r0, 0, g->Wq * sizeof(T));
                        memset(r1, 0, g->Wq * sizeof(T));
                        continue;
                    }
                    DN(pack_row_stride2)(isa, xc + h * g->W, g->W, g->pw, g->Wq, r0, r1);
                }
            }
            q += g->sh * 2 * plane;
            continue;
        }
        for (idx_t a = 0; a < g->sh; ++a)
            for (idx_t b = 0; b < g->sw; ++b) {
                for (idx_t u = 0; u < g->Hq; ++u) {
                    T* row = q + u * g->Wq;
                    const idx_t h = u * g->sh + a - g->ph;
                    if (h < 0 || h >= g->H) {
                        memset(row, 0, g->Wq * sizeof(T));
                        continue;
                    }
                    const T* src = xc + h * g->W;
                    if (g->sw == 1) {
                        /* v - pw in [0, W) */
                        const idx_t lo = g->pw, hi = g->pw + g->W < g->Wq ? g->pw + g->W : g->Wq;
                        memset(row, 0, lo * sizeof(T));
                        memcpy(row + lo, src, (hi - lo) * sizeof(T));
                        memset(row + hi, 0, (g->Wq - hi) * sizeof(T));
                    } else {
                        /* v * sw + b - pw in [0, W) for v in [lo, hi) */
                        idx_t lo = (g->pw - b + g->sw - 1) / g->sw;
                        idx_t hi = (g->W + g->pw - b + g->sw - 1) / g->sw;
                        lo = lo < 0 ? 0 : lo > g->Wq ? g->Wq : lo;
                        hi = hi > g->Wq ? g->Wq : hi < lo ? lo : hi;
                        memset(row, 0, lo * sizeof(T));
                        const T* s0 = src + b - g->pw;
                        for (idx_t v = lo; v < hi; ++v)
                            row[v] = s0[v * g->sw];
                        memset(row + hi, 0, (g->Wq - hi) * sizeof(T));
                    }
                }
                q += plane;
            }
    }
    memset(q, 0, g->x_slack * sizeof(T));
}

/* Output gradients of one image for the weight gradient, in the forward's pitch, zero at
 * positions that are no output (ow >= OW):
 *   g->wgt = 0: dyf[f * Pf_r + oh * Wq + ow] = dy[f, oh, ow]                    [F, Pf_r]
 *   g->wgt = 1: dyf[(grp * OH * Wq + oh * Wq + ow) * Fg_r + f] = dy[grp * Fg + f, oh, ow]
 *               (filters contiguous, zero for f >= Fg)                   [G, OH * Wq, Fg_r]
 * dy  : IN  [F, OH, OW]
 * dyf : OUT [fr_dy_size(g)]
 */
void DN(fr_pack_dy_forward_pitch)(const fr_geom* g, const T* dy, T* dyf)
{
    if (g->wgt) {
        const idx_t P = g->OH * g->Wq;
        memset(dyf, 0, g->G * P * g->Fg_r * sizeof(T));
        for (idx_t grp = 0; grp < g->G; ++grp)
            for (idx_t oh = 0; oh < g->OH; ++oh)
                for (idx_t f = 0; f < g->Fg; ++f) {
                    const T* src = dy + ((grp * g->Fg + f) * g->OH + oh) * g->OW;
                    T* dst = dyf + (grp * P + oh * g->Wq) * g->Fg_r + f;
                    for (idx_t ow = 0; ow < g->OW; ++ow)
                        dst[ow * g->Fg_r] = src[ow];
                }
        return;
    }
    for (idx_t f = 0; f < g->F; ++f) {
        T* dst = dyf + f * g->Pf_r;
        const T* src = dy + f * g->OH * g->OW;
        for (idx_t oh = 0; oh < g->OH; ++oh) {
            memcpy(dst + oh * g->Wq, src + oh * g->OW, g->OW * sizeof(T));
            memset(dst + oh * g->Wq + g->OW, 0, (g->Wq - g->OW) * sizeof(T));
        }
        memset(dst + g->OH * g->Wq, 0, (g->Pf_r - g->OH * g->Wq) * sizeof(T));
    }
}

/* Output gradients of one image as planes for the input gradient (a "full" correlation):
 *   dyq[f * Hd * Wd + r * Wd + s] = dy[f, r - QH, s - QW], zero outside, then g->d_slack zeros.
 * dy  : IN  [F, OH, OW]
 * dyq : OUT [g->d_size]
 */
void DN(fr_pack_dy_planes)(const fr_geom* g, const T* dy, T* dyq)
{
    const idx_t plane = g->Hd * g->Wd;
    for (idx_t f = 0; f < g->F; ++f) {
        T* q = dyq + f * plane;
        const T* src = dy + f * g->OH * g->OW;
        memset(q, 0, plane * sizeof(T));
        for (idx_t oh = 0; oh < g->OH && oh + g->QH < g->Hd; ++oh) {
            const idx_t n = g->OW < g->Wd - g->QW ? g->OW : g->Wd - g->QW;
            memcpy(q + (oh + g->QH) * g->Wd + g->QW, src + oh * g->OW, n * sizeof(T));
        }
    }
    memset(dyq + g->F * plane, 0, g->d_slack * sizeof(T));
}

/* Forward item: filters f0 .. f0 + nf (nf <= 6, one packed block, inside group grp) of one
 * image. Steps C1-C4: y[f, oh, ow] = b[f] + sum over taps of w * x.
 * xq   : IN  the image's input planes (fr_pack_input)
 * off  : IN  [Kg] tap offsets inside a group's planes
 * wblk : IN  [Kg][6] the block's packed weights
 * b    : IN  [F] or NULL
 * y    : OUT [F, OH, OW] the image's output; this writes rows f0 .. f0 + nf
 * tile : scratch [6, Pf_r]
 */
void DN(fr_forward_block)(int isa, const fr_geom* g, const T* xq, const idx_t* off,
                          const T* wblk, const T* b, T* y, idx_t grp, idx_t f0, int nf, T* tile)
{
    const T* xg = xq + grp * g->Cg * g->sh * g->sw * g->Hq * g->Wq;
    DN(kfwd)(isa, nf, xg, off, g->Kg, wblk, tile, g->Pf_r, g->OH * g->Wq);
    for (int f = 0; f < nf; ++f) {
        const T bias = b ? b[f0 + f] : (T)0;
        const T* src = tile + f * g->Pf_r;
        T* dst = y + (f0 + f) * g->OH * g->OW;
        /* (ReLU in the store: v < 0 ? 0 : v keeps a NaN, as torch.relu) */
        DN(store_rows)(isa, src, g->Wq, g->OW, g->OH, bias, (int)g->act, dst, g->OW);
    }
}

/* The rows [u0, u1) of row phase a whose input positions h = u sh + a - ph fall in [0, H):
 * the rows of dx an input-gradient item of that phase writes. */
static void DN(dgrad_rows)(const fr_geom* g, idx_t a, idx_t* u0, idx_t* u1)
{
    idx_t lo = 0, hi = g->Hq;
    while (lo * g->sh + a - g->ph < 0) ++lo;
    while (hi > lo && (hi - 1) * g->sh + a - g->ph >= g->H) --hi;
    *u0 = lo;
    *u1 = hi;
}

/* Input-gradient item: input channels c0 .. c0 + nc (one packed block, inside group grp) of
 * stride phase (a, b) of one image. Steps CB3-CB5 as one correlation of the padded output
 * gradients with the transposed, flipped kernel taps of the phase.
 * dyq  : IN  the image's output-gradient planes (fr_pack_dy_planes)
 * off  : IN  [K] the phase's tap offsets inside a group's planes (K may be 0)
 * wblk : IN  [K][6] the block's packed weights
 * dx   : OUT [C, H, W] of the image; this writes the phase's positions of channels c0 .. c0+nc
 * tile : scratch [6, Pd_r]
 */
void DN(fr_dgrad_block)(int isa, const fr_geom* g, const T* dyq, const idx_t* off, idx_t K,
                        const T* wblk, T* dx, idx_t grp, idx_t c0, int nc, idx_t a, idx_t b,
                        T* tile)
{
    idx_t u0, u1, v0 = 0;
    DN(dgrad_rows)(g, a, &u0, &u1);
    while (v0 * g->sw + b - g->pw < 0) ++v0;
    const T* dg = dyq + grp * g->Fg * g->Hd * g->Wd + u0 * g->Wd;
    if (K > 0 && u1 > u0)
        DN(kfwd)(isa, nc, dg, off, K, wblk, tile, g->Pd_r, (u1 - u0) * g->Wd);
    for (int c = 0; c < nc; ++c) {
        const T* src = tile + c * g->Pd_r - u0 * g->Wd;
        T* dst = dx + (c0 + c) * g->H * g->W;
        for (idx_t u = u0; u < u1; ++u) {
            const idx_t h = u * g->sh + a - g->ph;
            for (idx_t v = v0; v < g->Wq; ++v) {
                const idx_t w = v * g->sw + b - g->pw;
                if (w >= g->W) break;
                dst[h * g->W + w] = K > 0 ? src[u * g->Wd + v] : (T)0;
            }
        }
    }
}

/* Input-gradient item at column stride 2: both column phases (b = 0, 1) of row phase a,
 * channels c0 .. c0 + nc of one image. Each phase is the correlation fr_dgrad_block runs
 * (off_b, K_b, wblk_b; K_b may be 0: that phase is zero), into its own tile; then each dx row
 * is written once, its even and odd columns interleaved by one vector pass (merge_phases)
 * instead of two strided scalar passes.
 * tile : scratch [2][6, Pd_r] */
void DN(fr_dgrad_pair)(int isa, const fr_geom* g, const T* dyq, const idx_t* off0, idx_t K0,
                       const T* wblk0, const idx_t* off1, idx_t K1, const T* wblk1, T* dx,
                       idx_t grp, idx_t c0, int nc, idx_t a, T* tile)
{
    idx_t u0, u1;
    DN(dgrad_rows)(g, a, &u0, &u1);
    if (u1 <= u0)
        return;
    const idx_t n = (u1 - u0) * g->Wd, W = g->W;
    const T* dg = dyq + grp * g->Fg * g->Hd * g->Wd + u0 * g->Wd;
    T* tl[2] = {tile, tile + 6 * g->Pd_r};
    const idx_t* offs[2] = {off0, off1};
    const idx_t K[2] = {K0, K1};
    const T* wb[2] = {wblk0, wblk1};
    for (int b = 0; b < 2; ++b) {
        if (K[b] > 0)
            DN(kfwd)(isa, nc, dg, offs[b], K[b], wb[b], tl[b], g->Pd_r, n);
        else
            for (int c = 0; c < nc; ++c)
                memset(tl[b] + c * g->Pd_r, 0, n * sizeof(T));
    }
    /* dx column w = 2 m + j comes from phase (w + pw) % 2 at v = (w + pw) / 2: with e the
     * parity of pw, even columns from phase e at v = m + (pw - e) / 2, odd ones from phase
     * 1 - e at v = m + (pw + e) / 2 */
    const idx_t e = g->pw & 1, ve = (g->pw - e) / 2, vo = (g->pw + e) / 2;
    for (int c = 0; c < nc; ++c) {
        const T* te = tl[e] + c * g->Pd_r;
        const T* to = tl[1 - e] + c * g->Pd_r;
        T* dst = dx + (c0 + c) * g->H * W;
        for (idx_t u = u0; u < u1; ++u) {
            const idx_t h = u * g->sh + a - g->ph, r = (u - u0) * g->Wd;
            T* drow = dst + h * W;
            DN(merge_phases)(isa, te + r + ve, to + r + vo, W / 2, drow);
            if (W & 1)
                drow[W - 1] = te[r + ve + W / 2];
        }
    }
}

/* Weight-gradient item: one image's contribution to every filter of every group (step CB2),
 * added into a partial dw.
 * xq   : IN  the image's input planes; dyf : IN  its output gradients (fr_pack_dy_forward_pitch)
 * off  : IN  [G, Kg_r] each group's tap offsets inside its planes, padded to a multiple of 12
 *        with the offset of the zeros after the last plane
 * part : INOUT g->wgt = 0: [F, Kg_r] (row f = filter f, column t = tap t)
 *              g->wgt = 1: [G, Kg_r, Fg_r] (filters contiguous)
 */
void DN(fr_wgrad_image)(int isa, const fr_geom* g, const T* xq, const T* dyf, const idx_t* off,
                        T* part)
{
    const idx_t plane = g->Hq * g->Wq;
    if (g->wgt) {
        const idx_t P = g->OH * g->Wq;
        const int nt = fr_wgradt_nt(isa), nf = fr_wgradt_nf(isa, (int)sizeof(T));
        for (idx_t grp = 0; grp < g->G; ++grp) {
            const T* xg = xq + grp * g->Cg * g->sh * g->sw * plane;
            const T* dg = dyf + grp * P * g->Fg_r;
            T* pg = part + grp * g->Kg_r * g->Fg_r;
            for (idx_t t0 = 0; t0 < g->Kg_r; t0 += nt)
                for (idx_t f0 = 0; f0 < g->Fg; f0 += nf)
                    DN(kwgradt)(isa, dg + f0, g->Fg_r, xg, off + grp * g->Kg_r + t0, P,
                                g->Wq, g->OW, pg + t0 * g->Fg_r + f0, g->Fg_r);
        }
        return;
    }
    const int rf = fr_wgrad_rf(isa);
    for (idx_t grp = 0; grp < g->G; ++grp) {
        const T* xg = xq + grp * g->Cg * g->sh * g->sw * plane;
        for (idx_t f0 = 0; f0 < g->Fg; f0 += rf) {
            const int nf = g->Fg - f0 < rf ? (int)(g->Fg - f0) : rf;
            const idx_t f = grp * g->Fg + f0;
            for (idx_t t0 = 0; t0 < g->Kg_r; t0 += 6)
                DN(kwgrad)(isa, nf, dyf + f * g->Pf_r, g->Pf_r, xg, off + grp * g->Kg_r + t0,
                           g->Pf_r, part + f * g->Kg_r + t0, g->Kg_r);
        }
    }
}

#include "conv_winograd.h"

#undef FR_PICK
#undef DN
#undef DCAT
#undef DCAT_
