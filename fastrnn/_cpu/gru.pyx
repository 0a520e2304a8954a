# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# distutils: extra_compile_args = -fno-trapping-math --param=vect-max-version-for-alias-checks=200
"""GRU over a whole sequence on the CPU: Cython + OpenMP + BLAS (scipy.linalg.cython_blas).

Same math, layouts and gate order (r, z, n) as fastrnn/reference/gru.py; the comments cite its
steps G1..G5 and GB1..GB5. The structure is lstm.pyx's (read its module docstring for the
threading and why): blocked gate layout with 3 gates per unit, one GEMM for the input projection,
per step one recurrent GEMM per thread + a fused pointwise pass + one barrier; backward per step a
fused pointwise pass + a barrier + one GEMM for dh; whole-sequence GEMMs for the rest.

Unlike the LSTM, the recurrent GEMM's output is kept apart from the input projection's (the
n gate multiplies W_hn h + b_hn by r), in a per-step scratch whose columns only their thread
touches; and backward needs two gate-gradient sequences: da_x (for dx, dW_ih, db_ih) and da_h
(for dh, dW_hh, db_hh), which differ in the n gate (da_n vs da_n * r).
"""

cimport numpy as cnp
import numpy as np
from cython.parallel cimport parallel

from fastrnn._cpu._blas cimport floating
from fastrnn._cpu._openmp cimport omp_get_num_threads, omp_get_thread_num
from fastrnn._cpu._recurrent_common cimport (
    BLOCK,
    block_size,
    fr_barrier,
    fr_blas_pin_one,
    fr_blas_register,
    fr_blas_restore,
    fr_gru_bwd_row_f,
    fr_gru_fwd_row_f,
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
    sigmoid,
    tanh_,
    to_blocked,
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

cdef enum:
    G = 3      # gates per hidden unit: r, z, n
    S = 4      # saved values per hidden unit: r, z, n, hn (= W_hn h + b_hn)


cdef inline void* data(object a) noexcept:
    return cnp.PyArray_DATA(<cnp.ndarray> a)


cdef inline const long long* lengths_ptr(object lengths) noexcept:
    return NULL if lengths is None else <const long long*> cnp.PyArray_DATA(lengths)


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------


cdef inline void fwd_point(
    const floating* xt,          # IN  (N, 3H) blocked: x_t W_ih^T (no bias)
    const floating* hw,          # IN  (N, 3H) blocked: h_{t-1} W_hh^T (no bias)
    const floating* b_ih,        # IN  (3H,) blocked
    const floating* b_hh,        # IN  (3H,) blocked
    const floating* hp,          # IN  (N, H) h_{t-1}
    floating* hn,                # OUT (N, H) h_t (never aliases hp)
    floating* yt,                # OUT (N, H)
    floating* st,                # OUT (N, 4H) blocked r, z, n, hn, or NULL (not training)
    const long long* lengths,
    Py_ssize_t t, Py_ssize_t N, Py_ssize_t H, Py_ssize_t bs, Py_ssize_t u0, Py_ssize_t u1,
) noexcept nogil:
    """G3-G5 for the units [u0, u1) of every sequence at step t (the biases are added here)."""
    cdef Py_ssize_t n, j, j0, sz, u, k
    cdef const floating* xa
    cdef const floating* ha
    cdef const floating* bi
    cdef const floating* bh
    cdef floating* sa
    cdef floating r, z, nn, hh, h
    for n in range(N):
        if lengths != NULL and t >= lengths[n]:
            # G5: past its length a sequence keeps its state and emits zeros.
            for j in range(n * H + u0, n * H + u1):
                hn[j] = hp[j]
                yt[j] = 0
            continue
        if floating is float:
            fr_gru_fwd_row_f(xt + n * G * H, hw + n * G * H, b_ih, b_hh, hp + n * H, hn + n * H,
                             yt + n * H, st + n * S * H if st != NULL else NULL, H, bs, u0, u1)
        else:
            j0 = u0
            while j0 < u1:
                sz = block_size(bs, H, j0)
                k = n * G * H + G * j0
                xa = xt + k
                ha = hw + k
                bi = b_ih + G * j0
                bh = b_hh + G * j0
                for u in range(sz):
                    j = n * H + j0 + u
                    # G3: gates.
                    r = sigmoid(xa[u] + bi[u] + ha[u] + bh[u])
                    z = sigmoid(xa[sz + u] + bi[sz + u] + ha[sz + u] + bh[sz + u])
                    hh = ha[2 * sz + u] + bh[2 * sz + u]
                    nn = tanh_(xa[2 * sz + u] + bi[2 * sz + u] + r * hh)
                    # G4: new state.
                    h = (1 - z) * nn + z * hp[j]
                    hn[j] = h
                    yt[j] = h
                    if st != NULL:
                        sa = st + n * S * H + S * j0
                        sa[u] = r
                        sa[sz + u] = z
                        sa[2 * sz + u] = nn
                        sa[3 * sz + u] = hh
                j0 += sz


cdef void fwd_thread(
    int p, int nt, Py_ssize_t bs, bint whole, bint training,
    Py_ssize_t T, Py_ssize_t N, Py_ssize_t D, Py_ssize_t H,
    const floating* x,           # IN  (T, N, D)
    const floating* w_ih_b,      # IN  (3H, D) blocked
    const floating* w_hh_b,      # IN  (3H, H) blocked
    const floating* b_ih_b,      # IN  (3H,) blocked
    const floating* b_hh_b,      # IN  (3H,) blocked
    const long long* lengths,
    floating* xw,                # scratch (T, N, 3H) blocked input projections
    floating* hw,                # scratch (N, 3H) blocked recurrent projection of one step
    floating* acts,              # OUT (T, N, 4H) blocked r, z, n, hn (training only)
    floating* hs,                # INOUT (T+1, N, H) when training, else a ring (2, N, H)
    floating* y,                 # OUT (T, N, H)
    bint use_t,                  # IN  run G2 from W_hh^T
    floating* w_hh_t,            # scratch (H, 3H) W_hh^T (blocked columns) when use_t
    floating* panels,            # scratch (H * 3H) W_hh^T's columns in panels, or NULL
) noexcept nogil:
    cdef Py_ssize_t u0, u1, t, NH = N * H, step = N * G * H
    cdef Py_ssize_t cur, nxt
    unit_range(H, bs, nt, p, &u0, &u1)
    if use_t:  # this thread's gate columns of W_hh^T: no barrier, only it reads them
        transpose_rows(w_hh_b, G * H, H, G * u0, G * u1, w_hh_t)
    if floating is float:
        if panels != NULL:  # and packed into panels, once per call (only it reads them)
            pack_panels(H, G * (u1 - u0), w_hh_t + G * u0, G * H, panels + H * G * u0)
    # G1: the input projection of all T steps, this thread's gate columns, one GEMM.
    if whole:  # else fwd_run has done it, split by rows
        mm(False, True, T * N, G * (u1 - u0), D, <floating> 1, x, D, w_ih_b + G * u0 * D, D,
           <floating> 0, xw + G * u0, G * H)
    for t in range(T):
        cur = t if training else t & 1
        nxt = t + 1 if training else (t + 1) & 1
        # G2: the recurrent projection of this thread's gate columns.
        if floating is float:
            if panels != NULL:
                panel_mm(N, G * (u1 - u0), H, hs + cur * NH, H, w_hh_t + G * u0, G * H,
                         panels + H * G * u0, 0, hw + G * u0, G * H)
            else:
                step_gemm(use_t, N, H, G * H, G * u0, G * u1, hs + cur * NH, w_hh_b, w_hh_t,
                          <floating> 0, hw)
        else:
            step_gemm(use_t, N, H, G * H, G * u0, G * u1, hs + cur * NH, w_hh_b, w_hh_t,
                      <floating> 0, hw)
        fwd_point(xw + t * step, hw, b_ih_b, b_hh_b, hs + cur * NH, hs + nxt * NH, y + t * NH,
                  acts + t * N * S * H if training else <floating*> NULL, lengths, t, N, H, bs,
                  u0, u1)
        # Every thread's part of h_t must be written before any thread's next G2 reads h_t.
        fr_barrier()


cdef void fwd_run(
    int nt, int seq_threads, Py_ssize_t bs, bint training, Py_ssize_t T, Py_ssize_t N,
    Py_ssize_t D, Py_ssize_t H,
    const floating* x, const floating* w_ih, const floating* w_hh, const floating* b_ih,
    const floating* b_hh, const long long* lengths,
    floating* w_ih_b, floating* w_hh_b, floating* b_ih_b, floating* b_hh_b,
    floating* xw, floating* hw, floating* acts, floating* hs, floating* y, floating* hT,
    bint use_t, floating* w_hh_t, floating* panels,
) noexcept nogil:
    cdef int saved[8]
    cdef int p, team
    cdef Py_ssize_t last = T if training else T & 1
    fr_blas_pin_one(saved)
    if bs < H:  # else the natural layout is the blocked one and w_ih_b is w_ih, etc.
        to_blocked(w_ih, w_ih_b, G, H, D, bs)
        to_blocked(w_hh, w_hh_b, G, H, H, bs)
        to_blocked(b_ih, b_ih_b, G, H, 1, bs)
        to_blocked(b_hh, b_hh_b, G, H, 1, bs)
    if nt > 1:
        with parallel(num_threads=nt):
            p = omp_get_thread_num()
            team = omp_get_num_threads()
            fwd_thread(p, team, bs, True, training, T, N, D, H, x, w_ih_b, w_hh_b, b_ih_b, b_hh_b,
                       lengths, xw, hw, acts, hs, y, use_t, w_hh_t, panels)
    else:
        # G1 split by rows over the threads, then the time loop on one thread
        if seq_threads > 1:
            with parallel(num_threads=seq_threads):
                p = omp_get_thread_num()
                team = omp_get_num_threads()
                project_rows(p, team, T * N, D, G * H, x, w_ih_b, xw)
        else:
            project_rows(0, 1, T * N, D, G * H, x, w_ih_b, xw)
        fwd_thread(0, 1, bs, False, training, T, N, D, H, x, w_ih_b, w_hh_b, b_ih_b, b_hh_b,
                   lengths, xw, hw, acts, hs, y, use_t, w_hh_t, panels)
    memcpy(hT, hs + last * N * H, N * H * sizeof(floating))
    fr_blas_restore(saved)


def gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, training):
    """GRU forward (G1-G5). x (T,N,D); h0 (N,H); w_ih (3H,D); w_hh (3H,H); b_ih, b_hh (3H,);
    lengths None or int64 (N,); training bool -> y (T,N,H), hT (N,H), ctx (None if not
    training). Arrays: C-contiguous, one float dtype (fastrnn.gru_forward guarantees it)."""
    dtype = x.dtype
    x, h0, w_ih, w_hh, b_ih, b_hh = as_c_array(dtype, x, h0, w_ih, w_hh, b_ih, b_hh)
    if lengths is not None:
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    cdef Py_ssize_t T = x.shape[0], N = x.shape[1], D = x.shape[2], H = w_hh.shape[1]
    cdef bint train = bool(training)
    cdef int nt = team_size(N, H, G)
    cdef int seq_threads = sequence_threads(T, N, D, H, G)
    # One thread needs no partition: the natural layout is the blocked one with one block of H
    # units, and the weights are used uncopied.
    cdef Py_ssize_t bs = BLOCK if nt > 1 else H
    # What backward reads (states, activations) shares one buffer from the saved pool when
    # training: reused across calls, so its pages are not faulted in and zeroed every call.
    cdef Py_ssize_t n_states = (T + 1) * N * H
    if train:
        keep = take_saved(dtype, n_states + T * N * S * H)
        hs = keep[:n_states].reshape(T + 1, N, H)
        acts = keep[n_states:].reshape(T, N, S * H)
    else:
        hs = np.empty((2, N, H), dtype)
        acts = np.empty(1, dtype)
    hs[0] = h0
    y = np.empty((T, N, H), dtype)
    # G2 from W_hh^T (see step_gemm) when the batch and the sequence repay the transposition
    cdef bint use_t = N >= 4 and T >= 4
    cdef Py_ssize_t n_t = G * H * H if use_t else 0
    # float32: W_hh^T also packed in panels (panel_mm)
    cdef Py_ssize_t n_p = n_t if use_t and dtype == np.float32 and use_panels(N, T) else 0
    ws = take_scratch(dtype, (T + 1) * N * G * H + n_t + n_p)
    xw = ws[: T * N * G * H]
    hw = ws[T * N * G * H : (T + 1) * N * G * H]
    w_hh_t = ws[(T + 1) * N * G * H : (T + 1) * N * G * H + n_t]
    panels = ws[(T + 1) * N * G * H + n_t : (T + 1) * N * G * H + n_t + n_p]
    if bs < H:
        w_ih_b = np.empty((G * H, D), dtype)
        w_hh_b = np.empty((G * H, H), dtype)
        b_ih_b = np.empty(G * H, dtype)
        b_hh_b = np.empty(G * H, dtype)
    else:
        w_ih_b, w_hh_b, b_ih_b, b_hh_b = w_ih, w_hh, b_ih, b_hh
    hT = np.empty((N, H), dtype)
    cdef const long long* lens = lengths_ptr(lengths)
    cdef void* p_x = data(x)
    cdef void* p_w_ih = data(w_ih)
    cdef void* p_w_hh = data(w_hh)
    cdef void* p_b_ih = data(b_ih)
    cdef void* p_b_hh = data(b_hh)
    cdef void* p_w_ih_b = data(w_ih_b)
    cdef void* p_w_hh_b = data(w_hh_b)
    cdef void* p_b_ih_b = data(b_ih_b)
    cdef void* p_b_hh_b = data(b_hh_b)
    cdef void* p_xw = data(xw)
    cdef void* p_hw = data(hw)
    cdef void* p_acts = data(acts)
    cdef void* p_hs = data(hs)
    cdef void* p_y = data(y)
    cdef void* p_hT = data(hT)
    cdef void* p_w_hh_t = data(w_hh_t)
    cdef void* p_panels = data(panels) if n_p > 0 else NULL
    with fallback_limit(nt):
        if dtype == np.float32:
            with nogil:
                fwd_run(nt, seq_threads, bs, train, T, N, D, H, <float*> p_x, <float*> p_w_ih,
                        <float*> p_w_hh,
                        <float*> p_b_ih, <float*> p_b_hh, lens, <float*> p_w_ih_b,
                        <float*> p_w_hh_b, <float*> p_b_ih_b, <float*> p_b_hh_b,
                        <float*> p_xw, <float*> p_hw, <float*> p_acts, <float*> p_hs,
                        <float*> p_y, <float*> p_hT, use_t, <float*> p_w_hh_t,
                        <float*> p_panels)
        else:
            with nogil:
                fwd_run(nt, seq_threads, bs, train, T, N, D, H, <double*> p_x, <double*> p_w_ih,
                        <double*> p_w_hh, <double*> p_b_ih, <double*> p_b_hh, lens,
                        <double*> p_w_ih_b, <double*> p_w_hh_b, <double*> p_b_ih_b,
                        <double*> p_b_hh_b, <double*> p_xw, <double*> p_hw,
                        <double*> p_acts, <double*> p_hs, <double*> p_y, <double*> p_hT, use_t,
                        <double*> p_w_hh_t, <double*> NULL)
    give_scratch(ws)
    if not train:
        return y, hT, None
    ctx = Context(
        op="gru",
        backend="cpu",
        dtype=dtype,
        cupy=False,
        grad_shapes={"dy": (T, N, H), "dhT": (N, H)},
        saved=dict(x=x, w_ih_b=w_ih_b, w_hh_b=w_hh_b, acts=acts, hs=hs, lengths=lengths, bs=bs),
    )
    return y, hT, ctx


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------


