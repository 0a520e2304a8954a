"""``layer(ids, state, embedding=emb)``: the same results as ``layer(emb(ids), state)``.

On the CPU backend the lookup is folded into the first layer (its input projection becomes
rows of ``emb.weight W_ih^T``, fastrnn/_cpu/recurrent.pyx); elsewhere, and when the table is
not smaller than the batch, the module looks the vectors up itself. Both are compared with the
plain composition (float64 to 1e-12, float32 to the nn tolerances), every gradient included,
over layers, directions, batch-first, unbatched, lengths, given states, projections, padding.
"""

from __future__ import annotations

import numpy as np
import pytest
from tolerances import assert_close

import fastrnn
from fastrnn import nn
from fastrnn.backends import use_backend

MODES = {
    "lstm": (nn.LSTM, {}),
    "gru": (nn.GRU, {}),
    "rnn_tanh": (nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}),
    "lstm_proj": (nn.LSTM, {"proj_size": 3}),
}

# (num_layers, bidirectional, batch_first, lengths, give_state, unbatched)
CONFIGS = [
    pytest.param(1, False, False, False, False, False, id="L1"),
    pytest.param(2, False, False, False, True, False, id="L2-state"),
    pytest.param(2, True, True, True, True, False, id="L2-bi-batchfirst-lengths-state"),
    pytest.param(1, True, False, True, False, False, id="L1-bi-lengths"),
    pytest.param(2, False, False, False, False, True, id="L2-unbatched"),
]

T, N, D, H, V = 9, 5, 6, 7, 4


def _pair(mode, dtype, padding_idx=None, **kw):
    """Two identical (embedding, layer) pairs."""
    cls, extra = MODES[mode]
    out = []
    for _ in range(2):
        nn.manual_seed(11)
        emb = nn.Embedding(V, D, padding_idx=padding_idx, dtype=dtype)
        layer = cls(D, H, **extra, **kw, dtype=dtype, seed=3)
        out.append((emb, layer))
    return out


def _run(emb, layer, ids, state, lengths, dy, dstate, fold):
    if fold:
        y, s = layer(ids, state, lengths=lengths, embedding=emb)
        dx, ds = layer.backward(dy, dstate, return_state_grad=True)
        assert dx is None
    else:
        y, s = layer(emb(ids), state, lengths=lengths)
        dx, ds = layer.backward(dy, dstate, return_state_grad=True)
        emb.backward(dx)
    return y, s, ds


def _flat(s):
    return list(s) if isinstance(s, tuple) else [s]


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "num_layers, bidi, batch_first, use_lengths, give_state, unbatched", CONFIGS
)
@pytest.mark.parametrize("mode", list(MODES))
def test_same_as_looking_up_first(
    mode, num_layers, bidi, batch_first, use_lengths, give_state, unbatched, dtype, backend
):
    rng = np.random.default_rng(5)
    (e1, m1), (e2, m2) = _pair(
        mode,
        dtype,
        padding_idx=1,
        num_layers=num_layers,
        bidirectional=bidi,
        batch_first=batch_first,
    )
    n = 1 if unbatched else N
    dirs = 2 if bidi else 1
    P = MODES[mode][1].get("proj_size") or H
    ids = rng.integers(0, V, (n, T) if batch_first else (T, n))
    lengths = rng.integers(1, T + 1, n) if use_lengths else None
    if lengths is not None:
        lengths[0] = T
    h0 = rng.standard_normal((num_layers * dirs, n, P)).astype(dtype)
    c0 = rng.standard_normal((num_layers * dirs, n, H)).astype(dtype)
    is_lstm = mode.startswith("lstm")
    state = dstate = None
    y_shape = (n, T, dirs * P) if batch_first else (T, n, dirs * P)
    dy = rng.standard_normal(y_shape).astype(dtype)
    if unbatched:
        ids, dy = ids[:, 0], dy[:, 0]
        h0, c0 = h0[:, 0], c0[:, 0]
    if give_state:
        state = (h0, c0) if is_lstm else h0
        dstate = (0.5 * h0, 0.5 * c0) if is_lstm else 0.5 * h0
    with use_backend(backend):
        y1, s1, ds1 = _run(e1, m1, ids, state, lengths, dy, dstate, fold=True)
        y2, s2, ds2 = _run(e2, m2, ids, state, lengths, dy, dstate, fold=False)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else None
    pairs = [("y", y1, y2)]
    for what, u, w in (("state", s1, s2), ("dstate", ds1, ds2)):
        pairs += [
            (f"{what}{i}", a, b) for i, (a, b) in enumerate(zip(_flat(u), _flat(w), strict=True))
        ]
    pairs += [("embedding.grad", e1.weight.grad, e2.weight.grad)]
    pairs += [
        (name, p.grad, q.grad)
        for (name, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters(), strict=True)
    ]
    for name, a, b in pairs:
        if tol is not None:
            np.testing.assert_allclose(a, b, err_msg=name, **tol)
        else:
            assert_close(a, b, "nn", "backward", dtype, name)
    assert not e1.weight.grad[1].any()  # the padding row gets no gradient


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(16, 32, 64, 192, 96), (50, 4, 32, 512, 7), (6, 3, 5, 8, 2)])
def test_engine_lookup_every_split(shape, threads):
    """The engine's lookup (fastrnn/_cpu/recurrent.pyx) against the gathered input, across its
    three ways of splitting a call: by sequences, by hidden units, one thread."""
    from fastrnn._cpu import recurrent

    Tn, Nn, Dn, Hn, Vn = shape
    rng = np.random.default_rng(7)
    E = rng.standard_normal((Vn, Dn)).astype(np.float32)
    tok = rng.integers(0, Vn, (Tn, Nn))
    # torch's initial scale, 1/sqrt(H): larger weights make a long sequence chaotic, and the
    # lookup's different order of additions (the table row first) then grows past rounding
    w_ih = (rng.standard_normal((4 * Hn, Dn)) / np.sqrt(Hn)).astype(np.float32)
    w_hh = (rng.standard_normal((4 * Hn, Hn)) / np.sqrt(Hn)).astype(np.float32)
    b = (0.1 * rng.standard_normal(4 * Hn)).astype(np.float32)
    h0 = rng.standard_normal((Nn, Hn)).astype(np.float32)
    c0 = rng.standard_normal((Nn, Hn)).astype(np.float32)
    lengths = rng.integers(1, Tn + 1, Nn)
    lengths[0] = Tn
    dy = rng.standard_normal((Tn, Nn, Hn)).astype(np.float32)
    before = fastrnn.get_num_threads()
    fastrnn.set_num_threads(threads)
    try:
        got = recurrent.lstm_forward(E, h0, c0, w_ih, w_hh, b, lengths, True, None, tok)
        want = recurrent.lstm_forward(E[tok], h0, c0, w_ih, w_hh, b, lengths, True)
        assert got[3].saved["split"] == want[3].saved["split"]
        g_got = recurrent.lstm_backward(got[3], dy, None, None)
        g_want = list(recurrent.lstm_backward(want[3], dy, None, None))
    finally:
        fastrnn.set_num_threads(before)
    dE = np.zeros_like(E)
    np.add.at(dE, tok.reshape(-1), g_want[0].reshape(-1, Dn))
    g_want[0] = dE
    for name, a, w in zip(("y", "hT", "cT"), got[:3], want[:3], strict=True):
        assert_close(a, w, "recurrent", "forward", np.float32, name)
    for name, a, w in zip(("dE", "dh0", "dc0", "dw_ih", "dw_hh", "db"), g_got, g_want, strict=True):
        assert_close(a, w, "recurrent", "backward", np.float32, name)


