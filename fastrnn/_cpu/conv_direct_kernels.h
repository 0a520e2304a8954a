/* Direct-convolution micro-kernels, one instantiation per (float type, instruction set).
 *
 * Included by conv_direct.c once per instantiation with these macros defined:
 *   T        float or double
 *   VB       vector bytes: 64 (AVX-512), 32 (AVX2), 16 (portable SSE2 / generic)
 *   FWD_RV   vectors of output positions per forward block
 *   WG_RF    filters per weight-gradient block (lanes reduced at the end)
 *   WT_NV, WT_NT  vectors of filters and taps per weight-gradient block (filters in lanes)
 *   SUF      name suffix, e.g. f32_avx512
 *   TARGET   function attribute selecting the instruction set (may be empty)
 *
 * The kernels work on "pitched planes": an image's channels as zero-padded planes laid out
 * one after another, a tap (input channel, kernel row, kernel column) being one offset into
 * them, so every tap of every output position p reads x[off[t] + p] and the positions of a
 * vector are consecutive in memory (no gathers, no bounds checks). fastrnn/_cpu/conv2d.pyx
 * documents the planes and the offsets.
 *
 * Vectors are GCC vector extensions: the same source compiles to zmm, ymm or xmm code under
 * the TARGET attribute, and to plain scalar code on a compiler target without SIMD.
 */

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define NAME(n) CAT(n, SUF)
#define VW ((idx_t)(VB / sizeof(T)))
#define FWD_RF 6
#define WG_RT 6

typedef T NAME(vec) __attribute__((vector_size(VB)));
#define V NAME(vec)

static inline __attribute__((always_inline)) TARGET V NAME(load)(const T* p)
{
    V v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) TARGET void NAME(store)(T* p, V v)
{
    __builtin_memcpy(p, &v, sizeof v);
}

/* y[f * ldy + p] = sum over t < K of w[t * FWD_RF + f] * x[off[t] + p]
 *   for f < NF and p0 <= p < p1, p1 - p0 a multiple of RV * VW; with ``add``, y's values plus
 *   that sum, the taps added one by one after them (so that a sum over K taps done in chunks,
 *   each chunk adding to what the one before stored, is the same sum to the last bit).
 * x   : IN  pitched planes (readable at off[t] + p for every such p)
 * w   : IN  [K][FWD_RF] one block of packed weights (filters past NF are ignored)
 * y   : OUT [NF][ldy]
 */
static inline __attribute__((always_inline)) TARGET void NAME(fwd_body)(
    const int NF, const int RV, const T* restrict x, const idx_t* restrict off, idx_t K,
    const T* restrict w, T* restrict y, idx_t ldy, idx_t p0, idx_t p1, int add)
{
    for (idx_t p = p0; p < p1; p += RV * VW) {
        V acc[FWD_RF][FWD_RV];
        for (int f = 0; f < NF; ++f)
            for (int r = 0; r < RV; ++r)
                acc[f][r] = add ? NAME(load)(y + f * ldy + p + r * VW) : (V){0};
        const T* xp = x + p;
        for (idx_t t = 0; t < K; ++t) {
            const T* xt = xp + off[t];
            const T* wt = w + t * FWD_RF;
            V xv[FWD_RV];
            for (int r = 0; r < RV; ++r)
                xv[r] = NAME(load)(xt + r * VW);
            for (int f = 0; f < NF; ++f) {
                const T s = wt[f];
                for (int r = 0; r < RV; ++r)
                    acc[f][r] += s * xv[r];
            }
        }
        for (int f = 0; f < NF; ++f)
            for (int r = 0; r < RV; ++r)
                NAME(store)(y + f * ldy + p + r * VW, acc[f][r]);
    }
}

/* The positions p < P in blocks of FWD_RV vectors, then one block of rv <= FWD_RV vectors for
 * the rest: y is written up to P rounded up to a vector. (FWD_RV is 4 or 2.) */
#if FWD_RV == 4
#define FWD_TAIL(nf)                                                                          \
    switch (rv) {                                                                             \
    case 1: NAME(fwd_body)(nf, 1, x, off, K, w, y, ldy, full, full + VW, add); break;              \
    case 2: NAME(fwd_body)(nf, 2, x, off, K, w, y, ldy, full, full + 2 * VW, add); break;          \
    case 3: NAME(fwd_body)(nf, 3, x, off, K, w, y, ldy, full, full + 3 * VW, add); break;          \
    case 4: NAME(fwd_body)(nf, 4, x, off, K, w, y, ldy, full, full + 4 * VW, add); break;          \
    default: break;                                                                           \
    }
