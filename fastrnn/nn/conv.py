"""Conv2d over the fused convolution kernels (fastrnn.conv2d_forward / conv2d_backward)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fastrnn.backends.ops import (
    CONV_ALGORITHMS,
    check_activation,
    conv2d_backward,
    conv2d_forward,
    max_pool_window,
)
from fastrnn.backends.validation import pair
from fastrnn.nn import init
from fastrnn.nn._check import check_input, positive_int
from fastrnn.nn._xp import grad_enabled
from fastrnn.nn.module import Module, Parameter


class Conv2d(Module):
    """2-D cross-correlation over NCHW input, as torch.nn.Conv2d (zero padding).

    weight (out_channels, in_channels/groups, KH, KW) and bias (out_channels,), both
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = in_channels/groups * KH * KW (torch's
    kaiming_uniform_(a=sqrt(5)) and bias init). ``algorithm`` pins the CPU algorithm
    ("auto", "direct", "winograd", "im2col"; see fastrnn.conv2d_forward). ``activation="relu"``
    makes the layer Conv2d followed by ReLU in one pass: the CPU kernels apply the ReLU as they
    store the output, and the backward passes the gradient where the output is positive.
    ``max_pool`` (a kernel size, or a dict with kernel_size and optionally stride and padding,
    as fastrnn.conv2d_forward's) makes it Conv2d [+ ReLU] followed by MaxPool2d: the CPU's
    direct kernels pool each image while it is in cache and never write the unpooled output.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        dtype: Any = np.float32,
        algorithm: str = "auto",
        activation: str | None = None,
        max_pool: Any = None,
    ) -> None:
        super().__init__()
        if not isinstance(algorithm, str) or algorithm not in CONV_ALGORITHMS:
            raise ValueError(f"algorithm: expected one of {CONV_ALGORITHMS}, got {algorithm!r}")
        check_activation(activation)
        max_pool_window(max_pool)  # (its size against the output: in forward)
        self.max_pool = max_pool
        self.algorithm = algorithm
        self.activation = activation
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_channels = positive_int("out_channels", out_channels)
        self.kernel_size = pair("kernel_size", kernel_size, 1)
        self.stride = pair("stride", stride, 1)
        self.padding = pair("padding", padding, 0)
        self.dilation = pair("dilation", dilation, 1)
        self.groups = positive_int("groups", groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups: {groups} must divide in_channels ({in_channels}) and out_channels "
                f"({out_channels})"
            )
        kh, kw = self.kernel_size
        fan_in = in_channels // groups * kh * kw
        bound = init.fan_in_bound(fan_in)
        self.weight = Parameter(
            init.uniform((out_channels, in_channels // groups, kh, kw), bound, dtype)
        )
        self.bias = Parameter(init.uniform((out_channels,), bound, dtype)) if bias else None
        self._cache = None

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        s += f", stride={self.stride}" if self.stride != (1, 1) else ""
        s += f", padding={self.padding}" if self.padding != (0, 0) else ""
        s += f", dilation={self.dilation}" if self.dilation != (1, 1) else ""
        s += f", groups={self.groups}" if self.groups != 1 else ""
        s += f", algorithm={self.algorithm!r}" if self.algorithm != "auto" else ""
        s += f", activation={self.activation!r}" if self.activation is not None else ""
        s += f", max_pool={self.max_pool!r}" if self.max_pool is not None else ""
        return s + ("" if self.bias is not None else ", bias=False")

    def forward(self, x: Any) -> Any:
        check_input("Conv2d", "x", x, self.weight.data, (4,))
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"Conv2d: x: expected {self.in_channels} channels (N, C, H, W), got {x.shape}"
            )
        training = grad_enabled()
        y, ctx = conv2d_forward(
            x,
            self.weight.data,
            None if self.bias is None else self.bias.data,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            training=training,
            algorithm=self.algorithm,
            activation=self.activation,
            max_pool=self.max_pool,
        )
        self._cache = ctx
        return y

    def backward(self, dy: Any) -> Any:
        ctx = self._saved()
        dx, dw, db = conv2d_backward(ctx, dy)
        self.weight.accumulate(dw)
        if self.bias is not None:
            self.bias.accumulate(db)
        return dx