cdef inline void bwd_point(
    const floating* st,          # IN    (N, 4H) blocked r, z, n, hn of step t
    const floating* hp,          # IN    (N, H) h_{t-1}
    const floating* dyt,         # IN    (N, H)
    floating* dh,                # INOUT (N, H) in: gradient reaching h_t from later steps;
                                 #       out: the part of dh_{t-1} not from G2's GEMM
    floating* dxt,               # OUT   (N, 3H) blocked da_x of step t
    floating* dht,               # OUT   (N, 3H) blocked da_h of step t
    const long long* lengths,
    Py_ssize_t t, Py_ssize_t N, Py_ssize_t H, Py_ssize_t bs, Py_ssize_t u0, Py_ssize_t u1,
) noexcept nogil:
    """GB1-GB4 for the units [u0, u1) of every sequence at step t."""
    cdef Py_ssize_t n, j, j0, sz, u
    cdef const floating* sa
    cdef floating* dxa
    cdef floating* dha
    cdef floating r, z, nn, hh, dhs, dn, dz, dan, dar, daz
    for n in range(N):
        if lengths != NULL and t >= lengths[n]:
            # GB1: a padded position ignores dy and passes dh through unchanged (G5).
            for j in range(n * G * H + G * u0, n * G * H + G * u1):
                dxt[j] = 0
                dht[j] = 0
            continue
        if floating is float:
            fr_gru_bwd_row_f(st + n * S * H, hp + n * H, dyt + n * H, dh + n * H,
                             dxt + n * G * H, dht + n * G * H, H, bs, u0, u1)
        else:
            j0 = u0
            while j0 < u1:
                sz = block_size(bs, H, j0)
                sa = st + n * S * H + S * j0
                dxa = dxt + n * G * H + G * j0
                dha = dht + n * G * H + G * j0
                for u in range(sz):
                    j = n * H + j0 + u
                    r = sa[u]
                    z = sa[sz + u]
                    nn = sa[2 * sz + u]
                    hh = sa[3 * sz + u]
                    # GB1: gradient reaching this step's new h.
                    dhs = dyt[j] + dh[j]
                    # GB2: through h = (1 - z) * n + z * h_prev.
                    dn = dhs * (1 - z)
                    dz = dhs * (hp[j] - nn)
                    # GB3: through the gate nonlinearities.
                    dan = dn * (1 - nn * nn)
                    dar = dan * hh * r * (1 - r)
                    daz = dz * z * (1 - z)
                    dxa[u] = dar
                    dxa[sz + u] = daz
                    dxa[2 * sz + u] = dan
                    dha[u] = dar
                    dha[sz + u] = daz
                    dha[2 * sz + u] = dan * r
                    # GB4: the direct path z * dh; da_h W_hh is added by the GEMM.
                    dh[j] = dhs * z
                j0 += sz


