"""NumPy-backend internals that the API-level matrix cannot see."""

from __future__ import annotations

import numpy as np
import pytest

import softmax_kernels as sk
from softmax_kernels.backends import numpy_backend

from reference import assert_close, ref_cross_entropy, ref_softmax, ref_softmax_backward


@pytest.mark.parametrize("path", ["torch", "numpy"])
def test_float16_store_rounds_like_numpy(rng, monkeypatch, path):
    # the fast float32 -> float16 store (through torch when it is loaded, else NumPy with the
    # subnormal fix-up) must round exactly as NumPy's own conversion does, subnormals
    # (|v| < 2**-14) included
    if path == "torch":
        pytest.importorskip("torch")
    else:
        monkeypatch.setattr(numpy_backend, "_torch_views", lambda *a: None)
    mags = 10.0 ** rng.integers(-9, 2, 200_000)
    v = rng.standard_normal(200_000) * mags
    specials = [0.0, -0.0, np.nan, np.inf, -np.inf, 2**-14, -(2**-25), 3 * 2**-25,
                1023.5 * 2**-24, 1024.5 * 2**-24, 65504.0, 1e5]  # fmt: skip
    v = np.concatenate([v, specials]).astype(np.float32)
    dst = np.empty(v.shape, np.float16)
    numpy_backend._store(dst, v)
    with np.errstate(over="ignore"):
        want = v.astype(np.float16)
    assert np.array_equal(dst.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("n_cols", [1, 7, 4095, 70001])
def test_blocks_and_threads_do_not_change_results(rng, monkeypatch, n_cols):
    # rows are split into blocks of about _BLOCK_ELEMS and spread over threads; every row's
    # result depends on that row only, so the output is bitwise the same either way
    x = rng.standard_normal((max(3, (1 << 19) // n_cols), n_cols)).astype(np.float32)
    a = sk.softmax(x)
    monkeypatch.setattr(numpy_backend, "_THREADS", 1)
    monkeypatch.setattr(numpy_backend, "_BLOCK_ELEMS", 1 << 12)
    b = sk.softmax(x)
    assert np.array_equal(a, b)
    assert_close(a, ref_softmax(x.astype(np.float64)), "float32", "blocked")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_row_of_2_pow_20(rng, dtype):
    # the contract's longest row: one row per block; forward, backward and CE with gradient
    n = 1 << 20
    x = (rng.standard_normal((2, n)) * 3).astype(dtype)
    x64 = x.astype(np.float64)
    y = sk.log_softmax(x)
    assert_close(y, ref_softmax(x64, is_log=True), dtype, "log_softmax 2**20")
    dy = rng.standard_normal((2, n)).astype(dtype)
    ref_y = ref_softmax(x64)
    y_in = ref_y.astype(dtype)
    assert_close(
        sk.softmax_backward(dy, y_in),
        ref_softmax_backward(dy.astype(np.float64), y_in.astype(np.float64)),
        dtype,
        "softmax_backward 2**20",
    )
    t = np.array([5, n - 1])
    loss, grad = sk.cross_entropy_with_grad(x, t, reduction="none")
    ref_loss, ref_grad = ref_cross_entropy(x64, t, reduction="none")
    assert_close(loss, ref_loss, "float64" if dtype == "float64" else "float32", "CE 2**20")
    assert_close(grad, ref_grad, dtype, "CE grad 2**20")
