"""BLAS thread control shared by the CPU kernels (no oversubscription, no leftover state).

The kernels set the BLAS libraries' thread count for the length of a call: one thread when
each OpenMP thread runs its own GEMMs, fastrnn's threads when one GEMM runs at a time. That
setting is process-wide, so it goes through one counter per process: the first call in flight
saves the user's settings, the last restores them, however calls from several Python threads
interleave.

* BLAS libraries whose own set/get-num-threads functions we can find (OpenBLAS, MKL) are
  registered once with fastrnn/_cpu/_process.pyx and pinned in C (~0.1 us, also without the
  GIL, from the recurrent kernels).
* Any other BLAS goes through one reused ``threadpoolctl.ThreadpoolController`` (~16 us per
  limit; ``threadpool_limits`` rebuilds its library list each time and costs far more), under
  the same save-first/restore-last rule, here in Python.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator
from typing import Any

_controller: Any = None

# (set, get) function names by threadpoolctl's internal_api; OpenBLAS builds add a prefix
# ("scipy_" for the scipy-openblas wheels) and a suffix ("64_" for ILP64 builds).
_NAMES = {
    "openblas": ("openblas_set_num_threads", "openblas_get_num_threads"),
    "mkl": ("MKL_Set_Num_Threads", "MKL_Get_Max_Threads"),
}
_PREFIXES = ("", "scipy_")
_SUFFIXES = ("", "64_")

# (pairs registered in C, controller of the libraries we could not pin in C or None)
_found: tuple[list[tuple[int, int]], Any] | None = None


def blas_controller() -> Any:
    """The process's BLAS thread controller, built on first use.

    It loads SciPy's BLAS first (``scipy.linalg.cython_blas``, the library the kernels call,
    through fastrnn/_cpu/_scipy_blas.py), so that it is in the list however the first caller got
    here: the list is built once, and a BLAS loaded after it would run unpinned, with its own
    threads, inside the kernels' OpenMP regions (a pointwise conv2d at 2 threads ran 13x slower
    after ``blas_threads`` had first been entered before SciPy was loaded).
    """
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        from fastrnn._cpu import _scipy_blas

        _scipy_blas.module()

        _controller = ThreadpoolController().select(user_api="blas")
    return _controller


def _address(lib: Any, name: str) -> int:
    try:
        fn = getattr(lib, name)
    except AttributeError:
        return 0
    return ctypes.cast(fn, ctypes.c_void_p).value or 0


def _functions(lc: Any) -> tuple[int, int]:
    names = _NAMES.get(lc.internal_api)
    if names is None:
        return (0, 0)
    for prefix in _PREFIXES:
        for suffix in _SUFFIXES:
            pair = (
                _address(lc.dynlib, prefix + names[0] + suffix),
                _address(lc.dynlib, prefix + names[1] + suffix),
            )
            if all(pair):
                return pair
    return (0, 0)


def _discover() -> tuple[list[tuple[int, int]], Any]:
    from fastrnn._cpu import _process

    controller = blas_controller()
    pairs: list[tuple[int, int]] = []
    missing = []
    for lc in controller.lib_controllers:
        pair = _functions(lc)
        if all(pair):
            _process.register(*pair)
            pairs.append(pair)
        else:
            missing.append(lc.prefix)
    rest = controller.select(prefix=missing) if missing else None
    return pairs, rest


def blas_thread_functions() -> list[tuple[int, int]]:
    """Addresses ``(set_num_threads, get_num_threads)`` of every loaded BLAS pinned in C
    (registered with fastrnn._cpu._process on the first call; SciPy's BLAS, the one the kernels
    call, is loaded first: :func:`blas_controller`)."""
    global _found
    if _found is None:
        _found = _discover()
    return _found[0]


# The threadpoolctl side of the counter: libraries not pinned in C.
_lock = threading.Lock()
_depth = 0
_limiter: Any = None


def _limit_rest(n: int) -> None:
    global _depth, _limiter
    rest = _found[1] if _found is not None else None
    with _lock:
        if rest is not None:
            limiter = rest.limit(limits=n)
            if _depth == 0:
                _limiter = limiter  # it holds the user's settings
        _depth += 1


def _restore_rest() -> None:
    global _depth, _limiter
    with _lock:
        _depth -= 1
        if _depth == 0 and _limiter is not None:
            _limiter.restore_original_limits()
            _limiter = None


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Context manager: every loaded BLAS uses ``n`` threads inside the ``with`` block; the
    user's settings are back once no call holds a limit."""
    from fastrnn._cpu import _process

    blas_thread_functions()
    _process.pin(n)
    _limit_rest(n)
    try:
        yield
    finally:
        _restore_rest()
        _process.unpin()


@contextlib.contextmanager
def fallback_limit(n_threads: int) -> Iterator[None]:
    """Pins to one thread the BLAS libraries that could not be pinned in C (the recurrent
    kernels pin the others themselves); a no-op when there are none or for one thread."""
    blas_thread_functions()
    if _found[1] is None or n_threads <= 1:
        yield
        return
    _limit_rest(1)
    try:
        yield
    finally:
        _restore_rest()


def _after_fork_child() -> None:
    # only the forking thread survives: no limit is in flight any more
    global _depth, _limiter, _lock
    _lock = threading.Lock()
    if _limiter is not None:
        _limiter.restore_original_limits()
    _depth = 0
    _limiter = None


os.register_at_fork(after_in_child=_after_fork_child)
