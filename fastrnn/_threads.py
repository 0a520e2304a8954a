"""Thread control for the CPU kernels.

``set_num_threads(n)`` sets the OpenMP threads of fastrnn's kernels (passed explicitly to every
parallel region, so it does not change other libraries' OpenMP settings). BLAS threads are
managed by the kernels themselves (fastrnn/_cpu/_blas_threads.py, _recurrent_threads.py).
The default is what OpenMP would use: ``OMP_NUM_THREADS`` when set, else the number of CPUs
this process may run on.

Framework bindings (fastrnn.torch) run a call on the framework's thread count through
:func:`threads_in_this_thread`: an override local to the calling Python thread, so a call from
one thread never changes what another thread's calls use, and nothing global is left changed.
"""

from __future__ import annotations

import os
import threading

_num_threads: int | None = None
_local = threading.local()


def _default_threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def _check(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"n: expected an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n: expected at least 1 thread, got {n}")


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (>= 1) in fastrnn's CPU kernels."""
    global _num_threads
    _check(n)
    _num_threads = n


def get_num_threads() -> int:
    """The number of threads fastrnn's CPU kernels use (in this Python thread)."""
    override = getattr(_local, "threads", None)
    if override is not None:
        return override
    return _num_threads if _num_threads is not None else _default_threads()


class threads_in_this_thread:  # noqa: N801 - used as a function: `with threads_in_this_thread(n)`
    """Kernels called from this Python thread inside the block use ``n`` threads.

    A class rather than a generator context manager: it wraps every framework-bound kernel call,
    and costs a third as much."""

    __slots__ = ("n", "previous")

    def __init__(self, n: int) -> None:
        _check(n)
        self.n = n

    def __enter__(self) -> None:
        self.previous = getattr(_local, "threads", None)
        _local.threads = self.n

    def __exit__(self, *exc: object) -> None:
        _local.threads = self.previous
