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

``load`` reads every member's header first and refuses, with ``ValueError``, a file whose
declared arrays hold more than ``max_bytes`` in all (default :data:`MAX_BYTES`, 4 GiB; pass
``max_bytes=None`` for no limit) before it allocates anything, so a small hostile file cannot make
it allocate gigabytes. Only regular files are read (never a FIFO or a device). Saved files get the
permissions a new file would get under the process's umask, like ``open(path, "w")``.
"""

from __future__ import annotations

import os
import secrets
import stat
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from fastrnn.backends.validation import is_cupy_array

MARKER = "__fastrnn_checkpoint__"
FORMAT_VERSION = 1
MAX_BYTES = 4 << 30  # load's default limit on the arrays a file may declare


def temp_file(directory: str | os.PathLike, prefix: str, suffix: str) -> tuple[int, str]:
    """A new file in ``directory``, opened for writing -> (fd, path): like ``tempfile.mkstemp``
    (exclusive creation, a random name) but with the permissions of any new file (0666 less the
    umask) instead of mkstemp's 0600, since it is renamed over the user's file."""
    for _ in range(100):
        path = os.path.join(os.fspath(directory), f"{prefix}{secrets.token_hex(8)}{suffix}")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"{directory}: could not create a temporary file")


def open_regular(path: str | os.PathLike, *, follow_symlinks: bool = True) -> Any:
    """``path`` opened for binary reading, refused with ``ValueError`` unless it is a regular
    file (a FIFO would block, a device never end); the check is on the opened file itself."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{os.fspath(path)}: cannot be opened as a regular file ({exc})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{os.fspath(path)}: not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _declared_bytes(archive: zipfile.ZipFile, limit: int | None) -> None:
    """Check every member's declared shape and dtype (its .npy header) against ``limit``."""
    total = 0
    for info in archive.infolist():
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            elif version in ((2, 0), (3, 0)):
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValueError(f"member {info.filename!r}: unknown .npy version {version}")
        if dtype.hasobject:
            raise ValueError(f"member {info.filename!r}: object arrays are not loaded")
        count = 1
        for n in shape:
            count *= int(n)
        total += count * dtype.itemsize
        if limit is not None and total > limit:
            raise ValueError(
                f"the arrays it declares need more than max_bytes={limit} bytes "
                f"(member {info.filename!r} has shape {tuple(shape)}, dtype {dtype})"
            )


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
    fd, tmp = temp_file(directory, ".tmp-", ".npz")
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


def load(path: str | os.PathLike, *, max_bytes: int | None = MAX_BYTES) -> dict[str, np.ndarray]:
    """Read a checkpoint written by :func:`save` -> dict of NumPy arrays (saved order).

    ``max_bytes`` bounds the total size of the arrays the file declares (checked from the
    headers before anything is allocated; None for no limit). Raises ``FileNotFoundError`` when
    ``path`` does not exist and ``ValueError`` when it is not a complete fastrnn checkpoint
    (truncated, corrupt, pickled, another kind of file, not a regular file) or declares more
    than ``max_bytes``."""
    if max_bytes is not None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)):
            raise TypeError(f"max_bytes: expected an int or None, got {type(max_bytes).__name__}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes: expected a size >= 0, got {max_bytes}")
        max_bytes = int(max_bytes)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        with open_regular(path) as f:
            with zipfile.ZipFile(f) as archive:
                _declared_bytes(archive, max_bytes)
            f.seek(0)
            with np.load(f, allow_pickle=False) as data:
                names = list(data.files)
                if MARKER not in names:
                    raise ValueError(f"no {MARKER} entry: not written by fastrnn.io.save")
                version = int(data[MARKER])
                if version != FORMAT_VERSION:
                    raise ValueError(f"unsupported checkpoint format version {version}")
                return {k: data[k] for k in names if k != MARKER}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, MemoryError) as exc:
        raise ValueError(
            f"{path}: not a valid fastrnn checkpoint (truncated, corrupt or foreign file): {exc}"
        ) from exc
