"""Mini-batches and train/validation/test splits over arrays (NumPy or CuPy).

Shuffling draws from a NumPy generator seeded by ``seed``; the permutation is applied to CuPy
arrays on the device. Every array is indexed along its first axis, and all arrays must agree on
its length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from fastrnn.backends.validation import is_cupy_array
from fastrnn.nn._xp import array_module, move

__all__ = ["MiniBatches", "minibatches", "train_val_test_split"]


def _check_arrays(arrays: Sequence[Any]) -> int:
    if not arrays:
        raise ValueError("arrays: expected at least one array")
    n = None
    for i, a in enumerate(arrays):
        if not (isinstance(a, np.ndarray) or is_cupy_array(a)):
            raise TypeError(
                f"arrays[{i}]: expected a numpy.ndarray or cupy.ndarray, got {type(a).__name__}"
            )
        if a.ndim < 1:
            raise ValueError(f"arrays[{i}]: expected at least one dimension, got a 0-d array")
        if n is None:
            n = a.shape[0]
        elif a.shape[0] != n:
            raise ValueError(
                f"arrays[{i}]: has {a.shape[0]} rows, arrays[0] has {n}; all arrays must agree"
            )
    return int(n)


def _take(a: Any, index: np.ndarray) -> Any:
    return a[move(index, array_module(a))]


class MiniBatches:
    """Re-iterable mini-batches: ``for xb, yb in MiniBatches(x, y, batch_size=32, seed=0)``.

    shuffle : a fresh permutation per epoch (pass over the data), drawn from one generator seeded
        with ``seed`` (reproducible: the same seed gives the same sequence of epochs)
    drop_last : leave out the last, smaller batch

    Yields a tuple of arrays per batch (a single array when one array was given).
    """

    def __init__(
        self,
        *arrays: Any,
        batch_size: int,
        shuffle: bool = True,
        seed: int | None = None,
        drop_last: bool = False,
    ) -> None:
        self.n = _check_arrays(arrays)
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool):
            raise TypeError(f"batch_size: expected an int, got {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.arrays = arrays
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        order = self._rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        for k in range(len(self)):
            index = order[k * self.batch_size : (k + 1) * self.batch_size]
            if not self.shuffle:
                batch = tuple(a[index[0] : index[-1] + 1] for a in self.arrays)
            else:
                batch = tuple(_take(a, index) for a in self.arrays)
            yield batch[0] if len(batch) == 1 else batch


def minibatches(
    *arrays: Any,
    batch_size: int,
    shuffle: bool = True,
    seed: int | None = None,
    drop_last: bool = False,
) -> Iterator[Any]:
    """One pass over the data in mini-batches (see :class:`MiniBatches`)."""
    return iter(
        MiniBatches(*arrays, batch_size=batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
    )


def _fraction(name: str, value: Any) -> float:
    if not isinstance(value, (int, float, np.floating)) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a fraction (float), got {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: must be in [0, 1), got {value}")
    return float(value)


def train_val_test_split(
    *arrays: Any,
    val: float = 0.1,
    test: float = 0.1,
    seed: int | None = 0,
    shuffle: bool = True,
) -> tuple[Any, Any, Any]:
    """Split arrays along their first axis into disjoint train, validation and test parts.

    ``val`` and ``test`` are fractions of the rows (rounded to the nearest row count); the rest is
    the training set, which must not be empty. The rows are shuffled with ``seed`` first (the same
    seed gives the same split). Returns ``(train, val, test)``; each is a tuple of arrays, or a
    single array when one array was given.

    Choose models and hyperparameters on the validation part only; evaluate the test part once,
    at the end.
    """
    n = _check_arrays(arrays)
    val, test = _fraction("val", val), _fraction("test", test)
    n_val, n_test = int(round(n * val)), int(round(n * test))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(
            f"val + test: leave no training rows ({n} rows, {n_val} validation, {n_test} test)"
        )
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    parts = (order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :])
    out = []
    for index in parts:
        split = tuple(_take(a, index) for a in arrays)
        out.append(split[0] if len(split) == 1 else split)
    return out[0], out[1], out[2]
