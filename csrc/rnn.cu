// fastrnn/csrc/rnn.cu -- the Elman RNN's fused pointwise kernels (tanh or relu; PyTorch layout).
//
// The driver (fastrnn/_cuda/recurrent.py) runs, per time step, one cuBLAS GEMM and one of these
// kernels; the step numbers (R*, RB*) are those of fastrnn/reference/rnn.py. common.cuh is
// prepended to this file by the loader; do not #include it.
//
// Layouts (row-major, C-contiguous), n in [0, N), j in [0, H):
//   pre, da   : [T, N, H]   x_t W_ih^T + h_{t-1} W_hh^T (no bias) / its gradient
//   hs        : [S, N, H]   state slots (see lstm.cu): read slot src, write slot dst
//   y, dy     : [T, N, H]
//   lengths   : [N]         sequence n is inside step t when t < lengths[n]
//   relu      : 0 for tanh, 1 for relu
// One thread handles one (n, j) and touches only the elements of that (n, j).

// rnn_forward_step: R2 (bias) .. R4 for step t.
// One (n, j) of R3 .. R4, given v = x_t W_ih^T + h_{t-1} W_hh^T (no bias).
template <typename T>
__device__ __forceinline__ void rnn_forward_elem(T v, const T* __restrict__ b, index_t j,
                                                 index_t e, bool live, const T* h_prev,
                                                 T* h_next, T* y_t, int relu) {
    // R3: the nonlinearity.
    const T a = v + b[j];
    const T h = relu ? fr_relu(a) : fr_tanh(a);
    // R4: a finished sequence keeps its state and emits zeros.
    if (live) {
        h_next[e] = h;
        y_t[e] = h;
    } else {
        h_next[e] = h_prev[e];
        y_t[e] = T(0);
    }
}

template <typename T>
__global__ void rnn_forward_step(const T* __restrict__ pre, const T* __restrict__ b, T* hs, T* y,
                                 const index_t* __restrict__ lengths, index_t t, index_t src,
                                 index_t dst, index_t N, index_t H, int relu) {
    const index_t NH = N * H;
    const T* pre_t = pre + t * NH;
    const T* h_prev = hs + src * NH;
    T* h_next = hs + dst * NH;
    T* y_t = y + t * NH;
    FASTRNN_GRID_STRIDE_LOOP(e, NH) {
        const index_t n = e / H;
        const index_t j = e - n * H;
        rnn_forward_elem(pre_t[e], b, j, e, t < lengths[n], h_prev, h_next, y_t, relu);
    }
}

// rnn_forward_fused: rnn_forward_step with R2's recurrent GEMM done in the kernel (small
// batches): (n, j) adds sum_m h_{t-1}[n, m] * w_hhT[m, j], in order m = 0 .. H-1.
//   w_hhT  IN  [H,H]  W_hh transposed (reads are coalesced across j)
template <typename T>
__global__ void rnn_forward_fused(const T* __restrict__ pre, const T* __restrict__ w_hhT,
                                  const T* __restrict__ b, T* hs, T* y,
                                  const index_t* __restrict__ lengths, index_t t, index_t src,
                                  index_t dst, index_t N, index_t H, int relu) {
    const index_t NH = N * H;
    const T* pre_t = pre + t * NH;
    const T* h_prev = hs + src * NH;
    T* h_next = hs + dst * NH;
    T* y_t = y + t * NH;
    FASTRNN_GRID_STRIDE_LOOP(i, NH) {
        // n fastest: a block covers a few units j of every sequence, so different blocks read
        // (nearly) disjoint columns of the weights; the driver launches small blocks.
        const index_t n = i % N;
        const index_t j = i / N;
        const index_t e = n * H + j;
        const T* h_row = h_prev + n * H;
        T s = T(0);
        FASTRNN_UNROLL8 for (index_t m = 0; m < H; ++m) {
            s += h_row[m] * w_hhT[m * H + j];
        }
        rnn_forward_elem(pre_t[e] + s, b, j, e, t < lengths[n], h_prev, h_next, y_t, relu);
    }
}

