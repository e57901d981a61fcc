"""Compile every CUDA kernel instance the CuPy backend can launch, with nvcc, for sm_80 and sm_90,
and check ptxas's resource report: no register spills, no stack frame, no local memory.

    .venv/bin/python kernels/cuda/check.py            # what `make kernels-check` runs

The translation unit per dtype is exactly what the backend hands NVRTC at run time
(``cupy_backend.kernel_source()``: the .cu files with common.cuh inlined) plus a table taking the
address of every name expression the backend compiles (``cupy_backend.all_kernel_names``), which
instantiates each template. Options mirror CuPy's NVRTC build: -std=c++17 and -ftz=true (CuPy
adds it), default precise division/sqrt and FMA contraction, -arch=sm_XX. nvcc runs with -cubin
(device code only), one process per (dtype, arch), in parallel.

It prints a table (kernel, arch, registers, shared memory, stack frame, spills, local memory)
and exits non-zero when nvcc fails, when an instance is missing from the report, or on any spill,
non-zero stack frame or local memory: each of those means registers overflowed (or an array was
indexed at run time), which costs memory traffic in a memory-bound kernel.

ptxas reports are cached by a hash of the source, options and nvcc version (under
$XDG_CACHE_HOME or ~/.cache, softmax-kernels/kernels-check), so a second run with unchanged
sources is instant; --no-cache compiles anyway.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARCHS = ("sm_80", "sm_90")
# The options CuPy's RawModule compiles with (NVRTC): our -std=c++17 and CuPy's -ftz=true.
NVCC_OPTIONS = ("-std=c++17", "-ftz=true")


def _backend():
    """softmax_kernels.backends.cupy_backend (pure Python up to its first launch), from this
    checkout when the package is not installed."""
    try:
        from softmax_kernels.backends import cupy_backend
    except ImportError:
        sys.path.insert(0, str(HERE.parent.parent / "python"))
        from softmax_kernels.backends import cupy_backend
    return cupy_backend


@dataclass
class Entry:
    kernel: str
    arch: str
    registers: int = 0
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    lmem: int = 0

    @property
    def ok(self) -> bool:
        return not (self.stack or self.spill_stores or self.spill_loads or self.lmem)


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_LMEM = re.compile(r"(\d+) bytes lmem")


def parse_ptxas(text: str) -> list[Entry]:
    """The entries of a `ptxas -v` report, in order."""
    entries: list[Entry] = []
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            entries.append(Entry(m.group(1), m.group(2)))
            continue
        if not entries:
            continue
        e = entries[-1]
        m = _PROPS.search(line)
        if m:
            e.stack, e.spill_stores, e.spill_loads = (int(g) for g in m.groups())
        m = _USED.search(line)
        if m:
            e.registers = int(m.group(1))
            sm = _SMEM.search(line)
            e.smem = int(sm.group(1)) if sm else 0
            lm = _LMEM.search(line)
            e.lmem = int(lm.group(1)) if lm else 0
    return entries


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> readable kernel names (template arguments kept, parameters dropped), through
    cu++filt or c++filt when one is on PATH; names stay mangled otherwise."""
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    lines = out.stdout.splitlines()
    if out.returncode != 0 or len(lines) != len(names):
        return {n: n for n in names}
    result = {}
    for n, d in zip(names, lines, strict=True):
        d = d.removeprefix("void ")
        depth = 0
        for i, ch in enumerate(d):  # cut the parameter list after the template arguments
            depth += ch == "<"
            depth -= ch == ">"
            if ch == "(" and depth == 0:
                d = d[:i]
                break
        result[n] = d
    return result


def translation_unit(dtype: str) -> tuple[str, list[str]]:
    cb = _backend()
    names = cb.all_kernel_names(dtype)
    table = ",\n".join(f"    (void*)&{n}" for n in names)
    src = cb.kernel_source(HERE)
    src += "\n\n// kernels/cuda/check.py: instantiate every kernel the backend launches\n"
    src += f"void* const sk_check_instances_{dtype}[] = {{\n{table}\n}};\n"
    return src, names


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "softmax-kernels" / "kernels-check"


