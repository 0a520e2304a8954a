"""max_pool2d / avg_pool2d: the reference against finite differences and PyTorch (ties included),
every kernel backend against the reference, threads, and the error policy."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DTYPES, KERNEL_BACKENDS, to_backend, to_numpy
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close

import fastrnn as fr
from fastrnn import reference as ref

OPS = {
    "max": (ref.max_pool2d_forward, ref.max_pool2d_backward),
    "avg": (ref.avg_pool2d_forward, ref.avg_pool2d_backward),
}
PUBLIC = {
    "max": (fr.max_pool2d_forward, fr.max_pool2d_backward),
    "avg": (fr.avg_pool2d_forward, fr.avg_pool2d_backward),
}

# (N, C, H, W, kernel_size, stride, padding)
CASES = [
    (2, 3, 7, 9, 2, None, 0),  # odd sizes, the last row/column dropped (floor)
    (2, 3, 7, 9, 3, 2, 1),  # overlapping windows with padding
    (1, 1, 5, 5, 1, None, 0),  # N=1, C=1, 1x1 window
    (2, 2, 9, 8, (3, 2), (2, 1), (1, 1)),  # non-square kernel and stride
    (2, 3, 11, 10, 2, 3, 0),  # stride > kernel
    (1, 2, 6, 7, (2, 3), 1, (1, 1)),  # stride 1, every element in several windows
    (2, 2, 4, 4, 4, None, 2),  # padding = kernel / 2
    (1, 1, 3, 3, 3, 1, 1),  # one image, windows mostly padding
    (3, 5, 13, 6, (5, 3), (1, 2), (2, 0)),
]


def _ids(case) -> str:
    return "N{}C{}H{}W{}-k{}-s{}-p{}".format(*case)


def _x(case, dtype=np.float64, seed=0, ties=False):
    N, C, H, W = case[:4]
    rng = np.random.default_rng(seed)
    if ties:  # small integers: many equal values in one window
        return rng.integers(-2, 3, (N, C, H, W)).astype(dtype)
    return rng.standard_normal((N, C, H, W)).astype(dtype)


# ------------------------------------------------------------------------------------------------
# the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("case", CASES[:-1], ids=_ids)
def test_reference_finite_differences(kind, case):
    """dx of L = sum(y * r) by central differences, float64 (distinct values: max is smooth)."""
    fwd, bwd = OPS[kind]
    k, s, p = case[4:]
    x = _x(case)
    y, ctx = fwd(x, k, s, p)
    r = np.random.default_rng(1).standard_normal(y.shape)
    dx = bwd(ctx, r)
    eps = 1e-6
    num = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + eps
        up = np.sum(fwd(x, k, s, p, training=False)[0] * r)
        x[idx] = old - eps
        down = np.sum(fwd(x, k, s, p, training=False)[0] * r)
        x[idx] = old
        num[idx] = (up - down) / (2 * eps)
    assert_close(dx, num, "fd", "backward", np.float64, name="dx")


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reference_matches_torch(kind, case, ties):
    """Values and gradients equal PyTorch's, including which tied element gets the gradient."""
    torch = pytest.importorskip("torch")
    fwd, bwd = OPS[kind]
    k, s, p = case[4:]
    x = _x(case, ties=ties)
    y, ctx = fwd(x, k, s, p)
    dy = np.random.default_rng(2).standard_normal(y.shape)
    dx = bwd(ctx, dy)
    xt = torch.tensor(x, requires_grad=True)
    tfn = torch.nn.functional.max_pool2d if kind == "max" else torch.nn.functional.avg_pool2d
    yt = tfn(xt, k, s, p)
    yt.backward(torch.tensor(dy))
    assert_close(y, yt.detach().numpy(), "pool", "forward", np.float64, name="y")
    assert_close(dx, xt.grad.numpy(), "pool", "backward", np.float64, name="dx")


def test_reference_max_padding_never_wins():
    """An all -inf input: the maximum is -inf and the gradient goes to the first real element of
    each window (PyTorch's rule), never to the padding."""
    torch = pytest.importorskip("torch")
    x = np.full((1, 2, 4, 5), -np.inf)
    y, ctx = ref.max_pool2d_forward(x, 3, 1, 1)
    dy = np.arange(y.size, dtype=np.float64).reshape(y.shape) + 1
    dx = ref.max_pool2d_backward(ctx, dy)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.max_pool2d(xt, 3, 1, 1)
    yt.backward(torch.tensor(dy))
    assert np.all(y == -np.inf)
    np.testing.assert_array_equal(dx, xt.grad.numpy())
    assert dx.sum() == dy.sum()  # nothing was lost to the padding


