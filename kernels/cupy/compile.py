"""Load a CUDA C source that lies next to this file and compile it through ``cupy.RawModule``.

One constant, :data:`NVRTC_OPTIONS`, is everything the launchers pass to NVRTC (CuPy adds the
``-arch`` of the current device itself). The test suite compiles the same sources with ``nvcc``
using :func:`nvcc_options`, derived from that constant, so a kernel that does not compile
cannot land. Compiled modules are cached per (file, device). CuPy is imported only when a
kernel is requested.
"""
from __future__ import annotations

import functools
import pathlib
import threading

HERE = pathlib.Path(__file__).resolve().parent

#: The dtypes the CUDA C kernels take, and the suffix of each in a kernel's name
SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}

#: Options given to NVRTC for every source in this folder (no -arch: CuPy adds the device's).
NVRTC_OPTIONS: tuple[str, ...] = ("--std=c++17",)

# NVRTC spelling -> nvcc spelling, for the options that differ; None drops an NVRTC-only flag.
_NVCC_SPELLING = {
    "--std=c++17": "-std=c++17",
    "-default-device": None,
    "--device-as-default-execution-space": None,
}

_modules: dict = {}
_functions: dict = {}
_lock = threading.Lock()


def nvcc_options(options=NVRTC_OPTIONS) -> list[str]:
    """The nvcc command-line options equivalent to the NVRTC `options`."""
    out = []
    for opt in options:
        mapped = _NVCC_SPELLING.get(opt, opt)
        if mapped is not None:
            out.append(mapped)
    return out


PRELUDE = "common.cuh"


@functools.lru_cache(maxsize=None)
def source(filename: str) -> str:
    """The text compiled for `filename` in this folder: the shared prelude (types and fp16 /
    bf16 conversions), then the file."""
    return (HERE / PRELUDE).read_text() + "\n" + (HERE / filename).read_text()


def get_module(filename: str):
    """The ``cupy.RawModule`` of `filename`, compiled once per (file, current device)."""
    import cupy

    key = (filename, cupy.cuda.runtime.getDevice())
    module = _modules.get(key)
    if module is None:
        with _lock:
            module = _modules.get(key)
            if module is None:
                module = cupy.RawModule(code=source(filename), options=NVRTC_OPTIONS)
                module.compile()
                _modules[key] = module
    return module


def get_function(filename: str, name: str):
    """The kernel `name` (an ``extern "C"`` symbol) of `filename`, for the current device."""
    import cupy

    key = (filename, cupy.cuda.runtime.getDevice(), name)
    function = _functions.get(key)
    if function is None:
        function = _functions[key] = get_module(filename).get_function(name)
    return function
