"""Double backward: the same functions written with differentiable torch ops.

fastrnn's backward kernels compute first-order gradients only. When autograd builds a graph
of the backward pass (``create_graph=True``: gradient penalties, Hessian-vector products,
``gradgradcheck``), the custom operators' backward formulas call :func:`grads` instead, which
recomputes the forward with the torch formulations below and differentiates them with
``create_graph=True``. The result is correct to any order, at the speed of a Python time loop:
it is the fallback for higher-order gradients only, never used by a plain ``backward()``.

The recurrences follow fastrnn/reference (PyTorch's gate orders and equations); ``lengths``
freezes each sequence's state after its last step and zeroes its outputs there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.nn import functional as F

Tensor = torch.Tensor


def grads(
    fn: Callable[..., Any],
    inputs: Sequence[Tensor | None],
    extra: Sequence[Any],
    needs: Sequence[bool],
    grad_outputs: Sequence[Tensor | None],
) -> list[Tensor | None]:
    """Gradients of ``fn(*inputs, *extra)`` for the inputs that need one, as differentiable
    tensors (a graph in the inputs and ``grad_outputs``)."""
    outputs = fn(*inputs, *extra)
    if isinstance(outputs, Tensor):
        outputs = (outputs,)
    wrt = [i for i, (t, n) in enumerate(zip(inputs, needs, strict=True)) if n and t is not None]
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if g is not None]
    result: list[Tensor | None] = [None] * len(inputs)
    if not wrt or not pairs:
        return result
    found = torch.autograd.grad(
        [o for o, _ in pairs],
        [inputs[i] for i in wrt],
        [g for _, g in pairs],
        create_graph=True,
        allow_unused=True,
    )
    for i, g in zip(wrt, found, strict=True):
        result[i] = torch.zeros_like(inputs[i]) if g is None else g
    return result


def _masks(lengths: Tensor | None, x: Tensor) -> Tensor | None:
    """(T, N, 1) booleans: step t of sequence n is inside its length."""
    if lengths is None:
        return None
    steps = torch.arange(x.shape[0], device=x.device)[:, None]
    return (steps < lengths.to(x.device)[None, :])[:, :, None]


def _scan(cell: Callable[..., tuple[Tensor, ...]], gx: Tensor, states: tuple[Tensor, ...],
          masks: Tensor | None) -> tuple[Tensor, tuple[Tensor, ...]]:  # fmt: skip
    """Run ``cell(gx_t, *states) -> new states`` (first state: the output) over time."""
    ys = []
    for t in range(gx.shape[0]):
        new = cell(gx[t], *states)
        if masks is None:
            states = new
            ys.append(new[0])
        else:
            m = masks[t]
            states = tuple(torch.where(m, n, s) for n, s in zip(new, states, strict=True))
            ys.append(torch.where(m, new[0], torch.zeros_like(new[0])))
    return torch.stack(ys), states


def lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths):
    """y, hT, cT of an LSTM layer (gates i, f, g, o; projected by w_hr when given)."""
    gx = F.linear(x, w_ih, b_ih)
    if b_hh is not None:
        gx = gx + b_hh

    def cell(g_x, h, c):
        i, f, g, o = (g_x + F.linear(h, w_hh)).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (h if w_hr is None else F.linear(h, w_hr)), c

    y, (h, c) = _scan(cell, gx, (h0, c0), _masks(lengths, x))
    return y, h, c


def gru(x, h0, w_ih, w_hh, b_ih, b_hh, lengths):
    """y, hT of a GRU layer (gates r, z, n; n uses r * (W_hn h + b_hn))."""
    gx = F.linear(x, w_ih, b_ih)

    def cell(g_x, h):
        xr, xz, xn = g_x.chunk(3, 1)
        hr, hz, hn = F.linear(h, w_hh, b_hh).chunk(3, 1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return ((1 - z) * n + z * h,)

    y, (h,) = _scan(cell, gx, (h0,), _masks(lengths, x))
    return y, h


def rnn(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, nonlinearity):
    """y, hT of an Elman RNN layer."""
    act = torch.tanh if nonlinearity == "tanh" else torch.relu
    gx = F.linear(x, w_ih, b_ih)

    def cell(g_x, h):
        return (act(g_x + F.linear(h, w_hh, b_hh)),)

    y, (h,) = _scan(cell, gx, (h0,), _masks(lengths, x))
    return y, h


def conv2d(x, w, b, stride, padding, dilation, groups, activation=None, max_pool=()):
    y = F.conv2d(x, w, b, stride, padding, dilation, groups)
    y = torch.relu(y) if activation == "relu" else y
    if max_pool:
        y = F.max_pool2d(y, max_pool[0:2], max_pool[2:4], max_pool[4:6])
    return y


def pool2d(x, kind, kernel_size, stride, padding):
    if kind == "max":
        return F.max_pool2d(x, kernel_size, stride, padding)
    return F.avg_pool2d(x, kernel_size, stride, padding, count_include_pad=True)
