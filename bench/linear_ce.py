"""Fused linear + cross-entropy, forward + backward: ``python -m bench --ops linear_ce``.

One call of every provider computes the mean cross-entropy of ``x @ W^T`` (``x`` (N, D),
``W`` (V, D), class-index targets, no bias) and its gradients ``dx`` (N, D) and ``dW`` (V, D):

- ``ours-<backend>``: ``sk.linear_cross_entropy_with_grad(x, W, t, backend=...)``, the chunked
  algorithm (per chunk: the logits GEMM, the fused CE kernel writing dZ in place, the dx GEMM,
  the dW GEMM), so 3 GEMMs of 2 N D V flops;
- ``ours-<backend>-autograd`` (torch tensors): ``sk.linear_cross_entropy(...)`` then
  ``torch.autograd.grad(loss, (x, W))`` (the custom op's fused forward computes the gradients;
  the backward scales them). ``autograd.grad`` rather than ``.backward()`` so that no call adds
  into the ``.grad`` of the one before (an extra read-modify-write of dW every call);
- ``torch``: ``F.cross_entropy(F.linear(x, W), t)`` and ``torch.autograd.grad`` (the (N, V)
  logits, their log-softmax and their gradient are held);
- ``torch.compile``: the same function under ``torch.compile(dynamic=False)``, compiled once per
  shape (its first call, the check, pays the compile);
- ``torch-lce``: ``torch.nn.functional.linear_cross_entropy(x, W, t,
  options=torch.nn.LinearCrossEntropyOptions())``, torch's chunked path (torch >= 2.13; skipped
  where absent);
- ``cs231n`` (CPU): CS231N's vectorised ``softmax_loss_vectorized(W, X, y, reg=0)`` of seed 003
  (copied from tests/test_linear_cross_entropy.py, its ``x.T`` typo read as ``X.T``), called with
  ``W.T`` (its (D, C) layout, a view). It computes the loss and dW only: **no dx**, 2 GEMMs.
  Ours always computes dx (a third GEMM); the speed-up over it is reported as measured, with
  that extra work on our side.

Units: milliseconds and GFLOP/s of the GEMMs the provider computes (3 x 2 N D V with dx, 2 x for
CS231N; the softmax work is O(N V), negligible beside D >= 256 flops per logit). GB/s is not
the unit here: the op is compute-bound.

Peak memory, the memory a call needs above its inputs (outputs and temporaries), in a call of
its own after the timing:

- GPU: ``torch.cuda.max_memory_allocated() - memory_allocated()`` before the call (the inputs),
  with the peak statistics reset before it; plus, when CuPy is loaded, the growth of CuPy's
  default pool (emptied before the call), which torch does not see;
- CPU, NumPy providers (ours-numpy, cs231n): ``tracemalloc``'s peak over the call (NumPy
  reports its buffers to tracemalloc; BLAS scratch it does not);
- CPU, every provider: the resident-set high-water mark of this process (``VmHWM`` of
  /proc/self/status, reset through /proc/self/clear_refs before the call) minus the resident
  set before it. torch allocates with malloc, which tracemalloc does not see; glibc's mmap
  threshold is pinned at 64 KiB first (mallopt) so that freed buffers go back to the system
  and the high-water mark of one call is not hidden by pages an earlier call left resident.

Correctness gate before timing, against float64 (NumPy on the CPU, torch on the GPU; never
softmax_kernels): the loss of every row (from the float64 lse of the full logits, computed in
row blocks), dx on a subset of rows and dW on a subset of classes (all of them at small
shapes). Loss within the contract's bound for the dtype; dx and dW within a relative
Frobenius-norm error of 10 x the dtype's rtol (float32/float64) or 2 x (half types), the bounds
of tests/test_linear_cross_entropy.py. A provider outside them is reported as a mismatch and not
timed.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import report
from .grids import DTYPES, TOLERANCES

OP = "linear_ce"


@dataclass(frozen=True)
class Shape:
    n: int  # rows (tokens)
    d: int  # features (hidden size)
    v: int  # classes (vocabulary)
    model: str = ""

    @property
    def gemm_flops(self) -> int:
        """Flops of one (N, D) x (D, V) GEMM: 2 N D V."""
        return 2 * self.n * self.d * self.v

    @property
    def key(self) -> str:
        return f"{self.n}x{self.d}x{self.v}"


# The shapes: the CPU target (CS231N-style, N=4096, D=256, V=32000 float32); on a GPU
# the Llama-3 8B head (D 4096, V 128256) at 4K-32K tokens and the Gemma-2 2B head (D 2304,
# V 256000) at 8K tokens, in bfloat16. --quick: a smaller CPU shape (the target needs ~4 min).
SHAPES: dict[tuple[str, bool], list[Shape]] = {
    ("cpu", False): [Shape(4096, 256, 32000, "issue 13 CPU target")],
    ("cpu", True): [Shape(1024, 256, 8000, "quick")],
    ("cuda", False): [Shape(n, 4096, 128256, "Llama-3 head") for n in (4096, 8192, 16384, 32768)]
    + [Shape(8192, 2304, 256000, "Gemma-2 head")],
    ("cuda", True): [Shape(4096, 4096, 128256, "Llama-3 head"),
                     Shape(8192, 2304, 256000, "Gemma-2 head")],
}  # fmt: skip
DEFAULT_DTYPE = {"cpu": "fp32", "cuda": "bf16"}
# Timed calls per provider after the check call (which is the warm-up): at the CPU target one
# call takes 3-25 s, so a few interleaved rounds; GPU calls are timed by bench/timing.CudaTimer.
CPU_REPS = {False: 3, True: 1}
BUDGET_S = {("cuda", False): 600.0, ("cuda", True): 180.0, ("cpu", False): 600.0,
            ("cpu", True): 60.0}  # fmt: skip

# Relative Frobenius-norm error allowed for dx and dW (tests/test_linear_cross_entropy.py):
# 10 x the contract's rtol for float32/float64, 2 x for the half types.
GRAD_REL = {k: (10 if k in ("fp32", "fp64") else 2) * TOLERANCES[k][1] for k in TOLERANCES}
# Rows (dx) and classes (dW) the gate compares; the loss is always checked over every row.
CHECK_ROWS = 64
CHECK_CLASSES = 64
# Elements of a float64 logits block of the reference (1 GiB).
REF_BLOCK_ELEMS = 1 << 27


# ----------------------------------------------------------------------------------------------
# CS231N, seed 003, as tests/test_linear_cross_entropy.py has it


def softmax_loss_vectorized(W, X, y, reg):
    """Seed 003's CS231N code, as given (its ``x.T`` typo read as ``X.T``)."""
    num_train = X.shape[0]
    scores = X.dot(W)
    shift_scores = scores - np.max(scores, axis=1).reshape(-1, 1)
    softmax_output = np.exp(shift_scores) / np.sum(np.exp(shift_scores), axis=1).reshape(-1, 1)
    loss = -np.sum(np.log(softmax_output[range(num_train), list(y)]))
    loss /= num_train
    loss += 0.5 * reg * np.sum(W * W)
    dS = softmax_output.copy()
    dS[range(num_train), list(y)] += -1
    dW = (X.T).dot(dS)
    dW = dW / num_train + reg * W
    return loss, dW


