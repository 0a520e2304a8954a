"""The CPU recurrent engine: each instruction-set variant of the cells vs the reference, variable
lengths (packed rows: ended sequences drop out of the work), and numerics at the edges
(saturated gates, infinite states)."""

from __future__ import annotations

import numpy as np
import pytest
from recurrent_support import OP_IDS, OPS, REFERENCE
from tolerances import assert_close

import fastrnn as fr
from fastrnn._cpu import _recurrent_threads
from fastrnn._cpu import recurrent as engine

ISAS = {"portable": 0, "avx2": 1, "avx512": 2}


@pytest.fixture
def two_threads():
    """fastrnn on 2 threads inside the test (the splits run in parallel), restored after it."""
    threads = fr.get_num_threads()
    fr.set_num_threads(2)
    yield
    fr.set_num_threads(threads)


def _compare(op, dtype, T, N, D, H, lengths, seed=0, final_grads=True):
    rng = np.random.default_rng(seed)
    arrays = {k: v.astype(dtype) for k, v in op.arrays(T, N, D, H, rng).items()}
    upstream = {k: v.astype(dtype) for k, v in op.upstream_arrays(T, N, H, rng).items()}
    if not final_grads:
        upstream = {k: (v if k == "dy" else None) for k, v in upstream.items()}
    a64 = {k: v.astype(np.float64) for k, v in arrays.items()}
    u64 = {k: None if v is None else v.astype(np.float64) for k, v in upstream.items()}
    want_out, want_ctx = op.forward(a64, lengths, module=REFERENCE)
    want_grads = op.backward(want_ctx, u64, module=REFERENCE)
    got_out, ctx = op.forward(arrays, lengths)
    got_grads = op.backward(ctx, upstream)
    for name, got, want in zip(op.outputs(), got_out, want_out, strict=True):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert_close(got, want, "recurrent", "forward", dtype, name)
    for name, got, want in zip(op.grads, got_grads, want_grads, strict=True):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert_close(got, want, "recurrent", "backward", dtype, name)
    return ctx


# How the time loop runs: on one thread, split by hidden units (a barrier per step), or by
# sequences (each thread its own rows; every batch of at least 2 rows with SPLIT_ROWS_MIN 1).
SPLITS = ["serial_loop", "split_by_units", "split_by_rows"]


def _set_split(split, monkeypatch):
    if split != "serial_loop":
        monkeypatch.setattr(_recurrent_threads, "MIN_PARALLEL_WORK", 0)
        monkeypatch.setattr(_recurrent_threads, "MIN_SEQUENCE_PARALLEL_WORK", 0)
        monkeypatch.setattr(engine, "SPLIT_ROWS_MIN", 1 if split == "split_by_rows" else 0)


# ------------------------------------------------------------------------------------------------
# instruction-set variants
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("isa", list(ISAS))
def test_each_instruction_set_matches_reference(isa, op, dtype, split, monkeypatch, two_threads):
    if not engine.isa_supported(ISAS[isa]):
        pytest.skip(f"this CPU does not run {isa}")
    monkeypatch.setenv("FASTRNN_SIMD", isa)
    assert engine.simd_level() == ISAS[isa]
    _set_split(split, monkeypatch)
    # 37 rows: 8-row tiles of the AVX-512 kernels and tiles of the last 5, 6, 4 rows;
    # H=45: two full 16-unit blocks and a partial one, a partial 32-column panel
    for lengths in (None, np.array([6] * 20 + [3] * 10 + [1] * 7)):
        ctx = _compare(op, dtype, 6, 37, 5, 45, lengths, seed=ISAS[isa])
        assert ctx.saved["split"] == {"serial_loop": "serial", "split_by_units": "units",
                                      "split_by_rows": "rows"}[split]
    # 15 rows ending one per step from the fifth on: 15, 14, ..., 10 active rows, the
    # tiles of the last 7, 6, 5, 4, 3, 2 rows; and 9 rows (8 + 1)
    _compare(op, dtype, 6, 15, 5, 45, np.array([6] * 10 + [5, 4, 3, 2, 1]), seed=1)
    _compare(op, dtype, 4, 9, 5, 45, None, seed=2)
    # H=50: 18 columns past the last 32-column panel, two masked 16-column chunks
    _compare(op, dtype, 4, 11, 3, 50, None, seed=3)
    # batches of 1-3 rows over 4+ steps: with the AVX2 kernels the step GEMMs run from W_hh^T's
    # panels (single-row to three-row tiles), elsewhere on BLAS
    _compare(op, dtype, 6, 1, 5, 45, None, seed=4)
    _compare(op, dtype, 6, 3, 5, 45, np.array([6, 2, 5]), seed=5)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("T", [1, 2, 3, 9])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_short_sequences_and_uneven_groups(op, T, split, monkeypatch, two_threads):
    """Fewer than 4 steps (no transposed weights, no panels: the step GEMMs on BLAS), and 21 rows
    in groups of 10 and 11 (with lengths: balanced by steps, so unequal counts)."""
    _set_split(split, monkeypatch)
    for lengths in (None, np.minimum(np.arange(21) % 5 + 1, T)):
        for dtype in (np.float32, np.float64):
            _compare(op, dtype, T, 21, 3, 19, lengths, seed=T)


