"""Timing helpers for the recurrent kernels: the benchmark shapes, FLOP counts, a plain timing
function for fastrnn / the NumPy reference / PyTorch, this machine's sgemm rate, and the
per-step GEMM threading comparison behind the kernels' design.

Used by benchmarks/bench_recurrent.py (pytest-benchmark) and runnable on its own::

    python -m fastrnn._bench --threads 2 --rounds 5      # the side-by-side table

Timings on a shared machine are noisy: the table interleaves the implementations round by
round and reports medians.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

import fastrnn as fr

GATES = {"lstm": 4, "gru": 3, "rnn": 1}

# (T, N, D, H): the single-step inference call, then forward+backward training shapes (PyTorch's
# word-language-model example, our char-rnn layer, and small to large batches and widths).
INFERENCE_SHAPES = [(1, 1, 128, 128)]
TRAINING_SHAPES = [
    (35, 20, 200, 200),
    (64, 32, 192, 192),
    (100, 1, 128, 128),
    (200, 32, 64, 64),
    (100, 16, 256, 256),
    (100, 64, 512, 512),
]
# forward+backward with variable lengths (fastrnn's lengths= vs torch's PackedSequence path)
LENGTHS_SHAPES = [(100, 16, 256, 256)]
IMPLS = ("fastrnn", "numpy", "torch")


def bench_lengths(T: int, N: int, seed: int = 1) -> np.ndarray:
    """Lengths of a variable-length batch, uniform in [T/4, T] (mean about 0.63 T), unsorted."""
    return np.random.default_rng(seed).integers(max(1, T // 4), T + 1, size=N)


def recurrent_flops(op: str, T: int, N: int, D: int, H: int, passes: str) -> float:
    """GEMM FLOPs: forward 2 T N (D + H) G H; forward+backward three times that (dx + dW_ih and
    dh + dW_hh are two more GEMMs of each forward size)."""
    fwd = 2.0 * T * N * (D + H) * GATES[op] * H
    return fwd if passes == "fwd" else 3.0 * fwd


def make_inputs(
    op: str, T: int, N: int, D: int, H: int, dtype: Any = np.float32, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs scaled like PyTorch's default initialisation, plus dy."""
    rng = np.random.default_rng(seed)
    G, k = GATES[op], 1.0 / math.sqrt(H)

    def rand(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(dtype)

    a = {
        "x": rand(T, N, D),
        "h0": rand(N, H, scale=0.1),
        "w_ih": rand(G * H, D, scale=k),
        "w_hh": rand(G * H, H, scale=k),
        "dy": rand(T, N, H),
    }
    if op == "lstm":
        a["c0"] = rand(N, H, scale=0.1)
    if op == "gru":
        a["b_ih"], a["b_hh"] = rand(G * H, scale=k), rand(G * H, scale=k)
    else:
        a["b"] = rand(G * H, scale=k)
    return a


def _fastrnn_args(op: str, a: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    names = {
        "lstm": ("x", "h0", "c0", "w_ih", "w_hh", "b"),
        "gru": ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"),
        "rnn": ("x", "h0", "w_ih", "w_hh", "b"),
    }[op]
    return tuple(a[k] for k in names)


def fastrnn_runner(
    op: str, a: dict[str, np.ndarray], passes: str, lengths: np.ndarray | None = None
) -> Callable[[], Any]:
    """One fastrnn call: ``passes`` "fwd" (training=False), "fwd-train" (the forward of a
    training step, training=True, no backward) or "fwd+bwd"."""
    fwd = getattr(fr, f"{op}_forward")
    bwd = getattr(fr, f"{op}_backward")
    args = _fastrnn_args(op, a)
    dy = a["dy"]
    if passes == "fwd":
        return lambda: fwd(*args, lengths=lengths, training=False)
    if passes == "fwd-train":
        return lambda: fwd(*args, lengths=lengths)

    def run() -> Any:
        out = fwd(*args, lengths=lengths)
        return bwd(out[-1], dy)

    return run


def numpy_runner(
    op: str, a: dict[str, np.ndarray], passes: str, lengths: np.ndarray | None = None
) -> Callable[[], Any]:
    """The NumPy reference through the public API (validation included)."""
    inner = fastrnn_runner(op, a, passes, lengths)

    def run() -> Any:
        with fr.use_backend("numpy"):
            return inner()

    return run


def torch_runner(
    op: str, a: dict[str, np.ndarray], passes: str, lengths: np.ndarray | None = None
) -> Callable[[], Any]:
    """torch.nn.LSTM / GRU / RNN (tanh) with the same weights, time-major, one layer; with
    ``lengths`` through torch's PackedSequence path (pack_padded_sequence, unsorted)."""
    import torch

    T, N, D = a["x"].shape
    H = a["w_hh"].shape[1]
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[op]
    m = cls(D, H)
    with torch.no_grad():
        m.weight_ih_l0.copy_(torch.from_numpy(a["w_ih"]))
        m.weight_hh_l0.copy_(torch.from_numpy(a["w_hh"]))
        if op == "gru":
            m.bias_ih_l0.copy_(torch.from_numpy(a["b_ih"]))
            m.bias_hh_l0.copy_(torch.from_numpy(a["b_hh"]))
        else:
            m.bias_ih_l0.copy_(torch.from_numpy(a["b"]))
            m.bias_hh_l0.zero_()
    m = m.to(torch.from_numpy(a["x"]).dtype)
    train = passes != "fwd"
    x = torch.from_numpy(a["x"]).requires_grad_(train)
    h0 = torch.from_numpy(a["h0"])[None].clone().requires_grad_(train)
    state: Any = h0
    if op == "lstm":
        state = (h0, torch.from_numpy(a["c0"])[None].clone().requires_grad_(train))
    dy = torch.from_numpy(a["dy"])
    seq_lengths = None if lengths is None else torch.from_numpy(np.asarray(lengths))

    def call() -> Any:
        if seq_lengths is None:
            return m(x, state)
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, seq_lengths, enforce_sorted=False)
        y, st = m(packed, state)
        return torch.nn.utils.rnn.pad_packed_sequence(y, total_length=T)[0], st

    if not train:

        def infer() -> Any:
            with torch.no_grad():
                return call()

        return infer

    if passes == "fwd-train":  # the forward of a training step: autograd records, no backward
        return call

    def run() -> Any:
        y, _ = call()
        y.backward(dy)
        return y

    return run


RUNNERS = {"fastrnn": fastrnn_runner, "numpy": numpy_runner, "torch": torch_runner}


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """fastrnn, PyTorch (when installed) and every BLAS on ``n`` threads inside the block.

    Both fastrnn and PyTorch are set explicitly: they share libgomp, and torch.set_num_threads
    changes the OpenMP default that fastrnn would otherwise read (FACTS.md)."""
    from threadpoolctl import ThreadpoolController

    before = fr.get_num_threads()
    torch_before = None
    if torch_available():
        import torch

        torch_before = torch.get_num_threads()
        torch.set_num_threads(n)
    fr.set_num_threads(n)
    try:
        with ThreadpoolController().limit(limits=n, user_api="blas"):
            yield
    finally:
        fr.set_num_threads(before)
        if torch_before is not None:
            import torch

            torch.set_num_threads(torch_before)


def minor_faults() -> int:
    """This process's minor page faults so far (0 where getrusage is missing): the fresh pages
    a call's allocations touched, reported beside the benchmarks' times."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# Seconds to wait after timing the NumPy reference on more than one thread before timing
# anything else: OpenBLAS's threads keep spinning (busy, not yielding) for about 0.1 s after a
# call, and the kernels' OpenMP threads timed inside that window share their cores. Measured
# (LSTM T50 N16 D128 H128 forward, 2 threads): 0.9-1.1 ms a call alone, 5-15 ms a call for
# about 0.1 s after NumPy matmuls on 2 threads, 1 ms again with OPENBLAS_NUM_THREADS=1.
BLAS_SPIN_SECONDS = 0.2


def let_blas_settle(n_threads: int) -> None:
    """After NumPy's BLAS ran on ``n_threads``: wait until its threads have stopped spinning."""
    if n_threads > 1:
        time.sleep(BLAS_SPIN_SECONDS)


def time_call(
    fn: Callable[[], Any], repeat: int = 5, warmup: int = 1, min_seconds: float = 0.0
) -> list[float]:
    """Seconds per call, ``repeat`` samples (each sample averages enough calls to last at least
    ``min_seconds``; 0 = one call per sample), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    number = 1
    if min_seconds > 0:
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-7)
        number = max(1, int(min_seconds / once))
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        out.append((time.perf_counter() - start) / number)
    return out


def time_recurrent(
    op: str,
    T: int,
    N: int,
    D: int,
    H: int,
    *,
    impl: str = "fastrnn",
    passes: str = "fwd+bwd",
    dtype: Any = np.float32,
    n_threads: int | None = None,
    repeat: int = 5,
    warmup: int = 1,
) -> dict[str, Any]:
    """Median time of one recurrent call. ``impl``: "fastrnn" (CPU kernels), "numpy" (the
    reference) or "torch"; ``passes``: "fwd" (inference, training=False) or "fwd+bwd".

    Returns {"ms": median milliseconds, "gflops": GEMM GFLOP/s at the median, "times_ms": all
    samples, "threads": n}."""
    n = fr.get_num_threads() if n_threads is None else n_threads
    fn = RUNNERS[impl](op, make_inputs(op, T, N, D, H, dtype), passes)
    with threads(n):
        samples = time_call(fn, repeat, warmup, min_seconds=0.02 if T * N < 64 else 0.0)
    ms = statistics.median(samples) * 1e3
    return {
        "ms": ms,
        "gflops": recurrent_flops(op, T, N, D, H, passes) / ms / 1e6,
        "times_ms": [s * 1e3 for s in samples],
        "threads": n,
    }


def sgemm_gflops(n_threads: int, size: int = 2048, repeat: int = 5) -> float:
    """This machine's float32 GEMM rate (GFLOP/s, median) on ``n_threads`` BLAS threads:
    (size x size) @ (size x size) through NumPy's BLAS."""
    from threadpoolctl import ThreadpoolController

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(np.float32)
    b = rng.standard_normal((size, size)).astype(np.float32)
    c = np.empty((size, size), np.float32)
    with ThreadpoolController().limit(limits=n_threads, user_api="blas"):
        samples = time_call(lambda: np.matmul(a, b, out=c), repeat, warmup=1)
    return 2.0 * size**3 / statistics.median(samples) / 1e9


def compare_strategies(
    shapes: list[tuple[int, int, int]] | None = None,
    n_threads: int = 2,
    rounds: int = 5,
    steps: int = 100,
) -> list[dict[str, Any]]:
    """Per-step recurrent GEMM (N, H, G) run serially, with BLAS threads, or split over OpenMP
    threads by gate columns (the kernels' choice): microseconds per step, medians of
    ``rounds`` interleaved rounds."""
    from fastrnn._cpu._recurrent_bench import step_gemm_seconds

    shapes = shapes or [
        (1, 128, 4),
        (32, 64, 4),
        (16, 256, 4),
        (64, 512, 4),
        (1, 32, 4),
        (4, 64, 4),
        (8, 64, 1),
    ]
    rows = []
    for N, H, G in shapes:
        samples: dict[str, list[float]] = {"serial": [], "blas": [], "omp": []}
        for _ in range(rounds):
            for strategy in samples:
                samples[strategy].append(step_gemm_seconds(N, H, G, strategy, n_threads, steps))
        rows.append(
            {
                "N": N,
                "H": H,
                "G": G,
                "threads": n_threads,
                **{k: statistics.median(v) * 1e6 for k, v in samples.items()},
                # the best round: the least disturbed by other processes on a shared machine
                **{f"{k}_min": min(v) * 1e6 for k, v in samples.items()},
            }
        )
    return rows


def table(
    ops: tuple[str, ...] = ("lstm", "gru", "rnn"),
    n_threads: int = 2,
    rounds: int = 5,
    impls: tuple[str, ...] = ("fastrnn", "torch", "numpy"),
    shapes: list[tuple[int, int, int, int]] | None = None,
) -> list[dict[str, Any]]:
    """The benchmark table: every op x shape x impl, the impls interleaved within each round."""
    impls = tuple(i for i in impls if i != "torch" or torch_available())
    cases = []
    for op in ops:
        for shape in shapes or INFERENCE_SHAPES + TRAINING_SHAPES:
            cases.append((op, shape, "fwd" if shape in INFERENCE_SHAPES else "fwd+bwd", False))
        if shapes is None:
            cases += [(op, shape, "fwd+bwd", True) for shape in LENGTHS_SHAPES]
    rows = []
    with threads(n_threads):
        for op, (T, N, D, H), passes, with_lengths in cases:
            a = make_inputs(op, T, N, D, H)
            lengths = bench_lengths(T, N) if with_lengths else None
            fns = {i: RUNNERS[i](op, a, passes, lengths) for i in impls}
            order = list(impls)
            if with_lengths and "fastrnn" in impls:
                # the same call without lengths in the same rounds: the saving from one run
                fns["fastrnn_dense"] = RUNNERS["fastrnn"](op, a, passes, None)
                order.append("fastrnn_dense")
            big = T * N * H * H > 5e7
            # the reference is slow on big shapes: fewer samples
            samples: dict[str, list[float]] = {i: [] for i in order}
            for r in range(rounds):
                for i in order:
                    if i == "numpy" and big and r >= 1:
                        continue
                    samples[i] += time_call(
                        fns[i],
                        1,
                        warmup=1 if r == 0 else 0,
                        min_seconds=0.05 if T * N < 64 else 0.0,
                    )
                    if i == "numpy":
                        let_blas_settle(n_threads)
            flops = recurrent_flops(op, T, N, D, H, passes)
            row: dict[str, Any] = {"op": op, "shape": (T, N, D, H), "passes": passes}
            if with_lengths:  # the work done: sum(lengths) of the T N sequence steps
                flops *= float(np.mean(lengths)) / T
                row["passes"] = f"{passes} lengths {np.mean(lengths) / T:.2f}T"
            for i in impls:
                ms = statistics.median(samples[i]) * 1e3
                row[f"{i}_ms"] = ms
                row[f"{i}_best_ms"] = min(samples[i]) * 1e3
                row[f"{i}_gflops"] = flops / ms / 1e6
            if "torch" in impls:
                row["torch/fastrnn"] = row["torch_ms"] / row["fastrnn_ms"]
                row["torch/fastrnn best"] = row["torch_best_ms"] / row["fastrnn_best_ms"]
            if "fastrnn_dense" in samples:
                # the saving of lengths=: the median of the per-round ratios (time without
                # lengths over time with), robust to the machine's speed drifting between rounds
                row["fastrnn_dense_ms"] = statistics.median(samples["fastrnn_dense"]) * 1e3
                row["lengths saving"] = statistics.median(
                    d / w for d, w in zip(samples["fastrnn_dense"], samples["fastrnn"], strict=True)
                )
            rows.append(row)
    return rows


def compare_splits(
    shapes: list[tuple[int, int, int, int]] | None = None,
    op: str = "lstm",
    n_threads: int = 2,
    rounds: int = 5,
) -> list[dict[str, Any]]:
    """The time loop split by hidden units vs by sequences, forced either way
    (recurrent.SPLIT_ROWS_MIN 0, or 1 with no limit on the weights), torch alongside: ms,
    medians over ``rounds`` interleaved rounds of 5-call minima, forward (training=True,
    nothing kept) and forward+backward."""
    from fastrnn._cpu import recurrent as engine

    shapes = shapes or [s for s in TRAINING_SHAPES if s[1] >= 16]
    default = engine.SPLIT_ROWS_MIN
    default_bytes = engine.SPLIT_ROWS_WEIGHT_BYTES
    out = []
    with threads(n_threads):
        for T, N, D, H in shapes:
            a = make_inputs(op, T, N, D, H)
            fns = {}
            for impl in ("fastrnn", "torch") if torch_available() else ("fastrnn",):
                for passes in ("fwd-train", "fwd+bwd"):
                    fns[(impl, passes)] = RUNNERS[impl](op, a, passes)
            samples: dict[tuple[str, str], list[float]] = {}
            try:
                for _ in range(rounds):
                    for mode, split in (("units", 0), ("rows", 1), ("torch", None)):
                        impl = "torch" if split is None else "fastrnn"
                        if (impl, "fwd+bwd") not in fns:
                            continue
                        if split is not None:
                            engine.SPLIT_ROWS_MIN = split
                            engine.SPLIT_ROWS_WEIGHT_BYTES = 1 << 62
                        for passes in ("fwd-train", "fwd+bwd"):
                            t = min(time_call(fns[(impl, passes)], 5, warmup=1))
                            samples.setdefault((mode, passes), []).append(t * 1e3)
            finally:
                engine.SPLIT_ROWS_MIN = default
                engine.SPLIT_ROWS_WEIGHT_BYTES = default_bytes
            row: dict[str, Any] = {"op": op, "shape": (T, N, D, H), "threads": n_threads}
            for key, v in samples.items():
                row[f"{key[0]} {key[1]}"] = statistics.median(v)
            out.append(row)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastrnn._bench", description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--ops", default="lstm,gru,rnn")
    p.add_argument("--strategies", action="store_true", help="also the per-step GEMM threading")
    p.add_argument(
        "--no-numpy",
        action="store_true",
        help="leave out the NumPy reference (its multi-threaded BLAS keeps spinning after each "
        "call and disturbs the next samples of 2-thread runs)",
    )
    p.add_argument(
        "--splits",
        action="store_true",
        help="only the time loop split by hidden units vs by sequences (LSTM; the default shapes "
        "with N >= 16, or --shapes)",
    )
    p.add_argument(
        "--shapes",
        default="",
        help="with --splits: T,N,D,H;T,N,D,H;... instead of the default shapes",
    )
    args = p.parse_args(argv)
    if args.splits:
        print(
            f"threads {args.threads}; LSTM float32, ms: medians of {args.rounds} interleaved "
            "rounds of 5-call minima; forward with training=True, and forward+backward"
        )
        print(f"{'T,N,D,H':>16} {'units fwd':>10} {'rows fwd':>9} {'torch fwd':>10} "
              f"{'units f+b':>10} {'rows f+b':>9} {'torch f+b':>10}")
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s]
        for r in compare_splits(shapes or None, n_threads=args.threads, rounds=args.rounds):
            cells = [r.get(k, float("nan")) for k in (
                "units fwd-train", "rows fwd-train", "torch fwd-train",
                "units fwd+bwd", "rows fwd+bwd", "torch fwd+bwd")]  # fmt: skip
            widths = (10, 9, 10, 10, 9, 10)
            print(f"{','.join(map(str, r['shape'])):>16} " + " ".join(
                f"{c:{w}.2f}" for c, w in zip(cells, widths, strict=True)))  # fmt: skip
        return
    sgemm = sgemm_gflops(args.threads)
    print(
        f"threads {args.threads}; sgemm {sgemm:.0f} GFLOP/s (2048^3, NumPy's BLAS); float32; "
        f"medians (and best) of {args.rounds} interleaved rounds",
        flush=True,
    )
    head = (
        f"{'op':5} {'T,N,D,H':>16} {'pass':8} {'fastrnn ms':>11} {'best':>8} {'GFLOP/s':>8} "
        f"{'%sgemm':>7} {'torch ms':>9} {'best':>8} {'torch/fr':>8} {'(best)':>7} {'numpy ms':>9}"
    )
    print(head)
    nan = float("nan")
    impls = ("fastrnn", "torch") if args.no_numpy else ("fastrnn", "torch", "numpy")
    for row in table(tuple(args.ops.split(",")), args.threads, args.rounds, impls):
        print(
            f"{row['op']:5} {','.join(map(str, row['shape'])):>16} {row['passes']:8} "
            f"{row['fastrnn_ms']:11.3f} {row['fastrnn_best_ms']:8.3f} "
            f"{row['fastrnn_gflops']:8.1f} {100 * row['fastrnn_gflops'] / sgemm:6.0f}% "
            f"{row.get('torch_ms', nan):9.3f} {row.get('torch_best_ms', nan):8.3f} "
            f"{row.get('torch/fastrnn', nan):8.2f} {row.get('torch/fastrnn best', nan):7.2f} "
            f"{row.get('numpy_ms', nan):9.2f}",
            flush=True,
        )
        if "lengths saving" in row:
            print(
                f"{'':5} {'':>16} the same call without lengths {row['fastrnn_dense_ms']:.3f} ms "
                f"in the same rounds: lengths= {row['lengths saving']:.2f}x faster",
                flush=True,
            )
    if args.strategies:
        print("\nper-step recurrent GEMM, us per step (serial | BLAS threads | OpenMP columns)")
        for r in compare_strategies(n_threads=args.threads, rounds=args.rounds):
            print(
                f"N={r['N']:3} H={r['H']:4} G={r['G']}  median {r['serial']:9.1f} "
                f"{r['blas']:9.1f} {r['omp']:9.1f}   best {r['serial_min']:9.1f} "
                f"{r['blas_min']:9.1f} {r['omp_min']:9.1f}"
            )


if __name__ == "__main__":
    main()
