"""What the benchmark measures: the ops, their minimum memory traffic, the dtypes, the shape grids
and, per op, which grids and dtypes a default run covers (GPU and CPU), plus a rough model of how
long a plan takes. Nothing here imports torch: ``python -m bench --help`` and ``--list`` work
with NumPy alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

OPS = (
    "softmax_fwd",
    "softmax_bwd",
    "log_softmax_fwd",
    "log_softmax_bwd",
    "ce_fwd",
    "ce_fwd_grad",
)

# Minimum memory traffic per op, in units of (elements x itemsize): what an ideal fused kernel
# must move, so GB/s from these counts is comparable with a copy's.
#   fwd: reads x, writes y                       2
#   bwd: reads dy and y, writes dx               3
#   ce_fwd: reads the logits (targets, loss: O(rows), not counted)   1
#   ce_fwd_grad: reads the logits, writes the gradient               2
TRAFFIC = {
    "softmax_fwd": 2,
    "log_softmax_fwd": 2,
    "softmax_bwd": 3,
    "log_softmax_bwd": 3,
    "ce_fwd": 1,
    "ce_fwd_grad": 2,
}

# Short names on the command line -> dtype names of the contract.
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}

# The contract's accuracy bound against a float64 reference: |out - ref| <= atol + rtol * |ref|.
TOLERANCES = {
    "fp64": (1e-12, 1e-12),
    "fp32": (1e-6, 1e-5),
    "fp16": (1e-3, 1e-3),
    "bf16": (8e-3, 1.6e-2),
}


def _tritonbench(step: int) -> list[tuple[int, int]]:
    # tritonbench's softmax sweep: 4096 rows, 256 .. 12672 columns, plus sizes that are not a
    # multiple of 16 or sit just past a power of two (masking and block-size edges).
    cols = set(range(256, 12672 + 1, step)) | {1000, 1025, 2045, 2049, 3000}
    return [(4096, c) for c in sorted(cols)]


GPU_GRIDS: dict[str, list[tuple[int, int]]] = {
    # quack's sweep (Dao-AILab/quack README): 32768 rows up to 2**31 elements, then fewer rows.
    "quack": [(32768, 1 << k) for k in range(8, 17)] + [(16384, 131072), (8192, 262144)],
    "tritonbench": _tritonbench(128),
    # every 4th tritonbench size (step 512) plus the odd sizes: the default run's share of it.
    "tritonbench-lite": _tritonbench(512),
    # LLM vocabularies (Llama-2, GPT-2, Llama-3, Qwen-2, Gemma) at training token counts.
    "llm-ce": [(r, c) for r in (4096, 8192, 16384) for c in (32000, 50257, 128256, 151936, 256000)],
    # few, long rows: the GPU is filled only if a row is split over several blocks.
    "few-rows": [(r, c) for r in (1, 8, 128) for c in (65536, 262144)],
    # the --quick subset.
    "gpu-quick": [(32768, 1024), (32768, 16384), (4096, 128256)],
}

CPU_GRIDS: dict[str, list[tuple[int, int]]] = {
    # The CPU target's five shapes (bench/report.py CPU_TARGET): square, many short rows, an LLM
    # vocabulary, few long rows, very few very long rows (8-33M elements each).
    "cpu": [(4096, 4096), (32768, 256), (1024, 32000), (64, 262144), (8, 1048576)],
    # small shapes: an ImageNet-sized classifier and a quick long-row point.
    "cpu-small": [(1024, 1000), (8, 262144)],
    "cpu-quick": [(4096, 4096), (1024, 1000)],
}

GRIDS = {**GPU_GRIDS, **CPU_GRIDS}

# Default plans: op -> {grid: dtypes}. The GPU default fits in about 8 minutes on an H100 (see
# estimate_seconds and bench/NOTES.md): every op on quack's grid in bf16, softmax forward in all
# three dtypes and on the tritonbench and few-row sweeps, the CE ops on the LLM vocabularies.
GPU_DEFAULT_PLAN: dict[str, dict[str, tuple[str, ...]]] = {
    "softmax_fwd": {
        "quack": ("bf16", "fp16", "fp32"),
        "tritonbench-lite": ("bf16",),
        "few-rows": ("bf16",),
    },
    "log_softmax_fwd": {"quack": ("bf16",)},
    "softmax_bwd": {"quack": ("bf16", "fp32")},
    "log_softmax_bwd": {"quack": ("bf16",)},
    "ce_fwd": {"quack": ("bf16",), "llm-ce": ("bf16",)},
    "ce_fwd_grad": {"quack": ("bf16",), "llm-ce": ("bf16",)},
}
GPU_QUICK_PLAN = {op: {"gpu-quick": ("bf16",)} for op in OPS}

CPU_DEFAULT_PLAN = {op: {"cpu": ("fp32", "fp64", "fp16")} for op in OPS}
CPU_QUICK_PLAN = {op: {"cpu-quick": ("fp32",)} for op in OPS}

GPU_DEFAULT_DTYPES = ("bf16", "fp16", "fp32")
CPU_DEFAULT_DTYPES = ("fp32", "fp64", "fp16")

# Shapes the markdown summary lists point by point (when measured).
KEY_SHAPES = {
    "cpu": [(4096, 4096), (1024, 32000)],
    "cuda": [(32768, 4096), (32768, 65536), (8192, 128256), (16384, 256000)],
}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'64x100,3x7' -> [(64, 100), (3, 7)]."""
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            r, c = part.lower().split("x")
            shape = (int(r), int(c))
        except ValueError:
            raise ValueError(f"bad shape {part!r}: expected ROWSxCOLS, e.g. 4096x4096") from None
        if shape[0] < 1 or shape[1] < 1:
            raise ValueError(f"bad shape {part!r}: rows and columns must be >= 1")
        out.append(shape)
    if not out:
        raise ValueError("--shapes needs at least one ROWSxCOLS")
    return out


