"""fastrnn's torch operators: registration checks, torch.compile with fullgraph, torch.export,
meta tensors, double backward, threads, serialisation, TorchScript."""

from __future__ import annotations

import gc
import io
import threading
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tolerances import tol  # noqa: E402
from torch import nn  # noqa: E402

import fastrnn  # noqa: E402
import fastrnn.torch as ft  # noqa: E402
from fastrnn.torch import _contexts, _ops  # noqa: E402

F64 = torch.float64


def _leaf(*shape, dtype=F64, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _op_cases():
    """(name, operator, arguments) for every forward operator."""
    T, N, D, H = 4, 3, 5, 2
    lengths = torch.tensor([4, 1, 3])
    x = _leaf(T, N, D)
    img = _leaf(1, 2, 5, 4)  # small: gradgradcheck perturbs every element
    return [
        ("lstm", _ops.lstm, (x, _leaf(N, H), _leaf(N, H), _leaf(4 * H, D), _leaf(4 * H, H),
                             _leaf(4 * H), _leaf(4 * H), None, lengths, True)),
        ("lstm_no_bias", _ops.lstm, (x, _leaf(N, H), _leaf(N, H), _leaf(4 * H, D),
                                     _leaf(4 * H, H), None, None, None, None, True)),
        ("lstm_projection", _ops.lstm, (x, _leaf(N, 1), _leaf(N, H), _leaf(4 * H, D),
                                        _leaf(4 * H, 1), _leaf(4 * H), None, _leaf(1, H),
                                        lengths, True)),
        ("gru", _ops.gru, (x, _leaf(N, H), _leaf(3 * H, D), _leaf(3 * H, H), _leaf(3 * H),
                           _leaf(3 * H), lengths, True)),
        ("rnn_relu", _ops.rnn, (x, _leaf(N, H), _leaf(H, D), _leaf(H, H), _leaf(H), _leaf(H),
                                None, "relu", True)),
        ("conv2d", _ops.conv2d, (img, _leaf(3, 2, 3, 2), _leaf(3), [2, 1], [1, 0], [1, 2], 1,
                                 True)),
        ("conv2d_relu", _ops.conv2d, (img, _leaf(3, 2, 3, 3), _leaf(3), [1, 1], [1, 1],
                                      [1, 1], 1, True, "relu")),
        ("conv2d_grouped_no_bias", _ops.conv2d, (img, _leaf(2, 1, 2, 2), None, [1, 1],
                                                 [0, 0], [1, 1], 2, True)),
        # three images: the direct kernels pool them in their schedule (one thread at this size)
        ("conv2d_relu_max_pool", _ops.conv2d, (_leaf(3, 2, 6, 5), _leaf(3, 2, 3, 3), _leaf(3),
                                               [1, 1], [1, 1], [1, 1], 1, True, "relu",
                                               [2, 2, 2, 2, 0, 0])),
        ("conv2d_max_pool_overlapping", _ops.conv2d, (img, _leaf(3, 2, 2, 2), None, [1, 1],
                                                      [1, 0], [1, 1], 1, True, None,
                                                      [3, 2, 2, 1, 1, 0])),
        ("max_pool2d", _ops.max_pool2d, (img, [3, 2], [2, 1], [1, 0], True)),
        ("avg_pool2d", _ops.avg_pool2d, (img, [2, 2], [2, 2], [1, 1], True)),
    ]  # fmt: skip


OP_CASES = {name: (op, args) for name, op, args in _op_cases()}


@pytest.mark.parametrize("name", list(OP_CASES))
def test_opcheck(name):
    """torch.library's own checks: schema, fake implementation against the real one, autograd
    registration, and AOTAutograd tracing (what torch.compile does) against eager."""
    op, args = OP_CASES[name]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", list(OP_CASES))
def test_gradcheck_and_gradgradcheck(name):
    """First order runs fastrnn's backward kernels, second order the torch formulation."""
    op, args = OP_CASES[name]
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def f(*tensors):
        full = list(args)
        for i, t in zip(positions, tensors, strict=True):
            full[i] = t
        return tuple(o for o in op(*full) if o.is_floating_point())

    inputs = tuple(args[i] for i in positions)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)
    # fast mode: the Jacobian of the backward along random directions (the full check of the
    # torch formulation's second order is torch's own business; this checks the wiring)
    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


# ------------------------------------------------------------------------------------------------
# torch.compile and torch.export
# ------------------------------------------------------------------------------------------------


