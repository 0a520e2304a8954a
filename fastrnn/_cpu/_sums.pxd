# cython: language_level=3
"""Fixed-order sums in double over 8 interleaved partial sums (vector lanes).

A serial ``acc += p[e]`` is one dependent add per element (the conv bias gradient spent 12% of a
conv backward there); 8 lanes give the compiler independent adds to vectorise. The order is a
function of the sizes alone, so a result never depends on the thread count."""

# (its own fused type: cimporting _blas.pxd would load SciPy's BLAS into modules that avoid it)
ctypedef fused real:
    float
    double


cdef inline void lanes_zero(double* acc) noexcept nogil:
    cdef int k
    for k in range(8):
        acc[k] = 0.0


cdef inline void lanes_add(double* acc, const real* p, Py_ssize_t n) noexcept nogil:
    """acc[k] += p[j] for j = k, k + 8, k + 16, ... < n."""
    cdef Py_ssize_t j = 0
    cdef int k
    while j + 8 <= n:
        for k in range(8):
            acc[k] = acc[k] + <double> p[j + k]
        j += 8
    for k in range(n - j):
        acc[k] = acc[k] + <double> p[j + k]


cdef inline double lanes_total(const double* acc) noexcept nogil:
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))


cdef inline double channel_sum(
    const real* a, Py_ssize_t N, Py_ssize_t C, Py_ssize_t L, Py_ssize_t c
) noexcept nogil:
    """The sum of channel c of a (N, C, L), in this fixed order (the conv bias gradient)."""
    cdef double acc[8]
    cdef Py_ssize_t n
    lanes_zero(acc)
    for n in range(N):
        lanes_add(acc, a + (n * C + c) * L, L)
    return lanes_total(acc)
