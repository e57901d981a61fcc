"""Fused linear + cross-entropy: the loss of ``softmax(x @ W^T + b)`` and its gradients without
the ``(N, V)`` logits (CS231N's ``softmax_loss(W, X, y, reg)`` at LLM scale).

Rows go through in chunks. Per chunk (``r`` rows, ``V`` classes, ``D`` features):

    Z  = x[chunk] @ W^T + b          one GEMM into one reused (r, V) buffer (input dtype)
    loss, dZ = CE(Z)                 the backend's fused kernel, dZ written over Z in place
    dx[chunk] = dZ @ W               one GEMM straight into dx's rows
    dW += dZ^T @ x[chunk]            one GEMM accumulated in float32 for half inputs
    db += sum_rows(dZ)

so the extra memory is one chunk of logits plus, for half inputs, a float32 (V, D) accumulator
for dW (for float32/float64 the output itself accumulates), never O(N x V). The mean's
denominator (the summed weight of the counted rows) is computed once, on the device, before the
first chunk, so every chunk's gradient is final when written and nothing synchronises with the
host. The chunk's losses are added in chunk order: bitwise deterministic. The CE kernel computes
the target's gradient entry from the shifted logit (``-(1 - p_t)`` as ``expm1``), never as a
rounded ``p - 1``.

GEMMs: ``numpy.matmul`` (BLAS) on the CPU, ``torch.mm`` / ``cupy.matmul`` (cuBLAS) on GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import _arrays, _core
from .dispatch import select

# Rows per chunk. A chunk's logits take about as much memory as x itself (N x D values: r = N *
# D / V rows), the rule Liger-Kernel uses: the extra memory then never exceeds the input's, and
# per-chunk GEMMs stay large (r x D x V flops per launch). At least 256 rows (or N) on a GPU, so
# that a GEMM has enough rows to fill it; at least 1024 on the CPU, where BLAS needs tall
# operands (OpenBLAS on 2 cores, x (r, 256) @ W^T (256, 32000) float32: 69 GFLOP/s at 256 rows,
# 181 at 1024). At most what a quarter of the free device memory holds; at most the caller's
# chunk_size.
_MIN_CHUNK_ROWS = {"gpu": 256, "cpu": 1024}
_FREE_SHARE = 4


def plan_chunk(
    n_rows: int,
    vocab: int,
    dim: int,
    itemsize: int,
    *,
    cap: int | None = None,
    free_bytes=None,
    device: str = "gpu",
) -> int:
    """Rows per chunk (see the comment above for the rule); device "gpu" or "cpu"."""
    n_rows, vocab = max(1, int(n_rows)), max(1, int(vocab))
    rows = max(_MIN_CHUNK_ROWS[device], -(-n_rows * max(1, int(dim)) // vocab))
    if free_bytes is not None:
        rows = min(rows, max(1, int(free_bytes) // (_FREE_SHARE * vocab * max(itemsize, 4))))
    if cap is not None:
        rows = min(rows, cap)
    return max(1, min(rows, n_rows))


def _free_bytes(x) -> int | None:
    try:
        if _arrays.kind_of(x) == _arrays.TORCH and x.is_cuda:
            import torch

            return int(torch.cuda.mem_get_info(x.device)[0])
        if _arrays.kind_of(x) == _arrays.CUPY:
            import cupy

            return int(cupy.cuda.runtime.memGetInfo()[0])
    except Exception:
        return None
    return None


def _check_chunk_size(chunk_size) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return int(chunk_size)


class _Mat:
    """The GEMMs of one array kind, writing into preallocated outputs."""

    def __init__(self, ops):
        self.ops = ops
        if ops.kind == _arrays.TORCH:
            import torch

            self.torch = torch

    def mm(self, a, b, out):
        """out = a @ b (in out's dtype = the inputs')."""
        if self.ops.kind == _arrays.TORCH:
            self.torch.mm(a, b, out=out)
        else:
            self.ops.xp.matmul(a, b, out=out)

    def addmm_bias(self, bias, a, b, out):
        """out = bias + a @ b."""
        if self.ops.kind == _arrays.TORCH:
            self.torch.addmm(bias, a, b, out=out)
        else:
            self.ops.xp.matmul(a, b, out=out)
            out += bias

    def accumulate(self, acc, a, b):
        """acc += a @ b in acc's dtype (float32 for half inputs: cuBLAS with a float32 output
        where torch offers it, else the operands widened per chunk)."""
        if self.ops.kind == _arrays.TORCH:
            torch = self.torch
            if acc.dtype == a.dtype:
                acc.addmm_(a, b)
                return
            if a.is_cuda:
                try:
                    torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
                    return
                except (RuntimeError, TypeError, NotImplementedError):
                    pass
            acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
            return
        if acc.dtype == a.dtype:
            acc += a @ b
        else:
            acc += a.astype(acc.dtype) @ b.astype(acc.dtype)


def _transposed(w) -> bool:
    """True for a (V, D) view of a C-contiguous (D, V) array, CS231N's ``W.T``."""
    if w.ndim != 2 or w.shape[0] < 2 or w.shape[1] < 2:
        return False
    s = _arrays.strides_elems(w)
    return s[0] == 1 and s[1] == w.shape[0]


