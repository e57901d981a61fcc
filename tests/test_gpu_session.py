"""The one-call GPU session (bench/gpu_session.py, bench/gpu_shard.py, bench/sanitize_driver.py),
on the CPU: the plan fits the device tool's limits, steps are stopped with SIGINT and then
killed, a failing step never stops the next, $OUT never holds more than 8 files and keeps a
current summary and archive, the test shards split by compile key and survive a sticky CUDA
error, the sanitizer driver's cases come from the backends' planners and its checks catch a
wrong result."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import gpu_session as S  # noqa: E402
from bench import gpu_shard as GS  # noqa: E402
from bench import sanitize_driver as D  # noqa: E402


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "python"), str(ROOT), env.get("PYTHONPATH", "")]
    )
    env.update(extra)
    return env


# ----------------------------------------------------------------------------------------------
# the plan


@pytest.mark.parametrize("mode", ["main", "second", "lce"])
def test_dry_run_fits_the_call(mode):
    # main: ~7 min of the 10-minute command limit; second: ~4 min; lce: ~7 min
    budget = {"main": 7 * 60, "second": 4 * 60, "lce": 7 * 60}[mode]
    args = ["--dry-run"] if mode == "main" else [mode, "--dry-run"]
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), *args], cwd="/",
                       env=_env(PYTHON=sys.executable), capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    steps = S.make_steps(mode)
    for s in steps:  # every step is printed with its limit
        assert f"{s.key:3s} {s.name:12s} limit {s.limit_s:4.0f} s" in r.stdout
        assert 0 < s.grace_s < s.limit_s
    total = S.total_seconds(steps)
    assert f"total {total:.0f} s" in r.stdout and total <= budget
    if mode == "main":  # the order: probe, tests, sanitizers, bench
        fg = [s.key for s in steps if not s.background]
        assert fg == ["a", "b", "c1", "c2", "c3", "d"]
        assert [s.name for s in steps if s.group == "sanitizer"] == [
            "memcheck", "racecheck", "synccheck"]  # fmt: skip


def test_special_bench_step_copies_its_outputs_and_summarises(tmp_path):
    """The lce mode's step on the CPU: python -m bench --ops linear_ce at a tiny shape, its
    JSON, markdown and plot copied into $OUT, the summary line from its rows."""
    out, work = tmp_path / "out", tmp_path / "work"
    step = S.Step("d1", "linear-ce", 120, 20, "test",
                  S.step_special("linear_ce", ["--device", "cpu", "--quick", "--shapes",
                                               "64x8x100", "--providers", "ours-numpy,cs231n",
                                               "--name", "t"], 60))  # fmt: skip
    session = S.Session("lce", [step], out, work, S.Config())
    assert session.run() == 0, (work / "logs" / "d1-bench.log").read_text()
    assert step.result.status == "ok" and step.result.detail.startswith("2 ok"), step.result
    names = set(os.listdir(out))
    assert {"t-linear_ce.json", "t-linear_ce.md"} <= names
    assert "t-linear_ce.png" in names or not _has_mpl()


def _has_mpl() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def test_total_counts_groups_background_and_waits():
    def st(key, limit, **kw):
        return S.Step(key, key, limit, 1, "", lambda s, t: S.Result("ok"), **kw)

    steps = [st("w", 100, background=True), st("a", 10), st("g1", 30, group="g"),
             st("g2", 50, group="g"), st("z", 5)]  # fmt: skip
    assert S.total_seconds(steps) == 100  # the background step outlasts 10 + 50 + 5
    steps[-1].after = ("w",)
    assert S.total_seconds(steps) == 105  # z waits for w


# ----------------------------------------------------------------------------------------------
# the session with fake steps


def _py_step(key, code, limit, grace=1.0):
    def run(session, step):
        job = S.Job(key, [sys.executable, "-c", textwrap.dedent(code)],
                    session.logs / f"{key}.log", session.env())  # fmt: skip
        ended, _ = S.run_jobs(session, step, [job])
        ok = job.rcs == [0]
        return S.Result(S._ended_status(ended, ok), f"rc {job.rcs}" + S._cut_note(ended, step))

    return S.Step(key, f"fake-{key}", limit, grace, "fake", run)


HANDLES_SIGINT = """
    import time
    print("started", flush=True)
    try:
        time.sleep(30)
    except KeyboardInterrupt:
        print("interrupted: writing partial results", flush=True)
        raise SystemExit(130)
