"""The CUDA backend's kernels and drivers executed on the host, compared with the reference.

No GPU needed: the unchanged .cu files are compiled as C++ with a shim for the CUDA built-ins,
and the drivers of fastrnn/_cuda run on a host runtime (NumPy arrays in guard margins, a GEMM with
cuBLAS's column-major argument rules); see tests/cuda_host_emulation.py. This checks the kernels'
arithmetic, their grid-stride loops (tiny grids, so every thread loops), the kernel table's
signatures, and the drivers' offsets, leading dimensions and launch arguments. What it cannot
check (NVRTC's code generation, CuPy's launch and cuBLAS's own results) is covered by the NVRTC
compile test and by the GPU tests (tests/test_cuda_recurrent.py).
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
from cuda_host_emulation import HostRuntime, build_library
from tolerances import assert_close

from fastrnn import reference as ref
from fastrnn._cuda import _kernels, recurrent
from fastrnn._cuda._runtime import use_runtime

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="no C++ compiler"
)


@pytest.fixture(scope="session")
def host_lib(tmp_path_factory):
    return build_library(tmp_path_factory.mktemp("cuda_host"))


@pytest.fixture
def host_rt(host_lib):
    rt = HostRuntime(host_lib)
    with use_runtime(rt):
        yield rt


# (T, N, D, H, lengths): lengths None, "mixed" (some sequences shorter, one of full length) or
# "ones" (every sequence one step long)
SHAPES = [
    (1, 1, 1, 1, None),
    (3, 2, 4, 5, None),
    (5, 3, 2, 7, "mixed"),
    (4, 4, 6, 37, "mixed"),  # N*H = 148 > 3 blocks * 32 threads: the grid-stride loop wraps
    (2, 5, 3, 33, "ones"),
    (6, 1, 9, 64, "mixed"),
    (3, 7, 0, 3, None),  # no input features: the input GEMMs have K = 0 or N = 0
]


def _ids(shape) -> str:
    T, N, D, H, lens = shape
    return f"T{T}N{N}D{D}H{H}{'-' + lens if lens else ''}"


def _lengths(kind, T, N, rng):
    if kind is None:
        return None
    if kind == "ones":
        return np.ones(N, dtype=np.int64)
    lens = rng.integers(1, T + 1, size=N)
    lens[0] = T
    if N > 1:
        lens[-1] = max(1, T - 2)
    return lens.astype(np.int64)


def _data(op, shape, dtype, seed=0):
    T, N, D, H, lens_kind = shape
    rng = np.random.default_rng(seed)
    G = {"lstm": 4, "gru": 3, "rnn": 1}[op] * H
    s = 0.7 / np.sqrt(max(H, 1))
    d = dict(
        x=rng.standard_normal((T, N, D)),
        h0=rng.standard_normal((N, H)) * 0.5,
        w_ih=rng.standard_normal((G, D)) * s,
        w_hh=rng.standard_normal((G, H)) * s,
    )
    if op == "lstm":
        d["c0"] = rng.standard_normal((N, H)) * 0.5
    if op == "gru":
        d["b_ih"] = rng.standard_normal(G) * 0.3
        d["b_hh"] = rng.standard_normal(G) * 0.3
    else:
        d["b"] = rng.standard_normal(G) * 0.3
    d = {k: v.astype(dtype) for k, v in d.items()}
    grads = dict(
        dy=rng.standard_normal((T, N, H)).astype(dtype),
        dhT=rng.standard_normal((N, H)).astype(dtype),
    )
    if op == "lstm":
        grads["dcT"] = rng.standard_normal((N, H)).astype(dtype)
    return d, grads, _lengths(lens_kind, T, N, rng)


ORDER = {
    "lstm": ("x", "h0", "c0", "w_ih", "w_hh", "b"),
    "gru": ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"),
    "rnn": ("x", "h0", "w_ih", "w_hh", "b"),
}
GRAD_NAMES = {
    "lstm": ("dx", "dh0", "dc0", "dw_ih", "dw_hh", "db"),
    "gru": ("dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"),
    "rnn": ("dx", "dh0", "dw_ih", "dw_hh", "db"),
}


def _run_both(rt, op, shape, dtype, *, nonlinearity="tanh", with_state_grads=True):
    """The host-emulated CUDA driver and the float64 reference on the same inputs."""
    d, grads, lens = _data(op, shape, dtype)
    args = [d[k] for k in ORDER[op]]
    dev = [rt.to_device(a) for a in args]
    extra = (nonlinearity,) if op == "rnn" else ()
    fwd = getattr(recurrent, f"{op}_forward")
    bwd = getattr(recurrent, f"{op}_backward")
    out = fwd(*dev, *extra, lens, True)
    *outs, ctx = out
    assert ctx.backend == "cuda" and ctx.cupy is True and ctx.op == op
    g_names = ["dhT", "dcT"][: 2 if op == "lstm" else 1]
    up = [rt.to_device(grads["dy"])] + [
        rt.to_device(grads[k]) if with_state_grads else None for k in g_names
    ]
    got = bwd(ctx, *up)

    args64 = [a.astype(np.float64) for a in args]
    kw = dict(nonlinearity=nonlinearity) if op == "rnn" else {}
    *ref_outs, rctx = getattr(ref, f"{op}_forward")(*args64, lengths=lens, **kw)
    up64 = [grads["dy"].astype(np.float64)] + [
        grads[k].astype(np.float64) if with_state_grads else None for k in g_names
    ]
    want = getattr(ref, f"{op}_backward")(rctx, *up64)
    return outs, ref_outs, got, want, ctx


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("op", ["lstm", "gru", "rnn"])
def test_driver_matches_reference(host_rt, op, shape, dtype):
    outs, ref_outs, got, want, ctx = _run_both(host_rt, op, shape, dtype)
    names = ["y", "hT", "cT"][: len(outs)]
    for name, a, b in zip(names, outs, ref_outs, strict=True):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert_close(a, b, "recurrent", "forward", dtype, name=f"{op} {name}")
    for name, a, b in zip(GRAD_NAMES[op], got, want, strict=True):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert_close(a, b, "recurrent", "backward", dtype, name=f"{op} {name}")
    # Every launch of a kernel over N*H elements used the capped grid.
    assert all(grid <= host_rt.max_blocks for _, grid, _ in host_rt.launches)


@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[3]], ids=_ids)
def test_rnn_relu(host_rt, shape):
    outs, ref_outs, got, want, _ = _run_both(host_rt, "rnn", shape, np.float64, nonlinearity="relu")
    for a, b in zip(outs, ref_outs, strict=True):
        assert_close(a, b, "recurrent", "forward", np.float64)
    for name, a, b in zip(GRAD_NAMES["rnn"], got, want, strict=True):
        assert_close(a, b, "recurrent", "backward", np.float64, name=name)


@pytest.mark.parametrize("op", ["lstm", "gru", "rnn"])
def test_no_state_gradients(host_rt, op):
    """dhT / dcT = None means zeros."""
    _, _, got, want, _ = _run_both(host_rt, op, SHAPES[3], np.float64, with_state_grads=False)
    for name, a, b in zip(GRAD_NAMES[op], got, want, strict=True):
        assert_close(a, b, "recurrent", "backward", np.float64, name=name)


@pytest.mark.parametrize("op", ["lstm", "gru", "rnn"])
def test_inference_uses_two_state_slots(host_rt, op):
    """training=False: same outputs, no context, ping-pong state buffers."""
    d, _, lens = _data(op, SHAPES[3], np.float64)
    dev = [host_rt.to_device(d[k]) for k in ORDER[op]]
    extra = ("tanh",) if op == "rnn" else ()
    fwd = getattr(recurrent, f"{op}_forward")
    *train_outs, ctx = fwd(*dev, *extra, lens, True)
    *infer_outs, no_ctx = fwd(*dev, *extra, lens, False)
    assert no_ctx is None
    for a, b in zip(train_outs, infer_outs, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("block,max_blocks", [(1, 1), (32, 1), (7, 5), (256, 4096)])
def test_grid_stride_loops_cover_every_element(host_lib, block, max_blocks):
    """Whatever the grid, every (n, j) is computed exactly once (the forward is not idempotent
    on its in-place buffers, so a double visit would show)."""
    rt = HostRuntime(host_lib, block=block, max_blocks=max_blocks)
    with use_runtime(rt):
        outs, ref_outs, got, want, _ = _run_both(rt, "lstm", (3, 5, 4, 41, "mixed"), np.float64)
    for a, b in zip(outs, ref_outs, strict=True):
        assert_close(a, b, "recurrent", "forward", np.float64)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, "recurrent", "backward", np.float64)


def test_sizes_and_steps_are_64_bit():
    """Every size, step and slot parameter is index_t (64-bit), so t * N * 4H and the other
    offsets cannot overflow (the host build checks that index_t is what the kernels take)."""
    for k in _kernels.KERNELS:
        for param, kind in zip(k.params, k.kinds, strict=True):
            name = param.rsplit(" ", 1)[1]
            if name in ("t", "src", "dst", "N", "H"):
                assert kind == "index_t", (k.name, param)


def test_signature_check_catches_a_wrong_table(tmp_path, monkeypatch):
    """The static_assert of the host build fails when a table entry disagrees with the kernel
    (here: 'int N' where the kernel takes index_t), so a launch ABI mismatch cannot go unseen."""
    bad = tuple(
        dataclasses.replace(k, params=tuple("int N" if p == "index_t N" else p for p in k.params))
        if k.name == "rnn_forward_step"
        else k
        for k in _kernels.KERNELS
    )
    monkeypatch.setattr(_kernels, "KERNELS", bad)
    with pytest.raises(RuntimeError, match="not its signature"):
        build_library(tmp_path)


def test_guards_catch_an_out_of_bounds_gemm(host_rt):
    """The emulated GEMM refuses an operand that does not fit its array."""
    a = host_rt.xp.ones((3, 4), dtype=np.float64)
    c = host_rt.xp.zeros((3, 3), dtype=np.float64)
    with pytest.raises(ValueError, match="does not fit"):
        host_rt.gemm(False, True, 3, 3, 4, 1.0, a, 1, 4, a, 0, 4, 0.0, c, 0, 3)
