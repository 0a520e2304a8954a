"""``torch.nn`` drop-ins whose forward calls fastrnn's custom operators (fastrnn/torch/_ops.py).

The classes subclass their ``torch.nn`` twins: constructor arguments and checks, parameters,
initialisation, ``state_dict``, ``repr`` and the forward's argument checks are torch.nn's own
(the forward calls torch.nn's ``check_forward_args``), so the same mistakes raise the same
exception types. Only the computation differs: one ``torch.ops.fastrnn`` operator per layer and
direction. Everything here is plain torch code that torch.compile traces without a break.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fastrnn.torch import _ops
from fastrnn.torch._arrays import array

Tensor = torch.Tensor
_DTYPES = (torch.float32, torch.float64)
# the kernels' devices, and meta tensors (shapes only, through the operators' fake kernels)
_DEVICES = ("cpu", "cuda", "meta")

_NOT_SCRIPTABLE = (
    "fastrnn.torch.{name} cannot be compiled by torch.jit.script: its forward takes a "
    "keyword-only `lengths` and handles PackedSequence and unbatched input in Python, which "
    "TorchScript does not accept. Use torch.compile or torch.export (the fastrnn operators are "
    "single graph nodes there), or torch.jit.trace for a fixed input layout."
)


def _check_dtype(name: str, dtype: Any) -> None:
    if dtype not in _DTYPES:
        raise TypeError(f"{name}: fastrnn supports float32 and float64, got {dtype}")


def _check_dtype_argument(kwargs: dict[str, Any]) -> None:
    """The constructor's ``dtype=``, checked before torch.nn allocates parameters in it."""
    if kwargs.get("dtype") is not None:
        _check_dtype("dtype", kwargs["dtype"])


