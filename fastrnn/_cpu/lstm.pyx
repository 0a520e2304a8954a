# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# distutils: extra_compile_args = -fno-trapping-math --param=vect-max-version-for-alias-checks=200
"""LSTM over a whole sequence on the CPU: Cython + OpenMP + BLAS (scipy.linalg.cython_blas).

Same math, layouts and gate order (i, f, g, o) as fastrnn/reference/lstm.py; the comments cite
its steps L1..L5 and LB1..LB5. The backend interface (fastrnn/backends/base.py) fixes the
signatures; fastrnn.lstm_forward validates before calling here.

How a call runs (everything from the first GEMM to the last inside one ``with nogil`` block, no
Python in the time loop):

* With more than one thread in the time loop, the weights are copied once per call into the
  blocked gate layout (_recurrent_common.pxd), so OpenMP thread p owns the hidden units
  [u0, u1) and the gate rows [4 u0, 4 u1). One thread uses the weights as they are.
* Forward, thread p: L1 its gate columns of x W_ih^T for all T steps in one GEMM; then per step
  L2 its gate columns of h_{t-1} W_hh^T (one GEMM, accumulated onto L1's result), L3-L5 the fused
  pointwise pass over its units (bias added here), and one barrier (h_t complete).
* Backward, thread p, per step: LB1-LB4 the fused pointwise pass over its units (writes the gate
  gradients da_t), a barrier, then its columns of dh_{t-1} += da_t W_hh (one GEMM). Its next
  pointwise pass reads only those columns, so one barrier per step. LB5: dx, dW_ih, dW_hh and db
  as whole-sequence GEMMs, split over the threads.
* BLAS runs single-threaded inside (pinned in C, see _recurrent_threads.py); all parallelism is
  fastrnn's own OpenMP threads, at most one parallel region per pass.

Threading of the per-step GEMMs, decided by measurement (fastrnn._bench.compare_strategies, run
with ``python -m fastrnn._bench --strategies``; the numbers are in _recurrent_threads.py next to
MIN_PARALLEL_WORK). Three ways to run a step's recurrent GEMM on 2 threads were timed: one
thread; BLAS's own threads called from one thread; and OpenMP threads each computing their own
gate columns with a single-threaded GEMM followed by a barrier (this file's design: one barrier
per step instead of a BLAS fork/join plus a separate pointwise region, each thread reads only
its half of W_hh, and its gates are still in cache for its pointwise pass). The split was
fastest at N=16, H=256 (34 us per step vs 62 one thread, 89 BLAS threads); at N=32, H=64 all
three were within 1.5 us, and a barrier per step is fragile when other processes share the
cores (it waits for a descheduled peer), so below MIN_PARALLEL_WORK multiply-adds per step the
time loop runs on one thread in the natural layout (no weight copy) and only the
whole-sequence GEMMs (L1, LB5) are split over the OpenMP threads (above
MIN_SEQUENCE_PARALLEL_WORK). At N=64, H=512 BLAS's own threads won the probe (690 vs 2083 us
median); the split is kept there too because switching BLAS's pool on and off inside a call
cost tens of ms per call on this machine; the whole LSTM still scales 1.8x from 1 to 2 threads
at (100,64,512,512). BLAS itself stays single-threaded throughout a call.

Tried and rejected: every GEMM of a large call on BLAS's own threads, set once at entry (no pool
switching inside the call), the pointwise passes on the calling thread and no OpenMP region.
LSTM (100,64,512,512) fwd+bwd, 2 threads, A/B in one process, 7-9 rounds: 413 vs 401 ms median
(best 356 vs 392) with OMP_WAIT_POLICY unset and another job on the machine, and 5750 vs 731 ms
with OMP_WAIT_POLICY=passive under the same load: OpenBLAS's threads wait for each other inside
a GEMM by spinning, so a worker descheduled by another process stalls every step. The OpenMP
split with one barrier per step degrades far more gracefully on the shared machine.

The per-step GEMMs read the recurrent weights from panels packed once per call (float32 with
AVX-512, batches of 4+, 4+ steps; see use_panels in _recurrent_common.pxd): each thread packs
its own gate columns of W_hh^T (forward) and its own columns of W_hh (backward) into K x 32
contiguous panels, and fr_panel_sgemm_avx512 runs every step from them, where OpenBLAS used to
re-pack the weights on every step. LSTM (100,64,512,512) fwd+bwd, 2 threads: 373-390 -> 311-324
ms (torch.nn.LSTM 347-392 in the same runs).
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
    fr_lstm_bwd_row_f,
    fr_lstm_fwd_row_f,
    memcpy,
    mm,
    pack_panels,
    panel_mm,
    project_rows,
    use_panels,
    sequence_grads,
    step_mm,
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
    G = 4  # gates per hidden unit: i, f, g, o


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------


cdef inline void fwd_point(
    floating* gt,                # INOUT (N, 4H) blocked: pre-activations in, activations out
    const floating* bias,        # IN    (4H,) blocked
    const floating* hp,          # IN    (N, H) h_{t-1}
    const floating* cp,          # IN    (N, H) c_{t-1}
    floating* hn,                # OUT   (N, H) h_t (never aliases hp)
    floating* cn,                # OUT   (N, H) c_t (never aliases cp)
    floating* yt,                # OUT   (N, H) y_t
    const long long* lengths,    # IN    (N,) or NULL
    Py_ssize_t t, Py_ssize_t N, Py_ssize_t H, Py_ssize_t bs, Py_ssize_t u0, Py_ssize_t u1,
) noexcept nogil:
    """L3-L5 for the units [u0, u1) of every sequence at step t."""
    cdef Py_ssize_t n, j, j0, sz, u
    cdef floating* a
    cdef const floating* bb
    cdef floating i, f, g, o, c, h
    for n in range(N):
        if lengths != NULL and t >= lengths[n]:
            # L5: past its length a sequence keeps its state and emits zeros.
            for j in range(n * H + u0, n * H + u1):
                hn[j] = hp[j]
                cn[j] = cp[j]
                yt[j] = 0
            continue
        if floating is float:
            fr_lstm_fwd_row_f(gt + n * G * H, bias, cp + n * H, cn + n * H, hn + n * H,
                              yt + n * H, H, bs, u0, u1)
        else:
            j0 = u0
            while j0 < u1:
                sz = block_size(bs, H, j0)
                a = gt + n * G * H + G * j0
                bb = bias + G * j0
                for u in range(sz):
                    j = n * H + j0 + u
                    # L3: gate nonlinearities (the bias of L1 is added here).
                    i = sigmoid(a[u] + bb[u])
                    f = sigmoid(a[sz + u] + bb[sz + u])
                    g = tanh_(a[2 * sz + u] + bb[2 * sz + u])
                    o = sigmoid(a[3 * sz + u] + bb[3 * sz + u])
                    a[u] = i
                    a[sz + u] = f
                    a[2 * sz + u] = g
                    a[3 * sz + u] = o
                    # L4: cell and hidden state.
                    c = f * cp[j] + i * g
                    h = o * tanh_(c)
                    cn[j] = c
                    hn[j] = h
                    yt[j] = h
                j0 += sz


cdef void fwd_thread(
    int p, int nt, Py_ssize_t bs, bint whole, bint training,
    Py_ssize_t T, Py_ssize_t N, Py_ssize_t D, Py_ssize_t H,
    const floating* x,           # IN  (T, N, D)
    const floating* w_ih_b,      # IN  (4H, D) blocked
    const floating* w_hh_b,      # IN  (4H, H) blocked
    const floating* bias,        # IN  (4H,) blocked
    const long long* lengths,    # IN  (N,) or NULL
    floating* gates,             # OUT (T, N, 4H) blocked: the activations i, f, g, o (saved)
    floating* hs,                # INOUT (T+1, N, H) when training, else a ring (2, N, H); [0] = h0
    floating* cs,                # INOUT like hs, for c
    floating* y,                 # OUT (T, N, H)
    bint use_t,                  # IN  run L2 from W_hh^T
    floating* w_hh_t,            # scratch (H, 4H) W_hh^T (blocked columns) when use_t
    floating* panels,            # scratch (H * 4H) W_hh^T's columns in panels, or NULL
) noexcept nogil:
    """Thread p's share of the forward pass (all of it when nt == 1)."""
    cdef Py_ssize_t u0, u1, t, NH = N * H, step = N * G * H
    cdef Py_ssize_t cur, nxt
    unit_range(H, bs, nt, p, &u0, &u1)
    if use_t:  # this thread's gate columns of W_hh^T: no barrier, only it reads them
        transpose_rows(w_hh_b, G * H, H, G * u0, G * u1, w_hh_t)
    if floating is float:
        if panels != NULL:  # and packed into panels, once per call (only it reads them)
            pack_panels(H, G * (u1 - u0), w_hh_t + G * u0, G * H, panels + H * G * u0)
    # L1: the input projection of all T steps, this thread's gate columns, one GEMM.
    if whole:  # else fwd_run has done it, split by rows
        mm(False, True, T * N, G * (u1 - u0), D, <floating> 1, x, D, w_ih_b + G * u0 * D, D,
           <floating> 0, gates + G * u0, G * H)
    for t in range(T):
        cur = t if training else t & 1
        nxt = t + 1 if training else (t + 1) & 1
        # L2: the recurrent projection of this thread's gate columns, added onto L1's.
        if floating is float:
            if panels != NULL:
                panel_mm(N, G * (u1 - u0), H, hs + cur * NH, H, w_hh_t + G * u0, G * H,
                         panels + H * G * u0, 1, gates + t * step + G * u0, G * H)
            else:
                step_gemm(use_t, N, H, G * H, G * u0, G * u1, hs + cur * NH, w_hh_b, w_hh_t,
                          <floating> 1, gates + t * step)
        else:
            step_gemm(use_t, N, H, G * H, G * u0, G * u1, hs + cur * NH, w_hh_b, w_hh_t,
                      <floating> 1, gates + t * step)
        fwd_point(gates + t * step, bias, hs + cur * NH, cs + cur * NH, hs + nxt * NH,
                  cs + nxt * NH, y + t * NH, lengths, t, N, H, bs, u0, u1)
        # Every thread's part of h_t must be written before any thread's next L2 reads h_t.
        fr_barrier()


