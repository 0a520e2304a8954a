"""Linear, Embedding and Flatten."""

from __future__ import annotations

from typing import Any

import numpy as np

from fastrnn.backends import training
from fastrnn.backends.validation import is_cupy_array
from fastrnn.nn import init
from fastrnn.nn._check import check_grad, check_input, positive_int
from fastrnn.nn._xp import array_module, grad_enabled, move, scatter_add
from fastrnn.nn.functional import linear_cross_entropy
from fastrnn.nn.module import Module, Parameter


class Linear(Module):
    """y = x W^T + b over the last axis of x (any leading shape).

    weight (out_features, in_features), bias (out_features,), both U(-1/sqrt(in), 1/sqrt(in))
    as in torch.nn.Linear.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, dtype: Any = np.float32
    ) -> None:
        super().__init__()
        self.in_features = positive_int("in_features", in_features, 0)
        self.out_features = positive_int("out_features", out_features, 0)
        bound = init.fan_in_bound(in_features)
        self.weight = Parameter(init.uniform((out_features, in_features), bound, dtype))
        self.bias = Parameter(init.uniform((out_features,), bound, dtype)) if bias else None
        self._cache = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + (
            f"bias={self.bias is not None}"
        )

    def forward(self, x: Any) -> Any:
        check_input("Linear", "x", x, self.weight.data)
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"Linear: x: expected shape (..., {self.in_features}), got {tuple(x.shape)}"
            )
        # As one 2-D GEMM: NumPy's matmul of an N-D array by a transposed 2-D view does not
        # reach BLAS (a (64, 32, 256) input took 496 ms instead of 2 ms).
        lead = tuple(x.shape[:-1])
        y = (x.reshape(-1, self.in_features) @ self.weight.data.T).reshape(
            lead + (self.out_features,)
        )
        if self.bias is not None:
            y += self.bias.data
        self._cache = x if grad_enabled() else None
        return y

    def backward(self, dy: Any) -> Any:
        x = self._saved()
        check_grad("Linear", dy, x.shape[:-1] + (self.out_features,), x.dtype)
        x2 = x.reshape(-1, self.in_features)
        dy2 = dy.reshape(-1, self.out_features)
        self.weight.accumulate(dy2.T @ x2)
        if self.bias is not None:
            self.bias.accumulate(dy2.sum(axis=0))
        return (dy2 @ self.weight.data).reshape(x.shape)

    def cross_entropy(self, x: Any, targets: Any) -> tuple[float, Any]:
        """Forward, mean softmax cross-entropy against integer ``targets`` and backward in one
        call: returns ``(loss, dx)`` and adds the weight and bias gradients, exactly what
        ``forward`` + ``functional.softmax_cross_entropy`` + ``backward`` give, without the
        logits ever existing whole (``functional.linear_cross_entropy``)."""
        check_input("Linear", "x", x, self.weight.data)
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"Linear: x: expected shape (..., {self.in_features}), got {tuple(x.shape)}"
            )
        w, b = self.weight, self.bias
        self._cache = None
        return linear_cross_entropy(
            x,
            w.data,
            None if b is None else b.data,
            targets,
            dweight=w.grad if w.requires_grad else None,
            dbias=b.grad if b is not None and b.requires_grad else None,
        )


class Embedding(Module):
    """A lookup table: integer indices of any shape -> vectors (shape + (embedding_dim,)).

    weight (num_embeddings, embedding_dim) ~ N(0, 1) as in torch.nn.Embedding; the row
    ``padding_idx`` (if given) starts at zero and gets no gradient. ``backward`` returns None
    (indices have no gradient).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        dtype: Any = np.float32,
    ) -> None:
        super().__init__()
        self.num_embeddings = positive_int("num_embeddings", num_embeddings)
        self.embedding_dim = positive_int("embedding_dim", embedding_dim)
        if padding_idx is not None:
            if not isinstance(padding_idx, (int, np.integer)) or isinstance(padding_idx, bool):
                raise TypeError(f"padding_idx: expected an int or None, got {padding_idx!r}")
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(
                    f"padding_idx: must be in -{num_embeddings}..{num_embeddings - 1}, "
                    f"got {padding_idx}"
                )
            padding_idx = int(padding_idx) % num_embeddings
        self.padding_idx = padding_idx
        w = init.normal((num_embeddings, embedding_dim), dtype)
        if padding_idx is not None:
            w[padding_idx] = 0
        self.weight = Parameter(w)
        self._cache = None

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"

    def forward(self, indices: Any) -> Any:
        indices = self.check_indices(indices)
        self._cache = indices if grad_enabled() else None
        return self.weight.data[indices]

    def check_indices(self, indices: Any) -> Any:
        """``indices`` as an integer array of the weight's array module, each checked to be in
        0..num_embeddings-1 (TypeError / ValueError naming them otherwise)."""
        xp = array_module(self.weight.data)
        if isinstance(indices, (list, tuple)):
            indices = np.asarray(indices)
        if not (isinstance(indices, np.ndarray) or is_cupy_array(indices)):
            raise TypeError(
                f"Embedding: indices: expected an integer array, got {type(indices).__name__}"
            )
        if indices.dtype.kind not in "iu":
            raise TypeError(f"Embedding: indices: expected an integer dtype, got {indices.dtype}")
        indices = move(indices, xp)
        if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= self.num_embeddings):
            raise ValueError(
                f"Embedding: indices: every index must be in 0..{self.num_embeddings - 1}, got "
                f"min {int(indices.min())} max {int(indices.max())}"
            )
        return indices

    def accumulate_table_grad(self, g: Any) -> None:
        """Add ``g`` (num_embeddings, embedding_dim), a gradient of the whole table computed
        elsewhere (a recurrent layer that folded this lookup into its first layer), to
        weight.grad: the padding row gets none, and nothing is added without requires_grad."""
        if not self.weight.requires_grad:
            return
        if self.padding_idx is not None:
            g[self.padding_idx] = 0
        self.weight.accumulate(g)

    def backward(self, dy: Any) -> None:
        indices = self._saved()
        w = self.weight.data
        check_grad("Embedding", dy, tuple(indices.shape) + (self.embedding_dim,), w.dtype)
        if not self.weight.requires_grad:
            return None
        flat = indices.reshape(-1)
        dy2 = dy.reshape(-1, self.embedding_dim)
        kern = training.cpu_kernels(flat, dy2, self.weight.grad)
        if kern is not None:
            # a stable counting sort of the indices, then each row's sum in parallel
            V, M = self.num_embeddings, flat.shape[0]
            nt = training.threads() if M * self.embedding_dim >= 1 << 16 else 1
            kern.embedding_backward(
                np.ascontiguousarray(flat, dtype=np.int64),
                dy2,
                self.weight.grad,
                -1 if self.padding_idx is None else self.padding_idx,
                training.scratch("embedding_counts", np.int64, V + 1),
                training.scratch("embedding_order", np.int64, M),
                nt,
            )
        else:
            xp = array_module(w)
            g = xp.zeros_like(w)
            scatter_add(xp, g, indices.reshape(-1), dy.reshape(-1, self.embedding_dim))
            if self.padding_idx is not None:
                g[self.padding_idx] = 0
            self.weight.accumulate(g)
        return None


class Flatten(Module):
    """Flattens dims start_dim..end_dim into one (torch.nn.Flatten's defaults: 1, -1)."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim, self.end_dim = int(start_dim), int(end_dim)
        self._cache = None

    def forward(self, x: Any) -> Any:
        check_input("Flatten", "x", x, None)
        nd = max(x.ndim, 1)
        s, e = self.start_dim % nd, self.end_dim % nd
        if s > e:
            raise ValueError(
                f"Flatten: start_dim {self.start_dim} comes after end_dim {self.end_dim} "
                f"for an input of shape {tuple(x.shape)}"
            )
        self._cache = tuple(x.shape)
        return x.reshape(tuple(x.shape[:s]) + (-1,) + tuple(x.shape[e + 1 :]))

    def backward(self, dy: Any) -> Any:
        shape = self._saved()
        return dy.reshape(shape)


class Identity(Module):
    def forward(self, x: Any) -> Any:
        return x

    def backward(self, dy: Any) -> Any:
        return dy
