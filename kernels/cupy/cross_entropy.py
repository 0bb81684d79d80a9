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

Class weights, probability targets and the [C] and [B, C, d1, ...] layouts take the
``ce_general_*`` kernels instead (:func:`general_launches`; not tuning candidates).
"""
from __future__ import annotations

import functools

import numpy as np

from gpuad.backend import is_cupy_array

from .. import checks, tuning
from .compile import SUFFIX, get_function

SOURCE = "cross_entropy.cu"
#: logits dtype name -> kernel suffix, and elements per 16-byte vector load.
PACK = {"float32": 4, "float16": 8, "bfloat16": 8}
LAYOUTS = ("block", "warp")
VEC_BYTES = (16, 8, 4)
GENERAL_LAYOUTS = ("block", "thread")  # of ce_general_*: a block a row, or a thread a row
#: Every kernel the launcher requests from SOURCE (the test suite checks they exist).
KERNEL_NAMES = tuple(f"ce_{layout}_{s}_v{b}" for layout in LAYOUTS for s in SUFFIX.values() for b in VEC_BYTES) + (
    "ce_count_valid", "ce_reduce_loss") + tuple(
    f"ce_general_{layout}_{s}" for layout in GENERAL_LAYOUTS for s in SUFFIX.values()) + (
    "ce_general_denominator", "ce_general_reduce_loss")

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
GENERAL_THREADS = 256  # a block of ce_general_thread_*: one row a thread


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


def general_launches(x, dlogits, t, q, w, row_loss, denom, loss, *, strides, n_rows, n_cols, n_spatial, dtype_name,
                     reduction, ignore, eps):
    """The kernels of F.cross_entropy's general case (class weights, probability targets, the
    [C] and [B, C, d1, ...] layouts), in order, as :func:`launches` gives them. strides: the
    (batch, class, spatial) element strides of x, dlogits and q (for q and a missing dlogits:
    anything); t int64 [rows] (None with probabilities q, of x's dtype); w fp32 [C] or None;
    denom an fp32 0-d buffer ("mean": written here for class indices, holding the row count
    for probabilities) or None; loss an fp32 0-d buffer or None ("none"). Classes adjacent
    in memory (class stride 1) take a block a row, else a thread a row."""
    out = []
    if reduction == "mean" and q is None:
        out.append(("ce_general_denominator", (1,), (REDUCE_THREADS,),
                    (t, w, np.int64(n_rows), np.int64(n_cols), np.int64(ignore), denom)))
    if n_rows:
        (xs, gs, qs), suffix = strides, SUFFIX[dtype_name]
        if xs[1] == 1:
            name, block = f"ce_general_block_{suffix}", threads_per_row(n_cols, dtype_name)
            grid = min(n_rows, MAX_GRID)
        else:
            name, block = f"ce_general_thread_{suffix}", GENERAL_THREADS
            grid = min(-(-n_rows // GENERAL_THREADS), MAX_GRID)
        out.append((name, (grid,), (block,), (
            x, dlogits, t, q, w, row_loss, denom if reduction == "mean" else None, np.int64(n_rows),
            np.int64(n_cols), np.int64(n_spatial), *(np.int64(v) for v in (*xs, *gs, *qs)), np.int64(ignore),
            np.float32(eps), np.int32(dlogits is not None))))
    if reduction != "none":
        out.append(("ce_general_reduce_loss", (1,), (REDUCE_THREADS,),
                    (row_loss, np.int64(n_rows), denom if reduction == "mean" else None, loss)))
    return out


@functools.lru_cache(maxsize=None)
def _device_info(device_id: int) -> tuple:
    """(GPU name, streaming multiprocessors) of a CUDA device."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"]
    return (name.decode() if isinstance(name, bytes) else name), int(props["multiProcessorCount"])


