"""conv2d and pooling: fastrnn's CPU kernels vs the NumPy reference vs torch.nn.functional.

Outside the default test run (pytest collects tests/ only). Two ways to run it:

    python -m pytest benchmarks/bench_conv.py --benchmark-only --benchmark-group-by=group
    python benchmarks/bench_conv.py [--threads 2] [--repeat 5] [--reference]

The pytest-benchmark suite puts fastrnn, the reference and PyTorch of one shape and pass in one
group, with GFLOP/s, threads, dtype and shape in ``extra_info``. The script form times fastrnn
and PyTorch interleaved, shape by shape, several rounds, and prints median times, GFLOP/s and
PyTorch's time over fastrnn's (above 1: fastrnn is faster) -- the table quoted in issue notes.
The table gives fastrnn's % of the sgemm rate measured at the start of the same run, and each
side's fastest single call (min) with their ratio, which one-off spikes cannot spoil.
``--relu`` times conv2d + ReLU forward instead (fused, separate, torch); ``--relu-pool`` conv2d +
ReLU + 2x2 max pooling forward+backward (one call with ``max_pool=2``, two layers, torch);
``--first-call`` each kind of layer's first forward in fresh processes against a warm call;
``--after-torch`` each layer's forward right after torch's (a model mixing the two), in fresh
processes, fastrnn's outputs from its reused buffers against fresh ones;
``--mnist-example PATH`` PyTorch's examples/mnist ``Net`` read from that example's main.py.
``--im2col`` and ``--direct`` add fastrnn pinned to algorithm="im2col" (the kernels before the
direct ones) or "direct" (what "auto" ran on 3x3 layers before Winograd) to the same
interleaved rounds; ``--mnist`` times PyTorch's examples/mnist training step with
torch.nn's and fastrnn.torch's Conv2d/MaxPool2d.

Threads: ``FASTRNN_BENCH_THREADS`` (pytest) or ``--threads`` (script), default
``fastrnn.get_num_threads()``; both fastrnn and PyTorch are set explicitly (they share libgomp,
and ``torch.set_num_threads`` alone would change fastrnn's default).

On a machine shared with other busy processes, run with ``OMP_WAIT_POLICY=passive`` (it applies to
fastrnn and PyTorch alike: they share libgomp). With libgomp's default spin-waiting, a thread
that spins at the end of a parallel region takes the core its partner needs, and 2-thread
calls ran up to 10x slower than 1-thread calls here under a load of 4-5 on 2 cores.

FLOPs: a convolution forward is 2 N F OH OW (C/groups) KH KW; forward+backward is three times
that (input and weight gradients are GEMMs of the same size). Pooling counts one operation per
window element forward and per output element backward (it is bound by memory, not FLOPs).
Every implementation is checked against PyTorch (or the reference) before it is timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import fastrnn as fr
from fastrnn import reference as ref
from fastrnn._bench import minor_faults, sgemm_gflops

try:
    import torch
    import torch.nn.functional as tnf
except ImportError:  # pragma: no cover - torch is optional
    torch = None

# (N, C, H, W, F, k, stride, pad, groups): the layers of issue 17's table
CONV_SHAPES = [
    (64, 3, 32, 32, 32, 3, 1, 1, 1),
    (64, 1, 28, 28, 16, 5, 1, 2, 1),
    (32, 256, 14, 14, 64, 1, 1, 0, 1),
    (64, 32, 32, 32, 64, 3, 1, 1, 1),
    (32, 64, 56, 56, 64, 3, 1, 1, 1),
    (32, 64, 56, 56, 128, 3, 2, 1, 1),
    (8, 128, 28, 28, 128, 3, 1, 1, 1),
    (16, 256, 14, 14, 256, 3, 1, 1, 1),
    (32, 64, 56, 56, 64, 3, 1, 1, 64),
]
# (N, C, H, W, k, stride, pad)
POOL_SHAPES = [
    (64, 32, 32, 32, 2, 2, 0),
    (32, 64, 56, 56, 3, 2, 1),
]
IMPLS = ["fastrnn", "reference", "torch"]
PASSES = ["fwd", "fwd+bwd"]
DTYPE = np.float32


def bench_threads() -> int:
    env = os.environ.get("FASTRNN_BENCH_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else fr.get_num_threads()


def set_threads(n: int) -> None:
    fr.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)


def conv_flops(shape: tuple[int, ...], passes: str) -> float:
    N, C, H, W, F, k, s, p, g = shape
    OH, OW = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    fwd = 2.0 * N * F * OH * OW * (C // g) * k * k
    return fwd if passes == "fwd" else 3 * fwd


def pool_flops(shape: tuple[int, ...], passes: str) -> float:
    N, C, H, W, k, s, p = shape
    OH, OW = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    fwd = float(N * C * OH * OW * k * k)
    return fwd if passes == "fwd" else fwd + N * C * OH * OW


# ------------------------------------------------------------------------------------------------
# the timed calls, built and checked once per (op, shape, impl, pass)
# ------------------------------------------------------------------------------------------------


def conv_call(shape: tuple[int, ...], impl: str, passes: str) -> Callable[[], object]:
    """A zero-argument call running conv2d forward (or forward+backward) on ``impl``."""
    N, C, H, W, F, k, s, p, g = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, W), dtype=np.float64).astype(DTYPE)
    w = (rng.standard_normal((F, C // g, k, k)) / np.sqrt(C // g * k * k)).astype(DTYPE)
    b = rng.standard_normal(F).astype(DTYPE)
    y, _ = ref.conv2d_forward(x, w, b, stride=s, padding=p, groups=g, training=False)
    dy = rng.standard_normal(y.shape).astype(DTYPE)
    train = passes == "fwd+bwd"

    if impl == "torch":
        if torch is None:
            pytest.skip("torch is not installed")
        xt, wt, bt = (torch.from_numpy(a).requires_grad_(train) for a in (x, w, b))
        dyt = torch.from_numpy(dy)

        def call():
            if not train:
                with torch.no_grad():
                    return tnf.conv2d(xt, wt, bt, stride=s, padding=p, groups=g)
            xt.grad = wt.grad = bt.grad = None
            yt = tnf.conv2d(xt, wt, bt, stride=s, padding=p, groups=g)
            yt.backward(dyt)
            return yt

        out = call()
        np.testing.assert_allclose(out.detach().numpy(), y, rtol=1e-3, atol=1e-3)
        return call

    algorithm = impl if impl in PINNED else "auto"

    def call():
        yy, ctx = fr.conv2d_forward(
            x, w, b, stride=s, padding=p, groups=g, training=train, algorithm=algorithm
        )
        if train:
            fr.conv2d_backward(ctx, dy)
        return yy

    if impl == "reference":

        def run():
            with fr.use_backend("numpy"):
                return call()

        return run
    np.testing.assert_allclose(call(), y, rtol=1e-3, atol=1e-3)
    return call


def pool_call(kind: str, shape: tuple[int, ...], impl: str, passes: str) -> Callable[[], object]:
    N, C, H, W, k, s, p = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, W), dtype=np.float64).astype(DTYPE)
    fwd, bwd = {
        "max": (fr.max_pool2d_forward, fr.max_pool2d_backward),
        "avg": (fr.avg_pool2d_forward, fr.avg_pool2d_backward),
    }[kind]
    y, _ = getattr(ref, f"{kind}_pool2d_forward")(x, k, s, p, training=False)
    dy = rng.standard_normal(y.shape).astype(DTYPE)
    train = passes == "fwd+bwd"

    if impl == "torch":
        if torch is None:
            pytest.skip("torch is not installed")
        tfn = tnf.max_pool2d if kind == "max" else tnf.avg_pool2d
        xt = torch.from_numpy(x).requires_grad_(train)
        dyt = torch.from_numpy(dy)

        def call():
            if not train:
                with torch.no_grad():
                    return tfn(xt, k, s, p)
            xt.grad = None
            yt = tfn(xt, k, s, p)
            yt.backward(dyt)
            return yt

        np.testing.assert_allclose(call().detach().numpy(), y, rtol=1e-5, atol=1e-6)
        return call

    def call():
        yy, ctx = fwd(x, k, s, p, training=train)
        if train:
            bwd(ctx, dy)
        return yy

    if impl == "reference":

        def run():
            with fr.use_backend("numpy"):
                return call()

        return run
    np.testing.assert_allclose(call(), y, rtol=1e-5, atol=1e-6)
    return call


# ------------------------------------------------------------------------------------------------
# pytest-benchmark suite
# ------------------------------------------------------------------------------------------------


def _run(benchmark, call, flops: float, info: dict) -> None:
    threads = bench_threads()
    set_threads(threads)
    call()  # warm up (allocations, thread pools)
    slow = info["impl"] == "reference"
    benchmark.pedantic(call, rounds=3 if slow else 10, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(
        threads=threads, dtype=np.dtype(DTYPE).name, gflops=round(flops / median / 1e9, 2)
    )


def _conv_id(shape) -> str:
    return "N{}C{}H{}W{}F{}k{}s{}p{}g{}".format(*shape)


def _pool_id(shape) -> str:
    return "N{}C{}H{}W{}k{}s{}p{}".format(*shape)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=_conv_id)
def test_conv2d(benchmark, shape, passes, impl):
    benchmark.group = f"conv2d {passes} {_conv_id(shape)}"
    info = dict(op="conv2d", impl=impl, passes=passes, shape=list(shape))
    _run(benchmark, conv_call(shape, impl, passes), conv_flops(shape, passes), info)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=_pool_id)
def test_pool2d(benchmark, shape, kind, passes, impl):
    benchmark.group = f"{kind}_pool2d {passes} {_pool_id(shape)}"
    info = dict(op=f"{kind}_pool2d", impl=impl, passes=passes, shape=list(shape))
    _run(benchmark, pool_call(kind, shape, impl, passes), pool_flops(shape, passes), info)


# ------------------------------------------------------------------------------------------------
# script: interleaved side-by-side table
# ------------------------------------------------------------------------------------------------


def _times_ms(call: Callable[[], object], reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def _median_ms(call: Callable[[], object], reps: int) -> float:
    return statistics.median(_times_ms(call, reps))


def _rounds(calls: dict[str, Callable[[], object]], repeat: int) -> dict[str, list[float]]:
    """Each call's 5-call median in each of ``repeat`` rounds, the calls interleaved round by
    round (so that load changes hit every one of them)."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeat):
        for k, call in calls.items():
            times[k].append(_median_ms(call, 5))
    return times


