"""fastrnn.convert: exact round trips, and converted weights computing the same outputs.

The foreign layouts are run by small NumPy forward passes written here from each layout's own
definition (CS231n's lstm_step_forward, haste's and Keras' cell equations), independently of
fastrnn; fastrnn's side runs through the public functional API.
"""

from __future__ import annotations

import numpy as np
import pytest
from tolerances import assert_close

import fastrnn
from fastrnn import convert

T, N, D, H = 5, 3, 4, 6


def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


# ------------------------------------------------------------------------------------------------
# foreign forward passes
# ------------------------------------------------------------------------------------------------


def cs231n_lstm(x, h, c, Wx, Wh, b):
    """CS231n's lstm_step_forward over T steps: a = x Wx + h Wh + b, gates i, f, o, g."""
    ys = []
    for t in range(x.shape[0]):
        a = x[t] @ Wx + h @ Wh + b
        i = sigmoid(a[:, :H])
        f = sigmoid(a[:, H : 2 * H])
        o = sigmoid(a[:, 2 * H : 3 * H])
        g = np.tanh(a[:, 3 * H :])
        c = f * c + i * g
        h = o * np.tanh(c)
        ys.append(h)
    return np.stack(ys), h, c


def cs231n_rnn(x, h, Wx, Wh, b):
    """CS231n's rnn_step_forward over T steps: h = tanh(x Wx + h Wh + b)."""
    ys = []
    for t in range(x.shape[0]):
        h = np.tanh(x[t] @ Wx + h @ Wh + b)
        ys.append(h)
    return np.stack(ys), h


def haste_lstm(x, h, c, kernel, recurrent_kernel, bias):
    """haste's LSTM: v = x kernel + h recurrent_kernel + bias, gates i, g, f, o."""
    ys = []
    for t in range(x.shape[0]):
        v = x[t] @ kernel + h @ recurrent_kernel + bias
        i = sigmoid(v[:, :H])
        g = np.tanh(v[:, H : 2 * H])
        f = sigmoid(v[:, 2 * H : 3 * H])
        o = sigmoid(v[:, 3 * H :])
        c = f * c + i * g
        h = o * np.tanh(c)
        ys.append(h)
    return np.stack(ys), h, c


def keras_lstm(x, h, c, kernel, recurrent_kernel, bias):
    """Keras' LSTMCell: z = x kernel + h recurrent_kernel + bias split into i, f, c, o."""
    ys = []
    for t in range(x.shape[0]):
        z = x[t] @ kernel + h @ recurrent_kernel + bias
        z0, z1, z2, z3 = np.split(z, 4, axis=1)
        i, f, o = sigmoid(z0), sigmoid(z1), sigmoid(z3)
        c = f * c + i * np.tanh(z2)
        h = o * np.tanh(c)
        ys.append(h)
    return np.stack(ys), h, c


def haste_gru(x, h, kernel, recurrent_kernel, bias, recurrent_bias):
    """haste's GRU: gates z, r, g; g = tanh(Wx_g + r * (R h + b_R)_g); h = z h + (1 - z) g."""
    ys = []
    for t in range(x.shape[0]):
        vx = x[t] @ kernel + bias
        vh = h @ recurrent_kernel + recurrent_bias
        z = sigmoid(vx[:, :H] + vh[:, :H])
        r = sigmoid(vx[:, H : 2 * H] + vh[:, H : 2 * H])
        g = np.tanh(vx[:, 2 * H :] + r * vh[:, 2 * H :])
        h = z * h + (1 - z) * g
        ys.append(h)
    return np.stack(ys), h


def keras_gru(x, h, kernel, recurrent_kernel, bias):
    """Keras' GRUCell, reset_after=True: bias[0] input bias, bias[1] recurrent; z, r, h."""
    ys = []
    for t in range(x.shape[0]):
        mx = x[t] @ kernel + bias[0]
        mh = h @ recurrent_kernel + bias[1]
        x_z, x_r, x_h = np.split(mx, 3, axis=1)
        r_z, r_r, r_h = np.split(mh, 3, axis=1)
        z = sigmoid(x_z + r_z)
        r = sigmoid(x_r + r_r)
        hh = np.tanh(x_h + r * r_h)
        h = z * h + (1 - z) * hh
        ys.append(h)
    return np.stack(ys), h


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def lstm_weights(rng):
    return (
        rng.standard_normal((4 * H, D)) * 0.5,
        rng.standard_normal((4 * H, H)) * 0.5,
        rng.standard_normal(4 * H) * 0.5,
    )


