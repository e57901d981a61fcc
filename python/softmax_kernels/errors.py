"""Exceptions raised by softmax_kernels."""

from __future__ import annotations

__all__ = ["BackendUnavailableError"]


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot serve this input on this machine.

    The message says why (missing package, no GPU, wrong array kind) and how to fix it.
    """