cdef void bwd_thread(
    int p, int nt, Py_ssize_t bs, bint whole, Py_ssize_t T, Py_ssize_t N, Py_ssize_t D,
    Py_ssize_t H,
    const floating* x, const floating* w_ih_b, const floating* w_hh_b,
    const floating* acts,        # IN  (T, N, 4H) blocked
    const floating* hs,          # IN  (T+1, N, H)
    const long long* lengths,
    const floating* dy,          # IN  (T, N, H)
    floating* dh,                # INOUT (N, H) dhT in, dh0 out
    floating* dxw,               # OUT (T, N, 3H) blocked da_x (scratch)
    floating* dhw,               # OUT (T, N, 3H) blocked da_h (scratch)
    floating* dx, floating* dw_ih, floating* dw_hh, floating* db_ih, floating* db_hh,
    floating* scratch,           # (3H, D + H + 2)
    floating* panels,            # scratch (3H * H) W_hh's columns in panels, or NULL
) noexcept nogil:
    cdef Py_ssize_t u0, u1, t, NH = N * H, step = N * G * H
    unit_range(H, bs, nt, p, &u0, &u1)
    if floating is float:
        if panels != NULL:  # this thread's columns of W_hh, once per call (only it reads them)
            pack_panels(G * H, u1 - u0, w_hh_b + u0, H, panels + G * H * u0)
    for t in range(T - 1, -1, -1):
        bwd_point(acts + t * N * S * H, hs + t * NH, dy + t * NH, dh, dxw + t * step,
                  dhw + t * step, lengths, t, N, H, bs, u0, u1)
        # All of da_h of step t must be written before any thread's GEMM reads it.
        fr_barrier()
        # GB4: this thread's columns of dh_{t-1} += da_h W_hh (its next pointwise pass reads
        # only these columns, so no second barrier).
        if floating is float:
            if panels != NULL:
                panel_mm(N, u1 - u0, G * H, dhw + t * step, G * H, w_hh_b + u0, H,
                         panels + G * H * u0, 1, dh + u0, H)
            else:
                step_mm(N, u1 - u0, G * H, dhw + t * step, G * H, w_hh_b + u0, H,
                        <floating> 1, dh + u0, H)
        else:
            step_mm(N, u1 - u0, G * H, dhw + t * step, G * H, w_hh_b + u0, H,
                    <floating> 1, dh + u0, H)
    if whole:  # else bwd_run does it, with its own threads
        fr_barrier()
        # GB5: weight, bias and input gradients as whole-sequence GEMMs.
        sequence_grads(p, nt, G, T * N, D, H, bs, dxw, dhw, x, hs, w_ih_b, dx, dw_ih, dw_hh, db_ih,
                       db_hh, scratch)


