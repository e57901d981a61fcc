"""``@triton.jit`` helpers shared by the softmax and cross-entropy kernels.

Every kernel computes in float32 for float16/bfloat16/float32 data and in float64 for float64
data; ``IS_FP64`` (a constexpr) selects which, so each helper compiles to one branch only.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * log2(e))
NEG_INF = tl.constexpr(float("-inf"))
# (no NaN constant: Triton checks that a global constexpr has one value, and nan != nan)


@triton.jit
def to_compute(x, IS_FP64: tl.constexpr):
    """x in the compute dtype: float64 for float64 data, else float32."""
    # tl.cast, not x.to: scalar arguments may arrive as Python ints / constexprs (Triton
    # specialises an int argument equal to 1, and the interpreter passes loop indices as ints).
    if IS_FP64:
        y = tl.cast(x, tl.float64)
    else:
        y = tl.cast(x, tl.float32)
    return y


@triton.jit
def f64_scalar(v):
    """A float64 kernel argument as a 0-d float64 tensor, exactly. (The interpreter passes
    floats as Python floats, and tl.cast would round them to float32 first; an addition to a
    float64 zero converts them in float64.)"""
    return tl.zeros([], tl.float64) + v


@triton.jit
def full_scalar(value, IS_FP64: tl.constexpr):
    """A 0-d tensor holding ``value`` in the compute dtype (loop-carried accumulators)."""
    if IS_FP64:
        y = tl.full([], value, tl.float64)
    else:
        y = tl.full([], value, tl.float32)
    return y


@triton.jit
def full_vec(BLOCK_N: tl.constexpr, value, IS_FP64: tl.constexpr):
    """A [BLOCK_N] tensor filled with ``value`` in the compute dtype (vector accumulators)."""
    if IS_FP64:
        y = tl.full([BLOCK_N], value, tl.float64)
    else:
        y = tl.full([BLOCK_N], value, tl.float32)
    return y


@triton.jit
def exp_c(x, IS_FP64: tl.constexpr):
    """exp in the compute dtype. float32: exp2(x * log2 e), one MUFU.EX2 per element (the
    log2(e) multiply is applied to the already shifted ``x - m``, so it cannot overflow);
    float64: libdevice's full-precision exp (ex2.approx is float32 only)."""
    if IS_FP64:
        y = tl.exp(x)
    else:
        y = tl.exp2(x * LOG2E)
    return y


@triton.jit
def safe_shift(m):
    """The shift subtracted before exp: the running maximum, or 0 when it is -inf (a fully
    masked row or chunk) so that ``x - shift`` is never ``-inf - -inf = NaN``. A NaN maximum
    stays NaN, which is what makes a row holding a NaN come out all NaN."""
    return tl.where(m == NEG_INF, 0.0, m)