def test_reference_max_nan_propagates():
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 1, 1] = np.nan
    y, ctx = ref.max_pool2d_forward(x, 2)
    assert np.isnan(y[0, 0, 0, 0]) and not np.isnan(y[0, 0, 1:, 1:]).any()
    dx = ref.max_pool2d_backward(ctx, np.ones_like(y))
    assert dx[0, 0, 1, 1] == 1 and dx[0, 0, 0, 0] == 0


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_reference_context(kind):
    fwd, _ = OPS[kind]
    y, ctx = fwd(_x(CASES[1]), 3, 2, 1)
    assert ctx.op == f"{kind}_pool2d" and ctx.backend == "numpy"
    assert ctx.grad_shapes == {"dy": y.shape}
    assert fwd(_x(CASES[1]), 3, 2, 1, training=False)[1] is None


# ------------------------------------------------------------------------------------------------
# kernel backends against the reference
# ------------------------------------------------------------------------------------------------


def _run(backend, kind, x, k, s, p):
    fwd, bwd = PUBLIC[kind]
    y, ctx = fwd(to_backend(backend, x), k, s, p)
    dy = np.random.default_rng(2).standard_normal(y.shape).astype(x.dtype)
    dx = bwd(ctx, to_backend(backend, dy))
    return to_numpy(y), to_numpy(dx), ctx, dy


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_matches_reference(backend, case, kind, dtype, ties):
    k, s, p = case[4:]
    x = _x(case, dtype, ties=ties)
    y, dx, ctx, dy = _run(backend, kind, x, k, s, p)
    assert ctx.backend == backend and ctx.op == f"{kind}_pool2d"
    fwd, bwd = OPS[kind]
    yr, cr = fwd(x.astype(np.float64), k, s, p)
    dxr = bwd(cr, dy.astype(np.float64))
    assert y.dtype == dtype and dx.dtype == dtype
    assert_close(y, yr, "pool", "forward", dtype, name="y")
    assert_close(dx, dxr, "pool", "backward", dtype, name="dx")


