"""The kernel table: every CUDA kernel of csrc/ and its template instantiations, listed once.

From this one table come

* the ``name_expressions`` handed to NVRTC (``kernel<float>``, ``kernel<double>``, and for a
  recurrent cell's step kernels ``kernel<float, Cell>``, ...),
* the argument conversion of every launch (:mod:`fastrnn._cuda._launch`),
* the NVRTC compile test for sm_80 / sm_90 (``tests/test_cuda_compile.py``),
* the host build of the unchanged ``.cu`` files that the host execution tests call
  (``tests/cuda_host_emulation.py``; it also checks, with ``static_assert``, that every
  ``params`` entry below is exactly the kernel's C++ signature, so a launch can never pass an
  8-byte value where the kernel expects 4).

``params`` spells the kernel's parameters in C++ with ``T`` for the floating type: pointer
parameters take device arrays (``T*`` of the call's dtype, ``index_t*`` of int64), ``index_t``
(64-bit) and ``int`` take Python ints, ``T`` takes a Python float.

Sources are compiled lazily, one ``cupy.RawModule`` per ``.cu`` file on first use, with
``common.cuh`` (and, for a cell file, ``recurrent.cuh``) prepended as text so that CuPy's compile
cache key covers it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Options of our own, added to those CuPy's RawModule adds (include paths, --std=c++17, -ftz=true,
# -arch, --device-as-default-execution-space). Kept empty on purpose: no fast-math, so expf/tanhf
# keep their documented accuracy.
COMPILE_OPTIONS: tuple[str, ...] = ()

COMMON_HEADER = "common.cuh"

CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


@dataclass(frozen=True)
class Kernel:
    """One ``template <typename T> __global__`` kernel of a ``.cu`` file."""

    name: str
    source: str
    params: tuple[str, ...]
    dtypes: tuple[str, ...] = ("float", "double")
    # The second template argument (a recurrent cell struct), or None.
    cell: str | None = None

    @property
    def key(self) -> str:
        """What the drivers launch it by: ``name``, or ``name<Cell>`` for a cell's kernel."""
        return self.name if self.cell is None else f"{self.name}<{self.cell}>"

    @property
    def symbol(self) -> str:
        """``key`` as a C identifier (the host tests' wrapper names)."""
        return self.name if self.cell is None else f"{self.name}_{self.cell}"

    def expression(self, ctype: str) -> str:
        """The NVRTC name expression of the instantiation for ``ctype``."""
        if self.cell is None:
            return f"{self.name}<{ctype}>"
        return f"{self.name}<{ctype}, {self.cell}>"

    @functools.cached_property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.rsplit(" ", 1)[1] for p in self.params)

    @functools.cached_property
    def kinds(self) -> tuple[str, ...]:
        """Per parameter: "T*", "index_t*", "index_t", "int" or "T" (what a launch converts)."""
        return tuple(_kind(p) for p in self.params)


def _kind(param: str) -> str:
    decl = param.replace("const ", "").replace("__restrict__", "").strip()
    ctype = decl.rsplit(" ", 1)[0].replace(" ", "")
    if ctype not in ("T*", "index_t*", "index_t", "int", "T"):
        raise ValueError(f"kernel table: unsupported parameter type in {param!r}")
    return ctype


# conv2d: the chunk of images, then the geometry
_CHUNK = ("index_t n0", "index_t nb")
_CONV = (
    "index_t C",
    "index_t H",
    "index_t W",
    "index_t KH",
    "index_t KW",
    "index_t OH",
    "index_t OW",
    "index_t sh",
    "index_t sw",
    "index_t ph",
    "index_t pw",
    "index_t dh",
    "index_t dw",
)
# pooling: planes and geometry
_POOL = (
    "index_t NC",
    "index_t H",
    "index_t W",
    "index_t OH",
    "index_t OW",
    "index_t KH",
    "index_t KW",
    "index_t sh",
    "index_t sw",
    "index_t ph",
    "index_t pw",
)

# The recurrent cells (csrc/lstm.cu, gru.cu, rnn.cu): each file defines one cell struct, and the
# step kernels of csrc/recurrent.cuh are instantiated for it.
CELLS = {"lstm.cu": "LstmCell", "gru.cu": "GruCell", "rnn.cu": "RnnCell"}
RECURRENT_HEADER = "recurrent.cuh"

_STEP = ("const index_t* lengths", "index_t t")
_FORWARD_STEP = ("T* pre", "const T* hw", "const T* b", "const T* b_hh", "T* hs", "T* cs", "T* y",
                 "T* acts", *_STEP, "index_t src", "index_t dst", "index_t N", "index_t H",
                 "int save", "int mode")  # fmt: skip
