"""Every optimizer vs torch.optim over 50 steps with the same gradients (default and non-default
hyperparameters), state dicts, parameter groups, frozen parameters, clip_grad_norm_."""

from __future__ import annotations

import numpy as np
import pytest
from tolerances import assert_close

from fastrnn import nn, optim

torch = pytest.importorskip("torch")

CASES = [
    ("SGD", {}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    ("SGD", {"lr": 0.05, "maximize": True}),
    ("Adagrad", {}),
    (
        "Adagrad",
        {
            "lr": 0.1,
            "lr_decay": 0.01,
            "weight_decay": 0.1,
            "initial_accumulator_value": 0.5,
            "eps": 1e-8,
        },
    ),
    ("Adadelta", {}),
    ("Adadelta", {"lr": 0.5, "rho": 0.8, "eps": 1e-4, "weight_decay": 0.1}),
    ("RMSprop", {}),
    ("RMSprop", {"centered": True}),
    ("RMSprop", {"momentum": 0.9}),
    (
        "RMSprop",
        {
            "lr": 0.005,
            "alpha": 0.9,
            "eps": 1e-6,
            "momentum": 0.5,
            "centered": True,
            "weight_decay": 0.1,
        },
    ),
    ("Adam", {}),
    ("Adam", {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1, "amsgrad": True}),
    ("AdamW", {}),
    ("AdamW", {"lr": 0.01, "betas": (0.85, 0.95), "weight_decay": 0.1, "amsgrad": True}),
]

SHAPES = [(3, 4), (5,)]
STEPS = 50


def _grad(p: np.ndarray, k: int, i: int) -> np.ndarray:
    """The gradient at step k: depends on the current parameters (so the trajectories feed back)
    plus a fixed noise term."""
    noise = np.random.default_rng(1000 * k + i).standard_normal(p.shape)
    return 0.5 * p + noise


def _run(name, kwargs, dtype, steps=STEPS):
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    ours = [nn.Parameter(a.copy()) for a in init]
    theirs = [torch.tensor(a.copy(), requires_grad=True) for a in init]
    opt = getattr(optim, name)(ours, **kwargs)
    topt = getattr(torch.optim, name)(theirs, **kwargs, foreach=False)
    for k in range(steps):
        opt.zero_grad()
        topt.zero_grad()
        for i, (p, t) in enumerate(zip(ours, theirs, strict=True)):
            p.grad += _grad(p.data, k, i).astype(dtype)
            t.grad = torch.tensor(_grad(t.detach().numpy(), k, i).astype(dtype))
        opt.step()
        topt.step()
    return ours, theirs, opt, topt


@pytest.mark.parametrize("name, kwargs", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_matches_torch_50_steps(name, kwargs):
    ours, theirs, _, _ = _run(name, kwargs, np.float64)
    for p, t in zip(ours, theirs, strict=True):
        assert_close(p.data, t.detach().numpy(), "nn", "backward", np.float64, name)
        assert not np.allclose(p.data, np.random.default_rng(0).standard_normal(p.shape))


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "Adadelta", "RMSprop", "Adam", "AdamW"])
def test_float32_defaults_match_torch(name):
    ours, theirs, _, _ = _run(name, {"lr": 0.01} if name != "Adadelta" else {}, np.float32)
    for p, t in zip(ours, theirs, strict=True):
        assert p.data.dtype == np.float32
        np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_defaults_are_torchs():
    p = [nn.Parameter(np.zeros(2))]
    tp = [torch.zeros(2, requires_grad=True)]
    for name in ["SGD", "Adagrad", "Adadelta", "RMSprop", "Adam", "AdamW"]:
        ours = getattr(optim, name)(p).defaults
        theirs = getattr(torch.optim, name)(tp).defaults
        for key, value in ours.items():
            if key in theirs:
                expected = tuple(theirs[key]) if key == "betas" else theirs[key]
                assert value == expected, (name, key)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("SGD", {"lr": 0.1, "momentum": 0.9}),
        ("Adam", {"amsgrad": True}),
        ("RMSprop", {"centered": True, "momentum": 0.5}),
        ("Adagrad", {}),
        ("Adadelta", {}),
    ],
)
def test_state_dict_resumes_exactly(name, kwargs):
    full, _, _, _ = _run(name, kwargs, np.float64, steps=STEPS)
    rng = np.random.default_rng(0)
    ps = [nn.Parameter(rng.standard_normal(s)) for s in SHAPES]
    opt = getattr(optim, name)(ps, **kwargs)

    def steps(o, params, ks):
        for k in ks:
            o.zero_grad()
            for i, p in enumerate(params):
                p.grad += _grad(p.data, k, i)
            o.step()

    steps(opt, ps, range(20))
    saved = opt.state_dict()
    resumed_params = [nn.Parameter(p.data.copy()) for p in ps]
    resumed = getattr(optim, name)(resumed_params, **kwargs)
    resumed.load_state_dict(saved)
    steps(opt, ps, range(20, STEPS))  # the saved copies must not follow the original
    steps(resumed, resumed_params, range(20, STEPS))
    for a, b, c in zip(full, ps, resumed_params, strict=True):
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(a.data, c.data)
    with pytest.raises(ValueError, match="groups"):
        resumed.load_state_dict({"state": {}, "param_groups": []})


def test_frozen_parameters_are_skipped_and_groups_work():
    a, b = nn.Parameter(np.ones(3)), nn.Parameter(np.ones(3))
    b.requires_grad = False
    opt = optim.Adam([{"params": [a], "lr": 0.5}, {"params": [b]}], lr=0.1)
    a.grad[...] = 1
    b.grad[...] = 1
    opt.step()
    np.testing.assert_array_equal(b.data, 1)
    np.testing.assert_allclose(a.data, 0.5)  # Adam's first step moves by lr
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[1]["lr"] == 0.1
    opt.zero_grad()
    assert not a.grad.any()


def test_clip_grad_norm_matches_torch():
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(s) * 3 for s in SHAPES]
    for max_norm, norm_type in [(1.0, 2.0), (100.0, 2.0), (0.5, 1.0), (2.0, float("inf"))]:
        ps = [nn.Parameter(np.zeros(s)) for s in SHAPES]
        ts = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in SHAPES]
        for p, t, g in zip(ps, ts, grads, strict=True):
            p.grad[...] = g
            t.grad = torch.tensor(g)
        total = optim.clip_grad_norm_(ps, max_norm, norm_type)
        ttotal = torch.nn.utils.clip_grad_norm_(ts, max_norm, norm_type)
        assert isinstance(total, float)
        np.testing.assert_allclose(total, ttotal.item(), rtol=1e-12)
        for p, t in zip(ps, ts, strict=True):
            np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=1e-12)
    frozen = nn.Parameter(np.ones(2))
    frozen.grad[...] = 100
    frozen.requires_grad = False
    assert optim.clip_grad_norm_([frozen], 1.0) == 0.0
    assert (frozen.grad == 100).all()


def test_errors():
    p = [nn.Parameter(np.zeros(2))]
    with pytest.raises(ValueError, match="empty"):
        optim.SGD([])
    with pytest.raises(ValueError, match="lr"):
        optim.Adam(p, lr=-1)
    with pytest.raises(ValueError, match="betas"):
        optim.Adam(p, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD(p, lr=0.1, nesterov=True)
    with pytest.raises(TypeError, match="Parameter"):
        optim.SGD([np.zeros(2)])
    with pytest.raises(ValueError, match="more than one"):
        optim.SGD(p + p)
    with pytest.raises(ValueError, match="unknown"):
        optim.SGD([{"params": p, "betas": (0.9, 0.9)}])
