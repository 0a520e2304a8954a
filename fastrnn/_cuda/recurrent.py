"""CUDA drivers of the recurrent ops: LSTM, GRU, Elman RNN (the backend interface's signatures).

The same algorithm as the CPU kernels (DESIGN.md, "Performance model"):

* forward: one GEMM for the input projection of all T steps, then per step one recurrent GEMM
  (accumulated straight into that step's slice of the projection where the op allows) and one
  fused pointwise kernel (csrc/lstm.cu, gru.cu, rnn.cu);
* backward: per step one fused pointwise kernel and one GEMM for the gradient of the previous
  hidden state, then the weight, bias and input gradients as whole-sequence GEMMs (the bias
  gradient is ``ones @ dA``, a GEMM too: no atomics anywhere, so results are bitwise
  reproducible run to run on the same GPU and CuPy/CUDA versions).

Opt-in (``FASTRNN_CUDA_FUSED_MAX_N``, off by default: measured slower, see below), small batches
run the ``*_fused`` step kernels instead: the recurrent GEMM of a step is summed inside its
pointwise kernel, so a step is one launch (backward folds step t+1's dh GEMM into step t's kernel
and ends with one GEMM for step 0). The time loops
go through ``Runtime.run_loop``: their calls are bound once per key and, with CUDA graphs on (the
default), replayed as one graph from the third call with the same arrays on.

Everything is enqueued on CuPy's current stream, on the device of the inputs; ``lengths`` goes to
the device once per call and the time loop never waits for the GPU. The arrays arrive validated
and C-contiguous (fastrnn/backends/ops.py). Kernel and step numbers refer to
fastrnn/reference/{lstm,gru,rnn}.py.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from fastrnn._cuda._runtime import runtime
from fastrnn.context import Context

# Small batches take the fused step kernels (*_fused in csrc/): the recurrent GEMM of a step is
# done inside its pointwise kernel, one thread per (n, j) summing over H (forward, with W_hh
# transposed so the reads coalesce) or over the gates (backward, the previous step's dh GEMM), so
# a step is one launch instead of a cuBLAS call and a launch. Measured on an H100
# (benchmarks/gpu_steps.py, graphs on): 39 us of GPU time per LSTM step at (N, H) = (1, 128) and
# 79 us at (8, 256), against 4.5 and 7.6 us for a cuBLAS GEMM plus the pointwise kernel: one
# thread per output summing serially over H leaves the GPU idle. So they are off by default;
# FASTRNN_CUDA_FUSED_MAX_N=8 turns them on for batches up to 8.
FUSED_MAX_N = int(os.environ.get("FASTRNN_CUDA_FUSED_MAX_N", "0"))
FUSED_MAX_H = int(os.environ.get("FASTRNN_CUDA_FUSED_MAX_H", "512"))
# Threads per block of the fused kernels: small blocks spread a step over many SMs (each block
# reads its own columns of W_hh, from L2).
FUSED_BLOCK = 32


def _fused(T: int, N: int, H: int) -> bool:
    return T > 0 and 0 < N <= FUSED_MAX_N and 0 < H <= FUSED_MAX_H


def _transposed(xp: Any, w: Any) -> Any:
    """A C-contiguous copy of w.T (allocated like every other buffer of the call)."""
    out = xp.empty((w.shape[1], w.shape[0]), dtype=w.dtype)
    out[...] = w.T
    return out


def _lengths(rt: Any, lengths: np.ndarray | None, T: int, N: int) -> Any:
    """Device int64 (N,) lengths; every sequence runs T steps when ``lengths`` is None."""
    if lengths is None:
        return rt.xp.full((N,), T, dtype=np.int64)
    return rt.to_device(np.ascontiguousarray(lengths, dtype=np.int64))


def _slots(training: bool, t: int) -> tuple[int, int]:
    """State slots read and written by step t: all T+1 states are kept for backward when
    training, two ping-pong slots otherwise."""
    return (t, t + 1) if training else (t & 1, (t + 1) & 1)


def _state(xp: Any, a: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """A fresh, writable copy of an upstream gradient (zeros when it is None)."""
    if a is None:
        return xp.zeros(shape, dtype=dtype)
    out = xp.empty(shape, dtype=dtype)
    out[...] = a
    return out


def _colsum(rt: Any, a: Any, rows: int, cols: int) -> Any:
    """Column sums of a row-major (rows, cols) array as ``ones(rows) @ a`` (one deterministic
    GEMM)."""
    xp = rt.xp
    out = xp.empty((cols,), dtype=a.dtype)
    ones = xp.ones((rows,), dtype=a.dtype)
    rt.gemm(False, False, 1, cols, rows, 1.0, ones, 0, rows, a, 0, cols, 0.0, out, 0, cols)
    return out


def _forward_loop(rt: Any, key: tuple, T: int, NH: int, training: bool, gemm: Any, pointwise: Any,
                  out_stride: int) -> None:  # fmt: skip
    """Steps 0..T-1: the recurrent GEMM reads state slot src and accumulates into the step's
    output (element offset t * out_stride), then the pointwise kernel runs step t (a fused
    kernel alone when ``gemm`` is None). The calls are bound once (the runtime may keep them,
    or a CUDA graph of them, for the next call with the same key)."""

    def calls() -> list:
        out = []
        for t in range(T):
            src, dst = _slots(training, t)
            if gemm is not None:
                out.append(gemm.bind(src * NH, 0, t * out_stride))
            out.append(pointwise.bind(t, src, dst))
        return out

    rt.run_loop(key, [s for s in (gemm, pointwise) if s is not None], calls)


def _backward_loop(rt: Any, key: tuple, T: int, pointwise: list[Any], gemm: list[Any],
                   grad_stride: int) -> int:  # fmt: skip
    """Steps T-1..0: the pointwise kernel of step t, then the GEMM of the step's gradient (at
    element offset t * grad_stride) into the other dh buffer; the two buffers alternate
    (parity p reads dh[p] and writes dh[1-p]). Returns the index of the buffer holding dh0."""

    def calls() -> list:
        out = []
        for k, t in enumerate(reversed(range(T))):
            p = k & 1
            out.append(pointwise[p].bind(t))
            out.append(gemm[p].bind(t * grad_stride, 0, 0))
        return out

    rt.run_loop(key, [*pointwise, *gemm], calls)
    return T & 1


def _backward_loop_fused(rt: Any, key: tuple, T: int, pointwise: list[Any], final: Any) -> int:
    """Steps T-1..0 of the fused kernels (each adds the previous step's dh GEMM itself), then
    ``final``, the GEMM of step 0's gradient into the buffer step 0 wrote (dh[T & 1], its
    index returned)."""

    def calls() -> list:
        out = [pointwise[k & 1].bind(t) for k, t in enumerate(reversed(range(T)))]
        out.append(final.bind(0, 0, 0))
        return out

    rt.run_loop(key, [*pointwise, final], calls)
    return T & 1


def _weight_grads(
    rt: Any, dA: Any, dB: Any, x: Any, hs: Any, w_ih: Any, T: int, N: int, D: int, H: int, G: int
) -> tuple[Any, Any, Any]:
    """dx = dA @ W_ih, dW_ih = dA^T @ x, dW_hh = dB^T @ h_{0..T-1} for the (T*N, G) gradients
    dA of the input projection and dB of the recurrent one (the same array except in the GRU).
    """
    xp, dtype, TN = rt.xp, x.dtype, T * N
    dx = xp.empty((T, N, D), dtype=dtype)
    rt.gemm(False, False, TN, D, G, 1.0, dA, 0, G, w_ih, 0, D, 0.0, dx, 0, D)
    dw_ih = xp.empty((G, D), dtype=dtype)
    rt.gemm(True, False, G, D, TN, 1.0, dA, 0, G, x, 0, D, 0.0, dw_ih, 0, D)
    dw_hh = xp.empty((G, H), dtype=dtype)
    # hs holds T+1 states; its first T slots (the states before each step) are one (T*N, H)
    # matrix.
    rt.gemm(True, False, G, H, TN, 1.0, dB, 0, G, hs, 0, H, 0.0, dw_hh, 0, H)
    return dx, dw_ih, dw_hh


# ------------------------------------------------------------------------------------------------
# LSTM
# ------------------------------------------------------------------------------------------------


def lstm_forward(x, h0, c0, w_ih, w_hh, b, lengths, training):
    """x (T,N,D); h0, c0 (N,H); w_ih (4H,D); w_hh (4H,H); b (4H,) -> y, hT, cT, ctx."""
    rt = runtime()
    xp = rt.xp
    T, N, D = x.shape
    H = w_hh.shape[1]
    G = 4 * H
    NH = N * H
    dtype = x.dtype
    with rt.device_of(x):
        lens = _lengths(rt, lengths, T, N)
        # L1: x_t W_ih^T for all T steps, one GEMM (the bias is added by the kernel).
        pre = xp.empty((T, N, G), dtype=dtype)
        rt.gemm(False, True, T * N, G, D, 1.0, x, 0, D, w_ih, 0, D, 0.0, pre, 0, G)
        S = T + 1 if training else 2
        hs = xp.empty((S, N, H), dtype=dtype)
        cs = xp.empty((S, N, H), dtype=dtype)
        hs[0] = h0
        cs[0] = c0
        y = xp.empty((T, N, H), dtype=dtype)
        fused = _fused(T, N, H)
        if fused:  # L2 inside the kernel
            recurrent_gemm = None
            pointwise = rt.loop_launch(
                "lstm_forward_fused", dtype, NH,
                (pre, _transposed(xp, w_hh), b, hs, cs, y, lens, 0, 0, 0, N, H,
                 int(training)), ("t", "src", "dst"), block=FUSED_BLOCK,
            )  # fmt: skip
        else:
            # L2: pre[t] += h_{t-1} W_hh^T, accumulated in place.
            recurrent_gemm = rt.loop_gemm(False, True, N, G, H, 1.0, hs, H, w_hh, H, 1.0, pre, G)
            # L3-L5 (pre[t] becomes the activations i, f, g, o when training).
            pointwise = rt.loop_launch(
                "lstm_forward_step", dtype, NH,
                (pre, b, hs, cs, y, lens, 0, 0, 0, N, H, int(training)), ("t", "src", "dst"),
            )  # fmt: skip
        _forward_loop(rt, ("lstm", T, N, H, training, fused), T, NH, training, recurrent_gemm,
                      pointwise, N * G)  # fmt: skip
        last = _slots(training, T - 1)[1]
        hT = hs[last].copy()
        cT = cs[last].copy()
    ctx = None
    if training:
        ctx = Context(
            op="lstm",
            backend="cuda",
            dtype=dtype,
            cupy=True,
            grad_shapes={"dy": (T, N, H), "dhT": (N, H), "dcT": (N, H)},
            saved=dict(x=x, w_ih=w_ih, w_hh=w_hh, hs=hs, cs=cs, acts=pre, lengths=lens),
        )
    return y, hT, cT, ctx


def lstm_backward(ctx, dy, dhT, dcT):
    """-> dx (T,N,D), dh0 (N,H), dc0 (N,H), dw_ih (4H,D), dw_hh (4H,H), db (4H,)."""
    rt = runtime()
    xp = rt.xp
    s = ctx.saved
    x, w_ih, w_hh, hs, cs, acts, lens = (
        s["x"],
        s["w_ih"],
        s["w_hh"],
        s["hs"],
        s["cs"],
        s["acts"],
        s["lengths"],
    )
    T, N, D = x.shape
    H = w_hh.shape[1]
    G = 4 * H
    NH = N * H
    dtype = x.dtype
    with rt.device_of(x):
        da = xp.empty((T, N, G), dtype=dtype)
        dh_cur = _state(xp, dhT, (N, H), dtype)
        dh_next = xp.empty((N, H), dtype=dtype)
        dc = _state(xp, dcT, (N, H), dtype)
        # The two dh buffers alternate: a step reads one and writes the other.
        dh = (dh_cur, dh_next)
        # LB4: dh_{t-1} = da_t W_hh (+ the pass-through the kernel left in dh_next).
        recurrent_gemm = [
            rt.loop_gemm(False, False, N, H, G, 1.0, da, G, w_hh, H, 1.0, dh[1 - p], H)
            for p in (0, 1)
        ]
        if _fused(T, N, H):  # step t's kernel adds da_{t+1} W_hh itself
            pointwise = [
                rt.loop_launch(
                    "lstm_backward_fused",
                    dtype,
                    NH,
                    (acts, cs, dy, da, w_hh, dh[p], dh[1 - p], dc, lens, 0, T, N, H),
                    ("t",),
                    block=FUSED_BLOCK,
                )  # fmt: skip
                for p in (0, 1)
            ]
            final = recurrent_gemm[1 - (T & 1)]  # into dh[T & 1], where step 0 wrote
            i = _backward_loop_fused(rt, ("lstm-bf", T, N, H), T, pointwise, final)
        else:
            # LB1-LB4 except the GEMM; dc is updated in place.
            pointwise = [
                rt.loop_launch(
                    "lstm_backward_step",
                    dtype,
                    NH,
                    (acts, cs, dy, da, dh[p], dh[1 - p], dc, lens, 0, N, H),
                    ("t",),
                )  # fmt: skip
                for p in (0, 1)
            ]
            i = _backward_loop(rt, ("lstm-b", T, N, H), T, pointwise, recurrent_gemm, N * G)
        dh_cur = dh[i]
        # LB5: whole-sequence GEMMs.
        dx, dw_ih, dw_hh = _weight_grads(rt, da, da, x, hs, w_ih, T, N, D, H, G)
        db = _colsum(rt, da, T * N, G)
    return dx, dh_cur, dc, dw_ih, dw_hh, db


# ------------------------------------------------------------------------------------------------
# GRU
# ------------------------------------------------------------------------------------------------


def gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, training):
    """x (T,N,D); h0 (N,H); w_ih (3H,D); w_hh (3H,H); b_ih, b_hh (3H,) -> y, hT, ctx."""
    rt = runtime()
    xp = rt.xp
    T, N, D = x.shape
    H = w_hh.shape[1]
    G = 3 * H
    NH = N * H
    dtype = x.dtype
    with rt.device_of(x):
        lens = _lengths(rt, lengths, T, N)
        # G1: x_t W_ih^T for all T steps (b_ih is added by the kernel).
        xw = xp.empty((T, N, G), dtype=dtype)
        rt.gemm(False, True, T * N, G, D, 1.0, x, 0, D, w_ih, 0, D, 0.0, xw, 0, G)
        S = T + 1 if training else 2
        hs = xp.empty((S, N, H), dtype=dtype)
        hs[0] = h0
        y = xp.empty((T, N, H), dtype=dtype)
        hw = xp.empty((N, G), dtype=dtype)
        # r, z, n, hn per step for backward; without training the kernel never writes it.
        acts = xp.empty((T, N, 4 * H), dtype=dtype) if training else hw
        fused = _fused(T, N, H)
        if fused:  # G2 inside the kernel
            recurrent_gemm = None
            pointwise = rt.loop_launch(
                "gru_forward_fused", dtype, NH,
                (xw, _transposed(xp, w_hh), b_ih, b_hh, hs, y, acts, lens, 0, 0, 0, N, H,
                 int(training)), ("t", "src", "dst"), block=FUSED_BLOCK,
            )  # fmt: skip
        else:
            # G2: hw = h_{t-1} W_hh^T (kept apart from xw: n needs r * (W_hn h + b_hn)).
            recurrent_gemm = rt.loop_gemm(False, True, N, G, H, 1.0, hs, H, w_hh, H, 0.0, hw, G)
            # G3-G5.
            pointwise = rt.loop_launch(
                "gru_forward_step", dtype, NH,
                (xw, hw, b_ih, b_hh, hs, y, acts, lens, 0, 0, 0, N, H, int(training)),
                ("t", "src", "dst"),
            )  # fmt: skip
        _forward_loop(rt, ("gru", T, N, H, training, fused), T, NH, training, recurrent_gemm,
                      pointwise, 0)  # fmt: skip
        hT = hs[_slots(training, T - 1)[1]].copy()
    ctx = None
    if training:
        ctx = Context(
            op="gru",
            backend="cuda",
            dtype=dtype,
            cupy=True,
            grad_shapes={"dy": (T, N, H), "dhT": (N, H)},
            saved=dict(x=x, w_ih=w_ih, w_hh=w_hh, hs=hs, acts=acts, lengths=lens),
        )
    return y, hT, ctx


def gru_backward(ctx, dy, dhT):
    """-> dx (T,N,D), dh0 (N,H), dw_ih (3H,D), dw_hh (3H,H), db_ih (3H,), db_hh (3H,)."""
    rt = runtime()
    xp = rt.xp
    s = ctx.saved
    x, w_ih, w_hh, hs, acts, lens = (s["x"], s["w_ih"], s["w_hh"], s["hs"], s["acts"], s["lengths"])
    T, N, D = x.shape
    H = w_hh.shape[1]
    G = 3 * H
    NH = N * H
    dtype = x.dtype
    with rt.device_of(x):
        dxw = xp.empty((T, N, G), dtype=dtype)
        dhw = xp.empty((T, N, G), dtype=dtype)
        dh_cur = _state(xp, dhT, (N, H), dtype)
        dh_next = xp.empty((N, H), dtype=dtype)
        dh = (dh_cur, dh_next)  # alternate: a step reads one and writes the other
        # GB4: dh_{t-1} = dh_step * z (left by the kernel) + dhw_t W_hh.
        recurrent_gemm = [
            rt.loop_gemm(False, False, N, H, G, 1.0, dhw, G, w_hh, H, 1.0, dh[1 - p], H)
            for p in (0, 1)
        ]
        if _fused(T, N, H):  # step t's kernel adds dhw_{t+1} W_hh itself
            pointwise = [
                rt.loop_launch(
                    "gru_backward_fused",
                    dtype,
                    NH,
                    (acts, hs, dy, dxw, dhw, w_hh, dh[p], dh[1 - p], lens, 0, T, N, H),
                    ("t",),
                    block=FUSED_BLOCK,
                )  # fmt: skip
                for p in (0, 1)
            ]
            final = recurrent_gemm[1 - (T & 1)]  # into dh[T & 1], where step 0 wrote
            i = _backward_loop_fused(rt, ("gru-bf", T, N, H), T, pointwise, final)
        else:
            # GB1-GB4 except the GEMM.
            pointwise = [
                rt.loop_launch(
                    "gru_backward_step",
                    dtype,
                    NH,
                    (acts, hs, dy, dxw, dhw, dh[p], dh[1 - p], lens, 0, N, H),
                    ("t",),
                )  # fmt: skip
                for p in (0, 1)
            ]
            i = _backward_loop(rt, ("gru-b", T, N, H), T, pointwise, recurrent_gemm, N * G)
        dh_cur = dh[i]
        # GB5: whole-sequence GEMMs.
        dx, dw_ih, dw_hh = _weight_grads(rt, dxw, dhw, x, hs, w_ih, T, N, D, H, G)
        db_ih = _colsum(rt, dxw, T * N, G)
        db_hh = _colsum(rt, dhw, T * N, G)
    return dx, dh_cur, dw_ih, dw_hh, db_ih, db_hh


# ------------------------------------------------------------------------------------------------
# Elman RNN
# ------------------------------------------------------------------------------------------------


def rnn_forward(x, h0, w_ih, w_hh, b, nonlinearity, lengths, training):
    """x (T,N,D); h0 (N,H); w_ih (H,D); w_hh (H,H); b (H,); "tanh" or "relu" -> y, hT, ctx."""
    rt = runtime()
    xp = rt.xp
    T, N, D = x.shape
    H = w_hh.shape[1]
    NH = N * H
    dtype = x.dtype
    relu = int(nonlinearity == "relu")
    with rt.device_of(x):
        lens = _lengths(rt, lengths, T, N)
        # R1: x_t W_ih^T for all T steps (the bias is added by the kernel).
        pre = xp.empty((T, N, H), dtype=dtype)
        rt.gemm(False, True, T * N, H, D, 1.0, x, 0, D, w_ih, 0, D, 0.0, pre, 0, H)
        S = T + 1 if training else 2
        hs = xp.empty((S, N, H), dtype=dtype)
        hs[0] = h0
        y = xp.empty((T, N, H), dtype=dtype)
        fused = _fused(T, N, H)
        if fused:  # R2 inside the kernel
            recurrent_gemm = None
            pointwise = rt.loop_launch(
                "rnn_forward_fused", dtype, NH,
                (pre, _transposed(xp, w_hh), b, hs, y, lens, 0, 0, 0, N, H, relu),
                ("t", "src", "dst"), block=FUSED_BLOCK,
            )  # fmt: skip
        else:
            # R2: pre[t] += h_{t-1} W_hh^T, accumulated in place.
            recurrent_gemm = rt.loop_gemm(False, True, N, H, H, 1.0, hs, H, w_hh, H, 1.0, pre, H)
            # R3-R4.
            pointwise = rt.loop_launch(
                "rnn_forward_step", dtype, NH,
                (pre, b, hs, y, lens, 0, 0, 0, N, H, relu), ("t", "src", "dst"),
            )  # fmt: skip
        _forward_loop(rt, ("rnn", T, N, H, training, fused), T, NH, training, recurrent_gemm,
                      pointwise, NH)  # fmt: skip
        hT = hs[_slots(training, T - 1)[1]].copy()
    ctx = None
    if training:
        ctx = Context(
            op="rnn",
            backend="cuda",
            dtype=dtype,
            cupy=True,
            grad_shapes={"dy": (T, N, H), "dhT": (N, H)},
            saved=dict(x=x, w_ih=w_ih, w_hh=w_hh, hs=hs, lengths=lens, relu=relu),
        )
    return y, hT, ctx


def rnn_backward(ctx, dy, dhT):
    """-> dx (T,N,D), dh0 (N,H), dw_ih (H,D), dw_hh (H,H), db (H,)."""
    rt = runtime()
    xp = rt.xp
    s = ctx.saved
    x, w_ih, w_hh, hs, lens, relu = (s["x"], s["w_ih"], s["w_hh"], s["hs"], s["lengths"], s["relu"])
    T, N, D = x.shape
    H = w_hh.shape[1]
    NH = N * H
    dtype = x.dtype
    with rt.device_of(x):
        da = xp.empty((T, N, H), dtype=dtype)
        dh_cur = _state(xp, dhT, (N, H), dtype)
        dh_next = xp.empty((N, H), dtype=dtype)
        dh = (dh_cur, dh_next)  # alternate: a step reads one and writes the other
        # RB3: dh_{t-1} = da_t W_hh (+ the pass-through the kernel left in dh_next).
        recurrent_gemm = [
            rt.loop_gemm(False, False, N, H, H, 1.0, da, H, w_hh, H, 1.0, dh[1 - p], H)
            for p in (0, 1)
        ]
        if _fused(T, N, H):  # step t's kernel adds da_{t+1} W_hh itself
            pointwise = [
                rt.loop_launch(
                    "rnn_backward_fused",
                    dtype,
                    NH,
                    (hs, dy, da, w_hh, dh[p], dh[1 - p], lens, 0, T, N, H, relu),
                    ("t",),
                    block=FUSED_BLOCK,
                )  # fmt: skip
                for p in (0, 1)
            ]
            final = recurrent_gemm[1 - (T & 1)]  # into dh[T & 1], where step 0 wrote
            i = _backward_loop_fused(rt, ("rnn-bf", T, N, H), T, pointwise, final)
        else:
            # RB1-RB3 except the GEMM.
            pointwise = [
                rt.loop_launch(
                    "rnn_backward_step",
                    dtype,
                    NH,
                    (hs, dy, da, dh[p], dh[1 - p], lens, 0, N, H, relu),
                    ("t",),
                )  # fmt: skip
                for p in (0, 1)
            ]
            i = _backward_loop(rt, ("rnn-b", T, N, H), T, pointwise, recurrent_gemm, NH)
        dh_cur = dh[i]
        # RB4: whole-sequence GEMMs.
        dx, dw_ih, dw_hh = _weight_grads(rt, da, da, x, hs, w_ih, T, N, D, H, H)
        db = _colsum(rt, da, T * N, H)
    return dx, dh_cur, dw_ih, dw_hh, db
