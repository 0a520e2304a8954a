"""PyTorch's own RNN tests (``test/test_nn.py`` of a pytorch/pytorch checkout), run with
torch.nn.LSTM, GRU and RNN replaced by fastrnn.torch's classes.

Nothing of PyTorch's test code lives here: set ``FASTRNN_PYTORCH_TEST_NN`` to the path of
``test/test_nn.py`` from a pytorch checkout of the installed version (its directory must also
hold what that file imports from ``test/``; it needs ``expecttest`` and ``hypothesis``). Without
it the test is skipped, visibly. fastrnn's own tests of the same behaviours are in
tests/test_torch_nn_behaviour.py and tests/test_torch_ops.py.

UPSTREAM lists the CPU tests of recurrent modules; every one must pass.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import unittest

import pytest

torch = pytest.importorskip("torch")

import fastrnn.torch as ft  # noqa: E402

# (TestCase class, test method) of test/test_nn.py that exercise nn.RNN/GRU/LSTM on the CPU
UPSTREAM = [
    ("TestNN", "test_rnn_args_check"),
    ("TestNN", "test_projections_lstm_args_check"),
    ("TestNN", "test_rnn_initial_hidden_state"),
    ("TestNN", "test_projections_lstm_initial_hidden_state"),
    ("TestNN", "test_projections_errors_on_gru_and_rnn"),
    ("TestNN", "test_cudnn_forward_exception"),
    ("TestNN", "test_RNN_input_size_zero"),
    ("TestNNDeviceTypeCPU", "test_rnn_retain_variables_cpu_float64"),
    ("TestNNDeviceTypeCPU", "test_LSTM_grad_and_gradgrad_cpu_float64"),
    ("TestNNDeviceTypeCPU", "test_GRU_grad_and_gradgrad_cpu_float64"),
    ("TestNNDeviceTypeCPU", "test_LSTM_differentiable_backward_using_oneDNN_cpu_float32"),
    ("TestNNDeviceTypeCPU", "test_LSTM_differentiable_backward_using_oneDNN_cpu_bfloat16"),
    ("TestNNDeviceTypeCPU", "test_save_lstm_compatibility_cpu"),
    ("TestNN", "test_RNN_nonlinearity"),
    ("TestNN", "test_RNN_nonlinearity_passed_as_arg"),
    ("TestNN", "test_rnn_weight_norm"),
    ("TestNNDeviceTypeCPU", "test_variable_sequence_cpu_float32"),
]

PATH = os.environ.get("FASTRNN_PYTORCH_TEST_NN", "")


def _load(path: str):
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        spec = importlib.util.spec_from_file_location("pytorch_test_nn", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module


@pytest.mark.skipif(not PATH, reason="set FASTRNN_PYTORCH_TEST_NN to pytorch's test/test_nn.py")
@pytest.mark.parametrize("case", UPSTREAM, ids=[m for _, m in UPSTREAM])
def test_pytorch_rnn_test(case, monkeypatch):
    pytest.importorskip("expecttest")
    default_dtype = torch.get_default_dtype()
    result = unittest.TestResult()
    try:
        module = _load(PATH)  # as PyTorch runs it (test_nn.py may set a default dtype)
        cls_name, method = case
        cls = getattr(module, cls_name)
        for name in ("LSTM", "GRU", "RNN"):
            monkeypatch.setattr(torch.nn, name, getattr(ft, name))
        cls(method).run(result)
    finally:
        torch.set_default_dtype(default_dtype)
    failures = result.errors + result.failures
    assert not result.skipped, result.skipped
    assert not failures, failures[0][1]
