"""The NumPy backend's compiled fast path: the backend interface of ``dispatch.py`` (softmax_fwd,
softmax_bwd, cross_entropy_fwd, cross_entropy_stats, cross_entropy_grad) on numba kernels.

The caller (the NumPy backend) passes NumPy arrays only: 2-D row views with a non-negative row
stride and unit column stride, float16 / float32 / float64 (bfloat16 arrives as a float32 buffer
the caller prepared), preallocated outputs, validated targets (a class target outside ``[0, C)``
that is not ``ignore_index`` still never reads or writes out of bounds: that row is NaN, as in the
NumPy backend). Row blocks run on the NumPy backend's thread pool (``_for_row_blocks``); the
kernels release the GIL. Each row's result depends only on that row (fixed-lane sums, see
``_cpu_jit_kernels``), so results are bitwise the same for any blocking and thread count.

Costs: nothing at package import. numba is imported on the first call of :func:`usable` or an op
(~0.3-0.5 s); each (kernel, dtype) compiles on its first call, once per machine thanks to numba's
on-disk cache (``cache=True``; a warm process loads it in milliseconds), see NOTES-cpu.md.

Set ``SOFTMAX_KERNELS_CPU_JIT=0`` to switch the path off (``usable()`` is then False and the
NumPy backend keeps its pure NumPy code). :func:`status` says which path is active and why.
"""

from __future__ import annotations

import importlib.util
import os
import threading

import numpy as np

ENV_VAR = "SOFTMAX_KERNELS_CPU_JIT"
INSTALL_HINT = "pip install numba (or softmax-kernels[cpu])"

_kernels = None  # the _cpu_jit_kernels module once imported
_failure: str | None = None  # why importing it failed


def _disabled() -> str | None:
    v = os.environ.get(ENV_VAR)
    if v is not None and v.strip().lower() in ("0", "false", "no", "off"):
        return f"disabled by {ENV_VAR}={v}"
    return None


def _load():
    global _kernels, _failure
    if _kernels is None and _failure is None:
        if importlib.util.find_spec("numba") is None:
            _failure = f"numba is not installed ({INSTALL_HINT})"
        else:
            try:
                from . import _cpu_jit_kernels
            except Exception as e:  # noqa: BLE001 - any import problem means: not usable
                _failure = f"numba failed to import: {type(e).__name__}: {e}"
            else:
                _kernels = _cpu_jit_kernels
    return _kernels


def usable() -> bool:
    """True when the compiled path can run here (imports numba on the first call)."""
    return _disabled() is None and _load() is not None


def status() -> str:
    """'active: ...' or 'inactive: <why>' (numba missing or broken, switched off by the
    environment variable); imports numba to find out."""
    why = _disabled()
    if why is None and _load() is None:
        why = _failure
    if why is not None:
        return f"inactive: {why}; the pure NumPy kernels run"
    import numba

    return (
        f"active: numba {numba.__version__} kernels (compiled on first use per op and dtype, "
        f"cached on disk); {ENV_VAR}=0 switches them off"
    )


def _k():
    k = _load()
    if k is None:
        raise RuntimeError(f"the compiled CPU path is unavailable: {_failure}")
    return k


# ----------------------------------------------------------------------------------------------
# Arguments: raw addresses and element strides (see _cpu_jit_kernels).

_TAGS = {
    np.dtype(np.float16): np.uint16(0),  # numba has no float16: 16-bit lanes, widened in-kernel
    np.dtype(np.float32): np.float32(0),
    np.dtype(np.float64): np.float64(0),
}


def _tags(a: np.ndarray):
    """(storage tag, compute tag, compute dtype) of a float array."""
    try:
        tag = _TAGS[a.dtype]
    except KeyError:
        raise TypeError(f"the compiled CPU kernels take float16/32/64, not {a.dtype}") from None
    cdt = np.dtype(np.float64 if a.dtype == np.float64 else np.float32)
    return tag, cdt.type(0), cdt


