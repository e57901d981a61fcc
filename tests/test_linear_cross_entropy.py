"""Fused linear + cross-entropy on every backend against a float64 reference (the logits
x @ W^T + b in float64, then torch's float64 cross-entropy), against torch's own
linear_cross_entropy, CS231N's vectorised softmax loss (seed 003), and its memory bound."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import softmax_kernels as sk

from reference import TOL, assert_close, ref_cross_entropy, to_numpy64

LOSS_DTYPE = {"float16": "float32", "bfloat16": "float32", "float32": "float32",
              "float64": "float64"}  # fmt: skip
ROUND = {"float16": np.float16, "float32": np.float32, "float64": np.float64}


def _problem(rng, lead, d, v, soft, bias=True, weight=True):
    x = rng.standard_normal(lead + (d,))
    w = rng.standard_normal((v, d)) / np.sqrt(d) * 2
    b = rng.standard_normal(v) if bias else None
    if soft:
        t = rng.dirichlet(np.ones(v), size=lead)
    else:
        t = rng.integers(0, v, size=lead)
        t.reshape(-1)[:2] = -100  # (ignored rows)
    cw = rng.random(v) + 0.5 if weight else None
    return x, w, b, t, cw


def _reference(x, w, b, t, cw, **opts):
    """(loss, dx, dW, db) in float64 from the dense logits."""
    z = x @ w.T + (b if b is not None else 0.0)
    loss, g = ref_cross_entropy(z, t, weight=cw, **opts)
    d = x.shape[-1]
    g2, x2 = g.reshape(-1, w.shape[0]), x.reshape(-1, d)
    return loss, (g2 @ w).reshape(x.shape), g2.T @ x2, g2.sum(axis=0)


def _relerr(a, ref):
    a, ref = to_numpy64(a), np.asarray(ref)
    return np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30)


OPTIONS = [
    {},
    {"label_smoothing": 0.1, "z_loss": 1e-3},
    {"softcap": 4.0, "reduction": "sum"},
    {"reduction": "none", "label_smoothing": 0.2},
]


@pytest.mark.parametrize("soft", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}" for k in o) or "plain")
def test_matches_the_dense_reference(target, soft, opts, rng):
    # 2 x 9 rows in chunks of 4 (the last one partial), 13 classes, 6 features
    x64, w64, b64, t64, cw64 = _problem(rng, (2, 9), 6, 13, soft)
    x, w, b = (target.array(a, "float64") for a in (x64, w64, b64))
    t = target.array(t64, "float64" if soft else None)
    cw = target.array(cw64, "float64")
    ref = _reference(x64, w64, b64, t64, cw64, **opts)
    got = sk.linear_cross_entropy_with_grad(x, w, t, linear_bias=b, weight=cw, chunk_size=4,
                                            backend=target.backend, **opts)  # fmt: skip
    for name, a, r in zip(("loss", "dx", "dW", "db"), got, ref, strict=True):
        assert tuple(np.shape(to_numpy64(a))) == np.shape(r), name
        assert_close(a, r, "float64", name)
    loss = sk.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, chunk_size=4,
                                   backend=target.backend, **opts)  # fmt: skip
    assert_close(loss, ref[0], "float64", "loss only")


def test_every_dtype(target, dtype, rng):
    # half types: logits in the input's precision (float32 accumulation): the loss within the
    # bound of the reference on those rounded logits; gradients close in norm
    x64, w64, b64, t64, _ = _problem(rng, (21,), 8, 30, False, weight=False)
    x, w, b = (target.array(a, dtype) for a in (x64, w64, b64))
    t = target.array(t64)
    xr, wr, br = (to_numpy64(a) for a in (x, w, b))
    loss, dx, dw, db = sk.linear_cross_entropy_with_grad(x, w, t, linear_bias=b, chunk_size=8,
                                                         backend=target.backend)  # fmt: skip
    ref = _reference(xr, wr, br, t64, None)
    if dtype in ("float32", "float64"):
        assert_close(loss, ref[0], LOSS_DTYPE[dtype], "loss")
        for name, a, r in zip(("dx", "dW", "db"), (dx, dw, db), ref[1:], strict=True):
            assert _relerr(a, r) < 10 * TOL[dtype][1], name
    else:
        z = to_numpy64(target.array(xr @ wr.T + br, dtype))  # logits rounded like the GEMM's
        ref_loss, _ = ref_cross_entropy(z, t64)
        assert_close(loss, ref_loss, "float32", "loss on rounded logits")
        for name, a, r in zip(("dx", "dW", "db"), (dx, dw, db), ref[1:], strict=True):
            assert _relerr(a, r) < 2 * TOL[dtype][1], name
    for a, like in ((dx, x), (dw, w), (db, b)):
        assert str(a.dtype) == str(like.dtype)


def test_all_rows_ignored_and_chunk_sizes(target, rng):
    x64, w64, _, t64, _ = _problem(rng, (7,), 4, 5, False, bias=False, weight=False)
    x, w = target.array(x64, "float64"), target.array(w64, "float64")
    t = target.array(np.full(7, -100))
    loss, dx, dw, db = sk.linear_cross_entropy_with_grad(x, w, t, backend=target.backend)
    assert float(to_numpy64(loss)) == 0.0 and db is None
    assert not to_numpy64(dx).any() and not to_numpy64(dw).any()
    t = target.array(t64)
    ref = _reference(x64, w64, None, t64, None)
    for chunk in (1, 3, 7, 100):
        got = sk.linear_cross_entropy_with_grad(x, w, t, chunk_size=chunk, backend=target.backend)
        for name, a, r in zip(("loss", "dx", "dW"), got[:3], ref[:3], strict=True):
            assert_close(a, r, "float64", f"{name}, chunk {chunk}")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        sk.linear_cross_entropy(x, w, t, chunk_size=0, backend=target.backend)


def test_transposed_weight_view_is_not_copied(rng):
    # CS231N's W is (D, C): pass W.T; dW comes back in the same layout (dW.T of a (D, C) array)
    x64, w64, _, t64, _ = _problem(rng, (10,), 6, 9, False, bias=False, weight=False)
    w_dc = np.ascontiguousarray(w64.T)
    loss, dx, dw, _ = sk.linear_cross_entropy_with_grad(x64, w_dc.T, t64, chunk_size=3)
    ref = _reference(x64, w64, None, t64, None)
    assert dw.strides == w_dc.T.strides
    assert_close(dw, ref[2], "float64", "dW of a transposed view")
    assert_close(loss, ref[0], "float64", "loss")


def test_against_torch_linear_cross_entropy(rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip("this torch has no linear_cross_entropy")
    x64, w64, b64, t64, cw64 = _problem(rng, (12,), 5, 7, False)
    x, w, b = (torch.tensor(a, requires_grad=True) for a in (x64, w64, b64))
    t, cw = torch.tensor(t64), torch.tensor(cw64)
    for red in ("mean", "sum"):
        for eps in (0.0, 0.1):
            kw = dict(linear_bias=b, weight=cw, reduction=red, label_smoothing=eps)
            want = F.linear_cross_entropy(x, w, t, ignore_index=-100, **kw)
            gw = torch.autograd.grad(want, (x, w, b))
            got = sk.linear_cross_entropy(x, w, t, **kw)
            gg = torch.autograd.grad(got, (x, w, b))
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
            for a, e in zip(gg, gw, strict=True):
                torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_and_module(reduction, rng):
    torch = pytest.importorskip("torch")
    x64, w64, b64, t64, _ = _problem(rng, (2, 3), 4, 5, False, weight=False)
    x, w, b = (torch.tensor(a, requires_grad=True) for a in (x64, w64, b64))
    t = torch.tensor(t64)

    def f(x, w, b):
        return sk.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction,
                                       label_smoothing=0.1, chunk_size=2)  # fmt: skip

    assert torch.autograd.gradcheck(f, (x, w, b))
    mod = sk.nn.LinearCrossEntropyLoss(reduction=reduction, label_smoothing=0.1, chunk_size=2)
    torch.testing.assert_close(mod(x, w, t, linear_bias=b), f(x, w, b), atol=0, rtol=0)


def test_torch_compile_fullgraph(rng):
    torch = pytest.importorskip("torch")
    x64, w64, _, t64, _ = _problem(rng, (9,), 4, 6, False, bias=False, weight=False)
    x, w = torch.tensor(x64, requires_grad=True), torch.tensor(w64, requires_grad=True)
    t = torch.tensor(t64)

    def f(x, w):
        return sk.linear_cross_entropy(x, w, t, z_loss=1e-2, chunk_size=4)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(x, w)
    gx, gw = torch.autograd.grad(got, (x, w))
    want = f(x, w)
    ex, ew = torch.autograd.grad(want, (x, w))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gx, ex, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gw, ew, atol=1e-12, rtol=1e-12)


# CS231N (seed 003) ------------------------------------------------------------------------


def softmax_loss_vectorized(W, X, y, reg):
    """Seed 003's CS231N code, as given (its ``x.T`` typo read as ``X.T``)."""
    num_train = X.shape[0]
    scores = X.dot(W)
    shift_scores = scores - np.max(scores, axis=1).reshape(-1, 1)
    softmax_output = np.exp(shift_scores) / np.sum(np.exp(shift_scores), axis=1).reshape(-1, 1)
    loss = -np.sum(np.log(softmax_output[range(num_train), list(y)]))
    loss /= num_train
    loss += 0.5 * reg * np.sum(W * W)
    dS = softmax_output.copy()
    dS[range(num_train), list(y)] += -1
    dW = (X.T).dot(dS)
    dW = dW / num_train + reg * W
    return loss, dW


