"""Triton kernels of softmax_kernels (``softmax_kernels.kernels.triton``).

- ``softmax``: ``softmax_fwd_kernel`` (softmax / log_softmax, scale, where-mask) and
  ``softmax_bwd_kernel`` (their vector-Jacobian products);
- ``cross_entropy``: ``cross_entropy_fwd_kernel`` (per-row loss and, fused, the gradient);
- ``common``: the small ``@triton.jit`` helpers they share.

The launch settings (block size, warps, rows per program, strategy, grid) are chosen on the host
by ``softmax_kernels.backends.triton_backend._launch_config``. This package imports no Triton
itself, so ``import softmax_kernels.kernels.triton`` works without Triton installed; its modules
do import it.
"""
