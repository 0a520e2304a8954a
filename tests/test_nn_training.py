"""End to end: a small LSTM learns a toy sequence task and a small CNN a toy image task, each
to a stated loss within seconds, on the layer API, the optimizers and the fused loss."""

from __future__ import annotations

import numpy as np
from nn_support import layer_backend  # noqa: F401

from fastrnn import data, io, nn, optim


class DelayNet(nn.Module):
    """Embedding -> 2-layer LSTM -> Linear: the char-RNN shape."""

    def __init__(self, vocab: int, emb: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, num_layers=2)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens):
        y, _ = self.lstm(self.embed(tokens))
        return self.head(y)

    def backward(self, dlogits):
        self.embed.backward(self.lstm.backward(self.head.backward(dlogits)))


def test_lstm_learns_a_delayed_copy(tmp_path):
    """Output at step t = input token at step t-2 (vocabulary 4, chance loss ln 4 = 1.39):
    the cross-entropy (steps 2.. only) falls below 0.05 in 150 Adam steps."""
    nn.manual_seed(0)
    rng = np.random.default_rng(0)
    T, N, V, delay = 12, 16, 4, 2
    model = DelayNet(V, 8, 24)
    opt = optim.Adam(model.parameters(), lr=0.03)
    for _ in range(150):
        tokens = rng.integers(0, V, (T, N))
        logits = model(tokens)
        loss, d = nn.functional.softmax_cross_entropy(logits[delay:], tokens[:-delay])
        full = np.zeros_like(logits)
        full[delay:] = d
        opt.zero_grad()
        model.backward(full)
        optim.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
    tokens = rng.integers(0, V, (T, 64))
    model.eval()
    with nn.no_grad():
        logits = model(tokens)
    final, _ = nn.functional.softmax_cross_entropy(logits[delay:], tokens[:-delay])
    assert final < 0.05, final

    io.save(tmp_path / "lstm.npz", model.state_dict())
    clone = DelayNet(V, 8, 24).eval()
    clone.load_state_dict(io.load(tmp_path / "lstm.npz"))
    np.testing.assert_array_equal(clone(tokens), logits)


def bars(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """8x8 noisy images: class 0 a horizontal bar, 1 a vertical bar, 2 no bar."""
    x = rng.standard_normal((n, 1, 8, 8)).astype(np.float32) * 0.3
    y = rng.integers(0, 3, n)
    pos = rng.integers(0, 8, n)
    for i in range(n):
        if y[i] == 0:
            x[i, 0, pos[i], :] += 1.0
        elif y[i] == 1:
            x[i, 0, :, pos[i]] += 1.0
    return x, y


def test_cnn_learns_bars():
    """Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d -> Dropout -> Flatten -> Linear (the digits
    CNN's shape): validation loss below 0.1 (chance ln 3 = 1.10) after 8 epochs of 600 images."""
    nn.manual_seed(0)
    rng = np.random.default_rng(1)
    x, y = bars(750, rng)
    (xtr, ytr), (xva, yva), _ = data.train_val_test_split(x, y, val=0.1, test=0.1, seed=0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.1, seed=0),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 3),
    )
    opt = optim.Adam(model.parameters(), lr=0.01)
    batches = data.MiniBatches(xtr, ytr, batch_size=32, seed=0)
    for _ in range(8):
        model.train()
        for xb, yb in batches:
            opt.zero_grad()
            loss, d = nn.functional.softmax_cross_entropy(model(xb), yb)
            model.backward(d)
            opt.step()
    model.eval()
    with nn.no_grad():
        val_loss, _ = nn.functional.softmax_cross_entropy(model(xva), yva)
        accuracy = float((model(xva).argmax(1) == yva).mean())
    assert val_loss < 0.1, val_loss
    assert accuracy > 0.97