@st.composite
def pool_cases(draw):
    """Small random geometries that the public pooling functions accept."""
    KH, KW = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = draw(st.none() | st.tuples(st.integers(1, 4), st.integers(1, 4)))
    ph, pw = draw(st.integers(0, KH // 2)), draw(st.integers(0, KW // 2))
    H = draw(st.integers(max(1, KH - 2 * ph), 10))
    W = draw(st.integers(max(1, KW - 2 * pw), 10))
    return (draw(st.integers(1, 3)), draw(st.integers(1, 3)), H, W, (KH, KW), stride, (ph, pw))


@settings(max_examples=40, deadline=None)
@given(case=pool_cases(), kind=st.sampled_from(["max", "avg"]), ties=st.booleans())
def test_cpu_random_geometries(case, kind, ties):
    """Property-based: the CPU kernels equal the reference on random small geometries."""
    k, s, p = case[4:]
    x = _x(case, ties=ties)
    y, dx, _, dy = _run("cpu", kind, x, k, s, p)
    fwd, bwd = OPS[kind]
    yr, cr = fwd(x, k, s, p)
    assert_close(y, yr, "pool", "forward", np.float64, name="y")
    assert_close(dx, bwd(cr, dy), "pool", "backward", np.float64, name="dx")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_max_special_values(backend):
    """All -inf windows point at a real element; NaN wins and its gradient goes to the first
    NaN -- the same as the reference."""
    x = np.full((1, 2, 5, 6), -np.inf)
    x[0, 1] = 0.0
    x[0, 1, 1, 1] = x[0, 1, 3, 4] = x[0, 1, 3, 5] = np.nan
    y, dx, ctx, dy = _run(backend, "max", x, 3, 1, 1)
    yr, cr = ref.max_pool2d_forward(x, 3, 1, 1)
    np.testing.assert_array_equal(y, yr)
    # the same elements receive gradient; overlapping windows may add in another order
    assert_close(dx, ref.max_pool2d_backward(cr, dy), "pool", "backward", np.float64, name="dx")


@pytest.mark.parametrize("W", [2, 3, 8, 9, 17, 24])
def test_cpu_max_2x2_float32_path(W):
    """2x2 windows at stride 2 on float32 run their own vector loop (four outputs per step and
    a scalar tail): the same values and positions as the general loop (float64) on ties, NaN
    (also two in one window, and first in its window), -inf and odd planes, in training and
    inference."""
    rng = np.random.default_rng(W)
    x = rng.integers(-2, 3, size=(2, 3, 7, W)).astype(np.float64)  # many ties
    x[0, 0, 0, 0] = x[0, 0, 1, 1] = np.nan
    x[0, 1, 2:4, :] = -np.inf
    x[1, 2, 3, W - 1] = np.nan
    x[1, 0, :2, :2] = np.inf
    y64, c64 = fr.max_pool2d_forward(x, 2)
    y32, c32 = fr.max_pool2d_forward(x.astype(np.float32), 2)
    np.testing.assert_array_equal(y32, y64.astype(np.float32))
    np.testing.assert_array_equal(c32.saved["arg"], c64.saved["arg"])
    yi, _ = fr.max_pool2d_forward(x.astype(np.float32), 2, training=False)
    np.testing.assert_array_equal(yi, y32)
    yr, cr = ref.max_pool2d_forward(x, 2)
    np.testing.assert_array_equal(y64, yr)
    dy = rng.standard_normal(y32.shape)
    np.testing.assert_array_equal(
        fr.max_pool2d_backward(c32, dy.astype(np.float32)),
        ref.max_pool2d_backward(cr, dy).astype(np.float32),
    )


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_inference(backend, kind):
    fwd, _ = PUBLIC[kind]
    x = _x(CASES[1], np.float32)
    y, ctx = fwd(to_backend(backend, x), 3, 2, 1, training=False)
    assert ctx is None
    assert_close(y, OPS[kind][0](x, 3, 2, 1)[0], "pool", "forward", np.float32, name="y")


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_empty_batch(backend, kind):
    fwd, bwd = PUBLIC[kind]
    y, ctx = fwd(to_backend(backend, np.zeros((0, 3, 5, 5))), 2)
    assert y.shape == (0, 3, 2, 2)
    assert bwd(ctx, y).shape == (0, 3, 5, 5)


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_cpu_threads_agree(kind, monkeypatch):
    """Planes are independent: 1 and 2 threads give identical results."""
    from fastrnn._cpu import pool2d as kernel

    monkeypatch.setattr(kernel, "MIN_PARALLEL_ELEMENTS", 0)  # parallel even at this size
    before = fr.get_num_threads()
    x = _x((5, 3, 9, 8), np.float32, ties=True)
    try:
        fr.set_num_threads(1)
        one = _run("cpu", kind, x, 3, 2, 1)
        fr.set_num_threads(2)
        two = _run("cpu", kind, x, 3, 2, 1)
    finally:
        fr.set_num_threads(before)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])


# ------------------------------------------------------------------------------------------------
# error policy
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize(
    "x, k, s, p, exc, name",
    [
        (np.zeros((3, 6, 6)), 2, None, 0, ValueError, "x"),
        (np.zeros((1, 3, 6, 6), dtype=np.int32), 2, None, 0, TypeError, "x"),
        ([[[[1.0]]]], 1, None, 0, TypeError, "x"),
        (np.zeros((1, 3, 6, 6)), 0, None, 0, ValueError, "kernel_size"),
        (np.zeros((1, 3, 6, 6)), 2.0, None, 0, TypeError, "kernel_size"),
        (np.zeros((1, 3, 6, 6)), 7, None, 0, ValueError, "kernel_size"),  # larger than input
        (np.zeros((1, 3, 6, 6)), 2, 0, 0, ValueError, "stride"),
        (np.zeros((1, 3, 6, 6)), 2, (1, 0), 0, ValueError, "stride"),
        (np.zeros((1, 3, 6, 6)), 2, "2", 0, TypeError, "stride"),
        (np.zeros((1, 3, 6, 6)), 2, None, -1, ValueError, "padding"),
        (np.zeros((1, 3, 6, 6)), 2, None, 2, ValueError, "padding"),  # more than kernel / 2
    ],
)
def test_bad_input(kind, x, k, s, p, exc, name):
    fwd, _ = PUBLIC[kind]
    with pytest.raises(exc, match=name):
        fwd(x, k, s, p)


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_bad_gradient(kind):
    fwd, bwd = PUBLIC[kind]
    with fr.use_backend("numpy"):
        y, ctx = fwd(np.zeros((1, 2, 6, 6)), 2)
        with pytest.raises(ValueError, match="dy"):
            bwd(ctx, np.zeros((1, 2, 3, 4)))
        with pytest.raises(TypeError, match="dy"):
            bwd(ctx, y.astype(np.float32))
        other = "avg" if kind == "max" else "max"
        with pytest.raises(ValueError, match="ctx"):
            PUBLIC[other][1](ctx, y)


