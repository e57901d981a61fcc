"""Vocabulary-parallel cross-entropy: what the merge costs beside the local kernel, and the bytes
each rank sends. ``python -m bench --ops vp_ce``.

Each rank holds the logits of its classes, (N, V / P). Timed, per rank, median of interleaved
calls (a barrier before each):

- ``local``: ``sk.cross_entropy_with_grad(shard, t_local)`` without a process group (the fused
  forward + gradient over the shard; ``t_local = t mod V_local`` so that every target is a valid
  local class: the same work as the shard's share of the full problem);
- ``vp``: ``sk.cross_entropy_with_grad(shard, t, process_group=...)``, the whole call: the
  statistics kernel, one all-gather of the (N + 1, K) statistics, the rank-order merge, the
  gradient kernel (softmax_kernels/_parallel.py);
- ``gather``: the all-gather alone, on a buffer of the statistics' shape and dtype.

``vp - local`` is the price of the parallel call (the collective, the merge, and the second
pass over the logits that the split into statistics and gradient kernels makes). Bytes per row:
read from the statistics buffer the call hands to the collective (its row: K values of the
compute dtype, float32 for float32/half logits), for the plain call and for label smoothing,
class weights and soft targets; every rank receives (P - 1) x that per row.

CPU: P = 2 and 4 processes (torch.multiprocessing.spawn, gloo over loopback) on this machine;
with more processes than cores they share the cores, and the figures say so. GPU (one
device): a simulation of P shards in one process: a world-size-1 process group (NCCL), and the
call of rank 0 made with ``_parallel``'s group facts and gather replaced, so that the real merge
runs on P statistics buffers (the other ranks' computed beforehand from their own shards) and the
gather is a device-memory copy; P = 1 is the real world-size-1 call. A real all-gather adds its
latency (~10-30 us over NVLink) and (P - 1) x N x K x 4 bytes at link bandwidth, which the table
states beside the simulated figure.

Each result is checked first against float64 (NumPy): the loss over every row (the dense loss of
the full logits) within the contract's bound, the rank's gradient slice on a subset of rows.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .grids import TOLERANCES

OP = "vp_ce"
SHAPES = {
    ("cpu", False): [(4096, 32000)],
    ("cpu", True): [(1024, 8000)],
    ("cuda", False): [(8192, 128256), (16384, 256000)],
    ("cuda", True): [(8192, 128256)],
}
WORLDS = {"cpu": (2, 4), "cuda": (1, 2, 4, 8)}
DEFAULT_DTYPE = {"cpu": "fp32", "cuda": "bf16"}
REPS = {False: 7, True: 3}
CHECK_ROWS = 64
# The option sets whose bytes per row are recorded (one small call each).
BYTE_CASES = {
    "plain": {},
    "label_smoothing": {"label_smoothing": 0.1},
    "weight": {"weight": True},
    "weight + label_smoothing": {"weight": True, "label_smoothing": 0.1},
    "soft targets": {"soft": True},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_width(v: int, world: int) -> int:
    """Equal shards (the default vocab_start): V rounded down to a multiple of P."""
    return v // world


def _problem(seed: int, n: int, v: int, dtype: str):
    """Full logits (N, V) ~ 3 N(0, 1) in float32 (the dtype's values) and global targets."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, v), dtype=np.float32) * 3).astype(np.float32)
    t = rng.integers(0, v, size=n, dtype=np.int64)
    return x, t


def _ref_loss_and_grad_rows(x_full, t, rows, v_local, start):
    """float64: the mean loss of the full logits (every row, in blocks) and the gradient slice
    [start, start + v_local) of ``rows``."""
    n = x_full.shape[0]
    block = max(1, (1 << 24) // x_full.shape[1])
    lse = np.empty(n)
    for r0 in range(0, n, block):
        z = x_full[r0 : r0 + block].astype(np.float64)
        m = z.max(axis=1)
        lse[r0 : r0 + block] = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    zt = x_full[np.arange(n), t].astype(np.float64)
    loss = float((lse - zt).mean())
    z = x_full[rows].astype(np.float64)
    g = np.exp(z - lse[rows, None])
    g[np.arange(len(rows)), t[rows]] -= 1.0
    return loss, g[:, start : start + v_local] / n


def _check(loss, grad, ref_loss, ref_grad, rows, dtype) -> dict[str, Any]:
    atol, rtol = TOLERANCES[dtype]
    lv = float(loss)
    g = grad.detach().to("cpu").double().numpy()[rows] if hasattr(grad, "detach") else grad
    loss_ratio = abs(lv - ref_loss) / (atol + rtol * abs(ref_loss)) if math.isfinite(lv) \
        else float("inf")  # fmt: skip
    # the gradient of the summed loss (values of order 1): n x grad against the bound
    n = grad.shape[0]
    bound = atol + rtol * np.abs(ref_grad * n)
    grad_ratio = float(np.max(np.abs(g * n - ref_grad * n) / bound)) if g.size else 0.0
    if not np.all(np.isfinite(g)):
        grad_ratio = float("inf")
    return {"ok": loss_ratio <= 1 and grad_ratio <= 1, "loss_err_ratio": loss_ratio,
            "grad_err_ratio": grad_ratio}  # fmt: skip


@contextlib.contextmanager
def _recording_gather(dist, sink: list):
    """Record the (shape, dtype, nbytes) of every all-gather input (the statistics buffer)."""
    names = [n for n in ("all_gather_single", "all_gather_into_tensor") if hasattr(dist, n)]
    saved = {n: getattr(dist, n) for n in names}

    def wrap(real):
        def gather(out, inp, *a, **k):
            rec = {"shape": list(inp.shape), "dtype": str(inp.dtype).replace("torch.", ""),
                   "nbytes": int(inp.numel() * inp.element_size())}  # fmt: skip
            sink.append(rec)
            r = real(out, inp, *a, **k)
            rec["gathered"] = out  # what every rank merges
            return r

        return gather

    try:
        for n, real in saved.items():
            setattr(dist, n, wrap(real))
        yield sink
    finally:
        for n, real in saved.items():
            setattr(dist, n, real)


def _byte_case(sk, torch, n_rows, v_local, start, world, opts, group, dtype=None):
    """Bytes per row of the statistics buffer one call of these options sends (a small call)."""
    import torch.distributed as dist

    rng = np.random.default_rng(5)
    dt = dtype or torch.float32
    x = torch.tensor(rng.standard_normal((n_rows, v_local)), dtype=dt)
    kw: dict[str, Any] = {"process_group": group, "vocab_start": start}
    if opts.get("soft"):
        q = rng.random((n_rows, v_local))
        t = torch.tensor(q / (q.sum(1, keepdims=True) * world), dtype=dt)
    else:
        t = torch.tensor(rng.integers(0, v_local * world, size=n_rows))
    if opts.get("weight"):
        kw["weight"] = torch.tensor(rng.random(v_local) + 0.5, dtype=torch.float32)
    if opts.get("label_smoothing"):
        kw["label_smoothing"] = opts["label_smoothing"]
    sink: list = []
    with _recording_gather(dist, sink):
        sk.cross_entropy_with_grad(x, t, **kw)
    if len(sink) != 1:
        return {"collectives": len(sink)}
    s = sink[0]
    rows, k = s["shape"]
    return {"collectives": 1, "stats_shape": s["shape"], "stats_dtype": s["dtype"],
            "bytes_per_row": s["nbytes"] // rows, "header_rows": rows - n_rows,
            "values_per_row": k}  # fmt: skip


def _merge_fn(gathered, world: int, n: int, t, v_local: int):
    """The merge alone: ``_parallel._merge`` and ``_reduce`` (the torch operations between the
    statistics and the gradient kernels) on a gathered (P, N + 1, K) statistics tensor of a
    plain mean call; None where _parallel's internals differ from what this expects."""
    try:
        from softmax_kernels import _core, _parallel

        g = gathered.reshape(world, n + 1, -1).clone()
        rows = _parallel._Rows(n, False, t, False, g.device)
        o = _core.CEOptions()

        def merge():
            mg = _parallel._merge(g, rows, o, equal=True, n_local=v_local, process_group=None)
            return _parallel._reduce(mg, "mean")

        merge()
        return merge
    except Exception:  # noqa: BLE001 - the merge column reads n/a
        return None


# ----------------------------------------------------------------------------------------------
# CPU: P processes over gloo


def cpu_worker(rank, world, port, result_dir, n, v, reps, seed):
    """One rank of the CPU measurement (torch.multiprocessing.spawn calls it)."""
    import torch
    import torch.distributed as dist

    root = Path(__file__).resolve().parent.parent
    for p in (str(root / "python"), str(root)):
        if p not in sys.path:
            sys.path.insert(0, p)
    import softmax_kernels as sk

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // world))
    out: dict[str, Any] = {"rank": rank, "world": world, "threads": torch.get_num_threads()}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)  # fmt: skip
        group = dist.group.WORLD
        v_local = _shard_width(v, world)
        v_used = v_local * world
        x_full, t = _problem(seed, n, v_used, "fp32")
        start = rank * v_local
        shard = torch.from_numpy(np.ascontiguousarray(x_full[:, start : start + v_local]))
        tt = torch.from_numpy(t)
        t_local = torch.from_numpy(t % v_local)
        rows = np.unique(np.linspace(0, n - 1, min(n, CHECK_ROWS)).astype(np.int64))
        ref_loss, ref_grad = _ref_loss_and_grad_rows(x_full, t, rows, v_local, start)
        del x_full
        sink: list = []
        with _recording_gather(dist, sink):
            loss, grad = sk.cross_entropy_with_grad(shard, tt, process_group=group)
        out["check"] = _check(loss, grad, ref_loss, ref_grad, rows, "fp32")
        loss = grad = None
        merge = _merge_fn(sink[0]["gathered"], world, n, tt, v_local) if sink else None
        sink = None
        stats_rows, k = n + 1, _n_stats_plain()
        gbuf = torch.zeros((stats_rows, k), dtype=torch.float32)
        gout = torch.empty((world * stats_rows, k), dtype=torch.float32)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        fns = {
            "local": lambda: sk.cross_entropy_with_grad(shard, t_local),
            "vp": lambda: sk.cross_entropy_with_grad(shard, tt, process_group=group),
            "gather": lambda: gather(gout, gbuf, group=group),
        }
        if merge is not None:
            fns["merge"] = merge
        times: dict[str, list[float]] = {k_: [] for k_ in fns}
        for fn in fns.values():  # warm-up
            dist.barrier(group)
            fn()
        for _ in range(reps):
            for name, fn in fns.items():
                dist.barrier(group)
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        out["ms"] = {k_: statistics.median(v_) * 1e3 for k_, v_ in times.items()}
        out["reps"] = reps
        out["bytes"] = {name: _byte_case(sk, torch, 8, 16, rank * 16, world, opts, group)
                        for name, opts in BYTE_CASES.items()}  # fmt: skip
        out["v_local"] = v_local
    except Exception as e:  # noqa: BLE001 - reported by the parent
        import traceback

        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()[-2000:]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(out))