cdef void bwd_run(
    int nt, int seq_threads, Py_ssize_t bs, Py_ssize_t T, Py_ssize_t N, Py_ssize_t D, Py_ssize_t H,
    const floating* x, const floating* w_ih_b, const floating* w_hh_b, const floating* acts,
    const floating* hs, const long long* lengths, const floating* dy, floating* dh,
    floating* dxw, floating* dhw, floating* dx, floating* dw_ih, floating* dw_hh,
    floating* db_ih, floating* db_hh, floating* scratch, floating* panels,
) noexcept nogil:
    cdef int saved[8]
    cdef int p, team
    fr_blas_pin_one(saved)
    if nt > 1:
        with parallel(num_threads=nt):
            p = omp_get_thread_num()
            team = omp_get_num_threads()
            bwd_thread(p, team, bs, True, T, N, D, H, x, w_ih_b, w_hh_b, acts, hs, lengths, dy, dh,
                       dxw, dhw, dx, dw_ih, dw_hh, db_ih, db_hh, scratch, panels)
    else:
        # the time loop on one thread, then the whole-sequence GEMMs split over the threads
        bwd_thread(0, 1, bs, False, T, N, D, H, x, w_ih_b, w_hh_b, acts, hs, lengths, dy, dh, dxw,
                   dhw, dx, dw_ih, dw_hh, db_ih, db_hh, scratch, panels)
        if seq_threads > 1:
            with parallel(num_threads=seq_threads):
                p = omp_get_thread_num()
                team = omp_get_num_threads()
                sequence_grads(p, team, G, T * N, D, H, bs, dxw, dhw, x, hs, w_ih_b, dx, dw_ih,
                               dw_hh, db_ih, db_hh, scratch)
        else:
            sequence_grads(0, 1, G, T * N, D, H, bs, dxw, dhw, x, hs, w_ih_b, dx, dw_ih, dw_hh,
                           db_ih, db_hh, scratch)
    fr_blas_restore(saved)


