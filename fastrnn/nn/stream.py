"""Streams: a recurrent layer run one time step at a time, state kept between calls.

``stream = lstm.stream(batch_size)`` prepares every layer once (fastrnn.lstm_inference etc.:
private copies of the weights, summed biases) and holds the state; ``stream.step(x_t)`` takes
(batch_size, input_size) and returns the last layer's (batch_size, hidden_size) output,
updating the state of every layer in place. ``stream.state`` reads or sets the state in the
module's format (``h`` or ``(h, c)``, each (num_layers, batch_size, hidden_size); h has
proj_size features for an LSTM with projections);
``stream.reset()`` zeroes it; ``stream.refresh()`` takes the module's current weights (a stream
made before an optimizer step still holds the old ones). Inference semantics: no dropout, nothing
saved for backward. Bidirectional modules cannot stream (their reverse direction needs the whole
sequence).
"""

from __future__ import annotations

from typing import Any

from fastrnn.inference import gru_inference, lstm_inference, rnn_inference
from fastrnn.nn._check import positive_int
from fastrnn.nn._xp import array_module


class Stream:
    def __init__(self, module: Any, batch_size: int) -> None:
        if module.bidirectional:
            raise ValueError(
                f"{type(module).__name__}: a bidirectional module cannot stream (its reverse "
                "direction needs the whole sequence)"
            )
        self.module = module
        self.batch_size = positive_int("batch_size", batch_size)
        self.lstm = module.mode == "LSTM"
        self.layers = [self._prepare(layer) for layer in range(module.num_layers)]
        like = module.weight_ih_l0.data
        xp = array_module(like)
        L, N, H = module.num_layers, self.batch_size, module.hidden_size
        P = getattr(module, "proj_size", 0) or H  # h's size: the projection's, if any
        self._h = xp.zeros((L, N, P), like.dtype)
        self._c = xp.zeros((L, N, H), like.dtype) if self.lstm else None
        self._x_shape = (self.batch_size, module.input_size)

    def _weights(self, layer: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """(positional weights, keywords) of layer ``layer`` for the prepared layer."""
        w_ih, w_hh, b_ih, b_hh, w_hr = self.module._weights(layer, 0)
        xp = array_module(w_ih.data)
        G = w_hh.data.shape[0]
        zeros = xp.zeros(G, w_ih.data.dtype)
        b_ih = zeros if b_ih is None else b_ih.data
        b_hh = zeros if b_hh is None else b_hh.data
        if self.module.mode == "GRU":
            return (w_ih.data, w_hh.data, b_ih, b_hh), {}
        if self.module.mode == "LSTM":
            return (w_ih.data, w_hh.data, b_ih + b_hh), {
                "w_hr": None if w_hr is None else w_hr.data
            }
        return (w_ih.data, w_hh.data, b_ih + b_hh), {}

    def _prepare(self, layer: int) -> Any:
        w, kw = self._weights(layer)
        mode = self.module.mode
        if mode == "LSTM":
            return lstm_inference(*w, **kw)
        if mode == "GRU":
            return gru_inference(*w)
        return rnn_inference(*w, nonlinearity="tanh" if mode == "RNN_TANH" else "relu")

    def refresh(self) -> None:
        """Take the module's current weights (after training steps or load_state_dict)."""
        for layer, run in enumerate(self.layers):
            w, kw = self._weights(layer)
            run.update(*w, **kw)

    def step(self, x_t: Any) -> Any:
        """One time step through every layer: x_t (batch_size, input_size) -> the last
        layer's output (batch_size, hidden_size), a view of the stream's state (copy it to keep
        it past the next step)."""
        if getattr(x_t, "shape", None) != self._x_shape:
            raise ValueError(
                f"x_t: expected shape {self._x_shape} (batch_size, input_size), got "
                f"{getattr(x_t, 'shape', type(x_t).__name__)}"
            )
        inp = x_t
        h, c = self._h, self._c
        for layer, run in enumerate(self.layers):
            if self.lstm:
                run.step(inp, h[layer], c[layer], out=(h[layer], c[layer]))
            else:
                run.step(inp, h[layer], out=h[layer])
            inp = h[layer]
        return inp

    def _sample(
        self, table: Any, head_w: Any, head_b: Any, logits: Any, temperature: float, u: Any
    ) -> Any:
        """Token ids drawn one per uniform in ``u`` from an embedding (``table``) -> this stream
        -> linear (``head_w``, ``head_b``) model, the first from ``logits``; each draw is
        ``searchsorted(cumsum(p), u * p.sum())`` (at most V - 1) of ``p = softmax(logits /
        temperature)`` in float64, and its row of ``table`` is the next input. The whole loop
        runs in the CPU kernel (fastrnn/_cpu/_inference.h) on fastrnn's threads; the state
        follows the last token. None where that kernel does not apply (CuPy arrays, a batch of
        more than one, projections): the caller steps the stream itself."""
        from fastrnn.inference import _CPU

        if (
            self.batch_size != 1
            or getattr(self.module, "proj_size", 0)
            or _CPU is None
            or not all(isinstance(run, _CPU) for run in self.layers)
        ):
            return None
        from fastrnn import get_num_threads
        from fastrnn._cpu._fork import fork_safe
        from fastrnn._cpu.inference import generate

        layers = [
            (run, self._h[i, 0], None if self._c is None else self._c[i, 0])
            for i, run in enumerate(self.layers)
        ]
        return fork_safe(generate)(
            layers, table, head_w, head_b, logits, float(temperature), u, get_num_threads()
        )

    @property
    def state(self) -> Any:
        return (self._h, self._c) if self.lstm else self._h

    @state.setter
    def state(self, value: Any) -> None:
        parts = value if self.lstm else (value,)
        if self.lstm and (not isinstance(value, (tuple, list)) or len(value) != 2):
            raise TypeError("state: expected a pair (h, c) for an LSTM stream")
        for name, mine, new in zip(("h", "c"), (self._h, self._c), parts, strict=False):
            if getattr(new, "shape", None) != mine.shape:
                raise ValueError(
                    f"state: {name}: expected shape {mine.shape}, got {getattr(new, 'shape', new)}"
                )
            mine[...] = new

    def reset(self) -> None:
        """Zero the state of every layer."""
        self._h[...] = 0
        if self._c is not None:
            self._c[...] = 0
