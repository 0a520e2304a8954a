"""fastrnn's kernels as torch custom operators, namespace ``fastrnn``.

Every op is a forward operator and a backward operator (defined with ``torch.library``), each
with a fake implementation (shapes only, for torch.compile, torch.export and meta tensors); the
forward operator's autograd kernel (an ``autograd.Function`` that redispatches below autograd,
as ``torch.library.register_autograd`` does) calls the backward operator. torch therefore
sees one opaque operator per layer and direction: Dynamo does not trace into the kernels (no
NumPy, no buffer pools in the graph), AOTAutograd saves what backward needs, and the compiled
graph calls the same kernels as eager.

Schemas (T steps, N batch, D input features, H hidden units; time-major, PyTorch's layouts)::

    fastrnn::lstm(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih,
                  Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool training)
                  -> (y, hT, cT, handle)        # w_hr (P, H): torch's proj_size=P
    fastrnn::lstm_backward(Tensor handle, Tensor x, Tensor w_ih, Tensor w_hh, Tensor? w_hr,
                           Tensor? dy, Tensor? dhT, Tensor? dcT)
                           -> (dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr)  # dw_hr (0,) if no w_hr
    fastrnn::gru(x, h0, w_ih, w_hh, b_ih?, b_hh?, lengths?, training) -> (y, hT, handle)
    fastrnn::gru_backward(handle, x, w_ih, w_hh, dy?, dhT?) -> (dx, dh0, dw_ih, dw_hh, db_ih, db_hh)
    fastrnn::rnn(x, h0, w_ih, w_hh, b_ih?, b_hh?, lengths?, str nonlinearity, training)
                 -> (y, hT, handle)
    fastrnn::rnn_backward(handle, x, w_ih, w_hh, dy?, dhT?) -> (dx, dh0, dw_ih, dw_hh, db)
    fastrnn::conv2d(x, w, b?, int[2] stride, int[2] padding, int[2] dilation, int groups,
                    training, str? activation=None, int[] max_pool=[]) -> (y, handle)
                    # activation "relu": fused; max_pool (kh, kw, sh, sw, ph, pw): y pooled
    fastrnn::conv2d_backward(handle, x, w, bool has_bias, dy, bool input_grad=True)
                             -> (dx, dw, db)  # db (0,) if no bias, dx (0,) without input_grad
    fastrnn::max_pool2d / avg_pool2d(x, int[2] kernel_size, int[2] stride, int[2] padding,
                                     training) -> (y, handle)
    fastrnn::max_pool2d_backward / avg_pool2d_backward(handle, x, dy) -> dx

``lengths`` is None or an int64 CPU tensor of shape (N,), each in 1..T (checked by the kernel's
public function, which raises ValueError). ``training=False`` saves nothing for backward.
``handle`` is the forward's context (fastrnn/torch/_contexts.py), a one-element int64 CPU
tensor; it is not differentiable.

Backward: the backward operator runs fastrnn's backward kernel on the forward's context.
Double backward (``create_graph=True``) differentiates a torch-op formulation of the same
function instead (fastrnn/torch/_second_order.py): correct to any order, not fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

import fastrnn as _fr
from fastrnn.backends.ops import conv2d_gradients
from fastrnn.torch import _second_order
from fastrnn.torch._arrays import array, kernel_call, tensor, zeros_like_array
from fastrnn.torch._contexts import context, handle, keeper, not_saved

Tensor = torch.Tensor

# Registered with torch.library.Library rather than torch.library.custom_op: the same operators,
# fake implementations and autograd, but custom_op's generated autograd wrapper costs ~60 us
# per call in Python (measured: benchmarks/bench_torch_binding.py at (1, 1, 8, 8)), more than
# the whole call of a small kernel.
_lib = torch.library.Library("fastrnn", "DEF")


_IMPLS: dict[str, Any] = {}  # operator name -> its registered implementation (handles)
_RAW: dict[str, Any] = {}  # operator name -> the same on fastrnn contexts (see _define)
Parameter = torch.nn.Parameter
_PLAIN = (Tensor, Parameter)  # plain tensor types (fastrnn/torch/modules.py reads it too)


def _define(schema: str) -> Any:
    """Decorator: define ``fastrnn::<function name><schema>``; returns the OpOverload.

    The decorated function works on fastrnn contexts: a forward returns its context as its
    last output, a backward (schema ``(Tensor handle, ...)``) takes one as its first argument.
    The registered implementation (every device: the function picks NumPy or CuPy arrays)
    trades those for handle tensors (fastrnn/torch/_contexts.py). The modules' eager calls
    (:func:`call`) keep the context on the autograd node instead and need no handle. The
    fake implementation is registered separately (``_fake``)."""

    def register(raw: Any) -> Any:
        name = raw.__name__
        if schema.startswith("(Tensor handle"):
            forward_name = name.removesuffix("_backward")

            def impl(h: Tensor, *args: Any) -> Any:
                return raw(context(h, forward_name), *args)
        else:

            def impl(*args: Any) -> Any:
                *outputs, fr_ctx = raw(*args)
                return (*outputs, handle(fr_ctx))

        _lib.define(name + schema)
        _lib.impl(name, impl, "CompositeExplicitAutograd")
        _IMPLS[name] = impl
        _RAW[name] = raw
        return getattr(torch.ops.fastrnn, name).default

    return register


def _untraced(args: Sequence[Any]) -> bool:
    """Whether nothing traces or transforms this call: plain CPU or CUDA tensors, no
    TorchDispatchMode (FakeTensorMode, make_fx, export), no functorch transform. Then the
    autograd formulas may call an operator's implementation directly: what redispatching
    would reach, one dispatcher round trip (~10 us) sooner. Anything else (torch.compile's
    and torch.export's tracing, fake and meta tensors) goes through the dispatcher."""
    if torch._C._len_torch_dispatch_stack() or torch._C._functorch.peek_interpreter_stack():
        return False
    return _scan(args, False) >= 0


def _scan(args: Sequence[Any], grad: bool) -> int:
    """One pass over an operator's arguments: -1 when one is a tensor subclass or a meta tensor
    (it must go through the dispatcher), else 1 when ``grad`` and one requires grad, else 0."""
    needs = 0
    for a in args:
        kind = type(a)
        if kind is Tensor or kind is Parameter:
            if a.is_meta:
                return -1
            if grad and a.requires_grad:
                needs = 1
        elif isinstance(a, Tensor):
            return -1
    return needs


def _backward(ctx: Any, op: Any, h: Tensor, *args: Any) -> Any:
    """Backward operator ``op`` for the forward whose saved handle or keeper is ``h``: on the
    context that ``ctx.fr_ref`` finds when the forward came from :func:`call`; otherwise on
    the handle, directly when :func:`_untraced`, through the dispatcher when something traces."""
    if ctx.fr_ref is not None:
        fr_ctx = ctx.fr_ref()
        if fr_ctx is None:
            raise not_saved(op._opname.removesuffix("_backward"))
        return _RAW[op._opname](fr_ctx, *args)
    if _untraced(args):
        return _IMPLS[op._opname](h, *args)
    return op(h, *args)


def _fake(op: Any) -> Any:
    """Decorator: the fake (meta) implementation of ``op``: output shapes only."""
    return torch.library.register_fake(op, lib=_lib)


_FUNCTIONS: dict[str, type[torch.autograd.Function]] = {}  # operator name -> autograd


def _register_autograd(op: Any, function: type[torch.autograd.Function]) -> None:
    """Differentiate ``op`` with ``function`` (whose forward redispatches below autograd)."""

    def kernel(keyset: Any, *args: Any) -> Any:
        below = keyset & torch._C._after_autograd_keyset
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return function.apply(op, below, *args)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(below, *args)

    _lib.impl(op._opname, kernel, "Autograd", with_keyset=True)
    _FUNCTIONS[op._opname] = function


def call(op: Any, *args: Any) -> Any:
    """``op(*args)``, as the modules call a forward operator.

    When nothing traces the call (:func:`_untraced`, and neither torch.compile, torch.export,
    torch.jit.trace nor a TorchFunctionMode is active) this runs what the dispatcher would run
    (the operator's autograd Function, or its implementation when no gradient is needed)
    without the round trip through the dispatcher to a Python autograd kernel, which costs
    ~30 us per call (measured: benchmarks/bench_torch_binding.py at (1, 1, 8, 8)). On that
    path the handle output is None: the forward's context stays on the autograd node, or is
    dropped when no gradient is needed. Everything that traces (Dynamo constant-folds
    ``is_compiling``) sees the operator itself, handle included."""
    if (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._functorch.peek_interpreter_stack()
    ):
        return op(*args)
    # _untraced's test of the arguments and whether any needs a gradient, in one pass (this
    # runs on every layer call: ~4 us of Python on small shapes)
    found = _scan(args, torch.is_grad_enabled())
    if found < 0:
        return op(*args)
    if found:
        return _FUNCTIONS[op._opname].apply(op, None, *args)
    *outputs, _ = _RAW[op._opname](*args)
    return (*outputs, None)


def _host_lengths(lengths: Tensor | None) -> Any:
    return None if lengths is None else lengths.detach().cpu().numpy()


def _handle_fake() -> Tensor:
    return torch.empty(1, dtype=torch.int64)


def _grad_or_zeros(g: Tensor | None, fr_ctx: Any, name: str, like: Any) -> Any:
    """An upstream gradient as a kernel array; zeros for an output that autograd left
    without a gradient (it was not used)."""
    if g is not None:
        return array(g)
    return zeros_like_array(like, fr_ctx.grad_shapes[name])


def _recurrent_fake(x: Tensor, w_hh: Tensor, n_states: int) -> tuple[Tensor, ...]:
    T, N, H = x.shape[0], x.shape[1], w_hh.shape[1]
    states = tuple(x.new_empty(N, H) for _ in range(n_states))
    return (x.new_empty(T, N, H), *states, _handle_fake())


def _summed_bias(b_ih: Tensor | None, b_hh: Tensor | None, like: Any, size: int) -> Any:
    """The kernels' single bias b = b_ih + b_hh (zeros when the layer has no bias)."""
    if b_ih is None and b_hh is None:
        return zeros_like_array(like, (size,))
    if b_hh is None:
        return array(b_ih)
    if b_ih is None:
        return array(b_hh)
    return array(b_ih) + array(b_hh)


def _split_bias_grad(db: Tensor, b_ih: Tensor | None, b_hh: Tensor | None) -> tuple[Any, Any]:
    """The summed bias's gradient for both b_ih and b_hh. Two distinct tensors: autograd may
    adopt a returned gradient as a parameter's ``.grad``, and two parameters must never share
    one ``.grad`` (an in-place update of one would change the other)."""
    db_ih = db if b_ih is not None else None
    db_hh = (db.clone() if b_ih is not None else db) if b_hh is not None else None
    return db_ih, db_hh


def _forward_below_autograd(ctx: Any, op: Any, keyset: Any, args: tuple) -> tuple[tuple, Any]:
    """The operator below autograd: its outputs, and the tensor that keeps its context for
    backward (to be saved with ``ctx.save_for_backward``, so that autograd frees the context
    with the graph's saved tensors).

    From :func:`call` (``keyset`` None): the implementation on contexts, None in the handle's
    place and a keeper (fastrnn/torch/_contexts.py) saved instead, with a weak reference to
    the context on ``ctx``: no handle to register and to look up again (~5 us per call on
    small shapes). From the autograd kernel: redispatched with ``keyset``, or the
    implementation when nothing traces; the handle is kept."""
    ctx.set_materialize_grads(False)
    if keyset is None:
        *outputs, fr_ctx = _RAW[op._opname](*args)
        kept, ctx.fr_ref = keeper(fr_ctx)
        return (*outputs, None), kept
    if _untraced(args):
        outputs = _IMPLS[op._opname](*args)
    else:
        with torch._C._AutoDispatchBelowAutograd():
            outputs = op.redispatch(keyset, *args)
    ctx.fr_ref = None
    ctx.mark_non_differentiable(outputs[-1])
    return outputs, outputs[-1]


# ------------------------------------------------------------------------------------------------
# LSTM
# ------------------------------------------------------------------------------------------------


@_define(
    "(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
    "Tensor? w_hr, Tensor? lengths, bool training) -> (Tensor, Tensor, Tensor, Tensor)"
)
def lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, training):
    with kernel_call(x):
        w_hh_a = array(w_hh)
        b = _summed_bias(b_ih, b_hh, w_hh_a, w_hh.shape[0])
        y, hT, cT, fr_ctx = _fr.lstm_forward(
            array(x), array(h0), array(c0), array(w_ih), w_hh_a, b, w_hr=array(w_hr),
            lengths=_host_lengths(lengths), training=training,
        )  # fmt: skip
        return tensor(y), tensor(hT), tensor(cT), fr_ctx


