"""The layer API on CuPy arrays: the same model on NumPy and on CuPy (moved with ``.to``)
gives the same outputs, gradients, optimizer steps and checkpoints. Skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CUDA

from fastrnn import data, io, nn, optim

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="cupy.is_available() is False")]

F64 = np.float64
RTOL = dict(rtol=1e-9, atol=1e-11)
# Parameters after an Adam step: Adam divides by sqrt(v), so where a gradient is ~0 rounding-level
# differences in it move the parameter by ~1e-10 absolute (seen on an H100: 7.5e-11).
PARAM_TOL = dict(rtol=1e-9, atol=1e-9)


class SeqNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4, dtype=F64)
        self.lstm = nn.LSTM(4, 5, num_layers=2, bidirectional=True, dtype=F64)
        self.gru = nn.GRU(10, 3, batch_first=False, dtype=F64)
        self.rnn = nn.RNN(3, 3, nonlinearity="relu", dtype=F64)
        self.head = nn.Linear(3, 6, dtype=F64)

    def forward(self, tokens, lengths):
        y, _ = self.lstm(self.embed(tokens), lengths=lengths)
        y, _ = self.gru(y, lengths=lengths)
        y, _ = self.rnn(y, lengths=lengths)
        return self.head(y)

    def backward(self, d):
        d = self.rnn.backward(self.head.backward(d))
        self.embed.backward(self.lstm.backward(self.gru.backward(d)))


def cnn():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, dtype=F64),
        nn.BatchNorm2d(3, dtype=F64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AvgPool2d(1),
        nn.Dropout(0.0),
        nn.Flatten(),
        nn.Sigmoid(),
        nn.Linear(12, 4, dtype=F64),
        nn.Tanh(),
        nn.BatchNorm1d(4, dtype=F64),
    )


def _same_step(make, inputs, targets, backward_args=()):
    import cupy

    nn.manual_seed(0)
    host = make()
    nn.manual_seed(0)
    dev = make().to("cupy")
    opt_h = optim.Adam(host.parameters(), lr=0.01, amsgrad=True)
    opt_d = optim.Adam(dev.parameters(), lr=0.01, amsgrad=True)
    for model, opt, xp in ((host, opt_h, np), (dev, opt_d, cupy)):
        args = [xp.asarray(a) if isinstance(a, np.ndarray) else a for a in inputs]
        logits = model(*args)
        loss, d = nn.functional.softmax_cross_entropy(logits, xp.asarray(targets))
        model.backward(d)
        optim.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.last = (logits, loss)
    np.testing.assert_allclose(dev.last[0].get(), host.last[0], **RTOL)
    assert dev.last[1] == pytest.approx(host.last[1], rel=1e-12)
    for (name, p), q in zip(host.named_parameters(), dev.parameters(), strict=True):
        assert isinstance(q.data, cupy.ndarray)
        np.testing.assert_allclose(q.grad.get(), p.grad, err_msg=name, **RTOL)
        np.testing.assert_allclose(q.data.get(), p.data, err_msg=name, **PARAM_TOL)
    return host, dev


def test_recurrent_model_on_cupy_matches_numpy(tmp_path):
    rng = np.random.default_rng(0)
    T, N = 6, 3
    tokens = rng.integers(0, 6, (T, N))
    lengths = np.array([6, 2, 4])
    host, dev = _same_step(SeqNet, [tokens, lengths], rng.integers(0, 6, (T, N)))
    io.save(tmp_path / "m.npz", dev.state_dict())
    back = SeqNet()
    back.load_state_dict(io.load(tmp_path / "m.npz"))
    for k, v in host.state_dict().items():
        np.testing.assert_allclose(back.state_dict()[k], v, err_msg=k, **PARAM_TOL)


def test_cnn_on_cupy_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 2, 4, 4))
    host, dev = _same_step(cnn, [x], rng.integers(0, 4, 5))
    for k, v in host.state_dict().items():  # running statistics too
        np.testing.assert_allclose(dev.state_dict()[k].get(), v, err_msg=k, **PARAM_TOL)
    dev.to("numpy")
    np.testing.assert_allclose(dev.eval()(x), host.eval()(x), rtol=1e-7, atol=1e-8)


def test_dropout_and_data_on_cupy():
    import cupy

    x = cupy.ones((100, 50))
    y = nn.Dropout(0.25, seed=0)(x)
    assert isinstance(y, cupy.ndarray)
    kept = y != 0
    assert abs(float(kept.mean()) - 0.75) < 0.03
    cupy.testing.assert_allclose(y[kept], 1 / 0.75)
    labels = cupy.arange(100)
    seen = cupy.concatenate([b for _, b in data.MiniBatches(x, labels, batch_size=7, seed=0)])
    assert sorted(seen.get().tolist()) == list(range(100))
    train, val, test = data.train_val_test_split(labels, val=0.2, test=0.2)
    assert isinstance(train, cupy.ndarray) and len(val) == len(test) == 20
