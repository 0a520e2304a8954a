"""fastrnn's CUDA kernels against PyTorch on the same GPU (cuDNN), forward + backward, float32.

    python benchmarks/bench_gpu.py --out DIR          # on a machine with a GPU, CuPy and torch
    python benchmarks/bench_gpu.py --dry-run          # no GPU: NumPy/CPU arrays, tiny shapes

Recurrent: fastrnn.{lstm,gru,rnn}_forward + _backward against torch.nn.LSTM/GRU/RNN (one layer,
time-major, the same weights) at (T, N, D, H) in RECURRENT_SHAPES, and the LSTM with projections
("lstmp", w_hr against torch.nn.LSTM(proj_size=H // 2)) at PROJECTION_SHAPES. Convolution and
pooling: fastrnn.conv2d / max_pool2d / avg_pool2d against torch.nn.functional at
(N, C, H, W, F, k) in CONV_SHAPES (conv: stride 1, padding k//2, with bias; pooling: kernel k,
stride 2, padding k//2).

TF32 is off on both sides (torch.backends.*.allow_tf32 = False; CUPY_TF32=0, which must be set
before CuPy is imported: this script sets it). Each case is checked first (fastrnn against
torch on the same inputs), warmed up (NVRTC compilation, cuDNN plans and memory pools are not
timed), then timed with CUDA events around forward + backward on each library's current stream;
the table shows medians. "vs torch" is torch's time / fastrnn's: above 1 means fastrnn is faster.
The recurrent ops and conv2d are timed twice: eagerly (CUDA graphs off: one cuBLAS call and
one kernel launch per time step) and with CUDA graphs on (fastrnn's default: the second call
with the same arrays is captured, later calls replay it). The table's "graphs" column shows
how many loops were captured / replayed / failed to capture during that timing, and the text of
the last capture error is printed under the table; the JSON has both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RECURRENT_SHAPES = [(100, 1, 128, 128), (100, 8, 256, 256), (100, 64, 512, 512),
                    (50, 128, 1024, 1024)]  # fmt: skip
CONV_SHAPES = [(64, 3, 32, 32, 32, 3), (64, 32, 32, 32, 64, 3), (32, 64, 56, 56, 64, 3),
               (8, 128, 28, 28, 128, 3)]  # fmt: skip
# LSTM with projections (op "lstmp", torch.nn.LSTM(proj_size=H // 2)) at a few of those shapes
PROJECTION_SHAPES = [(100, 8, 256, 256), (100, 64, 512, 512)]
DRY_RECURRENT_SHAPES = [(5, 2, 4, 6), (3, 1, 3, 5)]
DRY_CONV_SHAPES = [(2, 3, 8, 8, 4, 3)]

WARMUP = 3
MIN_REPS, MAX_REPS = 5, 40


class Bench:
    """Timing and array plumbing for one device: "cuda" (CuPy + torch.cuda) or "cpu" (dry run:
    NumPy + torch on the CPU, wall-clock timing)."""

    def __init__(self, device: str, target_s: float) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.target_s = target_s
        if device == "cuda":
            import cupy

            self.cupy = cupy
            self.xp = cupy
        else:
            self.cupy = None
            self.xp = np

    # -- arrays ----------------------------------------------------------------------------------
    def fr_array(self, a: np.ndarray) -> Any:
        return self.xp.asarray(a)

    def th_tensor(self, a: np.ndarray, grad: bool = False) -> Any:
        t = self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
        return t.requires_grad_(grad)

    @staticmethod
    def host(a: Any) -> np.ndarray:
        if hasattr(a, "detach"):
            return a.detach().cpu().numpy()
        if hasattr(a, "get"):
            return a.get()
        return np.asarray(a)

    # -- timing ----------------------------------------------------------------------------------
    def _once(self, fn: Callable[[], Any], lib: str) -> float:
        """Milliseconds of one call, measured on the GPU timeline with CUDA events (which also
        count the GPU's idle time while the host is still issuing work)."""
        if self.device != "cuda":
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        if lib == "torch":
            start = self.torch.cuda.Event(enable_timing=True)
            end = self.torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        start, end = self.cupy.cuda.Event(), self.cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return self.cupy.cuda.get_elapsed_time(start, end)

    def time(self, fn: Callable[[], Any], lib: str) -> dict[str, float]:
        for _ in range(WARMUP):
            fn()
        self.synchronize()
        first = self._once(fn, lib)
        reps = int(min(MAX_REPS, max(MIN_REPS, math.ceil(self.target_s * 1e3 / max(first, 1e-3)))))
        times = [self._once(fn, lib) for _ in range(reps)]
        return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": reps}

    def time_fastrnn(self, fn: Callable[[], Any], graphs: bool) -> dict[str, Any] | None:
        """fastrnn with CUDA graphs of its time loops off (eager) or on (captured during the
        warm-up when CuPy's pool hands back the same addresses; the counts say what
        happened). None for graphs on the CPU dry run."""
        if self.device != "cuda":
            return None if graphs else self.time(fn, "fastrnn")
        from fastrnn._cuda._runtime import runtime

        rt = runtime()
        before = dict(rt.graph_stats)
        previous = rt.graphs
        rt.graphs = graphs
        try:
            out: dict[str, Any] = self.time(fn, "fastrnn")
        finally:
            rt.graphs = previous
        stats = rt.graph_stats
        out["graph_stats"] = {k: stats[k] - before[k] for k in before if isinstance(before[k], int)}
        if stats.get("last_capture_error") != before.get("last_capture_error") or (
            out["graph_stats"].get("capture_failed")
        ):
            out["capture_error"] = stats.get("last_capture_error")
        return out

    def synchronize(self) -> None:
        if self.device == "cuda":
            self.cupy.cuda.get_current_stream().synchronize()
            self.torch.cuda.synchronize()


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)) if b.size else 0.0