@_fake(lstm)
def _(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, training):
    T, N, H = x.shape[0], x.shape[1], w_hh.shape[0] // 4
    P = H if w_hr is None else w_hr.shape[0]
    return x.new_empty(T, N, P), x.new_empty(N, P), x.new_empty(N, H), _handle_fake()


@_define(
    "(Tensor handle, Tensor x, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? dy, Tensor? dhT,"
    " Tensor? dcT) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
def lstm_backward(fr_ctx, x, w_ih, w_hh, w_hr, dy, dhT, dcT):
    """dw_hr is a (0,) tensor when the forward had no projection (outputs cannot be None)."""
    with kernel_call(x):
        like = array(w_hh)
        grads = _fr.lstm_backward(
            fr_ctx, _grad_or_zeros(dy, fr_ctx, "dy", like), array(dhT), array(dcT)
        )
        grads = tuple(map(tensor, grads))
        return grads if w_hr is not None else (*grads, w_hh.new_empty(0))


@_fake(lstm_backward)
def _(handle, x, w_ih, w_hh, w_hr, dy, dhT, dcT):
    N, G, P = x.shape[1], w_hh.shape[0], w_hh.shape[1]
    return (
        torch.empty_like(x), x.new_empty(N, P), x.new_empty(N, G // 4),
        torch.empty_like(w_ih), torch.empty_like(w_hh), w_hh.new_empty(G),
        torch.empty_like(w_hr) if w_hr is not None else w_hh.new_empty(0),
    )  # fmt: skip


class _LSTMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, keyset, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, training):
        args = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, training)
        outputs, kept = _forward_below_autograd(ctx, op, keyset, args)
        ctx.save_for_backward(*args[:-1], kept)
        return outputs

    @staticmethod
    def backward(ctx, dy, dhT, dcT, _dhandle):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, h = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            grads = _second_order.grads(
                _second_order.lstm, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), (lengths,),
                ctx.needs_input_grad[2:10], (dy, dhT, dcT),
            )  # fmt: skip
            return (None, None, *grads, None, None)
        if dy is None and dhT is None and dcT is None:
            return (None,) * 12
        dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = _backward(
            ctx, lstm_backward, h, x, w_ih, w_hh, w_hr, dy, dhT, dcT
        )
        db_ih, db_hh = _split_bias_grad(db, b_ih, b_hh)
        dw_hr = dw_hr if w_hr is not None else None
        return (None, None, dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr, None, None)


