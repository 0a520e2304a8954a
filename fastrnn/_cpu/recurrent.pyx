# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# distutils: extra_compile_args = -fno-trapping-math --param=vect-max-version-for-alias-checks=200
"""The recurrent engine on the CPU: one time-loop driver for every recurrent cell.

LSTM (with or without a projection), GRU and the Elman RNN (tanh, relu) share everything here:
the threading plan, weight layout and packing, buffer pools, variable lengths, the per-step
GEMMs and the whole-sequence GEMMs. A cell is its pointwise math and its gate count
(_recurrent_cell_math.h, written once over the float type; _recurrent_cells.h compiles it for
float32/float64 and AVX-512/AVX2/portable). The steps cited are the references' (L*, G*, R*
in fastrnn/reference/). fastrnn.lstm_forward etc. validate before calling here; these
functions trust their input except for copying non-contiguous arrays.

How a call runs (everything from the first GEMM to the last inside one ``with nogil`` block):

* Rows. The batch is ordered by length once per call (longest first) and the sequences are
  packed time-major, PackedSequence-style: step t owns the rows [off[t], off[t] + na[t]) of
  every per-step array, its na[t] active sequences. A sequence that has ended drops out of the
  step's GEMM and pointwise work, and of the whole-sequence GEMMs. Without lengths the packing
  is the identity (off[t] = t N, na[t] = N) and nothing is copied.
* States. ``hs`` holds h0 (N rows) then each step's new h (na[t] rows): the state a step reads
  is the first na[t] rows of the previous block, contiguous because the batch is sorted. c is
  kept the same way (a two-block ring when nothing is saved for backward).
* Threads. A batch with enough sequences per thread (SPLIT_ROWS_*) is split by sequences:
  each OpenMP thread runs the whole time loop of its own rows (contiguous in the sorted order,
  balanced by their steps), with no barrier per step and nothing read from another thread's
  steps; the weights' transposes and panels are shared out first, one barrier. Smaller batches
  split by hidden units: the weights' gate rows are permuted once per call into the blocked
  layout (_recurrent_common.pxd, one block per thread), so thread p owns hidden units [u0, u1)
  and gate rows [G u0, G u1): it runs its columns of the step's recurrent GEMM, then the
  pointwise pass of its units, then one barrier per step (a projection adds a barrier and a
  GEMM h_t = r_t W_hr^T split by output columns). Small problems run the time loop on one
  thread (MIN_PARALLEL_WORK) and split only the whole-sequence GEMMs.
* GEMMs. The step GEMMs read the recurrent weights from panels packed once per call (float32,
  AVX-512 or AVX2) or go to single-threaded BLAS (pinned in C, see _recurrent_threads.py); the input
  projection of all steps (L1, G1, R1) and the weight/input gradients (LB5, GB5, RB4) are
  whole-sequence GEMMs split over the threads, except that with panels, batches of
  FUSE_INPUT_MIN_ROWS rows or more and weights that stay in L2 (FUSE_INPUT_MAX_BYTES) the
  input projection runs step by step inside the time loop, from W_ih's panels, right before
  the step's own GEMM. Token inputs (lookup) start each step's GEMM from a table row instead.

Measurements behind these choices: benchmarks/NOTES-cpu.md.
"""

cimport numpy as cnp
from libc.string cimport memcpy
import numpy as np
from cython.parallel cimport parallel

from fastrnn._cpu._blas cimport floating, load_scipy_blas
from fastrnn._cpu._openmp cimport omp_get_num_threads, omp_get_thread_num
from fastrnn._cpu._recurrent_common cimport (
    BLOCK,
    fr_barrier,
    fr_blas_pin_one,
    fr_blas_register,
    fr_blas_restore,
    fr_panel_sgemm_rows,
    fr_seq_fits,
    fr_seq_fits_dw,
    fr_seq_sgemm,
    fr_small_gemm_init,
    fr_small_gemm_isa,
    from_blocked,
    mm,
    natural_row,
    pack_panels,
    panel_mm,
    split,
    step_mm,
    to_blocked,
    transpose_rows,
    unit_range,
)

from fastrnn._cpu._buffers import empty as output
from fastrnn._cpu._recurrent_threads import (
    as_c_array,
    blas_thread_functions,
    fallback_limit,
    give_scratch,
    SIMD_LEVELS,
    sequence_threads,
    simd_request,
    take_saved,
    take_scratch,
    team_size,
)
from fastrnn.context import Context

cnp.import_array()
fr_small_gemm_init()
load_scipy_blas()
for _set_fn, _get_fn in blas_thread_functions():
    fr_blas_register(_set_fn, _get_fn)

from fastrnn._cpu._recurrent_cells cimport (
    FR_GRU,
    FR_LSTM,
    FR_RNN_RELU,
    FR_RNN_TANH,
    fr_cell_bwd_d,
    fr_cell_bwd_f,
    fr_cell_fwd_d,
    fr_cell_fwd_f,
    fr_activations_f,
    fr_isa_supported,
)

# The input projection x W_ih^T computed step by step inside the time loop from packed panels
# (float32, where the step GEMMs use panels) for batches of at least this many rows,
# instead of one whole-sequence GEMM before it: each step's gates are then written just before
# the step reads them. Measured (NOTES-cpu.md): 2-12% off the forward at N = 32, neutral at 20,
# 3-12% slower at 16 (fewer row tiles share each panel chunk in L1). 0 turns it off.
FUSE_INPUT_MIN_ROWS = 32
# ... and only while the weights each step streams, W_ih and W_hh (their panels), take at most
# this many bytes: beyond it they no longer stay in L2 from one step to the next, and the
# projection first is faster (2 threads, forward, first/fuse: 1.1 MB 1.00-1.02, 1.5 MB
# 0.95-0.99, 2 MB 0.87-0.91, 8 MB 0.91-0.96; NOTES-cpu.md).
FUSE_INPUT_MAX_BYTES = 5 << 18

# The time loop is split by sequences (each thread runs its own rows' steps, no barrier per
# step) instead of by hidden units (a barrier per step, the h_t of every thread read by every
# thread) when every thread gets at least SPLIT_ROWS_MIN sequences, and either the weights each
# step streams (W_hh^T, and W_ih^T when the input projection runs per step) fit in
# SPLIT_ROWS_WEIGHT_BYTES (each thread streams all of them, from its own L2) or every thread
# gets SPLIT_ROWS_MANY sequences to share each pass over them. Measured: benchmarks/NOTES-cpu.md.
# SPLIT_ROWS_MIN = 0 turns it off.
SPLIT_ROWS_MIN = 4
# The backward's whole-sequence GEMMs (dx, dW_ih, dW_hh) on fastrnn's kernels (fr_seq_sgemm,
# AVX-512 or AVX2) where their operands fit (fr_seq_fits), else on BLAS; False: BLAS.
SEQUENCE_GEMMS_OWN = True
SPLIT_ROWS_MANY = 16
SPLIT_ROWS_WEIGHT_BYTES = 1 << 20

# cell -> gate rows per hidden unit in the weights
_GATES = {FR_LSTM: 4, FR_GRU: 3, FR_RNN_TANH: 1, FR_RNN_RELU: 1}


_best_isa = max(i for i in (0, 1, 2) if fr_isa_supported(i))


def simd_level():
    """The cells' instruction set for this call (0 portable, 1 AVX2, 2 AVX-512): the one
    FASTRNN_SIMD forces (fastrnn._cpu._recurrent_threads; ValueError when this CPU does not run
    it), else the best this CPU runs."""
    requested = simd_request()
    if requested is None:
        return _best_isa
    if not fr_isa_supported(requested):
        name = {v: k for k, v in SIMD_LEVELS.items()}[requested]
        raise ValueError(f"FASTRNN_SIMD: this CPU does not run the {name} instruction set")
    return requested


def isa_supported(int isa):
    """Whether this CPU runs the cells' variant ``isa`` (0 portable, 1 AVX2, 2 AVX-512)."""
    return bool(fr_isa_supported(isa))


def sigmoid_tanh_float32(x, int isa=0):
    """The float32 cells' sigmoid(x) and tanh(x) for an array x, computed by the variant
    ``isa`` (0 portable, 1 AVX2, 2 AVX-512; one this CPU runs): for tests of their accuracy and
    saturation."""
    if not fr_isa_supported(isa):
        raise ValueError(f"isa: this CPU does not run variant {isa}")
    cdef cnp.ndarray s = np.array(x, dtype=np.float32, order="C", ndmin=1)
    cdef cnp.ndarray t = s.copy()
    fr_activations_f(isa, 0, <float*> cnp.PyArray_DATA(s), s.size)
    fr_activations_f(isa, 1, <float*> cnp.PyArray_DATA(t), t.size)
    return s, t


# ------------------------------------------------------------------------------------------------
# the plan of one call: cell, sizes, threads, the packed rows of each step
# ------------------------------------------------------------------------------------------------


