"""The one-call GPU session: ``bash bench/gpu_session.sh [second] [--dry-run]``.

What a lent H100/H200 runs, in one call of the device tool (10 minutes per command, 8 files back
from ``$OUT``, no package registry). The main call (~7 min of command time) runs, most valuable
first:

  a   probe: nvidia-smi, library versions, ``python -m softmax_kernels info``, the tools;
  w   (beside a and b) the CuPy backend's NVRTC modules, one process per dtype, into CuPy's
      disk cache, so the test shards load them instead of compiling each one 10-45 s;
  b   the ``gpu`` tests in parallel (``bench/gpu_shard.py``): pytest-xdist workers when it is
      installed, else background pytest processes balanced by estimated compile count (tests
      grouped by Triton compile key); a sticky CUDA error ends only its own worker or shard,
      which is replaced or restarted on the tests it had not run;
  c0  (beside b) the sanitizer driver without a sanitizer, in 6 parts: every case checked
      against the float64 NumPy reference, and its Triton kernels compiled into Triton's cache;
  c1  compute-sanitizer memcheck, c2 racecheck, c3 synccheck, side by side, over
      ``bench/sanitize_driver.py`` (every launch strategy of both GPU backends, odd row lengths,
      misaligned views; CuPy's pool and torch's caching allocator off);
  d   ``python -m bench --quick`` (ours, torch and the copy; float64 reference from torch).

``second`` (optional, ~4 min): the failing test ids of the main call again with
``CUDA_LAUNCH_BLOCKING=1``, then QuACK's grid for softmax forward and CE forward + gradient in
bf16 against torch and the copy.

``lce`` (optional, ~7 min): ``python -m bench --ops linear_ce --quick`` (fused linear +
cross-entropy on the Llama-3 and Gemma-2 heads in bf16 against torch eager, torch.compile and
torch's linear_cross_entropy, with peak memory), then ``--ops vp_ce --quick`` (the
vocabulary-parallel merge, P shards simulated on the one GPU).

Every step has its own limit: SIGINT at ``limit - grace`` (pytest prints its summary,
``python -m bench`` writes what it measured), SIGKILL at the limit. A failing step never stops
the next. ``$OUT`` holds at most 8 files at any moment: ``summary.txt`` (one line per step,
rewritten at every step's start and end), the logs archive (re-packed every
``REPACK_EVERY_S`` while a step runs), ``failed-tests.txt`` and the bench results (JSON, CSV,
markdown, one plot). A command cut off at 10 minutes still returns everything done so far.
``--dry-run`` prints each step with its limit and the total (tests/test_gpu_session.py asserts
it fits).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Command-time budgets of the two calls (the device tool allows 10 minutes per command; a GPU
# comes for 15 minutes in all, ~1.5 of which its start takes).
BUDGET_S = {"main": 420.0, "second": 240.0, "lce": 420.0}
MAX_OUT_FILES = 8
REPACK_EVERY_S = 20.0
# The dtypes whose NVRTC module the warm-up compiles (cupy_backend: one module per dtype).
WARM_DTYPES = ("float16", "bfloat16", "float32", "float64")
STICKY_EXIT = 75  # gpu_shard: a shard stopped after a sticky CUDA error
# Seconds per gpu test id measured by a previous session (its archive's b-durations.json,
# committed here): the background shards balance by them instead of the compile-count model.
TEST_SECONDS = ROOT / "bench" / "gpu_test_seconds.json"


# ----------------------------------------------------------------------------------------------
# Steps and results


@dataclass
class Result:
    status: str  # ok | FAILED | TIMEOUT (SIGINT at its limit) | KILLED | SKIPPED | ERROR
    detail: str = ""
    elapsed: float = 0.0


@dataclass
class Step:
    key: str
    name: str
    limit_s: float  # hard limit: SIGINT at limit_s - grace_s, SIGKILL at limit_s
    grace_s: float
    what: str
    run: Callable[[Session, Step], Result]
    background: bool = False  # runs beside the steps that follow it (within its own limit)
    group: str | None = None  # consecutive steps of one group run side by side
    after: tuple[str, ...] = ()  # background steps (keys) to wait for before starting
    result: Result | None = None
    started: float | None = None


@dataclass
class Config:
    python: str = sys.executable
    test_paths: tuple[str, ...] = ("tests",)
    marker: str = "gpu"
    shards: int = 0  # 0: one per CPU core less two, at least 2
    xdist: bool | None = None  # None: when importable
    failed_ids: str | None = None  # second: the main call's failed-tests.txt
    bench_args: tuple[str, ...] = ()  # extra arguments of python -m bench (tests)
    # where the failing ids are also kept: ignored, so it survives on a machine kept warm for
    # the `second` call
    keep_dir: Path = ROOT / "build" / "gpu-session"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 2


def _has(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------
# Processes: each in its own process group, stopped with SIGINT, then killed


class Job:
    """One line of work inside a step: a command, and what to run after it exits (a shard's
    restart after a sticky CUDA error), if anything."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None,
                 then: Callable[[Job, int], list[str] | None] | None = None):  # fmt: skip
        self.name, self.cmd, self.log, self.env, self.then = name, cmd, log, env, then
        self.rcs: list[int] = []
        self.proc: subprocess.Popen | None = None
        self.signalled: str | None = None

    def start(self, cmd: list[str]) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as f:
            f.write(f"$ {' '.join(cmd)}\n".encode())
            f.flush()
            self.proc = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=ROOT, start_new_session=True,
            )  # fmt: skip

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def run_jobs(session: Session, step: Step, jobs: list[Job]) -> tuple[str, float]:
    """Run jobs side by side under the step's limit. Returns (how it ended: 'done', 'sigint' or
    'killed', seconds). A job's ``then`` may start a follow-up command while time is left."""
    t0 = time.time()
    int_at, kill_at = t0 + step.limit_s - step.grace_s, t0 + step.limit_s
    for j in jobs:
        j.start(j.cmd)
    active = list(jobs)
    ended = "done"
    while active:
        now = time.time()
        if ended == "done" and (now >= int_at or session.stopping.is_set()):
            ended = "sigint"
            for j in active:
                j.signalled = "SIGINT"
                j.signal(signal.SIGINT)
        if now >= kill_at:
            ended = "killed"
            for j in active:
                j.signalled = "SIGKILL"
                j.signal(signal.SIGKILL)
            for j in active:
                j.proc.wait()
                j.rcs.append(j.proc.returncode)
            break
        for j in list(active):
            rc = j.proc.poll()
            if rc is None:
                continue
            j.rcs.append(rc)
            nxt = j.then(j, rc) if (j.then and ended == "done" and now < int_at - 5) else None
            if nxt:
                j.start(nxt)
            else:
                active.remove(j)
        time.sleep(0.1)
    return ended, time.time() - t0


