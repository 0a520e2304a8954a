# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# distutils: extra_compile_args = -fno-trapping-math --param=vect-max-version-for-alias-checks=200
"""Elman RNN (tanh or relu) over a whole sequence on the CPU: Cython + OpenMP + BLAS.

Same math and layout as fastrnn/reference/rnn.py; the comments cite its steps R1..R4 and
RB1..RB4. The structure is lstm.pyx's (read its module docstring for the threading and why)
with one gate, so the weights are used in their natural layout, uncopied: thread p owns the
hidden units [u0, u1), i.e. rows u0..u1 of W_ih and W_hh.
"""

cimport numpy as cnp
import numpy as np
from cython.parallel cimport parallel

from fastrnn._cpu._blas cimport floating
from fastrnn._cpu._openmp cimport omp_get_num_threads, omp_get_thread_num
from fastrnn._cpu._recurrent_common cimport (
    BLOCK,
    fr_barrier,
    fr_blas_pin_one,
    fr_blas_register,
    fr_blas_restore,
    fr_rnn_tanh_row_f,
    memcpy,
    mm,
    project_rows,
    sequence_grads,
    step_mm,
    pack_panels,
    panel_mm,
    use_panels,
    fr_small_gemm_init,
    step_gemm,
    transpose_rows,
    tanh_,
    unit_range,
)

from fastrnn._cpu._recurrent_threads import (
    as_c_array,
    blas_thread_functions,
    fallback_limit,
    give_scratch,
    sequence_threads,
    take_saved,
    take_scratch,
    team_size,
)
from fastrnn.context import Context

cnp.import_array()
fr_small_gemm_init()
for _set_fn, _get_fn in blas_thread_functions():
    fr_blas_register(_set_fn, _get_fn)

_NONLINEARITIES = {"tanh": 0, "relu": 1}


cdef inline void* data(object a) noexcept:
    return cnp.PyArray_DATA(<cnp.ndarray> a)


cdef inline const long long* lengths_ptr(object lengths) noexcept:
    return NULL if lengths is None else <const long long*> cnp.PyArray_DATA(lengths)


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------


cdef inline void fwd_point(
    const floating* at,          # IN  (N, H) x_t W_ih^T + h_{t-1} W_hh^T (no bias)
    const floating* b,           # IN  (H,)
    const floating* hp,          # IN  (N, H) h_{t-1}
    floating* hn,                # OUT (N, H) h_t (never aliases hp)
    floating* yt,                # OUT (N, H)
    bint relu, const long long* lengths,
    Py_ssize_t t, Py_ssize_t N, Py_ssize_t H, Py_ssize_t bs, Py_ssize_t u0, Py_ssize_t u1,
) noexcept nogil:
    """R3-R4 for the units [u0, u1) of every sequence at step t (the bias is added here)."""
    cdef Py_ssize_t n, j, k
    cdef floating a
    for n in range(N):
        k = n * H
        if lengths != NULL and t >= lengths[n]:
            # R4: past its length a sequence keeps its state and emits zeros.
            for j in range(k + u0, k + u1):
                hn[j] = hp[j]
                yt[j] = 0
            continue
        # R3: the nonlinearity.
        if relu:
            for j in range(u0, u1):
                a = at[k + j] + b[j]
                a = a if a > 0 else 0
                hn[k + j] = a
                yt[k + j] = a
        elif floating is float:
            fr_rnn_tanh_row_f(at + k, b, hn + k, yt + k, u0, u1)
        else:
            for j in range(u0, u1):
                a = tanh_(at[k + j] + b[j])
                hn[k + j] = a
                yt[k + j] = a


