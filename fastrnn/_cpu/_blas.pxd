# cython: language_level=3
"""Row-major BLAS GEMM on SciPy's sgemm / dgemm, callable without the GIL
(fastrnn/_cpu/_gemm.pxd's wrapper).

No build-time BLAS dependency: a module that cimports this calls ``load_scipy_blas()`` before
its first GEMM (when it is imported, or lazily: conv2d_im2col.pyx), which takes the two
functions from scipy.linalg.cython_blas's capsules
(fastrnn/_cpu/_scipy_blas.py loads that module without the scipy.linalg package: the package's
import cost the first recurrent call of a process 160-260 ms).
"""

from cpython.pycapsule cimport PyCapsule_GetName, PyCapsule_GetPointer

from fastrnn._cpu._gemm cimport dgemm_fn, floating, gemm_with, sgemm_fn

cdef extern from *:
    """
    /* SciPy's GEMMs for this module (each module that cimports _blas.pxd has its own copy) */
    static void *fr_blas_sgemm_ptr = 0, *fr_blas_dgemm_ptr = 0;
    """
    void* fr_blas_sgemm_ptr
    void* fr_blas_dgemm_ptr


cdef inline int load_scipy_blas() except -1:
    """Point this module's gemm at SciPy's sgemm and dgemm (once; needs the GIL)."""
    global fr_blas_sgemm_ptr, fr_blas_dgemm_ptr
    if fr_blas_sgemm_ptr != NULL:
        return 0
    from fastrnn._cpu._scipy_blas import capi

    c = capi()
    fr_blas_dgemm_ptr = PyCapsule_GetPointer(c["dgemm"], PyCapsule_GetName(c["dgemm"]))
    fr_blas_sgemm_ptr = PyCapsule_GetPointer(c["sgemm"], PyCapsule_GetName(c["sgemm"]))
    return 0


cdef inline void gemm(
    bint trans_a, bint trans_b, int m, int n, int k, floating alpha, const floating* a,
    int lda, const floating* b, int ldb, floating beta, floating* c, int ldc,
) noexcept nogil:
    """Row-major C = alpha * op(A) @ op(B) + beta * C (gemm_with's arguments) on SciPy's BLAS
    (load_scipy_blas() has run in the calling module)."""
    gemm_with(<sgemm_fn> fr_blas_sgemm_ptr, <dgemm_fn> fr_blas_dgemm_ptr, trans_a, trans_b, m,
              n, k, alpha, a, lda, b, ldb, beta, c, ldc)