_register_autograd(lstm, _LSTMFunction)


# ------------------------------------------------------------------------------------------------
# GRU
# ------------------------------------------------------------------------------------------------


@_define(
    "(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
    "Tensor? lengths, bool training) -> (Tensor, Tensor, Tensor)"
)
def gru(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, training):
    with kernel_call(x):
        w_hh_a = array(w_hh)
        size = w_hh.shape[0]
        b_ih_a = zeros_like_array(w_hh_a, (size,)) if b_ih is None else array(b_ih)
        b_hh_a = zeros_like_array(w_hh_a, (size,)) if b_hh is None else array(b_hh)
        y, hT, fr_ctx = _fr.gru_forward(
            array(x), array(h0), array(w_ih), w_hh_a, b_ih_a, b_hh_a,
            lengths=_host_lengths(lengths), training=training,
        )  # fmt: skip
        return tensor(y), tensor(hT), fr_ctx


@_fake(gru)
def _(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, training):
    return _recurrent_fake(x, w_hh, 1)


@_define(
    "(Tensor handle, Tensor x, Tensor w_ih, Tensor w_hh, Tensor? dy, Tensor? dhT) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
def gru_backward(fr_ctx, x, w_ih, w_hh, dy, dhT):
    with kernel_call(x):
        like = array(w_hh)
        grads = _fr.gru_backward(fr_ctx, _grad_or_zeros(dy, fr_ctx, "dy", like), array(dhT))
        return tuple(map(tensor, grads))


@_fake(gru_backward)
def _(handle, x, w_ih, w_hh, dy, dhT):
    N, H, G = x.shape[1], w_hh.shape[1], w_hh.shape[0]
    return (
        torch.empty_like(x), x.new_empty(N, H), torch.empty_like(w_ih), torch.empty_like(w_hh),
        w_hh.new_empty(G), w_hh.new_empty(G),
    )  # fmt: skip


class _GRUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, keyset, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, training):
        args = (x, h0, w_ih, w_hh, b_ih, b_hh, lengths, training)
        outputs, kept = _forward_below_autograd(ctx, op, keyset, args)
        ctx.save_for_backward(*args[:-1], kept)
        return outputs

    @staticmethod
    def backward(ctx, dy, dhT, _dhandle):
        x, h0, w_ih, w_hh, b_ih, b_hh, lengths, h = ctx.saved_tensors
        if torch.is_grad_enabled():
            grads = _second_order.grads(
                _second_order.gru, (x, h0, w_ih, w_hh, b_ih, b_hh), (lengths,),
                ctx.needs_input_grad[2:8], (dy, dhT),
            )  # fmt: skip
            return (None, None, *grads, None, None)
        if dy is None and dhT is None:
            return (None,) * 10
        grads = _backward(ctx, gru_backward, h, x, w_ih, w_hh, dy, dhT)
        dx, dh0, dw_ih, dw_hh, db_ih, db_hh = grads
        return (
            None, None, dx, dh0, dw_ih, dw_hh,
            db_ih if b_ih is not None else None, db_hh if b_hh is not None else None, None, None,
        )  # fmt: skip


