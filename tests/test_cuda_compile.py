"""Every kernel-table instantiation compiles through NVRTC, with the options CuPy's RawModule
uses, for sm_80 (A100) and sm_90 (H100). No GPU needed: CuPy and the NVRTC wheel compile without
one (``pip install -e ".[nvrtc]"``). A failure shows NVRTC's log."""

from __future__ import annotations

import re

import pytest

from fastrnn._cuda import _kernels

ARCHS = ("80", "90")


def _nvrtc():
    try:
        from cupy._core import core
        from cupy.cuda import compiler

        compiler._get_nvrtc_version()  # loads libnvrtc
    except Exception as exc:  # CuPy or the NVRTC library missing
        pytest.skip(f"CuPy/NVRTC cannot be loaded: {type(exc).__name__}: {exc}")
    return core, compiler


def rawmodule_options(core, arch: str) -> tuple[str, ...]:
    """What ``cupy.RawModule(code, options=COMPILE_OPTIONS, name_expressions=...)`` hands NVRTC
    (cupy/cuda/compiler.py: _compile_with_cache_cuda and _compile_using_nvrtc_no_warning): the
    CuPy include paths and --std, -ftz=true, the architecture, default device execution space."""
    return core.assemble_cupy_compiler_options(_kernels.COMPILE_OPTIONS) + (
        "-ftz=true",
        f"-arch=sm_{arch}",
        "--device-as-default-execution-space",
    )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", _kernels.source_files())
def test_nvrtc_compiles_every_instantiation(source, arch):
    core, compiler = _nvrtc()
    names = _kernels.name_expressions(source)
    assert names, f"{source}: no kernels in the table"
    prog = compiler._NVRTCProgram(
        _kernels.program_source(source), source, name_expressions=names, method="cubin"
    )
    log = _Log()
    try:
        cubin, mapping = prog.compile(rawmodule_options(core, arch), log)
    except compiler.CompileException as exc:
        pytest.fail(f"NVRTC failed on {source} for sm_{arch}:\n{exc}")
    assert cubin, f"{source}: empty cubin"
    for name in names:
        assert mapping.get(name), f"{source}: no lowered name for {name}"
    # Warnings are errors: a narrowing or an unused result in a kernel is usually a bug.
    assert "warning" not in log.text.lower(), f"{source} sm_{arch}:\n{log.text}"


def test_every_cu_file_is_in_the_table():
    """A .cu file nobody lists would never be compiled or tested."""
    on_disk = {p.name for p in _kernels.csrc_dir().glob("*.cu")}
    assert on_disk == set(_kernels.source_files())


def test_table_lists_each_instantiation_once():
    exprs = [e for s in _kernels.source_files() for e in _kernels.name_expressions(s)]
    assert len(exprs) == len(set(exprs))


class _Log:
    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> None:
        self.text += s


@pytest.mark.parametrize("source", _kernels.source_files())
def test_program_text_holds_its_headers(source):
    """Headers are prepended as text, never #included: CuPy's compile cache key (the program
    text) then changes with them. Cell files get recurrent.cuh after common.cuh."""
    text = _kernels.program_source(source)
    d = _kernels.csrc_dir()
    expected = (_kernels.COMMON_HEADER,) + (
        (_kernels.RECURRENT_HEADER,) if source in _kernels.CELLS else ()
    )
    assert _kernels.headers(source) == expected
    for name in (*expected, source):
        assert (d / name).read_text() in text, name
    assert not re.search(r"^\s*#\s*include", text, re.MULTILINE)  # no directive
