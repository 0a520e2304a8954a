// fastrnn/csrc/gru.cu -- the GRU cell (gates r, z, n; PyTorch layout).
//
// Only the pointwise math of one unit: the step kernels that run it are those of recurrent.cuh,
// the device math that of common.cuh (both prepended by the loader; do not #include them). Step
// numbers (G*, GB*) are those of fastrnn/reference/gru.py.
//
// n needs r * (h_{t-1} W_hn^T + b_hn), so the recurrent sums are kept apart from the input's:
// pre holds x_t W_ih^T and hw h_{t-1} W_hh^T (both without bias); acts [T, N, 4H] keeps r, z, n
// and hn = h_{t-1} W_hn^T + b_hn for backward, which writes the gradients of both sums (da of
// x_t W_ih^T + b_ih, dha of h_{t-1} W_hh^T + b_hh).

struct GruCell {
    static constexpr int gates = 3;
    static constexpr int acts = 4;  // r, z, n, hn

    // G2 (biases) .. G5 of one unit.
    template <typename T>
    __device__ static void forward(const ForwardUnit<T>& u, index_t H, bool live, int save, int) {
        // G1/G2 biases, then G3: gates.
        const T hn = u.hw[2 * H] + u.b_hh[2 * H];
        const T r = fr_sigmoid(u.x[0] + u.b[0] + (u.hw[0] + u.b_hh[0]));
        const T z = fr_sigmoid(u.x[H] + u.b[H] + (u.hw[H] + u.b_hh[H]));
        const T nn = fr_tanh(u.x[2 * H] + u.b[2 * H] + r * hn);
        // G4: new state.
        const T hp = *u.h_prev;
        const T h = (T(1) - z) * nn + z * hp;
        // G5: a finished sequence keeps its state and emits zeros.
        *u.h_next = live ? h : hp;
        *u.y = live ? h : T(0);
        if (save) store_gates(u.act, H, r, z, nn, hn);
    }

    // GB1 .. GB4 of one unit inside its sequence, except GB4's GEMM (+= dha_t W_hh).
    template <typename T>
    __device__ static void backward(const BackwardUnit<T>& u, index_t H, int) {
        const T r = u.act[0];
        const T z = u.act[H];
        const T nn = u.act[2 * H];
        const T hn = u.act[3 * H];
        // GB1: gradient reaching this step's new h.
        const T dh = u.dh;
        // GB2: through h = (1 - z) * n + z * h_prev.
        const T dn = dh * (T(1) - z);
        const T dz = dh * (*u.h_prev - nn);
        // GB3: through the gate nonlinearities.
        const T dan = dn * fr_tanh_grad(nn);
        const T dar = dan * hn * fr_sigmoid_grad(r);
        const T daz = dz * fr_sigmoid_grad(z);
        u.da[0] = dar;
        u.da[H] = daz;
        u.da[2 * H] = dan;
        u.dha[0] = dar;
        u.dha[H] = daz;
        u.dha[2 * H] = dan * r;
        // GB4: the direct path through z * h_prev; the driver's GEMM adds dha_t W_hh.
        *u.dh_prev += dh * z;
    }
};
