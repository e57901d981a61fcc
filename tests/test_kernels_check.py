"""`make kernels-check` (kernels/cuda/check.py) as a test: compile every CUDA kernel instance the
CuPy backend launches with nvcc for sm_80 and sm_90 and fail on any register spill, stack frame
or local memory. Needs nvcc on PATH (skips otherwise); no GPU. Reports are cached by a hash of
the sources, so after `make kernels-check` this takes no time."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "kernels" / "cuda" / "check.py"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH (CUDA toolkit)")
def test_kernels_compile_without_spills():
    r = subprocess.run(
        [sys.executable, str(CHECK), "--quiet"], capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "0 with spills/stack/local memory" in r.stdout


def test_ptxas_report_parsing():
    """The parser reads ptxas's lines (spills, stack frame, local memory) as ptxas prints them."""
    sys.path.insert(0, str(CHECK.parent))
    try:
        import check
    finally:
        sys.path.pop(0)
    text = """\
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 256 bytes smem, 368 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barPf' for 'sm_90'
ptxas info    : Function properties for _Z3barPf
    24 bytes stack frame, 16 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 24 bytes cumulative stack size, 16 bytes lmem
"""
    foo, bar = check.parse_ptxas(text)
    assert (foo.kernel, foo.arch, foo.registers, foo.smem, foo.ok) == (
        "_Z3fooPf",
        "sm_90",
        40,
        256,
        True,
    )
    assert (bar.stack, bar.spill_stores, bar.spill_loads, bar.lmem, bar.ok) == (
        24,
        16,
        20,
        16,
        False,
    )