cdef struct Plan:
    int cell            # FR_LSTM, FR_GRU, FR_RNN_TANH, FR_RNN_RELU
    int G               # gate rows per hidden unit
    int isa             # the cells' instruction set
    int gemm            # float32: the level of fastrnn's GEMM kernels (2 AVX-512, 1 AVX2), 0 none
    bint fast           # gemm > 0
    bint proj           # LSTM with a projection
    bint use_t          # step GEMM from W_hh^T (forward)
    bint panels         # step GEMMs from packed panels (float32 fast only)
    bint fuse_x         # the input projection inside the time loop, per step, from panels
    bint lookup         # the input is token ids: the input projection is a row of a table
    bint seq_own        # the backward's whole-sequence GEMMs on our kernels (float32 fast)
    int nt              # threads in the time loop (1: serial time loop)
    bint by_rows        # the time loop split by sequences (each thread its own rows)
    int seq_threads     # threads for the whole-sequence GEMMs of a serial time loop
    Py_ssize_t T, N, D, H, P, R, bs
    const long long* off    # (T,) first packed row of step t
    const long long* na     # (T,) active rows of step t
    const long long* hrow   # (T+1,) first row in hs of the state before step t
    const long long* crow   # (T+1,) the same in cs
    const long long* rsplit # (nt+1,) by_rows: group q owns the sorted rows [rsplit[q], rsplit[q+1])
    # lookup: packed row r's input projection is row tok[r] of table = E W_ih^T (V, GH); the
    # backward sums the rows' gate gradients by token into dtab (V, GH)
    Py_ssize_t V
    const long long* tok    # (R,) token of each packed row
    void* table             # (V, GH) forward, filled by fwd_run
    void* dtab              # (V, GH) backward scratch


cdef inline void columns_product(
    const Plan* pl, Py_ssize_t m, Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t K,
    const floating* a, Py_ssize_t lda,   # IN  (m, K)
    const floating* b, Py_ssize_t ldb,   # IN  (K, >= c1) row-major
    const floating* panels,              # IN  b's columns packed (pack_panels), when pl.panels
    floating beta,
    floating* out, Py_ssize_t ldo,       # INOUT (m, >= c1): columns c0..c1 = a b + beta out
) noexcept nogil:
    """A per-step GEMM of the time loop, output columns c0..c1: from packed panels or the
    small-batch kernel (float32, AVX-512 or AVX2), else single-threaded BLAS."""
    if m <= 0 or c1 <= c0:
        return
    if floating is float:
        if pl.panels:
            panel_mm(pl.gemm, m, c1 - c0, K, a, lda, b + c0, ldb, panels + K * c0, beta,
                     out + c0, ldo)
            return
        if pl.fast:
            step_mm(pl.gemm, m, c1 - c0, K, a, lda, b + c0, ldb, beta, out + c0, ldo)
            return
    mm(False, False, m, c1 - c0, K, <floating> 1, a, lda, b + c0, ldb, beta, out + c0, ldo)


cdef inline void step_product(
    const Plan* pl, Py_ssize_t m, Py_ssize_t c0, Py_ssize_t c1,
    const floating* h,        # IN  (m, P) states
    const floating* w,        # IN  (GH, P) the recurrent weights (blocked gate rows)
    const floating* wt,       # IN  (P, GH) their transpose, when use_t
    const floating* panels,   # IN  wt's columns packed, when pl.panels
    floating beta,
    floating* out,            # INOUT (m, GH): columns c0..c1 = h W[c0:c1]^T + beta out
) noexcept nogil:
    """The recurrent GEMM of one step (L2, G2, R2). From W^T (stored once per call) it is the
    plain NN product, about twice as fast in OpenBLAS for small batches; calls too short to
    repay the transposition use W as it is."""
    cdef Py_ssize_t GH = pl.G * pl.H, K = pl.P
    if pl.use_t:
        columns_product(pl, m, c0, c1, K, h, K, wt, GH, panels, beta, out, GH)
    elif m > 0 and c1 > c0:
        mm(False, True, m, c1 - c0, K, <floating> 1, h, K, w + c0 * K, K, beta, out + c0, GH)


cdef inline void cell_fwd(
    const Plan* pl, Py_ssize_t rows, floating* g, const floating* hw, const floating* b1,
    const floating* b2, const floating* hp, const floating* cp, floating* hn, floating* cn,
    floating* sv, Py_ssize_t u0, Py_ssize_t u1,
) noexcept nogil:
    if floating is float:
        fr_cell_fwd_f(pl.isa, pl.cell, rows, g, hw, b1, b2, hp, cp, hn, cn, sv, pl.H, pl.bs, u0,
                      u1)
    else:
        fr_cell_fwd_d(pl.isa, pl.cell, rows, g, hw, b1, b2, hp, cp, hn, cn, sv, pl.H, pl.bs, u0,
                      u1)


cdef inline void cell_bwd(
    const Plan* pl, Py_ssize_t rows, const floating* acts, const floating* cp,
    const floating* cn, const floating* hp, const floating* dyt, floating* dh, floating* dc,
    floating* dax, floating* dah, Py_ssize_t u0, Py_ssize_t u1,
) noexcept nogil:
    if floating is float:
        fr_cell_bwd_f(pl.isa, pl.cell, rows, acts, cp, cn, hp, dyt, dh, dc, dax, dah, pl.H,
                      pl.bs, u0, u1)
    else:
        fr_cell_bwd_d(pl.isa, pl.cell, rows, acts, cp, cn, hp, dyt, dh, dc, dax, dah, pl.H,
                      pl.bs, u0, u1)


cdef inline void out_columns(
    const Plan* pl, int nt, int p, Py_ssize_t* c0, Py_ssize_t* c1
) noexcept nogil:
    """Thread p's columns of the state h: its hidden units, or with a projection its share of
    the P outputs (in blocks of BLOCK)."""
    if pl.proj:
        unit_range(pl.P, BLOCK, nt, p, c0, c1)
    else:
        unit_range(pl.H, pl.bs, nt, p, c0, c1)


