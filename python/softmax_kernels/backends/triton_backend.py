"""The Triton backend: the kernels in ``kernels/triton/`` (``softmax_kernels.kernels.triton``).

It serves torch CUDA tensors, and CuPy arrays through ``torch.from_dlpack`` (zero-copy; the
kernels then run on CuPy's current stream). With ``TRITON_INTERPRET=1`` in the environment,
read at every call, it also serves torch CPU tensors through the Triton interpreter, which is
how CI tests the kernels on machines without a GPU. No function here synchronises with the host:
cross-entropy's "mean" denominator and its reduced loss are computed on the device, inside at
most 2 kernel launches per call, with no other device operation than allocations.

Launch settings come from one function, :func:`_launch_config`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import re
import sys
import types
from typing import Any, NamedTuple

from .. import _arrays

NAME = "triton"

_INTERPRET_VAR = "TRITON_INTERPRET"


def _interpret() -> bool:
    """TRITON_INTERPRET=1 now (read at call time, as the contract asks)."""
    return os.environ.get(_INTERPRET_VAR) == "1"


# ----------------------------------------------------------------------------------------------
# Availability


@functools.cache
def _import_problem() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else
        return (
            f"triton cannot be imported ({type(e).__name__}: {e}); install it with "
            "pip install 'softmax-kernels[triton]'"
        )
    try:
        import torch  # noqa: F401
    except Exception as e:
        return (
            f"the Triton backend launches through torch, which cannot be imported "
            f"({type(e).__name__}: {e}); pip install torch"
        )
    return None


@functools.cache
def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


# Oldest Triton each mode is known to work with: GPU runs need 3.6 (the sm_90 compile of these
# kernels: ``tl.range`` pipelining, acq_rel atomics, the launch metadata read by _launch_config);
# the interpreter 3.9 (3.6's breaks on NumPy 2.4; the interpreter tests are run against 3.9).
_MIN_TRITON_GPU = (3, 6)
_MIN_TRITON_INTERPRETER = (3, 9)


@functools.cache
def _triton_version() -> tuple[int, int]:
    import triton

    m = re.match(r"(\d+)\.(\d+)", triton.__version__)
    return (int(m[1]), int(m[2])) if m else (0, 0)


def _version_problem(interpret: bool) -> str | None:
    need = _MIN_TRITON_INTERPRETER if interpret else _MIN_TRITON_GPU
    have = _triton_version()
    if have >= need:
        return None
    import triton

    what = "the Triton interpreter (TRITON_INTERPRET=1)" if interpret else "GPU runs"
    floor = ".".join(map(str, need))
    return (
        f"triton {triton.__version__} is too old for {what} of this backend, which needs "
        f"triton >= {floor}: pip install -U 'triton>={floor}'"
    )


def unavailable_reason() -> str | None:
    problem = _import_problem()
    if problem is not None:
        return problem
    if _interpret():
        return _version_problem(True)
    if _cuda_available():
        return _version_problem(False)
    return (
        "no CUDA GPU is visible (torch.cuda.is_available() is False): the Triton backend needs "
        "an NVIDIA GPU, or TRITON_INTERPRET=1 in the environment to run its kernels through "
        "the Triton interpreter on torch CPU tensors (slow; meant for tests)"
    )


def serve_reason(x: Any) -> str | None:
    kind = _arrays.kind_of(x)
    if kind == _arrays.NUMPY:
        return (
            "the Triton backend does not take NumPy arrays; use backend='numpy' for them, or "
            "pass torch tensors (CUDA, or CPU with TRITON_INTERPRET=1)"
        )
    if kind == _arrays.CUPY:
        return None  # through torch.from_dlpack; unavailable_reason() covers torch itself
    if kind == _arrays.TORCH:
        if x.is_cuda or _interpret():
            return None
        if x.device.type != "cpu":
            return f"the Triton backend serves CUDA tensors, not {x.device.type} tensors"
        return (
            "torch CPU tensors run through the Triton backend only under the Triton interpreter: "
            "set TRITON_INTERPRET=1 (slow; meant for tests), use backend='numpy', or move the "
            "tensor to a CUDA device"
        )
    return "the Triton backend takes torch tensors or CuPy arrays"


# ----------------------------------------------------------------------------------------------
# Kernel modules. triton.jit decides at import (decoration) time whether a kernel is compiled
# or interpreted, from TRITON_INTERPRET; since this backend reads the variable at every call,
# it keeps one copy of the kernel modules per mode.

_KERNEL_PACKAGE = "softmax_kernels.kernels.triton"


def _is_interpreted(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


@functools.cache
def _kernels(interpret: bool) -> types.SimpleNamespace:
    def load(package: str) -> types.SimpleNamespace:
        sm = importlib.import_module(f"{package}.softmax")
        ce = importlib.import_module(f"{package}.cross_entropy")
        return types.SimpleNamespace(
            softmax_fwd=sm.softmax_fwd_kernel,
            softmax_bwd=sm.softmax_bwd_kernel,
            cross_entropy_fwd=ce.cross_entropy_fwd_kernel,
            cross_entropy_denom=ce.cross_entropy_denom_kernel,
            cross_entropy_stats=ce.cross_entropy_stats_kernel,
            cross_entropy_grad=ce.cross_entropy_grad_kernel,
        )

    ks = load(_KERNEL_PACKAGE)
    if _is_interpreted(ks.softmax_fwd) == interpret:
        return ks
    # The package was imported in the other mode: import a private copy of its modules now,
    # while TRITON_INTERPRET holds the value this mode needs.
    name = f"{_KERNEL_PACKAGE}_{'interpreted' if interpret else 'compiled'}"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = list(sys.modules[_KERNEL_PACKAGE].__path__)
        sys.modules[name] = pkg
    saved = os.environ.get(_INTERPRET_VAR)
    os.environ[_INTERPRET_VAR] = "1" if interpret else "0"
    try:
        ks = load(name)
    finally:
        if saved is None:
            del os.environ[_INTERPRET_VAR]
        else:
            os.environ[_INTERPRET_VAR] = saved
    if _is_interpreted(ks.softmax_fwd) != interpret:
        raise RuntimeError(
            "could not load the Triton kernels in "
            f"{'interpreter' if interpret else 'compiled'} mode; is TRITON_INTERPRET changing "
            "while they load?"
        )
    return ks


# triton.language's own @triton.jit helpers (tl.zeros, tl.max, tl.sum, tl.cdiv, ...: functions
# of triton/language/standard.py, also bound in triton.language and as tl.tensor methods) are
# decorated once, when triton is imported, as compiled or interpreted functions by the value
# TRITON_INTERPRET had then. The per-mode kernel copies above cover this package's kernels, not
# those helpers: with the variable set after triton was imported, an interpreted kernel called
# the compiled tl.max and failed with "Cannot call @triton.jit'd outside of the scope of a
# kernel" (issue 10 #9). _language_mode gives a launch helpers of its mode: when the imported
# ones are of the other mode, it binds counterparts made from the same Python functions (one per
# helper, so the interpreter's identity tests on combine functions still hold) for the launch
# and restores the originals after it. An interpreted launch also leaves triton.language.core
# patched (the interpreter patches the modules of each device function it calls and restores
# only the kernel's own): those attributes are restored too, so a compiled launch or compile can
# follow in the same process.


def _language_holders() -> list:
    import triton.language as tl

    holders = [tl, tl.standard, tl.core, tl.math, tl.tensor]
    random = sys.modules.get("triton.language.random")
    return holders + ([random] if random is not None else [])


@functools.cache
def _helper_swaps(interpret: bool) -> tuple:
    """(holder, name, replacement) for every triton.language helper of the other mode."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    wrong = JITFunction if interpret else InterpretedFunction
    made: dict[int, Any] = {}
    swaps = []
    for holder in _language_holders():
        for name, fn in list(vars(holder).items()):
            if not isinstance(fn, wrong):
                continue
            if id(fn) not in made:
                if interpret:
                    made[id(fn)] = InterpretedFunction(fn.fn)
                else:
                    made[id(fn)] = JITFunction(fn.fn, **getattr(fn, "kwargs", {}))
            swaps.append((holder, name, made[id(fn)]))
    return tuple(swaps)


