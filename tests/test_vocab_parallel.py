"""Vocabulary-parallel cross-entropy over torch.distributed (gloo on the CPU, loopback only):
1 to 4 processes, equal, uneven and padded shards, every CE option, against the dense float64
reference on the gathered logits (tests/vp_worker.py), plus the merge and errors in-process."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

import softmax_kernels as sk  # noqa: E402

from vp_worker import run, shard_bounds  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world, tmp_path, backend, device="cpu"):
    import torch.multiprocessing as mp

    counts = None
    mp.spawn(run, args=(world, _free_port(), str(tmp_path), backend, counts, device),
             nprocs=world, join=True)  # fmt: skip
    failures = []
    for r in range(world):
        text = (tmp_path / f"rank{r}.txt").read_text()
        if text.strip():
            failures.append(f"rank {r}:\n{text}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_vocab_parallel_gloo_numpy_backend(world, tmp_path):
    _spawn(world, tmp_path, "numpy")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_vocab_parallel_gloo_triton_interpreter(tmp_path):
    # the Triton backend's statistics and gradient kernels, through the interpreter
    pytest.importorskip("triton")
    _spawn(2, tmp_path, "triton")


def _gpu_reason(need: str) -> str | None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set: GPU tests run under `make test-gpu`"
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    try:
        __import__(need)
    except ImportError:
        return f"{need} is not installed"
    return None


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_vocab_parallel_nccl(backend, tmp_path):
    # every case of vp_worker on CUDA tensors, one GPU per rank, NCCL
    reason = _gpu_reason(backend)
    if reason is None and torch.cuda.device_count() < 2:
        reason = "NCCL runs need at least 2 GPUs"
    if reason is None and not dist.is_nccl_available():
        reason = "torch was built without NCCL"
    if reason:
        pytest.skip(reason)
    _spawn(min(4, torch.cuda.device_count()), tmp_path, backend, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("soft", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_stats_mode_on_one_gpu(backend, soft):
    """With one GPU: the backend's statistics mode (what each rank computes before the
    all-gather) on CUDA shards against the NumPy backend's float64 statistics, for shards that
    own the target or not, an ignored row (every row is read), label smoothing and weights."""
    reason = _gpu_reason(backend)
    if reason:
        pytest.skip(reason)
    import importlib

    from softmax_kernels.backends import numpy_backend as nb

    gb = importlib.import_module(f"softmax_kernels.backends.{backend}_backend")
    rng = np.random.default_rng(5)
    rows, V = 6, 70001  # a long row: the GPU backends' long-row strategies
    full = rng.standard_normal((rows, V)) * 3
    w = rng.random(V) + 0.25
    if soft:
        t = rng.dirichlet(np.ones(V), size=rows)
    else:
        t = rng.integers(0, V, size=rows)
        t[1] = -100
        t[2] = 100  # owned by the shard starting at 50
    for vs, n in ((0, V // 2), (50, V - 50)):
        shard, wsh = full[:, vs : vs + n], np.ascontiguousarray(w[vs : vs + n])
        tsh = np.ascontiguousarray(t[:, vs : vs + n]) if soft else t
        kw = dict(soft=soft, ignore_index=-100, vocab_start=vs, label_smoothing=0.1,
                  softcap=None)  # fmt: skip
        k = 5
        want = np.zeros((rows, k))
        nb.cross_entropy_stats(np.ascontiguousarray(shard), tsh, want, weight=wsh, **kw)
        for dt, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            x = torch.tensor(shard, dtype=dt, device="cuda")
            tg = torch.tensor(tsh, dtype=dt if soft else torch.int64, device="cuda")
            st = torch.full((rows, k), 7.0, dtype=dt, device="cuda")
            gb.cross_entropy_stats(x, tg, st, weight=torch.tensor(wsh, dtype=dt, device="cuda"),
                                   **kw)  # fmt: skip
            np.testing.assert_allclose(st.cpu().numpy(), want, rtol=tol, atol=tol * 10,
                                       err_msg=f"{backend} {dt} shard at {vs}")  # fmt: skip


def test_shard_layouts():
    assert shard_bounds(1001, 3, "uneven") == [(0, 334), (334, 334), (668, 333)]
    assert shard_bounds(37, 4, "padded") == [(0, 10), (10, 10), (20, 10), (30, 7)]


def test_process_group_needs_torch_tensors():
    x = np.zeros((2, 3))
    with pytest.raises(TypeError, match="process_group= needs torch tensors"):
        sk.cross_entropy(x, np.array([0, 1]), process_group=object())


def test_vocab_start_needs_a_process_group():
    with pytest.raises(ValueError, match="vocab_start is only meaningful"):
        sk.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), vocab_start=3)
    with pytest.raises(ValueError, match="vocab_start is only meaningful"):
        sk.cross_entropy(np.zeros((2, 3)), np.array([0, 1]), vocab_start=3)


def test_not_initialized_is_a_clear_error():
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises((RuntimeError, ValueError)):
        sk.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), process_group=_FakeGroup())


class _FakeGroup:
    group_name = "no-such-group"
