"""Every backend module (numpy, cpu, cuda) implements every function of the backend interface
(fastrnn/backends/base.py) with the same parameter names, in the same order."""

from __future__ import annotations

import importlib
import importlib.util
import inspect

import pytest

from fastrnn.backends import BACKENDS, backend_module
from fastrnn.backends.base import OPS, Backend
from fastrnn.backends.cuda import _MODULE_OF as CUDA_MODULE_OF


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _expected(op: str) -> list[str]:
    return _params(getattr(Backend, op))[1:]  # without self


def test_interface_lists_every_op():
    assert {
        "lstm_forward",
        "lstm_backward",
        "gru_forward",
        "gru_backward",
        "rnn_forward",
        "rnn_backward",
        "conv2d_forward",
        "conv2d_backward",
        "max_pool2d_forward",
        "max_pool2d_backward",
        "avg_pool2d_forward",
        "avg_pool2d_backward",
    } <= set(OPS)
    assert BACKENDS == ("numpy", "cpu", "cuda")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_host_backends_match_interface(backend, op):
    fn = getattr(backend_module(backend), op)
    assert callable(fn)
    assert _params(fn) == _expected(op), f"{backend}.{op}"


@pytest.mark.parametrize("op", OPS)
def test_cuda_backend_matches_interface(op):
    """The CUDA launchers live in fastrnn/_cuda/<module>.py; check them where they exist (the
    check needs CuPy importable, not a GPU)."""
    name = f"fastrnn._cuda.{CUDA_MODULE_OF[op.rpartition('_')[0]]}"
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} does not exist yet")
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # CuPy missing: nothing to introspect
        pytest.skip(f"{name} cannot be imported here: {exc}")
    assert hasattr(module, op), f"{name} has no {op}"
    if op == "lstm_forward" and "w_hr" not in _params(getattr(module, op)):
        # The interface gained w_hr (LSTM projections) before the CUDA launcher did; once the
        # launcher takes it, this check applies in full again.
        pytest.xfail("the CUDA LSTM launcher does not take w_hr yet")
    assert _params(getattr(module, op)) == _expected(op), f"{name}.{op}"
    # and the backend module hands out exactly that function
    assert getattr(backend_module("cuda"), op) is getattr(module, op)
