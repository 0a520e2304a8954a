"""Input validation shared by every op: one place for the error policy of DESIGN.md.

Bad input raises ``TypeError`` (wrong type or dtype, NumPy mixed with CuPy) or ``ValueError``
(wrong ndim or shape, disagreeing sizes, out-of-range values, CuPy arrays on different devices),
always naming the argument, always before any kernel runs.

Non-contiguous and Fortran-ordered arrays are accepted and copied to C order (documented in the
README); the kernels only ever see C-contiguous, aligned arrays.

Integer arguments (kernel_size, stride, padding, dilation, groups, the entries of lengths) are
Python or NumPy integers alike, never bool. The large arrays a call would allocate (outputs,
padded inputs, the reference's intermediates) are sized before anything is allocated: one
larger than the machine's (or CUDA device's) memory, or whose dimensions multiply past 64 bits,
is a ValueError naming the argument responsible, not a MemoryError or OverflowError.
"""

from __future__ import annotations

import operator
import os
from typing import Any

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# Geometry arithmetic in the kernels (padded extents, window ends, output index * stride) is done
# in 64-bit integers; every padded extent H + 2 * padding is kept at or below this, so none of it
# can overflow.
MAX_EXTENT = 1 << 62
# The user address space of x86-64 and AArch64 with 4-level page tables (47 bits): no array a
# call would allocate may be larger, and this is the bound when the machine's memory size
# cannot be read.
MAX_ADDRESSABLE_BYTES = 1 << 47


def is_cupy_array(a: Any) -> bool:
    """True for a ``cupy.ndarray`` (checked without importing CuPy)."""
    return type(a).__module__.split(".")[0] == "cupy" and hasattr(a, "__cuda_array_interface__")


def array_module(a: Any) -> Any:
    """``numpy`` or ``cupy``: the module that owns array ``a``."""
    if is_cupy_array(a):
        import cupy

        return cupy
    return np


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
    for got, want in zip(a.shape, expected, strict=True):
        if want is not None and got != want:
            raise ValueError(f"{name}: expected shape {_fmt(expected)}, got {a.shape}")


def check_ndim(name: str, a: Any, ndim: int, meaning: str) -> None:
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions {meaning}, got shape {a.shape}")


def _fmt(shape: tuple[Any, ...]) -> str:
    return "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"


def contiguous(a: Any) -> Any:
    """C-contiguous, aligned version of ``a`` (the array itself when it already is)."""
    if a is None or (a.flags.c_contiguous and a.flags.aligned):
        return a
    if is_cupy_array(a):
        import cupy

        return cupy.ascontiguousarray(a)
    return np.ascontiguousarray(a)


def check_lengths(lengths: Any, T: int, N: int) -> np.ndarray | None:
    """``lengths``: None, or integers of shape (N,) each in 1..T -> host int64 array.

    A list or tuple must hold Python or NumPy integers (bool is not an integer here)."""
    if lengths is None:
        return None
    if is_cupy_array(lengths):
        lengths = lengths.get()
    if isinstance(lengths, (list, tuple)):
        for i, v in enumerate(lengths):
            if not _is_integer(v):
                raise TypeError(f"lengths: element {i} is {v!r}, expected an int")
        values = [operator.index(v) for v in lengths]
        if len(values) != N:
            raise ValueError(
                f"lengths: expected shape ({N},) (one length per sequence), got ({len(values)},)"
            )
        if N and (min(values) < 1 or max(values) > T):
            raise ValueError(
                f"lengths: every length must be in 1..T={T}, "
                f"got min {min(values)} max {max(values)}"
            )
        lengths = np.array(values, dtype=np.int64)
    if not isinstance(lengths, np.ndarray):
        raise TypeError(
            f"lengths: expected None or an integer array of shape ({N},), "
            f"got {type(lengths).__name__}"
        )
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"lengths: expected an integer dtype, got {lengths.dtype}")
    if lengths.shape != (N,):
        raise ValueError(
            f"lengths: expected shape ({N},) (one length per sequence), got {lengths.shape}"
        )
    if N and (lengths.min() < 1 or lengths.max() > T):
        raise ValueError(
            f"lengths: every length must be in 1..T={T}, "
            f"got min {lengths.min()} max {lengths.max()}"
        )
    return np.ascontiguousarray(lengths, dtype=np.int64)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return bool(value)


