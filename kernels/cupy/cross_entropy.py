"""Fused softmax cross-entropy on CuPy arrays, through the CUDA C kernels of cross_entropy.cu.

Launch plan (all on the current stream, no host sync except the optional target check):
``ce_count_valid`` (reduction "mean" only: the number of non-ignored rows, kept on the device),
``ce_forward_<dtype>`` (one block per row: the row losses, and the gradient when asked),
``ce_reduce_loss`` (reductions "mean" and "sum": a fixed-order fp64 sum of the row losses).
No float atomics, so every run gives the same bits. CuPy is imported only when called.
"""
from __future__ import annotations

import numpy as np

from gpuad.backend import is_cupy_array

from .. import checks
from .compile import get_function

SOURCE = "cross_entropy.cu"
#: logits dtype name -> kernel suffix, and elements per 16-byte vector load.
SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
PACK = {"float32": 4, "float16": 8, "bfloat16": 8}
#: Every kernel the launcher requests from SOURCE (the test suite checks they exist).
KERNEL_NAMES = tuple(f"ce_forward_{s}" for s in SUFFIX.values()) + ("ce_count_valid", "ce_reduce_loss")

MAX_THREADS_PER_ROW = 512  # threads of a row block (a power of two, 32 to 1024)
REDUCE_THREADS = 1024  # the one block of ce_count_valid and ce_reduce_loss
MAX_GRID = 2**31 - 1  # the row kernel strides over rows beyond this


def _require_cupy(**arrays):
    for name, a in arrays.items():
        if not is_cupy_array(a):
            raise TypeError(f"gpuad.kernels.cupy needs CuPy arrays: {name} is {type(a).__module__}."
                            f"{type(a).__name__}")


def threads_per_row(n_cols: int, dtype_name: str) -> int:
    """Block size for rows of `n_cols`: about two 16-byte loads per thread, 32 to 512 threads."""
    work = max(1, n_cols // (2 * PACK[dtype_name]))
    threads = 32
    while threads < MAX_THREADS_PER_ROW and threads < work:
        threads *= 2
    return threads


def softmax_cross_entropy(logits, targets, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                          inplace=False, grad=True, check_targets=True):
    """Softmax cross-entropy and its gradient in fused CUDA kernels.

    logits [B, V] cupy fp32/fp16/bf16, targets [B] cupy integer. Returns (loss, dlogits): loss
    fp32, 0-d (or [B] for reduction "none"); dlogits [B, V] in the logits' dtype, or None when
    grad=False (one read of the logits, no B×V buffer). Semantics are those of
    ``gpuad.kernels.reference.softmax_cross_entropy``; inplace=True writes dlogits over
    `logits` (which must be C-contiguous) and returns that array. With check_targets=False a
    target outside [0, V) that is not ignore_index is never read: its row loss is NaN.
    """
    checks.check_cross_entropy_args(logits, targets, reduction, label_smoothing, allowed=tuple(SUFFIX))
    _require_cupy(logits=logits, targets=targets)
    if targets.device.id != logits.device.id:
        raise ValueError(f"logits and targets must be on one device, got devices {logits.device.id} and "
                         f"{targets.device.id}")
    if inplace and grad and not logits.flags.c_contiguous:
        raise ValueError("inplace=True needs C-contiguous logits")
    import cupy

    n_rows, n_cols = (int(d) for d in logits.shape)
    if check_targets:
        checks.check_targets(targets, n_cols, ignore_index)
    name = checks.dtype_name(logits.dtype)
    eps = np.float32(label_smoothing)
    ignore = np.int64(ignore_index)
    with logits.device:
        x = cupy.ascontiguousarray(logits)
        t = cupy.ascontiguousarray(targets, dtype=cupy.int64)
        row_loss = cupy.empty(n_rows, dtype=cupy.float32)
        n_valid = None
        if reduction == "mean":
            n_valid = cupy.empty((), dtype=cupy.int64)
            get_function(SOURCE, "ce_count_valid")(
                (1,), (REDUCE_THREADS,), (t, np.int64(n_rows), ignore, n_valid))
        dlogits = None
        if grad:
            dlogits = x if inplace else cupy.empty_like(x)
        if n_rows:
            kernel = get_function(SOURCE, f"ce_forward_{SUFFIX[name]}")
            kernel((min(n_rows, MAX_GRID),), (threads_per_row(n_cols, name),),
                   (x, dlogits, t, row_loss, n_valid, np.int64(n_rows), np.int64(n_cols), ignore, eps,
                    np.int32(1 if grad else 0)))
        if reduction == "none":
            loss = row_loss
        else:
            loss = cupy.empty((), dtype=cupy.float32)
            get_function(SOURCE, "ce_reduce_loss")(
                (1,), (REDUCE_THREADS,), (row_loss, np.int64(n_rows), n_valid, loss))
    return loss, dlogits
