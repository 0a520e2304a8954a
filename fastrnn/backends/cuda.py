"""The ``cuda`` backend: CUDA C kernels in csrc/, compiled at run time by CuPy (NVRTC), GEMMs
through cuBLAS. The launchers live in fastrnn/_cuda (``recurrent`` and ``conv`` modules) and
have exactly the backend interface's signatures (fastrnn/backends/base.py); they are imported on
first use, so CuPy is only imported when CuPy arrays are passed.
"""

from __future__ import annotations

import importlib
from typing import Any

name = "cuda"

_MODULE_OF = {
    "lstm": "recurrent",
    "gru": "recurrent",
    "rnn": "recurrent",
    "conv2d": "conv",
    "max_pool2d": "conv",
    "avg_pool2d": "conv",
}


def __getattr__(attr: str) -> Any:
    op, _, direction = attr.rpartition("_")
    if direction not in ("forward", "backward") or op not in _MODULE_OF:
        raise AttributeError(attr)
    module = importlib.import_module(f"fastrnn._cuda.{_MODULE_OF[op]}")
    fn = getattr(module, attr)
    globals()[attr] = fn
    return fn
