"""Time loops kept between calls, and their CUDA graphs.

A time loop is a list of prepared calls ``(fn, args)`` (cuBLAS GEMMs and kernel launches on
precomputed arguments). :class:`LoopCache` keeps the list per key (LRU, :data:`LOOP_CACHE_SIZE`
loops), so a loop run again with the same arrays -- CuPy's memory pool hands the same blocks back
call after call -- costs one ``fn(*args)`` per call and nothing else.

With graphs on (:func:`fastrnn._cuda._config.cuda_graphs`), the second run of a loop is captured
into a graph on a private stream, and every later run replays it on the current stream: one
launch for the whole loop. A graph replays exactly the calls it recorded -- the same kernels,
pointers and scalars -- and the key (every device address and array size of the loop included)
makes sure it is only replayed where those are the arrays of the call. The GEMMs are captured
through :class:`fastrnn._cuda._cublas.DirectCublas` with a workspace owned here (one per device
and stream). A loop that cannot be captured runs eagerly from then on; the failure is counted in
``stats["capture_failed"]``, its text kept in ``stats["last_capture_error"]`` and logged
(warning, once per message).
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any

from fastrnn._cuda._cublas import CupyBlas

LOOP_CACHE_SIZE = 32


class DeviceBuffer:
    """Device memory from cudaMalloc itself, outside CuPy's allocator (a user allocator may
    hand any pool memory out again), freed with the object."""

    def __init__(self, runtime_api: Any, nbytes: int) -> None:
        self._api = runtime_api
        self.ptr = 0
        self.ptr = runtime_api.malloc(nbytes)
        self.nbytes = nbytes

    def __del__(self) -> None:
        if self.ptr:
            with contextlib.suppress(Exception):  # e.g. at interpreter exit
                self._api.free(self.ptr)
            self.ptr = 0


class _Loop:
    """A time loop's calls, kept for the next run with the same key, and its CUDA graph."""

    __slots__ = ("calls", "runs", "graph", "workspace", "failed")

    def __init__(self, calls: list) -> None:
        self.calls = calls
        self.runs = 0
        self.graph: Any = None
        self.workspace: Any = None
        self.failed = False


class LoopCache:
    """The kept loops of one runtime and the capture of their graphs (module docstring)."""

    def __init__(self, cupy: Any, blas: CupyBlas, log: Any) -> None:
        self._cupy = cupy
        self._blas = blas
        self._log = log
        self._loops: collections.OrderedDict[tuple, _Loop] = collections.OrderedDict()
        self._capture_streams: dict[int, Any] = {}
        self._workspaces: dict[tuple[int, int], DeviceBuffer] = {}
        self.stats: dict[str, Any] = {
            "eager": 0,
            "captured": 0,
            "replayed": 0,
            "capture_failed": 0,
            "last_capture_error": None,
        }

    def clear(self) -> None:
        self._loops.clear()

    def run(self, key: tuple, make_calls: Any, graphs: bool) -> None:
        """Run the loop of ``key``: its kept calls (or ``make_calls()``'s, kept from now on),
        or its graph."""
        loop = self._loops.get(key)
        if loop is None:
            loop = self._loops[key] = _Loop(make_calls())
            while len(self._loops) > LOOP_CACHE_SIZE:
                self._loops.popitem(last=False)
        else:
            self._loops.move_to_end(key)
        if graphs:
            if loop.graph is not None:
                self.stats["replayed"] += 1
                loop.graph.launch()
                return
            if loop.runs >= 1 and not loop.failed:
                captured = self._capture(loop.calls)
                if captured is not None:
                    loop.graph, loop.workspace = captured
                    self.stats["captured"] += 1
                    loop.graph.launch()
                    return
                loop.failed = True
                self.stats["capture_failed"] += 1
        loop.runs += 1
        self.stats["eager"] += 1
        with self._blas.session():
            for fn, args in loop.calls:
                fn(*args)

    def _capture(self, calls: list) -> tuple[Any, Any] | None:
        """The calls captured into an instantiated CUDA graph on a private stream, with the
        cuBLAS workspace it uses; None (and the error recorded) when capture fails. CuPy's cuBLAS
        wrappers are swapped for direct calls; GEMMs of the general path take the direct path by
        themselves (``CupyBlas.capturing``)."""
        cupy, blas = self._cupy, self._blas
        try:
            direct = blas.direct()
            device_id = cupy.cuda.runtime.getDevice()
            stream = self._capture_streams.get(device_id)
            if stream is None:
                stream = self._capture_streams[device_id] = cupy.cuda.Stream(non_blocking=True)
            workspace = self._workspace(device_id, cupy.cuda.get_current_stream().ptr, direct)
        except Exception as e:
            self._capture_error(e)
            return None
        sub = blas.capture_fns
        cublas = blas.cublas
        handle = blas.handle()
        error: BaseException | None = None
        graph = None
        with stream:
            mode = cublas.getPointerMode(handle)
            previous = cublas.getStream(handle)
            try:
                cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
                direct.set_stream(handle, stream.ptr)  # also resets the handle's workspace
                if workspace is not None:
                    direct.set_workspace(handle, workspace.ptr, workspace.nbytes)
                blas.capturing = True
                stream.begin_capture()
                try:
                    for fn, args in calls:
                        sub.get(fn, fn)(*args)
                except Exception as e:
                    error = e
                try:
                    graph = stream.end_capture()
                except Exception as e:
                    error = error or e
            except Exception as e:
                error = error or e
            finally:
                blas.capturing = False
                cublas.setPointerMode(handle, mode)
                direct.set_stream(handle, previous)  # the handle's default workspace again
        if error is not None:
            self._capture_error(error)
            return None
        return graph, workspace

    # cuBLAS's default workspace: 32 MiB on compute capability 9.0 and later, 4 MiB before
    # (cublasSetWorkspace's documentation); the same size keeps cuBLAS's algorithm choice.
    def _workspace(self, device_id: int, stream_ptr: int, direct: Any) -> Any:
        if direct.set_workspace is None:
            return None
        ws = self._workspaces.get((device_id, stream_ptr))
        if ws is None:
            cc = int(self._cupy.cuda.device.get_compute_capability())
            ws = DeviceBuffer(self._cupy.cuda.runtime, (32 if cc >= 90 else 4) << 20)
            self._workspaces[(device_id, stream_ptr)] = ws
        return ws

    def _capture_error(self, e: BaseException) -> None:
        text = f"{type(e).__name__}: {e}"
        self.stats["last_capture_error"] = text
        self._log(f"CUDA graph capture failed, the loop runs eagerly: {text}")
