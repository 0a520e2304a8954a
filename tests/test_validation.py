"""DESIGN.md's error policy for the recurrent ops: every kind of bad input raises a TypeError or
ValueError naming the argument, before any kernel runs; non-contiguous and Fortran-ordered
inputs give the same results as C-contiguous ones."""

from __future__ import annotations

import numpy as np
import pytest
from recurrent_support import OP_IDS, OPS

import fastrnn as fr
from fastrnn.backends import backend_module

T, N, D, H = 4, 3, 5, 6


def _inputs(op, dtype=np.float64):
    rng = np.random.default_rng(0)
    return {k: v.astype(dtype) for k, v in op.arrays(T, N, D, H, rng).items()}


def _expect(exc, name, op, arrays, **kw):
    with pytest.raises(exc, match=rf"\b{name}\b"):
        op.forward(arrays, **kw)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_dtype_errors(op):
    for name in op.inputs:
        for bad in (np.float16, np.int64, np.int32, np.complex128):
            arrays = _inputs(op)
            arrays[name] = arrays[name].astype(bad)
            # The first argument's dtype is judged alone; later ones may also differ from it.
            _expect(TypeError, name, op, arrays)
        arrays = _inputs(op)
        if name != op.inputs[0]:  # mixed float32 / float64: names the disagreeing argument
            arrays[name] = arrays[name].astype(np.float32)
            _expect(TypeError, name, op, arrays)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_not_an_array(op):
    for name in op.inputs:
        arrays = _inputs(op)
        arrays[name] = arrays[name].tolist()
        _expect(TypeError, name, op, arrays)
        arrays[name] = None
        _expect(TypeError, name, op, arrays)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_shape_errors(op):
    G = op.gates
    bad_shapes = {
        "x": [(T, N), (T, N, D, 1), (0, N, D)],
        "h0": [(N,), (N + 1, H), (N, H + 1)],
        "c0": [(N, H, 1), (N - 1, H)],
        "w_ih": [(G * H, D + 1), (G * H + 1, D), (G * H,)],
        "w_hh": [(G * H + 1, H), (G * H, H, 1), (G * H, 0)],
        "b": [(G * H + 1,), (G * H, 1)],
        "b_ih": [(G * H - 1,)],
        "b_hh": [(G * H + 2,), (1, G * H)],
    }
    for name in op.inputs:
        for shape in bad_shapes[name]:
            arrays = _inputs(op)
            arrays[name] = np.zeros(shape)
            # A wrong w_hh changes H, so the other arguments may be the ones that disagree;
            # every other bad shape is named exactly.
            if name == "w_hh" and len(shape) == 2 and shape[1] != 0:
                with pytest.raises(ValueError):
                    op.forward(arrays)
            else:
                _expect(ValueError, name, op, arrays)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_lengths_errors(op):
    arrays = _inputs(op)
    for bad in ([0, 1, 2], [1, 2, T + 1], [-1, 2, 2]):
        _expect(ValueError, "lengths", op, arrays, lengths=np.array(bad))
    for bad in ([1, 2], [[1, 2, 3]], [1, 2, 3, 4]):
        _expect(ValueError, "lengths", op, arrays, lengths=np.array(bad))
    _expect(TypeError, "lengths", op, arrays, lengths=np.array([1.0, 2.0, 3.0]))
    _expect(TypeError, "lengths", op, arrays, lengths=np.array([True, True, True]))
    _expect(TypeError, "lengths", op, arrays, lengths="123")
    # Lists and any integer dtype are fine.
    y1 = op.forward(arrays, lengths=[4, 1, 2])[0][0]
    y2 = op.forward(arrays, lengths=np.array([4, 1, 2], dtype=np.uint8))[0][0]
    np.testing.assert_array_equal(y1, y2)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_training_must_be_bool(op):
    _expect(TypeError, "training", op, _inputs(op), training="yes")
    _expect(TypeError, "training", op, _inputs(op), training=None)


def test_bad_nonlinearity():
    op = OPS[2]
    arrays = _inputs(op)
    for bad in ("sigmoid", "Tanh", None, 1):
        with pytest.raises(ValueError, match="nonlinearity"):
            fr.rnn_forward(*(arrays[k] for k in op.inputs), nonlinearity=bad)
    # The kernel module itself also refuses it (it is callable directly).
    cpu = backend_module("cpu")
    with pytest.raises(ValueError, match="nonlinearity"):
        cpu.rnn_forward(*(arrays[k] for k in op.inputs), "gelu", None, True)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_backward_errors(op):
    arrays = _inputs(op)
    _, ctx = op.forward(arrays)
    rng = np.random.default_rng(1)
    good = op.upstream_arrays(T, N, H, rng)
    backward = getattr(fr, f"{op.base}_backward")
    # ctx of the wrong type or from another op
    for bad_ctx in (None, {}, "ctx"):
        with pytest.raises(TypeError, match="ctx"):
            backward(bad_ctx, good["dy"])
    other = OPS[1] if op.base != "gru" else OPS[0]
    _, other_ctx = other.forward(_inputs(other))
    with pytest.raises(ValueError, match="ctx"):
        backward(other_ctx, good["dy"])
    # upstream gradients of the wrong shape, dtype or kind
    for name in op.upstream:
        for shape in [(T, N, H + 1), (N, H), (N, H, 1), (T + 1, N, H)]:
            up = dict(good)
            up[name] = np.zeros(shape)
            if shape == up[name].shape and shape == good[name].shape:
                continue
            with pytest.raises(ValueError, match=name):
                op.backward(ctx, up)
        up = dict(good)
        up[name] = good[name].astype(np.float32)
        with pytest.raises(TypeError, match="dy|" + name):
            op.backward(ctx, up)
        up[name] = good[name].astype(np.int64)
        with pytest.raises(TypeError, match=name):
            op.backward(ctx, up)
        up[name] = good[name].tolist()
        with pytest.raises(TypeError, match=name):
            op.backward(ctx, up)
    with pytest.raises(TypeError, match="dy"):
        op.backward(ctx, {**good, "dy": None})


