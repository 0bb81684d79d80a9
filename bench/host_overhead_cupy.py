"""The CuPy launchers' host time without CuPy or a GPU: gpuad's own launcher code (checks, kernel
choice, allocations, gpuad's kernel cache) over a stand-in `cupy` module whose arrays are numpy
arrays and whose kernel calls and GEMMs do nothing (``stub_cupy``). What CuPy itself costs on a
real call (its allocator, argument packing, cuLaunchKernel, cuBLAS) is left out; the lines say so.
"""
from __future__ import annotations

import contextlib
import sys
import types

import numpy as np

NOTE = "(gpuad's launcher code over a numpy stand-in for CuPy: CuPy's allocator, launches and cuBLAS not included)"
#: Kernel calls the stand-in was handed: (kernel name, grid, block) (read by the tests).
launched: list = []


class _Device:
    id = 0
    compute_capability = "90"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class ndarray(np.ndarray):
    """A numpy array that gpuad takes for a CuPy array (see stub_cupy)."""

    @property
    def device(self):
        return _Device()

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


def _as(a):
    return a.view(ndarray)


class _RawModule:
    """cupy.RawModule: compiles nothing; its functions take (grid, block, args) and only note the call."""

    def __init__(self, code=None, options=()):
        pass

    def compile(self):
        pass

    def get_function(self, name):
        return lambda grid, block, args, **kw: launched.append((name, grid, block))


def _module() -> dict:
    """{module name: module} of the stand-in."""
    cp = types.ModuleType("cupy")
    cp.ndarray, cp.float32, cp.int64, cp.RawModule = ndarray, np.float32, np.int64, _RawModule
    cp.empty = lambda shape, dtype=np.float32: _as(np.empty(shape, dtype))
    cp.empty_like = lambda a: _as(np.empty_like(a))
    cp.zeros = lambda shape, dtype=np.float32: _as(np.zeros(shape, dtype))
    cp.full = lambda shape, value, dtype=np.float32: _as(np.full(shape, value, dtype))
    cp.ascontiguousarray = lambda a, dtype=None: _as(np.ascontiguousarray(a, dtype=dtype))
    cp.matmul = lambda a, b: _as(np.empty(a.shape[:-1] + b.shape[-1:], np.result_type(a, b)))  # a GEMM: not run
    cuda = types.ModuleType("cupy.cuda")
    cuda.runtime = types.SimpleNamespace(
        getDevice=lambda: 0, getDeviceProperties=lambda i: {"name": b"CuPy stub", "multiProcessorCount": 132})
    cuda.Device = _Device
    cuda.get_current_stream = lambda: types.SimpleNamespace(ptr=0)
    cuda.device = types.SimpleNamespace(get_cublas_handle=lambda: 0)
    cp.cuda = cuda
    core = types.ModuleType("cupy._core")
    linalg = types.ModuleType("cupy._core._routines_linalg")
    linalg.COMPUTE_TYPE_FP32, linalg.COMPUTE_TYPE_TF32 = 1, 2
    linalg.get_compute_type = lambda dtype: 1
    linalg.set_compute_type = lambda dtype, value: None
    core._routines_linalg, cp._core = linalg, core
    return {"cupy": cp, "cupy.cuda": cuda, "cupy._core": core, "cupy._core._routines_linalg": linalg}


@contextlib.contextmanager
def stub_cupy():
    """`import cupy` gives the stand-in and gpuad takes its arrays for CuPy arrays, for the block."""
    from gpuad import backend
    from gpuad.kernels.cupy import compile as cupy_compile

    modules = _module()
    if any(name in sys.modules for name in modules):
        raise RuntimeError("CuPy is imported: the stand-in would shadow it")
    sys.modules.update(modules)
    backend._TYPE_BACKEND[ndarray] = "cupy"
    try:
        yield modules["cupy"]
    finally:
        for name in modules:
            del sys.modules[name]
        del backend._TYPE_BACKEND[ndarray]
        cupy_compile._modules.clear()  # the stand-in's modules and functions
        cupy_compile._functions.clear()


def cases(cp):
    """[(launcher, shape, no-argument call)] of the CuPy launchers over the stand-in `cp`."""
    from gpuad.kernels import cupy as kc

    rng = np.random.default_rng(0)
    x, w, dy = (_as(rng.standard_normal(s).astype(np.float16)) for s in ((256, 1024), (1024, 1024), (256, 1024)))
    logits = _as(rng.standard_normal((64, 50257)).astype(np.float16))
    targets = _as(rng.integers(0, 50257, 64))
    return [
        ("cupy.linear_backward", f"256x1024->1024 fp16 {NOTE}", lambda: kc.linear_backward(x, w, dy)),
        ("cupy.softmax_cross_entropy", f"64x50257 fp16 mean check_targets=False {NOTE}",
         lambda: kc.softmax_cross_entropy(logits, targets, check_targets=False)),
    ]
