# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Prepared recurrent layers for inference on the CPU: one time step in one call.

A prepared layer keeps its own C-contiguous copy of the weights (the biases of the LSTM and the
RNN summed, as the kernels take them) and runs a step as two GEMMs (``x_t W_ih^T`` and
``h W_hh^T``, whose sum with the bias feeds the cell) plus one pass of the cell's pointwise
math, the LSTM projection as a third GEMM. Everything from the argument checks to the last
store is in this module: no Python between the caller and BLAS. The per-call checks are the
cheap ones (types, dtype, shapes, contiguity); the weights were validated once, by
fastrnn.inference, when the object was made. Scratch memory is allocated per call, so one
object may be stepped from several threads at once.

The cells are those of the training kernels (gate orders of PyTorch; sigmoid and tanh from
_recurrent_common.pxd, exact 0/1 where they saturate); BLAS picks its own threads for large
steps (no OpenMP region here, so nothing to oversubscribe).
"""

cimport numpy as cnp
from libc.stdlib cimport free, malloc

from fastrnn._cpu._blas cimport floating, gemm
from fastrnn._cpu._recurrent_cells cimport (
    FR_GRU,
    FR_LSTM,
    FR_RNN_RELU,
    FR_RNN_TANH,
    fr_cell_fwd_d,
    fr_cell_fwd_f,
)

cdef extern from *:
    """
    /* Small-batch products against the prepared, transposed weights wt (K1 + K2, M), row-major:
       out[n, :] = bias + a1[n, :] wt[:K1, :] + a2[n, :] wt[K1:, :]. Register-blocked: four rows
       of the batch times 32 output columns are accumulated in registers over all of K, so each
       element of wt is loaded once per four rows and the outputs are stored once; the fixed-size
       inner loops are vectorised by the compiler, and GCC's target_clones picks AVX-512, AVX2
       or baseline code at run time. Edges (fewer rows or columns) take the plain loop. */
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
    #define FR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
    #else
    #define FR_CLONES
    #endif
    #define FR_JB 32
    /* One row of the batch, columns [j0, j0 + jb): 128 columns at a time in registers (enough
       independent accumulators to cover the FMA latency), then the rest. */
    #define FR_JB1 128
    #define FR_ROW(T) fr_row_##T
    #define FR_DEFINE_ROW(T)                                                                 \
    static inline void fr_row_##T(int K1, int K2, int M, int j0, int jb, const T* a1r,      \
                                  const T* a2r, const T* wt, const T* bias, T* o) {          \
        for (int c0 = j0; c0 < j0 + jb; c0 += FR_JB1) {                                      \
            int cb = j0 + jb - c0 < FR_JB1 ? j0 + jb - c0 : FR_JB1;                          \
            T c[FR_JB1];                                                                     \
            if (cb == FR_JB1) {                                                              \
                for (int j = 0; j < FR_JB1; j++) c[j] = bias ? bias[c0 + j] : (T) 0;         \
                for (int k = 0; k < K1 + K2; k++) {                                          \
                    const T *restrict w = wt + (long) k * M + c0;                            \
                    T sr = k < K1 ? a1r[k] : a2r[k - K1];                                    \
                    for (int j = 0; j < FR_JB1; j++) c[j] += sr * w[j];                      \
                }                                                                            \
                for (int j = 0; j < FR_JB1; j++) o[c0 + j] = c[j];                           \
            } else {                                                                         \
                for (int j = 0; j < cb; j++) c[j] = bias ? bias[c0 + j] : (T) 0;             \
                for (int k = 0; k < K1 + K2; k++) {                                          \
                    const T *restrict w = wt + (long) k * M + c0;                            \
                    T sr = k < K1 ? a1r[k] : a2r[k - K1];                                    \
                    for (int j = 0; j < cb; j++) c[j] += sr * w[j];                          \
                }                                                                            \
                for (int j = 0; j < cb; j++) o[c0 + j] = c[j];                               \
            }                                                                                \
        }                                                                                    \
    }
    #define FR_DEFINE_ROWS(NAME, T)                                                          \
    FR_CLONES static void NAME(int N, int K1, int K2, int M, const T* a1, const T* a2,       \
                               const T* wt, const T* bias, T* out) {                         \
        for (int n0 = 0; n0 < N; n0 += 4) {                                                  \
            int nb = N - n0 < 4 ? N - n0 : 4;                                                \
            if (nb < 4) {                                                                    \
                for (int r = 0; r < nb; r++)                                                 \
                    FR_ROW(T)(K1, K2, M, 0, M, a1 + (long) (n0 + r) * K1,                    \
                              a2 + (long) (n0 + r) * K2, wt, bias, out + (long) (n0 + r) * M); \
                continue;                                                                    \
            }                                                                                \
            for (int j0 = 0; j0 < M; j0 += FR_JB) {                                          \
                int jb = M - j0 < FR_JB ? M - j0 : FR_JB;                                    \
                if (nb == 4 && jb == FR_JB) {                                                \
                    T c0[FR_JB], c1[FR_JB], c2[FR_JB], c3[FR_JB];                            \
                    for (int j = 0; j < FR_JB; j++)                                          \
                        c0[j] = c1[j] = c2[j] = c3[j] = bias ? bias[j0 + j] : (T) 0;         \
                    for (int part = 0; part < 2; part++) {                                   \
                        int K = part ? K2 : K1;                                              \
                        const T* a = part ? a2 : a1;                                         \
                        const T* wp = wt + (long) (part ? K1 : 0) * M + j0;                  \
                        for (int k = 0; k < K; k++) {                                        \
                            const T *restrict w = wp + (long) k * M;                         \
                            T s0 = a[n0 * K + k], s1 = a[(n0 + 1) * K + k];                  \
                            T s2 = a[(n0 + 2) * K + k], s3 = a[(n0 + 3) * K + k];            \
                            for (int j = 0; j < FR_JB; j++) {                                \
                                T v = w[j];                                                  \
                                c0[j] += s0 * v; c1[j] += s1 * v;                            \
                                c2[j] += s2 * v; c3[j] += s3 * v;                            \
                            }                                                                \
                        }                                                                    \
                    }                                                                        \
                    for (int j = 0; j < FR_JB; j++) {                                        \
                        out[n0 * M + j0 + j] = c0[j];                                        \
                        out[(n0 + 1) * M + j0 + j] = c1[j];                                  \
                        out[(n0 + 2) * M + j0 + j] = c2[j];                                  \
                        out[(n0 + 3) * M + j0 + j] = c3[j];                                  \
                    }                                                                        \
                } else {                                                                     \
                    for (int r = 0; r < nb; r++)                                             \
                        FR_ROW(T)(K1, K2, M, j0, jb, a1 + (long) (n0 + r) * K1,              \
                                  a2 + (long) (n0 + r) * K2, wt, bias, out + (long) (n0 + r) * M); \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
    }
    FR_DEFINE_ROW(float)
    FR_DEFINE_ROW(double)
    FR_DEFINE_ROWS(fr_rows_f, float)
    FR_DEFINE_ROWS(fr_rows_d, double)
    """
    void fr_rows_f(int N, int K1, int K2, int M, const float* a1, const float* a2,
                   const float* wt, const float* bias, float* out) noexcept nogil
    void fr_rows_d(int N, int K1, int K2, int M, const double* a1, const double* a2,
                   const double* wt, const double* bias, double* out) noexcept nogil

cdef enum:
    # Batches up to this size use the kernel above; larger ones BLAS (whose per-call packing
    # pays off once the weights are reused across enough rows).
    SMALL_BATCH = 8


cdef inline void rows(int N, int K1, int K2, int M, const floating* a1, const floating* a2,
                      const floating* wt, const floating* bias, floating* out) noexcept nogil:
    if floating is float:
        fr_rows_f(N, K1, K2, M, a1, a2, wt, bias, out)
    else:
        fr_rows_d(N, K1, K2, M, a1, a2, wt, bias, out)


import numpy as np

cnp.import_array()



cdef void _step(
    int isa, int cell, Py_ssize_t N, Py_ssize_t D, Py_ssize_t H, Py_ssize_t P,
    const floating* x, const floating* h, const floating* c,
    const floating* w_ih, const floating* w_hh, const floating* b, const floating* b_hh,
    const floating* w_hr, const floating* wt, floating* h_out, floating* c_out,
    floating* scratch,
) noexcept nogil:
    """One step of ``cell``. P is h's size (H, or the LSTM projection's size); wt is
    [W_ih^T; W_hh^T], (D + P, G H). scratch holds 2 N G H (+ N H with a projection) elements.

    The LSTM and the RNN take one pre-activation, ``x W_ih^T + h W_hh^T`` (gx); the GRU two,
    ``x W_ih^T`` (gx) and ``h W_hh^T`` (gh), since r scales only the second's n part. Small
    batches make them in one pass over wt, larger ones with BLAS. The pointwise math is the
    training engine's cell (_recurrent_cells.h: biases, gates, new states) on the natural
    layout (one block of all H units)."""
    cdef int G = 4 if cell == FR_LSTM else (3 if cell == FR_GRU else 1)
    cdef Py_ssize_t GH = G * H
    cdef floating* gx = scratch
    cdef floating* gh = scratch + N * GH
    cdef floating* m = scratch + 2 * N * GH          # o * tanh(c) before the projection
    cdef floating* hn = m if w_hr != NULL else h_out
    if cell == FR_GRU:
        if N <= SMALL_BATCH:
            rows(N, D, 0, GH, x, NULL, wt, NULL, gx)
            rows(N, P, 0, GH, h, NULL, wt + D * GH, NULL, gh)
        else:
            gemm(False, True, N, GH, D, <floating> 1, x, D, w_ih, D, <floating> 0, gx, GH)
            gemm(False, True, N, GH, P, <floating> 1, h, P, w_hh, P, <floating> 0, gh, GH)
    elif N <= SMALL_BATCH:
        rows(N, D, P, GH, x, h, wt, NULL, gx)
    else:
        gemm(False, True, N, GH, D, <floating> 1, x, D, w_ih, D, <floating> 0, gx, GH)
        gemm(False, True, N, GH, P, <floating> 1, h, P, w_hh, P, <floating> 1, gx, GH)
    if floating is float:
        fr_cell_fwd_f(isa, cell, N, gx, gh, b, b_hh, h, c, hn, c_out, NULL, H, H, 0, H)
    else:
        fr_cell_fwd_d(isa, cell, N, gx, gh, b, b_hh, h, c, hn, c_out, NULL, H, H, 0, H)
    if w_hr != NULL:
        gemm(False, True, N, P, H, <floating> 1, m, H, w_hr, H, <floating> 0, h_out, P)


cdef inline str _describe(object a):
    if isinstance(a, np.ndarray):
        return f"a {a.dtype} array of shape {a.shape}"
    return f"a {type(a).__name__}"


cdef class PreparedCell:
    """One prepared recurrent layer on the CPU (made by fastrnn.lstm_inference, gru_inference,
    rnn_inference; see fastrnn/inference.py for the public documentation)."""

    cdef readonly object dtype
    cdef readonly Py_ssize_t input_size, hidden_size, state_size
    cdef int cell, isa
    cdef bint is_double
    cdef object w_ih, w_hh, b, b_hh, w_hr          # the private copies
    cdef object wt                                 # [W_ih^T; W_hh^T], (D + P, G H)

    def __init__(self, int cell, w_ih, w_hh, b, b_hh, w_hr):
        from fastrnn._cpu.recurrent import simd_level

        self.cell = cell
        self.isa = simd_level()  # the instruction set of the engine's cells (FASTRNN_SIMD)
        self.dtype = w_ih.dtype
        self.is_double = w_ih.dtype == np.float64
        self.w_ih = np.array(w_ih, order="C", copy=True)
        self.w_hh = np.array(w_hh, order="C", copy=True)
        self.b = np.array(b, order="C", copy=True)
        self.b_hh = None if b_hh is None else np.array(b_hh, order="C", copy=True)
        self.w_hr = None if w_hr is None else np.array(w_hr, order="C", copy=True)
        self.input_size = self.w_ih.shape[1]
        self.hidden_size = self.w_hh.shape[0] // (4 if cell == FR_LSTM else
                                                  (3 if cell == FR_GRU else 1))
        self.state_size = self.w_hh.shape[1]
        self.wt = np.empty((self.input_size + self.state_size, self.w_hh.shape[0]), self.dtype)
        self._transpose_weights()

    def _copy_from(self, w_ih, w_hh, b, b_hh, w_hr):
        """New weights of the same shapes (validated by the caller) into the private copies."""
        np.copyto(self.w_ih, w_ih)
        np.copyto(self.w_hh, w_hh)
        np.copyto(self.b, b)
        if b_hh is not None:
            np.copyto(self.b_hh, b_hh)
        if w_hr is not None:
            np.copyto(self.w_hr, w_hr)
        self._transpose_weights()

    def _transpose_weights(self):
        self.wt[: self.input_size] = self.w_ih.T
        self.wt[self.input_size :] = self.w_hh.T

    def _weights(self):
        return self.w_ih, self.w_hh, self.b, self.b_hh, self.w_hr

    cdef cnp.ndarray _checked(self, str name, object a, Py_ssize_t N, Py_ssize_t width):
        cdef cnp.ndarray arr
        if type(a) is not np.ndarray:
            raise TypeError(f"{name}: expected a numpy.ndarray, got {_describe(a)}")
        arr = <cnp.ndarray> a
        if arr.dtype != self.dtype:
            raise TypeError(f"{name}: expected dtype {self.dtype} (the prepared weights'), "
                            f"got {arr.dtype}")
        if arr.ndim != 2 or (N >= 0 and arr.shape[0] != N) or arr.shape[1] != width:
            want = f"({'N' if N < 0 else N}, {width})"
            raise ValueError(f"{name}: expected shape {want}, got {(<object> a).shape}")
        if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
            raise ValueError(f"{name}: expected a C-contiguous array")
        return arr

    cdef object _out(self, str name, object given, Py_ssize_t N, Py_ssize_t width):
        if given is None:
            return np.empty((N, width), self.dtype)
        out = self._checked(name, given, N, width)
        if not (<cnp.ndarray> out).flags.writeable:
            raise ValueError(f"{name}: expected a writeable array")
        return out

    def step(self, x_t, h, c=None, *, out=None):
        """One time step. LSTM: ``step(x_t, h, c) -> (h, c)``; GRU and RNN:
        ``step(x_t, h) -> h``. ``out`` receives the results (a pair for the LSTM; the input
        state arrays themselves are allowed)."""
        cdef Py_ssize_t N, H = self.hidden_size, P = self.state_size, D = self.input_size
        cdef cnp.ndarray xa = self._checked("x_t", x_t, -1, D)
        N = xa.shape[0]
        cdef cnp.ndarray ha = self._checked("h", h, N, P)
        cdef cnp.ndarray ca = None
        cdef cnp.ndarray ho, co = None
        cdef bint lstm = self.cell == FR_LSTM
        if lstm:
            if c is None:
                raise TypeError("c: the LSTM step needs the cell state c")
            ca = self._checked("c", c, N, H)
            if out is None:
                ho, co = self._out("out[0]", None, N, P), self._out("out[1]", None, N, H)
            else:
                if not isinstance(out, tuple) or len(out) != 2:
                    raise TypeError("out: expected a pair (h, c) of arrays for the LSTM")
                ho, co = self._out("out[0]", out[0], N, P), self._out("out[1]", out[1], N, H)
        else:
            if c is not None:
                raise TypeError("c: only the LSTM has a cell state")
            ho = self._out("out", out, N, P)
        if N == 0:
            return (ho, co) if lstm else ho
        cdef int G = 4 if lstm else (3 if self.cell == FR_GRU else 1)
        cdef Py_ssize_t need = 2 * N * G * H + (N * H if self.w_hr is not None else 0)
        cdef void* scratch = malloc(need * (8 if self.is_double else 4))
        if scratch == NULL:
            raise MemoryError()
        cdef cnp.ndarray wi = self.w_ih, wh = self.w_hh, bb = self.b, wt = self.wt
        cdef void* bh = NULL if self.b_hh is None else cnp.PyArray_DATA(<cnp.ndarray> self.b_hh)
        cdef void* wr = NULL if self.w_hr is None else cnp.PyArray_DATA(<cnp.ndarray> self.w_hr)
        cdef void* cp = NULL if ca is None else cnp.PyArray_DATA(ca)
        cdef void* cop = NULL if co is None else cnp.PyArray_DATA(co)
        cdef int cell = self.cell
        with nogil:
            if self.is_double:
                _step[double](self.isa, cell, N, D, H, P, <double*> cnp.PyArray_DATA(xa),
                              <double*> cnp.PyArray_DATA(ha), <double*> cp,
                              <double*> cnp.PyArray_DATA(wi), <double*> cnp.PyArray_DATA(wh),
                              <double*> cnp.PyArray_DATA(bb), <double*> bh, <double*> wr,
                              <double*> cnp.PyArray_DATA(wt),
                              <double*> cnp.PyArray_DATA(ho), <double*> cop, <double*> scratch)
            else:
                _step[float](self.isa, cell, N, D, H, P, <float*> cnp.PyArray_DATA(xa),
                             <float*> cnp.PyArray_DATA(ha), <float*> cp,
                             <float*> cnp.PyArray_DATA(wi), <float*> cnp.PyArray_DATA(wh),
                             <float*> cnp.PyArray_DATA(bb), <float*> bh, <float*> wr,
                             <float*> cnp.PyArray_DATA(wt),
                             <float*> cnp.PyArray_DATA(ho), <float*> cop, <float*> scratch)
        free(scratch)
        return (ho, co) if lstm else ho

    def __reduce__(self):
        raise TypeError("prepared layers are not pickled; pickle the weights and prepare again")


LSTM, GRU, RNN_TANH, RNN_RELU = FR_LSTM, FR_GRU, FR_RNN_TANH, FR_RNN_RELU
