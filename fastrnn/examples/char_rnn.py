"""``fastrnn char-rnn train`` / ``fastrnn char-rnn sample``: a character-level LSTM.

The classic demo of recurrent networks: read a text one character at a time, predict the next
one, and after training sample from the model to watch it write like its corpus. Built on the
layer API (``fastrnn.nn``: Embedding -> 2-layer LSTM -> Dropout -> Linear, softmax
cross-entropy, Adam, gradient clipping) and the fused LSTM kernels.

Training is truncated backpropagation through time: the training text is cut into
``batch_size`` contiguous streams, each step reads the next ``seq_len`` characters of every
stream and starts from the LSTM state the previous step ended with (so the model sees context
longer than ``seq_len`` while gradients flow back ``seq_len`` steps). The last part of the
corpus is held out; validation loss is reported in bits per character, next to the corpus's
unigram entropy (what a model that ignores context would score).

Checkpoint directory (``--out``): ``checkpoint.json`` (format marker, vocabulary, model and
training hyperparameters, progress, history, the files below with their SHA-256), the weights
``weights-<step>.npz`` and the optimizer state ``optimizer-<step>.npz`` (``fastrnn.io``, no
pickle), and ``curves.png``. Every file is written to a temporary name and renamed; the JSON is
replaced last and names the weights it belongs to, so an interrupted save leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastrnn import nn
from fastrnn.examples._common import (
    CommandError,
    Progress,
    ThreadChoice,
    check_output_file,
    finite_or_none,
    matplotlib_pyplot,
    nonnegative_int,
    positive_float,
    positive_int,
    probability,
    read_json,
    save_figure,
    write_json_atomic,
)

FORMAT = "fastrnn.char-rnn"
FORMAT_VERSION = 1
CHECKPOINT_JSON = "checkpoint.json"
LOG2E = 1.0 / math.log(2.0)

# Defaults of `fastrnn char-rnn train`, chosen by measurement on the 2-core development machine
# (README): 2.5 minutes of training (one thread, shared machine) reached 1.90 bits/char on the
# validation part with hidden 192 (27k characters/s) and with hidden 128 (57k characters/s),
# 2.00 with hidden 256 (13k characters/s); the unigram entropy is 4.55. The --minutes budget
# bounds the run on slower or busier machines; --steps ends it first on faster ones.
MODEL_DEFAULTS = {"hidden": 192, "layers": 2, "embedding": 64}
TRAIN_DEFAULTS = {
    "seq_len": 64,
    "batch_size": 32,
    "lr": 3e-3,
    "dropout": 0.0,
    "clip": 5.0,
}
DEFAULT_STEPS = 2000
DEFAULT_MINUTES = 2.5
DEFAULT_EVAL_EVERY = 500
DEFAULT_SAMPLE_EVERY = 250
CURVE_EVERY = 25  # steps per point of the training curve
VAL_FRACTION = 0.05
SAMPLE_TEMPERATURE = 0.8


# ------------------------------------------------------------------------------------------------
# vocabulary and data
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocabulary:
    chars: str  # sorted, distinct

    @classmethod
    def from_text(cls, text: str) -> Vocabulary:
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str, what: str = "text") -> np.ndarray:
        index = {c: i for i, c in enumerate(self.chars)}
        try:
            return np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))
        except KeyError:
            unknown = sorted({c for c in text if c not in index})
            shown = ", ".join(repr(c) for c in unknown[:10])
            raise CommandError(
                f"{what} has characters the model's vocabulary lacks: {shown}"
                + (" ..." if len(unknown) > 10 else "")
            ) from None

    def decode(self, ids: Any) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def unigram_entropy(text: str) -> float:
    """Bits per character of the best model that ignores context: -sum p log2 p."""
    counts = np.array(list(Counter(text).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def split_corpus(text: str, seq_len: int, batch_size: int) -> tuple[str, str]:
    """(train, validation): the last ``VAL_FRACTION`` of the text is held out."""
    n_val = max(int(len(text) * VAL_FRACTION), seq_len + 1)
    need = batch_size * (seq_len + 1) + n_val
    if len(text) < need:
        raise CommandError(
            f"the corpus has {len(text):,} characters; --batch-size {batch_size} x --seq-len "
            f"{seq_len} needs at least {need:,} (training streams plus a validation part): "
            "use a longer text or smaller --batch-size / --seq-len"
        )
    return text[:-n_val], text[-n_val:]


def streams(ids: np.ndarray, n: int) -> np.ndarray:
    """Cut ``ids`` into ``n`` contiguous streams, time-major: (len(ids) // n, n)."""
    length = len(ids) // n
    return np.ascontiguousarray(ids[: n * length].reshape(n, length).T)


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------


def build_model(
    vocab_size: int, hidden: int, layers: int, embedding: int, dropout: float, seed: int
) -> Any:
    nn.manual_seed(seed)
    return CharRNN(vocab_size, hidden, layers, embedding, dropout, seed)


class CharRNN(nn.Module):
    """Embedding -> LSTM (``layers`` deep, dropout between layers) -> Dropout -> Linear.

    ``forward(ids (T, N) int, state) -> (logits (T, N, V), state)``; ``backward(dlogits)``
    accumulates every parameter's gradient (the state carried in from the previous batch gets
    no gradient: truncated backpropagation through time). The LSTM takes the ids with
    ``embedding=``: on the CPU it looks its first layer's input projection up per character
    (one row of ``embed.weight W_ih^T`` per character of the vocabulary) instead of multiplying
    every embedded character by W_ih.
    """

    def __init__(
        self, vocab_size: int, hidden: int, layers: int, embedding: int, dropout: float, seed: int
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embedding)
        self.lstm = nn.LSTM(embedding, hidden, num_layers=layers, dropout=dropout, seed=seed + 1)
        self.drop = nn.Dropout(dropout, seed=seed + 2)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, ids: Any, state: Any = None) -> tuple[Any, Any]:
        y, state = self.lstm(ids, state, embedding=self.embed)
        T, N, H = y.shape
        # the head sees a 2-D (T*N, H) matrix: one GEMM (NumPy's matmul of a 3-D array with a
        # transposed 2-D one can take a slow non-BLAS loop)
        logits = self.head(self.drop(y).reshape(T * N, H))
        return logits.reshape(T, N, -1), state

    def backward(self, dlogits: Any) -> None:
        T, N, V = dlogits.shape
        dy = self.drop.backward(self.head.backward(dlogits.reshape(T * N, V)).reshape(T, N, -1))
        self.lstm.backward(dy)  # the embedding's gradient too

    def loss_backward(self, ids: Any, targets: Any, state: Any = None) -> tuple[float, Any]:
        """Training forward and backward at once: the mean cross-entropy of predicting
        ``targets`` (T, N), with every parameter's gradient accumulated, and the state to carry.
        The head and the loss run fused (``nn.Linear.cross_entropy``): same numbers as
        ``forward`` + ``softmax_cross_entropy`` + ``backward``, without the logits."""
        y, state = self.lstm(ids, state, embedding=self.embed)
        T, N, H = y.shape
        loss, dy = self.head.cross_entropy(self.drop(y).reshape(T * N, H), targets.reshape(-1))
        self.lstm.backward(self.drop.backward(dy.reshape(T, N, H)))
        return loss, state


