"""pytest plugin of the GPU session (``-p bench.gpu_shard``; bench/gpu_session.py runs it).

- ``--shard=I/N``: run only shard I of N. Tests are grouped by *compile key* -- the tests that
  launch the same Triton kernel specialisations: same test function and parameters, whatever
  the array kind (a CuPy array reaches the Triton backend as a torch tensor) -- and the groups
  are dealt out longest-first to the least loaded shard (LPT), weighted by an estimate of their
  compile and run time (``COMPILE_S`` per Triton key, ``RUN_S`` per test), or by the measured
  seconds in ``--shard-weights`` (the ``b-durations.json`` a previous session archived). A
  shard runs its Triton tests first and its CuPy-backend tests last, after waiting for
  ``--shard-wait-file`` (the NVRTC warm-up's marker), so no shard compiles a CuPy module
  itself.
- Under pytest-xdist (``-n``, ``--dist load``) xdist balances the tests itself; this plugin then
  records the results in the controller and ends a worker after a sticky CUDA error.
  (``--dist loadgroup`` would keep a compile key on one worker, but xdist 3.8 hangs or raises
  an INTERNALERROR when it replaces a crashed worker under it, and loses that worker's pending
  tests when it does not.)
- ``--shard-only=FILE`` / ``--shard-skip=FILE``: keep only / drop these test ids.
- ``--shard-state=DIR``: per shard, ``assigned-I.txt`` (its ids), ``results-I.jsonl`` (one line
  per report phase), ``done-I.txt`` (finished ids) and ``sticky-I.jsonl``.
- A *sticky* CUDA error (an illegal address, a launch failure: the context is unusable, every
  later CUDA call in the process fails) is recognised after a failing test by its message or a
  failing device synchronize. The shard then stops after that test (exit code 75) and the
  session restarts it on the tests it has not run; an xdist worker exits so that xdist replaces
  it. The other shards never see it.
- Without hypothesis, test modules that import it are not collected (the property tests have no
  GPU test) instead of failing collection.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zlib
from pathlib import Path

import pytest

COMPILE_S = 0.6  # one Triton compile for sm_90 (issue 9's measurement)
RUN_S = 0.05  # one small GPU test, compiles aside
STICKY_EXIT = 75
STICKY_PATTERNS = (
    "illegal memory access",
    "illegal address",
    "misaligned address",
    "unspecified launch failure",
    "illegal instruction",
    "device-side assert",
    "launch timed out",
    "hardware stack error",
    "cudaErrorIllegal",
    "cudaErrorLaunchFailure",
    "cudaErrorMisaligned",
    "CUDA_ERROR_ILLEGAL",
    "CUDA_ERROR_LAUNCH_FAILED",
    "CUDA_ERROR_MISALIGNED",
)


def pytest_addoption(parser):
    g = parser.getgroup("gpu_shard", "GPU session sharding (bench/gpu_shard.py)")
    g.addoption("--shard", default=None, help="I/N: run shard I of N")
    g.addoption("--shard-state", default=None, help="folder for the shard's records")
    g.addoption("--shard-only", default=None, help="file of test ids: run only these")
    g.addoption("--shard-skip", default=None, help="file of test ids: do not run these")
    g.addoption("--shard-weights", default=None, help="JSON {test id: seconds} to balance by")
    g.addoption("--shard-wait-file", default=None, help="wait for it before CuPy tests")
    g.addoption("--shard-wait-s", type=float, default=120.0, help="at most this long")


# ----------------------------------------------------------------------------------------------
# Compile keys and shards


def base_id(nodeid: str) -> str:
    """The test id without xdist's ``@group`` suffix."""
    head, sep, tail = nodeid.rpartition("@")
    return head if sep and "]" not in tail and "::" not in tail else nodeid


def backend_of(item) -> str:
    """'triton', 'cupy' or 'other': the backend a test runs, from a parameter with a
    ``backend`` attribute (tests/conftest.py's Target), else its module's name."""
    params = getattr(getattr(item, "callspec", None), "params", None) or {}
    for v in params.values():
        b = getattr(v, "backend", None)
        if isinstance(b, str):
            return b if b in ("triton", "cupy") else "other"
    name = Path(str(getattr(item, "fspath", item.nodeid))).name
    for b in ("triton", "cupy"):
        if b in name:
            return b
    return "other"


def _short(v) -> str:
    r = getattr(v, "backend", None)
    if isinstance(r, str):
        return f"backend={r}"
    try:
        s = repr(v)
    except Exception:  # noqa: BLE001
        s = type(v).__name__
    return s if len(s) <= 80 else f"{s[:60]}#{zlib.crc32(s.encode()):08x}"


