"""The static performance model, without a GPU: ``python -m bench --model``.

For every point of the default GPU plan (op, dtype, shape), the few-row grid and the long rows
(8 x 262144, 16384 x 131072, 4096 x 1M), in bfloat16 and float32, it asks each GPU backend's
pure planner ``static_model(op, dtype_name, n_rows, n_cols, *, sm_count, [smem_limit,] soft,
with_grad, reduction) -> dict`` (``softmax_kernels.backends.triton_backend`` and
``cupy_backend``; neither needs a GPU or CuPy) and prints, per backend: the strategy it picks,
the bytes it moves over the op's minimum (forward 2n, backward 3n, CE forward n, CE forward +
gradient 2n), launches per call, programs (blocks) per SM, SMs used, registers and spills, and
for CUDA the SASS instructions per element of the hot loop. Then the static targets of issues
11 and 12, counted over the table. ``--write`` also writes it to ``<out>/model.md``.

The planners' dictionaries may name things differently or leave some out: each column takes
the first of several key names it knows (``KEYS``), derives what it can (bytes over minimum from
bytes and minimum bytes, SMs used from the grid), and shows "n/a" for the rest; keys no column
takes are listed under "other". A backend without ``static_model`` gets a row of "n/a" saying
so.
"""

from __future__ import annotations

import importlib
import inspect
import math
import time
from collections.abc import Callable
from typing import Any

from . import grids as G

BACKENDS = ("triton", "cupy")
SM_COUNT = 132  # H100 SXM / H200
SMEM_LIMIT = 232448  # sm_90: 227 KB of opt-in shared memory per block
LONG_ROWS = [(8, 262144), (16384, 131072), (4096, 1 << 20)]
EXTRA_DTYPES = ("bf16", "fp32")

# The backend's name of each bench op, with the keyword arguments that select it; the first
# the planner accepts is used (a ValueError / KeyError / NotImplementedError means "not this
# name"). Keyword arguments the planner's signature does not have rule a candidate out.
OP_CANDIDATES: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "softmax_fwd": [("softmax_fwd", {}), ("softmax", {})],
    # log_softmax is a flag of the softmax kernels in both backends (same plan, same traffic):
    # planned as softmax where the planner has no name or flag for it ("planned_as" says so)
    "log_softmax_fwd": [("log_softmax_fwd", {}), ("softmax_fwd", {"is_log": True}),
                        ("softmax_fwd", {"log": True}), ("softmax_fwd", {})],
    "softmax_bwd": [("softmax_bwd", {}), ("softmax_backward", {})],
    "log_softmax_bwd": [("log_softmax_bwd", {}), ("softmax_bwd", {"is_log": True}),
                        ("softmax_bwd", {"log": True}), ("softmax_bwd", {})],
    "ce_fwd": [("cross_entropy", {"with_grad": False}),
               ("cross_entropy_fwd", {"with_grad": False}), ("ce_fwd", {})],
    "ce_fwd_grad": [("cross_entropy", {"with_grad": True}),
                    ("cross_entropy_fwd", {"with_grad": True}), ("ce_fwd_grad", {})],
}  # fmt: skip

# column -> the planner keys it reads, first found wins
KEYS: dict[str, tuple[str, ...]] = {
    "strategy": ("strategy", "path", "plan"),
    "launches": ("launches", "launches_per_call", "n_launches", "kernel_launches"),
    "bytes_ratio": ("bytes_ratio", "bytes_over_min", "traffic_ratio", "bytes_over_minimum"),
    "per_sm": ("programs_per_sm", "blocks_per_sm", "ctas_per_sm", "resident_per_sm"),
    "sms_used": ("sms_used", "sm_used", "active_sms", "sms_busy"),
    "registers": ("registers", "regs", "registers_per_thread"),
    "spills": ("spills", "spill_bytes", "spill_stores"),
    "ipe": ("instructions_per_element", "instr_per_elem", "instructions_per_elem",
            "sass_per_element"),
}  # fmt: skip
BYTES_KEYS = (("bytes", "min_bytes"), ("bytes_moved", "bytes_min"),
              ("bytes_moved", "min_bytes"), ("bytes", "bytes_min"))  # fmt: skip
GRID_KEYS = ("grid", "programs", "blocks", "grid_size", "n_programs", "num_programs", "ctas")
COLUMNS = [
    ("strategy", "strategy"),
    ("launches", "launches"),
    ("bytes_ratio", "bytes / min"),
    ("per_sm", "programs (blocks) / SM"),
    ("sms_used", "SMs used"),
    ("registers", "registers"),
    ("spills", "spills"),
    ("ipe", "instr / elem"),
]
NA = "n/a"


