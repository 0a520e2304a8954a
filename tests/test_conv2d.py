"""conv2d: the reference against finite differences and PyTorch, every kernel backend against the
reference, threads, and the error policy."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DTYPES, KERNEL_BACKENDS, to_backend, to_numpy
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close

import fastrnn as fr
from fastrnn import reference as ref
from fastrnn.nn import Conv2d

# (N, C, H, W, F, (KH, KW), stride, padding, dilation, groups, bias)
CASES = [
    (2, 3, 7, 9, 4, (3, 3), 1, 1, 1, 1, True),  # odd sizes, "same" padding
    (1, 1, 5, 5, 1, (1, 1), 1, 0, 1, 1, False),  # N=1, C=1, F=1, 1x1
    (2, 4, 8, 7, 6, (1, 1), 1, 0, 1, 2, True),  # 1x1 stride 1 no padding (skips im2col), groups
    (2, 3, 9, 8, 5, (2, 3), (2, 1), (1, 0), 1, 1, True),  # non-square kernel and stride
    (1, 2, 11, 10, 3, (2, 2), 3, 0, 1, 1, False),  # stride > kernel
    (2, 4, 9, 9, 4, (3, 3), 1, 2, 2, 4, True),  # depthwise (groups = C), dilation
    (3, 6, 6, 7, 4, (3, 2), (1, 2), (1, 1), (2, 1), 2, False),  # groups, mixed dilation
    (2, 3, 5, 6, 6, (1, 1), 2, 1, 1, 3, True),  # 1x1 with stride and padding, depthwise x2
    (1, 5, 13, 12, 3, (5, 4), 2, (2, 1), 1, 1, True),  # large non-square kernel
    (2, 1, 4, 4, 2, (4, 4), 1, 0, 1, 1, True),  # kernel = input: 1x1 output
    (1, 17, 3, 19, 9, (3, 1), 1, (1, 0), 1, 1, True),  # more channels than threads' tiles
]


def _ids(case) -> str:
    N, C, H, W, F, k, s, p, d, g, bias = case
    return f"N{N}C{C}H{H}W{W}F{F}k{k[0]}x{k[1]}s{s}p{p}d{d}g{g}{'b' if bias else ''}"


def _data(case, dtype=np.float64, seed=0):
    N, C, H, W, F, (KH, KW), s, p, d, g, bias = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C // g, KH, KW)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype) if bias else None
    kwargs = dict(stride=s, padding=p, dilation=d, groups=g)
    return x, w, b, kwargs


# ------------------------------------------------------------------------------------------------
# the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES[:8], ids=_ids)
def test_reference_finite_differences(case):
    """Gradients of L = sum(y * r) by central differences, float64."""
    x, w, b, kw = _data(case)
    y, ctx = ref.conv2d_forward(x, w, b, **kw)
    r = np.random.default_rng(1).standard_normal(y.shape)
    dx, dw, db = ref.conv2d_backward(ctx, r)
    assert (db is None) == (b is None)

    def loss(xx, ww, bb):
        return float(np.sum(ref.conv2d_forward(xx, ww, bb, training=False, **kw)[0] * r))

    eps = 1e-6
    for name, arr, grad in (("x", x, dx), ("w", w, dw), ("b", b, db)):
        if arr is None:
            continue
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + eps
            up = loss(x, w, b)
            arr[idx] = old - eps
            down = loss(x, w, b)
            arr[idx] = old
            num[idx] = (up - down) / (2 * eps)
        assert_close(grad, num, "fd", "backward", np.float64, name=f"d{name}")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reference_matches_torch(case):
    torch = pytest.importorskip("torch")
    x, w, b, kw = _data(case)
    y, ctx = ref.conv2d_forward(x, w, b, **kw)
    dy = np.random.default_rng(2).standard_normal(y.shape)
    dx, dw, db = ref.conv2d_backward(ctx, dy)

    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    bt = None if b is None else torch.tensor(b, requires_grad=True)
    yt = torch.nn.functional.conv2d(xt, wt, bt, **kw)
    yt.backward(torch.tensor(dy))
    assert_close(y, yt.detach().numpy(), "conv", "forward", np.float64, name="y")
    assert_close(dx, xt.grad.numpy(), "conv", "backward", np.float64, name="dx")
    assert_close(dw, wt.grad.numpy(), "conv", "backward", np.float64, name="dw")
    if b is not None:
        assert_close(db, bt.grad.numpy(), "conv", "backward", np.float64, name="db")


def test_reference_inference_saves_nothing():
    x, w, b, kw = _data(CASES[0])
    y, ctx = ref.conv2d_forward(x, w, b, training=False, **kw)
    assert ctx is None
    assert y.shape == (2, 4, 7, 9)


def test_reference_context():
    x, w, b, kw = _data(CASES[3])
    y, ctx = ref.conv2d_forward(x, w, b, **kw)
    assert ctx.op == "conv2d" and ctx.backend == "numpy"
    assert ctx.grad_shapes == {"dy": y.shape}


# ------------------------------------------------------------------------------------------------
# kernel backends against the reference
# ------------------------------------------------------------------------------------------------


def _run(backend, x, w, b, kw, dy_seed=3):
    """Forward and backward on ``backend``; returns NumPy arrays (y, dx, dw, db) and the ctx."""
    y, ctx = fr.conv2d_forward(*(to_backend(backend, a) for a in (x, w, b)), **kw)
    dy = np.random.default_rng(dy_seed).standard_normal(y.shape).astype(x.dtype)
    grads = fr.conv2d_backward(ctx, to_backend(backend, dy))
    return (to_numpy(y), *map(to_numpy, grads)), ctx, dy


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_matches_reference(backend, case, dtype):
    x, w, b, kw = _data(case, dtype)
    (y, dx, dw, db), ctx, dy = _run(backend, x, w, b, kw)
    assert ctx.backend == backend and ctx.op == "conv2d"

    def f64(a):
        return None if a is None else a.astype(np.float64)

    yr, cr = ref.conv2d_forward(f64(x), f64(w), f64(b), **kw)
    dxr, dwr, dbr = ref.conv2d_backward(cr, f64(dy))
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert_close(y, yr, "conv", "forward", dtype, name="y")
    assert_close(dx, dxr, "conv", "backward", dtype, name="dx")
    assert_close(dw, dwr, "conv", "backward", dtype, name="dw")
    if b is None:
        assert db is None
    else:
        assert db.dtype == dtype
        assert_close(db, dbr, "conv", "backward", dtype, name="db")


@pytest.mark.parametrize("tile", [1, 13])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_cpu_column_tiles(case, tile, restore_threads):
    """Images split into several tiles of output rows (one row per tile, or a few) give the
    reference's result too."""
    from fastrnn._cpu import conv2d as kernel

    x, w, b, kw = _data(case)
    previous = kernel._set_tile_columns(tile)
    try:
        (y, dx, dw, db), _, dy = _run("cpu", x, w, b, dict(kw, algorithm="im2col"))
    finally:
        kernel._set_tile_columns(previous)
    yr, cr = ref.conv2d_forward(x, w, b, **kw)
    dxr, dwr, dbr = ref.conv2d_backward(cr, dy)
    assert_close(y, yr, "conv", "forward", np.float64, name="y")
    assert_close(dx, dxr, "conv", "backward", np.float64, name="dx")
    assert_close(dw, dwr, "conv", "backward", np.float64, name="dw")


# awkward sizes for the direct kernels: channels not a multiple of the blocks (6 filters,
# 16 lanes), positions not a multiple of a vector, more than one batch of images
DIRECT_CASES = CASES + [
    (5, 17, 11, 13, 19, (3, 3), 1, 1, 1, 1, True),
    (3, 20, 12, 9, 14, (3, 3), 2, 1, 1, 1, True),  # stride 2
    (2, 16, 10, 10, 16, (3, 3), 1, 1, 1, 16, False),  # depthwise, 16 channels
    (2, 12, 9, 9, 24, (3, 3), 1, 1, 1, 12, True),  # depthwise, channel multiplier 2
    (1, 33, 6, 5, 7, (1, 1), 1, 0, 1, 1, True),  # pointwise by the direct kernels
    (2, 8, 15, 14, 10, (3, 3), 1, 2, 2, 2, True),  # dilation 2, groups
    (1, 3, 20, 17, 8, (5, 5), 2, 2, 1, 1, True),  # 5x5 stride 2
    (3, 6, 9, 8, 40, (3, 3), 1, 1, 1, 2, True),  # groups of 20 filters: filters in lanes
    (2, 5, 7, 6, 33, (2, 3), (2, 1), 1, (1, 2), 1, False),  # 33 filters: a partial vector
    # depthwise at stride 1 (dx by the forward kernels): multiplier 2, non-square dilated
    (2, 4, 7, 8, 8, (3, 3), 1, 1, 1, 4, True),
    (2, 5, 9, 7, 5, (5, 3), 1, (2, 1), (1, 2), 5, True),
    (1, 3, 6, 6, 3, (3, 3), 1, 3, 1, 3, False),  # padding 3 > K - 1: the gradient kernels
]


def _direct_isas() -> list:
    from fastrnn._cpu import conv2d as kernel

    return [
        pytest.param(
            isa,
            marks=pytest.mark.skipif(
                not kernel.isa_supported(isa), reason=f"this CPU lacks the {isa} path"
            ),
        )
        for isa in ("avx512", "avx2", "portable")
    ]


@pytest.fixture
def pinned_isa(request):
    from fastrnn._cpu import conv2d as kernel

    previous = kernel.force_isa(request.param)
    yield request.param
    kernel.force_isa(previous)


