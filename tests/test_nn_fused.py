"""The fused training kernels (fastrnn/_cpu/_train.pyx) against the unfused NumPy code they
replace (run under ``fastrnn.use_backend("numpy")``, the oracle) and against PyTorch: embedding
backward, softmax cross-entropy, the linear layer fused with it, gradient clipping, the char-rnn
training step; the same results on 1 and 2 threads."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from tolerances import assert_close

import fastrnn as fr
from fastrnn import nn, optim
from fastrnn.nn import functional as F

DTYPES = [np.float64, np.float32]


@contextlib.contextmanager
def threads(n: int):
    before = fr.get_num_threads()
    fr.set_num_threads(n)
    try:
        yield
    finally:
        fr.set_num_threads(before)


def unfused():
    return fr.use_backend("numpy")


# ------------------------------------------------------------------------------------------------
# embedding backward
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("shape, V", [((1,), 1), ((5, 7), 4), ((64, 32), 96), ((40, 20), 5000)])
def test_embedding_backward_equals_add_at(shape, V, padded, dtype):
    padding_idx = V // 2 if padded else None
    rng = np.random.default_rng(0)
    idx = rng.integers(0, V, shape)
    dy = rng.standard_normal(shape + (6,)).astype(dtype)
    grads = {}
    for mode, n in (("fused", 1), ("fused", 2), ("unfused", 1)):
        emb = nn.Embedding(V, 6, padding_idx=padding_idx, dtype=dtype)
        emb.weight.grad += 0.5  # gradients accumulate onto what is there
        with threads(n), unfused() if mode == "unfused" else contextlib.nullcontext():
            emb(idx)
            assert emb.backward(dy) is None
        grads[mode, n] = emb.weight.grad
    np.testing.assert_array_equal(grads["fused", 1], grads["fused", 2])
    assert_close(grads["fused", 1], grads["unfused", 1], "fused", "vs unfused", dtype)
    if padding_idx is not None:
        assert (grads["fused", 1][padding_idx] == 0.5).all()


def test_embedding_backward_any_integer_dtype_and_frozen():
    emb = nn.Embedding(10, 3, dtype=np.float64)
    idx = np.array([[1, 2], [2, 9]], np.int32)
    emb(idx)
    emb.backward(np.ones((2, 2, 3)))
    assert emb.weight.grad[2].tolist() == [2.0, 2.0, 2.0] and emb.weight.grad[0].sum() == 0
    emb.weight.requires_grad = False
    emb.weight.grad[...] = 0
    emb(idx)
    emb.backward(np.ones((2, 2, 3)))
    assert not emb.weight.grad.any()


# ------------------------------------------------------------------------------------------------
# softmax cross-entropy, alone and fused with the linear layer
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [4, 60])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (300, 13), (4, 5, 96), (9, 17), (50, 33)])
def test_cross_entropy_kernel_equals_numpy(shape, scale, dtype):
    """Row widths below, at and across the 16-lane vectors of the AVX-512 kernel; at scale 60
    most probabilities underflow to 0."""
    rng = np.random.default_rng(1)
    z = (rng.standard_normal(shape) * scale).astype(dtype)
    t = rng.integers(0, shape[-1], shape[:-1])
    loss, d = F.softmax_cross_entropy(z, t)
    with threads(2):
        loss2, d2 = F.softmax_cross_entropy(z, t)
    with unfused():
        want_loss, want_d = F.softmax_cross_entropy(z, t)
    np.testing.assert_array_equal(d, d2)
    assert loss == pytest.approx(loss2, rel=1e-15)
    assert_close(loss, want_loss, "fused", "vs unfused", dtype)
    assert_close(d, want_d, "fused", "vs unfused", dtype)
    assert d.dtype == dtype and d.shape == shape


def _linear_ce(x, w, b, t, fused: bool, bias_grad: bool = True):
    dw = np.full_like(w, 0.25)
    db = np.full_like(b, 0.25) if b is not None and bias_grad else None
    with contextlib.nullcontext() if fused else unfused():
        loss, dx = F.linear_cross_entropy(x, w, b, t, dweight=dw, dbias=db)
    return loss, dx, dw, db


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "M, K, C", [(1, 1, 1), (5, 3, 2), (127, 17, 13), (512, 33, 96), (513, 24, 7), (1500, 8, 5)]
)
def test_linear_cross_entropy_equals_unfused(M, K, C, bias, dtype):
    """Row counts below, at and across the 512-row tile, one or more tiles per thread."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((M, K)).astype(dtype)
    w = rng.standard_normal((C, K)).astype(dtype)
    b = rng.standard_normal(C).astype(dtype) if bias else None
    t = rng.integers(0, C, M)
    want = _linear_ce(x, w, b, t, fused=False)
    for n in (1, 2):
        with threads(n):
            got = _linear_ce(x, w, b, t, fused=True)
        for name, g, e in zip(("loss", "dx", "dw", "db"), got, want, strict=True):
            if e is not None:
                assert_close(g, e, "fused", "vs unfused", dtype, f"{name} on {n} threads")


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_cross_entropy_matches_torch(dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 50, 24)).astype(dtype)
    lin = nn.Linear(24, 11, dtype=dtype)
    t = rng.integers(0, 11, (3, 50))
    loss, dx = lin.cross_entropy(x, t)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(lin.weight.data, requires_grad=True)
    bt = torch.tensor(lin.bias.data, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(
        torch.nn.functional.linear(xt, wt, bt).reshape(-1, 11), torch.tensor(t).reshape(-1)
    )
    ref.backward()
    assert dx.shape == x.shape and dx.dtype == dtype
    assert_close(loss, ref.item(), "nn", "forward", dtype)
    assert_close(dx, xt.grad.numpy(), "nn", "backward", dtype)
    assert_close(lin.weight.grad, wt.grad.numpy(), "nn", "backward", dtype)
    assert_close(lin.bias.grad, bt.grad.numpy(), "nn", "backward", dtype)


def test_linear_cross_entropy_frozen_and_no_bias():
    rng = np.random.default_rng(4)
    lin = nn.Linear(5, 4, bias=False, dtype=np.float64)
    lin.weight.requires_grad = False
    x = rng.standard_normal((9, 5))
    t = rng.integers(0, 4, 9)
    loss, dx = lin.cross_entropy(x, t)
    assert not lin.weight.grad.any()
    with unfused():
        logits = lin(x)
        want_loss, d = F.softmax_cross_entropy(logits, t)
        want_dx = lin.backward(d)
    assert_close(loss, want_loss, "fused", "vs unfused", np.float64)
    assert_close(dx, want_dx, "fused", "vs unfused", np.float64)


def test_linear_cross_entropy_errors():
    x = np.zeros((4, 3), np.float32)
    w = np.zeros((5, 3), np.float32)
    b = np.zeros(5, np.float32)
    t = np.zeros(4, np.int64)
    with pytest.raises(TypeError, match="x"):
        F.linear_cross_entropy([[0.0]], w, b, t)
    with pytest.raises(TypeError, match="weight"):
        F.linear_cross_entropy(x, w.astype(np.float64), b, t)
    with pytest.raises(ValueError, match="x"):
        F.linear_cross_entropy(np.zeros((4, 2), np.float32), w, b, t)
    with pytest.raises(ValueError, match="bias"):
        F.linear_cross_entropy(x, w, np.zeros(4, np.float32), t)
    with pytest.raises(ValueError, match="dweight"):
        F.linear_cross_entropy(x, w, b, t, dweight=np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="dbias"):
        F.linear_cross_entropy(x, w, None, t, dbias=b)
    with pytest.raises(ValueError, match="targets"):
        F.linear_cross_entropy(x, w, b, np.full(4, 5))
    with pytest.raises(ValueError, match="targets"):
        F.linear_cross_entropy(x, w, b, np.zeros(3, np.int64))
    with pytest.raises(TypeError, match="targets"):
        F.linear_cross_entropy(x, w, b, np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="Linear: x"):
        nn.Linear(3, 5).cross_entropy(np.zeros((4, 3)), t)


# ------------------------------------------------------------------------------------------------
# clipping
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_norm", [0.5, 1e9])
@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_clip_grad_norm_equals_unfused(max_norm, norm_type, dtype):
    rng = np.random.default_rng(5)
    shapes = [(70000,), (3, 4), (1,), (200, 300)]
    grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
    results = {}
    for mode, n in (("fused", 1), ("fused", 2), ("unfused", 1)):
        ps = [nn.Parameter(np.zeros(s, dtype)) for s in shapes]
        for p, g in zip(ps, grads, strict=True):
            p.grad[...] = g
        with threads(n), unfused() if mode == "unfused" else contextlib.nullcontext():
            total = optim.clip_grad_norm_(ps, max_norm, norm_type)
        results[mode, n] = (total, [p.grad for p in ps])
    assert results["fused", 1][0] == results["fused", 2][0]  # chunk order, not thread order
    for a, b in zip(results["fused", 1][1], results["fused", 2][1], strict=True):
        np.testing.assert_array_equal(a, b)
    assert_close(results["fused", 1][0], results["unfused", 1][0], "fused", "vs unfused", dtype)
    for a, b in zip(results["fused", 1][1], results["unfused", 1][1], strict=True):
        assert_close(a, b, "fused", "vs unfused", dtype)
    if max_norm == 1e9:
        for a, g in zip(results["fused", 1][1], grads, strict=True):
            np.testing.assert_array_equal(a, g)  # no clipping: untouched


# ------------------------------------------------------------------------------------------------
# optimizers: fused multi-tensor update vs the per-parameter NumPy code
# ------------------------------------------------------------------------------------------------

OPTIMIZERS = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    ("SGD", {"lr": 0.05, "momentum": 0.5, "maximize": True}),
    (
        "Adagrad",
        {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.1, "initial_accumulator_value": 0.5},
    ),
    ("Adadelta", {"lr": 0.5, "rho": 0.8, "eps": 1e-4, "weight_decay": 0.1, "maximize": True}),
    ("RMSprop", {"lr": 0.01}),
    (
        "RMSprop",
        {"lr": 0.005, "alpha": 0.9, "momentum": 0.5, "centered": True, "weight_decay": 0.1},
    ),
    ("Adam", {"lr": 0.01}),
    (
        "Adam",
        {"lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 0.1, "amsgrad": True, "maximize": True},
    ),
    ("AdamW", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
]


def _trajectory(name, kwargs, dtype, mode, n_threads, steps=50):
    rng = np.random.default_rng(0)
    shapes = [(40000,), (3, 4), (7,)]  # the first spans several chunks
    ps = [nn.Parameter(rng.standard_normal(s).astype(dtype)) for s in shapes]
    opt = getattr(optim, name)(ps, **kwargs)
    with threads(n_threads), unfused() if mode == "unfused" else contextlib.nullcontext():
        for k in range(steps):
            opt.zero_grad()
            for i, p in enumerate(ps):
                noise = np.random.default_rng(1000 * k + i).standard_normal(p.shape)
                p.grad += (0.5 * p.data + noise).astype(dtype)
            opt.step()
    return ps, opt


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "name, kwargs", OPTIMIZERS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(OPTIMIZERS)]
)
def test_fused_optimizer_equals_unfused_50_steps(name, kwargs, dtype):
    fused, opt = _trajectory(name, kwargs, dtype, "fused", 1)
    fused2, _ = _trajectory(name, kwargs, dtype, "fused", 2)
    want, want_opt = _trajectory(name, kwargs, dtype, "unfused", 1)
    for a, a2, b in zip(fused, fused2, want, strict=True):
        np.testing.assert_array_equal(a.data, a2.data)  # the thread count changes nothing
        assert_close(a.data, b.data, "fused", "vs unfused", dtype, name)
    state, want_state = opt.state_dict()["state"], want_opt.state_dict()["state"]
    assert state.keys() == want_state.keys()
    for i in state:
        assert state[i].keys() == want_state[i].keys()
        for k, v in state[i].items():
            if hasattr(v, "shape"):
                assert_close(v, want_state[i][k], "fused", "vs unfused", dtype, f"{name} {k}")
            else:
                assert v == want_state[i][k]