def _round_ratios(times: dict[str, list[float]], a: str, b: str) -> list[float]:
    """a's time over b's round by round, sorted (robust to the machine's speed drifting
    between rounds)."""
    return sorted(x / y for x, y in zip(times[a], times[b], strict=True))


PINNED = ("im2col", "direct")  # fastrnn pinned to one algorithm, as extra columns


def table(
    threads: int, repeat: int, with_reference: bool, pool: bool = True, im2col: bool = False,
    direct: bool = False,
) -> None:  # fmt: skip
    set_threads(threads)
    impls = ["fastrnn", "torch"] + (["reference"] if with_reference else [])
    impls += (["im2col"] if im2col else []) + (["direct"] if direct else [])
    pinned = [i for i in impls if i in PINNED]
    sgemm = sgemm_gflops(threads)
    rows = [("conv2d", s, p) for s in CONV_SHAPES for p in PASSES]
    if pool:
        rows += [(f"{k}_pool2d", s, p) for s in POOL_SHAPES for k in ("max", "avg") for p in PASSES]
    print(f"threads={threads} dtype={np.dtype(DTYPE).name} repeat={repeat} (median of medians; "
          "min: the fastest single call, which one-off spikes cannot spoil); "
          f"sgemm {sgemm:.0f} GFLOP/s in this run (2048^3, NumPy's BLAS)")  # fmt: skip
    head = f"{'op':10} {'shape':34} {'pass':8}"
    for impl in impls:
        head += f" {impl + ' ms':>13} {'GF/s':>6}"
        head += f" {'%sgemm':>6}" if impl == "fastrnn" else ""
    for i in pinned:
        head += f" {'torch/' + i:>14}"
    print(head + f" {'torch/fastrnn':>14} {'min: fastrnn':>12} {'torch':>9} {'ratio':>6}"
          f" {'faults fr/torch':>16}")  # fmt: skip
    ratios: dict[str, list[float]] = {p: [] for p in PASSES}
    min_ratios: dict[str, list[float]] = {p: [] for p in PASSES}
    for op, shape, passes in rows:
        if op == "conv2d":
            calls = {i: conv_call(shape, i, passes) for i in impls}
            flops = conv_flops(shape, passes)
            label = _conv_id(shape)
        elif pinned:  # pooling has no pinned columns
            continue
        else:
            calls = {i: pool_call(op[:3], shape, i, passes) for i in impls}
            flops = pool_flops(shape, passes)
            label = _pool_id(shape)
        for call in calls.values():
            call()
        med: dict[str, list[float]] = {i: [] for i in impls}
        low: dict[str, float] = {i: float("inf") for i in impls}
        faults: dict[str, list[float]] = {i: [] for i in impls}
        for _ in range(repeat):  # interleaved, so load changes hit every implementation
            for i in impls:
                f0 = minor_faults()
                times = _times_ms(calls[i], 1 if i == "reference" else 5)
                faults[i].append((minor_faults() - f0) / len(times))
                med[i].append(statistics.median(times))
                low[i] = min(low[i], *times)
        ms = {i: statistics.median(v) for i, v in med.items()}
        line = f"{op:10} {label:34} {passes:8}"
        for i in impls:
            line += f" {ms[i]:13.3f} {flops / ms[i] / 1e6:6.1f}"
            if i == "fastrnn":
                line += f" {100 * flops / ms[i] / 1e6 / sgemm:6.0f}"
        ratio = ms["torch"] / ms["fastrnn"]
        if op == "conv2d":
            ratios[passes].append(ratio)
            min_ratios[passes].append(low["torch"] / low["fastrnn"])
        for i in pinned:
            line += f" {ms['torch'] / ms[i]:14.2f}"
        line += f" {ratio:14.2f} {low['fastrnn']:12.3f} {low['torch']:9.3f}"
        # minor page faults per call (fresh pages the call's allocations touched; PyTorch's
        # move with its allocator's state, and its times with them)
        fl = f"{statistics.median(faults['fastrnn']):.0f}/{statistics.median(faults['torch']):.0f}"
        print(line + f" {low['torch'] / low['fastrnn']:6.2f} {fl:>16}", flush=True)
    for p in PASSES:
        gm = float(np.exp(np.mean(np.log(ratios[p]))))
        gm_min = float(np.exp(np.mean(np.log(min_ratios[p]))))
        print(f"conv2d {p}: geometric mean of torch/fastrnn over the grid = {gm:.2f} "
              f"(of the minima: {gm_min:.2f})")  # fmt: skip


