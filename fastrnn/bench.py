"""``fastrnn bench``: every kernel against the NumPy reference and PyTorch, in one table.

For each op (LSTM, GRU, RNN, conv2d, max and average pooling) at a grid of shapes, forward
(``training=False``) and forward+backward are timed for

* ``fastrnn``: the CPU kernels (NumPy arrays),
* ``numpy``: the NumPy reference (``fastrnn.use_backend("numpy")``),
* ``torch``: PyTorch's CPU modules and functions with the same weights, when installed,
* ``fastrnn-cuda`` / ``torch-cuda``: the same on the GPU when CuPy (PyTorch) has one,

all with the same number of threads (``fastrnn.set_num_threads``, ``torch.set_num_threads`` and
the BLAS thread pools through threadpoolctl). Each row gives the median time in ms, GFLOP/s,
the percentage of this machine's sgemm rate measured in the same run, and PyTorch's time
divided by fastrnn's (above 1: fastrnn is faster). Outputs are checked against the reference
before anything is timed.

FLOP counts are the GEMM work: an LSTM forward is 2 T N (D + H) 4H, a convolution forward
2 N F OH OW (C/groups) KH KW; forward+backward is three times the forward (two more GEMMs
of the same size: input and weight gradients). Pooling has no GEMM: its "GFLOP/s" counts one
operation per window element (forward) and per output element (backward), and its % of sgemm
is not shown because pooling is bound by memory bandwidth, not arithmetic.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

import fastrnn as fr
from fastrnn.examples._common import (
    CommandError,
    check_output_file,
    matplotlib_pyplot,
    positive_float,
    positive_int,
    save_figure,
    write_json_atomic,
)

OPS = ("lstm", "gru", "rnn", "conv2d", "max_pool2d", "avg_pool2d")
_GATES = {"lstm": 4, "gru": 3, "rnn": 1}
PASSES = ("fwd", "fwd+bwd")


# ------------------------------------------------------------------------------------------------
# the grid
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One op at one shape."""

    op: str
    shape: dict[str, int]

    @property
    def label(self) -> str:
        s = self.shape
        if self.op in _GATES:
            return f"T{s['T']} N{s['N']} D{s['D']} H{s['H']}"
        if self.op == "conv2d":
            g = f" g{s['G']}" if s["G"] > 1 else ""
            return f"{s['N']}x{s['C']}x{s['H']}x{s['W']} F{s['F']} k{s['K']} s{s['S']} p{s['P']}{g}"
        return f"{s['N']}x{s['C']}x{s['H']}x{s['W']} k{s['K']} s{s['S']} p{s['P']}"

    def out_hw(self) -> tuple[int, int]:
        s = self.shape
        oh = (s["H"] + 2 * s["P"] - s["K"]) // s["S"] + 1
        ow = (s["W"] + 2 * s["P"] - s["K"]) // s["S"] + 1
        return oh, ow

    def flops(self, passes: str) -> float:
        s = self.shape
        if self.op in _GATES:
            fwd = 2.0 * s["T"] * s["N"] * (s["D"] + s["H"]) * _GATES[self.op] * s["H"]
            return fwd if passes == "fwd" else 3.0 * fwd
        oh, ow = self.out_hw()
        if self.op == "conv2d":
            fwd = 2.0 * s["N"] * s["F"] * oh * ow * s["C"] // s["G"] * s["K"] * s["K"]
            return fwd if passes == "fwd" else 3.0 * fwd
        fwd = float(s["N"] * s["C"] * oh * ow * s["K"] * s["K"])
        return fwd if passes == "fwd" else fwd + s["N"] * s["C"] * oh * ow

    @property
    def gemm_bound(self) -> bool:
        return self.op not in ("max_pool2d", "avg_pool2d")


def _rec(op: str, T: int, N: int, D: int, H: int) -> Case:
    return Case(op, {"T": T, "N": N, "D": D, "H": H})


def _conv(N: int, C: int, H: int, F: int, K: int, S: int = 1, P: int = 0, G: int = 1) -> Case:
    return Case(
        "conv2d", {"N": N, "C": C, "H": H, "W": H, "F": F, "K": K, "S": S, "P": P, "G": G}
    )


def _pool(op: str, N: int, C: int, H: int, K: int, S: int, P: int = 0) -> Case:
    return Case(op, {"N": N, "C": C, "H": H, "W": H, "K": K, "S": S, "P": P})


