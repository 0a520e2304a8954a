"""Streams of fastrnn.nn recurrent modules (``module.stream(batch_size)``): stepping equals the
module's forward over the whole sequence; state, reset, refresh; char-rnn sampling through a
stream gives the text the whole-model sampler gives."""

from __future__ import annotations

import numpy as np
import pytest

from fastrnn import nn
from fastrnn.examples.char_rnn import stepped_sample

MODULES = [
    pytest.param(lambda **kw: nn.LSTM(5, 7, num_layers=3, **kw), id="lstm"),
    pytest.param(lambda **kw: nn.LSTM(5, 7, num_layers=2, proj_size=3, **kw), id="lstm_proj"),
    pytest.param(lambda **kw: nn.GRU(5, 7, num_layers=2, **kw), id="gru"),
    pytest.param(lambda **kw: nn.RNN(5, 7, num_layers=2, nonlinearity="relu", **kw), id="rnn"),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("make", MODULES)
def test_steps_equal_the_whole_sequence(make, dtype):
    m = make(dtype=dtype)
    m.eval()
    T, N = 12, 3
    x = np.random.default_rng(0).standard_normal((T, N, 5)).astype(dtype)
    with nn.no_grad():
        y, state = m(x)
    s = m.stream(N)
    ys = np.stack([s.step(x[t]).copy() for t in range(T)])
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(ys, y, **tol)
    got = s.state if isinstance(s.state, tuple) else (s.state,)
    want = state if isinstance(state, tuple) else (state,)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, **tol)
    # state set from a forward pass, then continued, equals one longer forward pass
    s.reset()
    assert all(np.all(a == 0) for a in got)
    with nn.no_grad():
        _, st = m(x[:5])
    s.state = st
    for t in range(5, T):
        last = s.step(x[t])
    np.testing.assert_allclose(last, y[-1], **tol)


def test_refresh_takes_new_weights_and_bad_use_is_refused():
    m = nn.LSTM(4, 6, dtype=np.float64)
    s = m.stream(2)
    x = np.ones((2, 4))
    a = s.step(x).copy()
    m.weight_hh_l0.data *= 2
    s.reset()
    np.testing.assert_array_equal(s.step(x), a)  # still the prepared weights
    s.refresh()
    s.reset()
    with nn.no_grad():
        y, _ = m(x[None])
    np.testing.assert_allclose(s.step(x), y[0], rtol=1e-12)
    with pytest.raises(ValueError, match="x_t"):
        s.step(np.ones((3, 4)))
    with pytest.raises(ValueError, match="bidirectional"):
        nn.GRU(4, 6, bidirectional=True).stream(1)
    with pytest.raises(ValueError, match="batch_size"):
        m.stream(0)
    with pytest.raises(TypeError, match="state"):
        s.state = np.zeros((1, 2, 6))


def test_char_rnn_sampling_through_a_stream_matches_the_model():
    from fastrnn.examples.char_rnn import Vocabulary, build_model, sample
    from fastrnn.nn.functional import softmax

    vocab = Vocabulary.from_text("abcdefghij \n")
    model = build_model(len(vocab), 16, 2, 8, 0.0, seed=3)
    got = sample(model, vocab, 200, 0.8, "abc", np.random.default_rng(7))
    # the sampler before streams: the whole model called on every character
    rng = np.random.default_rng(7)
    model.eval()
    out = []
    with nn.no_grad():
        logits, state = model(vocab.encode("abc")[:, None], None)
        last = logits[-1, 0]
        for _ in range(200):
            p = softmax(last.astype(np.float64) / 0.8)
            nxt = int(min(np.searchsorted(np.cumsum(p), rng.random() * p.sum()), len(p) - 1))
            out.append(nxt)
            logits, state = model(np.array([[nxt]], dtype=np.int64), state)
            last = logits[0, 0]
    assert got == "abc" + vocab.decode(out)


