"""``fastrnn digits``: a small CNN on scikit-learn's bundled 8x8 handwritten digits.

The practical advice of the classic lecture in one run: mini-batches, convolutions with batch
normalization and ReLU, max pooling, dropout, softmax with cross-entropy, Adam; the data split
into training, validation and test parts; validation accuracy after every epoch; the test set
touched exactly once, at the end. ``--search N`` draws N hyperparameter configurations
(``fastrnn.tune.random_search``), picks the best on the validation set, trains it again and
tests it once.

The 1,797 images come with scikit-learn (``sklearn.datasets.load_digits``): nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from fastrnn import nn
from fastrnn.examples._common import (
    CommandError,
    Progress,
    ThreadChoice,
    check_output_file,
    positive_float,
    positive_int,
    probability,
    write_json_atomic,
)

FORMAT = "fastrnn.digits"
FORMAT_VERSION = 1
CHECKPOINT_JSON = "checkpoint.json"
DEFAULTS = {"channels": 32, "lr": 3e-3, "dropout": 0.25, "batch_size": 32, "weight_decay": 1e-4}
DEFAULT_EPOCHS = 20
VAL_FRACTION = 0.2
TEST_FRACTION = 0.2


def load_data(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The digits as float32 (N, 1, 8, 8) images, standardised with the training part's
    statistics, split into train / val / test with ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise CommandError(
            "fastrnn digits needs scikit-learn (its bundled digits data set): "
            'pip install "fastrnn[examples]"'
        ) from None
    from fastrnn.data import train_val_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    train, val, test = train_val_test_split(x, y, val=VAL_FRACTION, test=TEST_FRACTION, seed=seed)
    mean, std = float(train[0].mean()), float(train[0].std())

    def norm(part: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return np.ascontiguousarray((part[0] - mean) / std, dtype=np.float32), part[1]

    return {"train": norm(train), "val": norm(val), "test": norm(test)}


def build_model(channels: int, dropout: float, seed: int) -> nn.Sequential:
    """conv3x3(1->c) BN ReLU, conv3x3(c->2c) BN ReLU, maxpool 2 (8x8 -> 4x4), dropout,
    linear(2c*16 -> 10)."""
    nn.manual_seed(seed)
    c = channels
    return nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.Conv2d(c, 2 * c, 3, padding=1),
        nn.BatchNorm2d(2 * c),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(dropout, seed=seed + 1),
        nn.Flatten(),
        nn.Linear(2 * c * 16, 10),
    )


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    with nn.no_grad():
        for start in range(0, len(x), batch_size):
            logits = model(x[start : start + batch_size])
            correct += int((logits.argmax(axis=1) == y[start : start + batch_size]).sum())
    model.train()
    return correct / len(x)


def train(
    data: dict[str, tuple[np.ndarray, np.ndarray]],
    hp: dict[str, Any],
    epochs: int,
    seed: int,
    *,
    progress: bool = True,
    label: str = "digits",
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Train on the training part; validation accuracy after every epoch. Returns the model
    and the per-epoch history. The test part is not touched here."""
    from fastrnn import optim
    from fastrnn.data import MiniBatches
    from fastrnn.nn.functional import softmax_cross_entropy

    model = build_model(int(hp["channels"]), float(hp["dropout"]), seed)
    opt = optim.AdamW(
        model.parameters(), lr=float(hp["lr"]), weight_decay=float(hp["weight_decay"])
    )
    x, y = data["train"]
    batches = MiniBatches(x, y, batch_size=int(hp["batch_size"]), shuffle=True, seed=seed)
    history: list[dict[str, Any]] = []
    bar = Progress(epochs * len(batches), label, "batch", enabled=progress)
    try:
        for epoch in range(1, epochs + 1):
            losses = []
            for xb, yb in batches:
                logits = model(xb)
                loss, dlogits = softmax_cross_entropy(logits, yb)
                if not np.isfinite(loss):
                    raise CommandError(
                        f"the training loss became {loss} in epoch {epoch}; lower --lr"
                    )
                model.backward(dlogits)
                opt.step()
                opt.zero_grad()
                losses.append(loss)
                bar.update(1, loss=f"{loss:.3f}")
            val_acc = accuracy(model, *data["val"])
            history.append(
                {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_accuracy": val_acc}
            )
            bar.update(0, val_acc=f"{val_acc:.2%}")
            bar.write(
                f"{label} epoch {epoch:>2}/{epochs}: train loss {np.mean(losses):.4f}, "
                f"validation accuracy {val_acc:.2%}"
            )
    finally:
        bar.close()
    return model, history


def _timing_step(
    data: dict[str, tuple[np.ndarray, np.ndarray]], channels: int, batch_size: int, seed: int
) -> Any:
    """A training step of a scratch model on the first batch, for timing thread counts."""
    from fastrnn import optim
    from fastrnn.nn.functional import softmax_cross_entropy

    model = build_model(channels, 0.0, seed)
    opt = optim.AdamW(model.parameters())
    xb, yb = data["train"][0][:batch_size], data["train"][1][:batch_size]

    def step() -> None:
        _, dlogits = softmax_cross_entropy(model(xb), yb)
        model.backward(dlogits)
        opt.step()
        opt.zero_grad()

    return step


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "digits",
        help="a small CNN on scikit-learn's 8x8 digits (train/val/test, --search N)",
        description=(__doc__ or "").split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument(
        "--epochs",
        type=positive_int,
        default=DEFAULT_EPOCHS,
        help=f"passes over the training part (default {DEFAULT_EPOCHS})",
    )
    p.add_argument(
        "--channels",
        type=positive_int,
        default=DEFAULTS["channels"],
        help=f"channels of the first convolution (default {DEFAULTS['channels']})",
    )
    p.add_argument(
        "--lr",
        type=positive_float,
        default=DEFAULTS["lr"],
        help=f"AdamW learning rate (default {DEFAULTS['lr']:g})",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=DEFAULTS["weight_decay"],
        help=f"AdamW weight decay (default {DEFAULTS['weight_decay']:g})",
    )
    p.add_argument(
        "--dropout",
        type=probability,
        default=DEFAULTS["dropout"],
        help=f"dropout before the classifier (default {DEFAULTS['dropout']:g})",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=DEFAULTS["batch_size"],
        help=f"mini-batch size (default {DEFAULTS['batch_size']})",
    )
    p.add_argument(
        "--search",
        type=positive_int,
        metavar="N",
        default=None,
        help="random hyperparameter search: N trials chosen on validation accuracy, "
        "then the best is trained again and tested once",
    )
    p.add_argument(
        "--search-epochs",
        type=positive_int,
        default=None,
        help="epochs per search trial (default: --epochs)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="also save the trained model (weights + checkpoint.json) here",
    )
    p.add_argument("--json", metavar="PATH", help="write a JSON summary of the run here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="threads of the kernels (default: OMP_NUM_THREADS when set, else 1 or all CPUs, "
        "whichever ran the first steps faster)",
    )
    p.set_defaults(func=cmd_digits)


def cmd_digits(args: argparse.Namespace) -> int:
    import fastrnn
    from fastrnn import io, tune

    if args.weight_decay < 0:
        raise CommandError(f"--weight-decay: expected a number >= 0, got {args.weight_decay}")
    json_path = check_output_file(args.json, "--json") if args.json else None
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise CommandError(f"--out: {args.out} exists and is not a directory")
    t0 = time.perf_counter()
    data = load_data(args.seed)
    sizes = {k: len(v[1]) for k, v in data.items()}
    choice = getattr(args, "threads_note", None)
    if isinstance(choice, ThreadChoice):
        choice.measure(_timing_step(data, args.channels, args.batch_size, args.seed))
    print(
        f"digits: {sizes['train']} training, {sizes['val']} validation, {sizes['test']} test "
        f"images (8x8); threads: {getattr(args, 'threads_note', fastrnn.get_num_threads())}"
    )
    hp = {
        "channels": args.channels,
        "lr": args.lr,
        "dropout": args.dropout,
        "batch_size": args.batch_size,
        "weight_decay": args.weight_decay,
    }
    search_summary = None
    if args.search:
        space = {
            "channels": tune.Choice([16, 24, 32, 48]),
            "lr": tune.LogUniform(3e-4, 1e-2),
            "dropout": tune.Uniform(0.0, 0.5),
            "batch_size": tune.Choice([16, 32, 64]),
            "weight_decay": tune.LogUniform(1e-6, 1e-2),
        }
        trial_epochs = args.search_epochs or args.epochs
        counter = {"k": 0}

        def objective(cfg: dict[str, Any]) -> float:
            counter["k"] += 1
            _, history = train(
                data,
                cfg,
                trial_epochs,
                args.seed + counter["k"],
                progress=not args.no_progress,
                label=f"trial {counter['k']}/{args.search}",
            )
            score = history[-1]["val_accuracy"]
            print(
                f"trial {counter['k']}: validation accuracy {score:.2%} with "
                + ", ".join(f"{k}={_fmt(v)}" for k, v in cfg.items()),
                flush=True,
            )
            return score

        result = tune.random_search(objective, space, args.search, seed=args.seed, maximize=True)
        hp = dict(result.best.params)
        print(
            f"best of {args.search} trials on validation: {result.best.score:.2%} with "
            + ", ".join(f"{k}={_fmt(v)}" for k, v in hp.items())
        )
        search_summary = [
            {"trial": t.number, "params": t.params, "val_accuracy": t.score} for t in result.trials
        ]

    model, history = train(data, hp, args.epochs, args.seed, progress=not args.no_progress)
    test_acc = accuracy(model, *data["test"])  # the one and only look at the test set
    seconds = time.perf_counter() - t0
    print(
        f"test accuracy {test_acc:.2%} ({round(test_acc * sizes['test'])}/{sizes['test']}); "
        f"final validation accuracy {history[-1]['val_accuracy']:.2%}; {seconds:.1f} s"
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        io.save(out / "weights.npz", model.state_dict())
        write_json_atomic(
            out / CHECKPOINT_JSON,
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "model": hp,
                "files": {"weights": {"name": "weights.npz"}},
                "test_accuracy": test_acc,
            },
        )
        print(f"model saved in {out}")
    if json_path is not None:
        write_json_atomic(
            json_path,
            {
                "command": "digits",
                "seconds": seconds,
                "epochs": args.epochs,
                "hyperparameters": hp,
                "sizes": sizes,
                "history": history,
                "val_accuracy": history[-1]["val_accuracy"],
                "test_accuracy": test_acc,
                "search": search_summary,
                "threads": fastrnn.get_num_threads(),
            },
        )
    return 0


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
