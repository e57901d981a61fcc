"""Where the benchmark runs: the input data, the copy reference, the float64 reference results and
the memory check, for the CPU (NumPy arrays) and for a CUDA GPU (torch tensors).

The float64 reference is independent of the GPU kernels under test: on the CPU the NumPy
backend on a float64 copy of the inputs (the test oracle; no GPU provider shares its code); on a
GPU torch in float64 on the GPU (torch's own softmax / log_softmax, the backward formulas and
the CE loss and gradient written out in torch), never one of our GPU backends, so a bug that
our Triton or CUDA kernels share in every precision cannot pass its own check. Every provider's
output, ours included, is compared with it under the contract's tolerance for the provider's
dtype. On a GPU the reference is computed and compared in row blocks, so it needs no more than
a few hundred MiB at any size.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from .grids import DTYPES, ITEMSIZE, TOLERANCES, Point

# Elements per block of rows when computing the float64 reference (128 MiB per float64 array).
REF_BLOCK_ELEMS = 1 << 24
# Memory a point needs, in units of (elements x itemsize): inputs, one provider's output and the
# temporaries the peers make (torch's CE keeps log_softmax and a one-hot gradient; Liger runs on
# its own copy of the logits; cupyx makes two full temporaries). Plus the reference blocks.
MEM_UNITS = {
    "softmax_fwd": 4,
    "log_softmax_fwd": 4,
    "softmax_bwd": 5,
    "log_softmax_bwd": 5,
    "ce_fwd": 4,
    "ce_fwd_grad": 5,
}
REF_OVERHEAD_BYTES = 6 * REF_BLOCK_ELEMS * 8


def seed_for(seed: int, dtype: str, shape: tuple[int, int]) -> int:
    return zlib.crc32(f"{seed}-{dtype}-{shape[0]}x{shape[1]}".encode())


def _gib(b: float) -> str:
    return f"{b / 2**30:.1f} GiB"


class Inputs:
    """The inputs of one (dtype, shape), shared by its ops: x, dy and the targets t are made on
    first use; y (softmax or log_softmax of x) for the backward ops."""

    def __init__(self, env, dtype: str, shape: tuple[int, int], seed: int):
        self.env, self.dtype, self.shape, self.seed = env, dtype, shape, seed
        self._cache: dict[str, Any] = {}

    def get(self, name: str):
        if name not in self._cache:
            self._cache[name] = self.env.make(name, self)
        return self._cache[name]

    def data(self, op: str) -> dict[str, Any]:
        if op in ("softmax_fwd", "log_softmax_fwd"):
            self._keep("x")
            return {"x": self.get("x")}
        if op in ("softmax_bwd", "log_softmax_bwd"):
            y_name = "y" if op == "softmax_bwd" else "ly"
            self._keep("x", "dy", y_name)
            return {"dy": self.get("dy"), "y": self.get(y_name)}
        self._keep("x", "t")
        return {"x": self.get("x"), "t": self.get("t")}

    def _keep(self, *names: str) -> None:
        """Drop the inputs of earlier ops that this one does not use (GPU memory)."""
        for k in list(self._cache):
            if k not in names:
                del self._cache[k]

    def held_bytes(self) -> int:
        """Bytes of the inputs made so far (they count towards a point's memory need)."""
        total = 0
        for a in self._cache.values():
            n = getattr(a, "nbytes", None)
            total += int(n) if n is not None else a.numel() * a.element_size()
        return total

    def release(self):
        self._cache.clear()


def _compare(xp, out, ref, bound) -> tuple[float, float, int]:
    """(max of |out-ref| / bound, max |out-ref|, NaN mismatches), in float64; bound is
    atol + rtol |ref|. The fast path is three passes; NaN or inf anywhere takes the slow one."""
    err = xp.abs(out - ref)
    ratio = float((err / bound).max())
    if ratio == ratio and ratio != float("inf"):
        return ratio, float(err.max()), 0
    nan_o, nan_r = xp.isnan(out), xp.isnan(ref)
    bad_nan = int((nan_o != nan_r).sum())
    same = (out == ref) | (nan_o & nan_r)  # equal infinities and matching NaNs: no error
    err = xp.where(same, 0.0, err)
    err = xp.where(xp.isnan(err), float("inf"), err)
    bound = xp.where(xp.isnan(bound), float("inf"), bound)
    return float((err / bound).max()), float(err.max()), bad_nan


class Check:
    """Accumulates the comparison of one provider's result with the reference."""

    def __init__(self, dtype: str):
        self.atol, self.rtol = TOLERANCES[dtype]
        self.ratio = 0.0
        self.max_abs = 0.0
        self.nan = 0
        self.note = ""

    def bound(self, xp, ref):
        return self.atol + self.rtol * xp.abs(ref)

    def add(self, xp, out, ref, bound, scale: float = 1.0):
        if scale != 1.0:
            out = out * scale
        r, m, n = _compare(xp, out, ref, bound)
        self.ratio, self.max_abs, self.nan = max(self.ratio, r), max(self.max_abs, m), self.nan + n

    def add_scalar(self, value: float, ref: float):
        err = abs(value - ref) if value == value else float("inf")
        self.ratio = max(self.ratio, err / (self.atol + self.rtol * abs(ref)))
        self.max_abs = max(self.max_abs, err)

    @property
    def ok(self) -> bool:
        return self.ratio <= 1.0 and self.nan == 0

    def record(self) -> dict[str, Any]:
        return {
            "err_ratio": self.ratio,
            "max_abs_err": self.max_abs,
            "nan_mismatch": self.nan,
            "check_note": self.note,
        }


def _split(op: str, raw):
    """(array result or gradient, loss) of a provider's return value."""
    if op == "ce_fwd":
        return None, raw
    if op == "ce_fwd_grad":
        loss, grad = raw
        return grad, loss
    return raw, None


class _EnvBase:
    kind = "?"
    # keep the last point's reference for the next provider (the CPU: memory is no concern at
    # its sizes, and the float64 reference costs as much as the slowest provider)
    cache_reference = False
    _cached: tuple = (None, None)

    def inputs(self, dtype: str, shape: tuple[int, int], seed: int) -> Inputs:
        return Inputs(self, dtype, shape, seed_for(seed, dtype, shape))

    def check(self, point: Point, data: dict[str, Any], raw) -> Check:
        """Compare a provider's result with the float64 reference, block by block.
        CE gradients are compared as n_rows x grad (the gradient of the summed loss, values of
        order 1), so the tolerance bites; the loss is the mean over all rows."""
        chk = Check(point.dtype)
        arr, loss = _split(point.op, raw)
        if arr is not None:
            if tuple(arr.shape) != point.shape:
                chk.ratio = float("inf")
                chk.note = f"result has shape {tuple(arr.shape)}, expected {point.shape}"
                return chk
        loss_sum = 0.0
        n = point.n_rows
        if self.cache_reference and self._cached[0] == point:
            blocks = self._cached[1]
        else:
            blocks = self.reference(point, data, chk)
            if self.cache_reference:
                blocks = list(blocks)
                self._cached = (point, blocks)
        for r0, r1, ref_arr, bound, ref_loss_sum in blocks:
            if arr is not None:
                scale = float(n) if point.op == "ce_fwd_grad" else 1.0
                chk.add(self.xp, self.to64(arr[r0:r1]), ref_arr, bound, scale)
            loss_sum += ref_loss_sum
        if loss is not None:
            chk.add_scalar(float(self.to64(loss)), loss_sum / n)
        return chk

    def reference(self, point: Point, data: dict[str, Any], chk: Check) -> Iterator[tuple]:
        """Yields (r0, r1, reference rows or None, their tolerance bound, summed CE loss of the
        rows) in float64."""
        op = point.op
        step = max(1, REF_BLOCK_ELEMS // point.n_cols)
        for r0 in range(0, point.n_rows, step):
            r1 = min(point.n_rows, r0 + step)
            rows = {k: (v[r0:r1] if k == "t" else self.to64(v[r0:r1])) for k, v in data.items()}
            ref, loss_sum = self.ref_rows(op, rows)
            bound = None if ref is None else chk.bound(self.xp, ref)
            yield r0, r1, ref, bound, loss_sum


class CpuEnv(_EnvBase):
    """NumPy arrays (torch CPU tensors for bfloat16); reference: the NumPy backend in float64."""

    kind = "cpu"
    xp = np
    cache_reference = True

    def __init__(self):
        self.reference_name = "softmax_kernels NumPy backend, float64"

    def make(self, name: str, inp: Inputs):
        r, c = inp.shape
        rng = np.random.default_rng(inp.seed + {"x": 0, "dy": 1, "t": 2, "y": 3, "ly": 4}[name])
        if name == "t":
            t = rng.integers(0, c, size=r, dtype=np.int64)
            if inp.dtype == "bf16":  # the logits are a torch tensor: so are the targets
                import torch

                return torch.from_numpy(t)
            return t
        if name in ("y", "ly"):
            x64 = self.to64(inp.get("x"))
            z = x64 - x64.max(axis=1, keepdims=True)
            lse = np.log(np.exp(z).sum(axis=1, keepdims=True))
            y = z - lse if name == "ly" else np.exp(z - lse)
            return self._from_np(y, inp.dtype)
        dt = np.float64 if inp.dtype == "fp64" else np.float32
        return self._from_np(rng.standard_normal((r, c), dtype=dt), inp.dtype)

    @staticmethod
    def _from_np(a: np.ndarray, dtype: str | None):
        if dtype is None:
            return a
        if dtype == "bf16":
            import torch

            return torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(torch.bfloat16)
        return np.ascontiguousarray(a, dtype=DTYPES[dtype])

    @staticmethod
    def to64(a):
        if isinstance(a, np.ndarray | np.generic | float | int):
            return np.asarray(a, dtype=np.float64)
        import torch

        if isinstance(a, torch.Tensor):
            return a.detach().to(torch.float64).numpy()
        return np.asarray(a, dtype=np.float64)

    @staticmethod
    def ref_rows(op: str, rows: dict[str, Any]):
        import softmax_kernels as sk

        b = "numpy"
        if op == "softmax_fwd":
            return sk.softmax(rows["x"], backend=b), 0.0
        if op == "log_softmax_fwd":
            return sk.log_softmax(rows["x"], backend=b), 0.0
        if op == "softmax_bwd":
            return sk.softmax_backward(rows["dy"], rows["y"], backend=b), 0.0
        if op == "log_softmax_bwd":
            return sk.log_softmax_backward(rows["dy"], rows["y"], backend=b), 0.0
        t = np.asarray(rows["t"])
        if op == "ce_fwd":
            return None, float(sk.cross_entropy(rows["x"], t, reduction="sum", backend=b))
        loss, grad = sk.cross_entropy_with_grad(rows["x"], t, reduction="sum", backend=b)
        return grad, float(loss)

    def copy_fn(self, x):
        if isinstance(x, np.ndarray):
            dst = np.empty_like(x)
            return lambda: np.copyto(dst, x), "np.copyto"
        dst = x.clone()
        return lambda: dst.copy_(x), "torch.Tensor.copy_"

    def clone(self, data: dict[str, Any]) -> dict[str, Any]:
        return {k: v.copy() if isinstance(v, np.ndarray) else v.clone() for k, v in data.items()}

    def fits(self, point: Point, held: int = 0) -> str | None:
        need = MEM_UNITS[point.op] * point.elements * ITEMSIZE[point.dtype] - held
        need += 4 * min(point.elements, REF_BLOCK_ELEMS) * 8
        avail = _mem_available()
        if avail is not None and need > 0.9 * avail:
            return f"does not fit in memory: needs ~{_gib(need)}, {_gib(avail)} available"
        return None

    def after_point(self):
        self._cached = (None, None)

    def is_oom(self, e: BaseException) -> bool:
        return isinstance(e, MemoryError)


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class CudaEnv(_EnvBase):
    """torch CUDA tensors; reference: torch in float64 on the GPU (independent of ours)."""

    kind = "cuda"
    reference_name = "torch float64 on the GPU (independent of softmax_kernels)"

    def __init__(self, device: str = "cuda"):
        import torch

        self.torch = torch
        self.device = device  # tests use "cpu" to run this path without a GPU
        self.xp = torch

    def make(self, name: str, inp: Inputs):
        torch = self.torch
        r, c = inp.shape
        g = torch.Generator(device=self.device)
        g.manual_seed(inp.seed + {"x": 0, "dy": 1, "t": 2, "y": 3, "ly": 4}[name])
        if name == "t":
            return torch.randint(0, c, (r,), device=self.device, dtype=torch.int64, generator=g)
        if name == "y":
            return torch.softmax(inp.get("x"), -1)
        if name == "ly":
            return torch.log_softmax(inp.get("x"), -1)
        dt = getattr(torch, DTYPES[inp.dtype])
        if self.device == "cpu" and inp.dtype in ("bf16", "fp16"):  # no half randn on the CPU
            return torch.randn((r, c), generator=g).to(dt)
        return torch.randn((r, c), device=self.device, dtype=dt, generator=g)

    def to64(self, a):
        torch = self.torch
        if type(a).__module__.split(".")[0] == "cupy":
            a = torch.from_dlpack(a)
        if not isinstance(a, torch.Tensor):
            return torch.tensor(float(a), dtype=torch.float64)
        return a.detach().to(torch.float64)

    def ref_rows(self, op: str, rows: dict[str, Any]):
        """torch float64: softmax / log_softmax, the backward formulas
        dx = y (dy - sum(dy y)) and dx = dy - exp(y) sum(dy), CE loss -log p_t summed and its
        gradient p - onehot(t)."""
        torch = self.torch
        if op == "softmax_fwd":
            return torch.softmax(rows["x"], -1), 0.0
        if op == "log_softmax_fwd":
            return torch.log_softmax(rows["x"], -1), 0.0
        if op == "softmax_bwd":
            y, dy = rows["y"], rows["dy"]
            return y * (dy - (dy * y).sum(-1, keepdim=True)), 0.0
        if op == "log_softmax_bwd":
            y, dy = rows["y"], rows["dy"]
            return dy - torch.exp(y) * dy.sum(-1, keepdim=True), 0.0
        x, t = rows["x"], rows["t"]
        lp = torch.log_softmax(x, -1)
        loss = -lp.gather(1, t[:, None]).sum()
        if op == "ce_fwd":
            return None, float(loss)
        grad = torch.exp(lp)
        grad.scatter_add_(1, t[:, None], torch.full_like(lp[:, :1], -1.0))
        return grad, float(loss)

    def copy_fn(self, x):
        dst = self.torch.empty_like(x)
        return lambda: dst.copy_(x), "torch.Tensor.copy_"

    def clone(self, data: dict[str, Any]) -> dict[str, Any]:
        return {k: v.clone() for k, v in data.items()}

    def fits(self, point: Point, held: int = 0) -> str | None:
        need = MEM_UNITS[point.op] * point.elements * ITEMSIZE[point.dtype] - held
        need += REF_OVERHEAD_BYTES
        free, _total = self.torch.cuda.mem_get_info()
        # memory this process holds in torch's cache counts as free
        free += self.torch.cuda.memory_reserved() - self.torch.cuda.memory_allocated()
        if need > 0.95 * free:
            return f"does not fit in GPU memory: needs ~{_gib(need)}, {_gib(free)} free"
        return None

    def after_point(self):
        self.torch.cuda.synchronize()
        self.torch.cuda.empty_cache()

    def is_oom(self, e: BaseException) -> bool:
        return isinstance(e, self.torch.cuda.OutOfMemoryError) or "out of memory" in str(e)


def make_env(device: str):
    return CudaEnv() if device == "cuda" else CpuEnv()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
