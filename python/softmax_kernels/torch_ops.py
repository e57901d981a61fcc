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

    @staticmethod
    def vmap(info, in_dims, logits, target, weight, *rest):
        # one call per slice: each slice is its own cross-entropy ("mean" over its own rows)
        def pick(a, d, i):
            return a if d is None or a is None else a.select(d, i)

        outs = [
            _CrossEntropyFn.apply(pick(logits, in_dims[0], i), pick(target, in_dims[1], i),
                                  pick(weight, in_dims[2], i), *rest)
            for i in range(info.batch_size)
        ]  # fmt: skip
        return tuple(torch.stack(o) for o in zip(*outs, strict=True)), (0, 0, 0)


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
        loss, dlogits, lse = _vocab_parallel_entry(
            logits, target, weight, o, bool(validate), want_lse, backend, want_grad=want_grad,
            inplace=inplace, orig=orig, process_group=process_group, vocab_start=vocab_start,
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
# fused linear + cross-entropy (the chunked algorithm is softmax_kernels._linear's)

_LINEAR_SCHEMA = (
    "(Tensor x, Tensor linear_weight, Tensor target, Tensor? linear_bias, Tensor? weight, "
    "int ignore_index, str reduction, float label_smoothing, float z_loss, float? softcap, "
    "int chunk_size, float grad_scale, bool want_grad, Tensor? row_grad, str group, "
    "int vocab_start, str backend) -> (Tensor, Tensor, Tensor, Tensor)"
)


def _linear_outputs_like(x, w, b, reduction, want_grad):
    """Empty (loss, dx, dweight, dbias) as the op returns them ((0,) where not computed)."""
    from . import _linear

    c = _compute_dtype(x)
    loss = x.new_empty(tuple(x.shape[:-1]) if reduction == "none" else (), dtype=c)
    if not want_grad:
        return loss, x.new_empty((0,)), x.new_empty((0,)), x.new_empty((0,))
    dw = _linear.dweight_like(w, w.dtype, _arrays.ops_for(w), w)
    db = x.new_empty((w.shape[0],)) if b is not None else x.new_empty((0,))
    return loss, x.new_empty(x.shape), dw, db


@torch.library.custom_op(f"{_NS}::linear_cross_entropy", mutates_args=(), schema=_LINEAR_SCHEMA)
def _linear_ce_op(x, w, target, b, weight, ignore_index, reduction, eps, z, softcap, chunk_size,
                  grad_scale, want_grad, row_grad, group, vocab_start, backend):  # fmt: skip
    options = _core.CEOptions(ignore_index, reduction, eps, z, softcap, grad_scale)
    if group:
        from . import _parallel

        loss, dx, dw, db = _parallel.linear_cross_entropy(
            x, w, target, b, weight, options, chunk_size or None, _backend_opt(backend),
            want_grad=want_grad, process_group=_resolve_group(group),
            vocab_start=None if vocab_start < 0 else vocab_start, row_grad=row_grad,
        )  # fmt: skip
    else:
        from . import _linear

        loss, dx, dw, db = _linear.compute(
            x, w, target, linear_bias=b, weight=weight, options=options,
            chunk_size=chunk_size or None, backend=_backend_opt(backend), want_grad=want_grad,
            row_grad=row_grad,
        )  # fmt: skip
    outs = [x.new_empty((0,)) if a is None else a for a in (dx, dw, db)]  # (no aliases)
    return loss, *outs


@_linear_ce_op.register_fake
def _linear_ce_fake(x, w, target, b, weight, ignore_index, reduction, *rest):
    return _linear_outputs_like(x, w, b, reduction, rest[5])  # (rest[5]: want_grad)


def _linear_setup(ctx, inputs, output):
    (x, w, target, b, weight, ignore_index, reduction, eps, z, softcap, chunk_size, grad_scale,
     want_grad, row_grad, group, vocab_start, backend) = inputs  # fmt: skip
    ctx.set_materialize_grads(False)
    _loss, dx, dw, db = output
    ctx.mark_non_differentiable(dx, dw, db)
    ctx.reduction = reduction
    ctx.has_bias = b is not None
    ctx.args = (ignore_index, reduction, eps, z, softcap, chunk_size, group, vocab_start, backend)
    ctx.fused = want_grad and grad_scale == 1.0 and row_grad is None and reduction != "none"
    if ctx.fused:
        ctx.save_for_backward(dx, dw, db if b is not None else None)
    else:  # "none": the gradient depends on every row's incoming gradient: recompute
        ctx.save_for_backward(x, w, target, b, weight)


def _linear_vjp(ctx, g_loss, *_rest):
    if torch.is_grad_enabled():
        raise NotImplementedError(
            "softmax_kernels.linear_cross_entropy has no second derivative (backward with "
            "create_graph=True)"
        )
    grads = [None] * 17
    if g_loss is None:
        return tuple(grads)
    if ctx.fused:
        dx, dw, db = ctx.saved_tensors
        c = g_loss.dtype
        grads[0] = (dx.to(c) * g_loss).to(dx.dtype)
        grads[1] = (dw.to(c) * g_loss).to(dw.dtype)
        if db is not None:
            grads[3] = (db.to(c) * g_loss).to(db.dtype)
        return tuple(grads)
    # reduction "none" (every other forward that builds a graph is fused): the gradient of
    # sum_r g_r loss_r, recomputed chunk by chunk with each row's dZ scaled by its g_r
    x, w, target, b, weight = ctx.saved_tensors
    ignore_index, reduction, eps, z, softcap, chunk_size, group, start, backend = ctx.args
    _, dx, dw, db = _linear_ce_op(
        x, w, target, b, weight, ignore_index, reduction, eps, z, softcap, chunk_size, 1.0,
        True, g_loss.reshape(-1), group, start, backend,
    )  # fmt: skip
    grads[0], grads[1] = dx, dw
    if b is not None:
        grads[3] = db
    return tuple(grads)


_linear_ce_op.register_autograd(_linear_vjp, setup_context=_linear_setup)


def linear_cross_entropy_entry(
    x,
    linear_weight,
    target,
    *,
    want_grad,
    linear_bias=None,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    chunk_size=None,
    grad_scale=1.0,
    process_group=None,
    vocab_start=None,
    backend=None,
):
    """sk.linear_cross_entropy[_with_grad] for torch tensors: the custom op, with autograd for
    x, linear_weight and linear_bias when they require grad (and want_grad is False)."""
    from . import _linear

    for name, a in (("x", x), ("linear_weight", linear_weight), ("target", target)):
        if _arrays.kind_of(a) != _arrays.TORCH:
            if process_group is not None:
                raise TypeError(
                    "process_group= needs torch tensors (torch.distributed: NCCL for CUDA "
                    f"tensors, gloo for CPU tensors); {name} is a "
                    f"{_arrays.kind_of(a) or type(a).__name__} array"
                )
            break
    opts = _core.check_ce_options(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        grad_scale=grad_scale,
    )
    chunk = _linear._check_chunk_size(chunk_size) or 0
    backend = _backend_arg(backend)
    grad_on = torch.is_grad_enabled()
    for name, a in (("weight", weight), ("target", target)):
        if isinstance(a, torch.Tensor) and a.requires_grad and grad_on and not want_grad:
            raise NotImplementedError(
                f"softmax_kernels.linear_cross_entropy gives no gradient with respect to {name}; "
                f"pass {name}.detach()"
            )
    group, start = _group_args(process_group, vocab_start)
    args = (x, linear_weight, target, linear_bias, weight, opts.ignore_index, opts.reduction,
            opts.label_smoothing, opts.z_loss, opts.softcap, chunk)  # fmt: skip
    if want_grad:
        with torch.no_grad():
            loss, dx, dw, db = _linear_ce_op(
                *args, opts.grad_scale, True, None, group, start, backend
            )
        return loss, dx, dw, (db if linear_bias is not None else None)
    needs = grad_on and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in (x, linear_weight, linear_bias)
    )
    fused = needs and opts.reduction != "none"
    return _linear_ce_op(*args, 1.0, fused, None, group, start, backend)[0]