def grid(quick: bool) -> list[Case]:
    """The shapes: the quick grid runs in well under a minute on 2 cores."""
    if quick:
        rec = [(1, 1, 128, 128), (50, 16, 128, 128)]
        return [
            *(_rec(op, *s) for op in ("lstm", "gru", "rnn") for s in rec),
            _conv(16, 3, 32, 16, 3, 1, 1),
            _conv(16, 32, 16, 32, 3, 1, 1),
            _pool("max_pool2d", 16, 32, 32, 2, 2),
            _pool("avg_pool2d", 16, 32, 32, 3, 2, 1),
        ]
    rec = [
        (1, 1, 128, 128),
        (100, 1, 128, 128),
        (200, 32, 64, 64),
        (100, 16, 256, 256),
        (100, 64, 512, 512),
    ]
    return [
        *(_rec("lstm", *s) for s in rec),
        _rec("lstm", 35, 20, 200, 200),  # PyTorch's word-language-model example
        _rec("lstm", 64, 32, 192, 192),  # fastrnn's char-rnn layer
        *(_rec(op, *s) for op in ("gru", "rnn") for s in rec[1:]),
        # the layers of issue 17's table (benchmarks/bench_conv.py), then a wider 1x1
        _conv(64, 3, 32, 32, 3, 1, 1),
        _conv(64, 1, 28, 16, 5, 1, 2),
        _conv(32, 256, 14, 64, 1, 1, 0),
        _conv(64, 32, 32, 64, 3, 1, 1),
        _conv(32, 64, 56, 64, 3, 1, 1),
        _conv(32, 64, 56, 128, 3, 2, 1),
        _conv(8, 128, 28, 128, 3, 1, 1),
        _conv(16, 256, 14, 256, 3, 1, 1),
        _conv(32, 64, 56, 64, 3, 1, 1, G=64),
        _conv(32, 64, 28, 128, 1, 1, 0),
        _pool("max_pool2d", 64, 32, 32, 2, 2),
        _pool("max_pool2d", 32, 64, 56, 3, 2, 1),
        _pool("avg_pool2d", 64, 32, 32, 2, 2),
        _pool("avg_pool2d", 32, 64, 56, 3, 2, 1),
    ]


# ------------------------------------------------------------------------------------------------
# inputs and runners
# ------------------------------------------------------------------------------------------------