def _ended_status(ended: str, ok: bool) -> str:
    if ended == "killed":
        return "KILLED"
    if ended == "sigint":
        return "TIMEOUT"
    return "ok" if ok else "FAILED"


def _cut_note(ended: str, step: Step) -> str:
    if ended == "sigint":
        return f"; stopped by SIGINT at {step.limit_s - step.grace_s:.0f} s"
    if ended == "killed":
        return f"; killed at {step.limit_s:.0f} s"
    return ""


# ----------------------------------------------------------------------------------------------
# The session: summary, archive, $OUT


class Session:
    def __init__(self, mode: str, steps: list[Step], out: Path, work: Path, cfg: Config):
        self.mode, self.steps, self.out, self.work, self.cfg = mode, steps, out, work, cfg
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.archive = out / f"gpu-{mode}-logs.tgz"
        self.t0 = time.time()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.state: dict[str, object] = {}

    def warm_marker(self) -> Path | None:
        """The NVRTC warm-up's marker file, when this session has a warm-up step."""
        if any(s.run is step_warm for s in self.steps):
            return self.work / "warm.done"
        return None

    # -- $OUT ----------------------------------------------------------------------------------
    def out_files(self) -> list[str]:
        return sorted(p.name for p in self.out.iterdir())

    def _replace(self, tmp: Path, dst: Path) -> None:
        os.replace(tmp, dst)

    def write_summary(self) -> None:
        lines = [f"gpu_session {self.mode}: {time.strftime('%Y-%m-%d %H:%M:%S')}, "
                 f"{time.time() - self.t0:.0f} s so far of a {BUDGET_S.get(self.mode, 0):.0f} s "
                 "budget"]  # fmt: skip
        for s in self.steps:
            if s.result is not None:
                r = s.result
                st, el = r.status, f"{r.elapsed:.0f}s"
                det = r.detail
            elif s.started is not None:
                st, el, det = "running", f"{time.time() - s.started:.0f}s", ""
            else:
                st, el, det = "pending", "-", ""
            det = det if len(det) <= 400 else det[:397] + "..."
            lines.append(
                f"{s.key:3s} {s.name:12s} {st:8s} {el:>5s}/{s.limit_s:.0f}s  {det}".rstrip()
            )
        with self.lock:
            tmp = self.out / ".summary.txt.tmp"
            tmp.write_text("\n".join(lines) + "\n")
            self._replace(tmp, self.out / "summary.txt")
        (self.logs / "summary.txt").write_text("\n".join(lines) + "\n")

    def pack(self) -> None:
        """Re-pack every log so far into the one archive in $OUT (atomically replaced)."""
        with self.lock:
            tmp = self.out / ".logs.tgz.tmp"
            with tarfile.open(tmp, "w:gz", compresslevel=6) as tf:
                for p in sorted(self.logs.rglob("*")):
                    if p.is_file():
                        try:
                            tf.add(p, arcname=str(p.relative_to(self.logs)))
                        except OSError:
                            pass  # a log vanishing mid-pack
            self._replace(tmp, self.archive)

    def add_out(self, src: Path, name: str | None = None) -> bool:
        """Copy a file into $OUT if that keeps it at MAX_OUT_FILES - 1 files, summary.txt and the
        archive counted even before they exist (one slot stays free for the temporary of an
        atomic rewrite). Everything is in the archive anyway."""
        with self.lock:
            name = name or src.name
            names = {p.name for p in self.out.iterdir() if not p.name.startswith(".")}
            names |= {"summary.txt", self.archive.name}
            if name not in names and len(names) >= MAX_OUT_FILES - 1:
                return False
            shutil.copyfile(src, self.out / f".{name}.tmp")
            self._replace(self.out / f".{name}.tmp", self.out / name)
            return True

    # -- running -------------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)  # compiled kernels on the GPU, never the interpreter
        pp = [str(ROOT / "python"), str(ROOT)]
        if env.get("PYTHONPATH"):
            pp.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(pp)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def _run_step(self, step: Step) -> None:
        step.started = time.time()
        self.write_summary()
        try:
            if self.stopping.is_set():
                res = Result("SKIPPED", "session stopped before this step")
            else:
                res = step.run(self, step)
        except Exception as e:  # noqa: BLE001 - a broken step must not stop the next
            res = Result("ERROR", f"{type(e).__name__}: {e}"[:300])
        res.elapsed = time.time() - step.started
        step.result = res
        self.write_summary()

    def run(self) -> int:
        # The steps are stopped by SIGINT first; a child inherits an *ignored* SIGINT (a shell
        # starts background jobs with SIGINT ignored, and so would a CI runner), which would
        # turn every SIGINT into a kill without partial output. A handled SIGINT is reset to
        # the default in the children, so the session handles it while it runs.
        main = threading.current_thread() is threading.main_thread()
        ignored = main and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        if ignored:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            return self._run()
        finally:
            if ignored:
                signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _run(self) -> int:
        stop_pack = threading.Event()

        def repacker():
            while not stop_pack.wait(REPACK_EVERY_S):
                try:
                    self.write_summary()
                    self.pack()
                except OSError:
                    pass

        rp = threading.Thread(target=repacker, daemon=True)
        rp.start()
        self.write_summary()
        background: dict[str, threading.Thread] = {}
        i = 0
        steps = self.steps
        while i < len(steps):
            s = steps[i]
            if s.background:
                t = threading.Thread(target=self._run_step, args=(s,), daemon=True)
                t.start()
                background[s.key] = t
                i += 1
                continue
            for k in s.after:
                if k in background:
                    background[k].join()
            group = [s]
            while (
                s.group and i + len(group) < len(steps) and steps[i + len(group)].group == s.group
            ):
                group.append(steps[i + len(group)])
            if len(group) == 1:
                self._run_step(s)
            else:
                ts = [threading.Thread(target=self._run_step, args=(g,)) for g in group]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
            self.pack()
            i += len(group)
        for t in background.values():
            t.join()
        stop_pack.set()
        self.write_summary()
        self.pack()
        bad = [s for s in steps if s.result and s.result.status not in ("ok", "SKIPPED")]
        print((self.out / "summary.txt").read_text())
        print(f"$OUT: {', '.join(self.out_files())}")
        return 1 if bad else 0


