"""The CUDA backend's kernels and drivers executed on the host, compared with the reference.

No GPU needed: the unchanged .cu files are compiled as C++ with a shim for the CUDA built-ins,
and the drivers of fastrnn/_cuda run on a host runtime (NumPy arrays in guard margins, a GEMM with
cuBLAS's column-major argument rules) and on CupyRuntime itself with CuPy's and cuBLAS's entry
points emulated; see tests/cuda_host_emulation.py. This checks the kernels' arithmetic, their
grid-stride loops (tiny grids, so every thread loops), the kernel table's signatures, the
drivers' offsets, leading dimensions and launch arguments, and CupyRuntime's cuBLAS argument
order, pointer mode and stream. What it cannot check (NVRTC's code generation, CuPy's launch
and cuBLAS's own results) is covered by the NVRTC compile test and by the GPU tests
(tests/test_cuda_recurrent.py, tests/test_cuda_conv.py).
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
from cuda_host_emulation import (
    EmulatedCupyRuntime,
    HostRuntime,
    build_library,
    cell_constant,
    device_math,
)
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


@pytest.fixture(params=["host", "cupy-runtime", "cupy-runtime-graphs"])
def host_rt(request, host_lib):
    """The drivers on the host runtime, and on CupyRuntime itself with CuPy's and cuBLAS's
    entry points emulated (its own GEMM calls, pointer mode, stream and launch arguments),
    with CUDA graphs off and on (fresh arrays every call: the loops' keys are computed and
    looked up, the loops run eagerly; see test_cuda_graph_cache_captures_then_replays)."""
    if request.param == "host":
        rt = HostRuntime(host_lib)
    else:
        rt = EmulatedCupyRuntime(host_lib)
        rt.graphs = request.param.endswith("graphs")
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


def test_cell_table_matches_the_cells(host_lib):
    """The driver's cell table agrees with the C++ cells: every op's .cu file defines a cell
    with its gate count, and saved activations live apart (GRU) or in place of the gate sums
    (LSTM: as wide as them) or not at all (RNN)."""
    assert set(_kernels.CELLS) == {f"{op}.cu" for op in recurrent.CELLS}
    for op, cell in recurrent.CELLS.items():
        struct = _kernels.CELLS[f"{op}.cu"]
        assert cell_constant(host_lib, struct, "gates") == cell.gates, op
        acts = cell_constant(host_lib, struct, "acts")
        assert acts == cell.saved if cell.saved else acts in (0, cell.gates), op


@pytest.mark.parametrize("value,expected", [(None, True), ("1", True), ("0", False)])
def test_graphs_switch_is_read_at_call_time(host_lib, monkeypatch, value, expected):
    """FASTRNN_CUDA_GRAPHS is read when a loop runs, not when the runtime is made; an explicit
    runtime().graphs overrides it until set back to None."""
    rt = EmulatedCupyRuntime(host_lib)
    if value is None:
        monkeypatch.delenv("FASTRNN_CUDA_GRAPHS", raising=False)
    else:
        monkeypatch.setenv("FASTRNN_CUDA_GRAPHS", value)
    with use_runtime(rt):
        for _ in range(3):
            rt.xp.reuse_addresses()
            _graph_run(rt, "rnn", SHAPES[2], np.float64)
    assert (rt.graph_stats["replayed"] == 2) is expected, rt.graph_stats
    rt.graphs = not expected
    assert rt.graphs is (not expected)
    rt.graphs = None
    assert rt.graphs is expected


# ------------------------------------------------------------------------------------------------
# LSTM with projections
# ------------------------------------------------------------------------------------------------


def _projection_data(shape, dtype, seed=0):
    """An LSTM case with a projection of P = H // 2 features: inputs (in ORDER["lstm"] order,
    then w_hr), upstream gradients, lengths."""
    T, N, D, H, _ = shape
    P = H // 2
    d, grads, lens = _data("lstm", shape, dtype, seed)
    rng = np.random.default_rng(seed + 1)
    d["w_hh"] = (rng.standard_normal((4 * H, P)) * 0.7 / np.sqrt(P)).astype(dtype)
    d["w_hr"] = (rng.standard_normal((P, H)) * 0.9 / np.sqrt(H)).astype(dtype)
    d["h0"] = d["h0"][:, :P].copy()
    grads["dy"] = grads["dy"][:, :, :P].copy()
    grads["dhT"] = grads["dhT"][:, :P].copy()
    return d, grads, lens


PROJECTION_SHAPES = [s for s in SHAPES if s[3] >= 2]  # P = H // 2 >= 1


def _projection_both(rt, shape, dtype, *, with_state_grads=True, training=True):
    d, grads, lens = _projection_data(shape, dtype)
    args = [d[k] for k in ORDER["lstm"]]
    *outs, ctx = recurrent.lstm_forward(*(rt.to_device(a) for a in args), lens, training,
                                        rt.to_device(d["w_hr"]))  # fmt: skip
    a64 = [a.astype(np.float64) for a in args]
    *ref_outs, rctx = ref.lstm_forward(*a64, w_hr=d["w_hr"].astype(np.float64), lengths=lens)
    if not training:
        return outs, ref_outs, None, None, ctx
    up = [grads[k] if with_state_grads or k == "dy" else None for k in ("dy", "dhT", "dcT")]
    got = recurrent.lstm_backward(ctx, *(None if a is None else rt.to_device(a) for a in up))
    want = ref.lstm_backward(rctx, *(None if a is None else a.astype(np.float64) for a in up))
    return outs, ref_outs, got, want, ctx


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", PROJECTION_SHAPES, ids=_ids)
def test_lstm_projection_matches_reference(host_rt, shape, dtype):
    """The projection cell (r into the projection GEMM, recurrent_select, dr = dh W_hr, dw_hr)
    against the reference: y, hT (P features), cT (H), and the seven gradients."""
    outs, ref_outs, got, want, ctx = _projection_both(host_rt, shape, dtype)
    T, N, D, H, _ = shape
    assert ctx.grad_shapes == {"dy": (T, N, H // 2), "dhT": (N, H // 2), "dcT": (N, H)}
    for name, a, b in zip(("y", "hT", "cT"), outs, ref_outs, strict=True):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert_close(a, b, "recurrent", "forward", dtype, name=name)
    assert len(got) == 7
    for name, a, b in zip((*GRAD_NAMES["lstm"], "dw_hr"), got, want, strict=True):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert_close(a, b, "recurrent", "backward", dtype, name=name)
    names = {name for name, _, _ in host_rt.launches}
    assert "recurrent_select" in names


def test_lstm_projection_without_state_gradients_and_inference(host_rt):
    """dhT, dcT = None mean zeros; training=False gives the same outputs and no context."""
    shape = SHAPES[3]
    _, _, got, want, _ = _projection_both(host_rt, shape, np.float64, with_state_grads=False)
    for name, a, b in zip((*GRAD_NAMES["lstm"], "dw_hr"), got, want, strict=True):
        assert_close(a, b, "recurrent", "backward", np.float64, name=name)
    train = _projection_both(host_rt, shape, np.float64)[0]
    infer, _, _, _, ctx = _projection_both(host_rt, shape, np.float64, training=False)
    assert ctx is None
    for a, b in zip(train, infer, strict=True):
        np.testing.assert_array_equal(a, b)


def test_lstm_projection_graphs(host_lib):
    """The projection's loops (four calls per step) captured and replayed: bitwise the eager
    results."""
    rt = EmulatedCupyRuntime(host_lib)
    results = []
    with use_runtime(rt):
        for graphs in (False, True, True, True):
            rt.graphs = graphs
            rt.xp.reuse_addresses()
            outs, _, got, _, _ = _projection_both(rt, SHAPES[5], np.float32)
            results.append([np.array(a) for a in (*outs, *got)])
    assert rt.graph_stats["captured"] == 2 and rt.graph_stats["replayed"] == 4
    for res in results[1:]:
        for a, b in zip(res, results[0], strict=True):
            np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------
# saturating device math (csrc/common.cuh)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ctype,np_type", [("float", np.float32), ("double", np.float64)])
def test_gates_saturate_exactly(host_lib, ctype, np_type):
    """Past the saturation points a sigmoid is exactly 0 or 1 and a tanh exactly +-1 (where the
    true value underflows, the sigmoid is 0, not a subnormal); elsewhere both agree with the
    float64 / extended-precision values to a few ulp, and NaN passes through."""
    sigmoid = device_math(host_lib, "fr_sigmoid", ctype)
    tanh = device_math(host_lib, "fr_tanh", ctype)
    one, zero, t_one = {"float": (17.5, -87.34, 9.1), "double": (37.5, -708.4, 19.1)}[ctype]
    for a in (one + 1e-3, one + 1, 1e4, np.inf):
        assert sigmoid(a) == 1.0 and tanh(a) == 1.0 and tanh(-a) == -1.0, a
    for a in (zero - 1e-2, zero - 10, -1e4, -np.inf):
        assert sigmoid(a) == 0.0, a
    tiny = np.finfo(np_type).tiny
    for a in np.linspace(zero + 0.01, 0, 50):
        assert sigmoid(a) >= tiny, a  # normal, never a subnormal
    assert np.isnan(sigmoid(np.nan)) and np.isnan(tanh(np.nan))
    eps = np.finfo(np_type).eps
    for a in np.concatenate([np.linspace(-30, 30, 241), [one - 0.2, t_one - 0.05, zero + 1]]):
        want = np.float64(np.longdouble(1) / (1 + np.exp(-np.longdouble(a))))
        assert abs(sigmoid(a) - want) <= 4 * eps * max(want, tiny / eps), a
        assert abs(tanh(a) - np.tanh(np.longdouble(a))) <= 4 * eps * max(abs(np.tanh(a)), 1e-300)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_saturated_gates_give_exactly_zero_gradients(host_rt, dtype):
    """An LSTM whose i, f, o pre-activations are far past saturation: the saved gates are
    exactly 0 / 1 / 1 and the gradients of the gate pre-activations exactly 0 (not ~1e-38)."""
    shape = (3, 2, 4, 5, None)
    d, grads, _ = _data("lstm", shape, dtype)
    H = shape[3]
    # i: below the point where sigmoid underflows the dtype (float32: e^-95 ~ 5e-42 would be a
    # subnormal); f: past where 1 - sigmoid rounds away; o: far past.
    low = -95.0 if dtype == np.float32 else -750.0
    d["b"][:H], d["b"][H : 2 * H], d["b"][3 * H :] = low, 40.0, 1000.0
    dev = [host_rt.to_device(d[k]) for k in ORDER["lstm"]]
    *_, ctx = recurrent.lstm_forward(*dev, None, True)
    acts = np.array(ctx.saved["acts"])
    assert np.all(acts[..., :H] == 0) and np.all(acts[..., H : 2 * H] == 1)
    assert np.all(acts[..., 3 * H :] == 1)
    up = (host_rt.to_device(grads[k]) for k in ("dy", "dhT", "dcT"))
    _, _, dc0, _, _, db = recurrent.lstm_backward(ctx, *up)
    # i = 0 also stops g's gradient: every gate's gradient is exactly 0 ...
    np.testing.assert_array_equal(np.array(db), 0)
    # ... while the cell state passes it on through f = 1.
    assert np.all(np.array(dc0) != 0)


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
    """Every scalar parameter except the on/off flags is index_t (64-bit), so offsets such as
    t * N * 4H or n * C * H * W cannot overflow (the host build checks that the kernels take
    exactly these types)."""
    flags = {"save", "mode", "has_bias", "has_dhT"}
    for k in _kernels.KERNELS:
        for param, kind in zip(k.params, k.kinds, strict=True):
            if kind.endswith("*"):
                continue
            name = param.rsplit(" ", 1)[1]
            assert kind == ("int" if name in flags else "index_t"), (k.name, param)


def test_signature_check_catches_a_wrong_table(tmp_path, monkeypatch):
    """The static_assert of the host build fails when a table entry disagrees with the kernel
    (here: 'int N' where the kernel takes index_t), so a launch ABI mismatch cannot go unseen."""
    bad = tuple(
        dataclasses.replace(k, params=tuple("int N" if p == "index_t N" else p for p in k.params))
        if k.key == "recurrent_forward_step<RnnCell>"
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


# ------------------------------------------------------------------------------------------------
# conv2d and pooling
# ------------------------------------------------------------------------------------------------

# (N, C, H, W, F, (KH, KW), stride, padding, dilation, groups, bias)
CONV_CASES = [
    (2, 3, 7, 9, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, True),
    (1, 1, 5, 5, 1, (1, 1), (1, 1), (0, 0), (1, 1), 1, False),
    (2, 4, 8, 7, 6, (1, 1), (1, 1), (0, 0), (1, 1), 2, True),
    (2, 3, 9, 8, 5, (2, 3), (2, 1), (1, 0), (1, 1), 1, True),
    (1, 2, 11, 10, 3, (2, 2), (3, 3), (0, 0), (1, 1), 1, False),
    (2, 4, 9, 9, 4, (3, 3), (1, 1), (2, 2), (2, 2), 4, True),
    (3, 6, 6, 7, 4, (3, 2), (1, 2), (1, 1), (2, 1), 2, False),
    (2, 3, 5, 6, 6, (1, 1), (2, 2), (1, 1), (1, 1), 3, True),
    (1, 5, 13, 12, 3, (5, 4), (2, 2), (2, 1), (1, 1), 1, True),
    (2, 1, 4, 4, 2, (4, 4), (1, 1), (0, 0), (1, 1), 1, True),
    (3, 2, 12, 11, 3, (3, 3), (2, 3), (1, 2), (1, 2), 1, True),
    # the default split-K rule applies: RL = 800 -> 3 slices (267, 267, 266)
    (2, 16, 20, 20, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1, True),
]


def _conv_id(case) -> str:
    N, C, H, W, F, k, s, p, d, g, bias = case
    return f"N{N}C{C}H{H}W{W}F{F}k{k[0]}x{k[1]}s{s[0]}{s[1]}p{p[0]}{p[1]}d{d[0]}{d[1]}g{g}" + (
        "b" if bias else ""
    )


def _conv_data(case, dtype, seed=0):
    N, C, H, W, F, (KH, KW), s, p, d, g, bias = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C // g, KH, KW)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype) if bias else None
    return x, w, b, dict(stride=s, padding=p, dilation=d, groups=g)


def _conv_both(rt, case, dtype):
    from fastrnn._cuda import conv

    x, w, b, kw = _conv_data(case, dtype)
    dev = [None if a is None else rt.to_device(a) for a in (x, w, b)]
    y, ctx = conv.conv2d_forward(*dev, kw["stride"], kw["padding"], kw["dilation"],
                                 kw["groups"], True)  # fmt: skip
    assert ctx.backend == "cuda" and ctx.op == "conv2d" and ctx.grad_shapes["dy"] == y.shape
    dy = np.random.default_rng(1).standard_normal(y.shape).astype(dtype)
    got = conv.conv2d_backward(ctx, rt.to_device(dy))
    f64 = [None if a is None else a.astype(np.float64) for a in (x, w, b)]
    y_ref, rctx = ref.conv2d_forward(*f64, **kw)
    want = ref.conv2d_backward(rctx, dy.astype(np.float64))
    return y, y_ref, got, want


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_conv2d_matches_reference(host_rt, case, dtype):
    y, y_ref, got, want = _conv_both(host_rt, case, dtype)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, "conv", "forward", dtype, name="y")
    for name, a, b in zip(("dx", "dw", "db"), got, want, strict=True):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == dtype and a.shape == b.shape, name
        assert_close(a, b, "conv", "backward", dtype, name=name)


@pytest.mark.parametrize("budget_images", [1, 2])
def test_conv2d_chunks_of_images(host_rt, monkeypatch, budget_images):
    """A workspace of one or two images: several chunks, the last one short, dW accumulated
    over chunks."""
    from fastrnn._cuda import conv

    case = (5, 4, 6, 7, 6, (3, 3), (1, 2), (1, 1), (1, 1), 2, True)
    N, C, H, W, F, (KH, KW), s, p, d, g, _ = case
    OH = (H + 2 * p[0] - d[0] * (KH - 1) - 1) // s[0] + 1
    OW = (W + 2 * p[1] - d[1] * (KW - 1) - 1) // s[1] + 1
    per_image = (C * KH * KW + F) * OH * OW * 8
    monkeypatch.setattr(conv, "WORKSPACE_BYTES", budget_images * per_image)
    assert conv.images_per_chunk(N, per_image // 8, 8) == budget_images
    y, y_ref, got, want = _conv_both(host_rt, case, np.float64)
    assert_close(y, y_ref, "conv", "forward", np.float64, name="y")
    for name, a, b in zip(("dx", "dw", "db"), got, want, strict=True):
        assert_close(a, b, "conv", "backward", np.float64, name=name)


def test_conv2d_groups_are_one_batched_gemm_per_chunk(host_rt):
    """The groups of a chunk go through strided batched GEMMs (one call, not one per group)."""
    _conv_both(host_rt, CONV_CASES[5], np.float64)  # groups = 4, one chunk
    assert host_rt.batched_calls == 3  # forward C3, backward CB2 and CB3


def test_images_per_chunk_balances_the_chunks(monkeypatch):
    """The fewest chunks within the workspace, of equal size but the last."""
    from fastrnn._cuda import conv

    monkeypatch.setattr(conv, "WORKSPACE_BYTES", 31 * 100 * 4)  # 31 images of 100 floats
    assert conv.images_per_chunk(32, 100, 4) == 16  # 16 + 16, not 31 + 1
    assert conv.images_per_chunk(31, 100, 4) == 31
    assert conv.images_per_chunk(63, 100, 4) == 21
    assert conv.images_per_chunk(0, 100, 4) == 1
    assert conv.images_per_chunk(5, 10**6, 4) == 1  # one image over the budget still runs


def test_dw_slices_rule(monkeypatch):
    from fastrnn._cuda import conv

    # (32, 64, 56, 56, 64, 3): 1 x 5 output tiles, 97216 columns -> 53 slices of 1835.
    assert conv.dw_slices(1, 64, 576, 32 * 56 * 56, 4) == 53
    # (8, 128, 28, 28, 128, 3): 9 tiles want 30 slices, 6272 columns allow 24.
    assert conv.dw_slices(1, 128, 1152, 8 * 28 * 28, 4) == 24
    assert conv.dw_slices(1, 16, 144, 2 * 20 * 20, 8) == 3  # the last CONV_CASES row
    assert conv.dw_slices(1, 64, 576, 255, 4) == 1  # shorter than one slice
    assert conv.dw_slice_length(32 * 56 * 56, 53) == 1920  # 1894 aligned to 32: 52 + 512
    assert conv.dw_slice_length(8 * 28 * 28, 24) == 288  # 262 aligned: 21 slices + 224
    assert conv.dw_slice_length(1000, 1) == 1000
    assert conv.dw_slices(300, 2, 9, 10**6, 4) == 1  # enough tiles already
    monkeypatch.setattr(conv, "DW_PARTIAL_BYTES", 10 * 64 * 576 * 4)
    assert conv.dw_slices(1, 64, 576, 32 * 56 * 56, 4) == 10  # partials bounded


# (case, DW_TARGET_BLOCKS, DW_MIN_SLICE, DW_SLICE_ALIGN, workspace images or None,
#  per chunk: (S, slice length R, full slices, remainder), R = the whole chunk when S = 1)
SPLIT_CASES = [
    # one group, remainder slice: RL = 126 -> 4 slices of 26 + 22
    ((3, 4, 6, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, True), 5, 1, 1, None, [(5, 26, 4, 22)]),
    # the same, slices aligned to 8 elements: 3 slices of 32 + 30 (4 partials for S = 5)
    ((3, 4, 6, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, True), 5, 1, 8, None, [(5, 32, 3, 30)]),
    # two groups <= 4 slices: one GEMM per group batched over the slices, no remainder
    ((2, 4, 6, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2, False), 8, 1, 1, None, [(4, 18, 4, 0)]),
    # four groups > 3 slices: one GEMM per slice batched over the groups, then the remainder
    ((2, 4, 9, 9, 4, (3, 3), (1, 1), (2, 2), (2, 2), 4, True), 16, 1, 1, None, [(4, 41, 3, 39)]),
    # chunks of 2, 2, 1 images: 3 slices of 16 twice, then the last chunk straight into dW
    ((5, 4, 6, 7, 6, (3, 3), (1, 2), (1, 1), (1, 1), 2, True), 1000, 16, 4, 2,
     [(3, 16, 3, 0), (3, 16, 3, 0), (1, 24, 1, 0)]),
    # stride, dilation, no bias, 1x2 kernel; slices of 19 -> 20 (aligned to 4)
    ((2, 3, 12, 11, 5, (1, 2), (2, 1), (0, 1), (1, 2), 1, False), 7, 10, 4, None,
     [(7, 20, 6, 12)]),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("split", SPLIT_CASES, ids=lambda s: f"{_conv_id(s[0])}a{s[3]}")
def test_conv2d_split_k_weight_gradient(host_rt, monkeypatch, split, dtype):
    """dW through the split-K path (forced on tiny shapes): every orientation of the slice
    GEMMs, remainders, several chunks with different slice counts; checked against the
    reference, and the GEMMs issued are the ones the rule describes."""
    from fastrnn._cuda import conv

    case, target, min_slice, align, budget, chunks = split
    N, C, H, W, F, (KH, KW), s, p, d, g, _ = case
    OH = (H + 2 * p[0] - d[0] * (KH - 1) - 1) // s[0] + 1
    OW = (W + 2 * p[1] - d[1] * (KW - 1) - 1) // s[1] + 1
    K = C // g * KH * KW
    monkeypatch.setattr(conv, "DW_TARGET_BLOCKS", target)
    monkeypatch.setattr(conv, "DW_MIN_SLICE", min_slice)
    monkeypatch.setattr(conv, "DW_SLICE_ALIGN", align)
    if budget is not None:
        item = np.dtype(dtype).itemsize
        monkeypatch.setattr(conv, "WORKSPACE_BYTES", budget * (C * KH * KW + F) * OH * OW * item)
    calls = []
    loop_gemm = host_rt.loop_gemm

    def spy(transa, transb, M, N_, K_, *args, **kwargs):
        # (alpha, A, lda, B, ldb, beta, C, ldc, batch, ...)
        batch = args[8] if len(args) > 8 else kwargs.get("batch", 1)
        calls.append((transa, transb, M, N_, K_, batch))
        return loop_gemm(transa, transb, M, N_, K_, *args, **kwargs)

    monkeypatch.setattr(host_rt, "loop_gemm", spy)
    y, y_ref, got, want = _conv_both(host_rt, case, dtype)
    assert_close(y, y_ref, "conv", "forward", dtype, name="y")
    for name, a, b in zip(("dx", "dw", "db"), got, want, strict=True):
        if b is None:
            assert a is None, name
            continue
        assert_close(a, b, "conv", "backward", dtype, name=name)
    # The weight-gradient GEMMs: (Fg, K) products over slices, and the partial sums (M = 1).
    Fg = F // g
    cb2 = [c for c in calls if c[:4] == (False, True, Fg, K) or (c[2] == 1 and c[3] == F * K)]
    expect = []
    for S, R, full, rem in chunks:
        if S == 1:
            expect.append((False, True, Fg, K, R, g))  # R = the chunk's RL
            continue
        if g <= full:
            expect += [(False, True, Fg, K, R, full)] * g
        else:
            expect += [(False, True, Fg, K, R, g)] * full
        if rem:
            expect.append((False, True, Fg, K, rem, g))
        expect.append((False, False, 1, F * K, full + (rem > 0), 1))
    assert cb2 == expect


def test_conv2d_backward_reuses_the_forward_columns_once(host_rt):
    """One chunk: the first backward reads the forward's columns (no im2col), a second
    backward on the same context recomputes them; both match the reference. Several chunks:
    nothing is kept."""
    from fastrnn._cuda import conv

    case = CONV_CASES[3]  # stride (2, 1), padding (1, 0), 2x3 kernel
    x, w, b, kw = _conv_data(case, np.float64)
    dev = [host_rt.to_device(a) for a in (x, w, b)]
    args = (kw["stride"], kw["padding"], kw["dilation"], kw["groups"], True)
    y, ctx = conv.conv2d_forward(*dev, *args)
    assert "cols" in ctx.saved
    dy = np.random.default_rng(1).standard_normal(y.shape)
    y_ref, rctx = ref.conv2d_forward(x, w, b, **kw)
    want = ref.conv2d_backward(rctx, dy)
    for expect_im2col in (0, 1):
        before = len(host_rt.launches)
        got = conv.conv2d_backward(ctx, host_rt.to_device(dy))
        names = [launch[0] for launch in host_rt.launches[before:]]
        assert names.count("im2col") == expect_im2col, names
        assert "cols" not in ctx.saved
        for name, a, r in zip(("dx", "dw", "db"), got, want, strict=True):
            assert_close(a, r, "conv", "backward", np.float64, name=name)


def test_conv2d_keeps_no_columns_over_several_chunks(host_rt, monkeypatch):
    from fastrnn._cuda import conv

    monkeypatch.setattr(conv, "WORKSPACE_BYTES", 1)  # one image per chunk
    x, w, b, kw = _conv_data(CONV_CASES[0], np.float64)
    dev = [host_rt.to_device(a) for a in (x, w, b)]
    y, ctx = conv.conv2d_forward(*dev, kw["stride"], kw["padding"], kw["dilation"], 1, True)
    assert "cols" not in ctx.saved
    _, no_ctx = conv.conv2d_forward(*dev, kw["stride"], kw["padding"], kw["dilation"], 1, False)
    assert no_ctx is None


# (N, C, H, W, F, groups, dilation, bias, images per round of dW partials)
POINTWISE_CASES = [
    (3, 4, 5, 6, 6, 1, (1, 1), True, None),  # groups <= images: batched over the images
    (2, 6, 4, 5, 9, 3, (2, 3), False, None),  # groups > images: batched over the groups
    (5, 4, 3, 7, 4, 2, (1, 1), True, 2),  # dW partials in rounds of 2, 2, 1 images
    (1, 1, 1, 1, 1, 1, (1, 1), True, None),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", POINTWISE_CASES, ids=str)
def test_conv2d_pointwise_path(host_rt, monkeypatch, case, dtype):
    """1x1, stride 1, no padding: GEMMs straight on NCHW, no kernel launched at all."""
    from fastrnn._cuda import conv

    N, C, H, W, F, g, d, bias, rounds = case
    monkeypatch.setattr(conv, "POINTWISE_MIN_L", 1)
    if rounds is not None:
        item = np.dtype(dtype).itemsize
        monkeypatch.setattr(conv, "DW_PARTIAL_BYTES", rounds * F * (C // g) * item)
    full = (N, C, H, W, F, (1, 1), (1, 1), (0, 0), d, g, bias)
    before = len(host_rt.launches)
    y, y_ref, got, want = _conv_both(host_rt, full, dtype)
    assert host_rt.launches[before:] == []
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, "conv", "forward", dtype, name="y")
    for name, a, b in zip(("dx", "dw", "db"), got, want, strict=True):
        if b is None:
            assert a is None, name
            continue
        assert_close(a, b, "conv", "backward", dtype, name=name)


def test_conv2d_pointwise_rule(monkeypatch):
    from fastrnn._cuda import conv

    def geometry(k, s, p, d, HW):
        return (3, HW, HW, k, k, HW, HW, s, s, p, p, d, d)

    assert conv._is_pointwise(geometry(1, 1, 0, 2, 16))  # 256 positions, any dilation
    assert not conv._is_pointwise(geometry(1, 1, 0, 1, 15))  # too few positions
    assert not conv._is_pointwise(geometry(1, 2, 0, 1, 16))
    assert not conv._is_pointwise(geometry(1, 1, 1, 1, 16))
    assert not conv._is_pointwise(geometry(3, 1, 1, 1, 16))


def test_col2im_is_exact_for_non_overlapping_taps(host_rt):
    """With stride = kernel and no padding every input element is read once: col2im must
    return exactly the column entries (bitwise), so the gather indexing is exact."""
    from fastrnn._cuda import conv

    x = host_rt.to_device(np.random.default_rng(0).standard_normal((2, 3, 6, 9)))
    w = host_rt.to_device(np.eye(27).reshape(27, 3, 3, 3))  # identity filters
    y, ctx = conv.conv2d_forward(x, w, None, (3, 3), (0, 0), (1, 1), 1, True)
    dx, dw, db = conv.conv2d_backward(ctx, y)
    np.testing.assert_array_equal(dx, x)  # w^T w = I, so dx = x exactly


# (N, C, H, W, kernel, stride, padding)
POOL_CASES = [
    (2, 3, 8, 8, (2, 2), (2, 2), (0, 0)),
    (1, 2, 7, 9, (3, 3), (2, 2), (1, 1)),
    (2, 1, 5, 6, (3, 2), (1, 1), (1, 1)),
    (1, 4, 9, 7, (2, 3), (3, 2), (1, 0)),
    (3, 2, 6, 6, (3, 3), (1, 1), (0, 0)),
    (1, 1, 4, 4, (4, 4), (4, 4), (2, 2)),
    (2, 5, 11, 10, (5, 3), (2, 3), (2, 1)),
]


def _pool_id(case) -> str:
    N, C, H, W, k, s, p = case
    return f"N{N}C{C}H{H}W{W}k{k[0]}x{k[1]}s{s[0]}{s[1]}p{p[0]}{p[1]}"


def _pool_both(rt, op, x, case, dy_seed=1):
    from fastrnn._cuda import conv

    _, _, _, _, k, s, p = case
    y, ctx = getattr(conv, f"{op}_forward")(rt.to_device(x), k, s, p, True)
    assert ctx.backend == "cuda" and ctx.op == op and ctx.grad_shapes["dy"] == y.shape
    dy = np.random.default_rng(dy_seed).standard_normal(y.shape).astype(x.dtype)
    dx = getattr(conv, f"{op}_backward")(ctx, rt.to_device(dy))
    y_ref, rctx = getattr(ref, f"{op}_forward")(x.astype(np.float64), k, s, p)
    dx_ref = getattr(ref, f"{op}_backward")(rctx, dy.astype(np.float64))
    return y, y_ref, dx, dx_ref


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", POOL_CASES, ids=_pool_id)
@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d"])
def test_pool_matches_reference(host_rt, op, case, dtype):
    N, C, H, W = case[:4]
    x = np.random.default_rng(0).standard_normal((N, C, H, W)).astype(dtype)
    y, y_ref, dx, dx_ref = _pool_both(host_rt, op, x, case)
    assert y.dtype == dtype and y.shape == y_ref.shape and dx.shape == x.shape
    assert_close(y, y_ref, "pool", "forward", dtype, name="y")
    assert_close(dx, dx_ref, "pool", "backward", dtype, name="dx")


@pytest.mark.parametrize("case", POOL_CASES[:4], ids=_pool_id)
def test_max_pool_ties_nan_and_infinities(host_rt, case):
    """Ties (integers), -inf everywhere in some windows, NaNs: the same maxima and the same
    winning taps as the reference (its gradient lands on the same element)."""
    N, C, H, W = case[:4]
    rng = np.random.default_rng(3)
    x = rng.integers(-2, 3, size=(N, C, H, W)).astype(np.float64)
    x[0, 0, :3, :3] = -np.inf
    x[-1, -1, 1, 1] = np.nan
    x[-1, -1, 2, 0] = np.nan
    y, y_ref, dx, dx_ref = _pool_both(host_rt, "max_pool2d", x, case)
    np.testing.assert_array_equal(y, y_ref)  # NaN == NaN for assert_array_equal
    np.testing.assert_array_equal(dx, dx_ref)


def test_pool_inference_saves_nothing(host_rt):
    from fastrnn._cuda import conv

    x = host_rt.to_device(np.random.default_rng(0).standard_normal((2, 3, 6, 6)))
    for op in ("max_pool2d", "avg_pool2d"):
        y, ctx = getattr(conv, f"{op}_forward")(x, (2, 2), (2, 2), (0, 0), False)
        assert ctx is None
        y_ref, _ = getattr(ref, f"{op}_forward")(np.asarray(x), 2, 2, 0)
        assert_close(y, y_ref, "pool", "forward", np.float64)


def test_cupy_runtime_cublas_calls(host_lib):
    """CupyRuntime issues one cuBLAS call per GEMM of the algorithm (1 input projection + T
    recurrent forward; T recurrent backward + 3 weight/input + 1 bias), each in host pointer
    mode on the current stream, and leaves the handle's pointer mode and stream as it found
    them."""
    rt = EmulatedCupyRuntime(host_lib)
    T, N, D, H = 4, 3, 5, 6
    steps = T
    with use_runtime(rt):
        d, grads, lens = _data("lstm", (T, N, D, H, "mixed"), np.float64)
        args = [rt.to_device(d[k]) for k in ORDER["lstm"]]
        *_, ctx = recurrent.lstm_forward(*args, lens, True)
        assert rt.fake_cublas.calls == 1 + steps
        recurrent.lstm_backward(ctx, rt.to_device(grads["dy"]), None, None)
        assert rt.fake_cublas.calls == 1 + steps + T + 3 + 1
    kernels = {name for name, _, _ in rt.launches}
    assert kernels == {"recurrent_forward_step<LstmCell>", "recurrent_backward_step<LstmCell>",
                       "recurrent_seed"}  # fmt: skip
    assert rt.fake_cublas.mode == rt.fake_cublas.CUBLAS_POINTER_MODE_DEVICE
    assert rt.fake_cublas.stream == 0  # and its stream


def test_cuda_graph_cache_captures_then_replays(host_lib):
    """With graphs on, a time loop run again with the same arguments (the same device
    addresses) is captured on a private stream -- recorded, not run -- then launched, and
    replayed from then on; every run gives the eager run's results bitwise. A loop whose
    arguments differ is not replayed."""
    rt = EmulatedCupyRuntime(host_lib)
    rt.graphs = True
    T, N, D, H = 5, 3, 4, 7
    d, _, lens = _data("gru", (T, N, D, H, "mixed"), np.float64)
    xp, G, NH = rt.xp, 3 * H, N * H
    with use_runtime(rt):
        x, h0, w_ih, w_hh, b_ih, b_hh = (rt.to_device(d[k]) for k in ORDER["gru"])
        lens_d = rt.to_device(lens)
        xw = xp.empty((T, N, G), dtype=np.float64)
        rt.gemm(False, True, T * N, G, D, 1.0, x, 0, D, w_ih, 0, D, 0.0, xw, 0, G)
        hs = xp.empty((T + 1, N, H), dtype=np.float64)
        hs[0] = h0
        y, acts = xp.empty((T, N, H)), xp.empty((T, N, 4 * H))
        hw = xp.empty((N, G))

        def loop(steps_run):
            gemm = rt.loop_gemm(False, True, N, G, H, 1.0, hs, H, w_hh, H, 0.0, hw, G)
            step = rt.loop_launch(
                "recurrent_forward_step<GruCell>", np.dtype(np.float64), NH,
                (xw, hw, b_ih, b_hh, hs, hs, y, acts, lens_d, 0, 0, 0, N, H, 1, 0),
                ("t", "src", "dst"),
            )  # fmt: skip

            def calls():
                return [c for t in range(steps_run)
                        for c in (gemm.bind(t * N * H, 0, 0), step.bind(t, t, t + 1))]  # fmt: skip

            rt.time_loop(("gru", steps_run, N, H), [gemm, step], calls)

        def run():
            y[...] = np.nan
            loop(T)
            return y.copy()

        first = run()
        assert rt.graph_stats == {"eager": 1, "captured": 0, "replayed": 0, "capture_failed": 0,
                                  "last_capture_error": None}  # fmt: skip
        second = run()
        assert rt.graph_stats["captured"] == 1
        calls = rt.fake_cublas.calls
        third = run()
        assert rt.graph_stats["replayed"] == 1
        assert rt.fake_cublas.calls == calls  # a replay makes no cuBLAS call from the host
        for out in (second, third):
            np.testing.assert_array_equal(out, first)
        y_ref, _, _ = ref.gru_forward(*(d[k] for k in ORDER["gru"]), lengths=lens)
        assert_close(first, y_ref, "recurrent", "forward", np.float64)
        # other arguments (a different step count): not the cached graph
        loop(T - 1)
        assert rt.graph_stats["replayed"] == 1 and rt.graph_stats["eager"] == 2
    assert rt.fake_cublas.stream == 0  # the handle's stream is restored after the capture


def _graph_run(rt, op, case, dtype):
    """One forward + backward of ``op`` on fixed host inputs; host copies of every result."""
    from fastrnn._cuda import conv

    if op == "conv2d":
        x, w, b, kw = _conv_data(case, dtype)
        dev = [rt.to_device(a) for a in (x, w, b)]
        y, ctx = conv.conv2d_forward(*dev, kw["stride"], kw["padding"], kw["dilation"],
                                     kw["groups"], True)  # fmt: skip
        dy = np.random.default_rng(1).standard_normal(y.shape).astype(dtype)
        return [_copy(a) for a in (y, *conv.conv2d_backward(ctx, rt.to_device(dy)))]
    d, grads, lens = _data(op, case, dtype)
    extra = ("tanh",) if op == "rnn" else ()
    *outs, ctx = getattr(recurrent, f"{op}_forward")(
        *(rt.to_device(d[k]) for k in ORDER[op]), *extra, lens, True
    )
    up = [rt.to_device(grads[k]) for k in ("dy", "dhT", "dcT")[: 3 if op == "lstm" else 2]]
    return [_copy(a) for a in (*outs, *getattr(recurrent, f"{op}_backward")(ctx, *up))]


def _copy(a):
    return None if a is None else np.array(a)


@pytest.mark.parametrize(
    "op,case",
    [("lstm", SHAPES[3]), ("gru", SHAPES[2]), ("rnn", SHAPES[3]), ("conv2d", CONV_CASES[5])],
    ids=["lstm", "gru", "rnn", "conv2d"],
)
def test_cuda_graphs_through_the_drivers(host_lib, op, case):
    """The drivers with graphs on and allocations that come back at the same addresses (as
    CuPy's pool does): run 1 eager, run 2 captured (recorded while nothing runs, then
    launched), runs 3-4 replayed; all bitwise equal to the eager run with graphs off."""
    rt = EmulatedCupyRuntime(host_lib)
    with use_runtime(rt):
        eager = _graph_run(rt, op, case, np.float64)
        rt.graphs = True
        runs = []
        for _ in range(4):
            rt.xp.reuse_addresses()
            runs.append(_graph_run(rt, op, case, np.float64))
    assert rt.graph_stats["captured"] == 2, rt.graph_stats  # forward and backward
    assert rt.graph_stats["replayed"] == 4, rt.graph_stats
    assert rt.graph_stats["capture_failed"] == 0
    for run in runs:
        for a, b in zip(run, eager, strict=True):
            assert (a is None) == (b is None)
            if b is not None:
                np.testing.assert_array_equal(a, b)


def test_cupy_cublas_wrappers_refuse_a_capturing_stream(host_lib, monkeypatch):
    """What made every capture fail on the GPU (CuPy 14): CuPy's cuBLAS wrappers set the
    handle's stream to the current one first, and CuPy's setStream raises for a capturing
    stream. The emulation does the same, and CupyRuntime captures its GEMMs through direct
    cuBLAS calls with a user workspace, restoring the handle afterwards."""
    rt = EmulatedCupyRuntime(host_lib)
    s = rt.fake_cuda.Stream(non_blocking=True)
    with s:
        s.begin_capture()
        with pytest.raises(NotImplementedError, match="stream capture"):
            rt.fake_cublas.sgemm(0x1234, 0, 0, 1, 1, 1, 0, 0, 1, 0, 1, 0, 0, 1)
        s.end_capture()
    with use_runtime(rt):
        rt.graphs = True
        eager = _graph_run(rt, "lstm", SHAPES[2], np.float64)
        for _ in range(3):
            rt.xp.reuse_addresses()
            run = _graph_run(rt, "lstm", SHAPES[2], np.float64)
            for a, b in zip(run, eager, strict=True):
                np.testing.assert_array_equal(a, b)
    assert rt.graph_stats["captured"] == 2 and rt.graph_stats["capture_failed"] == 0
    assert rt.graph_stats["last_capture_error"] is None
    assert rt.fake_direct.calls == 2 * SHAPES[2][0]  # every step's GEMM, forward and backward
    blas = rt.fake_cublas
    assert (blas.stream, blas.mode, blas.workspace) == (0, blas.CUBLAS_POINTER_MODE_DEVICE, None)


def test_capture_failure_falls_back_to_eager_and_says_why(host_lib, caplog):
    """Without the direct cuBLAS entry points a loop cannot be captured: it runs eagerly, with
    the same results, the failure is counted, its text kept and logged, and it is not retried
    for that loop."""
    rt = EmulatedCupyRuntime(host_lib)
    rt.blas.direct_lib = None
    rt.blas.direct_error = "RuntimeError: the cuBLAS library CuPy uses was not found"
    with use_runtime(rt):
        rt.graphs = False
        eager = _graph_run(rt, "gru", SHAPES[3], np.float64)
        rt.graphs = True
        with caplog.at_level("WARNING", logger="fastrnn.cuda"):
            for _ in range(4):
                rt.xp.reuse_addresses()
                run = _graph_run(rt, "gru", SHAPES[3], np.float64)
                for a, b in zip(run, eager, strict=True):
                    np.testing.assert_array_equal(a, b)
    stats = rt.graph_stats
    assert stats["captured"] == 0 and stats["replayed"] == 0
    assert stats["capture_failed"] == 2  # forward and backward, once each
    assert "cuBLAS library" in stats["last_capture_error"]
    assert sum("CUDA graph capture failed" in r.getMessage() for r in caplog.records) == 1


def test_failed_body_leaves_nothing_captured_or_run(host_lib, monkeypatch):
    """A call that fails half-way through a capture: nothing it recorded runs, the stream
    stops capturing, the handle is restored, and the loop then runs eagerly (correctly)."""
    rt = EmulatedCupyRuntime(host_lib)
    with use_runtime(rt):
        eager = _graph_run(rt, "rnn", SHAPES[3], np.float64)
        direct = rt.fake_direct
        real = direct.gemm[np.dtype(np.float64)]
        calls = [0]

        def flaky(*args):
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("cuBLAS status 14")
            real(*args)

        rt.blas.capture_fns = {}  # rebuilt from the patched entry point
        direct.gemm[np.dtype(np.float64)] = flaky
        for _ in range(3):
            rt.xp.reuse_addresses()
            run = _graph_run(rt, "rnn", SHAPES[3], np.float64)
            for a, b in zip(run, eager, strict=True):
                np.testing.assert_array_equal(a, b)
    assert rt.graph_stats["capture_failed"] == 1 and rt.graph_stats["captured"] == 1
    assert "status 14" in rt.graph_stats["last_capture_error"]
    assert all(s.recording is None for s in rt.fake_cuda.streams.values())
    assert rt.fake_cublas.stream == 0 and rt.fake_cublas.workspace is None


def test_loop_calls_are_kept_and_launch_arguments_packed(host_lib, monkeypatch):
    """Graphs off: a loop run again with the same arrays reuses its bound calls (nothing is
    bound again), and its launches get CuPy CPointer arguments (addresses and exact C scalars,
    decoded by the emulation as cuLaunchKernel would read them)."""
    rt = EmulatedCupyRuntime(host_lib)
    rt.graphs = False
    binds = [0]
    real_launch = rt.loop_launch

    def counting(*args, **kw):
        step = real_launch(*args, **kw)
        bind = step.bind

        def counted(*values):
            binds[0] += 1
            return bind(*values)

        step.bind = counted
        return step

    monkeypatch.setattr(rt, "loop_launch", counting)
    T = SHAPES[3][0]
    with use_runtime(rt):
        rt.xp.reuse_addresses()
        first = _graph_run(rt, "lstm", SHAPES[3], np.float32)
        assert binds[0] == 2 * T and rt.packed_launches == 2 * T + 1  # + the argument probe
        rt.xp.reuse_addresses()
        second = _graph_run(rt, "lstm", SHAPES[3], np.float32)
    assert binds[0] == 2 * T  # the kept calls
    assert rt.packed_launches == 4 * T + 1
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_conv2d_loops_are_recorded_once(host_lib, monkeypatch):
    """conv2d goes through the same time-loop API as the recurrent ops: its calls are recorded
    (Runtime.record) the first time a key is seen and kept; a call with the same arrays runs
    the kept calls (graphs off), with the same results."""
    rt = EmulatedCupyRuntime(host_lib)
    rt.graphs = False
    recorded = [0]
    real_record = rt.record

    def counting(body):
        recorded[0] += 1
        return real_record(body)

    monkeypatch.setattr(rt, "record", counting)
    with use_runtime(rt):
        rt.xp.reuse_addresses()
        first = _graph_run(rt, "conv2d", CONV_CASES[0], np.float64)
        assert recorded[0] == 2  # forward and backward
        rt.xp.reuse_addresses()
        second = _graph_run(rt, "conv2d", CONV_CASES[0], np.float64)
    assert recorded[0] == 2 and rt.graph_stats["eager"] == 4
    for a, b in zip(first, second, strict=True):
        if b is not None:
            np.testing.assert_array_equal(a, b)


def test_cupy_without_cpointer_arguments(host_lib):
    """A CuPy whose kernel call refuses CPointer arguments: the one probe launch (which would
    touch nothing) says so, and launches take arrays and NumPy scalars; same results."""
    results = []
    for legacy in (False, True):
        rt = EmulatedCupyRuntime(host_lib, legacy_cupy=legacy)
        with use_runtime(rt):
            results.append(_graph_run(rt, "gru", SHAPES[2], np.float64))
        assert rt.kernels.packed_args is (not legacy)
        assert (rt.packed_launches > 0) is (not legacy)
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_different_array_size_is_a_different_loop(host_lib):
    """The loop key holds every array's address and size: arrays at the same addresses with
    other sizes (here: fewer state slots, inference) never reuse a kept loop or graph."""
    rt = EmulatedCupyRuntime(host_lib)
    xp = rt.xp
    xp.reuse_addresses()
    hs, w, pre = xp.empty((3, 2, 3)), xp.empty((8, 3)), xp.empty((4, 2, 8))
    first = rt.loop_gemm(False, True, 2, 8, 3, 1.0, hs, 3, w, 3, 1.0, pre, 8).signature
    xp.reuse_addresses()
    hs2, w2, pre2 = xp.empty((3, 2, 3)), xp.empty((8, 3)), xp.empty((4, 2, 8))
    assert rt.ptr(hs2) == rt.ptr(hs)
    again = rt.loop_gemm(False, True, 2, 8, 3, 1.0, hs2, 3, w2, 3, 1.0, pre2, 8).signature
    assert again == first
    smaller = hs2[:2]  # the same address, fewer slots
    other = rt.loop_gemm(False, True, 2, 8, 3, 1.0, smaller, 3, w2, 3, 1.0, pre2, 8).signature
    assert other != first


@pytest.mark.parametrize("value,expected", [(None, True), ("1", True), ("0", False)])
def test_graphs_switch(host_lib, monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("FASTRNN_CUDA_GRAPHS", raising=False)
    else:
        monkeypatch.setenv("FASTRNN_CUDA_GRAPHS", value)
    assert EmulatedCupyRuntime(host_lib).graphs is expected


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("op", ["lstm", "gru", "rnn"])
def test_graphs_match_reference(host_lib, op, shape, dtype):
    """Every shape on CupyRuntime with graphs on and the same addresses every call (eager,
    captured, replayed), against the reference."""
    rt = EmulatedCupyRuntime(host_lib)
    rt.graphs = True
    with use_runtime(rt):
        for _ in range(3):
            rt.xp.reuse_addresses()
            outs, ref_outs, got, want, _ = _run_both(rt, op, shape, dtype)
            for a, r in zip(outs, ref_outs, strict=True):
                assert_close(a, r, "recurrent", "forward", dtype, name=op)
            for name, a, r in zip(GRAD_NAMES[op], got, want, strict=True):
                assert_close(a, r, "recurrent", "backward", dtype, name=f"{op} {name}")
    assert rt.graph_stats["replayed"] == 2 and rt.graph_stats["capture_failed"] == 0


_FAKE_CUBLAS = r"""
// The C signatures DirectCublas declares (cublas_api.h), recording what arrives.
#include <stddef.h>
#include <stdint.h>
extern "C" {
int64_t fr_seen[20];
int fr_status = 0;
static int rec(int n, const int64_t* v) {
    for (int i = 0; i < n; ++i) fr_seen[i] = v[i];
    return fr_status;
}
#define P(x) (int64_t)(intptr_t)(x)
int cublasSgemm_v2(void* h, int ta, int tb, int m, int n, int k, const float* al,
                   const float* A, int lda, const float* B, int ldb, const float* be, float* C,
                   int ldc) {
    int64_t v[] = {P(h), ta, tb, m, n, k, P(al), P(A), lda, P(B), ldb, P(be), P(C), ldc};
    return rec(14, v);
}
int cublasDgemm_v2(void* h, int ta, int tb, int m, int n, int k, const double* al,
                   const double* A, int lda, const double* B, int ldb, const double* be,
                   double* C, int ldc) {
    int64_t v[] = {P(h), ta, tb, m, n, k, P(al), P(A), lda, P(B), ldb, P(be), P(C), ldc};
    return rec(14, v);
}
int cublasSgemmStridedBatched(void* h, int ta, int tb, int m, int n, int k, const float* al,
                              const float* A, int lda, long long sa, const float* B, int ldb,
                              long long sb, const float* be, float* C, int ldc, long long sc,
                              int batch) {
    int64_t v[] = {P(h), ta, tb, m, n, k, P(al), P(A), lda, sa, P(B), ldb, sb, P(be), P(C),
                   ldc, sc, batch};
    return rec(18, v);
}
int cublasDgemmStridedBatched(void* h, int ta, int tb, int m, int n, int k, const double* al,
                              const double* A, int lda, long long sa, const double* B, int ldb,
                              long long sb, const double* be, double* C, int ldc, long long sc,
                              int batch) {
    int64_t v[] = {P(h), ta, tb, m, n, k, P(al), P(A), lda, sa, P(B), ldb, sb, P(be), P(C),
                   ldc, sc, batch};
    return rec(18, v);
}
int cublasSetStream_v2(void* h, void* s) {
    int64_t v[] = {P(h), P(s)};
    return rec(2, v);
}
int cublasSetWorkspace_v2(void* h, void* w, size_t n) {
    int64_t v[] = {P(h), P(w), (int64_t)n};
    return rec(3, v);
}
}
"""


def test_direct_cublas_passes_c_arguments_intact(tmp_path):
    """DirectCublas's ctypes declarations against a library with cuBLAS's C signatures:
    64-bit addresses, ints and long long strides arrive intact; a non-zero status raises."""
    import ctypes
    import subprocess

    from fastrnn._cuda._cublas import CublasError, DirectCublas

    cxx = next(shutil.which(c) for c in ("g++", "c++", "clang++") if shutil.which(c))
    src, lib_path = tmp_path / "fake_cublas.cpp", tmp_path / "libfake_cublas.so"
    src.write_text(_FAKE_CUBLAS)
    subprocess.run([cxx, "-shared", "-fPIC", "-O0", str(src), "-o", str(lib_path)], check=True)
    lib = ctypes.CDLL(str(lib_path))
    seen = (ctypes.c_int64 * 20).in_dll(lib, "fr_seen")
    d = DirectCublas(lib)
    big = [0x7F12_3456_7800 + 256 * i for i in range(6)]  # above 2^32: must not be truncated
    for dtype in (np.float32, np.float64):
        args = (big[0], 1, 0, 7, 9, 11, big[1], big[2], 13, big[3], 15, big[4], big[5], 17)
        d.gemm[np.dtype(dtype)](*args)
        assert list(seen[:14]) == list(args)
        args = (big[0], 0, 1, 3, 4, 5, big[1], big[2], 6, 2**40, big[3], 7, 0, big[4], big[5],
                8, 3 * 2**33, 12)  # fmt: skip
        d.gemm_batched[np.dtype(dtype)](*args)
        assert list(seen[:18]) == list(args)
    d.set_stream(big[0], 0)
    assert list(seen[:2]) == [big[0], 0]
    d.set_workspace(big[0], big[1], 32 << 20)
    assert list(seen[:3]) == [big[0], big[1], 32 << 20]
    ctypes.c_int.in_dll(lib, "fr_status").value = 14
    with pytest.raises(CublasError, match="cublasSetStream_v2 returned cuBLAS status 14"):
        d.set_stream(big[0], big[1])


def test_missing_cublas_library_is_a_clear_error(monkeypatch):
    import ctypes

    from fastrnn._cuda import _cublas

    def refuse(path, *a, **k):
        raise OSError(f"{path}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", refuse)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(RuntimeError, match="cuBLAS library CuPy uses was not found"):
        _cublas.load_cublas()
