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
import os
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
    # The recurrent drivers run one GEMM and one kernel per step; these helpers take everything
    # that does not change across the steps once, so the loop body is two cheap calls. The base
    # versions simply call gemm() / launch(); CupyRuntime precomputes pointers and arguments.

    def blas_session(self) -> Any:
        """Context manager around a loop of :meth:`loop_gemm` steps."""
        return contextlib.nullcontext()

    def time_loop(self, key: tuple, steps: list[Any], body: Any) -> None:
        """Run ``body()``, a sequence of launches and GEMMs that allocates nothing: a time loop
        made of calls to the ``steps`` (from :meth:`loop_gemm` and :meth:`loop_launch`), or any
        fixed sequence of gemm() / launch() calls. ``key`` (op, sizes, device addresses of the
        arrays the body uses, ...) and the steps' fixed arguments together must determine every
        call the body makes. The base version runs it; CupyRuntime can replay it as a CUDA
        graph."""
        with self.blas_session():
            body()

    def loop_gemm(self, transa: bool, transb: bool, M: int, N: int, K: int, alpha: float,
                  A: Any, lda: int, B: Any, ldb: int, beta: float, C: Any,
                  ldc: int) -> Any:  # fmt: skip
        """The GEMM of one step as ``step(a_off, b_off, c_off)`` (element offsets); call it
        inside ``with rt.blas_session():``."""

        def step(a_off: int, b_off: int, c_off: int) -> None:
            self.gemm(transa, transb, M, N, K, alpha, A, a_off, lda, B, b_off, ldb, beta, C,
                      c_off, ldc)  # fmt: skip

        return step

    def loop_launch(self, name: str, dtype: np.dtype, n: int, args: tuple,
                    varying: tuple[str, ...]) -> Any:  # fmt: skip
        """The kernel launch of one step as ``step(*values)``, where ``values`` replace the
        scalar parameters named in ``varying`` (e.g. ("t", "src", "dst"))."""
        spec = _kernels.kernel(name)
        where = [spec.param_names.index(v) for v in varying]
        current = list(args)

        def step(*values: int) -> None:
            for i, v in zip(where, values, strict=True):
                current[i] = v
            self.launch(name, dtype, n, tuple(current))

        return step

    # -- kernels -------------------------------------------------------------------------------
    def launch(self, name: str, dtype: np.dtype, n: int, args: tuple) -> None:
        """Launch kernel ``name<dtype>`` over ``n`` elements (grid-stride loop) with ``args`` in
        the order of its kernel-table entry."""
        if n <= 0:
            return
        grid = min((n + self.block - 1) // self.block, self.max_blocks)
        spec = _kernels.kernel(name)
        self._launch(
            spec, _kernels.CTYPES[dtype], grid, self.block, convert_args(spec, dtype, args)
        )

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


class CupyRuntime(Runtime):
    """CuPy arrays, cuBLAS GEMMs and NVRTC kernels, on CuPy's current stream."""

    name = "cupy"

    def __init__(self) -> None:
        import cupy
        from cupy_backends.cuda.libs import cublas

        self._setup(cupy, cublas)

    def _setup(self, cupy: Any, cublas: Any) -> None:
        self.xp = cupy
        self._cupy = cupy
        self._cublas = cublas
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
        # CUDA graphs of time loops (opt-in: FASTRNN_CUDA_GRAPHS=1 or runtime().graphs = True)
        self.graphs = os.environ.get("FASTRNN_CUDA_GRAPHS", "").strip() == "1"
        self._graph_cache: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self._capture_streams: dict[int, Any] = {}
        self.graph_stats = {"eager": 0, "captured": 0, "replayed": 0, "capture_failed": 0}

    def device_of(self, a: Any) -> Any:
        return a.device

    def to_device(self, host: np.ndarray) -> Any:
        return self._cupy.asarray(host)

    def ptr(self, a: Any) -> int:
        return a.data.ptr

    def _blas_gemm(self, dtype, op_a, op_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        handle = self._cupy.cuda.device.get_cublas_handle()
        with self.blas_session():
            self._gemm_fn[dtype](
                handle,
                op_a,
                op_b,
                m,
                n,
                k,
                self._scalars[(dtype, alpha)].ctypes.data,
                a,
                lda,
                b,
                ldb,
                self._scalars[(dtype, beta)].ctypes.data,
                c,
                ldc,
            )

    def _blas_gemm_batched(
        self, dtype, op_a, op_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, sa, sb, sc, batch
    ):
        handle = self._cupy.cuda.device.get_cublas_handle()
        with self.blas_session():
            self._batched_fn[dtype](
                handle,
                op_a,
                op_b,
                m,
                n,
                k,
                self._scalars[(dtype, alpha)].ctypes.data,
                a,
                lda,
                sa,
                b,
                ldb,
                sb,
                self._scalars[(dtype, beta)].ctypes.data,
                c,
                ldc,
                sc,
                batch,
            )

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

    GRAPH_CACHE_SIZE = 32

    def time_loop(self, key, steps, body):
        """With ``graphs`` on, the second run of a loop with the same key and the same step
        arguments (device addresses included: CuPy's memory pool hands the same blocks back
        call after call) is captured into a CUDA graph on a private stream, and later runs
        replay it on the current stream: one launch instead of two per step. A graph replays
        exactly the kernel and cuBLAS calls it recorded, with the same pointers and scalars, so
        it is only used when all of them are equal. A loop that cannot be captured runs eagerly
        from then on."""
        if not self.graphs:
            self.graph_stats["eager"] += 1
            super().time_loop(key, steps, body)
            return
        cupy = self._cupy
        full_key = (key, cupy.cuda.runtime.getDevice(), self.block, self.max_blocks,
                    *(s.signature for s in steps))  # fmt: skip
        cache = self._graph_cache
        entry = cache.get(full_key)
        if entry is not None and entry != "seen" and entry != "eager":
            cache.move_to_end(full_key)
            self.graph_stats["replayed"] += 1
            entry.launch()
            return
        if entry == "seen":
            graph = self._capture(body)
            if graph is not None:
                cache[full_key] = graph
                self.graph_stats["captured"] += 1
                graph.launch()
                return
            cache[full_key] = "eager"
            self.graph_stats["capture_failed"] += 1
        elif entry is None:
            cache[full_key] = "seen"
            while len(cache) > self.GRAPH_CACHE_SIZE:
                cache.popitem(last=False)
        self.graph_stats["eager"] += 1
        super().time_loop(key, steps, body)

    def _capture(self, body: Any) -> Any:
        """``body`` captured into an instantiated CUDA graph, or None when capture fails."""
        cupy = self._cupy
        device_id = cupy.cuda.runtime.getDevice()
        stream = self._capture_streams.get(device_id)
        if stream is None:
            stream = cupy.cuda.Stream(non_blocking=True)
            self._capture_streams[device_id] = stream
        try:
            with stream:
                stream.begin_capture()
                try:
                    with self.blas_session():
                        body()
                finally:
                    graph = stream.end_capture()
        except Exception:  # e.g. an operation that cannot be captured: run eagerly instead
            return None
        return graph

    def loop_gemm(self, transa, transb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc):
        if M == 0 or N == 0 or K == 0:  # nothing to do, or no products: the general path
            step = super().loop_gemm(transa, transb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
            step.signature = ("gemm", C.dtype.char, M, N, K, float(beta), self.ptr(C), ldc)
            return step
        dtype = C.dtype
        item = dtype.itemsize
        fn = self._gemm_fn[dtype]
        handle = self._cupy.cuda.device.get_cublas_handle()
        op_first, op_second = (OP_T if transb else OP_N), (OP_T if transa else OP_N)
        alpha_p = self._scalars[(dtype, float(alpha))].ctypes.data
        beta_p = self._scalars[(dtype, float(beta))].ctypes.data
        pa, pb, pc = self.ptr(A), self.ptr(B), self.ptr(C)
        check = self.check_bounds
        shape_a = (K, M) if transa else (M, K)
        shape_b = (N, K) if transb else (K, N)

        # The same cuBLAS call as gemm() (operands swapped, see there), pointers precomputed;
        # pointer mode and stream are set once by blas_session().
        def step(a_off: int, b_off: int, c_off: int) -> None:
            if check:
                _check_extent("A", A, a_off, *shape_a, lda)
                _check_extent("B", B, b_off, *shape_b, ldb)
                _check_extent("C", C, c_off, M, N, ldc)
            fn(handle, op_first, op_second, N, M, K, alpha_p, pb + b_off * item, ldb,
               pa + a_off * item, lda, beta_p, pc + c_off * item, ldc)  # fmt: skip

        step.signature = ("gemm", dtype.char, transa, transb, M, N, K, float(alpha), pa, lda,
                          pb, ldb, float(beta), pc, ldc)  # fmt: skip
        return step

    def loop_launch(self, name, dtype, n, args, varying):
        if n <= 0:

            def nothing(*values: int) -> None:
                return None

            nothing.signature = ("nothing",)
            return nothing
        spec = _kernels.kernel(name)
        where = [spec.param_names.index(v) for v in varying]
        for i in where:
            if spec.kinds[i] != "index_t":
                raise TypeError(f"{name}: varying parameter {spec.params[i]} is not index_t")
        current = list(convert_args(spec, dtype, args))
        fn = self._function(spec.name, _kernels.CTYPES[dtype])
        grid = (min((n + self.block - 1) // self.block, self.max_blocks),)
        block = (self.block,)
        int64 = np.int64

        def step(*values: int) -> None:
            for i, v in zip(where, values, strict=True):
                current[i] = int64(v)
            fn(grid, block, tuple(current))

        step.signature = (name, dtype.char, grid, block, tuple(varying)) + tuple(
            self.ptr(a) if k.endswith("*") else a.item()
            for k, a in zip(spec.kinds, current, strict=True)
        )
        return step

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
