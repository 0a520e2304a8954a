"""Data-parallel training of a fastrnn model across processes, through PyTorch's engine.

fastrnn's kernels run inside ``torch.autograd`` through :mod:`fastrnn.torch`, so everything
PyTorch builds on autograd works on them unchanged, ``DistributedDataParallel`` (DDP) included:
each process runs the model on its share of the batch, DDP all-reduces (averages) the gradients
during the backward pass, and every process takes the same optimizer step. This is how a
fastrnn model scales past one process, and past one machine (point ``MASTER_ADDR`` at the first
machine and start the same script on every machine with its own ranks).

Here: a 2-layer ``fastrnn.torch.LSTM`` with a linear head learns a sequence regression
(the target is a running sum of the first input feature) with plain SGD. ``--world-size`` CPU
processes (``torch.distributed``'s gloo backend, localhost) each train on ``1/world_size`` of
every batch; the script then trains the same model on the whole batch in one process and
prints how far the parameters are apart (float64: rounding only, ~1e-15)::

    python -m fastrnn.examples.distributed_lstm --world-size 2 --steps 60

Three things matter when combining OpenMP kernels with multiprocessing:

* the workers are started with ``spawn``, never ``fork``: a process forked after OpenMP has run
  can hang in its first parallel region;
* each worker uses 1 thread (``torch.set_num_threads(1)`` and ``fastrnn.set_num_threads(1)``)
  so that ``world_size`` workers do not oversubscribe the cores;
* the loss is a mean over the local batch: DDP averages the local gradients, which equals the
  gradient of the mean over the whole batch when every worker holds the same number of samples.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import fastrnn
import fastrnn.torch as ft

T, D, H = 12, 3, 16  # steps, input features, hidden units


class SequenceRegressor(nn.Module):
    """fastrnn LSTM (2 layers) -> linear head on the last step."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.lstm = ft.LSTM(D, H, num_layers=2, dtype=dtype)
        self.head = nn.Linear(H, 1, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(x)  # x (T, N, D) time-major
        return self.head(y[-1])


def make_model(seed: int, dtype: torch.dtype) -> SequenceRegressor:
    """The same initial weights in every process (DDP also broadcasts rank 0's)."""
    torch.manual_seed(seed)
    return SequenceRegressor(dtype)


def make_batch(step: int, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch number ``step`` of the whole (global) batch: x (T, batch, D), target (batch, 1)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(T, batch, D, generator=g, dtype=dtype)
    target = x[:, :, :1].sum(0) / T**0.5
    return x, target


def train(
    model: nn.Module, steps: int, batch: int, lr: float, dtype: torch.dtype, rank: int, world: int
) -> list[float]:
    """SGD on this process's share (``rank`` of ``world`` equal slices) of every batch."""
    if batch % world:
        raise ValueError(f"batch: {batch} does not split into {world} equal shares")
    share = slice(rank * batch // world, (rank + 1) * batch // world)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        x, target = make_batch(step, batch, dtype)
        opt.zero_grad()
        loss = F.mse_loss(model(x[:, share].contiguous()), target[share])  # mean over the share
        loss.backward()  # under DDP: gradients averaged across processes here
        opt.step()
        losses.append(loss.item())
    return losses


def parameters_of(model: nn.Module) -> dict[str, np.ndarray]:
    return {n: p.detach().cpu().numpy().copy() for n, p in model.named_parameters()}


def _single_thread() -> None:
    torch.set_num_threads(1)
    fastrnn.set_num_threads(1)


def worker(
    rank: int, world: int, port: int, steps: int, batch: int, lr: float, dtype: str, out_dir: str
) -> None:
    """One DDP process: trains on its share and saves its final parameters and losses to
    ``out_dir/rank{rank}.npz``. Started by :func:`run_distributed` (spawn)."""
    _single_thread()
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dt = getattr(torch, dtype)
        model = DistributedDataParallel(make_model(0, dt))
        losses = train(model, steps, batch, lr, dt, rank, world)
        params = parameters_of(model.module)
        tmp = os.path.join(out_dir, f"rank{rank}.tmp.npz")
        np.savez(tmp, losses=np.asarray(losses), **{f"param:{k}": v for k, v in params.items()})
        os.replace(tmp, os.path.join(out_dir, f"rank{rank}.npz"))
    finally:
        dist.destroy_process_group()
    # The work is done and saved: end the process here. Left to the interpreter's normal exit,
    # the teardown of PyTorch's C++ state (gloo's and the thread pools' threads) aborted about
    # one worker in three with "terminate called without an active exception" (exit code -6)
    # when the output went to a pipe.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(
    world: int = 2,
    steps: int = 5,
    batch: int = 8,
    lr: float = 0.1,
    dtype: str = "float64",
    timeout: float = 240.0,
) -> list[dict[str, Any]]:
    """Train with ``world`` spawned processes; returns each rank's {"losses", "params"}.

    Raises RuntimeError when a worker fails or the run exceeds ``timeout`` seconds (the
    workers are then terminated).
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # never fork after OpenMP has run
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [
            ctx.Process(target=worker, args=(rank, world, port, steps, batch, lr, dtype, out_dir))
            for rank in range(world)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
        finally:
            alive = [p for p in procs if p.is_alive()]
            for p in alive:
                p.terminate()
            for p in alive:
                p.join(10)
        if alive:
            raise RuntimeError(f"distributed training did not finish within {timeout:.0f} s")
        codes = [p.exitcode for p in procs]
        if any(codes):
            raise RuntimeError(f"a worker failed (exit codes {codes})")
        results = []
        for rank in range(world):
            with np.load(os.path.join(out_dir, f"rank{rank}.npz")) as f:
                params = {k[6:]: f[k] for k in f.files if k.startswith("param:")}
                results.append({"losses": f["losses"], "params": params})
        return results


def run_single(
    steps: int = 5, batch: int = 8, lr: float = 0.1, dtype: str = "float64"
) -> dict[str, Any]:
    """The same training in this process on the whole batch."""
    dt = getattr(torch, dtype)
    model = make_model(0, dt)
    losses = train(model, steps, batch, lr, dt, 0, 1)
    return {"losses": np.asarray(losses), "params": parameters_of(model)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--steps", type=int, default=60, help="SGD steps (default 60)")
    parser.add_argument("--batch", type=int, default=16, help="global batch (default 16)")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate (default 0.1)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    results = run_distributed(args.world_size, args.steps, args.batch, args.lr, args.dtype)
    took = time.perf_counter() - start
    _single_thread()
    single = run_single(args.steps, args.batch, args.lr, args.dtype)
    print(f"{args.world_size} processes, {args.steps} steps in {took:.1f} s (with start-up)")
    k = min(5, args.steps)
    for name, r in (("rank 0, its share", results[0]), ("one process, whole batch", single)):
        first, last = np.mean(r["losses"][:k]), np.mean(r["losses"][-k:])
        print(f"{name:>26}: mean loss of the first {k} steps {first:.4f}, last {k} {last:.4f}")
    diff = max(
        float(np.max(np.abs(r["params"][k] - single["params"][k])))
        for r in results
        for k in single["params"]
    )
    print(f"max |parameter difference| vs one process on the whole batch: {diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
