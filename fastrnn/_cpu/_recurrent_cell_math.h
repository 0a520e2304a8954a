/* The pointwise math of every recurrent cell, written once over the float type.
 *
 * _recurrent_cells.h includes this file once per (float type, instruction set): FR_T is the
 * type, FR_NAME(x) pastes the variant's suffix onto a name, FR_TARGET is the variant's
 * target attribute (empty for the portable build), FR_IS_FLOAT selects the fast float32
 * exp. The engine (recurrent.pyx) calls one cell through fr_cell_fwd_* / fr_cell_bwd_*.
 *
 * Layouts (row-major, one row per active sequence, `rows` rows): gate rows in the blocked
 * layout of _recurrent_common.pxd (units in blocks of bs, each block holding all its gates),
 * states with H (or P) features per row. Each call handles the hidden units [u0, u1), a whole
 * number of blocks, so OpenMP threads can split the units. Steps cite the references:
 * fastrnn/reference/{lstm,gru,rnn}.py.
 */

#if FR_IS_FLOAT
/* Branch-free expf: Cody-Waite reduction + Cephes polynomial, rel. error < 2 ulp on
   [-87.3, 88.7]; outside that range the result saturates exactly (0 below, +inf above), so a
   saturated sigmoid is exactly 0 or 1 and its derivative s (1 - s) exactly 0, like libm's. */
static inline FR_TARGET float FR_NAME(exp)(float x0) {
    float x = x0 < -87.0f ? -87.0f : x0;
    x = x > 88.0f ? 88.0f : x;
    float t = x * 1.44269504088896341f + 12582912.0f; /* round to nearest via 1.5*2^23 */
    float n = t - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    union { int32_t i; float f; } s;
    s.i = ((int32_t) n + 127) << 23;
    y = y * s.f;
    y = x0 > 88.72283f ? __builtin_inff() : y;
    y = x0 < -87.33654f ? 0.0f : y;
    return y;
}
static inline FR_TARGET float FR_NAME(sigmoid)(float x) {
    return 1.0f / (1.0f + FR_NAME(exp)(-x));
}
/* tanh x = 1 - 2 / (1 + e^{2x}): absolute error ~1e-7 near 0, exactly +-1 when saturated. */
static inline FR_TARGET float FR_NAME(tanh)(float x) {
    return 1.0f - 2.0f / (1.0f + FR_NAME(exp)(2.0f * x));
}
#else
static inline FR_TARGET double FR_NAME(sigmoid)(double x) { return 1.0 / (1.0 + exp(-x)); }
static inline FR_TARGET double FR_NAME(tanh)(double x) { return tanh(x); }
#endif

/* The activations over arrays, in place: what the cells below call. The float32 AVX-512
   variant evaluates them 16 lanes at a time with intrinsics (the scalar forms' divisions cost
   more than all their other arithmetic: the LSTM forward cell ran 2.3x slower); the others loop
   over the scalar forms above, which the compiler vectorises. Same saturation either way. */
#if FR_IS_FLOAT && FR_AVX512
/* 1 / (1 + e^{k x}) for 16 lanes: e^{kx} as 2^n p(r) (the polynomial of fr_exp, the scaling by
   scalef, which overflows to +inf and underflows to 0 like fr_exp's saturation), the
   reciprocal as rcp14 and one Newton step (relative error about 2^-28 before the last
   rounding), exactly 0 where the denominator is +inf and exactly 1 where it is 1. NaN stays
   NaN (max/min return their second operand, x, when it is NaN). */
