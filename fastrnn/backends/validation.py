"""Input validation shared by every op: one place for the error policy of DESIGN.md.

Bad input raises ``TypeError`` (wrong type or dtype, NumPy mixed with CuPy) or ``ValueError``
(wrong ndim or shape, disagreeing sizes, out-of-range values, CuPy arrays on different devices),
always naming the argument, always before any kernel runs.

Non-contiguous and Fortran-ordered arrays are accepted and copied to C order (documented in the
README); the kernels only ever see C-contiguous arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def is_cupy_array(a: Any) -> bool:
    """True for a ``cupy.ndarray`` (checked without importing CuPy)."""
    return type(a).__module__.split(".")[0] == "cupy" and hasattr(a, "__cuda_array_interface__")


def check_arrays(named: dict[str, Any], allow_none: tuple[str, ...] = ()) -> tuple[bool, np.dtype]:
    """Check that every named argument is a NumPy or CuPy float array, all of one kind and dtype.

    Returns (is_cupy, dtype). ``allow_none`` names arguments that may be None (then skipped).
    """
    kinds: dict[str, bool] = {}
    dtype = None
    first = None
    device = None
    for name, a in named.items():
        if a is None:
            if name in allow_none:
                continue
            raise TypeError(f"{name}: expected an array, got None")
        cupy = is_cupy_array(a)
        if not cupy and not isinstance(a, np.ndarray):
            raise TypeError(
                f"{name}: expected a numpy.ndarray or cupy.ndarray, got {type(a).__name__}"
            )
        kinds[name] = cupy
        if a.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected dtype float32 or float64, got {a.dtype}")
        if dtype is None:
            dtype, first = a.dtype, name
        elif a.dtype != dtype:
            raise TypeError(
                f"{name}: dtype {a.dtype} differs from {first}'s {dtype}; "
                "all arrays of one call must share a dtype"
            )
        if cupy:
            dev = a.device.id
            if device is None:
                device = (dev, name)
            elif dev != device[0]:
                raise ValueError(
                    f"{name}: on CUDA device {dev} but {device[1]} is on device {device[0]}"
                )
    if len(set(kinds.values())) > 1:
        np_names = [k for k, v in kinds.items() if not v]
        cp_names = [k for k, v in kinds.items() if v]
        raise TypeError(
            f"cannot mix NumPy arrays ({', '.join(np_names)}) with CuPy arrays "
            f"({', '.join(cp_names)}) in one call"
        )
    return bool(kinds and next(iter(kinds.values()))), dtype


def check_shape(name: str, a: Any, expected: tuple[Any, ...]) -> None:
    """``expected`` holds ints (required sizes) or None (any size); ndim must match."""
    if a.ndim != len(expected):
        raise ValueError(
            f"{name}: expected {len(expected)} dimensions {_fmt(expected)}, got shape {a.shape}"
        )
    for got, want in zip(a.shape, expected):
        if want is not None and got != want:
            raise ValueError(f"{name}: expected shape {_fmt(expected)}, got {a.shape}")


def check_ndim(name: str, a: Any, ndim: int, meaning: str) -> None:
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions {meaning}, got shape {a.shape}")


def _fmt(shape: tuple[Any, ...]) -> str:
    return "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"


def contiguous(a: Any) -> Any:
    """C-contiguous version of ``a`` (the array itself when it already is)."""
    if a is None or a.flags.c_contiguous:
        return a
    if is_cupy_array(a):
        import cupy

        return cupy.ascontiguousarray(a)
    return np.ascontiguousarray(a)


def check_lengths(lengths: Any, T: int, N: int) -> np.ndarray | None:
    """``lengths``: None, or integers of shape (N,) each in 1..T -> host int64 array."""
    if lengths is None:
        return None
    if is_cupy_array(lengths):
        lengths = lengths.get()
    if isinstance(lengths, (list, tuple)):
        lengths = np.asarray(lengths)
    if not isinstance(lengths, np.ndarray):
        raise TypeError(
            f"lengths: expected None or an integer array of shape ({N},), "
            f"got {type(lengths).__name__}"
        )
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"lengths: expected an integer dtype, got {lengths.dtype}")
    if lengths.shape != (N,):
        raise ValueError(f"lengths: expected shape ({N},) (one length per sequence), got {lengths.shape}")
    if N and (lengths.min() < 1 or lengths.max() > T):
        raise ValueError(
            f"lengths: every length must be in 1..T={T}, got min {lengths.min()} max {lengths.max()}"
        )
    return np.ascontiguousarray(lengths, dtype=np.int64)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return bool(value)


def pair(name: str, value: Any, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= ``minimum`` -> (h, w)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        values = (int(value), int(value))
    elif (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
            for v in value
        )
    ):
        values = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if min(values) < minimum:
        raise ValueError(f"{name}: every value must be >= {minimum}, got {value!r}")
    return values


def check_context(ctx: Any, op: str) -> None:
    from fastrnn.backends.base import Context

    if not isinstance(ctx, Context):
        raise TypeError(f"ctx: expected the context returned by {op}_forward, got {type(ctx).__name__}")
    if ctx.op != op:
        raise ValueError(f"ctx: this context comes from {ctx.op}_forward, not {op}_forward")
