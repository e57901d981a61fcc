"""PyTorch integration: every op on torch tensors is a ``torch.library`` custom op with a fake
(meta) implementation and an autograd formula, so that

* a tensor that requires grad gets a result that carries autograd, whose backward runs our own
  backward kernels (``softmax_backward`` / ``log_softmax_backward``, and for cross-entropy the
  gradient the fused forward kernel already wrote), and
* ``torch.compile(fullgraph=True)`` traces through them without a graph break.

The ops (namespace ``softmax_kernels``), all taking normalized arguments -- reduced dims as a
sorted ``int[]``, ``scale`` a float, the mask already broadcast to ``x``'s shape, ``backend`` a
string ("" for automatic choice):

- ``softmax(x, dims, scale, mask, backend)``: softmax; autograd.
- ``log_softmax(x, dims, scale, mask, backend)``: log-softmax; autograd.
- ``softmax_backward(dy, y, dims, scale, backend)``: its VJP; autograd (double backward).
- ``log_softmax_backward(dy, y, dims, scale, backend)``: its VJP; autograd (double backward).
- ``cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
  validate, backend)``: the loss only; autograd (backward recomputes the fused gradient).
- ``cross_entropy_with_grad(<same>, grad_scale)``: (loss, dlogits) in one pass; autograd.
- ``cross_entropy_with_grad_(<same>, grad_scale)``: in place, dlogits written into the logits
  (a declared mutation), returns the loss; no autograd.

The wrappers at the bottom (called by ``softmax_kernels.api`` for torch inputs) check the
arguments with the same messages as the rest of the API, then call an op. Inside the ops there is
no ``.item()`` and no host synchronisation, except the target check of ``validate=True`` (which the
contract allows to synchronise) and the NumPy backend's target check (CPU data: no device sync).

Autograd of sk.cross_entropy: when the logits need a gradient, the forward pass runs the fused
kernel (``cross_entropy_with_grad`` with grad_scale=1) and keeps its gradient; backward only
multiplies it by the incoming gradient (a scalar for "mean"/"sum", one value per row for "none").
That is one read of the logits in all, at the price of keeping one logits-sized tensor until
backward (torch keeps its log-softmax output, the same size). Soft (probability) targets that
require grad get ``d loss / d q_c = (1 - label_smoothing) * w_c * (lse - x_c)`` (scaled the same
way). A per-class ``weight`` that requires grad is refused (NotImplementedError), as torch does
for class-index targets. Second derivatives: softmax and log_softmax support them (their backward
ops have autograd formulas); cross-entropy does not (its backward raises under
``create_graph=True`` rather than return a wrong second derivative).
"""

import numpy as np
import torch

from . import _arrays, api
from .dispatch import check_name

__all__ = [
    "softmax",
    "log_softmax",
    "softmax_backward",
    "log_softmax_backward",
    "cross_entropy",
    "cross_entropy_with_grad",
    "write_out",
]

_NS = "softmax_kernels"


# ----------------------------------------------------------------------------------------------
# Small helpers shared by the op implementations, fakes and formulas.


def _backend_arg(backend) -> str:
    """The backend as the ops take it: a valid name, or "" for automatic choice."""
    if backend is None:
        return ""
    return check_name(backend)


def _backend_opt(backend: str):
    return backend or None


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Half types are computed in float32, float64 in float64 (as the kernels do)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _like_rows(x: torch.Tensor, dims) -> torch.Tensor:
    """An empty tensor of x's shape laid out exactly as the API lays out its output: the reduced
    dims last and C-contiguous, permuted back. The real op writes into it (so its strides are
    those of the fake, which torch.compile relies on) and the fake returns one."""
    nd = x.dim()
    dims = list(dims)
    perm = [a for a in range(nd) if a not in dims] + dims
    if perm == list(range(nd)):
        return x.new_empty(x.shape)
    inv = [0] * nd
    for i, p in enumerate(perm):
        inv[p] = i
    return x.new_empty([x.shape[a] for a in perm]).permute(inv)


def _rowsum(t: torch.Tensor, dims) -> torch.Tensor:
    # torch reads dim=[] as "all dims"; here no dims means rows of one element.
    return t.sum(dim=list(dims), keepdim=True) if len(dims) else t


def _finite_float(value, name: str) -> float:
    """api._finite_float, with the common case (a finite Python float or int) checked without
    math.isfinite, which torch.compile(dynamic=True) cannot trace in torch 2.13; everything
    else goes to api._finite_float for its checks and messages."""
    if type(value) in (float, int):
        # float() of a float constant would be traced as a symbolic float under dynamic=True
        f = value if type(value) is float else float(value)
        if f - f == 0.0:  # inf - inf and nan - nan are nan
            return f
    return api._finite_float(value, name)