def _non_contiguous(a: np.ndarray, kind: str) -> np.ndarray:
    if kind == "fortran":
        return np.asfortranarray(a)
    # every other element of a twice-as-large buffer along the last axis
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    big[..., ::2] = a
    view = big[..., ::2]
    assert not view.flags.c_contiguous
    return view


@pytest.mark.parametrize("kind", ["strided", "fortran"])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_non_contiguous_inputs_give_correct_results(op, kind):
    arrays = _inputs(op, np.float32)
    rng = np.random.default_rng(2)
    upstream = {k: v.astype(np.float32) for k, v in op.upstream_arrays(T, N, H, rng).items()}
    lengths = np.array([4, 2, 2])
    want_out, want_ctx = op.forward(arrays, lengths)
    want_grads = op.backward(want_ctx, upstream)
    odd = {k: _non_contiguous(v, kind) for k, v in arrays.items()}
    odd_up = {k: _non_contiguous(v, kind) for k, v in upstream.items()}
    got_out, ctx = op.forward(odd, np.array([4, 0, 2, 0, 2, 0])[::2])  # strided lengths too
    got_grads = op.backward(ctx, odd_up)
    for name, a, b in zip(
        op.outputs() + op.grads, got_out + got_grads, want_out + want_grads, strict=True
    ):
        np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_kernel_module_copies_strided_input(op):
    """Called directly (no validation in front), the CPU kernels still never read a strided
    view through a raw pointer: they copy it first."""
    arrays = _inputs(op)
    cpu = backend_module("cpu")
    fn = getattr(cpu, f"{op.base}_forward")
    extra = (op.nonlinearity,) if op.base == "rnn" else ()
    want = fn(*(arrays[k] for k in op.inputs), *extra, None, False)
    got = fn(*(_non_contiguous(arrays[k], "strided") for k in op.inputs), *extra, None, False)
    for a, b in zip(got[:-1], want[:-1], strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------
# issue 14, item 6: the argument named is the one at fault; integers of every kind
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_wrong_input_size_names_x(op, backend):
    """x with D + 1 features is x's mistake (w_ih fixes D); it used to be reported as w_ih's."""
    arrays = _inputs(op)
    arrays["x"] = np.zeros((T, N, D + 1))
    with fr.use_backend(backend), pytest.raises(ValueError, match=r"^x: .*w_ih"):
        op.forward(arrays)


INTEGER_TYPES = [int, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint64]


@pytest.mark.parametrize("itype", INTEGER_TYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_lengths_of_any_integer_kind(op, itype):
    arrays = _inputs(op)
    want = op.forward(arrays, lengths=np.array([4, 1, 2]))[0]
    for lengths in ([itype(4), itype(1), itype(2)], (itype(4), 1, itype(2))):
        got = op.forward(arrays, lengths=lengths)[0]
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_lengths_bool_and_huge_refused(op):
    arrays = _inputs(op)
    for bad in ([True, 1, 2], [4, np.True_, 2], [4, 1.0, 2], [4, None, 2], ["4", 1, 2]):
        _expect(TypeError, "lengths", op, arrays, lengths=bad)
    # out of range, never an OverflowError on the way to int64
    for bad in ([2**70, 1, 2], [4, -(2**64), 2], np.array([2**64 - 1, 1, 2], np.uint64)):
        _expect(ValueError, "lengths", op, arrays, lengths=bad)
    _expect(ValueError, "lengths", op, arrays, lengths=[2**70, 1])  # and the wrong count


def test_nonlinearity_of_the_wrong_kind():
    op = OPS[2]
    arrays = _inputs(op)
    for bad in (np.array(["tanh", "relu"]), ["tanh"], b"tanh"):
        with pytest.raises(ValueError, match="^nonlinearity: "):
            fr.rnn_forward(*(arrays[k] for k in op.inputs), nonlinearity=bad)


def _unaligned(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``a`` one byte off its dtype's alignment."""
    buf = np.zeros(a.nbytes + 1, np.uint8)
    view = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    view[...] = a
    assert view.flags.c_contiguous and not view.flags.aligned
    return view


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_unaligned_inputs_give_correct_results(op):
    """Unaligned arrays are copied like non-contiguous ones: the kernels may assume alignment."""
    arrays = _inputs(op, np.float32)
    want_out, want_ctx = op.forward(arrays)
    upstream = {
        k: v.astype(np.float32)
        for k, v in op.upstream_arrays(T, N, H, np.random.default_rng(3)).items()
    }
    want_grads = op.backward(want_ctx, upstream)
    got_out, ctx = op.forward({k: _unaligned(v) for k, v in arrays.items()})
    got_grads = op.backward(ctx, {k: _unaligned(v) for k, v in upstream.items()})
    for a, b in zip(got_out + got_grads, want_out + want_grads, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_sequence_beyond_memory_refused(op, backend):
    """x of shape (2^40, 1, 0) takes no memory, but its outputs would: a ValueError naming x,
    not a MemoryError (or NumPy's "array is too big") from inside the kernel."""
    arrays = _inputs(op, np.float32)
    arrays["x"] = np.zeros((2**40, N, 0), np.float32)
    arrays["w_ih"] = np.zeros((op.gates * H, 0), np.float32)
    with fr.use_backend(backend), pytest.raises(ValueError, match="^x: "):
        op.forward(arrays)