# ----------------------------------------------------------------------------------------------
# providers


@dataclass
class LceProvider:
    name: str
    label: str
    devices: tuple[str, ...]
    ours: bool
    gemms: int  # GEMMs of 2 N D V flops it computes: 3 (loss, dx, dW) or 2 (no dx)
    computes: str
    impl: str
    # (dtype, device) -> None, or (status, message) when it cannot run
    can_run: Callable[[str, str], tuple[str, str] | None]
    # (data, device) -> a callable running forward + backward once, returning
    # {"loss": scalar, "dx": (N, D) or None, "dw": (V, D)}
    build: Callable[[dict[str, Any], str], Callable[[], dict[str, Any]]]
    numpy_inputs: bool = False  # takes NumPy arrays (tracemalloc sees its buffers)
    compiles: bool = False


def _has(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def _sk_backends() -> tuple[list[str], str | None]:
    from .providers import sk_available

    return sk_available()


def _torch():
    import torch

    return torch


def _as_torch(a):
    torch = _torch()
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(a)


def _leaf(a):
    return _as_torch(a).detach().requires_grad_(True)


def _ours_can_run(backend: str, torch_needed: bool):
    def can_run(dtype, device):
        if torch_needed and not _has("torch"):
            return ("unavailable", "torch is not installed")
        if backend == "numpy" and dtype == "bf16":
            return ("unsupported", "NumPy has no bfloat16 (the torch path serves it)")
        avail, err = _sk_backends()
        if err is None and backend not in avail:
            return ("unavailable", f"backend {backend!r} is not available here "
                    f"(sk.available_backends() = {avail})")  # fmt: skip
        return None

    return can_run


def _ours(backend: str, devices: tuple[str, ...]) -> LceProvider:
    def build(d, device):
        import softmax_kernels as sk

        x, w, t = d["x"], d["w"], d["t"]
        if backend == "numpy":
            x, w, t = (np.asarray(a) for a in (x, w, t))

        def run():
            loss, dx, dw, _ = sk.linear_cross_entropy_with_grad(x, w, t, backend=backend)
            return {"loss": loss, "dx": dx, "dw": dw}

        return run

    return LceProvider(
        name=f"ours-{backend}", label=f"ours ({backend})", devices=devices, ours=True, gemms=3,
        computes="loss, dx, dW",
        impl=f"sk.linear_cross_entropy_with_grad(x, W, t, backend={backend!r})",
        can_run=_ours_can_run(backend, backend != "numpy"), build=build,
        numpy_inputs=backend == "numpy",
    )  # fmt: skip


def _ours_autograd(backend: str, devices: tuple[str, ...]) -> LceProvider:
    def build(d, device):
        import softmax_kernels as sk

        torch = _torch()
        x, w, t = _leaf(d["x"]), _leaf(d["w"]), _as_torch(d["t"])

        def run():
            loss = sk.linear_cross_entropy(x, w, t, backend=backend)
            dx, dw = torch.autograd.grad(loss, (x, w))
            return {"loss": loss.detach(), "dx": dx, "dw": dw}

        return run

    return LceProvider(
        name=f"ours-{backend}-autograd", label=f"ours ({backend}, torch autograd)",
        devices=devices, ours=True, gemms=3, computes="loss, dx, dW",
        impl=f"sk.linear_cross_entropy(x, W, t, backend={backend!r}) + torch.autograd.grad",
        can_run=_ours_can_run(backend, True), build=build,
    )  # fmt: skip


_TORCH_FN: list = []


def _torch_fn():
    """F.cross_entropy(F.linear(x, W), t), one function object (torch.compile caches on it)."""
    if not _TORCH_FN:
        F = _torch().nn.functional

        def linear_ce(x, w, t):
            return F.cross_entropy(F.linear(x, w), t)

        _TORCH_FN.append(linear_ce)
    return _TORCH_FN[0]


def _torch_can_run(dtype, device):
    if not _has("torch"):
        return ("unavailable", "torch is not installed")
    return None


def _torch_build(compiled: bool):
    def build(d, device):
        torch = _torch()
        fn = _torch_fn()
        if compiled:
            torch._dynamo.reset()  # one compiled shape at a time
            fn = torch.compile(fn, dynamic=False)
        x, w, t = _leaf(d["x"]), _leaf(d["w"]), _as_torch(d["t"])

        def run():
            loss = fn(x, w, t)
            dx, dw = torch.autograd.grad(loss, (x, w))
            return {"loss": loss.detach(), "dx": dx, "dw": dw}

        return run

    return build


def _compile_can_run(dtype, device):
    r = _torch_can_run(dtype, device)
    if r is not None:
        return r
    if device == "cuda" and not _has("triton"):
        return ("unavailable", "torch.compile (inductor) needs triton on a GPU")
    return None


def _lce_can_run(dtype, device):
    r = _torch_can_run(dtype, device)
    if r is not None:
        return r
    torch = _torch()
    if not hasattr(torch.nn.functional, "linear_cross_entropy"):
        return ("unavailable", f"torch {torch.__version__} has no "
                "torch.nn.functional.linear_cross_entropy (torch >= 2.13)")  # fmt: skip
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return ("unavailable", f"torch {torch.__version__} has no LinearCrossEntropyOptions "
                "(its chunked path)")  # fmt: skip
    return None


def _lce_build(d, device):
    torch = _torch()
    F = torch.nn.functional
    opts = torch.nn.LinearCrossEntropyOptions()
    x, w, t = _leaf(d["x"]), _leaf(d["w"]), _as_torch(d["t"])

    def run():
        loss = F.linear_cross_entropy(x, w, t, options=opts)
        dx, dw = torch.autograd.grad(loss, (x, w))
        return {"loss": loss.detach(), "dx": dx, "dw": dw}

    return run


def _cs231n_can_run(dtype, device):
    if device != "cpu":
        return ("unsupported", "CS231N's NumPy code runs on the CPU only")
    if dtype == "bf16":
        return ("unsupported", "NumPy has no bfloat16")
    return None


def _cs231n_build(d, device):
    x, w, t = (np.asarray(a) for a in (d["x"], d["w"], d["t"]))
    w_dc = w.T  # CS231N's (D, C) layout: a view, not a copy

    def run():
        loss, dw_dc = softmax_loss_vectorized(w_dc, x, t, 0.0)
        return {"loss": loss, "dx": None, "dw": dw_dc.T}

    return run


def _default_providers() -> dict[str, LceProvider]:
    ps = [
        _ours("numpy", ("cpu",)),
        _ours_autograd("numpy", ("cpu",)),
        _ours("triton", ("cuda",)),
        _ours_autograd("triton", ("cuda",)),
        _ours("cupy", ("cuda",)),
        _ours_autograd("cupy", ("cuda",)),
        LceProvider("torch", "torch F.linear + F.cross_entropy", ("cpu", "cuda"), False, 3,
                    "loss, dx, dW", "F.cross_entropy(F.linear(x, W), t) + torch.autograd.grad",
                    _torch_can_run, _torch_build(False)),
        LceProvider("torch.compile", "torch.compile(F.linear + F.cross_entropy)",
                    ("cpu", "cuda"), False, 3, "loss, dx, dW",
                    "torch.compile(F.cross_entropy(F.linear(x, W), t), dynamic=False) + "
                    "torch.autograd.grad", _compile_can_run, _torch_build(True), compiles=True),
        LceProvider("torch-lce", "torch linear_cross_entropy (chunked)", ("cpu", "cuda"), False,
                    3, "loss, dx, dW",
                    "F.linear_cross_entropy(x, W, t, options=LinearCrossEntropyOptions()) + "
                    "torch.autograd.grad", _lce_can_run, _lce_build),
        LceProvider("cs231n", "CS231N vectorised NumPy (no dx)", ("cpu",), False, 2,
                    "loss, dW (no dx)", "softmax_loss_vectorized(W.T, X, y, reg=0) (seed 003)",
                    _cs231n_can_run, _cs231n_build, numpy_inputs=True),
    ]  # fmt: skip
    return {p.name: p for p in ps}


PROVIDERS: dict[str, LceProvider] = _default_providers()


def resolve(names: list[str] | None, device: str) -> list[str]:
    """This op's providers for --providers: 'ours' is every ours-* of the device, 'all' (or
    nothing) all of the device; names of the other ops' providers are skipped here."""
    here = [n for n, p in PROVIDERS.items() if device in p.devices]
    if not names or names == ["all"]:
        return here
    out = []
    for n in names:
        if n == "ours":
            out += [p for p in here if PROVIDERS[p].ours]
        elif n == "all":
            out += here
        elif n in PROVIDERS:
            out.append(n)
    return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------------------------
# inputs and the float64 reference


def make_inputs(shape: Shape, dtype: str, device: str, seed: int, torch_device: str = "cuda"):
    """x ~ N(0, 1), W ~ N(0, 1 / D) (logits of unit scale), targets uniform. NumPy arrays on
    the CPU (torch CPU tensors for bfloat16), torch tensors on ``torch_device`` on a GPU."""
    if device == "cpu" and dtype != "bf16":
        rng = np.random.default_rng(seed)
        dt = np.float64 if dtype == "fp64" else np.float32
        x = rng.standard_normal((shape.n, shape.d), dtype=dt)
        w = rng.standard_normal((shape.v, shape.d), dtype=dt) * dt(1 / math.sqrt(shape.d))
        x = x.astype(DTYPES[dtype], copy=False)
        w = w.astype(DTYPES[dtype], copy=False)
        t = rng.integers(0, shape.v, size=shape.n, dtype=np.int64)
        return {"x": x, "w": w, "t": t}
    torch = _torch()
    dev = "cpu" if device == "cpu" else torch_device
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    dt = getattr(torch, DTYPES[dtype])
    x = torch.randn((shape.n, shape.d), device=dev, generator=g)
    w = torch.randn((shape.v, shape.d), device=dev, generator=g) / math.sqrt(shape.d)
    t = torch.randint(0, shape.v, (shape.n,), device=dev, generator=g)
    return {"x": x.to(dt), "w": w.to(dt), "t": t}


def _subset(n: int, k: int, seed: int, must=()) -> np.ndarray:
    """k indices of range(n) (all of them when n <= k): the first, the last, the ``must`` ones
    and random others, sorted."""
    if n <= k:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    pick = {0, n - 1, *(int(m) for m in must)}
    while len(pick) < k:
        pick.add(int(rng.integers(0, n)))
    return np.array(sorted(pick)[:k])


@dataclass
class Reference:
    loss: float
    rows: np.ndarray  # the rows of dx compared
    dx: np.ndarray  # (len(rows), D) float64
    classes: np.ndarray  # the classes (rows of dW) compared
    dw: np.ndarray  # (len(classes), D) float64
    seconds: float


def reference(data: dict[str, Any], shape: Shape, seed: int = 0) -> Reference:
    """The float64 loss over every row, dx on CHECK_ROWS rows, dW on CHECK_CLASSES classes
    (a few of them targets), from lse = logsumexp(x W^T) computed in row blocks: NumPy for
    NumPy inputs, torch on the inputs' device otherwise."""
    t0 = time.perf_counter()
    x, w, t = data["x"], data["w"], data["t"]
    n, v = shape.n, shape.v
    t_np = _to_np(t).astype(np.int64)
    rows = _subset(n, CHECK_ROWS, seed + 1)
    classes = _subset(v, CHECK_CLASSES, seed + 2, must=t_np[rows[:8]])
    block = max(1, REF_BLOCK_ELEMS // v)
    if isinstance(x, np.ndarray):
        x64, w64 = x.astype(np.float64), w.astype(np.float64)
        lse, zt = np.empty(n), np.empty(n)
        for r0 in range(0, n, block):
            r1 = min(n, r0 + block)
            z = x64[r0:r1] @ w64.T
            m = z.max(axis=1)
            lse[r0:r1] = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
            zt[r0:r1] = z[np.arange(r1 - r0), t_np[r0:r1]]
            del z
        loss = float((lse - zt).mean())
        p = np.exp(x64[rows] @ w64.T - lse[rows, None])
        p[np.arange(len(rows)), t_np[rows]] -= 1.0
        dx = p @ w64 / n
        pc = np.exp(x64 @ w64[classes].T - lse[:, None])
        pc -= t_np[:, None] == classes[None, :]
        dw = pc.T @ x64 / n
        return Reference(loss, rows, dx, classes, dw, time.perf_counter() - t0)
    torch = _torch()
    x64, w64 = x.detach().to(torch.float64), w.detach().to(torch.float64)
    tt = t.to(torch.int64)
    lse = torch.empty(n, dtype=torch.float64, device=x.device)
    zt = torch.empty_like(lse)
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        z = x64[r0:r1] @ w64.T
        lse[r0:r1] = torch.logsumexp(z, dim=1)
        zt[r0:r1] = z.gather(1, tt[r0:r1, None])[:, 0]
        del z
    loss = float((lse - zt).mean())
    ri = torch.as_tensor(rows, device=x.device)
    ci = torch.as_tensor(classes, device=x.device)
    p = torch.exp(x64[ri] @ w64.T - lse[ri, None])
    p[torch.arange(len(rows), device=x.device), tt[ri]] -= 1.0
    dx = (p @ w64 / n).cpu().numpy()
    pc = torch.exp(x64 @ w64[ci].T - lse[:, None])
    pc -= (tt[:, None] == ci[None, :]).to(pc.dtype)
    dw = (pc.T @ x64 / n).cpu().numpy()
    del x64, w64, p, pc
    return Reference(loss, rows, dx, classes, dw, time.perf_counter() - t0)


def _to_np(a) -> np.ndarray:
    """float64 (or integer) NumPy copy of a NumPy / torch / CuPy array or scalar."""
    if isinstance(a, np.ndarray | np.generic | float | int):
        return np.asarray(a)
    mod = type(a).__module__.split(".")[0]
    if mod == "cupy":
        return a.get()
    if mod == "torch":
        a = a.detach()
        if a.is_floating_point():
            a = a.to(_torch().float64)
        return a.cpu().numpy()
    return np.asarray(a)


def _rows_of(a, idx: np.ndarray) -> np.ndarray:
    """a[idx] as float64 NumPy (indexed on a's device first: no full copy to the host)."""
    if isinstance(a, np.ndarray):
        return a[idx].astype(np.float64)
    mod = type(a).__module__.split(".")[0]
    if mod == "torch":
        torch = _torch()
        return _to_np(a[torch.as_tensor(idx, device=a.device)])
    if mod == "cupy":
        import cupy

        return a[cupy.asarray(idx)].get().astype(np.float64)
    return np.asarray(a)[idx].astype(np.float64)


def _relerr(a: np.ndarray, ref: np.ndarray) -> float:
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-300))


