"""The CUDA backend: kernels in csrc/ compiled at run time through CuPy (NVRTC), cuBLAS GEMMs.

* :mod:`fastrnn._cuda._kernels` -- the kernel table (every instantiation once), source lookup
  and lazy compilation;
* :mod:`fastrnn._cuda._runtime` -- the device interface of the drivers (arrays, GEMMs, launches,
  one time-loop API) and CupyRuntime, assembled from
  :mod:`fastrnn._cuda._cublas` (the cuBLAS GEMM adapter), :mod:`fastrnn._cuda._launch` (kernel
  launches) and :mod:`fastrnn._cuda._graphs` (kept time loops, CUDA graph capture);
* :mod:`fastrnn._cuda._config` -- the environment switches, read at call time;
* :mod:`fastrnn._cuda.recurrent`, :mod:`fastrnn._cuda.conv` -- the drivers, with the backend
  interface's signatures (fastrnn/backends/base.py): the recurrent ops are cells of one time
  loop (csrc/recurrent.cuh);
* :mod:`fastrnn._cuda.info` -- ``gpu_info()`` for ``fastrnn info``.

Nothing here imports CuPy at import time.
"""