# ------------------------------------------------------------------------------------------------
# recurrent
# ------------------------------------------------------------------------------------------------

GATES = {"lstm": 4, "lstmp": 4, "gru": 3, "rnn": 1}


def bench_recurrent(b: Bench, op: str, shape: tuple[int, int, int, int]) -> dict[str, Any]:
    import fastrnn as fr

    torch = b.torch
    T, N, D, H = shape
    P = H // 2 if op == "lstmp" else H  # the state's width
    rng = np.random.default_rng(0)
    f32 = np.float32
    x = rng.standard_normal((T, N, D)).astype(f32)
    h0 = (rng.standard_normal((N, P)) * 0.5).astype(f32)
    c0 = (rng.standard_normal((N, H)) * 0.5).astype(f32)
    dy = rng.standard_normal((T, N, P)).astype(f32)

    torch.manual_seed(0)
    if op == "lstmp":
        module = torch.nn.LSTM(D, H, num_layers=1, proj_size=P).to(b.device)
    else:
        cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[op]
        module = cls(D, H, num_layers=1).to(b.device)
    w_ih = module.weight_ih_l0.detach().cpu().numpy()
    w_hh = module.weight_hh_l0.detach().cpu().numpy()
    b_ih = module.bias_ih_l0.detach().cpu().numpy()
    b_hh = module.bias_hh_l0.detach().cpu().numpy()

    # fastrnn
    fx, fh0, fc0, fdy = (b.fr_array(a) for a in (x, h0, c0, dy))
    fw_ih, fw_hh = b.fr_array(w_ih), b.fr_array(w_hh)
    if op == "gru":
        fb = (b.fr_array(b_ih), b.fr_array(b_hh))
    else:
        fb = (b.fr_array(b_ih + b_hh),)

    fw_hr = b.fr_array(module.weight_hr_l0.detach().cpu().numpy()) if op == "lstmp" else None

    def fr_run() -> tuple[Any, Any]:
        if op in ("lstm", "lstmp"):
            y, _, _, ctx = fr.lstm_forward(fx, fh0, fc0, fw_ih, fw_hh, *fb, w_hr=fw_hr)
            return y, fr.lstm_backward(ctx, fdy)
        if op == "gru":
            y, _, ctx = fr.gru_forward(fx, fh0, fw_ih, fw_hh, *fb)
            return y, fr.gru_backward(ctx, fdy)
        y, _, ctx = fr.rnn_forward(fx, fh0, fw_ih, fw_hh, *fb)
        return y, fr.rnn_backward(ctx, fdy)

    # torch: the same weights, gradients for x and the initial states too (like fastrnn)
    tx = b.th_tensor(x, grad=True)
    th0 = b.th_tensor(h0[None], grad=True)
    tc0 = b.th_tensor(c0[None], grad=True)
    tdy = b.th_tensor(dy)

    def th_run() -> tuple[Any, Any]:
        module.zero_grad(set_to_none=True)
        tx.grad = th0.grad = tc0.grad = None
        y, _ = module(tx, (th0, tc0) if op in ("lstm", "lstmp") else th0)
        y.backward(tdy)
        return y, tx.grad

    y_fr, g_fr = fr_run()
    y_th, dx_th = th_run()
    check = {
        "y": _rel_err(b.host(y_fr), b.host(y_th)),
        "dx": _rel_err(b.host(g_fr[0]), b.host(dx_th)),
        "dw_hh": _rel_err(b.host(g_fr[4 if op in ("lstm", "lstmp") else 3]),
                          b.host(module.weight_hh_l0.grad)),
    }
    if op == "lstmp":
        check["dw_hr"] = _rel_err(b.host(g_fr[6]), b.host(module.weight_hr_l0.grad))
    t_fr = b.time_fastrnn(fr_run, graphs=False)
    t_graph = b.time_fastrnn(fr_run, graphs=True)
    t_th = b.time(th_run, "torch")
    G = GATES[op] * H
    # forward GEMMs (input, recurrent, projection), and twice that for backward
    flops = 3 * 2 * T * N * (G * (D + P) + (P * H if op == "lstmp" else 0))
    return {
        "op": op,
        "shape": f"T={T} N={N} D={D} H={H}" + (f" P={P}" if op == "lstmp" else ""),
        "fastrnn": t_fr,
        "fastrnn_graphs": t_graph,
        "torch": t_th,
        "speed_vs_torch": t_th["median_ms"] / t_fr["median_ms"],
        "graphs_speed_vs_torch": t_th["median_ms"] / t_graph["median_ms"] if t_graph else None,
        "fastrnn_gflops": flops / (t_fr["median_ms"] * 1e6),
        "max_rel_err": check,
    }