def _check_against_reference(x, w, b, kw, dtype):
    (y, dx, dw, db), ctx, dy = _run("cpu", x, w, b, kw)

    def f64(a):
        return None if a is None else a.astype(np.float64)

    kw = {k: v for k, v in kw.items() if k != "algorithm"}
    yr, cr = ref.conv2d_forward(f64(x), f64(w), f64(b), **kw)
    dxr, dwr, dbr = ref.conv2d_backward(cr, f64(dy))
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert_close(y, yr, "conv", "forward", dtype, name="y")
    assert_close(dx, dxr, "conv", "backward", dtype, name="dx")
    assert_close(dw, dwr, "conv", "backward", dtype, name="dw")
    assert (db is None) == (b is None)
    if b is not None:
        assert_close(db, dbr, "conv", "backward", dtype, name="db")
    return ctx


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", DIRECT_CASES, ids=_ids)
@pytest.mark.parametrize("pinned_isa", _direct_isas(), indirect=True)
def test_cpu_direct_every_path(pinned_isa, case, dtype, restore_threads, monkeypatch):
    """The direct kernels, pinned to each instruction-set path, equal the reference (their
    gradient kernels too, also where short columns would send the backward to im2col)."""
    from fastrnn._cpu import conv2d as kernel

    monkeypatch.setattr(kernel, "IM2COL_BACKWARD_MAX_K", 0)
    x, w, b, kw = _data(case, dtype)
    ctx = _check_against_reference(x, w, b, dict(kw, algorithm="direct"), dtype)
    assert ctx.saved["algorithm"] == "direct"