cdef void fwd_run(
    int nt, int seq_threads, Py_ssize_t bs, bint training, Py_ssize_t T, Py_ssize_t N,
    Py_ssize_t D, Py_ssize_t H,
    const floating* x, const floating* w_ih, const floating* w_hh, const floating* b,
    const long long* lengths,
    floating* w_ih_b, floating* w_hh_b, floating* b_b,   # OUT blocked copies of the weights
    floating* gates, floating* hs, floating* cs, floating* y,
    floating* hT, floating* cT,                          # OUT (N, H)
    bint use_t, floating* w_hh_t, floating* panels,
) noexcept nogil:
    cdef int saved[8]
    cdef int p, team
    cdef Py_ssize_t last = T if training else T & 1
    fr_blas_pin_one(saved)
    if bs < H:  # else the natural layout is the blocked one and w_ih_b is w_ih, etc.
        to_blocked(w_ih, w_ih_b, G, H, D, bs)
        to_blocked(w_hh, w_hh_b, G, H, H, bs)
        to_blocked(b, b_b, G, H, 1, bs)
    if nt > 1:
        with parallel(num_threads=nt):
            p = omp_get_thread_num()
            team = omp_get_num_threads()
            fwd_thread(p, team, bs, True, training, T, N, D, H, x, w_ih_b, w_hh_b, b_b, lengths,
                       gates, hs, cs, y, use_t, w_hh_t, panels)
    else:
        # L1 split by rows over the threads, then the time loop on one thread
        if seq_threads > 1:
            with parallel(num_threads=seq_threads):
                p = omp_get_thread_num()
                team = omp_get_num_threads()
                project_rows(p, team, T * N, D, G * H, x, w_ih_b, gates)
        else:
            project_rows(0, 1, T * N, D, G * H, x, w_ih_b, gates)
        fwd_thread(0, 1, bs, False, training, T, N, D, H, x, w_ih_b, w_hh_b, b_b, lengths, gates,
                   hs, cs, y, use_t, w_hh_t, panels)
    memcpy(hT, hs + last * N * H, N * H * sizeof(floating))
    memcpy(cT, cs + last * N * H, N * H * sizeof(floating))
    fr_blas_restore(saved)


