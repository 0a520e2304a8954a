"""The forward pass's context as a tensor, so that a custom operator can return it.

A custom operator returns tensors only, but fastrnn's backward needs the context object its
forward returned (saved activations, backend-private). The forward operator therefore returns
a *handle*: a one-element int64 CPU tensor whose memory is a NumPy array that owns the context.
The context lives exactly as long as the handle tensor's storage: autograd (eager or the
compiled graph of torch.compile) keeps the handle while backward may still need it and frees
it with the graph, so no registry entry can outlive its graph. The backward operator finds the
owner again from the handle's data pointer (the entry is removed when the owner is freed,
before its memory can be reused). The handle's value is 1, or 0 for a forward that saved
nothing: deterministic, as a custom operator's outputs must be (torch.library.opcheck
compares them between eager and traced runs).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np
import torch

_lock = threading.Lock()
# data pointer of a live handle -> weak reference to the array that owns its context
_owners: dict[int, weakref.ref] = {}


class _Owner(np.ndarray):
    """A one-element int64 array (the handle's memory) that holds a fastrnn context."""

    fr_context: Any = None


def _forget(pointer: int, ref: weakref.ref) -> None:
    with _lock:
        if _owners.get(pointer) is ref:
            del _owners[pointer]


def handle(context: Any) -> torch.Tensor:
    """A fresh handle tensor for ``context`` (None: a forward without training saves nothing,
    and the handle holds the serial 0)."""
    if context is None:
        return torch.zeros(1, dtype=torch.int64)
    owner = _Owner(1, np.int64)
    owner.fill(1)
    owner.fr_context = context
    t = torch.from_numpy(owner)
    pointer = t.data_ptr()  # (cheaper than owner.ctypes.data)
    ref = weakref.ref(owner, lambda r, p=pointer: _forget(p, r))
    with _lock:
        _owners[pointer] = ref
    return t


def context(h: torch.Tensor, op: str) -> Any:
    """The context a forward operator stored behind handle ``h``."""
    ref = _owners.get(h.data_ptr())
    owner = None if ref is None else ref()
    if owner is None:
        if int(h.reshape(-1)[0]) == 0:
            raise not_saved(op)
        raise RuntimeError(
            f"fastrnn::{op}: this handle does not come from a live fastrnn::{op} forward pass "
            "(it was copied, or its graph was freed)"
        )
    return owner.fr_context


def _nothing() -> None:
    return None


def keeper(context: Any) -> tuple[torch.Tensor | None, Any]:
    """For an autograd node that keeps ``context`` itself: a tensor that owns the context (an
    empty one; save it with ``ctx.save_for_backward`` and the context is freed with the
    graph's saved tensors) and a function that returns the context while that tensor lives.
    (None and a function returning None for a forward that saved nothing.) Half the cost of a
    handle: nothing to register."""
    if context is None:
        return None, _nothing
    owner = _Owner(0, np.int64)
    owner.fr_context = context
    return torch.from_numpy(owner), weakref.ref(context)


def not_saved(op: str) -> RuntimeError:
    """The error for a backward of a forward pass that saved nothing."""
    return RuntimeError(
        f"fastrnn::{op}: the forward pass ran without saving for backward "
        "(training=False, e.g. under torch.no_grad()); run it with gradients enabled"
    )


def live_handles() -> int:
    """How many contexts are held now (for tests of their lifetime)."""
    with _lock:
        return sum(1 for r in _owners.values() if r() is not None)
