"""Drop-in ``torch.nn`` modules backed by softmax_kernels (``sk.nn``; needs torch:
``pip install 'softmax-kernels[torch]'``).

``sk.nn.Softmax``, ``sk.nn.LogSoftmax`` and ``sk.nn.CrossEntropyLoss`` take the arguments of their
``torch.nn`` namesakes and give the same outputs and gradients (through the custom ops of
``softmax_kernels.torch_ops``, so they also work under ``torch.compile(fullgraph=True)``).

Differences from torch, all deliberate:

* ``Softmax``/``LogSoftmax`` default to ``dim=-1`` (torch's default is ``None``). An explicit
  ``dim=None`` does what torch does: it warns and picks dim 0 for 0-, 1- and 3-d input, else 1.
  ``dim`` may also be a tuple (softmax over those dims jointly).
* ``CrossEntropyLoss`` has an extra ``z_loss`` (PaLM z-loss ``z_loss * lse**2`` per counted row),
  ``softcap`` (Gemma's ``c * tanh(x / c)`` first) and ``process_group`` / ``vocab_start``
  (vocabulary-parallel), and no deprecated ``size_average``/``reduce``.
* ``LinearCrossEntropyLoss`` (torch.nn has no such module) fuses a linear head with the loss.
* Losses are float32 for float16/bfloat16 input (float64 for float64), where torch returns the
  input's dtype; ``reduction="mean"`` with every target ignored gives 0 (torch: NaN).
* Every module takes a keyword-only ``backend`` ("numpy", "triton", "cupy" or None for automatic).

>>> import torch, softmax_kernels as sk
>>> loss = sk.nn.CrossEntropyLoss()(torch.zeros(2, 4), torch.tensor([0, 3]))
>>> round(float(loss), 4)  # log 4
1.3863
"""

import warnings

try:
    import torch
except ModuleNotFoundError as e:  # pragma: no cover - exercised in a subprocess test
    raise ModuleNotFoundError(
        "softmax_kernels.nn needs torch, which is not installed: pip install "
        "'softmax-kernels[torch]' (or torch itself; for a CPU-only build: pip install torch "
        "--index-url https://download.pytorch.org/whl/cpu)",
        name="torch",
    ) from e

from . import api

__all__ = ["Softmax", "LogSoftmax", "CrossEntropyLoss", "LinearCrossEntropyLoss"]


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
    """As ``torch.nn.CrossEntropyLoss``, plus ``z_loss``, ``softcap`` and vocabulary
    parallelism (``process_group``, ``vocab_start``: see :func:`softmax_kernels.cross_entropy`).

    Input ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` (the class dim is 1, as in torch);
    target class indices ``()``, ``(N,)`` or ``(N, d1, ..., dk)``, or class probabilities of the
    input's shape. ``reduction="none"`` gives ``()``, ``(N,)`` or ``(N, d1, ..., dk)``.

    >>> import torch, softmax_kernels as sk
    >>> x = torch.zeros(2, 3, 5)  # (N, C, d1)
    >>> sk.nn.CrossEntropyLoss(reduction="none")(x, torch.zeros(2, 5, dtype=torch.long)).shape
    torch.Size([2, 5])
    """

    __constants__ = ["ignore_index", "reduction", "label_smoothing", "z_loss", "softcap"]

    def __init__(
        self,
        weight=None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        *,
        process_group=None,
        vocab_start: int | None = None,
        backend=None,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.process_group = process_group
        self.vocab_start = vocab_start
        self.backend = backend

    def forward(self, input, target):
        # torch's layouts: (C,), (N, C) and (N, C, d1, ...): the class axis is 1 from 2-d on
        return api.cross_entropy(
            input,
            target,
            axis=1 if input.dim() >= 2 else 0,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            process_group=self.process_group,
            vocab_start=self.vocab_start,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return _options_repr(self)


class LinearCrossEntropyLoss(torch.nn.Module):
    """The loss of a linear head and cross-entropy in one chunked pass, without the ``(N, V)``
    logits (:func:`softmax_kernels.linear_cross_entropy`). Called as
    ``loss_fn(x, linear_weight, target, linear_bias=None)`` with ``x`` ``(..., D)``,
    ``linear_weight`` ``(V, D)`` (e.g. ``lm_head.weight``), class-index targets ``(...)`` or
    probabilities ``(..., V)``; gradients reach x, linear_weight and linear_bias.

    >>> import torch, softmax_kernels as sk
    >>> head = torch.nn.Linear(8, 11, bias=False)
    >>> x, t = torch.randn(4, 8), torch.tensor([0, 3, 10, -100])
    >>> loss = sk.nn.LinearCrossEntropyLoss()(x, head.weight, t)
    >>> loss.backward()
    >>> head.weight.grad.shape
    torch.Size([11, 8])
    """

    __constants__ = ["ignore_index", "reduction", "label_smoothing", "z_loss", "softcap"]

    def __init__(
        self,
        weight=None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        *,
        chunk_size: int | None = None,
        process_group=None,
        vocab_start: int | None = None,
        backend=None,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.process_group = process_group
        self.vocab_start = vocab_start
        self.backend = backend

    def forward(self, x, linear_weight, target, linear_bias=None):
        return api.linear_cross_entropy(
            x,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            chunk_size=self.chunk_size,
            process_group=self.process_group,
            vocab_start=self.vocab_start,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return _options_repr(self)


def _options_repr(m) -> str:
    parts = [f"reduction={m.reduction!r}"]
    if m.ignore_index != -100:
        parts.append(f"ignore_index={m.ignore_index}")
    if m.label_smoothing:
        parts.append(f"label_smoothing={m.label_smoothing}")
    if m.z_loss:
        parts.append(f"z_loss={m.z_loss}")
    if m.softcap is not None:
        parts.append(f"softcap={m.softcap}")
    return ", ".join(parts)
