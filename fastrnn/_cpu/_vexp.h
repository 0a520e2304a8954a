/* e^x for 16 float32 lanes (AVX-512), shared by the recurrent cells' activations
 * (_recurrent_cell_math.h) and the softmax cross-entropy rows (_train.pyx): Cody-Waite
 * reduction by ln 2 in two parts and Cephes' degree-6 polynomial, as the scalar fr_exp /
 * fastrnn_expf, with the scaling by 2^n through scalef (+inf above the float range, 0 below
 * it). Callers clamp x to a range they choose. Included inside an x86-64 GCC >= 11 block. */
#ifndef FR_VEXP_H
#define FR_VEXP_H
#include <immintrin.h>

static inline __attribute__((always_inline, target("avx512f"))) __m512 fr_v16_exp(__m512 x)
{
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif /* FR_VEXP_H */
