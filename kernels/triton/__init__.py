"""Triton kernels of softmax_kernels (``softmax_kernels.kernels.triton``).

- ``softmax``: ``softmax_fwd_kernel`` (softmax / log_softmax, scale, where-mask) and
  ``softmax_bwd_kernel`` (their vector-Jacobian products);
- ``cross_entropy``: ``cross_entropy_fwd_kernel`` (per-row or reduced loss, log-sum-exp and,
  fused, the gradient), ``cross_entropy_denom_kernel`` (the "mean" denominator a gradient is
  scaled by), ``cross_entropy_stats_kernel`` and ``cross_entropy_grad_kernel`` (the two halves of
  vocabulary-parallel cross-entropy);
- ``common``: the small ``@triton.jit`` helpers they share.

The launch settings (block size, warps, rows per program, strategy, grid) are chosen on the host
by ``softmax_kernels.backends.triton_backend._launch_config``. This package imports no Triton
itself, so ``import softmax_kernels.kernels.triton`` works without Triton installed; its modules
do import it.
"""