# column stride 2: odd and even widths and padding parities, a 1x1 kernel (one column phase
# without taps), dilation, groups, more than one block of 6 input channels
PAIR_CASES = [
    (3, 20, 12, 9, 14, (3, 3), 2, 1, 1, 1, True),
    (2, 7, 11, 13, 5, (3, 3), 2, 0, 1, 1, False),
    (2, 13, 9, 10, 8, (1, 1), 2, 0, 1, 1, True),
    (1, 8, 10, 11, 6, (5, 5), (1, 2), 2, 1, 2, True),
    (5, 6, 9, 8, 4, (3, 2), (2, 2), (1, 1), (2, 1), 2, False),
    (4, 3, 8, 17, 16, (2, 4), (3, 2), (0, 3), 1, 1, True),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", PAIR_CASES, ids=_ids)
@pytest.mark.parametrize("pinned_isa", _direct_isas(), indirect=True)
def test_cpu_dgrad_column_phase_pairs(pinned_isa, case, dtype, threads, restore_threads,
                                      monkeypatch):
    """At column stride 2 the input gradient runs both column phases per item and writes whole
    rows (fr_dgrad_pair): the same dx, bit for bit, as one item per phase, on every
    instruction-set path, for the per-image and the batched schedule; and the reference's."""
    from fastrnn._cpu import conv2d as kernel

    monkeypatch.setattr(kernel, "IM2COL_BACKWARD_MAX_K", 0)
    fr.set_num_threads(threads)
    x, w, b, kw = _data(case, dtype)
    kw = dict(kw, algorithm="direct")
    _check_against_reference(x, w, b, kw, dtype)
    y, ctx = fr.conv2d_forward(x, w, b, **kw)
    dy = np.random.default_rng(5).standard_normal(y.shape).astype(dtype)
    monkeypatch.setattr(kernel, "DGRAD_PAIRS", False)
    dx_phases = fr.conv2d_backward(ctx, dy)[0]
    monkeypatch.setattr(kernel, "DGRAD_PAIRS", True)
    dx_pairs = fr.conv2d_backward(ctx, dy)[0]
    assert np.array_equal(dx_pairs, dx_phases)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("pinned_isa", _direct_isas(), indirect=True)
def test_cpu_stride2_rows_of_every_width(pinned_isa, dtype, restore_threads):
    """The stride-2 pack splits each input row into its two column phases by whole vectors, an
    overlapping last vector, half vectors for short rows, and single elements: every row
    width from 1 to 70 (and padding 0, 1, 2), against the reference."""
    rng = np.random.default_rng(3)
    for W in range(1, 71):
        for p in (0, 1, 2):
            x = rng.standard_normal((1, 2, 3, W)).astype(dtype)
            w = rng.standard_normal((3, 2, 1, 3)).astype(dtype)
            if W + 2 * p < 3:
                continue
            y, _ = fr.conv2d_forward(x, w, None, stride=2, padding=(0, p), algorithm="direct",
                                     training=False)
            yr, _ = ref.conv2d_forward(x.astype(np.float64), w.astype(np.float64), None,
                                       stride=2, padding=(0, p), training=False)
            assert_close(y, yr, "conv", "forward", dtype, name=f"y (W {W}, padding {p})")


# depthwise at stride 1 and dilation 1 (fr_depthwise_planes): rows shorter than a vector,
# rows of 4 vectors and a tail, rectangular and 1x1 and 7x7 filters, padding 0..3 per side
DEPTHWISE_CASES = [
    (2, 3, 7, 5, 3, (3, 3), 1, 1, 1, 3, True),
    (1, 16, 56, 56, 16, (3, 3), 1, 1, 1, 16, True),
    (3, 5, 17, 70, 5, (5, 5), 1, 2, 1, 5, False),
    (2, 4, 9, 9, 4, (3, 5), 1, (0, 2), 1, 4, True),
    (1, 2, 3, 2, 2, (3, 3), 1, 1, 1, 2, True),
    (2, 3, 20, 33, 3, (1, 1), 1, 0, 1, 3, True),
    (1, 7, 8, 8, 7, (7, 7), 1, 3, 1, 7, False),
]


@pytest.mark.parametrize("act", [0, 1], ids=["linear", "relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=_ids)
@pytest.mark.parametrize("pinned_isa", _direct_isas(), indirect=True)
def test_cpu_depthwise_planes(pinned_isa, case, dtype, act, restore_threads, monkeypatch):
    """The depthwise forward plane by plane equals the direct kernels' blocks and the
    reference (with ReLU in the same pass, on 1 and 2 threads), and its context runs the
    direct backward."""
    from fastrnn._cpu import conv2d as kernel

    x, w, b, kw = _data(case, dtype)

    def pair(v):
        return tuple(v) if isinstance(v, tuple) else (v, v)

    args = (pair(kw["stride"]), pair(kw["padding"]), pair(kw["dilation"]), kw["groups"], False)
    for threads in (1, 2):
        fr.set_num_threads(threads)
        monkeypatch.setattr(kernel, "DEPTHWISE_PLANES", False)
        blocks, _ = kernel._direct_forward(x, w, b, *args, act)
        monkeypatch.setattr(kernel, "DEPTHWISE_PLANES", True)
        got, _ = kernel._direct_forward(x, w, b, *args, act)
        assert_close(got, blocks, "conv", "forward", dtype, name=f"y on {threads} threads")
    yr, _ = ref.conv2d_forward(x.astype(np.float64), w.astype(np.float64),
                               None if b is None else b.astype(np.float64), **kw)
    if act:
        yr = np.maximum(yr, 0)
    assert_close(got, yr, "conv", "forward", dtype, name="y vs reference")
    ctx = _check_against_reference(x, w, b, dict(kw, algorithm="direct"), dtype)
    assert ctx.saved["algorithm"] == "direct"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", DIRECT_CASES, ids=_ids)
def test_cpu_im2col(case, dtype):
    x, w, b, kw = _data(case, dtype)
    ctx = _check_against_reference(x, w, b, dict(kw, algorithm="im2col"), dtype)
    assert ctx.saved["algorithm"] == "im2col"


# 3x3, stride 1, dilation 1, one group: what Winograd F(2x2, 3x3) runs
WINOGRAD_CASES = [
    (2, 3, 7, 9, 4, (3, 3), 1, 1, 1, 1, True),  # odd output sizes: partial tiles
    (1, 17, 12, 13, 13, (3, 3), 1, 1, 1, 1, False),
    (3, 32, 14, 14, 40, (3, 3), 1, 1, 1, 1, True),
    (2, 5, 8, 6, 7, (3, 3), 1, 0, 1, 1, True),  # no padding
    (1, 4, 5, 5, 8, (3, 3), 1, 2, 1, 1, True),  # padding 2
    (2, 6, 9, 37, 5, (3, 3), 1, 1, 1, 1, True),  # rows of 19 tiles: a vector and a partial one
    (1, 3, 4, 4, 2, (3, 3), 1, 3, 1, 1, True),  # padding 3: dx by the direct kernels
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=_ids)
@pytest.mark.parametrize("pinned_isa", _direct_isas(), indirect=True)
def test_cpu_winograd_every_path(pinned_isa, case, dtype, restore_threads):
    """Winograd's forward, and its backward (dx by Winograd on dy for padding <= 2, dw by the
    direct kernels), pinned to each instruction-set path, equal the reference."""
    x, w, b, kw = _data(case, dtype)
    ctx = _check_against_reference(x, w, b, dict(kw, algorithm="winograd"), dtype)
    assert ctx.saved["algorithm"] == "winograd"


@pytest.mark.parametrize("band_bytes", [1 << 20, 3000, 40000], ids=["default", "tiny", "small"])
@pytest.mark.parametrize("n, hw", [(1, 14), (3, 7), (7, 14), (16, 5), (5, (9, 12))])
def test_cpu_winograd_bands_across_images(n, hw, band_bytes, restore_threads, monkeypatch):
    """Winograd's bands of tile rows run on from one image into the next (and, with a small
    band budget, end inside images at every row): forward, pooled forward and backward equal
    the reference, and 1 and 2 threads agree to the last bit."""
    from fastrnn._cpu import conv2d as kernel

    monkeypatch.setattr(kernel, "WINOGRAD_BAND_BYTES", band_bytes)
    H, W = (hw, hw) if isinstance(hw, int) else hw
    rng = np.random.default_rng(11)
    x = rng.standard_normal((n, 8, H, W)).astype(np.float32)
    w = (rng.standard_normal((13, 8, 3, 3)) / 9).astype(np.float32)
    b = rng.standard_normal(13).astype(np.float32)
    TH, TW = (H + 1) // 2, (W + 1) // 2
    band, ipi = kernel._winograd_plan(n, 8, TH, TW, 4, 2)
    assert band >= 1 and ipi >= 1
    x64, w64, b64 = (a.astype(np.float64) for a in (x, w, b))
    yr, cr = ref.conv2d_forward(x64, w64, b64, padding=1)
    dy = rng.standard_normal(yr.shape)
    dxr, dwr, dbr = ref.conv2d_backward(cr, dy)
    ypr, _ = ref.max_pool2d_forward(np.maximum(yr, 0), 2)
    got = {}
    for threads in (1, 2):
        fr.set_num_threads(threads)
        y, ctx = fr.conv2d_forward(x, w, b, padding=1, algorithm="winograd")
        grads = fr.conv2d_backward(ctx, dy.astype(np.float32))
        yp, _ = fr.conv2d_forward(x, w, b, padding=1, algorithm="winograd", activation="relu",
                                  max_pool=2, training=False)
        got[threads] = (y, yp) + tuple(grads)
        assert_close(y, yr, "conv", "forward", np.float32, name="y")
        assert_close(yp, ypr, "conv", "forward", np.float32, name="pooled")
        for name, g_, want in zip(("dx", "dw", "db"), grads, (dxr, dwr, dbr), strict=True):
            assert_close(g_, want, "conv", "backward", np.float32, name=name)
    for a1, a2 in zip(got[1], got[2], strict=True):
        np.testing.assert_array_equal(a1, a2)


# (N, C, H, W, F, padding, bias): the Winograd weight gradient's cases (at least 16 filters)
WINOGRAD_WGRAD_CASES = [
    (1, 3, 5, 5, 16, 1, True),  # one image, one tile row of three
    (2, 17, 7, 9, 33, 1, True),  # odd sizes, channels past a block of taps, filters past 32
    (3, 8, 6, 6, 20, 0, False),  # no padding
    (2, 13, 9, 4, 40, 2, True),  # padding 2, narrow images
    (21, 5, 5, 7, 16, 1, True),  # bands of several images, several chunks
    (3, 24, 15, 17, 64, 1, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", WINOGRAD_WGRAD_CASES, ids=str)
@pytest.mark.parametrize("pinned_isa", _direct_isas(), indirect=True)
def test_cpu_winograd_weight_gradient(pinned_isa, case, dtype, restore_threads, monkeypatch):
    """After a Winograd forward with at least 16 filters, dw is Winograd's too (dU per xi
    summed over the tiles, then G^T dU G), on each instruction-set path: it equals the
    reference and the direct kernels' dw within the tolerance, db is the bias gradient, and 1
    and 2 threads agree to the last bit."""
    from fastrnn._cpu import conv2d as kernel

    calls = []
    real = kernel._winograd_wgrad
    monkeypatch.setattr(kernel, "_winograd_wgrad", lambda *a: calls.append(1) or real(*a))
    N, C, H, W, F, p, bias = case
    rng = np.random.default_rng(7)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = (rng.standard_normal((F, C, 3, 3)) / (3 * np.sqrt(C))).astype(dtype)
    b = rng.standard_normal(F).astype(dtype) if bias else None
    yr, cr = ref.conv2d_forward(*(None if a is None else a.astype(np.float64) for a in (x, w, b)),
                                padding=p)
    dy = rng.standard_normal(yr.shape)
    _, dwr, dbr = ref.conv2d_backward(cr, dy)
    got = {}
    for threads in (1, 2):
        fr.set_num_threads(threads)
        y, ctx = fr.conv2d_forward(x, w, b, padding=p, algorithm="winograd")
        dx, dw, db = fr.conv2d_backward(ctx, dy.astype(dtype))
        got[threads] = (dx, dw) if db is None else (dx, dw, db)
        assert_close(dw, dwr, "conv", "backward", dtype, name="dw")
        assert (db is None) == (b is None)
        if b is not None:
            assert_close(db, dbr, "conv", "backward", dtype, name="db")
    assert len(calls) == 2
    for a1, a2 in zip(got[1], got[2], strict=True):
        np.testing.assert_array_equal(a1, a2)
    monkeypatch.setattr(kernel, "WINOGRAD_WGRAD", False)
    _, dw_direct, _ = fr.conv2d_backward(ctx, dy.astype(dtype))
    assert len(calls) == 2
    assert_close(got[2][1], dw_direct, "conv", "backward", dtype, name="dw vs direct")


def test_cpu_winograd_weight_gradient_few_filters_runs_direct(monkeypatch):
    """Below 16 filters (the filters-in-lanes kernel's case) dw stays with the direct
    kernels after a Winograd forward."""
    from fastrnn._cpu import conv2d as kernel

    monkeypatch.setattr(kernel, "_winograd_wgrad", lambda *a: pytest.fail("Winograd dw ran"))
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 4, 6, 6))
    w = rng.standard_normal((15, 4, 3, 3))
    y, ctx = fr.conv2d_forward(x, w, padding=1, algorithm="winograd")
    _, dw, _ = fr.conv2d_backward(ctx, np.ones_like(y))
    _, dwr, _ = ref.conv2d_backward(ref.conv2d_forward(x, w, padding=1)[1], np.ones_like(y))
    assert_close(dw, dwr, "conv", "backward", np.float64, name="dw")


def test_cpu_winograd_error_is_small():
    """F(2x2, 3x3)'s float32 error on a 64-channel layer stays far inside the forward tolerance
    (rtol 1e-4): measured relative to the largest output, about 3e-7 (benchmarks/NOTES-conv.md),
    so "auto" may pick it."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 64, 20, 20)).astype(np.float32)
    w = (rng.standard_normal((32, 64, 3, 3)) / 24).astype(np.float32)
    y, _ = fr.conv2d_forward(x, w, padding=1, algorithm="winograd", training=False)
    yr, _ = ref.conv2d_forward(x.astype(np.float64), w.astype(np.float64), padding=1)
    assert np.abs(y - yr).max() / np.abs(yr).max() < 2e-6


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_cpu_winograd_non_finite_values_reach_only_what_reads_them(value):
    """Winograd's transforms combine a tile's 16 inputs, yet a NaN or infinity in x, w or dy
    reaches exactly the outputs and gradients the reference's does (the transforms' zero
    pattern keeps each output to its own 3x3 window: fastrnn/_cpu/conv2d.pyx)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2, 6, 7))
    w = rng.standard_normal((3, 2, 3, 3))
    for which, idx in [("x", (0, c, i, j)) for c in range(2) for i in range(6) for j in (0, 3)] + [
        ("w", (1, 0, i, j)) for i in range(3) for j in range(3)
    ] + [("dy", (0, 1, i, j)) for i in range(6) for j in (0, 6)]:  # fmt: skip
        xx, ww = x.copy(), w.copy()
        dy = rng.standard_normal((1, 3, 6, 7))
        {"x": xx, "w": ww, "dy": dy}[which][idx] = value
        y, ctx = fr.conv2d_forward(xx, ww, padding=1, algorithm="winograd")
        dx, dw, _ = fr.conv2d_backward(ctx, dy)
        yr, cr = ref.conv2d_forward(xx, ww, padding=1)
        dxr, dwr, _ = ref.conv2d_backward(cr, dy)
        for name, got, want in (("y", y, yr), ("dx", dx, dxr), ("dw", dw, dwr)):
            np.testing.assert_array_equal(
                np.isfinite(got), np.isfinite(want), err_msg=f"{name}, {value} in {which}{idx}"
            )


def test_auto_runs_winograd_on_wide_3x3_layers():
    """"auto" picks Winograd for 3x3 stride-1 layers of at least 32 channels, 48 filters and 96
    of the two, whose outputs are at least 16 wide (12 from 64 channels and filters on), where
    it measured faster, and the direct kernels otherwise; both equal the reference."""
    from fastrnn._cpu import conv2d as kernel

    rng = np.random.default_rng(4)
    for C, F, W, want in [
        (64, 64, 12, "winograd"),
        (64, 64, 11, "direct"),
        (32, 64, 16, "winograd"),
        (48, 48, 16, "winograd"),
        (32, 64, 15, "direct"),
        (64, 32, 16, "direct"),
        (32, 32, 16, "direct"),
        (40, 48, 16, "direct"),
        (16, 64, 16, "direct"),
        (64, 16, 16, "direct"),
    ]:
        x = rng.standard_normal((1, C, 3, W)).astype(np.float32)
        w = (rng.standard_normal((F, C, 3, 3)) / (3 * np.sqrt(C))).astype(np.float32)
        y, ctx = fr.conv2d_forward(x, w, padding=1)
        assert ctx.saved["algorithm"] == want, (C, F, W)
        yr, _ = ref.conv2d_forward(x.astype(np.float64), w.astype(np.float64), padding=1)
        assert_close(y, yr, "conv", "forward", np.float32, name=f"y {C}->{F}")
    x = rng.standard_normal((1, 64, 6, 16)).astype(np.float32)
    w = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
    assert kernel._choose(x.shape, w.shape, (1, 1), (1, 1), (1, 1), 1) == "winograd"
    assert kernel._choose(x.shape, w.shape, (1, 1), (3, 3), (1, 1), 1) == "direct"  # padding 3
    assert kernel._choose(x.shape, w.shape, (2, 2), (1, 1), (1, 1), 1) == "direct"  # stride 2
    # the width counted is the output's: 14 wide unpadded gives 12 outputs
    assert kernel._choose((1, 64, 6, 14), w.shape, (1, 1), (0, 0), (1, 1), 1) == "winograd"
    assert kernel._choose((1, 64, 6, 13), w.shape, (1, 1), (0, 0), (1, 1), 1) == "direct"