def dweight_like(w, dtype, ops, like):
    """An empty (V, D) array in ``dtype`` laid out like ``w``: C-contiguous, or the transposed
    view of a C-contiguous (D, V) array when ``w`` is one (``W.T`` in, ``dW.T`` out)."""
    v, d = int(w.shape[0]), int(w.shape[1])
    if _transposed(w):
        return ops.permute(ops.empty((d, v), dtype, like), (1, 0))
    return ops.empty((v, d), dtype, like)


@dataclass
class LinearProblem:
    """A linear cross-entropy call, checked and laid out: x as (N, D) rows, the targets."""

    x: Any  # the caller's x
    x2: Any  # (N, D) C-contiguous
    w: Any  # (V, D), any strides
    b: Any  # (V,) in x's dtype, or None
    tg: _core.CETargets
    lead: tuple[int, ...]
    vocab: int
    dim: int
    dn: str
    cdt: str
    ops: Any


def prepare(x, linear_weight, target, linear_bias, weight) -> LinearProblem:
    """The argument checks of every linear cross-entropy function (with their messages)."""
    x = _arrays.as_supported_array(x, "x")
    dn = _arrays.check_float(x, "x")
    if x.ndim < 1:
        raise ValueError("x must have at least one axis (the feature axis, last)")
    w = _core.same_place(linear_weight, x, "linear_weight")
    _arrays.check_float(w, "linear_weight")
    if _arrays.dtype_name(w) != dn:
        raise TypeError(
            f"linear_weight has dtype {_arrays.dtype_name(w)} but x has {dn}; they must match"
        )
    if w.ndim != 2 or int(w.shape[1]) != int(x.shape[-1]):
        raise ValueError(
            f"linear_weight has shape {tuple(w.shape)}, expected (V, {int(x.shape[-1])}) "
            "(torch.nn.Linear's (out_features, in_features); pass CS231N's (D, C) W as W.T)"
        )
    vocab, dim = int(w.shape[0]), int(w.shape[1])
    ops = _arrays.ops_for(x)
    b = None
    if linear_bias is not None:
        b = _core.same_place(linear_bias, x, "linear_bias")
        _arrays.check_float(b, "linear_bias")
        if tuple(b.shape) != (vocab,):
            raise ValueError(f"linear_bias has shape {tuple(b.shape)}, expected ({vocab},)")
        b = ops.astype(b, dn)
    lead = tuple(int(s) for s in x.shape[:-1])
    tg = _core.ce_targets(target, x, lead, vocab, weight, dn)
    if tg.n_rows > 0 and vocab == 0:
        raise ValueError("linear_cross_entropy needs at least one class (linear_weight is (0, D))")
    x2 = ops.contiguous(x.reshape((tg.n_rows, dim)))
    cdt = _arrays.compute_dtype_name(dn)
    return LinearProblem(x, x2, w, b, tg, lead, vocab, dim, dn, cdt, ops)


def chunk_rows(lp: LinearProblem, chunk_size) -> int:
    itemsize = {"float64": 8, "float32": 4}.get(lp.dn, 2)
    cap = _check_chunk_size(chunk_size)
    device = "gpu" if _arrays.is_cuda(lp.x2) else "cpu"
    return plan_chunk(lp.tg.n_rows, lp.vocab, lp.dim, itemsize, cap=cap,
                      free_bytes=_free_bytes(lp.x2), device=device)  # fmt: skip


