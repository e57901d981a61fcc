"""``python -m softmax_kernels info``: version, backends (and why one is unavailable), the
versions of the array libraries, and the GPU."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys

_ENV_HELP = {
    "SOFTMAX_KERNELS_BACKEND": "(the backend used when backend=None; empty: automatic)",
    "TRITON_INTERPRET": "(1: Triton kernels run through the interpreter on CPU tensors)",
    "SOFTMAX_KERNELS_CPU_JIT": "(0: the NumPy backend never uses its compiled CPU kernels)",
}


def _version(mod: str) -> str:
    try:
        return importlib.import_module(mod).__version__
    except Exception as e:  # not installed, or broken: say which
        return f"not available ({type(e).__name__}: {e})".splitlines()[0][:100]


def _gpu() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(torch.cuda.current_device())
            return (
                f"{p.name} (compute capability {p.major}.{p.minor}, {p.multi_processor_count} "
                f"SMs, {p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
            )
    except Exception:
        pass
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            p = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
            return p["name"].decode()
    except Exception:
        pass
    return "none found"


def info() -> str:
    from . import __version__
    from .dispatch import backend_status

    lines = [f"softmax-kernels {__version__} (Python {platform.python_version()})", "backends:"]
    for name, reason in backend_status().items():
        lines.append(
            f"  {name:7s} " + ("available" if reason is None else f"unavailable: {reason}")
        )
    lines.append("libraries:")
    for mod in ("numpy", "scipy", "torch", "triton", "cupy"):
        lines.append(f"  {mod:7s} {_version(mod)}")
    from .backends import numpy_backend

    lines.append(f"CPU kernels (numpy backend): {numpy_backend.cpu_path()}")
    lines.append("environment:")
    for var in ("SOFTMAX_KERNELS_BACKEND", "TRITON_INTERPRET", "SOFTMAX_KERNELS_CPU_JIT"):
        lines.append(f"  {var}={os.environ.get(var, '')!s:<8} " + _ENV_HELP[var])
    lines.append(f"GPU: {_gpu()}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m softmax_kernels")
    parser.add_argument("command", choices=["info"], help="what to print")
    parser.parse_args(argv)
    print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
