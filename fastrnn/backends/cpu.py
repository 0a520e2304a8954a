"""The ``cpu`` backend: Cython + OpenMP kernels in fastrnn/_cpu, BLAS through
scipy.linalg.cython_blas.

The recurrent ops (LSTM, GRU, RNN) are cells of one engine, fastrnn/_cpu/recurrent.pyx; the
convolution and pooling ops are one extension module each. The functions below have exactly the
backend interface's signatures (fastrnn/backends/base.py). Extension modules are imported on
first use, so a missing build fails with a clear message instead of at ``import fastrnn``.
Every entry point is wrapped by :func:`fastrnn._cpu._fork.fork_safe`, so a forked child can
call it.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from fastrnn._cpu._fork import fork_safe

name = "cpu"


_LOADED: dict[str, ModuleType] = {}


def _kernels(module: str) -> ModuleType:
    loaded = _LOADED.get(module)
    if loaded is not None:
        return loaded
    try:
        loaded = _LOADED[module] = importlib.import_module(f"fastrnn._cpu.{module}")
        return loaded
    except ImportError as exc:
        raise ImportError(
            f"fastrnn's CPU kernel module fastrnn._cpu.{module} is not built ({exc}); install "
            "fastrnn with `pip install -e .` (or `python setup.py build_ext --inplace` in a "
            "source checkout)"
        ) from exc


# -- recurrent: the engine's cells ------------------------------------------------------------


@fork_safe
def lstm_forward(x, h0, c0, w_ih, w_hh, b, lengths, training, w_hr=None):
    return _kernels("recurrent").lstm_forward(x, h0, c0, w_ih, w_hh, b, lengths, training, w_hr)


@fork_safe
def lstm_backward(ctx, dy, dhT, dcT):
    return _kernels("recurrent").lstm_backward(ctx, dy, dhT, dcT)


@fork_safe
def gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, training):
    return _kernels("recurrent").gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, training)


@fork_safe
def gru_backward(ctx, dy, dhT):
    return _kernels("recurrent").gru_backward(ctx, dy, dhT)


@fork_safe
def rnn_forward(x, h0, w_ih, w_hh, b, nonlinearity, lengths, training):
    return _kernels("recurrent").rnn_forward(x, h0, w_ih, w_hh, b, nonlinearity, lengths, training)


@fork_safe
def rnn_backward(ctx, dy, dhT):
    return _kernels("recurrent").rnn_backward(ctx, dy, dhT)


@fork_safe
def lookup_forward(op, tokens, table, *args, **kwargs):
    """``op``'s forward ("lstm", "gru" or "rnn"; ``args``, ``kwargs``: its arguments after x,
    by the names of fastrnn/_cpu/recurrent.pyx's forwards) with token
    inputs: the input at (t, n) is ``table[tokens[t, n]]`` and the first GEMM a lookup into
    ``table W_ih^T``; its backward returns the table's gradient in dx's place. Not part of the
    backend interface: fastrnn.nn's recurrent layers call it for ``embedding=``."""
    return getattr(_kernels("recurrent"), f"{op}_forward")(table, *args, tokens=tokens, **kwargs)


# -- convolution and pooling ----------------------------------------------------------------------

# op name -> extension module in fastrnn/_cpu
_MODULE_OF = {
    "conv2d": "conv2d",
    "max_pool2d": "pool2d",
    "avg_pool2d": "pool2d",
}


@fork_safe
def conv2d_forward_algorithm(
    x, w, b, stride, padding, dilation, groups, training, algorithm, activation=None, pool=None
):
    """conv2d_forward (the interface's arguments) by a chosen algorithm: "auto", "direct",
    "winograd" or "im2col" (validated by fastrnn.backends.ops), with ``activation`` None or
    "relu" applied in the kernels' store, and ``pool`` None or max pooling's (kernel_size,
    stride, padding) applied to the output. Beyond the interface: only the CPU backend has
    several algorithms and fuses the activation and the pooling."""
    return _kernels("conv2d").conv2d_forward_algorithm(
        x, w, b, stride, padding, dilation, groups, training, algorithm, activation, pool
    )


@fork_safe
def relu_backward(y, dy, reuse=False):
    """dy where y > 0, else 0: the gradient through conv2d's fused ReLU (beyond the interface);
    ``reuse``: into a per-thread buffer that the next such call overwrites."""
    return _kernels("conv2d").relu_backward(y, dy, reuse)


def __getattr__(attr: str) -> Any:
    op, _, direction = attr.rpartition("_")
    if direction not in ("forward", "backward") or op not in _MODULE_OF:
        raise AttributeError(attr)
    fn = fork_safe(getattr(_kernels(_MODULE_OF[op]), attr))
    globals()[attr] = fn  # later lookups skip __getattr__
    return fn
