"""LSTM, GRU and RNN layers over the fused sequence kernels (fastrnn.lstm_forward etc.).

torch.nn's constructor arguments, parameter names (``weight_ih_l0``, ``weight_hh_l0``,
``bias_ih_l0``, ``bias_hh_l0``, ``weight_hr_l0`` with ``proj_size``, ``..._reverse``), shapes
and initialisation U(-1/sqrt(H), 1/sqrt(H)), so a torch.nn state dict loads as it is. Both
biases are kept as parameters (as in PyTorch); the LSTM and RNN kernels take their sum.

Variable-length batches: ``forward(x, state, lengths=...)`` gives PyTorch's packed-sequence
results without packing. Outputs past each sequence's end are zero, the final states are those
after each sequence's last step, and the reverse direction of a bidirectional layer runs each
sequence backwards *within its own length* (its first step is the sequence's last valid element).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fastrnn.backends import backend_module, select
from fastrnn.backends.ops import (
    gru_backward,
    gru_forward,
    lstm_backward,
    lstm_forward,
    rnn_backward,
    rnn_forward,
)
from fastrnn.backends.validation import check_lengths, is_cupy_array
from fastrnn.nn import init
from fastrnn.nn._check import check_input, positive_int, probability
from fastrnn.nn._xp import array_module, grad_enabled, move
from fastrnn.nn.module import Module, Parameter

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


class _Reverser:
    """Reverses time (T, N, ...) for the backward direction: the whole axis without lengths,
    each sequence within its own length with them (padded steps stay where they are). The
    permutation is its own inverse."""

    def __init__(self, xp: Any, lengths: np.ndarray | None, T: int, N: int) -> None:
        self.index = None
        if lengths is not None:
            t = np.arange(T)[:, None]
            idx = np.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)
            self.index = move(idx, xp)
            self.cols = move(np.arange(N)[None, :], xp)

    def __call__(self, a: Any) -> Any:
        if self.index is None:
            return a[::-1]
        return a[self.index, self.cols]


def _with_batch_axis(state: Any) -> Any:
    """An unbatched state ((layers*dirs, H), or a pair of them) with a batch axis of 1."""
    if isinstance(state, (tuple, list)):
        return tuple(_with_batch_axis(s) for s in state)
    if getattr(state, "ndim", 0) == 2:
        return state[:, None, :]
    return state  # checked (and rejected) by _split_state


class _RNNBase(Module):
    mode = ""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        *,
        proj_size: int = 0,
        dtype: Any = np.float32,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.input_size = positive_int("input_size", input_size)
        self.hidden_size = positive_int("hidden_size", hidden_size)
        if not isinstance(proj_size, (int, np.integer)) or isinstance(proj_size, (bool, np.bool_)):
            raise TypeError(f"proj_size: expected an int, got {type(proj_size).__name__}")
        if proj_size < 0 or proj_size >= hidden_size:
            raise ValueError(
                f"proj_size: expected 0 (no projection) or 1..hidden_size-1 "
                f"({hidden_size - 1}), got {proj_size}"
            )
        if proj_size and self.mode != "LSTM":
            raise ValueError(f"proj_size: only an LSTM has projections, not {self.mode}")
        self.proj_size = int(proj_size)
        self.num_layers = positive_int("num_layers", num_layers)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = probability("dropout", dropout)
        self.bidirectional = bool(bidirectional)
        self.seed = seed
        self._rngs: dict[str, Any] = {}
        self._cache = None
        G, H = _GATES[self.mode], hidden_size
        P = self.state_size
        dirs = 2 if bidirectional else 1
        bound = 1.0 / math.sqrt(H)
        for layer in range(num_layers):
            in_size = input_size if layer == 0 else P * dirs
            for d in range(dirs):
                sfx = f"l{layer}" + ("_reverse" if d else "")
                shapes = {"weight_ih": (G * H, in_size), "weight_hh": (G * H, P)}
                if bias:
                    shapes.update(bias_ih=(G * H,), bias_hh=(G * H,))
                if self.proj_size:
                    shapes.update(weight_hr=(P, H))
                for kind, shape in shapes.items():
                    setattr(self, f"{kind}_{sfx}", Parameter(init.uniform(shape, bound, dtype)))

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def state_size(self) -> int:
        """Features of h: proj_size with a projection, else hidden_size."""
        return self.proj_size or self.hidden_size

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        return s

    def _weights(self, layer: int, d: int) -> tuple[Parameter, ...]:
        """w_ih, w_hh, b_ih, b_hh (None without bias), w_hr (None without projection)."""
        sfx = f"l{layer}" + ("_reverse" if d else "")
        p = self._parameters
        w_ih, w_hh = p[f"weight_ih_{sfx}"], p[f"weight_hh_{sfx}"]
        b_ih, b_hh = p.get(f"bias_ih_{sfx}"), p.get(f"bias_hh_{sfx}")
        return w_ih, w_hh, b_ih, b_hh, p.get(f"weight_hr_{sfx}")

    def _rng(self, xp: Any) -> Any:
        key = xp.__name__
        if key not in self._rngs:
            if xp is np:
                self._rngs[key] = np.random.default_rng(self.seed)
            else:  # pragma: no cover - needs a GPU
                self._rngs[key] = xp.random.RandomState(self.seed)
        return self._rngs[key]

    def _dropout_mask(self, xp: Any, shape: tuple[int, ...], dtype: Any) -> Any:
        rng = self._rng(xp)
        u = rng.random(shape, dtype=dtype) if xp is np else rng.random_sample(shape, dtype)
        keep = 1.0 - self.dropout
        if keep == 0.0:
            return xp.zeros(shape, dtype=dtype)
        return (u >= self.dropout).astype(dtype) / dtype.type(keep)

    # -- state checks ----------------------------------------------------------------------------

    def _check_state(self, name: str, a: Any, like: Any, shape: tuple[int, ...]) -> Any:
        check_input(type(self).__name__, name, a, like)
        if tuple(a.shape) != shape:
            raise ValueError(
                f"{type(self).__name__}: {name}: expected shape {shape}, got {a.shape}"
            )
        return a

    def _split_state(
        self, state: Any, like: Any, shape: tuple[int, ...], c_shape: tuple[int, ...] | None = None
    ) -> tuple[Any, Any]:
        """-> (h, c) arrays of ``shape`` (c: ``c_shape``, default ``shape``) or None (c always
        None unless LSTM)."""
        if state is None:
            return None, None
        if self.mode == "LSTM":
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise TypeError("LSTM: state: expected a pair (h, c) or None")
            h, c = state
            h = None if h is None else self._check_state("h", h, like, shape)
            c_shape = shape if c_shape is None else c_shape
            c = None if c is None else self._check_state("c", c, like, c_shape)
            return h, c
        return self._check_state("h", state, like, shape), None

    def stream(self, batch_size: int) -> Any:
        """A stateful stepper over this module's current weights (fastrnn/nn/stream.py):
        ``.step(x_t) -> y_t``, ``.state``, ``.reset()``, ``.refresh()``."""
        from fastrnn.nn.stream import Stream

        return Stream(self, batch_size)

    # -- forward ---------------------------------------------------------------------------------

    def forward(
        self, x: Any, state: Any = None, lengths: Any = None, *, embedding: Any = None
    ) -> Any:
        """Run all layers and directions.

        x : (T, N, input_size), or (N, T, input_size) when batch_first, or (T, input_size)
            unbatched; with ``embedding``, integer indices of shape (T, N), (N, T) or (T,)
        state : None (zeros), or h0 / (h0, c0) for LSTM, each (num_layers*dirs, N, H)
            ((num_layers*dirs, H) unbatched)
        lengths : None or integers of shape (N,), each in 1..T (PyTorch's packed sequences)
        embedding : None, or an ``nn.Embedding`` of ``input_size`` features whose indices ``x``
            holds: the same results as ``self(embedding(x), ...)``. On the CPU backend, when
            the table has fewer rows than ``x`` has indices, the lookup is folded into the first
            layer: its input projection becomes a row of ``embedding.weight W_ih^T`` per
            index, so that GEMM (and its two backward GEMMs) shrink to the table's rows.
            ``backward`` then accumulates ``embedding.weight.grad`` too and returns None as dx.

        Returns ``y, h_n`` (``y, (h_n, c_n)`` for LSTM); y is (T, N, dirs*P) (batch-first
        when ``batch_first``), h_n (num_layers*dirs, N, P), c_n (num_layers*dirs, N, H), where
        P = proj_size with a projection, else H.
        """
        name = type(self).__name__
        like = self.weight_ih_l0.data
        folded = looked_up = None
        if embedding is not None:
            x, folded, looked_up = self._embed(embedding, x, like)
        if folded is None:
            check_input(name, "x", x, like, (2, 3))
        xp = array_module(like)
        unbatched = x.ndim == (1 if folded is not None else 2)
        if unbatched:
            x = x[:, None]
        elif self.batch_first:
            x = x.swapaxes(0, 1)
        T, N = x.shape[:2]
        D = self.input_size if folded is not None else x.shape[2]
        if D != self.input_size:
            raise ValueError(f"{name}: x: expected {self.input_size} input features, got {D}")
        if T < 1:
            raise ValueError(f"{name}: x: expected at least one time step")
        if is_cupy_array(lengths):
            lengths = lengths.get()
        if unbatched and lengths is not None:
            lengths = np.asarray(lengths).reshape(-1)
        lengths = check_lengths(lengths, T, N)
        L, dirs, H, P = self.num_layers, self.num_directions, self.hidden_size, self.state_size
        if unbatched and state is not None:
            state = _with_batch_axis(state)
        h0, c0 = self._split_state(state, like, (L * dirs, N, P), (L * dirs, N, H))
        zeros = xp.zeros((N, H), dtype=like.dtype)
        zeros_h = zeros if P == H else xp.zeros((N, P), dtype=like.dtype)
        training = grad_enabled()
        reverse = _Reverser(xp, lengths, T, N) if dirs == 2 else None

        layer_in = x
        ctxs: list[list[Any]] = []
        masks: list[Any] = []
        h_n, c_n = [], []
        for layer in range(L):
            outs, lctx = [], []
            for d in range(dirs):
                k = layer * dirs + d
                xin = layer_in if d == 0 else reverse(layer_in)
                hk = zeros_h if h0 is None else h0[k]
                y, hT, cT, ctx = self._run(
                    xp,
                    xin,
                    hk,
                    None if c0 is None else c0[k],
                    zeros,
                    layer,
                    d,
                    lengths,
                    training,
                    folded if layer == 0 else None,
                )
                outs.append(y if d == 0 else reverse(y))
                lctx.append(ctx)
                h_n.append(hT)
                c_n.append(cT)
            y = outs[0] if dirs == 1 else xp.concatenate(outs, axis=2)
            mask = None
            if layer < L - 1 and self.dropout > 0 and self.training:
                mask = self._dropout_mask(xp, y.shape, y.dtype)
                y = y * mask
            masks.append(mask)
            ctxs.append(lctx)
            layer_in = y

        self._cache = (
            dict(
                ctxs=ctxs,
                masks=masks,
                reverse=reverse,
                shape=(T, N, D),
                unbatched=unbatched,
                folded=folded,
                looked_up=looked_up,
            )
            if training
            else None
        )
        y = layer_in
        h_n = xp.stack(h_n)
        if unbatched:
            y, h_n = y[:, 0, :], h_n[:, 0, :]
        elif self.batch_first:
            y = xp.ascontiguousarray(y.transpose(1, 0, 2))
        if self.mode == "LSTM":
            c_n = xp.stack(c_n)
            return y, (h_n, c_n[:, 0, :] if unbatched else c_n)
        return y, h_n

    def _embed(self, embedding: Any, ids: Any, like: Any) -> tuple[Any, Any, Any]:
        """forward's ``embedding``: checked -> (x, folded, looked_up): the indices and the
        module when the CPU backend folds the lookup into the first layer, else the looked-up
        vectors and the module (whose own backward then runs)."""
        from fastrnn.nn.linear import Embedding

        name = type(self).__name__
        if not isinstance(embedding, Embedding):
            raise TypeError(
                f"{name}: embedding: expected a fastrnn.nn.Embedding, got "
                f"{type(embedding).__name__}"
            )
        if embedding.embedding_dim != self.input_size:
            raise ValueError(
                f"{name}: embedding: expected {self.input_size} features (input_size), got "
                f"{embedding.embedding_dim}"
            )
        table = embedding.weight.data
        if table.dtype != like.dtype or array_module(table) is not array_module(like):
            raise TypeError(
                f"{name}: embedding: its weight ({type(table).__name__} {table.dtype}) must "
                f"match the layer's ({type(like).__name__} {like.dtype})"
            )
        ids = embedding.check_indices(ids)
        if ids.ndim not in (1, 2):
            raise ValueError(f"{name}: x: expected indices of 1 or 2 dimensions, got {ids.ndim}")
        if (
            isinstance(ids, np.ndarray)
            and select(False) == "cpu"
            and ids.size > embedding.num_embeddings
        ):
            return ids, embedding, None
        return embedding(ids), None, embedding

    def _run(self, xp, x, h0, c0, zeros, layer, d, lengths, training, folded=None):
        """One layer and direction -> y, hT, cT (None unless LSTM), ctx. ``folded``: an
        Embedding whose indices x holds (layer 0 on the CPU backend): the engine looks the input
        projection up (fastrnn/_cpu/recurrent.pyx)."""
        w_ih, w_hh, b_ih, b_hh, w_hr = self._weights(layer, d)
        G, H = _GATES[self.mode], self.hidden_size
        zb = xp.zeros(G * H, w_ih.data.dtype) if b_ih is None else None  # bias=False
        if self.mode == "GRU":  # the GRU keeps its two biases apart; the others take the sum
            op, fn = "gru", gru_forward
            args = (h0, w_ih.data, w_hh.data)
            args += (zb if b_ih is None else b_ih.data, zb if b_hh is None else b_hh.data)
        else:
            b = zb if b_ih is None else b_ih.data + b_hh.data
            if self.mode == "LSTM":
                op, fn = "lstm", lstm_forward
                args = (h0, zeros if c0 is None else c0, w_ih.data, w_hh.data, b)
            else:
                op, fn = "rnn", rnn_forward
                args = (h0, w_ih.data, w_hh.data, b)
        kw: dict[str, Any] = {}
        if op == "rnn":
            kw["nonlinearity"] = "tanh" if self.mode == "RNN_TANH" else "relu"
        kw.update(lengths=lengths, training=training)
        if op == "lstm":
            kw["w_hr"] = None if w_hr is None else w_hr.data
        if folded is not None:
            out = backend_module("cpu").lookup_forward(op, x, folded.weight.data, *args, **kw)
        else:
            out = fn(x, *args, **kw)
        return out if op == "lstm" else (out[0], out[1], None, out[2])

    # -- backward --------------------------------------------------------------------------------

    def backward(self, dy: Any, dstate: Any = None, *, return_state_grad: bool = False) -> Any:
        """Gradients of the last forward pass.

        dy : gradient of y (same shape as y), or None for zeros
        dstate : None, or the gradient of h_n (``(dh_n, dc_n)`` for LSTM, either may be None)
        return_state_grad : also return the gradient of the initial state

        Accumulates every parameter's ``.grad`` and returns dx (shaped like x), or
        ``(dx, dh0)`` / ``(dx, (dh0, dc0))`` with ``return_state_grad``. After a forward with
        ``embedding``, the embedding's weight gradient is accumulated too and dx is None.
        """
        cache = self._saved()
        name = type(self).__name__
        T, N, D = cache["shape"]
        L, dirs, H, P = self.num_layers, self.num_directions, self.hidden_size, self.state_size
        like = self.weight_ih_l0.data
        xp = array_module(like)
        unbatched = cache["unbatched"]
        if unbatched:
            out_shape: tuple[int, ...] = (T, dirs * P)
        elif self.batch_first:
            out_shape = (N, T, dirs * P)
        else:
            out_shape = (T, N, dirs * P)
        if dy is None:
            dy = xp.zeros((T, N, dirs * P), dtype=like.dtype)
        else:
            check_input(name, "dy", dy, like)
            if tuple(dy.shape) != out_shape:
                raise ValueError(f"{name}: dy: expected shape {out_shape}, got {dy.shape}")
            if unbatched:
                dy = dy[:, None, :]
            elif self.batch_first:
                dy = dy.transpose(1, 0, 2)
        st_shape = (L * dirs, P) if unbatched else (L * dirs, N, P)
        c_shape = (L * dirs, H) if unbatched else (L * dirs, N, H)
        dh_n, dc_n = self._split_state(dstate, like, st_shape, c_shape)
        if unbatched:
            dh_n, dc_n = (None if s is None else s[:, None, :] for s in (dh_n, dc_n))
        reverse = cache["reverse"]
        folded = cache["folded"]
        dh0 = [None] * (L * dirs)
        dc0 = [None] * (L * dirs)
        g = dy
        for layer in reversed(range(L)):
            mask = cache["masks"][layer]
            if mask is not None:
                g = g * mask
            dx = None
            for d in range(dirs):
                k = layer * dirs + d
                gd = g[:, :, d * P : (d + 1) * P]
                if d == 1:
                    gd = reverse(gd)
                ctx = cache["ctxs"][layer][d]
                dhT = None if dh_n is None else dh_n[k]
                w_ih, w_hh, b_ih, b_hh, w_hr = self._weights(layer, d)
                if self.mode == "LSTM":
                    dcT = None if dc_n is None else dc_n[k]
                    grads = lstm_backward(ctx, gd, dhT, dcT)
                    dxd, dh0[k], dc0[k], dw_ih, dw_hh, db = grads[:6]
                    if w_hr is not None:
                        w_hr.accumulate(grads[6])
                    db_ih = db_hh = db
                elif self.mode == "GRU":
                    dxd, dh0[k], dw_ih, dw_hh, db_ih, db_hh = gru_backward(ctx, gd, dhT)
                else:
                    dxd, dh0[k], dw_ih, dw_hh, db = rnn_backward(ctx, gd, dhT)
                    db_ih = db_hh = db
                w_ih.accumulate(dw_ih)
                w_hh.accumulate(dw_hh)
                if b_ih is not None:
                    b_ih.accumulate(db_ih)
                    b_hh.accumulate(db_hh)
                if layer == 0 and folded is not None:
                    folded.accumulate_table_grad(dxd)  # the embedding's gradient (V, D)
                    continue
                if d == 1:
                    dxd = reverse(dxd)
                dx = dxd if dx is None else dx + dxd
            g = dx
        if g is None:  # the first layer looked its input up (the embedding has its gradient)
            dx = None
        elif unbatched:
            dx = g[:, 0, :]
        elif self.batch_first:
            dx = xp.ascontiguousarray(g.transpose(1, 0, 2))
        else:
            dx = g
        if cache["looked_up"] is not None:
            cache["looked_up"].backward(dx)
            dx = None
        if not return_state_grad:
            return dx
        dh = xp.stack(dh0)
        if unbatched:
            dh = dh[:, 0, :]
        if self.mode == "LSTM":
            dc = xp.stack(dc0)
            return dx, (dh, dc[:, 0, :] if unbatched else dc)
        return dx, dh


class LSTM(_RNNBase):
    """Multi-layer LSTM, gates i, f, g, o (torch.nn.LSTM): ``y, (h_n, c_n) = lstm(x, (h0, c0))``.

    ``proj_size`` > 0 (< hidden_size) adds torch's projection ``h_t = W_hr (o_t * tanh(c_t))``
    (parameters ``weight_hr_l{k}``): h, y and the next layer's input have proj_size features.
    Extra keyword-only arguments: ``dtype`` (float32 default) and ``seed`` (the RNG of the
    dropout between layers)."""

    mode = "LSTM"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        *,
        dtype: Any = np.float32,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size=proj_size,
            dtype=dtype,
            seed=seed,
        )


class GRU(_RNNBase):
    """Multi-layer GRU, gates r, z, n (torch.nn.GRU): ``y, h_n = gru(x, h0)``."""

    mode = "GRU"


class RNN(_RNNBase):
    """Multi-layer Elman RNN (torch.nn.RNN), ``nonlinearity`` "tanh" or "relu":
    ``y, h_n = rnn(x, h0)``."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        *,
        dtype: Any = np.float32,
        seed: int | None = None,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
        object.__setattr__(self, "mode", "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU")
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            dtype=dtype,
            seed=seed,
        )
        self.nonlinearity = nonlinearity
