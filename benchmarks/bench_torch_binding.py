"""fastrnn.torch.LSTM inside PyTorch: a training step vs torch.nn.LSTM, and the binding's cost.

Outside the default test run (pytest collects tests/ only). Two ways to run it:

    python -m pytest benchmarks/bench_torch_binding.py --benchmark-only --benchmark-group-by=group
    python benchmarks/bench_torch_binding.py [--threads 2] [--reps 30] [--compile] [--jax]

Comparisons per shape (T, N, D, H), float32, time-major, one layer:

* ``train step``: ``torch.nn.LSTM`` vs ``fastrnn.torch.LSTM`` (same weights) in a whole training
  step: zero_grad, forward, a loss on every output (mean squared error against a fixed target),
  backward, SGD step.
* ``binding overhead``: ``fastrnn.torch.LSTM`` forward + ``y.backward(dy)`` vs the bare kernel,
  ``fastrnn.lstm_forward`` + ``fastrnn.lstm_backward`` on NumPy views of the same tensors with
  the same ``dy``. The difference is everything the binding adds: the module's Python and
  torch.nn's argument checks, the ``fastrnn::lstm`` operator's autograd, the context handle,
  zero initial states, the ``b_ih + b_hh`` sum, tensor <-> array wrapping, the per-call thread
  count, handing the gradients to autograd. The target (issue 11): within 3% at (35,20,200,200)
  as at (100,16,256,256).
  Parameter gradients are reset to None before each call (``zero_grad(set_to_none=True)``) so
  autograd adopts the kernel's gradient arrays instead of adding them into old ones; the bare
  call likewise keeps its weight gradients until its next call, as an optimizer needs them.
  (Without that, the two calls free memory in different orders, and glibc's heap trimming
  gives the one that frees the top of the heap thousands of page faults per call: ~2800 at
  (200,32,64,64), a few ms that belong to the allocator, not to either call.)
* ``compiled`` (``--compile``): the same training step of ``fastrnn.torch.LSTM`` eager and
  under ``torch.compile(fullgraph=True)`` (inductor; ``torch._dynamo.config.allow_rnn``), after
  one compiling call whose time is reported separately.
* ``floor`` (``--floor``): the bare kernels vs the least a binding can be (``_Floor``: an
  autograd.Function on NumPy views, nothing else), the share of the overhead no binding code
  can remove (benchmarks/NOTES-torch.md, "The binding's cost").
* ``old binding`` (``--old-binding REV``): ``fastrnn.torch.LSTM`` forward + backward against
  the same module of the binding at git commit REV (4b59a68: the autograd.Function binding
  that the torch.library operators replaced), on today's kernels: what the operators cost.
* ``jax`` (``--jax``): ``jax.jit(jax.grad(...))`` of ``fastrnn.jax.lstm`` (forward + backward
  through ``jax.pure_callback``) vs the bare kernels on NumPy arrays, same ``dy``.

Calls are checked for agreement before they are timed. The script alternates the two calls of a
comparison call by call and reports medians and minima, and each ratio as the median of the
per-round ratios, so that load from other processes on a shared machine hits both alike.
Threads: ``--threads`` / ``FASTRNN_BENCH_THREADS``,
default ``fastrnn.get_num_threads()``, set for both fastrnn and PyTorch (they share libgomp).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
import pytest

import fastrnn as fr

torch = pytest.importorskip("torch")

import fastrnn.torch as ft  # noqa: E402

# PyTorch's word-language-model layer, a wide one, a long narrow one, batch 1, and a tiny one
# where only the overhead shows
SHAPES = [(35, 20, 200, 200), (100, 16, 256, 256), (200, 32, 64, 64), (100, 1, 128, 128),
          (1, 1, 8, 8)]  # fmt: skip
DTYPE = torch.float32


def bench_threads() -> int:
    env = os.environ.get("FASTRNN_BENCH_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else fr.get_num_threads()


def set_threads(n: int) -> None:
    fr.set_num_threads(n)
    torch.set_num_threads(n)


def lstm_flops(shape: tuple[int, int, int, int], passes: str = "fwd+bwd") -> float:
    """GEMM FLOPs: forward 2*T*N*4H*(D+H); backward twice that (input and weight gradients)."""
    T, N, D, H = shape
    fwd = 2.0 * T * N * 4 * H * (D + H)
    return fwd if passes == "fwd" else 3 * fwd


def _twins(shape):
    T, N, D, H = shape
    torch.manual_seed(0)
    ours = ft.LSTM(D, H, dtype=DTYPE)
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(D, H, dtype=DTYPE)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, N, D, generator=g, dtype=DTYPE)
    target = torch.randn(T, N, H, generator=g, dtype=DTYPE)
    return ours, theirs, x, target


def train_step_calls(shape) -> dict[str, Callable[[], float]]:
    """One SGD training step each, on twin modules; checked to give the same first loss."""
    ours, theirs, x, target = _twins(shape)
    calls = {}
    for name, model in (("fastrnn.torch", ours), ("torch.nn", theirs)):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt) -> float:
            opt.zero_grad(set_to_none=True)
            y, _ = model(x)
            loss = torch.nn.functional.mse_loss(y, target)
            loss.backward()
            opt.step()
            return loss.item()

        calls[name] = step
    first = {k: c() for k, c in calls.items()}
    np.testing.assert_allclose(first["fastrnn.torch"], first["torch.nn"], rtol=1e-4)
    return calls


def overhead_calls(shape) -> dict[str, Callable[[], object]]:
    """fastrnn.torch.LSTM forward+backward vs the bare kernel on the same memory."""
    T, N, D, H = shape
    ours, _, x, _ = _twins(shape)
    dy = torch.randn(T, N, H, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    params = list(ours.parameters())

    def binding():
        for p in params:
            p.grad = None
        y, _ = ours(x)
        y.backward(dy)
        return y

    xa = x.numpy()
    w_ih = ours.weight_ih_l0.detach().numpy()
    w_hh = ours.weight_hh_l0.detach().numpy()
    b = (ours.bias_ih_l0 + ours.bias_hh_l0).detach().numpy()
    h0 = np.zeros((N, H), np.float32)
    dya = dy.numpy()

    held: list[np.ndarray] = []  # the weight gradients, kept until the next call

    def bare():
        held.clear()  # what p.grad = None does in the binding's call
        y, _, _, ctx = fr.lstm_forward(xa, h0, h0, w_ih, w_hh, b)
        held.extend(fr.lstm_backward(ctx, dya)[3:])
        return y

    yb = binding().detach().numpy()
    np.testing.assert_allclose(yb, bare(), rtol=1e-5, atol=1e-6)
    assert ours.weight_hh_l0.grad is not None
    return {"bare kernel": bare, "fastrnn.torch": binding}


class _Floor(torch.autograd.Function):
    """The least an autograd binding of the kernels can do: no module, no checks, no context
    handle, no thread count, no initial states as inputs; the kernels on NumPy views."""

    @staticmethod
    def forward(ctx, x, w_ih, w_hh, b_ih, b_hh):
        h0 = np.zeros((x.shape[1], w_hh.shape[1]), np.float32)
        b = b_ih.detach().numpy() + b_hh.detach().numpy()
        y, _, _, ctx.fr_ctx = fr.lstm_forward(
            x.numpy(), h0, h0, w_ih.detach().numpy(), w_hh.detach().numpy(), b
        )
        return torch.from_numpy(y)

    @staticmethod
    def backward(ctx, dy):
        dx, _, _, dw_ih, dw_hh, db = fr.lstm_backward(ctx.fr_ctx, dy.numpy())
        db = torch.from_numpy(db)
        return (torch.from_numpy(dx), torch.from_numpy(dw_ih), torch.from_numpy(dw_hh), db,
                db.clone())  # fmt: skip


def floor_calls(shape) -> dict[str, Callable[[], object]]:
    """The bare kernels vs the minimal autograd.Function around them (``_Floor``): what any
    Python binding pays at this shape, whatever its own code."""
    calls = overhead_calls(shape)
    ours = _twins(shape)[0]
    T, N, D, H = shape
    x = torch.randn(T, N, D, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    dy = torch.randn(T, N, H, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    params = list(ours.parameters())

    def floor():
        for p in params:
            p.grad = None
        y = _Floor.apply(x, *params)
        y.backward(dy)
        return y

    return {"bare kernel": calls["bare kernel"], "minimal Function": floor}


def _binding_at(rev: str):
    """``fastrnn/torch.py`` as it was at commit ``rev`` (4b59a68: the autograd.Function binding
    that the torch.library operators replaced), imported under a name of its own, on today's
    kernels. Needs the repository's git history."""
    import importlib.util
    import subprocess
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "show", f"{rev}:fastrnn/torch.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "fastrnn_binding_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("fastrnn_binding_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def old_binding_calls(shape, rev: str) -> dict[str, Callable[[], object]]:
    """Forward + ``y.backward(dy)`` of the LSTM of the binding at ``rev`` and of today's, same
    weights and input (which requires grad, as a stacked layer's), checked to agree."""
    T, N, D, H = shape
    old = _binding_at(rev)
    ours = _twins(shape)[0]
    theirs = old.LSTM(D, H, dtype=DTYPE)
    theirs.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, N, D, generator=g, dtype=DTYPE, requires_grad=True)
    dy = torch.randn(T, N, H, generator=g, dtype=DTYPE)
    calls = {}
    for name, model in ((f"binding at {rev}", theirs), ("fastrnn.torch", ours)):
        params = list(model.parameters())

        def call(model=model, params=params):
            for p in params:
                p.grad = None
            x.grad = None
            y, _ = model(x)
            y.backward(dy)
            return x.grad

        calls[name] = call
    a, b = (c() for c in calls.values())
    torch.testing.assert_close(a, b)
    return calls


