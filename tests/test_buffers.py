"""The CPU kernels' outputs from reused buffers (fastrnn/_cpu/_buffers.py): a buffer comes back
only once nothing references it, and every kernel writes the whole of an output it hands out
(a reused buffer holds the last output's values, not the zeros of fresh pages: here every
pooled output starts as NaN)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from tolerances import assert_close

import fastrnn as fr
from fastrnn import reference as ref
from fastrnn._cpu import _buffers


@pytest.fixture
def pool(monkeypatch):
    """Every output pooled, however small, from an empty pool."""
    monkeypatch.setattr(_buffers, "OUTPUT_MIN_BYTES", 0)
    monkeypatch.setattr(_buffers, "OUTPUT_KEEP_BYTES", 256 << 20)
    monkeypatch.setattr(_buffers, "FILL", 0xFF)  # NaN in both float types, -1 in int32
    _buffers.clear()
    yield _buffers
    _buffers.clear()


def test_buffer_comes_back_only_when_unreferenced(pool):
    a = pool.empty((300, 500), np.float32)
    assert a.shape == (300, 500) and a.dtype == np.float32 and a.flags.c_contiguous
    assert a.ctypes.data % 64 == 0 and a.flags.writeable
    address = a.ctypes.data
    b = pool.empty((300, 500), np.float32)
    assert b.ctypes.data != address  # a holds its buffer
    del a
    c = pool.empty((300, 500), np.float32)
    assert c.ctypes.data == address  # a's, now free
    view = c[10:20, ::3]
    del c
    d = pool.empty((300, 500), np.float32)
    assert d.ctypes.data != address  # a slice of c holds it
    del view, d
    e = pool.empty((150, 1000), np.float32)  # the same bytes in another shape
    assert e.ctypes.data == address
    used, free = pool.pooled_bytes()
    assert used >= 2 * 300 * 500 * 4 and free >= 0


def test_buffer_held_by_other_owners(pool):
    torch = pytest.importorskip("torch")
    a = pool.empty((256, 256), np.float32)
    address = a.ctypes.data
    t = torch.from_numpy(a)
    m = memoryview(a)
    del a
    assert pool.empty((256, 256), np.float32).ctypes.data != address
    del t
    assert pool.empty((256, 256), np.float32).ctypes.data != address  # the memoryview's
    del m
    assert pool.empty((256, 256), np.float32).ctypes.data == address


def test_fit_size_and_limits(pool, monkeypatch):
    big = pool.empty((1 << 20,), np.float32)  # 4 MB
    del big
    # no buffer more than twice the size asked for: a small output does not take a big one
    small = pool.empty((1000,), np.float32)
    assert pool.pooled_bytes()[1] >= 4 << 20
    del small
    monkeypatch.setattr(pool, "OUTPUT_KEEP_BYTES", 1 << 20)
    keep = pool.empty((10,), np.float32)
    assert pool.pooled_bytes()[1] <= 1 << 20  # the 4 MB one freed
    live = [pool.empty((16,), np.float64) for _ in range(pool.OUTPUT_TRACK + 5)]
    assert len(pool._outputs) <= pool.OUTPUT_TRACK
    del live, keep


def test_small_outputs_are_plain_arrays():
    a = _buffers.empty((4, 4), np.float64)
    assert a.flags.owndata  # below OUTPUT_MIN_BYTES: np.empty


def test_cache_size_from_the_environment():
    code = "import fastrnn._cpu._buffers as b; print(b.OUTPUT_KEEP_BYTES)"
    run = [sys.executable, "-c", code]
    out = subprocess.run(run, env={"FASTRNN_OUTPUT_CACHE_MB": "3", "PATH": ""},
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == str(3 << 20), out.stderr
    out = subprocess.run(run, env={"FASTRNN_OUTPUT_CACHE_MB": "lots", "PATH": ""},
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode != 0 and "FASTRNN_OUTPUT_CACHE_MB" in out.stderr


CONV_CASES = [
    # (N, C, H, W, F, k, stride, padding, groups, algorithm, kwargs)
    (2, 3, 9, 11, 5, 3, 1, 1, 1, "direct", {}),
    (2, 16, 10, 9, 16, 3, 1, 1, 1, "winograd", {}),
    (2, 8, 7, 7, 6, 1, 1, 0, 1, "im2col", {}),
    (2, 6, 9, 8, 6, 3, 1, 1, 6, "auto", {}),  # depthwise planes
    (2, 4, 9, 9, 8, 3, 2, 1, 1, "direct", {}),  # stride 2
    (4, 4, 8, 8, 6, 3, 1, 1, 1, "direct", {"max_pool": 2, "activation": "relu"}),
    (4, 16, 8, 8, 16, 3, 1, 1, 1, "winograd", {"max_pool": 2}),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[9]}{c[10] or ''}s{c[6]}g{c[8]}")
def test_conv2d_writes_all_of_reused_outputs(pool, case, dtype):
    N, C, H, W, F, k, s, p, G, algorithm, kw = case
    assert np.isnan(pool.empty((3,), dtype)).all()  # what a kernel would leave unwritten
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C // G, k, k)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    for _ in range(2):  # the second round on the first's buffers
        y, ctx = fr.conv2d_forward(x, w, b, stride=s, padding=p, groups=G, algorithm=algorithm,
                                   **kw)  # fmt: skip
        yr, cr = ref.conv2d_forward(x, w, b, stride=s, padding=p, groups=G)
        if kw.get("activation"):
            yr = np.maximum(yr, 0)
        if kw.get("max_pool"):
            yr, _ = ref.max_pool2d_forward(yr, 2)
        assert_close(y, yr, "conv", "forward", dtype, name="y")
        if kw:
            continue
        dy = rng.standard_normal(y.shape).astype(dtype)
        dx, dw, db = fr.conv2d_backward(ctx, dy)
        dxr, dwr, dbr = ref.conv2d_backward(cr, dy)
        for name, got, want in (("dx", dx, dxr), ("dw", dw, dwr), ("db", db, dbr)):
            assert_close(got, want, "conv", "backward", dtype, name=name)
        del y, ctx, dx


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pool2d_writes_all_of_reused_outputs(pool, kind):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    mine = getattr(fr, f"{kind}_pool2d_forward"), getattr(fr, f"{kind}_pool2d_backward")
    theirs = getattr(ref, f"{kind}_pool2d_forward"), getattr(ref, f"{kind}_pool2d_backward")
    for kernel, stride in ((2, 2), (3, 1)):
        y, ctx = mine[0](x, kernel, stride)
        yr, cr = theirs[0](x, kernel, stride)
        assert_close(y, yr, "pool", "forward", np.float32, name="y")
        dy = rng.standard_normal(y.shape).astype(np.float32)
        assert_close(mine[1](ctx, dy), theirs[1](cr, dy), "pool", "backward", np.float32,
                     name="dx")  # fmt: skip


def test_lstm_input_gradient_in_a_reused_buffer(pool):
    rng = np.random.default_rng(3)
    T, N, D, H = 5, 3, 4, 6
    x = rng.standard_normal((T, N, D))
    h0, c0 = rng.standard_normal((N, H)), rng.standard_normal((N, H))
    w_ih, w_hh = rng.standard_normal((4 * H, D)), rng.standard_normal((4 * H, H))
    b = rng.standard_normal(4 * H)
    for lengths in (None, np.array([5, 2, 4])):
        y, _, _, ctx = fr.lstm_forward(x, h0, c0, w_ih, w_hh, b, lengths=lengths)
        *_, cr = ref.lstm_forward(x, h0, c0, w_ih, w_hh, b, lengths=lengths)
        dy = rng.standard_normal(y.shape)
        got, want = fr.lstm_backward(ctx, dy), ref.lstm_backward(cr, dy)
        assert_close(got[0], want[0], "recurrent", "backward", np.float64, name="dx")


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_fork_while_the_pool_is_locked(pool):
    """A child forked while another thread holds the pool's lock still gets outputs."""
    import multiprocessing as mp
    import threading

    entered, release = threading.Event(), threading.Event()

    def hold():
        with pool._lock:
            entered.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    entered.wait(10)
    ctx = mp.get_context("fork")
    try:
        with ctx.Pool(1) as workers:
            shape = workers.apply_async(_output_shape).get(timeout=30)
    finally:
        release.set()
        holder.join()
    assert shape == (512, 512)


def _output_shape():
    return _buffers.empty((512, 512), np.float32).shape
