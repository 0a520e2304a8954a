// fastrnn/csrc/lstm.cu -- the LSTM cell (gates i, f, g, o; PyTorch layout), with or without
// projections.
//
// Only the pointwise math of one unit: the step kernels that run it are those of recurrent.cuh,
// the device math that of common.cuh (both prepended by the loader; do not #include them). Step
// numbers (L*, LB*) are those of fastrnn/reference/lstm.py.
//
// pre holds x_t W_ih^T + h_{t-1} W_hh^T (the driver's GEMMs accumulate both there) and, when
// training, becomes the activations i, f, g, o (acts is pre itself).
//
// With projections (mode = LSTM_PROJECTED; torch's proj_size P): h_t = r_t W_hr^T with
// r_t = o * tanh(c_t), so the cell's output is r, not h: it writes r to y (the driver's [T, N, H]
// buffer of r, zeros past a sequence's end) and leaves the state slots hs alone; the driver's
// GEMM projects r into the slot and recurrent_select (recurrent.cu) keeps finished sequences'
// states. Backward is the same cell: dh is then the gradient reaching r (the driver's
// dr = dh_step W_hr), and the state gradients are the driver's GEMMs.

#define LSTM_PROJECTED 1

struct LstmCell {
    static constexpr int gates = 4;
    static constexpr int acts = 4;  // i, f, g, o, in place of pre

    // L2 (bias) .. L5 of one unit.
    template <typename T>
    __device__ static void forward(const ForwardUnit<T>& u, index_t H, bool live, int save,
                                   int mode) {
        // L3: gate nonlinearities (the bias completes L1's x_t W_ih^T + b).
        const T i = fr_sigmoid(u.x[0] + u.b[0]);
        const T f = fr_sigmoid(u.x[H] + u.b[H]);
        const T g = fr_tanh(u.x[2 * H] + u.b[2 * H]);
        const T o = fr_sigmoid(u.x[3 * H] + u.b[3 * H]);
        // L4: cell and hidden state (or r, what the projection turns into h).
        const T c = f * *u.c_prev + i * g;
        const T h = o * fr_tanh(c);
        // L5: a finished sequence keeps its state and emits zeros.
        *u.c_next = live ? c : *u.c_prev;
        *u.y = live ? h : T(0);
        if (mode != LSTM_PROJECTED) *u.h_next = live ? h : *u.h_prev;
        if (save) store_gates(u.act, H, i, f, g, o);  // after every read of pre: act may alias x
    }

    // LB1 .. LB4 of one unit inside its sequence, except LB4's GEMM (dh_{t-1} = da_t W_hh).
    template <typename T>
    __device__ static void backward(const BackwardUnit<T>& u, index_t H, int) {
        const T i = u.act[0];
        const T f = u.act[H];
        const T g = u.act[2 * H];
        const T o = u.act[3 * H];
        // LB1: gradient reaching this step's new h (or r) and c.
        const T dh = u.dh;
        const T dc = *u.dc;
        // LB2: through h = o * tanh(c) and c = f * c_prev + i * g.
        const T tanh_c = fr_tanh(*u.c_new);
        const T d_o = dh * tanh_c;
        const T dct = dc + dh * o * fr_tanh_grad(tanh_c);
        const T d_i = dct * g;
        const T d_g = dct * i;
        const T d_f = dct * *u.c_prev;
        // LB3: through the gate nonlinearities.
        u.da[0] = d_i * fr_sigmoid_grad(i);
        u.da[H] = d_f * fr_sigmoid_grad(f);
        u.da[2 * H] = d_g * fr_tanh_grad(g);
        u.da[3 * H] = d_o * fr_sigmoid_grad(o);
        // LB4: to the previous cell state; the hidden state's part is the driver's GEMM.
        *u.dc = dct * f;
    }
};
