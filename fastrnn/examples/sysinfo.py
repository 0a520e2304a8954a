"""What ``fastrnn info`` reports: version, build, threads, BLAS and the GPU path."""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import re
import sysconfig
from pathlib import Path
from typing import Any

# The kernel extension modules (fastrnn/_cpu/*.pyx): the recurrent engine (LSTM, GRU, RNN), the
# prepared inference steps, the training glue (loss, clipping, optimizers), convolution (direct
# and Winograd; im2col) and pooling
CPU_MODULES = ("recurrent", "inference", "_train", "conv2d", "conv2d_im2col", "pool2d")

# Symbols only an OpenMP build references: GCC's libgomp entry points, LLVM/Intel's libomp.
_OPENMP_MARKERS = (b"GOMP_parallel", b"GOMP_loop", b"__kmpc_fork_call", b"omp_get_max_threads")
_COMPILER_RE = re.compile(rb"(GCC: \([^)]*\) [0-9][0-9.]*|clang version [0-9][0-9.]*[^\x00]*)")


def _extension_facts(path: Path) -> dict[str, Any]:
    """OpenMP and compiler of a built extension, read from the shared object itself.

    An OpenMP build calls into the OpenMP runtime (``GOMP_*`` for GCC, ``__kmpc_*`` for
    LLVM), so its dynamic symbol table names those functions; the ``.comment`` section of an
    ELF object records the compiler. Reading the bytes works without importing the module.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        return {"path": str(path), "error": str(exc)}
    compilers = sorted({m.decode("ascii", "replace") for m in _COMPILER_RE.findall(data)})
    return {
        "path": path.name,
        "openmp": any(marker in data for marker in _OPENMP_MARKERS),
        "compiler": compilers[-1] if compilers else None,
    }


def build_info() -> dict[str, Any]:
    """Which CPU kernel modules are built, with OpenMP or not, and by which compiler."""
    modules: dict[str, Any] = {}
    for name in CPU_MODULES:
        spec = importlib.util.find_spec(f"fastrnn._cpu.{name}")
        if spec is None or spec.origin is None or not spec.origin.endswith((".so", ".pyd")):
            modules[name] = None
        else:
            modules[name] = _extension_facts(Path(spec.origin))
    built = [m for m in modules.values() if m]
    openmp: bool | None = None
    if built:
        openmp = all(m.get("openmp") for m in built)
    compilers = sorted({m["compiler"] for m in built if m.get("compiler")})
    return {
        "cpu_modules": modules,
        "openmp": openmp,
        "compiler": ", ".join(compilers) if compilers else None,
        "python_compiler": platform.python_compiler(),
        "cc": sysconfig.get_config_var("CC"),
    }


def blas_info() -> list[dict[str, Any]]:
    """The BLAS/OpenMP libraries loaded in this process (NumPy's, SciPy's, ...) and their
    threads, from threadpoolctl."""
    import numpy  # noqa: F401  (loads NumPy's BLAS)

    from fastrnn._cpu import _scipy_blas

    _scipy_blas.module()  # loads SciPy's BLAS, the one the kernels call

    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"error": "threadpoolctl is not installed"}]
    rows = []
    for lib in threadpool_info():
        rows.append(
            {
                "user_api": lib.get("user_api"),
                "internal_api": lib.get("internal_api"),
                "version": lib.get("version"),
                "architecture": lib.get("architecture"),
                "threading_layer": lib.get("threading_layer"),
                "num_threads": lib.get("num_threads"),
                "library": Path(lib.get("filepath", "")).name,
                "loaded_by": _owner(lib.get("filepath", "")),
            }
        )
    return rows


def _owner(filepath: str) -> str | None:
    """Which package shipped a shared library: wheels keep them in ``<package>.libs``."""
    for part in reversed(Path(filepath).parts[:-1]):
        if part.endswith(".libs"):
            return part[: -len(".libs")]
        if part in ("site-packages", "dist-packages"):
            break
    return None


def gpu_info() -> dict[str, Any]:
    """CuPy, CUDA and the GPU, or why the GPU path is off.

    The CUDA backend's own report (``fastrnn._cuda.info.gpu_info``) is used when it exists;
    otherwise this asks CuPy directly.
    """
    try:
        module = importlib.import_module("fastrnn._cuda.info")
    except ModuleNotFoundError as exc:
        if exc.name not in ("fastrnn._cuda.info",):
            raise
        module = None
    if module is not None and hasattr(module, "gpu_info"):
        info = dict(module.gpu_info())
        info.setdefault("source", "fastrnn._cuda.info")
        return info
    # the same keys as fastrnn._cuda.info.gpu_info
    info: dict[str, Any] = {
        "available": False,
        "reason": None,
        "cupy": None,
        "cuda_runtime": None,
        "cuda_driver": None,
        "devices": 0,
        "device": None,
        "source": "cupy",
    }
    try:
        import cupy
    except ImportError:
        info["reason"] = "CuPy is not installed (pip install fastrnn[gpu-cuda12] or [gpu-cuda13])"
        return info
    except Exception as exc:  # a broken CuPy install: report it, do not crash `info`
        info["reason"] = f"import cupy failed: {type(exc).__name__}: {_one_line(exc)}"
        return info
    info["cupy"] = cupy.__version__
    runtime = cupy.cuda.runtime
    try:
        info["cuda_runtime"] = _cuda_version(runtime.runtimeGetVersion())
        info["cuda_driver"] = _cuda_version(runtime.driverGetVersion()) or None
        count = runtime.getDeviceCount()
    except Exception as exc:
        info["reason"] = f"no usable CUDA device: {_one_line(exc)}"
        return info
    info["devices"] = count
    if count == 0:
        info["reason"] = "CUDA sees no GPU"
        return info
    try:
        props = runtime.getDeviceProperties(0)
        name = props["name"]
        info["device"] = {
            "id": 0,
            "name": name.decode() if isinstance(name, bytes) else str(name),
            "compute_capability": f"{props['major']}{props['minor']}",
            "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
        }
    except Exception as exc:
        info["reason"] = f"querying the GPU failed: {_one_line(exc)}"
        return info
    info["available"] = bool(cupy.is_available())
    if not info["available"]:
        info["reason"] = "cupy.is_available() is False"
    return info


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}" if v else ""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def torch_info() -> dict[str, Any] | None:
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return {"version": torch.__version__, "num_threads": torch.get_num_threads()}


def collect() -> dict[str, Any]:
    import numpy
    import scipy

    import fastrnn

    return {
        "fastrnn": fastrnn.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "build": build_info(),
        "threads": {
            "fastrnn": fastrnn.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "cpus_available": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
        },
        "blas": blas_info(),
        "gpu": gpu_info(),
        "torch": torch_info(),
    }


def format_report(info: dict[str, Any]) -> str:
    lines = [
        f"fastrnn {info['fastrnn']}  (Python {info['python']}, NumPy {info['numpy']}, "
        f"SciPy {info['scipy']}; {info['platform']})"
    ]
    build = info["build"]
    built = [n for n, m in build["cpu_modules"].items() if m]
    missing = [n for n, m in build["cpu_modules"].items() if not m]
    if built:
        omp = {True: "on", False: "OFF (serial build)", None: "unknown"}[build["openmp"]]
        text = f"CPU kernels {', '.join(built)}; OpenMP {omp}; compiler {build['compiler'] or '?'}"
        if missing:
            text += f"; not built: {', '.join(missing)}"
    else:
        text = "no CPU kernel module is built (pip install -e . or python setup.py build_ext "
        text += "--inplace); the NumPy reference still works"
    lines.append(f"build:    {text}")
    th = info["threads"]
    env = th["OMP_NUM_THREADS"]
    lines.append(
        f"threads:  {th['fastrnn']} (fastrnn.set_num_threads; OMP_NUM_THREADS="
        f"{env if env is not None else 'unset'}; {th['cpus_available']} CPUs available)"
    )
    blas = info["blas"]
    if not blas:
        lines.append("BLAS:     none reported by threadpoolctl")
    for i, lib in enumerate(blas):
        head = "BLAS:    " if i == 0 else "         "
        if "error" in lib:
            lines.append(f"{head} {lib['error']}")
            continue
        arch = f" ({lib['architecture']})" if lib.get("architecture") else ""
        layer = f", {lib['threading_layer']} threading" if lib.get("threading_layer") else ""
        owner = {"scipy": "SciPy's: the CPU kernels call it", "numpy": "NumPy's"}.get(
            lib.get("loaded_by") or "", lib.get("loaded_by") or lib["user_api"]
        )
        lines.append(
            f"{head} {lib['internal_api']} {lib['version'] or ''}{arch}: {lib['num_threads']} "
            f"threads{layer} [{owner}; {lib['library']}]"
        )
    gpu = info["gpu"]
    versions = ", ".join(
        f"{label} {gpu[key]}"
        for key, label in (
            ("cupy", "CuPy"),
            ("cuda_runtime", "CUDA runtime"),
            ("cuda_driver", "driver"),
            ("nvrtc", "NVRTC"),
        )
        if gpu.get(key)
    )
    if gpu.get("available"):
        dev = gpu.get("device") or {}
        if isinstance(dev, dict):
            dev = (
                f"{dev.get('name')} (compute capability {dev.get('compute_capability')}, "
                f"{dev.get('memory_gib')} GiB)"
            )
        lines.append(f"GPU:      {dev}; {versions}")
    else:
        reason = gpu.get("reason") or "unavailable"
        lines.append(f"GPU:      off: {reason}" + (f" ({versions})" if versions else ""))
    torch = info.get("torch")
    lines.append(
        f"PyTorch:  {torch['version']}, {torch['num_threads']} threads (benchmark opponent)"
        if torch
        else "PyTorch:  not installed (fastrnn bench compares without it)"
    )
    return "\n".join(lines)
