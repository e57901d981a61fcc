"""Float64 references the tests compare every backend with, written independently of the
library (plain NumPy formulas; cross-entropy through torch's own float64 implementation), and
the contract's accuracy check."""

from __future__ import annotations

import numpy as np

# Contract accuracy bounds, per dtype: (atol, rtol).
TOL = {
    "float64": (1e-12, 1e-12),
    "float32": (1e-6, 1e-5),
    "float16": (1e-3, 1e-3),
    "bfloat16": (8e-3, 1.6e-2),
}


def to_numpy64(a) -> np.ndarray:
    """Any array (NumPy, CuPy, torch, any device, any dtype incl. bfloat16) as float64 NumPy."""
    if isinstance(a, np.ndarray | np.generic):
        return np.asarray(a, dtype=np.float64)
    mod = type(a).__module__.split(".")[0]
    if mod == "torch":
        return a.detach().to("cpu").double().numpy()
    if mod == "cupy":
        import cupy

        return cupy.asnumpy(a).astype(np.float64)
    return np.asarray(a, dtype=np.float64)


def assert_close(out, ref, dtype: str, what: str = "") -> None:
    """max|out - ref| <= atol + rtol*|ref| elementwise; NaN and infinities must match exactly."""
    o = to_numpy64(out)
    r = np.asarray(ref, dtype=np.float64)
    assert o.shape == r.shape, f"{what}: shape {o.shape} != reference {r.shape}"
    atol, rtol = TOL[dtype]
    nan_o, nan_r = np.isnan(o), np.isnan(r)
    assert np.array_equal(nan_o, nan_r), f"{what}: NaN positions differ from the reference"
    inf_r = np.isinf(r)
    assert np.array_equal(o[inf_r], r[inf_r]), f"{what}: infinities differ from the reference"
    fin = ~nan_r & ~inf_r
    err = np.abs(o[fin] - r[fin])
    bound = atol + rtol * np.abs(r[fin])
    if err.size and not np.all(err <= bound):
        i = int(np.argmax(err - bound))
        raise AssertionError(
            f"{what}: {int((err > bound).sum())} of {err.size} elements out of bounds for "
            f"{dtype}; worst error {err[i]:.3g} > bound {bound[i]:.3g} (out {o[fin][i]!r}, "
            f"ref {r[fin][i]!r})"
        )


def _moved(x, axis):
    """x with the softmax axes flattened into the last one; returns (x2, restore)."""
    x = np.asarray(x, dtype=np.float64)
    nd = x.ndim
    if axis is None:
        axes = tuple(range(nd))
    elif isinstance(axis, tuple | list):
        axes = tuple(sorted(a % nd for a in axis))
    else:
        axes = (axis % nd,)
    other = [a for a in range(nd) if a not in axes]
    perm = other + list(axes)
    xt = np.transpose(x, perm)
    lead = xt.shape[: len(other)]
    x2 = xt.reshape(lead + (-1,))
    inv = np.argsort(perm)

    def restore(y2):
        return np.transpose(y2.reshape(xt.shape), inv)

    return x2, restore


def ref_softmax(x, axis=-1, scale=1.0, where=None, is_log=False) -> np.ndarray:
    x64 = np.asarray(x, dtype=np.float64) * scale
    if where is not None:
        where = np.broadcast_to(np.asarray(where, dtype=bool), x64.shape)
        x64 = np.where(where, x64, -np.inf)
    x2, restore = _moved(x64, axis)
    with np.errstate(all="ignore"):
        m = np.max(x2, axis=-1, keepdims=True)
        if where is not None:
            keep2, _ = _moved(where.astype(np.float64), axis)
            empty = ~(keep2 > 0).any(axis=-1, keepdims=True)
            m = np.where(empty, 0.0, m)
        z = x2 - m
        lse = np.log(np.sum(np.exp(z), axis=-1, keepdims=True))
        y = z - lse if is_log else np.exp(z - lse)
        if where is not None:
            y = np.where(empty, -np.inf if is_log else 0.0, y)
    return restore(y)


def ref_softmax_backward(dy, y, axis=-1, scale=1.0, is_log=False) -> np.ndarray:
    d2, restore = _moved(dy, axis)
    y2, _ = _moved(y, axis)
    with np.errstate(all="ignore"):
        if is_log:
            dx = scale * (d2 - np.exp(y2) * d2.sum(axis=-1, keepdims=True))
        else:
            dx = scale * y2 * (d2 - (d2 * y2).sum(axis=-1, keepdims=True))
    return restore(dx)


def ref_cross_entropy(
    logits,
    target,
    *,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    grad_scale=1.0,
    softcap=None,
    return_lse=False,
):
    """(loss, dlogits) in float64 from torch.nn.functional.cross_entropy on (-1, C) rows, plus
    z_loss * lse**2 per counted row; mean divides by the summed weight of the counted rows (the
    row count for probability targets), and is 0 when every row is ignored. ``softcap`` c
    applies c * tanh(x / c) first (autograd gives the chain rule); ``return_lse`` adds the
    per-row logsumexp (of the softcapped logits) as a third item."""
    import torch
    import torch.nn.functional as F

    x = torch.tensor(np.asarray(logits, dtype=np.float64), requires_grad=True)
    c = x.shape[-1]
    x2 = x.reshape(-1, c)
    if softcap is not None:
        x2 = softcap * torch.tanh(x2 / softcap)
    t = np.asarray(target)
    soft = t.dtype.kind == "f"
    if soft:
        t2 = torch.tensor(t.astype(np.float64).reshape(-1, c))
    else:
        t2 = torch.tensor(t.astype(np.int64).reshape(-1))
    w = None if weight is None else torch.tensor(np.asarray(weight, dtype=np.float64))
    rows = F.cross_entropy(
        x2, t2, weight=w, ignore_index=ignore_index, reduction="none",
        label_smoothing=label_smoothing,
    )  # fmt: skip
    counted = torch.ones_like(rows, dtype=torch.bool) if soft else t2 != ignore_index
    if z_loss:
        lse = torch.logsumexp(x2, dim=-1)
        rows = rows + torch.where(counted, z_loss * lse**2, torch.zeros_like(lse))
    if reduction == "none":
        loss = rows.reshape(x.shape[:-1])
        total = loss.sum()
    elif reduction == "sum":
        loss = total = rows.sum()
    else:
        if soft:
            denom = torch.tensor(float(rows.shape[0]), dtype=torch.float64)
        elif w is None:
            denom = counted.sum().double()
        else:
            denom = (w[torch.where(counted, t2, 0)] * counted).sum()
        loss = total = rows.sum() / denom if bool(counted.any()) else rows.sum() * 0.0
    (grad_scale * total).backward()
    if return_lse:
        lse = torch.logsumexp(x2.detach(), dim=-1).reshape(x.shape[:-1])
        return loss.detach().numpy(), x.grad.numpy(), lse.numpy()
    return loss.detach().numpy(), x.grad.numpy()


def ce_problem(rng, n_rows, c, soft, ignore_index=-100):
    """A cross-entropy problem for the backend tests: logits, class-index targets with row 1
    ignored (or class probabilities), and positive per-class weights."""
    logits = rng.standard_normal((n_rows, c)) * 3
    if soft:
        target = rng.dirichlet(np.ones(c), size=n_rows)
    else:
        target = rng.integers(0, c, size=n_rows)
        if n_rows > 1:
            target[1] = ignore_index
    weight = rng.random(c) + 0.25
    return logits, target, weight
