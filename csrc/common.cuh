// fastrnn/csrc/common.cuh -- device helpers shared by every kernel file.
//
// This header is never #included: fastrnn/_cuda/_kernels.py prepends its text to each .cu file
// before handing the source to NVRTC (CuPy RawModule), so CuPy's compile cache key covers it (a
// header pulled in with -I would not be part of the key). The host tests compile the same text as
// C++ (tests/cuda_host_emulation.py) after a shim that defines the CUDA built-ins.
//
// No host headers: NVRTC rejects <cmath>/<cstdint>; the math functions used here (expf, exp,
// tanhf, tanh, fabsf, fabs) are NVRTC built-ins. The device math of the recurrent cells (gate
// nonlinearities and their derivatives) is here, once, for every cell of csrc/.
#ifndef FASTRNN_COMMON_CUH
#define FASTRNN_COMMON_CUH

// Flat offsets and sizes are 64-bit everywhere: T*N*4H or N*C*H*W can pass 2^31 elements.
typedef long long index_t;

// Grid-stride loop over [0, n): correct for any grid size, so the launcher can cap the grid
// (fastrnn/_cuda/_launch.py MAX_BLOCKS) and the tests can force several passes per thread with
// a tiny grid. The index arithmetic is done in 64 bits before it can overflow.
#define FASTRNN_GRID_STRIDE_LOOP(i, n)                                            \
    for (index_t i = (index_t)blockIdx.x * (index_t)blockDim.x + (index_t)threadIdx.x; \
         i < (index_t)(n); i += (index_t)blockDim.x * (index_t)gridDim.x)

// -- device math: the recurrent cells' nonlinearities -------------------------------------------
//
// The gates saturate exactly: beyond the points below a sigmoid is exactly 1 or 0 and a tanh
// exactly +-1, so the derivatives s * (1 - s) and 1 - t * t of a saturated gate are exactly 0 (the
// backward kernels take them from the saved activations). The points are where the correctly
// rounded value already is the saturated one: 1 - sigmoid(a) ~ exp(-a) falls below half an ulp of
// 1 (2^-25 in float, 2^-54 in double) past a = 17.33 / 37.43, 1 - tanh(a) ~ 2 exp(-2a) past
// 9.01 / 19.06; sigmoid(a) ~ exp(a) drops below the smallest normal number (FLT_MIN, DBL_MIN)
// below a = -87.34 / -708.4: there the true value underflows and the sigmoid is 0, not a
// subnormal ~1e-38 (which -ftz=true would flush in some instructions and not in others). So the
// clamps never move a value by more than the rounding the library function may do anyway, and
// expf/tanhf's own error near those points cannot leave a 1 - 2^-24 where 1 belongs. NaN passes
// through (every comparison with it is false).
template <typename T>
struct fr_saturation;
template <>
struct fr_saturation<float> {
    static constexpr float sigmoid_one = 17.5f;     // sigmoid(a) == 1 for a > this
    static constexpr float sigmoid_zero = -87.34f;  // sigmoid(a) == 0 for a < this
    static constexpr float tanh_one = 9.1f;         // tanh(a) == +-1 for |a| > this
};
template <>
struct fr_saturation<double> {
    static constexpr double sigmoid_one = 37.5;
    static constexpr double sigmoid_zero = -708.4;
    static constexpr double tanh_one = 19.1;
};

__device__ __forceinline__ float fr_exp(float a) { return expf(a); }
__device__ __forceinline__ double fr_exp(double a) { return exp(a); }
__device__ __forceinline__ float fr_tanh_raw(float a) { return tanhf(a); }
__device__ __forceinline__ double fr_tanh_raw(double a) { return tanh(a); }
__device__ __forceinline__ float fr_abs(float a) { return fabsf(a); }
__device__ __forceinline__ double fr_abs(double a) { return fabs(a); }

// The reference's stable sigmoid (fastrnn/reference/_common.py: exp never overflows), saturated.
template <typename T>
__device__ __forceinline__ T fr_sigmoid(T a) {
    if (a > fr_saturation<T>::sigmoid_one) return T(1);
    if (a < fr_saturation<T>::sigmoid_zero) return T(0);
    const T e = fr_exp(-fr_abs(a));
    return a >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

template <typename T>
__device__ __forceinline__ T fr_tanh(T a) {
    if (a > fr_saturation<T>::tanh_one) return T(1);
    if (a < -fr_saturation<T>::tanh_one) return T(-1);
    return fr_tanh_raw(a);
}

// Derivatives from the activation's value: d sigmoid = s (1 - s), d tanh = 1 - t^2 (exactly 0 for
// a saturated gate).
template <typename T>
__device__ __forceinline__ T fr_sigmoid_grad(T s) {
    return s * (T(1) - s);
}
template <typename T>
__device__ __forceinline__ T fr_tanh_grad(T t) {
    return T(1) - t * t;
}

// max(a, 0) that propagates NaN like numpy.maximum (the reference's relu).
template <typename T>
__device__ __forceinline__ T fr_relu(T a) {
    return (a > T(0) || a != a) ? a : T(0);
}

template <typename T>
__device__ __forceinline__ T fr_relu_grad(T h, T dh) {
    return h > T(0) ? dh : T(0);
}

template <typename T>
__device__ __forceinline__ bool fr_isnan(T a) {
    return a != a;
}

#endif  // FASTRNN_COMMON_CUH
