"""Which implementation runs the training glue: embedding backward, softmax cross-entropy (alone
and fused with a linear layer), gradient norms and clipping, the optimizers' updates.

For NumPy arrays the CPU kernels of fastrnn/_cpu/_train.pyx run; for CuPy arrays, and for every
array under ``fastrnn.use_backend("numpy")``, the plain NumPy/CuPy code of the layer API runs
(fastrnn/nn/linear.py, fastrnn/nn/functional.py, fastrnn/optim.py): that code is the oracle the
kernels are tested against. The callers validate their arguments before asking.

Also here: the kernels' reused scratch buffers (per Python thread, so concurrent calls never
share one) and BLAS pinning around the kernels that call BLAS from their OpenMP threads.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np

from fastrnn.backends import get_backend
from fastrnn.backends.validation import is_cupy_array

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_kernels: ModuleType | None = None


def _load() -> ModuleType:
    global _kernels
    if _kernels is None:
        try:
            from fastrnn._cpu import _train
        except ImportError as exc:
            raise ImportError(
                f"fastrnn's CPU kernel module fastrnn._cpu._train is not built ({exc}); install "
                "fastrnn with `pip install -e .` (or `python setup.py build_ext --inplace` in a "
                "source checkout)"
            ) from exc
        _kernels = _train
    return _kernels


_local = threading.local()


@contextlib.contextmanager
def numpy_glue() -> Iterator[None]:
    """Inside the block (this Python thread), the training glue runs the NumPy code while
    everything else keeps its kernels: ``fastrnn bench --training`` times the step both ways in
    one run."""
    before = getattr(_local, "numpy_glue", False)
    _local.numpy_glue = True
    try:
        yield
    finally:
        _local.numpy_glue = before


def cpu_kernels(*arrays: Any) -> ModuleType | None:
    """The kernel module when every array is a C-contiguous NumPy array (floating ones float32
    or float64, all of one dtype) and the reference is not forced; else None (run the NumPy
    code)."""
    if get_backend() == "numpy" or getattr(_local, "numpy_glue", False):
        return None
    dtype = None
    for a in arrays:
        if type(a) is not np.ndarray or is_cupy_array(a) or not a.flags.c_contiguous:
            return None
        if a.dtype.kind == "f":
            if a.dtype not in _FLOATS or (dtype is not None and a.dtype != dtype):
                return None
            dtype = a.dtype
    return _load()


def threads() -> int:
    from fastrnn._threads import get_num_threads

    return get_num_threads()


def blas_pinned() -> contextlib.AbstractContextManager[Any]:
    """BLAS on one thread while a kernel calls it from its OpenMP threads, whatever their
    number: with its own pool, SciPy's OpenBLAS (the one scipy.linalg.cython_blas calls, often
    loaded after the caller pinned NumPy's) fought the kernels' threads and made the char-rnn
    step four times slower on the loaded 2-core machine (perf: inner_thread,
    blas_thread_server, exec_blas_async_wait on top). ~16 us per call (FACTS.md)."""
    from fastrnn._cpu._blas_threads import blas_threads

    return blas_threads(1)


_pool = threading.local()


def scratch(name: str, dtype: Any, n: int) -> np.ndarray:
    """A reused flat array of at least ``n`` elements (uninitialised), one per name, dtype and
    Python thread: the training step's scratch costs no allocation after the first step."""
    bufs = getattr(_pool, "bufs", None)
    if bufs is None:
        bufs = _pool.bufs = {}
    key = (name, np.dtype(dtype))
    buf = bufs.get(key)
    if buf is None or buf.size < n:
        buf = bufs[key] = np.empty(max(int(n), 1), dtype)
    return buf[:n]


def address(a: np.ndarray) -> int:
    """The address of a NumPy array's first element."""
    return a.__array_interface__["data"][0]
