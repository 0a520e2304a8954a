"""The public functional API: validate, normalise, pick the backend, call it.

Every function here has exactly the signature DESIGN.md fixes; the backends implement the
interface of :mod:`fastrnn.backends.base`.
"""

from __future__ import annotations

from typing import Any

from fastrnn.backends import backend_module, select
from fastrnn.backends.base import Context
from fastrnn.backends.validation import (
    array_module,
    check_arrays,
    check_bool,
    check_context,
    check_extent,
    check_image,
    check_lengths,
    check_ndim,
    check_shape,
    check_size,
    contiguous,
    integer,
    pair,
)

# ------------------------------------------------------------------------------------------------
# recurrent
# ------------------------------------------------------------------------------------------------


def _recurrent_sizes(
    x: Any, w_ih: Any, w_hh: Any, gates: int, sizes: tuple[int, int] | None = None
) -> tuple[int, int, int, int]:
    """(T, N, D, H) of a recurrent call. w_hh is (gates H, H), or (gates H, P) when ``sizes``
    gives (H, P) (the LSTM projection's, from w_hr)."""
    check_ndim("x", x, 3, "(T, N, D)")
    T, N, D = x.shape
    check_ndim("w_hh", w_hh, 2, f"({gates}H, {'P' if sizes else 'H'})")
    H, P = sizes if sizes is not None else (w_hh.shape[1], w_hh.shape[1])
    if T < 1:
        raise ValueError(f"x: expected at least one time step, got shape {x.shape}")
    if H < 1:
        raise ValueError(f"w_hh: expected at least one hidden unit, got shape {w_hh.shape}")
    check_shape("w_hh", w_hh, (gates * H, P))
    check_ndim("w_ih", w_ih, 2, f"({gates}H, D)")
    if w_ih.shape[0] != gates * H:
        check_shape("w_ih", w_ih, (gates * H, D))
    if w_ih.shape[1] != D:  # w_ih is the weights' shape; x is what the caller feeds them
        raise ValueError(
            f"x: has D={D} input features (shape {x.shape}) but w_ih of shape {w_ih.shape} "
            f"expects D={w_ih.shape[1]}"
        )
    # the gate pre-activations of every step: the largest array a forward pass allocates
    # (x may be (T, N, 0) with T * N far beyond memory)
    check_size("x", "the gates of all steps", (T, N, gates * H), x)
    return T, N, D, H


def _state(name: str, a: Any, N: int, H: int) -> None:
    if a is not None:
        check_shape(name, a, (N, H))


def _lstm_sizes(x: Any, w_ih: Any, w_hh: Any, w_hr: Any) -> tuple[int, int, int, int, int]:
    """(T, N, D, H, P) of an LSTM call; P == H without projection."""
    if w_hr is None:
        T, N, D, H = _recurrent_sizes(x, w_ih, w_hh, 4)
        return T, N, D, H, H
    check_ndim("w_hr", w_hr, 2, "(P, H)")
    P, H = w_hr.shape
    if P < 1 or H < 1:
        raise ValueError(f"w_hr: expected a positive shape (P, H), got {w_hr.shape}")
    if P >= H:
        raise ValueError(
            f"w_hr: the projection size P must be smaller than the hidden size H, got shape "
            f"{w_hr.shape} (P={P}, H={H})"
        )
    T, N, D, H = _recurrent_sizes(x, w_ih, w_hh, 4, (H, P))
    return T, N, D, H, P


def lstm_forward(x, h0, c0, w_ih, w_hh, b, *, w_hr=None, lengths=None, training=True):
    """LSTM over a whole sequence, gates ordered i, f, g, o (PyTorch).

    Parameters
    ----------
    x : ndarray of shape (T, N, D)
    h0 : ndarray of shape (N, H), or (N, P) with a projection
    c0 : ndarray of shape (N, H)
    w_ih : ndarray of shape (4H, D)
    w_hh : ndarray of shape (4H, H), or (4H, P) with a projection
    b : ndarray of shape (4H,)  -- PyTorch's ``b_ih + b_hh``
    w_hr : None or ndarray of shape (P, H), P < H -- PyTorch's ``weight_hr`` (``proj_size=P``):
        the hidden state is ``h_t = (o_t * tanh(c_t)) W_hr^T``, of P features
    lengths : None or integer array of shape (N,), each in 1..T
    training : bool; False saves nothing for backward (ctx is None)

    Returns
    -------
    y (T, N, H|P), hT (N, H|P), cT (N, H), ctx
    """
    is_cupy, dtype = check_arrays(
        dict(x=x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b=b, w_hr=w_hr), allow_none=("w_hr",)
    )
    T, N, D, H, P = _lstm_sizes(x, w_ih, w_hh, w_hr)
    _state("h0", h0, N, P)
    _state("c0", c0, N, H)
    check_shape("b", b, (4 * H,))
    lengths = check_lengths(lengths, T, N)
    training = check_bool("training", training)
    be = backend_module(select(is_cupy))
    x, h0, c0, w_ih, w_hh, b, w_hr = map(contiguous, (x, h0, c0, w_ih, w_hh, b, w_hr))
    if w_hr is None:
        return be.lstm_forward(x, h0, c0, w_ih, w_hh, b, lengths, training)
    return be.lstm_forward(x, h0, c0, w_ih, w_hh, b, lengths, training, w_hr)


