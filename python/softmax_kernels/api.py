"""The public functions: the front door. Each checks nothing itself; it routes torch tensors to
``softmax_kernels.torch_ops`` (custom ops with autograd and torch.compile support) and every
other array kind to the array-generic implementation in ``softmax_kernels._core``, which torch
tensors reach too, from inside the custom ops.
"""

from __future__ import annotations

from typing import Any

from . import _arrays, _core

__all__ = [
    "softmax",
    "log_softmax",
    "softmax_backward",
    "log_softmax_backward",
    "softmax_jacobian",
    "cross_entropy",
    "cross_entropy_with_grad",
    "linear_cross_entropy",
    "linear_cross_entropy_with_grad",
    "release_cpu_buffers",
]


class _Unset:
    """A default that tells "not passed" from any value: ``axis`` (shown as -1) and its alias
    ``dim`` (shown as None), so that passing both can be refused."""

    def __init__(self, shown: str):
        self._shown = shown

    def __repr__(self) -> str:
        return self._shown


_AXIS = _Unset("-1")
_NO_DIM = _Unset("None")


def _axis(axis, dim, default=-1):
    """The axis from ``axis=`` or its alias ``dim=`` (torch's name); both given: TypeError."""
    if dim is not _NO_DIM:
        if axis is not _AXIS:
            raise TypeError("pass the axis as axis= or as its alias dim=, not both")
        return dim
    return default if axis is _AXIS else axis


def _is_torch(a: Any) -> bool:
    """True when a is a torch tensor: torch goes through the custom ops."""
    return _arrays.kind_of(a) == _arrays.TORCH


def _torch_ops():
    from . import torch_ops

    return torch_ops


# ----------------------------------------------------------------------------------------------
# softmax / log_softmax


def _softmax_entry(x, axis, scale, where, out, backend, is_log):
    if not _is_torch(x):
        return _core.softmax(x, axis, scale, where, out, backend, is_log)
    return _torch_ops().softmax_entry(x, axis, scale, where, out, backend, is_log)


def softmax(
    x: Any,
    axis: Any = _AXIS,
    *,
    dim: Any = _NO_DIM,
    scale: float = 1.0,
    where: Any = None,
    out: Any = None,
    backend: str | None = None,
) -> Any:
    """Softmax of ``scale * x`` over ``axis``: ``exp(scale*x - m) / sum(exp(scale*x - m))``.

    Args:
        x: float16/bfloat16/float32/float64 NumPy or CuPy array or torch tensor, any shape and
            strides.
        axis: int, tuple of ints (softmax over those axes jointly) or None (the whole array);
            default -1. ``dim=`` is an alias (torch's name); passing both is a TypeError.
        scale: multiplies ``x`` first (inverse temperature), fused into the kernel.
        where: boolean array broadcastable to ``x``; False entries take no part and get 0 (also
            in a row that holds a NaN elsewhere). A row with no True entry gives all 0.
        out: array of ``x``'s shape and dtype to write into (may be ``x`` itself).
        backend: "numpy", "triton", "cupy" or None (fastest for the input).

    Returns the softmax, same kind, device, shape and dtype as ``x``.

    >>> import numpy as np, softmax_kernels as sk
    >>> sk.softmax(np.array([1.0, 2.0, 3.0])).round(4)
    array([0.09  , 0.2447, 0.6652])
    >>> sk.softmax(np.zeros((2, 2)), dim=0)
    array([[0.5, 0.5],
           [0.5, 0.5]])
    """
    return _softmax_entry(x, _axis(axis, dim), scale, where, out, backend, is_log=False)


def log_softmax(
    x: Any,
    axis: Any = _AXIS,
    *,
    dim: Any = _NO_DIM,
    scale: float = 1.0,
    where: Any = None,
    out: Any = None,
    backend: str | None = None,
) -> Any:
    """Log-softmax of ``scale * x`` over ``axis``: ``scale*x - m - log(sum(exp(scale*x - m)))``.

    Arguments as for :func:`softmax`; entries where ``where`` is False get ``-inf``, and a row
    with no True entry gives all ``-inf``.

    >>> import numpy as np, softmax_kernels as sk
    >>> sk.log_softmax(np.array([[0.0, 0.0]], np.float32))
    array([[-0.6931472, -0.6931472]], dtype=float32)
    """
    return _softmax_entry(x, _axis(axis, dim), scale, where, out, backend, is_log=True)


