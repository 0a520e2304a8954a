"""The CUDA backend of the recurrent ops on a GPU: every op against the reference, float32 and
float64, awkward sizes, lengths, grids smaller than the work (grid-stride loops wrap), bitwise
determinism, and the errors of mixing array kinds. Skipped (visibly) without a GPU."""

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

# (T, N, D, H, lengths)
SHAPES = [
    (1, 1, 1, 1, None),
    (7, 3, 5, 13, "mixed"),
    (5, 8, 33, 65, None),
    (4, 17, 3, 129, "mixed"),
    (3, 2, 1, 257, "ones"),
    (2, 1100, 8, 1000, "mixed"),  # N*H > MAX_BLOCKS * BLOCK: one launch grid is not enough
]

ORDER = {
    "lstm": ("x", "h0", "c0", "w_ih", "w_hh", "b"),
    "gru": ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"),
    "rnn": ("x", "h0", "w_ih", "w_hh", "b"),
}
GRADS = {
    "lstm": ("dx", "dh0", "dc0", "dw_ih", "dw_hh", "db"),
    "gru": ("dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"),
    "rnn": ("dx", "dh0", "dw_ih", "dw_hh", "db"),
}
STATE_GRADS = {"lstm": ("dhT", "dcT"), "gru": ("dhT",), "rnn": ("dhT",)}


def _ids(shape) -> str:
    T, N, D, H, lens = shape
    return f"T{T}N{N}D{D}H{H}{'-' + lens if lens else ''}"


@pytest.fixture(autouse=True)
def checked_runtime():
    """Every GEMM operand's extent is checked against its array during these tests."""
    from fastrnn._cuda._runtime import runtime

    rt = runtime()
    rt.check_bounds = True
    yield rt
    rt.check_bounds = False


def _data(op, shape, dtype, seed=0):
    T, N, D, H, kind = shape
    rng = np.random.default_rng(seed)
    G = {"lstm": 4, "gru": 3, "rnn": 1}[op] * H
    s = 0.7 / np.sqrt(H)
    d = dict(
        x=rng.standard_normal((T, N, D)),
        h0=rng.standard_normal((N, H)) * 0.5,
        c0=rng.standard_normal((N, H)) * 0.5,
        w_ih=rng.standard_normal((G, D)) * s,
        w_hh=rng.standard_normal((G, H)) * s,
        b=rng.standard_normal(G) * 0.3,
        b_ih=rng.standard_normal(G) * 0.3,
        b_hh=rng.standard_normal(G) * 0.3,
        dy=rng.standard_normal((T, N, H)),
        dhT=rng.standard_normal((N, H)),
        dcT=rng.standard_normal((N, H)),
    )
    d = {k: v.astype(dtype) for k, v in d.items()}
    lens = None
    if kind == "ones":
        lens = np.ones(N, dtype=np.int64)
    elif kind == "mixed":
        lens = rng.integers(1, T + 1, size=N)
        lens[0] = T
    return d, lens


def _run(op, d, lens, xp, nonlinearity="tanh"):
    args = [xp.asarray(d[k]) for k in ORDER[op]]
    kw = dict(lengths=lens)
    if op == "rnn":
        kw["nonlinearity"] = nonlinearity
    *outs, ctx = getattr(fr, f"{op}_forward")(*args, **kw)
    up = [xp.asarray(d[k]) for k in STATE_GRADS[op]]
    grads = getattr(fr, f"{op}_backward")(ctx, xp.asarray(d["dy"]), *up)
    return outs, grads, ctx


