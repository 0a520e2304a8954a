"""The pieces behind the example commands: the char-rnn data pipeline, model, evaluation,
sampling and checkpoint helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastrnn import optim
from fastrnn.examples import char_rnn
from fastrnn.examples._common import CommandError
from fastrnn.nn.functional import softmax_cross_entropy


def tiny_model(vocab: int = 5, hidden: int = 3, layers: int = 2, dtype=np.float64):
    model = char_rnn.build_model(vocab, hidden, layers, 2, 0.0, seed=0)
    return model.to(dtype)


def test_streams_are_contiguous_time_major_columns() -> None:
    s = char_rnn.streams(np.arange(11), 3)
    assert s.shape == (3, 3) and s.flags.c_contiguous
    np.testing.assert_array_equal(s[:, 0], [0, 1, 2])
    np.testing.assert_array_equal(s[:, 2], [6, 7, 8])


def test_unigram_entropy() -> None:
    assert char_rnn.unigram_entropy("aabb") == pytest.approx(1.0)
    assert char_rnn.unigram_entropy("abcd" * 5) == pytest.approx(2.0)
    assert char_rnn.unigram_entropy("aaaa") == pytest.approx(0.0)


def test_vocabulary_round_trip_and_unknown_characters() -> None:
    vocab = char_rnn.Vocabulary.from_text("hello world")
    assert vocab.chars == " dehlorw"
    ids = vocab.encode("lower")
    assert vocab.decode(ids) == "lower"
    with pytest.raises(CommandError, match="'z'"):
        vocab.encode("lazy", "--prime")


def test_split_holds_out_the_end() -> None:
    text = "".join(chr(97 + i % 26) for i in range(10_000))
    train, val = char_rnn.split_corpus(text, seq_len=10, batch_size=4)
    assert train + val == text
    assert len(val) == int(len(text) * char_rnn.VAL_FRACTION)
    with pytest.raises(CommandError, match="--batch-size"):
        char_rnn.split_corpus(text[:50], seq_len=10, batch_size=4)


def test_char_rnn_gradients_match_finite_differences() -> None:
    """The model's composed backward (embedding, LSTM, dropout, 2-D head) in float64."""
    model = tiny_model()
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 5, (4, 2))
    targets = rng.integers(0, 5, (4, 2))

    def loss_of() -> float:
        logits, _ = model(ids, None)
        return softmax_cross_entropy(logits, targets)[0]

    logits, _ = model(ids, None)
    _, dlogits = softmax_cross_entropy(logits, targets)
    model.zero_grad()
    model.backward(dlogits)
    eps = 1e-6
    for name, p in model.named_parameters():
        flat = p.data.reshape(-1)
        for k in rng.choice(flat.size, size=min(4, flat.size), replace=False):
            old = flat[k]
            flat[k] = old + eps
            up = loss_of()
            flat[k] = old - eps
            down = loss_of()
            flat[k] = old
            numeric = (up - down) / (2 * eps)
            assert p.grad.reshape(-1)[k] == pytest.approx(numeric, rel=1e-5, abs=1e-8), name


def test_evaluate_carries_state_across_chunks() -> None:
    model = tiny_model()
    ids = np.random.default_rng(2).integers(0, 5, 40)
    whole = char_rnn.evaluate(model, ids, n_streams=1, chunk=1000)
    chunked = char_rnn.evaluate(model, ids, n_streams=1, chunk=7)
    assert chunked == pytest.approx(whole, rel=1e-12)
    logits, _ = model(ids[:-1, None], None)
    loss, _ = softmax_cross_entropy(logits, ids[1:, None])
    assert whole == pytest.approx(loss / math.log(2), rel=1e-12)
    assert model.training  # evaluate restores the mode


def test_sample_is_reproducible_and_uses_the_vocabulary() -> None:
    model = tiny_model(dtype=np.float32)
    vocab = char_rnn.Vocabulary("abcde")
    a = char_rnn.sample(model, vocab, 30, 1.0, "ab", np.random.default_rng(5))
    b = char_rnn.sample(model, vocab, 30, 1.0, "ab", np.random.default_rng(5))
    assert a == b and a.startswith("ab") and len(a) == 32 and set(a) <= set("abcde")
    # a very low temperature is (almost) greedy: the same text whatever the seed
    c = char_rnn.sample(model, vocab, 30, 1e-4, "ab", np.random.default_rng(6))
    d = char_rnn.sample(model, vocab, 30, 1e-4, "ab", np.random.default_rng(7))
    assert c == d


def test_optimizer_state_survives_the_checkpoint_format() -> None:
    model = tiny_model(dtype=np.float32)
    params = list(model.parameters())
    opt = optim.Adam(params, lr=1e-2)
    for p in params:
        p.grad[...] = 0.1
    opt.step()
    arrays, meta = char_rnn._flatten_optimizer(opt.state_dict())
    assert all("/" not in k for k in arrays)
    import json

    meta = json.loads(json.dumps(meta))  # what the JSON file keeps
    restored = optim.Adam(params, lr=1e-2)
    restored.load_state_dict(char_rnn._unflatten_optimizer(arrays, meta))
    snapshot = [p.data.copy() for p in params]
    opt.step()
    expected = [p.data.copy() for p in params]
    for p, s in zip(params, snapshot, strict=True):
        p.data[...] = s
    restored.step()
    for p, e in zip(params, expected, strict=True):
        np.testing.assert_array_equal(p.data, e)
