"""softmax / log_softmax and their backward passes on every backend, against float64
references. Row lengths are odd and small so the whole matrix also runs through the Triton
interpreter; long rows and strategy boundaries are in the backend-specific test files."""

from __future__ import annotations

import numpy as np
import pytest

import softmax_kernels as sk

from reference import assert_close, ref_softmax, ref_softmax_backward, to_numpy64

# (shape, axis): row length 1 (single element rows), short odd rows (several rows per
# program / warp), a 1000-long row (one row per block), N-d with an inner axis, axis tuples
# and None (the whole array as one row).
CASES = [
    ((7,), -1),
    ((3, 1), -1),
    ((5, 37), -1),
    ((2, 1000), 1),
    ((3, 4, 5), 1),
    ((3, 4, 5), 0),
    ((2, 3, 5), (0, 2)),
    ((2, 3, 5), (-1, -2)),
    ((4, 6), None),
]


def _data(rng, shape, spread=4.0):
    return rng.standard_normal(shape) * spread


@pytest.mark.parametrize("is_log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize(("shape", "axis"), CASES)
def test_forward_matches_reference(target, dtype, rng, shape, axis, is_log):
    x = target.array(_data(rng, shape), dtype)
    before = target.copy(x)
    fn = sk.log_softmax if is_log else sk.softmax
    y = fn(x, axis=axis, backend=target.backend)
    assert target.kind_of(y) and str(y.dtype) == str(x.dtype) and tuple(y.shape) == shape
    assert_close(y, ref_softmax(to_numpy64(x), axis, is_log=is_log), dtype, fn.__name__)
    assert target.equal(x, before), "input was modified"


@pytest.mark.parametrize("scale", [0.7, -1.3, 0.0])
def test_scale(target, dtype, rng, scale):
    x = target.array(_data(rng, (4, 33)), dtype)
    for is_log, fn in ((False, sk.softmax), (True, sk.log_softmax)):
        y = fn(x, scale=scale, backend=target.backend)
        assert_close(y, ref_softmax(to_numpy64(x), -1, scale, is_log=is_log), dtype, "scaled")


def test_rows_sum_to_one(target, dtype, rng):
    x = target.array(_data(rng, (6, 129), spread=10.0), dtype)
    s = to_numpy64(sk.softmax(x, backend=target.backend)).sum(axis=-1)
    # the contract's bound, applied to the row sums
    assert_close(s, np.ones(6), dtype, "row sums")


def test_where_mask(target, dtype, rng):
    # entries where the mask is False take no part; row 2 is fully masked -> all 0 / all -inf
    x = target.array(_data(rng, (5, 23)), dtype)
    keep = rng.random((5, 23)) < 0.6
    keep[2] = False
    keep[4] = False
    keep[4, 7] = True  # a single kept entry -> probability 1
    m = target.array(keep)
    for is_log, fn in ((False, sk.softmax), (True, sk.log_softmax)):
        y = fn(x, where=m, scale=1.5, backend=target.backend)
        ref = ref_softmax(to_numpy64(x), -1, 1.5, keep, is_log)
        assert_close(y, ref, dtype, f"masked {fn.__name__}")
        assert not np.isnan(to_numpy64(y)).any()


@pytest.mark.parametrize("mask_shape", [(23,), (5, 1), (1, 23)])
def test_where_broadcasts(target, dtype, rng, mask_shape):
    # a class mask shared by all rows reaches the kernels with row stride 0
    x = target.array(_data(rng, (5, 23)), dtype)
    keep = rng.random(mask_shape) < 0.5
    keep.flat[0] = True
    y = sk.log_softmax(x, where=target.array(keep), backend=target.backend)
    assert_close(y, ref_softmax(to_numpy64(x), -1, 1.0, keep, True), dtype, "broadcast mask")


def test_where_with_axis_tuple(target, dtype, rng):
    x = target.array(_data(rng, (3, 4, 5)), dtype)
    keep = rng.random((3, 4, 5)) < 0.7
    keep[:, 1, :] = False  # with axis=(0, 2) the slice [:, 1, :] is one whole row
    y = sk.softmax(x, axis=(0, 2), where=target.array(keep), backend=target.backend)
    assert_close(y, ref_softmax(to_numpy64(x), (0, 2), 1.0, keep), dtype, "mask + axis tuple")


def _huge(dtype):
    return {"float16": 6e4, "bfloat16": 3e38, "float32": 1e30, "float64": 1e300}[dtype]


def test_edge_rows(target, dtype, rng):
    """Row 0 all -inf -> NaN; row 1 has a NaN -> all NaN; rows 2 and 6 huge values near the
    dtype's limit (safe only with the max shift; log-softmax outputs stay representable);
    row 3 one -inf entry -> 0 there; row 4 equal values -> uniform; row 5 +inf -> NaN."""
    h = _huge(dtype)
    data = rng.standard_normal((7, 9))
    data[0] = -np.inf
    data[1, 4] = np.nan
    data[2] = [h, 0.6 * h, h, 0.5 * h, 0.99 * h, h, 0.75 * h, h, h]
    data[6] = [-h, -0.6 * h, -h, -0.5 * h, -0.99 * h, -h, -0.75 * h, -h, -0.5 * h]
    data[3, 2] = -np.inf
    data[4] = 3.0
    data[5, 1] = np.inf
    x = target.array(data, dtype)
    for is_log, fn in ((False, sk.softmax), (True, sk.log_softmax)):
        y = fn(x, backend=target.backend)
        ref = ref_softmax(to_numpy64(x), -1, is_log=is_log)
        assert np.isnan(ref[0]).all() and np.isnan(ref[1]).all() and np.isnan(ref[5]).all()
        assert_close(y, ref, dtype, f"edge rows {fn.__name__}")


def test_strided_views(target, dtype, rng):
    base = target.array(_data(rng, (6, 50)), dtype)
    base64 = to_numpy64(base)
    # rows addressed by a row stride (no copy), a column slice, a transpose (copy path)
    for view, view64, axis in (
        (base[::2], base64[::2], -1),
        (base[1:5, 3:40], base64[1:5, 3:40], -1),
        (base[:, ::3], base64[:, ::3], -1),
        (base.T, base64.T, -1),
        (base.T, base64.T, 0),
    ):
        y = sk.log_softmax(view, axis=axis, backend=target.backend)
        assert_close(y, ref_softmax(view64, axis, is_log=True), dtype, "strided view")


def test_negative_strides(rng):
    # torch has no negative strides; NumPy's reversed views are read as they are
    x = _data(rng, (5, 17)).astype(np.float32)
    for view in (x[::-1], x[:, ::-1], x[::-2, ::-3]):
        assert_close(sk.softmax(view), ref_softmax(view.astype(np.float64)), "float32", "neg")


def test_size_zero(target, dtype):
    for shape in ((0, 5), (5, 0), (0,)):
        x = target.array(np.ones(shape), dtype)
        y = sk.softmax(x, backend=target.backend)
        assert tuple(y.shape) == shape and target.kind_of(y)
        dx = sk.softmax_backward(x, x, backend=target.backend)
        assert tuple(dx.shape) == shape


def test_out_argument(target, dtype, rng):
    x = target.array(_data(rng, (4, 19)), dtype)
    ref = ref_softmax(to_numpy64(x), -1)
    out = target.array(np.full((4, 19), 5.0), dtype)
    res = sk.softmax(x, out=out, backend=target.backend)
    assert res is out
    assert_close(out, ref, dtype, "out=")
    # out=x: in place
    x2 = target.copy(x)
    assert sk.softmax(x2, out=x2, backend=target.backend) is x2
    assert_close(x2, ref, dtype, "out=x")
    # an out whose layout cannot be written as rows (a transposed view): written through a copy
    out_t = target.array(np.full((19, 4), 5.0), dtype).T
    sk.softmax(x, out=out_t, backend=target.backend)
    assert_close(out_t, ref, dtype, "out= transposed")


def test_deterministic(target, dtype, rng):
    x = target.array(_data(rng, (8, 301)), dtype)
    a = sk.softmax(x, backend=target.backend)
    b = sk.softmax(x, backend=target.backend)
    assert target.equal(a, b)
    dy = target.array(rng.standard_normal((8, 301)), dtype)
    assert target.equal(
        sk.softmax_backward(dy, a, backend=target.backend),
        sk.softmax_backward(dy, a, backend=target.backend),
    )


# ------------------------------------------------------------------------------------------
# backward


@pytest.mark.parametrize("is_log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize(("shape", "axis"), CASES)
def test_backward_matches_reference(target, dtype, rng, shape, axis, is_log):
    x64 = _data(rng, shape)
    y = target.array(ref_softmax(x64, axis, is_log=is_log), dtype)
    dy = target.array(rng.standard_normal(shape), dtype)
    before = (target.copy(dy), target.copy(y))
    fn = sk.log_softmax_backward if is_log else sk.softmax_backward
    dx = fn(dy, y, axis=axis, scale=0.8, backend=target.backend)
    assert target.kind_of(dx) and str(dx.dtype) == str(y.dtype)
    ref = ref_softmax_backward(to_numpy64(dy), to_numpy64(y), axis, 0.8, is_log)
    assert_close(dx, ref, dtype, fn.__name__)
    assert target.equal(dy, before[0]) and target.equal(y, before[1]), "input was modified"


def test_backward_strided_and_out(target, dtype, rng):
    y = target.array(ref_softmax(_data(rng, (6, 40))), dtype)
    dy = target.array(rng.standard_normal((6, 40)), dtype)
    ys, dys = y[::2, 1:], dy[1::2, :-1]
    ref = ref_softmax_backward(to_numpy64(dys), to_numpy64(ys))
    out = target.array(np.zeros((3, 39)), dtype)
    assert sk.softmax_backward(dys, ys, out=out, backend=target.backend) is out
    assert_close(out, ref, dtype, "strided backward into out")


def test_backward_equals_jacobian_product(target, rng):
    # dx = dy @ J with J = diag(y) - y y^T (float64, so the bound is tight)
    y = target.array(ref_softmax(_data(rng, (3, 11))), "float64")
    dy = target.array(rng.standard_normal((3, 11)), "float64")
    jac = sk.softmax_jacobian(y)
    assert target.kind_of(jac) and tuple(jac.shape) == (3, 11, 11)
    via_j = np.einsum("ri,rij->rj", to_numpy64(dy), to_numpy64(jac))
    assert_close(sk.softmax_backward(dy, y, backend=target.backend), via_j, "float64", "dy@J")


def test_jacobian_axes(target, rng):
    y64 = ref_softmax(_data(rng, (2, 3, 4)), axis=1)
    jac = sk.softmax_jacobian(target.array(y64, "float32"), axis=1)
    assert tuple(jac.shape) == (2, 4, 3, 3)
    j = to_numpy64(jac)
    yy = np.moveaxis(y64, 1, -1)
    ref = yy[..., :, None] * (np.eye(3) - yy[..., None, :])
    assert_close(j, ref, "float32", "jacobian axis=1")


def test_seed_002_worked_example():
    """The worked example in shared/seeds (seed 002): Z, its softmax A (printed to 2
    decimals), the Jacobians J1, J2 (computed there from the rounded A) and dLdZ = dLdA J."""
    z = np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 1.0]])
    a = sk.softmax(z)
    np.testing.assert_allclose(a, [[0.09, 0.24, 0.67], [0.42, 0.42, 0.16]], atol=0.005)
    a_printed = np.array([[0.09, 0.24, 0.67], [0.42, 0.42, 0.16]])
    j = sk.softmax_jacobian(a_printed)
    j1 = [[0.0819, -0.0216, -0.0603], [-0.0216, 0.1824, -0.1608], [-0.0603, -0.1608, 0.2211]]
    j2 = [[0.2436, -0.1764, -0.0672], [-0.1764, 0.2436, -0.0672], [-0.0672, -0.0672, 0.1344]]
    np.testing.assert_allclose(j[0], j1, atol=1e-12)
    np.testing.assert_allclose(j[1], j2, atol=1e-12)
    dlda = np.array([[0.1, -0.2, 0.1], [-0.1, 0.3, -0.2]])
    dldz = sk.softmax_backward(dlda, a)
    np.testing.assert_allclose(dldz, np.einsum("ri,rij->rj", dlda, sk.softmax_jacobian(a)),
                               atol=1e-15)  # fmt: skip
    np.testing.assert_allclose(sk.softmax_backward(dlda, a_printed),
                               np.einsum("ri,rij->rj", dlda, j), atol=1e-15)  # fmt: skip
