"""Text corpora for the character-level LSTM: the built-in default and user files.

The default corpus is the Python standard library of the running interpreter, read from disk:
the way the classic char-rnn demo learned to write Linux kernel C, this one learns to write
Python. The selection is deterministic for a given interpreter: the ``.py`` files under the
standard library directory in sorted path order, without test suites, third-party packages
(site-packages) and a few generated or data-only packages, keeping only ASCII files (so the
vocabulary stays at about 100 characters), and thinned evenly across the sorted list until the
size budget is met (so every part of the alphabet of modules is represented, not just the
first few packages).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from fastrnn.examples._common import CommandError

DEFAULT_BUDGET = 3_000_000  # characters

# Directories never read: tests, third-party code, generated tables, bundled data, demos.
_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "__pycache__",
        "encodings",  # generated codec tables
        "pydoc_data",  # one huge string literal
        "ensurepip",
        "lib2to3",
        "turtledemo",
    }
)


@dataclass(frozen=True)
class Corpus:
    """A text and where it came from."""

    text: str
    source: str  # "stdlib" or the file's path as given
    description: str  # one line for humans
    sha256: str


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Candidate ``.py`` files of the standard library, in sorted relative-path order."""
    root = stdlib_root() if root is None else root
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d
            for d in dirnames
            if d not in _SKIP_DIRS and not d.startswith((".", "config-", "test_"))
        ]
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus(budget: int = DEFAULT_BUDGET, root: Path | None = None) -> Corpus:
    """The default corpus: about ``budget`` characters of standard-library Python source.

    A file is kept when the selected size so far plus its own stays within the budget's share
    of the candidates read so far (budget x bytes seen / all bytes); this spreads the selection
    evenly across the sorted list. Unreadable, non-UTF-8 and non-ASCII files are skipped.
    """
    root = stdlib_root() if root is None else root
    texts: list[tuple[Path, str]] = []
    for path in stdlib_files(root):
        try:
            raw = path.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.isascii() and text.strip():
            texts.append((path, text))
    total = sum(len(t) for _, t in texts)
    if total == 0:
        raise CommandError(
            f"no readable Python sources found under {root} for the default corpus; "
            "pass --text FILE"
        )
    chosen: list[str] = []
    seen = kept = 0
    for _, text in texts:
        seen += len(text)
        if kept + len(text) <= budget * seen / total:
            chosen.append(text)
            kept += len(text)
    text = "\n".join(t if t.endswith("\n") else t + "\n" for t in chosen)
    return Corpus(
        text=text,
        source="stdlib",
        description=(
            f"Python {sysconfig.get_python_version()} standard library: {len(chosen)} of "
            f"{len(texts)} source files, {len(text):,} characters"
        ),
        sha256=_sha256(text),
    )


def file_corpus(path: str | os.PathLike[str]) -> Corpus:
    """A UTF-8 text file as a corpus; missing, empty and binary files are errors."""
    p = Path(path)
    if not p.exists():
        raise CommandError(f"--text: no such file: {path}")
    if not p.is_file():
        raise CommandError(f"--text: not a regular file: {path}")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise CommandError(f"--text: cannot read {path}: {exc.strerror or exc}") from None
    if not raw.strip():
        raise CommandError(f"--text: {path} is empty")
    if b"\x00" in raw:
        raise CommandError(f"--text: {path} looks binary (it contains NUL bytes), not text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CommandError(
            f"--text: {path} is not UTF-8 text (invalid byte at offset {exc.start})"
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return Corpus(
        text=text,
        source=str(path),
        description=f"{path}: {len(text):,} characters",
        sha256=_sha256(text),
    )