def train_step(
    model: Any, optimizer: Any, params: list[Any], x: Any, y: Any, state: Any, clip: float
) -> tuple[float, Any]:
    """One step of truncated backpropagation through time: forward from the carried ``state``,
    loss and backward (``CharRNN.loss_backward``), gradient clipping, the optimizer's update,
    gradients zeroed. Returns the loss and the state to carry; a non-finite loss returns
    before any parameter is updated."""
    from fastrnn import optim

    loss, state = model.loss_backward(x, y, state)
    if not math.isfinite(loss):
        optimizer.zero_grad()
        return loss, state
    optim.clip_grad_norm_(params, clip)
    optimizer.step()
    optimizer.zero_grad()
    return loss, state


def _timing_step(vocab_size: int, hp: dict[str, Any], ids: np.ndarray, seed: int) -> Any:
    """A training step of a scratch copy of the model on the first batch (state carried), for
    timing thread counts: the run's own model and optimizer stay untouched."""
    from fastrnn import optim

    model = build_model(
        vocab_size, hp["hidden"], hp["layers"], hp["embedding"], hp["dropout"], seed
    )
    params = list(model.parameters())
    optimizer = optim.Adam(params, lr=hp["lr"])
    x, y = ids[: hp["seq_len"]], ids[1 : hp["seq_len"] + 1]
    state: list[Any] = [None]

    def step() -> None:
        _, state[0] = train_step(model, optimizer, params, x, y, state[0], hp["clip"])

    return step


