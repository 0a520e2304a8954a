# cython: language_level=3
"""Row-major BLAS GEMM through scipy.linalg.cython_blas, callable without the GIL
(fastrnn/_cpu/_gemm.pxd's wrapper on SciPy's sgemm / dgemm).

No build-time BLAS dependency: SciPy's BLAS is found when the module that cimports this is
imported.
"""

from scipy.linalg.cython_blas cimport dgemm, sgemm

from fastrnn._cpu._gemm cimport floating, gemm_with


cdef inline void gemm(
    bint trans_a, bint trans_b, int m, int n, int k, floating alpha, const floating* a,
    int lda, const floating* b, int ldb, floating beta, floating* c, int ldc,
) noexcept nogil:
    """Row-major C = alpha * op(A) @ op(B) + beta * C (gemm_with's arguments) on SciPy's BLAS,
    loaded with the module that calls it."""
    gemm_with(sgemm, dgemm, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
