"""LSTM with projections (torch.nn.LSTM's proj_size): the functional API's validation and its
seventh gradient, and every backend vs torch.nn.LSTM(proj_size=P) with the same weights."""

from __future__ import annotations

import numpy as np
import pytest
from tolerances import assert_close

import fastrnn as fr

torch = pytest.importorskip("torch")

BACKENDS = ["numpy", "cpu"]


def _arrays(T, N, D, H, P, dtype, rng):
    s = 1 / np.sqrt(H)
    return dict(
        x=rng.standard_normal((T, N, D)).astype(dtype),
        h0=rng.standard_normal((N, P)).astype(dtype) * 0.5,
        c0=rng.standard_normal((N, H)).astype(dtype) * 0.5,
        w_ih=(rng.uniform(-s, s, (4 * H, D))).astype(dtype),
        w_hh=(rng.uniform(-s, s, (4 * H, P))).astype(dtype),
        b_ih=(rng.uniform(-s, s, 4 * H)).astype(dtype),
        b_hh=(rng.uniform(-s, s, 4 * H)).astype(dtype),
        w_hr=(rng.uniform(-s, s, (P, H))).astype(dtype),
    )


def _call(a, lengths=None, training=True):
    return fr.lstm_forward(
        a["x"],
        a["h0"],
        a["c0"],
        a["w_ih"],
        a["w_hh"],
        a["b_ih"] + a["b_hh"],
        w_hr=a["w_hr"],
        lengths=lengths,
        training=training,
    )


def _torch_lstm(a, D, H, P, dtype):
    t = torch.nn.LSTM(D, H, proj_size=P)
    t = t.double() if dtype == np.float64 else t.float()
    with torch.no_grad():
        t.weight_ih_l0.copy_(torch.from_numpy(a["w_ih"]))
        t.weight_hh_l0.copy_(torch.from_numpy(a["w_hh"]))
        t.bias_ih_l0.copy_(torch.from_numpy(a["b_ih"]))
        t.bias_hh_l0.copy_(torch.from_numpy(a["b_hh"]))
        t.weight_hr_l0.copy_(torch.from_numpy(a["w_hr"]))
    return t


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(
    "lengths", [None, [5, 2, 4, 1], [5, 5, 5, 5]], ids=["dense", "lengths", "full"]
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_proj_size(backend, lengths, dtype):
    rng = np.random.default_rng(7)
    T, N, D, H, P = 5, 4, 3, 6, 4
    a = _arrays(T, N, D, H, P, dtype, rng)
    lens = None if lengths is None else np.array(lengths)
    with fr.use_backend(backend):
        y, hT, cT, ctx = _call(a, lens)
    t = _torch_lstm(a, D, H, P, dtype)
    xt = torch.tensor(a["x"], requires_grad=True)
    h0t = torch.tensor(a["h0"][None], requires_grad=True)
    c0t = torch.tensor(a["c0"][None], requires_grad=True)
    inp = xt
    if lens is not None:
        inp = torch.nn.utils.rnn.pack_padded_sequence(xt, torch.tensor(lens), enforce_sorted=False)
    out, (hn, cn) = t(inp, (h0t, c0t))
    if lens is not None:
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)
    assert y.shape == (T, N, P) and hT.shape == (N, P) and cT.shape == (N, H)
    assert_close(y, out.detach().numpy(), "recurrent", "forward", dtype, "y")
    assert_close(hT, hn[0].detach().numpy(), "recurrent", "forward", dtype, "hT")
    assert_close(cT, cn[0].detach().numpy(), "recurrent", "forward", dtype, "cT")

    dy = rng.standard_normal((T, N, P)).astype(dtype)
    dhT = rng.standard_normal((N, P)).astype(dtype)
    dcT = rng.standard_normal((N, H)).astype(dtype)
    if lens is not None:  # torch's padded outputs carry no gradient; ours ignore dy there
        for n, L in enumerate(lens):
            dy[L:, n] = 0
    loss = (out * torch.tensor(dy)).sum() + (hn[0] * torch.tensor(dhT)).sum()
    loss = loss + (cn[0] * torch.tensor(dcT)).sum()
    loss.backward()
    grads = fr.lstm_backward(ctx, dy, dhT, dcT)
    assert len(grads) == 7
    dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = grads
    want = dict(
        dx=xt.grad,
        dh0=h0t.grad[0],
        dc0=c0t.grad[0],
        dw_ih=t.weight_ih_l0.grad,
        dw_hh=t.weight_hh_l0.grad,
        db=t.bias_ih_l0.grad,
        dw_hr=t.weight_hr_l0.grad,
    )
    got = dict(dx=dx, dh0=dh0, dc0=dc0, dw_ih=dw_ih, dw_hh=dw_hh, db=db, dw_hr=dw_hr)
    for name, g in got.items():
        assert g.dtype == dtype
        assert_close(g, want[name].numpy(), "recurrent", "backward", dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seventh_gradient_exactly_with_w_hr(backend):
    rng = np.random.default_rng(8)
    a = _arrays(3, 2, 3, 5, 2, np.float64, rng)
    with fr.use_backend(backend):
        y, hT, cT, ctx = _call(a)
        assert len(fr.lstm_backward(ctx, np.ones_like(y))) == 7
        x, c0 = a["x"], a["c0"]
        w_hh = rng.standard_normal((20, 5))
        y, hT, cT, ctx = fr.lstm_forward(x, c0, c0, a["w_ih"], w_hh, np.zeros(20))
        assert len(fr.lstm_backward(ctx, np.ones_like(y))) == 6


def test_projection_validation():
    rng = np.random.default_rng(9)
    a = _arrays(3, 2, 3, 5, 2, np.float64, rng)

    def call(**over):
        b = {**a, **over}
        return _call(b)

    for bad in (rng.standard_normal((5, 5)), rng.standard_normal((6, 5))):  # P >= H
        with pytest.raises(ValueError, match="w_hr"):
            call(w_hr=bad)
    with pytest.raises(ValueError, match="w_hr"):
        call(w_hr=rng.standard_normal((2, 5, 1)))
    with pytest.raises(ValueError, match="w_hr"):
        call(w_hr=np.zeros((0, 5)))
    with pytest.raises(TypeError, match="w_hr"):
        call(w_hr=a["w_hr"].astype(np.float32))
    with pytest.raises(TypeError, match="w_hr"):
        call(w_hr=a["w_hr"].tolist())
    with pytest.raises(ValueError, match="w_hh"):
        call(w_hh=rng.standard_normal((20, 5)))  # (4H, H) where (4H, P) is expected
    with pytest.raises(ValueError, match="h0"):
        call(h0=rng.standard_normal((2, 5)))  # (N, H) where (N, P) is expected
    with pytest.raises(ValueError, match="c0"):
        call(c0=rng.standard_normal((2, 2)))  # (N, P) where (N, H) is expected
    with pytest.raises(ValueError, match="w_ih"):
        call(w_ih=rng.standard_normal((8, 3)))  # 4P rows
    # backward: upstream shapes follow P for h, H for c
    with fr.use_backend("numpy"):
        y, hT, cT, ctx = call()
    with pytest.raises(ValueError, match="dy"):
        fr.lstm_backward(ctx, np.zeros((3, 2, 5)))
    with pytest.raises(ValueError, match="dhT"):
        fr.lstm_backward(ctx, np.zeros((3, 2, 2)), np.zeros((2, 5)))
    with pytest.raises(ValueError, match="dcT"):
        fr.lstm_backward(ctx, np.zeros((3, 2, 2)), None, np.zeros((2, 2)))