def compile_calls(shape) -> tuple[dict[str, Callable[[], float]], float]:
    """The training step of fastrnn.torch.LSTM eager and with the module compiled (fullgraph,
    inductor), on twin modules; returns the calls and the seconds of the compiling call."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.config.allow_rnn = True
    _, _, x, target = _twins(shape)
    T, N, D, H = shape
    calls, compile_s = {}, 0.0
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        model = ft.LSTM(D, H, dtype=DTYPE)
        run = torch.compile(model, fullgraph=True) if name == "compiled" else model
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(run=run, opt=opt) -> float:
            opt.zero_grad(set_to_none=True)
            y, _ = run(x)
            loss = torch.nn.functional.mse_loss(y, target)
            loss.backward()
            opt.step()
            return loss.item()

        t0 = time.perf_counter()
        step()  # compiles the compiled one; both take the same number of steps
        if name == "compiled":
            compile_s = time.perf_counter() - t0
        calls[name] = step
    first = {k: c() for k, c in calls.items()}
    np.testing.assert_allclose(first["compiled"], first["eager"], rtol=1e-4)
    return calls, compile_s


def jax_calls(shape) -> dict[str, Callable[[], object]]:
    """fastrnn.jax.lstm forward + backward under jax.jit vs the bare kernels."""
    import jax
    import jax.numpy as jnp

    import fastrnn.jax as fj

    T, N, D, H = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, N, D)).astype(np.float32)
    w_ih = (rng.standard_normal((4 * H, D)) / np.sqrt(H)).astype(np.float32)
    w_hh = (rng.standard_normal((4 * H, H)) / np.sqrt(H)).astype(np.float32)
    b = np.zeros(4 * H, np.float32)
    h0 = np.zeros((N, H), np.float32)
    dy = rng.standard_normal((T, N, H)).astype(np.float32)
    args = [jnp.asarray(a) for a in (x, h0, h0, w_ih, w_hh, b)]
    dy_j = jnp.asarray(dy)

    def loss(*a):
        return jnp.sum(fj.lstm(*a)[0] * dy_j)

    grad = jax.jit(jax.grad(loss, argnums=tuple(range(6))))

    def via_jax():
        return jax.block_until_ready(grad(*args))

    held: list[np.ndarray] = []

    def bare():
        held.clear()
        _, _, _, ctx = fr.lstm_forward(x, h0, h0, w_ih, w_hh, b)
        held.extend(fr.lstm_backward(ctx, dy))
        return held

    np.testing.assert_allclose(np.asarray(via_jax()[3]), bare()[3], rtol=2e-3, atol=2e-3)
    return {"bare kernel": bare, "fastrnn.jax": via_jax}


# ------------------------------------------------------------------------------------------------
# pytest-benchmark suite
# ------------------------------------------------------------------------------------------------


def _id(shape) -> str:
    return "T{}N{}D{}H{}".format(*shape)


def _run(benchmark, call, info: dict) -> None:
    threads = bench_threads()
    set_threads(threads)
    call()
    benchmark.pedantic(call, rounds=10, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(info, threads=threads, dtype="float32")


@pytest.mark.parametrize("impl", ["fastrnn.torch", "torch.nn"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_train_step(benchmark, shape, impl):
    benchmark.group = f"lstm train step {_id(shape)}"
    _run(benchmark, train_step_calls(shape)[impl], dict(impl=impl, shape=list(shape)))


@pytest.mark.parametrize("impl", ["bare kernel", "fastrnn.torch"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_binding_overhead(benchmark, shape, impl):
    benchmark.group = f"lstm binding overhead fwd+bwd {_id(shape)}"
    _run(benchmark, overhead_calls(shape)[impl], dict(impl=impl, shape=list(shape)))


# ------------------------------------------------------------------------------------------------
# script: interleaved table
# ------------------------------------------------------------------------------------------------


def _interleaved(calls: dict[str, Callable[[], object]], reps: int) -> dict[str, np.ndarray]:
    """Times (ms) of ``reps`` rounds; each round runs every call once, back to back, so that
    the two calls of a round meet the same load."""
    for c in calls.values():
        c()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(reps):
        for k, c in calls.items():
            t0 = time.perf_counter()
            c()
            times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: np.asarray(v) for k, v in times.items()}


def table(threads: int, reps: int) -> None:
    """Per shape: median and minimum times; ratios as the median of the per-round ratios
    (robust to load that changes between rounds) and as min over min."""
    set_threads(threads)
    print(
        f"threads={threads} (fastrnn and torch), float32, torch {torch.__version__}, "
        f"{reps} interleaved rounds; times in ms as median (min)"
    )
    print(
        f"{'shape':16} {'torch.nn step':>18} {'fastrnn.torch step':>19} {'speed-up':>15} | "
        f"{'bare fwd+bwd':>18} {'binding fwd+bwd':>18} {'overhead':>16} {'extra ms':>9}"
    )
    for shape in SHAPES:
        step = _interleaved(train_step_calls(shape), reps)
        over = _interleaved(overhead_calls(shape), reps)
        t_nn, t_fr = step["torch.nn"], step["fastrnn.torch"]
        t_bare, t_bind = over["bare kernel"], over["fastrnn.torch"]
        speed = (np.median(t_nn / t_fr), t_nn.min() / t_fr.min())
        extra = (np.median(t_bind / t_bare) - 1, t_bind.min() / t_bare.min() - 1)

        def mm(t: np.ndarray) -> str:
            return f"{np.median(t):.3f} ({t.min():.3f})"

        print(
            f"{_id(shape):16} {mm(t_nn):>18} {mm(t_fr):>19} "
            f"{f'{speed[0]:.2f} ({speed[1]:.2f})':>15} | {mm(t_bare):>18} {mm(t_bind):>18} "
            f"{f'{100 * extra[0]:+.1f}% ({100 * extra[1]:+.1f}%)':>16} "
            f"{np.median(t_bind - t_bare):9.3f}",
            flush=True,
        )


def _mm(t: np.ndarray) -> str:
    return f"{np.median(t):.3f} ({t.min():.3f})"


def compare_table(title: str, make: Callable, names: tuple[str, str], threads: int, reps: int,
                  shapes: list) -> None:  # fmt: skip
    """Per shape: medians (minima) of two interleaved calls and the median per-round ratio."""
    set_threads(threads)
    base, other = names
    print(f"\n{title}: threads={threads}, float32, {reps} interleaved rounds, ms median (min)")
    print(f"{'shape':16} {base:>18} {other:>18} {'ratio':>15} {'extra ms':>9} {'first call s':>12}")
    for shape in shapes:
        made = make(shape)
        calls, first = made if isinstance(made, tuple) else (made, float("nan"))
        t = _interleaved(calls, reps)
        ratio = (np.median(t[other] / t[base]), t[other].min() / t[base].min())
        print(
            f"{_id(shape):16} {_mm(t[base]):>18} {_mm(t[other]):>18} "
            f"{f'{ratio[0]:.3f} ({ratio[1]:.3f})':>15} {np.median(t[other] - t[base]):9.3f} "
            f"{first:12.1f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=fr.get_num_threads())
    parser.add_argument("--reps", type=int, default=30, help="interleaved rounds (default 30)")
    parser.add_argument("--compile", action="store_true", help="also: compiled vs eager step")
    parser.add_argument("--jax", action="store_true", help="also: fastrnn.jax vs bare kernels")
    parser.add_argument("--floor", action="store_true",
                        help="also: a minimal autograd.Function vs bare kernels")  # fmt: skip
    parser.add_argument("--old-binding", metavar="REV",
                        help="also: fastrnn.torch.LSTM vs the binding at commit REV (e.g. 4b59a68)")
    parser.add_argument("--only", action="store_true", help="skip the default table")
    args = parser.parse_args()
    if not args.only:
        table(args.threads, args.reps)
    if args.compile:
        compare_table("torch.compile(fullgraph=True) training step vs eager", compile_calls,
                      ("eager", "compiled"), args.threads, args.reps, SHAPES)  # fmt: skip
    if args.floor:
        compare_table("minimal autograd.Function vs bare kernels, fwd+bwd", floor_calls,
                      ("bare kernel", "minimal Function"), args.threads, args.reps,
                      SHAPES)  # fmt: skip
    if args.old_binding:
        rev = args.old_binding
        compare_table(f"fastrnn.torch.LSTM vs the binding at {rev}, fwd+bwd",
                      lambda shape: old_binding_calls(shape, rev),
                      (f"binding at {rev}", "fastrnn.torch"), args.threads, args.reps, SHAPES)
    if args.jax:
        compare_table("fastrnn.jax jit(grad) vs bare kernels, fwd+bwd", jax_calls,
                      ("bare kernel", "fastrnn.jax"), args.threads, args.reps, SHAPES)  # fmt: skip


if __name__ == "__main__":
    main()