"""
IGNORES_SIGINT = """
    import signal, time
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("ignoring SIGINT", flush=True)
    time.sleep(30)
"""


def _watch_out(out: Path, stop: threading.Event, seen: list[int]):
    while not stop.is_set():
        try:
            seen.append(len(os.listdir(out)))
        except FileNotFoundError:
            pass
        time.sleep(0.02)


def test_session_limits_sigint_kill_and_out(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "REPACK_EVERY_S", 0.2)
    out, work = tmp_path / "out", tmp_path / "work"
    steps = [
        _py_step("a", "print('probe ok')", 10),
        _py_step("b", "import sys; print('boom'); sys.exit(3)", 10),  # fails: c still runs
        # (SIGINT at 3 s, not 1: a Python that starts slowly on a loaded machine must have
        # installed its handler by then)
        _py_step("c", HANDLES_SIGINT, 6.0, 3.0),  # SIGINT at 3 s: writes its partial output
        _py_step("d", IGNORES_SIGINT, 6.0, 3.0),  # ignores SIGINT: killed at 6 s
        _py_step("e", "print('last')", 10),
    ]
    session = S.Session("main", steps, out, work, S.Config())
    for i in range(12):  # plant more files than $OUT may hold: add_out must refuse past 7
        p = work / f"r{i}.txt"
        p.write_text("x")
    seen: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_out, args=(out, stop, seen))
    watcher.start()
    t0 = time.time()
    try:
        added = [session.add_out(work / f"r{i}.txt") for i in range(12)]
        rc = session.run()
    finally:
        stop.set()
        watcher.join()
    took = time.time() - t0
    assert rc == 1 and took < 30
    # 8 files: summary, archive, a free slot for an atomic rewrite, 5 results
    assert sum(added) == S.MAX_OUT_FILES - 3
    assert max(seen) <= S.MAX_OUT_FILES
    st = {s.key: s.result.status for s in steps}
    assert st == {"a": "ok", "b": "FAILED", "c": "TIMEOUT", "d": "KILLED", "e": "ok"}
    assert 2.9 < steps[2].result.elapsed < 6.0  # ended by the SIGINT, before its kill
    assert 5.9 < steps[3].result.elapsed < 7.5
    summary = (out / "summary.txt").read_text().splitlines()
    assert [ln.split()[0] for ln in summary[1:]] == ["a", "b", "c", "d", "e"]
    assert "stopped by SIGINT at 3 s" in summary[3] and "killed at 6 s" in summary[4]
    with tarfile.open(session.archive) as tf:
        names = set(tf.getnames())
        logc = tf.extractfile("c.log").read().decode()
    assert {"a.log", "b.log", "c.log", "d.log", "e.log", "summary.txt"} <= names
    assert "interrupted: writing partial results" in logc
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temporary left


def test_session_stopped_by_sigterm_keeps_its_output(tmp_path):
    """The orchestrator itself stopped (SIGTERM): the running step gets SIGINT, the rest are
    skipped, the summary and the archive are written."""
    code = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
sys.path.insert(0, {str(Path(__file__).parent)!r})
from bench import gpu_session as S
from test_gpu_session import _py_step, HANDLES_SIGINT
steps = [_py_step("a", HANDLES_SIGINT, 30, 5), _py_step("b", "print(1)", 10)]
s = S.Session("main", steps, S.Path({str(tmp_path / "out")!r}), S.Path({str(tmp_path / "w")!r}),
              S.Config())
S.install_signal_handlers(s)
raise SystemExit(s.run())
"""
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    log = tmp_path / "w" / "logs" / "a.log"
    t0 = time.time()
    while not (log.exists() and "started" in log.read_text()) and time.time() - t0 < 20:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    text = p.communicate(timeout=30)[0]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert p.returncode == 1, text
    assert "a   fake-a       TIMEOUT" in summary, summary
    assert "b   fake-b       SKIPPED" in summary and "session stopped" in summary
    with tarfile.open(tmp_path / "out" / "gpu-main-logs.tgz") as tf:
        assert "interrupted" in tf.extractfile("a.log").read().decode()


