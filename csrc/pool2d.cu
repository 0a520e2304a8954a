// fastrnn/csrc/pool2d.cu -- max and average pooling, forward and backward (PyTorch's defaults,
// NCHW). Step numbers (P*, PB*) are those of fastrnn/reference/pool2d.py. common.cuh is
// prepended to this file by the loader; do not #include it.
//
// Planes: NC = N*C planes of H*W inputs and OH*OW outputs. Window (oh, ow) covers padded rows
// oh*sh .. oh*sh + KH - 1, i.e. input rows oh*sh - ph + i for taps i = 0 .. KH-1 (likewise
// columns); padding is at most half the kernel, so every window holds a real element.
// The backward passes are gathers: each input element sums the windows that cover it, in the
// reference's order (tap i, then j, ascending: windows oh, then ow, descending), so no two
// threads write one element and no atomics are needed: bitwise reproducible.

// max_pool2d_forward: P1-P3. y = max over the real taps; arg = the plane offset h*W + w of the
// first tap (row-major) holding it; a NaN is a maximum (the first NaN wins). arg is written
// when save != 0 (otherwise it is not touched).
//   x IN [NC, H, W];  y OUT [NC, OH, OW];  arg OUT [NC, OH, OW]
template <typename T>
__global__ void max_pool2d_forward(const T* __restrict__ x, T* __restrict__ y,
                                   index_t* __restrict__ arg, index_t NC, index_t H, index_t W,
                                   index_t OH, index_t OW, index_t KH, index_t KW, index_t sh,
                                   index_t sw, index_t ph, index_t pw, int save) {
    const index_t total = NC * OH * OW;
    FASTRNN_GRID_STRIDE_LOOP(e, total) {
        const index_t p = e / (OH * OW);
        const index_t l = e - p * (OH * OW);
        const index_t oh = l / OW;
        const index_t ow = l - oh * OW;
        const T* plane = x + p * H * W;
        const index_t h0 = oh * sh - ph;
        const index_t w0 = ow * sw - pw;
        bool found = false;
        T best = T(0);
        index_t best_at = 0;
        for (index_t i = 0; i < KH; ++i) {
            const index_t h = h0 + i;
            if (h < 0 || h >= H) continue;  // P1: padding never wins
            for (index_t j = 0; j < KW; ++j) {
                const index_t w = w0 + j;
                if (w < 0 || w >= W) continue;
                const T v = plane[h * W + w];
                // P3: strictly greater (the first maximum stays), or the first NaN.
                if (!found || v > best || (fr_isnan(v) && !fr_isnan(best))) {
                    found = true;
                    best = v;
                    best_at = h * W + w;
                }
            }
        }
        y[e] = best;
        if (save) arg[e] = best_at;
    }
}

// max_pool2d_backward: PB1 + PB3. dx[h, w] = sum of dy over the windows whose arg is (h, w).
//   dy IN [NC, OH, OW];  arg IN [NC, OH, OW];  dx OUT [NC, H, W]
template <typename T>
__global__ void max_pool2d_backward(const T* __restrict__ dy, const index_t* __restrict__ arg,
                                    T* __restrict__ dx, index_t NC, index_t H, index_t W,
                                    index_t OH, index_t OW, index_t KH, index_t KW, index_t sh,
                                    index_t sw, index_t ph, index_t pw) {
    const index_t total = NC * H * W;
    FASTRNN_GRID_STRIDE_LOOP(e, total) {
        const index_t p = e / (H * W);
        const index_t hw = e - p * (H * W);
        const index_t h = hw / W;
        const index_t w = hw - h * W;
        const index_t hp = h + ph;  // padded coordinates
        const index_t wp = w + pw;
        // Windows oh with oh*sh <= hp <= oh*sh + KH - 1, clipped to [0, OH).
        const index_t oh_lo = hp < KH ? 0 : (hp - KH) / sh + 1;
        const index_t oh_hi = hp / sh < OH - 1 ? hp / sh : OH - 1;
        const index_t ow_lo = wp < KW ? 0 : (wp - KW) / sw + 1;
        const index_t ow_hi = wp / sw < OW - 1 ? wp / sw : OW - 1;
        const index_t* arg_p = arg + p * OH * OW;
        const T* dy_p = dy + p * OH * OW;
        T acc = T(0);
        for (index_t oh = oh_hi; oh >= oh_lo; --oh) {
            for (index_t ow = ow_hi; ow >= ow_lo; --ow) {
                if (arg_p[oh * OW + ow] == hw) acc += dy_p[oh * OW + ow];
            }
        }
        dx[e] = acc;
    }
}

// avg_pool2d_forward: P1, P2, P4. y = (sum of the real taps) / (KH*KW): padding counts in the
// divisor (count_include_pad).
template <typename T>
__global__ void avg_pool2d_forward(const T* __restrict__ x, T* __restrict__ y, index_t NC,
                                   index_t H, index_t W, index_t OH, index_t OW, index_t KH,
                                   index_t KW, index_t sh, index_t sw, index_t ph, index_t pw) {
    const index_t total = NC * OH * OW;
    FASTRNN_GRID_STRIDE_LOOP(e, total) {
        const index_t p = e / (OH * OW);
        const index_t l = e - p * (OH * OW);
        const index_t oh = l / OW;
        const index_t ow = l - oh * OW;
        const T* plane = x + p * H * W;
        const index_t h0 = oh * sh - ph;
        const index_t w0 = ow * sw - pw;
        T acc = T(0);
        for (index_t i = 0; i < KH; ++i) {
            const index_t h = h0 + i;
            if (h < 0 || h >= H) continue;
            for (index_t j = 0; j < KW; ++j) {
                const index_t w = w0 + j;
                if (w < 0 || w >= W) continue;
                acc += plane[h * W + w];
            }
        }
        y[e] = acc / T(KH * KW);
    }
}

// avg_pool2d_backward: PB2 + PB3. dx[h, w] = sum over the windows covering (h, w) of
// dy / (KH*KW).
template <typename T>
__global__ void avg_pool2d_backward(const T* __restrict__ dy, T* __restrict__ dx, index_t NC,
                                    index_t H, index_t W, index_t OH, index_t OW, index_t KH,
                                    index_t KW, index_t sh, index_t sw, index_t ph, index_t pw) {
    const index_t total = NC * H * W;
    const T div = T(KH * KW);
    FASTRNN_GRID_STRIDE_LOOP(e, total) {
        const index_t p = e / (H * W);
        const index_t hw = e - p * (H * W);
        const index_t h = hw / W;
        const index_t w = hw - h * W;
        const index_t hp = h + ph;
        const index_t wp = w + pw;
        const index_t oh_lo = hp < KH ? 0 : (hp - KH) / sh + 1;
        const index_t oh_hi = hp / sh < OH - 1 ? hp / sh : OH - 1;
        const index_t ow_lo = wp < KW ? 0 : (wp - KW) / sw + 1;
        const index_t ow_hi = wp / sw < OW - 1 ? wp / sw : OW - 1;
        const T* dy_p = dy + p * OH * OW;
        T acc = T(0);
        for (index_t oh = oh_hi; oh >= oh_lo; --oh) {
            for (index_t ow = ow_hi; ow >= ow_lo; --ow) {
                acc += dy_p[oh * OW + ow] / div;
            }
        }
        dx[e] = acc;
    }
}
