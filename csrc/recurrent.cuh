// fastrnn/csrc/recurrent.cuh -- the recurrent engine's step kernels, written once for every cell.
//
// Prepended (after common.cuh) to each cell file, lstm.cu, gru.cu and rnn.cu, by the loader
// (fastrnn/_cuda/_kernels.py); do not #include it. A cell file defines only a cell: a struct
// with the pointwise math of one unit (n, j) of one time step,
//
//   struct SomeCell {
//       static constexpr int gates = K;  // G = K * H columns of the input and recurrent sums
//       static constexpr int acts = A;  // width, in units of H, of a row of the saved
//                                       // activations (0: the cell saves none)
//       template <typename T>
//       __device__ static void forward(const ForwardUnit<T>& u, index_t H, bool live, int save,
//                                      int mode);
//       template <typename T>
//       __device__ static void backward(const BackwardUnit<T>& u, index_t H, int mode);
//   };
//
// and the kernel table (fastrnn/_cuda/_kernels.py) instantiates recurrent_forward_step<T, Cell>
// and recurrent_backward_step<T, Cell> for it. The driver (fastrnn/_cuda/recurrent.py) is one
// time loop for every cell: per step a cuBLAS GEMM and one of these kernels (DESIGN.md,
// "Performance model"); the per-cell facts it needs (gate count, where the recurrent GEMM goes,
// the saved activations) come from its own cell table.
//
// Layouts (row-major, C-contiguous), n in [0, N), j in [0, H), G = gates * H:
//   pre     : [T, N, G]   x_t W_ih^T, gate k of unit j of sequence n at (t*N + n)*G + k*H + j;
//             the recurrent GEMM accumulates h_{t-1} W_hh^T into step t's slice when the cell
//             takes the two sums together (LSTM, RNN)
//   hw      : [N, G]      h_{t-1} W_hh^T of the current step, kept apart (GRU)
//   acts    : [T, N, A*H] what backward needs (may be pre itself: the LSTM overwrites its gate
//             sums with its activations, each thread reading its four sums before writing)
//   hs, cs  : [S, N, H]   state slots: slot `src` holds the state before step t and slot `dst`
//             receives the state after it (training: S = T+1, src = t, dst = t+1, so backward
//             finds every state; inference: two ping-pong slots)
//   y       : [T, N, H]   the step's output: h, or what a projection turns into h (LSTM with
//             projections: r = o * tanh(c), see lstm.cu)
//   lengths : [N]         sequence n is inside step t ("live") when t < lengths[n]
// One thread handles one (n, j) and touches only the elements of that (n, j), so the in-place
// updates (pre -> acts, hs/cs slots, dc, dhs) never race.

#ifndef FASTRNN_RECURRENT_CUH
#define FASTRNN_RECURRENT_CUH

// Sizes of one step of a cell: N*H units, rows of G = gates*H sums and of A = acts*H saved
// activations.
template <class Cell>
struct StepShape {
    index_t NH, G, A;
    __device__ StepShape(index_t N, index_t H)
        : NH(N * H), G((index_t)Cell::gates * H), A((index_t)Cell::acts * H) {}
};

// Four values of a unit, one per gate (p[k * H], k = 0 .. 3): a cell's saved activations.
template <typename T>
__device__ __forceinline__ void store_gates(T* p, index_t H, T g0, T g1, T g2, T g3) {
    p[0] = g0;
    p[H] = g1;
    p[2 * H] = g2;
    p[3 * H] = g3;
}

// One unit (n, j) of a forward step: pointers at its element; gate k at [k * H].
template <typename T>
struct ForwardUnit {
    const T* x;       // pre[t, n, j]
    const T* hw;      // hw[n, j]
    const T* b;       // the bias of pre's sums (b_ih + b_hh, or b_ih for the GRU), at j
    const T* b_hh;    // the bias of hw's sums (GRU), at j
    T* act;           // acts[t, n, j] (written when save != 0)
    const T* h_prev;  // hs[src, n, j]
    T* h_next;        // hs[dst, n, j]
    const T* c_prev;  // cs[src, n, j]
    T* c_next;        // cs[dst, n, j]
    T* y;             // y[t, n, j]
};

