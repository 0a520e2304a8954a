"""Tensors <-> kernel arrays without copies, the device and thread context of a kernel call.

Only the custom operators' real implementations (fastrnn/torch/_ops.py) use these: they run
eagerly, outside anything torch.compile traces.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from fastrnn._threads import get_num_threads, threads_in_this_thread

_SAME_THREADS = contextlib.nullcontext()  # reusable: it holds no state


def array(t: torch.Tensor | None) -> Any:
    """The kernel array on ``t``'s memory: a NumPy view of a CPU tensor, a CuPy view (DLPack)
    of a CUDA tensor. Non-contiguous tensors are made contiguous first (a copy), so the view
    is always C-contiguous: a negatively strided NumPy view must never reach DLPack."""
    if t is None:
        return None
    if t.requires_grad:
        t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.is_cpu:
        return t.numpy()
    import cupy

    # Inside kernel_call: cupy's current stream is torch's, so DLPack's hand-off is a no-op.
    return cupy.from_dlpack(t)


def tensor(a: Any) -> torch.Tensor:
    """The tensor on a kernel array's memory (``torch.from_numpy`` / ``torch.from_dlpack``).

    The kernels return fresh C-contiguous arrays; anything else (a read-only or strided array)
    is copied first: torch.from_numpy warns on read-only memory."""
    if isinstance(a, np.ndarray):
        if not (a.flags.writeable and a.flags.c_contiguous):
            a = np.array(a, order="C")
        return torch.from_numpy(a)
    if not a.flags.c_contiguous:
        a = a.copy(order="C")
    return torch.from_dlpack(a)


def zeros_like_array(like: Any, shape: tuple[int, ...]) -> Any:
    if isinstance(like, np.ndarray):
        return np.zeros(shape, dtype=like.dtype)
    import cupy

    return cupy.zeros(shape, dtype=like.dtype)


def kernel_call(t: torch.Tensor) -> contextlib.AbstractContextManager[None]:
    """The context of one kernel call on ``t``'s device.

    CPU: fastrnn's kernels use ``torch.get_num_threads()`` threads, for this Python thread only
    (nothing global of fastrnn or torch changes). CUDA: the kernels run on ``t``'s device and
    on PyTorch's current stream there, so no synchronisation is needed in either direction."""
    if not t.is_cuda:
        n = max(1, torch.get_num_threads())
        if n == get_num_threads():  # already what the kernels would use: nothing to scope
            return _SAME_THREADS
        return threads_in_this_thread(n)
    return _on_cuda_device(t)


@contextlib.contextmanager
def _on_cuda_device(t: torch.Tensor) -> Iterator[None]:
    import cupy

    device = t.device.index if t.device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device), cupy.cuda.ExternalStream(stream.cuda_stream, device):
        yield
