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


def _spawn(world, tmp_path, backend):
    import torch.multiprocessing as mp

    counts = None
    mp.spawn(run, args=(world, _free_port(), str(tmp_path), backend, counts), nprocs=world,
             join=True)  # fmt: skip
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