def _n_stats_plain() -> int:
    """Values per statistics row of a plain class-target call (softmax_kernels._parallel)."""
    try:
        from softmax_kernels import _parallel

        return _parallel._n_stats(False, False, False)
    except (ImportError, AttributeError, TypeError):
        return 3


def run_cpu(shapes, worlds, *, quick=False, seed=0, tmp_dir=None, say=None,
            rows: list | None = None) -> list[dict]:  # fmt: skip
    """P processes over gloo per shape; appends to ``rows`` (kept when interrupted)."""
    import tempfile

    import torch.multiprocessing as mp

    say = say or (lambda s: print(s, file=sys.stderr))
    rows = [] if rows is None else rows
    for n, v in shapes:
        for world in worlds:
            say(f"vp_ce fp32 {n}x{v}: {world} processes (gloo)")
            row = {"op": OP, "device": "cpu", "mode": "gloo processes", "dtype": "fp32",
                   "n": n, "v": v, "world": world, "v_local": _shard_width(v, world),
                   "status": "ok", "message": ""}  # fmt: skip
            with tempfile.TemporaryDirectory(dir=tmp_dir) as d:
                try:
                    mp.spawn(cpu_worker, args=(world, _free_port(), d, n, v, REPS[quick], seed),
                             nprocs=world, join=True)  # fmt: skip
                    ranks = [json.loads(Path(d, f"rank{r}.json").read_text())
                             for r in range(world)]  # fmt: skip
                except Exception as e:  # noqa: BLE001
                    row.update(status="error", message=f"{type(e).__name__}: {e}"[:300])
                    rows.append(row)
                    continue
            _aggregate(row, ranks)
            rows.append(row)
    return rows


