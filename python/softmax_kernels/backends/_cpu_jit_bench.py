"""CPU timings of torch, the pure NumPy backend and the compiled path (_cpu_jit), the
measurements behind NOTES-cpu.md:

    python -m softmax_kernels.backends._cpu_jit_bench [--dtypes float32,float64,float16]
        [--rounds 9] [--shapes 4096x4096,...] [--ops softmax,...] [--threads N] [--json FILE]
        [--as-called]

Kernel only (the default): every output preallocated.

torch runs its own CPU kernels with ``out=``: ``_softmax`` / ``_log_softmax``, the two
``_*_backward_data`` ops, and cross-entropy as ``F.cross_entropy`` runs it (``_log_softmax`` +
``nll_loss_forward``, then ``nll_loss_backward`` + ``_log_softmax_backward_data`` for the
gradient), every output preallocated. Ours: the backend functions with the same outputs. Every
point times the providers in interleaved rounds (one call of each per round, after one warm-up
call; each call after an idle gap, default 5 ms, so that torch's spinning OpenMP workers are
asleep again) and reports medians; geometric means per dtype over shapes x ops.

As called (``--as-called``): the public functions with fresh outputs, as a user calls them and as
``python -m bench`` times them: torch (``torch.softmax``, ``torch.log_softmax``, the two
``_*_backward_data`` ops, ``F.cross_entropy``, and for the gradient ``F.cross_entropy`` +
``torch.autograd.grad``) against ``sk`` on NumPy arrays and ``sk`` on torch CPU tensors (views of
the same memory), in interleaved rounds without an idle gap (``--gap-ms 0``, as the bench's
timer runs them). Reported per point: each median and torch's time / ours (the speed-up).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import numpy as np

SHAPES = ((4096, 4096), (32768, 256), (1024, 32000), (64, 262144), (8, 1048576))
OPS = ("softmax", "log_softmax", "softmax_bwd", "log_softmax_bwd", "ce_fwd", "ce_fwd_grad")
CE_KW = dict(lse=None, soft=False, weight=None, ignore_index=-100, label_smoothing=0.0,
             z_loss=0.0, softcap=None, grad_scale=1.0, reduction="mean", denom=None)  # fmt: skip


def _torch_calls(torch, d):
    aten = torch.ops.aten
    names = ("x", "y", "ly", "dy", "t", "out", "lsm", "g1", "g")
    X, Y, LY, DY, T, O, LSM, G1, G = (torch.from_numpy(d[k]) for k in names)
    loss, tw, one = (torch.from_numpy(d[k]) for k in ("tloss", "tw", "one"))

    def ce_fwd():
        torch._log_softmax(X, -1, False, out=LSM)
        aten.nll_loss_forward.output(LSM, T, None, 1, -100, output=loss, total_weight=tw)

    def ce_fwd_grad():
        ce_fwd()
        aten.nll_loss_backward.grad_input(one, LSM, T, None, 1, -100, tw, grad_input=G1)
        torch._log_softmax_backward_data(G1, LSM, -1, LSM.dtype, out=G)

    return {
        "softmax": lambda: torch._softmax(X, -1, False, out=O),
        "log_softmax": lambda: torch._log_softmax(X, -1, False, out=O),
        "softmax_bwd": lambda: torch._softmax_backward_data(DY, Y, -1, Y.dtype, grad_input=O),
        "log_softmax_bwd": lambda: torch._log_softmax_backward_data(DY, LY, -1, LY.dtype, out=O),
        "ce_fwd": ce_fwd,
        "ce_fwd_grad": ce_fwd_grad,
    }


def _our_calls(mod, d):
    x, y, ly, dy, t, out, g, loss = (d[k] for k in ("x", "y", "ly", "dy", "t", "out", "g", "loss"))
    return {
        "softmax": lambda: mod.softmax_fwd(x, out, scale=1.0, mask=None, is_log=False),
        "log_softmax": lambda: mod.softmax_fwd(x, out, scale=1.0, mask=None, is_log=True),
        "softmax_bwd": lambda: mod.softmax_bwd(dy, y, out, scale=1.0, is_log=False),
        "log_softmax_bwd": lambda: mod.softmax_bwd(dy, ly, out, scale=1.0, is_log=True),
        "ce_fwd": lambda: mod.cross_entropy_fwd(x, t, loss=loss, grad=None, **CE_KW),
        "ce_fwd_grad": lambda: mod.cross_entropy_fwd(x, t, loss=loss, grad=g, **CE_KW),
    }


def _pure(fns):
    """The NumPy backend's pure NumPy path: the calls with the compiled path switched off (once
    the backend routes to _cpu_jit, it asks _cpu_jit.usable(), which reads the variable)."""
    from . import _cpu_jit

    def off(f):
        def call():
            old = os.environ.get(_cpu_jit.ENV_VAR)
            os.environ[_cpu_jit.ENV_VAR] = "0"
            try:
                f()
            finally:
                if old is None:
                    del os.environ[_cpu_jit.ENV_VAR]
                else:
                    os.environ[_cpu_jit.ENV_VAR] = old

        return call

    return {op: off(f) for op, f in fns.items()}


def _data(rng, shape, dtype):
    x = (rng.standard_normal(shape, np.float32) * 2).astype(dtype)
    x32 = x.astype(np.float32)
    m = x32.max(axis=1, keepdims=True)
    e = np.exp(x32 - m)
    s = e.sum(axis=1, keepdims=True)
    cdt = np.float64 if dtype == "float64" else np.float32
    d = dict(
        x=x, y=(e / s).astype(dtype), ly=(x32 - m - np.log(s)).astype(dtype),
        dy=rng.standard_normal(shape, np.float32).astype(dtype),
        t=rng.integers(0, shape[1], shape[0]), loss=np.zeros((), cdt),
        tloss=np.zeros((), dtype), tw=np.zeros((), dtype), one=np.ones((), dtype),
    )  # fmt: skip
    for k in ("out", "lsm", "g1", "g"):
        d[k] = np.zeros(shape, dtype)  # touched: no page faults in the timed calls
    return d


AS_CALLED_SHAPES = SHAPES + ((1024, 1000), (256, 32000), (8, 262144), (16384, 256))


def _as_called_calls(torch, sk, d):
    """op -> {provider: call}: torch as called, sk on NumPy arrays, sk on torch CPU tensors."""
    F = torch.nn.functional
    x, y, ly, dy, t = (d[k] for k in ("x", "y", "ly", "dy", "t"))
    X, Y, LY, DY, T = (torch.from_numpy(a) for a in (x, y, ly, dy, t))
    XL = X.detach().clone().requires_grad_(True)

    def torch_ce_grad():
        loss = F.cross_entropy(XL, T)
        (g,) = torch.autograd.grad(loss, XL)
        return loss, g

    return {
        "softmax": dict(torch=lambda: torch.softmax(X, -1), sk=lambda: sk.softmax(x),
                        skT=lambda: sk.softmax(X)),
        "log_softmax": dict(torch=lambda: torch.log_softmax(X, -1),
                            sk=lambda: sk.log_softmax(x), skT=lambda: sk.log_softmax(X)),
        "softmax_bwd": dict(torch=lambda: torch._softmax_backward_data(DY, Y, -1, Y.dtype),
                            sk=lambda: sk.softmax_backward(dy, y),
                            skT=lambda: sk.softmax_backward(DY, Y)),
        "log_softmax_bwd": dict(
            torch=lambda: torch._log_softmax_backward_data(DY, LY, -1, LY.dtype),
            sk=lambda: sk.log_softmax_backward(dy, ly),
            skT=lambda: sk.log_softmax_backward(DY, LY)),
        "ce_fwd": dict(torch=lambda: F.cross_entropy(X, T), sk=lambda: sk.cross_entropy(x, t),
                       skT=lambda: sk.cross_entropy(X, T)),
        "ce_fwd_grad": dict(torch=torch_ce_grad, sk=lambda: sk.cross_entropy_with_grad(x, t),
                            skT=lambda: sk.cross_entropy_with_grad(X, T)),
    }  # fmt: skip


def run_as_called(dtypes, shapes, ops, rounds, gap_s=0.0, log=print, clock=time.perf_counter):
    """Medians of interleaved rounds (torch, sk, skT per round) of the calls as a user makes
    them; returns rows and per-dtype geometric means of torch's time / ours. With one thread
    each, ``clock=time.thread_time`` counts the calling thread's CPU time only (page faults
    included): a figure that other jobs on the machine barely move."""
    import torch

    import softmax_kernels as sk

    rng = np.random.default_rng(0)
    rows = []
    for dtype in dtypes:
        for shape in shapes:
            d = _data(rng, shape, dtype)
            calls = _as_called_calls(torch, sk, d)
            for op in ops:
                fns = calls[op]
                times = {p: [] for p in fns}
                for f in fns.values():
                    f()  # warm-up (and the JIT's compile or cache load)
                for _ in range(rounds):
                    for p, f in fns.items():
                        if gap_s:
                            time.sleep(gap_s)
                        t0 = clock()
                        r = f()
                        times[p].append(clock() - t0)
                        del r  # freed outside the timed region, as the bench's timer does
                med = {p: statistics.median(v) * 1e3 for p, v in times.items()}
                row = dict(dtype=dtype, shape=list(shape), op=op,
                           **{f"{p}_ms": v for p, v in med.items()})  # fmt: skip
                rows.append(row)
                log(f"{dtype:8s} {shape[0]:>6d}x{shape[1]:<8d} {op:16s} torch {med['torch']:8.3f}"
                    f"  sk {med['sk']:8.3f} ({med['torch'] / med['sk']:4.2f}x)  skT "
                    f"{med['skT']:8.3f} ({med['torch'] / med['skT']:4.2f}x)")  # fmt: skip
            del d, calls
    summary = {}
    for dtype in dtypes:
        rs = [r for r in rows if r["dtype"] == dtype]
        summary[dtype] = {
            p: math.exp(statistics.fmean(math.log(r["torch_ms"] / r[f"{p}_ms"]) for r in rs))
            for p in ("sk", "skT")
        }
        worst = {p: min(r["torch_ms"] / r[f"{p}_ms"] for r in rs) for p in ("sk", "skT")}
        log(f"{dtype}: speed-up (torch's time / ours), geometric mean over {len(rs)} points: "
            f"sk {summary[dtype]['sk']:.3f} (worst {worst['sk']:.2f}), skT "
            f"{summary[dtype]['skT']:.3f} (worst {worst['skT']:.2f})")  # fmt: skip
    return rows, summary


def run(dtypes, shapes, ops, rounds, gap_s=0.005, log=print):
    import torch

    from . import _cpu_jit, numpy_backend

    rng = np.random.default_rng(0)
    rows = []
    for dtype in dtypes:
        for shape in shapes:
            d = _data(rng, shape, dtype)
            calls = {"torch": _torch_calls(torch, d), "jit": _our_calls(_cpu_jit, d),
                     "numpy": _pure(_our_calls(numpy_backend, d))}  # fmt: skip
            for op in ops:
                fns = {p: c[op] for p, c in calls.items()}
                times = {p: [] for p in fns}
                for f in fns.values():
                    f()  # warm-up (and the JIT's compile or cache load)
                for _ in range(rounds):
                    for p, f in fns.items():
                        # torch's OpenMP workers spin for a while after each parallel region
                        # (libgomp); without a gap they take a core from the next provider
                        time.sleep(gap_s)
                        t0 = time.perf_counter()
                        f()
                        times[p].append(time.perf_counter() - t0)
                med = {p: statistics.median(v) * 1e3 for p, v in times.items()}
                row = dict(dtype=dtype, shape=list(shape), op=op, **{f"{p}_ms": v for p, v in
                                                                     med.items()})  # fmt: skip
                rows.append(row)
                log(f"{dtype:8s} {shape[0]:>6d}x{shape[1]:<8d} {op:16s} torch {med['torch']:8.2f}"
                    f"  jit {med['jit']:8.2f} ({med['jit'] / med['torch']:4.2f}x)  numpy "
                    f"{med['numpy']:8.2f} ({med['numpy'] / med['torch']:4.2f}x)")  # fmt: skip
            del d, calls
    summary = {}
    for dtype in dtypes:
        rs = [r for r in rows if r["dtype"] == dtype]
        summary[dtype] = {
            p: math.exp(statistics.fmean(math.log(r[f"{p}_ms"] / r["torch_ms"]) for r in rs))
            for p in ("jit", "numpy")
        }
        log(f"{dtype}: geometric mean over {len(rs)} points, time / torch's: jit "
            f"{summary[dtype]['jit']:.3f}, numpy {summary[dtype]['numpy']:.3f}")  # fmt: skip
    return rows, summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="float32,float64,float16")
    ap.add_argument("--shapes", default=None, help="ROWSxCOLS,... (default: the issue's five; "
                    "with --as-called also the bench's CPU grid)")  # fmt: skip
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None, help="torch's and our pool's threads")
    ap.add_argument(
        "--gap-ms",
        type=float,
        default=None,
        help="idle time before each call (default 5; 0 with --as-called)",
    )
    ap.add_argument("--as-called", action="store_true", help="fresh outputs, the public API")
    ap.add_argument(
        "--thread-time",
        action="store_true",
        help="--as-called --threads 1: time the calling thread's CPU time",
    )
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.gap_ms is None:
        a.gap_ms = 0.0 if a.as_called else 5.0
    if a.shapes is None:
        a.shapes = ",".join(f"{r}x{c}" for r, c in (AS_CALLED_SHAPES if a.as_called else SHAPES))
    import torch

    from . import numpy_backend

    if a.threads:
        numpy_backend._THREADS = a.threads  # the pool size _for_row_blocks uses
    torch.set_num_threads(numpy_backend._THREADS)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    t0 = time.perf_counter()
    args = (a.dtypes.split(","), shapes, a.ops.split(","), a.rounds, a.gap_ms / 1e3)
    if a.as_called:
        if a.thread_time and a.threads != 1:
            ap.error("--thread-time needs --threads 1 (the work of other threads is not counted)")
        clock = time.thread_time if a.thread_time else time.perf_counter
        rows, summary = run_as_called(*args, clock=clock)
    else:
        rows, summary = run(*args)
    import numba

    info = dict(
        torch=torch.__version__, numpy=np.__version__, numba=numba.__version__,
        threads=torch.get_num_threads(), our_threads=numpy_backend._THREADS,
        cpu_count=os.cpu_count(), loadavg=os.getloadavg(), gap_ms=a.gap_ms,
        as_called=a.as_called, thread_time=a.thread_time, cpu_path=numpy_backend.cpu_path(),
        seconds=time.perf_counter() - t0,
    )  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(info=info, rows=rows, summary=summary), f, indent=1)
    print(info)


if __name__ == "__main__":
    main()
