"""Feed-forward layers vs their torch.nn twins (outputs, input and parameter gradients,
buffers), with torch's state dicts copied across; finite differences in float64."""

from __future__ import annotations

import numpy as np
import pytest
from nn_support import check_directional_grads, layer_backend, torch_state  # noqa: F401
from tolerances import assert_close

from fastrnn import nn

torch = pytest.importorskip("torch")


def _twins(dtype):
    """name -> (fastrnn layer, torch layer, input shape); fresh each call."""
    T = torch.nn
    return {
        "linear": (nn.Linear(5, 4, dtype=dtype), T.Linear(5, 4), (2, 3, 5)),
        "linear_nobias": (
            nn.Linear(5, 4, bias=False, dtype=dtype),
            T.Linear(5, 4, bias=False),
            (3, 5),
        ),
        "relu": (nn.ReLU(), T.ReLU(), (4, 6)),
        "sigmoid": (nn.Sigmoid(), T.Sigmoid(), (4, 6)),
        "tanh": (nn.Tanh(), T.Tanh(), (4, 6)),
        "flatten": (nn.Flatten(), T.Flatten(), (2, 3, 4, 5)),
        "conv": (nn.Conv2d(3, 4, 3, dtype=dtype), T.Conv2d(3, 4, 3), (2, 3, 7, 6)),
        "conv_geometry": (
            nn.Conv2d(
                4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2, dtype=dtype
            ),
            T.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
            (2, 4, 7, 6),
        ),
        "conv_nobias": (
            nn.Conv2d(2, 3, 1, bias=False, dtype=dtype),
            T.Conv2d(2, 3, 1, bias=False),
            (2, 2, 4, 5),
        ),
        "maxpool": (nn.MaxPool2d(2), T.MaxPool2d(2), (2, 3, 7, 6)),
        "maxpool_pad": (nn.MaxPool2d(3, stride=2, padding=1), T.MaxPool2d(3, 2, 1), (2, 3, 7, 6)),
        "avgpool": (nn.AvgPool2d(2), T.AvgPool2d(2), (2, 3, 7, 6)),
        "avgpool_pad": (nn.AvgPool2d(3, stride=2, padding=1), T.AvgPool2d(3, 2, 1), (2, 3, 7, 6)),
        "bn1d": (nn.BatchNorm1d(4, dtype=dtype), T.BatchNorm1d(4), (6, 4)),
        "bn1d_3d": (
            nn.BatchNorm1d(4, momentum=None, dtype=dtype),
            T.BatchNorm1d(4, momentum=None),
            (3, 4, 5),
        ),
        "bn2d": (
            nn.BatchNorm2d(3, eps=1e-3, momentum=0.3, dtype=dtype),
            T.BatchNorm2d(3, eps=1e-3, momentum=0.3),
            (4, 3, 3, 2),
        ),
        "bn2d_noaffine": (
            nn.BatchNorm2d(3, affine=False, dtype=dtype),
            T.BatchNorm2d(3, affine=False),
            (4, 3, 3, 2),
        ),
        "bn2d_nostats": (
            nn.BatchNorm2d(3, track_running_stats=False, dtype=dtype),
            T.BatchNorm2d(3, track_running_stats=False),
            (4, 3, 3, 2),
        ),
        "sequential": (
            nn.Sequential(
                nn.Conv2d(2, 3, 3, padding=1, dtype=dtype),
                nn.BatchNorm2d(3, dtype=dtype),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(12, 5, dtype=dtype),
                nn.Tanh(),
            ),
            T.Sequential(
                T.Conv2d(2, 3, 3, padding=1),
                T.BatchNorm2d(3),
                T.ReLU(),
                T.MaxPool2d(2),
                T.Flatten(),
                T.Linear(12, 5),
                T.Tanh(),
            ),
            (3, 2, 4, 4),
        ),
    }


NAMES = list(_twins(np.float64))


