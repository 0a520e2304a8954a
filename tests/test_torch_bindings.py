"""fastrnn.torch: the torch.nn drop-ins against torch.nn itself, gradcheck, zero copy, errors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import CUDA  # noqa: E402
from tolerances import tol  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import fastrnn  # noqa: E402
import fastrnn.torch as ft  # noqa: E402

TORCH_DTYPES = [torch.float32, torch.float64]
NP = {torch.float32: np.float32, torch.float64: np.float64}

# (fastrnn.torch class, torch.nn class, extra constructor arguments)
RECURRENT = {
    "lstm": (ft.LSTM, nn.LSTM, {}),
    "gru": (ft.GRU, nn.GRU, {}),
    "rnn_tanh": (ft.RNN, nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (ft.RNN, nn.RNN, {"nonlinearity": "relu"}),
}

# configurations: constructor arguments and whether the input carries lengths
CONFIGS = {
    "plain": dict(kwargs={}, lengths=False),
    "batch_first": dict(kwargs={"batch_first": True}, lengths=False),
    "no_bias": dict(kwargs={"bias": False}, lengths=False),
    "2layer_bidir": dict(kwargs={"num_layers": 2, "bidirectional": True}, lengths=False),
    "lengths": dict(kwargs={}, lengths=True),
    "lengths_2layer_bidir_bf": dict(
        kwargs={"num_layers": 2, "bidirectional": True, "batch_first": True}, lengths=True
    ),
}

T, N, D, H = 6, 4, 5, 3
LENGTHS = [6, 2, 5, 1]  # unsorted, with the extremes 1 and T


def assert_close(actual, desired, op, direction, dtype, name=""):
    np.testing.assert_allclose(
        actual.detach().cpu().numpy(),
        desired.detach().cpu().numpy(),
        err_msg=name,
        **tol(op, direction, NP[dtype]),
    )


def twins(kind: str, dtype, **kwargs):
    """A fastrnn.torch module and its torch.nn twin with the same (seeded) initial weights."""
    ours, theirs, extra = RECURRENT[kind]
    torch.manual_seed(0)
    a = ours(D, H, dtype=dtype, **extra, **kwargs)
    torch.manual_seed(0)
    b = theirs(D, H, dtype=dtype, **extra, **kwargs)
    return a, b


def states_of(kind, hidden):
    return list(hidden) if kind == "lstm" else [hidden]


# ------------------------------------------------------------------------------------------------
# same parameters, same outputs, same gradients as torch.nn
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(RECURRENT))
def test_parameters_match_torch(kind):
    a, b = twins(kind, torch.float32, num_layers=2, bidirectional=True)
    assert isinstance(a, RECURRENT[kind][1])
    names_a = [(n, p.shape) for n, p in a.named_parameters()]
    names_b = [(n, p.shape) for n, p in b.named_parameters()]
    assert names_a == names_b
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n  # same initialisation, same random stream
    b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("kind", list(RECURRENT))
def test_recurrent_matches_torch(kind, dtype, config):
    cfg = CONFIGS[config]
    kwargs = cfg["kwargs"]
    a, b = twins(kind, dtype, **kwargs)
    dirs = 2 if kwargs.get("bidirectional") else 1
    layers = kwargs.get("num_layers", 1)
    batch_first = kwargs.get("batch_first", False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, N, D, generator=g, dtype=dtype)
    if batch_first:
        x = x.transpose(0, 1).contiguous()
    hx = [torch.randn(layers * dirs, N, H, generator=g, dtype=dtype) for _ in range(2)]
    hx = tuple(hx) if kind == "lstm" else hx[0]
    leaves_a = [x.clone().requires_grad_()] + [h.clone().requires_grad_() for h in _flat(hx)]
    leaves_b = [x.clone().requires_grad_()] + [h.clone().requires_grad_() for h in _flat(hx)]
    hx_a = _unflat(kind, leaves_a[1:])
    hx_b = _unflat(kind, leaves_b[1:])
    wy = torch.randn(T, N, dirs * H, generator=g, dtype=dtype)
    if batch_first:
        wy = wy.transpose(0, 1)
    wh = torch.randn(layers * dirs, N, H, generator=g, dtype=dtype)

    if cfg["lengths"]:
        lengths = torch.tensor(LENGTHS)
        # torch.nn's answer through a PackedSequence (enforce_sorted=False keeps the batch order)
        packed = pack_padded_sequence(leaves_b[0], lengths, batch_first, enforce_sorted=False)
        out_p, hid_b = b(packed, hx_b)
        y_b, _ = pad_packed_sequence(out_p, batch_first, total_length=T)
        y_a, hid_a = a(leaves_a[0], hx_a, lengths=lengths)
    else:
        y_b, hid_b = b(leaves_b[0], hx_b)
        y_a, hid_a = a(leaves_a[0], hx_a)

    assert y_a.shape == y_b.shape and y_a.dtype == dtype
    assert_close(y_a, y_b, "recurrent", "forward", dtype, "output")
    for i, (s_a, s_b) in enumerate(
        zip(states_of(kind, hid_a), states_of(kind, hid_b), strict=True)
    ):
        assert s_a.shape == s_b.shape
        assert_close(s_a, s_b, "recurrent", "forward", dtype, f"state {i}")

    def loss(y, hid):
        return (y * wy).sum() + sum(
            (s * (k + 1) * wh).sum() for k, s in enumerate(states_of(kind, hid))
        )

    loss(y_a, hid_a).backward()
    loss(y_b, hid_b).backward()
    for i, (la, lb) in enumerate(zip(leaves_a, leaves_b, strict=True)):
        assert_close(la.grad, lb.grad, "recurrent", "backward", dtype, f"grad of input {i}")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert_close(p.grad, q.grad, "recurrent", "backward", dtype, f"grad of {n}")


def _flat(hx):
    return list(hx) if isinstance(hx, tuple) else [hx]


def _unflat(kind, tensors):
    return tuple(tensors) if kind == "lstm" else tensors[0]


@pytest.mark.parametrize(
    "bidirectional, batch_first", [(False, False), (True, True)], ids=["uni", "bidir_bf"]
)
@pytest.mark.parametrize("kind", list(RECURRENT))
def test_packed_sequence_in_and_out(kind, bidirectional, batch_first):
    """PackedSequence input gives a PackedSequence with torch.nn's data, batch_sizes and
    indices; hx and h_n are in the caller's batch order (unsorted); batch_first does not
    apply to packed data."""
    dtype = torch.float64
    a, b = twins(kind, dtype, num_layers=2, bidirectional=bidirectional, batch_first=batch_first)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, N, D, generator=g, dtype=dtype)
    dirs = 2 if bidirectional else 1
    hx = [torch.randn(2 * dirs, N, H, generator=g, dtype=dtype) for _ in range(2)]
    hx = tuple(hx) if kind == "lstm" else hx[0]
    for enforce_sorted in (False, True):
        lengths = sorted(LENGTHS, reverse=True) if enforce_sorted else LENGTHS
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        packed_a = pack_padded_sequence(xa, torch.tensor(lengths), enforce_sorted=enforce_sorted)
        packed_b = pack_padded_sequence(xb, torch.tensor(lengths), enforce_sorted=enforce_sorted)
        out_a, hid_a = a(packed_a, hx)
        out_b, hid_b = b(packed_b, hx)
        assert type(out_a) is type(out_b)
        assert torch.equal(out_a.batch_sizes, out_b.batch_sizes)
        for name in ("sorted_indices", "unsorted_indices"):
            ia, ib = getattr(out_a, name), getattr(out_b, name)
            assert (ia is None and ib is None) or torch.equal(ia, ib), name
        assert_close(out_a.data, out_b.data, "recurrent", "forward", dtype, "packed data")
        for s_a, s_b in zip(states_of(kind, hid_a), states_of(kind, hid_b), strict=True):
            assert_close(s_a, s_b, "recurrent", "forward", dtype, "final state")
        w = torch.randn_like(out_b.data)
        (out_a.data * w).sum().backward()
        (out_b.data * w).sum().backward()
        assert_close(xa.grad, xb.grad, "recurrent", "backward", dtype, "grad through packing")


@pytest.mark.parametrize("kind", list(RECURRENT))
def test_unbatched_input(kind):
    dtype = torch.float64
    a, b = twins(kind, dtype, num_layers=2)
    x = torch.randn(T, D, dtype=dtype)
    y_a, hid_a = a(x)
    y_b, hid_b = b(x)
    assert y_a.shape == (T, H)
    assert_close(y_a, y_b, "recurrent", "forward", dtype, "output")
    for s_a, s_b in zip(states_of(kind, hid_a), states_of(kind, hid_b), strict=True):
        assert s_a.shape == (2, H)
        assert_close(s_a, s_b, "recurrent", "forward", dtype, "final state")


def test_padded_outputs_are_zero_past_each_length():
    a, _ = twins("lstm", torch.float64, bidirectional=True)
    x = torch.randn(T, N, D, dtype=torch.float64)
    y, _ = a(x, lengths=LENGTHS)
    for n, L in enumerate(LENGTHS):
        assert torch.count_nonzero(y[L:, n]) == 0
        assert torch.count_nonzero(y[:L, n]) == L * 2 * H


def test_only_final_state_used():
    """An unused output gets no gradient from autograd; the binding feeds zeros for it."""
    a, b = twins("lstm", torch.float64)
    x = torch.randn(T, N, D, dtype=torch.float64)
    _, (h_a, _) = a(x)
    _, (h_b, _) = b(x)
    h_a.sum().backward()
    h_b.sum().backward()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert_close(p.grad, q.grad, "recurrent", "backward", torch.float64)


# ------------------------------------------------------------------------------------------------
# LSTM projections (proj_size)
# ------------------------------------------------------------------------------------------------

P = 2  # proj_size < H


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=["float32", "float64"])
def test_lstm_projection_matches_torch(dtype, config):
    """LSTM(proj_size=P): parameter names (weight_hr_l*), outputs of P features, cell states
    of H, and every gradient equal torch.nn.LSTM's."""
    cfg = CONFIGS[config]
    kwargs = dict(cfg["kwargs"], proj_size=P)
    a, b = twins("lstm", dtype, **kwargs)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    assert any(n.startswith("weight_hr_l") for n, _ in a.named_parameters())
    dirs = 2 if kwargs.get("bidirectional") else 1
    layers = kwargs.get("num_layers", 1)
    batch_first = kwargs.get("batch_first", False)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(T, N, D, generator=g, dtype=dtype)
    if batch_first:
        x = x.transpose(0, 1).contiguous()
    h0 = torch.randn(layers * dirs, N, P, generator=g, dtype=dtype)
    c0 = torch.randn(layers * dirs, N, H, generator=g, dtype=dtype)
    results = []
    for m, use_packed in ((a, False), (b, cfg["lengths"])):
        leaves = [t.clone().requires_grad_() for t in (x, h0, c0)]
        if cfg["lengths"] and use_packed:
            packed = pack_padded_sequence(leaves[0], torch.tensor(LENGTHS), batch_first,
                                          enforce_sorted=False)  # fmt: skip
            out, (h, c) = m(packed, tuple(leaves[1:]))
            y, _ = pad_packed_sequence(out, batch_first, total_length=T)
        elif cfg["lengths"]:
            y, (h, c) = m(leaves[0], tuple(leaves[1:]), lengths=LENGTHS)
        else:
            y, (h, c) = m(leaves[0], tuple(leaves[1:]))
        assert y.shape[-1] == dirs * P and h.shape[-1] == P and c.shape[-1] == H
        (y.square().sum() + (h * 2).sum() + (c * 3).sum()).backward()
        results.append([y, h, c] + [t.grad for t in leaves] + [p.grad for p in m.parameters()])
    for i, (u, v) in enumerate(zip(*results, strict=True)):
        direction = "forward" if i < 3 else "backward"
        assert_close(u, v, "recurrent", direction, dtype, f"result {i}")


