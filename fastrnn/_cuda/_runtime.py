"""What the CUDA drivers need from the device: arrays, row-major GEMMs, kernel launches and
one time-loop API.

The drivers (:mod:`fastrnn._cuda.recurrent`, :mod:`fastrnn._cuda.conv`) talk to the device only
through a :class:`Runtime`: ``xp`` (the array module), :meth:`Runtime.gemm`,
:meth:`Runtime.launch` and :meth:`Runtime.time_loop`. :class:`CupyRuntime` is the real one,
assembled from three parts, one job each:

* :mod:`fastrnn._cuda._cublas` -- the cuBLAS GEMM adapter (row-major to column-major, CuPy's
  handle, pointer mode and stream, direct calls while capturing);
* :mod:`fastrnn._cuda._launch` -- kernel launches (grid, argument checks and packing);
* :mod:`fastrnn._cuda._graphs` -- kept time loops and their CUDA graphs.

The host tests swap in an emulation (NumPy arrays with guard margins, a column-major GEMM that
enforces cuBLAS's argument rules, the unchanged ``.cu`` files compiled as C++;
``tests/cuda_host_emulation.py``), so the drivers' offsets, leading dimensions, operand swaps and
launch arguments run for real without a GPU: only ``_blas_gemm``, ``_blas_gemm_batched``,
``_launch`` and the array module differ.

Everything is enqueued on CuPy's current stream; nothing here synchronises with the host.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from fastrnn._cuda import _config, _kernels
from fastrnn._cuda._cublas import CupyBlas, column_major_args
from fastrnn._cuda._graphs import LoopCache
from fastrnn._cuda._launch import (
    BLOCK,
    MAX_BLOCKS,
    CupyLauncher,
    convert_args,
    grid_size,
    varying_positions,
)

Call = tuple[Callable[..., Any], tuple]  # one prepared GEMM or launch: fn(*args) runs it


def _noop() -> None:
    return None


NOOP: Call = (_noop, ())  # a launch over no elements


class Runtime:
    """The device operations of the drivers; subclasses provide ``xp``, ``ptr``, ``_blas_gemm``,
    ``_blas_gemm_batched`` and ``_launch``.

    Time loops: a driver describes a loop once, as a list of prepared calls made from steps
    (:meth:`loop_gemm`, :meth:`loop_launch`), whose ``bind`` precomputes everything of one call,
    and hands it to :meth:`time_loop`. Running a loop is then ``fn(*args)`` per call and nothing
    else; CupyRuntime also keeps the list (and its CUDA graph) for the next call with the same
    key.
    """

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
    def gemm(self, transa: bool, transb: bool, M: int, N: int, K: int, alpha: float, A: Any,
             a_off: int, lda: int, B: Any, b_off: int, ldb: int, beta: float, C: Any,
             c_off: int, ldc: int, batch: int = 1, stride_a: int = 0, stride_b: int = 0,
             stride_c: int = 0) -> None:  # fmt: skip
        """Row-major ``C[M,N] = alpha * op(A) @ op(B) + beta * C``, alpha and beta in {0, 1}.

        Arrays are C-contiguous and share one dtype; ``*_off`` is the element offset of the
        matrix inside its array and ``ld*`` its row stride in elements (the row-major leading
        dimension). ``op(A)`` is ``A`` stored (M, K) when ``transa`` is false, else ``A`` stored
        (K, M) and transposed; likewise B, stored (K, N) or (N, K). With ``batch`` > 1 the
        product is repeated for matrices ``stride_*`` elements apart (strided batched GEMM; a
        stride may be 0 to share an operand). One column-major cuBLAS call with the operands
        swapped (:func:`fastrnn._cuda._cublas.column_major_args`).
        """
        if M == 0 or N == 0 or batch == 0:
            return
        if self.check_bounds:
            _check_gemm(transa, transb, M, N, K, A, a_off, lda, B, b_off, ldb, C, c_off, ldc,
                        batch, stride_a, stride_b, stride_c)  # fmt: skip
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
        args = column_major_args(transa, transb, M, N, K, alpha, self.ptr(A) + a_off * item, lda,
                                 self.ptr(B) + b_off * item, ldb, beta,
                                 self.ptr(C) + c_off * item, ldc)  # fmt: skip
        if batch == 1:
            self._blas_gemm(C.dtype, *args)
        else:
            self._blas_gemm_batched(C.dtype, *args, stride_b, stride_a, stride_c, batch)

    def _blas_gemm(self, dtype, op_a, op_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) -> None:
        """Column-major cuBLAS ``?gemm`` on raw addresses."""
        raise NotImplementedError

    def _blas_gemm_batched(self, dtype, op_a, op_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc,
                           stride_a, stride_b, stride_c, batch) -> None:  # fmt: skip
        """Column-major cuBLAS ``?gemmStridedBatched`` on raw addresses (strides in elements)."""
        raise NotImplementedError

    # -- kernels -------------------------------------------------------------------------------
    def launch(self, name: str, dtype: np.dtype, n: int, args: tuple,
               block: int | None = None) -> None:  # fmt: skip
        """Launch kernel ``name`` (a kernel-table key) for ``dtype`` over ``n`` elements
        (grid-stride loop) with ``args`` in the order of its table entry, ``block`` (default:
        the runtime's) threads per block."""
        if n <= 0:
            return
        block = block or self.block
        spec = _kernels.kernel(name)
        self._launch(spec, _kernels.CTYPES[dtype], grid_size(n, block, self.max_blocks), block,
                     convert_args(spec, dtype, args))  # fmt: skip

    def _launch(self, spec: _kernels.Kernel, ctype: str, grid: int, block: int,
                args: tuple) -> None:  # fmt: skip
        raise NotImplementedError

    # -- time loops ----------------------------------------------------------------------------
    def loop_gemm(self, transa: bool, transb: bool, M: int, N: int, K: int, alpha: float,
                  A: Any, lda: int, B: Any, ldb: int, beta: float, C: Any, ldc: int,
                  batch: int = 1, stride_a: int = 0, stride_b: int = 0,
                  stride_c: int = 0) -> Any:  # fmt: skip
        """A GEMM step of a time loop: ``step.bind(a_off, b_off, c_off)`` (element offsets) is
        the call; ``step.signature`` what a loop's key needs of it (sizes, addresses)."""

        def bind(a_off: int, b_off: int, c_off: int) -> Call:
            return self.gemm, (transa, transb, M, N, K, alpha, A, a_off, lda, B, b_off, ldb, beta,
                               C, c_off, ldc, batch, stride_a, stride_b, stride_c)  # fmt: skip

        return _Step(bind, self._gemm_signature(transa, transb, M, N, K, alpha, A, lda, B, ldb,
                                                beta, C, ldc, batch, stride_a, stride_b,
                                                stride_c))  # fmt: skip

    def loop_launch(self, name: str, dtype: np.dtype, n: int, args: tuple,
                    varying: tuple[str, ...] = (), block: int | None = None) -> Any:  # fmt: skip
        """A launch step of a time loop: ``step.bind(*values)`` is the call with the scalar
        parameters named in ``varying`` (e.g. ("t", "src", "dst")) set to ``values``. ``block``:
        threads per block instead of the runtime's."""
        spec = _kernels.kernel(name)
        where = varying_positions(spec, varying)

        def bind(*values: int) -> Call:
            current = list(args)
            for i, v in zip(where, values, strict=True):
                current[i] = v
            return self.launch, (name, dtype, n, tuple(current), block)

        return _Step(bind, self._launch_signature(name, dtype, n, args, varying, block))

    def time_loop(self, key: tuple, steps: list[Any], calls: Callable[[], list[Call]]) -> None:
        """Run the calls ``calls()`` returns (bound from ``steps``, or recorded with
        :meth:`record`). ``key`` (op, sizes, ...) and the steps' signatures together must
        determine the list: every device address and array size a call uses is in one or the
        other. The base version builds and runs it; CupyRuntime keeps it, or replays it as a
        CUDA graph."""
        with self.blas_session():
            for fn, args in calls():
                fn(*args)

    def record(self, body: Callable[[Recorder], None]) -> list[Call]:
        """The calls ``body(rec)`` makes through ``rec.gemm`` / ``rec.launch`` (the runtime's
        signatures), prepared one by one: the time loop of a driver whose calls have no step
        structure (conv2d). A loop key made from such calls must name every array they use."""
        rec = Recorder(self)
        body(rec)
        return rec.calls

    def blas_session(self) -> Any:
        """Context manager around a loop's GEMMs."""
        return contextlib.nullcontext()

    def _gemm_signature(self, transa, transb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc,
                        batch=1, stride_a=0, stride_b=0, stride_c=0) -> tuple:  # fmt: skip
        return ("gemm", C.dtype.char, transa, transb, M, N, K, float(alpha), self.ptr(A),
                A.size, lda, self.ptr(B), B.size, ldb, float(beta), self.ptr(C), C.size, ldc,
                batch, stride_a, stride_b, stride_c)  # fmt: skip

    def _launch_signature(self, name: str, dtype: np.dtype, n: int, args: tuple,
                          varying: tuple[str, ...], block: int | None) -> tuple:  # fmt: skip
        spec = _kernels.kernel(name)
        fixed = tuple(
            (self.ptr(a), a.size) if k.endswith("*") else (None if p in varying else a)
            for k, p, a in zip(spec.kinds, spec.param_names, args, strict=True)
        )
        return (name, np.dtype(dtype).char, n, block or self.block, self.max_blocks,
                tuple(varying), fixed)  # fmt: skip


class _Step:
    """One step of a time loop: ``bind(...)`` -> a call ``(fn, args)``; ``signature``: what a
    loop's key needs of it."""

    __slots__ = ("bind", "signature")

    def __init__(self, bind: Callable[..., Call], signature: tuple) -> None:
        self.bind = bind
        self.signature = signature


class Recorder:
    """Collects a loop's calls from ``gemm`` / ``launch`` calls shaped like the runtime's
    (:meth:`Runtime.record`)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.calls: list[Call] = []

    def gemm(self, transa, transb, M, N, K, alpha, A, a_off, lda, B, b_off, ldb, beta, C, c_off,
             ldc, batch=1, stride_a=0, stride_b=0, stride_c=0) -> None:  # fmt: skip
        step = self.rt.loop_gemm(transa, transb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc,
                                 batch, stride_a, stride_b, stride_c)  # fmt: skip
        self.calls.append(step.bind(a_off, b_off, c_off))

    def launch(self, name, dtype, n, args, block=None) -> None:
        self.calls.append(self.rt.loop_launch(name, dtype, n, args, (), block).bind())


def _check_gemm(transa, transb, M, N, K, A, a_off, lda, B, b_off, ldb, C, c_off, ldc, batch=1,
                stride_a=0, stride_b=0, stride_c=0) -> None:  # fmt: skip
    """Every operand of a row-major GEMM lies in its array."""
    _check_extent("A", A, a_off, *((K, M) if transa else (M, K)), lda, batch, stride_a)
    _check_extent("B", B, b_off, *((N, K) if transb else (K, N)), ldb, batch, stride_b)
    _check_extent("C", C, c_off, M, N, ldc, batch, stride_c)


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


class CupyRuntime(Runtime):
    """CuPy arrays, cuBLAS GEMMs (``blas``, :mod:`fastrnn._cuda._cublas`), NVRTC kernels
    (``kernels``, :mod:`fastrnn._cuda._launch`) and kept loops with their CUDA graphs
    (``loops``, :mod:`fastrnn._cuda._graphs`), on CuPy's current stream.

    A time loop's GEMM steps call CuPy's cuBLAS wrapper on precomputed addresses, its launch
    steps CuPy's kernel call on precomputed arguments. CUDA graphs: on unless
    ``FASTRNN_CUDA_GRAPHS=0`` (read at each call, :mod:`fastrnn._cuda._config`);
    ``runtime().graphs = True / False`` overrides that, ``None`` returns to the environment.
    """

    name = "cupy"

    def __init__(self) -> None:
        import cupy
        from cupy.cuda import function
        from cupy_backends.cuda.libs import cublas

        self._setup(cupy, cublas, function)

    def _setup(self, cupy: Any, cublas: Any, function: Any, direct: Any = None,
               get_function: Any = None) -> None:  # fmt: skip
        """The parts, on ``cupy`` / ``cublas`` / ``function`` (CuPy's modules, or the host
        tests' emulations of them)."""
        self.xp = cupy
        self._cupy = cupy
        self._logged: set[str] = set()
        self.blas = CupyBlas(cupy, cublas, direct)
        self.kernels = CupyLauncher(cupy, function, get_function)
        self.kernels.log = self._log
        self.loops = LoopCache(cupy, self.blas, self._log)
        self._graphs: bool | None = None

    @property
    def graphs(self) -> bool:
        """Whether time loops are captured into CUDA graphs."""
        return _config.cuda_graphs() if self._graphs is None else self._graphs

    @graphs.setter
    def graphs(self, value: bool | None) -> None:
        self._graphs = value

    @property
    def graph_stats(self) -> dict[str, Any]:
        """Counts of eager runs, captures, replays and failed captures; the last capture
        error."""
        return self.loops.stats

    def device_of(self, a: Any) -> Any:
        return a.device

    def to_device(self, host: np.ndarray) -> Any:
        return self._cupy.asarray(host)

    def ptr(self, a: Any) -> int:
        return a.data.ptr

    def _blas_gemm(self, dtype, *args) -> None:
        self.blas.gemm(np.dtype(dtype), *args)

    def _blas_gemm_batched(self, dtype, *args) -> None:
        self.blas.gemm_batched(np.dtype(dtype), *args)

    def _launch(self, spec, ctype, grid, block, args) -> None:
        self.kernels.launch(spec, ctype, grid, block, args)

    def blas_session(self) -> Any:
        return self.blas.session()

    # -- time loops ------------------------------------------------------------------------------
    def loop_gemm(self, transa, transb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, batch=1,
                  stride_a=0, stride_b=0, stride_c=0):  # fmt: skip
        if M == 0 or N == 0 or K == 0 or batch == 0:  # nothing to do or no products: general
            return super().loop_gemm(transa, transb, M, N, K, alpha, A, lda, B, ldb, beta, C,
                                     ldc, batch, stride_a, stride_b, stride_c)  # fmt: skip
        dtype = C.dtype
        item = dtype.itemsize
        fn = self.blas.prepared(dtype, batch)
        handle = self.blas.handle()
        pa, pb, pc = self.ptr(A), self.ptr(B), self.ptr(C)
        alpha_p, beta_p = self.blas.scalar(dtype, alpha), self.blas.scalar(dtype, beta)

        # The same cuBLAS call as gemm() on precomputed addresses; pointer mode and stream are
        # set once per loop by the loop's blas session.
        def bind(a_off: int, b_off: int, c_off: int) -> Call:
            if self.check_bounds:
                _check_gemm(transa, transb, M, N, K, A, a_off, lda, B, b_off, ldb, C, c_off, ldc,
                            batch, stride_a, stride_b, stride_c)  # fmt: skip
            op_a, op_b, m, n, k, _, a, lda_, b, ldb_, _, c, ldc_ = column_major_args(
                transa, transb, M, N, K, alpha, pa + a_off * item, lda, pb + b_off * item, ldb,
                beta, pc + c_off * item, ldc)  # fmt: skip
            if batch == 1:
                return fn, (handle, op_a, op_b, m, n, k, alpha_p, a, lda_, b, ldb_, beta_p, c,
                            ldc_)  # fmt: skip
            return fn, (handle, op_a, op_b, m, n, k, alpha_p, a, lda_, stride_b, b, ldb_,
                        stride_a, beta_p, c, ldc_, stride_c, batch)  # fmt: skip

        return _Step(bind, self._gemm_signature(transa, transb, M, N, K, alpha, A, lda, B, ldb,
                                                beta, C, ldc, batch, stride_a, stride_b,
                                                stride_c))  # fmt: skip

    def loop_launch(self, name, dtype, n, args, varying=(), block=None):
        spec = _kernels.kernel(name)
        where = varying_positions(spec, varying)
        signature = self._launch_signature(name, dtype, n, args, varying, block)
        if n <= 0:
            return _Step(lambda *values: NOOP, signature)
        threads = block or self.block
        bind = self.kernels.prepare(spec, dtype, grid_size(n, threads, self.max_blocks), threads,
                                    convert_args(spec, dtype, args), where, self.ptr)  # fmt: skip
        return _Step(bind, signature)

    def time_loop(self, key, steps, calls):
        cupy = self._cupy
        full_key = (key, cupy.cuda.runtime.getDevice(), cupy.cuda.get_current_stream().ptr,
                    *(s.signature for s in steps))  # fmt: skip
        self.loops.run(full_key, lambda: [c for c in calls() if c is not NOOP], self.graphs)

    def _log(self, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            logging.getLogger("fastrnn.cuda").warning(message)


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
