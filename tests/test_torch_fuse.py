"""fastrnn.torch.Conv2d(activation="relu") and fastrnn.torch.fuse: Conv2d + ReLU as one
operator, with torch.nn's results and gradients."""

from __future__ import annotations

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tolerances import tol  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import fastrnn.torch as ft  # noqa: E402

F64 = torch.float64
DTYPES = [torch.float32, torch.float64]


def assert_close(actual, desired, op, direction, dtype, name=""):
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    np.testing.assert_allclose(actual.detach().numpy(), desired.detach().numpy(), err_msg=name,
                               **tol(op, direction, np_dtype))  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Conv2d(activation="relu") and conv2d(..., activation="relu")
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((6, 5, 3), dict(padding=1)),  # direct kernels, dx by the forward kernels
        ((6, 5, 3), dict(stride=2, padding=1)),  # direct kernels, dx by the gradient kernels
        ((1, 4, 5), dict(padding=2)),  # short columns: im2col's backward
        ((4, 6, 3), dict(stride=2, groups=2)),
        ((64, 64, 3), dict(padding=1, bias=False)),  # Winograd
        ((6, 5, 1), {}),  # pointwise: im2col
    ],
)
def test_conv2d_relu_equals_conv_then_relu(args, kwargs, dtype):
    torch.manual_seed(0)
    ours = ft.Conv2d(*args, activation="relu", dtype=dtype, **kwargs)
    theirs = nn.Conv2d(*args, dtype=dtype, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, args[0], 9, 8, dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), torch.relu(theirs(xb))
    assert_close(ya, yb, "conv", "forward", dtype, "output")
    assert (ya >= 0).all()
    dy = torch.randn_like(yb)
    ya.backward(dy)
    yb.backward(dy)
    assert_close(xa.grad, xb.grad, "conv", "backward", dtype, "dx")
    for (n, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert_close(p.grad, q.grad, "conv", "backward", dtype, n)
    y_fn = ft.conv2d(x, ours.weight, ours.bias, ours.stride, ours.padding, ours.dilation,
                     ours.groups, activation="relu")  # fmt: skip
    assert_close(y_fn, yb, "conv", "forward", dtype, "functional output")


def test_conv2d_relu_keeps_nan_and_blocks_its_gradient():
    """As torch.relu: a NaN output stays NaN, and no gradient passes where the output is not
    positive, even a NaN one."""
    m = ft.Conv2d(1, 1, 1, bias=False, activation="relu", dtype=F64)
    with torch.no_grad():
        m.weight.fill_(1.0)
    x = torch.tensor([[[[1.0, -1.0], [float("nan"), 0.0]]]], dtype=F64, requires_grad=True)
    y = m(x)
    assert y[0, 0, 0, 0] == 1 and y[0, 0, 0, 1] == 0 and y[0, 0, 1, 1] == 0
    assert torch.isnan(y[0, 0, 1, 0])
    y.backward(torch.full_like(y, float("nan")))
    g = x.grad[0, 0]
    assert torch.isnan(g[0, 0]) and g[0, 1] == 0 and g[1, 1] == 0


def test_conv2d_activation_is_checked_and_shown():
    with pytest.raises(ValueError, match="activation"):
        ft.Conv2d(2, 3, 3, activation="tanh")
    with pytest.raises(ValueError, match="activation"):
        ft.conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), activation="gelu")
    assert "activation='relu'" in repr(ft.Conv2d(2, 3, 3, activation="relu"))
    assert "activation" not in repr(ft.Conv2d(2, 3, 3))
    # the state_dict is torch.nn.Conv2d's
    assert set(ft.Conv2d(2, 3, 3, activation="relu").state_dict()) == {"weight", "bias"}


def test_conv2d_relu_pickles_with_weights_only():
    torch.manual_seed(0)
    m = ft.Conv2d(2, 3, 3, padding=1, activation="relu")
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded.activation == "relu"
    x = torch.randn(2, 2, 6, 6)
    torch.testing.assert_close(loaded(x), m(x))