# ------------------------------------------------------------------------------------------------
# convolution and pooling
# ------------------------------------------------------------------------------------------------


def step_profile(rt: Any, fn: Callable[[], Any], event: Callable[[], Any],
                 elapsed: Callable[[Any, Any], float], sync: Callable[[], None],
                 reps: int = 5) -> list[tuple[str, float]]:  # fmt: skip
    """GPU time of each GEMM and kernel launch that ``fn()`` makes through the runtime ``rt``
    (CUDA graphs off; every call, inside a time loop or not, between two events):
    [(label, median ms)] in call order, labels "gemm MxNxK[ xbatch]" (row-major sizes) or the
    kernel's name. The loops' kept calls are dropped before and after, so the timed calls are
    not kept."""
    records: list[tuple[str, Any, Any]] = []
    gemm, launch = rt.gemm, rt.launch
    loop_gemm, loop_launch = rt.loop_gemm, rt.loop_launch

    def timed(label: str, call: Callable[[], Any]) -> Any:
        start, end = event(), event()
        start.record()
        out = call()
        end.record()
        records.append((label, start, end))
        return out

    def gemm_label(a: tuple, kw: dict, batch_at: int) -> str:
        batch = a[batch_at] if len(a) > batch_at else kw.get("batch", 1)
        return f"gemm {a[2]}x{a[3]}x{a[4]}" + (f" x{batch}" if batch > 1 else "")

    def timed_step(step: Any, label: str) -> Any:
        bind = step.bind

        def timed_bind(*values: int) -> tuple[Any, tuple]:
            f, args = bind(*values)
            return (lambda *a: timed(label, lambda: f(*a))), args

        step.bind = timed_bind
        return step

    def gemm_timed(*a: Any, **kw: Any) -> Any:
        return timed(gemm_label(a, kw, 16), lambda: gemm(*a, **kw))

    def launch_timed(name: str, *a: Any, **kw: Any) -> Any:
        return timed(name, lambda: launch(name, *a, **kw))

    def loop_gemm_timed(*a: Any, **kw: Any) -> Any:
        return timed_step(loop_gemm(*a, **kw), gemm_label(a, kw, 13))

    def loop_launch_timed(name: str, *a: Any, **kw: Any) -> Any:
        return timed_step(loop_launch(name, *a, **kw), name)

    previous = rt.graphs
    rt.gemm, rt.launch, rt.graphs = gemm_timed, launch_timed, False
    rt.loop_gemm, rt.loop_launch = loop_gemm_timed, loop_launch_timed
    rt.loops.clear()
    try:
        runs = []
        for _ in range(reps):
            records.clear()
            fn()
            sync()
            runs.append([(label, elapsed(s, e)) for label, s, e in records])
    finally:
        del rt.gemm, rt.launch, rt.loop_gemm, rt.loop_launch  # the class's methods again
        rt.graphs = previous
        rt.loops.clear()
    if not runs or any(len(r) != len(runs[0]) for r in runs):
        return []
    return [(runs[0][i][0], statistics.median(r[i][1] for r in runs)) for i in range(len(runs[0]))]