# ----------------------------------------------------------------------------------------------
# a: probe


def versions() -> dict[str, object]:
    """Library versions and what the GPU steps need (``--versions``)."""
    import platform
    from importlib import metadata

    out: dict[str, object] = {"python": platform.python_version(), "cores": _cores()}
    for d in ("torch", "triton", "cupy-cuda13x", "cupy-cuda12x", "numpy", "pytest",
              "pytest-xdist", "pytest-timeout", "hypothesis", "scipy", "matplotlib"):  # fmt: skip
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            out[d] = None
    for tool in ("nvidia-smi", "nvcc", "compute-sanitizer", "ncu"):
        out[tool] = shutil.which(tool)
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            out["gpu"] = torch.cuda.get_device_name(0)
            out["sm_count"] = p.multi_processor_count
            out["capability"] = f"{p.major}.{p.minor}"
            out["cuda"] = torch.version.cuda
        else:
            out["gpu"] = None
    except Exception as e:  # noqa: BLE001 - the probe reports, never fails
        out["gpu_error"] = f"{type(e).__name__}: {e}"
    return out


def step_probe(session: Session, step: Step) -> Result:
    py = session.cfg.python
    script = (
        "nvidia-smi; "
        f"{py} {ROOT / 'bench' / 'gpu_session.py'} --versions; "
        f"{py} -m softmax_kernels info; "
        "for t in nvcc compute-sanitizer ncu; do command -v $t >/dev/null && $t --version "
        "| tail -n 2; done; nproc; free -g 2>/dev/null | head -n 2; df -h /tmp | tail -n 1"
    )
    log = session.logs / "a-probe.log"
    job = Job("probe", ["bash", "-c", script], log, session.env())
    ended, _ = run_jobs(session, step, [job])
    text = log.read_text(errors="replace")
    info = {}
    for line in text.splitlines():
        if line.startswith("VERSIONS "):
            info = json.loads(line[len("VERSIONS ") :])
    session.state["versions"] = info
    det = ", ".join(
        f"{k} {info.get(k)}" for k in ("torch", "triton", "cupy-cuda13x", "numpy", "pytest")
        if info.get(k)
    )  # fmt: skip
    gpu = info.get("gpu") or "no GPU seen by torch"
    extras = [k for k in ("pytest-xdist", "hypothesis", "compute-sanitizer") if not info.get(k)]
    detail = f"{gpu}; {det}" + (f"; missing: {', '.join(extras)}" if extras else "")
    ok = job.rcs == [0] and bool(info.get("gpu"))
    return Result(_ended_status(ended, ok), detail + _cut_note(ended, step))


# ----------------------------------------------------------------------------------------------
# w: NVRTC warm-up


def warm_module(dtype: str) -> None:
    """Compile (or load from CuPy's disk cache) the CuPy backend's module for one dtype."""
    t0 = time.time()
    from softmax_kernels.backends import cupy_backend as cb

    why = cb.unavailable_reason()
    if why:
        print(f"WARM {dtype} unavailable: {why}")
        raise SystemExit(3)
    mod = cb._module(0, dtype) if hasattr(cb, "_module") else None
    raw = getattr(mod, "raw", None)
    names = cb.all_kernel_names(dtype) if hasattr(cb, "all_kernel_names") else []
    if raw is not None and names:
        # RawModule compiles on first use: fetching one kernel compiles (or loads from CuPy's
        # disk cache) the whole module, every name expression of the dtype
        import cupy

        with cupy.cuda.Device(0):
            raw.get_function(names[0])
    else:  # the module function was renamed: a small call compiles the dtype's module too
        import torch

        import softmax_kernels as sk

        sk.softmax(torch.randn(2, 33, device="cuda").to(getattr(torch, dtype)), backend="cupy")
        torch.cuda.synchronize()
    print(f"WARM {dtype} {time.time() - t0:.1f}s")


