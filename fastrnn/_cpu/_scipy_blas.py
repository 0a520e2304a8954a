"""SciPy's BLAS for the kernels, without importing the scipy.linalg package.

The kernels call SciPy's sgemm / dgemm through the capsules of ``scipy.linalg.cython_blas``
(its ``__pyx_capi__``, SciPy's Cython API). Importing that module the usual way runs
``scipy/linalg/__init__.py`` first, which imports all of scipy.linalg (and, through its array
API support, numpy.f2py): 160-260 ms here, on the first recurrent call of every process. The
extension module itself loads in 13-25 ms, so it is loaded from its file directly. Cython keeps
one instance of a module per process, so a later ``import scipy.linalg`` finds the same
module and binds it as ``scipy.linalg.cython_blas`` as usual. Wherever the file cannot be found
or loaded, the usual import runs instead.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import threading
from typing import Any

NAME = "scipy.linalg.cython_blas"

_lock = threading.Lock()
_module: Any = None  # kept alive: the capsules point into its library


def _load_alone() -> Any:
    spec = importlib.util.find_spec("scipy")
    if spec is None or spec.origin is None:
        raise ImportError("scipy is not installed")
    folder = os.path.join(os.path.dirname(spec.origin), "linalg")
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(folder, "cython_blas" + suffix)
        if os.path.exists(path):
            loader = importlib.machinery.ExtensionFileLoader(NAME, path)
            module = importlib.util.module_from_spec(
                importlib.util.spec_from_file_location(NAME, path, loader=loader)
            )
            loader.exec_module(module)
            if sys.modules.get(NAME) is module:
                # (Cython registered it) left to the usual import, which then also binds it
                # on the scipy.linalg package
                del sys.modules[NAME]
            return module
    raise ImportError(f"no cython_blas extension module in {folder}")


def module() -> Any:
    """scipy.linalg.cython_blas, loaded once per process (from its file when scipy.linalg is
    not imported yet)."""
    global _module
    with _lock:
        if _module is None:
            loaded = sys.modules.get(NAME)
            if loaded is None:
                try:
                    loaded = _load_alone()
                except Exception:
                    import scipy.linalg.cython_blas as loaded
            _module = loaded
        return _module


def capi() -> dict[str, Any]:
    """The capsules of SciPy's Cython BLAS functions, by name (``sgemm``, ``dgemm``, ...)."""
    return module().__pyx_capi__
