"""BLAS thread control shared by the CPU kernels (no oversubscription).

One reused ``threadpoolctl.ThreadpoolController`` over the loaded BLAS libraries (about 10-16
microseconds per limit; ``threadpool_limits`` rebuilds its library list each time and costs far
more). The convolution kernels limit BLAS through :func:`blas_threads` around a call: one thread
when each OpenMP thread runs its own GEMMs, fastrnn's threads when the images run one after
another. The recurrent kernels pin BLAS in C instead (fastrnn/_cpu/_recurrent_threads.py) and use
this controller only for a BLAS whose thread functions they cannot find.
"""

from __future__ import annotations

from typing import Any

_controller: Any = None


def blas_controller() -> Any:
    """The process's BLAS thread controller, built on first use.

    Built after scipy.linalg.cython_blas has loaded SciPy's BLAS (the kernels' extension modules
    import it when they are imported), so the library the kernels call is in its list.
    """
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController().select(user_api="blas")
    return _controller


def blas_threads(n: int) -> Any:
    """Context manager: every loaded BLAS uses ``n`` threads inside the ``with`` block."""
    return blas_controller().limit(limits=n)