def relu_calls(shape: tuple[int, ...]) -> dict[str, Callable[[], object]]:
    """conv2d + ReLU forward (no gradients) three ways, checked to agree: fastrnn with the ReLU
    in the kernels' store (``activation="relu"``), fastrnn's convolution then ``np.maximum`` (a
    new array, as a separate ReLU layer makes), torch's conv2d then ``torch.relu``."""
    N, C, H, W, F, k, s, p, _ = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, W)).astype(DTYPE)
    w = (rng.standard_normal((F, C, k, k)) / np.sqrt(C * k * k)).astype(DTYPE)
    b = rng.standard_normal(F).astype(DTYPE)
    kw = dict(stride=s, padding=p, training=False)
    xt, wt, bt = map(torch.from_numpy, (x, w, b))

    def fused():
        return fr.conv2d_forward(x, w, b, activation="relu", **kw)[0]

    def separate():
        return np.maximum(fr.conv2d_forward(x, w, b, **kw)[0], 0)

    def theirs():
        with torch.no_grad():
            return torch.relu(tnf.conv2d(xt, wt, bt, stride=s, padding=p))

    np.testing.assert_allclose(fused(), theirs().numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(fused(), separate())
    return {"fused": fused, "separate": separate, "torch": theirs}


def _fused_rows(calls_of, pass_: str, sgemm: float, repeat: int):
    """(shape, median ms per call, the fused call's % of sgemm) for the grid's ungrouped
    layers, the calls of ``calls_of(shape)`` interleaved; FLOPs of the convolution's pass."""
    for shape in CONV_SHAPES:
        if shape[-1] != 1:  # grouped
            continue
        ms = {i: statistics.median(v) for i, v in _rounds(calls_of(shape), repeat).items()}
        yield shape, ms, 100 * conv_flops(shape, pass_) / ms["fused"] / 1e6 / sgemm


def relu_table(threads: int, repeat: int) -> None:
    """relu_calls on the grid's ungrouped layers, interleaved, medians."""
    set_threads(threads)
    sgemm = sgemm_gflops(threads)
    print(f"conv2d + ReLU forward: threads={threads} dtype={np.dtype(DTYPE).name} "
          f"repeat={repeat}; sgemm {sgemm:.0f} GFLOP/s in this run")  # fmt: skip
    print(f"{'shape':34} {'fused ms':>9} {'%sgemm':>6} {'conv,relu ms':>12} {'torch ms':>9} "
          f"{'conv,relu/fused':>15} {'torch/fused':>11}")  # fmt: skip
    for shape, ms, pct in _fused_rows(relu_calls, "fwd", sgemm, repeat):
        print(f"{_conv_id(shape):34} {ms['fused']:9.3f} {pct:6.0f} "
              f"{ms['separate']:12.3f} {ms['torch']:9.3f} {ms['separate'] / ms['fused']:15.2f} "
              f"{ms['torch'] / ms['fused']:11.2f}", flush=True)  # fmt: skip


def relu_pool_calls(shape: tuple[int, ...]) -> dict[str, Callable[[], object]]:
    """conv2d + ReLU + 2x2 max pooling, a training forward and its backward, three ways,
    checked to agree: fastrnn in one call (``activation="relu", max_pool=2``), fastrnn's
    convolution with the ReLU fused then max_pool2d (two layers), torch's conv2d, relu and
    max_pool2d under autograd."""
    N, C, H, W, F, k, s, p, _ = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, W)).astype(DTYPE)
    w = (rng.standard_normal((F, C, k, k)) / np.sqrt(C * k * k)).astype(DTYPE)
    b = rng.standard_normal(F).astype(DTYPE)
    kw = dict(stride=s, padding=p)
    y0, _ = fr.conv2d_forward(x, w, b, activation="relu", max_pool=2, **kw)
    dy = rng.standard_normal(y0.shape).astype(DTYPE)
    xt = torch.from_numpy(x).requires_grad_()
    wt, bt = (torch.from_numpy(a).requires_grad_() for a in (w, b))
    dyt = torch.from_numpy(dy)

    def fused():
        y, ctx = fr.conv2d_forward(x, w, b, activation="relu", max_pool=2, **kw)
        return y, fr.conv2d_backward(ctx, dy)

    def separate():
        yc, ctx = fr.conv2d_forward(x, w, b, activation="relu", **kw)
        y, pctx = fr.max_pool2d_forward(yc, 2)
        return y, fr.conv2d_backward(ctx, fr.max_pool2d_backward(pctx, dy))

    def theirs():
        y = tnf.max_pool2d(torch.relu(tnf.conv2d(xt, wt, bt, stride=s, padding=p)), 2)
        return y, torch.autograd.grad(y, (xt, wt, bt), dyt)

    (ya, ga), (yb, gb), (yt, gt) = fused(), separate(), theirs()
    np.testing.assert_array_equal(ya, yb)
    for a, c in zip(ga, gb, strict=True):
        np.testing.assert_array_equal(a, c)
    np.testing.assert_allclose(ya, yt.detach().numpy(), rtol=1e-3, atol=1e-3)
    # db: the sum of dy wherever a window's maximum is positive, whichever tap it is (near-ties
    # may pick another tap than torch's, which moves dx and dw entries, not db)
    assert np.linalg.norm(ga[2] - gt[2].numpy()) <= 1e-3 * np.linalg.norm(gt[2].numpy())
    return {"fused": fused, "separate": separate, "torch": theirs}