// recurrent_forward_step: the pointwise part of step t for every (n, j) (the GEMMs are the
// driver's). A finished sequence (t >= lengths[n]) keeps its state and emits zeros: the cell
// does that itself (it knows its states), given `live`.
//   pre, hw, b, b_hh  IN     (pre may be written through acts)
//   acts              OUT    step t, when save != 0
//   hs, cs            INOUT  read slot src, write slot dst (src != dst)
//   y                 OUT    step t
//   mode              cell-specific (RNN: 1 = relu; LSTM: 1 = projected)
// Arrays a cell does not use may be any array of the call's dtype, of the layout above.
template <typename T, class Cell>
__global__ void recurrent_forward_step(T* pre, const T* hw, const T* b, const T* b_hh, T* hs,
                                       T* cs, T* y, T* acts, const index_t* __restrict__ lengths,
                                       index_t t, index_t src, index_t dst, index_t N, index_t H,
                                       int save, int mode) {
    const StepShape<Cell> s(N, H);
    const index_t NH = s.NH, G = s.G, A = s.A;
    FASTRNN_GRID_STRIDE_LOOP(e, NH) {
        const index_t n = e / H;
        const index_t j = e - n * H;
        ForwardUnit<T> u;
        u.x = pre + (t * N + n) * G + j;
        u.hw = hw + n * G + j;
        u.b = b + j;
        u.b_hh = b_hh + j;
        u.act = acts + (t * N + n) * A + j;
        u.h_prev = hs + src * NH + e;
        u.h_next = hs + dst * NH + e;
        u.c_prev = cs + src * NH + e;
        u.c_next = cs + dst * NH + e;
        u.y = y + t * NH + e;
        Cell::forward(u, H, t < lengths[n], save, mode);
    }
}

// One unit (n, j) of a backward step, inside its sequence.
template <typename T>
struct BackwardUnit {
    const T* act;     // acts[t, n, j]; gate k at [k * H]
    const T* h_prev;  // hs[t, n, j], the state before step t
    const T* h_new;   // hs[t+1, n, j], the state after it
    const T* c_prev;  // cs[t, n, j]
    const T* c_new;   // cs[t+1, n, j]
    T dh;             // the whole gradient reaching the step's output y (dy, the next step's
                      // recurrent part, dhT at the sequence's last step)
    T* dh_prev;       // dhs[t, n, j]: the gradient of the state before step t (the cell adds
                      // what does not go through W_hh: the GRU's z * h_prev path)
    T* da;            // da[t, n, j]: gradient of pre's sums (+ their bias); gate k at [k * H]
    T* dha;           // dha[t, n, j]: gradient of hw's sums (+ b_hh) (GRU; else da itself)
    T* dc;            // dc[n, j]: the cell state's gradient, after step t in, before it out
};

// recurrent_backward_step: the pointwise part of backward step t. The driver's GEMM then adds
// dha_t W_hh into dhs[t] (the state before step t).
//   acts, hs, cs  IN     what the forward saved (hs, cs: [T+1, N, H], all states)
//   dh            IN     the gradient reaching step t's output, at dh + (t + 1) * dh_stride
//                        (dhs itself with dh_stride = N*H; a single buffer with dh_stride = 0)
//   dhs           INOUT  [T+1, N, H] state gradients: slot t receives the cell's direct part
//   da, dha       OUT    [T, N, G] step t; all zeros past the sequence's end
//   dc            INOUT  [N, H] (LSTM)
// Past the sequence's end (t >= lengths[n]) a step is not part of the sequence: its gradients
// are zero and the state gradients stay as they are (the driver's seed put dy and dhT where
// each sequence ends, recurrent.cu).
template <typename T, class Cell>
__global__ void recurrent_backward_step(const T* __restrict__ acts, const T* __restrict__ hs,
                                        const T* __restrict__ cs, const T* dh, index_t dh_stride,
                                        T* dhs, T* da, T* dha, T* dc,
                                        const index_t* __restrict__ lengths, index_t t, index_t N,
                                        index_t H, int mode) {
    const StepShape<Cell> s(N, H);
    const index_t NH = s.NH, G = s.G, A = s.A;
    FASTRNN_GRID_STRIDE_LOOP(e, NH) {
        const index_t n = e / H;
        const index_t j = e - n * H;
        T* da_u = da + (t * N + n) * G + j;
        T* dha_u = dha + (t * N + n) * G + j;
        if (t >= lengths[n]) {
            for (int k = 0; k < Cell::gates; ++k) {
                da_u[k * H] = T(0);
                dha_u[k * H] = T(0);
            }
            continue;
        }
        BackwardUnit<T> u;
        u.act = acts + (t * N + n) * A + j;
        u.h_prev = hs + t * NH + e;
        u.h_new = hs + (t + 1) * NH + e;
        u.c_prev = cs + t * NH + e;
        u.c_new = cs + (t + 1) * NH + e;
        u.dh = dh[(t + 1) * dh_stride + e];
        u.dh_prev = dhs + t * NH + e;
        u.da = da_u;
        u.dha = dha_u;
        u.dc = dc + e;
        Cell::backward(u, H, mode);
    }
}

#endif  // FASTRNN_RECURRENT_CUH
