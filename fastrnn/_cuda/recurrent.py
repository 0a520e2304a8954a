"""CUDA drivers of the recurrent ops: LSTM (with or without projections), GRU, Elman RNN.

One time loop serves every cell (DESIGN.md, "Performance model"):

* forward: one GEMM for the input projection of all T steps; per step the recurrent GEMM and the
  cell's pointwise kernel (``recurrent_forward_step`` of csrc/recurrent.cuh over the cell of
  csrc/<op>.cu); with projections, a GEMM projecting r into the state and ``recurrent_select``;
* backward: ``recurrent_seed`` (csrc/recurrent.cu) puts dy and dhT where they enter the state
  gradients; per step (with projections, first dr = dh W_hr) the cell's pointwise kernel and one
  GEMM adding the step's gate gradients times W_hh into the gradient of the state before the
  step; then the weight, bias and input gradients as whole-sequence GEMMs (a bias gradient is
  ``ones @ dA``, a GEMM too: no atomics anywhere, so results are bitwise reproducible run to run
  on the same GPU and CuPy/CUDA versions).

What differs between the ops is a row of :data:`CELLS`. The time loops go through
``Runtime.time_loop``: their calls are bound once per key and, with CUDA graphs on (the
default), replayed as one graph from the third call with the same arrays on.

Everything is enqueued on CuPy's current stream, on the device of the inputs; ``lengths`` goes to
the device once per call and the time loop never waits for the GPU. The arrays arrive validated
and C-contiguous (fastrnn/backends/ops.py). Step numbers refer to
fastrnn/reference/{lstm,gru,rnn}.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fastrnn._cuda import _kernels
from fastrnn._cuda._runtime import runtime
from fastrnn.context import Context

# The cells' `mode` argument (csrc/lstm.cu LSTM_PROJECTED, csrc/rnn.cu RNN_RELU).
MODE_PLAIN, LSTM_PROJECTED, RNN_RELU = 0, 1, 1


@dataclass(frozen=True)
class Cell:
    """What the time loop needs to know of one cell (the math is in csrc/<op>.cu, its struct
    registered in the kernel table's CELLS)."""

    op: str
    gates: int  # G = gates * H columns of the input and recurrent sums
    # The recurrent sums are kept apart from the input's (the GRU's n needs r * (W_hn h + b_hn)):
    # the step's GEMM writes its own buffer, and backward has a gradient of their own for them
    # (dha, for dW_hh and b_hh). Otherwise the GEMM accumulates into the step's input sums.
    apart: bool
    saved: int  # width / H of the activations saved in a buffer of their own (0: none, or in
    #             place of the gate sums, the LSTM)
    cell_state: bool  # the LSTM's c

    def kernel(self, direction: str) -> str:
        """The kernel-table key of the cell's step kernel: recurrent_<direction>_step<Struct>."""
        return f"recurrent_{direction}_step<{_kernels.CELLS[self.op + '.cu']}>"


CELLS = {
    "lstm": Cell("lstm", gates=4, apart=False, saved=0, cell_state=True),
    "gru": Cell("gru", gates=3, apart=True, saved=4, cell_state=False),
    "rnn": Cell("rnn", gates=1, apart=False, saved=0, cell_state=False),
}


def _lengths(rt: Any, lengths: np.ndarray | None, T: int, N: int) -> Any:
    """Device int64 (N,) lengths; every sequence runs T steps when ``lengths`` is None."""
    if lengths is None:
        return rt.xp.full((N,), T, dtype=np.int64)
    return rt.to_device(np.ascontiguousarray(lengths, dtype=np.int64))


def _slots(training: bool, t: int) -> tuple[int, int]:
    """State slots read and written by step t: all T+1 states are kept for backward when
    training, two ping-pong slots otherwise."""
    return (t, t + 1) if training else (t & 1, (t + 1) & 1)


def _colsum(rt: Any, a: Any, rows: int, cols: int) -> Any:
    """Column sums of a row-major (rows, cols) array as ``ones(rows) @ a`` (one deterministic
    GEMM)."""
    xp = rt.xp
    out = xp.empty((cols,), dtype=a.dtype)
    ones = xp.ones((rows,), dtype=a.dtype)
    rt.gemm(False, False, 1, cols, rows, 1.0, ones, 0, rows, a, 0, cols, 0.0, out, 0, cols)
    return out


def forward(cell: Cell, x, h0, c0, w_ih, w_hh, b, b_hh, w_hr, lengths, training, mode):
    """The time loop forward for ``cell``: x (T,N,D); h0 (N,P); c0 (N,H) or None; w_ih (G,D);
    w_hh (G,P); b (G,) (b_ih for a cell whose recurrent sums are apart, then b_hh (G,)); w_hr
    (P,H) or None (P = H without it) -> y (T,N,P), hT (N,P), cT (N,H) or None, ctx."""
    rt = runtime()
    xp = rt.xp
    T, N, D = x.shape
    G = w_ih.shape[0]
    H = G // cell.gates
    P = w_hh.shape[1]  # the state's width: H, or the projection size
    NH, NP = N * H, N * P
    dtype = x.dtype
    projected = w_hr is not None
    with rt.device_of(x):
        lens = _lengths(rt, lengths, T, N)
        # Step 1 of every cell (L1, G1, R1): x_t W_ih^T for all T steps, one GEMM (the biases
        # are added by the cell).
        pre = xp.empty((T, N, G), dtype=dtype)
        rt.gemm(False, True, T * N, G, D, 1.0, x, 0, D, w_ih, 0, D, 0.0, pre, 0, G)
        S = T + 1 if training else 2
        hs = xp.empty((S, N, P), dtype=dtype)
        hs[0] = h0
        cs = hs
        if cell.cell_state:
            cs = xp.empty((S, N, H), dtype=dtype)
            cs[0] = c0
        y = xp.empty((T, N, P), dtype=dtype)
        # The cell's output: y itself, or r (L4) that the projection turns into h (L4p).
        out = xp.empty((T, N, H), dtype=dtype) if projected else y
        hw = xp.empty((N, G), dtype=dtype) if cell.apart else pre
        acts = xp.empty((T, N, cell.saved * H), dtype=dtype) if cell.saved and training else pre
        # Step 2 (L2, G2, R2): h_{t-1} W_hh^T, into the step's input sums or apart.
        recurrent_gemm = rt.loop_gemm(False, True, N, G, P, 1.0, hs, P, w_hh, P,
                                      0.0 if cell.apart else 1.0, hw, G)  # fmt: skip
        gemm_stride = 0 if cell.apart else N * G
        # The cell (L3-L5, G3-G5, R3-R4); with projections it leaves hs alone (cs stands in).
        pointwise = rt.loop_launch(
            cell.kernel("forward"), dtype, NH,
            (pre, hw, b, b_hh, cs if projected else hs, cs, out, acts, lens, 0, 0, 0, N, H,
             int(training), mode),
            ("t", "src", "dst"),
        )  # fmt: skip
        steps = [recurrent_gemm, pointwise]
        if projected:
            # L4p: h_t = r_t W_hr^T into slot dst, then L5 for finished sequences.
            projection = rt.loop_gemm(False, True, N, P, H, 1.0, out, H, w_hr, H, 0.0, hs, P)
            select = rt.loop_launch("recurrent_select", dtype, NP,
                                    (hs, y, lens, 0, 0, 0, N, P), ("t", "src", "dst"))  # fmt: skip
            steps += [projection, select]

        def calls() -> list:
            out_calls = []
            for t in range(T):
                src, dst = _slots(training, t)
                out_calls.append(recurrent_gemm.bind(src * NP, 0, t * gemm_stride))
                out_calls.append(pointwise.bind(t, src, dst))
                if projected:
                    out_calls.append(projection.bind(t * NH, 0, dst * NP))
                    out_calls.append(select.bind(t, src, dst))
            return out_calls

        rt.time_loop((cell.op, "forward", T, N, H, P, training, mode), steps, calls)
        last = _slots(training, T - 1)[1]
        hT = hs[last].copy()
        cT = cs[last].copy() if cell.cell_state else None
    ctx = None
    if training:
        grad_shapes = {"dy": (T, N, P), "dhT": (N, P)}
        if cell.cell_state:
            grad_shapes["dcT"] = (N, H)
        ctx = Context(
            op=cell.op,
            backend="cuda",
            dtype=dtype,
            cupy=True,
            grad_shapes=grad_shapes,
            saved=dict(x=x, w_ih=w_ih, w_hh=w_hh, w_hr=w_hr, hs=hs, cs=cs, acts=acts,
                       out=out if projected else None, lengths=lens, mode=mode),
        )  # fmt: skip
    return y, hT, cT, ctx


def backward(cell: Cell, ctx, dy, dhT, dcT):
    """The time loop backward for ``cell`` -> dx (T,N,D), dh0 (N,P), dc0 (N,H) or None,
    dw_ih (G,D), dw_hh (G,P), da (the gradient of the input sums, whose column sums are the
    bias gradient), dha (of the recurrent sums), dw_hr (P,H) or None."""
    rt = runtime()
    xp = rt.xp
    s = ctx.saved
    x, w_ih, w_hh, w_hr = s["x"], s["w_ih"], s["w_hh"], s["w_hr"]
    hs, cs, acts, out, lens, mode = s["hs"], s["cs"], s["acts"], s["out"], s["lengths"], s["mode"]
    T, N, D = x.shape
    G = w_ih.shape[0]
    H = G // cell.gates
    P = w_hh.shape[1]
    NH, NP = N * H, N * P
    dtype = x.dtype
    projected = w_hr is not None
    with rt.device_of(x):
        # dhs[t+1]: the gradient reaching step t's output; dhs[0] becomes dh0.
        dhs = xp.empty((T + 1, N, P), dtype=dtype)
        seed_dhT = dy if dhT is None else dhT  # not read without dhT
        rt.launch("recurrent_seed", dtype, (T + 1) * NP,
                  (dy, seed_dhT, dhs, lens, T, N, P, int(dhT is not None)))  # fmt: skip
        da = xp.empty((T, N, G), dtype=dtype)
        dha = xp.empty((T, N, G), dtype=dtype) if cell.apart else da
        dc = dhs  # not read by a cell without a cell state
        if cell.cell_state:
            dc = xp.empty((N, H), dtype=dtype)
            if dcT is None:
                dc[...] = 0
            else:
                dc[...] = dcT
        steps = []
        dh, dh_stride = dhs, NP
        if projected:
            # LB1p: dr = dh_step W_hr, the gradient reaching r (one buffer for every step).
            dh, dh_stride = xp.empty((N, H), dtype=dtype), 0
            projection = rt.loop_gemm(False, False, N, H, P, 1.0, dhs, P, w_hr, H, 0.0, dh, H)
            steps.append(projection)
        # The cell (LB1-LB4, GB1-GB4, RB1-RB3 except their GEMM).
        pointwise = rt.loop_launch(
            cell.kernel("backward"), dtype, NH,
            (acts, cs if projected else hs, cs, dh, dh_stride, dhs, da, dha, dc, lens, 0, N, H,
             mode),
            ("t",),
        )  # fmt: skip
        # LB4 / GB4 / RB3: dhs[t] += dha_t W_hh, the state gradient before step t.
        recurrent_gemm = rt.loop_gemm(False, False, N, P, G, 1.0, dha, G, w_hh, P, 1.0, dhs, P)
        steps += [pointwise, recurrent_gemm]

        def calls() -> list:
            out_calls = []
            for t in reversed(range(T)):
                if projected:
                    out_calls.append(projection.bind((t + 1) * NP, 0, 0))
                out_calls.append(pointwise.bind(t))
                out_calls.append(recurrent_gemm.bind(t * N * G, 0, t * NP))
            return out_calls

        rt.time_loop((cell.op, "backward", T, N, H, P, mode), steps, calls)
        dh0 = dhs[0].copy()
        # The last step of every cell (LB5, GB5, RB4): whole-sequence GEMMs. hs holds T+1
        # states; its first T slots (the states before each step) are one (T*N, P) matrix.
        TN = T * N
        dx = xp.empty((T, N, D), dtype=dtype)
        rt.gemm(False, False, TN, D, G, 1.0, da, 0, G, w_ih, 0, D, 0.0, dx, 0, D)
        dw_ih = xp.empty((G, D), dtype=dtype)
        rt.gemm(True, False, G, D, TN, 1.0, da, 0, G, x, 0, D, 0.0, dw_ih, 0, D)
        dw_hh = xp.empty((G, P), dtype=dtype)
        rt.gemm(True, False, G, P, TN, 1.0, dha, 0, G, hs, 0, P, 0.0, dw_hh, 0, P)
        dw_hr = None
        if projected:
            # dW_hr = sum_t dh_step_t^T r_t: dhs[1..T] against the saved r.
            dw_hr = xp.empty((P, H), dtype=dtype)
            rt.gemm(True, False, P, H, TN, 1.0, dhs, NP, P, out, 0, H, 0.0, dw_hr, 0, H)
    return dx, dh0, dc if cell.cell_state else None, dw_ih, dw_hh, da, dha, dw_hr


# ------------------------------------------------------------------------------------------------
# the backend interface (fastrnn/backends/base.py)
# ------------------------------------------------------------------------------------------------

_LSTM, _GRU, _RNN = CELLS["lstm"], CELLS["gru"], CELLS["rnn"]


def lstm_forward(x, h0, c0, w_ih, w_hh, b, lengths, training, w_hr=None):
    """x (T,N,D); h0 (N,P); c0 (N,H); w_ih (4H,D); w_hh (4H,P); b (4H,); w_hr None or (P,H)
    (P = H without it) -> y (T,N,P), hT (N,P), cT (N,H), ctx."""
    mode = MODE_PLAIN if w_hr is None else LSTM_PROJECTED
    return forward(_LSTM, x, h0, c0, w_ih, w_hh, b, b, w_hr, lengths, training, mode)


def lstm_backward(ctx, dy, dhT, dcT):
    """-> dx (T,N,D), dh0 (N,P), dc0 (N,H), dw_ih (4H,D), dw_hh (4H,P), db (4H,), and dw_hr
    (P,H) as a seventh element exactly when the forward had w_hr."""
    dx, dh0, dc0, dw_ih, dw_hh, da, _, dw_hr = backward(_LSTM, ctx, dy, dhT, dcT)
    T, N, G = da.shape
    grads = (dx, dh0, dc0, dw_ih, dw_hh, _colsum(runtime(), da, T * N, G))
    return grads if dw_hr is None else (*grads, dw_hr)


def gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, training):
    """x (T,N,D); h0 (N,H); w_ih (3H,D); w_hh (3H,H); b_ih, b_hh (3H,) -> y, hT, ctx."""
    y, hT, _, ctx = forward(_GRU, x, h0, None, w_ih, w_hh, b_ih, b_hh, None, lengths, training,
                            MODE_PLAIN)  # fmt: skip
    return y, hT, ctx


