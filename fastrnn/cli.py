"""The ``fastrnn`` command (also ``python -m fastrnn``).

Subcommands: ``info``, ``char-rnn train``, ``char-rnn sample``, ``digits``, ``bench``. Errors the
user can fix end with one line on stderr and a non-zero exit status, never a traceback
(``FASTRNN_DEBUG=1`` shows the traceback of an unexpected error).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from fastrnn.examples._common import CommandError, training_threads

EXIT_USAGE = 2  # bad arguments (argparse's convention)
EXIT_FAILURE = 1  # anything else that went wrong
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, but an argument error raises instead of printing usage and exiting, so that
    every error leaves the same way: one line, non-zero exit."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


class _UsageError(CommandError):
    pass


def _cmd_info(args: argparse.Namespace) -> int:
    from fastrnn.examples import sysinfo

    info = sysinfo.collect()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(sysinfo.format_report(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fastrnn import __version__
    from fastrnn.examples import char_rnn, digits

    parser = _Parser(
        prog="fastrnn",
        description="Fast fused RNN and CNN kernels: demos, benchmarks and build information.",
    )
    parser.add_argument("--version", action="version", version=f"fastrnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("info", help="version, build (OpenMP, compiler), threads, BLAS, GPU")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "char-rnn",
        help="character-level LSTM text generator (train, sample)",
        description="A character-level LSTM that learns to write like its corpus.",
    )
    char_sub = p.add_subparsers(dest="char_command", metavar="ACTION", parser_class=_Parser)
    char_sub.required = True
    char_rnn.add_train_parser(char_sub)
    char_rnn.add_sample_parser(char_sub)

    digits.add_parser(sub)

    from fastrnn import bench

    bench.add_parser(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fastrnn`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit
    status."""
    debug = os.environ.get("FASTRNN_DEBUG", "").strip() not in ("", "0")
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(None if argv is None else list(argv))
        except SystemExit as exc:  # --help and --version
            return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
        if args.command in ("char-rnn", "digits"):
            with training_threads(args.threads) as note:
                args.threads_note = note
                return int(args.func(args) or 0)
        return int(args.func(args) or 0)
    except _UsageError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as exc:
        print(f"fastrnn: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("fastrnn: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `fastrnn ... | head`
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the exit-time flush
        except OSError:
            pass
        return EXIT_FAILURE
    except Exception as exc:
        if debug:
            raise
        kind = type(exc).__name__
        print(
            f"fastrnn: error: {kind}: {_one_line(exc)} (FASTRNN_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
