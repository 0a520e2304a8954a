"""The NumPy reference of every op: readable, float64-capable, the oracle the kernels are tested
against. Same signatures as the top-level functions of :mod:`fastrnn`; these functions do not
validate their input (call ``fastrnn.*`` inside ``fastrnn.use_backend("numpy")`` for that).
They run on CuPy arrays too (the array module is taken from ``x``)."""

from __future__ import annotations

from fastrnn.reference.conv2d import conv2d_backward, conv2d_forward
from fastrnn.reference.gru import gru_backward, gru_forward
from fastrnn.reference.lstm import lstm_backward, lstm_forward
from fastrnn.reference.pool2d import (
    avg_pool2d_backward,
    avg_pool2d_forward,
    max_pool2d_backward,
    max_pool2d_forward,
)
from fastrnn.reference.rnn import rnn_backward, rnn_forward

__all__ = [
    "lstm_forward",
    "lstm_backward",
    "gru_forward",
    "gru_backward",
    "rnn_forward",
    "rnn_backward",
    "conv2d_forward",
    "conv2d_backward",
    "max_pool2d_forward",
    "max_pool2d_backward",
    "avg_pool2d_forward",
    "avg_pool2d_backward",
]
