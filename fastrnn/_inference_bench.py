"""The streaming-inference benchmark (``fastrnn bench --inference``,
benchmarks/bench_inference.py): one time step and whole sequences of the prepared layers
(fastrnn.lstm_inference etc.) against ``lstm_forward(training=False)`` and torch.nn under
``no_grad``, interleaved round by round in one process, medians, one thread by default.

Rows: op, N, H (D = H), and per implementation the median microseconds of one step (the
prepared layer, ``lstm_forward(training=False)`` on one step, torch.nn and fastrnn.torch's
module under ``no_grad``); the ratios torch / prepared, forward / prepared and
torch / fastrnn.torch; the arithmetic's share of the prepared step's
time (its GEMM FLOPs at the sgemm rate measured in the same run). Then ``char-rnn sample``
with the default model (embedding 64, 2-layer LSTM 192, 96 characters): characters per second
of fastrnn's sampler (``char_rnn.sample``: the loop in one kernel call), of the same loop
stepped from Python through a stream, and of the same model in torch stepped under
``no_grad`` with the same NumPy draws, at one thread and at every CPU.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import fastrnn as fr

STEP_GRID = [(op, n, h) for op in ("lstm", "gru", "rnn") for n in (1, 8) for h in (128, 256, 512)]
SEQUENCE_GRID = [("lstm", 100, 1, 128), ("lstm", 100, 16, 256), ("gru", 100, 16, 256),
                 ("rnn", 100, 16, 256)]
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _weights(op: str, D: int, H: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    G = GATES[op]
    s = 1 / np.sqrt(H)
    w = {
        "w_ih": (rng.standard_normal((G * H, D)) * s).astype(np.float32),
        "w_hh": (rng.standard_normal((G * H, H)) * s).astype(np.float32),
        "b_ih": (rng.standard_normal(G * H) * s).astype(np.float32),
        "b_hh": (rng.standard_normal(G * H) * s).astype(np.float32),
    }
    w["b"] = w["b_ih"] + w["b_hh"]
    return w


def _prepared(op: str, w: dict[str, np.ndarray]) -> Any:
    if op == "lstm":
        return fr.lstm_inference(w["w_ih"], w["w_hh"], w["b"])
    if op == "gru":
        return fr.gru_inference(w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])
    return fr.rnn_inference(w["w_ih"], w["w_hh"], w["b"])


def _torch_module(op: str, D: int, H: int, w: dict[str, np.ndarray]) -> Any:
    import torch

    m = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[op](D, H)
    with torch.no_grad():
        for name in ("w_ih", "w_hh", "b_ih", "b_hh"):
            getattr(m, {"w_ih": "weight_ih_l0", "w_hh": "weight_hh_l0", "b_ih": "bias_ih_l0",
                        "b_hh": "bias_hh_l0"}[name]).copy_(torch.from_numpy(w[name]))
    return m


def step_callables(op: str, N: int, H: int, use_torch: bool) -> dict[str, Callable[[], Any]]:
    """One time step per implementation, the state carried in place where the API allows."""
    rng = np.random.default_rng(0)
    D = H
    w = _weights(op, D, H, rng)
    run = _prepared(op, w)
    x = rng.standard_normal((N, D)).astype(np.float32)
    h = np.zeros((N, H), np.float32)
    c = np.zeros((N, H), np.float32)
    x3 = x[None]
    calls: dict[str, Callable[[], Any]] = {}
    if op == "lstm":
        calls["prepared"] = lambda: run.step(x, h, c, out=(h, c))
        calls["forward"] = lambda: fr.lstm_forward(
            x3, h, c, w["w_ih"], w["w_hh"], w["b"], training=False
        )
    elif op == "gru":
        calls["prepared"] = lambda: run.step(x, h, out=h)
        calls["forward"] = lambda: fr.gru_forward(
            x3, h, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], training=False
        )
    else:
        calls["prepared"] = lambda: run.step(x, h, out=h)
        calls["forward"] = lambda: fr.rnn_forward(
            x3, h, w["w_ih"], w["w_hh"], w["b"], training=False
        )
    if use_torch:
        import torch

        m = _torch_module(op, D, H, w)
        xt = torch.from_numpy(x3)
        ht = torch.zeros(1, N, H)
        state = (ht, torch.zeros(1, N, H)) if op == "lstm" else ht

        import fastrnn.torch as ft

        fm = {"lstm": ft.LSTM, "gru": ft.GRU, "rnn": ft.RNN}[op](D, H)
        fm.load_state_dict(m.state_dict())

        def torch_step() -> Any:
            with torch.no_grad():
                return m(xt, state)

        def binding_step() -> Any:
            with torch.no_grad():
                return fm(xt, state)

        calls["torch"] = torch_step
        calls["fastrnn.torch"] = binding_step
    return calls


def _interleaved(calls: dict[str, Callable[[], Any]], rounds: int, min_time: float) -> dict:
    """Median seconds per call of each implementation, implementations alternating per round."""
    for fn in calls.values():  # warm-up
        for _ in range(3):
            fn()
    per = {k: [] for k in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            n, start = 0, time.perf_counter()
            while True:
                fn()
                n += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_time / rounds and n >= 3:
                    break
            per[name].append(elapsed / n)
    return {k: statistics.median(v) for k, v in per.items()}


def run(threads: int = 1, use_torch: bool = True, rounds: int = 7, min_time: float = 0.3,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    from fastrnn._bench import sgemm_gflops, torch_available
    from fastrnn._bench import threads as same_threads

    use_torch = use_torch and torch_available()
    rows = []
    with same_threads(threads):
        rate = sgemm_gflops(threads)
        for op, N, H in STEP_GRID:
            t = _interleaved(step_callables(op, N, H, use_torch), rounds, min_time)
            flops = 2 * N * 2 * H * GATES[op] * H
            rows.append({
                "kind": "step", "op": op, "N": N, "H": H, "us": {k: v * 1e6 for k, v in t.items()},
                "arithmetic_share": flops / (rate * 1e9) / t["prepared"],
            })
            if log:
                log(format_row(rows[-1]))
        for op, T, N, H in SEQUENCE_GRID:
            rows.append(_sequence_row(op, T, N, H, use_torch, rounds, min_time))
            if log:
                log(format_row(rows[-1]))
    for n in sorted({threads, os.cpu_count() or 1}):
        with same_threads(n):
            rows.append(_sample_row(n, use_torch, rounds))
        if log:
            log(format_row(rows[-1]))
    return {"threads": threads, "sgemm_gflops": rate, "rows": rows}


SAMPLE_CHARS = 2000


def sample_callables(use_torch: bool) -> dict[str, Callable[[], Any]]:
    """Each writes SAMPLE_CHARS characters with the default char-rnn model (random weights)."""
    from fastrnn import nn
    from fastrnn.examples.char_rnn import (
        MODEL_DEFAULTS,
        Vocabulary,
        build_model,
        sample,
        stepped_sample,
    )
    from fastrnn.nn.functional import softmax

    vocab = Vocabulary.from_text("".join(chr(c) for c in range(32, 127)) + "\n")
    m = MODEL_DEFAULTS
    model = build_model(len(vocab), m["hidden"], m["layers"], m["embedding"], 0.0, seed=0)
    model.eval()
    prime = vocab.encode("def ", "prime")

    def draw(logits: Any, u: float) -> int:
        p = softmax(logits.astype(np.float64) / 0.8)
        return int(min(np.searchsorted(np.cumsum(p), u * p.sum()), len(p) - 1))

    def kernel() -> Any:
        return sample(model, vocab, SAMPLE_CHARS, 0.8, "def ", np.random.default_rng(0))

    def stepped() -> Any:
        u = np.random.default_rng(0).random(SAMPLE_CHARS)
        with nn.no_grad():
            logits, state = model(prime[:, None], None)
            stream = model.lstm.stream(1)
            stream.state = state
            return stepped_sample(
                stream, model.embed.weight.data, model.head.weight.data,
                model.head.bias.data, logits[-1, 0], 0.8, u,
            )

    calls = {"sampler": kernel, "stepped": stepped}
    if use_torch:
        import torch

        emb = torch.nn.Embedding.from_pretrained(torch.from_numpy(model.embed.weight.data))
        lstm = torch.nn.LSTM(m["embedding"], m["hidden"], m["layers"])
        lstm.load_state_dict({k: torch.from_numpy(v.data) for k, v in
                              model.lstm.named_parameters()})
        head = torch.nn.Linear(m["hidden"], len(vocab))
        head.weight.data = torch.from_numpy(model.head.weight.data)
        head.bias.data = torch.from_numpy(model.head.bias.data)

        def torch_loop() -> Any:
            u = np.random.default_rng(0).random(SAMPLE_CHARS)
            with torch.no_grad():
                y, state = lstm(emb(torch.from_numpy(prime)[:, None]))
                last = head(y[-1, 0]).numpy()
                for i in range(SAMPLE_CHARS):
                    nxt = torch.tensor([[draw(last, u[i])]])
                    y, state = lstm(emb(nxt), state)
                    last = head(y[0, 0]).numpy()

        calls["torch"] = torch_loop
    return calls


def _sample_row(threads: int, use_torch: bool, rounds: int) -> dict[str, Any]:
    calls = sample_callables(use_torch)
    per: dict[str, list[float]] = {k: [] for k in calls}
    for fn in calls.values():  # warm-up
        fn()
    for _ in range(max(3, rounds // 2)):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            per[name].append(SAMPLE_CHARS / (time.perf_counter() - start))
    return {"kind": "sample", "op": "char-rnn", "threads": threads,
            "chars_per_s": {k: statistics.median(v) for k, v in per.items()}}


def _sequence_row(op, T, N, H, use_torch, rounds, min_time) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    w = _weights(op, H, H, rng)
    prepared = _prepared(op, w)
    x = rng.standard_normal((T, N, H)).astype(np.float32)
    h = np.zeros((N, H), np.float32)
    args = (x, h, h) if op == "lstm" else (x, h)
    calls = {"prepared": lambda: prepared(*args)}
    if op == "lstm":
        calls["forward"] = lambda: fr.lstm_forward(x, h, h, w["w_ih"], w["w_hh"], w["b"],
                                                   training=False)
    elif op == "gru":
        calls["forward"] = lambda: fr.gru_forward(x, h, w["w_ih"], w["w_hh"], w["b_ih"],
                                                  w["b_hh"], training=False)
    else:
        calls["forward"] = lambda: fr.rnn_forward(x, h, w["w_ih"], w["w_hh"], w["b"],
                                                  training=False)
    if use_torch:
        import torch

        m = _torch_module(op, H, H, w)
        xt = torch.from_numpy(x)

        def torch_seq() -> Any:
            with torch.no_grad():
                return m(xt)

        calls["torch"] = torch_seq
    t = _interleaved(calls, rounds, min_time)
    return {"kind": "sequence", "op": op, "T": T, "N": N, "H": H,
            "us": {k: v * 1e6 for k, v in t.items()}}


def format_row(row: dict[str, Any]) -> str:
    if row["kind"] == "sample":
        rate = row["chars_per_s"]
        cells = "  ".join(f"{k} {v:9,.0f} chars/s" for k, v in rate.items())
        ratios = f"sampler/stepped {rate['sampler'] / rate['stepped']:4.1f}x"
        if "torch" in rate:
            ratios += f"  sampler/torch {rate['sampler'] / rate['torch']:5.1f}x"
        return (f"sample   char-rnn {row['threads']} thread(s), default model   {cells}  "
                f"{ratios}")
    us = row["us"]
    shape = (f"N={row['N']:<2} H={row['H']:<4}" if row["kind"] == "step"
             else f"T={row['T']} N={row['N']} H={row['H']}")
    cells = "  ".join(f"{k} {v:9.1f} us" for k, v in us.items())
    ratios = f"forward/prepared {us['forward'] / us['prepared']:5.1f}x"
    if "torch" in us:
        ratios += f"  torch/prepared {us['torch'] / us['prepared']:5.1f}x"
    if "fastrnn.torch" in us:
        ratios += f"  torch/fastrnn.torch {us['torch'] / us['fastrnn.torch']:5.1f}x"
    share = (f"  arithmetic {100 * row['arithmetic_share']:4.1f}% of the step"
             if "arithmetic_share" in row else "")
    return f"{row['kind']:<8} {row['op']:<4} {shape:<18} {cells}  {ratios}{share}"


def format_table(result: dict[str, Any]) -> str:
    head = (f"fastrnn prepared inference vs lstm_forward(training=False) vs torch.nn (no_grad); "
            f"{result['threads']} thread(s), float32, D = H, medians of interleaved rounds; "
            f"sgemm {result['sgemm_gflops']:.0f} GFLOP/s")
    return "\n".join([head] + [format_row(r) for r in result["rows"]])
