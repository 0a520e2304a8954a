// fastrnn/csrc/common.cuh -- device helpers shared by every kernel file.
//
// This header is never #included: fastrnn/_cuda/_kernels.py prepends its text to each .cu file
// before handing the source to NVRTC (CuPy RawModule), so CuPy's compile cache key covers it (a
// header pulled in with -I would not be part of the key). The host tests compile the same text as
// C++ (tests/cuda_host_emulation.py) after a shim that defines the CUDA built-ins.
//
// No host headers: NVRTC rejects <cmath>/<cstdint>; the math functions used here (expf, exp,
// tanhf, tanh, fabsf, fabs) are NVRTC built-ins.
#ifndef FASTRNN_COMMON_CUH
#define FASTRNN_COMMON_CUH

// Flat offsets and sizes are 64-bit everywhere: T*N*4H or N*C*H*W can pass 2^31 elements.
typedef long long index_t;

// Unroll hint for the fused kernels' inner sums: eight iterations' loads in flight per thread
// (NVRTC; a no-op in the host build of the tests).
#ifdef __CUDACC__
#define FASTRNN_UNROLL8 _Pragma("unroll 8")
#else
#define FASTRNN_UNROLL8
#endif

// Grid-stride loop over [0, n): correct for any grid size, so the launcher can cap the grid
// (fastrnn/_cuda/_runtime.py MAX_BLOCKS) and the tests can force several passes per thread with
// a tiny grid. The index arithmetic is done in 64 bits before it can overflow.
#define FASTRNN_GRID_STRIDE_LOOP(i, n)                                            \
    for (index_t i = (index_t)blockIdx.x * (index_t)blockDim.x + (index_t)threadIdx.x; \
         i < (index_t)(n); i += (index_t)blockDim.x * (index_t)gridDim.x)

__device__ __forceinline__ float fr_exp(float a) { return expf(a); }
__device__ __forceinline__ double fr_exp(double a) { return exp(a); }
__device__ __forceinline__ float fr_tanh(float a) { return tanhf(a); }
__device__ __forceinline__ double fr_tanh(double a) { return tanh(a); }
__device__ __forceinline__ float fr_abs(float a) { return fabsf(a); }
__device__ __forceinline__ double fr_abs(double a) { return fabs(a); }

// The reference's stable sigmoid (fastrnn/reference/_common.py): exp never overflows.
template <typename T>
__device__ __forceinline__ T fr_sigmoid(T a) {
    const T e = fr_exp(-fr_abs(a));
    return a >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

// max(a, 0) that propagates NaN like numpy.maximum (the reference's relu).
template <typename T>
__device__ __forceinline__ T fr_relu(T a) {
    return (a > T(0) || a != a) ? a : T(0);
}

template <typename T>
__device__ __forceinline__ bool fr_isnan(T a) {
    return a != a;
}

#endif  // FASTRNN_COMMON_CUH