def relu_pool_table(threads: int, repeat: int) -> None:
    """relu_pool_calls on the grid's ungrouped layers, interleaved, medians."""
    set_threads(threads)
    sgemm = sgemm_gflops(threads)
    print(f"conv2d + ReLU + 2x2 max pool, forward+backward: threads={threads} "
          f"dtype={np.dtype(DTYPE).name} repeat={repeat}; sgemm {sgemm:.0f} GFLOP/s in this "
          "run (%sgemm: the convolution's forward+backward FLOPs over the fused call's time)")
    print(f"{'shape':34} {'fused ms':>9} {'%sgemm':>6} {'conv+relu,pool ms':>17} "
          f"{'torch ms':>9} {'separate/fused':>14} {'torch/fused':>11}")  # fmt: skip
    for shape, ms, pct in _fused_rows(relu_pool_calls, "fwd+bwd", sgemm, repeat):
        print(f"{_conv_id(shape):34} {ms['fused']:9.3f} {pct:6.0f} "
              f"{ms['separate']:17.3f} "
              f"{ms['torch']:9.3f} {ms['separate'] / ms['fused']:14.2f} "
              f"{ms['torch'] / ms['fused']:11.2f}", flush=True)  # fmt: skip


# The first conv2d_forward of a fresh process, per kind of layer (issue 17: within 10 ms of a
# warm call plus the kernel's own time)
FIRST_CALL_LAYERS = {
    "pointwise (16,32,16x16)->32 1x1": ((16, 32, 16, 16), (32, 32, 1, 1), {}),
    "direct (16,32,16x16)->32 3x3": ((16, 32, 16, 16), (32, 32, 3, 3), {"padding": 1}),
    "winograd (16,64,16x16)->64 3x3": ((16, 64, 16, 16), (64, 64, 3, 3), {"padding": 1}),
    "conv+relu+pool (16,32,16x16)->32": (
        (16, 32, 16, 16), (32, 32, 3, 3), {"padding": 1, "activation": "relu", "max_pool": 2}
    ),
}

