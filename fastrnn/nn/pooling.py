"""MaxPool2d and AvgPool2d over the pooling kernels, with PyTorch's defaults (floor output size,
padding never wins a max, the average counts padding)."""

from __future__ import annotations

from typing import Any

from fastrnn.backends.ops import (
    avg_pool2d_backward,
    avg_pool2d_forward,
    max_pool2d_backward,
    max_pool2d_forward,
)
from fastrnn.backends.validation import pair
from fastrnn.nn._check import check_input
from fastrnn.nn._xp import grad_enabled
from fastrnn.nn.module import Module


class _Pool2d(Module):
    _forward = staticmethod(max_pool2d_forward)
    _backward = staticmethod(max_pool2d_backward)

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.kernel_size = pair("kernel_size", kernel_size, 1)
        self.stride = self.kernel_size if stride is None else pair("stride", stride, 1)
        self.padding = pair("padding", padding, 0)
        self._cache = None

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"

    def forward(self, x: Any) -> Any:
        check_input(type(self).__name__, "x", x, None, (4,))
        y, ctx = self._forward(
            x, self.kernel_size, self.stride, self.padding, training=grad_enabled()
        )
        self._cache = ctx
        return y

    def backward(self, dy: Any) -> Any:
        return self._backward(self._saved(), dy)


class MaxPool2d(_Pool2d):
    """torch.nn.MaxPool2d(kernel_size, stride=kernel_size, padding=0)."""


class AvgPool2d(_Pool2d):
    """torch.nn.AvgPool2d(kernel_size, stride=kernel_size, padding=0), count_include_pad=True."""

    _forward = staticmethod(avg_pool2d_forward)
    _backward = staticmethod(avg_pool2d_backward)