def test_gradcheck_lstm_projection():
    dtype = torch.float64
    torch.manual_seed(0)
    m = ft.LSTM(3, 3, num_layers=2, bidirectional=True, proj_size=2, dtype=dtype)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    x = torch.randn(4, 3, 3, dtype=dtype, requires_grad=True)
    h0 = torch.randn(4, 3, 2, dtype=dtype, requires_grad=True)
    c0 = torch.randn(4, 3, 3, dtype=dtype, requires_grad=True)

    def f(x, h0, c0, *ps):
        p = dict(zip(names, ps, strict=True))
        y, (h, c) = torch.func.functional_call(m, p, (x, (h0, c0)), {"lengths": [4, 1, 3]})
        return y, h, c

    assert torch.autograd.gradcheck(f, (x, h0, c0, *params), eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# dropout between layers
# ------------------------------------------------------------------------------------------------


def test_dropout_between_layers_like_a_manual_stack():
    """num_layers=3, dropout=p equals three 1-layer modules with F.dropout between them
    (training), and equals torch.nn in eval mode (no dropout)."""
    dtype = torch.float64
    torch.manual_seed(0)
    stacked = ft.GRU(D, H, num_layers=3, dropout=0.5, dtype=dtype)
    singles = [ft.GRU(D if k == 0 else H, H, dtype=dtype) for k in range(3)]
    for k, m in enumerate(singles):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(m, f"{name}_l0").data.copy_(getattr(stacked, f"{name}_l{k}"))
    x = torch.randn(T, N, D, dtype=dtype)

    torch.manual_seed(5)
    y, h = stacked(x)
    torch.manual_seed(5)
    out, hs = x, []
    for k, m in enumerate(singles):
        if k:
            out = F.dropout(out, 0.5, training=True)
        out, hk = m(out)
        hs.append(hk)
    torch.testing.assert_close(y, out)
    torch.testing.assert_close(h, torch.cat(hs))

    stacked.eval()
    twin = nn.GRU(D, H, num_layers=3, dropout=0.5, dtype=dtype).eval()
    twin.load_state_dict(stacked.state_dict())
    y_eval, _ = stacked(x)
    assert not torch.allclose(y_eval, y)  # dropout did act in training mode
    assert_close(y_eval, twin(x)[0], "recurrent", "forward", dtype, "eval output")


# ------------------------------------------------------------------------------------------------
# gradcheck (float64)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(RECURRENT))
def test_gradcheck_recurrent(kind):
    """Every input, initial state and parameter of a 2-layer bidirectional module with
    lengths, by central differences."""
    dtype = torch.float64
    ours, _, extra = RECURRENT[kind]
    torch.manual_seed(0)
    m = ours(3, 2, num_layers=2, bidirectional=True, dtype=dtype, **extra)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    x = torch.randn(4, 3, 3, dtype=dtype, requires_grad=True)
    states = [torch.randn(4, 3, 2, dtype=dtype, requires_grad=True)]
    if kind == "lstm":
        states.append(torch.randn(4, 3, 2, dtype=dtype, requires_grad=True))
    lengths = [4, 1, 3]
    n_states = len(states)

    def f(x, *rest):
        hx = rest[:n_states]
        p = dict(zip(names, rest[n_states:], strict=True))
        y, hid = torch.func.functional_call(
            m, p, (x, tuple(hx) if kind == "lstm" else hx[0]), {"lengths": lengths}
        )
        return (y, *states_of(kind, hid))

    assert torch.autograd.gradcheck(f, (x, *states, *params), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(stride=1, padding=0),
        dict(stride=2, padding=1, dilation=2, groups=2),
        dict(stride=(2, 1), padding=(0, 1), bias=False),
    ],
    ids=["plain", "strided_dilated_grouped", "no_bias"],
)
def test_gradcheck_conv2d(kwargs):
    dtype = torch.float64
    torch.manual_seed(0)
    m = ft.Conv2d(4, 2, (3, 2), dtype=dtype, **kwargs)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    x = torch.randn(2, 4, 6, 5, dtype=dtype, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Conv2d
# ------------------------------------------------------------------------------------------------

CONV_CASES = {
    "k3": dict(args=(3, 4, 3), kwargs={}),
    "k3_p1_s2": dict(args=(3, 4, 3), kwargs=dict(stride=2, padding=1)),
    "dilated_grouped": dict(args=(4, 6, (3, 2)), kwargs=dict(padding=(2, 1), dilation=2, groups=2)),
    "depthwise_no_bias": dict(args=(4, 4, 3), kwargs=dict(groups=4, bias=False)),
    "same_odd_total": dict(args=(3, 2, (4, 3)), kwargs=dict(padding="same")),
    "same_dilated": dict(args=(3, 2, 3), kwargs=dict(padding="same", dilation=2)),
    "valid": dict(args=(3, 2, 2), kwargs=dict(padding="valid")),
}


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch.nn's own note on its copy
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_matches_torch(case, dtype):
    c = CONV_CASES[case]
    torch.manual_seed(0)
    a = ft.Conv2d(*c["args"], dtype=dtype, **c["kwargs"])
    torch.manual_seed(0)
    b = nn.Conv2d(*c["args"], dtype=dtype, **c["kwargs"])
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    x = torch.randn(2, c["args"][0], 9, 8, dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    assert ya.shape == yb.shape
    assert_close(ya, yb, "conv", "forward", dtype, "output")
    w = torch.randn_like(yb)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    assert_close(xa.grad, xb.grad, "conv", "backward", dtype, "dx")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert_close(p.grad, q.grad, "conv", "backward", dtype, n)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=["float32", "float64"])
def test_conv2d_input_without_grad_skips_dx(dtype, monkeypatch):
    """An input that needs no gradient (a first layer): the backward asks the kernels for dw
    and db only, as torch's output_mask does, and the weights' gradients equal torch.nn's."""
    from fastrnn.torch import _ops

    asked = []
    real = _ops.conv2d_gradients

    def spy(ctx, dy, *, input_grad):
        asked.append(input_grad)
        return real(ctx, dy, input_grad=input_grad)

    monkeypatch.setattr(_ops, "conv2d_gradients", spy)
    torch.manual_seed(0)
    a = ft.Conv2d(1, 5, 3, dtype=dtype)
    b = nn.Conv2d(1, 5, 3, dtype=dtype)
    b.load_state_dict(a.state_dict())
    for needs in (False, True):
        x = torch.randn(3, 1, 9, 8, dtype=dtype)
        xa, xb = x.clone().requires_grad_(needs), x.clone().requires_grad_(needs)
        w = torch.randn(3, 5, 7, 6, dtype=dtype)
        (a(xa) * w).sum().backward()
        (b(xb) * w).sum().backward()
        assert asked[-1] is needs
        assert (xa.grad is None) == (not needs)
        if needs:
            assert_close(xa.grad, xb.grad, "conv", "backward", dtype, "dx")
        for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
            assert_close(p.grad, q.grad, "conv", "backward", dtype, n)
            p.grad = q.grad = None
    handle = _ops.conv2d(torch.randn(2, 1, 5, 5, dtype=dtype), a.weight.detach(), None,
                         [1, 1], [0, 0], [1, 1], 1, True)[1]
    dx, dw, db = torch.ops.fastrnn.conv2d_backward(
        handle, torch.randn(2, 1, 5, 5, dtype=dtype), a.weight.detach(), False,
        torch.randn(2, 5, 3, 3, dtype=dtype), False,
    )  # fmt: skip
    assert dx.numel() == 0 and dw.shape == a.weight.shape and db.numel() == 0


def test_conv2d_unbatched_and_noncontiguous_input():
    dtype = torch.float64
    torch.manual_seed(0)
    a = ft.Conv2d(3, 2, 3, padding=1, dtype=dtype)
    b = nn.Conv2d(3, 2, 3, padding=1, dtype=dtype)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 7, 6, dtype=dtype)
    assert_close(a(x), b(x), "conv", "forward", dtype)
    xt = torch.randn(2, 3, 6, 7, dtype=dtype).transpose(2, 3)  # not contiguous
    assert_close(a(xt), b(xt), "conv", "forward", dtype)