_register_autograd(gru, _GRUFunction)


# ------------------------------------------------------------------------------------------------
# Elman RNN
# ------------------------------------------------------------------------------------------------


@_define(
    "(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
    "Tensor? lengths, str nonlinearity, bool training) -> (Tensor, Tensor, Tensor)"
)
def rnn(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, nonlinearity, training):
    with kernel_call(x):
        w_hh_a = array(w_hh)
        b = _summed_bias(b_ih, b_hh, w_hh_a, w_hh.shape[0])
        y, hT, fr_ctx = _fr.rnn_forward(
            array(x), array(h0), array(w_ih), w_hh_a, b, nonlinearity=nonlinearity,
            lengths=_host_lengths(lengths), training=training,
        )  # fmt: skip
        return tensor(y), tensor(hT), fr_ctx


@_fake(rnn)
def _(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, nonlinearity, training):
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
    return _recurrent_fake(x, w_hh, 1)


@_define(
    "(Tensor handle, Tensor x, Tensor w_ih, Tensor w_hh, Tensor? dy, Tensor? dhT) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
def rnn_backward(fr_ctx, x, w_ih, w_hh, dy, dhT):
    with kernel_call(x):
        like = array(w_hh)
        grads = _fr.rnn_backward(fr_ctx, _grad_or_zeros(dy, fr_ctx, "dy", like), array(dhT))
        return tuple(map(tensor, grads))


@_fake(rnn_backward)
def _(handle, x, w_ih, w_hh, dy, dhT):
    N, H = x.shape[1], w_hh.shape[1]
    return (
        torch.empty_like(x), x.new_empty(N, H), torch.empty_like(w_ih), torch.empty_like(w_hh),
        w_hh.new_empty(H),
    )  # fmt: skip


class _RNNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, keyset, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, nonlinearity, training):
        args = (x, h0, w_ih, w_hh, b_ih, b_hh, lengths, nonlinearity, training)
        outputs, kept = _forward_below_autograd(ctx, op, keyset, args)
        ctx.nonlinearity = nonlinearity
        ctx.save_for_backward(*args[:7], kept)
        return outputs

    @staticmethod
    def backward(ctx, dy, dhT, _dhandle):
        x, h0, w_ih, w_hh, b_ih, b_hh, lengths, h = ctx.saved_tensors
        if torch.is_grad_enabled():
            grads = _second_order.grads(
                _second_order.rnn, (x, h0, w_ih, w_hh, b_ih, b_hh), (lengths, ctx.nonlinearity),
                ctx.needs_input_grad[2:8], (dy, dhT),
            )  # fmt: skip
            return (None, None, *grads, None, None, None)
        if dy is None and dhT is None:
            return (None,) * 11
        dx, dh0, dw_ih, dw_hh, db = _backward(ctx, rnn_backward, h, x, w_ih, w_hh, dy, dhT)
        db_ih, db_hh = _split_bias_grad(db, b_ih, b_hh)
        return (None, None, dx, dh0, dw_ih, dw_hh, db_ih, db_hh, None, None, None)


