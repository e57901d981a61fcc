"""torch.library registration and torch.compile: every op passes torch.library.opcheck (schema,
fake implementation, autograd registration, AOT dispatch), and a small model built on sk ops and
sk.nn modules compiles with fullgraph=True (no graph break) under "aot_eager" and "inductor",
giving the eager outputs and gradients. On a GPU: no host synchronisation (sync debug mode
"error") and capture in a CUDA graph.

Inductor compiles are slow on CPU (seconds each), so there are only two of them.
"""

import os

import pytest

torch = pytest.importorskip("torch")

from torch._dynamo import testing as dynamo_testing  # noqa: E402

import softmax_kernels as sk  # noqa: E402
import softmax_kernels.nn  # noqa: E402, F401  (sk.nn)
from softmax_kernels import dispatch, torch_ops  # noqa: E402


def _randn(*shape, seed, dtype=torch.float64, device="cpu", requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    return x.requires_grad_(requires_grad)


# ----------------------------------------------------------------------------------------------
# opcheck: schema, fake vs real (shapes, strides, dtypes), autograd registration, AOT dispatch


def _opcheck_cases():
    x = _randn(2, 3, 4, seed=1, requires_grad=True)
    mask = _randn(2, 3, 4, seed=2) > -0.5
    y = torch.softmax(_randn(2, 3, 4, seed=3), 1).requires_grad_()
    ly = torch.log_softmax(_randn(2, 3, 4, seed=4), 2).requires_grad_()
    lg = _randn(6, 5, seed=5, requires_grad=True)
    t = torch.tensor([0, 1, 4, -100, 2, 3])
    q = torch.softmax(_randn(6, 5, seed=6), -1).requires_grad_()
    w = torch.rand(5, dtype=torch.float64) + 0.5
    lg16 = _randn(6, 5, seed=7, dtype=torch.bfloat16, requires_grad=True)
    # label_smoothing, z_loss, softcap, validate, want_lse, backend
    ce = (0.1, 0.01, None, False, False, "")
    plain = (0.0, 0.0, None, False, False, "")
    return {
        "softmax_axes_first_last": (torch_ops._softmax_op, (x, [0, 2], 0.7, mask, "")),
        "softmax_middle": (torch_ops._softmax_op, (x, [1], 1.0, None, "numpy")),
        "log_softmax_all": (torch_ops._log_softmax_op, (x, [0, 1, 2], -0.5, mask, "")),
        "log_softmax_first": (torch_ops._log_softmax_op, (x, [0], 1.0, None, "")),
        "softmax_backward": (torch_ops._softmax_backward_op, (x, y, [1], 0.7, "")),
        "log_softmax_backward": (torch_ops._log_softmax_backward_op, (x, ly, [2], 0.7, "")),
        "ce_mean_weight": (torch_ops._cross_entropy_op, (lg, t, w, -100, "mean", *ce)),
        "ce_none": (torch_ops._cross_entropy_op, (lg, t, None, -100, "none", *plain)),
        "ce_soft": (
            torch_ops._cross_entropy_op,
            (lg, q, w, -100, "sum", 0.2, 0.0, None, False, False, ""),
        ),
        "ce_softcap_lse": (
            torch_ops._cross_entropy_op,
            (lg, t, None, -100, "mean", 0.0, 0.0, 2.5, False, True, ""),
        ),
        "ce_with_grad_mean": (
            torch_ops._cross_entropy_with_grad_op,
            (lg, t, w, -100, "mean", *ce, 1.0),
        ),
        "ce_with_grad_none_scaled": (
            torch_ops._cross_entropy_with_grad_op,
            (lg, t, None, -100, "none", *plain, 3.0),
        ),
        "ce_with_grad_softcap_lse": (
            torch_ops._cross_entropy_with_grad_op,
            (lg, t, None, -100, "none", 0.1, 0.0, 4.0, False, True, "", 1.0),
        ),
        "ce_with_grad_bf16": (
            torch_ops._cross_entropy_with_grad_op,
            (lg16, t, None, -100, "sum", *plain, 1.0),
        ),
        "ce_with_grad_inplace": (
            torch_ops._cross_entropy_with_grad_inplace_op,
            (lg.detach().clone(), t, w, -100, "mean", 0.1, 0.0, None, False, False, "", 2.0),
        ),
    }


OPCHECK = _opcheck_cases()


@pytest.mark.parametrize("name", sorted(OPCHECK))
def test_opcheck(name):
    op, args = OPCHECK[name]
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_ops_are_registered():
    for name in (
        "softmax",
        "log_softmax",
        "softmax_backward",
        "log_softmax_backward",
        "cross_entropy",
        "cross_entropy_with_grad",
        "cross_entropy_with_grad_",
    ):
        assert hasattr(torch.ops.softmax_kernels, name)


# ----------------------------------------------------------------------------------------------
# torch.compile of a small model


class Net(torch.nn.Module):
    """Linear layers feeding every sk op: masked log_softmax, softmax over an axis tuple (an
    output that is not contiguous in the caller's axis order), CrossEntropyLoss in the (N, C) and
    (N, C, d) layouts with weight, label smoothing and z-loss, and soft targets."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 6, dtype=torch.float64)
        w = torch.linspace(0.5, 1.5, 6, dtype=torch.float64)
        self.ce = sk.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1, z_loss=1e-3)
        self.ce_nd = sk.nn.CrossEntropyLoss(reduction="sum")
        self.log_softmax = sk.nn.LogSoftmax(dim=-1)

    def forward(self, x, t, t_nd, mask):
        h = self.lin(x)  # (N, 6)
        lp = sk.log_softmax(h, where=mask)
        p = sk.softmax(h.view(-1, 2, 3), axis=(0, 2), scale=0.5)
        q = self.log_softmax(h * 0.3).exp().detach()
        loss = (
            self.ce(h, t)
            + 0.1 * self.ce_nd(h.view(-1, 3, 2), t_nd)
            + sk.cross_entropy(h, q, reduction="mean")
            + (p * p).sum()
            + lp.masked_fill(~mask, 0.0).mean()
        )
        return loss, lp, p


def _net_inputs(n=5, seed=10):
    x = _randn(n, 8, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.randint(0, 6, (n,), generator=g)
    t[1] = -100  # ignored row
    t_nd = torch.randint(0, 3, (n, 2), generator=g)
    mask = torch.rand((n, 6), generator=g) < 0.7
    mask[:, 0] = True
    return x, t, t_nd, mask


def _run(model, inputs):
    model.zero_grad(set_to_none=True)
    loss, lp, p = model(*inputs)
    loss.backward()
    grads = [prm.grad.clone() for prm in model.parameters()]
    return [loss.detach(), lp.detach(), p.detach()], grads


def _compare(got, want, tol):
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.stride() == b.stride() or a.dim() == 0
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def _graph_targets(counter):
    return {str(n.target) for gm in counter.graphs for n in gm.graph.nodes}


def test_compile_aot_eager_fullgraph():
    torch._dynamo.reset()
    model = Net()
    inputs = _net_inputs()
    want_out, want_grads = _run(model, inputs)
    counter = dynamo_testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    got_out, got_grads = _run(compiled, inputs)
    assert counter.frame_count == 1  # one graph: no break
    targets = _graph_targets(counter)
    for op in ("softmax", "log_softmax", "cross_entropy_with_grad"):
        assert f"softmax_kernels.{op}.default" in targets, targets
    _compare(got_out, want_out, 1e-12)
    _compare(got_grads, want_grads, 1e-12)


def test_compile_inductor_fullgraph():
    torch._dynamo.reset()
    model = Net()
    inputs = _net_inputs()
    want_out, want_grads = _run(model, inputs)
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    got_out, got_grads = _run(compiled, inputs)
    _compare(got_out, want_out, 1e-12)
    _compare(got_grads, want_grads, 1e-12)
    # new data through the same compiled code
    inputs = _net_inputs(seed=20)
    want_out, want_grads = _run(model, inputs)
    got_out, got_grads = _run(compiled, inputs)
    _compare(got_out, want_out, 1e-12)
    _compare(got_grads, want_grads, 1e-12)


def test_compile_inductor_logits_model_float32():
    """The classic head: Linear -> sk.log_softmax, and Linear -> sk.nn.CrossEntropyLoss, in
    float32, forward under no_grad (the loss-only op) and with gradients."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    lin = torch.nn.Linear(16, 11)
    loss_fn = sk.nn.CrossEntropyLoss(label_smoothing=0.05)

    def step(x, t):
        logits = lin(x)
        return loss_fn(logits, t), sk.log_softmax(logits)

    x = _randn(7, 16, seed=30, dtype=torch.float32)
    t = torch.randint(0, 11, (7,), generator=torch.Generator().manual_seed(31))
    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    with torch.no_grad():
        want = step(x, t)
        got = compiled(x, t)
    _compare(got, want, 1e-6)
    want = step(x, t)
    want[0].backward()
    want_grad = lin.weight.grad.clone()
    lin.weight.grad = None
    got = compiled(x, t)
    got[0].backward()
    _compare([g.detach() for g in got], [w.detach() for w in want], 1e-6)
    torch.testing.assert_close(lin.weight.grad, want_grad, atol=1e-6, rtol=1e-5)


def test_compile_dynamic_shapes():
    torch._dynamo.reset()
    counter = dynamo_testing.CompileCounterWithBackend("aot_eager")

    def f(x, t):
        return sk.cross_entropy(x, t, label_smoothing=0.1) + sk.softmax(x, 0, scale=2.0).sum()

    compiled = torch.compile(f, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for n in (4, 7, 9):
        x = _randn(n, 5, seed=n, requires_grad=True)
        t = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(n))
        got = compiled(x, t)
        (gx,) = torch.autograd.grad(got, x)
        x2 = x.detach().clone().requires_grad_()
        want = f(x2, t)
        (wx,) = torch.autograd.grad(want, x2)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(gx, wx, atol=1e-12, rtol=1e-12)
        frames.append(counter.frame_count)
    assert frames[0] == frames[-1]  # new batch sizes reuse the first compilation


def test_compile_public_backward_functions():
    """sk.softmax_backward / sk.log_softmax_backward on tensors trace as the custom ops. (Needs
    api.py to route torch tensors to torch_ops.)"""
    torch._dynamo.reset()
    counter = dynamo_testing.CompileCounterWithBackend("aot_eager")

    def f(dy, y, ly):
        return sk.softmax_backward(dy, y, (0, 1), scale=0.5) + sk.log_softmax_backward(dy, ly)

    x = _randn(3, 4, seed=45)
    args = (_randn(3, 4, seed=46), torch.softmax(x.flatten(), 0).view(3, 4), x.log_softmax(-1))
    got = torch.compile(f, backend=counter, fullgraph=True)(*args)
    torch.testing.assert_close(got, f(*args), atol=0, rtol=0)
    targets = _graph_targets(counter)
    assert "softmax_kernels.softmax_backward.default" in targets, targets
    assert "softmax_kernels.log_softmax_backward.default" in targets, targets


def test_compile_cross_entropy_with_grad_inplace():
    torch._dynamo.reset()

    def f(x, t):
        return sk.cross_entropy_with_grad(x, t, inplace=True, grad_scale=0.5, reduction="sum")

    x = _randn(4, 5, seed=40)
    t = torch.tensor([0, 1, 4, 2])
    want_loss, want_g = sk.cross_entropy_with_grad(x.clone(), t, grad_scale=0.5, reduction="sum")
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss, g = compiled(x, t)
    torch.testing.assert_close(loss, want_loss, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(x, want_g, atol=1e-12, rtol=1e-12)  # written into x
    torch.testing.assert_close(g, want_g, atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# CUDA: no host synchronisation, CUDA-graph capture


def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: GPU tests run under `make test-gpu`")
    try:
        dispatch.select(None, torch.zeros(1, device="cuda"))
    except sk.BackendUnavailableError as e:
        pytest.skip(f"no GPU backend: {e}")


def _cuda_model_and_inputs():
    model = Net().to("cuda", torch.float32)
    inputs = [a.cuda() for a in _net_inputs(n=64)]
    inputs[0] = inputs[0].float()
    return model, inputs


@pytest.mark.gpu
def test_cuda_ops_do_not_synchronize():
    _cuda_or_skip()
    model, inputs = _cuda_model_and_inputs()
    logits = _randn(64, 1000, seed=50, dtype=torch.bfloat16, device="cuda")
    t = torch.randint(0, 1000, (64,), device="cuda")
    q = torch.softmax(_randn(64, 1000, seed=51, device="cuda"), -1).to(torch.bfloat16)

    def work():
        loss, _, _ = model(*inputs)
        loss.backward()
        for reduction in ("mean", "sum", "none"):
            x = logits.clone().requires_grad_()
            sk.cross_entropy(x, t, reduction=reduction, weight=torch.ones(1000, device="cuda"))
            sk.cross_entropy(x, q, reduction=reduction).sum().backward()
        sk.cross_entropy_with_grad(logits.clone(), t, inplace=True, z_loss=1e-4)

    work()  # first calls compile / load kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        work()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_cuda_graph_capture_forward_backward():
    _cuda_or_skip()
    model, static = _cuda_model_and_inputs()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture (kernel compilation, allocator)
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            model(*static)[0].backward()
    torch.cuda.current_stream().wait_stream(stream)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = model(*static)[0]
        static_loss.backward()
    for seed in (60, 61):
        fresh = [a.cuda() for a in _net_inputs(n=64, seed=seed)]
        fresh[0] = fresh[0].float()
        for dst, src in zip(static, fresh, strict=True):
            dst.copy_(src)
        graph.replay()
        got_loss = static_loss.clone()
        got_grads = [p.grad.clone() for p in model.parameters()]
        eager = Net().to("cuda", torch.float32)
        eager.load_state_dict(model.state_dict())
        (want_out, want_grads) = _run(eager, fresh)
        torch.testing.assert_close(got_loss, want_out[0], atol=1e-5, rtol=1e-5)
        for a, b in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