def lstm_backward(ctx, dy, dhT=None, dcT=None):
    """Gradients of an LSTM forward pass.

    dy : ndarray of shape (T, N, H), or (T, N, P) with a projection (values at padded positions
        are ignored)
    dhT : None or ndarray of shape (N, H), or (N, P) with a projection
    dcT : None or ndarray of shape (N, H)

    Returns dx (T,N,D), dh0 (N,H|P), dc0 (N,H), dw_ih (4H,D), dw_hh (4H,H|P), db (4H,), and a
    seventh element dw_hr (P,H) exactly when the forward had ``w_hr``.
    """
    check_context(ctx, "lstm")
    dy, dhT, dcT = _grads(ctx, dict(dy=dy, dhT=dhT, dcT=dcT))
    return backend_module(ctx.backend).lstm_backward(ctx, dy, dhT, dcT)


def gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, *, lengths=None, training=True):
    """GRU over a whole sequence, gates ordered r, z, n (PyTorch).

    x (T,N,D); h0 (N,H); w_ih (3H,D); w_hh (3H,H); b_ih, b_hh (3H,).
    Returns y (T,N,H), hT (N,H), ctx (None when training=False).
    """
    is_cupy, dtype = check_arrays(dict(x=x, h0=h0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh))
    T, N, D, H = _recurrent_sizes(x, w_ih, w_hh, 3)
    _state("h0", h0, N, H)
    check_shape("b_ih", b_ih, (3 * H,))
    check_shape("b_hh", b_hh, (3 * H,))
    lengths = check_lengths(lengths, T, N)
    training = check_bool("training", training)
    be = backend_module(select(is_cupy))
    x, h0, w_ih, w_hh, b_ih, b_hh = map(contiguous, (x, h0, w_ih, w_hh, b_ih, b_hh))
    return be.gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, training)


def gru_backward(ctx, dy, dhT=None):
    """Returns dx, dh0, dw_ih, dw_hh, db_ih, db_hh."""
    check_context(ctx, "gru")
    dy, dhT = _grads(ctx, dict(dy=dy, dhT=dhT))
    return backend_module(ctx.backend).gru_backward(ctx, dy, dhT)


def rnn_forward(x, h0, w_ih, w_hh, b, *, nonlinearity="tanh", lengths=None, training=True):
    """Elman RNN over a whole sequence: h_t = act(x_t W_ih^T + h_{t-1} W_hh^T + b).

    x (T,N,D); h0 (N,H); w_ih (H,D); w_hh (H,H); b (H,); nonlinearity "tanh" or "relu".
    Returns y (T,N,H), hT (N,H), ctx (None when training=False).
    """
    is_cupy, dtype = check_arrays(dict(x=x, h0=h0, w_ih=w_ih, w_hh=w_hh, b=b))
    T, N, D, H = _recurrent_sizes(x, w_ih, w_hh, 1)
    _state("h0", h0, N, H)
    check_shape("b", b, (H,))
    if not isinstance(nonlinearity, str) or nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
    lengths = check_lengths(lengths, T, N)
    training = check_bool("training", training)
    be = backend_module(select(is_cupy))
    x, h0, w_ih, w_hh, b = map(contiguous, (x, h0, w_ih, w_hh, b))
    return be.rnn_forward(x, h0, w_ih, w_hh, b, nonlinearity, lengths, training)


def rnn_backward(ctx, dy, dhT=None):
    """Returns dx, dh0, dw_ih, dw_hh, db."""
    check_context(ctx, "rnn")
    dy, dhT = _grads(ctx, dict(dy=dy, dhT=dhT))
    return backend_module(ctx.backend).rnn_backward(ctx, dy, dhT)


