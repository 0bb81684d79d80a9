"""gpuad: a minimal autodiff tape engine with fused GPU kernels."""
from .backend import get_backend, get_kernels, set_backend, set_kernels, use_backend