_FIRST_CALL = """
import sys, time, numpy as np
import fastrnn as fr
fr.set_num_threads({threads})
rng = np.random.default_rng(0)
x = rng.random({x}, dtype=np.float32)
w = rng.random({w}, dtype=np.float32)
t0 = time.perf_counter(); fr.conv2d_forward(x, w, training=False, **{kw}); t1 = time.perf_counter()
ts = []
for _ in range(30):
    a = time.perf_counter(); fr.conv2d_forward(x, w, training=False, **{kw})
    ts.append(time.perf_counter() - a)
print(1e3 * (t1 - t0), 1e3 * sorted(ts)[15], "scipy.linalg" in sys.modules)
"""


def first_calls(threads: int, processes: int = 5) -> None:
    """Each layer's first forward in ``processes`` fresh processes, against its warm median."""
    import subprocess
    import sys

    print(f"first conv2d_forward of a fresh process (after import fastrnn), training=False, "
          f"threads={threads}, {processes} processes per layer")  # fmt: skip
    for name, (x, w, kw) in FIRST_CALL_LAYERS.items():
        code = _FIRST_CALL.format(threads=threads, x=x, w=w, kw=kw)
        firsts, warms, scipy = [], [], set()
        for _ in range(processes):
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout.split()  # fmt: skip
            firsts.append(float(out[0]))
            warms.append(float(out[1]))
            scipy.add(out[2])
        print(f"{name:34} first {min(firsts):6.1f}-{max(firsts):6.1f} ms "
              f"(median {statistics.median(firsts):5.1f}), warm {statistics.median(warms):7.3f} "
              f"ms, scipy.linalg loaded: {'/'.join(sorted(scipy))}", flush=True)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# fastrnn's forward right after PyTorch's: outputs from reused buffers or fresh ones