def _aggregate(row: dict[str, Any], ranks: list[dict[str, Any]]) -> None:
    errs = [r for r in ranks if "error" in r]
    if errs:
        row.update(status="error", message=f"rank {errs[0]['rank']}: {errs[0]['error']}"[:300],
                   traceback=errs[0].get("traceback"))  # fmt: skip
        return
    bad = [r for r in ranks if not r["check"]["ok"]]
    row["check"] = {"loss_err_ratio": max(r["check"]["loss_err_ratio"] for r in ranks),
                    "grad_err_ratio": max(r["check"]["grad_err_ratio"] for r in ranks)}  # fmt: skip
    if bad:
        row.update(status="mismatch", message=f"rank {bad[0]['rank']}: {bad[0]['check']}")
        return
    # the slowest rank sets the pace of a collective step: report the max over ranks
    for k in ("local", "vp", "gather", "merge"):
        vals = [r["ms"][k] for r in ranks if k in r["ms"]]
        row[f"{k}_ms"] = max(vals) if len(vals) == len(ranks) else None
    row["per_rank_ms"] = [r["ms"] for r in ranks]
    row["reps"] = ranks[0]["reps"]
    row["threads_per_rank"] = ranks[0]["threads"]
    row["bytes"] = ranks[0]["bytes"]
    _derive(row)


