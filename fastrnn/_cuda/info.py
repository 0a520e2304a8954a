"""What the GPU path sees: ``gpu_info()`` for ``fastrnn info``."""

from __future__ import annotations

from typing import Any


def _version(v: int) -> str:
    """CUDA's integer versions (12040) as "12.4"."""
    return f"{v // 1000}.{(v % 1000) // 10}"


def gpu_info() -> dict[str, Any]:
    """The GPU path's state, never raising.

    Keys: ``available`` (bool: CuPy arrays run the CUDA kernels), ``reason`` (why not, when
    unavailable), ``cupy`` (CuPy's version or None), ``cuda_runtime`` and ``cuda_driver``
    (versions like "13.0"), ``nvrtc`` (the NVRTC version that compiles the kernels), ``devices``
    (count) and ``device`` (name of the current device, its compute capability and memory).
    """
    info: dict[str, Any] = {
        "available": False,
        "reason": None,
        "cupy": None,
        "cuda_runtime": None,
        "cuda_driver": None,
        "nvrtc": None,
        "devices": 0,
        "device": None,
    }
    try:
        import cupy
    except ImportError:
        info["reason"] = (
            'CuPy is not installed (pip install "fastrnn[gpu-cuda13]" or "[gpu-cuda12]")'
        )
        return info
    except Exception as exc:  # a broken CuPy installation
        info["reason"] = f"CuPy cannot be imported: {type(exc).__name__}: {exc}"
        return info
    info["cupy"] = cupy.__version__
    runtime = cupy.cuda.runtime
    try:
        info["cuda_runtime"] = _version(runtime.runtimeGetVersion())
    except Exception:
        pass
    try:
        from cupy.cuda import compiler

        major, minor = compiler._get_nvrtc_version()
        info["nvrtc"] = f"{major}.{minor}"
    except Exception:
        pass
    try:
        driver = runtime.driverGetVersion()
    except Exception as exc:
        info["reason"] = f"CUDA driver error: {type(exc).__name__}: {exc}"
        return info
    if driver == 0:
        info["reason"] = "no NVIDIA driver found (no GPU on this machine?)"
        return info
    info["cuda_driver"] = _version(driver)
    try:
        count = runtime.getDeviceCount()
    except Exception as exc:
        info["reason"] = f"CUDA driver error: {type(exc).__name__}: {exc}"
        return info
    info["devices"] = count
    if count == 0:
        info["reason"] = "no CUDA device"
        return info
    try:
        dev = cupy.cuda.Device()
        props = runtime.getDeviceProperties(dev.id)
        name = props["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        info["device"] = {
            "id": dev.id,
            "name": name,
            "compute_capability": dev.compute_capability,
            "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
        }
    except Exception as exc:
        info["reason"] = f"CUDA device error: {type(exc).__name__}: {exc}"
        return info
    try:
        from cupy_backends.cuda.libs import cublas  # noqa: F401
    except Exception as exc:
        info["reason"] = f"cuBLAS cannot be loaded: {type(exc).__name__}: {exc}"
        return info
    info["available"] = True
    return info
