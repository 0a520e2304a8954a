"""fastrnn.torch's recurrent modules behave as torch.nn's where PyTorch's own RNN tests look:
argument checks and their exception types, constructor checks, initial states, empty batches,
repeated backward, gradients and second-order gradients, dropout changed between calls, old
pickles. Every check runs the fastrnn.torch class and its torch.nn twin side by side.
"""

from __future__ import annotations

import copy
import re

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn.utils import rnn as rnn_utils  # noqa: E402

import fastrnn.torch as ft  # noqa: E402

F64 = torch.float64
PAIRS = {"RNN": (ft.RNN, nn.RNN), "GRU": (ft.GRU, nn.GRU), "LSTM": (ft.LSTM, nn.LSTM)}


def _error(call):
    """(exception type, message) of ``call()``, or None when it does not raise."""
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return type(e), str(e)
    return None


def _same_error(ours, theirs, pattern=None):
    got, want = _error(ours), _error(theirs)
    assert want is not None, "torch.nn accepted it"
    assert got is not None, f"fastrnn.torch accepted what torch.nn refuses with {want}"
    assert got[0] is want[0], f"fastrnn.torch raised {got}, torch.nn {want}"
    if pattern is not None:
        assert re.search(pattern, got[1]), got[1]


# ------------------------------------------------------------------------------------------------
# argument checks
# ------------------------------------------------------------------------------------------------

I, H, L, B, S, BAD = 3, 5, 2, 4, 6, 7  # BAD: prime, no size divides it


def _shape_mistakes():
    good_x, good_h = (S, B, I), (L, B, H)

    def with_(shape, dim, size):
        shape = list(shape)
        shape[dim] = size
        return tuple(shape)

    return {
        "input batch": (with_(good_x, 1, BAD), good_h),
        "hidden batch": (good_x, with_(good_h, 1, BAD)),
        "input size": (with_(good_x, 2, BAD), good_h),
        "hidden size": (good_x, with_(good_h, 2, BAD)),
        "hidden layers": (good_x, with_(good_h, 0, BAD)),
    }


@pytest.mark.parametrize("mistake", list(_shape_mistakes()))
@pytest.mark.parametrize("mode", list(PAIRS))
def test_shape_mistakes_raise_runtime_error(mode, mistake):
    x_shape, h_shape = _shape_mistakes()[mistake]
    x, h = torch.randn(x_shape), torch.randn(h_shape)
    good_h = torch.randn(L, B, H)
    hiddens = [h] if mode != "LSTM" else [(h, good_h), (good_h, h)]
    ours_cls, theirs_cls = PAIRS[mode]
    for hx in hiddens:
        torch.manual_seed(0)
        ours = ours_cls(I, H, L)
        theirs = theirs_cls(I, H, L)
        with pytest.raises(RuntimeError):
            ours(x, hx)
        _same_error(lambda m=ours, hx=hx: m(x, hx), lambda m=theirs, hx=hx: m(x, hx))


@pytest.mark.parametrize("mode", list(PAIRS))
def test_forward_mistakes_raise_torch_types(mode):
    ours_cls, theirs_cls = PAIRS[mode]
    ours, theirs = ours_cls(10, 20, batch_first=True), theirs_cls(10, 20, batch_first=True)
    wrong_h = torch.zeros(1, 2, 19)
    hidden = (wrong_h, wrong_h) if mode == "LSTM" else wrong_h
    x_right, x_wrong = torch.randn(2, 3, 10), torch.randn(2, 3, 3)
    _same_error(lambda: ours(x_right, hidden), lambda: theirs(x_right, hidden),
                "Expected hidden.*size.*got")  # fmt: skip
    _same_error(lambda: ours(x_wrong), lambda: theirs(x_wrong),
                re.escape("input.size(-1) must be equal to input_size"))  # fmt: skip
    four_d = torch.randn(1, 2, 3, 10)
    _same_error(lambda: ours(four_d), lambda: theirs(four_d), "2D or 3D")
    _same_error(lambda: ours(x_right.double()), lambda: theirs(x_right.double()), "dtype")
    three_d_h = torch.zeros(1, 1, 20)
    unbatched = torch.randn(5, 10)
    hx = (three_d_h, three_d_h) if mode == "LSTM" else three_d_h
    _same_error(lambda: ours(unbatched, hx), lambda: theirs(unbatched, hx), "2-D")


@pytest.mark.parametrize("mode", list(PAIRS))
def test_empty_sequence_raises(mode):
    ours_cls, theirs_cls = PAIRS[mode]
    x = torch.zeros(0, 4, 3)
    _same_error(lambda: ours_cls(3, 4)(x), lambda: theirs_cls(3, 4)(x),
                "sequence length to be larger than 0")  # fmt: skip