def compile_key(item) -> str:
    """Tests with one key launch the same kernel specialisations (one compile for the group).
    Triton: the test function and every parameter but the array kind; others (the CuPy
    backend compiles one module per dtype, warmed beforehand; NumPy none): the test itself."""
    b = backend_of(item)
    func = item.nodeid.split("[", 1)[0]
    if b != "triton":
        return f"{b}|{item.nodeid}"  # nothing to share: each test balances on its own
    params = getattr(getattr(item, "callspec", None), "params", None) or {}
    parts = [f"{k}={_short(v)}" for k, v in sorted(params.items())]
    return f"triton|{func}|" + ",".join(parts)


def assign_shards(items, n: int, weights: dict[str, float] | None = None) -> list[int]:
    """Shard index of every item: groups by compile key, heaviest first to the least loaded
    shard. Deterministic, so every shard process computes the same split."""
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(compile_key(it), []).append(i)

    def weight(key: str, idx: list[int]) -> float:
        if weights:
            known = [weights.get(base_id(items[i].nodeid)) for i in idx]
            if all(k is not None for k in known):
                return sum(known)
        return (COMPILE_S if key.startswith("triton|") else 0.0) + RUN_S * len(idx)

    order = sorted(groups.items(), key=lambda kv: (-weight(*kv), kv[0]))
    load = [0.0] * n
    out = [0] * len(items)
    for key, idx in order:
        s = min(range(n), key=lambda k: (load[k], k))
        load[s] += weight(key, idx)
        for i in idx:
            out[i] = s
    return out


def _read_ids(path: str | None) -> set[str]:
    if not path or not os.path.exists(path):
        return set()
    return {x.strip() for x in Path(path).read_text().splitlines() if x.strip()}


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def _shard(config) -> tuple[int, int] | None:
    s = config.getoption("--shard")
    if not s:
        return None
    i, n = (int(v) for v in s.split("/"))
    if not 0 <= i < n:
        raise pytest.UsageError(f"--shard={s}: I must be in [0, N)")
    return i, n


def _tag(config) -> str:
    sh = _shard(config)
    if _is_worker(config):
        return str(config.workerinput.get("workerid", "w"))
    return str(sh[0]) if sh else "all"


def _state(config) -> Path | None:
    s = config.getoption("--shard-state")
    if not s:
        return None
    p = Path(s)
    p.mkdir(parents=True, exist_ok=True)
    return p


def _imports_hypothesis(path: Path) -> bool:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return False
    return "from hypothesis" in text or "import hypothesis" in text


_HAS_HYPOTHESIS: list[bool] = []


def pytest_ignore_collect(collection_path, config):
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    if not _HAS_HYPOTHESIS:
        try:
            import hypothesis  # noqa: F401

            _HAS_HYPOTHESIS.append(True)
        except Exception:  # noqa: BLE001 - missing or broken: the same for the tests
            _HAS_HYPOTHESIS.append(False)
    if not _HAS_HYPOTHESIS[0] and _imports_hypothesis(collection_path):
        print(f"gpu_shard: not collecting {collection_path.name}: hypothesis is not installed")
        return True
    return None