class _Model(nn.Module):
    """Every fastrnn.torch module in one model."""

    def __init__(self):
        super().__init__()
        self.conv = ft.Conv2d(1, 4, 3, padding=1)
        self.max = ft.MaxPool2d(2)
        self.avg = ft.AvgPool2d(2, padding=1)
        self.lstm = ft.LSTM(6, 5, num_layers=2, bidirectional=True)
        self.gru = ft.GRU(10, 4, batch_first=True)
        self.rnn = ft.RNN(4, 3, nonlinearity="relu")

    def forward(self, img, seq, lengths):
        a = self.avg(self.max(self.conv(img))).flatten(1).sum(1)
        y, (h, c) = self.lstm(seq, lengths=lengths)
        y, h2 = self.gru(y.transpose(0, 1))
        y, h3 = self.rnn(y.transpose(0, 1))
        return a.sum() + y.square().sum() + h.sum() + c.sum() + h2.sum() + h3.sum()


def _model_and_inputs():
    torch.manual_seed(0)
    model = _Model().double()
    img = torch.randn(2, 1, 8, 8, dtype=F64)
    seq = torch.randn(5, 3, 6, dtype=F64)
    return model, (img, seq, torch.tensor([5, 2, 4]))


@pytest.fixture
def allow_rnn():
    """Dynamo refuses nn.RNNBase subclasses (torch.nn's own included) unless allowed."""
    import torch._dynamo

    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=True):
        yield
    torch._dynamo.reset()


def test_compile_fullgraph_gives_eager_results(allow_rnn):
    import torch._dynamo

    model, inputs = _model_and_inputs()
    loss = model(*inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    explain = torch._dynamo.explain(model)(*inputs)
    assert explain.graph_count == 1 and explain.graph_break_count == 0

    # aot_eager: Dynamo + AOTAutograd with the operators' fake kernels and autograd, without
    # Inductor's C++ compile (same graph capture; benchmarks/bench_torch_binding.py --compile
    # times the inductor backend)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss_c = compiled(*inputs)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_compiled_graph_holds_the_operators(allow_rnn):
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    model, inputs = _model_and_inputs()
    with torch.no_grad():
        torch.compile(model, fullgraph=True, backend=backend)(*inputs)
    ops = [s for s in seen if "fastrnn" in s]
    assert sorted(set(ops)) == [
        "fastrnn.avg_pool2d.default", "fastrnn.conv2d.default", "fastrnn.gru.default",
        "fastrnn.lstm.default", "fastrnn.max_pool2d.default", "fastrnn.rnn.default",
    ]  # fmt: skip
    assert ops.count("fastrnn.lstm.default") == 4  # 2 layers x 2 directions
    assert not any("numpy" in s for s in seen)


def test_export_and_reload():
    model, inputs = _model_and_inputs()
    expected = model(*inputs)
    ep = torch.export.export(model, inputs)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"fastrnn.lstm.default", "fastrnn.conv2d.default"} <= targets
    torch.testing.assert_close(ep.module()(*inputs), expected)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.export.load(buf).module()(*inputs), expected)


def test_meta_tensors_give_shapes():
    m = ft.LSTM(5, 3, num_layers=2, bidirectional=True, batch_first=True, device="meta")
    y, (h, c) = m(torch.empty(4, 6, 5, device="meta"))
    assert y.shape == (4, 6, 6) and y.device.type == "meta"
    assert h.shape == c.shape == (4, 4, 3)
    conv = ft.Conv2d(3, 4, (3, 2), stride=2, padding=1, device="meta")
    assert conv(torch.empty(2, 3, 9, 8, device="meta")).shape == (2, 4, 5, 5)


# ------------------------------------------------------------------------------------------------
# contexts, double backward
# ------------------------------------------------------------------------------------------------


def test_context_lives_as_long_as_the_graph(monkeypatch):
    """A module's eager call keeps each forward's context on its autograd node: alive while
    backward may need it (a retained graph), freed with the graph."""
    import weakref

    contexts = []
    raw = _ops._RAW["gru"]

    def recording(*args):
        *outputs, fr_ctx = raw(*args)
        if fr_ctx is not None:
            contexts.append(weakref.ref(fr_ctx))
        return (*outputs, fr_ctx)

    monkeypatch.setitem(_ops._RAW, "gru", recording)
    m = ft.GRU(4, 3, num_layers=2)
    y, _ = m(torch.randn(5, 2, 4))
    assert len(contexts) == 2  # one per layer
    y.sum().backward(retain_graph=True)
    assert all(r() is not None for r in contexts)  # kept: the graph was retained
    y.sum().backward()
    del y
    gc.collect()
    assert all(r() is None for r in contexts)
    with torch.no_grad():
        m(torch.randn(5, 2, 4))
    assert len(contexts) == 2  # inference saves nothing


