"""PyTorch bindings: ``torch.nn`` drop-ins that run on fastrnn's kernels.

``LSTM``, ``GRU``, ``RNN``, ``Conv2d``, ``MaxPool2d`` and ``AvgPool2d`` subclass their
``torch.nn`` twins, so they have the same constructor arguments, parameter names, shapes,
initialisation, ``state_dict`` and ``forward`` outputs (``PackedSequence`` in,
``PackedSequence`` out), and they work wherever a ``torch.nn`` module does (optimizers,
``DistributedDataParallel``, ``torch.func``). Only ``forward`` differs: each layer and
direction (each op) is one ``torch.autograd.Function`` that hands the tensors' memory to the
public functional API (``fastrnn.lstm_forward`` ...) without copying it:

* CPU tensors become NumPy views (``tensor.numpy()``), so they run on the CPU kernels (or on
  whatever ``fastrnn.use_backend`` forces);
* CUDA tensors become CuPy views through DLPack and the kernels run on PyTorch's current CUDA
  stream, so no synchronisation is needed in either direction.

The results come back the same way (``torch.from_numpy`` / ``torch.from_dlpack``). Copies are
made only where the layout demands one: a non-contiguous tensor (e.g. a ``batch_first`` input,
which fastrnn's time-major kernels need transposed), the reversed input of a bidirectional
layer, the padded form of a ``PackedSequence``.

The recurrent modules also take padded input with a ``lengths=`` keyword (integers of shape
``(N,)``): outputs past each sequence's end are zero and the final states are those after its
last step, exactly what a ``PackedSequence`` gives, without packing.

Unsupported configurations raise an error instead of falling back to PyTorch's own kernels:
``proj_size != 0``, ``padding_mode`` other than ``"zeros"``, pooling with ``ceil_mode``,
``dilation``, ``return_indices``, ``count_include_pad=False`` or ``divisor_override``, dtypes
other than float32 and float64, devices other than CPU and CUDA, double backward.

torch is an optional dependency of fastrnn (``pip install fastrnn[torch]``); importing this
module imports it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fastrnn as _fr
from fastrnn.backends.validation import check_lengths

__all__ = [
    "LSTM",
    "GRU",
    "RNN",
    "Conv2d",
    "LSTMFunction",
    "GRUFunction",
    "RNNFunction",
    "Conv2dFunction",
    "MaxPool2d",
    "AvgPool2d",
    "Pool2dFunction",
]

_DTYPES = (torch.float32, torch.float64)

# ------------------------------------------------------------------------------------------------
# tensor <-> kernel array, without copies
# ------------------------------------------------------------------------------------------------


def _array(t: torch.Tensor | None) -> Any:
    """The kernel array on ``t``'s memory: a NumPy view of a CPU tensor, a CuPy view (DLPack)
    of a CUDA tensor. ``t`` must be contiguous (the modules and Functions make sure of it), so
    the view is of the tensor's own storage."""
    if t is None:
        return None
    t = t.detach()
    if t.device.type == "cpu":
        return t.numpy()
    import cupy

    # Inside _on_device: cupy's current stream is torch's, so DLPack's stream hand-off is a no-op.
    return cupy.from_dlpack(t)


def _tensor(a: Any) -> torch.Tensor:
    """The tensor on a kernel array's memory (``torch.from_numpy`` / ``torch.from_dlpack``).

    The kernels return fresh C-contiguous arrays; anything else (a read-only or strided array)
    is copied first: torch.from_numpy warns on read-only memory, and a negatively strided array
    must never reach DLPack (it crashes some PyTorch releases)."""
    if isinstance(a, np.ndarray):
        if not (a.flags.writeable and a.flags.c_contiguous):
            a = np.array(a, order="C")
        return torch.from_numpy(a)
    if not a.flags.c_contiguous:
        a = a.copy(order="C")
    return torch.from_dlpack(a)


def _grad_array(g: torch.Tensor | None) -> Any:
    """An upstream gradient as a kernel array (autograd may hand over non-contiguous ones,
    e.g. the gradient of a transposed ``batch_first`` output)."""
    if g is None:
        return None
    return _array(g.contiguous())


