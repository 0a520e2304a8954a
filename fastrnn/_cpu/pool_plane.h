/* Max pooling of one float32 plane over 2x2 windows at stride 2 without padding (the common
 * pooling), values and positions: max_argmax_plane's rule (fastrnn/_cpu/_pool_plane.pxd) on
 * its taps in its order, four outputs per step on SSE2 (every x86-64 CPU), whose compiler
 * does not vectorise the general loop's strided taps.
 *
 * x   : IN  [2 OH (+ 1), W] rows of the plane (W >= 2 OW)
 * y   : OUT [OH, OW]
 * arg : OUT [OH, OW] flat index into x of each maximum
 */
#ifndef FASTRNN_POOL_PLANE_H
#define FASTRNN_POOL_PLANE_H

#include <stddef.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* the running maximum (m, p) meets tap (v, q): a larger value, or NaN over a number, replaces
 * it; on a tie the earlier tap stays */
#define FR_POOL_TAKE(v, q)                                                                     \
    do {                                                                                       \
        const int up_ = ((v) > m) | (((v) != (v)) & (m == m));                               \
        m = up_ ? (v) : m;                                                                     \
        p = up_ ? (q) : p;                                                                     \
    } while (0)

#if defined(__SSE2__)
static inline void fr_pool_take4(__m128 v, __m128i q, __m128* m, __m128i* p)
{
    const __m128 up = _mm_or_ps(_mm_cmpgt_ps(v, *m),
                                _mm_and_ps(_mm_cmpunord_ps(v, v), _mm_cmpord_ps(*m, *m)));
    const __m128i upi = _mm_castps_si128(up);
    *m = _mm_or_ps(_mm_and_ps(up, v), _mm_andnot_ps(up, *m));
    *p = _mm_or_si128(_mm_and_si128(upi, q), _mm_andnot_si128(upi, *p));
}
#endif

static inline void fr_max_argmax_2x2_f32(const float* x, float* y, int* arg, ptrdiff_t W,
                                         ptrdiff_t OH, ptrdiff_t OW)
{
    for (ptrdiff_t oh = 0; oh < OH; ++oh) {
        const float* r0 = x + 2 * oh * W;
        const float* r1 = r0 + W;
        float* yr = y + oh * OW;
        int* ar = arg + oh * OW;
        const int base = (int)(2 * oh * W), w = (int)W;
        ptrdiff_t ow = 0;
#if defined(__SSE2__)
        const __m128i lanes = _mm_setr_epi32(0, 2, 4, 6);
        const __m128i one = _mm_set1_epi32(1), below = _mm_set1_epi32(w);
        for (; ow + 4 <= OW; ow += 4) {
            const __m128 a0 = _mm_loadu_ps(r0 + 2 * ow), a1 = _mm_loadu_ps(r0 + 2 * ow + 4);
            const __m128 b0 = _mm_loadu_ps(r1 + 2 * ow), b1 = _mm_loadu_ps(r1 + 2 * ow + 4);
            const __m128i q0 = _mm_add_epi32(_mm_set1_epi32(base + 2 * (int)ow), lanes);
            const __m128i q2 = _mm_add_epi32(q0, below);
            __m128 m = _mm_shuffle_ps(a0, a1, _MM_SHUFFLE(2, 0, 2, 0));
            __m128i p = q0;
            fr_pool_take4(_mm_shuffle_ps(a0, a1, _MM_SHUFFLE(3, 1, 3, 1)),
                          _mm_add_epi32(q0, one), &m, &p);
            fr_pool_take4(_mm_shuffle_ps(b0, b1, _MM_SHUFFLE(2, 0, 2, 0)), q2, &m, &p);
            fr_pool_take4(_mm_shuffle_ps(b0, b1, _MM_SHUFFLE(3, 1, 3, 1)),
                          _mm_add_epi32(q2, one), &m, &p);
            _mm_storeu_ps(yr + ow, m);
            _mm_storeu_si128((__m128i*)(ar + ow), p);
        }
#endif
        for (; ow < OW; ++ow) {
            const int q = base + 2 * (int)ow;
            float m = r0[2 * ow];  /* the first tap always replaces the initial -inf */
            int p = q;
            FR_POOL_TAKE(r0[2 * ow + 1], q + 1);
            FR_POOL_TAKE(r1[2 * ow], q + w);
            FR_POOL_TAKE(r1[2 * ow + 1], q + w + 1);
            yr[ow] = m;
            ar[ow] = p;
        }
    }
}

#undef FR_POOL_TAKE

#endif
