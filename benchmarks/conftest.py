"""Fixtures shared by the benchmark suites (outside the default test run: testpaths = tests)."""

from __future__ import annotations

import os

import pytest

import fastrnn as fr


@pytest.fixture(scope="session")
def bench_threads() -> int:
    """Threads for every implementation: FASTRNN_BENCH_THREADS, else fastrnn's default."""
    env = os.environ.get("FASTRNN_BENCH_THREADS", "").strip()
    return int(env) if env else fr.get_num_threads()


@pytest.fixture(scope="session")
def sgemm_rate(bench_threads: int) -> float:
    """This machine's sgemm GFLOP/s on the benchmark's threads, measured once per run."""
    from fastrnn._bench import sgemm_gflops

    return sgemm_gflops(bench_threads)
