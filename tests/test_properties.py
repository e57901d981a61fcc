"""Property tests (hypothesis) of the maths, on the NumPy backend, against float64."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("hypothesis")  # (the GPU machine may lack it: skip, don't fail collection)

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402

import softmax_kernels as sk  # noqa: E402

from reference import assert_close, ref_softmax  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None)

finite = st.floats(-60, 60, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def matrices(draw, dtype=np.float64, max_rows=6, max_cols=40):
    n = draw(st.integers(1, max_rows))
    c = draw(st.integers(1, max_cols))
    return draw(arrays(dtype, (n, c), elements=finite))


@SETTINGS
@given(x=matrices(), dtype=st.sampled_from(["float16", "float32", "float64"]))
def test_matches_reference_and_rows_sum_to_one(x, dtype):
    xd = x.astype(dtype)
    y = sk.softmax(xd)
    assert_close(y, ref_softmax(xd.astype(np.float64)), dtype, "softmax")
    assert_close(y.astype(np.float64).sum(-1), np.ones(x.shape[0]), dtype, "row sums")


@SETTINGS
@given(x=matrices(), shift=st.floats(-1e3, 1e3, allow_nan=False))
def test_shift_invariance(x, shift):
    # softmax(x + c) == softmax(x): the kernel subtracts the row max, so this holds to rounding
    a = sk.softmax(x)
    b = sk.softmax(x + shift)
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@SETTINGS
@given(x=matrices(), seed=st.integers(0, 2**32 - 1))
def test_backward_is_vjp_with_jacobian(x, seed):
    y = sk.softmax(x)
    dy = np.random.default_rng(seed).standard_normal(x.shape)
    via_j = np.einsum("ri,rij->rj", dy, sk.softmax_jacobian(y))
    assert_close(sk.softmax_backward(dy, y), via_j, "float64", "dy @ J")


@SETTINGS
@given(x=matrices(), seed=st.integers(0, 2**32 - 1))
def test_log_softmax_is_log_of_softmax(x, seed):
    ls = sk.log_softmax(x)
    np.testing.assert_allclose(ls, np.log(sk.softmax(x)), rtol=1e-12, atol=1e-12)
    # and its backward is the softmax backward pulled through log: dx = dy - p * sum(dy)
    dy = np.random.default_rng(seed).standard_normal(x.shape)
    p = np.exp(ls)
    expect = dy - p * dy.sum(-1, keepdims=True)
    assert_close(sk.log_softmax_backward(dy, ls), expect, "float64", "log_softmax_backward")


@SETTINGS
@given(
    x=matrices(max_cols=30),
    seed=st.integers(0, 2**32 - 1),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    grad_scale=st.floats(0.1, 4.0),
)
def test_ce_gradient_is_softmax_minus_onehot(x, seed, reduction, grad_scale):
    n, c = x.shape
    rng = np.random.default_rng(seed)
    t = rng.integers(0, c, size=n)
    t[rng.random(n) < 0.3] = -100
    counted = t != -100
    loss, g = sk.cross_entropy_with_grad(x, t, reduction=reduction, grad_scale=grad_scale)
    onehot = np.zeros_like(x)
    onehot[np.arange(n)[counted], t[counted]] = 1.0
    expect = (sk.softmax(x) - onehot) * counted[:, None] * grad_scale
    if reduction == "mean":
        expect = expect / max(counted.sum(), 1)
    assert_close(g, expect, "float64", "softmax - onehot")
    # and the loss is -log p[target] over the counted rows
    nll = -sk.log_softmax(x)[np.arange(n), np.where(counted, t, 0)] * counted
    want = {"none": nll, "sum": nll.sum(), "mean": nll.sum() / max(counted.sum(), 1)}[reduction]
    assert_close(loss, want, "float64", "nll")
