"""Outputs of a run: the environment record, JSON, CSV, the markdown summary and the plots."""

from __future__ import annotations

import csv
import datetime as _dt
import importlib.metadata
import json
import math
import re
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

from .grids import KEY_SHAPES, OPS, TOLERANCES

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_CSV = Path(__file__).resolve().parent / "reference" / "published-h100.csv"

CSV_FIELDS = [
    "op", "dtype", "n_rows", "n_cols", "grids", "provider", "label", "ours", "status", "ms",
    "gbps", "pct_copy", "copy_gbps", "bytes", "reps", "err_ratio", "max_abs_err",
    "nan_mismatch", "wall_s", "impl", "message",
]  # fmt: skip

_DISTS = {
    "numpy": ("numpy",),
    "scipy": ("scipy",),
    "torch": ("torch",),
    "triton": ("triton",),
    "cupy": ("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy"),
    "liger_kernel": ("liger-kernel", "liger_kernel"),
    "matplotlib": ("matplotlib",),
    "tqdm": ("tqdm",),
}


# ----------------------------------------------------------------------------------------------
# environment


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name, dists in _DISTS.items():
        out[name] = None
        for d in dists:
            try:
                out[name] = importlib.metadata.version(d)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    try:
        import softmax_kernels

        out["softmax_kernels"] = softmax_kernels.__version__
    except ImportError:
        out["softmax_kernels"] = None
    import platform

    out["python"] = platform.python_version()
    return out


def _run(cmd: list[str]) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_info() -> dict[str, Any]:
    commit = _run(["git", "rev-parse", "HEAD"])
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def device_info(device: str) -> dict[str, Any]:
    from .env import cpu_count, cpu_model

    info: dict[str, Any] = {"kind": device, "cpu_model": cpu_model(), "cpu_cores": cpu_count()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    if device != "cuda":
        info["name"] = info["cpu_model"]
        return info
    import torch

    p = torch.cuda.get_device_properties(0)
    info.update(
        name=torch.cuda.get_device_name(0),
        capability=f"{p.major}.{p.minor}",
        sm_count=p.multi_processor_count,
        memory_gib=round(p.total_memory / 2**30, 1),
        cuda_runtime=torch.version.cuda,
        driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
    )
    if info["driver"]:
        info["driver"] = info["driver"].splitlines()[0]
    return info


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "device"


def default_name(device: str, dev_info: dict[str, Any], quick: bool) -> str:
    date = _dt.date.today().isoformat()
    base = slug(dev_info.get("name", device)) if device == "cuda" else "cpu"
    return f"{base}-{date}" + ("-quick" if quick else "")


# ----------------------------------------------------------------------------------------------
# files


def write_json(path: Path, record: dict[str, Any]) -> None:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    path.write_text(json.dumps(clean(record), indent=1) + "\n")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in CSV_FIELDS})


def _csv_value(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list | tuple):
        return ";".join(map(str, v))
    return "" if v is None else v


def load_published() -> list[dict[str, Any]]:
    """The published reference points (bench/reference/published-h100.csv) and their source."""
    if not REFERENCE_CSV.exists():
        return []
    lines = [ln for ln in REFERENCE_CSV.read_text().splitlines() if not ln.startswith("#")]
    out = []
    for r in csv.DictReader(lines):
        out.append(
            {
                "provider": r["provider"],
                "op": r["op"],
                "dtype": r["dtype"],
                "n_rows": int(r["n_rows"]),
                "n_cols": int(r["n_cols"]),
                "gbps": float(r["gbps"]),
            }
        )
    return out


