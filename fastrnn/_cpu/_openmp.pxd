# cython: language_level=3
"""OpenMP through one guarded module: omp.h only when the compiler has OpenMP (_OPENMP), stubs
otherwise, so a serial build still compiles and runs."""

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define FASTRNN_HAVE_OPENMP 1
    #else
    #define FASTRNN_HAVE_OPENMP 0
    static inline int omp_get_max_threads(void) { return 1; }
    static inline int omp_get_thread_num(void) { return 0; }
    static inline int omp_get_num_threads(void) { return 1; }
    static inline void omp_set_num_threads(int n) { (void) n; }
    #endif
    """
    bint FASTRNN_HAVE_OPENMP
    int omp_get_max_threads() noexcept nogil
    int omp_get_thread_num() noexcept nogil
    int omp_get_num_threads() noexcept nogil
    void omp_set_num_threads(int n) noexcept nogil