# ----------------------------------------------------------------------------------------------
# backward passes


def _backward_entry(dy, y, axis, scale, out, backend, is_log):
    if not _is_torch(y):
        return _core.softmax_backward(dy, y, axis, scale, out, backend, is_log)
    return _torch_ops().backward_entry(dy, y, axis, scale, out, backend, is_log)


def softmax_backward(
    dy: Any,
    y: Any,
    axis: Any = _AXIS,
    *,
    dim: Any = _NO_DIM,
    scale: float = 1.0,
    out: Any = None,
    backend: str | None = None,
) -> Any:
    """Vector-Jacobian product of softmax: ``dx = scale * y * (dy - sum(dy * y, axis))``.

    ``y`` is the softmax output, ``dy`` the gradient with respect to it; equals
    ``dy @ softmax_jacobian(y)`` (times ``scale``) without ever building the Jacobian. ``out``
    may be ``dy`` or ``y`` itself.

    >>> import numpy as np, softmax_kernels as sk
    >>> y = sk.softmax(np.array([1.0, 2.0, 3.0]))
    >>> sk.softmax_backward(np.array([1.0, 0.0, 0.0]), y).round(4)
    array([ 0.0819, -0.022 , -0.0599])
    """
    return _backward_entry(dy, y, _axis(axis, dim), scale, out, backend, is_log=False)


def log_softmax_backward(
    dy: Any,
    y: Any,
    axis: Any = _AXIS,
    *,
    dim: Any = _NO_DIM,
    scale: float = 1.0,
    out: Any = None,
    backend: str | None = None,
) -> Any:
    """Vector-Jacobian product of log_softmax: ``dx = scale * (dy - exp(y) * sum(dy, axis))``,
    with ``y`` the log_softmax output.

    >>> import numpy as np, softmax_kernels as sk
    >>> y = sk.log_softmax(np.array([0.0, 0.0]))
    >>> sk.log_softmax_backward(np.array([1.0, 0.0]), y)
    array([ 0.5, -0.5])
    """
    return _backward_entry(dy, y, _axis(axis, dim), scale, out, backend, is_log=True)


def softmax_jacobian(y: Any, axis: Any = _AXIS, *, dim: Any = _NO_DIM) -> Any:
    """The full Jacobian of softmax at output ``y``: ``J[..., i, j] = y_i * (delta_ij - y_j)``.

    The softmax axes (an int, a tuple flattened jointly, or None) become the last two axes, of
    size C each; the other axes lead in their order. For teaching and checking: the backward
    functions never build it.

    >>> import numpy as np, softmax_kernels as sk
    >>> sk.softmax_jacobian(np.array([0.5, 0.5]))
    array([[ 0.25, -0.25],
           [-0.25,  0.25]])
    """
    return _core.softmax_jacobian(y, _axis(axis, dim))


# ----------------------------------------------------------------------------------------------
# cross-entropy


def _ce_entry(logits, target, *, want_grad, **kw):
    if kw.get("process_group") is not None or _is_torch(logits):
        return _torch_ops().cross_entropy_entry(logits, target, want_grad=want_grad, **kw)
    kw.pop("process_group")
    if kw.pop("vocab_start") is not None:
        raise ValueError("vocab_start is only meaningful with a process_group")
    options = _core.check_ce_options(
        ignore_index=kw.pop("ignore_index"),
        reduction=kw.pop("reduction"),
        label_smoothing=kw.pop("label_smoothing"),
        z_loss=kw.pop("z_loss"),
        softcap=kw.pop("softcap"),
        grad_scale=kw.pop("grad_scale", 1.0),
    )
    return_lse = bool(kw["return_lse"])
    loss, dlogits, lse = _core.cross_entropy(
        logits, target, options=options, want_grad=want_grad, **kw
    )
    out = (loss, dlogits) if want_grad else (loss,)
    if return_lse:
        out += (lse,)
    return out[0] if len(out) == 1 else out


