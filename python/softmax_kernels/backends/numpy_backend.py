"""The NumPy backend: the CPU fallback and the reference the GPU backends are tested against.

Two sets of kernels behind one interface: the compiled CPU kernels of ``_cpu_jit`` (numba, an
optional extra: ``pip install 'softmax-kernels[cpu]'``) when they can run, else the pure NumPy
code of this module, which stays the fallback and the test oracle (``SOFTMAX_KERNELS_CPU_JIT=0``
selects it). Everything below describes the pure NumPy code.

It serves NumPy arrays and torch CPU tensors (zero-copy through ``Tensor.numpy()``; bfloat16,
which NumPy lacks, through a float32 copy). Every op works on blocks of rows sized so that the
block and its one or two temporaries stay in the CPU's L2 cache, updating in place, with no
Python loop over rows; large inputs spread their blocks over a thread pool (NumPy releases the
GIL inside ufuncs). Half types are computed in float32, float64 in float64. Each row's result
depends only on that row, so the output is bitwise the same whatever the blocking or threads.
"""

from __future__ import annotations

import os
import sys
import threading

import numpy as np

from .. import _arrays

NAME = "numpy"

# Elements per block of rows: 1 MiB of float32, about a core's L2. Each block costs a dozen
# ufunc calls, whose dispatch holds the GIL, so smaller blocks stop the threads from running in
# parallel (4096x4096 float32 softmax on 2 cores: 46 ms at 64K elements, 25-30 ms at 256K-1M).
_BLOCK_ELEMS = 1 << 18
# Below this many elements a thread pool costs more than it saves (about 100 us of overhead).
_PARALLEL_MIN_ELEMS = 1 << 18
_THREADS = max(1, min(8, os.cpu_count() or 1))
_pool = None  # the _Pool below, started on the first parallel call


def unavailable_reason() -> str | None:
    return None


def serve_reason(x) -> str | None:
    if _arrays.is_cuda(x):
        return (
            "the NumPy backend runs on the CPU; pass backend='triton' or 'cupy' for CUDA data, "
            "or move it to the CPU first (tensor.cpu(), cupy.asnumpy)"
        )
    return None


# ----------------------------------------------------------------------------------------------
# Conversions: torch CPU tensors <-> NumPy views.


# NumPy has no bfloat16: such tensors are widened to float32 by torch, and results narrowed
# back by torch. float16 tensors are viewed as they are; the blocks widen them (see _load).
_WIDEN_WITH_TORCH = ("bfloat16",)


def _np_in(a):
    """A NumPy view of a NumPy array or torch CPU tensor (bfloat16: a float32 copy)."""
    if a is None or isinstance(a, (np.ndarray, np.generic)):
        return a
    a = a.detach()
    if _arrays.dtype_name(a) in _WIDEN_WITH_TORCH:
        return a.float().numpy()
    return a.numpy()


class _OutRows:
    """NumPy memory to write an output into: the output itself (NumPy arrays, tensors viewed
    through .numpy()), or a buffer that finish() copies back: float32 for a bfloat16 tensor
    (rounded by torch's conversion), native byte order for a non-native NumPy array."""

    def __init__(self, out):
        self.out = out
        self.copy_back = True
        if isinstance(out, np.ndarray):
            self.copy_back = not out.dtype.isnative
            self.np = np.empty(out.shape, out.dtype.newbyteorder("=")) if self.copy_back else out
        elif _arrays.dtype_name(out) in _WIDEN_WITH_TORCH:
            self.np = np.empty(tuple(out.shape), np.float32)
        else:
            self.np = out.detach().numpy()  # the tensor's own memory: nothing to copy back
            self.copy_back = False

    def finish(self):
        if not self.copy_back:
            return
        if isinstance(self.out, np.ndarray):
            np.copyto(self.out, self.np)
            return
        import torch

        self.out.copy_(torch.from_numpy(self.np))


def _compute_dtype(a: np.ndarray) -> np.dtype:
    return np.dtype(np.float64 if a.dtype == np.float64 else np.float32)


