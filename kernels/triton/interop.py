"""What the Triton launchers share on the torch side: the zero-copy hand-off between CuPy arrays
and torch tensors, the device they run on, and whether Triton interprets the kernels."""
from __future__ import annotations

import functools
import os

import torch

from gpuad.backend import is_cupy_array

#: Triton runs the kernels in its interpreter on CPU tensors: TRITON_INTERPRET=1 when the
#: kernels are defined (tests/conftest.py sets it where there is no CUDA device)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def as_torch(a):
    """(torch tensor, from_cupy): CuPy arrays go through DLPack without a copy."""
    if isinstance(a, torch.Tensor):
        return a, False
    if is_cupy_array(a):
        return torch.from_dlpack(a), True
    raise TypeError(f"expected a torch tensor or a CuPy array, got {type(a).__name__}")


def as_given(t, from_cupy: bool):
    """Return `t` in the type the caller gave: a CuPy array when the input was one."""
    if t is None or not from_cupy:
        return t
    import cupy

    return cupy.from_dlpack(t)


@functools.lru_cache(maxsize=None)
def device_info(device: torch.device) -> tuple:
    """(GPU name or None, streaming multiprocessors): the interpreter gets a nameless GPU of 4 SMs."""
    if device.type != "cuda":
        return None, 4
    props = torch.cuda.get_device_properties(device)
    return props.name, props.multi_processor_count