@dataclass(frozen=True)
class Point:
    """One (op, dtype, shape) to measure; ``grids`` names every grid that asked for it."""

    op: str
    dtype: str
    n_rows: int
    n_cols: int
    grids: tuple[str, ...] = field(default=(), compare=False)

    @property
    def elements(self) -> int:
        return self.n_rows * self.n_cols

    @property
    def bytes(self) -> int:
        return TRAFFIC[self.op] * self.elements * ITEMSIZE[self.dtype]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.n_cols)


def build_plan(
    device: str,
    *,
    quick: bool,
    ops: list[str] | None,
    dtypes: list[str] | None,
    grids: list[str] | None,
    shapes: list[tuple[int, int]] | None,
) -> tuple[dict[str, dict[str, tuple[str, ...]]], dict[str, list[tuple[int, int]]]]:
    """The plan (op -> {grid: dtypes}) and the grids it uses.

    Without --grid/--shapes each op gets its default grids; --dtypes then replaces the dtypes of
    every entry. With --grid or --shapes every selected op runs on those grids in --dtypes (or
    the device's default dtypes)."""
    gpu = device == "cuda"
    if gpu:
        base = GPU_QUICK_PLAN if quick else GPU_DEFAULT_PLAN
    else:
        base = CPU_QUICK_PLAN if quick else CPU_DEFAULT_PLAN
    ops = list(ops or OPS)
    table = dict(GRIDS)
    if shapes:
        table["custom"] = list(shapes)
    if grids or shapes:
        names = list(grids or []) + (["custom"] if shapes else [])
        dts = tuple(dtypes or (GPU_DEFAULT_DTYPES if gpu else CPU_DEFAULT_DTYPES))
        plan = {op: {g: dts for g in names} for op in ops}
    else:
        plan = {}
        for op in ops:
            entry = {}
            for g, dts in base[op].items():
                entry[g] = tuple(dtypes) if dtypes else dts
            plan[op] = entry
    used = {g: table[g] for entry in plan.values() for g in entry}
    return plan, used


