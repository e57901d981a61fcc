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


@triton.jit
def expm1_c(u, IS_FP64: tl.constexpr):
    """exp(u) - 1 in the compute dtype, to a few ulp for every u (libdevice's expm1 does not run
    in the interpreter, so this is written with plain operations and runs the same in both).
    |u| < 1/2: the Taylor series u (1 + u/2 (1 + u/3 (1 + ...))) in Horner form, truncated
    where the next term is below the dtype's rounding (0.5**10 / 11! = 2.5e-11 relative for
    float32, 0.5**17 / 18! = 1.2e-21 for float64); else exp(u) - 1, where 1 - exp(u) >= 0.39
    (u <= -1/2) or exp(u) - 1 >= 0.64 (u >= 1/2), so the subtraction loses under 2 bits."""
    N_TERMS: tl.constexpr = 17 if IS_FP64 else 10
    p = u * 0.0 + 1.0
    for k in tl.static_range(N_TERMS, 1, -1):
        p = p * (u * (1.0 / k)) + 1.0
    return tl.where(tl.abs(u) < 0.5, u * p, exp_c(u, IS_FP64) - 1.0)


@triton.jit
def tanh_c(u, IS_FP64: tl.constexpr):
    """tanh in the compute dtype (libdevice's does not run in the interpreter): sign(u) (1 - e) /
    (1 + e) with e = exp(-2|u|), no overflow for any u. Its relative error is the exp's times
    2e / (1 - e^2), which grows as |u| -> 0, so float32 takes the odd Taylor polynomial (through
    u^9, truncation below 1e-8 relative) for |u| < 1/4, where that factor would pass 1.9; at
    |u| >= 1/4 the factor is <= 1.9 and falls fast (0.28 at |u| = 1). float64 keeps the closed
    form throughout: its exp is within 1 ulp, so tanh stays within ~1e-15 absolute."""
    a = tl.abs(u)
    e = exp_c(-2.0 * a, IS_FP64)
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(u < 0, -t, t)
    if not IS_FP64:
        u2 = u * u
        # tanh u = u (1 - u^2/3 + 2u^4/15 - 17u^6/315 + 62u^8/2835)
        poly = u * (
            1.0
            + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0 + u2 * (62.0 / 2835.0))))
        )
        t = tl.where(a < 0.25, poly, t)
    return t


@triton.jit
def group_online_update(m, s, z, IS_FP64: tl.constexpr):
    """One chunk of the online (running max, sum) pair, per lane: ``z`` is [LANES, GROUP], each
    lane's GROUP elements contiguous in one thread (a 16-byte vector), ``m`` and ``s`` are
    [LANES]: the lane's running maximum and s = sum exp(z - m). The maximum moves once per
    lane and chunk (GROUP - 1 in-thread max, no block-wide reduction, no barrier), so the cost is
    1 + 1/GROUP exponentials per element. Rebasing by exp(m - shift) with the raw old maximum
    (not 0 in place of -inf, which could overflow to inf * 0) keeps a lane that has seen only
    -inf at s = 0; a NaN element makes s NaN (the row comes out NaN); m never takes a NaN.
    Returns (m, s, shift_old, shift): the safe shifts before and after (for rebased sums)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    shift = safe_shift(m_new)
    s = s * exp_c(m - shift, IS_FP64) + tl.sum(exp_c(z - shift[:, None], IS_FP64), axis=1)
    return m_new, s, safe_shift(m), shift


@triton.jit
def merge_lanes(m, s, IS_FP64: tl.constexpr):
    """(row max, shift, s of the row relative to shift) from the lanes' running pairs."""
    shift = safe_shift(tl.max(m, axis=0))
    return tl.max(m, axis=0), shift, tl.sum(s * exp_c(m - shift, IS_FP64), axis=0)