# ------------------------------------------------------------------------------------------------
# fuse
# ------------------------------------------------------------------------------------------------


class _Net(nn.Module):
    """Every way a model writes ReLU after a convolution, and the cases fuse must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = ft.Conv2d(1, 4, 3, padding=1)  # -> torch.relu
        self.c2 = ft.Conv2d(4, 4, 3, padding=1)  # -> F.relu(inplace=True)
        self.c3 = ft.Conv2d(4, 4, 3, padding=1)  # -> nn.ReLU module
        self.act = nn.ReLU()
        self.c4 = ft.Conv2d(4, 4, 3, padding=1)  # -> Tensor.relu()
        self.c5 = ft.Conv2d(4, 4, 3, padding=1)  # output also used by the residual: not fused
        self.c6 = ft.Conv2d(4, 4, 1)  # called twice: not fused
        self.c7 = nn.Conv2d(4, 4, 3, padding=1)  # torch.nn's: not fused
        self.c8 = ft.Conv2d(4, 4, 3, padding=1)  # -> sigmoid: not fused
        self.pool = ft.MaxPool2d(2)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = F.relu(self.c2(x), inplace=True)
        x = self.act(self.c3(x))
        x = self.c4(x).relu()
        y = self.c5(x)
        x = torch.relu(y) + y
        x = torch.relu(self.c6(x)) + self.c6(x)
        x = torch.relu(self.c7(x))
        x = torch.sigmoid(self.c8(x))
        return self.pool(x)


def _grads(model, x, dy):
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(dy)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same_results(model, fused, x, dy, dtype):
    """The fused model's output, input gradient and parameter gradients are the model's;
    returns both outputs."""
    y0, dx0, g0 = _grads(model, x, dy)
    y1, dx1, g1 = _grads(fused, x, dy)
    assert_close(y1, y0, "conv", "forward", dtype, "output")
    assert_close(dx1, dx0, "conv", "backward", dtype, "dx")
    for n, g in g0.items():
        assert_close(g1[n], g, "conv", "backward", dtype, n)
    return y0, y1


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_fuse_gives_the_models_results_and_gradients(dtype):
    torch.manual_seed(0)
    model = _Net().to(dtype)
    fused = ft.fuse(model)
    assert isinstance(fused, torch.fx.GraphModule)
    assert [n for n in ("c1", "c2", "c3", "c4") if fused.get_submodule(n).activation] == [
        "c1", "c2", "c3", "c4"
    ]  # fmt: skip
    assert all(fused.get_submodule(n).activation is None for n in ("c5", "c6", "c8"))
    # the model itself is unchanged (fuse worked on a copy)
    assert all(m.activation is None for m in model.modules() if isinstance(m, ft.Conv2d))
    # four ReLUs left: c5's, c6's, c7's (torch.nn's Conv2d) ... and none of the fused ones
    relus = [n for n in fused.graph.nodes
             if n.target in (torch.relu, F.relu, "relu") or n.target == "act"]  # fmt: skip
    assert len(relus) == 3
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 1, 8, 8, dtype=dtype)
    dy = torch.randn(2, 4, 4, 4, dtype=dtype)
    _assert_same_results(model, fused, x, dy, dtype)


def test_fuse_inplace_shares_the_parameters():
    torch.manual_seed(0)
    model = _Net().to(F64)
    x = torch.randn(2, 1, 8, 8, dtype=F64)
    before = model(x).detach()
    fused = ft.fuse(model, inplace=True)
    assert model.c1.activation == "relu" and fused.c1 is model.c1
    assert fused.c1.weight is model.c1.weight
    torch.testing.assert_close(fused(x), before)
    torch.testing.assert_close(model(x), before)  # ReLU twice is ReLU once


def test_fuse_keeps_train_and_eval_mode_and_compiles():
    import torch._dynamo

    torch.manual_seed(0)
    model = nn.Sequential(ft.Conv2d(3, 8, 3, padding=1), nn.ReLU(), ft.MaxPool2d(2),
                          nn.Dropout(0.5), ft.Conv2d(8, 4, 3), nn.ReLU())  # fmt: skip
    model.eval()
    fused = ft.fuse(model)
    assert not fused.training
    assert fused.get_submodule("0").activation == "relu"
    assert fused.get_submodule("4").activation == "relu"
    assert not any(n.op == "call_module" and n.target in ("1", "5") for n in fused.graph.nodes)
    x = torch.randn(2, 3, 10, 10)
    torch.testing.assert_close(fused(x), model(x))
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))
    torch._dynamo.reset()


class _PoolNet(nn.Module):
    """Convolutions followed by max pooling, and the cases fuse must leave unpooled."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = ft.Conv2d(2, 6, 3, padding=1)  # -> ReLU -> ft.MaxPool2d(2)
        self.p1 = ft.MaxPool2d(2)
        self.c2 = ft.Conv2d(6, 5, 3, padding=1)  # -> nn.MaxPool2d(3, 2, 1), no ReLU
        self.p2 = nn.MaxPool2d(3, 2, 1)
        self.c3 = ft.Conv2d(5, 5, 1)  # -> pooled and also added: not pooled in the conv
        self.c4 = ft.Conv2d(5, 4, 3, padding=1)  # -> nn.MaxPool2d(ceil_mode=True): not pooled
        self.p4 = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, x):
        x = self.p1(torch.relu(self.c1(x)))
        x = self.p2(self.c2(x))
        y = self.c3(x)
        x = F.max_pool2d(y, 1) + y
        return self.p4(self.c4(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("batch", [1, 6], ids=["pooled-after", "pooled-in-schedule"])
def test_fuse_pools_in_the_convolution(dtype, batch):
    """Conv2d (+ ReLU) + MaxPool2d becomes one conv2d_max_pool call, with the model's results
    and gradients; the modules and the state_dict stay as they are."""
    torch.manual_seed(0)
    model = _PoolNet().to(dtype)
    fused = ft.fuse(model)
    calls = [n for n in fused.graph.nodes if n.target is ft.modules.conv2d_max_pool]
    assert [n.args[0].target for n in calls] == ["c1", "c2"]
    assert not any(n.op == "call_module" and n.target in ("p1", "p2") for n in fused.graph.nodes)
    assert fused.c1.activation == "relu" and fused.c2.activation is None
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.randn(batch, 2, 12, 11, dtype=dtype)
    dy = torch.randn(batch, 4, 2, 2, dtype=dtype)
    y0, y1 = _assert_same_results(model, fused, x, dy, dtype)
    # in place: the model's own modules, still the same model when called directly
    inplace = ft.fuse(model, inplace=True)
    assert inplace.c1 is model.c1
    torch.testing.assert_close(model(x), y0)
    torch.testing.assert_close(inplace(x), y1)


class _FunctionalPoolNet(nn.Module):
    """PyTorch's examples/mnist writes its pooling as F.max_pool2d: the functional forms."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = ft.Conv2d(2, 6, 3, padding=1)  # -> F.relu -> F.max_pool2d(x, 2)
        self.c2 = ft.Conv2d(6, 5, 3, padding=1)  # -> torch.max_pool2d(x, 3, 2, 1)
        self.c3 = ft.Conv2d(5, 4, 1)  # -> F.max_pool2d(ceil_mode=True): not pooled in the conv
        self.c4 = ft.Conv2d(4, 4, 1)  # -> F.max_pool2d(return_indices=True): not pooled

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = torch.max_pool2d(self.c2(x), 3, 2, 1)
        x = F.max_pool2d(self.c3(x), kernel_size=2, ceil_mode=True)
        y, _ = F.max_pool2d(self.c4(x), 1, return_indices=True)
        return y


@pytest.mark.parametrize("batch", [1, 6], ids=["pooled-after", "pooled-in-schedule"])
def test_fuse_pools_functional_max_pool(batch):
    torch.manual_seed(2)
    model = _FunctionalPoolNet().to(F64)
    fused = ft.fuse(model)
    calls = [n for n in fused.graph.nodes if n.target is ft.modules.conv2d_max_pool]
    assert [n.args[0].target for n in calls] == ["c1", "c2"]
    assert calls[1].kwargs == dict(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))
    x = torch.randn(batch, 2, 13, 11, dtype=F64)
    y0 = model(x)
    dy = torch.randn_like(y0)
    y0, dx0, g0 = _grads(model, x, dy)
    y1, dx1, g1 = _grads(fused, x, dy)
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(dx1, dx0)
    for n, g in g0.items():
        torch.testing.assert_close(g1[n], g, msg=n)


@pytest.mark.parametrize("relu", [None, "relu"])
@pytest.mark.parametrize(
    "max_pool, window",
    [(2, (2, 2, 0)), ((2, 3), ((2, 3), (2, 3), 0)),
     (dict(kernel_size=3, stride=2, padding=1), (3, 2, 1))],
)  # fmt: skip
def test_conv2d_max_pool_functional(max_pool, window, relu):
    """ft.conv2d(..., max_pool=...) equals F.max_pool2d of the convolution, values and first
    and second order gradients (create_graph differentiates torch's ops)."""
    torch.manual_seed(1)
    x = torch.randn(5, 3, 10, 9, dtype=F64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=F64, requires_grad=True)
    b = torch.randn(4, dtype=F64, requires_grad=True)
    y = ft.conv2d(x, w, b, padding=1, activation=relu, max_pool=max_pool)
    c = F.conv2d(x, w, b, padding=1)
    ref = F.max_pool2d(torch.relu(c) if relu else c, *window)
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, (x, w, b), dy, create_graph=True)
    gr = torch.autograd.grad(ref, (x, w, b), dy, create_graph=True)
    for a, e in zip(g, gr, strict=True):
        torch.testing.assert_close(a, e)
    gg = torch.autograd.grad(g[1].sum(), (x, w))
    ggr = torch.autograd.grad(gr[1].sum(), (x, w))
    for a, e in zip(gg, ggr, strict=True):
        torch.testing.assert_close(a, e)


def test_conv2d_max_pool_errors():
    conv = ft.Conv2d(2, 3, 3)
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(RuntimeError, match="Output size is too small"):
        ft.modules.conv2d_max_pool(conv, x, 4)
    with pytest.raises(RuntimeError, match="pad should be at most half"):
        ft.modules.conv2d_max_pool(conv, x, 2, 1, 2)
    with pytest.raises(TypeError, match="conv"):
        ft.modules.conv2d_max_pool(nn.Conv2d(2, 3, 3), x, 2)
    with pytest.raises(ValueError, match="max_pool"):
        ft.conv2d(x, conv.weight, max_pool=dict(size=2))


def test_fuse_refuses_what_is_not_a_module():
    with pytest.raises(TypeError, match="model"):
        ft.fuse(lambda x: x)
    with pytest.raises(TypeError, match="inplace"):
        ft.fuse(nn.ReLU(), inplace="yes")


# ------------------------------------------------------------------------------------------------
# the CPU kernel behind the fused ReLU's backward
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [0, 1, 17, (1 << 15) - 1, 1 << 15, (1 << 17) + 5])
def test_relu_backward_kernel(n, dtype):
    from fastrnn._cpu import conv2d as kernel

    rng = np.random.default_rng(n)
    y = rng.standard_normal(n).astype(dtype)
    dy = rng.standard_normal(n).astype(dtype)
    y[::7] = 0
    y[3::11] = np.nan
    dy[::5] = np.nan
    dy[1::13] = np.inf
    got = kernel.relu_backward(y.reshape(-1, 1), dy.reshape(-1, 1))
    assert got.dtype == dtype and got.shape == (n, 1)
    np.testing.assert_array_equal(got.ravel(), np.where(y > 0, dy, 0))
    # into the per-thread buffer: the same values; the next call reuses the buffer
    first = kernel.relu_backward(y, dy, reuse=True)
    np.testing.assert_array_equal(first, np.where(y > 0, dy, 0))
    second = kernel.relu_backward(-y, dy, reuse=True)
    np.testing.assert_array_equal(second, np.where(-y > 0, dy, 0))
    assert n == 0 or np.shares_memory(first, second)
