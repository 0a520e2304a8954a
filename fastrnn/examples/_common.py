"""Pieces the ``fastrnn`` commands share: the user-facing error, the progress bar, atomic JSON
files and the training-curve plot."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from fastrnn.io import temp_file


class CommandError(Exception):
    """A problem the user can fix (bad argument, missing file, wrong checkpoint).

    The command line prints its message as one line and exits non-zero, without a traceback.
    """


# ------------------------------------------------------------------------------------------------
# progress bar
# ------------------------------------------------------------------------------------------------


def _format_postfix(values: Mapping[str, Any]) -> str:
    parts = []
    for key, value in values.items():
        if isinstance(value, float):
            value = f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
        parts.append(f"{key}={value}")
    return ", ".join(parts)


class Progress:
    """A progress bar: tqdm when installed, a plain text fallback otherwise.

    ``write(text)`` prints above the live bar (tqdm) or between progress lines (fallback), so
    samples and validation results appear "under" the bar as training goes on.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        initial: int = 0,
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.n = initial
        self._postfix: dict[str, Any] = {}
        self._start = time.perf_counter()
        self._last_print = 0.0
        self._bar: Any = None
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            self._bar = tqdm(
                total=total,
                desc=desc,
                unit=unit,
                initial=initial,
                file=self.stream,
                dynamic_ncols=True,
                leave=True,
            )
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        if postfix:
            self._postfix.update(postfix)
        if not self.enabled:
            return
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix_str(_format_postfix(self._postfix), refresh=False)
            self._bar.update(n)
            return
        now = time.perf_counter()
        interval = 0.5 if self._tty else 10.0
        done = self.total is not None and self.n >= self.total
        if now - self._last_print >= interval or done:
            self._last_print = now
            self._print_line(final=done)

    def _print_line(self, final: bool = False) -> None:
        elapsed = time.perf_counter() - self._start
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        line = f"{self.desc}: {count} {self.unit} [{elapsed:.0f}s]"
        if self._postfix:
            line += " " + _format_postfix(self._postfix)
        if self._tty:
            self.stream.write("\r\x1b[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def write(self, text: str) -> None:
        """Print ``text`` (lines) without breaking the bar."""
        if not self.enabled:
            print(text, file=self.stream, flush=True)
        elif self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            if self._tty:
                self.stream.write("\r\x1b[K")
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as JSON to a temporary file in the same directory, then rename it over
    ``path``: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, f".{path.name}.", ".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, allow_nan=False, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _json_default(value: Any) -> Any:
    # NumPy scalars (np.float32, np.int64) and arrays
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN/inf: store them as null."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CommandError(f"{what}: {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CommandError(f"{what}: {path} is not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise CommandError(f"{what}: {path} does not hold a JSON object")
    return data


def check_output_file(path: str | os.PathLike[str], option: str) -> Path:
    """An output file path whose directory exists or can be made."""
    p = Path(path)
    if p.exists() and p.is_dir():
        raise CommandError(f"{option}: {path} is a directory, expected a file path")
    return p


# ------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------


def matplotlib_pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None when not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike[str]) -> None:
    """Save a matplotlib figure atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, f".{path.stem}.", path.suffix or ".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ------------------------------------------------------------------------------------------------
# argument types (argparse turns their ValueError/ArgumentTypeError into a one-line error)
# ------------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def probability(text: str) -> float:
    """A dropout probability: 0 <= p < 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not (0.0 <= value < 1.0):
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


# ------------------------------------------------------------------------------------------------
# threads
# ------------------------------------------------------------------------------------------------


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


class ThreadChoice:
    """The threads of a training command and why: what :func:`training_threads` yields.

    ``str(choice)`` is the note for the run's header line. When ``auto`` (no ``--threads``, no
    ``OMP_NUM_THREADS``), the command times its first steps with :meth:`measure` before it
    prints the header.
    """

    def __init__(self, n: int, note: str, auto: bool) -> None:
        self.n, self.note, self.auto = n, note, auto

    def __str__(self) -> str:
        return f"{self.n} ({self.note})"

    def measure(
        self,
        step: Callable[[], Any],
        *,
        rounds: int = 3,
        timer: Callable[[], float] = time.perf_counter,
    ) -> int:
        """Choose between 1 thread and all CPUs by timing ``step`` on each (a warm-up call
        each, then ``rounds`` calls each, alternating); keep the count with the lower median
        and set it. A no-op unless ``auto``.

        Measured, not guessed from the load average: a kernel on several threads synchronises
        them at every time step, so one thread that must share its core with another process
        stalls the rest (char-rnn on the 2-core machine with a second busy process: 6k
        characters/s on two threads, 26k on one); and the load average still counts a
        compiler that finished a minute ago (an idle machine ran on one thread).
        """
        import fastrnn

        if not self.auto or self.n <= 1:
            return self.n
        counts = (1, self.n)
        times: dict[int, list[float]] = {n: [] for n in counts}
        for n in counts:
            fastrnn.set_num_threads(n)
            step()
        for r in range(rounds):
            for n in counts if r % 2 == 0 else counts[::-1]:
                fastrnn.set_num_threads(n)
                t0 = timer()
                step()
                times[n].append(timer() - t0)
        median = {n: statistics.median(v) for n, v in times.items()}
        best = min(counts, key=lambda n: (median[n], n))
        fastrnn.set_num_threads(best)
        self.note = (
            f"measured: {median[self.n] * 1e3:.1f} ms per step on {self.n} threads, "
            f"{median[1] * 1e3:.1f} ms on 1"
        )
        self.n = best
        return best


def training_threads(n: int | None) -> contextlib.AbstractContextManager[ThreadChoice]:
    """Threads of a training command, as a context manager that yields a :class:`ThreadChoice`
    (its ``str`` is the note for the log).

    fastrnn's kernels run on ``n`` threads; ``None`` means ``OMP_NUM_THREADS`` when set, else
    all CPUs this process may use, to be narrowed by the command's measurement of its first
    steps (:meth:`ThreadChoice.measure`).

    NumPy's BLAS runs on one thread meanwhile: the layers' own matrix products (a Linear head)
    are small, and between kernel calls the kernels' OpenMP threads are still spinning, so a
    second pool of BLAS threads only fights them for the cores (char-rnn: 18k characters/s
    with NumPy's BLAS on two threads, 44k on one, same idle machine).
    """
    return _training_threads(n)


@contextlib.contextmanager
def _training_threads(n: int | None) -> Iterator[ThreadChoice]:
    import fastrnn

    before = fastrnn.get_num_threads()
    if n is not None:
        choice = ThreadChoice(n, "--threads", auto=False)
    elif os.environ.get("OMP_NUM_THREADS", "").strip():
        choice = ThreadChoice(before, "OMP_NUM_THREADS", auto=False)
    else:
        cpus = available_cpus()
        choice = ThreadChoice(cpus, f"auto: {cpus} CPUs", auto=cpus > 1)
    fastrnn.set_num_threads(choice.n)
    try:
        from fastrnn._cpu import _scipy_blas

        _scipy_blas.module()  # SciPy's BLAS (the kernels' one) loaded, so it is limited too
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            yield choice
    finally:
        fastrnn.set_num_threads(before)
