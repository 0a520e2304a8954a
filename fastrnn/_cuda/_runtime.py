"""What the CUDA drivers need from the device: arrays, row-major GEMMs and kernel launches.

The drivers (:mod:`fastrnn._cuda.recurrent`, :mod:`fastrnn._cuda.conv`) talk to the device only
through a :class:`Runtime`: ``xp`` (the array module), :meth:`Runtime.gemm` and
:meth:`Runtime.launch`. :class:`CupyRuntime` is the real one (CuPy arrays, cuBLAS, NVRTC
kernels, CuPy's current stream). The host tests swap in an emulation (NumPy arrays with guard
margins, a column-major GEMM that enforces cuBLAS's argument rules, the unchanged ``.cu`` files
compiled as C++; ``tests/cuda_host_emulation.py``), so the drivers' offsets, leading dimensions,
operand swaps and launch arguments run for real without a GPU: only the two hooks
``_blas_gemm`` and ``_launch`` and the array module differ.

Everything is enqueued on CuPy's current stream; nothing here synchronises with the host.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from fastrnn._cuda import _kernels

# Threads per block of the pointwise kernels, and the largest grid they are launched with: the
# kernels loop grid-stride, so a capped grid is correct for any size (32 blocks of 256 threads
# per SM fill an H100's 132 SMs; larger grids only add block scheduling).
BLOCK = 256
MAX_BLOCKS = 4096

OP_N, OP_T = 0, 1  # cublasOperation_t: CUBLAS_OP_N, CUBLAS_OP_T

_SCALAR = {"index_t": np.int64, "int": np.int32}


class Runtime:
    """The device operations of the drivers; subclasses provide ``xp``, ``ptr``, ``_blas_gemm``
    and ``_launch``."""

    xp: Any
    block: int = BLOCK
    max_blocks: int = MAX_BLOCKS
    # Check every GEMM operand's extent against its array (host tests and GPU tests turn it on).
    check_bounds: bool = False

    def device_of(self, a: Any) -> Any:
        """A context manager making ``a``'s device the current one."""
        return contextlib.nullcontext()

    def to_device(self, host: np.ndarray) -> Any:
        raise NotImplementedError

    def ptr(self, a: Any) -> int:
        raise NotImplementedError

    # -- GEMM ----------------------------------------------------------------------------------
    def gemm(
        self,
        transa: bool,
        transb: bool,
        M: int,
        N: int,
        K: int,
        alpha: float,
        A: Any,
        a_off: int,
        lda: int,
        B: Any,
        b_off: int,
        ldb: int,
        beta: float,
        C: Any,
        c_off: int,
        ldc: int,
        batch: int = 1,
        stride_a: int = 0,
        stride_b: int = 0,
        stride_c: int = 0,
    ) -> None:
        """Row-major ``C[M,N] = alpha * op(A) @ op(B) + beta * C``, alpha and beta in {0, 1}.

        Arrays are C-contiguous and share one dtype; ``*_off`` is the element offset of the
        matrix inside its array and ``ld*`` its row stride in elements (the row-major leading
        dimension). ``op(A)`` is ``A`` stored (M, K) when ``transa`` is false, else ``A`` stored
        (K, M) and transposed; likewise B, stored (K, N) or (N, K). With ``batch`` > 1 the
        product is repeated for matrices ``stride_*`` elements apart (strided batched GEMM; a
        stride may be 0 to share an operand).

        cuBLAS is column-major and a row-major matrix is the column-major storage of its
        transpose, so ``C^T = op(B)^T op(A)^T`` is one cuBLAS call with the operands swapped and
        the same leading dimensions.
        """
        if M == 0 or N == 0 or batch == 0:
            return
        if self.check_bounds:
            _check_extent("A", A, a_off, *((K, M) if transa else (M, K)), lda, batch, stride_a)
            _check_extent("B", B, b_off, *((N, K) if transb else (K, N)), ldb, batch, stride_b)
            _check_extent("C", C, c_off, M, N, ldc, batch, stride_c)
        if K == 0:  # no products: C = beta * C (and the leading dimensions may be 0)
            if beta == 0.0:
                flat = C.reshape(-1)
                for q in range(batch):
                    off = c_off + q * stride_c
                    if ldc == N:
                        flat[off : off + M * N] = 0
                    else:
                        for r in range(M):
                            flat[off + r * ldc : off + r * ldc + N] = 0
            return
        item = C.dtype.itemsize
        args = (
            C.dtype,
            OP_T if transb else OP_N,
            OP_T if transa else OP_N,
            N,
            M,
            K,
            float(alpha),
            self.ptr(B) + b_off * item,
            ldb,
            self.ptr(A) + a_off * item,
            lda,
            float(beta),
            self.ptr(C) + c_off * item,
            ldc,
        )
        if batch == 1:
            self._blas_gemm(*args)
        else:
            self._blas_gemm_batched(*args, stride_b, stride_a, stride_c, batch)

    def _blas_gemm(
        self,
        dtype: np.dtype,
        op_a: int,
        op_b: int,
        m: int,
        n: int,
        k: int,
        alpha: float,
        a: int,
        lda: int,
        b: int,
        ldb: int,
        beta: float,
        c: int,
        ldc: int,
    ) -> None:
        """Column-major cuBLAS ``?gemm`` on raw addresses."""
        raise NotImplementedError

    def _blas_gemm_batched(
        self,
        dtype: np.dtype,
        op_a: int,
        op_b: int,
        m: int,
        n: int,
        k: int,
        alpha: float,
        a: int,
        lda: int,
        b: int,
        ldb: int,
        beta: float,
        c: int,
        ldc: int,
        stride_a: int,
        stride_b: int,
        stride_c: int,
        batch: int,
    ) -> None:
        """Column-major cuBLAS ``?gemmStridedBatched`` on raw addresses (strides in elements)."""
        raise NotImplementedError

    # -- time loops ----------------------------------------------------------------------------
    # The recurrent drivers run one GEMM and one kernel per step. A loop is described once, as a
    # list of calls ``(fn, args)`` built from steps (:meth:`loop_gemm`, :meth:`loop_launch`)
    # whose ``bind`` precomputes everything of one step, so running the loop is ``fn(*args)``
    # per call and nothing else. :meth:`run_loop` runs such a list; CupyRuntime also keeps it
    # (and its CUDA graph) for the next call with the same key.

    def blas_session(self) -> Any:
        """Context manager around a loop of :meth:`loop_gemm` steps."""
        return contextlib.nullcontext()

    def run_loop(self, key: tuple, steps: list[Any], make_calls: Any) -> None:
        """Run the calls ``make_calls()`` returns, a list of ``(fn, args)`` from the ``steps``'
        ``bind``. ``key`` (op, sizes, ...) and the steps' signatures (their fixed arguments,
        device addresses and array sizes included) together must determine the list. The base
        version builds and runs it; CupyRuntime reuses it, or replays it as a CUDA graph."""
        with self.blas_session():
            for fn, args in make_calls():
                fn(*args)

    def time_loop(self, key: tuple, steps: list[Any], body: Any) -> None:
        """Run ``body()``, a fixed sequence of gemm() / launch() calls that allocates nothing.
        ``key`` (op, sizes, device addresses of the arrays the body uses, ...) and the steps'
        signatures together must determine every call the body makes. The base version runs
        it; CupyRuntime can replay it as a CUDA graph."""
        with self.blas_session():
            body()

    def _gemm_signature(self, transa: bool, transb: bool, M: int, N: int, K: int, alpha: float,
                        A: Any, lda: int, B: Any, ldb: int, beta: float, C: Any,
                        ldc: int) -> tuple:  # fmt: skip
        return ("gemm", C.dtype.char, transa, transb, M, N, K, float(alpha), self.ptr(A),
                A.size, lda, self.ptr(B), B.size, ldb, float(beta), self.ptr(C), C.size,
                ldc)  # fmt: skip

    def _launch_signature(self, name: str, dtype: np.dtype, n: int, args: tuple,
                          varying: tuple[str, ...], block: int | None) -> tuple:  # fmt: skip
        spec = _kernels.kernel(name)
        fixed = tuple(
            (self.ptr(a), a.size) if k.endswith("*") else (None if p in varying else a)
            for k, p, a in zip(spec.kinds, spec.param_names, args, strict=True)
        )
        return (name, np.dtype(dtype).char, n, block or self.block, self.max_blocks,
                tuple(varying), fixed)  # fmt: skip

    def loop_gemm(self, transa: bool, transb: bool, M: int, N: int, K: int, alpha: float,
                  A: Any, lda: int, B: Any, ldb: int, beta: float, C: Any,
                  ldc: int) -> Any:  # fmt: skip
        """The GEMM of one step: ``step.bind(a_off, b_off, c_off)`` (element offsets) is the
        call ``(fn, args)``; ``step(a_off, b_off, c_off)`` runs it at once (inside
        ``with rt.blas_session():``)."""

        def bind(a_off: int, b_off: int, c_off: int) -> tuple[Any, tuple]:
            return self.gemm, (transa, transb, M, N, K, alpha, A, a_off, lda, B, b_off, ldb,
                               beta, C, c_off, ldc)  # fmt: skip

        def step(a_off: int, b_off: int, c_off: int) -> None:
            fn, args = bind(a_off, b_off, c_off)
            fn(*args)

        step.bind = bind
        step.signature = self._gemm_signature(transa, transb, M, N, K, alpha, A, lda, B, ldb,
                                              beta, C, ldc)  # fmt: skip
        return step

    def loop_launch(self, name: str, dtype: np.dtype, n: int, args: tuple,
                    varying: tuple[str, ...], block: int | None = None) -> Any:  # fmt: skip
        """The kernel launch of one step: ``step.bind(*values)`` is the call ``(fn, args)``
        where ``values`` replace the scalar parameters named in ``varying`` (e.g. ("t",
        "src", "dst")); ``step(*values)`` runs it at once. ``block``: threads per block
        instead of the runtime's ``block``."""
        spec = _kernels.kernel(name)
        where = [spec.param_names.index(v) for v in varying]
        for i in where:
            if spec.kinds[i] != "index_t":
                raise TypeError(f"{name}: varying parameter {spec.params[i]} is not index_t")

        def bind(*values: int) -> tuple[Any, tuple]:
            current = list(args)
            for i, v in zip(where, values, strict=True):
                current[i] = v
            return self.launch, (name, dtype, n, tuple(current), block)

        def step(*values: int) -> None:
            fn, call_args = bind(*values)
            fn(*call_args)

        step.bind = bind
        step.signature = self._launch_signature(name, dtype, n, args, varying, block)
        return step

    # -- kernels -------------------------------------------------------------------------------
    def launch(self, name: str, dtype: np.dtype, n: int, args: tuple,
               block: int | None = None) -> None:  # fmt: skip
        """Launch kernel ``name<dtype>`` over ``n`` elements (grid-stride loop) with ``args`` in
        the order of its kernel-table entry, ``block`` (default: the runtime's) threads per
        block."""
        if n <= 0:
            return
        block = block or self.block
        grid = min((n + block - 1) // block, self.max_blocks)
        spec = _kernels.kernel(name)
        self._launch(spec, _kernels.CTYPES[dtype], grid, block, convert_args(spec, dtype, args))

    def _launch(
        self, spec: _kernels.Kernel, ctype: str, grid: int, block: int, args: tuple
    ) -> None:
        raise NotImplementedError


def _check_extent(
    name: str, a: Any, off: int, rows: int, cols: int, ld: int, batch: int = 1, stride: int = 0
) -> None:
    """``batch`` row-major (rows, cols) matrices, the first at element ``off``, ``stride``
    elements apart, with row stride ``ld``, all lie in ``a``."""
    if rows == 0 or cols == 0 or batch == 0:
        return
    last = off + max(0, (batch - 1) * stride)
    if ld < cols or off < 0 or stride < 0 or last + (rows - 1) * ld + cols > a.size:
        raise ValueError(
            f"gemm: {name} ({batch} x {rows}x{cols}, offset {off}, ld {ld}, stride {stride}) "
            f"does not fit its array of {a.size} elements"
        )


def convert_args(spec: _kernels.Kernel, dtype: np.dtype, args: tuple) -> tuple:
    """Check one launch's arguments against the kernel table and give every scalar the exact C
    type of its parameter (a bare Python int would travel as 8 bytes whatever the parameter)."""
    kinds = spec.kinds
    if len(args) != len(kinds):
        raise TypeError(f"{spec.name}: expected {len(kinds)} arguments, got {len(args)}")
    out = []
    for kind, param, a in zip(kinds, spec.params, args, strict=True):
        if kind == "T*":
            if a.dtype != dtype:
                raise TypeError(f"{spec.name}: {param} must be {dtype}, got {a.dtype}")
            out.append(a)
        elif kind == "index_t*":
            if a.dtype != np.int64:
                raise TypeError(f"{spec.name}: {param} must be int64, got {a.dtype}")
            out.append(a)
        elif kind == "T":
            out.append(dtype.type(a))
        else:
            out.append(_SCALAR[kind](a))
    return tuple(out)


# ------------------------------------------------------------------------------------------------
# cuBLAS without CuPy's wrappers (for stream capture)
# ------------------------------------------------------------------------------------------------


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


def _load_cublas() -> Any:
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


class _DeviceBuffer:
    """Device memory from cudaMalloc itself, outside CuPy's allocator (a user allocator may
    hand any pool memory out again), freed with the object."""

    def __init__(self, runtime_api: Any, nbytes: int) -> None:
        self._api = runtime_api
        self.ptr = 0
        self.ptr = runtime_api.malloc(nbytes)
        self.nbytes = nbytes

    def __del__(self) -> None:
        if self.ptr:
            with contextlib.suppress(Exception):  # e.g. at interpreter exit
                self._api.free(self.ptr)
            self.ptr = 0


class _Loop:
    """A time loop's calls, kept for the next run with the same key, and its CUDA graph."""

    __slots__ = ("calls", "runs", "graph", "workspace", "failed")

    def __init__(self, calls: list) -> None:
        self.calls = calls
        self.runs = 0
        self.graph: Any = None
        self.workspace: Any = None
        self.failed = False


def _noop() -> None:
    return None


class CupyRuntime(Runtime):
    """CuPy arrays, cuBLAS GEMMs and NVRTC kernels, on CuPy's current stream.

    Time loops (:meth:`run_loop`): the list of calls of a loop is built once per key and kept
    (LRU, ``LOOP_CACHE_SIZE`` loops), so a loop run again with the same arrays -- CuPy's memory
    pool hands the same blocks back call after call -- costs one ``fn(*args)`` per GEMM and
    per launch: the GEMM is CuPy's cuBLAS wrapper on precomputed addresses, the launch is
    CuPy's kernel call on precomputed ``CPointer`` arguments (no conversion per argument).

    CUDA graphs (on by default; ``FASTRNN_CUDA_GRAPHS=0`` or ``runtime().graphs = False`` turns
    them off): the second run of a loop with the same key is captured into a graph on a private
    stream, and every later run replays it on the current stream, one launch for the whole
    loop. A graph replays exactly the calls it recorded -- the same kernels, pointers and
    scalars -- and the key (every device address and array size of the loop included) makes
    sure it is only replayed where those are the arrays of the call. The GEMMs are captured
    through :class:`DirectCublas` with a workspace the runtime owns (one per device and
    stream). A loop that cannot be captured runs eagerly from then on; the failure is counted
    in ``graph_stats["capture_failed"]``, its text kept in ``graph_stats["last_capture_error"]``
    and logged (warning, once per message).
    """

    name = "cupy"
    LOOP_CACHE_SIZE = 32
    GRAPH_CACHE_SIZE = LOOP_CACHE_SIZE

    def __init__(self) -> None:
        import cupy
        from cupy.cuda import function
        from cupy_backends.cuda.libs import cublas

        self._setup(cupy, cublas, function)

    def _setup(self, cupy: Any, cublas: Any, function: Any, direct: Any = None) -> None:
        self.xp = cupy
        self._cupy = cupy
        self._cublas = cublas
        self._CIntptr = function.CIntptr
        self._CNumpyArray = function.CNumpyArray
        self._gemm_fn = {np.dtype(np.float32): cublas.sgemm, np.dtype(np.float64): cublas.dgemm}
        self._batched_fn = {
            np.dtype(np.float32): cublas.sgemmStridedBatched,
            np.dtype(np.float64): cublas.dgemmStridedBatched,
        }
        # alpha and beta are read from host memory (CUBLAS_POINTER_MODE_HOST); kept alive here.
        self._scalars = {
            (np.dtype(dt), v): np.array(v, dtype=dt)
            for dt in (np.float32, np.float64)
            for v in (0.0, 1.0)
        }
        self._functions: dict[tuple[str, str, int], Any] = {}
        self._direct = direct  # DirectCublas, loaded at the first capture
        self._direct_error: str | None = None
        self._capture_fns: dict[Any, Any] = {}
        self._capturing = False
        # Launch arguments as CuPy CPointer objects (checked once by a launch that does nothing;
        # None: not checked yet, False: this CuPy wants arrays and NumPy scalars).
        self._packed_args: bool | None = None
        self._packed_cache: dict[tuple, Any] = {}
        self.graphs = os.environ.get("FASTRNN_CUDA_GRAPHS", "1").strip() != "0"
        self._loop_cache: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self._capture_streams: dict[int, Any] = {}
        self._workspaces: dict[tuple[int, int], _DeviceBuffer] = {}
        self._logged: set[str] = set()
        self.graph_stats: dict[str, Any] = {
            "eager": 0,
            "captured": 0,
            "replayed": 0,
            "capture_failed": 0,
            "last_capture_error": None,
        }

    def device_of(self, a: Any) -> Any:
        return a.device

    def to_device(self, host: np.ndarray) -> Any:
        return self._cupy.asarray(host)

    def ptr(self, a: Any) -> int:
        return a.data.ptr

    # -- GEMMs (the general path) ----------------------------------------------------------------
    def _blas_gemm(self, dtype, op_a, op_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        handle = self._cupy.cuda.device.get_cublas_handle()
        alpha_p = self._scalars[(dtype, alpha)].ctypes.data
        beta_p = self._scalars[(dtype, beta)].ctypes.data
        if self._capturing:  # pointer mode and stream were set by _capture()
            self._direct.gemm[dtype](handle, op_a, op_b, m, n, k, alpha_p, a, lda, b, ldb,
                                     beta_p, c, ldc)  # fmt: skip
            return
        with self.blas_session():
            self._gemm_fn[dtype](handle, op_a, op_b, m, n, k, alpha_p, a, lda, b, ldb, beta_p,
                                 c, ldc)  # fmt: skip

    def _blas_gemm_batched(
        self, dtype, op_a, op_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, sa, sb, sc, batch
    ):
        handle = self._cupy.cuda.device.get_cublas_handle()
        alpha_p = self._scalars[(dtype, alpha)].ctypes.data
        beta_p = self._scalars[(dtype, beta)].ctypes.data
        args = (handle, op_a, op_b, m, n, k, alpha_p, a, lda, sa, b, ldb, sb, beta_p, c, ldc, sc,
                batch)  # fmt: skip
        if self._capturing:
            self._direct.gemm_batched[dtype](*args)
            return
        with self.blas_session():
            self._batched_fn[dtype](*args)

    @contextlib.contextmanager
    def blas_session(self) -> Iterator[None]:
        """Host pointer mode and the current stream on CuPy's cuBLAS handle for the loop, both
        restored afterwards."""
        cublas = self._cublas
        handle = self._cupy.cuda.device.get_cublas_handle()
        mode = cublas.getPointerMode(handle)
        stream = cublas.getStream(handle)
        cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
        try:
            cublas.setStream(handle, self._cupy.cuda.get_current_stream().ptr)
            yield
        finally:
            cublas.setPointerMode(handle, mode)
            cublas.setStream(handle, stream)

    # -- time loops ------------------------------------------------------------------------------
    def loop_gemm(self, transa, transb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc):
        if M == 0 or N == 0 or K == 0:  # nothing to do, or no products: the general path
            return super().loop_gemm(transa, transb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
        dtype = C.dtype
        item = dtype.itemsize
        fn = self._gemm_fn[dtype]
        handle = self._cupy.cuda.device.get_cublas_handle()
        op_first, op_second = (OP_T if transb else OP_N), (OP_T if transa else OP_N)
        alpha_p = self._scalars[(dtype, float(alpha))].ctypes.data
        beta_p = self._scalars[(dtype, float(beta))].ctypes.data
        pa, pb, pc = self.ptr(A), self.ptr(B), self.ptr(C)
        shape_a = (K, M) if transa else (M, K)
        shape_b = (N, K) if transb else (K, N)

        # The same cuBLAS call as gemm() (operands swapped, see there) on precomputed addresses;
        # pointer mode and stream are set once per loop by blas_session().
        def bind(a_off: int, b_off: int, c_off: int) -> tuple[Any, tuple]:
            if self.check_bounds:
                _check_extent("A", A, a_off, *shape_a, lda)
                _check_extent("B", B, b_off, *shape_b, ldb)
                _check_extent("C", C, c_off, M, N, ldc)
            return fn, (handle, op_first, op_second, N, M, K, alpha_p, pb + b_off * item, ldb,
                        pa + a_off * item, lda, beta_p, pc + c_off * item, ldc)  # fmt: skip

        def step(a_off: int, b_off: int, c_off: int) -> None:
            f, args = bind(a_off, b_off, c_off)
            f(*args)

        step.bind = bind
        step.signature = self._gemm_signature(transa, transb, M, N, K, alpha, A, lda, B, ldb,
                                              beta, C, ldc)  # fmt: skip
        return step

    def loop_launch(self, name, dtype, n, args, varying, block=None):
        spec = _kernels.kernel(name)
        where = [spec.param_names.index(v) for v in varying]
        for i in where:
            if spec.kinds[i] != "index_t":
                raise TypeError(f"{name}: varying parameter {spec.params[i]} is not index_t")
        signature = self._launch_signature(name, dtype, n, args, varying, block)
        if n <= 0:

            def bind_nothing(*values: int) -> tuple[Any, tuple]:
                return _noop, ()

            def nothing(*values: int) -> None:
                return None

            nothing.bind = bind_nothing
            nothing.signature = signature
            return nothing
        converted = convert_args(spec, dtype, args)
        fn = self._function(spec.name, _kernels.CTYPES[dtype])
        threads = block or self.block
        grid = (min((n + threads - 1) // threads, self.max_blocks),)
        block = (threads,)
        prepared: list[Any] = []  # packed at the first bind (none when the loop is cached)

        def prepare() -> tuple[list, Any]:
            if self._packed_args is None:
                self._packed_args = self._probe_packed_args(fn, spec, dtype)
            if self._packed_args:
                kinds = spec.kinds
                return [self._pack(k, a) for k, a in zip(kinds, converted, strict=True)], (
                    self._pack_index
                )
            return list(converted), np.int64

        def bind(*values: int) -> tuple[Any, tuple]:
            if not prepared:
                prepared.extend(prepare())
            fixed, pack_index = prepared
            current = fixed.copy()
            for i, v in zip(where, values, strict=True):
                current[i] = pack_index(v)
            return fn, (grid, block, tuple(current))

        def step(*values: int) -> None:
            f, call_args = bind(*values)
            f(*call_args)

        step.bind = bind
        step.signature = signature
        return step

    def _pack(self, kind: str, a: Any) -> Any:
        """One launch argument as the CuPy ``CPointer`` its launch would build: a device
        address (``CIntptr``) or a scalar in a 0-d NumPy array of its exact C type
        (``CNumpyArray``; ``convert_args`` gave it that type)."""
        if kind.endswith("*"):
            return self._CIntptr(self.ptr(a))
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

    def _probe_packed_args(self, fn: Any, spec: _kernels.Kernel, dtype: np.dtype) -> bool:
        """Whether this CuPy's kernel call takes ``CPointer`` arguments as they are: one launch
        of a step kernel ``spec`` (they all loop over N * H elements) with null pointers and
        zero scalars, so N = H = 0 and the kernel touches nothing. A TypeError is raised by the
        argument conversion, before anything is launched."""
        zero = {"index_t": np.int64, "int": np.int32, "T": dtype}
        if "N" not in spec.param_names or "H" not in spec.param_names:
            return False
        args = tuple(
            self._CIntptr(0) if k.endswith("*") else self._CNumpyArray(np.zeros((), zero[k]))
            for k in spec.kinds
        )
        try:
            fn((1,), (1,), args)
        except TypeError as e:
            self._log(f"kernel arguments passed as arrays and NumPy scalars: {e}")
            return False
        return True

    def run_loop(self, key, steps, make_calls):
        cupy = self._cupy
        full_key = (key, cupy.cuda.runtime.getDevice(), cupy.cuda.get_current_stream().ptr,
                    *(s.signature for s in steps))  # fmt: skip
        cache = self._loop_cache
        loop = cache.get(full_key)
        if loop is None:
            loop = cache[full_key] = _Loop([c for c in make_calls() if c[0] is not _noop])
            while len(cache) > self.LOOP_CACHE_SIZE:
                cache.popitem(last=False)
        else:
            cache.move_to_end(full_key)
        self._run_cached(loop, None)

    def time_loop(self, key, steps, body):
        cupy = self._cupy
        full_key = ("body", key, cupy.cuda.runtime.getDevice(), self.block, self.max_blocks,
                    cupy.cuda.get_current_stream().ptr,
                    *(s.signature for s in steps))  # fmt: skip
        cache = self._loop_cache
        loop = cache.get(full_key)
        if loop is None:
            loop = cache[full_key] = _Loop([])
            while len(cache) > self.LOOP_CACHE_SIZE:
                cache.popitem(last=False)
        else:
            cache.move_to_end(full_key)
        self._run_cached(loop, body)

    def _run_cached(self, loop: _Loop, body: Any) -> None:
        """Replay the loop's graph; or capture it (second run with graphs on); or run it: its
        calls, or ``body()`` when it has one."""
        if self.graphs:
            if loop.graph is not None:
                self.graph_stats["replayed"] += 1
                loop.graph.launch()
                return
            if loop.runs >= 1 and not loop.failed:
                captured = self._capture(loop.calls, body)
                if captured is not None:
                    loop.graph, loop.workspace = captured
                    self.graph_stats["captured"] += 1
                    loop.graph.launch()
                    return
                loop.failed = True
                self.graph_stats["capture_failed"] += 1
        loop.runs += 1
        self.graph_stats["eager"] += 1
        with self.blas_session():
            if body is not None:
                body()
            else:
                for fn, args in loop.calls:
                    fn(*args)

    def _capture(self, calls: list, body: Any) -> tuple[Any, Any] | None:
        """The calls (or ``body()``) captured into an instantiated CUDA graph on a private
        stream, with the cuBLAS workspace it uses; None (and the error recorded) when capture
        fails. In the calls, CuPy's cuBLAS wrappers are swapped for direct calls; a body's
        GEMMs take the direct path by themselves (``_capturing``)."""
        cupy = self._cupy
        try:
            direct = self._direct_cublas()
            device_id = cupy.cuda.runtime.getDevice()
            stream = self._capture_streams.get(device_id)
            if stream is None:
                stream = cupy.cuda.Stream(non_blocking=True)
                self._capture_streams[device_id] = stream
            workspace = self._workspace(device_id, cupy.cuda.get_current_stream().ptr, direct)
        except Exception as e:
            self._capture_error(e)
            return None
        sub = self._capture_fns

        def run() -> None:
            if body is not None:
                body()
                return
            for fn, args in calls:
                sub.get(fn, fn)(*args)

        cublas = self._cublas
        handle = cupy.cuda.device.get_cublas_handle()
        error: BaseException | None = None
        graph = None
        with stream:
            mode = cublas.getPointerMode(handle)
            previous = cublas.getStream(handle)
            try:
                cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
                direct.set_stream(handle, stream.ptr)  # also resets the handle's workspace
                if workspace is not None:
                    direct.set_workspace(handle, workspace.ptr, workspace.nbytes)
                self._capturing = True
                stream.begin_capture()
                try:
                    run()
                except Exception as e:
                    error = e
                try:
                    graph = stream.end_capture()
                except Exception as e:
                    error = error or e
            except Exception as e:
                error = error or e
            finally:
                self._capturing = False
                cublas.setPointerMode(handle, mode)
                direct.set_stream(handle, previous)  # the handle's default workspace again
        if error is not None:
            self._capture_error(error)
            return None
        return graph, workspace

    def _direct_cublas(self) -> DirectCublas:
        if self._direct is None:
            if self._direct_error is not None:
                raise RuntimeError(self._direct_error)
            try:
                self._direct = DirectCublas(_load_cublas())
            except Exception as e:
                self._direct_error = f"{type(e).__name__}: {e}"
                raise
        if not self._capture_fns:
            d, c = self._direct, self._cublas
            self._capture_fns = {
                c.sgemm: d.gemm[np.dtype(np.float32)],
                c.dgemm: d.gemm[np.dtype(np.float64)],
                c.sgemmStridedBatched: d.gemm_batched[np.dtype(np.float32)],
                c.dgemmStridedBatched: d.gemm_batched[np.dtype(np.float64)],
            }
        return self._direct

    # cuBLAS's default workspace: 32 MiB on compute capability 9.0 and later, 4 MiB before
    # (cublasSetWorkspace's documentation); the same size keeps cuBLAS's algorithm choice.
    def _workspace(self, device_id: int, stream_ptr: int, direct: DirectCublas) -> Any:
        if direct.set_workspace is None:
            return None
        ws = self._workspaces.get((device_id, stream_ptr))
        if ws is None:
            cc = int(self._cupy.cuda.device.get_compute_capability())
            ws = _DeviceBuffer(self._cupy.cuda.runtime, (32 if cc >= 90 else 4) << 20)
            self._workspaces[(device_id, stream_ptr)] = ws
        return ws

    def _capture_error(self, e: BaseException) -> None:
        text = f"{type(e).__name__}: {e}"
        self.graph_stats["last_capture_error"] = text
        self._log(f"CUDA graph capture failed, the loop runs eagerly: {text}")

    def _log(self, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            logging.getLogger("fastrnn.cuda").warning(message)

    # -- kernels -------------------------------------------------------------------------------
    def _function(self, name: str, ctype: str) -> Any:
        device_id = self._cupy.cuda.runtime.getDevice()
        key = (name, ctype, device_id)
        fn = self._functions.get(key)
        if fn is None:
            fn = _kernels.get_function(name, ctype, device_id)
            self._functions[key] = fn
        return fn

    def _launch(self, spec, ctype, grid, block, args):
        self._function(spec.name, ctype)((grid,), (block,), args)


_runtime: Runtime | None = None


def runtime() -> Runtime:
    """The runtime the drivers use: a :class:`CupyRuntime` unless a test swapped it."""
    global _runtime
    if _runtime is None:
        _runtime = CupyRuntime()
    return _runtime


@contextlib.contextmanager
def use_runtime(rt: Runtime) -> Iterator[Runtime]:
    """Run the drivers on ``rt`` inside the block (the host tests' emulation)."""
    global _runtime
    previous = _runtime
    _runtime = rt
    try:
        yield rt
    finally:
        _runtime = previous
