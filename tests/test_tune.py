"""Random search: the spaces, choosing on the validation score, and a test set that is never
used for choosing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from nn_support import layer_backend  # noqa: F401

from fastrnn import data, nn, optim, tune


def test_spaces_sample_in_range_and_seeded():
    space = {
        "lr": tune.LogUniform(1e-4, 1e-1),
        "p": tune.Uniform(0.0, 0.5),
        "hidden": tune.IntUniform(2, 4),
        "act": tune.Choice(["relu", "tanh"]),
        "fixed": 7,
    }
    seen = []
    result = tune.random_search(lambda cfg: seen.append(cfg) or 0.0, space, 200, seed=1)
    assert len(result.trials) == 200 and len(seen) == 200
    lrs = np.array([c["lr"] for c in seen])
    assert lrs.min() >= 1e-4 and lrs.max() < 1e-1
    # log-uniform: about a third of the draws in each decade
    assert 0.2 < np.mean(lrs < 1e-3) < 0.45
    assert all(0 <= c["p"] < 0.5 for c in seen)
    assert {c["hidden"] for c in seen} == {2, 3, 4}
    assert {c["act"] for c in seen} == {"relu", "tanh"}
    assert all(c["fixed"] == 7 for c in seen)
    again = tune.random_search(lambda cfg: 0.0, space, 200, seed=1)
    assert [t.params for t in again.trials] == [t.params for t in result.trials]


def test_best_is_chosen_on_the_returned_score():
    result = tune.random_search(lambda c: (c["x"] - 0.3) ** 2, {"x": tune.Uniform(0, 1)}, 50)
    assert result.best.score == min(t.score for t in result.trials)
    assert abs(result.best.params["x"] - 0.3) < 0.05
    high = tune.random_search(lambda c: c["x"], {"x": tune.Uniform(0, 1)}, 20, maximize=True)
    assert high.best.score == max(t.score for t in high.trials)
    nan_first = iter([math.nan, 2.0, 1.0])
    res = tune.random_search(lambda c: next(nan_first), {"x": 1}, 3)
    assert res.best.number == 2


def _fit(cfg, x, y):
    nn.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(2, cfg["hidden"], dtype=np.float64),
        nn.Tanh(),
        nn.Linear(cfg["hidden"], 2, dtype=np.float64),
    )
    opt = optim.Adam(model.parameters(), lr=cfg["lr"])
    for _ in range(30):
        opt.zero_grad()
        _, d = nn.functional.softmax_cross_entropy(model(x), y)
        model.backward(d)
        opt.step()
    return model


def _loss(model, x, y):
    model.eval()
    with nn.no_grad():
        return nn.functional.softmax_cross_entropy(model(x), y)[0]


def test_choice_uses_validation_never_test():
    """The objective sees training and validation data only; the test set is evaluated once,
    after the choice, and a test set that would have chosen differently changes nothing."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 2))
    y = (x[:, 0] * x[:, 1] > 0).astype(np.int64)
    (xtr, ytr), (xva, yva), (xte, yte) = data.train_val_test_split(x, y, val=0.2, test=0.2)
    space = {"lr": tune.LogUniform(1e-3, 1e-1), "hidden": tune.IntUniform(2, 8)}
    # the test set gets *flipped* labels: choosing on it would pick a different (worse) model
    yte_adversarial = 1 - yte
    calls = []

    def objective(cfg):
        calls.append(cfg)
        return _loss(_fit(cfg, xtr, ytr), xva, yva)

    result = tune.random_search(objective, space, n_trials=6, seed=2)
    val_scores = [t.score for t in result.trials]
    assert result.best.score == min(val_scores)
    test_scores = [_loss(_fit(t.params, xtr, ytr), xte, yte_adversarial) for t in result.trials]
    assert int(np.argmin(test_scores)) != result.best.number  # test would choose differently
    assert len(calls) == 6  # the search ran each trial once and never looked at the test set
    final = _fit(result.best.params, xtr, ytr)
    assert _loss(final, xte, yte) < math.log(2)  # the one test evaluation: better than chance


def test_errors():
    with pytest.raises(ValueError, match="LogUniform"):
        tune.LogUniform(0.0, 1.0)
    with pytest.raises(ValueError, match="Uniform"):
        tune.Uniform(1.0, 1.0)
    with pytest.raises(TypeError, match="int"):
        tune.IntUniform(1.5, 3)
    with pytest.raises(ValueError, match="option"):
        tune.Choice([])
    with pytest.raises(ValueError, match="n_trials"):
        tune.random_search(lambda c: 0.0, {"x": 1}, 0)
    with pytest.raises(TypeError, match="number"):
        tune.random_search(lambda c: "bad", {"x": 1}, 1)
    with pytest.raises(ValueError, match="NaN"):
        tune.random_search(lambda c: math.nan, {"x": 1}, 2)
