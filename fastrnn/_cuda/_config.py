"""The CUDA backend's environment switches, read in this one place, at call time.

* ``FASTRNN_CUDA_GRAPHS`` -- ``0`` turns CUDA graphs of the time loops off (default: on; see
  :mod:`fastrnn._cuda._graphs`). ``runtime().graphs = False`` / ``True`` overrides it for the
  process, ``None`` returns to the environment.

Nothing is read at import: a switch set after ``import fastrnn`` (by a test, a notebook cell, a
benchmark) takes effect at the next call.
"""

from __future__ import annotations

import os


def cuda_graphs() -> bool:
    """Whether the time loops are captured into CUDA graphs (``FASTRNN_CUDA_GRAPHS``)."""
    return os.environ.get("FASTRNN_CUDA_GRAPHS", "1").strip() != "0"