def check(out: dict[str, Any], ref: Reference, shape: Shape, dtype: str) -> dict[str, Any]:
    """Compare one call's result with the float64 reference (see the module docstring)."""
    atol, rtol = TOLERANCES[dtype]
    rec: dict[str, Any] = {"ok": True, "note": ""}
    loss = float(np.asarray(_to_np(out["loss"])).reshape(()))
    err = abs(loss - ref.loss) if math.isfinite(loss) else float("inf")
    rec["loss"] = loss
    rec["loss_err_ratio"] = err / (atol + rtol * abs(ref.loss))
    notes = []
    if rec["loss_err_ratio"] > 1:
        notes.append(f"loss {loss:.6g} vs {ref.loss:.6g}")
    for key, idx, want, full in (("dx", ref.rows, ref.dx, (shape.n, shape.d)),
                                 ("dw", ref.classes, ref.dw, (shape.v, shape.d))):  # fmt: skip
        a = out.get(key)
        if a is None:
            rec[f"{key}_relerr"] = None
            continue
        if tuple(a.shape) != full:
            notes.append(f"{key} has shape {tuple(a.shape)}, expected {full}")
            rec[f"{key}_relerr"] = float("inf")
            continue
        rec[f"{key}_relerr"] = _relerr(_rows_of(a, idx), want)
        if rec[f"{key}_relerr"] > GRAD_REL[dtype]:
            notes.append(f"{key} relative error {rec[f'{key}_relerr']:.3g} > {GRAD_REL[dtype]:.3g}")
    rec["ok"] = not notes
    rec["note"] = "; ".join(notes)
    return rec