POOL_CASES = {
    "max_k2": ("max", dict(kernel_size=2)),
    "max_k3_s2_p1": ("max", dict(kernel_size=3, stride=2, padding=1)),
    "max_rect": ("max", dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0))),
    "avg_k2": ("avg", dict(kernel_size=2)),
    "avg_k3_s2_p1": ("avg", dict(kernel_size=3, stride=2, padding=1)),
    "avg_rect": ("avg", dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 1))),
}


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(POOL_CASES))
def test_pooling_matches_torch(case, dtype):
    kind, kwargs = POOL_CASES[case]
    ours = (ft.MaxPool2d if kind == "max" else ft.AvgPool2d)(**kwargs)
    theirs = (nn.MaxPool2d if kind == "max" else nn.AvgPool2d)(**kwargs)
    x = torch.randn(2, 3, 9, 8, dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    assert ya.shape == yb.shape
    assert_close(ya, yb, "pool", "forward", dtype, "output")
    w = torch.randn_like(yb)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    assert_close(xa.grad, xb.grad, "pool", "backward", dtype, "dx")
    assert_close(ours(x[0]), theirs(x[0]), "pool", "forward", dtype, "unbatched")
    torch.autograd.gradcheck(ours, (x.double()[:1].requires_grad_(),), eps=1e-6, atol=1e-7)


def test_unsupported_pooling_options_raise():
    for kwargs, name in [
        (dict(dilation=2), "dilation"),
        (dict(return_indices=True), "return_indices"),
        (dict(ceil_mode=True), "ceil_mode"),
    ]:
        with pytest.raises(ValueError, match=name):
            ft.MaxPool2d(2, **kwargs)
    for kwargs, name in [
        (dict(ceil_mode=True), "ceil_mode"),
        (dict(count_include_pad=False), "count_include_pad"),
        (dict(divisor_override=3), "divisor_override"),
    ]:
        with pytest.raises(ValueError, match=name):
            ft.AvgPool2d(2, **kwargs)
    with pytest.raises(TypeError, match="input"):
        ft.MaxPool2d(2)(torch.ones(1, 1, 4, 4, dtype=torch.float16))


# ------------------------------------------------------------------------------------------------
# inside a torch training loop
# ------------------------------------------------------------------------------------------------


class _Regressor(torch.nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, 1, dtype=rnn.weight_hh_l0.dtype)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y[-1])