@pytest.mark.parametrize(
    "change, why",
    [
        (dict(w=np.zeros((6, 4, 5, 5)), b=np.zeros(6), padding=2), "3x3"),
        (dict(stride=2), "stride"),
        (dict(dilation=2, padding=2), "dilation"),
        (dict(groups=2), "groups"),
    ],
)
def test_winograd_refuses_what_it_cannot_run(change, why):
    x, w, b = _good()
    args = dict(w=w[:, :2].repeat(2, axis=1), b=b, stride=1, padding=1, dilation=1, groups=1)
    args.update(change)
    if args["groups"] == 2:
        args["w"] = w
    with pytest.raises(ValueError, match=f"algorithm.*{why}"):
        fr.conv2d_forward(x, args.pop("w"), args.pop("b"), algorithm="winograd", **args)


def test_cpu_force_isa_rejects_unknown_paths():
    from fastrnn._cpu import conv2d as kernel

    with pytest.raises(ValueError, match="name"):
        kernel.force_isa("sse9")


@pytest.mark.parametrize("bad", ["fft", "", None, 3, "Direct"])
def test_bad_algorithm(bad):
    x, w, b = _good()
    with pytest.raises(ValueError, match="algorithm"):
        fr.conv2d_forward(x, w, b, padding=1, groups=2, algorithm=bad)
    with pytest.raises(ValueError, match="algorithm"):
        Conv2d(4, 6, 3, groups=2, algorithm=bad)


def test_layer_algorithm_reaches_the_kernel():
    x, _, _ = _good()
    layer = Conv2d(4, 6, 3, padding=1, groups=2, dtype=np.float64, algorithm="im2col")
    y = layer(x)
    assert layer._cache.saved["algorithm"] == "im2col"
    yr, _ = ref.conv2d_forward(x, layer.weight.data, layer.bias.data, padding=1, groups=2)
    assert_close(y, yr, "conv", "forward", np.float64, name="y")
    assert "algorithm='im2col'" in repr(layer)


@st.composite
def conv_cases(draw):
    """Small random geometries that fastrnn.conv2d_forward accepts."""
    groups = draw(st.integers(1, 3))
    C = groups * draw(st.integers(1, 3))
    F = groups * draw(st.integers(1, 3))
    KH, KW = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    # big enough for the dilated kernel to fit the padded input
    H = draw(st.integers(max(1, dh * (KH - 1) + 1 - 2 * ph), 9))
    W = draw(st.integers(max(1, dw * (KW - 1) + 1 - 2 * pw), 9))
    N = draw(st.integers(1, 3))
    bias = draw(st.booleans())
    return (N, C, H, W, F, (KH, KW), (sh, sw), (ph, pw), (dh, dw), groups, bias)


@settings(max_examples=40, deadline=None)
@given(
    case=conv_cases(),
    seed=st.integers(0, 2**16),
    algorithm=st.sampled_from(["auto", "direct", "im2col"]),
)
def test_cpu_random_geometries(case, seed, algorithm):
    """Property-based: the CPU kernels equal the reference on random small geometries."""
    x, w, b, kw = _data(case, seed=seed)
    (y, dx, dw, db), _, dy = _run("cpu", x, w, b, dict(kw, algorithm=algorithm))
    yr, cr = ref.conv2d_forward(x, w, b, **kw)
    dxr, dwr, dbr = ref.conv2d_backward(cr, dy)
    assert_close(y, yr, "conv", "forward", np.float64, name="y")
    assert_close(dx, dxr, "conv", "backward", np.float64, name="dx")
    assert_close(dw, dwr, "conv", "backward", np.float64, name="dw")
    if b is not None:
        assert_close(db, dbr, "conv", "backward", np.float64, name="db")
    else:
        assert db is None


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_inference(backend):
    x, w, b, kw = _data(CASES[3], np.float32)
    y, ctx = fr.conv2d_forward(*(to_backend(backend, a) for a in (x, w, b)), training=False, **kw)
    assert ctx is None
    yr, _ = ref.conv2d_forward(x, w, b, **kw)
    assert_close(y, yr, "conv", "forward", np.float32, name="y")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_empty_batch(backend):
    """N = 0: empty outputs and input gradient, zero weight and bias gradients."""
    x = np.zeros((0, 3, 5, 5))
    w = np.ones((2, 3, 3, 3))
    b = np.ones(2)
    y, ctx = fr.conv2d_forward(*(to_backend(backend, a) for a in (x, w, b)), padding=1)
    assert y.shape == (0, 2, 5, 5)
    dx, dw, db = map(to_numpy, fr.conv2d_backward(ctx, y))
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dw, np.zeros_like(w))
    np.testing.assert_array_equal(db, np.zeros_like(b))


def test_cpu_non_contiguous_input():
    x, w, b, kw = _data(CASES[0])
    xs = np.ascontiguousarray(np.concatenate([x, x], axis=3))[:, :, :, ::2]  # a strided view
    y, _ = fr.conv2d_forward(xs, w, b, **kw)
    yr, _ = ref.conv2d_forward(np.ascontiguousarray(xs), w, b, **kw)
    assert_close(y, yr, "conv", "forward", np.float64, name="y")


@pytest.fixture
def restore_threads(monkeypatch):
    """Restores the thread count afterwards; lets even these small cases run in parallel."""
    from fastrnn._cpu import conv2d as kernel

    monkeypatch.setattr(kernel, "MIN_PARALLEL_MACS", 0)
    before = fr.get_num_threads()
    yield
    fr.set_num_threads(before)


