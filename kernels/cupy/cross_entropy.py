"""Fused softmax cross-entropy on CuPy arrays, through the CUDA C kernels of cross_entropy.cu.

Launch plan (:func:`launches`, all on the current stream, no host sync except the optional
target check): ``ce_count_valid`` (reduction "mean" only: the number of non-ignored rows, kept
on the device), one row kernel ``ce_<layout>_<dtype>_v<bytes>`` (the row losses, and the
gradient when asked), ``ce_reduce_loss`` (reductions "mean" and "sum": a fixed-order fp64 sum
of the row losses). No float atomics, so every run gives the same bits. CuPy is imported only
when called.

Row-kernel candidates (the tuning space "cupy.softmax_cross_entropy"; cross_entropy.cu states
the design, each moves one read and one write of the logits when its second pass hits L2):
layout — a block per row (threads_per_row threads; 0: about two vectors a thread, 32 to 512)
or, for rows of at most warp_row_max_cols columns, a warp per row (warps_per_block rows a
block); vec_bytes — 16-, 8- or 4-byte loads of the row's aligned body; blocks_per_sm — 0 for a
block per row group, else a persistent grid of that many blocks an SM (fewer rows in flight,
so more of the second pass hits L2: at V = 128256 bf16, 132 rows are 33 MB, under the 50 MB
L2); pass2 — the gradient pass in column order or last vector first.
"""
from __future__ import annotations

import functools

import numpy as np

from gpuad.backend import is_cupy_array

from .. import checks, tuning
from .compile import get_function

SOURCE = "cross_entropy.cu"
#: logits dtype name -> kernel suffix, and elements per 16-byte vector load.
SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
PACK = {"float32": 4, "float16": 8, "bfloat16": 8}
LAYOUTS = ("block", "warp")
VEC_BYTES = (16, 8, 4)
#: Every kernel the launcher requests from SOURCE (the test suite checks they exist).
KERNEL_NAMES = tuple(f"ce_{layout}_{s}_v{b}" for layout in LAYOUTS for s in SUFFIX.values() for b in VEC_BYTES) + (
    "ce_count_valid", "ce_reduce_loss")

OP = "cupy.softmax_cross_entropy"
SPACE = {
    "warp_row_max_cols": (0, 1024, 2048, 4096, 8192),
    "warps_per_block": (4, 8, 16),
    "threads_per_row": (0, 128, 256, 512, 1024),
    "vec_bytes": VEC_BYTES,
    "blocks_per_sm": (0, 1, 2, 4, 8),
    "pass2": ("forward", "reverse"),
}
DEFAULTS = {"warp_row_max_cols": 0, "warps_per_block": 8, "threads_per_row": 0, "vec_bytes": 16,
            "blocks_per_sm": 0, "pass2": "forward"}
tuning.register(OP, SPACE, DEFAULTS)

MAX_THREADS_PER_ROW = 512  # the automatic block size's cap (a power of two, 32 to 1024)
REDUCE_THREADS = 1024  # the one block of ce_count_valid and ce_reduce_loss
MAX_GRID = 2**31 - 1  # the row kernels stride over rows beyond this


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