def _needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd records this call (so the forward must save what backward needs).
    Always under torch.jit.trace: the traced graph keeps the flag as a constant and may be
    trained."""
    if torch.jit.is_tracing():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ------------------------------------------------------------------------------------------------
# recurrent layers
# ------------------------------------------------------------------------------------------------


def _lengths_tensor(lengths: Any, N: int) -> Tensor:
    """``lengths`` (tensor, list, NumPy array) as an int64 CPU tensor of shape (N,); the values
    (each in 1..T) are checked by the operator, on the host."""
    lengths = torch.as_tensor(lengths)
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"lengths: expected integers, got dtype {lengths.dtype}")
    if lengths.dim() != 1 or lengths.shape[0] != N:
        raise ValueError(
            f"lengths: expected shape ({N},) (one length per sequence), got {tuple(lengths.shape)}"
        )
    return lengths.to(device="cpu", dtype=torch.int64)


def _reverser(lengths: Tensor | None, T: int, device: torch.device) -> Any:
    """A function that reverses (T, N, F) sequences in time, each within its own length
    (positions past a length stay where they are: the kernels ignore them there)."""
    if lengths is None:
        return lambda a: a.flip(0)
    t = torch.arange(T, device=device)[:, None]
    L = lengths.to(device)[None, :]
    index = torch.where(t < L, L - 1 - t, t)  # (T, N); an involution

    def reverse(a: Tensor) -> Tensor:
        return a.gather(0, index[:, :, None].expand(-1, -1, a.shape[2]))

    return reverse


class _Recurrent:
    """The forward of the recurrent drop-ins; parameters, initialisation and argument checks
    are torch.nn's (the subclasses inherit them)."""

    _n_states = 1  # hidden state tensors: 2 for LSTM (h, c)

    def _fr_setup(self) -> None:
        for name, p in self.named_parameters():
            _check_dtype(name, p.dtype)
        # Names of (w_ih, w_hh, b_ih, b_hh[, w_hr]) per layer and direction, in hx order; looked
        # up with getattr at each call so torch.func.functional_call and load_state_dict work.
        dirs = 2 if self.bidirectional else 1
        projected = getattr(self, "proj_size", 0) > 0
        self._fr_weight_names = []
        for layer in range(self.num_layers):
            for d in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                names = [f"weight_ih{sfx}", f"weight_hh{sfx}"]
                names += [f"bias_ih{sfx}", f"bias_hh{sfx}"] if self.bias else [None, None]
                if self._n_states == 2:
                    names.append(f"weight_hr{sfx}" if projected else None)
                self._fr_weight_names.append(names)

    def __prepare_scriptable__(self) -> Any:
        raise RuntimeError(_NOT_SCRIPTABLE.format(name=type(self).__name__))

    def _weights(self, k: int) -> list[Tensor | None]:
        return [None if n is None else getattr(self, n) for n in self._fr_weight_names[k]]

    def _cell(self, x, states, weights, lengths):
        raise NotImplementedError

    def _hx(self, hx: Any, is_batched: bool) -> Any:
        """torch.nn's checks of the initial state's dimensions (RuntimeError); unbatched states
        get their batch dimension."""
        if hx is None:
            return None
        if self._n_states == 2:
            h, c = hx[0], hx[1]
            if is_batched:
                if h.dim() != 3 or c.dim() != 3:
                    raise RuntimeError(
                        "For batched 3-D input, hx and cx should also be 3-D but got "
                        f"({h.dim()}-D, {c.dim()}-D) tensors"
                    )
                return h, c
            if h.dim() != 2 or c.dim() != 2:
                raise RuntimeError(
                    "For unbatched 2-D input, hx and cx should also be 2-D but got "
                    f"({h.dim()}-D, {c.dim()}-D) tensors"
                )
            return h.unsqueeze(1), c.unsqueeze(1)
        if is_batched:
            if hx.dim() != 3:
                raise RuntimeError(
                    f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor"
                )
            return hx
        if hx.dim() != 2:
            raise RuntimeError(
                f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor"
            )
        return hx.unsqueeze(1)

    def forward(self, input: Any, hx: Any = None, *, lengths: Any = None) -> Any:
        """Same as torch.nn's ``forward(input, hx)``; padded input may also carry ``lengths``
        (integers of shape (N,), each in 1..T): outputs past a sequence's end are zero and the
        final states are those after its last step, as with a PackedSequence."""
        if lengths is None and not torch.is_grad_enabled():
            stepped = _one_step(self, input, hx)
            if stepped is not None:
                return stepped
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError("lengths: a PackedSequence carries its own lengths")
            check_input, batch_sizes = input.data, input.batch_sizes
            x, lens = pad_packed_sequence(input)  # (T, N, D), the caller's batch order
            lengths = lens.to(torch.int64)
            is_batched = True
        else:
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"{type(self).__name__}: Expected input to be 2D or 3D, got "
                    f"{input.dim()}D tensor instead"
                )
            is_batched = input.dim() == 3
            batch_sizes = None
            check_input = input if is_batched else input.unsqueeze(0 if self.batch_first else 1)
            x = check_input.transpose(0, 1) if self.batch_first else check_input
        hx = self._hx(hx, is_batched)
        N = x.shape[1]
        if hx is None:
            # zero initial states: per state, a list of every layer's (N, H) zeros (what
            # _layers indexes), one tensor (only read) instead of slices of a stacked one
            states = self._zeros(N, x)
            if not self._shapes_as_expected(check_input, None, batch_sizes):
                stacked = [torch.stack(s) for s in states]  # torch.nn's checks of the input
                self.check_forward_args(check_input, tuple(stacked) if len(stacked) == 2
                                        else stacked[0], batch_sizes)  # fmt: skip
            self._check_kernel_args(x, [])
        else:
            states = list(hx) if self._n_states == 2 else [hx]
            if not self._shapes_as_expected(check_input, hx, batch_sizes):
                self.check_forward_args(check_input, hx, batch_sizes)  # torch.nn's checks, errors
            self._check_kernel_args(x, states)
        if lengths is not None and not packed:
            lengths = _lengths_tensor(lengths, N)

        output, finals = self._layers(x.contiguous(), states, lengths)

        if packed:
            sorted_indices = input.sorted_indices
            if sorted_indices is not None:
                output = output.index_select(1, sorted_indices)
                lens = lens[sorted_indices.cpu()]
            data = pack_padded_sequence(output, lens, enforce_sorted=True).data
            output = PackedSequence(
                data, input.batch_sizes, input.sorted_indices, input.unsorted_indices
            )
        elif not is_batched:
            output = output.squeeze(1)
            finals = [f.squeeze(1) for f in finals]
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, (tuple(finals) if self._n_states == 2 else finals[0])

    def _zeros(self, N: int, x: Tensor) -> list[list[Tensor]]:
        """Zero initial states as ``[h_layers, c_layers]`` (LSTM) or ``[h_layers]``: lists of
        (N, H) tensors, one per layer and direction, all the same zeros tensor (only read)."""
        layers = self.num_layers * (2 if self.bidirectional else 1)
        zeros = torch.zeros((N, self.hidden_size), dtype=x.dtype, device=x.device)
        if self._n_states == 1:
            return [[zeros] * layers]
        if self.proj_size > 0:
            h = torch.zeros((N, self.proj_size), dtype=x.dtype, device=x.device)
            return [[h] * layers, [zeros] * layers]
        return [[zeros] * layers, [zeros] * layers]

    def _shapes_as_expected(self, input: Tensor, hx: Any, batch_sizes: Any) -> bool:
        """The usual call, in a few attribute reads: a 3-D input of input_size features in the
        weights' dtype and states of exactly the expected shapes, so torch.nn's
        check_forward_args (which the forward runs otherwise, for its errors) has nothing to
        say. It costs ~8 us per call on small shapes, as much as a small kernel."""
        if batch_sizes is not None or input.dim() != 3 or input.shape[2] != self.input_size:
            return False
        if input.dtype != self.weight_ih_l0.dtype:
            return False
        if hx is None:
            return True  # zero states made to measure
        n = input.shape[0] if self.batch_first else input.shape[1]
        layers = self.num_layers * (2 if self.bidirectional else 1)
        if self._n_states == 2:
            h, c = hx
            out = self.proj_size if self.proj_size > 0 else self.hidden_size
            return h.shape == (layers, n, out) and c.shape == (layers, n, self.hidden_size)
        return hx.shape == (layers, n, self.hidden_size)

    def _check_kernel_args(self, x: Tensor, states: list[Tensor]) -> None:
        """What torch.nn checks in C++ (RuntimeError) and what fastrnn's kernels need."""
        w = self.weight_hh_l0
        if x.is_cpu and w.is_cpu and x.dtype in _DTYPES and x.shape[0] > 0:
            dtype = x.dtype
            if all(h.is_cpu and h.dtype == dtype for h in states):
                return  # the usual CPU call: nothing below can raise
        if x.dtype not in _DTYPES:
            raise TypeError(f"input: fastrnn supports float32 and float64, got {x.dtype}")
        if x.shape[0] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        w = self.weight_hh_l0
        if w.device != x.device:
            raise RuntimeError(
                f"Input and parameter tensors are not at the same device, found input tensor "
                f"at {x.device} and parameter tensor at {w.device}"
            )
        if x.device.type not in _DEVICES:
            raise RuntimeError(f"input: device {x.device} is not supported (cpu or cuda)")
        for name, h in zip(("hx", "cx"), states, strict=False):
            if h.device != x.device:
                raise RuntimeError(
                    f"Input and hidden tensors are not at the same device, found input tensor "
                    f"at {x.device} and hidden tensor ({name}) at {h.device}"
                )
            if h.dtype != x.dtype:
                raise RuntimeError(f"{name}: expected dtype {x.dtype} (the input's), got {h.dtype}")

    def _layers(self, x, states, lengths):
        dirs = 2 if self.bidirectional else 1
        infer = _prepared_inference(self, x, states)
        reverse = _reverser(lengths, x.shape[0], x.device) if dirs == 2 else None
        finals: list[list[Tensor]] = [[] for _ in states]
        out = x
        for layer in range(self.num_layers):
            if layer and self.dropout and self.training:
                out = F.dropout(out, self.dropout, training=True)
            ys = []
            for d in range(dirs):
                k = layer * dirs + d
                inp = reverse(out) if d else out
                state_k = [s[k] for s in states]
                if infer:
                    y, *last = _infer(self, k, inp, state_k, lengths)
                else:
                    y, *last = self._cell(inp, state_k, self._weights(k), lengths)
                ys.append(reverse(y) if d else y)
                for i, h in enumerate(last):
                    finals[i].append(h)
            out = ys[0] if dirs == 1 else torch.cat(ys, dim=2)
        if len(finals[0]) == 1:
            return out, [f[0].unsqueeze(0) for f in finals]
        return out, [torch.stack(f) for f in finals]