def _train(model, x, target, steps):
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_training_loop_converges_like_torch(kind):
    """Adam on a small sequence-regression task (the target is the sum of the first input
    feature over time): same loss curve as the torch.nn twin, and it learns."""
    dtype = torch.float64
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 32, 2, generator=g, dtype=dtype)
    target = x[:, :, :1].sum(0) / 3
    ours, theirs, _ = RECURRENT[kind]
    torch.manual_seed(0)
    model_a = _Regressor(ours(2, 8, dtype=dtype))
    torch.manual_seed(0)
    model_b = _Regressor(theirs(2, 8, dtype=dtype))
    losses_a = _train(model_a, x, target, 60)
    losses_b = _train(model_b, x, target, 60)
    np.testing.assert_allclose(losses_a, losses_b, rtol=1e-7, atol=1e-10)
    assert losses_a[-1] < 0.1 * losses_a[0]
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# zero copy, inference, in-place checks
# ------------------------------------------------------------------------------------------------


def _ptr(a):
    return a.__array_interface__["data"][0]


def test_lstm_hands_the_tensors_memory_to_the_kernel(monkeypatch):
    seen = {}
    real = fastrnn.lstm_forward

    def spy(x, h0, c0, w_ih, w_hh, b, **kw):
        seen.update(x=x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, training=kw["training"])
        out = real(x, h0, c0, w_ih, w_hh, b, **kw)
        seen["y"] = out[0]
        return out

    monkeypatch.setattr(fastrnn, "lstm_forward", spy)
    m = ft.LSTM(D, H)
    x = torch.randn(T, N, D, requires_grad=True)
    h0, c0 = torch.randn(1, N, H), torch.randn(1, N, H)
    y, _ = m(x, (h0, c0))
    assert _ptr(seen["x"]) == x.data_ptr()
    assert _ptr(seen["h0"]) == h0.data_ptr()
    assert _ptr(seen["c0"]) == c0.data_ptr()
    assert _ptr(seen["w_ih"]) == m.weight_ih_l0.data_ptr()
    assert _ptr(seen["w_hh"]) == m.weight_hh_l0.data_ptr()
    assert _ptr(seen["y"]) == y.data_ptr()  # the output tensor is the kernel's array
    assert seen["training"] is True

    seen.clear()
    with torch.no_grad():
        y, _ = m(x)
    # inference runs on the prepared layers (fastrnn.lstm_inference), which save nothing for
    # backward, not on the training forward
    from fastrnn.torch import modules

    assert "training" not in seen and m in modules._PREPARED and not y.requires_grad


