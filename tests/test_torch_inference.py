"""fastrnn.torch's recurrent modules under no_grad / inference_mode: prepared layers, reused while
the parameters are unchanged and prepared again after any in-place update; results equal
torch.nn step by step."""

from __future__ import annotations

import copy
import pickle

import pytest

torch = pytest.importorskip("torch")

import fastrnn.torch as ft  # noqa: E402
from fastrnn.torch import modules  # noqa: E402

CASES = [
    pytest.param(ft.LSTM, torch.nn.LSTM, {}, id="lstm"),
    pytest.param(ft.LSTM, torch.nn.LSTM, {"proj_size": 3}, id="lstm_proj"),
    pytest.param(ft.GRU, torch.nn.GRU, {}, id="gru"),
    pytest.param(ft.RNN, torch.nn.RNN, {"nonlinearity": "relu"}, id="rnn_relu"),
]


def _pair(ours, theirs, kw):
    torch.manual_seed(0)
    m = ours(5, 7, num_layers=2, **kw).double()
    t = theirs(5, 7, num_layers=2, **kw).double()
    t.load_state_dict(m.state_dict())
    return m, t


def _flat(out):
    y, state = out
    return [y, *(state if isinstance(state, tuple) else (state,))]


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("ours,theirs,kw", CASES)
def test_steps_match_torch_nn(ours, theirs, kw, context):
    m, t = _pair(ours, theirs, kw)
    x = torch.randn(100, 3, 5, dtype=torch.float64)
    with getattr(torch, context)():
        sm = st = None
        for n in range(100):  # states after 1, 2, ..., 100 single steps
            a, sm = m(x[n : n + 1], sm)
            b, st = t(x[n : n + 1], st)
            if n in (0, 1, 99):
                for p, q in zip(_flat((a, sm)), _flat((b, st)), strict=True):
                    torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
        # a whole sequence, with lengths, on the same prepared layers
        lengths = torch.tensor([100, 37, 1])
        a = m(x, lengths=lengths)
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        yb, sb = t(packed)
        yb, _ = torch.nn.utils.rnn.pad_packed_sequence(yb, total_length=100)
        for p, q in zip(_flat(a), _flat((yb, sb)), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    assert m in modules._PREPARED  # the prepared path ran
    assert not a[0].requires_grad


@pytest.mark.parametrize("ours,theirs,kw", CASES)
def test_updates_invalidate_prepared_weights(ours, theirs, kw):
    m, t = _pair(ours, theirs, kw)
    x = torch.randn(1, 3, 5, dtype=torch.float64)

    def check():
        with torch.no_grad():
            for p, q in zip(_flat(m(x)), _flat(t(x)), strict=True):
                torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)

    check()
    prepared = modules._PREPARED[m][0][1]
    check()
    assert modules._PREPARED[m][0][1] is prepared  # reused while nothing changed
    # an optimizer step (both modules the same step)
    for mod in (m, t):
        opt = torch.optim.SGD(mod.parameters(), lr=0.5)
        mod(torch.randn(4, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[
            0
        ].sum().backward()
        opt.step()
    check()
    # load_state_dict and an in-place change of one parameter
    sd = {k: v * 1.5 for k, v in m.state_dict().items()}
    m.load_state_dict(sd)
    t.load_state_dict(sd)
    check()
    with torch.no_grad():
        m.weight_hh_l1.add_(0.25)
        t.weight_hh_l1.add_(0.25)
    check()
    # the modules still pickle and copy (the cache is not part of them)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        with torch.no_grad():
            torch.testing.assert_close(clone(x)[0], m(x)[0])


@pytest.mark.parametrize("ours,theirs,kw", CASES)
def test_frozen_parameters_with_gradients_enabled(ours, theirs, kw):
    """Parameters that need no gradient, gradients enabled, no initial state (the forward's
    own zero states): the prepared layers when the input needs no gradient either, autograd
    when it does; torch.nn's results both ways."""
    m, t = _pair(ours, theirs, kw)
    m.requires_grad_(False)
    t.requires_grad_(False)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    for p, q in zip(_flat(m(x)), _flat(t(x)), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    assert m in modules._PREPARED
    xg = x.clone().requires_grad_()
    a, b = m(xg)[0], t(xg)[0]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    (ga,) = torch.autograd.grad(a.sum(), xg)
    (gb,) = torch.autograd.grad(b.sum(), xg)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


def test_training_calls_do_not_use_prepared_layers():
    m = ft.LSTM(5, 7)
    x = torch.randn(3, 2, 5)
    y, _ = m(x)
    assert y.requires_grad and m not in modules._PREPARED


@pytest.mark.parametrize("ours,theirs,kw", CASES)
def test_one_step_fast_path_cases(ours, theirs, kw):
    """The one-step call (fastrnn/torch/modules.py:_one_step): batch_first, float32, no state,
    swapped parameters, and mistakes that must still raise torch.nn's errors."""
    torch.manual_seed(1)
    m = ours(5, 7, num_layers=3, batch_first=True, **kw)
    t = theirs(5, 7, num_layers=3, batch_first=True, **kw)
    t.load_state_dict(m.state_dict())
    x = torch.randn(4, 1, 5)
    with torch.no_grad():
        for p, q in zip(_flat(m(x)), _flat(t(x)), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        _, state = t(x)
        for p, q in zip(_flat(m(x, state)), _flat(t(x, state)), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        # the outputs are fresh tensors, not views of the state
        y, s = m(x, state)
        first = s[0] if isinstance(s, tuple) else s
        y.zero_()
        assert first.abs().sum() > 0
        # functional_call's tensors, not the module's parameters
        doubled = {k: v * 2 for k, v in m.state_dict().items()}
        got = torch.func.functional_call(m, doubled, (x,))
        want = torch.func.functional_call(t, doubled, (x,))
        for p, q in zip(_flat(got), _flat(want), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        # mistakes: torch.nn's exception types
        bad = (
            (state[0][:, :2], state[1]) if isinstance(state, tuple) else state[:, :2]
        )
        for args in ((x, bad), (x.double(), state), (torch.randn(4, 1, 6), state)):
            with pytest.raises(Exception) as theirs_error:
                t(*args)
            with pytest.raises(theirs_error.type):
                m(*args)
