"""torch's global precision flags pinned for a cuBLAS call: within ``pinned_fp32_accumulation``
torch's matmuls accumulate in fp32 (TF32 for fp32 inputs only when asked, no reduced-precision
reductions, no fp16 accumulation), and the flags are restored after. Shared by the cuBLAS route
of ``linear_backward`` and the GEMMs of the LM head. Global torch state: not thread-safe.
"""
from __future__ import annotations

import contextlib
import functools

import torch


def _reduction_flag(name):
    """(getter, setter) of one of torch's reduced-precision reduction flags, as plain bools."""
    getter = getattr(torch._C, f"_get_cublas_allow_{name}_reduced_precision_reduction")
    setter = getattr(torch._C, f"_set_cublas_allow_{name}_reduced_precision_reduction")
    if isinstance(getter(), tuple):  # torch >= 2.8: (allow, allow_splitk)
        return lambda: getter()[0], lambda on: setter(on, getter()[1])
    return getter, setter


@functools.lru_cache(maxsize=None)
def _precision_flags(dtype: torch.dtype) -> tuple:
    """((getter, setter, value for fp32 accumulation), ...) of the global torch flags that can take a
    cuBLAS matmul of `dtype` away from fp32 accumulation (TF32: _tf32_state and _set_tf32)."""
    if dtype == torch.float16:
        flags = [(*_reduction_flag("fp16"), False)]
        if hasattr(torch._C, "_get_cublas_allow_fp16_accumulation"):
            flags.append((torch._C._get_cublas_allow_fp16_accumulation,
                          torch._C._set_cublas_allow_fp16_accumulation, False))
        return tuple(flags)
    if dtype == torch.bfloat16:
        return ((*_reduction_flag("bf16"), False),)
    return ()


def _fp32_precision_getter():
    """A fast getter of torch's fp32 matmul precision ("tf32", "ieee" or "none", which is off), or
    None on a torch without that setting (before 2.9: the allow_tf32 flag alone)."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return None
    try:
        get = functools.partial(torch._C._get_fp32_precision_getter, "cuda", "matmul")
        get()
        return get
    except (AttributeError, TypeError, RuntimeError):  # pragma: no cover - another torch
        return lambda: torch.backends.cuda.matmul.fp32_precision


_tf32_state = _fp32_precision_getter()
if _tf32_state is not None:  # fp32_precision is the source of truth (mixing in allow_tf32 makes
    def _tf32_is_on(state) -> bool:  # torch refuse to read the legacy flag)
        return state == "tf32"

    def _set_tf32(state):
        """Set fp32_precision: True -> "tf32", False -> "ieee", or a value read before."""
        torch.backends.cuda.matmul.fp32_precision = {True: "tf32", False: "ieee"}.get(state, state)
else:  # pragma: no cover - torch < 2.9
    _tf32_state = torch._C._get_cublas_allow_tf32
    _set_tf32 = torch._C._set_cublas_allow_tf32

    def _tf32_is_on(state) -> bool:
        return bool(state)


def _pins(dtype: torch.dtype, allow_tf32: bool) -> list:
    """Set, for a cuBLAS call, the global torch flags that differ from fp32 accumulation (TF32
    only when allow_tf32); return the functions that restore them. Reads only, in the usual
    case where nothing differs. Global torch state: not thread-safe."""
    undo = []
    if dtype == torch.float32:
        old = _tf32_state()
        if _tf32_is_on(old) != allow_tf32:
            _set_tf32(bool(allow_tf32))
            undo.append(functools.partial(_set_tf32, old))
    for get, put, want in _precision_flags(dtype):
        old = get()
        if old != want:
            put(want)
            undo.append(functools.partial(put, old))
    return undo


@contextlib.contextmanager
def pinned_fp32_accumulation(dtype: torch.dtype, allow_tf32: bool = False):
    """Within the block, torch's cuBLAS matmuls of `dtype` accumulate in fp32 (TF32 for fp32 inputs
    only when allow_tf32); the global flags are restored on exit (see _pins)."""
    undo = _pins(dtype, allow_tf32)
    try:
        yield
    finally:
        for restore in undo:
            restore()