def published_source() -> str:
    if not REFERENCE_CSV.exists():
        return ""
    return " ".join(
        ln.lstrip("# ").strip() for ln in REFERENCE_CSV.read_text().splitlines()
        if ln.startswith("#")
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# markdown summary


def _geomean(vals: list[float]) -> float:
    vals = [v for v in vals if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")


def _fmt(v: float, spec: str = ".0f", suffix: str = "") -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:{spec}}{suffix}"


def _gb(v: float | None) -> str:
    """GB/s to 3 significant digits (CPU numbers are small, GPU ones large)."""
    if v is None or not math.isfinite(v):
        return "—"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _peer_order(rows):
    seen = []
    for r in rows:
        if not r["ours"] and r["provider"] not in seen:
            seen.append(r["provider"])
    return seen


def _peer_cell(ratios: list[float], statuses: set[str]) -> str:
    if ratios:
        return f"{_geomean(ratios):.2f}x"
    for s in ("mismatch", "error", "skipped-memory", "unsupported", "unavailable"):
        if s in statuses:
            return {"unsupported": "n/a", "unavailable": "n/a"}.get(s, s)
    return "—"


def summary_markdown(record: dict[str, Any]) -> str:
    rows = record["points"]
    dev = record["device"]
    lines = [
        f"## Benchmark summary: {dev.get('name')} ({record['created'][:10]})",
        "",
        f"Commit `{(record['git'].get('commit') or 'unknown')[:12]}`"
        + (" (dirty)" if record["git"].get("dirty") else "")
        + f"; {len(rows)} measurements in {record['elapsed_seconds']:.0f} s; reference: "
        + f"{record['settings']['reference']}.",
        "",
        *(
            [f"**Warning: {record['settings']['busy_warning']}.**", ""]
            if record["settings"].get("busy_warning")
            else []
        ),
        "GB/s counts the minimum traffic (forward 2, backward 3, CE forward 1, CE forward + "
        "gradient 2 x elements x itemsize); % copy is against a copy of the same size and "
        "dtype measured in the same run. Speed-up columns: peer time / our time (above 1: ours "
        "faster), geometric mean over the sizes both ran; n/a: the peer has no such op or is "
        "not installed.",
        "",
    ]
    peers = _peer_order(rows)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        for g in r["grids"]:
            groups[(r["op"], r["dtype"], g)].append(r)
    op_i = {o: i for i, o in enumerate(OPS)}
    head = ["op", "dtype", "grid", "ours", "sizes", "GB/s", "% copy"] + [f"vs {p}" for p in peers]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (op, dt, g), rs in sorted(groups.items(), key=lambda kv: (op_i[kv[0][0]], kv[0][1:])):
        by = defaultdict(dict)
        for r in rs:
            by[r["provider"]][(r["n_rows"], r["n_cols"])] = r
        ours = [p for p in by if by[p] and next(iter(by[p].values()))["ours"]]
        for o in ours:
            ok = {k: r for k, r in by[o].items() if r["status"] == "ok"}
            if not ok:
                st = sorted({r["status"] for r in by[o].values()})
                cells = [op, dt, g, o, "0", "/".join(st), ""] + [""] * len(peers)
                lines.append("| " + " | ".join(cells) + " |")
                continue
            gb = _geomean([r["gbps"] for r in ok.values()])
            pc = _geomean([r["pct_copy"] for r in ok.values()])
            cells = [op, dt, g, o, str(len(ok)), _gb(gb), _fmt(pc, ".0f", "%")]
            for p in peers:
                pr = by.get(p, {})
                ratios = [
                    pr[k]["ms"] / ok[k]["ms"] for k in ok if k in pr and pr[k]["status"] == "ok"
                ]
                cells.append(_peer_cell(ratios, {r["status"] for r in pr.values()}))
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *key_points_markdown(record, peers)]
    lines += _target_lines(record)
    lines += _kernel_lines(record)
    lines += _problem_lines(rows)
    return "\n".join(lines) + "\n"


def key_points_markdown(record, peers) -> list[str]:
    rows = record["points"]
    keys = KEY_SHAPES.get(record["device"]["kind"], [])
    sel = [r for r in rows if (r["n_rows"], r["n_cols"]) in keys]
    if not sel:
        return []
    out = [
        "### Key shapes (milliseconds; speed-up = peer ms / our ms)",
        "",
    ]
    head = ["op", "dtype", "shape", "ours", "ms", "GB/s", "% copy"] + peers
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = defaultdict(dict)
    for r in sel:
        by[(r["op"], r["dtype"], r["n_rows"], r["n_cols"])][r["provider"]] = r
    op_i = {o: i for i, o in enumerate(OPS)}
    for (op, dt, nr, nc), provs in sorted(by.items(), key=lambda kv: (op_i[kv[0][0]], kv[0][1:])):
        for o, r in provs.items():
            if not r["ours"]:
                continue
            ok = r["status"] == "ok"
            cells = [op, dt, f"{nr}x{nc}", o]
            cells += (
                [f"{r['ms']:.3f}", _gb(r["gbps"]), _fmt(r["pct_copy"], ".0f", "%")]
                if ok
                else [r["status"], "", ""]
            )
            for p in peers:
                pr = provs.get(p)
                if pr is None:
                    cells.append("")
                elif pr["status"] != "ok":
                    cells.append("n/a" if pr["status"] in ("unsupported", "unavailable")
                                 else pr["status"])  # fmt: skip
                else:
                    sp = f" ({pr['ms'] / r['ms']:.2f}x)" if ok else ""
                    cells.append(f"{pr['ms']:.3f}{sp}")
            out.append("| " + " | ".join(cells) + " |")
    return out + [""]


