"""``python -m fastrnn``: the ``fastrnn`` command."""

from __future__ import annotations

import sys

from fastrnn.cli import main

if __name__ == "__main__":
    sys.exit(main())