def evaluate(model: Any, ids: np.ndarray, n_streams: int = 32, chunk: int = 512) -> float:
    """Mean cross-entropy (bits per character) of predicting ``ids[1:]`` from what precedes,
    over ``n_streams`` contiguous streams with the state carried across chunks."""
    from fastrnn.nn.functional import log_softmax

    n_streams = max(1, min(n_streams, (len(ids) - 1) // 2))
    data = streams(ids, n_streams)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    state = None
    try:
        with nn.no_grad():
            for start in range(0, data.shape[0] - 1, chunk):
                x = data[start : start + chunk]
                y = data[start + 1 : start + chunk + 1]
                x = x[: len(y)]
                logits, state = model(x, state)
                logp = log_softmax(logits)
                picked = np.take_along_axis(logp, y[..., None], axis=-1)
                total -= float(picked.sum(dtype=np.float64))
                count += y.size
    finally:
        model.train(was_training)
    return total / max(count, 1) * LOG2E


def sample(
    model: Any,
    vocab: Vocabulary,
    length: int,
    temperature: float,
    prime: str,
    rng: np.random.Generator,
) -> str:
    """``prime`` followed by ``length`` characters drawn one at a time from
    softmax(logits / temperature)."""
    prime_ids = vocab.encode(prime, "--prime")
    was_training = model.training
    model.eval()
    try:
        with nn.no_grad():
            # the prime in one call of the whole model, then one character at a time through a
            # stream of the LSTM (prepared weights, state kept in place)
            logits, state = model(prime_ids[:, None], None)
            last = logits[-1, 0]
            stream = model.lstm.stream(1)
            stream.state = state
            table = model.embed.weight.data
            w_out, b_out = model.head.weight.data, model.head.bias.data
            # the whole loop in one kernel call where it applies (NumPy weights): the same
            # draws, uniforms taken from rng in the same order
            u = rng.random(length)  # the draws of `length` calls of rng.random()
            ids = stream._sample(
                np.ascontiguousarray(table), np.ascontiguousarray(w_out), b_out,
                np.ascontiguousarray(last), temperature, u,
            )
            if ids is None:
                ids = stepped_sample(stream, table, w_out, b_out, last, temperature, u)
    finally:
        model.train(was_training)
    return prime + vocab.decode(ids.tolist())


def stepped_sample(
    stream: Any, table: Any, w_out: Any, b_out: Any, last: Any, temperature: float, u: Any
) -> np.ndarray:
    """The sampling loop of :func:`sample` stepped from Python through ``stream`` (one draw per
    uniform in ``u``, the first from the logits ``last``): where the one-call kernel does not
    apply (CuPy arrays, projections), and the baseline `fastrnn bench --inference` times it
    against."""
    from fastrnn.nn.functional import softmax

    out = []
    x = table[:1].copy()
    for i in range(len(u)):
        p = softmax(last.astype(np.float64) / temperature)
        nxt = int(min(np.searchsorted(np.cumsum(p), u[i] * p.sum()), len(p) - 1))
        out.append(nxt)
        x[0] = table[nxt]
        last = w_out @ stream.step(x)[0] + b_out
    return np.asarray(out, dtype=np.int64)


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# Bounds on what a checkpoint.json may describe, checked before anything is built from it.
MAX_HIDDEN = MAX_EMBEDDING = 1 << 14
MAX_LAYERS = 64
MAX_VOCAB = 1 << 16


def _checked_file(d: Path, entry: Any, what: str, option: str) -> str:
    """The file a checkpoint.json names: a plain name of a regular file inside ``d`` (no path,
    no symlink), at most fastrnn.io.MAX_BYTES, matching its recorded SHA-256 -> its name."""
    from fastrnn import io

    if not isinstance(entry, dict):
        raise CommandError(f"{option}: files.{what} is not an object (corrupt checkpoint)")
    name, digest = entry.get("name"), entry.get("sha256")
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "\0" in name
        or os.path.basename(name) != name
        or (os.altsep is not None and os.altsep in name)
    ):
        raise CommandError(
            f"{option}: files.{what}.name {name!r} is not a plain file name inside the "
            "checkpoint directory (refused)"
        )
    if not isinstance(digest, str):
        raise CommandError(f"{option}: files.{what}.sha256 is not a string (corrupt checkpoint)")
    file = d / name
    try:
        f = io.open_regular(file, follow_symlinks=False)
    except FileNotFoundError:
        raise CommandError(f"{option}: {file} is missing (incomplete checkpoint)") from None
    except ValueError as exc:
        raise CommandError(
            f"{option}: {exc} (refused: checkpoint files are regular files)"
        ) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size > io.MAX_BYTES:
            raise CommandError(
                f"{option}: {file} is {size} bytes, more than a checkpoint file may be "
                f"({io.MAX_BYTES})"
            )
        h = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != digest:
        raise CommandError(
            f"{option}: {file} does not match the SHA-256 recorded in "
            f"{CHECKPOINT_JSON} (modified or corrupt)"
        )
    return name


def _check_number(
    option: str, where: str, value: Any, kind: type, low: float, high: float | None = None
) -> None:
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if ok and kind is float:
        ok = math.isfinite(value)
    if not ok or value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        expected = "an integer" if kind is int else "a number"
        raise CommandError(
            f"{option}: {where} is {value!r}, expected {expected} in {bounds} (corrupt checkpoint)"
        )


def _check_meta(meta: dict[str, Any], option: str) -> None:
    """Types and ranges of everything a run takes from checkpoint.json."""
    model = meta["model"]
    vocab = model["vocab"]
    if not isinstance(vocab, str) or not 1 <= len(vocab) <= MAX_VOCAB or len(set(vocab)) != len(
        vocab
    ):
        raise CommandError(
            f"{option}: model.vocab is not a string of 1..{MAX_VOCAB} distinct characters "
            "(corrupt checkpoint)"
        )
    _check_number(option, "model.hidden", model["hidden"], int, 1, MAX_HIDDEN)
    _check_number(option, "model.embedding", model["embedding"], int, 1, MAX_EMBEDDING)
    _check_number(option, "model.layers", model["layers"], int, 1, MAX_LAYERS)
    _check_number(option, "model.dropout", model["dropout"], float, 0.0, 0.999)
    training = meta.get("training", {})
    if not isinstance(training, dict):
        raise CommandError(f"{option}: training is not an object (corrupt checkpoint)")
    for key in ("seq_len", "batch_size"):
        if key in training:
            _check_number(option, f"training.{key}", training[key], int, 1, 1 << 20)
    for key in ("lr", "clip"):
        if key in training:
            _check_number(option, f"training.{key}", training[key], float, 0.0)
    if "dropout" in training:
        _check_number(option, "training.dropout", training["dropout"], float, 0.0, 0.999)
    progress = meta["progress"]
    for key in ("step", "position", "chars"):
        _check_number(option, f"progress.{key}", progress[key], int, 0)
    _check_number(option, "progress.seconds", progress["seconds"], float, 0.0)
    for key in ("history", "train_curve"):
        if not isinstance(meta.get(key, []), list):
            raise CommandError(f"{option}: {key} is not a list (corrupt checkpoint)")


def parameter_count(vocab: int, hidden: int, layers: int, embedding: int) -> int:
    """Elements of the CharRNN's parameters (embedding, LSTM with two biases per layer, head)."""
    lstm = sum(4 * hidden * ((embedding if i == 0 else hidden) + hidden + 2) for i in range(layers))
    return vocab * embedding + lstm + hidden * vocab + vocab


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """An optimizer state dict -> (arrays for fastrnn.io, JSON-able rest)."""
    arrays: dict[str, np.ndarray] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if hasattr(value, "shape") and getattr(value, "ndim", 0) > 0:
                arrays[f"state.{index}.{key}"] = np.asarray(value)
            else:
                scalars.setdefault(str(index), {})[key] = (
                    value.item() if hasattr(value, "item") else value
                )
    return arrays, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in arrays.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(out: Path, model: Any, optimizer: Any, meta: dict[str, Any]) -> None:
    """Write weights and optimizer state (new files named by step), then the JSON that names
    them (atomic rename), then remove older weight files."""
    from fastrnn import io

    out.mkdir(parents=True, exist_ok=True)
    step = meta["progress"]["step"]
    weights = out / f"weights-{step:07d}.npz"
    opt_file = out / f"optimizer-{step:07d}.npz"
    io.save(weights, model.state_dict())
    opt_arrays, opt_meta = _flatten_optimizer(optimizer.state_dict())
    io.save(opt_file, opt_arrays)
    meta = dict(meta)
    meta["optimizer"] = opt_meta
    meta["files"] = {
        "weights": {"name": weights.name, "sha256": _sha256_file(weights)},
        "optimizer": {"name": opt_file.name, "sha256": _sha256_file(opt_file)},
    }
    write_json_atomic(out / CHECKPOINT_JSON, meta)
    for old in list(out.glob("weights-*.npz")) + list(out.glob("optimizer-*.npz")):
        if old.name not in (weights.name, opt_file.name):
            try:
                old.unlink()
            except OSError:
                pass


def read_checkpoint(directory: str, option: str = "--checkpoint") -> dict[str, Any]:
    """The checkpoint's JSON, checked: a char-rnn checkpoint of a known version whose files
    exist and match their recorded SHA-256."""
    d = Path(directory)
    if not d.exists():
        raise CommandError(f"{option}: no such directory: {directory}")
    if not d.is_dir():
        raise CommandError(
            f"{option}: {directory} is not a directory (give the --out "
            "directory of a char-rnn training run)"
        )
    path = d / CHECKPOINT_JSON
    if not path.exists():
        raise CommandError(
            f"{option}: {directory} holds no {CHECKPOINT_JSON}: not a char-rnn checkpoint directory"
        )
    meta = read_json(path, option)
    kind = meta.get("format")
    if kind != FORMAT:
        raise CommandError(
            f"{option}: {directory} is a checkpoint of another model "
            f"({kind!r}), not a char-rnn model ({FORMAT!r})"
        )
    if meta.get("version") != FORMAT_VERSION:
        raise CommandError(
            f"{option}: unsupported char-rnn checkpoint version "
            f"{meta.get('version')!r} (this fastrnn reads {FORMAT_VERSION})"
        )
    try:
        model = meta["model"]
        for key in ("vocab", "hidden", "layers", "embedding", "dropout"):
            model[key]
        meta["corpus"]["sha256"], meta["progress"]["step"], meta["optimizer"]["param_groups"]
        _check_meta(meta, option)
        files = meta["files"]
        for key in ("weights", "optimizer"):
            _checked_file(d, files[key], key, option)
    except (KeyError, TypeError) as exc:
        raise CommandError(f"{option}: {path} lacks the entry {exc} (corrupt checkpoint)") from None
    meta["_dir"] = str(d)
    return meta


def load_model(
    meta: dict[str, Any], seed: int, option: str = "--checkpoint"
) -> tuple[Any, Vocabulary]:
    from fastrnn import io

    m = meta["model"]
    vocab = Vocabulary(m["vocab"])
    path = Path(meta["_dir"]) / meta["files"]["weights"]["name"]
    try:
        state = io.load(path)
        # the model is built only once the file holds exactly as many weights as it describes
        stored = sum(int(a.size) for a in state.values())
        wanted = parameter_count(len(vocab), m["hidden"], m["layers"], m["embedding"])
        if stored != wanted:
            raise ValueError(
                f"{path.name} holds {stored} weights, the model described has {wanted}"
            )
        model = build_model(
            len(vocab), m["hidden"], m["layers"], m["embedding"], m["dropout"], seed
        )
        model.load_state_dict(state)
    except ValueError as exc:
        raise CommandError(
            f"{option}: the weights do not fit the model the checkpoint describes: {exc}"
        ) from None
    return model, vocab


# ------------------------------------------------------------------------------------------------
# plot
# ------------------------------------------------------------------------------------------------


def plot_curves(
    history: list[dict[str, Any]], train_curve: list[list[float]], entropy: float, path: Path
) -> bool:
    """Training loss (mean over each CURVE_EVERY steps) and validation loss against steps."""
    plt = matplotlib_pyplot()
    if plt is None or not history:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train_curve:
        ax.plot(
            [p[0] for p in train_curve],
            [p[1] for p in train_curve],
            "-",
            lw=1,
            label=f"training (mean over {CURVE_EVERY} steps)",
        )
    ax.plot(
        [h["step"] for h in history],
        [h["val_bpc"] for h in history],
        "s-",
        ms=4,
        label="validation",
    )
    ax.axhline(entropy, color="gray", ls="--", lw=1, label=f"unigram entropy {entropy:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per character")
    ax.set_title("fastrnn char-rnn")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------


def add_train_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train on the built-in corpus (Python's standard library) or --text FILE",
        description=(
            "Train a character-level LSTM. With no arguments: about 3 MB of the running "
            "Python's standard library source, a 2-layer LSTM, a run of at most "
            f"{DEFAULT_MINUTES:g} minutes."
        ),
    )
    p.add_argument("--text", metavar="FILE", help="train on this UTF-8 text file instead")
    p.add_argument(
        "--hidden",
        type=positive_int,
        help=f"LSTM hidden units (default {MODEL_DEFAULTS['hidden']})",
    )
    p.add_argument(
        "--layers", type=positive_int, help=f"LSTM layers (default {MODEL_DEFAULTS['layers']})"
    )
    p.add_argument(
        "--embedding",
        type=positive_int,
        help=f"character embedding size (default {MODEL_DEFAULTS['embedding']})",
    )
    p.add_argument(
        "--seq-len",
        type=positive_int,
        help=f"characters per stream per step "
        f"(truncated BPTT length, default {TRAIN_DEFAULTS['seq_len']})",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        help=f"parallel streams (default {TRAIN_DEFAULTS['batch_size']})",
    )
    p.add_argument(
        "--lr", type=positive_float, help=f"Adam learning rate (default {TRAIN_DEFAULTS['lr']:g})"
    )
    p.add_argument(
        "--dropout",
        type=probability,
        help=f"dropout between and after the LSTM layers (default {TRAIN_DEFAULTS['dropout']:g})",
    )
    p.add_argument(
        "--clip",
        type=positive_float,
        help=f"gradient norm clipping (default {TRAIN_DEFAULTS['clip']:g})",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=DEFAULT_STEPS,
        help=f"training steps in this run (default {DEFAULT_STEPS})",
    )
    p.add_argument(
        "--minutes",
        type=positive_float,
        default=DEFAULT_MINUTES,
        help="time budget of the run in minutes: training stops early enough for the closing "
        f"validation, checkpoint and sample to fit (default {DEFAULT_MINUTES:g})",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--out",
        metavar="DIR",
        default="runs/char-rnn",
        help="checkpoint directory (default runs/char-rnn)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --out (weights, optimizer, position)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run even if --out already holds a checkpoint (it is replaced)",
    )
    p.add_argument("--json", metavar="PATH", help="write a JSON summary of the run here")
    p.add_argument(
        "--eval-every",
        type=positive_int,
        default=DEFAULT_EVAL_EVERY,
        help="validate and checkpoint every N steps (default "
        f"{DEFAULT_EVAL_EVERY}; always at the end)",
    )
    p.add_argument(
        "--sample-every",
        type=nonnegative_int,
        default=DEFAULT_SAMPLE_EVERY,
        help=f"print a short sample every N steps, 0 for never (default {DEFAULT_SAMPLE_EVERY})",
    )
    p.add_argument(
        "--sample-length",
        type=positive_int,
        default=200,
        help="characters per periodic sample (default 200)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="threads of the kernels (default: OMP_NUM_THREADS when set, else 1 or all CPUs, "
        "whichever ran the first steps faster)",
    )
    p.set_defaults(func=cmd_train)


def _resolve(args: argparse.Namespace, meta: dict[str, Any] | None) -> dict[str, Any]:
    """Hyperparameters: explicit arguments, else the checkpoint's, else the defaults. A model
    size that disagrees with the checkpoint being resumed is an error."""
    hp: dict[str, Any] = {}
    for key, default in MODEL_DEFAULTS.items():
        given = getattr(args, key)
        if meta is not None:
            saved = meta["model"][key]
            if given is not None and given != saved:
                raise CommandError(
                    f"--{key} {given} disagrees with the checkpoint being resumed "
                    f"({saved}); the model's size cannot change"
                )
            hp[key] = saved
        else:
            hp[key] = default if given is None else given
    saved_train = meta.get("training", {}) if meta is not None else {}
    for key, default in TRAIN_DEFAULTS.items():
        given = getattr(args, key)
        hp[key] = given if given is not None else saved_train.get(key, default)
    return hp


def cmd_train(args: argparse.Namespace) -> int:
    import fastrnn
    from fastrnn import optim
    from fastrnn.examples.corpus import file_corpus, stdlib_corpus

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out: {args.out} exists and is not a directory")
    json_path = check_output_file(args.json, "--json") if args.json else None
    meta = read_checkpoint(args.out, "--resume") if args.resume else None
    if args.resume and args.overwrite:
        raise CommandError("--resume and --overwrite exclude each other")
    if not args.resume and not args.overwrite and (out / CHECKPOINT_JSON).exists():
        raise CommandError(
            f"--out: {args.out} already holds a checkpoint; pass --resume to continue it, "
            "--overwrite to start again, or choose another --out"
        )
    hp = _resolve(args, meta)

    corpus = file_corpus(args.text) if args.text else stdlib_corpus()
    if meta is not None and meta["corpus"]["sha256"] != corpus.sha256:
        raise CommandError(
            f"--resume: the checkpoint was trained on {meta['corpus']['description']!r}, not on "
            f"this corpus ({corpus.description}); pass the same --text"
        )
    train_text, val_text = split_corpus(corpus.text, hp["seq_len"], hp["batch_size"])
    if meta is not None:
        vocab = Vocabulary(meta["model"]["vocab"])
        model, _ = load_model(
            {**meta, "model": {**meta["model"], "dropout": hp["dropout"]}}, args.seed, "--resume"
        )
    else:
        vocab = Vocabulary.from_text(corpus.text)
        model = build_model(
            len(vocab), hp["hidden"], hp["layers"], hp["embedding"], hp["dropout"], args.seed
        )
    entropy = unigram_entropy(train_text)
    train_ids = streams(vocab.encode(train_text), hp["batch_size"])
    val_ids = vocab.encode(val_text)
    params = list(model.parameters())
    optimizer = optim.Adam(params, lr=hp["lr"])
    progress_state = {"step": 0, "position": 0, "chars": 0, "seconds": 0.0}
    history: list[dict[str, Any]] = []
    train_curve: list[list[float]] = []
    if meta is not None:
        from fastrnn import io

        opt_state = _unflatten_optimizer(
            io.load(Path(meta["_dir"]) / meta["files"]["optimizer"]["name"]), meta["optimizer"]
        )
        optimizer.load_state_dict(opt_state)
        for group in optimizer.param_groups:
            group["lr"] = hp["lr"]
        progress_state.update(meta["progress"])
        history = list(meta.get("history", []))
        train_curve = list(meta.get("train_curve", []))
        if progress_state["position"] + hp["seq_len"] + 1 > train_ids.shape[0]:
            progress_state["position"] = 0

    n_params = sum(int(np.prod(p.shape)) for p in params)
    choice = getattr(args, "threads_note", None)
    if isinstance(choice, ThreadChoice):
        choice.measure(_timing_step(len(vocab), hp, train_ids, args.seed))
    log = print
    log(f"corpus: {corpus.description}; vocabulary {len(vocab)} characters")
    log(
        f"training {len(train_text):,} characters, validation {len(val_text):,} (last "
        f"{VAL_FRACTION:.0%}); unigram entropy {entropy:.3f} bits/char"
    )
    log(
        f"model: embedding {hp['embedding']}, LSTM {hp['layers']} x {hp['hidden']}, "
        f"{n_params:,} parameters; seq-len {hp['seq_len']}, batch {hp['batch_size']}, Adam lr "
        f"{hp['lr']:g}, dropout {hp['dropout']:g}, clip {hp['clip']:g}; "
        f"threads: {getattr(args, 'threads_note', fastrnn.get_num_threads())}"
    )
    if meta is not None:
        log(f"resuming at step {progress_state['step']} from {args.out}")

    sample_rng = np.random.default_rng(args.seed + 3)
    prime = "\n" if "\n" in vocab.chars else vocab.chars[0]
    chars_per_step = hp["seq_len"] * hp["batch_size"]
    start_step = progress_state["step"]
    budget = args.minutes * 60.0
    final_reserve = 0.05 * budget  # until the first evaluation has been timed
    state = None
    pos = progress_state["position"]
    recent: list[float] = []  # losses since the last validation
    window: list[float] = []  # losses since the last point of the training curve
    train_seconds = 0.0
    last_val: float | None = history[-1]["val_bpc"] if history else None
    last_train: float | None = history[-1]["train_bpc"] if history else None
    stopped_by_time = False

    def make_meta() -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model": {
                "vocab": vocab.chars,
                **{k: hp[k] for k in MODEL_DEFAULTS},
                "dropout": hp["dropout"],
            },
            "training": {k: hp[k] for k in TRAIN_DEFAULTS},
            "corpus": {
                "source": corpus.source,
                "description": corpus.description,
                "sha256": corpus.sha256,
                "chars": len(corpus.text),
                "unigram_entropy_bits": entropy,
            },
            "progress": {
                "step": start_step + steps_done,
                "position": pos,
                "chars": progress_state["chars"] + steps_done * chars_per_step,
                "seconds": progress_state["seconds"] + train_seconds,
            },
            "history": history,
            "train_curve": train_curve,
        }

    def checkpoint_and_eval(step: int) -> None:
        nonlocal last_val, last_train, final_reserve
        t0 = time.perf_counter()
        last_val = evaluate(model, val_ids)
        last_train = float(np.mean(recent)) * LOG2E if recent else last_train
        recent.clear()
        history.append(
            {
                "step": step,
                "train_bpc": finite_or_none(last_train),
                "val_bpc": finite_or_none(last_val),
                "seconds": round(progress_state["seconds"] + train_seconds, 3),
            }
        )
        save_checkpoint(out, model, optimizer, make_meta())
        # what the closing validation, checkpoint, plot and sample will take, with room for a
        # slower moment of the machine
        final_reserve = 1.5 * (time.perf_counter() - t0) + 3.0

    steps_done = 0
    bar = Progress(args.steps, "char-rnn", "step", enabled=not args.no_progress)
    wall0 = time.perf_counter()
    try:
        while steps_done < args.steps:
            # the budget covers the whole run: periodic and closing evaluations, samples
            if time.perf_counter() - wall0 + final_reserve >= budget:
                stopped_by_time = True
                break
            t0 = time.perf_counter()
            if pos + hp["seq_len"] + 1 > train_ids.shape[0]:
                pos, state = 0, None  # a new pass over the text starts from a zero state
            x = train_ids[pos : pos + hp["seq_len"]]
            y = train_ids[pos + 1 : pos + hp["seq_len"] + 1]
            loss, state = train_step(model, optimizer, params, x, y, state, hp["clip"])
            if not math.isfinite(loss):
                raise CommandError(
                    f"the training loss became {loss} at step "
                    f"{start_step + steps_done + 1}; lower --lr or --clip"
                )
            pos += hp["seq_len"]
            steps_done += 1
            train_seconds += time.perf_counter() - t0
            recent.append(loss)
            window.append(loss)
            step = start_step + steps_done
            if step % CURVE_EVERY == 0:
                train_curve.append([step, round(float(np.mean(window)) * LOG2E, 4)])
                window.clear()
            bar.update(
                1,
                loss=f"{loss * LOG2E:.3f} bits/char",
                chars_per_s=f"{steps_done * chars_per_step / train_seconds:,.0f}",
            )
            if step % args.eval_every == 0 and steps_done < args.steps:
                checkpoint_and_eval(step)
                bar.write(
                    f"step {step}: train {last_train:.3f} bits/char, validation "
                    f"{last_val:.3f} bits/char"
                )
            if args.sample_every and step % args.sample_every == 0:
                text = sample(
                    model, vocab, args.sample_length, SAMPLE_TEMPERATURE, prime, sample_rng
                )
                bar.write(f"----- sample at step {step} -----\n{text.strip(chr(10))}\n-----")
    except KeyboardInterrupt:
        bar.close()
        print("interrupted: saving the checkpoint", flush=True)
    bar.close()

    if steps_done == 0 and meta is None:
        raise CommandError("no training step ran (--minutes too small?)")
    if steps_done:
        checkpoint_and_eval(start_step + steps_done)
    wall = time.perf_counter() - wall0
    chars_per_s = steps_done * chars_per_step / train_seconds if train_seconds else 0.0
    plotted = plot_curves(history, train_curve, entropy, out / "curves.png")
    final_sample = sample(model, vocab, 400, SAMPLE_TEMPERATURE, prime, sample_rng)

    why = f" (the --minutes {args.minutes:g} budget)" if stopped_by_time else ""
    log(
        f"done: {steps_done} steps{why} in {train_seconds:.1f} s of training, {wall:.1f} s in "
        f"all; {chars_per_s:,.0f} characters/s"
    )
    log(
        f"final: train {last_train:.3f} bits/char, validation {last_val:.3f} bits/char; unigram "
        f"entropy of the corpus {entropy:.3f} bits/char"
    )
    log(
        f"checkpoint: {out / CHECKPOINT_JSON}"
        + (f"; curves: {out / 'curves.png'}" if plotted else "")
    )
    log(f"sample (temperature {SAMPLE_TEMPERATURE}):\n{final_sample}")
    if json_path is not None:
        write_json_atomic(
            json_path,
            {
                "command": "char-rnn train",
                "steps": steps_done,
                "step": start_step + steps_done,
                "seconds": train_seconds,
                "wall_seconds": wall,
                "chars_per_second": chars_per_s,
                "train_bits_per_char": finite_or_none(last_train),
                "val_bits_per_char": finite_or_none(last_val),
                "unigram_entropy_bits_per_char": entropy,
                "stopped_by_time": stopped_by_time,
                "threads": fastrnn.get_num_threads(),
                "corpus": {
                    "source": corpus.source,
                    "chars": len(corpus.text),
                    "train_chars": len(train_text),
                    "val_chars": len(val_text),
                    "vocabulary": len(vocab),
                },
                "hyperparameters": {**hp, "parameters": n_params, "seed": args.seed},
                "checkpoint": str(out),
                "plot": str(out / "curves.png") if plotted else None,
                "sample": final_sample,
            },
        )
    return 0