def gru_backward(ctx, dy, dhT):
    """-> dx (T,N,D), dh0 (N,H), dw_ih (3H,D), dw_hh (3H,H), db_ih (3H,), db_hh (3H,)."""
    dx, dh0, _, dw_ih, dw_hh, dxw, dhw, _ = backward(_GRU, ctx, dy, dhT, None)
    rt, (T, N, G) = runtime(), dxw.shape
    return dx, dh0, dw_ih, dw_hh, _colsum(rt, dxw, T * N, G), _colsum(rt, dhw, T * N, G)


def rnn_forward(x, h0, w_ih, w_hh, b, nonlinearity, lengths, training):
    """x (T,N,D); h0 (N,H); w_ih (H,D); w_hh (H,H); b (H,); "tanh" or "relu" -> y, hT, ctx."""
    mode = RNN_RELU if nonlinearity == "relu" else MODE_PLAIN
    y, hT, _, ctx = forward(_RNN, x, h0, None, w_ih, w_hh, b, b, None, lengths, training, mode)
    return y, hT, ctx


def rnn_backward(ctx, dy, dhT):
    """-> dx (T,N,D), dh0 (N,H), dw_ih (H,D), dw_hh (H,H), db (H,)."""
    dx, dh0, _, dw_ih, dw_hh, da, _, _ = backward(_RNN, ctx, dy, dhT, None)
    T, N, G = da.shape
    return dx, dh0, dw_ih, dw_hh, _colsum(runtime(), da, T * N, G)