def _derive(row: dict[str, Any]) -> None:
    row["overhead_ms"] = row["vp_ms"] - row["local_ms"]
    row["vp_over_local"] = row["vp_ms"] / row["local_ms"] if row["local_ms"] else None
    plain = (row.get("bytes") or {}).get("plain") or {}
    b = plain.get("bytes_per_row")
    if b is not None:
        row["bytes_per_row_sent"] = b
        row["bytes_per_row_received"] = (row["world"] - 1) * b
        row["gathered_bytes"] = row["world"] * (row["n"] + plain.get("header_rows", 1)) * b


# ----------------------------------------------------------------------------------------------
# GPU: P shards simulated on one device


@contextlib.contextmanager
def _world_one_group(torch, backend: str):
    """A world-size-1 default process group (in-memory store); torn down afterwards."""
    import torch.distributed as dist

    made = False
    if not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        made = True
    elif dist.get_world_size() != 1:
        raise RuntimeError("vp_ce simulation needs no process group, or one of world size 1")
    try:
        yield dist.group.WORLD
    finally:
        if made:
            dist.destroy_process_group()


@contextlib.contextmanager
def _simulated(parallel, world: int, rank: int, others: list | None, capture: list | None,
               stacked: list | None = None):  # fmt: skip
    """Within: ``_parallel``'s group facts say (world, rank * V_local, equal shards) and its
    gather returns this rank's statistics stacked with ``others`` in rank order (a copy), or,
    with ``capture``, records this rank's statistics (and returns them P times)."""
    real_facts, real_gather = parallel._group_facts, parallel._gather

    def facts(process_group, n_local, vocab_start):
        return world, rank * n_local, True

    def gather(stats, world_, process_group):
        if capture is not None:
            capture.append(stats.clone())
            return stats.unsqueeze(0).expand(world_, *stats.shape).clone()
        import torch

        parts = list(others)
        parts.insert(rank, stats)
        g = torch.stack(parts)
        if stacked is not None:
            stacked[:] = [g]
        return g

    parallel._group_facts, parallel._gather = facts, gather
    try:
        yield
    finally:
        parallel._group_facts, parallel._gather = real_facts, real_gather