# -- inference through prepared layers -----------------------------------------------------------
#
# Under no_grad / inference_mode on the CPU, outside anything that traces, each layer and
# direction runs on a prepared layer (fastrnn.lstm_inference etc.: weights validated and copied
# once; a one-step call is one call into the extension). A prepared layer is reused while its
# parameters are the same tensors at the same versions: any in-place update (an optimizer step,
# load_state_dict, ``p.data.copy_``) bumps a version counter and the next call prepares again.
# The cache lives outside the module (a weak mapping), so pickling and deepcopy never see it.

_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _prepared_inference(module: _Recurrent, x: Tensor, states: list[Any]) -> bool:
    """Whether this call can run on prepared layers: CPU, no gradient recorded, no tracing.
    ``states``: the caller's (layers, N, H) state tensors, or the forward's own zero states
    (lists of per-layer tensors: plain, never requiring grad, so not checked)."""
    if torch.is_grad_enabled() and module.weight_hh_l0.requires_grad:
        return False  # the usual training call, decided at once
    if x.device.type != "cpu" or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._is_torch_function_mode_enabled():
        return False
    states = [s for s in states if isinstance(s, Tensor)]
    if torch.is_grad_enabled():
        params = [w for ws in map(module._weights, range(len(module._fr_weight_names)))
                  for w in ws if w is not None]
        if _needs_grad(x, *states, *params):
            return False
        return _ops._untraced([x, *states, *params])
    # nothing records gradients: the parameters only need to be plain CPU tensors (checked
    # on one; they share a device with x, which _check_kernel_args has seen)
    return _ops._untraced([x, *states, module.weight_hh_l0])


