"""The backend test matrix.

Every backend-parametrised test takes a ``target``: a backend name plus the array kind and
device it serves. The matrix holds

- numpy on NumPy arrays and on torch CPU tensors (always; the CI path);
- triton on torch CPU tensors through the interpreter (when TRITON_INTERPRET=1, as `make test`
  sets it);
- triton and cupy on torch CUDA tensors and CuPy arrays (marked ``gpu``; they skip with the
  reason when there is no GPU or the backend is unavailable).

Tests that take ``dtype`` get only the dtypes the target's array kind has (bfloat16 exists
in torch only), so no case is generated that would have to be skipped.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import pytest

ALL_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def _cuda_reason() -> str | None:
    if not _has("torch"):
        return "torch is not installed"
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU on this machine"


@dataclass(frozen=True)
class Target:
    backend: str
    kind: str  # "numpy", "torch" or "cupy"
    device: str  # "cpu" or "cuda"
    pure: bool = False  # numpy backend: its pure NumPy kernels (SOFTMAX_KERNELS_CPU_JIT=0)

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.kind}-{self.device}" + ("-pure" if self.pure else "")

    @property
    def dtypes(self) -> tuple[str, ...]:
        return ALL_DTYPES if self.kind == "torch" else ("float16", "float32", "float64")

    def array(self, a, dtype: str | None = None):
        """A NumPy array as this target's kind, device and dtype (bool/int kept as they are)."""
        a = np.asarray(a)
        if self.kind == "numpy":
            return a.astype(dtype) if dtype else a.copy()
        if self.kind == "torch":
            import torch

            t = torch.from_numpy(np.array(a, order="C", copy=True))
            if dtype:
                t = t.to(getattr(torch, dtype))
            return t.to(self.device)
        import cupy

        return cupy.asarray(a.astype(dtype) if dtype else a)

    def copy(self, a):
        return a.clone() if self.kind == "torch" else a.copy()

    def equal(self, a, b) -> bool:
        """Bitwise equality (NaNs in the same places count as equal)."""
        from reference import to_numpy64

        return np.array_equal(to_numpy64(a), to_numpy64(b), equal_nan=True)

    def kind_of(self, a) -> bool:
        return type(a).__module__.split(".")[0] == self.kind


def _targets():
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    gpu = pytest.mark.gpu
    # The NumPy backend runs its compiled CPU kernels (numba) when numba is installed; the
    # "-pure" targets run its pure NumPy kernels, the fallback (both on NumPy arrays; torch CPU
    # tensors take the same code after a zero-copy view).
    out = [
        pytest.param(Target("numpy", "numpy", "cpu"), id="numpy-numpy-cpu"),
        pytest.param(Target("numpy", "torch", "cpu"), id="numpy-torch-cpu"),
    ]
    if _has("numba"):
        out.append(
            pytest.param(Target("numpy", "numpy", "cpu", pure=True), id="numpy-numpy-cpu-pure")
        )
    triton_cpu_skip = None
    if not _has("triton"):
        triton_cpu_skip = "triton is not installed"
    elif not interp:
        triton_cpu_skip = "triton on CPU tensors needs TRITON_INTERPRET=1 (make test sets it)"
    out.append(
        pytest.param(
            Target("triton", "torch", "cpu"),
            id="triton-torch-cpu",
            marks=[pytest.mark.skip(reason=triton_cpu_skip)] if triton_cpu_skip else [],
        )
    )
    cuda_reason = _cuda_reason()
    if interp and cuda_reason is None:
        cuda_reason = "TRITON_INTERPRET=1 is set: GPU tests run under `make test-gpu`"
    for backend, kind, need in (
        ("triton", "torch", "triton"),
        ("triton", "cupy", "cupy"),
        ("cupy", "cupy", "cupy"),
        ("cupy", "torch", "cupy"),
    ):
        reason = cuda_reason or (None if _has(need) else f"{need} is not installed")
        marks = [gpu] + ([pytest.mark.skip(reason=reason)] if reason else [])
        out.append(pytest.param(Target(backend, kind, "cuda"), id=f"{backend}-{kind}-cuda",
                                marks=marks))  # fmt: skip
    return out


TARGETS = _targets()


def pytest_generate_tests(metafunc):
    if "target" not in metafunc.fixturenames:
        return
    if "dtype" in metafunc.fixturenames:
        params = []
        for p in TARGETS:
            t = p.values[0]
            for dt in t.dtypes:
                params.append(pytest.param(t, dt, id=f"{p.id}-{dt}", marks=p.marks))
        metafunc.parametrize(("target", "dtype"), params)
    else:
        metafunc.parametrize("target", TARGETS)


@pytest.fixture(autouse=True)
def _cpu_path(request, monkeypatch):
    """A "-pure" target switches the NumPy backend's compiled kernels off for its test."""
    callspec = getattr(request.node, "callspec", None)
    target = callspec.params.get("target") if callspec is not None else None
    if isinstance(target, Target) and target.pure:
        monkeypatch.setenv("SOFTMAX_KERNELS_CPU_JIT", "0")


@pytest.fixture
def rng(request):
    """Fresh random data per test (seeded by the test's name so a failure reproduces)."""
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