@contextlib.contextmanager
def _language_mode(interpret: bool):
    """triton.language as a launch (or compile) in this mode needs it; see above."""
    swaps = _helper_swaps(interpret)
    if not (interpret or swaps):  # the usual GPU case: nothing to do
        yield
        return
    originals = [(holder, name, vars(holder)[name]) for holder, name, _fn in swaps]
    # (modules only: the interpreter restores the class attributes it patches)
    saved = [(h, dict(vars(h))) for h in _language_holders() if not isinstance(h, type)]
    for holder, name, fn in swaps:
        setattr(holder, name, fn)
    try:
        yield
    finally:
        for holder, name, fn in originals:
            setattr(holder, name, fn)
        # (names the interpreter added stay: it puts its helpers into the globals of the
        # functions it rewrites, and their cached rewrites look them up there)
        for holder, attrs in saved:
            now = vars(holder)
            for name, value in attrs.items():
                if now.get(name, _MISSING) is not value:
                    setattr(holder, name, value)


_MISSING = object()


# ----------------------------------------------------------------------------------------------
# Launch settings: one function chooses them all.


class LaunchConfig(NamedTuple):
    strategy: str  # "rows" | "row" | "online" (see _launch_config)
    block_n: int  # BLOCK_N: tile width (>= n_cols) or, online, the chunk length
    rows: int  # ROWS: whole rows per tile (1 for "row" and "online")
    num_warps: int
    num_stages: int  # software pipelining of the persistent tile loop (1: none)
    num_programs: int  # persistent grid: programs loop over tiles pid, pid + grid, ...


