// fastrnn/csrc/lstm.cu -- the LSTM's fused pointwise kernels (gates i, f, g, o; PyTorch layout).
//
// The driver (fastrnn/_cuda/recurrent.py) runs, per time step, one cuBLAS GEMM and one of these
// kernels; the step numbers (L*, LB*) are those of fastrnn/reference/lstm.py. common.cuh is
// prepended to this file by the loader; do not #include it.
//
// Layouts (row-major, C-contiguous), n in [0, N), j in [0, H):
//   pre, acts : [T, N, 4H]  gate k of unit j of sequence n at (t*N + n)*4H + k*H + j
//   hs, cs    : [S, N, H]   state slots; slot `src` holds the state before step t and slot `dst`
//               receives the state after it (training: S = T+1, src = t, dst = t+1, so backward
//               finds every state; inference: S = 2 ping-pong slots)
//   y, dy     : [T, N, H]
//   lengths   : [N]         sequence n is inside step t when t < lengths[n]
// One thread handles one (n, j) and touches only the elements of that (n, j), so the in-place
// updates below (pre -> acts, hs/cs slots, dc) never race.

// lstm_forward_step: L2 (bias) .. L5 for step t.
//   pre   INOUT [T,N,4H]  step t holds x_t W_ih^T + h_{t-1} W_hh^T (the GEMMs, no bias); when
//                         save != 0 it is overwritten with the activations i, f, g, o (L3) that
//                         backward reads.
//   b     IN    [4H]      b_ih + b_hh
//   hs,cs INOUT [S,N,H]   read slot src, write slot dst (src != dst)
//   y     OUT   [T,N,H]   step t written: h inside the sequence, 0 past its end (L5)
// One (n, j) of L2 .. L5, given the four gate sums of step t without bias (v_k: gate k's
// x_t W_ih^T + h_{t-1} W_hh^T); a points at gate 0 of (n, j) in pre[t] (written when save).
template <typename T>
__device__ __forceinline__ void lstm_forward_elem(T* a, T v0, T v1, T v2, T v3,
                                                  const T* __restrict__ b, index_t j, index_t H,
                                                  index_t e, bool live, const T* h_prev,
                                                  const T* c_prev, T* h_next, T* c_next, T* y_t,
                                                  int save) {
    // L3: gate nonlinearities (the bias completes L1's x_t W_ih^T + b).
    const T i = fr_sigmoid(v0 + b[j]);
    const T f = fr_sigmoid(v1 + b[H + j]);
    const T g = fr_tanh(v2 + b[2 * H + j]);
    const T o = fr_sigmoid(v3 + b[3 * H + j]);
    // L4: cell and hidden state.
    const T c = f * c_prev[e] + i * g;
    const T h = o * fr_tanh(c);
    // L5: a finished sequence keeps its state and emits zeros.
    if (live) {
        c_next[e] = c;
        h_next[e] = h;
        y_t[e] = h;
    } else {
        c_next[e] = c_prev[e];
        h_next[e] = h_prev[e];
        y_t[e] = T(0);
    }
    if (save) {
        a[0] = i;
        a[H] = f;
        a[2 * H] = g;
        a[3 * H] = o;
    }
}

template <typename T>
__global__ void lstm_forward_step(T* pre, const T* __restrict__ b, T* hs, T* cs, T* y,
                                  const index_t* __restrict__ lengths, index_t t, index_t src,
                                  index_t dst, index_t N, index_t H, int save) {
    const index_t NH = N * H;
    T* pre_t = pre + t * N * 4 * H;
    const T* h_prev = hs + src * NH;
    const T* c_prev = cs + src * NH;
    T* h_next = hs + dst * NH;
    T* c_next = cs + dst * NH;
    T* y_t = y + t * NH;
    FASTRNN_GRID_STRIDE_LOOP(e, NH) {
        const index_t n = e / H;
        const index_t j = e - n * H;
        T* a = pre_t + n * 4 * H + j;
        lstm_forward_elem(a, a[0], a[H], a[2 * H], a[3 * H], b, j, H, e, t < lengths[n], h_prev,
                          c_prev, h_next, c_next, y_t, save);
    }
}