cdef void fwd_thread(
    int p, int nt, Py_ssize_t bs, bint whole, bint training, bint relu,
    Py_ssize_t T, Py_ssize_t N, Py_ssize_t D, Py_ssize_t H,
    const floating* x,           # IN  (T, N, D)
    const floating* w_ih,        # IN  (H, D)
    const floating* w_hh,        # IN  (H, H)
    const floating* b,           # IN  (H,)
    const long long* lengths,
    floating* xw,                # scratch (T, N, H) pre-activations without bias
    floating* hs,                # INOUT (T+1, N, H) when training, else a ring (2, N, H)
    floating* y,                 # OUT (T, N, H)
    bint use_t,                  # IN  run R2 from W_hh^T
    floating* w_hh_t,            # scratch (H, H) W_hh^T when use_t
    floating* panels,            # scratch (H * H) W_hh^T's columns in panels, or NULL
) noexcept nogil:
    cdef Py_ssize_t u0, u1, t, NH = N * H
    cdef Py_ssize_t cur, nxt
    unit_range(H, bs, nt, p, &u0, &u1)
    if use_t:  # this thread's columns of W_hh^T: no barrier, only it reads them
        transpose_rows(w_hh, H, H, u0, u1, w_hh_t)
    if floating is float:
        if panels != NULL:  # and packed into panels, once per call (only it reads them)
            pack_panels(H, u1 - u0, w_hh_t + u0, H, panels + H * u0)
    # R1: the input projection of all T steps, this thread's columns, one GEMM.
    if whole:  # else fwd_run has done it, split by rows
        mm(False, True, T * N, u1 - u0, D, <floating> 1, x, D, w_ih + u0 * D, D, <floating> 0,
           xw + u0, H)
    for t in range(T):
        cur = t if training else t & 1
        nxt = t + 1 if training else (t + 1) & 1
        # R2: the recurrent projection of this thread's columns, added onto R1's.
        if floating is float:
            if panels != NULL:
                panel_mm(N, u1 - u0, H, hs + cur * NH, H, w_hh_t + u0, H, panels + H * u0, 1,
                         xw + t * NH + u0, H)
            else:
                step_gemm(use_t, N, H, H, u0, u1, hs + cur * NH, w_hh, w_hh_t, <floating> 1,
                          xw + t * NH)
        else:
            step_gemm(use_t, N, H, H, u0, u1, hs + cur * NH, w_hh, w_hh_t, <floating> 1,
                      xw + t * NH)
        fwd_point(xw + t * NH, b, hs + cur * NH, hs + nxt * NH, y + t * NH, relu, lengths, t,
                  N, H, bs, u0, u1)
        # Every thread's part of h_t must be written before any thread's next R2 reads h_t.
        fr_barrier()


cdef void fwd_run(
    int nt, int seq_threads, Py_ssize_t bs, bint training, bint relu, Py_ssize_t T, Py_ssize_t N,
    Py_ssize_t D, Py_ssize_t H,
    const floating* x, const floating* w_ih, const floating* w_hh, const floating* b,
    const long long* lengths, floating* xw, floating* hs, floating* y, floating* hT,
    bint use_t, floating* w_hh_t, floating* panels,
) noexcept nogil:
    cdef int saved[8]
    cdef int p, team
    cdef Py_ssize_t last = T if training else T & 1
    fr_blas_pin_one(saved)
    if nt > 1:
        with parallel(num_threads=nt):
            p = omp_get_thread_num()
            team = omp_get_num_threads()
            fwd_thread(p, team, bs, True, training, relu, T, N, D, H, x, w_ih, w_hh, b, lengths, xw,
                       hs, y, use_t, w_hh_t, panels)
    else:
        # R1 split by rows over the threads, then the time loop on one thread
        if seq_threads > 1:
            with parallel(num_threads=seq_threads):
                p = omp_get_thread_num()
                team = omp_get_num_threads()
                project_rows(p, team, T * N, D, H, x, w_ih, xw)
        else:
            project_rows(0, 1, T * N, D, H, x, w_ih, xw)
        fwd_thread(0, 1, bs, False, training, relu, T, N, D, H, x, w_ih, w_hh, b, lengths, xw, hs,
                   y, use_t, w_hh_t, panels)
    memcpy(hT, hs + last * N * H, N * H * sizeof(floating))
    fr_blas_restore(saved)