def _prepared(module: _Recurrent, k: int) -> Any:
    # the parameters as module._weights(k) finds them, without nn.Module.__getattr__ where the
    # name is a plain parameter (functional_call swaps tensors in _parameters too)
    params = module._parameters
    weights = [
        None if n is None else params[n] if n in params else getattr(module, n)
        for n in module._fr_weight_names[k]
    ]
    key = tuple((id(w), w._version, w.data_ptr()) if w is not None else None for w in weights)
    cache = _PREPARED.get(module)
    if cache is None:
        cache = _PREPARED[module] = {}
    hit = cache.get(k)
    if hit is not None and hit[0] == key:
        return hit[1]
    from fastrnn.inference import gru_inference, lstm_inference, rnn_inference

    w_ih, w_hh, b_ih, b_hh = (None if w is None else w.detach().numpy() for w in weights[:4])
    if b_ih is None:
        b_ih = b_hh = np.zeros(w_hh.shape[0], w_hh.dtype)
    if module._n_states == 2:
        w_hr = weights[4].detach().numpy() if weights[4] is not None else None
        run = lstm_inference(w_ih, w_hh, b_ih + b_hh, w_hr=w_hr)
    elif isinstance(module, nn.GRU):
        run = gru_inference(w_ih, w_hh, b_ih, b_hh)
    else:
        run = rnn_inference(w_ih, w_hh, b_ih + b_hh, nonlinearity=module.nonlinearity)
    cache[k] = (key, run)
    return run


def _infer(module: _Recurrent, k: int, x: Tensor, states: list[Tensor], lengths: Any) -> Any:
    """(y, hT[, cT]) of layer-direction k through its prepared layer: one step as one call,
    a longer sequence through the kernels' forward without saving anything."""
    run = _prepared(module, k)
    xa = array(x)
    hs = [array(s) for s in states]
    if xa.shape[0] == 1 and lengths is None:
        out = run.step(xa[0], *hs)
        out = out if isinstance(out, tuple) else (out,)
        finals = [torch.from_numpy(o) for o in out]
        return (finals[0].clone().unsqueeze(0), *finals)
    out = run(xa, *hs, lengths=None if lengths is None else lengths.numpy())
    return tuple(torch.from_numpy(o) for o in out)