def test_results_and_sanitizer_logs_are_parsed(tmp_path):
    st = tmp_path / "s"
    st.mkdir()
    rows = [
        ("t::a", "setup", "passed"),
        ("t::a", "call", "passed"),
        ("t::b", "call", "failed"),
        ("t::c", "setup", "failed"),
        ("t::d", "setup", "skipped"),
        ("t::e", "setup", "passed"),
    ]
    (st / "results-0.jsonl").write_text(
        "".join(json.dumps({"id": i, "when": w, "outcome": o}) + "\n" for i, w, o in rows)
        + '{"id": "t::f", "wh'  # a line cut by a kill
    )  # fmt: skip
    (st / "assigned-0.txt").write_text("t::a\nt::b\nt::c\nt::d\nt::e\nt::g\n")
    r = S.collect_results(st)
    assert r["counts"] == {"passed": 1, "failed": 1, "error": 1, "skipped": 1, "started": 1}
    assert r["failed"] == ["t::b", "t::c", "t::e"] and r["not_run"] == ["t::g"]

    mem = "========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n"
    assert S.parse_sanitizer_log(mem)["errors"] == 0
    bad = ("========= Invalid __global__ read of size 16 bytes\n=========     at k+0x10\n"
           "========= ERROR SUMMARY: 1 error\n")  # fmt: skip
    v = S.parse_sanitizer_log(bad)
    assert v["errors"] == 1 and v["kinds"] == {"Invalid __global__ read": 1}
    race = "========= RACECHECK SUMMARY: 3 hazards displayed (1 error, 2 warnings)\n"
    v = S.parse_sanitizer_log(race)
    assert (v["hazards"], v["errors"], v["warnings"]) == (3, 1, 2)
    assert S.parse_sanitizer_log("========= Error: Device not supported\n")["unsupported"]
    assert S.parse_sanitizer_log("python died")["errors"] is None  # no summary: not a pass


# ----------------------------------------------------------------------------------------------
# the test shards


FAKE_CONFTEST = """
import pytest
class T:
    def __init__(self, backend):
        self.backend = backend
    def __repr__(self):
        return f"T({self.backend})"
def pytest_generate_tests(metafunc):
    if "target" in metafunc.fixturenames:
        metafunc.parametrize("target", [
            pytest.param(T("triton"), id="triton-torch-cuda", marks=pytest.mark.gpu),
            pytest.param(T("triton"), id="triton-cupy-cuda", marks=pytest.mark.gpu),
            pytest.param(T("cupy"), id="cupy-cupy-cuda", marks=pytest.mark.gpu),
            pytest.param(T("numpy"), id="numpy-numpy-cpu")])
def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: fake")
"""
FAKE_TESTS = """
import os, pytest
@pytest.mark.parametrize("n", range(8))
def test_a(target, n):
    assert n >= 0
@pytest.mark.parametrize("n", range(3))
def test_b(target, n):
    if (n, target.backend) == (1, "triton") and "torch" in os.environ["PYTEST_CURRENT_TEST"]:
        if not os.path.exists(os.environ["STICKY_MARK"]):  # the first run only
            open(os.environ["STICKY_MARK"], "w").close()
            # the source line above quotes no CUDA error; this message is one
            raise RuntimeError("CUDA error: an " + "illegal memory access was encountered")
    assert not (n == 2 and target.backend == "cupy"), "planted failure"
"""
NEEDS_HYPOTHESIS = "from hypothesis import given\n\ndef test_never():\n    pass\n"


def _fake_suite(tmp_path):
    d = tmp_path / "suite" / "tests"
    d.mkdir(parents=True)
    (d / "conftest.py").write_text(FAKE_CONFTEST)
    (d / "test_fake.py").write_text(FAKE_TESTS)
    (d / "test_props.py").write_text(NEEDS_HYPOTHESIS)
    # its own ini file: the suite's rootdir (and so its test ids) wherever the clone is (without
    # one, pytest takes the common ancestor of the clone and the suite: /tmp for a clone in /tmp)
    (d / "pytest.ini").write_text("[pytest]\n")
    # hypothesis "missing": a stand-in that fails to import, first on the path
    shadow = tmp_path / "shadow" / "hypothesis"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no hypothesis here')\n")
    return d, tmp_path / "shadow"