@contextlib.contextmanager
def _on_device(t: torch.Tensor) -> Iterator[None]:
    """Run fastrnn's CUDA kernels on ``t``'s device and on PyTorch's current stream there."""
    if t.device.type != "cuda":
        yield
        return
    import cupy

    device = t.device.index if t.device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device), cupy.cuda.ExternalStream(stream.cuda_stream, device):
        yield


def _zeros_like_array(like: Any, shape: tuple[int, ...]) -> Any:
    if isinstance(like, np.ndarray):
        return np.zeros(shape, dtype=like.dtype)
    import cupy

    return cupy.zeros(shape, dtype=like.dtype)


def _bias(b: torch.Tensor | None, like: Any, size: int) -> Any:
    return _zeros_like_array(like, (size,)) if b is None else _array(b)


def _need_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record this call (so the forward must save what backward needs)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ------------------------------------------------------------------------------------------------
# autograd Functions: one layer, one direction
# ------------------------------------------------------------------------------------------------


def _saved_context(ctx: Any, name: str) -> Any:
    """The fastrnn context of the forward; touching ``saved_tensors`` makes autograd check
    that none of the inputs was modified in place since the forward (the kernels' saved
    arrays are views of those tensors)."""
    ctx.saved_tensors  # noqa: B018 - raises if an input was modified in place
    if ctx.fr_ctx is None:
        raise RuntimeError(f"{name}: the forward pass ran without gradient tracking")
    return ctx.fr_ctx


def _zero_grad(fr_ctx: Any, name: str) -> Any:
    """Zeros for an output whose gradient autograd did not materialise (the output was unused)."""
    shape = fr_ctx.grad_shapes[name]
    if fr_ctx.cupy:
        import cupy

        return cupy.zeros(shape, dtype=fr_ctx.dtype)
    return np.zeros(shape, dtype=fr_ctx.dtype)


class LSTMFunction(torch.autograd.Function):
    """One LSTM layer in one direction on fastrnn's kernels (time-major, PyTorch's layout).

    ``LSTMFunction.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, training)``:
    x (T,N,D); h0, c0 (N,H); w_ih (4H,D); w_hh (4H,H); b_ih, b_hh (4H,) or None (no bias);
    every tensor C-contiguous, one dtype, one device; lengths None or a host int64 array (N,);
    training: save what backward needs. Returns y (T,N,H), hT (N,H), cT (N,H).

    The kernel takes one bias ``b = b_ih + b_hh``; both biases receive its gradient.
    """

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, training):
        ctx.set_materialize_grads(False)
        with _on_device(x):
            w_hh_a = _array(w_hh)
            b = _bias(b_ih, w_hh_a, w_hh.shape[0])
            if b_hh is not None:
                b = b + _array(b_hh)
            y, hT, cT, fr_ctx = _fr.lstm_forward(
                _array(x),
                _array(h0),
                _array(c0),
                _array(w_ih),
                w_hh_a,
                b,
                lengths=lengths,
                training=training,
            )
            outputs = _tensor(y), _tensor(hT), _tensor(cT)
        ctx.fr_ctx = fr_ctx
        ctx.has_bias = (b_ih is not None, b_hh is not None)
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh)
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dhT, dcT):
        fr_ctx = _saved_context(ctx, "LSTMFunction")
        with _on_device(ctx.saved_tensors[0]):
            dy_a = _zero_grad(fr_ctx, "dy") if dy is None else _grad_array(dy)
            grads = _fr.lstm_backward(fr_ctx, dy_a, _grad_array(dhT), _grad_array(dcT))
            dx, dh0, dc0, dw_ih, dw_hh, db = map(_tensor, grads)
        return (dx, dh0, dc0, dw_ih, dw_hh, *_split_bias_grad(db, ctx.has_bias), None, None)


def _split_bias_grad(db: torch.Tensor, has_bias: tuple[bool, bool]) -> tuple[Any, Any]:
    """The summed bias's gradient for both b_ih and b_hh. Two distinct tensors: autograd may
    adopt a returned gradient as a parameter's ``.grad``, and two parameters must never share
    one ``.grad`` (an in-place update of one would change the other)."""
    db_ih = db if has_bias[0] else None
    db_hh = (db.clone() if has_bias[0] else db) if has_bias[1] else None
    return db_ih, db_hh