def test_conv2d_hands_the_tensors_memory_to_the_kernel(monkeypatch):
    seen = {}
    real = fastrnn.conv2d_forward

    def spy(x, w, b=None, **kw):
        seen.update(x=x, w=w, b=b)
        out = real(x, w, b, **kw)
        seen["y"] = out[0]
        return out

    monkeypatch.setattr(fastrnn, "conv2d_forward", spy)
    m = ft.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    y = m(x)
    assert _ptr(seen["x"]) == x.data_ptr()
    assert _ptr(seen["w"]) == m.weight.data_ptr()
    assert _ptr(seen["b"]) == m.bias.data_ptr()
    assert _ptr(seen["y"]) == y.data_ptr()


def test_eval_without_grad_matches_and_cannot_backward():
    a, b = twins("rnn_tanh", torch.float32)
    x = torch.randn(T, N, D)
    with torch.no_grad():
        y_a, _ = a(x)
    assert not y_a.requires_grad
    assert_close(y_a, b(x)[0], "recurrent", "forward", torch.float32)


def test_in_place_change_before_backward_is_caught():
    m = ft.LSTM(D, H, dtype=torch.float64)
    x = torch.randn(T, N, D, dtype=torch.float64, requires_grad=True)
    y, _ = m(x)
    with torch.no_grad():
        m.weight_hh_l0.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_double_backward_matches_torch():
    """A loss built from a gradient (create_graph=True) gets the second-order terms right: the
    issue's reproducer, side by side with torch.nn."""
    torch.manual_seed(0)
    ours = ft.LSTM(3, 3).double()
    theirs = nn.LSTM(3, 3).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    for m in (ours, theirs):
        y, _ = m(x)
        (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        assert g.requires_grad
        (y.pow(2).sum() + g.pow(2).sum()).backward()
    for (n, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert_close(p.grad, q.grad, "recurrent", "backward", torch.float64, n)


# ------------------------------------------------------------------------------------------------
# unsupported cases raise, never fall back
# ------------------------------------------------------------------------------------------------


def test_unsupported_configurations_raise():
    with pytest.raises(ValueError, match="padding_mode"):
        ft.Conv2d(3, 4, 3, padding_mode="reflect")
    with pytest.raises(TypeError, match="dtype"):
        ft.GRU(D, H, dtype=torch.float16)
    with pytest.raises(TypeError, match="dtype"):
        ft.Conv2d(3, 4, 3, dtype=torch.bfloat16)
    m = ft.LSTM(D, H).half()
    with pytest.raises(TypeError, match="input"):
        m(torch.randn(T, N, D).half())
    conv = ft.Conv2d(3, 4, 3).half()
    with pytest.raises(TypeError, match="input"):
        conv(torch.randn(1, 3, 5, 5).half())


def test_bad_input_names_the_argument():
    """fastrnn's own checks (lengths) name the argument; the mistakes torch.nn checks raise
    torch.nn's exception types (tests/test_torch_nn_behaviour.py has them side by side)."""
    m = ft.LSTM(D, H)
    x = torch.randn(T, N, D)
    with pytest.raises(RuntimeError, match="input_size"):
        m(torch.randn(T, N, D + 1))
    with pytest.raises(ValueError, match="2D or 3D"):
        m(torch.randn(T, N, D, 1))
    with pytest.raises(ValueError, match="dtype"):
        m(x.double())
    with pytest.raises(RuntimeError, match="hidden"):
        m(x, (torch.zeros(2, N, H), torch.zeros(1, N, H)))
    with pytest.raises(ValueError, match="lengths"):
        m(x, lengths=[T + 1] * N)
    with pytest.raises(ValueError, match="lengths"):
        m(x, lengths=[0] * N)
    with pytest.raises(ValueError, match="lengths"):
        m(x, lengths=[1] * (N - 1))
    with pytest.raises(TypeError, match="lengths"):
        m(x, lengths=[1.5] * N)
    with pytest.raises(ValueError, match="lengths"):
        m(pack_padded_sequence(x, [T] * N), lengths=[T] * N)
    g = ft.GRU(D, H)
    with pytest.raises(RuntimeError, match="hx"):
        g(x, torch.zeros(1, N, H, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# CUDA tensors: CuPy views through DLPack, PyTorch's current stream (visibly skipped without GPU)
# ------------------------------------------------------------------------------------------------

CUDA_OK = CUDA and torch.cuda.is_available()
cuda_param = pytest.param(
    "cuda",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not CUDA_OK, reason="needs cupy.is_available() and torch.cuda"),
    ],
)


@pytest.mark.parametrize("device", [cuda_param])
@pytest.mark.parametrize("kind", list(RECURRENT))
def test_recurrent_on_cuda_matches_torch(kind, device):
    dtype = torch.float64
    a, b = twins(kind, dtype, num_layers=2, bidirectional=True)
    a, b = a.to(device), b.to(device)
    x = torch.randn(T, N, D, dtype=dtype, device=device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    lengths = torch.tensor(LENGTHS)
    stream = torch.cuda.Stream()  # a non-default stream: the kernels must run on it
    with torch.cuda.stream(stream):
        y_a, hid_a = a(xa, lengths=lengths)
        y_a.square().sum().backward()
    stream.synchronize()
    packed = pack_padded_sequence(xb, lengths, enforce_sorted=False)
    out, hid_b = b(packed)
    y_b, _ = pad_packed_sequence(out, total_length=T)
    y_b.square().sum().backward()
    assert y_a.device.type == "cuda"
    assert_close(y_a, y_b, "recurrent", "forward", dtype, "output")
    for s_a, s_b in zip(states_of(kind, hid_a), states_of(kind, hid_b), strict=True):
        assert_close(s_a, s_b, "recurrent", "forward", dtype, "final state")
    assert_close(xa.grad, xb.grad, "recurrent", "backward", dtype, "dx")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert_close(p.grad, q.grad, "recurrent", "backward", dtype, n)


@pytest.mark.parametrize("device", [cuda_param])
def test_cuda_zero_copy_and_conv2d(device, monkeypatch):
    seen = {}
    real = fastrnn.conv2d_forward

    def spy(x, w, b=None, **kw):
        seen.update(x=x, w=w)
        out = real(x, w, b, **kw)
        seen["y"] = out[0]
        return out

    monkeypatch.setattr(fastrnn, "conv2d_forward", spy)
    dtype = torch.float32
    torch.manual_seed(0)
    a = ft.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, dtype=dtype).to(device)
    b = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, dtype=dtype).to(device)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4, 9, 8, dtype=dtype, device=device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = a(xa)
    assert seen["x"].data.ptr == xa.data_ptr() and seen["w"].data.ptr == a.weight.data_ptr()
    assert seen["y"].data.ptr == ya.data_ptr()
    yb = b(xb)
    assert_close(ya, yb, "conv", "forward", dtype, "output")
    ya.sum().backward()
    yb.sum().backward()
    assert_close(xa.grad, xb.grad, "conv", "backward", dtype, "dx")
    assert_close(a.weight.grad, b.weight.grad, "conv", "backward", dtype, "dw")
