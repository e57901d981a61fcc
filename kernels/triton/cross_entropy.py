"""Cross-entropy kernels: the forward (per-row or reduced loss, log-sum-exp, and the gradient
fused into the same pass), the mean denominator, and the two vocabulary-parallel modes.

The maths is dispatch.py's (the backend interface): ``z = c tanh(x / c)`` with a softcap ``c``
(else ``z = x``), ``m = max(z)``, ``zs = z - m``, ``s = sum(exp(zs))``, ``log_s = log(s)``,
``lse = m + log_s``, ``p = exp(zs) / s``, ``keep = 1 - eps``, ``W = sum(w)``::

    class target t:  loss = keep w_t (log_s - zs_t) + eps/C (W log_s - sum_c w_c zs_c)
                     grad = a p - keep w_t onehot_t - eps/C w,   a = keep w_t + eps/C W
                     target entry: (a - keep w_t) p_t - keep w_t (1 - p_t) - eps/C w_t,
                     1 - p_t = -expm1(zs_t - log_s)  (never a rounded p_t - 1)
    soft target q:   q' = keep q + eps/C,  loss = log_s sum(w q') - sum(w q' zs),
                     grad = a p - w q',  a = sum(w q')
    z-loss:          loss += z lse^2, a += 2 z lse;   softcap: grad *= 1 - (z / c)^2

then ``grad *= grad_scale`` (``/ denom`` for "mean"). ``lse - z_c`` is always ``log_s - zs_c``,
so no large logit cancels, and with non-negative weights and targets every term of a row loss
is >= 0 (``log_s >= 0``, ``-zs >= 0``): the row sums cannot cancel either. Ignored rows
(``t == ignore_index``): loss 0, gradient 0, logits not read (unless the log-sum-exp is asked
for; the vocabulary-parallel statistics read every row, their lse is returned). A class target
outside ``[0, C)`` that is not ignored: loss and gradient row NaN, and every load through it
(``x_t``, ``w_t``) is masked, so it never reads out of bounds.

Strategies (``triton_backend._launch_config`` chooses): a tile of ``ROWS`` whole rows held on
chip, one pass (reads the logits once, writes the gradient once; the target logit is picked out
of the registers, so an in-place gradient cannot race with it; only z - m stays live across the
row reductions, p = exp(z - m - log s) is recomputed for the gradient); or, for long rows,
``ONLINE``: a first pass over ``BLOCK_N`` chunks laid out as [LANES, GROUP] (a 16-byte vector
per lane) keeping a running maximum and sum per lane (``common.group_online_update``: no
block-wide reduction and no barrier per chunk, 1 + 1/GROUP exponentials per element), merged
once per row, then, for the gradient only, a second pass (reads the logits again, last chunk
first, for L2 reuse, and writes the gradient). ``NUM_STAGES`` tiles / chunks are in flight per
program: the next ones' loads are issued (into registers, in the storage dtype) before the
current one is computed; a tile's class targets are loaded one tile earlier still, so that the
logits of ignored rows can be left unread without waiting for them.

Reductions ("sum", "mean") are folded into the forward kernel: every program adds its rows'
losses in a fixed order into one float64 partial, stores it, and takes a ticket from a counter
(``tl.atomic_add``, acq_rel); the last program to arrive adds the partials in program order,
writes the 0-d loss and resets the counter to 0 for the next call. Results are therefore
bitwise deterministic for a given grid. ``DENOM`` says where the "mean" denominator comes
from: 0 none (no mean), 1 a given device scalar, 2 ``cross_entropy_denom_kernel`` (launched
first, when a gradient must be scaled by it; it writes [denominator, counted rows]), 3 summed
in this kernel like the loss (mean without a gradient), 4 ``n_rows`` (soft targets).
"""

import triton
import triton.language as tl

from .common import (
    NEG_INF,
    exp_c,
    expm1_c,
    f64_scalar,
    full_vec,
    group_online_update,
    merge_lanes,
    merge_max_sum,
    safe_shift,
    seg_arrive,
    seg_depart,
    seg_lane,
    seg_publish,
    seg_wait,
    split_place,
    tanh_c,
    to_compute,
)

# ----------------------------------------------------------------------------------------------
# shared pieces


@triton.jit
def _load_z(ptrs, mask, cap_c, inv_cap_c, SOFTCAP: tl.constexpr, IS_FP64: tl.constexpr):
    """(z, tanh(x / c)) for the logits at ``ptrs``, -inf where ``mask`` is False. Without a
    softcap z = x (and the second value is unused)."""
    x = tl.load(ptrs, mask=mask, other=NEG_INF)
    return _to_z(x, mask, cap_c, inv_cap_c, SOFTCAP, IS_FP64)


@triton.jit
def _to_z(x, mask, cap_c, inv_cap_c, SOFTCAP: tl.constexpr, IS_FP64: tl.constexpr):
    """_load_z on logits already loaded (raw, -inf where ``mask`` is False)."""
    x = to_compute(x, IS_FP64)
    if SOFTCAP:
        th = tanh_c(x * inv_cap_c, IS_FP64)
        z = tl.where(mask, cap_c * th, NEG_INF)  # c tanh(-inf) = -c: re-mask the padding
    else:
        th = x
        z = x
    return z, th


@triton.jit
def last_program(ticket_ptr):
    """True in the last program of the grid to get here. Every program's partial stores come
    before its ticket (CTA barrier, then a release); the last one's loads of them come after
    its acquire."""
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    return ticket == tl.num_programs(0) - 1


@triton.jit
def sum_partials(ptr, n):
    """sum(ptr[0:n]) of float64 partials in a fixed order (lane-wise in blocks, then one tree),
    read through L2 (.cg: they were written by other SMs)."""
    BLOCK: tl.constexpr = 1024
    acc = tl.zeros([BLOCK], tl.float64)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        acc += tl.load(ptr + i, mask=i < n, other=0.0, cache_modifier=".cg")
    return tl.sum(acc, axis=0)


@triton.jit
def _row_terms(
    log_s,
    lse,
    zs_t,
    w_t,
    dot,
    coef_sum,
    keep_c,
    eps_c,
    z_c,
    SOFT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
):
    """(loss, a, a - keep w_t, keep w_t) of rows, from their statistics. ``dot``: sum w q' zs
    (soft) or sum w zs (smoothing); ``coef_sum``: sum w q' (soft) or W."""
    if SOFT:
        loss = log_s * coef_sum - dot
        a_rest = coef_sum
        kw_t = log_s * 0.0
    else:
        kw_t = keep_c * w_t
        loss = kw_t * (log_s - zs_t)
        a_rest = kw_t * 0.0
        if HAS_SMOOTHING:
            loss += eps_c * (coef_sum * log_s - dot)
            a_rest += eps_c * coef_sum
    if HAS_Z:
        loss += z_c * lse * lse
        a_rest += 2.0 * z_c * lse
    return loss, a_rest + kw_t, a_rest, kw_t


@triton.jit
def _target_grad(zs_t, log_s, a_rest, kw_t, w_t, eps_c, HAS_SMOOTHING: tl.constexpr,
                 IS_FP64: tl.constexpr):  # fmt: skip
    """The target entry of the gradient: (a - keep w_t) p_t - keep w_t (1 - p_t) - eps/C w_t,
    1 - p_t = -expm1(zs_t - log_s). p_t is computed as the other entries' p."""
    p_t = exp_c(zs_t - log_s, IS_FP64)
    g_t = a_rest * p_t + kw_t * expm1_c(zs_t - log_s, IS_FP64)
    if HAS_SMOOTHING:
        g_t -= eps_c * w_t
    return g_t


@triton.jit
def _raw_chunk(x_row, t_row, w_ptr, c, n_load, n_cols, LOAD_Q: tl.constexpr,
               LOAD_W: tl.constexpr):  # fmt: skip
    """One chunk's raw data in its storage dtypes: logits (-inf past ``n_load``), and the soft
    targets (LOAD_Q) and class weights (LOAD_W), 0 past the row."""
    ok = c < n_cols
    x = tl.load(x_row + c, mask=c < n_load, other=NEG_INF)
    q = x
    w = x
    if LOAD_Q:
        q = tl.load(t_row + c, mask=ok, other=0.0)
    if LOAD_W:
        w = tl.load(w_ptr + c, mask=ok, other=0.0)
    return x, q, w


@triton.jit
def _coef(
    q,
    w,
    ok,
    keep_c,
    eps_c,
    SOFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    IS_FP64: tl.constexpr,
):
    """Per class, the coefficient of -zs_c in the loss (0 past the row): soft targets w_c q'_c
    (q' = keep q + eps/C with smoothing), class targets w_c (times eps/C later)."""
    if SOFT:
        coef = to_compute(q, IS_FP64)
        if HAS_SMOOTHING:
            coef = tl.where(ok, coef * keep_c + eps_c, 0.0)
        if HAS_WEIGHT:
            coef = coef * to_compute(w, IS_FP64)
    else:
        if HAS_WEIGHT:
            coef = to_compute(w, IS_FP64)
        else:
            coef = to_compute(tl.where(ok, 1, 0), IS_FP64)
    return coef


