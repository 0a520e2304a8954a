"""A/B of the CPU kernels' module switches, call by call in one process.

Each comparison runs the same call with a switch on and off, alternating, and reports both
medians and the median of the per-pair ratios (off / on: above 1, the switch's path is faster).
The machine's drift between runs then hits both sides alike.

* ``seq``: the recurrent backward's whole-sequence GEMMs on fastrnn's kernels or on BLAS
  (fastrnn._cpu.recurrent.SEQUENCE_GEMMS_OWN), LSTM backward;
* ``fuse``: the input projection step by step inside the time loop or first, as one GEMM
  (FUSE_INPUT_MIN_ROWS 32 / 0 with the byte limit lifted), LSTM forward;
* ``depthwise``: depthwise conv2d plane by plane or on the direct kernels
  (fastrnn._cpu.conv2d.DEPTHWISE_PLANES), forward and backward.

    python benchmarks/bench_switches.py --threads 2 --pairs 15 [--only seq,fuse,depthwise]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

import fastrnn as fr


def ab(call: Callable[[], object], switch: Callable[[bool], None], pairs: int) -> tuple:
    """Median ms with the switch on, off, and the median of off/on over alternating pairs."""
    on, off = [], []
    for i in range(pairs + 1):
        for state in ((True, False) if i % 2 == 0 else (False, True)):
            switch(state)
            t0 = time.perf_counter()
            call()
            (on if state else off).append(time.perf_counter() - t0)
    switch(True)
    on, off = np.array(on[1:]), np.array(off[1:])  # the first pair warms up
    return np.median(on) * 1e3, np.median(off) * 1e3, float(np.median(off / on))


def _lstm(T: int, N: int, D: int, H: int) -> dict:
    rng = np.random.default_rng(0)
    s = 1 / np.sqrt(H)
    return dict(
        x=rng.standard_normal((T, N, D)).astype(np.float32),
        h0=np.zeros((N, H), np.float32),
        w_ih=(rng.standard_normal((4 * H, D)) * s).astype(np.float32),
        w_hh=(rng.standard_normal((4 * H, H)) * s).astype(np.float32),
        b=np.zeros(4 * H, np.float32),
        dy=rng.standard_normal((T, N, H)).astype(np.float32),
    )


def seq_rows(pairs: int) -> list:
    from fastrnn._cpu import recurrent as engine

    rows = []
    for shape in [(35, 20, 200, 200), (64, 32, 192, 192), (200, 32, 64, 64), (100, 16, 256, 256)]:
        a = _lstm(*shape)
        _, _, _, ctx = fr.lstm_forward(a["x"], a["h0"], a["h0"], a["w_ih"], a["w_hh"], a["b"])

        def switch(on: bool) -> None:
            engine.SEQUENCE_GEMMS_OWN = on

        def call(ctx=ctx, dy=a["dy"]) -> None:
            fr.lstm_backward(ctx, dy)

        rows.append(("seq", "lstm backward", shape, *ab(call, switch, pairs)))
    return rows


def fuse_rows(pairs: int) -> list:
    from fastrnn._cpu import recurrent as engine

    rows = []
    limit = engine.FUSE_INPUT_MAX_BYTES
    for shape in [(64, 32, 192, 192), (64, 32, 224, 224), (100, 32, 256, 256), (50, 64, 512, 512)]:
        a = _lstm(*shape)

        def switch(on: bool) -> None:
            engine.FUSE_INPUT_MIN_ROWS = 32 if on else 0
            engine.FUSE_INPUT_MAX_BYTES = 1 << 40

        def call(a=a) -> None:
            fr.lstm_forward(a["x"], a["h0"], a["h0"], a["w_ih"], a["w_hh"], a["b"])

        rows.append(("fuse", "lstm forward", shape, *ab(call, switch, pairs)))
    engine.FUSE_INPUT_MIN_ROWS, engine.FUSE_INPUT_MAX_BYTES = 32, limit
    return rows


def depthwise_rows(pairs: int) -> list:
    from fastrnn._cpu import conv2d as kernel

    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 64, 56, 56)).astype(np.float32)
    w = rng.standard_normal((64, 1, 3, 3)).astype(np.float32)
    b = np.zeros(64, np.float32)
    kw = dict(stride=1, padding=1, groups=64)
    y, ctx = fr.conv2d_forward(x, w, b, **kw)
    dy = rng.standard_normal(y.shape).astype(np.float32)

    def switch(on: bool) -> None:
        kernel.DEPTHWISE_PLANES = on

    shape = (32, 64, 56, 56)
    return [
        ("depthwise", "conv2d forward", shape,
         *ab(lambda: fr.conv2d_forward(x, w, b, training=False, **kw), switch, pairs)),
        ("depthwise", "conv2d backward", shape,
         *ab(lambda: fr.conv2d_backward(ctx, dy), switch, pairs)),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=fr.get_num_threads())
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--only", default="seq,fuse,depthwise")
    args = parser.parse_args()
    fr.set_num_threads(args.threads)
    wanted = {s.strip() for s in args.only.split(",")}
    rows = []
    for name, fn in (("seq", seq_rows), ("fuse", fuse_rows), ("depthwise", depthwise_rows)):
        if name in wanted:
            rows += fn(args.pairs)
    print(f"threads {args.threads}, float32, {args.pairs} alternating pairs, medians")
    print(f"{'switch':10} {'call':16} {'shape':20} {'on ms':>9} {'off ms':>9} {'off/on':>7}")
    for switch, call, shape, on, off, ratio in rows:
        print(f"{switch:10} {call:16} {str(shape):20} {on:9.2f} {off:9.2f} {ratio:7.3f}")


if __name__ == "__main__":
    main()
