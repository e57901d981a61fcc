"""Compile every CUDA kernel instance the CuPy backend can launch, with nvcc, for sm_80 and sm_90;
check ptxas's resource report (no register spills, no stack frame, no local memory) and count the
SASS instructions per element of each kernel's hot loops (at most BOUND).

    .venv/bin/python kernels/cuda/check.py            # what `make kernels-check` runs
    .venv/bin/python kernels/cuda/check.py --json report.json --dtype bfloat16 --arch sm_90

The translation unit per dtype is exactly what the backend hands NVRTC at run time
(``cupy_backend.kernel_source()``: the .cu files with common.cuh inlined) plus a table taking the
address of every name expression the backend compiles (``cupy_backend.all_kernel_names``), which
instantiates each template. Options mirror CuPy's NVRTC build: -std=c++17 and -ftz=true (CuPy
adds it), default precise division/sqrt and FMA contraction, -arch=sm_XX; plus -lineinfo (a line
table only: the code is the same) for the instruction count. nvcc runs with -cubin (device code
only), one process per (dtype, arch), in parallel.

Instructions per element, the method. nvdisasm (from the CUDA toolkit, or the copy Triton ships)
disassembles the cubin with its line table, inlining chains included (``nvdisasm -gi``), so
every SASS instruction maps to the source lines it came from. The SASS of each kernel is cut
into basic blocks; with their dominators, every back edge (a branch to a block that dominates
it) gives a natural loop (the divergence fallbacks of shuffles, reached through BRA.DIV, are not
edges). The loops that walk a row's elements carry a ``// sk:hot packs=P`` marker on their
``for`` line; a loop is hot when one of its back-edge branches maps to a marked line and it
holds no other such loop (a row loop rotated into its last pass's exit branch is not hot). P is
the number of 16-byte packs one thread handles per iteration: ``PACKS`` (strategy (a): the whole
row loop, whose body also holds the row's reductions and epilogue, so their cost is spread over
the row), ``NB`` (the batched loops of (b) and (c): 32 elements' worth, at most 32 / itemsize
packs, half with two operands, as batch_packs in common.cuh) or 1 (passes over shared memory). A
loop's count is the most instructions one iteration can issue: the heaviest path from its header
through its blocks with the back edges removed (predicated instructions count, the untaken side
of a branch does not); copies of one source loop that the compiler made (unswitching it on a
run-time flag) count once, and of the loops that run one way or the other (``sk:log`` /
``sk:prob``) the costlier way. Instructions the sources mark as cold (``// sk:cold {`` ... ``//
sk:cold }``: rows skipped without reading, a row's partial first and last packs, the fewer than
NB packs left to a thread at the end of its row, the NaN-row fallback) never count; the default
figure also leaves out the code of options that are off by default (``sk:opt``: masks, label
smoothing, z-loss, weights, lse), of the statistics mode (``sk:stats``) and the gradient's
(``sk:grad``: cross-entropy's loss-only figure); the "with gradient" figure counts ``sk:grad``,
the "options" figure ``sk:opt`` too. A kernel's figure is the sum over its hot loops of count /
(P x VEC), VEC the elements per pack (4 float32, 8 half types, 2 float64): what one element
costs in issue slots, every pass included, an upper bound for rows that fill the loop's packs.
The split strategy's two kernels (``*_split_kernel<..., 0...>`` the segments' statistics,
``<..., 1...>`` the merge and the normalising pass) are counted and bounded each on its own;
``cupy_backend.static_model`` adds their figures for a split call. The cluster strategy's
kernels (``softmax_fwd_cluster_kernel<T, IS_LOG, C>``, ``softmax_bwd_cluster_kernel<T, C>``,
sm_90 only) are one kernel each.

It prints a table (kernel, arch, registers, shared memory, stack frame, spills, local memory,
instructions per element: loss-only / with gradient for cross-entropy) and exits non-zero when
nvcc fails, when an instance is missing from the report, on any spill, non-zero stack frame or
local memory (each of those means registers overflowed, or an array was indexed at run time,
which costs memory traffic in a memory-bound kernel), or when a bounded kernel's hot loops
exceed BOUND instructions per element (cross-entropy with soft targets: 1.5 x, for its third
stream of data -- the same issue slots per byte). Reported, not bounded: float64 (it keeps the
accurate exp(), whose longest path alone is ~45 instructions; at 8 bytes per element an H200
still has ~110 issue slots per float64 element of a forward at full bandwidth), the softcap
instances, and the general (a) instances of softmax, which take rows that are not whole
packs. It also writes a JSON report (--json, default ``report.json`` in the cache directory)
that ``cupy_backend.static_model`` reads.

ptxas reports and the analysis are cached by a hash of the source, options and nvcc version
(under $XDG_CACHE_HOME or ~/.cache, softmax-kernels/kernels-check), so a second run with
unchanged sources is instant; --no-cache compiles anyway.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARCHS = ("sm_80", "sm_90")
# The options CuPy's RawModule compiles with (NVRTC): our -std=c++17 and CuPy's -ftz=true.
NVCC_OPTIONS = ("-std=c++17", "-ftz=true")
# Hot-loop instructions per element, at most (issue 11): at H200 bandwidth a bf16 forward can
# afford ~28 and a cross-entropy forward ~14 issue slots per element.
BOUND = 20.0
REPORT_NAME = "report.json"


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
    ipe: float | None = None  # hot-loop instructions per element (CE: loss only)
    ipe_grad: float | None = None  # CE: with the gradient
    ipe_opt: float | None = None  # every option on (mask, smoothing, z-loss, weights)
    loops: list = field(default_factory=list)
    bound: float | None = None  # the bound that applies, None: reported only

    @property
    def ok(self) -> bool:
        return not (self.stack or self.spill_stores or self.spill_loads or self.lmem)

    @property
    def within_bound(self) -> bool:
        if self.bound is None:
            return True
        worst = max(v for v in (self.ipe, self.ipe_grad, 0.0) if v is not None)
        return worst <= self.bound


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


# ----------------------------------------------------------------------------------------------
# SASS: functions, instructions with their source lines, loops.

_FUNC = re.compile(r"^\s*\.text\.(\S+?):\s*$")
_LINE_INFO = re.compile(r"^\s*//##")
_FILE_LINE = re.compile(r'File "([^"]+)", line (\d+)')
_LABEL = re.compile(r"^\s*(\.L_x_\d+):\s*$")
_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*$")
_BRANCH = re.compile(r"\bBRA(\.[A-Z0-9.]+)?\s+(?:!?U?P\d+\s*,\s*)?`\((\.L_x_\d+)\)")
_PRED = re.compile(r"^@!?U?P[T0-9]")


@dataclass
class Insn:
    addr: int
    text: str
    lines: frozenset  # lines of the translation unit (its own and its inlining chain's)
    label: str | None = None  # a label naming this instruction


def parse_sass(text: str, unit: str = "") -> dict[str, list[Insn]]:
    """{mangled function name: its instructions}, from ``nvdisasm -gi`` output: each instruction
    with the set of lines of the translation unit (file name ending in ``unit``; others, the
    CUDA headers', are dropped) that the line table gives it and its inlining chain."""
    funcs: dict[str, list[Insn]] = {}
    cur: list[Insn] | None = None
    lines: set[int] = set()
    fresh = False  # the next //## block replaces the lines
    pending: list[str] = []
    for raw in text.splitlines():
        m = _FUNC.match(raw)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            lines, fresh, pending = set(), True, []
            continue
        if cur is None:
            continue
        if _LINE_INFO.match(raw):
            if fresh:
                lines, fresh = set(), False
            lines.update(int(n) for f, n in _FILE_LINE.findall(raw) if f.endswith(unit))
            continue
        m = _LABEL.match(raw)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSN.match(raw)
        if m:
            fresh = True
            cur.append(Insn(int(m.group(1), 16), m.group(2), frozenset(lines),
                            pending[0] if pending else None))  # fmt: skip
            for extra in pending[1:]:  # (several labels on one instruction)
                _ALIASES[extra] = pending[0]
            pending = []
    return funcs


_ALIASES: dict[str, str] = {}


@dataclass
class Loop:
    header: int  # first instruction of the header block
    blocks: list[tuple[int, int]]  # (first, last) instruction of each block of the loop
    succ: dict[int, set[int]]  # block -> successors inside the loop, back edges removed
    entry: int  # the header block
    edges: list[int]  # instruction indices of the back-edge branches


def natural_loops(insns: list[Insn]) -> list[Loop]:
    """The function's natural loops, on the control-flow graph of basic blocks and its
    dominators (so out-of-line code -- the divergence fallbacks of shuffles that BRA.DIV jumps
    to, which are ignored as edges -- is no part of a loop it jumps back into)."""
    if not insns:
        return []
    where = {}
    for k, i in enumerate(insns):
        if i.label:
            where[i.label] = k
    for a, b in _ALIASES.items():
        if b in where:
            where[a] = where[b]

    def is_branch(text: str):
        b = _BRANCH.search(text)
        return b if b and not (b.group(1) or "").startswith(".DIV") else None

    leaders = {0}
    for k, i in enumerate(insns):
        if i.label:
            leaders.add(k)
        if (is_branch(i.text) or "EXIT" in i.text.split()) and k + 1 < len(insns):
            leaders.add(k + 1)
    starts = sorted(leaders)
    blocks, block_of = [], {}
    for n, st in enumerate(starts):
        en = (starts[n + 1] if n + 1 < len(starts) else len(insns)) - 1
        blocks.append((st, en))
        for k in range(st, en + 1):
            block_of[k] = n
    succ: list[set[int]] = [set() for _ in blocks]
    for n, (_, en) in enumerate(blocks):
        last = insns[en]
        b = is_branch(last.text)
        conditional = bool(_PRED.match(last.text))
        falls = True
        if b and b.group(2) in where:
            succ[n].add(block_of[where[b.group(2)]])
            falls = conditional
        if "EXIT" in last.text.split() and not conditional:
            falls = False
        if falls and n + 1 < len(blocks):
            succ[n].add(n + 1)
    # only what the entry reaches (the divergence fallbacks are not, and must not dilute the
    # dominators of the blocks they jump back into)
    seen, stack = {0}, [0]
    while stack:
        for t in succ[stack.pop()]:
            if t not in seen:
                seen.add(t)
                stack.append(t)
    preds: list[set[int]] = [set() for _ in blocks]
    for n in seen:
        for t in succ[n]:
            preds[t].add(n)
    full = set(range(len(blocks)))
    dom = [full.copy() for _ in blocks]
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for n in sorted(seen - {0}):
            new = set.intersection(*[dom[p] for p in preds[n]]) | {n}
            if new != dom[n]:
                dom[n], changed = new, True
    back = {(u, h) for u in seen for h in succ[u] if h in dom[u]}
    bodies: dict[int, tuple[set[int], list[int]]] = {}
    for u, h in back:
        body, stack = {h, u}, ([u] if u != h else [])
        while stack:
            x = stack.pop()
            for p in preds[x]:
                if p not in body:
                    body.add(p)
                    stack.append(p)
        got = bodies.setdefault(h, (set(), []))
        got[0].update(body)
        got[1].append(blocks[u][1])
    out = []
    for h, (body, edges) in sorted(bodies.items()):
        inner = {n: {t for t in succ[n] if t in body and (n, t) not in back} for n in body}
        out.append(Loop(blocks[h][0], [blocks[n] for n in sorted(body)],
                        {n: inner[n] for n in body}, h, sorted(edges)))  # fmt: skip
        out[-1].index = {n: blocks[n] for n in body}  # type: ignore[attr-defined]
    return out


def longest_path(loop: Loop, weight) -> int:
    """The most instructions one iteration of the loop can issue: the heaviest path through its
    blocks from the header (back edges removed: a DAG), weight(first, last) per block."""
    nodes = list(loop.succ)
    indeg = dict.fromkeys(nodes, 0)
    for n in nodes:
        for t in loop.succ[n]:
            indeg[t] += 1
    order, ready = [], [n for n in nodes if indeg[n] == 0]
    while ready:
        n = ready.pop()
        order.append(n)
        for t in loop.succ[n]:
            indeg[t] -= 1
            if indeg[t] == 0:
                ready.append(t)
    best = dict.fromkeys(nodes, float("-inf"))
    best[loop.entry] = 0
    top = 0
    for n in order:
        if best[n] == float("-inf"):
            continue
        w = best[n] + weight(*loop.index[n])  # type: ignore[attr-defined]
        top = max(top, w)
        for t in loop.succ[n]:
            best[t] = max(best[t], w)
    return int(top)


_HOT = re.compile(r"//\s*sk:hot\s+packs=(\w+)")
TAGS = ("cold", "grad", "opt", "stats", "log", "prob")
_REGION = re.compile(r"sk:(" + "|".join(TAGS) + r")\b\s*([{}]?)")


def source_marks(src: str) -> tuple[dict[int, str], dict[int, set[str]]]:
    """(line -> hot-loop packs expression, line -> region tags) of a translation unit (1-based
    lines, as the line table numbers them). ``// sk:TAG {`` ... ``// sk:TAG }`` tag the lines
    from the one to the other (both included); a bare ``// sk:TAG`` tags its own line."""
    hot: dict[int, str] = {}
    tags: dict[int, set[str]] = {}
    depth: dict[str, int] = {}
    for n, text in enumerate(src.splitlines(), start=1):
        m = _HOT.search(text)
        if m:
            hot[n] = m.group(1)
        here = set()
        if "//" in text:
            for tag, brace in _REGION.findall(text[text.index("//") :]):
                here.add(tag)
                if brace == "{":
                    depth[tag] = depth.get(tag, 0) + 1
                elif brace == "}":
                    depth[tag] = depth.get(tag, 0) - 1
        active = {t for t, d in depth.items() if d > 0} | here
        if active:
            tags[n] = active
    return hot, tags


def _vec(ctype: str) -> int:
    return {"float": 4, "double": 2, "__half": 8, "__nv_bfloat16": 8}[ctype]


def _template_args(kernel: str) -> list[str]:
    inner = kernel[kernel.index("<") + 1 : kernel.rindex(">")]
    return [a.strip() for a in inner.split(",")]


def batch_packs(kernel: str, batch_elems: int) -> int:
    """NB, the full packs per iteration of a kernel's batched loops, as batch_packs in
    common.cuh: BATCH_ELEMS elements (at most 8 packs), halved with two operands (the backward's
    dy and y, cross-entropy's soft targets)."""
    op = kernel.split("_kernel<")[0]
    args = _template_args(kernel)
    size = {"float": 4, "double": 8, "__half": 2, "__nv_bfloat16": 2}[args[0]]
    nb = min(batch_elems // _vec(args[0]), 32 // size)
    two = op in ("softmax_bwd", "softmax_bwd_split", "softmax_bwd_cluster") or (
        op.startswith("cross_entropy") and args[1] == "true"
    )
    return nb // 2 if two else nb


def analyse(
    kernel: str, insns: list[Insn], hot: dict[int, str], tags: dict[int, set[str]], batch: int
) -> dict:
    """A kernel's hot loops and instructions per element (the module docstring's method): "ipe"
    (the default configuration), "ipe_grad" (cross-entropy's forward + gradient), "ipe_opt"
    (every option on)."""
    args = _template_args(kernel)
    op = kernel.split("_kernel<")[0]
    res = {"ipe": None, "ipe_grad": None, "ipe_opt": None, "loops": []}
    if op == "cross_entropy_denom":
        return res
    vec = _vec(args[0])
    packs_of = {"NB": batch_packs(kernel, batch), "1": 1}
    if op in ("softmax_fwd", "cross_entropy_fwd"):
        packs_of["PACKS"] = int(args[4])
    elif op == "softmax_bwd":
        packs_of["PACKS"] = int(args[3])

    def tagged(i: Insn, tag: str) -> bool:
        return any(tag in tags.get(ln, ()) for ln in i.lines)

    figures = {
        "ipe": {"opt", "stats", "grad"},
        "ipe_grad": {"opt", "stats"},
        "ipe_opt": {"stats"},
    }
    loops = natural_loops(insns)
    marked = [lp for lp in loops if any(ln in hot for e in lp.edges for ln in insns[e].lines)]
    spans = [{k for st, en in lp.blocks for k in range(st, en + 1)} for lp in marked]
    for n, lp in enumerate(marked):
        marks = [hot[ln] for e in lp.edges for ln in insns[e].lines if ln in hot]
        if all(tagged(insns[e], "cold") for e in lp.edges):
            continue
        # an outer loop whose back edge shares the inner loop's exit branch (loop rotation puts
        # the row loop's latch there) is no hot loop: only the innermost marked loops are
        if any(m != n and other.header in spans[n] for m, other in enumerate(marked)):
            continue
        packs = packs_of.get(marks[0])
        if packs is None:
            raise RuntimeError(f"{kernel}: unknown sk:hot packs={marks[0]}")
        elems = packs * vec
        grad_loop = all(tagged(insns[e], "grad") for e in lp.edges)
        size = sum(en - st + 1 for st, en in lp.blocks)
        loop = {"packs": packs, "elements": elems, "instructions": size, "grad_only": grad_loop,
                "line": min(insns[lp.header].lines, default=0)}  # fmt: skip
        for fig, excluded in figures.items():
            if grad_loop and "grad" in excluded:
                continue
            drop = excluded | {"cold"}

            def weight(st, en, drop=drop):
                return sum(1 for i in insns[st : en + 1]
                           if not i.text.startswith("NOP")
                           and not any(tagged(i, t) for t in drop))  # fmt: skip

            worst = longest_path(lp, weight)
            loop[fig] = round(worst / elems, 2)
        # copies of one source loop (the compiler unswitches a loop on a run-time flag) have
        # back edges mapping to the same lines: only one runs; loops of one of two ways
        # (sk:log / sk:prob: the backward's formulas) run only that way
        loop["source"] = sorted(insns[lp.edges[-1]].lines)
        loop["way"] = next((t for t in ("log", "prob")
                            if all(tagged(insns[e], t) for e in lp.edges)), "")  # fmt: skip
        res["loops"].append(loop)
    if res["loops"]:
        for fig in figures:
            per_way = {}
            for way in ("log", "prob"):
                groups: dict[tuple, float] = {}
                for lp in res["loops"]:
                    if lp["way"] in ("", way):
                        key = tuple(lp["source"])
                        groups[key] = max(groups.get(key, 0.0), lp.get(fig, 0.0))
                per_way[way] = sum(groups.values())
            res[fig] = round(max(per_way.values()), 2)
    return res


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


def translation_unit(dtype: str, arch: str = "sm_90") -> tuple[str, list[str]]:
    cb = _backend()
    # the cluster (e) kernels need sm_90 (__cluster_dims__, the cluster PTX): the backend
    # compiles them for devices of compute capability >= 9.0 only, and so does this check
    names = cb.all_kernel_names(dtype, clusters=int(arch.split("_")[1][:2]) >= 90)
    table = ",\n".join(f"    (void*)&{n}" for n in names)
    src = cb.kernel_source(HERE)
    src += "\n\n// kernels/cuda/check.py: instantiate every kernel the backend launches\n"
    src += f"void* const sk_check_instances_{dtype}[] = {{\n{table}\n}};\n"
    return src, names


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "softmax-kernels" / "kernels-check"


def default_report_path() -> Path:
    """Where the JSON report goes by default (and where cupy_backend.static_model looks)."""
    return _cache_dir() / REPORT_NAME


def find_disassembler() -> list[str] | None:
    """nvdisasm from PATH or next to nvcc, else the copy bundled with Triton."""
    for cand in (shutil.which("nvdisasm"),):
        if cand:
            return [cand]
    nvcc = shutil.which("nvcc")
    if nvcc:
        p = Path(os.path.realpath(nvcc)).parent / "nvdisasm"
        if p.is_file():
            return [str(p)]
        for base in ("/usr/local/cuda/bin", "/usr/local/cuda-13.0/bin"):
            if (Path(base) / "nvdisasm").is_file():
                return [str(Path(base) / "nvdisasm")]
    try:
        import triton

        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
        if p.is_file():
            return [str(p)]
    except Exception:  # noqa: BLE001 - Triton is optional
        pass
    return None


def compile_report(nvcc: str, nvcc_version: str, dtype: str, arch: str, use_cache: bool,
                   disasm: list[str] | None):  # fmt: skip
    """(ptxas report text, analysis {mangled: [ipe, ipe_grad, loops]} or None, instance names,
    seconds, cached?) for one dtype and arch."""
    cb = _backend()
    src, names = translation_unit(dtype, arch)
    cmd_opts = [*NVCC_OPTIONS, f"-arch={arch}", "-cubin", "-lineinfo", "-Xptxas", "-v"]
    key = hashlib.sha256(
        # (this script's own text too: a change of the analysis invalidates the cache)
        "\0".join(
            [nvcc_version, *cmd_opts, str(bool(disasm)), Path(__file__).read_text(), src]
        ).encode()
    ).hexdigest()[:32]
    cache = _cache_dir() / f"{dtype}-{arch}-{key}.json"
    if use_cache and cache.is_file():
        d = json.loads(cache.read_text())
        return d["ptxas"], d["analysis"], names, 0.0, True
    t0 = time.monotonic()
    analysis = None
    with tempfile.TemporaryDirectory(prefix="sk-kcheck-") as tmp:
        cu = Path(tmp) / f"softmax_kernels_{dtype}.cu"
        cu.write_text(src)
        cubin = Path(tmp) / "out.cubin"
        proc = subprocess.run([nvcc, *cmd_opts, str(cu), "-o", str(cubin)],
                              capture_output=True, text=True)  # fmt: skip
        text = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed for {dtype} / {arch}:\n{text[-6000:]}")
        if disasm:
            d = subprocess.run([*disasm, "-gi", "-c", str(cubin)], capture_output=True,
                               text=True)  # fmt: skip
            if d.returncode != 0:
                raise RuntimeError(f"nvdisasm failed for {dtype} / {arch}:\n{d.stderr[-3000:]}")
            funcs = parse_sass(d.stdout, cu.name)
            hot, tags = source_marks(src)
            batch = int(re.search(r"constexpr int BATCH_ELEMS = (\d+);", src).group(1))
            readable = demangle(sorted(funcs))
            analysis = {}
            for mangled, insns in funcs.items():
                if mangled not in readable or "_kernel<" not in readable[mangled]:
                    continue
                analysis[mangled] = analyse(readable[mangled], insns, hot, tags, batch)
    del cb
    if use_cache:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"ptxas": text, "analysis": analysis}))
        except OSError:
            pass
    return text, analysis, names, time.monotonic() - t0, False


