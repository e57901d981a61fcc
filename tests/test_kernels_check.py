"""`make kernels-check` (kernels/cuda/check.py) as a test: compile every CUDA kernel instance the
CuPy backend launches with nvcc for sm_80 and sm_90 and fail on any register spill, stack frame
or local memory, or on hot loops above the instructions-per-element bound; it writes the JSON
report the backend's static_model reads. Needs nvcc on PATH and nvdisasm (the CUDA toolkit's or
Triton's copy; skips otherwise); no GPU. Reports are cached by a hash of the sources, so after
`make kernels-check` this takes no time. The parsers and the loop analysis are tested on small
hand-written inputs below, everywhere."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "kernels" / "cuda" / "check.py"


def _check():
    sys.path.insert(0, str(CHECK.parent))
    try:
        import check
    finally:
        sys.path.pop(0)
    return check


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH (CUDA toolkit)")
def test_kernels_compile_without_spills_within_the_bound(tmp_path):
    if _check().find_disassembler() is None:
        pytest.skip("no nvdisasm (CUDA toolkit, or pip install triton)")
    out = tmp_path / "report.json"
    r = subprocess.run(
        [sys.executable, str(CHECK), "--quiet", "--json", str(out)],
        capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "0 with spills/stack/local memory" in r.stdout
    assert "(0 above the bound)" in r.stdout
    rep = json.loads(out.read_text())
    assert rep["bound"] == 20.0 and set(rep["archs"]) == {"sm_80", "sm_90"}
    from softmax_kernels.backends import cupy_backend as cb

    names = {n for d in cb.CTYPES for n in cb.all_kernel_names(d, clusters=True)}
    assert names == set(rep["kernels"])
    for name, archs in rep["kernels"].items():  # the cluster (e) kernels: sm_90 only
        assert set(archs) == ({"sm_90"} if "_cluster_kernel<" in name else {"sm_80", "sm_90"})
    bounded = 0
    for name, archs in rep["kernels"].items():
        for arch, e in archs.items():
            assert e["spills"] == 0 and e["stack"] == 0, (name, arch)
            if name.startswith("cross_entropy_denom"):
                continue
            # every kernel has hot loops, their figure per element and their loops listed
            assert e["ipe"] is not None and e["loops"], (name, arch)
            if e["bound"] is not None:
                bounded += 1
                assert max(e["ipe"], e["ipe_grad"]) <= e["bound"], (name, arch)
    check = _check()
    # sm_80 and sm_90 (the cluster kernels: sm_90 only)
    want = sum((1 if "_cluster_kernel<" in n else 2) for n in names if check.bound_for(n))
    assert bounded == want > 200  # every FAST instance of the 2- and 4-byte types


def test_ptxas_report_parsing():
    """The parser reads ptxas's lines (spills, stack frame, local memory) as ptxas prints them."""
    check = _check()
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


# A kernel "softmax_fwd_kernel<float, false, 2, 1, 1, true>" (NB = 8 packs of 4 float32 per
# batch) as nvdisasm -gi prints it: a row loop holding a hot batch loop (marked line 3, with a
# branch whose one side is 3 instructions longer, and a cold block on line 5), a BRA.DIV to a
# divergence fallback after EXIT that jumps back into the loop, and a loop rotated into the
# batch loop's exit branch must not count as hot.
SASS = """\
.text._Z4kernv:
\t//## File "/x/t.cu", line 1
        /*0000*/                   MOV R1, R2 ;
.L_x_0:
\t//## File "/x/t.cu", line 9 inlined at "/x/t.cu", line 2
\t//## File "/x/t.cu", line 2
        /*0010*/                   IADD3 R3, R3, 0x1, RZ ;
.L_x_1:
\t//## File "/x/t.cu", line 4 inlined at "/x/t.cu", line 3
\t//## File "/x/t.cu", line 3
        /*0020*/                   FADD R4, R4, R5 ;
        /*0030*/                   BRA.DIV UR4, `(.L_x_9) ;
        /*0040*/               @P0 BRA `(.L_x_2) ;
        /*0050*/                   FMUL R4, R4, R4 ;
        /*0060*/                   FMUL R4, R4, R4 ;
        /*0070*/                   FMUL R4, R4, R4 ;
.L_x_2:
\t//## File "/x/t.cu", line 5
        /*0080*/               @P2 BRA `(.L_x_3) ;
        /*0090*/                   LDG.E R6, desc[UR4][R8.64] ;
        /*00a0*/                   LDG.E R6, desc[UR4][R8.64] ;
.L_x_3:
\t//## File "/x/t.cu", line 3
        /*00b0*/                   ISETP.GE.AND P1, PT, R3, R7, PT ;
.L_x_4:
        /*00c0*/              @!P1 BRA `(.L_x_1) ;
\t//## File "/x/t.cu", line 2
        /*00d0*/              @!P3 BRA `(.L_x_0) ;
        /*00e0*/                   EXIT ;
.L_x_9:
\t//## File "/usr/include/x.hpp", line 3
        /*00f0*/                   SHFL.BFLY P0, R4, R4, R5, R6 ;
        /*0100*/                   BRA `(.L_x_4) ;
.L_x_5:
        /*0110*/                   BRA `(.L_x_5);
"""
SRC = """\
void kernel() {                                  // 1
    for (;;) {                                   // 2  (the row loop)
        for (;;) {  // sk:hot packs=NB              3
            x += y;                              // 4
            if (z) {  // sk:cold {                  5
            }  // sk:cold }                         6
        }
    }
}
"""


