"""Smoke tests of the benchmark harness (bench/), on the CPU, in a few seconds: a tiny grid writes
its JSON, CSV, markdown and plots; a planted wrong provider is caught by the correctness check
and not timed; the command degrades without torch/SciPy/matplotlib; the GPU path's reference,
check and report code runs on CPU tensors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import grids as G  # noqa: E402
from bench import providers as P  # noqa: E402
from bench import report  # noqa: E402
from bench import run as R  # noqa: E402

OPS = "softmax_fwd,softmax_bwd,log_softmax_fwd,log_softmax_bwd,ce_fwd,ce_fwd_grad"


def _env(**extra):
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "python") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _wrong_provider() -> P.Provider:
    """Right almost everywhere: one element of the softmax is off by 1e-4 (fp32 tolerance at
    y ~ 0.01 is ~1e-6); the CE gradient forgets the 1/N of the mean; the rest is right."""

    def build(op, d, device):
        import scipy.special as ss

        if op == "softmax_fwd":
            x = d["x"]

            def f():
                y = ss.softmax(x, axis=-1)
                y[0, 0] += 1e-4
                return y

            return f
        if op == "ce_fwd_grad":
            x, t = d["x"], d["t"]

            def g():
                lp = ss.log_softmax(x, axis=-1)
                rows = np.arange(x.shape[0])
                grad = np.exp(lp)
                grad[rows, t] -= 1
                return -lp[rows, t].mean(), grad  # not divided by N

            return g
        return P.PROVIDERS["scipy"].build(op, d, device)

    return P.Provider(
        name="wrong",
        label="wrong",
        devices=("cpu", "cuda"),
        ours=False,
        can_run=lambda op, dt, dev: None,
        build=build,
        impl=lambda op: "planted error",
    )


@pytest.fixture
def wrong(monkeypatch):
    monkeypatch.setitem(P.PROVIDERS, "wrong", _wrong_provider())


def _rows(path: Path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_tiny_grid_writes_every_output_and_catches_a_wrong_provider(tmp_path, wrong):
    # 33 columns: not a multiple of 16 (a kernel's masked tail); 3x7: fewer rows than a block
    pytest.importorskip("scipy")
    rc = R.main(
        ["--device", "cpu", "--quick", "--shapes", "16x33,3x7", "--ops", OPS,
         "--dtypes", "fp32,fp64", "--providers", "ours,torch,torch-out,scipy,wrong",
         "--out", str(tmp_path), "--name", "t"]
    )  # fmt: skip
    assert rc == 0
    for suffix in (".json", ".csv", ".md"):
        assert (tmp_path / f"t{suffix}").stat().st_size > 0
    if report._has_matplotlib():
        assert (tmp_path / "t-custom.png").stat().st_size > 0

    rec = json.loads((tmp_path / "t.json").read_text())
    for key in ("device", "versions", "git", "grid", "settings", "copies", "points"):
        assert key in rec
    assert rec["device"]["cpu_model"]
    assert rec["versions"]["numpy"] == np.__version__
    assert rec["grid"]["grids"]["custom"] == [[16, 33], [3, 7]]
    points = rec["points"]
    # ours-numpy, ours-numpy-out (kernel only), ours-numpy-torch, torch, torch-out, scipy, wrong
    assert len(points) == 6 * 2 * 2 * (7 if _has("torch") else 4)
    assert all(c["gbps"] and c["gbps"] > 0 for c in rec["copies"])

    by = {(p["provider"], p["op"], p["dtype"], p["n_rows"]): p for p in points}
    for dt in ("fp32", "fp64"):
        for n in (16, 3):
            for op in ("softmax_fwd", "ce_fwd_grad"):
                bad = by[("wrong", op, dt, n)]
                assert bad["status"] == "mismatch", bad
                assert bad["ms"] is None and bad["err_ratio"] > 1
            # the same provider is right (and timed) where it is right
            assert by[("wrong", "log_softmax_fwd", dt, n)]["status"] == "ok"
            for op in OPS.split(","):
                # as called and kernel only (preallocated outputs), both checked and timed
                for prov in ("ours-numpy", "ours-numpy-out"):
                    ours = by[(prov, op, dt, n)]
                    assert ours["status"] == "ok", ours
                    assert ours["ms"] > 0 and ours["gbps"] > 0 and ours["pct_copy"] > 0
                    assert ours["err_ratio"] <= 1.0
                if _has("torch"):
                    assert by[("torch", op, dt, n)]["status"] == "ok"
                    # sk on torch CPU tensors: checked and timed like NumPy arrays
                    assert by[("ours-numpy-torch", op, dt, n)]["status"] == "ok"
                    assert by[("ours-numpy-torch", op, dt, n)]["err_ratio"] <= 1.0
                    want = "unsupported" if op.startswith("ce") else "ok"  # no out= for CE
                    assert by[("torch-out", op, dt, n)]["status"] == want

    csv_rows = _rows(tmp_path / "t.csv")
    assert len(csv_rows) == len(points)
    assert {r["status"] for r in csv_rows if r["provider"] == "wrong"} == {"ok", "mismatch"}
    md = (tmp_path / "t.md").read_text()
    assert "| softmax_fwd | fp32 | custom | ours-numpy |" in md
    assert "| softmax_fwd | fp32 | custom | ours-numpy-out |" in md
    assert "wrong softmax_fwd fp32 16x33: mismatch" in md
    if _has("torch"):  # both figures against torch, per op and over all ops
        assert "### As called and kernel only (CPU)" in md
        ak = {(e["op"], e["dtype"]): e for e in rec["as_called_vs_kernel"]}
        assert ak[("all ops", "fp32")]["as called sizes"] == 6 * 2
        assert ak[("ce_fwd_grad", "fp64")]["kernel only vs"] == "torch"
        assert ak[("softmax_bwd", "fp64")]["kernel only vs"] == "torch-out"
        assert all(e["as called"] > 0 and e["kernel only"] > 0 for e in ak.values())


def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def test_plan_defaults_and_estimates():
    plan, grids = G.build_plan("cuda", quick=False, ops=None, dtypes=None, grids=None,
                               shapes=None)  # fmt: skip
    pts = G.plan_points(plan, grids)
    assert {p.op for p in pts} == set(G.OPS)
    assert ("softmax_fwd", "bf16", 32768, 65536) in {(p.op, p.dtype, *p.shape) for p in pts}
    gpu_providers = {op: ["ours-triton", "ours-cupy", "torch", "torch.compile"] for op in G.OPS}
    # the default GPU run must fit in ~8 min on an H100, the CPU one in 3 min, quick in 30 s
    assert G.estimate_seconds(pts, gpu_providers, "cuda") < 8 * 60
    cplan, cgrids = G.build_plan("cpu", quick=False, ops=None, dtypes=None, grids=None,
                                 shapes=None)  # fmt: skip
    cpts = G.plan_points(cplan, cgrids)
    assert ("softmax_fwd", "fp32", 4096, 4096) in {(p.op, p.dtype, *p.shape) for p in cpts}
    cpu_providers = {op: P.default_names("cpu") for op in G.OPS}
    assert G.estimate_seconds(cpts, cpu_providers, "cpu") < R.BUDGET_S[("cpu", False)]
    qplan, qgrids = G.build_plan("cpu", quick=True, ops=None, dtypes=None, grids=None,
                                 shapes=None)  # fmt: skip
    assert G.estimate_seconds(G.plan_points(qplan, qgrids), cpu_providers, "cpu", True) < 30
    # tritonbench: 256..12672 step 128 plus the five odd sizes
    cols = [c for _, c in G.GPU_GRIDS["tritonbench"]]
    assert len(cols) == 98 + 5 and {1000, 1025, 2045, 2049, 3000, 12672} <= set(cols)
    # a point asked for by two grids is measured once
    plan2 = {"softmax_fwd": {"quack": ("bf16",), "custom": ("bf16",)}}
    pts2 = G.plan_points(plan2, {"quack": G.GPU_GRIDS["quack"], "custom": [(32768, 256)]})
    assert len(pts2) == 11 and pts2[0].grids == ("quack", "custom")
    with pytest.raises(ValueError):
        G.parse_shapes("12by4")


def test_help_and_list_without_torch_scipy_matplotlib():
    block = (
        "import sys, runpy; "
        "[sys.modules.__setitem__(m, None) for m in ('torch', 'scipy', 'matplotlib', 'tqdm')]; "
        "sys.argv = ['bench'] + sys.argv[1:]; runpy.run_module('bench', run_name='__main__')"
    )
    r = subprocess.run([sys.executable, "-c", block, "--help"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "--quick" in r.stdout and "--providers" in r.stdout
    r = subprocess.run([sys.executable, "bench/run.py", "--list", "--quick"], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "points, estimated" in r.stdout


def test_runs_with_numpy_only(tmp_path):
    """Without torch, SciPy and matplotlib: ours runs, the peers are recorded as unavailable,
    no plots (with a message)."""
    block = (
        "import sys, runpy; "
        "[sys.modules.__setitem__(m, None) for m in ('torch', 'scipy', 'matplotlib', 'tqdm')]; "
        "sys.argv = ['bench'] + sys.argv[1:]; runpy.run_module('bench', run_name='__main__')"
    )
    args = ["--quick", "--shapes", "4x9", "--ops", "softmax_fwd,ce_fwd_grad", "--dtypes",
            "fp32", "--out", str(tmp_path), "--name", "np"]  # fmt: skip
    r = subprocess.run([sys.executable, "-c", block, *args], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "matplotlib is not installed" in r.stdout
    rows = {(x["provider"], x["op"]): x for x in _rows(tmp_path / "np.csv")}
    assert rows[("ours-numpy", "softmax_fwd")]["status"] == "ok"
    assert rows[("ours-numpy", "ce_fwd_grad")]["status"] == "ok"
    assert rows[("torch", "softmax_fwd")]["status"] == "unavailable"
    assert rows[("scipy", "softmax_fwd")]["status"] == "unavailable"
    assert not list(tmp_path.glob("*.png"))


class _CudaPathOnCpu:
    """The GPU environment (torch tensors, torch float64 reference, block-wise check) on CPU
    tensors: everything but the allocation, the memory query and the CUDA-event timer."""

    @staticmethod
    def make():
        from bench.env import CudaEnv

        class Env(CudaEnv):
            def fits(self, point, held=0):
                return None

            def after_point(self):
                pass

        return Env(device="cpu")


def test_gpu_path_check_and_report_on_cpu_tensors(tmp_path, wrong, monkeypatch):
    pytest.importorskip("torch")
    from bench import env as E
    from bench.timing import CpuTimer

    env = _CudaPathOnCpu.make()
    # small reference blocks: 3 rows of 33 per block, the last one short (the block loop)
    monkeypatch.setattr(E, "REF_BLOCK_ELEMS", 100)
    shapes = [(7, 33), (5, 64)]
    points = [G.Point(op, dt, r, c, ("custom",)) for dt in ("bf16", "fp32") for r, c in shapes
              for op in G.OPS]  # fmt: skip
    cpu_timer = CpuTimer(quick=True)

    def timer(fn):  # no .many: one provider after the other, as with the CUDA timer
        return cpu_timer(fn)

    prog = R.Progress(10**6)
    rows, copies = R.run_points(env, timer, points, ["torch"], prog, 1e18)
    prog.close()
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    assert all(r["ms"] > 0 and r["wall_s"] >= 0 for r in rows)
    assert all(c["gbps"] for c in copies)

    # the wrong provider on torch tensors would need scipy on them; plant a torch one instead
    def wrong_build(op, d, device):
        import torch

        if op == "softmax_fwd":
            return lambda: torch.softmax(d["x"].float() * 1.2, -1).to(d["x"].dtype)
        return P.PROVIDERS["torch"].build(op, d, device)

    P.PROVIDERS["wrong"].build = wrong_build
    sm = [p for p in points if p.op == "softmax_fwd"]
    prog = R.Progress(10**6)
    bad, _ = R.run_points(env, timer, sm, ["wrong"], prog, 1e18)
    prog.close()
    assert [r["status"] for r in bad] == ["mismatch"] * len(sm)

    # the report of a GPU run: several ours, published H100 lines on the quack grid
    fake = []
    for op in ("softmax_fwd", "ce_fwd"):
        for r, c in G.GPU_GRIDS["quack"]:
            for prov, gb in (("ours-triton", 2800.0), ("torch", 1500.0), ("ours-cupy", 2700.0)):
                pt = G.Point(op, "bf16", r, c, ("quack",))
                ms = pt.bytes / gb / 1e6
                row = R._row(pt, P.PROVIDERS[prov], ms=ms, gbps=gb, pct_copy=gb / 30)
                fake.append(row)
    record = {
        "created": "2025-01-01T00:00:00",
        "device": {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3"},
        "git": {"commit": "0" * 40, "dirty": False},
        "elapsed_seconds": 1.0,
        "settings": {"reference": "test"},
        "grid": {"grids": {"quack": G.GPU_GRIDS["quack"]}},
        "published": report.load_published(),
        "copies": [
            {"dtype": "bf16", "n_rows": r, "n_cols": c, "gbps": 3000.0}
            for r, c in G.GPU_GRIDS["quack"]
        ],  # fmt: skip
        "points": fake,
    }
    assert {p["provider"] for p in record["published"]} == {"quack", "torch.compile"}
    md = report.summary_markdown(record)
    assert "| softmax_fwd | bf16 | quack | ours-triton | 11 | 2800 | 93% | 1.87x |" in md
    assert "| ce_fwd | bf16 | quack | ours-cupy | 11 | 2700 |" in md
    if report._has_matplotlib():
        files = report.plot(record, tmp_path, "gpu")
        assert [f.name for f in files] == ["gpu-quack.png"]


def test_gpu_path_with_our_triton_backend_as_provider(monkeypatch):
    """Under the Triton interpreter (make test), the GPU path with ours-triton as a provider on
    CPU tensors, checked against the torch float64 reference."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" or "triton" not in P.sk_available()[0]:
        pytest.skip("needs TRITON_INTERPRET=1 and the triton backend (make test sets it)")
    from bench import env as E
    from bench.timing import CpuTimer

    env = _CudaPathOnCpu.make()
    monkeypatch.setattr(E, "REF_BLOCK_ELEMS", 100)  # 3 rows of 33 per reference block
    points = [G.Point(op, dt, 7, 33, ("custom",)) for dt in ("bf16", "fp32") for op in G.OPS]
    cpu_timer = CpuTimer(quick=True)
    prog = R.Progress(10**6)
    rows, _ = R.run_points(env, lambda fn: cpu_timer(fn), points, ["ours-triton"], prog, 1e18)
    prog.close()
    assert [r["status"] for r in rows] == ["ok"] * len(points), rows


