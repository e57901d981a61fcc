"""Timers. Both return (median milliseconds, repetitions) for a callable that runs the op once.

GPU: the triton.testing.do_bench method, written out so it behaves the same under Triton 3.6 and
3.9 and without Triton: CUDA events around every call, a 256 MiB buffer zeroed before each call
so that no call finds its inputs in L2 (H100: 50 MiB L2), warm-up, then the median of many calls.
The zeroing also gives the CPU a head start of ~0.1 ms per call, so the Python overhead of a call
is hidden unless it is longer than that (for eager use it is part of the cost, as it should be).

CPU: time.perf_counter around every call, one warm-up call, median of the repeats; the
providers of one point are timed in interleaved rounds (``CpuTimer.many``), each round a burst of
BURST calls per provider (calls under BURST_MAX_S) of which only the last is timed. Why bursts:
after a parallel region, torch's OpenMP workers (libgomp, GOMP_SPINCOUNT) keep spinning on the
other cores for a few milliseconds, while softmax_kernels' and NumPy's workers block at once.
With one call per provider per round, every call that follows a torch call shares a core with
those spinners (measured on 2 cores, 8 x 1048576 float16 softmax: 2.2 ms 10 ms after a torch
call, 3.0-3.8 ms right after it), and torch, whose own calls follow each other, never pays that
for anyone. Timing the last call of a burst measures each library called repeatedly, as timeit
and torch.utils.benchmark do; the rounds still spread bursts of other work over every provider.
A burst does not remove all of it: the spin can outlast a 2 ms call (measured: the second call
after torch's 2.9 ms, the third 2.2, the fourth 2.0, against 1.6 after our own; a 10 ms pause
removes it, but pauses made every call here slower, ~1.7-2.6 ms, the idle vCPUs waking up), so
the calls that follow a torch provider still pay some of it (see bench/NOTES.md entry 10). With
OMP_WAIT_POLICY=PASSIVE set before torch is imported, torch's workers do not spin and its own
times at these shapes stayed within 3% (README, "CPU threads").
Inputs are not flushed from cache; every CPU grid point but the smallest is larger than the L2
cache. The cost of mixing the two in one program is in the README ("CPU threads").
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

# GPU: one call is timed in about REP_MS in all (at least MIN_REPS calls, at most MAX_REPS),
# after about WARMUP_MS of warm-up calls.
GPU_REP_MS = 60.0
GPU_WARMUP_MS = 15.0
GPU_MIN_REPS = 10
GPU_MAX_REPS = 200
FLUSH_BYTES = 256 << 20

# CPU: (seconds to spend, min repeats, max repeats) per timing; calls per provider per round of
# CpuTimer.many, the last of them timed (see the module docstring), for calls under BURST_MAX_S.
CPU_SETTINGS = {False: (0.25, 5, 50), True: (0.05, 3, 20)}
BURST = 2
BURST_MAX_S = 0.05


def _clamp(v: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, v)))


class CpuTimer:
    def __init__(self, quick: bool = False):
        self.target_s, self.min_reps, self.max_reps = CPU_SETTINGS[quick]

    def describe(self) -> dict[str, Any]:
        return {
            "clock": "time.perf_counter",
            "statistic": "median",
            "warmup_calls": 1,
            "target_seconds": self.target_s,
            "min_reps": self.min_reps,
            "max_reps": self.max_reps,
        }

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, int]:
        t0 = time.perf_counter()
        fn()  # warm-up (the correctness check already ran it once)
        first = time.perf_counter() - t0
        n = _clamp(self.target_s / max(first, 1e-9), self.min_reps, self.max_reps)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3, n

    def many(self, fns: dict[str, Callable[[], Any]], burst: int = BURST) -> dict[str, Any]:
        """Time several callables in interleaved rounds, so that a burst of other work on the
        machine hits them alike. Each round calls each callable `burst` times in a row and times
        the last (the first pays for whatever the previous callable left running: see the
        module docstring). Returns, per name, (median ms, timed calls, seconds spent) or the
        exception a call raised."""
        out: dict[str, Any] = {}
        reps: dict[str, int] = {}
        times: dict[str, list[float]] = {}
        spent: dict[str, float] = {}
        calls: dict[str, int] = {}
        for name, fn in fns.items():
            try:
                t0 = time.perf_counter()
                fn()  # warm-up
                first = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 - reported for this callable only
                out[name] = e
                continue
            # a call longer than BURST_MAX_S is timed without a burst (what the previous callable
            # left running, ~1-3 ms of a core, is then a small part of it, and the slowest peer,
            # SciPy in float16 at ~2.5 s a call, would double the run); the time budget covers
            # every call of a burst, timed or not
            calls[name] = burst if first < BURST_MAX_S else 1
            n = self.target_s / max(first * calls[name], 1e-9)
            reps[name] = _clamp(n, self.min_reps, self.max_reps)
            times[name] = []
            spent[name] = first
        for k in range(max(reps.values(), default=0)):
            for name in reps:
                if name in out or k >= reps[name]:
                    continue
                try:
                    for b in range(calls[name]):
                        t0 = time.perf_counter()
                        fns[name]()
                        dt = time.perf_counter() - t0
                        spent[name] += dt
                        if b == calls[name] - 1:  # the last call of the burst
                            times[name].append(dt)
                except Exception as e:  # noqa: BLE001
                    out[name] = e
        for name, ts in times.items():
            if name not in out:
                out[name] = (statistics.median(ts) * 1e3, len(ts), spent[name])
        return out


class CudaTimer:
    def __init__(self, torch_mod, quick: bool = False):
        self.torch = torch_mod
        self.flush = torch_mod.empty(FLUSH_BYTES, dtype=torch_mod.int8, device="cuda")
        self.rep_ms = GPU_REP_MS / (2 if quick else 1)

    def describe(self) -> dict[str, Any]:
        return {
            "clock": "torch.cuda.Event (elapsed_time)",
            "statistic": "median",
            "l2_flush_bytes": FLUSH_BYTES,
            "warmup_ms": GPU_WARMUP_MS,
            "rep_ms": self.rep_ms,
            "min_reps": GPU_MIN_REPS,
            "max_reps": GPU_MAX_REPS,
        }

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, int]:
        torch = self.torch
        event = torch.cuda.Event
        fn()
        torch.cuda.synchronize()
        # estimate one call (with its flush) from 3
        start, end = event(enable_timing=True), event(enable_timing=True)
        start.record()
        for _ in range(3):
            self.flush.zero_()
            fn()
        end.record()
        torch.cuda.synchronize()
        est = max(start.elapsed_time(end) / 3, 1e-3)
        for _ in range(_clamp(GPU_WARMUP_MS / est, 1, 50)):
            fn()
        n = _clamp(self.rep_ms / est, GPU_MIN_REPS, GPU_MAX_REPS)
        starts = [event(enable_timing=True) for _ in range(n)]
        ends = [event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            self.flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)), n
