"""Inverted dropout: in training, zero each element with probability p and scale the rest by
1/(1-p); the identity in eval mode."""

from __future__ import annotations

from typing import Any

import numpy as np

from fastrnn.nn._check import check_grad, check_input, probability
from fastrnn.nn._xp import array_module, grad_enabled
from fastrnn.nn.module import Module


class Dropout(Module):
    """``Dropout(p=0.5, seed=None)``; ``seed`` makes the masks reproducible (one generator per
    layer, per array module)."""

    def __init__(self, p: float = 0.5, seed: int | None = None) -> None:
        super().__init__()
        self.p = probability("p", p)
        self.seed = seed
        self._rngs: dict[str, Any] = {}
        self._cache = None

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def _mask(self, xp: Any, shape: tuple[int, ...], dtype: Any) -> Any:
        key = xp.__name__
        if key not in self._rngs:
            self._rngs[key] = (
                np.random.default_rng(self.seed) if xp is np else xp.random.RandomState(self.seed)
            )
        rng = self._rngs[key]
        if self.p == 1.0:
            return xp.zeros(shape, dtype=dtype)
        u = rng.random(shape, dtype=dtype) if xp is np else rng.random_sample(shape, dtype)
        return (u >= self.p).astype(dtype) / np.dtype(dtype).type(1.0 - self.p)

    def forward(self, x: Any) -> Any:
        check_input("Dropout", "x", x, None)
        if not self.training or self.p == 0.0:
            self._cache = ("identity", tuple(x.shape)) if grad_enabled() else None
            return x
        mask = self._mask(array_module(x), tuple(x.shape), x.dtype)
        self._cache = ("mask", mask) if grad_enabled() else None
        return x * mask

    def backward(self, dy: Any) -> Any:
        kind, saved = self._saved()
        if kind == "identity":
            check_grad("Dropout", dy, saved, dy.dtype)
            return dy
        check_grad("Dropout", dy, saved.shape, saved.dtype)
        return dy * saved
