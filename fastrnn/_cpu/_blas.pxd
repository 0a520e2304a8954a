# cython: language_level=3
"""Row-major BLAS GEMM through scipy.linalg.cython_blas, callable without the GIL.

BLAS is column-major; a row-major C = op(A) op(B) is the column-major C^T = op(B)^T op(A)^T,
so the wrapper swaps the operands (and M with N) instead of transposing anything.
No build-time BLAS dependency: SciPy's BLAS is found at import time.
"""

from scipy.linalg.cython_blas cimport dgemm, sgemm

ctypedef fused floating:
    float
    double


cdef inline void gemm(
    bint trans_a,          # IN  use A^T
    bint trans_b,          # IN  use B^T
    int m,                 # IN  rows of op(A) and C
    int n,                 # IN  columns of op(B) and C
    int k,                 # IN  columns of op(A) = rows of op(B)
    floating alpha,        # IN
    const floating* a,     # IN  row-major, leading dimension lda
    int lda,               # IN
    const floating* b,     # IN  row-major, leading dimension ldb
    int ldb,               # IN
    floating beta,         # IN  0 overwrites C (C need not be initialised)
    floating* c,           # INOUT row-major, leading dimension ldc
    int ldc,               # IN
) noexcept nogil:
    """Row-major C = alpha * op(A) @ op(B) + beta * C."""
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    if m <= 0 or n <= 0:
        return
    if floating is float:
        sgemm(&tb, &ta, &n, &m, &k, &alpha, <float*> b, &ldb, <float*> a, &lda,
              &beta, c, &ldc)
    else:
        dgemm(&tb, &ta, &n, &m, &k, &alpha, <double*> b, &ldb, <double*> a, &lda,
              &beta, c, &ldc)
