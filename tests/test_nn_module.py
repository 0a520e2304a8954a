"""Module and Parameter: registration, state dicts (strict loading and its errors), modes,
gradients, freezing, dtype and array-module moves."""

from __future__ import annotations

import numpy as np
import pytest
from nn_support import layer_backend, torch_state  # noqa: F401

from fastrnn import nn


def small_model(dtype=np.float32):
    nn.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6, dtype=dtype),
        nn.BatchNorm1d(6, dtype=dtype),
        nn.ReLU(),
        nn.Dropout(0.2, seed=0),
        nn.Linear(6, 3, dtype=dtype),
    )


def test_parameter_basics():
    p = nn.Parameter(np.ones((2, 3), np.float32))
    assert p.shape == (2, 3) and p.dtype == np.float32
    assert p.grad.shape == (2, 3) and not p.grad.any()
    p.accumulate(np.ones((2, 3), np.float32))
    p.accumulate(np.ones((2, 3), np.float32))
    assert (p.grad == 2).all()
    p.requires_grad = False
    p.accumulate(np.ones((2, 3), np.float32))
    assert (p.grad == 2).all()
    with pytest.raises(TypeError, match="floating"):
        nn.Parameter(np.ones(3, np.int64))
    with pytest.raises(TypeError, match="ndarray"):
        nn.Parameter([1.0, 2.0])


def test_names_match_torch_and_nesting():
    torch = pytest.importorskip("torch")
    m = small_model()
    t = torch.nn.Sequential(
        torch.nn.Linear(4, 6),
        torch.nn.BatchNorm1d(6),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(6, 3),
    )
    assert list(m.state_dict()) == list(t.state_dict())
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in t.named_parameters()]
    assert len(list(m.parameters())) == 6
    assert "Linear(in_features=4" in repr(m)


def test_torch_state_dict_loads_and_predicts_the_same():
    torch = pytest.importorskip("torch")
    t = torch.nn.Sequential(
        torch.nn.Linear(4, 6),
        torch.nn.BatchNorm1d(6),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(6, 3),
    )
    t.train()
    t(torch.randn(16, 4))  # moves the running statistics away from their initial values
    t.eval()
    m = small_model().eval()
    m.load_state_dict(t.state_dict())  # torch tensors directly, through __array__
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(m(x), t(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_load_state_dict_errors_name_every_key():
    m = small_model()
    sd = {k: v.copy() for k, v in m.state_dict().items()}
    del sd["0.bias"]
    sd["9.weight"] = np.zeros(3, np.float32)
    sd["4.weight"] = np.zeros((3, 5), np.float32)
    with pytest.raises(ValueError) as err:
        m.load_state_dict(sd)
    msg = str(err.value)
    assert "missing keys: 0.bias" in msg
    assert "unexpected keys: 9.weight" in msg
    assert "4.weight: expected shape (3, 6), got (3, 5)" in msg
    before = m.state_dict()["0.weight"].copy()
    sd["0.weight"] = sd["0.weight"] + 1
    with pytest.raises(ValueError):  # nothing is copied when anything is wrong
        m.load_state_dict(sd)
    np.testing.assert_array_equal(m.state_dict()["0.weight"], before)
    sd["4.weight"] = np.zeros((3, 6))
    result = m.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["0.bias"] and result.unexpected_keys == ["9.weight"]
    np.testing.assert_array_equal(m.state_dict()["0.weight"], before + 1)
    assert m.state_dict()["4.weight"].dtype == np.float32  # cast to the parameter's dtype
    with pytest.raises(TypeError, match="mapping"):
        m.load_state_dict([1, 2])
    with pytest.raises(TypeError, match="0.weight"):
        m.load_state_dict({**sd, "0.weight": "abc"}, strict=False)


def test_state_dict_round_trip_gives_identical_predictions():
    a, b = (
        small_model().eval(),
        nn.Sequential(
            nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.2), nn.Linear(6, 3)
        ).eval(),
    )
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    assert not np.array_equal(a(x), b(x))
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a(x), b(x))


def test_train_eval_recurse():
    m = small_model()
    assert all(sub.training for sub in m.modules())
    m.eval()
    assert not any(sub.training for sub in m.modules())
    m.train()
    assert all(sub.training for sub in m.modules())


def test_zero_grad_and_freezing():
    m = small_model(np.float64)
    x = np.random.default_rng(2).standard_normal((8, 4))
    y = m(x)
    m.backward(np.ones_like(y))
    assert all(p.grad.any() for p in m.parameters())
    m.zero_grad()
    assert not any(p.grad.any() for p in m.parameters())
    m[0].requires_grad_(False)
    m(x)
    m.backward(np.ones_like(y))
    assert not m[0].weight.grad.any() and m[4].weight.grad.any()


def test_to_dtype_and_numpy():
    m = small_model()
    p = m[0].weight
    m.to(np.float64)
    assert m[0].weight is p and p.data.dtype == np.float64 and p.grad.dtype == np.float64
    assert m[1].running_mean.dtype == np.float64
    assert m[1].num_batches_tracked.dtype == np.int64
    x = np.zeros((3, 4))
    assert m(x).dtype == np.float64
    m.to("numpy").float()
    assert p.data.dtype == np.float32
    with pytest.raises(TypeError, match="target"):
        m.to(np.int32)
    with pytest.raises(TypeError, match="target"):
        m.to("tpu")


def test_no_grad_saves_nothing():
    m = small_model()
    x = np.zeros((3, 4), np.float32)
    with nn.no_grad():
        y = m(x)
    with pytest.raises(RuntimeError, match="no forward pass"):
        m.backward(np.ones_like(y))


def test_module_attribute_rules():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.scale = nn.Parameter(np.ones(1, np.float32))

    net = Net()
    # own parameters first, then the children's (torch.nn's order)
    assert [n for n, _ in net.named_parameters()] == ["scale", "fc.weight", "fc.bias"]
    with pytest.raises(TypeError, match="scale"):
        net.scale = np.ones(1)

    class Broken(nn.Module):
        def __init__(self):
            self.fc = nn.Linear(2, 2)

    with pytest.raises(RuntimeError, match="__init__"):
        Broken()
