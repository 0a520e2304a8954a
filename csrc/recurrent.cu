// fastrnn/csrc/recurrent.cu -- the recurrent time loop's own kernels, the same for every cell:
// the seed of backward's state gradients and the state selection after a projection. The
// cells' step kernels are in recurrent.cuh. common.cuh is prepended to this file by the loader;
// do not #include it.
//
// Layouts: P is the width of the state h (H, or the projection size); lengths [N] as in
// recurrent.cuh (sequence n is inside step t when t < lengths[n]).

// recurrent_seed: what reaches each step's output from outside the recurrence, before the
// backward loop adds the recurrent part (dh_{t-1} += da_t W_hh):
//   dhs[0]     = 0                                   (becomes dh0)
//   dhs[t + 1] = dy_t + (dhT if t is the sequence's last step)   inside the sequence
//              = 0                                   past its end (dy there is ignored)
// so the state gradient of a finished sequence needs no pass-through step by step.
//   dy    IN   [T, N, P]
//   dhT   IN   [N, P]      read when has_dhT != 0
//   dhs   OUT  [T+1, N, P]
template <typename T>
__global__ void recurrent_seed(const T* __restrict__ dy, const T* __restrict__ dhT,
                               T* __restrict__ dhs, const index_t* __restrict__ lengths,
                               index_t steps, index_t N, index_t P, int has_dhT) {
    const index_t NP = N * P;
    FASTRNN_GRID_STRIDE_LOOP(e, (steps + 1) * NP) {
        const index_t slot = e / NP;
        const index_t q = e - slot * NP;  // n * P + p
        const index_t t = slot - 1;
        T v = T(0);
        if (slot > 0) {
            const index_t len = lengths[q / P];
            if (t < len) {
                v = dy[t * NP + q];
                if (has_dhT && t == len - 1) v += dhT[q];
            }
        }
        dhs[e] = v;
    }
}

// recurrent_select: step t of an LSTM with projections, after the driver's GEMM wrote
// h_t = r_t W_hr^T into slot dst for every sequence: y_t = h_t inside the sequence; past its end
// the state is kept (slot dst = slot src) and y_t = 0 (L5).
//   hs  INOUT  [S, N, P]  read slots src and dst, write slot dst (src != dst)
//   y   OUT    [T, N, P]  step t
template <typename T>
__global__ void recurrent_select(T* hs, T* y, const index_t* __restrict__ lengths, index_t t,
                                 index_t src, index_t dst, index_t N, index_t P) {
    const index_t NP = N * P;
    T* h_next = hs + dst * NP;
    const T* h_prev = hs + src * NP;
    T* y_t = y + t * NP;
    FASTRNN_GRID_STRIDE_LOOP(e, NP) {
        if (t < lengths[e / P]) {
            y_t[e] = h_next[e];
        } else {
            h_next[e] = h_prev[e];
            y_t[e] = T(0);
        }
    }
}
