"""JAX bindings: fastrnn's CPU kernels as ``jax.custom_vjp`` functions.

``lstm``, ``gru``, ``rnn``, ``conv2d``, ``max_pool2d`` and ``avg_pool2d`` take and return JAX
arrays (float32, or float64 with ``jax_enable_x64``), work under ``jax.jit``, ``jax.grad``,
``jax.vjp`` and ``jax.vmap`` (sequentially over the mapped axis), and have the shapes and
conventions of fastrnn's functional API (time-major, PyTorch's layouts and gate orders)::

    y, hT, cT = fastrnn.jax.lstm(x, h0, c0, w_ih, w_hh, b, lengths=None)   # b = b_ih + b_hh
    y, hT = fastrnn.jax.gru(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None)
    y, hT = fastrnn.jax.rnn(x, h0, w_ih, w_hh, b, nonlinearity="tanh", lengths=None)
    y = fastrnn.jax.conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1)
    y = fastrnn.jax.max_pool2d(x, kernel_size, stride=None, padding=0)   # and avg_pool2d

The kernels run on the host through ``jax.experimental.buffer_callback`` (``jax.pure_callback``
on JAX versions without it): the inputs are NumPy views of JAX's CPU buffers, no copy, and the
results are copied once, into the output buffers XLA hands over; JAX's device arrays are copied
to the host and back.
Gradients with respect to ``lengths`` are zero (integers).

The forward pass under differentiation keeps fastrnn's context (saved activations) on the host
in a table keyed by a small integer that JAX carries to the backward pass as a residual; the
backward pass takes it out. A context that is not there any more (its backward already ran, as
when one vjp function is called twice, or the table's limit of ``CONTEXT_BYTES`` pushed it out:
forward passes whose backward never runs) is recomputed from the residual inputs, so gradients
are always right; :func:`recomputed` counts those cases.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections import OrderedDict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import fastrnn as _fr

__all__ = ["lstm", "gru", "rnn", "conv2d", "max_pool2d", "avg_pool2d", "recomputed"]

#: Limit of the host memory held by forward contexts waiting for their backward pass; past it
#: the oldest are dropped (their backward recomputes them).
CONTEXT_BYTES = 2 << 30

_lock = threading.Lock()
_contexts: OrderedDict[int, tuple[Any, int]] = OrderedDict()
_held_bytes = 0
_keys = itertools.count(1)
_recomputed = 0


def _nbytes(ctx: Any) -> int:
    return sum(getattr(v, "nbytes", 0) for v in ctx.saved.values())


def _keep(ctx: Any) -> np.int32:
    global _held_bytes
    size = _nbytes(ctx)
    with _lock:
        key = next(_keys) % (2**31 - 1) + 1
        _contexts[key] = (ctx, size)
        _held_bytes += size
        while _held_bytes > CONTEXT_BYTES and len(_contexts) > 1:
            _, (_, dropped) = _contexts.popitem(last=False)
            _held_bytes -= dropped
    return np.int32(key)


def _take(key: Any) -> Any:
    global _held_bytes
    with _lock:
        entry = _contexts.pop(int(key), None)
        if entry is None:
            return None
        _held_bytes -= entry[1]
        return entry[0]


def recomputed() -> int:
    """How many backward passes had to recompute their forward's context."""
    return _recomputed


def _context(key: Any, forward: Any) -> Any:
    """The context stored under ``key``, or ``forward()``'s when it is gone."""
    global _recomputed
    ctx = _take(key)
    if ctx is None:
        with _lock:
            _recomputed += 1
        ctx = forward()
    return ctx


def _host(a: Any) -> Any:
    return None if a is None else np.asarray(a)


def _lengths(lengths: Any) -> Any:
    return None if lengths is None else np.asarray(lengths, dtype=np.int64)