def plan_points(plan, grid_table) -> list[Point]:
    """The distinct points of a plan, ordered by dtype, shape and op so that the data and the
    copy reference of one (dtype, shape) are made once. A point asked for by two grids is
    measured once and carries both names."""
    seen: dict[tuple, list[str]] = {}
    for op, entry in plan.items():
        for g, dts in entry.items():
            for dt in dts:
                for r, c in grid_table[g]:
                    names = seen.setdefault((op, dt, r, c), [])
                    if g not in names:
                        names.append(g)
    order = {op: i for i, op in enumerate(OPS)}
    dorder = {d: i for i, d in enumerate(DTYPES)}
    keys = sorted(seen, key=lambda k: (dorder[k[1]], k[2] * k[3], k[2], k[3], order[k[0]]))
    return [Point(op, dt, r, c, tuple(seen[(op, dt, r, c)])) for op, dt, r, c in keys]


# ----------------------------------------------------------------------------------------------
# A rough time model, to keep the default runs inside their budgets (8 min GPU, 3 min CPU).


def _timing_seconds(kernel_s: float, *, gpu: bool, quick: bool) -> float:
    """Wall time of one timer call (see bench/timing.py) for a kernel of kernel_s seconds."""
    if gpu:
        per = kernel_s + 1.2e-4  # + the L2 flush and the launch
        reps = min(200, max(10, 0.06 / per))
        return 0.03 + per * (3 + reps) + min(0.015, 50 * kernel_s)
    target, lo, hi = (0.05, 3, 20) if quick else (0.25, 5, 50)
    reps = min(hi, max(lo, target / max(kernel_s, 1e-9)))
    return 0.002 + kernel_s * (2 + reps)


def estimate_seconds(points: list[Point], providers: dict[str, list[str]], device: str,
                     quick: bool = False) -> float:  # fmt: skip
    """Seconds a plan should take. ``providers[op]`` lists the providers that will run the op.
    GPU: kernels at 2.5 TB/s (peers at 1.2 TB/s), torch.compile 1.5 s per compiled shape (3 s
    for forward + backward), 25 s of one-off start-up (CUDA context, imports, first compiles).
    CPU: the speeds measured on 2 EPYC cores (bench/NOTES.md): ours and torch ~4 GB/s in
    fp32/fp64 and ~2 GB/s in fp16 (the same element rate), SciPy ~2 GB/s and ~0.2 GB/s in fp16
    (NumPy's half maths), plus the float64 reference and every provider's result check."""
    gpu = device == "cuda"
    total = 25.0 if gpu else 2.0
    copies = set()
    for p in points:
        b = p.bytes
        if gpu:
            fast, slow = b / 2.5e12, b / 1.2e12
            total += 0.02 + 3 * p.elements * ITEMSIZE[p.dtype] / 4e11  # data + reference
        else:
            half = p.dtype not in ("fp32", "fp64")
            fast, slow = b / (2e9 if half else 4e9), b / (2e8 if half else 2e9)
            total += 0.002 + 3 * p.elements * 8 / 1e9  # data + float64 reference
        for name in providers.get(p.op, []):
            # GPU: the peers slower than ours; CPU: SciPy slower than ours and torch
            if gpu:
                k = fast if name.startswith("ours") else slow
            else:
                k = slow if name == "scipy" else fast
            total += _timing_seconds(k, gpu=gpu, quick=quick)
            total += (2 * p.elements * ITEMSIZE[p.dtype] / (4e11 if gpu else 1e9)) + 0.002
            if name == "torch.compile":
                total += 3.0 if p.op == "ce_fwd_grad" else 1.5
        key = (p.dtype, p.n_rows, p.n_cols)
        if key not in copies:
            copies.add(key)
            copy_s = 2 * p.elements * ITEMSIZE[p.dtype] / (2.8e12 if gpu else 1.5e10)
            total += _timing_seconds(copy_s, gpu=gpu, quick=quick)
    return total
