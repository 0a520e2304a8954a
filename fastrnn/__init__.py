"""fastrnn: fast fused kernels for recurrent and convolutional neural networks.

NumPy arrays run on the CPU kernels (Cython + OpenMP + BLAS), CuPy arrays on the CUDA kernels.
Time-major sequences, PyTorch's weight layouts and gate orders. See README.md.
"""

from __future__ import annotations

from fastrnn._threads import get_num_threads, set_num_threads
from fastrnn.backends import get_backend, use_backend
from fastrnn.backends.ops import (
    avg_pool2d_backward,
    avg_pool2d_forward,
    conv2d_backward,
    conv2d_forward,
    gru_backward,
    gru_forward,
    lstm_backward,
    lstm_forward,
    max_pool2d_backward,
    max_pool2d_forward,
    rnn_backward,
    rnn_forward,
)
from fastrnn.context import Context
from fastrnn.inference import gru_inference, lstm_inference, rnn_inference

__version__ = "0.1.0"

__all__ = [
    "Context",
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
    "lstm_inference",
    "gru_inference",
    "rnn_inference",
    "use_backend",
    "get_backend",
    "set_num_threads",
    "get_num_threads",
]
