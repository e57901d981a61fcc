"""The array-generic implementation behind every public function: argument checks, the backend
choice, and the mapping of N-d inputs onto the 2-D ``(n_rows, n_cols)`` rows the kernels see
(the reduced axes moved last, masks broadcast, shapes restored afterwards), once, here.

Layers point one way: ``api`` (the public front door) -> ``torch_ops`` (torch.library custom
ops, autograd) -> this module -> ``backends`` -> kernels. Nothing here imports torch_ops or api;
torch enters only through ``_arrays`` (and only when the caller passed torch tensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _arrays
from ._arrays import RowLayout, check_float, compute_dtype_name, ops_for
from .dispatch import select

REDUCTIONS = ("none", "mean", "sum")


# ----------------------------------------------------------------------------------------------
# Argument checks shared by every function.


def finite_float(value: Any, name: str) -> float:
    """``value`` as a finite float; TypeError for a non-number, ValueError when not finite
    (also for a Python int too large for a float, e.g. 10**400)."""
    if type(value) in (float, int) and abs(value) < 1e308:
        # the common case without math.isfinite, which torch.compile(dynamic=True) cannot
        # trace (torch 2.13); float() of a float constant would become a symbolic float there
        f = value if type(value) is float else float(value)
        if f - f == 0.0:  # inf - inf and nan - nan are nan
            return f
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        f = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got an integer too large for a float") from None
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return f


def same_place(a: Any, x: Any, name: str, xname: str = "x", *, native: bool = True) -> Any:
    """Check that a (an array argument) is the same array kind and on the same device as x."""
    a = _arrays.as_supported_array(a, name, native=native)
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


def check_out(out: Any, x: Any, name: str = "out") -> Any:
    if out is None:
        return None
    out = same_place(out, x, name, native=False)  # written in place, whatever its byte order
    if tuple(out.shape) != tuple(x.shape):
        raise ValueError(f"{name} has shape {tuple(out.shape)}, expected {tuple(x.shape)}")
    if _arrays.dtype_name(out) != _arrays.dtype_name(x):
        raise TypeError(
            f"{name} has dtype {_arrays.dtype_name(out)}, expected {_arrays.dtype_name(x)}"
        )
    return out


def prepare_mask(where: Any, x: Any, ops: _arrays.Ops) -> Any:
    """``where`` checked (bool, same kind and device) and broadcast to ``x``'s shape with
    NumPy's rules for every array kind (a mask with more dimensions than x is refused)."""
    if where is None:
        return None
    where = same_place(where, x, "where")
    if _arrays.dtype_name(where) != "bool":
        raise TypeError(f"where must be a boolean array, got dtype {_arrays.dtype_name(where)}")
    try:
        return ops.broadcast_to(where, tuple(x.shape))
    except (ValueError, RuntimeError):
        raise ValueError(
            f"where of shape {tuple(where.shape)} does not broadcast to x's shape {tuple(x.shape)}"
        ) from None