def _by_op(points: list[G.Point]) -> list[G.Point]:
    """Points in reading order: op, dtype, then size."""
    dorder = list(G.DTYPES)
    return sorted(points, key=lambda p: (G.OPS.index(p.op), dorder.index(p.dtype),
                                         p.elements, p.n_rows))  # fmt: skip


def model_sections(ops=None, dtypes=None, grids=None) -> list[tuple[str, list[G.Point]]]:
    """(section title, points). Default: the default GPU plan, then the few-row grid and the
    long rows for every op in bf16 and fp32. With ``grids``: those grids, every op (or
    ``ops``) in ``dtypes`` (default bf16, fp32)."""
    return [(t, _by_op(p)) for t, p in _sections(ops, dtypes, grids)]


def _sections(ops, dtypes, grids) -> list[tuple[str, list[G.Point]]]:
    ops = list(ops or G.OPS)
    dts = tuple(dtypes or EXTRA_DTYPES)
    if grids:
        out = []
        for g in grids:
            plan = {op: {g: dts} for op in ops}
            out.append((f"grid {g}", G.plan_points(plan, {g: G.GRIDS[g]})))
        return out
    plan = {op: e for op, e in G.GPU_DEFAULT_PLAN.items() if op in ops}
    if dtypes:
        plan = {op: {g: tuple(d for d in ds if d in dtypes) for g, ds in e.items()}
                for op, e in plan.items()}  # fmt: skip
    used = {g: G.GRIDS[g] for e in plan.values() for g in e}
    default = G.plan_points(plan, used)
    few = G.plan_points({op: {"few-rows": dts} for op in ops}, {"few-rows": G.GRIDS["few-rows"]})
    long = G.plan_points({op: {"long-rows": dts} for op in ops}, {"long-rows": LONG_ROWS})
    return [
        ("default GPU plan (python -m bench on a GPU)", default),
        ("few rows (--grid few-rows)", few),
        ("long rows: 8 x 262144, 16384 x 131072, 4096 x 1M", long),
    ]


