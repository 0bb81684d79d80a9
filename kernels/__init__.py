"""Fused kernels of gpuad, installed as ``gpuad.kernels``.

- ``gpuad.kernels.reference``: numpy (and, written with the array module, CuPy) ground truth;
- ``gpuad.kernels.triton``: Triton kernels for torch tensors and CuPy arrays;
- ``gpuad.kernels.cupy``: CUDA C kernels compiled through CuPy.

All three expose ``softmax_cross_entropy`` and ``linear_backward`` with the same signature
and semantics. Importing this package imports none of torch, triton or cupy.
"""
if __name__ != "gpuad.kernels":
    raise ImportError(f"the kernels are the package gpuad.kernels: import gpuad.kernels, not {__name__}")
