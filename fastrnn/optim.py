"""Optimizers with torch.optim's hyperparameters, defaults and update formulas.

Each optimizer updates ``Parameter.data`` in place from ``Parameter.grad``; frozen parameters
(``requires_grad=False``) are skipped. Parameters may be given as an iterable or as a list of
parameter groups (dicts with ``"params"`` and per-group hyperparameters), as in PyTorch. Works on
NumPy and CuPy parameters alike (the state lives next to each parameter).

The formulas follow torch.optim's single-tensor implementations (PyTorch 2.x) line by line, so
the same gradients give the same parameters (checked over 50 steps in tests/test_optim.py).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from fastrnn.backends import training
from fastrnn.nn._xp import array_module, move
from fastrnn.nn.module import Parameter

__all__ = [
    "Optimizer",
    "SGD",
    "Adagrad",
    "Adadelta",
    "RMSprop",
    "Adam",
    "AdamW",
    "clip_grad_norm_",
]


def _nonneg(name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    if not value >= 0.0:
        raise ValueError(f"{name}: must be >= 0, got {value}")
    return float(value)


def _in_unit(name: str, value: Any, closed_right: bool = False) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    ok = 0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0
    if not ok:
        raise ValueError(f"{name}: must be in [0, 1{']' if closed_right else ')'}, got {value}")
    return float(value)


class Optimizer:
    """Base class: parameter groups, per-parameter state, ``step``, ``zero_grad``, state dicts."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self.defaults = dict(defaults)
        self.param_groups: list[dict[str, Any]] = []
        self.state: dict[Parameter, dict[str, Any]] = {}
        if isinstance(params, Parameter):
            raise TypeError("params: expected an iterable of Parameters (or of groups), got one")
        params = list(params)
        if not params:
            raise ValueError("params: the optimizer got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        for g in groups:
            self.add_param_group(g)

    def add_param_group(self, group: dict[str, Any]) -> None:
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError("param group: expected a dict with a 'params' entry")
        ps = group["params"]
        ps = [ps] if isinstance(ps, Parameter) else list(ps)
        for p in ps:
            if not isinstance(p, Parameter):
                raise TypeError(f"params: expected fastrnn.nn.Parameter, got {type(p).__name__}")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in ps) or len({id(p) for p in ps}) != len(ps):
            raise ValueError("params: some parameters appear in more than one place")
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise ValueError(f"param group: unknown hyperparameters {sorted(unknown)}")
        g = {**self.defaults, **group, "params": ps}
        self._check_group(g)
        self.param_groups.append(g)

    def _check_group(self, group: dict[str, Any]) -> None:
        _nonneg("lr", group["lr"])
        _nonneg("weight_decay", group.get("weight_decay", 0.0))

    def zero_grad(self) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                p.grad[...] = 0

    def step(self) -> None:
        """One update of every parameter with a gradient.

        NumPy parameters of one float dtype take the fused path: one multi-tensor kernel call
        per parameter group updates all parameters and their state (OpenMP over chunks,
        fastrnn/_cpu/_train.pyx), with the same arithmetic as the per-parameter NumPy code
        below, which runs for CuPy parameters and under ``fastrnn.use_backend("numpy")``.
        """
        for gi, group in enumerate(self.param_groups):
            ps = [p for p in group["params"] if p.requires_grad]
            if not ps:
                continue
            kern = training.cpu_kernels(*[p.data for p in ps], *[p.grad for p in ps])
            if kern is not None:
                self._fused_step(kern, gi, group, ps)
                continue
            for p in ps:
                state = self.state.setdefault(p, {})
                g = -p.grad if group.get("maximize", False) else p.grad
                self._update(p, g, group, state, array_module(p.data))

    def _update(self, p: Parameter, g: Any, group: dict, state: dict, xp: Any) -> None:
        raise NotImplementedError

    # -- the fused path ----------------------------------------------------------------------------

    # subclasses: the kernel's name, the group's hyperparameters in the kernel's order, and
    # per parameter (state initialised and its step counted as _update does) its state buffers
    # (at most three, None for absent) and two per-tensor scalars
    _kind = ""

    def _hyper(self, group: dict[str, Any]) -> list[float]:
        raise NotImplementedError

    def _prepare(
        self, p: Parameter, group: dict[str, Any], state: dict[str, Any]
    ) -> tuple[list[Any], float, float]:
        raise NotImplementedError

    def _fused_step(self, kern: Any, gi: int, group: dict[str, Any], ps: list[Parameter]) -> None:
        n = len(ps)
        plans = self.__dict__.setdefault("_plans", {})
        plan = plans.get(gi)
        per = plan["per"] if plan is not None and plan["per"].shape[0] == n else np.empty((n, 2))
        arrays: list[Any] = []
        for i, p in enumerate(ps):
            state = self.state.setdefault(p, {})
            bufs, per[i, 0], per[i, 1] = self._prepare(p, group, state)
            for k, b in state.items():  # a loaded state dict may hold other layouts
                if getattr(b, "shape", None) == p.data.shape and not (
                    type(b) is np.ndarray and b.flags.c_contiguous and b.dtype == p.data.dtype
                ):
                    state[k] = np.ascontiguousarray(b, dtype=p.data.dtype)
                    bufs = [state[k] if x is b else x for x in bufs]
            arrays.append((p.data, p.grad, *bufs, *([None] * (3 - len(bufs)))))
        if (
            plan is None
            or len(plan["arrays"]) != n
            or any(
                a is not b
                for old, new in zip(plan["arrays"], arrays, strict=True)
                for a, b in zip(old, new, strict=True)
            )
        ):
            ptrs = np.zeros((5, n), np.int64)
            for i, row in enumerate(arrays):
                for r, a in enumerate(row):
                    if a is not None:
                        ptrs[r, i] = training.address(a)
            ct, cs, cl = kern.chunk_table([p.data.size for p in ps])
            plan = plans[gi] = dict(arrays=arrays, ptrs=ptrs, chunks=(ct, cs, cl), per=per)
        ct, cs, cl = plan["chunks"]
        h = np.asarray(self._hyper(group), np.float64)
        nt = max(1, min(training.threads(), ct.shape[0]))
        kern.optimizer_step(
            self._kind,
            plan["ptrs"],
            ct,
            cs,
            cl,
            per,
            h,
            ps[0].data.dtype == np.float64,
            nt,
        )

    # -- state dicts -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"state": {index: {name: array or number}}, "param_groups": [{..., "params":
        [indices]}]}`` with parameters numbered in group order (torch.optim's layout); arrays
        are copies."""
        index: dict[int, int] = {}
        groups = []
        for g in self.param_groups:
            ids = []
            for p in g["params"]:
                index.setdefault(id(p), len(index))
                ids.append(index[id(p)])
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
        state = {}
        for g in self.param_groups:
            for p in g["params"]:
                if p in self.state:
                    state[index[id(p)]] = {
                        k: (v.copy() if hasattr(v, "copy") else v) for k, v in self.state[p].items()
                    }
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if groups is None or "state" not in state_dict:
            raise ValueError("state_dict: expected a dict with 'state' and 'param_groups'")
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict: has {len(groups)} parameter groups, the optimizer has "
                f"{len(self.param_groups)}"
            )
        params: dict[int, Parameter] = {}
        for saved, own in zip(groups, self.param_groups, strict=True):
            if len(saved["params"]) != len(own["params"]):
                raise ValueError(
                    f"state_dict: a parameter group has {len(saved['params'])} parameters, the "
                    f"optimizer's has {len(own['params'])}"
                )
            params.update(zip(saved["params"], own["params"], strict=True))
        new_state: dict[Parameter, dict[str, Any]] = {}
        for i, st in state_dict["state"].items():
            p = params.get(int(i))
            if p is None:
                raise ValueError(f"state_dict: state for unknown parameter index {i}")
            xp = array_module(p.data)
            entry = {}
            for k, v in st.items():
                if hasattr(v, "shape") and getattr(v, "ndim", 0) > 0:
                    if tuple(v.shape) != p.shape:
                        raise ValueError(
                            f"state_dict: state[{i}][{k!r}] has shape {tuple(v.shape)}, the "
                            f"parameter has {p.shape}"
                        )
                    v = move(v, xp).astype(p.dtype, copy=True)
                else:
                    v = copy.deepcopy(v)
                entry[k] = v
            new_state[p] = entry
        for saved, own in zip(groups, self.param_groups, strict=True):
            for k, v in saved.items():
                if k != "params":
                    own[k] = v
        self.state = new_state


class SGD(Optimizer):
    """torch.optim.SGD: ``lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False,
    maximize=False``. The first momentum step copies the gradient into the buffer."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                dampening=dampening,
                weight_decay=weight_decay,
                nesterov=nesterov,
                maximize=maximize,
            ),
        )

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        _nonneg("momentum", group["momentum"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov: requires a momentum > 0 and zero dampening")

    _kind = "sgd"

    def _hyper(self, group):
        return [group[k] for k in ("lr", "momentum", "dampening", "weight_decay")] + [
            float(group["nesterov"]),
            float(group["maximize"]),
        ]

    def _prepare(self, p, group, state):
        if group["momentum"] == 0:
            return [], 0.0, 0.0
        buf = state.get("momentum_buffer")
        first = buf is None
        if first:  # the kernel copies the (decayed) gradient into it, as torch does
            buf = state["momentum_buffer"] = np.empty_like(p.data)
        return [buf], float(first), 0.0

    def _update(self, p, g, group, state, xp):
        if group["weight_decay"] != 0:
            g = g + group["weight_decay"] * p.data
        momentum = group["momentum"]
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.copy()
            else:
                buf *= momentum
                buf += (1 - group["dampening"]) * g
            g = g + momentum * buf if group["nesterov"] else buf
        p.data -= group["lr"] * g


class Adagrad(Optimizer):
    """torch.optim.Adagrad: ``lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0,
    eps=1e-10``."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            params,
            dict(
                lr=lr,
                lr_decay=lr_decay,
                weight_decay=weight_decay,
                initial_accumulator_value=initial_accumulator_value,
                eps=eps,
                maximize=maximize,
            ),
        )

    def _check_group(self, group):
        super()._check_group(group)
        _nonneg("lr_decay", group["lr_decay"])
        _nonneg("initial_accumulator_value", group["initial_accumulator_value"])
        _nonneg("eps", group["eps"])

    def add_param_group(self, group):
        super().add_param_group(group)
        g = self.param_groups[-1]
        for p in g["params"]:  # torch creates the accumulator at construction
            self.state[p] = dict(
                step=0, sum=array_module(p.data).full_like(p.data, g["initial_accumulator_value"])
            )

    _kind = "adagrad"

    def _hyper(self, group):
        return [group[k] for k in ("lr", "lr_decay", "weight_decay", "eps")] + [
            float(group["maximize"])
        ]

    def _prepare(self, p, group, state):
        state["step"] += 1
        clr = group["lr"] / (1 + (state["step"] - 1) * group["lr_decay"])
        return [state["sum"]], clr, 0.0

    def _update(self, p, g, group, state, xp):
        state["step"] += 1
        if group["weight_decay"] != 0:
            g = g + group["weight_decay"] * p.data
        clr = group["lr"] / (1 + (state["step"] - 1) * group["lr_decay"])
        state["sum"] += g * g
        std = xp.sqrt(state["sum"]) + group["eps"]
        p.data -= clr * (g / std)


class Adadelta(Optimizer):
    """torch.optim.Adadelta: ``lr=1.0, rho=0.9, eps=1e-6, weight_decay=0``."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            params, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize)
        )

    def _check_group(self, group):
        super()._check_group(group)
        _in_unit("rho", group["rho"], closed_right=True)
        _nonneg("eps", group["eps"])

    _kind = "adadelta"

    def _hyper(self, group):
        return [group[k] for k in ("lr", "rho", "eps", "weight_decay")] + [float(group["maximize"])]

    def _prepare(self, p, group, state):
        if not state:
            state.update(step=0, square_avg=np.zeros_like(p.data), acc_delta=np.zeros_like(p.data))
        state["step"] += 1
        return [state["square_avg"], state["acc_delta"]], 0.0, 0.0

    def _update(self, p, g, group, state, xp):
        if not state:
            state.update(step=0, square_avg=xp.zeros_like(p.data), acc_delta=xp.zeros_like(p.data))
        state["step"] += 1
        rho, eps = group["rho"], group["eps"]
        if group["weight_decay"] != 0:
            g = g + group["weight_decay"] * p.data
        sq, acc = state["square_avg"], state["acc_delta"]
        sq *= rho
        sq += (1 - rho) * g * g
        std = xp.sqrt(sq + eps)
        delta = xp.sqrt(acc + eps) / std * g
        acc *= rho
        acc += (1 - rho) * delta * delta
        p.data -= group["lr"] * delta


class RMSprop(Optimizer):
    """torch.optim.RMSprop: ``lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
    centered=False``."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            params,
            dict(
                lr=lr,
                alpha=alpha,
                eps=eps,
                weight_decay=weight_decay,
                momentum=momentum,
                centered=centered,
                maximize=maximize,
            ),
        )

    def _check_group(self, group):
        super()._check_group(group)
        _nonneg("alpha", group["alpha"])
        _nonneg("eps", group["eps"])
        _nonneg("momentum", group["momentum"])

    _kind = "rmsprop"

    def _hyper(self, group):
        return [group[k] for k in ("lr", "alpha", "eps", "weight_decay", "momentum")] + [
            float(group["centered"]),
            float(group["maximize"]),
        ]

    def _prepare(self, p, group, state):
        self._init_state(p, group, state, np)
        state["step"] += 1
        bufs = [state["square_avg"], state.get("momentum_buffer"), state.get("grad_avg")]
        if group["momentum"] > 0 and bufs[1] is None or group["centered"] and bufs[2] is None:
            raise ValueError(
                "RMSprop: the state lacks a buffer the group's momentum/centered need "
                "(a state dict saved with other hyperparameters)"
            )
        return bufs, 0.0, 0.0

    @staticmethod
    def _init_state(p, group, state, xp):
        if not state:
            state.update(step=0, square_avg=xp.zeros_like(p.data))
            if group["momentum"] > 0:
                state["momentum_buffer"] = xp.zeros_like(p.data)
            if group["centered"]:
                state["grad_avg"] = xp.zeros_like(p.data)

    def _update(self, p, g, group, state, xp):
        self._init_state(p, group, state, xp)
        state["step"] += 1
        alpha = group["alpha"]
        if group["weight_decay"] != 0:
            g = g + group["weight_decay"] * p.data
        sq = state["square_avg"]
        sq *= alpha
        sq += (1 - alpha) * g * g
        if group["centered"]:
            ga = state["grad_avg"]
            ga += (1 - alpha) * (g - ga)
            avg = xp.sqrt(sq - ga * ga) + group["eps"]
        else:
            avg = xp.sqrt(sq) + group["eps"]
        if group["momentum"] > 0:
            buf = state["momentum_buffer"]
            buf *= group["momentum"]
            buf += g / avg
            p.data -= group["lr"] * buf
        else:
            p.data -= group["lr"] * (g / avg)


class Adam(Optimizer):
    """torch.optim.Adam: ``lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
    amsgrad=False``; ``decoupled_weight_decay=True`` makes it AdamW."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
    ) -> None:
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=tuple(betas),
                eps=eps,
                weight_decay=weight_decay,
                amsgrad=amsgrad,
                maximize=maximize,
                decoupled_weight_decay=decoupled_weight_decay,
            ),
        )

    def _check_group(self, group):
        super()._check_group(group)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas: expected a pair of floats, got {betas!r}")
        _in_unit("betas[0]", betas[0])
        _in_unit("betas[1]", betas[1])
        _nonneg("eps", group["eps"])

    _kind = "adam"

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return [group["lr"], beta1, beta2, group["eps"], group["weight_decay"]] + [
            float(group["amsgrad"]),
            float(group["maximize"]),
            float(group["decoupled_weight_decay"]),
        ]

    def _prepare(self, p, group, state):
        self._init_state(p, group, state, np)
        state["step"] += 1
        step = state["step"]
        beta1, beta2 = group["betas"]
        bufs = [state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq")]
        if group["amsgrad"] and bufs[2] is None:
            raise ValueError("Adam: the state lacks max_exp_avg_sq that amsgrad needs")
        # the same scalars as _update: lr / bias_correction1, sqrt(bias_correction2)
        return bufs, group["lr"] / (1 - beta1**step), math.sqrt(1 - beta2**step)

    @staticmethod
    def _init_state(p, group, state, xp):
        if not state:
            state.update(step=0, exp_avg=xp.zeros_like(p.data), exp_avg_sq=xp.zeros_like(p.data))
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = xp.zeros_like(p.data)

    def _update(self, p, g, group, state, xp):
        self._init_state(p, group, state, xp)
        state["step"] += 1
        step = state["step"]
        lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
        if wd != 0:
            if group["decoupled_weight_decay"]:
                p.data *= 1 - lr * wd
            else:
                g = g + wd * p.data
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m += (1 - beta1) * (g - m)  # torch's lerp_(grad, 1 - beta1)
        v *= beta2
        v += (1 - beta2) * g * g
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bc2_sqrt = math.sqrt(bias_correction2)
        if group["amsgrad"]:
            vmax = state["max_exp_avg_sq"]
            xp.maximum(vmax, v, out=vmax)
            denom = xp.sqrt(vmax) / bc2_sqrt + group["eps"]
        else:
            denom = xp.sqrt(v) / bc2_sqrt + group["eps"]
        p.data -= step_size * (m / denom)


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay, ``weight_decay=1e-2`` by default
    (``p *= 1 - lr * weight_decay`` before the Adam step)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=True,
        )


