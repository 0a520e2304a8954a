"""The CUDA backend: kernels in csrc/ compiled at run time through CuPy (NVRTC), cuBLAS GEMMs.

* :mod:`fastrnn._cuda._kernels` -- the kernel table (every instantiation once), source lookup
  and lazy compilation;
* :mod:`fastrnn._cuda._runtime` -- GEMMs and launches on CuPy's current stream;
* :mod:`fastrnn._cuda.recurrent`, :mod:`fastrnn._cuda.conv` -- the drivers, with the backend
  interface's signatures (fastrnn/backends/base.py);
* :mod:`fastrnn._cuda.info` -- ``gpu_info()`` for ``fastrnn info``.

Nothing here imports CuPy at import time.
"""