class _Job:
    """One call's row blocks, taken in order by whichever thread asks next (the caller and
    the pool's workers). The caller waits only for blocks that were taken: a worker that
    wakes after the last block was taken finds nothing to do and costs the caller nothing
    (a wake-up on this VM costs 20-100 us, as much as a small call's work)."""

    __slots__ = ("work", "rows", "n_rows", "n_blocks", "next", "done", "error", "lock", "event")

    def __init__(self, work, rows: int, n_rows: int):
        self.work, self.rows, self.n_rows = work, rows, n_rows
        self.n_blocks = -(-n_rows // rows)
        self.next = self.done = 0
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.event = threading.Event()

    def run(self) -> None:
        while True:
            with self.lock:
                i = self.next
                if i >= self.n_blocks or self.error is not None:
                    return
                self.next = i + 1
            r0 = i * self.rows
            try:
                self.work(r0, min(r0 + self.rows, self.n_rows))
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                with self.lock:
                    if self.error is None:
                        self.error = e
            with self.lock:
                self.done += 1
                if self.done == self.next and (self.next >= self.n_blocks or self.error):
                    self.event.set()

    def wait(self) -> None:
        with self.lock:
            finished = self.done == self.next
        if not finished:
            self.event.wait()
        if self.error is not None:
            raise self.error


class _Pool:
    """Worker threads that run jobs from a queue (lighter than a ThreadPoolExecutor: no
    future per task). Daemon threads: a job never depends on a worker starting, so neither
    interpreter exit nor a fork (the child gets a fresh pool) can leave a caller waiting."""

    def __init__(self):
        import queue

        self.queue = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []

    def ensure(self, n: int) -> None:
        while len(self.threads) < n:
            t = threading.Thread(target=self._worker, name=f"softmax_kernels-{len(self.threads)}",
                                 daemon=True)  # fmt: skip
            t.start()
            self.threads.append(t)

    def _worker(self) -> None:
        while True:
            self.queue.get().run()


def _reset_pool_after_fork() -> None:
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pool_after_fork)