# ------------------------------------------------------------------------------------------------
# empty planes (issue 14, item 1)
# ------------------------------------------------------------------------------------------------

_EMPTY_PLANE_REPRODUCER = """
import numpy as np
import fastrnn
x = np.zeros((8, 64, 0, 8192), np.float32)
try:
    y, ctx = fastrnn.max_pool2d_forward(x, 2, 2, 1)
except ValueError as exc:
    assert str(exc).startswith("x:"), exc
    print("refused")
else:
    print("accepted", y.shape, flush=True)
    fastrnn.max_pool2d_backward(ctx, np.ones_like(y))  # wrote past the end of the empty dx
"""


def test_empty_plane_reproducer_refused_in_subprocess():
    """The reported reproducer, in its own process: it used to return y of -inf and then
    corrupt the heap in backward (glibc abort or a later segfault)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _EMPTY_PLANE_REPRODUCER],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "refused", (
        proc.returncode,
        proc.stdout,
        proc.stderr[-2000:],
    )


EMPTY_PLANES = [(2, 3, 0, 6), (2, 3, 6, 0), (0, 3, 0, 0), (1, 1, 0, 8192)]


@pytest.mark.parametrize("shape", EMPTY_PLANES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("backend", ["numpy", *KERNEL_BACKENDS])
def test_empty_plane_refused(backend, kind, shape):
    """H or W of 0 is refused by every backend (PyTorch too), even where padding would give
    windows; N and C may be 0."""
    fwd, _ = PUBLIC[kind]
    x = to_backend(backend, np.zeros(shape, np.float32))
    with fr.use_backend(backend), pytest.raises(ValueError, match=r"^x: .*planes"):
        fwd(x, 2, 2, 1)


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_cpu_kernel_module_refuses_empty_plane(kind):
    """Called directly, without the public function's validation, the kernel refuses too."""
    from fastrnn.backends import backend_module

    fwd = getattr(backend_module("cpu"), f"{kind}_pool2d_forward")
    with pytest.raises(ValueError, match="^x: "):
        fwd(np.zeros((8, 64, 0, 8192), np.float32), (2, 2), (2, 2), (1, 1), True)


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("backend", ["numpy", *KERNEL_BACKENDS])
def test_empty_channels(backend, kind):
    """C = 0 (PyTorch refuses it) is just an empty result, forward and backward."""
    fwd, bwd = PUBLIC[kind]
    with fr.use_backend(backend):
        y, ctx = fwd(to_backend(backend, np.zeros((2, 0, 5, 5))), 3, 2, 1)
        assert y.shape == (2, 0, 3, 3)
        assert bwd(ctx, y).shape == (2, 0, 5, 5)


# ------------------------------------------------------------------------------------------------
# integer arguments and sizes (issue 14, item 6)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("stride", [2**31, 2**63 - 1, 2**63, 2**64, 10**30])
def test_huge_stride_is_one_window(backend, kind, stride):
    """A stride beyond the padded input leaves one window per axis, whatever its size (it used
    to raise OverflowError at 2^63 on the CPU)."""
    fwd, bwd = PUBLIC[kind]
    x = _x((2, 3, 7, 6))
    with fr.use_backend(backend):
        y, ctx = fwd(x, 3, stride, 1)
        want, want_ctx = fwd(x, 3, 8, 1)
        assert y.shape == (2, 3, 1, 1)
        np.testing.assert_array_equal(y, want)
        np.testing.assert_array_equal(bwd(ctx, y), bwd(want_ctx, y))


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize(
    "k, p, name",
    [
        (2**63, 0, "kernel_size"),  # larger than the input
        (2**64, 2**63, "padding"),  # padded extent beyond 2^62
        (2**40, 2**39, "padding"),  # a padded input no machine holds
        (4, 2**63, "padding"),  # more than half the kernel
    ],
)
def test_huge_geometry_refused(backend, kind, k, p, name):
    fwd, _ = PUBLIC[kind]
    with fr.use_backend(backend), pytest.raises(ValueError, match=rf"^{name}: "):
        fwd(_x((2, 3, 7, 6)), k, 1, p)


