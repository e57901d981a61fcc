"""The implementations the benchmark runs, by provider name.

A provider turns an op and its input arrays into a callable that runs the op once and returns
its result: an array (softmax / log_softmax, forward or backward), the loss (``ce_fwd``) or
``(loss, dlogits)`` (``ce_fwd_grad``). Every CE provider computes the mean loss over all rows
(no ignored targets) and its gradient ``(softmax(x) - onehot(t)) / n_rows``.

Inputs arrive as the run's arrays: torch CUDA tensors on a GPU; NumPy arrays on the CPU (torch
CPU tensors for bfloat16, which NumPy lacks). Anything a provider needs to convert or allocate
is done when it is built, outside the timed call. Optional libraries are imported when a
provider is asked whether it can run, never at import time.

``ours-*`` call the public softmax_kernels API with an explicit backend; each result, like the
outputs it allocates, is fresh ("as called"); ``ours-numpy-torch`` is ``ours-numpy`` on torch CPU
tensors (zero-copy views of the same inputs). ``ours-numpy-out`` is the same backend *kernel
only*: outputs allocated once when it is built -- ``out=`` for softmax, log_softmax and the
backward passes (the public API, which then allocates nothing), and for cross-entropy, which has
no ``out=``, the backend's own ``cross_entropy_fwd`` with a preallocated loss and gradient
(skipping only the API's argument checks and dispatch, microseconds). ``torch-out`` is torch
the same way (``torch.ops.aten._softmax.out`` and friends); torch has no ``out=`` for
cross-entropy, so there its as-called row is the comparison. The peers:

- ``torch``: torch.softmax / log_softmax, torch._softmax_backward_data /
  _log_softmax_backward_data, F.cross_entropy, and autograd (torch.autograd.grad) for the CE
  gradient.
- ``torch.compile``: the same functions under ``torch.compile(dynamic=False)``, compiled once
  per shape (as a model with static shapes would be); the CE gradient through AOTAutograd.
- ``liger``: Liger-Kernel's LigerCrossEntropyFunction (and LigerSoftmaxFunction when present).
- ``cupyx``: cupyx.scipy.special.softmax / log_softmax on the same memory (DLPack), on torch's
  current stream.
- ``scipy`` (CPU): scipy.special.softmax / log_softmax; for the backward and CE ops, which SciPy
  does not have, the plain NumPy expression a SciPy user writes (see ``_scipy_fn``).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FWD_OPS = ("softmax_fwd", "log_softmax_fwd")
BWD_OPS = ("softmax_bwd", "log_softmax_bwd")
CE_OPS = ("ce_fwd", "ce_fwd_grad")

# (status, message) when a provider cannot run a point; status "unavailable" (library or backend
# missing here) or "unsupported" (the provider has no such op or dtype).
Skip = tuple[str, str]


@dataclass
class Provider:
    name: str
    label: str
    devices: tuple[str, ...]
    ours: bool
    # (op, dtype, device) -> None if it can run the point, else (status, message)
    can_run: Callable[[str, str, str], Skip | None]
    # (op, data, device) -> callable running the op once
    build: Callable[[str, dict[str, Any], str], Callable[[], Any]]
    # op -> what is called, for the results
    impl: Callable[[str], str]
    # True when a call overwrites its input (it then gets its own copy of the inputs)
    mutates_input: bool = False
    # torch.compile: reset dynamo's caches before each build (one compiled shape at a time)
    compiles: bool = False
    # outputs preallocated once (the "kernel only" figure), not allocated by every call
    kernel_only: bool = False


def _has(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def _torch():
    import torch

    return torch


def _as_torch(a):
    """A torch view of a NumPy array (zero-copy), or the tensor itself."""
    torch = _torch()
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(a)


# ----------------------------------------------------------------------------------------------
# ours: the public softmax_kernels API


_SK_IMPL = {
    "softmax_fwd": "sk.softmax",
    "log_softmax_fwd": "sk.log_softmax",
    "softmax_bwd": "sk.softmax_backward",
    "log_softmax_bwd": "sk.log_softmax_backward",
    "ce_fwd": "sk.cross_entropy",
    "ce_fwd_grad": "sk.cross_entropy_with_grad",
}


_SK_AVAILABLE: list = []


def sk_available() -> tuple[list[str], str | None]:
    """(sk.available_backends(), None), or ([], why) when softmax_kernels cannot say; asked
    once per run."""
    if not _SK_AVAILABLE:
        try:
            import softmax_kernels as sk

            _SK_AVAILABLE.append((sk.available_backends(), None))
        except Exception as e:  # noqa: BLE001 - a broken install must not stop the peers
            _SK_AVAILABLE.append(([], f"softmax_kernels failed: {type(e).__name__}: {e}"))
    return _SK_AVAILABLE[0]


def _ours(backend: str, devices: tuple[str, ...]) -> Provider:
    def can_run(op, dtype, device):
        avail, err = sk_available()
        if err:
            return None  # cannot tell: try it, and any failure is recorded at the point
        if backend not in avail:
            return (
                "unavailable",
                f"backend {backend!r} is not available here (sk.available_backends() = {avail})",
            )
        return None

    def build(op, d, device):
        import softmax_kernels as sk

        b = backend
        if op == "softmax_fwd":
            x = d["x"]
            return lambda: sk.softmax(x, backend=b)
        if op == "log_softmax_fwd":
            x = d["x"]
            return lambda: sk.log_softmax(x, backend=b)
        if op == "softmax_bwd":
            dy, y = d["dy"], d["y"]
            return lambda: sk.softmax_backward(dy, y, backend=b)
        if op == "log_softmax_bwd":
            dy, y = d["dy"], d["y"]
            return lambda: sk.log_softmax_backward(dy, y, backend=b)
        x, t = d["x"], d["t"]
        if op == "ce_fwd":
            return lambda: sk.cross_entropy(x, t, backend=b)
        return lambda: sk.cross_entropy_with_grad(x, t, backend=b)

    return Provider(
        name=f"ours-{backend}",
        label=f"ours ({backend})",
        devices=devices,
        ours=True,
        can_run=can_run,
        build=build,
        impl=lambda op: f"{_SK_IMPL[op]}(backend={backend!r})",
    )


def _empty_like(a):
    import numpy as np

    return np.empty_like(a) if isinstance(a, np.ndarray) else a.new_empty(a.shape)


def _loss_buffer(x, shape):
    """A loss buffer of the compute dtype (float64 for float64 logits, else float32), of x's
    kind."""
    import numpy as np

    if isinstance(x, np.ndarray):
        return np.empty(shape, np.float64 if x.dtype == np.float64 else np.float32)
    torch = _torch()
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.empty(shape, dtype=dt, device=x.device)


def _ce_kernel_only(backend: str, op: str, d):
    """The backend's cross_entropy_fwd on preallocated loss (and gradient) buffers: mean loss
    over all rows, gradient (softmax - onehot) / n_rows, as every CE provider computes."""
    import inspect

    mod = importlib.import_module(f"softmax_kernels.backends.{backend}_backend")
    fn = mod.cross_entropy_fwd
    params = inspect.signature(fn).parameters
    x, t = d["x"], d["t"]
    n = int(x.shape[0])
    grad = _empty_like(x) if op == "ce_fwd_grad" else None
    kw = {"grad": grad, "lse": None, "soft": False, "weight": None, "ignore_index": -100,
          "label_smoothing": 0.0, "z_loss": 0.0, "softcap": None, "denom": None}  # fmt: skip
    if "reduction" in params:  # the backend reduces: a 0-d loss, the gradient divided by n
        loss = _loss_buffer(x, ())
        kw.update(loss=loss, reduction="mean", grad_scale=1.0)
    else:  # older interface: per-row losses, the mean (O(rows)) taken here
        loss = _loss_buffer(x, (n,))
        kw.update(loss=loss, grad_scale=1.0 / n)
    kw = {k: v for k, v in kw.items() if k in params}

    def run():
        fn(x, t, **kw)
        out = loss if "reduction" in params else loss.mean()
        return out if grad is None else (out, grad)

    return run


def _ours_out(backend: str, devices: tuple[str, ...]) -> Provider:
    base = _ours(backend, devices)

    def build(op, d, device):
        import softmax_kernels as sk

        b = backend
        if op in FWD_OPS:
            x = d["x"]
            out = _empty_like(x)
            f = sk.softmax if op == "softmax_fwd" else sk.log_softmax
            return lambda: f(x, out=out, backend=b)
        if op in BWD_OPS:
            dy, y = d["dy"], d["y"]
            out = _empty_like(y)
            f = sk.softmax_backward if op == "softmax_bwd" else sk.log_softmax_backward
            return lambda: f(dy, y, out=out, backend=b)
        return _ce_kernel_only(backend, op, d)

    def impl(op):
        if op in CE_OPS:
            return f"softmax_kernels.backends.{backend}_backend.cross_entropy_fwd(preallocated)"
        return f"{_SK_IMPL[op]}(out=preallocated, backend={backend!r})"

    return Provider(
        name=f"ours-{backend}-out",
        label=f"ours ({backend}, kernel only)",
        devices=devices,
        ours=True,
        can_run=base.can_run,
        build=build,
        impl=impl,
        kernel_only=True,
    )


def _ours_torch_cpu() -> Provider:
    """ours-numpy on torch CPU tensors (zero-copy views of the run's NumPy inputs), as called:
    the figure behind "torch CPU tensors through sk as fast as NumPy arrays through sk"."""
    base = _ours("numpy", ("cpu",))

    def build(op, d, device):
        return base.build(op, {k: _as_torch(v) for k, v in d.items()}, device)

    return Provider(
        name="ours-numpy-torch",
        label="ours (numpy, torch CPU tensors)",
        devices=("cpu",),
        ours=True,
        can_run=lambda op, dt, dev: _torch_can_run(op, dt, dev) or base.can_run(op, dt, dev),
        build=build,
        impl=lambda op: f"{_SK_IMPL[op]}(torch CPU tensor, backend='numpy')",
    )


# ----------------------------------------------------------------------------------------------
# torch eager and torch.compile


_TORCH_FNS: dict[str, Callable] = {}


def _torch_fns() -> dict[str, Callable]:
    """The torch functions per op, made once (stable code objects for torch.compile), with
    torch bound as a closure variable rather than imported inside the traced function."""
    if not _TORCH_FNS:
        torch = _torch()
        F = torch.nn.functional

        def softmax(x):
            return torch.softmax(x, -1)

        def log_softmax(x):
            return torch.log_softmax(x, -1)

        def softmax_bwd(dy, y):
            return torch._softmax_backward_data(dy, y, -1, y.dtype)

        def log_softmax_bwd(dy, y):
            return torch._log_softmax_backward_data(dy, y, -1, y.dtype)

        def ce(x, t):
            return F.cross_entropy(x, t)

        _TORCH_FNS.update(
            softmax_fwd=softmax,
            log_softmax_fwd=log_softmax,
            softmax_bwd=softmax_bwd,
            log_softmax_bwd=log_softmax_bwd,
            ce_fwd=ce,
            ce_fwd_grad=ce,
        )
    return _TORCH_FNS


_TORCH_IMPL = {
    "softmax_fwd": "torch.softmax",
    "log_softmax_fwd": "torch.log_softmax",
    "softmax_bwd": "torch._softmax_backward_data",
    "log_softmax_bwd": "torch._log_softmax_backward_data",
    "ce_fwd": "F.cross_entropy",
    "ce_fwd_grad": "F.cross_entropy + torch.autograd.grad",
}


def _torch_can_run(op, dtype, device):
    if not _has("torch"):
        return ("unavailable", "torch is not installed")
    return None


def _torch_build(compiled: bool):
    def build(op, d, device):
        torch = _torch()
        fn = _torch_fns()[op]
        if compiled:
            fn = torch.compile(fn, dynamic=False)
        if op in FWD_OPS:
            x = _as_torch(d["x"])
            return lambda: fn(x)
        if op in BWD_OPS:
            dy, y = _as_torch(d["dy"]), _as_torch(d["y"])
            return lambda: fn(dy, y)
        x, t = _as_torch(d["x"]), _as_torch(d["t"])
        if op == "ce_fwd":
            return lambda: fn(x, t)
        xl = x.detach().requires_grad_(True)

        def fwd_grad():
            loss = fn(xl, t)
            (g,) = torch.autograd.grad(loss, xl)
            return loss.detach(), g

        return fwd_grad

    return build


_TORCH_OUT_IMPL = {
    "softmax_fwd": "aten._softmax.out",
    "log_softmax_fwd": "aten._log_softmax.out",
    "softmax_bwd": "aten._softmax_backward_data.out",
    "log_softmax_bwd": "aten._log_softmax_backward_data.out",
}


def _torch_out_can_run(op, dtype, device):
    r = _torch_can_run(op, dtype, device)
    if r is not None:
        return r
    if op in CE_OPS:
        return ("unsupported", "torch has no out= for cross_entropy (its as-called row compares)")
    return None


def _torch_out_build(op, d, device):
    aten = _torch().ops.aten
    if op in FWD_OPS:
        x = _as_torch(d["x"])
        out = x.new_empty(x.shape)
        f = aten._softmax.out if op == "softmax_fwd" else aten._log_softmax.out
        return lambda: f(x, -1, False, out=out)
    dy, y = _as_torch(d["dy"]), _as_torch(d["y"])
    out = y.new_empty(y.shape)
    if op == "softmax_bwd":
        return lambda: aten._softmax_backward_data.out(dy, y, -1, y.dtype, grad_input=out)
    return lambda: aten._log_softmax_backward_data.out(dy, y, -1, y.dtype, out=out)


def _compile_can_run(op, dtype, device):
    r = _torch_can_run(op, dtype, device)
    if r is not None:
        return r
    if device != "cuda":
        return ("unsupported", "torch.compile is benchmarked on the GPU only")
    if not _has("triton"):
        return ("unavailable", "torch.compile (inductor) needs triton")
    return None


# ----------------------------------------------------------------------------------------------
# Liger-Kernel


def _liger_ce():
    return importlib.import_module("liger_kernel.ops.cross_entropy").LigerCrossEntropyFunction


def _liger_softmax():
    try:
        return importlib.import_module("liger_kernel.ops.softmax").LigerSoftmaxFunction
    except (ImportError, AttributeError):
        return None


def _first(r):
    # LigerCrossEntropyFunction returns the loss, or (loss, z_loss, ...) depending on version
    return r[0] if isinstance(r, (tuple, list)) else r


def _liger_can_run(op, dtype, device):
    if device != "cuda":
        return ("unsupported", "Liger-Kernel runs on the GPU only")
    if not _has("liger_kernel"):
        return ("unavailable", "liger_kernel is not installed (pip install liger-kernel)")
    if op in CE_OPS:
        try:
            _liger_ce()
        except Exception as e:  # noqa: BLE001 - any import failure makes it unavailable
            return ("unavailable", f"liger_kernel.ops.cross_entropy does not import: {e}")
        return None
    if op == "softmax_fwd":
        if _liger_softmax() is None:
            return ("unsupported", "this liger_kernel has no LigerSoftmaxFunction")
        return None
    return ("unsupported", f"Liger-Kernel has no standalone {op}")


def _liger_build(op, d, device):
    torch = _torch()
    if op == "softmax_fwd":
        f = _liger_softmax()
        x = d["x"]
        return lambda: f.apply(x)
    ce = _liger_ce()
    # Liger writes the gradient into the logits' memory: it runs on its own copy (see
    # mutates_input), and calls after the first see gradients, not logits (same traffic).
    x, t = d["x"], d["t"]
    if op == "ce_fwd":
        return lambda: _first(ce.apply(x, t))
    xl = x.detach().requires_grad_(True)

    def fwd_grad():
        loss = _first(ce.apply(xl, t))
        (g,) = torch.autograd.grad(loss, xl)
        return loss.detach(), g

    return fwd_grad


# ----------------------------------------------------------------------------------------------
# cupyx.scipy.special


def _cupyx_can_run(op, dtype, device):
    if device != "cuda":
        return ("unsupported", "cupyx runs on the GPU only")
    if op not in FWD_OPS:
        return ("unsupported", f"cupyx.scipy.special has no {op}")
    if dtype == "bf16":
        return ("unsupported", "CuPy has no bfloat16")
    if not _has("cupy"):
        return ("unavailable", "cupy is not installed")
    try:
        importlib.import_module("cupyx.scipy.special")
    except Exception as e:  # noqa: BLE001 - broken CUDA setups raise all sorts of errors
        return ("unavailable", f"cupyx.scipy.special does not import: {e}")
    return None


def _cupyx_build(op, d, device):
    import cupy
    import cupyx.scipy.special as cs

    torch = _torch()
    f = cs.softmax if op == "softmax_fwd" else cs.log_softmax
    xc = cupy.from_dlpack(d["x"])
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)

    def run():
        with stream:
            return f(xc, axis=-1)

    return run


# ----------------------------------------------------------------------------------------------
# SciPy (CPU)


def _scipy_can_run(op, dtype, device):
    if device != "cpu":
        return ("unsupported", "SciPy runs on the CPU only")
    if dtype == "bf16":
        return ("unsupported", "NumPy/SciPy have no bfloat16")
    if not _has("scipy"):
        return ("unavailable", "scipy is not installed (pip install scipy)")
    return None


_SCIPY_IMPL = {
    "softmax_fwd": "scipy.special.softmax",
    "log_softmax_fwd": "scipy.special.log_softmax",
    "softmax_bwd": "NumPy: y * (dy - (dy * y).sum(-1))",
    "log_softmax_bwd": "NumPy: dy - exp(y) * dy.sum(-1)",
    "ce_fwd": "scipy.special.log_softmax + NumPy gather, mean",
    "ce_fwd_grad": "scipy.special.log_softmax + NumPy gather; grad = (exp(lp) - onehot) / N",
}


def _scipy_build(op, d, device):
    import numpy as np
    import scipy.special as ss

    if op == "softmax_fwd":
        x = d["x"]
        return lambda: ss.softmax(x, axis=-1)
    if op == "log_softmax_fwd":
        x = d["x"]
        return lambda: ss.log_softmax(x, axis=-1)
    if op == "softmax_bwd":
        dy, y = d["dy"], d["y"]
        return lambda: y * (dy - (dy * y).sum(axis=-1, keepdims=True))
    if op == "log_softmax_bwd":
        dy, y = d["dy"], d["y"]
        return lambda: dy - np.exp(y) * dy.sum(axis=-1, keepdims=True)
    x, t = d["x"], d["t"]
    n = x.shape[0]
    rows = np.arange(n)

    def ce():
        lp = ss.log_softmax(x, axis=-1)
        return -lp[rows, t].mean()

    def ce_grad():
        lp = ss.log_softmax(x, axis=-1)
        loss = -lp[rows, t].mean()
        g = np.exp(lp)
        g[rows, t] -= 1
        g /= n
        return loss, g

    return ce if op == "ce_fwd" else ce_grad


# ----------------------------------------------------------------------------------------------
# The registry


def _default_providers() -> dict[str, Provider]:
    torch_impl = _TORCH_IMPL.__getitem__
    ps = [
        _ours("numpy", ("cpu",)),
        _ours_out("numpy", ("cpu",)),
        _ours_torch_cpu(),
        _ours("triton", ("cuda",)),
        _ours("cupy", ("cuda",)),
        Provider(
            "torch", "torch", ("cpu", "cuda"), False, _torch_can_run, _torch_build(False),
            torch_impl,
        ),
        Provider(
            "torch-out", "torch (kernel only)", ("cpu",), False, _torch_out_can_run,
            _torch_out_build, lambda op: _TORCH_OUT_IMPL.get(op, "n/a"), kernel_only=True,
        ),
        Provider(
            "torch.compile", "torch.compile", ("cuda",), False, _compile_can_run,
            _torch_build(True), lambda op: f"torch.compile({torch_impl(op)}, dynamic=False)",
            compiles=True,
        ),
        Provider(
            "liger", "Liger-Kernel", ("cuda",), False, _liger_can_run, _liger_build,
            lambda op: "LigerSoftmaxFunction" if op == "softmax_fwd"
            else "LigerCrossEntropyFunction",
            mutates_input=True,
        ),
        Provider(
            "cupyx", "cupyx.scipy", ("cuda",), False, _cupyx_can_run, _cupyx_build,
            lambda op: f"cupyx.scipy.special.{op.replace('_fwd', '')}",
        ),
        Provider(
            "scipy", "SciPy", ("cpu",), False, _scipy_can_run, _scipy_build,
            _SCIPY_IMPL.__getitem__,
        ),
    ]  # fmt: skip
    return {p.name: p for p in ps}


PROVIDERS: dict[str, Provider] = _default_providers()


def register(p: Provider) -> None:
    """Add a provider (tests use this to plant a wrong one)."""
    PROVIDERS[p.name] = p


def default_names(device: str) -> list[str]:
    return [n for n, p in PROVIDERS.items() if device in p.devices]


def resolve(names: list[str] | None, device: str) -> list[str]:
    """Provider names for --providers: 'ours' means every ours-* of the device, 'all' all."""
    if not names or names == ["all"]:
        return default_names(device)
    out = []
    for n in names:
        if n == "ours":
            out += [p for p in default_names(device) if PROVIDERS[p].ours]
        elif n in PROVIDERS:
            out.append(n)
        else:
            valid = ", ".join(["ours", "all", *PROVIDERS])
            raise ValueError(f"unknown provider {n!r}; valid: {valid}")
    return list(dict.fromkeys(out))