def _is_integer(value: Any) -> bool:
    """A Python or NumPy integer (anything with ``__index__``), never a bool."""
    if isinstance(value, (bool, np.bool_)):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def integer(name: str, value: Any, minimum: int) -> int:
    """A Python or NumPy integer >= ``minimum`` (bool refused) -> int."""
    if not _is_integer(value):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    value = operator.index(value)
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return value


def pair(name: str, value: Any, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints (Python or NumPy integers, not bool), each >= ``minimum``
    -> (h, w)."""
    if _is_integer(value):
        values = (operator.index(value), operator.index(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(map(_is_integer, value)):
        values = (operator.index(value[0]), operator.index(value[1]))
    else:
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if min(values) < minimum:
        raise ValueError(f"{name}: every value must be >= {minimum}, got {value!r}")
    return values


def check_image(name: str, a: Any) -> None:
    """An NCHW image batch: 4 dimensions, planes of at least one element (N and C may be 0)."""
    check_ndim(name, a, 4, "(N, C, H, W)")
    if a.shape[2] < 1 or a.shape[3] < 1:
        raise ValueError(
            f"{name}: expected image planes of at least 1x1 (only N and C may be 0), "
            f"got shape {a.shape}"
        )


def check_extent(name: str, size: int, padding: int, axis: str) -> int:
    """The padded extent ``size + 2 * padding``, refused above MAX_EXTENT."""
    extent = size + 2 * padding
    if extent > MAX_EXTENT:
        raise ValueError(
            f"{name}: the padded {axis} {size} + 2 * {padding} = {extent} is more than "
            f"2^62, the largest extent the kernels index"
        )
    return extent


def max_array_bytes(like: Any) -> int:
    """The largest array a call may allocate next to ``like``: the memory of the machine (or
    CUDA device) that would hold it, and never more than MAX_ADDRESSABLE_BYTES. A larger size
    is the caller's mistake (a ValueError naming the argument), not an out-of-memory condition."""
    limit = MAX_ADDRESSABLE_BYTES
    if is_cupy_array(like):
        try:
            limit = min(limit, int(like.device.mem_info[1]))
        except Exception:  # no device query available: the address-space bound alone
            pass
        return limit
    global _host_bytes
    if _host_bytes is None:  # two system calls: asked once per process (every call checks)
        try:
            _host_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            _host_bytes = limit
    return min(limit, _host_bytes)


_host_bytes: int | None = None


def check_size(name: str, what: str, shape: tuple[int, ...], like: Any) -> None:
    """Refuse an array of ``shape`` (``like``'s dtype) that no machine of this kind could hold,
    or whose dimensions multiply past 64 bits (NumPy refuses that even when one of them is 0);
    ``name`` is the argument responsible, ``what`` says which array it is."""
    count, span = 1, 1
    for s in shape:
        count *= s
        span *= max(s, 1)
    itemsize = like.dtype.itemsize
    if span * itemsize > 2**63 - 1:
        raise ValueError(
            f"{name}: {what} {tuple(shape)} has dimensions whose product overflows 64 bits"
        )
    limit = max_array_bytes(like)
    if count * itemsize > limit:
        raise ValueError(
            f"{name}: {what} {tuple(shape)} would take {_bytes(count * itemsize)}, more than the "
            f"{_bytes(limit)} of memory an array can have here"
        )


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n < 1024 or unit == "EiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def check_context(ctx: Any, op: str) -> None:
    from fastrnn.backends.base import Context

    if not isinstance(ctx, Context):
        raise TypeError(
            f"ctx: expected the context returned by {op}_forward, got {type(ctx).__name__}"
        )
    if ctx.op != op:
        raise ValueError(f"ctx: this context comes from {ctx.op}_forward, not {op}_forward")