# ----------------------------------------------------------------------------------------------
# memory


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


class CpuMemory:
    """Peak memory of one call on the CPU: tracemalloc's peak and the RSS high-water mark
    (see the module docstring). ``rss_method`` says what the RSS figure rests on."""

    def __init__(self):
        self.libc = None
        self.rss_method = self._setup()

    def _setup(self) -> str:
        if _status_kib("VmHWM") is None:
            return "unavailable (no /proc/self/status)"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError as e:
            return f"unavailable (/proc/self/clear_refs: {e.strerror})"
        try:
            import ctypes

            libc = ctypes.CDLL(None)
            # M_MMAP_THRESHOLD (-3): blocks from 64 KiB on are mmap'ed and unmapped on free;
            # M_TRIM_THRESHOLD (-1): the heap's top is given back from 64 KiB on
            pinned = libc.mallopt(-3, 1 << 16) == 1 and libc.mallopt(-1, 1 << 16) == 1
            self.libc = libc
        except (OSError, AttributeError):
            pinned = False
        base = "VmHWM - VmRSS (clear_refs reset before the call)"
        if not pinned:
            return base + "; glibc mallopt unavailable: pages freed earlier may hide some"
        return base + ", glibc mmap threshold pinned at 64 KiB"

    def _settle(self):
        gc.collect()
        if self.libc is not None:
            self.libc.malloc_trim(0)

    def measure(self, fn: Callable[[], Any], with_tracemalloc: bool) -> dict[str, Any]:
        import tracemalloc

        self._settle()
        rss_ok = not self.rss_method.startswith("unavailable")
        if rss_ok:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            rss0 = _status_kib("VmRSS")
        if with_tracemalloc:
            tracemalloc.start()
        try:
            out = fn()
            peak_tm = tracemalloc.get_traced_memory()[1] if with_tracemalloc else None
        finally:
            if with_tracemalloc:
                tracemalloc.stop()
        hwm = _status_kib("VmHWM") if rss_ok else None
        out_bytes = _output_bytes(out)
        out = None
        self._settle()
        return {
            "tracemalloc_peak": peak_tm,
            "rss_peak": None if hwm is None else max(0, hwm - rss0) * 1024,
            "output_bytes": out_bytes,
        }