def _acc_tag(a: np.ndarray):
    """The lanes softmax's row sums accumulate in: float64 (float32 / float64 data), float32 for
    float16 data (see softmax_bwd_kernel)."""
    return np.float32(0) if a.dtype == np.float16 else np.float64(0)


_local = threading.local()


def _scratch_row(n: int) -> np.ndarray:
    """A float32 row of >= n elements, kept per thread and reused across calls."""
    b = getattr(_local, "row", None)
    if b is None or b.size < n:
        b = _local.row = np.empty(max(n, 4096), np.float32)
    return b


def _rows(a: np.ndarray) -> np.ndarray:
    """a as rows the kernels can address: non-negative row stride, unit column stride (else a
    contiguous copy; the caller normally guarantees the layout)."""
    if a.ndim != 2:
        raise ValueError(f"expected rows (2-D), got shape {a.shape}")
    if (a.shape[1] > 1 and a.strides[1] != a.itemsize) or a.strides[0] < 0:
        return np.ascontiguousarray(a)
    return a


def _out(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2 and (a.shape[1] > 1 and a.strides[1] != a.itemsize or a.strides[0] < 0):
        raise ValueError("outputs must have unit column stride and a non-negative row stride")
    if not a.flags.writeable:
        raise ValueError("output is read-only")
    return a


def _rs(a: np.ndarray) -> int:
    """Row stride in elements (0 for a broadcast row)."""
    if a.shape[0] <= 1:
        return 0
    s, r = divmod(a.strides[0], a.itemsize)
    if r:
        raise ValueError("row stride is not a multiple of the item size")
    return s


def _addr(a) -> int:
    return 0 if a is None else a.ctypes.data


# Row blocks of the compiled kernels. Each costs ~1.5 us of Python (the block's claim and
# numba's dispatch); with dynamic scheduling the threads end within about half a block of each
# other. So about 16 blocks per thread (a core shared with another process, or with torch's
# spinning OpenMP workers, then costs a fraction of a block, not a thread's share), of 64K to
# 256K elements (~25-100 us of work): 1024 x 1000 float32 runs as 16 blocks, 4096 x 4096 as 64.
# One thread: blocks of 256K. The pool runs from 128K elements (below, a worker's wake-up costs
# about what it saves).
_MIN_BLOCK_ELEMS = 1 << 16
_MAX_BLOCK_ELEMS = 1 << 18
_PARALLEL_MIN_ELEMS = 1 << 17


def _blocks(n_rows: int, n_cols: int, work) -> None:
    from . import numpy_backend as nb  # at call time: numpy_backend imports us lazily

    threads = nb._THREADS
    be = _MAX_BLOCK_ELEMS
    if threads > 1:
        be = min(be, max(_MIN_BLOCK_ELEMS, n_rows * n_cols // (16 * threads)))
    nb._for_row_blocks(n_rows, n_cols, work, max(be, n_cols), _PARALLEL_MIN_ELEMS)


def _vec(a, n: int, cdt, what: str) -> np.ndarray:
    """A contiguous (n,) array in the compute dtype (weights, per-row statistics)."""
    a = np.ascontiguousarray(a, dtype=cdt)
    if a.shape != (n,):
        raise ValueError(f"{what}: expected shape ({n},), got {a.shape}")
    return a


def _vector_out(a: np.ndarray, n: int, cdt, what: str) -> np.ndarray:
    """A per-row output the kernels write by element offset: contiguous (n,) compute dtype."""
    a = _out(a)
    if a.shape != (n,) or a.dtype != cdt or (n > 1 and a.strides[0] != cdt.itemsize):
        raise ValueError(f"{what} must be a contiguous ({n},) {cdt} array")
    return a


def _scalar(a, cdt):
    """A 0-d array / number as a Python float after rounding to the compute dtype."""
    return float(np.asarray(a, dtype=cdt)[()])


# ----------------------------------------------------------------------------------------------
# softmax / log_softmax


def softmax_fwd(x, out, *, scale, mask, is_log) -> None:
    # y = exp(s x - m) / sum(exp(s x - m)) or log_softmax; reads x (and mask) once from memory,
    # writes y once (the row's later passes hit L1/L2).
    x, out = _rows(x), _out(out)
    n_rows, n = x.shape
    if x.size == 0:
        return
    xt, ct, _cdt = _tags(x)
    if out.dtype != x.dtype:
        raise TypeError(f"out is {out.dtype}, x is {x.dtype}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"mask must be bool, not {mask.dtype}")
        if mask.shape != x.shape:
            mask = np.broadcast_to(mask, x.shape)
        mask = _rows(mask)
    k = _k()
    xa, xrs, oa, ors = _addr(x), _rs(x), _addr(out), _rs(out)
    ma, mrs = _addr(mask), (_rs(mask) if mask is not None else 0)
    at = _acc_tag(x)
    has_mask = mask is not None
    scale = float(scale)
    is_log = bool(is_log)
    half = x.dtype == np.float16

    def work(r0, r1):
        # softmax keeps e = exp(s x - m) between its passes: in out, or for float16 out in a
        # float32 scratch row of this thread's (one row, reused: row stride 0)
        if half and not is_log:
            et, ea, ers = ct, _addr(_scratch_row(n)), 0
        else:
            et, ea, ers = xt, oa, ors
        k.softmax_fwd_kernel(xt, ct, at, et, xa, xrs, oa, ors, ea, ers, ma, mrs, has_mask, scale,
                             is_log, n, r0, r1)  # fmt: skip

    _blocks(n_rows, n, work)


def softmax_bwd(dy, y, out, *, scale, is_log) -> None:
    # softmax: dx = s y (dy - dot(dy, y)); log_softmax: dx = s (dy - exp(y) sum(dy)).
    # Reads dy and y once, writes dx once; out may be dy's or y's memory.
    dy, y, out = _rows(dy), _rows(y), _out(out)
    n_rows, n = y.shape
    if y.size == 0:
        return
    xt, ct, _cdt = _tags(y)
    if dy.dtype != y.dtype or out.dtype != y.dtype:
        raise TypeError(f"dtypes differ: dy {dy.dtype}, y {y.dtype}, out {out.dtype}")
    k = _k()
    da, drs, ya, yrs, oa, ors = _addr(dy), _rs(dy), _addr(y), _rs(y), _addr(out), _rs(out)
    at = _acc_tag(y)
    scale = float(scale)
    is_log = bool(is_log)

    def work(r0, r1):
        k.softmax_bwd_kernel(xt, ct, at, da, drs, ya, yrs, oa, ors, scale, is_log, n, r0, r1)

    _blocks(n_rows, n, work)


# ----------------------------------------------------------------------------------------------
# cross-entropy


def _ce_inputs(logits, target, weight, soft):
    x = _rows(logits)
    n_rows, n = x.shape
    xt, ct, cdt = _tags(x)
    if soft:
        q = _rows(np.asarray(target))
        if q.shape != x.shape:
            raise ValueError(f"soft targets {q.shape} for logits {x.shape}")
        if q.dtype != x.dtype:
            q = q.astype(x.dtype)
        tg = None
    else:
        q = None
        tg = np.ascontiguousarray(target, dtype=np.int64)  # n_rows x 8 bytes
        if tg.shape != (n_rows,):
            raise ValueError(f"class targets {tg.shape} for {n_rows} rows")
    w = _vec(weight, n, cdt, "weight") if weight is not None else None
    return x, q, tg, w, xt, ct, cdt


def _int64(v: int) -> int:
    """ignore_index as the kernels compare it: an int64 that no int64 target equals when v
    lies outside int64 (then no target is ignored)."""
    v = int(v)
    return v if -(2**63) <= v < 2**63 else -(2**63)


def cross_entropy_fwd(
    logits,
    target,
    *,
    loss,
    grad,
    lse,
    soft,
    weight,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    grad_scale,
    reduction,
    denom,
) -> None:
    # Reads the logits once from memory (and the soft targets), writes the loss, lse and the
    # gradient once. Per-row losses land in one array and are reduced at the end in one fixed
    # order (NumPy's pairwise sum), as the NumPy backend does.
    x, q, tg, w, xt, ct, cdt = _ce_inputs(logits, target, weight, soft)
    n_rows, n = x.shape
    if n_rows > 0 and n == 0:
        raise ValueError("cross_entropy needs at least one class (the class axis has size 0)")
    if grad is not None:
        grad = _out(grad)
        if grad.shape != x.shape or grad.dtype != x.dtype:
            raise ValueError(f"grad {grad.shape} {grad.dtype} for logits {x.shape} {x.dtype}")
    eps = float(label_smoothing)
    keep, eps_c = _scalar(1.0 - eps, cdt), _scalar(eps / max(n, 1), cdt)
    w_total = _scalar(w.sum(dtype=cdt), cdt) if w is not None else float(n)
    count = None
    if reduction == "mean":
        if denom is None and not soft and w is None:
            # the count of rows not ignored, NaN when a target is out of range: 5 NumPy calls
            # on the targets where _denominator's weighted sum takes ~15 (~15 us at 1024 rows)
            valid = tg != _int64(ignore_index)
            count = int(np.count_nonzero(valid))
            bad = np.count_nonzero(valid & ((tg < 0) | (tg >= n)))
            d = cdt.type(np.nan) if bad else cdt.type(count)
        elif denom is None:
            from .numpy_backend import _denominator

            d, count = _denominator(tg if not soft else q, w, soft=soft,
                                    ignore_index=ignore_index, n_cols=n, cdt=cdt)  # fmt: skip
            d = cdt.type(d)
        else:
            d = np.asarray(denom, cdt)[()]
        with np.errstate(divide="ignore", invalid="ignore"):
            row_scale = cdt.type(grad_scale) / d
    elif reduction in ("sum", "none"):
        d, row_scale = None, cdt.type(grad_scale)
    else:
        raise ValueError(f"unknown reduction {reduction!r}")
    if reduction == "none":
        row_loss = _vector_out(loss, n_rows, cdt, "loss")
    else:
        row_loss = np.empty(n_rows, cdt)
    if lse is not None:
        lse = _vector_out(lse, n_rows, cdt, "lse")
    if n_rows > 0:
        k = _k()
        xa, xrs = _addr(x), _rs(x)
        qa, qrs = (_addr(q), _rs(q)) if soft else (0, 0)
        ta, wa = _addr(tg), _addr(w)
        la, ea, ga = _addr(row_loss), _addr(lse), _addr(grad)
        grs = _rs(grad) if grad is not None else 0
        args = dict(
            soft=bool(soft), has_w=w is not None, w_total=w_total,
            ignore_index=_int64(ignore_index), keep=keep, eps_c=eps_c, z_loss=float(z_loss),
            has_cap=softcap is not None, cap=float(softcap) if softcap is not None else 1.0,
            has_lse=lse is not None, has_grad=grad is not None, gscale=float(row_scale),
        )  # fmt: skip
        a = args

        def work(r0, r1):
            k.ce_fwd_kernel(xt, ct, xa, xrs, ta, a["soft"], qa, qrs, wa, a["has_w"],
                            a["w_total"], a["ignore_index"], a["keep"], a["eps_c"],
                            a["z_loss"], a["has_cap"], a["cap"], la, ea, a["has_lse"], ga, grs,
                            a["has_grad"], a["gscale"], n, r0, r1)  # fmt: skip

        _blocks(n_rows, n, work)
    if reduction == "none":
        return
    with np.errstate(invalid="ignore", divide="ignore"):
        total = row_loss.sum(dtype=cdt)
        if reduction == "sum":
            loss[()] = total
        else:
            nothing = (count == 0) if count is not None else (d == 0)
            loss[()] = 0.0 if nothing else total / d


def _n_stats(soft: bool, has_weight: bool, smooth: bool) -> int:
    return (4 if soft or has_weight else 3) + (1 if smooth else 0)


def cross_entropy_stats(
    logits,
    target,
    stats,
    *,
    soft,
    weight,
    ignore_index,
    vocab_start,
    label_smoothing,
    softcap,
) -> None:
    # Per row: class [m, s, zs_t, (w_t), (sum w zs)], soft [m, s, sum w q, sum w q zs,
    # (sum w zs)] with zs = z - m (dispatch.py). Reads the logits (and soft targets) once.
    x, q, tg, w, xt, ct, cdt = _ce_inputs(logits, target, weight, soft)
    n_rows, n = x.shape
    smooth = float(label_smoothing) != 0.0
    kk = _n_stats(soft, w is not None, smooth)
    stats = _out(stats)
    if stats.shape != (n_rows, kk) or stats.dtype != cdt or not stats.flags.c_contiguous:
        raise ValueError(f"stats must be a C-contiguous ({n_rows}, {kk}) {cdt} array")
    if x.size == 0:
        return
    k = _k()
    xa, xrs = _addr(x), _rs(x)
    qa, qrs = (_addr(q), _rs(q)) if soft else (0, 0)
    ta, wa, sa = _addr(tg), _addr(w), _addr(stats)
    soft, has_w, has_cap = bool(soft), w is not None, softcap is not None
    cap = float(softcap) if has_cap else 1.0
    vs = int(vocab_start)

    def work(r0, r1):
        k.ce_stats_kernel(xt, ct, xa, xrs, ta, soft, qa, qrs, wa, has_w, smooth, vs, has_cap,
                          cap, sa, kk, n, r0, r1)  # fmt: skip

    _blocks(n_rows, n, work)


def cross_entropy_grad(
    logits,
    target,
    grad,
    *,
    row_lse,
    row_coef,
    row_scale,
    soft,
    weight,
    ignore_index,
    vocab_start,
    keep,
    eps_c,
    softcap,
    grad_scale,
) -> None:
    # grad = (coef p - keep w_t onehot - eps_c w) * grad_scale * row_scale (soft: coef p -
    # w (keep q + eps_c)), p = exp(z - lse), times the softcap's chain rule. Reads the logits
    # (and soft targets) once, writes the gradient once; grad may be the logits' memory.
    x, q, tg, w, xt, ct, cdt = _ce_inputs(logits, target, weight, soft)
    n_rows, n = x.shape
    grad = _out(grad)
    if grad.shape != x.shape or grad.dtype != x.dtype:
        raise ValueError(f"grad {grad.shape} {grad.dtype} for logits {x.shape} {x.dtype}")
    if x.size == 0:
        return
    lse = _vec(row_lse, n_rows, cdt, "row_lse")
    coef = _vec(row_coef, n_rows, cdt, "row_coef")
    scale = float(cdt.type(grad_scale) * np.asarray(row_scale, cdt)[()])
    k = _k()
    xa, xrs = _addr(x), _rs(x)
    qa, qrs = (_addr(q), _rs(q)) if soft else (0, 0)
    ta, wa, la, ca, ga, grs = _addr(tg), _addr(w), _addr(lse), _addr(coef), _addr(grad), _rs(grad)
    soft, has_w, has_cap = bool(soft), w is not None, softcap is not None
    cap = float(softcap) if has_cap else 1.0
    keep_c, eps_cc = _scalar(keep, cdt), _scalar(eps_c, cdt)
    ii, vs = _int64(ignore_index), int(vocab_start)

    def work(r0, r1):
        k.ce_grad_kernel(xt, ct, xa, xrs, ta, soft, qa, qrs, wa, has_w, ii, vs, keep_c, eps_cc,
                         has_cap, cap, la, ca, scale, ga, grs, n, r0, r1)  # fmt: skip

    _blocks(n_rows, n, work)


__all__ = [
    "ENV_VAR",
    "cross_entropy_fwd",
    "cross_entropy_grad",
    "cross_entropy_stats",
    "softmax_bwd",
    "softmax_fwd",
    "status",
    "usable",
]