# Values per row element a kernel keeps in registers in a single pass (in compute-dtype
# values; float64 takes two 32-bit registers each): the forward holds x (exp and output overwrite
# it); the backward dy and y; cross-entropy x and exp(x - m) (both feed the loss and the
# gradient) and the class weights; soft targets add the target row.
_SINGLE_PASS_VALUES = {
    "softmax_fwd": 1,
    "softmax_fwd_mask": 2,  # + the mask bit, live to the end (masked entries are set last)
    "softmax_bwd": 2,
    "cross_entropy": 2,
    "cross_entropy_soft": 3,
    "cross_entropy_grad": 2,
    "cross_entropy_grad_soft": 3,
}
# Per-lane vectors the online kernels carry through their chunk loop: the chunk and the running
# sum (forward), dy, y and the sum (backward, dy and y die quickly), and for cross-entropy the
# chunk, exp sums, the coefficient sums and the weighted-logit sums.
_ONLINE_VALUES = {"softmax_fwd": 2, "softmax_fwd_mask": 2, "softmax_bwd": 2, "cross_entropy": 4,
                  "cross_entropy_soft": 4, "cross_entropy_grad": 4,
                  "cross_entropy_grad_soft": 4}  # fmt: skip
# Input arrays streamed per element (for the shared memory a pipelined tile needs).
_INPUTS = {"softmax_fwd": 1, "softmax_fwd_mask": 1, "softmax_bwd": 2, "cross_entropy": 1,
           "cross_entropy_soft": 2, "cross_entropy_grad": 1,
           "cross_entropy_grad_soft": 2}  # fmt: skip
# The mean denominator kernel: blocks of up to 4096 targets per program (32 KB of int64), 8
# warps; one program per block up to the SM count, so that the blocks are read in parallel.
_DENOM_ROWS = 4096
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}

