"""Softmax / log-softmax forward and backward kernels.

Rows of a 2-D (n_rows, n_cols) array, addressed by a row stride (views are not copied), unit
stride along the row. Row offsets are computed in int64 (``row * row_stride`` can pass 2**31).
Programs are persistent: the grid holds about as many programs as fit on the GPU at once, and
each loops over tiles ``pid, pid + n_programs, ...``. Two strategies, chosen on the host by
``triton_backend._launch_config``:

- single pass (``ONLINE=False``): a tile of ``ROWS`` whole rows, ``[ROWS, BLOCK_N]`` with
  ``BLOCK_N >= n_cols``, is held on chip. Forward reads n, writes n; backward reads 2n, writes n.
  ``ROWS > 1`` packs several short rows into one tile so every program moves a useful amount of
  data per step.
- online (``ONLINE=True``): rows too long for the chip are walked in ``BLOCK_N`` chunks. The
  forward keeps a running maximum m and a running sum s of exp(x - m), merged chunk by chunk
  (``s <- s * exp(m_old - m_new) + sum(exp(x - m_new))``), then normalises in a second pass:
  reads 2n, writes n. The second pass walks the chunks last to first, so that the chunks read
  most recently, likeliest still in L2, are read again first.

Half types are computed in float32 and float64 in float64 (``IS_FP64``).
"""

import triton
import triton.language as tl

from .common import NEG_INF, exp_c, f64_scalar, full_scalar, full_vec, safe_shift, to_compute

# ----------------------------------------------------------------------------------------------
# forward