CONSTRUCTOR_MISTAKES = {
    "proj_size on RNN/GRU": (("RNN", "GRU"), (30, 20, 2), {"proj_size": 10}),
    "proj_size >= hidden_size": (("LSTM",), (3, 4), {"proj_size": 4}),
    "negative proj_size": (("LSTM",), (3, 4), {"proj_size": -1}),
    "dropout > 1": (("RNN", "GRU", "LSTM"), (3, 4), {"dropout": 2.0}),
    "dropout not a number": (("RNN", "GRU", "LSTM"), (3, 4), {"dropout": "0.5"}),
    "hidden_size 0": (("RNN", "GRU", "LSTM"), (3, 0), {}),
    "num_layers 0": (("RNN", "GRU", "LSTM"), (3, 4, 0), {}),
    "bias not a bool": (("RNN", "GRU", "LSTM"), (3, 4), {"bias": 1}),
    "nonlinearity": (("RNN",), (3, 4), {"nonlinearity": "sigmoid"}),
}


@pytest.mark.parametrize("mistake", list(CONSTRUCTOR_MISTAKES))
def test_constructor_mistakes_raise_torch_types(mistake):
    modes, args, kwargs = CONSTRUCTOR_MISTAKES[mistake]
    for mode in modes:
        ours_cls, theirs_cls = PAIRS[mode]
        _same_error(lambda o=ours_cls: o(*args, **kwargs), lambda t=theirs_cls: t(*args, **kwargs))


def test_proj_size_on_gru_and_rnn_says_so():
    for cls in (ft.RNN, ft.GRU):
        with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
            cls(30, 20, 2, proj_size=10)


def test_device_mismatch_raises_runtime_error():
    m = ft.GRU(3, 4)
    x = torch.randn(2, 1, 3, device="meta")
    with pytest.raises(RuntimeError, match="not at the same device"):
        m(x)
    with pytest.raises(RuntimeError, match="not at the same device"):
        m(torch.randn(2, 1, 3), torch.zeros(1, 1, 4, device="meta"))


# ------------------------------------------------------------------------------------------------
# states, empty batches, repeated backward
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(PAIRS))
def test_zero_initial_state_equals_none(mode):
    m = PAIRS[mode][0](30, 20, 2, bidirectional=True, dtype=F64)
    x = torch.randn(10, 8, 30, dtype=F64)
    h = torch.zeros(4, 8, 20, dtype=F64)
    y1, h1 = m(x, (h, h) if mode == "LSTM" else h)
    y2, h2 = m(x)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(h1, h2)


@pytest.mark.parametrize("mode", list(PAIRS))
def test_empty_batch(mode):
    m = PAIRS[mode][0](3, 4)
    y, h = m(torch.zeros(5, 0, 3, requires_grad=True))
    assert y.shape == (5, 0, 4)
    y.sum().backward()
    assert m.weight_hh_l0.grad.shape == m.weight_hh_l0.shape


