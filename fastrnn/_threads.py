"""Thread control for the CPU kernels.

``set_num_threads(n)`` sets the OpenMP threads of fastrnn's kernels (passed explicitly to every
parallel region, so it does not change other libraries' OpenMP settings). BLAS threads are
managed by the kernels themselves (fastrnn/_cpu/_blas_threads.py, _recurrent_threads.py).
The default is what OpenMP would use: ``OMP_NUM_THREADS`` when set, else the number of CPUs
this process may run on.
"""

from __future__ import annotations

import os

_num_threads: int | None = None


def _default_threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (>= 1) in fastrnn's CPU kernels."""
    global _num_threads
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"n: expected an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n: expected at least 1 thread, got {n}")
    _num_threads = n


def get_num_threads() -> int:
    """The number of threads fastrnn's CPU kernels use."""
    return _num_threads if _num_threads is not None else _default_threads()