# ----------------------------------------------------------------------------------------------
# vocabulary-parallel cross-entropy (softmax_kernels._parallel does the work; the collective
# runs inside the op, so torch.compile sees one opaque node and never reorders around it)


def _group_args(process_group, vocab_start):
    """(group name, vocab_start or -1) as the ops take them; ("", -1) without a group."""
    if process_group is None:
        if vocab_start is not None:
            raise ValueError("vocab_start is only meaningful with a process_group")
        return "", -1
    name = getattr(process_group, "group_name", None)
    if not name:
        raise TypeError(
            f"process_group must be a torch.distributed ProcessGroup, got "
            f"{type(process_group).__name__}"
        )
    return name, (-1 if vocab_start is None else _core.int_arg(vocab_start, "vocab_start"))


def _resolve_group(name: str):
    import torch.distributed as dist

    return dist.distributed_c10d._resolve_process_group(name)


_VP_ARGS = (
    "Tensor? weight, int ignore_index, str reduction, float label_smoothing, float z_loss, "
    "float? softcap, bool validate, bool want_lse, str group, int vocab_start, float grad_scale, "
    "bool want_grad, str backend"
)


def _vp_impl(logits, target, weight, ignore_index, reduction, eps, z, softcap, validate,
             want_lse, group, vocab_start, grad_scale, want_grad, backend, inplace):  # fmt: skip
    from . import _parallel

    options = _core.CEOptions(ignore_index, reduction, eps, z, softcap, grad_scale)
    loss, dlogits, lse = _parallel.cross_entropy(
        logits, target, weight, options, validate, want_lse, backend, want_grad=want_grad,
        inplace=inplace, process_group=_resolve_group(group),
        vocab_start=None if vocab_start < 0 else vocab_start,
    )  # fmt: skip
    if dlogits is None or inplace:
        dlogits = logits.new_empty((0,))
    if lse is None:
        lse = logits.new_empty((0,), dtype=_compute_dtype(logits))
    return loss, dlogits, lse