def _one_step(module: _Recurrent, input: Any, hx: Any) -> Any:
    """The streaming call, cheaply: one time step of a unidirectional module on CPU tensors
    under no_grad / inference_mode, batched contiguous input and a well-formed state (or none),
    every layer one call of its prepared layer (whose step runs no OpenMP region). None for
    anything else: the general path then runs, with torch.nn's checks and errors. (Every check
    here is one of the cheapest spellings: this call is a few microseconds in all.)"""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # first: Dynamo stops here
        return None
    w = module._parameters.get("weight_hh_l0")
    if w is None:
        w = module.weight_hh_l0
    dtype = w.dtype
    if (
        type(input) is not Tensor
        or input.dtype is not dtype
        or input.dim() != 3
        or not input.is_cpu
        or input.requires_grad
        or not input.is_contiguous()
        or module.bidirectional
        or torch._C._len_torch_dispatch_stack()  # what _ops._untraced checks, for plain tensors
        or torch._C._functorch.peek_interpreter_stack() is not None
        or torch._C._is_torch_function_mode_enabled()
        or type(w) not in _ops._PLAIN
        or not w.is_cpu
    ):
        return None
    batch_first = module.batch_first
    T, N, D = input.shape
    if batch_first:
        T, N = N, T
    L, H = module.num_layers, module.hidden_size
    lstm = module._n_states == 2
    P = (module.proj_size or H) if lstm else H
    if T != 1 or D != module.input_size:
        return None
    np_dtype = _NP_DTYPES[dtype]
    if hx is None:
        hs = [np.zeros((L, N, P), np_dtype)]
        if lstm:
            hs.append(np.zeros((L, N, H), np_dtype))
    else:
        if lstm and (type(hx) is not tuple or len(hx) != 2):
            return None
        hs = []
        for t, shape in zip(hx if lstm else (hx,), ((L, N, P), (L, N, H)), strict=False):
            if (type(t) is not Tensor or t.dtype is not dtype or t.shape != shape
                    or not t.is_cpu or t.requires_grad or not t.is_contiguous()):
                return None
            hs.append(t.numpy())
    x = input.numpy().reshape(N, D)
    outs = [np.empty((L, N, P), np_dtype)]
    if lstm:
        outs.append(np.empty((L, N, H), np_dtype))
    for layer in range(L):
        run = _prepared(module, layer)
        if lstm:
            run.step(x, hs[0][layer], hs[1][layer], out=(outs[0][layer], outs[1][layer]))
        else:
            run.step(x, hs[0][layer], out=outs[0][layer])
        x = outs[0][layer]
    y = torch.from_numpy(x.reshape((N, 1, P) if batch_first else (1, N, P)).copy())
    if lstm:
        return y, (torch.from_numpy(outs[0]), torch.from_numpy(outs[1]))
    return y, torch.from_numpy(outs[0])


_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


