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


# ----------------------------------------------------------------------------------------------
# Rows split over several programs ("split" strategies, see triton_backend._launch_config).
#
# A row of n_cols is cut into n_seg segments of BLOCK_N columns; program (group, j) of a grid of
# n_groups x n_seg handles segment j of the rows group, group + n_groups, ... Per row, every
# segment's program stores its partials (max, sum, ...) into the workspace, then takes a ticket
# from the row's counter; the last of the n_seg to arrive merges the partials in segment order
# (so the result does not depend on who merges: bitwise deterministic) and stores the row's
# merged values. Then, either
# - no second phase (the row's outputs are the merged values): the last one resets the counter;
# - fused (GPU only, PHASE 0): the last one publishes (counter n_seg -> n_seg + 1), the others
#   spin until it has, every program normalises its segment from registers and departs
#   (counter + 1 each); the last to depart (counter 2 n_seg + 1) resets it. Safe only when every
#   program of the grid is resident at once (the launch plan sizes the grid so), and never under
#   the interpreter, which runs programs one after another;
# - two kernels (PHASE 1, then PHASE 2): the second launch reads the merged values and the
#   segment again.
# The counters are int32, one per row, zero at entry and left zero (a persistent buffer).


@triton.jit
def split_place(n_seg, seg_len, n_cols, BLOCK_N: tl.constexpr):
    """(first row, row step, segment, its columns, their end) of this program in a split grid
    of n_groups x n_seg programs: program (group, j) = group * n_seg + j, so the n_seg programs
    of a row are consecutive (launched together). Segment j holds the columns [j seg_len,
    end), end = min((j + 1) seg_len, n_cols), in BLOCK_N >= seg_len lanes; the masks are
    ``c < end``. seg_len is a multiple of 16 elements (the host's choice), so every segment
    starts on a 16-byte boundary of the row and its loads stay 16-byte vectors."""
    pid = tl.program_id(0)
    n_groups = tl.num_programs(0) // n_seg
    group = pid // n_seg
    seg = pid - group * n_seg
    start = seg * seg_len
    return group, n_groups, seg, start + tl.arange(0, BLOCK_N), tl.minimum(start + seg_len, n_cols)


@triton.jit
def seg_lane(t, seg, seg_len, end):
    """The lane (int32) of column ``t`` (int64) in segment ``seg``, or -1 when the segment does
    not hold it: compared with tl.arange, so that no int64 vector of columns is built."""
    off = t - tl.cast(seg, tl.int64) * seg_len
    return tl.where((off >= 0) & (t < end), off, -1).to(tl.int32)


@triton.jit
def seg_arrive(cnt_ptr, n_seg):
    """True in the last of the row's ``n_seg`` programs to arrive. Every program's partial
    stores come before its ticket (CTA barrier, then a release); the last one's loads of the
    partials come after its acquire."""
    tl.debug_barrier()
    return tl.atomic_add(cnt_ptr, 1, sem="acq_rel") == n_seg - 1


@triton.jit
def seg_publish(cnt_ptr):
    """The last arriver, after storing the row's merged values: they are ready."""
    tl.debug_barrier()
    tl.atomic_add(cnt_ptr, 1, sem="release")


@triton.jit
def seg_wait(cnt_ptr, n_seg):
    """Spin until the row's merged values are published (counter > n_seg), polling with
    acquire loads (ld.acquire.gpu), so that every later load of the merged values follows the
    publishing release. Loads, not atomic read-modify-writes: the up to ~500 programs of a grid
    polling rows' counters are then served by L2 without queueing behind each other's atomics
    or behind the arrivals' tickets on the same counter."""
    c = tl.atomic_load(cnt_ptr, sem="acquire")
    while c <= n_seg:
        c = tl.atomic_load(cnt_ptr, sem="acquire")


@triton.jit
def seg_depart(cnt_ptr, n_seg):
    """After reading the merged values: the last of the n_seg to leave resets the counter
    (nobody polls it any more: every program of the row has passed seg_wait)."""
    if tl.atomic_add(cnt_ptr, 1, sem="relaxed") == 2 * n_seg:
        tl.store(cnt_ptr, 0)


@triton.jit
def merge_max_sum(m_ptr, s_ptr, n, IS_FP64: tl.constexpr, BLOCK: tl.constexpr):
    """(max, shift, sum) of ``n`` partial (m_j, s_j) pairs, s_j = sum exp(z - safe_shift(m_j))
    over segment j: max_j m_j, shift = safe_shift(max) and sum_j s_j exp(m_j - shift), in a
    fixed order (lane-wise over blocks of BLOCK, then one tree). Read through L2 (.cg: written by
    other SMs). A segment of -inf (m_j = -inf, s_j = 0) adds 0; a NaN s_j makes the sum NaN;
    m_j = +inf makes it NaN (inf - inf), as the row's softmax is."""
    mx = full_vec(BLOCK, NEG_INF, IS_FP64)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        mx = tl.maximum(mx, tl.load(m_ptr + i, mask=i < n, other=NEG_INF, cache_modifier=".cg"))
    row_max = tl.max(mx, axis=0)
    shift = safe_shift(row_max)
    acc = full_vec(BLOCK, 0.0, IS_FP64)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = tl.load(m_ptr + i, mask=i < n, other=NEG_INF, cache_modifier=".cg")
        s = tl.load(s_ptr + i, mask=i < n, other=0.0, cache_modifier=".cg")
        acc += s * exp_c(m - shift, IS_FP64)
    return row_max, shift, tl.sum(acc, axis=0)


@triton.jit
def merge_sum(ptr, n, BLOCK: tl.constexpr):
    """sum(ptr[0:n]) of float64 partials in a fixed order (lane-wise over blocks, one tree),
    read through L2."""
    acc = tl.zeros([BLOCK], tl.float64)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        acc += tl.load(ptr + i, mask=i < n, other=0.0, cache_modifier=".cg")
    return tl.sum(acc, axis=0)
