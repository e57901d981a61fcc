"""Autograd of the torch integration: sk.softmax, sk.log_softmax and sk.cross_entropy on tensors
that require grad carry autograd whose backward runs our own backward ops, and the gradients equal
torch's (torch.autograd.gradcheck in float64 for every option).

Runs on CPU with the NumPy backend; the Triton backend joins in when it can serve CPU tensors
(TRITON_INTERPRET=1). Sizes are small (3x5, 2x3x4) because gradcheck perturbs every element.
"""

import importlib.util
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import softmax_kernels as sk  # noqa: E402
from softmax_kernels import _core  # noqa: E402


def _cpu_backends():
    # The Triton backend serves torch CPU tensors through its interpreter (`make test` sets
    # TRITON_INTERPRET=1); otherwise only the NumPy backend runs on the CPU.
    names = ["numpy"]
    if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton"):
        names.append("triton")
    return names


BACKENDS = _cpu_backends()


def _randn(*shape, seed, dtype=torch.float64, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(shape), generator=g, dtype=torch.float64) * 2.0
    return x.to(dtype).requires_grad_(requires_grad)


def _mask(shape, seed, p=0.7):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < p


def _ref_softmax(x, axis, scale, mask, is_log):
    """torch's own (log_)softmax over the axes `axis` (jointly), masked entries -inf first."""
    nd = x.dim()
    axes = tuple(range(nd)) if axis is None else (axis if isinstance(axis, tuple) else (axis,))
    axes = tuple(sorted(a % nd for a in axes)) if nd else ()
    s = scale * x
    if mask is not None:
        s = s.masked_fill(~mask.expand(x.shape), float("-inf"))
    other = [a for a in range(nd) if a not in axes]
    perm = other + list(axes)
    p = s.permute(perm)
    lead = p.shape[: len(other)]
    rows = p.reshape(*lead, -1)
    out = rows.log_softmax(-1) if is_log else rows.softmax(-1)
    inv = [perm.index(a) for a in range(nd)]
    return out.reshape(p.shape).permute(inv)


# (shape, axis, scale, mask shape or None, transpose the input first?)
SOFTMAX_CASES = [
    ((3, 5), -1, 1.0, None, False),  # rows along the last axis
    ((3, 5), 0, 0.7, None, False),  # reduced axis first: rows gathered with a copy
    ((2, 3, 4), (0, 2), -1.3, None, False),  # axis tuple, negative scale
    ((2, 3, 4), None, 1.0, None, False),  # the whole tensor is one row
    ((2, 3, 4), 1, 2.0, None, True),  # non-contiguous (transposed) input
    ((4, 5), -1, 0.5, (4, 5), False),  # full mask with a fully masked row (below)
    ((2, 3, 4), (1, 2), 1.0, (3, 1), False),  # broadcast mask, axis tuple
    ((5,), 0, 1.5, None, False),  # 1-d
    ((3, 1), -1, 1.0, None, False),  # rows of one element
]


def _case_inputs(case, seed):
    shape, axis, scale, mshape, transpose = case
    x = _randn(*shape, seed=seed)
    if transpose:
        x = x.detach().transpose(0, 2).contiguous().transpose(0, 2).requires_grad_()
        assert not x.is_contiguous()
    mask = None
    if mshape is not None:
        mask = _mask(mshape, seed + 1)
        if mshape == (4, 5):
            mask[1] = False  # a row with no True entry
            mask[2, 0] = True
    return x, axis, scale, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=[str(i) for i in range(len(SOFTMAX_CASES))])