def _grads(ctx: Context, named: dict[str, Any]) -> list[Any]:
    """Validate upstream gradients against the forward's sizes, dtype and array kind."""
    is_cupy, dtype = check_arrays(named, allow_none=tuple(k for k in named if k != "dy"))
    if dtype != ctx.dtype:
        raise TypeError(f"dy: dtype {dtype} differs from the forward pass's {ctx.dtype}")
    if is_cupy != ctx.cupy:
        raise TypeError(
            "dy: the forward pass ran on "
            + ("CuPy" if not is_cupy else "NumPy")
            + " arrays; gradients must be the same kind of array"
        )
    out = []
    for name, a in named.items():
        if a is None:
            out.append(None)
            continue
        out.append(contiguous(a))
        expected = ctx.grad_shapes[name]
        check_shape(name, a, expected)
    return out


# ------------------------------------------------------------------------------------------------
# convolution and pooling
# ------------------------------------------------------------------------------------------------


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """PyTorch's output size (floor)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _window_geometry(
    x: Any, kernel: tuple[int, int], stride, padding, dilation, kernel_name: str
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Output size of a window op along H and W, with its stride and dilation as the kernels
    get them -> (out, stride, dilation, padded extents).

    A stride or dilation beyond the padded extent acts as the extent itself (one output along
    that axis; a kernel of size 1 never dilates), so they are clamped to it: the same result,
    and every integer a kernel sees stays far from overflow."""
    out, strides, dilations, extents = [], [], [], []
    for axis, size, k, s, p, d in zip(
        ("height", "width"), x.shape[2:], kernel, stride, padding, dilation, strict=True
    ):
        extent = check_extent("padding", size, p, axis)
        span = d * (k - 1) + 1
        if span > extent:
            dilated = f" dilated by dilation {dilation}" if dilation != (1, 1) else ""
            raise ValueError(
                f"{kernel_name}: the kernel {kernel}{dilated} spans {span} along the {axis}, "
                f"more than the input's {size} padded by padding {padding}: {extent}"
            )
        out.append((extent - span) // s + 1)
        strides.append(min(s, extent))
        dilations.append(min(d, extent))
        extents.append(extent)
    return tuple(out), tuple(strides), tuple(dilations), tuple(extents)


CONV_ALGORITHMS = ("auto", "direct", "winograd", "im2col")
CONV_ACTIVATIONS = (None, "relu")


def check_activation(activation: Any) -> None:
    """conv2d's ``activation``: None or "relu" (ValueError otherwise)."""
    if not (activation is None or (isinstance(activation, str) and activation == "relu")):
        raise ValueError(f"activation: expected one of {CONV_ACTIVATIONS}, got {activation!r}")


def conv2d_forward(
    x,
    w,
    b=None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    training=True,
    algorithm="auto",
    activation=None,
    max_pool=None,
):
    """2-D cross-correlation (PyTorch's conv2d), NCHW.

    x (N,C,H,W); w (F,C/groups,KH,KW); b (F,) or None; stride, padding, dilation: int or pair.
    algorithm: "auto" (the CPU backend picks), or pin one on the CPU: "direct" (register-blocked
    kernels), "winograd" (3x3 stride 1, dilation 1 only), "im2col" (columns + GEMM); the
    backward runs the forward's algorithm (after Winograd: dx by Winograd, dw direct). The
    reference ignores it; the CUDA backend runs im2col + GEMM only.
    activation: None, or "relu": y = max(conv + b, 0) as torch.relu (a NaN stays NaN), applied
    in the CPU kernels' store (direct and Winograd; after the GEMM for im2col; after the
    convolution on the other backends); conv2d_backward then passes the gradient where y > 0.
    max_pool: None, or max pooling of the (activated) output, as max_pool2d_forward: a kernel
    size (int or pair; stride = kernel size, no padding) or a dict with kernel_size and
    optionally stride and padding. y is then the pooled output and conv2d_backward takes its
    gradient. The CPU's direct kernels pool each image while it is in cache (the convolution's
    output is never written); elsewhere max_pool2d runs after the convolution.
    N and C may be 0 (PyTorch's rule), H and W may not. Returns y (N,F,OH,OW), ctx (None when
    training=False).
    """
    is_cupy, dtype = check_arrays(dict(x=x, w=w, b=b), allow_none=("b",))
    check_image("x", x)
    check_ndim("w", w, 4, "(F, C/groups, KH, KW)")
    stride = pair("stride", stride, 1)
    padding = pair("padding", padding, 0)
    dilation = pair("dilation", dilation, 1)
    groups = integer("groups", groups, 1)
    N, C, Hi, Wi = x.shape
    F, Cg, KH, KW = w.shape
    if C % groups:
        raise ValueError(f"groups: {groups} does not divide the {C} input channels of x")
    if F % groups:
        raise ValueError(f"groups: {groups} does not divide the {F} output channels of w")
    if Cg != C // groups:
        raise ValueError(
            f"w: expected {C // groups} input channels per group (C={C}, groups={groups}), "
            f"got shape {w.shape}"
        )
    if min(F, KH, KW) < 1:
        raise ValueError(f"w: every dimension must be positive, got shape {w.shape}")
    if b is not None:
        check_shape("b", b, (F,))
    (OH, OW), stride, dilation, (Hp, Wp) = _window_geometry(
        x, (KH, KW), stride, padding, dilation, "w"
    )
    check_size("padding" if padding != (0, 0) else "x", "the output", (N, F, OH, OW), x)
    check_size("padding", "the padded input", (N, C, Hp, Wp), x)
    training = check_bool("training", training)
    if not isinstance(algorithm, str) or algorithm not in CONV_ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {CONV_ALGORITHMS}, got {algorithm!r}")
    check_activation(activation)
    pool = _conv_max_pool(max_pool, (N, F, OH, OW))
    backend = select(is_cupy)
    if backend == "numpy":  # the reference's im2col columns (C2)
        check_size("w", "the reference's columns", (N, C, KH, KW, OH, OW), x)
    be = backend_module(backend)
    x, w, b = map(contiguous, (x, w, b))
    if be.name == "cpu":
        y, ctx = be.conv2d_forward_algorithm(
            x, w, b, stride, padding, dilation, groups, training, algorithm, activation, pool
        )
        if pool is not None:  # the kernels pooled y, and fold the ReLU into the pooling's backward
            return y, ctx
    else:
        if be.name == "cuda" and algorithm not in ("auto", "im2col"):
            raise ValueError(
                f"algorithm: {algorithm!r} runs on the CPU only; the CUDA backend has im2col + "
                "GEMM"
            )
        y, ctx = be.conv2d_forward(x, w, b, stride, padding, dilation, groups, training)
        if activation == "relu":
            y = array_module(y).maximum(y, 0, out=y)
    if activation == "relu" and ctx is not None:
        ctx.relu_output = y
    if pool is not None:
        y, pool_ctx = be.max_pool2d_forward(y, *pool, training)
        if ctx is not None:
            ctx.pool, ctx.grad_shapes = pool_ctx, {"dy": y.shape}
    return y, ctx


def max_pool_window(max_pool):
    """conv2d_forward's ``max_pool`` -> None or its (kernel_size, stride, padding) pairs: a
    kernel size (int or pair; stride = kernel size, no padding) or a dict with kernel_size and
    optionally stride and padding, padding at most half the kernel (TypeError/ValueError
    naming max_pool otherwise). Also the layers' check of their own ``max_pool``."""
    if max_pool is None:
        return None
    if isinstance(max_pool, dict):
        unknown = set(max_pool) - {"kernel_size", "stride", "padding"}
        if unknown or "kernel_size" not in max_pool:
            raise ValueError(
                "max_pool: expected a kernel size or a dict with 'kernel_size' and optionally "
                f"'stride' and 'padding', got keys {sorted(max_pool)}"
            )
        kernel_size, stride, padding = (
            max_pool["kernel_size"], max_pool.get("stride"), max_pool.get("padding", 0)
        )  # fmt: skip
    else:
        kernel_size, stride, padding = max_pool, None, 0
    name = "max_pool" if not isinstance(max_pool, dict) else "max_pool['kernel_size']"
    kernel_size = pair(name, kernel_size, 1)
    stride = kernel_size if stride is None else pair("max_pool['stride']", stride, 1)
    padding = pair("max_pool['padding']", padding, 0)
    if padding[0] > kernel_size[0] // 2 or padding[1] > kernel_size[1] // 2:
        raise ValueError(
            f"max_pool: padding must be at most half the kernel size {kernel_size}, got "
            f"{padding}"
        )
    return kernel_size, stride, padding


def _conv_max_pool(max_pool, out_shape):
    """max_pool_window, checked as max_pool2d_forward checks a window against the
    convolution's output (N, F, OH, OW)."""
    window = max_pool_window(max_pool)
    if window is None:
        return None
    kernel_size, stride, padding = window
    OH, OW = out_shape[2:]
    POH = (OH + 2 * padding[0] - kernel_size[0]) // stride[0] + 1
    POW = (OW + 2 * padding[1] - kernel_size[1]) // stride[1] + 1
    if POH < 1 or POW < 1:
        raise ValueError(
            f"max_pool: kernel size {kernel_size} (padding {padding}) is larger than the "
            f"convolution's {OH}x{OW} output"
        )
    return window


def conv2d_backward(ctx, dy):
    """Returns dx (N,C,H,W), dw (F,C/groups,KH,KW), db (F,) or None when the forward had no bias.
    After a forward with activation="relu" the gradient passes only where its output was
    positive (torch.relu's backward: zero elsewhere, even for a NaN gradient)."""
    return conv2d_gradients(ctx, dy, input_grad=True)


def conv2d_gradients(ctx, dy, *, input_grad):
    """conv2d_backward for callers that know whether dx is needed (fastrnn.torch: the input's
    requires_grad, as torch's output_mask): ``input_grad=False`` returns dx as None and the
    CPU kernels skip its work (a network's first layer: about half of its backward)."""
    check_context(ctx, "conv2d")
    (dy,) = _grads(ctx, dict(dy=dy))
    input_grad = check_bool("input_grad", input_grad)
    if ctx.pool is not None:  # conv2d_forward(max_pool=...) pooled after the convolution
        dy = backend_module(ctx.backend).max_pool2d_backward(ctx.pool, dy)
    if ctx.relu_output is None:
        pass
    elif ctx.backend == "cpu":
        # (a per-thread buffer: the backward below only reads it)
        dy = backend_module("cpu").relu_backward(ctx.relu_output, dy, reuse=True)
    else:
        dy = array_module(dy).where(ctx.relu_output > 0, dy, 0).astype(dy.dtype, copy=False)
    dx, dw, db = backend_module(ctx.backend).conv2d_backward(ctx, dy, input_grad)
    return (dx if input_grad else None), dw, db


def _pool_args(x, kernel_size, stride, padding):
    """Validate a pooling call -> (backend, x, kernel_size, stride, padding), N and C may be 0
    (PyTorch refuses C=0; the result is just empty), H and W may not."""
    is_cupy, dtype = check_arrays(dict(x=x))
    check_image("x", x)
    kernel_size = pair("kernel_size", kernel_size, 1)
    stride = kernel_size if stride is None else pair("stride", stride, 1)
    padding = pair("padding", padding, 0)
    if padding[0] > kernel_size[0] // 2 or padding[1] > kernel_size[1] // 2:
        raise ValueError(
            f"padding: must be at most half the kernel size {kernel_size}, got {padding}"
        )
    (OH, OW), stride, _, (Hp, Wp) = _window_geometry(
        x, kernel_size, stride, padding, (1, 1), "kernel_size"
    )
    N, C = x.shape[:2]
    check_size("kernel_size", "the output", (N, C, OH, OW), x)
    check_size("padding", "the padded input", (N, C, Hp, Wp), x)
    backend = select(is_cupy)
    if backend == "numpy":
        # The reference's window taps (P2), and its mask of the real taps: one padded plane
        # and its taps, whatever N and C are.
        taps = (max(N, 1), max(C, 1), kernel_size[0] * kernel_size[1], OH, OW)
        check_size("kernel_size", "the reference's window taps", taps, x)
        check_size("padding", "the reference's padded plane", (1, 1, Hp, Wp), x)
    return backend, contiguous(x), kernel_size, stride, padding


def max_pool2d_forward(x, kernel_size, stride=None, padding=0, *, training=True):
    """Max pooling, PyTorch's defaults (floor output size; padding never wins a max).

    x (N,C,H,W) -> y (N,C,OH,OW), ctx (None when training=False)."""
    backend, x, k, s, p = _pool_args(x, kernel_size, stride, padding)
    training = check_bool("training", training)
    return backend_module(backend).max_pool2d_forward(x, k, s, p, training)


def max_pool2d_backward(ctx, dy):
    check_context(ctx, "max_pool2d")
    (dy,) = _grads(ctx, dict(dy=dy))
    return backend_module(ctx.backend).max_pool2d_backward(ctx, dy)


def avg_pool2d_forward(x, kernel_size, stride=None, padding=0, *, training=True):
    """Average pooling, PyTorch's defaults (floor output size; the average counts padding).

    x (N,C,H,W) -> y (N,C,OH,OW), ctx (None when training=False)."""
    backend, x, k, s, p = _pool_args(x, kernel_size, stride, padding)
    training = check_bool("training", training)
    return backend_module(backend).avg_pool2d_forward(x, k, s, p, training)


def avg_pool2d_backward(ctx, dy):
    check_context(ctx, "avg_pool2d")
    (dy,) = _grads(ctx, dict(dy=dy))
    return backend_module(ctx.backend).avg_pool2d_backward(ctx, dy)