def bound_for(kernel: str) -> float | None:
    """The instructions-per-element bound of a kernel instance, or None (reported only). Soft
    targets are a third stream (logits and probabilities in, gradient out, or two in without
    it): 1.5 x the bound, the same issue slots per byte."""
    op = kernel.split("_kernel<")[0]
    args = _template_args(kernel)
    if op == "cross_entropy_denom":
        return None
    fast = {"cross_entropy_fwd": args[-1] if len(args) > 5 else "true",
            "cross_entropy_grad": args[-1], "softmax_fwd": args[-1] if len(args) > 5 else "true",
            "softmax_bwd": args[-1] if len(args) > 4 else "true",
            # the split kernels (strategy (d)) have no GENERAL instance
            "softmax_fwd_split": "true", "softmax_bwd_split": "true",
            # (nor the cluster kernels, strategy (e))
            "softmax_fwd_cluster": "true", "softmax_bwd_cluster": "true",
            "cross_entropy_split": args[-1]}[op]  # fmt: skip
    if fast != "true" or args[0] == "double":
        return None
    bound = BOUND
    if op.startswith("cross_entropy") and args[1] == "true":
        bound *= 1.5
    return bound


def write_report(path: Path, rows: list[Entry], readable: dict[str, str], archs) -> None:
    kernels: dict[str, dict] = {}
    for e in rows:
        d = asdict(e)
        d["kernel"] = readable[e.kernel]
        d["spills"] = e.spill_stores + e.spill_loads
        kernels.setdefault(readable[e.kernel], {})[e.arch] = d
    report = {"bound": BOUND, "archs": list(archs),
              "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "kernels": kernels}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", help="sm_XX to compile for (default: sm_80, sm_90)")
    ap.add_argument("--dtype", action="append", help="only these dtypes (default: all four)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel nvcc runs")
    ap.add_argument("--no-cache", action="store_true", help="compile even if a report is cached")
    ap.add_argument("--quiet", action="store_true", help="print only failures and the summary")
    ap.add_argument("--json", help=f"write the JSON report here (default: {default_report_path()})")
    ap.add_argument("--no-sass", action="store_true", help="skip the instruction count")
    args = ap.parse_args(argv)

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("kernels-check: nvcc not found on PATH (install the CUDA toolkit)", file=sys.stderr)
        return 2
    disasm = None if args.no_sass else find_disassembler()
    if disasm is None and not args.no_sass:
        print("kernels-check: nvdisasm not found (CUDA toolkit, or pip install triton): the "
              "instruction count is required; --no-sass skips it", file=sys.stderr)  # fmt: skip
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
            job: pool.submit(compile_report, nvcc, version, *job, not args.no_cache, disasm)
            for job in jobs
        }
        for (dtype, arch), fut in futures.items():
            try:
                text, analysis, names, secs, cached = fut.result()
            except RuntimeError as exc:
                failures.append(str(exc))
                continue
            entries = [e for e in parse_ptxas(text) if e.arch == arch]
            for e in entries:
                if analysis is not None and e.kernel in analysis:
                    a = analysis[e.kernel]
                    e.ipe, e.ipe_grad, e.ipe_opt, e.loops = (a["ipe"], a["ipe_grad"],
                                                             a["ipe_opt"], a["loops"])  # fmt: skip
            note = "cached" if cached else f"{secs:.1f} s"
            print(f"# {dtype} {arch}: {len(entries)} kernels ({note})", file=sys.stderr)
            if len(entries) != len(names):
                failures.append(
                    f"{dtype} {arch}: ptxas reported {len(entries)} kernels, the backend uses "
                    f"{len(names)}"
                )
            rows.extend(entries)

    readable = demangle(sorted({e.kernel for e in rows}))
    for e in rows:
        e.bound = bound_for(readable[e.kernel]) if disasm else None
        if disasm and e.bound is not None and e.ipe is None:
            failures.append(f"{readable[e.kernel]} ({e.arch}): no hot loop found in its SASS")
    width = max([len(readable[e.kernel]) for e in rows] + [6])
    header = (
        f"{'kernel':<{width}}  {'arch':<5}  {'regs':>4}  {'smem':>6}  {'stack':>5}  "
        f"{'spill st/ld':>11}  {'lmem':>4}  {'instr/elem':>11}  {'bound':>5}"
    )
    bad = [e for e in rows if not e.ok]
    over = [e for e in rows if e.ok and not e.within_bound]
    if not args.quiet:
        print(header)
        print("-" * len(header))
    for e in sorted(rows, key=lambda e: (readable[e.kernel], e.arch)):
        if args.quiet and e.ok and e.within_bound:
            continue
        flag = "" if e.ok and e.within_bound else "  <-- FAIL"
        ipe = _fmt(e.ipe)
        if e.ipe_grad is not None and e.ipe_grad != e.ipe:
            ipe += f"/{_fmt(e.ipe_grad)}"
        print(
            f"{readable[e.kernel]:<{width}}  {e.arch:<5}  {e.registers:>4}  {e.smem:>6}  "
            f"{e.stack:>5}  {f'{e.spill_stores}/{e.spill_loads}':>11}  {e.lmem:>4}  "
            f"{ipe:>11}  {_fmt(e.bound):>5}{flag}"
        )
    for e in bad:
        failures.append(
            f"{readable[e.kernel]} ({e.arch}): stack {e.stack} B, spills "
            f"{e.spill_stores}/{e.spill_loads} B, lmem {e.lmem} B"
        )
    for e in over:
        failures.append(
            f"{readable[e.kernel]} ({e.arch}): {_fmt(e.ipe)} / {_fmt(e.ipe_grad)} hot-loop "
            f"instructions per element, above the bound {e.bound}"
        )
    if rows:
        out = Path(args.json) if args.json else default_report_path()
        try:
            write_report(out, rows, readable, archs)
            print(f"# report: {out}", file=sys.stderr)
        except OSError as exc:
            print(f"# report not written: {exc}", file=sys.stderr)
    regs = [e.registers for e in rows]
    bounded = [max(v for v in (e.ipe, e.ipe_grad) if v is not None) for e in rows
               if e.bound is not None and e.ipe is not None]  # fmt: skip
    summary = (
        f"kernels-check: {len(rows)} kernel builds ({len(dtypes)} dtypes x {len(archs)} archs), "
        f"registers {min(regs, default=0)}..{max(regs, default=0)}, "
        f"{len(bad)} with spills/stack/local memory, "
        f"hot loops {min(bounded, default=0):.1f}..{max(bounded, default=0):.1f} instructions "
        f"per element ({len(over)} above the bound), {time.monotonic() - t0:.1f} s"
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