def test_softmax_gradcheck(case, is_log, backend):
    x, axis, scale, mask = _case_inputs(case, seed=10)
    fn = sk.log_softmax if is_log else sk.softmax

    def f(x):
        y = fn(x, axis, scale=scale, where=mask, backend=backend)
        if mask is not None and is_log:  # masked entries are the constant -inf
            y = y.masked_fill(~mask.expand(x.shape), 0.0)
        return y

    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("is_log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=[str(i) for i in range(len(SOFTMAX_CASES))])
def test_softmax_matches_torch(case, is_log):
    """Values and gradients (for a random upstream gradient) equal torch's own ops."""
    x, axis, scale, mask = _case_inputs(case, seed=20)
    fn = sk.log_softmax if is_log else sk.softmax
    y = fn(x, axis, scale=scale, where=mask)
    assert y.requires_grad and "softmax_kernels" in type(y.grad_fn).__name__
    x_ref = x.detach().clone().requires_grad_()
    y_ref = _ref_softmax(x_ref, axis, scale, mask, is_log)
    dy = _randn(*x.shape, seed=21, requires_grad=False)  # nonzero at masked entries too
    (dx,) = torch.autograd.grad(y, x, dy)
    live = None
    if mask is not None:
        live = mask.expand(x.shape).clone()
        full = ~live.flatten(1).any(1) if x.dim() == 2 else None
        if full is not None and full.any():  # torch gives NaN there; we give 0 / -inf
            live[full] = False
            fill = float("-inf") if is_log else 0.0
            assert torch.equal(y[full].detach(), torch.full_like(y[full], fill))
            assert torch.equal(dx[full], torch.zeros_like(dx[full]))
        y_ref = torch.where(live, y_ref, y_ref.new_zeros(()))
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, dy)
    yd = y.detach()
    if live is not None:
        yd = torch.where(live, yd, yd.new_zeros(()))
        dx, dx_ref = dx[live.flatten(1).any(1)], dx_ref[live.flatten(1).any(1)]
    torch.testing.assert_close(yd, y_ref.detach(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dx, dx_ref, atol=1e-12, rtol=1e-12)


def test_masked_log_softmax_backward_zeroes_masked_upstream_gradient():
    """Masked outputs are constant: their upstream gradient must not leak into the others."""
    x = _randn(3, 6, seed=30)
    mask = _mask((3, 6), seed=31)
    mask[:, 0] = True
    y = sk.log_softmax(x, where=mask)
    dy = torch.where(mask, torch.zeros(()), torch.full((), 1e3, dtype=torch.float64))
    (dx,) = torch.autograd.grad(y, x, dy)
    assert torch.equal(dx, torch.zeros_like(dx))


@pytest.mark.parametrize("is_log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("axis", [-1, (0, 2)])
def test_softmax_double_backward(axis, is_log):
    x = _randn(2, 3, 4, seed=40)
    fn = sk.log_softmax if is_log else sk.softmax
    assert torch.autograd.gradgradcheck(lambda x: fn(x, axis, scale=0.8), (x,))


@pytest.mark.parametrize("is_log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("axis", [-1, (0, 2)])
def test_backward_ops_gradcheck(axis, is_log):
    """The backward ops have their own autograd formulas (w.r.t. dy and y)."""
    from softmax_kernels import torch_ops

    x = _randn(2, 3, 4, seed=45, requires_grad=False)
    y = (sk.log_softmax if is_log else sk.softmax)(x, axis).requires_grad_()
    dy = _randn(2, 3, 4, seed=46)

    def fn(dy, y):
        return torch_ops.backward_entry(dy, y, axis, 0.6, None, None, is_log)

    assert torch.autograd.gradcheck(fn, (dy, y))


@pytest.mark.parametrize("is_log", [False, True], ids=["softmax", "log_softmax"])
def test_public_backward_functions_on_tensors(is_log):
    """sk.softmax_backward / sk.log_softmax_backward on tensors go through the custom ops: the
    result carries autograd. (Needs api.py to route torch tensors to torch_ops.)"""
    x = _randn(3, 5, seed=47, requires_grad=False)
    y = (sk.log_softmax if is_log else sk.softmax)(x).requires_grad_()
    dy = _randn(3, 5, seed=48)
    fn = sk.log_softmax_backward if is_log else sk.softmax_backward
    dx = fn(dy, y, scale=0.6)
    assert dx.requires_grad
    assert torch.autograd.gradcheck(lambda dy, y: fn(dy, y, scale=0.6), (dy, y))


def test_out_argument_under_autograd():
    """out= writes outside the ops: refused when a graph is needed (as torch refuses it), and
    out's version counter is bumped so a saved old value is not silently reused. (Needs api.py
    to route torch tensors' out= through torch_ops.write_out.)"""
    x = _randn(3, 5, seed=49)
    with pytest.raises(RuntimeError, match="out=... arguments don't support automatic"):
        sk.softmax(x, out=torch.empty_like(x))
    h = _randn(3, 5, seed=50)
    saved = _randn(3, 5, seed=51, requires_grad=False)
    prod = h * saved  # the product's backward reads `saved` (for h's gradient)
    y = sk.log_softmax(x.detach(), out=saved)
    assert y is saved
    torch.testing.assert_close(y, torch.log_softmax(x.detach(), -1), atol=1e-12, rtol=1e-12)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        prod.sum().backward()
    with torch.no_grad():
        sk.softmax(x, out=torch.empty_like(x))


def test_backward_runs_our_backward_ops(monkeypatch):
    calls = []
    real = _core.softmax_backward

    def spy(dy, y, axis, scale, out, backend, is_log):
        calls.append(is_log)
        return real(dy, y, axis, scale, out, backend, is_log)

    monkeypatch.setattr(_core, "softmax_backward", spy)
    x = _randn(3, 5, seed=50)
    sk.softmax(x).sum().backward()
    (sk.log_softmax(x) * x.detach()).sum().backward()
    assert calls == [False, True]


def test_cross_entropy_backward_reuses_the_fused_gradient(monkeypatch):
    """The forward pass computes loss and gradient in one kernel; backward only scales it."""
    calls = []
    real = _core.cross_entropy

    def spy(*args, **kw):
        calls.append((kw["want_grad"], kw["options"].grad_scale))
        return real(*args, **kw)

    monkeypatch.setattr(_core, "cross_entropy", spy)
    x = _randn(3, 5, seed=51)
    loss = sk.cross_entropy(x, torch.tensor([0, 4, 2]))
    assert calls == [(True, 1.0)]
    loss.backward()
    assert calls == [(True, 1.0)]
    with torch.no_grad():  # no gradient wanted: the loss-only kernel
        sk.cross_entropy(x, torch.tensor([0, 4, 2]))
    assert calls[-1] == (False, 1.0)


def test_no_graph_without_requires_grad():
    x = _randn(3, 5, seed=52, requires_grad=False)
    assert not sk.softmax(x).requires_grad
    assert not sk.cross_entropy(x, torch.tensor([0, 1, 2])).requires_grad
    xg = x.clone().requires_grad_()
    with torch.no_grad():
        assert not sk.log_softmax(xg).requires_grad
    loss, g = sk.cross_entropy_with_grad(xg, torch.tensor([0, 1, 2]))
    assert not loss.requires_grad and not g.requires_grad


# ----------------------------------------------------------------------------------------------
# cross-entropy

CE_OPTIONS = [
    {},
    {"weight": True},
    {"ignore": True},
    {"label_smoothing": 0.15},
    {"z_loss": 0.02},
    {"weight": True, "ignore": True, "label_smoothing": 0.1, "z_loss": 0.01},
    {"label_smoothing": 1.0, "weight": True},
]


def _ce_inputs(opts, shape=(3, 5), soft=False, seed=60):
    x = _randn(*shape, seed=seed)
    c = shape[-1]
    g = torch.Generator().manual_seed(seed + 1)
    if soft:
        target = torch.rand(shape, generator=g, dtype=torch.float64)
        target = (target / target.sum(-1, keepdim=True)).requires_grad_()
    else:
        target = torch.randint(0, c, shape[:-1], generator=g)
        if opts.get("ignore"):
            target.view(-1)[1] = 7  # ignore_index=7: row 1 counts for nothing
    kw = {k: v for k, v in opts.items() if k in ("label_smoothing", "z_loss")}
    if opts.get("weight"):
        kw["weight"] = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    if opts.get("ignore"):
        kw["ignore_index"] = 7
    return x, target, kw


def _torch_ce(x, target, reduction, kw):
    """torch's cross-entropy on (-1, C) rows plus z_loss * lse**2 per counted row."""
    c = x.shape[-1]
    soft = target.is_floating_point()
    x2 = x.reshape(-1, c)
    t2 = target.reshape(-1, c) if soft else target.reshape(-1)
    opts = {k: v for k, v in kw.items() if k != "z_loss"}
    rows = torch.nn.functional.cross_entropy(x2, t2, reduction="none", **opts)
    z = kw.get("z_loss", 0.0)
    if soft:
        counted = torch.ones(x2.shape[0], dtype=torch.bool)
        denom = torch.tensor(float(x2.shape[0]), dtype=x.dtype)
    else:
        counted = t2 != kw.get("ignore_index", -100)
        w = kw.get("weight")
        safe = torch.where(counted, t2, 0)
        wt = w[safe] if w is not None else torch.ones_like(rows)
        denom = (wt * counted).sum()
    rows = rows + torch.where(counted, z * torch.logsumexp(x2, -1) ** 2, 0.0)
    if reduction == "none":
        return rows.reshape(x.shape[:-1])
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / denom


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", CE_OPTIONS, ids=[str(i) for i in range(len(CE_OPTIONS))])
def test_cross_entropy_gradcheck(opts, reduction, backend):
    x, target, kw = _ce_inputs(opts)
    assert torch.autograd.gradcheck(
        lambda x: sk.cross_entropy(x, target, reduction=reduction, backend=backend, **kw), (x,)
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", CE_OPTIONS[:6], ids=[str(i) for i in range(6)])
def test_cross_entropy_soft_target_gradcheck(opts, reduction, backend):
    """Soft targets: gradients with respect to both the logits and the probabilities."""
    opts = {k: v for k, v in opts.items() if k != "ignore"}
    x, q, kw = _ce_inputs(opts, soft=True)

    def f(x, q):
        return sk.cross_entropy(x, q, reduction=reduction, backend=backend, **kw)

    assert torch.autograd.gradcheck(f, (x, q))
    # the target alone (logits constant): the loss-only op's formula
    assert torch.autograd.gradcheck(lambda q: f(x.detach(), q), (q,))


@pytest.mark.parametrize("soft", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_nd_gradcheck(reduction, soft):
    """(2, 3, 4) logits, class axis last: rows over the two leading axes."""
    x, target, kw = _ce_inputs({"weight": True, "label_smoothing": 0.1}, (2, 3, 4), soft=soft)
    args = (x, target) if soft else (x,)

    def f(x, *t):
        return sk.cross_entropy(x, t[0] if t else target, reduction=reduction, **kw)

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", CE_OPTIONS, ids=[str(i) for i in range(len(CE_OPTIONS))])
def test_cross_entropy_matches_torch(opts, reduction):
    """Loss and gradients equal torch's F.cross_entropy (+ z-loss), per-row upstream gradient
    included for reduction='none'."""
    for soft in (False, True):
        if soft and opts.get("ignore"):
            continue
        x, target, kw = _ce_inputs(opts, (2, 3, 5), soft=soft, seed=70)
        loss = sk.cross_entropy(x, target, reduction=reduction, **kw)
        xr = x.detach().clone().requires_grad_()
        tr = target.detach().clone().requires_grad_() if soft else target
        ref = _torch_ce(xr, tr, reduction, kw)
        torch.testing.assert_close(loss.detach(), ref.detach(), atol=1e-12, rtol=1e-12)
        go = _randn(*loss.shape, seed=71, requires_grad=False)
        inputs = (x, target) if soft else (x,)
        got = torch.autograd.grad(loss, inputs, go)
        want = torch.autograd.grad(ref, (xr, tr) if soft else (xr,), go)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_cross_entropy_all_ignored_mean_gives_zero_loss_and_gradient():
    x = _randn(3, 5, seed=80)
    t = torch.full((3,), -100)
    loss = sk.cross_entropy(x, t)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x.grad))
    assert torch.autograd.gradcheck(lambda x: sk.cross_entropy(x, t), (x,))


def test_cross_entropy_half_precision_gradient():
    """bfloat16/float16 logits: float32 loss, gradient in the logits' dtype, close to the float64
    gradient within the dtype's contract tolerance."""
    for dtype, atol, rtol in ((torch.float16, 1e-3, 1e-3), (torch.bfloat16, 8e-3, 1.6e-2)):
        x = _randn(4, 7, seed=81, dtype=dtype)
        t = torch.tensor([0, 6, 3, 1])
        loss = sk.cross_entropy(x, t, label_smoothing=0.1)
        assert loss.dtype == torch.float32
        loss.backward()
        assert x.grad.dtype == dtype
        x64 = x.detach().double().requires_grad_()
        torch.nn.functional.cross_entropy(x64, t, label_smoothing=0.1).backward()
        torch.testing.assert_close(x.grad.double(), x64.grad, atol=atol, rtol=rtol)


def test_cross_entropy_weight_requires_grad_is_refused():
    x = _randn(3, 5, seed=90)
    w = torch.rand(5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="weight"):
        sk.cross_entropy(x, torch.tensor([0, 1, 2]), weight=w)
    sk.cross_entropy(x, torch.tensor([0, 1, 2]), weight=w.detach()).backward()


def test_cross_entropy_double_backward_raises():
    x = _randn(3, 5, seed=91)
    loss = sk.cross_entropy(x, torch.tensor([0, 1, 2]))
    with pytest.raises(NotImplementedError, match="second derivative"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_options_given_as_tensors():
    """Tensor-valued options: weight as a tensor of another float dtype, scale as a 0-d tensor."""
    x = _randn(3, 5, seed=92)
    t = torch.tensor([0, 4, 2])
    w32 = torch.rand(5, generator=torch.Generator().manual_seed(93)) + 0.5
    a = sk.cross_entropy(x, t, weight=w32)
    b = sk.cross_entropy(x, t, weight=w32.double())
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(
        sk.softmax(x, scale=torch.tensor(0.5)), sk.softmax(x, scale=0.5), atol=0, rtol=0
    )


# ----------------------------------------------------------------------------------------------
# in-place gradients under autograd


def test_inplace_gradient_matches_and_bumps_version():
    lin = torch.nn.Linear(6, 5).double()
    inp = _randn(4, 6, seed=100, requires_grad=False)
    t = torch.tensor([0, 1, 4, 2])
    sk.cross_entropy(lin(inp), t, label_smoothing=0.1).backward()
    want = lin.weight.grad.clone()
    lin.zero_grad()
    logits = lin(inp)  # Linear's backward does not need its output: in-place is safe
    version = logits._version
    loss, g = sk.cross_entropy_with_grad(logits, t, label_smoothing=0.1, inplace=True)
    assert logits._version > version
    assert g.data_ptr() == logits.data_ptr() and not g.requires_grad and not loss.requires_grad
    logits.backward(g)
    torch.testing.assert_close(lin.weight.grad, want, atol=1e-12, rtol=1e-12)


def test_inplace_gradient_over_saved_logits_raises_instead_of_wrong_gradient():
    h = _randn(4, 5, seed=101)
    logits = h.exp()  # exp's backward reads its output: overwriting it must be detected
    _, g = sk.cross_entropy_with_grad(logits, torch.tensor([0, 1, 4, 2]), inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logits.backward(g)


def test_inplace_on_plain_tensor_returns_it():
    x = _randn(4, 5, seed=102, requires_grad=False)
    want_loss, want_g = sk.cross_entropy_with_grad(x.clone(), torch.tensor([0, 1, 4, 2]))
    loss, g = sk.cross_entropy_with_grad(x, torch.tensor([0, 1, 4, 2]), inplace=True)
    assert g is x
    torch.testing.assert_close(g, want_g, atol=0, rtol=0)
    torch.testing.assert_close(loss, want_loss, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# argument errors: the same exception and message as for NumPy input


def _bad_calls():
    def ce(**kw):
        return lambda x, t: sk.cross_entropy(x, t, **kw)

    def sm(**kw):
        return lambda x, t: sk.softmax(x, **kw)

    return {
        "reduction": ce(reduction="avg"),
        "smoothing_range": ce(label_smoothing=1.5),
        "smoothing_type": ce(label_smoothing="a"),
        "smoothing_nan": ce(label_smoothing=float("nan")),
        "z_loss_neg": ce(z_loss=-1.0),
        "z_loss_bool": ce(z_loss=True),
        "grad_scale": lambda x, t: sk.cross_entropy_with_grad(x, t, grad_scale=float("inf")),
        "ignore_index": ce(ignore_index=1.0),
        "weight_shape": lambda x, t: sk.cross_entropy(x, t, weight=x[0, :3] * 0 + 1),
        "backend": ce(backend="nope"),
        "target_shape": lambda x, t: sk.cross_entropy(x, t[:2]),
        "target_dtype": lambda x, t: sk.cross_entropy(x, t > 0),
        "target_range": lambda x, t: sk.cross_entropy(x, t + 10),
        "logits_dtype": lambda x, t: sk.cross_entropy(t, t),
        "axis": sm(axis=3),
        "axis_repeat": sm(axis=(0, -2)),
        "axis_type": sm(axis=1.5),
        "scale": sm(scale=float("inf")),
        "scale_str": sm(scale="2"),
        "scale_big_int": sm(scale=10**400),
        "dy_shape": lambda x, t: sk.softmax_backward(x[:, :2], x),
        "dy_dtype": lambda x, t: sk.log_softmax_backward(x, x[:, :] * 1 > 0),
        "backward_axis": lambda x, t: sk.softmax_backward(x, x, axis=(1, 1)),
        "where_dtype": lambda x, t: sk.softmax(x, where=x),
        "where_shape": lambda x, t: sk.softmax(x, where=x[:, :2] > 0),
        "x_int": lambda x, t: sk.softmax(t),
        "softmax_backend": sm(backend="nope"),
    }


@pytest.mark.parametrize("name", sorted(_bad_calls()))
def test_errors_match_numpy(name):
    call = _bad_calls()[name]
    xn = np.random.default_rng(110).standard_normal((4, 5))
    tn = np.array([0, 4, 2, 1])
    with pytest.raises(Exception) as np_err:
        call(xn, tn)
    xt = torch.from_numpy(xn).requires_grad_()
    with pytest.raises(Exception) as t_err:
        call(xt, torch.from_numpy(tn))
    assert type(t_err.value) is type(np_err.value)
    assert str(t_err.value) == str(np_err.value)


def test_mixed_array_kinds_are_refused():
    x = _randn(3, 5, seed=111)
    with pytest.raises(TypeError, match="weight is a numpy array but logits is a torch array"):
        sk.cross_entropy(x, torch.tensor([0, 1, 2]), weight=np.ones(5))
    with pytest.raises(TypeError, match="target is a numpy array"):
        sk.cross_entropy(x, np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="where is a numpy array"):
        sk.softmax(x, where=np.ones((3, 5), bool))
    with pytest.raises(TypeError, match="dy is a numpy array but y is a torch array"):
        sk.softmax_backward(np.ones((3, 5)), x)
