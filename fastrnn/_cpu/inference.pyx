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
steps (no OpenMP region in a step, so nothing to oversubscribe).

``generate`` is the sampling loop of an embedding -> recurrent stack -> linear model (char-rnn's
``sample``) as one call: the draws, the embedding lookups, every layer's step and the head, on
fastrnn's threads (_inference.h), with the values of the stepped loop.
"""

cimport numpy as cnp
from libc.stdlib cimport free, malloc

from fastrnn._cpu._blas cimport floating, gemm, load_scipy_blas
from fastrnn._cpu._recurrent_cells cimport (
    FR_GRU,
    FR_LSTM,
    FR_RNN_RELU,
    FR_RNN_TANH,
    fr_cell_fwd_d,
    fr_cell_fwd_f,
)

cdef extern from "_inference.h":
    # small-batch products against the prepared weights, and the sampler (see the header)
    void fr_rows_f(int N, int K1, int K2, int M, const float* a1, const float* a2,
                   const float* wt, const float* bias, float* out) noexcept nogil
    void fr_rows_d(int N, int K1, int K2, int M, const double* a1, const double* a2,
                   const double* wt, const double* bias, double* out) noexcept nogil
    void fr_rows_f_acc(int N, int K1, int K2, int M, const float* a1, const float* a2,
                       const float* wt, const float* bias, int acc, float* out) noexcept nogil
    void fr_rows_d_acc(int N, int K1, int K2, int M, const double* a1, const double* a2,
                       const double* wt, const double* bias, int acc, double* out) noexcept nogil
    void fr_pack_f(const float* src, long ld, int K, int M, float* dst) noexcept nogil
    void fr_pack_d(const double* src, long ld, int K, int M, double* dst) noexcept nogil
    ctypedef struct fr_gen_layer_f:
        int cell, D, H
        const float* w_ih
        const float* w_hh
        const float* b1
        const float* b2
        float* h
        float* c
    ctypedef struct fr_gen_layer_d:
        int cell, D, H
        const double* w_ih
        const double* w_hh
        const double* b1
        const double* b2
        double* h
        double* c
    int fr_generate_f(int isa, int nthreads, int L, fr_gen_layer_f* layers, int V, int E,
                      const float* table, const float* head_w, const float* head_b,
                      const float* logits0, double temperature, const double* u, long length,
                      long* ids) noexcept nogil
    int fr_generate_d(int isa, int nthreads, int L, fr_gen_layer_d* layers, int V, int E,
                      const double* table, const double* head_w, const double* head_b,
                      const double* logits0, double temperature, const double* u, long length,
                      long* ids) noexcept nogil

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


cdef inline void rows_acc(int N, int K, int M, const floating* a, const floating* wt,
                          floating* out) noexcept nogil:
    """out (N, M) += a (N, K) wt, wt a (K, M) panel-packed matrix."""
    if floating is float:
        fr_rows_f_acc(N, K, 0, M, a, NULL, wt, NULL, 1, out)
    else:
        fr_rows_d_acc(N, K, 0, M, a, NULL, wt, NULL, 1, out)


cdef void _sequence_loop(
    int isa, int cell, Py_ssize_t T, Py_ssize_t N, Py_ssize_t H, const long* lengths,
    floating* gx, floating* gh, const floating* wt_h, const floating* b, const floating* b_hh,
    floating* y, floating* h, floating* c, floating* hn, floating* cn,
) noexcept nogil:
    """The time loop of a small-batch sequence: gx (T, N, G H) holds x W_ih^T; each step adds
    (LSTM, RNN) or sets apart (GRU: gh) h W_hh^T, runs the cell into hn/cn, and moves the rows
    still inside their sequence into y[t] and the state h, c (rows past their length keep their
    state and a zero output, as PackedSequence gives)."""
    cdef int G = 4 if cell == FR_LSTM else (3 if cell == FR_GRU else 1)
    cdef Py_ssize_t GH = G * H, t, n, j
    cdef floating* g
    for t in range(T):
        g = gx + t * N * GH
        if cell == FR_GRU:
            rows(<int> N, <int> H, 0, <int> GH, h, NULL, wt_h, NULL, gh)
        else:
            rows_acc(<int> N, <int> H, <int> GH, h, wt_h, g)
        if floating is float:
            fr_cell_fwd_f(isa, cell, N, g, gh, b, b_hh, h, c, hn, cn, NULL, H, H, 0, H)
        else:
            fr_cell_fwd_d(isa, cell, N, g, gh, b, b_hh, h, c, hn, cn, NULL, H, H, 0, H)
        for n in range(N):
            if lengths != NULL and t >= lengths[n]:
                continue
            for j in range(H):
                h[n * H + j] = hn[n * H + j]
                y[(t * N + n) * H + j] = hn[n * H + j]
            if c != NULL:
                for j in range(H):
                    c[n * H + j] = cn[n * H + j]


cdef void _sequence(
    floating kind, int isa, int cell, Py_ssize_t T, Py_ssize_t N, Py_ssize_t D, Py_ssize_t H,
    const long* lengths, const void* x, const void* w_ih, void* gx, void* gh, const void* wt_h,
    const void* b, const void* b_hh, void* y, void* h, void* c, void* hn, void* cn,
) noexcept nogil:
    """A small-batch sequence on buffers of the float type of ``kind``: x W_ih^T of every step
    in one GEMM into gx, then the time loop (_sequence_loop)."""
    cdef int G = 4 if cell == FR_LSTM else (3 if cell == FR_GRU else 1)
    gemm(False, True, <int> (T * N), <int> (G * H), <int> D, <floating> 1, <const floating*> x,
         <int> D, <const floating*> w_ih, <int> D, <floating> 0, <floating*> gx, <int> (G * H))
    _sequence_loop(isa, cell, T, N, H, lengths, <floating*> gx, <floating*> gh,
                   <const floating*> wt_h, <const floating*> b, <const floating*> b_hh,
                   <floating*> y, <floating*> h, <floating*> c, <floating*> hn, <floating*> cn)


import numpy as np

load_scipy_blas()  # SciPy's sgemm / dgemm for gemm (fastrnn/_cpu/_blas.pxd)

cnp.import_array()



cdef void _step(
    int isa, int cell, Py_ssize_t N, Py_ssize_t D, Py_ssize_t H, Py_ssize_t P,
    const floating* x, const floating* h, const floating* c,
    const floating* w_ih, const floating* w_hh, const floating* b, const floating* b_hh,
    const floating* w_hr, const floating* wt, floating* h_out, floating* c_out,
    floating* scratch,
) noexcept nogil:
    """One step of ``cell``. P is h's size (H, or the LSTM projection's size); wt is
    [W_ih^T; W_hh^T], (D + P, G H), packed in panels (the GRU's two parts apart). scratch holds 2 N G H (+ N H with a projection) elements.

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


def _panels(a):
    """A (K, M) matrix packed in panels (_inference.h) on _huge_empty memory."""
    src = np.ascontiguousarray(a)
    cdef Py_ssize_t K = src.shape[0], M = src.shape[1]
    out = _huge_empty((K, M), src.dtype)
    cdef cnp.ndarray s = src, d = out
    if src.dtype == np.float64:
        fr_pack_d(<double*> cnp.PyArray_DATA(s), M, <int> K, <int> M, <double*> cnp.PyArray_DATA(d))
    else:
        fr_pack_f(<float*> cnp.PyArray_DATA(s), M, <int> K, <int> M, <float*> cnp.PyArray_DATA(d))
    return out


def _huge_empty(shape, dtype):
    """An empty array for weights that every step streams through: from 256 KiB up, in memory
    the kernel is asked to back with transparent huge pages (madvise; where THP is off or not
    granted, ordinary pages), which keeps the whole matrix physically contiguous."""
    import mmap

    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    huge = 1 << 21
    if nbytes < (1 << 18) or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(shape, dtype)
    size = (nbytes + huge - 1) // huge * huge
    buf = mmap.mmap(-1, size + huge)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass
    base = np.frombuffer(buf, np.uint8)
    start = (-base.ctypes.data) % huge   # 2 MiB-aligned start: whole huge pages
    return base[start:start + nbytes].view(dtype).reshape(shape)


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
    cdef object wt                                 # [W_ih^T; W_hh^T] in panels
    cdef object wt_h                               # W_hh^T in panels, made on demand

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
        self.wt = _huge_empty((self.input_size + self.state_size, self.w_hh.shape[0]), self.dtype)
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
        self.wt_h = None  # W_hh^T's own panels, made again on demand
        # [W_ih^T; W_hh^T] packed in panels of columns (_inference.h); the GRU's two parts as
        # two matrices, since its cell takes x W_ih^T and h W_hh^T apart
        cdef Py_ssize_t D = self.input_size, P = self.state_size, M = self.w_hh.shape[0]
        natural = np.empty((D + P, M), self.dtype)
        natural[:D] = self.w_ih.T
        natural[D:] = self.w_hh.T
        cdef cnp.ndarray src = natural, dst = self.wt
        cdef char* sp = <char*> cnp.PyArray_DATA(src)
        cdef char* dp = <char*> cnp.PyArray_DATA(dst)
        cdef Py_ssize_t item = 8 if self.is_double else 4
        cdef Py_ssize_t k0, K, part
        for part in range(2 if self.cell == FR_GRU else 1):
            k0 = D if part else 0
            K = (P if part else D) if self.cell == FR_GRU else D + P
            if self.is_double:
                fr_pack_d(<double*> (sp + k0 * M * item), M, <int> K, <int> M,
                          <double*> (dp + k0 * M * item))
            else:
                fr_pack_f(<float*> (sp + k0 * M * item), M, <int> K, <int> M,
                          <float*> (dp + k0 * M * item))

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

    def _sequence(self, x, h0, c0, lengths):
        """``(y, hT[, cT])`` of a whole sequence through the prepared panels, at small batches
        (N <= SMALL_BATCH, no projection): x W_ih^T for all steps in one GEMM, then each step
        one pass over W_hh^T and the cell. None where it does not apply (another batch size,
        dtype or layout, a projection, lengths that are not an int64 array of N values in
        1..T): the caller runs the general forward, which also reports bad input."""
        if self.w_hr is not None or type(x) is not np.ndarray or type(h0) is not np.ndarray:
            return None
        cdef bint lstm = self.cell == FR_LSTM
        if lstm and type(c0) is not np.ndarray:
            return None
        cdef Py_ssize_t H = self.hidden_size, D = self.input_size
        if (x.ndim != 3 or x.dtype != self.dtype or not x.flags.c_contiguous
                or x.shape[2] != D or x.shape[0] == 0 or not 0 < x.shape[1] <= SMALL_BATCH):
            return None
        cdef Py_ssize_t T = x.shape[0], N = x.shape[1]
        for a, width in ((h0, H), (c0, H)) if lstm else ((h0, H),):
            if a.dtype != self.dtype or a.shape != (N, width) or not a.flags.c_contiguous:
                return None
        cdef cnp.ndarray lens = None
        if lengths is not None:
            if (type(lengths) is not np.ndarray or lengths.dtype != np.int64
                    or lengths.shape != (N,) or not lengths.flags.c_contiguous
                    or lengths.min() < 1 or lengths.max() > T):
                return None
            lens = lengths
        cdef int G = 4 if lstm else (3 if self.cell == FR_GRU else 1)
        cdef Py_ssize_t GH = G * H
        if self.wt_h is None:
            self.wt_h = self.wt[D:] if self.cell == FR_GRU else _panels(self.w_hh.T)
        gx = np.empty((T, N, GH), self.dtype)
        gh = np.empty((N, GH), self.dtype) if self.cell == FR_GRU else gx[0]
        y = np.zeros((T, N, H), self.dtype) if lens is not None else np.empty((T, N, H), self.dtype)
        h = np.array(h0, copy=True)
        c = np.array(c0, copy=True) if lstm else None
        hn, cn = np.empty((N, H), self.dtype), np.empty((N, H), self.dtype)
        cdef void* px = cnp.PyArray_DATA(<cnp.ndarray> x)
        cdef void* pwi = cnp.PyArray_DATA(<cnp.ndarray> self.w_ih)
        cdef void* pgx = cnp.PyArray_DATA(<cnp.ndarray> gx)
        cdef void* pgh = cnp.PyArray_DATA(<cnp.ndarray> gh)
        cdef void* pwh = cnp.PyArray_DATA(<cnp.ndarray> self.wt_h)
        cdef void* pb = cnp.PyArray_DATA(<cnp.ndarray> self.b)
        cdef void* bh = NULL if self.b_hh is None else cnp.PyArray_DATA(<cnp.ndarray> self.b_hh)
        cdef void* py = cnp.PyArray_DATA(<cnp.ndarray> y)
        cdef void* ph = cnp.PyArray_DATA(<cnp.ndarray> h)
        cdef void* cp = NULL if c is None else cnp.PyArray_DATA(<cnp.ndarray> c)
        cdef void* phn = cnp.PyArray_DATA(<cnp.ndarray> hn)
        cdef void* pcn = cnp.PyArray_DATA(<cnp.ndarray> cn)
        cdef const long* lp = NULL if lens is None else <const long*> cnp.PyArray_DATA(lens)
        cdef int cell = self.cell, isa = self.isa
        with nogil:
            if self.is_double:
                _sequence(<double> 0, isa, cell, T, N, D, H, lp, px, pwi, pgx, pgh, pwh, pb, bh,
                          py, ph, cp, phn, pcn)
            else:
                _sequence(<float> 0, isa, cell, T, N, D, H, lp, px, pwi, pgx, pgh, pwh, pb, bh,
                          py, ph, cp, phn, pcn)
        return (y, h, c) if lstm else (y, h)

    def __reduce__(self):
        raise TypeError("prepared layers are not pickled; pickle the weights and prepare again")


LSTM, GRU, RNN_TANH, RNN_RELU = FR_LSTM, FR_GRU, FR_RNN_TANH, FR_RNN_RELU


def generate(list layers, table, head_w, head_b, logits0, double temperature, u, int nthreads):
    """Sample ``len(u)`` tokens from an embedding -> recurrent stack -> linear model.

    ``layers``: (PreparedCell without projection, h (H,), c (H,) or None) from the first layer
    up, states updated in place to those after the last token; ``table`` (vocabulary, E) the
    embedding; ``head_w`` (V, H_last), ``head_b`` (V,) the output layer; ``logits0`` (V,) the
    logits of the first draw; ``u`` float64 uniforms in [0, 1), one per token. Each token is
    ``searchsorted(cumsum(p), u * p.sum())`` (at most V - 1) of ``p = softmax(logits /
    temperature)`` in float64, as the NumPy sampler draws it. -> int64 token ids."""
    cdef Py_ssize_t L = len(layers), s, n
    if L == 0:
        raise ValueError("layers: expected at least one layer")
    first = layers[0][0]
    dt = (<PreparedCell> first).dtype
    cdef bint dbl = dt == np.float64
    cdef Py_ssize_t E = (<PreparedCell> first).input_size
    table = _exact("table", table, dt, 2)
    if table.shape[1] != E:
        raise ValueError(f"table: expected {E} columns (the first layer's input size), "
                         f"got {table.shape[1]}")
    head_w = _exact("head_w", head_w, dt, 2)
    cdef Py_ssize_t V = head_w.shape[0]
    if V > table.shape[0]:
        raise ValueError(f"head_w: {V} outputs, but table embeds only {table.shape[0]} tokens")
    head_b = _exact("head_b", head_b, dt, 1)
    logits0 = _exact("logits0", logits0, dt, 1)
    if head_b.shape[0] != V or logits0.shape[0] != V:
        raise ValueError(f"head_b, logits0: expected {V} elements (head_w's rows)")
    u = _exact("u", u, np.float64, 1)
    if not temperature > 0:
        raise ValueError(f"temperature: expected a positive number, got {temperature}")
    cdef Py_ssize_t D = E
    cdef PreparedCell cell
    keep = []
    for item in layers:
        cell, h, c = item
        if cell.dtype != dt or cell.w_hr is not None:
            raise ValueError("layers: expected prepared layers of one dtype, without projection")
        if cell.input_size != D:
            raise ValueError(f"layers: a layer takes {cell.input_size} inputs, its input has {D}")
        if not (<object> h).flags.writeable:
            raise ValueError("layers: the states must be writeable")
        keep.append(_exact("h", h, dt, 1))
        if (<object> h).shape[0] != cell.hidden_size:
            raise ValueError(f"h: expected {cell.hidden_size} elements")
        if (cell.cell == FR_LSTM) != (c is not None):
            raise ValueError("c: exactly the LSTM layers carry a cell state")
        if c is not None:
            keep.append(_exact("c", c, dt, 1))
            if (<object> c).shape[0] != cell.hidden_size or not (<object> c).flags.writeable:
                raise ValueError(f"c: expected {cell.hidden_size} writeable elements")
        D = cell.hidden_size
    if head_w.shape[1] != D:
        raise ValueError(f"head_w: expected {D} columns (the last layer's size), got "
                         f"{head_w.shape[1]}")
    n = u.shape[0]
    ids = np.empty(n, np.int64)
    if n == 0:
        return ids
    cdef fr_gen_layer_f* lf = NULL
    cdef fr_gen_layer_d* ld = NULL
    cdef cnp.ndarray ua = u, ia = ids, ta = table, hwa = head_w, hba = head_b, la = logits0
    cdef int rc = 0, isa = (<PreparedCell> first).isa
    lf = <fr_gen_layer_f*> malloc(L * sizeof(fr_gen_layer_f))
    ld = <fr_gen_layer_d*> malloc(L * sizeof(fr_gen_layer_d))
    if lf == NULL or ld == NULL:
        free(lf); free(ld)
        raise MemoryError()
    for s in range(L):
        cell, h, c = layers[s]
        wi = cnp.PyArray_DATA(<cnp.ndarray> cell.w_ih)
        wh = cnp.PyArray_DATA(<cnp.ndarray> cell.w_hh)
        b1 = cnp.PyArray_DATA(<cnp.ndarray> cell.b)
        b2 = NULL if cell.b_hh is None else cnp.PyArray_DATA(<cnp.ndarray> cell.b_hh)
        hp = cnp.PyArray_DATA(<cnp.ndarray> h)
        cp = NULL if c is None else cnp.PyArray_DATA(<cnp.ndarray> c)
        lf[s].cell = ld[s].cell = cell.cell
        lf[s].D = ld[s].D = cell.input_size
        lf[s].H = ld[s].H = cell.hidden_size
        lf[s].w_ih, lf[s].w_hh = <float*> wi, <float*> wh
        lf[s].b1, lf[s].b2 = <float*> b1, <float*> b2
        lf[s].h, lf[s].c = <float*> hp, <float*> cp
        ld[s].w_ih, ld[s].w_hh = <double*> wi, <double*> wh
        ld[s].b1, ld[s].b2 = <double*> b1, <double*> b2
        ld[s].h, ld[s].c = <double*> hp, <double*> cp
    with nogil:
        if dbl:
            rc = fr_generate_d(isa, nthreads, <int> L, ld, <int> V, <int> E,
                               <double*> cnp.PyArray_DATA(ta), <double*> cnp.PyArray_DATA(hwa),
                               <double*> cnp.PyArray_DATA(hba), <double*> cnp.PyArray_DATA(la),
                               temperature, <double*> cnp.PyArray_DATA(ua), n,
                               <long*> cnp.PyArray_DATA(ia))
        else:
            rc = fr_generate_f(isa, nthreads, <int> L, lf, <int> V, <int> E,
                               <float*> cnp.PyArray_DATA(ta), <float*> cnp.PyArray_DATA(hwa),
                               <float*> cnp.PyArray_DATA(hba), <float*> cnp.PyArray_DATA(la),
                               temperature, <double*> cnp.PyArray_DATA(ua), n,
                               <long*> cnp.PyArray_DATA(ia))
    free(lf)
    free(ld)
    if rc != 0:
        raise MemoryError()
    return ids


cdef object _exact(str name, object a, object dtype, int ndim):
    """``a`` itself: a C-contiguous numpy.ndarray of ``dtype`` and ``ndim`` dimensions."""
    if type(a) is not np.ndarray:
        raise TypeError(f"{name}: expected a numpy.ndarray, got {_describe(a)}")
    if a.dtype != dtype or a.ndim != ndim:
        raise TypeError(f"{name}: expected a {ndim}-d {np.dtype(dtype)} array, got {_describe(a)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array")
    return a