def bench_conv(b: Bench, op: str, shape: tuple[int, ...]) -> dict[str, Any]:
    import fastrnn as fr

    torch = b.torch
    F_ = torch.nn.functional
    N, C, H, W, F, k = shape
    rng = np.random.default_rng(0)
    f32 = np.float32
    x = rng.standard_normal((N, C, H, W)).astype(f32)
    fx = b.fr_array(x)
    tx = b.th_tensor(x, grad=True)
    p = k // 2
    if op == "conv2d":
        w = (rng.standard_normal((F, C, k, k)) / math.sqrt(C * k * k)).astype(f32)
        bias = rng.standard_normal(F).astype(f32)
        fw, fbias = b.fr_array(w), b.fr_array(bias)
        tw, tbias = b.th_tensor(w, grad=True), b.th_tensor(bias, grad=True)
        OH = (H + 2 * p - k) + 1
        OW = (W + 2 * p - k) + 1
        dy = rng.standard_normal((N, F, OH, OW)).astype(f32)
        fdy, tdy = b.fr_array(dy), b.th_tensor(dy)

        def fr_run() -> tuple[Any, Any]:
            y, ctx = fr.conv2d_forward(fx, fw, fbias, stride=1, padding=p)
            return y, fr.conv2d_backward(ctx, fdy)

        def th_run() -> tuple[Any, Any]:
            tx.grad = tw.grad = tbias.grad = None
            y = F_.conv2d(tx, tw, tbias, stride=1, padding=p)
            y.backward(tdy)
            return y, (tx.grad, tw.grad, tbias.grad)

        def fr_forward() -> Any:
            return fr.conv2d_forward(fx, fw, fbias, stride=1, padding=p)

        def th_forward() -> Any:
            return F_.conv2d(tx, tw, tbias, stride=1, padding=p)

        flops = 3 * 2 * N * F * OH * OW * C * k * k
    else:
        s = 2
        OH = (H + 2 * p - k) // s + 1
        OW = (W + 2 * p - k) // s + 1
        dy = rng.standard_normal((N, C, OH, OW)).astype(f32)
        fdy, tdy = b.fr_array(dy), b.th_tensor(dy)
        fwd = getattr(fr, f"{op}_forward")
        bwd = getattr(fr, f"{op}_backward")
        tfn = getattr(F_, op)

        def fr_run() -> tuple[Any, Any]:
            y, ctx = fwd(fx, k, s, p)
            return y, (bwd(ctx, fdy),)

        def th_run() -> tuple[Any, Any]:
            tx.grad = None
            y = tfn(tx, k, s, p)
            y.backward(tdy)
            return y, (tx.grad,)

        flops = 0

    y_fr, g_fr = fr_run()
    y_th, g_th = th_run()
    check = {"y": _rel_err(b.host(y_fr), b.host(y_th))}
    for name, a, c in zip(("dx", "dw", "db"), g_fr, g_th, strict=False):
        check[name] = _rel_err(b.host(a), b.host(c))
    t_fr = b.time_fastrnn(fr_run, graphs=False)
    t_graph = b.time_fastrnn(fr_run, graphs=True) if op == "conv2d" else None
    t_th = b.time(th_run, "torch")
    forward_only = None
    if op == "conv2d":  # forward alone (graphs on, training): backward = the rest
        f_fr = b.time_fastrnn(fr_forward, graphs=True) or b.time_fastrnn(fr_forward, False)
        forward_only = {"fastrnn": f_fr, "torch": b.time(th_forward, "torch")}
    steps = None
    if op == "conv2d" and b.device == "cuda":  # where fastrnn's time goes, step by step
        from fastrnn._cuda._runtime import runtime

        try:
            steps = step_profile(runtime(), fr_run, b.cupy.cuda.Event,
                                 b.cupy.cuda.get_elapsed_time, b.synchronize)  # fmt: skip
        except Exception as exc:  # the profile is a diagnostic: never lose the row for it
            steps = [(f"profile failed: {type(exc).__name__}: {exc}", float("nan"))]
    return {
        "op": op,
        "shape": f"N={N} C={C} H={H} W={W}" + (f" F={F}" if op == "conv2d" else "") + f" k={k}",
        "fastrnn": t_fr,
        "fastrnn_graphs": t_graph,
        "torch": t_th,
        "speed_vs_torch": t_th["median_ms"] / t_fr["median_ms"],
        "graphs_speed_vs_torch": t_th["median_ms"] / t_graph["median_ms"] if t_graph else None,
        "fastrnn_gflops": flops / (t_fr["median_ms"] * 1e6) if flops else None,
        "max_rel_err": check,
        "forward_only": forward_only,
        "steps": steps,
    }


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------