def _reference(op, d, lens, nonlinearity="tanh"):
    d64 = {k: v.astype(np.float64) for k, v in d.items()}
    kw = dict(lengths=lens)
    if op == "rnn":
        kw["nonlinearity"] = nonlinearity
    *outs, ctx = getattr(ref, f"{op}_forward")(*[d64[k] for k in ORDER[op]], **kw)
    grads = getattr(ref, f"{op}_backward")(ctx, d64["dy"], *[d64[k] for k in STATE_GRADS[op]])
    return outs, grads


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("op", ["lstm", "gru", "rnn"])
def test_matches_reference(op, shape, dtype):
    d, lens = _data(op, shape, dtype)
    outs, grads, ctx = _run(op, d, lens, cupy)
    assert ctx.backend == "cuda" and ctx.cupy
    want_outs, want_grads = _reference(op, d, lens)
    for name, a, b in zip(("y", "hT", "cT"), outs, want_outs, strict=False):
        assert isinstance(a, cupy.ndarray) and a.dtype == dtype
        assert_close(a, b, "recurrent", "forward", dtype, name=f"{op} {name}")
    for name, a, b in zip(GRADS[op], grads, want_grads, strict=True):
        assert isinstance(a, cupy.ndarray) and a.dtype == dtype
        assert_close(a, b, "recurrent", "backward", dtype, name=f"{op} {name}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rnn_relu(dtype):
    d, lens = _data("rnn", SHAPES[3], dtype)
    outs, grads, _ = _run("rnn", d, lens, cupy, nonlinearity="relu")
    want_outs, want_grads = _reference("rnn", d, lens, nonlinearity="relu")
    for a, b in zip(outs, want_outs, strict=True):
        assert_close(a, b, "recurrent", "forward", dtype)
    for name, a, b in zip(GRADS["rnn"], grads, want_grads, strict=True):
        assert_close(a, b, "recurrent", "backward", dtype, name=name)


@pytest.mark.parametrize("op", ["lstm", "gru", "rnn"])
def test_tiny_grid_wraps(op, checked_runtime, monkeypatch):
    """With a 2-block grid every thread loops over many elements."""
    monkeypatch.setattr(checked_runtime, "max_blocks", 2)
    d, lens = _data(op, SHAPES[3], np.float64)
    outs, grads, _ = _run(op, d, lens, cupy)
    want_outs, want_grads = _reference(op, d, lens)
    for a, b in zip(outs, want_outs, strict=True):
        assert_close(a, b, "recurrent", "forward", np.float64)
    for a, b in zip(grads, want_grads, strict=True):
        assert_close(a, b, "recurrent", "backward", np.float64)


@pytest.mark.parametrize("op", ["lstm", "gru", "rnn"])
def test_bitwise_deterministic(op):
    """Two runs on the same inputs give bitwise the same outputs and gradients."""
    d, lens = _data(op, (20, 16, 64, 96, "mixed"), np.float32)
    first = _run(op, d, lens, cupy)
    second = _run(op, d, lens, cupy)
    for a, b in zip(first[0] + list(first[1]), second[0] + list(second[1]), strict=True):
        np.testing.assert_array_equal(cupy.asnumpy(a), cupy.asnumpy(b))


@pytest.mark.parametrize("op", ["lstm", "gru", "rnn"])
def test_inference_matches_training(op):
    d, lens = _data(op, SHAPES[1], np.float64)
    args = [cupy.asarray(d[k]) for k in ORDER[op]]
    f = getattr(fr, f"{op}_forward")
    *a, ctx = f(*args, lengths=lens, training=True)
    *b, none = f(*args, lengths=lens, training=False)
    assert none is None
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(cupy.asnumpy(u), cupy.asnumpy(v))


def test_non_default_stream():
    """Kernels and GEMMs follow CuPy's current stream."""
    d, lens = _data("lstm", SHAPES[2], np.float64)
    want_outs, want_grads = _reference("lstm", d, lens)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        outs, grads, _ = _run("lstm", d, lens, cupy)
        stream.synchronize()
    for a, b in zip(outs, want_outs, strict=True):
        assert_close(a, b, "recurrent", "forward", np.float64)
    for a, b in zip(grads, want_grads, strict=True):
        assert_close(a, b, "recurrent", "backward", np.float64)


def test_lengths_as_cupy_array():
    d, lens = _data("gru", SHAPES[1], np.float64)
    outs, grads, _ = _run("gru", d, cupy.asarray(lens), cupy)
    want_outs, _ = _reference("gru", d, lens)
    assert_close(outs[0], want_outs[0], "recurrent", "forward", np.float64)


def test_mixing_numpy_and_cupy_is_a_type_error():
    d, _ = _data("lstm", SHAPES[1], np.float32)
    args = [cupy.asarray(d[k]) for k in ORDER["lstm"]]
    args[3] = d["w_ih"]  # a NumPy weight among CuPy arrays
    with pytest.raises(TypeError, match="cannot mix NumPy"):
        fr.lstm_forward(*args)
    *_, ctx = fr.lstm_forward(*[cupy.asarray(d[k]) for k in ORDER["lstm"]])
    with pytest.raises(TypeError):
        fr.lstm_backward(ctx, d["dy"])  # NumPy gradient for a CuPy forward


@pytest.mark.skipif(not CUDA or cupy.cuda.runtime.getDeviceCount() < 2, reason="needs 2 GPUs")
def test_arrays_on_two_devices_are_a_value_error():
    d, _ = _data("rnn", SHAPES[1], np.float32)
    args = []
    for i, k in enumerate(ORDER["rnn"]):
        with cupy.cuda.Device(i % 2):
            args.append(cupy.asarray(d[k]))
    with pytest.raises(ValueError, match="device"):
        fr.rnn_forward(*args)


@pytest.mark.parametrize("op", ["lstm", "gru", "rnn"])
def test_cuda_graphs(op, checked_runtime, monkeypatch):
    """With CUDA graphs on, a call repeated with the same addresses is captured (second call)
    and replayed (later calls); every call matches the reference, and replays are bitwise
    equal."""
    monkeypatch.setattr(checked_runtime, "graphs", True)
    checked_runtime.loops.clear()  # no loop of an earlier test at these addresses
    d, lens = _data(op, (12, 5, 7, 33, "mixed"), np.float32)
    args = [cupy.asarray(d[k]) for k in ORDER[op]]
    up = [cupy.asarray(d[k]) for k in ("dy", *STATE_GRADS[op])]
    f, b = getattr(fr, f"{op}_forward"), getattr(fr, f"{op}_backward")
    before = dict(checked_runtime.graph_stats)
    bump = BumpAllocator(64 * 2**20)
    results = []
    for _ in range(4):
        bump.reset()
        with cupy.cuda.using_allocator(bump):
            *outs, ctx = f(*args, lengths=lens)
            grads = b(ctx, *up)
            results.append([cupy.asnumpy(a) for a in (*outs, *grads)])
            del outs, ctx, grads
    stats = checked_runtime.graph_stats
    # forward and backward: eager, captured, replayed, replayed
    assert stats["captured"] - before["captured"] == 2, stats
    assert stats["replayed"] - before["replayed"] == 4, stats
    assert stats["capture_failed"] == before["capture_failed"], stats
    want_outs, want_grads = _reference(op, d, lens)
    directions = ["forward"] * len(want_outs) + ["backward"] * len(want_grads)
    for res in results:
        for a, w, direction in zip(res, [*want_outs, *want_grads], directions, strict=True):
            assert_close(a, w, "recurrent", direction, np.float32)
    for a, c in zip(results[3], results[2], strict=True):  # two replays of one graph
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("op", ["lstm", "gru", "rnn"])
def test_cuda_graph_replays_equal_eager(op, checked_runtime, monkeypatch):
    """A replayed graph gives bitwise the results of the eager run (the captured GEMMs use a
    workspace of cuBLAS's default size, so cuBLAS picks the same algorithms), at a batch and
    width where cuBLAS has choices to make."""
    checked_runtime.loops.clear()
    d, lens = _data(op, (6, 64, 48, 256, "mixed"), np.float32)
    args = [cupy.asarray(d[k]) for k in ORDER[op]]
    up = [cupy.asarray(d[k]) for k in ("dy", *STATE_GRADS[op])]
    f, b = getattr(fr, f"{op}_forward"), getattr(fr, f"{op}_backward")
    bump = BumpAllocator(64 * 2**20)
    results = []
    for graphs in (False, True, True, True):
        monkeypatch.setattr(checked_runtime, "graphs", graphs)
        bump.reset()
        with cupy.cuda.using_allocator(bump):
            *outs, ctx = f(*args, lengths=lens)
            grads = b(ctx, *up)
            results.append([cupy.asnumpy(a) for a in (*outs, *grads)])
            del outs, ctx, grads
    stats = checked_runtime.graph_stats
    assert stats["replayed"] >= 2, stats
    for res in results[1:]:
        for a, e in zip(res, results[0], strict=True):
            np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], (9, 8, 16, 512, "mixed")], ids=_ids)
