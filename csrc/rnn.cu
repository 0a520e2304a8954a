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
        const index_t j = e % H;
        const index_t n = e / H;
        // R3: the nonlinearity.
        const T a = pre_t[e] + b[j];
        const T h = relu ? fr_relu(a) : fr_tanh(a);
        // R4: a finished sequence keeps its state and emits zeros.
        if (t < lengths[n]) {
            h_next[e] = h;
            y_t[e] = h;
        } else {
            h_next[e] = h_prev[e];
            y_t[e] = T(0);
        }
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
        if (!(t < lengths[n])) {
            // RB1/RB3 past the end: dy is ignored, dh passes through unchanged.
            da_t[e] = T(0);
            dh_next[e] = dh_cur[e];
            continue;
        }
        // RB1: gradient reaching this step's new h; RB2: through the nonlinearity.
        const T dh_step = dy_t[e] + dh_cur[e];
        const T h = h_new[e];
        da_t[e] = relu ? (h > T(0) ? dh_step : T(0)) : dh_step * (T(1) - h * h);
        dh_next[e] = T(0);
    }
}
