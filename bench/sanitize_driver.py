"""A small driver for compute-sanitizer: every launch strategy of both GPU backends, odd row
lengths, misaligned and row-strided views, the options of each op; each result also checked
against the NumPy backend in float64.

The row lengths come from the backends' own planning functions (``plan_launch`` in
cupy_backend.py, ``_launch_config`` in triton_backend.py), never from a table here: for every
op, dtype and variant the driver scans row lengths 1 .. 2**20 (every length up to 1024, then
around each power of two, bisecting to the exact length where the plan changes) and a few row
counts, and keeps, per distinct plan, its shortest odd row and its longest row (the lengths on
both sides of every threshold). A strategy added tomorrow is a new plan and gets its cases
without a change here; an op the driver cannot map to the API is listed as not driven. A
strategy the planner takes only past the element budget (Triton's "online" for the softmax ops
and cross-entropy with a gradient: ~10**8 elements) is forced at a small size instead, its
planner's limits lowered for those calls (forced_plan, FORCED_LIMITS), and each such case checks
that the plan it really got is that strategy.

Cases, most valuable first (``priority``): 0 every plan (kernel instance) contiguous; 1 per
coarse strategy the misaligned layouts (x one element off a 16-byte boundary with a fresh
output; x and the output both off, which takes the shifted vector path; rows with a stride of
n_cols + 1) and CuPy arrays; 2 the options (masks, scale, weights, smoothing, z-loss, soft and
ignored and out-of-range targets, in place, and softcap / return_lse where the API has them).
Views end exactly where their allocation ends, so an overread of a last pack leaves the
allocation; run with CuPy's pool off and PYTORCH_NO_CUDA_MEMORY_CACHING=1 (both set here) every
array is its own cudaMalloc and memcheck sees it.

    python bench/sanitize_driver.py --plan [--json]          # the cases (no GPU needed)
    python bench/sanitize_driver.py --run [--part I/N] [--max-seconds S] [--report FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import math
import os
import sys
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT / "python", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

# H100/H200 defaults when there is no GPU to ask (--plan on the CPU).
H200_SM = 132
H200_SMEM_OPTIN = 232448  # sharedMemPerBlockOptin, 227 KiB
MAX_COLS = 1 << 20  # the contract's longest row the tests use
MAX_ELEMS = 1 << 22  # per array: fast even under racecheck
DTYPES = ("float16", "bfloat16", "float32", "float64")
LAYOUT_DTYPES = ("bfloat16", "float32", "float64")  # one per element size: 2, 4, 8 bytes
OPTION_DTYPES = ("bfloat16", "float32")
TOL = {"float64": (1e-12, 1e-12), "float32": (1e-6, 1e-5), "float16": (1e-3, 1e-3),
       "bfloat16": (8e-3, 1.6e-2)}  # fmt: skip


@dataclass(frozen=True)
class Case:
    backend: str  # "triton" | "cupy"
    op: str  # softmax | log_softmax | softmax_backward | log_softmax_backward | ce | ce_grad
    dtype: str
    n_rows: int
    n_cols: int
    layout: str = "contig"  # contig | offset | offset-out | rowpad | cupy-array
    options: tuple = ()  # sorted (name, value) pairs, see _api_call
    covers: str = ""  # the plan (or strategy) this case is for
    priority: int = 0
    # a strategy the planner takes only past the element budget, reached here at a small size by
    # lowering the planner's thresholds for the call (forced_plan); "": the planner's own plan
    forced: str = ""

    @property
    def name(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return (f"{self.backend}:{self.op}:{self.dtype}:{self.n_rows}x{self.n_cols}:{self.layout}"
                + (f":{opts}" if opts else "")
                + (f":forced-{self.forced}" if self.forced else ""))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Planning functions of the backends (pure Python: no GPU, no CuPy needed)


@functools.cache
def _accepted(fn: Callable) -> frozenset[str] | None:
    """The keyword names fn takes (None: any, it has **kwargs)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return frozenset(params)


def _call(fn: Callable, *args, **kw):
    """fn(*args, **the keywords fn accepts): the planners grow and lose options over time."""
    ok = _accepted(fn)
    if ok is not None:
        kw = {k: v for k, v in kw.items() if k in ok}
    return fn(*args, **kw)


@dataclass
class Planner:
    """One backend's plan function as the driver sees it: for each internal op name and
    variant, the API ops that reach it and the plan key of a (rows, cols) shape."""

    backend: str
    # (internal op, variant kwargs, API ops, extra options of those calls)
    ops: list[tuple[str, dict, tuple[str, ...], tuple]]
    key: Callable[[str, dict, str, int, int], tuple[str, str]]  # -> (coarse, fine)
    rows: tuple[int, ...]
    dtypes: tuple[str, ...]
    notes: list[str] = field(default_factory=list)
    # strategies that force() can reach at a small size, and force(strategy, op, variant,
    # dtype) -> (n_rows, n_cols, fine key) under forced_plan, or None
    forcible: tuple[str, ...] = ()
    force: Callable | None = None
    _memo: dict = field(default_factory=dict, repr=False)

    def plan_key(self, op: str, variant: dict, dtype: str, n_rows: int, n_cols: int):
        """key(), remembered (a scan asks for the same lengths again while bisecting)."""
        k = (op, tuple(sorted(variant.items())), dtype, n_rows, n_cols)
        v = self._memo.get(k)
        if v is None:
            v = self._memo[k] = self.key(op, variant, dtype, n_rows, n_cols)
        return v


