// fastrnn/csrc/conv2d.cu -- the data movement of conv2d (PyTorch's cross-correlation, NCHW);
// cuBLAS does the arithmetic. Step numbers (C*, CB*) are those of fastrnn/reference/conv2d.py.
// common.cuh is prepended to this file by the loader; do not #include it.
//
// The driver (fastrnn/_cuda/conv.py) works on a chunk of nb images n0 .. n0+nb-1 at a time, in
// a "channel-major" layout where one row holds a channel's values for every image of the chunk:
//   cols  : [C*KH*KW, nb*L]  row (c*KH + i)*KW + j, column n*L + oh*OW + ow (L = OH*OW) holds
//           xp[n0+n, c, oh*sh + i*dh, ow*sw + j*dw] (C2, xp = x zero-padded: C1)
//   yT    : [F, nb*L]        row f, column n*L + l holds y[n0+n, f, l]
// so that each group's GEMM covers the whole chunk: yT_g = w_g @ cols_g (C3), dW_g += dyT_g
// cols_g^T (CB2), dcols_g = w_g^T dyT_g (CB3), with the images inside the GEMM's long dimension
// (and the sum over images of CB2 inside the GEMM's reduction, in a fixed order).
// Every output element is computed from scratch by one thread (im2col: one thread writes the
// KH*KW elements of a (channel, column) pair): no atomics, so the results are bitwise
// reproducible. Sizes, offsets and strides are 64-bit (index_t).

// im2col: C1 + C2 for images n0 .. n0+nb-1. One loop iteration per (channel, column) pair
// writes that column's KH*KW rows of the channel: the index arithmetic (three divisions, which
// cost ~20 instructions each on the GPU) is done once per KH*KW elements, not per element.
// Consecutive threads take consecutive columns, so every store of a warp is contiguous.
//   x    IN  [N, C, H, W]
//   cols OUT [C*KH*KW, nb*OH*OW]
template <typename T>
__global__ void im2col(const T* __restrict__ x, T* __restrict__ cols, index_t n0, index_t nb,
                       index_t C, index_t H, index_t W, index_t KH, index_t KW, index_t OH,
                       index_t OW, index_t sh, index_t sw, index_t ph, index_t pw, index_t dh,
                       index_t dw) {
    const index_t L = OH * OW;
    const index_t row_len = nb * L;
    const index_t total = C * row_len;
    FASTRNN_GRID_STRIDE_LOOP(e, total) {
        const index_t c = e / row_len;
        const index_t q = e - c * row_len;  // n*L + oh*OW + ow
        const index_t n = q / L;
        const index_t l = q - n * L;
        const index_t oh = l / OW;
        const index_t ow = l - oh * OW;
        const T* xc = x + ((n0 + n) * C + c) * H * W;
        T* out = cols + c * KH * KW * row_len + q;  // row (c*KH + i)*KW + j, column q
        for (index_t i = 0; i < KH; ++i) {
            const index_t h = oh * sh - ph + i * dh;
            const bool h_in = h >= 0 && h < H;
            for (index_t j = 0; j < KW; ++j) {
                const index_t w = ow * sw - pw + j * dw;
                T v = T(0);  // C1: zero padding
                if (h_in && w >= 0 && w < W) v = xc[h * W + w];
                out[(i * KW + j) * row_len] = v;
            }
        }
    }
}

// col2im: CB4 + CB5 as a gather, for images n0 .. n0+nb-1: each input element sums the column
// entries that read it, taps in the reference's order (i, then j), so no two threads write
// the same element. With stride 1 along an axis (the common case) no division is needed to
// find the window of a tap; the test on sh / sw is the same for every thread.
//   cols IN  [C*KH*KW, nb*OH*OW]  the gradient of the columns (CB3)
//   dx   OUT [N, C, H, W]         images n0 .. n0+nb-1 written
template <typename T>
__global__ void col2im(const T* __restrict__ cols, T* __restrict__ dx, index_t n0, index_t nb,
                       index_t C, index_t H, index_t W, index_t KH, index_t KW, index_t OH,
                       index_t OW, index_t sh, index_t sw, index_t ph, index_t pw, index_t dh,
                       index_t dw) {
    const index_t L = OH * OW;
    const index_t row_len = nb * L;
    const index_t HW = H * W;
    const index_t total = nb * C * HW;
    T* dx_chunk = dx + n0 * C * HW;
    FASTRNN_GRID_STRIDE_LOOP(e, total) {
        const index_t n = e / (C * HW);
        const index_t rem = e - n * (C * HW);
        const index_t c = rem / HW;
        const index_t hw = rem - c * HW;
        const index_t h = hw / W;
        const index_t w = hw - h * W;
        const T* src = cols + c * KH * KW * row_len + n * L;  // row c*KH*KW, image n
        T acc = T(0);
        for (index_t i = 0; i < KH; ++i) {
            index_t oh = h + ph - i * dh;  // = oh * sh for the window that reads (h, w)
            if (oh < 0) continue;
            if (sh != 1) {
                if (oh % sh != 0) continue;
                oh /= sh;
            }
            if (oh >= OH) continue;
            for (index_t j = 0; j < KW; ++j) {
                index_t ow = w + pw - j * dw;
                if (ow < 0) continue;
                if (sw != 1) {
                    if (ow % sw != 0) continue;
                    ow /= sw;
                }
                if (ow >= OW) continue;
                acc += src[(i * KW + j) * row_len + oh * OW + ow];
            }
        }
        dx_chunk[e] = acc;
    }
}

// to_channel_major: src [N, F, L] images n0 .. n0+nb-1 -> dst [F, nb*L] (dy -> dyT).
template <typename T>
__global__ void to_channel_major(const T* __restrict__ src, T* __restrict__ dst, index_t n0,
                                 index_t nb, index_t F, index_t L) {
    const index_t row_len = nb * L;
    const index_t total = F * row_len;
    FASTRNN_GRID_STRIDE_LOOP(e, total) {
        const index_t f = e / row_len;
        const index_t q = e - f * row_len;
        const index_t n = q / L;
        const index_t l = q - n * L;
        dst[e] = src[((n0 + n) * F + f) * L + l];
    }
}

// from_channel_major: src [F, nb*L] -> dst [N, F, L] images n0 .. n0+nb-1, plus the bias (C4)
// when has_bias != 0 (bias is then [F]; otherwise it is not read).
template <typename T>
__global__ void from_channel_major(const T* __restrict__ src, const T* __restrict__ bias,
                                   T* __restrict__ dst, index_t n0, index_t nb, index_t F,
                                   index_t L, int has_bias) {
    const index_t FL = F * L;
    const index_t total = nb * FL;
    T* dst_chunk = dst + n0 * FL;
    FASTRNN_GRID_STRIDE_LOOP(e, total) {
        const index_t n = e / FL;
        const index_t rem = e - n * FL;
        const index_t f = rem / L;
        const index_t l = rem - f * L;
        T v = src[f * (nb * L) + n * L + l];
        if (has_bias) v += bias[f];
        dst_chunk[e] = v;
    }
}
