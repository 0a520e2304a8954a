"""LSTM, GRU and Elman RNN (tanh, relu): the reference's gradients vs central finite differences,
and every kernel backend vs the reference (outputs, final states, all gradients) over a grid of
awkward shapes, lengths and both dtypes."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DTYPES, KERNEL_BACKENDS, to_backend, to_numpy
from hypothesis import given, settings
from hypothesis import strategies as st
from recurrent_support import OP_IDS, OPS, REFERENCE, cuda_has_projection, make_lengths
from tolerances import assert_close, tol

# ------------------------------------------------------------------------------------------------
# the reference's backward vs central finite differences (float64)
# ------------------------------------------------------------------------------------------------


def _loss(op, arrays, upstream, lengths):
    """sum(y * dy) + sum(hT * dhT) (+ sum(cT * dcT)): its gradient is backward(dy, dhT, dcT)."""
    outputs, _ = op.forward(arrays, lengths, training=False, module=REFERENCE)
    return sum(float(np.sum(o * upstream[u])) for o, u in zip(outputs, op.upstream, strict=True))


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_reference_backward_matches_finite_differences(op, with_lengths):
    rng = np.random.default_rng(1)
    T, N, D, H = 3, 3, 2, 3
    arrays = op.arrays(T, N, D, H, rng)
    upstream = op.upstream_arrays(T, N, H, rng)
    lengths = np.array([3, 1, 2]) if with_lengths else None
    _, ctx = op.forward(arrays, lengths, module=REFERENCE)
    grads = dict(zip(op.grads, op.backward(ctx, upstream, module=REFERENCE), strict=True))
    names = {"x": "dx", "h0": "dh0", "c0": "dc0"}
    eps = 1e-6
    for name, a in arrays.items():
        grad = grads[names.get(name, "d" + name)]
        fd = np.empty_like(a)
        for idx in np.ndindex(a.shape):
            keep = a[idx]
            a[idx] = keep + eps
            plus = _loss(op, arrays, upstream, lengths)
            a[idx] = keep - eps
            minus = _loss(op, arrays, upstream, lengths)
            a[idx] = keep
            fd[idx] = (plus - minus) / (2 * eps)
        np.testing.assert_allclose(grad, fd, err_msg=name, **tol("fd", "backward", np.float64))


# ------------------------------------------------------------------------------------------------
# kernel backends vs the reference
# ------------------------------------------------------------------------------------------------

SHAPES = [  # (T, N, D, H): T=1, N=1, H=1, D != H, odd sizes, sizes across the 16-unit blocks
    (1, 1, 1, 1),
    (1, 3, 5, 4),
    (4, 1, 3, 7),
    (5, 3, 4, 17),
    (3, 5, 9, 33),
    (6, 4, 20, 70),
    (5, 11, 7, 37),  # batch 11: the small-batch GEMM's 8-row and remainder blocks
    (3, 37, 8, 70),  # batch > 32: the packed-panel step GEMM (one thread), partial panels
    (3, 40, 6, 90),  # the same split over the threads (N H 4H > MIN_PARALLEL_WORK)
]
LENGTHS = [None, "full", "ties"]


def _compare(op, backend, dtype, T, N, D, H, lengths_kind, give_final_grads, seed=0):
    if backend == "cuda" and op.proj and not cuda_has_projection():
        pytest.xfail("the CUDA LSTM launcher does not take w_hr yet")
    rng = np.random.default_rng(seed)
    arrays = op.arrays(T, N, D, H, rng)
    upstream = op.upstream_arrays(T, N, H, rng)
    if not give_final_grads:
        upstream = {k: (v if k == "dy" else None) for k, v in upstream.items()}
    lengths = make_lengths(lengths_kind, T, N, rng)
    # The reference runs in float64 on the values the kernel sees (rounded to dtype).
    arrays = {k: v.astype(dtype).astype(np.float64) for k, v in arrays.items()}
    upstream = {
        k: None if v is None else v.astype(dtype).astype(np.float64) for k, v in upstream.items()
    }
    want_out, want_ctx = op.forward(arrays, lengths, module=REFERENCE)
    want_grads = op.backward(want_ctx, upstream, module=REFERENCE)

    dev = {k: to_backend(backend, v.astype(dtype)) for k, v in arrays.items()}
    dev_up = {
        k: to_backend(backend, None if v is None else v.astype(dtype)) for k, v in upstream.items()
    }
    got_out, ctx = op.forward(dev, lengths)
    assert ctx.backend == backend and ctx.op == op.base
    for name, got, want in zip(op.outputs(), got_out, want_out, strict=True):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert_close(to_numpy(got), want, "recurrent", "forward", dtype, name)
    got_grads = op.backward(ctx, dev_up)
    for name, got, want in zip(op.grads, got_grads, want_grads, strict=True):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert_close(to_numpy(got), want, "recurrent", "backward", dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("lengths_kind", LENGTHS, ids=["no_lengths", "full", "ties"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backend_matches_reference(backend, op, shape, lengths_kind, dtype):
    _compare(op, backend, dtype, *shape, lengths_kind, give_final_grads=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_final_state_gradients_none(backend, op, dtype):
    """dhT / dcT = None means zero gradient reaching the final states."""
    _compare(op, backend, dtype, 5, 3, 4, 17, "ties", give_final_grads=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_inference_saves_nothing_and_matches_training(backend, op, dtype):
    if backend == "cuda" and op.proj and not cuda_has_projection():
        pytest.xfail("the CUDA LSTM launcher does not take w_hr yet")
    rng = np.random.default_rng(3)
    T, N, D, H = 6, 4, 5, 40
    arrays = {
        k: to_backend(backend, v.astype(dtype)) for k, v in op.arrays(T, N, D, H, rng).items()
    }
    for lengths in (None, np.array([6, 2, 2, 5])):
        train_out, ctx = op.forward(arrays, lengths, training=True)
        infer_out, none = op.forward(arrays, lengths, training=False)
        assert ctx is not None and none is None
        for name, a, b in zip(op.outputs(), train_out, infer_out, strict=True):
            if backend == "cpu":  # same arithmetic, other buffers: identical
                np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=name)
            else:
                assert_close(to_numpy(a), to_numpy(b), "recurrent", "forward", dtype, name)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_padded_positions_are_zero_and_ignore_dy(backend):
    """y is 0 past each length, and dy there has no effect on any gradient."""
    op = OPS[0]
    rng = np.random.default_rng(4)
    T, N, D, H = 5, 3, 2, 6
    arrays = {k: to_backend(backend, v) for k, v in op.arrays(T, N, D, H, rng).items()}
    lengths = np.array([5, 2, 3])
    (y, hT, cT), ctx = op.forward(arrays, lengths)
    y = to_numpy(y)
    for n, L in enumerate(lengths):
        assert not y[L:, n].any()
        np.testing.assert_array_equal(to_numpy(hT)[n], y[L - 1, n])
    upstream = op.upstream_arrays(T, N, H, rng)
    noisy = {k: v.copy() for k, v in upstream.items()}
    for n, L in enumerate(lengths):
        noisy["dy"][L:, n] = 1e3
    clean = op.backward(ctx, {k: to_backend(backend, v) for k, v in upstream.items()})
    dirty = op.backward(ctx, {k: to_backend(backend, v) for k, v in noisy.items()})
    for name, a, b in zip(op.grads, clean, dirty, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=name)


@settings(max_examples=20, deadline=None)
@given(
    op_index=st.integers(0, len(OPS) - 1),
    T=st.integers(1, 6),
    N=st.integers(1, 5),
    D=st.integers(1, 9),
    H=st.integers(1, 40),
    lengths_kind=st.sampled_from(LENGTHS),
    seed=st.integers(0, 2**16),
)
def test_cpu_matches_reference_fuzzed(op_index, T, N, D, H, lengths_kind, seed):
    _compare(OPS[op_index], "cpu", np.float64, T, N, D, H, lengths_kind, True, seed)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_cpu_saved_buffers_reused_only_when_free(op):
    """The CPU kernels keep the buffers of saved arrays across calls: a context still alive must
    keep its own (later forwards must not overwrite it), and a reused buffer gives the same
    results as a fresh one."""
    rng = np.random.default_rng(5)
    T, N, D, H = 7, 5, 6, 20
    first = {k: v.astype(np.float32) for k, v in op.arrays(T, N, D, H, rng).items()}
    other = {k: v.astype(np.float32) for k, v in op.arrays(T, N, D, H, rng).items()}
    upstream = {k: v.astype(np.float32) for k, v in op.upstream_arrays(T, N, H, rng).items()}
    _, ctx = op.forward(first, None)
    want = [g.copy() for g in op.backward(ctx, upstream)]
    _, ctx = op.forward(first, None)
    for _ in range(3):  # later forwards while ctx is alive, each dropping its own context
        op.forward(other, None)
    _, ctx_other = op.forward(other, None)
    got = op.backward(ctx, upstream)
    for name, a, b in zip(op.grads, got, want, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)
    del ctx, ctx_other
    _, ctx = op.forward(first, None)  # may reuse a pooled buffer now
    got = op.backward(ctx, upstream)
    for name, a, b in zip(op.grads, got, want, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)
