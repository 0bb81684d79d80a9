"""What the Triton launchers share on the torch side: the zero-copy hand-off between CuPy arrays
and torch tensors, the device they run on, and whether Triton interprets the kernels."""
from __future__ import annotations

import functools
import os

import torch
import triton
from triton import knobs

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


try:
    _raw_stream = torch._C._cuda_getCurrentRawStream  # what Triton's launcher itself asks
except AttributeError:  # pragma: no cover - another torch
    def _raw_stream(index):
        return torch.cuda.current_stream(index).cuda_stream


def current_stream(device) -> int:
    """The raw handle of torch's current stream on a CUDA `device` (0 on the CPU)."""
    return _raw_stream(device.index) if device.type == "cuda" else 0


@functools.lru_cache(maxsize=None)
def device_info(device: torch.device) -> tuple:
    """(GPU name or None, streaming multiprocessors): the interpreter gets a nameless GPU of 4 SMs."""
    if device.type != "cuda":
        return None, 4
    props = torch.cuda.get_device_properties(device)
    return props.name, props.multi_processor_count


#: The device types the launchers take: CUDA, and the CPU where Triton interprets the kernels.
#: bench.host_overhead adds "cpu" while it runs the compiled launch path over a stub driver.
DEVICE_TYPES = {"cuda", "cpu"} if INTERPRETED else {"cuda"}


def check_device(device) -> None:
    """ValueError unless the launchers can run on `device` (see DEVICE_TYPES)."""
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {device}")


class Launch:
    """One kernel launch of a fixed problem, bound once: `kernel[grid](*args, **meta)` through
    Triton's JITFunction.run on the first call (binding, specialisation, compile), then the
    compiled kernel's launcher directly with the same argument list, without Triton's per-call
    binding and specialisation key. Every argument but the tensors at the positions `check`
    (the caller's inputs) is fixed for the life of the Launch (part of the plan's key: shapes,
    strides, scalars) or a buffer torch allocated (16-byte aligned); the `check` tensors are
    tested per call for the 16-byte alignment the compile assumed, and a call they fail goes
    through Triton, as does every call under the interpreter or with a launch hook set (a
    profiler's), and every call when the first had a misaligned pointer."""

    __slots__ = ("kernel", "grid", "meta", "check", "compiled", "stream", "device")

    def __init__(self, kernel, grid: tuple, meta: dict, check: tuple):
        self.kernel, self.grid, self.meta, self.check = kernel, tuple(grid) + (1,) * (3 - len(grid)), meta, check
        self.compiled = None

    def _bind(self, args, compiled) -> None:
        """Keep the compiled kernel's launcher if later calls may take it (see the class)."""
        params = getattr(self.kernel, "params", None)
        if INTERPRETED or params is None or not hasattr(compiled, "packed_metadata"):
            return
        names = [p.name for p in params[len(args):]]
        if any(n not in self.meta for n in names) or any(
                isinstance(a, torch.Tensor) and a.data_ptr() % 16 for a in args):
            return
        tail = tuple(self.meta[n] for n in names)  # the constexprs, which the launcher skips
        drv = triton.runtime.driver.active
        self.device, self.stream = drv.get_current_device(), drv.get_current_stream
        self.compiled = direct_launch(compiled, self.grid, tail) or functools.partial(
            _through_launcher, compiled, self.grid, tail)

    def __call__(self, *args) -> None:
        launch = self.compiled
        if launch is not None and _no_launch_hook():
            for i in self.check:
                if args[i].data_ptr() & 15:
                    break
            else:
                launch(self.stream(self.device), args)
                return
        compiled = self.kernel[self.grid](*args, **self.meta)
        if launch is None:
            self._bind(args, compiled)


def _through_launcher(compiled, grid, tail, stream, args) -> None:
    """A launch through the compiled kernel's Python launcher (as JITFunction.run makes it)."""
    compiled.run(*grid, stream, compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)


def direct_launch(compiled, grid: tuple, tail: tuple):
    """f(stream, args) calling the C launch function of an NVIDIA compiled kernel's launcher with
    what that launcher's __call__ would pass it for (*args, *tail) on `grid`, where that call does
    nothing else (no global or profile scratch, no sanitizer); else None. The argument lists of
    Triton 3.7+ (annotated, args as one tuple) and of earlier versions are both handled."""
    run = compiled.run
    if type(run).__name__ != "CudaLauncher" or getattr(run, "gsan_enabled", False) or getattr(
            run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1):
        return None
    c_launch, function, packed = run.launch, compiled.function, compiled.packed_metadata
    coop, pdl = run.launch_cooperative_grid, run.launch_pdl
    g0, g1, g2 = grid
    if hasattr(run, "arg_annotations"):
        annotations, signature = run.arg_annotations, run.kernel_signature

        def launch(stream, args):
            c_launch(g0, g1, g2, stream, function, coop, pdl, packed, None, None, None, None, None, annotations,
                     signature, args + tail)
    else:
        def launch(stream, args):
            c_launch(g0, g1, g2, stream, function, coop, pdl, None, None, packed, None, None, None, *args, *tail)
    return launch


_RUNTIME = knobs.runtime
_HookChain = getattr(knobs, "HookChain", ())


def _no_launch_hook() -> bool:
    """Whether no launch hook (a profiler's) is installed: Triton's hook chains are empty."""
    enter, leave = _RUNTIME.launch_enter_hook, _RUNTIME.launch_exit_hook
    return not ((enter.calls if type(enter) is _HookChain else enter)
                or (leave.calls if type(leave) is _HookChain else leave))
