"""Mini-batch iteration and train/validation/test splits."""

from __future__ import annotations

import numpy as np
import pytest

from fastrnn import data


def test_minibatches_cover_every_row_once_per_epoch():
    x = np.arange(23)[:, None] * np.ones((1, 2))
    y = np.arange(23)
    batches = data.MiniBatches(x, y, batch_size=5, seed=0)
    assert len(batches) == 5
    for _ in range(2):
        seen = []
        for xb, yb in batches:
            assert len(xb) == len(yb) <= 5
            np.testing.assert_array_equal(xb[:, 0], yb)  # rows stay paired
            seen.extend(yb.tolist())
        assert sorted(seen) == list(range(23))
        assert seen != list(range(23))  # shuffled


def test_seeded_and_epochs_differ():
    y = np.arange(40)
    a = [b.tolist() for b in data.minibatches(y, batch_size=8, seed=3)]
    b = [b.tolist() for b in data.minibatches(y, batch_size=8, seed=3)]
    assert a == b
    loader = data.MiniBatches(y, batch_size=8, seed=3)
    first = [b.tolist() for b in loader]
    second = [b.tolist() for b in loader]
    assert first == a and second != first


def test_no_shuffle_and_drop_last():
    y = np.arange(10)
    out = list(data.minibatches(y, batch_size=4, shuffle=False))
    assert [b.tolist() for b in out] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    out = list(data.minibatches(y, batch_size=4, shuffle=False, drop_last=True))
    assert len(out) == 2 and len(data.MiniBatches(y, batch_size=4, drop_last=True)) == 2
    assert all(len(b) == 4 for b in data.minibatches(y, batch_size=4, seed=1, drop_last=True))


def test_split_is_disjoint_complete_and_seeded():
    x = np.arange(100) * 10
    y = np.arange(100)
    train, val, test = data.train_val_test_split(x, y, val=0.2, test=0.1, seed=5)
    assert len(train[0]) == 70 and len(val[0]) == 20 and len(test[0]) == 10
    for xs, ys in (train, val, test):
        np.testing.assert_array_equal(xs, ys * 10)
    ids = np.concatenate([train[1], val[1], test[1]])
    assert sorted(ids.tolist()) == list(range(100))
    again = data.train_val_test_split(x, y, val=0.2, test=0.1, seed=5)
    np.testing.assert_array_equal(again[2][1], test[1])
    other = data.train_val_test_split(x, y, val=0.2, test=0.1, seed=6)
    assert not np.array_equal(other[2][1], test[1])
    single = data.train_val_test_split(y, val=0.5, test=0.0)
    assert isinstance(single[0], np.ndarray) and len(single[2]) == 0


def test_errors():
    with pytest.raises(ValueError, match="rows"):
        data.MiniBatches(np.zeros(3), np.zeros(4), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        data.MiniBatches(np.zeros(3), batch_size=0)
    with pytest.raises(TypeError, match="arrays"):
        data.MiniBatches([1, 2, 3], batch_size=2)
    with pytest.raises(ValueError, match="training rows"):
        data.train_val_test_split(np.zeros(10), val=0.5, test=0.5)
    with pytest.raises(ValueError, match="val"):
        data.train_val_test_split(np.zeros(10), val=1.5)