def cross_entropy(
    logits: Any,
    target: Any,
    *,
    axis: Any = _AXIS,
    dim: Any = _NO_DIM,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    validate: bool = False,
    process_group: Any = None,
    vocab_start: int | None = None,
    backend: str | None = None,
) -> Any:
    """Cross-entropy of softmax(logits) against ``target``, as
    ``torch.nn.functional.cross_entropy``, plus ``z_loss * lse**2`` per counted row.

    The class axis is the LAST one by default (torch's ``F.cross_entropy`` takes dim 1): pass
    ``axis=1`` for torch's ``(N, C, d1, ...)`` layout.

    Args:
        logits: float array or tensor; ``axis`` (alias ``dim``) is its class axis.
        target: integer class indices of the logits' shape without the class axis (in
            ``[0, C)`` or ``ignore_index``), or float class probabilities of the logits' shape.
        weight: per-class weights, shape ``(C,)``.
        ignore_index: integer targets equal to it count for nothing.
        reduction: "mean" (divided by the summed weight of the counted rows; 0.0 when every
            target is ignored), "sum" or "none" (the logits' shape without the class axis).
        label_smoothing: in [0, 1], mixes the target with the uniform distribution.
        z_loss: coefficient of the PaLM z-loss ``lse**2``.
        softcap: a positive ``c`` applies Gemma's ``c * tanh(logits / c)`` first.
        return_lse: also return every row's log-sum-exp (float32; float64 for float64 logits),
            shaped like a ``reduction="none"`` loss, as the last item.
        validate: check integer targets (and raise ValueError at the first bad one) on GPU
            backends too; that synchronises with the host. The NumPy backend always checks.
        process_group: a ``torch.distributed`` group over which the classes are sharded
            (vocabulary-parallel); ``logits`` is then this rank's shard, holding the classes
            ``[vocab_start, vocab_start + C_local)`` (``vocab_start`` defaults to
            ``rank * C_local``); targets are global class indices.
        backend: "numpy", "triton", "cupy" or None.

    Returns the loss (float32; float64 for float64 logits), on the logits' device: a NumPy
    scalar, a 0-d CuPy array or a 0-d torch tensor for "mean"/"sum"; ``(loss, lse)`` with
    ``return_lse``.

    >>> import numpy as np, softmax_kernels as sk
    >>> float(sk.cross_entropy(np.array([[0.0, 0.0]]), np.array([1])))  # log 2
    0.6931471805599453
    """
    return _ce_entry(
        logits,
        target,
        want_grad=False,
        axis=_axis(axis, dim),
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        return_lse=return_lse,
        validate=validate,
        process_group=process_group,
        vocab_start=vocab_start,
        backend=backend,
    )


def cross_entropy_with_grad(
    logits: Any,
    target: Any,
    *,
    axis: Any = _AXIS,
    dim: Any = _NO_DIM,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    validate: bool = False,
    grad_scale: float = 1.0,
    inplace: bool = False,
    process_group: Any = None,
    vocab_start: int | None = None,
    backend: str | None = None,
) -> Any:
    """Cross-entropy and its gradient in one fused pass: returns ``(loss, dlogits)`` (and the
    lse last with ``return_lse``), ``dlogits = d(grad_scale * loss) / d logits``
    (``softmax - onehot``, smoothed, weighted and scaled; under ``reduction="none"`` the
    gradient of ``grad_scale * loss.sum()``).

    Options as for :func:`cross_entropy`. With ``inplace=True`` the gradient overwrites the
    logits buffer, which is returned as ``dlogits`` (saves one logits-sized allocation).

    >>> import numpy as np, softmax_kernels as sk
    >>> loss, g = sk.cross_entropy_with_grad(np.array([[0.0, 0.0]]), np.array([1]))
    >>> g
    array([[ 0.5, -0.5]])
    """
    return _ce_entry(
        logits,
        target,
        want_grad=True,
        axis=_axis(axis, dim),
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        return_lse=return_lse,
        validate=validate,
        grad_scale=grad_scale,
        inplace=inplace,
        process_group=process_group,
        vocab_start=vocab_start,
        backend=backend,
    )