def _api_ops(op: str, variant: dict) -> tuple[tuple[str, ...], tuple] | None:
    """The API calls that run an internal op (None: not driven)."""
    if op == "softmax_fwd_mask":  # (a mask with a fully masked row: see Runner.run)
        return ("softmax", "log_softmax"), (("mask", "full"),)
    if op.startswith("softmax_fwd") or op == "softmax":
        return ("softmax", "log_softmax"), ()
    if op.startswith("softmax_bwd") or op == "softmax_backward":
        return ("softmax_backward", "log_softmax_backward"), ()
    base = op.removesuffix("_soft")
    if base in ("cross_entropy", "cross_entropy_fwd"):
        # the fused loss (+ gradient) kernel; other cross-entropy kernels (the vocabulary-
        # parallel statistics and gradient, the denominator) are not reached by these calls
        soft = bool(variant.get("soft")) or op.endswith("_soft")
        extra = (("soft", True),) if soft else ()
        if variant.get("with_grad") is False:
            return ("ce",), extra
        if "with_grad" in variant:
            return ("ce_grad",), extra
        return ("ce_grad", "ce"), extra
    return None


def cupy_planner(smem_limit: int = H200_SMEM_OPTIN, n_sm: int = H200_SM) -> Planner | None:
    try:
        from softmax_kernels.backends import cupy_backend as cb
    except Exception as e:  # noqa: BLE001
        print(f"cupy planner: cupy_backend does not import ({e})")
        return None
    plan = getattr(cb, "plan_launch", None)
    if plan is None:
        return None
    notes = []
    ops = []
    for op in getattr(cb, "OPS", ("softmax_fwd", "softmax_bwd", "cross_entropy_fwd")):
        if op.startswith("cross_entropy"):
            variants = [{"soft": s, "with_grad": g} for s in (False, True) for g in (True, False)]
        else:
            variants = [{}]
        for v in variants:
            m = _api_ops(op, v)
            if m is None:
                notes.append(f"cupy op {op} is not driven (no API mapping)")
                continue
            ops.append((op, v, *m))
    # the kernels a call of the plan launches (split: both phases; cluster: the instance of its
    # cluster size), else the one kernel of a per-row plan
    names = getattr(cb, "plan_kernel_names", None)
    one = getattr(cb, "kernel_name", None)
    kname = (lambda *a: " + ".join(names(*a))) if names is not None else one

    def key(op, variant, dtype, n_rows, n_cols):
        # (n_rows, sm_count: the few-rows split, which the backend plans with the call's rows)
        p = _call(plan, op, dtype, n_cols, vec_ok=True, shifted=False, smem_limit=smem_limit,
                  n_rows=n_rows, sm_count=n_sm, clusters=True, **variant)  # fmt: skip
        coarse = str(getattr(p, "strategy_name", None) or getattr(p, "strategy", p))
        fine = None
        if kname is not None:
            try:
                fine = kname(op, dtype, bool(variant.get("soft")), p)
            except Exception:  # noqa: BLE001 - its signature changed: fall back to the fields
                fine = None
        if fine is None:
            fine = repr(tuple(getattr(p, f, None) for f in ("strategy", "lanes", "packs")))
        return coarse, fine

    dtypes = tuple(d for d in getattr(cb, "CTYPES", dict.fromkeys(DTYPES)) if d in TOL)
    # 3 rows: every per-row strategy and the few-rows split. The cluster strategy (e) (sm_90,
    # as the H200; clusters=True above) needs enough rows x blocks to use the SMs, so two more
    # row counts: the fewest rows that take the largest clusters, and the fewest that fill the
    # SMs with the smallest (a longer row then grows its cluster); both well within MAX_ELEMS
    # just past strategy (b)'s shared memory (e.g. 33 x ~57K float32).
    rows = [3]
    sizes = getattr(cb, "CLUSTER_SIZES", ())
    if sizes:
        # the planner keeps a cluster plan from rows x size >= n_sm / SPLIT_BYTES_FACTOR[op]
        least = min(getattr(cb, "SPLIT_BYTES_FACTOR", {"": 1.5}).values())
        rows += [math.ceil(n_sm / (least * sizes[-1])), -(-n_sm // sizes[0])]
    return Planner("cupy", ops, key, tuple(sorted(set(rows))), dtypes, notes)


def triton_planner(n_sm: int = H200_SM) -> Planner | None:
    try:
        from softmax_kernels.backends import triton_backend as tb
    except Exception as e:  # noqa: BLE001
        print(f"triton planner: triton_backend does not import ({e})")
        return None
    cfg_fn = getattr(tb, "_launch_config", None)
    if cfg_fn is None:
        return None
    names = list(getattr(tb, "_SINGLE_PASS_VALUES", None) or
                 ("softmax_fwd", "softmax_bwd", "cross_entropy", "cross_entropy_soft"))  # fmt: skip
    notes, ops = [], []
    for op in names:
        # cross-entropy with and without the gradient plans apart (merge_wait: the loss alone
        # ends with the row's merge, so it takes "online" for rows of 8193-32767 elements)
        variants = (
            [{"with_grad": g} for g in (True, False)] if op.startswith("cross_entropy") else [{}]
        )
        for v in variants:
            m = _api_ops(op, v)
            if m is None:
                notes.append(f"triton op {op} is not driven (no API mapping)")
                break
            ops.append((op, v, *m))

    def key(op, variant, dtype, n_rows, n_cols, usage=None):
        c = _call(cfg_fn, n_rows, n_cols, dtype, op, n_sm, usage,
                  merge_wait=variant.get("with_grad", True))  # fmt: skip
        strategy = str(getattr(c, "strategy", c))
        stages = int(getattr(c, "num_stages", 1) or 1)
        fine = strategy + (f"+{stages}stages" if stages > 1 else "")
        return strategy, fine

    def force(strategy, op, variant, dtype):
        """(3, n_cols, fine) of the shortest odd row of at least 2 chunks + 1 element (so the
        chunk loops loop, the last chunk partial) that the planner gives ``strategy`` under
        forced_plan, whatever the compiled kernel's programs per SM (planned with the most,
        _MAX_PROGRAMS_PER_SM: the fused split's widest grid); None: none up to MAX_COLS."""
        if strategy not in FORCED_LIMITS or not hasattr(tb, "_ITEMSIZE"):
            return None
        itemsize = tb._ITEMSIZE[dtype]
        n_cols = 2 * (8192 // itemsize) + 1
        with forced_plan(strategy, record=False):
            while n_cols <= MAX_COLS:
                if key(op, variant, dtype, 3, n_cols, _most_programs)[0] == strategy:
                    fine = key(op, variant, dtype, 3, n_cols)
                    return (3, n_cols, fine[1]) if fine[0] == strategy else None
                n_cols += 2
        return None

    # one row; a few (a program per row); enough for several rows per program; enough for a
    # persistent program to have a next tile (software pipelining)
    rows = (1, 3, 2 * n_sm + 1, 64 * n_sm + 1)
    return Planner("triton", ops, key, rows, DTYPES, notes, tuple(FORCED_LIMITS), force)


def _most_programs(cfg) -> dict:
    """A usage() for _launch_config: a kernel so small that an SM holds the most programs."""
    return {"regs": 32, "shared": 0, "spill_bytes": 0}


# Triton's "online" plan: since rows are split (issue 12) the planner takes it for the softmax
# ops and cross-entropy with a gradient only where the fused split cannot be co-resident, from
# ~133 rows of 512K-1M columns (~10**8 elements: far past MAX_ELEMS, minutes under racecheck).
# Its kernel instance (chunk, warps, chunks in flight: _ONLINE_PLAN) does not depend on the row
# length, so the driver reaches it at 3 rows of ~8K columns by lowering the limits that keep a
# row in one pass or one split (as tests/test_triton_backend.py does): a split of 16-word
# segments then needs more programs than the GPU holds, so the planner falls back to online.
FORCED_LIMITS = {"online": {"_SINGLE_PASS_WORDS": 16, "_SPLIT_WORDS": 16}}


@contextlib.contextmanager
def forced_plan(strategy: str, n_sm: int | None = None, record: bool = True):
    """Within: triton_backend's planner with FORCED_LIMITS[strategy]; yields the list of
    (op, strategy) of every _launch_config call made inside (record), so that a case can check
    that it really ran ``strategy``. n_sm: the SM count to plan for where the backend has none
    (the interpreter, which never takes online: it has no GPU to fill). Restored on exit."""
    from softmax_kernels.backends import triton_backend as tb

    limits = FORCED_LIMITS[strategy]
    saved = {k: getattr(tb, k) for k in limits}
    orig = tb._launch_config
    seen: list[tuple[str, str]] = []

    def spy(n_rows, n_cols, dtype, op, sm=None, *args, **kw):
        cfg = orig(n_rows, n_cols, dtype, op, sm if sm is not None else n_sm, *args, **kw)
        seen.append((op, cfg.strategy))
        return cfg

    try:
        for k, v in limits.items():
            setattr(tb, k, v)
        if record:
            tb._launch_config = spy
        yield seen
    finally:
        tb._launch_config = orig
        for k, v in saved.items():
            setattr(tb, k, v)


def _samples(max_cols: int) -> list[int]:
    s = set(range(1, min(1024, max_cols) + 1))
    k = 10
    while (1 << k) <= max_cols:
        for v in ((1 << k) - 1, 1 << k, (1 << k) + 1, 3 << (k - 1)):
            if v <= max_cols:
                s.add(v)
        k += 1
    return sorted(s)


def segments(
    key_of: Callable[[int], object], max_cols: int = MAX_COLS
) -> list[tuple[object, int, int]]:
    """[(key, lo, hi)]: maximal runs of row lengths with one key, boundaries exact (bisected
    between samples; a key that appears and vanishes between two samples would be missed, so
    samples are dense up to 1024 and around every power of two)."""
    xs = _samples(max_cols)
    ks = [key_of(x) for x in xs]
    out: list[list] = [[ks[0], xs[0], xs[0]]]
    pairs = list(zip(xs, ks, strict=True))
    for (a, ka), (b, kb) in zip(pairs, pairs[1:], strict=False):
        if ka == kb:
            out[-1][2] = b
            continue
        lo, hi = a, b  # key_of(lo) == ka != key_of(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if key_of(mid) == ka:
                lo = mid
            else:
                hi = mid
        out[-1][2] = lo
        kh = key_of(hi)
        if kh != kb:  # a third key between the samples: keep it, then go on to b's
            out.append([kh, hi, hi])
            lo2, hi2 = hi, b
            while hi2 - lo2 > 1:
                mid = (lo2 + hi2) // 2
                if key_of(mid) == kh:
                    lo2 = mid
                else:
                    hi2 = mid
            out[-1][2] = lo2
            out.append([kb, hi2, b])
        else:
            out.append([kb, hi, b])
    return [tuple(s) for s in out]


def _key_at(key, op, variant, dtype, n_rows, n_cols):
    return key(op, variant, dtype, n_rows, n_cols)


def _odd_in(lo: int, hi: int) -> int:
    if lo % 2 == 1 or lo == hi:
        return lo
    return lo + 1


def plan_cases(planners: list[Planner], max_cols: int = MAX_COLS,
               max_elems: int = MAX_ELEMS) -> tuple[list[Case], list[str]]:  # fmt: skip
    cases: list[Case] = []
    notes: list[str] = []
    for pl in planners:
        notes += pl.notes
        for op, variant, api_ops, extra in pl.ops:
            for dtype in pl.dtypes:
                fine_real: dict[str, list[tuple[int, int, int, str]]] = {}
                for r in pl.rows:
                    segs = segments(
                        functools.partial(_key_at, pl.plan_key, op, variant, dtype, r), max_cols
                    )
                    for (coarse, fine), lo, hi in segs:
                        fine_real.setdefault(fine, []).append((r, lo, hi, coarse))
                coarse_first: dict[str, tuple[int, int]] = {}
                realised = {c for reals in fine_real.values() for r, lo, hi, c in reals
                            if r * _odd_in(lo, hi) <= max_elems}  # fmt: skip
                forced = {}
                for st in pl.forcible:
                    got = pl.force(st, op, variant, dtype) if st not in realised else None
                    if got is not None and got[0] * got[1] <= max_elems:
                        forced[st] = got
                        cases += _forced_cases(pl.backend, op, api_ops, extra, dtype, st, *got)
                for fine, reals in sorted(fine_real.items()):
                    small = [(r * _odd_in(lo, hi), r, _odd_in(lo, hi), c) for r, lo, hi, c in reals]
                    small = [s for s in small if s[0] <= max_elems]
                    if not small:
                        st = reals[0][3]
                        how = (f"driven at {forced[st][0]}x{forced[st][1]} with the planner's "
                               f"limits lowered (forced_plan)" if st in forced
                               else "not driven")  # fmt: skip
                        what = f"{pl.backend} {op} {_vname(variant)}{dtype} {fine}"
                        notes.append(f"{what}: every realisation exceeds {max_elems} elements, "
                                     f"{how}")  # fmt: skip
                        continue
                    _, r_a, n_a, coarse = min(small)
                    picks = [(r_a, n_a)]
                    edge = [(hi, -r, r) for r, lo, hi, _ in reals if r * hi <= max_elems]
                    if edge:
                        hi, _, r_b = max(edge)
                        if (r_b, hi) != (r_a, n_a):
                            picks.append((r_b, hi))
                    for k, (r, n) in enumerate(picks):
                        for j, aop in enumerate(api_ops):
                            # the first API op at every pick; the others at the small pick
                            if j and k:
                                continue
                            cases.append(Case(pl.backend, aop, dtype, r, n, "contig", extra,
                                              f"{op} {fine}", 0 if j == 0 else 1))  # fmt: skip
                    cur = coarse_first.get(coarse)
                    if cur is None or r_a * n_a < cur[0] * cur[1]:
                        coarse_first[coarse] = (r_a, n_a)
                for coarse, (r, n) in sorted(coarse_first.items()):
                    cases += _layout_cases(
                        pl.backend, api_ops, extra, dtype, r, n, f"{op} {coarse}"
                    )
                    cases += _option_cases(
                        pl.backend, api_ops, extra, dtype, r, n, f"{op} {coarse}"
                    )
    seen, uniq = set(), []
    for c in cases:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    uniq.sort(key=lambda c: (c.priority, c.backend, c.op, c.dtype, c.n_cols, c.n_rows, c.layout))
    return uniq, notes


def _vname(variant: dict) -> str:
    return "".join(f"{k}={v} " for k, v in sorted(variant.items()))


def _forced_cases(backend, op, api_ops, extra, dtype, strategy, r, n, fine) -> list[Case]:
    """A forced strategy's cases: every API op contiguous (the first at priority 0), then, as
    for the planner's own strategies, the misaligned / strided layouts and the options (masks,
    weights, ...), all run under forced_plan(strategy)."""
    covers = f"{op} {fine}"
    out = [Case(backend, aop, dtype, r, n, "contig", extra, covers, 0 if j == 0 else 1, strategy)
           for j, aop in enumerate(api_ops)]  # fmt: skip
    out += _layout_cases(backend, api_ops, extra, dtype, r, n, covers, strategy)
    out += _option_cases(backend, api_ops, extra, dtype, r, n, covers, strategy)
    return out


def _layout_cases(backend, api_ops, extra, dtype, r, n, covers, forced="") -> list[Case]:
    if dtype not in LAYOUT_DTYPES:
        return []
    aop = api_ops[0]
    out = [Case(backend, aop, dtype, r, n, lay, extra, covers, 1, forced)
           for lay in ("offset", "offset-out", "rowpad")]  # fmt: skip
    if dtype == "float32":
        # more rows (67) where the element budget allows: a CuPy array of several row blocks
        rows = max(r, min(67, MAX_ELEMS // n))
        out.append(Case(backend, aop, dtype, rows, n, "cupy-array", extra, covers, 1, forced))
    return out


def _option_cases(backend, api_ops, extra, dtype, r, n, covers, forced="") -> list[Case]:
    if dtype not in OPTION_DTYPES:
        return []
    out = []
    for aop in api_ops:
        sets: list[tuple] = []
        if aop in ("softmax", "log_softmax"):
            sets = [(("mask", "row"), ("scale", 0.5)), (("mask", "full"),)]
        elif aop.endswith("backward"):
            sets = [(("scale", 2.0),)]
        elif aop in ("ce", "ce_grad"):
            soft = dict(extra).get("soft", False)
            base = (("label_smoothing", 0.1), ("reduction", "sum"), ("weight", True),
                    ("z_loss", 0.001))  # fmt: skip
            sets = [base]
            if not soft:
                sets.append((("bad", True), ("ignore", True), ("reduction", "none")))
            if aop == "ce_grad":
                sets.append((("inplace", True), ("reduction", "mean")))
            sets.append((("return_lse", True), ("softcap", 30.0)))
        for s in sets:
            opts = tuple(sorted(dict(extra + s).items()))
            out.append(Case(backend, aop, dtype, max(r, 5), n, "contig", opts, covers, 2, forced))
    return out


# ----------------------------------------------------------------------------------------------
# Running the cases


class Runner:
    def __init__(self, device: str = "cuda"):
        os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")
        import numpy as np
        import torch

        import softmax_kernels as sk

        self.np, self.torch, self.sk, self.device = np, torch, sk, device
        self.n_sm = _device_limits()[0]  # what forced cases are planned for (forced_plan)
        self.cupy = None
        try:
            import cupy

            if device == "cuda":
                cupy.cuda.set_allocator(None)  # every array its own cudaMalloc: memcheck sees it
                cupy.cuda.set_pinned_memory_allocator(None)
            self.cupy = cupy
        except Exception:  # noqa: BLE001 - CuPy missing: its cases are reported as such
            self.cupy = None
        self.avail = set(sk.available_backends())
        self.sig = {f: set(inspect.signature(getattr(sk, f)).parameters)
                    for f in ("cross_entropy", "cross_entropy_with_grad", "softmax")}  # fmt: skip

    # -- arrays --------------------------------------------------------------------------------
    def tdtype(self, dtype: str):
        return getattr(self.torch, dtype)

    def rounded(self, a64, dtype):
        """a64 rounded to dtype, back in float64 (the values the kernel sees)."""
        t = self.torch.from_numpy(a64).to(self.tdtype(dtype))
        return t.to(self.torch.float64).numpy()

    def put(self, a64, dtype: str, layout: str):
        """A device array holding a64 in dtype, laid out as the case says. Views end where
        their allocation ends."""
        torch = self.torch
        r, c = a64.shape
        host = torch.from_numpy(a64).to(self.tdtype(dtype))
        if layout in ("offset", "offset-out"):
            base = torch.empty(r * c + 1, dtype=host.dtype)
            base[1:] = host.reshape(-1)
            return base.to(self.device)[1:].view(r, c)
        if layout == "rowpad":
            base = torch.empty(r, c + 1, dtype=host.dtype)
            base[:, 1:] = host
            return base.to(self.device)[:, 1:]
        return host.to(self.device)

    def empty_like_layout(self, x, layout: str):
        torch = self.torch
        r, c = x.shape
        if layout == "offset-out":
            return torch.empty(r * c + 1, dtype=x.dtype, device=x.device)[1:].view(r, c)
        if layout == "rowpad":
            return torch.empty(r, c + 1, dtype=x.dtype, device=x.device)[:, 1:]
        return None

    def host64(self, a):
        torch = self.torch
        if self.cupy is not None and type(a).__module__.split(".")[0] == "cupy":
            a = torch.from_dlpack(a)
        if isinstance(a, torch.Tensor):
            return a.detach().to(torch.float64).cpu().numpy()
        return self.np.asarray(a, dtype=self.np.float64)

    def as_cupy(self, t):
        return self.cupy.from_dlpack(t)

    # -- one case ------------------------------------------------------------------------------
    def run(self, case: Case) -> dict:
        if not case.forced:
            return self._run(case)
        # the planner's limits lowered for this call only; the plan it really took is checked,
        # so that a change of the planner cannot turn the case into one of another strategy
        with forced_plan(case.forced, n_sm=self.n_sm) as seen:
            res = self._run(case)
        main = [st for op, st in seen if op != "cross_entropy_denom"]
        if not main or any(st != case.forced for st in main):
            raise AssertionError(f"forced {case.forced}: the planner gave {seen}")
        return res

    def _run(self, case: Case) -> dict:
        np, sk, torch = self.np, self.sk, self.torch
        rng = np.random.default_rng(zlib.crc32(case.name.encode()))
        r, c = case.n_rows, case.n_cols
        opts = dict(case.options)
        b = case.backend
        x64 = rng.standard_normal((r, c)) * 3.0
        res: dict = {"case": case.name}
        if case.op in ("softmax", "log_softmax"):
            x = self.put(x64, case.dtype, case.layout)
            xr = self.rounded(x64, case.dtype)
            kw, kw64 = {}, {}
            if "scale" in opts:
                kw["scale"] = kw64["scale"] = opts["scale"]
            if "mask" in opts:
                m = rng.random((1, c) if opts["mask"] == "row" else (r, c)) > 0.3
                if opts["mask"] == "full":
                    m[0, :] = False  # a fully masked row: all 0 / all -inf
                kw["where"], kw64["where"] = torch.from_numpy(m).to(self.device), m
            out = self.empty_like_layout(x, case.layout)
            fn = getattr(sk, case.op)
            if case.layout == "cupy-array":
                x = self.as_cupy(x)
                kw = {k: (self.as_cupy(v) if k == "where" else v) for k, v in kw.items()}
            got = fn(x, out=out, backend=b, **kw) if out is not None else fn(x, backend=b, **kw)
            ref = fn(xr, backend="numpy", **kw64)
            return self._compare(res, case.dtype, [("y", got, ref)])
        if case.op in ("softmax_backward", "log_softmax_backward"):
            is_log = case.op.startswith("log")
            xr = x64 - x64.max(1, keepdims=True)
            lse = np.log(np.exp(xr).sum(1, keepdims=True))
            y64 = xr - lse if is_log else np.exp(xr - lse)
            dy64 = rng.standard_normal((r, c))
            y, dy = self.put(y64, case.dtype, case.layout), self.put(dy64, case.dtype, case.layout)
            kw = {"scale": opts["scale"]} if "scale" in opts else {}
            out = self.empty_like_layout(y, case.layout)
            fn = getattr(sk, case.op)
            if case.layout == "cupy-array":
                y, dy = self.as_cupy(y), self.as_cupy(dy)
            got = (
                fn(dy, y, out=out, backend=b, **kw)
                if out is not None
                else fn(dy, y, backend=b, **kw)
            )
            ref = fn(
                self.rounded(dy64, case.dtype), self.rounded(y64, case.dtype), backend="numpy", **kw
            )
            return self._compare(res, case.dtype, [("dx", got, ref)])
        return self._run_ce(case, rng, x64, opts, res)

    def _run_ce(self, case, rng, x64, opts, res):
        sk, torch = self.sk, self.torch
        r, c = case.n_rows, case.n_cols
        soft = bool(opts.get("soft"))
        grad = case.op == "ce_grad"
        fname = "cross_entropy_with_grad" if grad else "cross_entropy"
        sig = self.sig[fname]
        kw: dict = {"reduction": opts.get("reduction", "mean")}
        for k in ("label_smoothing", "z_loss", "softcap", "return_lse"):
            if k in opts:
                if k not in sig:
                    res["note"] = f"{fname} has no {k}: case run without it"
                    continue
                kw[k] = opts[k]
        kw64 = dict(kw)
        if opts.get("weight"):
            w = rng.random(c) + 0.5
            kw["weight"] = torch.from_numpy(w).to(torch.float64 if case.dtype == "float64"
                                                  else torch.float32).to(self.device)  # fmt: skip
            kw64["weight"] = w
        bad_rows: list[int] = []
        if soft:
            q = rng.random((r, c))
            q /= q.sum(1, keepdims=True)
            t = self.put(q, case.dtype, "contig")
            t64 = self.rounded(q, case.dtype)
        else:
            tt = rng.integers(0, c, size=r)
            if opts.get("ignore"):
                tt[1::3] = -100
            t64 = tt.copy()
            if opts.get("bad"):
                bad_rows = [r - 1]
                tt[r - 1] = c + 5  # out of range: NaN row, nothing read through it
                t64[r - 1] = -100
            t = torch.from_numpy(tt).to(self.device)
        x = self.put(x64, case.dtype, "offset" if case.layout == "offset-out" else case.layout)
        xr = self.rounded(x64, case.dtype)
        if case.layout == "offset-out" or opts.get("inplace"):
            if grad:
                kw["inplace"] = True
        if case.layout == "cupy-array":
            x, t = self.as_cupy(x), self.as_cupy(t)
            if "weight" in kw:
                kw["weight"] = self.as_cupy(kw["weight"])
        got = getattr(sk, fname)(x, t, backend=case.backend, **kw)
        ref = getattr(sk, fname)(xr, t64, backend="numpy", **kw64)
        pairs = []
        if grad:
            (loss, *rest_g), (rloss, *rest_r) = _split_ce(got, True), _split_ce(ref, True)
        else:
            (loss, *rest_g), (rloss, *rest_r) = _split_ce(got, False), _split_ce(ref, False)
        pairs.append(("loss", loss, rloss))
        names = (["grad"] if grad else []) + (["lse"] if kw.get("return_lse") else [])
        pairs += list(zip(names, rest_g, rest_r, strict=False))
        scale = float(r) if grad and kw["reduction"] == "mean" else 1.0
        return self._compare(res, case.dtype, pairs, bad_rows=bad_rows, grad_scale=scale)

    def _compare(self, res, dtype, pairs, bad_rows=(), grad_scale=1.0):
        np = self.np
        atol, rtol = TOL[dtype]
        worst = 0.0
        for name, got, ref in pairs:
            g, rf = self.host64(got), np.asarray(self.host64(ref), dtype=np.float64)
            if name == "grad":
                g, rf = g * grad_scale, rf * grad_scale
            if bad_rows and g.ndim >= 1 and g.shape[:1] == rf.shape[:1]:
                keep = np.ones(g.shape[0], bool)
                keep[list(bad_rows)] = False
                if not np.all(np.isnan(g[~keep])):
                    res.setdefault("problems", []).append(f"{name}: bad-target row not NaN")
                    worst = math.inf
                g, rf = g[keep], rf[keep]
            a, rt = (atol, rtol) if name in ("y", "dx", "grad") else _loss_tol(dtype)
            with np.errstate(invalid="ignore"):
                err = np.abs(g - rf)  # inf - inf: NaN, handled below
            same = (g == rf) | (np.isnan(g) & np.isnan(rf))
            err = np.where(same, 0.0, err)
            err = np.where(np.isnan(err), np.inf, err)
            ratio = (
                float((err / (a + rt * np.abs(np.where(np.isfinite(rf), rf, 0.0)))).max())
                if err.size
                else 0.0
            )
            worst = max(worst, ratio)
        res["err_ratio"] = worst
        res["ok"] = worst <= 1.0
        return res


def _loss_tol(dtype):
    # losses and lse are computed and returned in float32 for half types (float64 for float64)
    return TOL["float64"] if dtype == "float64" else TOL["float32"]


def _split_ce(v, grad: bool):
    """(loss, grad?, lse?) of a cross-entropy return value, whatever its nesting."""
    if not isinstance(v, tuple | list):
        return [v]
    flat = []
    for x in v:
        if isinstance(x, tuple | list):
            flat += list(x)
        else:
            flat.append(x)
    return flat


def _wait_for(path: str | None, limit_s: float, log) -> None:
    t0 = time.time()
    while path and not os.path.exists(path) and time.time() - t0 < limit_s:
        time.sleep(0.2)
    if time.time() - t0 > 1:
        log(f"waited {time.time() - t0:.0f} s for {path}")


def run_cases(cases: list[Case], max_seconds: float, device: str = "cuda", log=print,
              wait_file: str | None = None, stop_at: float | None = None) -> dict:  # fmt: skip
    """Run the cases in order for at most max_seconds and not past the wall-clock time stop_at
    (the session's deadline, start-up under a sanitizer included); CuPy-backend cases wait for
    wait_file (the session's NVRTC warm-up marker) first."""
    t0 = time.time()
    if stop_at is not None:
        max_seconds = min(max_seconds, stop_at - t0)
    runner = Runner(device)
    waited = False
    rep = {"cases": len(cases), "ran": 0, "mismatch": 0, "error": 0, "not_run": 0,
           "unavailable": 0, "mismatches": [], "errors": [], "by_strategy": {}}  # fmt: skip
    sticky = None
    for i, case in enumerate(cases):
        if time.time() - t0 > max_seconds or sticky:
            rep["not_run"] = len(cases) - i
            log(f"stopping: {'sticky CUDA error' if sticky else 'time'}; "
                f"{len(cases) - i} cases not run")  # fmt: skip
            break
        if case.backend not in runner.avail:
            rep["unavailable"] += 1
            continue
        if case.layout == "cupy-array" and runner.cupy is None:
            rep["unavailable"] += 1
            continue
        if case.backend == "cupy" and not waited:
            waited = True
            _wait_for(wait_file, max(0.0, max_seconds - (time.time() - t0)), log)
        try:
            res = runner.run(case)
            if device == "cuda":
                runner.torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - recorded; the sanitizer's verdict is the point
            msg = f"{case.name}: {type(e).__name__}: {str(e)[:300]}"
            log("ERROR " + msg)
            traceback.print_exc(limit=3)
            rep["error"] += 1
            rep["errors"].append(msg)
            low = str(e).lower()
            if any(p in low for p in ("illegal", "misaligned", "launch failure")):
                sticky = msg
            continue
        rep["ran"] += 1
        k = f"{case.backend} {case.covers.split(' ')[-1]}"
        rep["by_strategy"][k] = rep["by_strategy"].get(k, 0) + 1
        if not res["ok"]:
            rep["mismatch"] += 1
            rep["mismatches"].append(f"{case.name}: err/tol {res['err_ratio']:.3g} "
                                     f"{res.get('problems', '')}")  # fmt: skip
            log(f"MISMATCH {case.name}: err/tol {res['err_ratio']:.3g}")
    rep["elapsed_s"] = round(time.time() - t0, 1)
    rep["sticky"] = sticky
    return rep


def _device_limits() -> tuple[int, int]:
    """(SM count, opt-in shared memory per block) of GPU 0, or the H200's without one."""
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            smem = getattr(p, "shared_memory_per_block_optin", None) or H200_SMEM_OPTIN
            return int(p.multi_processor_count), int(smem)
    except Exception:  # noqa: BLE001
        pass
    return H200_SM, H200_SMEM_OPTIN


def planners_for(n_sm: int | None = None, smem: int | None = None) -> list[Planner]:
    if n_sm is None or smem is None:
        d_sm, d_smem = _device_limits()
        n_sm, smem = n_sm or d_sm, smem or d_smem
    return [p for p in (triton_planner(n_sm), cupy_planner(smem, n_sm)) if p is not None]


def build_plan(n_sm: int | None = None, smem: int | None = None,
               max_cols: int = MAX_COLS) -> tuple[list[Case], list[str]]:  # fmt: skip
    return plan_cases(planners_for(n_sm, smem), max_cols)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", action="store_true", help="print the cases, run nothing")
    ap.add_argument("--json", action="store_true", help="--plan as JSON")
    ap.add_argument("--run", action="store_true", help="run the cases (a GPU)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu (Triton interpreter, tests)")
    ap.add_argument("--part", default="0/1", help="I/N: every N-th case from the I-th")
    ap.add_argument("--max-seconds", type=float, default=1e9)
    ap.add_argument("--max-cases", type=int, default=None)
    ap.add_argument("--max-elems", type=int, default=None, help="only cases this small")
    ap.add_argument("--n-sm", type=int, default=None)
    ap.add_argument("--smem-limit", type=int, default=None)
    ap.add_argument("--max-cols", type=int, default=MAX_COLS, help="longest row scanned")
    ap.add_argument("--report", help="write the run's summary as JSON")
    ap.add_argument("--wait-file", help="before the first CuPy-backend case, wait for it")
    ap.add_argument("--stop-at", type=float, help="wall-clock time (epoch s) to stop by")
    a = ap.parse_args(argv)
    cases, notes = build_plan(a.n_sm, a.smem_limit, a.max_cols)
    if a.max_elems:
        cases = [c for c in cases if c.n_rows * c.n_cols <= a.max_elems]
    i, n = (int(v) for v in a.part.split("/"))
    cases = cases[i::n]
    if a.max_cases is not None:
        cases = cases[: a.max_cases]
    if a.plan or not a.run:
        if a.json:
            print(json.dumps({"cases": [asdict(c) for c in cases], "notes": notes}))
            return 0
        by: dict[str, int] = {}
        for c in cases:
            k = f"{c.backend} {c.covers.split(' ')[0]} {c.covers.split(' ')[-1]} p{c.priority}"
            by[k] = by.get(k, 0) + 1
        for k, v in sorted(by.items()):
            print(f"{k:50s} {v}")
        for c in cases:
            print(f"p{c.priority} {c.name}  [{c.covers}]")
        for note in notes:
            print("note:", note)
        print(f"{len(cases)} cases")
        return 0
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("no CUDA GPU visible to torch: nothing to run (--device cpu runs the Triton "
                  "interpreter and the NumPy backend)")  # fmt: skip
            if a.report:
                none = {"cases": len(cases), "ran": 0, "error": 1, "notes": ["no CUDA GPU"]}
                Path(a.report).write_text(json.dumps(none))
            return 2
    rep = run_cases(cases, a.max_seconds, a.device, wait_file=a.wait_file, stop_at=a.stop_at)
    rep["notes"] = notes
    print(json.dumps({k: v for k, v in rep.items() if k not in ("mismatches", "errors")}))
    for m in rep["mismatches"][:50] + rep["errors"][:50]:
        print(m)
    if a.report:
        Path(a.report).write_text(json.dumps(rep, indent=1))
    return 0 if not (rep["mismatch"] or rep["error"] or rep["sticky"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
