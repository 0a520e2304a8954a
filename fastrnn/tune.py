"""Random hyperparameter search, chosen on the validation set.

``random_search(objective, space, n_trials, seed)`` draws ``n_trials`` configurations from
``space``, calls ``objective(config)`` for each and keeps the one with the best returned score.
The objective must train on the training set and return a score measured on the *validation*
set. The test set has no place here: the search never sees it, so it cannot influence the
choice; evaluate the chosen configuration on the test set once, after the search::

    def objective(cfg):
        model = train(train_x, train_y, **cfg)
        return loss(model, val_x, val_y)           # validation only

    result = tune.random_search(objective, {"lr": tune.LogUniform(1e-4, 1e-1),
                                            "hidden": tune.IntUniform(16, 128),
                                            "act": tune.Choice(["relu", "tanh"])},
                                n_trials=20, seed=0)
    final = train(train_x, train_y, **result.best.params)
    test_score = loss(final, test_x, test_y)       # touched once, reported, never used to choose

Random search beats grid search when only a few hyperparameters matter (Bergstra & Bengio,
2012): every trial tries a new value of each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Uniform",
    "LogUniform",
    "IntUniform",
    "Choice",
    "Trial",
    "SearchResult",
    "random_search",
]


def _number(name: str, v: Any) -> float:
    if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool):
        raise TypeError(f"{name}: expected a number, got {v!r}")
    if not math.isfinite(v):
        raise ValueError(f"{name}: must be finite, got {v}")
    return float(v)


class Uniform:
    """A float drawn uniformly from [low, high)."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = _number("low", low), _number("high", high)
        if not self.low < self.high:
            raise ValueError(f"Uniform: low ({low}) must be below high ({high})")

    def sample(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(self.low, self.high))

    def __repr__(self) -> str:
        return f"Uniform({self.low}, {self.high})"


class LogUniform:
    """A float whose logarithm is uniform on [log low, log high): for scales such as learning
    rates and weight decays (0 < low < high)."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = _number("low", low), _number("high", high)
        if not 0 < self.low < self.high:
            raise ValueError(f"LogUniform: expected 0 < low < high, got {low}, {high}")

    def sample(self, rng: np.random.Generator) -> float:
        return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))

    def __repr__(self) -> str:
        return f"LogUniform({self.low}, {self.high})"


class IntUniform:
    """An int drawn uniformly from low..high, both included."""

    def __init__(self, low: int, high: int) -> None:
        for name, v in (("low", low), ("high", high)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise TypeError(f"{name}: expected an int, got {v!r}")
        if not low <= high:
            raise ValueError(f"IntUniform: low ({low}) must not exceed high ({high})")
        self.low, self.high = int(low), int(high)

    def sample(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.low, self.high, endpoint=True))

    def __repr__(self) -> str:
        return f"IntUniform({self.low}, {self.high})"


class Choice:
    """One of the given options, each equally likely."""

    def __init__(self, options: Sequence[Any]) -> None:
        if isinstance(options, (str, bytes)) or not isinstance(options, Sequence):
            raise TypeError(f"options: expected a list of options, got {options!r}")
        if not options:
            raise ValueError("options: expected at least one option")
        self.options = list(options)

    def sample(self, rng: np.random.Generator) -> Any:
        return self.options[int(rng.integers(len(self.options)))]

    def __repr__(self) -> str:
        return f"Choice({self.options!r})"


_SPACES = (Uniform, LogUniform, IntUniform, Choice)


@dataclass
class Trial:
    """One configuration and its validation score."""

    number: int
    params: dict[str, Any]
    score: float


@dataclass
class SearchResult:
    """All trials in the order they ran, and the best one on the validation score."""

    best: Trial
    trials: list[Trial] = field(default_factory=list)


def random_search(
    objective: Callable[[dict[str, Any]], float],
    space: Mapping[str, Any],
    n_trials: int,
    seed: int | None = 0,
    *,
    maximize: bool = False,
) -> SearchResult:
    """Draw ``n_trials`` configurations from ``space`` and return the one whose validation score
    (``objective(config)``) is best: lowest by default (a loss), highest with ``maximize=True``
    (an accuracy). Values in ``space`` are Uniform / LogUniform / IntUniform / Choice, or plain
    constants passed through unchanged. A NaN score never wins. Ties go to the earlier trial.
    """
    if not callable(objective):
        raise TypeError(f"objective: expected a callable, got {type(objective).__name__}")
    if not isinstance(space, Mapping) or not space:
        raise TypeError("space: expected a non-empty mapping of names to distributions")
    if not isinstance(n_trials, (int, np.integer)) or isinstance(n_trials, bool):
        raise TypeError(f"n_trials: expected an int, got {n_trials!r}")
    if n_trials < 1:
        raise ValueError(f"n_trials: must be >= 1, got {n_trials}")
    rng = np.random.default_rng(seed)
    trials: list[Trial] = []
    best: Trial | None = None
    for k in range(int(n_trials)):
        params = {
            name: dist.sample(rng) if isinstance(dist, _SPACES) else dist
            for name, dist in space.items()
        }
        raw = objective(dict(params))
        try:
            score = float(raw)
        except (TypeError, ValueError):
            raise TypeError(
                f"objective: must return a number (the validation score), got {raw!r}"
            ) from None
        trial = Trial(k, params, score)
        trials.append(trial)
        if math.isnan(score):
            continue
        if best is None or (score > best.score if maximize else score < best.score):
            best = trial
    if best is None:
        raise ValueError("objective: every trial returned NaN; no configuration can be chosen")
    return SearchResult(best=best, trials=trials)