SAMPLED = [
    pytest.param(lambda D, H, dt: nn.LSTM(D, H, num_layers=2, dtype=dt), id="lstm"),
    pytest.param(lambda D, H, dt: nn.GRU(D, H, num_layers=3, dtype=dt), id="gru"),
    pytest.param(lambda D, H, dt: nn.RNN(D, H, nonlinearity="relu", dtype=dt), id="rnn_relu"),
    pytest.param(lambda D, H, dt: nn.RNN(D, H, num_layers=2, dtype=dt), id="rnn_tanh"),
]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("H", [1, 7, 33, 64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("make", SAMPLED)
def test_sampling_kernel_equals_the_stepped_loop(make, dtype, H, threads):
    from fastrnn._threads import threads_in_this_thread

    rng = np.random.default_rng(H)
    V, D, n = 11, 5, 60
    m = make(D, H, dtype)
    for p in m.parameters():  # weights large enough that the draws depend on them
        p.data[...] = rng.standard_normal(p.data.shape) * 1.2 / np.sqrt(H)
    table = rng.standard_normal((V + 2, D)).astype(dtype)
    w_out = rng.standard_normal((V, H)).astype(dtype)
    b_out = rng.standard_normal(V).astype(dtype)
    last = rng.standard_normal(V).astype(dtype)
    u = rng.random(n)
    a, b = m.stream(1), m.stream(1)
    h0 = rng.standard_normal(a.state[0].shape if m.mode == "LSTM" else a.state.shape)
    start = (h0.astype(dtype), h0[::-1].astype(dtype).copy()) if m.mode == "LSTM" else h0
    start = start if m.mode == "LSTM" else h0.astype(dtype)
    a.state = start
    b.state = start
    # the sampling loop stepped from Python (NumPy draws, stream.step): what the kernel must equal
    want = stepped_sample(a, table, w_out, b_out, last, 0.7, u).tolist()
    with threads_in_this_thread(threads):
        got = b._sample(table, w_out, b_out, last, 0.7, u)
    # the same draws; the states agree to rounding (the threads' column ranges may put a
    # column in a vectorised loop's body where the one-thread step has it in the tail)
    assert got.dtype == np.int64 and got.tolist() == want
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-11)
    for x, y in zip(
        a.state if m.mode == "LSTM" else (a.state,), b.state if m.mode == "LSTM" else (b.state,),
        strict=True,
    ):
        np.testing.assert_allclose(y, x, **tol)


def test_sampling_kernel_refuses_bad_arguments():
    from fastrnn._cpu.inference import generate

    m = nn.LSTM(4, 6, dtype=np.float32)
    s = m.stream(1)
    table, w, b = np.ones((9, 4), np.float32), np.ones((9, 6), np.float32), np.ones(9, np.float32)
    last, u = np.zeros(9, np.float32), np.full(3, 0.5)
    assert s._sample(table, w, b, last, 1.0, u).shape == (3,)
    layers = [(s.layers[0], s._h[0, 0], s._c[0, 0])]
    with pytest.raises(TypeError, match="table"):
        s._sample(table.astype(np.float64), w, b, last, 1.0, u)
    with pytest.raises(ValueError, match="table"):
        s._sample(np.ones((9, 5), np.float32), w, b, last, 1.0, u)
    with pytest.raises(ValueError, match="head_w"):
        s._sample(table, np.ones((9, 5), np.float32), b, last, 1.0, u)
    with pytest.raises(ValueError, match="head_w"):
        s._sample(table[:4], w, b, last, 1.0, u)
    with pytest.raises(ValueError, match="head_b"):
        s._sample(table, w, b[:3], last, 1.0, u)
    with pytest.raises(TypeError, match="u"):
        s._sample(table, w, b, last, 1.0, u.astype(np.float32))
    with pytest.raises(ValueError, match="temperature"):
        s._sample(table, w, b, last, 0.0, u)
    with pytest.raises(ValueError, match="c"):
        generate([(s.layers[0], s._h[0, 0], None)], table, w, b, last, 1.0, u, 1)
    with pytest.raises(ValueError, match="layers"):
        generate([], table, w, b, last, 1.0, u, 1)
    with pytest.raises(ValueError, match="layers"):
        generate(layers * 2, table, w, b, last, 1.0, u, 1)  # the second takes 4 inputs, gets 6
    # where the kernel does not apply, the caller steps the stream itself
    assert nn.LSTM(4, 6, proj_size=2).stream(1)._sample(table, w, b, last, 1.0, u) is None
    assert m.stream(2)._sample(table, w, b, last, 1.0, u) is None