def _loss_like(logits: torch.Tensor, reduction: str) -> torch.Tensor:
    shape = tuple(logits.shape[:-1]) if reduction == "none" else ()
    return logits.new_empty(shape, dtype=_compute_dtype(logits))


# ----------------------------------------------------------------------------------------------
# softmax / log_softmax and their backward passes


_SOFTMAX_SCHEMA = "(Tensor x, int[] dims, float scale, Tensor? mask, str backend) -> Tensor"
_BACKWARD_SCHEMA = "(Tensor dy, Tensor y, int[] dims, float scale, str backend) -> Tensor"


@torch.library.custom_op(f"{_NS}::softmax", mutates_args=(), schema=_SOFTMAX_SCHEMA)
def _softmax_op(x, dims, scale, mask, backend):
    out = _like_rows(x, dims)
    return api._softmax_impl(x, tuple(dims), scale, mask, out, _backend_opt(backend), False)


@torch.library.custom_op(f"{_NS}::log_softmax", mutates_args=(), schema=_SOFTMAX_SCHEMA)
def _log_softmax_op(x, dims, scale, mask, backend):
    out = _like_rows(x, dims)
    return api._softmax_impl(x, tuple(dims), scale, mask, out, _backend_opt(backend), True)


@torch.library.custom_op(f"{_NS}::softmax_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def _softmax_backward_op(dy, y, dims, scale, backend):
    out = _like_rows(y, dims)
    return api._softmax_backward_impl(dy, y, tuple(dims), scale, out, _backend_opt(backend), False)


@torch.library.custom_op(f"{_NS}::log_softmax_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def _log_softmax_backward_op(dy, y, dims, scale, backend):
    out = _like_rows(y, dims)
    return api._softmax_backward_impl(dy, y, tuple(dims), scale, out, _backend_opt(backend), True)


@_softmax_op.register_fake
def _softmax_fake(x, dims, scale, mask, backend):
    return _like_rows(x, dims)


@_log_softmax_op.register_fake
def _log_softmax_fake(x, dims, scale, mask, backend):
    return _like_rows(x, dims)


@_softmax_backward_op.register_fake
def _softmax_backward_fake(dy, y, dims, scale, backend):
    return _like_rows(y, dims)


@_log_softmax_backward_op.register_fake
def _log_softmax_backward_fake(dy, y, dims, scale, backend):
    return _like_rows(y, dims)


def _softmax_setup(ctx, inputs, output):
    _x, dims, scale, mask, backend = inputs
    ctx.dims, ctx.scale, ctx.backend = list(dims), scale, backend
    ctx.save_for_backward(output, mask)


def _softmax_vjp(ctx, dy):
    # dx = s * y * (dy - sum(dy * y)); masked entries have y = 0, so they get dx = 0.
    y, _mask = ctx.saved_tensors
    return _softmax_backward_op(dy, y, ctx.dims, ctx.scale, ctx.backend), None, None, None, None


def _log_softmax_vjp(ctx, dy):
    # dx = s * (dy - exp(y) * sum(dy)). Masked entries are the constant -inf: their dy must take
    # no part in sum(dy), and they get dx = 0 (exp(-inf) = 0 then gives exactly that).
    y, mask = ctx.saved_tensors
    if mask is not None:
        dy = dy.masked_fill(~mask, 0)
    dx = _log_softmax_backward_op(dy, y, ctx.dims, ctx.scale, ctx.backend)
    return dx, None, None, None, None


_softmax_op.register_autograd(_softmax_vjp, setup_context=_softmax_setup)
_log_softmax_op.register_autograd(_log_softmax_vjp, setup_context=_softmax_setup)


def _backward_setup(ctx, inputs, output):
    dy, y, dims, scale, backend = inputs
    ctx.dims, ctx.scale, ctx.backend = list(dims), scale, backend
    ctx.save_for_backward(dy, y)


def _softmax_backward_vjp(ctx, g):
    # dx = s * J dy with J = diag(y) - y y^T symmetric, so d<g, dx>/d dy = s * J g (the same op);
    # d<g, dx>/d y = s * (g * (dy - sum(dy * y)) - dy * sum(g * y)).
    dy, y = ctx.saved_tensors
    s, dims = ctx.scale, ctx.dims
    grad_dy = grad_y = None
    if ctx.needs_input_grad[0]:
        grad_dy = _softmax_backward_op(g, y, dims, s, ctx.backend)
    if ctx.needs_input_grad[1]:
        c = _compute_dtype(y)
        g_, dy_, y_ = g.to(c), dy.to(c), y.to(c)
        grad_y = s * (g_ * (dy_ - _rowsum(dy_ * y_, dims)) - dy_ * _rowsum(g_ * y_, dims))
        grad_y = grad_y.to(y.dtype)
    return grad_dy, grad_y, None, None, None


def _log_softmax_backward_vjp(ctx, g):
    # dx = s * (dy - e * sum(dy)), e = exp(y): d<g, dx>/d dy = s * (g - sum(g * e));
    # d<g, dx>/d y = -s * g * e * sum(dy).
    dy, y = ctx.saved_tensors
    s, dims = ctx.scale, ctx.dims
    c = _compute_dtype(y)
    e, g_ = y.to(c).exp(), g.to(c)
    grad_dy = grad_y = None
    if ctx.needs_input_grad[0]:
        grad_dy = (s * (g_ - _rowsum(g_ * e, dims))).to(dy.dtype)
    if ctx.needs_input_grad[1]:
        grad_y = (-s * g_ * e * _rowsum(dy.to(c), dims)).to(y.dtype)
    return grad_dy, grad_y, None, None, None


_softmax_backward_op.register_autograd(_softmax_backward_vjp, setup_context=_backward_setup)
_log_softmax_backward_op.register_autograd(_log_softmax_backward_vjp, setup_context=_backward_setup)


# ----------------------------------------------------------------------------------------------
# cross-entropy

_CE_ARGS = (
    "Tensor? weight, int ignore_index, str reduction, float label_smoothing, float z_loss, "
    "bool validate, str backend"
)


def _ce_impl(logits, target, weight, ignore_index, reduction, eps, z, validate, backend, **kw):
    return api._cross_entropy_impl(
        logits,
        target,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=eps,
        z_loss=z,
        validate=validate,
        backend=_backend_opt(backend),
        **kw,
    )


@torch.library.custom_op(
    f"{_NS}::cross_entropy",
    mutates_args=(),
    schema=f"(Tensor logits, Tensor target, {_CE_ARGS}) -> Tensor",
)
def _cross_entropy_op(logits, target, weight, ignore_index, reduction, eps, z, validate, backend):
    args = (weight, ignore_index, reduction, eps, z, validate, backend)
    return _ce_impl(logits, target, *args, want_grad=False)[0]


@torch.library.custom_op(
    f"{_NS}::cross_entropy_with_grad",
    mutates_args=(),
    schema=f"(Tensor logits, Tensor target, {_CE_ARGS}, float grad_scale) -> (Tensor, Tensor)",
)
def _cross_entropy_with_grad_op(
    logits, target, weight, ignore_index, reduction, eps, z, validate, backend, grad_scale
):
    args = (weight, ignore_index, reduction, eps, z, validate, backend)
    loss, grad = _ce_impl(logits, target, *args, want_grad=True, grad_scale=grad_scale)
    return loss, grad


@torch.library.custom_op(
    f"{_NS}::cross_entropy_with_grad_",
    mutates_args=("logits",),
    schema=f"(Tensor(a!) logits, Tensor target, {_CE_ARGS}, float grad_scale) -> Tensor",
)
def _cross_entropy_with_grad_inplace_op(
    logits, target, weight, ignore_index, reduction, eps, z, validate, backend, grad_scale
):
    # The gradient overwrites the logits; being a declared mutation, torch bumps the logits'
    # version counter, so autograd refuses (instead of silently misusing) a saved copy of them.
    args = (weight, ignore_index, reduction, eps, z, validate, backend)
    loss, _ = _ce_impl(logits, target, *args, want_grad=True, grad_scale=grad_scale, inplace=True)
    return loss


@_cross_entropy_op.register_fake
def _cross_entropy_fake(logits, target, weight, ignore_index, reduction, *_rest):
    return _loss_like(logits, reduction)


@_cross_entropy_with_grad_op.register_fake
def _cross_entropy_with_grad_fake(logits, target, weight, ignore_index, reduction, *_rest):
    return _loss_like(logits, reduction), logits.new_empty(logits.shape)


@_cross_entropy_with_grad_inplace_op.register_fake
def _cross_entropy_with_grad_inplace_fake(logits, target, weight, ignore_index, reduction, *_r):
    return _loss_like(logits, reduction)


def _ce_setup(ctx, inputs, output, fused):
    logits, target, weight, ignore_index, reduction, eps, z, validate, backend = inputs[:9]
    ctx.options = (ignore_index, reduction, eps, z, backend)
    ctx.n_inputs = len(inputs)
    ctx.logits_dtype = logits.dtype
    ctx.target_dtype = target.dtype
    need_x, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dlogits = None
    if fused:
        loss, dlogits = output
        ctx.mark_non_differentiable(dlogits)
        if inputs[9] != 1.0:  # grad_scale: keep d loss/d logits only when it is unscaled
            dlogits = None
    # The logits are needed to recompute the gradient (loss-only op, or a scaled one) and for
    # the gradient of soft targets; otherwise they are not kept alive.
    recompute = need_x and dlogits is None
    ctx.save_for_backward(
        dlogits if need_x else None,
        logits if recompute or need_t else None,
        target if recompute else None,
        weight,
    )


def _ce_setup_loss(ctx, inputs, output):
    _ce_setup(ctx, inputs, output, fused=False)


def _ce_setup_fused(ctx, inputs, output):
    _ce_setup(ctx, inputs, output, fused=True)


def _ce_vjp(ctx, g_loss, *_g_dlogits):
    if torch.is_grad_enabled():
        raise NotImplementedError(
            "softmax_kernels.cross_entropy has no second derivative (backward with "
            "create_graph=True); use torch.nn.functional.cross_entropy for that"
        )
    dlogits, logits, target, weight = ctx.saved_tensors
    ignore_index, reduction, eps, z, backend = ctx.options
    grad_x = grad_t = None
    per_row = reduction == "none"
    g = g_loss.unsqueeze(-1) if per_row else g_loss
    if ctx.needs_input_grad[0]:
        if dlogits is None:  # recompute: the fused kernel's gradient of (sum or mean) loss
            _, dlogits = _cross_entropy_with_grad_op(
                logits, target, weight, ignore_index, reduction, eps, z, False, backend, 1.0
            )
        # reads the saved gradient once, writes dlogits once (half types scaled in float32)
        grad_x = (dlogits.to(g.dtype) * g).to(ctx.logits_dtype)
    if ctx.needs_input_grad[1]:
        # soft target q: loss = sum_c w_c q'_c (lse - x_c) (+ z lse^2), q' = (1-eps) q + eps/C,
        # so d loss / d q_c = (1-eps) w_c (lse - x_c), divided by the row count for "mean".
        n_cols = logits.shape[-1]
        nll = -_log_softmax_op(logits, [logits.dim() - 1], 1.0, None, backend)
        grad_t = nll.to(g.dtype) * (1.0 - eps)
        if weight is not None:
            grad_t = grad_t * weight.to(g.dtype)
        if reduction == "mean":
            n_rows = logits.numel() // n_cols if n_cols else 0
            grad_t = grad_t / max(n_rows, 1)
        grad_t = (grad_t * g).to(ctx.target_dtype)
    return (grad_x, grad_t) + (None,) * (ctx.n_inputs - 2)


_cross_entropy_op.register_autograd(_ce_vjp, setup_context=_ce_setup_loss)
_cross_entropy_with_grad_op.register_autograd(_ce_vjp, setup_context=_ce_setup_fused)


def _ce_check(
    logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, grad_scale, backend
):
    """The argument checks of api._cross_entropy_impl, in its order and with its messages, done
    before an op is called (the ops' schemas take only tensors, numbers and strings); the ones
    that depend on the data (targets in range, at least one class) happen inside the op."""
    _arrays.check_float(logits, "logits")
    if logits.ndim < 1:
        raise ValueError("logits must have at least one axis (the class axis, last)")
    n_cols = int(logits.shape[-1])
    target, soft = api._check_target(target, logits, n_cols)
    if reduction not in api._REDUCTIONS:
        raise ValueError(f"reduction must be one of {api._REDUCTIONS}, got {reduction!r}")
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
        weight = api._same_place(weight, logits, "weight", "logits")
        _arrays.check_float(weight, "weight")
        if tuple(weight.shape) != (n_cols,):
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({n_cols},)")
        if weight.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(
                "softmax_kernels.cross_entropy gives no gradient with respect to weight (nor "
                "does torch for class-index targets); pass weight.detach()"
            )
    backend = _backend_arg(backend)
    return target, soft, weight, ignore_index, reduction, eps, z, grad_scale, backend


# ----------------------------------------------------------------------------------------------
# The entry points api.py calls for torch tensors.


def _softmax_common(x, axis, scale, where, backend, is_log):
    _arrays.check_float(x, "x")
    scale = _finite_float(scale, "scale")
    dims = list(_arrays.normalize_axes(axis, x.ndim))
    backend = _backend_arg(backend)
    mask = api._prepare_mask(where, x, _arrays.ops_for(x))
    op = _log_softmax_op if is_log else _softmax_op
    return op(x, dims, scale, mask, backend)


def softmax(x, axis, *, scale, where, backend):
    """sk.softmax for a torch tensor (differentiable, traceable by torch.compile)."""
    return _softmax_common(x, axis, scale, where, backend, is_log=False)


def log_softmax(x, axis, *, scale, where, backend):
    """sk.log_softmax for a torch tensor (differentiable, traceable by torch.compile)."""
    return _softmax_common(x, axis, scale, where, backend, is_log=True)


def _backward_common(dy, y, axis, scale, backend, is_log):
    # api._softmax_backward_impl's checks, in its order and with its messages
    _arrays.check_float(y, "y")
    dy = api._same_place(dy, y, "dy", "y")
    _arrays.check_float(dy, "dy")
    if _arrays.dtype_name(dy) != _arrays.dtype_name(y):
        raise TypeError(
            f"dy has dtype {_arrays.dtype_name(dy)} but y has {_arrays.dtype_name(y)}; "
            "they must match"
        )
    if tuple(dy.shape) != tuple(y.shape):
        raise ValueError(f"dy has shape {tuple(dy.shape)} but y has {tuple(y.shape)}")
    scale = _finite_float(scale, "scale")
    dims = list(_arrays.normalize_axes(axis, y.ndim))
    op = _log_softmax_backward_op if is_log else _softmax_backward_op
    return op(dy, y, dims, scale, _backend_arg(backend))


def softmax_backward(dy, y, axis, *, scale, backend):
    """sk.softmax_backward for torch tensors (differentiable, traceable by torch.compile)."""
    return _backward_common(dy, y, axis, scale, backend, is_log=False)


def log_softmax_backward(dy, y, axis, *, scale, backend):
    """sk.log_softmax_backward for torch tensors (differentiable, traceable)."""
    return _backward_common(dy, y, axis, scale, backend, is_log=True)


def write_out(name, out, inputs, compute):
    """The ``out=`` path of the API for torch tensors, which writes through the backend outside
    the ops: refused, as torch refuses it, when autograd would need a graph; afterwards the
    version counter of ``out`` is bumped, so a backward pass that saved its old contents raises
    instead of reading the new ones. Returns ``compute()``."""
    tensors = [t for t in (*inputs, out) if isinstance(t, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{name}(): functions with out=... arguments don't support automatic "
            "differentiation, but one of the arguments requires grad."
        )
    result = compute()
    torch.autograd.graph.increment_version(out)
    return result


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
    """sk.cross_entropy for torch tensors. When the logits need a gradient the forward pass runs
    the fused loss+gradient kernel and backward only scales that gradient."""
    target, soft, weight, ignore_index, reduction, eps, z, _, backend = _ce_check(
        logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, 1.0, backend
    )
    args = (weight, ignore_index, reduction, eps, z, bool(validate), backend)
    if torch.is_grad_enabled() and logits.requires_grad:
        loss, _ = _cross_entropy_with_grad_op(logits, target, *args, 1.0)
        return loss
    return _cross_entropy_op(logits, target, *args)


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
    """sk.cross_entropy_with_grad for torch tensors: plain tensors, no autograd graph.

    With ``inplace=True`` the gradient overwrites ``logits`` through an op that declares the
    mutation, so the logits' version counter is bumped: a backward pass that saved the old
    logits raises torch's "modified by an inplace operation" error instead of using the
    gradient as if it were the logits. ``dlogits`` is then ``logits`` itself, or, when
    ``logits`` requires grad, a detached alias of the same memory."""
    target, soft, weight, ignore_index, reduction, eps, z, grad_scale, backend = _ce_check(
        logits,
        target,
        weight,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        grad_scale,
        backend,
    )
    args = (weight, ignore_index, reduction, eps, z, bool(validate), backend, grad_scale)
    with torch.no_grad():
        if inplace:
            loss = _cross_entropy_with_grad_inplace_op(logits, target, *args)
            dlogits = logits.detach() if logits.requires_grad else logits
        else:
            loss, dlogits = _cross_entropy_with_grad_op(logits, target, *args)
    return loss, dlogits
