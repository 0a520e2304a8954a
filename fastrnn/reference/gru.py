"""GRU reference: readable NumPy, PyTorch's layout and gate order (r, z, n).

Steps G1..G5 forward, GB1..GB5 backward; the kernels cite them.

Forward, per step t (sequence n inside its length)::

    xr, xz, xn = x_t W_ih^T + b_ih                  (G1, all t in one GEMM)
    hr, hz, hn = h_{t-1} W_hh^T + b_hh              (G2)
    r = sigmoid(xr + hr);  z = sigmoid(xz + hz);  n = tanh(xn + r * hn)     (G3)
    h_t = (1 - z) * n + z * h_{t-1}                                         (G4)
    past its length a sequence keeps its state and outputs zeros            (G5)
"""

from __future__ import annotations

from fastrnn.context import Context
from fastrnn.reference._common import get_xp, sigmoid, step_mask, zeros_if_none


def gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, *, lengths=None, training=True):
    """x (T,N,D); h0 (N,H); w_ih (3H,D); w_hh (3H,H); b_ih, b_hh (3H,) -> y, hT, ctx."""
    xp = get_xp(x)
    T, N, D = x.shape
    H = h0.shape[1]
    mask = step_mask(xp, lengths, T, N, x.dtype) > 0  # (T, N, 1) bool

    # G1: the input projection of all T steps as one GEMM.
    xw = (x.reshape(T * N, D) @ w_ih.T + b_ih).reshape(T, N, 3 * H)

    y = xp.empty((T, N, H), dtype=x.dtype)
    hs = xp.empty((T + 1, N, H), dtype=x.dtype)
    acts = xp.empty((T, N, 4 * H), dtype=x.dtype)  # r, z, n, hn (hn = W_hn h + b_hn)
    hs[0] = h0
    for t in range(T):
        # G2: the recurrent projection, with its own bias.
        hw = hs[t] @ w_hh.T + b_hh
        # G3: gates.
        r = sigmoid(xp, xw[t][:, :H] + hw[:, :H])
        z = sigmoid(xp, xw[t][:, H : 2 * H] + hw[:, H : 2 * H])
        hn = hw[:, 2 * H :]
        n = xp.tanh(xw[t][:, 2 * H :] + r * hn)
        # G4: new state.
        h = (1 - z) * n + z * hs[t]
        # G5: finished sequences keep their state and emit zeros (a select: an infinite state
        #     stays infinite instead of becoming 0 * inf = NaN).
        m = mask[t]
        hs[t + 1] = xp.where(m, h, hs[t])
        y[t] = xp.where(m, h, 0)
        acts[t] = xp.concatenate([r, z, n, hn], axis=1)

    ctx = None
    if training:
        ctx = Context(
            op="gru",
            backend="numpy",
            dtype=x.dtype,
            cupy=xp.__name__ == "cupy",
            grad_shapes={"dy": (T, N, H), "dhT": (N, H)},
            saved=dict(x=x, w_ih=w_ih, w_hh=w_hh, hs=hs, acts=acts, mask=mask),
        )
    return y, hs[T].copy(), ctx


def gru_backward(ctx, dy, dhT=None):
    """-> dx (T,N,D), dh0 (N,H), dw_ih (3H,D), dw_hh (3H,H), db_ih (3H,), db_hh (3H,)."""
    s = ctx.saved
    x, w_ih, w_hh, hs, acts, mask = s["x"], s["w_ih"], s["w_hh"], s["hs"], s["acts"], s["mask"]
    xp = get_xp(x)
    T, N, D = x.shape
    H = hs.shape[2]
    dh = zeros_if_none(xp, dhT, (N, H), x.dtype).copy()
    dxw_all = xp.empty((T, N, 3 * H), dtype=x.dtype)
    dhw_all = xp.empty((T, N, 3 * H), dtype=x.dtype)
    for t in reversed(range(T)):
        m = mask[t]
        r, z, n, hn = (acts[t][:, k * H : (k + 1) * H] for k in range(4))
        # GB1: gradient reaching this step's new h; padded positions pass dh through (G5).
        dh_step = xp.where(m, dy[t] + dh, 0)
        # GB2: through h = (1 - z) * n + z * h_prev (G4).
        dn = dh_step * (1 - z)
        dz = dh_step * (hs[t] - n)
        # GB3: through the gate nonlinearities (G3).
        dan = dn * (1 - n * n)
        dar = dan * hn * r * (1 - r)
        daz = dz * z * (1 - z)
        dxw_all[t] = xp.where(m, xp.concatenate([dar, daz, dan], axis=1), 0)
        dhw = xp.where(m, xp.concatenate([dar, daz, dan * r], axis=1), 0)
        dhw_all[t] = dhw
        # GB4: to the previous state (G2, G4), plus the pass-through of padded positions.
        dh = xp.where(m, dh_step * z + dhw @ w_hh, dh)
    # GB5: weight, bias and input gradients as whole-sequence GEMMs.
    dxw = dxw_all.reshape(T * N, 3 * H)
    dhw = dhw_all.reshape(T * N, 3 * H)
    dx = (dxw @ w_ih).reshape(T, N, D)
    dw_ih = dxw.T @ x.reshape(T * N, D)
    dw_hh = dhw.T @ hs[:T].reshape(T * N, H)
    return dx, dh, dw_ih, dw_hh, dxw.sum(axis=0), dhw.sum(axis=0)