@pytest.mark.parametrize("xdist", [False, True], ids=["shards", "xdist"])
def test_shards_survive_a_sticky_error(tmp_path, monkeypatch, xdist):
    if xdist and not S._has("xdist"):
        pytest.skip("pytest-xdist is not installed (the GPU machine has it)")
    suite, shadow = _fake_suite(tmp_path)
    monkeypatch.setenv("STICKY_MARK", str(tmp_path / "sticky.mark"))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])
    )
    # as where hypothesis is not installed: no pytest plugin of its own either
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    cfg = S.Config(test_paths=(str(suite),), shards=3, xdist=xdist, keep_dir=tmp_path / "keep")
    steps = [S.Step("b", "gpu-tests", 60, 10, "fake", S.step_tests)]
    session = S.Session("main", steps, tmp_path / "out", tmp_path / "work", cfg)
    session.run()
    res = steps[0].result
    # 11 parametrised tests x 3 GPU targets; one failure planted, one sticky error
    assert res.status == "FAILED", res
    assert res.detail.startswith("31 passed, 2 failed"), res.detail
    assert "sticky CUDA error first seen in test_fake.py::test_b[triton-torch-cuda-1]" in res.detail
    assert ("restart(s)" in res.detail) != xdist and ("replaced" in res.detail) == xdist
    failed = (tmp_path / "out" / "failed-tests.txt").read_text().split()
    assert failed == [
        "test_fake.py::test_b[cupy-cupy-cuda-2]",
        "test_fake.py::test_b[triton-torch-cuda-1]",
    ]
    logs = "".join(p.read_text() for p in (tmp_path / "work" / "logs").glob("b-*.log"))
    if not xdist:  # (xdist workers' prints do not reach the log)
        assert "not collecting test_props.py: hypothesis is not installed" in logs
    assert "ERROR collecting" not in logs
    st = tmp_path / "work" / "logs" / "b-state"
    assigned = [x for f in st.glob("assigned-*.txt") for x in f.read_text().split()]
    assert len(assigned) == len(set(assigned)) == 33  # what "not run" is counted against
    if not xdist:
        # `second`: the failing ids again (from the kept list), CUDA_LAUNCH_BLOCKING=1; the
        # sticky error does not recur (its mark exists), the planted failure does
        assert (tmp_path / "keep" / "failed-tests.txt").read_text().split() == failed
        rerun = [S.Step("b", "rerun-failed", 60, 10, "fake", S.step_rerun)]
        cfg.shards = 0
        S.Session("second", rerun, tmp_path / "out2", tmp_path / "work2", cfg).run()
        r2 = rerun[0].result
        assert r2.detail.startswith("2 ids from failed-tests.txt, CUDA_LAUNCH_BLOCKING=1: "
                                    "1 passed, 1 failed"), r2.detail  # fmt: skip
    if not xdist:  # every test ran exactly once over the shards and the restart
        done = [x for f in st.glob("done-*.txt") for x in f.read_text().split()]
        assert len(done) == len(set(done)) == 33


class _Item:
    def __init__(self, nodeid, backend=None, **params):
        self.nodeid = nodeid
        self.fspath = nodeid.split("::")[0]
        if backend:
            params["target"] = type("T", (), {"backend": backend})()
        self.callspec = type("C", (), {"params": params})() if params else None


