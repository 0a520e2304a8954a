"""Build logic of fastrnn: the Cython extension list, the OpenMP probe, the CUDA sources.

Environment switches:

FASTRNN_FAIL_NO_OPENMP=1   a compiler without OpenMP is an error instead of a serial build (CI)
FASTRNN_CYTHON_DEBUG=1     bounds checks, wraparound and initialized checks on; -O0 -g
FASTRNN_NATIVE=1           compile for this machine's CPU (-march=native); off by default so a
                           wheel runs on any x86-64
FASTRNN_EXTENSIONS=a,b     build only these extensions (e.g. "recurrent,conv2d"): a developer
                           shortcut
FASTRNN_SANITIZE=address   build with AddressSanitizer (-fsanitize=address, -O1 -g, frame
                           pointers kept) to catch out-of-bounds reads and writes in the kernels;
                           Python is not built with it, so run with
                           LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0
                           (.ci/run does this for tests/test_fuzz.py)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def openmp_flags() -> list[str]:
    """Probe the C compiler for OpenMP; return the flags, or [] with a loud warning."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cc = cc.split()
    src = textwrap.dedent(
        """
        #include <omp.h>
        #include <stdio.h>
        int main(void) {
            int n = 0;
            #pragma omp parallel reduction(+:n)
            n += 1;
            printf("%d\\n", n > 0);
            return omp_get_max_threads() > 0 ? 0 : 1;
        }
        """
    )
    with tempfile.TemporaryDirectory() as tmp:
        c_file = Path(tmp) / "probe.c"
        c_file.write_text(src)
        exe = Path(tmp) / "probe"
        try:
            proc = subprocess.run(
                [*cc, "-fopenmp", str(c_file), "-o", str(exe)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            ok = proc.returncode == 0 and subprocess.run([str(exe)], timeout=60).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
    if ok:
        return ["-fopenmp"]
    message = (
        "\n" + "*" * 78 + "\n"
        "fastrnn: the C compiler does not support OpenMP (-fopenmp).\n"
        "Building the CPU kernels SERIAL: they will use one thread for pointwise work.\n"
        "Install a compiler with OpenMP (gcc, or clang with libomp) for parallel kernels.\n"
        + "*" * 78
    )
    if _env_flag("FASTRNN_FAIL_NO_OPENMP"):
        sys.exit(message + "\nFASTRNN_FAIL_NO_OPENMP=1 is set: stopping.")
    print(message, file=sys.stderr)
    return []


# C sources compiled into an extension next to its .pyx (their headers sit beside them)
C_SOURCES = {
    "conv2d": ("conv_direct.c",),
}

# Per-extension flags. _train (the training glue): GCC vectorises its elementwise loops only
# when sqrt needs no errno path and float selects may be if-converted; neither changes a value
# (nothing reads errno, no floating-point trap is enabled). Fused Adam over the char-rnn's
# 519k parameters on one thread: 1.22 ms scalar, 0.39 ms vectorised (torch.optim.Adam 1.04).
EXTRA_COMPILE_ARGS = {"_train": ["-fno-math-errno", "-fno-trapping-math"]}


def sanitizer_flags() -> list[str]:
    """Compile and link flags of FASTRNN_SANITIZE (empty when unset)."""
    name = os.environ.get("FASTRNN_SANITIZE", "").strip().lower()
    if not name:
        return []
    if name != "address":
        sys.exit(f"FASTRNN_SANITIZE: expected 'address' (or unset), got {name!r}")
    return ["-fsanitize=address", "-fno-omit-frame-pointer"]


def extensions() -> list[Extension]:
    debug = _env_flag("FASTRNN_CYTHON_DEBUG")
    sanitize = sanitizer_flags()
    omp = openmp_flags()
    if debug:
        compile_args = ["-O0", "-g"]
    elif sanitize:
        compile_args = ["-O1", "-g"]  # ASan's advice: readable reports, a fraction of -O3's build
    else:
        compile_args = ["-O3"]
    if _env_flag("FASTRNN_NATIVE"):
        compile_args.append("-march=native")
    compile_args += omp + sanitize
    only = {s.strip() for s in os.environ.get("FASTRNN_EXTENSIONS", "").split(",") if s.strip()}
    exts = []
    for pyx in sorted((ROOT / "fastrnn" / "_cpu").glob("*.pyx")):
        name = pyx.stem
        if only and name not in only:
            continue
        sources = [str(pyx.relative_to(ROOT))]
        sources += [f"fastrnn/_cpu/{c}" for c in C_SOURCES.get(name, ())]
        exts.append(
            Extension(
                f"fastrnn._cpu.{name}",
                sources,
                depends=[str(p) for p in (ROOT / "fastrnn" / "_cpu").glob("*.h")],
                include_dirs=[np.get_include(), str(ROOT / "fastrnn" / "_cpu")],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                extra_compile_args=compile_args + EXTRA_COMPILE_ARGS.get(name, []),
                extra_link_args=omp + sanitize,
            )
        )
    directives = {
        "language_level": "3",
        "boundscheck": debug,
        "wraparound": debug,
        "initializedcheck": debug,
        "cdivision": not debug,
        "embedsignature": True,
    }
    return cythonize(
        exts,
        compiler_directives=directives,
        nthreads=os.cpu_count() or 1,
    )


class BuildExtParallel(build_ext):
    """Compile the extension modules side by side, one per CPU, unless -j/--parallel says
    otherwise (each module is one large C file: the build is that many compiler runs)."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if not self.parallel:
            self.parallel = os.cpu_count() or 1


class BuildPyWithCuda(build_py):
    """Ship csrc/*.cu and csrc/*.cuh inside the wheel as fastrnn/csrc/."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "fastrnn" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for src in sorted((ROOT / "csrc").glob("*.cu*")):
            shutil.copy2(src, target / src.name)


setup(
    ext_modules=extensions(),
    cmdclass={"build_py": BuildPyWithCuda, "build_ext": BuildExtParallel},
)