class GRUFunction(torch.autograd.Function):
    """One GRU layer in one direction on fastrnn's kernels (gates r, z, n; PyTorch's layout).

    ``GRUFunction.apply(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, training)`` with w_ih (3H,D),
    w_hh (3H,H), b_ih, b_hh (3H,) or None; otherwise as :class:`LSTMFunction`.
    Returns y (T,N,H), hT (N,H).
    """

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, training):
        ctx.set_materialize_grads(False)
        with _on_device(x):
            w_hh_a = _array(w_hh)
            size = w_hh.shape[0]
            y, hT, fr_ctx = _fr.gru_forward(
                _array(x),
                _array(h0),
                _array(w_ih),
                w_hh_a,
                _bias(b_ih, w_hh_a, size),
                _bias(b_hh, w_hh_a, size),
                lengths=lengths,
                training=training,
            )
            outputs = _tensor(y), _tensor(hT)
        ctx.fr_ctx = fr_ctx
        ctx.has_bias = (b_ih is not None, b_hh is not None)
        ctx.save_for_backward(x, h0, w_ih, w_hh)
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dhT):
        fr_ctx = _saved_context(ctx, "GRUFunction")
        with _on_device(ctx.saved_tensors[0]):
            dy_a = _zero_grad(fr_ctx, "dy") if dy is None else _grad_array(dy)
            grads = _fr.gru_backward(fr_ctx, dy_a, _grad_array(dhT))
            dx, dh0, dw_ih, dw_hh, db_ih, db_hh = map(_tensor, grads)
        return (
            dx,
            dh0,
            dw_ih,
            dw_hh,
            db_ih if ctx.has_bias[0] else None,
            db_hh if ctx.has_bias[1] else None,
            None,
            None,
        )


class RNNFunction(torch.autograd.Function):
    """One Elman RNN layer in one direction on fastrnn's kernels.

    ``RNNFunction.apply(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, lengths, training)`` with
    w_ih (H,D), w_hh (H,H), b_ih, b_hh (H,) or None, nonlinearity "tanh" or "relu"; otherwise
    as :class:`LSTMFunction`. Returns y (T,N,H), hT (N,H).
    """

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, lengths, training):
        ctx.set_materialize_grads(False)
        with _on_device(x):
            w_hh_a = _array(w_hh)
            b = _bias(b_ih, w_hh_a, w_hh.shape[0])
            if b_hh is not None:
                b = b + _array(b_hh)
            y, hT, fr_ctx = _fr.rnn_forward(
                _array(x),
                _array(h0),
                _array(w_ih),
                w_hh_a,
                b,
                nonlinearity=nonlinearity,
                lengths=lengths,
                training=training,
            )
            outputs = _tensor(y), _tensor(hT)
        ctx.fr_ctx = fr_ctx
        ctx.has_bias = (b_ih is not None, b_hh is not None)
        ctx.save_for_backward(x, h0, w_ih, w_hh)
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dhT):
        fr_ctx = _saved_context(ctx, "RNNFunction")
        with _on_device(ctx.saved_tensors[0]):
            dy_a = _zero_grad(fr_ctx, "dy") if dy is None else _grad_array(dy)
            grads = _fr.rnn_backward(fr_ctx, dy_a, _grad_array(dhT))
            dx, dh0, dw_ih, dw_hh, db = map(_tensor, grads)
        return (dx, dh0, dw_ih, dw_hh, *_split_bias_grad(db, ctx.has_bias), None, None, None)


class Conv2dFunction(torch.autograd.Function):
    """2-D convolution on fastrnn's kernels (NCHW, PyTorch's cross-correlation).

    ``Conv2dFunction.apply(x, w, b, stride, padding, dilation, groups, training)``: x (N,C,H,W),
    w (F,C/groups,KH,KW), b (F,) or None, all C-contiguous; stride, padding, dilation: (h, w)
    pairs of ints. Returns y (N,F,OH,OW).
    """

    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation, groups, training):
        ctx.set_materialize_grads(False)
        with _on_device(x):
            y, fr_ctx = _fr.conv2d_forward(
                _array(x),
                _array(w),
                _array(b),
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                training=training,
            )
            output = _tensor(y)
        ctx.fr_ctx = fr_ctx
        ctx.save_for_backward(x, w)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        if dy is None:
            return (None,) * 8
        fr_ctx = _saved_context(ctx, "Conv2dFunction")
        with _on_device(ctx.saved_tensors[0]):
            dx, dw, db = _fr.conv2d_backward(fr_ctx, _grad_array(dy))
            dx, dw = _tensor(dx), _tensor(dw)
            db = None if db is None else _tensor(db)
        return dx, dw, db, None, None, None, None, None