def test_lstm_projection(shape, dtype):
    """LSTM with projections (w_hr (P, H), P < H) against the reference: outputs, states and
    every gradient, dw_hr the seventh."""
    H = shape[3]
    P = max(1, H // 3)
    d, lens = _data("lstm", shape, dtype)
    rng = np.random.default_rng(7)
    d["w_hh"] = (rng.standard_normal((4 * H, P)) * 0.7 / np.sqrt(P)).astype(dtype)
    d["w_hr"] = (rng.standard_normal((P, H)) * 0.7 / np.sqrt(H)).astype(dtype)
    d["h0"], d["dhT"] = d["h0"][:, :P].copy(), d["dhT"][:, :P].copy()
    d["dy"] = d["dy"][:, :, :P].copy()
    names = ("x", "h0", "c0", "w_ih", "w_hh", "b")
    *outs, ctx = fr.lstm_forward(*(cupy.asarray(d[k]) for k in names),
                                 w_hr=cupy.asarray(d["w_hr"]), lengths=lens)  # fmt: skip
    grads = fr.lstm_backward(ctx, *(cupy.asarray(d[k]) for k in ("dy", "dhT", "dcT")))
    d64 = {k: v.astype(np.float64) for k, v in d.items()}
    *want_outs, rctx = ref.lstm_forward(*(d64[k] for k in names), w_hr=d64["w_hr"], lengths=lens)
    want = ref.lstm_backward(rctx, d64["dy"], d64["dhT"], d64["dcT"])
    assert len(grads) == 7
    for name, a, b in zip(("y", "hT", "cT"), outs, want_outs, strict=True):
        assert_close(a, b, "recurrent", "forward", dtype, name=name)
    for name, a, b in zip((*GRADS["lstm"], "dw_hr"), grads, want, strict=True):
        assert_close(a, b, "recurrent", "backward", dtype, name=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_saturated_gates_have_zero_gradients(dtype):
    """Gate pre-activations past saturation (i below where the sigmoid underflows the dtype):
    the gates are exactly 0 / 1 / 1 and every gate gradient exactly 0, while the cell state
    passes its gradient on (csrc/common.cuh)."""
    d, _ = _data("lstm", (3, 2, 4, 5, None), dtype)
    H = 5
    d["b"][:H] = -95.0 if dtype == np.float32 else -750.0  # i = 0
    d["b"][H : 2 * H] = 40.0  # f = 1
    d["b"][3 * H :] = 1000.0  # o = 1
    outs, grads, ctx = _run("lstm", d, None, cupy)
    acts = cupy.asnumpy(ctx.saved["acts"])
    assert np.all(acts[..., :H] == 0) and np.all(acts[..., H : 2 * H] == 1)
    assert np.all(acts[..., 3 * H :] == 1)
    np.testing.assert_array_equal(cupy.asnumpy(grads[5]), 0)  # db: every gate
    assert np.all(cupy.asnumpy(grads[2]) != 0)  # dc0
