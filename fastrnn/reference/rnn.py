"""Elman RNN reference: readable NumPy, PyTorch's layout.

Steps R1..R4 forward, RB1..RB4 backward; the kernels cite them.

Forward, per step t (sequence n inside its length)::

    a_t = x_t W_ih^T + b  +  h_{t-1} W_hh^T          (R1 input part for all t, R2 recurrent part)
    h_t = tanh(a_t)  or  relu(a_t)                    (R3)
    past its length a sequence keeps its state and outputs zeros            (R4)
"""

from __future__ import annotations

from fastrnn.context import Context
from fastrnn.reference._common import get_xp, step_mask, zeros_if_none


def rnn_forward(x, h0, w_ih, w_hh, b, *, nonlinearity="tanh", lengths=None, training=True):
    """x (T,N,D); h0 (N,H); w_ih (H,D); w_hh (H,H); b (H,) -> y, hT, ctx."""
    xp = get_xp(x)
    T, N, D = x.shape
    H = h0.shape[1]
    mask = step_mask(xp, lengths, T, N, x.dtype) > 0  # (T, N, 1) bool

    # R1: the input projection of all T steps as one GEMM.
    xw = (x.reshape(T * N, D) @ w_ih.T + b).reshape(T, N, H)

    y = xp.empty((T, N, H), dtype=x.dtype)
    hs = xp.empty((T + 1, N, H), dtype=x.dtype)
    hs[0] = h0
    for t in range(T):
        # R2: the recurrent projection.
        a = xw[t] + hs[t] @ w_hh.T
        # R3: the nonlinearity.
        h = xp.tanh(a) if nonlinearity == "tanh" else xp.maximum(a, 0)
        # R4: finished sequences keep their state and emit zeros (a select: an infinite state
        #     stays infinite instead of becoming 0 * inf = NaN).
        m = mask[t]
        hs[t + 1] = xp.where(m, h, hs[t])
        y[t] = xp.where(m, h, 0)

    ctx = None
    if training:
        ctx = Context(
            op="rnn",
            backend="numpy",
            dtype=x.dtype,
            cupy=xp.__name__ == "cupy",
            grad_shapes={"dy": (T, N, H), "dhT": (N, H)},
            saved=dict(x=x, w_ih=w_ih, w_hh=w_hh, hs=hs, y=y, mask=mask, nonlinearity=nonlinearity),
        )
    return y, hs[T].copy(), ctx


def rnn_backward(ctx, dy, dhT=None):
    """-> dx (T,N,D), dh0 (N,H), dw_ih (H,D), dw_hh (H,H), db (H,)."""
    s = ctx.saved
    x, w_ih, w_hh, hs, y, mask = s["x"], s["w_ih"], s["w_hh"], s["hs"], s["y"], s["mask"]
    xp = get_xp(x)
    T, N, D = x.shape
    H = hs.shape[2]
    dh = zeros_if_none(xp, dhT, (N, H), x.dtype).copy()
    da_all = xp.empty((T, N, H), dtype=x.dtype)
    for t in reversed(range(T)):
        m = mask[t]
        # RB1: gradient reaching this step's new h; padded positions pass dh through (R4).
        dh_step = xp.where(m, dy[t] + dh, 0)
        # RB2: through the nonlinearity (R3); y[t] is this step's h where m = 1.
        if s["nonlinearity"] == "tanh":
            da = dh_step * (1 - y[t] * y[t])
        else:
            da = dh_step * (y[t] > 0)
        da = xp.where(m, da, 0)
        da_all[t] = da
        # RB3: to the previous state (R2), plus the pass-through of padded positions.
        dh = xp.where(m, da @ w_hh, dh)
    # RB4: weight, bias and input gradients as whole-sequence GEMMs.
    da2 = da_all.reshape(T * N, H)
    dx = (da2 @ w_ih).reshape(T, N, D)
    dw_ih = da2.T @ x.reshape(T * N, D)
    dw_hh = da2.T @ hs[:T].reshape(T * N, H)
    return dx, dh, dw_ih, dw_hh, da2.sum(axis=0)