#else
#define FWD_TAIL(nf)                                                                          \
    if (rv == 1)                                                                              \
        NAME(fwd_body)(nf, 1, x, off, K, w, y, ldy, full, full + VW, add);                    \
    else if (rv == 2)                                                                         \
        NAME(fwd_body)(nf, 2, x, off, K, w, y, ldy, full, full + 2 * VW, add);
#endif
#define FWD_NF(nf)                                                                            \
    static TARGET void CAT(NAME(fwd), nf)(const T* x, const idx_t* off, idx_t K, const T* w,  \
                                          T* y, idx_t ldy, idx_t P, int add)                  \
    {                                                                                         \
        const idx_t full = P / (FWD_RV * VW) * (FWD_RV * VW);                                 \
        const idx_t rv = (P - full + VW - 1) / VW;                                            \
        NAME(fwd_body)(nf, FWD_RV, x, off, K, w, y, ldy, 0, full, add);                       \
        FWD_TAIL(nf)                                                                          \
    }
FWD_NF(1)
FWD_NF(2)
FWD_NF(3)
FWD_NF(4)
FWD_NF(5)
FWD_NF(6)
#undef FWD_NF
#undef FWD_TAIL

static void NAME(fwd)(int nf, const T* x, const idx_t* off, idx_t K, const T* w, T* y, idx_t ldy,
                      idx_t P, int add)
{
    switch (nf) {
    case 1: CAT(NAME(fwd), 1)(x, off, K, w, y, ldy, P, add); break;
    case 2: CAT(NAME(fwd), 2)(x, off, K, w, y, ldy, P, add); break;
    case 3: CAT(NAME(fwd), 3)(x, off, K, w, y, ldy, P, add); break;
    case 4: CAT(NAME(fwd), 4)(x, off, K, w, y, ldy, P, add); break;
    case 5: CAT(NAME(fwd), 5)(x, off, K, w, y, ldy, P, add); break;
    default: CAT(NAME(fwd), 6)(x, off, K, w, y, ldy, P, add); break;
    }
}

/* dw[f * ldw + t] += sum over p < P of dy[f * lddy + p] * x[off[t] + p]
 *   for f < NF, t < WG_RT; P a multiple of VW.
 * dy  : IN  [NF][lddy] pitched output gradients, zero at positions that are no output
 * x   : IN  pitched planes
 * off : IN  [WG_RT] tap offsets (padded with a tap reading zeros)
 * dw  : INOUT [NF][ldw]
 */
static inline __attribute__((always_inline)) TARGET void NAME(wgrad_body)(
    const int NF, const T* restrict dy, idx_t lddy, const T* restrict x,
    const idx_t* restrict off, idx_t P, T* restrict dw, idx_t ldw)
{
    V acc[WG_RF][WG_RT];
    const T* xt[WG_RT];
    for (int t = 0; t < WG_RT; ++t)
        xt[t] = x + off[t];
    for (int f = 0; f < NF; ++f)
        for (int t = 0; t < WG_RT; ++t)
            acc[f][t] = (V){0};
    for (idx_t p = 0; p < P; p += VW) {
        V d[WG_RF];
        for (int f = 0; f < NF; ++f)
            d[f] = NAME(load)(dy + f * lddy + p);
        for (int t = 0; t < WG_RT; ++t) {
            const V xv = NAME(load)(xt[t] + p);
            for (int f = 0; f < NF; ++f)
                acc[f][t] += d[f] * xv;
        }
    }
    for (int f = 0; f < NF; ++f)
        for (int t = 0; t < WG_RT; ++t) {
            T s = 0;
            for (int l = 0; l < VW; ++l)
                s += acc[f][t][l];
            dw[f * ldw + t] += s;
        }
}

#define WG_NF(nf)                                                                             \
    static TARGET void CAT(NAME(wgrad), nf)(const T* dy, idx_t lddy, const T* x,              \
                                            const idx_t* off, idx_t P, T* dw, idx_t ldw)      \
    {                                                                                         \
        NAME(wgrad_body)(nf, dy, lddy, x, off, P, dw, ldw);                                   \
    }
