"""Softmax / log-softmax forward and backward kernels.

Rows of a 2-D (n_rows, n_cols) array, addressed by a row stride (views are not copied), unit
stride along the row. Row offsets are computed in int64 (``row * row_stride`` can pass 2**31).
Programs are persistent: the grid holds as many programs as fit on the GPU at once, and each
loops over tiles ``pid, pid + n_programs, ...``. Two strategies, chosen on the host by
``triton_backend._launch_config``:

- single pass (``ONLINE=False``): a tile of ``ROWS`` whole rows, ``[ROWS, BLOCK_N]`` with
  ``BLOCK_N >= n_cols``, is held on chip. Forward reads n, writes n; backward reads 2n, writes n.
  ``ROWS > 1`` packs several short rows into one tile so every program moves at least 16 KB per
  step.
- online (``ONLINE=True``): rows too long for the chip are walked in ``BLOCK_N`` chunks. The
  forward keeps, per lane, a running maximum and a running sum of exp(z - max)
  (``common.lane_online_update``: one exponential per element, no block-wide reduction and no
  barrier per chunk), merges the lanes once per row, then normalises in a second pass: reads 2n,
  writes n. The second pass walks the chunks last to first, so that the chunks read most
  recently, likeliest still in L2, are read again first.

``NUM_STAGES`` is how many tiles (single pass) or chunks (online) a program has in flight: the
loads of the next ``NUM_STAGES - 1`` are issued, in the storage dtype, before the current one is
computed (Triton 3.9's pipeliner leaves loads that feed no dot alone, so the kernels prefetch
into registers themselves). In place (``out`` is ``x``, ``dy`` or ``y``) stays safe: a prefetch
reads other rows (single pass) or chunks not yet written (online: the second pass reads chunk
i - 1 while chunk i is written, each by its own lanes).

Half types are computed in float32 and float64 in float64 (``IS_FP64``).
"""

import triton
import triton.language as tl

from .common import (
    NEG_INF,
    exp_c,
    f64_scalar,
    full_vec,
    group_online_update,
    merge_lanes,
    merge_max_sum,
    merge_sum,
    safe_shift,
    seg_arrive,
    seg_depart,
    seg_publish,
    seg_wait,
    split_place,
    to_compute,
)