def softmax_cross_entropy(logits, targets, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                          inplace=False, grad=True, check_targets=True):
    """Softmax cross-entropy and its gradient in fused CUDA kernels: F.cross_entropy.

    logits [C], [B, C] or [B, C, d1, ...] (classes on axis 1) cupy fp32/fp16/bf16; targets
    cupy integer class indices of the logits' shape without the class axis, or floating class
    probabilities of the logits' shape; weight None or a cupy floating [C] class weight.
    Returns (loss, dlogits): loss fp32, 0-d (or the logits' shape without the class axis for
    reduction "none"); dlogits in the logits' shape and dtype, or None when grad=False (one
    read of the logits, no gradient buffer). Semantics are those of
    ``gpuad.kernels.reference.softmax_cross_entropy``: ignore_index=None ignores no row, and
    an ignore_index no target of the targets' dtype can hold matches no row. inplace=True
    writes dlogits over `logits` (which must be C-contiguous) and returns that array. With
    check_targets=False a target outside [0, C) that is not ignore_index is never read: its
    row loss is NaN.

    Kernels: [B, C] logits with class indices and no weight take the row kernels of the
    tuning space OP (C-contiguous logits; others are copied first); class weights,
    probability targets and the [C] and N-d layouts take ce_general_* (see
    :func:`general_launches`), which read the N-d layout in place through its strides (a
    contiguous copy only when d1, ... cannot be walked as one axis; probability targets of
    another dtype than the logits are converted to it, the weight to fp32).
    """
    ignore_index = checks.ignore_index_arg(ignore_index)
    layout = checks.check_cross_entropy_layout(logits, targets, weight, reduction, label_smoothing, ignore_index,
                                               allowed=tuple(SUFFIX))
    arrays = dict(logits=logits, targets=targets, **({} if weight is None else {"weight": weight}))
    _require_cupy(**arrays)
    for name, a in arrays.items():
        if a.device.id != logits.device.id:
            raise ValueError(f"logits and {name} must be on one device, got devices {logits.device.id} and "
                             f"{a.device.id}")
    if inplace and grad and not logits.flags.c_contiguous:
        raise ValueError(f"inplace=True needs C-contiguous logits, got strides {logits.strides}")
    if check_targets and not layout.soft:
        checks.check_targets(targets.reshape(-1), layout.n_classes, ignore_index)
    ignore = checks.kernel_ignore_index(ignore_index, targets.dtype)
    with logits.device:
        if weight is None and not layout.soft and logits.ndim == 2:
            return _launch_rows(logits, targets, ignore, reduction, label_smoothing, inplace, grad)
        return _launch_general(logits, targets, weight, layout, ignore, reduction, label_smoothing, inplace, grad)


def _element_strides(a):
    """(a, (batch, class, spatial) element strides), `a` copied C-contiguous when its d1, ...
    cannot be walked as one axis."""
    import cupy

    strides = checks.class_strides(a.shape, tuple(st // a.itemsize for st in a.strides))
    if strides is None:
        return _element_strides(cupy.ascontiguousarray(a))
    return a, strides


def _launch_general(logits, targets, weight, layout, ignore, reduction, eps, inplace, grad):
    """(loss, dlogits) from the ce_general_* kernels."""
    import cupy

    n_rows = layout.n_rows
    x, xs = _element_strides(logits)
    q, qs, t = None, (0, 0, 0), None
    if layout.soft:
        q, qs = _element_strides(targets.astype(logits.dtype, copy=False))
    else:
        t = cupy.ascontiguousarray(targets.reshape(-1), dtype=cupy.int64)
    w = None if weight is None else cupy.ascontiguousarray(weight, dtype=cupy.float32)
    row_loss = cupy.empty(n_rows, dtype=cupy.float32)
    denom = None
    if reduction == "mean":
        denom = cupy.full((), max(n_rows, 1), dtype=cupy.float32) if layout.soft else cupy.empty((), cupy.float32)
    loss = None if reduction == "none" else cupy.empty((), dtype=cupy.float32)
    dlogits = None
    if grad:
        dlogits = x if inplace else cupy.empty(logits.shape, dtype=logits.dtype)
    gs = (0, 0, 0) if dlogits is None else _element_strides(dlogits)[1]
    for name, grid, block, args in general_launches(
            x, dlogits, t, q, w, row_loss, denom, loss, strides=(xs, gs, qs), n_rows=n_rows,
            n_cols=layout.n_classes, n_spatial=layout.n_spatial, dtype_name=checks.dtype_name(logits.dtype),
            reduction=reduction, ignore=ignore, eps=eps):
        get_function(SOURCE, name)(grid, block, args)
    if loss is None:
        loss = row_loss.reshape(logits.shape[:1] + logits.shape[2:] if logits.ndim > 1 else ())
    return loss, dlogits


def _launch_rows(logits, targets, ignore, reduction, eps, inplace, grad):
    """(loss, dlogits) of [B, V] logits and class indices without weight, from the row kernels."""
    import cupy

    n_rows, n_cols = (int(d) for d in logits.shape)
    device_name, sm_count = _device_info(logits.device.id)
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
            eps=eps, params=tuning.launch_values(OP, device_name), sm_count=sm_count):
        get_function(SOURCE, name)(grid, block, args)
    return loss, dlogits
