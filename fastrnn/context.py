"""The context object a forward pass returns and its backward pass reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Context:
    """What a forward pass saves for its backward pass.

    op      : the op that made it ("lstm", "gru", "rnn", "conv2d", "max_pool2d", "avg_pool2d")
    backend : the backend that made it ("numpy", "cpu", "cuda"); backward runs on the same one
    dtype   : numpy dtype of the arrays
    cupy    : True when the arrays are CuPy arrays
    grad_shapes : the shape each upstream gradient of backward must have, by argument name
              (e.g. {"dy": (T, N, H), "dhT": (N, H), "dcT": (N, H)}); the public backward
              validates against it
    saved   : backend-private arrays and values; only the backend that made it reads them
    relu_output : conv2d's output when its forward applied ReLU (``activation="relu"``):
              fastrnn.conv2d_backward keeps the gradient where it is positive, then runs the
              backend's backward (None otherwise)
    pool    : the max pooling's context when conv2d_forward pooled its output after the
              convolution (``max_pool=...``, not on the CPU, which keeps it in ``saved``):
              fastrnn.conv2d_backward runs its backward first (None otherwise)
    """

    op: str
    backend: str
    dtype: Any
    cupy: bool
    grad_shapes: dict[str, tuple[int, ...]]
    saved: dict[str, Any] = field(default_factory=dict)
    relu_output: Any = None
    pool: Any = None

    def __repr__(self) -> str:  # keep arrays out of reprs
        return (
            f"Context(op={self.op!r}, backend={self.backend!r}, dtype={self.dtype}, "
            f"grad_shapes={self.grad_shapes})"
        )
