"""``fastrnn bench --training``: whole training steps, fastrnn against PyTorch, side by side.

Two models, each trained the same way by both libraries in one process, with the same weights:

* **char-rnn** -- the model of ``fastrnn char-rnn train``: embedding 64 -> 2-layer LSTM 192 ->
  linear over 96 characters, softmax cross-entropy, Adam (lr 3e-3), gradient clipping at 5,
  32 streams x 64 characters, the LSTM state carried from step to step. ``fastrnn`` is the
  model in ``fastrnn.nn`` + ``fastrnn.optim`` (exactly the command's step,
  :func:`fastrnn.examples.char_rnn.train_step`); ``torch`` the same model in ``torch.nn`` +
  ``torch.optim`` as a PyTorch user writes it.
* **word-lm** -- PyTorch's ``examples/word_language_model`` shape: T 35, N 20, embedding 200,
  2-layer LSTM 200, vocabulary 10,000, decoder + cross-entropy, SGD (lr 20) with clipping at
  0.25, all in torch; only the LSTM differs: ``fastrnn.torch.LSTM`` against ``torch.nn.LSTM``.

The char-rnn step is also timed as ``fastrnn-numpy-glue``: the same step with the training glue
(embedding backward, head + loss, clipping, Adam) on its NumPy code instead of the kernels of
fastrnn/_cpu/_train.pyx, so one run shows what those kernels change.

Each thread count (fastrnn, PyTorch and BLAS all set to it) runs interleaved rounds: each round
times ``steps`` training steps of every implementation, the order alternating between rounds;
the table gives the medians in characters (tokens) per second and the ratio to PyTorch (above
1: fastrnn is faster). A per-part breakdown of one step (embedding, each LSTM layer forward and
backward, linear, loss, clipping, optimizer, the rest) is measured for both libraries by running
the parts one at a time (each part's backward on its own, through detached inputs), medians over
steps. The minor page faults per fastrnn step (``resource.getrusage``) show whether the step
allocates fresh memory.

Run it as ``fastrnn bench --training`` or ``python benchmarks/bench_training.py``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

import fastrnn as fr

CHAR = dict(vocab=96, embedding=64, hidden=192, layers=2, seq_len=64, batch=32, lr=3e-3, clip=5.0)
WORD = dict(
    vocab=10000, embedding=200, hidden=200, layers=2, seq_len=35, batch=20, lr=20.0, clip=0.25
)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """fastrnn, PyTorch and every BLAS on ``n`` threads (set explicitly: PyTorch and fastrnn
    share libgomp, so one library's setting moves the other's default)."""
    from fastrnn._cpu import _scipy_blas

    _scipy_blas.module()  # SciPy's BLAS (the kernels' one) loaded, so it is limited too
    import torch
    from threadpoolctl import threadpool_limits

    before_fr, before_t = fr.get_num_threads(), torch.get_num_threads()
    fr.set_num_threads(n)
    torch.set_num_threads(n)
    try:
        # NumPy's BLAS on one thread, as `fastrnn char-rnn train` runs it (examples/_common.py)
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        fr.set_num_threads(before_fr)
        torch.set_num_threads(before_t)


# ------------------------------------------------------------------------------------------------
# char-rnn
# ------------------------------------------------------------------------------------------------


def _char_data(steps: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    T, N = CHAR["seq_len"], CHAR["batch"]
    return rng.integers(0, CHAR["vocab"], size=((steps + 1) * T + 1, N)).astype(np.int64)


class CharFastrnn:
    """The char-rnn step of ``fastrnn char-rnn train``; ``numpy_glue``: with the training glue
    (embedding backward, head + loss, clipping, Adam) on its NumPy code instead of the kernels
    of fastrnn/_cpu/_train.pyx, as before they existed."""

    name = "fastrnn"

    def __init__(self, seed: int = 0, numpy_glue: bool = False) -> None:
        self.numpy_glue = numpy_glue
        if numpy_glue:
            self.name = "fastrnn-numpy-glue"
        from fastrnn import optim
        from fastrnn.examples.char_rnn import build_model

        c = CHAR
        self.model = build_model(c["vocab"], c["hidden"], c["layers"], c["embedding"], 0.0, seed)
        self.params = list(self.model.parameters())
        self.optimizer = optim.Adam(self.params, lr=c["lr"])
        self.state: Any = None

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        from fastrnn.backends.training import numpy_glue
        from fastrnn.examples.char_rnn import train_step

        with numpy_glue() if self.numpy_glue else contextlib.nullcontext():
            loss, self.state = train_step(
                self.model, self.optimizer, self.params, x, y, self.state, CHAR["clip"]
            )
        return loss


class CharTorch:
    """The same model in torch.nn, as a PyTorch user writes the step."""

    name = "torch"

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        import torch
        from torch import nn

        c = CHAR

        class Model(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.embed = nn.Embedding(c["vocab"], c["embedding"])
                self.lstm = nn.LSTM(c["embedding"], c["hidden"], c["layers"])
                self.head = nn.Linear(c["hidden"], c["vocab"])

            def forward(self, x: Any, state: Any) -> Any:
                y, state = self.lstm(self.embed(x), state)
                return self.head(y), state

        self.torch = torch
        self.model = Model()
        self.model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=c["lr"])
        self.state: Any = None

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        torch = self.torch
        F = torch.nn.functional
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        if self.state is not None:
            self.state = tuple(s.detach() for s in self.state)
        logits, self.state = self.model(xt, self.state)
        loss = F.cross_entropy(logits.reshape(-1, CHAR["vocab"]), yt.reshape(-1))
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CHAR["clip"])
        self.optimizer.step()
        return loss.item()


# ------------------------------------------------------------------------------------------------
# word-lm
# ------------------------------------------------------------------------------------------------


class WordLM:
    """PyTorch's word_language_model step with ``lstm_class`` as the LSTM."""

    def __init__(self, name: str, lstm_class: Any, seed: int = 0) -> None:
        import torch
        from torch import nn

        w = WORD
        self.name = name
        self.torch = torch
        torch.manual_seed(seed)
        self.encoder = nn.Embedding(w["vocab"], w["embedding"])
        self.lstm = lstm_class(w["embedding"], w["hidden"], w["layers"])
        self.decoder = nn.Linear(w["hidden"], w["vocab"])
        self.modules = nn.ModuleList([self.encoder, self.lstm, self.decoder])
        self.optimizer = torch.optim.SGD(self.modules.parameters(), lr=w["lr"])
        self.state: Any = None

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        torch = self.torch
        F = torch.nn.functional
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        if self.state is not None:
            self.state = tuple(s.detach() for s in self.state)
        out, self.state = self.lstm(self.encoder(xt), self.state)
        loss = F.cross_entropy(self.decoder(out).reshape(-1, WORD["vocab"]), yt.reshape(-1))
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.modules.parameters(), WORD["clip"])
        self.optimizer.step()
        return loss.item()