cdef inline void panel_columns(
    Py_ssize_t n, int nt, int p, Py_ssize_t* c0, Py_ssize_t* c1
) noexcept nogil:
    """Thread p's share of n columns, in whole 32-column panels (for packing them)."""
    cdef Py_ssize_t a, b
    split((n + 31) // 32, nt, p, &a, &b)
    c0[0] = min(n, a * 32)
    c1[0] = min(n, b * 32)


cdef inline Py_ssize_t group_rows(const Plan* pl, Py_ssize_t q, Py_ssize_t t) noexcept nogil:
    """by_rows: the active rows of group q at step t (the batch is sorted by length, so the
    active rows of a step are its first na[t])."""
    cdef Py_ssize_t n0 = pl.rsplit[q], n1 = pl.rsplit[q + 1]
    return max(<Py_ssize_t> 0, min(n1, <Py_ssize_t> pl.na[t]) - n0)


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------


cdef inline void fwd_step(
    const Plan* pl, Py_ssize_t t, Py_ssize_t n0, Py_ssize_t m, Py_ssize_t u0, Py_ssize_t u1,
    const floating* x, const floating* w_hh, const floating* b1, const floating* b2,
    floating* gates, floating* hw, floating* sv, floating* hs, floating* cs, floating* rs,
    const floating* w_hh_t, const floating* panels, const floating* w_ih_t,
    const floating* panels_x,
) noexcept nogil:
    """Step t of the sorted rows [n0, n0 + m) and hidden units [u0, u1) (arguments as
    fwd_thread): the gates' columns of those units, then their cell. With a projection r_t is
    left in rs; the caller runs h_t = r_t W_hr^T."""
    cdef Py_ssize_t G = pl.G, H = pl.H, P = pl.P, D = pl.D, GH = pl.G * pl.H
    cdef Py_ssize_t r0 = pl.off[t] + n0
    cdef floating* g = gates + r0 * GH
    cdef const floating* hp = hs + (pl.hrow[t] + n0) * P
    cdef floating* hn = hs + (pl.hrow[t + 1] + n0) * P
    cdef const floating* tab
    cdef Py_ssize_t i
    cdef bint looked_up = False  # L1 and L2 of an LSTM / RNN step in one GEMM
    if pl.lookup:
        # L1 / G1 / R1 of token inputs: each row's projection is its token's row of the table,
        # the start of the step's GEMM where the columns are whole panels, else copied first
        tab = <const floating*> pl.table
        if (floating is float and pl.panels and pl.cell != FR_GRU and (G * u0) % 32 == 0
                and (G * (u1 - u0)) % 32 == 0):
            fr_panel_sgemm_rows(pl.gemm, m, G * (u1 - u0) // 32, P, hp, P,
                                panels + P * G * u0, tab + G * u0, pl.tok + r0, GH, g + G * u0,
                                GH)
            looked_up = True
        else:
            for i in range(m):
                memcpy(g + i * GH + G * u0, tab + pl.tok[r0 + i] * GH + G * u0,
                       G * (u1 - u0) * sizeof(floating))
    elif pl.fuse_x:
        # L1 / G1 / R1 of this step: written just before the step's own GEMM adds to it and its
        # cell reads it, so the gates stay in cache
        columns_product(pl, m, G * u0, G * u1, D, x + r0 * D, D, w_ih_t, GH, panels_x, 0, g, GH)
    if pl.cell == FR_GRU:
        # G2: the recurrent projection kept apart (n multiplies it by r), G3-G4.
        step_product(pl, m, G * u0, G * u1, hp, w_hh, w_hh_t, panels, 0, hw + n0 * GH)
        cell_fwd(pl, m, g, hw + n0 * GH, b1, b2, hp, <floating*> NULL, hn, <floating*> NULL,
                 sv + r0 * 4 * H if sv != NULL else <floating*> NULL, u0, u1)
    elif pl.cell == FR_LSTM:
        # L2: the recurrent projection added onto L1's, then L3-L4.
        if not looked_up:
            step_product(pl, m, G * u0, G * u1, hp, w_hh, w_hh_t, panels, 1, g)
        cell_fwd(pl, m, g, <floating*> NULL, b1, <floating*> NULL, hp, cs + (pl.crow[t] + n0) * H,
                 rs + r0 * H if pl.proj else hn, cs + (pl.crow[t + 1] + n0) * H,
                 <floating*> NULL, u0, u1)
    else:
        # R2: the recurrent projection added onto R1's, then R3.
        if not looked_up:
            step_product(pl, m, G * u0, G * u1, hp, w_hh, w_hh_t, panels, 1, g)
        cell_fwd(pl, m, g, <floating*> NULL, b1, <floating*> NULL, hp, <floating*> NULL, hn,
                 <floating*> NULL, <floating*> NULL, u0, u1)


cdef void fwd_thread(
    const Plan* pl, int p, int nt, bint whole,
    const floating* x,        # IN  (R, D) packed
    const floating* w_ih,     # IN  (GH, D) blocked
    const floating* w_hh,     # IN  (GH, P) blocked
    const floating* w_hr,     # IN  (P, H) or NULL
    const floating* b1,       # IN  (GH,) blocked (GRU: b_ih)
    const floating* b2,       # IN  (GH,) blocked GRU b_hh, else unused
    floating* gates,          # OUT (R, GH) pre-activations -> LSTM/RNN activations
    floating* hw,             # scratch (N, GH) GRU's recurrent pre-activations of one step
    floating* sv,             # OUT (R, 4H) GRU's saved r, z, n, hn, or NULL
    floating* hs,             # INOUT (N + R, P) h0, then each step's h
    floating* cs,             # INOUT LSTM c: like hs (or a ring of 2 blocks), H features
    floating* rs,             # OUT (R, H) r = o tanh(c) before the projection, or NULL
    floating* w_hh_t,         # scratch (P, GH) W_hh^T when use_t
    floating* panels,         # scratch (P * GH) its panels when pl.panels
    floating* w_ih_t,         # scratch (D, GH) W_ih^T when fuse_x
    floating* panels_x,       # scratch (D * GH) its panels when fuse_x
) noexcept nogil:
    """Thread p's share of the forward pass (all of it when nt == 1)."""
    cdef Py_ssize_t u0, u1, o0, o1, t, m, r0
    cdef Py_ssize_t G = pl.G, H = pl.H, P = pl.P, GH = pl.G * pl.H
    unit_range(H, pl.bs, nt, p, &u0, &u1)
    out_columns(pl, nt, p, &o0, &o1)
    if pl.use_t:  # this thread's gate columns of W_hh^T (only it reads them: no barrier)
        transpose_rows(w_hh, GH, P, G * u0, G * u1, w_hh_t)
        if floating is float:
            if pl.panels:
                pack_panels(P, G * (u1 - u0), w_hh_t + G * u0, GH, panels + P * G * u0)
            if pl.fuse_x:  # and of W_ih^T, for the per-step input projection
                transpose_rows(w_ih, GH, pl.D, G * u0, G * u1, w_ih_t)
                pack_panels(pl.D, G * (u1 - u0), w_ih_t + G * u0, GH, panels_x + pl.D * G * u0)
    # L1 / G1 / R1: the input projection of all steps, this thread's gate columns, one GEMM
    # (unless it runs inside the time loop).
    if whole and not pl.fuse_x and not pl.lookup:  # else fwd_run has done it, split by rows
        mm(False, True, pl.R, G * (u1 - u0), pl.D, <floating> 1, x, pl.D, w_ih + G * u0 * pl.D,
           pl.D, <floating> 0, gates + G * u0, GH)
    for t in range(pl.T):
        m = pl.na[t]
        if m == 0:
            break
        fwd_step(pl, t, 0, m, u0, u1, x, w_hh, b1, b2, gates, hw, sv, hs, cs, rs, w_hh_t,
                 panels, w_ih_t, panels_x)
        if pl.proj:
            # L4p: h_t = r_t W_hr^T needs every unit of r_t; this thread's output columns.
            fr_barrier()
            r0 = pl.off[t]
            mm(False, True, m, o1 - o0, H, <floating> 1, rs + r0 * H, H, w_hr + o0 * H, H,
               <floating> 0, hs + pl.hrow[t + 1] * P + o0, P)
        # Every thread's part of h_t is written before any thread's next step reads it.
        fr_barrier()


cdef void fwd_rows_thread(
    const Plan* pl, int p, int nt,
    const floating* x, const floating* w_ih, const floating* w_hh, const floating* w_hr,
    const floating* b1, const floating* b2, floating* gates, floating* hw, floating* sv,
    floating* hs, floating* cs, floating* rs, floating* w_hh_t, floating* panels,
    floating* w_ih_t, floating* panels_x,
) noexcept nogil:
    """Thread p's share of a forward split by sequences (pl.by_rows; arguments as fwd_thread):
    the weights' transposes and panels (and the input projection) shared out by columns (rows),
    one barrier, then each of the thread's row groups runs its whole time loop alone: its
    sequences depend on nothing the other threads compute."""
    cdef Py_ssize_t c0, c1, t, m, r0, q, n0
    cdef Py_ssize_t H = pl.H, P = pl.P, D = pl.D, GH = pl.G * pl.H
    panel_columns(GH, nt, p, &c0, &c1)
    if pl.use_t:
        transpose_rows(w_hh, GH, P, c0, c1, w_hh_t)
        if floating is float:
            if pl.panels:
                pack_panels(P, c1 - c0, w_hh_t + c0, GH, panels + P * c0)
            if pl.fuse_x:
                transpose_rows(w_ih, GH, D, c0, c1, w_ih_t)
                pack_panels(D, c1 - c0, w_ih_t + c0, GH, panels_x + D * c0)
    if not pl.fuse_x and not pl.lookup:  # L1 / G1 / R1 of all steps, split by rows
        project_rows(pl, p, nt, x, w_ih, gates)
    fr_barrier()
    q = p
    while q < pl.nt:
        n0 = pl.rsplit[q]
        for t in range(pl.T):
            m = group_rows(pl, q, t)
            if m == 0:
                break
            fwd_step(pl, t, n0, m, 0, H, x, w_hh, b1, b2, gates, hw, sv, hs, cs, rs, w_hh_t,
                     panels, w_ih_t, panels_x)
            if pl.proj:  # L4p for these rows, every output column
                r0 = pl.off[t] + n0
                mm(False, True, m, P, H, <floating> 1, rs + r0 * H, H, w_hr, H, <floating> 0,
                   hs + (pl.hrow[t + 1] + n0) * P, P)
        q += nt


# The buffers of one forward call, by slot (_forward fills them; NULL where a cell has none).
cdef enum:
    F_X, F_W_IH, F_W_HH, F_B1, F_B2, F_W_IH_B, F_W_HH_B, F_B1_B, F_B2_B, F_W_HR, F_GATES, F_HW,
    F_SV, F_HS, F_CS, F_RS, F_W_HH_T, F_PANELS, F_W_IH_T, F_PANELS_X, F_SLOTS


cdef void fwd_run(const Plan* pl, void** buf, floating kind) noexcept nogil:
    """The forward pass; ``kind`` only selects the float type of the buffers."""
    cdef const floating* x = <const floating*> buf[F_X]
    cdef const floating* w_ih = <const floating*> buf[F_W_IH]
    cdef const floating* w_hh = <const floating*> buf[F_W_HH]
    cdef const floating* b1 = <const floating*> buf[F_B1]
    cdef const floating* b2 = <const floating*> buf[F_B2]
    cdef floating* w_ih_b = <floating*> buf[F_W_IH_B]   # blocked copies (the inputs themselves
    cdef floating* w_hh_b = <floating*> buf[F_W_HH_B]   # when the layout is natural)
    cdef floating* b1_b = <floating*> buf[F_B1_B]
    cdef floating* b2_b = <floating*> buf[F_B2_B]
    cdef const floating* w_hr = <const floating*> buf[F_W_HR]
    cdef floating* gates = <floating*> buf[F_GATES]
    cdef floating* hw = <floating*> buf[F_HW]
    cdef floating* sv = <floating*> buf[F_SV]
    cdef floating* hs = <floating*> buf[F_HS]
    cdef floating* cs = <floating*> buf[F_CS]
    cdef floating* rs = <floating*> buf[F_RS]
    cdef floating* w_hh_t = <floating*> buf[F_W_HH_T]
    cdef floating* panels = <floating*> buf[F_PANELS]
    cdef floating* w_ih_t = <floating*> buf[F_W_IH_T]
    cdef floating* panels_x = <floating*> buf[F_PANELS_X]
    cdef int saved[8]
    cdef int p, team
    cdef int G = pl.G
    fr_blas_pin_one(saved)
    if pl.bs < pl.H:  # else the natural layout is the blocked one
        to_blocked(w_ih, w_ih_b, G, pl.H, pl.D, pl.bs)
        to_blocked(w_hh, w_hh_b, G, pl.H, pl.P, pl.bs)
        to_blocked(b1, b1_b, G, pl.H, 1, pl.bs)
        if pl.cell == FR_GRU:
            to_blocked(b2, b2_b, G, pl.H, 1, pl.bs)
    if pl.lookup:  # the table of every token's input projection: E W_ih^T (in w_ih_b's layout)
        mm(False, True, pl.V, G * pl.H, pl.D, <floating> 1, x, pl.D, w_ih_b, pl.D, <floating> 0,
           <floating*> pl.table, G * pl.H)
    if pl.by_rows:
        with parallel(num_threads=pl.nt):
            p = omp_get_thread_num()
            team = omp_get_num_threads()
            fwd_rows_thread(pl, p, team, x, w_ih_b, w_hh_b, w_hr, b1_b, b2_b, gates, hw, sv, hs,
                            cs, rs, w_hh_t, panels, w_ih_t, panels_x)
    elif pl.nt > 1:
        with parallel(num_threads=pl.nt):
            p = omp_get_thread_num()
            team = omp_get_num_threads()
            fwd_thread(pl, p, team, True, x, w_ih_b, w_hh_b, w_hr, b1_b, b2_b, gates, hw, sv, hs,
                       cs, rs, w_hh_t, panels, w_ih_t, panels_x)
    else:
        # the input projection split by rows over the threads (unless the time loop projects
        # each step itself), then the time loop on one
        if pl.fuse_x or pl.lookup:
            pass  # the time loop projects (or looks up) each step itself
        elif pl.seq_threads > 1:
            with parallel(num_threads=pl.seq_threads):
                p = omp_get_thread_num()
                team = omp_get_num_threads()
                project_rows(pl, p, team, x, w_ih_b, gates)
        else:
            project_rows(pl, 0, 1, x, w_ih_b, gates)
        fwd_thread(pl, 0, 1, False, x, w_ih_b, w_hh_b, w_hr, b1_b, b2_b, gates, hw, sv, hs, cs,
                   rs, w_hh_t, panels, w_ih_t, panels_x)
    fr_blas_restore(saved)


cdef inline void project_rows(
    const Plan* pl, int p, int nt, const floating* x, const floating* w, floating* out
) noexcept nogil:
    """The input projection of all steps, rows of thread p of nt: out = x W^T."""
    cdef Py_ssize_t r0, r1, GH = pl.G * pl.H
    split(pl.R, nt, p, &r0, &r1)
    mm(False, True, r1 - r0, GH, pl.D, <floating> 1, x + r0 * pl.D, pl.D, w, pl.D,
       <floating> 0, out + r0 * GH, GH)


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------


cdef inline void bwd_step(
    const Plan* pl, Py_ssize_t t, Py_ssize_t n0, Py_ssize_t m, Py_ssize_t u0, Py_ssize_t u1,
    Py_ssize_t o0, Py_ssize_t o1, bint sync,
    const floating* w_hh, const floating* w_hr, const floating* acts, const floating* hs,
    const floating* cs, const floating* dy, floating* dh, floating* dc, floating* dax,
    floating* dah, floating* dht, floating* dr, const floating* panels,
) noexcept nogil:
    """Step t backwards for the sorted rows [n0, n0 + m), hidden units [u0, u1) and state
    columns [o0, o1) (arguments as bwd_thread); ``sync``: other threads hold the other units
    and columns of these rows, so a barrier comes wherever a pass reads all of them."""
    cdef Py_ssize_t H = pl.H, P = pl.P, GH = pl.G * pl.H, i, c
    cdef Py_ssize_t r0 = pl.off[t] + n0
    cdef const floating* a_t = acts + r0 * (4 * H if pl.cell == FR_GRU else GH)
    cdef const floating* dy_t = dy + r0 * P
    cdef floating* dh_q = dh + n0 * P
    cdef floating* dc_q = dc + n0 * H if dc != NULL else <floating*> NULL
    cdef floating* dh_t
    if pl.proj:
        # LB1: the gradient reaching h_t, these columns (kept for dW_hr) ...
        dh_t = dht + r0 * P
        for i in range(m):
            for c in range(o0, o1):
                dh_t[i * P + c] = dy_t[i * P + c] + dh_q[i * P + c]
        if sync:
            fr_barrier()
        # LB1p: ... through h = r W_hr^T to r, these units.
        mm(False, False, m, u1 - u0, P, <floating> 1, dh_t, P, w_hr + u0, H, <floating> 0,
           dr + n0 * H + u0, H)
        cell_bwd(pl, m, a_t, cs + (pl.crow[t] + n0) * H, cs + (pl.crow[t + 1] + n0) * H,
                 <floating*> NULL, <floating*> NULL, dr + n0 * H, dc_q, dax + r0 * GH,
                 dax + r0 * GH, u0, u1)
    else:
        # LB1-LB4 / GB1-GB4 / RB1-RB3
        cell_bwd(pl, m, a_t,
                 cs + (pl.crow[t] + n0) * H if pl.cell == FR_LSTM else <floating*> NULL,
                 cs + (pl.crow[t + 1] + n0) * H if pl.cell == FR_LSTM else <floating*> NULL,
                 hs + (pl.hrow[t] + n0) * P, dy_t, dh_q, dc_q, dax + r0 * GH, dah + r0 * GH,
                 u0, u1)
    if sync:
        # All of this step's gate gradients are written before any thread's GEMM reads them.
        fr_barrier()
    # To the previous state: these columns of dh; the next pointwise pass over these rows reads
    # only those (with a projection: the next LB1 reads them), so no second barrier.
    columns_product(pl, m, o0, o1, GH, dah + r0 * GH, GH, w_hh, P, panels,
                    0 if pl.proj else 1, dh_q, P)


cdef void bwd_thread(
    const Plan* pl, int p, int nt, bint whole,
    const floating* x,        # IN  (R, D) packed
    const floating* w_ih,     # IN  (GH, D) blocked
    const floating* w_hh,     # IN  (GH, P) blocked
    const floating* w_hr,     # IN  (P, H) or NULL
    const floating* acts,     # IN  (R, GH) LSTM/RNN activations, or GRU's (R, 4H) saved values
    const floating* hs,       # IN  (N + R, P) the forward's states
    const floating* cs,       # IN  (N + R, H) LSTM's cell states
    const floating* rs,       # IN  (R, H) r before the projection, or NULL
    const floating* hprev,    # IN  (R, P) the state each packed row's step read
    const floating* dy,       # IN  (R, P) packed
    floating* dh,             # INOUT (N, P) dhT in, dh0 out
    floating* dc,             # INOUT (N, H) dcT in, dc0 out (LSTM)
    floating* dax,            # OUT (R, GH) input pre-activation gradients
    floating* dah,            # OUT (R, GH) recurrent ones (GRU; else dax itself)
    floating* dht,            # OUT (R, P) gradient reaching each step's h (projection)
    floating* dr,             # scratch (N, H) gradient reaching r (projection)
    floating* dx, floating* dw_ih, floating* dw_hh, floating* db1, floating* db2,
    floating* dw_hr,
    floating* scratch,        # (GH, D + P + 2)
    floating* panels,         # scratch (GH * P) W_hh's columns in panels, or unused
    floating* seqpan,         # scratch for sequence_grads' panels, or unused
) noexcept nogil:
    cdef Py_ssize_t u0, u1, o0, o1, t, m
    cdef Py_ssize_t H = pl.H, P = pl.P, GH = pl.G * pl.H
    unit_range(H, pl.bs, nt, p, &u0, &u1)
    out_columns(pl, nt, p, &o0, &o1)
    if floating is float:
        if pl.panels:  # this thread's columns of W_hh (only it reads them)
            pack_panels(GH, o1 - o0, w_hh + o0, P, panels + GH * o0)
    for t in range(pl.T - 1, -1, -1):
        m = pl.na[t]
        if m == 0:
            continue
        bwd_step(pl, t, 0, m, u0, u1, o0, o1, True, w_hh, w_hr, acts, hs, cs, dy, dh, dc, dax,
                 dah, dht, dr, panels)
    if whole:  # else bwd_run does it with its own threads
        fr_barrier()
        sequence_grads(pl, p, nt, dax, dah, x, hprev, w_ih, dht, rs, dx, dw_ih, dw_hh, db1, db2,
                       dw_hr, scratch, seqpan)


cdef void bwd_rows_thread(
    const Plan* pl, int p, int nt,
    const floating* x, const floating* w_ih, const floating* w_hh, const floating* w_hr,
    const floating* acts, const floating* hs, const floating* cs, const floating* rs,
    const floating* hprev, const floating* dy, floating* dh, floating* dc, floating* dax,
    floating* dah, floating* dht, floating* dr, floating* dx, floating* dw_ih, floating* dw_hh,
    floating* db1, floating* db2, floating* dw_hr, floating* scratch, floating* panels,
    floating* seqpan,
) noexcept nogil:
    """Thread p's share of a backward split by sequences (pl.by_rows; arguments as
    bwd_thread): W_hh's panels shared out, one barrier, each row group's time loop alone, one
    barrier, the whole-sequence gradients."""
    cdef Py_ssize_t c0, c1, t, m, q, n0
    cdef Py_ssize_t H = pl.H, P = pl.P, GH = pl.G * pl.H
    if floating is float:
        if pl.panels:
            panel_columns(P, nt, p, &c0, &c1)
            pack_panels(GH, c1 - c0, w_hh + c0, P, panels + GH * c0)
    fr_barrier()
    q = p
    while q < pl.nt:
        n0 = pl.rsplit[q]
        for t in range(pl.T - 1, -1, -1):
            m = group_rows(pl, q, t)
            if m == 0:
                continue
            bwd_step(pl, t, n0, m, 0, H, 0, P, False, w_hh, w_hr, acts, hs, cs, dy, dh, dc,
                     dax, dah, dht, dr, panels)
        q += nt
    fr_barrier()
    sequence_grads(pl, p, nt, dax, dah, x, hprev, w_ih, dht, rs, dx, dw_ih, dw_hh, db1, db2,
                   dw_hr, scratch, seqpan)


cdef void sequence_grads(
    const Plan* pl, int p, int nt,
    const floating* dax,      # IN  (R, GH) blocked
    const floating* dah,      # IN  (R, GH) blocked (dax itself except for the GRU)
    const floating* x,        # IN  (R, D)
    const floating* hprev,    # IN  (R, P)
    const floating* w_ih,     # IN  (GH, D) blocked
    const floating* dht,      # IN  (R, P) projection only
    const floating* rs,       # IN  (R, H) projection only
    floating* dx,             # OUT (R, D)
    floating* dw_ih,          # OUT (GH, D) natural
    floating* dw_hh,          # OUT (GH, P) natural
    floating* db1,            # OUT (GH,) natural: column sums of dax
    floating* db2,            # OUT (GH,) natural: column sums of dah (GRU), else NULL
    floating* dw_hr,          # OUT (P, H) projection only
    floating* scratch,        # (GH, D + P + 2) for a blocked layout
    floating* seqpan,         # (float32 pl.seq_own) panels of x, hprev and W_ih: seq_panel_sizes
) noexcept nogil:
    """LB5 / GB5 / RB4: input, weight and bias gradients as whole-sequence GEMMs over the R
    packed rows, thread p's share: fastrnn's kernels where they apply (pl.seq_own, fr_seq_fits),
    else single-threaded BLAS. With token inputs (pl.lookup, x
    is then the embedding E (V, D)): the rows' input gate gradients summed by token into dtab,
    dW_ih = dtab^T E, and no dx (bwd_run computes the embedding's gradient from dtab)."""
    cdef Py_ssize_t r0, r1, c, r, v, GH = pl.G * pl.H, D = pl.D, P = pl.P, R = pl.R
    cdef floating* sw_ih
    cdef floating* sw_hh
    cdef floating* sb1
    cdef floating* sb2
    cdef floating* dt = <floating*> pl.dtab
    cdef floating* row
    cdef const floating* src
    cdef bint natural = pl.G == 1 or pl.bs >= pl.H
    # our kernels for the GEMMs where the operand they keep in L2 fits (fr_seq_fits: W_ih's
    # panels for dx; fr_seq_fits_dw: the weight gradient itself)
    cdef bint own_dx = floating is float and pl.seq_own and fr_seq_fits(pl.gemm, GH, D)
    cdef bint own_x = floating is float and pl.seq_own and fr_seq_fits_dw(pl.gemm, GH, D)
    cdef bint own_h = floating is float and pl.seq_own and fr_seq_fits_dw(pl.gemm, GH, P)
    cdef floating* xpan = seqpan
    cdef floating* hpan = seqpan + R * (D // 32 * 32)
    cdef floating* wpan = hpan + R * (P // 32 * 32)
    if own_x or own_h or own_dx:
        # this thread's share of the panels of x (unless looked up), hprev and W_ih, then
        # every thread reads all of them
        if own_x and not pl.lookup:
            panel_columns(D, nt, p, &r0, &r1)
            pack_panels(R, r1 - r0, <float*> x + r0, D, <float*> xpan + R * r0)
        if own_dx and not pl.lookup:
            panel_columns(D, nt, p, &r0, &r1)
            pack_panels(GH, r1 - r0, <float*> w_ih + r0, D, <float*> wpan + GH * r0)
        if own_h:
            panel_columns(P, nt, p, &r0, &r1)
            pack_panels(R, r1 - r0, <float*> hprev + r0, P, <float*> hpan + R * r0)
        fr_barrier()
    split(R, nt, p, &r0, &r1)
    if pl.lookup:
        pass
    elif floating is float and own_dx:
        fr_seq_sgemm(pl.gemm, r1 - r0, D, GH, dax + r0 * GH, GH, 1, w_ih, D, wpan, dx + r0 * D,
                     D)
    else:
        mm(False, False, r1 - r0, D, GH, <floating> 1, dax + r0 * GH, GH, w_ih, D, <floating> 0,
           dx + r0 * D, D)
    split(GH, nt, p, &r0, &r1)
    if natural:
        sw_ih, sw_hh, sb1, sb2 = dw_ih, dw_hh, db1, db2
    else:
        sw_ih = scratch
        sw_hh = scratch + GH * D
        sb1 = scratch + GH * (D + P)
        sb2 = sb1 + GH
    # (the weight gradients read dax / dah transposed, in place; x and hprev from panels)
    if pl.lookup:
        # this thread's columns of dtab: every row's gate gradients added to its token's row
        for v in range(pl.V):
            row = dt + v * GH
            for c in range(r0, r1):
                row[c] = 0
        for r in range(R):
            row = dt + pl.tok[r] * GH
            src = dax + r * GH
            for c in range(r0, r1):
                row[c] += src[c]
        mm(True, False, r1 - r0, D, pl.V, <floating> 1, dt + r0, GH, x, D, <floating> 0,
           sw_ih + r0 * D, D)
    elif floating is float and own_x:
        fr_seq_sgemm(pl.gemm, r1 - r0, D, R, dax + r0, 1, GH, x, D, xpan, sw_ih + r0 * D, D)
    else:
        mm(True, False, r1 - r0, D, R, <floating> 1, dax + r0, GH, x, D, <floating> 0,
           sw_ih + r0 * D, D)
    if floating is float and own_h:
        fr_seq_sgemm(pl.gemm, r1 - r0, P, R, dah + r0, 1, GH, hprev, P, hpan, sw_hh + r0 * P,
                     P)
    else:
        mm(True, False, r1 - r0, P, R, <floating> 1, dah + r0, GH, hprev, P, <floating> 0,
           sw_hh + r0 * P, P)
    column_sums(dax, R, GH, r0, r1, sb1)
    if db2 != NULL:
        column_sums(dah, R, GH, r0, r1, sb2)
    if not natural:
        from_blocked(sw_ih, dw_ih, pl.G, pl.H, D, pl.bs, r0, r1)
        from_blocked(sw_hh, dw_hh, pl.G, pl.H, P, pl.bs, r0, r1)
        for c in range(r0, r1):
            db1[natural_row(c, pl.G, pl.H, pl.bs)] = sb1[c]
            if db2 != NULL:
                db2[natural_row(c, pl.G, pl.H, pl.bs)] = sb2[c]
    if pl.proj:
        # LB5: dW_hr = sum over steps of dh_t^T r_t, rows of thread p
        split(P, nt, p, &r0, &r1)
        mm(True, False, r1 - r0, pl.H, R, <floating> 1, dht + r0, P, rs, pl.H, <floating> 0,
           dw_hr + r0 * pl.H, pl.H)


def seq_panel_sizes(Py_ssize_t R, Py_ssize_t D, Py_ssize_t P, Py_ssize_t GH):
    """Elements of sequence_grads' ``seqpan``: the panels of x (R, D), hprev (R, P), W_ih
    (GH, D)."""
    return R * (D // 32 * 32) + R * (P // 32 * 32) + GH * (D // 32 * 32)


cdef inline void column_sums(
    const floating* a, Py_ssize_t rows, Py_ssize_t ld, Py_ssize_t c0, Py_ssize_t c1,
    floating* out,
) noexcept nogil:
    """out[c] = sum over rows of a[:, c], c in [c0, c1)."""
    cdef Py_ssize_t r, c
    for c in range(c0, c1):
        out[c] = 0
    for r in range(rows):
        for c in range(c0, c1):
            out[c] += a[r * ld + c]


# The buffers of one backward call, by slot (_backward fills them).
cdef enum:
    B_X, B_W_IH, B_W_HH, B_W_HR, B_ACTS, B_HS, B_CS, B_RS, B_HPREV, B_DY, B_DH, B_DC, B_DAX,
    B_DAH, B_DHT, B_DR, B_DX, B_DW_IH, B_DW_HH, B_DB1, B_DB2, B_DW_HR, B_SCRATCH, B_PANELS,
    B_SEQPAN, B_SLOTS


cdef void bwd_run(const Plan* pl, void** buf, floating kind) noexcept nogil:
    """The backward pass; ``kind`` only selects the float type of the buffers."""
    cdef const floating* x = <const floating*> buf[B_X]
    cdef const floating* w_ih = <const floating*> buf[B_W_IH]
    cdef const floating* w_hh = <const floating*> buf[B_W_HH]
    cdef const floating* w_hr = <const floating*> buf[B_W_HR]
    cdef const floating* acts = <const floating*> buf[B_ACTS]
    cdef const floating* hs = <const floating*> buf[B_HS]
    cdef const floating* cs = <const floating*> buf[B_CS]
    cdef const floating* rs = <const floating*> buf[B_RS]
    cdef const floating* hprev = <const floating*> buf[B_HPREV]
    cdef const floating* dy = <const floating*> buf[B_DY]
    cdef floating* dh = <floating*> buf[B_DH]
    cdef floating* dc = <floating*> buf[B_DC]
    cdef floating* dax = <floating*> buf[B_DAX]
    cdef floating* dah = <floating*> buf[B_DAH]
    cdef floating* dht = <floating*> buf[B_DHT]
    cdef floating* dr = <floating*> buf[B_DR]
    cdef floating* dx = <floating*> buf[B_DX]
    cdef floating* dw_ih = <floating*> buf[B_DW_IH]
    cdef floating* dw_hh = <floating*> buf[B_DW_HH]
    cdef floating* db1 = <floating*> buf[B_DB1]
    cdef floating* db2 = <floating*> buf[B_DB2]
    cdef floating* dw_hr = <floating*> buf[B_DW_HR]
    cdef floating* scratch = <floating*> buf[B_SCRATCH]
    cdef floating* panels = <floating*> buf[B_PANELS]
    cdef floating* seqpan = <floating*> buf[B_SEQPAN]
    cdef int saved[8]
    cdef int p, team
    fr_blas_pin_one(saved)
    if pl.by_rows:
        with parallel(num_threads=pl.nt):
            p = omp_get_thread_num()
            team = omp_get_num_threads()
            bwd_rows_thread(pl, p, team, x, w_ih, w_hh, w_hr, acts, hs, cs, rs, hprev, dy, dh,
                            dc, dax, dah, dht, dr, dx, dw_ih, dw_hh, db1, db2, dw_hr, scratch,
                            panels, seqpan)
    elif pl.nt > 1:
        with parallel(num_threads=pl.nt):
            p = omp_get_thread_num()
            team = omp_get_num_threads()
            bwd_thread(pl, p, team, True, x, w_ih, w_hh, w_hr, acts, hs, cs, rs, hprev, dy, dh,
                       dc, dax, dah, dht, dr, dx, dw_ih, dw_hh, db1, db2, dw_hr, scratch, panels,
                       seqpan)
    else:
        bwd_thread(pl, 0, 1, False, x, w_ih, w_hh, w_hr, acts, hs, cs, rs, hprev, dy, dh, dc,
                   dax, dah, dht, dr, dx, dw_ih, dw_hh, db1, db2, dw_hr, scratch, panels, seqpan)
        if pl.seq_threads > 1:
            with parallel(num_threads=pl.seq_threads):
                p = omp_get_thread_num()
                team = omp_get_num_threads()
                sequence_grads(pl, p, team, dax, dah, x, hprev, w_ih, dht, rs, dx, dw_ih, dw_hh,
                               db1, db2, dw_hr, scratch, seqpan)
        else:
            sequence_grads(pl, 0, 1, dax, dah, x, hprev, w_ih, dht, rs, dx, dw_ih, dw_hh, db1,
                           db2, dw_hr, scratch, seqpan)
    if pl.lookup:  # the embedding's gradient dE = dtab W_ih (dx is E's shape here)
        mm(False, False, pl.V, pl.D, pl.G * pl.H, <floating> 1, <floating*> pl.dtab,
           pl.G * pl.H, w_ih, pl.D, <floating> 0, dx, pl.D)
    fr_blas_restore(saved)


# ------------------------------------------------------------------------------------------------
# Python side: packing, buffers, contexts
# ------------------------------------------------------------------------------------------------


cdef inline void* data(object a) noexcept:
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray> a)


_dense_rows = {}


class _Rows:
    """The packed rows of one call: the batch ordered by length (longest first), step t owning
    rows [off[t], off[t] + na[t]). Without lengths the identity, and no copies; those plans
    are shared between calls of the same (T, N) (read-only), which matters for short calls."""

    @staticmethod
    def of(lengths, T, N):
        if lengths is not None:
            return _Rows(lengths, T, N)
        rows = _dense_rows.get((T, N))
        if rows is None:
            if len(_dense_rows) >= 64:
                _dense_rows.clear()
            rows = _dense_rows[(T, N)] = _Rows(None, T, N)
        return rows

    def __init__(self, lengths, T, N):
        self.T, self.N = T, N
        if lengths is None:
            self.perm = None
            self.na = np.full(T, N, np.int64)
            self.off = np.arange(T, dtype=np.int64) * N
            self.R = T * N
        else:
            self.perm = np.argsort(-lengths, kind="stable")
            ls = lengths[self.perm]
            inside = np.arange(T)[:, None] < ls[None, :]          # (T, N) sorted
            self.na = inside.sum(axis=1).astype(np.int64)
            self.off = (np.cumsum(self.na) - self.na).astype(np.int64)
            self.R = int(self.na.sum())
            self.t_of, self.n_of = np.nonzero(inside)              # time-major packed order
            self.src = self.perm[self.n_of]                        # the original batch index
            self.last = ls                                         # steps of sorted row n
        # the state before step t starts at row hrow[t] of hs: h0 first, then each step's h
        self.hrow = np.concatenate(([0], self.N + self.off)).astype(np.int64)
        # the same for c when nothing is saved for backward: a ring of two blocks
        self.ring = (np.arange(T + 1, dtype=np.int64) & 1) * N
        for a in (self.na, self.off, self.hrow, self.ring):
            a.flags.writeable = False

    def row_split(self, nt):
        """(nt + 1,) int64: the sorted rows of nt groups, contiguous, balanced by their steps
        (without lengths: by count). Cached (the dense plans are shared between calls)."""
        cache = self.__dict__.setdefault("_splits", {})
        out = cache.get(nt)
        if out is None:
            if self.perm is None:
                out = np.arange(nt + 1, dtype=np.int64) * self.N // nt
            else:
                steps = np.concatenate(([0], np.cumsum(self.last)))
                total = steps[self.N]
                out = np.searchsorted(steps, total * np.arange(nt + 1) / nt).astype(np.int64)
                out[0], out[nt] = 0, self.N
                out = np.maximum.accumulate(out)
            out.flags.writeable = False
            cache[nt] = out
        return out

    def pack(self, a):
        """(T, N, F) -> (R, F)."""
        if self.perm is None:
            return a.reshape(self.R, a.shape[2])
        return a[self.t_of, self.src]

    def unpack(self, packed, F, dtype):
        """(R, F) -> (T, N, F), zeros at padded positions."""
        if self.perm is None:
            return packed.reshape(self.T, self.N, F)
        out = np.zeros((self.T, self.N, F), dtype)
        out[self.t_of, self.src] = packed
        return out

    def sort(self, a):
        """(N, F) in the caller's order -> sorted order (a copy)."""
        return np.array(a if self.perm is None else a[self.perm], order="C")

    def unsort(self, a):
        if self.perm is None:
            return a
        out = np.empty_like(a)
        out[self.perm] = a
        return out

    def finals(self, states, rows):
        """Each sequence's state after its last step, caller's order; rows: (T+1,) first row
        of each block in ``states``."""
        if self.perm is None:
            return states[rows[self.T] : rows[self.T] + self.N].copy()
        return self.unsort(states[rows[self.last] + np.arange(self.N)])

    def previous(self, hs, F):
        """(R, F): the state each packed row's step read."""
        if self.perm is None:
            return hs[: self.R]
        return hs[self.hrow[self.t_of] + self.n_of]


cdef int run_pass(const Plan* pl, bint backward, bint is_float, tuple arrays) except -1:
    """Run the forward or backward pass on ``arrays``, the buffers in slot order (F_* / B_*;
    None where a cell has none), without the GIL."""
    cdef void* buf[B_SLOTS]  # B_SLOTS > F_SLOTS
    cdef Py_ssize_t i
    for i in range(len(arrays)):
        buf[i] = data(arrays[i])
    with fallback_limit(pl.nt):
        with nogil:
            if backward:
                if is_float:
                    bwd_run(pl, buf, <float> 0)
                else:
                    bwd_run(pl, buf, <double> 0)
            elif is_float:
                fwd_run(pl, buf, <float> 0)
            else:
                fwd_run(pl, buf, <double> 0)
    return 0


cdef int fill_plan(Plan* pl, int cell, object rows, Py_ssize_t D, Py_ssize_t H, Py_ssize_t P,
                   bint proj, bint is_float, object crow, Py_ssize_t V=0,
                   cnp.ndarray tok=None) except -1:
    """The plan of one call (raises for a FASTRNN_SIMD this CPU does not run); ``tok``: the
    packed rows' tokens of a call with token inputs (V table rows), else None."""
    cdef int G = _GATES[cell]
    cdef int isa = simd_level()
    cdef cnp.ndarray a
    pl.cell = cell
    pl.G = G
    pl.isa = isa
    # the GEMM kernels at the cells' level (FASTRNN_SIMD=avx2 runs the AVX2 kernels too)
    pl.gemm = min(isa, fr_small_gemm_isa) if is_float else 0
    pl.fast = pl.gemm > 0
    pl.proj = proj
    pl.T = rows.T
    pl.N = rows.N
    pl.D = D
    pl.H = H
    pl.P = P
    pl.R = rows.R
    pl.seq_threads = sequence_threads(rows.T, rows.N, D, H, G)
    # Split by sequences when every thread gets SPLIT_ROWS_MIN of them and the call is worth
    # a parallel region (no barrier per step, the natural layout); else by hidden units when a
    # step's GEMM repays a barrier per step (team_size), in one block per thread (a multiple of
    # BLOCK), so the cells run long loops.
    itemsize = 4 if is_float else 8
    fuse = (pl.fast and 0 < FUSE_INPUT_MIN_ROWS <= rows.N
            and (D + P) * G * H * itemsize <= FUSE_INPUT_MAX_BYTES)
    per_step = P + (D if fuse else 0)
    weight_bytes = per_step * G * H * itemsize
    pl.by_rows = (pl.seq_threads > 1 and SPLIT_ROWS_MIN > 0
                  and rows.N >= SPLIT_ROWS_MIN * pl.seq_threads
                  and (weight_bytes <= SPLIT_ROWS_WEIGHT_BYTES
                       or rows.N >= SPLIT_ROWS_MANY * pl.seq_threads))
    pl.nt = pl.seq_threads if pl.by_rows else team_size(rows.N, H, G, P)
    pl.bs = H
    pl.rsplit = NULL
    if pl.by_rows:
        a = rows.row_split(pl.nt)
        pl.rsplit = <const long long*> cnp.PyArray_DATA(a)
    elif pl.nt > 1:
        pl.bs = ((H + pl.nt - 1) // pl.nt + BLOCK - 1) // BLOCK * BLOCK
        if pl.bs >= H:  # a single block: nothing to split
            pl.nt = 1
            pl.bs = H
    # the step GEMM from W_hh^T when the batch and the sequence repay the transposition, and
    # from packed panels with fastrnn's kernels
    # (batches under 4 rows too with the AVX2 kernels: OpenBLAS's AVX2 kernels pack both
    # operands on every call, where its AVX-512 build has a path for small matrices that does
    # not; NOTES-cpu.md, "AVX2")
    pl.use_t = rows.T >= 4 and (rows.N >= 4 or pl.gemm == 1)
    pl.panels = pl.use_t and pl.fast
    pl.lookup = tok is not None
    pl.fuse_x = pl.panels and fuse and not pl.lookup
    pl.seq_own = pl.fast and SEQUENCE_GEMMS_OWN
    pl.V = V
    pl.tok = <const long long*> cnp.PyArray_DATA(tok) if pl.lookup else NULL
    pl.table = NULL
    pl.dtab = NULL
    a = rows.off
    pl.off = <const long long*> cnp.PyArray_DATA(a)
    a = rows.na
    pl.na = <const long long*> cnp.PyArray_DATA(a)
    a = rows.hrow
    pl.hrow = <const long long*> cnp.PyArray_DATA(a)
    a = crow
    pl.crow = <const long long*> cnp.PyArray_DATA(a)
    return 0


def _forward(int cell, x, h0, c0, w_ih, w_hh, b1, b2, w_hr, lengths, training, tokens=None):
    """One forward call. With ``tokens`` (T, N) integers, x is an embedding table E (V, D)
    and the input at (t, n) is E[tokens[t, n]]: the input projection is a lookup into
    E W_ih^T, and backward returns E's gradient (V, D) in place of dx."""
    dtype = x.dtype
    cdef bint is_lstm = cell == FR_LSTM, is_gru = cell == FR_GRU
    cdef bint proj = w_hr is not None
    cdef bint lookup = tokens is not None
    x, h0, c0, w_ih, w_hh, b1, b2, w_hr = as_c_array(dtype, x, h0, c0, w_ih, w_hh, b1, b2, w_hr)
    if lengths is not None:
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    cdef Py_ssize_t T, N, D, V = 0
    if lookup:
        tokens = np.asarray(tokens)
        V, D = x.shape[0], x.shape[1]
        T, N = tokens.shape[0], tokens.shape[1]
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
            raise ValueError(f"tokens: every token must be in 0..{V - 1}")
    else:
        T, N, D = x.shape[0], x.shape[1], x.shape[2]
    cdef int G = _GATES[cell]
    cdef Py_ssize_t GH = w_ih.shape[0], H = GH // G, P = w_hh.shape[1]
    cdef bint train = bool(training)
    rows = _Rows.of(lengths, T, N)
    cdef Py_ssize_t R = rows.R
    # c: every step's block when training, else a ring of two blocks
    crow = rows.hrow if train else rows.ring
    cdef Plan pl
    cdef cnp.ndarray tok = None
    if lookup:
        X = x
        tok = np.ascontiguousarray(rows.pack(tokens[:, :, None])[:, 0], dtype=np.int64)
    else:
        X = rows.pack(x)
    fill_plan(&pl, cell, rows, D, H, P, proj, dtype == np.float32, crow, V, tok)
    # What backward reads shares one buffer from the saved pool when training (reused across
    # calls, so its pages are not faulted in and zeroed every call); without training the
    # outputs' buffer (y is a view of it) comes from the output pool for the same reason.
    cdef Py_ssize_t n_g = R * GH, n_h = (N + R) * P
    cdef Py_ssize_t n_c = ((N + R) if train else 2 * N) * H if is_lstm else 0
    cdef Py_ssize_t n_sv = R * 4 * H if is_gru and train else 0
    cdef Py_ssize_t n_r = R * H if proj else 0
    if train:
        keep = take_saved(dtype, n_g + n_h + n_c + n_sv + n_r)
    else:
        keep = output((n_g + n_h + n_c + n_sv + n_r,), dtype)
    gates = keep[:n_g]
    hs = keep[n_g : n_g + n_h].reshape(N + R, P)
    cs = keep[n_g + n_h : n_g + n_h + n_c].reshape(-1, H) if is_lstm else None
    sv = keep[n_g + n_h + n_c : n_g + n_h + n_c + n_sv] if n_sv else None
    rs = keep[n_g + n_h + n_c + n_sv :].reshape(R, H) if proj else None
    hs[:N] = h0 if rows.perm is None else h0[rows.perm]
    if is_lstm:
        cs[:N] = c0 if rows.perm is None else c0[rows.perm]
    cdef Py_ssize_t n_t = GH * P if pl.use_t else 0
    cdef Py_ssize_t n_p = n_t if pl.panels else 0
    cdef Py_ssize_t n_hw = N * GH if is_gru else 0
    cdef Py_ssize_t n_x = GH * D if pl.fuse_x else 0
    cdef Py_ssize_t n_tab = V * GH
    ws = take_scratch(dtype, n_t + n_p + n_hw + 2 * n_x + n_tab)
    if lookup:
        pl.table = data(ws[n_t + n_p + n_hw + 2 * n_x :])
    w_hh_t = ws[:n_t]
    panels = ws[n_t : n_t + n_p]
    hw = ws[n_t + n_p : n_t + n_p + n_hw]
    w_ih_t = ws[n_t + n_p + n_hw : n_t + n_p + n_hw + n_x]
    panels_x = ws[n_t + n_p + n_hw + n_x : n_t + n_p + n_hw + 2 * n_x]
    if pl.bs < H:
        w_ih_b = np.empty((GH, D), dtype)
        w_hh_b = np.empty((GH, P), dtype)
        b1_b = np.empty(GH, dtype)
        b2_b = np.empty(GH, dtype) if is_gru else None
    else:
        w_ih_b, w_hh_b, b1_b, b2_b = w_ih, w_hh, b1, b2
    run_pass(&pl, False, dtype == np.float32, (
        X, w_ih, w_hh, b1, b2, w_ih_b, w_hh_b, b1_b, b2_b, w_hr, gates, hw if n_hw else None, sv,
        hs, cs, rs, w_hh_t if n_t else None, panels if n_p else None,
        w_ih_t if n_x else None, panels_x if n_x else None,
    ))
    give_scratch(ws)
    y = rows.unpack(hs[N:], P, dtype)
    if train and rows.perm is None:
        y = y.copy()  # hs is saved for backward: the caller's y must not alias it
    hT = rows.finals(hs, rows.hrow)
    cT = rows.finals(cs, crow) if is_lstm else None
    if not train:
        return y, hT, cT, None
    grad_shapes = {"dy": (T, N, P), "dhT": (N, P)}
    if is_lstm:
        grad_shapes["dcT"] = (N, H)
    ctx = Context(
        op="lstm" if is_lstm else "gru" if is_gru else "rnn",
        backend="cpu",
        dtype=dtype,
        cupy=False,
        grad_shapes=grad_shapes,
        saved=dict(
            cell=cell, rows=rows, X=X, w_ih_b=w_ih_b, w_hh_b=w_hh_b, w_hr=w_hr,
            acts=sv if is_gru else gates, hs=hs, cs=cs, rs=rs, bs=pl.bs, H=H, tok=tok,
            split="rows" if pl.by_rows else "units" if pl.nt > 1 else "serial",
        ),
    )
    return y, hT, cT, ctx


def _backward(ctx, dy, dhT, dcT):
    s = ctx.saved
    cdef int cell = s["cell"]
    rows = s["rows"]
    X = s["X"]
    w_ih_b, w_hh_b, w_hr = s["w_ih_b"], s["w_hh_b"], s["w_hr"]
    acts, hs, cs, rs = s["acts"], s["hs"], s["cs"], s["rs"]
    dtype = X.dtype
    cdef bint is_lstm = cell == FR_LSTM, is_gru = cell == FR_GRU
    cdef bint proj = w_hr is not None
    cdef Py_ssize_t T = rows.T, N = rows.N, D = X.shape[1], H = s["H"], P = hs.shape[1]
    cdef int G = _GATES[cell]
    cdef Py_ssize_t GH = G * H, R = rows.R
    cdef cnp.ndarray tok = s["tok"]
    cdef bint lookup = tok is not None
    cdef Py_ssize_t V = X.shape[0] if lookup else 0
    cdef Plan pl
    fill_plan(&pl, cell, rows, D, H, P, proj, dtype == np.float32, rows.hrow, V, tok)
    pl.bs = s["bs"]  # the forward's layout (the cells and the split by rows take any)
    if pl.bs >= H and not pl.by_rows:
        pl.nt = 1  # the natural layout is not split by units
    (dy,) = as_c_array(dtype, dy)
    dY = np.ascontiguousarray(rows.pack(dy))
    dh = np.zeros((N, P), dtype) if dhT is None else rows.sort(np.asarray(dhT, dtype))
    dc = None
    if is_lstm:
        dc = np.zeros((N, H), dtype) if dcT is None else rows.sort(np.asarray(dcT, dtype))
    hprev = np.ascontiguousarray(rows.previous(hs, P))
    cdef Py_ssize_t n_da = R * GH, n_dah = R * GH if is_gru else 0
    cdef Py_ssize_t n_dht = R * P if proj else 0, n_dr = N * H if proj else 0
    cdef Py_ssize_t n_s = GH * (D + P + 2), n_p = GH * P if pl.panels else 0
    cdef Py_ssize_t n_dx = R * D if rows.perm is not None and not lookup else 0
    cdef Py_ssize_t n_tab = V * GH
    cdef Py_ssize_t n_sp = seq_panel_sizes(R, D, P, GH) if pl.seq_own else 0
    ws = take_scratch(dtype, n_da + n_dah + n_dht + n_dr + n_s + n_p + n_dx + n_tab + n_sp)
    parts = []  # consecutive pieces of ws (slices: np.split costs ~13 us a call here)
    cdef Py_ssize_t at = 0
    for n in (n_da, n_dah, n_dht, n_dr, n_s, n_p, n_dx, n_tab, n_sp):
        parts.append(ws[at : at + n])
        at += n
    dax, dah, dht, dr, scratch, panels, dX, dtab, seqpan = parts
    if not is_gru:
        dah = dax  # one gradient for the input and the recurrent pre-activations
    if lookup:
        pl.dtab = data(dtab)
        dx = dX = np.empty((V, D), dtype)  # the embedding's gradient
    elif rows.perm is None:
        dx = output((T, N, D), dtype)
        dX = dx
    dw_ih = np.empty((GH, D), dtype)
    dw_hh = np.empty((GH, P), dtype)
    db1 = np.empty(GH, dtype)
    db2 = np.empty(GH, dtype) if is_gru else None
    dw_hr = np.empty((P, H), dtype) if proj else None
    run_pass(&pl, True, dtype == np.float32, (
        X, w_ih_b, w_hh_b, w_hr, acts, hs, cs, rs, hprev, dY, dh, dc, dax, dah,
        dht if proj else None, dr if proj else None, dX, dw_ih, dw_hh, db1, db2, dw_hr, scratch,
        panels if n_p else None, seqpan if n_sp else None,
    ))
    if rows.perm is not None and not lookup:
        dx = rows.unpack(dX[: R * D].reshape(R, D), D, dtype)
    give_scratch(ws)
    dh0 = rows.unsort(dh)
    dc0 = rows.unsort(dc) if is_lstm else None
    return dx, dh0, dc0, dw_ih, dw_hh, db1, db2, dw_hr


# ------------------------------------------------------------------------------------------------
# the backend interface (fastrnn/backends/base.py): one registration per cell
# ------------------------------------------------------------------------------------------------


# Each forward also takes ``tokens=`` (T, N) integers, x then being an embedding table (V, D)
# (see _forward): fastrnn.nn's layers fold an Embedding into the first layer this way.


def lstm_forward(x, h0, c0, w_ih, w_hh, b, lengths, training, w_hr=None, tokens=None):
    """LSTM forward (L1-L5, L4p with w_hr) -> y (T,N,P), hT (N,P), cT (N,H), ctx."""
    return _forward(FR_LSTM, x, h0, c0, w_ih, w_hh, b, None, w_hr, lengths, training, tokens)


def lstm_backward(ctx, dy, dhT, dcT):
    """LSTM backward (LB1-LB5) -> dx, dh0, dc0, dw_ih, dw_hh, db (+ dw_hr with a projection)."""
    dx, dh0, dc0, dw_ih, dw_hh, db, _, dw_hr = _backward(ctx, dy, dhT, dcT)
    if dw_hr is None:
        return dx, dh0, dc0, dw_ih, dw_hh, db
    return dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr


def gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, training, tokens=None):
    """GRU forward (G1-G5) -> y (T,N,H), hT (N,H), ctx."""
    y, hT, _, ctx = _forward(FR_GRU, x, h0, None, w_ih, w_hh, b_ih, b_hh, None, lengths, training,
                             tokens)
    return y, hT, ctx


def gru_backward(ctx, dy, dhT):
    """GRU backward (GB1-GB5) -> dx, dh0, dw_ih, dw_hh, db_ih, db_hh."""
    dx, dh0, _, dw_ih, dw_hh, db_ih, db_hh, _ = _backward(ctx, dy, dhT, None)
    return dx, dh0, dw_ih, dw_hh, db_ih, db_hh


def rnn_forward(x, h0, w_ih, w_hh, b, nonlinearity, lengths, training, tokens=None):
    """Elman RNN forward (R1-R4) -> y (T,N,H), hT (N,H), ctx."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
    cell = FR_RNN_TANH if nonlinearity == "tanh" else FR_RNN_RELU
    y, hT, _, ctx = _forward(cell, x, h0, None, w_ih, w_hh, b, None, None, lengths, training,
                             tokens)
    return y, hT, ctx


def rnn_backward(ctx, dy, dhT):
    """Elman RNN backward (RB1-RB4) -> dx, dh0, dw_ih, dw_hh, db."""
    dx, dh0, _, dw_ih, dw_hh, db, _, _ = _backward(ctx, dy, dhT, None)
    return dx, dh0, dw_ih, dw_hh, db
