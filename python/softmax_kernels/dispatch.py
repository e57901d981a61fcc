"""Backend choice, in one place.

A backend is a module in ``softmax_kernels.backends`` that provides:

``NAME``
    its name.
``unavailable_reason() -> str | None``
    None when it can run on this machine at all, else why not and how to fix it.
``serve_reason(x) -> str | None``
    None when it can serve an input like ``x`` (array kind, device), else why not.
``softmax_fwd(x, out, *, scale, mask, is_log)``
    ``out = softmax(scale * x)`` (or log_softmax) over the rows of 2-D arrays.
``softmax_bwd(dy, y, out, *, scale, is_log)``
    ``out = scale * y * (dy - sum(dy * y))`` (softmax) or
    ``out = scale * (dy - exp(y) * sum(dy))`` (log_softmax).
``cross_entropy_fwd(logits, target, loss, grad, *, soft, weight, ignore_index,
label_smoothing, z_loss, grad_scale, denom)``
    per-row loss into ``loss`` and, when ``grad`` is not None, the gradient in the same pass.

The operands are 2-D ``(n_rows, n_cols)`` arrays of the caller's kind (NumPy, CuPy or torch) on
one device, prepared by ``softmax_kernels.api``: the last axis has unit stride, rows are addressed
by a non-negative row stride (views are not copied), outputs are C-contiguous and never alias an
input except ``grad is logits`` for in-place cross-entropy. A backend converts to its native array
type itself (zero-copy: ``.numpy()``, DLPack, raw pointers) and launches on the caller's stream.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

from . import _arrays
from .errors import BackendUnavailableError

BACKENDS = ("numpy", "triton", "cupy")
ENV_VAR = "SOFTMAX_KERNELS_BACKEND"

# Preference for backend=None on a CUDA input, per array kind: the backend whose native array
# type matches goes first (no DLPack hop); bench/NOTES.md records how they compare.
_GPU_PREFERENCE = {_arrays.TORCH: ("triton", "cupy"), _arrays.CUPY: ("cupy", "triton")}


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"softmax_kernels.backends.{name}_backend")


def check_name(name: Any) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    return name


def backend_status() -> dict[str, str | None]:
    """{name: None if usable here, else the reason it is not}."""
    return {name: _module(name).unavailable_reason() for name in BACKENDS}


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, e.g. ``['numpy']`` without a GPU.

    >>> import softmax_kernels as sk
    >>> 'numpy' in sk.available_backends()
    True
    """
    return [name for name, reason in backend_status().items() if reason is None]


def _explicit(name: str, x: Any) -> ModuleType:
    mod = _module(check_name(name))
    reason = mod.unavailable_reason() or mod.serve_reason(x)
    if reason is not None:
        kind = _arrays.kind_of(x)
        raise BackendUnavailableError(
            f"backend {name!r} cannot serve this input ({kind} array on "
            f"{_arrays.device_str(x)}): {reason}"
        )
    return mod


def select(backend: str | None, x: Any) -> ModuleType:
    """The backend module that runs an op on input ``x``.

    An explicit ``backend`` (or ``$SOFTMAX_KERNELS_BACKEND`` when ``backend`` is None) must be
    able to serve ``x``, else BackendUnavailableError. Otherwise: CPU arrays go to NumPy, CUDA
    arrays to the first usable GPU backend in ``_GPU_PREFERENCE``.
    """
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
    if backend is not None:
        return _explicit(backend, x)
    if not _arrays.is_cuda(x):
        return _module("numpy")
    reasons = []
    for name in _GPU_PREFERENCE[_arrays.kind_of(x)]:
        mod = _module(name)
        reason = mod.unavailable_reason() or mod.serve_reason(x)
        if reason is None:
            return mod
        reasons.append(f"{name}: {reason}")
    raise BackendUnavailableError(
        "no backend can serve this CUDA array: "
        + "; ".join(reasons)
        + ". Install triton or cupy (pip install 'softmax-kernels[triton]' or "
        "'softmax-kernels[cupy-cuda13]'), or move the data to the CPU."
    )
