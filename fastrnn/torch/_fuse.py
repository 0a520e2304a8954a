"""``fuse(model)``: Conv2d followed by ReLU, and by max pooling, as one fastrnn operator.

A model written against torch.nn applies ReLU as a separate module or function call, so a
convolution module never sees the ReLU after it. ``fuse`` traces the model with ``torch.fx``
(fastrnn.torch's modules kept as single calls), finds each fastrnn.torch ``Conv2d`` whose output
feeds nothing but a ReLU (``nn.ReLU``, ``torch.relu``, ``F.relu``, ``Tensor.relu``, in place or
not), sets that convolution's ``activation="relu"`` and removes the ReLU: the kernel applies it
in its store, and its backward passes the gradient where the output is positive, exactly as
``torch.relu``'s does. A convolution (ReLU fused or not) whose output feeds nothing but a max
pooling (a ``fastrnn.torch.MaxPool2d`` or ``torch.nn.MaxPool2d`` module, ``F.max_pool2d`` or
``torch.max_pool2d``, that fastrnn can run) becomes one call of
:func:`fastrnn.torch.modules.conv2d_max_pool`: the CPU's kernels pool each image while it is
in cache.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from fastrnn.backends.ops import max_pool_window
from fastrnn.torch import modules

_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu, F.relu_)
_RELU_METHODS = ("relu", "relu_")
_LEAVES = (modules.Conv2d, modules.MaxPool2d, modules.AvgPool2d, modules.LSTM, modules.GRU,
           modules.RNN)  # fmt: skip


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with fastrnn.torch's modules as leaves (one call_module node each)."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualified_name)


def _max_pool_signature(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                        return_indices=False):  # fmt: skip
    """F.max_pool2d's and torch.max_pool2d's arguments (their stride's default: the kernel)."""


_MAX_POOL_FUNCTIONS = (F.max_pool2d, torch.max_pool2d)


def _window(kernel_size: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: Any,
            return_indices: Any) -> dict | None:  # fmt: skip
    """The window fastrnn's max pooling computes (max_pool_window's checks), or None (dilated,
    indices, ceil mode, or an argument that is not a constant int or pair)."""
    values = (kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    if any(isinstance(v, fx.Node) for v in values) or ceil_mode or return_indices:
        return None
    if stride == [] or stride == ():  # torch.max_pool2d's default: the kernel size
        stride = None
    try:
        if modules._pair(dilation) != (1, 1):
            return None
        window = max_pool_window(dict(kernel_size=kernel_size, stride=stride, padding=padding))
    except (TypeError, ValueError, IndexError):
        return None
    return dict(zip(("kernel_size", "stride", "padding"), window, strict=True))


def _max_pool_window(node: fx.Node, source: fx.Node, root: nn.Module) -> dict | None:
    """kernel_size, stride and padding of a max pooling of ``source`` alone (a MaxPool2d module
    call, F.max_pool2d or torch.max_pool2d), when fastrnn's pooling computes it (dilation 1, no
    indices, floor mode); else None."""
    if node.op == "call_function" and node.target in _MAX_POOL_FUNCTIONS:
        try:
            bound = inspect.signature(_max_pool_signature).bind(*node.args, **node.kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        a = bound.arguments
        if a["input"] is not source:
            return None
        return _window(a["kernel_size"], a["stride"], a["padding"], a["dilation"],
                       a["ceil_mode"], a["return_indices"])  # fmt: skip
    if node.op != "call_module" or node.args != (source,) or node.kwargs:
        return None
    pool = root.get_submodule(node.target)
    if type(pool) not in (modules.MaxPool2d, nn.MaxPool2d):
        return None
    return _window(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                   pool.return_indices)  # fmt: skip


def _is_relu(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in _RELU_METHODS
    if node.op == "call_module":
        return type(root.get_submodule(node.target)) is nn.ReLU
    return False


def fuse(model: nn.Module, *, inplace: bool = False) -> fx.GraphModule:
    """``model`` as a ``torch.fx.GraphModule`` in which every fastrnn.torch ``Conv2d`` followed
    only by a ReLU applies it in its kernel (``activation="relu"``) and the ReLU is gone, and
    every one then followed only by max pooling pools in the same operator.

    Fused with their ReLU are convolutions called once in the model, whose output goes to one
    ReLU and nowhere else, and that have no activation yet. Fused with their pooling are
    convolution calls whose output goes to one max pooling and nowhere else: a ``MaxPool2d``
    module (fastrnn.torch's or torch.nn's), ``F.max_pool2d`` or ``torch.max_pool2d``, with
    dilation 1, no indices and floor mode; the modules stay where they are, and the
    convolution's module does not change. Results and gradients are
    those of the model (the same operations, in the same order); its state_dict keeps the same
    names.

    ``inplace=False`` (the default) fuses a deep copy, so the model is unchanged and the fused
    one has its own parameters: build the optimizer on the fused model. ``inplace=True``
    shares the model's modules and parameters, and sets ``activation`` on its convolutions
    (calling the model itself still gives the same results: ReLU applied twice is ReLU once).

    The model must be traceable by ``torch.fx.symbolic_trace`` (no control flow on tensor
    values); everything torch.fx accepts works, including models holding other torch.nn or
    fastrnn.torch modules, which stay as they are."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace: expected a bool, got {type(inplace).__name__}")
    root = model if inplace else copy.deepcopy(model)
    graph = _Tracer().trace(root)
    calls: dict[Any, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(graph.nodes):
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        conv = root.get_submodule(node.target)
        if not isinstance(conv, modules.Conv2d) or conv.activation is not None:
            continue
        users = list(node.users)
        if len(users) != 1 or not _is_relu(users[0], root):
            continue
        relu = users[0]
        if relu.args[0] is not node or len(relu.args) > 1 or set(relu.kwargs) - {"inplace"}:
            continue  # the convolution's output must be the ReLU's only argument
        conv.activation = "relu"
        relu.replace_all_uses_with(node)
        graph.erase_node(relu)
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        conv = root.get_submodule(node.target)
        users = list(node.users)
        if not isinstance(conv, modules.Conv2d) or len(users) != 1 or node.kwargs:
            continue
        if len(node.args) != 1:
            continue
        window = _max_pool_window(users[0], node, root)
        if window is None:
            continue
        pool = users[0]
        with graph.inserting_before(pool):
            module = graph.get_attr(node.target)
            fused = graph.call_function(modules.conv2d_max_pool, (module, *node.args), window)
        pool.replace_all_uses_with(fused)
        graph.erase_node(pool)
        graph.erase_node(node)
    graph.lint()
    fused = fx.GraphModule(root, graph, class_name=type(model).__name__)
    fused.train(model.training)
    return fused
