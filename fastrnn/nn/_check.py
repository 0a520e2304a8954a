"""Input checks shared by the layers: the error policy of DESIGN.md at the layer level."""

from __future__ import annotations

from typing import Any

import numpy as np

from fastrnn.backends.validation import is_cupy_array


def check_input(layer: str, name: str, x: Any, like: Any, ndims: tuple[int, ...] = ()) -> None:
    """``x`` must be an array of the same kind (NumPy/CuPy) and dtype as the layer's parameter
    ``like``; ``ndims`` lists the accepted numbers of dimensions (empty: any)."""
    if not (isinstance(x, np.ndarray) or is_cupy_array(x)):
        raise TypeError(
            f"{layer}: {name}: expected a numpy.ndarray or cupy.ndarray, got {type(x).__name__}"
        )
    if like is not None:
        if is_cupy_array(x) != is_cupy_array(like):
            where = "CuPy" if is_cupy_array(like) else "NumPy"
            raise TypeError(
                f"{layer}: {name}: the layer's parameters are {where} arrays; move the input "
                f"or call .to({'cupy' if where == 'CuPy' else 'numpy'!r}) on the layer"
            )
        if x.dtype != like.dtype:
            raise TypeError(
                f"{layer}: {name}: dtype {x.dtype} differs from the parameters' {like.dtype} "
                "(cast the input, or the layer with .to(dtype))"
            )
    if ndims and x.ndim not in ndims:
        want = " or ".join(str(n) for n in ndims)
        raise ValueError(f"{layer}: {name}: expected {want} dimensions, got shape {x.shape}")


def check_grad(layer: str, dy: Any, shape: tuple[int, ...], dtype: Any) -> None:
    if not (isinstance(dy, np.ndarray) or is_cupy_array(dy)):
        raise TypeError(f"{layer}: dy: expected an array, got {type(dy).__name__}")
    if tuple(dy.shape) != tuple(shape):
        raise ValueError(
            f"{layer}: dy: expected shape {tuple(shape)} (the output's), got {dy.shape}"
        )
    if dy.dtype != dtype:
        raise TypeError(f"{layer}: dy: dtype {dy.dtype} differs from the output's {dtype}")


def positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return int(value)


def probability(name: str, value: Any) -> float:
    if not isinstance(value, (int, float, np.floating)) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a float, got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: must be in [0, 1], got {value}")
    return float(value)
