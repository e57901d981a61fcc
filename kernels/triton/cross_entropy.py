"""Cross-entropy forward (per-row loss) and, fused into the same pass, its gradient.

With p = softmax(x), lse = logsumexp(x), eps = label_smoothing, w = weight (or ones), C classes:

    integer target t:  loss = (1-eps) w_t (lse - x_t) + eps/C sum_c w_c (lse - x_c)
                       grad = [(1-eps) w_t + eps/C W] p - (1-eps) w_t onehot_t - eps/C w
    soft target q:     q' = (1-eps) q + eps/C,  loss = sum_c w_c q'_c (lse - x_c)
                       grad = sum(w q') p - w q'
    z-loss:            loss += z lse^2,  grad += 2 z lse p

then grad *= grad_scale (/ denom, read on the device, for reduction="mean"). W = sum(w). Ignored
rows (t == ignore_index): loss 0, grad 0, and their logits are never read. A target outside
[0, C) that is not ignore_index: that row's loss and gradient are NaN, and every load through
the target index (x_t, w_t) is masked by 0 <= t < C, so a bad target never reads out of bounds.
(In a single pass x_t is picked out of the registers holding the row, so an in-place gradient
store can never race with it.) This is the maths of the NumPy backend's
``cross_entropy_fwd``; ``lse - x_c`` is computed as ``log(s) - (x_c - m)`` without cancellation.

Strategies as in ``softmax.py``: a tile of ``ROWS`` whole rows in one pass (reads the logits
once, the soft targets once, writes the loss and the gradient once), or, for long rows, an
online pass that merges the running max / sum chunk by chunk (reads n; the loss needs no second
pass) followed, for the gradient only, by a second pass (reads n again, writes n).
``grad`` may be the logits memory (in-place): each element is read before it is written.
"""

import triton
import triton.language as tl

from .common import NEG_INF, exp_c, f64_scalar, full_scalar, full_vec, safe_shift, to_compute