def gru_weights(rng):
    return (
        rng.standard_normal((3 * H, D)) * 0.5,
        rng.standard_normal((3 * H, H)) * 0.5,
        rng.standard_normal(3 * H) * 0.5,
        rng.standard_normal(3 * H) * 0.5,
    )


def inputs(rng):
    return (
        rng.standard_normal((T, N, D)),
        rng.standard_normal((N, H)) * 0.5,
        rng.standard_normal((N, H)) * 0.5,
    )


def assert_equal_arrays(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert u.shape == v.shape
        np.testing.assert_array_equal(u, v)


# ------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------

LSTM_PAIRS = {
    "cs231n": (convert.lstm_to_cs231n, convert.lstm_from_cs231n),
    "haste": (convert.lstm_to_haste, convert.lstm_from_haste),
    "keras": (convert.lstm_to_keras, convert.lstm_from_keras),
}
GRU_PAIRS = {
    "haste": (convert.gru_to_haste, convert.gru_from_haste),
    "keras": (convert.gru_to_keras, convert.gru_from_keras),
}


@pytest.mark.parametrize("layout", list(LSTM_PAIRS))
def test_lstm_round_trips(layout, rng):
    to, back = LSTM_PAIRS[layout]
    w = lstm_weights(rng)
    foreign = to(*w)
    assert foreign[0].shape == (D, 4 * H) and foreign[1].shape == (H, 4 * H)
    assert_equal_arrays(back(*foreign), w)
    assert_equal_arrays(to(*back(*foreign)), foreign)
    for a in foreign:  # new arrays, never views of the input
        assert not any(np.shares_memory(a, b) for b in w)


@pytest.mark.parametrize("layout", list(GRU_PAIRS))
def test_gru_round_trips(layout, rng):
    to, back = GRU_PAIRS[layout]
    w = gru_weights(rng)
    foreign = to(*w)
    assert foreign[0].shape == (D, 3 * H) and foreign[1].shape == (H, 3 * H)
    assert_equal_arrays(back(*foreign), w)
    assert_equal_arrays(to(*back(*foreign)), foreign)


def test_rnn_round_trip(rng):
    w = (rng.standard_normal((H, D)), rng.standard_normal((H, H)), rng.standard_normal(H))
    foreign = convert.rnn_to_cs231n(*w)
    assert foreign[0].shape == (D, H)
    assert_equal_arrays(convert.rnn_from_cs231n(*foreign), w)


def test_gate_blocks_land_where_each_layout_expects_them():
    """Mark PyTorch's gate blocks (i=1, f=2, g=3, o=4; GRU r=1, z=2, n=3) and read them back."""
    b = np.repeat([1.0, 2.0, 3.0, 4.0], H)
    w_ih, w_hh = np.zeros((4 * H, D)), np.zeros((4 * H, H))
    order = {
        "cs231n": [1, 2, 4, 3],  # i, f, o, g
        "haste": [1, 3, 2, 4],  # i, g, f, o
        "keras": [1, 2, 3, 4],  # i, f, c, o
    }
    for layout, (to, _) in LSTM_PAIRS.items():
        bias = to(w_ih, w_hh, b)[2]
        np.testing.assert_array_equal(bias[::H], order[layout], err_msg=layout)
    b3 = np.repeat([1.0, 2.0, 3.0], H)
    w_ih, w_hh = np.zeros((3 * H, D)), np.zeros((3 * H, H))
    np.testing.assert_array_equal(convert.gru_to_haste(w_ih, w_hh, b3, b3)[2][::H], [2, 1, 3])
    np.testing.assert_array_equal(
        convert.gru_to_keras(w_ih, w_hh, b3, b3)[2][:, ::H], [[2, 1, 3]] * 2
    )


# ------------------------------------------------------------------------------------------------
# same outputs
# ------------------------------------------------------------------------------------------------

LSTM_FORWARDS = {"cs231n": cs231n_lstm, "haste": haste_lstm, "keras": keras_lstm}


@pytest.mark.parametrize("layout", list(LSTM_FORWARDS))
def test_converted_lstm_weights_give_the_same_outputs(layout, rng):
    w_ih, w_hh, b = lstm_weights(rng)
    x, h0, c0 = inputs(rng)
    y, hT, cT, _ = fastrnn.lstm_forward(x, h0, c0, w_ih, w_hh, b, training=False)

    to, back = LSTM_PAIRS[layout]
    y2, hT2, cT2 = LSTM_FORWARDS[layout](x, h0, c0, *to(w_ih, w_hh, b))
    for got, want, name in ((y2, y, "y"), (hT2, hT, "hT"), (cT2, cT, "cT")):
        assert_close(got, want, "recurrent", "forward", np.float64, f"{layout} {name}")

    # and the other way: weights made in the foreign layout run on fastrnn
    foreign = tuple(rng.standard_normal(a.shape) * 0.5 for a in to(w_ih, w_hh, b))
    y3, *_ = fastrnn.lstm_forward(x, h0, c0, *back(*foreign), training=False)
    assert_close(
        y3,
        LSTM_FORWARDS[layout](x, h0, c0, *foreign)[0],
        "recurrent",
        "forward",
        np.float64,
        f"{layout} from foreign",
    )


def test_converted_rnn_weights_give_the_same_outputs(rng):
    w = (
        rng.standard_normal((H, D)) * 0.5,
        rng.standard_normal((H, H)) * 0.5,
        rng.standard_normal(H) * 0.5,
    )
    x, h0, _ = inputs(rng)
    y, hT, _ = fastrnn.rnn_forward(x, h0, *w, training=False)
    y2, hT2 = cs231n_rnn(x, h0, *convert.rnn_to_cs231n(*w))
    assert_close(y2, y, "recurrent", "forward", np.float64, "y")
    assert_close(hT2, hT, "recurrent", "forward", np.float64, "hT")


@pytest.mark.parametrize("layout", list(GRU_PAIRS))
def test_converted_gru_weights_give_the_same_outputs(layout, rng):
    w = gru_weights(rng)
    x, h0, _ = inputs(rng)
    y, hT, _ = fastrnn.gru_forward(x, h0, *w, training=False)
    to, back = GRU_PAIRS[layout]
    forward = haste_gru if layout == "haste" else keras_gru
    y2, hT2 = forward(x, h0, *to(*w))
    assert_close(y2, y, "recurrent", "forward", np.float64, f"{layout} y")
    assert_close(hT2, hT, "recurrent", "forward", np.float64, f"{layout} hT")

    foreign = tuple(rng.standard_normal(a.shape) * 0.5 for a in to(*w))
    y3, _, _ = fastrnn.gru_forward(x, h0, *back(*foreign), training=False)
    assert_close(
        y3,
        forward(x, h0, *foreign)[0],
        "recurrent",
        "forward",
        np.float64,
        f"{layout} from foreign",
    )


def test_torch_biases_sum_and_split(rng):
    b_ih, b_hh = rng.standard_normal(4 * H), rng.standard_normal(4 * H)
    b = convert.lstm_bias_from_torch(b_ih, b_hh)
    np.testing.assert_array_equal(b, b_ih + b_hh)
    s_ih, s_hh = convert.split_bias(b)
    np.testing.assert_array_equal(s_ih + s_hh, b)
    assert not np.shares_memory(s_ih, b)


def test_keras_without_bias(rng):
    kernel, rk = rng.standard_normal((D, 4 * H)), rng.standard_normal((H, 4 * H))
    _, _, b = convert.lstm_from_keras(kernel, rk)
    np.testing.assert_array_equal(b, np.zeros(4 * H))
    *_, b_ih, b_hh = convert.gru_from_keras(kernel[:, : 3 * H], rk[:, : 3 * H])
    np.testing.assert_array_equal(b_ih, np.zeros(3 * H))
    np.testing.assert_array_equal(b_hh, np.zeros(3 * H))


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


def test_keras_gru_reset_before_is_refused(rng):
    kernel, rk = rng.standard_normal((D, 3 * H)), rng.standard_normal((H, 3 * H))
    with pytest.raises(ValueError, match="reset_after"):
        convert.gru_from_keras(kernel, rk, np.zeros((2, 3 * H)), reset_after=False)
    with pytest.raises(ValueError, match="bias"):
        convert.gru_from_keras(kernel, rk, np.zeros(3 * H))


def test_bad_shapes_and_types_name_the_argument(rng):
    w_ih, w_hh, b = lstm_weights(rng)
    with pytest.raises(ValueError, match="w_hh"):
        convert.lstm_to_haste(w_ih, w_hh[:-1], b)
    with pytest.raises(ValueError, match="w_ih"):
        convert.lstm_to_cs231n(w_ih[:-4], w_hh, b)
    with pytest.raises(ValueError, match="b"):
        convert.lstm_to_keras(w_ih, w_hh, b[:-1])
    with pytest.raises(ValueError, match="recurrent_kernel"):
        convert.lstm_from_haste(w_ih.T, np.zeros((H, 4 * H + 1)), b)
    with pytest.raises(ValueError, match="Wh"):
        convert.rnn_from_cs231n(np.zeros((D, H)), np.zeros((H, H + 1)), np.zeros(H))
    with pytest.raises(TypeError):
        convert.lstm_to_keras(w_ih.tolist(), w_hh, b)