# A single pass keeps the whole tile in registers. A program of 16 warps (512 threads) may use
# 128 registers per thread (64K per SM). 16384 32-bit words of row data is 32 per thread; with
# addresses, masks and temporaries that compiles for sm_90 in 75-128 registers without spills
# (cuobjdump -res-usage on Triton 3.6's and 3.9's cubins, every op and dtype at its limit; see
# tests/test_triton_backend.py::test_compiles_for_sm90_without_spills). At 32768 words the
# forward alone hits the 128-register cap and spills 152 bytes per thread, so longer rows go to
# the online kernel.
_SINGLE_PASS_WORDS = 16384
# Short rows are packed several to a tile of about 4096 words (16 KB of float32) spread over
# 16 warps, 8 words per thread: that compiles to 30-80 registers (16 words per thread took
# 100-140, halving the warps an SM can hold), and 2 resident programs keep 32 KB per SM in
# flight, above the ~18 KB Little's law asks for (~3.3 TB/s x ~0.7 us latency / 132 SMs).
_TILE_WORDS = 4096
_WORDS_PER_THREAD = 8
# Online: chunks of 16384 words of per-lane state over 16 warps (32 registers per thread), e.g.
# 8192 float32 elements for the forward. Large chunks amortise the one block-wide max reduction
# per chunk; every other running sum is kept per lane and reduced once per row.
_CHUNK_WORDS = 16384
_MAX_WARPS = 16
# Persistent grid: programs per SM so that ~32 warps are resident (half of the 64 an sm_90 SM
# holds, leaving each thread 64 registers); a tile too big for that still gets one program.
_RESIDENT_WARPS_PER_SM = 32
# Software pipelining (2 stages) keeps the next tile's input in shared memory while this one is
# reduced, so loads stay in flight through the reduction. Used when programs have a next tile,
# both stages of every resident program's input fit in 160 KB of the 227 KB of shared memory an
# sm_90 SM has, and the tile is at most 8192 words: the prefetch costs registers, and on the
# 16384-word tiles it pushed cross-entropy into spills (cuobjdump: 128 registers + 16 B stack).
_PIPELINE_SMEM_BYTES = 160 * 1024
_PIPELINE_TILE_WORDS = 8192
# The interpreter (CPU) runs programs one after another: a few programs, each looping.
_INTERPRETER_PROGRAMS = 4


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _pow2_at_most(n: int) -> int:
    return 1 << max(1, int(n)).bit_length() - 1


