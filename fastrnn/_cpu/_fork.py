"""Kernels callable in a forked child (multiprocessing's fork, DataLoader workers).

GNU libgomp keeps each thread's pool of OpenMP workers in that thread's own state. After
``fork`` the child has only the forking thread, whose state still describes the parent's
workers: its next parallel region waits for threads that do not exist, forever. A thread
started in the child has fresh state and builds a pool of its own. So, in a child forked after
the kernels ran, a call from the forking thread runs on one helper thread started in the child
(created on first use, reused after, ~20 us per call); calls from any other thread run directly.
Results are those of the same call in the parent, on the same number of threads.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (imported when a forked child first needs it: concurrent.futures pulls in
    # logging, ~3-5 ms that every process would otherwise pay on its first kernel call)
    from concurrent.futures import ThreadPoolExecutor

_kernels_ran = False
_stale_thread: int | None = None  # in a forked child: the thread that forked
_worker: ThreadPoolExecutor | None = None


def _after_fork_in_child() -> None:
    global _stale_thread, _worker
    _worker = None  # the parent's helper thread, if any, does not exist here
    if _kernels_ran:
        _stale_thread = threading.get_ident()


os.register_at_fork(after_in_child=_after_fork_in_child)


def fork_safe(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a CPU kernel entry point), callable from a forked child's forking thread."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        global _kernels_ran, _worker
        _kernels_ran = True
        if _stale_thread is None or threading.get_ident() != _stale_thread:
            return fn(*args, **kwargs)
        if _worker is None:
            from concurrent.futures import ThreadPoolExecutor

            _worker = ThreadPoolExecutor(1, thread_name_prefix="fastrnn-after-fork")
        return _worker.submit(fn, *args, **kwargs).result()

    return call