WG_NF(1)
#if WG_RF >= 2
WG_NF(2)
#endif
#if WG_RF >= 4
WG_NF(3)
WG_NF(4)
#endif
#undef WG_NF

static void NAME(wgrad)(int nf, const T* dy, idx_t lddy, const T* x, const idx_t* off, idx_t P,
                        T* dw, idx_t ldw)
{
    switch (nf) {
    case 1: CAT(NAME(wgrad), 1)(dy, lddy, x, off, P, dw, ldw); break;
#if WG_RF >= 4
    case 2: CAT(NAME(wgrad), 2)(dy, lddy, x, off, P, dw, ldw); break;
    case 3: CAT(NAME(wgrad), 3)(dy, lddy, x, off, P, dw, ldw); break;
    default: CAT(NAME(wgrad), 4)(dy, lddy, x, off, P, dw, ldw); break;
#elif WG_RF >= 2
    default: CAT(NAME(wgrad), 2)(dy, lddy, x, off, P, dw, ldw); break;
#endif
    }
}

/* part[t * ldp + f] += sum over the positions p < P of dyt[p * lddt + f] * x[off[t] + p]
 *   for f < WT_NV * VW (whole vectors of filters) and t < WT_NT, where the positions are the
 *   first ``ow`` of every row of ``wq`` (the pitch's columns past the output, whose dyt is
 *   zero, are skipped: 2 of every 16 positions of a 14-wide padded layer).
 * The filters run along the vectors, so nothing is reduced across lanes: the weight gradient
 * of channels that fill vectors (Fg >= 16), whatever the number of positions.
 * dyt  : IN  [P][lddt] output gradients with the filters contiguous, zero where no output
 * x    : IN  pitched planes
 * off  : IN  [WT_NT] tap offsets
 * part : INOUT [WT_NT][ldp]
 */
static TARGET void NAME(wgradt)(const T* restrict dyt, idx_t lddt, const T* restrict x,
                                const idx_t* restrict off, idx_t P, idx_t wq, idx_t ow,
                                T* restrict part, idx_t ldp)
{
    V acc[WT_NV][WT_NT];
    const T* xt[WT_NT];
    for (int t = 0; t < WT_NT; ++t)
        xt[t] = x + off[t];
    for (int v = 0; v < WT_NV; ++v)
        for (int t = 0; t < WT_NT; ++t)
            acc[v][t] = (V){0};
    for (idx_t p0 = 0; p0 < P; p0 += wq) {
        const idx_t p1 = p0 + (P - p0 < ow ? P - p0 : ow);
        for (idx_t p = p0; p < p1; ++p) {
            V d[WT_NV];
            for (int v = 0; v < WT_NV; ++v)
                d[v] = NAME(load)(dyt + p * lddt + v * VW);
            for (int t = 0; t < WT_NT; ++t) {
                const T s = xt[t][p];
                for (int v = 0; v < WT_NV; ++v)
                    acc[v][t] += s * d[v];
            }
        }
    }
    for (int t = 0; t < WT_NT; ++t)
        for (int v = 0; v < WT_NV; ++v) {
            T* q = part + t * ldp + v * VW;
            NAME(store)(q, NAME(load)(q) + acc[v][t]);
        }
}

/* The sum of a[0 .. n) in double over 8 interleaved lanes, lane k summing a[k], a[k + 8], ...
 * in order (fastrnn/_cpu/_sums.pxd's order): the same result on every instruction set, here
 * vectorised (one widening conversion and one add per 8 elements under AVX-512). */
static TARGET double NAME(sum8)(const T* restrict a, idx_t n)
{
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    idx_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int k = 0; k < 8; ++k)
            acc[k] += (double)a[j + k];
    for (int k = 0; j + k < n; ++k)
        acc[k] += (double)a[j + k];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

/* d[r * dp + i] = s[r * sp + i] + bias for i < n and r < rows, or with ``act`` max(that, 0)
 * keeping NaN (v < 0 ? 0 : v, as torch.relu): a kernel tile's rows into an output plane, one
 * call per plane, vectorised under the target. */