@triton.jit
def _online_pass(
    x_row,
    t_row,
    w_ptr,
    n_load,
    n_cols,
    keep_c,
    eps_c,
    cap_c,
    inv_cap_c,
    SUMS: tl.constexpr,
    SUMS_W: tl.constexpr,
    SOFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """One pass over a row's first ``n_load`` logits in [LANES, GROUP] chunks of BLOCK_N: reads
    them once (and, with SUMS, the soft targets / weights), NUM_STAGES chunks in flight. Per
    lane: the running maximum m, s = sum exp(z - m), and with SUMS acc = sum coef (z - m) and
    csum = sum coef for ``_coef``'s coefficients (w q' for soft targets, w with smoothing);
    with SUMS_W the same for coef = w (the soft statistics with smoothing need both). The sums
    are kept relative to each lane's shift (safe_shift(m)) and rebased when it rises:
    acc += csum (shift_old - shift_new), with finite shifts only, so nothing is inf * 0. The
    lanes are merged once, at the end. Returns (max, shift, s, acc, csum, acc_w, csum_w) of the
    row, the sums relative to shift = safe_shift(max)."""
    LANES: tl.constexpr = BLOCK_N // GROUP
    cols2 = tl.arange(0, LANES)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    m = full_vec(LANES, NEG_INF, IS_FP64)
    s = full_vec(LANES, 0.0, IS_FP64)
    acc = full_vec(LANES, 0.0, IS_FP64)
    csum = full_vec(LANES, 0.0, IS_FP64)
    acc_w = full_vec(LANES, 0.0, IS_FP64)
    csum_w = full_vec(LANES, 0.0, IS_FP64)
    if NUM_STAGES >= 2:
        x1, q1, w1 = _raw_chunk(x_row, t_row, w_ptr, cols2, n_load, n_cols, SUMS and SOFT,
                                (SUMS or SUMS_W) and HAS_WEIGHT)  # fmt: skip
    if NUM_STAGES >= 3:
        x2, q2, w2 = _raw_chunk(x_row, t_row, w_ptr, BLOCK_N + cols2, n_load, n_cols,
                                SUMS and SOFT, (SUMS or SUMS_W) and HAS_WEIGHT)  # fmt: skip
    for start in range(0, n_load, BLOCK_N):
        c = start + cols2
        if NUM_STAGES == 1:
            x, q, w = _raw_chunk(x_row, t_row, w_ptr, c, n_load, n_cols, SUMS and SOFT,
                                 (SUMS or SUMS_W) and HAS_WEIGHT)  # fmt: skip
        elif NUM_STAGES == 2:
            x, q, w = x1, q1, w1
            x1, q1, w1 = _raw_chunk(x_row, t_row, w_ptr, c + BLOCK_N, n_load, n_cols,
                                    SUMS and SOFT, (SUMS or SUMS_W) and HAS_WEIGHT)  # fmt: skip
        else:
            x, q, w = x1, q1, w1
            x1, q1, w1 = x2, q2, w2
            x2, q2, w2 = _raw_chunk(x_row, t_row, w_ptr, c + 2 * BLOCK_N, n_load, n_cols,
                                    SUMS and SOFT, (SUMS or SUMS_W) and HAS_WEIGHT)  # fmt: skip
        ok = c < n_cols
        z, _th = _to_z(x, c < n_load, cap_c, inv_cap_c, SOFTCAP, IS_FP64)
        m, s, shift_old, shift = group_online_update(m, s, z, IS_FP64)
        if SUMS or SUMS_W:
            rel = z - shift[:, None]
            rebase = shift_old - shift
            if SUMS:
                coef = _coef(q, w, ok, keep_c, eps_c, SOFT, HAS_WEIGHT, HAS_SMOOTHING, IS_FP64)
                acc = acc + csum * rebase + tl.sum(tl.where(ok, coef * rel, 0.0), axis=1)
                csum += tl.sum(coef, axis=1)
            if SUMS_W:
                coef_w = _coef(q, w, ok, keep_c, eps_c, False, HAS_WEIGHT, False, IS_FP64)
                acc_w = acc_w + csum_w * rebase + tl.sum(tl.where(ok, coef_w * rel, 0.0), axis=1)
                csum_w += tl.sum(coef_w, axis=1)
    row_max, shift, s_row = merge_lanes(m, s, IS_FP64)
    lane_shift = safe_shift(m)
    acc_row = s_row * 0.0
    csum_row = s_row * 0.0
    acc_w_row = s_row * 0.0
    csum_w_row = s_row * 0.0
    if SUMS:
        acc_row = tl.sum(acc + csum * (lane_shift - shift), axis=0)
        csum_row = tl.sum(csum, axis=0)
    if SUMS_W:
        acc_w_row = tl.sum(acc_w + csum_w * (lane_shift - shift), axis=0)
        csum_w_row = tl.sum(csum_w, axis=0)
    return row_max, shift, s_row, acc_row, csum_row, acc_w_row, csum_w_row


@triton.jit
def _class_target(t_ptr, row, row_ok, ignore_index, lo, n_cols):
    """(t - lo, counted, 0 <= t - lo < C, bad) of class targets; lo = vocab_start."""
    t = tl.load(t_ptr + row, mask=row_ok, other=0).to(tl.int64)
    valid = row_ok & (t != ignore_index)
    t_local = t - lo
    in_range = (t_local >= 0) & (t_local < n_cols)
    bad = valid & (in_range == 0)
    return t_local, valid, in_range, bad


# ----------------------------------------------------------------------------------------------
# forward


@triton.jit
def _tile_targets(t_ptr, tile, n_rows, SOFT: tl.constexpr, ROWS: tl.constexpr):
    """A tile's class targets (int64; soft targets: unused)."""
    r64 = tl.cast(tile, tl.int64) * ROWS + tl.arange(0, ROWS)
    if SOFT:
        t = r64
    else:
        t = tl.load(t_ptr + r64, mask=r64 < n_rows, other=0).to(tl.int64)
    return t


@triton.jit
def _tile_rows_read(tile, t, n_rows, ignore_index, READ_ALL: tl.constexpr, ROWS: tl.constexpr):
    """The rows of a tile whose logits are read: all, or (class targets, READ_ALL False) the
    counted ones."""
    r64 = tl.cast(tile, tl.int64) * ROWS + tl.arange(0, ROWS)
    rows = r64 < n_rows
    if not READ_ALL:
        rows = rows & (t != ignore_index)
    return rows


@triton.jit
def _tile_raw(x_ptr, t_ptr, tile, t, n_rows, n_cols, row_stride, t_row_stride, ignore_index,
              SOFT: tl.constexpr, READ_ALL: tl.constexpr, ROWS: tl.constexpr,
              BLOCK_N: tl.constexpr):  # fmt: skip
    """A tile's raw logits (-inf where not read) and soft targets, in their storage dtypes."""
    r64 = tl.cast(tile, tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    rows = _tile_rows_read(tile, t, n_rows, ignore_index, READ_ALL, ROWS)
    x = tl.load(
        x_ptr + r64[:, None] * row_stride + cols[None, :],
        mask=rows[:, None] & col_ok[None, :],
        other=NEG_INF,
    )
    q = x
    if SOFT:
        q = tl.load(
            t_ptr + r64[:, None] * t_row_stride + cols[None, :],
            mask=(r64 < n_rows)[:, None] & col_ok[None, :],
            other=0.0,
        )
    return x, q


@triton.jit
def _fwd_tile(
    x,
    q,
    t,
    w_ptr,
    loss_ptr,
    g_ptr,
    lse_ptr,
    tile,
    n_rows,
    n_cols,
    g_row_stride,
    ignore_index,
    keep_c,
    eps_c,
    z_c,
    cap_c,
    inv_cap_c,
    row_scale,
    w_vec,
    w_total,
    SOFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    HAS_LSE: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    SOFTCAP: tl.constexpr,
    IS_FP64: tl.constexpr,
    REDUCE: tl.constexpr,
    DENOM: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # The logits x (and soft targets q) were read by _tile_raw; writes the loss / lse (+ the
    # gradient) once. Returns this tile's (loss sum, denominator sum, counted rows) in float64.
    # row indices in int64: row * row_stride can pass 2**31, and so can the last tile's rows
    r64 = tl.cast(tile, tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = r64 < n_rows
    col_ok = cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    if not SOFT:
        valid = row_ok & (t != ignore_index)
        in_range = (t >= 0) & (t < n_cols)
        bad = valid & (in_range == 0)
    rows = _tile_rows_read(tile, t, n_rows, ignore_index, SOFT or HAS_LSE, ROWS)
    z, th = _to_z(x, rows[:, None] & col_ok[None, :], cap_c, inv_cap_c, SOFTCAP, IS_FP64)
    # tl.max may drop a NaN (fmax); the row still comes out NaN through s. A row of -inf (or
    # not read) gets shift 0: exp(-inf) = 0, s = 0.
    shift = safe_shift(tl.max(z, axis=1))
    zs = z - shift[:, None]
    s = tl.sum(exp_c(zs, IS_FP64), axis=1)
    log_s = tl.log(s)
    lse = shift + log_s
    if SOFT:
        q = to_compute(q, IS_FP64)
        if HAS_SMOOTHING:
            q = tl.where(ok, q * keep_c + eps_c, 0.0)  # q' = keep q + eps/C
        if HAS_WEIGHT:
            wq = q * w_vec[None, :]
        else:
            wq = q
        coef_sum = tl.sum(wq, axis=1)
        dot = tl.sum(tl.where(ok, wq * zs, 0.0), axis=1)
        zs_t = log_s
        w_t = log_s
    else:
        onehot = cols[None, :] == t[:, None]
        zs_t = tl.sum(tl.where(onehot, zs, 0.0), axis=1)  # picked out of the registers
        if HAS_WEIGHT:
            w_t = tl.load(w_ptr + tl.where(in_range, t, 0), mask=row_ok & in_range, other=0.0)
            w_t = to_compute(w_t, IS_FP64)
        else:
            w_t = to_compute(tl.where(in_range, 1, 0), IS_FP64)
        coef_sum = w_total
        dot = log_s
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                dot = tl.sum(tl.where(ok, zs * w_vec[None, :], 0.0), axis=1)
            else:
                dot = tl.sum(tl.where(ok, zs, 0.0), axis=1)
    loss, a, a_rest, kw_t = _row_terms(log_s, lse, zs_t, w_t, dot, coef_sum, keep_c, eps_c, z_c,
                                       SOFT, HAS_SMOOTHING, HAS_Z)  # fmt: skip
    if not SOFT:
        loss = tl.where(valid, loss, 0.0)
        loss = tl.where(bad, float("nan"), loss)
    if REDUCE == 0:
        tl.store(loss_ptr + r64, loss.to(loss_ptr.dtype.element_ty), mask=row_ok)
    if HAS_LSE:
        tl.store(lse_ptr + r64, lse.to(lse_ptr.dtype.element_ty), mask=row_ok)
    if HAS_GRAD:
        p = exp_c(zs - log_s[:, None], IS_FP64)  # recomputed: only zs stayed live
        if SOFT:
            g = a[:, None] * p - wq
        else:
            g = a[:, None] * p
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    g -= eps_c * w_vec[None, :]
                else:
                    g -= eps_c
            g_t = _target_grad(zs_t, log_s, a_rest, kw_t, w_t, eps_c, HAS_SMOOTHING, IS_FP64)
            g = tl.where(onehot, g_t[:, None], g)
        g = g * row_scale
        if SOFTCAP:
            g = g * (1.0 - th * th)
        if not SOFT:
            g = tl.where(valid[:, None], g, 0.0)  # ignored rows: exactly 0
            g = tl.where(bad[:, None], float("nan"), g)
        tl.store(
            g_ptr + r64[:, None] * g_row_stride + cols[None, :],
            g.to(g_ptr.dtype.element_ty),
            mask=ok,
        )
    part_loss = tl.zeros([], tl.float64)
    part_den = tl.zeros([], tl.float64)
    part_cnt = tl.zeros([], tl.float64)
    if REDUCE > 0:
        part_loss = tl.sum(tl.where(row_ok, loss, 0.0).to(tl.float64), axis=0)
    if DENOM == 3:
        den = tl.where(valid, tl.where(in_range, w_t, float("nan")), 0.0)
        part_den = tl.sum(den.to(tl.float64), axis=0)
        part_cnt = tl.sum(valid.to(tl.float64), axis=0)
    return part_loss, part_den, part_cnt


@triton.jit
def _fwd_online_row(
    x_ptr,
    t_ptr,
    w_ptr,
    loss_ptr,
    g_ptr,
    lse_ptr,
    row,
    n_cols,
    row_stride,
    t_row_stride,
    g_row_stride,
    ignore_index,
    keep_c,
    eps_c,
    z_c,
    cap_c,
    inv_cap_c,
    row_scale,
    SOFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    HAS_LSE: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    SOFTCAP: tl.constexpr,
    IS_FP64: tl.constexpr,
    REDUCE: tl.constexpr,
    DENOM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # pass 1 (loss, lse): reads the logits (and soft targets) once; pass 2 (the gradient
    # only): reads them again, last chunk first (L2 reuse), writes the gradient.
    cols = tl.arange(0, BLOCK_N)
    r64 = tl.cast(row, tl.int64)
    x_row = x_ptr + r64 * row_stride
    t_row = t_ptr + r64 * t_row_stride
    g_row = g_ptr + r64 * g_row_stride
    if SOFT:
        n_load = n_cols
    else:
        t, valid, in_range, bad = _class_target(t_ptr, r64, True, ignore_index, 0, n_cols)
        if HAS_LSE:
            n_load = n_cols
        else:
            n_load = tl.where(valid, n_cols, 0)  # ignored rows: no logits traffic
        t_safe = tl.where(in_range, t, 0)
        # z_t: one masked load (a bad target reads nothing). In-place safe: the row merge
        # after pass 1 (block reductions, bar.sync) orders it before every pass-2 store.
        z_t, _th = _load_z(x_row + t_safe, valid & in_range, cap_c, inv_cap_c, SOFTCAP, IS_FP64)
        if HAS_WEIGHT:
            w_t = to_compute(tl.load(w_ptr + t_safe, mask=in_range, other=0.0), IS_FP64)
        else:
            w_t = to_compute(tl.where(in_range, 1, 0), IS_FP64)
    _max, shift, s, dot, coef_sum, _aw, _cw = _online_pass(
        x_row, t_row, w_ptr, n_load, n_cols, keep_c, eps_c, cap_c, inv_cap_c,
        SOFT or HAS_SMOOTHING, False, SOFT, HAS_WEIGHT, HAS_SMOOTHING, SOFTCAP, IS_FP64,
        BLOCK_N, GROUP, NUM_STAGES,
    )  # fmt: skip
    log_s = tl.log(s)
    lse = shift + log_s
    if SOFT:
        zs_t = log_s
        w_t = log_s
    else:
        zs_t = z_t - shift
    loss, a, a_rest, kw_t = _row_terms(log_s, lse, zs_t, w_t, dot, coef_sum, keep_c, eps_c, z_c,
                                       SOFT, HAS_SMOOTHING, HAS_Z)  # fmt: skip
    if not SOFT:
        loss = tl.where(valid, loss, 0.0)
        loss = tl.where(bad, float("nan"), loss)
    if REDUCE == 0:
        tl.store(loss_ptr + r64, loss.to(loss_ptr.dtype.element_ty))
    if HAS_LSE:
        tl.store(lse_ptr + r64, lse.to(lse_ptr.dtype.element_ty))
    if HAS_GRAD:
        if not SOFT:
            g_t = _target_grad(zs_t, log_s, a_rest, kw_t, w_t, eps_c, HAS_SMOOTHING, IS_FP64)
        n_chunks = tl.cdiv(n_cols, BLOCK_N)
        # one chunk ahead (NUM_STAGES >= 2): the one before, not yet written
        LOAD_W: tl.constexpr = HAS_WEIGHT and (SOFT or HAS_SMOOTHING)
        if NUM_STAGES >= 2:
            x1, q1, w1 = _raw_chunk(x_row, t_row, w_ptr, (n_chunks - 1) * BLOCK_N + cols, n_load,
                                    n_cols, SOFT, LOAD_W)  # fmt: skip
        for i in range(0, n_chunks):
            c = (n_chunks - 1 - i) * BLOCK_N + cols
            ok = c < n_cols
            if NUM_STAGES == 1:
                x, q, w = _raw_chunk(x_row, t_row, w_ptr, c, n_load, n_cols, SOFT, LOAD_W)
            else:
                # the chunk before (none after chunk 0: limits of 0; contiguous offsets, so
                # that the loads stay 16-byte vectors)
                x, q, w = x1, q1, w1
                c0 = (n_chunks - 1 - i) * BLOCK_N
                x1, q1, w1 = _raw_chunk(x_row, t_row, w_ptr, tl.maximum(c0 - BLOCK_N, 0) + cols,
                                        tl.where(c0 > 0, n_load, 0), tl.where(c0 > 0, n_cols, 0),
                                        SOFT, LOAD_W)  # fmt: skip
            z, th = _to_z(x, c < n_load, cap_c, inv_cap_c, SOFTCAP, IS_FP64)
            g = a * exp_c((z - shift) - log_s, IS_FP64)
            if SOFT:
                g -= _coef(q, w, ok, keep_c, eps_c, SOFT, HAS_WEIGHT, HAS_SMOOTHING, IS_FP64)
            else:
                if HAS_SMOOTHING:
                    g -= eps_c * _coef(q, w, ok, keep_c, eps_c, SOFT, HAS_WEIGHT, HAS_SMOOTHING,
                                       IS_FP64)  # fmt: skip
                g = tl.where(c == t, g_t, g)
            g = g * row_scale
            if SOFTCAP:
                g = g * (1.0 - th * th)
            if not SOFT:
                g = tl.where(valid, g, 0.0)
                g = tl.where(bad, float("nan"), g)
            tl.store(g_row + c, g.to(g_ptr.dtype.element_ty), mask=ok)
    part_loss = tl.zeros([], tl.float64)
    part_den = tl.zeros([], tl.float64)
    part_cnt = tl.zeros([], tl.float64)
    if REDUCE > 0:
        part_loss = loss.to(tl.float64)
    if DENOM == 3:
        part_den = tl.where(valid, tl.where(in_range, w_t, float("nan")), 0.0).to(tl.float64)
        part_cnt = valid.to(tl.float64)
    return part_loss, part_den, part_cnt


@triton.jit
def cross_entropy_fwd_kernel(
    x_ptr,
    t_ptr,
    w_ptr,
    loss_ptr,
    g_ptr,
    lse_ptr,
    denom_ptr,
    part_ptr,
    ticket_ptr,
    n_rows,
    n_cols,
    row_stride,
    t_row_stride,
    g_row_stride,
    ignore_index: tl.int64,
    label_smoothing: tl.float64,
    z_loss: tl.float64,
    softcap: tl.float64,
    grad_scale: tl.float64,
    SOFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    HAS_LSE: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    SOFTCAP: tl.constexpr,
    IS_FP64: tl.constexpr,
    REDUCE: tl.constexpr,
    DENOM: tl.constexpr,
    ONLINE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Cross-entropy of every row: the loss into ``loss_ptr`` (per row for REDUCE 0 "none";
    the 0-d sum (1) or mean (2) otherwise), ``lse_ptr`` (HAS_LSE), the gradient into ``g_ptr``
    (HAS_GRAD; may be ``x_ptr``). Class targets (``t_ptr``: int32/int64) or, SOFT, probability
    rows (``t_row_stride``). ``w_ptr``: class weights, compute dtype. ``denom_ptr``: DENOM 1 a
    0-d compute-dtype denominator, DENOM 2 float64 [denominator, counted rows]. ``part_ptr``:
    float64 [3, n_programs] partials (REDUCE > 0); ``ticket_ptr``: int32 counter, 0 at entry,
    left 0."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    # scalars in float64 from the host, rounded once to the compute dtype (as NumPy does)
    eps = f64_scalar(label_smoothing)
    keep_c = to_compute(1.0 - eps, IS_FP64)  # 1 - eps
    eps_c = to_compute(eps / n_cols, IS_FP64)  # eps / C
    z_c = to_compute(f64_scalar(z_loss), IS_FP64)
    cap = f64_scalar(softcap)
    cap_c = to_compute(cap, IS_FP64)
    inv_cap_c = cap_c
    if SOFTCAP:
        inv_cap_c = to_compute(1.0 / cap, IS_FP64)
    row_scale = to_compute(f64_scalar(grad_scale), IS_FP64)
    if HAS_GRAD:
        if DENOM == 1 or DENOM == 2:
            row_scale = row_scale / to_compute(tl.load(denom_ptr), IS_FP64)
        if DENOM == 4:
            row_scale = row_scale / to_compute(n_rows, IS_FP64)
    part_loss = tl.zeros([], tl.float64)
    part_den = tl.zeros([], tl.float64)
    part_cnt = tl.zeros([], tl.float64)
    if ONLINE:
        for row in range(pid, n_rows, n_prog):
            pl, pd, pc = _fwd_online_row(
                x_ptr, t_ptr, w_ptr, loss_ptr, g_ptr, lse_ptr, row, n_cols, row_stride,
                t_row_stride, g_row_stride, ignore_index, keep_c, eps_c, z_c, cap_c, inv_cap_c,
                row_scale, SOFT, HAS_WEIGHT, HAS_GRAD, HAS_LSE, HAS_SMOOTHING, HAS_Z, SOFTCAP,
                IS_FP64, REDUCE, DENOM, BLOCK_N, GROUP, NUM_STAGES,
            )  # fmt: skip
            part_loss += pl
            part_den += pd
            part_cnt += pc
    else:
        # the class weights (and their total W) are the same for every row: load them once
        cols = tl.arange(0, BLOCK_N)
        if HAS_WEIGHT and (SOFT or HAS_SMOOTHING):
            w_vec = to_compute(tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0), IS_FP64)
            w_total = tl.sum(w_vec, axis=0)
        else:
            w_vec = full_vec(BLOCK_N, 1.0, IS_FP64)
            w_total = to_compute(n_cols, IS_FP64)
        n_tiles = tl.cdiv(n_rows, ROWS)
        READ_ALL: tl.constexpr = SOFT or HAS_LSE
        # NUM_STAGES 2: the next tile's logits are loaded before this tile is computed, with
        # the targets loaded one tile earlier (the ignored rows' logits are not read)
        t = _tile_targets(t_ptr, pid, n_rows, SOFT, ROWS)
        if NUM_STAGES >= 2:
            x, q = _tile_raw(x_ptr, t_ptr, pid, t, n_rows, n_cols, row_stride, t_row_stride,
                             ignore_index, SOFT, READ_ALL, ROWS, BLOCK_N)  # fmt: skip
            t1 = _tile_targets(t_ptr, pid + n_prog, n_rows, SOFT, ROWS)
        for tile in range(pid, n_tiles, n_prog):
            if NUM_STAGES == 1:
                t = _tile_targets(t_ptr, tile, n_rows, SOFT, ROWS)
                x, q = _tile_raw(x_ptr, t_ptr, tile, t, n_rows, n_cols, row_stride, t_row_stride,
                                 ignore_index, SOFT, READ_ALL, ROWS, BLOCK_N)  # fmt: skip
            else:
                x1, q1 = _tile_raw(x_ptr, t_ptr, tile + n_prog, t1, n_rows, n_cols, row_stride,
                                   t_row_stride, ignore_index, SOFT, READ_ALL, ROWS,
                                   BLOCK_N)  # fmt: skip
                t2 = _tile_targets(t_ptr, tile + 2 * n_prog, n_rows, SOFT, ROWS)
            pl, pd, pc = _fwd_tile(
                x, q, t, w_ptr, loss_ptr, g_ptr, lse_ptr, tile, n_rows, n_cols, g_row_stride,
                ignore_index, keep_c, eps_c, z_c, cap_c, inv_cap_c, row_scale, w_vec, w_total,
                SOFT, HAS_WEIGHT, HAS_GRAD, HAS_LSE, HAS_SMOOTHING, HAS_Z, SOFTCAP, IS_FP64,
                REDUCE, DENOM, ROWS, BLOCK_N,
            )  # fmt: skip
            part_loss += pl
            part_den += pd
            part_cnt += pc
            if NUM_STAGES >= 2:
                x, q, t, t1 = x1, q1, t1, t2
    if REDUCE > 0:
        tl.store(part_ptr + pid, part_loss)
        if DENOM == 3:
            tl.store(part_ptr + n_prog + pid, part_den)
            tl.store(part_ptr + 2 * n_prog + pid, part_cnt)
        if last_program(ticket_ptr):
            total = sum_partials(part_ptr, n_prog)
            if REDUCE == 1:
                result = total
            else:
                if DENOM == 3:
                    d = sum_partials(part_ptr + n_prog, n_prog)
                    counted = sum_partials(part_ptr + 2 * n_prog, n_prog)
                elif DENOM == 4:
                    d = tl.zeros([], tl.float64) + n_rows
                    counted = d
                elif DENOM == 2:
                    d = tl.load(denom_ptr, cache_modifier=".cg").to(tl.float64)
                    counted = tl.load(denom_ptr + 1, cache_modifier=".cg").to(tl.float64)
                else:
                    d = tl.load(denom_ptr).to(tl.float64)
                    counted = d
                # nothing counted (every target ignored, or a given denominator of 0): 0.0
                result = tl.where(counted == 0, 0.0, total / d)
            tl.store(loss_ptr, result.to(loss_ptr.dtype.element_ty))
            tl.store(ticket_ptr, 0)


@triton.jit
def cross_entropy_denom_kernel(
    t_ptr,
    w_ptr,
    out_ptr,
    part_ptr,
    ticket_ptr,
    n_rows,
    n_cols,
    ignore_index: tl.int64,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """The "mean" denominator of class targets, before the forward kernel scales a gradient by
    it: ``out_ptr`` (float64) gets [sum of w_t over counted rows (a bad target adds NaN), counted
    rows]. Reads the targets (and one weight per row). Partials per program in ``part_ptr``
    (float64 [2, n_programs]), summed in program order by the last program."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    den = tl.zeros([BLOCK_R], tl.float64)
    cnt = tl.zeros([BLOCK_R], tl.float64)
    for start in range(pid * BLOCK_R, n_rows, n_prog * BLOCK_R):
        r = tl.cast(start, tl.int64) + tl.arange(0, BLOCK_R)
        t, valid, in_range, _bad = _class_target(t_ptr, r, r < n_rows, ignore_index, 0, n_cols)
        if HAS_WEIGHT:
            w_t = tl.load(w_ptr + tl.where(in_range, t, 0), mask=valid & in_range, other=0.0)
            w_t = w_t.to(tl.float64)
        else:
            w_t = tl.full([BLOCK_R], 1.0, tl.float64)
        den += tl.where(valid, tl.where(in_range, w_t, float("nan")), 0.0)
        cnt += valid.to(tl.float64)
    tl.store(part_ptr + pid, tl.sum(den, axis=0))
    tl.store(part_ptr + n_prog + pid, tl.sum(cnt, axis=0))
    if last_program(ticket_ptr):
        tl.store(out_ptr, sum_partials(part_ptr, n_prog))
        tl.store(out_ptr + 1, sum_partials(part_ptr + n_prog, n_prog))
        tl.store(ticket_ptr, 0)


# ----------------------------------------------------------------------------------------------
# vocabulary-parallel: per-rank statistics, and the gradient from the merged ones


@triton.jit
def _stats_store(st_row, col, v, ok=None):
    tl.store(st_row + col, v.to(st_row.dtype.element_ty), mask=ok)


@triton.jit
def _stats_tile(
    x,
    q,
    t,
    w_ptr,
    st_ptr,
    tile,
    n_rows,
    n_cols,
    st_row_stride,
    ignore_index,
    vocab_start,
    cap_c,
    inv_cap_c,
    w_vec,
    SOFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    IS_FP64: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # the logits (and soft targets) were read once by _tile_raw; writes K values per row.
    r64 = tl.cast(tile, tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = r64 < n_rows
    col_ok = cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    # every row, ignored ones too (the vocabulary-parallel path returns every row's lse)
    rows = _tile_rows_read(tile, t, n_rows, ignore_index, True, ROWS)
    z, _th = _to_z(x, rows[:, None] & col_ok[None, :], cap_c, inv_cap_c, SOFTCAP, IS_FP64)
    m = tl.max(z, axis=1)
    zs = z - safe_shift(m)[:, None]  # every sum relative to m (0 for a row of -inf)
    st_row = st_ptr + r64 * st_row_stride
    _stats_store(st_row, 0, m, row_ok)
    _stats_store(st_row, 1, tl.sum(exp_c(zs, IS_FP64), axis=1), row_ok)
    if SOFT:
        wq = to_compute(q, IS_FP64)
        if HAS_WEIGHT:
            wq = wq * w_vec[None, :]
        _stats_store(st_row, 2, tl.sum(wq, axis=1), row_ok)
        _stats_store(st_row, 3, tl.sum(tl.where(ok, wq * zs, 0.0), axis=1), row_ok)
        k = 4
    else:
        t_local = t - vocab_start
        owned = (t_local >= 0) & (t_local < n_cols)
        onehot = (cols[None, :] == t_local[:, None]) & owned[:, None]  # (may hit the padding)
        _stats_store(st_row, 2, tl.sum(tl.where(onehot, zs, 0.0), axis=1), row_ok)
        k = 3
        if HAS_WEIGHT:
            w_t = tl.load(w_ptr + tl.where(owned, t_local, 0), mask=row_ok & owned, other=0.0)
            _stats_store(st_row, 3, w_t, row_ok)
            k = 4
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            dot = tl.sum(tl.where(ok, zs * w_vec[None, :], 0.0), axis=1)
        else:
            dot = tl.sum(tl.where(ok, zs, 0.0), axis=1)
        _stats_store(st_row, k, dot, row_ok)


@triton.jit
def _stats_online_row(
    x_ptr,
    t_ptr,
    w_ptr,
    st_ptr,
    row,
    n_cols,
    row_stride,
    t_row_stride,
    st_row_stride,
    ignore_index,
    vocab_start,
    cap_c,
    inv_cap_c,
    SOFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # one pass: reads the logits (and soft targets) once.
    r64 = tl.cast(row, tl.int64)
    x_row = x_ptr + r64 * row_stride
    t_row = t_ptr + r64 * t_row_stride
    st_row = st_ptr + r64 * st_row_stride
    one = to_compute(1.0, IS_FP64)  # the raw q: keep and eps/C apply after the merge
    if SOFT:
        n_load = n_cols
    else:
        t, _valid, owned, _bad = _class_target(t_ptr, r64, True, ignore_index, vocab_start,
                                               n_cols)  # fmt: skip
        n_load = n_cols  # every row, ignored ones too (their lse is returned)
        t_safe = tl.where(owned, t, 0)
        z_t, _th = _load_z(x_row + t_safe, owned, cap_c, inv_cap_c, SOFTCAP, IS_FP64)
    # soft: SUMS gives sum w q (z - m) and sum w q, SUMS_W (smoothing) sum w (z - m);
    # class targets with smoothing: SUMS gives sum w (z - m)
    row_max, shift, s, acc, csum, acc_w, _csum_w = _online_pass(
        x_row, t_row, w_ptr, n_load, n_cols, one, one * 0.0, cap_c, inv_cap_c,
        SOFT or HAS_SMOOTHING, SOFT and HAS_SMOOTHING, SOFT, HAS_WEIGHT, False, SOFTCAP,
        IS_FP64, BLOCK_N, GROUP, NUM_STAGES,
    )  # fmt: skip
    _stats_store(st_row, 0, row_max)
    _stats_store(st_row, 1, s)
    if SOFT:
        _stats_store(st_row, 2, csum)
        _stats_store(st_row, 3, acc)
        if HAS_SMOOTHING:
            _stats_store(st_row, 4, acc_w)
    else:
        _stats_store(st_row, 2, tl.where(owned, z_t - shift, 0.0))
        k = 3
        if HAS_WEIGHT:
            _stats_store(st_row, 3, tl.load(w_ptr + t_safe, mask=owned, other=0.0))
            k = 4
        if HAS_SMOOTHING:
            _stats_store(st_row, k, acc)


@triton.jit
def cross_entropy_stats_kernel(
    x_ptr,
    t_ptr,
    w_ptr,
    st_ptr,
    n_rows,
    n_cols,
    row_stride,
    t_row_stride,
    st_row_stride,
    ignore_index: tl.int64,
    vocab_start: tl.int64,
    softcap: tl.float64,
    SOFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    IS_FP64: tl.constexpr,
    ONLINE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Per row, one rank's statistics of a vocabulary-parallel cross-entropy (its logits hold
    the classes [vocab_start, vocab_start + C)): class targets [m, s, z_t - m (0 unless owned),
    (w_t if HAS_WEIGHT), (sum w (z - m) if HAS_SMOOTHING)], soft targets [m, s, sum w q,
    sum w q (z - m), (sum w (z - m))]; every sum relative to m (0 for a row of -inf)."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cap = f64_scalar(softcap)
    cap_c = to_compute(cap, IS_FP64)
    inv_cap_c = cap_c
    if SOFTCAP:
        inv_cap_c = to_compute(1.0 / cap, IS_FP64)
    if ONLINE:
        for row in range(pid, n_rows, n_prog):
            _stats_online_row(
                x_ptr, t_ptr, w_ptr, st_ptr, row, n_cols, row_stride, t_row_stride,
                st_row_stride, ignore_index, vocab_start, cap_c, inv_cap_c, SOFT, HAS_WEIGHT,
                HAS_SMOOTHING, SOFTCAP, IS_FP64, BLOCK_N, GROUP, NUM_STAGES,
            )  # fmt: skip
    else:
        cols = tl.arange(0, BLOCK_N)
        if HAS_WEIGHT:
            w_vec = to_compute(tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0), IS_FP64)
        else:
            w_vec = full_vec(BLOCK_N, 1.0, IS_FP64)
        n_tiles = tl.cdiv(n_rows, ROWS)
        # as the forward: the next tile's data in flight, its targets one tile earlier
        t = _tile_targets(t_ptr, pid, n_rows, SOFT, ROWS)
        if NUM_STAGES >= 2:
            x, q = _tile_raw(x_ptr, t_ptr, pid, t, n_rows, n_cols, row_stride, t_row_stride,
                             ignore_index, SOFT, True, ROWS, BLOCK_N)  # fmt: skip
            t1 = _tile_targets(t_ptr, pid + n_prog, n_rows, SOFT, ROWS)
        for tile in range(pid, n_tiles, n_prog):
            if NUM_STAGES == 1:
                t = _tile_targets(t_ptr, tile, n_rows, SOFT, ROWS)
                x, q = _tile_raw(x_ptr, t_ptr, tile, t, n_rows, n_cols, row_stride, t_row_stride,
                                 ignore_index, SOFT, True, ROWS, BLOCK_N)  # fmt: skip
            else:
                x1, q1 = _tile_raw(x_ptr, t_ptr, tile + n_prog, t1, n_rows, n_cols, row_stride,
                                   t_row_stride, ignore_index, SOFT, True, ROWS,
                                   BLOCK_N)  # fmt: skip
                t2 = _tile_targets(t_ptr, tile + 2 * n_prog, n_rows, SOFT, ROWS)
            _stats_tile(
                x, q, t, w_ptr, st_ptr, tile, n_rows, n_cols, st_row_stride, ignore_index,
                vocab_start, cap_c, inv_cap_c, w_vec, SOFT, HAS_WEIGHT, HAS_SMOOTHING, SOFTCAP,
                IS_FP64, ROWS, BLOCK_N,
            )  # fmt: skip
            if NUM_STAGES >= 2:
                x, q, t, t1 = x1, q1, t1, t2


@triton.jit
def _grad_row_data(x_ptr, t_ptr, w_ptr, lse_ptr, coef_ptr, r64, row_ok, n_cols, row_stride,
                   ignore_index, vocab_start, cap_c, inv_cap_c, SOFT: tl.constexpr,
                   HAS_WEIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                   IS_FP64: tl.constexpr):  # fmt: skip
    """Per row (r64: a row index or a vector of them): (lse, a, t_local, counted, owned, z_t,
    w_t), with the owned target's logit read (one masked load per row)."""
    lse = to_compute(tl.load(lse_ptr + r64, mask=row_ok, other=0.0), IS_FP64)
    a = to_compute(tl.load(coef_ptr + r64, mask=row_ok, other=0.0), IS_FP64)
    if SOFT:
        t = r64
        valid = row_ok
        owned = r64 < 0
        z_t = lse
        w_t = lse
    else:
        t, valid, owned, _bad = _class_target(t_ptr, r64, row_ok, ignore_index, vocab_start,
                                              n_cols)  # fmt: skip
        owned = valid & owned
        t_safe = tl.where(owned, t, 0)
        z_t, _th = _load_z(x_ptr + r64 * row_stride + t_safe, owned, cap_c, inv_cap_c, SOFTCAP,
                           IS_FP64)  # fmt: skip
        if HAS_WEIGHT:
            w_t = to_compute(tl.load(w_ptr + t_safe, mask=owned, other=0.0), IS_FP64)
        else:
            w_t = to_compute(tl.where(owned, 1, 0), IS_FP64)
    return lse, a, t, valid, owned, z_t, w_t


@triton.jit
def _grad_target(lse, a, z_t, w_t, keep_c, eps_c, HAS_SMOOTHING: tl.constexpr,
                 IS_FP64: tl.constexpr):  # fmt: skip
    """The owned target's entry before scaling: (a - keep w_t) p_t - keep w_t (1 - p_t) -
    eps_c w_t, p_t = exp(z_t - lse), 1 - p_t = -expm1(z_t - lse)."""
    kw_t = keep_c * w_t
    zl = z_t - lse
    g_t = (a - kw_t) * exp_c(zl, IS_FP64) + kw_t * expm1_c(zl, IS_FP64)
    if HAS_SMOOTHING:
        g_t -= eps_c * w_t
    return g_t


@triton.jit
def _grad_values(
    z,
    th,
    q,
    w,
    ok,
    lse,
    a,
    onehot,
    g_t,
    valid,
    keep_c,
    eps_c,
    scale,
    SOFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    IS_FP64: tl.constexpr,
):
    """(a p - keep w_t onehot - eps_c w) * scale, or soft (a p - w (keep q + eps_c)) * scale,
    times the softcap chain rule, from raw soft targets q and weights w; 0 on rows not
    counted."""
    g = a * exp_c(z - lse, IS_FP64)
    if HAS_WEIGHT:
        w = to_compute(w, IS_FP64)
    if SOFT:
        q = to_compute(q, IS_FP64)
        if HAS_SMOOTHING:
            q = q * keep_c + eps_c
        if HAS_WEIGHT:
            q = q * w
        g -= q
    else:
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                g -= eps_c * w
            else:
                g -= eps_c
        g = tl.where(onehot, g_t, g)
    g = g * scale
    if SOFTCAP:
        g = g * (1.0 - th * th)
    return tl.where(valid, g, 0.0)


@triton.jit
def _grad_tile_raw(x_ptr, t_ptr, tile, valid, n_rows, n_cols, row_stride, t_row_stride,
                   SOFT: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """A tile's raw logits (counted rows only) and soft targets."""
    r64 = tl.cast(tile, tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    x = tl.load(x_ptr + r64[:, None] * row_stride + cols[None, :],
                mask=valid[:, None] & col_ok[None, :], other=NEG_INF)  # fmt: skip
    q = x
    if SOFT:
        q = tl.load(t_ptr + r64[:, None] * t_row_stride + cols[None, :],
                    mask=(r64 < n_rows)[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
    return x, q


@triton.jit
def cross_entropy_grad_kernel(
    x_ptr,
    t_ptr,
    w_ptr,
    g_ptr,
    lse_ptr,
    coef_ptr,
    scale_ptr,
    shift_ptr,
    n_rows,
    n_cols,
    row_stride,
    t_row_stride,
    g_row_stride,
    n_seg,
    seg_len,
    ignore_index: tl.int64,
    vocab_start: tl.int64,
    keep: tl.float64,
    eps_c: tl.float64,
    softcap: tl.float64,
    grad_scale: tl.float64,
    SOFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    IS_FP64: tl.constexpr,
    INPLACE: tl.constexpr,
    ONLINE: tl.constexpr,
    SPLIT: tl.constexpr,
    ROW_SHIFT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """The gradient of a vocabulary-parallel cross-entropy from the merged row statistics:
    ``grad = (a p - keep w_t onehot_{t - vocab_start} - eps_c w) * grad_scale * row_scale``
    (soft: ``a p - w (keep q + eps_c)``), p = exp(z - lse), times the softcap chain rule;
    ``lse_ptr``, ``coef_ptr``: per row (a NaN lse, a bad target's, gives a NaN row);
    ``scale_ptr``: the 0-d row_scale. Ignored rows: 0. Reads the logits (and soft targets)
    once, writes the gradient once; ``g_ptr`` may be ``x_ptr`` (INPLACE: the target logits a
    program reads are ordered before its stores by a CTA barrier). NUM_STAGES 2: the next
    tile's (chunk's) loads are issued before this one is computed. SPLIT: each row cut into
    ``n_seg`` segments of BLOCK_N, one per program of a group (no reduction: the segments are
    independent; the one holding the target takes z_t from its registers); this is also the
    gradient pass of cross_entropy_fwd_split_kernel's two-kernel form, with ROW_SHIFT: then
    ``lse_ptr`` holds log s and ``shift_ptr`` the shift, p = exp((z - shift) - log s)."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    keep_c = to_compute(f64_scalar(keep), IS_FP64)
    eps_cc = to_compute(f64_scalar(eps_c), IS_FP64)
    scale = to_compute(f64_scalar(grad_scale), IS_FP64) * to_compute(tl.load(scale_ptr), IS_FP64)
    cap = f64_scalar(softcap)
    cap_c = to_compute(cap, IS_FP64)
    inv_cap_c = cap_c
    if SOFTCAP:
        inv_cap_c = to_compute(1.0 / cap, IS_FP64)
    LOAD_W: tl.constexpr = HAS_WEIGHT and (SOFT or HAS_SMOOTHING)
    cols = tl.arange(0, BLOCK_N)
    if SPLIT:
        group, n_groups, seg, c, end = split_place(n_seg, seg_len, n_cols, BLOCK_N)
        ok = c < end
        w = c  # this segment's class weights, loaded once
        if LOAD_W:
            w = tl.load(w_ptr + c, mask=ok, other=0.0)
        # (ignored rows' logits are not read: their targets are loaded a row ahead)
        t = _seg_target(t_ptr, group, n_rows, SOFT)
        if NUM_STAGES >= 2:
            x1, q1 = _seg_raw(x_ptr, t_ptr, group, t, c, n_rows, end, row_stride,
                              t_row_stride, ignore_index, SOFT, SOFT)  # fmt: skip
            t1 = _seg_target(t_ptr, group + n_groups, n_rows, SOFT)
        for row in range(group, n_rows, n_groups):
            r64 = tl.cast(row, tl.int64)
            if NUM_STAGES == 1:
                t = _seg_target(t_ptr, row, n_rows, SOFT)
                x, q = _seg_raw(x_ptr, t_ptr, row, t, c, n_rows, end, row_stride,
                                t_row_stride, ignore_index, SOFT, SOFT)  # fmt: skip
            else:
                x, q = x1, q1
                x1, q1 = _seg_raw(x_ptr, t_ptr, row + n_groups, t1, c, n_rows, end,
                                  row_stride, t_row_stride, ignore_index, SOFT,
                                  SOFT)  # fmt: skip
                t2 = _seg_target(t_ptr, row + 2 * n_groups, n_rows, SOFT)
            lse = to_compute(tl.load(lse_ptr + r64), IS_FP64)
            a = to_compute(tl.load(coef_ptr + r64), IS_FP64)
            lane_t = tl.zeros([], tl.int32) - 1
            if SOFT:
                valid = r64 >= 0
                t_local = r64 * 0
                read = ok
            else:
                valid = t != ignore_index
                t_local = t - vocab_start
                lane_t = tl.where(valid, seg_lane(t_local, seg, seg_len, end), -1)
                read = c < tl.where(valid, end, 0)
            z, th = _to_z(x, read, cap_c, inv_cap_c, SOFTCAP, IS_FP64)
            if ROW_SHIFT:
                z = z - to_compute(tl.load(shift_ptr + r64), IS_FP64)
            g = _seg_grad(z, th, q, w, tl.arange(0, BLOCK_N), ok, t_local, lane_t, valid, lse, a,
                          w_ptr, keep_c, eps_cc, scale, SOFT, HAS_WEIGHT, HAS_SMOOTHING, SOFTCAP,
                          IS_FP64)  # fmt: skip
            tl.store(g_ptr + r64 * g_row_stride + c, g.to(g_ptr.dtype.element_ty), mask=ok)
            if NUM_STAGES >= 2:
                t, t1 = t1, t2
    elif ONLINE:
        # one row at a time in chunks: no reduction, so one pass
        for row in range(pid, n_rows, n_prog):
            r64 = tl.cast(row, tl.int64)
            lse, a, t, valid, owned, z_t, w_t = _grad_row_data(
                x_ptr, t_ptr, w_ptr, lse_ptr, coef_ptr, r64, True, n_cols, row_stride,
                ignore_index, vocab_start, cap_c, inv_cap_c, SOFT, HAS_WEIGHT, SOFTCAP, IS_FP64,
            )  # fmt: skip
            g_t = _grad_target(lse, a, z_t, w_t, keep_c, eps_cc, HAS_SMOOTHING, IS_FP64)
            if INPLACE:
                tl.debug_barrier()
            n_load = tl.where(valid, n_cols, 0)  # ignored rows: written, not read
            x_row = x_ptr + r64 * row_stride
            t_row = t_ptr + r64 * t_row_stride
            if NUM_STAGES >= 2:
                x1, q1, w1 = _raw_chunk(x_row, t_row, w_ptr, cols, n_load, n_cols, SOFT, LOAD_W)
            for start in range(0, n_cols, BLOCK_N):
                c = start + cols
                ok = c < n_cols
                if NUM_STAGES == 1:
                    x, q, w = _raw_chunk(x_row, t_row, w_ptr, c, n_load, n_cols, SOFT, LOAD_W)
                else:
                    x, q, w = x1, q1, w1
                    x1, q1, w1 = _raw_chunk(x_row, t_row, w_ptr, c + BLOCK_N, n_load, n_cols,
                                            SOFT, LOAD_W)  # fmt: skip
                z, th = _to_z(x, c < n_load, cap_c, inv_cap_c, SOFTCAP, IS_FP64)
                g = _grad_values(
                    z, th, q, w, ok, lse, a, owned & (c == t), g_t, valid, keep_c, eps_cc,
                    scale, SOFT, HAS_WEIGHT, HAS_SMOOTHING, SOFTCAP, IS_FP64,
                )  # fmt: skip
                tl.store(g_ptr + r64 * g_row_stride + c, g.to(g_ptr.dtype.element_ty), mask=ok)
    else:
        n_tiles = tl.cdiv(n_rows, ROWS)
        r_lane = tl.arange(0, ROWS)
        col_ok = cols < n_cols
        w = cols  # the class weights, the same for every row: loaded once
        if LOAD_W:
            w = tl.load(w_ptr + cols, mask=col_ok, other=0.0)[None, :]
        # per-row data (targets, lse, a, target logits) one tile ahead of the logits, which are
        # one tile ahead of the compute (NUM_STAGES 2)
        r64 = tl.cast(pid, tl.int64) * ROWS + r_lane
        rd = _grad_row_data(
            x_ptr, t_ptr, w_ptr, lse_ptr, coef_ptr, r64, r64 < n_rows, n_cols, row_stride,
            ignore_index, vocab_start, cap_c, inv_cap_c, SOFT, HAS_WEIGHT, SOFTCAP, IS_FP64,
        )  # fmt: skip
        if NUM_STAGES >= 2:
            x, q = _grad_tile_raw(x_ptr, t_ptr, pid, rd[3], n_rows, n_cols, row_stride,
                                  t_row_stride, SOFT, ROWS, BLOCK_N)  # fmt: skip
            r64n = tl.cast(pid + n_prog, tl.int64) * ROWS + r_lane
            rd1 = _grad_row_data(
                x_ptr, t_ptr, w_ptr, lse_ptr, coef_ptr, r64n, r64n < n_rows, n_cols, row_stride,
                ignore_index, vocab_start, cap_c, inv_cap_c, SOFT, HAS_WEIGHT, SOFTCAP, IS_FP64,
            )  # fmt: skip
        for tile in range(pid, n_tiles, n_prog):
            r64 = tl.cast(tile, tl.int64) * ROWS + r_lane
            row_ok = r64 < n_rows
            if NUM_STAGES == 1:
                rd = _grad_row_data(
                    x_ptr, t_ptr, w_ptr, lse_ptr, coef_ptr, r64, row_ok, n_cols, row_stride,
                    ignore_index, vocab_start, cap_c, inv_cap_c, SOFT, HAS_WEIGHT, SOFTCAP,
                    IS_FP64,
                )  # fmt: skip
                x, q = _grad_tile_raw(x_ptr, t_ptr, tile, rd[3], n_rows, n_cols, row_stride,
                                      t_row_stride, SOFT, ROWS, BLOCK_N)  # fmt: skip
            else:
                x1, q1 = _grad_tile_raw(x_ptr, t_ptr, tile + n_prog, rd1[3], n_rows, n_cols,
                                        row_stride, t_row_stride, SOFT, ROWS, BLOCK_N)  # fmt: skip
                r64n = tl.cast(tile + 2 * n_prog, tl.int64) * ROWS + r_lane
                rd2 = _grad_row_data(
                    x_ptr, t_ptr, w_ptr, lse_ptr, coef_ptr, r64n, r64n < n_rows, n_cols,
                    row_stride, ignore_index, vocab_start, cap_c, inv_cap_c, SOFT, HAS_WEIGHT,
                    SOFTCAP, IS_FP64,
                )  # fmt: skip
            lse, a, t, valid, owned, z_t, w_t = rd
            g_t = _grad_target(lse, a, z_t, w_t, keep_c, eps_cc, HAS_SMOOTHING, IS_FP64)
            if INPLACE:
                tl.debug_barrier()  # this tile's target logits were read by every thread
            ok = row_ok[:, None] & col_ok[None, :]
            z, th = _to_z(x, valid[:, None] & col_ok[None, :], cap_c, inv_cap_c, SOFTCAP, IS_FP64)
            g = _grad_values(
                z, th, q, w, ok, lse[:, None], a[:, None],
                owned[:, None] & (cols[None, :] == t[:, None]), g_t[:, None], valid[:, None],
                keep_c, eps_cc, scale, SOFT, HAS_WEIGHT, HAS_SMOOTHING, SOFTCAP, IS_FP64,
            )  # fmt: skip
            tl.store(
                g_ptr + r64[:, None] * g_row_stride + cols[None, :],
                g.to(g_ptr.dtype.element_ty),
                mask=ok,
            )
            if NUM_STAGES >= 2:
                x, q, rd, rd1 = x1, q1, rd1, rd2


# ----------------------------------------------------------------------------------------------
# rows split over several programs (common.py: the segment protocol). Per segment j the
# partials [m_j, s_j, acc_j, csum_j, acc_w_j, csum_w_j, z_t] (``_seg_partials``; sums relative
# to safe_shift(m_j), z_t stored by the segment holding the target only) go to the workspace
# ([n_rows, 7, n_seg], compute dtype); the last program of the row to arrive merges them in
# segment order (``_seg_merge``), as the vocabulary-parallel merge does for ranks.

_WS_SLOTS = tl.constexpr(7)
_WS_ZT = tl.constexpr(6)


@triton.jit
def _seg_partials(z, q, w, ok, keep_c, eps_c, SUMS: tl.constexpr, SUMS_W: tl.constexpr,
                  SOFT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                  IS_FP64: tl.constexpr):  # fmt: skip
    """A segment's (m, s, acc, csum, acc_w, csum_w): m = max z, s = sum exp(z - shift), with
    SUMS acc = sum coef (z - shift), csum = sum coef for _coef's coefficients, with SUMS_W the
    same for coef = w; shift = safe_shift(m)."""
    m = tl.max(z, axis=0)
    rel = z - safe_shift(m)
    s = tl.sum(exp_c(rel, IS_FP64), axis=0)
    acc = s * 0.0
    csum = acc
    acc_w = acc
    csum_w = acc
    if SUMS:
        coef = _coef(q, w, ok, keep_c, eps_c, SOFT, HAS_WEIGHT, HAS_SMOOTHING, IS_FP64)
        acc = tl.sum(tl.where(ok, coef * rel, 0.0), axis=0)
        csum = tl.sum(coef, axis=0)
    if SUMS_W:
        coef_w = _coef(q, w, ok, keep_c, eps_c, False, HAS_WEIGHT, False, IS_FP64)
        acc_w = tl.sum(tl.where(ok, coef_w * rel, 0.0), axis=0)
        csum_w = tl.sum(coef_w, axis=0)
    return m, s, acc, csum, acc_w, csum_w


@triton.jit
def _seg_store(ws_row, n_seg, seg, m, s, acc, csum, acc_w, csum_w, SUMS: tl.constexpr,
               SUMS_W: tl.constexpr):  # fmt: skip
    tl.store(ws_row + seg, m)
    tl.store(ws_row + n_seg + seg, s)
    if SUMS:
        tl.store(ws_row + 2 * n_seg + seg, acc)
        tl.store(ws_row + 3 * n_seg + seg, csum)
    if SUMS_W:
        tl.store(ws_row + 4 * n_seg + seg, acc_w)
        tl.store(ws_row + 5 * n_seg + seg, csum_w)


@triton.jit
def _seg_merge(ws_row, n_seg, SUMS: tl.constexpr, SUMS_W: tl.constexpr, IS_FP64: tl.constexpr,
               BLOCK: tl.constexpr):  # fmt: skip
    """The row's (max, shift, s, acc, csum, acc_w, csum_w) from its segments' partials, the
    sums rebased from each segment's shift to the row's: acc += csum (shift_j - shift)
    (finite shifts only). Fixed order: segment lanes in blocks, then one tree."""
    row_max, shift, s = merge_max_sum(ws_row, ws_row + n_seg, n_seg, IS_FP64, BLOCK)
    acc = full_vec(BLOCK, 0.0, IS_FP64)
    csum = acc
    acc_w = acc
    csum_w = acc
    if SUMS or SUMS_W:
        for start in range(0, n_seg, BLOCK):
            i = start + tl.arange(0, BLOCK)
            mk = i < n_seg
            m = tl.load(ws_row + i, mask=mk, other=NEG_INF, cache_modifier=".cg")
            d = tl.where(mk, safe_shift(m) - shift, 0.0)
            if SUMS:
                cs = tl.load(ws_row + 3 * n_seg + i, mask=mk, other=0.0, cache_modifier=".cg")
                a = tl.load(ws_row + 2 * n_seg + i, mask=mk, other=0.0, cache_modifier=".cg")
                acc += a + cs * d
                csum += cs
            if SUMS_W:
                cs = tl.load(ws_row + 5 * n_seg + i, mask=mk, other=0.0, cache_modifier=".cg")
                a = tl.load(ws_row + 4 * n_seg + i, mask=mk, other=0.0, cache_modifier=".cg")
                acc_w += a + cs * d
                csum_w += cs
    return (row_max, shift, s, tl.sum(acc, axis=0), tl.sum(csum, axis=0), tl.sum(acc_w, axis=0),
            tl.sum(csum_w, axis=0))  # fmt: skip


@triton.jit
def _seg_target(t_ptr, row, n_rows, SOFT: tl.constexpr):
    """A row's class target (int64; soft targets or past the last row: 0, unused)."""
    r64 = tl.cast(row, tl.int64)
    if SOFT:
        t = r64 * 0
    else:
        t = tl.load(t_ptr + tl.where(r64 < n_rows, r64, 0), mask=r64 < n_rows, other=0)
        t = t.to(tl.int64)
    return t


@triton.jit
def _seg_raw(x_ptr, t_ptr, row, t, c, n_rows, end, row_stride, t_row_stride, ignore_index,
             SOFT: tl.constexpr, READ_ALL: tl.constexpr):  # fmt: skip
    """A row's segment (columns c < end) in its storage dtypes: the logits (-inf where not read:
    past the segment, past the last row, or an ignored row's unless READ_ALL) and the soft
    targets."""
    # (masks as c < limit: the interpreter turns a vector & scalar of booleans into integers)
    r64 = tl.cast(row, tl.int64)
    lim = tl.where(r64 < n_rows, end, 0)
    lim_x = lim
    if not READ_ALL:
        lim_x = tl.where(t != ignore_index, lim, 0)
    x = tl.load(x_ptr + r64 * row_stride + c, mask=c < lim_x, other=NEG_INF)
    q = x
    if SOFT:
        q = tl.load(t_ptr + r64 * t_row_stride + c, mask=c < lim, other=0.0)
    return x, q


@triton.jit
def _seg_grad(z, th, q, w, lanes, ok, t, lane_t, valid, lse, a, w_ptr, keep_c, eps_c, scale,
              SOFT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
              SOFTCAP: tl.constexpr, IS_FP64: tl.constexpr):  # fmt: skip
    """A segment's gradient from the row's (lse, a): the segment holding the target (its lane
    ``lane_t``, -1 elsewhere) picks z_t out of its registers (so an in-place gradient never
    races with it) and loads w_t."""
    onehot = lanes == lane_t
    z_t = tl.sum(tl.where(onehot, z, 0.0), axis=0)
    owner = lane_t >= 0
    if HAS_WEIGHT:
        w_t = to_compute(tl.load(w_ptr + tl.where(owner, t, 0), mask=owner, other=0.0), IS_FP64)
    else:
        w_t = to_compute(tl.where(owner, 1, 0), IS_FP64)
    g_t = _grad_target(lse, a, z_t, w_t, keep_c, eps_c, HAS_SMOOTHING, IS_FP64)
    return _grad_values(z, th, q, w, ok, lse, a, onehot, g_t, valid, keep_c, eps_c, scale, SOFT,
                        HAS_WEIGHT, HAS_SMOOTHING, SOFTCAP, IS_FP64)  # fmt: skip


@triton.jit
def cross_entropy_fwd_split_kernel(
    x_ptr,
    t_ptr,
    w_ptr,
    loss_ptr,
    g_ptr,
    lse_ptr,
    denom_ptr,
    ws_ptr,
    res_ptr,
    part_ptr,
    cnt_ptr,
    ticket_ptr,
    n_rows,
    n_cols,
    row_stride,
    t_row_stride,
    g_row_stride,
    n_seg,
    seg_len,
    ignore_index: tl.int64,
    label_smoothing: tl.float64,
    z_loss: tl.float64,
    softcap: tl.float64,
    grad_scale: tl.float64,
    SOFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    HAS_LSE: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    SOFTCAP: tl.constexpr,
    IS_FP64: tl.constexpr,
    REDUCE: tl.constexpr,
    DENOM: tl.constexpr,
    PHASE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SEG_BLOCK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """cross_entropy_fwd_kernel's outputs with each row split into ``n_seg`` segments, one per
    program of a group (common.py). The last program of a row to arrive merges its segments'
    partials and writes the row's loss (REDUCE 0) or its float64 share (``part_ptr``: [3,
    n_rows], loss, denominator term, counted; the last program of the grid sums them in row
    order), ``lse_ptr``, and with HAS_GRAD ``res_ptr`` ([3, n_rows]: the rows' shift, NaN for
    a bad target, log s and a). PHASE 0 (fused, GPU): the other programs wait for it and write the
    gradient of their segment from registers (reads n, writes n; ``g_ptr`` may be ``x_ptr``).
    PHASE 1: no gradient here (loss only, reads n), or HAS_GRAD: cross_entropy_grad_kernel
    writes it next from ``res_ptr`` and the scale this kernel leaves at ``part_ptr[3 n_rows]``
    (1 / denominator for "mean", DENOM 3 summed here; else 1): 2 launches, reads 2n, writes n.
    ``denom_ptr``: as cross_entropy_fwd_kernel's. Ignored rows' logits are not read (unless
    HAS_LSE); bad targets read nothing through them."""
    group, n_groups, seg, c, end = split_place(n_seg, seg_len, n_cols, BLOCK_N)
    lanes = tl.arange(0, BLOCK_N)
    ok = c < end
    eps = f64_scalar(label_smoothing)
    keep_c = to_compute(1.0 - eps, IS_FP64)
    eps_c = to_compute(eps / n_cols, IS_FP64)
    z_c = to_compute(f64_scalar(z_loss), IS_FP64)
    cap = f64_scalar(softcap)
    cap_c = to_compute(cap, IS_FP64)
    inv_cap_c = cap_c
    if SOFTCAP:
        inv_cap_c = to_compute(1.0 / cap, IS_FP64)
    row_scale = to_compute(f64_scalar(grad_scale), IS_FP64)
    if DENOM == 1 or DENOM == 2:
        row_scale = row_scale / to_compute(tl.load(denom_ptr), IS_FP64)
    if DENOM == 4:
        row_scale = row_scale / to_compute(n_rows, IS_FP64)
    SUMS: tl.constexpr = SOFT or HAS_SMOOTHING
    READ_ALL: tl.constexpr = SOFT or HAS_LSE
    LOAD_W: tl.constexpr = HAS_WEIGHT and (SOFT or HAS_SMOOTHING)
    w = c  # this segment's class weights, the same for every row: loaded once
    if LOAD_W:
        w = tl.load(w_ptr + c, mask=ok, other=0.0)
    # NUM_STAGES 2: the next row's segment in flight while this one is computed (and, fused,
    # merged), its class target loaded one row earlier still
    t = _seg_target(t_ptr, group, n_rows, SOFT)
    if NUM_STAGES >= 2:
        x1, q1 = _seg_raw(x_ptr, t_ptr, group, t, c, n_rows, end, row_stride, t_row_stride,
                          ignore_index, SOFT, READ_ALL)  # fmt: skip
        t1 = _seg_target(t_ptr, group + n_groups, n_rows, SOFT)
    for row in range(group, n_rows, n_groups):
        r64 = tl.cast(row, tl.int64)
        if NUM_STAGES == 1:
            t = _seg_target(t_ptr, row, n_rows, SOFT)
            x, q = _seg_raw(x_ptr, t_ptr, row, t, c, n_rows, end, row_stride, t_row_stride,
                            ignore_index, SOFT, READ_ALL)  # fmt: skip
        else:
            x, q = x1, q1
            x1, q1 = _seg_raw(x_ptr, t_ptr, row + n_groups, t1, c, n_rows, end, row_stride,
                              t_row_stride, ignore_index, SOFT, READ_ALL)  # fmt: skip
            t2 = _seg_target(t_ptr, row + 2 * n_groups, n_rows, SOFT)
        lane_t = tl.zeros([], tl.int32) - 1
        if SOFT:
            valid = r64 >= 0
            in_range = r64 < 0
            bad = in_range
            read = ok
        else:
            valid = t != ignore_index
            in_range = (t >= 0) & (t < n_cols)
            bad = valid & (in_range == 0)
            lane_t = seg_lane(t, seg, seg_len, end)
            read = ok
            if not READ_ALL:
                read = c < tl.where(valid, end, 0)
        z, th = _to_z(x, read, cap_c, inv_cap_c, SOFTCAP, IS_FP64)
        m, s, acc, csum, _aw, _cw = _seg_partials(z, q, w, ok, keep_c, eps_c, SUMS, False, SOFT,
                                                  HAS_WEIGHT, HAS_SMOOTHING, IS_FP64)  # fmt: skip
        ws_row = ws_ptr + r64 * (_WS_SLOTS * n_seg)
        _seg_store(ws_row, n_seg, seg, m, s, acc, csum, acc, csum, SUMS, False)
        if not SOFT:
            z_t = tl.sum(tl.where(lanes == lane_t, z, 0.0), axis=0)
            tl.store(ws_row + _WS_ZT * n_seg + seg, z_t, mask=lane_t >= 0)
        cnt = cnt_ptr + r64
        if seg_arrive(cnt, n_seg):
            # the row: its segments merged in order, then the loss terms of _fwd_online_row
            _mx, shift, s_r, dot, coef_sum, _a, _b = _seg_merge(ws_row, n_seg, SUMS, False,
                                                                IS_FP64, SEG_BLOCK)  # fmt: skip
            log_s = tl.log(s_r)
            lse = shift + log_s
            if SOFT:
                zs_t = log_s
                w_t = log_s
            else:
                t_safe = tl.where(in_range, t, 0)
                zs_t = tl.load(ws_row + _WS_ZT * n_seg + t_safe // seg_len, mask=in_range,
                               other=0.0, cache_modifier=".cg") - shift  # fmt: skip
                if HAS_WEIGHT:
                    w_t = to_compute(tl.load(w_ptr + t_safe, mask=in_range, other=0.0), IS_FP64)
                else:
                    w_t = to_compute(tl.where(in_range, 1, 0), IS_FP64)
            loss, a, _ar, _kw = _row_terms(log_s, lse, zs_t, w_t, dot, coef_sum, keep_c, eps_c,
                                           z_c, SOFT, HAS_SMOOTHING, HAS_Z)  # fmt: skip
            if not SOFT:
                loss = tl.where(valid, loss, 0.0)
                loss = tl.where(bad, float("nan"), loss)
            if REDUCE == 0:
                tl.store(loss_ptr + r64, loss.to(loss_ptr.dtype.element_ty))
            else:
                tl.store(part_ptr + r64, loss.to(tl.float64))
            if DENOM == 3:
                den = tl.where(valid, tl.where(in_range, w_t, float("nan")), 0.0)
                tl.store(part_ptr + n_rows + r64, den.to(tl.float64))
                tl.store(part_ptr + 2 * n_rows + r64, valid.to(tl.float64))
            if HAS_LSE:
                tl.store(lse_ptr + r64, lse.to(lse_ptr.dtype.element_ty))
            if HAS_GRAD:
                # p = exp((z - shift) - log_s), never exp(z - lse): lse rounds to the logits'
                # scale (at 1e30 in float32 a log_s of 4 is below its ulp)
                tl.store(res_ptr + r64, tl.where(bad, float("nan"), shift))
                tl.store(res_ptr + n_rows + r64, log_s)
                tl.store(res_ptr + 2 * n_rows + r64, a)
            if PHASE == 0:
                seg_publish(cnt)
            else:
                tl.store(cnt, 0)
        if PHASE == 0:
            seg_wait(cnt, n_seg)
            shift_g = tl.load(res_ptr + r64, cache_modifier=".cg")
            log_s_g = tl.load(res_ptr + n_rows + r64, cache_modifier=".cg")
            a_g = tl.load(res_ptr + 2 * n_rows + r64, cache_modifier=".cg")
            g = _seg_grad(z - shift_g, th, q, w, lanes, ok, t, lane_t, valid, log_s_g, a_g, w_ptr,
                          keep_c, eps_c, row_scale, SOFT, HAS_WEIGHT, HAS_SMOOTHING, SOFTCAP,
                          IS_FP64)  # fmt: skip
            tl.store(g_ptr + r64 * g_row_stride + c, g.to(g_ptr.dtype.element_ty), mask=ok)
            seg_depart(cnt, n_seg)
        if NUM_STAGES >= 2:
            t, t1 = t1, t2
    # the reduction over rows (and, two kernels, the gradient's scale)
    SCALE_OUT: tl.constexpr = PHASE == 1 and HAS_GRAD
    if REDUCE > 0 or (SCALE_OUT and DENOM == 3):
        if last_program(ticket_ptr):
            total = sum_partials(part_ptr, n_rows)
            if REDUCE == 2:
                if DENOM == 3:
                    d = sum_partials(part_ptr + n_rows, n_rows)
                    counted = sum_partials(part_ptr + 2 * n_rows, n_rows)
                elif DENOM == 4:
                    d = tl.zeros([], tl.float64) + n_rows
                    counted = d
                elif DENOM == 2:
                    d = tl.load(denom_ptr, cache_modifier=".cg").to(tl.float64)
                    counted = tl.load(denom_ptr + 1, cache_modifier=".cg").to(tl.float64)
                else:
                    d = tl.load(denom_ptr).to(tl.float64)
                    counted = d
                # nothing counted (every target ignored, or a given denominator of 0): 0.0
                total = tl.where(counted == 0, 0.0, total / d)
                if SCALE_OUT and DENOM == 3:
                    tl.store(part_ptr + 3 * n_rows, 1.0 / d)
            if REDUCE > 0:
                tl.store(loss_ptr, total.to(loss_ptr.dtype.element_ty))
            tl.store(ticket_ptr, 0)
    if SCALE_OUT and DENOM != 3:
        if tl.program_id(0) == 0:
            one = tl.zeros([], tl.float64) + 1.0
            if DENOM == 1 or DENOM == 2:
                one = one / tl.load(denom_ptr).to(tl.float64)
            if DENOM == 4:
                one = one / n_rows
            tl.store(part_ptr + 3 * n_rows, one)


@triton.jit
def cross_entropy_stats_split_kernel(
    x_ptr,
    t_ptr,
    w_ptr,
    st_ptr,
    ws_ptr,
    cnt_ptr,
    n_rows,
    n_cols,
    row_stride,
    t_row_stride,
    st_row_stride,
    n_seg,
    seg_len,
    ignore_index: tl.int64,
    vocab_start: tl.int64,
    softcap: tl.float64,
    SOFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SEG_BLOCK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """cross_entropy_stats_kernel's statistics with each row split into ``n_seg`` segments
    (common.py): the last program of a row to arrive merges the partials in segment order and
    writes the row's statistics. Every row is read (ignored ones too), once: one launch,
    reads n."""
    group, n_groups, seg, c, end = split_place(n_seg, seg_len, n_cols, BLOCK_N)
    lanes = tl.arange(0, BLOCK_N)
    ok = c < end
    cap = f64_scalar(softcap)
    cap_c = to_compute(cap, IS_FP64)
    inv_cap_c = cap_c
    if SOFTCAP:
        inv_cap_c = to_compute(1.0 / cap, IS_FP64)
    one = to_compute(1.0, IS_FP64)  # the raw q: keep and eps/C apply after the merge
    SUMS: tl.constexpr = SOFT or HAS_SMOOTHING
    SUMS_W: tl.constexpr = SOFT and HAS_SMOOTHING
    w = c
    if HAS_WEIGHT and SUMS:
        w = tl.load(w_ptr + c, mask=ok, other=0.0)
    # (every row is read: the targets do not gate the loads)
    if NUM_STAGES >= 2:
        x1, q1 = _seg_raw(x_ptr, t_ptr, group, 0, c, n_rows, end, row_stride, t_row_stride,
                          ignore_index, SOFT, True)  # fmt: skip
    for row in range(group, n_rows, n_groups):
        r64 = tl.cast(row, tl.int64)
        if NUM_STAGES == 1:
            x, q = _seg_raw(x_ptr, t_ptr, row, 0, c, n_rows, end, row_stride, t_row_stride,
                            ignore_index, SOFT, True)  # fmt: skip
        else:
            x, q = x1, q1
            x1, q1 = _seg_raw(x_ptr, t_ptr, row + n_groups, 0, c, n_rows, end, row_stride,
                              t_row_stride, ignore_index, SOFT, True)  # fmt: skip
        t = _seg_target(t_ptr, row, n_rows, SOFT)
        z, _th = _to_z(x, ok, cap_c, inv_cap_c, SOFTCAP, IS_FP64)
        m, s, acc, csum, acc_w, csum_w = _seg_partials(z, q, w, ok, one, one * 0.0, SUMS, SUMS_W,
                                                       SOFT, HAS_WEIGHT, False,
                                                       IS_FP64)  # fmt: skip
        ws_row = ws_ptr + r64 * (_WS_SLOTS * n_seg)
        _seg_store(ws_row, n_seg, seg, m, s, acc, csum, acc_w, csum_w, SUMS, SUMS_W)
        t_local = t - vocab_start
        owned = (t_local >= 0) & (t_local < n_cols)  # (an ignored target too, as NumPy's)
        if not SOFT:
            lane_t = seg_lane(t_local, seg, seg_len, end)
            z_t = tl.sum(tl.where(lanes == lane_t, z, 0.0), axis=0)
            tl.store(ws_row + _WS_ZT * n_seg + seg, z_t, mask=lane_t >= 0)
        cnt = cnt_ptr + r64
        if seg_arrive(cnt, n_seg):
            row_max, shift, s_r, acc_r, csum_r, acc_w_r, _cw = _seg_merge(
                ws_row, n_seg, SUMS, SUMS_W, IS_FP64, SEG_BLOCK
            )
            st_row = st_ptr + r64 * st_row_stride
            _stats_store(st_row, 0, row_max)
            _stats_store(st_row, 1, s_r)
            if SOFT:
                _stats_store(st_row, 2, csum_r)
                _stats_store(st_row, 3, acc_r)
                if HAS_SMOOTHING:
                    _stats_store(st_row, 4, acc_w_r)
            else:
                t_safe = tl.where(owned, t_local, 0)
                z_t = tl.load(ws_row + _WS_ZT * n_seg + t_safe // seg_len, mask=owned, other=0.0,
                              cache_modifier=".cg")  # fmt: skip
                _stats_store(st_row, 2, tl.where(owned, z_t - shift, 0.0))
                k = 3
                if HAS_WEIGHT:
                    _stats_store(st_row, 3, tl.load(w_ptr + t_safe, mask=owned, other=0.0))
                    k = 4
                if HAS_SMOOTHING:
                    _stats_store(st_row, k, acc_r)
            tl.store(cnt, 0)
