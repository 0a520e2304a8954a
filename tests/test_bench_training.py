"""The training benchmark (fastrnn/bench_training.py, `fastrnn bench --training`) on tiny
models: every implementation and every part of the breakdown is measured and reported (no
timing is asserted)."""

from __future__ import annotations

import json
import math

import pytest

from fastrnn import bench_training as bt
from fastrnn.cli import main

pytest.importorskip("torch")

TINY_CHAR = dict(vocab=11, embedding=4, hidden=6, layers=2, seq_len=5, batch=3, lr=1e-3, clip=1.0)
TINY_WORD = dict(vocab=13, embedding=5, hidden=7, layers=2, seq_len=4, batch=2, lr=0.1, clip=0.5)


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, tiny_cfg in (("CHAR", TINY_CHAR), ("WORD", TINY_WORD)):
        for k, v in tiny_cfg.items():
            monkeypatch.setitem(getattr(bt, name), k, v)


def test_run_measures_every_implementation_and_part(tiny: None) -> None:
    result = bt.run(thread_counts=(1,), steps=1, rounds=2)
    entry = result["threads"]["1"]
    char, word = entry["char-rnn"], entry["word-lm"]
    assert set(char["per_second"]) == {"fastrnn", "fastrnn-numpy-glue", "torch"}
    assert set(word["per_second"]) == {"fastrnn", "torch"}
    for r in (char, word):
        assert all(v > 0 and math.isfinite(v) for v in r["per_second"].values())
        assert all(len(s) == 2 for s in r["samples_ms"].values())  # one sample per round
    assert set(char["page_faults_per_step"]) == set(char["per_second"])
    parts = char["parts_ms"]
    for part in ("lstm l1 fwd", "lstm l1 bwd", "clip", "optimizer", "other"):
        assert part in parts["fastrnn"] and part in parts["torch"], part
    # fastrnn's first layer looks its input projection up (embedding=); its head and loss fuse
    assert {"embedding+lstm l0 fwd", "embedding+lstm l0 bwd", "linear+loss fwd+bwd"} <= set(
        parts["fastrnn"]
    )
    assert {"embedding fwd", "lstm l0 fwd", "lstm l0 bwd", "embedding bwd"} <= set(parts["torch"])
    assert {"linear fwd", "loss fwd+bwd", "linear bwd"} <= set(parts["torch"])
    assert set(word["parts_ms"]["fastrnn"]) == set(word["parts_ms"]["torch"])
    table = bt.format_result(result)
    assert table.count("char-rnn        1") == 3 and table.count("word-lm         1") == 2
    assert "one step, median ms per part" in table
    json.dumps(result)  # JSON-able


def test_fastrnn_bench_training_command(
    tiny: None, capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    out = tmp_path / "r.json"
    code = main(
        [
            "bench",
            "--training",
            "--threads",
            "1",
            "--steps",
            "1",
            "--rounds",
            "1",
            "--json",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "fastrnn-numpy-glue" in captured.out and "vs torch" in captured.out
    assert list(json.loads(out.read_text())["threads"]) == ["1"]