# ----------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_load(x_ptr, mask_ptr, tile, n_rows, n_cols, row_stride, mask_row_stride,
              HAS_MASK: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """A tile's raw data: (x, mask bytes) in their storage dtypes (0 where out of bounds)."""
    r64 = tl.cast(tile, tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    ok = (r64 < n_rows)[:, None] & (cols < n_cols)[None, :]
    x = tl.load(x_ptr + r64[:, None] * row_stride + cols[None, :], mask=ok, other=0.0)
    mk = ok
    if HAS_MASK:
        mk = tl.load(mask_ptr + r64[:, None] * mask_row_stride + cols[None, :], mask=ok, other=0)
    return x, mk


@triton.jit
def _fwd_tile(
    out_ptr,
    x,
    mk,
    tile,
    n_rows,
    n_cols,
    out_row_stride,
    scale_c,
    IS_LOG: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IS_FP64: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # y = exp(z - m) / sum(exp(z - m)), z = scale * x, m = max(z); log: y = z - m - log(sum).
    # reads n (and the mask: in _fwd_load), writes n.
    # row indices in int64: row * row_stride can pass 2**31, and so can the last tile's rows
    r64 = tl.cast(tile, tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    ok = (r64 < n_rows)[:, None] & (cols < n_cols)[None, :]
    keep = ok
    if HAS_MASK:
        keep = ok & (mk != 0)
    z = tl.where(keep, to_compute(x, IS_FP64) * scale_c, NEG_INF)  # masked entries take no part
    # tl.max may drop a NaN (fmax); the row still comes out NaN because exp(NaN) makes the sum
    # NaN. A row of -inf (all masked, or all -inf) gets shift 0: exp(-inf) = 0, sum = 0.
    zs = z - safe_shift(tl.max(z, axis=1))[:, None]
    e = exp_c(zs, IS_FP64)
    s = tl.sum(e, axis=1)
    if IS_LOG:
        y = zs - tl.log(s)[:, None]
    else:
        y = e * (1.0 / s)[:, None]
    if HAS_MASK:
        # masked entries: 0 / -inf, also when an unmasked NaN makes the rest of the row NaN (as
        # JAX does) and in a row with no True entry (whose sum is 0)
        y = tl.where(keep, y, NEG_INF if IS_LOG else 0.0)
    tl.store(
        out_ptr + r64[:, None] * out_row_stride + cols[None, :],
        y.to(out_ptr.dtype.element_ty),
        mask=ok,
    )


@triton.jit
def _chunk_load(x_row, k_row, c, n_cols, HAS_MASK: tl.constexpr):
    """One chunk's raw data (x, mask bytes), 0 past the row's end."""
    ok = c < n_cols
    x = tl.load(x_row + c, mask=ok, other=0.0)
    mk = ok
    if HAS_MASK:
        mk = tl.load(k_row + c, mask=ok, other=0)
    return x, mk


@triton.jit
def _chunk_z(x, mk, ok, scale_c, HAS_MASK: tl.constexpr, IS_FP64: tl.constexpr):
    """(z = scale * x, -inf where masked or past the row's end; kept entries)."""
    keep = ok
    if HAS_MASK:
        keep = ok & (mk != 0)
    return tl.where(keep, to_compute(x, IS_FP64) * scale_c, NEG_INF), keep


@triton.jit
def _fwd_online_row(
    x_ptr,
    out_ptr,
    mask_ptr,
    row,
    n_cols,
    row_stride,
    out_row_stride,
    mask_row_stride,
    scale_c,
    IS_LOG: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # reads 2 x n (the second read partly from L2), writes n.
    cols = tl.arange(0, BLOCK_N)
    r64 = tl.cast(row, tl.int64)
    x_row = x_ptr + r64 * row_stride
    o_row = out_ptr + r64 * out_row_stride
    k_row = mask_ptr + r64 * mask_row_stride
    # pass 1: chunks as [LANES, GROUP] (GROUP contiguous elements, one 16-byte vector, per lane);
    # per lane a running maximum m and s = sum exp(z - m); NUM_STAGES chunks in flight
    LANES: tl.constexpr = BLOCK_N // GROUP
    cols2 = tl.arange(0, LANES)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    m = full_vec(LANES, NEG_INF, IS_FP64)
    s = full_vec(LANES, 0.0, IS_FP64)
    if NUM_STAGES >= 2:
        x1, k1 = _chunk_load(x_row, k_row, cols2, n_cols, HAS_MASK)
    if NUM_STAGES >= 3:
        x2, k2 = _chunk_load(x_row, k_row, BLOCK_N + cols2, n_cols, HAS_MASK)
    for start in range(0, n_cols, BLOCK_N):
        c = start + cols2
        if NUM_STAGES == 1:
            x, mk = _chunk_load(x_row, k_row, c, n_cols, HAS_MASK)
        elif NUM_STAGES == 2:
            x, mk = x1, k1
            x1, k1 = _chunk_load(x_row, k_row, c + BLOCK_N, n_cols, HAS_MASK)
        else:
            x, mk = x1, k1
            x1, k1 = x2, k2
            x2, k2 = _chunk_load(x_row, k_row, c + 2 * BLOCK_N, n_cols, HAS_MASK)
        z, _keep = _chunk_z(x, mk, c < n_cols, scale_c, HAS_MASK, IS_FP64)
        m, s, _sh0, _sh1 = group_online_update(m, s, z, IS_FP64)
    # merge the lanes once: every lane's sum rebased to the row maximum
    _max, shift, s_row = merge_lanes(m, s, IS_FP64)
    log_s = tl.log(s_row)
    inv_s = 1.0 / s_row
    # pass 2: normalise, last chunk first (L2 reuse of the chunks just read); one chunk ahead
    n_chunks = tl.cdiv(n_cols, BLOCK_N)
    if NUM_STAGES >= 2:
        x1, k1 = _chunk_load(x_row, k_row, (n_chunks - 1) * BLOCK_N + cols, n_cols, HAS_MASK)
    for i in range(0, n_chunks):
        c = (n_chunks - 1 - i) * BLOCK_N + cols
        ok = c < n_cols
        if NUM_STAGES == 1:
            x, mk = _chunk_load(x_row, k_row, c, n_cols, HAS_MASK)
        else:
            # prefetch the chunk before this one (none after chunk 0: a limit of 0; the offsets
            # stay contiguous, so that the loads stay 16-byte vectors)
            x, mk = x1, k1
            c0 = (n_chunks - 1 - i) * BLOCK_N
            x1, k1 = _chunk_load(x_row, k_row, tl.maximum(c0 - BLOCK_N, 0) + cols,
                                 tl.where(c0 > 0, n_cols, 0), HAS_MASK)  # fmt: skip
        z, keep = _chunk_z(x, mk, ok, scale_c, HAS_MASK, IS_FP64)
        zs = z - shift
        if IS_LOG:
            y = zs - log_s
        else:
            y = exp_c(zs, IS_FP64) * inv_s
        if HAS_MASK:
            # masked entries: 0 / -inf, also next to an unmasked NaN and in an empty row
            y = tl.where(keep, y, NEG_INF if IS_LOG else 0.0)
        tl.store(o_row + c, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def softmax_fwd_kernel(
    x_ptr,
    out_ptr,
    mask_ptr,
    n_rows,
    n_cols,
    row_stride,
    out_row_stride,
    mask_row_stride,
    scale: tl.float64,
    IS_LOG: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IS_FP64: tl.constexpr,
    ONLINE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """out = softmax(scale * x) (log_softmax with IS_LOG) over each row; masked (mask == 0)
    entries get 0 / -inf, rows with no unmasked entry all 0 / all -inf. ``out`` may be ``x``:
    every element is read before it is written (single pass: the whole tile first; online: by
    the same thread, chunk by chunk). ``mask_ptr`` is uint8 (a bool view), row stride may be 0.
    """
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    scale_c = to_compute(f64_scalar(scale), IS_FP64)
    if ONLINE:
        for row in range(pid, n_rows, n_prog):
            _fwd_online_row(
                x_ptr, out_ptr, mask_ptr, row, n_cols, row_stride, out_row_stride,
                mask_row_stride, scale_c, IS_LOG, HAS_MASK, IS_FP64, BLOCK_N, GROUP, NUM_STAGES,
            )  # fmt: skip
    else:
        n_tiles = tl.cdiv(n_rows, ROWS)
        # the next tile's loads go out before this tile is computed (NUM_STAGES 2); tiles past
        # the end load nothing (every row masked)
        if NUM_STAGES == 1:
            for tile in range(pid, n_tiles, n_prog):
                x, mk = _fwd_load(x_ptr, mask_ptr, tile, n_rows, n_cols, row_stride,
                                  mask_row_stride, HAS_MASK, ROWS, BLOCK_N)  # fmt: skip
                _fwd_tile(out_ptr, x, mk, tile, n_rows, n_cols, out_row_stride, scale_c, IS_LOG,
                          HAS_MASK, IS_FP64, ROWS, BLOCK_N)  # fmt: skip
        else:
            x, mk = _fwd_load(x_ptr, mask_ptr, pid, n_rows, n_cols, row_stride, mask_row_stride,
                              HAS_MASK, ROWS, BLOCK_N)  # fmt: skip
            for tile in range(pid, n_tiles, n_prog):
                x_next, mk_next = _fwd_load(x_ptr, mask_ptr, tile + n_prog, n_rows, n_cols,
                                            row_stride, mask_row_stride, HAS_MASK, ROWS,
                                            BLOCK_N)  # fmt: skip
                _fwd_tile(out_ptr, x, mk, tile, n_rows, n_cols, out_row_stride, scale_c, IS_LOG,
                          HAS_MASK, IS_FP64, ROWS, BLOCK_N)  # fmt: skip
                x, mk = x_next, mk_next


# ----------------------------------------------------------------------------------------------
# backward


@triton.jit
def _bwd_load(dy_ptr, y_ptr, tile, n_rows, n_cols, dy_row_stride, y_row_stride,
              ROWS: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """A tile's raw (dy, y), 0 where out of bounds."""
    r64 = tl.cast(tile, tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    ok = (r64 < n_rows)[:, None] & (cols < n_cols)[None, :]
    dy = tl.load(dy_ptr + r64[:, None] * dy_row_stride + cols[None, :], mask=ok, other=0.0)
    y = tl.load(y_ptr + r64[:, None] * y_row_stride + cols[None, :], mask=ok, other=0.0)
    return dy, y


@triton.jit
def _bwd_tile(
    out_ptr,
    dy,
    y,
    tile,
    n_rows,
    n_cols,
    out_row_stride,
    scale_c,
    IS_LOG: tl.constexpr,
    IS_FP64: tl.constexpr,
    ACC_FP64: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # softmax:     dx = s * y * (dy - dot(dy, y))      reads 2 x n (_bwd_load), writes n
    # log_softmax: dx = s * (dy - exp(y) * sum(dy))    reads 2 x n (_bwd_load), writes n
    r64 = tl.cast(tile, tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    ok = (r64 < n_rows)[:, None] & (cols < n_cols)[None, :]
    dy = to_compute(dy, IS_FP64)
    y = to_compute(y, IS_FP64)
    # The row sum is accumulated in float64 for float32 (and float64) data: it nearly cancels
    # when dy has a zero row mean and one class dominates (dx_0 = dy_0 - exp(y_0) sum(dy), with
    # exp(y_0) ~ 1), and a float32 sum of 4096..65536 terms then misses the contract's float32
    # bound by up to 8x (issue 10 #2). float32 x float32 products are exact in float64. Half
    # data keeps float32 sums: its bound (1e-3) is 100x above their error, and its element rate
    # is the highest, so the float64 conversions would cost the most there.
    if ACC_FP64:
        dy_acc = dy.to(tl.float64)
        if IS_LOG:
            total = tl.sum(dy_acc, axis=1)
        else:
            total = tl.sum(dy_acc * y.to(tl.float64), axis=1)
        total = to_compute(total, IS_FP64)
    else:
        if IS_LOG:
            total = tl.sum(dy, axis=1)
        else:
            total = tl.sum(dy * y, axis=1)
    if IS_LOG:
        dx = scale_c * (dy - exp_c(y, IS_FP64) * total[:, None])
    else:
        dx = scale_c * y * (dy - total[:, None])
    tl.store(
        out_ptr + r64[:, None] * out_row_stride + cols[None, :],
        dx.to(out_ptr.dtype.element_ty),
        mask=ok,
    )


@triton.jit
def _bwd_chunk_load(dy_row, y_row, c, n_cols, LOAD_Y: tl.constexpr):
    ok = c < n_cols
    dy = tl.load(dy_row + c, mask=ok, other=0.0)
    y = dy
    if LOAD_Y:
        y = tl.load(y_row + c, mask=ok, other=0.0)
    return dy, y


@triton.jit
def _bwd_online_row(
    dy_ptr,
    y_ptr,
    out_ptr,
    row,
    n_cols,
    dy_row_stride,
    y_row_stride,
    out_row_stride,
    scale_c,
    IS_LOG: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # pass 1: sum(dy * y) (softmax, reads 2 x n) or sum(dy) (log_softmax, reads n), per lane,
    # reduced once at the end; pass 2: dx, reads 2 x n, writes n. One chunk ahead in both
    # (NUM_STAGES >= 2).
    # The sum is accumulated in float64 even for float32 data: over 2**20 entries sum(dy) is
    # ~1e3 while dx is ~1, and float32 accumulation left ~1e-5 relative errors in dx (above the
    # contract's float32 bound). One float64 add per element is far below what the memory
    # traffic leaves time for on sm_90 (64 float64 adds per clock per SM).
    cols = tl.arange(0, BLOCK_N)
    r64 = tl.cast(row, tl.int64)
    dy_row = dy_ptr + r64 * dy_row_stride
    y_row = y_ptr + r64 * y_row_stride
    o_row = out_ptr + r64 * out_row_stride
    # (pass 1 in [LANES, GROUP] chunks: each lane sums its 16-byte vector in-thread first, so
    # the float64 accumulator is one per lane, not one per element)
    LANES: tl.constexpr = BLOCK_N // GROUP
    cols2 = tl.arange(0, LANES)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    acc = tl.zeros([LANES], tl.float64)
    if NUM_STAGES >= 2:
        dy1, y1 = _bwd_chunk_load(dy_row, y_row, cols2, n_cols, not IS_LOG)
    for start in range(0, n_cols, BLOCK_N):
        c = start + cols2
        if NUM_STAGES == 1:
            dy, y = _bwd_chunk_load(dy_row, y_row, c, n_cols, not IS_LOG)
        else:
            dy, y = dy1, y1
            dy1, y1 = _bwd_chunk_load(dy_row, y_row, c + BLOCK_N, n_cols, not IS_LOG)
        dy64 = to_compute(dy, IS_FP64).to(tl.float64)
        if IS_LOG:
            acc += tl.sum(dy64, axis=1)
        else:
            acc += tl.sum(dy64 * to_compute(y, IS_FP64).to(tl.float64), axis=1)
    total = to_compute(tl.sum(acc, axis=0), IS_FP64)
    n_chunks = tl.cdiv(n_cols, BLOCK_N)
    if NUM_STAGES >= 2:
        dy1, y1 = _bwd_chunk_load(dy_row, y_row, (n_chunks - 1) * BLOCK_N + cols, n_cols, True)
    for i in range(0, n_chunks):
        c = (n_chunks - 1 - i) * BLOCK_N + cols  # last chunk first: L2 reuse
        ok = c < n_cols
        if NUM_STAGES == 1:
            dy, y = _bwd_chunk_load(dy_row, y_row, c, n_cols, True)
        else:
            dy, y = dy1, y1  # (the chunk before, as the forward's second pass)
            c0 = (n_chunks - 1 - i) * BLOCK_N
            dy1, y1 = _bwd_chunk_load(dy_row, y_row, tl.maximum(c0 - BLOCK_N, 0) + cols,
                                      tl.where(c0 > 0, n_cols, 0), True)  # fmt: skip
        dy = to_compute(dy, IS_FP64)
        y = to_compute(y, IS_FP64)
        if IS_LOG:
            dx = scale_c * (dy - exp_c(y, IS_FP64) * total)
        else:
            dx = scale_c * y * (dy - total)
        tl.store(o_row + c, dx.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def softmax_bwd_kernel(
    dy_ptr,
    y_ptr,
    out_ptr,
    n_rows,
    n_cols,
    dy_row_stride,
    y_row_stride,
    out_row_stride,
    scale: tl.float64,
    IS_LOG: tl.constexpr,
    IS_FP64: tl.constexpr,
    ACC_FP64: tl.constexpr,
    ONLINE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """out = scale * y * (dy - sum(dy * y)) (softmax) or scale * (dy - exp(y) * sum(dy))
    (log_softmax, y its output), per row. ``out`` may be ``dy`` or ``y``: every element is read
    before it is written."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    scale_c = to_compute(f64_scalar(scale), IS_FP64)
    if ONLINE:
        for row in range(pid, n_rows, n_prog):
            _bwd_online_row(
                dy_ptr, y_ptr, out_ptr, row, n_cols, dy_row_stride, y_row_stride,
                out_row_stride, scale_c, IS_LOG, IS_FP64, BLOCK_N, GROUP, NUM_STAGES,
            )  # fmt: skip
    else:
        n_tiles = tl.cdiv(n_rows, ROWS)
        if NUM_STAGES == 1:
            for tile in range(pid, n_tiles, n_prog):
                dy, y = _bwd_load(dy_ptr, y_ptr, tile, n_rows, n_cols, dy_row_stride,
                                  y_row_stride, ROWS, BLOCK_N)  # fmt: skip
                _bwd_tile(out_ptr, dy, y, tile, n_rows, n_cols, out_row_stride, scale_c, IS_LOG,
                          IS_FP64, ACC_FP64, ROWS, BLOCK_N)  # fmt: skip
        else:
            dy, y = _bwd_load(dy_ptr, y_ptr, pid, n_rows, n_cols, dy_row_stride, y_row_stride,
                              ROWS, BLOCK_N)  # fmt: skip
            for tile in range(pid, n_tiles, n_prog):
                dy_next, y_next = _bwd_load(dy_ptr, y_ptr, tile + n_prog, n_rows, n_cols,
                                            dy_row_stride, y_row_stride, ROWS, BLOCK_N)  # fmt: skip
                _bwd_tile(out_ptr, dy, y, tile, n_rows, n_cols, out_row_stride, scale_c, IS_LOG,
                          IS_FP64, ACC_FP64, ROWS, BLOCK_N)  # fmt: skip
                dy, y = dy_next, y_next


# ----------------------------------------------------------------------------------------------
# rows split over several programs (common.py: the segment protocol)


@triton.jit
def softmax_fwd_split_kernel(
    x_ptr,
    out_ptr,
    mask_ptr,
    ws_ptr,
    res_ptr,
    cnt_ptr,
    n_rows,
    n_cols,
    row_stride,
    out_row_stride,
    mask_row_stride,
    n_seg,
    seg_len,
    scale: tl.float64,
    IS_LOG: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IS_FP64: tl.constexpr,
    PHASE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SEG_BLOCK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """softmax_fwd_kernel's result with each row split into ``n_seg`` segments of ``seg_len``
    columns (BLOCK_N lanes), one per program of a group (common.py). Per segment j the partial
    (m_j = max z, s_j = sum exp(z - m_j)) goes to ``ws_ptr`` ([n_rows, 2, n_seg], compute
    dtype), the merged (shift, s) of the row to ``res_ptr`` ([n_rows, 2]). PHASE 0 (fused; GPU,
    co-resident grid): the segment stays in registers while the row is merged (e = exp(z -
    m_j) for softmax, then y = e exp(m_j - shift) / s: one exponential per element; z - m_j for
    log_softmax), reads n, writes n. PHASE 1: the partials and the merge only (reads n);
    PHASE 2: normalises from ``res_ptr`` (reads n, writes n): 3n together. NUM_STAGES 2: the
    next row's segment is loaded before this one is computed (fused: so also during the wait).
    ``out`` may be ``x``: a program writes only its own segment, after reading it (PHASE 0, 2),
    and prefetches rows nobody has written yet."""
    group, n_groups, seg, c, end = split_place(n_seg, seg_len, n_cols, BLOCK_N)
    ok = c < end
    scale_c = to_compute(f64_scalar(scale), IS_FP64)
    r0 = tl.cast(group, tl.int64)
    if NUM_STAGES >= 2:
        x1, k1 = _chunk_load(x_ptr + r0 * row_stride, mask_ptr + r0 * mask_row_stride, c, end,
                             HAS_MASK)  # fmt: skip
    for row in range(group, n_rows, n_groups):
        r64 = tl.cast(row, tl.int64)
        if NUM_STAGES == 1:
            x, mk = _chunk_load(x_ptr + r64 * row_stride, mask_ptr + r64 * mask_row_stride, c,
                                end, HAS_MASK)  # fmt: skip
        else:
            x, mk = x1, k1
            # (past the last row: every load masked off by a limit of 0, the offsets left
            # contiguous so that the loads stay 16-byte vectors)
            rn = r64 + n_groups
            x1, k1 = _chunk_load(x_ptr + rn * row_stride, mask_ptr + rn * mask_row_stride, c,
                                 tl.where(rn < n_rows, end, 0), HAS_MASK)  # fmt: skip
        z, keep = _chunk_z(x, mk, ok, scale_c, HAS_MASK, IS_FP64)
        res_row = res_ptr + r64 * 2
        if PHASE == 2:
            shift = tl.load(res_row)
            s_row = tl.load(res_row + 1)
            if IS_LOG:
                y = (z - shift) - tl.log(s_row)
            else:
                y = exp_c(z - shift, IS_FP64) * (1.0 / s_row)
        else:
            # the segment's partial: reads n (its share), no barrier but the block reductions
            m = tl.max(z, axis=0)
            sh = safe_shift(m)
            zs = z - sh
            e = exp_c(zs, IS_FP64)
            ws_row = ws_ptr + r64 * (2 * n_seg)
            tl.store(ws_row + seg, m)
            tl.store(ws_row + n_seg + seg, tl.sum(e, axis=0))
            cnt = cnt_ptr + r64
            if seg_arrive(cnt, n_seg):
                _m, shift_m, s_m = merge_max_sum(ws_row, ws_row + n_seg, n_seg, IS_FP64, SEG_BLOCK)
                tl.store(res_row, shift_m)
                tl.store(res_row + 1, s_m)
                if PHASE == 0:
                    seg_publish(cnt)
                else:
                    tl.store(cnt, 0)
            if PHASE == 0:
                seg_wait(cnt, n_seg)
                shift = tl.load(res_row, cache_modifier=".cg")
                s_row = tl.load(res_row + 1, cache_modifier=".cg")
                if IS_LOG:
                    y = zs + ((sh - shift) - tl.log(s_row))
                else:
                    # a segment of -inf has e = 0: factor 0 (exp(0 - shift) could overflow)
                    y = e * (tl.where(m == NEG_INF, 0.0, exp_c(sh - shift, IS_FP64)) / s_row)
        if PHASE != 1:
            if HAS_MASK:
                # masked entries: 0 / -inf, also next to an unmasked NaN and in an empty row
                y = tl.where(keep, y, NEG_INF if IS_LOG else 0.0)
            tl.store(out_ptr + r64 * out_row_stride + c, y.to(out_ptr.dtype.element_ty), mask=ok)
            if PHASE == 0:
                seg_depart(cnt_ptr + r64, n_seg)


@triton.jit
def softmax_bwd_split_kernel(
    dy_ptr,
    y_ptr,
    out_ptr,
    ws_ptr,
    res_ptr,
    cnt_ptr,
    n_rows,
    n_cols,
    dy_row_stride,
    y_row_stride,
    out_row_stride,
    n_seg,
    seg_len,
    scale: tl.float64,
    IS_LOG: tl.constexpr,
    IS_FP64: tl.constexpr,
    ACC_FP64: tl.constexpr,
    PHASE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SEG_BLOCK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """softmax_bwd_kernel's result with each row split into ``n_seg`` segments (common.py):
    the partial row sum, dot(dy, y) (softmax) or sum(dy) (log_softmax), per segment in float64
    (``ws_ptr``: [n_rows, n_seg]), merged in segment order into ``res_ptr`` ([n_rows], float64).
    PHASE 0 (fused): dy and y stay in registers, reads 2n, writes n; PHASE 1 + PHASE 2: reads
    2n (log_softmax: n) + 2n, writes n. Segments are summed in float64 for float32 / float64
    data (ACC_FP64; see _bwd_tile), the merged sum always is."""
    group, n_groups, seg, c, end = split_place(n_seg, seg_len, n_cols, BLOCK_N)
    ok = c < end
    scale_c = to_compute(f64_scalar(scale), IS_FP64)
    LOAD_Y: tl.constexpr = (PHASE != 1) or (not IS_LOG)  # phase 1 of log_softmax: dy only
    r0 = tl.cast(group, tl.int64)
    if NUM_STAGES >= 2:
        dy1, y1 = _bwd_chunk_load(dy_ptr + r0 * dy_row_stride, y_ptr + r0 * y_row_stride, c,
                                  end, LOAD_Y)  # fmt: skip
    for row in range(group, n_rows, n_groups):
        r64 = tl.cast(row, tl.int64)
        if NUM_STAGES == 1:
            dy, y = _bwd_chunk_load(dy_ptr + r64 * dy_row_stride, y_ptr + r64 * y_row_stride, c,
                                    end, LOAD_Y)  # fmt: skip
        else:
            dy, y = dy1, y1
            rn = r64 + n_groups
            dy1, y1 = _bwd_chunk_load(dy_ptr + rn * dy_row_stride, y_ptr + rn * y_row_stride,
                                      c, tl.where(rn < n_rows, end, 0), LOAD_Y)  # fmt: skip
        dyc = to_compute(dy, IS_FP64)
        if PHASE == 2:
            total = to_compute(tl.load(res_ptr + r64), IS_FP64)
        else:
            if ACC_FP64:
                if IS_LOG:
                    part = tl.sum(dyc.to(tl.float64), axis=0)
                else:
                    part = tl.sum(dyc.to(tl.float64) * to_compute(y, IS_FP64).to(tl.float64),
                                  axis=0)  # fmt: skip
            else:
                if IS_LOG:
                    part = tl.sum(dyc, axis=0).to(tl.float64)
                else:
                    part = tl.sum(dyc * to_compute(y, IS_FP64), axis=0).to(tl.float64)
            ws_row = ws_ptr + r64 * n_seg
            tl.store(ws_row + seg, part)
            cnt = cnt_ptr + r64
            if seg_arrive(cnt, n_seg):
                tl.store(res_ptr + r64, merge_sum(ws_row, n_seg, SEG_BLOCK))
                if PHASE == 0:
                    seg_publish(cnt)
                else:
                    tl.store(cnt, 0)
            if PHASE == 0:
                seg_wait(cnt, n_seg)
                total = to_compute(tl.load(res_ptr + r64, cache_modifier=".cg"), IS_FP64)
        if PHASE != 1:
            yc = to_compute(y, IS_FP64)
            if IS_LOG:
                dx = scale_c * (dyc - exp_c(yc, IS_FP64) * total)
            else:
                dx = scale_c * yc * (dyc - total)
            tl.store(out_ptr + r64 * out_row_stride + c, dx.to(out_ptr.dtype.element_ty), mask=ok)
            if PHASE == 0:
                seg_depart(cnt_ptr + r64, n_seg)
