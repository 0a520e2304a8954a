"""LSTM reference: readable NumPy, PyTorch's layout and gate order (i, f, g, o).

The numbered steps (L1..L5 forward, LB1..LB5 backward) are cited by the CPU and CUDA kernels.

Forward, per step t (sequence n inside its length)::

    a_t = x_t W_ih^T + b  +  h_{t-1} W_hh^T          (L1 input part for all t, L2 recurrent part)
    i, f, o = sigmoid(a_i), sigmoid(a_f), sigmoid(a_o);  g = tanh(a_g)      (L3)
    c_t = f * c_{t-1} + i * g;   r_t = o * tanh(c_t)                        (L4)
    h_t = r_t                  without projection                           (L4)
    h_t = r_t W_hr^T           with projection (torch's proj_size P)        (L4p)
    past its length a sequence keeps its state and outputs zeros            (L5)

With a projection, ``w_hr`` is (P, H), ``w_hh`` is (4H, P), and h0, h_t, y have P features; the
cell state c keeps H.
"""

from __future__ import annotations

from fastrnn.context import Context
from fastrnn.reference._common import get_xp, sigmoid, step_mask, zeros_if_none


def lstm_forward(x, h0, c0, w_ih, w_hh, b, *, w_hr=None, lengths=None, training=True):
    """x (T,N,D); h0 (N,P); c0 (N,H); w_ih (4H,D); w_hh (4H,P); b (4H,); w_hr None or (P,H)
    (P = H without projection) -> y (T,N,P), hT (N,P), cT (N,H), ctx."""
    xp = get_xp(x)
    T, N, D = x.shape
    H = c0.shape[1]
    P = h0.shape[1]
    mask = step_mask(xp, lengths, T, N, x.dtype) > 0  # (T, N, 1) bool

    # L1: the input projection of all T steps as one GEMM.
    xw = (x.reshape(T * N, D) @ w_ih.T + b).reshape(T, N, 4 * H)

    y = xp.empty((T, N, P), dtype=x.dtype)
    hs = xp.empty((T + 1, N, P), dtype=x.dtype)  # hs[t] = state before step t (after masking)
    cs = xp.empty((T + 1, N, H), dtype=x.dtype)
    rs = xp.empty((T, N, H), dtype=x.dtype)  # r_t = o * tanh(c_t), before the projection
    acts = xp.empty((T, N, 4 * H), dtype=x.dtype)  # i, f, g, o after their nonlinearities
    hs[0], cs[0] = h0, c0
    for t in range(T):
        # L2: the recurrent projection.
        a = xw[t] + hs[t] @ w_hh.T
        # L3: gate nonlinearities.
        i = sigmoid(xp, a[:, 0 * H : 1 * H])
        f = sigmoid(xp, a[:, 1 * H : 2 * H])
        g = xp.tanh(a[:, 2 * H : 3 * H])
        o = sigmoid(xp, a[:, 3 * H : 4 * H])
        # L4: cell and hidden state.
        c = f * cs[t] + i * g
        r = o * xp.tanh(c)
        # L4p: the projection of the hidden state.
        h = r if w_hr is None else r @ w_hr.T
        # L5: finished sequences keep their state and emit zeros (a select, not a product with
        #     the mask: an infinite state stays infinite instead of becoming 0 * inf = NaN).
        m = mask[t]
        cs[t + 1] = xp.where(m, c, cs[t])
        hs[t + 1] = xp.where(m, h, hs[t])
        y[t] = xp.where(m, h, 0)
        rs[t] = xp.where(m, r, 0)
        acts[t] = xp.concatenate([i, f, g, o], axis=1)

    ctx = None
    if training:
        ctx = Context(
            op="lstm",
            backend="numpy",
            dtype=x.dtype,
            cupy=xp.__name__ == "cupy",
            grad_shapes={"dy": (T, N, P), "dhT": (N, P), "dcT": (N, H)},
            saved=dict(
                x=x, w_ih=w_ih, w_hh=w_hh, w_hr=w_hr, hs=hs, cs=cs, rs=rs, acts=acts, mask=mask
            ),
        )
    return y, hs[T].copy(), cs[T].copy(), ctx


def lstm_backward(ctx, dy, dhT=None, dcT=None):
    """-> dx (T,N,D), dh0 (N,P), dc0 (N,H), dw_ih (4H,D), dw_hh (4H,P), db (4H,), and a seventh
    element dw_hr (P,H) exactly when the forward had ``w_hr``."""
    s = ctx.saved
    x, w_ih, w_hh, w_hr = s["x"], s["w_ih"], s["w_hh"], s["w_hr"]
    hs, cs, rs, acts, mask = s["hs"], s["cs"], s["rs"], s["acts"], s["mask"]
    xp = get_xp(x)
    T, N, D = x.shape
    H = cs.shape[2]
    P = hs.shape[2]
    dh = zeros_if_none(xp, dhT, (N, P), x.dtype).copy()
    dc = zeros_if_none(xp, dcT, (N, H), x.dtype).copy()
    da_all = xp.empty((T, N, 4 * H), dtype=x.dtype)
    dh_all = xp.empty((T, N, P), dtype=x.dtype)  # gradient reaching each step's new h
    for t in reversed(range(T)):
        m = mask[t]
        i, f, g, o = (acts[t][:, k * H : (k + 1) * H] for k in range(4))
        # LB1: gradient reaching this step's new h and c; padded positions pass dh, dc through
        #      unchanged (L5) and ignore dy.
        dh_step = xp.where(m, dy[t] + dh, 0)
        dc_step = xp.where(m, dc, 0)
        dh_all[t] = dh_step
        # LB1p: through the projection h = r W_hr^T (L4p).
        dr = dh_step if w_hr is None else dh_step @ w_hr
        # LB2: through r = o * tanh(c) and c = f * c_prev + i * g (L4).
        tanh_c = xp.tanh(cs[t + 1])
        do = dr * tanh_c
        dct = dc_step + dr * o * (1 - tanh_c * tanh_c)
        di = dct * g
        dg = dct * i
        df = dct * cs[t]
        # LB3: through the gate nonlinearities (L3).
        da = xp.concatenate(
            [di * i * (1 - i), df * f * (1 - f), dg * (1 - g * g), do * o * (1 - o)], axis=1
        )
        da_all[t] = xp.where(m, da, 0)
        # LB4: to the previous state (L2 and L4), plus the pass-through of padded positions.
        dc = xp.where(m, dct * f, dc)
        dh = xp.where(m, da @ w_hh, dh)
    # LB5: weight, bias and input gradients as whole-sequence GEMMs.
    da2 = da_all.reshape(T * N, 4 * H)
    dx = (da2 @ w_ih).reshape(T, N, D)
    dw_ih = da2.T @ x.reshape(T * N, D)
    dw_hh = da2.T @ hs[:T].reshape(T * N, P)
    db = da2.sum(axis=0)
    if w_hr is None:
        return dx, dh, dc, dw_ih, dw_hh, db
    dw_hr = dh_all.reshape(T * N, P).T @ rs.reshape(T * N, H)
    return dx, dh, dc, dw_ih, dw_hh, db, dw_hr