cdef inline void* data(object a) noexcept:
    return cnp.PyArray_DATA(<cnp.ndarray> a)


cdef inline const long long* lengths_ptr(object lengths) noexcept:
    return NULL if lengths is None else <const long long*> cnp.PyArray_DATA(lengths)


def lstm_forward(x, h0, c0, w_ih, w_hh, b, lengths, training, w_hr=None):
    """LSTM forward (L1-L5). x (T,N,D); h0, c0 (N,H); w_ih (4H,D); w_hh (4H,H); b (4H,);
    lengths None or int64 (N,); training bool -> y (T,N,H), hT, cT (N,H), ctx (None if not
    training). Arrays: C-contiguous, one float dtype (fastrnn.lstm_forward guarantees it)."""
    if w_hr is not None:
        raise NotImplementedError(
            "w_hr: the CPU LSTM kernel has no projection yet; run it on the reference with "
            "fastrnn.use_backend('numpy')"
        )
    dtype = x.dtype
    x, h0, c0, w_ih, w_hh, b = as_c_array(dtype, x, h0, c0, w_ih, w_hh, b)
    if lengths is not None:
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    cdef Py_ssize_t T = x.shape[0], N = x.shape[1], D = x.shape[2], H = w_hh.shape[1]
    cdef bint train = bool(training)
    cdef int nt = team_size(N, H, G)
    cdef int seq_threads = sequence_threads(T, N, D, H, G)
    # One thread needs no partition: the natural layout is the blocked one with one block of H
    # units, and the weights are used uncopied.
    cdef Py_ssize_t bs = BLOCK if nt > 1 else H
    nstates = T + 1 if train else 2
    # What backward reads (activations, states) shares one buffer from the saved pool when
    # training: reused across calls, so its pages are not faulted in and zeroed every call.
    cdef Py_ssize_t n_acts = T * N * G * H, n_states = nstates * N * H
    if train:
        keep = take_saved(dtype, n_acts + 2 * n_states)
        hs = keep[n_acts : n_acts + n_states].reshape(nstates, N, H)
        cs = keep[n_acts + n_states :].reshape(nstates, N, H)
    else:
        hs = np.empty((nstates, N, H), dtype)
        cs = np.empty((nstates, N, H), dtype)
    hs[0] = h0
    cs[0] = c0
    y = np.empty((T, N, H), dtype)
    # L2 from W_hh^T (see step_gemm) when the batch and the sequence repay the transposition
    cdef bint use_t = N >= 4 and T >= 4
    cdef Py_ssize_t n_t = G * H * H if use_t else 0
    # float32: W_hh^T also packed in panels (panel_mm)
    cdef Py_ssize_t n_p = n_t if use_t and dtype == np.float32 and use_panels(N, T) else 0
    # the activations are saved for backward when training, scratch otherwise
    ws = take_scratch(dtype, n_t + n_p + (0 if train else T * N * G * H))
    w_hh_t = ws[:n_t]
    panels = ws[n_t : n_t + n_p]
    gates = keep[:n_acts] if train else ws[n_t + n_p : n_t + n_p + n_acts]
    gates = gates.reshape(T, N, G * H)
    if bs < H:
        w_ih_b = np.empty((G * H, D), dtype)
        w_hh_b = np.empty((G * H, H), dtype)
        b_b = np.empty(G * H, dtype)
    else:
        w_ih_b, w_hh_b, b_b = w_ih, w_hh, b
    hT = np.empty((N, H), dtype)
    cT = np.empty((N, H), dtype)
    cdef const long long* lens = lengths_ptr(lengths)
    cdef void* p_x = data(x)
    cdef void* p_w_ih = data(w_ih)
    cdef void* p_w_hh = data(w_hh)
    cdef void* p_b = data(b)
    cdef void* p_w_ih_b = data(w_ih_b)
    cdef void* p_w_hh_b = data(w_hh_b)
    cdef void* p_b_b = data(b_b)
    cdef void* p_gates = data(gates)
    cdef void* p_hs = data(hs)
    cdef void* p_cs = data(cs)
    cdef void* p_y = data(y)
    cdef void* p_hT = data(hT)
    cdef void* p_cT = data(cT)
    cdef void* p_w_hh_t = data(w_hh_t)
    cdef void* p_panels = data(panels) if n_p > 0 else NULL
    with fallback_limit(nt):
        if dtype == np.float32:
            with nogil:
                fwd_run(nt, seq_threads, bs, train, T, N, D, H, <float*> p_x, <float*> p_w_ih,
                        <float*> p_w_hh,
                        <float*> p_b, lens, <float*> p_w_ih_b, <float*> p_w_hh_b,
                        <float*> p_b_b, <float*> p_gates, <float*> p_hs, <float*> p_cs,
                        <float*> p_y, <float*> p_hT, <float*> p_cT, use_t, <float*> p_w_hh_t,
                        <float*> p_panels)
        else:
            with nogil:
                fwd_run(nt, seq_threads, bs, train, T, N, D, H, <double*> p_x, <double*> p_w_ih,
                        <double*> p_w_hh, <double*> p_b, lens, <double*> p_w_ih_b,
                        <double*> p_w_hh_b, <double*> p_b_b, <double*> p_gates,
                        <double*> p_hs, <double*> p_cs, <double*> p_y, <double*> p_hT,
                        <double*> p_cT, use_t, <double*> p_w_hh_t, <double*> NULL)
    give_scratch(ws)
    if not train:
        return y, hT, cT, None
    ctx = Context(
        op="lstm",
        backend="cpu",
        dtype=dtype,
        cupy=False,
        grad_shapes={"dy": (T, N, H), "dhT": (N, H), "dcT": (N, H)},
        saved=dict(
            x=x, w_ih_b=w_ih_b, w_hh_b=w_hh_b, acts=gates, hs=hs, cs=cs, lengths=lengths, bs=bs
        ),
    )
    return y, hT, cT, ctx


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------


