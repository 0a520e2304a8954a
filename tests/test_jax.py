"""fastrnn.jax against JAX's own formulations: ``jax.lax.scan`` recurrences,
``jax.lax.conv_general_dilated`` and ``jax.lax.reduce_window``; values and gradients under
``jax.jit`` and ``jax.grad``, float32 to 1e-5 and float64 to 1e-10."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)  # float64 cases; float32 arrays stay float32

import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

import fastrnn.jax as fj  # noqa: E402

TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-10)}
DTYPES = [np.float32, np.float64]
T, N, D, H = 6, 3, 4, 5
LENGTHS = np.array([6, 2, 4])


def _randn(rng, shape, dtype, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype=dtype)


def _close(a, b, dtype, name=""):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), err_msg=name, **TOL[dtype])


# ------------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------------


def _scan(cell, xs, states, lengths):
    """Run ``cell(x_t, *states) -> new states`` over time; with lengths, states freeze after
    each sequence's end and outputs there are zero."""
    steps = jnp.arange(xs.shape[0])
    mask = None if lengths is None else (steps[:, None] < lengths[None, :])[:, :, None]

    def step(carry, inp):
        x_t, m = inp
        new = cell(x_t, *carry)
        if m is None:
            return new, new[0]
        kept = tuple(jnp.where(m, n, c) for n, c in zip(new, carry, strict=True))
        return kept, jnp.where(m, new[0], 0)

    finals, ys = lax.scan(step, states, (xs, mask))
    return ys, finals


def ref_lstm(x, h0, c0, w_ih, w_hh, b, lengths=None):
    def cell(x_t, h, c):
        i, f, g, o = jnp.split(x_t @ w_ih.T + h @ w_hh.T + b, 4, axis=1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        return jax.nn.sigmoid(o) * jnp.tanh(c), c

    y, (h, c) = _scan(cell, x, (h0, c0), lengths)
    return y, h, c


def ref_gru(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None):
    def cell(x_t, h):
        xr, xz, xn = jnp.split(x_t @ w_ih.T + b_ih, 3, axis=1)
        hr, hz, hn = jnp.split(h @ w_hh.T + b_hh, 3, axis=1)
        r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
        return ((1 - z) * n + z * h,)

    y, (h,) = _scan(cell, x, (h0,), lengths)
    return y, h


def ref_rnn(x, h0, w_ih, w_hh, b, nonlinearity="tanh", lengths=None):
    act = jnp.tanh if nonlinearity == "tanh" else jax.nn.relu

    def cell(x_t, h):
        return (act(x_t @ w_ih.T + h @ w_hh.T + b),)

    y, (h,) = _scan(cell, x, (h0,), lengths)
    return y, h


# ------------------------------------------------------------------------------------------------
# recurrent
# ------------------------------------------------------------------------------------------------


def _recurrent_case(kind, dtype, seed=0):
    rng = np.random.default_rng(seed)
    G = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}[kind]
    x = _randn(rng, (T, N, D), dtype)
    states = [_randn(rng, (N, H), dtype) for _ in range(2 if kind == "lstm" else 1)]
    weights = [_randn(rng, (G * H, D), dtype, 0.4), _randn(rng, (G * H, H), dtype, 0.4)]
    biases = [_randn(rng, (G * H,), dtype, 0.2) for _ in range(2 if kind == "gru" else 1)]
    return [x, *states, *weights, *biases]


FUNCS = {
    "lstm": (fj.lstm, ref_lstm, {}),
    "gru": (fj.gru, ref_gru, {}),
    "rnn_tanh": (fj.rnn, ref_rnn, {"nonlinearity": "tanh"}),
    "rnn_relu": (fj.rnn, ref_rnn, {"nonlinearity": "relu"}),
}