# ------------------------------------------------------------------------------------------------


def after_torch(threads: int, repeat: int) -> None:
    """Each layer's forward (``training=False``) with fastrnn's call right after torch's call
    of the same layer, as in a model that mixes the two, torch's output either still alive
    (the layer's input) or dropped just before; each layer in fresh processes: fastrnn's
    outputs from its reused buffers (fastrnn/_cpu/_buffers.py), and with
    FASTRNN_OUTPUT_CACHE_MB=0 (a fresh np.empty per output, what fastrnn did before). Whether a
    fresh output faults in new pages depends on the process's allocation history, hence fresh
    processes that run nothing else. Medians over the processes (alternating) of each one's
    median ms and minor page faults per call."""
    import subprocess
    import sys

    print(f"threads={threads}: fastrnn's forward right after torch's, ms (faults per call), "
          f"{repeat} processes each; pool: outputs from reused buffers (FASTRNN_OUTPUT_CACHE_MB), "
          "fresh: FASTRNN_OUTPUT_CACHE_MB=0 (the default)")  # fmt: skip
    head = f"{'layer':34}"
    for order in ("alive", "dropped"):
        head += f" {order + ': pool':>17} {'fresh':>13} {'ratio':>5}"
    print(head + f" {'torch':>15}")
    for i, shape in enumerate(CONV_SHAPES):
        line = f"{_conv_id(shape):34}"
        for order in ("alive", "dropped"):
            runs: dict[str, list[list[float]]] = {"pool": [], "fresh": []}
            for _ in range(repeat):
                for mode in runs:
                    env = dict(os.environ, FASTRNN_OUTPUT_CACHE_MB="0")
                    if mode == "pool":
                        env["FASTRNN_OUTPUT_CACHE_MB"] = os.environ.get(
                            "FASTRNN_OUTPUT_CACHE_MB", "256")
                    cmd = [sys.executable, __file__, "--after-torch-layer", f"{i},{order}",
                           "--threads", str(threads)]  # fmt: skip
                    out = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                         check=True)  # fmt: skip
                    runs[mode].append([float(v) for v in out.stdout.split()])
            med = {m: [statistics.median(r[k] for r in runs[m]) for k in range(4)] for m in runs}
            line += f" {med['pool'][0]:9.2f} ({med['pool'][1]:4.0f})"
            line += f" {med['fresh'][0]:6.2f} ({med['fresh'][1]:4.0f})"
            line += f" {med['fresh'][0] / med['pool'][0]:5.2f}"
        print(line + f" {med['pool'][2]:6.2f} ({med['pool'][3]:5.0f})", flush=True)