cdef inline void bwd_point(
    const floating* at,          # IN    (N, 4H) blocked activations i, f, g, o of step t
    const floating* cp,          # IN    (N, H) c_{t-1}
    const floating* cn,          # IN    (N, H) c_t
    const floating* dyt,         # IN    (N, H)
    floating* dh,                # INOUT (N, H) in: gradient reaching h_t from later steps;
                                 #       out: the part of dh_{t-1} not from L2's GEMM
    floating* dc,                # INOUT (N, H) gradient reaching c_t -> reaching c_{t-1}
    floating* dat,               # OUT   (N, 4H) blocked gate gradients of step t
    const long long* lengths,
    Py_ssize_t t, Py_ssize_t N, Py_ssize_t H, Py_ssize_t bs, Py_ssize_t u0, Py_ssize_t u1,
) noexcept nogil:
    """LB1-LB4 for the units [u0, u1) of every sequence at step t."""
    cdef Py_ssize_t n, j, j0, sz, u
    cdef const floating* a
    cdef floating* d
    cdef floating i, f, g, o, dhs, tc, do_, dct
    for n in range(N):
        if lengths != NULL and t >= lengths[n]:
            # LB1: a padded position ignores dy, gets no gate gradient, and passes dh and dc
            # through unchanged (L5).
            for j in range(n * G * H + G * u0, n * G * H + G * u1):
                dat[j] = 0
            continue
        if floating is float:
            fr_lstm_bwd_row_f(at + n * G * H, cp + n * H, cn + n * H, dyt + n * H, dh + n * H,
                              dc + n * H, dat + n * G * H, H, bs, u0, u1)
        else:
            j0 = u0
            while j0 < u1:
                sz = block_size(bs, H, j0)
                a = at + n * G * H + G * j0
                d = dat + n * G * H + G * j0
                for u in range(sz):
                    j = n * H + j0 + u
                    i = a[u]
                    f = a[sz + u]
                    g = a[2 * sz + u]
                    o = a[3 * sz + u]
                    # LB1: gradient reaching this step's new h and c.
                    dhs = dyt[j] + dh[j]
                    # LB2: through h = o * tanh(c) and c = f * c_prev + i * g.
                    tc = tanh_(cn[j])
                    do_ = dhs * tc
                    dct = dc[j] + dhs * o * (1 - tc * tc)
                    # LB3: through the gate nonlinearities.
                    d[u] = dct * g * i * (1 - i)
                    d[sz + u] = dct * cp[j] * f * (1 - f)
                    d[2 * sz + u] = dct * i * (1 - g * g)
                    d[3 * sz + u] = do_ * o * (1 - o)
                    # LB4: to the previous c; dh_{t-1} = da_t W_hh is added by the GEMM.
                    dc[j] = dct * f
                    dh[j] = 0
                j0 += sz


