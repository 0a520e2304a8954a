"""LSTM, GRU and Elman RNN: fastrnn's CPU kernels vs the NumPy reference vs torch.nn.LSTM / GRU /
RNN, float32, time-major, one layer.

Outside the default test run (pytest collects tests/ only). Two ways to run it:

    python -m pytest benchmarks/bench_recurrent.py --benchmark-only --benchmark-group-by=group
    python -m fastrnn._bench --threads 2 --rounds 5 [--strategies]

The pytest-benchmark suite puts fastrnn, the reference and PyTorch of one op, shape and pass in
one group, with threads, dtype, shape, GFLOP/s and the percentage of this machine's sgemm rate
(measured in the same run, group "sgemm") in ``extra_info``. The script form interleaves the
implementations round by round and prints medians and PyTorch's time over fastrnn's (above 1:
fastrnn is faster); on a shared machine that is the number to quote.

Shapes: the single-step inference call (T,N,D,H) = (1,1,128,128) (forward, training=False);
forward+backward at (35,20,200,200), (64,32,192,192), (100,1,128,128), (200,32,64,64),
(100,16,256,256), (100,64,512,512); and forward+backward with variable lengths (uniform in
[T/4, T], about 0.63 T on average) at (100,16,256,256), where PyTorch runs its PackedSequence
path (pack_padded_sequence, unsorted).
Threads: FASTRNN_BENCH_THREADS (default fastrnn.get_num_threads()); fastrnn, PyTorch and the
BLAS pools are all set explicitly (fastrnn and PyTorch share libgomp: FACTS.md).
FLOPs: the GEMM work, forward 2 T N (D + H) G H (G = 4, 3, 1), forward+backward three times;
with lengths, sum(lengths) instead of T N.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastrnn as fr
from fastrnn._bench import (
    INFERENCE_SHAPES,
    LENGTHS_SHAPES,
    RUNNERS,
    TRAINING_SHAPES,
    bench_lengths,
    make_inputs,
    recurrent_flops,
    sgemm_gflops,
    threads,
    time_call,
    torch_available,
)

CASES = (
    [("fwd", s) for s in INFERENCE_SHAPES]
    + [("fwd+bwd", s) for s in TRAINING_SHAPES]
    + [("fwd+bwd-lengths", s) for s in LENGTHS_SHAPES]
)
IMPLS = ["fastrnn", "numpy", "torch"]


def _first_output(result):
    """y from a runner's result: fastrnn/numpy forward tuples, torch (y, state) or y."""
    if isinstance(result, tuple):
        result = result[0]
    if hasattr(result, "detach"):
        return result.detach().numpy()
    return np.asarray(result)


def _check_against_reference(op: str, a: dict, impl: str, lengths=None) -> None:
    """Correctness first: the forward output matches the float64 reference."""
    names = {
        "lstm": ("x", "h0", "c0", "w_ih", "w_hh", "b"),
        "gru": ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"),
        "rnn": ("x", "h0", "w_ih", "w_hh", "b"),
    }[op]
    with fr.use_backend("numpy"):
        want = getattr(fr, f"{op}_forward")(
            *(a[k].astype(np.float64) for k in names), lengths=lengths, training=False
        )[0]
    got = _first_output(RUNNERS[impl](op, a, "fwd", lengths)())
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4, err_msg=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "passes,shape", CASES, ids=[f"{p}-{'x'.join(map(str, s))}" for p, s in CASES]
)
@pytest.mark.parametrize("op", ["lstm", "gru", "rnn"])
def test_recurrent(benchmark, op, passes, shape, impl, bench_threads, sgemm_rate):
    if impl == "torch" and not torch_available():
        pytest.skip("PyTorch is not installed")
    T, N, D, H = shape
    a = make_inputs(op, T, N, D, H, np.float32)
    lengths = bench_lengths(T, N) if passes.endswith("lengths") else None
    run_passes = "fwd" if passes == "fwd" else "fwd+bwd"
    with threads(bench_threads):
        if impl != "numpy" or T * N * H * H < 1e8:
            _check_against_reference(op, a, impl, lengths)
        fn = RUNNERS[impl](op, a, run_passes, lengths)
        benchmark.group = f"{op} {passes} T,N,D,H={T},{N},{D},{H}"
        if impl == "numpy" and T * N * H * H > 1e8:  # the reference takes seconds per call
            benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
        else:
            benchmark(fn)
    median = benchmark.stats.stats.median
    flops = recurrent_flops(op, T, N, D, H, run_passes)
    if lengths is not None:
        flops *= float(np.mean(lengths)) / T
    gflops = flops / median / 1e9
    benchmark.extra_info.update(
        impl=impl,
        op=op,
        passes=passes,
        shape=list(shape),
        mean_length=None if lengths is None else float(np.mean(lengths)),
        dtype="float32",
        threads=bench_threads,
        gflops=round(gflops, 2),
        sgemm_gflops=round(sgemm_rate, 1),
        percent_of_sgemm=round(100 * gflops / sgemm_rate, 1),
    )


def test_sgemm_rate(benchmark, bench_threads):
    """This machine's float32 GEMM rate on the same threads: (2048 x 2048) @ (2048 x 2048)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2048, 2048)).astype(np.float32)
    b = rng.standard_normal((2048, 2048)).astype(np.float32)
    c = np.empty_like(a)
    with threads(bench_threads):
        benchmark.group = "sgemm"
        benchmark(np.matmul, a, b, out=c)
    benchmark.extra_info.update(
        threads=bench_threads,
        gflops=round(2 * 2048**3 / benchmark.stats.stats.median / 1e9, 1),
        gflops_helper=round(sgemm_gflops(bench_threads), 1),
    )


def test_timing_helper_runs():
    """fastrnn._bench.time_call / time_recurrent's building block works on a tiny call."""
    a = make_inputs("rnn", 2, 1, 3, 4)
    samples = time_call(RUNNERS["fastrnn"]("rnn", a, "fwd+bwd"), repeat=2)
    assert len(samples) == 2 and all(s > 0 for s in samples)
