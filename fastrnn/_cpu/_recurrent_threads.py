"""Threads of the recurrent kernels: OpenMP team size per call, and BLAS pinning.

The recurrent kernels call BLAS from inside their OpenMP parallel regions, one single-threaded
GEMM per thread, so BLAS must run on one thread while they run. Pinning through a reused
``threadpoolctl.ThreadpoolController`` costs ~16 us per call (FACTS.md), more than a whole
single-step LSTM call should take, so the kernels pin in C instead, through the process-wide
counter of fastrnn/_cpu/_process.pyx (see fastrnn/_cpu/_blas_threads.py); a BLAS whose
functions cannot be found falls back to threadpoolctl (:func:`fallback_limit`), used only when
the kernel will run more than one thread.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from fastrnn._cpu._blas_threads import blas_thread_functions, fallback_limit  # noqa: F401
from fastrnn._cpu._buffers import unreferenced
from fastrnn._threads import get_num_threads

# Below this many multiply-adds per time step (the recurrent GEMM, N x H x G*H) the time loop
# runs on one thread (its whole-sequence GEMMs may still be split, see below): a barrier per
# step costs about as much as splitting the step saves, and waits for a descheduled peer on a
# loaded machine. Measured with ``python -m fastrnn._bench --strategies``: NOTES-cpu.md.
MIN_PARALLEL_WORK = 1 << 20


# A call whose time loop runs on one thread still splits its whole-sequence GEMMs (the input
# projection; dx, dW_ih, dW_hh) over fastrnn's OpenMP threads, each with single-threaded BLAS,
# above this many multiply-adds; never through BLAS's own threads, whose pool switched on and
# off inside a call cost tens of ms (NOTES-cpu.md).
MIN_SEQUENCE_PARALLEL_WORK = 1 << 24


def sequence_threads(T: int, N: int, D: int, H: int, G: int) -> int:
    """Threads for the whole-sequence GEMMs of a call whose time loop runs on one thread."""
    nt = get_num_threads()
    if nt > 1 and T * N * G * H * max(D, H) < MIN_SEQUENCE_PARALLEL_WORK:
        return 1
    return nt


def team_size(N: int, H: int, G: int, P: int | None = None) -> int:
    """OpenMP threads for one recurrent call's time loop: fastrnn.get_num_threads(), or 1 when
    its step GEMM (N x P x G H; P = H without a projection) is tiny."""
    nt = get_num_threads()
    if nt > 1 and N * (H if P is None else P) * G * H < MIN_PARALLEL_WORK:
        return 1
    return nt


# The cells' instruction set: FASTRNN_SIMD = "avx512", "avx2" or "portable" forces one (the
# tests run each against the reference), "auto" or unset takes the best this CPU runs. The
# float32 AVX-512 GEMM kernels run only under "avx512"/"auto"; otherwise BLAS runs every GEMM.
SIMD_LEVELS = {"portable": 0, "avx2": 1, "avx512": 2}


def simd_request() -> int | None:
    """The instruction set FASTRNN_SIMD asks for (None: the best available); read per call."""
    value = os.environ.get("FASTRNN_SIMD", "auto").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in SIMD_LEVELS:
        raise ValueError(
            f"FASTRNN_SIMD: expected one of auto, {', '.join(SIMD_LEVELS)}, got {value!r}"
        )
    return SIMD_LEVELS[value]


def as_c_array(dtype: Any, *arrays: Any) -> tuple[Any, ...]:
    """The arrays as C-contiguous NumPy arrays of ``dtype`` (themselves when they already are;
    None stays None).

    fastrnn's public functions already guarantee this; the kernels are also callable through
    the backend module directly, where a strided view must not reach raw-pointer code."""
    out = []
    for a in arrays:
        if a is None:  # an array the cell does not have
            out.append(a)
            continue
        if type(a) is not np.ndarray or a.dtype != dtype or not a.flags.c_contiguous:
            a = np.ascontiguousarray(a, dtype=dtype)
        out.append(a)
    return tuple(out)


# ------------------------------------------------------------------------------------------------
# scratch buffers
# ------------------------------------------------------------------------------------------------

# Scratch arrays that do not outlive a call (the backward pass's gate gradients, the GRU's
# recurrent pre-activations, ...) are reused across calls: a fresh allocation of tens of MB is
# mapped and zeroed page by page on first touch (NOTES-cpu.md). One buffer per dtype is kept,
# at most _SCRATCH_KEEP_BYTES; a call takes it out of the pool, so concurrent calls from
# several Python threads never share one.
_SCRATCH_KEEP_BYTES = 512 << 20
_scratch_pool: dict[Any, np.ndarray] = {}


def take_scratch(dtype: Any, n: int) -> np.ndarray:
    """A flat array of at least ``n`` elements of ``dtype`` (uninitialised)."""
    buf = _scratch_pool.pop(np.dtype(dtype), None)
    if buf is None or buf.size < n:
        buf = np.empty(max(n, 1), dtype)
    return buf


def give_scratch(buf: np.ndarray) -> None:
    """Return a buffer from :func:`take_scratch` for later calls."""
    if buf.nbytes <= _SCRATCH_KEEP_BYTES:
        kept = _scratch_pool.get(buf.dtype)
        if kept is None or kept.size < buf.size:
            _scratch_pool[buf.dtype] = buf


# The arrays a training forward saves for its backward (activations, states: most of the memory
# a training call allocates) outlive the call, so they cannot come from the scratch pool. They
# come from one flat buffer per call instead, and the buffers of earlier calls are kept: a
# buffer is reused once nothing outside the pool references it (a context and every view of
# the buffer hold a reference to it, so the reference count says exactly when the last context
# that used it is gone). In a training loop every call after the first reuses the previous
# call's buffer and skips its page faults.
_SAVED_KEEP = 4
_saved_pool: dict[Any, list[np.ndarray]] = {}


def take_saved(dtype: Any, n: int) -> np.ndarray:
    """A flat array of ``n`` elements of ``dtype`` (uninitialised) for arrays a context keeps:
    a view of a pooled buffer that nothing else references, or a new buffer."""
    dtype = np.dtype(dtype)
    bufs = _saved_pool.setdefault(dtype, [])
    for i in range(len(bufs)):
        if bufs[i].size >= n and unreferenced(bufs, i):
            buf = bufs.pop(i)
            bufs.append(buf)  # most recently used last
            return buf[:n]
    buf = np.empty(max(n, 1), dtype)
    if buf.nbytes <= _SCRATCH_KEEP_BYTES:
        if len(bufs) >= _SAVED_KEEP:
            # drop the least recently used buffer nothing references, else the oldest
            free = [j for j in range(len(bufs)) if unreferenced(bufs, j)]
            bufs.pop(free[0] if free else 0)
        bufs.append(buf)
    return buf[:n]


def clear_scratch() -> None:
    """Free the cached scratch buffers (and the pooled buffers of saved arrays)."""
    _scratch_pool.clear()
    _saved_pool.clear()