def _sds(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


_KEY = jax.ShapeDtypeStruct((), np.int32)


try:  # XLA's output buffers handed to the callback: the results are written into them
    from jax.experimental.buffer_callback import buffer_callback as _buffer_callback
except ImportError:  # older JAX: pure_callback, which copies the results once more
    _buffer_callback = None


def _callback(fn: Any, shapes: Any, *args: Any) -> Any:
    """``fn(*host_arrays)`` on the host as an XLA computation returning ``shapes``.

    With ``buffer_callback`` (JAX >= 0.7) the kernel's results are copied straight into XLA's
    output buffers: about 1.6 ms less per LSTM forward + backward at (100, 16, 256, 256) than
    pure_callback's hand-over (benchmarks/NOTES-torch.md)."""
    if _buffer_callback is None:
        return jax.pure_callback(fn, shapes, *args, vmap_method="sequential")

    def write(ctx: Any, out: Any, *buffers: Any) -> None:
        result = fn(*jax.tree_util.tree_map(np.asarray, buffers))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        results = result if isinstance(result, (tuple, list)) else (result,)
        for o, r in zip(outs, results, strict=True):
            np.copyto(np.asarray(o), r, casting="no")

    return _buffer_callback(write, shapes, vmap_method="sequential")(*args)


def _int_cotangent(a: Any) -> Any:
    """The cotangent of an integer input (``lengths``): float0 zeros."""
    return None if a is None else np.zeros(np.shape(a), dtype=jax.dtypes.float0)


# ------------------------------------------------------------------------------------------------
# recurrent
# ------------------------------------------------------------------------------------------------


def _lstm_shapes(x: Any, w_hh: Any) -> tuple[Any, ...]:
    T, N, H = x.shape[0], x.shape[1], w_hh.shape[1]
    return _sds((T, N, H), x.dtype), _sds((N, H), x.dtype), _sds((N, H), x.dtype)


def _lstm_forward(training: bool, x, h0, c0, w_ih, w_hh, b, lengths):
    return _fr.lstm_forward(
        _host(x), _host(h0), _host(c0), _host(w_ih), _host(w_hh), _host(b),
        lengths=_lengths(lengths), training=training,
    )  # fmt: skip


@jax.custom_vjp
def _lstm(x, h0, c0, w_ih, w_hh, b, lengths):
    def run(*args):
        return _lstm_forward(False, *args)[:3]

    return _callback(run, _lstm_shapes(x, w_hh), x, h0, c0, w_ih, w_hh, b, lengths)


def _lstm_fwd(x, h0, c0, w_ih, w_hh, b, lengths):
    def run(*args):
        y, hT, cT, ctx = _lstm_forward(True, *args)
        return y, hT, cT, _keep(ctx)

    inputs = (x, h0, c0, w_ih, w_hh, b, lengths)
    *outputs, key = _callback(run, (*_lstm_shapes(x, w_hh), _KEY), *inputs)
    return tuple(outputs), (key, inputs)


def _lstm_bwd(residuals, grads):
    key, inputs = residuals
    shapes = tuple(_sds(a.shape, a.dtype) for a in inputs[:6])

    def run(key, dy, dhT, dcT, *inputs):
        ctx = _context(key, lambda: _lstm_forward(True, *inputs)[3])
        return _fr.lstm_backward(ctx, _host(dy), _host(dhT), _host(dcT))

    return (*_callback(run, shapes, key, *grads, *inputs), _int_cotangent(inputs[6]))


_lstm.defvjp(_lstm_fwd, _lstm_bwd)


def lstm(x, h0, c0, w_ih, w_hh, b, *, lengths=None):
    """LSTM over a whole sequence (gates i, f, g, o): x (T,N,D), h0, c0 (N,H), w_ih (4H,D),
    w_hh (4H,H), b (4H,) = PyTorch's b_ih + b_hh, lengths None or integers (N,) in 1..T.
    Returns y (T,N,H), hT (N,H), cT (N,H)."""
    return _lstm(x, h0, c0, w_ih, w_hh, b, lengths)


def _gru_forward(training: bool, x, h0, w_ih, w_hh, b_ih, b_hh, lengths):
    return _fr.gru_forward(
        _host(x), _host(h0), _host(w_ih), _host(w_hh), _host(b_ih), _host(b_hh),
        lengths=_lengths(lengths), training=training,
    )  # fmt: skip


def _h_shapes(x: Any, w_hh: Any) -> tuple[Any, ...]:
    T, N, H = x.shape[0], x.shape[1], w_hh.shape[1]
    return _sds((T, N, H), x.dtype), _sds((N, H), x.dtype)


@jax.custom_vjp
def _gru(x, h0, w_ih, w_hh, b_ih, b_hh, lengths):
    def run(*args):
        return _gru_forward(False, *args)[:2]

    return _callback(run, _h_shapes(x, w_hh), x, h0, w_ih, w_hh, b_ih, b_hh, lengths)


def _gru_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, lengths):
    def run(*args):
        y, hT, ctx = _gru_forward(True, *args)
        return y, hT, _keep(ctx)

    inputs = (x, h0, w_ih, w_hh, b_ih, b_hh, lengths)
    *outputs, key = _callback(run, (*_h_shapes(x, w_hh), _KEY), *inputs)
    return tuple(outputs), (key, inputs)


