"""Tests specific to the Triton backend: every kernel strategy (row lengths up to 2**20),
strided views, broadcast masks, edge rows, every cross-entropy option, in-place writes, bad
targets, the launch-configuration function, the sm_90 compile, and availability messages.

CPU cases run the kernels through the Triton interpreter on torch CPU tensors and need
TRITON_INTERPRET=1 (``make test`` sets it); the same cases run on CUDA tensors under the ``gpu``
marker (``make test-gpu``). Everything is compared with float64 references (tests/reference.py)
within the contract's tolerances.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

import softmax_kernels as sk  # noqa: E402
from softmax_kernels.backends import triton_backend as tb  # noqa: E402

from reference import (  # noqa: E402
    assert_close,
    ce_problem,
    ref_cross_entropy,
    ref_softmax,
    ref_softmax_backward,
    to_numpy64,
)

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = ("float16", "bfloat16", "float32", "float64")
LOSS_DTYPE = {"float16": "float32", "bfloat16": "float32", "float32": "float32",
              "float64": "float64"}  # fmt: skip


def _devices():
    cpu_marks = []
    if not INTERP:
        cpu_marks.append(
            pytest.mark.skip(
                reason="torch CPU tensors run through the Triton backend only with "
                "TRITON_INTERPRET=1 (make test sets it)"
            )
        )
    cuda_reason = None if torch.cuda.is_available() else "no CUDA GPU on this machine"
    if cuda_reason is None and INTERP:
        cuda_reason = "TRITON_INTERPRET=1 is set: GPU tests run under `make test-gpu`"
    cuda_marks = [pytest.mark.gpu] + ([pytest.mark.skip(reason=cuda_reason)] if cuda_reason else [])
    return [pytest.param("cpu", marks=cpu_marks, id="cpu"),
            pytest.param("cuda", marks=cuda_marks, id="cuda")]  # fmt: skip


DEVICES = _devices()
GPU_ONLY = [p for p in DEVICES if p.id == "cuda"]


def _t(a, dtype, device):
    """A NumPy array as a torch tensor of ``dtype`` (None: keep) on ``device``."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype is not None:
        t = t.to(getattr(torch, dtype))
    return t.to(device)


def _strategy(n_cols, dtype, op, n_rows=10**5):
    """The strategy on a 132-SM GPU for many rows (with few rows, "rows" tiles shrink to one
    row so that every SM gets a tile)."""
    return tb._launch_config(n_rows, n_cols, dtype, op, n_sm=132).strategy


# Row lengths and the strategy each reaches (float32 forward, many rows, 132 SMs; the CPU run
# with 3 rows reaches the same ones, as the interpreter does not shrink tiles to fill SMs):
#   1, 7     "rows":   many rows per tile ([ROWS, BLOCK_N] = [4096, 1], [512, 8])
#   1000     "rows":   4 rows of 1024 per tile
#   4097     "row":    one whole row per tile (BLOCK_N 8192), single pass
#   70001    "online": chunks of 8192, running max/sum, second pass (9 chunks, last partial)
#   2**20    "online": 128 chunks
ROW_LENGTHS = [1, 7, 1000, 4097, 70001, 2**20]
EXPECTED_FWD_F32 = {1: "rows", 7: "rows", 1000: "rows", 4097: "row", 70001: "online",
                    2**20: "online"}  # fmt: skip


def _n_rows(n_cols):
    return 3 if n_cols <= 4097 else 2 if n_cols < 2**20 else 1


def _slow_if(cond):
    """2**20-long rows in other dtypes than float32 take the interpreter several seconds each;
    float32 covers that path in the fast run."""
    return [pytest.mark.slow] if cond else []


LENGTH_DTYPE = [
    pytest.param(n, dt, id=f"{n}-{dt}", marks=_slow_if(n == 2**20 and dt != "float32"))
    for n in ROW_LENGTHS
    for dt in DTYPES
]


# ----------------------------------------------------------------------------------------------
# softmax / log_softmax forward and backward over every row length


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("n_cols", "dtype"), LENGTH_DTYPE)
def test_forward_row_lengths(device, n_cols, dtype, rng):
    assert _strategy(n_cols, "float32", "softmax_fwd") == EXPECTED_FWD_F32[n_cols]
    x = _t(rng.standard_normal((_n_rows(n_cols), n_cols)) * 4, dtype, device)
    x64 = to_numpy64(x)
    for is_log, fn in ((False, sk.softmax), (True, sk.log_softmax)):
        y = fn(x, scale=0.75, backend="triton")
        assert y.dtype == x.dtype and y.device == x.device
        ref = ref_softmax(x64, -1, 0.75, is_log=is_log)
        assert_close(y, ref, dtype, f"{fn.__name__} n={n_cols}")
        if not is_log and not (dtype == "float16" and n_cols >= 2**20):
            # (float16 rows of 2**20 are mostly subnormal: even the correctly rounded softmax
            # sums to 1 - 2.9e-3 there, so no float16 output can meet the bound)
            assert_close(to_numpy64(y).sum(-1), np.ones(x.shape[0]), dtype, "row sums")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("n_cols", "dtype"), LENGTH_DTYPE)