def run_sim(shapes, worlds, dtype: str, *, device: str = "cuda", quick=False, seed=0,
            say=None, backend=None, rows: list | None = None) -> list[dict]:  # fmt: skip
    """The single-device simulation of P shards; ``device="cpu"`` runs it on CPU tensors (the
    tests) with gloo. Appends to ``rows`` (kept when interrupted)."""
    import torch

    import softmax_kernels as sk
    from softmax_kernels import _parallel

    from .grids import DTYPES
    from .timing import CpuTimer, CudaTimer

    say = say or (lambda s: print(s, file=sys.stderr))
    on_gpu = device != "cpu"
    timer = CudaTimer(torch, quick=quick) if on_gpu else CpuTimer(quick=True)
    tdt = getattr(torch, DTYPES[dtype])
    rows = [] if rows is None else rows
    with _world_one_group(torch, "nccl" if on_gpu else "gloo") as group:
        for n, v in shapes:
            # made on the device (a GPU shape is up to 4G logits: no host copy of them)
            g = torch.Generator(device=device)
            g.manual_seed(seed)
            x_full = (torch.randn((n, v), device=device, generator=g) * 3).to(tdt)
            t_full = torch.randint(0, v, (n,), device=device, generator=g)
            rows_idx = np.unique(np.linspace(0, n - 1, min(n, CHECK_ROWS)).astype(np.int64))
            for world in worlds:
                say(f"vp_ce {dtype} {n}x{v}: {world} simulated shards")
                v_local = _shard_width(v, world)
                row = {"op": OP, "device": device, "mode": "simulated shards" if world > 1
                       else "world size 1", "dtype": dtype, "n": n, "v": v, "world": world,
                       "v_local": v_local, "status": "ok", "message": ""}  # fmt: skip
                try:
                    _sim_point(row, torch, sk, _parallel, group, timer, x_full, t_full,
                               rows_idx, world, v_local, dtype, backend)  # fmt: skip
                except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                    oom = "out of memory" in str(e).lower()
                    row.update(status="skipped-memory" if oom else "error",
                               message=f"{type(e).__name__}: {e}"[:300])  # fmt: skip
                rows.append(row)
                if on_gpu:
                    torch.cuda.empty_cache()
            x_full = t_full = None
    return rows


