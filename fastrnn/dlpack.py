"""Zero-copy exchange of arrays between NumPy, CuPy, PyTorch and JAX.

Every function returns an array of the requested library that shares memory with its argument
whenever the two can: NumPy <-> PyTorch CPU tensors <-> JAX CPU arrays, CuPy <-> PyTorch CUDA
tensors <-> JAX GPU arrays. Host memory never silently becomes device memory or the reverse: a
request that would need a transfer raises ``ValueError`` (use ``cupy.asarray`` / ``.get()`` /
``.cpu()`` for those on purpose).

C order is the one exception to "no copies": an argument that is not C-contiguous (a transpose,
a slice with a step, a negatively strided view such as ``a[::-1]``) is first copied to C order,
because fastrnn's kernels need C-contiguous arrays and because exporting a negatively strided
NumPy view through DLPack kills the interpreter in some PyTorch releases (2.13 among them).
``is_zero_copy_compatible(x)`` tells in advance whether a call will copy.

PyTorch tensors that require grad are detached (the result is the same memory, outside autograd).
Neither PyTorch, CuPy nor JAX is imported unless the argument is one of their arrays or the
target library is asked for.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

__all__ = [
    "array_library",
    "is_zero_copy_compatible",
    "to_numpy",
    "to_cupy",
    "to_torch",
    "to_jax",
    "to_kernel_array",
]


def array_library(x: Any) -> str:
    """Which library ``x`` belongs to: "numpy", "cupy", "torch" or "jax".

    Raises TypeError for anything else (lists, scalars, other array libraries).
    """
    if isinstance(x, np.ndarray):
        return "numpy"
    root = type(x).__module__.split(".")[0]
    if root == "cupy" and hasattr(x, "__cuda_array_interface__"):
        return "cupy"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array):
        return "jax"
    raise TypeError(
        "x: expected a numpy.ndarray, cupy.ndarray, torch.Tensor or jax.Array, "
        f"got {type(x).__module__}.{type(x).__name__}"
    )


def _on_gpu(x: Any, lib: str) -> bool:
    if lib == "numpy":
        return False
    if lib == "cupy":
        return True
    if lib == "torch":
        kind = x.device.type
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"x: tensors on device {x.device} are not supported (cpu or cuda)")
        return kind == "cuda"
    platforms = {d.platform for d in x.devices()}
    if len(platforms) != 1 or not platforms <= {"cpu", "gpu", "cuda"}:
        raise ValueError(f"x: JAX arrays on {sorted(platforms)} are not supported (cpu or gpu)")
    return platforms != {"cpu"}


def is_zero_copy_compatible(x: Any) -> bool:
    """True when the exchange functions can hand ``x`` on without copying (it is C-contiguous)."""
    lib = array_library(x)
    if lib in ("numpy", "cupy"):
        return bool(x.flags.c_contiguous)
    if lib == "torch":
        return bool(x.is_contiguous()) and not x.is_conj() and not x.is_neg()
    return True  # JAX arrays are always dense and row-major


def _contiguous(x: Any, lib: str) -> Any:
    """``x`` itself when C-contiguous, else a C-ordered copy in the same library."""
    if lib == "numpy":
        return x if x.flags.c_contiguous else np.ascontiguousarray(x)
    if lib == "cupy":
        if x.flags.c_contiguous:
            return x
        import cupy

        return cupy.ascontiguousarray(x)
    if lib == "torch":
        x = x.detach()
        if x.is_conj() or x.is_neg():
            x = x.resolve_conj().resolve_neg()
        return x if x.is_contiguous() else x.contiguous()
    return x


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy view of host memory: NumPy arrays, PyTorch CPU tensors, JAX CPU arrays.

    Device arrays raise ValueError (copy them to the host on purpose: ``.get()``, ``.cpu()``).
    JAX arrays are immutable, so their views are read-only.
    """
    lib = array_library(x)
    if _on_gpu(x, lib):
        raise ValueError(
            f"x: a {lib} array on the GPU has no NumPy view; copy it to the host explicitly"
        )
    x = _contiguous(x, lib)
    if lib == "numpy":
        return x
    if lib == "torch":
        try:
            return x.numpy()
        except TypeError as exc:  # e.g. bfloat16 has no NumPy dtype
            raise TypeError(f"x: {exc}") from exc
    return np.from_dlpack(x)


def to_cupy(x: Any) -> Any:
    """A CuPy view of device memory: CuPy arrays, PyTorch CUDA tensors, JAX GPU arrays.

    The exchange is ordered on CuPy's current stream (DLPack's ``stream`` argument makes the
    producer's pending work visible on it). Host arrays raise ValueError.
    """
    lib = array_library(x)
    if not _on_gpu(x, lib):
        raise ValueError(
            f"x: a {lib} array in host memory has no CuPy view; use cupy.asarray to copy it"
        )
    x = _contiguous(x, lib)
    if lib == "cupy":
        return x
    import cupy

    return cupy.from_dlpack(x)


def to_torch(x: Any) -> Any:
    """A PyTorch tensor on the same memory: CPU tensors from NumPy/JAX CPU, CUDA tensors from
    CuPy/JAX GPU. PyTorch tensors come back detached (and C-contiguous)."""
    lib = array_library(x)
    import torch

    x = _contiguous(x, lib)
    if lib == "torch":
        return x
    if lib == "numpy":
        # from_numpy shares memory; NumPy's DLPack export refuses read-only arrays.
        return torch.from_numpy(x)
    return torch.from_dlpack(x)


def to_jax(x: Any) -> Any:
    """A JAX array on the same memory (JAX may copy when it cannot alias the buffer, e.g. for
    alignment; it never changes device)."""
    lib = array_library(x)
    import jax.numpy as jnp

    x = _contiguous(x, lib)
    if lib == "jax":
        return x
    return jnp.from_dlpack(x)


def to_kernel_array(x: Any) -> Any:
    """The array fastrnn's kernels take for ``x``: NumPy for host memory, CuPy for device
    memory, in both cases a zero-copy view of a C-contiguous argument."""
    lib = array_library(x)
    return to_cupy(x) if _on_gpu(x, lib) else to_numpy(x)
