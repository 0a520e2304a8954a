"""Streams of fastrnn.nn recurrent modules (``module.stream(batch_size)``): stepping equals the
module's forward over the whole sequence; state, reset, refresh; char-rnn sampling through a
stream gives the text the whole-model sampler gives."""

from __future__ import annotations

import numpy as np
import pytest

from fastrnn import nn

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