def step_warm(session: Session, step: Step) -> Result:
    marker = session.work / "warm.done"
    jobs = [
        Job(f"warm-{dt}", [session.cfg.python, str(ROOT / "bench" / "gpu_session.py"),
                           "--warm", dt], session.logs / f"w-warm-{dt}.log", session.env())
        for dt in WARM_DTYPES
    ]  # fmt: skip
    try:
        ended, _ = run_jobs(session, step, jobs)
    finally:
        marker.write_text("done\n")
    parts = []
    for j in jobs:
        m = re.search(r"^WARM (\S+) (.*)$", j.log.read_text(errors="replace"), re.MULTILINE)
        parts.append(m.group(0)[5:] if m else f"{j.name[5:]} rc {j.rcs[-1] if j.rcs else '?'}")
    whys = {p.split(" ", 1)[1] for p in parts if " unavailable: " in f" {p}"}
    if len(whys) == 1 and all(" unavailable: " in f" {p}" for p in parts):
        parts = [f"every dtype {whys.pop()[:160]}"]
    ok = all(j.rcs and j.rcs[-1] == 0 for j in jobs)
    return Result(_ended_status(ended, ok), "NVRTC: " + "; ".join(parts) + _cut_note(ended, step))


# ----------------------------------------------------------------------------------------------
# b: the gpu tests, in shards


def _pytest_base(session: Session, state: Path) -> list[str]:
    cfg = session.cfg
    cmd = [cfg.python, "-m", "pytest", "-p", "bench.gpu_shard", "-p", "no:cacheprovider",
           "-m", cfg.marker, "-q", "-rfE", "--tb=short", "--durations=15",
           "--continue-on-collection-errors", f"--shard-state={state}"]  # fmt: skip
    if session.warm_marker():
        cmd.append(f"--shard-wait-file={session.warm_marker()}")
    if _has("pytest_timeout"):
        # a hung kernel ends its shard (which restarts with the rest) instead of the step
        # (`-p timeout`, its entry-point name: `-p pytest_timeout` registers it twice)
        cmd += ["-p", "timeout", "--timeout=120", "--timeout-method=thread"]
    return cmd


def _shard_jobs(session: Session, state: Path, prefix: str, extra: list[str],
                env: dict[str, str]) -> tuple[list[Job], int, bool]:  # fmt: skip
    cfg = session.cfg
    base = _pytest_base(session, state) + extra
    use_xdist = cfg.xdist if cfg.xdist is not None else _has("xdist")
    n = cfg.shards or max(2, _cores() - 2)
    if use_xdist:
        # --dist load: xdist replaces a worker that a sticky CUDA error ended (gpu_shard.py
        # says why not loadgroup)
        # `-p xdist` (its entry-point name; `-p xdist.plugin` registers the module twice when
        # plugins autoload) also loads it where autoloading is off
        cmd = base + ["-p", "xdist", "-n", str(n), "--dist", "load",
                      f"--max-worker-restart={4 * n}", *cfg.test_paths]  # fmt: skip
        return [Job(f"{prefix}-xdist", cmd, session.logs / f"{prefix}-xdist.log", env)], n, True

    def restart(job: Job, rc: int) -> list[str] | None:
        # a sticky CUDA error stopped this shard: run the tests it has not finished, afresh
        if rc != STICKY_EXIT or len(job.rcs) > 3:
            return None
        return job.cmd + [f"--shard-skip={state / f'done-{job.shard}.txt'}"]

    if TEST_SECONDS.is_file():  # measured seconds per test id balance better than the model
        base = base + [f"--shard-weights={TEST_SECONDS}"]
    jobs = []
    for i in range(n):
        cmd = base + [f"--shard={i}/{n}", *cfg.test_paths]
        j = Job(f"{prefix}-{i}", cmd, session.logs / f"{prefix}-shard{i:02d}.log", env, restart)
        j.shard = i
        jobs.append(j)
    return jobs, n, False


def collect_results(state: Path) -> dict[str, object]:
    """Final outcome per test id from the shards' results-*.jsonl (gpu_shard.py)."""
    outcome: dict[str, str] = {}
    durations: dict[str, float] = {}
    for f in sorted(state.glob("results-*.jsonl")):
        for line in f.read_text(errors="replace").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            nid, when, out = r["id"], r["when"], r["outcome"]
            durations[nid] = durations.get(nid, 0.0) + float(r.get("duration") or 0.0)
            prev = outcome.get(nid)
            if out == "failed":
                outcome[nid] = "failed" if when in ("call", "???") else "error"
            elif prev in ("failed", "error"):
                continue
            elif out == "skipped":
                outcome[nid] = "skipped"
            elif when == "call" and out == "passed":
                outcome[nid] = "passed"
            elif nid not in outcome:
                outcome[nid] = "started"
    assigned: set[str] = set()
    for f in state.glob("assigned-*.txt"):
        assigned.update(x for x in f.read_text().splitlines() if x)
    sticky = []
    for f in sorted(state.glob("sticky-*.jsonl")):
        sticky += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    counts: dict[str, int] = {}
    for o in outcome.values():
        counts[o] = counts.get(o, 0) + 1
    not_run = sorted(assigned - set(outcome)) if assigned else []
    return {
        "outcome": outcome,
        "counts": counts,
        "failed": sorted(k for k, v in outcome.items() if v in ("failed", "error", "started")),
        "not_run": not_run,
        "sticky": sticky,
        "durations": durations,
    }


def _collection_errors(logs: list[Path]) -> int:
    n = 0
    for p in logs:
        if p.exists():
            n += len(re.findall(r"^ERROR collecting ", p.read_text(errors="replace"), re.M))
    return n