def environment(b: Bench) -> dict[str, Any]:
    import fastrnn

    torch = b.torch
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "fastrnn": fastrnn.__version__,
        "device": b.device,
        "CUPY_TF32": os.environ.get("CUPY_TF32"),
        "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
    }
    if b.device == "cuda":
        from fastrnn._cuda.info import gpu_info

        env["gpu"] = gpu_info()
        env["torch.version.cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def format_table(results: list[dict[str, Any]], device: str) -> str:
    other = "torch (cuDNN)" if device == "cuda" else "torch (CPU)"
    head = (
        f"{'op':<11} {'shape':<26} {'eager ms':>10} {'vs torch':>8} {'graphs ms':>9} "
        f"{'vs torch':>8} {'cap/rep/fail':>12} {other + ' ms':>17} "
        f"{'GFLOP/s':>7}  max rel err (y, grads)"
    )
    lines = [head, "-" * len(head)]
    errors: dict[str, list[str]] = {}
    for r in results:
        if "error" in r:
            lines.append(f"{r['op']:<11} {r['shape']:<28} ERROR: {r['error']}")
            continue
        gf = f"{r['fastrnn_gflops']:.0f}" if r["fastrnn_gflops"] else "-"
        errs = ", ".join(f"{k}={v:.1e}" for k, v in r["max_rel_err"].items())
        g = r.get("fastrnn_graphs")
        g_ms = f"{g['median_ms']:>9.3f}" if g else f"{'-':>9}"
        g_x = f"{r['graphs_speed_vs_torch']:>7.2f}x" if g else f"{'-':>8}"
        gs = (g or {}).get("graph_stats")
        counts = f"{gs['captured']}/{gs['replayed']}/{gs['capture_failed']}" if gs else "-"
        if g and g.get("capture_error"):
            errors.setdefault(g["capture_error"], []).append(f"{r['op']} {r['shape']}")
        lines.append(
            f"{r['op']:<11} {r['shape']:<26} {r['fastrnn']['median_ms']:>10.3f} "
            f"{r['speed_vs_torch']:>7.2f}x {g_ms} {g_x} {counts:>12} "
            f"{r['torch']['median_ms']:>17.3f} {gf:>7}  {errs}"
        )
    for r in results:
        fo = r.get("forward_only")
        if not fo or "error" in r:
            continue
        total = (r.get("fastrnn_graphs") or r["fastrnn"])["median_ms"]
        f_fr, f_th = fo["fastrnn"]["median_ms"], fo["torch"]["median_ms"]
        lines.append(
            f"{r['op']} {r['shape']}: forward {f_fr:.3f} ms (torch {f_th:.3f}), backward "
            f"{total - f_fr:.3f} ms (torch {r['torch']['median_ms'] - f_th:.3f}) "
            "[forward alone, graphs on; backward = forward + backward - forward]"
        )
        if r.get("steps"):
            total_steps = sum(ms for _, ms in r["steps"])
            lines.append(
                f"  steps (graphs off, GPU ms, sum {total_steps:.3f}): "
                + ", ".join(f"{label} {ms:.3f}" for label, ms in r["steps"])
            )
    for text, where in errors.items():
        lines.append(f"CUDA graph capture error ({len(where)} cases, first {where[0]}): {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: NumPy arrays and torch on the CPU, tiny shapes")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="write the table and JSON here")
    ap.add_argument("--only", choices=("all", "recurrent", "conv"), default="all")
    ap.add_argument("--target-seconds", type=float, default=0.25,
                    help="timed seconds per case and library (5..40 repetitions)")  # fmt: skip
    args = ap.parse_args(argv)

    os.environ["CUPY_TF32"] = "0"  # before CuPy is imported
    try:
        import fastrnn  # noqa: F401
    except ImportError:  # run from a source checkout without installing
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: torch sees no CUDA device (use --dry-run without a GPU)", file=sys.stderr)
        return 2
    b = Bench(device, args.target_seconds)
    if device == "cpu":
        torch.set_num_threads(1)

    cases: list[tuple[Callable[..., dict[str, Any]], str, tuple[int, ...]]] = []
    if args.only in ("all", "recurrent"):
        for shape in DRY_RECURRENT_SHAPES if args.dry_run else RECURRENT_SHAPES:
            cases += [(bench_recurrent, op, shape) for op in ("lstm", "gru", "rnn")]
        for shape in DRY_RECURRENT_SHAPES[:1] if args.dry_run else PROJECTION_SHAPES:
            cases.append((bench_recurrent, "lstmp", shape))
    if args.only in ("all", "conv"):
        for shape in DRY_CONV_SHAPES if args.dry_run else CONV_SHAPES:
            cases += [(bench_conv, op, shape) for op in ("conv2d", "max_pool2d", "avg_pool2d")]

    results = []
    for fn, op, shape in cases:
        t0 = time.perf_counter()
        try:
            r = fn(b, op, shape)
        except Exception as exc:  # report and go on: one failing case must not hide the rest
            r = {"op": op, "shape": str(shape), "error": f"{type(exc).__name__}: {exc}"}
        r["wall_s"] = round(time.perf_counter() - t0, 2)
        results.append(r)
        print(f"  {op:<11} {str(shape):<26} done in {r['wall_s']:.1f} s", file=sys.stderr)

    table = format_table(results, device)
    env = environment(b)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_table.txt").write_text(table + "\n")
        payload = {"environment": env, "results": results}
        (args.out / "bench_results.json").write_text(json.dumps(payload, indent=2, default=str))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