def test_backward_row_lengths(device, n_cols, dtype, rng):
    shape = (_n_rows(n_cols), n_cols)
    x64 = rng.standard_normal(shape) * 3
    dy = _t(rng.standard_normal(shape), dtype, device)
    for is_log, fn in ((False, sk.softmax_backward), (True, sk.log_softmax_backward)):
        y = _t(ref_softmax(x64, -1, is_log=is_log), dtype, device)
        dx = fn(dy, y, scale=1.5, backend="triton")
        ref = ref_softmax_backward(to_numpy64(dy), to_numpy64(y), -1, 1.5, is_log=is_log)
        assert_close(dx, ref, dtype, f"{fn.__name__} n={n_cols}")


# ----------------------------------------------------------------------------------------------
# cross-entropy over every row length, every option at once


def _check_ce(device, dtype, logits64, t64, w64, what, *, inplace=False, **opts):
    """cross_entropy and cross_entropy_with_grad on the Triton backend vs the reference."""
    x = _t(logits64, dtype, device)
    soft = t64.dtype.kind == "f"
    t = _t(t64, dtype if soft else None, device)
    w = None if w64 is None else _t(w64, dtype, device)
    grad_scale = opts.pop("grad_scale", 1.0)
    ref_loss, ref_grad = ref_cross_entropy(
        to_numpy64(x), to_numpy64(t) if soft else t64,
        weight=None if w is None else to_numpy64(w), grad_scale=grad_scale, **opts,
    )  # fmt: skip
    loss = sk.cross_entropy(x, t, weight=w, backend="triton", **opts)
    assert_close(loss, ref_loss, LOSS_DTYPE[dtype], f"{what} loss")
    xin = x.clone() if inplace else x
    loss2, grad = sk.cross_entropy_with_grad(
        xin, t, weight=w, grad_scale=grad_scale, inplace=inplace, backend="triton", **opts
    )
    assert_close(loss2, ref_loss, LOSS_DTYPE[dtype], f"{what} loss (with grad)")
    assert_close(grad, ref_grad, dtype, f"{what} grad")
    if inplace:
        assert grad.data_ptr() == xin.data_ptr(), "inplace=True must write into the logits"
    return loss2, grad


