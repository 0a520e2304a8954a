"""Parameter initialisation with torch.nn's distributions, from one seedable generator.

``fastrnn.nn.manual_seed(seed)`` makes every layer created afterwards reproducible. Parameters
are created as NumPy arrays; move a model with ``model.to("cupy")``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

_rng = np.random.default_rng()


def manual_seed(seed: int) -> None:
    """Reseed the generator every layer's initialisation draws from."""
    global _rng
    _rng = np.random.default_rng(seed)


def uniform(shape: tuple[int, ...], bound: float, dtype: Any) -> np.ndarray:
    """U(-bound, bound)."""
    return _rng.uniform(-bound, bound, size=shape).astype(dtype)


def normal(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """N(0, 1)."""
    return _rng.standard_normal(size=shape).astype(dtype)


def fan_in_bound(fan_in: int) -> float:
    """1/sqrt(fan_in): torch's bound for kaiming_uniform_(a=sqrt(5)) weights and for biases of
    Linear and Conv2d; 0 when fan_in is 0."""
    return 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