def row_launch(n_rows: int, n_cols: int, dtype_name: str, params: dict | None = None, sm_count: int = 132):
    """(kernel name, grid, block) of the row kernel: a pure function of the shape and the
    tuning parameters (default: the fallbacks)."""
    p = dict(DEFAULTS, **(params or {}))
    if n_cols <= p["warp_row_max_cols"]:
        layout, rows_per_block, threads = "warp", p["warps_per_block"], 32 * p["warps_per_block"]
    else:
        layout, rows_per_block = "block", 1
        threads = p["threads_per_row"] or threads_per_row(n_cols, dtype_name)
    blocks = -(-n_rows // rows_per_block)
    if p["blocks_per_sm"]:
        blocks = min(blocks, sm_count * p["blocks_per_sm"])
    return f"ce_{layout}_{SUFFIX[dtype_name]}_v{p['vec_bytes']}", (min(blocks, MAX_GRID),), (threads,)


def launches(x, dlogits, t, row_loss, n_valid, loss, *, dtype_name, reduction, ignore, eps, params=None,
             sm_count=132):
    """The kernels softmax_cross_entropy runs, in order, as (name, grid, block, args) with
    CuPy's argument convention (arrays, or None for a null pointer, and numpy scalars).
    x [B, V] C-contiguous; dlogits None (no gradient), x (inplace) or a [B, V] buffer;
    t int64 [B]; row_loss fp32 [B]; n_valid an int64 0-d buffer ("mean") or None; loss an fp32
    0-d buffer, or None for "none". The emulated tests run this very list on host arrays."""
    n_rows, n_cols = (int(d) for d in x.shape)
    out = []
    if reduction == "mean":
        out.append(("ce_count_valid", (1,), (REDUCE_THREADS,), (t, np.int64(n_rows), np.int64(ignore), n_valid)))
    if n_rows:
        p = dict(DEFAULTS, **(params or {}))
        name, grid, block = row_launch(n_rows, n_cols, dtype_name, p, sm_count)
        out.append((name, grid, block, (x, dlogits, t, row_loss, n_valid, np.int64(n_rows), np.int64(n_cols),
                                        np.int64(ignore), np.float32(eps), np.int32(dlogits is not None),
                                        np.int32(p["pass2"] == "reverse"))))
    if reduction != "none":
        out.append(("ce_reduce_loss", (1,), (REDUCE_THREADS,), (row_loss, np.int64(n_rows), n_valid, loss)))
    return out


@functools.lru_cache(maxsize=None)
def _device_info(device_id: int) -> tuple:
    """(GPU name, streaming multiprocessors) of a CUDA device."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"]
    return (name.decode() if isinstance(name, bytes) else name), int(props["multiProcessorCount"])


def softmax_cross_entropy(logits, targets, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                          inplace=False, grad=True, check_targets=True):
    """Softmax cross-entropy and its gradient in fused CUDA kernels.

    logits [B, V] cupy fp32/fp16/bf16, targets [B] cupy integer. Returns (loss, dlogits): loss
    fp32, 0-d (or [B] for reduction "none"); dlogits [B, V] in the logits' dtype, or None when
    grad=False (one read of the logits, no B×V buffer). Semantics are those of
    ``gpuad.kernels.reference.softmax_cross_entropy``: ignore_index=None ignores no row, and
    an ignore_index no target of the targets' dtype can hold matches no row. Logits that are
    not C-contiguous (views whose rows overlap included) are copied first; inplace=True writes
    dlogits over `logits` (which must be C-contiguous) and returns that array. With
    check_targets=False a target outside [0, V) that is not ignore_index is never read: its row
    loss is NaN. The launch parameters come from the tuning space OP for this GPU.
    """
    checks.check_cross_entropy_args(logits, targets, reduction, label_smoothing, allowed=tuple(SUFFIX))
    _require_cupy(logits=logits, targets=targets)
    if targets.device.id != logits.device.id:
        raise ValueError(f"logits and targets must be on one device, got devices {logits.device.id} and "
                         f"{targets.device.id}")
    if inplace and grad and not logits.flags.c_contiguous:
        raise ValueError(f"inplace=True needs C-contiguous logits, got strides {logits.strides}")
    import cupy

    n_rows, n_cols = (int(d) for d in logits.shape)
    if check_targets:
        checks.check_targets(targets, n_cols, ignore_index)
    ignore = checks.kernel_ignore_index(ignore_index, targets.dtype)
    device_name, sm_count = _device_info(logits.device.id)
    with logits.device:
        x = cupy.ascontiguousarray(logits)
        t = cupy.ascontiguousarray(targets, dtype=cupy.int64)
        row_loss = cupy.empty(n_rows, dtype=cupy.float32)
        n_valid = cupy.empty((), dtype=cupy.int64) if reduction == "mean" else None
        loss = row_loss if reduction == "none" else cupy.empty((), dtype=cupy.float32)
        dlogits = None
        if grad:
            dlogits = x if inplace else cupy.empty_like(x)
        for name, grid, block, args in launches(
                x, dlogits, t, row_loss, n_valid, None if reduction == "none" else loss,
                dtype_name=checks.dtype_name(logits.dtype), reduction=reduction, ignore=ignore,
                eps=label_smoothing, params=tuning.launch_values(OP, device_name), sm_count=sm_count):
            get_function(SOURCE, name)(grid, block, args)
    return loss, dlogits