def test_gpu_reference_is_independent_of_our_kernels(monkeypatch):
    """A bug our kernels have in every precision, float64 included, must not pass the GPU
    path's check: its reference is torch in float64, never softmax_kernels."""
    torch = pytest.importorskip("torch")
    import softmax_kernels as sk

    def buggy(x, *a, **kw):  # wrong by 10% in the logits' scale, in every dtype
        return torch.softmax(x * 1.1, -1)

    monkeypatch.setattr(sk, "softmax", buggy)
    env = _CudaPathOnCpu.make()
    assert "torch float64" in env.reference_name and "independent" in env.reference_name
    pt = G.Point("softmax_fwd", "fp32", 5, 40, ("custom",))
    data = env.inputs("fp32", pt.shape, 0).data(pt.op)
    got = P.PROVIDERS["ours-numpy"].build(pt.op, data, "cpu")()  # calls the planted sk.softmax
    assert not env.check(pt, data, got).ok
    assert env.check(pt, data, torch.softmax(data["x"], -1)).ok


def test_cpu_target_is_a_measured_result():
    def row(prov, op, ms, dtype="fp32", shape=(4096, 4096), status="ok"):
        return {"provider": prov, "op": op, "dtype": dtype, "n_rows": shape[0],
                "n_cols": shape[1], "status": status, "ms": ms}  # fmt: skip

    rows = [
        # softmax_fwd: as called faster than torch; kernel only 1.8x torch-out's time
        row("ours-numpy", "softmax_fwd", 40.0), row("torch", "softmax_fwd", 50.0),
        row("ours-numpy-out", "softmax_fwd", 36.0), row("torch-out", "softmax_fwd", 20.0),
        row("ours-numpy-torch", "softmax_fwd", 40.0),
        # ce_fwd at a second shape: as called slower than torch; kernel only against torch as
        # called (torch has no out= for CE): 36 / 40 = 0.9
        row("ours-numpy", "ce_fwd", 50.0, shape=(8, 1048576)),
        row("torch", "ce_fwd", 40.0, shape=(8, 1048576)),
        row("ours-numpy-out", "ce_fwd", 36.0, shape=(8, 1048576)),
        row("ours-numpy-torch", "ce_fwd", 60.0, shape=(8, 1048576)),
        # float64: met
        row("ours-numpy", "softmax_fwd", 10.0, "fp64"), row("torch", "softmax_fwd", 11.0, "fp64"),
        row("ours-numpy-out", "softmax_fwd", 9.0, "fp64"),
        row("torch-out", "softmax_fwd", 9.0, "fp64"),
    ]  # fmt: skip
    tc = report.target_check(rows)
    assert "1.2x torch" in tc["target"] and tc["met"] is False
    k = {e["dtype"]: e for e in tc["kernel_only"]}
    assert k["fp32"]["points"] == 2 and abs(k["fp32"]["time_ratio"] - (1.8 * 0.9) ** 0.5) < 1e-9
    assert k["fp32"]["met"] is False and k["fp64"]["met"] is True
    assert tc["as_called"]["slower"] == [
        {"op": "ce_fwd", "dtype": "fp32", "shape": [8, 1048576], "speedup": 0.8}
    ]
    assert tc["torch_tensors"]["points"] == 2 and tc["torch_tensors"]["worst"] == 1.2
    assert tc["torch_tensors"]["met"] is False  # geomean sqrt(1.2) = 1.095 > 1.05
    lines = "\n".join(report._target_lines({"cpu_target": tc}))
    assert "| kernel only, fp32 (2 points) | 1.27x torch's time | **no** |" in lines
    assert "| kernel only, fp64 (1 points) | 1.00x torch's time | yes |" in lines
    assert "1 slower than torch; lowest speed-up 0.80x" in lines
    assert "ce_fwd fp32 8x1048576 0.80x" in lines
    # without torch there is no target to measure: no section at all
    no_torch = [r for r in rows if not r["provider"].startswith("torch")]
    assert report.target_check(no_torch) is None
    assert report._target_lines({"cpu_target": None}) == []