def compute(
    x,
    linear_weight,
    target,
    *,
    linear_bias,
    weight,
    options: _core.CEOptions,
    chunk_size,
    backend,
    want_grad: bool,
    row_grad=None,
):
    """(loss, dx, dweight, dbias) for any array kind; dx/dweight/dbias None without want_grad
    (dbias None without a bias). ``row_grad`` (``reduction="none"`` only): gradients of
    ``sum_r row_grad_r * loss_r`` instead of ``grad_scale * sum(loss)``."""
    lp = prepare(x, linear_weight, target, linear_bias, weight)
    x, x2, w, b, lead, vocab, dim = lp.x, lp.x2, lp.w, lp.b, lp.lead, lp.vocab, lp.dim
    dn, cdt, ops = lp.dn, lp.cdt, lp.ops
    soft, weight, t2, n_rows = lp.tg.soft, lp.tg.weight, lp.tg.t2, lp.tg.n_rows
    mod = select(backend, x)
    o = options
    if not soft and mod.NAME == "numpy":
        _core.validate_target(t2, lp.tg.target, vocab, o.ignore_index, ops)
    reduced = o.reduction != "none"
    denom = None
    if o.reduction == "mean" and n_rows > 0:
        denom, _count = _core.mean_denominator(t2, weight, vocab, o.ignore_index, soft, ops, cdt, x)
    mat = _Mat(ops)
    chunk = chunk_rows(lp, chunk_size)
    acc_dt = cdt  # dW / db accumulate in float32 (float64 for float64)
    dx = dw = dw_acc = db = None
    if want_grad:
        dx = ops.empty((n_rows, dim), dn, x)
        dw = dweight_like(w, dn, ops, x)
        dw_acc = dw if acc_dt == dn else dweight_like(w, acc_dt, ops, x)
        if n_rows == 0 or vocab == 0:
            dw_acc = ops.zeros(tuple(dw.shape), acc_dt, x)
        else:
            _fill_zero(dw_acc, ops)
        if b is not None:
            db = ops.zeros((vocab,), acc_dt, x)
    loss_rows = ops.empty((n_rows,), cdt, x) if not reduced else None
    total = None
    buf = ops.empty((chunk, vocab), dn, x) if n_rows > 0 else None
    w_t = ops.permute(w, (1, 0))  # (D, V) view
    for r0 in range(0, n_rows, chunk):
        r1 = min(n_rows, r0 + chunk)
        xc, z = x2[r0:r1], buf[: r1 - r0]
        if b is None:
            mat.mm(xc, w_t, z)
        else:
            mat.addmm_bias(b, xc, w_t, z)
        loss_c = loss_rows[r0:r1] if not reduced else ops.empty((), cdt, x)
        mod.cross_entropy_fwd(
            z,
            t2[r0:r1],
            loss=loss_c,
            grad=z if want_grad else None,
            lse=None,
            soft=soft,
            weight=weight,
            ignore_index=o.ignore_index,
            label_smoothing=o.label_smoothing,
            z_loss=o.z_loss,
            softcap=o.softcap,
            grad_scale=1.0 if row_grad is not None else o.grad_scale,
            reduction=o.reduction,
            denom=denom,
        )
        if reduced:
            total = loss_c if total is None else total + loss_c
        if not want_grad:
            continue
        if row_grad is not None:
            z *= ops.astype(row_grad[r0:r1], dn)[:, None]
        mat.mm(z, w, dx[r0:r1])  # dx = dZ @ W
        if _transposed(w):  # dW^T (D, V) += x^T dZ
            mat.accumulate(ops.permute(dw_acc, (1, 0)), ops.permute(xc, (1, 0)), z)
        else:  # dW (V, D) += dZ^T x
            mat.accumulate(dw_acc, ops.permute(z, (1, 0)), xc)
        if db is not None:
            db += z.sum(axis=0) if ops.kind != _arrays.TORCH else z.sum(dim=0, dtype=db.dtype)
    if reduced:
        loss = total if total is not None else ops.zeros((), cdt, x)
        loss = loss[()] if ops.kind == _arrays.NUMPY else loss
    else:
        loss = loss_rows.reshape(lead)
    if not want_grad:
        return loss, None, None, None
    if dw_acc is not dw:
        _arrays.ops_for(dw).copy_into(dw, dw_acc)
    if db is not None:
        db = ops.astype(db, dn)
    return loss, dx.reshape(tuple(x.shape)), dw, db


def _fill_zero(a, ops):
    if ops.kind == _arrays.TORCH:
        a.zero_()
    else:
        a[...] = 0


def entry(x, linear_weight, target, *, want_grad, **kw):
    """sk.linear_cross_entropy[_with_grad] for NumPy and CuPy arrays."""
    options = _core.check_ce_options(
        ignore_index=kw.pop("ignore_index"),
        reduction=kw.pop("reduction"),
        label_smoothing=kw.pop("label_smoothing"),
        z_loss=kw.pop("z_loss"),
        softcap=kw.pop("softcap"),
        grad_scale=kw.pop("grad_scale", 1.0),
    )
    loss, dx, dw, db = compute(x, linear_weight, target, options=options, want_grad=want_grad, **kw)
    return (loss, dx, dw, db) if want_grad else loss