def _launch_config(
    n_rows: int, n_cols: int, dtype: str, op: str, n_sm: int | None = None
) -> LaunchConfig:
    """Block size, warps, rows per program, pipelining, grid and strategy for one call.

    ``dtype``: the data's dtype name ("float16", "bfloat16", "float32", "float64"); ``op``:
    "softmax_fwd", "softmax_bwd", "cross_entropy" or "cross_entropy_soft"; ``n_sm``: the GPU's
    SM count, or None under the interpreter.

    Strategies:
    - "rows": short rows, several whole rows per tile ([ROWS, BLOCK_N]), one pass;
    - "row": one whole row per tile, one pass (forward: 1 read + 1 write);
    - "online": rows longer than the single-pass limit, in chunks of BLOCK_N with the running
      max/sum merged per chunk, then a second pass (forward: 2 reads + 1 write).
    """
    n_rows, n_cols = max(int(n_rows), 1), max(int(n_cols), 1)
    if op == "cross_entropy_denom":
        block = min(_DENOM_ROWS, _pow2_at_least(n_rows))
        n_blocks = -(-n_rows // block)
        grid = min(n_blocks, n_sm if n_sm is not None else _INTERPRETER_PROGRAMS)
        return LaunchConfig("rows", block, block, max(1, min(8, block // 256)), 1, grid)
    words = 2 if dtype == "float64" else 1  # 32-bit registers per computed value
    block_n = _pow2_at_least(n_cols)
    per_elem = words * _SINGLE_PASS_VALUES[op]
    if block_n * per_elem <= _SINGLE_PASS_WORDS:
        rows = min(_pow2_at_most(_TILE_WORDS // (block_n * per_elem)), _pow2_at_least(n_rows))
        if n_sm is not None:
            # fewer tiles than SMs would leave SMs idle: smaller tiles instead
            while rows > 1 and -(-n_rows // rows) < n_sm:
                rows //= 2
        strategy = "rows" if rows > 1 else "row"
        n_tiles = -(-n_rows // rows)
    else:
        strategy = "online"
        per_elem = words * _ONLINE_VALUES[op]
        block_n = _CHUNK_WORDS // per_elem
        rows = 1
        n_tiles = n_rows
    tile_words = rows * block_n * per_elem
    num_warps = max(1, min(_MAX_WARPS, _pow2_at_least(tile_words // (32 * _WORDS_PER_THREAD))))
    if n_sm is None:
        per_sm, grid = 1, min(n_tiles, _INTERPRETER_PROGRAMS)
    else:
        per_sm = max(1, _RESIDENT_WARPS_PER_SM // num_warps)
        grid = min(n_tiles, n_sm * per_sm)
    smem = 2 * rows * block_n * _INPUTS[op] * _ITEMSIZE[dtype] * per_sm
    pipeline = (
        strategy != "online"
        and n_tiles > grid
        and smem <= _PIPELINE_SMEM_BYTES
        and tile_words <= _PIPELINE_TILE_WORDS
    )
    stages = 2 if pipeline else 1
    return LaunchConfig(strategy, block_n, rows, num_warps, stages, max(1, grid))


# ----------------------------------------------------------------------------------------------
# Operands: the caller's arrays as torch tensors, and where to launch.


def _tensor(a: Any):
    """a as a torch tensor, zero-copy (CuPy through DLPack); None stays None."""
    if a is None or _arrays.kind_of(a) == _arrays.TORCH:
        return a
    import torch

    return torch.from_dlpack(a)


@functools.cache
def _sm_count(index: int) -> int:
    import torch

    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _n_sm(t) -> int | None:
    """The SM count for a tensor's device, None under the interpreter (which sizes the grid
    for a CPU)."""
    if _interpret() or not t.is_cuda:
        return None
    return _sm_count(t.device.index if t.device.index is not None else 0)


@contextlib.contextmanager
def _launch_context(orig: Any, t):
    """Launch on t's device and on the caller's current stream: torch's (the default), or
    CuPy's for CuPy arrays (wrapped as a torch external stream), with triton.language in the
    launch's mode (_language_mode)."""
    with _language_mode(_interpret()):
        with _device_stream(orig, t):
            yield


@contextlib.contextmanager
def _device_stream(orig: Any, t):
    if not t.is_cuda:
        import numpy as np

        # The interpreter computes padding lanes and masked-out rows too (inf/NaN there are
        # never stored): keep NumPy from warning about them.
        with np.errstate(all="ignore"):
            yield
        return
    import torch

    with torch.cuda.device(t.device):
        if _arrays.kind_of(orig) == _arrays.CUPY:
            import cupy

            ptr = cupy.cuda.get_current_stream().ptr
            if ptr != torch.cuda.current_stream(t.device).cuda_stream:
                with torch.cuda.stream(torch.cuda.ExternalStream(ptr, device=t.device)):
                    yield
                return
        yield


def _row_stride(t) -> int:
    return int(t.stride(0)) if t.shape[0] > 1 else int(t.shape[1])


def _dtype(t) -> str:
    return str(t.dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------
# The backend interface


def softmax_fwd(x, out, *, scale: float, mask, is_log: bool, config: LaunchConfig | None = None):
    """out = softmax(scale * x) (log_softmax with is_log) over the rows; see dispatch.

    ``config`` overrides :func:`_launch_config` (tests use it to reach every strategy)."""
    xt, ot, mt = _tensor(x), _tensor(out), _tensor(mask)
    n_rows, n_cols = xt.shape
    if n_rows == 0 or n_cols == 0:
        return
    op = "softmax_fwd" if mt is None else "softmax_fwd_mask"
    cfg = config or _launch_config(n_rows, n_cols, _dtype(xt), op, _n_sm(xt))
    if mt is not None:
        import torch

        mt = mt.view(torch.uint8)  # same bytes; Triton loads u8 and tests != 0
    kernel = _kernels(_interpret()).softmax_fwd
    with _launch_context(x, xt):
        kernel[(cfg.num_programs,)](
            xt, ot, mt if mt is not None else xt,
            n_rows, n_cols, _row_stride(xt), _row_stride(ot),
            _row_stride(mt) if mt is not None else 0,
            float(scale),
            IS_LOG=bool(is_log), HAS_MASK=mt is not None, IS_FP64=_dtype(xt) == "float64",
            ONLINE=cfg.strategy == "online", ROWS=cfg.rows, BLOCK_N=cfg.block_n,
            NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
        )  # fmt: skip


def softmax_bwd(dy, y, out, *, scale: float, is_log: bool, config: LaunchConfig | None = None):
    """out = scale * y * (dy - sum(dy * y)) or, log, scale * (dy - exp(y) * sum(dy))."""
    dyt, yt, ot = _tensor(dy), _tensor(y), _tensor(out)
    n_rows, n_cols = yt.shape
    if n_rows == 0 or n_cols == 0:
        return
    cfg = config or _launch_config(n_rows, n_cols, _dtype(yt), "softmax_bwd", _n_sm(yt))
    kernel = _kernels(_interpret()).softmax_bwd
    with _launch_context(y, yt):
        kernel[(cfg.num_programs,)](
            dyt, yt, ot,
            n_rows, n_cols, _row_stride(dyt), _row_stride(yt), _row_stride(ot),
            float(scale),
            IS_LOG=bool(is_log), IS_FP64=_dtype(yt) == "float64",
            ACC_FP64=_dtype(yt) in ("float32", "float64"),
            ONLINE=cfg.strategy == "online", ROWS=cfg.rows, BLOCK_N=cfg.block_n,
            NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
        )  # fmt: skip


# Cross-entropy. reduction and "mean" denominator codes of cross_entropy_fwd_kernel (REDUCE,
# DENOM; see kernels/triton/cross_entropy.py).
_REDUCE = {"none": 0, "sum": 1, "mean": 2}
_DENOM_NONE, _DENOM_GIVEN, _DENOM_KERNEL, _DENOM_IN_PASS, _DENOM_ROWS = range(5)

# One int32 ticket counter per (device, stream), for the kernels' last-program reductions. It is
# zeroed once, when created; every kernel that takes tickets leaves it at 0 again (its last
# program resets it), so no call needs a memset. Per stream, because kernels on different
# streams may run at the same time; on one stream they run one after another.
_TICKETS: dict[tuple, Any] = {}


def _ticket_counter(t):
    """The ticket counter for t's device and the current stream (call inside _launch_context)."""
    import torch

    if t.is_cuda:
        key = (t.device.index, torch.cuda.current_stream(t.device).cuda_stream)
    else:
        key = ("cpu",)
    counter = _TICKETS.get(key)
    if counter is None:
        counter = _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=t.device)
    return counter


@contextlib.contextmanager
def _tickets_reset_on_error(counter):
    """A launch that raises (the interpreter runs kernels on the host; a bug or an interrupt
    stops it between programs) may leave the counter non-zero: zero it then, so that the next
    call's last-program test is not off."""
    try:
        yield
    except BaseException:
        counter.zero_()
        raise


def _int64_or_never(v: int) -> int:
    """An ignore_index as an int64: one outside the int64 range can equal no int64 target, and
    any value outside [0, C) behaves the same."""
    v = int(v)
    return v if -(2**63) <= v < 2**63 else -(2**63)


def _softcap_arg(softcap) -> tuple[bool, float]:
    return (softcap is not None), (float(softcap) if softcap is not None else 0.0)


def _ce_op(soft: bool, kind: str = "") -> str:
    return "cross_entropy" + kind + ("_soft" if soft else "")


def cross_entropy_fwd(
    logits,
    target,
    *,
    loss,
    grad,
    lse,
    soft: bool,
    weight,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap,
    grad_scale: float,
    reduction: str,
    denom,
    config: LaunchConfig | None = None,
) -> None:
    """Loss (per row, or reduced to 0-d), log-sum-exp and gradient in one pass; see dispatch.
    At most 2 launches: with reduction "mean", a gradient, class targets and no ``denom``,
    cross_entropy_denom_kernel first computes the denominator the gradient is scaled by; every
    other case is one launch of cross_entropy_fwd_kernel, which also reduces the loss. Besides
    the launches only allocations (torch.empty) are issued. ``config`` overrides
    :func:`_launch_config` for the main kernel (tests use it to reach every strategy)."""
    import torch

    xt, tt, lt, gt = _tensor(logits), _tensor(target), _tensor(loss), _tensor(grad)
    et, wt, dt = _tensor(lse), _tensor(weight), _tensor(denom)
    n_rows, n_cols = xt.shape
    red = _REDUCE[reduction]
    if n_rows == 0 or n_cols == 0:
        if red:
            lt.zero_()  # no rows: sum 0, and mean 0 (nothing counted)
        return
    n_sm = _n_sm(xt)
    cfg = config or _launch_config(n_rows, n_cols, _dtype(xt), _ce_op(soft), n_sm)
    if red != _REDUCE["mean"]:
        dmode = _DENOM_NONE
    elif dt is not None:
        dmode = _DENOM_GIVEN
    elif soft:
        dmode = _DENOM_ROWS
    elif gt is not None:
        dmode = _DENOM_KERNEL
    else:
        dmode = _DENOM_IN_PASS
    has_cap, cap = _softcap_arg(softcap)
    ignore_index = _int64_or_never(ignore_index)
    ks = _kernels(_interpret())
    with _launch_context(logits, xt):
        tickets = _ticket_counter(xt)
        scratch = part = None
        dcfg = None
        if red:
            # float64 scratch: [denominator, counted rows], the denominator kernel's partials
            # [2, its grid], this kernel's partials [3, grid]
            n_den = 0
            if dmode == _DENOM_KERNEL:
                dcfg = _launch_config(n_rows, 1, "int64", "cross_entropy_denom", n_sm)
                n_den = dcfg.num_programs
            scratch = torch.empty(2 + 2 * n_den + 3 * cfg.num_programs, dtype=torch.float64,
                                  device=xt.device)  # fmt: skip
            part = scratch[2 + 2 * n_den :]
        with _tickets_reset_on_error(tickets):
            if dcfg is not None:
                ks.cross_entropy_denom[(dcfg.num_programs,)](
                    tt, wt if wt is not None else xt, scratch, scratch[2:], tickets,
                    n_rows, n_cols, ignore_index,
                    HAS_WEIGHT=wt is not None, BLOCK_R=dcfg.block_n, num_warps=dcfg.num_warps,
                )  # fmt: skip
            denom_arg = scratch if dmode == _DENOM_KERNEL else dt
            ks.cross_entropy_fwd[(cfg.num_programs,)](
                xt, tt, wt if wt is not None else xt, lt, gt if gt is not None else xt,
                et if et is not None else lt, denom_arg if denom_arg is not None else lt,
                part if part is not None else lt, tickets,
                n_rows, n_cols, _row_stride(xt), _row_stride(tt) if soft else 1,
                _row_stride(gt) if gt is not None else n_cols,
                ignore_index, float(label_smoothing), float(z_loss), cap, float(grad_scale),
                SOFT=bool(soft), HAS_WEIGHT=wt is not None, HAS_GRAD=gt is not None,
                HAS_LSE=et is not None, HAS_SMOOTHING=float(label_smoothing) != 0.0,
                HAS_Z=float(z_loss) != 0.0, SOFTCAP=has_cap, IS_FP64=_dtype(xt) == "float64",
                REDUCE=red, DENOM=dmode,
                ONLINE=cfg.strategy == "online", ROWS=cfg.rows, BLOCK_N=cfg.block_n,
                NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
            )  # fmt: skip


def cross_entropy_stats(
    logits,
    target,
    stats,
    *,
    soft: bool,
    weight,
    ignore_index: int,
    vocab_start: int,
    label_smoothing: float,
    softcap,
    config: LaunchConfig | None = None,
) -> None:
    """Per row, this rank's statistics of a vocabulary-parallel cross-entropy into ``stats``
    ((n_rows, K)); see dispatch. One launch; reads the logits (and soft targets) once."""
    xt, tt, st, wt = _tensor(logits), _tensor(target), _tensor(stats), _tensor(weight)
    n_rows, n_cols = xt.shape
    if n_rows == 0 or n_cols == 0:
        return
    cfg = config or _launch_config(n_rows, n_cols, _dtype(xt), _ce_op(soft), _n_sm(xt))
    has_cap, cap = _softcap_arg(softcap)
    kernel = _kernels(_interpret()).cross_entropy_stats
    with _launch_context(logits, xt):
        kernel[(cfg.num_programs,)](
            xt, tt, wt if wt is not None else xt, st,
            n_rows, n_cols, _row_stride(xt), _row_stride(tt) if soft else 1, _row_stride(st),
            _int64_or_never(ignore_index), int(vocab_start), cap,
            SOFT=bool(soft), HAS_WEIGHT=wt is not None,
            HAS_SMOOTHING=float(label_smoothing) != 0.0, SOFTCAP=has_cap,
            IS_FP64=_dtype(xt) == "float64",
            ONLINE=cfg.strategy == "online", ROWS=cfg.rows, BLOCK_N=cfg.block_n,
            NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
        )  # fmt: skip


def _same_memory(a, b) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def cross_entropy_grad(
    logits,
    target,
    grad,
    *,
    row_lse,
    row_coef,
    row_scale,
    soft: bool,
    weight,
    ignore_index: int,
    vocab_start: int,
    keep: float,
    eps_c: float,
    softcap,
    grad_scale: float,
    config: LaunchConfig | None = None,
) -> None:
    """The vocabulary-parallel gradient from the merged row statistics; see dispatch. One
    launch; reads the logits (and soft targets) once, writes the gradient once (``grad`` may
    be the logits' memory)."""
    xt, tt, gt, wt = _tensor(logits), _tensor(target), _tensor(grad), _tensor(weight)
    lt, ct, rt = _tensor(row_lse), _tensor(row_coef), _tensor(row_scale)
    n_rows, n_cols = xt.shape
    if n_rows == 0 or n_cols == 0:
        return
    cfg = config or _launch_config(n_rows, n_cols, _dtype(xt), _ce_op(soft, "_grad"), _n_sm(xt))
    has_cap, cap = _softcap_arg(softcap)
    kernel = _kernels(_interpret()).cross_entropy_grad
    with _launch_context(logits, xt):
        kernel[(cfg.num_programs,)](
            xt, tt, wt if wt is not None else xt, gt, lt, ct, rt,
            n_rows, n_cols, _row_stride(xt), _row_stride(tt) if soft else 1, _row_stride(gt),
            _int64_or_never(ignore_index), int(vocab_start), float(keep), float(eps_c), cap,
            float(grad_scale),
            SOFT=bool(soft), HAS_WEIGHT=wt is not None, HAS_SMOOTHING=float(eps_c) != 0.0,
            SOFTCAP=has_cap, IS_FP64=_dtype(xt) == "float64", INPLACE=_same_memory(xt, gt),
            ONLINE=cfg.strategy == "online", ROWS=cfg.rows, BLOCK_N=cfg.block_n,
            NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
        )  # fmt: skip


__all__ = [
    "NAME",
    "LaunchConfig",
    "cross_entropy_fwd",
    "cross_entropy_grad",
    "cross_entropy_stats",
    "serve_reason",
    "softmax_bwd",
    "softmax_fwd",
    "unavailable_reason",
]