def int_arg(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


class Output:
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
# softmax / log_softmax and their backward passes


def softmax(x, axis, scale, where, out, backend, is_log):
    """sk.softmax / sk.log_softmax for any array kind (torch: called inside the custom op)."""
    x = _arrays.as_supported_array(x, "x")
    check_float(x, "x")
    ops = ops_for(x)
    scale = finite_float(scale, "scale")
    axes = _arrays.normalize_axes(axis, x.ndim)
    mod = select(backend, x)
    mask = prepare_mask(where, x, ops)
    out = check_out(out, x)
    layout = RowLayout.for_axes(x.shape, axes)
    res = Output(layout, ops, x, out)
    if layout.n_rows * layout.n_cols > 0:
        mod.softmax_fwd(
            layout.rows(x, ops),
            res.rows,
            scale=scale,
            mask=None if mask is None else layout.rows(mask, ops),
            is_log=is_log,
        )
    return res.result()


def check_backward_inputs(dy, y):
    y = _arrays.as_supported_array(y, "y")
    check_float(y, "y")
    dy = same_place(dy, y, "dy", "y")
    check_float(dy, "dy")
    if _arrays.dtype_name(dy) != _arrays.dtype_name(y):
        raise TypeError(
            f"dy has dtype {_arrays.dtype_name(dy)} but y has {_arrays.dtype_name(y)}; "
            "they must match"
        )
    if tuple(dy.shape) != tuple(y.shape):
        raise ValueError(f"dy has shape {tuple(dy.shape)} but y has {tuple(y.shape)}")
    return dy, y


def softmax_backward(dy, y, axis, scale, out, backend, is_log):
    """sk.softmax_backward / sk.log_softmax_backward for any array kind. ``out`` may be ``dy``
    or ``y`` itself."""
    dy, y = check_backward_inputs(dy, y)
    ops = ops_for(y)
    scale = finite_float(scale, "scale")
    axes = _arrays.normalize_axes(axis, y.ndim)
    mod = select(backend, y)
    out = check_out(out, y)
    layout = RowLayout.for_axes(y.shape, axes)
    res = Output(layout, ops, y, out)
    if layout.n_rows * layout.n_cols > 0:
        mod.softmax_bwd(
            layout.rows(dy, ops), layout.rows(y, ops), res.rows, scale=scale, is_log=is_log
        )
    return res.result()


def softmax_jacobian(y, axis):
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
# cross-entropy: options


@dataclass(frozen=True)
class CEOptions:
    """The cross-entropy options after their checks (the same for every array kind)."""

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    grad_scale: float = 1.0


def check_ce_options(
    *, ignore_index, reduction, label_smoothing, z_loss, softcap=None, grad_scale=1.0
) -> CEOptions:
    """The data-independent checks of every cross-entropy function, with their messages."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    eps = finite_float(label_smoothing, "label_smoothing")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    z = finite_float(z_loss, "z_loss")
    if z < 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss!r}")
    cap = None
    if softcap is not None:
        cap = finite_float(softcap, "softcap")
        if cap <= 0.0:
            raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    gs = finite_float(grad_scale, "grad_scale")
    return CEOptions(int_arg(ignore_index, "ignore_index"), reduction, eps, z, cap, gs)


def class_axis(logits, axis) -> int:
    """The class axis as a non-negative int (cross-entropy takes exactly one)."""
    if axis is None or isinstance(axis, (tuple, list)):
        raise TypeError(f"axis must be an int (the class axis of logits), got {axis!r}")
    return _arrays.normalize_axes(axis, logits.ndim)[0]


def _shape_without(shape, ax):
    return tuple(shape[:ax]) + tuple(shape[ax + 1 :])


def target_is_soft(target) -> bool:
    """True for probability targets (a float dtype), False for class indices (an integer
    dtype); TypeError for anything else."""
    tn = _arrays.dtype_name(target)
    if tn in _arrays.FLOAT_NAMES:
        return True
    if tn == "bool" or not (tn.startswith("int") or tn.startswith("uint")):
        raise TypeError(
            f"target has dtype {tn}; expected integer class indices or floating probabilities"
        )
    return False


def check_target(target, logits, ax: int = -1):
    """(target, soft): class indices of the logits' shape without the class axis, or float
    probabilities of the logits' shape."""
    target = same_place(target, logits, "target", "logits")
    ax = ax % logits.ndim
    shape, tshape = tuple(logits.shape), tuple(target.shape)
    if target_is_soft(target):
        if tshape != shape:
            raise ValueError(
                f"probability target has shape {tshape}, expected the logits' shape {shape}"
            )
        return target, True
    want = _shape_without(shape, ax)
    if tshape != want:
        hint = ""
        if ax == logits.ndim - 1 and logits.ndim >= 3 and tshape == _shape_without(shape, 1):
            hint = (
                "; it fits logits whose class axis is 1, as in torch's (N, C, d1, ...) layout: "
                "pass axis=1"
            )
        raise ValueError(
            f"class-index target has shape {tshape}, expected {want} (the logits' shape "
            f"without the class axis {ax}){hint}"
        )
    return target, False


def check_weight(weight, logits, n_cols: int):
    if weight is None:
        return None
    weight = same_place(weight, logits, "weight", "logits")
    check_float(weight, "weight")
    if tuple(weight.shape) != (n_cols,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({n_cols},)")
    return weight


def class_targets(t, n_rows: int, ops):
    """Integer targets as the kernels take them: (n_rows,) contiguous int32 or int64. Unsigned
    values of 2**63 and more, which an int64 cast would wrap around (2**64 - 100 onto -100, the
    default ignore_index), become the largest int64: out of range of any class axis, so the row
    is reported (validation) or NaN (GPU), never silently ignored."""
    t2 = ops.contiguous(t.reshape((n_rows,)))
    dn = _arrays.dtype_name(t2)
    if dn in ("int32", "int64"):
        return t2
    if dn == "uint64":
        if ops.kind == _arrays.TORCH:
            import torch

            v = t2.view(torch.int64)  # >= 2**63 shows up as negative
            return torch.where(v < 0, torch.full_like(v, 2**63 - 1), v)
        v = t2.view(ops.dtype("int64"))
        return ops.xp.where(v < 0, ops.xp.int64(2**63 - 1), v)
    return ops.astype(t2, "int64")


def _value_at(target, first: int) -> int:
    """The target value the caller passed, at flat position first (uint64 read as unsigned)."""
    flat = target.reshape((-1,))
    if _arrays.dtype_name(target) == "uint64" and _arrays.kind_of(target) == _arrays.TORCH:
        import torch

        iv = int(flat.view(torch.int64)[first])  # torch cannot read a uint64 >= 2**63 as int
        return iv + 2**64 if iv < 0 else iv
    return int(flat[first])


def validate_target(t_rows, target, n_cols, ignore_index, ops):
    """Raise ValueError naming the first target that is neither in [0, C) nor ignore_index,
    with the value as passed. Synchronises with the host on a GPU, which is why it runs only
    for validate=True there."""
    bad = (t_rows != ignore_index) & ((t_rows < 0) | (t_rows >= n_cols))
    if not bool(bad.any()):
        return
    first = int(ops.astype(bad, "int32").argmax())
    pos = tuple(int(i) for i in np.unravel_index(first, tuple(target.shape)))
    raise ValueError(
        f"target{list(pos)} = {_value_at(target, first)} is out of range: class indices must "
        f"be in [0, {n_cols}) or equal ignore_index ({ignore_index})"
    )


def mean_denominator(t_rows, weight, n_cols, ignore_index, soft, ops, cdt, like):
    """(denominator, counted rows) of reduction='mean', as device arrays (no host sync): the
    sum of weight[target] over rows not ignored (their count without a weight), as torch does;
    an out-of-range target contributes NaN. Soft targets: the row count. Used by the callers
    that reduce over several kernel calls (linear cross-entropy's chunks)."""
    if soft:
        n = ops.full((), float(t_rows.shape[0]), cdt, like)
        return n, n
    counted = t_rows != ignore_index
    in_range = (t_rows >= 0) & (t_rows < n_cols)
    if weight is not None:
        safe = ops.astype(t_rows, "int64") * ops.astype(in_range, "int64")
        w_t = weight[safe]
    else:
        w_t = ops.full(tuple(t_rows.shape), 1.0, cdt, like)
    nan = ops.full((), float("nan"), cdt, like)
    zero = ops.full((), 0.0, cdt, like)
    where = _where_fn(ops)
    per_row = where(counted, where(in_range, w_t, nan), zero)
    return per_row.sum(), ops.astype(counted, cdt).sum()


def _where_fn(ops):
    if ops.kind == _arrays.TORCH:
        import torch

        return torch.where
    return ops.xp.where


# ----------------------------------------------------------------------------------------------
# cross-entropy


@dataclass
class CEProblem:
    """A cross-entropy call laid out as rows: class axis last, targets as the kernels take
    them, the per-class weight in the compute dtype."""

    logits: Any  # the caller's array (class axis where the caller put it)
    moved: Any  # logits with the class axis last (a view)
    perm: tuple[int, ...] | None  # None: already last
    target: Any  # as passed (for messages)
    x2: Any  # (n_rows, C) rows
    t2: Any  # (n_rows,) int32/int64, or (n_rows, C) soft rows in the logits' dtype
    soft: bool
    weight: Any  # (C,) compute dtype, or None
    layout: RowLayout
    ops: Any
    dn: str
    cdt: str

    @property
    def n_rows(self) -> int:
        return self.layout.n_rows

    @property
    def n_cols(self) -> int:
        return self.layout.n_cols

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return self.layout.permuted_shape[:-1]

    def restore(self, a):
        """An array laid out like ``moved`` back in the caller's axis order (a view)."""
        if self.perm is None:
            return a
        inv = [0] * len(self.perm)
        for i, p in enumerate(self.perm):
            inv[p] = i
        return self.ops.permute(a, tuple(inv))


def ce_problem(logits, target, weight, axis=-1) -> CEProblem:
    """Check and lay out the data of a cross-entropy call (options are checked separately)."""
    logits = _arrays.as_supported_array(logits, "logits")
    dn = check_float(logits, "logits")
    if logits.ndim < 1:
        raise ValueError("logits must have at least one axis (the class axis)")
    ops = ops_for(logits)
    ax = class_axis(logits, axis)
    target, soft = check_target(target, logits, ax)
    perm = None
    moved, tmoved = logits, target
    if ax != logits.ndim - 1:
        perm = tuple(a for a in range(logits.ndim) if a != ax) + (ax,)
        moved = ops.permute(logits, perm)
        if soft:
            tmoved = ops.permute(target, perm)
    n_cols = int(moved.shape[-1])
    weight = check_weight(weight, logits, n_cols)
    cdt = compute_dtype_name(dn)
    if weight is not None:
        weight = ops.contiguous(ops.astype(weight, cdt))
    layout = RowLayout.for_axes(moved.shape, (moved.ndim - 1,))
    if layout.n_rows > 0 and n_cols == 0:
        raise ValueError("cross_entropy needs at least one class (the class axis has size 0)")
    x2 = layout.rows(moved, ops)
    if soft:
        t2 = layout.rows(ops.astype(tmoved, dn), ops)
    else:
        t2 = class_targets(target, layout.n_rows, ops)
    return CEProblem(logits, moved, perm, target, x2, t2, soft, weight, layout, ops, dn, cdt)


@dataclass
class CETargets:
    """The targets of a cross-entropy whose logits are never held whole (linear
    cross-entropy): class indices as the kernels take them, or probability rows."""

    target: Any  # as passed (for messages)
    t2: Any  # (n_rows,) int32/int64, or (n_rows, C) probabilities in x's dtype
    soft: bool
    weight: Any  # (C,) compute dtype, or None
    n_rows: int


def ce_targets(target, x, lead: tuple[int, ...], n_cols: int, weight, dn: str) -> CETargets:
    """Check targets (class indices of shape ``lead``, or probabilities ``lead + (C,)``) and
    class weights against logits that are computed chunk by chunk from ``x``."""
    ops = ops_for(x)
    target = same_place(target, x, "target", "x")
    soft = target_is_soft(target)
    want = lead + (n_cols,) if soft else lead
    if tuple(target.shape) != want:
        kind = "probability" if soft else "class-index"
        raise ValueError(
            f"{kind} target has shape {tuple(target.shape)}, expected {want} ({n_cols} classes)"
        )
    weight = check_weight(weight, x, n_cols)
    if weight is not None:
        weight = ops.contiguous(ops.astype(weight, compute_dtype_name(dn)))
    n_rows = math.prod(int(s) for s in lead)
    if soft:
        t2 = ops.contiguous(ops.astype(target, dn).reshape((n_rows, n_cols)))
    else:
        t2 = class_targets(target, n_rows, ops)
    return CETargets(target, t2, soft, weight, n_rows)


def _as_result_scalar(a, ops):
    """A reduced loss as the caller's kind returns scalars: a NumPy scalar (as np.sum does),
    a 0-d CuPy array, a 0-d torch tensor."""
    if ops.kind == _arrays.NUMPY:
        return a[()]
    return a


def cross_entropy(
    logits,
    target,
    *,
    weight,
    options: CEOptions,
    validate: bool,
    backend,
    want_grad: bool,
    inplace: bool = False,
    return_lse: bool = False,
    axis=-1,
):
    """(loss, dlogits or None, lse or None) for any array kind; the one implementation of
    sk.cross_entropy and sk.cross_entropy_with_grad (torch: called inside the custom ops)."""
    if inplace and isinstance(logits, np.ndarray) and not logits.dtype.isnative:
        raise TypeError(
            f"inplace=True needs logits in native byte order, got dtype {logits.dtype.str}; "
            "convert them first (logits.astype(logits.dtype.newbyteorder('=')))"
        )
    pb = ce_problem(logits, target, weight, axis)
    mod = select(backend, pb.logits)
    ops, o = pb.ops, options
    if not pb.soft and (validate or mod.NAME == "numpy"):
        validate_target(pb.t2, pb.target, pb.n_cols, o.ignore_index, ops)
    n_rows = pb.n_rows
    reduced = o.reduction != "none"
    loss = ops.empty(() if reduced else (n_rows,), pb.cdt, pb.logits)
    lse = ops.empty((n_rows,), pb.cdt, pb.logits) if return_lse else None
    grad = None
    if want_grad:
        grad = Output(pb.layout, ops, pb.moved, pb.moved if inplace else None)
    if n_rows > 0:
        mod.cross_entropy_fwd(
            pb.x2,
            pb.t2,
            loss=loss,
            grad=grad.rows if grad is not None else None,
            lse=lse,
            soft=pb.soft,
            weight=pb.weight,
            ignore_index=o.ignore_index,
            label_smoothing=o.label_smoothing,
            z_loss=o.z_loss,
            softcap=o.softcap,
            grad_scale=o.grad_scale,
            reduction=o.reduction,
            denom=None,
        )
    elif reduced:
        loss = ops.zeros((), pb.cdt, pb.logits)  # no rows: sum 0, and mean 0 (nothing counted)
    loss = _as_result_scalar(loss, ops) if reduced else loss.reshape(pb.lead_shape)
    dlogits = None
    if grad is not None:
        dlogits = pb.logits if inplace else pb.restore(grad.result())
        if inplace:
            grad.result()  # writes back when the class axis could not be written as rows
    if lse is not None:
        lse = lse.reshape(pb.lead_shape)
    return loss, dlogits, lse
