"""Run fastrnn's CUDA drivers and kernels on the host, without a GPU.

* The unchanged ``.cu`` files (with ``common.cuh`` prepended, exactly the text NVRTC gets) are
  compiled as C++ by the host compiler after a small shim that defines ``__global__``,
  ``__device__``, ``blockIdx``/``threadIdx``/``blockDim``/``gridDim`` and "launches" a kernel
  by running every (block, thread) of the grid in turn. For every kernel-table instantiation an
  ``extern "C"`` wrapper is generated, and a ``static_assert`` checks that the table's parameter
  list is exactly the kernel's signature (the launch ABI on the GPU depends on it).
* :class:`HostRuntime` implements :class:`fastrnn._cuda._runtime.Runtime` with NumPy arrays: a
  column-major GEMM on raw addresses that enforces cuBLAS's argument rules, the compiled
  kernels, and arrays allocated inside guard margins (checked after every launch and GEMM) whose
  uninitialised contents are NaN, so an out-of-bounds write, or a read of memory nobody wrote,
  shows up as a failure.

The drivers of fastrnn/_cuda then run unchanged: ``with use_runtime(HostRuntime(...)): ...``.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import re
import shutil
import subprocess
import types
from pathlib import Path
from typing import Any

import numpy as np

from fastrnn._cuda import _kernels
from fastrnn._cuda._cublas import OP_N
from fastrnn._cuda._runtime import CupyRuntime, Runtime

SHIM = r"""
// Host shim: just enough of CUDA for fastrnn's kernels to compile and run as C++.
#include <cmath>
#include <type_traits>
struct fr_dim3 { unsigned x, y, z; };
static fr_dim3 blockIdx = {0, 0, 0}, threadIdx = {0, 0, 0};
static fr_dim3 blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
template <class F>
static void fr_launch(unsigned grid, unsigned block, F&& body) {
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b) {
        for (unsigned t = 0; t < block; ++t) {
            blockIdx.x = b;
            threadIdx.x = t;
            body();
        }
    }
}
"""

_C = {"float": ctypes.c_float, "double": ctypes.c_double}


def _cxx() -> str:
    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("no C++ compiler (g++, c++ or clang++) on PATH")


def _param_type(param: str, ctype: str) -> str:
    """'const T* __restrict__ b' -> 'const float*' (the parameter's type, T substituted)."""
    type_part = param.replace("__restrict__", " ").strip().rsplit(" ", 1)[0]
    return re.sub(r"\bT\b", ctype, " ".join(type_part.split()))


# The device math of common.cuh, callable from the tests: fr_host_<function>_<type>(a).
DEVICE_MATH = ("fr_sigmoid", "fr_tanh", "fr_relu")


def wrapper_source() -> str:
    """The C++ translation unit: shim, every .cu file as NVRTC sees it, generated wrappers."""
    parts = [SHIM]
    for source in _kernels.source_files():
        parts.append(_kernels.program_source(source))
    parts.append('\n#line 1 "generated-wrappers"\n')
    for k in _kernels.KERNELS:
        for ctype in k.dtypes:
            types = [_param_type(p, ctype) for p in k.params]
            sig = ", ".join(types)
            expr = k.expression(ctype)
            parts.append(
                f"static_assert(std::is_same<decltype(&{expr}), void (*)({sig})>::value,"
                f' "kernel table: the parameters listed for {k.key} are not its signature");\n'
            )
            formals = ", ".join(f"{t} a{i}" for i, t in enumerate(types))
            actuals = ", ".join(f"a{i}" for i in range(len(types)))
            parts.append(
                f'extern "C" void fr_host_{k.symbol}_{ctype}(unsigned grid, unsigned block, '
                f"{formals}) {{\n"
                f"    fr_launch(grid, block, [&] {{ {expr}({actuals}); }});\n}}\n"
            )
    for struct in _kernels.CELLS.values():  # a cell's constants, for the table's consistency
        for const in ("gates", "acts"):
            parts.append(
                f'extern "C" int fr_host_{struct}_{const}() {{ return {struct}::{const}; }}\n'
            )
    for fn in DEVICE_MATH:
        for ctype in ("float", "double"):
            parts.append(
                f'extern "C" {ctype} fr_host_{fn}_{ctype}({ctype} a) {{ return {fn}(a); }}\n'
            )
    return "".join(parts)


def cell_constant(lib: ctypes.CDLL, struct: str, const: str) -> int:
    """``struct::const`` ("gates" or "acts") of a cell of csrc/."""
    f = getattr(lib, f"fr_host_{struct}_{const}")
    f.restype = ctypes.c_int
    return int(f())


def device_math(lib: ctypes.CDLL, fn: str, ctype: str) -> Any:
    """common.cuh's ``fn`` (one of DEVICE_MATH) for ``ctype`` as a Python function."""
    f = getattr(lib, f"fr_host_{fn}_{ctype}")
    f.argtypes = [_C[ctype]]
    f.restype = _C[ctype]
    return f


def build_library(directory: Path) -> ctypes.CDLL:
    """Compile :func:`wrapper_source` into a shared library in ``directory`` and load it."""
    src = wrapper_source()
    digest = hashlib.sha256(src.encode()).hexdigest()[:16]
    cpp = directory / f"fastrnn_host_{digest}.cpp"
    lib = directory / f"fastrnn_host_{digest}.so"
    cpp.write_text(src)
    cmd = [
        _cxx(),
        "-std=c++17",
        "-O2",
        "-Wall",
        "-Werror",
        "-Wno-unused-function",
        "-shared",
        "-fPIC",
        "-o",
        str(lib),
        str(cpp),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"host build of the CUDA sources failed:\n{proc.stderr}")
    return ctypes.CDLL(str(lib))


# ------------------------------------------------------------------------------------------------
# guarded NumPy arrays
# ------------------------------------------------------------------------------------------------

GUARD = 64  # elements of margin on each side of every allocation
_CANARY = {
    np.dtype(np.float32): np.float32(-7.25e33),
    np.dtype(np.float64): -7.25e303,
    np.dtype(np.int64): np.int64(-0x5A5A5A5A5A5A5A5A),
}


class GuardedNumpy:
    """``numpy`` whose allocating functions (``empty``, ``zeros``, ``ones``, ``full``,
    ``asarray`` of host data) place the array inside margins holding a canary; ``empty``
    fills the array itself with NaN (floats) or the canary (ints), so reading memory nobody
    wrote poisons the result."""

    def __init__(self) -> None:
        self._blocks: list[np.ndarray] = []
        self._arena: list[np.ndarray] | None = None
        self._cursor = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)

    def reuse_addresses(self) -> None:
        """From now on, the i-th allocation after each call of this method gets the same block
        as the i-th one after the previous call (when size and dtype agree), like CuPy's pool
        handing back the blocks of the previous iteration: the arrays of that iteration must
        be dead. The block is re-poisoned (NaN) first."""
        if self._arena is None:
            self._arena = []
        self._cursor = 0

    def _alloc(self, shape: Any, dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        n = math.prod(shape)
        arena, i = self._arena, self._cursor
        if arena is not None and i < len(arena) and arena[i].dtype == dtype:
            outer = arena[i]
            if outer.size == n + 2 * GUARD:
                self._cursor += 1
                inner = outer[GUARD : GUARD + n]
                if dtype.kind == "f":
                    inner[:] = np.nan
                return inner.reshape(shape)
        outer = np.empty(n + 2 * GUARD, dtype=dtype)
        outer[:] = _CANARY[dtype]
        inner = outer[GUARD : GUARD + n]
        if dtype.kind == "f":
            inner[:] = np.nan
        self._blocks.append(outer)
        if arena is not None:
            del arena[i:]
            arena.append(outer)
            self._cursor = len(arena)
        return inner.reshape(shape)

    def empty(self, shape: Any, dtype: Any = np.float64) -> np.ndarray:
        return self._alloc(shape, dtype)

    def zeros(self, shape: Any, dtype: Any = np.float64) -> np.ndarray:
        a = self._alloc(shape, dtype)
        a[...] = 0
        return a

    def ones(self, shape: Any, dtype: Any = np.float64) -> np.ndarray:
        a = self._alloc(shape, dtype)
        a[...] = 1
        return a

    def full(self, shape: Any, value: Any, dtype: Any = None) -> np.ndarray:
        a = self._alloc(shape, dtype if dtype is not None else np.asarray(value).dtype)
        a[...] = value
        return a

    def device_copy(self, host: np.ndarray) -> np.ndarray:
        a = self._alloc(host.shape, host.dtype)
        a[...] = host
        return a

    def check_guards(self) -> None:
        for outer in self._blocks:
            c = _CANARY[outer.dtype]
            if not (np.all(outer[:GUARD] == c) and np.all(outer[-GUARD:] == c)):
                raise AssertionError("a kernel or GEMM wrote outside its array")


# ------------------------------------------------------------------------------------------------
# the runtime
# ------------------------------------------------------------------------------------------------


class HostRuntime(Runtime):
    """The drivers' device operations on the host (see the module docstring).

    ``block`` and ``max_blocks`` default to a tiny grid (3 blocks of 32 threads), so any launch
    over more than 96 elements runs the grid-stride loops more than once per thread."""

    name = "host"
    check_bounds = True

    def __init__(self, lib: ctypes.CDLL, block: int = 32, max_blocks: int = 3) -> None:
        self.xp = GuardedNumpy()
        self.lib = lib
        self.block = block
        self.max_blocks = max_blocks
        self.launches: list[tuple[str, int, int]] = []
        self.batched_calls = 0  # (kernel, grid, block) of every launch
        self._fns: dict[str, Any] = {}

    def to_device(self, host: np.ndarray) -> np.ndarray:
        return self.xp.device_copy(host)

    def ptr(self, a: Any) -> int:
        return a.ctypes.data

    def _blas_gemm(self, dtype, op_a, op_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        # cuBLAS's argument rules (cublas<t>gemm: CUBLAS_STATUS_INVALID_VALUE otherwise).
        rows_a = m if op_a == OP_N else k
        rows_b = k if op_b == OP_N else n
        if min(m, n, k) < 0 or lda < max(1, rows_a) or ldb < max(1, rows_b) or ldc < max(1, m):
            raise ValueError(
                f"cuBLAS would reject gemm(m={m}, n={n}, k={k}, lda={lda}, ldb={ldb}, "
                f"ldc={ldc}, op_a={op_a}, op_b={op_b})"
            )
        A = _colmajor(dtype, a, rows_a, k if op_a == OP_N else m, lda)
        B = _colmajor(dtype, b, rows_b, n if op_b == OP_N else k, ldb)
        C = _colmajor(dtype, c, m, n, ldc)
        opA = A if op_a == OP_N else A.T
        opB = B if op_b == OP_N else B.T
        prod = alpha * (opA @ opB)
        C[...] = prod if beta == 0.0 else prod + beta * C  # beta = 0: C is not read
        self.xp.check_guards()

    def _blas_gemm_batched(
        self, dtype, op_a, op_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, sa, sb, sc, batch
    ):
        # cuBLAS's strided batched GEMM: the same product on matrices stride elements apart.
        if batch < 0:
            raise ValueError("cuBLAS would reject a negative batchCount")
        item = np.dtype(dtype).itemsize
        for q in range(batch):
            self._blas_gemm(
                dtype,
                op_a,
                op_b,
                m,
                n,
                k,
                alpha,
                a + q * sa * item,
                lda,
                b + q * sb * item,
                ldb,
                beta,
                c + q * sc * item,
                ldc,
            )
        self.batched_calls += 1

    def _launch(self, spec, ctype, grid, block, args):
        cargs = [a.ctypes.data if isinstance(a, np.ndarray) else a.item() for a in args]
        self._launch_raw(spec, ctype, grid, block, cargs)

    def _launch_fn(self, spec, ctype):
        fname = f"fr_host_{spec.symbol}_{ctype}"
        fn = self._fns.get(fname)
        if fn is None:
            fn = getattr(self.lib, fname)
            argtypes = [ctypes.c_uint, ctypes.c_uint]
            for kind in spec.kinds:
                argtypes.append(
                    ctypes.c_void_p
                    if kind.endswith("*")
                    else ctypes.c_longlong
                    if kind == "index_t"
                    else ctypes.c_int
                    if kind == "int"
                    else _C[ctype]
                )
            fn.argtypes = argtypes
            fn.restype = None
            self._fns[fname] = fn
        return fn

    def _launch_raw(self, spec, ctype, grid, block, cargs):
        """Launch with C values: addresses for the pointers, Python numbers for scalars."""
        fn = self._launch_fn(spec, ctype)
        self.launches.append((spec.key, grid, block))
        fn(grid, block, *cargs)
        self.xp.check_guards()


def _colmajor(dtype: np.dtype, addr: int, rows: int, cols: int, ld: int) -> np.ndarray:
    """The column-major (rows, cols) matrix with leading dimension ``ld`` at ``addr``."""
    dtype = np.dtype(dtype)
    extent = (cols - 1) * ld + rows
    buf = (ctypes.c_byte * (extent * dtype.itemsize)).from_address(addr)
    flat = np.frombuffer(buf, dtype=dtype, count=extent)
    return np.lib.stride_tricks.as_strided(
        flat, shape=(rows, cols), strides=(dtype.itemsize, ld * dtype.itemsize)
    )


# ------------------------------------------------------------------------------------------------
# CupyRuntime itself on the host
# ------------------------------------------------------------------------------------------------


class _FakeStream:
    """A CUDA stream that can capture: while capturing, work is recorded, not run."""

    def __init__(self, cuda: _FakeCuda, ptr: int) -> None:
        self.cuda = cuda
        self.ptr = ptr
        self.recording: list[Any] | None = None
        cuda.streams[ptr] = self

    def __enter__(self) -> _FakeStream:
        self.cuda.stack.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cuda.stack.pop()

    def begin_capture(self, mode: Any = None) -> None:
        assert self.ptr != 0, "capture on the legacy default stream is illegal"
        assert self.recording is None
        self.recording = []

    def end_capture(self) -> _FakeGraph:
        ops, self.recording = self.recording, None
        return _FakeGraph(ops)


class _FakeGraph:
    def __init__(self, ops: list[Any]) -> None:
        self.ops = ops

    def launch(self, stream: Any = None) -> None:
        for op in self.ops:
            op()


class _FakeRuntimeApi:
    """``cupy.cuda.runtime`` as CupyRuntime uses it: the device, raw device allocations."""

    def __init__(self) -> None:
        self.buffers: dict[int, np.ndarray] = {}

    def getDevice(self) -> int:  # noqa: N802 (CuPy's name)
        return 0

    def malloc(self, nbytes: int) -> int:
        buf = np.full(nbytes, 0xFF, dtype=np.uint8)
        self.buffers[buf.ctypes.data] = buf
        return buf.ctypes.data

    def free(self, ptr: int) -> None:
        del self.buffers[ptr]


class _FakeCuda:
    """``cupy.cuda`` as CupyRuntime uses it: the cuBLAS handle, the current stream (a stack
    of ``with stream:`` blocks over the legacy default stream), streams that capture."""

    def __init__(self) -> None:
        self.streams: dict[int, _FakeStream] = {}
        self.default = _FakeStream(self, 0)
        self.stack: list[_FakeStream] = []
        self.device = types.SimpleNamespace(
            get_cublas_handle=lambda: 0x1234, get_compute_capability=lambda: "90"
        )
        self.runtime = _FakeRuntimeApi()

    def get_current_stream(self) -> _FakeStream:
        return self.stack[-1] if self.stack else self.default

    def Stream(self, non_blocking: bool = False) -> _FakeStream:  # noqa: N802 (CuPy's name)
        return _FakeStream(self, 0x5000 + len(self.streams))

    def is_capturing(self, ptr: int) -> bool:
        return self.streams[ptr].recording is not None

    def enqueue(self, op: Any) -> None:
        """Run ``op`` now, or record it when the current stream is capturing."""
        rec = self.get_current_stream().recording
        if rec is None:
            op()
        else:
            rec.append(op)


class _FakeCublas:
    """The part of ``cupy_backends.cuda.libs.cublas`` that CupyRuntime calls, with the same
    signatures (CuPy 14), on the host GEMM; checks the pointer mode and the stream. Like
    CuPy's, every GEMM wrapper first sets the handle's stream to CuPy's current stream, and
    ``setStream`` refuses a stream that is capturing (NotImplementedError, CuPy 13/14): CuPy's
    wrappers cannot be captured."""

    CUBLAS_POINTER_MODE_HOST = 0
    CUBLAS_POINTER_MODE_DEVICE = 1

    def __init__(self, host: HostRuntime, cuda: _FakeCuda) -> None:
        self.host = host
        self.cuda = cuda
        self.mode = self.CUBLAS_POINTER_MODE_DEVICE  # not what CupyRuntime needs: it must set it
        self.stream = 0  # the legacy default stream
        self.workspace: tuple[int, int] | None = None  # a user workspace (address, bytes)
        self.calls = 0

    def getPointerMode(self, handle: int) -> int:
        return self.mode

    def setPointerMode(self, handle: int, mode: int) -> None:
        self.mode = mode

    def setStream(self, handle: int, stream: int) -> None:
        if self.cuda.is_capturing(stream):
            raise NotImplementedError(
                "calling cuBLAS API during stream capture is currently unsupported"
            )
        self._set_stream(stream)

    def _set_stream(self, stream: int) -> None:
        self.stream = stream
        self.workspace = None  # cublasSetStream resets the workspace to cuBLAS's own

    def getStream(self, handle: int) -> int:
        return self.stream

    def _scalars(self, dtype: Any, alpha: int, beta: int) -> tuple[float, float]:
        if self.mode != self.CUBLAS_POINTER_MODE_HOST:
            raise AssertionError("cuBLAS called without CUBLAS_POINTER_MODE_HOST")
        if self.stream != self.cuda.get_current_stream().ptr:
            raise AssertionError("cuBLAS called on a stream other than CuPy's current one")
        if self.cuda.get_current_stream().recording is not None and self.workspace is None:
            raise AssertionError("cuBLAS captured without a user workspace")
        c = _C["float" if np.dtype(dtype) == np.float32 else "double"]
        self.calls += 1
        return c.from_address(alpha).value, c.from_address(beta).value

    def _gemm(self, dtype, handle, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc):
        a, b = self._scalars(dtype, alpha, beta)
        self.cuda.enqueue(
            lambda: self.host._blas_gemm(
                dtype, transa, transb, m, n, k, a, A, lda, B, ldb, b, C, ldc
            )  # fmt: skip
        )

    def _batched(self, dtype, handle, transa, transb, m, n, k, alpha, A, lda, strideA, B, ldb,
                 strideB, beta, C, ldc, strideC, batchCount):  # fmt: skip
        a, b = self._scalars(dtype, alpha, beta)
        self.cuda.enqueue(
            lambda: self.host._blas_gemm_batched(
                dtype,
                transa,
                transb,
                m,
                n,
                k,
                a,
                A,
                lda,
                B,
                ldb,
                b,
                C,
                ldc,
                strideA,
                strideB,
                strideC,
                batchCount,
            )  # fmt: skip
        )

    def _current(self) -> None:
        """CuPy's ``_setStream(handle)``, the first thing each of its wrappers does."""
        self.setStream(0x1234, self.cuda.get_current_stream().ptr)

    def sgemm(self, *args):
        self._current()
        self._gemm(np.float32, *args)

    def dgemm(self, *args):
        self._current()
        self._gemm(np.float64, *args)

    def sgemmStridedBatched(self, *args):
        self._current()
        self._batched(np.float32, *args)

    def dgemmStridedBatched(self, *args):
        self._current()
        self._batched(np.float64, *args)


_INT_MAX = 2**31 - 1


class _FakeDirectCublas:
    """:class:`fastrnn._cuda._runtime.DirectCublas` on the same emulated handle: the C entry
    points, no stream set behind the caller's back. Checks what ctypes' argtypes would convert
    (ints everywhere, 32-bit ints in range) and records the workspace."""

    def __init__(self, blas: _FakeCublas) -> None:
        self.blas = blas
        f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
        self.gemm = {f32: self._gemm_fn(f32), f64: self._gemm_fn(f64)}
        self.gemm_batched = {f32: self._batched_fn(f32), f64: self._batched_fn(f64)}
        self.calls = 0

    @staticmethod
    def _check(args: tuple, int32: tuple[int, ...]) -> None:
        for i, a in enumerate(args):
            if type(a) is not int:
                raise TypeError(f"argument {i}: {type(a).__name__}, not int")
            if i in int32 and not -_INT_MAX - 1 <= a <= _INT_MAX:
                raise OverflowError(f"argument {i} ({a}) does not fit a C int")

    def _gemm_fn(self, dtype: np.dtype) -> Any:
        def gemm(*args: int) -> None:
            assert len(args) == 14
            self._check(args, (1, 2, 3, 4, 5, 8, 10, 13))
            self.calls += 1
            self.blas._gemm(dtype, *args)

        return gemm

    def _batched_fn(self, dtype: np.dtype) -> Any:
        def batched(*args: int) -> None:
            assert len(args) == 18
            self._check(args, (1, 2, 3, 4, 5, 8, 11, 15, 17))
            self.calls += 1
            self.blas._batched(dtype, *args)

        return batched

    def set_stream(self, handle: int, stream: int) -> None:
        self._check((handle, stream), ())
        self.blas._set_stream(stream)

    def set_workspace(self, handle: int, ptr: int, nbytes: int) -> None:
        self._check((handle, ptr, nbytes), ())
        self.blas.workspace = (ptr, nbytes)


class _CPointer:
    """CuPy's ``CPointer`` family without CuPy: ``ptr`` is the address of the argument's
    bytes."""

    def __init__(self, storage: Any) -> None:
        self._storage = storage
        self.ptr = (
            ctypes.addressof(storage)
            if not isinstance(storage, np.ndarray)
            else (storage.ctypes.data)
        )


def _fake_function_module() -> Any:
    try:
        from cupy.cuda import function  # the real classes need no GPU to be built

        return function
    except ImportError:
        return types.SimpleNamespace(
            CIntptr=lambda v: _CPointer(ctypes.c_int64(v)),
            CNumpyArray=lambda a: _CPointer(np.ascontiguousarray(a)),
        )


_SCALAR_C = {"index_t": ctypes.c_int64, "int": ctypes.c_int32}


class EmulatedCupyRuntime(CupyRuntime):
    """:class:`fastrnn._cuda._runtime.CupyRuntime` itself (its GEMM argument order, pointer-mode
    and stream handling, precomputed loop calls and packed launch arguments, graph capture)
    with CuPy's and cuBLAS's entry points answered by the host emulation.

    ``legacy_cupy=True`` emulates a CuPy whose kernel call refuses ``CPointer`` arguments
    (TypeError, as its argument conversion would raise before launching)."""

    check_bounds = True

    def __init__(self, lib: ctypes.CDLL, block: int = 32, max_blocks: int = 3,
                 legacy_cupy: bool = False) -> None:  # fmt: skip
        self.host = HostRuntime(lib, block=block, max_blocks=max_blocks)
        self.fake_cuda = _FakeCuda()
        self.fake_cublas = _FakeCublas(self.host, self.fake_cuda)
        self.fake_direct = _FakeDirectCublas(self.fake_cublas)
        self.legacy_cupy = legacy_cupy
        self.packed_launches = 0
        self._setup(types.SimpleNamespace(cuda=self.fake_cuda), self.fake_cublas,
                    _fake_function_module(), self.fake_direct, self._function)  # fmt: skip
        self.xp = self.host.xp
        self.block = block
        self.max_blocks = max_blocks

    @property
    def launches(self) -> list[tuple[str, int, int]]:
        return self.host.launches

    @property
    def batched_calls(self) -> int:
        return self.host.batched_calls

    def device_of(self, a: Any) -> Any:
        return contextlib.nullcontext()

    def to_device(self, host: np.ndarray) -> np.ndarray:
        return self.host.to_device(host)

    def ptr(self, a: Any) -> int:
        return a.ctypes.data

    def _function(self, name: str, ctype: str, device_id: int) -> Any:
        """The emulated CuPy kernel call of ``name`` (a kernel-table key) for ``ctype``."""
        spec = _kernels.kernel(name)
        value_c = {**_SCALAR_C, "T": _C[ctype]}

        def fn(grid: tuple, block: tuple, args: tuple) -> None:
            assert len(grid) == 1 and len(block) == 1
            assert len(args) == len(spec.kinds)
            packed = [hasattr(a, "ptr") and not isinstance(a, np.ndarray) for a in args]
            if any(packed):
                if self.legacy_cupy:
                    raise TypeError(f"Unsupported type {type(args[packed.index(True)])}")
                if not all(packed):
                    raise TypeError(f"{name}: packed and unpacked arguments mixed")
                # What CuPy hands cuLaunchKernel: the address of each argument's bytes.
                cargs = []
                for kind, a in zip(spec.kinds, args, strict=True):
                    if kind.endswith("*"):
                        if type(a).__name__ not in ("CIntptr", "_CPointer"):
                            raise TypeError(f"{name}: pointer passed as {type(a).__name__}")
                        cargs.append(ctypes.c_int64.from_address(a.ptr).value)
                    else:
                        cargs.append(value_c[kind].from_address(a.ptr).value)
                self.packed_launches += 1
                self.fake_cuda.enqueue(
                    lambda: self.host._launch_raw(spec, ctype, grid[0], block[0], cargs)
                )
                return
            for kind, a in zip(spec.kinds, args, strict=True):  # the exact scalar C types
                expected = {"index_t": np.int64, "int": np.int32}.get(kind)
                if expected is not None and type(a) is not expected:
                    raise TypeError(f"{name}: {kind} argument passed as {type(a).__name__}")
            self.fake_cuda.enqueue(lambda: self.host._launch(spec, ctype, grid[0], block[0], args))

        return fn