def cuda_memory(fn: Callable[[], Any], torch) -> dict[str, Any]:
    """torch's peak allocation above what was allocated before the call (the inputs), plus the
    growth of CuPy's default pool when CuPy is loaded (its allocations torch does not see)."""
    gc.collect()
    torch.cuda.synchronize()
    pool = None
    if "cupy" in sys.modules:
        try:
            pool = sys.modules["cupy"].get_default_memory_pool()
            pool.free_all_blocks()
            pool0 = pool.total_bytes()
        except Exception:  # noqa: BLE001 - no CuPy pool figure, torch's stands
            pool = None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    cupy_extra = None if pool is None else max(0, pool.total_bytes() - pool0)
    out_bytes = _output_bytes(out)
    out = None
    gc.collect()
    return {
        "torch_peak": peak,
        "cupy_pool_growth": cupy_extra,
        "peak": peak + (cupy_extra or 0),
        "output_bytes": out_bytes,
    }


def _output_bytes(out) -> int:
    total = 0
    for v in (out or {}).values():
        if v is None:
            continue
        n = getattr(v, "nbytes", None)
        if n is None and hasattr(v, "element_size"):
            n = v.numel() * v.element_size()
        total += int(n or 0)
    return total


# ----------------------------------------------------------------------------------------------
# the run


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "out of memory" in str(e).lower()


def _row(shape: Shape, dtype: str, prov: LceProvider, **kw) -> dict[str, Any]:
    r = {
        "op": OP, "n": shape.n, "d": shape.d, "v": shape.v, "model": shape.model,
        "dtype": dtype, "provider": prov.name, "label": prov.label, "ours": prov.ours,
        "computes": prov.computes, "gemms": prov.gemms, "impl": prov.impl, "status": "ok",
        "message": "", "ms": None, "gflops": None, "reps": None, "check": None,
        "memory": None, "peak_bytes": None, "first_call_s": None,
    }  # fmt: skip
    r.update(kw)
    return r


def _timed(row: dict[str, Any], shape: Shape, ms: float, reps: int) -> None:
    row.update(ms=ms, reps=reps, gflops=row["gemms"] * shape.gemm_flops / ms / 1e6)


def estimate_seconds(shapes: list[Shape], names: list[str], device: str, quick: bool) -> float:
    """A rough wall time: GEMM throughput per provider (CPU: ours ~60 GFLOP/s on 2 EPYC
    cores, torch eager and CS231N ~3x slower, torch's chunked path ~7x; GPU: ~400 TFLOP/s bf16,
    peers ~1.5x slower), the calls each makes (check, timing, memory), torch.compile's compile
    (CPU ~20 s, GPU ~40 s per shape), the float64 reference (one GEMM at 30 GFLOP/s on the
    CPU, 20 TFLOP/s on a GPU)."""
    gpu = device == "cuda"
    slow = {"torch": 3.0, "cs231n": 3.0, "torch-lce": 7.0, "torch.compile": 1.0}
    total = 0.0
    for s in shapes:
        total += s.gemm_flops / (2e13 if gpu else 3e10)
        for n in names:
            p = PROVIDERS[n]
            call = p.gemms * s.gemm_flops / (4e14 if gpu else 6e10)
            if gpu:
                call *= 1.0 if p.ours else 1.5
            else:
                call *= slow.get(n, 1.0 if p.ours else 2.0)
            # the check call, the timed calls (CudaTimer: ~15 with its warm-up), the memory call
            calls = 2 + (15 if gpu else CPU_REPS[quick])
            total += calls * call + (0.3 if gpu else 0.05)
            if p.compiles:
                total += 40.0 if gpu else 20.0
    return total


