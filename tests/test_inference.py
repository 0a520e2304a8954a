"""Prepared recurrent layers (fastrnn.lstm_inference, gru_inference, rnn_inference): steps and
whole sequences equal the reference and torch.nn; the prepared copy is private until update();
bad per-call input gets TypeError/ValueError naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
from recurrent_support import OP_IDS, OPS
from tolerances import assert_close

import fastrnn as fr
from fastrnn import reference

DTYPES = [np.float32, np.float64]


def _weights(op, arrays):
    if op.base == "lstm":
        return (arrays["w_ih"], arrays["w_hh"], arrays["b"])
    if op.base == "gru":
        return (arrays["w_ih"], arrays["w_hh"], arrays["b_ih"], arrays["b_hh"])
    return (arrays["w_ih"], arrays["w_hh"], arrays["b"])


def _prepare(op, arrays):
    if op.base == "lstm":
        return fr.lstm_inference(*_weights(op, arrays), w_hr=arrays.get("w_hr"))
    if op.base == "gru":
        return fr.gru_inference(*_weights(op, arrays))
    return fr.rnn_inference(*_weights(op, arrays), nonlinearity=op.nonlinearity)


def _steps(op, run, x, h, c):
    for t in range(x.shape[0]):
        if op.base == "lstm":
            h, c = run.step(x[t], h, c)
        else:
            h = run.step(x[t], h)
    return h, c


# N = 9 runs the BLAS path, N <= 8 the small-batch kernel: one row at a time below four, four
# rows at a time from four; G H outputs in panels of 128 columns, blocks of 128 / 64 / 32 / 16
# and a last few (e.g. LSTM H = 70: panels of 128, 128, 24 = 16 + 8)
@pytest.mark.parametrize("T", [1, 2, 100])
@pytest.mark.parametrize(
    "N,D,H", [(1, 5, 7), (3, 17, 4), (9, 6, 33), (4, 3, 40), (8, 2, 70), (5, 9, 130)]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_steps_and_sequence_match_the_reference(op, dtype, N, D, H, T):
    rng = np.random.default_rng(T + N)
    arrays64 = op.arrays(T, N, D, H, rng)
    arrays = {k: v.astype(dtype) for k, v in arrays64.items()}
    run = _prepare(op, arrays)
    (ref_y, ref_h, *ref_c), _ = op.forward(arrays64, training=False, module=reference)
    h, c = _steps(op, run, arrays["x"], arrays["h0"], arrays.get("c0"))
    assert h.dtype == dtype and h.flags.c_contiguous
    assert_close(h, ref_h, "recurrent", "forward", dtype, "h after steps")
    if op.base == "lstm":
        assert_close(c, ref_c[0], "recurrent", "forward", dtype, "c after steps")
    # a whole sequence, with and without lengths
    lengths = rng.integers(1, T + 1, size=N)
    for ln in (None, lengths):
        args = (arrays["x"], arrays["h0"]) + ((arrays["c0"],) if op.base == "lstm" else ())
        got = run(*args, lengths=ln)
        want, _ = op.forward(arrays64, lengths=ln, training=False, module=reference)
        for name, g, w in zip(op.outputs(), got, want, strict=True):
            assert_close(g, w, "recurrent", "forward", dtype, name)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_matches_torch_nn(op):
    torch = pytest.importorskip("torch")
    T, N, D, H = 20, 3, 6, 10
    kind = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}[op.base]
    kw = {"nonlinearity": op.nonlinearity} if op.base == "rnn" else {}
    P = H // 2 if op.proj else H
    if op.proj:
        kw["proj_size"] = P
    m = getattr(torch.nn, kind)(D, H, **kw).double()
    w_ih, w_hh = m.weight_ih_l0.detach().numpy(), m.weight_hh_l0.detach().numpy()
    b_ih, b_hh = m.bias_ih_l0.detach().numpy(), m.bias_hh_l0.detach().numpy()
    if op.base == "lstm":
        w_hr = m.weight_hr_l0.detach().numpy() if op.proj else None
        run = fr.lstm_inference(w_ih, w_hh, b_ih + b_hh, w_hr=w_hr)
    elif op.base == "gru":
        run = fr.gru_inference(w_ih, w_hh, b_ih, b_hh)
    else:
        run = fr.rnn_inference(w_ih, w_hh, b_ih + b_hh, nonlinearity=op.nonlinearity)
    x = np.random.default_rng(0).standard_normal((T, N, D))
    h = np.zeros((N, P))
    c = np.zeros((N, H)) if op.base == "lstm" else None
    h, c = _steps(op, run, x, h, c)
    with torch.no_grad():
        _, state = m(torch.from_numpy(x))
    th = state[0] if op.base == "lstm" else state
    np.testing.assert_allclose(h, th[0].numpy(), rtol=1e-12, atol=1e-13)
    if op.base == "lstm":
        np.testing.assert_allclose(c, state[1][0].numpy(), rtol=1e-12, atol=1e-13)


def test_lstm_projection_step():
    rng = np.random.default_rng(3)
    N, D, H, P = 2, 5, 6, 3
    w_ih, w_hh = rng.standard_normal((4 * H, D)), rng.standard_normal((4 * H, P))
    b, w_hr = rng.standard_normal(4 * H), rng.standard_normal((P, H))
    run = fr.lstm_inference(w_ih, w_hh, b, w_hr=w_hr)
    x, h, c = rng.standard_normal((N, D)), rng.standard_normal((N, P)), rng.standard_normal((N, H))
    a = x @ w_ih.T + h @ w_hh.T + b
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    i, f = sig(a[:, :H]), sig(a[:, H : 2 * H])
    g, o = np.tanh(a[:, 2 * H : 3 * H]), sig(a[:, 3 * H :])
    c_want = f * c + i * g
    h_want = (o * np.tanh(c_want)) @ w_hr.T
    h_got, c_got = run.step(x, h, c)
    assert h_got.shape == (N, P)
    np.testing.assert_allclose(h_got, h_want, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(c_got, c_want, rtol=1e-12, atol=1e-13)
    for bad_p in (0, H):
        with pytest.raises(ValueError, match="w_hr"):
            fr.lstm_inference(
                w_ih, rng.standard_normal((4 * H, max(bad_p, 1))), b,
                w_hr=rng.standard_normal((bad_p, H)),
            )


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_private_copy_update_and_out(op):
    rng = np.random.default_rng(1)
    T, N, D, H = 3, 2, 4, 5
    arrays = op.arrays(T, N, D, H, rng)
    run = _prepare(op, arrays)
    x, h = arrays["x"][0], arrays["h0"]
    c = arrays.get("c0")
    args = (x, h, c) if op.base == "lstm" else (x, h)
    before = run.step(*args)
    weights = _weights(op, arrays)
    for w in weights + ((arrays["w_hr"],) if op.proj else ()):
        w *= 3.0  # the caller changes its arrays in place: no effect until update()
    again = run.step(*args)
    for a, b in zip(np.atleast_1d(before) if op.base != "lstm" else before,
                    np.atleast_1d(again) if op.base != "lstm" else again, strict=True):
        np.testing.assert_array_equal(a, b)
    run.update(*weights, **({"w_hr": arrays["w_hr"]} if op.proj else {}))
    fresh = _prepare(op, arrays).step(*args)
    updated = run.step(*args)
    pairs = zip(fresh, updated, strict=True) if op.base == "lstm" else [(fresh, updated)]
    for a, b in pairs:
        np.testing.assert_array_equal(a, b)
    # out= into the caller's buffers, the state itself included (stepping in place)
    h2 = h.copy()
    if op.base == "lstm":
        c2 = c.copy()
        res = run.step(x, h2, c2, out=(h2, c2))
        assert res[0] is h2 and res[1] is c2
        np.testing.assert_array_equal(h2, updated[0])
        np.testing.assert_array_equal(c2, updated[1])
    else:
        res = run.step(x, h2, out=h2)
        assert res is h2
        np.testing.assert_array_equal(h2, updated)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_bad_input_names_the_argument(op):
    rng = np.random.default_rng(2)
    N, D, H = 2, 3, 4
    arrays = {k: v.astype(np.float32) for k, v in op.arrays(1, N, D, H, rng).items()}
    run = _prepare(op, arrays)
    x, h = arrays["x"][0], arrays["h0"]
    c = arrays.get("c0")
    lstm = op.base == "lstm"

    def step(x=x, h=h, **kw):
        return run.step(x, h, c, **kw) if lstm else run.step(x, h, **kw)

    cases = [
        (dict(x=x.astype(np.float64)), TypeError, "x_t"),
        (dict(x=x.tolist()), TypeError, "x_t"),
        (dict(x=None), TypeError, "x_t"),
        (dict(x=x[:, :2]), ValueError, "x_t"),
        (dict(x=x[None]), ValueError, "x_t"),
        (dict(x=np.ones((D, N), np.float32).T), ValueError, "x_t"),  # not C-contiguous
        (dict(h=h[:1]), ValueError, "h"),
        (dict(h=h.astype(np.float64)), TypeError, "h"),
    ]
    for kw, exc, name in cases:
        with pytest.raises(exc, match=f"^{name}"):
            step(**kw)
    with pytest.raises(ValueError, match="^out"):
        step(out=(np.empty((N, H), np.float32), np.empty((N, H + 1), np.float32))
             if lstm else np.empty((N + 1, H), np.float32))
    if lstm:
        with pytest.raises(TypeError, match="^c"):
            run.step(x, h)
        with pytest.raises(TypeError, match="^out"):
            run.step(x, h, c, out=np.empty((N, H), np.float32))
    else:
        with pytest.raises(TypeError, match="^c"):
            run.step(x, h, h)
    # construction and update validate the weights like the functional API
    w = _weights(op, arrays)
    with pytest.raises(ValueError, match="w_hh"):
        _prepare(op, {**arrays, "w_hh": arrays["w_hh"][:, :-1]})
    with pytest.raises(TypeError, match="w_ih"):
        _prepare(op, {**arrays, "w_ih": arrays["w_ih"].astype(np.float64)})
    with pytest.raises(ValueError, match="w_ih"):
        run.update(np.ones((w[0].shape[0], D + 1), np.float32), *w[1:],
                   **({"w_hr": arrays["w_hr"]} if op.proj else {}))
    if op.base == "rnn":
        with pytest.raises(ValueError, match="nonlinearity"):
            fr.rnn_inference(*w, nonlinearity="sigmoid")


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_cuda_prepared_layer_matches_the_cpu(op):
    from conftest import CUDA

    if not CUDA:
        pytest.skip("cupy.is_available() is False")
    import cupy

    rng = np.random.default_rng(5)
    arrays = op.arrays(4, 3, 5, 6, rng)
    cpu = _prepare(op, arrays)
    gpu = _prepare(op, {k: cupy.asarray(v) for k, v in arrays.items()})
    x, h, c = arrays["x"], arrays["h0"], arrays.get("c0")
    h_cpu, c_cpu = _steps(op, cpu, x, h, c)
    h_gpu, c_gpu = _steps(op, gpu, cupy.asarray(x), cupy.asarray(h),
                          None if c is None else cupy.asarray(c))
    np.testing.assert_allclose(cupy.asnumpy(h_gpu), h_cpu, rtol=1e-10, atol=1e-12)
    if op.base == "lstm":
        np.testing.assert_allclose(cupy.asnumpy(c_gpu), c_cpu, rtol=1e-10, atol=1e-12)


def test_bench_inference_command(monkeypatch, capsys):
    from fastrnn import _inference_bench
    from fastrnn.cli import main

    monkeypatch.setattr(_inference_bench, "STEP_GRID", [("lstm", 1, 8), ("gru", 2, 8)])
    monkeypatch.setattr(_inference_bench, "SEQUENCE_GRID", [("rnn", 5, 2, 8)])
    assert main(["bench", "--inference", "--quick", "--no-torch", "--min-time", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "prepared" in out and "forward/prepared" in out
    assert out.count("\nstep") == 2 and out.count("\nsequence") == 1
