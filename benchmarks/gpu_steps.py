"""Per-time-step cost of the CUDA recurrent loops on a GPU: host and device, each path.

    python benchmarks/gpu_steps.py [--T 500]

For LSTM forward + backward at a small, a mid and a large batch, with CUDA graphs off (eager: a
cuBLAS GEMM and a launch per step, enqueued from the host) and on, prints the host time to
enqueue one call (perf_counter around the call, no synchronisation) and the GPU time of the call
(CUDA events), both divided by the 2T steps, plus the graph counters. With the host time above
the GPU time the loop is host-bound. Needs CuPy and a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = [(1, 128), (8, 256), (64, 512)]  # (N, H), D = H


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=500)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("CUPY_TF32", "0")
    try:
        import fastrnn  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import cupy

    import fastrnn as fr
    from fastrnn._cuda._runtime import runtime

    rt = runtime()
    T = args.T
    print(f"{'N':>3} {'H':>4} {'mode':<16} {'host us/step':>12} {'GPU us/step':>11}  graphs")
    for N, H in SHAPES:
        rng = np.random.default_rng(0)
        d = {
            "x": rng.standard_normal((T, N, H)),
            "h0": rng.standard_normal((N, H)),
            "c0": rng.standard_normal((N, H)),
            "w_ih": rng.standard_normal((4 * H, H)) / np.sqrt(H),
            "w_hh": rng.standard_normal((4 * H, H)) / np.sqrt(H),
            "b": rng.standard_normal(4 * H),
            "dy": rng.standard_normal((T, N, H)),
        }
        g = {k: cupy.asarray(v.astype(np.float32)) for k, v in d.items()}

        def call(g: dict = g) -> None:
            *_, ctx = fr.lstm_forward(g["x"], g["h0"], g["c0"], g["w_ih"], g["w_hh"], g["b"])
            fr.lstm_backward(ctx, g["dy"])

        for graphs in (False, True):
            saved = rt.graphs
            rt.graphs = graphs
            before = {k: v for k, v in rt.graph_stats.items() if isinstance(v, int)}
            try:
                for _ in range(3):
                    call()
                cupy.cuda.get_current_stream().synchronize()
                host, dev = [], []
                for _ in range(args.reps):
                    start, end = cupy.cuda.Event(), cupy.cuda.Event()
                    start.record()
                    t0 = time.perf_counter()
                    call()
                    host.append(time.perf_counter() - t0)
                    end.record()
                    end.synchronize()
                    dev.append(cupy.cuda.get_elapsed_time(start, end) * 1e-3)
            finally:
                rt.graphs = saved
            stats = {k: rt.graph_stats[k] - v for k, v in before.items()}
            mode = "cublas + graphs" if graphs else "cublas eager"
            counts = f"{stats['captured']}/{stats['replayed']}/{stats['capture_failed']}"
            print(
                f"{N:>3} {H:>4} {mode:<16} {statistics.median(host) / (2 * T) * 1e6:>12.2f} "
                f"{statistics.median(dev) / (2 * T) * 1e6:>11.2f}  {counts}"
            )
    err = rt.graph_stats.get("last_capture_error")
    print(f"last capture error: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
