"""Triton kernels: torch tensors (CUDA, or CPU under TRITON_INTERPRET=1) and CuPy arrays."""
from .cross_entropy import softmax_cross_entropy
from .linear_backward import linear_backward
from .linear_cross_entropy import linear_cross_entropy  # the fused LM head

__all__ = ["softmax_cross_entropy", "linear_backward"]
__all__ += ["linear_cross_entropy"]
