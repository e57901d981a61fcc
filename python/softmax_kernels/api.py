"""The public functions. This layer checks arguments, picks the backend, and maps N-d inputs
onto the 2-D (n_rows, n_cols) rows the kernels see (moving the reduced axes last, broadcasting
the mask, restoring the shape afterwards), once, here. Backends only ever see rows.

torch tensors go through ``softmax_kernels.torch_ops`` (custom ops with autograd and
torch.compile support), which calls back into the ``*_impl`` functions below.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _arrays
from ._arrays import RowLayout, check_float, compute_dtype_name, ops_for
from .dispatch import select

__all__ = [
    "softmax",
    "log_softmax",
    "softmax_backward",
    "log_softmax_backward",
    "softmax_jacobian",
    "cross_entropy",
    "cross_entropy_with_grad",
]

_REDUCTIONS = ("none", "mean", "sum")


# ----------------------------------------------------------------------------------------------
# Argument checks shared by every function.


def _finite_float(value: Any, name: str) -> float:
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return f


def _same_place(a: Any, x: Any, name: str, xname: str = "x") -> Any:
    """Check that a (an array argument) is the same array kind and on the same device as x."""
    a = _arrays.as_supported_array(a, name)
    ka, kx = _arrays.kind_of(a), _arrays.kind_of(x)
    if ka != kx:
        raise TypeError(
            f"{name} is a {ka} array but {xname} is a {kx} array; pass arrays of one kind"
        )
    if _arrays.device_str(a) != _arrays.device_str(x):
        raise ValueError(
            f"{name} is on {_arrays.device_str(a)} but {xname} is on {_arrays.device_str(x)}"
        )
    return a


def _check_out(out: Any, x: Any, name: str = "out") -> Any:
    if out is None:
        return None
    out = _same_place(out, x, name)
    if tuple(out.shape) != tuple(x.shape):
        raise ValueError(f"{name} has shape {tuple(out.shape)}, expected {tuple(x.shape)}")
    if _arrays.dtype_name(out) != _arrays.dtype_name(x):
        raise TypeError(
            f"{name} has dtype {_arrays.dtype_name(out)}, expected {_arrays.dtype_name(x)}"
        )
    return out


def _prepare_mask(where: Any, x: Any, ops: _arrays.Ops) -> Any:
    if where is None:
        return None
    where = _same_place(where, x, "where")
    if _arrays.dtype_name(where) != "bool":
        raise TypeError(f"where must be a boolean array, got dtype {_arrays.dtype_name(where)}")
    try:
        return ops.broadcast_to(where, tuple(x.shape))
    except (ValueError, RuntimeError):
        raise ValueError(
            f"where of shape {tuple(where.shape)} does not broadcast to x's shape {tuple(x.shape)}"
        ) from None


class _Output:
    """The 2-D rows an op writes, and the N-d result handed back: either a view into the
    caller's ``out`` (no copy), or a fresh buffer, copied into ``out`` at the end when out's
    layout cannot be written as rows directly."""

    def __init__(self, layout: RowLayout, ops: _arrays.Ops, like: Any, out: Any = None):
        self.layout, self.ops, self.out = layout, ops, out
        rows = layout.rows_view(out, ops) if out is not None else None
        if (
            rows is not None
            and layout.n_rows > 1
            and _arrays.strides_elems(rows)[0] != layout.n_cols
        ):
            rows = None  # backends write C-contiguous rows
        self.direct = rows is not None
        self.rows = rows if self.direct else ops.empty(layout.rows_shape, like.dtype, like)

    def result(self) -> Any:
        if self.out is None:
            return self.layout.unrows(self.rows, self.ops)
        if not self.direct:
            self.layout.write_back(self.out, self.rows, self.ops)
        return self.out


# ----------------------------------------------------------------------------------------------
# softmax / log_softmax


def _softmax_impl(x, axis, scale, where, out, backend, is_log):
    x = _arrays.as_supported_array(x, "x")
    check_float(x, "x")
    ops = ops_for(x)
    scale = _finite_float(scale, "scale")
    axes = _arrays.normalize_axes(axis, x.ndim)
    mod = select(backend, x)
    mask = _prepare_mask(where, x, ops)
    out = _check_out(out, x)
    layout = RowLayout.for_axes(x.shape, axes)
    res = _Output(layout, ops, x, out)
    if layout.n_rows * layout.n_cols > 0:
        mod.softmax_fwd(
            layout.rows(x, ops),
            res.rows,
            scale=scale,
            mask=None if mask is None else layout.rows(mask, ops),
            is_log=is_log,
        )
    return res.result()


def _use_torch_ops(*arrays) -> bool:
    """True when the first array is a torch tensor: torch goes through the custom ops."""
    return _arrays.kind_of(arrays[0]) == _arrays.TORCH


def _softmax_entry(x, axis, scale, where, out, backend, is_log):
    """softmax / log_softmax: torch tensors through the custom ops (autograd, torch.compile),
    with ``out=`` through torch_ops.write_out (refused under autograd, as torch does)."""
    if not _use_torch_ops(x):
        return _softmax_impl(x, axis, scale, where, out, backend, is_log)
    from . import torch_ops

    if out is None:
        op = torch_ops.log_softmax if is_log else torch_ops.softmax
        return op(x, axis, scale=scale, where=where, backend=backend)
    return torch_ops.write_out(
        "log_softmax" if is_log else "softmax",
        out,
        (x,),
        lambda: _softmax_impl(x, axis, scale, where, out, backend, is_log),
    )


def softmax(x, axis=-1, *, scale=1.0, where=None, out=None, backend=None):
    """Softmax of ``scale * x`` over ``axis``: ``exp(scale*x - m) / sum(exp(scale*x - m))``.

    Args:
        x: float16/bfloat16/float32/float64 NumPy or CuPy array or torch tensor, any shape and
            strides.
        axis: int, tuple of ints (softmax over those axes jointly) or None (the whole array).
        scale: multiplies ``x`` first (inverse temperature), fused into the kernel.
        where: boolean array broadcastable to ``x``; False entries take no part and get 0. A
            row with no True entry gives all 0.
        out: array of ``x``'s shape and dtype to write into (may be ``x`` itself).
        backend: "numpy", "triton", "cupy" or None (fastest for the input).

    Returns the softmax, same kind, device, shape and dtype as ``x``.

    >>> import numpy as np, softmax_kernels as sk
    >>> sk.softmax(np.array([1.0, 2.0, 3.0])).round(4)
    array([0.09  , 0.2447, 0.6652])
    """
    return _softmax_entry(x, axis, scale, where, out, backend, is_log=False)


def log_softmax(x, axis=-1, *, scale=1.0, where=None, out=None, backend=None):
    """Log-softmax of ``scale * x`` over ``axis``: ``scale*x - m - log(sum(exp(scale*x - m)))``.

    Arguments as for :func:`softmax`; entries where ``where`` is False get ``-inf``, and a row
    with no True entry gives all ``-inf``.

    >>> import numpy as np, softmax_kernels as sk
    >>> sk.log_softmax(np.array([[0.0, 0.0]], np.float32))
    array([[-0.6931472, -0.6931472]], dtype=float32)
    """
    return _softmax_entry(x, axis, scale, where, out, backend, is_log=True)


# ----------------------------------------------------------------------------------------------
# backward passes


def _softmax_backward_impl(dy, y, axis, scale, out, backend, is_log):
    y = _arrays.as_supported_array(y, "y")
    check_float(y, "y")
    dy = _same_place(dy, y, "dy", "y")
    check_float(dy, "dy")
    if _arrays.dtype_name(dy) != _arrays.dtype_name(y):
        raise TypeError(
            f"dy has dtype {_arrays.dtype_name(dy)} but y has {_arrays.dtype_name(y)}; "
            "they must match"
        )
    if tuple(dy.shape) != tuple(y.shape):
        raise ValueError(f"dy has shape {tuple(dy.shape)} but y has {tuple(y.shape)}")
    ops = ops_for(y)
    scale = _finite_float(scale, "scale")
    axes = _arrays.normalize_axes(axis, y.ndim)
    mod = select(backend, y)
    out = _check_out(out, y)
    layout = RowLayout.for_axes(y.shape, axes)
    res = _Output(layout, ops, y, out)
    if layout.n_rows * layout.n_cols > 0:
        mod.softmax_bwd(
            layout.rows(dy, ops), layout.rows(y, ops), res.rows, scale=scale, is_log=is_log
        )
    return res.result()


def _softmax_backward_entry(dy, y, axis, scale, out, backend, is_log):
    """The backward passes, routed like :func:`_softmax_entry`."""
    if not _use_torch_ops(y):
        return _softmax_backward_impl(dy, y, axis, scale, out, backend, is_log)
    from . import torch_ops

    if out is None:
        op = torch_ops.log_softmax_backward if is_log else torch_ops.softmax_backward
        return op(dy, y, axis, scale=scale, backend=backend)
    return torch_ops.write_out(
        "log_softmax_backward" if is_log else "softmax_backward",
        out,
        (dy, y),
        lambda: _softmax_backward_impl(dy, y, axis, scale, out, backend, is_log),
    )


def softmax_backward(dy, y, axis=-1, *, scale=1.0, out=None, backend=None):
    """Vector-Jacobian product of softmax: ``dx = scale * y * (dy - sum(dy * y, axis))``.

    ``y`` is the softmax output, ``dy`` the gradient with respect to it; equals
    ``dy @ softmax_jacobian(y)`` (times ``scale``) without ever building the Jacobian.

    >>> import numpy as np, softmax_kernels as sk
    >>> y = sk.softmax(np.array([1.0, 2.0, 3.0]))
    >>> sk.softmax_backward(np.array([1.0, 0.0, 0.0]), y).round(4)
    array([ 0.0819, -0.022 , -0.0599])
    """
    return _softmax_backward_entry(dy, y, axis, scale, out, backend, is_log=False)


def log_softmax_backward(dy, y, axis=-1, *, scale=1.0, out=None, backend=None):
    """Vector-Jacobian product of log_softmax: ``dx = scale * (dy - exp(y) * sum(dy, axis))``,
    with ``y`` the log_softmax output.

    >>> import numpy as np, softmax_kernels as sk
    >>> y = sk.log_softmax(np.array([0.0, 0.0]))
    >>> sk.log_softmax_backward(np.array([1.0, 0.0]), y)
    array([ 0.5, -0.5])
    """
    return _softmax_backward_entry(dy, y, axis, scale, out, backend, is_log=True)


def softmax_jacobian(y, axis=-1):
    """The full Jacobian of softmax at output ``y``: ``J[..., i, j] = y_i * (delta_ij - y_j)``.

    The softmax axes (an int, a tuple flattened jointly, or None) become the last two axes, of
    size C each; the other axes lead in their order. For teaching and checking: the backward
    functions never build it.

    >>> import numpy as np, softmax_kernels as sk
    >>> sk.softmax_jacobian(np.array([0.5, 0.5]))
    array([[ 0.25, -0.25],
           [-0.25,  0.25]])
    """
    y = _arrays.as_supported_array(y, "y")
    dn = check_float(y, "y")
    ops = ops_for(y)
    axes = _arrays.normalize_axes(axis, y.ndim)
    layout = RowLayout.for_axes(y.shape, axes)
    lead = layout.permuted_shape[: y.ndim - len(axes)]
    c = layout.n_cols
    y2 = ops.astype(layout.rows(y, ops), compute_dtype_name(dn))
    if ops.kind == _arrays.TORCH:
        import torch

        eye = torch.eye(c, dtype=y2.dtype, device=y2.device)
    else:
        eye = ops.xp.eye(c, dtype=y2.dtype)
    jac = y2[:, :, None] * (eye[None] - y2[:, None, :])
    return ops.astype(jac, dn).reshape(lead + (c, c))


# ----------------------------------------------------------------------------------------------
# cross-entropy


def _check_target(target, logits, n_cols):
    target = _same_place(target, logits, "target", "logits")
    tn = _arrays.dtype_name(target)
    if tn in _arrays.FLOAT_NAMES:
        if tuple(target.shape) != tuple(logits.shape):
            raise ValueError(
                f"probability target has shape {tuple(target.shape)}, expected the logits' "
                f"shape {tuple(logits.shape)}"
            )
        return target, True
    if tn == "bool" or not (tn.startswith("int") or tn.startswith("uint")):
        raise TypeError(
            f"target has dtype {tn}; expected integer class indices or floating probabilities"
        )
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"class-index target has shape {tuple(target.shape)}, expected "
            f"{tuple(logits.shape[:-1])} (the logits' shape without the class axis)"
        )
    return target, False


def _validate_target(t_rows, target_shape, n_cols, ignore_index, ops):
    """Raise ValueError naming the first target that is neither in [0, C) nor ignore_index.
    Synchronises with the host on a GPU, which is why it runs only for validate=True there."""
    bad = (t_rows != ignore_index) & ((t_rows < 0) | (t_rows >= n_cols))
    if not bool(bad.any()):
        return
    first = int(ops.astype(bad, "int32").argmax())
    pos = tuple(int(i) for i in np.unravel_index(first, target_shape))
    value = int(t_rows[first])
    raise ValueError(
        f"target{list(pos)} = {value} is out of range: class indices must be in [0, {n_cols}) "
        f"or equal ignore_index ({ignore_index})"
    )


def _mean_denominator(t_rows, weight, n_cols, ignore_index, soft, ops, cdt, like):
    """(denominator, counted rows) of reduction='mean', as device arrays (no host sync).

    Integer targets: the sum of weight[target] over rows not ignored (their count without a
    weight), as torch does; an out-of-range target (unvalidated GPU call) contributes NaN, so
    the mean and its gradient are NaN instead of silently wrong. Soft targets: the row count."""
    if soft:
        n = ops.full((), float(t_rows.shape[0]), cdt, like)
        return n, n
    counted = t_rows != ignore_index
    in_range = (t_rows >= 0) & (t_rows < n_cols)
    if weight is not None:
        safe = ops.astype(t_rows, "int64")
        safe = safe * ops.astype(in_range, "int64")  # clamp bad indices to 0 before gathering
        w_t = weight[safe]
    else:
        w_t = ops.full(tuple(t_rows.shape), 1.0, cdt, like)
    nan = ops.full((), float("nan"), cdt, like)
    zero = ops.full((), 0.0, cdt, like)
    xp_where = _where_fn(ops)
    per_row = xp_where(counted, xp_where(in_range, w_t, nan), zero)
    return per_row.sum(), ops.astype(counted, cdt).sum()


def _where_fn(ops):
    if ops.kind == _arrays.TORCH:
        import torch

        return torch.where
    return ops.xp.where


def _cross_entropy_impl(
    logits,
    target,
    *,
    weight,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    validate,
    backend,
    want_grad,
    grad_scale=1.0,
    inplace=False,
):
    logits = _arrays.as_supported_array(logits, "logits")
    dn = check_float(logits, "logits")
    if logits.ndim < 1:
        raise ValueError("logits must have at least one axis (the class axis, last)")
    ops = ops_for(logits)
    cdt = compute_dtype_name(dn)
    n_cols = int(logits.shape[-1])
    target, soft = _check_target(target, logits, n_cols)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    eps = _finite_float(label_smoothing, "label_smoothing")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    z = _finite_float(z_loss, "z_loss")
    if z < 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss!r}")
    grad_scale = _finite_float(grad_scale, "grad_scale")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    ignore_index = int(ignore_index)
    if weight is not None:
        weight = _same_place(weight, logits, "weight", "logits")
        check_float(weight, "weight")
        if tuple(weight.shape) != (n_cols,):
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({n_cols},)")
        weight = ops.contiguous(ops.astype(weight, cdt))
    mod = select(backend, logits)

    layout = RowLayout.for_axes(logits.shape, (logits.ndim - 1,))
    n_rows = layout.n_rows
    if n_rows > 0 and n_cols == 0:
        raise ValueError("cross_entropy needs at least one class (logits.shape[-1] == 0)")
    x2 = layout.rows(logits, ops)
    if soft:
        t2 = layout.rows(ops.astype(target, dn), ops)
    else:
        t2 = ops.contiguous(target.reshape((n_rows,)))
        if _arrays.dtype_name(t2) not in ("int32", "int64"):
            t2 = ops.astype(t2, "int64")
        if validate or mod.NAME == "numpy":
            _validate_target(t2, tuple(target.shape), n_cols, ignore_index, ops)

    denom = count = None
    if reduction == "mean":
        denom, count = _mean_denominator(t2, weight, n_cols, ignore_index, soft, ops, cdt, logits)

    loss_rows = ops.empty((n_rows,), cdt, logits)
    grad = None
    if want_grad:
        grad = _Output(layout, ops, logits, logits if inplace else None)
    if n_rows > 0:
        mod.cross_entropy_fwd(
            x2,
            t2,
            loss_rows,
            grad.rows if grad is not None else None,
            soft=soft,
            weight=weight,
            ignore_index=ignore_index,
            label_smoothing=eps,
            z_loss=z,
            grad_scale=grad_scale,
            denom=denom,
        )

    if reduction == "none":
        loss = loss_rows.reshape(tuple(logits.shape[:-1]))
    else:
        total = loss_rows.sum()
        if reduction == "mean":
            # every target ignored: 0, not NaN (the contract's one difference from torch)
            with np.errstate(divide="ignore", invalid="ignore"):
                loss = _where_fn(ops)(count == 0, total * 0, total / denom)
        else:
            loss = total
    return loss, (grad.result() if grad is not None else None)


def cross_entropy(
    logits,
    target,
    *,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    validate=False,
    backend=None,
):
    """Cross-entropy of softmax(logits) against ``target``, as
    ``torch.nn.functional.cross_entropy`` on ``(-1, C)`` rows, plus ``z_loss * lse**2`` per
    counted row. The class axis is the last one.

    Args:
        logits: ``(..., C)`` float array or tensor.
        target: integer class indices of shape ``(...)`` (in ``[0, C)`` or ``ignore_index``),
            or float class probabilities of shape ``(..., C)``.
        weight: per-class weights, shape ``(C,)``.
        ignore_index: integer targets equal to it count for nothing.
        reduction: "mean" (divided by the summed weight of the counted rows; 0.0 when every
            target is ignored), "sum" or "none" (shape ``(...)``).
        label_smoothing: in [0, 1], mixes the target with the uniform distribution.
        z_loss: coefficient of the PaLM z-loss ``lse**2``.
        validate: check integer targets (and raise ValueError at the first bad one) on GPU
            backends too; that synchronises with the host. The NumPy backend always checks.
        backend: "numpy", "triton", "cupy" or None.

    Returns the loss: float32 (float64 for float64 logits), on the logits' device.

    >>> import numpy as np, softmax_kernels as sk
    >>> float(sk.cross_entropy(np.array([[0.0, 0.0]]), np.array([1])))  # log 2
    0.6931471805599453
    """
    if _use_torch_ops(logits):
        from . import torch_ops

        return torch_ops.cross_entropy(
            logits,
            target,
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            validate=validate,
            backend=backend,
        )
    loss, _ = _cross_entropy_impl(
        logits,
        target,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        validate=validate,
        backend=backend,
        want_grad=False,
    )
    return loss


def cross_entropy_with_grad(
    logits,
    target,
    *,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    validate=False,
    grad_scale=1.0,
    inplace=False,
    backend=None,
):
    """Cross-entropy and its gradient in one fused pass: returns ``(loss, dlogits)`` with
    ``dlogits = d(grad_scale * loss) / d logits`` (``softmax - onehot``, smoothed, weighted and
    scaled; under ``reduction="none"`` the gradient of ``grad_scale * loss.sum()``).

    Options as for :func:`cross_entropy`. With ``inplace=True`` the gradient overwrites the
    logits buffer, which is returned as ``dlogits`` (saves one logits-sized allocation).

    >>> import numpy as np, softmax_kernels as sk
    >>> loss, g = sk.cross_entropy_with_grad(np.array([[0.0, 0.0]]), np.array([1]))
    >>> g
    array([[ 0.5, -0.5]])
    """
    if _use_torch_ops(logits):
        from . import torch_ops

        return torch_ops.cross_entropy_with_grad(
            logits,
            target,
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            validate=validate,
            grad_scale=grad_scale,
            inplace=inplace,
            backend=backend,
        )
    return _cross_entropy_impl(
        logits,
        target,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        validate=validate,
        backend=backend,
        want_grad=True,
        grad_scale=grad_scale,
        inplace=inplace,
    )