_register_autograd(rnn, _RNNFunction)


# ------------------------------------------------------------------------------------------------
# conv2d
# ------------------------------------------------------------------------------------------------


def conv2d_output_size(
    size: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int],
) -> tuple[int, int]:  # fmt: skip
    """(OH, OW) of a convolution or pooling window, PyTorch's floor rule."""
    return tuple(  # type: ignore[return-value]
        (size[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
        for i in range(2)
    )


def _max_pool(max_pool: Sequence[int]) -> dict | None:
    """conv2d's ``max_pool`` list (kh, kw, sh, sw, ph, pw), or empty -> fastrnn's argument."""
    if not max_pool:
        return None
    mp = [int(v) for v in max_pool]
    return dict(kernel_size=tuple(mp[0:2]), stride=tuple(mp[2:4]), padding=tuple(mp[4:6]))


@_define(
    "(Tensor x, Tensor w, Tensor? b, int[2] stride, int[2] padding, int[2] dilation, "
    "int groups, bool training, str? activation=None, int[] max_pool=[]) -> (Tensor, Tensor)"
)
def conv2d(x, w, b, stride, padding, dilation, groups, training, activation=None, max_pool=()):
    with kernel_call(x):
        y, fr_ctx = _fr.conv2d_forward(
            array(x), array(w), array(b), stride=tuple(stride), padding=tuple(padding),
            dilation=tuple(dilation), groups=groups, training=training, activation=activation,
            max_pool=_max_pool(max_pool),
        )  # fmt: skip
        return tensor(y), fr_ctx


@_fake(conv2d)
def _(x, w, b, stride, padding, dilation, groups, training, activation=None, max_pool=()):
    OH, OW = conv2d_output_size(x.shape[2:], w.shape[2:], stride, padding, dilation)
    if max_pool:
        OH, OW = conv2d_output_size((OH, OW), max_pool[0:2], max_pool[2:4], max_pool[4:6], (1, 1))
    return x.new_empty(x.shape[0], w.shape[0], OH, OW), _handle_fake()


@_define(
    "(Tensor handle, Tensor x, Tensor w, bool has_bias, Tensor dy, bool input_grad=True) "
    "-> (Tensor, Tensor, Tensor)"
)
def conv2d_backward(fr_ctx, x, w, has_bias, dy, input_grad=True):
    with kernel_call(x):
        # Without input_grad (x needs no gradient: a network's first layer) dx is not computed,
        # as torch's convolution_backward output_mask.
        dx, dw, db = conv2d_gradients(fr_ctx, array(dy), input_grad=input_grad)
        db_t = tensor(db) if db is not None else w.new_empty(0)
        dx_t = tensor(dx) if dx is not None else x.new_empty(0)
        return dx_t, tensor(dw), db_t


@_fake(conv2d_backward)
def _(handle, x, w, has_bias, dy, input_grad=True):
    dx = torch.empty_like(x) if input_grad else x.new_empty(0)
    return dx, torch.empty_like(w), w.new_empty(w.shape[0] if has_bias else 0)


class _Conv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, keyset, x, w, b, stride, padding, dilation, groups, training,
                activation=None, max_pool=()):
        args = (x, w, b, stride, padding, dilation, groups, training, activation, max_pool)
        outputs, kept = _forward_below_autograd(ctx, op, keyset, args)
        ctx.geometry = (tuple(stride), tuple(padding), tuple(dilation), groups, activation,
                        tuple(max_pool))  # fmt: skip
        ctx.save_for_backward(x, w, b, kept)
        return outputs

    @staticmethod
    def backward(ctx, dy, _dhandle):
        x, w, b, h = ctx.saved_tensors
        if torch.is_grad_enabled():
            grads = _second_order.grads(
                _second_order.conv2d, (x, w, b), ctx.geometry, ctx.needs_input_grad[2:5], (dy,)
            )
            return (None, None, *grads, None, None, None, None, None, None, None)
        if dy is None:
            return (None,) * 12
        need_dx = ctx.needs_input_grad[2]
        dx, dw, db = _backward(ctx, conv2d_backward, h, x, w, b is not None, dy, need_dx)
        return (None, None, dx if need_dx else None, dw, (db if b is not None else None), None,
                None, None, None, None, None, None)


_register_autograd(conv2d, _Conv2dFunction)


# ------------------------------------------------------------------------------------------------
# pooling
# ------------------------------------------------------------------------------------------------

_POOL_SCHEMA = (
    "(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, bool training) "
    "-> (Tensor, Tensor)"
)


def _pool_forward(kind: str, x, kernel_size, stride, padding, training):
    forward = _fr.max_pool2d_forward if kind == "max" else _fr.avg_pool2d_forward
    with kernel_call(x):
        y, fr_ctx = forward(
            array(x), tuple(kernel_size), tuple(stride), tuple(padding), training=training
        )
        return tensor(y), fr_ctx


def _pool_backward(kind: str, fr_ctx, x, dy):
    backward = _fr.max_pool2d_backward if kind == "max" else _fr.avg_pool2d_backward
    with kernel_call(x):
        return tensor(backward(fr_ctx, array(dy)))


def _pool_fake(x, kernel_size, stride, padding, training):
    OH, OW = conv2d_output_size(x.shape[2:], kernel_size, stride, padding, (1, 1))
    return x.new_empty(x.shape[0], x.shape[1], OH, OW), _handle_fake()


@_define(_POOL_SCHEMA)
def max_pool2d(x, kernel_size, stride, padding, training):
    return _pool_forward("max", x, kernel_size, stride, padding, training)


@_define(_POOL_SCHEMA)
def avg_pool2d(x, kernel_size, stride, padding, training):
    return _pool_forward("avg", x, kernel_size, stride, padding, training)


@_define("(Tensor handle, Tensor x, Tensor dy) -> Tensor")
def max_pool2d_backward(fr_ctx, x, dy):
    return _pool_backward("max", fr_ctx, x, dy)


@_define("(Tensor handle, Tensor x, Tensor dy) -> Tensor")
def avg_pool2d_backward(fr_ctx, x, dy):
    return _pool_backward("avg", fr_ctx, x, dy)


for _op in (max_pool2d, avg_pool2d):
    _fake(_op)(_pool_fake)
for _op in (max_pool2d_backward, avg_pool2d_backward):
    _fake(_op)(lambda handle, x, dy: torch.empty_like(x))


class _Pool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, keyset, x, kernel_size, stride, padding, training):
        args = (x, kernel_size, stride, padding, training)
        outputs, kept = _forward_below_autograd(ctx, op, keyset, args)
        ctx.kind = "max" if op is max_pool2d else "avg"
        ctx.geometry = (ctx.kind, tuple(kernel_size), tuple(stride), tuple(padding))
        ctx.save_for_backward(x, kept)
        return outputs

    @staticmethod
    def backward(ctx, dy, _dhandle):
        x, h = ctx.saved_tensors
        if torch.is_grad_enabled():
            grads = _second_order.grads(
                _second_order.pool2d, (x,), ctx.geometry, ctx.needs_input_grad[2:3], (dy,)
            )
            return (None, None, *grads, None, None, None, None)
        if dy is None:
            return (None,) * 7
        backward = max_pool2d_backward if ctx.kind == "max" else avg_pool2d_backward
        return None, None, _backward(ctx, backward, h, x, dy), None, None, None, None


_register_autograd(max_pool2d, _Pool2dFunction)
_register_autograd(avg_pool2d, _Pool2dFunction)