static TARGET void NAME(store_rows)(const T* restrict s, idx_t sp, idx_t n, idx_t rows, T bias,
                                    int act, T* restrict d, idx_t dp)
{
    for (idx_t r = 0; r < rows; ++r) {
        const T* restrict sr = s + r * sp;
        T* restrict dr = d + r * dp;
        if (act) {
            for (idx_t i = 0; i < n; ++i) {
                const T v = sr[i] + bias;
                dr[i] = v < 0 ? (T)0 : v;
            }
        } else {
            for (idx_t i = 0; i < n; ++i)
                dr[i] = sr[i] + bias;
        }
    }
}

/* The even and odd lanes of two vectors a, b (lanes a0 .. a{L-1} b0 .. b{L-1}), for the
 * stride-2 split below: one two-source permute each. */
#define SPLIT_BODY(VT, TI, L, v)                                                              \
    do {                                                                                      \
        typedef TI idx_v_ __attribute__((vector_size(sizeof(VT))));                           \
        idx_v_ ev_, od_;                                                                      \
        for (int l_ = 0; l_ < (L); ++l_) {                                                    \
            ev_[l_] = 2 * l_;                                                                 \
            od_[l_] = 2 * l_ + 1;                                                             \
        }                                                                                     \
        VT a_, b_;                                                                            \
        __builtin_memcpy(&a_, s + 2 * (v), sizeof a_);                                        \
        __builtin_memcpy(&b_, s + 2 * (v) + (L), sizeof b_);                                  \
        VT e_ = __builtin_shuffle(a_, b_, ev_), o_ = __builtin_shuffle(a_, b_, od_);          \
        __builtin_memcpy(r0 + (v), &e_, sizeof e_);                                           \
        __builtin_memcpy(r1 + (v), &o_, sizeof o_);                                           \
    } while (0)

/* r0[v] = s[2 v], r1[v] = s[2 v + 1] for v < n: the two column phases of a row at stride 2.
 * Whole vectors, then one more ending at n that overlaps the last (it rewrites the same
 * values); rows shorter than a vector in half vectors the same way (a 32-wide input row's
 * 15 or 16 columns per phase ran a scalar loop under AVX-512 before); the rest one by one. */
static TARGET void NAME(split_phases)(const T* restrict s, idx_t n, T* restrict r0,
                                      T* restrict r1)
{
    idx_t v = 0;
#if VB >= 32
    typedef T NAME(half) __attribute__((vector_size(VB / 2)));
    const idx_t hw = VW / 2;
    if (n >= VW) {
        for (; v + VW <= n; v += VW)
            SPLIT_BODY(V, TI, VW, v);
        if (v < n)
            SPLIT_BODY(V, TI, VW, n - VW);
        return;
    }
    if (n >= hw) {
        for (; v + hw <= n; v += hw)
            SPLIT_BODY(NAME(half), TI, hw, v);
        if (v < n)
            SPLIT_BODY(NAME(half), TI, hw, n - hw);
        return;
    }
#endif
    for (; v < n; ++v) {
        r0[v] = s[2 * v];
        r1[v] = s[2 * v + 1];
    }
}
#undef SPLIT_BODY

/* d[2 m] = p[m], d[2 m + 1] = q[m] for m < n: a row's two column phases at stride 2 put
 * back together (the inverse of split_phases), vectorised under the target. */
static TARGET void NAME(merge_phases)(const T* restrict p, const T* restrict q, idx_t n,
                                      T* restrict d)
{
    for (idx_t m = 0; m < n; ++m) {
        d[2 * m] = p[m];
        d[2 * m + 1] = q[m];
    }
}

/* Depthwise forward of one plane (one filter per channel) at stride 1 and dilation 1:
 *   y[oh OW + ow] = b + sum over kh < KH, kw < KW of w[kh KW + kw] pad[(oh + kh) Wp + ow + kw]
 * then ReLU with ``act`` (v < 0 -> 0, NaN kept).
 * pad : IN  the zero-padded plane, OH + KH - 1 rows of Wp columns, readable VW elements past
 *       the last row (vectors past a row's last output read padding or the next row: unused)
 * w   : IN  [KH KW] the channel's filter
 * y   : OUT [OH][OW]
 * Positions in the vector lanes, four vectors of a row at a time, the taps outermost per
 * vector: the plane sits in L1 and every tap is one unaligned load and one FMA. */