# The CPU targets (issue 16), each measured in the run that reports it:
# - kernel only (outputs preallocated: ours-numpy-out against torch-out, or torch as called where
#   torch has no out=): geometric mean over the shapes and ops of each dtype at most 1.2x torch
#   CPU's time;
# - as called (fresh outputs: ours-numpy against torch): never slower than torch at any point;
# - torch CPU tensors through sk (ours-numpy-torch) as fast as NumPy arrays through sk
#   (ours-numpy): geometric mean of their time ratio at most 1.05 (the run-to-run noise of a
#   2-core machine at rest).
CPU_TARGET = {
    "kernel_max_time_ratio": 1.2,
    "as_called_min_speedup": 1.0,
    "torch_tensor_max_time_ratio": 1.05,
    "text": "kernel only, at most 1.2x torch CPU's time (geometric mean over the shapes and ops "
    "of each dtype); as called, never slower than torch at any point; torch CPU tensors "
    "through sk as fast as NumPy arrays (time ratio at most 1.05, geometric mean)",
}


def _ok_ms(rows) -> dict[tuple, float]:
    return {(r["provider"], r["op"], r["dtype"], r["n_rows"], r["n_cols"]): r["ms"]
            for r in rows if r["status"] == "ok"}  # fmt: skip


def target_check(rows) -> dict[str, Any] | None:
    """The CPU targets measured in this run (CPU_TARGET): per dtype the kernel-only time ratio
    to torch, every as-called point slower than torch, and torch tensors against NumPy arrays.
    None when torch did not run (the targets are relative to torch) or ours did not."""
    ok = _ok_ms(rows)
    points = sorted({k[1:] for k in ok if k[0] == "ours-numpy"},
                    key=lambda k: (k[1], OPS.index(k[0]), k[2] * k[3]))  # fmt: skip
    as_called = [(k, ok[("torch", *k)] / ok[("ours-numpy", *k)]) for k in points
                 if ("torch", *k) in ok]  # fmt: skip
    if not as_called:
        return None
    kernel = []
    for dt in sorted({k[1] for k in points}):
        ratios = []
        for k in points:
            ours = ok.get(("ours-numpy-out", *k))
            peer = ok.get(("torch-out", *k), ok.get(("torch", *k)))
            if k[1] == dt and ours is not None and peer is not None:
                ratios.append(ours / peer)
        if ratios:
            r = _geomean(ratios)
            kernel.append({"dtype": dt, "time_ratio": r, "points": len(ratios),
                           "met": r <= CPU_TARGET["kernel_max_time_ratio"]})  # fmt: skip
    slower = [{"op": k[0], "dtype": k[1], "shape": [k[2], k[3]], "speedup": sp}
              for k, sp in as_called if sp < CPU_TARGET["as_called_min_speedup"]]  # fmt: skip
    tt = [ok[("ours-numpy-torch", *k)] / ok[("ours-numpy", *k)] for k in points
          if ("ours-numpy-torch", *k) in ok]  # fmt: skip
    tensors = None
    if tt:
        g = _geomean(tt)
        tensors = {"time_ratio": g, "worst": max(tt), "points": len(tt),
                   "met": g <= CPU_TARGET["torch_tensor_max_time_ratio"]}  # fmt: skip
    return {
        "target": CPU_TARGET["text"],
        "kernel_only": kernel,
        "as_called": {
            "points": len(as_called),
            "slower": slower,
            "met": not slower,
            "min_speedup": min(sp for _, sp in as_called),
        },  # fmt: skip
        "torch_tensors": tensors,
        "met": all(e["met"] for e in kernel) and not slower and (tensors or {}).get("met", True),
    }


