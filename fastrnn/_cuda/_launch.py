"""Kernel launches: the grid, the arguments of a launch checked against the kernel table, and
CuPy's kernel call on prepared arguments.

Every kernel loops grid-stride over its elements (csrc/common.cuh), so a launch over ``n``
elements uses ``min(ceil(n / block), max_blocks)`` blocks of ``block`` threads.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastrnn._cuda import _kernels

# Threads per block of the pointwise kernels, and the largest grid they are launched with: the
# kernels loop grid-stride, so a capped grid is correct for any size (32 blocks of 256 threads
# per SM fill an H100's 132 SMs; larger grids only add block scheduling).
BLOCK = 256
MAX_BLOCKS = 4096

_SCALAR = {"index_t": np.int64, "int": np.int32}


def grid_size(n: int, block: int, max_blocks: int) -> int:
    """Blocks of a launch over ``n`` > 0 elements."""
    return min((n + block - 1) // block, max_blocks)


def convert_args(spec: _kernels.Kernel, dtype: np.dtype, args: tuple) -> tuple:
    """Check one launch's arguments against the kernel table and give every scalar the exact C
    type of its parameter (a bare Python int would travel as 8 bytes whatever the parameter)."""
    kinds = spec.kinds
    if len(args) != len(kinds):
        raise TypeError(f"{spec.key}: expected {len(kinds)} arguments, got {len(args)}")
    out = []
    for kind, param, a in zip(kinds, spec.params, args, strict=True):
        if kind == "T*":
            if a.dtype != dtype:
                raise TypeError(f"{spec.key}: {param} must be {dtype}, got {a.dtype}")
            out.append(a)
        elif kind == "index_t*":
            if a.dtype != np.int64:
                raise TypeError(f"{spec.key}: {param} must be int64, got {a.dtype}")
            out.append(a)
        elif kind == "T":
            out.append(dtype.type(a))
        else:
            out.append(_SCALAR[kind](a))
    return tuple(out)


def varying_positions(spec: _kernels.Kernel, varying: tuple[str, ...]) -> list[int]:
    """Where the parameters named in ``varying`` (index_t scalars set per step) are."""
    where = [spec.param_names.index(v) for v in varying]
    for i in where:
        if spec.kinds[i] != "index_t":
            raise TypeError(f"{spec.key}: varying parameter {spec.params[i]} is not index_t")
    return where


class CupyLauncher:
    """NVRTC kernels called through CuPy, on CuPy's current stream.

    A prepared launch (:meth:`prepare`, the steps of a time loop) passes CuPy's ``CPointer``
    objects -- a device address (``CIntptr``) or a scalar of its exact C type in a 0-d array
    (``CNumpyArray``), what CuPy's kernel call would build from each argument -- so a launch
    costs one call and no conversion. Whether this CuPy takes them is checked once, by a launch
    that touches nothing (:meth:`_probe`); if not, prepared launches pass arrays and NumPy
    scalars.
    """

    def __init__(self, cupy: Any, function: Any, get_function: Any = None) -> None:
        self._cupy = cupy
        self._CIntptr = function.CIntptr
        self._CNumpyArray = function.CNumpyArray
        self._get_function = get_function or _kernels.get_function
        self._functions: dict[tuple[str, str, int], Any] = {}
        # None: not checked yet; True / False: this CuPy takes / refuses CPointer arguments.
        self.packed_args: bool | None = None
        self._packed_cache: dict[tuple, Any] = {}
        self.log: Any = None  # set by the runtime: log(message) once per message

    def function(self, key: str, ctype: str) -> Any:
        """The compiled kernel ``key`` for ``ctype`` on the current device."""
        device_id = self._cupy.cuda.runtime.getDevice()
        fn_key = (key, ctype, device_id)
        fn = self._functions.get(fn_key)
        if fn is None:
            fn = self._functions[fn_key] = self._get_function(key, ctype, device_id)
        return fn

    def launch(self, spec: _kernels.Kernel, ctype: str, grid: int, block: int,
               args: tuple) -> None:  # fmt: skip
        self.function(spec.key, ctype)((grid,), (block,), args)

    def prepare(self, spec: _kernels.Kernel, dtype: np.dtype, grid: int, block: int,
                converted: tuple, where: list[int], ptr: Any) -> Any:  # fmt: skip
        """``bind(*values) -> (fn, args)``: the launch with the ``where`` parameters set to
        ``values``. ``converted``: the arguments after :func:`convert_args`; ``ptr``: a device
        array's address. Arguments are packed at the first bind (never, when the loop's calls
        are kept from an earlier run)."""
        fn = self.function(spec.key, _kernels.CTYPES[dtype])
        prepared: list[Any] = []

        def prepare() -> tuple[list, Any]:
            if self.packed_args is None:
                self.packed_args = self._probe(fn, spec, dtype)
            if self.packed_args:
                kinds = spec.kinds
                packed = [self._pack(k, a, ptr) for k, a in zip(kinds, converted, strict=True)]
                return packed, self._pack_index
            return list(converted), np.int64

        def bind(*values: int) -> tuple[Any, tuple]:
            if not prepared:
                prepared.extend(prepare())
            fixed, pack_index = prepared
            current = fixed.copy()
            for i, v in zip(where, values, strict=True):
                current[i] = pack_index(v)
            return fn, ((grid,), (block,), tuple(current))

        return bind

    def _pack(self, kind: str, a: Any, ptr: Any) -> Any:
        """One launch argument as the CuPy ``CPointer`` its launch would build."""
        if kind.endswith("*"):
            return self._CIntptr(ptr(a))
        return self._CNumpyArray(np.array(a))

    def _pack_index(self, v: int) -> Any:
        """A packed ``index_t`` scalar, shared by every launch that passes the same value (a
        ``CNumpyArray`` is never written to)."""
        key = ("index_t", v)
        p = self._packed_cache.get(key)
        if p is None:
            if len(self._packed_cache) > 1 << 16:
                self._packed_cache.clear()
            p = self._packed_cache[key] = self._CNumpyArray(np.array(v, dtype=np.int64))
        return p

    def _probe(self, fn: Any, spec: _kernels.Kernel, dtype: np.dtype) -> bool:
        """Whether this CuPy's kernel call takes ``CPointer`` arguments as they are: one launch
        of ``spec`` with null pointers and zero scalars, which touches nothing (every kernel of
        the table loops over a product of its size parameters: zero elements). A TypeError is
        raised by CuPy's argument conversion, before anything is launched."""
        zero = {"index_t": np.int64, "int": np.int32, "T": dtype}
        args = tuple(
            self._CIntptr(0) if k.endswith("*") else self._CNumpyArray(np.zeros((), zero[k]))
            for k in spec.kinds
        )
        try:
            fn((1,), (1,), args)
        except TypeError as e:
            if self.log is not None:
                self.log(f"kernel arguments passed as arrays and NumPy scalars: {e}")
            return False
        return True