INTEGER_TYPES = [int, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint64]


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("itype", INTEGER_TYPES, ids=lambda t: t.__name__)
def test_numpy_integers_accepted(kind, itype):
    fwd, _ = PUBLIC[kind]
    x = _x((2, 3, 7, 9))
    want, _ = fwd(x, (3, 2), (2, 1), (1, 0))
    got, _ = fwd(x, (itype(3), itype(2)), [itype(2), itype(1)], (itype(1), itype(0)))
    np.testing.assert_array_equal(got, want)
    got, _ = fwd(x, itype(3), itype(2), itype(1))
    np.testing.assert_array_equal(got, fwd(x, 3, 2, 1)[0])


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("arg", ["kernel_size", "stride", "padding"])
@pytest.mark.parametrize("bad", [True, np.True_, False, (2, True), 2.0, np.float64(2), "2", (2,)])
def test_bool_and_non_integers_refused(kind, arg, bad):
    fwd, _ = PUBLIC[kind]
    args = dict(kernel_size=2, stride=2, padding=1)
    args[arg] = bad
    with pytest.raises(TypeError, match=rf"^{arg}: "):
        fwd(_x((1, 2, 6, 6)), **args)


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_empty_batch_with_dimensions_past_64_bits_refused(backend, kind):
    """N = 0 allocates nothing, but a padded plane of 2^33 x 2^33 is refused naming padding
    (the reference builds one whatever N is; NumPy refuses such shapes even when empty)."""
    fwd, _ = PUBLIC[kind]
    with fr.use_backend(backend), pytest.raises(ValueError, match="^padding: "):
        fwd(np.zeros((0, 1, 1, 1), np.float32), 2**33, 1, 2**32)


def test_cpu_pooling_and_direct_convolution_do_not_load_scipy():
    """The first pooling, direct-convolution or float32 pointwise (on the AVX-512 tiles) call
    of a process pays no SciPy import (scipy.linalg took 0.2-0.4 s here): those paths call no
    BLAS. The first call that needs a GEMM loads SciPy's BLAS, still without the scipy.linalg
    package (fastrnn/_cpu/_scipy_blas.py). Checked in a fresh process."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        import fastrnn as fr
        x = np.ones((1, 2, 6, 6), np.float32)
        y, ctx = fr.max_pool2d_forward(x, 2)
        fr.max_pool2d_backward(ctx, np.ones_like(y))
        y, ctx = fr.avg_pool2d_forward(x, 3, 1, 1)
        fr.avg_pool2d_backward(ctx, np.ones_like(y))
        fr.conv2d_forward(x, np.ones((3, 2, 3, 3), np.float32), padding=1, training=False)
        # a float32 pointwise forward whose tiles all take fastrnn's AVX-512 GEMM (16x16 = 256
        # columns per image) needs no BLAS either, where the CPU has AVX-512
        from fastrnn._cpu import conv2d as direct
        xp = np.ones((2, 8, 16, 16), np.float32)
        y, _ = fr.conv2d_forward(xp, np.ones((4, 8, 1, 1), np.float32), training=False)
        assert (y == 8).all()
        tiles = direct.isa_supported("avx512")
        print("scipy.linalg.cython_blas" in sys.modules or "scipy" in sys.modules, tiles)
        # then the first call that needs a GEMM loads SciPy's BLAS, and computes
        y, ctx = fr.conv2d_forward(xp.astype(np.float64), np.ones((4, 8, 1, 1)))
        dx, dw, _ = fr.conv2d_backward(ctx, np.ones_like(y))
        assert (y == 8).all() and (dx == 4).all() and (dw == 512).all()
        from fastrnn._cpu import _scipy_blas
        print("scipy.linalg" in sys.modules, _scipy_blas._module is not None)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, tiles, after, blas = out.stdout.split()
    assert first == ("False" if tiles == "True" else first)
    assert after == "False" and blas == "True"
