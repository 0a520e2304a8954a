"""PyTorch bindings: fastrnn's kernels as torch operators, and ``torch.nn`` drop-ins on them.

``LSTM``, ``GRU``, ``RNN``, ``Conv2d``, ``MaxPool2d`` and ``AvgPool2d`` subclass their
``torch.nn`` twins: same constructor arguments and checks, parameter names, shapes,
initialisation, ``state_dict``, outputs (``PackedSequence`` in, ``PackedSequence`` out) and the
same exception types for the same mistakes. Their forward calls one ``torch.ops.fastrnn``
custom operator per layer and direction (fastrnn/torch/_ops.py), registered with
``torch.library`` together with a fake implementation and its autograd formula, so that

* autograd, ``torch.func``, optimizers and DistributedDataParallel work as with torch.nn;
* ``torch.compile(model, fullgraph=True)`` traces a model holding these modules without a
  graph break (for the recurrent modules, as for torch.nn's, Dynamo needs
  ``torch._dynamo.config.allow_rnn = True``: it refuses every ``nn.RNNBase`` subclass by
  default) and ``torch.export`` exports them, each operator as one graph node;
* double backward (``create_graph=True``) is correct: it differentiates a torch-op
  formulation of the same function (slow; first-order gradients always run fastrnn's kernels);
* CPU tensors run on the CPU kernels with ``torch.get_num_threads()`` threads (nothing global
  of fastrnn or torch changes); CUDA tensors on the CUDA kernels on PyTorch's current stream;
  the tensors' memory is handed to the kernels without copies (NumPy views, DLPack).

The recurrent modules also take padded input with a ``lengths=`` keyword (integers of shape
``(N,)``): outputs past each sequence's end are zero and the final states are those after its
last step, exactly what a ``PackedSequence`` gives, without packing.

Unsupported configurations raise instead of falling back to PyTorch's kernels:
``padding_mode`` other than ``"zeros"``, pooling with ``ceil_mode``, ``dilation``,
``return_indices``, ``count_include_pad=False`` or ``divisor_override``, dtypes other than
float32 and float64 (TypeError), devices other than CPU and CUDA. ``torch.jit.script`` of the
modules raises a RuntimeError that says to use torch.compile, torch.export or torch.jit.trace.

The functional forms (``lstm``, ``gru``, ``rnn``, ``conv2d``, ``max_pool2d``, ``avg_pool2d``)
take one layer's tensors, time-major, and are differentiable.

``fuse(model)`` returns the model as a ``torch.fx.GraphModule`` in which each fastrnn.torch
``Conv2d`` whose output goes only to a ReLU applies the ReLU in its kernel's store (like
``torch.ao.quantization.fuse_fx`` for Conv2d + ReLU): same results and gradients.

Importing this module registers the operators and adds the module classes to
``torch.serialization``'s safe globals, so ``torch.load(..., weights_only=True)`` loads pickled
models made of them. torch is an optional dependency (``pip install fastrnn[torch]``).
"""

from __future__ import annotations

from typing import Any

import torch

from fastrnn.backends.ops import max_pool_window
from fastrnn.torch import _ops
from fastrnn.torch._fuse import fuse
from fastrnn.torch.modules import GRU, LSTM, RNN, AvgPool2d, Conv2d, MaxPool2d

__all__ = [
    "LSTM",
    "GRU",
    "RNN",
    "Conv2d",
    "MaxPool2d",
    "AvgPool2d",
    "lstm",
    "gru",
    "rnn",
    "conv2d",
    "max_pool2d",
    "avg_pool2d",
    "fuse",
]

Tensor = torch.Tensor


