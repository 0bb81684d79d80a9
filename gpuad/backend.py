"""Array backends: numpy (the CPU reference) and CuPy (the GPU).

One helper, :func:`array_module`, gives the array module of a set of arrays, so every
engine op has a single body for both backends. CuPy is imported only when first needed.
"""
from __future__ import annotations

import contextlib
import importlib
import sys

import numpy as np

BACKENDS = ("numpy", "cupy")
KERNELS = ("triton", "cupy")
_INSTALL_HINT = 'install the GPU extras with: pip install "gpuad[gpu]"'

_state = {"backend": "numpy", "kernels": "triton"}


def _import_cupy():
    """Import CuPy and check that a CUDA device is present; raise a clear error otherwise."""
    try:
        cupy = importlib.import_module("cupy")
    except ImportError as e:
        raise RuntimeError(f"the cupy backend needs CuPy, which is not installed ({e}); {_INSTALL_HINT}") from e
    if _state.get("cuda_device_seen"):  # the device check is done once, not on every tensor
        return cupy
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDA driver missing or broken
        raise RuntimeError(f"the cupy backend needs a CUDA device, and none is usable here ({e})") from e
    if n < 1:
        raise RuntimeError("the cupy backend needs a CUDA device, and none was found")
    _state["cuda_device_seen"] = True
    return cupy


def set_backend(name: str) -> None:
    """Make `name` ("numpy" or "cupy") the backend that new tensors are created on."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name == "cupy":
        _import_cupy()
    _state["backend"] = name


def get_backend() -> str:
    """The active backend's name."""
    return _state["backend"]


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("cupy"): ...`` — the previous backend comes back on exit, also on error."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        _state["backend"] = previous


def set_kernels(name: str) -> None:
    """Choose which GPU kernels the fused ops use on the cupy backend: "triton" or "cupy"."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernels {name!r}; choose one of {KERNELS}")
    _state["kernels"] = name


def get_kernels() -> str:
    return _state["kernels"]


def is_cupy_array(a) -> bool:
    return _backend_of_type(type(a)) == "cupy"


_TYPE_BACKEND = {np.ndarray: "numpy"}  # type -> "numpy", "cupy" or None, filled as types are first seen


def _backend_of_type(t) -> str | None:
    """The backend of arrays of type `t` (numpy subclasses included), cached per type: the check
    runs on every op, so it costs one dictionary lookup after the first sight of a type."""
    b = _TYPE_BACKEND.get(t, False)
    if b is False:
        b = "numpy" if issubclass(t, np.ndarray) else "cupy" if t.__module__.partition(".")[0] == "cupy" else None
        _TYPE_BACKEND[t] = b
    return b


def backend_of(a) -> str | None:
    """"numpy" or "cupy" for an array; None for Python and numpy scalars, which mix with both."""
    return _backend_of_type(type(a))


def array_module(*arrays):
    """The array module (numpy or cupy) of `arrays`; Python scalars are neutral.

    Raises TypeError naming both when arrays from two backends meet in one op."""
    seen = None
    for a in arrays:
        t = type(a)
        b = "numpy" if t is np.ndarray else _backend_of_type(t)  # the common case without a call
        if b is None or b == seen:
            continue
        if seen is not None:
            raise TypeError(f"arrays from two backends in one op: {seen} and {b}; move one with Tensor.to()")
        seen = b
    if seen == "cupy":
        return importlib.import_module("cupy")
    return np


def module_for(name: str):
    """The array module of backend `name`."""
    if name == "cupy":
        return _import_cupy()
    if name == "numpy":
        return np
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")


def kernel_module(xp, dtype=None):
    """The fused-kernel module for arrays of module `xp`: the reference on numpy, the
    Triton or CuPy kernels (``set_kernels``) on CuPy. float64 always takes the reference
    (written with the array module, it runs on CuPy too): the GPU kernels cover
    fp32 / fp16 / bf16."""
    name = "gpuad.kernels.reference" if xp is np or dtype == np.float64 else "gpuad.kernels." + get_kernels()
    module = sys.modules.get(name)  # imported already: every op's VJP asks, so skip the import machinery
    return module if module is not None else importlib.import_module(name)


def to_host(a) -> np.ndarray:
    """A numpy copy (or view) of a backend array."""
    if is_cupy_array(a):
        return a.get()
    return np.asarray(a)
