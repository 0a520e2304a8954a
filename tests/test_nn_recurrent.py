"""LSTM, GRU and RNN layers vs their torch.nn twins (outputs, final states, every gradient),
with torch's state dicts copied across; finite differences of the float64 layers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nn_support import check_directional_grads, layer_backend, torch_state  # noqa: F401
from tolerances import assert_close

from fastrnn import nn

torch = pytest.importorskip("torch")

MODES = {
    "lstm": (nn.LSTM, {}, "LSTM", {}),
    "gru": (nn.GRU, {}, "GRU", {}),
    "rnn_tanh": (nn.RNN, {"nonlinearity": "tanh"}, "RNN", {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}, "RNN", {"nonlinearity": "relu"}),
    "lstm_proj": (nn.LSTM, {"proj_size": 2}, "LSTM", {"proj_size": 2}),
}

# (num_layers, bidirectional, batch_first, use lengths, give initial state)
CONFIGS = [
    pytest.param(1, False, False, False, False, id="L1"),
    pytest.param(2, True, True, True, True, id="L2-bi-batchfirst-lengths-state"),
    pytest.param(2, False, False, True, False, id="L2-lengths"),
    pytest.param(1, True, False, False, True, id="L1-bi-state"),
    pytest.param(3, True, False, True, False, id="L3-bi-lengths"),
]

T, N, D, H = 5, 3, 4, 3
LENGTHS = np.array([5, 2, 4])


def make_pair(mode, dtype, **kw):
    cls, extra, tname, textra = MODES[mode]
    t = getattr(torch.nn, tname)(D, H, **textra, **kw)
    t = t.double() if dtype == np.float64 else t.float()
    m = cls(D, H, **extra, **kw, dtype=dtype)
    m.load_state_dict(torch_state(t))
    return m, t


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("num_layers, bidirectional, batch_first, use_lengths, give_state", CONFIGS)
@pytest.mark.parametrize("mode", list(MODES))
def test_matches_torch(
    mode, num_layers, bidirectional, batch_first, use_lengths, give_state, dtype
):
    rng = np.random.default_rng(1)
    m, t = make_pair(
        mode, dtype, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first
    )
    is_lstm = mode.startswith("lstm")
    P = MODES[mode][1].get("proj_size") or H
    dirs = 2 if bidirectional else 1
    x = rng.standard_normal((N, T, D) if batch_first else (T, N, D)).astype(dtype)
    h0 = rng.standard_normal((num_layers * dirs, N, P)).astype(dtype)
    c0 = rng.standard_normal((num_layers * dirs, N, H)).astype(dtype)
    lengths = LENGTHS if use_lengths else None

    xt = torch.tensor(x, requires_grad=True)
    h0t = torch.tensor(h0, requires_grad=True)
    c0t = torch.tensor(c0, requires_grad=True)
    inp = xt
    if use_lengths:
        inp = torch.nn.utils.rnn.pack_padded_sequence(
            xt, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False
        )
    tstate = None if not give_state else ((h0t, c0t) if is_lstm else h0t)
    out, st = t(inp, tstate)
    if use_lengths:
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(
            out, batch_first=batch_first, total_length=T
        )
    state = None if not give_state else ((h0, c0) if is_lstm else h0)
    y, s = m(x, state, lengths=lengths)

    assert_close(y, out.detach().numpy(), "nn", "forward", dtype, "y")
    hn_t = st[0] if is_lstm else st
    hn = s[0] if is_lstm else s
    assert hn.shape == (num_layers * dirs, N, P)
    assert_close(hn, hn_t.detach().numpy(), "nn", "forward", dtype, "h_n")
    if is_lstm:
        assert_close(s[1], st[1].detach().numpy(), "nn", "forward", dtype, "c_n")

    dy = rng.standard_normal(y.shape).astype(dtype)
    dh = rng.standard_normal(hn.shape).astype(dtype)
    dc = rng.standard_normal(s[1].shape if is_lstm else hn.shape).astype(dtype)
    loss = (out * torch.tensor(dy)).sum() + (hn_t * torch.tensor(dh)).sum()
    if is_lstm:
        loss = loss + (st[1] * torch.tensor(dc)).sum()
    loss.backward()
    dx, dstate0 = m.backward(dy, (dh, dc) if is_lstm else dh, return_state_grad=True)
    assert_close(dx, xt.grad.numpy(), "nn", "backward", dtype, "dx")
    if give_state:
        dh0 = dstate0[0] if is_lstm else dstate0
        assert_close(dh0, h0t.grad.numpy(), "nn", "backward", dtype, "dh0")
        if is_lstm:
            assert_close(dstate0[1], c0t.grad.numpy(), "nn", "backward", dtype, "dc0")
    tparams = dict(t.named_parameters())
    names = [n for n, _ in m.named_parameters()]
    assert names == list(tparams)
    for name, p in m.named_parameters():
        assert_close(p.grad, tparams[name].grad.numpy(), "nn", "backward", dtype, name)


@pytest.mark.parametrize("mode", list(MODES))
def test_finite_differences(mode):
    rng = np.random.default_rng(2)
    cls, extra, _, _ = MODES[mode]
    nn.manual_seed(3)
    m = cls(D, H, num_layers=2, bidirectional=True, **extra, dtype=np.float64)
    x = rng.standard_normal((T, N, D))
    check_directional_grads(lambda: m(x, lengths=LENGTHS)[0], m.backward, x, list(m.parameters()))


def test_finite_differences_through_interlayer_dropout():
    rng = np.random.default_rng(4)
    m = nn.LSTM(D, H, num_layers=3, dropout=0.4, seed=7, dtype=np.float64)
    x = rng.standard_normal((T, N, D))

    def forward():
        m._rngs.clear()  # the same dropout masks on every call
        return m(x)[0]

    check_directional_grads(forward, m.backward, x, list(m.parameters()))


def test_interlayer_dropout_training_only():
    rng = np.random.default_rng(5)
    m, t = make_pair("lstm", np.float64, num_layers=2, dropout=0.5)
    x = rng.standard_normal((T, N, D))
    y_train = m(x)[0]
    m.eval()
    t.eval()
    y_eval = m(x)[0]
    assert not np.allclose(y_train, y_eval)
    assert_close(y_eval, t(torch.tensor(x))[0].detach().numpy(), "nn", "forward", np.float64)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_unbatched_input_matches_torch(mode):
    rng = np.random.default_rng(6)
    m, t = make_pair(mode, np.float64, num_layers=2, bidirectional=True)
    x = rng.standard_normal((T, D))
    h0 = rng.standard_normal((4, H))
    c0 = rng.standard_normal((4, H))
    state = (h0, c0) if mode == "lstm" else h0
    y, s = m(x, state)
    tstate = tuple(map(torch.tensor, state)) if mode == "lstm" else torch.tensor(h0)
    yt, st = t(torch.tensor(x), tstate)
    assert y.shape == (T, 2 * H)
    assert_close(y, yt.detach().numpy(), "nn", "forward", np.float64)
    for ours, theirs in zip(
        s if mode == "lstm" else [s], st if mode == "lstm" else [st], strict=True
    ):
        assert ours.shape == (4, H)
        assert_close(ours, theirs.detach().numpy(), "nn", "forward", np.float64)
    dx, ds = m.backward(np.ones_like(y), return_state_grad=True)
    assert dx.shape == x.shape
    assert all(d.shape == (4, H) for d in (ds if mode == "lstm" else [ds]))


def test_no_bias_matches_torch():
    rng = np.random.default_rng(7)
    m, t = make_pair("lstm", np.float64, bias=False, num_layers=2)
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in t.named_parameters()]
    x = rng.standard_normal((T, N, D))
    assert_close(m(x)[0], t(torch.tensor(x))[0].detach().numpy(), "nn", "forward", np.float64)


def test_names_shapes_and_init_like_torch():
    nn.manual_seed(0)
    m = nn.LSTM(7, 20, num_layers=2, bidirectional=True)
    t = torch.nn.LSTM(7, 20, num_layers=2, bidirectional=True)
    ours = {k: v.shape for k, v in m.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in t.state_dict().items()}
    bound = 1 / math.sqrt(20)
    allw = np.concatenate([p.data.ravel() for p in m.parameters()])
    assert allw.dtype == np.float32
    assert np.abs(allw).max() <= bound
    # U(-b, b) has standard deviation b / sqrt(3)
    assert abs(allw.std() - bound / math.sqrt(3)) < 0.05 * bound


def test_gradients_accumulate_and_zero_grad():
    rng = np.random.default_rng(8)
    m = nn.RNN(D, H, dtype=np.float64)
    x = rng.standard_normal((T, N, D))
    y, _ = m(x)
    m.backward(np.ones_like(y))
    once = m.weight_hh_l0.grad.copy()
    m(x)
    m.backward(np.ones_like(y))
    np.testing.assert_allclose(m.weight_hh_l0.grad, 2 * once, rtol=1e-12)
    m.zero_grad()
    assert not m.weight_hh_l0.grad.any()


def test_errors():
    m = nn.LSTM(D, H, dtype=np.float64)
    x = np.zeros((T, N, D))
    with pytest.raises(RuntimeError, match="no forward pass"):
        m.backward(np.zeros((T, N, H)))
    with pytest.raises(ValueError, match="input features"):
        m(np.zeros((T, N, D + 1)))
    with pytest.raises(TypeError, match="dtype"):
        m(x.astype(np.float32))
    with pytest.raises(ValueError, match="h: expected shape"):
        m(x, (np.zeros((2, N, H)), np.zeros((1, N, H))))
    with pytest.raises(TypeError, match="pair"):
        m(x, np.zeros((1, N, H)))
    with pytest.raises(ValueError, match="lengths"):
        m(x, lengths=[T + 1, 1, 1])
    y, _ = m(x)
    with pytest.raises(ValueError, match="dy: expected shape"):
        m.backward(np.zeros((T, N, H + 1)))
    with nn.no_grad():
        m(x)
    with pytest.raises(RuntimeError, match="no forward pass"):
        m.backward(np.zeros((T, N, H)))
    with pytest.raises(ValueError, match="nonlinearity"):
        nn.RNN(D, H, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="dropout"):
        nn.GRU(D, H, dropout=1.5)


@settings(max_examples=25, deadline=None)
@given(
    mode=st.sampled_from(list(MODES)),
    T_=st.integers(1, 4),
    N_=st.integers(1, 3),
    D_=st.integers(1, 3),
    H_=st.integers(1, 3),
    num_layers=st.integers(1, 2),
    bidirectional=st.booleans(),
    data=st.data(),
)
def test_fuzz_small_shapes_match_torch(mode, T_, N_, D_, H_, num_layers, bidirectional, data):
    """Tiny random configurations (T, N, H = 1 included), random lengths, vs torch.nn."""
    cls, extra, tname, textra = MODES[mode]
    if "proj_size" in extra:  # a projection needs proj_size < hidden_size
        H_ = max(H_, 2)
        extra = textra = {"proj_size": data.draw(st.integers(1, H_ - 1))}
    t = getattr(torch.nn, tname)(
        D_, H_, num_layers=num_layers, bidirectional=bidirectional, **textra
    ).double()
    m = cls(D_, H_, num_layers=num_layers, bidirectional=bidirectional, **extra, dtype=np.float64)
    m.load_state_dict(torch_state(t))
    lengths = np.array(data.draw(st.lists(st.integers(1, T_), min_size=N_, max_size=N_)))
    x = np.random.default_rng(T_ * 100 + N_).standard_normal((T_, N_, D_))
    xt = torch.tensor(x, requires_grad=True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        xt, torch.tensor(lengths), enforce_sorted=False
    )
    out, _ = t(packed)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T_)
    y, _ = m(x, lengths=lengths)
    assert_close(y, out.detach().numpy(), "nn", "forward", np.float64, "y")
    out.sum().backward()
    dx = m.backward(np.ones_like(y))
    assert_close(dx, xt.grad.numpy(), "nn", "backward", np.float64, "dx")


def test_proj_size_state_dict_and_errors():
    t = torch.nn.LSTM(D, H, num_layers=2, bidirectional=True, proj_size=2)
    m = nn.LSTM(D, H, num_layers=2, bidirectional=True, proj_size=2)
    want = {k: tuple(v.shape) for k, v in t.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert list(got) == list(want) and got == want
    m.load_state_dict(torch_state(t))
    assert "proj_size=2" in repr(m)
    for bad in (H, H + 1, -1):
        with pytest.raises(ValueError, match="proj_size"):
            nn.LSTM(D, H, proj_size=bad)
    with pytest.raises(TypeError, match="proj_size"):
        nn.LSTM(D, H, proj_size=1.5)
    x = np.zeros((T, N, D), np.float32)
    with pytest.raises(ValueError, match="h"):  # h0 has P features, not H
        m(x, (np.zeros((4, N, H), np.float32), np.zeros((4, N, H), np.float32)))
    with pytest.raises(ValueError, match="c"):  # c0 has H features, not P
        m(x, (np.zeros((4, N, 2), np.float32), np.zeros((4, N, 2), np.float32)))
