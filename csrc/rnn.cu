// fastrnn/csrc/rnn.cu -- the Elman RNN cell (tanh or relu; PyTorch layout).
//
// Only the pointwise math of one unit: the step kernels that run it are those of recurrent.cuh,
// the device math that of common.cuh (both prepended by the loader; do not #include them). Step
// numbers (R*, RB*) are those of fastrnn/reference/rnn.py. pre holds x_t W_ih^T + h_{t-1} W_hh^T
// (the driver's GEMMs accumulate both there); nothing is saved but the states.

#define RNN_RELU 1

struct RnnCell {
    static constexpr int gates = 1;
    static constexpr int acts = 0;

    // R2 (bias) .. R4 of one unit.
    template <typename T>
    __device__ static void forward(const ForwardUnit<T>& u, index_t, bool live, int, int mode) {
        // R3: the nonlinearity.
        const T a = u.x[0] + u.b[0];
        const T h = mode == RNN_RELU ? fr_relu(a) : fr_tanh(a);
        // R4: a finished sequence keeps its state and emits zeros.
        *u.h_next = live ? h : *u.h_prev;
        *u.y = live ? h : T(0);
    }

    // RB1 .. RB2 of one unit inside its sequence; RB3 is the driver's GEMM. The step's h is
    // read from the saved state after it (y may have been changed by the caller).
    template <typename T>
    __device__ static void backward(const BackwardUnit<T>& u, index_t, int mode) {
        const T h = *u.h_new;
        u.da[0] = mode == RNN_RELU ? fr_relu_grad(h, u.dh) : u.dh * fr_tanh_grad(h);
    }
};