class Pool2dFunction(torch.autograd.Function):
    """Max or average 2-D pooling on fastrnn's kernels (NCHW, PyTorch's defaults: floor output
    size, padding never wins a max, the average counts padding).

    ``Pool2dFunction.apply(x, kind, kernel_size, stride, padding, training)``: x (N,C,H,W)
    C-contiguous; kind "max" or "avg"; kernel_size, stride, padding: (h, w) pairs.
    Returns y (N,C,OH,OW).
    """

    @staticmethod
    def forward(ctx, x, kind, kernel_size, stride, padding, training):
        ctx.set_materialize_grads(False)
        forward = _fr.max_pool2d_forward if kind == "max" else _fr.avg_pool2d_forward
        with _on_device(x):
            y, fr_ctx = forward(_array(x), kernel_size, stride, padding, training=training)
            output = _tensor(y)
        ctx.fr_ctx = fr_ctx
        ctx.kind = kind
        ctx.save_for_backward(x)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        if dy is None:
            return (None,) * 6
        fr_ctx = _saved_context(ctx, "Pool2dFunction")
        backward = _fr.max_pool2d_backward if ctx.kind == "max" else _fr.avg_pool2d_backward
        with _on_device(ctx.saved_tensors[0]):
            dx = _tensor(backward(fr_ctx, _grad_array(dy)))
        return dx, None, None, None, None, None


# ------------------------------------------------------------------------------------------------
# recurrent modules
# ------------------------------------------------------------------------------------------------


def _check_dtype(name: str, dtype: Any) -> None:
    if dtype is not None and dtype not in _DTYPES:
        raise TypeError(f"{name}: fastrnn supports float32 and float64, got {dtype}")


def _host_lengths(lengths: Any, T: int, N: int) -> np.ndarray | None:
    """``lengths`` (tensor, NumPy array, list) -> validated host int64 array (N,) or None."""
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.detach().cpu().numpy()
    return check_lengths(lengths, T, N)


def _reverser(lengths: np.ndarray | None, T: int, device: torch.device) -> Any:
    """A function that reverses (T, N, F) sequences in time, each within its own length
    (positions past a length stay where they are: the kernels ignore them there)."""
    if lengths is None:
        return lambda a: a.flip(0)
    t = torch.arange(T, device=device)[:, None]
    L = torch.from_numpy(lengths).to(device)[None, :]
    index = torch.where(t < L, L - 1 - t, t)  # (T, N); an involution

    def reverse(a: torch.Tensor) -> torch.Tensor:
        return a.gather(0, index[:, :, None].expand(-1, -1, a.shape[2]))

    return reverse