def test_sass_loop_analysis_on_a_small_kernel():
    check = _check()
    funcs = check.parse_sass(SASS, "t.cu")
    insns = funcs["_Z4kernv"]
    assert len(insns) == 18
    # line info: only the translation unit's lines, with the inlining chain
    assert insns[1].lines == frozenset({9, 2}) and insns[15].lines == frozenset()
    loops = check.natural_loops(insns)
    # the row loop (header 0x10) and the batch loop (0x20); the fallback's jump back into the
    # batch loop is no back edge, and the trap loop at the end no loop (both unreachable)
    headers = sorted(insns[lp.header].addr for lp in loops)
    assert headers == [0x10, 0x20]
    batch = next(lp for lp in loops if insns[lp.header].addr == 0x20)
    assert {insns[k].addr for st, en in batch.blocks for k in range(st, en + 1)} == set(
        range(0x20, 0xD0, 0x10)
    )
    hot, tags = check.source_marks(SRC)
    assert hot == {3: "NB"} and tags == {5: {"cold"}, 6: {"cold"}}
    res = check.analyse("softmax_fwd_kernel<float, false, 2, 1, 1, true>", insns, hot, tags, 32)
    # one hot loop: the longest path is FADD, BRA.DIV, @P0 BRA, 3 x FMUL, (the cold block's 3
    # instructions left out), ISETP, @!P1 BRA = 8 instructions for NB = 8 packs x 4 elements
    assert [lp["packs"] for lp in res["loops"]] == [8]
    assert res["ipe"] == res["ipe_grad"] == round(8 / 32, 2)


def test_bounds_per_kernel():
    check = _check()
    assert check.bound_for("softmax_fwd_kernel<float, false, 0, 32, 4, true>") == 20.0
    assert check.bound_for("softmax_fwd_kernel<float, false, 0, 32, 4, false>") is None
    assert check.bound_for("cross_entropy_fwd_kernel<__half, true, 2, 1, 1, true>") == 30.0
    assert check.bound_for("cross_entropy_fwd_kernel<__half, false, 2, 1, 1, false>") is None
    assert check.bound_for("softmax_bwd_kernel<double, 2, 1, 1, true>") is None
    assert check.batch_packs("softmax_bwd_kernel<__nv_bfloat16, 2, 1, 1, true>", 32) == 2
    assert check.batch_packs("softmax_fwd_kernel<float, true, 2, 1, 1, true>", 32) == 8
    assert check.batch_packs("cross_entropy_fwd_kernel<double, false, 2, 1, 1, true>", 32) == 4
    # the split kernels (strategy (d)): FAST only for softmax, cross-entropy's GENERAL reported
    assert check.bound_for("softmax_fwd_split_kernel<float, true, 1>") == 20.0
    assert check.bound_for("softmax_bwd_split_kernel<__half, 0>") == 20.0
    assert check.bound_for("cross_entropy_split_kernel<__half, true, 0, true>") == 30.0
    assert check.bound_for("cross_entropy_split_kernel<float, false, 1, false>") is None
    assert check.bound_for("softmax_fwd_split_kernel<double, false, 0>") is None
    assert check.batch_packs("softmax_bwd_split_kernel<__nv_bfloat16, 0>", 32) == 2
    # the cluster kernels (strategy (e)): bounded like the others, one operand
    assert check.bound_for("softmax_fwd_cluster_kernel<__nv_bfloat16, true, 8>") == 20.0
    assert check.bound_for("softmax_fwd_cluster_kernel<double, false, 2>") is None
    assert check.batch_packs("softmax_fwd_cluster_kernel<__nv_bfloat16, false, 4>", 32) == 4
    assert check.batch_packs("softmax_fwd_split_kernel<__nv_bfloat16, true, 1>", 32) == 4
    assert check.batch_packs("cross_entropy_split_kernel<float, true, 1, true>", 32) == 4
