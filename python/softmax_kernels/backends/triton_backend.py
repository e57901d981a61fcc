"""The Triton backend: the kernels in ``kernels/triton/`` (``softmax_kernels.kernels.triton``).

It serves torch CUDA tensors, and CuPy arrays through ``torch.from_dlpack`` (zero-copy; the
kernels then run on CuPy's current stream). With ``TRITON_INTERPRET=1`` in the environment,
read at every call, it also serves torch CPU tensors through the Triton interpreter, which is
how CI tests the kernels on machines without a GPU. No function here synchronises with the host:
cross-entropy's "mean" denominator and its reduced loss are computed on the device, inside at
most 2 kernel launches per call, with no other device operation than allocations.

Launch settings come from one function, :func:`_launch_config`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import re
import sys
import types
from collections.abc import Callable
from typing import Any, NamedTuple

from .. import _arrays

NAME = "triton"

_INTERPRET_VAR = "TRITON_INTERPRET"


def _interpret() -> bool:
    """TRITON_INTERPRET=1 now (read at call time, as the contract asks)."""
    return os.environ.get(_INTERPRET_VAR) == "1"


# ----------------------------------------------------------------------------------------------
# Availability


@functools.cache
def _import_problem() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else
        return (
            f"triton cannot be imported ({type(e).__name__}: {e}); install it with "
            "pip install 'softmax-kernels[triton]'"
        )
    try:
        import torch  # noqa: F401
    except Exception as e:
        return (
            f"the Triton backend launches through torch, which cannot be imported "
            f"({type(e).__name__}: {e}); pip install torch"
        )
    return None


@functools.cache
def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


# Oldest Triton each mode is known to work with: GPU runs need 3.6 (the sm_90 compile of these
# kernels: ``tl.range`` pipelining, acq_rel atomics, the launch metadata read by _launch_config);
# the interpreter 3.9 (3.6's breaks on NumPy 2.4; the interpreter tests are run against 3.9).
_MIN_TRITON_GPU = (3, 6)
_MIN_TRITON_INTERPRETER = (3, 9)


@functools.cache
def _triton_version() -> tuple[int, int]:
    import triton

    m = re.match(r"(\d+)\.(\d+)", triton.__version__)
    return (int(m[1]), int(m[2])) if m else (0, 0)


def _version_problem(interpret: bool) -> str | None:
    need = _MIN_TRITON_INTERPRETER if interpret else _MIN_TRITON_GPU
    have = _triton_version()
    if have >= need:
        return None
    import triton

    what = "the Triton interpreter (TRITON_INTERPRET=1)" if interpret else "GPU runs"
    floor = ".".join(map(str, need))
    return (
        f"triton {triton.__version__} is too old for {what} of this backend, which needs "
        f"triton >= {floor}: pip install -U 'triton>={floor}'"
    )


def unavailable_reason() -> str | None:
    problem = _import_problem()
    if problem is not None:
        return problem
    if _interpret():
        return _version_problem(True)
    if _cuda_available():
        return _version_problem(False)
    return (
        "no CUDA GPU is visible (torch.cuda.is_available() is False): the Triton backend needs "
        "an NVIDIA GPU, or TRITON_INTERPRET=1 in the environment to run its kernels through "
        "the Triton interpreter on torch CPU tensors (slow; meant for tests)"
    )


def serve_reason(x: Any) -> str | None:
    kind = _arrays.kind_of(x)
    if kind == _arrays.NUMPY:
        return (
            "the Triton backend does not take NumPy arrays; use backend='numpy' for them, or "
            "pass torch tensors (CUDA, or CPU with TRITON_INTERPRET=1)"
        )
    if kind == _arrays.CUPY:
        return None  # through torch.from_dlpack; unavailable_reason() covers torch itself
    if kind == _arrays.TORCH:
        if x.is_cuda or _interpret():
            return None
        if x.device.type != "cpu":
            return f"the Triton backend serves CUDA tensors, not {x.device.type} tensors"
        return (
            "torch CPU tensors run through the Triton backend only under the Triton interpreter: "
            "set TRITON_INTERPRET=1 (slow; meant for tests), use backend='numpy', or move the "
            "tensor to a CUDA device"
        )
    return "the Triton backend takes torch tensors or CuPy arrays"


# ----------------------------------------------------------------------------------------------
# Kernel modules. triton.jit decides at import (decoration) time whether a kernel is compiled
# or interpreted, from TRITON_INTERPRET; since this backend reads the variable at every call,
# it keeps one copy of the kernel modules per mode.

_KERNEL_PACKAGE = "softmax_kernels.kernels.triton"


def _is_interpreted(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


@functools.cache
def _kernels(interpret: bool) -> types.SimpleNamespace:
    def load(package: str) -> types.SimpleNamespace:
        sm = importlib.import_module(f"{package}.softmax")
        ce = importlib.import_module(f"{package}.cross_entropy")
        return types.SimpleNamespace(
            softmax_fwd=sm.softmax_fwd_kernel,
            softmax_bwd=sm.softmax_bwd_kernel,
            cross_entropy_fwd=ce.cross_entropy_fwd_kernel,
            cross_entropy_denom=ce.cross_entropy_denom_kernel,
            cross_entropy_stats=ce.cross_entropy_stats_kernel,
            cross_entropy_grad=ce.cross_entropy_grad_kernel,
            softmax_fwd_split=sm.softmax_fwd_split_kernel,
            softmax_bwd_split=sm.softmax_bwd_split_kernel,
            cross_entropy_fwd_split=ce.cross_entropy_fwd_split_kernel,
            cross_entropy_stats_split=ce.cross_entropy_stats_split_kernel,
        )

    ks = load(_KERNEL_PACKAGE)
    if _is_interpreted(ks.softmax_fwd) == interpret:
        return ks
    # The package was imported in the other mode: import a private copy of its modules now,
    # while TRITON_INTERPRET holds the value this mode needs.
    name = f"{_KERNEL_PACKAGE}_{'interpreted' if interpret else 'compiled'}"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = list(sys.modules[_KERNEL_PACKAGE].__path__)
        sys.modules[name] = pkg
    saved = os.environ.get(_INTERPRET_VAR)
    os.environ[_INTERPRET_VAR] = "1" if interpret else "0"
    try:
        ks = load(name)
    finally:
        if saved is None:
            del os.environ[_INTERPRET_VAR]
        else:
            os.environ[_INTERPRET_VAR] = saved
    if _is_interpreted(ks.softmax_fwd) != interpret:
        raise RuntimeError(
            "could not load the Triton kernels in "
            f"{'interpreter' if interpret else 'compiled'} mode; is TRITON_INTERPRET changing "
            "while they load?"
        )
    return ks


# triton.language's own @triton.jit helpers (tl.zeros, tl.max, tl.sum, tl.cdiv, ...: functions
# of triton/language/standard.py, also bound in triton.language and as tl.tensor methods) are
# decorated once, when triton is imported, as compiled or interpreted functions by the value
# TRITON_INTERPRET had then. The per-mode kernel copies above cover this package's kernels, not
# those helpers: with the variable set after triton was imported, an interpreted kernel called
# the compiled tl.max and failed with "Cannot call @triton.jit'd outside of the scope of a
# kernel" (issue 10 #9). _language_mode gives a launch helpers of its mode: when the imported
# ones are of the other mode, it binds counterparts made from the same Python functions (one per
# helper, so the interpreter's identity tests on combine functions still hold) for the launch
# and restores the originals after it. An interpreted launch also leaves triton.language.core
# patched (the interpreter patches the modules of each device function it calls and restores
# only the kernel's own): those attributes are restored too, so a compiled launch or compile can
# follow in the same process.


def _language_holders() -> list:
    import triton.language as tl

    holders = [tl, tl.standard, tl.core, tl.math, tl.tensor]
    random = sys.modules.get("triton.language.random")
    return holders + ([random] if random is not None else [])


@functools.cache
def _helper_swaps(interpret: bool) -> tuple:
    """(holder, name, replacement) for every triton.language helper of the other mode."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    wrong = JITFunction if interpret else InterpretedFunction
    made: dict[int, Any] = {}
    swaps = []
    for holder in _language_holders():
        for name, fn in list(vars(holder).items()):
            if not isinstance(fn, wrong):
                continue
            if id(fn) not in made:
                if interpret:
                    made[id(fn)] = InterpretedFunction(fn.fn)
                else:
                    made[id(fn)] = JITFunction(fn.fn, **getattr(fn, "kwargs", {}))
            swaps.append((holder, name, made[id(fn)]))
    return tuple(swaps)


@contextlib.contextmanager
def _language_mode(interpret: bool):
    """triton.language as a launch (or compile) in this mode needs it; see above."""
    swaps = _helper_swaps(interpret)
    if not (interpret or swaps):  # the usual GPU case: nothing to do
        yield
        return
    originals = [(holder, name, vars(holder)[name]) for holder, name, _fn in swaps]
    # (modules only: the interpreter restores the class attributes it patches)
    saved = [(h, dict(vars(h))) for h in _language_holders() if not isinstance(h, type)]
    for holder, name, fn in swaps:
        setattr(holder, name, fn)
    try:
        yield
    finally:
        for holder, name, fn in originals:
            setattr(holder, name, fn)
        # (names the interpreter added stay: it puts its helpers into the globals of the
        # functions it rewrites, and their cached rewrites look them up there)
        for holder, attrs in saved:
            now = vars(holder)
            for name, value in attrs.items():
                if now.get(name, _MISSING) is not value:
                    setattr(holder, name, value)