@pytest.mark.parametrize("mode", list(PAIRS))
def test_repeated_backward_with_retained_graph(mode):
    m = PAIRS[mode][0](10, 20, num_layers=2, dtype=F64)
    x = torch.randn(5, 6, 10, dtype=F64, requires_grad=True)
    y, _ = m(x)
    y.sum().backward(retain_graph=True)
    first = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    for _ in range(3):
        m.zero_grad()
        x.grad.zero_()
        y.sum().backward(retain_graph=True)
        for a, b in zip(first, [x.grad] + [p.grad for p in m.parameters()], strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("bias", [True, False])
def test_module_gradcheck_and_gradgradcheck(mode, bias):
    m = PAIRS[mode][0](4, 4, bias=bias, dtype=F64)
    x = torch.rand(1, 3, 4, dtype=F64, requires_grad=True)

    def flat(x):
        out, hidden = m(x)
        return (out, *(hidden if isinstance(hidden, tuple) else (hidden,)))

    assert torch.autograd.gradcheck(flat, (x,), check_batched_grad=False)
    assert torch.autograd.gradgradcheck(flat, (x,), check_batched_grad=False)


def test_input_gradient_is_differentiable_in_a_deep_stack():
    """A 20-layer batch_first LSTM: the input gradient built with create_graph=True, a loss on
    it, its backward; the same numbers as torch.nn."""
    torch.manual_seed(0)
    ours = ft.LSTM(3, 3, 20, batch_first=True)
    theirs = nn.LSTM(3, 3, 20, batch_first=True)
    theirs.load_state_dict(ours.state_dict())
    x = torch.rand(10, 12, 3)
    results = []
    for m in (ours, theirs):
        xx = x.clone().requires_grad_()
        out, _ = m(xx)
        (d,) = torch.autograd.grad(out, xx, torch.ones_like(out), create_graph=True)
        d.sum().backward()
        results.append((d.detach(), xx.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# dropout, pickles, packed sequences
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
def test_dropout_changed_between_calls(train):
    torch.manual_seed(0)
    m = ft.RNN(20, 20, 2, nonlinearity="relu", dtype=F64).train(train)
    x = torch.rand(3, 2, 20, dtype=F64)
    previous = None
    for p in (0, 0.5, 0, 0.7, 0.2, 1, 0.2, 0):
        m.dropout = p
        y1, h1 = m(x)
        y2, h2 = m(x)
        if p in (0, 1) or not train:
            torch.testing.assert_close(y1, y2)
            torch.testing.assert_close(h1, h2)
        else:
            assert not torch.allclose(y1, y2)
        if previous is not None:
            assert torch.equal(y1, previous) != train
        previous = y1


def test_old_pickle_without_proj_size():
    """A state from before proj_size existed (PyTorch 1.7) loads through __setstate__."""
    m = ft.LSTM(2, 3)
    x = torch.randn(32, 5, 2)
    expected = m(x)
    state = copy.copy(m.__dict__)
    del state["proj_size"]
    m2 = ft.LSTM(2, 3)
    m2.__setstate__(state)
    torch.testing.assert_close(m2(x), expected)


@pytest.mark.parametrize("lengths_as_tensor", [True, False])
@pytest.mark.parametrize("mode", list(PAIRS))
def test_packed_and_padded_input_agree_with_torch(mode, lengths_as_tensor):
    """Sorted lengths (enforce_sorted=True), batch_first padded input, bias=False,
    non-contiguous input and initial state: output, final state and every gradient."""
    ours_cls, theirs_cls = PAIRS[mode]
    torch.manual_seed(0)
    ours = ours_cls(10, 6, 2, bias=False, bidirectional=True, batch_first=True, dtype=F64)
    theirs = theirs_cls(10, 6, 2, bias=False, bidirectional=True, batch_first=True, dtype=F64)
    theirs.load_state_dict(ours.state_dict())
    lengths = [7, 5, 5, 2, 1, 1]
    lengths = torch.tensor(lengths) if lengths_as_tensor else lengths
    x = torch.randn(7, 6, 10, dtype=F64).transpose(0, 1)  # (6, 7, 10), not contiguous
    h0 = torch.randn(6, 4, 6, dtype=F64).transpose(0, 1)  # (4, 6, 6), not contiguous
    grads = []
    for m in (ours, theirs):
        xx, hh = x.clone().requires_grad_(), h0.clone().requires_grad_()
        hx = (hh, hh * 2) if mode == "LSTM" else hh
        packed = rnn_utils.pack_padded_sequence(xx, lengths, batch_first=True)
        out, hidden = m(packed, hx)
        hidden = hidden if isinstance(hidden, tuple) else (hidden,)
        (out.data.square().sum() + sum(h.square().sum() for h in hidden)).backward()
        grads.append([out.data, *hidden, xx.grad, hh.grad, *(p.grad for p in m.parameters())])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------
# LSTM projections
# ------------------------------------------------------------------------------------------------


def test_projection_shape_mistakes_raise_runtime_error():
    """h of proj_size features, c of hidden_size: every wrong shape is torch.nn's RuntimeError,
    wrong hidden sizes included (h given hidden_size features, c given proj_size)."""
    P = 2
    good_h, good_c = (L, B, P), (L, B, H)
    cases = [
        ((S, BAD, I), good_h, good_c),
        ((S, B, I), (L, BAD, P), (L, BAD, H)),
        ((S, B, BAD), good_h, good_c),
        ((S, B, I), (L, B, BAD), (L, B, BAD)),
        ((S, B, I), (BAD, B, P), (BAD, B, H)),
        ((S, B, I), (L, B, H), good_c),
        ((S, B, I), good_h, (L, B, P)),
    ]
    torch.manual_seed(0)
    ours = ft.LSTM(I, H, L, proj_size=P)
    theirs = nn.LSTM(I, H, L, proj_size=P)
    for x_shape, h_shape, c_shape in cases:
        x, hx = torch.randn(x_shape), (torch.randn(h_shape), torch.randn(c_shape))
        with pytest.raises(RuntimeError):
            ours(x, hx)
        _same_error(lambda x=x, hx=hx: ours(x, hx), lambda x=x, hx=hx: theirs(x, hx))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_projection_zero_initial_state_equals_none(bidirectional):
    m = ft.LSTM(30, 20, 2, bidirectional=bidirectional, proj_size=10, dtype=F64)
    dirs = 2 if bidirectional else 1
    x = torch.randn(10, 8, 30, dtype=F64)
    hx = (torch.zeros(2 * dirs, 8, 10, dtype=F64), torch.zeros(2 * dirs, 8, 20, dtype=F64))
    y1, (h1, c1) = m(x, hx)
    y2, (h2, c2) = m(x)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(h1, h2)
    torch.testing.assert_close(c1, c2)


def test_projection_forward_mistakes_raise_torch_types():
    ours = ft.LSTM(10, 20, batch_first=True, proj_size=10)
    theirs = nn.LSTM(10, 20, batch_first=True, proj_size=10)
    wrong = (torch.zeros(1, 2, 19), torch.zeros(1, 2, 19))
    x_right, x_wrong = torch.randn(2, 3, 10), torch.randn(2, 3, 3)
    _same_error(lambda: ours(x_right, wrong), lambda: theirs(x_right, wrong),
                "Expected hidden.*size.*got")  # fmt: skip
    _same_error(lambda: ours(x_wrong), lambda: theirs(x_wrong), "input_size")
