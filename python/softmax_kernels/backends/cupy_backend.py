"""The CuPy backend: the CUDA C kernels of ``kernels/cuda/`` compiled at run time by NVRTC through
``cupy.RawModule`` and launched as raw kernels.

It serves CuPy arrays (on CuPy's current stream) and torch CUDA tensors (on torch's current
stream), zero-copy: kernels get raw device pointers and row strides, so torch's bfloat16, which
CuPy has no dtype for, works like the rest. Nothing synchronises with the host.

One module per (device, dtype) holds every kernel instance the launch planner can pick; it is
compiled on first use and cached (CuPy also caches the binary on disk, so later processes skip
NVRTC). ``plan_launch`` -- pure Python, testable without a GPU -- chooses the strategy for a
row length: (a) a warp or part of one per row with the row in registers, (b) a group of 32..256
threads per row with the row in shared memory, (c) a block per row with a two-pass online loop,
(d) a row split into segments over several blocks (two launches through a small workspace of
per-segment partials, merged in a fixed order): rows beyond (b), and few rows (every SM busy).

Cross-entropy (dispatch.py's interface: cross_entropy_fwd with its reductions, lse and
softcap; cross_entropy_stats and cross_entropy_grad for the vocabulary-parallel loss) does the
whole call in at most two launches and no other device operation: the "mean" denominator and
the reduction are folded into the kernels (per-block partial sums, summed in block order by the
last block to finish through a ticket counter in a per-(device, stream) workspace that the
kernels leave zeroed).

CuPy is imported on first use only: importing softmax_kernels never imports it.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import _arrays

NAME = "cupy"

# ----------------------------------------------------------------------------------------------
# Kernel instances and the launch planner (pure Python: no CuPy, no GPU needed).

WARP_ROWS, BLOCK_SMEM, ONLINE = 0, 1, 2  # SK_WARP_ROWS, SK_BLOCK_SMEM, SK_ONLINE in common.cuh
# (d) a row cut into segments handled by different blocks (softmax_*_split_kernel, two launches)
SPLIT = 3
# (e) a row cut into segments over the blocks of one sm_90 thread-block cluster, each segment on
# chip from its read to its write, partials exchanged through distributed shared memory
# (softmax_fwd_cluster_kernel, softmax_bwd_cluster_kernel: one launch)
CLUSTER = 4
STRATEGY_NAMES = {
    WARP_ROWS: "warp_rows",
    BLOCK_SMEM: "block_smem",
    ONLINE: "online",
    SPLIT: "split",
    CLUSTER: "cluster",
}

# Ops the planner knows. cross_entropy_fwd also serves cross_entropy_stats (the same kernel in
# its statistics mode); cross_entropy_grad is the vocabulary-parallel gradient;
# cross_entropy_denom the first launch of a "mean" with a gradient.
OPS = ("softmax_fwd", "softmax_bwd", "cross_entropy_fwd", "cross_entropy_grad")
KERNEL_FILES = ("common.cuh", "softmax.cu", "cross_entropy.cu")

# dtype name -> (C++ type, bytes per element). Half types compute (and keep shared-memory
# rows of softmax_fwd) in float32, float64 in float64.
CTYPES = {
    "float32": ("float", 4),
    "float64": ("double", 8),
    "float16": ("__half", 2),
    "bfloat16": ("__nv_bfloat16", 2),
}

WARP = 32
WARP_BLOCK_THREADS = 128  # SK_WARP_BLOCK_THREADS: blocks of (a) are 4 warps
BLOCK_THREADS = 256  # SK_BLOCK_THREADS: blocks of (b) and (c) are 8 warps (their launch bound)
# Static shared memory of the (b) kernels (reduction scratch: at most 5 x 8 doubles + the grid
# reduction's 3 x 8 doubles), kept free below the device's per-block opt-in limit when sizing
# the row buffers.
STATIC_SMEM_RESERVE = 1024
# Shared memory per block without opting in (any CUDA GPU): the planner's default.
DEFAULT_SMEM_LIMIT = 48 * 1024
# The kernels index a row's columns in 32 bits (fewer registers and instructions in the
# long-row loops; rows are addressed with 64-bit offsets): rows of fewer than this many elements.
MAX_COLS = 2**31 - 64
# Slots of the grid reductions' partial sums (SK_WS_PARTIALS): reducing grids are capped here.
WS_PARTIALS = 8192
# Packs per thread strategy (b) wants at least: with fewer, a thread's loads are not enough to
# keep the memory system busy, and the group shrinks instead (more rows per block).
MIN_PACKS_PER_THREAD = 4
# Elements each lane of strategy (a) holds at least: the row's fixed cost (reductions, log,
# the loss) spreads over this many elements (16: 4 float32 packs, 2 half packs, 8 float64);
# cross-entropy's row costs more (target, loss, the target's gradient entry): 32 (float64: 16).
WARP_MIN_ELEMS = 16
CE_WARP_ELEMS = 32
# The split strategy (d) of the softmax ops (issue 12). A row that does not fit one block's
# shared memory (strategy (b)'s capacity) is cut into segments of at most that capacity; rows of
# at least SPLIT_FEW_ROWS_MIN_COLS elements whose plan leaves SMs idle (fewer blocks than SMs)
# are cut until there are SPLIT_BLOCKS_PER_SM blocks per SM (the 256-thread blocks of (c)/(d)
# are resident 2 per SM at their 128-register budget), with segments of at least
# SPLIT_MIN_SEG_PACKS packs (a warp's worth: 256 bf16 / 128 float32 elements) so that every SM
# has work for any row count >= 1 from 64K elements per row (1 x 65536 bf16: 256 segments).
# Tests lower these to force the split on small arrays.
SPLIT_FEW_ROWS_MIN_COLS = 32768
SPLIT_BLOCKS_PER_SM = 2
SPLIT_MIN_SEG_PACKS = 32
# Rows beyond (b) are split whatever the row count (issue 12: no single block walks a whole long
# row). False gives them (c) again when there are rows enough for every SM (the previous plan):
# the switch for the GPU comparison of the two 3n plans, (c)'s second read of a row following
# its first within the block (an L2 hit while the rows in flight fit the L2) against the split's
# second read one launch later.
SPLIT_LONG_ROWS = True
# Partials per segment in the workspace (doubles): forward [max, sum, mask bits], backward [dot].
# Cross-entropy: [max, the 5 row sums, the target logit, 0].
SPLIT_WS_PER_SEG = {"softmax_fwd": 3, "softmax_bwd": 1, "cross_entropy_fwd": 8}
DEFAULT_SM_COUNT = 132  # H100 / H200 SXM: the planner's default without a device
# The cluster strategy (e), issue 12 step 2: the softmax forward's and backward's rows beyond
# (b) and within CLUSTER_SIZES[-1] blocks' shared memory on devices of compute capability 9.0
# and above (8 x 226 KB on sm_90: the forward keeps compute-type values, 462K columns of a 2- or
# 4-byte type, 231K of float64; the backward dy and y raw, 462K of a half type, 231K float32,
# 115K float64). The sizes are the portable ones (a cluster of up to 8 blocks is schedulable on
# every sm_90 part; 16 needs the non-portable opt-in and a GPC with 16 free SMs). The smallest size
# whose segments fit two blocks per SM is used (one 256-thread block keeps 16 KB of loads in
# flight, below the ~25 KB an H100 needs, and its barriers and writes leave the SM idle unless a
# second block overlaps them; fewer partners per row make the exchange cheaper and the cluster
# easier to place), else the smallest that fits at all (one block per SM: 256K bf16 rows, the
# GPU run should time it); doubled while the row count leaves SMs idle. A cluster of 2 never
# wins: at two blocks per SM it holds what one (b) block holds, so the sizes are 4 and 8.
# Clusters never wait on each other (a cluster's C blocks are co-scheduled by the hardware, and
# a cluster only waits on its own blocks), so any grid is safe: no residency of the whole grid is
# needed, only that one cluster can be placed at all -- C blocks of <= 227 KB of shared memory on
# C SMs of one GPC (H100/H200 GPCs have 16-18 SMs). Where a launch still fails (a partitioned
# GPU), the backend falls back to the split (d) for that device and remembers it
# (_clusters_broken). USE_CLUSTERS = False (or SK_CUDA_CLUSTERS=0 in the environment) turns the
# strategy off: rows beyond (b) then take the split, as before.
CLUSTER_SIZES = (4, 8)
CLUSTER_HEADER = 256  # CLUSTER_HEADER in softmax.cu: exchange slots and reduction scratch
CLUSTER_OPS = ("softmax_fwd", "softmax_bwd")
USE_CLUSTERS = os.environ.get("SK_CUDA_CLUSTERS", "1") != "0"


def vec_width(itemsize: int) -> int:
    """Elements per 128-bit pack: 4 float32, 2 float64, 8 float16/bfloat16."""
    return 16 // itemsize


def warp_max_cols(itemsize: int) -> int:
    """Most columns (counting a misaligned row's partial first pack) strategy (a) holds in
    registers.

    1024 = 32 compute-type values per lane of a warp (float32 for 2- and 4-byte types): with
    cross-entropy's soft targets that is 64 registers of data, which still compiles without a
    spill, and 4 warps per block keep several rows in flight per SM. Longer rows would spill or
    starve occupancy, and a group of threads with the row in shared memory reads it as fast.
    float64 values take two registers each, so the same budget holds 512 columns."""
    return 512 if itemsize == 8 else 1024


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _warp_per_lane(itemsize: int, ce: bool) -> int:
    """Packs each lane of strategy (a) holds at least: WARP_MIN_ELEMS elements (CE_WARP_ELEMS for
    cross-entropy, whose row epilogue -- target, log, loss, the target's gradient -- costs more),
    no more than a warp's share of warp_max_cols."""
    vec = vec_width(itemsize)
    want = max(1, (CE_WARP_ELEMS if ce else WARP_MIN_ELEMS) // vec)
    return min(want, warp_max_cols(itemsize) // (WARP * vec))


def warp_lanes(ce: bool) -> tuple[int, ...]:
    """Lanes per row strategy (a) uses: softmax 1, 4, 16 or 32 (few instances); cross-entropy
    every power of two, so that the power-of-two vocabularies fill their lanes exactly (its
    lanes hold twice the elements, and a half-filled lane would double the row's cost)."""
    return (1, 2, 4, 8, 16, WARP) if ce else (1, 4, 16, WARP)


def warp_configs(itemsize: int, ce: bool = False) -> list[tuple[int, int]]:
    """Every (LANES, PACKS) shape strategy (a) uses for this element size (and op family).

    Short rows share a warp with LANES < 32 lanes per row of the minimum packs per lane; longer
    rows get the whole warp and PACKS doubles up to warp_max_cols (cross-entropy: its minimum
    already reaches it). Few shapes keep the instance count (and the compile time) small; a
    lane's unused packs cost only predicated-off instructions."""
    vec = vec_width(itemsize)
    base = _warp_per_lane(itemsize, ce)
    out = [(lanes, base) for lanes in warp_lanes(ce) if lanes < WARP]
    packs = base
    while WARP * packs * vec <= warp_max_cols(itemsize):
        out.append((WARP, packs))
        packs *= 2
    return out


@dataclass(frozen=True)
class LaunchPlan:
    """How one op runs on rows of one length: the kernel instance and its block shape."""

    strategy: int  # WARP_ROWS, BLOCK_SMEM or ONLINE
    lanes: int  # (a): lanes per row; 1 otherwise
    packs: int  # (a): packs per lane; 1 otherwise
    threads: int  # threads per block
    smem: int  # dynamic shared memory per block, bytes
    rows_per_block: int  # rows one block handles at a time
    fast: bool = False  # the FAST instance (see kernel_name)
    row_threads: int = 0  # (b): threads per row (a group of the block); 0 otherwise
    segments: int = 0  # (d): segments per row, (e): blocks per cluster; 0 otherwise
    seg_packs: int = 0  # (d), (e): 16-byte packs per segment (the last may be short or empty)

    @property
    def strategy_name(self) -> str:
        return STRATEGY_NAMES[self.strategy]


def smem_bytes_per_col(op: str, itemsize: int, soft: bool = False) -> int:
    """Shared memory strategy (b) needs per column: softmax_fwd parks scale * x in the compute
    type (so the mask and the scale are applied once), softmax_bwd parks dy and y raw,
    cross-entropy parks the raw logits (and the soft targets)."""
    if op == "softmax_fwd":
        return 8 if itemsize == 8 else 4
    if op == "softmax_bwd":
        return 2 * itemsize
    return itemsize * (2 if soft else 1)


def smem_slots(n_cols: int, vec: int, vec_ok: bool) -> int:
    """Shared-memory elements per row buffer of strategy (b): every pack of a row, one more
    when rows may start misaligned (smem_slots in the .cu files, the same formula)."""
    return (-(-n_cols // vec) + (1 if vec_ok else 0)) * vec


def block_row_threads(n_packs: int) -> int:
    """Threads per row of strategy (b): at least MIN_PACKS_PER_THREAD packs each, so a 256-thread
    block takes 256 / G rows of G = 32..256 threads (rows of fewer than 1024 packs share it)."""
    return max(WARP, min(BLOCK_THREADS, _pow2_floor(max(1, n_packs // MIN_PACKS_PER_THREAD))))


def plan_launch(
    op: str,
    dtype_name: str,
    n_cols: int,
    *,
    vec_ok: bool = True,
    shifted: bool = False,
    smem_limit: int = DEFAULT_SMEM_LIMIT,
    soft: bool = False,
    with_grad: bool = True,
    whole_packs: bool | None = None,
    softcap: bool = False,
    n_rows: int | None = None,
    sm_count: int = DEFAULT_SM_COUNT,
    clusters: bool = False,
) -> LaunchPlan:
    """Choose the strategy and block shape for rows of n_cols elements; the one place where the
    launch thresholds live.

    vec_ok: the rows are read in 16-byte packs (every operand's rows share x's address mod 16);
    shifted: some rows start off a 16-byte boundary, so a row may span one pack more.
    whole_packs: every row is made of whole packs (vec_ok, not shifted, n_cols a multiple of
    the pack, a mask in step); None: derived from vec_ok, shifted and n_cols.
    smem_limit: the device's opt-in shared memory per block (``sharedMemPerBlockOptin``: 227 KiB
    on H100/H200, 163 KiB on A100). soft / with_grad / softcap: cross-entropy's target kind,
    whether the gradient is written, whether a softcap applies. n_rows / sm_count: the call's
    rows and the device's SMs, for the softmax ops' few-rows split (None: no such split).
    clusters: the device runs thread-block clusters (compute capability >= 9.0) and the cluster
    strategy is on (USE_CLUSTERS, and no failed cluster launch on this device).

    The softmax ops split a row over several blocks (strategy (d), SPLIT: two launches, a
    statistics kernel writing each segment's partials to a small workspace, then a kernel that
    merges a row's partials in a fixed order and normalises its segment: 3n bytes for the
    forward, 5n for the backward, 4n for log_softmax's) when the row does not fit strategy (b)'s
    shared memory, and when the rows are too few to give every SM a block (see the SPLIT_*
    constants). Cross-entropy (cross_entropy_fwd, every option and mode) splits the same way
    with a gradient (3n, as (c)), and without one for few rows only ((c) reads each logit once
    already; the split's phase 1 reads only the partials); its split stays within 2 launches for
    every option: phase 0 also sums the "mean" denominator that the denominator kernel sums
    otherwise, and phase 1 ends with the grid reduction. cross_entropy_grad (the
    vocabulary-parallel gradient, elementwise given the statistics) keeps a block per row.

    With clusters, the softmax ops' rows beyond (b) that fit a cluster's shared memory go to the
    cluster strategy (e) instead (one launch, 2n / 3n bytes: see CLUSTER_SIZES), unless the rows
    are too few for it to use the SMs (few_rows: fewer than sm_count / 1.5 blocks, where the
    split's 3n on every SM is predicted faster)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    plan = _plan_row(op, dtype_name, n_cols, vec_ok, shifted, smem_limit, soft, with_grad,
                     whole_packs, softcap, n_rows, sm_count)  # fmt: skip
    if clusters and USE_CLUSTERS and plan.strategy in (SPLIT, ONLINE) and op in CLUSTER_OPS:
        itemsize = CTYPES[dtype_name][1]
        n_packs = -(-(n_cols + (vec_width(itemsize) - 1 if vec_ok and shifted else 0))
                    // vec_width(itemsize))  # fmt: skip
        cplan = _cluster_plan(op, itemsize, n_packs, smem_limit, n_rows, sm_count)
        if cplan is not None:
            plan = cplan
    if n_rows is not None and few_rows(op, plan, n_rows, n_cols, sm_count, with_grad):
        itemsize = CTYPES[dtype_name][1]
        vec = vec_width(itemsize)
        n_packs = -(-(n_cols + (vec - 1 if vec_ok and shifted else 0)) // vec)
        fast = not (op.startswith("cross_entropy") and softcap)
        plan = _split_plan(op, itemsize, n_packs, smem_limit, n_rows, sm_count, fast, soft)
    return plan


def _plan_row(op, dtype_name, n_cols, vec_ok, shifted, smem_limit, soft, with_grad, whole_packs,
              softcap, n_rows, sm_count) -> LaunchPlan:  # fmt: skip
    """plan_launch without the few-rows split: the plan for the row length."""
    itemsize = CTYPES[dtype_name][1]
    vec = vec_width(itemsize)
    if whole_packs is None:
        whole_packs = vec_ok and not shifted and n_cols % vec == 0
    n_packs = -(-(n_cols + (vec - 1 if vec_ok and shifted else 0)) // vec)
    ce = op.startswith("cross_entropy")
    if op == "cross_entropy_grad":
        # elementwise given the rows' statistics: a block per row streams it (reads n, writes n)
        return LaunchPlan(ONLINE, 1, 1, BLOCK_THREADS, 0, 1, fast=not softcap)
    # (a) rows of up to warp_max_cols (1024; 512 for float64) live in registers: one read, one
    # write, no shared memory, no block barrier; short rows share a warp so no lane idles. The
    # FAST instance takes rows of whole packs (no per-element bounds checks), the GENERAL one
    # (softmax only) other rows. Cross-entropy takes (a) only for rows of whole packs without a
    # softcap; its other short rows go to (b) with a warp per row (8 rows per block), whose
    # per-pack loops need no second, bounds-checked copy of the unrolled row.
    if n_packs * vec <= warp_max_cols(itemsize) and not (ce and (softcap or not whole_packs)):
        per_lane = _warp_per_lane(itemsize, ce)
        lanes = next(la for la in warp_lanes(ce) if la * per_lane >= n_packs or la == WARP)
        packs = per_lane if lanes < WARP else max(per_lane, _pow2_ceil(-(-n_packs // WARP)))
        return LaunchPlan(
            WARP_ROWS, lanes, packs, WARP_BLOCK_THREADS, 0, WARP_BLOCK_THREADS // lanes,
            whole_packs,
        )  # fmt: skip
    fast = not (ce and softcap)
    # Cross-entropy without a gradient reads each logit once whatever the strategy: the online
    # loop (c) needs no shared memory, so it serves every row longer than (a) does (short
    # softcapped rows excepted: a 256-thread block per row would idle).
    if op == "cross_entropy_fwd" and not with_grad and n_packs * vec > warp_max_cols(itemsize):
        return LaunchPlan(ONLINE, 1, 1, BLOCK_THREADS, 0, 1, fast)
    # (b) while the rows fit in the block's shared memory (the device's opt-in limit, less the
    # reduction scratch): still one read and one write.
    buffers = 2 if op == "softmax_bwd" or (op == "cross_entropy_fwd" and soft) else 1
    per_elem = smem_bytes_per_col(op, itemsize, soft) // buffers
    row_bytes = buffers * smem_slots(n_cols, vec, vec_ok) * per_elem
    g = block_row_threads(n_packs)
    rows = BLOCK_THREADS // g
    if rows * row_bytes <= smem_limit - STATIC_SMEM_RESERVE:
        return LaunchPlan(BLOCK_SMEM, 1, 1, BLOCK_THREADS, rows * row_bytes, rows, fast, g)
    if row_bytes <= smem_limit - STATIC_SMEM_RESERVE:  # fewer, longer-handled rows per block
        rows = _pow2_floor(max(1, (smem_limit - STATIC_SMEM_RESERVE) // row_bytes))
        return LaunchPlan(
            BLOCK_SMEM, 1, 1, BLOCK_THREADS, rows * row_bytes, rows, fast, BLOCK_THREADS // rows
        )
    # (d) rows beyond (b) are split over blocks (the same 3n / 5n bytes as (c), every SM busy
    # whatever the row count); (c) without the split: the online (max, sum) pass then the write
    # pass read the row twice.
    if SPLIT_LONG_ROWS:
        return _split_plan(op, itemsize, n_packs, smem_limit, n_rows, sm_count, fast, soft)
    return LaunchPlan(ONLINE, 1, 1, BLOCK_THREADS, 0, 1, fast)


def cluster_capacity_packs(op: str, itemsize: int, smem_limit: int) -> int:
    """Packs of a row one block of a cluster (e) holds in its shared memory (the header aside):
    the forward keeps scale * x in the compute type, the backward dy and y raw, as (b) does."""
    return max(0, (smem_limit - CLUSTER_HEADER) // (smem_bytes_per_col(op, itemsize)
                                                     * vec_width(itemsize)))  # fmt: skip


def cluster_smem_bytes(op: str, itemsize: int, seg_packs: int) -> int:
    """Dynamic shared memory of a cluster block: the header, then seg_packs packs."""
    return CLUSTER_HEADER + seg_packs * vec_width(itemsize) * smem_bytes_per_col(op, itemsize)


def _cluster_plan(op, itemsize, n_packs, smem_limit, n_rows, sm_count) -> LaunchPlan | None:
    """Strategy (e) for a row of n_packs packs, or None where it does not fit CLUSTER_SIZES[-1]
    blocks, or the rows are too few (the split then spreads them over every SM)."""
    two = cluster_capacity_packs(op, itemsize, smem_limit // 2 - STATIC_SMEM_RESERVE)
    cap = cluster_capacity_packs(op, itemsize, smem_limit)
    fits = [c for c in CLUSTER_SIZES if c * two >= n_packs]
    fits = fits or [c for c in CLUSTER_SIZES if c * cap >= n_packs]
    if not fits:
        return None
    c = fits[0]
    rows = n_rows if n_rows is not None and n_rows > 0 else None
    while rows is not None and rows * c < sm_count and c < CLUSTER_SIZES[-1]:
        c *= 2  # few rows: more blocks per row, up to the largest size
    if rows is not None and rows * c < sm_count / SPLIT_BYTES_FACTOR[op]:
        return None  # (the split on every SM: 1.5x the bytes, over more than 1.5x the SMs)
    seg_packs = -(-n_packs // c)
    smem = cluster_smem_bytes(op, itemsize, seg_packs)
    return LaunchPlan(CLUSTER, 1, 1, BLOCK_THREADS, smem, 1, True, 0, c, seg_packs)


def split_capacity_packs(op: str, itemsize: int, smem_limit: int, soft: bool = False) -> int:
    """Packs of a row one block holds on chip (strategy (b)'s shared memory for this op, less the
    reduction scratch): the longest segment of the split."""
    vec = vec_width(itemsize)
    per_col = smem_bytes_per_col(op, itemsize, soft)
    return max(1, (smem_limit - STATIC_SMEM_RESERVE) // per_col // vec - 1)


def _split_plan(op, itemsize, n_packs, smem_limit, n_rows, sm_count, fast, soft) -> LaunchPlan:
    """Strategy (d)'s segments: at most split_capacity_packs each (a segment could then stay on
    chip), and enough of them for SPLIT_BLOCKS_PER_SM blocks per SM when the rows are few, each of
    at least SPLIT_MIN_SEG_PACKS packs (a shorter row: one segment)."""
    cap = split_capacity_packs(op, itemsize, smem_limit, soft)
    segs = -(-n_packs // cap)
    if n_rows is not None and n_rows > 0:
        segs = max(segs, -(-(SPLIT_BLOCKS_PER_SM * sm_count) // n_rows))
    seg_packs = max(-(-n_packs // segs), min(SPLIT_MIN_SEG_PACKS, n_packs), 1)
    segs = -(-n_packs // seg_packs)
    return LaunchPlan(SPLIT, 1, 1, BLOCK_THREADS, 0, 1, fast, 0, segs, seg_packs)


# Bytes of the split over those of a plan that reads each row once ((a), (b)): the forward 3n /
# 2n, the backward 5n / 3n, cross-entropy with a gradient 3n / 2n; without one both read once.
SPLIT_BYTES_FACTOR = {"softmax_fwd": 1.5, "softmax_bwd": 5 / 3, "cross_entropy_fwd": 1.5}


def few_rows(op: str, plan: LaunchPlan, n_rows: int, n_cols: int, sm_count: int,
             with_grad: bool = True) -> bool:  # fmt: skip
    """Whether a softmax or cross-entropy plan leaves SMs idle with rows long enough to split
    instead: rows of at least SPLIT_FEW_ROWS_MIN_COLS, and fewer blocks than SMs -- fewer than
    sm_count / SPLIT_BYTES_FACTOR when the plan reads each row once and the split twice (the
    model: a call with few blocks is bound by its busy SMs, time ~ bytes / SMs used; e.g. 128
    rows of 65536 with a gradient stay in (b) at 1.0x on 128 SMs rather than 1.5x on 132)."""
    if op not in SPLIT_WS_PER_SEG or plan.strategy in (SPLIT, CLUSTER):
        return False
    blocks = -(-n_rows // max(1, plan.rows_per_block))
    once = plan.strategy in (WARP_ROWS, BLOCK_SMEM) and (op != "cross_entropy_fwd" or with_grad)
    limit = sm_count / SPLIT_BYTES_FACTOR[op] if once else sm_count
    return n_cols >= SPLIT_FEW_ROWS_MIN_COLS and blocks < limit


# The bool template flag of each op's kernel: IS_LOG (softmax_fwd_kernel), SOFT
# (cross_entropy_fwd_kernel, cross_entropy_grad_kernel). softmax_bwd_kernel takes is_log as a
# run-time argument: both backward formulas share one instance.
FLAG_OPS = ("softmax_fwd", "cross_entropy_fwd", "cross_entropy_grad")
# Every kernel takes the FAST flag last: (a) rows of whole packs (cross-entropy: only those),
# (b)/(c) without a softcap (softmax: always); the GENERAL instances (FAST = false) the rest.
FAST_OPS = OPS


def kernel_name(op: str, dtype_name: str, flag: bool, plan: LaunchPlan) -> str:
    """The C++ name expression of a kernel instance, e.g.
    ``softmax_fwd_kernel<float, true, 0, 32, 2>`` or
    ``cross_entropy_fwd_kernel<float, false, 0, 32, 4, true>``. flag: IS_LOG (softmax_fwd) or
    SOFT (cross-entropy); ignored for softmax_bwd."""
    args = [CTYPES[dtype_name][0]]
    if op in FLAG_OPS:
        args.append("true" if flag else "false")
    if op != "cross_entropy_grad":
        args += [str(plan.strategy), str(plan.lanes), str(plan.packs)]
    args.append("true" if plan.fast else "false")
    return f"{op}_kernel<{', '.join(args)}>"


def split_kernel_name(op: str, dtype_name: str, flag: bool, phase: int, fast: bool = True) -> str:
    """The name expression of a split (d) kernel: phase 0 writes the segments' partials, phase 1
    merges them and normalises, e.g. ``softmax_fwd_split_kernel<float, true, 1>`` or
    ``cross_entropy_split_kernel<float, false, 0, true>``. flag: IS_LOG (softmax_fwd; its phase
    0 is shared by both), SOFT (cross-entropy), ignored for softmax_bwd; fast: cross-entropy's
    FAST (no softcap)."""
    args = [CTYPES[dtype_name][0]]
    if op == "softmax_fwd":
        args += ["true" if flag and phase == 1 else "false", str(phase)]
    elif op == "softmax_bwd":
        args.append(str(phase))
    elif op == "cross_entropy_fwd":
        args += ["true" if flag else "false", str(phase), "true" if fast else "false"]
        return f"cross_entropy_split_kernel<{', '.join(args)}>"
    else:
        raise ValueError(f"no split kernels for {op!r}")
    return f"{op}_split_kernel<{', '.join(args)}>"


def cluster_kernel_name(op: str, dtype_name: str, flag: bool, size: int) -> str:
    """The name expression of a cluster (e) kernel, e.g.
    ``softmax_fwd_cluster_kernel<float, true, 8>``, ``softmax_bwd_cluster_kernel<__half, 4>``.
    flag: IS_LOG (forward only); size: blocks per cluster."""
    if op not in CLUSTER_OPS:
        raise ValueError(f"no cluster kernels for {op!r}")
    if op == "softmax_bwd":  # (is_log a run-time argument, as for the other backward kernels)
        return f"{op}_cluster_kernel<{CTYPES[dtype_name][0]}, {size}>"
    return f"{op}_cluster_kernel<{CTYPES[dtype_name][0]}, {'true' if flag else 'false'}, {size}>"


def plan_kernel_names(op: str, dtype_name: str, flag: bool, plan: LaunchPlan) -> list[str]:
    """The kernels one call of this plan launches, in order (the "mean" denominator kernel of
    the unsplit cross-entropy aside)."""
    if plan.strategy == CLUSTER:
        return [cluster_kernel_name(op, dtype_name, flag, plan.segments)]
    if plan.strategy == SPLIT:
        return [split_kernel_name(op, dtype_name, flag, ph, plan.fast) for ph in (0, 1)]
    return [kernel_name(op, dtype_name, flag, plan)]


def denom_kernel_name(dtype_name: str) -> str:
    return f"cross_entropy_denom_kernel<{'double' if dtype_name == 'float64' else 'float'}>"


def all_kernel_names(dtype_name: str, clusters: bool = False) -> list[str]:
    """Every kernel instance plan_launch can pick for this dtype (the module's name
    expressions, and what kernels/cuda/check.py instantiates). clusters: with the cluster (e)
    kernels (compiled for compute capability >= 9.0 only: __cluster_dims__ and the cluster PTX
    need sm_90)."""
    itemsize = CTYPES[dtype_name][1]
    names = []
    for op in OPS:
        ce = op.startswith("cross_entropy")
        warp = [(WARP_ROWS, lanes, packs) for lanes, packs in warp_configs(itemsize, ce)]
        for flag in (False, True) if op in FLAG_OPS else (False,):
            if op == "cross_entropy_grad":
                shapes = [(ONLINE, 1, 1)]
            else:
                shapes = warp + [(BLOCK_SMEM, 1, 1), (ONLINE, 1, 1)]
            for strategy, lanes, packs in shapes:
                if strategy == WARP_ROWS:  # cross-entropy: whole packs only
                    fasts = (True,) if ce else (True, False)
                else:  # softmax: no softcap, so no GENERAL instance
                    fasts = (True, False) if ce else (True,)
                for fast in fasts:
                    plan = LaunchPlan(strategy, lanes, packs, 0, 0, 1, fast)
                    names.append(kernel_name(op, dtype_name, flag, plan))
    names.append(split_kernel_name("softmax_fwd", dtype_name, False, 0))
    for flag in (False, True):
        names.append(split_kernel_name("softmax_fwd", dtype_name, flag, 1))
    names += [split_kernel_name("softmax_bwd", dtype_name, False, ph) for ph in (0, 1)]
    for soft in (False, True):
        for fast in (True, False):
            names += [split_kernel_name("cross_entropy_fwd", dtype_name, soft, ph, fast)
                      for ph in (0, 1)]  # fmt: skip
    names.append(denom_kernel_name(dtype_name))
    if clusters:
        for op in CLUSTER_OPS:
            flags = (False, True) if op in FLAG_OPS else (False,)
            names += [cluster_kernel_name(op, dtype_name, flag, c)
                      for flag in flags for c in CLUSTER_SIZES]  # fmt: skip
    return names


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def kernel_dir() -> Path:
    """The folder holding the .cu/.cuh sources (package data of softmax_kernels.kernels.cuda)."""
    try:
        from importlib.resources import files

        return Path(str(files("softmax_kernels.kernels.cuda")))
    except (ImportError, ModuleNotFoundError, TypeError):
        return Path(__file__).resolve().parent.parent / "kernels" / "cuda"


def kernel_source(folder: Path | None = None) -> str:
    """All kernel sources as one translation unit: the .cu files with their local includes
    inlined (each once), so the source text CuPy hashes for its disk cache covers every line.
    folder: where the sources are (default: the package's kernel_dir())."""
    folder = kernel_dir() if folder is None else Path(folder)
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name in seen:
            return ""
        seen.add(name)
        text = (folder / name).read_text()
        return _INCLUDE.sub(lambda mo: expand(mo.group(1)), text)

    return "\n".join(expand(name) for name in KERNEL_FILES if name.endswith(".cu"))


# NVRTC options. CuPy (>= 14) defaults to C++17 already; naming it keeps CuPy 13 the same.
# No fast-math: expf/logf stay accurate to float32's last bits.
NVRTC_OPTIONS = ("-std=c++17",)


# ----------------------------------------------------------------------------------------------
# Availability (CuPy imported here, on first use, never at package import).

_UNSET = object()
_reason: Any = _UNSET
_lock = threading.Lock()

_INSTALL_HINT = (
    "pip install 'softmax-kernels[cupy-cuda13]' (CUDA 13 driver; 'softmax-kernels[cupy-cuda12]' "
    "for CUDA 12)"
)


def _cupy():
    import cupy

    return cupy


def _find_reason() -> str | None:
    try:
        cupy = _cupy()
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"CuPy is not installed or does not import ({exc}); install it: {_INSTALL_HINT}"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return (
            f"CuPy finds no usable CUDA GPU ({exc}); this backend needs an NVIDIA GPU with its "
            "driver (use backend='numpy' on the CPU)"
        )
    if n < 1:
        return "no CUDA GPU is visible (use backend='numpy' on the CPU)"
    try:
        cupy.cuda.nvrtc.getVersion()
    except Exception as exc:
        return (
            f"NVRTC, CUDA's run-time compiler that builds the kernels, cannot be loaded ({exc}); "
            "install the CUDA toolkit or pip install 'cupy-cuda13x[ctk]'"
        )
    return None


def unavailable_reason() -> str | None:
    """None when CuPy imports and a CUDA GPU (and NVRTC) is usable; else why not and the fix.
    Checked once per process."""
    global _reason
    if _reason is _UNSET:
        with _lock:
            if _reason is _UNSET:
                _reason = _find_reason()
    return _reason


def serve_reason(x) -> str | None:
    """None for CuPy arrays and torch CUDA tensors; else why this backend cannot take x."""
    kind = _arrays.kind_of(x)
    if kind == _arrays.CUPY:
        return None
    if kind == _arrays.TORCH:
        if x.is_cuda:
            return None
        return (
            f"the CuPy backend runs on CUDA GPUs and this tensor is on {x.device}; use "
            "backend='numpy' (or backend=None) for CPU tensors, or move it to the GPU "
            "(tensor.cuda())"
        )
    if kind == _arrays.NUMPY:
        return (
            "the CuPy backend runs on CUDA GPUs and NumPy arrays live on the CPU; use "
            "backend='numpy' (or backend=None), or move the data to the GPU (cupy.asarray)"
        )
    return f"the CuPy backend takes CuPy arrays and torch CUDA tensors, not {type(x).__name__}"


# ----------------------------------------------------------------------------------------------
# Operands: raw device pointers and element strides, whatever the array kind (zero-copy; torch
# bfloat16 included, which CuPy has no dtype for).


@dataclass(frozen=True)
class _Rows:
    """A 2-D operand as the kernels see it: base address and row stride in elements."""

    ptr: int
    row_stride: int
    itemsize: int


def _ptr(a) -> int:
    if _arrays.kind_of(a) == _arrays.TORCH:
        return int(a.data_ptr())
    return int(a.data.ptr)


def _rows(a) -> _Rows:
    n_rows = int(a.shape[0])
    rs = _arrays.strides_elems(a)[0] if n_rows > 1 else 0  # one row: its stride never matters
    return _Rows(
        _ptr(a), int(rs), int(a.element_size() if hasattr(a, "element_size") else a.itemsize)
    )


def vector_flags(rows: list[_Rows], mask: _Rows | None = None) -> tuple[bool, bool, bool]:
    """(vec_ok, shifted, mask_vec) for operands whose first entry is the row-shift reference.

    vec_ok: every operand's rows start at the same address mod 16 as the reference's, so one
    per-row shift makes all their packs 16-byte aligned. shifted: some row starts off a 16-byte
    boundary (a row may then span one pack more). mask_vec: the mask's rows (1 byte per element)
    line up with that shift too, so its packs can be read whole."""
    ref = rows[0]
    size = ref.itemsize
    vec = vec_width(size)

    def residues(r: _Rows) -> tuple[int, int]:
        return r.ptr % 16, (r.row_stride * r.itemsize) % 16

    vec_ok = ref.ptr % size == 0 and all(
        r.itemsize == size and residues(r) == residues(ref) for r in rows
    )
    s0, ds = ((ref.ptr % 16) // size, ref.row_stride % vec) if vec_ok else (0, 0)
    shifted = vec_ok and (s0 != 0 or ds != 0)
    mask_vec = mask is not None and mask.ptr % vec == s0 and mask.row_stride % vec == ds
    return vec_ok, shifted, mask_vec


# ----------------------------------------------------------------------------------------------
# Modules, devices and streams.


class _Device:
    """Per-device facts the launches need, read once."""

    def __init__(self, cupy, dev: int):
        attrs = cupy.cuda.Device(dev).attributes
        self.sm_count = int(attrs["MultiProcessorCount"])
        self.smem_optin = int(attrs.get("MaxSharedMemoryPerBlockOptin", DEFAULT_SMEM_LIMIT))
        self.smem_per_sm = int(attrs.get("MaxSharedMemoryPerMultiprocessor", self.smem_optin))
        self.threads_per_sm = int(attrs.get("MaxThreadsPerMultiProcessor", 2048))
        self.clusters = int(attrs.get("ComputeCapabilityMajor", 0)) >= 9


class _Module:
    """Every kernel of one dtype on one device: one RawModule (NVRTC compiles it on first use,
    and CuPy keeps the binary in its disk cache), its kernels and their grid limits."""

    def __init__(self, cupy, dev: int, dtype_name: str):
        self.cupy = cupy
        self.device = _device_info(dev)
        self.raw = cupy.RawModule(
            code=kernel_source(),
            options=NVRTC_OPTIONS,
            name_expressions=all_kernel_names(dtype_name, clusters=self.device.clusters),
        )
        self.kernels: dict[str, Any] = {}
        self.max_blocks: dict[tuple[str, int, int], int] = {}

    def kernel(self, name: str, plan: LaunchPlan):
        k = self.kernels.get(name)
        if k is None:
            k = self.raw.get_function(name)
            if plan.strategy in (BLOCK_SMEM, CLUSTER):
                # opt in to the device's per-block limit (above the default 48 KiB)
                k.max_dynamic_shared_size_bytes = self.device.smem_optin - k.shared_size_bytes
            self.kernels[name] = k
        return k

    def grid(self, name: str, kernel, plan: LaunchPlan, n_rows: int) -> int:
        """Blocks to launch: enough for every row, at most what fills the GPU once (the kernels
        loop over rows, grid-stride)."""
        key = (name, plan.threads, plan.smem)
        cap = self.max_blocks.get(key)
        if cap is None:
            per_sm = 0
            try:
                per_sm = int(
                    self.cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
                        kernel.kernel.ptr, plan.threads, plan.smem
                    )
                )
            except Exception:
                per_sm = 0
            if per_sm < 1:  # estimate: threads, then shared memory, per SM
                per_sm = self.device.threads_per_sm // plan.threads
                if plan.smem:
                    per_sm = min(
                        per_sm, self.device.smem_per_sm // (plan.smem + STATIC_SMEM_RESERVE)
                    )
                per_sm = max(1, per_sm)
            cap = self.device.sm_count * per_sm
            if plan.strategy == CLUSTER:  # whole clusters (any count is safe: see CLUSTER_SIZES)
                cap = max(1, cap // plan.segments) * plan.segments
            self.max_blocks[key] = cap
        return max(1, min(cap, -(-n_rows // plan.rows_per_block)))


_modules: dict[tuple[int, str], _Module] = {}
_streams: dict[tuple[int, int], Any] = {}


class _StreamHandle:
    """A raw cudaStream_t in the CUDA stream protocol, for cupy.cuda.Stream.from_external."""

    def __init__(self, ptr: int):
        self._ptr = ptr

    def __cuda_stream__(self):
        return (0, self._ptr)


def _external_stream(cupy, ptr: int, dev: int):
    """A CuPy view of a foreign stream (torch's), cached by handle."""
    key = (dev, ptr)
    s = _streams.get(key)
    if s is None:
        if hasattr(cupy.cuda.Stream, "from_external"):  # CuPy >= 14
            s = cupy.cuda.Stream.from_external(_StreamHandle(ptr))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                s = cupy.cuda.ExternalStream(ptr, dev)
        if len(_streams) > 64:
            _streams.clear()
        _streams[key] = s
    return s


_devices: dict[int, _Device] = {}


def _device_of(x) -> int:
    if _arrays.kind_of(x) == _arrays.TORCH:
        import torch

        return x.device.index if x.device.index is not None else torch.cuda.current_device()
    return int(x.device.id)


def _device_info(dev: int) -> _Device:
    d = _devices.get(dev)
    if d is None:
        d = _devices[dev] = _Device(_cupy(), dev)
    return d


def _smem_limit(x) -> int:
    """The opt-in shared memory per block of x's device."""
    return _device_info(_device_of(x)).smem_optin


# Devices on which a cluster launch failed (e.g. a partitioned GPU that cannot place a cluster):
# the planner gives them the split (d) from then on.
_clusters_broken: set[int] = set()


def _clusters(x) -> bool:
    """Whether x's device takes the cluster strategy (e)."""
    dev = _device_of(x)
    return USE_CLUSTERS and dev not in _clusters_broken and _device_info(dev).clusters


def _sm_count(x) -> int:
    """The SMs of x's device (the few-rows split fills them)."""
    return _device_info(_device_of(x)).sm_count


def _stream_for(x, dev: int):
    """The stream to launch on: torch's current stream for torch tensors, None (CuPy's current
    stream) for CuPy arrays."""
    if _arrays.kind_of(x) != _arrays.TORCH:
        return None
    import torch

    return _external_stream(_cupy(), int(torch.cuda.current_stream(x.device).cuda_stream), dev)


def _module(dev: int, dtype_name: str) -> _Module:
    key = (dev, dtype_name)
    mod = _modules.get(key)
    if mod is None:
        with _lock:
            mod = _modules.get(key)
            if mod is None:
                mod = _Module(_cupy(), dev, dtype_name)
                _modules[key] = mod
    return mod


def _launch(
    name: str, x, plan: LaunchPlan, n_rows: int, args: tuple, max_grid: int | None = None
) -> None:
    """Launch kernel instance `name` on x's device and stream: enough blocks for n_rows rows, at
    most what fills the GPU once (and max_grid)."""
    cupy = _cupy()
    dtype_name = _arrays.dtype_name(x)
    dev = _device_of(x)
    stream = _stream_for(x, dev)
    with cupy.cuda.Device(dev):
        mod = _module(dev, dtype_name)
        kernel = mod.kernel(name, plan)
        grid = mod.grid(name, kernel, plan, n_rows)
        if max_grid is not None:
            grid = min(grid, max_grid)
        kernel((grid,), (plan.threads,), args, shared_mem=plan.smem, stream=stream)


# The reductions' workspace (CeWorkspace in cross_entropy.cu), one per (device, stream): the
# ticket counter, the denominator, and WS_PARTIALS x 3 partial sums, in float64. Zeroed once
# when created; every reducing kernel's last block resets the counter, so calls need no memset.
WS_DOUBLES = 8 + 3 * WS_PARTIALS
_workspaces: dict[tuple[int, int], Any] = {}


def _stream_ptr(x, dev: int) -> int:
    if _arrays.kind_of(x) == _arrays.TORCH:
        import torch

        return int(torch.cuda.current_stream(x.device).cuda_stream)
    return int(_cupy().cuda.get_current_stream(dev).ptr)


def _workspace(x) -> int:
    """The device address of the reductions' workspace for x's device and current stream."""
    dev = _device_of(x)
    key = (dev, _stream_ptr(x, dev))
    ws = _workspaces.get(key)
    if ws is None:
        cupy = _cupy()
        with cupy.cuda.Device(dev):
            ws = cupy.zeros(WS_DOUBLES, dtype=cupy.float64)  # once per (device, stream)
        if len(_workspaces) > 64:
            _workspaces.clear()
        _workspaces[key] = ws
    return int(ws.data.ptr)


# The split strategy's partials (SPLIT_WS_PER_SEG doubles per segment), one buffer per (device,
# stream), grown when a call needs more. It needs no zeroing: phase 0 writes every slot phase 1
# reads. Allocated under that stream (CuPy's pool orders a freed buffer's reuse on the stream it
# was allocated on), and a grown one replaces it only after the launches queued on that stream.
_split_workspaces: dict[tuple[int, int], Any] = {}


def _split_workspace(x, n_doubles: int) -> int:
    """The device address of a split workspace of at least n_doubles float64 for x's device and
    current stream."""
    cupy = _cupy()
    dev = _device_of(x)
    key = (dev, _stream_ptr(x, dev))
    ws = _split_workspaces.get(key)
    if ws is None or ws.size < n_doubles:
        stream = _stream_for(x, dev)
        with cupy.cuda.Device(dev):
            if stream is not None:
                with stream:
                    ws = cupy.empty(max(n_doubles, 4096), dtype=cupy.float64)
            else:
                ws = cupy.empty(max(n_doubles, 4096), dtype=cupy.float64)
        if len(_split_workspaces) > 64:
            _split_workspaces.clear()
        _split_workspaces[key] = ws
    return int(ws.data.ptr)


def _launch_split(op: str, x, dn: str, flag: bool, plan: LaunchPlan, n_rows: int, ptrs: tuple,
                  tail: tuple) -> None:  # fmt: skip
    """The two launches of a split plan: phase 0 (the segments' partials into the workspace),
    then phase 1 (merge and normalise), over n_rows x plan.segments (row, segment) items. ptrs:
    the kernel's pointer arguments before the workspace; tail: those after seg_packs."""
    items = n_rows * plan.segments
    ws = _split_workspace(x, items * SPLIT_WS_PER_SEG[op])
    mid = ptrs[3:]  # n_rows, n_cols and the row strides
    for phase in (0, 1):
        args = ptrs[:3] + (np.uint64(ws),) + mid + (
            np.int64(plan.segments), np.int64(plan.seg_packs)) + tail  # fmt: skip
        _launch(split_kernel_name(op, dn, flag, phase), x, plan, items, args)


def _launch_cluster(op: str, x, dn: str, flag: bool, plan: LaunchPlan, n_rows: int,
                    args: tuple) -> bool:  # fmt: skip
    """The one launch of a cluster plan: n_rows clusters' worth of blocks at most (clusters walk
    rows grid-stride). False when the launch failed (the device is then marked for the split)."""
    try:
        _launch(cluster_kernel_name(op, dn, flag, plan.segments), x, plan,
                n_rows * plan.segments, args)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - CuPy's driver errors; anything else re-raised below
        if "CUDA" not in type(exc).__name__ and "cuda" not in str(exc).lower():
            raise
        _clusters_broken.add(_device_of(x))
        msg = f"a thread-block cluster launch failed ({exc}); this device uses the split now"
        warnings.warn(f"softmax-kernels: {msg}", RuntimeWarning, stacklevel=3)
        return False
    return True


def _acc(dtype_name: str):
    return np.float64 if dtype_name == "float64" else np.float32


# ----------------------------------------------------------------------------------------------
# The backend interface (see softmax_kernels.dispatch).


def _check_cols(fn: str, n_cols: int) -> None:
    if n_cols >= MAX_COLS:
        raise ValueError(
            f"{fn}: rows of {n_cols} elements; the CuPy backend's kernels take rows of fewer "
            f"than {MAX_COLS} (32-bit column indices)"
        )


def softmax_fwd(x, out, *, scale: float, mask, is_log: bool) -> None:
    # y = exp(s*x - m) / sum(exp(s*x - m)), m = max(s*x); log: s*x - m - log(sum(...)).
    # Reads x (and the mask) once and writes y once; (c) reads x twice.
    n_rows, n_cols = (int(d) for d in x.shape)
    if n_rows == 0 or n_cols == 0:
        return
    _check_cols("softmax_fwd", n_cols)
    dn = _arrays.dtype_name(x)
    xr, yr = _rows(x), _rows(out)
    mr = _rows(mask) if mask is not None else None
    vec_ok, shifted, mask_vec = vector_flags([xr, yr], mr)
    vec = vec_width(xr.itemsize)
    whole = vec_ok and not shifted and n_cols % vec == 0 and (mr is None or mask_vec)
    plan = plan_launch(
        "softmax_fwd", dn, n_cols, vec_ok=vec_ok, shifted=shifted, smem_limit=_smem_limit(x),
        whole_packs=whole, n_rows=n_rows, sm_count=_sm_count(x), clusters=_clusters(x),
    )  # fmt: skip
    if plan.strategy == CLUSTER:
        args = (np.uint64(xr.ptr), np.uint64(yr.ptr), np.uint64(mr.ptr if mr is not None else 0),
                np.int64(n_rows), np.int64(n_cols), np.int64(xr.row_stride),
                np.int64(yr.row_stride), np.int64(mr.row_stride if mr is not None else 0),
                np.int64(plan.seg_packs), _acc(dn)(scale), np.int32(vec_ok),
                np.int32(mask_vec))  # fmt: skip
        if _launch_cluster("softmax_fwd", x, dn, is_log, plan, n_rows, args):
            return
        plan = plan_launch(
            "softmax_fwd", dn, n_cols, vec_ok=vec_ok, shifted=shifted,
            smem_limit=_smem_limit(x), whole_packs=whole, n_rows=n_rows, sm_count=_sm_count(x),
        )  # fmt: skip
    if plan.strategy == SPLIT:
        mptr, mstride = (mr.ptr, mr.row_stride) if mr is not None else (0, 0)
        ptrs = (np.uint64(xr.ptr), np.uint64(yr.ptr), np.uint64(mptr), np.int64(n_rows),
                np.int64(n_cols), np.int64(xr.row_stride), np.int64(yr.row_stride),
                np.int64(mstride))  # fmt: skip
        tail = (_acc(dn)(scale), np.int32(vec_ok), np.int32(mask_vec))
        _launch_split("softmax_fwd", x, dn, is_log, plan, n_rows, ptrs, tail)
        return
    args = (
        np.uint64(xr.ptr),
        np.uint64(yr.ptr),
        np.uint64(mr.ptr if mr is not None else 0),
        np.int64(n_rows),
        np.int64(n_cols),
        np.int64(xr.row_stride),
        np.int64(yr.row_stride),
        np.int64(mr.row_stride if mr is not None else 0),
        np.int64(plan.row_threads or plan.threads),
        _acc(dn)(scale),
        np.int32(vec_ok),
        np.int32(mask_vec),
    )
    _launch(kernel_name("softmax_fwd", dn, is_log, plan), x, plan, n_rows, args)


def softmax_bwd(dy, y, out, *, scale: float, is_log: bool) -> None:
    # softmax:     dx = s * y * (dy - dot(dy, y))     reads 2 x n, writes n
    # log_softmax: dx = s * (dy - exp(y) * sum(dy))   reads 2 x n, writes n
    # (the row sums in float64 for float32 data: sum_t in common.cuh)
    n_rows, n_cols = (int(d) for d in y.shape)
    if n_rows == 0 or n_cols == 0:
        return
    _check_cols("softmax_bwd", n_cols)
    dn = _arrays.dtype_name(y)
    dr, yr, orr = _rows(dy), _rows(y), _rows(out)
    vec_ok, shifted, _ = vector_flags([dr, yr, orr])
    plan = plan_launch(
        "softmax_bwd", dn, n_cols, vec_ok=vec_ok, shifted=shifted, smem_limit=_smem_limit(y),
        n_rows=n_rows, sm_count=_sm_count(y), clusters=_clusters(y),
    )  # fmt: skip
    if plan.strategy == CLUSTER:
        args = (np.uint64(dr.ptr), np.uint64(yr.ptr), np.uint64(orr.ptr), np.int64(n_rows),
                np.int64(n_cols), np.int64(dr.row_stride), np.int64(yr.row_stride),
                np.int64(orr.row_stride), np.int64(plan.seg_packs), _acc(dn)(scale),
                np.int32(is_log), np.int32(vec_ok))  # fmt: skip
        if _launch_cluster("softmax_bwd", y, dn, False, plan, n_rows, args):
            return
        plan = plan_launch(
            "softmax_bwd", dn, n_cols, vec_ok=vec_ok, shifted=shifted,
            smem_limit=_smem_limit(y), n_rows=n_rows, sm_count=_sm_count(y),
        )  # fmt: skip
    if plan.strategy == SPLIT:
        ptrs = (np.uint64(dr.ptr), np.uint64(yr.ptr), np.uint64(orr.ptr), np.int64(n_rows),
                np.int64(n_cols), np.int64(dr.row_stride), np.int64(yr.row_stride),
                np.int64(orr.row_stride))  # fmt: skip
        tail = (_acc(dn)(scale), np.int32(is_log), np.int32(vec_ok))
        _launch_split("softmax_bwd", y, dn, False, plan, n_rows, ptrs, tail)
        return
    args = (
        np.uint64(dr.ptr),
        np.uint64(yr.ptr),
        np.uint64(orr.ptr),
        np.int64(n_rows),
        np.int64(n_cols),
        np.int64(dr.row_stride),
        np.int64(yr.row_stride),
        np.int64(orr.row_stride),
        np.int64(plan.row_threads or plan.threads),
        _acc(dn)(scale),
        np.int32(is_log),
        np.int32(vec_ok),
    )
    _launch(kernel_name("softmax_bwd", dn, False, plan), y, plan, n_rows, args)


# Cross-entropy flags (SK_CE_* in cross_entropy.cu).
CE_T64, CE_SMOOTH, CE_ZLOSS, CE_VEC, CE_SOFTCAP = 1, 2, 4, 8, 16
CE_STATS, CE_SUM, CE_MEAN, CE_DENOM_WS, CE_DENOM_ARG = 32, 64, 128, 256, 512
REDUCTIONS = ("none", "sum", "mean")


def _check_cdt(fn: str, cdt: str, **arrays) -> None:
    for name, a in arrays.items():
        if a is not None and _arrays.dtype_name(a) != cdt:
            raise TypeError(f"{fn}: {name} must be {cdt}, got {_arrays.dtype_name(a)}")


def _ce_targets(fn: str, target, soft: bool) -> tuple[_Rows, int]:
    """(target rows, flag bits) of soft or class targets."""
    if soft:
        return _rows(target), 0
    tn = _arrays.dtype_name(target)
    if tn not in ("int32", "int64"):
        raise TypeError(f"{fn}: class targets must be int32 or int64, got {tn}")
    return _Rows(_ptr(target), 0, 8 if tn == "int64" else 4), (CE_T64 if tn == "int64" else 0)


def _clamp_i64(v: int) -> int:
    return min(max(int(v), -(2**63)), 2**63 - 1)


def _ce_plan(fn, logits, target, grad, soft, with_grad, softcap):
    """Rows, vector flags and the plan of a cross-entropy kernel over logits (and grad)."""
    n_cols = int(logits.shape[1])
    _check_cols(fn, n_cols)
    dn = _arrays.dtype_name(logits)
    xr = _rows(logits)
    tr, tflags = _ce_targets(fn, target, soft)
    operands = [xr] + ([_rows(grad)] if grad is not None else []) + ([tr] if soft else [])
    vec_ok, shifted, _ = vector_flags(operands)
    op = "cross_entropy_grad" if fn == "cross_entropy_grad" else "cross_entropy_fwd"
    plan = plan_launch(
        op,
        dn,
        n_cols,
        vec_ok=vec_ok,
        shifted=shifted,
        smem_limit=_smem_limit(logits),
        soft=soft,
        with_grad=with_grad,
        softcap=softcap is not None,
        n_rows=int(logits.shape[0]),
        sm_count=_sm_count(logits),
    )
    flags = tflags | (CE_VEC if vec_ok else 0) | (CE_SOFTCAP if softcap is not None else 0)
    return dn, xr, tr, plan, flags


def _ce_fwd_launch(
    logits, target, *, loss, grad, lse, stats, soft, weight, ignore_index, vocab_start,
    label_smoothing, z_loss, softcap, grad_scale, reduction, denom,
):  # fmt: skip
    """cross_entropy_fwd_kernel in forward (loss / lse / gradient) or statistics mode (at most
    two launches: the denominator first when a "mean" gradient needs it)."""
    fn = "cross_entropy_stats" if stats is not None else "cross_entropy_fwd"
    n_rows, n_cols = (int(d) for d in logits.shape)
    dn, xr, tr, plan, flags = _ce_plan(fn, logits, target, grad, soft, grad is not None, softcap)
    cdt = "float64" if dn == "float64" else "float32"
    acc = _acc(dn)
    _check_cdt(fn, cdt, loss=loss, lse=lse, stats=stats, weight=weight, denom=denom)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    eps, z = float(label_smoothing), float(z_loss)
    flags |= (CE_SMOOTH if eps > 0 else 0) | (CE_ZLOSS if z > 0 else 0)
    gs = float(grad_scale)
    if stats is not None:
        flags |= CE_STATS
    elif reduction == "sum":
        flags |= CE_SUM
    elif reduction == "mean":
        flags |= CE_MEAN
        if denom is not None:
            flags |= CE_DENOM_ARG
        elif grad is not None and soft:
            gs /= max(n_rows, 1)  # the denominator is the row count, known here
        elif grad is not None:
            flags |= CE_DENOM_WS
    reducing = stats is None and reduction != "none"
    ws = _workspace(logits) if reducing else 0
    wptr = _ptr(weight) if weight is not None else 0
    split = plan.strategy == SPLIT
    if flags & CE_DENOM_WS and not split:  # (the split's phase 0 sums the denominator itself)
        dplan = LaunchPlan(ONLINE, 1, 1, BLOCK_THREADS, 0, 4 * BLOCK_THREADS)
        dargs = (
            np.uint64(tr.ptr),
            np.uint64(wptr),
            np.uint64(ws),
            np.int64(n_rows),
            np.int64(n_cols),
            np.int64(_clamp_i64(ignore_index)),
            np.int32(flags & CE_T64),
        )
        _launch(denom_kernel_name(dn), logits, dplan, n_rows, dargs, WS_PARTIALS)
    n_stats = int(stats.shape[1]) if stats is not None else 0
    args = (
        np.uint64(xr.ptr),
        np.uint64(tr.ptr),
        np.uint64(_ptr(grad) if grad is not None else 0),
        np.uint64(_ptr(loss) if loss is not None else 0),
        np.uint64(_ptr(lse) if lse is not None else 0),
        np.uint64(_ptr(stats) if stats is not None else 0),
        np.uint64(wptr),
        np.uint64(_ptr(denom) if denom is not None else 0),
        np.uint64(ws),
        np.int64(n_rows),
        np.int64(n_cols),
        np.int64(xr.row_stride),
        np.int64(tr.row_stride if soft else 0),
        np.int64(_rows(grad).row_stride if grad is not None else 0),
        np.int64(_clamp_i64(ignore_index)),  # (targets are int64)
        np.int64(vocab_start),
        np.int64(plan.row_threads or plan.threads),
        np.int64(n_stats),
        np.int32(flags),
        acc(1.0 - eps),
        acc(eps / n_cols if n_cols else 0.0),
        acc(z),
        acc(softcap if softcap is not None else 0.0),
        acc(1.0 / softcap if softcap is not None else 0.0),
        acc(gs),
    )
    if split:  # phase 0 (statistics, the denominator), phase 1 (merge, outputs, reduction)
        items = n_rows * plan.segments
        wsp = _split_workspace(logits, items * SPLIT_WS_PER_SEG["cross_entropy_fwd"])
        args += (np.uint64(wsp), np.int64(plan.segments), np.int64(plan.seg_packs))
        cap = WS_PARTIALS if reducing else None
        for phase in (0, 1):
            name = split_kernel_name("cross_entropy_fwd", dn, soft, phase, plan.fast)
            _launch(name, logits, plan, items, args, cap)
        return
    name = kernel_name("cross_entropy_fwd", dn, soft, plan)
    _launch(name, logits, plan, n_rows, args, WS_PARTIALS if reducing else None)


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
) -> None:
    # dispatch.py's maths (cross_entropy.cu has it in full). Reads the logits once (and the
    # soft targets), writes the loss (and lse) and the gradient once; the reduction and the
    # "mean" denominator happen on the device, in at most 2 launches and nothing else.
    _ce_fwd_launch(
        logits, target, loss=loss, grad=grad, lse=lse, stats=None, soft=soft, weight=weight,
        ignore_index=ignore_index, vocab_start=0, label_smoothing=label_smoothing,
        z_loss=z_loss, softcap=softcap, grad_scale=grad_scale, reduction=reduction, denom=denom,
    )  # fmt: skip


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
) -> None:
    # Per row: class [m, s, z_t - m, (w_t), (sum w (z - m))], soft [m, s, sum w q,
    # sum w q (z - m), (sum w (z - m))] (dispatch.py). Reads the logits (and soft targets) of
    # every row once, ignored rows too (the merge gives every row's lse).
    if int(logits.shape[0]) == 0:
        return
    _ce_fwd_launch(
        logits, target, loss=None, grad=None, lse=None, stats=stats, soft=soft, weight=weight,
        ignore_index=ignore_index, vocab_start=int(vocab_start),
        label_smoothing=label_smoothing, z_loss=0.0, softcap=softcap, grad_scale=1.0,
        reduction="none", denom=None,
    )  # fmt: skip


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
) -> None:
    # grad = (coef p - keep w_t onehot - eps_c w) * grad_scale * row_scale, p = exp(z - lse)
    # (soft: coef p - w (keep q + eps_c)), times the softcap chain rule. Reads the logits (and
    # soft targets) once, writes the gradient once: one launch.
    fn = "cross_entropy_grad"
    n_rows, n_cols = (int(d) for d in logits.shape)
    if n_rows == 0 or n_cols == 0:
        return
    dn, xr, tr, plan, flags = _ce_plan(fn, logits, target, grad, soft, True, softcap)
    cdt = "float64" if dn == "float64" else "float32"
    _check_cdt(fn, cdt, row_lse=row_lse, row_coef=row_coef, row_scale=row_scale, weight=weight)
    acc = _acc(dn)
    flags |= CE_SMOOTH if float(eps_c) != 0.0 else 0
    args = (
        np.uint64(xr.ptr),
        np.uint64(tr.ptr),
        np.uint64(_ptr(grad)),
        np.uint64(_ptr(row_lse)),
        np.uint64(_ptr(row_coef)),
        np.uint64(_ptr(row_scale)),
        np.uint64(_ptr(weight) if weight is not None else 0),
        np.int64(n_rows),
        np.int64(n_cols),
        np.int64(xr.row_stride),
        np.int64(tr.row_stride if soft else 0),
        np.int64(_rows(grad).row_stride),
        np.int64(_clamp_i64(ignore_index)),
        np.int64(vocab_start),
        np.int32(flags),
        acc(keep),
        acc(eps_c),
        acc(softcap if softcap is not None else 0.0),
        acc(1.0 / softcap if softcap is not None else 0.0),
        acc(grad_scale),
    )
    _launch(kernel_name(fn, dn, soft, plan), logits, plan, n_rows, args)


# ----------------------------------------------------------------------------------------------
# The static performance model (pure Python, no GPU): what bench's --model table prints.

# sm_90 (H100 / H200) per-SM limits the model assumes.
SM_THREADS = 2048
SM_BLOCKS = 32
SM_REGISTERS = 65536
SM_SMEM = 233472  # 228 KiB, of which 1 KiB per block is reserved by the hardware
SMEM_PER_BLOCK_RESERVED = 1024
REPORT_ENV = "SK_KERNELS_REPORT"
_report_cache: dict[str, Any] = {}


def kernels_report_path() -> Path:
    """Where kernels/cuda/check.py writes its JSON report by default ($SK_KERNELS_REPORT
    overrides): registers, shared memory, spills and instructions per element per kernel."""
    import os

    env = os.environ.get(REPORT_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "softmax-kernels" / "kernels-check" / "report.json"


def kernels_report() -> dict | None:
    """The JSON report of `make kernels-check` (None when it has not run here)."""
    import json

    path = kernels_report_path()
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return None
    key = f"{path}:{mtime}"
    if key not in _report_cache:
        try:
            _report_cache.clear()
            _report_cache[key] = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
    return _report_cache[key]


def _blocks_per_sm(threads: int, smem: int, registers: int | None) -> tuple[int, str]:
    """Resident blocks per SM and the resource that limits them."""
    limits = {"threads": SM_THREADS // threads, "blocks": SM_BLOCKS}
    if smem:
        limits["shared memory"] = SM_SMEM // (smem + SMEM_PER_BLOCK_RESERVED)
    if registers:
        per_warp = -(-registers * WARP // 256) * 256  # allocated per warp in units of 256
        limits["registers"] = SM_REGISTERS // (per_warp * (threads // WARP))
    why = min(limits, key=lambda k: limits[k])
    return max(0, limits[why]), why


def static_model(
    op: str,
    dtype_name: str,
    n_rows: int,
    n_cols: int,
    *,
    sm_count: int = 132,
    smem_limit: int = 232448,
    soft: bool = False,
    with_grad: bool = True,
    reduction: str = "mean",
    clusters: bool = True,
) -> dict[str, Any]:
    """What one call would do on an sm_90 GPU, without one: the strategy plan_launch picks, the
    launches per call, the bytes moved over the op's minimum (forward 2n, backward 3n, CE
    forward n, CE forward + gradient 2n elements; + n for soft targets), blocks per SM (from
    the plan and, where `make kernels-check` has written its report, the kernel's registers and
    static shared memory), SMs used, registers, spills and hot-loop instructions per element
    (check.py's figure; cross-entropy with a gradient: its "with gradient" figure; the split
    strategy: its two kernels' figures summed, "segments" and "seg_elems" per row; the cluster
    strategy: "segments" = blocks per cluster). clusters: the device runs thread-block clusters
    (sm_90: True). Contiguous rows (x's row stride n_cols) are assumed."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r} (one of {', '.join(OPS)})")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}")
    itemsize = CTYPES[dtype_name][1]
    vec = vec_width(itemsize)
    shifted = (n_cols * itemsize) % 16 != 0 and n_rows > 1
    ce = op.startswith("cross_entropy")
    grad = with_grad if op == "cross_entropy_fwd" else True
    plan = plan_launch(
        op, dtype_name, n_cols, vec_ok=True, shifted=shifted, smem_limit=smem_limit, soft=soft,
        with_grad=grad, n_rows=n_rows, sm_count=sm_count, clusters=clusters,
    )  # fmt: skip
    split = plan.strategy == SPLIT
    # split: two kernels, phase 0 (partials), phase 1 (merge, normalise); the report's figures
    names = plan_kernel_names(op, dtype_name, soft if ce else False, plan)
    name = names[-1]
    n = n_rows * n_cols * itemsize
    twice = plan.strategy in (ONLINE, SPLIT)  # the row read twice
    # bytes: the minimum (the benchmark's definition) and what the plan moves
    if op == "softmax_fwd":
        minimum, moved = 2 * n, (3 if twice else 2) * n
    elif op == "softmax_bwd":  # (c)/(d) read dy and y twice (log_softmax: dy once more only)
        minimum, moved = 3 * n, (5 if twice else 3) * n
    elif op == "cross_entropy_grad":
        minimum = moved = (3 if soft else 2) * n
    else:
        streams_in = 2 if soft else 1
        minimum = streams_in * n + (n if grad else 0)
        reread = grad and twice
        moved = streams_in * n * (2 if reread else 1) + (n if grad else 0)
        per_row = (0 if soft else 8) + (4 if reduction == "none" else 0)
        moved += n_rows * per_row
    launches = 2 if split else 1
    items = n_rows * max(1, plan.segments)
    if plan.strategy == CLUSTER:  # the exchange goes through DSMEM, not memory: nothing added
        pass
    elif split:  # the partials: written once, read from memory once (the row's other blocks: L2)
        moved += 2 * items * SPLIT_WS_PER_SEG[op] * 8
        if ce and not soft:  # every block reads its row's target, in both phases
            moved += 16 * items - 8 * n_rows
    elif op == "cross_entropy_fwd" and reduction == "mean" and grad and not soft:
        launches = 2
        moved += 8 * n_rows  # the denominator kernel reads the targets first
    rep = kernels_report()
    entries = []
    if rep is not None:
        for nm in names:
            archs = rep.get("kernels", {}).get(nm, {})
            e = archs.get("sm_90") or next(iter(archs.values()), None)
            if e:
                entries.append(e)
    entry = None
    if len(entries) == len(names):  # (split: both phases; registers the larger, ipe summed)
        entry = dict(entries[-1])
        entry["registers"] = max(e.get("registers") or 0 for e in entries) or None
        entry["smem"] = max(e.get("smem", 0) for e in entries)
        entry["spills"] = sum(e.get("spills") or 0 for e in entries)
        for key in ("ipe", "ipe_grad"):
            vals = [e.get(key) for e in entries]
            entry[key] = round(sum(vals), 2) if all(v is not None for v in vals) else None
    registers = entry.get("registers") if entry else None
    static_smem = entry.get("smem", 0) if entry else 0
    smem = plan.smem + static_smem
    per_sm, limit = _blocks_per_sm(plan.threads, smem, registers)
    blocks = items if plan.strategy in (SPLIT, CLUSTER) else -(-n_rows // plan.rows_per_block)
    grid = min(blocks, per_sm * sm_count) if per_sm else blocks
    if op == "cross_entropy_fwd" and reduction != "none":
        grid = min(grid, WS_PARTIALS)
    ipe = None
    if entry:
        ipe = entry.get("ipe_grad") if (ce and grad) else entry.get("ipe")
    out: dict[str, Any] = {
        "strategy": plan.strategy_name,
        "kernel": name,
        "launches": launches,
        "bytes": moved,
        "min_bytes": minimum,
        "bytes_ratio": round(moved / minimum, 3) if minimum else None,
        "threads": plan.threads,
        "rows_per_block": plan.rows_per_block,
        "smem": smem,
        "blocks_per_sm": per_sm,
        "blocks_per_sm_limit": limit
        if registers is not None or plan.smem
        else f"{limit} (registers unknown: run make kernels-check)",
        "grid": grid,
        "sms_used": min(sm_count, grid),
        "registers": registers,
        "spills": entry.get("spills") if entry else None,
        "instructions_per_element": ipe,
    }
    if plan.strategy == WARP_ROWS:
        # the instance's figure assumes full packs; a shorter row leaves some lanes' packs idle
        out["fill"] = round(n_cols / (plan.lanes * plan.packs * vec), 3)
    if plan.strategy == BLOCK_SMEM:
        out["row_threads"] = plan.row_threads
    if split or plan.strategy == CLUSTER:
        out["segments"] = plan.segments
        out["seg_elems"] = plan.seg_packs * vec
    return out