class _RecurrentMixin:
    """forward() of the recurrent drop-ins; the parameters and their initialisation are
    torch.nn's own (the subclasses inherit them)."""

    _n_states = 1  # hidden state tensors: 2 for LSTM (h, c)

    def _check_supported(self) -> None:
        if getattr(self, "proj_size", 0):
            raise ValueError(
                f"proj_size: fastrnn.torch.{type(self).__name__} has no projection kernel "
                f"(got proj_size={self.proj_size}); use torch.nn.LSTM for projections"
            )
        for name, p in self.named_parameters():
            _check_dtype(name, p.dtype)
        # Names of (w_ih, w_hh, b_ih, b_hh) per layer and direction, in hx order; looked up with
        # getattr at each call so torch.func.functional_call and load_state_dict just work.
        dirs = 2 if self.bidirectional else 1
        self._fr_weight_names = []
        for layer in range(self.num_layers):
            for d in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                names = [f"weight_ih{sfx}", f"weight_hh{sfx}"]
                names += [f"bias_ih{sfx}", f"bias_hh{sfx}"] if self.bias else [None, None]
                self._fr_weight_names.append(names)

    def _weights(self, k: int) -> list[torch.Tensor | None]:
        return [None if n is None else getattr(self, n) for n in self._fr_weight_names[k]]

    def _cell(self, x, states, weights, lengths):
        raise NotImplementedError

    def _initial_states(self, hx: Any, x: torch.Tensor, unbatched: bool) -> list[torch.Tensor]:
        dirs = 2 if self.bidirectional else 1
        shape = (self.num_layers * dirs, x.shape[1], self.hidden_size)
        if hx is None:
            zeros = torch.zeros(shape, dtype=x.dtype, device=x.device)
            return [zeros] * self._n_states
        if self._n_states == 2:
            if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise TypeError("hx: expected a tuple (h_0, c_0) of tensors")
            names, hx = ("hx[0] (h_0)", "hx[1] (c_0)"), list(hx)
        else:
            names, hx = ("hx",), [hx]
        states = []
        for name, h in zip(names, hx, strict=True):
            if not isinstance(h, torch.Tensor):
                raise TypeError(f"{name}: expected a tensor, got {type(h).__name__}")
            if unbatched:
                if h.dim() != 2:
                    raise ValueError(
                        f"{name}: for unbatched input expected 2 dimensions, got {tuple(h.shape)}"
                    )
                h = h.unsqueeze(1)
            if tuple(h.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(h.shape)}")
            if h.dtype != x.dtype:
                raise TypeError(f"{name}: dtype {h.dtype} differs from the input's {x.dtype}")
            if h.device != x.device:
                raise ValueError(f"{name}: on {h.device} but the input is on {x.device}")
            states.append(h.contiguous())
        return states

    def forward(self, input: Any, hx: Any = None, *, lengths: Any = None) -> Any:
        """Same as torch.nn's ``forward(input, hx)``; padded input may also carry ``lengths``
        (integers of shape (N,), each in 1..T): outputs past a sequence's end are zero and the
        final states are those after its last step, as with a PackedSequence."""
        packed = isinstance(input, PackedSequence)
        unbatched = False
        if packed:
            if lengths is not None:
                raise ValueError("lengths: a PackedSequence carries its own lengths")
            x, lens = pad_packed_sequence(input)  # (T, N, D), original batch order
            host_lengths = lens.numpy().astype(np.int64)
        else:
            if not isinstance(input, torch.Tensor):
                raise TypeError(
                    f"input: expected a tensor or a PackedSequence, got {type(input).__name__}"
                )
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"input: expected 3 dimensions ({'N, T' if self.batch_first else 'T, N'}, "
                    f"D) or 2 (T, D) unbatched, got shape {tuple(input.shape)}"
                )
            unbatched = input.dim() == 2
            if unbatched:
                x = input.unsqueeze(1)
            else:
                x = input.transpose(0, 1) if self.batch_first else input
            host_lengths = _host_lengths(lengths, x.shape[0], x.shape[1])
        if x.dtype not in _DTYPES:
            raise TypeError(f"input: fastrnn supports float32 and float64, got {x.dtype}")
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"input: expected {self.input_size} features (input_size), got shape "
                f"{tuple(x.shape)}"
            )
        w = self.weight_hh_l0
        if w.dtype != x.dtype:
            raise TypeError(f"input: dtype {x.dtype} differs from the parameters' {w.dtype}")
        if w.device != x.device:
            raise ValueError(f"input: on {x.device} but the parameters are on {w.device}")
        if x.device.type not in ("cpu", "cuda"):
            raise ValueError(f"input: device {x.device} is not supported (cpu or cuda)")
        states = self._initial_states(hx, x, unbatched)

        output, finals = self._layers(x.contiguous(), states, host_lengths)

        if packed:
            sorted_indices = input.sorted_indices
            if sorted_indices is not None:
                output = output.index_select(1, sorted_indices)
                lens = lens[sorted_indices.cpu()]
            data = pack_padded_sequence(output, lens, enforce_sorted=True).data
            output = PackedSequence(
                data, input.batch_sizes, input.sorted_indices, input.unsorted_indices
            )
        elif unbatched:
            output = output.squeeze(1)
            finals = [f.squeeze(1) for f in finals]
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, (tuple(finals) if self._n_states == 2 else finals[0])

    def _layers(self, x, states, lengths):
        dirs = 2 if self.bidirectional else 1
        reverse = _reverser(lengths, x.shape[0], x.device) if dirs == 2 else None
        finals: list[list[torch.Tensor]] = [[] for _ in states]
        out = x
        for layer in range(self.num_layers):
            if layer and self.dropout and self.training:
                out = F.dropout(out, self.dropout, training=True)
            ys = []
            for d in range(dirs):
                k = layer * dirs + d
                inp = reverse(out) if d else out
                y, *last = self._cell(inp, [s[k] for s in states], self._weights(k), lengths)
                ys.append(reverse(y) if d else y)
                for i, h in enumerate(last):
                    finals[i].append(h)
            out = ys[0] if dirs == 1 else torch.cat(ys, dim=2)
        if len(finals[0]) == 1:
            return out, [f[0].unsqueeze(0) for f in finals]
        return out, [torch.stack(f) for f in finals]