THREAD_CASES = [
    (5, 3, 9, 10, 4, (3, 3), 1, 1, 1, 1, True),  # images in parallel, uneven split
    (11, 2, 5, 6, 3, (2, 2), 1, 0, 1, 1, True),  # more images than dw chunks
    (4, 6, 7, 7, 6, (1, 1), 1, 0, 1, 3, True),  # pointwise, grouped
    (1, 4, 12, 11, 5, (3, 2), 2, 1, 1, 1, True),  # one image: BLAS gets the threads
    (1, 2, 40, 41, 3, (3, 3), 1, 1, 1, 1, True),  # one image, several tiles in parallel
    (3, 64, 6, 5, 64, (3, 3), 1, 1, 1, 1, True),  # "auto" runs Winograd: images in parallel
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", THREAD_CASES, ids=_ids)
def test_cpu_threads_agree(case, dtype, restore_threads):
    """Bitwise the same with 1 and 2 threads (work is split by sizes, never by thread count),
    except where a single work item leaves BLAS the threads (then to rounding); the same
    thread count is deterministic."""
    x, w, b, kw = _data(case, dtype)
    fr.set_num_threads(1)
    one, _, _ = _run("cpu", x, w, b, kw)
    fr.set_num_threads(2)
    two, _, _ = _run("cpu", x, w, b, kw)
    again, _, _ = _run("cpu", x, w, b, kw)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for name, a, c, d in zip(("y", "dx", "dw", "db"), one, two, again, strict=True):
        if x.shape[0] > 1:
            np.testing.assert_array_equal(a, c, err_msg=name)
        else:
            np.testing.assert_allclose(a, c, rtol=rtol, atol=rtol, err_msg=name)
        np.testing.assert_array_equal(c, d, err_msg=name)


@pytest.mark.parametrize("N", [1, 4], ids=["blas-threads", "openmp-images"])
def test_cpu_blas_threads_restored(N, restore_threads):
    """The kernels pin BLAS to one thread inside their parallel regions (or hand it the threads
    when images run one after another) and leave it as they found it."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import fastrnn._cpu.conv2d  # noqa: F401  (loads SciPy's BLAS before the first count)

    def blas_threads():
        return {
            lib["filepath"]: lib["num_threads"]
            for lib in threadpoolctl.threadpool_info()
            if lib["user_api"] == "blas"
        }

    before = blas_threads()
    fr.set_num_threads(2)
    x, w, b, kw = _data((N, 3, 8, 8, 4, (3, 3), 1, 1, 1, 1, True))
    _run("cpu", x, w, b, kw)
    assert blas_threads() == before


# ------------------------------------------------------------------------------------------------
# error policy (validated in fastrnn.conv2d_forward before any backend runs)
# ------------------------------------------------------------------------------------------------


def _good():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 6, 6))
    w = rng.standard_normal((6, 2, 3, 3))
    b = rng.standard_normal(6)
    return x, w, b


@pytest.mark.parametrize(
    "change, exc, name",
    [
        (dict(x=np.zeros((4, 6, 6))), ValueError, "x"),
        (dict(w=np.zeros((6, 2, 3))), ValueError, "w"),
        (dict(w=np.zeros((6, 3, 3, 3))), ValueError, "w"),  # channel mismatch
        (dict(groups=3), ValueError, "groups"),  # 3 does not divide C=4
        (dict(w=np.zeros((5, 2, 3, 3)), b=np.zeros(5)), ValueError, "groups"),  # F % groups
        (dict(groups=0), ValueError, "groups"),
        (dict(groups=2.0), TypeError, "groups"),
        (dict(w=np.zeros((6, 2, 9, 3))), ValueError, "w"),  # kernel larger than padded input
        (dict(dilation=4), ValueError, "w"),  # dilated kernel larger than the input
        (dict(stride=0), ValueError, "stride"),
        (dict(stride=(1, 0)), ValueError, "stride"),
        (dict(stride=1.5), TypeError, "stride"),
        (dict(stride=(1, 2, 3)), TypeError, "stride"),
        (dict(padding=-1), ValueError, "padding"),
        (dict(dilation=0), ValueError, "dilation"),
        (dict(b=np.zeros(5)), ValueError, "b"),
        (dict(b=np.zeros((6, 1))), ValueError, "b"),
        (dict(x=np.zeros((2, 4, 6, 6), dtype=np.int64)), TypeError, "x"),
        (dict(w=np.zeros((6, 2, 3, 3), dtype=np.float32)), TypeError, "w"),
        (dict(x=[[[[1.0]]]]), TypeError, "x"),
        (dict(training=1), TypeError, "training"),
    ],
)
def test_bad_input(change, exc, name):
    x, w, b = _good()
    args = dict(x=x, w=w, b=b, stride=1, padding=1, dilation=1, groups=2, training=True)
    args.update(change)
    with pytest.raises(exc, match=name):
        fr.conv2d_forward(args.pop("x"), args.pop("w"), args.pop("b"), **args)


def test_bad_gradient():
    x, w, b = _good()
    with fr.use_backend("numpy"):
        y, ctx = fr.conv2d_forward(x, w, b, padding=1, groups=2)
        with pytest.raises(ValueError, match="dy"):
            fr.conv2d_backward(ctx, np.zeros((2, 6, 6, 5)))
        with pytest.raises(TypeError, match="dy"):
            fr.conv2d_backward(ctx, y.astype(np.float32))
        with pytest.raises(TypeError, match="ctx"):
            fr.conv2d_backward(None, y)


# ------------------------------------------------------------------------------------------------
# empty planes (issue 14, item 1)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 0, 6), (2, 3, 6, 0), (0, 3, 0, 0), (8, 3, 0, 8192)])
@pytest.mark.parametrize("backend", ["numpy", *KERNEL_BACKENDS])
def test_empty_plane_refused(backend, shape):
    """H or W of 0 is refused by every backend, as by PyTorch, even where padding would make
    an output (it used to return an output of bias values)."""
    x = to_backend(backend, np.zeros(shape))
    w = to_backend(backend, np.ones((2, 3, 1, 1)))
    with fr.use_backend(backend), pytest.raises(ValueError, match=r"^x: .*planes"):
        fr.conv2d_forward(x, w, padding=1)


def test_cpu_kernel_module_refuses_empty_plane():
    from fastrnn.backends import backend_module

    with pytest.raises(ValueError, match="^x: "):
        backend_module("cpu").conv2d_forward(
            np.zeros((2, 3, 0, 6)), np.ones((2, 3, 1, 1)), None, (1, 1), (1, 1), (1, 1), 1, True
        )


@pytest.mark.parametrize("backend", ["numpy", *KERNEL_BACKENDS])
def test_empty_channels(backend):
    """C = 0, as in PyTorch: the output is the bias, dx and dw are empty, db sums dy."""
    x = to_backend(backend, np.zeros((2, 0, 5, 5)))
    w = to_backend(backend, np.zeros((4, 0, 3, 3)))
    b = to_backend(backend, np.arange(4.0))
    with fr.use_backend(backend):
        y, ctx = fr.conv2d_forward(x, w, b, padding=1)
        np.testing.assert_array_equal(
            to_numpy(y), np.broadcast_to(np.arange(4.0)[:, None, None], (2, 4, 5, 5))
        )
        dx, dw, db = map(to_numpy, fr.conv2d_backward(ctx, y))
    assert dx.shape == (2, 0, 5, 5) and dw.shape == (4, 0, 3, 3)
    np.testing.assert_array_equal(db, 50 * np.arange(4.0))


# ------------------------------------------------------------------------------------------------
# integer arguments and sizes (issue 14, item 6)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize(
    "change, name",
    [
        (dict(padding=10**6), "padding"),  # used to be a MemoryError (175 TiB)
        (dict(padding=2**40), "padding"),  # used to be NumPy's "array is too big"
        (dict(padding=(1, 2**63)), "padding"),  # used to be an OverflowError
        (dict(padding=2**64), "padding"),
        (dict(dilation=2**63), "dilation"),  # the dilated kernel is larger than the input
        (dict(dilation=(1, 2**40)), "dilation"),
    ],
)
def test_huge_geometry_refused(backend, change, name):
    _, w, b = _good()
    x = np.zeros((2, 4, 6, 6), np.float32)
    w, b = w.astype(np.float32), b.astype(np.float32)
    with fr.use_backend(backend), pytest.raises(ValueError, match=rf"\b{name}\b"):
        fr.conv2d_forward(x, w, b, groups=2, **change)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("stride", [2**31, 2**63 - 1, 2**63, 2**64])
def test_huge_stride_and_dilation_of_a_1x1_kernel(backend, stride):
    """A stride beyond the padded input gives one output row/column, and a 1x1 kernel ignores
    its dilation, whatever their size (they used to raise OverflowError at 2^63)."""
    x, w, b = _good()
    with fr.use_backend(backend):
        y, ctx = fr.conv2d_forward(x, w, b, stride=(stride, 1), padding=1, groups=2)
        want, want_ctx = fr.conv2d_forward(x, w, b, stride=(8, 1), padding=1, groups=2)
        np.testing.assert_array_equal(y, want)
        for got, exp in zip(
            fr.conv2d_backward(ctx, y), fr.conv2d_backward(want_ctx, y), strict=True
        ):
            np.testing.assert_array_equal(got, exp)
        w1 = w[:, :, :1, :1]
        y, _ = fr.conv2d_forward(x, w1, b, dilation=stride, groups=2)
        np.testing.assert_array_equal(y, fr.conv2d_forward(x, w1, b, groups=2)[0])


def test_cpu_kernel_refuses_output_planes_beyond_32_bit_blas():
    """The im2col kernel's GEMMs take 32-bit sizes: an output plane of 2^31 positions or more
    is refused (here with N = 0, so nothing is allocated) instead of overflowing. The direct
    kernels index with 64 bits and give the empty result."""
    x = np.zeros((0, 1, 5, 5), np.float32)
    w = np.zeros((1, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match="^padding: .*32-bit"):
        fr.conv2d_forward(x, w, padding=2**16, algorithm="im2col")
    y, _ = fr.conv2d_forward(x, w, padding=2**16, algorithm="direct")
    assert y.shape == (0, 1, 2**17 + 5, 2**17 + 5)


INTEGER_TYPES = [int, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint64]


@pytest.mark.parametrize("itype", INTEGER_TYPES, ids=lambda t: t.__name__)
def test_numpy_integers_accepted(itype):
    """groups=np.int64(2) used to be refused while stride=np.int64(1) was accepted."""
    x, w, b = _good()
    want, _ = fr.conv2d_forward(x, w, b, stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
    got, _ = fr.conv2d_forward(
        x,
        w,
        b,
        stride=(itype(2), itype(1)),
        padding=itype(1),
        dilation=[itype(1), itype(2)],
        groups=itype(2),
    )
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("arg", ["stride", "padding", "dilation", "groups"])
@pytest.mark.parametrize("bad", [True, np.True_, False, 2.0, np.float32(1), "1", None, (1, 1, 1)])
def test_bool_and_non_integers_refused(arg, bad):
    x, w, b = _good()
    args = dict(stride=1, padding=1, dilation=1, groups=2)
    args[arg] = bad
    with pytest.raises(TypeError, match=rf"^{arg}: "):
        fr.conv2d_forward(x, w, b, **args)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_empty_batch_with_dimensions_past_64_bits_refused(backend):
    """N = 0 allocates nothing, but a padded input of 2^32 x 2^32 per plane is still refused
    naming padding: NumPy cannot even make such an empty array ("array is too big")."""
    x = np.zeros((0, 1, 1, 1), np.float32)
    w = np.zeros((1, 1, 1, 1), np.float32)
    with fr.use_backend(backend), pytest.raises(ValueError, match="^padding: .*64 bits"):
        fr.conv2d_forward(x, w, padding=2**31, stride=2**40)


@pytest.mark.parametrize("short_columns", ["im2col", "direct"])
@pytest.mark.parametrize(
    "geometry",
    [
        # stride 3 and dilation 2: input positions no output reads
        ((1, 1, 6, 8), (2, 1, 4, 1), dict(stride=3, padding=1, dilation=2)),
        # stride 1: dx by the forward kernels on the turned filters
        ((1, 2, 5, 6), (2, 1, 3, 3), dict(padding=1, groups=2)),
        ((1, 2, 5, 6), (3, 2, 3, 2), dict(padding=(1, 0))),
    ],
    ids=["strided", "depthwise", "stride1"],
)
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("algorithm", ["direct", "im2col", "auto"])
def test_cpu_non_finite_input_reaches_only_what_the_convolution_reads(
    algorithm, value, geometry, short_columns, monkeypatch
):
    """A NaN or infinity at any position of x or w: y, dx and dw are non-finite exactly where
    the reference's are (stride 3 and dilation 2 leave input positions no output reads, whose
    value must not reach dw through a zero output gradient, nor a weight's reach dx there).
    ``short_columns="direct"`` keeps these small layers' gradients on the direct kernels."""
    from fastrnn._cpu import conv2d as kernel

    if short_columns == "direct":
        monkeypatch.setattr(kernel, "IM2COL_BACKWARD_MAX_K", 0)
    x_shape, w_shape, kw = geometry
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    for which, idx in [("x", i) for i in np.ndindex(*x_shape)] + [
        ("w", i) for i in np.ndindex(*w_shape)
    ]:
        i, j = idx[-2:]
        xx, ww = x.copy(), w.copy()
        if which == "x":
            xx[idx] = value
        else:
            ww[idx] = value
        y, ctx = fr.conv2d_forward(xx, ww, None, algorithm=algorithm, **kw)
        dy = np.ones_like(y)
        got = (y, *fr.conv2d_backward(ctx, dy)[:2])
        yr, cr = ref.conv2d_forward(xx, ww, None, **kw)
        want = (yr, *ref.conv2d_backward(cr, dy)[:2])
        for name, g, r in zip(("y", "dx", "dw"), got, want, strict=True):
            msg = f"{name}, non-finite {which}[{i}, {j}]"
            np.testing.assert_array_equal(np.isnan(g), np.isnan(r), err_msg=msg)
            np.testing.assert_array_equal(np.isinf(g), np.isinf(r), err_msg=msg)


# ------------------------------------------------------------------------------------------------
# activation="relu": the fused epilogue
# ------------------------------------------------------------------------------------------------

RELU_CASES = [
    # (N, C, H, W, F, kernel, stride, padding, algorithm)
    (2, 3, 7, 9, 5, (3, 3), 1, 1, "direct"),  # 27 taps: the backward by im2col
    (2, 6, 7, 9, 5, (3, 3), 1, 1, "direct"),  # 54 taps: the direct kernels' backward
    (2, 6, 9, 8, 5, (3, 3), 2, 1, "direct"),  # stride 2: the gradient kernels' dx
    (2, 4, 8, 7, 6, (3, 3), 1, 1, "winograd"),
    (1, 64, 6, 5, 64, (3, 3), 1, 1, "auto"),  # "auto" runs Winograd here
    (2, 3, 9, 8, 4, (3, 3), 2, 1, "im2col"),
    (3, 6, 5, 6, 4, (1, 1), 1, 0, "auto"),  # pointwise: im2col under "auto"
    (2, 4, 6, 6, 3, (2, 3), 2, 0, "auto"),
]


def _relu_expected(x, w, b, dy, kw):
    """The reference convolution, then ReLU (NumPy's maximum keeps NaN, as torch.relu), and the
    gradients of both: the output gradient kept where the output is positive."""
    f64 = [None if a is None else a.astype(np.float64) for a in (x, w, b)]
    y, ctx = ref.conv2d_forward(*f64, **kw)
    y = np.maximum(y, 0)
    dx, dw, db = ref.conv2d_backward(ctx, np.where(y > 0, dy, 0).astype(np.float64))
    return y, dx, dw, db


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", RELU_CASES, ids=lambda c: f"{c[-1]}-{c[0]}x{c[1]}x{c[2]}x{c[3]}")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["numpy"])
def test_relu_activation_equals_conv_then_relu(backend, case, dtype):
    """activation="relu" gives conv2d followed by ReLU, forward and backward, on every backend
    and CPU algorithm (the CPU kernels apply it in their store)."""
    N, C, H, W, F, k, stride, padding, algorithm = case
    rng = np.random.default_rng(7)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = (rng.standard_normal((F, C, *k)) / np.sqrt(C * k[0] * k[1])).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    kw = dict(stride=stride, padding=padding)
    algo = {"algorithm": algorithm} if backend == "cpu" else {}
    arrays = "cpu" if backend == "numpy" else backend  # the reference backend takes NumPy arrays
    with fr.use_backend("numpy" if backend == "numpy" else "auto"):
        (y, dx, dw, db), ctx, dy = _run(arrays, x, w, b, dict(kw, activation="relu", **algo))
        y2, ctx2 = fr.conv2d_forward(
            *(to_backend(arrays, a) for a in (x, w, b)), training=False, activation="relu",
            **kw, **algo,
        )  # fmt: skip
    assert ctx.relu_output is not None and (y >= 0).all()
    assert ctx2 is None
    np.testing.assert_array_equal(to_numpy(y2), y)
    yr, dxr, dwr, dbr = _relu_expected(x, w, b, dy, kw)
    assert_close(y, yr, "conv", "forward", dtype, name="y")
    assert_close(dx, dxr, "conv", "backward", dtype, name="dx")
    assert_close(dw, dwr, "conv", "backward", dtype, name="dw")
    assert_close(db, dbr, "conv", "backward", dtype, name="db")


# Pointwise float32 forwards on fastrnn's AVX-512 tiles (conv2d_im2col.pyx): column counts
# around the 32-column panels and the masked 16-lane tails, groups, images wider than one tile.
POINTWISE_TILE_CASES = [  # N, C, H, W, F, groups, bias
    (2, 5, 16, 8, 7, 1, True),  # 128 columns: the narrowest tile the kernels take
    (3, 9, 14, 14, 10, 1, False),  # 196: six panels and a masked tail of 4
    (1, 6, 17, 9, 12, 3, True),  # 153, grouped
    (2, 4, 23, 23, 5, 1, True),  # 529: tiles of whole output rows
    (2, 300, 12, 12, 9, 1, True),  # 144, 300 input channels: two chunks of the sum
    (2, 3, 5, 7, 4, 1, True),  # 35: BLAS (narrower than the tiles take)
]


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("tiles", [True, False], ids=["tiles", "blas"])
@pytest.mark.parametrize("case", POINTWISE_TILE_CASES, ids=lambda c: "x".join(map(str, c[:6])))
def test_cpu_pointwise_tiles_equal_the_reference(case, tiles, relu, restore_threads):
    """The tiles and BLAS both give the reference's forward (and NaN stays NaN through the
    fused ReLU), at 1 and 2 threads, which agree bitwise."""
    from fastrnn._cpu import conv2d_im2col as kernel

    N, C, H, W, F, groups, bias = case
    rng = np.random.default_rng(sum(case[:5]))
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    x[0, 0, 1, 2] = np.nan
    w = rng.standard_normal((F, C // groups, 1, 1)).astype(np.float32)
    b = rng.standard_normal(F).astype(np.float32) if bias else None
    activation = "relu" if relu else None
    previous = kernel.set_pointwise_tiles(tiles)
    try:
        ys = []
        for threads in (1, 2):
            fr.set_num_threads(threads)
            y, _ = fr.conv2d_forward(x, w, b, groups=groups, algorithm="im2col",
                                     activation=activation, training=False)  # fmt: skip
            ys.append(y)
    finally:
        kernel.set_pointwise_tiles(previous)
    np.testing.assert_array_equal(ys[0], ys[1])
    yr = _relu_expected(x, w, b, np.zeros((N, F, H, W)), dict(groups=groups))[0] if relu else (
        ref.conv2d_forward(x.astype(np.float64), w.astype(np.float64),
                           None if b is None else b.astype(np.float64), groups=groups)[0])
    np.testing.assert_array_equal(np.isnan(ys[0]), np.isnan(yr))
    assert np.isnan(yr).any()
    finite = ~np.isnan(yr)
    assert_close(ys[0][finite], yr[finite], "conv", "forward", np.float32, name="y")


@pytest.mark.parametrize("tiles", [True, False], ids=["tiles", "blas"])
@pytest.mark.parametrize("case", POINTWISE_TILE_CASES, ids=lambda c: "x".join(map(str, c[:6])))
def test_cpu_pointwise_tiles_backward(case, tiles):
    """The input gradient of a pointwise float32 layer (on the tiles, or BLAS) and its weight
    and bias gradients equal the reference's."""
    from fastrnn._cpu import conv2d_im2col as kernel

    N, C, H, W, F, groups, bias = case
    rng = np.random.default_rng(sum(case[:5]) + 1)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = rng.standard_normal((F, C // groups, 1, 1)).astype(np.float32)
    b = rng.standard_normal(F).astype(np.float32) if bias else None
    dy = rng.standard_normal((N, F, H, W)).astype(np.float32)
    previous = kernel.set_pointwise_tiles(tiles)
    try:
        _, ctx = fr.conv2d_forward(x, w, b, groups=groups, algorithm="im2col")
        dx, dw, db = fr.conv2d_backward(ctx, dy)
    finally:
        kernel.set_pointwise_tiles(previous)
    f64 = [None if a is None else a.astype(np.float64) for a in (x, w, b)]
    _, cr = ref.conv2d_forward(*f64, groups=groups)
    dxr, dwr, dbr = ref.conv2d_backward(cr, dy.astype(np.float64))
    assert_close(dx, dxr, "conv", "backward", np.float32, name="dx")
    assert_close(dw, dwr, "conv", "backward", np.float32, name="dw")
    if bias:
        assert_close(db, dbr, "conv", "backward", np.float32, name="db")


@pytest.mark.parametrize("taps", [1, 7, 128])
def test_cpu_forward_taps_in_chunks_are_the_same_sums(taps, restore_threads):
    """The forward kernel's taps in chunks (each adding to what the one before stored) give
    the one-pass sums to the last bit: direct (stride 1 and 2, groups), Winograd, and the
    backward's dx by the forward kernels, float32 and float64, NaN included."""
    from fastrnn._cpu import conv2d as kernel

    rng = np.random.default_rng(taps)
    cases = [((3, 20, 11, 10), (7, 20, 3, 3), dict(padding=1), "direct"),
             ((2, 16, 13, 12), (9, 16, 3, 3), dict(stride=2, padding=1), "direct"),
             ((2, 12, 9, 9), (9, 4, 3, 2), dict(groups=3, padding=(1, 0)), "direct"),
             ((2, 20, 10, 9), (6, 20, 3, 3), dict(padding=1), "winograd")]  # fmt: skip
    for dtype in (np.float32, np.float64):
        for xs, ws, kw, algorithm in cases:
            x = rng.standard_normal(xs).astype(dtype)
            x[0, 1, 2, 3] = np.nan
            w = rng.standard_normal(ws).astype(dtype)
            dy = None
            results = []
            for t in (0, taps):
                previous = kernel.set_forward_taps(t)
                try:
                    y, ctx = fr.conv2d_forward(x, w, algorithm=algorithm, **kw)
                    dy = rng.standard_normal(y.shape).astype(dtype) if dy is None else dy
                    results.append((y, *fr.conv2d_backward(ctx, dy)))
                finally:
                    kernel.set_forward_taps(previous)
            for a, b in zip(*results, strict=True):
                np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="^n: "):
        kernel.set_forward_taps(-1)


@pytest.mark.parametrize("algorithm", ["direct", "winograd", "im2col"])
def test_relu_activation_keeps_nan_and_blocks_its_gradient(algorithm):
    """A NaN reaching an output stays NaN through the ReLU (torch.relu), and the gradient is
    zero there, as for every non-positive output."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 2, 6, 6))
    x[0, 1, 2, 3] = np.nan
    w = rng.standard_normal((3, 2, 3, 3))
    y, ctx = fr.conv2d_forward(x, w, padding=1, algorithm=algorithm, activation="relu")
    yr, _, _, _ = _relu_expected(x, w, None, np.zeros_like(y), dict(padding=1))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(yr))
    assert np.isnan(y).any()
    dy = rng.standard_normal(y.shape)
    dy[np.isnan(y)] = np.nan  # a NaN gradient where the output is NaN is blocked too
    _, dw, _ = fr.conv2d_backward(ctx, dy)
    keep = np.where(y > 0, dy, 0)
    assert not np.isnan(keep).any()
    _, cr = ref.conv2d_forward(np.nan_to_num(x), w, padding=1)
    _, dwr, _ = ref.conv2d_backward(cr, keep)
    # x's NaN reaches dw wherever it is multiplied, in both; elsewhere they agree
    finite = np.isfinite(dw)
    assert finite.any()
    np.testing.assert_allclose(dw[finite], dwr[finite], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", ["sigmoid", "ReLU", "", True, 1])
def test_bad_activation(bad):
    x, w, b = _good()
    with pytest.raises(ValueError, match="activation"):
        fr.conv2d_forward(x, w[:, :2].repeat(2, axis=1), b, padding=1, activation=bad)
    with pytest.raises(ValueError, match="activation"):
        Conv2d(4, 6, 3, activation=bad)


def test_layer_activation_is_conv_then_relu():
    """fastrnn.nn.Conv2d(activation="relu") equals Conv2d followed by nn.ReLU: outputs, input
    gradient and parameter gradients."""
    from fastrnn.nn import ReLU, Sequential

    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 4, 9, 8))
    fused = Conv2d(4, 6, 3, padding=1, dtype=np.float64, activation="relu")
    conv = Conv2d(4, 6, 3, padding=1, dtype=np.float64)
    conv.load_state_dict(fused.state_dict())
    plain = Sequential(conv, ReLU())
    y1, y2 = fused(x), plain(x)
    np.testing.assert_allclose(y1, y2, rtol=1e-13, atol=1e-13)
    dy = rng.standard_normal(y1.shape)
    dx1, dx2 = fused.backward(dy), plain.backward(dy)
    np.testing.assert_allclose(dx1, dx2, rtol=1e-13, atol=1e-13)
    for (n, p1), (_, p2) in zip(fused.named_parameters(), conv.named_parameters(), strict=True):
        np.testing.assert_allclose(p1.grad, p2.grad, rtol=1e-13, atol=1e-13, err_msg=n)
    assert "activation='relu'" in repr(fused) and "activation" not in repr(conv)


# ------------------------------------------------------------------------------------------------
# max_pool=...: the convolution pooling its own output
# ------------------------------------------------------------------------------------------------

MAX_POOL_CASES = [
    # (N, C, H, W, F, kernel, stride, padding, algorithm, max_pool)
    (5, 6, 8, 9, 7, (3, 3), 1, 1, "direct", 2),  # pooled in the direct schedule, odd plane
    (4, 3, 9, 8, 5, (3, 3), 1, 0, "direct", dict(kernel_size=3, stride=2, padding=1)),  # overlap
    (4, 5, 9, 10, 6, (3, 3), 2, 1, "direct", (2, 3)),  # stride-2 conv, non-square windows
    (1, 6, 7, 9, 5, (3, 3), 1, 1, "direct", 2),  # one image: pooled after the convolution
    (4, 4, 8, 7, 6, (3, 3), 1, 1, "winograd", dict(kernel_size=2, stride=1)),
    (4, 3, 9, 8, 4, (3, 3), 2, 1, "im2col", 3),
    (4, 6, 6, 6, 4, (1, 1), 1, 0, "auto", dict(kernel_size=(1, 2), stride=(1, 2))),  # pointwise
]


def _pool_kwargs(max_pool) -> dict:
    return dict(max_pool) if isinstance(max_pool, dict) else dict(kernel_size=max_pool)


def _pool_expected(x, w, b, dy, kw, relu, max_pool):
    """The reference convolution, ReLU, max pooling, and their gradients (float64)."""
    f64 = [None if a is None else a.astype(np.float64) for a in (x, w, b)]
    y, ctx = ref.conv2d_forward(*f64, **kw)
    if relu:
        y = np.maximum(y, 0)
    yp, pctx = ref.max_pool2d_forward(y, **_pool_kwargs(max_pool))
    dyc = ref.max_pool2d_backward(pctx, dy.astype(np.float64))
    if relu:
        dyc = np.where(y > 0, dyc, 0)
    return (yp, *ref.conv2d_backward(ctx, dyc))


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", MAX_POOL_CASES, ids=lambda c: f"{c[-2]}-{c[0]}x{c[1]}x{c[2]}")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["numpy"])
def test_max_pool_equals_conv_then_pool(backend, case, dtype, relu, restore_threads):
    """max_pool=... gives conv2d (+ ReLU) followed by max_pool2d, forward and backward, on every
    backend and CPU algorithm; on the CPU bitwise the same as the two calls."""
    N, C, H, W, F, k, stride, padding, algorithm, max_pool = case
    rng = np.random.default_rng(11)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = (rng.standard_normal((F, C, *k)) / np.sqrt(C * k[0] * k[1])).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    kw = dict(stride=stride, padding=padding)
    act = dict(activation="relu") if relu else {}
    algo = {"algorithm": algorithm} if backend == "cpu" else {}
    arrays = "cpu" if backend == "numpy" else backend  # the reference backend takes NumPy arrays
    fr.set_num_threads(2)
    with fr.use_backend("numpy" if backend == "numpy" else "auto"):
        kw_all = dict(kw, max_pool=max_pool, **act, **algo)
        (y, dx, dw, db), ctx, dy = _run(arrays, x, w, b, kw_all)
        y2, ctx2 = fr.conv2d_forward(*(to_backend(arrays, a) for a in (x, w, b)), training=False,
                                     max_pool=max_pool, **kw, **act, **algo)  # fmt: skip
    assert ctx2 is None
    np.testing.assert_array_equal(to_numpy(y2), y)
    yr, dxr, dwr, dbr = _pool_expected(x, w, b, dy, kw, relu, max_pool)
    assert y.shape == yr.shape and y.dtype == dtype
    assert_close(y, yr, "conv", "forward", dtype, name="y")
    assert_close(dx, dxr, "conv", "backward", dtype, name="dx")
    assert_close(dw, dwr, "conv", "backward", dtype, name="dw")
    assert_close(db, dbr, "conv", "backward", dtype, name="db")
    if backend == "cpu":  # the fused CPU call against its own two calls
        yc, cc = fr.conv2d_forward(x, w, b, **kw, **act, **algo)
        yp, pc = fr.max_pool2d_forward(yc, **_pool_kwargs(max_pool))
        np.testing.assert_array_equal(y, yp)
        dyc = fr.max_pool2d_backward(pc, dy)
        for got, want in zip((dx, dw, db), fr.conv2d_backward(cc, dyc), strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("algorithm", ["direct", "winograd"])
def test_cpu_max_pool_runs_in_the_kernels_schedule(algorithm, restore_threads, monkeypatch):
    """With two images per thread the direct kernels pool (y is never made), and Winograd
    pools image by image, at 1 and 2 threads alike (bitwise); a NaN output is pooled as
    max_pool2d pools it (NaN wins) and its gradient is blocked by the ReLU."""
    from fastrnn._cpu import conv2d as kernel

    calls = []
    name = "_direct_forward_pooled" if algorithm == "direct" else "_winograd_forward"
    original = getattr(kernel, name)

    def spy(*args):
        out = original(*args)
        if algorithm == "direct":
            calls.append(out is not None)
        elif len(args) > 9:  # (not the backward's dx by Winograd)
            calls.append(args[9] is not None)
        return out

    monkeypatch.setattr(kernel, name, spy)
    rng = np.random.default_rng(12)
    x = rng.standard_normal((6, 4, 10, 9)).astype(np.float32)
    x[2, 1, 4, 4] = np.nan
    w = rng.standard_normal((9, 4, 3, 3)).astype(np.float32)
    b = rng.standard_normal(9).astype(np.float32)
    dy = rng.standard_normal((6, 9, 5, 4)).astype(np.float32)
    results = []
    for threads in (1, 2):
        fr.set_num_threads(threads)
        y, ctx = fr.conv2d_forward(x, w, b, padding=1, activation="relu", max_pool=2,
                                   algorithm=algorithm)  # fmt: skip
        results.append((y, *fr.conv2d_backward(ctx, dy)))
    assert calls == [True, True]
    for a, c in zip(*results, strict=True):
        np.testing.assert_array_equal(a, c)
    y, dx, dw, db = results[0]
    yc, cc = fr.conv2d_forward(x, w, b, padding=1, activation="relu", algorithm=algorithm)
    yp, pc = fr.max_pool2d_forward(yc, 2)
    np.testing.assert_array_equal(y, yp)
    assert np.isnan(y).any()
    for got, want in zip((dx, dw, db), fr.conv2d_backward(cc, fr.max_pool2d_backward(pc, dy)),
                         strict=True):  # fmt: skip
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_max_pool_empty_batch(backend):
    x = np.zeros((0, 3, 6, 6))
    w = np.ones((2, 3, 3, 3))
    y, ctx = fr.conv2d_forward(*(to_backend(backend, a) for a in (x, w)), padding=1, max_pool=2)
    assert y.shape == (0, 2, 3, 3)
    dx, dw, db = map(to_numpy, fr.conv2d_backward(ctx, y))
    assert dx.shape == x.shape and db is None
    np.testing.assert_array_equal(dw, np.zeros_like(w))


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        ("2", TypeError, "max_pool"),
        (2.0, TypeError, "max_pool"),
        (True, TypeError, "max_pool"),
        (0, ValueError, "max_pool"),
        ((2, 2, 2), TypeError, "max_pool"),
        (dict(size=2), ValueError, "max_pool"),
        (dict(kernel_size=2, stride=0), ValueError, r"max_pool\['stride'\]"),
        (dict(kernel_size=2, padding=2), ValueError, "max_pool: padding"),
        (dict(kernel_size=7), ValueError, "larger than the convolution.s 6x6 output"),
    ],
)
def test_bad_max_pool(bad, exc, match):
    x, w, b = _good()
    with pytest.raises(exc, match=match):
        fr.conv2d_forward(x, w[:, :2].repeat(2, axis=1), b, padding=1, max_pool=bad)


def test_max_pool_gradient_shape_is_checked():
    x, w, b = _good()
    w = w[:, :2].repeat(2, axis=1)
    y, ctx = fr.conv2d_forward(x, w, b, padding=1, max_pool=2)
    with pytest.raises(ValueError, match="dy"):
        fr.conv2d_backward(ctx, np.zeros((*y.shape[:2], 7, 7), dtype=y.dtype))


@pytest.mark.parametrize("max_pool", [2, dict(kernel_size=3, stride=2, padding=1)])
def test_layer_max_pool_is_conv_relu_pool(max_pool):
    """fastrnn.nn.Conv2d(activation="relu", max_pool=...) equals Conv2d, ReLU, MaxPool2d:
    outputs, input gradient and parameter gradients."""
    from fastrnn.nn import MaxPool2d, ReLU, Sequential

    rng = np.random.default_rng(10)
    x = rng.standard_normal((5, 4, 9, 8))
    fused = Conv2d(4, 6, 3, padding=1, dtype=np.float64, activation="relu", max_pool=max_pool)
    conv = Conv2d(4, 6, 3, padding=1, dtype=np.float64)
    conv.load_state_dict(fused.state_dict())
    plain = Sequential(conv, ReLU(), MaxPool2d(**_pool_kwargs(max_pool)))
    y1, y2 = fused(x), plain(x)
    np.testing.assert_array_equal(y1, y2)
    dy = rng.standard_normal(y1.shape)
    np.testing.assert_allclose(fused.backward(dy), plain.backward(dy), rtol=1e-13, atol=1e-13)
    for (n, p1), (_, p2) in zip(fused.named_parameters(), conv.named_parameters(), strict=True):
        np.testing.assert_allclose(p1.grad, p2.grad, rtol=1e-13, atol=1e-13, err_msg=n)
    assert f"max_pool={max_pool!r}" in repr(fused)
    with pytest.raises(ValueError, match="max_pool"):
        Conv2d(4, 6, 3, max_pool=dict(kernel_size=2, padding=2))
    with pytest.raises(ValueError, match="max_pool"):
        Conv2d(4, 6, 3, dtype=np.float64, max_pool=20)(x)


# ------------------------------------------------------------------------------------------------
# gradients without dx (fastrnn.torch's first layers), and short columns' backward by im2col
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["auto", "direct", "winograd", "im2col"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3], (3, 1, 9, 8, 5, (3, 3), 1, 1, 1, 1, True),
                                  (2, 64, 6, 7, 64, (3, 3), 1, 1, 1, 1, True)], ids=_ids)
def test_cpu_gradients_without_input_grad(case, algorithm):
    """input_grad=False: dx is None, dw and db are bitwise those of the full backward."""
    from fastrnn.backends.ops import conv2d_gradients

    x, w, b, kw = _data(case)
    if algorithm == "winograd" and (w.shape[2:] != (3, 3) or kw.get("groups", 1) != 1
                                    or kw.get("stride", 1) != 1 or kw.get("dilation", 1) != 1):
        pytest.skip("not a Winograd geometry")
    y, ctx = fr.conv2d_forward(x, w, b, algorithm=algorithm, **kw)
    dy = np.random.default_rng(5).standard_normal(y.shape)
    dx, dw, db = fr.conv2d_backward(ctx, dy)
    none, dw2, db2 = conv2d_gradients(ctx, dy, input_grad=False)
    assert none is None
    np.testing.assert_array_equal(dw2, dw)
    if b is None:
        assert db2 is None
    else:
        np.testing.assert_array_equal(db2, db)


@pytest.mark.parametrize("backend", ["numpy", *KERNEL_BACKENDS])
def test_gradients_without_input_grad_every_backend(backend):
    from fastrnn.backends.ops import conv2d_gradients

    x, w, b, kw = _data(CASES[3])
    y, ctx = fr.conv2d_forward(*(to_backend(backend, a) for a in (x, w, b)), **kw)
    dy = to_backend(backend, np.random.default_rng(5).standard_normal(y.shape))
    _, dw, db = fr.conv2d_backward(ctx, dy)
    none, dw2, db2 = conv2d_gradients(ctx, dy, input_grad=False)
    assert none is None
    np.testing.assert_allclose(to_numpy(dw2), to_numpy(dw), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_numpy(db2), to_numpy(db), rtol=1e-12, atol=1e-12)
    with pytest.raises((TypeError, ValueError), match="input_grad"):
        conv2d_gradients(ctx, dy, input_grad="no")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "case",
    [
        (4, 1, 12, 11, 8, (3, 3), 1, 1, 1, 1, True),  # 9 taps: a first layer on grey images
        (3, 3, 10, 9, 5, (3, 3), 2, 1, 1, 1, False),  # 27: RGB, stride 2
        (2, 1, 9, 9, 4, (5, 5), 1, 2, 1, 1, True),  # 25
        (2, 4, 8, 8, 6, (3, 3), 1, 0, 1, 1, True),  # 36: the largest that goes to im2col
        (2, 5, 8, 8, 6, (3, 3), 1, 0, 1, 1, True),  # 45: stays direct
        (2, 4, 8, 8, 4, (3, 3), 1, 1, 1, 2, True),  # grouped: stays direct
    ],
    ids=_ids,
)
def test_cpu_short_columns_backward(case, dtype, monkeypatch):
    """A direct forward with short columns takes its gradients from im2col's backward: equal
    to an im2col forward's backward bitwise, and to the direct kernels' within tolerance."""
    from fastrnn._cpu import conv2d as kernel

    x, w, b, kw = _data(case, dtype)
    ctx = _check_against_reference(x, w, b, dict(kw, algorithm="direct"), dtype)
    dy = np.random.default_rng(5).standard_normal(fr.conv2d_forward(x, w, b, **kw)[0].shape)
    dy = dy.astype(dtype)
    routed = fr.conv2d_backward(ctx, dy)
    _, ctx_i = fr.conv2d_forward(x, w, b, algorithm="im2col", **kw)
    by_im2col = fr.conv2d_backward(ctx_i, dy)
    monkeypatch.setattr(kernel, "IM2COL_BACKWARD_MAX_K", 0)
    direct = fr.conv2d_backward(ctx, dy)
    short = w.shape[1] * w.shape[2] * w.shape[3] <= 36 and kw.get("groups", 1) == 1
    for got, im2col_grad, direct_grad in zip(routed, by_im2col, direct, strict=True):
        if got is None:
            continue
        if short:
            np.testing.assert_array_equal(got, im2col_grad)
        else:
            np.testing.assert_array_equal(got, direct_grad)
        np.testing.assert_allclose(got, direct_grad, rtol=1e-4 if dtype == np.float32 else 1e-10,
                                   atol=1e-4 if dtype == np.float32 else 1e-10)
