// fastrnn/csrc/gru.cu -- the GRU's fused pointwise kernels (gates r, z, n; PyTorch layout).
//
// The driver (fastrnn/_cuda/recurrent.py) runs, per time step, one cuBLAS GEMM and one of these
// kernels; the step numbers (G*, GB*) are those of fastrnn/reference/gru.py. common.cuh is
// prepended to this file by the loader; do not #include it.
//
// Layouts (row-major, C-contiguous), n in [0, N), j in [0, H):
//   xw        : [T, N, 3H]  x_t W_ih^T (no bias), gate k of unit j at (t*N + n)*3H + k*H + j
//   hw        : [N, 3H]     h_{t-1} W_hh^T of the current step (no bias)
//   acts      : [T, N, 4H]  r, z, n and hn = h_{t-1} W_hn^T + b_hn, what backward needs
//   hs        : [S, N, H]   state slots (see lstm.cu): read slot src, write slot dst
//   y, dy     : [T, N, H]
//   dxw, dhw  : [T, N, 3H]  gradients of x_t W_ih^T + b_ih and of h_{t-1} W_hh^T + b_hh
//   lengths   : [N]         sequence n is inside step t when t < lengths[n]
// One thread handles one (n, j) and touches only the elements of that (n, j).

// gru_forward_step: G2 (biases) .. G5 for step t.
//   save != 0 writes acts[t]; otherwise acts is not touched (may be any array of dtype T).
template <typename T>
__global__ void gru_forward_step(const T* __restrict__ xw, const T* __restrict__ hw,
                                 const T* __restrict__ b_ih, const T* __restrict__ b_hh, T* hs,
                                 T* y, T* acts, const index_t* __restrict__ lengths, index_t t,
                                 index_t src, index_t dst, index_t N, index_t H, int save) {
    const index_t NH = N * H;
    const T* xw_t = xw + t * N * 3 * H;
    const T* h_prev = hs + src * NH;
    T* h_next = hs + dst * NH;
    T* y_t = y + t * NH;
    T* acts_t = acts + t * N * 4 * H;
    FASTRNN_GRID_STRIDE_LOOP(e, NH) {
        const index_t n = e / H;
        const index_t j = e - n * H;
        const T* xa = xw_t + n * 3 * H + j;
        const T* ha = hw + n * 3 * H + j;
        // G1/G2 biases, then G3: gates.
        const T xr = xa[0] + b_ih[j];
        const T xz = xa[H] + b_ih[H + j];
        const T xn = xa[2 * H] + b_ih[2 * H + j];
        const T hr = ha[0] + b_hh[j];
        const T hz = ha[H] + b_hh[H + j];
        const T hn = ha[2 * H] + b_hh[2 * H + j];
        const T r = fr_sigmoid(xr + hr);
        const T z = fr_sigmoid(xz + hz);
        const T nn = fr_tanh(xn + r * hn);
        // G4: new state.
        const T hp = h_prev[e];
        const T h = (T(1) - z) * nn + z * hp;
        // G5: a finished sequence keeps its state and emits zeros.
        if (t < lengths[n]) {
            h_next[e] = h;
            y_t[e] = h;
        } else {
            h_next[e] = hp;
            y_t[e] = T(0);
        }
        if (save) {
            T* s = acts_t + n * 4 * H + j;
            s[0] = r;
            s[H] = z;
            s[2 * H] = nn;
            s[3 * H] = hn;
        }
    }
}

// gru_backward_step: GB1 .. GB4 for step t, except GB4's GEMM (dh_next += dhw_t W_hh, done by
// the driver right after this kernel).
//   hs      IN   [T+1,N,H]  slot t: the state before step t
//   dxw,dhw OUT  [T,N,3H]   step t written (GB3); 0 past the sequence's end
//   dh_cur  IN   [N,H]      gradient reaching the state after step t
//   dh_next OUT  [N,H]      dh_step * z inside the sequence (the part of the gradient of the
//                           state before step t that is not the GEMM), dh_cur past its end
// dh_cur and dh_next must not alias (dh_next is the GEMM's accumulator).
template <typename T>
__global__ void gru_backward_step(const T* __restrict__ acts, const T* __restrict__ hs,
                                  const T* __restrict__ dy, T* dxw, T* dhw, const T* dh_cur,
                                  T* dh_next, const index_t* __restrict__ lengths, index_t t,
                                  index_t N, index_t H) {
    const index_t NH = N * H;
    const T* acts_t = acts + t * N * 4 * H;
    const T* h_prev = hs + t * NH;
    const T* dy_t = dy + t * NH;
    T* dxw_t = dxw + t * N * 3 * H;
    T* dhw_t = dhw + t * N * 3 * H;
    FASTRNN_GRID_STRIDE_LOOP(e, NH) {
        const index_t n = e / H;
        const index_t j = e - n * H;
        const index_t q = n * 3 * H + j;
        if (!(t < lengths[n])) {
            // GB1/GB4 past the end: dy is ignored, dh passes through unchanged.
            dxw_t[q] = T(0);
            dxw_t[q + H] = T(0);
            dxw_t[q + 2 * H] = T(0);
            dhw_t[q] = T(0);
            dhw_t[q + H] = T(0);
            dhw_t[q + 2 * H] = T(0);
            dh_next[e] = dh_cur[e];
            continue;
        }
        const T* a = acts_t + n * 4 * H + j;
        const T r = a[0];
        const T z = a[H];
        const T nn = a[2 * H];
        const T hn = a[3 * H];
        // GB1: gradient reaching this step's new h.
        const T dh_step = dy_t[e] + dh_cur[e];
        // GB2: through h = (1 - z) * n + z * h_prev.
        const T dn = dh_step * (T(1) - z);
        const T dz = dh_step * (h_prev[e] - nn);
        // GB3: through the gate nonlinearities.
        const T dan = dn * (T(1) - nn * nn);
        const T dar = dan * hn * r * (T(1) - r);
        const T daz = dz * z * (T(1) - z);
        dxw_t[q] = dar;
        dxw_t[q + H] = daz;
        dxw_t[q + 2 * H] = dan;
        dhw_t[q] = dar;
        dhw_t[q + H] = daz;
        dhw_t[q + 2 * H] = dan * r;
        // GB4: the direct path through z * h_prev; the GEMM adds dhw_t W_hh.
        dh_next[e] = dh_step * z;
    }
}
