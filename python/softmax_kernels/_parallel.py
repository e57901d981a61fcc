"""Vocabulary-parallel cross-entropy over ``torch.distributed``, in one collective.

Each rank holds the logits of its classes ``[vocab_start, vocab_start + C_r)``. Per row, every
rank's own kernel (the backend's ``cross_entropy_stats``) computes in float32 (float64 for
float64 logits) its local max ``m_r``, ``s_r = sum exp(z - m_r)``, the target's shifted logit
``z_t - m_r`` when it owns the target, and for label smoothing / soft targets the weighted sums
relative to ``m_r`` (dispatch.py lists the columns), plus a header row ``[C_r, vocab_start_r,
W_r]`` (W_r: the rank's summed class weight). One ``all_gather_into_tensor`` gives every rank
every rank's statistics; every rank merges them in rank order:

    M = max_r m_r,  S = sum_r s_r exp(m_r - M),  L = M + log S          (the global lse)
    class target t (owned by rank o):
        loss = keep w_t (L - z_t) + eps/C sum_r (W_r (L - m_r) - D_r) + z_loss L^2,
        with L - z_t = (M - m_o) + log S - (z_t - m_o),  D_r = sum_c w_c (z_c - m_r)
    soft target q:  loss = sum_r [keep (A_r (L - m_r) - B_r) + eps/C (W_r (L - m_r) - D_r)]
        with A_r = sum w q, B_r = sum w q (z - m_r)

so the loss is the full-vocabulary loss, bitwise the same on every rank (the same operations on
the same gathered bytes), and every sum stays relative to a maximum (large logits never cancel).
The gradient of the rank's own slice then needs no further collective: the backend's
``cross_entropy_grad`` writes ``(a p - keep w_t onehot - eps/C w) * scale`` with p = exp(z - L)
and the coefficient ``a`` from the merge.

Why one all-gather and not Megatron's all-reduces (a MAX of m, then a SUM of s, the target logit
and the smoothing sums, the second waiting on the first): at the sizes of LLM training (8K-32K
rows per rank) every collective is latency-bound (~10-30 us each over NVLink, ~100 us over
gloo), and the gather moves (P - 1) x N x 16 bytes into each rank (P ranks, N rows, 4 values):
for N = 16K and P = 8, 1.8 MB, ~9 us at ~200 GB/s, less than one extra collective's latency.
Two all-reduces move ~2 x 2 x N x 16 bytes whatever P, so they win only once the gather's
(P - 1) x N x 16 bytes cost more than a collective's latency plus that: from about P = 16-32 on
NVLink (P = 8-16 over a slow network), where a hierarchical scheme would be the next step.

Host synchronisation: none. The gradient's ``eps / C`` needs the global class count, which
the gathered header rows give on the device; the kernel reads it from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import _core
from .dispatch import select


def _group_facts(process_group, n_local: int, vocab_start):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "process_group= needs torch.distributed to be initialized "
            "(torch.distributed.init_process_group)"
        )
    rank = dist.get_rank(process_group)
    world = dist.get_world_size(process_group)
    if rank < 0:
        raise ValueError("this process is not a member of process_group")
    equal = vocab_start is None
    if equal:
        vocab_start = rank * n_local
    vocab_start = _core.int_arg(vocab_start, "vocab_start")
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    return world, vocab_start, equal


def _n_stats(soft: bool, has_weight: bool, smooth: bool) -> int:
    """Columns of the statistics rows (dispatch.py's cross_entropy_stats); at least 3 for the
    header row [C_r, vocab_start_r, W_r]."""
    if soft:
        return 4 + int(smooth)
    return 3 + int(has_weight) + int(smooth)


class _Merged:
    """The per-row results of the merge, on every rank alike."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


@dataclass
class _Rows:
    """What the merge needs of a call's rows."""

    n_rows: int
    soft: bool
    t2: Any  # class targets (global indices) or None
    has_weight: bool
    device: Any


def _header(stats, n_rows, n_local, vocab_start, weight):
    """The header row [C_r, vocab_start_r, W_r, 0...] after this rank's statistics rows."""
    head = stats[n_rows]
    head.zero_()
    head[0] = float(n_local)
    head[1] = float(vocab_start)
    if weight is not None:
        head[2] = weight.sum()
    else:
        head[2] = float(n_local)


def _stats_buffer(rows: _Rows, options, cdt):
    k = _n_stats(rows.soft, rows.has_weight, options.label_smoothing != 0.0)
    return torch.empty((rows.n_rows + 1, k), dtype=getattr(torch, cdt), device=rows.device)


def _gather(stats, world, process_group):
    """The one collective: every rank's (N + 1, K) statistics, in rank order."""
    import torch.distributed as dist

    rows, k = int(stats.shape[0]), int(stats.shape[1])
    gathered = stats.new_empty((world * rows, k))
    # all_gather_single is torch >= 2.13's name of all_gather_into_tensor (now deprecated)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, stats.contiguous(), group=process_group)
    return gathered.view(world, rows, k)


def _ordered_sum(a):
    """sum over the leading (rank) axis, left to right: the same bits on every rank."""
    out = a[0]
    for r in range(1, a.shape[0]):
        out = out + a[r]
    return out


def _merge(g, rows: _Rows, o, *, equal, n_local, process_group) -> _Merged:
    """Merge gathered statistics (P, N + 1, K) in rank order (see the module docstring)."""
    world, n = g.shape[0], rows.n_rows
    head = g[:, n]  # (P, K): [C_r, vocab_start_r, W_r, ...]
    st = g[:, :n]  # (P, N, K)
    m, s = st[..., 0], st[..., 1]
    big_m = m.max(dim=0).values  # M
    shift = torch.where(torch.isneginf(big_m), torch.zeros_like(big_m), big_m)
    rel = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # m_r as the kernels shifted
    scaled = torch.where(s == 0, torch.zeros_like(s), s * torch.exp(m - shift))
    lse = shift + torch.log(_ordered_sum(scaled))  # L
    d = lse.unsqueeze(0) - rel  # L - m_r, (P, N)
    c_total = _ordered_sum(head[:, 0])
    w_tot = head[:, 2].unsqueeze(1)  # W_r
    eps, keep = o.label_smoothing, 1.0 - o.label_smoothing
    smooth = eps != 0.0
    eps_c = eps / c_total  # a device scalar: the class count is known only after the gather
    zeros = torch.zeros_like(m)
    valid = None
    if rows.soft:
        a_r, b_r = st[..., 2], st[..., 3]
        per, coef_r = keep * (a_r * d - b_r), keep * a_r
        if smooth:
            per = per + eps_c * (w_tot * d - st[..., 4])
            coef_r = coef_r + eps_c * w_tot
        loss, coef = _ordered_sum(per), _ordered_sum(coef_r)
        bad = torch.zeros_like(lse, dtype=torch.bool)
    else:
        t = rows.t2.to(torch.int64)
        starts, sizes = head[:, 1].to(torch.int64), head[:, 0].to(torch.int64)
        owner = (t.unsqueeze(0) >= starts.unsqueeze(1)) & (
            t.unsqueeze(0) < (starts + sizes).unsqueeze(1)
        )  # (P, N): rank r holds row n's target
        valid = t != o.ignore_index
        bad = valid & ((t < 0) | (t >= c_total.to(torch.int64)) | ~owner.any(dim=0))
        l_zt = _ordered_sum(torch.where(owner, d - st[..., 2], zeros))  # L - z_t
        if rows.has_weight:
            w_t = _ordered_sum(torch.where(owner, st[..., 3], zeros))
        else:
            w_t = torch.ones_like(lse)
        w_t = torch.where(bad, torch.full_like(w_t, float("nan")), w_t)
        loss, coef = keep * w_t * l_zt, keep * w_t
        if smooth:
            k_s = 4 if rows.has_weight else 3
            loss = loss + eps_c * _ordered_sum(w_tot * d - st[..., k_s])
            coef = coef + eps_c * _ordered_sum(head[:, 2])
    if o.z_loss:
        loss = loss + o.z_loss * lse * lse
        coef = coef + 2.0 * o.z_loss * lse
    nan = torch.full_like(loss, float("nan"))
    if valid is not None:
        loss = torch.where(valid, loss, torch.zeros_like(loss))
    loss = torch.where(bad, nan, loss)
    if equal:
        # the default vocab_start = rank * C_local assumes equal shards: checked on the device
        # (NaN, never a wrong loss, when the shards differ and no vocab_start was passed)
        loss = torch.where(c_total == float(world * n_local), loss, nan)
    if rows.soft:
        denom = torch.full((), float(n), dtype=lse.dtype, device=lse.device)
        counted = denom
    else:
        denom = torch.where(valid, w_t, torch.zeros_like(w_t)).sum()
        counted = valid.to(lse.dtype).sum()
    return _Merged(
        loss_rows=loss, lse=lse, row_lse=torch.where(bad, nan, lse), coef=coef, denom=denom,
        counted=counted, eps_c=eps_c, keep=keep, c_total=c_total,
    )  # fmt: skip


def _reduce(mg, reduction):
    """(loss, row_scale): the reduced loss and the gradient's 1 / denom (None for "none")."""
    if reduction == "none":
        return mg.loss_rows, None
    total = mg.loss_rows.sum()
    one = torch.ones((), dtype=total.dtype, device=total.device)
    if reduction == "sum":
        return total, one
    nothing = mg.counted == 0
    safe = torch.where(nothing, one, mg.denom)
    return torch.where(nothing, torch.zeros_like(total), total / safe), 1.0 / safe


def _validate(rows, target, mg, o, ops):
    _core.validate_target(rows.t2, target, int(round(float(mg.c_total))), o.ignore_index, ops)


def cross_entropy(
    logits, target, weight, options, validate, want_lse, backend, *, want_grad, inplace,
    process_group, vocab_start,
):  # fmt: skip
    """(loss, dlogits or None, lse or None) of the vocabulary-parallel cross-entropy; called
    inside the torch custom op (class axis already last)."""
    pb = _core.ce_problem(logits, target, weight, -1)
    mod = select(backend or None, pb.logits)
    n_local, o = pb.n_cols, options
    world, vocab_start, equal = _group_facts(process_group, n_local, vocab_start)
    rows = _Rows(pb.n_rows, pb.soft, None if pb.soft else pb.t2, pb.weight is not None,
                 pb.x2.device)  # fmt: skip
    stats = _stats_buffer(rows, o, pb.cdt)
    if pb.n_rows:
        mod.cross_entropy_stats(
            pb.x2, pb.t2, stats[: pb.n_rows], soft=pb.soft, weight=pb.weight,
            ignore_index=o.ignore_index, vocab_start=vocab_start,
            label_smoothing=o.label_smoothing, softcap=o.softcap,
        )  # fmt: skip
    _header(stats, pb.n_rows, n_local, vocab_start, pb.weight)
    g = _gather(stats, world, process_group)
    mg = _merge(g, rows, o, equal=equal, n_local=n_local, process_group=process_group)
    if not pb.soft and (validate or mod.NAME == "numpy"):
        _validate(rows, pb.target, mg, o, pb.ops)
    loss, row_scale = _reduce(mg, o.reduction)
    dlogits = None
    if want_grad:
        grad = _core.Output(pb.layout, pb.ops, pb.moved, pb.moved if inplace else None)
        if pb.n_rows:
            mod.cross_entropy_grad(
                pb.x2, pb.t2, grad.rows, row_lse=mg.row_lse, row_coef=mg.coef,
                row_scale=row_scale if row_scale is not None else torch.ones_like(mg.denom),
                soft=pb.soft, weight=pb.weight, ignore_index=o.ignore_index,
                vocab_start=vocab_start, keep=mg.keep, eps_c=mg.eps_c, softcap=o.softcap,
                grad_scale=o.grad_scale,
            )  # fmt: skip
        dlogits = grad.result()
    if o.reduction == "none":
        loss = loss.reshape(pb.lead_shape)
    return loss, dlogits, (mg.lse.reshape(pb.lead_shape) if want_lse else None)


def linear_cross_entropy(
    x, linear_weight, target, linear_bias, weight, options, chunk_size, backend, *, want_grad,
    process_group, vocab_start, row_grad=None,
):  # fmt: skip
    """(loss, dx, dweight, dbias) of the vocabulary-parallel linear cross-entropy: pass 1 over
    row chunks computes each chunk's logits (a GEMM) and their statistics; one all-gather; the
    merge; pass 2 recomputes each chunk's logits and writes this rank's gradient slice into
    them, then dx = sum over ranks of dZ_r @ W_r: one all-reduce. (Two GEMMs of logits instead
    of one: the price of one collective per forward.)"""
    import torch.distributed as dist

    from . import _linear

    lp = _linear.prepare(x, linear_weight, target, linear_bias, weight)
    tg, o, ops = lp.tg, options, lp.ops
    n, n_local = tg.n_rows, lp.vocab
    mod = select(backend or None, lp.x2)
    world, vocab_start, equal = _group_facts(process_group, n_local, vocab_start)
    mat = _linear._Mat(ops)
    chunk = _linear.chunk_rows(lp, chunk_size)
    buf = ops.empty((chunk, n_local), lp.dn, lp.x2)
    w_t = lp.w.t()

    def logits_of(r0, r1):
        z = buf[: r1 - r0]
        if lp.b is None:
            mat.mm(lp.x2[r0:r1], w_t, z)
        else:
            mat.addmm_bias(lp.b, lp.x2[r0:r1], w_t, z)
        return z

    rows = _Rows(n, tg.soft, None if tg.soft else tg.t2, tg.weight is not None, lp.x2.device)
    stats = _stats_buffer(rows, o, lp.cdt)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        mod.cross_entropy_stats(
            logits_of(r0, r1), tg.t2[r0:r1], stats[r0:r1], soft=tg.soft, weight=tg.weight,
            ignore_index=o.ignore_index, vocab_start=vocab_start,
            label_smoothing=o.label_smoothing, softcap=o.softcap,
        )  # fmt: skip
    _header(stats, n, n_local, vocab_start, tg.weight)
    mg = _merge(_gather(stats, world, process_group), rows, o, equal=equal, n_local=n_local,
                process_group=process_group)  # fmt: skip
    if not tg.soft and mod.NAME == "numpy":
        _validate(rows, tg.target, mg, o, ops)
    loss, row_scale = _reduce(mg, o.reduction)
    if o.reduction == "none":
        loss = loss.reshape(lp.lead)
    if not want_grad:
        return loss, None, None, None
    if row_scale is None:
        row_scale = torch.ones_like(mg.denom)
    cdt = getattr(torch, lp.cdt)
    dx = torch.empty((n, lp.dim), dtype=cdt, device=lp.x2.device)  # summed over ranks in cdt
    dw = _linear.dweight_like(lp.w, lp.w.dtype, ops, lp.x2)
    dw_acc = dw if cdt == lp.w.dtype else _linear.dweight_like(lp.w, cdt, ops, lp.x2)
    dw_acc.zero_()
    db = torch.zeros((n_local,), dtype=cdt, device=lp.x2.device) if lp.b is not None else None
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        z, xc = logits_of(r0, r1), lp.x2[r0:r1]
        mod.cross_entropy_grad(
            z, tg.t2[r0:r1], z, row_lse=mg.row_lse[r0:r1], row_coef=mg.coef[r0:r1],
            row_scale=row_scale, soft=tg.soft, weight=tg.weight, ignore_index=o.ignore_index,
            vocab_start=vocab_start, keep=mg.keep, eps_c=mg.eps_c, softcap=o.softcap,
            grad_scale=1.0 if row_grad is not None else o.grad_scale,
        )  # fmt: skip
        if row_grad is not None:
            z *= row_grad.reshape(-1)[r0:r1, None].to(z.dtype)
        if cdt == z.dtype:
            mat.mm(z, lp.w, dx[r0:r1])
        else:  # half inputs: dx in float32 so that the all-reduce adds float32 partials
            mat.mm(z.to(cdt), lp.w.to(cdt), dx[r0:r1])
        if _linear._transposed(lp.w):
            mat.accumulate(dw_acc.t(), xc.t(), z)
        else:
            mat.accumulate(dw_acc, z.t(), xc)
        if db is not None:
            db += z.sum(dim=0, dtype=cdt)
    dist.all_reduce(dx, group=process_group)  # dx = sum_r dZ_r @ W_r
    if dw_acc is not dw:
        dw.copy_(dw_acc)
    dx = dx.to(lp.x2.dtype).reshape(tuple(lp.x.shape))
    return loss, dx, dw, (db.to(lp.x2.dtype) if db is not None else None)
