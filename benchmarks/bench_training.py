"""Whole training steps, fastrnn against PyTorch: the char-rnn step of ``fastrnn char-rnn
train`` (fastrnn.nn + fastrnn.optim vs torch.nn + torch.optim) and PyTorch's word-LM step with
fastrnn.torch.LSTM vs torch.nn.LSTM. The models, steps and the interleaved timing live in
fastrnn/bench_training.py (also behind ``fastrnn bench --training``).

Outside the default test run. Two ways to run it:

    python -m pytest benchmarks/bench_training.py --benchmark-only --benchmark-group-by=group
    python benchmarks/bench_training.py [--threads 1 2] [--rounds 5] [--steps 10] [--json PATH]

The script form interleaves the implementations round by round and prints characters (tokens)
per second, the ratio to PyTorch (above 1: fastrnn is faster), minor page faults per step and a
per-part breakdown of one step; on a shared machine that is the number to quote. The
pytest-benchmark groups time one step per call, threads from FASTRNN_BENCH_THREADS (default
fastrnn.get_num_threads()), with the model and threads in ``extra_info``.
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import pytest

from fastrnn import bench_training as bt


def _char_impls():
    ours = bt.CharFastrnn()
    weights = {k: np.asarray(v) for k, v in ours.model.state_dict().items()}
    return {"fastrnn": ours, "torch": bt.CharTorch(weights)}


def _word_impls():
    import torch

    import fastrnn.torch as frt

    ours = bt.WordLM("fastrnn", frt.LSTM)
    theirs = bt.WordLM("torch", torch.nn.LSTM)
    theirs.modules.load_state_dict(ours.modules.state_dict())
    return {"fastrnn": ours, "torch": theirs}


MODELS = {
    "char-rnn": (_char_impls, bt._char_data, bt.CHAR, "chars"),
    "word-lm": (_word_impls, bt._word_data, bt.WORD, "tokens"),
}


@pytest.mark.parametrize("impl", ["fastrnn", "torch"])
@pytest.mark.parametrize("model", list(MODELS))
def test_training_step(benchmark, bench_threads, model, impl):
    pytest.importorskip("torch")
    make, data_fn, cfg, unit = MODELS[model]
    step_impl = make()[impl]
    data = data_fn(64)
    batches = bt._batches(data, cfg["seq_len"])
    counter = itertools.count()
    benchmark.group = f"{model} training step, {bench_threads} thread(s)"
    benchmark.extra_info.update(
        model=model, threads=bench_threads, **{f"{unit}_per_step": cfg["seq_len"] * cfg["batch"]}
    )
    with bt.threads(bench_threads):
        for k in range(3):
            step_impl.step(*batches(k))
        loss = benchmark(lambda: step_impl.step(*batches(next(counter))))
    assert np.isfinite(loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--models", default="char-rnn,word-lm")
    ap.add_argument("--no-parts", action="store_true", help="skip the per-part breakdown")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    result = bt.run(
        thread_counts=tuple(args.threads),
        steps=args.steps,
        rounds=args.rounds,
        models=tuple(m.strip() for m in args.models.split(",")),
        parts=not args.no_parts,
        log=print,
    )
    print(bt.format_result(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