def test_compile_keys_and_balanced_shards():
    # the same kernels on torch tensors and CuPy arrays: one key; another shape: another key
    a = _Item("tests/test_softmax.py::test_f[triton-torch-cuda-float16-s1]", "triton",
              dtype="float16", shape=(3, 7))  # fmt: skip
    b = _Item("tests/test_softmax.py::test_f[triton-cupy-cuda-float16-s1]", "triton",
              dtype="float16", shape=(3, 7))  # fmt: skip
    c = _Item("tests/test_softmax.py::test_f[triton-torch-cuda-float16-s2]", "triton",
              dtype="float16", shape=(3, 9))  # fmt: skip
    d = _Item("tests/test_cupy_backend.py::test_g[cuda]")
    assert GS.compile_key(a) == GS.compile_key(b) != GS.compile_key(c)
    assert GS.backend_of(d) == "cupy" and GS.compile_key(d).startswith("cupy|")
    items = [_Item(f"t.py::f[{i}]", "triton", i=i) for i in range(40)]
    items += [_Item(f"t_cupy.py::g[{i}]", "cupy", i=i) for i in range(200)]
    where = GS.assign_shards(items, 4)
    assert where == GS.assign_shards(items, 4)  # every shard process computes the same split
    load = [0.0] * 4
    for it, s in zip(items, where, strict=True):
        load[s] += (GS.COMPILE_S if GS.compile_key(it).startswith("triton") else 0) + GS.RUN_S
    # LPT: no shard more than one group's weight above another
    assert max(load) - min(load) <= GS.COMPILE_S + GS.RUN_S + 1e-9, load
    # the tests of one Triton key land on one shard
    same = [_Item(f"t.py::h[{k}-{i}]", "triton", i=i) for k in ("torch", "cupy") for i in range(9)]
    # measured seconds replace the model: one slow test gets a shard to itself
    weights = {it.nodeid: 0.1 for it in items}
    weights[items[0].nodeid] = 100.0
    w1 = GS.assign_shards(items, 4, weights)
    assert [s for s in w1 if s == w1[0]] == [w1[0]]
    w2 = GS.assign_shards(same, 4)
    assert all(w2[i] == w2[i + 9] for i in range(9)) and len(set(w2)) == 4
    assert (
        GS.base_id("t.py::f[1]@k0012") == "t.py::f[1]"
        and GS.base_id("t.py::f[a@b]") == "t.py::f[a@b]"
    )


# ----------------------------------------------------------------------------------------------
# the sanitizer driver


@pytest.fixture(scope="module")
def planners():
    return D.planners_for(D.H200_SM, D.H200_SMEM_OPTIN)


@pytest.fixture(scope="module")
def plan(planners):
    return D.plan_cases(planners)