def test_handle_lives_as_long_as_the_graph():
    """The dispatched operator (what torch.compile and export call) hands its context over as
    a handle tensor, which lives as long as the graph that holds it."""
    gc.collect()
    before = _contexts.live_handles()
    x = torch.randn(5, 2, 4, requires_grad=True)
    w_ih, w_hh = torch.randn(9, 4), torch.randn(9, 3)
    y = torch.ops.fastrnn.gru(x, torch.zeros(2, 3), w_ih, w_hh, None, None, None, True)[0]
    assert _contexts.live_handles() == before + 1
    y.sum().backward(retain_graph=True)
    assert _contexts.live_handles() == before + 1  # kept: the graph was retained
    y.sum().backward()
    del y
    gc.collect()
    assert _contexts.live_handles() == before
    torch.ops.fastrnn.gru(x.detach(), torch.zeros(2, 3), w_ih, w_hh, None, None, None, False)
    gc.collect()
    assert _contexts.live_handles() == before  # inference saves nothing


def test_backward_operator_refuses_a_foreign_handle():
    x = torch.randn(3, 2, 4)
    w_ih, w_hh = torch.randn(2, 4), torch.randn(2, 2)
    h0 = torch.zeros(2, 2)
    _, _, handle = _ops.rnn(x, h0, w_ih, w_hh, None, None, None, "tanh", True)
    with pytest.raises(RuntimeError, match="live fastrnn::rnn forward"):
        _ops.rnn_backward(handle.clone(), x, w_ih, w_hh, torch.ones(3, 2, 2), None)
    _, _, handle = _ops.rnn(x, h0, w_ih, w_hh, None, None, None, "tanh", False)
    with pytest.raises(RuntimeError, match="training=False"):
        _ops.rnn_backward(handle, x, w_ih, w_hh, torch.ones(3, 2, 2), None)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_gradient_penalty_matches_torch(kind):
    """A loss on input gradients (create_graph=True), with lengths, bidirectional, 2 layers:
    every parameter's gradient equals torch.nn's through a PackedSequence."""
    ours_cls, theirs_cls = {"lstm": (ft.LSTM, nn.LSTM), "gru": (ft.GRU, nn.GRU),
                            "rnn": (ft.RNN, nn.RNN)}[kind]  # fmt: skip
    torch.manual_seed(0)
    ours = ours_cls(3, 4, num_layers=2, bidirectional=True, dtype=F64)
    theirs = theirs_cls(3, 4, num_layers=2, bidirectional=True, dtype=F64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 3, 3, dtype=F64)
    lengths = torch.tensor([5, 2, 4])
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, _ = ours(xa, lengths=lengths)
    packed = nn.utils.rnn.pack_padded_sequence(xb, lengths, enforce_sorted=False)
    yb, _ = nn.utils.rnn.pad_packed_sequence(theirs(packed)[0], total_length=5)
    for y, xx in ((ya, xa), (yb, xb)):
        (g,) = torch.autograd.grad(y.square().sum(), xx, create_graph=True)
        (y.sum() + g.square().sum()).backward()
    for (n, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), err_msg=n,
                                   **tol("recurrent", "backward", np.float64))  # fmt: skip


# ------------------------------------------------------------------------------------------------
# threads follow torch
# ------------------------------------------------------------------------------------------------


def test_threads_follow_torch(monkeypatch):
    seen = []
    real_forward, real_backward = fastrnn.lstm_forward, fastrnn.lstm_backward

    def forward(*args, **kwargs):
        seen.append(fastrnn.get_num_threads())
        return real_forward(*args, **kwargs)

    def backward(*args, **kwargs):
        seen.append(fastrnn.get_num_threads())
        return real_backward(*args, **kwargs)

    monkeypatch.setattr(fastrnn, "lstm_forward", forward)
    monkeypatch.setattr(fastrnn, "lstm_backward", backward)
    torch_before, fr_before = torch.get_num_threads(), fastrnn.get_num_threads()
    m = ft.LSTM(4, 3)
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            seen.clear()
            y, _ = m(torch.randn(3, 2, 4))
            y.sum().backward()
            assert seen == [n, n]
            assert torch.get_num_threads() == n  # torch's setting is left as it was
        assert fastrnn.get_num_threads() == fr_before  # and fastrnn's
    finally:
        torch.set_num_threads(torch_before)