cdef void bwd_thread(
    int p, int nt, Py_ssize_t bs, bint whole, Py_ssize_t T, Py_ssize_t N, Py_ssize_t D,
    Py_ssize_t H,
    const floating* x, const floating* w_ih_b, const floating* w_hh_b,
    const floating* acts,        # IN  (T, N, 4H) blocked
    const floating* hs,          # IN  (T+1, N, H)
    const floating* cs,          # IN  (T+1, N, H)
    const long long* lengths,
    const floating* dy,          # IN  (T, N, H)
    floating* dh,                # INOUT (N, H) dhT in, dh0 out
    floating* dc,                # INOUT (N, H) dcT in, dc0 out
    floating* da,                # OUT (T, N, 4H) blocked gate gradients (scratch)
    floating* dx, floating* dw_ih, floating* dw_hh, floating* db,
    floating* scratch,           # (4H, D + H + 2)
    floating* panels,            # scratch (4H * H) W_hh's columns in panels, or NULL
) noexcept nogil:
    cdef Py_ssize_t u0, u1, t, NH = N * H, step = N * G * H
    unit_range(H, bs, nt, p, &u0, &u1)
    if floating is float:
        if panels != NULL:  # this thread's columns of W_hh, once per call (only it reads them)
            pack_panels(G * H, u1 - u0, w_hh_b + u0, H, panels + G * H * u0)
    for t in range(T - 1, -1, -1):
        bwd_point(acts + t * step, cs + t * NH, cs + (t + 1) * NH, dy + t * NH, dh, dc,
                  da + t * step, lengths, t, N, H, bs, u0, u1)
        # All of da_t must be written before any thread's GEMM reads it.
        fr_barrier()
        # LB4: this thread's columns of dh_{t-1} += da_t W_hh; its next pointwise pass reads
        # only these columns, so no second barrier.
        if floating is float:
            if panels != NULL:
                panel_mm(N, u1 - u0, G * H, da + t * step, G * H, w_hh_b + u0, H,
                         panels + G * H * u0, 1, dh + u0, H)
            else:
                step_mm(N, u1 - u0, G * H, da + t * step, G * H, w_hh_b + u0, H,
                        <floating> 1, dh + u0, H)
        else:
            step_mm(N, u1 - u0, G * H, da + t * step, G * H, w_hh_b + u0, H,
                    <floating> 1, dh + u0, H)
    if whole:  # else bwd_run does it, with its own threads
        fr_barrier()
        # LB5: weight, bias and input gradients as whole-sequence GEMMs.
        sequence_grads(p, nt, G, T * N, D, H, bs, da, da, x, hs, w_ih_b, dx, dw_ih, dw_hh, db,
                       <floating*> NULL, scratch)