_MISSING = object()


# ----------------------------------------------------------------------------------------------
# Launch settings: one function chooses them all.


class LaunchConfig(NamedTuple):
    strategy: str  # "rows" | "row" | "online" | "split" | "split2" (see _launch_config)
    block_n: int  # BLOCK_N: tile width (>= n_cols), online the chunk, split the segment length
    rows: int  # ROWS: whole rows per tile (1 for "row", "online" and the splits)
    num_warps: int
    num_stages: int  # tiles / chunks / rows' segments in flight per program (1: none)
    num_programs: int  # persistent grid: programs loop over tiles pid, pid + grid, ...; split:
    # n_groups x segments, program (g, j) takes segment j of rows g, g + n_groups, ...
    group: int = 1  # online: elements per lane of the first pass's running state (16 bytes)
    segments: int = 1  # split: segments per row, cdiv(n_cols, seg_len)
    seg_len: int = 0  # split: columns per segment (<= block_n; 0: block_n), a multiple of 16


def _seg_len(cfg: LaunchConfig) -> int:
    return cfg.seg_len or cfg.block_n


# "split": one kernel; for the ops that normalise after the row's merge (softmax forward and
# backward, cross-entropy with a gradient) the fused, co-resident form (PHASE 0). "split2": the
# same segments in two kernels (statistics, then normalisation; 3n for the forward).
_SPLITS = ("split", "split2")


# The ops _launch_config plans for: "softmax_fwd" (with a mask: "softmax_fwd_mask"),
# "softmax_bwd", "cross_entropy" / "cross_entropy_soft" (the forward and the statistics),
# "cross_entropy_grad" / "cross_entropy_grad_soft" (the vocabulary-parallel gradient) and
# "cross_entropy_denom".
#
# Values per row element a kernel keeps in registers in a single pass (in compute-dtype
# values; float64 takes two 32-bit registers each): the forward holds x (exp and output overwrite
# it), with a mask also the mask bit (masked entries are set last); the backward dy and y;
# cross-entropy z - m and, with a softcap, tanh(x / c) for the chain rule (p is recomputed from
# z - m, not kept); soft targets add the target row.
_SINGLE_PASS_VALUES = {
    "softmax_fwd": 1,
    "softmax_fwd_mask": 2,
    "softmax_bwd": 2,
    "cross_entropy": 2,
    "cross_entropy_soft": 3,
    "cross_entropy_grad": 2,
    "cross_entropy_grad_soft": 3,
}
# Arrays a tile streams in per element (its input bytes): x; dy and y; the logits (and the soft
# targets). (A mask adds 1 byte per element, not counted.)
_INPUTS = {"softmax_fwd": 1, "softmax_fwd_mask": 1, "softmax_bwd": 2, "cross_entropy": 1,
           "cross_entropy_soft": 2, "cross_entropy_grad": 1,
           "cross_entropy_grad_soft": 2}  # fmt: skip
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int64": 8}

# A single pass keeps the whole tile in registers: at most 32 words per thread (16384 words at
# 16 warps). With addresses, masks, the next tile's prefetched input and temporaries that
# compiles for sm_90 in 64-128 registers without spills (see the sweep in
# kernels/triton/NOTES-triton.md and test_compiles_for_sm90_without_spills); at 64 words per
# thread the forward alone spilled (152 bytes), so longer rows go to the online kernels.
_SINGLE_PASS_WORDS = 16384
_THREAD_WORDS = 32
# Tiles are sized in bytes: at least 16 KB of input per tile (issue 11), so that 2-4 resident
# programs, each with its next tile in flight, keep 32-128 KB per SM moving: Little's law asks
# for ~20-40 KB (3.3-4.8 TB/s x ~0.8 us latency / 132 SMs). Short rows are packed several to a
# tile to get there. Cross-entropy tiles hold at least 8192 elements: its per-row work (target
# gather, loss terms, the reduction tail) is amortised over 8192 elements, not 256.
_TILE_BYTES = 16 * 1024
_CE_TILE_ELEMENTS = 8192
# Warps per tile: each thread loads 64 bytes of input (4 x 16-byte vectors in flight) and holds
# at most _THREAD_WORDS words; 1 to 16 warps.
_THREAD_BYTES = 64
_MAX_WARPS = 16
# Online (rows past the single-pass limit): per kernel (warps, chunk bytes, chunks in flight),
# chosen on the sm_90 sweep in NOTES-triton.md as the one with the most bytes in flight per SM
# without spills, and one per kernel so that every dtype shares the plan: 8 KB chunks (bf16
# 4096 elements, float32 2048, float64 1024), 16 bytes per lane of running state. The softmax
# passes and the CE gradient keep 3 chunks in flight over 8 warps (48-120 KB per SM); the CE
# forward / statistics carry 2-6 running sums per lane, so 4 warps with 2 chunks in flight fit
# 2-4 programs per SM (32-80 KB).
_ONLINE_PLAN = {
    "softmax_fwd": (8, 8192, 3),
    "softmax_fwd_mask": (8, 8192, 3),
    "softmax_bwd": (8, 8192, 3),
    "cross_entropy": (4, 8192, 2),
    "cross_entropy_soft": (4, 8192, 2),
    "cross_entropy_grad": (8, 8192, 3),
    "cross_entropy_grad_soft": (8, 8192, 3),
}
_LANE_BYTES = 16
# The mean denominator kernel: blocks of up to 4096 targets per program (32 KB of int64), 8
# warps; one program per block up to the SM count, so that the blocks are read in parallel.
_DENOM_BLOCK = 4096
# Programs per SM when nothing is known of the compiled kernel (no GPU, no sm_90 compile): the
# warps that leave each thread 64 registers (32 of the 64 an sm_90 SM holds), 1 to 4.
_RESIDENT_WARPS_GUESS = 32
# The interpreter (CPU) runs programs one after another: a few programs, each looping. Its time
# goes by the number of operations, not their width: the online kernels there walk chunks of up
# to 64 KB (8x the GPU's), the same code with up to an eighth of the loop trips.
_INTERPRETER_PROGRAMS = 4
_INTERPRETER_CHUNK_BYTES = 64 * 1024
# Split rows (issue 12). A segment holds at most _SPLIT_WORDS on-chip words: 32 per thread at
# 8 warps, the single-pass tile that compiles for sm_90 in ~100 registers with the next row's
# segment in flight, so that 2 programs share an SM (while one waits for its row's merge, the
# other streams). Few rows: a call with fewer rows than SMs, rows of at least _FEW_ROWS_COLS
# elements (64 KB of bf16: below that one program moves a row in ~2-3 us, about what the merge
# round trip through L2 costs), is cut into segments of at least _MIN_SEGMENT elements until
# there are n_sm of them. _SEG_BLOCK: the merge's lanes (segments merged per step of its loop),
# fixed, so that a kernel's registers (and so the co-resident grid) do not depend on the count.
_SPLIT_WORDS = 8192
_SPLIT_BYTES = 16 * 1024
_FEW_ROWS_COLS = 32768
_MIN_SEGMENT = 128
_SEG_BLOCK = 256


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _pow2_at_most(n: int) -> int:
    return 1 << max(1, int(n)).bit_length() - 1