def _gru_bwd(residuals, grads):
    key, inputs = residuals
    shapes = tuple(_sds(a.shape, a.dtype) for a in inputs[:6])

    def run(key, dy, dhT, *inputs):
        ctx = _context(key, lambda: _gru_forward(True, *inputs)[2])
        return _fr.gru_backward(ctx, _host(dy), _host(dhT))

    return (*_callback(run, shapes, key, *grads, *inputs), _int_cotangent(inputs[6]))


_gru.defvjp(_gru_fwd, _gru_bwd)


def gru(x, h0, w_ih, w_hh, b_ih, b_hh, *, lengths=None):
    """GRU over a whole sequence (gates r, z, n): w_ih (3H,D), w_hh (3H,H), b_ih, b_hh (3H,).
    Returns y (T,N,H), hT (N,H)."""
    return _gru(x, h0, w_ih, w_hh, b_ih, b_hh, lengths)


@functools.cache
def _rnn_function(nonlinearity: str) -> Any:
    def forward(training: bool, x, h0, w_ih, w_hh, b, lengths):
        return _fr.rnn_forward(
            _host(x), _host(h0), _host(w_ih), _host(w_hh), _host(b),
            nonlinearity=nonlinearity, lengths=_lengths(lengths), training=training,
        )  # fmt: skip

    @jax.custom_vjp
    def f(x, h0, w_ih, w_hh, b, lengths):
        def run(*args):
            return forward(False, *args)[:2]

        return _callback(run, _h_shapes(x, w_hh), x, h0, w_ih, w_hh, b, lengths)

    def fwd(x, h0, w_ih, w_hh, b, lengths):
        def run(*args):
            y, hT, ctx = forward(True, *args)
            return y, hT, _keep(ctx)

        inputs = (x, h0, w_ih, w_hh, b, lengths)
        *outputs, key = _callback(run, (*_h_shapes(x, w_hh), _KEY), *inputs)
        return tuple(outputs), (key, inputs)

    def bwd(residuals, grads):
        key, inputs = residuals
        shapes = tuple(_sds(a.shape, a.dtype) for a in inputs[:5])

        def run(key, dy, dhT, *inputs):
            ctx = _context(key, lambda: forward(True, *inputs)[2])
            return _fr.rnn_backward(ctx, _host(dy), _host(dhT))

        return (*_callback(run, shapes, key, *grads, *inputs), _int_cotangent(inputs[5]))

    f.defvjp(fwd, bwd)
    return f


