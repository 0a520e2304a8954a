"""Output arrays of the CPU kernels, from buffers reused once their caller has dropped them.

A kernel's output of a few MB is otherwise a fresh allocation on every call, and whether a
fresh allocation faults in new pages depends on what else the process allocated since: glibc
hands a freed block of that size back to the system once something else (PyTorch's allocator,
say) took the memory in between, and NumPy marks large arrays for transparent huge pages, each
of which the kernel then clears (and may compact memory for) on first touch, while the
convolution's threads wait on it. Measured (benchmarks/NOTES-conv.md, "Outputs from reused
buffers"): a depthwise layer's forward, (32, 64, 56x56), 2 threads, took 2.4 ms on its own and
32 ms right after a PyTorch convolution of the same size.

With FASTRNN_OUTPUT_CACHE_MB set to a size (it is 0, off, by default), outputs of at least
``OUTPUT_MIN_BYTES`` are views of pooled buffers, each mapped on its own outside the C
allocator's heap. A buffer is handed out again only when nothing outside the pool references
it: every view of it (the array returned, its slices and reshapes, a torch tensor made by
``torch.from_numpy``, a context that saved it) holds a reference to it, so its reference count
says exactly when the last one is gone. At most that many MB of unreferenced buffers stay,
least recently used freed first.

Why off by default: it slowed PyTorch's own work in the same process. bench_conv.py's --mnist
setup (examples/mnist's network on torch.nn and on fastrnn.torch, trained in one process): the
torch.nn network's step took 43.2 ms with the pool on against 39.3 ms off, medians of six
processes each, its allocations faulting in 3,000-7,400 fresh pages a step against 0-2,500
(11,000 in one); the fastrnn.torch network's step did not change (38.0 vs 37.9 ms). Freed to
the C allocator, fastrnn's outputs are presumably memory PyTorch's next allocations reuse. The
pool pays where fastrnn's own outputs fault.
"""

from __future__ import annotations

import math
import mmap
import os
import sys
import threading
from typing import Any

import numpy as np

OUTPUT_MIN_BYTES = 1 << 20


def _keep_bytes() -> int:
    value = os.environ.get("FASTRNN_OUTPUT_CACHE_MB", "0").strip()
    try:
        mb = int(value)
    except ValueError:
        mb = -1
    if mb < 0:
        raise ValueError(
            f"FASTRNN_OUTPUT_CACHE_MB: expected a whole number of MB, 0 or more, got {value!r}"
        )
    return mb << 20


# FASTRNN_OUTPUT_CACHE_MB (read once, when a kernel module is first imported): 0, the default,
# turns the pool off, every output then a fresh np.empty
OUTPUT_KEEP_BYTES = _keep_bytes()
# Buffers the pool tracks, in use or not (a caller keeping many outputs alive makes the pool
# forget the oldest: they are freed as usual when dropped)
OUTPUT_TRACK = 32

# Tests set a byte value here that every pooled output is filled with before a kernel writes
# it (0xFF: NaN in either float type), so that a kernel leaving any element unwritten fails
FILL: int | None = None

_outputs: list[np.ndarray] = []  # uint8 buffers, least recently used first
_lock = threading.Lock()


def _after_fork() -> None:
    # a fork while another thread held the lock would leave the child's copy locked forever
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def unreferenced(bufs: list[np.ndarray], i: int) -> bool:
    """Whether nothing but the list ``bufs`` references its buffer i (a caller must not hold
    the buffer under a name of its own while asking)."""
    return sys.getrefcount(bufs[i]) <= _FREE_REFS


# The references to a buffer in a list that nothing else holds, as unreferenced counts them
# (the list's, and the one getrefcount's argument holds)
_calibrate = [np.empty(0)]
_FREE_REFS = sys.getrefcount(_calibrate[0])
del _calibrate


def _free_at(i: int) -> bool:
    return unreferenced(_outputs, i)


def _new_buffer(size: int) -> np.ndarray:
    """A buffer mapped on its own, outside the C allocator's heap."""
    return np.frombuffer(mmap.mmap(-1, size), np.uint8)


def empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array of ``shape`` and ``dtype``, 64-byte aligned: a
    view of a pooled buffer (see the module docstring), or ``np.empty`` below
    ``OUTPUT_MIN_BYTES``."""
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    if n < OUTPUT_MIN_BYTES or OUTPUT_KEEP_BYTES <= 0:
        return np.empty(shape, dtype)
    size = n + 64  # room to align
    with _lock:
        pick = None
        for i in range(len(_outputs)):
            # the smallest free buffer that fits, at most twice the size asked for
            if size <= _outputs[i].size <= 2 * size and _free_at(i):
                if pick is None or _outputs[i].size < _outputs[pick].size:
                    pick = i
        buf = _new_buffer(size) if pick is None else _outputs.pop(pick)
        _outputs.append(buf)
        _trim()
    start = -buf.ctypes.data % 64
    if FILL is not None:
        buf[start:start + n] = FILL
    return buf[start:start + n].view(dtype).reshape(shape)


def _trim() -> None:
    """Forget the least recently used buffers past OUTPUT_TRACK, and free unreferenced ones
    past OUTPUT_KEEP_BYTES (the lock held)."""
    while len(_outputs) > OUTPUT_TRACK:
        _outputs.pop(0)
    kept = sum(_outputs[i].size for i in range(len(_outputs)) if _free_at(i))
    i = 0
    while kept > OUTPUT_KEEP_BYTES and i < len(_outputs) - 1:  # never the one just handed out
        if _free_at(i):
            kept -= _outputs.pop(i).size
        else:
            i += 1


def pooled_bytes() -> tuple[int, int]:
    """(bytes of pooled buffers in use, bytes kept free for reuse)."""
    used = kept = 0
    with _lock:
        for i in range(len(_outputs)):
            if _free_at(i):
                kept += _outputs[i].size
            else:
                used += _outputs[i].size
    return used, kept


def clear() -> None:
    """Stop tracking every pooled buffer: the free ones are freed now, the ones in use when
    their arrays go."""
    with _lock:
        _outputs.clear()