def rnn_forward(x, h0, w_ih, w_hh, b, nonlinearity, lengths, training):
    """Elman RNN forward (R1-R4). x (T,N,D); h0 (N,H); w_ih (H,D); w_hh (H,H); b (H,);
    nonlinearity "tanh" or "relu"; lengths None or int64 (N,); training bool ->
    y (T,N,H), hT (N,H), ctx (None if not training)."""
    if nonlinearity not in _NONLINEARITIES:
        raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
    dtype = x.dtype
    x, h0, w_ih, w_hh, b = as_c_array(dtype, x, h0, w_ih, w_hh, b)
    if lengths is not None:
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    cdef Py_ssize_t T = x.shape[0], N = x.shape[1], D = x.shape[2], H = w_hh.shape[1]
    cdef bint train = bool(training)
    cdef bint relu = _NONLINEARITIES[nonlinearity]
    cdef int nt = team_size(N, H, 1)
    cdef int seq_threads = sequence_threads(T, N, D, H, 1)
    cdef Py_ssize_t bs = BLOCK  # one gate: any block size is the natural layout
    # the states backward reads come from the saved pool when training (reused across calls)
    hs = take_saved(dtype, (T + 1) * N * H).reshape(T + 1, N, H) if train else np.empty(
        (2, N, H), dtype
    )
    hs[0] = h0
    y = np.empty((T, N, H), dtype)
    # R2 from W_hh^T (see step_gemm) when the batch and the sequence repay the transposition
    cdef bint use_t = N >= 4 and T >= 4
    cdef Py_ssize_t n_t = H * H if use_t else 0
    # float32: W_hh^T also packed in panels (panel_mm)
    cdef Py_ssize_t n_p = n_t if use_t and dtype == np.float32 and use_panels(N, T) else 0
    ws = take_scratch(dtype, T * N * H + n_t + n_p)
    xw = ws[: T * N * H]
    w_hh_t = ws[T * N * H : T * N * H + n_t]
    panels = ws[T * N * H + n_t : T * N * H + n_t + n_p]
    hT = np.empty((N, H), dtype)
    cdef const long long* lens = lengths_ptr(lengths)
    cdef void* p_x = data(x)
    cdef void* p_w_ih = data(w_ih)
    cdef void* p_w_hh = data(w_hh)
    cdef void* p_b = data(b)
    cdef void* p_xw = data(xw)
    cdef void* p_hs = data(hs)
    cdef void* p_y = data(y)
    cdef void* p_hT = data(hT)
    cdef void* p_w_hh_t = data(w_hh_t)
    cdef void* p_panels = data(panels) if n_p > 0 else NULL
    with fallback_limit(nt):
        if dtype == np.float32:
            with nogil:
                fwd_run(nt, seq_threads, bs, train, relu, T, N, D, H, <float*> p_x, <float*> p_w_ih,
                        <float*> p_w_hh, <float*> p_b, lens, <float*> p_xw, <float*> p_hs,
                        <float*> p_y, <float*> p_hT, use_t, <float*> p_w_hh_t,
                        <float*> p_panels)
        else:
            with nogil:
                fwd_run(nt, seq_threads, bs, train, relu, T, N, D, H, <double*> p_x,
                        <double*> p_w_ih,
                        <double*> p_w_hh, <double*> p_b, lens, <double*> p_xw,
                        <double*> p_hs, <double*> p_y, <double*> p_hT, use_t,
                        <double*> p_w_hh_t, <double*> NULL)
    give_scratch(ws)
    if not train:
        return y, hT, None
    ctx = Context(
        op="rnn",
        backend="cpu",
        dtype=dtype,
        cupy=False,
        grad_shapes={"dy": (T, N, H), "dhT": (N, H)},
        saved=dict(x=x, w_ih=w_ih, w_hh=w_hh, hs=hs, lengths=lengths, relu=relu),
    )
    return y, hT, ctx


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------


