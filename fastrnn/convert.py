"""Weight converters between fastrnn's layout (PyTorch's) and other common recurrent layouts.

fastrnn (= PyTorch) layout, the one every function here converts from and to::

    LSTM  w_ih (4H, D), w_hh (4H, H), b (4H,) = b_ih + b_hh     gates i, f, g, o (rows)
    GRU   w_ih (3H, D), w_hh (3H, H), b_ih (3H,), b_hh (3H,)    gates r, z, n (rows)
    RNN   w_ih (H, D),  w_hh (H, H),  b (H,) = b_ih + b_hh

Other layouts keep the input in rows and the gates in columns (``x @ kernel``):

=============  ===========================================================  ==============
layout         arrays                                                       gate order
=============  ===========================================================  ==============
CS231n LSTM    Wx (D, 4H), Wh (H, 4H), b (4H,)                              i, f, o, g
CS231n RNN     Wx (D, H), Wh (H, H), b (H,)                                 --
haste LSTM     kernel (D, 4H), recurrent_kernel (H, 4H), bias (4H,)         i, g, f, o
haste GRU      kernel (D, 3H), recurrent_kernel (H, 3H), bias (3H,),        z, r, n
               recurrent_bias (3H,)
Keras LSTM     kernel (D, 4H), recurrent_kernel (H, 4H), bias (4H,)         i, f, c, o
Keras GRU      kernel (D, 3H), recurrent_kernel (H, 3H), bias (2, 3H)       z, r, h
=============  ===========================================================  ==============

The gate names differ, the equations do not: g (PyTorch) = g (CS231n, haste) = c (Keras) is the
tanh candidate; z is the update gate and n = h (Keras) the GRU candidate. Every converter is a
pure permutation and transposition (plus a bias sum or split), so round trips are exact.

GRUs: PyTorch, haste and Keras with ``reset_after=True`` (TensorFlow 2's default, its bias has
shape (2, 3H): input bias then recurrent bias) all apply the reset gate after the recurrent
product, ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``. Keras with ``reset_after=False``
(bias (3H,)) computes ``tanh(W_in x + W_hn (r * h) + b)``, a different function that no weights
of the other layouts reproduce, so it is refused with a ValueError. The CS231n course has no GRU.

Keras converters assume Keras' TF2 defaults ``activation="tanh"`` and
``recurrent_activation="sigmoid"`` (Keras 1/2.2's ``hard_sigmoid`` is a different function).

Biases: layouts with one bias hold PyTorch's ``b_ih + b_hh``; going back to PyTorch's two biases,
:func:`split_bias` puts the whole sum in ``b_ih`` and zeros in ``b_hh`` (any split with the same
sum computes the same function).

Arrays may be NumPy or CuPy; results are new arrays of the same kind (never views of the input).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "lstm_bias_from_torch",
    "split_bias",
    "lstm_to_cs231n",
    "lstm_from_cs231n",
    "rnn_to_cs231n",
    "rnn_from_cs231n",
    "lstm_to_haste",
    "lstm_from_haste",
    "gru_to_haste",
    "gru_from_haste",
    "lstm_to_keras",
    "lstm_from_keras",
    "gru_to_keras",
    "gru_from_keras",
]

# gate orders, by layout
TORCH_LSTM = "ifgo"
CS231N_LSTM = "ifog"
HASTE_LSTM = "igfo"
KERAS_LSTM = "ifgo"  # Keras' i, f, c, o with c = g
TORCH_GRU = "rzn"
HASTE_GRU = "zrn"
KERAS_GRU = "zrn"  # Keras' z, r, h with h = n


def _xp(a: Any) -> Any:
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    import numpy

    if not isinstance(a, numpy.ndarray):
        raise TypeError(f"expected a numpy.ndarray or cupy.ndarray, got {type(a).__name__}")
    return numpy


def _check(name: str, a: Any, shape: tuple[int | None, ...]) -> None:
    _xp(a)
    if a.ndim != len(shape) or any(
        w is not None and g != w for g, w in zip(a.shape, shape, strict=True)
    ):
        want = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {a.shape}")


def _square(name: str, a: Any) -> int:
    _check(name, a, (None, None))
    _check(name, a, (a.shape[0], a.shape[0]))
    return a.shape[0]


def _reorder(a: Any, src: str, dst: str, axis: int) -> Any:
    """Permute the gate blocks of ``a`` along ``axis`` from order ``src`` to order ``dst``."""
    xp = _xp(a)
    blocks = dict(zip(src, xp.split(a, len(src), axis=axis), strict=True))
    return xp.concatenate([blocks[g] for g in dst], axis=axis)


def _gates(name: str, a: Any, axis: int, gates: int) -> int:
    """Hidden size H from a dimension that must hold ``gates * H``."""
    size = a.shape[axis]
    if size % gates or size == 0:
        raise ValueError(
            f"{name}: dimension {axis} must be {gates} * hidden_size, got shape {a.shape}"
        )
    return size // gates


# ------------------------------------------------------------------------------------------------
# PyTorch's two biases
# ------------------------------------------------------------------------------------------------


def lstm_bias_from_torch(b_ih: Any, b_hh: Any) -> Any:
    """fastrnn's single LSTM/RNN bias from PyTorch's pair: ``b_ih + b_hh``."""
    _check("b_hh", b_hh, (b_ih.shape[0],))
    return b_ih + b_hh


def split_bias(b: Any) -> tuple[Any, Any]:
    """PyTorch's (b_ih, b_hh) from a single bias: (b, zeros). Same function, any split."""
    xp = _xp(b)
    return b.copy(), xp.zeros_like(b)


