# cython: language_level=3
"""Row-major GEMM through function pointers to BLAS's sgemm / dgemm, callable without the GIL.

BLAS is column-major; a row-major C = op(A) op(B) is the column-major C^T = op(B)^T op(A)^T,
so the wrapper swaps the operands (and M with N) instead of transposing anything.
No SciPy here: fastrnn/_cpu/_blas.pxd passes SciPy's functions, taken from
scipy.linalg.cython_blas's capsules by load_scipy_blas() (at import for the recurrent modules,
on the first call that needs a GEMM for conv2d_im2col.pyx).
"""

ctypedef fused floating:
    float
    double


ctypedef void (*sgemm_fn)(char* transa, char* transb, int* m, int* n, int* k, float* alpha,
                          float* a, int* lda, float* b, int* ldb, float* beta, float* c,
                          int* ldc) noexcept nogil
ctypedef void (*dgemm_fn)(char* transa, char* transb, int* m, int* n, int* k, double* alpha,
                          double* a, int* lda, double* b, int* ldb, double* beta, double* c,
                          int* ldc) noexcept nogil


cdef inline void gemm_with(
    sgemm_fn s,            # IN  the float32 GEMM (SciPy's sgemm, or a pointer to it)
    dgemm_fn d,            # IN  the float64 GEMM
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
    """Row-major C = alpha * op(A) @ op(B) + beta * C through ``s`` / ``d``."""
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    if m <= 0 or n <= 0:
        return
    if floating is float:
        s(&tb, &ta, &n, &m, &k, &alpha, <float*> b, &ldb, <float*> a, &lda, &beta, c, &ldc)
    else:
        d(&tb, &ta, &n, &m, &k, &alpha, <double*> b, &ldb, <double*> a, &lda, &beta, c, &ldc)
