"""softmax_cross_entropy: torch's cross_entropy, stable for huge logits, exact gradient."""

from __future__ import annotations

import numpy as np
import pytest
from tolerances import assert_close

from fastrnn.nn import functional as F

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (3, 4, 6)])
def test_matches_torch(shape, dtype):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(shape) * 3).astype(dtype)
    targets = rng.integers(0, shape[-1], shape[:-1])
    loss, d = F.softmax_cross_entropy(logits, targets)
    lt = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(
        lt.reshape(-1, shape[-1]), torch.tensor(targets).reshape(-1)
    )
    ref.backward()
    assert isinstance(loss, float)
    assert d.shape == logits.shape and d.dtype == dtype
    assert_close(loss, ref.item(), "nn", "forward", dtype)
    assert_close(d, lt.grad.numpy(), "nn", "backward", dtype)


def test_stable_for_large_logits():
    logits = np.array([[1e4, 0.0, -1e4], [5e3, 5e3, 0.0]], np.float32)
    loss, d = F.softmax_cross_entropy(logits, np.array([1, 0]))
    assert np.isfinite(loss) and np.isfinite(d).all()
    np.testing.assert_allclose(loss, (1e4 + np.log(2)) / 2, rtol=1e-6)
    np.testing.assert_allclose(d, [[0.5, -0.5, 0], [-0.25, 0.25, 0]], atol=1e-7)


def test_finite_differences():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((4, 5))
    t = rng.integers(0, 5, 4)
    _, d = F.softmax_cross_entropy(logits, t)
    v = rng.standard_normal(logits.shape)
    eps = 1e-6
    numeric = (
        F.softmax_cross_entropy(logits + eps * v, t)[0]
        - F.softmax_cross_entropy(logits - eps * v, t)[0]
    ) / (2 * eps)
    np.testing.assert_allclose(np.sum(d * v), numeric, rtol=1e-6, atol=1e-9)


def test_errors():
    with pytest.raises(ValueError, match="targets"):
        F.softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="targets: expected shape"):
        F.softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        F.softmax_cross_entropy(np.zeros((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(TypeError, match="logits"):
        F.softmax_cross_entropy(np.zeros((2, 3), np.int64), np.array([0, 1]))


def test_activations():
    x = np.array([-1000.0, -1.0, 0.0, 2.0, 1000.0])
    np.testing.assert_allclose(F.sigmoid(x), torch.sigmoid(torch.tensor(x)).numpy(), rtol=1e-15)
    np.testing.assert_allclose(F.relu(x), np.maximum(x, 0))
    np.testing.assert_allclose(F.softmax(x), torch.softmax(torch.tensor(x), 0).numpy())
    np.testing.assert_allclose(
        F.log_softmax(x[:4]), torch.log_softmax(torch.tensor(x[:4]), 0).numpy(), rtol=1e-14
    )
