"""Prepared recurrent layers: weights validated and packed once, a step that costs microseconds.

::

    run = fastrnn.lstm_inference(w_ih, w_hh, b, w_hr=None)   # validated and copied once
    h, c = run.step(x_t, h, c, out=None)       # x_t (N, D) -> (N, H|P), (N, H)
    y, hT, cT = run(x, h0, c0, lengths=None)   # a whole sequence, nothing saved for backward
    run.update(w_ih, w_hh, b)                  # after the weights changed

    run = fastrnn.gru_inference(w_ih, w_hh, b_ih, b_hh)            # step(x_t, h) -> h
    run = fastrnn.rnn_inference(w_ih, w_hh, b, nonlinearity="tanh")  # step(x_t, h) -> h

The object keeps its own copy of the weights: changing the caller's arrays afterwards has no
effect until ``update``. Per-call arrays must have the prepared dtype, the prepared sizes and
C order (a clear ``TypeError``/``ValueError`` otherwise, no copies behind the caller's back);
``out=`` writes into the caller's buffers (the state arrays themselves may be passed, to step
in place). NumPy weights make a CPU object whose ``step`` is one call into the extension
(fastrnn/_cpu/inference.pyx); CuPy weights make a GPU object whose step is the CUDA kernels'
forward over one time step. A whole sequence runs the training kernels' forward with
``training=False``.
"""

from __future__ import annotations

from typing import Any

from fastrnn.backends import ops
from fastrnn.backends.validation import check_arrays, check_ndim, check_shape

__all__ = ["lstm_inference", "gru_inference", "rnn_inference"]


def _sizes(w_ih: Any, w_hh: Any, G: int, state: int | None = None) -> tuple[int, int, int]:
    """(D, H, P) of validated weights: w_ih (G H, D), w_hh (G H, P) with P = state or H."""
    check_ndim("w_ih", w_ih, 2, f"({G}H, D)")
    check_ndim("w_hh", w_hh, 2, f"({G}H, H)")
    if w_hh.shape[0] % G or w_hh.shape[0] == 0:
        raise ValueError(f"w_hh: expected shape ({G}H, H) with H >= 1, got {w_hh.shape}")
    H = w_hh.shape[0] // G
    P = H if state is None else state
    check_shape("w_hh", w_hh, (G * H, P))
    D = w_ih.shape[1]
    if D < 1:
        raise ValueError(f"w_ih: expected at least one input feature, got shape {w_ih.shape}")
    check_shape("w_ih", w_ih, (G * H, D))
    return D, H, P


def _check_lstm(w_ih, w_hh, b, w_hr):
    is_cupy, _ = check_arrays(dict(w_ih=w_ih, w_hh=w_hh, b=b, w_hr=w_hr), allow_none=("w_hr",))
    P = None
    if w_hr is not None:
        check_ndim("w_hr", w_hr, 2, "(P, H)")
        check_ndim("w_hh", w_hh, 2, "(4H, P)")
        H, P = w_hh.shape[0] // 4, w_hr.shape[0]
        check_shape("w_hr", w_hr, (None, H))
        if not 1 <= P < H:
            raise ValueError(f"w_hr: expected 1..H-1 = 1..{H - 1} rows (P < H), got {P}")
    D, H, P = _sizes(w_ih, w_hh, 4, P)
    check_shape("b", b, (4 * H,))
    return is_cupy


def _check_gru(w_ih, w_hh, b_ih, b_hh):
    is_cupy, _ = check_arrays(dict(w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh))
    _, H, _ = _sizes(w_ih, w_hh, 3)
    check_shape("b_ih", b_ih, (3 * H,))
    check_shape("b_hh", b_hh, (3 * H,))
    return is_cupy


def _check_rnn(w_ih, w_hh, b):
    is_cupy, _ = check_arrays(dict(w_ih=w_ih, w_hh=w_hh, b=b))
    _, H, _ = _sizes(w_ih, w_hh, 1)
    check_shape("b", b, (H,))
    return is_cupy


def _nonlinearity(value: Any) -> str:
    if value not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------
# the whole-sequence call and update, shared by the CPU and GPU objects
# ------------------------------------------------------------------------------------------------