def gru_backward(ctx, dy, dhT):
    """GRU backward (GB1-GB5). dy (T,N,H); dhT (N,H) or None ->
    dx (T,N,D), dh0 (N,H), dw_ih (3H,D), dw_hh (3H,H), db_ih (3H,), db_hh (3H,)."""
    s = ctx.saved
    x = s["x"]
    w_ih_b = s["w_ih_b"]
    w_hh_b = s["w_hh_b"]
    acts = s["acts"]
    hs = s["hs"]
    lengths = s["lengths"]
    dtype = x.dtype
    cdef Py_ssize_t T = x.shape[0], N = x.shape[1], D = x.shape[2], H = hs.shape[2]
    (dy,) = as_c_array(dtype, dy)
    dh = np.zeros((N, H), dtype) if dhT is None else np.array(dhT, dtype=dtype, order="C")
    cdef int nt = team_size(N, H, G)
    cdef int seq_threads = sequence_threads(T, N, D, H, G)
    cdef Py_ssize_t bs = s["bs"]  # the forward's layout; bs == H runs the time loop serially
    # float32: W_hh also packed in panels (panel_mm)
    cdef Py_ssize_t n_p = G * H * H if dtype == np.float32 and use_panels(N, T) else 0
    cdef Py_ssize_t n_s = G * H * (D + H + 2), n_a = 2 * T * N * G * H
    ws = take_scratch(dtype, n_a + n_s + n_p)
    dxw = ws[: T * N * G * H]
    dhw = ws[T * N * G * H : n_a]
    scratch = ws[n_a : n_a + n_s]
    panels = ws[n_a + n_s : n_a + n_s + n_p]
    dx = np.empty((T, N, D), dtype)
    dw_ih = np.empty((G * H, D), dtype)
    dw_hh = np.empty((G * H, H), dtype)
    db_ih = np.empty(G * H, dtype)
    db_hh = np.empty(G * H, dtype)
    cdef const long long* lens = lengths_ptr(lengths)
    cdef void* p_x = data(x)
    cdef void* p_w_ih_b = data(w_ih_b)
    cdef void* p_w_hh_b = data(w_hh_b)
    cdef void* p_acts = data(acts)
    cdef void* p_hs = data(hs)
    cdef void* p_dy = data(dy)
    cdef void* p_dh = data(dh)
    cdef void* p_dxw = data(dxw)
    cdef void* p_dhw = data(dhw)
    cdef void* p_dx = data(dx)
    cdef void* p_dw_ih = data(dw_ih)
    cdef void* p_dw_hh = data(dw_hh)
    cdef void* p_db_ih = data(db_ih)
    cdef void* p_db_hh = data(db_hh)
    cdef void* p_scratch = data(scratch)
    cdef void* p_panels = data(panels) if n_p > 0 else NULL
    with fallback_limit(nt):
        if dtype == np.float32:
            with nogil:
                bwd_run(nt, seq_threads, bs, T, N, D, H, <float*> p_x, <float*> p_w_ih_b,
                        <float*> p_w_hh_b,
                        <float*> p_acts, <float*> p_hs, lens, <float*> p_dy, <float*> p_dh,
                        <float*> p_dxw, <float*> p_dhw, <float*> p_dx, <float*> p_dw_ih,
                        <float*> p_dw_hh, <float*> p_db_ih, <float*> p_db_hh,
                        <float*> p_scratch, <float*> p_panels)
        else:
            with nogil:
                bwd_run(nt, seq_threads, bs, T, N, D, H, <double*> p_x, <double*> p_w_ih_b,
                        <double*> p_w_hh_b, <double*> p_acts, <double*> p_hs, lens,
                        <double*> p_dy, <double*> p_dh, <double*> p_dxw, <double*> p_dhw,
                        <double*> p_dx, <double*> p_dw_ih, <double*> p_dw_hh,
                        <double*> p_db_ih, <double*> p_db_hh, <double*> p_scratch,
                        <double*> NULL)
    give_scratch(ws)
    return dx, dh, dw_ih, dw_hh, db_ih, db_hh