def _round16(n: int) -> int:
    return -(-int(n) // 16) * 16


@functools.lru_cache(maxsize=4096)
def _segmentation(n_rows: int, n_cols: int, block_n: int, n_seg_min: int, cap: int, n_sm: int,
                  fused: bool) -> tuple[int, int, int]:  # fmt: skip
    """(segments, seg_len, groups) of a split over programs of BLOCK_N lanes: at least
    ``n_seg_min`` segments of a multiple of 16 columns (16-byte aligned starts), at most
    ``block_n``, and ``groups`` rows at a time, groups x segments programs within ``cap`` when
    ``fused`` (co-resident; groups 0: impossible), else at least one group. The segment count
    is the smallest that keeps the most SMs busy: rows x segments programs from n_seg_min up
    (e.g. 132 SMs, 1 program each, 32 segments give 4 groups and 128 programs; 33 give 132)."""
    best = None
    n_seg_min = max(1, n_seg_min)
    for want in range(n_seg_min, n_seg_min + n_sm + 1):
        seg_len = max(16, _round16(-(-n_cols // want)))
        if seg_len > block_n:
            continue
        n_seg = -(-n_cols // seg_len)
        groups = min(n_rows, cap // n_seg if fused else max(1, cap // n_seg))
        busy = min(groups * n_seg, n_sm)
        if best is None or busy > best[0]:
            best = (busy, n_seg, seg_len, groups)
        if busy >= n_sm:
            break
    if best is None:  # (block_n below 16 columns: segments of block_n)
        n_seg = -(-n_cols // block_n)
        return n_seg, block_n, min(n_rows, cap // n_seg if fused else max(1, cap // n_seg))
    return best[1], best[2], best[3]


def _launch_config(
    n_rows: int,
    n_cols: int,
    dtype: str,
    op: str,
    n_sm: int | None = None,
    usage: Callable[[LaunchConfig], dict | None] | None = None,
    *,
    merge_wait: bool = True,
) -> LaunchConfig:
    """Strategy, tile / chunk / segment size, warps, tiles in flight and grid for one call.

    ``dtype``: the data's dtype name ("float16", "bfloat16", "float32", "float64"); ``op``: see
    _SINGLE_PASS_VALUES above; ``n_sm``: the GPU's SM count, or None under the interpreter;
    ``usage(cfg)``: the compiled kernel's {"regs", "shared", "spill_bytes"} for a configuration
    (on a GPU the kernel compiled for the launch, in the static model an sm_90 compile): the
    programs per SM follow from it, and a configuration that spills is replaced by one with
    fewer tiles / chunks in flight; None: estimates. ``merge_wait``: the op writes its rows only
    after a row reduction (softmax forward and backward, cross-entropy with a gradient); False
    for cross-entropy without a gradient and the statistics, whose split form ends with the
    merge (the vocabulary-parallel gradient has no row reduction at all).

    Strategies:
    - "rows": short rows, several whole rows per tile ([ROWS, BLOCK_N]), one pass;
    - "row": one whole row per tile, one pass (forward: 1 read + 1 write);
    - "split": a row cut into ``segments`` of BLOCK_N, one per program of a group, merged
      through a small workspace (kernels/triton/common.py). With ``merge_wait`` this is the
      fused form: the programs of a row wait for its merge (a spin on its counter) with their
      segment in registers, so the op moves its minimum (forward 2n, backward 3n, CE + gradient
      2n). Without ``merge_wait`` (or for the gradient) nobody waits: one kernel, n.

      Why the fused form cannot deadlock. A program waits only for the other programs of its
      own group and row, never for another group, and every program of a group walks the same
      rows in the same order; so if every program of the grid is running at once, the last of
      a row's programs to arrive always arrives (it is not waiting for anything but the rows
      before, done by induction), merges and publishes, and every wait ends. The plan makes
      "running at once" hold: the grid is at most SMs x programs per SM, the latter from the
      compiled kernel's registers and shared memory (``usage``; 1 per SM when unknown, which
      any kernel that launches at all fits), and a row's segments must fit it (else groups 0:
      no fused plan). The launch then makes it a guarantee rather than an estimate: the fused
      kernels go out as cooperative grids (_fused_launch), which CUDA guarantees co-resident
      as a whole (the guarantee grid-wide synchronisation rests on) or refuses before anything
      runs (the call then takes the two-kernel form); that this holds next to other streams'
      kernels too is what test_fused_splits_on_two_streams checks on a GPU. Under the
      interpreter, which runs programs one after another, the fused form is never launched
      (the tests run it with every program in a thread of its own).
    - "split2": the same segments where the fused form cannot be made safe: under the
      interpreter (it runs programs one after another: a wait would never end) and when a row
      has more segments than the GPU holds programs (about 2M bf16 elements): a statistics
      kernel, then a normalising one reading the row again (forward 3n, backward 5n / 4n (log),
      CE + gradient 3n);
    - "online": rows longer than the single-pass limit walked by one program in chunks with
      running max / sum per lane, then a second pass (forward: 2 reads + 1 write); kept where
      there are enough rows to fill the GPU and the fused split cannot be had (the same bytes
      as "split2", no workspace, and its second pass starts with the chunks still in L2).

    Rows are split when they do not fit one program, or when there are fewer rows than SMs and
    rows have at least _FEW_ROWS_COLS elements: then the segments shrink until the rows have
    n_sm segments between them (at least _MIN_SEGMENT elements each), so that every SM has work
    for any row count >= 1.
    """
    n_rows, n_cols = max(int(n_rows), 1), max(int(n_cols), 1)
    if op == "cross_entropy_denom":
        block = min(_DENOM_BLOCK, _pow2_at_least(n_rows))
        n_blocks = -(-n_rows // block)
        grid = min(n_blocks, n_sm if n_sm is not None else _INTERPRETER_PROGRAMS)
        return LaunchConfig("rows", block, block, max(1, min(8, block // 256)), 1, grid)
    words = 2 if dtype == "float64" else 1  # 32-bit registers per computed value
    itemsize = _ITEMSIZE[dtype]
    block_n = _pow2_at_least(n_cols)
    per_elem = words * _SINGLE_PASS_VALUES[op]
    no_merge = op.startswith("cross_entropy_grad")  # segments independent
    wait = merge_wait and not no_merge

    def per_sm_of(cfg: LaunchConfig) -> tuple[int, bool, bool, int]:
        """(programs per SM, the compiled kernel spills, its usage is known, the programs an
        SM holds: 0 for a kernel that does not fit one at all)"""
        found = usage(cfg) if usage is not None else None
        if found is not None:
            fits = _programs_that_fit(found["regs"], found["shared"], cfg.num_warps)
        else:
            fits = _RESIDENT_WARPS_GUESS // cfg.num_warps
        spills = found is not None and (found.get("spill_bytes", 0) + found.get("stack", 0)) > 0
        held = min(_MAX_PROGRAMS_PER_SM, fits)
        return max(1, held), spills, found is not None, held

    def with_grid(cfg: LaunchConfig) -> tuple[LaunchConfig, bool]:
        """(cfg with its grid, whether its compiled kernel spills)"""
        if cfg.strategy in _SPLITS:
            if n_sm is None:
                n_seg = cfg.segments
                groups = max(1, _INTERPRETER_PROGRAMS // n_seg)
                return cfg._replace(num_programs=min(n_rows, groups) * n_seg), False
            per_sm, spills, known, held = per_sm_of(cfg)
            # fused: every program of the grid on an SM at once (unknown usage: 1 per SM, which
            # any kernel that launches fits; a compiled kernel no SM holds: none); 0 groups when
            # a row's segments alone are more
            fused = cfg.strategy == "split" and wait
            cap = n_sm * ((held if known else 1) if fused else per_sm)
            n_seg, seg_len, groups = _segmentation(n_rows, n_cols, cfg.block_n, cfg.segments,
                                                   cap, n_sm, fused)  # fmt: skip
            cfg = cfg._replace(segments=n_seg, seg_len=seg_len)
            return cfg._replace(num_programs=groups * n_seg), spills
        n_tiles = -(-n_rows // cfg.rows)
        if n_sm is None:
            return cfg._replace(num_programs=min(n_tiles, _INTERPRETER_PROGRAMS)), False
        per_sm, spills, _known, _held = per_sm_of(cfg)
        return cfg._replace(num_programs=min(n_tiles, n_sm * per_sm)), spills

    def settle(cfg: LaunchConfig) -> tuple[LaunchConfig, bool]:
        """No prefetch where a program has a single tile (split: a single row). Where the
        compiled kernel spills: fewer tiles / chunks in flight (the prefetched data's
        registers), then more warps (fewer words per thread; ptxas at times spills a few bytes
        rather than pass 64 or 80 registers), then, single pass, fewer rows per tile."""
        cfg, spills = with_grid(cfg)
        one_pass = cfg.strategy in ("rows", "row")

        def single_round(c: LaunchConfig) -> bool:
            if c.strategy in _SPLITS:
                return c.num_programs > 0 and n_rows <= c.num_programs // c.segments
            return one_pass and n_rows <= c.rows * c.num_programs

        while cfg.num_stages > 1 and (spills or single_round(cfg)):
            cfg, spills = with_grid(cfg._replace(num_stages=cfg.num_stages - 1))
        while spills and cfg.num_warps < _MAX_WARPS:
            cfg, spills = with_grid(cfg._replace(num_warps=cfg.num_warps * 2))
        while spills and one_pass and cfg.rows > 1:
            rows = cfg.rows // 2
            cfg, spills = with_grid(cfg._replace(rows=rows, strategy="rows" if rows > 1 else "row"))
        return cfg, spills

    def warps_for(tile_bytes: int, tile_words: int) -> int:
        need = max(-(-tile_bytes // (32 * _THREAD_BYTES)), -(-tile_words // (32 * _THREAD_WORDS)))
        return max(1, min(_MAX_WARPS, _pow2_at_least(need)))

    fits_one = block_n * per_elem <= _SINGLE_PASS_WORDS
    few = n_sm is not None and n_rows < n_sm and n_cols >= _FEW_ROWS_COLS
    if fits_one and not few:
        # the fewest rows that make 16 KB of input (CE: 8192 elements), within the registers
        want = -(-_TILE_BYTES // (block_n * itemsize * _INPUTS[op]))
        if op.startswith("cross_entropy"):
            want = max(want, -(-_CE_TILE_ELEMENTS // block_n))
        limit = _pow2_at_most(max(1, _SINGLE_PASS_WORDS // (block_n * per_elem)))
        rows = min(_pow2_at_least(want), limit, _pow2_at_least(n_rows))
        if n_sm is not None:
            # fewer tiles than SMs would leave SMs idle: smaller tiles instead
            while rows > 1 and -(-n_rows // rows) < n_sm:
                rows //= 2
        tile_bytes = rows * block_n * itemsize * _INPUTS[op]
        tile_words = rows * block_n * per_elem
        num_warps = warps_for(tile_bytes, tile_words)
        stages = 2  # the next tile in flight, when the program has one (settle)
        if not usage:
            # no compile to ask: prefetch only where the next tile's raw input fits beside this
            # one's values (<= 48 words per thread; at 64, e.g. float32 rows of 16384, the
            # compiled kernel spills)
            raw_words = tile_bytes // 4
            if tile_words + raw_words > 48 * 32 * num_warps:
                stages = 1
        strategy = "rows" if rows > 1 else "row"
        cfg, spills = settle(LaunchConfig(strategy, block_n, rows, num_warps, stages, 1))
        if not spills:
            return cfg
        # (a row that spills even alone, with every fallback: the online kernel instead)

    def online() -> LaunchConfig:
        num_warps, chunk_bytes, stages = _ONLINE_PLAN[op]
        if n_sm is None:  # (at least 2 chunks per row, so that the chunk loops still loop)
            half_row = _pow2_at_most(max(1, n_cols * itemsize // 2))
            chunk_bytes = max(chunk_bytes, min(_INTERPRETER_CHUNK_BYTES, half_row))
        cfg = LaunchConfig("online", chunk_bytes // itemsize, 1, num_warps, stages, 1,
                           _LANE_BYTES // itemsize)  # fmt: skip
        return settle(cfg)[0]

    many_rows = n_sm is not None and not few
    if not wait and many_rows and not no_merge:
        return online()  # loss only / statistics: the online pass reads n already
    if no_merge and many_rows:
        return online()  # the gradient: one pass already

    def split(seg_words: int, seg_bytes: int) -> LaunchConfig:
        """The split plan with segments of at most seg_words on-chip words and seg_bytes of
        input; few rows: shorter, until the rows have n_sm segments between them (the count
        then fills the GPU: _segmentation). The interpreter: power-of-2 segments of up to
        64 KB (its time goes by operations, not their width), at least 2 per row so that the
        merge runs."""
        if n_sm is None:
            seg = min(_pow2_at_most(_INTERPRETER_CHUNK_BYTES // itemsize),
                      _pow2_at_most(max(1, -(-n_cols // 2))))  # fmt: skip
            n_seg = -(-n_cols // seg)
        else:
            seg_max = _pow2_at_most(min(seg_words // per_elem,
                                        seg_bytes // (itemsize * _INPUTS[op])))  # fmt: skip
            n_seg = max(-(-n_cols // seg_max), -(-n_sm // n_rows) if few else 1)
            seg = _pow2_at_least(max(_round16(-(-n_cols // n_seg)), min(_MIN_SEGMENT, block_n)))
        num_warps = warps_for(seg * itemsize * _INPUTS[op], seg * per_elem)
        return settle(LaunchConfig("split", seg, 1, num_warps, 2, 1, 1, n_seg, seg))[0]

    # Segments of _SPLIT_WORDS / _SPLIT_BYTES (8 warps at 32 words and 64 bytes per thread);
    # when a row has more of them than the GPU holds programs (fused), the single-pass limit
    # (16 warps, 16384 words, 64 KB: 1 program per SM, e.g. a backward row of 1M bf16 or
    # float32 elements in 132 segments of up to 8192).
    cfg = split(_SPLIT_WORDS, _SPLIT_BYTES)
    if not wait or n_sm is None:
        return cfg
    if cfg.num_programs == 0:
        cfg = split(_SINGLE_PASS_WORDS, 4 * _SPLIT_BYTES)
    if cfg.num_programs > 0:
        return cfg
    # the fused split cannot be made safe here: online with enough rows, else two kernels
    if many_rows:
        return online()
    return settle(cfg._replace(strategy="split2", num_stages=2))[0]


# ----------------------------------------------------------------------------------------------
# Resources of a compiled kernel, and the programs per SM they allow. On a GPU they come from the
# kernel compiled for the launch (registers: CompiledKernel.n_regs once loaded; shared memory:
# metadata.shared); without one, from a compile for sm_90 (GPUTarget("cuda", 90, 32), H100 /
# H200) read back with ptxas -v, Triton's own ptxas run on the PTX it generated (Triton 3.9
# fills n_regs / n_spills only when it loads the binary on a device).

# sm_90 per SM: 64K 32-bit registers, allocated per warp in units of 256 (8 per thread); 228 KB
# of shared memory with 1 KB reserved per resident block; 64 warps; 32 blocks.
_SM90_REGS, _SM90_SMEM, _SM90_SMEM_PER_BLOCK = 65536, 228 * 1024, 1024
_SM90_WARPS, _SM90_BLOCKS = 64, 32
# Programs per SM wanted: 3-4 overlap one program's reductions and stores with the others'
# loads; more add little once ~4 x 16 KB are in flight per SM (Little's law asks for ~20-40 KB:
# ~3.3-4.8 TB/s x ~0.8 us / 132 SMs).
_MAX_PROGRAMS_PER_SM = 4


def _programs_that_fit(regs: int, shared: int, num_warps: int) -> int:
    """Blocks of ``num_warps`` warps using ``regs`` registers per thread and ``shared`` bytes
    that an sm_90 SM holds at once."""
    per_warp = -(-max(int(regs), 1) // 8) * 8 * 32
    by_regs = (_SM90_REGS // per_warp) // num_warps
    by_smem = _SM90_SMEM // (int(shared) + _SM90_SMEM_PER_BLOCK)
    return max(0, min(by_regs, by_smem, _SM90_WARPS // num_warps, _SM90_BLOCKS))


_PTR = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "float64": "*fp64"}
_FLOAT_ARGS = ("scale", "label_smoothing", "z_loss", "softcap", "grad_scale", "keep", "eps_c")


def _compile_spec(kernel: str, dtype: str, cfg: LaunchConfig, n_cols: int, **flags):
    """(signature, constexprs, attrs) of ``kernel`` ("softmax_fwd", "softmax_bwd",
    "cross_entropy_fwd", "cross_entropy_denom", "cross_entropy_stats", "cross_entropy_grad")
    launched with ``cfg`` on ``dtype`` rows of ``n_cols``, as a launch specialises it: pointers
    16-byte aligned (torch allocations are), row strides of n_cols elements. ``flags`` set the
    kernel's other constexprs (default: every option on, the most registers)."""
    split = cfg.strategy in _SPLITS
    fn = getattr(_kernels(False), kernel + ("_split" if split and kernel in _SPLIT_KERNELS else ""))
    data, acc = _PTR[dtype], "*fp64" if dtype == "float64" else "*fp32"
    soft = bool(flags.get("SOFT", False))
    ptr = {"x_ptr": data, "dy_ptr": data, "y_ptr": data, "g_ptr": data, "mask_ptr": "*u8",
           "t_ptr": data if soft else "*i64", "w_ptr": acc, "loss_ptr": acc, "lse_ptr": acc,
           "coef_ptr": acc, "scale_ptr": acc, "shift_ptr": acc, "st_ptr": acc, "denom_ptr": "*fp64",
           "part_ptr": "*fp64", "ticket_ptr": "*i32", "cnt_ptr": "*i32",
           "ws_ptr": "*fp64" if kernel == "softmax_bwd" else acc,
           "res_ptr": "*fp64" if kernel == "softmax_bwd" else acc,
           "out_ptr": "*fp64" if kernel == "cross_entropy_denom" else data}  # fmt: skip
    consts = {
        "IS_FP64": dtype == "float64", "ONLINE": cfg.strategy == "online", "ROWS": cfg.rows,
        "BLOCK_N": cfg.block_n, "NUM_STAGES": cfg.num_stages, "BLOCK_R": cfg.block_n,
        "GROUP": cfg.group, "SPLIT": split, "ROW_SHIFT": False, "SEG_BLOCK": _seg_block(cfg),
        "PHASE": _phase(cfg, kernel, bool(flags.get("HAS_GRAD", True))),
        "IS_LOG": True, "HAS_MASK": False, "ACC_FP64": dtype in ("float32", "float64"),
        "SOFT": soft, "HAS_WEIGHT": True, "HAS_GRAD": True, "HAS_LSE": True,
        "HAS_SMOOTHING": True, "HAS_Z": True, "SOFTCAP": True, "REDUCE": 2, "DENOM": 2,
        "INPLACE": True,
    }  # fmt: skip
    consts.update(flags)
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts and name not in ptr:
            sig[name] = "constexpr"
            constexprs[name] = consts[name]
        elif name in ptr:
            sig[name] = ptr[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_ARGS:
            sig[name] = "fp64"
        elif name in ("ignore_index", "vocab_start"):
            sig[name] = "i64"
        else:
            sig[name] = "i32"  # counts and row strides
            # (a launch specialises every integer argument divisible by 16: the row strides
            # and n_cols, which lets the masks of 16-byte vectors be uniform per vector)
            if (name.endswith("row_stride") or name == "n_cols") and n_cols % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
            if name == "seg_len":  # (a multiple of 16 by construction: _segmentation)
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = [n for n in fn.arg_names if n not in sig]
    if missing:
        raise ValueError(f"{kernel}: no type for {missing}")
    return fn, sig, constexprs, attrs


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")


def _sm90_usage(kernel: str, dtype: str, cfg: LaunchConfig, n_cols16: bool, flags: tuple) -> dict:
    """_sm90_compiled's figures for cfg's compile (its runtime arguments set aside)."""
    return _sm90_compiled(kernel, dtype, _compiled_as(cfg), n_cols16, flags)


@functools.cache
def _sm90_compiled(
    kernel: str, dtype: str, cfg: LaunchConfig, n_cols16: bool, flags: tuple
) -> dict:
    """{"regs", "spill_bytes", "stack", "shared", "programs_per_sm"} of ``kernel`` compiled for
    sm_90 with cfg (cached per process; Triton caches the compile on disk). ``n_cols16``: the row
    stride divides by 16 (vector loads). Needs a Triton with its NVIDIA backend; no GPU."""
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    fn, sig, consts, attrs = _compile_spec(kernel, dtype, cfg, 16 if n_cols16 else 1,
                                           **dict(flags))  # fmt: skip
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    with _language_mode(False):
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": cfg.num_warps})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        cmd = [get_ptxas(90).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               "--gpu-name=sm_90a", ptx, "-o", os.path.join(tmp, "k.cubin")]  # fmt: skip
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = int(_PTXAS_USED.search(log)[1])
    spill = _PTXAS_SPILL.search(log)
    stack = _PTXAS_STACK.search(log)
    shared = int(compiled.metadata.shared)
    return {
        "regs": regs,
        "spill_bytes": int(spill[1]) + int(spill[2]) if spill else 0,
        "stack": int(stack[1]) if stack else 0,
        "shared": shared,
        "programs_per_sm": _programs_that_fit(regs, shared, cfg.num_warps),
    }


# ----------------------------------------------------------------------------------------------
# Operands: the caller's arrays as torch tensors, and where to launch.


def _tensor(a: Any):
    """a as a torch tensor, zero-copy (CuPy through DLPack); None stays None."""
    if a is None or _arrays.kind_of(a) == _arrays.TORCH:
        return a
    import torch

    return torch.from_dlpack(a)


@functools.cache
def _sm_count(index: int) -> int:
    import torch

    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _n_sm(t) -> int | None:
    """The SM count for a tensor's device, None under the interpreter (which sizes the grid
    for a CPU)."""
    if _interpret() or not t.is_cuda:
        return None
    return _sm_count(t.device.index if t.device.index is not None else 0)


@contextlib.contextmanager
def _launch_context(orig: Any, t):
    """Launch on t's device and on the caller's current stream: torch's (the default), or
    CuPy's for CuPy arrays (wrapped as a torch external stream), with triton.language in the
    launch's mode (_language_mode)."""
    with _language_mode(_interpret()):
        with _device_stream(orig, t):
            yield


@contextlib.contextmanager
def _device_stream(orig: Any, t):
    if not t.is_cuda:
        import numpy as np

        # The interpreter computes padding lanes and masked-out rows too (inf/NaN there are
        # never stored): keep NumPy from warning about them.
        with np.errstate(all="ignore"):
            yield
        return
    import torch

    with torch.cuda.device(t.device):
        if _arrays.kind_of(orig) == _arrays.CUPY:
            import cupy

            ptr = cupy.cuda.get_current_stream().ptr
            if ptr != torch.cuda.current_stream(t.device).cuda_stream:
                with torch.cuda.stream(torch.cuda.ExternalStream(ptr, device=t.device)):
                    yield
                return
        yield


def _row_stride(t) -> int:
    return int(t.stride(0)) if t.shape[0] > 1 else int(t.shape[1])


def _dtype(t) -> str:
    return str(t.dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------
# The backend interface


def _cfg_consts(cfg: LaunchConfig) -> dict:
    """A configuration as the kernels' launch constexprs."""
    return dict(ONLINE=cfg.strategy == "online", ROWS=cfg.rows, BLOCK_N=cfg.block_n,
                GROUP=cfg.group, NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Split rows: the kernels with a "_split" form, their phases, workspaces and row counters.

_SPLIT_KERNELS = ("softmax_fwd", "softmax_bwd", "cross_entropy_fwd", "cross_entropy_stats")


def _seg_block(cfg: LaunchConfig) -> int:
    """SEG_BLOCK: the merge's lanes (a row's segments are merged in steps of that many)."""
    return _SEG_BLOCK


def _compiled_as(cfg: LaunchConfig) -> LaunchConfig:
    """cfg without what is only a runtime argument (grid, segment count and length): the key
    of a compile."""
    return cfg._replace(num_programs=1, segments=1, seg_len=0)


_FUSED_SPLIT_VAR = "SOFTMAX_KERNELS_TRITON_FUSED_SPLIT"


def _can_spin() -> bool:
    """Whether the fused split (programs waiting on each other) may run: not under the
    interpreter, which runs programs one after another, nor with
    SOFTMAX_KERNELS_TRITON_FUSED_SPLIT=0 (read at call time; every split then takes its
    two-kernel form). Where it runs, it is launched as a cooperative grid (_fused_launch)."""
    return not _interpret() and os.environ.get(_FUSED_SPLIT_VAR, "1") != "0"


# Fused split plans whose cooperative launch the driver refused (a grid larger than it can keep
# resident: the occupancy estimate was off for this GPU, or no cooperative launch at all): they
# take the two-kernel form from then on.
_COOPERATIVE_REFUSED: set[LaunchConfig] = set()


class _FusedRefused(Exception):
    """A fused split's cooperative launch was refused before anything ran; the call is made
    again in the two-kernel form."""


def _fused_launch(kernel, cfg: LaunchConfig, args: tuple, consts: dict) -> None:
    """Launch a PHASE 0 (fused) split kernel as a cooperative grid
    (CU_LAUNCH_ATTRIBUTE_COOPERATIVE): the driver either makes every program of the grid
    resident at once, or refuses the launch ("too many blocks in cooperative launch") without
    running anything (CUDA's guarantee for cooperative grids, which grid-wide
    synchronisation rests on). That is what the programs' waits on each other need; kernels
    of other streams holding part of the GPU should then only delay the launch (checked on a
    GPU by test_fused_splits_on_two_streams; not run yet). A refusal is remembered and
    raised as _FusedRefused; the caller repeats the call with the two-kernel form, which
    nothing about the refused launch has changed (the counters are untouched)."""
    try:
        kernel[(cfg.num_programs,)](*args, **consts)
    except RuntimeError as e:
        if "Triton Error [CUDA]" not in str(e):  # (not a launch the driver refused)
            raise
        _COOPERATIVE_REFUSED.add(cfg)
        raise _FusedRefused(str(e)) from e


def _phase(cfg: LaunchConfig, kernel: str, has_grad: bool = True) -> int:
    """The PHASE a split kernel is compiled with for ``cfg`` (0 fused, 1 statistics)."""
    waits = kernel in ("softmax_fwd", "softmax_bwd") or (kernel == "cross_entropy_fwd" and has_grad)
    return 0 if (cfg.strategy == "split" and waits) else 1


def _phases(cfg: LaunchConfig, waits: bool) -> tuple[int, ...]:
    """The launches of a split call: (0,) fused; (1, 2) two kernels; (1,) no second pass. A
    fused plan under the interpreter runs as its two kernels (_can_spin)."""
    if not waits:
        return (1,)
    if cfg.strategy == "split" and _can_spin() and cfg not in _COOPERATIVE_REFUSED:
        return (0,)
    return (1, 2)


def _split_consts(cfg: LaunchConfig, phase: int) -> dict:
    """A split kernel's constexprs and launch options (PHASE 0: a cooperative grid; also in
    the compile asked for its registers, so that it is the binary then launched)."""
    coop = dict(launch_cooperative_grid=True) if phase == 0 else {}
    return dict(PHASE=phase, BLOCK_N=cfg.block_n, SEG_BLOCK=_seg_block(cfg),
                NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps, **coop)  # fmt: skip


def _cdtype(t):
    """The compute dtype of a tensor's data (float64 for float64, else float32)."""
    import torch

    return torch.float64 if t.dtype == torch.float64 else torch.float32


# One int32 counter per row for the split kernels' merges, per (device, stream) (kernels on
# other streams may run at the same time), zeroed once when created (or grown) and left zero by
# every split kernel (the last program of each row resets its counter).
_ROW_COUNTERS: dict[tuple, Any] = {}


def _row_counters(t, n_rows: int):
    """At least n_rows zeroed int32 counters for t's device and the current stream."""
    import torch

    if t.is_cuda:
        key = (t.device.index, torch.cuda.current_stream(t.device).cuda_stream)
    else:
        key = ("cpu",)
    counters = _ROW_COUNTERS.get(key)
    if counters is None or counters.numel() < n_rows:
        size = max(4096, _pow2_at_least(n_rows))
        counters = _ROW_COUNTERS[key] = torch.zeros(size, dtype=torch.int32, device=t.device)
    return counters


def _split_scratch(t, n_rows: int, cfg: LaunchConfig, slots: int, results: int, dtype,
                   example: bool = False):  # fmt: skip
    """(workspace [n_rows, slots, segments], row results [n_rows, results], row counters) of a
    split call; ``example``: one-element stand-ins for a compile."""
    import torch

    if example:
        one = torch.empty(1, dtype=dtype, device=t.device)
        return one, one, torch.empty(1, dtype=torch.int32, device=t.device)
    ws = torch.empty(n_rows * slots * cfg.segments, dtype=dtype, device=t.device)
    res = torch.empty(n_rows * results, dtype=dtype, device=t.device)
    return ws, res, _row_counters(t, n_rows)


_DEVICE_USAGE: dict[tuple, dict | None] = {}


def _usage_on_device(t, name: str, flags: dict, spec: Callable):
    """_launch_config's ``usage`` on a GPU: the registers and shared memory of the kernel a
    configuration launches, as compiled for t's device (JITFunction.warmup compiles without
    launching; the binary is loaded to read n_regs), cached per configuration. None under the
    interpreter. A compile or load that fails leaves the estimate in place: a launch plan must
    not fail a call (the launch itself then reports any real problem). ``spec(cfg)`` gives
    (kernel, example arguments, constexprs), built only when a compile is needed."""
    if _n_sm(t) is None:
        return None
    key = (name, t.device.index, _dtype(t), tuple(sorted(flags.items())))

    def usage(cfg: LaunchConfig) -> dict | None:
        k = (key, _compiled_as(cfg))
        if k not in _DEVICE_USAGE:
            try:
                kernel, args, consts = spec(cfg)
                compiled = kernel.warmup(*args, grid=(1,), **consts)
                compiled._init_handles()
                _DEVICE_USAGE[k] = {"regs": int(compiled.n_regs),
                                    "shared": int(compiled.metadata.shared),
                                    "spill_bytes": int(compiled.n_spills)}  # fmt: skip
            except Exception:
                _DEVICE_USAGE[k] = None
        return _DEVICE_USAGE[k]

    return usage


@contextlib.contextmanager
def _zeroed_on_error(*counters):
    """A launch that raises (the interpreter runs kernels on the host; a bug or an interrupt
    stops it between programs) may leave counters non-zero: zero them then, so that the next
    call's tickets are not off."""
    try:
        yield
    except BaseException:
        for c in counters:
            c.zero_()
        raise


def _launch(cfg: LaunchConfig, spec: Callable, scratch=None, waits: bool = True) -> None:
    """Launch a call's kernels: one, or the split phases (_phases) with their scratch."""
    if cfg.strategy not in _SPLITS:
        kernel, args, consts = spec(cfg)
        kernel[(cfg.num_programs,)](*args, **consts)
        return
    with _zeroed_on_error(scratch[2]):
        for phase in _phases(cfg, waits):
            kernel, args, consts = spec(cfg, phase, scratch)
            if phase == 0:
                _fused_launch(kernel, cfg, args, consts)
            else:
                kernel[(cfg.num_programs,)](*args, **consts)


def _launch_or_refused(cfg: LaunchConfig, spec: Callable, scratch=None) -> None:
    """_launch; a fused split the driver refused runs again as its two kernels."""
    try:
        _launch(cfg, spec, scratch)
    except _FusedRefused:
        _launch(cfg, spec, scratch)  # (_phases: now (1, 2))


def softmax_fwd(x, out, *, scale: float, mask, is_log: bool, config: LaunchConfig | None = None):
    """out = softmax(scale * x) (log_softmax with is_log) over the rows; see dispatch.

    ``config`` overrides :func:`_launch_config` (tests use it to reach every strategy)."""
    xt, ot, mt = _tensor(x), _tensor(out), _tensor(mask)
    n_rows, n_cols = xt.shape
    if n_rows == 0 or n_cols == 0:
        return
    if mt is not None:
        import torch

        mt = mt.view(torch.uint8)  # same bytes; Triton loads u8 and tests != 0
    ks = _kernels(_interpret())
    mk = mt if mt is not None else xt
    strides = (n_rows, n_cols, _row_stride(xt), _row_stride(ot),
               _row_stride(mt) if mt is not None else 0)  # fmt: skip
    flags = dict(IS_LOG=bool(is_log), HAS_MASK=mt is not None, IS_FP64=_dtype(xt) == "float64")
    op = "softmax_fwd" if mt is None else "softmax_fwd_mask"

    def spec(cfg: LaunchConfig, phase: int | None = None, scratch=None):
        if cfg.strategy in _SPLITS:
            # workspace [n_rows, 2, segments]: (max, sum) per segment; results [n_rows, 2]
            ws, res, cnt = scratch or _split_scratch(xt, n_rows, cfg, 2, 2, _cdtype(xt), True)
            args = (xt, ot, mk, ws, res, cnt, *strides, cfg.segments, _seg_len(cfg), float(scale))
            phase = _phase(cfg, "softmax_fwd") if phase is None else phase
            return ks.softmax_fwd_split, args, dict(flags, **_split_consts(cfg, phase))
        return ks.softmax_fwd, (xt, ot, mk, *strides, float(scale)), dict(flags, **_cfg_consts(cfg))

    with _launch_context(x, xt):
        cfg = config or _launch_config(n_rows, n_cols, _dtype(xt), op, _n_sm(xt),
                                       _usage_on_device(xt, op, flags, spec))  # fmt: skip
        scratch = None
        if cfg.strategy in _SPLITS:
            scratch = _split_scratch(xt, n_rows, cfg, 2, 2, _cdtype(xt))
        _launch_or_refused(cfg, spec, scratch)


def softmax_bwd(dy, y, out, *, scale: float, is_log: bool, config: LaunchConfig | None = None):
    """out = scale * y * (dy - sum(dy * y)) or, log, scale * (dy - exp(y) * sum(dy))."""
    import torch

    dyt, yt, ot = _tensor(dy), _tensor(y), _tensor(out)
    n_rows, n_cols = yt.shape
    if n_rows == 0 or n_cols == 0:
        return
    ks = _kernels(_interpret())
    strides = (n_rows, n_cols, _row_stride(dyt), _row_stride(yt), _row_stride(ot))
    flags = dict(IS_LOG=bool(is_log), IS_FP64=_dtype(yt) == "float64",
                 ACC_FP64=_dtype(yt) in ("float32", "float64"))  # fmt: skip

    def spec(cfg: LaunchConfig, phase: int | None = None, scratch=None):
        if cfg.strategy in _SPLITS:
            # workspace [n_rows, segments]: float64 partial sums; results [n_rows]
            ws, res, cnt = scratch or _split_scratch(yt, n_rows, cfg, 1, 1, torch.float64, True)
            args = (dyt, yt, ot, ws, res, cnt, *strides, cfg.segments, _seg_len(cfg), float(scale))
            phase = _phase(cfg, "softmax_bwd") if phase is None else phase
            return ks.softmax_bwd_split, args, dict(flags, **_split_consts(cfg, phase))
        return (ks.softmax_bwd, (dyt, yt, ot, *strides, float(scale)),
                dict(flags, **_cfg_consts(cfg)))  # fmt: skip

    with _launch_context(y, yt):
        cfg = config or _launch_config(n_rows, n_cols, _dtype(yt), "softmax_bwd", _n_sm(yt),
                                       _usage_on_device(yt, "softmax_bwd", flags,
                                                        spec))  # fmt: skip
        scratch = None
        if cfg.strategy in _SPLITS:
            scratch = _split_scratch(yt, n_rows, cfg, 1, 1, torch.float64)
        _launch_or_refused(cfg, spec, scratch)


# Cross-entropy. reduction and "mean" denominator codes of cross_entropy_fwd_kernel (REDUCE,
# DENOM; see kernels/triton/cross_entropy.py).
_REDUCE = {"none": 0, "sum": 1, "mean": 2}
_DENOM_NONE, _DENOM_GIVEN, _DENOM_KERNEL, _DENOM_IN_PASS, _DENOM_ROWS = range(5)

# One int32 ticket counter per (device, stream), for the kernels' last-program reductions. It is
# zeroed once, when created; every kernel that takes tickets leaves it at 0 again (its last
# program resets it), so no call needs a memset. Per stream, because kernels on different
# streams may run at the same time; on one stream they run one after another.
_TICKETS: dict[tuple, Any] = {}


def _ticket_counter(t):
    """The ticket counter for t's device and the current stream (call inside _launch_context)."""
    import torch

    if t.is_cuda:
        key = (t.device.index, torch.cuda.current_stream(t.device).cuda_stream)
    else:
        key = ("cpu",)
    counter = _TICKETS.get(key)
    if counter is None:
        counter = _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=t.device)
    return counter


def _int64_or_never(v: int) -> int:
    """An ignore_index as an int64: one outside the int64 range can equal no int64 target, and
    any value outside [0, C) behaves the same."""
    v = int(v)
    return v if -(2**63) <= v < 2**63 else -(2**63)


def _softcap_arg(softcap) -> tuple[bool, float]:
    return (softcap is not None), (float(softcap) if softcap is not None else 0.0)


def cross_entropy_fwd(
    logits,
    target,
    *,
    loss,
    grad,
    lse,
    soft: bool,
    weight,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap,
    grad_scale: float,
    reduction: str,
    denom,
    config: LaunchConfig | None = None,
) -> None:
    """Loss (per row, or reduced to 0-d), log-sum-exp and gradient in one pass; see dispatch.
    At most 2 launches: with reduction "mean", a gradient, class targets and no ``denom``,
    cross_entropy_denom_kernel first computes the denominator the gradient is scaled by; every
    other case is one launch of cross_entropy_fwd_kernel, which also reduces the loss. Split
    rows (_launch_config): one launch of cross_entropy_fwd_split_kernel (loss only, or fused
    with the gradient; the denominator kernel first as above), or, two kernels, the split
    statistics kernel (loss, lse, the denominator and the rows' lse and coefficient) then
    cross_entropy_grad_kernel for the gradient. Besides the launches only allocations
    (torch.empty) are issued. ``config`` overrides :func:`_launch_config` for the main kernel
    (tests use it to reach every strategy)."""
    import torch

    xt, tt, lt, gt = _tensor(logits), _tensor(target), _tensor(loss), _tensor(grad)
    et, wt, dt = _tensor(lse), _tensor(weight), _tensor(denom)
    n_rows, n_cols = xt.shape
    red = _REDUCE[reduction]
    if n_rows == 0 or n_cols == 0:
        if red:
            lt.zero_()  # no rows: sum 0, and mean 0 (nothing counted)
        return
    if red != _REDUCE["mean"]:
        dmode = _DENOM_NONE
    elif dt is not None:
        dmode = _DENOM_GIVEN
    elif soft:
        dmode = _DENOM_ROWS
    elif gt is not None:
        dmode = _DENOM_KERNEL
    else:
        dmode = _DENOM_IN_PASS
    has_cap, cap = _softcap_arg(softcap)
    ignore_index = _int64_or_never(ignore_index)
    ks = _kernels(_interpret())
    flags = dict(
        SOFT=bool(soft), HAS_WEIGHT=wt is not None, HAS_GRAD=gt is not None,
        HAS_LSE=et is not None, HAS_SMOOTHING=float(label_smoothing) != 0.0,
        HAS_Z=float(z_loss) != 0.0, SOFTCAP=has_cap, IS_FP64=_dtype(xt) == "float64",
        REDUCE=red,
    )  # fmt: skip
    waits = gt is not None
    cdt = _cdtype(xt)
    dummy = dict(w=wt if wt is not None else xt, g=gt if gt is not None else xt,
                 e=et if et is not None else lt)  # fmt: skip
    scalars = (ignore_index, float(label_smoothing), float(z_loss), cap, float(grad_scale))
    sizes = (n_rows, n_cols, _row_stride(xt), _row_stride(tt) if soft else 1,
             _row_stride(gt) if gt is not None else n_cols)  # fmt: skip

    def split_dmode(cfg: LaunchConfig) -> int:
        # two kernels (or no gradient): the denominator is summed in the statistics kernel
        if dmode == _DENOM_KERNEL and _phases(cfg, waits) != (0,):
            return _DENOM_IN_PASS
        return dmode

    def spec(cfg: LaunchConfig, phase: int | None = None, scratch=None, dscratch=None,
             part=None, tickets=None):  # fmt: skip
        dm = split_dmode(cfg) if cfg.strategy in _SPLITS else dmode
        dsrc = dscratch if dm == _DENOM_KERNEL else (dt if dt is not None else lt)
        if tickets is None:  # (a compile: example scratch)
            tickets = torch.empty(2, dtype=torch.int32, device=xt.device)
            part = dscratch = torch.empty(2, dtype=torch.float64, device=xt.device)
            dsrc = dscratch if dm == _DENOM_KERNEL else dsrc
        consts = dict(flags, DENOM=dm)
        if cfg.strategy in _SPLITS:
            # workspace [n_rows, 7, segments] (the segments' partials), results [3, n_rows]
            # (the rows' shift, log s and a, for the gradient)
            ws, res, cnt = scratch or _split_scratch(xt, n_rows, cfg, 7, 3, cdt, True)
            args = (xt, tt, dummy["w"], lt, dummy["g"], dummy["e"], dsrc, ws, res, part, cnt,
                    tickets, *sizes, cfg.segments, _seg_len(cfg), *scalars)  # fmt: skip
            phase = _phase(cfg, "cross_entropy_fwd", waits) if phase is None else phase
            return ks.cross_entropy_fwd_split, args, dict(consts, **_split_consts(cfg, phase))
        args = (xt, tt, dummy["w"], lt, dummy["g"], dummy["e"], dsrc, part, tickets, *sizes,
                *scalars)  # fmt: skip
        return ks.cross_entropy_fwd, args, dict(consts, **_cfg_consts(cfg))

    with _launch_context(logits, xt):
        tickets = _ticket_counter(xt)
        n_sm = _n_sm(xt)
        op = "cross_entropy_soft" if soft else "cross_entropy"
        cfg = config or _launch_config(
            n_rows, n_cols, _dtype(xt), op, n_sm,
            _usage_on_device(xt, op, dict(flags, DENOM=dmode), spec), merge_wait=waits,
        )  # fmt: skip

        def run() -> None:
            split = cfg.strategy in _SPLITS
            dm = split_dmode(cfg) if split else dmode
            # float64 scratch: [denominator, counted rows] and the denominator kernel's partials
            # [2, its grid] (DENOM_KERNEL); then this kernel's partials: [3, grid] (per program),
            # split [3, n_rows] (per row) and the gradient's scale
            n_den, dcfg = 0, None
            if dm == _DENOM_KERNEL:
                dcfg = _launch_config(n_rows, 1, "int64", "cross_entropy_denom", n_sm)
                n_den = 2 + 2 * dcfg.num_programs
            n_part = (3 * n_rows + 1) if split else (3 * cfg.num_programs if red else 0)
            scratch64 = torch.empty(max(1, n_den + n_part), dtype=torch.float64, device=xt.device)
            dscratch = scratch64[:n_den] if n_den else None
            part = scratch64[n_den:] if n_part else lt
            seg_scratch = _split_scratch(xt, n_rows, cfg, 7, 3, cdt) if split else None
            counters = (tickets,) + ((seg_scratch[2],) if split else ())
            with _zeroed_on_error(*counters):
                if dcfg is not None:
                    ks.cross_entropy_denom[(dcfg.num_programs,)](
                        tt, dummy["w"], dscratch, dscratch[2:], tickets, n_rows, n_cols,
                        ignore_index, HAS_WEIGHT=wt is not None, BLOCK_R=dcfg.block_n,
                        num_warps=dcfg.num_warps,
                    )  # fmt: skip
                phases = _phases(cfg, waits) if split else (None,)
                kernel, args, consts = spec(cfg, phases[0], seg_scratch, dscratch, part, tickets)
                if phases == (0,):
                    _fused_launch(kernel, cfg, args, consts)
                else:
                    kernel[(cfg.num_programs,)](*args, **consts)
                if phases == (1, 2):
                    # the gradient from the rows' lse and a, scaled by part[3 n_rows]
                    res = seg_scratch[1]  # [3, n_rows]: shift, log s, a
                    ks.cross_entropy_grad[(cfg.num_programs,)](
                        xt, tt, dummy["w"], gt, res[n_rows : 2 * n_rows], res[2 * n_rows :],
                        part[3 * n_rows :], res[:n_rows], *sizes, cfg.segments, _seg_len(cfg),
                        ignore_index, 0, 1.0 - float(label_smoothing),
                        float(label_smoothing) / n_cols, cap, float(grad_scale),
                        SOFT=bool(soft), HAS_WEIGHT=wt is not None,
                        HAS_SMOOTHING=flags["HAS_SMOOTHING"], SOFTCAP=has_cap,
                        IS_FP64=flags["IS_FP64"], INPLACE=_same_memory(xt, gt), ONLINE=False,
                        SPLIT=True, ROW_SHIFT=True, ROWS=1, BLOCK_N=cfg.block_n, GROUP=1,
                        NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
                    )  # fmt: skip

        try:
            run()
        except _FusedRefused:  # (the driver refused the cooperative grid: two kernels)
            run()


def cross_entropy_stats(
    logits,
    target,
    stats,
    *,
    soft: bool,
    weight,
    ignore_index: int,
    vocab_start: int,
    label_smoothing: float,
    softcap,
    config: LaunchConfig | None = None,
) -> None:
    """Per row, this rank's statistics of a vocabulary-parallel cross-entropy into ``stats``
    ((n_rows, K)); see dispatch. One launch; reads the logits (and soft targets) once."""
    xt, tt, st, wt = _tensor(logits), _tensor(target), _tensor(stats), _tensor(weight)
    n_rows, n_cols = xt.shape
    if n_rows == 0 or n_cols == 0:
        return
    has_cap, cap = _softcap_arg(softcap)
    ks = _kernels(_interpret())
    head = (xt, tt, wt if wt is not None else xt, st)
    sizes = (n_rows, n_cols, _row_stride(xt), _row_stride(tt) if soft else 1, _row_stride(st))
    tail = (_int64_or_never(ignore_index), int(vocab_start), cap)
    flags = dict(SOFT=bool(soft), HAS_WEIGHT=wt is not None,
                 HAS_SMOOTHING=float(label_smoothing) != 0.0, SOFTCAP=has_cap,
                 IS_FP64=_dtype(xt) == "float64")  # fmt: skip
    op = "cross_entropy_soft" if soft else "cross_entropy"

    def spec(cfg: LaunchConfig, phase: int | None = None, scratch=None):
        if cfg.strategy in _SPLITS:
            ws, _res, cnt = scratch or _split_scratch(xt, n_rows, cfg, 7, 1, _cdtype(xt), True)
            args = (*head, ws, cnt, *sizes, cfg.segments, _seg_len(cfg), *tail)
            consts = dict(flags, **_split_consts(cfg, 1))
            del consts["PHASE"]
            return ks.cross_entropy_stats_split, args, consts
        return ks.cross_entropy_stats, (*head, *sizes, *tail), dict(flags, **_cfg_consts(cfg))

    with _launch_context(logits, xt):
        cfg = config or _launch_config(
            n_rows, n_cols, _dtype(xt), op, _n_sm(xt),
            _usage_on_device(xt, "stats_" + op, flags, spec), merge_wait=False,
        )  # fmt: skip
        scratch = None
        if cfg.strategy in _SPLITS:
            scratch = _split_scratch(xt, n_rows, cfg, 7, 1, _cdtype(xt))
        _launch(cfg, spec, scratch, waits=False)


def _same_memory(a, b) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def cross_entropy_grad(
    logits,
    target,
    grad,
    *,
    row_lse,
    row_coef,
    row_scale,
    soft: bool,
    weight,
    ignore_index: int,
    vocab_start: int,
    keep: float,
    eps_c: float,
    softcap,
    grad_scale: float,
    config: LaunchConfig | None = None,
) -> None:
    """The vocabulary-parallel gradient from the merged row statistics; see dispatch. One
    launch; reads the logits (and soft targets) once, writes the gradient once (``grad`` may
    be the logits' memory)."""
    xt, tt, gt, wt = _tensor(logits), _tensor(target), _tensor(grad), _tensor(weight)
    lt, ct, rt = _tensor(row_lse), _tensor(row_coef), _tensor(row_scale)
    n_rows, n_cols = xt.shape
    if n_rows == 0 or n_cols == 0:
        return
    has_cap, cap = _softcap_arg(softcap)
    kernel = _kernels(_interpret()).cross_entropy_grad
    flags = dict(SOFT=bool(soft), HAS_WEIGHT=wt is not None, HAS_SMOOTHING=float(eps_c) != 0.0,
                 SOFTCAP=has_cap, IS_FP64=_dtype(xt) == "float64",
                 INPLACE=_same_memory(xt, gt))  # fmt: skip

    def spec(cfg: LaunchConfig, phase: int | None = None, scratch=None):
        args = (xt, tt, wt if wt is not None else xt, gt, lt, ct, rt, lt, n_rows, n_cols,
                _row_stride(xt), _row_stride(tt) if soft else 1, _row_stride(gt), cfg.segments,
                _seg_len(cfg), _int64_or_never(ignore_index), int(vocab_start), float(keep),
                float(eps_c), cap, float(grad_scale))  # fmt: skip
        return kernel, args, dict(flags, SPLIT=cfg.strategy in _SPLITS, ROW_SHIFT=False,
                                  **_cfg_consts(cfg))  # fmt: skip

    op = "cross_entropy_grad_soft" if soft else "cross_entropy_grad"
    with _launch_context(logits, xt):
        cfg = config or _launch_config(n_rows, n_cols, _dtype(xt), op, _n_sm(xt),
                                       _usage_on_device(xt, op, flags, spec))  # fmt: skip
        kernel_, args, consts = spec(cfg)
        kernel_[(cfg.num_programs,)](*args, **consts)


# ----------------------------------------------------------------------------------------------
# A static performance model (no GPU): what a call plans on an sm_90 GPU with ``sm_count`` SMs.

_SHORT_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}
_SOFTMAX_MODEL = {
    "softmax_fwd": ("softmax_fwd", {"IS_LOG": False, "HAS_MASK": False}),
    "log_softmax_fwd": ("softmax_fwd", {"IS_LOG": True, "HAS_MASK": False}),
    "softmax_bwd": ("softmax_bwd", {"IS_LOG": False}),
    "log_softmax_bwd": ("softmax_bwd", {"IS_LOG": True}),
}


def static_model(
    op: str,
    dtype_name: str,
    n_rows: int,
    n_cols: int,
    *,
    sm_count: int = 132,
    soft: bool = False,
    with_grad: bool = True,
    reduction: str = "mean",
) -> dict:
    """The launch plan of one call on an sm_90 GPU (H100 / H200) with ``sm_count`` SMs,
    without a GPU: strategy, tile / chunk, warps, tiles in flight, programs and programs per SM,
    launches per call, the bytes moved against the minimum, and the registers, spills and shared
    memory of the kernel compiled for sm_90 (cached per configuration; needs Triton's NVIDIA
    backend, which compiles without a GPU).

    ``op``: "softmax_fwd", "log_softmax_fwd", "softmax_bwd", "log_softmax_bwd" (bench names),
    "ce_fwd" (loss only), "ce_fwd_grad", or "cross_entropy" (``with_grad`` says which);
    ``dtype_name``: "bf16" / "bfloat16" etc. Cross-entropy is modelled without options (no
    weight, smoothing, z-loss, softcap or lse), class targets unless ``soft``.

    Bytes moved count DRAM traffic with no L2 reuse (an upper bound: the online kernels' second
    pass starts with the chunks read last, which may still be in L2); the minimum is the
    benchmark's (bench/grids.py TRAFFIC): forward 2, backward 3, CE forward 1, CE forward +
    gradient 2 times elements x itemsize (soft targets add their read). Per-row traffic (class
    targets, per-row losses, the denominator kernel's read of the targets, and for split rows
    the workspace: partials written once and read twice by the merge, the merged values read by
    every segment's program, the row counter's atomics, every segment's read of the target) is
    counted in the moved bytes only. ``sms_used``: SMs with at least one program.
    """
    dtype = _SHORT_DTYPES.get(dtype_name, dtype_name)
    itemsize = _ITEMSIZE[dtype]
    csize = 8 if dtype == "float64" else 4  # compute dtype
    elems = int(n_rows) * int(n_cols) * itemsize  # bytes of one (n_rows, n_cols) array
    per_row = 0
    merge_wait = True
    if op in _SOFTMAX_MODEL:
        kernel, flags = _SOFTMAX_MODEL[op]
        plan_op = kernel
        # split: (slots per segment, merged values per row, their bytes)
        ws_slots, ws_results, ws_size = (2, 2, csize) if kernel == "softmax_fwd" else (1, 1, 8)
    elif op in ("ce_fwd", "ce_fwd_grad", "cross_entropy"):
        with_grad = {"ce_fwd": False, "ce_fwd_grad": True}.get(op, with_grad)
        merge_wait = with_grad
        red = _REDUCE[reduction]
        if red != _REDUCE["mean"]:
            dmode = _DENOM_NONE
        elif soft:
            dmode = _DENOM_ROWS
        else:
            dmode = _DENOM_KERNEL if with_grad else _DENOM_IN_PASS
        kernel = "cross_entropy_fwd"
        plan_op = "cross_entropy_soft" if soft else "cross_entropy"
        flags = dict(SOFT=soft, HAS_WEIGHT=False, HAS_GRAD=with_grad, HAS_LSE=False,
                     HAS_SMOOTHING=False, HAS_Z=False, SOFTCAP=False, REDUCE=red,
                     DENOM=dmode)  # fmt: skip
        # (m, s and, class targets, z_t per segment; shift, log s, a per row with a gradient)
        ws_slots, ws_results, ws_size = 2 + (not soft), 3 if with_grad else 0, csize
    else:
        raise ValueError(f"unknown op {op!r}")
    flags = dict(flags, IS_FP64=dtype == "float64")
    n16 = int(n_cols) % 16 == 0

    def usage(cfg: LaunchConfig) -> dict:
        fl = dict(flags)
        if kernel == "cross_entropy_fwd" and cfg.strategy in _SPLITS and fl["DENOM"] == 2:
            if _phase(cfg, kernel, with_grad) != 0:
                fl["DENOM"] = 3  # two kernels: the denominator is summed in the first
        return _sm90_usage(kernel, dtype, cfg, n16, tuple(sorted(fl.items())))

    cfg = _launch_config(n_rows, n_cols, dtype, plan_op, sm_count, usage, merge_wait=merge_wait)
    used = usage(cfg)
    online, split = cfg.strategy == "online", cfg.strategy in _SPLITS
    # the reads of a second pass: online, or the second kernel of "split2"
    again = online or (cfg.strategy == "split2" and merge_wait)
    if kernel == "softmax_fwd":
        moved, minimum = (3 if again else 2) * elems, 2 * elems
        launches = 2 if again and split else 1
    elif kernel == "softmax_bwd":
        first = 1 if flags["IS_LOG"] else 2  # the first pass reads dy (and y)
        moved, minimum = (3 + first if again else 3) * elems, 3 * elems
        launches = 2 if again and split else 1
    else:
        reads = (1 + soft) * (2 if (again and with_grad) else 1)
        if split and flags["DENOM"] == _DENOM_KERNEL and cfg.strategy == "split2":
            flags["DENOM"] = _DENOM_IN_PASS  # two kernels: no denominator kernel
        launches = 2 if (flags["DENOM"] == _DENOM_KERNEL or (split and again)) else 1
        per_row = (0 if soft else 8 * (launches if not split else 1)) + (4 if red == 0 else 0)
        if split:
            per_row += (0 if soft else 8 * cfg.segments) + (24 if red else 0)
        moved = (reads + with_grad) * elems
        minimum = (1 + soft + with_grad) * elems
    if split:
        n_seg = cfg.segments
        waits = merge_wait and cfg.strategy == "split"
        per_row += ws_slots * n_seg * ws_size * 3  # written, read by the merge's two loops
        per_row += ws_results * ws_size * (1 + (n_seg if merge_wait else 0))
        per_row += 4 * (n_seg + 1 + (2 * n_seg if waits else 0))  # the counter's atomics
    moved += per_row * int(n_rows)
    per_sm = max(1, min(_MAX_PROGRAMS_PER_SM, used["programs_per_sm"]))
    return {
        "op": op,
        "dtype": dtype,
        "n_rows": int(n_rows),
        "n_cols": int(n_cols),
        "strategy": cfg.strategy,
        "block_n": cfg.block_n,
        "rows_per_tile": cfg.rows,
        "segments": cfg.segments,
        "num_warps": cfg.num_warps,
        "in_flight": cfg.num_stages,
        "programs": cfg.num_programs,
        "programs_per_sm": min(per_sm, -(-cfg.num_programs // int(sm_count))),
        # what an SM holds of the compiled kernel: a fused split's grid is at most sm_count x it
        "programs_per_sm_resident": per_sm,
        "sms_used": min(cfg.num_programs, int(sm_count)),
        "launches": launches,
        "bytes": int(moved),
        "min_bytes": int(minimum),
        "bytes_over_min": moved / minimum,
        "registers": used["regs"],
        "spill_bytes": used["spill_bytes"],
        "shared_bytes": used["shared"],
    }


__all__ = [
    "NAME",
    "LaunchConfig",
    "cross_entropy_fwd",
    "cross_entropy_grad",
    "cross_entropy_stats",
    "serve_reason",
    "softmax_bwd",
    "softmax_fwd",
    "static_model",
    "unavailable_reason",
]