def _for_row_blocks(n_rows: int, n_cols: int, work, block_elems: int | None = None,
                    parallel_min: int | None = None) -> None:  # fmt: skip
    """Call work(r0, r1) over blocks of rows (about block_elems elements each, default
    _BLOCK_ELEMS), on the thread pool when the input has at least parallel_min elements
    (default _PARALLEL_MIN_ELEMS)."""
    global _pool
    be = _BLOCK_ELEMS if block_elems is None else block_elems
    rows = max(1, be // max(n_cols, 1))
    n_blocks = -(-n_rows // rows)
    threshold = _PARALLEL_MIN_ELEMS if parallel_min is None else parallel_min
    if _THREADS > 1 and n_blocks > 1 and n_rows * n_cols >= threshold:
        if _pool is None:
            _pool = _Pool()
        # The calling thread takes blocks too (one worker fewer to wake per call); blocks go to
        # whichever thread asks next. Each row's result depends only on the row, so which
        # thread computes it changes no bit.
        job = _Job(work, rows, n_rows)
        helpers = min(_THREADS - 1, n_blocks - 1)
        _pool.ensure(helpers)
        for _ in range(helpers):
            _pool.queue.put(job)
        job.run()
        job.wait()
    else:
        for r0 in range(0, n_rows, rows):
            work(r0, min(r0 + rows, n_rows))


_F16_MIN_NORMAL = np.float32(2.0**-14)


def _torch_views(*arrays):
    """torch views of NumPy arrays when torch is already imported (never imported for this)
    and can view them (no negative strides), else None."""
    torch = sys.modules.get("torch")
    if torch is None or any(s < 0 for a in arrays for s in a.strides):
        return None
    if not all(a.flags.writeable for a in arrays):
        return None  # torch.from_numpy warns about read-only memory (e.g. np.broadcast_to)
    return [torch.from_numpy(a) for a in arrays]


def _load(buf: np.ndarray, src: np.ndarray) -> None:
    """buf[...] = src, widening float16 to the compute dtype. torch's conversion (vectorised)
    is used when torch is loaded: NumPy's runs about 5x slower."""
    views = _torch_views(buf, src) if src.dtype == np.float16 else None
    if views is not None:
        views[0].copy_(views[1])
    else:
        np.copyto(buf, src)


def _widened(slot: int, src: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """src in the compute dtype: src itself, or a widened copy in a scratch buffer."""
    if src.dtype == dtype:
        return src
    buf = _tmp(slot, src.shape, dtype)
    _load(buf, src)
    return buf


def _store(dst: np.ndarray, buf: np.ndarray) -> None:
    """dst[...] = buf, rounding to dst's dtype.

    For float16, torch's conversion when torch is loaded (vectorised, round to nearest even).
    Otherwise NumPy's, which takes a scalar path, about 20 times slower, for results in
    float16's subnormal range (|v| < 2**-14), where softmax outputs and gradients land all the
    time. Those are rounded here directly: a float16 subnormal is k * 2**-24, and
    k = rint(|v| * 2**24) rounds half to even, as the hardware conversion does."""
    if dst.dtype != np.float16:
        np.copyto(dst, buf, casting="unsafe")
        return
    views = _torch_views(dst, buf)
    if views is not None:
        views[0].copy_(views[1])
        return
    a = np.abs(buf)
    small = a < _F16_MIN_NORMAL
    if not small.any():
        np.copyto(dst, buf, casting="unsafe")
        return
    np.copyto(dst, np.where(small, np.float32(0.0), buf), casting="unsafe")
    with np.errstate(all="ignore"):  # k is garbage (and unused) where not small
        k = np.rint(a * np.float32(2.0**24)).astype(np.uint16)
    k |= np.signbit(buf).astype(np.uint16) << 15
    np.copyto(dst.view(np.uint16), k, where=small)


_local = threading.local()


def _tmp(slot: int, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """A scratch array for one block, from buffers kept per thread and reused across blocks and
    calls: a fresh 1 MiB allocation per block would be mapped and page-faulted every time."""
    bufs = _local.__dict__.setdefault("bufs", {})
    n = shape[0] * shape[1]
    b = bufs.get((slot, dtype))
    if b is None or b.size < n:
        b = bufs[(slot, dtype)] = np.empty(max(n, _BLOCK_ELEMS), dtype)
    return b[:n].reshape(shape)


def _scratch(dst: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Write straight into dst when it has the compute dtype, else into a block temporary."""
    return dst if dst.dtype == dtype else _tmp(0, dst.shape, dtype)


def _private(dst: np.ndarray, dtype: np.dtype, *inputs: np.ndarray) -> np.ndarray:
    """Like _scratch, but never memory an input of the block lives in: an ``out=`` that names an
    input (``softmax_backward(dy, y, out=y)``) must not be overwritten before it is read."""
    if dst.dtype == dtype and not any(np.may_share_memory(dst, a) for a in inputs):
        return dst
    return _tmp(0, dst.shape, dtype)


def _row_sum(a: np.ndarray, cdt: np.dtype) -> np.ndarray:
    """Row sums accumulated in float64 (float32 data too): a row whose terms nearly cancel
    (sum(dy) of a zero-mean dy) would otherwise keep an error of ~eps * sqrt(n) * |dy|, which
    exp(y) ~ 1 carries straight into dx, above the float32 bound from a few thousand columns."""
    return np.add.reduce(a, axis=1, dtype=np.float64, keepdims=True).astype(cdt, copy=False)


def _row_dot(a: np.ndarray, b: np.ndarray, cdt: np.dtype) -> np.ndarray:
    """dot(a_i, b_i) per row, accumulated in float64, without writing a * b out."""
    s = np.einsum("ij,ij->i", a, b, dtype=np.float64, casting="safe")
    return s[:, None].astype(cdt, copy=False)


def _jit():
    """The compiled CPU kernels (``_cpu_jit``: numba) when they can run here, else None: the
    pure NumPy code below runs (it is also the oracle the tests name, with
    SOFTMAX_KERNELS_CPU_JIT=0). Read at every call; numba is imported on the first one."""
    from . import _cpu_jit

    return _cpu_jit if _cpu_jit.usable() else None


def cpu_path() -> str:
    """Which CPU kernels run, and why (for ``python -m softmax_kernels info``)."""
    from . import _cpu_jit

    return _cpu_jit.status()


# ----------------------------------------------------------------------------------------------
# softmax / log_softmax forward


def softmax_fwd(x, out, *, scale: float, mask, is_log: bool) -> None:
    # y = exp(s*x - m) / sum(exp(s*x - m)), m = max(s*x); log: y = s*x - m - log(sum(...)).
    # Per block: reads x (and mask) once, writes y once; temporaries stay in cache.
    xn, mn, o = _np_in(x), _np_in(mask), _OutRows(out)
    jit = _jit()
    if jit is not None:
        jit.softmax_fwd(xn, o.np, scale=scale, mask=mn, is_log=is_log)
        o.finish()
        return
    on = o.np
    cdt = _compute_dtype(xn)
    n_rows, n_cols = xn.shape

    def work(r0, r1):
        with np.errstate(all="ignore"):
            dst = on[r0:r1]
            buf = _scratch(dst, cdt)
            xc = xn[r0:r1]
            keep = empty = None
            if mn is None and xc.dtype == cdt:
                # one pass fewer: m = max(s*x) is s*max(x) for s >= 0 and s*min(x) for s < 0,
                # exactly, since rounding is monotonic. NaN propagates: a NaN row stays NaN.
                ext = xc.max(axis=1, keepdims=True) if scale >= 0 else xc.min(axis=1, keepdims=True)
                m = ext * cdt.type(scale)
                if scale == 1.0:
                    np.subtract(xc, m, out=buf)
                else:
                    np.multiply(xc, scale, out=buf)
                    buf -= m
            else:
                _load(buf, xc)  # half input: widen first so the product rounds in float32
                if scale != 1.0:
                    buf *= scale
                if mn is not None:
                    keep = mn[r0:r1]
                    np.copyto(buf, -np.inf, where=~keep)  # masked entries take no part
                    empty = ~keep.any(axis=1)
                m = buf.max(axis=1, keepdims=True)
                if empty is not None:
                    m[empty] = 0.0  # fully masked rows: avoid -inf - -inf, fixed below
                buf -= m
            if is_log:
                e = np.exp(buf, out=_tmp(1, buf.shape, cdt))
                buf -= np.log(e.sum(axis=1, keepdims=True))
                fill = -np.inf
            else:
                np.exp(buf, out=buf)
                buf /= buf.sum(axis=1, keepdims=True)  # a division: exact to half an ulp
                fill = 0.0
            if keep is not None:
                # masked entries are 0 / -inf whatever the rest of the row holds (a NaN there
                # makes the kept entries NaN, not the masked ones), and so is a fully masked row
                np.copyto(buf, fill, where=~keep)
            if buf is not dst:
                _store(dst, buf)

    _for_row_blocks(n_rows, n_cols, work)
    o.finish()


# ----------------------------------------------------------------------------------------------
# softmax / log_softmax backward


def softmax_bwd(dy, y, out, *, scale: float, is_log: bool) -> None:
    # softmax:     dx = s * y * (dy - dot(dy, y))     reads 2 x n, writes n
    # log_softmax: dx = s * (dy - exp(y) * sum(dy))   reads 2 x n, writes n
    # The row sums are accumulated in float64 (see _row_sum). out may be dy's or y's memory.
    dyn, yn, o = _np_in(dy), _np_in(y), _OutRows(out)
    jit = _jit()
    if jit is not None:
        jit.softmax_bwd(dyn, yn, o.np, scale=scale, is_log=is_log)
        o.finish()
        return
    on = o.np
    cdt = _compute_dtype(yn)
    n_rows, n_cols = yn.shape

    def work(r0, r1):
        with np.errstate(all="ignore"):
            dst = on[r0:r1]
            d, yy = _widened(1, dyn[r0:r1], cdt), _widened(2, yn[r0:r1], cdt)
            buf = _private(dst, cdt, d, yy)
            if is_log:
                s = _row_sum(d, cdt)
                np.exp(yy, out=buf)
                buf *= s
                np.subtract(d, buf, out=buf)
            else:
                s = _row_dot(d, yy, cdt)
                np.subtract(d, s, out=buf)
                buf *= yy
            if scale != 1.0:
                buf *= scale
            if buf is not dst:
                _store(dst, buf)

    _for_row_blocks(n_rows, n_cols, work)
    o.finish()


# ----------------------------------------------------------------------------------------------
# cross-entropy: the maths of dispatch.py's docstring, here in NumPy. Every function works on
# blocks of rows; per-row results land in full-length arrays and are reduced at the end in one
# fixed order, so the result does not depend on the blocking or the threads.


def _softcapped(buf: np.ndarray, softcap, slot: int):
    """z = c tanh(x / c) in place (softcap = c), returning tanh(x / c) for the chain rule
    dz/dx = 1 - tanh^2 (None without a softcap)."""
    if softcap is None:
        return None
    t = _tmp(slot, buf.shape, buf.dtype)
    np.multiply(buf, 1.0 / softcap, out=t)
    np.tanh(t, out=t)
    np.multiply(t, softcap, out=buf)
    return t


def _chain(g: np.ndarray, t) -> None:
    """g *= 1 - t^2, the softcap's dz/dx (t = tanh(x / c))."""
    if t is not None:
        np.multiply(t, t, out=t)
        np.subtract(1.0, t, out=t)
        g *= t


def _class_targets(tn: np.ndarray, r0: int, r1: int, ignore_index: int, lo: int, n_cols: int):
    """(local target or 0, counted, owned-and-in-range, bad) for a block of class targets, with
    lo = vocab_start (the first class this array holds)."""
    t = tn[r0:r1].astype(np.int64, copy=False) - lo
    valid = tn[r0:r1] != ignore_index
    in_range = (t >= 0) & (t < n_cols)
    ts = np.where(in_range, t, 0)
    return ts, valid, in_range, valid & ~in_range


def _denominator(tn, wn, *, soft: bool, ignore_index: int, n_cols: int, cdt) -> tuple:
    """(denom, counted rows) of reduction "mean": the summed w_t of the counted rows (their
    count without a weight; the row count for soft targets). A bad target adds NaN."""
    n = tn.shape[0]
    if soft:
        return cdt.type(n), n
    ts, valid, in_range, bad = _class_targets(tn, 0, n, ignore_index, 0, n_cols)
    w_t = wn[ts] if wn is not None else np.ones(n, cdt)
    per_row = np.where(valid, np.where(in_range, w_t, np.nan), 0.0).astype(cdt, copy=False)
    return per_row.sum(dtype=cdt), int(valid.sum())


def cross_entropy_fwd(
    logits,
    target,
    *,
    loss,
    grad,
    lse,
    soft: bool,
    weight,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap,
    grad_scale: float,
    reduction: str,
    denom,
) -> None:
    # Reads the logits once (and the soft targets), writes the loss (and lse) and the gradient
    # once. Maths: dispatch.py's docstring; lse - z_c is computed as log_s - zs_c (no
    # cancellation), the target's 1 - p_t as -expm1(zs_t - log_s).
    xn, tn, wn = _np_in(logits), _np_in(target), _np_in(weight)
    lo, go = _OutRows(loss), (_OutRows(grad) if grad is not None else None)
    eo = _OutRows(lse) if lse is not None else None
    jit = _jit()
    if jit is not None:
        jit.cross_entropy_fwd(
            xn, tn, loss=lo.np, grad=go.np if go else None, lse=eo.np if eo else None,
            soft=soft, weight=wn, ignore_index=ignore_index, label_smoothing=label_smoothing,
            z_loss=z_loss, softcap=softcap, grad_scale=grad_scale, reduction=reduction,
            denom=None if denom is None else _np_in(denom),
        )  # fmt: skip
        for out in (lo, go, eo):
            if out is not None:
                out.finish()
        return
    gn = go.np if go is not None else None
    cdt = _compute_dtype(xn)
    n_rows, n_cols = xn.shape
    eps = float(label_smoothing)
    keep_c, eps_c = cdt.type(1.0 - eps), cdt.type(eps / n_cols)
    w_total = wn.sum(dtype=cdt) if wn is not None else cdt.type(n_cols)
    count = None
    if reduction == "mean":
        if denom is None:
            d, count = _denominator(tn, wn, soft=soft, ignore_index=ignore_index,
                                    n_cols=n_cols, cdt=cdt)  # fmt: skip
        else:
            d = np.asarray(_np_in(denom), cdt)[()]
        with np.errstate(divide="ignore", invalid="ignore"):
            row_scale = cdt.type(grad_scale) / d
    else:
        d, row_scale = None, cdt.type(grad_scale)
    row_loss = np.empty(n_rows, cdt)
    row_lse = eo.np if eo is not None else None

    def work(r0, r1):
        with np.errstate(all="ignore"):
            nr = r1 - r0
            buf = _tmp(0, (nr, n_cols), cdt)
            _load(buf, xn[r0:r1])
            th = _softcapped(buf, softcap, 3)
            m = buf.max(axis=1, keepdims=True)
            m[~np.isfinite(m) & (m < 0)] = 0.0  # an all -inf row: exp(-inf - 0) = 0, s = 0
            buf -= m  # zs = z - m
            e = np.exp(buf, out=_tmp(1, buf.shape, cdt))
            s = e.sum(axis=1, keepdims=True)
            log_s = np.log(s)  # lse - m, so lse - z_c = log_s - zs_c without cancellation
            lse_r = m[:, 0] + log_s[:, 0]
            if row_lse is not None:
                row_lse[r0:r1] = lse_r
            rows = np.arange(nr)
            if soft:
                q = _widened(2, tn[r0:r1], cdt)
                if eps:
                    q = q * keep_c + eps_c  # q' = (1-eps) q + eps/C
                wq = q * wn if wn is not None else q
                a = wq.sum(axis=1)
                rl = log_s[:, 0] * a - np.einsum("ij,ij->i", wq, buf)
                valid = bad = None
            else:
                ts, valid, in_range, bad = _class_targets(tn, r0, r1, ignore_index, 0, n_cols)
                wt = wn[ts] if wn is not None else np.ones(nr, cdt)
                kwt = keep_c * wt
                zs_t = buf[rows, ts]
                rl = kwt * (log_s[:, 0] - zs_t)
                a = kwt.copy()
                if eps:
                    dot_wz = buf @ wn if wn is not None else buf.sum(axis=1)
                    rl += eps_c * (w_total * log_s[:, 0] - dot_wz)
                    a += eps_c * w_total
            if z_loss:
                rl += z_loss * lse_r * lse_r
                a += cdt.type(2.0 * z_loss) * lse_r
            if valid is not None:
                rl = np.where(valid, rl, 0.0)
                rl[bad] = np.nan
            row_loss[r0:r1] = rl
            if gn is None:
                return
            e /= s  # p
            p_t = None if soft else e[rows, ts].copy()
            e *= a[:, None]
            if soft:
                e -= wq
            else:
                if eps:
                    e -= eps_c * (wn if wn is not None else 1.0)
                # the target entry from the shifted logit: (a - k w_t) p_t - k w_t (1 - p_t)
                q_t = -np.expm1(zs_t - log_s[:, 0])
                g_t = (a - kwt) * p_t - kwt * q_t
                if eps:
                    g_t -= eps_c * (wn[ts] if wn is not None else 1.0)
                e[rows, ts] = g_t
            e *= row_scale
            _chain(e, th)
            if valid is not None:
                e[~valid] = 0.0
                e[bad] = np.nan
            _store(gn[r0:r1], e)

    _for_row_blocks(n_rows, n_cols, work)
    with np.errstate(invalid="ignore", divide="ignore"):
        if reduction == "none":
            lo.np[...] = row_loss
        else:
            total = row_loss.sum(dtype=cdt)
            if reduction == "sum":
                lo.np[()] = total
            else:
                nothing = (count == 0) if count is not None else (d == 0)
                lo.np[()] = 0.0 if nothing else total / d
    lo.finish()
    if go is not None:
        go.finish()
    if eo is not None:
        eo.finish()


def cross_entropy_stats(
    logits,
    target,
    stats,
    *,
    soft: bool,
    weight,
    ignore_index: int,
    vocab_start: int,
    label_smoothing: float,
    softcap,
) -> None:
    # Per row, the local statistics one rank contributes to a vocabulary-parallel loss
    # (dispatch.py): [m, s, z_t, (w_t), (sum w z)] or soft [m, s, sum w q, sum w q z, (sum w z)].
    # Reads the logits (and soft targets) once.
    xn, tn, wn, so = _np_in(logits), _np_in(target), _np_in(weight), _OutRows(stats)
    jit = _jit()
    if jit is not None:
        jit.cross_entropy_stats(
            xn, tn, so.np, soft=soft, weight=wn, ignore_index=ignore_index,
            vocab_start=vocab_start, label_smoothing=label_smoothing, softcap=softcap,
        )  # fmt: skip
        so.finish()
        return
    sn = so.np
    cdt = _compute_dtype(xn)
    n_rows, n_cols = xn.shape
    smooth = float(label_smoothing) != 0.0

    def work(r0, r1):
        with np.errstate(all="ignore"):
            nr = r1 - r0
            buf = _tmp(0, (nr, n_cols), cdt)
            _load(buf, xn[r0:r1])
            _softcapped(buf, softcap, 3)
            m = buf.max(axis=1, keepdims=True)
            buf -= np.where(np.isneginf(m), 0.0, m)  # every sum relative to m (-inf: 0)
            e = np.exp(buf, out=_tmp(1, buf.shape, cdt))
            out = sn[r0:r1]
            out[:, 0] = m[:, 0]
            out[:, 1] = e.sum(axis=1)
            k = 2
            if soft:
                q = _widened(2, tn[r0:r1], cdt)
                wq = q * wn if wn is not None else q
                out[:, 2] = wq.sum(axis=1)
                out[:, 3] = np.einsum("ij,ij->i", wq, buf)
                k = 4
            else:
                ts, _valid, owned, _bad = _class_targets(tn, r0, r1, ignore_index, vocab_start,
                                                         n_cols)  # fmt: skip
                rows = np.arange(nr)
                out[:, 2] = np.where(owned, buf[rows, ts], 0.0)
                k = 3
                if wn is not None:
                    out[:, 3] = np.where(owned, wn[ts], 0.0)
                    k = 4
            if smooth:
                out[:, k] = buf @ wn if wn is not None else buf.sum(axis=1)

    _for_row_blocks(n_rows, n_cols, work)
    so.finish()


def cross_entropy_grad(
    logits,
    target,
    grad,
    *,
    row_lse,
    row_coef,
    row_scale,
    soft: bool,
    weight,
    ignore_index: int,
    vocab_start: int,
    keep: float,
    eps_c: float,
    softcap,
    grad_scale: float,
) -> None:
    # grad = (coef p - keep w_t onehot - eps_c w) * grad_scale * row_scale (soft: coef p -
    # w (keep q + eps_c)), p = exp(z - lse), times the softcap chain rule. Reads the logits
    # (and soft targets) once, writes the gradient once.
    xn, tn, wn, go = _np_in(logits), _np_in(target), _np_in(weight), _OutRows(grad)
    ln, cn = _np_in(row_lse), _np_in(row_coef)
    jit = _jit()
    if jit is not None:
        jit.cross_entropy_grad(
            xn, tn, go.np, row_lse=ln, row_coef=cn, row_scale=_np_in(row_scale), soft=soft,
            weight=wn, ignore_index=ignore_index, vocab_start=vocab_start, keep=keep,
            eps_c=_np_in(eps_c), softcap=softcap, grad_scale=grad_scale,
        )  # fmt: skip
        go.finish()
        return
    gn = go.np
    cdt = _compute_dtype(xn)
    n_rows, n_cols = xn.shape
    keep_c, eps_cc = cdt.type(keep), np.asarray(_np_in(eps_c), cdt)[()]
    scale = cdt.type(grad_scale) * np.asarray(_np_in(row_scale), cdt)[()]

    def work(r0, r1):
        with np.errstate(all="ignore"):
            nr = r1 - r0
            buf = _tmp(0, (nr, n_cols), cdt)
            _load(buf, xn[r0:r1])
            th = _softcapped(buf, softcap, 3)
            lse_r = ln[r0:r1].astype(cdt, copy=False)
            a = cn[r0:r1].astype(cdt, copy=False)
            buf -= lse_r[:, None]  # z - lse
            e = np.exp(buf, out=_tmp(1, buf.shape, cdt))  # p
            rows = np.arange(nr)
            if soft:
                q = _widened(2, tn[r0:r1], cdt)
                w = wn if wn is not None else 1.0
                e *= a[:, None]
                e -= (q * keep_c + eps_cc) * w
                valid = None
            else:
                ts, valid, owned, _bad = _class_targets(tn, r0, r1, ignore_index, vocab_start,
                                                        n_cols)  # fmt: skip
                wt = wn[ts] if wn is not None else np.ones(nr, cdt)
                kwt = keep_c * wt
                p_t = e[rows, ts].copy()
                q_t = -np.expm1(buf[rows, ts])
                e *= a[:, None]
                if eps_cc:
                    e -= eps_cc * (wn if wn is not None else 1.0)
                g_t = (a - kwt) * p_t - kwt * q_t
                if eps_cc:
                    g_t -= eps_cc * (wn[ts] if wn is not None else 1.0)
                e[rows, ts] = np.where(owned, g_t, e[rows, ts])
            e *= scale
            _chain(e, th)
            if valid is not None:
                e[~valid] = 0.0
            _store(gn[r0:r1], e)

    _for_row_blocks(n_rows, n_cols, work)
    go.finish()