def test_driver_covers_every_plan_from_the_planners(plan, planners):
    cases, notes = plan
    cb = pytest.importorskip("softmax_kernels.backends.cupy_backend")
    planners = {p.backend: p for p in planners}
    assert set(planners) == {"triton", "cupy"}
    for be, pl in planners.items():
        for op, variant, api_ops, _extra in pl.ops:
            for dtype in pl.dtypes:
                # every kernel instance (fine key) the planner produces at 1..2**20 columns
                fines = set()
                for r in pl.rows:
                    key = functools.partial(D._key_at, pl.plan_key, op, variant, dtype, r)
                    fines |= {fine for (_c, fine), _lo, _hi in D.segments(key)}
                soft = dict(_extra).get("soft", False)
                mine = [c for c in cases if c.backend == be and c.dtype == dtype
                        and c.covers.startswith(op + " ") and c.priority <= 1
                        and c.layout == "contig" and c.op == api_ops[0]
                        and dict(c.options).get("soft", False) == soft]  # fmt: skip
                got = {c.covers[len(op) + 1 :] for c in mine}
                # A plan the driver leaves out must be one it cannot realise within its element
                # budget (a sanitizer pass must fit its step), and the summary says so.
                for fine in fines - got:
                    why = f"{be} {op} {D._vname(variant)}{dtype} {fine}: every realisation exceeds"
                    assert any(n.startswith(why) for n in notes), (be, op, variant, dtype, fine)
                    reals = [r * c for r in pl.rows for c in range(1, D.MAX_COLS + 1, 4099)
                             if pl.key(op, variant, dtype, r, c)[1] == fine]  # fmt: skip
                    assert not reals or min(reals) > D.MAX_ELEMS, (be, op, dtype, fine, reals)
                # each case really lands on the plan it claims (a forced one under forced_plan)
                for c in mine:
                    with D.forced_plan(c.forced, record=False) if c.forced else _nothing():
                        fine = pl.key(op, variant, dtype, c.n_rows, c.n_cols)[1]
                    assert fine == c.covers[len(op) + 1 :], c
    # every strategy either planner can return (derived from the planners, not listed here)
    # has contiguous cases and misaligned-output cases; Triton's online loop, which the planner
    # takes for the softmax ops and cross-entropy with a gradient only from ~133 rows of
    # 512K-1M columns, is forced at a small size (forced_plan), for every op, a half type and
    # float32, with a mask and a strided row
    for be, strategies in _planner_strategies().items():
        for st in strategies:
            for lay in ("contig", "offset-out"):
                assert any(c.backend == be and c.covers.split(" ")[-1].split("+")[0] == st
                           and c.layout == lay for c in cases), (be, st, lay)  # fmt: skip
    forced = [c for c in cases if c.forced]
    assert {c.forced for c in forced} == {"online"}
    assert {c.op for c in forced} == {"softmax", "log_softmax", "softmax_backward",
                                      "log_softmax_backward", "ce_grad"}  # fmt: skip
    # (the loss alone takes online by itself: rows of 8193-32767 elements, checked below)
    for dt in ("bfloat16", "float32"):
        mine = {
            (c.op, c.layout, k) for c in forced if c.dtype == dt for k in ("", *dict(c.options))
        }
        for op in ("softmax", "softmax_backward", "ce_grad"):
            assert (op, "rowpad", "") in mine, (dt, op)
        assert ("softmax", "contig", "mask") in mine, dt
        assert any(c.op == "ce" and c.dtype == dt and " online" in c.covers for c in cases), dt
    assert not any("online" in n and "not driven" in n for n in notes), notes
    # both sides of the float32 forward's (a)/(b) threshold
    wmax = cb.warp_max_cols(4)
    sm32 = {c.n_cols for c in cases if c.backend == "cupy" and c.op == "softmax"
            and c.dtype == "float32" and c.layout == "contig"}  # fmt: skip
    assert {wmax, wmax + 1} <= sm32
    assert any(c.n_cols % 2 == 1 and c.n_cols > 1000 for c in cases)  # odd long rows
    layouts = {c.layout for c in cases}
    assert {"contig", "offset", "offset-out", "rowpad", "cupy-array"} <= layouts
    opts = {k for c in cases for k, _ in c.options}
    assert {"mask", "scale", "weight", "label_smoothing", "z_loss", "soft", "ignore", "bad",
            "inplace", "softcap", "return_lse"} <= opts  # fmt: skip
    assert all(c.n_rows * c.n_cols <= D.MAX_ELEMS for c in cases)
    assert [c.priority for c in cases] == sorted(c.priority for c in cases)


@contextlib.contextmanager
def _nothing():
    yield


def _planner_strategies() -> dict[str, set[str]]:
    """The strategies each backend's planner can return: CuPy's from its STRATEGY_NAMES; Triton's
    from _launch_config over every op it plans, dtype, with and without a merge wait, the
    interpreter and an H200, rows from 1 to 10**5 and 1 to 2**22 columns."""
    cb = pytest.importorskip("softmax_kernels.backends.cupy_backend")
    tb = pytest.importorskip("softmax_kernels.backends.triton_backend")
    triton = set()
    for op in tb._SINGLE_PASS_VALUES:
        for dtype in D.DTYPES:
            for n_rows in (1, 3, 133, 10**5):
                for n_cols in (1, 7, 1000, 4097, 8193, 16385, 70001, 2**19 + 1, 2**20, 2**22):
                    for n_sm in (None, 132):
                        for wait in (True, False):
                            triton.add(tb._launch_config(n_rows, n_cols, dtype, op, n_sm,
                                                         merge_wait=wait).strategy)  # fmt: skip
    assert {"rows", "row", "online", "split"} <= triton, triton
    return {"cupy": set(cb.STRATEGY_NAMES.values()), "triton": triton}


def test_driver_follows_a_new_strategy_and_old_signatures():
    # a planner with one more strategy past 300000 columns, and no smem_limit keyword
    def plan_launch(op, dtype_name, n_cols, *, vec_ok=True):
        return type("P", (), {"strategy_name": "split" if n_cols > 300000 else "one",
                              "strategy": 0, "lanes": 1, "packs": 1})()  # fmt: skip

    assert D._call(plan_launch, "softmax_fwd", "float32", 5, smem_limit=1, vec_ok=True)
    pl = D.Planner("cupy", [("softmax_fwd", {}, ("softmax", "log_softmax"), ())],
                   lambda op, v, dt, r, n: (D._call(plan_launch, op, dt, n, smem_limit=1)
                                            .strategy_name,) * 2,
                   (3,), ("float32",))  # fmt: skip
    cases, _ = D.plan_cases([pl])
    cols = sorted({c.n_cols for c in cases if c.layout == "contig" and not c.options})
    assert cols == [1, 300000, 300001, D.MAX_COLS]
    assert {c.covers for c in cases} == {"softmax_fwd one", "softmax_fwd split"}
    assert D._api_ops("cross_entropy_stats", {}) is None  # listed as not driven, not guessed