cdef void bwd_run(
    int nt, int seq_threads, Py_ssize_t bs, Py_ssize_t T, Py_ssize_t N, Py_ssize_t D, Py_ssize_t H,
    const floating* x, const floating* w_ih_b, const floating* w_hh_b, const floating* acts,
    const floating* hs, const floating* cs, const long long* lengths, const floating* dy,
    floating* dh, floating* dc, floating* da, floating* dx, floating* dw_ih, floating* dw_hh,
    floating* db, floating* scratch, floating* panels,
) noexcept nogil:
    cdef int saved[8]
    cdef int p, team
    fr_blas_pin_one(saved)
    if nt > 1:
        with parallel(num_threads=nt):
            p = omp_get_thread_num()
            team = omp_get_num_threads()
            bwd_thread(p, team, bs, True, T, N, D, H, x, w_ih_b, w_hh_b, acts, hs, cs, lengths, dy,
                       dh, dc, da, dx, dw_ih, dw_hh, db, scratch, panels)
    else:
        # the time loop on one thread, then the whole-sequence GEMMs split over the threads
        bwd_thread(0, 1, bs, False, T, N, D, H, x, w_ih_b, w_hh_b, acts, hs, cs, lengths, dy, dh,
                   dc, da, dx, dw_ih, dw_hh, db, scratch, panels)
        if seq_threads > 1:
            with parallel(num_threads=seq_threads):
                p = omp_get_thread_num()
                team = omp_get_num_threads()
                sequence_grads(p, team, G, T * N, D, H, bs, da, da, x, hs, w_ih_b, dx, dw_ih, dw_hh,
                               db, <floating*> NULL, scratch)
        else:
            sequence_grads(0, 1, G, T * N, D, H, bs, da, da, x, hs, w_ih_b, dx, dw_ih, dw_hh, db,
                           <floating*> NULL, scratch)
    fr_blas_restore(saved)