def _word_data(steps: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    T, N = WORD["seq_len"], WORD["batch"]
    return rng.integers(0, WORD["vocab"], size=((steps + 1) * T + 1, N)).astype(np.int64)


# ------------------------------------------------------------------------------------------------
# interleaved throughput
# ------------------------------------------------------------------------------------------------


def _batches(data: np.ndarray, T: int) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
    n = (data.shape[0] - 1) // T

    def get(k: int) -> tuple[np.ndarray, np.ndarray]:
        k %= n
        return data[k * T : (k + 1) * T], data[k * T + 1 : (k + 1) * T + 1]

    return get


def interleaved(
    impls: list[Any], data: np.ndarray, T: int, steps: int, rounds: int, warmup: int = 3
) -> dict[str, list[float]]:
    """Seconds per step of each implementation, one median-able sample per round."""
    get = _batches(data, T)
    for impl in impls:
        for k in range(warmup):
            impl.step(*get(k))
    times: dict[str, list[float]] = {impl.name: [] for impl in impls}
    for r in range(rounds):
        order = impls if r % 2 == 0 else impls[::-1]
        for impl in order:
            t0 = time.perf_counter()
            for k in range(steps):
                impl.step(*get(r * steps + k))
            times[impl.name].append((time.perf_counter() - t0) / steps)
    return times


def page_faults_per_step(impl: Any, data: np.ndarray, T: int, steps: int = 20) -> float:
    """Minor page faults per step after warm-up (fresh memory touched by each step)."""
    from fastrnn._bench import minor_faults

    get = _batches(data, T)
    for k in range(3):
        impl.step(*get(k))
    before = minor_faults()
    for k in range(steps):
        impl.step(*get(k + 3))
    return (minor_faults() - before) / steps


# ------------------------------------------------------------------------------------------------
# per-part breakdown
# ------------------------------------------------------------------------------------------------


class _Clock:
    """Accumulates the seconds of named parts of one step."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.parts[name] = self.parts.get(name, 0.0) + now - self.t
        self.t = now


def _fastrnn_char_parts(seed: int = 0) -> Callable[[np.ndarray, np.ndarray], dict[str, float]]:
    """One char-rnn step in fastrnn.nn, part by part (each LSTM layer its own 1-layer module
    holding the same weights as the command's 2-layer model)."""
    from fastrnn import nn, optim

    c = CHAR
    nn.manual_seed(seed)
    emb = nn.Embedding(c["vocab"], c["embedding"])
    layers = [
        nn.LSTM(c["embedding"] if i == 0 else c["hidden"], c["hidden"]) for i in range(c["layers"])
    ]
    head = nn.Linear(c["hidden"], c["vocab"])
    params = list(emb.parameters()) + [p for m in layers for p in m.parameters()]
    params += list(head.parameters())
    opt = optim.Adam(params, lr=c["lr"])
    states: list[Any] = [None] * len(layers)

    def step(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        clock = _Clock()
        h = x  # the first layer looks its input projection up (embedding=, as CharRNN does)
        for i, m in enumerate(layers):
            h, states[i] = m(h, states[i], embedding=emb if i == 0 else None)
            clock.lap("embedding+lstm l0 fwd" if i == 0 else f"lstm l{i} fwd")
        T, N, H = h.shape
        loss, dh = head.cross_entropy(h.reshape(T * N, H), y.reshape(-1))
        clock.lap("linear+loss fwd+bwd")
        dh = dh.reshape(T, N, H)
        for i in reversed(range(len(layers))):
            dh = layers[i].backward(dh)
            clock.lap("embedding+lstm l0 bwd" if i == 0 else f"lstm l{i} bwd")
        optim.clip_grad_norm_(params, c["clip"])
        clock.lap("clip")
        opt.step()
        clock.lap("optimizer")
        opt.zero_grad()
        clock.lap("other")
        return clock.parts

    return step


def _torch_parts(
    emb: Any, layers: list[Any], head: Any, opt: Any, params: list[Any], vocab: int, clip: float
) -> Callable[[np.ndarray, np.ndarray], dict[str, float]]:
    """One step in torch, part by part: every part runs on detached inputs, and its backward is
    its own ``backward`` call, so each part's cost is visible."""
    import torch

    F = torch.nn.functional
    states: list[Any] = [None] * len(layers)

    def step(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        clock = _Clock()
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        opt.zero_grad()
        clock.lap("other")
        e = emb(xt)
        clock.lap("embedding fwd")
        ins, outs = [], []
        h = e
        for i, m in enumerate(layers):
            hin = h.detach().requires_grad_()
            st = None if states[i] is None else tuple(s.detach() for s in states[i])
            h, states[i] = m(hin, st)
            ins.append(hin)
            outs.append(h)
            clock.lap(f"lstm l{i} fwd")
        hin = h.detach().requires_grad_()
        logits = head(hin)
        clock.lap("linear fwd")
        ld = logits.detach().requires_grad_()
        loss = F.cross_entropy(ld.reshape(-1, vocab), yt.reshape(-1))
        loss.backward()
        clock.lap("loss fwd+bwd")
        logits.backward(ld.grad)
        clock.lap("linear bwd")
        g = hin.grad
        for i in reversed(range(len(layers))):
            outs[i].backward(g)
            g = ins[i].grad
            clock.lap(f"lstm l{i} bwd")
        e.backward(g)
        clock.lap("embedding bwd")
        torch.nn.utils.clip_grad_norm_(params, clip)
        clock.lap("clip")
        opt.step()
        clock.lap("optimizer")
        loss.item()
        clock.lap("other")
        return clock.parts

    return step


def _torch_char_parts() -> Callable[[np.ndarray, np.ndarray], dict[str, float]]:
    import torch
    from torch import nn

    c = CHAR
    emb = nn.Embedding(c["vocab"], c["embedding"])
    layers = [
        nn.LSTM(c["embedding"] if i == 0 else c["hidden"], c["hidden"]) for i in range(c["layers"])
    ]
    head = nn.Linear(c["hidden"], c["vocab"])
    params = list(emb.parameters()) + [p for m in layers for p in m.parameters()]
    params += list(head.parameters())
    opt = torch.optim.Adam(params, lr=c["lr"])
    return _torch_parts(emb, layers, head, opt, params, c["vocab"], c["clip"])


def _torch_word_parts(lstm_class: Any) -> Callable[[np.ndarray, np.ndarray], dict[str, float]]:
    import torch
    from torch import nn

    w = WORD
    emb = nn.Embedding(w["vocab"], w["embedding"])
    layers = [
        lstm_class(w["embedding"] if i == 0 else w["hidden"], w["hidden"])
        for i in range(w["layers"])
    ]
    head = nn.Linear(w["hidden"], w["vocab"])
    params = list(emb.parameters()) + [p for m in layers for p in m.parameters()]
    params += list(head.parameters())
    opt = torch.optim.SGD(params, lr=w["lr"])
    return _torch_parts(emb, layers, head, opt, params, w["vocab"], w["clip"])


def breakdown(
    impls: dict[str, Callable[[np.ndarray, np.ndarray], dict[str, float]]],
    data: np.ndarray,
    T: int,
    steps: int,
) -> dict[str, dict[str, float]]:
    """Median milliseconds of each part of one step, per implementation (interleaved)."""
    get = _batches(data, T)
    for fn in impls.values():
        for k in range(3):
            fn(*get(k))
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in impls}
    for k in range(steps):
        for name, fn in impls.items() if k % 2 == 0 else reversed(impls.items()):
            for part, s in fn(*get(k + 3)).items():
                samples[name].setdefault(part, []).append(s * 1e3)
    return {
        name: {part: statistics.median(v) for part, v in parts.items()}
        for name, parts in samples.items()
    }


# ------------------------------------------------------------------------------------------------
# the whole benchmark
# ------------------------------------------------------------------------------------------------


def run(
    thread_counts: tuple[int, ...] = (1, 2),
    steps: int = 10,
    rounds: int = 5,
    models: tuple[str, ...] = ("char-rnn", "word-lm"),
    parts: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Measure; return a JSON-able result (see :func:`format_result`)."""
    import torch

    import fastrnn.torch as frt

    result: dict[str, Any] = {"threads": {}, "config": {"char-rnn": CHAR, "word-lm": WORD}}
    char_data = _char_data(rounds * steps + 8)
    word_data = _word_data(rounds * steps + 8)
    for n in thread_counts:
        entry: dict[str, Any] = {}
        with threads(n):
            if "char-rnn" in models:
                log(f"char-rnn, {n} thread(s)")
                ours = CharFastrnn()
                weights = {k: np.asarray(v) for k, v in ours.model.state_dict().items()}
                theirs = CharTorch(weights)
                impls = [ours, CharFastrnn(numpy_glue=True), theirs]
                t = interleaved(impls, char_data, CHAR["seq_len"], steps, rounds)
                chars = CHAR["seq_len"] * CHAR["batch"]
                entry["char-rnn"] = {
                    "per_second": {k: chars / statistics.median(v) for k, v in t.items()},
                    "samples_ms": {k: [s * 1e3 for s in v] for k, v in t.items()},
                    "page_faults_per_step": {
                        impl.name: page_faults_per_step(impl, char_data, CHAR["seq_len"])
                        for impl in impls
                    },
                }
                if parts:
                    entry["char-rnn"]["parts_ms"] = breakdown(
                        {"fastrnn": _fastrnn_char_parts(), "torch": _torch_char_parts()},
                        char_data,
                        CHAR["seq_len"],
                        steps * 2,
                    )
            if "word-lm" in models:
                log(f"word-lm, {n} thread(s)")
                ours_w = WordLM("fastrnn", frt.LSTM)
                theirs_w = WordLM("torch", torch.nn.LSTM)
                theirs_w.modules.load_state_dict(ours_w.modules.state_dict())
                t = interleaved([ours_w, theirs_w], word_data, WORD["seq_len"], steps, rounds)
                toks = WORD["seq_len"] * WORD["batch"]
                entry["word-lm"] = {
                    "per_second": {k: toks / statistics.median(v) for k, v in t.items()},
                    "samples_ms": {k: [s * 1e3 for s in v] for k, v in t.items()},
                }
                if parts:
                    entry["word-lm"]["parts_ms"] = breakdown(
                        {
                            "fastrnn": _torch_word_parts(frt.LSTM),
                            "torch": _torch_word_parts(torch.nn.LSTM),
                        },
                        word_data,
                        WORD["seq_len"],
                        steps * 2,
                    )
        result["threads"][str(n)] = entry
    return result


def format_result(result: dict[str, Any]) -> str:
    lines = []
    units = {"char-rnn": "chars/s", "word-lm": "tokens/s"}
    lines.append(
        f"{'model':<9} {'threads':>7}  {'implementation':<20} {'per second':>12}  "
        f"{'vs torch':>8}  {'page faults/step':>16}"
    )
    for n, entry in result["threads"].items():
        for model, r in entry.items():
            ps = r["per_second"]
            pf = r.get("page_faults_per_step", {})
            for impl, rate in ps.items():
                faults = f"{pf[impl]:.0f}" if impl in pf else "-"
                lines.append(
                    f"{model:<9} {n:>7}  {impl:<20} {rate:>12,.0f}  {rate / ps['torch']:>7.2f}x"
                    f"  {faults:>16}   ({units[model]})"
                )
    for n, entry in result["threads"].items():
        for model, r in entry.items():
            if "parts_ms" not in r:
                continue
            p = r["parts_ms"]
            names = list(dict.fromkeys([*p["fastrnn"], *p["torch"]]))
            lines.append("")
            lines.append(f"{model}, {n} thread(s): one step, median ms per part")
            lines.append(f"  {'part':<22} {'fastrnn':>9} {'torch':>9}")
            for part in names:
                a, b = p["fastrnn"].get(part), p["torch"].get(part)
                fa = f"{a:9.2f}" if a is not None else f"{'-':>9}"
                fb = f"{b:9.2f}" if b is not None else f"{'-':>9}"
                lines.append(f"  {part:<22} {fa} {fb}")
            lines.append(
                f"  {'sum':<22} {sum(p['fastrnn'].values()):9.2f} {sum(p['torch'].values()):9.2f}"
            )
    return "\n".join(lines)