def test_simd_switch_refuses_unknown_values(monkeypatch):
    monkeypatch.setenv("FASTRNN_SIMD", "sse9")
    with pytest.raises(ValueError, match="FASTRNN_SIMD"):
        engine.simd_level()
    op = OPS[0]
    arrays = op.arrays(2, 2, 2, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="FASTRNN_SIMD"):
        op.forward(arrays)
    monkeypatch.setenv("FASTRNN_SIMD", "auto")
    assert engine.isa_supported(engine.simd_level())


# ------------------------------------------------------------------------------------------------
# variable lengths
# ------------------------------------------------------------------------------------------------

LENGTH_CASES = {
    "unsorted": [3, 7, 1, 5, 6, 2],
    "tied": [4, 4, 7, 2, 2, 4],
    "all_full": [7, 7, 7, 7, 7, 7],
    "one_of_length_1": [7, 6, 7, 1, 5, 7],
    "n1": [5],
    "n1_length_1": [1],
    "shorter_than_T": [3, 2, 3, 1, 3, 3],  # no sequence runs all T steps
}


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(LENGTH_CASES))
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_lengths_match_reference(op, case, dtype, split, monkeypatch):
    _set_split(split, monkeypatch)
    lengths = np.array(LENGTH_CASES[case])
    ctx = _compare(op, dtype, 7, len(lengths), 4, 21, lengths, seed=len(case))
    # the packed rows: exactly one per (sequence, step inside it); no padded position is computed
    assert ctx.saved["rows"].R == lengths.sum()


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_lengths_without_final_gradients(op):
    _compare(op, np.float64, 6, 5, 3, 18, np.array([2, 6, 1, 6, 3]), final_grads=False)


# ------------------------------------------------------------------------------------------------
# numerics at the edges
# ------------------------------------------------------------------------------------------------


def _activations(isa, x):
    if not engine.isa_supported(ISAS[isa]):
        pytest.skip(f"this CPU does not run {isa}")
    return engine.sigmoid_tanh_float32(x, ISAS[isa])


@pytest.mark.parametrize("isa", list(ISAS))
@pytest.mark.parametrize("x", [88.8, 100.0, 1e3, 1e30, np.inf])
def test_float32_activations_saturate_exactly(isa, x):
    # 23 copies: one full 16-lane vector and a masked tail of 7 in the AVX-512 variant
    s_pos, t_pos = _activations(isa, np.full(23, x))
    s_neg, t_neg = _activations(isa, np.full(23, -x))
    assert (s_pos == 1).all() and (s_neg == 0).all()
    assert (t_pos == 1).all() and (t_neg == -1).all()
    # so the derivatives the backward passes use are exactly zero
    assert (s_neg * (1 - s_neg) == 0).all() and (s_pos * (1 - s_pos) == 0).all()
    assert (1 - t_pos * t_pos == 0).all()


@pytest.mark.parametrize("isa", list(ISAS))
def test_float32_activations_accurate_inside_the_range(isa):
    x = np.concatenate(
        [np.linspace(-87.0, 87.0, 20001), [-87.0, -30.0, -1.0, 0.0, 0.5, 20.0, 87.0, -1e-30]]
    ).astype(np.float32)
    s, t = _activations(isa, x)
    x64 = x.astype(np.float64)
    s_ref = 1 / (1 + np.exp(-x64))
    np.testing.assert_allclose(s, s_ref, rtol=1e-6, atol=1e-38)
    np.testing.assert_allclose(t, np.tanh(x64), rtol=1e-6, atol=2e-7)
    assert ((s >= 0) & (s <= 1)).all() and ((t >= -1) & (t <= 1)).all()


@pytest.mark.parametrize("isa", list(ISAS))
def test_float32_activations_keep_nan(isa):
    x = np.array([np.nan, 1.0, -np.nan] + [0.0] * 16 + [np.nan], np.float32)
    s, t = _activations(isa, x)
    np.testing.assert_array_equal(np.isnan(s), np.isnan(x))
    np.testing.assert_array_equal(np.isnan(t), np.isnan(x))


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 33])
def test_float32_activations_every_variant_agrees(n):
    """Each length leaves a different masked tail; the variants agree to a few ulp."""
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 6
    s0, t0 = engine.sigmoid_tanh_float32(x, 0)
    for isa in (1, 2):
        if engine.isa_supported(isa):
            s, t = engine.sigmoid_tanh_float32(x, isa)
            assert s.shape == t.shape == (n,)
            np.testing.assert_allclose(s, s0, rtol=4e-7, atol=1e-38)
            np.testing.assert_allclose(t, t0, rtol=4e-7, atol=2e-7)


