"""Backend choice, in one place, and the interface every backend implements.

A backend is a module in ``softmax_kernels.backends`` that provides the functions below. The
operands are 2-D ``(n_rows, n_cols)`` arrays of the caller's kind (NumPy, CuPy or torch) on one
device, prepared by ``softmax_kernels._core``: the last axis has unit stride, rows are addressed
by a non-negative row stride (views are not copied), outputs are C-contiguous. A backend
converts to its native array type itself (zero-copy: ``.numpy()``, DLPack, raw pointers) and
launches on the caller's stream. Nothing synchronises with the host. Half types are computed in
float32, float64 in float64 ("compute dtype"); results are bitwise deterministic run to run.

``NAME``
    its name.
``unavailable_reason() -> str | None``
    None when it can run on this machine at all, else why not and how to fix it.
``serve_reason(x) -> str | None``
    None when it can serve an input like ``x`` (array kind, device), else why not.

``softmax_fwd(x, out, *, scale, mask, is_log)``
    ``out = softmax(scale * x)`` (or log_softmax) over each row; ``mask`` (bool rows, row
    stride may be 0) False entries get 0 / -inf, also in a row that holds a NaN elsewhere; a row
    with no True entry gives all 0 / all -inf. ``out`` may be ``x``'s memory.
``softmax_bwd(dy, y, out, *, scale, is_log)``
    ``out = scale * y * (dy - sum(dy * y))`` (softmax) or ``out = scale * (dy - exp(y) *
    sum(dy))`` (log_softmax, y its output). ``out`` may be ``dy``'s or ``y``'s memory. The row
    sums must meet the contract's bound also when they nearly cancel (accumulate them in float64
    or compensated for float32 data).

Cross-entropy. ``z = softcap * tanh(x / softcap)`` when ``softcap`` is a float (> 0), else
``z = x``; ``m = max(z)``, ``zs = z - m``, ``s = sum(exp(zs))``, ``log_s = log(s)``,
``lse = m + log_s``, ``p = exp(zs) / s``; ``eps = label_smoothing``, ``keep = 1 - eps``,
``w`` = ``weight`` (or ones), ``W = sum(w)``, ``C = n_cols``::

    class target t:  loss = keep w_t (log_s - zs_t) + eps/C (W log_s - sum_c w_c zs_c)
                     a    = keep w_t + eps/C W                  (the coefficient of p)
                     grad = a p - keep w_t onehot_t - eps/C w
                     the target entry as (a - keep w_t) p_t - keep w_t (1 - p_t), with
                     1 - p_t = -expm1(zs_t - log_s): never a rounded p_t - 1
    soft target q:   q' = keep q + eps/C,  loss = log_s sum(w q') - sum(w q' zs)
                     a = sum(w q'),  grad = a p - w q'
    z-loss:          loss += z_loss lse^2,  a += 2 z_loss lse
    softcap:         grad *= 1 - (z / softcap)^2                (dz/dx)

then ``grad *= grad_scale`` (``/ denom`` for reduction "mean"). A target equal to
``ignore_index`` (class targets only) counts for nothing: loss 0, gradient row 0, and its logits
need not be read. A class target outside ``[0, C)`` that is not ``ignore_index``: that row's
loss and gradient row are NaN, and nothing is read or written through it.

``cross_entropy_fwd(logits, target, *, loss, grad, lse, soft, weight, ignore_index,
label_smoothing, z_loss, softcap, grad_scale, reduction, denom)``
    ``target``: int32/int64 ``(n_rows,)`` contiguous, or (``soft``) probability rows in the
    logits' dtype with their own row stride. ``weight``: ``(C,)`` contiguous, compute dtype, or
    None. ``loss`` (output, compute dtype): ``(n_rows,)`` per-row losses for reduction "none",
    else a 0-d array receiving the reduced loss: "sum" the sum of the row losses; "mean" that
    sum divided by ``denom`` = the summed ``w_t`` of the counted rows (their count without a
    weight; ``n_rows`` for soft targets), and 0.0 when no row is counted (every target
    ignored). ``denom``: None (the backend computes it), or a 0-d compute-dtype device array to
    use instead (linear and vocabulary-parallel cross-entropy pass their global one; then
    "mean" divides by it and gives 0.0 where it is 0). ``grad``: None, or ``(n_rows, C)`` in the
    logits' dtype, C-contiguous, or the logits' own memory (in place: every logit of a row is
    read before any gradient element of that row is written). ``lse``: None, or ``(n_rows,)``
    compute dtype receiving every row's log-sum-exp of ``z`` (ignored rows included: with
    ``lse`` every row is read). GPU backends do the whole call, denominator and reduction
    included, in at most 2 kernel launches and no other device operation than allocations.

Vocabulary-parallel cross-entropy (``softmax_kernels._parallel`` merges the statistics of the
ranks; each rank's ``logits`` hold the classes ``[vocab_start, vocab_start + C)``, class
targets are global indices, ``t_local = t - vocab_start`` is owned when ``0 <= t_local < C``):

``cross_entropy_stats(logits, target, stats, *, soft, weight, ignore_index, vocab_start,
label_smoothing, softcap)``
    per row into ``stats`` (``(n_rows, K)`` C-contiguous, compute dtype; ``K`` from the flags):
    class targets ``[m, s, z_t - m, (w_t if weight), (sum_c w_c (z_c - m) if
    label_smoothing)]`` with ``z_t - m`` and ``w_t`` 0 unless this rank owns the target (``w_t``
    1 when owned without a weight); soft targets ``[m, s, sum_c w_c q_c, sum_c w_c q_c (z_c - m),
    (sum_c w_c (z_c - m) if label_smoothing)]``. ``m`` is the local max, ``s = sum(exp(z - m))``;
    every sum is taken relative to ``m`` (so the merge never cancels large logits), with 0 in
    place of ``m`` for a row of -inf (m = -inf, s = 0). Every row is read, rows with
    ``t == ignore_index`` too (the merged lse is returned for every row). Reads the logits (and
    soft targets) once.
``cross_entropy_grad(logits, target, grad, *, row_lse, row_coef, row_scale, soft, weight,
ignore_index, vocab_start, keep, eps_c, softcap, grad_scale)``
    ``grad = (row_coef p - keep w_t onehot_{t_local} - eps_c w) * grad_scale * row_scale``
    (soft: ``- w (keep q + eps_c)`` instead of the two middle terms), times the softcap
    chain rule, with ``p = exp(z - row_lse)`` and the owned target entry as in
    ``cross_entropy_fwd`` (``1 - p_t = -expm1(z_t - row_lse)``). ``row_lse``, ``row_coef``:
    ``(n_rows,)`` compute dtype (the global lse, NaN for a row with a bad target, and ``a``);
    ``row_scale``: 0-d compute-dtype device array (1 / denom for "mean", else 1);
    ``keep = 1 - eps`` (a host float); ``eps_c = eps / C_global``: a 0-d compute-dtype device
    array like ``row_scale`` (the global class count is known only on the device, after the
    gather), read by the kernel. Ignored rows: 0. ``grad`` may be the logits' memory. Reads the
    logits (and soft targets) once, writes the gradient once.
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


def _explicit(name: str, x: Any, source: str) -> ModuleType:
    """The backend named by the caller (source: how it was named, for the message). The array
    kind is checked first: installing a package or finding a GPU would not make a backend serve
    an array kind it never takes."""
    mod = _module(check_name(name))
    reason = mod.serve_reason(x) or mod.unavailable_reason()
    if reason is not None:
        kind = _arrays.kind_of(x)
        raise BackendUnavailableError(
            f"backend {name!r} cannot serve this input ({kind} array on "
            f"{_arrays.device_str(x)}; {source}): {reason}"
        )
    return mod


def select(backend: str | None, x: Any) -> ModuleType:
    """The backend module that runs an op on input ``x``.

    An explicit ``backend`` (or ``$SOFTMAX_KERNELS_BACKEND`` when ``backend`` is None) must be
    able to serve ``x``, else BackendUnavailableError. Otherwise: CPU arrays go to NumPy, CUDA
    arrays to the first usable GPU backend in ``_GPU_PREFERENCE``.
    """
    if backend is not None:
        return _explicit(backend, x, "named by backend=")
    env = os.environ.get(ENV_VAR) or None
    if env is not None:
        return _explicit(env, x, f"named by {ENV_VAR}={env} in the environment")
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
