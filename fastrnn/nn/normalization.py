"""BatchNorm1d and BatchNorm2d with torch.nn's statistics.

Training mode normalises with the batch's mean and biased variance and updates the running
statistics with the *unbiased* variance: ``running = (1 - momentum) * running + momentum *
batch`` (``momentum=None``: the cumulative average, 1/num_batches_tracked). Eval mode uses the
running statistics; with ``track_running_stats=False`` there are none and batch statistics are
used in both modes. ``affine`` adds ``weight`` (ones) and ``bias`` (zeros).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastrnn.nn._check import check_grad, check_input, positive_int
from fastrnn.nn._xp import array_module, grad_enabled
from fastrnn.nn.module import Module, Parameter


class _BatchNorm(Module):
    _ndims: tuple[int, ...] = ()
    _meaning = ""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        dtype: Any = np.float32,
    ) -> None:
        super().__init__()
        self.num_features = positive_int("num_features", num_features)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
            raise ValueError(f"eps: expected a number >= 0, got {eps!r}")
        if momentum is not None and (
            not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1
        ):
            raise ValueError(f"momentum: expected None or a number in [0, 1], got {momentum!r}")
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        C = num_features
        if affine:
            self.weight = Parameter(np.ones(C, dtype=dtype))
            self.bias = Parameter(np.zeros(C, dtype=dtype))
        else:
            self.weight = self.bias = None
        if track_running_stats:
            self.register_buffer("running_mean", np.zeros(C, dtype=dtype))
            self.register_buffer("running_var", np.ones(C, dtype=dtype))
            self.register_buffer("num_batches_tracked", np.array(0, dtype=np.int64))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self._cache = None

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )

    def _like(self) -> Any:
        if self.weight is not None:
            return self.weight.data
        return self.running_mean

    def forward(self, x: Any) -> Any:
        name = type(self).__name__
        check_input(name, "x", x, self._like(), self._ndims)
        C = self.num_features
        if x.shape[1] != C:
            raise ValueError(f"{name}: x: expected {C} features {self._meaning}, got {x.shape}")
        xp = array_module(x)
        axes = (0,) + tuple(range(2, x.ndim))
        bshape = (1, C) + (1,) * (x.ndim - 2)
        use_batch = self.training or self.running_mean is None
        if use_batch:
            count = x.size // C
            if count <= 1 and self.training:
                raise ValueError(
                    f"{name}: x: expected more than 1 value per channel when training, "
                    f"got shape {x.shape}"
                )
            mean = x.mean(axis=axes)
            centered = x - mean.reshape(bshape)
            var = (centered * centered).mean(axis=axes)
            if self.training and self.running_mean is not None:
                self.num_batches_tracked += 1
                if self.momentum is None:
                    factor = 1.0 / float(self.num_batches_tracked)
                else:
                    factor = self.momentum
                rm, rv = self.running_mean, self.running_var
                rm *= 1 - factor
                rm += factor * mean
                rv *= 1 - factor
                rv += factor * var * (count / max(count - 1, 1))
        else:
            mean, var = self.running_mean, self.running_var
            centered = x - mean.reshape(bshape)
        inv = 1 / xp.sqrt(var + self.eps)
        xhat = centered * inv.reshape(bshape)
        y = xhat
        if self.weight is not None:
            y = xhat * self.weight.data.reshape(bshape) + self.bias.data.reshape(bshape)
        self._cache = (xhat, inv, use_batch, axes, bshape) if grad_enabled() else None
        return y

    def backward(self, dy: Any) -> Any:
        xhat, inv, use_batch, axes, bshape = self._saved()
        check_grad(type(self).__name__, dy, xhat.shape, xhat.dtype)
        g = dy
        if self.weight is not None:
            self.weight.accumulate((dy * xhat).sum(axis=axes))
            self.bias.accumulate(dy.sum(axis=axes))
            g = dy * self.weight.data.reshape(bshape)
        if not use_batch:
            return g * inv.reshape(bshape)
        gm = g.mean(axis=axes, keepdims=True)
        gxm = (g * xhat).mean(axis=axes, keepdims=True)
        return (g - gm - xhat * gxm) * inv.reshape(bshape)


class BatchNorm1d(_BatchNorm):
    """Batch normalisation over (N, C) or (N, C, L) input, per feature C."""

    _ndims = (2, 3)
    _meaning = "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm):
    """Batch normalisation over (N, C, H, W) input, per channel C."""

    _ndims = (4,)
    _meaning = "(N, C, H, W)"