def _ref_torch(torch, x, t, rows_idx, v_local):
    """float64 on x's device: the mean loss of logits x (every row, in blocks of 2**27
    elements) and the gradient slice [0, v_local) of ``rows_idx``, as NumPy."""
    n, v = x.shape
    block = max(1, (1 << 27) // v)
    lse = torch.empty(n, dtype=torch.float64, device=x.device)
    zt = torch.empty_like(lse)
    for r0 in range(0, n, block):
        z = x[r0 : r0 + block].to(torch.float64)
        lse[r0 : r0 + block] = torch.logsumexp(z, dim=1)
        zt[r0 : r0 + block] = z.gather(1, t[r0 : r0 + block, None])[:, 0]
        del z
    loss = float((lse - zt).mean())
    ri = torch.as_tensor(rows_idx, device=x.device)
    z = x[ri].to(torch.float64)
    g = torch.exp(z - lse[ri, None])
    g[torch.arange(len(rows_idx), device=x.device), t[ri]] -= 1.0
    return loss, (g[:, :v_local] / n).cpu().numpy()


def _sim_point(row, torch, sk, parallel, group, timer, x_full, t_full, rows_idx, world,
               v_local, dtype, backend):  # fmt: skip
    import torch.distributed as dist

    v_used = v_local * world
    x_used = x_full[:, :v_used]
    tt = t_full % v_used
    t_local = tt % v_local
    shards = [x_full[:, r * v_local : (r + 1) * v_local].contiguous() for r in range(world)]
    kw = {"backend": backend} if backend else {}
    ref_loss, ref_grad = _ref_torch(torch, x_used, tt, rows_idx, v_local)
    x_used = None
    if world == 1:
        vp = lambda: sk.cross_entropy_with_grad(shards[0], tt, process_group=group, **kw)  # noqa: E731
        sink: list = []
        with _recording_gather(dist, sink):
            loss, grad = vp()
        bytes_row = sink[0]["nbytes"] // sink[0]["shape"][0] if sink else None
        gathered = sink[0]["gathered"] if sink else None
        sink = None
    else:
        others = []
        for r in range(1, world):
            cap: list = []
            with _simulated(parallel, world, r, None, cap):
                sk.cross_entropy_with_grad(shards[r], tt, process_group=group, **kw)
            others.append(cap[0])
        bytes_row = int(others[0].shape[1] * others[0].element_size())

        stacked: list = []

        def vp():
            with _simulated(parallel, world, 0, others, None, stacked):
                return sk.cross_entropy_with_grad(shards[0], tt, process_group=group, **kw)

        loss, grad = vp()
        gathered = stacked[0] if stacked else None
    chk = _check(loss, grad, ref_loss, ref_grad, rows_idx, dtype)
    row["check"] = chk
    loss = grad = None
    if not chk["ok"]:
        row.update(status="mismatch", message=str(chk))
        return
    local = lambda: sk.cross_entropy_with_grad(shards[0], t_local, **kw)  # noqa: E731
    row["local_ms"], row["local_reps"] = timer(local)
    row["vp_ms"], row["reps"] = timer(vp)
    row["gather_ms"] = None  # simulated: a device copy inside the vp call
    merge = None if gathered is None else _merge_fn(gathered, world, row["n"], tt, v_local)
    gathered = None
    row["merge_ms"] = timer(merge)[0] if merge is not None else None
    row["bytes"] = {"plain": {"bytes_per_row": bytes_row, "header_rows": 1}}
    _derive(row)
    # what a real all-gather would add: its latency and (P - 1) x N x K x 4 bytes per rank
    if world > 1 and bytes_row:
        row["real_gather_bytes_in"] = (world - 1) * (row["n"] + 1) * bytes_row


# ----------------------------------------------------------------------------------------------
# report


def summary_markdown(record: dict[str, Any]) -> str:
    rows = record["vp_ce"]["rows"]
    dev = record["device"]
    lines = [
        f"## Vocabulary-parallel cross-entropy: the merge vs the local kernel: {dev.get('name')} "
        f"({record['created'][:10]})",
        "",
        "Per rank, forward + gradient of its (N, V/P) shard: `local` without a process group, "
        "`vp` the whole call with one (the statistics kernel, one all-gather, the merge, the "
        "gradient kernel), `gather` the all-gather alone on the statistics buffer, `merge` the "
        "rank-order merge and reduction alone (torch operations on the gathered statistics). "
        "The slowest rank's median. Bytes per row: the statistics row each rank sends (it "
        "receives P - 1 of them per row).",
        "",
        *(
            [f"**Warning: {record['settings']['busy_warning']}.**", ""]
            if (record.get("settings") or {}).get("busy_warning")
            else []
        ),
        "| N x V | dtype | P | mode | V/P | local ms | vp ms | vp - local ms | vp / local | "
        "gather ms | merge ms | bytes/row sent | bytes/row received | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = r["status"] == "ok"
        c = r.get("check") or {}
        chk = f"loss {c['loss_err_ratio']:.2g}, grad {c['grad_err_ratio']:.2g} of tol" if c \
            else ""  # fmt: skip
        cells = [f"{r['n']}x{r['v']}", r["dtype"], str(r["world"]), r["mode"], str(r["v_local"])]
        if ok:
            cells += [f"{r['local_ms']:.3f}", f"{r['vp_ms']:.3f}", f"{r['overhead_ms']:.3f}",
                      f"{r['vp_over_local']:.2f}",
                      "simulated" if r.get("gather_ms") is None else f"{r['gather_ms']:.3f}",
                      "n/a" if r.get("merge_ms") is None else f"{r['merge_ms']:.3f}",
                      str(r.get("bytes_per_row_sent", "n/a")),
                      str(r.get("bytes_per_row_received", "n/a")), chk]  # fmt: skip
        else:
            cells += [r["status"], "", "", "", "", "", "", "", (r["message"] or chk)[:100]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    cases = next((r["bytes"] for r in rows if r["status"] == "ok" and len(r.get("bytes") or {})
                  > 1), None)  # fmt: skip
    if cases:
        lines += ["Statistics row per call option (bytes each rank sends per row; one "
                  "collective per call):", "",
                  "| options | values per row | dtype | bytes per row | header rows | "
                  "collectives |", "|---|---|---|---|---|---|"]  # fmt: skip
        for name, b in cases.items():
            lines.append(f"| {name} | {b.get('values_per_row', 'n/a')} | "
                         f"{b.get('stats_dtype', 'n/a')} | {b.get('bytes_per_row', 'n/a')} | "
                         f"{b.get('header_rows', 'n/a')} | {b.get('collectives')} |")  # fmt: skip
        lines.append("")
    notes = record["vp_ce"].get("notes") or []
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