def test_driver_runs_and_catches_a_wrong_result(plan):
    """The driver's inputs, layouts and checks on the CPU: the NumPy backend in place of a GPU
    backend (the arrays are torch CPU tensors), and a wrong result must be reported."""
    pytest.importorskip("torch")
    cases, _ = plan
    small = [c for c in cases if c.backend == "cupy" and c.n_rows * c.n_cols <= 600
             and c.layout != "cupy-array"]  # fmt: skip
    pick, seen = [], set()
    for c in small:  # one case per (op, layout, options): the kinds of calls the driver makes
        k = (c.op, c.layout, c.options)
        if dict(c.options).get("bad"):
            continue  # the NumPy backend raises on an out-of-range target (the contract)
        if k not in seen:
            seen.add(k)
            pick.append(D.Case("numpy", c.op, c.dtype, c.n_rows, c.n_cols, c.layout, c.options,
                               c.covers, c.priority))  # fmt: skip
    assert {c.op for c in pick} == {"softmax", "log_softmax", "softmax_backward",
                                    "log_softmax_backward", "ce", "ce_grad"}  # fmt: skip
    assert {c.layout for c in pick} >= {"contig", "offset", "offset-out", "rowpad"}
    rep = D.run_cases(pick, 120, device="cpu", log=lambda m: None)
    assert rep["ran"] == len(pick), rep["errors"]
    assert rep["mismatch"] == 0 and rep["error"] == 0, rep
    runner = D.Runner("cpu")
    ref = np.full((3, 5), 0.2)
    ok = runner._compare({}, "float32", [("y", ref * (1 + 5e-6), ref)])
    off = runner._compare({}, "float32", [("y", ref * (1 + 5e-5), ref)])
    assert ok["ok"] and not off["ok"] and off["err_ratio"] > 1
    nan = runner._compare({}, "float32", [("loss", np.array([np.nan, 1.0]), np.array([2.0, 1.0]))])
    assert not nan["ok"]


def test_driver_plan_command_runs_without_a_gpu():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "sanitize_driver.py"), "--plan",
                        "--part", "1/4", "--json", "--max-cols", "2048", "--n-sm", "132",
                        "--smem-limit", "232448"], cwd="/", env=_env(),
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["cases"] and all(c["backend"] in ("triton", "cupy") for c in got["cases"])


def test_driver_forced_online_cases_run_under_the_interpreter(plan, monkeypatch):
    """The forced online cases on the CPU (the Triton interpreter, torch CPU tensors, the SM
    count of an H200 given to the planner): each op, float32 and bfloat16, contiguous, a strided
    row and a mask, checked against the NumPy backend and for the plan it really took; a case
    whose plan drifts to another strategy is an error, not a pass."""
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cases, _ = plan
    pick = [c for c in cases if c.forced and c.dtype in ("float32", "bfloat16")
            and (c.layout in ("contig", "rowpad") and c.priority <= 1
                 or dict(c.options).get("mask") == "row")]  # fmt: skip
    assert {c.op for c in pick} >= {"softmax", "softmax_backward", "ce_grad"}
    rep = D.run_cases(pick, 120, device="cpu", log=lambda m: None)
    if rep["unavailable"]:
        pytest.skip("the Triton backend is not available on this machine")
    assert rep["ran"] == len(pick) and rep["mismatch"] == rep["error"] == 0, rep
    # the limits not lowered: the planner keeps its own plan, and the driver says so
    monkeypatch.setitem(D.FORCED_LIMITS, "online", {})
    rep = D.run_cases(pick[:1], 60, device="cpu", log=lambda m: None)
    assert rep["error"] == 1 and "forced online: the planner gave" in rep["errors"][0], rep