def lstm_backward(ctx, dy, dhT, dcT):
    """LSTM backward (LB1-LB5). dy (T,N,H); dhT, dcT (N,H) or None ->
    dx (T,N,D), dh0 (N,H), dc0 (N,H), dw_ih (4H,D), dw_hh (4H,H), db (4H,)."""
    s = ctx.saved
    x = s["x"]
    w_ih_b = s["w_ih_b"]
    w_hh_b = s["w_hh_b"]
    acts = s["acts"]
    hs = s["hs"]
    cs = s["cs"]
    lengths = s["lengths"]
    dtype = x.dtype
    cdef Py_ssize_t T = x.shape[0], N = x.shape[1], D = x.shape[2], H = hs.shape[2]
    (dy,) = as_c_array(dtype, dy)
    dh = np.zeros((N, H), dtype) if dhT is None else np.array(dhT, dtype=dtype, order="C")
    dc = np.zeros((N, H), dtype) if dcT is None else np.array(dcT, dtype=dtype, order="C")
    cdef int nt = team_size(N, H, G)
    cdef int seq_threads = sequence_threads(T, N, D, H, G)
    cdef Py_ssize_t bs = s["bs"]  # the forward's layout; bs == H runs the time loop serially
    # float32: W_hh also packed in panels (panel_mm)
    cdef Py_ssize_t n_p = G * H * H if dtype == np.float32 and use_panels(N, T) else 0
    cdef Py_ssize_t n_s = G * H * (D + H + 2)
    ws = take_scratch(dtype, T * N * G * H + n_s + n_p)
    da = ws[: T * N * G * H]
    scratch = ws[T * N * G * H : T * N * G * H + n_s]
    panels = ws[T * N * G * H + n_s : T * N * G * H + n_s + n_p]
    dx = np.empty((T, N, D), dtype)
    dw_ih = np.empty((G * H, D), dtype)
    dw_hh = np.empty((G * H, H), dtype)
    db = np.empty(G * H, dtype)
    cdef const long long* lens = lengths_ptr(lengths)
    cdef void* p_x = data(x)
    cdef void* p_w_ih_b = data(w_ih_b)
    cdef void* p_w_hh_b = data(w_hh_b)
    cdef void* p_acts = data(acts)
    cdef void* p_hs = data(hs)
    cdef void* p_cs = data(cs)
    cdef void* p_dy = data(dy)
    cdef void* p_dh = data(dh)
    cdef void* p_dc = data(dc)
    cdef void* p_da = data(da)
    cdef void* p_dx = data(dx)
    cdef void* p_dw_ih = data(dw_ih)
    cdef void* p_dw_hh = data(dw_hh)
    cdef void* p_db = data(db)
    cdef void* p_scratch = data(scratch)
    cdef void* p_panels = data(panels) if n_p > 0 else NULL
    with fallback_limit(nt):
        if dtype == np.float32:
            with nogil:
                bwd_run(nt, seq_threads, bs, T, N, D, H, <float*> p_x, <float*> p_w_ih_b,
                        <float*> p_w_hh_b,
                        <float*> p_acts, <float*> p_hs, <float*> p_cs, lens, <float*> p_dy,
                        <float*> p_dh, <float*> p_dc, <float*> p_da, <float*> p_dx,
                        <float*> p_dw_ih, <float*> p_dw_hh, <float*> p_db, <float*> p_scratch,
                        <float*> p_panels)
        else:
            with nogil:
                bwd_run(nt, seq_threads, bs, T, N, D, H, <double*> p_x, <double*> p_w_ih_b,
                        <double*> p_w_hh_b, <double*> p_acts, <double*> p_hs, <double*> p_cs,
                        lens, <double*> p_dy, <double*> p_dh, <double*> p_dc, <double*> p_da,
                        <double*> p_dx, <double*> p_dw_ih, <double*> p_dw_hh, <double*> p_db,
                        <double*> p_scratch, <double*> NULL)
    give_scratch(ws)
    return dx, dh, dc, dw_ih, dw_hh, db
