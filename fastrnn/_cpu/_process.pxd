# cython: language_level=3
"""Process-wide state of the CPU kernels, shared by every extension module (cimport these)."""

cdef void blas_register(size_t set_addr, size_t get_addr) noexcept nogil
cdef void blas_pin(int n) noexcept nogil
cdef void blas_unpin() noexcept nogil
