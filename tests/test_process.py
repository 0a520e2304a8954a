"""Process hygiene of the CPU kernels: a forked child can call them (fork, a fork Pool, a
DataLoader with workers), and calls from several Python threads leave the BLAS libraries' thread
settings as they found them. Each case runs in a fresh interpreter with a timeout, since the
failure it guards against is a hang or a process-wide setting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

# Work a kernel runs on 2 OpenMP threads (above the recurrent kernels' MIN_PARALLEL_WORK and
# conv2d's split), made in the parent before any fork.
SETUP = """
import os, sys, threading
import numpy as np
import fastrnn
fastrnn.set_num_threads(2)
rng = np.random.default_rng(0)
T, N, D, H = 6, 64, 128, 256
x = rng.standard_normal((T, N, D)).astype(np.float32)
h0 = np.zeros((N, H), np.float32)
w_ih = (rng.standard_normal((4 * H, D)) * 0.05).astype(np.float32)
w_hh = (rng.standard_normal((4 * H, H)) * 0.05).astype(np.float32)
b = np.zeros(4 * H, np.float32)
xc = rng.standard_normal((8, 16, 20, 20)).astype(np.float32)
wc = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)

def work(_=None):
    y, hT, cT, ctx = fastrnn.lstm_forward(x, h0, h0, w_ih, w_hh, b)
    grads = fastrnn.lstm_backward(ctx, np.ones_like(y))
    yc, cc = fastrnn.conv2d_forward(xc, wc, padding=1)
    dxc = fastrnn.conv2d_backward(cc, yc)[0]
    return float(y.sum() + grads[0].sum() + yc.sum() + dxc.sum())

expected = work()
"""


def _run(body: str, timeout: float = 60) -> str:
    code = SETUP + textwrap.dedent(body)
    # its own session, so that a hung run's forked children are killed with it
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"hung (no exit within {timeout} s)")
    assert proc.returncode == 0, err[-3000:]
    return out


def test_forked_child_runs_kernels_on_two_threads():
    out = _run(
        """
        pid = os.fork()
        if pid == 0:
            code = 0 if (work() == expected and work() == expected) else 3
            sys.stdout.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        print("parent", work() == expected)
        """
    )
    assert "child 0" in out and "parent True" in out


def test_fork_pool():
    out = _run(
        """
        import multiprocessing as mp
        with mp.get_context("fork").Pool(2) as pool:
            got = pool.map(work, range(6))
        print(all(g == expected for g in got))
        """
    )
    assert out.strip() == "True"


def test_fork_of_a_forked_child():
    out = _run(
        """
        pid = os.fork()
        if pid == 0:
            work()
            pid2 = os.fork()
            if pid2 == 0:
                os._exit(0 if work() == expected else 3)
            _, status = os.waitpid(pid2, 0)
            os._exit(os.waitstatus_to_exitcode(status))
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
        """
    )
    assert out.strip() == "0"


def test_dataloader_workers():
    pytest.importorskip("torch")
    out = _run(
        """
        import torch
        from torch.utils.data import DataLoader, Dataset

        class Data(Dataset):
            def __len__(self):
                return 4
            def __getitem__(self, i):
                return torch.tensor(work())

        loader = DataLoader(Data(), batch_size=1, num_workers=2,
                            multiprocessing_context="fork")
        print(all(float(v) == expected for v in loader))
        """,
        timeout=120,
    )
    assert out.strip().endswith("True")


def test_concurrent_calls_leave_blas_threads_unchanged():
    out = _run(
        """
        from threadpoolctl import threadpool_info
        import scipy.linalg  # SciPy's OpenBLAS, the one the kernels call, loaded and listed

        def blas():
            return [(i["filepath"], i["num_threads"]) for i in threadpool_info()
                    if i["user_api"] == "blas"]

        before = blas()
        for trial in range(5):
            threads = [threading.Thread(target=lambda: [work() for _ in range(5)])
                       for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert blas() == before, (trial, before, blas())
        from fastrnn._cpu import _process
        print(_process.pin_depth(), before == blas())
        """,
        timeout=180,
    )
    assert out.split() == ["0", "True"]