class _Selector:
    """Runs after the marker selection (-m gpu), so the shards split what will run."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, session, config, items):
        only = _read_ids(config.getoption("--shard-only"))
        skip = _read_ids(config.getoption("--shard-skip"))
        keep = [it for it in items if not only or base_id(it.nodeid) in only]
        drop = [it for it in items if only and base_id(it.nodeid) not in only]
        sh = _shard(config)
        if sh is not None:
            # the split is over everything selected, before --shard-skip, so that a restart
            # sees the same shard as the first run
            i, n = sh
            wpath = config.getoption("--shard-weights")
            weights = json.loads(Path(wpath).read_text()) if wpath else None
            where = assign_shards(keep, n, weights)
            mine = [it for it, s in zip(keep, where, strict=True) if s == i]
            drop += [it for it, s in zip(keep, where, strict=True) if s != i]
            # Triton tests first, CuPy-backend tests last (after the NVRTC warm-up)
            keep = [it for it in mine if backend_of(it) != "cupy"]
            keep += [it for it in mine if backend_of(it) == "cupy"]
        drop += [it for it in keep if base_id(it.nodeid) in skip]
        keep = [it for it in keep if base_id(it.nodeid) not in skip]
        if drop:
            config.hook.pytest_deselected(items=drop)
        items[:] = keep
        st = _state(config)
        if st is not None and not _is_worker(config):
            name = f"assigned-{_tag(config)}.txt"
            if skip and (st / name).exists():
                return  # a restart: the first run's list stands
            (st / name).write_text("".join(base_id(it.nodeid) + "\n" for it in items))


class _Recorder:
    def __init__(self, config):
        self.config = config
        self.state = _state(config)
        self.worker = _is_worker(config)
        self.tag = _tag(config)
        self.waited = False
        self.exit_after = False

    def _append(self, name: str, text: str) -> None:
        if self.state is None:
            return
        with open(self.state / name, "a") as f:
            f.write(text)
            f.flush()

    # results: written where every report arrives (the xdist controller, or the shard)
    def pytest_runtest_logreport(self, report):
        if self.worker:
            return
        rec = {
            "id": base_id(report.nodeid),
            "when": report.when,
            "outcome": report.outcome,
            "duration": round(float(getattr(report, "duration", 0.0) or 0.0), 4),
            "t": round(time.time(), 2),
        }
        if report.failed:
            rec["message"] = str(report.longrepr)[-3000:]
        self._append(f"results-{self.tag}.jsonl", json.dumps(rec) + "\n")

    def pytest_runtest_logfinish(self, nodeid, location):
        if not self.worker:
            self._append(f"done-{self.tag}.txt", base_id(nodeid) + "\n")
        if self.exit_after:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(STICKY_EXIT)  # xdist replaces this worker and reports the test as crashed

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids):
        # the xdist controller: what the workers collected, to tell the tests never run
        if self.state is not None and not (self.state / f"assigned-{self.tag}.txt").exists():
            text = "".join(base_id(i) + "\n" for i in ids)
            (self.state / f"assigned-{self.tag}.txt").write_text(text)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item):
        path = self.config.getoption("--shard-wait-file")
        if self.waited or not path or backend_of(item) != "cupy":
            return
        self.waited = True
        t0 = time.time()
        limit = self.config.getoption("--shard-wait-s")
        while not os.path.exists(path) and time.time() - t0 < limit:
            time.sleep(0.2)
        if time.time() - t0 > 1:
            print(f"\ngpu_shard: waited {time.time() - t0:.0f} s for the NVRTC warm-up")

    def pytest_exception_interact(self, node, call, report):
        if not isinstance(node, pytest.Item):
            return
        why = sticky_reason(_exception_text(call.excinfo))
        if why is None:
            return
        rec = {"id": base_id(node.nodeid), "when": report.when, "reason": why[:500]}
        self._append(f"sticky-{self.tag}.jsonl", json.dumps(rec) + "\n")
        msg = f"sticky CUDA error in {node.nodeid}: {why[:200]}"
        if self.worker:
            self.exit_after = True
        else:
            node.session.shouldstop = msg
            self.config._gpu_shard_sticky = True


def _exception_text(excinfo) -> str:
    """The messages of an exception and its causes: never the traceback, whose source lines
    may quote any text."""
    parts, e, seen = [], getattr(excinfo, "value", None), 0
    while e is not None and seen < 5:
        parts.append(f"{type(e).__name__}: {e}")
        e, seen = e.__cause__ or e.__context__, seen + 1
    return "\n".join(parts)


def sticky_reason(text: str) -> str | None:
    """Why the CUDA context is unusable, or None: a sticky error's message in the failure, or a
    device synchronize that fails now."""
    low = text.lower()
    for p in STICKY_PATTERNS:
        if p.lower() in low:
            i = low.index(p.lower())
            return text[max(0, i - 80) : i + 120].strip()
    return _probe_device()


def _probe_device() -> str | None:
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - any failure here means the context is gone
        return f"torch.cuda.synchronize() fails: {type(e).__name__}: {e}"
    cupy = sys.modules.get("cupy")
    try:
        if cupy is not None and cupy.cuda.runtime.getDeviceCount() > 0:
            cupy.cuda.runtime.deviceSynchronize()
    except Exception as e:  # noqa: BLE001
        return f"cupy deviceSynchronize fails: {type(e).__name__}: {e}"
    return None


def pytest_configure(config):
    config.pluginmanager.register(_Selector(), "gpu_shard_selector")
    config.pluginmanager.register(_Recorder(config), "gpu_shard_recorder")


def pytest_sessionfinish(session, exitstatus):
    if getattr(session.config, "_gpu_shard_sticky", False):
        session.exitstatus = STICKY_EXIT
