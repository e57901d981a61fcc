"""The contract's second-version additions to cross-entropy (axis / dim, softcap, return_lse)
and the dim alias of the softmax functions, on every backend against float64 references."""

from __future__ import annotations

import numpy as np
import pytest

import softmax_kernels as sk

from reference import assert_close, ref_cross_entropy, ref_softmax, to_numpy64

LOSS_DTYPE = {"float16": "float32", "bfloat16": "float32", "float32": "float32",
              "float64": "float64"}  # fmt: skip


def _ce_case(rng, shape, axis, soft):
    """Logits of ``shape`` with the class axis at ``axis``, targets to match, and the same
    problem with the class axis moved last (for the reference)."""
    logits = rng.standard_normal(shape) * 3
    c = shape[axis]
    moved = np.moveaxis(logits, axis, -1)
    if soft:
        t_last = rng.dirichlet(np.ones(c), size=moved.shape[:-1])
        target = np.moveaxis(t_last, -1, axis)
    else:
        t_last = rng.integers(0, c, size=moved.shape[:-1])
        t_last.reshape(-1)[1] = -100
        target = t_last
    return logits, target, moved, t_last


@pytest.mark.parametrize("soft", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_class_axis(target, dtype, soft, reduction, rng):
    # torch's (N, C, d1, d2) layout through axis=1: rows of 5 classes (the short-row path)
    logits, tgt, moved, t_last = _ce_case(rng, (2, 5, 3, 4), 1, soft)
    x = target.array(logits, dtype)
    t = target.array(tgt, dtype if soft else None)
    xr = np.moveaxis(to_numpy64(x), 1, -1)
    tr = np.moveaxis(to_numpy64(t), 1, -1) if soft else t_last
    ref_loss, ref_grad = ref_cross_entropy(xr, tr, reduction=reduction, label_smoothing=0.1)
    loss, grad = sk.cross_entropy_with_grad(
        x, t, axis=1, reduction=reduction, label_smoothing=0.1, backend=target.backend
    )
    assert tuple(grad.shape) == logits.shape
    assert_close(loss, ref_loss, LOSS_DTYPE[dtype], "loss, axis=1")
    assert_close(grad, np.moveaxis(ref_grad, -1, 1), dtype, "grad, axis=1")
    loss2 = sk.cross_entropy(x, t, dim=1, reduction=reduction, label_smoothing=0.1,
                             backend=target.backend)  # fmt: skip
    assert target.equal(loss2, loss)  # dim= is axis=


def test_cross_entropy_class_axis_in_place(target, rng):
    logits, tgt, moved, t_last = _ce_case(rng, (3, 6, 5), 1, False)
    x = target.array(logits, "float64")
    t = target.array(tgt)
    _, ref_grad = ref_cross_entropy(moved, t_last)
    loss, g = sk.cross_entropy_with_grad(x, t, axis=1, inplace=True, backend=target.backend)
    assert g is x
    assert_close(x, np.moveaxis(ref_grad, -1, 1), "float64", "in place, axis=1")


def test_class_axis_errors():
    x = np.zeros((2, 5, 3, 4))
    with pytest.raises(ValueError, match="pass axis=1"):
        sk.cross_entropy(x, np.zeros((2, 3, 4), np.int64))  # fits only with the class axis at 1
    with pytest.raises(TypeError, match="axis must be an int"):
        sk.cross_entropy(x, np.zeros((2, 3, 4), np.int64), axis=(1, 2))
    with pytest.raises(TypeError, match="not both"):
        sk.cross_entropy(x, np.zeros((2, 3, 4), np.int64), axis=1, dim=1)
    with pytest.raises(TypeError, match="not both"):
        sk.softmax(x, 0, dim=1)
    from numpy.exceptions import AxisError

    with pytest.raises(AxisError):
        sk.cross_entropy(x, np.zeros((2, 3, 4), np.int64), axis=4)


def test_softmax_dim_alias(target, rng):
    x = target.array(rng.standard_normal((3, 4, 5)), "float64")
    for fn, is_log in ((sk.softmax, False), (sk.log_softmax, True)):
        y = fn(x, dim=1, backend=target.backend)
        assert_close(y, ref_softmax(to_numpy64(x), 1, is_log=is_log), "float64", "dim=1")
    y = sk.softmax(x, dim=(0, 2), backend=target.backend)
    assert_close(y, ref_softmax(to_numpy64(x), (0, 2)), "float64", "dim=(0, 2)")
    dy = target.array(rng.standard_normal((3, 4, 5)), "float64")
    a = sk.softmax_backward(dy, y, dim=(0, 2), backend=target.backend)
    b = sk.softmax_backward(dy, y, (0, 2), backend=target.backend)
    assert target.equal(a, b)


@pytest.mark.parametrize("soft", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("n_cols", [7, 300])  # short rows (several per tile / warp) and longer
def test_softcap(target, dtype, soft, n_cols, rng):
    logits = rng.standard_normal((6, n_cols)) * 20  # beyond the cap: tanh saturates
    if soft:
        t64 = rng.dirichlet(np.ones(n_cols), size=6)
    else:
        t64 = rng.integers(0, n_cols, size=6)
        t64[2] = -100
    x = target.array(logits, dtype)
    t = target.array(t64, dtype if soft else None)
    tr = to_numpy64(t) if soft else t64
    w = target.array(rng.random(n_cols) + 0.5, dtype)
    opts = dict(softcap=15.0, z_loss=1e-3, label_smoothing=0.05)
    ref_loss, ref_grad = ref_cross_entropy(to_numpy64(x), tr, weight=to_numpy64(w), **opts)
    loss, grad = sk.cross_entropy_with_grad(x, t, weight=w, backend=target.backend, **opts)
    assert_close(loss, ref_loss, LOSS_DTYPE[dtype], "softcap loss")
    assert_close(grad, ref_grad, dtype, "softcap grad")
    loss_only = sk.cross_entropy(x, t, weight=w, backend=target.backend, **opts)
    assert_close(loss_only, ref_loss, LOSS_DTYPE[dtype], "softcap loss only")


def test_softcap_errors():
    x, t = np.zeros((2, 3)), np.array([0, 1])
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="softcap must be a positive number"):
            sk.cross_entropy(x, t, softcap=bad)
    with pytest.raises(ValueError, match="softcap must be finite"):
        sk.cross_entropy(x, t, softcap=float("inf"))
    with pytest.raises(TypeError, match="softcap must be a real number"):
        sk.cross_entropy(x, t, softcap="1")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_return_lse(target, dtype, reduction, rng):
    logits = rng.standard_normal((2, 3, 9)) * 4
    t64 = rng.integers(0, 9, size=(2, 3))
    t64[0, 1] = -100  # an ignored row still gets its lse
    x = target.array(logits, dtype)
    t = target.array(t64)
    ref_loss, ref_grad, ref_lse = ref_cross_entropy(to_numpy64(x), t64, reduction=reduction,
                                                    return_lse=True, softcap=5.0)  # fmt: skip
    loss, lse = sk.cross_entropy(x, t, reduction=reduction, return_lse=True, softcap=5.0,
                                 backend=target.backend)  # fmt: skip
    assert tuple(lse.shape) == (2, 3)
    assert_close(lse, ref_lse, LOSS_DTYPE[dtype], "lse")
    assert_close(loss, ref_loss, LOSS_DTYPE[dtype], "loss with lse")
    loss, grad, lse = sk.cross_entropy_with_grad(x, t, reduction=reduction, return_lse=True,
                                                 softcap=5.0, backend=target.backend)  # fmt: skip
    assert_close(lse, ref_lse, LOSS_DTYPE[dtype], "lse (with grad)")
    assert_close(grad, ref_grad, dtype, "grad (with lse)")


def test_reduced_loss_is_one_type_on_numpy():
    x, t = np.random.default_rng(0).standard_normal((4, 5)), np.array([0, 1, 2, 3])
    for red in ("mean", "sum"):
        loss = sk.cross_entropy(x, t, reduction=red)
        assert type(loss) is np.float64, (red, type(loss))
        loss32 = sk.cross_entropy(x.astype(np.float32), t, reduction=red)
        assert type(loss32) is np.float32
    assert type(sk.cross_entropy(np.zeros((0, 5)), np.zeros(0, np.int64))) is np.float64
