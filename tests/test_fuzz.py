"""Fuzzing every public op against DESIGN.md's contract, on the CPU kernels and the reference.

Each case draws one call of one op (LSTM, GRU, RNN tanh/relu, conv2d (also pooling its output),
max/avg pooling; forward,
then backward when it ran in training mode) on one backend ("cpu", or the reference through
``fastrnn.use_backend("numpy")``): random shapes with zero sizes, random stride, padding,
dilation, groups and lengths (huge and negative ones too), NaN and Inf values, and at most one
argument passed in another form: another dtype, a list, None, a string, a float, a bool, a 0-d
array, a Fortran-ordered, strided, negatively strided, read-only or unaligned array, NumPy
integers, a reshaped array, a context of another op.

The contract: the call returns the reference's result (``fastrnn.reference`` in float64, within
tests/tolerances.py), or raises TypeError/ValueError whose message starts with the name of an
argument at fault. Whether the call is valid is predicted independently (``_*_culprits``,
DESIGN.md's rules and PyTorch's for empty sizes), so an invalid call that returns garbage (the
empty-plane pooling of issue 14 did) fails too. A crash or an out-of-bounds write ends the run;
.ci/run also runs this file against an AddressSanitizer build of the CPU kernels.

Hypothesis runs derandomized (the same cases on every run) with no example database.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerances import tol

import fastrnn as fr
from fastrnn import reference as ref
from fastrnn.backends.validation import MAX_EXTENT, max_array_bytes

# Cases per test function; the sum is the fuzz cases of one run (checked at the end).
EXAMPLES = {"recurrent": 2500, "conv2d": 2000, "conv2d_max_pool": 600, "pool2d": 2000}
MIN_CASES = 2000

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)


def fuzz(name: str) -> settings:
    return settings(FUZZ, max_examples=EXAMPLES[name])


INT_MAX = 2**31 - 1
HUGE = [2**31, 2**62, 2**63 - 1, 2**63, 2**64, 10**6, 2**40]
RUN_CASES: dict[str, int] = {}

# NaN and Inf inputs make NumPy warn (invalid value in matmul ...): expected here.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _count(name: str) -> None:
    RUN_CASES[name] = RUN_CASES.get(name, 0) + 1


# ------------------------------------------------------------------------------------------------
# arguments in other forms
# ------------------------------------------------------------------------------------------------

VALID, INVALID, MAYBE = "valid", "invalid", "maybe"


@dataclass
class Call:
    """One call: the canonical arguments (C-contiguous arrays, Python ints), what is passed,
    and what the one changed argument (if any) allows."""

    canonical: dict[str, Any]
    passed: dict[str, Any]
    changed: str | None = None
    kind: str = VALID  # VALID: same outcome as canonical; INVALID: must be refused; MAYBE
    errors: tuple[type, ...] = (TypeError, ValueError)
    how: str = ""
    extra_names: set[str] = field(default_factory=set)


def _unaligned(a: np.ndarray) -> np.ndarray:
    buf = np.zeros(a.nbytes + 1, np.uint8)
    view = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    view[...] = a
    return view


def _strided(a: np.ndarray) -> np.ndarray:
    if a.ndim == 0:
        return a
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    big[..., ::2] = a
    return big[..., ::2]


def _readonly(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.setflags(write=False)
    return a


def _reversed(a: np.ndarray) -> np.ndarray:
    if a.ndim == 0:
        return a
    return np.ascontiguousarray(a[::-1])[::-1]  # equal to a, negative strides


def array_form(draw, a: np.ndarray, optional: bool) -> tuple[Any, str, tuple[type, ...], str]:
    """(passed value, VALID/INVALID/MAYBE, expected error types, description)."""
    other = np.float32 if a.dtype == np.float64 else np.float64
    forms = [
        ("fortran", lambda: np.asfortranarray(a), VALID, ()),
        ("strided", lambda: _strided(a), VALID, ()),
        ("negative strides", lambda: _reversed(a), VALID, ()),
        ("read-only", lambda: _readonly(a), VALID, ()),
        ("unaligned", lambda: _unaligned(a), VALID, ()),
        ("list", lambda: a.tolist(), INVALID, (TypeError,)),
        # None for an optional argument means something else: judged as passed (MAYBE)
        ("None", lambda: None, MAYBE if optional else INVALID, (TypeError,)),
        ("str", lambda: "array", INVALID, (TypeError,)),
        ("float", lambda: 1.5, INVALID, (TypeError,)),
        ("int", lambda: 3, INVALID, (TypeError,)),
        ("0-d", lambda: np.array(1.0, a.dtype), INVALID, (ValueError,)),
        ("extra axis", lambda: a[..., None], INVALID, (ValueError,)),
        ("other float dtype", lambda: a.astype(other), MAYBE, (TypeError,)),
        ("one more along an axis", lambda: _grow(draw, a), MAYBE, (ValueError,)),
    ]
    for dt in ("int32", "int64", "float16", "complex128", "bool", "object", ">f8", "<U1"):
        forms.append((f"dtype {dt}", lambda dt=dt: _astype(a, dt), INVALID, (TypeError,)))
    if a.ndim:
        forms.append(
            ("one axis fewer", lambda: np.zeros(a.shape[:-1], a.dtype), INVALID, (ValueError,))
        )
    how, make, kind, errors = draw(st.sampled_from(forms))
    return make(), kind, errors or (TypeError, ValueError), how


def _astype(a: np.ndarray, dt: str) -> np.ndarray:
    if dt == "<U1":
        return np.full(a.shape, "a")
    return np.nan_to_num(a).astype(dt)


def _grow(draw, a: np.ndarray) -> np.ndarray:
    if a.ndim == 0:
        return a
    axis = draw(st.integers(0, a.ndim - 1))
    shape = list(a.shape)
    shape[axis] += 1
    return np.ones(shape, a.dtype)


def int_form(draw, value: Any, none_means_default: bool = False) -> tuple[Any, str, str]:
    """Another way to pass an int or a pair: NumPy integers and lists (VALID), bool, float,
    str, None, a triple, a NumPy array of two (INVALID: TypeError). None is left out where it
    means the default (pooling's stride)."""
    vals = list(value) if isinstance(value, tuple) else [value]

    def np_int(v: int) -> Any:
        for t in (np.int8, np.uint8, np.int32, np.int64, np.uint64):
            if np.iinfo(t).min <= v <= np.iinfo(t).max and draw(st.booleans()):
                return t(v)
        return np.int64(v) if -(2**63) <= v < 2**63 else v

    forms = [
        (
            "numpy integers",
            VALID,
            lambda: tuple(np_int(v) for v in vals) if len(vals) == 2 else np_int(vals[0]),
        ),
        (
            "0-d integer array",
            VALID,
            lambda: np.array(vals[0]) if len(vals) == 1 and -(2**63) <= vals[0] < 2**63 else value,
        ),
        ("list", VALID, lambda: list(vals) if len(vals) == 2 else value),
        ("bool", INVALID, lambda: draw(st.sampled_from([True, False, np.True_]))),
        ("pair with a bool", INVALID, lambda: (vals[0], True)),
        ("float", INVALID, lambda: float(vals[0]) if abs(vals[0]) < 2**53 else 1.0),
        ("numpy float", INVALID, lambda: np.float64(2)),
        ("str", INVALID, lambda: str(vals[0])),
        ("None", INVALID, lambda: None),
        ("triple", INVALID, lambda: (1, 1, 1)),
        ("numpy array of two", INVALID, lambda: np.array([1, 1])),
        ("float array of one", INVALID, lambda: np.array([1.0])),
    ]
    if none_means_default:
        forms = [f for f in forms if f[0] != "None"]
    how, kind, make = draw(st.sampled_from(forms))
    return make(), kind, how


# ------------------------------------------------------------------------------------------------
# values
# ------------------------------------------------------------------------------------------------


def special_values(
    draw, rng: np.random.Generator, arrays: dict[str, np.ndarray], nan: bool = True
) -> bool:
    """Sometimes put NaN, +Inf or -Inf at a few places of one array (in place); True if so."""
    names = [k for k, a in arrays.items() if a is not None and a.size]
    if not names or not draw(st.booleans()):
        return False
    name = draw(st.sampled_from(names))
    flat = arrays[name].reshape(-1)
    values = [np.nan, np.inf, -np.inf] if nan else [np.inf, -np.inf]
    for _ in range(draw(st.integers(1, 3))):
        flat[rng.integers(flat.size)] = draw(st.sampled_from(values))
    return True


def _pair_value(draw, small: list[int], special: list[int]) -> Any:
    def one() -> int:
        return (
            draw(st.sampled_from(small))
            if draw(st.integers(0, 7))
            else draw(st.sampled_from(special))
        )

    return one() if draw(st.booleans()) else (one(), one())


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


# ------------------------------------------------------------------------------------------------
# running one case
# ------------------------------------------------------------------------------------------------

_NAME = re.compile(r"^(\w+): ")


def check_error(exc: BaseException, errors: tuple[type, ...], names: set[str], what: str) -> None:
    assert isinstance(exc, errors), f"{what}: {type(exc).__name__}: {exc}"
    m = _NAME.match(str(exc))
    assert m and m.group(1) in names, f"{what}: message names none of {sorted(names)}: {exc}"


def _describe(args: dict[str, Any]) -> str:
    def one(v: Any) -> str:
        if isinstance(v, np.ndarray):
            return f"<{v.dtype} array {v.shape}>"
        if isinstance(v, fr.Context):
            return f"<{v.op} context>"
        return repr(v)

    return "(" + ", ".join(f"{k}={one(v)}" for k, v in args.items()) + ")"


def run_case(call: Call, backend: str, fn, culprits: set[str], all_names: set[str]):
    """Call ``fn(**passed)`` on ``backend``; return its result, or None when it (rightly)
    raised. ``culprits``: the arguments at fault in the canonical call (empty when valid)."""
    what = f"{backend}: {call.changed} as {call.how}" if call.changed else backend
    what += " " + _describe(call.passed)
    with fr.use_backend(backend):
        try:
            out = fn(**call.passed)
        except Exception as exc:  # noqa: BLE001 - the kind of exception is what is checked
            if call.kind == INVALID:
                # another argument at fault may be judged first, with its own kind of error
                errors = call.errors if not culprits else (TypeError, ValueError)
                check_error(exc, errors, {call.changed} | culprits | call.extra_names, what)
            elif call.kind == MAYBE:
                check_error(exc, (TypeError, ValueError), all_names, what)
            else:
                assert culprits, f"{what}: a valid call raised {type(exc).__name__}: {exc}"
                check_error(exc, (TypeError, ValueError), culprits, what)
            return None
    assert call.kind != INVALID, f"{what}: accepted"
    if call.kind == VALID:
        assert not culprits, f"{what}: accepted, but {sorted(culprits)} should be refused"
    return out


def compare(
    got, want, family: str, direction: str, dtype, names, nan_in_reference_ok=False, values=True
) -> bool:
    """Each result against the reference's (float64) within the tolerance table; NaN where the
    reference has NaN, Inf where it has Inf. ``nan_in_reference_ok``: where the reference is
    NaN anything goes (see test_fuzz_recurrent); ``values=False``: shapes and dtypes only.
    Returns True when the reference has a NaN that the result has not."""
    diverged = False
    for name, g, w in zip(names, got, want, strict=True):
        if w is None:
            assert g is None, name
            continue
        assert isinstance(g, np.ndarray) and g.dtype == dtype, (name, type(g), dtype)
        assert g.shape == w.shape, (name, g.shape, w.shape)
        if not values:
            continue
        if nan_in_reference_ok:
            diverged |= bool(np.any(np.isnan(w) & ~np.isnan(g)))
            g = np.where(np.isnan(w), np.nan, g)
        np.testing.assert_allclose(g, w, err_msg=name, **tol(family, direction, dtype))
    return diverged


def f64(a):
    return None if a is None else np.array(a, dtype=np.float64)


def change_one(
    draw,
    canonical: dict[str, Any],
    arrays: list[str],
    optional: tuple[str, ...],
    ints: dict[str, bool],
    others: dict[str, list[tuple[Any, str, tuple]]],
) -> Call:
    """Pass the canonical arguments, or (two times in three) one of them in another form.
    ``ints``: integer arguments (value: None allowed); ``others``: hand-made forms."""
    call = Call(canonical, dict(canonical))
    choices = [n for n in arrays if canonical[n] is not None or n in optional]
    choices += list(ints) + list(others)
    if draw(st.integers(0, 2)) == 0 or not choices:
        return call
    name = draw(st.sampled_from(choices))
    call.changed = name
    if name in others:
        call.passed[name], call.kind, call.errors, call.how = draw(st.sampled_from(others[name]))
    elif name in ints:
        call.passed[name], call.kind, call.how = int_form(draw, canonical[name])
        call.errors = (TypeError,) if call.kind == INVALID else (TypeError, ValueError)
    elif canonical[name] is None:
        call.passed[name] = np.zeros((1, 1, 1))  # no optional argument is 3-D
        call.kind, call.errors, call.how = INVALID, (TypeError, ValueError), "an array for None"
    else:
        call.passed[name], call.kind, call.errors, call.how = array_form(
            draw, canonical[name], name in optional
        )
    return call


# ------------------------------------------------------------------------------------------------
# recurrent
# ------------------------------------------------------------------------------------------------

RNN = {
    # op: (gates, forward arrays, upstream gradients, gradients)
    "lstm": (
        4,
        ("x", "h0", "c0", "w_ih", "w_hh", "b"),
        ("dy", "dhT", "dcT"),
        ("dx", "dh0", "dc0", "dw_ih", "dw_hh", "db"),
    ),
    "gru": (
        3,
        ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"),
        ("dy", "dhT"),
        ("dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"),
    ),
    "rnn": (
        1,
        ("x", "h0", "w_ih", "w_hh", "b"),
        ("dy", "dhT"),
        ("dx", "dh0", "dw_ih", "dw_hh", "db"),
    ),
}


def _recurrent_culprits(T: int, H: int, N: int, lengths: Any) -> set[str]:
    bad = set()
    if T < 1:
        bad.add("x")
    if H < 1:
        bad.add("w_hh")
    if lengths is not None and N and (min(lengths) < 1 or max(lengths) > T):
        bad.add("lengths")
    return bad


def _lengths_forms(lengths: list[int], N: int) -> list[tuple[Any, str, tuple, str]]:
    arr = np.array(lengths, dtype=np.int64)
    return [
        (arr.astype(np.uint8) if min(lengths, default=1) >= 0 else arr, VALID, (), "uint8"),
        (tuple(np.int32(v) for v in lengths), VALID, (), "tuple of int32"),
        (_strided(arr), VALID, (), "strided array"),
        (arr.astype(np.float64), INVALID, (TypeError,), "float array"),
        (arr.astype(bool), INVALID, (TypeError,), "bool array"),
        ([True] * N, INVALID if N else MAYBE, (TypeError,), "list of bools"),
        ("1" * N, INVALID, (TypeError,), "str"),
        (arr[:, None], INVALID, (ValueError,), "2-D"),
        (list(lengths) + [1], INVALID, (ValueError,), "one too many"),
        ([2**70] * N, INVALID if N else MAYBE, (ValueError,), "huge"),
    ]


@fuzz("recurrent")
@given(data=st.data())
def test_fuzz_recurrent(data):
    draw = data.draw
    op = draw(st.sampled_from(sorted(RNN)))
    gates, inputs, upstream, grad_names = RNN[op]
    backend = draw(st.sampled_from(["cpu", "numpy"]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    T = draw(st.sampled_from([1, 1, 2, 3, 5, 0]))
    N = draw(st.sampled_from([1, 2, 3, 4, 0]))
    D = draw(st.sampled_from([1, 2, 3, 5, 0]))
    H = draw(st.sampled_from([1, 2, 3, 4, 7, 0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shapes = {
        "x": (T, N, D),
        "h0": (N, H),
        "c0": (N, H),
        "w_ih": (gates * H, D),
        "w_hh": (gates * H, H),
        "b": (gates * H,),
        "b_ih": (gates * H,),
        "b_hh": (gates * H,),
    }
    scale = {"w_ih": 1 / np.sqrt(max(D, 1)), "w_hh": 1 / np.sqrt(max(H, 1))}
    arrays = {k: (rng.standard_normal(shapes[k]) * scale.get(k, 0.5)).astype(dtype) for k in inputs}
    nonlinearity = draw(st.sampled_from(["tanh", "relu"]))
    nonfinite = special_values(draw, rng, arrays)
    lengths = None
    if draw(st.booleans()):
        lo, hi = (0, T + 1) if draw(st.integers(0, 5)) == 0 else (1, max(T, 1))
        lengths = [int(v) for v in rng.integers(lo, hi + 1, size=N)]
    canonical = dict(arrays, lengths=lengths, training=draw(st.sampled_from([True, True, False])))
    if op == "rnn":
        canonical["nonlinearity"] = nonlinearity
    others = {
        "training": [
            (np.bool_(canonical["training"]), VALID, (), "numpy bool"),
            (1, INVALID, (TypeError,), "int"),
            ("yes", INVALID, (TypeError,), "str"),
            (None, INVALID, (TypeError,), "None"),
        ],
        "lengths": _lengths_forms(lengths, N) if lengths is not None else [],
    }
    if op == "rnn":
        others["nonlinearity"] = [
            (bad, INVALID, (ValueError,), repr(bad))
            for bad in ("sigmoid", "Tanh", None, 1, np.array(["tanh"]))
        ]
    others = {k: v for k, v in others.items() if v}
    call = change_one(draw, canonical, list(inputs), (), {}, others)
    culprits = _recurrent_culprits(T, H, N, lengths)
    all_names = set(canonical)
    fwd = getattr(fr, f"{op}_forward")
    _count("recurrent")
    out = run_case(call, backend, fwd, culprits, all_names)
    if out is None:
        return

    # the reference, float64
    ref_kw = dict(lengths=None if lengths is None else np.array(lengths), training=True)
    if op == "rnn":
        ref_kw["nonlinearity"] = canonical["nonlinearity"]
    passed_arrays = [call.passed[k] if call.kind == MAYBE else canonical[k] for k in inputs]
    ref_out = getattr(ref, f"{op}_forward")(*map(f64, passed_arrays), **ref_kw)
    used_dtype = np.dtype(out[0].dtype)
    outs = ("y", "hT", "cT") if op == "lstm" else ("y", "hT")
    # With Inf among the inputs, whether a sum meets both +Inf and -Inf (NaN) or only one of
    # them depends on the order of the terms, which differs between the reference's GEMMs and
    # the kernels' blocked ones: where the reference answers NaN anything goes. Elsewhere the
    # results must agree, NaN for NaN and Inf for Inf.
    # When that happened, the reference's backward pass starts from other states: then only
    # the gradients' shapes and dtypes are checked.
    diverged = compare(out[:-1], ref_out[:-1], "recurrent", "forward", used_dtype, outs, nonfinite)
    ctx = out[-1]
    training = bool(call.passed["training"])
    assert (ctx is None) == (not training)
    if not training:
        return

    # backward: the upstream gradients canonical or one of them in another form
    grad_shapes = {"dy": ref_out[0].shape, "dhT": ref_out[1].shape, "dcT": ref_out[1].shape}
    up = {}
    for k in upstream:
        up[k] = (
            None
            if (k != "dy" and draw(st.booleans()))
            else (rng.standard_normal(grad_shapes[k]).astype(used_dtype))
        )
    nonfinite |= special_values(draw, rng, up)
    _, other_ctx = fr.max_pool2d_forward(np.zeros((1, 1, 2, 2)), 1)
    bcall = change_one(
        draw,
        dict(up, ctx=ctx),
        list(upstream),
        tuple(upstream[1:]),
        {},
        {
            "ctx": [
                (None, INVALID, (TypeError,), "None"),
                ({}, INVALID, (TypeError,), "dict"),
                (other_ctx, INVALID, (ValueError,), "another op's"),
            ]
        },
    )
    bcall.extra_names = {"dy"}  # a gradient of the wrong dtype is judged against dy's
    bwd = getattr(fr, f"{op}_backward")
    grads = run_case(bcall, backend, bwd, set(), set(upstream) | {"ctx"})
    if grads is None:
        return
    ref_up = [f64(bcall.passed[k] if bcall.kind == MAYBE else up[k]) for k in upstream]
    want = getattr(ref, f"{op}_backward")(ref_out[-1], *ref_up)
    compare(
        grads, want, "recurrent", "backward", used_dtype, grad_names, nonfinite, values=not diverged
    )


# ------------------------------------------------------------------------------------------------
# conv2d
# ------------------------------------------------------------------------------------------------


def _too_big(shape: tuple[int, ...], itemsize: int, limit: int) -> bool:
    """More bytes than ``limit``, or dimensions whose product overflows 64 bits."""
    return (
        int(np.prod(shape, dtype=object)) * itemsize > limit
        or int(np.prod([max(s, 1) for s in shape], dtype=object)) * itemsize > 2**63 - 1
    )


def _conv_culprits(
    backend: str, x_shape, w_shape, stride, padding, dilation, groups, itemsize: int
) -> set[str]:
    """The arguments at fault in a conv2d call (DESIGN.md's rules), empty when it is valid."""
    N, C, H, W = x_shape
    F, Cg, KH, KW = w_shape
    s, p, d = _pair(stride), _pair(padding), _pair(dilation)
    bad = set()
    if H < 1 or W < 1:
        bad.add("x")
    if min(s) < 1:
        bad.add("stride")
    if min(p) < 0:
        bad.add("padding")
    if min(d) < 1:
        bad.add("dilation")
    if groups < 1:
        bad.add("groups")
    if min(F, KH, KW) < 1:
        bad.add("w")
    if bad:
        return bad
    out, ext = [], []
    for size, k, si, pi, di in zip((H, W), (KH, KW), s, p, d, strict=True):
        extent = size + 2 * pi
        if extent > MAX_EXTENT:
            return {"padding"}
        if di * (k - 1) + 1 > extent:
            return {"w"}
        out.append((extent - di * (k - 1) - 1) // si + 1)
        ext.append(extent)
    limit = max_array_bytes(np.zeros(1, f"f{itemsize}"))
    if _too_big((N, F, *out), itemsize, limit):
        bad |= {"padding", "x"}
    if _too_big((N, C, *ext), itemsize, limit):
        bad.add("padding")
    if backend == "numpy" and _too_big((N, C, KH, KW, *out), itemsize, limit):
        bad.add("w")
    if backend == "cpu" and out[0] * out[1] > INT_MAX:
        bad |= {"padding", "x"}
    return bad


@fuzz("conv2d")
@given(data=st.data())
def test_fuzz_conv2d(data):
    draw = data.draw
    backend = draw(st.sampled_from(["cpu", "numpy"]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    G = draw(st.sampled_from([1, 1, 2, 3]))
    C = G * draw(st.sampled_from([1, 2, 1, 0]))
    F = G * draw(st.sampled_from([1, 2, 1, 2, 0]))
    N = draw(st.sampled_from([1, 2, 3, 0]))
    H, W = draw(st.integers(0, 8)), draw(st.integers(0, 8))
    KH, KW = draw(st.sampled_from([1, 2, 3, 1, 4, 0])), draw(st.sampled_from([1, 2, 3, 5, 0]))
    stride = _pair_value(draw, [1, 1, 2, 3], [0, -1, *HUGE])
    padding = _pair_value(draw, [0, 0, 1, 2], [-1, *HUGE])
    dilation = _pair_value(draw, [1, 1, 2, 3], [0, *HUGE])
    groups = G if draw(st.integers(0, 9)) else draw(st.sampled_from([0, -1, G + 1]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    Cg = C // G
    arrays = {
        "x": rng.standard_normal((N, C, H, W)).astype(dtype),
        "w": (rng.standard_normal((F, Cg, KH, KW)) / np.sqrt(max(Cg * KH * KW, 1))).astype(dtype),
        "b": rng.standard_normal(F).astype(dtype) if draw(st.booleans()) else None,
    }
    special_values(draw, rng, arrays)
    canonical = dict(
        arrays,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        training=draw(st.sampled_from([True, True, False])),
    )
    call = change_one(
        draw,
        canonical,
        ["x", "w", "b"],
        ("b",),
        {"stride": False, "padding": False, "dilation": False},
        {
            "groups": [
                (np.int64(groups), VALID, (), "int64"),
                (np.uint8(groups) if groups >= 0 else groups, VALID, (), "uint8"),
                (True, INVALID, (TypeError,), "bool"),
                (float(groups), INVALID, (TypeError,), "float"),
                ((groups,), INVALID, (TypeError,), "tuple"),
            ],
            "training": [(1, INVALID, (TypeError,), "int")],
        },
    )
    if call.kind == MAYBE:  # a reshaped or other-dtype array: judged as it is
        x, w, b = (call.passed[k] for k in ("x", "w", "b"))
    else:
        x, w, b = arrays["x"], arrays["w"], arrays["b"]
    culprits = set()
    if groups >= 1 and (
        x.shape[1] % groups or w.shape[0] % groups or w.shape[1] * groups != x.shape[1]
    ):
        culprits = {"groups", "w"}
    culprits |= _conv_culprits(
        backend, x.shape, w.shape, stride, padding, dilation, groups, np.dtype(dtype).itemsize
    )
    if b is not None and b.shape != (w.shape[0],):
        culprits.add("b")
    _count("conv2d")

    def fwd(x, w, b, **kw):
        return fr.conv2d_forward(x, w, b, **kw)

    out = run_case(call, backend, fwd, culprits, set(canonical))
    if out is None:
        return
    y, ctx = out
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    yr, cr = ref.conv2d_forward(f64(x), f64(w), f64(b), **geometry)
    used = np.dtype(y.dtype)
    compare([y], [yr], "conv", "forward", used, ["y"])
    if not call.passed["training"]:
        assert ctx is None
        return
    dy = rng.standard_normal(yr.shape).astype(used)
    up = {"dy": dy}
    special_values(draw, rng, up)
    bcall = change_one(
        draw,
        dict(up, ctx=ctx),
        ["dy"],
        (),
        {},
        {"ctx": [(None, INVALID, (TypeError,), "None"), ("ctx", INVALID, (TypeError,), "str")]},
    )
    grads = run_case(
        bcall, backend, lambda ctx, dy: fr.conv2d_backward(ctx, dy), set(), {"ctx", "dy"}
    )
    if grads is None:
        return
    want = ref.conv2d_backward(cr, f64(bcall.passed["dy"] if bcall.kind == MAYBE else up["dy"]))
    compare(grads, want, "conv", "backward", used, ["dx", "dw", "db"])


@fuzz("conv2d_max_pool")
@given(data=st.data())
def test_fuzz_conv2d_max_pool(data, monkeypatch):
    """conv2d_forward(max_pool=...) with and without ReLU, every CPU algorithm, 1 or 2 threads
    (the kernels' own pooling schedules included, parallel even on these small layers): the
    values of the reference's conv, ReLU and max pooling, and exactly the CPU's two calls
    (conv2d_forward, max_pool2d_forward, then their backwards), NaN and Inf included. A bad
    window raises ValueError/TypeError naming max_pool."""
    from fastrnn._cpu import conv2d as kernel

    monkeypatch.setattr(kernel, "MIN_PARALLEL_MACS", 0)
    draw = data.draw
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    N, C = draw(st.integers(0, 7)), draw(st.integers(1, 5))
    # (16 filters and more: the weight gradients with the filters in the vector lanes, by
    # Winograd after a Winograd forward)
    F = draw(st.integers(1, 7)) if draw(st.integers(0, 3)) else draw(st.integers(16, 20))
    H, W = draw(st.integers(1, 11)), draw(st.integers(1, 11))
    algorithm = draw(st.sampled_from(["auto", "direct", "im2col", "winograd"]))
    k = 3 if algorithm == "winograd" else draw(st.integers(1, 3))
    stride = 1 if algorithm == "winograd" else draw(st.integers(1, 2))
    padding = draw(st.integers(0, 1))
    activation = draw(st.sampled_from([None, "relu"]))
    pk = draw(st.integers(1, 4))
    ps = draw(st.sampled_from([None, 1, 2, 3]))
    pp = draw(st.integers(0, 2))
    bad_type = draw(st.integers(0, 19)) == 0
    max_pool = True if bad_type else dict(kernel_size=pk, stride=ps, padding=pp)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    arrays = {
        "x": rng.standard_normal((N, C, H, W)).astype(dtype),
        "w": (rng.standard_normal((F, C, k, k)) / np.sqrt(C * k * k)).astype(dtype),
        "b": rng.standard_normal(F).astype(dtype) if draw(st.booleans()) else None,
    }
    special = special_values(draw, rng, arrays)
    fr.set_num_threads(draw(st.sampled_from([1, 2])))
    _count("conv2d_max_pool")
    OH, OW = ((n + 2 * padding - k) // stride + 1 for n in (H, W))
    kw = dict(stride=stride, padding=padding, algorithm=algorithm, activation=activation)
    if OH < 1 or OW < 1:
        return
    if bad_type:
        with pytest.raises(TypeError, match="^max_pool"):
            fr.conv2d_forward(**arrays, max_pool=max_pool, **kw)
        return
    POH, POW = ((n + 2 * pp - pk) // (ps or pk) + 1 for n in (OH, OW))
    if pp > pk // 2 or POH < 1 or POW < 1:
        with pytest.raises(ValueError, match="^max_pool"):
            fr.conv2d_forward(**arrays, max_pool=max_pool, **kw)
        return
    training = draw(st.sampled_from([True, True, False]))
    y, ctx = fr.conv2d_forward(**arrays, max_pool=max_pool, training=training, **kw)
    yc, cc = fr.conv2d_forward(**arrays, **kw)
    window = dict(kernel_size=pk, stride=ps, padding=pp)
    yp, pc = fr.max_pool2d_forward(yc, **window)
    np.testing.assert_array_equal(y, yp)
    if not special:
        yr, _ = ref.conv2d_forward(*(f64(arrays[n]) for n in ("x", "w", "b")),
                                   stride=stride, padding=padding)  # fmt: skip
        yr = np.maximum(yr, 0) if activation else yr
        compare([y], [ref.max_pool2d_forward(yr, **window)[0]], "conv", "forward",
                np.dtype(dtype), ["y"])  # fmt: skip
    if not training:
        assert ctx is None
        return
    dy = rng.standard_normal(y.shape).astype(dtype)
    got = fr.conv2d_backward(ctx, dy)
    want = fr.conv2d_backward(cc, fr.max_pool2d_backward(pc, dy))
    for name, g, e in zip(("dx", "dw", "db"), got, want, strict=True):
        if e is None:
            assert g is None, name
        else:
            np.testing.assert_array_equal(g, e, err_msg=name)


# ------------------------------------------------------------------------------------------------
# pooling
# ------------------------------------------------------------------------------------------------


def _pool_culprits(backend: str, x_shape, kernel_size, stride, padding, itemsize: int):
    N, C, H, W = x_shape
    k, p = _pair(kernel_size), _pair(padding)
    s = k if stride is None else _pair(stride)
    bad = set()
    if H < 1 or W < 1:
        bad.add("x")
    if min(k) < 1:
        bad.add("kernel_size")
    if min(s) < 1:
        bad.add("stride")
    if min(p) < 0:
        bad.add("padding")
    if bad:
        return bad
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        return {"padding"}
    out, ext = [], []
    for size, ki, si, pi in zip((H, W), k, s, p, strict=True):
        extent = size + 2 * pi
        if extent > MAX_EXTENT:
            return {"padding"}
        if ki > extent:
            return {"kernel_size"}
        out.append((extent - ki) // si + 1)
        ext.append(extent)
    limit = max_array_bytes(np.zeros(1, f"f{itemsize}"))
    if _too_big((N, C, *out), itemsize, limit):
        bad.add("kernel_size")
    if _too_big((N, C, *ext), itemsize, limit):
        bad.add("padding")
    if backend == "numpy":
        if _too_big((max(N, 1), max(C, 1), k[0] * k[1], *out), itemsize, limit):
            bad.add("kernel_size")
        if _too_big((1, 1, *ext), itemsize, limit):
            bad.add("padding")
    return bad


@fuzz("pool2d")
@given(data=st.data())
def test_fuzz_pool2d(data):
    draw = data.draw
    kind = draw(st.sampled_from(["max", "avg"]))
    backend = draw(st.sampled_from(["cpu", "numpy"]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    N, C = draw(st.sampled_from([1, 2, 3, 0])), draw(st.sampled_from([1, 2, 3, 0]))
    H, W = draw(st.integers(0, 9)), draw(st.integers(0, 9))
    kernel_size = _pair_value(draw, [1, 2, 3, 2, 4], [0, -1, 2**31, 2**40, 2**63])
    stride = None if draw(st.booleans()) else _pair_value(draw, [1, 2, 3], [0, -1, *HUGE])
    kp = _pair(kernel_size)
    if draw(st.integers(0, 7)):  # mostly a padding the kernel allows
        padding = (
            draw(st.integers(0, max(0, min(kp[0] // 2, 2)))),
            draw(st.integers(0, max(0, min(kp[1] // 2, 2)))),
        )
        if kp[0] >= 2**31 and draw(st.booleans()):
            padding = (kp[0] // 2, padding[1])
    else:
        padding = _pair_value(draw, [0, 1, 2, 3], [-1, *HUGE])
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.integers(0, 3)) == 0:  # ties: many equal values in a window
        x = rng.integers(-2, 3, (N, C, H, W)).astype(dtype)
    else:
        x = rng.standard_normal((N, C, H, W)).astype(dtype)
    arrays = {"x": x}
    special_values(draw, rng, arrays)
    canonical = dict(
        arrays,
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        training=draw(st.sampled_from([True, True, False])),
    )
    call = change_one(draw, canonical, ["x"], (), {"kernel_size": False, "padding": False}, {})
    if call.changed is None and stride is not None and draw(st.booleans()):
        call.changed = "stride"
        call.passed["stride"], call.kind, call.how = int_form(draw, stride, True)
        call.errors = (TypeError,) if call.kind == INVALID else (TypeError, ValueError)
    x = call.passed["x"] if call.kind == MAYBE else arrays["x"]
    culprits = _pool_culprits(
        backend, x.shape, kernel_size, stride, padding, np.dtype(dtype).itemsize
    )
    fwd_fn = getattr(fr, f"{kind}_pool2d_forward")
    bwd_fn = getattr(fr, f"{kind}_pool2d_backward")
    _count("pool2d")
    out = run_case(call, backend, fwd_fn, culprits, set(canonical))
    if out is None:
        return
    y, ctx = out
    k, p = _pair(kernel_size), _pair(padding)
    s = k if stride is None else _pair(stride)
    shape = (
        *x.shape[:2],
        *((n + 2 * pi - ki) // si + 1 for n, ki, si, pi in zip(x.shape[2:], k, s, p, strict=True)),
    )
    assert y.shape == shape
    if y.size == 0:  # nothing to compare (and the reference's mask of one padded plane may
        # be larger than this machine when the planes are huge and N * C = 0)
        if ctx is not None:
            assert bwd_fn(ctx, y).shape == x.shape
        return
    rfwd = getattr(ref, f"{kind}_pool2d_forward")
    rbwd = getattr(ref, f"{kind}_pool2d_backward")
    yr, cr = rfwd(f64(x), kernel_size, stride, padding)
    used = np.dtype(y.dtype)
    compare([y], [yr], "pool", "forward", used, ["y"])
    if not call.passed["training"]:
        assert ctx is None
        return
    up = {"dy": rng.standard_normal(yr.shape).astype(used)}
    special_values(draw, rng, up)
    bcall = change_one(
        draw, dict(up, ctx=ctx), ["dy"], (), {}, {"ctx": [(None, INVALID, (TypeError,), "None")]}
    )
    dx = run_case(bcall, backend, bwd_fn, set(), {"ctx", "dy"})
    if dx is None:
        return
    want = rbwd(cr, f64(bcall.passed["dy"] if bcall.kind == MAYBE else up["dy"]))
    compare([dx], [want], "pool", "backward", used, ["dx"])


def test_fuzz_case_count():
    """The fuzz tests above ran at least MIN_CASES cases in this run (when they all ran)."""
    ran = [name for name in EXAMPLES if name in RUN_CASES]
    if len(ran) < len(EXAMPLES):
        pytest.skip(f"only {ran} of the fuzz tests ran in this session")
    total = sum(RUN_CASES.values())
    assert total >= MIN_CASES, RUN_CASES