CE_ALL = dict(reduction="mean", label_smoothing=0.2, z_loss=1e-2, grad_scale=0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("soft", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize(("n_cols", "dtype"), LENGTH_DTYPE)
def test_cross_entropy_row_lengths(device, n_cols, dtype, soft, rng):
    # strategy (float32): 1, 7, 1000 "rows"; 4097 "row" (index) / "online" (probs: logits and
    # targets on chip would exceed the single-pass limit); 70001, 2**20 "online"
    assert _strategy(4097, "float32", "cross_entropy") == "row"
    assert _strategy(4097, "float32", "cross_entropy_soft") == "online"
    logits, target, weight = ce_problem(rng, _n_rows(n_cols), n_cols, soft)
    _check_ce(device, dtype, logits, target, weight, f"C={n_cols}", **CE_ALL)


OPTION_SETS = {
    "plain-sum": dict(reduction="sum"),
    "weight-none": dict(reduction="none", weighted=True),
    "smooth-mean": dict(reduction="mean", label_smoothing=0.3),
    "smooth-weight-sum": dict(reduction="sum", label_smoothing=0.1, weighted=True),
    "z-none": dict(reduction="none", z_loss=0.05),
    "all-mean-gradscale": dict(CE_ALL, weighted=True),
    "ignore7": dict(reduction="mean", ignore_index=7, weighted=True),
}


# (ignore_index applies to class-index targets only)
SOFT_OPTS = [
    pytest.param(soft, name, id=f"{'probs' if soft else 'index'}-{name}")
    for soft in (False, True)
    for name in OPTION_SETS
    if not (soft and "ignore_index" in OPTION_SETS[name])
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("soft", "opts"), SOFT_OPTS)
@pytest.mark.parametrize("n_cols", [7, 4097, 70001], ids=["rows", "row", "online"])
def test_cross_entropy_options_per_strategy(device, soft, opts, n_cols, rng):
    o = dict(OPTION_SETS[opts])
    weighted = o.pop("weighted", False)
    ignore = o.get("ignore_index", -100)
    logits, target, weight = ce_problem(rng, 4, n_cols, soft, ignore_index=ignore)
    _check_ce(device, "float32", logits, target, weight if weighted else None, opts, **o)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("soft", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("n_cols", [7, 4097, 70001], ids=["rows", "row", "online"])
def test_cross_entropy_inplace(device, dtype, soft, n_cols, rng):
    logits, target, weight = ce_problem(rng, 3, n_cols, soft)
    _check_ce(device, dtype, logits, target, weight, "inplace", inplace=True, **CE_ALL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tdtype", ["int32", "int64"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("n_cols", [7, 4097, 70001], ids=["rows", "row", "online"])
def test_bad_targets_give_nan_rows(device, tdtype, inplace, n_cols, rng):
    # rows: fine, ignored, == C, negative (not ignore_index), huge, fine
    c = n_cols
    bad = [c, -1, 2**31 - 1 if tdtype == "int32" else 10**12]
    target = np.array([1, -100, *bad, c - 1], dtype=tdtype)
    logits = rng.standard_normal((len(target), c)) * 2
    x = _t(logits, "float32", device)
    t = _t(target, None, device)
    w = _t(rng.random(c) + 0.5, "float32", device)
    loss, grad = sk.cross_entropy_with_grad(
        x.clone() if inplace else x, t, weight=w, reduction="none", label_smoothing=0.1,
        inplace=inplace, backend="triton",
    )  # fmt: skip
    loss, grad = to_numpy64(loss), to_numpy64(grad)
    is_bad = np.array([False, False, True, True, True, False])
    assert np.isnan(loss[is_bad]).all() and np.isnan(grad[is_bad]).all()
    assert np.isfinite(loss[~is_bad]).all() and np.isfinite(grad[~is_bad]).all()
    assert loss[1] == 0.0 and (grad[1] == 0.0).all(), "ignored row: loss 0, grad exactly 0"
    ok = np.array([0, 5])
    ref_loss, ref_grad = ref_cross_entropy(
        to_numpy64(x)[ok], target[ok].astype(np.int64), weight=to_numpy64(w), reduction="none",
        label_smoothing=0.1,
    )  # fmt: skip
    assert_close(loss[ok], ref_loss, "float32", "good rows' loss")
    assert_close(grad[ok], ref_grad, "float32", "good rows' grad")
    # with reduction="mean" the bad rows make the mean (and its gradient) NaN, never a crash
    m = sk.cross_entropy(x, t, backend="triton")
    assert np.isnan(float(to_numpy64(m)))


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_all_ignored_and_single_class(device, rng):
    x = _t(rng.standard_normal((3, 1)), "float32", device)
    t = _t(np.array([0, -100, 0]), None, device)
    _check_ce(device, "float32", to_numpy64(x), np.array([0, -100, 0]), None, "C=1", **CE_ALL)
    loss, grad = sk.cross_entropy_with_grad(x, t * 0 - 100, backend="triton")
    assert float(loss) == 0.0 and (to_numpy64(grad) == 0).all()


# ----------------------------------------------------------------------------------------------
# strided views, broadcast masks, in-place


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n_cols", [7, 1000, 4097, 70001], ids=["rows", "rows1000", "row", "online"]
)
def test_strided_views(device, dtype, n_cols, rng):
    # row stride n_cols + 11 (views are not copied: the backend gets the row stride)
    base = _t(rng.standard_normal((3, n_cols + 11)) * 3, dtype, device)
    x = base[:, 5 : 5 + n_cols]
    assert x.stride(0) != n_cols
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    tb.softmax_fwd(x, out, scale=1.0, mask=None, is_log=True)
    assert_close(out, ref_softmax(to_numpy64(x), is_log=True), dtype, "strided fwd")
    base2 = _t(rng.standard_normal((3, n_cols + 3)), dtype, device)
    dy = base2[:, 3:]
    y = _t(ref_softmax(to_numpy64(x)), dtype, device)
    ybase = torch.zeros((3, n_cols + 5), dtype=y.dtype, device=device)
    ybase[:, 2 : 2 + n_cols] = y
    ys = ybase[:, 2 : 2 + n_cols]
    dx = torch.empty_like(out)
    tb.softmax_bwd(dy, ys, dx, scale=1.0, is_log=False)
    assert_close(dx, ref_softmax_backward(to_numpy64(dy), to_numpy64(ys)), dtype, "strided bwd")
    # cross-entropy: strided logits and strided soft targets
    q = torch.zeros((3, n_cols + 7), dtype=x.dtype, device=device)
    q[:, 4 : 4 + n_cols] = _t(rng.dirichlet(np.ones(n_cols), size=3), dtype, device)
    qs = q[:, 4 : 4 + n_cols]
    ref_loss, ref_grad = ref_cross_entropy(to_numpy64(x), to_numpy64(qs), reduction="none")
    loss, grad = sk.cross_entropy_with_grad(x, qs, reduction="none", backend="triton")
    assert_close(loss, ref_loss, LOSS_DTYPE[dtype], "strided CE loss")
    assert_close(grad, ref_grad, dtype, "strided CE grad")


def _forced_configs(n_rows, n_cols):
    """One launch configuration per strategy for a small problem, so that the online path is
    reached with short rows (chunks of 64: several chunks, some fully masked, a partial last
    one) and the pipelined tile loop is exercised."""
    block = tb._pow2_at_least(n_cols)
    return {
        "rows": tb.LaunchConfig("rows", block, 4, 4, 1, 2),
        "rows-pipelined": tb.LaunchConfig("rows", block, 2, 4, 2, 1),
        "row": tb.LaunchConfig("row", block, 1, 4, 1, 2),
        "online": tb.LaunchConfig("online", 64, 1, 2, 1, min(n_rows, 3)),
    }


STRATEGIES = ["rows", "rows-pipelined", "row", "online"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_broadcast_and_fully_masked(device, strategy, dtype, rng):
    n_rows, n_cols = 5, 300
    cfg = _forced_configs(n_rows, n_cols)[strategy]
    x64 = rng.standard_normal((n_rows, n_cols)) * 3
    x64[0, 10] = np.nan  # masked out below: must not poison its row
    x64[1, 20] = np.inf  # masked out
    x = _t(x64, dtype, device)
    # 1) a shared mask row, broadcast with row stride 0; its first 150 entries are False, so
    #    the online kernel meets fully masked chunks before any kept entry
    keep_row = rng.random(n_cols) < 0.6
    keep_row[:150] = False
    keep_row[[10, 20]] = False
    mask = _t(keep_row, None, device).expand(n_rows, n_cols)
    assert mask.stride(0) == 0
    # 2) a full mask with a fully masked row (2) and a row with one kept entry (3)
    keep2 = rng.random((n_rows, n_cols)) < 0.5
    keep2[:, [10, 20]] = False
    keep2[2] = False
    keep2[3] = False
    keep2[3, 299] = True
    for keep, m in ((np.broadcast_to(keep_row, x64.shape), mask), (keep2, _t(keep2, None, device))):
        for is_log in (False, True):
            out = torch.empty_like(x)
            tb.softmax_fwd(x, out, scale=1.25, mask=m, is_log=is_log, config=cfg)
            ref = ref_softmax(to_numpy64(x), -1, 1.25, where=keep, is_log=is_log)
            assert_close(out, ref, dtype, f"masked {strategy} log={is_log}")
    # fully masked: every row 0 / -inf, never NaN
    none = _t(np.zeros(n_cols, bool), None, device).expand(n_rows, n_cols)
    out = torch.empty_like(x)
    tb.softmax_fwd(x, out, scale=1.0, mask=none, is_log=False, config=cfg)
    assert (to_numpy64(out) == 0).all()
    tb.softmax_fwd(x, out, scale=1.0, mask=none, is_log=True, config=cfg)
    assert (to_numpy64(out) == -np.inf).all()


def _edge_rows(dtype, n_cols, rng):
    big = {"float16": 6e4, "bfloat16": 1e30, "float32": 1e30, "float64": 1e300}[dtype]
    rows = np.stack([
        rng.standard_normal(n_cols),  # ordinary
        np.full(n_cols, -np.inf),  # all -inf -> NaN
        np.where(np.arange(n_cols) == n_cols // 2, np.nan, 1.0),  # one NaN -> row NaN
        big * rng.choice([1.0, 0.9, 0.5, 0.25, 0.0], n_cols),  # huge: finite results
        np.where(np.arange(n_cols) % 3 == 0, -np.inf, rng.standard_normal(n_cols)),  # some -inf
        np.where(np.arange(n_cols) == n_cols - 1, np.inf, 0.0),  # +inf -> NaN
        np.where(np.arange(n_cols) < n_cols - 1, -np.inf, 2.0),  # one finite entry, last chunk
    ])  # fmt: skip
    return rows


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_rows(device, strategy, dtype, rng):
    n_cols = 300
    x = _t(_edge_rows(dtype, n_cols, rng), dtype, device)
    cfg = _forced_configs(x.shape[0], n_cols)[strategy]
    for is_log in (False, True):
        out = torch.empty_like(x)
        tb.softmax_fwd(x, out, scale=1.0, mask=None, is_log=is_log, config=cfg)
        assert_close(out, ref_softmax(to_numpy64(x), is_log=is_log), dtype, f"edge log={is_log}")
    # cross-entropy on the same rows: NaN exactly where the reference has NaN
    t = np.array([0, 1, 2, 3, 5, 4, n_cols - 1])
    logits, grad = torch.empty_like(x), torch.empty_like(x)
    logits.copy_(x)
    loss = torch.empty(x.shape[0], dtype=torch.float64 if dtype == "float64" else torch.float32,
                       device=device)  # fmt: skip
    tb.cross_entropy_fwd(
        logits, _t(t, None, device), loss, grad, soft=False, weight=None, ignore_index=-100,
        label_smoothing=0.0, z_loss=0.0, grad_scale=1.0, denom=None, config=cfg,
    )  # fmt: skip
    # (row 5, +inf: torch's loss is inf with a partly NaN gradient, the NumPy backend's NaN;
    # the contract leaves it open, so it is not compared)
    rows = [0, 1, 2, 3, 4, 6]
    ref_loss, ref_grad = ref_cross_entropy(to_numpy64(x)[rows], t[rows], reduction="none")
    assert_close(loss[rows], ref_loss, LOSS_DTYPE[dtype], "edge CE loss")
    assert_close(grad[rows], ref_grad, dtype, "edge CE grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_kernel_option_under_forced_strategies(device, strategy, rng):
    # backward and every cross-entropy variant through each strategy on short rows
    n_rows, n_cols = 5, 300
    cfg = _forced_configs(n_rows, n_cols)[strategy]
    x = _t(rng.standard_normal((n_rows, n_cols)) * 3, "float32", device)
    x64 = to_numpy64(x)
    dy = _t(rng.standard_normal((n_rows, n_cols)), "float32", device)
    for is_log in (False, True):
        y = _t(ref_softmax(x64, is_log=is_log), "float32", device)
        out = torch.empty_like(y)
        tb.softmax_bwd(dy, y, out, scale=0.5, is_log=is_log, config=cfg)
        ref = ref_softmax_backward(to_numpy64(dy), to_numpy64(y), -1, 0.5, is_log=is_log)
        assert_close(out, ref, "float32", f"bwd log={is_log}")
    w = _t(rng.random(n_cols) + 0.25, "float32", device)
    hard = np.array([3, -100, 299, 0, 150])
    soft = _t(rng.dirichlet(np.ones(n_cols), size=n_rows), "float32", device)
    denom = _t(np.array(2.5), "float32", device)
    for t, is_soft in ((_t(hard, None, device), False), (soft, True)):
        for weight in (None, w):
            for eps, z in ((0.0, 0.0), (0.2, 0.01)):
                loss = torch.empty(n_rows, dtype=torch.float32, device=device)
                grad = torch.empty_like(x)
                tb.cross_entropy_fwd(
                    x, t, loss, grad, soft=is_soft, weight=weight, ignore_index=-100,
                    label_smoothing=eps, z_loss=z, grad_scale=0.75, denom=denom, config=cfg,
                )  # fmt: skip
                ref_loss, ref_grad = ref_cross_entropy(
                    x64, to_numpy64(t) if is_soft else hard,
                    weight=None if weight is None else to_numpy64(w), reduction="none",
                    label_smoothing=eps, z_loss=z, grad_scale=0.75 / 2.5,
                )  # fmt: skip
                what = f"CE soft={is_soft} w={weight is not None} eps={eps} z={z}"
                assert_close(loss, ref_loss, "float32", what + " loss")
                assert_close(grad, ref_grad, "float32", what + " grad")
                loss2 = torch.empty_like(loss)
                tb.cross_entropy_fwd(
                    x, t, loss2, None, soft=is_soft, weight=weight, ignore_index=-100,
                    label_smoothing=eps, z_loss=z, grad_scale=1.0, denom=None, config=cfg,
                )  # fmt: skip
                assert_close(loss2, ref_loss, "float32", what + " loss without the gradient")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_cols", [7, 4097, 70001], ids=["rows", "row", "online"])
def test_softmax_out_is_x(device, n_cols, rng):
    x = _t(rng.standard_normal((3, n_cols)) * 2, "float32", device)
    ref = ref_softmax(to_numpy64(x), is_log=True)
    y = sk.log_softmax(x, out=x, backend="triton")
    assert y is x
    assert_close(x, ref, "float32", "out=x")
    # backward into dy's own memory
    dy = _t(rng.standard_normal((3, n_cols)), "float32", device)
    yy = _t(ref_softmax(to_numpy64(x)), "float32", device)
    ref_dx = ref_softmax_backward(to_numpy64(dy), to_numpy64(yy))
    dx = sk.softmax_backward(dy, yy, out=dy, backend="triton")
    assert dx is dy
    assert_close(dy, ref_dx, "float32", "out=dy")


@pytest.mark.parametrize("device", DEVICES)
def test_nd_axes_and_size_zero(device, rng):
    x = _t(rng.standard_normal((2, 3, 5, 4)), "float32", device)
    for axis in (1, (1, 3), None):
        y = sk.softmax(x, axis=axis, backend="triton")
        assert_close(y, ref_softmax(to_numpy64(x), axis), "float32", f"axis={axis}")
    empty = torch.empty((0, 5), device=device)
    assert sk.softmax(empty, backend="triton").shape == (0, 5)
    assert sk.log_softmax(torch.empty((4, 0), device=device), backend="triton").shape == (4, 0)


# ----------------------------------------------------------------------------------------------
# launch configuration


def test_launch_config_strategy_per_length():
    for n, expected in EXPECTED_FWD_F32.items():
        assert _strategy(n, "float32", "softmax_fwd") == expected, n
    # the single-pass limit: 16384 words of row data on chip
    cases = [
        ("float32", "softmax_fwd", 16384),
        ("bfloat16", "softmax_fwd", 16384),
        ("float64", "softmax_fwd", 8192),
        ("float32", "softmax_bwd", 8192),
        ("float64", "softmax_bwd", 4096),
        ("float16", "cross_entropy", 8192),
        ("float64", "cross_entropy", 4096),
        ("float32", "cross_entropy_soft", 4096),
    ]
    for dtype, op, limit in cases:
        assert _strategy(limit, dtype, op) == "row", (dtype, op)
        assert _strategy(limit + 1, dtype, op) == "online", (dtype, op)
        assert _strategy(limit // 8, dtype, op) == "rows", (dtype, op)
    # few rows: tiles shrink until every SM has one
    assert tb._launch_config(64, 2048, "float32", "softmax_fwd", n_sm=132).rows == 1
    assert tb._launch_config(1000, 1000, "float32", "softmax_fwd", n_sm=132).rows == 4
    assert tb._launch_config(1000, 1000, "float32", "softmax_fwd", n_sm=None).rows == 4


@pytest.mark.parametrize(
    "op", ["softmax_fwd", "softmax_bwd", "cross_entropy", "cross_entropy_soft"]
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_launch_config_invariants(op, dtype):
    words = 2 if dtype == "float64" else 1
    for n_rows in (1, 3, 100, 10**6):
        for n_cols in (1, 2, 7, 100, 1000, 4097, 8193, 16385, 70001, 2**20, 2**22):
            for n_sm in (None, 1, 132):
                cfg = tb._launch_config(n_rows, n_cols, dtype, op, n_sm)
                what = (n_rows, n_cols, n_sm, cfg)
                assert cfg.block_n & (cfg.block_n - 1) == 0, what
                assert cfg.rows & (cfg.rows - 1) == 0, what
                assert cfg.num_warps in (1, 2, 4, 8, 16), what
                assert cfg.num_stages in (1, 2), what
                n_tiles = -(-n_rows // cfg.rows)
                assert 1 <= cfg.num_programs <= n_tiles, what
                if n_sm is None:
                    assert cfg.num_programs <= 4, what
                else:
                    assert cfg.num_programs <= n_sm * max(1, 32 // cfg.num_warps), what
                if cfg.strategy == "online":
                    assert cfg.rows == 1 and cfg.block_n < n_cols and cfg.num_stages == 1, what
                    assert cfg.block_n * words * tb._ONLINE_VALUES[op] <= 16384, what
                else:
                    assert cfg.block_n >= n_cols > cfg.block_n // 2 or cfg.block_n == 1, what
                    on_chip = cfg.rows * cfg.block_n * words * tb._SINGLE_PASS_VALUES[op]
                    assert on_chip <= 16384, what
                    assert (cfg.strategy == "rows") == (cfg.rows > 1), what
                    assert cfg.rows <= tb._pow2_at_least(n_rows), what
                    if n_sm is not None and cfg.rows > 1:
                        assert n_tiles >= n_sm, what  # every SM gets a tile


# ----------------------------------------------------------------------------------------------
# The GPU path compiles for sm_90 (H100/H200) on any machine: Triton compiles without a GPU.


def _sig(values):
    """Triton signature strings for example kernel arguments."""
    out = {}
    for name, v in values.items():
        if isinstance(v, str):
            out[name] = v
        elif isinstance(v, bool):
            out[name] = "constexpr"
        elif isinstance(v, float):
            out[name] = "fp64"
        else:
            out[name] = "i32"
    return out


_PTR = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "float64": "*fp64"}


def _compile_case(op, dtype, n_rows, n_cols, mask=False):
    ks = tb._kernels(False)
    key = {"fwd": "softmax_fwd", "bwd": "softmax_bwd", "ce": "cross_entropy",
           "ces": "cross_entropy_soft"}[op]  # fmt: skip
    cfg = tb._launch_config(n_rows, n_cols, dtype, key, 132)
    consts = dict(ONLINE=cfg.strategy == "online", ROWS=cfg.rows, BLOCK_N=cfg.block_n,
                  NUM_STAGES=cfg.num_stages, IS_FP64=dtype == "float64")  # fmt: skip
    p, acc = _PTR[dtype], "*fp64" if dtype == "float64" else "*fp32"
    if op == "fwd":
        fn = ks.softmax_fwd
        args = dict(x_ptr=p, out_ptr=p, mask_ptr="*u8", n_rows=1, n_cols=1, row_stride=1,
                    out_row_stride=1, mask_row_stride=1, scale=1.0)  # fmt: skip
        consts.update(IS_LOG=True, HAS_MASK=mask)
    elif op == "bwd":
        fn = ks.softmax_bwd
        args = dict(dy_ptr=p, y_ptr=p, out_ptr=p, n_rows=1, n_cols=1, dy_row_stride=1,
                    y_row_stride=1, out_row_stride=1, scale=1.0)  # fmt: skip
        consts.update(IS_LOG=False)
    else:
        fn = ks.cross_entropy_fwd
        args = dict(x_ptr=p, t_ptr=p if op == "ces" else "*i64", w_ptr=acc, loss_ptr=acc,
                    g_ptr=p, denom_ptr=acc, n_rows=1, n_cols=1, row_stride=1, t_row_stride=1,
                    g_row_stride=1, ignore_index="i64", label_smoothing=1.0, z_loss=1.0,
                    grad_scale=1.0)  # fmt: skip
        consts.update(SOFT=op == "ces", HAS_WEIGHT=True, HAS_GRAD=True, HAS_DENOM=True,
                      HAS_SMOOTHING=True, HAS_Z=True)  # fmt: skip
    sig = _sig(args)
    sig.update({k: "constexpr" for k in consts})
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    return cfg, triton.compile(src, target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": cfg.num_warps})  # fmt: skip


def _resource_usage(compiled):
    """(registers, stack bytes) of a compiled kernel, from cuobjdump -res-usage (shipped with
    Triton's NVIDIA backend), or None when the tool is not there."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else None


# Each op at its single-pass limit (the most registers), online, and short rows.
COMPILE_CASES = [
    ("fwd", "float32", 4096, 16384, True),
    ("fwd", "float64", 4096, 70001, False),
    ("fwd", "float16", 10**5, 7, False),
    ("bwd", "bfloat16", 4096, 8192, False),
    ("bwd", "float32", 4096, 70001, False),
    ("ce", "float32", 4096, 8192, False),
    ("ce", "bfloat16", 10**5, 256, False),
    ("ce", "float64", 4096, 70001, False),
    ("ces", "float32", 4096, 4096, False),
    ("ces", "bfloat16", 4096, 70001, False),
]


def _compile_report(cases):
    """Compile each case for sm_90 and print one JSON report line. Runs in a fresh process: the
    interpreter patches triton.language process-wide, so compiling after interpreted launches
    in the same process fails."""
    results = {}
    for case in cases:
        key = "-".join(map(str, case))
        try:
            cfg, compiled = _compile_case(*case)
            results[key] = {
                "usage": _resource_usage(compiled),
                "max_regs": 65536 // (32 * cfg.num_warps),
                "config": list(cfg),
            }
        except ImportError as e:  # a Triton build without the NVIDIA backend
            results[key] = {"skip": f"{type(e).__name__}: {e}"}
        except Exception as e:
            results[key] = {"error": f"{type(e).__name__}: {e}"[-3000:]}
    print("SM90-REPORT " + json.dumps(results))


@pytest.fixture(scope="module")
def sm90_report():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys; sys.path.insert(0, {tests_dir!r}); import test_triton_backend as t; "
        "t._compile_report(t.COMPILE_CASES)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900
    )
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("SM90-REPORT ")]
    if not lines:
        pytest.fail(f"the sm_90 compile process failed:\n{run.stdout[-2000:]}{run.stderr[-4000:]}")
    return json.loads(lines[0].split(" ", 1)[1])


@pytest.mark.parametrize("case", COMPILE_CASES, ids=["-".join(map(str, c)) for c in COMPILE_CASES])
def test_compiles_for_sm90_without_spills(case, sm90_report):
    r = sm90_report["-".join(map(str, case))]
    if "skip" in r:
        pytest.skip(f"Triton cannot compile for CUDA here: {r['skip']}")
    assert "error" not in r, r.get("error")
    if r["usage"] is None:
        pytest.skip("cuobjdump not found next to Triton's ptxas: compiled, usage unchecked")
    regs, stack = r["usage"]
    # A spill shows as stack. (Triton 3.6 keeps a 16-byte stack frame on the float64
    # soft-target tile; more than that means spilling.)
    assert regs <= r["max_regs"] and stack <= 16, r


# ----------------------------------------------------------------------------------------------
# availability, messages and modes


def test_serve_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "backend='numpy'" in tb.serve_reason(np.zeros(3))
    reason = tb.serve_reason(torch.zeros(3))
    assert "TRITON_INTERPRET=1" in reason
    if not torch.cuda.is_available():
        assert "TRITON_INTERPRET=1" in tb.unavailable_reason()
        with pytest.raises(sk.BackendUnavailableError, match="TRITON_INTERPRET=1"):
            sk.softmax(torch.zeros(2, 3), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read at call time
    assert tb.unavailable_reason() is None
    assert tb.serve_reason(torch.zeros(3)) is None
    with pytest.raises(sk.BackendUnavailableError, match="backend='numpy'"):
        sk.softmax(np.zeros((2, 3)), backend="triton")


def test_kernels_load_in_both_modes():
    assert tb._is_interpreted(tb._kernels(True).softmax_fwd)
    assert not tb._is_interpreted(tb._kernels(False).cross_entropy_fwd)


# ----------------------------------------------------------------------------------------------
# GPU only: determinism, 64-bit offsets, CuPy arrays and streams


@pytest.mark.parametrize("device", GPU_ONLY)
def test_bitwise_deterministic(device, rng):
    x = _t(rng.standard_normal((64, 70001)), "float32", device)
    t = _t(rng.integers(0, 70001, 64), None, device)
    a = sk.softmax(x, backend="triton")
    b = sk.softmax(x, backend="triton")
    assert torch.equal(a, b)
    la, ga = sk.cross_entropy_with_grad(x, t, backend="triton")
    lb, gb = sk.cross_entropy_with_grad(x, t, backend="triton")
    assert torch.equal(la, lb) and torch.equal(ga, gb)


@pytest.mark.slow
@pytest.mark.parametrize("device", GPU_ONLY)
def test_more_than_2_31_elements(device):
    # 2**31 + 3 * 1024 float16 elements (4 GiB): row offsets need 64 bits
    n_rows = 2**31 // 1024 + 3
    x = torch.empty((n_rows, 1024), dtype=torch.float16, device=device)
    x[-4:].normal_()
    x[:-4].zero_()
    y = sk.softmax(x, backend="triton")
    assert_close(y[-4:], ref_softmax(to_numpy64(x[-4:])), "float16", "last rows")
    assert bool((y[0] == 1 / 1024).all())
    del y
    t = torch.zeros(n_rows, dtype=torch.int64, device=device)
    loss = sk.cross_entropy(x, t, reduction="none", backend="triton")
    ref_loss, _ = ref_cross_entropy(to_numpy64(x[-4:]), np.zeros(4, np.int64), reduction="none")
    assert_close(loss[-4:], ref_loss, "float32", "last rows' loss")


@pytest.mark.parametrize("device", GPU_ONLY)
def test_cupy_arrays_and_streams(device, rng):
    x = _t(rng.standard_normal((8, 4097)), "float32", device)
    ref = ref_softmax(to_numpy64(x))
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        y = sk.softmax(x, backend="triton")  # runs on the side stream
    side.synchronize()
    assert_close(y, ref, "float32", "side stream")
    cupy = pytest.importorskip("cupy")
    xc = cupy.asarray(to_numpy64(x).astype(np.float32))
    with cupy.cuda.Stream(non_blocking=True) as s:
        yc = sk.softmax(xc, backend="triton")
        s.synchronize()
    assert isinstance(yc, cupy.ndarray)
    assert_close(cupy.asnumpy(yc), ref, "float32", "cupy")