def _training(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _lengths(lengths: Any) -> Tensor | None:
    if lengths is None:
        return None
    return torch.as_tensor(lengths).to(device="cpu", dtype=torch.int64)


def lstm(
    x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
    b_ih: Tensor | None = None, b_hh: Tensor | None = None, *, w_hr: Tensor | None = None,
    lengths: Any = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """One LSTM layer (gates i, f, g, o): x (T,N,D), h0/c0 (N,H), w_ih (4H,D), w_hh (4H,H),
    b_ih/b_hh (4H,) or None, lengths None or (N,) integers -> y (T,N,H), hT, cT (N,H).
    With torch's projection ``w_hr`` (P,H): w_hh (4H,P), h0, hT and y of P features."""
    training = _training(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    y, hT, cT, _ = _ops.call(
        _ops.lstm, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, _lengths(lengths), training
    )
    return y, hT, cT


def gru(
    x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
    b_hh: Tensor | None = None, *, lengths: Any = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One GRU layer (gates r, z, n): w_ih (3H,D), w_hh (3H,H), b_ih/b_hh (3H,) or None ->
    y (T,N,H), hT (N,H)."""
    training = _training(x, h0, w_ih, w_hh, b_ih, b_hh)
    y, hT, _ = _ops.call(_ops.gru, x, h0, w_ih, w_hh, b_ih, b_hh, _lengths(lengths), training)
    return y, hT


def rnn(
    x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
    b_hh: Tensor | None = None, *, nonlinearity: str = "tanh", lengths: Any = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One Elman RNN layer: w_ih (H,D), w_hh (H,H), b_ih/b_hh (H,) or None, nonlinearity
    "tanh" or "relu" -> y (T,N,H), hT (N,H)."""
    training = _training(x, h0, w_ih, w_hh, b_ih, b_hh)
    y, hT, _ = _ops.call(
        _ops.rnn, x, h0, w_ih, w_hh, b_ih, b_hh, _lengths(lengths), nonlinearity, training
    )
    return y, hT


def _pair(v: Any) -> list[int]:
    return [int(v[0]), int(v[1])] if isinstance(v, (tuple, list)) else [int(v), int(v)]


def conv2d(
    x: Tensor, w: Tensor, b: Tensor | None = None, stride: Any = 1, padding: Any = 0,
    dilation: Any = 1, groups: int = 1, *, activation: str | None = None, max_pool: Any = None,
) -> Tensor:  # fmt: skip
    """2-D cross-correlation (NCHW), like ``torch.nn.functional.conv2d`` with int or pair
    ``stride``/``padding``/``dilation``; ``activation="relu"`` applies ReLU in the kernel's
    store (``torch.relu`` of the convolution, fused); ``max_pool`` (a kernel size, int or pair,
    or a dict with kernel_size and optionally stride and padding) max pools the result in the
    same operator (``F.max_pool2d`` of it, with PyTorch's defaults)."""
    if activation is not None and activation != "relu":
        raise ValueError(f"activation: expected None or 'relu', got {activation!r}")
    window = max_pool_window(max_pool)
    pool = [] if window is None else [v for p in window for v in p]
    y, _ = _ops.call(
        _ops.conv2d,
        x,
        w,
        b,
        _pair(stride),
        _pair(padding),
        _pair(dilation),
        groups,
        _training(x, w, b),
        activation,
        pool,
    )
    return y


def max_pool2d(x: Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0) -> Tensor:
    """Max pooling (NCHW), PyTorch's defaults (floor output size, padding never wins)."""
    stride = kernel_size if stride is None else stride
    y, _ = _ops.call(
        _ops.max_pool2d, x, _pair(kernel_size), _pair(stride), _pair(padding), _training(x)
    )
    return y


def avg_pool2d(x: Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0) -> Tensor:
    """Average pooling (NCHW), PyTorch's defaults (floor output size, padding counted)."""
    stride = kernel_size if stride is None else stride
    y, _ = _ops.call(
        _ops.avg_pool2d, x, _pair(kernel_size), _pair(stride), _pair(padding), _training(x)
    )
    return y


torch.serialization.add_safe_globals([LSTM, GRU, RNN, Conv2d, MaxPool2d, AvgPool2d])