class LSTM(_RecurrentMixin, nn.LSTM):
    """``torch.nn.LSTM`` on fastrnn's kernels. Same arguments, parameters and outputs;
    ``forward(input, hx=None, *, lengths=None)``. ``proj_size`` must be 0."""

    _n_states = 2

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
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        _check_dtype("dtype", dtype)
        if proj_size:
            raise ValueError(
                f"proj_size: fastrnn.torch.LSTM has no projection kernel (got proj_size="
                f"{proj_size}); use torch.nn.LSTM for projections"
            )
        super().__init__(
            input_size,
            hidden_size,
            num_layers=num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            proj_size=proj_size,
            device=device,
            dtype=dtype,
        )
        self._check_supported()

    def _cell(self, x, states, weights, lengths):
        w_ih, w_hh, b_ih, b_hh = weights
        h0, c0 = states
        training = _need_grad(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
        return LSTMFunction.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, training)


class GRU(_RecurrentMixin, nn.GRU):
    """``torch.nn.GRU`` on fastrnn's kernels. Same arguments, parameters and outputs;
    ``forward(input, hx=None, *, lengths=None)``."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        _check_dtype("dtype", dtype)
        super().__init__(
            input_size,
            hidden_size,
            num_layers=num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            device=device,
            dtype=dtype,
        )
        self._check_supported()

    def _cell(self, x, states, weights, lengths):
        w_ih, w_hh, b_ih, b_hh = weights
        (h0,) = states
        training = _need_grad(x, h0, w_ih, w_hh, b_ih, b_hh)
        return GRUFunction.apply(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, training)


class RNN(_RecurrentMixin, nn.RNN):
    """``torch.nn.RNN`` (Elman, ``nonlinearity`` "tanh" or "relu") on fastrnn's kernels. Same
    arguments, parameters and outputs; ``forward(input, hx=None, *, lengths=None)``."""

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
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        _check_dtype("dtype", dtype)
        super().__init__(
            input_size,
            hidden_size,
            num_layers=num_layers,
            nonlinearity=nonlinearity,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            device=device,
            dtype=dtype,
        )
        self._check_supported()

    def _cell(self, x, states, weights, lengths):
        w_ih, w_hh, b_ih, b_hh = weights
        (h0,) = states
        training = _need_grad(x, h0, w_ih, w_hh, b_ih, b_hh)
        return RNNFunction.apply(
            x, h0, w_ih, w_hh, b_ih, b_hh, self.nonlinearity, lengths, training
        )


# ------------------------------------------------------------------------------------------------
# convolution
# ------------------------------------------------------------------------------------------------


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` on fastrnn's kernels. Same arguments, parameters and outputs;
    ``padding`` may be an int, a pair, ``"valid"`` or ``"same"``; ``padding_mode`` must be
    ``"zeros"``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        _check_dtype("dtype", dtype)
        if padding_mode != "zeros":
            raise ValueError(
                f"padding_mode: fastrnn.torch.Conv2d pads with zeros only, got {padding_mode!r}"
            )
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        for name, p in self.named_parameters():
            _check_dtype(name, p.dtype)

    def _padding(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Symmetric (h, w) padding for the kernel; for ``"same"`` with an odd total padding,
        the one extra row/column goes to the bottom/right, as PyTorch does, through F.pad."""
        if self.padding == "valid":
            return x, (0, 0)
        if self.padding != "same":
            return x, (int(self.padding[0]), int(self.padding[1]))
        left, extra = [], []
        for d, k in zip(self.dilation, self.kernel_size, strict=True):
            total = d * (k - 1)
            left.append(total // 2)
            extra.append(total - 2 * (total // 2))
        if extra[0] or extra[1]:
            x = F.pad(x, [0, extra[1], 0, extra[0]])
        return x, (left[0], left[1])

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.weight, self.bias)

    def _conv_forward(self, input, weight, bias):
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input: expected a tensor, got {type(input).__name__}")
        if input.dim() not in (3, 4):
            raise ValueError(
                f"input: expected 4 dimensions (N, C, H, W) or 3 (C, H, W), got shape "
                f"{tuple(input.shape)}"
            )
        if input.dtype not in _DTYPES:
            raise TypeError(f"input: fastrnn supports float32 and float64, got {input.dtype}")
        if weight.dtype != input.dtype:
            raise TypeError(
                f"input: dtype {input.dtype} differs from the parameters' {weight.dtype}"
            )
        if weight.device != input.device:
            raise ValueError(f"input: on {input.device} but the parameters are on {weight.device}")
        unbatched = input.dim() == 3
        x = input.unsqueeze(0) if unbatched else input
        x, padding = self._padding(x)
        x, weight = x.contiguous(), weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        y = Conv2dFunction.apply(
            x,
            weight,
            bias,
            tuple(self.stride),
            padding,
            tuple(self.dilation),
            self.groups,
            _need_grad(x, weight, bias),
        )
        return y.squeeze(0) if unbatched else y


# ------------------------------------------------------------------------------------------------
# pooling
# ------------------------------------------------------------------------------------------------


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _pool(module: nn.Module, kind: str, input: Any) -> torch.Tensor:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input: expected a tensor, got {type(input).__name__}")
    if input.dim() not in (3, 4):
        raise ValueError(
            f"input: expected 4 dimensions (N, C, H, W) or 3 (C, H, W), got shape "
            f"{tuple(input.shape)}"
        )
    if input.dtype not in _DTYPES:
        raise TypeError(f"input: fastrnn supports float32 and float64, got {input.dtype}")
    if input.device.type not in ("cpu", "cuda"):
        raise ValueError(f"input: device {input.device} is not supported (cpu or cuda)")
    unbatched = input.dim() == 3
    x = (input.unsqueeze(0) if unbatched else input).contiguous()
    kernel_size = _pair(module.kernel_size)
    stride = kernel_size if module.stride is None else _pair(module.stride)
    y = Pool2dFunction.apply(x, kind, kernel_size, stride, _pair(module.padding), _need_grad(x))
    return y.squeeze(0) if unbatched else y


class MaxPool2d(nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` on fastrnn's kernels. ``dilation`` must be 1, ``return_indices``
    and ``ceil_mode`` False."""

    def __init__(
        self,
        kernel_size: Any,
        stride: Any = None,
        padding: Any = 0,
        dilation: Any = 1,
        return_indices: bool = False,
        ceil_mode: bool = False,
    ) -> None:
        if _pair(dilation) != (1, 1):
            raise ValueError(f"dilation: fastrnn's max pooling is not dilated, got {dilation!r}")
        if return_indices:
            raise ValueError("return_indices: fastrnn's max pooling does not return indices")
        if ceil_mode:
            raise ValueError("ceil_mode: fastrnn's pooling uses the floor output size only")
        super().__init__(kernel_size, stride, padding, dilation, return_indices, ceil_mode)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _pool(self, "max", input)


class AvgPool2d(nn.AvgPool2d):
    """``torch.nn.AvgPool2d`` on fastrnn's kernels. ``ceil_mode`` must be False,
    ``count_include_pad`` True and ``divisor_override`` None (PyTorch's defaults)."""

    def __init__(
        self,
        kernel_size: Any,
        stride: Any = None,
        padding: Any = 0,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        divisor_override: int | None = None,
    ) -> None:
        if ceil_mode:
            raise ValueError("ceil_mode: fastrnn's pooling uses the floor output size only")
        if not count_include_pad:
            raise ValueError("count_include_pad: fastrnn's average pooling counts the padding")
        if divisor_override is not None:
            raise ValueError("divisor_override: fastrnn's average pooling divides by the window")
        super().__init__(
            kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _pool(self, "avg", input)
