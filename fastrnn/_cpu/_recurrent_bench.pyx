# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Measurement helper for the recurrent kernels' threading decision (fastrnn._bench).

The per-step recurrent GEMM, h (N, H) @ W^T (H, G*H) with W^T stored, repeated ``steps`` times,
run three ways:

* ``"serial"``: one thread, the kernels' step GEMM (panel_mm from W^T packed once, where
  use_panels says so; else step_mm: the small-batch kernel up to SMALL_GEMM_MAX_ROWS rows, else
  single-threaded BLAS);
* ``"blas"``: one thread calls BLAS, which uses ``threads`` threads of its own;
* ``"omp"``: ``threads`` OpenMP threads, each its own gate columns with the kernels' step GEMM,
  and a barrier per step (what the engine, recurrent.pyx, does above MIN_PARALLEL_WORK).

Only the GEMMs, the one packing of the panels and the synchronisation are timed, float32, the
same code the kernels run.
"""

import time

cimport numpy as cnp
import numpy as np
from cython.parallel cimport parallel

from fastrnn._cpu._openmp cimport omp_get_num_threads, omp_get_thread_num
from fastrnn._cpu._blas cimport load_scipy_blas
from fastrnn._cpu._recurrent_common cimport (
    fr_barrier,
    fr_blas_pin,
    fr_blas_register,
    fr_blas_restore,
    fr_small_gemm_init,
    fr_small_gemm_isa,
    mm,
    pack_panels,
    panel_mm,
    step_mm,
    unit_range,
    use_panels,
)

from fastrnn._cpu._recurrent_threads import blas_thread_functions

cnp.import_array()
fr_small_gemm_init()
load_scipy_blas()
for _set_fn, _get_fn in blas_thread_functions():
    fr_blas_register(_set_fn, _get_fn)


cdef void omp_steps(int steps, Py_ssize_t N, Py_ssize_t H, int G, const float* wt,
                    float* h, float* out, float* panels, int p, int nt) noexcept nogil:
    """Thread p of nt: its gate columns, every step (all of them when nt == 1)."""
    cdef Py_ssize_t u0, u1, c0, nc
    cdef int t
    unit_range(H, 16, nt, p, &u0, &u1)
    c0 = G * u0
    nc = G * (u1 - u0)
    if panels != NULL:
        pack_panels(H, nc, wt + c0, G * H, panels + H * c0)
    for t in range(steps):
        if panels != NULL:
            panel_mm(fr_small_gemm_isa, N, nc, H, h + (t & 1) * N * H, H, wt + c0, G * H,
                     panels + H * c0, <float> 0, out + c0, G * H)
        else:
            step_mm(fr_small_gemm_isa, N, nc, H, h + (t & 1) * N * H, H, wt + c0, G * H,
                    <float> 0, out + c0, G * H)
        if nt > 1:
            fr_barrier()


def step_gemm_seconds(Py_ssize_t N, Py_ssize_t H, int G, str strategy, int threads,
                      int steps=200):
    """Seconds per step of the recurrent GEMM under ``strategy`` (see the module docstring)."""
    if strategy not in ("serial", "blas", "omp"):
        raise ValueError(f"strategy: expected 'serial', 'blas' or 'omp', got {strategy!r}")
    if threads < 1 or steps < 1:
        raise ValueError("threads and steps must be >= 1")
    rng = np.random.default_rng(0)
    cdef cnp.ndarray w = rng.standard_normal((H, G * H)).astype(np.float32)  # W^T
    cdef cnp.ndarray h = rng.standard_normal((2, N, H)).astype(np.float32)
    cdef cnp.ndarray out = np.empty((N, G * H), np.float32)
    cdef cnp.ndarray pk = np.empty(H * G * H, np.float32)
    cdef float* pp = <float*> cnp.PyArray_DATA(pk) if use_panels(fr_small_gemm_isa, N, steps) else NULL
    cdef float* pw = <float*> cnp.PyArray_DATA(w)
    cdef float* ph = <float*> cnp.PyArray_DATA(h)
    cdef float* po = <float*> cnp.PyArray_DATA(out)
    cdef int saved[8]
    cdef int t, p, team
    cdef int nt = threads
    cdef int blas_n = threads if strategy == "blas" else 1
    cdef bint omp = strategy == "omp"
    start = time.perf_counter()
    with nogil:
        fr_blas_pin(blas_n, saved)
        if omp and nt > 1:
            with parallel(num_threads=nt):
                p = omp_get_thread_num()
                team = omp_get_num_threads()
                omp_steps(steps, N, H, G, pw, ph, po, pp, p, team)
        elif blas_n > 1:
            for t in range(steps):
                mm(False, False, N, G * H, H, <float> 1, ph + (t & 1) * N * H, H, pw, G * H,
                   <float> 0, po, G * H)
        else:
            omp_steps(steps, N, H, G, pw, ph, po, pp, 0, 1)
        fr_blas_restore(saved)
    return (time.perf_counter() - start) / steps
