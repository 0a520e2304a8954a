"""Helpers shared by the layer-API tests (tests/test_nn_*.py).

The layer tests run on the default backend (NumPy arrays -> the CPU kernels). Set
``FASTRNN_TEST_BACKEND=numpy`` to run them on the NumPy reference instead (e.g. in a checkout
whose kernels are not built).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from tolerances import tol

import fastrnn as fr

BACKEND = os.environ.get("FASTRNN_TEST_BACKEND", "auto")


@pytest.fixture(autouse=True)
def layer_backend():
    """Every layer test runs inside ``fastrnn.use_backend(FASTRNN_TEST_BACKEND or "auto")``."""
    with fr.use_backend(BACKEND):
        yield


def torch_state(module: Any) -> dict[str, np.ndarray]:
    """A torch.nn module's state dict as NumPy arrays (what users load into fastrnn)."""
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def check_directional_grads(
    forward: Callable[[], Any],
    backward: Callable[[Any], Any],
    x: np.ndarray | None,
    params: list[Any],
    seed: int = 0,
    eps: float = 1e-6,
) -> None:
    """Central finite differences of L = sum(y * R) along one random direction per input and per
    parameter, against the analytic gradients (float64).

    forward() -> y (reads ``x`` and the parameters, which are perturbed in place);
    backward(R) -> dx (and accumulates the parameters' grads).
    """
    rng = np.random.default_rng(seed)
    y = forward()
    R = rng.standard_normal(y.shape)
    for p in params:
        p.grad[...] = 0
    dx = backward(R)

    def loss() -> float:
        return float(np.sum(forward() * R))

    targets = [] if x is None else [("x", x, dx)]
    targets += [(f"param{i}", p.data, p.grad.copy()) for i, p in enumerate(params)]
    for name, arr, grad in targets:
        v = rng.standard_normal(arr.shape)
        arr += eps * v
        lp = loss()
        arr -= 2 * eps * v
        lm = loss()
        arr += eps * v
        numeric = (lp - lm) / (2 * eps)
        analytic = float(np.sum(grad * v))
        np.testing.assert_allclose(
            analytic,
            numeric,
            err_msg=f"directional derivative along {name}",
            **tol("fd", "backward", np.float64),
        )