def after_torch_layer(spec: str, threads: int, calls: int = 25) -> None:
    """One process of :func:`after_torch` (spec: the layer's index in CONV_SHAPES and
    "alive" or "dropped"): prints fastrnn's median ms and faults per call, then torch's, over
    ``calls`` pairs after 5 untimed ones."""
    index, order = spec.split(",")
    set_threads(threads)
    N, C, H, W, F, k, s, p, g = CONV_SHAPES[int(index)]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, W), dtype=np.float32)
    w = rng.standard_normal((F, C // g, k, k), dtype=np.float32)
    w /= np.float32(np.sqrt(C // g * k * k))
    b = rng.standard_normal(F, dtype=np.float32)
    xt, wt, bt = (torch.from_numpy(a) for a in (x, w, b))
    rows = []
    for _ in range(calls + 5):
        f0 = minor_faults()
        t0 = time.perf_counter()
        with torch.no_grad():
            held = tnf.conv2d(xt, wt, bt, stride=s, padding=p, groups=g)
        theirs = (1e3 * (time.perf_counter() - t0), minor_faults() - f0)
        if order == "dropped":  # (its release, e.g. an munmap, in neither side's time)
            held = None
        f1 = minor_faults()
        t1 = time.perf_counter()
        out, _ = fr.conv2d_forward(x, w, b, stride=s, padding=p, groups=g, training=False)
        t2 = time.perf_counter()
        rows.append((1e3 * (t2 - t1), minor_faults() - f1, *theirs))
        del held, out
    print(*(statistics.median(r[k] for r in rows[5:]) for k in range(4)))


# ------------------------------------------------------------------------------------------------
# PyTorch's examples/mnist network, with torch.nn's or fastrnn.torch's Conv2d and MaxPool2d
# ------------------------------------------------------------------------------------------------


def mnist_net(layers) -> object:
    """examples/mnist's Net: conv 1->32, conv 32->64 (3x3), max pool 2, dropout, 9216->128->10.
    ``layers`` provides Conv2d and MaxPool2d (torch.nn or fastrnn.torch)."""
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = layers.Conv2d(1, 32, 3, 1)
            self.conv2 = layers.Conv2d(32, 64, 3, 1)
            self.pool = layers.MaxPool2d(2)
            self.dropout1 = nn.Dropout(0.25)
            self.dropout2 = nn.Dropout(0.5)
            self.fc1 = nn.Linear(9216, 128)
            self.fc2 = nn.Linear(128, 10)

        def forward(self, x):
            x = torch.relu(self.conv1(x))
            x = self.pool(torch.relu(self.conv2(x)))
            x = torch.flatten(self.dropout1(x), 1)
            x = self.dropout2(torch.relu(self.fc1(x)))
            return torch.log_softmax(self.fc2(x), dim=1)

    return Net()


def _training_steps(nets: dict[str, Any], x: Any, t: Any) -> dict[str, Callable[[], None]]:
    """examples/mnist's training step (zero_grad, NLL loss, backward, Adadelta at lr 1) for
    each network, each run once (its first call's costs out of the timings)."""
    steps = {}
    for name, net in nets.items():
        opt = torch.optim.Adadelta(net.parameters(), lr=1.0)

        def step(net=net, opt=opt):
            opt.zero_grad()
            tnf.nll_loss(net(x), t).backward()
            opt.step()

        step()
        steps[name] = step
    return steps


def mnist(threads: int, repeat: int, batch: int = 64) -> None:
    """Training steps (forward, NLL loss, backward, Adadelta step as in examples/mnist) of the
    two networks, interleaved; prints medians and torch's time over fastrnn's."""
    import fastrnn.torch as frt

    set_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(batch, 1, 28, 28)
    t = torch.randint(0, 10, (batch,))
    nets = {}
    for name, layers in (("torch", torch.nn), ("fastrnn", frt), ("fused", frt)):
        torch.manual_seed(1)
        net = mnist_net(layers)
        # conv1 + ReLU, and conv2 + ReLU + max pooling, as single operators
        nets[name] = frt.fuse(net) if name == "fused" else net
    steps = _training_steps(nets, x, t)
    times = _rounds(steps, repeat)
    ms = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"mnist training step, batch {batch}, threads={threads}: torch {ms['torch']:.2f} ms, "
        f"fastrnn.torch Conv2d/MaxPool2d {ms['fastrnn']:.2f} ms, "
        f"torch/fastrnn {ms['torch'] / ms['fastrnn']:.2f}; with fastrnn.torch.fuse "
        f"{ms['fused']:.2f} ms, torch/fused {ms['torch'] / ms['fused']:.2f}"
    )
    # the same ratios round by round (the three steps of a round meet the same load): their
    # median and range, robust to the machine's speed drifting between rounds
    for k in ("fastrnn", "fused"):
        r = _round_ratios(times, "torch", k)
        print(f"  torch/{k} per round ({repeat} rounds): median {statistics.median(r):.2f}, "
              f"range {r[0]:.2f}-{r[-1]:.2f}")  # fmt: skip


def mnist_example(path: str, threads: int, repeat: int, batch: int = 64) -> None:
    """PyTorch's own examples/mnist ``Net``, its class source read from ``path`` (that example's
    main.py, which this repository does not carry): once with torch.nn's Conv2d, once with
    fastrnn.torch's Conv2d and ``fastrnn.torch.fuse``, the same weights. Checks the outputs and
    gradients agree, then times training steps (nll_loss, Adadelta) interleaved."""
    import types

    import fastrnn.torch as frt

    text = open(path).read()
    start = text.index("class Net(nn.Module):")
    end = text.find("\n\n\n", start)  # the class ends at the first two blank lines
    source = text[start:end if end > 0 else len(text)]
    set_threads(threads)

    def make(conv):
        nn = types.SimpleNamespace(**{k: getattr(torch.nn, k) for k in dir(torch.nn)
                                      if not k.startswith("_")})  # fmt: skip
        nn.Conv2d = conv
        namespace = {"nn": nn, "F": tnf, "torch": torch}
        exec(source, namespace)  # the example's class as written
        return namespace["Net"]()

    torch.manual_seed(1)
    theirs, ours = make(torch.nn.Conv2d), make(frt.Conv2d)
    ours.load_state_dict(theirs.state_dict())
    fused = frt.fuse(ours)
    pooled = sum(n.target is frt.modules.conv2d_max_pool for n in fused.graph.nodes)
    x = torch.randn(batch, 1, 28, 28)
    t = torch.randint(0, 10, (batch,))
    torch.manual_seed(3)
    loss_t = tnf.nll_loss(theirs(x), t)
    loss_t.backward()
    torch.manual_seed(3)
    loss_f = tnf.nll_loss(fused(x), t)
    loss_f.backward()
    grad = max(float((a.grad - b.grad).abs().max())
               for a, b in zip(theirs.parameters(), fused.parameters(), strict=True))  # fmt: skip
    print(f"examples/mnist Net from {path}: {pooled} convolution(s) pooling in the kernel; loss "
          f"difference {float((loss_t - loss_f).detach()):.2e}, largest gradient difference "
          f"{grad:.2e}")
    steps = _training_steps({"torch": theirs, "fused": fused}, x, t)
    times = _rounds(steps, repeat)
    r = _round_ratios(times, "torch", "fused")
    print(f"training step, batch {batch}, threads={threads}: torch "
          f"{statistics.median(times['torch']):.2f} ms, fastrnn.torch + fuse "
          f"{statistics.median(times['fused']):.2f} ms; torch/fastrnn per round "
          f"({repeat} rounds): median {statistics.median(r):.2f}, range {r[0]:.2f}-{r[-1]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=fr.get_num_threads())
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--reference", action="store_true", help="also time the reference")
    parser.add_argument("--no-pool", action="store_true", help="convolutions only")
    parser.add_argument(
        "--im2col",
        action="store_true",
        help="also time fastrnn pinned to algorithm='im2col' (the im2col + GEMM kernels)",
    )
    parser.add_argument(
        "--direct",
        action="store_true",
        help="also time fastrnn pinned to algorithm='direct' (what 'auto' ran on 3x3 layers "
        "before Winograd)",
    )
    parser.add_argument(
        "--mnist", action="store_true", help="only PyTorch's examples/mnist training step"
    )
    parser.add_argument(
        "--relu", action="store_true",
        help="only conv2d + ReLU forward: fused (activation='relu') vs separate vs torch",
    )  # fmt: skip
    parser.add_argument(
        "--mnist-example", metavar="MAIN_PY",
        help="only PyTorch's examples/mnist Net as written in that main.py, torch.nn's Conv2d vs "
        "fastrnn.torch's + fuse",
    )
    parser.add_argument(
        "--first-call", action="store_true",
        help="only each kind of layer's first forward in fresh processes, against a warm call",
    )
    parser.add_argument(
        "--relu-pool", action="store_true",
        help="only conv2d + ReLU + 2x2 max pool, forward+backward: one call (max_pool=2) vs "
        "two layers vs torch",
    )  # fmt: skip
    parser.add_argument("--after-torch-layer", help=argparse.SUPPRESS)
    parser.add_argument(
        "--after-torch", action="store_true",
        help="only each layer's forward right after torch's, fastrnn's outputs from reused "
        "buffers vs fresh ones",
    )  # fmt: skip
    args = parser.parse_args()
    if torch is None:
        raise SystemExit("the table compares with PyTorch: install torch")
    if args.mnist:
        mnist(args.threads, args.repeat)
        return
    if args.mnist_example:
        mnist_example(args.mnist_example, args.threads, args.repeat)
        return
    if args.relu:
        relu_table(args.threads, args.repeat)
        return
    if args.relu_pool:
        relu_pool_table(args.threads, args.repeat)
        return
    if args.after_torch_layer is not None:
        after_torch_layer(args.after_torch_layer, args.threads)
        return
    if args.after_torch:
        after_torch(args.threads, args.repeat)
        return
    if args.first_call:
        first_calls(args.threads, max(args.repeat, 3))
        return
    table(args.threads, args.repeat, args.reference, pool=not args.no_pool, im2col=args.im2col,
          direct=args.direct)  # fmt: skip


if __name__ == "__main__":
    main()