class _Methods:
    """What the CPU and GPU objects share: ``__call__`` (a whole sequence) and ``update``."""

    kind: str  # "lstm" | "gru" | "rnn"
    nonlinearity: str = "tanh"

    def _same(self, named: dict[str, Any]) -> None:
        """New weights must match the prepared ones in kind, dtype and shape."""
        current = dict(zip(("w_ih", "w_hh", "b", "b_hh", "w_hr"), self._weights(), strict=True))
        if self.kind == "gru":
            current["b_ih"] = current.pop("b")
        for name, a in named.items():
            want = current[name]
            if (a is None) != (want is None):
                raise ValueError(
                    f"{name}: the layer was prepared {'without' if want is None else 'with'} it"
                )
            if a is None:
                continue
            if a.shape != want.shape or a.dtype != want.dtype or type(a) is not type(want):
                raise ValueError(
                    f"{name}: expected a {type(want).__name__} of dtype {want.dtype} and shape "
                    f"{want.shape} (as prepared), got {type(a).__name__} "
                    f"{getattr(a, 'dtype', '')} {getattr(a, 'shape', '')}"
                )

    def update(self, w_ih, w_hh, b, b_hh=None, *, w_hr=None) -> None:
        """Copy new weights (same shapes and dtype) into the prepared layer. GRU:
        ``update(w_ih, w_hh, b_ih, b_hh)``; LSTM: ``update(w_ih, w_hh, b, w_hr=None)``."""
        if self.kind == "lstm":
            _check_lstm(w_ih, w_hh, b, w_hr)
            self._same(dict(w_ih=w_ih, w_hh=w_hh, b=b, w_hr=w_hr))
        elif self.kind == "gru":
            _check_gru(w_ih, w_hh, b, b_hh)
            self._same(dict(w_ih=w_ih, w_hh=w_hh, b_ih=b, b_hh=b_hh))
        else:
            _check_rnn(w_ih, w_hh, b)
            self._same(dict(w_ih=w_ih, w_hh=w_hh, b=b))
        self._copy_from(w_ih, w_hh, b, b_hh, w_hr)

    def __call__(self, x, h0, c0=None, *, lengths=None):
        """A whole sequence, nothing saved for backward: LSTM ``(y, hT, cT)``, GRU/RNN
        ``(y, hT)``."""
        return self._run_sequence(x, h0, c0, lengths)

    def _run_sequence(self, x, h0, c0, lengths):
        if self.kind == "lstm" and c0 is None:
            raise TypeError("c0: the LSTM needs the initial cell state c0")
        if self.kind != "lstm" and c0 is not None:
            raise TypeError("c0: only the LSTM has a cell state")
        small = getattr(self, "_sequence", None)  # the CPU's small-batch loop on the panels
        if small is not None:
            out = small(x, h0, c0, lengths)
            if out is not None:
                return out
        w_ih, w_hh, b, b_hh, w_hr = self._weights()
        if self.kind == "lstm":
            extra = {} if w_hr is None else {"w_hr": w_hr}
            y, hT, cT, _ = ops.lstm_forward(
                x, h0, c0, w_ih, w_hh, b, lengths=lengths, training=False, **extra
            )
            return y, hT, cT
        if c0 is not None:
            raise TypeError("c0: only the LSTM has a cell state")
        if self.kind == "gru":
            y, hT, _ = ops.gru_forward(x, h0, w_ih, w_hh, b, b_hh, lengths=lengths, training=False)
        else:
            y, hT, _ = ops.rnn_forward(
                x, h0, w_ih, w_hh, b, nonlinearity=self.nonlinearity, lengths=lengths,
                training=False,
            )
        return y, hT


def _cpu_class():
    from fastrnn._cpu.inference import PreparedCell

    class Prepared(_Methods, PreparedCell):
        def __repr__(self) -> str:
            return (
                f"<fastrnn {self.kind} inference on the CPU: input {self.input_size}, "
                f"hidden {self.hidden_size}, state {self.state_size}, {self.dtype}>"
            )

    return Prepared


_CPU: Any = None


