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
// One (n, j) of G2 .. G5, given xa (gate 0 of (n, j) in xw[t]) and the three sums of
// h_{t-1} W_hh^T (no bias) for r, z, n.
template <typename T>
__device__ __forceinline__ void gru_forward_elem(const T* __restrict__ xa, T h0, T h1, T h2,
                                                 const T* __restrict__ b_ih,
                                                 const T* __restrict__ b_hh, index_t j,
                                                 index_t H, index_t e, bool live,
                                                 const T* h_prev, T* h_next, T* y_t, T* s,
                                                 int save) {
    // G1/G2 biases, then G3: gates.
    const T xr = xa[0] + b_ih[j];
    const T xz = xa[H] + b_ih[H + j];
    const T xn = xa[2 * H] + b_ih[2 * H + j];
    const T hr = h0 + b_hh[j];
    const T hz = h1 + b_hh[H + j];
    const T hn = h2 + b_hh[2 * H + j];
    const T r = fr_sigmoid(xr + hr);
    const T z = fr_sigmoid(xz + hz);
    const T nn = fr_tanh(xn + r * hn);
    // G4: new state.
    const T hp = h_prev[e];
    const T h = (T(1) - z) * nn + z * hp;
    // G5: a finished sequence keeps its state and emits zeros.
    if (live) {
        h_next[e] = h;
        y_t[e] = h;
    } else {
        h_next[e] = hp;
        y_t[e] = T(0);
    }
    if (save) {
        s[0] = r;
        s[H] = z;
        s[2 * H] = nn;
        s[3 * H] = hn;
    }
}

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
        const T* ha = hw + n * 3 * H + j;
        gru_forward_elem(xw_t + n * 3 * H + j, ha[0], ha[H], ha[2 * H], b_ih, b_hh, j, H, e,
                         t < lengths[n], h_prev, h_next, y_t, acts_t + n * 4 * H + j, save);
    }
}

// gru_forward_fused: gru_forward_step with G2's recurrent GEMM done in the kernel (small
// batches): gate k of (n, j) gets sum_m h_{t-1}[n, m] * w_hhT[m, k*H + j], in order m = 0 .. H-1.
//   w_hhT  IN  [H,3H]  W_hh transposed (reads are coalesced across j)
template <typename T>
__global__ void gru_forward_fused(const T* __restrict__ xw, const T* __restrict__ w_hhT,
                                  const T* __restrict__ b_ih, const T* __restrict__ b_hh, T* hs,
                                  T* y, T* acts, const index_t* __restrict__ lengths, index_t t,
                                  index_t src, index_t dst, index_t N, index_t H, int save) {
    const index_t NH = N * H;
    const T* xw_t = xw + t * N * 3 * H;
    const T* h_prev = hs + src * NH;
    T* h_next = hs + dst * NH;
    T* y_t = y + t * NH;
    T* acts_t = acts + t * N * 4 * H;
    FASTRNN_GRID_STRIDE_LOOP(i, NH) {
        // n fastest: a block covers a few units j of every sequence, so different blocks read
        // (nearly) disjoint columns of the weights; the driver launches small blocks.
        const index_t n = i % N;
        const index_t j = i / N;
        const index_t e = n * H + j;
        const T* h_row = h_prev + n * H;
        T s0 = T(0), s1 = T(0), s2 = T(0);
        FASTRNN_UNROLL8 for (index_t m = 0; m < H; ++m) {
            const T hm = h_row[m];
            const T* w = w_hhT + m * 3 * H + j;
            s0 += hm * w[0];
            s1 += hm * w[H];
            s2 += hm * w[2 * H];
        }
        gru_forward_elem(xw_t + n * 3 * H + j, s0, s1, s2, b_ih, b_hh, j, H, e, t < lengths[n],
                         h_prev, h_next, y_t, acts_t + n * 4 * H + j, save);
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
// One (n, j) of GB1 .. GB4 for step t, given dh_in, the gradient reaching h after step t.
template <typename T>
__device__ __forceinline__ void gru_backward_elem(const T* __restrict__ a,
                                                  const T* __restrict__ h_prev,
                                                  const T* __restrict__ dy_t, T* dxw_t,
                                                  T* dhw_t, T dh_in, T* dh_next, index_t e,
                                                  index_t q, index_t H, bool live) {
    if (!live) {
        // GB1/GB4 past the end: dy is ignored, dh passes through unchanged.
        dxw_t[q] = T(0);
        dxw_t[q + H] = T(0);
        dxw_t[q + 2 * H] = T(0);
        dhw_t[q] = T(0);
        dhw_t[q + H] = T(0);
        dhw_t[q + 2 * H] = T(0);
        dh_next[e] = dh_in;
        return;
    }
    const T r = a[0];
    const T z = a[H];
    const T nn = a[2 * H];
    const T hn = a[3 * H];
    // GB1: gradient reaching this step's new h.
    const T dh_step = dy_t[e] + dh_in;
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
        gru_backward_elem(acts_t + n * 4 * H + j, h_prev, dy_t, dxw_t, dhw_t, dh_cur[e], dh_next,
                          e, n * 3 * H + j, H, t < lengths[n]);
    }
}

// gru_backward_fused: gru_backward_step with the previous step's GB4 GEMM done in the kernel
// (small batches): the gradient reaching h after step t is dh_cur (left by step t+1) plus
// sum_r dhw_{t+1}[n, r] * w_hh[r, j] when t+1 < steps, summed per gate in order r = 0 .. H-1
// and then (g0 + g1) + g2. The driver adds dhw_0 W_hh after step 0.
//   w_hh   IN  [3H,H]  (reads are coalesced across j)
template <typename T>
__global__ void gru_backward_fused(const T* __restrict__ acts, const T* __restrict__ hs,
                                   const T* __restrict__ dy, T* dxw, T* dhw,
                                   const T* __restrict__ w_hh, const T* dh_cur, T* dh_next,
                                   const index_t* __restrict__ lengths, index_t t, index_t steps,
                                   index_t N, index_t H) {
    const index_t NH = N * H;
    const T* acts_t = acts + t * N * 4 * H;
    const T* h_prev = hs + t * NH;
    const T* dy_t = dy + t * NH;
    T* dxw_t = dxw + t * N * 3 * H;
    T* dhw_t = dhw + t * N * 3 * H;
    const T* dhw_next = dhw + (t + 1) * N * 3 * H;
    FASTRNN_GRID_STRIDE_LOOP(i, NH) {
        // n fastest: a block covers a few units j of every sequence, so different blocks read
        // (nearly) disjoint columns of the weights; the driver launches small blocks.
        const index_t n = i % N;
        const index_t j = i / N;
        const index_t e = n * H + j;
        T dh_in = dh_cur[e];
        if (t + 1 < steps) {
            const T* d = dhw_next + n * 3 * H;
            T s0 = T(0), s1 = T(0), s2 = T(0);
            FASTRNN_UNROLL8 for (index_t m = 0; m < H; ++m) {
                s0 += d[m] * w_hh[m * H + j];
                s1 += d[H + m] * w_hh[(H + m) * H + j];
                s2 += d[2 * H + m] * w_hh[(2 * H + m) * H + j];
            }
            dh_in += (s0 + s1) + s2;
        }
        gru_backward_elem(acts_t + n * 4 * H + j, h_prev, dy_t, dxw_t, dhw_t, dh_in, dh_next, e,
                          n * 3 * H + j, H, t < lengths[n]);
    }
}
