"""Linear-layer backward on CuPy arrays: cuBLAS for dX and dW, a CUDA C kernel for db.

- dx = dy @ w and dw = dyᵀ @ x go through ``cupy.matmul`` (cuBLAS GemmEx, fp32 compute type
  for fp32/fp16/bf16 inputs). CuPy computes fp32 matmuls in TF32 only when its compute type
  for float32 says so (the environment variable ``CUPY_TF32=1`` sets that at first use); this
  launcher pins the compute type around its matmuls: plain fp32 unless ``allow_tf32=True``.
  The compute type is CuPy's global state, so the pinning is not thread-safe.
- dw_accumulate: one cuBLAS ``gemmEx`` with beta = 1 writes dw += dyᵀ x straight into the fp32
  buffer (inputs in their own dtype, fp32 accumulation, no temporary and no rounding of dyᵀx to
  the input dtype first): the precision of an fp32 GEMM.
- db = Σ dy over the leading axes: ``bias_grad_<dtype>`` from bias_grad.cu, fp32 sums in a
  fixed order (deterministic, no atomics), rounded once to the input dtype.
CuPy is imported only when called.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np

from .. import checks
from .compile import SUFFIX, get_function
from .cross_entropy import _require_cupy

SOURCE = "bias_grad.cu"
#: Every kernel the launcher requests from SOURCE (the test suite checks they exist).
KERNEL_NAMES = tuple(f"bias_grad_{s}" for s in SUFFIX.values()) + tuple(
    f"bias_grad_finish_{s}" for s in SUFFIX.values())

TILE_N = 32  # columns per block (blockDim.x); must match BG_TILE_N in bias_grad.cu
ROWS = 8  # blockDim.y; must match BG_ROWS
TARGET_BLOCKS = 1024  # aim for this many blocks: a constant, so the bits do not depend on the GPU
MIN_ROWS_PER_SPLIT = 64
FINISH_THREADS = 256


def bias_grad_splits(m: int, n: int) -> tuple[int, int]:
    """(number of row splits, rows per split) for db of dy [m, n]; depends on the shape only."""
    tiles = -(-n // TILE_N)
    splits = max(1, min(TARGET_BLOCKS // max(tiles, 1), -(-m // MIN_ROWS_PER_SPLIT), 65535))
    rows_per_split = max(1, -(-m // splits))
    return max(1, -(-m // rows_per_split)), rows_per_split


def bias_grad(dy2):
    """db [N] = column sums of dy2 [M, N] (cupy fp32/fp16/bf16, C-contiguous), in dy2's dtype."""
    import cupy

    m, n = (int(d) for d in dy2.shape)
    suffix = SUFFIX[checks.dtype_name(dy2.dtype)]
    db = cupy.empty(n, dtype=dy2.dtype)
    if n == 0:
        return db
    splits, rows_per_split = bias_grad_splits(m, n)
    partial = cupy.empty((splits, n), dtype=cupy.float32) if splits > 1 else None
    get_function(SOURCE, f"bias_grad_{suffix}")(
        (-(-n // TILE_N), splits), (TILE_N, ROWS),
        (dy2, partial, db, np.int64(m), np.int64(n), np.int64(rows_per_split)))
    if partial is not None:
        get_function(SOURCE, f"bias_grad_finish_{suffix}")(
            (-(-n // FINISH_THREADS),), (FINISH_THREADS,), (partial, db, np.int64(n), np.int64(splits)))
    return db


@contextlib.contextmanager
def _float32_compute_type(allow_tf32: bool):
    """Pin CuPy's matmul compute type for float32: TF32 only when allow_tf32."""
    import cupy
    from cupy._core import _routines_linalg as linalg

    old = linalg.get_compute_type(np.float32)
    if allow_tf32:
        tf32_ok = int(cupy.cuda.Device().compute_capability) >= 80
        new = linalg.COMPUTE_TYPE_TF32 if tf32_ok else old
    else:
        new = linalg.COMPUTE_TYPE_FP32 if old == linalg.COMPUTE_TYPE_TF32 else old
    if new == old:
        yield
        return
    linalg.set_compute_type(np.float32, new)
    try:
        yield
    finally:
        linalg.set_compute_type(np.float32, old)


def _gemm_accumulate(dy2, x2, out, allow_tf32: bool):
    """out [N, K] fp32 += dy2ᵀ [N, M] @ x2 [M, K] in one cuBLAS gemmEx (beta = 1).

    cuBLAS is column-major: the row-major out is the column-major K×N matrix x2ᵀ dy2, so
    A = x2 (column-major K×M, lda = K, no transpose), B = dy2 (column-major N×M, ldb = N,
    transposed), C = out (ldc = K)."""
    import cupy
    from cupy_backends.cuda.api import runtime
    from cupy_backends.cuda.libs import cublas

    m, k = (int(d) for d in x2.shape)
    n = int(dy2.shape[1])
    if m == 0 or n == 0 or k == 0:
        return
    cuda_type = {"float32": runtime.CUDA_R_32F, "float16": runtime.CUDA_R_16F,
                 "bfloat16": runtime.CUDA_R_16BF}[checks.dtype_name(x2.dtype)]
    compute = cublas.CUBLAS_COMPUTE_32F
    if allow_tf32 and cuda_type == runtime.CUDA_R_32F and int(cupy.cuda.Device().compute_capability) >= 80:
        compute = cublas.CUBLAS_COMPUTE_32F_FAST_TF32
    one = np.ones((), dtype=np.float32)  # host scalars (the handle's default pointer mode)
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
    cublas.gemmEx(handle, cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_T, k, n, m,
                  one.ctypes.data, x2.data.ptr, cuda_type, k,
                  dy2.data.ptr, cuda_type, n,
                  one.ctypes.data, out.data.ptr, runtime.CUDA_R_32F, k,
                  compute, cublas.CUBLAS_GEMM_DEFAULT)


def linear_backward(x, w, dy, *, bias=True, dw_accumulate=None, need_dx=True, allow_tf32=False):
    """Gradients of y = x wᵀ + b on CuPy arrays.

    x [..., K], w [N, K], dy [..., N], one dtype of fp32/fp16/bf16. Returns (dx, dw, db):
    dx = dy w [..., K] (None when need_dx=False), dw = dyᵀ x [N, K], db = Σ dy over the
    leading axes [N] (None when bias=False), each in the input dtype with fp32 accumulation.
    dw_accumulate, a C-contiguous fp32 [N, K] cupy array, receives dw += dyᵀ x in place and is
    returned as dw. allow_tf32=True lets fp32 matmuls use TF32 tensor cores (sm_80+). M, N or K
    may be 0: the empty sums are zeros (db still sums dy when only K is 0), as in torch.
    """
    checks.check_linear_backward_args(x, w, dy, dw_accumulate, allowed=tuple(SUFFIX))
    arrays = {"x": x, "w": w, "dy": dy}
    if dw_accumulate is not None:
        arrays["dw_accumulate"] = dw_accumulate
    _require_cupy(**arrays)
    devices = {name: a.device.id for name, a in arrays.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"x, w, dy (and dw_accumulate) must be on one device, got {devices}")
    if dw_accumulate is not None and not dw_accumulate.flags.c_contiguous:
        raise ValueError("dw_accumulate must be C-contiguous")
    import cupy

    n, k = (int(d) for d in w.shape)
    m = math.prod(int(d) for d in x.shape[:-1])  # not reshape(-1, ...): K or N may be 0
    with x.device:
        x2 = cupy.ascontiguousarray(x.reshape(m, k))
        dy2 = cupy.ascontiguousarray(dy.reshape(m, n))
        if m == 0 or n == 0 or k == 0:  # the empty sums are zeros; db still sums dy when only K is 0
            dx = cupy.zeros(x.shape, dtype=x.dtype) if need_dx else None
            dw = dw_accumulate if dw_accumulate is not None else cupy.zeros((n, k), dtype=x.dtype)
            return dx, dw, (bias_grad(dy2) if bias else None)
        with _float32_compute_type(allow_tf32):
            dx = cupy.matmul(dy2, w).reshape(x.shape) if need_dx else None
            if dw_accumulate is None:
                dw = cupy.matmul(dy2.T, x2)
            else:
                _gemm_accumulate(dy2, x2, dw_accumulate, allow_tf32)
                dw = dw_accumulate
        db = bias_grad(dy2) if bias else None
    return dx, dw, db