# ------------------------------------------------------------------------------------------------
# sample
# ------------------------------------------------------------------------------------------------


def add_sample_parser(sub: Any) -> None:
    p = sub.add_parser(
        "sample",
        help="generate text from a trained checkpoint",
        description="Generate text from a char-rnn checkpoint.",
    )
    p.add_argument(
        "--checkpoint",
        metavar="DIR",
        default="runs/char-rnn",
        help="the --out directory of a training run (default runs/char-rnn)",
    )
    p.add_argument(
        "--length", type=positive_int, default=500, help="characters to generate (default 500)"
    )
    p.add_argument(
        "--temperature",
        type=positive_float,
        default=SAMPLE_TEMPERATURE,
        help=f"> 0; lower is more conservative (default {SAMPLE_TEMPERATURE})",
    )
    p.add_argument("--prime", default=None, help="text to start from (default a newline)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="threads of the kernels (default: OMP_NUM_THREADS when set, else all CPUs)",
    )
    p.set_defaults(func=cmd_sample)


def cmd_sample(args: argparse.Namespace) -> int:
    meta = read_checkpoint(args.checkpoint)
    model, vocab = load_model(meta, args.seed)
    prime = args.prime
    if prime is None:
        prime = "\n" if "\n" in vocab.chars else vocab.chars[0]
    if prime == "":
        raise CommandError("--prime: expected at least one character")
    rng = np.random.default_rng(args.seed)
    print(sample(model, vocab, args.length, args.temperature, prime, rng))
    return 0