def _tests_result(session: Session, step: Step, jobs: list[Job], n: int, xdist: bool,
                  ended: str, state: Path) -> Result:  # fmt: skip
    res = collect_results(state)
    c = res["counts"]
    coll = _collection_errors([j.log for j in jobs])
    failed = res["failed"]
    if failed:
        tmp = session.work / "failed-tests.txt"
        tmp.write_text("\n".join(failed) + "\n")
        shutil.copyfile(tmp, session.logs / "failed-tests.txt")
        session.add_out(tmp)
        keep = session.cfg.keep_dir
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp, keep / "failed-tests.txt")
    (session.logs / f"{step.key}-durations.json").write_text(
        json.dumps(dict(sorted(res["durations"].items(), key=lambda kv: -kv[1])), indent=0)
    )
    how = f"{n} xdist workers" if xdist else f"{n} shards"
    if xdist:
        crashed = sum(j.log.read_text(errors="replace").count("crashed while running")
                      for j in jobs if j.log.exists())  # fmt: skip
        if crashed:
            how += f", {crashed} worker(s) replaced after a crash or sticky CUDA error"
    else:
        restarts = sum(max(0, len(j.rcs) - 1) for j in jobs)
        if restarts:
            how += f", {restarts} restart(s) after a sticky CUDA error"
    parts = [f"{c.get(k, 0)} {k}" for k in ("passed", "failed", "error", "skipped") if c.get(k)]
    if c.get("started"):
        parts.append(f"{c['started']} cut off while running")
    if res["not_run"]:
        parts.append(f"{len(res['not_run'])} not run")
    if coll:
        parts.append(f"{coll} collection error(s)")
    if res["sticky"]:
        parts.append("sticky CUDA error first seen in " + res["sticky"][0]["id"])
    detail = (", ".join(parts) or "no test ran") + f" ({how})"
    if failed:
        detail += "; ids in failed-tests.txt"
    ok = bool(c.get("passed")) and not failed and not coll and not res["not_run"]
    return Result(_ended_status(ended, ok), detail + _cut_note(ended, step))


def step_tests(session: Session, step: Step) -> Result:
    state = session.logs / f"{step.key}-state"
    state.mkdir(parents=True, exist_ok=True)
    jobs, n, xdist = _shard_jobs(session, state, step.key, [], session.env())
    ended, _ = run_jobs(session, step, jobs)
    return _tests_result(session, step, jobs, n, xdist, ended, state)


def _failed_ids_file(session: Session) -> Path | None:
    for p in (session.cfg.failed_ids, session.cfg.keep_dir / "failed-tests.txt"):
        if p and Path(p).is_file():
            return Path(p)
    return None


