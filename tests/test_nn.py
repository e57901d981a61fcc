"""sk.nn modules are drop-ins for torch.nn.Softmax, LogSoftmax and CrossEntropyLoss: the same
outputs and gradients for every option and input layout, compared with torch's own modules run in
float64 (tolerances per dtype from the contract).
"""

import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")

import softmax_kernels as sk  # noqa: E402
import softmax_kernels.nn as sknn  # noqa: E402

# contract tolerance per dtype, (atol, rtol), against a float64 reference
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 1.6e-2),
}


def _randn(*shape, seed, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _close(got, want, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol)


def test_lazy_import_of_sk_nn():
    """`sk.nn` is loaded on first use (the package imports without torch)."""
    code = "import softmax_kernels as sk; print(sk.nn.CrossEntropyLoss.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "CrossEntropyLoss"


# ----------------------------------------------------------------------------------------------
# Softmax / LogSoftmax


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,dim", [((3, 7), -1), ((3, 7), 0), ((2, 3, 5), 1), ((2, 3, 5), 2)])
@pytest.mark.parametrize("name", ["Softmax", "LogSoftmax"])
def test_softmax_modules_match_torch(name, shape, dim, dtype):
    ours, theirs = getattr(sknn, name)(dim=dim), getattr(torch.nn, name)(dim=dim)
    x = _randn(*shape, seed=1, dtype=dtype).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y, y_ref = ours(x), theirs(x64)
    assert y.dtype == dtype and y.shape == x.shape
    _close(y.detach(), y_ref.detach(), dtype)
    dy = _randn(*shape, seed=2, dtype=dtype)
    y.backward(dy)
    y_ref.backward(dy.double())
    _close(x.grad, x64.grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("name", ["Softmax", "LogSoftmax"])
def test_softmax_modules_half_precision(name, dtype):
    x = _randn(4, 33, seed=3, dtype=dtype).requires_grad_()
    y = getattr(sknn, name)(dim=1)(x)
    x64 = x.detach().double().requires_grad_()
    y_ref = getattr(torch.nn, name)(dim=1)(x64)
    assert y.dtype == dtype
    _close(y.detach(), y_ref.detach(), dtype)
    dy = _randn(4, 33, seed=4, dtype=dtype, scale=0.1)
    y.backward(dy)
    y_ref.backward(dy.double())
    _close(x.grad, x64.grad, dtype)


def test_softmax_default_dim_is_last():
    x = _randn(2, 3, 4, seed=5)
    _close(sknn.Softmax()(x), torch.softmax(x, -1), torch.float64)
    _close(sknn.LogSoftmax()(x), torch.log_softmax(x, -1), torch.float64)


@pytest.mark.parametrize("ndim", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("name", ["Softmax", "LogSoftmax"])
def test_softmax_dim_none_follows_torch(name, ndim):
    """dim=None: torch's legacy implicit dim (0 for 0-, 1- and 3-d input, else 1), with its
    warning."""
    x = _randn(*(2, 3, 4, 5)[:ndim], seed=6)
    with pytest.warns(UserWarning, match="Implicit dimension choice"):
        y = getattr(sknn, name)(dim=None)(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y_ref = getattr(torch.nn, name)(dim=None)(x)
    _close(y, y_ref, torch.float64)


def test_softmax_tuple_dim():
    x = _randn(2, 3, 4, seed=7)
    y = sknn.Softmax(dim=(0, 2))(x)
    ref = torch.softmax(x.permute(1, 0, 2).reshape(3, -1), -1).reshape(3, 2, 4).permute(1, 0, 2)
    _close(y, ref, torch.float64)


def test_softmax_module_repr_and_backend():
    assert repr(sknn.Softmax(dim=1)) == "Softmax(dim=1)"
    assert repr(sknn.LogSoftmax()) == "LogSoftmax(dim=-1)"
    x = _randn(2, 3, seed=8)
    _close(sknn.Softmax(backend="numpy")(x), torch.softmax(x, -1), torch.float64)
    with pytest.raises(ValueError, match="unknown backend"):
        sknn.Softmax(backend="nope")(x)


# ----------------------------------------------------------------------------------------------
# CrossEntropyLoss

LAYOUTS = {
    "unbatched": (5,),  # (C,)
    "2d": (4, 5),  # (N, C)
    "3d": (3, 5, 2),  # (N, C, d1)
    "4d": (2, 5, 3, 2),  # (N, C, d1, d2)
}
OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore": {"ignore_index": 3},
    "smoothing": {"label_smoothing": 0.2},
    "all": {"weight": True, "ignore_index": 3, "label_smoothing": 0.1},
}


def _ce_case(layout, soft, opts, dtype, seed=10):
    shape = LAYOUTS[layout]
    c = 5
    x = _randn(*shape, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    tshape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    if soft:
        target = torch.rand(shape, generator=g, dtype=torch.float64)
        target = (target / target.sum(dim=1 if len(shape) > 1 else 0, keepdim=True)).to(dtype)
    else:
        target = torch.randint(0, c, tshape, generator=g)
        if "ignore_index" in opts and target.numel() > 1:
            target.view(-1)[0] = 3  # some ignored rows ...
            target.view(-1)[-1] = 1  # ... but not all
    kw = dict(opts)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    return x, target, kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", sorted(OPTIONS))
@pytest.mark.parametrize("soft", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_cross_entropy_loss_matches_torch(layout, soft, opts, reduction, dtype):
    x, target, kw = _ce_case(layout, soft, OPTIONS[opts], dtype)
    w = kw.pop("weight", None)
    if soft and "ignore_index" in kw:
        # torch refuses ignore_index with probability targets; we ignore it (no row is an
        # index to ignore), which equals torch without it
        with pytest.raises(RuntimeError, match="ignore_index is not supported"):
            torch.nn.CrossEntropyLoss(**kw)(x.double(), target.double())
        del kw["ignore_index"]
        sk_kw = {"ignore_index": OPTIONS[opts]["ignore_index"]}
    else:
        sk_kw = {}
    ours = sknn.CrossEntropyLoss(
        weight=None if w is None else w.to(dtype), reduction=reduction, **kw, **sk_kw
    )
    theirs = torch.nn.CrossEntropyLoss(weight=w, reduction=reduction, **kw)
    x.requires_grad_()
    t = target.clone().requires_grad_() if soft else target
    x64 = x.detach().double().requires_grad_()
    t64 = target.double().requires_grad_() if soft else target
    loss, ref = ours(x, t), theirs(x64, t64)
    assert loss.dtype == dtype and loss.shape == ref.shape
    _close(loss.detach(), ref.detach(), dtype)
    go = _randn(*loss.shape, seed=12, dtype=dtype) if reduction == "none" else None
    loss.backward(go)
    ref.backward(None if go is None else go.double())
    _close(x.grad, x64.grad, dtype)
    if soft:
        _close(t.grad, t64.grad, dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", ["2d", "4d"])
def test_cross_entropy_loss_z_loss(layout, reduction):
    """z_loss adds z * lse**2 (lse over the class dim) to each counted row."""
    z = 0.05
    x, target, kw = _ce_case(layout, False, OPTIONS["all"], torch.float64)
    x.requires_grad_()
    loss = sknn.CrossEntropyLoss(reduction=reduction, z_loss=z, **kw)(x, target)
    x64 = x.detach().clone().requires_grad_()
    rows = torch.nn.CrossEntropyLoss(reduction="none", **kw)(x64, target)
    counted = target != kw["ignore_index"]
    rows = rows + torch.where(counted, z * torch.logsumexp(x64, dim=1) ** 2, 0.0)
    if reduction == "sum":
        ref = rows.sum()
    elif reduction == "mean":
        ref = rows.sum() / torch.where(counted, kw["weight"][target.clamp(0, 4)], 0.0).sum()
    else:
        ref = rows
    _close(loss.detach(), ref.detach(), torch.float64)
    loss.sum().backward()
    ref.sum().backward()
    _close(x.grad, x64.grad, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("soft", [False, True], ids=["index", "probs"])
def test_cross_entropy_loss_half_precision(soft, dtype):
    """Half logits: float32 loss (torch returns the input dtype), half gradient."""
    x, target, kw = _ce_case("3d", soft, OPTIONS["smoothing"], dtype)
    x.requires_grad_()
    loss = sknn.CrossEntropyLoss(**kw)(x, target)
    assert loss.dtype == torch.float32
    x64 = x.detach().double().requires_grad_()
    ref = torch.nn.CrossEntropyLoss(**kw)(x64, target.double() if soft else target)
    _close(loss.detach(), ref.detach(), dtype)
    loss.backward()
    ref.backward()
    assert x.grad.dtype == dtype
    _close(x.grad, x64.grad, dtype)


def test_cross_entropy_loss_all_ignored_mean_is_zero():
    """The contract's one difference from torch (which gives NaN)."""
    x = _randn(3, 5, seed=20).requires_grad_()
    loss = sknn.CrossEntropyLoss()(x, torch.full((3,), -100))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_cross_entropy_loss_weight_is_a_buffer():
    w = torch.linspace(0.5, 2.0, 5)
    ours = sknn.CrossEntropyLoss(weight=w.clone(), label_smoothing=0.1, z_loss=0.01)
    theirs = torch.nn.CrossEntropyLoss(weight=w * 2)
    assert set(ours.state_dict()) == {"weight"} == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())  # a torch checkpoint loads
    assert torch.equal(ours.weight, w * 2)
    ours = ours.double()
    assert ours.weight.dtype == torch.float64
    assert "weight" not in sknn.CrossEntropyLoss().state_dict()
    assert repr(ours) == "CrossEntropyLoss(reduction='mean', label_smoothing=0.1, z_loss=0.01)"


def test_cross_entropy_loss_bad_arguments():
    x = _randn(4, 5, seed=21)
    with pytest.raises(ValueError, match="reduction must be one of"):
        sknn.CrossEntropyLoss(reduction="avg")(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="class-index target has shape"):
        sknn.CrossEntropyLoss()(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="out of range"):
        sknn.CrossEntropyLoss()(x, torch.tensor([0, 1, 2, 5]))


def test_training_loop_drop_in():
    """The README example: swapping torch.nn.CrossEntropyLoss for sk.nn.CrossEntropyLoss in a
    training loop gives the same parameters step after step."""

    def train(loss_fn):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 7)
        ).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            x = torch.randn((8, 12), generator=g, dtype=torch.float64)
            y = torch.randint(0, 7, (8,), generator=g)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
        return [p.detach() for p in model.parameters()]

    ours = train(sk.nn.CrossEntropyLoss(label_smoothing=0.1))
    theirs = train(torch.nn.CrossEntropyLoss(label_smoothing=0.1))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