def test_cs231n_equivalence(rng):
    X = rng.standard_normal((50, 12))
    W = rng.standard_normal((12, 10)) * 0.1  # (D, C)
    y = rng.integers(0, 10, size=50)
    reg = 0.05
    want_loss, want_dw = softmax_loss_vectorized(W, X, y, reg)
    # the README's three lines
    loss, _, dwt, _ = sk.linear_cross_entropy_with_grad(X, W.T, y)  # W.T: (C, D), not copied
    loss = loss + 0.5 * reg * np.sum(W * W)
    dW = dwt.T + reg * W
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dW, want_dw, rtol=1e-12, atol=1e-12)


def test_extra_memory_is_one_chunk_not_n_by_v(rng):
    # N x V float32 would be 128 MiB; the CPU chunk of 1024 rows 16 MiB
    n, d, v = 8192, 64, 4096
    x = rng.standard_normal((n, d), dtype=np.float32)
    w = rng.standard_normal((v, d), dtype=np.float32) * 0.1
    t = rng.integers(0, v, size=n)
    tracemalloc.start()
    try:
        loss, dx, dw, _ = sk.linear_cross_entropy_with_grad(x, w, t)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    outputs = dx.nbytes + dw.nbytes
    chunk_logits = 1024 * v * 4  # (the CPU chunk: at least 1024 rows)
    extra = peak - outputs
    assert extra < 3 * chunk_logits, (extra, chunk_logits)  # chunk + its block temporaries
    assert extra < n * v * 4 / 2, "never O(N x V)"
    ref = _reference(x.astype(np.float64), w.astype(np.float64), None, t, None)
    assert_close(loss, ref[0], "float32", "loss")


def test_argument_errors():
    x, w, t = np.zeros((3, 4)), np.zeros((5, 4)), np.array([0, 1, 2])
    with pytest.raises(ValueError, match=r"linear_weight has shape \(5, 3\), expected \(V, 4\)"):
        sk.linear_cross_entropy(x, np.zeros((5, 3)), t)
    with pytest.raises(TypeError, match="linear_weight has dtype float32 but x has float64"):
        sk.linear_cross_entropy(x, w.astype(np.float32), t)
    with pytest.raises(ValueError, match=r"linear_bias has shape \(4,\), expected \(5,\)"):
        sk.linear_cross_entropy(x, w, t, linear_bias=np.zeros(4))
    with pytest.raises(ValueError, match=r"class-index target has shape \(2,\), expected \(3,\)"):
        sk.linear_cross_entropy(x, w, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"target\[1\] = 7 is out of range"):
        sk.linear_cross_entropy(x, w, np.array([0, 7, 1]))
