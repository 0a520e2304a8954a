"""Host cost of the CUDA recurrent drivers' time loops, without a GPU.

    python benchmarks/bench_host_loop.py [--T 100] [--N 1] [--H 128] [--repeat 20]

CupyRuntime runs with every device entry point replaced by a Python no-op (cuBLAS GEMM, kernel
call, stream and handle queries; NumPy arrays stand in for device arrays), so what is timed is
fastrnn's own Python per step: building or reusing the calls, argument conversion and packing,
the loop itself. CuPy's and cuBLAS's own host work and the driver's launch cost come on top on a
real GPU. Prints microseconds per time step (forward + backward steps counted separately) for
graphs off (eager) and on (after the capture: one replay per loop).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import types
from typing import Any

import numpy as np

from fastrnn._cuda import _runtime, recurrent


class _NoopStream:
    ptr = 0

    def __enter__(self) -> _NoopStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def begin_capture(self, mode: Any = None) -> None:
        return None

    def end_capture(self) -> Any:
        return types.SimpleNamespace(launch=lambda stream=None: None)


def _noop(*args: Any) -> None:
    return None


def _fake_cupy() -> Any:
    stream = _NoopStream()
    cuda = types.SimpleNamespace(
        device=types.SimpleNamespace(
            get_cublas_handle=lambda: 0x1234, get_compute_capability=lambda: "90"
        ),
        runtime=types.SimpleNamespace(getDevice=lambda: 0, malloc=lambda n: 4096, free=_noop),
        get_current_stream=lambda: stream,
        Stream=lambda non_blocking=False: _NoopStream(),
    )
    return types.SimpleNamespace(cuda=cuda)


def _fake_cublas() -> Any:
    return types.SimpleNamespace(
        CUBLAS_POINTER_MODE_HOST=0,
        getPointerMode=lambda h: 0,
        setPointerMode=_noop,
        getStream=lambda h: 0,
        setStream=_noop,
        sgemm=lambda *a: None,
        dgemm=lambda *a: None,
        sgemmStridedBatched=lambda *a: None,
        dgemmStridedBatched=lambda *a: None,
    )


def _noop_kernel(grid: Any, block: Any, args: Any) -> None:
    return None


class NoopRuntime(_runtime.CupyRuntime):
    """CupyRuntime with no device behind it (see the module docstring)."""

    def __init__(self) -> None:
        try:
            from cupy.cuda import function
        except ImportError:
            function = types.SimpleNamespace(CIntptr=int, CNumpyArray=lambda a: a)
        f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
        direct = types.SimpleNamespace(
            gemm={f32: _noop, f64: _noop},
            gemm_batched={f32: _noop, f64: _noop},
            set_stream=_noop,
            set_workspace=_noop,
        )
        self._setup(_fake_cupy(), _fake_cublas(), function, direct,
                    lambda key, ctype, device_id: _noop_kernel)  # fmt: skip
        self.xp = np

    def device_of(self, a: Any) -> Any:
        return contextlib.nullcontext()

    def to_device(self, host: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(host)

    def ptr(self, a: Any) -> int:
        return a.ctypes.data


def measure(T: int, N: int, H: int, repeat: int, graphs: bool) -> float:
    """Median microseconds per time step of lstm forward + backward (2T steps)."""
    rt = NoopRuntime()
    rt.graphs = graphs
    rng = np.random.default_rng(0)
    f32 = np.float32
    x = rng.standard_normal((T, N, H)).astype(f32)
    h0 = np.zeros((N, H), f32)
    c0 = np.zeros((N, H), f32)
    w_ih = rng.standard_normal((4 * H, H)).astype(f32)
    w_hh = rng.standard_normal((4 * H, H)).astype(f32)
    b = np.zeros(4 * H, f32)
    dy = np.zeros((T, N, H), f32)
    times = []
    with _runtime.use_runtime(rt):
        # The same arrays every call, as CuPy's pool gives them: patch the allocations.
        pool: dict[tuple, np.ndarray] = {}
        calls = [0]

        def empty(shape: Any, dtype: Any = np.float64) -> np.ndarray:
            key = (calls[0], tuple(np.atleast_1d(shape)), np.dtype(dtype).char)
            calls[0] += 1
            a = pool.get(key)
            if a is None:
                a = pool[key] = np.empty(shape, dtype)
            return a

        xp = types.SimpleNamespace(
            empty=empty,
            zeros=lambda s, dtype=np.float64: empty(s, dtype),
            ones=lambda s, dtype=np.float64: empty(s, dtype),
            full=lambda s, v, dtype=None: empty(s, dtype),
        )
        rt.xp = xp
        for i in range(repeat + 3):
            calls[0] = 0
            t0 = time.perf_counter()
            *_, ctx = recurrent.lstm_forward(x, h0, c0, w_ih, w_hh, b, None, True)
            recurrent.lstm_backward(ctx, dy, None, None)
            if i >= 3:
                times.append(time.perf_counter() - t0)
    return statistics.median(times) / (2 * T) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=100)
    p.add_argument("--N", type=int, default=1)
    p.add_argument("--H", type=int, default=128)
    p.add_argument("--repeat", type=int, default=20)
    a = p.parse_args()
    for graphs in (False, True):
        us = measure(a.T, a.N, a.H, a.repeat, graphs)
        mode = "graphs" if graphs else "eager"
        print(f"lstm T={a.T} N={a.N} H={a.H} {mode:>6}: {us:7.2f} us of fastrnn Python per step")


if __name__ == "__main__":
    main()