def run(device: str, *, shapes: list[Shape], dtypes: list[str], names: list[str],
        seed: int = 0, quick: bool = False, deadline: float = float("inf"),
        torch_device: str = "cuda", progress: Callable[[str], None] | None = None,
        reps: int | None = None, result: dict | None = None) -> dict[str, Any]:  # fmt: skip
    """Measure every (shape, dtype, provider); returns {"rows": [...], "references": [...],
    "memory_method": ...}, filled in as it goes into ``result`` when given (so that an
    interrupted run keeps what it measured). ``torch_device`` lets tests run the GPU path on
    CPU tensors."""
    say = progress or (lambda s: print(s, file=sys.stderr))
    res = result if result is not None else {}
    rows: list[dict[str, Any]] = res.setdefault("rows", [])
    refs: list[dict[str, Any]] = res.setdefault("references", [])
    # made at the first memory measurement (it pins glibc's mmap threshold: after the timing)
    cpu_mem: list[CpuMemory] = []
    res["memory_method"] = _memory_method(device, None)
    try:
        _run_all(device, shapes, dtypes, names, seed, quick, deadline, torch_device, say, reps,
                 rows, refs, cpu_mem)  # fmt: skip
    finally:
        res["memory_method"] = _memory_method(device, cpu_mem[0] if cpu_mem else None)
    return res


def _run_all(device, shapes, dtypes, names, seed, quick, deadline, torch_device, say, reps,
             rows, refs, cpu_mem):  # fmt: skip
    for dtype in dtypes:
        for shape in shapes:
            if time.time() > deadline:
                for n in names:
                    rows.append(_row(shape, dtype, PROVIDERS[n], status="skipped-budget",
                                     message="time budget (--budget-s) used up"))  # fmt: skip
                continue
            say(f"linear_ce {dtype} {shape.key}: inputs and float64 reference")
            try:
                data = make_inputs(shape, dtype, device, seed, torch_device)
                ref = reference(data, shape, seed)
            except Exception as e:  # noqa: BLE001 - no inputs, no point: record why
                status = "skipped-memory" if _is_oom(e) else "error"
                for n in names:
                    rows.append(_row(shape, dtype, PROVIDERS[n], status=status,
                                     message=f"inputs / reference: {_short(e)}"))  # fmt: skip
                data = None
                _free(device if torch_device != "cpu" else "cpu")
                continue
            refs.append({"shape": shape.key, "dtype": dtype, "loss": ref.loss,
                         "seconds": ref.seconds, "rows_checked": len(ref.rows),
                         "classes_checked": len(ref.classes)})  # fmt: skip
            if device == "cuda":
                _run_gpu(shape, dtype, names, data, ref, deadline, say, torch_device, rows)
            else:
                n_reps = reps if reps is not None else CPU_REPS[quick]
                _run_cpu(shape, dtype, names, data, ref, deadline, say, cpu_mem, n_reps, rows)
            data = ref = None
            _free(device if torch_device != "cpu" else "cpu")


def _memory_method(device, cpu_mem) -> dict[str, str]:
    if device == "cuda":
        return {
            "gpu": "torch.cuda.max_memory_allocated() - memory_allocated() before the call "
            "(peak statistics reset), + CuPy default pool growth when CuPy is loaded"
        }
    return {"tracemalloc": "tracemalloc peak over the call (NumPy providers: NumPy reports its "
            "buffers; BLAS scratch not seen)",
            "rss": cpu_mem.rss_method if cpu_mem else "not measured"}  # fmt: skip


def _free(device):
    gc.collect()
    if device == "cuda":
        torch = _torch()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _prepare(shape, dtype, prov, data, ref, device):
    """(row, fn): build the provider, call it once (the warm-up; torch.compile compiles here)
    and check the result; fn is None when the row is final."""
    reason = prov.can_run(dtype, device)
    if reason is not None:
        return _row(shape, dtype, prov, status=reason[0], message=reason[1]), None
    try:
        fn = prov.build(data, device)
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            _torch().cuda.synchronize()
        first = time.perf_counter() - t0
        chk = check(out, ref, shape, dtype)
        out = None
    except Exception as e:  # noqa: BLE001 - one failing provider must not stop the run
        status = (
            "skipped-memory"
            if _is_oom(e)
            else ("unavailable" if type(e).__name__ == "BackendUnavailableError" else "error")
        )
        return _row(shape, dtype, prov, status=status, message=_short(e)), None
    row = _row(shape, dtype, prov, check=chk, first_call_s=round(first, 3))
    if not chk["ok"]:
        row.update(status="mismatch", message=chk["note"])
        return row, None
    return row, fn


def _run_cpu(shape, dtype, names, data, ref, deadline, say, mem: list, reps: int, rows: list):
    fns = {}
    for n in names:
        prov = PROVIDERS[n]
        if time.time() > deadline:
            rows.append(_row(shape, dtype, prov, status="skipped-budget",
                             message="time budget (--budget-s) used up"))  # fmt: skip
            continue
        say(f"linear_ce {dtype} {shape.key} {n}: check")
        row, fn = _prepare(shape, dtype, prov, data, ref, "cpu")
        rows.append(row)
        if fn is not None:
            fns[n] = (row, fn)
    # interleaved rounds: other work on the machine slows every provider alike
    times: dict[str, list[float]] = {n: [] for n in fns}
    for k in range(reps):
        if fns:
            say(f"linear_ce {dtype} {shape.key}: timing round {k + 1}/{reps}")
        for n, (row, fn) in fns.items():
            if time.time() > deadline and k > 0:
                continue
            try:
                t0 = time.perf_counter()
                fn()
                times[n].append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001
                row.update(status="error", message=_short(e))
    for n, (row, _fn) in fns.items():
        if row["status"] == "ok" and times[n]:
            _timed(row, shape, statistics.median(times[n]) * 1e3, len(times[n]))
        elif row["status"] == "ok":
            row.update(status="skipped-budget", message="time budget used up before timing")
    if fns:
        say(f"linear_ce {dtype} {shape.key}: peak memory, a call per provider")
    for n, (row, fn) in fns.items():
        if row["status"] != "ok":
            continue
        if not mem:
            mem.append(CpuMemory())
        try:
            m = mem[0].measure(fn, with_tracemalloc=PROVIDERS[n].numpy_inputs)
        except Exception as e:  # noqa: BLE001 - the time stands; the memory figure is missing
            row["message"] = f"memory: {_short(e)}"
            continue
        row["memory"] = m
        row["peak_bytes"] = m["tracemalloc_peak"] if m["tracemalloc_peak"] is not None \
            else m["rss_peak"]  # fmt: skip
        row["peak_method"] = "tracemalloc" if m["tracemalloc_peak"] is not None else "rss"