def _randomise_torch(t):
    """Non-trivial affine parameters and running statistics, so that loading them matters."""
    with torch.no_grad():
        for name, b in t.named_buffers():
            if name.endswith("running_mean"):
                b.uniform_(-0.5, 0.5)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
        for name, p in t.named_parameters():
            if "bn" in name or p.ndim == 1:
                p.uniform_(0.5, 1.5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", NAMES)
def test_matches_torch(name, dtype, training):
    rng = np.random.default_rng(0)
    m, t, shape = _twins(dtype)[name]
    t = t.double() if dtype == np.float64 else t.float()
    _randomise_torch(t)
    m.load_state_dict(torch_state(t))
    m.train(training)
    t.train(training)
    x = rng.standard_normal(shape).astype(dtype)
    xt = torch.tensor(x, requires_grad=True)
    yt = t(xt)
    y = m(x)
    assert y.dtype == dtype
    assert_close(y, yt.detach().numpy(), "nn", "forward", dtype, "y")
    dy = rng.standard_normal(y.shape).astype(dtype)
    (yt * torch.tensor(dy)).sum().backward()
    dx = m.backward(dy)
    assert_close(dx, xt.grad.numpy(), "nn", "backward", dtype, "dx")
    tparams = dict(t.named_parameters())
    assert [n for n, _ in m.named_parameters()] == list(tparams)
    for pname, p in m.named_parameters():
        assert_close(p.grad, tparams[pname].grad.numpy(), "nn", "backward", dtype, pname)
    ts = torch_state(t)
    ms = m.state_dict()
    assert list(ms) == list(ts)
    for key, value in ts.items():  # running statistics and num_batches_tracked
        assert_close(ms[key], value, "nn", "forward", dtype, key)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", NAMES)
def test_finite_differences(name, training):
    rng = np.random.default_rng(1)
    m, t, shape = _twins(np.float64)[name]
    m.train(training)
    x = rng.standard_normal(shape)
    if not training and "bn" in name:
        m.load_state_dict(
            {
                k: (rng.uniform(0.5, 2, v.shape) if k.endswith("var") else v)
                for k, v in m.state_dict().items()
            }
        )
    check_directional_grads(lambda: m(x), m.backward, x, list(m.parameters()))


def test_embedding_matches_torch():
    rng = np.random.default_rng(2)
    t = torch.nn.Embedding(7, 3, padding_idx=2).double()
    m = nn.Embedding(7, 3, padding_idx=2, dtype=np.float64)
    assert not m.weight.data[2].any()
    m.load_state_dict(torch_state(t))
    idx = np.array([[1, 2, 6], [1, 1, 0]])
    y = m(idx)
    yt = t(torch.tensor(idx))
    assert_close(y, yt.detach().numpy(), "nn", "forward", np.float64)
    dy = rng.standard_normal(y.shape)
    (yt * torch.tensor(dy)).sum().backward()
    assert m.backward(dy) is None
    assert_close(m.weight.grad, t.weight.grad.numpy(), "nn", "backward", np.float64)
    with pytest.raises(ValueError, match="indices"):
        m(np.array([7]))
    with pytest.raises(TypeError, match="integer"):
        m(np.array([1.0]))


def test_embedding_init_and_linear_init():
    nn.manual_seed(0)
    e = nn.Embedding(200, 50)
    assert abs(e.weight.data.std() - 1) < 0.05  # N(0, 1) like torch
    lin = nn.Linear(64, 300)
    assert np.abs(lin.weight.data).max() <= 1 / 8 and np.abs(lin.bias.data).max() <= 1 / 8
    conv = nn.Conv2d(4, 8, 3, groups=2)
    assert np.abs(conv.weight.data).max() <= 1 / np.sqrt(2 * 9)


def test_dropout_inverted_seeded_identity_in_eval():
    x = np.ones((200, 50))
    d = nn.Dropout(0.3, seed=1)
    y = d(x)
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1 / 0.7)
    assert abs(kept.mean() - 0.7) < 0.02
    dy = np.arange(x.size, dtype=np.float64).reshape(x.shape)
    np.testing.assert_array_equal(d.backward(dy), dy * y)  # the same mask, scaled
    np.testing.assert_array_equal(nn.Dropout(0.3, seed=1)(x), y)  # seeded: reproducible
    assert not np.array_equal(d(x), y)  # a fresh mask per call
    d.eval()
    assert d(x) is x and d.backward(dy) is dy
    assert not nn.Dropout(1.0).train()(x).any()
    with pytest.raises(ValueError, match="p"):
        nn.Dropout(1.2)


def test_batchnorm_running_stats_over_batches_like_torch():
    rng = np.random.default_rng(3)
    for momentum in (0.1, None):
        t = torch.nn.BatchNorm1d(4, momentum=momentum).double()
        m = nn.BatchNorm1d(4, momentum=momentum, dtype=np.float64)
        for _ in range(5):
            x = rng.standard_normal((8, 4)) * 3 + 1
            m(x)
            t(torch.tensor(x))
        for key, value in torch_state(t).items():
            assert_close(m.state_dict()[key], value, "nn", "forward", np.float64, key)
        assert int(m.num_batches_tracked) == 5
    with pytest.raises(ValueError, match="more than 1 value"):
        nn.BatchNorm1d(4)(np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="features"):
        nn.BatchNorm2d(4)(np.zeros((2, 3, 2, 2), np.float32))


def test_layer_errors():
    lin = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="dtype"):
        lin(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="expected shape"):
        lin(np.zeros((1, 4), np.float32))
    with pytest.raises(TypeError, match="ndarray"):
        lin([[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="dimensions"):
        nn.Conv2d(3, 2, 3)(np.zeros((3, 5, 5), np.float32))
    with pytest.raises(ValueError, match="groups"):
        nn.Conv2d(3, 2, 3, groups=2)
    with pytest.raises(ValueError, match="stride"):
        nn.MaxPool2d(2, stride=0)
    lin(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="dy"):
        lin.backward(np.zeros((2, 3), np.float32))


def test_embedding_and_dropout_finite_differences():
    rng = np.random.default_rng(4)
    e = nn.Embedding(5, 3, dtype=np.float64)  # no padding_idx: its row gets no gradient
    idx = np.array([[0, 1, 4], [4, 4, 2]])
    check_directional_grads(lambda: e(idx), e.backward, None, [e.weight])
    d = nn.Dropout(0.4, seed=3)
    x = rng.standard_normal((6, 5))

    def forward():
        d._rngs.clear()  # the same mask on every call
        return d(x)

    check_directional_grads(forward, d.backward, x, [])
