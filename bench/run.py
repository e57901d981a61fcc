"""The benchmark command: ``python -m bench`` (or ``python bench/run.py``) from the repo root.

On a CUDA GPU it runs our Triton and CuPy backends against torch eager, torch.compile, Liger-Kernel
and cupyx; on the CPU our NumPy backend against SciPy and torch CPU. Each provider's result is
checked against the float64 reference first (a mismatch is reported, not timed), then timed;
every point reports ms, GB/s and the percentage of a copy of the same size measured in the same
run. Results go to bench/results/<device>-<date>.{json,csv,md} and one PNG per grid.

Two ops have their own runners and outputs (<name>-<op>.json/.md, and a PNG for linear_ce), and
run only when --ops names them: ``linear_ce`` (fused linear + cross-entropy, forward + backward,
bench/linear_ce.py) and ``vp_ce`` (the vocabulary-parallel merge against the local kernel,
bench/vp_ce.py). ``--model`` prints the static performance model of the GPU backends
(bench/model.py), runs nothing, and writes it to <out>/model.md with --write.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import grids as G  # noqa: E402
from bench import report  # noqa: E402

# Absolute: `python -m bench` (or `python bench/run.py`) writes to the clone's bench/results
# whatever the current folder.
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
# Wall-clock budgets of a default run: past them the remaining measurements are skipped (and
# recorded as such), so a slow machine cannot overrun its slot.
# CPU: six providers per point (ours and torch, each as called and kernel only; ours on torch
# CPU tensors; SciPy), three dtypes, the five shapes of the CPU targets: about 7 minutes.
BUDGET_S = {("cuda", False): 480.0, ("cuda", True): 90.0, ("cpu", False): 600.0,
            ("cpu", True): 30.0}  # fmt: skip
# Ops with runners of their own (bench/linear_ce.py, bench/vp_ce.py): run when --ops names them.
SPECIAL_OPS = ("linear_ce", "vp_ce")


def _ensure_paths() -> None:
    """Make ``bench`` and ``softmax_kernels`` importable from a plain checkout (no install,
    no PYTHONPATH), as ``make bench`` runs it."""
    root = Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if importlib.util.find_spec("softmax_kernels") is None and (root / "python").is_dir():
        sys.path.insert(0, str(root / "python"))


def _csv_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [t for t in (s.strip() for s in text.split(",")) if t]


def parse_args(argv=None) -> argparse.Namespace:
    gpu_grids = ", ".join(G.GPU_GRIDS)
    cpu_grids = ", ".join(G.CPU_GRIDS)
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Benchmark softmax_kernels against its peers. On a CUDA GPU: ours (triton, cupy) "
            "vs torch, torch.compile, Liger-Kernel, cupyx; on the CPU: ours (numpy) vs SciPy "
            "and torch, each of ours and torch as called (fresh outputs) and kernel only "
            "(outputs preallocated). Checks every result against a float64 reference before "
            "timing it."
        ),
        epilog=(
            f"GPU grids: {gpu_grids}. CPU grids: {cpu_grids}. Without --grid/--shapes each op "
            "runs on its default grids (bench/grids.py; the GPU default takes ~6-8 min on an "
            "H100, the CPU default ~3 min on 2 cores). Outputs: OUT/<device>-<date>.json, "
            ".csv, .md and one PNG per grid."
        ),
    )
    p.add_argument(
        "--ops",
        help=f"comma list of ops (default: all of {', '.join(G.OPS)}); also "
        f"{', '.join(SPECIAL_OPS)}, which run only when named here",
    )
    p.add_argument("--dtypes", help=f"comma list of dtypes: {', '.join(G.DTYPES)}")
    p.add_argument(
        "--providers",
        help="comma list: ours, ours-numpy, ours-numpy-out, ours-triton, ours-cupy, torch, "
        "torch-out, torch.compile, liger, cupyx, scipy, or all (default: all that apply to "
        "the device; 'ours' is every ours-* of the device, kernel-only ones included); "
        "linear_ce also: ours-<backend>-autograd, torch-lce, cs231n",
    )
    p.add_argument("--grid", help="comma list of grids to run (replaces the default choice)")
    p.add_argument(
        "--shapes",
        help="custom shapes, e.g. 64x100,3x7 (grid 'custom'; replaces the default grids, "
        "adds to --grid; vp_ce: N x V); NxDxV ones, e.g. 4096x256x32000, are linear_ce's",
    )
    p.add_argument("--world", help="vp_ce: comma list of process counts / simulated shards "
                   "(default: 2,4 on the CPU, 1,2,4,8 on a GPU)")  # fmt: skip
    p.add_argument(
        "--model",
        action="store_true",
        help="print the static performance model of the GPU backends (strategy, bytes over "
        "the minimum, launches, programs per SM, SMs used, registers, instructions per "
        "element) for the default GPU plan, the few-row grid and the long rows (or --grid); "
        "no GPU needed, nothing timed",
    )
    p.add_argument("--write", action="store_true", help="--model: also write <out>/model.md")
    p.add_argument("--sm-count", type=int, default=132, help="--model: SMs (default 132)")
    p.add_argument("--smem-limit", type=int, default=232448,
                   help="--model: shared memory per block in bytes (default: sm_90's)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="small subset (CPU < 30 s, GPU ~1 min)")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="output folder (default: the clone's bench/results)")  # fmt: skip
    p.add_argument("--name", help="file name stem (default: <device>-<date>[-quick])")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: cuda when torch sees a GPU (default), else cpu",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        help="stop measuring after this many seconds, recording the rest as skipped (default: "
        "480 GPU, 240 CPU; quick: 90 / 30)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument(
        "--list", action="store_true", help="print the plan and its estimated time, run nothing"
    )
    args = p.parse_args(argv)
    args.argv = None if argv is None else list(argv)
    all_ops = G.OPS + SPECIAL_OPS
    for name, allowed in (("ops", all_ops), ("dtypes", tuple(G.DTYPES)), ("grid", tuple(G.GRIDS))):
        vals = _csv_list(getattr(args, name))
        if vals is not None:
            bad = [v for v in vals if v not in allowed]
            if bad:
                p.error(f"--{name}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
        setattr(args, name, vals)
    args.providers = _csv_list(args.providers)
    args.lce_shapes = None
    if args.shapes:
        parts = [s for s in args.shapes.replace(" ", "").split(",") if s]
        three = [s for s in parts if s.lower().count("x") == 2]
        two = [s for s in parts if s not in three]
        try:
            from bench import linear_ce

            args.lce_shapes = linear_ce.parse_shapes(",".join(three)) if three else None
            args.shapes = G.parse_shapes(",".join(two)) if two else None
        except ValueError as e:
            p.error(str(e))
    try:
        args.world = [int(w) for w in _csv_list(args.world)] if args.world else None
    except ValueError:
        p.error("--world: a comma list of integers, e.g. 2,4")
    if args.world and min(args.world) < 1:
        p.error("--world: process counts must be >= 1")
    if args.lce_shapes and "linear_ce" not in (args.ops or []):
        p.error("--shapes: N x D x V shapes are linear_ce's: add --ops linear_ce")
    return args


def detect_device(choice: str) -> tuple[str, str | None]:
    """('cuda' or 'cpu', a note when the choice was not possible or torch is missing)."""
    if importlib.util.find_spec("torch") is None:
        if choice == "cuda":
            return "cpu", "torch is not installed: cannot use the GPU; running on the CPU"
        return "cpu", "torch is not installed: torch providers are skipped"
    if choice == "cpu":
        return "cpu", None
    import torch

    if torch.cuda.is_available():
        return "cuda", None
    if choice == "cuda":
        return "cpu", "no CUDA GPU visible to torch; running on the CPU"
    return "cpu", None


class Progress:
    """tqdm when installed (its bar shows the time left), else a one-line bar on stderr with the
    elapsed time and an ETA: the time model's estimate at the start, then the measured pace."""

    def __init__(self, total: int, estimate_s: float | None = None):
        self.total, self.n, self.t0 = total, 0, time.time()
        self.estimate_s = estimate_s
        self.tty = sys.stderr.isatty()
        self._last_pct = -1
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True)
        except ImportError:
            self.bar = None

    def eta(self) -> float | None:
        """Seconds left: the measured pace once a tenth is done, the estimate before."""
        elapsed = time.time() - self.t0
        if self.n >= max(1, self.total // 10):
            return elapsed / self.n * (self.total - self.n)
        if self.estimate_s is not None:
            return max(0.0, self.estimate_s - elapsed)
        return None

    def step(self, desc: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_description_str(desc[:48])
            self.bar.update(1)
            return
        frac = self.n / max(self.total, 1)
        pct = int(100 * frac)
        if not self.tty and pct // 10 == self._last_pct // 10 and self.n != self.total:
            return  # not a terminal: a line per 10%
        self._last_pct = pct
        done = int(30 * frac)
        eta = self.eta()
        eta_s = "" if eta is None or self.n == self.total else f" ETA {_mmss(eta)}"
        line = (
            f"[{'#' * done}{'.' * (30 - done)}] {self.n}/{self.total} "
            f"{_mmss(time.time() - self.t0)}{eta_s} {desc[:48]}"
        )
        sys.stderr.write(("\r" + line.ljust(100)) if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.tty:
            sys.stderr.write("\n")


def _mmss(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def _row(point, prov, **kw):
    r = {
        "op": point.op,
        "dtype": point.dtype,
        "n_rows": point.n_rows,
        "n_cols": point.n_cols,
        "grids": list(point.grids),
        "provider": prov.name,
        "label": prov.label,
        "ours": prov.ours,
        "status": "ok",
        "message": "",
        "impl": prov.impl(point.op),
        "ms": None,
        "gbps": None,
        "pct_copy": None,
        "copy_gbps": None,
        "bytes": point.bytes,
        "reps": None,
        "err_ratio": None,
        "max_abs_err": None,
        "nan_mismatch": None,
        "wall_s": None,
    }
    r.update(kw)
    return r


def run_points(env, timer, points, provider_names, progress, deadline, seed=0,
               compile_deadline=None, rows=None, copies=None):  # fmt: skip
    """Measure every (point, provider); returns (rows, copies), appending to the lists given
    (so an interrupted run keeps what it measured). Past ``deadline`` every measurement is
    skipped; past ``compile_deadline`` those that compile (torch.compile, ~2 s each), to leave
    the rest of the budget to the others."""
    from bench import providers as P

    rows = [] if rows is None else rows
    copies = [] if copies is None else copies
    if compile_deadline is None:
        compile_deadline = deadline
    by_shape: dict[tuple, list] = {}
    for pt in points:
        by_shape.setdefault((pt.dtype, pt.n_rows, pt.n_cols), []).append(pt)
    for (dtype, nr, nc), pts in by_shape.items():
        inp = env.inputs(dtype, (nr, nc), seed)
        copy = {"dtype": dtype, "n_rows": nr, "n_cols": nc, "gbps": None, "ms": None}
        copies.append(copy)
        copy_done = False
        for pt in pts:
            over = time.time() > deadline
            fit = None if over else env.fits(pt, inp.held_bytes())
            data = None
            if not over and fit is None:
                try:
                    data = inp.data(pt.op)
                except Exception as e:  # noqa: BLE001 - no input, no point: record why
                    fit = _short(e)
                    if env.is_oom(e):
                        fit = f"does not fit in memory ({fit})"
                    inp.release()
                    env.after_point()
            if data is not None and not copy_done:
                # the copy reference of this (dtype, shape), once, before its first point
                copy_done = True
                _measure_copy(env, timer, inp, copy)
                progress.step(f"{dtype} {nr}x{nc} copy")
            pending: dict = {}
            for name in provider_names:
                prov = P.PROVIDERS[name]
                now = time.time()
                if over or now > deadline:
                    rows.append(_row(pt, prov, status="skipped-budget",
                                     message="time budget (--budget-s) used up"))  # fmt: skip
                elif prov.compiles and now > compile_deadline and fit is None:
                    rows.append(_row(pt, prov, status="skipped-budget",
                                     message="compiling providers stop at 80% of the time "
                                     "budget (--budget-s)"))  # fmt: skip
                elif fit is not None:
                    status = "skipped-memory" if "fit in" in fit else "error"
                    rows.append(_row(pt, prov, status=status, message=fit))
                else:
                    t_start = time.time()
                    row, fn = _prepare(env, pt, prov, data)
                    rows.append(row)
                    if fn is not None and hasattr(timer, "many"):
                        pending[name] = (row, fn, time.time() - t_start)
                    elif fn is not None:
                        try:
                            _timed(row, pt, copy, *timer(fn))
                        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                            _error_row(env, pt, prov, e, row)
                    fn = None
                    if env.kind == "cuda":
                        env.after_point()  # free this provider's memory before the next
                    # wall time of the check, the compile and the timing: tunes the time model
                    row["wall_s"] = round(time.time() - t_start, 3)
                progress.step(f"{pt.op} {dtype} {nr}x{nc} {name}")
            if pending:
                # CPU: the providers of a point are timed in interleaved rounds, so that other
                # work on the machine slows them alike and their ratios stay meaningful
                res = timer.many({n: v[1] for n, v in pending.items()})
                for n, (row, _fn, prep_s) in pending.items():
                    r = res[n]
                    if isinstance(r, BaseException):
                        _error_row(env, pt, P.PROVIDERS[n], r, row)
                    else:
                        _timed(row, pt, copy, r[0], r[1])
                        row["wall_s"] = round(prep_s + r[2], 3)
                pending = res = None
            data = None
        if not copy_done:
            progress.step(f"{dtype} {nr}x{nc} copy")
        inp.release()
        env.after_point()
    return rows, copies


def _measure_copy(env, timer, inp, copy):
    try:
        x = inp.get("x")
        fn, impl = env.copy_fn(x)
        ms, reps = timer(fn)
        nbytes = 2 * inp.shape[0] * inp.shape[1] * G.ITEMSIZE[inp.dtype]
        copy.update(ms=ms, gbps=nbytes / ms / 1e6, reps=reps, impl=impl)
    except Exception as e:  # noqa: BLE001 - a failed copy leaves % copy empty, no more
        copy.update(error=_short(e))
    finally:
        fn = None
        env.after_point()


def _prepare(env, pt, prov, data):
    """Build one provider at one point, run it once and check it against the reference.
    Returns (row, fn): fn is the call to time, None when the row is final (the provider cannot
    run here, mismatch, error)."""
    reason = prov.can_run(pt.op, pt.dtype, env.kind)
    if reason is not None:
        return _row(pt, prov, status=reason[0], message=reason[1]), None
    fn = raw = None
    try:
        if prov.compiles:
            import torch

            torch._dynamo.reset()  # one compiled shape at a time: no recompile limit reached
        d = env.clone(data) if prov.mutates_input else data
        fn = prov.build(pt.op, d, env.kind)
        raw = fn()
        chk = env.check(pt, data, raw)
        raw = None
        if not chk.ok:
            return _row(pt, prov, status="mismatch", message=chk.note or "outside tolerance",
                        **chk.record()), None  # fmt: skip
        return _row(pt, prov, **chk.record()), fn
    except Exception as e:  # noqa: BLE001 - one failing provider must not stop the run
        fn = raw = None
        return _error_row(env, pt, prov, e), None


def _error_row(env, pt, prov, e, row=None):
    if env.is_oom(e):
        kw = {"status": "skipped-memory", "message": f"does not fit in memory: {_short(e)}"}
    elif type(e).__name__ == "BackendUnavailableError":
        kw = {"status": "unavailable", "message": _short(e)}
    else:
        kw = {"status": "error", "message": _short(e)}
    if row is None:
        return _row(pt, prov, **kw)
    row.update(kw)
    return row


def _timed(row, pt, copy, ms, reps):
    gbps = pt.bytes / ms / 1e6
    row.update(ms=ms, gbps=gbps, reps=reps)
    if copy.get("gbps"):
        row.update(copy_gbps=copy["gbps"], pct_copy=100.0 * gbps / copy["gbps"])


def _provider_table(names, device):
    from bench import providers as P

    out = {}
    for n in names:
        p = P.PROVIDERS[n]
        reasons = {
            op: p.can_run(op, dt, device)
            for op in G.OPS
            for dt in (G.GPU_DEFAULT_DTYPES if device == "cuda" else G.CPU_DEFAULT_DTYPES)
        }
        unavailable = [r for r in reasons.values() if r and r[0] == "unavailable"]
        status = f"unavailable: {unavailable[0][1]}" if unavailable else "ok"
        out[n] = {"label": p.label, "ours": p.ours, "status": status}
        if p.ours and P.sk_available()[1]:
            out[n]["warning"] = P.sk_available()[1] + " (tried anyway)"
    return out


def _cpu_times() -> tuple[float, float, float] | None:
    """(busy seconds of all CPUs, total seconds of all CPUs, this process's CPU seconds), from
    /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    total = sum(vals) / hz
    idle = (vals[3] + vals[4]) / hz  # idle + iowait
    t = os.times()
    return total - idle, total, t.user + t.system


def _other_cpu_use(before, after) -> float | None:
    """Fraction of the machine's CPU time that other processes used between two _cpu_times()."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    others = (after[0] - before[0]) - (after[2] - before[2])
    return max(0.0, others / (after[1] - before[1]))


def _busy_note(device: str, other: float | None) -> str | None:
    """A warning when other work competed for the CPU during a CPU run: torch's OpenMP threads
    then wait for a descheduled thread at every parallel region, and all timings stretch."""
    if device != "cpu" or other is None or other < 0.1:
        return None
    return (
        f"other processes used {100 * other:.0f}% of the CPUs during the run: CPU timings, "
        "torch's most of all, are unreliable; measure on a machine at rest"
    )


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    _ensure_paths()
    if args.model:
        return _model_main(args)
    device, note = detect_device(args.device)
    if note:
        print(f"note: {note}", file=sys.stderr)
    from bench import linear_ce
    from bench import providers as P

    special = [op for op in (args.ops or []) if op in SPECIAL_OPS]
    row_ops = None if args.ops is None else [op for op in args.ops if op in G.OPS]
    row_providers = args.providers
    if args.providers:
        known = {"ours", "all", *P.PROVIDERS, *linear_ce.PROVIDERS}
        bad = [n for n in args.providers if n not in known]
        if bad:
            print(f"error: unknown provider {bad[0]!r}; valid: {', '.join(sorted(known))}",
                  file=sys.stderr)  # fmt: skip
            return 2
        row_providers = [n for n in args.providers if n in ("ours", "all") or n in P.PROVIDERS]
    if row_ops is None or row_ops:
        if args.providers and not row_providers:
            print("note: no --providers entry applies to the softmax / CE ops: they are "
                  "skipped", file=sys.stderr)  # fmt: skip
        else:
            args.ops = row_ops
            rc = _rows_main(args, device, row_providers)
            if rc:
                return rc
    for op in special:
        rc = _linear_ce_main(args, device) if op == "linear_ce" else _vp_ce_main(args, device)
        if rc:
            return rc
    return 0


def _rows_main(args, device: str, providers) -> int:
    """The softmax / log_softmax / CE ops on their grids (bench/grids.py)."""
    from bench import providers as P

    try:
        names = P.resolve(providers, device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan, grid_table = G.build_plan(
        device, quick=args.quick, ops=args.ops, dtypes=args.dtypes, grids=args.grid,
        shapes=args.shapes,
    )  # fmt: skip
    points = G.plan_points(plan, grid_table)
    ptable = _provider_table(names, device)
    runnable = {
        op: [n for n in names if ptable[n]["status"] == "ok" and
             any(P.PROVIDERS[n].can_run(op, d, device) is None for d in G.DTYPES)]
        for op in G.OPS
    }  # fmt: skip
    est = G.estimate_seconds(points, runnable, device, quick=args.quick)
    budget = args.budget_s if args.budget_s is not None else BUDGET_S[(device, args.quick)]
    print(
        f"bench: {device}, {len(points)} points x {len(names)} providers "
        f"({', '.join(names)}), estimated {est / 60:.1f} min, budget {budget / 60:.1f} min",
        file=sys.stderr,
    )
    for n, info in ptable.items():
        if info["status"] != "ok" or info.get("warning"):
            print(f"  {n}: {info.get('warning') or info['status']}", file=sys.stderr)
    gpu_grids = [g for g in grid_table if g in G.GPU_GRIDS]
    if device == "cpu" and gpu_grids:
        print(
            f"warning: {', '.join(gpu_grids)}: "
            f"{'a GPU grid' if len(gpu_grids) == 1 else 'GPU grids'}, and this run is on the "
            f"CPU: estimated {est / 60:.1f} min for {len(points)} points, against a budget of "
            f"{budget / 60:.1f} min (the rest is recorded as "
            "skipped); CPU grids: " + ", ".join(G.CPU_GRIDS),
            file=sys.stderr,
        )
    if args.list:
        for op, entry in plan.items():
            for g, dts in entry.items():
                print(f"{op:16s} {g:17s} {','.join(dts):15s} {len(grid_table[g])} shapes")
        print(f"{len(points)} points, estimated {est:.0f} s ({est / 60:.1f} min)")
        return 0

    from bench.env import make_env
    from bench.timing import CpuTimer, CudaTimer

    env = make_env(device)
    if device == "cuda":
        import torch

        timer = CudaTimer(torch, quick=args.quick)
    else:
        timer = CpuTimer(quick=args.quick)
    dev_info = report.device_info(device)
    name = args.name or report.default_name(device, dev_info, args.quick)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    n_shapes = len({(p.dtype, p.n_rows, p.n_cols) for p in points})
    progress = Progress(len(points) * len(names) + n_shapes, est)
    load_before = _load()
    cpu_before = _cpu_times()
    t0 = time.time()
    rows, copies = [], []
    interrupted = False
    try:
        run_points(env, timer, points, names, progress, t0 + budget, args.seed,
                   compile_deadline=t0 + 0.8 * budget, rows=rows, copies=copies)  # fmt: skip
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: writing what was measured", file=sys.stderr)
    finally:
        progress.close()
    elapsed = time.time() - t0
    other = _other_cpu_use(cpu_before, _cpu_times())
    busy = _busy_note(device, other)
    if busy:
        print(f"warning: {busy}", file=sys.stderr)

    record = {
        "schema": 1,
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python -m bench " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
        "device": dev_info,
        "versions": report.versions(),
        "git": report.git_info(),
        "settings": {
            "quick": args.quick,
            "seed": args.seed,
            "timer": timer.describe(),
            "reference": env.reference_name,
            "tolerances": report.tolerances_record(),
            "traffic_units": G.TRAFFIC,
            "budget_seconds": budget,
            # other work on the machine skews CPU timings: the 1/5/15-min load averages
            "load_average_before": load_before,
            "load_average_after": _load(),
            # share of all CPUs' time that other processes used during the run
            "other_cpu_use": other,
            "busy_warning": busy,
        },
        "grid": {
            "plan": {op: {g: list(d) for g, d in e.items()} for op, e in plan.items()},
            "grids": {g: [list(s) for s in shapes] for g, shapes in grid_table.items()},
        },
        "providers": ptable,
        "estimated_seconds": est,
        "elapsed_seconds": elapsed,
        "interrupted": interrupted,
        "published": report.load_published() if device == "cuda" else [],
        "published_source": report.published_source() if device == "cuda" else "",
        "copies": copies,
        "points": rows,
    }
    if device == "cpu":
        record["cpu_target"] = report.target_check(rows)
        record["as_called_vs_kernel"] = report.as_called_vs_kernel(rows)
    md = report.summary_markdown(record)
    report.write_json(out_dir / f"{name}.json", record)
    report.write_csv(out_dir / f"{name}.csv", rows)
    (out_dir / f"{name}.md").write_text(md)
    files = [out_dir / f"{name}{s}" for s in (".json", ".csv", ".md")]
    if not args.no_plots:
        files += report.plot(record, out_dir, name)
    print(md)
    print("wrote " + ", ".join(str(f) for f in files))
    print(f"elapsed {elapsed:.0f} s (estimated {est:.0f} s)")
    return 0


# ----------------------------------------------------------------------------------------------
# the ops with runners of their own, and the static model


def _record_head(args, device: str, name: str) -> dict:
    argv = sys.argv[1:] if args.argv is None else args.argv
    return {
        "schema": 1,
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python -m bench " + " ".join(argv),
        "device": report.device_info(device),
        "versions": report.versions(),
        "git": report.git_info(),
    }


def _load_settings(device: str, load_before, cpu_before) -> dict:
    """The machine's load around a run, and the warning of a busy CPU."""
    other = _other_cpu_use(cpu_before, _cpu_times())
    busy = _busy_note(device, other)
    if busy:
        print(f"warning: {busy}", file=sys.stderr)
    return {"load_average_before": load_before, "load_average_after": _load(),
            "other_cpu_use": other, "busy_warning": busy}  # fmt: skip


def _out_name(args, device: str) -> tuple[Path, str]:
    out_dir = Path(args.out)
    name = args.name or report.default_name(device, report.device_info(device), args.quick)
    return out_dir, name


def _linear_ce_main(args, device: str) -> int:
    """Fused linear + cross-entropy, forward + backward (bench/linear_ce.py)."""
    from bench import linear_ce as L

    shapes = args.lce_shapes or L.SHAPES[(device, args.quick)]
    dtypes = args.dtypes or [L.DEFAULT_DTYPE[device]]
    names = L.resolve(args.providers, device)
    est = L.estimate_seconds(shapes, names, device, args.quick)
    budget = args.budget_s if args.budget_s is not None else L.BUDGET_S[(device, args.quick)]
    print(f"bench linear_ce: {device}, {len(shapes)} shapes x {len(dtypes)} dtypes x "
          f"{len(names)} providers ({', '.join(names)}), estimated {est / 60:.1f} min, budget "
          f"{budget / 60:.1f} min", file=sys.stderr)  # fmt: skip
    if args.list:
        for sh in shapes:
            print(f"linear_ce        {sh.key:17s} {','.join(dtypes):15s} {sh.model}")
        print(f"linear_ce: {len(shapes) * len(dtypes)} points, estimated {est:.0f} s")
        return 0
    out_dir, name = _out_name(args, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    load_before, cpu_before = _load(), _cpu_times()
    t0 = time.time()
    res: dict = {}
    interrupted = False
    try:
        L.run(device, shapes=shapes, dtypes=dtypes, names=names, seed=args.seed,
              quick=args.quick, deadline=t0 + budget, result=res)  # fmt: skip
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: writing what was measured", file=sys.stderr)
    record = _record_head(args, device, f"{name}-linear_ce")
    record["interrupted"] = interrupted
    res["targets"] = L.targets(res["rows"], device)
    res["shapes"] = [vars(s) for s in shapes]
    res["providers"] = {n: {"label": L.PROVIDERS[n].label, "impl": L.PROVIDERS[n].impl,
                            "computes": L.PROVIDERS[n].computes}
                        for n in names}  # fmt: skip
    record.update(linear_ce=res, elapsed_seconds=time.time() - t0, budget_seconds=budget,
                  settings=_load_settings(device, load_before, cpu_before))  # fmt: skip
    md = L.summary_markdown(record)
    files = [out_dir / f"{name}-linear_ce.json", out_dir / f"{name}-linear_ce.md"]
    report.write_json(files[0], record)
    files[1].write_text(md)
    if not args.no_plots:
        files += L.plot(record, out_dir, name)
    print(md)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def _vp_ce_main(args, device: str) -> int:
    """The vocabulary-parallel merge against the local kernel (bench/vp_ce.py)."""
    from bench import vp_ce as V

    if importlib.util.find_spec("torch") is None:
        print("bench vp_ce: needs torch (torch.distributed); skipped", file=sys.stderr)
        return 0
    shapes = args.shapes or V.SHAPES[(device, args.quick)]
    worlds = args.world or list(V.WORLDS[device])
    dtype = (args.dtypes or [V.DEFAULT_DTYPE[device]])[0]
    notes = []
    if device == "cpu" and dtype != "fp32":
        notes.append(f"the CPU measurement is float32 only: --dtypes {dtype} not used")
        dtype = "fp32"
    cores = env_cores()
    if device == "cpu" and max(worlds) > cores:
        notes.append(f"{max(worlds)} processes on {cores} cores: the ranks share the cores "
                     "(each gets cores // P torch threads, at least 1), so the P > cores "
                     "figures include that contention")  # fmt: skip
    if device == "cuda":
        notes.append("GPU: one device, P > 1 simulated (the real merge on P statistics "
                     "buffers; the gather a device copy): a real all-gather adds its latency "
                     "(~10-30 us over NVLink) and (P - 1) x (N + 1) x bytes/row at link "
                     "speed")  # fmt: skip
    print(f"bench vp_ce: {device}, {len(shapes)} shapes x P in {worlds}, {dtype}",
          file=sys.stderr)  # fmt: skip
    if args.list:
        for n, v in shapes:
            print(f"vp_ce            {n}x{v:<12d} {dtype:15s} P = {','.join(map(str, worlds))}")
        return 0
    out_dir, name = _out_name(args, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    load_before, cpu_before = _load(), _cpu_times()
    t0 = time.time()
    rows: list = []
    interrupted = False
    try:
        if device == "cuda":
            V.run_sim(shapes, worlds, dtype, quick=args.quick, seed=args.seed, rows=rows)
        else:
            V.run_cpu(shapes, worlds, quick=args.quick, seed=args.seed, rows=rows)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: writing what was measured", file=sys.stderr)
    record = _record_head(args, device, f"{name}-vp_ce")
    record["interrupted"] = interrupted
    record.update(vp_ce={"rows": rows, "notes": notes}, elapsed_seconds=time.time() - t0,
                  settings=_load_settings(device, load_before, cpu_before))  # fmt: skip
    md = V.summary_markdown(record)
    files = [out_dir / f"{name}-vp_ce.json", out_dir / f"{name}-vp_ce.md"]
    report.write_json(files[0], record)
    files[1].write_text(md)
    print(md)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def env_cores() -> int:
    from bench.env import cpu_count

    return cpu_count()


def _model_main(args) -> int:
    """The static performance model (bench/model.py): stdout, and <out>/model.md with
    --write."""
    from bench import model as M

    ops = [op for op in (args.ops or G.OPS) if op in G.OPS]
    t0 = time.time()
    mdl = M.build(ops=ops, dtypes=args.dtypes, grids=args.grid, sm_count=args.sm_count,
                  smem_limit=args.smem_limit)  # fmt: skip
    record = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": report.git_info()}
    md = M.markdown(mdl, record)
    print(md)
    print(f"model: {sum(len(r) for _, r in mdl['sections'])} rows in {time.time() - t0:.1f} s",
          file=sys.stderr)  # fmt: skip
    if args.write:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{args.name or 'model'}.md"
        path.write_text(md)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
