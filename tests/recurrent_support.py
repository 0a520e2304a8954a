"""Test helpers shared by the recurrent tests: one description per op (LSTM, GRU, RNN tanh/relu),
random inputs, and uniform forward/backward calls through the public API or the reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import fastrnn as fr
from fastrnn import reference


@dataclass(frozen=True)
class RecurrentOp:
    name: str  # test id
    base: str  # "lstm", "gru" or "rnn"
    gates: int  # G: gate rows per hidden unit in the weights
    inputs: tuple[str, ...]  # forward's array arguments, in order
    upstream: tuple[str, ...]  # backward's gradient arguments, in order
    grads: tuple[str, ...]  # backward's results, in order
    nonlinearity: str | None = None
    proj: bool = False  # LSTM with a projection (w_hr, keyword argument)

    def sizes(self, H: int) -> tuple[int, int]:
        """(hidden size, state size P) for a requested H: a projection needs P < H, so it uses
        H >= 2 and P = H // 2."""
        if not self.proj:
            return H, H
        H = max(H, 2)
        return H, H // 2

    def arrays(self, T: int, N: int, D: int, H: int, rng: np.random.Generator) -> dict[str, Any]:
        """float64 inputs of moderate size (activations stay away from saturation)."""
        H, P = self.sizes(H)
        shapes = {
            "x": (T, N, D),
            "h0": (N, P),
            "c0": (N, H),
            "w_ih": (self.gates * H, D),
            "w_hh": (self.gates * H, P),
            "b": (self.gates * H,),
            "b_ih": (self.gates * H,),
            "b_hh": (self.gates * H,),
            "w_hr": (P, H),
        }
        scale = {"w_ih": 1 / np.sqrt(max(D, 1)), "w_hh": 1 / np.sqrt(P), "w_hr": 1 / np.sqrt(H)}
        names = self.inputs + (("w_hr",) if self.proj else ())
        return {k: rng.standard_normal(shapes[k]) * scale.get(k, 0.5) for k in names}

    def upstream_arrays(self, T: int, N: int, H: int, rng: np.random.Generator) -> dict:
        H, P = self.sizes(H)
        shapes = {"dy": (T, N, P), "dhT": (N, P), "dcT": (N, H)}
        return {k: rng.standard_normal(shapes[k]) for k in self.upstream}

    def forward(self, arrays: dict, lengths=None, training: bool = True, module: Any = fr):
        """-> (outputs tuple: y, hT[, cT]), ctx."""
        fn = getattr(module, f"{self.base}_forward")
        kw: dict[str, Any] = dict(lengths=lengths, training=training)
        if self.nonlinearity is not None:
            kw["nonlinearity"] = self.nonlinearity
        if self.proj:
            kw["w_hr"] = arrays["w_hr"]
        out = fn(*(arrays[k] for k in self.inputs), **kw)
        return tuple(out[:-1]), out[-1]

    def backward(self, ctx: Any, upstream: dict, module: Any = fr) -> tuple:
        fn = getattr(module, f"{self.base}_backward")
        return tuple(fn(ctx, *(upstream.get(k) for k in self.upstream)))

    def outputs(self) -> tuple[str, ...]:
        return ("y", "hT", "cT") if self.base == "lstm" else ("y", "hT")


OPS = [
    RecurrentOp(
        "lstm",
        "lstm",
        4,
        ("x", "h0", "c0", "w_ih", "w_hh", "b"),
        ("dy", "dhT", "dcT"),
        ("dx", "dh0", "dc0", "dw_ih", "dw_hh", "db"),
    ),
    RecurrentOp(
        "gru",
        "gru",
        3,
        ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"),
        ("dy", "dhT"),
        ("dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"),
    ),
    RecurrentOp(
        "rnn_tanh",
        "rnn",
        1,
        ("x", "h0", "w_ih", "w_hh", "b"),
        ("dy", "dhT"),
        ("dx", "dh0", "dw_ih", "dw_hh", "db"),
        "tanh",
    ),
    RecurrentOp(
        "rnn_relu",
        "rnn",
        1,
        ("x", "h0", "w_ih", "w_hh", "b"),
        ("dy", "dhT"),
        ("dx", "dh0", "dw_ih", "dw_hh", "db"),
        "relu",
    ),
]
# The LSTM with a projection (torch's proj_size).
LSTM_PROJ = RecurrentOp(
    "lstm_proj",
    "lstm",
    4,
    ("x", "h0", "c0", "w_ih", "w_hh", "b"),
    ("dy", "dhT", "dcT"),
    ("dx", "dh0", "dc0", "dw_ih", "dw_hh", "db", "dw_hr"),
    proj=True,
)
OPS.append(LSTM_PROJ)
OP_IDS = [op.name for op in OPS]

REFERENCE = reference


def cuda_has_projection() -> bool:
    """Whether the CUDA LSTM launcher takes w_hr (the projection cell) yet."""
    import inspect

    from fastrnn._cuda import recurrent

    return "w_hr" in inspect.signature(recurrent.lstm_forward).parameters


def make_lengths(kind: str | None, T: int, N: int, rng: np.random.Generator):
    """None; "full": every sequence T long (given explicitly); "ties": random lengths in 1..T
    with repeated values, including 1 and T when N allows."""
    if kind is None:
        return None
    if kind == "full":
        return np.full(N, T, dtype=np.int64)
    lengths = rng.integers(1, T + 1, size=N)
    if N >= 2:
        lengths[1] = lengths[0]  # a tie
    if N >= 3:
        lengths[2] = 1
    if N >= 4:
        lengths[3] = T
    return lengths