@triton.jit
def _softmax_fwd_tile(
    x_ptr,
    out_ptr,
    mask_ptr,
    tile,
    n_rows,
    n_cols,
    row_stride,
    out_row_stride,
    mask_row_stride,
    scale_c,
    IS_LOG: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IS_FP64: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # y = exp(z - m) / sum(exp(z - m)), z = scale * x, m = max(z); log: y = z - m - log(sum).
    # reads n (and the mask), writes n.
    # row indices in int64: row * row_stride can pass 2**31, and so can the last tile's rows
    r64 = tl.cast(tile, tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    ok = (r64 < n_rows)[:, None] & (cols < n_cols)[None, :]
    x = tl.load(x_ptr + r64[:, None] * row_stride + cols[None, :], mask=ok, other=0.0)
    keep = ok
    if HAS_MASK:
        mk = tl.load(mask_ptr + r64[:, None] * mask_row_stride + cols[None, :], mask=ok, other=0)
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
def _load_scaled_chunk(x_row, k_row, c, ok, scale_c, HAS_MASK: tl.constexpr, IS_FP64: tl.constexpr):
    """z = scale * x for one chunk of a row, -inf where masked or past the row's end."""
    x = tl.load(x_row + c, mask=ok, other=0.0)
    keep = ok
    if HAS_MASK:
        keep = ok & (tl.load(k_row + c, mask=ok, other=0) != 0)
    return tl.where(keep, to_compute(x, IS_FP64) * scale_c, NEG_INF), keep


@triton.jit
def _softmax_fwd_online_row(
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
):
    # reads 2 x n (the second read partly from L2), writes n.
    cols = tl.arange(0, BLOCK_N)
    r64 = tl.cast(row, tl.int64)
    x_row = x_ptr + r64 * row_stride
    o_row = out_ptr + r64 * out_row_stride
    k_row = mask_ptr + r64 * mask_row_stride
    # pass 1: running maximum m (a scalar, one block reduction per chunk) and per-lane sums
    # s_vec of exp(z - shift(m)), rescaled by exp(shift_old - shift_new) when m grows (shift()
    # turns -inf into 0, so a fully masked chunk never computes -inf - -inf).
    m = full_scalar(NEG_INF, IS_FP64)
    s_vec = full_vec(BLOCK_N, 0.0, IS_FP64)
    for start in range(0, n_cols, BLOCK_N):
        c = start + cols
        z, _keep = _load_scaled_chunk(x_row, k_row, c, c < n_cols, scale_c, HAS_MASK, IS_FP64)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        shift = safe_shift(m_new)
        s_vec = s_vec * exp_c(safe_shift(m) - shift, IS_FP64) + exp_c(z - shift, IS_FP64)
        m = m_new
    shift = safe_shift(m)
    s = tl.sum(s_vec, axis=0)
    log_s = tl.log(s)
    inv_s = 1.0 / s
    # pass 2: normalise, last chunk first (L2 reuse of the chunks just read).
    n_chunks = tl.cdiv(n_cols, BLOCK_N)
    for i in range(0, n_chunks):
        c = (n_chunks - 1 - i) * BLOCK_N + cols
        ok = c < n_cols
        z, keep = _load_scaled_chunk(x_row, k_row, c, ok, scale_c, HAS_MASK, IS_FP64)
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
            _softmax_fwd_online_row(
                x_ptr, out_ptr, mask_ptr, row, n_cols, row_stride, out_row_stride,
                mask_row_stride, scale_c, IS_LOG, HAS_MASK, IS_FP64, BLOCK_N,
            )  # fmt: skip
    else:
        n_tiles = tl.cdiv(n_rows, ROWS)
        if NUM_STAGES > 1:
            # software-pipelined: the next tile's loads are issued before this tile's stores
            for tile in tl.range(pid, n_tiles, n_prog, num_stages=NUM_STAGES):
                _softmax_fwd_tile(
                    x_ptr, out_ptr, mask_ptr, tile, n_rows, n_cols, row_stride,
                    out_row_stride, mask_row_stride, scale_c, IS_LOG, HAS_MASK, IS_FP64,
                    ROWS, BLOCK_N,
                )  # fmt: skip
        else:
            for tile in range(pid, n_tiles, n_prog):
                _softmax_fwd_tile(
                    x_ptr, out_ptr, mask_ptr, tile, n_rows, n_cols, row_stride,
                    out_row_stride, mask_row_stride, scale_c, IS_LOG, HAS_MASK, IS_FP64,
                    ROWS, BLOCK_N,
                )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# backward


@triton.jit
def _softmax_bwd_tile(
    dy_ptr,
    y_ptr,
    out_ptr,
    tile,
    n_rows,
    n_cols,
    dy_row_stride,
    y_row_stride,
    out_row_stride,
    scale_c,
    IS_LOG: tl.constexpr,
    IS_FP64: tl.constexpr,
    ACC_FP64: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # softmax:     dx = s * y * (dy - dot(dy, y))      reads 2 x n, writes n
    # log_softmax: dx = s * (dy - exp(y) * sum(dy))    reads 2 x n, writes n
    # row indices in int64: row * row_stride can pass 2**31, and so can the last tile's rows
    r64 = tl.cast(tile, tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    ok = (r64 < n_rows)[:, None] & (cols < n_cols)[None, :]
    dy = tl.load(dy_ptr + r64[:, None] * dy_row_stride + cols[None, :], mask=ok, other=0.0)
    y = tl.load(y_ptr + r64[:, None] * y_row_stride + cols[None, :], mask=ok, other=0.0)
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
def _softmax_bwd_online_row(
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
):
    # pass 1: sum(dy * y) (softmax, reads 2 x n) or sum(dy) (log_softmax, reads n), per lane,
    # reduced once at the end; pass 2: dx, reads 2 x n, writes n.
    # The sum is accumulated in float64 even for float32 data: over 2**20 entries sum(dy) is
    # ~1e3 while dx is ~1, and float32 accumulation left ~1e-5 relative errors in dx (above the
    # contract's float32 bound). One float64 add per element is far below what the memory
    # traffic leaves time for on sm_90 (64 float64 adds per clock per SM).
    cols = tl.arange(0, BLOCK_N)
    r64 = tl.cast(row, tl.int64)
    dy_row = dy_ptr + r64 * dy_row_stride
    y_row = y_ptr + r64 * y_row_stride
    o_row = out_ptr + r64 * out_row_stride
    acc = tl.zeros([BLOCK_N], tl.float64)
    for start in range(0, n_cols, BLOCK_N):
        c = start + cols
        ok = c < n_cols
        dy = to_compute(tl.load(dy_row + c, mask=ok, other=0.0), IS_FP64)
        if IS_LOG:
            acc += dy.to(tl.float64)
        else:
            y = to_compute(tl.load(y_row + c, mask=ok, other=0.0), IS_FP64)
            acc += (dy * y).to(tl.float64)
    total = to_compute(tl.sum(acc, axis=0), IS_FP64)
    n_chunks = tl.cdiv(n_cols, BLOCK_N)
    for i in range(0, n_chunks):
        c = (n_chunks - 1 - i) * BLOCK_N + cols  # last chunk first: L2 reuse
        ok = c < n_cols
        dy = to_compute(tl.load(dy_row + c, mask=ok, other=0.0), IS_FP64)
        y = to_compute(tl.load(y_row + c, mask=ok, other=0.0), IS_FP64)
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
            _softmax_bwd_online_row(
                dy_ptr, y_ptr, out_ptr, row, n_cols, dy_row_stride, y_row_stride,
                out_row_stride, scale_c, IS_LOG, IS_FP64, BLOCK_N,
            )  # fmt: skip
    else:
        n_tiles = tl.cdiv(n_rows, ROWS)
        if NUM_STAGES > 1:
            for tile in tl.range(pid, n_tiles, n_prog, num_stages=NUM_STAGES):
                _softmax_bwd_tile(
                    dy_ptr, y_ptr, out_ptr, tile, n_rows, n_cols, dy_row_stride,
                    y_row_stride, out_row_stride, scale_c, IS_LOG, IS_FP64, ACC_FP64, ROWS,
                    BLOCK_N,
                )  # fmt: skip
        else:
            for tile in range(pid, n_tiles, n_prog):
                _softmax_bwd_tile(
                    dy_ptr, y_ptr, out_ptr, tile, n_rows, n_cols, dy_row_stride,
                    y_row_stride, out_row_stride, scale_c, IS_LOG, IS_FP64, ACC_FP64, ROWS,
                    BLOCK_N,
                )  # fmt: skip
