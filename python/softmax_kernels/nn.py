"""Drop-in ``torch.nn`` modules backed by softmax_kernels (``sk.nn``; needs torch).

``sk.nn.Softmax``, ``sk.nn.LogSoftmax`` and ``sk.nn.CrossEntropyLoss`` take the arguments of their
``torch.nn`` namesakes and give the same outputs and gradients (through the custom ops of
``softmax_kernels.torch_ops``, so they also work under ``torch.compile(fullgraph=True)``).

Differences from torch, all deliberate:

* ``Softmax``/``LogSoftmax`` default to ``dim=-1`` (torch's default is ``None``). An explicit
  ``dim=None`` does what torch does: it warns and picks dim 0 for 0-, 1- and 3-d input, else 1.
  ``dim`` may also be a tuple (softmax over those dims jointly).
* ``CrossEntropyLoss`` has an extra ``z_loss`` (PaLM z-loss ``z_loss * lse**2`` per counted row)
  and no deprecated ``size_average``/``reduce``. Its loss is float32 for float16/bfloat16 input
  (float64 for float64), where torch returns the input's dtype; ``reduction="mean"`` with every
  target ignored gives 0 (torch: NaN).
* Every module takes a keyword-only ``backend`` ("numpy", "triton", "cupy" or None for automatic).

>>> import torch, softmax_kernels as sk
>>> loss = sk.nn.CrossEntropyLoss()(torch.zeros(2, 4), torch.tensor([0, 3]))
>>> round(float(loss), 4)  # log 4
1.3863
"""

import warnings

import torch

from . import api

__all__ = ["Softmax", "LogSoftmax", "CrossEntropyLoss"]


def _implicit_dim(name: str, ndim: int) -> int:
    # torch.nn.functional._get_softmax_dim, for drop-in behaviour of dim=None.
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. "
        "Change the call to include dim=X as an argument.",
        stacklevel=6,  # _implicit_dim, _dim, forward, _call_impl, _wrapped_call_impl, caller
    )
    return 0 if ndim in (0, 1, 3) else 1


class Softmax(torch.nn.Module):
    """``softmax`` over ``dim`` (an int, or a tuple of dims reduced jointly); as
    ``torch.nn.Softmax`` but with ``dim=-1`` by default.

    >>> import torch, softmax_kernels as sk
    >>> sk.nn.Softmax(dim=1)(torch.zeros(1, 2))
    tensor([[0.5000, 0.5000]])
    """

    __constants__ = ["dim"]
    _name = "softmax"

    def __init__(self, dim=-1, *, backend=None) -> None:
        super().__init__()
        self.dim = dim
        self.backend = backend

    def _dim(self, x):
        dim = _implicit_dim(self._name, x.dim()) if self.dim is None else self.dim
        if x.dim() == 0 and dim in (0, -1):
            return None  # torch accepts dim 0 / -1 for a 0-d tensor: its one element
        return dim

    def forward(self, input):
        return api.softmax(input, self._dim(input), backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class LogSoftmax(Softmax):
    """``log_softmax`` over ``dim``; as ``torch.nn.LogSoftmax`` but with ``dim=-1`` by default.

    >>> import torch, softmax_kernels as sk
    >>> sk.nn.LogSoftmax()(torch.zeros(1, 2))
    tensor([[-0.6931, -0.6931]])
    """

    _name = "log_softmax"

    def forward(self, input):
        return api.log_softmax(input, self._dim(input), backend=self.backend)


class CrossEntropyLoss(torch.nn.Module):
    """As ``torch.nn.CrossEntropyLoss``, plus ``z_loss``.

    Input ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` (the class dim is 1, as in torch);
    target class indices ``()``, ``(N,)`` or ``(N, d1, ..., dk)``, or class probabilities of the
    input's shape. ``reduction="none"`` gives ``()``, ``(N,)`` or ``(N, d1, ..., dk)``.

    >>> import torch, softmax_kernels as sk
    >>> x = torch.zeros(2, 3, 5)  # (N, C, d1)
    >>> sk.nn.CrossEntropyLoss(reduction="none")(x, torch.zeros(2, 5, dtype=torch.long)).shape
    torch.Size([2, 5])
    """

    __constants__ = ["ignore_index", "reduction", "label_smoothing", "z_loss"]

    def __init__(
        self,
        weight=None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        *,
        backend=None,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.backend = backend

    def forward(self, input, target):
        logits = input
        if input.dim() > 2:  # torch's (N, C, d1, ...): the kernels want the class dim last
            logits = input.movedim(1, -1)
            if target.is_floating_point():
                target = target.movedim(1, -1)
        return api.cross_entropy(
            logits,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        parts = [f"reduction={self.reduction!r}"]
        if self.ignore_index != -100:
            parts.append(f"ignore_index={self.ignore_index}")
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss}")
        return ", ".join(parts)
