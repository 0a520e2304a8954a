"""Streaming inference: a prepared layer's step (fastrnn.lstm_inference etc.) vs
``lstm_forward(training=False)`` on one step vs torch.nn under ``no_grad``, float32, 1 thread.

    python -m pytest benchmarks/bench_inference.py --benchmark-only --benchmark-group-by=group
    fastrnn bench --inference            # the same grid, interleaved rounds, medians, ratios

On a shared machine quote the second: its implementations alternate round by round.
"""

from __future__ import annotations

import pytest

from fastrnn._bench import threads, torch_available
from fastrnn._inference_bench import STEP_GRID, step_callables


@pytest.mark.parametrize("impl", ["prepared", "forward", "torch"])
@pytest.mark.parametrize("op,N,H", STEP_GRID, ids=[f"{o}-N{n}-H{h}" for o, n, h in STEP_GRID])
def test_step(benchmark, op, N, H, impl):
    if impl == "torch" and not torch_available():
        pytest.skip("torch is not installed")
    with threads(1):
        fn = step_callables(op, N, H, use_torch=impl == "torch")[impl]
        benchmark.group = f"step {op} N={N} H={H}"
        benchmark.extra_info.update(op=op, N=N, H=H, D=H, threads=1, dtype="float32")
        benchmark(fn)
