"""PyTorch integration: every op on torch tensors is a ``torch.library`` custom op with a fake
(meta) implementation and an autograd formula, so that

* a tensor that requires grad gets a result that carries autograd, whose backward runs our own
  backward kernels (``softmax_backward`` / ``log_softmax_backward``, and for cross-entropy the
  gradient the fused forward kernel already wrote), and
* ``torch.compile(fullgraph=True)`` traces through them without a graph break.

The ops (namespace ``softmax_kernels``) take normalized arguments -- reduced dims as a sorted
``int[]``, floats, the mask already broadcast, the class axis of cross-entropy already last (the
entry points below move it with a view), ``backend`` a string ("" for automatic choice):

- ``softmax`` / ``log_softmax(x, dims, scale, mask, backend)``; autograd (double backward).
- ``softmax_backward`` / ``log_softmax_backward(dy, y, dims, scale, backend)``; autograd.
- ``cross_entropy(logits, target, <options>, want_lse, backend) -> (loss, lse)``: the loss only;
  autograd (backward recomputes the fused gradient).
- ``cross_entropy_with_grad(<same>, grad_scale) -> (loss, dlogits, lse)`` in one pass; autograd.
- ``cross_entropy_with_grad_(<same>, grad_scale) -> (loss, lse)``: in place, dlogits written
  into the logits (a declared mutation); no autograd.
- ``linear_cross_entropy(x, linear_weight, target, ...) -> (loss, dx, dweight, dbias)``;
  autograd for x, linear_weight, linear_bias (``softmax_kernels._linear``).
- ``vocab_parallel_cross_entropy(...) -> (loss, dlogits, lse)``: one all-gather inside
  (``softmax_kernels._parallel``); autograd.

Inside the ops there is no ``.item()`` and no host synchronisation, except the target check of
``validate=True`` (which the contract allows) and the NumPy backend's target check (CPU data).

Autograd of sk.cross_entropy: when the logits need a gradient, the forward pass runs the fused
kernel (``cross_entropy_with_grad`` with grad_scale=1) and keeps its gradient; backward only
multiplies it by the incoming gradient (a scalar for "mean"/"sum", one value per row for "none").
That is one read of the logits in all, at the price of keeping one logits-sized tensor until
backward (torch keeps its log-softmax output, the same size). Soft (probability) targets that
require grad get ``d loss / d q_c = (1 - label_smoothing) * w_c * (lse - z_c)`` (scaled the same
way). A per-class ``weight`` that requires grad is refused (NotImplementedError), as torch does
for class-index targets. The returned lse, when used, adds ``g_lse * softmax(z)`` (times the
softcap's chain rule). Second derivatives: softmax and log_softmax support them; cross-entropy
raises ``NotImplementedError`` under ``create_graph=True`` rather than return a wrong one.

Function transforms: ``torch.func.vmap`` over any op works (softmax ops have a batching rule;
the others run once per slice). Forward-mode AD (``torch.func.jvp``,
``torch.autograd.forward_ad``) and ``torch.func.grad`` go through ``torch.autograd.Function``
twins of the ops with ``jvp`` rules (softmax: ``y * (t - sum(t * y))``; log_softmax:
``t - sum(exp(y) * t)``; cross-entropy: ``<dloss/dlogits, t>``), used only when a transform is
active, since torch.compile cannot trace a custom ``jvp``.
"""

from __future__ import annotations

import torch

from . import _arrays, _core
from .dispatch import check_name

