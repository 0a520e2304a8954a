"""Pointwise activations. Each saves its output (or mask) for backward."""

from __future__ import annotations

from typing import Any

from fastrnn.nn import functional as F
from fastrnn.nn._check import check_grad, check_input
from fastrnn.nn._xp import grad_enabled
from fastrnn.nn.module import Module


class _Activation(Module):
    def __init__(self) -> None:
        super().__init__()
        self._cache = None

    def _keep(self, y: Any) -> Any:
        self._cache = y if grad_enabled() else None
        return y


class ReLU(Module):
    """max(x, 0); the gradient at 0 is 0 (as in PyTorch)."""

    def __init__(self) -> None:
        super().__init__()
        self._cache = None

    def forward(self, x: Any) -> Any:
        check_input("ReLU", "x", x, None)
        mask = x > 0
        self._cache = mask if grad_enabled() else None
        return x * mask

    def backward(self, dy: Any) -> Any:
        mask = self._saved()
        check_grad("ReLU", dy, mask.shape, dy.dtype)
        return dy * mask


class Sigmoid(_Activation):
    def forward(self, x: Any) -> Any:
        check_input("Sigmoid", "x", x, None)
        return self._keep(F.sigmoid(x))

    def backward(self, dy: Any) -> Any:
        y = self._saved()
        check_grad("Sigmoid", dy, y.shape, y.dtype)
        return dy * y * (1 - y)


class Tanh(_Activation):
    def forward(self, x: Any) -> Any:
        check_input("Tanh", "x", x, None)
        return self._keep(F.tanh(x))

    def backward(self, dy: Any) -> Any:
        y = self._saved()
        check_grad("Tanh", dy, y.shape, y.dtype)
        return dy * (1 - y * y)
