"""Checkpoints: ``save(path, state_dict)`` / ``load(path)`` in NumPy's ``.npz`` format.

Never pickle: arrays are written and read with ``allow_pickle=False``, so loading a file cannot
run code. Object arrays and non-array values are refused with ``TypeError``. The file is written
to a temporary file in the same directory, flushed to disk and then renamed over ``path``
(``os.replace`` is atomic), so a crash never leaves a half-written checkpoint. A truncated,
corrupt or foreign file raises ``ValueError``.

A format marker (``__fastrnn_checkpoint__``) is stored next to the arrays; files without it were
not written by this module and are refused. Keys are returned in the order they were saved.
CuPy arrays are copied to the host when saved; ``load`` returns NumPy arrays
(``model.load_state_dict`` moves them to the model's array module).
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from fastrnn.backends.validation import is_cupy_array

MARKER = "__fastrnn_checkpoint__"
FORMAT_VERSION = 1


def _host_array(key: str, value: Any) -> np.ndarray:
    if is_cupy_array(value):
        value = value.get()
    elif isinstance(value, np.generic):
        value = np.asarray(value)
    if not isinstance(value, np.ndarray):
        raise TypeError(
            f"state_dict[{key!r}]: expected a numpy.ndarray or cupy.ndarray, "
            f"got {type(value).__name__}"
        )
    if value.dtype.kind not in "biuf":
        raise TypeError(
            f"state_dict[{key!r}]: dtype {value.dtype} cannot be saved without pickle "
            "(booleans, integers and floats only)"
        )
    return value


def save(path: str | os.PathLike, state_dict: Mapping[str, Any]) -> None:
    """Write ``state_dict`` (name -> array) to ``path`` atomically, exactly at ``path`` (no
    suffix added). Raises ``TypeError`` for non-string keys or non-array values."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict: expected a mapping of names to arrays, got {type(state_dict).__name__}"
        )
    arrays: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict: keys must be strings, got {key!r}")
        if key == MARKER or not key or "/" in key:
            raise ValueError(f"state_dict: key {key!r} is reserved or not a valid name")
        arrays[key] = _host_array(key, value)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{MARKER: np.array(FORMAT_VERSION, dtype=np.int64)}, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a checkpoint written by :func:`save` -> dict of NumPy arrays (saved order).

    Raises ``FileNotFoundError`` when ``path`` does not exist and ``ValueError`` when it is not a
    complete fastrnn checkpoint (truncated, corrupt, pickled, or another kind of file)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        with data:
            names = list(data.files)
            if MARKER not in names:
                raise ValueError(f"no {MARKER} entry: not written by fastrnn.io.save")
            version = int(data[MARKER])
            if version != FORMAT_VERSION:
                raise ValueError(f"unsupported checkpoint format version {version}")
            return {k: data[k] for k in names if k != MARKER}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise ValueError(
            f"{path}: not a valid fastrnn checkpoint (truncated, corrupt or foreign file): {exc}"
        ) from exc