static inline FR_TARGET __m512 FR_NAME(v_recip1pexp)(__m512 x, float k) {
    x = _mm512_mul_ps(x, _mm512_set1_ps(k));
    x = _mm512_min_ps(_mm512_set1_ps(100.0f), _mm512_max_ps(_mm512_set1_ps(-100.0f), x));
    __m512 d = _mm512_add_ps(fr_v16_exp(x), _mm512_set1_ps(1.0f));
    __m512 y = _mm512_rcp14_ps(d);
    y = _mm512_fmadd_ps(y, _mm512_fnmadd_ps(d, y, _mm512_set1_ps(1.0f)), y);
    __mmask16 inf = _mm512_cmp_ps_mask(d, _mm512_set1_ps(__builtin_inff()), _CMP_EQ_OQ);
    return _mm512_mask_blend_ps(inf, y, _mm512_setzero_ps());
}
/* v[i] = add + mul / (1 + e^{k v[i]}), i < n: sigmoid (k -1, mul 1, add 0) and tanh (k 2,
   mul -2, add 1). */
static inline __attribute__((always_inline)) FR_TARGET void FR_NAME(act_n)(
    FR_T *v, Py_ssize_t n, float k, float mul, float add)
{
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 y = FR_NAME(v_recip1pexp)(_mm512_loadu_ps(v + i), k);
        _mm512_storeu_ps(v + i, _mm512_fmadd_ps(y, _mm512_set1_ps(mul), _mm512_set1_ps(add)));
    }
    if (i < n) {
        __mmask16 m = (__mmask16) ((1u << (n - i)) - 1u);
        __m512 y = FR_NAME(v_recip1pexp)(_mm512_maskz_loadu_ps(m, v + i), k);
        _mm512_mask_storeu_ps(v + i, m,
                              _mm512_fmadd_ps(y, _mm512_set1_ps(mul), _mm512_set1_ps(add)));
    }
}
static inline __attribute__((always_inline)) FR_TARGET void FR_NAME(sigmoid_n)(
    FR_T *v, Py_ssize_t n) { FR_NAME(act_n)(v, n, -1.0f, 1.0f, 0.0f); }
static inline __attribute__((always_inline)) FR_TARGET void FR_NAME(tanh_n)(
    FR_T *v, Py_ssize_t n) { FR_NAME(act_n)(v, n, 2.0f, -2.0f, 1.0f); }
#else
static inline __attribute__((always_inline)) FR_TARGET void FR_NAME(sigmoid_n)(
    FR_T *restrict v, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) v[i] = FR_NAME(sigmoid)(v[i]);
}
static inline __attribute__((always_inline)) FR_TARGET void FR_NAME(tanh_n)(
    FR_T *restrict v, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) v[i] = FR_NAME(tanh)(v[i]);
}
#endif

/* Both activations out of line, for tests (fr_activations_f). */
static FR_TARGET __attribute__((unused)) void FR_NAME(activations)(int tanh_, FR_T *v,
                                                                    Py_ssize_t n) {
    if (tanh_) FR_NAME(tanh_n)(v, n); else FR_NAME(sigmoid_n)(v, n);
}

/* The cells evaluate their activations over chunks of at most FR_CHUNK units (stack arrays). */
#ifndef FR_CHUNK
#define FR_CHUNK 256
#endif

#define FR_SZ(j0) (H - (j0) < bs ? H - (j0) : bs)

/* LSTM L3-L4. g: (rows, 4H) pre-activations without bias in, activations i, f, g, o out;
   cp, cn: (rows, H) c_{t-1}, c_t; rn: (rows, H) r_t = o tanh(c_t) (h_t, or what the projection
   multiplies). */