def _target_lines(record) -> list[str]:
    tc = record.get("cpu_target")
    if not tc:
        return []

    def yn(v):
        return "yes" if v else "**no**"

    ac, tt = tc["as_called"], tc["torch_tensors"]
    out = [
        "### CPU targets, measured in this run",
        "",
        f"Targets: {tc['target']}. Met: {yn(tc['met'])}.",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for e in tc["kernel_only"]:
        out.append(f"| kernel only, {e['dtype']} ({e['points']} points) | "
                   f"{e['time_ratio']:.2f}x torch's time | {yn(e['met'])} |")  # fmt: skip
    out.append(f"| as called, every point ({ac['points']}) | {len(ac['slower'])} slower than "
               f"torch; lowest speed-up {ac['min_speedup']:.2f}x | {yn(ac['met'])} |")  # fmt: skip
    if tt:
        out.append(f"| torch CPU tensors vs NumPy arrays ({tt['points']} points) | "
                   f"{tt['time_ratio']:.2f}x the time (worst {tt['worst']:.2f}x) | "
                   f"{yn(tt['met'])} |")  # fmt: skip
    if ac["slower"]:
        out += ["", "As called, slower than torch (speed-up = torch time / our time): " + ", ".join(
            f"{e['op']} {e['dtype']} {e['shape'][0]}x{e['shape'][1]} {e['speedup']:.2f}x"
            for e in ac["slower"]) + "."]  # fmt: skip
    return out + [""]


# Kernel only against as called (issue 16): ours-numpy vs torch with fresh outputs, and
# ours-numpy-out vs torch-out with outputs preallocated (torch as called where it has no out=).
_KERNEL_PAIRS = (("as called", "ours-numpy", ("torch",)),
                 ("kernel only", "ours-numpy-out", ("torch-out", "torch")))  # fmt: skip


def as_called_vs_kernel(rows) -> list[dict[str, Any]] | None:
    """Per op and dtype, the speed-up over torch (torch time / our time, geometric mean over
    the shapes both ran) as called and kernel only, and per dtype over all ops and shapes."""
    ok = _ok_ms(rows)
    if not any(k[0] == "ours-numpy-out" for k in ok):
        return None
    out = []
    keys = sorted({(k[1], k[2]) for k in ok if k[0] in ("ours-numpy", "ours-numpy-out")},
                  key=lambda k: (k[1], OPS.index(k[0])))  # fmt: skip
    for dt in sorted({k[1] for k in keys}):
        for op in [*[k[0] for k in keys if k[1] == dt], "all ops"]:
            entry: dict[str, Any] = {"op": op, "dtype": dt}
            for label, ours, peers in _KERNEL_PAIRS:
                ratios, peer_used = [], set()
                for (p, o, d, nr, nc), ms in ok.items():
                    if p != ours or d != dt or (op != "all ops" and o != op):
                        continue
                    for peer in peers:
                        pm = ok.get((peer, o, d, nr, nc))
                        if pm is not None:
                            ratios.append(pm / ms)
                            peer_used.add(peer)
                            break
                entry[label] = _geomean(ratios) if ratios else None
                entry[f"{label} sizes"] = len(ratios)
                entry[f"{label} vs"] = "/".join(sorted(peer_used))
            out.append(entry)
    return out


def _kernel_lines(record) -> list[str]:
    ak = record.get("as_called_vs_kernel")
    if not ak:
        return []
    out = [
        "### As called and kernel only (CPU)",
        "",
        "Speed-up over torch CPU = torch time / our time, geometric mean over the shapes. As "
        "called: every call allocates its outputs (ours-numpy vs torch). Kernel only: outputs "
        "preallocated once (ours-numpy-out: `out=`, and for cross-entropy the backend's "
        "`cross_entropy_fwd` on preallocated buffers; torch-out: `aten._softmax.out` and "
        "friends; torch has no `out=` for cross-entropy, so there torch as called). Issue 16's "
        "kernel-only target, at most 1.2x torch's time, is a speed-up of at least 0.83x.",
        "",
        "| op | dtype | as called | kernel only | kernel-only peer |",
        "|---|---|---|---|---|",
    ]
    for e in ak:
        op = f"**{e['op']}**" if e["op"] == "all ops" else e["op"]
        called, kernel = _fmt(e["as called"], ".2f", "x"), _fmt(e["kernel only"], ".2f", "x")
        out.append(f"| {op} | {e['dtype']} | {called} | {kernel} | {e['kernel only vs'] or '—'} |")
    return out + [""]


def _problem_lines(rows) -> list[str]:
    bad = [r for r in rows if r["status"] in ("mismatch", "error")]
    skipped = defaultdict(int)
    for r in rows:
        if r["status"] not in ("ok", "mismatch", "error"):
            skipped[(r["provider"], r["status"], r["message"])] += 1
    out = []
    if bad:
        out += ["### Mismatches and errors (not timed)", ""]
        for r in bad[:60]:
            detail = (
                f"err/tol {r['err_ratio']:.3g}, max |err| {r['max_abs_err']:.3g}, "
                f"NaN mismatches {r['nan_mismatch']}"
                if r["status"] == "mismatch"
                else r["message"]
            )
            out.append(
                f"- {r['provider']} {r['op']} {r['dtype']} {r['n_rows']}x{r['n_cols']}: "
                f"{r['status']}: {detail}"
            )
        if len(bad) > 60:
            out.append(f"- ... and {len(bad) - 60} more (see the CSV)")
        out.append("")
    if skipped:
        out += ["### Not run", ""]
        for (p, s, m), n in sorted(skipped.items()):
            out.append(f"- {p}: {s} ({n} points): {m}")
        out.append("")
    return out


# ----------------------------------------------------------------------------------------------
# plots


def _has_matplotlib() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("matplotlib") is not None
    except ValueError:
        return False


NOT_MEASURED = {"mismatch": "X", "error": "X", "skipped-budget": "v", "skipped-memory": "v"}
MAX_TICK_LABELS = 24
LOG_BELOW_PCT = 15.0  # a panel with a point under 15% of the copy gets a log y axis


def _shape_order(shapes) -> list[tuple[int, int]]:
    return sorted(set(map(tuple, shapes)), key=lambda s: (s[0] * s[1], s[0], s[1]))


def _figure_note(record: dict[str, Any]) -> str:
    git = record.get("git") or {}
    commit = (git.get("commit") or "unknown")[:10] + (" (dirty)" if git.get("dirty") else "")
    return f"{str(record.get('created', ''))[:16].replace('T', ' ')}, commit {commit}"


def plot(record: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    """One PNG per grid, a panel per (op, dtype). The y axis is each provider's GB/s as a
    percentage of a copy of the same shape and dtype timed in the same run (100% = the copy,
    dashed), on a log axis when a point is below LOG_BELOW_PCT (CPU runs), so no curve is
    squashed against the bottom; a panel without copy times shows GB/s on a log axis. The x
    axis lists the shapes ("rows x cols") in order of size. Points that were not measured are
    marked on the bottom edge (X: mismatch or error, not timed; v: skipped for the time budget
    or memory). Published H100 numbers, as a percentage of this run's copy, are dotted lines on
    an H100. The figure carries the date, the commit and the load warning of a busy machine."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    rows = record["points"]
    copies = {(c["dtype"], c["n_rows"], c["n_cols"]): c["gbps"]
              for c in record["copies"] if c.get("gbps")}  # fmt: skip
    published = []
    if "h100" in str(record["device"].get("name", "")).lower():
        published = record.get("published", [])
    busy = (record.get("settings") or {}).get("busy_warning")
    files = []
    grids = sorted({g for r in rows if r["status"] == "ok" for g in r["grids"]})
    for g in grids:
        sel = [r for r in rows if g in r["grids"]]
        panels = sorted({(r["op"], r["dtype"]) for r in sel if r["status"] == "ok"},
                        key=lambda k: (OPS.index(k[0]), k[1]))  # fmt: skip
        if not panels:
            continue
        ncol = min(3, len(panels))
        nrow = math.ceil(len(panels) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(6.4 * ncol, 4.6 * nrow), squeeze=False)
        colors: dict[str, str] = {}
        marked: set[str] = set()
        for i, (op, dt) in enumerate(panels):
            ax = axes[i // ncol][i % ncol]
            here = [r for r in sel if (r["op"], r["dtype"]) == (op, dt)]
            shapes = _shape_order((r["n_rows"], r["n_cols"]) for r in here)
            pos = {s: k for k, s in enumerate(shapes)}
            measured = {(r["n_rows"], r["n_cols"]) for r in here if r["status"] == "ok"}
            pct = all((dt, *sh) in copies for sh in measured)

            def y_of(gbps, sh, pct=pct, dt=dt):
                return 100.0 * gbps / copies[(dt, *sh)] if pct else gbps

            series: dict[tuple, list] = defaultdict(list)
            missing: dict[tuple, list] = defaultdict(list)
            for r in here:
                sh = (r["n_rows"], r["n_cols"])
                key = (not r["ours"], r["label"])
                if r["status"] == "ok":
                    series[key].append((pos[sh], y_of(r["gbps"], sh)))
                elif r["status"] in NOT_MEASURED:
                    missing[key].append((pos[sh], NOT_MEASURED[r["status"]]))
            for key in sorted(set(series) | set(missing), key=str):
                label = key[1]
                c = colors.setdefault(label, f"C{len(colors) % 10}")
                pts = sorted(series.get(key, []))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3.5,
                            lw=1.3, color=c, label=label)  # fmt: skip
                for x, mk in missing.get(key, []):
                    ax.plot([x], [0], marker=mk, ms=7, color=c, ls="none", clip_on=False,
                            transform=ax.get_xaxis_transform())  # fmt: skip
                    marked.add(mk)
            pub = defaultdict(list)
            for p in published:
                sh = (p["n_rows"], p["n_cols"])
                if (
                    (p["op"], p["dtype"]) == (op, dt)
                    and sh in pos
                    and (not pct or (dt, *sh) in copies)
                ):
                    pub[p["provider"]].append((pos[sh], y_of(p["gbps"], sh)))
            styles = [(":", "x", "dimgray"), ("-.", "+", "darkgray"), ("--", "1", "silver")]
            for k, (prov, pts) in enumerate(sorted(pub.items())):
                pts.sort()
                ls, mk, col = styles[k % len(styles)]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls=ls, marker=mk, ms=5, lw=1.2,
                        color=col, label=f"{prov} (published, H100)")  # fmt: skip
            ys = [p[1] for pts in series.values() for p in pts if p[1] > 0]
            if pct:
                ax.axhline(100, ls="--", color="black", lw=1, label="copy (same shape, this run)")
                if ys and min(ys) < LOG_BELOW_PCT:
                    # curves far below the copy (the CPU): a log axis keeps them apart
                    ax.set_yscale("log")
                    ax.set_ylabel("% of copy bandwidth (log)")
                else:
                    ax.set_ylabel("% of copy bandwidth (GB/s of minimum traffic)")
                    ax.set_ylim(bottom=0)
            else:
                ax.set_yscale("log")
                ax.set_ylabel("GB/s of minimum traffic (log)")
            step = max(1, math.ceil(len(shapes) / MAX_TICK_LABELS))
            ax.set_xticks(range(0, len(shapes), step))
            ax.set_xticklabels([f"{r}x{c}" for r, c in shapes[::step]], rotation=40, ha="right",
                               fontsize=7)  # fmt: skip
            ax.set_xlim(-0.5, len(shapes) - 0.5)
            ax.set_xlabel("shape (rows x cols), by size" + (f", every {step}th labelled"
                                                              if step > 1 else ""))  # fmt: skip
            ax.set_title(f"{op} {dt} ({g})", fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        for j in range(len(panels), nrow * ncol):
            axes[j // ncol][j % ncol].axis("off")
        fig.suptitle(f"{record['device'].get('name')}: {g} grid, {_figure_note(record)}",
                     fontsize=12)  # fmt: skip
        notes = []
        if "X" in marked:
            notes.append("X on the axis: mismatch or error (not timed)")
        if "v" in marked:
            notes.append("v on the axis: skipped (time budget or memory)")
        if notes:
            fig.text(0.01, 0.005, "; ".join(notes), fontsize=8, ha="left", va="bottom")
        if busy:
            fig.text(0.99, 0.005, f"Warning: {busy}", fontsize=8, color="red", ha="right",
                     va="bottom", wrap=True)  # fmt: skip
        fig.tight_layout(rect=(0, 0.03, 1, 0.96))
        path = out_dir / f"{name}-{g}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def tolerances_record() -> dict[str, list[float]]:
    return {k: list(v) for k, v in TOLERANCES.items()}