def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float = 2.0) -> float:
    """Scale the gradients of ``parameters`` in place so that their joint norm is at most
    ``max_norm`` (torch.nn.utils.clip_grad_norm_: ``coef = min(1, max_norm / (norm + 1e-6))``).
    Frozen parameters are left out. Returns the total norm before clipping, as a float."""
    if isinstance(parameters, Parameter):
        parameters = [parameters]
    ps = [p for p in parameters if p.requires_grad]
    max_norm = _nonneg("max_norm", max_norm)
    norm_type = float(norm_type)
    if not ps:
        return 0.0
    if norm_type <= 0:
        raise ValueError(f"norm_type: must be > 0, got {norm_type}")
    grads = [p.grad for p in ps]
    kern = training.cpu_kernels(*grads) if norm_type == 2.0 or math.isinf(norm_type) else None
    if kern is not None:
        return _clip_fused(kern, grads, max_norm, math.isinf(norm_type))
    if math.isinf(norm_type):
        total = max(
            (float(array_module(p.grad).abs(p.grad).max()) for p in ps if p.grad.size),
            default=0.0,
        )
    else:
        parts = []
        for p in ps:
            xp = array_module(p.grad)
            parts.append(float(xp.sum(xp.abs(p.grad) ** norm_type)))
        total = math.fsum(parts) ** (1.0 / norm_type)
    coef = min(max_norm / (total + 1e-6), 1.0)
    for p in ps:
        p.grad *= p.grad.dtype.type(coef)
    return total


_clip_plans: dict[tuple[int, ...], Any] = {}


def _clip_fused(kern: Any, grads: list[Any], max_norm: float, inf_norm: bool) -> float:
    """clip_grad_norm_ on NumPy gradients: the norm of all of them in one kernel call (per-chunk
    sums in double, added in chunk order), then, only when clipping, one scaling call."""
    sizes = tuple(g.size for g in grads)
    chunks = _clip_plans.get(sizes)
    if chunks is None:
        if len(_clip_plans) > 64:
            _clip_plans.clear()
        chunks = _clip_plans[sizes] = kern.chunk_table(sizes)
    ct, cs, cl = chunks
    ptrs = np.fromiter((training.address(g) for g in grads), np.int64, len(grads))
    dbl = grads[0].dtype == np.float64
    nt = max(1, min(training.threads(), ct.shape[0]))
    partial = training.scratch("clip_partial", np.float64, ct.shape[0])
    total = kern.grad_norm(ptrs, ct, cs, cl, partial, dbl, inf_norm, nt)
    coef = min(max_norm / (total + 1e-6), 1.0)
    if coef < 1.0:  # a factor of 1 changes nothing
        kern.scale(ptrs, ct, cs, cl, coef, dbl, nt)
    return total
