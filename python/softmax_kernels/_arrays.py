"""Array-library glue: what kind of array we were given, and the few operations the API layer
needs on it (permute, reshape to rows, allocate, copy), for NumPy, CuPy and torch alike.

Everything here is shape bookkeeping; no arithmetic over the data happens in this module. The
optional libraries are looked up in ``sys.modules`` only, so a NumPy user never pays for importing
torch or cupy, and the package imports with neither installed.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any
from weakref import ref as _weakref

import numpy as np

NUMPY, TORCH, CUPY = "numpy", "torch", "cupy"

# Floating dtypes the contract accepts, by name. bfloat16 exists only in torch.
FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


def _torch():
    return sys.modules.get("torch")


def _cupy():
    return sys.modules.get("cupy")


def kind_of(x: Any) -> str | None:
    """'numpy', 'torch', 'cupy' or None for anything else."""
    if isinstance(x, np.ndarray):
        return NUMPY
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        return TORCH
    cupy = _cupy()
    if cupy is not None and isinstance(x, cupy.ndarray):
        return CUPY
    return None


def as_supported_array(x: Any, name: str, *, native: bool = True) -> Any:
    """Return ``x`` if it is an array kind we serve; import a ``__dlpack__`` GPU array as a torch
    tensor (or a CuPy array when torch is missing), zero-copy; otherwise raise TypeError. A
    NumPy array of non-native byte order is converted once (``native=False``: kept, for outputs
    written through NumPy's casting copies)."""
    if isinstance(x, np.ndarray):
        if isinstance(x, np.ma.MaskedArray):
            raise TypeError(
                f"{name} is a numpy.ma.MaskedArray, whose mask softmax_kernels would ignore; "
                f"pass its data with the mask as where=: sk.softmax({name}.data, "
                f"where=~np.ma.getmaskarray({name}))"
            )
        if isinstance(x, np.matrix):
            raise TypeError(
                f"{name} is a numpy.matrix (always 2-D, with matrix semantics); pass "
                f"np.asarray({name})"
            )
        if native and not x.dtype.isnative:
            # big-endian (or other non-native) data: converted once to native byte order
            return x.astype(x.dtype.newbyteorder("="))
        return x
    if kind_of(x) is not None:
        return x
    if hasattr(x, "__dlpack__"):
        try:
            import torch

            return torch.from_dlpack(x)
        except ImportError:
            pass
        try:
            import cupy

            return cupy.from_dlpack(x)
        except ImportError:
            pass
        raise TypeError(
            f"{name}: an object with __dlpack__ ({type(x).__name__}) needs torch or cupy to be "
            "imported; install one of them (pip install 'softmax-kernels[torch]')"
        )
    raise TypeError(
        f"{name} must be a numpy.ndarray, cupy.ndarray or torch.Tensor (or have __dlpack__), "
        f"got {type(x).__name__}"
    )


_NP_DTYPE_NAMES: dict = {}  # NumPy dtype -> name: dtype.name takes ~3.5 us, called ~6x per op


def dtype_name(x: Any) -> str:
    """The dtype's name without the library prefix or byte order: 'float32', 'int64', ..."""
    if isinstance(x, (np.ndarray, np.generic)):  # (a tuple: torch.compile traces this)
        dt = x.dtype
        name = _NP_DTYPE_NAMES.get(dt)
        if name is None:
            name = _NP_DTYPE_NAMES[dt] = dt.name
        return name
    return str(x.dtype).replace("torch.", "")


def is_cuda(x: Any) -> bool:
    k = kind_of(x)
    return k == CUPY or (k == TORCH and x.is_cuda)


def device_str(x: Any) -> str:
    k = kind_of(x)
    if k == NUMPY:
        return "cpu"
    if k == TORCH:
        return str(x.device)
    return f"cuda:{x.device.id}"


def check_float(x: Any, name: str) -> str:
    """Raise TypeError unless ``x`` has a floating dtype the contract accepts; return its name."""
    dn = dtype_name(x)
    if dn not in FLOAT_NAMES:
        raise TypeError(
            f"{name} has dtype {dn}; expected a floating dtype "
            "(float16, bfloat16 (torch only), float32 or float64)"
        )
    return dn


def compute_dtype_name(dn: str) -> str:
    """Half types are computed (and losses returned) in float32, float64 in float64."""
    return "float64" if dn == "float64" else "float32"


def strides_elems(x: Any) -> tuple[int, ...]:
    if kind_of(x) == TORCH:
        return tuple(x.stride())
    return tuple(s // x.itemsize for s in x.strides)


@dataclass(frozen=True)
class Ops:
    """The handful of array operations the API layer needs, for one array kind."""

    kind: str

    @property
    def xp(self):
        return np if self.kind == NUMPY else _cupy()

    def permute(self, x, perm):
        if tuple(perm) == tuple(range(x.ndim)):
            return x
        return x.permute(*perm) if self.kind == TORCH else x.transpose(perm)

    def view_as_shape(self, x, shape):
        """A view of ``x`` with ``shape``, or None when that needs a copy."""
        if tuple(x.shape) == tuple(shape):
            return x
        if self.kind == TORCH:
            try:
                return x.view(shape)
            except RuntimeError:
                return None
        if self.kind == NUMPY:
            try:
                return np.reshape(x, shape, copy=False)  # NumPy >= 2.1
            except ValueError:
                return None
            except TypeError:  # older NumPy: no copy= keyword
                pass
        v = x.view()
        try:
            v.shape = shape  # CuPy (and old NumPy) reshape in place only without a copy
        except (AttributeError, ValueError):
            return None
        return v

    def contiguous(self, x):
        if self.kind == TORCH:
            return x.contiguous()
        return self.xp.ascontiguousarray(x)

    def empty(self, shape, dtype, like):
        if isinstance(dtype, str):
            dtype = self.dtype(dtype)
        if self.kind == TORCH:
            return _torch_empty(tuple(shape), dtype, like)
        if self.kind == NUMPY:
            return cpu_empty(tuple(shape), dtype)
        return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype, like):
        if isinstance(dtype, str):
            dtype = self.dtype(dtype)
        if self.kind == TORCH:
            return _torch().zeros(shape, dtype=dtype, device=like.device)
        return self.xp.zeros(shape, dtype=dtype)

    def dtype(self, name):
        if self.kind == TORCH:
            return getattr(_torch(), name)
        return self.xp.dtype(name)

    def astype(self, x, name):
        if dtype_name(x) == name:
            return x
        if self.kind == TORCH:
            return x.to(getattr(_torch(), name))
        return x.astype(name)

    def broadcast_to(self, x, shape):
        if x.ndim > len(shape):
            # NumPy's rule for every kind (torch would reshape a (2, 6) mask onto (12,))
            raise ValueError(f"cannot broadcast {tuple(x.shape)} to {tuple(shape)}")
        if self.kind == TORCH:
            return x.expand(shape)
        return self.xp.broadcast_to(x, shape)

    def copy_into(self, dst, src):
        """dst[...] = src (shapes equal)."""
        if self.kind == TORCH:
            dst.copy_(src)
        else:
            dst[...] = src

    def full(self, shape, value: float, dtype, like):
        """An array filled with value on like's device: a fill kernel on a GPU, never a
        host-to-device copy (those would block and break CUDA-graph capture)."""
        if isinstance(dtype, str):
            dtype = self.dtype(dtype)
        if self.kind == TORCH:
            return _torch().full(shape, value, dtype=dtype, device=like.device)
        return self.xp.full(shape, value, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# CPU output buffers.
#
# A fresh output costs more than the kernel writing it unless its memory is already mapped.
# Measured on the 2-core VM (interleaved with torch's calls, as a benchmark or a training step
# runs them): glibc serves blocks under its mmap threshold (128 KiB, rising to 32 MiB once such
# blocks are freed) from the heap, whose top it trims back to the kernel and faults in again
# whenever two callers' blocks alternate (16 MiB: 0.6 ms alone, 1.3 ms interleaved); from 32 MiB
# every block is a fresh mmap: NumPy's (madvised to 2 MiB pages) costs ~0.05 ms/MiB of faults
# and zeroing, torch's (4 KiB pages) ~0.35 ms/MiB, as much as the kernel itself or more (64 MiB:
# 13 ms for NumPy's empty + write, 32 ms for torch's, 10 ms for the write alone).
#
# So outputs of CPU arrays from _POOL_MIN_BYTES on come from blocks kept here: a block is handed
# out as a 1-D array over a memoryview of it, reshaped. Every NumPy view of the result keeps
# that 1-D array alive as its base (NumPy collapses a view's base only through arrays whose own
# base is an array), and so does every torch tensor made by torch.from_numpy. When the last of
# them dies, a weakref callback puts the block back, and the next output of about that size
# reuses it already mapped: no page faults, no zeroing, no system call. Free blocks are kept up to
# 1 GiB in all (at most a quarter of the machine's memory, and 16 blocks; the oldest freed go
# first); SOFTMAX_KERNELS_CPU_POOL_MB sets that limit (0: no pool, every output from np.empty);
# release_cpu_buffers() empties it. Blocks are 64-byte aligned (AVX-512 lines).

_POOL_ENV = "SOFTMAX_KERNELS_CPU_POOL_MB"
_POOL_MIN_BYTES = 1 << 18
_POOL_MAX_BLOCKS = 16
_POOL_ALIGN = 64


def _pool_keep_bytes() -> int:
    import os

    v = os.environ.get(_POOL_ENV)
    if v is not None:
        try:
            return max(0, int(float(v) * (1 << 20)))
        except ValueError:
            pass
    keep = 1 << 30
    try:  # at most a quarter of the machine's memory
        keep = min(keep, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4)
    except (AttributeError, OSError, ValueError):
        pass
    return keep


class _Pool:
    def __init__(self):
        import collections
        import threading

        self.keep = _pool_keep_bytes()
        # refcount-based liveness needs the GIL (free-threaded builds: no pool)
        gil = getattr(sys, "_is_gil_enabled", lambda: True)()
        self.enabled = self.keep > 0 and gil
        self.free: list = []  # free blocks (uint8 arrays), oldest returned first
        self.free_bytes = 0
        self.live: dict = {}  # id of a weakref to a handed-out 1-D array -> (weakref, block)
        self.returned = collections.deque()  # blocks given back, not yet in free
        self.lock = threading.Lock()

    def _gone(self, ref) -> None:
        # The weakref callback: may run in any thread, at any point (a GC in the middle of
        # take()), so it only moves the block to the deque (atomic) and tidies up when the
        # lock is free.
        item = self.live.pop(id(ref), None)
        if item is None:  # (interpreter shutdown: the pool is being torn down)
            return
        self.returned.append(item[1])
        if self.lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self.lock.release()

    def _drain(self) -> None:
        while self.returned:
            b = self.returned.popleft()
            self.free.append(b)
            self.free_bytes += b.nbytes
        while self.free and (self.free_bytes > self.keep or len(self.free) > _POOL_MAX_BLOCKS):
            self.free_bytes -= self.free.pop(0).nbytes  # the oldest freed goes back to the OS

    def take(self, nbytes: int):
        """A free block of nbytes to 1.25 x nbytes + 64 KiB (the smallest such; of equal ones
        the last returned, whose lines may still be in cache: with the oldest, two callers'
        blocks of one size took turns and every output started cold), or None."""
        hi = nbytes + (nbytes >> 2) + (1 << 16)
        with self.lock:
            if self.returned:
                self._drain()
            best, size = -1, hi + 1
            for i, b in enumerate(self.free):
                if nbytes <= b.nbytes <= size:
                    best, size = i, b.nbytes
            if best < 0:
                return None
            self.free_bytes -= size
            return self.free.pop(best)

    def clear(self) -> None:
        with self.lock:
            self._drain()
            self.free.clear()
            self.free_bytes = 0

    def empty(self, shape: tuple[int, ...], dtype: np.dtype, count: int) -> np.ndarray:
        nbytes = count * dtype.itemsize
        block = self.take(nbytes)
        if block is None:
            size = -(-nbytes // (1 << 16)) << 16  # whole 64 KiB: near sizes share blocks
            raw = np.empty(size + _POOL_ALIGN, np.uint8)
            off = -raw.ctypes.data % _POOL_ALIGN
            block = raw[off : off + size]
        # over a memoryview, never the block itself: NumPy would collapse the views' bases
        # down to the block's owner, and a view could outlive `flat`
        flat = np.frombuffer(memoryview(block), dtype=dtype, count=count)
        r = _weakref(flat, self._gone)
        self.live[id(r)] = (r, block)
        return flat.reshape(shape)


_pool: _Pool | None = None


def cpu_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """np.empty(shape, dtype) for an output: from the block pool above from _POOL_MIN_BYTES."""
    global _pool
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    if count * dtype.itemsize >= _POOL_MIN_BYTES:
        if _pool is None:
            _pool = _Pool()
        if _pool.enabled:
            return _pool.empty(tuple(shape), dtype, count)
    return np.empty(shape, dtype)


def release_cpu_buffers() -> None:
    """Return the pool's free blocks to the operating system (blocks in use are unaffected and
    are freed when their arrays die)."""
    if _pool is not None:
        _pool.clear()


# Outputs of torch CPU tensors in the dtypes NumPy has come from cpu_empty, through
# torch.from_numpy (zero-copy): torch's own allocator faults large outputs in 4 KiB pages at a
# time and never reuses them (above).
_NUMPY_ALLOC_MIN = _POOL_MIN_BYTES
_NUMPY_NAMES = ("float16", "float32", "float64", "int32", "int64", "bool", "uint8")


def _torch_empty(shape: tuple[int, ...], dtype, like):
    torch = _torch()
    name = str(dtype).replace("torch.", "")
    if (
        type(like) is torch.Tensor  # not a FakeTensor / functional tensor while tracing
        and like.device.type == "cpu"
        and name in _NUMPY_NAMES
        and math.prod(shape) * dtype.itemsize >= _NUMPY_ALLOC_MIN
        and not torch.compiler.is_compiling()
    ):
        return torch.from_numpy(cpu_empty(shape, name))
    return torch.empty(shape, dtype=dtype, device=like.device)


def ops_for(x: Any) -> Ops:
    return Ops(kind_of(x))


def normalize_axes(axis, ndim: int) -> tuple[int, ...]:
    """int, tuple of ints or None -> sorted tuple of distinct non-negative axes.

    Raises numpy.exceptions.AxisError (a ValueError) when an axis is out of range, TypeError
    for something that is not an axis, ValueError for a repeated axis."""
    if type(axis) is int and -ndim <= axis < ndim:  # the common case, ~1.5 us less per call
        return (axis % ndim,)
    from numpy.exceptions import AxisError

    if axis is None:
        return tuple(range(ndim))
    items = axis if isinstance(axis, (tuple, list)) else (axis,)
    out = []
    for a in items:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
            raise TypeError(f"axis must be an int, a tuple of ints or None, got {axis!r}")
        a = int(a)
        if not -ndim <= a < ndim:
            raise AxisError(a, ndim)
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"repeated axis in axis={axis!r}")
    return tuple(sorted(out))


@dataclass
class RowLayout:
    """How an N-d array maps onto the 2-D (n_rows, n_cols) rows the kernels see: the axes being
    reduced are moved last (in their original order) and flattened into one row; the others,
    flattened, index the rows. Computed once per call and applied to every operand."""

    shape: tuple[int, ...]
    perm: tuple[int, ...]
    n_rows: int
    n_cols: int

    @classmethod
    def for_axes(cls, shape, axes) -> RowLayout:
        shape = tuple(int(s) for s in shape)
        other = tuple(a for a in range(len(shape)) if a not in axes)
        perm = other + tuple(axes)
        return cls(
            shape=shape,
            perm=perm,
            n_rows=math.prod(shape[a] for a in other),
            n_cols=math.prod(shape[a] for a in axes),
        )

    @property
    def rows_shape(self) -> tuple[int, int]:
        return (self.n_rows, self.n_cols)

    @property
    def permuted_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.perm)

    @property
    def inverse_perm(self) -> tuple[int, ...]:
        inv = [0] * len(self.perm)
        for i, p in enumerate(self.perm):
            inv[p] = i
        return tuple(inv)

    def rows_view(self, x, ops: Ops):
        """A (n_rows, n_cols) view of x whose rows the kernels can address (last axis unit
        stride, non-negative row stride), or None when only a copy would do."""
        v = ops.view_as_shape(ops.permute(x, self.perm), self.rows_shape)
        if v is None:
            return None
        rs, cs = strides_elems(v)
        if (self.n_cols > 1 and cs != 1) or (self.n_rows > 1 and rs < 0):
            return None
        return v

    def rows(self, x, ops: Ops):
        """Rows of x for reading: a view when possible, else a contiguous copy."""
        v = self.rows_view(x, ops)
        if v is not None:
            return v
        return ops.contiguous(ops.permute(x, self.perm)).reshape(self.rows_shape)

    def unrows(self, x2d, ops: Ops):
        """The inverse of rows(): a view of x2d in the original shape and axis order."""
        return ops.permute(x2d.reshape(self.permuted_shape), self.inverse_perm)

    def write_back(self, dst, x2d, ops: Ops):
        """dst[...] = the rows x2d, in dst's own shape and axis order."""
        ops.copy_into(ops.permute(dst, self.perm), x2d.reshape(self.permuted_shape))