@pytest.mark.parametrize("isa", list(ISAS))
def test_gru_with_huge_states_matches_reference(isa, monkeypatch):
    """States around 1e30 saturate the r and z gates: the float32 kernels must give the exact
    zero derivatives the reference gives, not ~1e-38, which the 1e30-sized recurrent
    pre-activations and states blow up into gradients of ~1e21 (and Inf/NaN further on)."""
    if not engine.isa_supported(ISAS[isa]):
        pytest.skip(f"this CPU does not run {isa}")
    monkeypatch.setenv("FASTRNN_SIMD", isa)
    rng = np.random.default_rng(11)
    T, N, D, H = 4, 3, 5, 6
    x = rng.standard_normal((T, N, D)).astype(np.float32)
    h0 = (rng.standard_normal((N, H)) * 1e30).astype(np.float32)
    w_ih = (rng.standard_normal((3 * H, D)) / np.sqrt(D)).astype(np.float32)
    w_hh = (rng.standard_normal((3 * H, H)) / np.sqrt(H)).astype(np.float32)
    b_ih = rng.standard_normal(3 * H).astype(np.float32)
    b_hh = rng.standard_normal(3 * H).astype(np.float32)
    dy = rng.standard_normal((T, N, H)).astype(np.float32)
    y, hT, ctx = fr.gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh)
    grads = fr.gru_backward(ctx, dy)
    a64 = [a.astype(np.float64) for a in (x, h0, w_ih, w_hh, b_ih, b_hh)]
    ry, rhT, rctx = fr.reference.gru_forward(*a64)
    rgrads = fr.reference.gru_backward(rctx, dy.astype(np.float64))
    assert_close(y, ry, "recurrent", "forward", np.float32, "y")
    names = ["dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"]
    for name, g, r in zip(names, grads, rgrads, strict=True):
        assert np.isfinite(g).all(), name
        assert_close(g, r, "recurrent", "backward", np.float32, name)


def test_reference_keeps_infinite_states_without_lengths():
    """An infinite c0 stays infinite in cT and y stays finite (torch.nn.LSTM does the same); a
    product with the all-ones mask turned it into 0 * inf = NaN."""
    rng = np.random.default_rng(12)
    T, N, D, H = 3, 2, 2, 3
    x = rng.standard_normal((T, N, D))
    h0 = rng.standard_normal((N, H))
    c0 = rng.standard_normal((N, H))
    c0[0, 1] = np.inf
    w_ih = rng.standard_normal((4 * H, D))
    w_hh = rng.standard_normal((4 * H, H))
    b = rng.standard_normal(4 * H)
    for module in (fr.reference, fr):
        y, hT, cT, _ = module.lstm_forward(x, h0, c0, w_ih, w_hh, b)
        assert np.isfinite(y).all() and np.isfinite(hT).all(), module.__name__
        assert cT[0, 1] == np.inf and np.isfinite(np.delete(cT.ravel(), 1)).all(), module.__name__


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("fuse", [0, 1], ids=["projection_first", "projection_per_step"])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_input_projection_per_step_or_first(op, fuse, split, monkeypatch, two_threads):
    """The input projection as one GEMM before the time loop or step by step inside it
    (FUSE_INPUT_MIN_ROWS), on the float32 AVX-512 path where the per-step form exists."""
    if not engine.isa_supported(ISAS["avx512"]):
        pytest.skip("this CPU does not run avx512")
    monkeypatch.setattr(engine, "FUSE_INPUT_MIN_ROWS", fuse)
    _set_split(split, monkeypatch)
    _compare(op, np.float32, 6, 15, 7, 45, np.array([6] * 10 + [5, 4, 3, 2, 1]), seed=4)
    _compare(op, np.float32, 5, 9, 33, 20, None, seed=5)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_whole_sequence_gradients_across_blocks(op, split, monkeypatch, two_threads):
    """The backward's whole-sequence GEMMs (dx, dW_ih, dW_hh over all packed rows) on the
    float32 AVX-512 kernels (SEQUENCE_GEMMS_OWN): 260 and 197 rows (k blocks of 96 and a
    remainder), D = 80 and H = 48 (full 32-column panels and a 16-column half past them), gate
    rows in blocks of 48 and a remainder; and D = 70 (BLAS: columns past the halves)."""
    if not engine.isa_supported(ISAS["avx512"]):
        pytest.skip("this CPU does not run avx512")
    monkeypatch.setattr(engine, "SEQUENCE_GEMMS_OWN", True)
    _set_split(split, monkeypatch)
    lengths = np.array([20] * 5 + [17, 15, 12] * 2 + [3, 1])
    for D, H in ((80, 48), (64, 32), (70, 48)):
        _compare(op, np.float32, 20, 13, D, H, None, seed=6)
        _compare(op, np.float32, 20, 13, D, H, lengths, seed=7)