// rnn_backward_step: RB1 .. RB3 for step t, except RB3's GEMM (dh_next += da_t W_hh, done by
// the driver right after this kernel).
//   hs      IN   [T+1,N,H]  slot t+1: the state after step t (= this step's h inside the
//                           sequence; read instead of y, which the caller may have changed)
//   da      OUT  [T,N,H]    step t written (RB2); 0 past the sequence's end
//   dh_cur  IN   [N,H]      gradient reaching the state after step t
//   dh_next OUT  [N,H]      0 inside the sequence, dh_cur passed through past its end
// dh_cur and dh_next must not alias (dh_next is the GEMM's accumulator).
// One (n, j) of RB1 .. RB2 for step t, given dh_in, the gradient reaching h after step t.
template <typename T>
__device__ __forceinline__ void rnn_backward_elem(const T* __restrict__ h_new,
                                                  const T* __restrict__ dy_t, T* da_t, T dh_in,
                                                  T* dh_next, index_t e, bool live, int relu) {
    if (!live) {
        // RB1/RB3 past the end: dy is ignored, dh passes through unchanged.
        da_t[e] = T(0);
        dh_next[e] = dh_in;
        return;
    }
    // RB1: gradient reaching this step's new h; RB2: through the nonlinearity.
    const T dh_step = dy_t[e] + dh_in;
    const T h = h_new[e];
    da_t[e] = relu ? (h > T(0) ? dh_step : T(0)) : dh_step * (T(1) - h * h);
    dh_next[e] = T(0);
}

template <typename T>
__global__ void rnn_backward_step(const T* __restrict__ hs, const T* __restrict__ dy, T* da,
                                  const T* dh_cur, T* dh_next,
                                  const index_t* __restrict__ lengths, index_t t, index_t N,
                                  index_t H, int relu) {
    const index_t NH = N * H;
    const T* h_new = hs + (t + 1) * NH;
    const T* dy_t = dy + t * NH;
    T* da_t = da + t * NH;
    FASTRNN_GRID_STRIDE_LOOP(e, NH) {
        const index_t n = e / H;
        rnn_backward_elem(h_new, dy_t, da_t, dh_cur[e], dh_next, e, t < lengths[n], relu);
    }
}

// rnn_backward_fused: rnn_backward_step with the previous step's RB3 GEMM done in the kernel
// (small batches): the gradient reaching h after step t is dh_cur (left by step t+1) plus
// sum_r da_{t+1}[n, r] * w_hh[r, j] when t+1 < steps, in order r = 0 .. H-1. The driver adds
// da_0 W_hh after step 0.
//   w_hh   IN  [H,H]  (reads are coalesced across j)
template <typename T>
__global__ void rnn_backward_fused(const T* __restrict__ hs, const T* __restrict__ dy, T* da,
                                   const T* __restrict__ w_hh, const T* dh_cur, T* dh_next,
                                   const index_t* __restrict__ lengths, index_t t, index_t steps,
                                   index_t N, index_t H, int relu) {
    const index_t NH = N * H;
    const T* h_new = hs + (t + 1) * NH;
    const T* dy_t = dy + t * NH;
    T* da_t = da + t * NH;
    const T* da_next = da + (t + 1) * NH;
    FASTRNN_GRID_STRIDE_LOOP(i, NH) {
        // n fastest: a block covers a few units j of every sequence, so different blocks read
        // (nearly) disjoint columns of the weights; the driver launches small blocks.
        const index_t n = i % N;
        const index_t j = i / N;
        const index_t e = n * H + j;
        T dh_in = dh_cur[e];
        if (t + 1 < steps) {
            const T* d = da_next + n * H;
            T s = T(0);
            FASTRNN_UNROLL8 for (index_t m = 0; m < H; ++m) {
                s += d[m] * w_hh[m * H + j];
            }
            dh_in += s;
        }
        rnn_backward_elem(h_new, dy_t, da_t, dh_in, dh_next, e, t < lengths[n], relu);
    }
}