def test_progress_eta_gpu_grid_warning_and_any_folder(tmp_path, capsys):
    prog = R.Progress(100, estimate_s=50.0)
    prog.bar = None
    prog.t0 -= 5.0  # 5 s in, nothing done: the estimate's remainder
    assert prog.eta() == pytest.approx(45.0, abs=1.0)
    prog.n = 20  # a fifth done in 5 s: the measured pace
    assert prog.eta() == pytest.approx(20.0, abs=1.0)
    prog.tty = False
    prog.n = 29
    prog.step("x")
    assert "ETA 0:" in capsys.readouterr().err
    assert R._mmss(125) == "2:05"
    # run from another folder: same outputs folder, GPU grid on the CPU warned with its estimate
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--list", "--device",
                        "cpu", "--grid", "quack", "--ops", "softmax_fwd"], cwd=tmp_path,
                       env=_env(), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "warning: quack: a GPU grid, and this run is on the CPU: estimated" in r.stderr
    assert R.DEFAULT_OUT == ROOT / "bench" / "results"
    assert not list(tmp_path.iterdir())  # nothing written where it was started


def test_plot_marks_skipped_points_and_names_shapes(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for i, (r, c) in enumerate([(64, 100), (3, 7), (8, 5000)]):
        for prov in ("ours-numpy", "torch"):
            pt = G.Point("softmax_fwd", "fp32", r, c, ("custom",))
            st = "skipped-budget" if (i, prov) == (2, "torch") else "ok"
            if (i, prov) == (1, "torch"):
                st = "mismatch"
            kw = {"ms": 1.0, "gbps": 2.0 + i} if st == "ok" else {}
            rows.append(R._row(pt, P.PROVIDERS[prov], status=st, **kw))
    record = {
        "created": "2026-01-02T03:04:05", "device": {"kind": "cpu", "name": "test CPU"},
        "git": {"commit": "abcdef1234567890", "dirty": True},
        "settings": {"busy_warning": "other processes used 50% of the CPUs"},
        "copies": [{"dtype": "fp32", "n_rows": r, "n_cols": c, "gbps": 40.0}
                   for r, c in [(64, 100), (3, 7), (8, 5000)]],
        "points": rows,
    }  # fmt: skip
    assert report._shape_order([(64, 100), (3, 7), (8, 5000)]) == [(3, 7), (64, 100), (8, 5000)]
    assert report._figure_note(record) == "2026-01-02 03:04, commit abcdef1234 (dirty)"
    files = report.plot(record, tmp_path, "p")
    assert [f.name for f in files] == ["p-custom.png"] and files[0].stat().st_size > 10_000


def test_published_reference_is_carried_with_its_source():
    text = (ROOT / "bench" / "reference" / "published-h100.csv").read_text()
    assert "Source:" in text and "quack" in text
    pts = report.load_published()
    assert len(pts) == 33 and all(p["gbps"] > 0 for p in pts)


# ----------------------------------------------------------------------------------------------
# linear_ce (bench/linear_ce.py), vp_ce (bench/vp_ce.py), --model (bench/model.py)


def _wrong_lce() -> object:
    """Right loss and dx; dW without the mean's 1/N (the classic CS231N slip)."""
    from bench import linear_ce as L

    def build(d, device):
        x, w, t = (np.asarray(a) for a in (d["x"], d["w"], d["t"]))

        def run():
            loss, dw_dc = L.softmax_loss_vectorized(w.T, x, t, 0.0)
            return {"loss": loss, "dx": None, "dw": dw_dc.T * x.shape[0]}

        return run

    return L.LceProvider("wrong-lce", "wrong", ("cpu", "cuda"), False, 2, "loss, dW", "planted",
                         lambda dt, dev: None, build, numpy_inputs=True)  # fmt: skip


def test_linear_ce_checks_times_and_measures_peak_memory(tmp_path, monkeypatch):
    """N=4096 rows, V=300, D=8 (ours: chunks of 1024 rows, 4 of them): every provider checked
    against float64 and timed; a planted wrong dW is a mismatch, not timed; the memory figures
    see what the algorithms hold (CS231N: scores, shifted scores and softmax at once, >= 3 N V
    floats; torch eager: logits and log-softmax, >= 2; ours: a chunk, never O(N V))."""
    from bench import linear_ce as L

    monkeypatch.setitem(L.PROVIDERS, "wrong-lce", _wrong_lce())
    n, d, v = 4096, 8, 300
    rc = R.main(["--device", "cpu", "--ops", "linear_ce", "--shapes", f"{n}x{d}x{v}",
                 "--providers", "ours,torch,torch-lce,cs231n,wrong-lce", "--out", str(tmp_path),
                 "--name", "l", "--no-plots", "--quick"])  # fmt: skip
    assert rc == 0
    rec = json.loads((tmp_path / "l-linear_ce.json").read_text())
    rows = {r["provider"]: r for r in rec["linear_ce"]["rows"]}
    have_lce = L._lce_can_run("fp32", "cpu") is None
    want_ok = ["ours-numpy", "cs231n"]
    want_ok += ["ours-numpy-autograd", "torch"] if _has("torch") else []
    want_ok += ["torch-lce"] if have_lce else []
    nv4 = n * v * 4
    for name in want_ok:
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["check"]["loss_err_ratio"] <= 1 and r["check"]["dw_relerr"] <= 1e-4
        assert r["ms"] > 0 and r["reps"] == 1  # --quick: one timed call
        assert r["gflops"] == pytest.approx(r["gemms"] * 2 * n * d * v / r["ms"] / 1e6)
        assert r["peak_bytes"] >= r["memory"]["output_bytes"] > 0
    assert rows["cs231n"]["gemms"] == 2 and rows["cs231n"]["check"]["dx_relerr"] is None
    assert rows["ours-numpy"]["check"]["dx_relerr"] <= 1e-4
    bad = rows["wrong-lce"]
    assert (
        bad["status"] == "mismatch" and bad["ms"] is None and "dw relative error" in bad["message"]
    )
    # tracemalloc sees CS231N's N x V temporaries, and ours holds a chunk of them
    cs, ours = rows["cs231n"]["memory"], rows["ours-numpy"]["memory"]
    assert cs["tracemalloc_peak"] >= 3 * nv4
    assert ours["tracemalloc_peak"] - ours["output_bytes"] < nv4 / 2
    rss_ok = not rec["linear_ce"]["memory_method"]["rss"].startswith("unavailable")
    if rss_ok:  # the RSS high-water mark agrees for NumPy, and sees torch's malloc'ed buffers
        assert cs["rss_peak"] >= 2.5 * nv4
        if _has("torch"):
            assert rows["torch"]["memory"]["rss_peak"] >= 1.5 * nv4
            assert rows["torch"]["peak_method"] == "rss"
    md = (tmp_path / "l-linear_ce.md").read_text()
    assert "| cs231n | loss, dW (no dx) |" in md and "wrong-lce" in md and "mismatch" in md


def test_linear_ce_targets_and_report():
    from bench import linear_ce as L

    def row(prov, ms, peak, n=4096, d=256, v=32000, dt="fp32", ours=False, rss=None):
        return {"provider": prov, "ours": ours, "status": "ok", "ms": ms, "peak_bytes": peak,
                "memory": {"rss_peak": rss}, "n": n, "d": d, "v": v, "dtype": dt}  # fmt: skip

    cpu = [row("ours-numpy", 3000.0, 200e6, ours=True, rss=210e6),
           row("cs231n", 9000.0, 2100e6, rss=2000e6)]  # fmt: skip
    (t,) = L.targets(cpu, "cpu")
    assert t["speedup"] == pytest.approx(3.0) and t["speedup_met"]
    assert t["memory_ratio"] == pytest.approx(10.5) and t["memory_met"]
    assert t["memory_ratio_rss"] == pytest.approx(2000 / 210)
    cpu[1]["peak_bytes"] = 1000e6  # 5x: missed
    assert L.targets(cpu, "cpu")[0]["memory_met"] is False
    gpu = [row("ours-triton", 10.0, 1e9, 8192, 4096, 128256, "bf16", ours=True),
           row("torch", 12.0, 20e9, 8192, 4096, 128256, "bf16"),
           row("torch.compile", 8.0, 5e9, 8192, 4096, 128256, "bf16")]  # fmt: skip
    ts = {e["peer"]: e for e in L.targets(gpu, "cuda")}
    assert ts["torch"]["time_met"] and not ts["torch.compile"]["time_met"]  # 1.25x > 1.15x
    assert ts["torch.compile"]["memory_share"] == pytest.approx(0.2)
    assert ts["torch.compile"]["memory_met"] is False


def test_linear_ce_gpu_path_on_cpu_tensors():
    """The GPU path (torch tensors, the torch float64 reference, one provider after the other)
    on CPU tensors in bfloat16 and float32, with ours-triton under the interpreter when make
    test runs it."""
    pytest.importorskip("torch")
    import os

    from bench import linear_ce as L

    res = L.run("cuda", shapes=[L.Shape(70, 16, 130)], dtypes=["bf16", "fp32"], names=["torch"],
                torch_device="cpu", progress=lambda s: None)  # fmt: skip
    rows = res["rows"]
    assert len(res["references"]) == 2 and res["references"][0]["rows_checked"] == 64
    if os.environ.get("TRITON_INTERPRET") == "1" and "triton" in P.sk_available()[0]:
        # (the interpreter is slow: bfloat16 only, fewer rows)
        rows += L.run("cuda", shapes=[L.Shape(40, 16, 130)], dtypes=["bf16"],
                      names=["ours-triton", "ours-triton-autograd"], torch_device="cpu",
                      progress=lambda s: None)["rows"]  # fmt: skip
    assert [r["status"] for r in rows] == ["ok"] * len(rows) and len(rows) in (2, 4), rows
    for r in rows:
        assert r["check"]["dx_relerr"] <= L.GRAD_REL[r["dtype"]]
    assert L.parse_shapes("4x5x6") == [L.Shape(4, 5, 6, "custom")]
    with pytest.raises(ValueError, match="NxDxV"):
        L.parse_shapes("4x5")


def test_cli_shapes_world_and_main_guard():
    import runpy

    with pytest.raises(SystemExit):  # N x D x V shapes without --ops linear_ce
        R.parse_args(["--shapes", "64x8x100"])
    a = R.parse_args(["--ops", "linear_ce,vp_ce", "--shapes", "64x8x100,32x50", "--world", "2,3"])
    assert a.lce_shapes[0].key == "64x8x100" and a.shapes == [(32, 50)] and a.world == [2, 3]
    # spawned vp_ce workers import bench.__main__ again: it must not run the benchmark there
    runpy.run_module("bench", run_name="__mp_main__")


def test_vp_ce_worker_and_single_device_simulation(tmp_path):
    """The CPU worker in this process (world size 1, gloo), then the simulation of P = 1, 2, 3
    shards on CPU tensors: every result checked against the dense float64 loss and gradient,
    so the simulated merge of P statistics buffers is the full-vocabulary loss."""
    pytest.importorskip("torch")
    from softmax_kernels import _parallel

    from bench import vp_ce as V

    V.cpu_worker(0, 1, V._free_port(), str(tmp_path), 33, 50, 2, 0)
    out = json.loads((tmp_path / "rank0.json").read_text())
    assert "error" not in out, out.get("traceback")
    # the merge alone too (softmax_kernels._parallel's internals as this bench knows them)
    assert out["check"]["ok"] and set(out["ms"]) == {"local", "vp", "gather", "merge"}
    b = out["bytes"]
    assert all(c["collectives"] == 1 and c["header_rows"] == 1 for c in b.values())
    # the issue's bound: at most 16 bytes per row per rank, plus the weights' column
    assert b["plain"]["bytes_per_row"] <= 16 and b["plain"]["stats_dtype"] == "float32"
    assert b["label_smoothing"]["bytes_per_row"] == b["plain"]["bytes_per_row"] + 4
    row = {"n": 33, "v": 50, "world": 1}
    V._aggregate(row, [out])
    assert row["vp_ms"] > 0 and row["bytes_per_row_received"] == 0

    rows = V.run_sim([(40, 50)], [1, 2, 3], "fp32", device="cpu", say=lambda s: None)
    assert [r["status"] for r in rows] == ["ok"] * 3, rows
    assert [r["v_local"] for r in rows] == [50, 25, 16]
    for r in rows:
        assert r["check"]["loss_err_ratio"] <= 1 and r["check"]["grad_err_ratio"] <= 1
        assert r["bytes_per_row_sent"] == 4 * _parallel._n_stats(False, False, False)
        assert 0 < r["merge_ms"] and 0 < r["local_ms"] and 0 < r["vp_ms"]
    assert rows[2]["bytes_per_row_received"] == 2 * rows[2]["bytes_per_row_sent"]
    assert not torch_dist_initialized()  # the world-size-1 group is torn down
    rec = {"device": {"name": "test"}, "created": "2026-01-01", "vp_ce": {"rows": rows}}
    md = V.summary_markdown(rec)
    assert "| 40x50 | fp32 | 3 | simulated shards | 16 |" in md


def torch_dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _fake_planners(monkeypatch):
    """static_model stand-ins with different key spellings: Triton's gives bytes and minimum
    bytes and a grid, CuPy's the ratio, SMs used, per-kernel registers and instructions per
    element, and accepts only cross_entropy_fwd for CE (cross_entropy raises ValueError)."""
    from softmax_kernels.backends import cupy_backend, triton_backend

    def triton_model(op, dtype_name, n_rows, n_cols, *, sm_count=132, soft=False,
                     with_grad=True, reduction="mean"):  # fmt: skip
        n = n_rows * n_cols
        return {"strategy": "online" if n_cols > 65536 else "row", "launches": 2,
                "bytes": 2.1 * n, "min_bytes": 2.0 * n, "programs_per_sm": 3,
                "grid": min(n_rows, 4 * sm_count), "registers": 40, "spills": 0,
                "chunk": 8192}  # fmt: skip

    def cupy_model(op, dtype_name, n_rows, n_cols, *, sm_count=132, smem_limit=232448,
                   soft=False, with_grad=True, reduction="mean"):  # fmt: skip
        if op == "cross_entropy":
            raise ValueError("unknown op")
        return {"strategy": "cluster" if n_cols > 65536 else "block_smem",
                "launches_per_call": 1 if op != "cross_entropy_fwd" else 3,
                "bytes_ratio": 1.0, "blocks_per_sm": 2, "sms_used": sm_count,
                "registers": [64, 72], "spills": 0, "instructions_per_element": 18.5}  # fmt: skip

    monkeypatch.setattr(triton_backend, "static_model", triton_model, raising=False)
    monkeypatch.setattr(cupy_backend, "static_model", cupy_model, raising=False)


def test_model_table_from_planners_with_other_key_names(tmp_path, monkeypatch, capsys):
    _fake_planners(monkeypatch)
    rc = R.main(["--model", "--grid", "few-rows", "--ops", "softmax_fwd,ce_fwd_grad",
                 "--dtypes", "bf16", "--write", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    md = (tmp_path / "model.md").read_text()
    assert md in capsys.readouterr().out
    # 8 x 65536: Triton's ratio derived from bytes / min_bytes, SMs used from its grid (8),
    # no instructions per element (n/a), the unknown key under "other"
    assert (
        "| softmax_fwd | bf16 | 8x65536 | triton | row | 2 | 1.05x | 3 | 8 | 40 | 0 | n/a |"
        " chunk=8192 |"
    ) in md
    want = "| ce_fwd_grad | bf16 | 128x262144 | cupy | cluster | 3 | 1.00x | 2 | 132 | 64/72 | 0 |"
    assert want + " 18.5 |" in md
    assert md.count("| triton |") == md.count("| cupy |") == 2 * 6
    # the static targets counted over the table: CuPy's 3 CE launches miss, Triton's 8 SMs
    # out of 132 miss, CUDA's 18.5 instructions per element meet the bound
    tg = {t.split(" |")[0]: t for t in md.split("\n| ")[1:] if "(issue" in t}
    assert tg["CE: at most 2 launches per call (issue 11)"].startswith(
        "CE: at most 2 launches per call (issue 11) | 6 | 6 | 0 |"
    )
    assert "| 12 | 0 | 0 |" in tg["CUDA hot loops at most 20 instructions per element (issue 11)"]
    assert "Missed, CE: at most 2 launches" in md and "cupy ce_fwd_grad bf16 1x65536: 3" in md
    # stdout only without --write
    other = tmp_path / "none"
    assert R.main(["--model", "--grid", "few-rows", "--ops", "ce_fwd", "--out", str(other)]) == 0
    assert not other.exists()


def test_model_runs_without_cupy_and_gpu_on_the_real_planners():
    """--model in a process where CuPy cannot be imported, on the backends' own static_model
    (or, before they have one, the n/a rows saying so)."""
    from softmax_kernels.backends import cupy_backend, triton_backend

    block = ("import sys, runpy; sys.modules['cupy'] = None; "
             "sys.argv = ['bench', '--model', '--grid', 'few-rows', '--dtypes', 'bf16', "
             "'--ops', 'softmax_fwd']; "
             "runpy.run_module('bench', run_name='__main__')")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", block], cwd=ROOT, env=_env(CUDA_VISIBLE_DEVICES=""),
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = [
        ln for ln in r.stdout.splitlines() if ln.startswith("| softmax_fwd | bf16 | 8x65536 |")
    ]
    assert len(lines) == 2, r.stdout
    for mod, line in zip((triton_backend, cupy_backend), lines, strict=True):
        strategy = line.split(" | ")[4]
        if hasattr(mod, "static_model"):
            assert strategy != "n/a", line
        else:
            assert strategy == "n/a" and "has no static_model() yet" in line, line


@pytest.mark.gpu
def test_linear_ce_and_vp_ce_on_the_gpu(tmp_path):
    """On a CUDA GPU: linear_ce at a small bf16 shape with the CUDA memory figures, and the
    vp_ce simulation over NCCL (world size 1) for P = 1, 2."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    from bench import linear_ce as L
    from bench import vp_ce as V

    names = [n for n in L.resolve(["ours", "torch"], "cuda") if "autograd" not in n]
    res = L.run("cuda", shapes=[L.Shape(512, 64, 1000)], dtypes=["bf16"], names=names,
                progress=lambda s: None)  # fmt: skip
    ok = [r for r in res["rows"] if r["status"] == "ok"]
    assert any(r["provider"] == "torch" for r in ok), res["rows"]
    for r in ok:
        assert r["ms"] > 0 and r["peak_bytes"] >= r["memory"]["output_bytes"] > 0
    rows = V.run_sim([(256, 1000)], [1, 2], "bf16", say=lambda s: None)
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