def rnn(x, h0, w_ih, w_hh, b, *, nonlinearity="tanh", lengths=None):
    """Elman RNN over a whole sequence: w_ih (H,D), w_hh (H,H), b (H,) = b_ih + b_hh,
    nonlinearity "tanh" or "relu". Returns y (T,N,H), hT (N,H)."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
    return _rnn_function(nonlinearity)(x, h0, w_ih, w_hh, b, lengths)


# ------------------------------------------------------------------------------------------------
# convolution and pooling
# ------------------------------------------------------------------------------------------------


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _out_size(size, kernel, stride, padding, dilation) -> tuple[int, int]:
    return tuple(  # type: ignore[return-value]
        (size[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
        for i in range(2)
    )


@functools.cache
def _conv2d_function(stride, padding, dilation, groups, has_bias) -> Any:
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)

    def forward(training, x, w, *b):
        return _fr.conv2d_forward(
            _host(x), _host(w), _host(b[0]) if b else None, training=training, **geometry
        )

    def shape(x, w):
        OH, OW = _out_size(x.shape[2:], w.shape[2:], stride, padding, dilation)
        return _sds((x.shape[0], w.shape[0], OH, OW), x.dtype)

    @jax.custom_vjp
    def f(x, w, *b):
        return _callback(lambda *a: forward(False, *a)[0], shape(x, w), x, w, *b)

    def fwd(x, w, *b):
        def run(*args):
            y, ctx = forward(True, *args)
            return y, _keep(ctx)

        y, key = _callback(run, (shape(x, w), _KEY), x, w, *b)
        return y, (key, (x, w, *b))

    def bwd(residuals, dy):
        key, inputs = residuals
        shapes = tuple(_sds(a.shape, a.dtype) for a in inputs)

        def run(key, dy, *inputs):
            ctx = _context(key, lambda: forward(True, *inputs)[1])
            dx, dw, db = _fr.conv2d_backward(ctx, _host(dy))
            return (dx, dw, db) if has_bias else (dx, dw)

        return tuple(_callback(run, shapes, key, dy, *inputs))

    f.defvjp(fwd, bwd)
    return f


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D cross-correlation (NCHW, like PyTorch): x (N,C,H,W), w (F,C/groups,KH,KW), b (F,) or
    None; stride, padding, dilation: int or pair. Returns y (N,F,OH,OW)."""
    f = _conv2d_function(_pair(stride), _pair(padding), _pair(dilation), int(groups),
                         b is not None)  # fmt: skip
    return f(x, w) if b is None else f(x, w, b)


@functools.cache
def _pool2d_function(kind, kernel_size, stride, padding) -> Any:
    forward_kernel = _fr.max_pool2d_forward if kind == "max" else _fr.avg_pool2d_forward
    backward_kernel = _fr.max_pool2d_backward if kind == "max" else _fr.avg_pool2d_backward

    def forward(training, x):
        return forward_kernel(_host(x), kernel_size, stride, padding, training=training)

    def shape(x):
        OH, OW = _out_size(x.shape[2:], kernel_size, stride, padding, (1, 1))
        return _sds((x.shape[0], x.shape[1], OH, OW), x.dtype)

    @jax.custom_vjp
    def f(x):
        return _callback(lambda a: forward(False, a)[0], shape(x), x)

    def fwd(x):
        def run(a):
            y, ctx = forward(True, a)
            return y, _keep(ctx)

        y, key = _callback(run, (shape(x), _KEY), x)
        return y, (key, x)

    def bwd(residuals, dy):
        key, x = residuals

        def run(key, dy, x):
            ctx = _context(key, lambda: forward(True, x)[1])
            return backward_kernel(ctx, _host(dy))

        return (_callback(run, _sds(x.shape, x.dtype), key, dy, x),)

    f.defvjp(fwd, bwd)
    return f


def max_pool2d(x, kernel_size, stride=None, padding=0):
    """Max pooling (NCHW), PyTorch's defaults: floor output size, padding never wins."""
    kernel = _pair(kernel_size)
    stride = kernel if stride is None else _pair(stride)
    return _pool2d_function("max", kernel, stride, _pair(padding))(x)


def avg_pool2d(x, kernel_size, stride=None, padding=0):
    """Average pooling (NCHW), PyTorch's defaults: floor output size, padding counted."""
    kernel = _pair(kernel_size)
    stride = kernel if stride is None else _pair(stride)
    return _pool2d_function("avg", kernel, stride, _pair(padding))(x)


del jnp  # imported so that `import fastrnn.jax` fails early without jax.numpy