def test_engine_rejects_tokens_out_of_range():
    from fastrnn._cpu import recurrent

    z = np.zeros
    with pytest.raises(ValueError, match="tokens"):
        recurrent.lstm_forward(
            z((3, 2), np.float32),
            z((1, 2), np.float32),
            z((1, 2), np.float32),
            z((8, 2), np.float32),
            z((8, 2), np.float32),
            z(8, np.float32),
            None,
            True,
            None,
            np.array([[3]]),
        )


def test_large_table_looks_up_first():
    """A table with more rows than the batch has indices is not folded (the lookup is the
    cheaper side); results and gradients are the same either way."""
    (e1, m1), (e2, m2) = _pair("lstm", np.float64)
    ids = np.array([[0, 3], [2, 2]])  # 4 indices, V = 4: not folded
    y1, _ = m1(ids, embedding=e1)
    assert m1._cache["folded"] is None and m1._cache["looked_up"] is e1
    assert m1.backward(np.ones_like(y1)) is None
    y2, _ = m2(e2(ids))
    e2.backward(m2.backward(np.ones_like(y2)))
    np.testing.assert_allclose(y1, y2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(e1.weight.grad, e2.weight.grad, rtol=1e-12, atol=1e-12)


def test_inference_without_gradients():
    (e1, m1), (e2, m2) = _pair("gru", np.float32)
    ids = np.random.default_rng(0).integers(0, V, (T, N))
    with nn.no_grad():
        y1, h1 = m1(ids, embedding=e1)
    y2, h2 = m2(e2(ids))
    assert_close(y1, y2, "nn", "forward", np.float32, "y")
    assert_close(h1, h2, "nn", "forward", np.float32, "h")


def test_bad_embedding_arguments():
    emb = nn.Embedding(V, D)
    lstm = nn.LSTM(D, H)
    ids = np.zeros((T, N), np.int64)
    with pytest.raises(TypeError, match="embedding: expected a fastrnn.nn.Embedding"):
        lstm(ids, embedding=np.zeros((V, D), np.float32))
    with pytest.raises(ValueError, match="embedding: expected 6 features"):
        lstm(ids, embedding=nn.Embedding(V, D + 1))
    with pytest.raises(TypeError, match="embedding: its weight"):
        lstm(ids, embedding=nn.Embedding(V, D, dtype=np.float64))
    with pytest.raises(TypeError, match="indices: expected an integer dtype"):
        lstm(ids.astype(np.float32), embedding=emb)
    with pytest.raises(ValueError, match="indices: every index must be in 0..3"):
        lstm(ids + V, embedding=emb)
    with pytest.raises(ValueError, match="x: expected indices of 1 or 2 dimensions"):
        lstm(ids[None], embedding=emb)
