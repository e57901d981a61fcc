"""cross_entropy and cross_entropy_with_grad on every backend against torch's float64
cross-entropy (plus z-loss), for every option combination."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import softmax_kernels as sk

from reference import assert_close, ref_cross_entropy, to_numpy64

N, C = 6, 13  # odd, short rows: several rows per program / warp on the GPU backends
LOSS_DTYPE = {"float16": "float32", "bfloat16": "float32", "float32": "float32",
              "float64": "float64"}  # fmt: skip


def _problem(rng, shape=(N, C), soft=False, n_ignored=2, ignore_index=-100):
    logits = rng.standard_normal(shape) * 3.0
    c = shape[-1]
    if soft:
        target = rng.dirichlet(np.ones(c), size=shape[:-1])
    else:
        target = rng.integers(0, c, size=shape[:-1])
        flat = target.reshape(-1)
        flat[rng.choice(flat.size, size=min(n_ignored, flat.size), replace=False)] = ignore_index
    weight = rng.random(c) + 0.25
    return logits, target, weight


def _check(target_, dtype, logits64, t64, weight64, what, **opts):
    """Run both functions on the target and compare loss and gradient with the reference."""
    x = target_.array(logits64, dtype)
    xr = to_numpy64(x)  # the reference sees the same rounded logits
    t = target_.array(t64, dtype if t64.dtype.kind == "f" else None)
    tr = to_numpy64(t) if t64.dtype.kind == "f" else t64
    w = None if weight64 is None else target_.array(weight64, dtype)
    wr = None if w is None else to_numpy64(w)
    grad_scale = opts.pop("grad_scale", 1.0)
    ref_loss, ref_grad = ref_cross_entropy(xr, tr, weight=wr, grad_scale=grad_scale, **opts)
    before = target_.copy(x)
    loss = sk.cross_entropy(x, t, weight=w, backend=target_.backend, **opts)
    assert target_.kind_of(loss)
    assert str(loss.dtype).replace("torch.", "") == LOSS_DTYPE[dtype], what
    # the loss is a float32 sum over rows for half inputs: the float32 bound applies
    assert_close(loss, ref_loss, LOSS_DTYPE[dtype], f"{what} loss")
    loss2, grad = sk.cross_entropy_with_grad(
        x, t, weight=w, grad_scale=grad_scale, backend=target_.backend, **opts
    )
    assert_close(loss2, ref_loss, LOSS_DTYPE[dtype], f"{what} loss (with grad)")
    assert str(grad.dtype) == str(x.dtype) and tuple(grad.shape) == tuple(x.shape)
    assert_close(grad, ref_grad, dtype, f"{what} grad")
    assert target_.equal(x, before), "logits were modified without inplace=True"
    return grad


OPTION_GRID = list(
    itertools.product(
        ["mean", "sum", "none"],  # reduction
        [False, True],  # weight
        [0.0, 0.2],  # label_smoothing
        [0.0, 1e-2],  # z_loss
    )
)


@pytest.mark.parametrize("soft", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize(("reduction", "weighted", "smoothing", "z"), OPTION_GRID)
def test_every_option(target, rng, soft, reduction, weighted, smoothing, z):
    for dtype in ("float32", "float64"):
        logits, t, w = _problem(rng, soft=soft)
        _check(target, dtype, logits, t, w if weighted else None,
               f"{dtype} {reduction} w={weighted} ls={smoothing} z={z}",
               reduction=reduction, label_smoothing=smoothing, z_loss=z)  # fmt: skip


@pytest.mark.parametrize("soft", [False, True], ids=["index", "probs"])
def test_dtypes(target, dtype, rng, soft):
    logits, t, w = _problem(rng, soft=soft)
    _check(target, dtype, logits, t, w, f"{dtype}", reduction="mean", label_smoothing=0.1,
           z_loss=1e-3)  # fmt: skip


@pytest.mark.parametrize(
    ("shape", "path"),
    [
        ((C,), "one unbatched row, 0-d target"),
        ((2, 3, C), "N-d logits, (2, 3) target"),
        ((4, 1), "one class: loss 0 for every counted row"),
        ((3, 1000), "long rows: one row per block"),
    ],
)
def test_shapes(target, rng, shape, path):
    logits, t, w = _problem(rng, shape=shape, n_ignored=1 if len(shape) > 1 else 0)
    _check(target, "float32", logits, t, w, path, reduction="mean", label_smoothing=0.1)
    _check(target, "float32", logits, t, None, path, reduction="none")


def test_ignore_index_custom_and_all_ignored(target, rng):
    logits, t, w = _problem(rng, n_ignored=3, ignore_index=5)
    _check(target, "float32", logits, t, w, "ignore_index=5", ignore_index=5)
    # every target ignored: mean is 0.0 (not NaN) and the gradient is 0
    t_all = np.full(N, -100)
    x = target.array(logits, "float32")
    for w_ in (None, target.array(w, "float32")):
        loss, grad = sk.cross_entropy_with_grad(x, target.array(t_all), weight=w_,
                                                backend=target.backend)  # fmt: skip
        assert to_numpy64(loss) == 0.0
        assert np.array_equal(to_numpy64(grad), np.zeros((N, C)))


def test_grad_scale(target, rng):
    logits, t, w = _problem(rng)
    for reduction in ("mean", "sum", "none"):
        _check(target, "float64", logits, t, w, f"grad_scale {reduction}", reduction=reduction,
               grad_scale=0.25)  # fmt: skip


def test_strided_logits(target, rng):
    base = rng.standard_normal((2 * N, C + 4)) * 2
    x = target.array(base, "float32")[::2, 2 : 2 + C]  # row stride != C, offset start
    t = rng.integers(0, C, size=N)
    ref_loss, ref_grad = ref_cross_entropy(to_numpy64(x), t, label_smoothing=0.1)
    loss, grad = sk.cross_entropy_with_grad(x, target.array(t), label_smoothing=0.1,
                                            backend=target.backend)  # fmt: skip
    assert_close(loss, ref_loss, "float32", "strided loss")
    assert_close(grad, ref_grad, "float32", "strided grad")


def test_inplace(target, dtype, rng):
    logits, t, w = _problem(rng)
    x, wt = target.array(logits, dtype), target.array(w, dtype)
    ref_loss, ref_grad = ref_cross_entropy(to_numpy64(x), t, weight=to_numpy64(wt), z_loss=1e-3)
    loss, grad = sk.cross_entropy_with_grad(
        x, target.array(t), weight=wt, z_loss=1e-3, inplace=True,
        backend=target.backend,
    )  # fmt: skip
    assert grad is x, "inplace=True returns the logits buffer"
    assert_close(x, ref_grad, dtype, "in-place gradient")
    assert_close(loss, ref_loss, LOSS_DTYPE[dtype], "in-place loss")


def test_inplace_strided_view(target, rng):
    base = target.array(rng.standard_normal((N, 2 * C)), "float32")
    view = base.T[::2].T if target.kind != "torch" else base[:, ::2]  # last stride 2: copy path
    ref_loss, ref_grad = ref_cross_entropy(to_numpy64(view), np.arange(N) % C)
    untouched = to_numpy64(base)[:, 1::2]
    loss, grad = sk.cross_entropy_with_grad(view, target.array(np.arange(N) % C), inplace=True,
                                            backend=target.backend)  # fmt: skip
    assert grad is view
    assert_close(view, ref_grad, "float32", "in-place into a strided view")
    assert np.array_equal(to_numpy64(base)[:, 1::2], untouched), "wrote outside the view"


def test_size_zero(target):
    x = target.array(np.ones((0, C)), "float32")
    t = target.array(np.zeros(0, dtype=np.int64))
    for reduction, shape in (("none", (0,)), ("sum", ()), ("mean", ())):
        loss, grad = sk.cross_entropy_with_grad(x, t, reduction=reduction,
                                                backend=target.backend)  # fmt: skip
        assert tuple(loss.shape) == shape and tuple(grad.shape) == (0, C)
        if shape == ():
            assert to_numpy64(loss) == 0.0


def test_int32_targets_and_nan_logits(target, rng):
    logits, t, _ = _problem(rng, n_ignored=0)
    logits[1, 3] = np.nan  # a NaN logit makes that row's loss and gradient NaN
    x = target.array(logits, "float32")
    loss, grad = sk.cross_entropy_with_grad(x, target.array(t.astype(np.int32)),
                                            reduction="none", backend=target.backend)  # fmt: skip
    ref_loss, ref_grad = ref_cross_entropy(to_numpy64(x), t, reduction="none")
    assert_close(loss, ref_loss, "float32", "int32 targets, NaN row")
    assert_close(grad, ref_grad, "float32", "int32 targets, NaN row grad")


def test_bad_target(target, rng):
    logits, t, _ = _problem(rng, n_ignored=0)
    t[3] = C  # out of range
    x, tt = target.array(logits, "float32"), target.array(t)
    if target.backend == "numpy":
        with pytest.raises(ValueError, match=r"target\[3\] = 13 is out of range"):
            sk.cross_entropy(x, tt, backend=target.backend)
    else:
        # no validate on a GPU backend: no host sync, no out-of-bounds access, NaN in that row
        loss, grad = sk.cross_entropy_with_grad(x, tt, reduction="none", backend=target.backend)
        ln, gn = to_numpy64(loss), to_numpy64(grad)
        assert np.isnan(ln[3]) and np.isnan(gn[3]).all()
        assert np.isfinite(np.delete(ln, 3)).all() and np.isfinite(np.delete(gn, 3, 0)).all()
        assert np.isnan(to_numpy64(sk.cross_entropy(x, tt, backend=target.backend)))
    with pytest.raises(ValueError, match=r"target\[3\] = 13 is out of range"):
        sk.cross_entropy(x, tt, validate=True, backend=target.backend)
    t[3] = -7
    with pytest.raises(ValueError, match=r"target\[3\] = -7"):
        sk.cross_entropy(x, target.array(t), validate=True, backend=target.backend)


def test_bad_target_position_is_nd(target, rng):
    logits, t, _ = _problem(rng, shape=(2, 3, C), n_ignored=0)
    t[1, 2] = 99
    with pytest.raises(ValueError, match=r"target\[1, 2\] = 99"):
        sk.cross_entropy(target.array(logits, "float32"), target.array(t), validate=True,
                         backend=target.backend)  # fmt: skip


def test_argument_errors(target, rng):
    logits, t, w = _problem(rng)
    x, tt = target.array(logits, "float32"), target.array(t)
    b = target.backend
    with pytest.raises(ValueError, match="class-index target has shape"):
        sk.cross_entropy(x, target.array(t[:-1]), backend=b)
    with pytest.raises(ValueError, match="probability target has shape"):
        sk.cross_entropy(x, target.array(np.ones((N, C - 1)), "float32"), backend=b)
    with pytest.raises(TypeError, match="target has dtype bool"):
        sk.cross_entropy(x, target.array(t > 0), backend=b)
    with pytest.raises(ValueError, match=r"weight has shape \(12,\), expected \(13,\)"):
        sk.cross_entropy(x, tt, weight=target.array(w[:-1], "float32"), backend=b)
    with pytest.raises(ValueError, match="reduction must be one of"):
        sk.cross_entropy(x, tt, reduction="avg", backend=b)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        sk.cross_entropy(x, tt, label_smoothing=1.5, backend=b)
    with pytest.raises(ValueError, match="z_loss must be >= 0"):
        sk.cross_entropy(x, tt, z_loss=-1.0, backend=b)
    with pytest.raises(ValueError, match="at least one class"):
        sk.cross_entropy(target.array(np.ones((3, 0)), "float32"),
                         target.array(np.zeros(3, np.int64)), backend=b)  # fmt: skip
    with pytest.raises(TypeError, match="logits has dtype int64"):
        sk.cross_entropy(target.array(t.reshape(2, 3)), target.array(t[:2]), backend=b)
