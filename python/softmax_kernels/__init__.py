"""softmax_kernels: fused softmax, log-softmax, their backward passes, softmax + cross-entropy
and linear + cross-entropy, on CUDA C (CuPy), Triton and NumPy backends behind one API.

>>> import numpy as np, softmax_kernels as sk
>>> y = sk.softmax(np.random.default_rng(0).standard_normal((4, 10)))
>>> bool(np.allclose(y.sum(axis=-1), 1.0))
True
"""

from ._version import __version__
from .api import (
    cross_entropy,
    cross_entropy_with_grad,
    linear_cross_entropy,
    linear_cross_entropy_with_grad,
    log_softmax,
    log_softmax_backward,
    release_cpu_buffers,
    softmax,
    softmax_backward,
    softmax_jacobian,
)
from .dispatch import available_backends
from .errors import BackendUnavailableError

__all__ = [
    "__version__",
    "BackendUnavailableError",
    "available_backends",
    "cross_entropy",
    "cross_entropy_with_grad",
    "linear_cross_entropy",
    "linear_cross_entropy_with_grad",
    "log_softmax",
    "log_softmax_backward",
    "release_cpu_buffers",
    "softmax",
    "softmax_backward",
    "softmax_jacobian",
]


def __getattr__(name):
    # sk.nn needs torch: import it on first use so the package imports without torch. (It is
    # not in __all__, so `from softmax_kernels import *` works without torch too.)
    if name == "nn":
        import importlib

        # not `from . import nn`: its hasattr(package, "nn") would call this function again
        return importlib.import_module(".nn", __name__)
    raise AttributeError(f"module 'softmax_kernels' has no attribute {name!r}")