def make_inputs(case: Case, dtype: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """Random NumPy inputs (scaled like a default initialisation) for one case."""
    rng = np.random.default_rng(seed)

    def rand(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(dtype)

    s = case.shape
    if case.op in _GATES:
        G, T, N, D, H = _GATES[case.op], s["T"], s["N"], s["D"], s["H"]
        k = 1.0 / math.sqrt(H)
        arrays = {
            "x": rand(T, N, D),
            "h0": rand(N, H, scale=0.1),
            "w_ih": rand(G * H, D, scale=k),
            "w_hh": rand(G * H, H, scale=k),
            "dy": rand(T, N, H),
        }
        if case.op == "lstm":
            arrays["c0"] = rand(N, H, scale=0.1)
            arrays["b"] = rand(G * H, scale=k)
        elif case.op == "gru":
            arrays["b_ih"] = rand(G * H, scale=k)
            arrays["b_hh"] = rand(G * H, scale=k)
        else:
            arrays["b"] = rand(G * H, scale=k)
        return arrays
    oh, ow = case.out_hw()
    if case.op == "conv2d":
        cg = s["C"] // s["G"]
        fan_in = cg * s["K"] * s["K"]
        return {
            "x": rand(s["N"], s["C"], s["H"], s["W"]),
            "w": rand(s["F"], cg, s["K"], s["K"], scale=1.0 / math.sqrt(fan_in)),
            "b": rand(s["F"], scale=0.1),
            "dy": rand(s["N"], s["F"], oh, ow),
        }
    return {"x": rand(s["N"], s["C"], s["H"], s["W"]), "dy": rand(s["N"], s["C"], oh, ow)}


def _fastrnn_runner(case: Case, a: dict[str, Any], passes: str) -> Callable[[], Any]:
    """A closure running one fastrnn call (whatever backend the arrays and context pick);
    it returns the forward output so the result can be checked."""
    s = case.shape
    train = passes == "fwd+bwd"
    if case.op == "lstm":

        def fwd() -> Any:
            return fr.lstm_forward(
                a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b"], training=train
            )

        def run() -> Any:
            y, _, _, ctx = fwd()
            if train:
                fr.lstm_backward(ctx, a["dy"])
            return y
    elif case.op == "gru":

        def fwd() -> Any:
            return fr.gru_forward(
                a["x"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], training=train
            )

        def run() -> Any:
            y, _, ctx = fwd()
            if train:
                fr.gru_backward(ctx, a["dy"])
            return y
    elif case.op == "rnn":

        def fwd() -> Any:
            return fr.rnn_forward(a["x"], a["h0"], a["w_ih"], a["w_hh"], a["b"], training=train)

        def run() -> Any:
            y, _, ctx = fwd()
            if train:
                fr.rnn_backward(ctx, a["dy"])
            return y
    elif case.op == "conv2d":

        def run() -> Any:
            y, ctx = fr.conv2d_forward(
                a["x"], a["w"], a["b"], stride=s["S"], padding=s["P"], groups=s["G"],
                training=train,
            )
            if train:
                fr.conv2d_backward(ctx, a["dy"])
            return y
    else:
        forward = getattr(fr, f"{case.op}_forward")
        backward = getattr(fr, f"{case.op}_backward")

        def run() -> Any:
            y, ctx = forward(a["x"], s["K"], s["S"], s["P"], training=train)
            if train:
                backward(ctx, a["dy"])
            return y

    return run


def _torch_runner(
    case: Case, a: dict[str, np.ndarray], passes: str, device: str, torch: Any
) -> Callable[[], Any]:
    """The same computation in PyTorch (modules for the recurrent ops, as users call them)."""
    s = case.shape
    train = passes == "fwd+bwd"
    dtype = torch.float32 if a["x"].dtype == np.float32 else torch.float64

    def t(name: str, grad: bool = False) -> Any:
        tensor = torch.from_numpy(np.ascontiguousarray(a[name])).to(device)
        return tensor.requires_grad_(grad and train)

    x, dy = t("x", grad=True), t("dy")
    if case.op in _GATES:
        cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[case.op]
        module = cls(s["D"], s["H"]).to(device=device, dtype=dtype)
        with torch.no_grad():
            module.weight_ih_l0.copy_(t("w_ih"))
            module.weight_hh_l0.copy_(t("w_hh"))
            if case.op == "gru":
                module.bias_ih_l0.copy_(t("b_ih"))
                module.bias_hh_l0.copy_(t("b_hh"))
            else:  # fastrnn's b is PyTorch's b_ih + b_hh
                module.bias_ih_l0.copy_(t("b"))
                module.bias_hh_l0.zero_()
        module.requires_grad_(train)
        h0 = t("h0", grad=True).unsqueeze(0)
        state: Any = (h0, t("c0", grad=True).unsqueeze(0)) if case.op == "lstm" else h0

        def forward() -> Any:
            return module(x, state)[0]
    elif case.op == "conv2d":
        w, b = t("w", grad=True), t("b", grad=True)

        def forward() -> Any:
            return torch.nn.functional.conv2d(
                x, w, b, stride=s["S"], padding=s["P"], groups=s["G"]
            )
    else:
        fn = getattr(torch.nn.functional, case.op)

        def forward() -> Any:
            return fn(x, s["K"], s["S"], s["P"])

    def run() -> Any:
        if not train:
            with torch.no_grad():
                return forward()
        y = forward()
        y.backward(dy)
        return y.detach()

    return run


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


def time_call(
    fn: Callable[[], Any],
    sync: Callable[[], None],
    min_time: float,
    max_repeats: int = 100,
    faults: list[float] | None = None,
) -> float:
    """Median seconds of ``fn`` over repeats lasting ``min_time`` in all (at least 3 repeats
    unless one call takes a second), after warm-up calls: one, or two when a call is quick.
    ``faults``: gets the timed calls' minor page faults per call appended (fresh pages the
    library's allocations touched: a cost of the call, but one that depends on the allocator's
    state; PyTorch's wide convolutions took 8,000-31,000 a call back to back).

    The second warm-up matters: after a pause, the first calls of a library pay for waking its
    thread pool and one-off costs such as GPU kernel compilation (PyTorch's 2-thread LSTM
    backward took 76 ms on its first calls after an idle second, 0.5 ms after that).
    """

    def once() -> float:
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    warm = once()
    if warm < 0.2:
        warm = once()
    min_repeats = 1 if warm >= 1.0 else 3
    times: list[float] = []
    from fastrnn._bench import minor_faults

    f0 = minor_faults()
    start = time.perf_counter()
    while len(times) < min_repeats or (
        time.perf_counter() - start < min_time and len(times) < max_repeats
    ):
        times.append(once())
    if faults is not None:
        faults.append((minor_faults() - f0) / len(times))
    return statistics.median(times)


def sgemm_rate(threads: int, size: int, min_time: float) -> float:
    """This machine's float32 GEMM rate in GFLOP/s: NumPy's BLAS on (size x size) matrices with
    ``threads`` BLAS threads (the practical ceiling of the CPU kernels)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    c = np.empty((size, size), np.float32)
    with same_threads(threads):
        seconds = time_call(lambda: np.matmul(a, b, out=c), lambda: None, min_time)
    return 2.0 * size**3 / seconds / 1e9


def same_threads(n: int) -> contextlib.AbstractContextManager[None]:
    """fastrnn, PyTorch and every BLAS on ``n`` threads inside the block, restored after it
    (the recurrent benchmarks' helper, so both benchmarks set threads the same way)."""
    from fastrnn._bench import threads

    return threads(n)


def _max_rel_err(got: Any, want: np.ndarray) -> float:
    got = np.asarray(
        got.get() if hasattr(got, "get") else got.cpu().numpy() if hasattr(got, "cpu") else got,
        dtype=np.float64,
    )
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return math.inf
    scale = max(1.0, float(np.max(np.abs(want))) if want.size else 1.0)
    return float(np.max(np.abs(got - want))) / scale if want.size else 0.0


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


@dataclass
class Row:
    op: str
    shape: str
    passes: str
    impl: str
    device: str
    ms: float | None = None
    gflops: float | None = None
    pct_sgemm: float | None = None
    torch_ratio: float | None = None  # torch ms / this ms on the same device
    faults: float | None = None  # minor page faults per timed call (CPU rows)
    check: str = "-"  # "ok", "MISMATCH (err)", or why it did not run
    dims: dict[str, int] = field(default_factory=dict)


def _sync_cupy() -> None:
    import cupy

    cupy.cuda.runtime.deviceSynchronize()


def _gpu_backends(torch: Any) -> tuple[Any, bool]:
    """(cupy module or None, whether torch has CUDA)."""
    cupy = None
    try:
        import cupy as _cupy

        if _cupy.is_available():
            cupy = _cupy
    except Exception:
        cupy = None
    torch_cuda = bool(torch is not None and torch.cuda.is_available())
    return cupy, torch_cuda


def run_bench(
    *,
    quick: bool = False,
    threads: int | None = None,
    ops: tuple[str, ...] = OPS,
    dtype: Any = np.float32,
    use_torch: bool = True,
    use_gpu: bool = True,
    min_time: float | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the grid; return ``{"machine": {...}, "rows": [...]}`` (rows as dicts)."""
    threads = fr.get_num_threads() if threads is None else threads
    min_time = (0.05 if quick else 0.25) if min_time is None else min_time
    torch = None
    if use_torch:
        try:
            import torch as _torch

            torch = _torch
        except ImportError:
            torch = None
    cupy, torch_cuda = _gpu_backends(torch) if use_gpu else (None, False)
    sgemm = sgemm_rate(threads, 1024 if quick else 2048, min_time)
    log(f"sgemm (NumPy BLAS, {threads} threads): {sgemm:.1f} GFLOP/s")
    machine = {
        "threads": threads,
        "dtype": np.dtype(dtype).name,
        "sgemm_gflops": sgemm,
        "cpu": platform.processor() or platform.machine(),
        "numpy": np.__version__,
        "torch": torch.__version__ if torch is not None else None,
        "gpu": None,
        "quick": quick,
    }
    if cupy is not None:
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        machine["gpu"] = name.decode() if isinstance(name, bytes) else name

    rows: list[Row] = []
    with same_threads(threads):
        for case in grid(quick):
            if case.op not in ops:
                continue
            arrays = make_inputs(case, dtype)
            for passes in PASSES:
                rows.extend(
                    _bench_case(case, arrays, passes, sgemm, min_time, torch, cupy, torch_cuda)
                )
                log(_progress_line(case, passes, rows))
    return {"machine": machine, "rows": [asdict(r) for r in rows]}


def _progress_line(case: Case, passes: str, rows: list[Row]) -> str:
    done = [r for r in rows if r.op == case.op and r.shape == case.label and r.passes == passes]
    parts = [f"{r.impl} {r.ms:.3f} ms" if r.ms is not None else f"{r.impl} {r.check}" for r in done]
    return f"  {case.op:<10} {case.label:<32} {passes:<7} " + ", ".join(parts)


def _bench_case(
    case: Case,
    arrays: dict[str, np.ndarray],
    passes: str,
    sgemm: float,
    min_time: float,
    torch: Any,
    cupy: Any,
    torch_cuda: bool,
) -> list[Row]:
    flops = case.flops(passes)
    # the reference output every implementation is checked against
    with fr.use_backend("numpy"):
        ref_run = _fastrnn_runner(case, arrays, passes)
        want = ref_run()
        ref_seconds = time_call(ref_run, lambda: None, min_time)
    # NumPy's BLAS threads spin for a while after its calls; what is timed next would share
    # their cores (fastrnn's 2-thread LSTM calls ran 5-15x slower in that window)
    from fastrnn._bench import let_blas_settle

    let_blas_settle(fr.get_num_threads())
    tol = 2e-3 if arrays["x"].dtype == np.float32 else 1e-9

    def row(
        impl: str, device: str, seconds: float | None, check: str, faults: float | None = None
    ) -> Row:
        r = Row(case.op, case.label, passes, impl, device, check=check, dims=dict(case.shape))
        r.faults = faults if device == "cpu" else None
        if seconds is not None:
            r.ms = seconds * 1e3
            r.gflops = flops / seconds / 1e9
            if case.gemm_bound and device == "cpu":
                r.pct_sgemm = 100.0 * r.gflops / sgemm
        return r

    def measure(
        impl: str, device: str, make: Callable[[], Callable[[], Any]], sync: Callable[[], None]
    ) -> Row:
        try:
            run = make()
            err = _max_rel_err(run(), want)
            check = "ok" if err <= tol else f"MISMATCH ({err:.1e})"
            faults: list[float] = []
            seconds = time_call(run, sync, min_time, faults=faults)
        except ImportError as exc:
            return row(impl, device, None, f"not built ({_first_line(exc)[:60]})")
        except Exception as exc:  # one failing backend must not stop the table
            return row(impl, device, None, f"failed: {type(exc).__name__}: {_first_line(exc)}")
        return row(impl, device, seconds, check, faults[0])

    out = [
        measure("fastrnn", "cpu", lambda: _fastrnn_runner(case, arrays, passes), lambda: None),
        row("numpy", "cpu", ref_seconds, "reference"),
    ]
    if torch is not None:
        out.append(
            measure(
                "torch",
                "cpu",
                lambda: _torch_runner(case, arrays, passes, "cpu", torch),
                lambda: None,
            )
        )
    if cupy is not None:
        gpu_arrays = {k: cupy.asarray(v) for k, v in arrays.items()}
        out.append(
            measure(
                "fastrnn-cuda",
                "cuda",
                lambda: _fastrnn_runner(case, gpu_arrays, passes),
                _sync_cupy,
            )
        )
    if torch_cuda:
        out.append(
            measure(
                "torch-cuda",
                "cuda",
                lambda: _torch_runner(case, arrays, passes, "cuda", torch),
                torch.cuda.synchronize,
            )
        )
    for device in ("cpu", "cuda"):
        opponent = next(
            (
                r
                for r in out
                if r.device == device and r.impl.startswith("torch") and r.ms is not None
            ),
            None,
        )
        if opponent is None:
            continue
        for r in out:
            if r.device == device and r.ms is not None:
                r.torch_ratio = opponent.ms / r.ms
    return out


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:120] + ("..." if len(text) > 120 else "")


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(result: dict[str, Any]) -> str:
    """One line per op, shape and pass: fastrnn's time, GFLOP/s and % of sgemm, the
    reference's and PyTorch's times, PyTorch's time over fastrnn's; GPU columns when timed."""
    m = result["machine"]
    head = (
        f"fastrnn bench: {m['dtype']}, threads: {m['threads']}, sgemm {m['sgemm_gflops']:.1f} "
        f"GFLOP/s (NumPy BLAS, same threads, same run); PyTorch {m['torch'] or 'not installed'}"
        f"; GPU {m['gpu'] or 'none'}"
    )
    groups: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for r in result["rows"]:
        groups.setdefault((r["op"], r["shape"], r["passes"]), {})[r["impl"]] = r
    has_torch = any("torch" in g for g in groups.values())
    has_gpu = any("fastrnn-cuda" in g or "torch-cuda" in g for g in groups.values())
    cols = ["op", "shape", "pass", "fastrnn ms", "GFLOP/s", "% sgemm", "numpy ms"]
    if has_torch:
        cols += ["torch ms", "torch/fastrnn", "faults fr/torch"]
    if has_gpu:
        cols += ["cuda ms", "cuda GFLOP/s", "torch-cuda ms", "torch-cuda/cuda"]
    cols.append("check")
    table: list[list[str]] = []
    for (op, shape, passes), g in groups.items():
        fr_row = g.get("fastrnn", {})
        line = [
            op,
            shape,
            passes,
            _cell(fr_row.get("ms"), ".3f"),
            _cell(fr_row.get("gflops"), ".2f"),
            _cell(fr_row.get("pct_sgemm"), ".0f"),
            _cell(g.get("numpy", {}).get("ms"), ".3f"),
        ]
        if has_torch:
            th = g.get("torch", {})
            line += [
                _cell(th.get("ms"), ".3f"),
                _cell(fr_row.get("torch_ratio"), ".2f"),
                f"{_cell(fr_row.get('faults'), '.0f')}/{_cell(th.get('faults'), '.0f')}",
            ]
        if has_gpu:
            cu = g.get("fastrnn-cuda", {})
            line += [
                _cell(cu.get("ms"), ".3f"),
                _cell(cu.get("gflops"), ".1f"),
                _cell(g.get("torch-cuda", {}).get("ms"), ".3f"),
                _cell(cu.get("torch_ratio"), ".2f"),
            ]
        checks = [
            f"{impl}: {r['check']}"
            for impl, r in g.items()
            if r["check"] not in ("ok", "reference")
        ]
        line.append("; ".join(checks) if checks else "ok")
        table.append(line)
    widths = [max([len(c)] + [len(t[i]) for t in table]) for i, c in enumerate(cols)]
    text_cols = {0, 1, 2, len(cols) - 1}

    def fmt(values: list[str]) -> str:
        return "  ".join(
            v.ljust(w) if i in text_cols else v.rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ).rstrip()

    lines = [head, "", fmt(cols), fmt(["-" * w for w in widths])]
    previous = None
    for line in table:
        if previous is not None and line[0] != previous:
            lines.append("")
        previous = line[0]
        lines.append(fmt(line))
    lines += [
        "",
        "ms: median wall time; fwd is training=False, fwd+bwd is a training forward plus "
        "backward; GFLOP/s counts GEMM work (fwd+bwd = 3 x fwd; pooling: 1 op per window "
        "element); torch/fastrnn > 1 means fastrnn is faster; faults: minor page faults per "
        "call (fresh pages; their cost is in the ms, and varies with the allocator's state); "
        "check: every output compared with the NumPy reference before timing.",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> bool:
    """A bar chart of GFLOP/s per case and implementation (forward+backward above, forward
    below), the sgemm rate as a line; False when matplotlib is not installed."""
    plt = matplotlib_pyplot()
    if plt is None:
        return False
    rows = result["rows"]
    impls = sorted({r["impl"] for r in rows}, key=lambda s: (s != "fastrnn", s))
    fig, axes = plt.subplots(2, 1, figsize=(14, 9))
    for ax, passes in zip(axes, ("fwd+bwd", "fwd"), strict=True):
        cases = list(dict.fromkeys((r["op"], r["shape"]) for r in rows if r["passes"] == passes))
        width = 0.8 / max(1, len(impls))
        for i, impl in enumerate(impls):
            values = []
            for op, shape in cases:
                hit = next(
                    (
                        r
                        for r in rows
                        if r["passes"] == passes
                        and r["op"] == op
                        and r["shape"] == shape
                        and r["impl"] == impl
                    ),
                    None,
                )
                values.append(hit["gflops"] if hit and hit["gflops"] else 0.0)
            ax.bar([j + i * width for j in range(len(cases))], values, width, label=impl)
        ax.axhline(
            result["machine"]["sgemm_gflops"],
            color="k",
            ls="--",
            lw=1,
            label="sgemm (same threads)",
        )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels([f"{op}\n{shape}" for op, shape in cases], fontsize=6, rotation=60)
        ax.set_yscale("log")
        ax.set_ylabel("GFLOP/s")
        ax.set_title(
            f"{passes}, threads: {result['machine']['threads']}, {result['machine']['dtype']}"
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="time every kernel vs the NumPy reference and PyTorch (table, GFLOP/s)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--quick", action="store_true", help="a small grid (well under a minute)")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="threads for fastrnn, PyTorch and BLAS (default: fastrnn's default)",
    )
    p.add_argument(
        "--ops",
        default=",".join(OPS),
        help=f"comma-separated subset of {','.join(OPS)} (default: all)",
    )
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--no-torch", action="store_true", help="do not time PyTorch")
    p.add_argument("--no-gpu", action="store_true", help="do not time the GPU even if present")
    p.add_argument(
        "--min-time",
        type=positive_float,
        default=None,
        help="seconds of repeats per measurement (default 0.25, quick 0.05)",
    )
    p.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON")
    p.add_argument(
        "--plot", metavar="PNG", default=None, help="write a bar chart (needs matplotlib)"
    )
    p.add_argument(
        "--inference",
        action="store_true",
        help="the streaming-inference table instead: prepared layers' one step and whole "
        "sequences vs lstm_forward(training=False) and torch.nn (1 thread unless --threads)",
    )
    p.add_argument(
        "--training",
        action="store_true",
        help="instead of the kernels: whole training steps (char-rnn in fastrnn.nn, the word "
        "LM with fastrnn.torch.LSTM) against PyTorch, on 1 and all CPUs (or --threads), with a "
        "per-part breakdown (needs PyTorch)",
    )
    p.add_argument(
        "--rounds",
        type=positive_int,
        default=5,
        help="--training: interleaved rounds per measurement (default 5)",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=10,
        help="--training: training steps per round (default 10)",
    )
    p.set_defaults(func=cmd_bench)


def cmd_bench_training(args: argparse.Namespace) -> int:
    """``fastrnn bench --training`` (fastrnn/bench_training.py)."""
    from fastrnn import bench_training
    from fastrnn.examples._common import available_cpus

    try:
        import torch  # noqa: F401
    except ImportError:
        raise CommandError("--training compares with PyTorch: pip install torch") from None
    json_path = check_output_file(args.json, "--json") if args.json else None
    if args.threads is not None:
        counts: tuple[int, ...] = (args.threads,)
    else:
        counts = tuple(sorted({1, available_cpus()}))
    result = bench_training.run(
        thread_counts=counts,
        steps=args.steps,
        rounds=args.rounds,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(bench_training.format_result(result))
    if json_path is not None:
        write_json_atomic(json_path, result)
        print(f"wrote {json_path}")
    return 0


def cmd_bench_inference(args: argparse.Namespace) -> int:
    """``fastrnn bench --inference``: fastrnn/_inference_bench.py's table."""
    from fastrnn import _inference_bench

    json_path = check_output_file(args.json, "--json") if args.json else None
    result = _inference_bench.run(
        threads=args.threads or 1,
        use_torch=not args.no_torch,
        rounds=3 if args.quick else 7,
        min_time=args.min_time or (0.05 if args.quick else 0.3),
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(_inference_bench.format_table(result))
    if json_path is not None:
        write_json_atomic(json_path, result)
        print(f"wrote {json_path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.training:
        return cmd_bench_training(args)
    if args.inference:
        return cmd_bench_inference(args)
    ops = tuple(s.strip() for s in args.ops.split(",") if s.strip())
    unknown = [o for o in ops if o not in OPS]
    if unknown or not ops:
        raise CommandError(
            f"--ops: unknown op(s) {unknown or args.ops!r}; choose from {', '.join(OPS)}"
        )
    json_path = check_output_file(args.json, "--json") if args.json else None
    plot_path = check_output_file(args.plot, "--plot") if args.plot else None
    if plot_path is not None and matplotlib_pyplot() is None:
        raise CommandError("--plot needs matplotlib: pip install matplotlib")
    result = run_bench(
        quick=args.quick,
        threads=args.threads,
        ops=ops,
        dtype=np.dtype(args.dtype).type,
        use_torch=not args.no_torch,
        use_gpu=not args.no_gpu,
        min_time=args.min_time,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(format_table(result))
    if json_path is not None:
        write_json_atomic(json_path, result)
        print(f"wrote {json_path}")
    if plot_path is not None:
        plot(result, str(plot_path))
        print(f"wrote {plot_path}")
    return 0
