"""Backends: numpy_backend (CPU reference), triton_backend, cupy_backend (CUDA C via CuPy).

The interface each one provides is described in ``softmax_kernels.dispatch``.
"""