@torch.library.custom_op(
    f"{_NS}::vocab_parallel_cross_entropy",
    mutates_args=(),
    schema=f"(Tensor logits, Tensor target, {_VP_ARGS}) -> (Tensor, Tensor, Tensor)",
)
def _vp_op(logits, target, *args):
    return _vp_impl(logits, target, *args, inplace=False)


@torch.library.custom_op(
    f"{_NS}::vocab_parallel_cross_entropy_",
    mutates_args=("logits",),
    schema=f"(Tensor(a!) logits, Tensor target, {_VP_ARGS}) -> (Tensor, Tensor)",
)
def _vp_inplace_op(logits, target, *args):
    loss, _, lse = _vp_impl(logits, target, *args, inplace=True)
    return loss, lse


@_vp_op.register_fake
def _vp_fake(logits, target, weight, ignore_index, reduction, eps, z, softcap, validate,
             want_lse, group, vocab_start, grad_scale, want_grad, backend):  # fmt: skip
    grad = _like_rows(logits, [logits.dim() - 1]) if want_grad else logits.new_empty((0,))
    return _loss_like(logits, reduction), grad, _lse_like(logits, want_lse)


@_vp_inplace_op.register_fake
def _vp_inplace_fake(logits, target, weight, ignore_index, reduction, eps, z, softcap, *rest):
    return _loss_like(logits, reduction), _lse_like(logits, rest[1])


