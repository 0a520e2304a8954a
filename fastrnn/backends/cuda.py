"""The ``cuda`` backend: CUDA C kernels in csrc/, compiled at run time by CuPy (NVRTC), GEMMs
through cuBLAS.

The launchers are the functions of fastrnn/_cuda/recurrent.py (LSTM, GRU, RNN: cells of one
time loop) and fastrnn/_cuda/conv.py (conv2d, pooling), with exactly the backend interface's
signatures (fastrnn/backends/base.py); they are this module's functions. Importing them imports
no CuPy: that happens at the first call (``fastrnn._cuda._runtime.runtime()``), so this module is
only loaded when CuPy arrays are passed or the backend is forced.
"""

from __future__ import annotations

from fastrnn._cuda.conv import (
    avg_pool2d_backward,
    avg_pool2d_forward,
    conv2d_backward,
    conv2d_forward,
    max_pool2d_backward,
    max_pool2d_forward,
)
from fastrnn._cuda.recurrent import (
    gru_backward,
    gru_forward,
    lstm_backward,
    lstm_forward,
    rnn_backward,
    rnn_forward,
)

name = "cuda"

# op name -> the module of fastrnn/_cuda that implements it
_MODULE_OF = {
    "lstm": "recurrent",
    "gru": "recurrent",
    "rnn": "recurrent",
    "conv2d": "conv",
    "max_pool2d": "conv",
    "avg_pool2d": "conv",
}

__all__ = [
    "avg_pool2d_backward",
    "avg_pool2d_forward",
    "conv2d_backward",
    "conv2d_forward",
    "gru_backward",
    "gru_forward",
    "lstm_backward",
    "lstm_forward",
    "max_pool2d_backward",
    "max_pool2d_forward",
    "rnn_backward",
    "rnn_forward",
]