cdef inline void bwd_point(
    const floating* hn,          # IN    (N, H) h_t (the activation, where the step is valid)
    const floating* dyt,         # IN    (N, H)
    floating* dh,                # INOUT (N, H) in: gradient reaching h_t from later steps;
                                 #       out: the part of dh_{t-1} not from R2's GEMM
    floating* dat,               # OUT   (N, H) gradient of the pre-activation of step t
    bint relu, const long long* lengths,
    Py_ssize_t t, Py_ssize_t N, Py_ssize_t H, Py_ssize_t bs, Py_ssize_t u0, Py_ssize_t u1,
) noexcept nogil:
    """RB1-RB3 for the units [u0, u1) of every sequence at step t."""
    cdef Py_ssize_t n, j, k
    cdef floating h
    for n in range(N):
        k = n * H
        if lengths != NULL and t >= lengths[n]:
            # RB1: a padded position ignores dy and passes dh through unchanged (R4).
            for j in range(k + u0, k + u1):
                dat[j] = 0
            continue
        # RB1-RB2: gradient reaching h_t, through the nonlinearity.
        if relu:
            for j in range(k + u0, k + u1):
                dat[j] = (dyt[j] + dh[j]) if hn[j] > 0 else 0
                dh[j] = 0
        else:
            for j in range(k + u0, k + u1):
                h = hn[j]
                dat[j] = (dyt[j] + dh[j]) * (1 - h * h)
                dh[j] = 0


cdef void bwd_thread(
    int p, int nt, Py_ssize_t bs, bint whole, bint relu, Py_ssize_t T, Py_ssize_t N,
    Py_ssize_t D, Py_ssize_t H,
    const floating* x, const floating* w_ih, const floating* w_hh,
    const floating* hs,          # IN  (T+1, N, H)
    const long long* lengths,
    const floating* dy,          # IN  (T, N, H)
    floating* dh,                # INOUT (N, H) dhT in, dh0 out
    floating* da,                # OUT (T, N, H) pre-activation gradients (scratch)
    floating* dx, floating* dw_ih, floating* dw_hh, floating* db,
    floating* panels,            # scratch (H * H) W_hh's columns in panels, or NULL
) noexcept nogil:
    cdef Py_ssize_t u0, u1, t, NH = N * H
    unit_range(H, bs, nt, p, &u0, &u1)
    if floating is float:
        if panels != NULL:  # this thread's columns of W_hh, once per call (only it reads them)
            pack_panels(H, u1 - u0, w_hh + u0, H, panels + H * u0)
    for t in range(T - 1, -1, -1):
        bwd_point(hs + (t + 1) * NH, dy + t * NH, dh, da + t * NH, relu, lengths, t, N, H, bs, u0,
                  u1)
        # All of da_t must be written before any thread's GEMM reads it.
        fr_barrier()
        # RB3: this thread's columns of dh_{t-1} += da_t W_hh (its next pointwise pass reads
        # only these columns, so no second barrier).
        if floating is float:
            if panels != NULL:
                panel_mm(N, u1 - u0, H, da + t * NH, H, w_hh + u0, H, panels + H * u0, 1,
                         dh + u0, H)
            else:
                step_mm(N, u1 - u0, H, da + t * NH, H, w_hh + u0, H, <floating> 1, dh + u0, H)
        else:
            step_mm(N, u1 - u0, H, da + t * NH, H, w_hh + u0, H, <floating> 1, dh + u0, H)
    if whole:  # else bwd_run does it, with its own threads
        fr_barrier()
        # RB4: weight, bias and input gradients as whole-sequence GEMMs.
        sequence_grads(p, nt, 1, T * N, D, H, bs, da, da, x, hs, w_ih, dx, dw_ih, dw_hh, db,
                       <floating*> NULL, <floating*> NULL)