# ----------------------------------------------------------------------------------------------
# fused linear + cross-entropy


def _linear_entry(x, linear_weight, target, *, want_grad, **kw):
    if kw.get("process_group") is not None or _is_torch(x):
        return _torch_ops().linear_cross_entropy_entry(
            x, linear_weight, target, want_grad=want_grad, **kw
        )
    from . import _linear

    kw.pop("process_group")
    if kw.pop("vocab_start") is not None:
        raise ValueError("vocab_start is only meaningful with a process_group")
    return _linear.entry(x, linear_weight, target, want_grad=want_grad, **kw)


def linear_cross_entropy(
    x: Any,
    linear_weight: Any,
    target: Any,
    *,
    linear_bias: Any = None,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    process_group: Any = None,
    vocab_start: int | None = None,
    backend: str | None = None,
) -> Any:
    """Cross-entropy of ``x @ linear_weight.T + linear_bias`` without ever holding those
    ``(N, V)`` logits: rows go through in chunks, each chunk's logits into one reused buffer.

    Args:
        x: ``(..., D)`` float array or tensor.
        linear_weight: ``(V, D)``, as in ``torch.nn.Linear`` (any strides: CS231N's ``(D, C)``
            ``W`` is passed as the view ``W.T``, which is not copied).
        target: class indices of shape ``(...)``, or probabilities of shape ``(..., V)``.
        linear_bias: ``(V,)`` or None.
        chunk_size: the most rows per chunk (default: chosen from N, V, D and free memory).
        Other options as for :func:`cross_entropy` (the class axis is the last one).

    Returns the loss, as :func:`cross_entropy` would for the same logits.

    >>> import numpy as np, softmax_kernels as sk
    >>> x, w = np.ones((2, 3)), np.zeros((4, 3))
    >>> round(float(sk.linear_cross_entropy(x, w, np.array([0, 3]))), 6)  # log 4
    1.386294
    """
    return _linear_entry(
        x,
        linear_weight,
        target,
        want_grad=False,
        linear_bias=linear_bias,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        chunk_size=chunk_size,
        process_group=process_group,
        vocab_start=vocab_start,
        backend=backend,
    )


def linear_cross_entropy_with_grad(
    x: Any,
    linear_weight: Any,
    target: Any,
    *,
    linear_bias: Any = None,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    grad_scale: float = 1.0,
    process_group: Any = None,
    vocab_start: int | None = None,
    backend: str | None = None,
) -> Any:
    """The loss of :func:`linear_cross_entropy` and its gradients in one chunked pass:
    ``(loss, dx, dlinear_weight, dlinear_bias)``, each ``d(grad_scale * loss) / d input``
    (``dlinear_bias`` is None without a bias). ``dlinear_weight`` has the layout of
    ``linear_weight`` ((V, D) values; a transposed view gets a transposed result).

    >>> import numpy as np, softmax_kernels as sk
    >>> loss, dx, dw, db = sk.linear_cross_entropy_with_grad(
    ...     np.ones((2, 3)), np.zeros((4, 3)), np.array([0, 3]))
    >>> dw.shape, db is None
    ((4, 3), True)
    """
    return _linear_entry(
        x,
        linear_weight,
        target,
        want_grad=True,
        linear_bias=linear_bias,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        chunk_size=chunk_size,
        grad_scale=grad_scale,
        process_group=process_group,
        vocab_start=vocab_start,
        backend=backend,
    )


def release_cpu_buffers() -> None:
    """Hand the free blocks of the CPU output pool back to the operating system.

    CPU outputs of 256 KiB and more are taken from a pool of reused blocks (no page faults per
    call); a block returns to the pool when every view of the result is gone, and up to
    ``SOFTMAX_KERNELS_CPU_POOL_MB`` (default 1024, at most a quarter of the memory) of free blocks
    are kept. Blocks still in use are not affected.

    >>> import numpy as np
    >>> y = softmax(np.zeros((512, 512)))
    >>> del y
    >>> release_cpu_buffers()
    """
    _arrays.release_cpu_buffers()