# ------------------------------------------------------------------------------------------------
# CS231n
# ------------------------------------------------------------------------------------------------


def lstm_to_cs231n(w_ih: Any, w_hh: Any, b: Any) -> tuple[Any, Any, Any]:
    """fastrnn LSTM (w_ih (4H,D), w_hh (4H,H), b (4H,); i,f,g,o) -> CS231n (Wx (D,4H),
    Wh (H,4H), b (4H,); i,f,o,g)."""
    H = _gates("w_hh", w_hh, 0, 4)
    _check("w_hh", w_hh, (4 * H, H))
    _check("w_ih", w_ih, (4 * H, None))
    _check("b", b, (4 * H,))
    return (
        _reorder(w_ih, TORCH_LSTM, CS231N_LSTM, 0).T.copy(),
        _reorder(w_hh, TORCH_LSTM, CS231N_LSTM, 0).T.copy(),
        _reorder(b, TORCH_LSTM, CS231N_LSTM, 0),
    )


def lstm_from_cs231n(Wx: Any, Wh: Any, b: Any) -> tuple[Any, Any, Any]:
    """CS231n LSTM (Wx (D,4H), Wh (H,4H), b (4H,); i,f,o,g) -> fastrnn (w_ih, w_hh, b)."""
    H = _gates("Wh", Wh, 1, 4)
    _check("Wh", Wh, (H, 4 * H))
    _check("Wx", Wx, (None, 4 * H))
    _check("b", b, (4 * H,))
    return (
        _reorder(Wx.T, CS231N_LSTM, TORCH_LSTM, 0),
        _reorder(Wh.T, CS231N_LSTM, TORCH_LSTM, 0),
        _reorder(b, CS231N_LSTM, TORCH_LSTM, 0),
    )


def rnn_to_cs231n(w_ih: Any, w_hh: Any, b: Any) -> tuple[Any, Any, Any]:
    """fastrnn RNN (w_ih (H,D), w_hh (H,H), b (H,)) -> CS231n (Wx (D,H), Wh (H,H), b (H,))."""
    H = _square("w_hh", w_hh)
    _check("w_ih", w_ih, (H, None))
    _check("b", b, (H,))
    return w_ih.T.copy(), w_hh.T.copy(), b.copy()


def rnn_from_cs231n(Wx: Any, Wh: Any, b: Any) -> tuple[Any, Any, Any]:
    """CS231n RNN (Wx (D,H), Wh (H,H), b (H,)) -> fastrnn (w_ih (H,D), w_hh (H,H), b (H,))."""
    H = _square("Wh", Wh)
    _check("Wx", Wx, (None, H))
    _check("b", b, (H,))
    return Wx.T.copy(), Wh.T.copy(), b.copy()


