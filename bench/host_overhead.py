"""python -m bench --host-overhead [--calls N]: the host (CPU) time of one public call of each
launcher, on a machine with or without a GPU.

Triton launchers run their real Python and Triton launch path: JITFunction.run binding and
specialising the arguments, its kernel cache, the compiled kernel's Python launcher; kernels are
compiled for sm_90 ahead of time (the first call, then Triton's cache). Only the driver is a stub
(StubDriver): its current device and stream are 0 and its C launch function, which would hand the
kernel to CUDA, does nothing. The tensors are CPU tensors, so torch's allocations are the CPU
allocator's, and a launcher's torch ops (the LM head's GEMMs) compute on the CPU: its shape is
kept small. The CuPy launchers run gpuad's own launcher code over a stand-in for CuPy whose
arrays are numpy arrays and whose kernel calls, GEMMs included, do nothing; the line says so.

Each line: ``host-overhead <launcher> <shape> <us> us/call``, the median over rounds of the mean
CPU time of many back-to-back calls. Run it with TRITON_INTERPRET unset (the interpreter never
compiles); the Triton launchers' cached per-problem plans make the calls after the first skip
JITFunction.run (interop.Launch).
"""
from __future__ import annotations

import contextlib
import importlib.util
import statistics
import sys
import time
import types

GPU_ARCH = 90
MAX_SHARED = 232448  # bytes of shared memory a block may use on sm_90


#: Launches the stub driver was handed, and the arguments of the last (read by the tests).
launches = [0]
last_launch = [()]


def _stub_launch(*args) -> None:
    """The driver's kernel launch: counted, nothing reaches a GPU."""
    launches[0] += 1
    last_launch[0] = args


class _StubUtils:
    launch = staticmethod(_stub_launch)

    @staticmethod
    def build_signature_metadata(signature):
        return tuple(signature)

    @staticmethod
    def load_binary(name, kernel, shared, device):
        return 0, 0, 0, 0, 1024  # module, function, registers, spills, max threads a block

    @staticmethod
    def get_device_properties(device):
        return {"max_shared_mem": MAX_SHARED, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 0, "mem_clock_rate": 0, "mem_bus_width": 0}


class StubDriver:
    """Triton's CUDA driver with device, stream and kernel launch stubbed (see the module docstring)."""

    def __init__(self):
        from triton.backends.nvidia.driver import CudaLauncher

        self.utils = _StubUtils()
        self.launcher_cls = CudaLauncher

    @staticmethod
    def is_active():
        return True

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", GPU_ARCH, 32)

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=None):
        return divmod(GPU_ARCH, 10)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)


@contextlib.contextmanager
def stub_driver():
    """Triton's active driver is a StubDriver and the launchers take CPU tensors, for the block."""
    import triton
    import triton.backends.nvidia.driver as nv

    from gpuad.kernels.triton import interop

    saved = {name: getattr(nv, name) for name in ("compile_module_from_src", "library_dirs", "PyKernelArg")
             if hasattr(nv, name)}
    if saved.get("PyKernelArg", 0) is None:  # triton ≥ 3.7 annotates arguments with its C module's types
        nv.PyKernelArg = lambda nested_tuple, type: (type, nested_tuple)
    if "compile_module_from_src" in saved:  # triton < 3.7 builds a C launcher per kernel: stub its launch
        nv.compile_module_from_src = lambda *a, **k: types.SimpleNamespace(launch=_stub_launch)
        nv.library_dirs = lambda: []
    had_cpu = "cpu" in interop.DEVICE_TYPES
    interop.DEVICE_TYPES.add("cpu")
    triton.runtime.driver.set_active(StubDriver())
    try:
        yield
    finally:
        triton.runtime.driver._active = None  # back to the default driver, created when next asked for
        for name, value in saved.items():
            setattr(nv, name, value)
        if not had_cpu:
            interop.DEVICE_TYPES.discard("cpu")


def per_call_us(fn, calls: int = 200, rounds: int = 15) -> float:
    """Median over `rounds` of the mean CPU time of this thread over `calls` back-to-back calls
    of fn(), in µs (CPU time: on a shared machine, time spent waiting for a core is left out)."""
    fn()
    means = []
    for _ in range(rounds):
        t0 = time.thread_time()
        for _ in range(calls):
            fn()
        means.append((time.thread_time() - t0) / calls * 1e6)
    return statistics.median(means)


def _triton_cases():
    """[(launcher, shape, no-argument call)] of the Triton launchers (CPU tensors)."""
    import torch

    from gpuad.kernels import triton as kt

    bf16 = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(s, generator=g).to(bf16) for s in ((256, 1024), (1024, 1024), (256, 1024)))
    logits = torch.randn(64, 50257, generator=g).to(bf16)
    targets = torch.randint(0, 50257, (64,), generator=g)
    hx, hw = torch.randn(16, 64, generator=g), torch.randn(256, 64, generator=g)
    ht = torch.randint(0, 256, (16,), generator=g)
    return [
        ("triton.linear_backward", "256x1024->1024 bf16 (fused)",
         lambda: kt.linear_backward(x, w, dy)),
        ("triton.softmax_cross_entropy", "64x50257 bf16 mean check_targets=False",
         lambda: kt.softmax_cross_entropy(logits, targets, check_targets=False)),
        ("triton.linear_cross_entropy", "16x64->256 fp32 check_targets=False (its 3 GEMMs run on the CPU)",
         lambda: kt.linear_cross_entropy(hx, hw, ht, check_targets=False)),
    ]


def lines(calls: int = 200, rounds: int = 15, cases=None) -> list[str]:
    """The host-overhead lines of every launcher (see the module docstring)."""
    from gpuad.kernels.triton import interop

    if interop.INTERPRETED:
        raise RuntimeError("the host overhead is that of the compiled launch path: unset TRITON_INTERPRET")
    out = []
    with stub_driver():
        for name, shape, fn in cases if cases is not None else _triton_cases():
            out.append(f"host-overhead {name} {shape} {per_call_us(fn, calls, rounds):.1f} us/call")
    if cases is None:
        from . import host_overhead_cupy

        if "cupy" in sys.modules or importlib.util.find_spec("cupy") is not None:
            out += [f"host-overhead {name} - not measured: CuPy is installed (the stand-in would shadow it)"
                    for name in ("cupy.linear_backward", "cupy.softmax_cross_entropy")]
            return out
        with host_overhead_cupy.stub_cupy() as cp:
            for name, shape, fn in host_overhead_cupy.cases(cp):
                out.append(f"host-overhead {name} {shape} {per_call_us(fn, calls, rounds):.1f} us/call")
    return out


def main(calls: int = 200) -> int:
    import torch

    torch.set_num_threads(1)  # the CPU GEMMs of the LM head: one thread, as the host's own work
    for line in lines(calls):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