class Planner:
    """One backend's ``static_model``, called tolerantly and memoised."""

    def __init__(self, backend: str, sm_count: int = SM_COUNT, smem_limit: int = SMEM_LIMIT):
        self.backend = backend
        self.sm_count, self.smem_limit = sm_count, smem_limit
        self.fn: Callable | None = None
        self.problem: str | None = None
        self.params: set[str] = set()
        self.var_kw = False
        self._cache: dict[tuple, dict[str, Any]] = {}
        self._op_name: dict[str, tuple[str, dict]] = {}
        self.seconds = 0.0
        try:
            mod = importlib.import_module(f"softmax_kernels.backends.{backend}_backend")
        except Exception as e:  # noqa: BLE001 - the table says why
            self.problem = f"softmax_kernels.backends.{backend}_backend does not import: " \
                f"{type(e).__name__}: {e}"  # fmt: skip
            return
        fn = getattr(mod, "static_model", None)
        if fn is None:
            self.problem = f"{backend}_backend has no static_model() yet"
            return
        self.fn = fn
        try:
            sig = inspect.signature(fn)
            self.params = set(sig.parameters)
            self.var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        except (TypeError, ValueError):
            self.var_kw = True

    def _accepts(self, name: str) -> bool:
        return self.var_kw or name in self.params

    def __call__(self, op: str, dtype: str, n_rows: int, n_cols: int) -> dict[str, Any]:
        """The planner's dict, or {"error": why}."""
        if self.fn is None:
            return {"error": self.problem}
        key = (op, dtype, n_rows, n_cols)
        if key in self._cache:
            return self._cache[key]
        t0 = time.perf_counter()
        res = self._call(op, dtype, n_rows, n_cols)
        self.seconds += time.perf_counter() - t0
        self._cache[key] = res
        return res

    def _call(self, op, dtype, n_rows, n_cols) -> dict[str, Any]:
        base = {"sm_count": self.sm_count, "smem_limit": self.smem_limit, "soft": False,
                "reduction": "mean"}  # fmt: skip
        cands = [self._op_name[op]] if op in self._op_name else OP_CANDIDATES[op]
        errors = []
        for name, extra in cands:
            if not all(self._accepts(k) for k in extra):
                continue
            kw = {k: v for k, v in {**base, **extra}.items() if self._accepts(k)}
            try:
                out = self.fn(name, G.DTYPES[dtype], int(n_rows), int(n_cols), **kw)
            except (ValueError, KeyError, NotImplementedError) as e:
                errors.append(f"{name}: {type(e).__name__}: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - one point's failure is shown, not fatal
                return {"error": f"{name}: {type(e).__name__}: {e}"[:200]}
            self._op_name[op] = (name, extra)
            out = dict(out) if isinstance(out, dict) else {"strategy": out}
            if op.startswith("log_") and not extra and name != op:
                out["planned_as"] = name
            return out
        return {"error": ("; ".join(errors) or "no op name accepted")[:200]}


def _first(d: dict[str, Any], keys) -> tuple[str | None, Any]:
    for k in keys:
        if k in d and d[k] is not None:
            return k, d[k]
    return None, None


def normalise(d: dict[str, Any], sm_count: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(column -> value or None, the keys no column took)."""
    used: set[str] = set()
    out: dict[str, Any] = {}
    for col, keys in KEYS.items():
        k, v = _first(d, keys)
        if k is not None:
            used.add(k)
        out[col] = v
    for a, b in BYTES_KEYS:  # bytes moved and the minimum: the ratio when not given
        if isinstance(d.get(a), int | float) and isinstance(d.get(b), int | float) and d[b]:
            if out["bytes_ratio"] is None:
                out["bytes_ratio"] = d[a] / d[b]
            used |= {a, b}
            break
    if out["sms_used"] is None:
        k, grid = _first(d, GRID_KEYS)
        if isinstance(grid, int | float):
            out["sms_used"] = min(int(grid), sm_count)
            used.add(k)
    # the arguments echoed back are not news
    echo = {"error", "op", "dtype", "dtype_name", "n_rows", "n_cols", "sm_count", "smem_limit"}
    other = {k: v for k, v in d.items() if k not in used and k not in echo}
    return out, other


def fmt(col: str, v: Any) -> str:
    if v is None:
        return NA
    if isinstance(v, bool):
        return "yes" if v else "no"
    if col == "bytes_ratio" and isinstance(v, int | float):
        return f"{v:.2f}x"
    if isinstance(v, float):
        return f"{v:.3g}" if math.isfinite(v) else str(v)
    if isinstance(v, list | tuple):
        return "/".join(fmt(col, x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k} {fmt(col, x)}" for k, x in v.items())
    return str(v)


def _max_num(v) -> float | None:
    """The largest number in a value (a number, or a list / dict of numbers per kernel)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v)
    vals = v.values() if isinstance(v, dict) else v if isinstance(v, list | tuple) else []
    nums = [x for x in (_max_num(x) for x in vals) if x is not None]
    return max(nums) if nums else None


def _min_num(v) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v)
    vals = v.values() if isinstance(v, dict) else v if isinstance(v, list | tuple) else []
    nums = [x for x in (_min_num(x) for x in vals) if x is not None]
    return min(nums) if nums else None


def build(ops=None, dtypes=None, grids=None, sm_count=SM_COUNT, smem_limit=SMEM_LIMIT,
          backends=BACKENDS, planners: dict | None = None) -> dict[str, Any]:  # fmt: skip
    """The model: {"sections": [(title, [row, ...])], "planners": {...}, "targets": [...]};
    a row is one (point, backend)."""
    planners = planners or {b: Planner(b, sm_count, smem_limit) for b in backends}
    sections = []
    for title, points in model_sections(ops, dtypes, grids):
        rows = []
        for p in points:
            for b, pl in planners.items():
                raw = pl(p.op, p.dtype, p.n_rows, p.n_cols)
                cols, other = normalise(raw, sm_count)
                rows.append({"op": p.op, "dtype": p.dtype, "n_rows": p.n_rows,
                             "n_cols": p.n_cols, "backend": b, "cols": cols, "other": other,
                             "error": raw.get("error")})  # fmt: skip
        sections.append((title, rows))
    return {
        "sections": sections,
        "planners": {
            b: {"problem": pl.problem, "seconds": round(pl.seconds, 2)}
            for b, pl in planners.items()
        },  # fmt: skip
        "sm_count": sm_count,
        "smem_limit": smem_limit,
        "targets": targets(sections, sm_count),
    }


