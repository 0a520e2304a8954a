"""The ``numpy`` backend: the plain NumPy reference behind the backend interface."""

from __future__ import annotations

from fastrnn import reference as ref

name = "numpy"


def lstm_forward(x, h0, c0, w_ih, w_hh, b, lengths, training, w_hr=None):
    return ref.lstm_forward(
        x, h0, c0, w_ih, w_hh, b, w_hr=w_hr, lengths=lengths, training=training
    )


def lstm_backward(ctx, dy, dhT, dcT):
    return ref.lstm_backward(ctx, dy, dhT, dcT)


def gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, training):
    return ref.gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=lengths, training=training)


def gru_backward(ctx, dy, dhT):
    return ref.gru_backward(ctx, dy, dhT)


def rnn_forward(x, h0, w_ih, w_hh, b, nonlinearity, lengths, training):
    return ref.rnn_forward(
        x, h0, w_ih, w_hh, b, nonlinearity=nonlinearity, lengths=lengths, training=training
    )


def rnn_backward(ctx, dy, dhT):
    return ref.rnn_backward(ctx, dy, dhT)


def conv2d_forward(x, w, b, stride, padding, dilation, groups, training):
    return ref.conv2d_forward(
        x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups,
        training=training,
    )


def conv2d_backward(ctx, dy, input_grad=True):
    return ref.conv2d_backward(ctx, dy)  # the oracle computes dx whatever is asked


def max_pool2d_forward(x, kernel_size, stride, padding, training):
    return ref.max_pool2d_forward(x, kernel_size, stride, padding, training=training)


def max_pool2d_backward(ctx, dy):
    return ref.max_pool2d_backward(ctx, dy)


def avg_pool2d_forward(x, kernel_size, stride, padding, training):
    return ref.avg_pool2d_forward(x, kernel_size, stride, padding, training=training)


def avg_pool2d_backward(ctx, dy):
    return ref.avg_pool2d_backward(ctx, dy)
