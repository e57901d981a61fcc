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


# ----------------------------------------------------------------------------------------------
# CPU output buffers (_arrays.cpu_empty): blocks reused once every view of a result is gone


def _pool_size() -> int:
    return 1 << 16  # float32 elements: 256 KiB, the smallest pooled output


def test_pool_reuses_a_block_only_after_every_view_is_gone(rng):
    from softmax_kernels import _arrays

    _arrays.release_cpu_buffers()
    x = rng.standard_normal((64, _pool_size() // 64)).astype(np.float32)
    y = sk.softmax(x)
    if _arrays._pool is None or not _arrays._pool.enabled:
        pytest.skip("the CPU buffer pool is switched off here (SOFTMAX_KERNELS_CPU_POOL_MB=0)")
    assert y.ctypes.data % 64 == 0  # 64-byte aligned blocks
    want = y.copy()
    views = [y[::2].T, y.reshape(-1)[5:], y.view(np.uint32)]
    try:
        import torch

        views.append(torch.from_numpy(y[1:]))
    except ImportError:
        pass
    addr = y.ctypes.data
    del y
    x2 = x * 2
    for i in range(len(views)):
        _arrays.release_cpu_buffers()  # no free block but y's, if it were free
        z = sk.softmax(x2)
        assert z.ctypes.data != addr, f"a block was reused while view {i} is alive"
        del z
        _arrays.release_cpu_buffers()
        del views[0]  # drop the views one by one
    # no view left: the block is back in the pool and the next output of this size reuses it
    assert [b.ctypes.data for b in _arrays._pool.free] == [addr]
    z = sk.softmax(x)
    assert z.ctypes.data == addr
    assert np.array_equal(z, want)
    assert_close(z, ref_softmax(x.astype(np.float64)), "float32", "pooled")


def test_pool_views_keep_their_values(rng):
    # results alive at the same time never share memory, also across threads
    import threading

    x = rng.standard_normal((32, _pool_size() // 16)).astype(np.float32)
    ref = sk.softmax(x).copy()
    results, errors = [], []

    def run():
        try:
            for _ in range(20):
                y = sk.softmax(x)
                results.append(y)
                if len(results) > 6:
                    results.pop(0)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for y in list(results):
        assert np.array_equal(y, ref)


def test_pool_limit_and_switch_off(rng, monkeypatch):
    from softmax_kernels import _arrays

    pool = _arrays._Pool()
    pool.keep = 3 << 20  # 3 MiB of free blocks at most
    arrays = [pool.empty((1 << 18,), np.dtype(np.float32), 1 << 18) for _ in range(5)]  # 1 MiB
    del arrays
    assert len(pool.free) == 3 and pool.free_bytes == 3 << 20
    pool.clear()
    assert pool.free == [] and pool.free_bytes == 0
    monkeypatch.setenv(_arrays._POOL_ENV, "0")
    assert not _arrays._Pool().enabled
    monkeypatch.setenv(_arrays._POOL_ENV, "64")
    assert _arrays._Pool().keep == 64 << 20


def test_row_blocks_on_threads_raise_and_never_wait_for_idle_workers(monkeypatch):
    # every block runs once, on whichever thread takes it; an error in any block is raised
    # in the caller (after the blocks already taken have finished)
    monkeypatch.setattr(numpy_backend, "_THREADS", 3)
    seen = []
    numpy_backend._for_row_blocks(1000, 1000, lambda r0, r1: seen.append((r0, r1)), 10_000, 0)
    assert sorted(seen) == [(r, r + 10) for r in range(0, 1000, 10)]

    def bad(r0, r1):
        if r0 == 500:
            raise RuntimeError("block 50")

    with pytest.raises(RuntimeError, match="block 50"):
        numpy_backend._for_row_blocks(1000, 1000, bad, 10_000, 0)
