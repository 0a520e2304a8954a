"""The cuBLAS GEMM adapter: row-major GEMMs of the drivers as column-major cuBLAS calls.

cuBLAS is column-major and a row-major matrix is the column-major storage of its transpose, so a
row-major ``C = op(A) op(B)`` is ``C^T = op(B)^T op(A)^T``: one cuBLAS call with the operands
swapped and the same leading dimensions (:func:`column_major_args`). :class:`CupyBlas` makes the
calls on CuPy's cuBLAS handle, in host pointer mode, on CuPy's current stream; while a stream
captures a CUDA graph it calls cuBLAS directly (:class:`DirectCublas`), because CuPy's wrappers
cannot be captured (see there).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

OP_N, OP_T = 0, 1  # cublasOperation_t: CUBLAS_OP_N, CUBLAS_OP_T


def column_major_args(transa: bool, transb: bool, M: int, N: int, K: int, alpha: float,
                      pa: int, lda: int, pb: int, ldb: int, beta: float, pc: int,
                      ldc: int) -> tuple:  # fmt: skip
    """The cuBLAS ``(op_a, op_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)`` of the row-major
    ``C[M,N] = alpha op(A) op(B) + beta C`` at addresses ``pa``, ``pb``, ``pc``: B's operand
    first (see the module docstring)."""
    return (OP_T if transb else OP_N, OP_T if transa else OP_N, N, M, K, float(alpha), pb, ldb,
            pa, lda, float(beta), pc, ldc)  # fmt: skip


class CublasError(RuntimeError):
    """A cuBLAS call made through :class:`DirectCublas` returned an error status."""


class DirectCublas:
    """The few cuBLAS entry points a captured loop needs, called through ctypes on the cuBLAS
    library CuPy has loaded (so CuPy's handle is valid for them).

    CuPy's own wrappers cannot be used while a stream captures: every one of them first calls
    ``cublas.setStream(handle, current stream)``, and CuPy's ``setStream`` raises
    ``NotImplementedError('calling cuBLAS API during stream capture is currently
    unsupported')`` when that stream is capturing (CuPy 13/14). The GEMMs themselves are
    capturable (cuBLAS documents it; alpha and beta are read at capture time in host pointer
    mode). Each function takes the arguments of the C function, as Python ints, and raises
    :class:`CublasError` on an error status.
    """

    def __init__(self, lib: Any) -> None:
        V, I, LL = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong  # noqa: E741 (C names)
        gemm = (V, I, I, I, I, I, V, V, I, V, I, V, V, I)
        batched = (V, I, I, I, I, I, V, V, I, LL, V, I, LL, V, V, I, LL, I)
        f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
        self.gemm = {f32: _c_function(lib, "cublasSgemm_v2", gemm),
                     f64: _c_function(lib, "cublasDgemm_v2", gemm)}  # fmt: skip
        self.gemm_batched = {
            f32: _c_function(lib, "cublasSgemmStridedBatched", batched),
            f64: _c_function(lib, "cublasDgemmStridedBatched", batched),
        }
        self.set_stream = _c_function(lib, "cublasSetStream_v2", (V, V))
        try:
            self.set_workspace = _c_function(lib, "cublasSetWorkspace_v2", (V, V, ctypes.c_size_t))
        except AttributeError:  # cuBLAS before 11: no user workspace (nor CUDA 13 support)
            self.set_workspace = None


def _c_function(lib: Any, name: str, argtypes: tuple) -> Any:
    f = getattr(lib, name)
    f.argtypes = list(argtypes)
    f.restype = ctypes.c_int

    def call(*args: int) -> None:
        status = f(*args)
        if status != 0:
            raise CublasError(f"{name} returned cuBLAS status {status}")

    call.__name__ = name
    return call


def load_cublas() -> Any:
    """The cuBLAS shared library this process has loaded (CuPy's), as a ctypes library."""
    candidates = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                i = line.find("/")
                path = line[i:].strip() if i >= 0 else ""
                if re.fullmatch(r"libcublas\.so(\.\d+)*", os.path.basename(path)):
                    candidates.append(path)
    except OSError:  # not Linux: by name below
        pass
    candidates = list(dict.fromkeys(candidates))
    candidates += ["libcublas.so.13", "libcublas.so.12", "libcublas.so"]
    for name in ("cublas64_13", "cublas64_12", "cublas"):
        found = ctypes.util.find_library(name)
        if found:
            candidates.append(found)
    errors = []
    for path in candidates:
        try:
            return ctypes.CDLL(path)
        except OSError as e:
            errors.append(f"{path}: {e}")
    raise RuntimeError("the cuBLAS library CuPy uses was not found: " + "; ".join(errors))


class CupyBlas:
    """Column-major GEMMs on CuPy's cuBLAS handle (raw device addresses).

    ``cupy`` and ``cublas`` are CuPy's ``cupy`` module and ``cupy_backends.cuda.libs.cublas``
    (the host tests pass emulations of both); ``direct`` a :class:`DirectCublas`, or None to
    load it at the first capture. ``capturing`` is set by the graph capture
    (:mod:`fastrnn._cuda._graphs`): GEMMs then go through ``direct``, with the pointer mode and
    stream it has set on the handle.
    """

    def __init__(self, cupy: Any, cublas: Any, direct: Any = None) -> None:
        self._cupy = cupy
        self.cublas = cublas
        f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
        self.gemm_fn = {f32: cublas.sgemm, f64: cublas.dgemm}
        self.batched_fn = {f32: cublas.sgemmStridedBatched, f64: cublas.dgemmStridedBatched}
        # alpha and beta are read from host memory (CUBLAS_POINTER_MODE_HOST); kept alive here.
        self._scalars = {
            (np.dtype(dt), v): np.array(v, dtype=dt) for dt in (f32, f64) for v in (0.0, 1.0)
        }
        self.direct_lib = direct  # DirectCublas, loaded at the first capture
        self.direct_error: str | None = None
        self.capture_fns: dict[Any, Any] = {}
        self.capturing = False

    def handle(self) -> int:
        return self._cupy.cuda.device.get_cublas_handle()

    def scalar(self, dtype: np.dtype, value: float) -> int:
        """The host address of alpha or beta (0 or 1) of ``dtype``."""
        return self._scalars[(np.dtype(dtype), float(value))].ctypes.data

    def gemm(self, dtype, op_a, op_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) -> None:
        """Column-major ``?gemm`` on raw addresses."""
        args = (self.handle(), op_a, op_b, m, n, k, self.scalar(dtype, alpha), a, lda, b, ldb,
                self.scalar(dtype, beta), c, ldc)  # fmt: skip
        if self.capturing:  # pointer mode and stream were set by the capture
            self.direct_lib.gemm[dtype](*args)
            return
        with self.session():
            self.gemm_fn[dtype](*args)

    def gemm_batched(self, dtype, op_a, op_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, sa,
                     sb, sc, batch) -> None:  # fmt: skip
        """Column-major ``?gemmStridedBatched`` on raw addresses (strides in elements)."""
        args = (self.handle(), op_a, op_b, m, n, k, self.scalar(dtype, alpha), a, lda, sa, b,
                ldb, sb, self.scalar(dtype, beta), c, ldc, sc, batch)  # fmt: skip
        if self.capturing:
            self.direct_lib.gemm_batched[dtype](*args)
            return
        with self.session():
            self.batched_fn[dtype](*args)

    def prepared(self, dtype: np.dtype, batch: int) -> Any:
        """The function a prepared call of a time loop invokes with the full cuBLAS argument
        list (inside :meth:`session`): CuPy's wrapper of ?gemm or ?gemmStridedBatched."""
        return (self.gemm_fn if batch == 1 else self.batched_fn)[np.dtype(dtype)]

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Host pointer mode and the current stream on CuPy's cuBLAS handle, both restored
        afterwards."""
        cublas = self.cublas
        handle = self.handle()
        mode = cublas.getPointerMode(handle)
        stream = cublas.getStream(handle)
        cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
        try:
            cublas.setStream(handle, self._cupy.cuda.get_current_stream().ptr)
            yield
        finally:
            cublas.setPointerMode(handle, mode)
            cublas.setStream(handle, stream)

    def direct(self) -> DirectCublas:
        """The :class:`DirectCublas` entry points, loaded once (the error, once it failed), and
        :attr:`capture_fns`: CuPy's wrappers -> the direct call with the same arguments."""
        if self.direct_lib is None:
            if self.direct_error is not None:
                raise RuntimeError(self.direct_error)
            try:
                self.direct_lib = DirectCublas(load_cublas())
            except Exception as e:
                self.direct_error = f"{type(e).__name__}: {e}"
                raise
        if not self.capture_fns:
            d, c = self.direct_lib, self.cublas
            f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
            self.capture_fns = {
                c.sgemm: d.gemm[f32],
                c.dgemm: d.gemm[f64],
                c.sgemmStridedBatched: d.gemm_batched[f32],
                c.dgemmStridedBatched: d.gemm_batched[f64],
            }
        return self.direct_lib
