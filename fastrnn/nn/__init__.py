"""The layer API: PyTorch-shaped modules over fastrnn's kernels, on NumPy and CuPy arrays.

Every layer's ``forward`` saves what its ``backward`` needs; ``backward(dy)`` returns the input
gradient and accumulates parameter gradients. Recurrent, convolution and pooling layers call the
public functional API (``fastrnn.lstm_forward`` etc.), so they run on whichever backend the
arrays pick (CPU kernels for NumPy, CUDA kernels for CuPy, the reference under
``fastrnn.use_backend("numpy")``).
"""

from __future__ import annotations

from fastrnn.nn import functional
from fastrnn.nn._xp import no_grad
from fastrnn.nn.activation import ReLU, Sigmoid, Tanh
from fastrnn.nn.container import Sequential
from fastrnn.nn.conv import Conv2d
from fastrnn.nn.dropout import Dropout
from fastrnn.nn.init import manual_seed
from fastrnn.nn.linear import Embedding, Flatten, Identity, Linear
from fastrnn.nn.module import IncompatibleKeys, Module, Parameter
from fastrnn.nn.normalization import BatchNorm1d, BatchNorm2d
from fastrnn.nn.pooling import AvgPool2d, MaxPool2d
from fastrnn.nn.recurrent import GRU, LSTM, RNN

__all__ = [
    "Parameter",
    "Module",
    "IncompatibleKeys",
    "Linear",
    "Embedding",
    "Flatten",
    "Identity",
    "LSTM",
    "GRU",
    "RNN",
    "Conv2d",
    "MaxPool2d",
    "AvgPool2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "ReLU",
    "Sigmoid",
    "Tanh",
    "Dropout",
    "Sequential",
    "functional",
    "manual_seed",
    "no_grad",
]