static FR_TARGET void FR_NAME(lstm_fwd)(
    Py_ssize_t rows, FR_T *restrict g, const FR_T *restrict bias, const FR_T *restrict cp,
    FR_T *restrict cn, FR_T *restrict rn, Py_ssize_t H, Py_ssize_t bs, Py_ssize_t u0,
    Py_ssize_t u1)
{
    for (Py_ssize_t n = 0; n < rows; n++) {
        FR_T *restrict gr = g + n * 4 * H;
        const FR_T *restrict cpr = cp + n * H;
        FR_T *restrict cnr = cn + n * H;
        FR_T *restrict rnr = rn + n * H;
        for (Py_ssize_t j0 = u0; j0 < u1; j0 += bs) {
            Py_ssize_t sz = FR_SZ(j0);
            FR_T *restrict a = gr + 4 * j0;
            const FR_T *restrict bb = bias + 4 * j0;
            /* L3: gate nonlinearities (L1's bias added here): i, f, g, o in place */
            for (Py_ssize_t u = 0; u < 4 * sz; u++)
                a[u] += bb[u];
            FR_NAME(sigmoid_n)(a, 2 * sz);
            FR_NAME(tanh_n)(a + 2 * sz, sz);
            FR_NAME(sigmoid_n)(a + 3 * sz, sz);
            /* L4: cell and hidden state */
            for (Py_ssize_t u = 0; u < sz; u++) {
                FR_T c = a[sz + u] * cpr[j0 + u] + a[u] * a[2 * sz + u];
                cnr[j0 + u] = c;
                rnr[j0 + u] = c;
            }
            FR_NAME(tanh_n)(rnr + j0, sz);
            for (Py_ssize_t u = 0; u < sz; u++)
                rnr[j0 + u] *= a[3 * sz + u];
        }
    }
}

/* LSTM LB1-LB4. acts: (rows, 4H) i, f, g, o; cp, cn: c_{t-1}, c_t; dyt: (rows, H) or NULL;
   dh: (rows, H) in: gradient reaching r_t (besides dyt), out: 0 (the GEMM adds da W_hh);
   dc: (rows, H) gradient reaching c_t -> reaching c_{t-1}; da: (rows, 4H) gate gradients. */
static FR_TARGET void FR_NAME(lstm_bwd)(
    Py_ssize_t rows, const FR_T *restrict acts, const FR_T *restrict cp,
    const FR_T *restrict cn, const FR_T *restrict dyt, FR_T *restrict dh, FR_T *restrict dc,
    FR_T *restrict da, Py_ssize_t H, Py_ssize_t bs, Py_ssize_t u0, Py_ssize_t u1)
{
    for (Py_ssize_t n = 0; n < rows; n++) {
        const FR_T *restrict ar = acts + n * 4 * H;
        FR_T *restrict dar = da + n * 4 * H;
        const FR_T *restrict cpr = cp + n * H;
        const FR_T *restrict cnr = cn + n * H;
        const FR_T *restrict dyr = dyt ? dyt + n * H : NULL;
        FR_T *restrict dhr = dh + n * H;
        FR_T *restrict dcr = dc + n * H;
        for (Py_ssize_t j0 = u0; j0 < u1; j0 += bs) {
            Py_ssize_t sz = FR_SZ(j0);
            const FR_T *restrict a = ar + 4 * j0;
            FR_T *restrict d = dar + 4 * j0;
            /* (tanh c_t is recomputed by the scalar form: this pass is bound by its memory
               traffic, which hides the division) */
            for (Py_ssize_t u = 0; u < sz; u++) {
                Py_ssize_t j = j0 + u;
                FR_T i = a[u], f = a[sz + u], gg = a[2 * sz + u], o = a[3 * sz + u];
                /* LB1: gradient reaching this step's r (and c) */
                FR_T dhs = dhr[j] + (dyr ? dyr[j] : (FR_T) 0);
                /* LB2: through r = o tanh(c) and c = f c_prev + i g */
                FR_T tc = FR_NAME(tanh)(cnr[j]);
                FR_T dct = dcr[j] + dhs * o * (1 - tc * tc);
                /* LB3: through the gate nonlinearities */
                d[u] = dct * gg * i * (1 - i);
                d[sz + u] = dct * cpr[j] * f * (1 - f);
                d[2 * sz + u] = dct * i * (1 - gg * gg);
                d[3 * sz + u] = dhs * tc * o * (1 - o);
                /* LB4: to c_{t-1}; dh_{t-1} = da W_hh is the engine's GEMM */
                dcr[j] = dct * f;
                dhr[j] = 0;
            }
        }
    }
}

/* GRU G3-G4. xw: (rows, 3H) x_t W_ih^T without bias; hw: (rows, 3H) h_{t-1} W_hh^T without
   bias; hp, hn: (rows, H) h_{t-1}, h_t; sv: (rows, 4H) r, z, n, hn (= W_hn h + b_hn) out, or
   NULL. */