def step_rerun(session: Session, step: Step) -> Result:
    src = _failed_ids_file(session)
    if src is None:
        return Result("SKIPPED", "no failed-tests.txt (pass the main call's: "
                      "bash bench/gpu_session.sh second FILE)")  # fmt: skip
    ids = [x.strip() for x in src.read_text().splitlines() if x.strip()]
    if not ids:
        return Result("SKIPPED", f"{src} lists no test")
    state = session.logs / f"{step.key}-state"
    state.mkdir(parents=True, exist_ok=True)
    only = state / "only.txt"
    only.write_text("\n".join(ids) + "\n")
    files = sorted({i.split("::")[0] for i in ids if (ROOT / i.split("::")[0]).is_file()})
    cfg = session.cfg
    cfg_paths = cfg.test_paths
    cfg.test_paths = tuple(files) or cfg_paths
    cfg_shards = cfg.shards
    cfg.shards = cfg.shards or max(1, min(_cores() - 2, (len(ids) + 9) // 10))
    try:
        env = session.env(CUDA_LAUNCH_BLOCKING="1")
        jobs, n, xdist = _shard_jobs(session, state, step.key, [f"--shard-only={only}"], env)
        ended, _ = run_jobs(session, step, jobs)
    finally:
        cfg.test_paths, cfg.shards = cfg_paths, cfg_shards
    r = _tests_result(session, step, jobs, n, xdist, ended, state)
    r.detail = f"{len(ids)} ids from {src.name}, CUDA_LAUNCH_BLOCKING=1: " + r.detail
    return r


# ----------------------------------------------------------------------------------------------
# c: compute-sanitizer over the driver


SANITIZER_PARTS = 4


def _sanitizer_options(cs: str) -> set[str]:
    try:
        out = subprocess.run([cs, "--help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return set(re.findall(r"--[a-z][a-z-]+", out))


def parse_sanitizer_log(text: str) -> dict[str, object]:
    """The verdict of one compute-sanitizer log."""
    out: dict[str, object] = {"errors": None, "hazards": None, "unsupported": False}
    m = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    if m:
        out["errors"] = sum(int(x) for x in m)
    m = re.findall(
        r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warning", text
    )
    if m:
        out["hazards"] = sum(int(a) for a, _, _ in m)
        out["errors"] = sum(int(b) for _, b, _ in m)
        out["warnings"] = sum(int(c) for _, _, c in m)
    if re.search(r"Device not supported|not supported on this (device|platform)", text):
        out["unsupported"] = True
    kinds: dict[str, int] = {}
    for k in re.findall(r"^========= (Invalid __\w+__ \w+|Race reported[^\n]*|Barrier error[^\n]*|"
                        r"Program hit [^\n]*|Error: [^\n]*)", text, re.M):  # fmt: skip
        k = re.sub(r"\s+at .*", "", k)[:80]
        kinds[k] = kinds.get(k, 0) + 1
    out["kinds"] = kinds
    return out


def _driver_reports(paths: list[Path]) -> dict[str, int]:
    tot = {"cases": 0, "ran": 0, "mismatch": 0, "error": 0, "not_run": 0, "unavailable": 0}
    for p in paths:
        try:
            r = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        for k in tot:
            tot[k] += int(r.get(k, 0))
    return tot


def _driver_note(rep: dict[str, int]) -> str:
    s = f"driver {rep['ran']}/{rep['cases']} cases"
    if rep["mismatch"] or rep["error"]:
        s += f", {rep['mismatch']} mismatch, {rep['error']} error"
    if rep["not_run"]:
        s += f", {rep['not_run']} not run (time)"
    if rep["unavailable"]:
        s += f", {rep['unavailable']} skipped (backend or CuPy unavailable)"
    return s


DRIVER_PARTS = 6


def _wait_arg(session: Session) -> list[str]:
    m = session.warm_marker()
    return [f"--wait-file={m}"] if m else []


def step_driver(session: Session, step: Step) -> Result:
    """The sanitizer driver without a sanitizer, beside the tests: checks every case against
    the float64 reference and leaves its Triton kernels in Triton's cache for c1-c3."""
    py = session.cfg.python
    budget = max(5.0, step.limit_s - step.grace_s - 10.0)
    stop_at = time.time() + budget
    reports = [session.logs / f"{step.key}-driver-{i}.json" for i in range(DRIVER_PARTS)]
    jobs = [
        Job(f"driver-{i}", [py, str(ROOT / "bench" / "sanitize_driver.py"), "--run",
                            f"--part={i}/{DRIVER_PARTS}", f"--stop-at={stop_at:.0f}",
                            f"--report={reports[i]}", *_wait_arg(session)],
            session.logs / f"{step.key}-driver-{i}.log", session.env())
        for i in range(DRIVER_PARTS)
    ]  # fmt: skip
    ended, _ = run_jobs(session, step, jobs)
    rep = _driver_reports(reports)
    ok = all(j.rcs and j.rcs[-1] == 0 for j in jobs) and rep["ran"] > 0
    return Result(_ended_status(ended, ok), _driver_note(rep) + " (no sanitizer; float64 "
                  "reference: the NumPy backend)" + _cut_note(ended, step))  # fmt: skip


def step_sanitizer(tool: str) -> Callable[[Session, Step], Result]:
    def run(session: Session, step: Step) -> Result:
        py = session.cfg.python
        driver = str(ROOT / "bench" / "sanitize_driver.py")
        # the driver stops itself before the SIGINT, so that the sanitizer writes its summary
        budget = max(5.0, step.limit_s - step.grace_s - 20.0)
        stop_at = time.time() + budget  # start-up under the sanitizer counts too
        reports = [session.logs / f"{step.key}-{tool}-{i}.json" for i in range(SANITIZER_PARTS)]
        env = session.env(PYTORCH_NO_CUDA_MEMORY_CACHING="1", SK_SANITIZE="1")
        cs = shutil.which("compute-sanitizer")
        jobs = []
        for i in range(SANITIZER_PARTS):
            drv = [py, driver, "--run", f"--part={i}/{SANITIZER_PARTS}",
                   f"--stop-at={stop_at:.0f}", f"--report={reports[i]}",
                   *_wait_arg(session)]  # fmt: skip
            if cs is None:
                if tool != "memcheck":
                    continue
                cmd = drv
            else:
                opts = session.state.get("cs_opts")
                if opts is None:
                    opts = session.state["cs_opts"] = _sanitizer_options(cs)
                cmd = [cs, "--tool", tool, "--log-file",
                       str(session.logs / f"{step.key}-{tool}-{i}.sanitizer.log"),
                       "--print-limit", "100", "--error-exitcode", "9"]  # fmt: skip
                if "--report-api-errors" in opts:
                    cmd += ["--report-api-errors", "no"]  # torch/CuPy probe the API on purpose
                if tool == "memcheck" and "--padding" in opts:
                    cmd += ["--padding", "64"]  # an overread lands in padding, not a neighbour
                if tool == "racecheck" and "--racecheck-report" in opts:
                    cmd += ["--racecheck-report", "all"]
                cmd += drv
            jobs.append(Job(f"{tool}-{i}", cmd, session.logs / f"{step.key}-{tool}-{i}.log", env))
        if not jobs:
            return Result("SKIPPED", "compute-sanitizer is not on the PATH")
        ended, _ = run_jobs(session, step, jobs)
        rep = _driver_reports(reports)
        if cs is None:
            ok = all(j.rcs and j.rcs[-1] == 0 for j in jobs)
            return Result("SKIPPED" if ok else "FAILED",
                          "compute-sanitizer not on the PATH: driver without it, "
                          + _driver_note(rep) + _cut_note(ended, step))  # fmt: skip
        logs = sorted(session.logs.glob(f"{step.key}-{tool}-*.sanitizer.log"))
        verdicts = [parse_sanitizer_log(p.read_text(errors="replace")) for p in logs]
        if any(v["unsupported"] for v in verdicts):
            return Result("FAILED", f"{tool}: compute-sanitizer does not support this device")
        errs = [v["errors"] for v in verdicts]
        kinds: dict[str, int] = {}
        for v in verdicts:
            for k, c in v["kinds"].items():
                kinds[k] = kinds.get(k, 0) + c
        missing = sum(e is None for e in errs) + (SANITIZER_PARTS - len(verdicts))
        n_err = sum(e or 0 for e in errs)
        if tool == "racecheck":
            hz = sum(v.get("hazards") or 0 for v in verdicts)
            verdict = f"racecheck: {hz} hazards ({n_err} errors)"
        else:
            verdict = f"{tool}: {n_err} errors"
        if kinds:
            verdict += " [" + "; ".join(f"{k} x{c}" for k, c in sorted(kinds.items())[:4]) + "]"
        if missing:
            verdict += f", {missing} part(s) without a summary"
        ok = n_err == 0 and not missing and not rep["mismatch"] and not rep["error"]
        ok = ok and all(j.rcs and j.rcs[-1] == 0 for j in jobs)
        return Result(_ended_status(ended, ok),
                      f"{verdict}; {_driver_note(rep)}" + _cut_note(ended, step))  # fmt: skip

    return run


# ----------------------------------------------------------------------------------------------
# d: the benchmark


def step_bench(args: list[str], budget_s: float) -> Callable[[Session, Step], Result]:
    def run(session: Session, step: Step) -> Result:
        out_dir = session.logs / f"{step.key}-bench"
        cmd = [session.cfg.python, "-m", "bench", *args, "--budget-s", f"{budget_s:.0f}",
               "--out", str(out_dir), *session.cfg.bench_args]  # fmt: skip
        log = session.logs / f"{step.key}-bench.log"
        job = Job("bench", cmd, log, session.env())
        ended, _ = run_jobs(session, step, [job])
        jsons = sorted(out_dir.glob("*.json")) if out_dir.is_dir() else []
        if not jsons:
            return Result(
                _ended_status(ended, False), "no results written" + _cut_note(ended, step)
            )
        stem = jsons[-1].stem
        copied = []
        for suffix in (".json", ".csv", ".md"):
            p = out_dir / f"{stem}{suffix}"
            if p.exists() and session.add_out(p):
                copied.append(p.name)
        pngs = sorted(out_dir.glob(f"{stem}-*.png"))
        if pngs and session.add_out(pngs[0]):
            copied.append(pngs[0].name)
        rec = json.loads(jsons[-1].read_text())
        rows = rec.get("points", [])
        st: dict[str, int] = {}
        for r in rows:
            st[r["status"]] = st.get(r["status"], 0) + 1
        bad = [r for r in rows if r["status"] in ("mismatch", "error") and r.get("ours")]
        heads = []
        for prov in sorted({r["provider"] for r in rows if r.get("ours")}):
            ok = [r for r in rows if r["provider"] == prov and r["status"] == "ok"]
            if ok:
                pc = [r["pct_copy"] for r in ok if r.get("pct_copy")]
                g = sum(pc) / len(pc) if pc else float("nan")
                heads.append(f"{prov} {len(ok)} ok, mean {g:.0f}% of copy")
        detail = ", ".join(f"{v} {k}" for k, v in sorted(st.items()))
        detail += "; " + "; ".join(heads) if heads else ""
        detail += f"; reference: {rec.get('settings', {}).get('reference')}"
        ok = job.rcs == [0] and not bad and bool(heads)
        return Result(_ended_status(ended, ok), detail + _cut_note(ended, step))

    return run


def step_special(op: str, args: list[str], budget_s: float) -> Callable[[Session, Step], Result]:
    """``python -m bench --ops linear_ce`` or ``vp_ce`` (their own outputs:
    <name>-<op>.json / .md, and linear_ce's PNG), its files into $OUT, a one-line summary."""

    def run(session: Session, step: Step) -> Result:
        out_dir = session.logs / f"{step.key}-bench"
        cmd = [session.cfg.python, "-m", "bench", "--ops", op, *args, "--budget-s",
               f"{budget_s:.0f}", "--out", str(out_dir), *session.cfg.bench_args]  # fmt: skip
        log = session.logs / f"{step.key}-bench.log"
        job = Job(f"bench-{op}", cmd, log, session.env())
        ended, _ = run_jobs(session, step, [job])
        jsons = sorted(out_dir.glob(f"*-{op}.json")) if out_dir.is_dir() else []
        if not jsons:
            return Result(
                _ended_status(ended, False), "no results written" + _cut_note(ended, step)
            )
        stem = jsons[-1].stem
        for p in (jsons[-1], out_dir / f"{stem}.md", out_dir / f"{stem}.png"):
            if p.exists():
                session.add_out(p)
        rec = json.loads(jsons[-1].read_text())
        rows = (rec.get(op) or {}).get("rows", [])
        st: dict[str, int] = {}
        for r in rows:
            st[r["status"]] = st.get(r["status"], 0) + 1
        detail = ", ".join(f"{v} {k}" for k, v in sorted(st.items()))
        if op == "linear_ce":
            bad = [r for r in rows if r.get("ours") and r["status"] in ("mismatch", "error")]
            good = [r for r in rows if r.get("ours") and r["status"] == "ok"]
            tg = (rec.get(op) or {}).get("targets") or []
            met = sum(1 for e in tg if e.get("time_met") and e.get("memory_met") is not False)
            detail += f"; targets met {met} of {len(tg)}"
        else:
            bad = [r for r in rows if r["status"] in ("mismatch", "error")]
            good = [r for r in rows if r["status"] == "ok"]
        ok = job.rcs == [0] and not bad and bool(good)
        return Result(_ended_status(ended, ok), detail + _cut_note(ended, step))

    return run


# ----------------------------------------------------------------------------------------------
# The plans


def make_steps(mode: str) -> list[Step]:
    if mode == "main":
        return [
            Step("w", "warm-nvrtc", 150, 10, "CuPy backend: the NVRTC module of each dtype, "
                 "4 processes, into CuPy's disk cache (beside a and b)", step_warm,
                 background=True),
            Step("a", "probe", 40, 10, "nvidia-smi, versions, softmax_kernels info, tools",
                 step_probe),
            Step("c0", "driver", 160, 15, "bench/sanitize_driver.py without a sanitizer, "
                 f"{DRIVER_PARTS} parts beside b: results vs float64, Triton cache for c1-c3",
                 step_driver, background=True),
            Step("b", "gpu-tests", 170, 25, "pytest -m gpu in parallel shards (xdist or "
                 "background processes), -rfE --durations, restart after a sticky CUDA error",
                 step_tests),
            Step("c1", "memcheck", 95, 15, "compute-sanitizer memcheck (pools off, --padding) "
                 f"over bench/sanitize_driver.py, {SANITIZER_PARTS} parts",
                 step_sanitizer("memcheck"), group="sanitizer", after=("w", "c0")),
            Step("c2", "racecheck", 95, 15, "compute-sanitizer racecheck, beside c1",
                 step_sanitizer("racecheck"), group="sanitizer"),
            Step("c3", "synccheck", 95, 15, "compute-sanitizer synccheck, beside c1",
                 step_sanitizer("synccheck"), group="sanitizer"),
            Step("d", "bench-quick", 105, 20, "python -m bench --quick --providers ours,torch "
                 "(budget 60 s; float64 reference: torch on the GPU)",
                 step_bench(["--quick", "--device", "cuda", "--providers", "ours,torch"], 60)),
        ]  # fmt: skip
    if mode == "second":
        return [
            Step("w", "warm-nvrtc", 120, 10, "CuPy backend NVRTC modules (beside the rest)",
                 step_warm, background=True),
            Step("a", "probe", 30, 10, "nvidia-smi, versions, softmax_kernels info", step_probe),
            Step("b", "rerun-failed", 75, 15, "the main call's failed test ids, "
                 "CUDA_LAUNCH_BLOCKING=1, in shards", step_rerun),
            Step("d", "bench-quack", 130, 25, "python -m bench --grid quack --ops "
                 "softmax_fwd,ce_fwd_grad --dtypes bf16 --providers ours,torch (budget 90 s)",
                 step_bench(["--grid", "quack", "--ops", "softmax_fwd,ce_fwd_grad",
                             "--dtypes", "bf16", "--providers", "ours,torch", "--device",
                             "cuda"], 90)),
        ]  # fmt: skip
    if mode == "lce":
        return [
            Step("a", "probe", 30, 10, "nvidia-smi, versions, softmax_kernels info", step_probe),
            Step("d1", "linear-ce", 300, 30, "python -m bench --ops linear_ce --quick: Llama-3 "
                 "and Gemma-2 heads in bf16 vs torch eager / compile / linear_cross_entropy, "
                 "with peak memory (budget 240 s)",
                 step_special("linear_ce", ["--quick", "--device", "cuda"], 240)),
            Step("d2", "vp-ce", 90, 20, "python -m bench --ops vp_ce --quick: the merge vs the "
                 "local kernel, P = 1, 2, 4, 8 simulated on one GPU",
                 step_special("vp_ce", ["--quick", "--device", "cuda"], 60)),
        ]  # fmt: skip
    raise ValueError(f"unknown mode {mode!r}: main (default), second or lce")


def total_seconds(steps: list[Step]) -> float:
    """Worst-case command time: sequential steps add their limits, a group its longest, and a
    background step only where it outlasts the steps it runs beside."""
    t, fg_end = 0.0, 0.0
    bg_end: dict[str, float] = {}
    i = 0
    while i < len(steps):
        s = steps[i]
        if s.background:
            bg_end[s.key] = t + s.limit_s
            i += 1
            continue
        for k in s.after:
            t = max(t, bg_end.get(k, 0.0))
        group = [s]
        while s.group and i + len(group) < len(steps) and steps[i + len(group)].group == s.group:
            group.append(steps[i + len(group)])
        t += max(g.limit_s for g in group)
        fg_end = t
        i += len(group)
    return max([fg_end, *bg_end.values()])


def dry_run(mode: str, steps: list[Step]) -> str:
    lines = [f"gpu_session {mode}: steps in order, limit = SIGKILL (SIGINT `grace` before)"]
    for s in steps:
        how = "background" if s.background else (f"group {s.group}" if s.group else "")
        lines.append(f"  {s.key:3s} {s.name:12s} limit {s.limit_s:4.0f} s  grace {s.grace_s:3.0f} s"
                     f"  {how:16s} {s.what}")  # fmt: skip
    tot = total_seconds(steps)
    lines.append(f"total {tot:.0f} s ({tot / 60:.1f} min) of the {BUDGET_S[mode]:.0f} s budget"
                 f" ({'fits' if tot <= BUDGET_S[mode] else 'DOES NOT FIT'})")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bash bench/gpu_session.sh", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("mode", nargs="?", default="main", choices=("main", "second", "lce"))
    p.add_argument("failed_ids", nargs="?", help="second: the main call's failed-tests.txt")
    p.add_argument("--dry-run", action="store_true", help="print the steps and limits only")
    p.add_argument("--out", help="output folder (default: $OUT, else build/gpu-session/out)")
    p.add_argument("--versions", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--warm", metavar="DTYPE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.versions:
        print("VERSIONS " + json.dumps(versions()))
        return 0
    if args.warm:
        warm_module(args.warm)
        return 0
    steps = make_steps(args.mode)
    if args.dry_run:
        print(dry_run(args.mode, steps))
        return 0 if total_seconds(steps) <= BUDGET_S[args.mode] else 1
    out = Path(args.out or os.environ.get("OUT") or ROOT / "build" / "gpu-session" / "out")
    import tempfile

    work = Path(tempfile.mkdtemp(prefix=f"gpu-{args.mode}-"))
    session = Session(args.mode, steps, out, work, Config(failed_ids=args.failed_ids))

    install_signal_handlers(session)
    return session.run()


def install_signal_handlers(session: Session) -> None:
    """SIGTERM / SIGINT to the session: the running step gets SIGINT, later steps are skipped,
    and the summary and the archive are still written."""

    def on_signal(signum, frame):
        session.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


if __name__ == "__main__":
    raise SystemExit(main())