static TARGET void NAME(dw_plane)(const T* restrict pad, idx_t Wp, const T* restrict w,
                                  idx_t KH, idx_t KW, T b, int act, T* restrict y, idx_t OH,
                                  idx_t OW)
{
    for (idx_t oh = 0; oh < OH; ++oh) {
        T* restrict yr = y + oh * OW;
        const T* restrict top = pad + oh * Wp;
        idx_t ow = 0;
        for (; ow + 4 * VW <= OW; ow += 4 * VW) {
            V a0 = (V){0} + b, a1 = a0, a2 = a0, a3 = a0;
            for (idx_t kh = 0; kh < KH; ++kh) {
                const T* r = top + kh * Wp + ow;
                for (idx_t kw = 0; kw < KW; ++kw) {
                    const V wv = (V){0} + w[kh * KW + kw];
                    a0 += wv * NAME(load)(r + kw);
                    a1 += wv * NAME(load)(r + kw + VW);
                    a2 += wv * NAME(load)(r + kw + 2 * VW);
                    a3 += wv * NAME(load)(r + kw + 3 * VW);
                }
            }
            NAME(store)(yr + ow, a0);
            NAME(store)(yr + ow + VW, a1);
            NAME(store)(yr + ow + 2 * VW, a2);
            NAME(store)(yr + ow + 3 * VW, a3);
        }
        for (; ow < OW; ow += VW) {
            V a0 = (V){0} + b;
            for (idx_t kh = 0; kh < KH; ++kh) {
                const T* r = top + kh * Wp + ow;
                for (idx_t kw = 0; kw < KW; ++kw)
                    a0 += ((V){0} + w[kh * KW + kw]) * NAME(load)(r + kw);
            }
            if (ow + VW <= OW) {
                NAME(store)(yr + ow, a0);
            } else {
                T tail[VW];
                NAME(store)(tail, a0);
                for (idx_t i = 0; i < OW - ow; ++i)
                    yr[ow + i] = tail[i];
            }
        }
        if (act)
            for (idx_t i = 0; i < OW; ++i)
                yr[i] = yr[i] < 0 ? (T)0 : yr[i];
    }
}

/* Depthwise weight gradient of one plane at stride 1 and dilation 1, added to acc:
 *   acc[t] (VW lanes, summed by the caller) += dyp[oh OWp + ow] pad[(oh + kh) Wp + ow + kw]
 *   for every tap t = kh KW + kw and output (oh, ow); acc[KH KW] += dyp (the bias gradient)
 * pad : IN  the zero-padded input plane, Wp >= OWp + KW - 1 columns (reads stay in a row)
 * dyp : IN  [OH][OWp] the output gradient, zero in the columns past OW
 * Taps outermost: each tap's accumulator stays in registers over the plane (in L1). */
static TARGET void NAME(dw_wgrad_plane)(const T* restrict pad, idx_t Wp, const T* restrict dyp,
                                        idx_t OH, idx_t OWp, idx_t KH, idx_t KW,
                                        T* restrict acc)
{
    for (idx_t kh = 0; kh < KH; ++kh)
        for (idx_t kw = 0; kw < KW; ++kw) {
            V a0 = (V){0}, a1 = (V){0};
            for (idx_t oh = 0; oh < OH; ++oh) {
                const T* d = dyp + oh * OWp;
                const T* r = pad + (oh + kh) * Wp + kw;
                idx_t ow = 0;
                for (; ow + 2 * VW <= OWp; ow += 2 * VW) {
                    a0 += NAME(load)(d + ow) * NAME(load)(r + ow);
                    a1 += NAME(load)(d + ow + VW) * NAME(load)(r + ow + VW);
                }
                for (; ow < OWp; ow += VW)
                    a0 += NAME(load)(d + ow) * NAME(load)(r + ow);
            }
            T* q = acc + (kh * KW + kw) * VW;
            NAME(store)(q, NAME(load)(q) + a0 + a1);
        }
    V s0 = (V){0};
    for (idx_t i = 0; i < OH * OWp; i += VW)
        s0 += NAME(load)(dyp + i);
    T* q = acc + KH * KW * VW;
    NAME(store)(q, NAME(load)(q) + s0);
}

#undef V
#undef NAME
#undef CAT
#undef CAT_
#undef VW
#undef FWD_RF
#undef WG_RT