def _cpu(cell: int, kind: str, w_ih, w_hh, b, b_hh, w_hr, nonlinearity="tanh"):
    global _CPU
    if _CPU is None:
        _CPU = _cpu_class()
    obj = _CPU(cell, w_ih, w_hh, b, b_hh, w_hr)
    obj.kind = kind
    obj.nonlinearity = nonlinearity
    return obj


class _GPUPrepared(_Methods):
    """The CuPy object: the same interface; a step is the CUDA forward over one time step."""

    def __init__(self, kind, w_ih, w_hh, b, b_hh, w_hr, nonlinearity="tanh"):
        import cupy

        self.kind, self.nonlinearity = kind, nonlinearity
        self._w = [None if a is None else cupy.array(a, order="C", copy=True)
                   for a in (w_ih, w_hh, b, b_hh, w_hr)]
        self.dtype = self._w[0].dtype
        self.input_size = self._w[0].shape[1]
        self.state_size = self._w[1].shape[1]
        self.hidden_size = self._w[1].shape[0] // {"lstm": 4, "gru": 3, "rnn": 1}[kind]

    def _weights(self):
        return tuple(self._w)

    def _copy_from(self, *new):
        for mine, a in zip(self._w, new, strict=True):
            if mine is not None:
                mine[...] = a

    def step(self, x_t, h, c=None, *, out=None):
        check_ndim("x_t", x_t, 2, "(N, D)")
        result = self._run_sequence(x_t[None], h, c, None)
        got = (result[1], result[2]) if self.kind == "lstm" else result[1]
        if out is None:
            return got
        targets = out if self.kind == "lstm" else (out,)
        values = got if self.kind == "lstm" else (got,)
        for name, target, value in zip(("out[0]", "out[1]"), targets, values, strict=False):
            if target.shape != value.shape or target.dtype != value.dtype:
                raise ValueError(f"{name}: expected shape {value.shape} and dtype {value.dtype}")
            target[...] = value
        return out


# ------------------------------------------------------------------------------------------------
# public constructors
# ------------------------------------------------------------------------------------------------


def lstm_inference(w_ih, w_hh, b, *, w_hr=None):
    """A prepared LSTM layer (gates i, f, g, o; ``b = b_ih + b_hh``; optional projection
    ``w_hr`` (P, H) with ``w_hh`` (4H, P)): ``step(x_t, h, c, out=None) -> (h, c)``,
    ``__call__(x, h0, c0, lengths=None) -> (y, hT, cT)``, ``update(w_ih, w_hh, b, w_hr=None)``."""
    if _check_lstm(w_ih, w_hh, b, w_hr):
        return _GPUPrepared("lstm", w_ih, w_hh, b, None, w_hr)
    from fastrnn._cpu.inference import LSTM

    return _cpu(LSTM, "lstm", w_ih, w_hh, b, None, w_hr)


def gru_inference(w_ih, w_hh, b_ih, b_hh):
    """A prepared GRU layer (gates r, z, n): ``step(x_t, h, out=None) -> h``,
    ``__call__(x, h0, lengths=None) -> (y, hT)``, ``update(w_ih, w_hh, b_ih, b_hh)``."""
    if _check_gru(w_ih, w_hh, b_ih, b_hh):
        return _GPUPrepared("gru", w_ih, w_hh, b_ih, b_hh, None)
    from fastrnn._cpu.inference import GRU

    return _cpu(GRU, "gru", w_ih, w_hh, b_ih, b_hh, None)


def rnn_inference(w_ih, w_hh, b, *, nonlinearity="tanh"):
    """A prepared Elman RNN layer: ``step(x_t, h, out=None) -> h``,
    ``__call__(x, h0, lengths=None) -> (y, hT)``, ``update(w_ih, w_hh, b)``."""
    nonlinearity = _nonlinearity(nonlinearity)
    if _check_rnn(w_ih, w_hh, b):
        return _GPUPrepared("rnn", w_ih, w_hh, b, None, None, nonlinearity)
    from fastrnn._cpu.inference import RNN_RELU, RNN_TANH

    cell = RNN_TANH if nonlinearity == "tanh" else RNN_RELU
    return _cpu(cell, "rnn", w_ih, w_hh, b, None, None, nonlinearity)

