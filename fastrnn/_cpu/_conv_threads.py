"""BLAS thread control for the convolution kernels (no oversubscription).

The convolution kernels either run one BLAS call per image inside an OpenMP parallel region
(then BLAS must use one thread: nesting BLAS threads inside OpenMP threads is slower than either
alone), or run the images one after another with BLAS itself using fastrnn's threads. Both go
through :func:`blas_threads`, a reused threadpoolctl controller (about 10 microseconds per use;
``threadpool_limits`` rebuilds its library list each time and costs far more).
"""

from __future__ import annotations

from typing import Any

_controller: Any = None


def blas_threads(n: int) -> Any:
    """Context manager: every loaded BLAS uses ``n`` threads inside the ``with`` block."""
    global _controller
    if _controller is None:
        # Built on first use, after scipy.linalg.cython_blas has loaded SciPy's BLAS (the
        # kernels' extension modules import it when they are imported).
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController().select(user_api="blas")
    return _controller.limit(limits=n)