def _run_gpu(shape, dtype, names, data, ref, deadline, say, torch_device, rows: list):
    from .timing import CpuTimer, CudaTimer

    torch = _torch()
    on_gpu = torch_device != "cpu"
    timer = CudaTimer(torch) if on_gpu else CpuTimer(quick=True)
    if not on_gpu:  # CPU tensors (the tests of this path): a warm-up and one timed call
        timer.min_reps = 1
    for n in names:
        prov = PROVIDERS[n]
        if time.time() > deadline:
            rows.append(_row(shape, dtype, prov, status="skipped-budget",
                             message="time budget (--budget-s) used up"))  # fmt: skip
            continue
        say(f"linear_ce {dtype} {shape.key} {n}")
        row, fn = _prepare(shape, dtype, prov, data, ref, "cuda" if on_gpu else "cpu")
        rows.append(row)
        if fn is None:
            _free("cuda" if on_gpu else "cpu")
            continue
        try:
            ms, reps = timer(fn)
            _timed(row, shape, ms, reps)
            if on_gpu:
                m = cuda_memory(fn, torch)
                row.update(memory=m, peak_bytes=m["peak"], peak_method="cuda")
        except Exception as e:  # noqa: BLE001
            status = "skipped-memory" if _is_oom(e) else "error"
            row.update(status=status, message=_short(e))
        fn = None
        if prov.compiles:
            torch._dynamo.reset()
        _free("cuda" if on_gpu else "cpu")


# ----------------------------------------------------------------------------------------------
# targets and the report


def _mib(b) -> str:
    return "—" if b is None else f"{b / 2**20:.0f}" if b >= 2**20 else f"{b / 2**20:.2f}"


