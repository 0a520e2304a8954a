/* The recurrent cells for the engine (recurrent.pyx): _recurrent_cell_math.h compiled for
 * float and double, each for three instruction sets, and one dispatch per direction.
 *
 * Instruction sets (FR_ISA_*): AVX-512 (x86-64-v4), AVX2+FMA (x86-64-v3), and the portable
 * baseline. Wheels target baseline x86-64, so the fast variants are compiled with target
 * attributes and picked at run time (fastrnn._cpu._recurrent_threads.simd_level, which a
 * switch can force to test each variant); other compilers and CPUs get the portable one only.
 */
#ifndef FR_RECURRENT_CELLS_H
#define FR_RECURRENT_CELLS_H

#include <math.h>
#include <stdint.h>

enum { FR_ISA_PORTABLE = 0, FR_ISA_AVX2 = 1, FR_ISA_AVX512 = 2 };
enum { FR_LSTM = 0, FR_GRU = 1, FR_RNN_TANH = 2, FR_RNN_RELU = 3 };

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__)
#define FR_HAVE_ISA_VARIANTS 1
#include <immintrin.h>
#include "_vexp.h"
#else
#define FR_HAVE_ISA_VARIANTS 0
#endif

#define FR_CAT2(a, b) a##_##b
#define FR_CAT(a, b) FR_CAT2(a, b)

/* FR_AVX512: the variant's activations use AVX-512 intrinsics (float32, x86-64-v4 only) */
#define FR_AVX512 0

/* float, portable */
#define FR_T float
#define FR_IS_FLOAT 1
#define FR_NAME(x) FR_CAT(fr_##x, f0)
#define FR_TARGET
#include "_recurrent_cell_math.h"
#undef FR_NAME
#undef FR_TARGET
/* double, portable */
#undef FR_T
#undef FR_IS_FLOAT
#define FR_T double
#define FR_IS_FLOAT 0
#define FR_NAME(x) FR_CAT(fr_##x, d0)
#define FR_TARGET
#include "_recurrent_cell_math.h"
#undef FR_NAME
#undef FR_TARGET
#undef FR_T
#undef FR_IS_FLOAT

#if FR_HAVE_ISA_VARIANTS
#define FR_T float
#define FR_IS_FLOAT 1
#define FR_NAME(x) FR_CAT(fr_##x, f1)
#define FR_TARGET __attribute__((target("arch=x86-64-v3")))
#include "_recurrent_cell_math.h"
#undef FR_NAME
#undef FR_TARGET
#define FR_NAME(x) FR_CAT(fr_##x, f2)
#define FR_TARGET __attribute__((target("arch=x86-64-v4")))
#undef FR_AVX512
#define FR_AVX512 1
#include "_recurrent_cell_math.h"
#undef FR_AVX512
#define FR_AVX512 0
#undef FR_NAME
#undef FR_TARGET
#undef FR_T
#undef FR_IS_FLOAT
#define FR_T double
#define FR_IS_FLOAT 0
#define FR_NAME(x) FR_CAT(fr_##x, d1)
#define FR_TARGET __attribute__((target("arch=x86-64-v3")))
#include "_recurrent_cell_math.h"
#undef FR_NAME
#undef FR_TARGET
#define FR_NAME(x) FR_CAT(fr_##x, d2)
#define FR_TARGET __attribute__((target("arch=x86-64-v4")))
#include "_recurrent_cell_math.h"
#undef FR_NAME
#undef FR_TARGET
#undef FR_T
#undef FR_IS_FLOAT

/* The best instruction set this CPU runs, and whether it runs a given one. */
static int fr_isa_supported(int isa) {
    __builtin_cpu_init();
    if (isa == FR_ISA_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
            && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")
            && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (isa == FR_ISA_AVX2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
            && __builtin_cpu_supports("bmi2");
    return isa == FR_ISA_PORTABLE;
}
#define FR_PICK(isa, name, t) \
    ((isa) == FR_ISA_AVX512 ? fr_##name##_##t##2 : (isa) == FR_ISA_AVX2 ? fr_##name##_##t##1 \
                                                                       : fr_##name##_##t##0)
#else
static int fr_isa_supported(int isa) { return isa == FR_ISA_PORTABLE; }
#define FR_PICK(isa, name, t) fr_##name##_##t##0
#endif

/* One step of a cell over `rows` rows and the units [u0, u1); arguments a cell does not use are
   ignored (see _recurrent_cell_math.h for each cell's contract).
   forward:  g gates (pre-activations in; LSTM and RNN: activations out), hw GRU's recurrent
             pre-activations, b1/b2 biases (GRU: b_ih/b_hh), hp/cp previous states, hn the new
             h (LSTM: r = o tanh c), cn the new c, sv GRU's saved values or NULL.
   backward: acts what the forward saved (LSTM/RNN: g; GRU: sv), cp/cn c_{t-1}/c_t, hp h_{t-1},
             dyt the output gradient (LSTM: may be NULL), dh/dc the running state gradients,
             dax/dah the pre-activation gradients (the same array except for the GRU). */
#define FR_DISPATCH(T, t)                                                                    \
    static void fr_cell_fwd_##t(int isa, int cell, Py_ssize_t rows, T *g, const T *hw,          \
                                const T *b1, const T *b2, const T *hp, const T *cp, T *hn,      \
                                T *cn, T *sv, Py_ssize_t H, Py_ssize_t bs, Py_ssize_t u0,       \
                                Py_ssize_t u1) {                                                \
        if (rows <= 0 || u1 <= u0) return;                                                      \
        if (cell == FR_LSTM)                                                                    \
            FR_PICK(isa, lstm_fwd, t)(rows, g, b1, cp, cn, hn, H, bs, u0, u1);                  \
        else if (cell == FR_GRU)                                                                \
            FR_PICK(isa, gru_fwd, t)(rows, g, hw, b1, b2, hp, hn, sv, H, bs, u0, u1);           \
        else                                                                                    \
            FR_PICK(isa, rnn_fwd, t)(rows, cell == FR_RNN_RELU, g, b1, hn, H, u0, u1);          \
    }                                                                                           \
    static void fr_cell_bwd_##t(int isa, int cell, Py_ssize_t rows, const T *acts, const T *cp, \
                                const T *cn, const T *hp, const T *dyt, T *dh, T *dc, T *dax,   \
                                T *dah, Py_ssize_t H, Py_ssize_t bs, Py_ssize_t u0,             \
                                Py_ssize_t u1) {                                                \
        if (rows <= 0 || u1 <= u0) return;                                                      \
        if (cell == FR_LSTM)                                                                    \
            FR_PICK(isa, lstm_bwd, t)(rows, acts, cp, cn, dyt, dh, dc, dax, H, bs, u0, u1);     \
        else if (cell == FR_GRU)                                                                \
            FR_PICK(isa, gru_bwd, t)(rows, acts, hp, dyt, dh, dax, dah, H, bs, u0, u1);         \
        else                                                                                    \
            FR_PICK(isa, rnn_bwd, t)(rows, cell == FR_RNN_RELU, acts, dyt, dh, dax, H, u0, u1); \
    }
FR_DISPATCH(float, f)
FR_DISPATCH(double, d)
#undef FR_DISPATCH

/* The float32 activations of variant `isa` over v[0..n), in place (sigmoid, or tanh when
   `tanh_`): what the cells compute, callable from tests of their accuracy and saturation. */
static void fr_activations_f(int isa, int tanh_, float *v, Py_ssize_t n) {
    FR_PICK(isa, activations, f)(tanh_, v, n);
}

#endif