_BACKWARD_STEP = ("const T* acts", "const T* hs", "const T* cs", "const T* dh",
                  "index_t dh_stride", "T* dhs", "T* da", "T* dha", "T* dc", *_STEP, "index_t N",
                  "index_t H", "int mode")  # fmt: skip

# fmt: off
KERNELS: tuple[Kernel, ...] = (
    # -- the cells: recurrent.cuh's step kernels over lstm.cu, gru.cu, rnn.cu -----------------
    *(Kernel(name, source, params, cell=cell)
      for source, cell in CELLS.items()
      for name, params in (("recurrent_forward_step", _FORWARD_STEP),
                           ("recurrent_backward_step", _BACKWARD_STEP))),
    # -- recurrent.cu: the time loop's own kernels ---------------------------------------------
    Kernel("recurrent_seed", "recurrent.cu",
           ("const T* dy", "const T* dhT", "T* dhs", "const index_t* lengths", "index_t steps",
            "index_t N", "index_t P", "int has_dhT")),
    Kernel("recurrent_select", "recurrent.cu",
           ("T* hs", "T* y", *_STEP, "index_t src", "index_t dst", "index_t N", "index_t P")),
    # -- conv2d.cu -------------------------------------------------------------------------
    Kernel("im2col", "conv2d.cu", ("const T* x", "T* cols", *_CHUNK, *_CONV)),
    Kernel("col2im", "conv2d.cu", ("const T* cols", "T* dx", *_CHUNK, *_CONV)),
    Kernel("to_channel_major", "conv2d.cu",
           ("const T* src", "T* dst", *_CHUNK, "index_t F", "index_t L")),
    Kernel("from_channel_major", "conv2d.cu",
           ("const T* src", "const T* bias", "T* dst", *_CHUNK, "index_t F", "index_t L",
            "int has_bias")),
    # -- pool2d.cu -------------------------------------------------------------------------
    Kernel("max_pool2d_forward", "pool2d.cu",
           ("const T* x", "T* y", "index_t* arg", *_POOL, "int save")),
    Kernel("max_pool2d_backward", "pool2d.cu",
           ("const T* dy", "const index_t* arg", "T* dx", *_POOL)),
    Kernel("avg_pool2d_forward", "pool2d.cu", ("const T* x", "T* y", *_POOL)),
    Kernel("avg_pool2d_backward", "pool2d.cu", ("const T* dy", "T* dx", *_POOL)),
)
# fmt: on

_BY_KEY = {k.key: k for k in KERNELS}


def kernel(key: str) -> Kernel:
    """The table entry launched as ``key`` (``name`` or ``name<Cell>``)."""
    return _BY_KEY[key]


def source_files() -> tuple[str, ...]:
    """The ``.cu`` files of the table, in table order, each once."""
    return tuple(dict.fromkeys(k.source for k in KERNELS))


def name_expressions(source: str) -> tuple[str, ...]:
    """Every instantiation of the kernels of one ``.cu`` file."""
    return tuple(k.expression(ctype) for k in KERNELS if k.source == source for ctype in k.dtypes)


@functools.cache
def csrc_dir() -> Path:
    """Where the CUDA sources are: ``fastrnn/csrc`` in an installed package (setup.py's build_py
    copies them there), else ``csrc/`` of the source checkout this package is imported from."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / COMMON_HEADER).is_file():
            return candidate
    raise FileNotFoundError(
        "fastrnn's CUDA sources (common.cuh and the .cu files) were found neither in "
        f"{package / 'csrc'} (installed package) nor in {package.parent / 'csrc'} "
        "(source checkout); reinstall fastrnn"
    )


def headers(source: str) -> tuple[str, ...]:
    """The headers prepended to ``source``: common.cuh, and recurrent.cuh for a cell file."""
    return (COMMON_HEADER, RECURRENT_HEADER) if source in CELLS else (COMMON_HEADER,)


@functools.cache
def program_source(source: str) -> str:
    """The text NVRTC compiles for one ``.cu`` file: its headers, then the file, with ``#line``
    directives so compiler messages name the right file and line."""
    d = csrc_dir()
    parts = [f'#line 1 "{name}"\n{(d / name).read_text()}\n' for name in (*headers(source), source)]
    return "".join(parts)


_modules: dict[tuple[str, int], object] = {}


def get_function(key: str, ctype: str, device_id: int):
    """The compiled kernel ``key`` for ``ctype`` on device ``device_id`` (compiling its ``.cu``
    file on first use; CuPy also caches the binary on disk)."""
    import cupy

    k = _BY_KEY[key]
    key = (k.source, device_id)
    module = _modules.get(key)
    if module is None:
        module = cupy.RawModule(
            code=program_source(k.source),
            options=COMPILE_OPTIONS,
            name_expressions=name_expressions(k.source),
        )
        _modules[key] = module
    return module.get_function(k.expression(ctype))