def targets(rows: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """Issue 13's targets, as measured in this run.

    CPU (fp32, N=4096, D=256, V=32000): ours-numpy at least 1.5x faster than CS231N and at
    least 8x lower peak memory (tracemalloc for both; RSS beside it). GPU, per ours-* provider:
    at most 1.0x eager torch's time for N >= 4096 and 1.15x torch.compile's; at most 15% of
    torch.compile's peak extra memory for N >= 8192."""
    ok = [r for r in rows if r["status"] == "ok"]
    by = {(r["n"], r["d"], r["v"], r["dtype"], r["provider"]): r for r in ok}
    out = []
    for r in ok:
        if not r["ours"]:
            continue
        k = (r["n"], r["d"], r["v"], r["dtype"])
        if device == "cpu":
            if r["provider"] != "ours-numpy" or k != (4096, 256, 32000, "fp32"):
                continue
            cs = by.get((*k, "cs231n"))
            if cs is None:
                continue
            speed = cs["ms"] / r["ms"]
            mem = _ratio(cs.get("peak_bytes"), r.get("peak_bytes"))
            rss = _ratio((cs.get("memory") or {}).get("rss_peak"),
                         (r.get("memory") or {}).get("rss_peak"))  # fmt: skip
            out.append({
                "shape": f"{r['n']}x{r['d']}x{r['v']}", "dtype": r["dtype"],
                "ours": r["provider"], "peer": "cs231n",
                "speedup": speed, "speedup_target": 1.5, "speedup_met": speed >= 1.5,
                "memory_ratio": mem, "memory_ratio_rss": rss, "memory_target": 8.0,
                "memory_met": None if mem is None else mem >= 8.0,
                "note": "CS231N computes no dx (2 GEMMs; ours 3)",
            })  # fmt: skip
            continue
        for peer, bound in (("torch", 1.0), ("torch.compile", 1.15)):
            p = by.get((*k, peer))
            if p is None or r["n"] < 4096:
                continue
            e = {"shape": f"{r['n']}x{r['d']}x{r['v']}", "dtype": r["dtype"],
                 "ours": r["provider"], "peer": peer, "time_ratio": r["ms"] / p["ms"],
                 "time_target": bound, "time_met": r["ms"] / p["ms"] <= bound}  # fmt: skip
            if peer == "torch.compile" and r["n"] >= 8192:
                share = _ratio(r.get("peak_bytes"), p.get("peak_bytes"))
                e.update(
                    memory_share=share,
                    memory_target=0.15,
                    memory_met=None if share is None else share <= 0.15,
                )
            out.append(e)
    return out


def _ratio(a, b):
    return None if not a or not b else a / b


def summary_markdown(record: dict[str, Any]) -> str:
    lce = record["linear_ce"]
    rows = lce["rows"]
    dev = record["device"]
    git = record.get("git") or {}
    lines = [
        f"## Fused linear + cross-entropy, forward + backward: {dev.get('name')} "
        f"({record['created'][:10]})",
        "",
        f"Commit `{(git.get('commit') or 'unknown')[:12]}`"
        + (" (dirty)" if git.get("dirty") else "")
        + f"; `{record.get('command', 'python -m bench --ops linear_ce')}`. Mean CE of "
        "x @ W^T (x: N x D, W: V x D, class targets, no bias) and its gradients. GFLOP/s "
        "counts the GEMMs each provider computes (2 N D V flops each: 3 with dx, 2 for "
        "CS231N, which computes no dx). Peak memory: above the inputs (outputs + temporaries), "
        "in a call of its own.",
        "",
    ]
    busy = (record.get("settings") or {}).get("busy_warning")
    if busy:
        lines += [f"**Warning: {busy}.**", ""]
    for k, v in lce["memory_method"].items():
        lines.append(f"- memory, {k}: {v}")
    lines.append("")
    head = [
        "shape (N x D x V)",
        "dtype",
        "provider",
        "computes",
        "ms",
        "GFLOP/s",
        "peak MiB",
        "(method)",
        "RSS peak MiB",
        "time / ours",
        "memory / ours",
        "check",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["dtype"], r["n"], r["d"], r["v"]), []).append(r)
    for (dt, n, d, v), rs in groups.items():
        ours = next((r for r in rs if r["ours"] and r["status"] == "ok"), None)
        for r in rs:
            ok = r["status"] == "ok"
            chk = r.get("check") or {}
            chk_s = "" if not chk else (
                f"loss {chk['loss_err_ratio']:.2g} tol, dx {_g(chk.get('dx_relerr'))}, "
                f"dW {_g(chk.get('dw_relerr'))}")  # fmt: skip
            rss = (r.get("memory") or {}).get("rss_peak")
            cells = [
                f"{n}x{d}x{v}" + (f" ({r['model']})" if r.get("model") else ""), dt,
                r["provider"], r["computes"],
                f"{r['ms']:.1f}" if ok else r["status"],
                f"{r['gflops']:.0f}" if ok else "",
                _mib(r.get("peak_bytes")) if ok else "",
                r.get("peak_method", "") if ok else "",
                _mib(rss) if ok and rss is not None else "",
                f"{r['ms'] / ours['ms']:.2f}" if ok and ours else "",
                _ratio_s(r.get("peak_bytes"), ours.get("peak_bytes")) if ok and ours else "",
                chk_s if ok or r["status"] == "mismatch" else r["message"][:80],
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    tg = lce.get("targets") or []
    if tg:
        lines += ["### Targets (issue 13), measured in this run", ""]
        for e in tg:
            if "speedup" in e:
                lines.append(
                    f"- {e['shape']} {e['dtype']}: {e['ours']} is {e['speedup']:.2f}x faster "
                    f"than CS231N (target 1.5x: {_yn(e['speedup_met'])}) and needs "
                    f"{_x(e['memory_ratio'])} less peak memory by tracemalloc "
                    f"({_x(e['memory_ratio_rss'])} by RSS; target 8x: {_yn(e['memory_met'])}). "
                    f"{e['note']}: the speed-up is with that extra work on our side."
                )
            else:
                s = (
                    f"- {e['shape']} {e['dtype']}: {e['ours']} takes {e['time_ratio']:.2f}x "
                    f"{e['peer']}'s time (target <= {e['time_target']}x: {_yn(e['time_met'])})"
                )
                if "memory_share" in e:
                    s += (
                        f"; peak memory {_pct(e['memory_share'])} of {e['peer']}'s (target "
                        f"<= 15%: {_yn(e['memory_met'])})"
                    )
                lines.append(s + ".")
        lines.append("")
    bad = [r for r in rows if r["status"] not in ("ok",)]
    if bad:
        lines += ["### Not timed", ""]
        for r in bad:
            lines.append(f"- {r['provider']} {r['n']}x{r['d']}x{r['v']} {r['dtype']}: "
                         f"{r['status']}: {r['message']}")  # fmt: skip
        lines.append("")
    return "\n".join(lines) + "\n"


def _g(v) -> str:
    return "n/a" if v is None else f"{v:.2g}"


def _x(v) -> str:
    return "n/a" if v is None else f"{v:.1f}x"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def _yn(v) -> str:
    return "n/a" if v is None else ("met" if v else "**not met**")


def _ratio_s(a, b) -> str:
    r = _ratio(a, b)
    return "" if r is None else f"{r:.2f}"


def plot(record: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    """One PNG: per shape, time (ms) and peak memory (MiB) of every provider, bars side by
    side; CS231N's bars are labelled "(no dx)"."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = [r for r in record["linear_ce"]["rows"] if r["status"] == "ok"]
    if not rows:
        return []
    shapes = list(dict.fromkeys((r["dtype"], r["n"], r["d"], r["v"]) for r in rows))
    fig, axes = plt.subplots(len(shapes), 2, figsize=(13, 3.6 * len(shapes)), squeeze=False)
    for i, key in enumerate(shapes):
        rs = [r for r in rows if (r["dtype"], r["n"], r["d"], r["v"]) == key]
        labels = [r["label"] for r in rs]
        colors = ["C0" if r["ours"] else "C1" for r in rs]
        for j, (field, unit) in enumerate((("ms", "ms (forward + backward)"),
                                           ("peak_bytes", "peak MiB above inputs"))):  # fmt: skip
            ax = axes[i][j]
            vals = [(r[field] or 0) / (2**20 if field == "peak_bytes" else 1) for r in rs]
            ax.barh(range(len(rs)), vals, color=colors)
            ax.set_yticks(range(len(rs)))
            ax.set_yticklabels(labels, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(unit)
            for k, vv in enumerate(vals):
                ax.text(vv, k, f" {vv:.0f}", va="center", fontsize=7)
            dt, n, d, v = key
            ax.set_title(f"{n} x {d} x {v} {dt}", fontsize=10)
            ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"{record['device'].get('name')}: fused linear + cross-entropy "
                 f"({report._figure_note(record)})", fontsize=11)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path = out_dir / f"{name}-linear_ce.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def parse_shapes(text: str) -> list[Shape]:
    """'4096x256x32000,64x8x100' -> [Shape(4096, 256, 32000), ...] (N x D x V)."""
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            n, d, v = (int(p) for p in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"bad linear_ce shape {part!r}: expected NxDxV, e.g. "
                             "4096x256x32000") from None  # fmt: skip
        if min(n, d, v) < 1:
            raise ValueError(f"bad linear_ce shape {part!r}: sizes must be >= 1")
        out.append(Shape(n, d, v, "custom"))
    return out
