"""Fused LM head (linear + softmax cross-entropy without the [N, V] logits) on CuPy arrays.

The design of ``gpuad.kernels.triton.linear_cross_entropy``, with CUDA C between the GEMMs:
per chunk of c rows, ``cupy.matmul`` writes the logits into one [c, V] buffer (cuBLAS, fp32
compute type pinned), ``lce_rows_<dtype>`` (linear_cross_entropy.cu) turns them into the row
losses, lse and dloss/dz in place, ``cupy.matmul`` writes dx's rows, one cuBLAS gemmEx with
beta = 1 adds dzᵀ x into the fp32 [V, D] accumulator (fp16/bf16 products straight into fp32,
no rounding first), and ``lce_column_sum_<dtype>`` adds db's fp32 column sums. Chunk size,
memory and FLOPs as in the Triton module (``gpuad.kernels.reference.linear_cross_entropy_chunk``).
All on the current stream; no host sync except the optional target check; no atomics.
CuPy is imported only when called.
"""
from __future__ import annotations

import numpy as np

from .. import checks
from ..reference import linear_cross_entropy_chunk, reduce_row_losses
from .compile import get_function
from .cross_entropy import _require_cupy
from .linear_backward import _float32_compute_type, _gemm_accumulate

SOURCE = "linear_cross_entropy.cu"
SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
#: Every kernel the launcher requests from SOURCE (the test suite checks they exist).
KERNEL_NAMES = tuple(f"lce_rows_{s}" for s in SUFFIX.values()) + tuple(
    f"lce_column_sum_{s}" for s in SUFFIX.values())

ROW_THREADS = 512  # threads of a row block (a multiple of 32, at most 1024)
COLUMN_THREADS = 256  # threads of a column-sum block


def row_threads(n_cols: int) -> int:
    """Block size of lce_rows for rows of n_cols: about 8 elements a thread, 32 to ROW_THREADS."""
    threads = 32
    while threads < ROW_THREADS and threads * 8 < n_cols:
        threads *= 2
    return threads


def _free_bytes():
    """Free device memory plus what CuPy's pool holds unused (no stream sync)."""
    import cupy

    free, _ = cupy.cuda.runtime.memGetInfo()
    pool = cupy.get_default_memory_pool()
    return free + pool.free_bytes()


def linear_cross_entropy(x, w, targets, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                         z_loss=0.0, softcap=None, dw_accumulate=None, need_dx=True, return_lse=False, chunk=None,
                         grad=True, grad_scale=None, check_targets=True, allow_tf32=False):
    """Loss and gradients of cross_entropy(x wᵀ + bias, targets) with one [chunk, V] buffer.

    x [N, D], w [V, D], bias [V] or None: CuPy arrays of one dtype (fp32/fp16/bf16); targets
    [N] integer. Semantics, options and outputs are those of
    ``gpuad.kernels.reference.linear_cross_entropy`` (dw_accumulate must be C-contiguous).
    check_targets=False removes the only host sync; a bad target then gives a NaN row loss.
    """
    checks.check_linear_cross_entropy_args(x, w, targets, bias, reduction, label_smoothing, z_loss, softcap,
                                           dw_accumulate, chunk, grad_scale, allowed=tuple(SUFFIX))
    arrays = {"x": x, "w": w, "targets": targets, "bias": bias, "dw_accumulate": dw_accumulate,
              "grad_scale": grad_scale}
    arrays = {k: a for k, a in arrays.items() if a is not None}
    _require_cupy(**arrays)
    devices = {k: a.device.id for k, a in arrays.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"all arrays must be on one device, got {devices}")
    if dw_accumulate is not None and not dw_accumulate.flags.c_contiguous:
        raise ValueError("dw_accumulate must be C-contiguous")
    import cupy

    (n, d), v = (int(s) for s in x.shape), int(w.shape[0])
    if check_targets:
        checks.check_targets(targets, v, ignore_index)
    suffix = SUFFIX[checks.dtype_name(x.dtype)]
    eps, z_coef = float(label_smoothing), float(z_loss)
    with x.device:
        x2 = cupy.ascontiguousarray(x)
        w2 = cupy.ascontiguousarray(w)
        b2 = None if bias is None else cupy.ascontiguousarray(bias)
        t = cupy.ascontiguousarray(targets, dtype=cupy.int64)
        n_valid = cupy.maximum((t != ignore_index).sum(), 1).astype(cupy.float32)
        scale = cupy.ones((), dtype=cupy.float32)
        if reduction == "mean":
            scale = scale / n_valid
        if grad_scale is not None:  # a fresh (contiguous) array: 0-d, or [N] per row
            scale = scale * grad_scale.astype(cupy.float32)
        row_scale = scale.ndim == 1
        row_loss = cupy.empty(n, dtype=cupy.float32)
        lse = cupy.empty(n, dtype=cupy.float32)
        dx = dw = db = None
        if grad:
            dx = cupy.empty((n, d), dtype=x.dtype) if need_dx else None
            dw = dw_accumulate if dw_accumulate is not None else cupy.zeros((v, d), dtype=cupy.float32)
            db = cupy.zeros(v, dtype=cupy.float32) if bias is not None else None
        if n > 0:
            c = min(n, chunk or linear_cross_entropy_chunk(n, v, x.dtype.itemsize, _free_bytes()))
            buf = cupy.empty((c, v), dtype=x.dtype)
            rows_kernel = get_function(SOURCE, f"lce_rows_{suffix}")
            column_sum = get_function(SOURCE, f"lce_column_sum_{suffix}")
            with _float32_compute_type(allow_tf32):
                for r0 in range(0, n, c):
                    r1 = min(n, r0 + c)
                    zc, xc = buf[:r1 - r0], x2[r0:r1]
                    cupy.matmul(xc, w2.T, out=zc)
                    rows_kernel((r1 - r0,), (row_threads(v),),
                                (zc, b2, t[r0:r1], row_loss[r0:r1], lse[r0:r1],
                                 scale[r0:r1] if row_scale else scale, np.int64(r1 - r0), np.int64(v),
                                 np.int64(ignore_index), np.float32(eps), np.float32(z_coef),
                                 np.float32(softcap or 0.0), np.int32(grad), np.int32(row_scale)))
                    if not grad:
                        continue
                    if dx is not None:
                        cupy.matmul(zc, w2, out=dx[r0:r1])
                    _gemm_accumulate(zc, xc, dw, allow_tf32)
                    if db is not None:
                        column_sum((-(-v // COLUMN_THREADS),), (COLUMN_THREADS,),
                                   (zc, db, np.int64(r1 - r0), np.int64(v)))
            del buf
        loss = reduce_row_losses(row_loss, reduction, n_valid)
        if grad:
            if dw_accumulate is None and dw.dtype != x.dtype:
                dw = dw.astype(x.dtype)
            if db is not None:
                db = db.astype(x.dtype)
    out = (loss, dx, dw, db)
    return out + (lse,) if return_lse else out
