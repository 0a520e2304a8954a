"""Sequential: modules applied in order; backward runs them in reverse."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from fastrnn.nn.module import Module


class Sequential(Module):
    """``Sequential(m0, m1, ...)`` or ``Sequential(OrderedDict(name=m, ...))``; state-dict keys
    are ``"0.weight"`` etc. as in torch.nn.Sequential."""

    def __init__(self, *modules: Any) -> None:
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], (dict, OrderedDict)):
            items = list(modules[0].items())
        else:
            items = [(str(i), m) for i, m in enumerate(modules)]
        for name, m in items:
            if not isinstance(m, Module):
                raise TypeError(f"Sequential: {name}: expected a Module, got {type(m).__name__}")
            setattr(self, name, m)

    def append(self, module: Module) -> Sequential:
        if not isinstance(module, Module):
            raise TypeError(f"module: expected a Module, got {type(module).__name__}")
        setattr(self, str(len(self._modules)), module)
        return self

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def forward(self, x: Any) -> Any:
        for m in self._modules.values():
            x = m(x)
        return x

    def backward(self, dy: Any) -> Any:
        for m in reversed(list(self._modules.values())):
            dy = m.backward(dy)
        return dy