cdef void bwd_run(
    int nt, int seq_threads, Py_ssize_t bs, bint relu, Py_ssize_t T, Py_ssize_t N, Py_ssize_t D,
    Py_ssize_t H,
    const floating* x, const floating* w_ih, const floating* w_hh, const floating* hs,
    const long long* lengths, const floating* dy, floating* dh, floating* da, floating* dx,
    floating* dw_ih, floating* dw_hh, floating* db, floating* panels,
) noexcept nogil:
    cdef int saved[8]
    cdef int p, team
    fr_blas_pin_one(saved)
    if nt > 1:
        with parallel(num_threads=nt):
            p = omp_get_thread_num()
            team = omp_get_num_threads()
            bwd_thread(p, team, bs, True, relu, T, N, D, H, x, w_ih, w_hh, hs, lengths, dy, dh, da,
                       dx, dw_ih, dw_hh, db, panels)
    else:
        # the time loop on one thread, then the whole-sequence GEMMs split over the threads
        bwd_thread(0, 1, bs, False, relu, T, N, D, H, x, w_ih, w_hh, hs, lengths, dy, dh, da, dx,
                   dw_ih, dw_hh, db, panels)
        if seq_threads > 1:
            with parallel(num_threads=seq_threads):
                p = omp_get_thread_num()
                team = omp_get_num_threads()
                sequence_grads(p, team, 1, T * N, D, H, bs, da, da, x, hs, w_ih, dx, dw_ih, dw_hh,
                               db, <floating*> NULL, <floating*> NULL)
        else:
            sequence_grads(0, 1, 1, T * N, D, H, bs, da, da, x, hs, w_ih, dx, dw_ih, dw_hh, db,
                           <floating*> NULL, <floating*> NULL)
    fr_blas_restore(saved)


def rnn_backward(ctx, dy, dhT):
    """Elman RNN backward (RB1-RB4). dy (T,N,H); dhT (N,H) or None ->
    dx (T,N,D), dh0 (N,H), dw_ih (H,D), dw_hh (H,H), db (H,)."""
    s = ctx.saved
    x = s["x"]
    w_ih = s["w_ih"]
    w_hh = s["w_hh"]
    hs = s["hs"]
    lengths = s["lengths"]
    cdef bint relu = s["relu"]
    dtype = x.dtype
    cdef Py_ssize_t T = x.shape[0], N = x.shape[1], D = x.shape[2], H = hs.shape[2]
    (dy,) = as_c_array(dtype, dy)
    dh = np.zeros((N, H), dtype) if dhT is None else np.array(dhT, dtype=dtype, order="C")
    cdef int nt = team_size(N, H, 1)
    cdef int seq_threads = sequence_threads(T, N, D, H, 1)
    cdef Py_ssize_t bs = BLOCK
    # float32: W_hh also packed in panels (panel_mm)
    cdef Py_ssize_t n_p = H * H if dtype == np.float32 and use_panels(N, T) else 0
    ws = take_scratch(dtype, T * N * H + n_p)
    da = ws[: T * N * H]
    panels = ws[T * N * H : T * N * H + n_p]
    dx = np.empty((T, N, D), dtype)
    dw_ih = np.empty((H, D), dtype)
    dw_hh = np.empty((H, H), dtype)
    db = np.empty(H, dtype)
    cdef const long long* lens = lengths_ptr(lengths)
    cdef void* p_x = data(x)
    cdef void* p_w_ih = data(w_ih)
    cdef void* p_w_hh = data(w_hh)
    cdef void* p_hs = data(hs)
    cdef void* p_dy = data(dy)
    cdef void* p_dh = data(dh)
    cdef void* p_da = data(da)
    cdef void* p_dx = data(dx)
    cdef void* p_dw_ih = data(dw_ih)
    cdef void* p_dw_hh = data(dw_hh)
    cdef void* p_db = data(db)
    cdef void* p_panels = data(panels) if n_p > 0 else NULL
    with fallback_limit(nt):
        if dtype == np.float32:
            with nogil:
                bwd_run(nt, seq_threads, bs, relu, T, N, D, H, <float*> p_x, <float*> p_w_ih,
                        <float*> p_w_hh,
                        <float*> p_hs, lens, <float*> p_dy, <float*> p_dh, <float*> p_da,
                        <float*> p_dx, <float*> p_dw_ih, <float*> p_dw_hh, <float*> p_db,
                        <float*> p_panels)
        else:
            with nogil:
                bwd_run(nt, seq_threads, bs, relu, T, N, D, H, <double*> p_x, <double*> p_w_ih,
                        <double*> p_w_hh, <double*> p_hs, lens, <double*> p_dy,
                        <double*> p_dh, <double*> p_da, <double*> p_dx, <double*> p_dw_ih,
                        <double*> p_dw_hh, <double*> p_db, <double*> NULL)
    give_scratch(ws)
    return dx, dh, dw_ih, dw_hh, db
