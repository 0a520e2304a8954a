"""Distributed data parallel training of fastrnn.torch modules (torch.distributed, gloo, CPU).

Two spawned processes, each on half of every batch under DistributedDataParallel, must end with
the same parameters as one process trained on the whole batch: DDP averages the half-batch
gradients, which is the whole batch's mean gradient.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from fastrnn.examples import distributed_lstm as example  # noqa: E402

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available",
)


def test_two_processes_match_one_process_on_the_whole_batch():
    steps, batch, lr = 4, 8, 0.5
    results = example.run_distributed(
        world=2, steps=steps, batch=batch, lr=lr, dtype="float64", timeout=300
    )
    single = example.run_single(steps=steps, batch=batch, lr=lr, dtype="float64")
    start = example.parameters_of(example.make_model(0, torch.float64))

    assert len(results) == 2
    names = list(single["params"])
    assert any(n.startswith("lstm.weight_hh_l1") for n in names)
    for r in results:
        assert list(r["params"]) == names
        assert len(r["losses"]) == steps
        for n in names:
            np.testing.assert_allclose(
                r["params"][n], single["params"][n], rtol=1e-10, atol=1e-12, err_msg=n
            )
    # the ranks saw different halves of the data ...
    assert not np.allclose(results[0]["losses"], results[1]["losses"])
    # ... whose mean loss is the whole batch's (equal halves)
    np.testing.assert_allclose(
        (results[0]["losses"] + results[1]["losses"]) / 2, single["losses"], rtol=1e-10
    )
    # and training moved every parameter, so the comparison is not between initial values
    for n in names:
        assert not np.allclose(single["params"][n], start[n]), n


def test_command_exits_cleanly_with_output_to_a_pipe():
    # Its workers once aborted at interpreter exit ("terminate called without an active
    # exception", exit code -6) about one run in three when the output went to a pipe.
    import subprocess
    import sys

    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "fastrnn.examples.distributed_lstm", "--steps", "2"],
            capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "terminate called" not in done.stderr
        assert "max |parameter difference|" in done.stdout
