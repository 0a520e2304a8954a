# cython: language_level=3, boundscheck=False, wraparound=False
"""Process-wide BLAS thread pinning, shared by every CPU kernel.

The kernels call single-threaded BLAS from inside their OpenMP regions, so they set the BLAS
libraries' thread count to 1 for the length of a call. That setting is global to the process,
so concurrent calls must not each save and restore it: a call that starts while another has
pinned would save the pinned value and restore it last, leaving the user's NumPy on one thread.
Here one counter, under one lock, counts the calls in flight: the first saves the libraries'
settings, the last restores them, whatever the interleaving. Every extension module cimports
these functions (one copy of the state per process), and Python code uses :func:`pinned`.
"""

cdef extern from *:
    """
    #include <pthread.h>
    typedef void (*fr_set_fn)(int);
    typedef int (*fr_get_fn)(void);
    #define FR_MAX_BLAS 8
    static pthread_mutex_t fr_lock = PTHREAD_MUTEX_INITIALIZER;
    static int fr_count = 0, fr_depth = 0;
    static fr_set_fn fr_set[FR_MAX_BLAS];
    static fr_get_fn fr_get[FR_MAX_BLAS];
    static int fr_saved[FR_MAX_BLAS];

    static void fr_register(size_t set_addr, size_t get_addr) {
        pthread_mutex_lock(&fr_lock);
        int known = 0;
        for (int i = 0; i < fr_count; i++)
            if ((size_t) fr_set[i] == set_addr) known = 1;
        if (!known && set_addr && get_addr && fr_count < FR_MAX_BLAS) {
            fr_set[fr_count] = (fr_set_fn) set_addr;
            fr_get[fr_count] = (fr_get_fn) get_addr;
            fr_count++;
        }
        pthread_mutex_unlock(&fr_lock);
    }
    static void fr_pin(int n) {
        pthread_mutex_lock(&fr_lock);
        if (fr_depth++ == 0)
            for (int i = 0; i < fr_count; i++) fr_saved[i] = fr_get[i]();
        for (int i = 0; i < fr_count; i++)
            if (fr_get[i]() != n) fr_set[i](n);
        pthread_mutex_unlock(&fr_lock);
    }
    static void fr_unpin(void) {
        pthread_mutex_lock(&fr_lock);
        if (fr_depth > 0 && --fr_depth == 0)
            for (int i = 0; i < fr_count; i++)
                if (fr_get[i]() != fr_saved[i]) fr_set[i](fr_saved[i]);
        pthread_mutex_unlock(&fr_lock);
    }
    /* In a forked child only the forking thread exists: no call is in flight any more. A pin
       held by a vanished thread is released (the saved settings restored) and the lock, which
       such a thread may have held at the fork, is made new. */
    static void fr_after_fork_child(void) {
        pthread_mutex_init(&fr_lock, NULL);
        if (fr_depth > 0) {
            for (int i = 0; i < fr_count; i++)
                if (fr_get[i]() != fr_saved[i]) fr_set[i](fr_saved[i]);
        }
        fr_depth = 0;
    }
    static int fr_pin_depth(void) { return fr_depth; }
    """
    void fr_register(size_t set_addr, size_t get_addr) noexcept nogil
    void fr_pin(int n) noexcept nogil
    void fr_unpin() noexcept nogil
    void fr_after_fork_child() noexcept nogil
    int fr_pin_depth() noexcept nogil

import contextlib
import os


cdef void blas_register(size_t set_addr, size_t get_addr) noexcept nogil:
    fr_register(set_addr, get_addr)


cdef void blas_pin(int n) noexcept nogil:
    fr_pin(n)


cdef void blas_unpin() noexcept nogil:
    fr_unpin()


def register(size_t set_addr, size_t get_addr):
    """Register one BLAS library's (set_num_threads, get_num_threads) functions."""
    fr_register(set_addr, get_addr)


def pin(int n):
    """Pin every registered BLAS to ``n`` threads until the matching :func:`unpin`."""
    with nogil:
        fr_pin(n)


def unpin():
    with nogil:
        fr_unpin()


def pin_depth():
    """Calls that hold a pin now (0 when the user's settings are in force)."""
    return fr_pin_depth()


@contextlib.contextmanager
def pinned(int n):
    """Context manager: registered BLAS libraries on ``n`` threads inside the block."""
    pin(n)
    try:
        yield
    finally:
        unpin()


def _after_fork_child():
    fr_after_fork_child()


os.register_at_fork(after_in_child=_after_fork_child)
