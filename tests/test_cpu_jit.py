"""The compiled CPU path (softmax_kernels.backends._cpu_jit, numba kernels) against float64
references, at the backend interface (NumPy rows in, preallocated outputs).

Row lengths hit each code path of the kernels (16-lane vectors, pairs of vectors in the max and
dot passes): 1 and 7 (a partial vector only), 16 (one full vector), 33 (a pair + a partial), 48
(a pair + one full vector), 64 (pairs only), 4097 (many pairs + one element), 2**20 (one row per
block). Every test that
needs numba skips when it is missing; the status tests run either way.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softmax_kernels.backends import _cpu_jit as J
from softmax_kernels.backends import numpy_backend

from reference import TOL, assert_close, ref_cross_entropy, ref_softmax, ref_softmax_backward

HAS_NUMBA = importlib.util.find_spec("numba") is not None
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed (optional)")

DTYPES = ("float16", "float32", "float64")
COLS = (1, 7, 16, 33, 64, 4097)
# cross-entropy's max pass: a partial vector only (1, 7), pairs + a partial (33, 4097), a pair +
# one full vector (48); its other passes: whole vectors + a partial, or either alone
CE_COLS = (1, 7, 33, 48, 4097)


def _cdt(dtype) -> np.dtype:
    return np.dtype(np.float64 if np.dtype(dtype) == np.float64 else np.float32)


def _ctol(dtype) -> str:
    """Tolerance name of results in the compute dtype (losses, lse, stats)."""
    return "float64" if np.dtype(dtype) == np.float64 else "float32"


@pytest.fixture(autouse=True)
def _jit_on(monkeypatch):
    monkeypatch.delenv(J.ENV_VAR, raising=False)


# ----------------------------------------------------------------------------------------------
# status and import cost


def test_status_says_why_not(monkeypatch):
    monkeypatch.setenv(J.ENV_VAR, "0")
    assert not J.usable()
    assert J.status().startswith("inactive: disabled by SOFTMAX_KERNELS_CPU_JIT=0")
    monkeypatch.delenv(J.ENV_VAR)
    # numba missing: the reason names it and says what to install
    monkeypatch.setattr(J, "_kernels", None)
    monkeypatch.setattr(J, "_failure", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert not J.usable()
    s = J.status()
    assert s.startswith("inactive: numba is not installed") and "pip install numba" in s
    with pytest.raises(RuntimeError, match="numba is not installed"):
        J.softmax_fwd(np.ones((2, 3)), np.empty((2, 3)), scale=1.0, mask=None, is_log=False)


@needs_numba
def test_status_active():
    assert J.usable()
    assert J.status().startswith("active: numba ")


def test_package_import_does_not_import_numba():
    # a user who never calls the CPU path pays nothing for it: neither import softmax_kernels
    # nor importing this module imports numba
    code = (
        "import sys, softmax_kernels; from softmax_kernels.backends import _cpu_jit; "
        "print('numba' in sys.modules, 'llvmlite' in sys.modules)"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)  # fmt: skip
    assert out.stdout.split() == ["False", "False"]


# ----------------------------------------------------------------------------------------------
# softmax / log_softmax forward


def _fwd(x, out=None, *, scale=1.0, mask=None, is_log=False):
    out = np.empty_like(x) if out is None else out
    J.softmax_fwd(x, out, scale=scale, mask=mask, is_log=is_log)
    return out


def _fwd_ref(x, *, scale=1.0, mask=None, is_log=False):
    ref = ref_softmax(x.astype(np.float64), scale=scale, where=mask, is_log=is_log)
    if mask is not None:  # masked entries are 0 / -inf even in a row holding a NaN
        ref = np.where(np.broadcast_to(mask, x.shape), ref, -np.inf if is_log else 0.0)
    return ref


@needs_numba
@pytest.mark.parametrize("n_cols", COLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_fwd(rng, dtype, n_cols, is_log):
    x = (rng.standard_normal((5, n_cols)) * 4).astype(dtype)
    assert_close(_fwd(x, is_log=is_log), _fwd_ref(x, is_log=is_log), dtype, "plain")
    for scale in (-0.7, 2.5):
        got = _fwd(x, scale=scale, is_log=is_log)
        assert_close(got, _fwd_ref(x, scale=scale, is_log=is_log), dtype, f"scale {scale}")
    mask = rng.random(x.shape) < 0.6
    mask[0] = False  # a fully masked row: all 0 / -inf
    mask[1] = True
    mask[2, 0] = True  # at least one kept entry
    x_nan = x.copy()
    x_nan[3, -1] = np.nan  # a NaN in a row: its kept entries NaN, its masked ones 0 / -inf
    mask[3, -1] = True
    for xx in (x, x_nan):
        got = _fwd(xx, scale=1.5, mask=mask, is_log=is_log)
        assert_close(got, _fwd_ref(xx, scale=1.5, mask=mask, is_log=is_log), dtype, "mask")
    # a mask broadcast over the rows (row stride 0)
    row = rng.random((1, n_cols)) < 0.5
    row[0, 0] = True
    bmask = np.broadcast_to(row, x.shape)
    assert bmask.strides[0] == 0
    got = _fwd(x, mask=bmask, is_log=is_log)
    assert_close(got, _fwd_ref(x, mask=bmask, is_log=is_log), dtype, "broadcast mask")


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_fwd_views_in_place_and_specials(rng, dtype, is_log):
    big = (rng.standard_normal((7, 120)) * 3).astype(dtype)
    x = big[1::2, 5 : 5 + 37]  # row stride 240 elements, unaligned start
    ref = _fwd_ref(x, is_log=is_log)
    assert_close(_fwd(x, is_log=is_log), ref, dtype, "strided input")
    out_big = np.zeros((3, 50), dtype)
    out = out_big[:, 2:39]  # a strided output too
    _fwd(x, out, is_log=is_log)
    assert_close(out, ref, dtype, "strided output")
    assert not out_big[:, :2].any() and not out_big[:, 39:].any()  # nothing written beyond
    xc = np.ascontiguousarray(x)
    _fwd(xc, xc, is_log=is_log)  # in place
    assert_close(xc, ref, dtype, "in place")
    # huge finite values, -inf entries, a row of -inf (NaN, as torch), +inf (NaN)
    big_v = {"float16": 6e4, "float32": 1e30, "float64": 1e300}[dtype]
    s = (rng.standard_normal((5, 21)) * 3).astype(dtype)
    s[0, 3] = big_v
    s[0, 4] = -big_v if dtype != "float16" else -big_v / 16  # log_softmax: -1.1 big_v < -65504
    s[1, ::3] = -np.inf
    s[2] = -np.inf
    s[3, 7] = np.inf
    with np.errstate(all="ignore"):
        assert_close(_fwd(s, is_log=is_log), _fwd_ref(s, is_log=is_log), dtype, "specials")


# ----------------------------------------------------------------------------------------------
# backward


def _bwd(dy, y, out=None, *, scale=1.0, is_log=False):
    out = np.empty_like(y) if out is None else out
    J.softmax_bwd(dy, y, out, scale=scale, is_log=is_log)
    return out


def _bwd_ref(dy, y, *, scale=1.0, is_log=False):
    return ref_softmax_backward(dy.astype(np.float64), y.astype(np.float64), scale=scale,
                                is_log=is_log)  # fmt: skip


@needs_numba
@pytest.mark.parametrize("n_cols", COLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_bwd(rng, dtype, n_cols, is_log):
    x = rng.standard_normal((6, n_cols)) * 3
    y = ref_softmax(x, is_log=is_log).astype(dtype)
    dy = rng.standard_normal((6, n_cols)).astype(dtype)
    for scale in (1.0, -1.75):
        got = _bwd(dy, y, scale=scale, is_log=is_log)
        assert_close(got, _bwd_ref(dy, y, scale=scale, is_log=is_log), dtype, f"scale {scale}")
    ref = _bwd_ref(dy, y, scale=0.5, is_log=is_log)
    for alias in ("dy", "y"):  # out= names an input
        d, yy = dy.copy(), y.copy()
        out = d if alias == "dy" else yy
        _bwd(d, yy, out, scale=0.5, is_log=is_log)
        assert_close(out, ref, dtype, f"out is {alias}")
    # strided inputs
    big_dy = np.zeros((12, n_cols + 9), dtype)
    big_dy[::2, 3 : 3 + n_cols] = dy
    got = _bwd(big_dy[::2, 3 : 3 + n_cols], y, is_log=is_log)
    assert_close(got, _bwd_ref(dy, y, is_log=is_log), dtype, "strided dy")


@needs_numba
@pytest.mark.parametrize("is_log", [False, True], ids=["softmax", "log_softmax"])
def test_backward_row_sum_that_cancels(rng, is_log):
    # issue 10 #2: 8 rows of 4096, dy of zero row mean, logits with z[:, 0] = 20: sum(dy) (and
    # dot(dy, y) ~ dy_0) nearly cancel, and exp(y_0) ~ 1 carries their error straight into dx.
    # A float32 accumulation is off by ~eps sqrt(n) |dy| here; float64 lanes keep the bound.
    z = rng.standard_normal((8, 4096))
    z[:, 0] = 20.0
    y = ref_softmax(z, is_log=is_log).astype(np.float32)
    dy = rng.standard_normal((8, 4096)) * 10
    dy = (dy - dy.mean(axis=1, keepdims=True)).astype(np.float32)
    assert_close(_bwd(dy, y, is_log=is_log), _bwd_ref(dy, y, is_log=is_log), "float32", "cancel")


# ----------------------------------------------------------------------------------------------
# cross-entropy forward (+ gradient)

CE_OPTIONS = [
    dict(),
    dict(weight=True),
    dict(label_smoothing=0.15),
    dict(z_loss=1e-3, grad_scale=0.6),
    dict(softcap=4.0),
    dict(weight=True, label_smoothing=0.1, z_loss=1e-3, softcap=6.0, grad_scale=2.5),
]


def _ce_problem(rng, n_rows, c, soft, dtype):
    x = (rng.standard_normal((n_rows, c)) * 3).astype(dtype)
    if soft:
        t = rng.dirichlet(np.ones(c), size=n_rows).astype(dtype)
    else:
        t = rng.integers(0, c, size=n_rows)
        if n_rows > 1:
            t[1] = -100
    return x, t, (rng.random(c) + 0.25).astype(_cdt(dtype))


def _ce(x, t, *, soft, weight=None, reduction="mean", label_smoothing=0.0, z_loss=0.0,
        softcap=None, grad_scale=1.0, with_grad=True, with_lse=True, denom=None, grad=None,
        ignore_index=-100):  # fmt: skip
    n = x.shape[0]
    cdt = _cdt(x.dtype)
    loss = np.full(n, 7.0, cdt) if reduction == "none" else np.full((), 7.0, cdt)
    if with_grad and grad is None:
        grad = np.full_like(x, 7.0)
    lse = np.full(n, 7.0, cdt) if with_lse else None
    J.cross_entropy_fwd(x, t, loss=loss, grad=grad if with_grad else None, lse=lse, soft=soft,
                        weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
                        z_loss=z_loss, softcap=softcap, grad_scale=grad_scale,
                        reduction=reduction, denom=denom)  # fmt: skip
    return loss, grad, lse


@needs_numba
@pytest.mark.parametrize("n_cols", CE_COLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("soft", [False, True], ids=["class", "soft"])
def test_cross_entropy_fwd(rng, dtype, n_cols, soft):
    pytest.importorskip("torch")  # the reference is torch's float64 cross_entropy
    x, t, w = _ce_problem(rng, 5, n_cols, soft, dtype)
    for i, opts in enumerate(CE_OPTIONS):
        opts = dict(opts)
        weight = w if opts.pop("weight", False) else None
        reduction = ("mean", "sum", "none")[i % 3]
        ref_loss, ref_grad, ref_lse = ref_cross_entropy(
            x.astype(np.float64), t, weight=weight, reduction=reduction, return_lse=True, **opts
        )
        loss, grad, lse = _ce(x, t, soft=soft, weight=weight, reduction=reduction, **opts)
        what = f"{opts} weight={weight is not None} {reduction}"
        assert_close(loss, ref_loss, _ctol(dtype), f"loss {what}")
        assert_close(grad, ref_grad, dtype, f"grad {what}")
        assert_close(lse, ref_lse, _ctol(dtype), f"lse {what}")
        # the loss alone (no gradient, no lse) is the same loss
        loss2, _, _ = _ce(x, t, soft=soft, weight=weight, reduction=reduction, with_grad=False,
                          with_lse=False, **opts)  # fmt: skip
        assert np.array_equal(loss2, loss)


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_in_place_denom_and_ignored(rng, dtype):
    pytest.importorskip("torch")
    x, t, w = _ce_problem(rng, 6, 37, False, dtype)
    ref_loss, ref_grad = ref_cross_entropy(x.astype(np.float64), t, weight=w, label_smoothing=0.1)
    g = x.copy()
    loss, _, _ = _ce(g, t, soft=False, weight=w, label_smoothing=0.1, grad=g)  # in place
    assert_close(loss, ref_loss, _ctol(dtype), "in place loss")
    assert_close(g, ref_grad, dtype, "in place grad")
    # denom given: "mean" divides by it (the sum's loss and gradient over it), 0 gives 0.0
    cdt = _cdt(dtype)
    s_loss, s_grad = ref_cross_entropy(x.astype(np.float64), t, weight=w, reduction="sum")
    loss, grad, _ = _ce(x, t, soft=False, weight=w, denom=np.asarray(3.5, cdt))
    assert_close(loss, s_loss / 3.5, _ctol(dtype), "denom loss")
    assert_close(grad, s_grad / 3.5, dtype, "denom grad")
    loss, _, _ = _ce(x, t, soft=False, denom=np.asarray(0.0, cdt), with_grad=False)
    assert loss[()] == 0.0
    # every target ignored: mean 0.0, zero gradient, lse still every row's
    t_ig = np.full(6, 3)
    loss, grad, lse = _ce(x, t_ig, soft=False, ignore_index=3)
    assert loss[()] == 0.0 and not grad.any()
    ref_lse = np.log(np.exp(x.astype(np.float64)).sum(axis=1))
    assert_close(lse, ref_lse, _ctol(dtype), "lse of ignored rows")
    # int32 targets and an ignore_index outside int64 (nothing ignored)
    t32 = rng.integers(0, 37, 6).astype(np.int32)
    ref_loss, ref_grad = ref_cross_entropy(x.astype(np.float64), t32, reduction="sum")
    loss, grad, _ = _ce(x, t32, soft=False, reduction="sum", ignore_index=2**70)
    assert_close(loss, ref_loss, _ctol(dtype), "int32 targets")
    assert_close(grad, ref_grad, dtype, "int32 targets grad")


class _Guarded:
    """Arrays at the very start or end of a readable page with unmapped (PROT_NONE) pages on
    both sides: any read or write outside them faults (Linux)."""

    PAGE = 4096

    def __init__(self):
        import ctypes
        import mmap

        self.mm = mmap.mmap(-1, 3 * self.PAGE)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))
        libc = ctypes.CDLL(None, use_errno=True)
        for page in (0, 2):
            if libc.mprotect(ctypes.c_void_p(self.base + page * self.PAGE), self.PAGE, 0):
                raise OSError(ctypes.get_errno(), "mprotect")

    def array(self, a: np.ndarray, at_end: bool) -> np.ndarray:
        assert a.nbytes <= self.PAGE
        off = self.PAGE + (self.PAGE - a.nbytes if at_end else 0)
        out = np.frombuffer(self.mm, a.dtype, a.size, off).reshape(a.shape)
        out[...] = a
        return out


@needs_numba
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mprotect guard pages: Linux")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("at_end", [False, True], ids=["page-start", "page-end"])
def test_cross_entropy_bad_targets_stay_in_bounds(rng, dtype, at_end):
    # validation is the caller's job; unvalidated bad targets give NaN rows, and no read or write
    # leaves the rows: the logits and the gradient sit against unmapped pages, so a stray access
    # would fault (and the tails' masked loads and stores are checked by the same layout)
    pytest.importorskip("torch")
    c = 33
    x0, t, _ = _ce_problem(rng, 6, c, False, dtype)
    t[0], t[2], t[4] = c, -5, 2**40
    gx, gg = _Guarded(), _Guarded()
    x = gx.array(x0, at_end)
    g = gg.array(np.zeros_like(x0), at_end)
    loss, _, lse = _ce(x, t, soft=False, reduction="none", grad=g)
    bad = np.zeros(6, bool)
    bad[[0, 2, 4]] = True
    assert np.isnan(loss[bad]).all() and np.isnan(g[bad]).all()
    ok = ~bad
    ok[1] = False  # ignored
    ref_loss, ref_grad = ref_cross_entropy(x0.astype(np.float64), np.where(bad, 0, t),
                                           reduction="none")  # fmt: skip
    assert_close(loss[ok], ref_loss[ok], _ctol(dtype), "good rows' loss")
    assert_close(g[ok], ref_grad[ok], dtype, "good rows' grad")
    assert loss[1] == 0.0 and not g[1].any()
    assert np.isfinite(lse).all()
    # the other kernels on the guarded rows (tails at the page edge)
    out = gg.array(np.zeros_like(x0), at_end)
    assert_close(_fwd(x, out), _fwd_ref(x0), dtype, "guarded softmax")
    stats = np.empty((6, 3), _cdt(dtype))
    J.cross_entropy_stats(x, t, stats, soft=False, weight=None, ignore_index=-100,
                          vocab_start=0, label_smoothing=0.0, softcap=None)  # fmt: skip
    assert (stats[bad, 2] == 0).all()
    J.cross_entropy_grad(x, t, out, row_lse=lse, row_coef=np.ones(6, _cdt(dtype)),
                         row_scale=np.asarray(1.0), soft=False, weight=None, ignore_index=-100,
                         vocab_start=0, keep=1.0, eps_c=0.0, softcap=None,
                         grad_scale=1.0)  # fmt: skip
    assert np.isfinite(out).all()


# ----------------------------------------------------------------------------------------------
# vocabulary-parallel statistics and gradient (float64 references from the definitions)


def _stats_ref(x, t, *, soft, weight, vocab_start, smooth, softcap):
    x = x.astype(np.float64)
    z = softcap * np.tanh(x / softcap) if softcap else x
    n, c = z.shape
    m = z.max(axis=1)
    shift = np.where(np.isneginf(m), 0.0, m)
    zs = z - shift[:, None]
    w = np.ones(c) if weight is None else weight.astype(np.float64)
    cols = [m, np.exp(zs).sum(axis=1)]
    if soft:
        wq = t.astype(np.float64) * w
        cols += [wq.sum(axis=1), (wq * zs).sum(axis=1)]
    else:
        tl = t - vocab_start
        owned = (tl >= 0) & (tl < c)
        ts = np.where(owned, tl, 0)
        cols.append(np.where(owned, zs[np.arange(n), ts], 0.0))
        if weight is not None:
            cols.append(np.where(owned, w[ts], 0.0))
    if smooth:
        cols.append((w * zs).sum(axis=1))
    return np.stack(cols, axis=1)


@needs_numba
@pytest.mark.parametrize("n_cols", CE_COLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("soft", [False, True], ids=["class", "soft"])
def test_cross_entropy_stats(rng, dtype, n_cols, soft):
    vs = 50  # this shard holds classes [50, 50 + n_cols) of a larger vocabulary
    x, t, w = _ce_problem(rng, 7, n_cols, soft, dtype)
    if not soft:
        t = rng.integers(0, vs + n_cols + 20, size=7)  # owned and not owned targets
        t[0], t[1] = vs, vs + n_cols - 1
        t[2] = -100
    for weight, smooth, softcap in [(None, False, None), (w, True, 5.0), (None, True, None)]:
        k = J._n_stats(soft, weight is not None, smooth)
        stats = np.full((7, k), 7.0, _cdt(dtype))
        J.cross_entropy_stats(x, t, stats, soft=soft, weight=weight, ignore_index=-100,
                              vocab_start=vs, label_smoothing=0.1 if smooth else 0.0,
                              softcap=softcap)  # fmt: skip
        ref = _stats_ref(x, t, soft=soft, weight=weight, vocab_start=vs, smooth=smooth,
                         softcap=softcap)  # fmt: skip
        # zs_t (and sum w zs) are differences of rounded logits: their error is that of
        # z - m in the compute dtype, so they get the compute dtype's bound on |z| + |m|
        assert_close(stats, ref, _ctol(dtype), f"stats weight={weight is not None} {smooth}")


def _grad_ref(x, t, *, soft, weight, vocab_start, row_lse, row_coef, scale, keep, eps_c,
              softcap, ignore_index=-100):  # fmt: skip
    x = x.astype(np.float64)
    th = np.tanh(x / softcap) if softcap else None
    z = softcap * th if softcap else x
    n, c = z.shape
    w = np.ones(c) if weight is None else weight.astype(np.float64)
    p = np.exp(z - row_lse.astype(np.float64)[:, None])
    g = row_coef.astype(np.float64)[:, None] * p
    if soft:
        g -= w * (keep * t.astype(np.float64) + eps_c)
    else:
        g -= eps_c * w
        tl = t - vocab_start
        owned = (tl >= 0) & (tl < c)
        rows = np.arange(n)[owned]
        g[rows, tl[owned]] -= keep * w[tl[owned]]
    g *= scale
    if softcap:
        g *= 1 - th**2
    if not soft:
        g[t == ignore_index] = 0.0
    return g


@needs_numba
@pytest.mark.parametrize("n_cols", CE_COLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("soft", [False, True], ids=["class", "soft"])
def test_cross_entropy_grad(rng, dtype, n_cols, soft):
    vs = 20
    x, t, w = _ce_problem(rng, 7, n_cols, soft, dtype)
    if not soft:
        t = rng.integers(0, vs + n_cols + 10, size=7)
        t[0], t[1], t[2] = vs, vs + n_cols - 1, -100
    cdt = _cdt(dtype)
    x64 = x.astype(np.float64)
    row_lse = (np.log(np.exp(x64).sum(axis=1)) + rng.random(7)).astype(cdt)
    row_coef = (rng.random(7) + 0.5).astype(cdt)
    for weight, eps_c, softcap, inplace in [(None, 0.0, None, False), (w, 0.01, 3.0, False),
                                            (w, 0.0, None, True)]:  # fmt: skip
        kw = dict(soft=soft, weight=weight, vocab_start=vs, keep=0.9, eps_c=eps_c,
                  softcap=softcap)  # fmt: skip
        g = x.copy() if inplace else np.full_like(x, 7.0)
        J.cross_entropy_grad(g if inplace else x, t, g, row_lse=row_lse, row_coef=row_coef,
                             row_scale=np.asarray(0.25, cdt), ignore_index=-100,
                             grad_scale=1.5, **kw)  # fmt: skip
        ref = _grad_ref(x, t, row_lse=row_lse, row_coef=row_coef, scale=1.5 * 0.25, **kw)
        assert_close(g, ref, dtype, f"grad weight={weight is not None} {eps_c} {softcap}")


# ----------------------------------------------------------------------------------------------
# long rows, determinism, internals


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_of_2_pow_20(rng, dtype):
    # the contract's longest row: one row per block, the sums over 65536 vectors per lane
    pytest.importorskip("torch")
    n = 1 << 20
    x = (rng.standard_normal((2, n)) * 3).astype(dtype)
    for is_log in (False, True):
        assert_close(_fwd(x, is_log=is_log), _fwd_ref(x, is_log=is_log), dtype, "fwd 2**20")
    y = ref_softmax(x.astype(np.float64)).astype(dtype)
    dy = rng.standard_normal((2, n)).astype(dtype)
    assert_close(_bwd(dy, y), _bwd_ref(dy, y), dtype, "bwd 2**20")
    t = np.array([5, n - 1])
    ref_loss, ref_grad = ref_cross_entropy(x.astype(np.float64), t, reduction="none")
    loss, grad, _ = _ce(x, t, soft=False, reduction="none")
    assert_close(loss, ref_loss, _ctol(dtype), "CE 2**20")
    assert_close(grad, ref_grad, dtype, "CE grad 2**20")


def _all_ops(x, t, mask, w):
    """Every kernel once (with its options on), outputs as a list."""
    cdt = _cdt(x.dtype)
    dy = (x * 0.5).astype(x.dtype)
    out = [_fwd(x, mask=mask, scale=1.3), _fwd(x, is_log=True), _bwd(dy, _fwd(x))]
    out += [_bwd(dy, _fwd(x, is_log=True), is_log=True)]
    out += list(_ce(x, t, soft=False, weight=w, label_smoothing=0.1, z_loss=1e-4, softcap=8.0))
    stats = np.empty((x.shape[0], 5), cdt)
    J.cross_entropy_stats(x, t, stats, soft=False, weight=w, ignore_index=-100, vocab_start=0,
                          label_smoothing=0.1, softcap=None)  # fmt: skip
    g = np.empty_like(x)
    J.cross_entropy_grad(x, t, g, row_lse=stats[:, 0] + 1, row_coef=stats[:, 1],
                         row_scale=np.asarray(0.5, cdt), soft=False, weight=w, ignore_index=-100,
                         vocab_start=0, keep=0.9, eps_c=0.001, softcap=None,
                         grad_scale=1.0)  # fmt: skip
    return out + [stats, g]


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_cols", [33, 4097])
def test_bitwise_deterministic_for_any_threads_and_blocking(rng, monkeypatch, dtype, n_cols):
    n_rows = max(8, (1 << 18) // n_cols + 1)  # over _PARALLEL_MIN_ELEMS: the thread pool runs
    x = (rng.standard_normal((n_rows, n_cols)) * 3).astype(dtype)
    t = rng.integers(0, n_cols, n_rows)
    t[::7] = -100
    mask = rng.random(x.shape) < 0.7
    w = (rng.random(n_cols) + 0.5).astype(_cdt(dtype))
    a = _all_ops(x, t, mask, w)
    b = _all_ops(x, t, mask, w)  # run to run
    monkeypatch.setattr(numpy_backend, "_THREADS", 1)
    monkeypatch.setattr(J, "_MAX_BLOCK_ELEMS", 1 << 10)
    c = _all_ops(x, t, mask, w)  # one thread, small blocks
    monkeypatch.setattr(numpy_backend, "_THREADS", 3)
    monkeypatch.setattr(J, "_MIN_BLOCK_ELEMS", 5 * n_cols)
    monkeypatch.setattr(J, "_MAX_BLOCK_ELEMS", 5 * n_cols)
    monkeypatch.setattr(numpy_backend, "_pool", None)
    d = _all_ops(x, t, mask, w)  # three threads, blocks of 5 rows
    for i, (p, q, r, s) in enumerate(zip(a, b, c, d, strict=True)):
        for other in (q, r, s):
            assert p.tobytes() == other.tobytes(), f"output {i} differs"


@needs_numba
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_vector_exp_and_tanh_accuracy(dtype):
    # the kernels' exp, their exp of non-positive arguments (z - max z: no overflow, results
    # below the smallest normal flushed to 0) and the softcap's tanh over their whole range,
    # specials included: within 2 ulp of the correctly rounded value (exp float32: 0.7 ulp)
    from numba import njit

    from softmax_kernels.backends import _cpu_jit_kernels as K

    @njit
    def apply(tag, fn_id, a, out):
        for j in range(0, a.size, K.W):
            v = K.vld(tag, a.ctypes.data, j)
            if fn_id == 0:
                r = K.vexp(v)
            elif fn_id == 1:
                r = K.vexpn(v)
            else:
                r = K.vtanh(v)
            K.vst(tag, out.ctypes.data, j, r)

    dt = np.dtype(dtype)
    lo, hi = (-104.5, 89.0) if dt == np.float32 else (-746.0, 710.0)
    specials = [-np.inf, np.inf, np.nan, 0.0, -0.0, 1e-30, -1e-30]
    a = np.concatenate([np.linspace(lo, hi, 200_000), np.linspace(-1, 1, 50_000), specials])
    a = a.astype(dt)
    a = np.concatenate([a, np.zeros(-a.size % K.W, dt)])
    out = np.empty_like(a)
    for fn_id, ref_fn, name in ((0, np.exp, "exp"), (1, np.exp, "exp of x <= 0"),
                                (2, np.tanh, "tanh")):  # fmt: skip
        arg = -np.abs(a) if fn_id == 1 else a
        apply(dt.type(0), fn_id, arg, out)
        with np.errstate(all="ignore"):
            ref = ref_fn(arg.astype(np.longdouble))
            fin = np.isfinite(ref.astype(dt)) & (np.abs(ref) > np.finfo(dt).tiny)
        ulp = np.spacing(ref[fin].astype(dt)).astype(np.longdouble)
        err = np.abs(out[fin].astype(np.longdouble) - ref[fin]) / np.abs(ulp)
        assert err.max() <= 2.0, f"{name} {dtype}: {float(err.max()):.2f} ulp"
        nonfin = ~fin
        with np.errstate(all="ignore"):
            refc = ref[nonfin].astype(dt)
        small = np.abs(refc) <= np.finfo(dt).tiny  # underflow region: absolute error tiny
        assert np.allclose(out[nonfin][small], refc[small], rtol=0, atol=2 * np.finfo(dt).tiny)
        big = ~small
        assert np.array_equal(out[nonfin][big], refc[big], equal_nan=True), name


# ----------------------------------------------------------------------------------------------
# properties

finite = st.floats(-60, 60, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def _rows(draw, max_rows=5, max_cols=70):
    n = draw(st.integers(1, max_rows))
    c = draw(st.integers(1, max_cols))
    seed = draw(st.integers(0, 2**32 - 1))
    spread = draw(st.floats(0.01, 60))
    return np.random.default_rng(seed).standard_normal((n, c)) * spread, seed


@needs_numba
@settings(max_examples=40, deadline=None)
@given(data=_rows(), dtype=st.sampled_from(DTYPES), is_log=st.booleans(),
       scale=st.floats(-3, 3, allow_nan=False))  # fmt: skip
def test_property_softmax_matches_reference(data, dtype, is_log, scale):
    x, seed = data
    xd = x.astype(dtype)
    got = _fwd(xd, scale=scale, is_log=is_log)
    assert_close(got, _fwd_ref(xd, scale=scale, is_log=is_log), dtype, "softmax")
    if not is_log:
        assert_close(got.astype(np.float64).sum(-1), np.ones(x.shape[0]), dtype, "row sums")


@needs_numba
@settings(max_examples=40, deadline=None)
@given(data=_rows(), dtype=st.sampled_from(DTYPES), smoothing=st.sampled_from([0.0, 0.2]),
       reduction=st.sampled_from(["mean", "sum", "none"]))  # fmt: skip
def test_property_ce_matches_reference(data, dtype, smoothing, reduction):
    pytest.importorskip("torch")
    x, seed = data
    xd = x.astype(dtype)
    rng = np.random.default_rng(seed)
    t = rng.integers(0, x.shape[1], size=x.shape[0])
    t[rng.random(x.shape[0]) < 0.3] = -100
    ref_loss, ref_grad = ref_cross_entropy(xd.astype(np.float64), t, reduction=reduction,
                                           label_smoothing=smoothing)  # fmt: skip
    loss, grad, _ = _ce(xd, t, soft=False, reduction=reduction, label_smoothing=smoothing)
    assert_close(loss, ref_loss, _ctol(dtype), "loss")
    assert_close(grad, ref_grad, dtype, "grad")
    # the gradient rows of counted rows sum to ~0 (softmax - onehot, scaled)
    atol, _ = TOL[dtype]
    sums = grad.astype(np.float64).sum(axis=1)
    assert np.all(np.abs(sums) <= atol * x.shape[1] + 1e-6 * (1 + math.log2(x.shape[1])))
