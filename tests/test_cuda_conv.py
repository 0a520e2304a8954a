"""The CUDA backend of conv2d and pooling on a GPU: every option against the reference, float32
and float64, several workspace chunks, grids smaller than the work, bitwise determinism, and
mixing errors. Skipped (visibly) without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CUDA
from cuda_support import BumpAllocator
from tolerances import assert_close

import fastrnn as fr
from fastrnn import reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA, reason="cupy.is_available() is False"),
]

if CUDA:
    import cupy

# (N, C, H, W, F, (KH, KW), stride, padding, dilation, groups, bias)
CONV_CASES = [
    (2, 3, 7, 9, 4, (3, 3), 1, 1, 1, 1, True),
    (1, 1, 5, 5, 1, (1, 1), 1, 0, 1, 1, False),
    (2, 4, 8, 7, 6, (1, 1), 1, 0, 1, 2, True),
    (2, 3, 9, 8, 5, (2, 3), (2, 1), (1, 0), 1, 1, True),
    (1, 2, 11, 10, 3, (2, 2), 3, 0, 1, 1, False),
    (2, 4, 9, 9, 4, (3, 3), 1, 2, 2, 4, True),
    (3, 6, 6, 7, 4, (3, 2), (1, 2), (1, 1), (2, 1), 2, False),
    (1, 5, 13, 12, 3, (5, 4), 2, (2, 1), 1, 1, True),
    (4, 32, 17, 15, 24, (3, 3), 1, 1, 1, 1, True),
    (8, 64, 56, 56, 8, (3, 3), 1, 1, 1, 1, True),  # im2col: 14M elements > one launch grid
    (3, 8, 16, 17, 12, (1, 1), 1, 0, 2, 2, True),  # pointwise path: GEMMs on NCHW
    (2, 6, 16, 16, 9, (1, 1), 1, 0, 1, 3, False),  # pointwise, groups > images
]

# (N, C, H, W, kernel, stride, padding)
POOL_CASES = [
    (2, 3, 8, 8, 2, None, 0),
    (1, 2, 7, 9, 3, 2, 1),
    (2, 1, 5, 6, (3, 2), 1, 1),
    (1, 4, 9, 7, (2, 3), (3, 2), (1, 0)),
    (2, 5, 11, 10, (5, 3), (2, 3), (2, 1)),
    (16, 64, 64, 64, 3, 2, 1),  # 4M inputs > one launch grid
]


def _conv_id(case) -> str:
    N, C, H, W, F, k, s, p, d, g, bias = case
    return f"N{N}C{C}H{H}W{W}F{F}k{k[0]}x{k[1]}s{s}p{p}d{d}g{g}{'b' if bias else ''}"


def _pool_id(case) -> str:
    return "N{}C{}H{}W{}k{}s{}p{}".format(*case)


@pytest.fixture
def rt():
    from fastrnn._cuda._runtime import runtime

    r = runtime()
    r.check_bounds = True
    yield r
    r.check_bounds = False


def _conv_data(case, dtype, seed=0):
    N, C, H, W, F, (KH, KW), s, p, d, g, bias = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = (rng.standard_normal((F, C // g, KH, KW)) / np.sqrt(C // g * KH * KW)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype) if bias else None
    return x, w, b, dict(stride=s, padding=p, dilation=d, groups=g)


def _conv_gpu(x, w, b, kw, dy_seed=1):
    dev = [None if a is None else cupy.asarray(a) for a in (x, w, b)]
    y, ctx = fr.conv2d_forward(*dev, **kw)
    assert ctx.backend == "cuda"
    dy = np.random.default_rng(dy_seed).standard_normal(y.shape).astype(x.dtype)
    return y, fr.conv2d_backward(ctx, cupy.asarray(dy)), dy


def _conv_check(case, dtype):
    x, w, b, kw = _conv_data(case, dtype)
    y, grads, dy = _conv_gpu(x, w, b, kw)
    f64 = [None if a is None else a.astype(np.float64) for a in (x, w, b)]
    y_ref, rctx = ref.conv2d_forward(*f64, **kw)
    want = ref.conv2d_backward(rctx, dy.astype(np.float64))
    assert isinstance(y, cupy.ndarray) and y.dtype == dtype
    assert_close(y, y_ref, "conv", "forward", dtype, name="y")
    for name, a, r in zip(("dx", "dw", "db"), grads, want, strict=True):
        if r is None:
            assert a is None
            continue
        assert isinstance(a, cupy.ndarray) and a.dtype == dtype
        assert_close(a, r, "conv", "backward", dtype, name=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_conv2d_matches_reference(rt, case, dtype):
    _conv_check(case, dtype)


def test_conv2d_small_workspace_and_tiny_grid(rt, monkeypatch):
    """Chunks of two images (the last one short) and a 2-block grid."""
    from fastrnn._cuda import conv

    case = (5, 4, 6, 7, 6, (3, 3), (1, 2), 1, 1, 2, True)
    per_image = (4 * 9 + 6) * 6 * 4 * 8  # (C*KH*KW + F) * OH*OW * itemsize
    monkeypatch.setattr(conv, "WORKSPACE_BYTES", 2 * per_image)
    monkeypatch.setattr(rt, "max_blocks", 2)
    _conv_check(case, np.float64)


@pytest.mark.parametrize("groups", [1, 4])
def test_conv2d_split_k_weight_gradient(rt, monkeypatch, groups):
    """dW through split-K slices (forced: slices of 50 columns, the last one shorter) on two
    chunks, float32 against the reference."""
    from fastrnn._cuda import conv

    case = (6, 8, 10, 9, 8, (3, 3), 1, 1, 1, groups, True)
    monkeypatch.setattr(conv, "DW_MIN_SLICE", 50)
    monkeypatch.setattr(conv, "WORKSPACE_BYTES", 3 * (8 * 9 + 8) * 90 * 4)  # 3 images a chunk
    assert conv.dw_slices(groups, 8 // groups, 8 // groups * 9, 3 * 90, 4) == 5
    _conv_check(case, np.float32)


def test_conv2d_bitwise_deterministic(rt):
    x, w, b, kw = _conv_data((8, 32, 28, 28, 32, (3, 3), 1, 1, 1, 1, True), np.float32)
    y1, g1, _ = _conv_gpu(x, w, b, kw)
    y2, g2, _ = _conv_gpu(x, w, b, kw)
    for a, c in zip([y1, *g1], [y2, *g2], strict=True):
        np.testing.assert_array_equal(cupy.asnumpy(a), cupy.asnumpy(c))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", POOL_CASES, ids=_pool_id)
@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d"])
def test_pool_matches_reference(rt, op, case, dtype):
    N, C, H, W, k, s, p = case
    x = np.random.default_rng(0).standard_normal((N, C, H, W)).astype(dtype)
    y, ctx = getattr(fr, f"{op}_forward")(cupy.asarray(x), k, s, p)
    assert ctx.backend == "cuda"
    dy = np.random.default_rng(1).standard_normal(y.shape).astype(dtype)
    dx = getattr(fr, f"{op}_backward")(ctx, cupy.asarray(dy))
    y_ref, rctx = getattr(ref, f"{op}_forward")(x.astype(np.float64), k, s, p)
    dx_ref = getattr(ref, f"{op}_backward")(rctx, dy.astype(np.float64))
    assert_close(y, y_ref, "pool", "forward", dtype, name="y")
    assert_close(dx, dx_ref, "pool", "backward", dtype, name="dx")


def test_max_pool_ties_nan_and_infinities(rt, monkeypatch):
    monkeypatch.setattr(rt, "max_blocks", 1)
    rng = np.random.default_rng(3)
    x = rng.integers(-2, 3, size=(2, 3, 9, 7)).astype(np.float64)
    x[0, 0, :3, :3] = -np.inf
    x[-1, -1, 1, 1] = np.nan
    x[-1, -1, 2, 0] = np.nan
    y, ctx = fr.max_pool2d_forward(cupy.asarray(x), 3, 2, 1)
    dy = rng.standard_normal(y.shape)
    dx = fr.max_pool2d_backward(ctx, cupy.asarray(dy))
    y_ref, rctx = ref.max_pool2d_forward(x, 3, 2, 1)
    np.testing.assert_array_equal(cupy.asnumpy(y), y_ref)
    np.testing.assert_array_equal(cupy.asnumpy(dx), ref.max_pool2d_backward(rctx, dy))


def test_pool_bitwise_deterministic(rt):
    x = cupy.asarray(np.random.default_rng(0).standard_normal((8, 16, 33, 31)).astype(np.float32))
    for op in ("max_pool2d", "avg_pool2d"):
        outs = []
        for _ in range(2):
            y, ctx = getattr(fr, f"{op}_forward")(x, 3, 1, 1)
            outs.append((cupy.asnumpy(y), cupy.asnumpy(getattr(fr, f"{op}_backward")(ctx, y))))
        for a, c in zip(outs[0], outs[1], strict=True):
            np.testing.assert_array_equal(a, c)


def test_mixing_numpy_and_cupy_is_a_type_error():
    x = cupy.zeros((1, 2, 5, 5), dtype=np.float32)
    w = np.zeros((3, 2, 3, 3), dtype=np.float32)
    with pytest.raises(TypeError, match="cannot mix NumPy"):
        fr.conv2d_forward(x, w)
    y, ctx = fr.max_pool2d_forward(x, 2)
    with pytest.raises(TypeError):
        fr.max_pool2d_backward(ctx, cupy.asnumpy(y))


def test_conv2d_cuda_graphs(rt, monkeypatch):
    """With CUDA graphs on and the same addresses every call, forward and backward are
    captured on the second call and replayed afterwards; every call matches the reference,
    replays bitwise."""
    monkeypatch.setattr(rt, "graphs", True)
    rt.loops.clear()  # no loop of an earlier test at these addresses
    case = (3, 4, 9, 9, 6, (3, 3), 1, 2, 2, 2, True)
    x, w, b, kw = _conv_data(case, np.float32)
    before = dict(rt.graph_stats)
    bump = BumpAllocator(64 * 2**20)
    runs = []
    for _ in range(4):
        bump.reset()
        with cupy.cuda.using_allocator(bump):
            y, grads, dy = _conv_gpu(x, w, b, kw)
            runs.append([cupy.asnumpy(a) for a in (y, *grads)])
            del y, grads
    stats = rt.graph_stats
    assert stats["captured"] - before["captured"] == 2, stats
    assert stats["replayed"] - before["replayed"] == 4, stats
    f64 = [a.astype(np.float64) for a in (x, w, b)]
    y_ref, rctx = ref.conv2d_forward(*f64, **kw)
    want = [y_ref, *ref.conv2d_backward(rctx, dy.astype(np.float64))]
    for run in runs:
        for a, r, direction in zip(run, want, ["forward"] + ["backward"] * 3, strict=True):
            assert_close(a, r, "conv", direction, np.float32)
    for a, c in zip(runs[3], runs[2], strict=True):
        np.testing.assert_array_equal(a, c)