// lstm_forward_fused: lstm_forward_step with L2's recurrent GEMM done in the kernel, for small
// batches (one launch per step instead of a GEMM and a launch): gate k of (n, j) adds
// sum_m h_{t-1}[n, m] * w_hhT[m, k*H + j], summed in order m = 0 .. H-1.
//   pre    INOUT [T,N,4H]  step t holds x_t W_ih^T only (no bias, no recurrent part)
//   w_hhT  IN    [H,4H]    W_hh transposed (reads are coalesced across j)
template <typename T>
__global__ void lstm_forward_fused(T* pre, const T* __restrict__ w_hhT, const T* __restrict__ b,
                                   T* hs, T* cs, T* y, const index_t* __restrict__ lengths,
                                   index_t t, index_t src, index_t dst, index_t N, index_t H,
                                   int save) {
    const index_t NH = N * H;
    T* pre_t = pre + t * N * 4 * H;
    const T* h_prev = hs + src * NH;
    const T* c_prev = cs + src * NH;
    T* h_next = hs + dst * NH;
    T* c_next = cs + dst * NH;
    T* y_t = y + t * NH;
    FASTRNN_GRID_STRIDE_LOOP(i, NH) {
        // n fastest: a block covers a few units j of every sequence, so different blocks read
        // (nearly) disjoint columns of the weights; the driver launches small blocks.
        const index_t n = i % N;
        const index_t j = i / N;
        const index_t e = n * H + j;
        const T* h_row = h_prev + n * H;
        T s0 = T(0), s1 = T(0), s2 = T(0), s3 = T(0);
        FASTRNN_UNROLL8 for (index_t m = 0; m < H; ++m) {
            const T hm = h_row[m];
            const T* w = w_hhT + m * 4 * H + j;
            s0 += hm * w[0];
            s1 += hm * w[H];
            s2 += hm * w[2 * H];
            s3 += hm * w[3 * H];
        }
        T* a = pre_t + n * 4 * H + j;
        lstm_forward_elem(a, a[0] + s0, a[H] + s1, a[2 * H] + s2, a[3 * H] + s3, b, j, H, e,
                          t < lengths[n], h_prev, c_prev, h_next, c_next, y_t, save);
    }
}

// lstm_backward_step: LB1 .. LB4 for step t, except LB4's GEMM (dh_next += da_t W_hh, done by
// the driver right after this kernel).
//   acts    IN    [T,N,4H]  i, f, g, o saved by the forward
//   cs      IN    [T+1,N,H] cell states (slot t: before step t, slot t+1: after it)
//   dy      IN    [T,N,H]
//   da      OUT   [T,N,4H]  step t written: gradient of the gate pre-activations (LB3); 0 past
//                           the sequence's end
//   dh_cur  IN    [N,H]     gradient reaching the hidden state after step t
//   dh_next OUT   [N,H]     the part of the gradient of the state before step t that is not
//                           the GEMM: 0 inside the sequence, dh_cur passed through past its end
//   dc      INOUT [N,H]     gradient of the cell state after step t in, before step t out
// dh_cur and dh_next must not alias (dh_next is the GEMM's accumulator).
// One (n, j) of LB1 .. LB4 for step t, given dh_in, the gradient reaching h after step t.
template <typename T>
__device__ __forceinline__ void lstm_backward_elem(const T* __restrict__ acts_t,
                                                   const T* __restrict__ c_prev,
                                                   const T* __restrict__ c_new,
                                                   const T* __restrict__ dy_t, T* da_t, T dh_in,
                                                   T* dh_next, T* dc, index_t e, index_t q,
                                                   index_t H, bool live) {
    if (!live) {
        // LB1/LB4 past the end: dy is ignored, dh and dc pass through unchanged.
        da_t[q] = T(0);
        da_t[q + H] = T(0);
        da_t[q + 2 * H] = T(0);
        da_t[q + 3 * H] = T(0);
        dh_next[e] = dh_in;
        return;
    }
    const T i = acts_t[q];
    const T f = acts_t[q + H];
    const T g = acts_t[q + 2 * H];
    const T o = acts_t[q + 3 * H];
    // LB1: gradient reaching this step's new h and c.
    const T dh_step = dy_t[e] + dh_in;
    const T dc_step = dc[e];
    // LB2: through h = o * tanh(c) and c = f * c_prev + i * g.
    const T tanh_c = fr_tanh(c_new[e]);
    const T d_o = dh_step * tanh_c;
    const T dct = dc_step + dh_step * o * (T(1) - tanh_c * tanh_c);
    const T d_i = dct * g;
    const T d_g = dct * i;
    const T d_f = dct * c_prev[e];
    // LB3: through the gate nonlinearities.
    da_t[q] = d_i * i * (T(1) - i);
    da_t[q + H] = d_f * f * (T(1) - f);
    da_t[q + 2 * H] = d_g * (T(1) - g * g);
    da_t[q + 3 * H] = d_o * o * (T(1) - o);
    // LB4: to the previous cell state; the hidden state's part is the GEMM alone.
    dc[e] = dct * f;
    dh_next[e] = T(0);
}