class LSTM(_Recurrent, nn.LSTM):
    """``torch.nn.LSTM`` on fastrnn's kernels: same arguments (``proj_size`` included),
    parameters, outputs and errors; ``forward(input, hx=None, *, lengths=None)``."""

    _n_states = 2

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _check_dtype_argument(kwargs)
        super().__init__(*args, **kwargs)
        self._fr_setup()

    def _cell(self, x, states, weights, lengths):
        w_ih, w_hh, b_ih, b_hh, w_hr = weights
        h0, c0 = states
        training = _needs_grad(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
        y, hT, cT, _ = _ops.call(
            _ops.lstm, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, training
        )
        return y, hT, cT


class GRU(_Recurrent, nn.GRU):
    """``torch.nn.GRU`` on fastrnn's kernels: same arguments, parameters, outputs and errors;
    ``forward(input, hx=None, *, lengths=None)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _check_dtype_argument(kwargs)
        super().__init__(*args, **kwargs)
        self._fr_setup()

    def _cell(self, x, states, weights, lengths):
        w_ih, w_hh, b_ih, b_hh = weights
        (h0,) = states
        training = _needs_grad(x, h0, w_ih, w_hh, b_ih, b_hh)
        y, hT, _ = _ops.call(_ops.gru, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, training)
        return y, hT


class RNN(_Recurrent, nn.RNN):
    """``torch.nn.RNN`` (Elman, ``nonlinearity`` "tanh" or "relu") on fastrnn's kernels: same
    arguments, parameters, outputs and errors; ``forward(input, hx=None, *, lengths=None)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _check_dtype_argument(kwargs)
        super().__init__(*args, **kwargs)
        self._fr_setup()

    def _cell(self, x, states, weights, lengths):
        w_ih, w_hh, b_ih, b_hh = weights
        (h0,) = states
        training = _needs_grad(x, h0, w_ih, w_hh, b_ih, b_hh)
        y, hT, _ = _ops.call(
            _ops.rnn, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, self.nonlinearity, training
        )
        return y, hT


# ------------------------------------------------------------------------------------------------
# convolution
# ------------------------------------------------------------------------------------------------


def _check_image(input: Any, what: str) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"input: expected a tensor, got {type(input).__name__}")
    if input.dim() not in (3, 4):
        raise RuntimeError(
            f"Expected 3D (unbatched) or 4D (batched) input to {what}, but got input of size: "
            f"{list(input.shape)}"
        )
    if input.dtype not in _DTYPES:
        raise TypeError(f"input: fastrnn supports float32 and float64, got {input.dtype}")
    if input.device.type not in _DEVICES:
        raise RuntimeError(f"input: device {input.device} is not supported (cpu or cuda)")


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` on fastrnn's kernels: same arguments, parameters, outputs and errors;
    ``padding`` may be an int, a pair, ``"valid"`` or ``"same"``; ``padding_mode`` must be
    ``"zeros"``.

    One argument more, keyword-only: ``activation="relu"`` applies ReLU in the kernel's store
    (the same result and gradients as ``torch.relu(conv(x))``, one pass over the output less
    each way); :func:`fastrnn.torch.fuse` sets it where a model applies ReLU right after the
    convolution. The state_dict is torch.nn.Conv2d's either way."""

    activation: str | None = None  # also for modules pickled before it existed

    def __init__(self, *args: Any, activation: str | None = None, **kwargs: Any) -> None:
        _check_dtype_argument(kwargs)
        if activation is not None and activation != "relu":
            raise ValueError(f"activation: expected None or 'relu', got {activation!r}")
        super().__init__(*args, **kwargs)
        self.activation = activation
        if self.padding_mode != "zeros":
            raise ValueError(
                "padding_mode: fastrnn.torch.Conv2d pads with zeros only, got "
                f"{self.padding_mode!r}"
            )
        for name, p in self.named_parameters():
            _check_dtype(name, p.dtype)

    def __prepare_scriptable__(self) -> Any:
        raise RuntimeError(_NOT_SCRIPTABLE.format(name=type(self).__name__))

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.activation is None else f"{s}, activation={self.activation!r}"

    def _padding(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
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

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight, self.bias)

    def _conv_forward(
        self, input: Tensor, weight: Tensor, bias: Tensor | None,
        max_pool: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None,
    ) -> Tensor:  # fmt: skip
        """The convolution (and activation); with ``max_pool`` (kernel_size, stride, padding
        pairs) max pooled by the same operator (see :func:`conv2d_max_pool`)."""
        _check_image(input, "conv2d")
        if weight.dtype != input.dtype or (bias is not None and bias.dtype != input.dtype):
            raise RuntimeError(
                f"Input type ({input.dtype}) and weight type ({weight.dtype}) should be the same"
            )
        if weight.device != input.device:
            raise RuntimeError(
                f"Input type ({input.device}) and weight type ({weight.device}) should be on "
                "the same device"
            )
        unbatched = input.dim() == 3
        x = input.unsqueeze(0) if unbatched else input
        if x.shape[1] != weight.shape[1] * self.groups:
            raise RuntimeError(
                f"Given groups={self.groups}, weight of size {list(weight.shape)}, expected "
                f"input{list(x.shape)} to have {weight.shape[1] * self.groups} channels, but "
                f"got {x.shape[1]} channels instead"
            )
        x, padding = self._padding(x)
        out = _ops.conv2d_output_size(
            x.shape[2:], weight.shape[2:], self.stride, padding, self.dilation
        )
        if out[0] < 1 or out[1] < 1:
            raise RuntimeError(
                f"Calculated padded input size per channel: ({x.shape[2] + 2 * padding[0]} x "
                f"{x.shape[3] + 2 * padding[1]}). Kernel size: {tuple(weight.shape[2:])} "
                "(dilated). Kernel size can't be greater than actual input size"
            )
        pool: list[int] = []
        if max_pool is not None:
            kernel_size, stride, pool_padding = max_pool
            _check_pool_window(x.shape[1], out, kernel_size, stride, pool_padding)
            pool = [*kernel_size, *stride, *pool_padding]
        x, weight = x.contiguous(), weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        y, _ = _ops.call(
            _ops.conv2d,
            x, weight, bias, list(self.stride), list(padding), list(self.dilation), self.groups,
            _needs_grad(x, weight, bias), self.activation, pool,
        )  # fmt: skip
        return y.squeeze(0) if unbatched else y


def conv2d_max_pool(conv: Conv2d, input: Tensor, kernel_size: Any, stride: Any = None,
                    padding: Any = 0) -> Tensor:  # fmt: skip
    """``max_pool2d(conv(input), kernel_size, stride, padding)`` as one fastrnn operator: on the
    CPU the direct kernels pool each image while it is in cache, and the backward scatters the
    pooled gradient (the ReLU's mask folded in, with ``conv.activation="relu"``). The same
    results and gradients as the two calls. :func:`fastrnn.torch.fuse` calls it where a model
    pools a convolution's output."""
    if not isinstance(conv, Conv2d):
        raise TypeError(f"conv: expected a fastrnn.torch.Conv2d, got {type(conv).__name__}")
    kernel_size = _pair(kernel_size)
    window = (kernel_size, kernel_size if stride is None else _pair(stride), _pair(padding))
    return conv._conv_forward(input, conv.weight, conv.bias, max_pool=window)


# ------------------------------------------------------------------------------------------------
# pooling
# ------------------------------------------------------------------------------------------------


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _check_pool_window(
    C: int, size: Sequence[int], kernel_size: tuple[int, int], stride: tuple[int, int],
    padding: tuple[int, int],
) -> None:  # fmt: skip
    """torch's errors for a pooling window that does not fit C planes of ``size`` (H, W)."""
    if padding[0] > kernel_size[0] // 2 or padding[1] > kernel_size[1] // 2:
        raise RuntimeError(
            f"pad should be at most half of effective kernel size, but got pad={padding}, "
            f"kernel_size={kernel_size}"
        )
    out = _ops.conv2d_output_size(size, kernel_size, stride, padding, (1, 1))
    if out[0] < 1 or out[1] < 1:
        raise RuntimeError(
            f"Given input size: ({C}x{size[0]}x{size[1]}). Calculated output "
            f"size: ({C}x{out[0]}x{out[1]}). Output size is too small"
        )


def _pool(module: nn.Module, kind: str, input: Any) -> Tensor:
    _check_image(input, f"{kind}_pool2d")
    unbatched = input.dim() == 3
    x = (input.unsqueeze(0) if unbatched else input).contiguous()
    kernel_size = _pair(module.kernel_size)
    stride = kernel_size if module.stride is None else _pair(module.stride)
    padding = _pair(module.padding)
    _check_pool_window(x.shape[1], x.shape[2:], kernel_size, stride, padding)
    op = _ops.max_pool2d if kind == "max" else _ops.avg_pool2d
    y, _ = _ops.call(op, x, list(kernel_size), list(stride), list(padding), _needs_grad(x))
    return y.squeeze(0) if unbatched else y


class MaxPool2d(nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` on fastrnn's kernels. ``dilation`` must be 1, ``return_indices``
    and ``ceil_mode`` False."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if _pair(self.dilation) != (1, 1):
            raise ValueError(
                f"dilation: fastrnn's max pooling is not dilated, got {self.dilation!r}"
            )
        if self.return_indices:
            raise ValueError("return_indices: fastrnn's max pooling does not return indices")
        if self.ceil_mode:
            raise ValueError("ceil_mode: fastrnn's pooling uses the floor output size only")

    def __prepare_scriptable__(self) -> Any:
        raise RuntimeError(_NOT_SCRIPTABLE.format(name=type(self).__name__))

    def forward(self, input: Tensor) -> Tensor:
        return _pool(self, "max", input)


class AvgPool2d(nn.AvgPool2d):
    """``torch.nn.AvgPool2d`` on fastrnn's kernels. ``ceil_mode`` must be False,
    ``count_include_pad`` True and ``divisor_override`` None (PyTorch's defaults)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.ceil_mode:
            raise ValueError("ceil_mode: fastrnn's pooling uses the floor output size only")
        if not self.count_include_pad:
            raise ValueError("count_include_pad: fastrnn's average pooling counts the padding")
        if self.divisor_override is not None:
            raise ValueError("divisor_override: fastrnn's average pooling divides by the window")

    def __prepare_scriptable__(self) -> Any:
        raise RuntimeError(_NOT_SCRIPTABLE.format(name=type(self).__name__))

    def forward(self, input: Tensor) -> Tensor:
        return _pool(self, "avg", input)
