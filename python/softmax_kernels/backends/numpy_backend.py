"""The NumPy backend: the CPU fallback and the reference the GPU backends are tested against.

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
from concurrent.futures import ThreadPoolExecutor

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
_pool: ThreadPoolExecutor | None = None


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
    through .numpy()), or for a bfloat16 tensor a float32 buffer that finish() copies back,
    rounding with torch's conversion."""

    def __init__(self, out):
        self.out = out
        if isinstance(out, np.ndarray):
            self.np = out
        elif _arrays.dtype_name(out) in _WIDEN_WITH_TORCH:
            self.np = np.empty(tuple(out.shape), np.float32)
        else:
            self.np = out.detach().numpy()

    def finish(self):
        if self.np is not self.out and not isinstance(self.out, np.ndarray):
            import torch

            self.out.copy_(torch.from_numpy(self.np))


def _compute_dtype(a: np.ndarray) -> np.dtype:
    return np.dtype(np.float64 if a.dtype == np.float64 else np.float32)


def _for_row_blocks(n_rows: int, n_cols: int, work) -> None:
    """Call work(r0, r1) over blocks of rows, on the thread pool when the input is large."""
    global _pool
    rows = max(1, _BLOCK_ELEMS // max(n_cols, 1))
    blocks = [(r, min(r + rows, n_rows)) for r in range(0, n_rows, rows)]
    if _THREADS > 1 and len(blocks) > 1 and n_rows * n_cols >= _PARALLEL_MIN_ELEMS:
        if _pool is None:
            _pool = ThreadPoolExecutor(_THREADS, thread_name_prefix="softmax_kernels")
        for f in [_pool.submit(work, r0, r1) for r0, r1 in blocks]:
            f.result()
    else:
        for r0, r1 in blocks:
            work(r0, r1)


_F16_MIN_NORMAL = np.float32(2.0**-14)


def _torch_views(*arrays):
    """torch views of NumPy arrays when torch is already imported (never imported for this)
    and can view them (no negative strides), else None."""
    torch = sys.modules.get("torch")
    if torch is None or any(s < 0 for a in arrays for s in a.strides):
        return None
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


# ----------------------------------------------------------------------------------------------
# softmax / log_softmax forward


def softmax_fwd(x, out, *, scale: float, mask, is_log: bool) -> None:
    # y = exp(s*x - m) / sum(exp(s*x - m)), m = max(s*x); log: y = s*x - m - log(sum(...)).
    # Per block: reads x (and mask) once, writes y once; temporaries stay in cache.
    xn, mn, o = _np_in(x), _np_in(mask), _OutRows(out)
    on = o.np
    cdt = _compute_dtype(xn)
    n_rows, n_cols = xn.shape

    def work(r0, r1):
        with np.errstate(all="ignore"):
            dst = on[r0:r1]
            buf = _scratch(dst, cdt)
            xc = xn[r0:r1]
            empty = None
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
            if empty is not None and empty.any():
                buf[empty] = fill
            if buf is not dst:
                _store(dst, buf)

    _for_row_blocks(n_rows, n_cols, work)
    o.finish()


# ----------------------------------------------------------------------------------------------
# softmax / log_softmax backward


def softmax_bwd(dy, y, out, *, scale: float, is_log: bool) -> None:
    # softmax:     dx = s * y * (dy - dot(dy, y))     reads 2 x n, writes n
    # log_softmax: dx = s * (dy - exp(y) * sum(dy))   reads 2 x n, writes n
    dyn, yn, o = _np_in(dy), _np_in(y), _OutRows(out)
    on = o.np
    cdt = _compute_dtype(yn)
    n_rows, n_cols = yn.shape

    def work(r0, r1):
        with np.errstate(all="ignore"):
            dst = on[r0:r1]
            buf = _scratch(dst, cdt)
            d, yy = _widened(1, dyn[r0:r1], cdt), _widened(2, yn[r0:r1], cdt)
            if is_log:
                s = d.sum(axis=1, keepdims=True)
                np.exp(yy, out=buf)
                buf *= s
                np.subtract(d, buf, out=buf)
            else:
                # the row dot product without writing dy * y out (einsum fuses the two)
                s = np.einsum("ij,ij->i", d, yy)[:, None]
                np.subtract(d, s, out=buf)
                buf *= yy
            if scale != 1.0:
                buf *= scale
            if buf is not dst:
                _store(dst, buf)

    _for_row_blocks(n_rows, n_cols, work)
    o.finish()


# ----------------------------------------------------------------------------------------------
# cross-entropy forward (+ gradient)


def cross_entropy_fwd(
    logits,
    target,
    loss,
    grad,
    *,
    soft: bool,
    weight,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    grad_scale: float,
    denom,
) -> None:
    # With p = softmax(x), lse = logsumexp(x), eps = label_smoothing, w = weight (or ones):
    #   integer target t: loss = (1-eps) w_t (lse - x_t) + eps/C sum_c w_c (lse - x_c)
    #                     grad = [(1-eps) w_t + eps/C W] p - (1-eps) w_t onehot_t - eps/C w
    #   soft target q:    q' = (1-eps) q + eps/C,  loss = sum_c w_c q'_c (lse - x_c)
    #                     grad = sum(w q') p - w q'
    #   z-loss:           loss += z lse^2,  grad += 2 z lse p
    # then grad *= grad_scale (/ denom for mean). Ignored rows: loss 0, grad 0.
    # Reads the logits once (and the soft targets), writes the loss and the gradient once.
    xn, tn, wn, o = _np_in(logits), _np_in(target), _np_in(weight), _OutRows(loss)
    ln = o.np
    g = _OutRows(grad) if grad is not None else None
    gn = g.np if g is not None else None
    cdt = _compute_dtype(xn)
    n_rows, n_cols = xn.shape
    eps = float(label_smoothing)
    with np.errstate(divide="ignore", invalid="ignore"):  # denom 0: every row is ignored
        row_scale = grad_scale if denom is None else grad_scale / np.asarray(_np_in(denom), cdt)
    if wn is not None:
        w_total = wn.sum(dtype=cdt)
    else:
        w_total = cdt.type(n_cols)

    def work(r0, r1):
        with np.errstate(all="ignore"):
            buf = _tmp(0, (r1 - r0, n_cols), cdt)
            _load(buf, xn[r0:r1])
            m = buf.max(axis=1, keepdims=True)
            buf -= m  # xs = x - m
            e = np.exp(buf, out=_tmp(1, buf.shape, cdt))
            s = e.sum(axis=1, keepdims=True)
            log_s = np.log(s)  # lse - m, so lse - x_c = log_s - xs_c without cancellation
            lse = m[:, 0] + log_s[:, 0]
            rows = np.arange(r1 - r0)
            if soft:
                q = _widened(2, tn[r0:r1], cdt)
                if eps:
                    q = q * (1.0 - eps) + eps / n_cols
                wq = q * wn if wn is not None else q
                swq = wq.sum(axis=1)
                row_loss = log_s[:, 0] * swq - np.einsum("ij,ij->i", wq, buf)
                valid = None
            else:
                t = tn[r0:r1].astype(np.int64, copy=False)
                valid = t != ignore_index
                ts = np.where(valid, t, 0)
                wt = wn[ts] if wn is not None else np.ones(r1 - r0, cdt)
                row_loss = (1.0 - eps) * wt * (log_s[:, 0] - buf[rows, ts])
                if eps:
                    dot_wx = buf @ wn if wn is not None else buf.sum(axis=1)
                    row_loss += (eps / n_cols) * (w_total * log_s[:, 0] - dot_wx)
            if z_loss:
                row_loss += z_loss * lse * lse
            if valid is not None:
                row_loss = np.where(valid, row_loss, 0.0)
            ln[r0:r1] = row_loss
            if gn is None:
                return
            e /= s  # p
            if soft:
                a = swq
            else:
                a = (1.0 - eps) * wt + (eps / n_cols) * w_total
            if z_loss:
                a = a + 2.0 * z_loss * lse
            e *= a[:, None]
            if soft:
                e -= wq
            else:
                if eps:
                    e -= (eps / n_cols) * (wn if wn is not None else 1.0)
                e[rows, ts] -= (1.0 - eps) * wt
            e *= row_scale
            if valid is not None:
                e[~valid] = 0.0
            _store(gn[r0:r1], e)

    _for_row_blocks(n_rows, n_cols, work)
    o.finish()
    if g is not None:
        g.finish()
