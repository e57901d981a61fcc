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

from .grids import GRIDS, KEY_SHAPES, OPS, TOLERANCES

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


# Issue 2: on the CPU, the NumPy backend is faster than SciPy and within 1.5x of torch for
# these ops at 4096 x 4096 float32.
_TARGET_OPS = ("softmax_fwd", "log_softmax_fwd", "softmax_bwd", "ce_fwd_grad")


def target_check(rows) -> list[dict[str, Any]]:
    out = []
    for op in _TARGET_OPS:
        at = {
            r["provider"]: r
            for r in rows
            if r["op"] == op and r["dtype"] == "fp32" and (r["n_rows"], r["n_cols"]) == (4096, 4096)
        }
        ours = at.get("ours-numpy")
        if not ours or ours["status"] != "ok":
            continue
        entry = {"op": op, "ours_ms": ours["ms"]}
        for p in ("scipy", "torch"):
            pr = at.get(p)
            entry[f"{p}_ms"] = pr["ms"] if pr and pr["status"] == "ok" else None
        s, t = entry["scipy_ms"], entry["torch_ms"]
        entry["faster_than_scipy"] = None if s is None else ours["ms"] < s
        entry["ratio_to_torch"] = None if t is None else ours["ms"] / t
        entry["within_1_5x_torch"] = None if t is None else ours["ms"] <= 1.5 * t
        out.append(entry)
    return out


def _target_lines(record) -> list[str]:
    tc = record.get("issue2_target") or []
    if not tc:
        return []

    def yn(v):
        return "—" if v is None else ("yes" if v else "**no**")

    out = [
        "### Issue-2 target: 4096 x 4096 float32 on the CPU",
        "",
        "Faster than SciPy and within 1.5x of torch CPU.",
        "",
        "| op | ours ms | SciPy ms | torch ms | faster than SciPy | ours / torch | within 1.5x |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in tc:
        out.append(
            f"| {e['op']} | {e['ours_ms']:.2f} | {_fmt(e['scipy_ms'], '.2f')} | "
            f"{_fmt(e['torch_ms'], '.2f')} | {yn(e['faster_than_scipy'])} | "
            f"{_fmt(e['ratio_to_torch'], '.2f')} | {yn(e['within_1_5x_torch'])} |"
        )
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


def _xy(pts):
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(record: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    """One PNG per grid: GB/s against row length, a panel per (op, dtype), a line per provider,
    the copy bandwidth dashed, published H100 points dotted when the GPU is an H100."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    rows = [r for r in record["points"] if r["status"] == "ok"]
    copies = {(c["dtype"], c["n_rows"], c["n_cols"]): c for c in record["copies"] if c.get("gbps")}
    published = []
    if "h100" in str(record["device"].get("name", "")).lower():
        published = record.get("published", [])
    files = []
    grids = sorted({g for r in rows for g in r["grids"]})
    for g in grids:
        shapes = set(map(tuple, record["grid"]["grids"].get(g, GRIDS.get(g, []))))
        sel = [r for r in rows if g in r["grids"]]
        panels = sorted({(r["op"], r["dtype"]) for r in sel}, key=lambda k: (OPS.index(k[0]), k[1]))
        if not panels:
            continue
        # one series per provider, split by row count when the grid repeats a row length
        cols_of = defaultdict(set)
        for r, c in shapes:
            cols_of[c].add(r)
        split_rows = any(len(v) > 1 for v in cols_of.values())
        ncol = min(3, len(panels))
        nrow = math.ceil(len(panels) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol, 4.2 * nrow), squeeze=False)
        colors = {}
        for i, (op, dt) in enumerate(panels):
            ax = axes[i // ncol][i % ncol]
            series = defaultdict(list)
            for r in sel:
                if (r["op"], r["dtype"]) == (op, dt):
                    key = (not r["ours"], r["label"], r["n_rows"] if split_rows else None)
                    series[key].append((r["n_cols"], r["gbps"]))
            for (_, label, nr), pts in sorted(series.items(), key=lambda kv: str(kv[0])):
                pts.sort()
                c = colors.setdefault(label, f"C{len(colors) % 10}")
                lab = label if nr is None else f"{label}, {nr} rows"
                ax.plot(*_xy(pts), marker="o", ms=3, lw=1.3, color=c, label=lab)
            cps = defaultdict(list)
            for (cdt, nr, nc), cpy in copies.items():
                if cdt == dt and (nr, nc) in shapes:
                    cps[nr if split_rows else None].append((nc, cpy["gbps"]))
            for nr, pts in sorted(cps.items(), key=lambda kv: str(kv[0])):
                pts.sort()
                lab = "copy" if nr is None else f"copy, {nr} rows"
                ax.plot(*_xy(pts), ls="--", color="black", lw=1, label=lab)
            pub = defaultdict(list)
            for p in published:
                if (p["op"], p["dtype"]) == (op, dt) and (p["n_rows"], p["n_cols"]) in shapes:
                    pub[p["provider"]].append((p["n_cols"], p["gbps"]))
            styles = [(":", "x", "dimgray"), ("-.", "+", "darkgray"), ("--", "1", "silver")]
            for k, (prov, pts) in enumerate(sorted(pub.items())):
                pts.sort()
                ls, mk, col = styles[k % len(styles)]
                ax.plot(*_xy(pts), ls=ls, marker=mk, ms=5, lw=1.2, color=col,
                        label=f"{prov} (published, H100)")  # fmt: skip
            if g != "tritonbench" and g != "tritonbench-lite":
                ax.set_xscale("log", base=2)
            if not split_rows and len(shapes) <= 8:
                # every shape has its own row count: label the ticks with the shapes
                ax.set_xticks(sorted(c for _, c in shapes))
                ax.set_xticklabels(
                    [f"{r}x{c}" for r, c in sorted(shapes, key=lambda s: s[1])],
                    rotation=30, fontsize=7,
                )  # fmt: skip
                ax.minorticks_off()
            ax.set_title(f"{op} {dt} ({g})", fontsize=10)
            ax.set_xlabel("row length (n_cols)")
            ax.set_ylabel("GB/s")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        for j in range(len(panels), nrow * ncol):
            axes[j // ncol][j % ncol].axis("off")
        fig.suptitle(f"{record['device'].get('name')}: {g}", fontsize=12)
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        path = out_dir / f"{name}-{g}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def tolerances_record() -> dict[str, list[float]]:
    return {k: list(v) for k, v in TOLERANCES.items()}