# ------------------------------------------------------------------------------------------------
# haste
# ------------------------------------------------------------------------------------------------


def lstm_to_haste(w_ih: Any, w_hh: Any, b: Any) -> tuple[Any, Any, Any]:
    """fastrnn LSTM -> haste (kernel (D,4H), recurrent_kernel (H,4H), bias (4H,); i,g,f,o)."""
    H = _gates("w_hh", w_hh, 0, 4)
    _check("w_hh", w_hh, (4 * H, H))
    _check("w_ih", w_ih, (4 * H, None))
    _check("b", b, (4 * H,))
    return (
        _reorder(w_ih, TORCH_LSTM, HASTE_LSTM, 0).T.copy(),
        _reorder(w_hh, TORCH_LSTM, HASTE_LSTM, 0).T.copy(),
        _reorder(b, TORCH_LSTM, HASTE_LSTM, 0),
    )


def lstm_from_haste(kernel: Any, recurrent_kernel: Any, bias: Any) -> tuple[Any, Any, Any]:
    """haste LSTM (kernel, recurrent_kernel, bias; i,g,f,o) -> fastrnn (w_ih, w_hh, b)."""
    H = _gates("recurrent_kernel", recurrent_kernel, 1, 4)
    _check("recurrent_kernel", recurrent_kernel, (H, 4 * H))
    _check("kernel", kernel, (None, 4 * H))
    _check("bias", bias, (4 * H,))
    return (
        _reorder(kernel.T, HASTE_LSTM, TORCH_LSTM, 0),
        _reorder(recurrent_kernel.T, HASTE_LSTM, TORCH_LSTM, 0),
        _reorder(bias, HASTE_LSTM, TORCH_LSTM, 0),
    )


def gru_to_haste(w_ih: Any, w_hh: Any, b_ih: Any, b_hh: Any) -> tuple[Any, Any, Any, Any]:
    """fastrnn GRU (r,z,n) -> haste (kernel (D,3H), recurrent_kernel (H,3H), bias (3H,),
    recurrent_bias (3H,); z,r,n)."""
    H = _gates("w_hh", w_hh, 0, 3)
    _check("w_hh", w_hh, (3 * H, H))
    _check("w_ih", w_ih, (3 * H, None))
    _check("b_ih", b_ih, (3 * H,))
    _check("b_hh", b_hh, (3 * H,))
    return (
        _reorder(w_ih, TORCH_GRU, HASTE_GRU, 0).T.copy(),
        _reorder(w_hh, TORCH_GRU, HASTE_GRU, 0).T.copy(),
        _reorder(b_ih, TORCH_GRU, HASTE_GRU, 0),
        _reorder(b_hh, TORCH_GRU, HASTE_GRU, 0),
    )


def gru_from_haste(
    kernel: Any, recurrent_kernel: Any, bias: Any, recurrent_bias: Any
) -> tuple[Any, Any, Any, Any]:
    """haste GRU (z,r,n) -> fastrnn (w_ih, w_hh, b_ih, b_hh; r,z,n)."""
    H = _gates("recurrent_kernel", recurrent_kernel, 1, 3)
    _check("recurrent_kernel", recurrent_kernel, (H, 3 * H))
    _check("kernel", kernel, (None, 3 * H))
    _check("bias", bias, (3 * H,))
    _check("recurrent_bias", recurrent_bias, (3 * H,))
    return (
        _reorder(kernel.T, HASTE_GRU, TORCH_GRU, 0),
        _reorder(recurrent_kernel.T, HASTE_GRU, TORCH_GRU, 0),
        _reorder(bias, HASTE_GRU, TORCH_GRU, 0),
        _reorder(recurrent_bias, HASTE_GRU, TORCH_GRU, 0),
    )


# ------------------------------------------------------------------------------------------------
# Keras
# ------------------------------------------------------------------------------------------------