def compile_report(nvcc: str, nvcc_version: str, dtype: str, arch: str, use_cache: bool):
    """(ptxas report text, instance names, seconds, cached?) for one dtype and arch."""
    src, names = translation_unit(dtype)
    cmd_opts = [*NVCC_OPTIONS, f"-arch={arch}", "-cubin", "-Xptxas", "-v"]
    key = hashlib.sha256("\0".join([nvcc_version, *cmd_opts, src]).encode()).hexdigest()[:32]
    cache = _cache_dir() / f"{dtype}-{arch}-{key}.log"
    if use_cache and cache.is_file():
        return cache.read_text(), names, 0.0, True
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sk-kcheck-") as tmp:
        cu = Path(tmp) / f"softmax_kernels_{dtype}.cu"
        cu.write_text(src)
        proc = subprocess.run(
            [nvcc, *cmd_opts, str(cu), "-o", str(Path(tmp) / "out.cubin")],
            capture_output=True,
            text=True,
        )
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed for {dtype} / {arch}:\n{text[-6000:]}")
    if use_cache:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(text)
        except OSError:
            pass
    return text, names, time.monotonic() - t0, False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", help="sm_XX to compile for (default: sm_80, sm_90)")
    ap.add_argument("--dtype", action="append", help="only these dtypes (default: all four)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel nvcc runs")
    ap.add_argument("--no-cache", action="store_true", help="compile even if a report is cached")
    ap.add_argument("--quiet", action="store_true", help="print only failures and the summary")
    args = ap.parse_args(argv)

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("kernels-check: nvcc not found on PATH (install the CUDA toolkit)", file=sys.stderr)
        return 2
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    archs = tuple(args.arch or ARCHS)
    dtypes = tuple(args.dtype or _backend().CTYPES)
    jobs = [(d, a) for d in dtypes for a in archs]
    t0 = time.monotonic()
    failures: list[str] = []
    rows: list[Entry] = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {
            job: pool.submit(compile_report, nvcc, version, *job, not args.no_cache) for job in jobs
        }
        for (dtype, arch), fut in futures.items():
            try:
                text, names, secs, cached = fut.result()
            except RuntimeError as exc:
                failures.append(str(exc))
                continue
            entries = [e for e in parse_ptxas(text) if e.arch == arch]
            note = "cached" if cached else f"{secs:.1f} s"
            print(f"# {dtype} {arch}: {len(entries)} kernels ({note})", file=sys.stderr)
            if len(entries) != len(names):
                failures.append(
                    f"{dtype} {arch}: ptxas reported {len(entries)} kernels, the backend uses "
                    f"{len(names)}"
                )
            rows.extend(entries)

    readable = demangle(sorted({e.kernel for e in rows}))
    width = max([len(readable[e.kernel]) for e in rows] + [6])
    header = (
        f"{'kernel':<{width}}  {'arch':<5}  {'regs':>4}  {'smem':>6}  {'stack':>5}  "
        f"{'spill st/ld':>11}  {'lmem':>4}"
    )
    bad = [e for e in rows if not e.ok]
    if not args.quiet:
        print(header)
        print("-" * len(header))
    for e in sorted(rows, key=lambda e: (readable[e.kernel], e.arch)):
        if args.quiet and e.ok:
            continue
        flag = "" if e.ok else "  <-- FAIL"
        print(
            f"{readable[e.kernel]:<{width}}  {e.arch:<5}  {e.registers:>4}  {e.smem:>6}  "
            f"{e.stack:>5}  {f'{e.spill_stores}/{e.spill_loads}':>11}  {e.lmem:>4}{flag}"
        )
    for e in bad:
        failures.append(
            f"{readable[e.kernel]} ({e.arch}): stack {e.stack} B, spills "
            f"{e.spill_stores}/{e.spill_loads} B, lmem {e.lmem} B"
        )
    regs = [e.registers for e in rows]
    summary = (
        f"kernels-check: {len(rows)} kernel builds ({len(dtypes)} dtypes x {len(archs)} archs), "
        f"registers {min(regs, default=0)}..{max(regs, default=0)}, "
        f"{len(bad)} with spills/stack/local memory, {time.monotonic() - t0:.1f} s"
    )
    print(summary)
    if failures:
        print("\nFAILED:", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
