"""Thread control of the recurrent CPU kernels: 1, 2 and 3 OpenMP threads give the same results,
set_num_threads is validated, and a call leaves the BLAS thread setting as it found it."""

from __future__ import annotations

import numpy as np
import pytest
from recurrent_support import OP_IDS, OPS, REFERENCE
from tolerances import assert_close

import fastrnn as fr
from fastrnn._cpu import _recurrent_threads
from fastrnn._cpu import recurrent as engine

# Results agree to rounding: a thread computes whole gate columns / output rows of each GEMM, so
# no sum is split across threads, but BLAS may pick other kernels for other slice sizes.
AGREE = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-14)}


@pytest.fixture
def restore_threads():
    before = fr.get_num_threads()
    yield
    fr.set_num_threads(before)


def _run(op, arrays, upstream, lengths):
    outputs, ctx = op.forward(arrays, lengths)
    return outputs + op.backward(ctx, upstream)


@pytest.mark.parametrize("mode", ["split_by_units", "split_by_rows", "serial_loop"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_one_and_several_threads_agree(op, dtype, mode, monkeypatch, restore_threads):
    # Force either path even for these small shapes: the time loop split over the threads, or
    # the time loop on one thread with the whole-sequence GEMMs split over the threads.
    if mode != "serial_loop":
        monkeypatch.setattr(_recurrent_threads, "MIN_PARALLEL_WORK", 0)
        # by sequences: 5 rows in groups of 2-3 (with lengths, balanced by their steps)
        monkeypatch.setattr(_recurrent_threads, "MIN_SEQUENCE_PARALLEL_WORK", 0)
        monkeypatch.setattr(engine, "SPLIT_ROWS_MIN", 1 if mode == "split_by_rows" else 0)
    else:
        monkeypatch.setattr(_recurrent_threads, "MIN_PARALLEL_WORK", 1 << 62)
        monkeypatch.setattr(_recurrent_threads, "MIN_SEQUENCE_PARALLEL_WORK", 0)
    rng = np.random.default_rng(7)
    T, N, D, H = 7, 5, 6, 53  # 4 blocks of 16 units: uneven splits over 2 and 3 threads
    arrays = {k: v.astype(dtype) for k, v in op.arrays(T, N, D, H, rng).items()}
    upstream = {k: v.astype(dtype) for k, v in op.upstream_arrays(T, N, H, rng).items()}
    for lengths in (None, np.array([7, 3, 3, 1, 6])):
        results = {}
        for n in (1, 2, 3):
            fr.set_num_threads(n)
            results[n] = _run(op, arrays, upstream, lengths)
        # the partitioned runs also match the reference directly
        arrays64 = {k: v.astype(np.float64) for k, v in arrays.items()}
        upstream64 = {k: v.astype(np.float64) for k, v in upstream.items()}
        ref_out, ref_ctx = op.forward(arrays64, lengths, module=REFERENCE)
        ref_grads = op.backward(ref_ctx, upstream64, module=REFERENCE)
        for name, got, want in zip(
            op.outputs() + op.grads, results[2], ref_out + ref_grads, strict=True
        ):
            direction = "forward" if name in op.outputs() else "backward"
            assert_close(got, want, "recurrent", direction, dtype, name)
        for n in (2, 3):
            for name, a, b in zip(op.outputs() + op.grads, results[1], results[n], strict=True):
                np.testing.assert_allclose(b, a, err_msg=f"{name}, {n} threads", **AGREE[dtype])


@pytest.mark.parametrize("order", ["units_then_rows", "rows_then_units"])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_backward_split_otherwise_than_forward(op, order, monkeypatch, restore_threads):
    """The backward takes the forward's gate layout from the context whichever way it splits
    its own time loop (here the split changes between the two calls)."""
    monkeypatch.setattr(_recurrent_threads, "MIN_PARALLEL_WORK", 0)
    monkeypatch.setattr(_recurrent_threads, "MIN_SEQUENCE_PARALLEL_WORK", 0)
    fr.set_num_threads(2)
    rng = np.random.default_rng(9)
    T, N, D, H = 5, 6, 4, 37  # 37 units: blocks of 32 + 5 when split by units
    arrays = op.arrays(T, N, D, H, rng)
    upstream = op.upstream_arrays(T, N, H, rng)
    first, second = (0, 1) if order == "units_then_rows" else (1, 0)
    for lengths in (None, np.array([5, 2, 5, 1, 3, 4])):
        ref_out, ref_ctx = op.forward(arrays, lengths, module=REFERENCE)
        ref_grads = op.backward(ref_ctx, upstream, module=REFERENCE)
        monkeypatch.setattr(engine, "SPLIT_ROWS_MIN", first)
        outputs, ctx = op.forward(arrays, lengths)
        monkeypatch.setattr(engine, "SPLIT_ROWS_MIN", second)
        grads = op.backward(ctx, upstream)
        for name, got, want in zip(op.outputs() + op.grads, outputs + grads, ref_out + ref_grads,
                                   strict=True):
            np.testing.assert_allclose(got, want, err_msg=name, **AGREE[np.float64])


def test_split_by_rows_follows_the_weights_and_the_rows(monkeypatch, restore_threads):
    """By sequences when each thread gets SPLIT_ROWS_MIN rows and the weights a step streams
    fit SPLIT_ROWS_WEIGHT_BYTES, or each thread gets SPLIT_ROWS_MANY rows; else by units."""
    monkeypatch.setattr(_recurrent_threads, "MIN_PARALLEL_WORK", 0)
    monkeypatch.setattr(_recurrent_threads, "MIN_SEQUENCE_PARALLEL_WORK", 0)
    monkeypatch.setattr(engine, "SPLIT_ROWS_MIN", 4)
    monkeypatch.setattr(engine, "SPLIT_ROWS_MANY", 8)
    fr.set_num_threads(2)
    rng = np.random.default_rng(3)
    op = OPS[0]  # LSTM: W_hh^T of H = 32 is 32 x 128 float64, 32 KiB

    def split(N, limit):
        monkeypatch.setattr(engine, "SPLIT_ROWS_WEIGHT_BYTES", limit)
        _, ctx = op.forward(op.arrays(3, N, 5, 32, rng), None)
        return ctx.saved["split"]

    assert split(8, 1 << 20) == "rows"  # 4 rows each, the weights fit
    assert split(8, 1 << 10) == "units"  # 4 rows each, the weights do not fit
    assert split(16, 1 << 10) == "rows"  # 8 rows each share every pass over the weights
    assert split(6, 1 << 20) == "units"  # 3 rows each


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_more_threads_than_blocks(op, monkeypatch, restore_threads):
    """H=20 is two blocks of units (16 + 4): two of four threads own no units but still take part
    in every barrier."""
    monkeypatch.setattr(_recurrent_threads, "MIN_PARALLEL_WORK", 0)
    rng = np.random.default_rng(8)
    arrays = op.arrays(4, 3, 2, 20, rng)
    upstream = op.upstream_arrays(4, 3, 20, rng)
    fr.set_num_threads(1)
    one = _run(op, arrays, upstream, np.array([4, 1, 2]))
    fr.set_num_threads(4)
    four = _run(op, arrays, upstream, np.array([4, 1, 2]))
    for name, a, b in zip(op.outputs() + op.grads, one, four, strict=True):
        np.testing.assert_allclose(b, a, err_msg=name, **AGREE[np.float64])


def test_team_size_follows_set_num_threads(restore_threads):
    fr.set_num_threads(3)
    assert _recurrent_threads.team_size(64, 512, 4) == 3
    # Too little work per step for a barrier to pay: one thread.
    assert _recurrent_threads.team_size(1, 8, 4) == 1
    fr.set_num_threads(1)
    assert _recurrent_threads.team_size(64, 512, 4) == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_set_num_threads_rejects_bad_values(bad, restore_threads):
    with pytest.raises((TypeError, ValueError), match="n"):
        fr.set_num_threads(bad)


def test_blas_threads_restored_after_a_call(restore_threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = [
        lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"
    ]
    fr.set_num_threads(2)
    op = OPS[0]
    rng = np.random.default_rng(9)
    arrays = op.arrays(3, 8, 16, 64, rng)
    _, ctx = op.forward(arrays)
    op.backward(ctx, op.upstream_arrays(3, 8, 64, rng))
    after = [
        lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"
    ]
    assert after == before
    # The kernels found SciPy's BLAS functions (no slow fallback on the standard wheels).
    assert _recurrent_threads.blas_thread_functions()


@pytest.mark.parametrize("strategy", ["serial", "blas", "omp"])
@pytest.mark.parametrize("N,H,G", [(1, 32, 4), (5, 40, 3), (40, 48, 1)])
def test_step_gemm_probe_runs_every_strategy(strategy, N, H, G):
    """The threading probe (fastrnn._bench --strategies) runs the kernels' step GEMMs, packed
    panels included (N >= 4), for every strategy and leaves the BLAS setting as it found it."""
    from fastrnn._cpu._recurrent_bench import step_gemm_seconds
    from threadpoolctl import threadpool_info

    before = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    seconds = step_gemm_seconds(N, H, G, strategy, 2, steps=8)
    assert np.isfinite(seconds) and seconds > 0
    assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == before


def test_step_gemm_probe_rejects_bad_arguments():
    from fastrnn._cpu._recurrent_bench import step_gemm_seconds

    with pytest.raises(ValueError, match="strategy"):
        step_gemm_seconds(4, 16, 4, "gpu", 2)
    with pytest.raises(ValueError, match="threads"):
        step_gemm_seconds(4, 16, 4, "omp", 0)


def test_split_comparison_restores_the_switches(capsys):
    """python -m fastrnn._bench --splits: both splits forced in turn, the engine's switches as
    they were afterwards, every column printed."""
    from fastrnn import _bench

    before = (engine.SPLIT_ROWS_MIN, engine.SPLIT_ROWS_WEIGHT_BYTES)
    rows = _bench.compare_splits([(3, 16, 4, 8)], n_threads=2, rounds=1)
    assert (engine.SPLIT_ROWS_MIN, engine.SPLIT_ROWS_WEIGHT_BYTES) == before
    (row,) = rows
    for mode in ("units", "rows"):
        for passes in ("fwd-train", "fwd+bwd"):
            assert row[f"{mode} {passes}"] > 0
    _bench.main(["--splits", "--threads", "2", "--rounds", "1", "--shapes", "3,16,4,8;2,8,3,5"])
    out = capsys.readouterr().out
    assert "3,16,4,8" in out and "2,8,3,5" in out
    if _bench.torch_available():
        assert "nan" not in out.split("\n", 2)[2]


def test_scipy_blas_without_the_scipy_linalg_package():
    """The recurrent, training and inference kernels take SciPy's sgemm / dgemm from
    scipy.linalg.cython_blas loaded from its file, without running scipy/linalg/__init__.py
    (which cost the first recurrent call of a process 160-260 ms); a later ``import
    scipy.linalg`` still binds the same module as scipy.linalg.cython_blas. Checked in a fresh
    process: float64 calls (every GEMM on BLAS) against the reference."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        import fastrnn as fr
        from fastrnn import nn
        rng = np.random.default_rng(0)
        x, h0 = rng.standard_normal((6, 3, 5)), rng.standard_normal((3, 4))
        w_ih, w_hh, b = (rng.standard_normal(s) for s in ((16, 5), (16, 4), (16,)))
        y, _, _, ctx = fr.lstm_forward(x, h0, h0, w_ih, w_hh, b)
        grads = fr.lstm_backward(ctx, np.ones_like(y))
        with fr.use_backend("numpy"):
            yr, _, _, cr = fr.lstm_forward(x, h0, h0, w_ih, w_hh, b)
            gr = fr.lstm_backward(cr, np.ones_like(yr))
        assert np.allclose(y, yr, rtol=1e-12, atol=1e-12)
        assert all(np.allclose(a, c, rtol=1e-10, atol=1e-12) for a, c in zip(grads, gr))
        head = nn.Linear(4, 7, dtype=np.float64)  # the fused linear + cross-entropy kernel
        loss, dx = head.cross_entropy(y.reshape(-1, 4), rng.integers(0, 7, 18))
        assert np.isfinite(loss) and dx.shape == (18, 4)
        run = fr.lstm_inference(w_ih, w_hh, b)  # the prepared-inference kernels
        h, c = run.step(x[0], h0, h0)
        assert np.allclose(h, yr[0], rtol=1e-12, atol=1e-12)
        print("scipy.linalg" in sys.modules)
        import scipy.linalg
        from fastrnn._cpu import _scipy_blas
        print(scipy.linalg.cython_blas is _scipy_blas.module())
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_blas_pinned_before_scipy_is_loaded_still_pins_scipys_blas():
    """The list of BLAS libraries is built once: entered before anything had loaded SciPy,
    blas_threads must still pin SciPy's BLAS (the kernels' one), else it runs its own threads
    inside the kernels' OpenMP regions. Checked in a fresh process."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import sys
        from fastrnn._cpu import _blas_threads
        assert "scipy.linalg" not in sys.modules
        with _blas_threads.blas_threads(1):
            pass
        from threadpoolctl import threadpool_info
        import scipy.linalg.cython_blas
        loaded = [lib["filepath"] for lib in threadpool_info() if lib["user_api"] == "blas"]
        found = len(_blas_threads.blas_thread_functions()) + len(
            getattr(_blas_threads._found[1], "lib_controllers", []) or [])
        print(len(loaded), found)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded, found = map(int, out.stdout.split())
    assert found == loaded >= 1