static FR_TARGET void FR_NAME(gru_fwd)(
    Py_ssize_t rows, const FR_T *restrict xw, const FR_T *restrict hw,
    const FR_T *restrict b_ih, const FR_T *restrict b_hh, const FR_T *restrict hp,
    FR_T *restrict hn, FR_T *restrict sv, Py_ssize_t H, Py_ssize_t bs, Py_ssize_t u0,
    Py_ssize_t u1)
{
    for (Py_ssize_t n = 0; n < rows; n++) {
        const FR_T *restrict xr = xw + n * 3 * H;
        const FR_T *restrict hr = hw + n * 3 * H;
        const FR_T *restrict hpr = hp + n * H;
        FR_T *restrict hnr = hn + n * H;
        FR_T *restrict svr = sv ? sv + n * 4 * H : NULL;
        for (Py_ssize_t j0 = u0; j0 < u1; j0 += bs) {
            Py_ssize_t sz = FR_SZ(j0);
            for (Py_ssize_t k0 = 0; k0 < sz; k0 += FR_CHUNK) {
                Py_ssize_t w = sz - k0 < FR_CHUNK ? sz - k0 : FR_CHUNK;
                const FR_T *restrict xa = xr + 3 * j0 + k0;
                const FR_T *restrict ha = hr + 3 * j0 + k0;
                const FR_T *restrict bi = b_ih + 3 * j0 + k0;
                const FR_T *restrict bh = b_hh + 3 * j0 + k0;
                FR_T r[FR_CHUNK], z[FR_CHUNK], hh[FR_CHUNK], nn[FR_CHUNK];
                /* G3: gates */
                for (Py_ssize_t u = 0; u < w; u++) {
                    r[u] = xa[u] + bi[u] + ha[u] + bh[u];
                    z[u] = xa[sz + u] + bi[sz + u] + ha[sz + u] + bh[sz + u];
                }
                FR_NAME(sigmoid_n)(r, w);
                FR_NAME(sigmoid_n)(z, w);
                for (Py_ssize_t u = 0; u < w; u++) {
                    hh[u] = ha[2 * sz + u] + bh[2 * sz + u];
                    nn[u] = xa[2 * sz + u] + bi[2 * sz + u] + r[u] * hh[u];
                }
                FR_NAME(tanh_n)(nn, w);
                /* G4: new state */
                for (Py_ssize_t u = 0; u < w; u++) {
                    Py_ssize_t j = j0 + k0 + u;
                    hnr[j] = (1 - z[u]) * nn[u] + z[u] * hpr[j];
                }
                if (svr) {
                    FR_T *restrict sa = svr + 4 * j0 + k0;
                    for (Py_ssize_t u = 0; u < w; u++) {
                        sa[u] = r[u]; sa[sz + u] = z[u]; sa[2 * sz + u] = nn[u];
                        sa[3 * sz + u] = hh[u];
                    }
                }
            }
        }
    }
}

/* GRU GB1-GB4. sv: (rows, 4H) r, z, n, hn; hp: h_{t-1}; dh in: gradient reaching h_t besides
   dyt, out: the direct path z dh_step (the GEMM adds da_h W_hh); dax, dah: (rows, 3H) the
   gradients of the input and recurrent pre-activations (they differ in n: da_n vs da_n r). */