def lstm_to_keras(w_ih: Any, w_hh: Any, b: Any) -> tuple[Any, Any, Any]:
    """fastrnn LSTM -> Keras (kernel (D,4H), recurrent_kernel (H,4H), bias (4H,); i,f,c,o).
    Keras' order is PyTorch's, so this is a transposition."""
    H = _gates("w_hh", w_hh, 0, 4)
    _check("w_hh", w_hh, (4 * H, H))
    _check("w_ih", w_ih, (4 * H, None))
    _check("b", b, (4 * H,))
    return w_ih.T.copy(), w_hh.T.copy(), b.copy()


def lstm_from_keras(kernel: Any, recurrent_kernel: Any, bias: Any = None) -> tuple[Any, Any, Any]:
    """Keras LSTM (kernel, recurrent_kernel, bias or None for ``use_bias=False``; i,f,c,o) ->
    fastrnn (w_ih, w_hh, b)."""
    H = _gates("recurrent_kernel", recurrent_kernel, 1, 4)
    _check("recurrent_kernel", recurrent_kernel, (H, 4 * H))
    _check("kernel", kernel, (None, 4 * H))
    if bias is None:
        bias = _xp(kernel).zeros(4 * H, dtype=kernel.dtype)
    _check("bias", bias, (4 * H,))
    return kernel.T.copy(), recurrent_kernel.T.copy(), bias.copy()


def gru_to_keras(w_ih: Any, w_hh: Any, b_ih: Any, b_hh: Any) -> tuple[Any, Any, Any]:
    """fastrnn GRU (r,z,n) -> Keras ``GRU(reset_after=True)`` (kernel (D,3H),
    recurrent_kernel (H,3H), bias (2,3H) = [input bias, recurrent bias]; z,r,h)."""
    H = _gates("w_hh", w_hh, 0, 3)
    _check("w_hh", w_hh, (3 * H, H))
    _check("w_ih", w_ih, (3 * H, None))
    _check("b_ih", b_ih, (3 * H,))
    _check("b_hh", b_hh, (3 * H,))
    xp = _xp(w_ih)
    bias = xp.stack(
        [_reorder(b_ih, TORCH_GRU, KERAS_GRU, 0), _reorder(b_hh, TORCH_GRU, KERAS_GRU, 0)]
    )
    return (
        _reorder(w_ih, TORCH_GRU, KERAS_GRU, 0).T.copy(),
        _reorder(w_hh, TORCH_GRU, KERAS_GRU, 0).T.copy(),
        bias,
    )


def gru_from_keras(
    kernel: Any, recurrent_kernel: Any, bias: Any = None, *, reset_after: bool = True
) -> tuple[Any, Any, Any, Any]:
    """Keras GRU (z,r,h; ``reset_after=True``, bias (2,3H) or None for ``use_bias=False``) ->
    fastrnn (w_ih, w_hh, b_ih, b_hh; r,z,n).

    ``reset_after=False`` (or a bias of shape (3H,)) is a different recurrence
    (``tanh(W x + W_h (r * h) + b)``) that fastrnn's GRU cannot compute: ValueError.
    """
    if not reset_after:
        raise ValueError(
            "reset_after: Keras GRU(reset_after=False) applies the reset gate before the "
            "recurrent product; fastrnn's (PyTorch's) GRU applies it after, so no weights "
            "convert exactly; train the Keras model with reset_after=True"
        )
    H = _gates("recurrent_kernel", recurrent_kernel, 1, 3)
    _check("recurrent_kernel", recurrent_kernel, (H, 3 * H))
    _check("kernel", kernel, (None, 3 * H))
    xp = _xp(kernel)
    if bias is None:
        bias = xp.zeros((2, 3 * H), dtype=kernel.dtype)
    if bias.ndim == 1:
        raise ValueError(
            f"bias: shape {bias.shape} is Keras GRU(reset_after=False)'s; fastrnn's GRU "
            "computes the reset_after=True recurrence (bias of shape (2, 3H))"
        )
    _check("bias", bias, (2, 3 * H))
    return (
        _reorder(kernel.T, KERAS_GRU, TORCH_GRU, 0),
        _reorder(recurrent_kernel.T, KERAS_GRU, TORCH_GRU, 0),
        _reorder(bias[0], KERAS_GRU, TORCH_GRU, 0),
        _reorder(bias[1], KERAS_GRU, TORCH_GRU, 0),
    )
