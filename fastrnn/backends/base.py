"""The one typed interface every backend implements, and the context object backward reads.

Each backend (``numpy`` = the reference, ``cpu`` = Cython + OpenMP, ``cuda`` = CUDA C through CuPy)
is a module exposing exactly the functions of :class:`Backend`, with exactly these signatures.
The public functions in :mod:`fastrnn.backends.ops` validate and normalise the arguments first, so
a backend receives:

* C-contiguous float arrays, all of one dtype (float32 or float64), all NumPy or all CuPy;
* ``lengths`` as ``None`` or a host ``numpy.ndarray`` of dtype int64, shape (N,), values in 1..T;
* convolution/pooling geometry as pairs of ints ``(h, w)``, already checked;
* ``dhT`` / ``dcT`` as ``None`` or arrays of the right shape and dtype.

``tests/test_interface.py`` checks that every backend module has every function with these
parameter names.

Conventions: time-major; T steps, N batch, D input features, H hidden units; PyTorch's weight
layouts and gate orders (LSTM i, f, g, o; GRU r, z, n); NCHW images.
"""

from __future__ import annotations

from fastrnn.context import Context  # noqa: F401  (re-exported: part of the interface)


class Backend:
    """Documentation of the backend interface (signatures only; see module docstring)."""

    name = "abstract"

    # -- recurrent ---------------------------------------------------------------------------
    def lstm_forward(self, x, h0, c0, w_ih, w_hh, b, lengths, training, w_hr=None):
        """x (T,N,D); h0 (N,P); c0 (N,H); w_ih (4H,D); w_hh (4H,P); b (4H,); w_hr None or
        (P,H), P < H (without it P = H) -> y (T,N,P), hT (N,P), cT (N,H), ctx"""
        raise NotImplementedError

    def lstm_backward(self, ctx, dy, dhT, dcT):
        """dy (T,N,P); dhT (N,P) or None; dcT (N,H) or None -> dx, dh0, dc0, dw_ih, dw_hh, db,
        and dw_hr (P,H) as a seventh element exactly when the forward had w_hr"""
        raise NotImplementedError

    def gru_forward(self, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, training):
        """x (T,N,D); h0 (N,H); w_ih (3H,D); w_hh (3H,H); b_ih, b_hh (3H,) -> y, hT, ctx"""
        raise NotImplementedError

    def gru_backward(self, ctx, dy, dhT):
        """-> dx, dh0, dw_ih, dw_hh, db_ih, db_hh"""
        raise NotImplementedError

    def rnn_forward(self, x, h0, w_ih, w_hh, b, nonlinearity, lengths, training):
        """x (T,N,D); h0 (N,H); w_ih (H,D); w_hh (H,H); b (H,) -> y, hT, ctx"""
        raise NotImplementedError

    def rnn_backward(self, ctx, dy, dhT):
        """-> dx, dh0, dw_ih, dw_hh, db"""
        raise NotImplementedError

    # -- convolution and pooling ---------------------------------------------------------------
    def conv2d_forward(self, x, w, b, stride, padding, dilation, groups, training):
        """x (N,C,H,W); w (F,C/groups,KH,KW); b (F,) or None; pairs -> y (N,F,OH,OW), ctx"""
        raise NotImplementedError

    def conv2d_backward(self, ctx, dy, input_grad=True):
        """dy (N,F,OH,OW) -> dx, dw, db (db None when the forward had no bias); without
        ``input_grad`` a backend may skip dx and return None for it"""
        raise NotImplementedError

    def max_pool2d_forward(self, x, kernel_size, stride, padding, training):
        """x (N,C,H,W); pairs -> y (N,C,OH,OW), ctx"""
        raise NotImplementedError

    def max_pool2d_backward(self, ctx, dy):
        """-> dx"""
        raise NotImplementedError

    def avg_pool2d_forward(self, x, kernel_size, stride, padding, training):
        """x (N,C,H,W); pairs -> y (N,C,OH,OW), ctx"""
        raise NotImplementedError

    def avg_pool2d_backward(self, ctx, dy):
        """-> dx"""
        raise NotImplementedError


OPS = [
    name
    for name in vars(Backend)
    if name.endswith("_forward") or name.endswith("_backward")
]