@pytest.mark.parametrize("with_lengths", [False, True], ids=["dense", "lengths"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("kind", list(FUNCS))
def test_recurrent_matches_scan(kind, dtype, with_lengths):
    ours, ref, kwargs = FUNCS[kind]
    args = _recurrent_case(kind, dtype)
    lengths = jnp.asarray(LENGTHS) if with_lengths else None
    rng = np.random.default_rng(1)

    def loss(fn, lengths_kw):
        def f(*args):
            outs = fn(*args, **kwargs, **lengths_kw)
            weights = [_randn(np.random.default_rng(k), o.shape, dtype) for k, o in
                       enumerate(outs)]  # fmt: skip
            return sum(jnp.sum(o * w) for o, w in zip(outs, weights, strict=True))

        return f

    ours_kw = {"lengths": lengths}
    ref_kw = {"lengths": lengths} if with_lengths else {}
    out_ours = jax.jit(lambda *a: ours(*a, **kwargs, **ours_kw))(*args)
    out_ref = ref(*args, **kwargs, **ref_kw)
    for i, (a, b) in enumerate(zip(out_ours, out_ref, strict=True)):
        assert a.dtype == dtype
        _close(a, b, dtype, f"output {i}")
    argnums = tuple(range(len(args)))
    g_ours = jax.jit(jax.grad(loss(ours, ours_kw), argnums=argnums))(*args)
    g_ref = jax.grad(loss(ref, ref_kw), argnums=argnums)(*args)
    for i, (a, b) in enumerate(zip(g_ours, g_ref, strict=True)):
        _close(a, b, dtype, f"gradient of argument {i}")
    del rng


def test_lengths_are_checked():
    args = _recurrent_case("gru", np.float64)
    with pytest.raises(Exception, match="lengths"):
        fj.gru(*args, lengths=jnp.asarray([T + 1, 1, 1]))


def test_vjp_called_twice_and_contexts_released():
    """A vjp function applied twice gives the same gradients (the second recomputes the
    forward's context: the first took it), and a plain jax.grad leaves nothing held."""
    args = _recurrent_case("lstm", np.float64)
    held = len(fj._contexts)
    _, vjp = jax.vjp(lambda *a: fj.lstm(*a)[0], *args)
    assert len(fj._contexts) == held + 1
    dy = jnp.ones((T, N, H), jnp.float64)
    before = fj.recomputed()
    first = vjp(dy)
    assert len(fj._contexts) == held
    second = vjp(dy)
    assert fj.recomputed() == before + 1
    for a, b in zip(first, second, strict=True):
        _close(a, b, np.float64)
    jax.grad(lambda x: fj.lstm(x, *args[1:])[0].sum())(args[0])
    assert len(fj._contexts) == held


def test_vmap_runs_each_batch_element():
    args = _recurrent_case("rnn_tanh", np.float64)
    xs = jnp.stack([args[0], 2 * args[0]])
    ys = jax.vmap(lambda x: fj.rnn(x, *args[1:])[0])(xs)
    for k in range(2):
        _close(ys[k], ref_rnn(xs[k], *args[1:])[0], np.float64)


# ------------------------------------------------------------------------------------------------
# convolution and pooling
# ------------------------------------------------------------------------------------------------


def ref_conv2d(x, w, b, stride, padding, dilation, groups):
    y = lax.conv_general_dilated(
        x, w, window_strides=stride, padding=[(padding[0],) * 2, (padding[1],) * 2],
        rhs_dilation=dilation, feature_group_count=groups,
        dimension_numbers=("NCHW", "OIHW", "NCHW"), precision=lax.Precision.HIGHEST,
    )  # fmt: skip
    return y if b is None else y + b[None, :, None, None]


CONV_CASES = {
    "k3": dict(C=3, F=4, k=(3, 3), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1),
    "strided_padded": dict(C=3, F=2, k=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 1),
                           groups=1),
    "dilated_grouped": dict(C=4, F=6, k=(2, 3), stride=(1, 2), padding=(2, 1), dilation=(2, 1),
                            groups=2),
    "no_bias": dict(C=2, F=3, k=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                    bias=False),
}  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_matches_lax(case, dtype):
    c = dict(CONV_CASES[case])
    bias = c.pop("bias", True)
    rng = np.random.default_rng(2)
    x = _randn(rng, (2, c["C"], 9, 8), dtype)
    w = _randn(rng, (c["F"], c["C"] // c["groups"], *c["k"]), dtype, 0.5)
    b = _randn(rng, (c["F"],), dtype) if bias else None
    geometry = dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"],
                    groups=c["groups"])  # fmt: skip
    y = jax.jit(lambda x, w, b: fj.conv2d(x, w, b, **geometry))(x, w, b)
    y_ref = ref_conv2d(x, w, b, **geometry)
    assert y.shape == y_ref.shape
    _close(y, y_ref, dtype, "output")
    dy = _randn(rng, y.shape, dtype)

    def loss(fn):
        return lambda x, w, b: jnp.sum(fn(x, w, b, **geometry) * dy)

    argnums = (0, 1, 2) if bias else (0, 1)
    g = jax.jit(jax.grad(loss(fj.conv2d), argnums=argnums))(x, w, b)
    g_ref = jax.grad(loss(ref_conv2d), argnums=argnums)(x, w, b)
    for i, (a, r) in enumerate(zip(g, g_ref, strict=True)):
        _close(a, r, dtype, f"gradient {i}")


def ref_pool2d(kind, x, kernel, stride, padding):
    pads = ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2)
    window, strides = (1, 1, *kernel), (1, 1, *stride)
    if kind == "max":
        return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, pads)
    return lax.reduce_window(x, 0.0, lax.add, window, strides, pads) / (kernel[0] * kernel[1])


POOL_CASES = {
    "k2": ((2, 2), (2, 2), (0, 0)),
    "k3_s2_p1": ((3, 3), (2, 2), (1, 1)),
    "rect": ((3, 2), (1, 2), (1, 0)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(POOL_CASES))
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pool2d_matches_lax(kind, case, dtype):
    kernel, stride, padding = POOL_CASES[case]
    ours = fj.max_pool2d if kind == "max" else fj.avg_pool2d
    rng = np.random.default_rng(3)
    x = _randn(rng, (2, 3, 9, 8), dtype)  # continuous values: no ties in a max
    y = jax.jit(lambda x: ours(x, kernel, stride, padding))(x)
    y_ref = ref_pool2d(kind, x, kernel, stride, padding)
    _close(y, y_ref, dtype, "output")
    dy = _randn(rng, y.shape, dtype)
    g = jax.jit(jax.grad(lambda x: jnp.sum(ours(x, kernel, stride, padding) * dy)))(x)
    g_ref = jax.grad(lambda x: jnp.sum(ref_pool2d(kind, x, kernel, stride, padding) * dy))(x)
    _close(g, g_ref, dtype, "gradient")
