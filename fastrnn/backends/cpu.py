"""The ``cpu`` backend: Cython + OpenMP kernels in fastrnn/_cpu, BLAS through
scipy.linalg.cython_blas.

Each op family is one extension module (``fastrnn._cpu.lstm`` ...) whose ``def`` functions have
exactly the backend interface's signatures (fastrnn/backends/base.py). They are imported on first
use, so a missing build fails with a clear message instead of at ``import fastrnn``.
"""

from __future__ import annotations

import importlib
from typing import Any

name = "cpu"

# op name -> extension module in fastrnn/_cpu
_MODULE_OF = {
    "lstm": "lstm",
    "gru": "gru",
    "rnn": "rnn",
    "conv2d": "conv2d",
    "max_pool2d": "pool2d",
    "avg_pool2d": "pool2d",
}


def conv2d_forward_algorithm(x, w, b, stride, padding, dilation, groups, training, algorithm):
    """conv2d_forward (the interface's arguments) by a chosen algorithm: "auto", "direct",
    "winograd" or "im2col" (validated by fastrnn.backends.ops). Beyond the interface: only the
    CPU backend has several algorithms."""
    return _module("conv2d").conv2d_forward_algorithm(
        x, w, b, stride, padding, dilation, groups, training, algorithm
    )


def _module(name: str) -> Any:
    try:
        return importlib.import_module(f"fastrnn._cpu.{name}")
    except ImportError as exc:
        raise ImportError(
            f"fastrnn's CPU kernel module fastrnn._cpu.{name} is not built "
            f"({exc}); install fastrnn with `pip install -e .` (or "
            "`python setup.py build_ext --inplace` in a source checkout)"
        ) from exc


def __getattr__(attr: str) -> Any:
    op, _, direction = attr.rpartition("_")
    if direction not in ("forward", "backward") or op not in _MODULE_OF:
        raise AttributeError(attr)
    fn = getattr(_module(_MODULE_OF[op]), attr)
    globals()[attr] = fn  # later lookups skip __getattr__
    return fn