@triton.jit
def _ce_tile(
    x_ptr,
    t_ptr,
    w_ptr,
    loss_ptr,
    g_ptr,
    tile,
    n_rows,
    n_cols,
    row_stride,
    t_row_stride,
    g_row_stride,
    ignore_index,
    keep_c,
    eps_c,
    z_c,
    row_scale,
    w_vec,
    w_total,
    SOFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    IS_FP64: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # reads the logits once (+ the soft targets once), writes the loss (+ the gradient) once.
    # row indices in int64: row * row_stride can pass 2**31, and so can the last tile's rows
    r64 = tl.cast(tile, tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = r64 < n_rows
    col_ok = cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    if SOFT:
        load_rows = row_ok
    else:
        t = tl.load(t_ptr + r64, mask=row_ok, other=0).to(tl.int64)
        valid = t != ignore_index
        in_range = (t >= 0) & (t < n_cols)
        bad = valid & (in_range == 0)
        load_rows = row_ok & valid  # ignored rows: no logits traffic at all
    x = tl.load(
        x_ptr + r64[:, None] * row_stride + cols[None, :],
        mask=load_rows[:, None] & col_ok[None, :],
        other=NEG_INF,
    )
    x = to_compute(x, IS_FP64)
    m = tl.max(x, axis=1)  # a NaN dropped here still poisons s below
    xs = x - m[:, None]  # x - m: lse - x_c = log(s) - xs_c, no cancellation
    e = tl.where(ok, exp_c(xs, IS_FP64), 0.0)
    s = tl.sum(e, axis=1)
    log_s = tl.log(s)
    lse = m + log_s
    if SOFT:
        q = tl.load(t_ptr + r64[:, None] * t_row_stride + cols[None, :], mask=ok, other=0.0)
        q = to_compute(q, IS_FP64)
        if HAS_SMOOTHING:
            q = tl.where(ok, q * keep_c + eps_c, 0.0)  # q' = (1-eps) q + eps/C
        if HAS_WEIGHT:
            wq = q * w_vec[None, :]
        else:
            wq = q
        swq = tl.sum(wq, axis=1)
        loss = log_s * swq - tl.sum(tl.where(ok, wq * xs, 0.0), axis=1)
        a = swq  # grad = a p - w q'
    else:
        onehot = cols[None, :] == t[:, None]
        xs_t = tl.sum(tl.where(onehot, xs, 0.0), axis=1)  # picked out of registers
        if HAS_WEIGHT:
            w_t = to_compute(
                tl.load(w_ptr + tl.where(in_range, t, 0), mask=row_ok & in_range, other=0.0),
                IS_FP64,
            )
        else:
            w_t = to_compute(tl.where(in_range, 1, 0), IS_FP64)
        kw_t = keep_c * w_t  # (1-eps) w_t
        loss = kw_t * (log_s - xs_t)
        a = kw_t
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                dot = tl.sum(tl.where(ok, xs * w_vec[None, :], 0.0), axis=1)
            else:
                dot = tl.sum(tl.where(ok, xs, 0.0), axis=1)
            loss += eps_c * (w_total * log_s - dot)
            a += eps_c * w_total
    if HAS_Z:
        loss += z_c * lse * lse
        a += 2.0 * z_c * lse
    if not SOFT:
        loss = tl.where(valid, loss, 0.0)
        loss = tl.where(bad, float("nan"), loss)
    tl.store(loss_ptr + r64, loss.to(loss_ptr.dtype.element_ty), mask=row_ok)
    if HAS_GRAD:
        p = e * (1.0 / s)[:, None]
        if SOFT:
            g = a[:, None] * p - wq
        else:
            g = a[:, None] * p - tl.where(onehot, kw_t[:, None], 0.0)
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    g -= eps_c * w_vec[None, :]
                else:
                    g -= eps_c
        g = g * row_scale
        if not SOFT:
            g = tl.where(valid[:, None], g, 0.0)  # ignored rows: exactly 0
            g = tl.where(bad[:, None], float("nan"), g)
        tl.store(
            g_ptr + r64[:, None] * g_row_stride + cols[None, :],
            g.to(g_ptr.dtype.element_ty),
            mask=ok,
        )


@triton.jit
def _ce_coef_chunk(
    t_row,
    w_ptr,
    c,
    ok,
    keep_c,
    eps_c,
    SOFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    IS_FP64: tl.constexpr,
):
    """The per-class coefficient of (lse - x_c) in the loss, for one chunk (0 past the row):
    soft: w_c q'_c; integer targets with smoothing: w_c (times eps/C later)."""
    if SOFT:
        q = to_compute(tl.load(t_row + c, mask=ok, other=0.0), IS_FP64)
        if HAS_SMOOTHING:
            q = tl.where(ok, q * keep_c + eps_c, 0.0)
        if HAS_WEIGHT:
            q = q * to_compute(tl.load(w_ptr + c, mask=ok, other=0.0), IS_FP64)
        coef = q
    else:
        if HAS_WEIGHT:
            coef = to_compute(tl.load(w_ptr + c, mask=ok, other=0.0), IS_FP64)
        else:
            coef = to_compute(tl.where(ok, 1, 0), IS_FP64)
    return coef


@triton.jit
def _ce_online_row(
    x_ptr,
    t_ptr,
    w_ptr,
    loss_ptr,
    g_ptr,
    row,
    n_cols,
    row_stride,
    t_row_stride,
    g_row_stride,
    ignore_index,
    keep_c,
    eps_c,
    z_c,
    row_scale,
    SOFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # pass 1 (the loss): reads the logits (and soft targets) once; pass 2 (the gradient only):
    # reads them again, last chunk first (L2 reuse), writes the gradient.
    cols = tl.arange(0, BLOCK_N)
    r64 = tl.cast(row, tl.int64)
    x_row = x_ptr + r64 * row_stride
    t_row = t_ptr + r64 * t_row_stride
    g_row = g_ptr + r64 * g_row_stride
    if SOFT:
        n_load = n_cols
    else:
        t = tl.load(t_ptr + row).to(tl.int64)
        valid = t != ignore_index
        in_range = (t >= 0) & (t < n_cols)
        bad = valid & (in_range == 0)
        n_load = tl.where(valid, n_cols, 0)  # ignored rows: no logits traffic
        # x_t: one masked load (a bad target reads nothing). In-place safe: pass 1's block
        # reductions (bar.sync) complete this load in every thread before any pass-2 store.
        x_t = tl.load(x_row + tl.where(in_range, t, 0), mask=valid & in_range, other=0.0)
        x_t = to_compute(x_t, IS_FP64)
    # Running maximum m (scalar); per-lane accumulators relative to shift = shift(m):
    #   s_vec   = sum exp(x - shift)
    #   acc_vec = sum coef * (x - shift), coef_vec = sum coef   (soft targets / smoothing)
    # When the shift grows by d, s_vec *= exp(-d) and acc_vec -= coef_vec * d.
    m = full_scalar(NEG_INF, IS_FP64)
    s_vec = full_vec(BLOCK_N, 0.0, IS_FP64)
    acc_vec = full_vec(BLOCK_N, 0.0, IS_FP64)
    coef_vec = full_vec(BLOCK_N, 0.0, IS_FP64)
    for start in range(0, n_cols, BLOCK_N):
        c = start + cols
        ok = c < n_cols
        x = to_compute(tl.load(x_row + c, mask=c < n_load, other=NEG_INF), IS_FP64)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift_old = safe_shift(m)
        shift = safe_shift(m_new)
        xs = x - shift
        s_vec = s_vec * exp_c(shift_old - shift, IS_FP64) + exp_c(xs, IS_FP64)
        if SOFT or HAS_SMOOTHING:
            coef = _ce_coef_chunk(
                t_row, w_ptr, c, ok, keep_c, eps_c, SOFT, HAS_WEIGHT, HAS_SMOOTHING, IS_FP64
            )
            acc_vec = acc_vec - coef_vec * (shift - shift_old) + tl.where(ok, coef * xs, 0.0)
            coef_vec += coef
        m = m_new
    shift = safe_shift(m)
    s = tl.sum(s_vec, axis=0)
    log_s = tl.log(s)
    lse = shift + log_s
    if SOFT:
        swq = tl.sum(coef_vec, axis=0)
        loss = log_s * swq - tl.sum(acc_vec, axis=0)
        a = swq
    else:
        xs_t = x_t - shift
        if HAS_WEIGHT:
            w_t = to_compute(
                tl.load(w_ptr + tl.where(in_range, t, 0), mask=in_range, other=0.0), IS_FP64
            )
        else:
            w_t = to_compute(tl.where(in_range, 1, 0), IS_FP64)
        kw_t = keep_c * w_t
        loss = kw_t * (log_s - xs_t)
        a = kw_t
        if HAS_SMOOTHING:
            w_total = tl.sum(coef_vec, axis=0)
            loss += eps_c * (w_total * log_s - tl.sum(acc_vec, axis=0))
            a += eps_c * w_total
    if HAS_Z:
        loss += z_c * lse * lse
        a += 2.0 * z_c * lse
    if not SOFT:
        loss = tl.where(valid, loss, 0.0)
        loss = tl.where(bad, float("nan"), loss)
    tl.store(loss_ptr + row, loss.to(loss_ptr.dtype.element_ty))
    if HAS_GRAD:
        inv_s = 1.0 / s
        n_chunks = tl.cdiv(n_cols, BLOCK_N)
        for i in range(0, n_chunks):
            c = (n_chunks - 1 - i) * BLOCK_N + cols
            ok = c < n_cols
            x = to_compute(tl.load(x_row + c, mask=c < n_load, other=NEG_INF), IS_FP64)
            g = a * (exp_c(x - shift, IS_FP64) * inv_s)
            if SOFT:
                g -= _ce_coef_chunk(
                    t_row, w_ptr, c, ok, keep_c, eps_c, SOFT, HAS_WEIGHT, HAS_SMOOTHING, IS_FP64
                )
            else:
                g -= tl.where(c == t, kw_t, 0.0)
                if HAS_SMOOTHING:
                    g -= eps_c * _ce_coef_chunk(
                        t_row, w_ptr, c, ok, keep_c, eps_c, SOFT, HAS_WEIGHT, HAS_SMOOTHING,
                        IS_FP64,
                    )  # fmt: skip
            g = g * row_scale
            if not SOFT:
                g = tl.where(valid, g, 0.0)
                g = tl.where(bad, float("nan"), g)
            tl.store(g_row + c, g.to(g_ptr.dtype.element_ty), mask=ok)


@triton.jit
def cross_entropy_fwd_kernel(
    x_ptr,
    t_ptr,
    w_ptr,
    loss_ptr,
    g_ptr,
    denom_ptr,
    n_rows,
    n_cols,
    row_stride,
    t_row_stride,
    g_row_stride,
    ignore_index: tl.int64,
    label_smoothing: tl.float64,
    z_loss: tl.float64,
    grad_scale: tl.float64,
    SOFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    HAS_DENOM: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    IS_FP64: tl.constexpr,
    ONLINE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Per-row cross-entropy loss into ``loss_ptr`` and, with HAS_GRAD, its gradient into
    ``g_ptr`` (which may be ``x_ptr``). Integer targets (``t_ptr``: int32/int64, one per row)
    or, with SOFT, probability rows (``t_row_stride``). ``w_ptr``: per-class weights in the
    compute dtype. ``denom_ptr``: a 0-d device scalar the gradient is divided by (HAS_DENOM)."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    # scalars in float64 from the host, rounded once to the compute dtype (as NumPy does)
    eps = f64_scalar(label_smoothing)
    keep_c = to_compute(1.0 - eps, IS_FP64)  # 1 - eps
    eps_c = to_compute(eps / n_cols, IS_FP64)  # eps / C
    z_c = to_compute(f64_scalar(z_loss), IS_FP64)
    row_scale = to_compute(f64_scalar(grad_scale), IS_FP64)
    if HAS_GRAD:
        if HAS_DENOM:
            row_scale = row_scale / to_compute(tl.load(denom_ptr), IS_FP64)
    if ONLINE:
        for row in range(pid, n_rows, n_prog):
            _ce_online_row(
                x_ptr, t_ptr, w_ptr, loss_ptr, g_ptr, row, n_cols, row_stride, t_row_stride,
                g_row_stride, ignore_index, keep_c, eps_c, z_c, row_scale, SOFT, HAS_WEIGHT,
                HAS_GRAD, HAS_SMOOTHING, HAS_Z, IS_FP64, BLOCK_N,
            )  # fmt: skip
    else:
        # the class weights (and their total W) are the same for every row: load them once
        cols = tl.arange(0, BLOCK_N)
        if HAS_WEIGHT:
            w_vec = to_compute(tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0), IS_FP64)
            w_total = tl.sum(w_vec, axis=0)
        else:
            w_vec = full_vec(BLOCK_N, 1.0, IS_FP64)
            w_total = to_compute(n_cols, IS_FP64)
        n_tiles = tl.cdiv(n_rows, ROWS)
        if NUM_STAGES > 1:
            for tile in tl.range(pid, n_tiles, n_prog, num_stages=NUM_STAGES):
                _ce_tile(
                    x_ptr, t_ptr, w_ptr, loss_ptr, g_ptr, tile, n_rows, n_cols, row_stride,
                    t_row_stride, g_row_stride, ignore_index, keep_c, eps_c, z_c, row_scale,
                    w_vec, w_total, SOFT, HAS_WEIGHT, HAS_GRAD, HAS_SMOOTHING, HAS_Z, IS_FP64,
                    ROWS, BLOCK_N,
                )  # fmt: skip
        else:
            for tile in range(pid, n_tiles, n_prog):
                _ce_tile(
                    x_ptr, t_ptr, w_ptr, loss_ptr, g_ptr, tile, n_rows, n_cols, row_stride,
                    t_row_stride, g_row_stride, ignore_index, keep_c, eps_c, z_c, row_scale,
                    w_vec, w_total, SOFT, HAS_WEIGHT, HAS_GRAD, HAS_SMOOTHING, HAS_Z, IS_FP64,
                    ROWS, BLOCK_N,
                )  # fmt: skip