def test_thread_override_is_local_to_the_python_thread(monkeypatch):
    """A call from one Python thread never changes the thread count of another's calls."""
    from fastrnn._threads import threads_in_this_thread

    inside, other = threading.Event(), []
    release = threading.Event()

    def hold():
        with threads_in_this_thread(1):
            inside.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    inside.wait(5)
    other.append(fastrnn.get_num_threads())
    release.set()
    t.join()
    with threads_in_this_thread(3):
        assert fastrnn.get_num_threads() == 3
    assert other == [fastrnn.get_num_threads()]


# ------------------------------------------------------------------------------------------------
# serialisation, TorchScript
# ------------------------------------------------------------------------------------------------

MODULES = {
    "lstm": lambda: ft.LSTM(4, 3, num_layers=2, bidirectional=True),
    "gru": lambda: ft.GRU(4, 3, batch_first=True),
    "rnn": lambda: ft.RNN(4, 3, nonlinearity="relu"),
    "conv2d": lambda: ft.Conv2d(2, 3, 3, padding=1),
    "conv2d_relu": lambda: ft.Conv2d(2, 3, 3, padding=1, activation="relu"),
    "max_pool2d": lambda: ft.MaxPool2d(2),
    "avg_pool2d": lambda: ft.AvgPool2d(3, stride=2, padding=1),
}


def _input(name):
    return torch.randn(5, 2, 4) if name in ("lstm", "gru", "rnn") else torch.randn(2, 2, 6, 6)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", list(MODULES))
def test_pickled_module_loads_with_weights_only(name):
    torch.manual_seed(0)
    m = MODULES[name]()
    x = _input(name)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert type(loaded) is type(m)
    torch.testing.assert_close(_first(loaded(x)), _first(m(x)))


def test_state_dict_loads_with_weights_only_into_torch_nn():
    torch.manual_seed(0)
    ours = ft.LSTM(4, 3, num_layers=2)
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    theirs = nn.LSTM(4, 3, num_layers=2)
    theirs.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(5, 2, 4)
    np.testing.assert_allclose(ours(x)[0].detach().numpy(), theirs(x)[0].detach().numpy(),
                               **tol("recurrent", "forward", np.float32))  # fmt: skip


@pytest.mark.parametrize("name", list(MODULES))
def test_script_is_refused_clearly_and_trace_works(name):
    m = MODULES[name]()
    with pytest.raises(RuntimeError, match="torch.jit.script.*torch.compile"):
        torch.jit.script(m)
    with pytest.raises(RuntimeError, match="torch.jit.script"):
        torch.jit.script(nn.Sequential(m))
    x = _input(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the shape checks' ifs
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated
        traced = torch.jit.trace(m, x)
    assert any("fastrnn::" in n.kind() for n in traced.graph.nodes())
    x2 = torch.randn_like(x)
    torch.testing.assert_close(_first(traced(x2)), _first(m(x2)))


def test_eager_shortcut_equals_the_dispatched_operator():
    """Modules skip the dispatcher round trip when nothing traces (fastrnn/torch/_ops.py:call);
    the dispatched operator gives the same outputs and gradients, bit for bit."""
    op, args = OP_CASES["lstm"]
    results = []
    for run in (lambda a: _ops.call(op, *a), lambda a: op(*a)):
        leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and
                  a.is_floating_point() else a for a in args]  # fmt: skip
        y, hT, cT, _ = run(leaves)
        (y.sum() + hT.square().sum() + cT.sum()).backward()
        results.append(
            [y, hT, cT] + [a.grad for a in leaves if getattr(a, "grad", None) is not None]
        )
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_dispatch_modes_see_the_operators():
    """Under a TorchDispatchMode (what make_fx and export use) a module call is the operator."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    m = ft.GRU(4, 3)
    x = torch.randn(5, 2, 4)
    with Record() as rec:
        y, _ = m(x)
        y.sum().backward()
    assert "fastrnn.gru.default" in rec.ops
    assert "fastrnn.gru_backward.default" in rec.ops