def test_fused_optimizer_follows_replaced_arrays():
    """A parameter whose array is replaced (Module.to, load_state_dict of the optimizer) is
    updated where it now lives."""
    p = nn.Parameter(np.ones(5))
    opt = optim.Adam([p], lr=0.1)
    p.grad[...] = 1
    opt.step()
    p.data = p.data.copy()
    p.grad = np.ones(5)
    opt.load_state_dict(opt.state_dict())
    before = p.data.copy()
    opt.step()
    assert (p.data < before).all()


# ------------------------------------------------------------------------------------------------
# the char-rnn training step
# ------------------------------------------------------------------------------------------------


def test_char_rnn_fused_step_equals_unfused():
    from fastrnn.examples.char_rnn import build_model

    rng = np.random.default_rng(6)
    ids = rng.integers(0, 20, (9, 4))
    x, y = ids[:8], ids[1:]
    models = []
    for fused in (True, False):
        m = build_model(20, 12, 2, 6, 0.0, seed=0).double()
        if fused:
            loss, state = m.loss_backward(x, y)
        else:
            with unfused():
                logits, state = m(x)
                loss, d = F.softmax_cross_entropy(logits, y)
                m.backward(d)
        models.append((m, loss, state))
    (a, la, sa), (b, lb, sb) = models
    assert_close(la, lb, "fused", "vs unfused", np.float64)
    for s1, s2 in zip(sa, sb, strict=True):
        assert_close(s1, s2, "fused", "vs unfused", np.float64)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert p.grad.any(), name
        assert_close(p.grad, q.grad, "nn", "backward", np.float64, name)


def test_kernels_pin_every_blas_to_one_thread():
    """The fused linear + cross-entropy calls SciPy's BLAS from its OpenMP threads: every BLAS
    runs on one thread inside, and gets its own setting back after."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from fastrnn.backends import training

    training.cpu_kernels()  # loads the kernels, and with them SciPy's BLAS

    def blas_threads():
        return [
            i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"
        ]

    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        outside = blas_threads()
        with training.blas_pinned():
            assert blas_threads() and set(blas_threads()) == {1}
        assert blas_threads() == outside
