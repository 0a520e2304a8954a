"""Checkpoints: round trips, atomic writes, no pickle, clear errors for bad files; transfer
learning from a saved state dict (frozen layers, only the last one fine-tuned)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from nn_support import layer_backend  # noqa: F401

from fastrnn import io, nn, optim


def test_round_trip_keeps_order_dtypes_and_values(tmp_path):
    sd = {
        "b.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "a.bias": np.array([1.5, -2.0]),
        "bn.num_batches_tracked": np.array(3, dtype=np.int64),
    }
    path = tmp_path / "model.npz"
    io.save(path, sd)
    out = io.load(path)
    assert list(out) == list(sd)
    for k, v in sd.items():
        assert out[k].dtype == v.dtype
        np.testing.assert_array_equal(out[k], v)
    assert os.listdir(tmp_path) == ["model.npz"]  # no temporary file left behind
    other = tmp_path / "no_suffix"
    io.save(str(other), sd)  # saved exactly at the given path
    assert other.exists() and list(io.load(other)) == list(sd)


def test_overwrite_is_atomic_and_failed_save_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    io.save(path, {"w": np.zeros(3)})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save(path, {"w": np.ones(3)})
    monkeypatch.undo()
    np.testing.assert_array_equal(io.load(path)["w"], np.zeros(3))
    assert os.listdir(tmp_path) == ["ckpt.npz"]
    io.save(path, {"w": np.ones(3)})
    np.testing.assert_array_equal(io.load(path)["w"], np.ones(3))


def test_bad_values_are_rejected(tmp_path):
    path = tmp_path / "x.npz"
    with pytest.raises(TypeError, match="'w'"):
        io.save(path, {"w": [1.0, 2.0]})
    with pytest.raises(TypeError, match="pickle"):
        io.save(path, {"w": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(TypeError, match="keys"):
        io.save(path, {1: np.zeros(2)})
    with pytest.raises(TypeError, match="mapping"):
        io.save(path, [np.zeros(2)])
    with pytest.raises(ValueError, match="reserved"):
        io.save(path, {io.MARKER: np.zeros(2)})
    assert not path.exists()


def test_truncated_and_foreign_files_raise_value_error(tmp_path):
    good = tmp_path / "good.npz"
    io.save(good, {"w": np.arange(1000.0)})
    raw = good.read_bytes()
    cases = {
        "truncated.npz": raw[: len(raw) // 2],
        "empty.npz": b"",
        "text.npz": b"hello, this is not a checkpoint\n",
        "pickle.npz": pickle.dumps({"w": np.zeros(2)}),
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match="not a valid fastrnn checkpoint"):
            io.load(tmp_path / name)
    np.save(tmp_path / "single.npy", np.zeros(3))
    np.savez(tmp_path / "plain.npz", w=np.zeros(3))
    for name in ("single.npy", "plain.npz"):
        with pytest.raises(ValueError, match="not a valid fastrnn checkpoint"):
            io.load(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        io.load(tmp_path / "missing.npz")


def test_model_save_load_identical_predictions(tmp_path):
    nn.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(12, 4),
    )
    x = np.random.default_rng(0).standard_normal((5, 1, 4, 4)).astype(np.float32)
    model(x)  # moves the running statistics
    model.eval()
    io.save(tmp_path / "m.npz", model.state_dict())
    nn.manual_seed(2)
    fresh = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(12, 4),
    ).eval()
    assert not np.array_equal(fresh(x), model(x))
    fresh.load_state_dict(io.load(tmp_path / "m.npz"))
    np.testing.assert_array_equal(fresh(x), model(x))


def _mlp():
    return nn.Sequential(
        nn.Linear(2, 16, dtype=np.float64),
        nn.Tanh(),
        nn.Linear(16, 16, dtype=np.float64),
        nn.Tanh(),
        nn.Linear(16, 2, dtype=np.float64),
    )


def _train(model, opt, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss, d = nn.functional.softmax_cross_entropy(model(x), y)
        model.backward(d)
        opt.step()
    return nn.functional.softmax_cross_entropy(model(x), y)[0]


def test_transfer_learning_freezes_all_but_the_last_layer(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 2))
    y_source = (x[:, 0] > 0).astype(np.int64)
    y_target = (x[:, 0] < 0).astype(np.int64)  # a related task: same features, new read-out
    nn.manual_seed(0)
    source = _mlp()
    _train(source, optim.Adam(source.parameters(), lr=0.05), x, y_source, 100)
    io.save(tmp_path / "source.npz", source.state_dict())

    target = _mlp()
    target.load_state_dict(io.load(tmp_path / "source.npz"))
    for layer in list(target)[:-1]:
        layer.requires_grad_(False)
    frozen = {k: v.copy() for k, v in target.state_dict().items() if not k.startswith("4.")}
    last = target[4].weight.data.copy()
    before = nn.functional.softmax_cross_entropy(target(x), y_target)[0]
    opt = optim.Adam(target.parameters(), lr=0.05)  # frozen parameters are skipped
    after = _train(target, opt, x, y_target, 100)
    assert after < 0.2 < before
    for k, v in frozen.items():
        np.testing.assert_array_equal(target.state_dict()[k], v, err_msg=k)
        assert not dict(target.named_parameters())[k].grad.any()
    assert not np.array_equal(target[4].weight.data, last)


def _npz_with_header(path, shape, payload=b""):
    """An .npz whose one member declares ``shape`` (float32) but stores only ``payload``."""
    import io as _io
    import zipfile

    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    buf = _io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(io.MARKER + ".npy", _npy_bytes(np.array(io.FORMAT_VERSION, dtype=np.int64)))
        z.writestr("w.npy", buf.getvalue() + payload)


def _npy_bytes(a):
    import io as _io

    buf = _io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_load_checks_declared_sizes_before_allocating(tmp_path):
    # 10^12 elements declared: refused from the header, not by NumPy's MemoryError
    path = tmp_path / "huge.npz"
    _npz_with_header(path, (10**6, 10**6))
    with pytest.raises(ValueError, match="max_bytes"):
        io.load(path)
    # a small compressed file that inflates to 1 GiB: refused under a smaller limit ...
    bomb = tmp_path / "bomb.npz"
    _npz_with_header(bomb, (1 << 28,), b"\0" * (1 << 30))
    assert bomb.stat().st_size < 2 << 20
    with pytest.raises(ValueError, match="max_bytes=1048576"):
        io.load(bomb, max_bytes=1 << 20)
    # ... and an honest file loads under a limit it fits
    ok = tmp_path / "ok.npz"
    io.save(ok, {"w": np.ones(1000, np.float32)})
    # the limit counts every array, the 8-byte format marker too
    assert io.load(ok, max_bytes=4008)["w"].shape == (1000,)
    with pytest.raises(ValueError, match="max_bytes"):
        io.load(ok, max_bytes=4007)
    assert io.load(ok, max_bytes=None)["w"].shape == (1000,)
    for bad, exc in (("1", TypeError), (True, TypeError), (-1, ValueError)):
        with pytest.raises(exc, match="max_bytes"):
            io.load(ok, max_bytes=bad)


def test_load_reads_only_regular_files(tmp_path):
    import signal

    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    previous = signal.signal(signal.SIGALRM, signal.default_int_handler)
    signal.alarm(30)  # a FIFO must be refused, not waited on
    try:
        with pytest.raises(ValueError, match="regular file"):
            io.load(fifo)
        with pytest.raises(ValueError, match="regular file"):
            io.load(tmp_path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_save_follows_the_umask(tmp_path):
    import stat

    previous = os.umask(0o027)
    try:
        io.save(tmp_path / "a.npz", {"w": np.ones(3)})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.npz").stat().st_mode) == 0o640