__all__ = [
    "softmax_entry",
    "backward_entry",
    "cross_entropy_entry",
    "linear_cross_entropy_entry",
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
    shape = [x.shape[a] for a in perm]
    buf = _arrays.ops_for(x).empty(tuple(shape), x.dtype, x)
    if perm == list(range(nd)):
        return buf
    inv = [0] * nd
    for i, p in enumerate(perm):
        inv[p] = i
    return buf.permute(inv)


def _rowsum(t: torch.Tensor, dims) -> torch.Tensor:
    # torch reads dim=[] as "all dims"; here no dims means rows of one element.
    return t.sum(dim=list(dims), keepdim=True) if len(dims) else t


def _transform_active(*tensors) -> bool:
    """True when a function transform or forward-mode AD sees these tensors (torch.func.jvp /
    grad / jacfwd, torch.autograd.forward_ad): the ops then run through their
    autograd.Function twins, which carry jvp rules. Never while torch.compile traces."""
    if torch.compiler.is_compiling():
        return False
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if any(is_wrapped(t) for t in ts):
        return True
    import torch.autograd.forward_ad as fwad

    if getattr(fwad, "_current_level", -1) >= 0:
        return any(fwad.unpack_dual(t).tangent is not None for t in ts)
    return False


# ----------------------------------------------------------------------------------------------
# softmax / log_softmax and their backward passes


_SOFTMAX_SCHEMA = "(Tensor x, int[] dims, float scale, Tensor? mask, str backend) -> Tensor"
_BACKWARD_SCHEMA = "(Tensor dy, Tensor y, int[] dims, float scale, str backend) -> Tensor"


@torch.library.custom_op(f"{_NS}::softmax", mutates_args=(), schema=_SOFTMAX_SCHEMA)
def _softmax_op(x, dims, scale, mask, backend):
    out = _like_rows(x, dims)
    return _core.softmax(x, tuple(dims), scale, mask, out, _backend_opt(backend), False)


@torch.library.custom_op(f"{_NS}::log_softmax", mutates_args=(), schema=_SOFTMAX_SCHEMA)
def _log_softmax_op(x, dims, scale, mask, backend):
    out = _like_rows(x, dims)
    return _core.softmax(x, tuple(dims), scale, mask, out, _backend_opt(backend), True)


@torch.library.custom_op(f"{_NS}::softmax_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def _softmax_backward_op(dy, y, dims, scale, backend):
    out = _like_rows(y, dims)
    return _core.softmax_backward(dy, y, tuple(dims), scale, out, _backend_opt(backend), False)


@torch.library.custom_op(f"{_NS}::log_softmax_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def _log_softmax_backward_op(dy, y, dims, scale, backend):
    out = _like_rows(y, dims)
    return _core.softmax_backward(dy, y, tuple(dims), scale, out, _backend_opt(backend), True)


for _op in (_softmax_op, _log_softmax_op):
    _op.register_fake(lambda x, dims, scale, mask, backend: _like_rows(x, dims))
for _op in (_softmax_backward_op, _log_softmax_backward_op):
    _op.register_fake(lambda dy, y, dims, scale, backend: _like_rows(y, dims))


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


def _softmax_backward_grads(dy, y, g, dims, s, backend, need_dy, need_y):
    # dx = s * J dy with J = diag(y) - y y^T symmetric, so d<g, dx>/d dy = s * J g (the same op);
    # d<g, dx>/d y = s * (g * (dy - sum(dy * y)) - dy * sum(g * y)).
    grad_dy = grad_y = None
    if need_dy:
        grad_dy = _softmax_backward_op(g, y, dims, s, backend)
    if need_y:
        c = _compute_dtype(y)
        g_, dy_, y_ = g.to(c), dy.to(c), y.to(c)
        grad_y = s * (g_ * (dy_ - _rowsum(dy_ * y_, dims)) - dy_ * _rowsum(g_ * y_, dims))
        grad_y = grad_y.to(y.dtype)
    return grad_dy, grad_y


def _log_softmax_backward_grads(dy, y, g, dims, s, need_dy, need_y):
    # dx = s * (dy - e * sum(dy)), e = exp(y): d<g, dx>/d dy = s * (g - sum(g * e));
    # d<g, dx>/d y = -s * g * e * sum(dy).
    c = _compute_dtype(y)
    e, g_ = y.to(c).exp(), g.to(c)
    grad_dy = grad_y = None
    if need_dy:
        grad_dy = (s * (g_ - _rowsum(g_ * e, dims))).to(dy.dtype)
    if need_y:
        grad_y = (-s * g_ * e * _rowsum(dy.to(c), dims)).to(y.dtype)
    return grad_dy, grad_y


def _softmax_backward_vjp(ctx, g):
    dy, y = ctx.saved_tensors
    need = ctx.needs_input_grad
    gd, gy = _softmax_backward_grads(dy, y, g, ctx.dims, ctx.scale, ctx.backend, need[0], need[1])
    return gd, gy, None, None, None


def _log_softmax_backward_vjp(ctx, g):
    dy, y = ctx.saved_tensors
    need = ctx.needs_input_grad
    gd, gy = _log_softmax_backward_grads(dy, y, g, ctx.dims, ctx.scale, need[0], need[1])
    return gd, gy, None, None, None


_softmax_backward_op.register_autograd(_softmax_backward_vjp, setup_context=_backward_setup)
_log_softmax_backward_op.register_autograd(_log_softmax_backward_vjp, setup_context=_backward_setup)


# Batching rules (torch.func.vmap): the ops are row-wise, so a vmapped dim is one more leading
# dim: move it first and shift the reduced dims by one.


def _moved_first(t, bdim):
    return t if bdim is None or bdim == 0 else t.movedim(bdim, 0)


def _softmax_vmap(op):
    def rule(info, in_dims, x, dims, scale, mask, backend):
        xd, md = in_dims[0], in_dims[3]
        x0 = _moved_first(x, xd) if xd is not None else x.expand(info.batch_size, *x.shape)
        nd = x0.dim()
        dims1 = [(d % (nd - 1)) + 1 for d in dims]
        m0 = None
        if mask is not None:
            b = info.batch_size
            m0 = _moved_first(mask, md) if md is not None else mask.expand(b, *mask.shape)
        return op(x0, sorted(dims1), scale, m0, backend), 0

    return rule


def _backward_vmap(op):
    def rule(info, in_dims, dy, y, dims, scale, backend):
        b = info.batch_size
        dy0 = _moved_first(dy, in_dims[0]) if in_dims[0] is not None else dy.expand(b, *dy.shape)
        y0 = _moved_first(y, in_dims[1]) if in_dims[1] is not None else y.expand(b, *y.shape)
        nd = y0.dim()
        dims1 = sorted((d % (nd - 1)) + 1 for d in dims)
        return op(dy0, y0, dims1, scale, backend), 0

    return rule


torch.library.register_vmap(_softmax_op, _softmax_vmap(_softmax_op))
torch.library.register_vmap(_log_softmax_op, _softmax_vmap(_log_softmax_op))
torch.library.register_vmap(_softmax_backward_op, _backward_vmap(_softmax_backward_op))
torch.library.register_vmap(_log_softmax_backward_op, _backward_vmap(_log_softmax_backward_op))


class _SoftmaxFn(torch.autograd.Function):
    """The softmax ops with forward-mode rules, for function transforms (see the module doc)."""

    @staticmethod
    def forward(x, dims, scale, mask, backend, is_log):
        return (_log_softmax_op if is_log else _softmax_op)(x, dims, scale, mask, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _x, dims, scale, mask, backend, is_log = inputs
        ctx.dims, ctx.scale, ctx.backend, ctx.is_log = list(dims), scale, backend, is_log
        ctx.save_for_backward(output, mask)
        ctx.save_for_forward(output, mask)

    @staticmethod
    def backward(ctx, g):
        y, mask = ctx.saved_tensors
        if ctx.is_log and mask is not None:
            g = g.masked_fill(~mask, 0)
        dx = _BackwardFn.apply(g, y, ctx.dims, ctx.scale, ctx.backend, ctx.is_log)
        return dx, None, None, None, None, None

    @staticmethod
    def jvp(ctx, t, *_):
        # softmax: dy = y * (s t - sum(y s t)), which is softmax_backward(t, y) (J symmetric);
        # log_softmax: dy = s (t - sum(exp(y) t)); masked entries are constants: tangent 0.
        y, mask = ctx.saved_tensors
        if mask is not None:
            t = t.masked_fill(~mask, 0)
        if not ctx.is_log:
            return _BackwardFn.apply(t, y, ctx.dims, ctx.scale, ctx.backend, False)
        c = _compute_dtype(y)
        t_ = t.to(c)
        out = ctx.scale * (t_ - _rowsum(y.to(c).exp() * t_, ctx.dims))
        if mask is not None:
            out = out.masked_fill(~mask, 0)
        return out.to(y.dtype)

    @staticmethod
    def vmap(info, in_dims, x, dims, scale, mask, backend, is_log):
        op = _log_softmax_op if is_log else _softmax_op
        out, _ = _softmax_vmap(op)(info, in_dims[:5], x, dims, scale, mask, backend)
        return out, 0


class _BackwardFn(torch.autograd.Function):
    """The backward ops with forward-mode rules, for function transforms."""

    @staticmethod
    def forward(dy, y, dims, scale, backend, is_log):
        op = _log_softmax_backward_op if is_log else _softmax_backward_op
        return op(dy, y, dims, scale, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        dy, y, dims, scale, backend, is_log = inputs
        ctx.dims, ctx.scale, ctx.backend, ctx.is_log = list(dims), scale, backend, is_log
        ctx.save_for_backward(dy, y)
        ctx.save_for_forward(dy, y)

    @staticmethod
    def backward(ctx, g):
        dy, y = ctx.saved_tensors
        n = ctx.needs_input_grad
        if ctx.is_log:
            gd, gy = _log_softmax_backward_grads(dy, y, g, ctx.dims, ctx.scale, n[0], n[1])
        else:
            gd, gy = _softmax_backward_grads(dy, y, g, ctx.dims, ctx.scale, ctx.backend, n[0], n[1])
        return gd, gy, None, None, None, None

    @staticmethod
    def jvp(ctx, t_dy, t_y, *_):
        # softmax: dx = s y (dy - sum(dy y)):
        #   ddx = s [t_y (dy - sum(dy y)) + y (t_dy - sum(t_dy y + dy t_y))]
        # log_softmax: dx = s (dy - e sum(dy)), e = exp(y):
        #   ddx = s [t_dy - e t_y sum(dy) - e sum(t_dy)]
        dy, y = ctx.saved_tensors
        c, s, dims = _compute_dtype(y), ctx.scale, ctx.dims
        dy_, y_ = dy.to(c), y.to(c)
        td = t_dy.to(c) if t_dy is not None else torch.zeros_like(dy_)
        ty = t_y.to(c) if t_y is not None else torch.zeros_like(y_)
        if ctx.is_log:
            e = y_.exp()
            out = s * (td - e * ty * _rowsum(dy_, dims) - e * _rowsum(td, dims))
        else:
            out = s * (
                ty * (dy_ - _rowsum(dy_ * y_, dims)) + y_ * (td - _rowsum(td * y_ + dy_ * ty, dims))
            )
        return out.to(y.dtype)

    @staticmethod
    def vmap(info, in_dims, dy, y, dims, scale, backend, is_log):
        op = _log_softmax_backward_op if is_log else _softmax_backward_op
        out, _ = _backward_vmap(op)(info, in_dims[:5], dy, y, dims, scale, backend)
        return out, 0


# ----------------------------------------------------------------------------------------------
# cross-entropy

_CE_ARGS = (
    "Tensor? weight, int ignore_index, str reduction, float label_smoothing, float z_loss, "
    "float? softcap, bool validate, bool want_lse, str backend"
)


def _ce_impl(logits, target, weight, ignore_index, reduction, eps, z, softcap, validate,
             want_lse, backend, *, want_grad, grad_scale=1.0, inplace=False):  # fmt: skip
    options = _core.CEOptions(ignore_index, reduction, eps, z, softcap, grad_scale)
    loss, dlogits, lse = _core.cross_entropy(
        logits,
        target,
        weight=weight,
        options=options,
        validate=validate,
        backend=_backend_opt(backend),
        want_grad=want_grad,
        inplace=inplace,
        return_lse=want_lse,
    )
    if lse is None:
        lse = logits.new_empty((0,), dtype=_compute_dtype(logits))
    return loss, dlogits, lse


def _loss_like(logits: torch.Tensor, reduction: str) -> torch.Tensor:
    shape = tuple(logits.shape[:-1]) if reduction == "none" else ()
    return logits.new_empty(shape, dtype=_compute_dtype(logits))


def _lse_like(logits: torch.Tensor, want_lse: bool) -> torch.Tensor:
    shape = tuple(logits.shape[:-1]) if want_lse else (0,)
    return logits.new_empty(shape, dtype=_compute_dtype(logits))


@torch.library.custom_op(
    f"{_NS}::cross_entropy",
    mutates_args=(),
    schema=f"(Tensor logits, Tensor target, {_CE_ARGS}) -> (Tensor, Tensor)",
)
def _cross_entropy_op(logits, target, *args):
    loss, _, lse = _ce_impl(logits, target, *args, want_grad=False)
    return loss, lse


@torch.library.custom_op(
    f"{_NS}::cross_entropy_with_grad",
    mutates_args=(),
    schema=f"(Tensor logits, Tensor target, {_CE_ARGS}, float grad_scale) -> (Tensor, Tensor, "
    "Tensor)",
)
def _cross_entropy_with_grad_op(logits, target, *args):
    *args, grad_scale = args
    return _ce_impl(logits, target, *args, want_grad=True, grad_scale=grad_scale)


@torch.library.custom_op(
    f"{_NS}::cross_entropy_with_grad_",
    mutates_args=("logits",),
    schema=f"(Tensor(a!) logits, Tensor target, {_CE_ARGS}, float grad_scale) -> (Tensor, Tensor)",
)
def _cross_entropy_with_grad_inplace_op(logits, target, *args):
    # The gradient overwrites the logits; being a declared mutation, torch bumps the logits'
    # version counter, so autograd refuses (instead of silently misusing) a saved copy of them.
    *args, grad_scale = args
    loss, _, lse = _ce_impl(logits, target, *args, want_grad=True, grad_scale=grad_scale,
                            inplace=True)  # fmt: skip
    return loss, lse


@_cross_entropy_op.register_fake
def _cross_entropy_fake(logits, target, weight, ignore_index, reduction, *rest):
    return _loss_like(logits, reduction), _lse_like(logits, rest[4])


@_cross_entropy_with_grad_op.register_fake
def _cross_entropy_with_grad_fake(logits, target, weight, ignore_index, reduction, *rest):
    grad = _like_rows(logits, [logits.dim() - 1])
    return _loss_like(logits, reduction), grad, _lse_like(logits, rest[4])


@_cross_entropy_with_grad_inplace_op.register_fake
def _cross_entropy_with_grad_inplace_fake(logits, target, weight, ignore_index, reduction, *r):
    return _loss_like(logits, reduction), _lse_like(logits, r[4])


def _ce_setup(ctx, inputs, output, fused):
    (logits, target, weight, ignore_index, reduction, eps, z, softcap, validate, want_lse,
     backend) = inputs[:11]  # fmt: skip
    ctx.set_materialize_grads(False)
    ctx.options = (ignore_index, reduction, eps, z, softcap, backend)
    ctx.n_inputs = len(inputs)
    ctx.logits_dtype = logits.dtype
    ctx.target_dtype = target.dtype
    need_x, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dlogits = None
    if fused:
        _loss, dlogits, lse = output
        ctx.mark_non_differentiable(dlogits)
        if inputs[11] != 1.0:  # grad_scale: keep d loss/d logits only when it is unscaled
            dlogits = None
    else:
        _loss, lse = output
    # The logits are needed to recompute the gradient (loss-only op, or a scaled one), for the
    # gradient of soft targets and for the lse's; otherwise they are not kept alive.
    recompute = need_x and dlogits is None
    keep_logits = recompute or need_t or (want_lse and need_x)
    ctx.save_for_backward(
        dlogits if need_x else None,
        logits if keep_logits else None,
        target if recompute else None,
        weight,
        lse if want_lse and need_x else None,
    )


def _ce_setup_loss(ctx, inputs, output):
    _ce_setup(ctx, inputs, output, fused=False)


def _ce_setup_fused(ctx, inputs, output):
    _ce_setup(ctx, inputs, output, fused=True)


def _softcapped(logits, softcap, c):
    """(z, dz/dx) of the softcap in the compute dtype c (dz/dx None without one)."""
    x = logits.to(c)
    if softcap is None:
        return x, None
    t = torch.tanh(x / softcap)
    return softcap * t, 1.0 - t * t


def _ce_vjp(ctx, g_loss, *rest):
    if torch.is_grad_enabled():
        raise NotImplementedError(
            "softmax_kernels.cross_entropy has no second derivative (backward with "
            "create_graph=True); use torch.nn.functional.cross_entropy for that"
        )
    g_lse = rest[-1]  # (fused op: rest = (g_dlogits, g_lse))
    dlogits, logits, target, weight, lse = ctx.saved_tensors
    ignore_index, reduction, eps, z, softcap, backend = ctx.options
    grad_x = grad_t = None
    per_row = reduction == "none"
    c = _compute_dtype(logits) if logits is not None else torch.float32
    if ctx.needs_input_grad[0] and g_loss is not None:
        if dlogits is None:  # recompute: the fused kernel's gradient of (sum or mean) loss
            _, dlogits, _ = _cross_entropy_with_grad_op(
                logits, target, weight, ignore_index, reduction, eps, z, softcap, False, False,
                backend, 1.0,
            )  # fmt: skip
        g = g_loss.unsqueeze(-1) if per_row else g_loss
        # reads the saved gradient once, writes dlogits once (half types scaled in float32)
        grad_x = dlogits.to(g.dtype) * g
    if ctx.needs_input_grad[0] and g_lse is not None and lse is not None and lse.numel():
        # d lse / d x = softmax(z) * dz/dx
        zc, chain = _softcapped(logits, softcap, c)
        p = torch.exp(zc - lse.to(c).unsqueeze(-1))
        extra = g_lse.to(c).unsqueeze(-1) * (p if chain is None else p * chain)
        grad_x = extra if grad_x is None else grad_x.to(c) + extra
    if grad_x is not None:
        grad_x = grad_x.to(ctx.logits_dtype)
    if ctx.needs_input_grad[1] and g_loss is not None:
        # soft target q: loss = sum_c w_c q'_c (lse - z_c) (+ z lse^2), q' = (1-eps) q + eps/C,
        # so d loss / d q_c = (1-eps) w_c (lse - z_c), divided by the row count for "mean".
        g = g_loss.unsqueeze(-1) if per_row else g_loss
        n_cols = logits.shape[-1]
        zc, _ = _softcapped(logits, softcap, c)
        nll = -_log_softmax_op(zc, [logits.dim() - 1], 1.0, None, backend)
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


class _CrossEntropyFn(torch.autograd.Function):
    """sk.cross_entropy with a forward-mode rule, for function transforms: the fused kernel's
    gradient G = d loss / d logits gives the loss tangent <G, t> (per row for "none")."""

    @staticmethod
    def forward(logits, target, *args):
        loss, dlogits, lse = _cross_entropy_with_grad_op(logits, target, *args, 1.0)
        return loss, lse, dlogits

    @staticmethod
    def setup_context(ctx, inputs, output):
        loss, lse, dlogits = output
        ctx.reduction = inputs[4]
        ctx.n_inputs = len(inputs)
        ctx.mark_non_differentiable(lse, dlogits)
        ctx.save_for_backward(dlogits)
        ctx.save_for_forward(dlogits)

    @staticmethod
    def backward(ctx, g_loss, _g_lse, _g_d):
        (dlogits,) = ctx.saved_tensors
        g = g_loss.unsqueeze(-1) if ctx.reduction == "none" else g_loss
        return ((dlogits.to(g.dtype) * g).to(dlogits.dtype),) + (None,) * (ctx.n_inputs - 1)

    @staticmethod
    def jvp(ctx, t_logits, t_target, *_):
        if t_target is not None:
            raise NotImplementedError(
                "softmax_kernels.cross_entropy: forward-mode AD with respect to probability "
                "targets is not implemented (tangents of the logits are)"
            )
        (dlogits,) = ctx.saved_tensors
        c = _compute_dtype(dlogits)
        prod = dlogits.to(c) * t_logits.to(c)
        t_loss = prod.sum(-1) if ctx.reduction == "none" else prod.sum()
        return t_loss, None, None


def _ce_check(logits, target, weight, axis, ignore_index, reduction, label_smoothing, z_loss,
              softcap, grad_scale, backend):  # fmt: skip
    """The checks of _core.cross_entropy, in its order and with its messages, done before an op
    is called (the ops' schemas take only tensors, numbers and strings), and the class axis
    moved last (a view). Data-dependent checks happen inside the op."""
    _arrays.check_float(logits, "logits")
    if logits.ndim < 1:
        raise ValueError("logits must have at least one axis (the class axis)")
    ax = _core.class_axis(logits, axis)
    target, soft = _core.check_target(target, logits, ax)
    opts = _core.check_ce_options(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        grad_scale=grad_scale,
    )
    if ax != logits.ndim - 1:
        logits = logits.movedim(ax, -1)
        if soft:
            target = target.movedim(ax, -1)
    weight = _core.check_weight(weight, logits, int(logits.shape[-1]))
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            "softmax_kernels.cross_entropy gives no gradient with respect to weight (nor does "
            "torch for class-index targets); pass weight.detach()"
        )
    return logits, target, weight, ax, opts, _backend_arg(backend)


def cross_entropy_entry(
    logits,
    target,
    *,
    want_grad,
    axis=-1,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    return_lse=False,
    validate=False,
    grad_scale=1.0,
    inplace=False,
    process_group=None,
    vocab_start=None,
    backend=None,
):
    """sk.cross_entropy (want_grad False) and sk.cross_entropy_with_grad for torch tensors."""
    if _arrays.kind_of(logits) != _arrays.TORCH:
        raise TypeError(
            "process_group= needs torch tensors (torch.distributed: NCCL for CUDA tensors, gloo "
            f"for CPU tensors); got a {_arrays.kind_of(logits) or type(logits).__name__} array"
        )
    orig = logits
    logits, target, weight, ax, o, backend = _ce_check(
        logits, target, weight, axis, ignore_index, reduction, label_smoothing, z_loss,
        softcap, grad_scale, backend,
    )  # fmt: skip
    last = logits.dim() - 1

    def restore(d):
        return d if ax == last else d.movedim(-1, ax)

    want_lse = bool(return_lse)
    if process_group is not None:
        from . import _parallel

        loss, dlogits, lse = _parallel.torch_entry(
            logits, target, weight, o, bool(validate), want_lse, backend, want_grad=want_grad,
            inplace=inplace, process_group=process_group, vocab_start=vocab_start,
        )  # fmt: skip
        if want_grad:
            dlogits = orig if inplace else restore(dlogits)
    elif not want_grad:
        if vocab_start is not None:
            raise ValueError("vocab_start is only meaningful with a process_group")
        args = (weight, o.ignore_index, o.reduction, o.label_smoothing, o.z_loss, o.softcap,
                bool(validate), want_lse, backend)  # fmt: skip
        if _transform_active(logits, target):
            loss, lse, _ = _CrossEntropyFn.apply(logits, target, *args)
        elif torch.is_grad_enabled() and (logits.requires_grad or target.requires_grad):
            loss, _, lse = _cross_entropy_with_grad_op(logits, target, *args, 1.0)
        else:
            loss, lse = _cross_entropy_op(logits, target, *args)
    else:
        if vocab_start is not None:
            raise ValueError("vocab_start is only meaningful with a process_group")
        args = (weight, o.ignore_index, o.reduction, o.label_smoothing, o.z_loss, o.softcap,
                bool(validate), want_lse, backend, o.grad_scale)  # fmt: skip
        with torch.no_grad():
            if inplace:
                if orig.requires_grad and orig.is_leaf:
                    raise RuntimeError(
                        "a leaf Variable that requires grad is being used in an in-place "
                        "operation (cross_entropy_with_grad(..., inplace=True) would write the "
                        "gradient over it); pass logits.detach() or inplace=False"
                    )
                loss, lse = _cross_entropy_with_grad_inplace_op(logits, target, *args)
                dlogits = orig.detach() if orig.requires_grad else orig
            else:
                loss, dlogits, lse = _cross_entropy_with_grad_op(logits, target, *args)
                dlogits = restore(dlogits)
    out = (loss, dlogits) if want_grad else (loss,)
    if want_lse:
        out += (lse,)
    return out[0] if len(out) == 1 else out


# ----------------------------------------------------------------------------------------------
# The softmax entry points api.py calls for torch tensors.


def softmax_entry(x, axis, scale, where, out, backend, is_log):
    """sk.softmax / sk.log_softmax for a torch tensor (differentiable, traceable by
    torch.compile); ``out=`` writes through the backend outside the ops (refused under
    autograd, as torch refuses it)."""
    if out is not None:
        return write_out(
            "log_softmax" if is_log else "softmax",
            out,
            (x,),
            lambda: _core.softmax(x, axis, scale, where, out, backend, is_log),
        )
    _arrays.check_float(x, "x")
    scale = _core.finite_float(scale, "scale")
    dims = list(_arrays.normalize_axes(axis, x.ndim))
    backend = _backend_arg(backend)
    mask = _core.prepare_mask(where, x, _arrays.ops_for(x))
    if _transform_active(x):
        return _SoftmaxFn.apply(x, dims, scale, mask, backend, is_log)
    op = _log_softmax_op if is_log else _softmax_op
    return op(x, dims, scale, mask, backend)


def backward_entry(dy, y, axis, scale, out, backend, is_log):
    """sk.softmax_backward / sk.log_softmax_backward for torch tensors."""
    if out is not None:
        return write_out(
            "log_softmax_backward" if is_log else "softmax_backward",
            out,
            (dy, y),
            lambda: _core.softmax_backward(dy, y, axis, scale, out, backend, is_log),
        )
    dy, y = _core.check_backward_inputs(dy, y)
    scale = _core.finite_float(scale, "scale")
    dims = list(_arrays.normalize_axes(axis, y.ndim))
    backend = _backend_arg(backend)
    if _transform_active(dy, y):
        return _BackwardFn.apply(dy, y, dims, scale, backend, is_log)
    op = _log_softmax_backward_op if is_log else _softmax_backward_op
    return op(dy, y, dims, scale, backend)


def write_out(name, out, inputs, compute):
    """The ``out=`` path for torch tensors, which writes through the backend outside the ops:
    refused, as torch refuses it, when autograd would need a graph; afterwards the version
    counter of ``out`` is bumped, so a backward pass that saved its old contents raises instead
    of reading the new ones. Returns ``compute()``."""
    tensors = [t for t in (*inputs, out) if isinstance(t, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{name}(): functions with out=... arguments don't support automatic "
            "differentiation, but one of the arguments requires grad."
        )
    result = compute()
    torch.autograd.graph.increment_version(out)
    return result


# ----------------------------------------------------------------------------------------------
# fused linear + cross-entropy (softmax_kernels._linear does the work)


def linear_cross_entropy_entry(x, linear_weight, target, *, want_grad, **kw):
    from . import _linear

    return _linear.torch_entry(x, linear_weight, target, want_grad=want_grad, **kw)