template <typename T>
__global__ void lstm_backward_step(const T* __restrict__ acts, const T* __restrict__ cs,
                                   const T* __restrict__ dy, T* da, const T* dh_cur,
                                   T* dh_next, T* dc, const index_t* __restrict__ lengths,
                                   index_t t, index_t N, index_t H) {
    const index_t NH = N * H;
    const T* acts_t = acts + t * N * 4 * H;
    const T* c_prev = cs + t * NH;
    const T* c_new = cs + (t + 1) * NH;
    const T* dy_t = dy + t * NH;
    T* da_t = da + t * N * 4 * H;
    FASTRNN_GRID_STRIDE_LOOP(e, NH) {
        const index_t n = e / H;
        const index_t j = e - n * H;
        lstm_backward_elem(acts_t, c_prev, c_new, dy_t, da_t, dh_cur[e], dh_next, dc, e,
                           n * 4 * H + j, H, t < lengths[n]);
    }
}

// lstm_backward_fused: lstm_backward_step with the previous step's LB4 GEMM done in the kernel
// (small batches): the gradient reaching h after step t is dh_cur (the pass-through part left
// by step t+1) plus sum_r da_{t+1}[n, r] * w_hh[r, j] when t+1 < steps, summed per gate in order
// r = 0 .. H-1 and then (g0 + g1) + (g2 + g3). The driver adds da_0 W_hh after step 0.
//   w_hh   IN   [4H,H]    (reads are coalesced across j)
//   steps  the sequence length T of the call
template <typename T>
__global__ void lstm_backward_fused(const T* __restrict__ acts, const T* __restrict__ cs,
                                    const T* __restrict__ dy, T* da,
                                    const T* __restrict__ w_hh, const T* dh_cur, T* dh_next,
                                    T* dc, const index_t* __restrict__ lengths, index_t t,
                                    index_t steps, index_t N, index_t H) {
    const index_t NH = N * H;
    const T* acts_t = acts + t * N * 4 * H;
    const T* c_prev = cs + t * NH;
    const T* c_new = cs + (t + 1) * NH;
    const T* dy_t = dy + t * NH;
    T* da_t = da + t * N * 4 * H;
    const T* da_next = da + (t + 1) * N * 4 * H;
    FASTRNN_GRID_STRIDE_LOOP(i, NH) {
        // n fastest: a block covers a few units j of every sequence, so different blocks read
        // (nearly) disjoint columns of the weights; the driver launches small blocks.
        const index_t n = i % N;
        const index_t j = i / N;
        const index_t e = n * H + j;
        T dh_in = dh_cur[e];
        if (t + 1 < steps) {
            const T* d = da_next + n * 4 * H;
            T s0 = T(0), s1 = T(0), s2 = T(0), s3 = T(0);
            FASTRNN_UNROLL8 for (index_t m = 0; m < H; ++m) {
                s0 += d[m] * w_hh[m * H + j];
                s1 += d[H + m] * w_hh[(H + m) * H + j];
                s2 += d[2 * H + m] * w_hh[(2 * H + m) * H + j];
                s3 += d[3 * H + m] * w_hh[(3 * H + m) * H + j];
            }
            dh_in += (s0 + s1) + (s2 + s3);
        }
        lstm_backward_elem(acts_t, c_prev, c_new, dy_t, da_t, dh_in, dh_next, dc, e,
                           n * 4 * H + j, H, t < lengths[n]);
    }
}