def _vp_setup(ctx, inputs, output):
    (logits, target, weight, ignore_index, reduction, eps, z, softcap, validate, want_lse,
     group, vocab_start, grad_scale, want_grad, backend) = inputs  # fmt: skip
    ctx.set_materialize_grads(False)
    _loss, dlogits, lse = output
    ctx.mark_non_differentiable(dlogits)
    ctx.reduction, ctx.eps, ctx.softcap = reduction, eps, softcap
    ctx.n_inputs = len(inputs)
    ctx.target_dtype = target.dtype
    ctx.fused = want_grad and grad_scale == 1.0
    need_t = ctx.needs_input_grad[1]
    ctx.save_for_backward(
        dlogits if ctx.fused else None,
        logits if (want_lse or need_t) else None,
        lse if (want_lse or need_t) else None,
        weight,
    )


def _vp_vjp(ctx, g_loss, _g_dlogits, g_lse):
    if torch.is_grad_enabled():
        raise NotImplementedError(
            "vocabulary-parallel cross-entropy has no second derivative (create_graph=True)"
        )
    dlogits, logits, lse, weight = ctx.saved_tensors
    grads = [None] * ctx.n_inputs
    per_row = ctx.reduction == "none"
    if ctx.needs_input_grad[0]:
        gx = None
        if g_loss is not None:
            if dlogits is None:
                raise RuntimeError(
                    "internal error: the vocabulary-parallel forward kept no gradient"
                )
            g = g_loss.unsqueeze(-1) if per_row else g_loss
            gx = dlogits.to(g.dtype) * g
        if g_lse is not None and lse is not None and lse.numel():
            # d lse / d z = p = exp(z - L) with the global L (this rank's slice of it)
            c = lse.dtype
            zc, chain = _softcapped(logits, ctx.softcap, c)
            p = torch.exp(zc - lse.unsqueeze(-1))
            extra = g_lse.to(c).unsqueeze(-1) * (p if chain is None else p * chain)
            gx = extra if gx is None else gx.to(c) + extra
        if gx is not None:
            grads[0] = gx.to(logits.dtype if logits is not None else dlogits.dtype)
    if ctx.needs_input_grad[1] and g_loss is not None:
        # soft targets: d loss / d q_c = (1 - eps) w_c (L - z_c), this rank's classes
        c = lse.dtype
        zc, _ = _softcapped(logits, ctx.softcap, c)
        gt = (lse.unsqueeze(-1) - zc) * (1.0 - ctx.eps)
        if weight is not None:
            gt = gt * weight.to(c)
        if ctx.reduction == "mean":
            gt = gt / max(logits.numel() // max(logits.shape[-1], 1), 1)
        g = g_loss.unsqueeze(-1) if per_row else g_loss
        grads[1] = (gt * g).to(ctx.target_dtype)
    return tuple(grads)


_vp_op.register_autograd(_vp_vjp, setup_context=_vp_setup)


def _vocab_parallel_entry(logits, target, weight, o, validate, want_lse, backend, *, want_grad,
                          inplace, orig, process_group, vocab_start):  # fmt: skip
    """The vocabulary-parallel cross-entropy for torch tensors (class axis already last)."""
    group, start = _group_args(process_group, vocab_start)
    args = (weight, o.ignore_index, o.reduction, o.label_smoothing, o.z_loss, o.softcap,
            validate, want_lse, group, start)  # fmt: skip
    if want_grad:
        with torch.no_grad():
            if inplace:
                if orig.requires_grad and orig.is_leaf:
                    raise RuntimeError(
                        "a leaf Variable that requires grad is being used in an in-place "
                        "operation (cross_entropy_with_grad(..., inplace=True) would write the "
                        "gradient over it); pass logits.detach() or inplace=False"
                    )
                loss, lse = _vp_inplace_op(logits, target, *args, o.grad_scale, True, backend)
                return loss, None, (lse if want_lse else None)
            loss, dlogits, lse = _vp_op(logits, target, *args, o.grad_scale, True, backend)
            return loss, dlogits, (lse if want_lse else None)
    needs = torch.is_grad_enabled() and (logits.requires_grad or target.requires_grad)
    loss, _, lse = _vp_op(logits, target, *args, 1.0, bool(needs), backend)
    return loss, None, (lse if want_lse else None)