static FR_TARGET void FR_NAME(gru_bwd)(
    Py_ssize_t rows, const FR_T *restrict sv, const FR_T *restrict hp,
    const FR_T *restrict dyt, FR_T *restrict dh, FR_T *restrict dax, FR_T *restrict dah,
    Py_ssize_t H, Py_ssize_t bs, Py_ssize_t u0, Py_ssize_t u1)
{
    for (Py_ssize_t n = 0; n < rows; n++) {
        const FR_T *restrict sr = sv + n * 4 * H;
        const FR_T *restrict hpr = hp + n * H;
        const FR_T *restrict dyr = dyt + n * H;
        FR_T *restrict dhr = dh + n * H;
        FR_T *restrict dxr = dax + n * 3 * H;
        FR_T *restrict dhwr = dah + n * 3 * H;
        for (Py_ssize_t j0 = u0; j0 < u1; j0 += bs) {
            Py_ssize_t sz = FR_SZ(j0);
            const FR_T *restrict sa = sr + 4 * j0;
            FR_T *restrict dxa = dxr + 3 * j0;
            FR_T *restrict dha = dhwr + 3 * j0;
            for (Py_ssize_t u = 0; u < sz; u++) {
                Py_ssize_t j = j0 + u;
                FR_T r = sa[u], z = sa[sz + u], nn = sa[2 * sz + u], hh = sa[3 * sz + u];
                /* GB1: gradient reaching this step's new h */
                FR_T dhs = dyr[j] + dhr[j];
                /* GB2: through h = (1 - z) n + z h_prev */
                FR_T dn = dhs * (1 - z);
                FR_T dz = dhs * (hpr[j] - nn);
                /* GB3: through the gate nonlinearities */
                FR_T dan = dn * (1 - nn * nn);
                FR_T dar = dan * hh * r * (1 - r);
                FR_T daz = dz * z * (1 - z);
                dxa[u] = dar; dxa[sz + u] = daz; dxa[2 * sz + u] = dan;
                dha[u] = dar; dha[sz + u] = daz; dha[2 * sz + u] = dan * r;
                /* GB4: the direct path to h_{t-1} */
                dhr[j] = dhs * z;
            }
        }
    }
}

/* Elman RNN R3. g: (rows, H) pre-activations without bias in, h_t out (kept for backward);
   hn: (rows, H) h_t. */
static FR_TARGET void FR_NAME(rnn_fwd)(
    Py_ssize_t rows, int relu, FR_T *restrict g, const FR_T *restrict bias, FR_T *restrict hn,
    Py_ssize_t H, Py_ssize_t u0, Py_ssize_t u1)
{
    for (Py_ssize_t n = 0; n < rows; n++) {
        FR_T *restrict gr = g + n * H;
        FR_T *restrict hnr = hn + n * H;
        if (relu) {
            for (Py_ssize_t j = u0; j < u1; j++) {
                FR_T a = gr[j] + bias[j];
                FR_T h = a < 0 ? (FR_T) 0 : a; /* NaN stays NaN, like numpy.maximum and torch */
                gr[j] = h; hnr[j] = h;
            }
        } else {
            for (Py_ssize_t j = u0; j < u1; j++)
                gr[j] += bias[j];
            FR_NAME(tanh_n)(gr + u0, u1 - u0);
            for (Py_ssize_t j = u0; j < u1; j++)
                hnr[j] = gr[j];
        }
    }
}

/* Elman RNN RB1-RB3. acts: (rows, H) h_t; dh in: gradient reaching h_t besides dyt, out: 0;
   da: (rows, H). */
static FR_TARGET void FR_NAME(rnn_bwd)(
    Py_ssize_t rows, int relu, const FR_T *restrict acts, const FR_T *restrict dyt,
    FR_T *restrict dh, FR_T *restrict da, Py_ssize_t H, Py_ssize_t u0, Py_ssize_t u1)
{
    for (Py_ssize_t n = 0; n < rows; n++) {
        const FR_T *restrict ar = acts + n * H;
        const FR_T *restrict dyr = dyt + n * H;
        FR_T *restrict dhr = dh + n * H;
        FR_T *restrict dar = da + n * H;
        for (Py_ssize_t j = u0; j < u1; j++) {
            /* RB1, RB2: through the nonlinearity (acts holds h_t) */
            FR_T dhs = dyr[j] + dhr[j];
            FR_T h = ar[j];
            dar[j] = relu ? (h > 0 ? dhs : (FR_T) 0) : dhs * (1 - h * h);
            dhr[j] = 0;
        }
    }
}

#undef FR_SZ