def targets(sections, sm_count: int) -> list[dict[str, Any]]:
    """The static targets of issues 11 and 12 over every row of the model: per target, the
    rows met, missed (with the first few) and without the figure (n/a)."""
    rows = [r for _, rs in sections for r in rs]
    # dedupe points listed in two sections
    seen, uniq = set(), []
    for r in rows:
        k = (r["op"], r["dtype"], r["n_rows"], r["n_cols"], r["backend"])
        if k not in seen:
            seen.add(k)
            uniq.append(r)

    def tgt(name, applies, value, ok):
        met, missed, na = 0, [], 0
        for r in uniq:
            if not applies(r):
                continue
            v = value(r)
            if v is None:
                na += 1
            elif ok(r, v):
                met += 1
            else:
                missed.append(f"{r['backend']} {r['op']} {r['dtype']} {r['n_rows']}x"
                              f"{r['n_cols']}: {fmt('x', v)}")  # fmt: skip
        return {"target": name, "met": met, "missed": len(missed), "na": na,
                "examples": missed[:8]}  # fmt: skip

    ce = ("ce_fwd", "ce_fwd_grad")
    return [
        tgt("CE: at most 2 launches per call (issue 11)", lambda r: r["op"] in ce,
            lambda r: _max_num(r["cols"]["launches"]), lambda r, v: v <= 2),
        tgt("bytes at most 1.05x the minimum up to 256K elements per row (issues 11, 12)",
            lambda r: r["n_cols"] <= 262144, lambda r: _max_num(r["cols"]["bytes_ratio"]),
            lambda r, v: v <= 1.05),
        tgt("bytes at most 1.55x the minimum beyond 256K elements per row (issue 12)",
            lambda r: r["n_cols"] > 262144, lambda r: _max_num(r["cols"]["bytes_ratio"]),
            lambda r, v: v <= 1.55),
        tgt(f"all {sm_count} SMs busy once rows have 64K elements or more (issue 12)",
            lambda r: r["n_cols"] >= 65536, lambda r: _min_num(r["cols"]["sms_used"]),
            lambda r, v: v >= sm_count),
        tgt("CUDA hot loops at most 20 instructions per element (issue 11)",
            lambda r: r["backend"] == "cupy", lambda r: _max_num(r["cols"]["ipe"]),
            lambda r, v: v <= 20),
        tgt("zero spills (issue 11)", lambda r: True, lambda r: _max_num(r["cols"]["spills"]),
            lambda r, v: v == 0),
    ]  # fmt: skip


def markdown(model: dict[str, Any], record: dict[str, Any] | None = None) -> str:
    rec = record or {}
    git = rec.get("git") or {}
    lines = [
        "## Static performance model (no GPU)",
        "",
        f"Planners' static_model() for an sm_90 GPU with {model['sm_count']} SMs and "
        f"{model['smem_limit']} bytes of shared memory per block"
        + (f"; commit `{(git.get('commit') or 'unknown')[:12]}`" if git else "")
        + (" (dirty)" if git.get("dirty") else "")
        + (f", {rec['created'][:10]}" if rec.get("created") else "")
        + ". Bytes / min: the bytes a call moves over the op's minimum (forward 2n, backward "
        "3n, CE forward n, CE forward + gradient 2n). A prediction, not a measurement: the "
        "first GPU run confirms or refutes it.",
        "",
    ]
    for b, info in model["planners"].items():
        if info["problem"]:
            lines.append(f"- **{b}: {info['problem']}**: its columns read n/a.")
    lines += ["", "### Static targets", ""]
    lines += ["| target | met | missed | n/a |", "|---|---|---|---|"]
    for t in model["targets"]:
        lines.append(f"| {t['target']} | {t['met']} | {t['missed']} | {t['na']} |")
    for t in model["targets"]:
        if t["examples"]:
            lines.append("")
            lines.append(f"Missed, {t['target']}: " + "; ".join(t["examples"])
                         + (" ..." if t["missed"] > len(t["examples"]) else ""))  # fmt: skip
    lines.append("")
    head = ["op", "dtype", "shape", "backend"] + [h for _, h in COLUMNS] + ["other"]
    for title, rows in model["sections"]:
        lines += [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r["op"], r["dtype"], f"{r['n_rows']}x{r['n_cols']}", r["backend"]]
            if r["error"] and not any(v is not None for v in r["cols"].values()):
                cells += [NA] * len(COLUMNS) + [_clip(r["error"], 90)]
            else:
                cells += [fmt(c, r["cols"][c]) for c, _ in COLUMNS]
                cells.append(_clip(", ".join(f"{k}={fmt(k, v)}" for k, v in r["other"].items()),
                                   90))  # fmt: skip
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."
