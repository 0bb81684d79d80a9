"""Fused LM head (linear + softmax cross-entropy without the [N, V] logits) on CuPy arrays:
the chunk loop of ``gpuad.kernels.lm_head`` (its design, memory and FLOPs) with CUDA C between
the GEMMs. Per chunk of c rows, ``cupy.matmul`` writes the logits into one [c, V] buffer
(cuBLAS, fp32 compute type pinned; rows not padded), ``lce_rows_<dtype>``
(linear_cross_entropy.cu) turns them into the row losses, lse and dloss/dz in place,
``cupy.matmul`` writes dx's rows, one cuBLAS gemmEx with beta = 1 adds dzᵀ x into the fp32
[V, D] accumulator (fp16/bf16 products straight into fp32, no rounding first), and
``lce_column_sum_<dtype>`` adds db's fp32 column sums. All on the current stream; no host sync
except the optional target check; no atomics. CuPy is imported only when called.
"""
from __future__ import annotations

import functools

import numpy as np

from .. import checks
from ..lm_head import Steps, run_chunks
from ..reference import mean_divisor
from .compile import SUFFIX, get_function
from .cross_entropy import _require_cupy
from .linear_backward import _float32_compute_type, _gemm_accumulate

SOURCE = "linear_cross_entropy.cu"
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


def rows_launch(suffix: str, zc, bias, targets, row_loss, lse, scale, class_weight, class_weight_sum, n_cols: int,
                options: tuple):
    """(kernel name, grid, block, args) of lce_rows for one chunk zc [rows, V] (C-contiguous);
    class_weight None or fp32 [V] with class_weight_sum its 0-d sum; options as _CupySteps'."""
    args = (zc, bias, targets, row_loss, lse, scale, class_weight, class_weight_sum, np.int64(zc.shape[0]),
            np.int64(n_cols), *options)
    return f"lce_rows_{suffix}", (zc.shape[0],), (row_threads(n_cols),), args


def lce_options(ignore_index, smoothing, z_coef, softcap, grad, row_scale) -> tuple:
    """The scalar arguments of lce_rows after n_cols, as numpy scalars of the parameters' types."""
    return (np.int64(ignore_index), np.float32(smoothing), np.float32(z_coef), np.float32(softcap or 0.0),
            np.int32(grad), np.int32(row_scale))


def _free_bytes():
    """Free device memory plus what CuPy's pool holds unused (no stream sync)."""
    import cupy

    free, _ = cupy.cuda.runtime.memGetInfo()
    pool = cupy.get_default_memory_pool()
    return free + pool.free_bytes()


def linear_cross_entropy(x, w, targets, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                         z_loss=0.0, softcap=None, dw_accumulate=None, need_dx=True, return_lse=False, chunk=None,
                         grad=True, grad_scale=None, check_targets=True, allow_tf32=False, class_weight=None):
    """Loss and gradients of cross_entropy(x wᵀ + bias, targets) with one [chunk, V] buffer.

    x [N, D], w [V, D], bias [V] or None: CuPy arrays of one dtype (fp32/fp16/bf16); targets
    [N] integer; class_weight None or a floating [V] (read in fp32). Semantics, options and outputs are those of
    ``gpuad.kernels.reference.linear_cross_entropy`` (dw_accumulate must be C-contiguous).
    check_targets=False removes the only host sync; a bad target then gives a NaN row loss.
    """
    ignore_index = checks.ignore_index_arg(ignore_index)
    checks.check_linear_cross_entropy_args(x, w, targets, bias, reduction, label_smoothing, z_loss, softcap,
                                           dw_accumulate, chunk, grad_scale, allowed=tuple(SUFFIX),
                                           class_weight=class_weight)
    arrays = {"x": x, "w": w, "targets": targets, "bias": bias, "dw_accumulate": dw_accumulate,
              "grad_scale": grad_scale, "class_weight": class_weight}
    arrays = {k: a for k, a in arrays.items() if a is not None}
    _require_cupy(**arrays)
    devices = {k: a.device.id for k, a in arrays.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"all arrays must be on one device, got {devices}")
    if dw_accumulate is not None and not dw_accumulate.flags.c_contiguous:
        raise ValueError("dw_accumulate must be C-contiguous")
    import cupy

    v = int(w.shape[0])
    if check_targets:
        checks.check_targets(targets, v, ignore_index)
    with x.device:
        x2 = cupy.ascontiguousarray(x)
        t = cupy.ascontiguousarray(targets, dtype=cupy.int64)
        steps = _CupySteps(x2, cupy.ascontiguousarray(w), None if bias is None else cupy.ascontiguousarray(bias),
                           ignore_index=checks.kernel_ignore_index(ignore_index, targets.dtype),
                           smoothing=float(label_smoothing), z_coef=float(z_loss),
                           softcap=softcap, grad=grad, row_scale=grad_scale is not None and grad_scale.ndim == 1,
                           allow_tf32=allow_tf32,
                           class_weight=None if class_weight is None else cupy.ascontiguousarray(class_weight,
                                                                                                 cupy.float32))
        out = run_chunks(steps, x2, t, v=v, has_bias=bias is not None, dw_accumulate=dw_accumulate,
                         grad_scale=grad_scale, ignore_index=ignore_index, reduction=reduction, need_dx=need_dx,
                         grad=grad, chunk=chunk)
    return out if return_lse else out[:4]


class _CupySteps(Steps):
    """The chunk loop's steps on CuPy arrays: cupy.matmul, cuBLAS gemmEx and the CUDA C kernels."""

    def __init__(self, x, w, bias, *, ignore_index, smoothing, z_coef, softcap, grad, row_scale, allow_tf32,
                 class_weight=None):
        import cupy

        self.cupy, self.x, self.w, self.bias, self.allow_tf32 = cupy, x, w, bias, allow_tf32
        self.float32, self.itemsize, self.v = cupy.float32, x.dtype.itemsize, int(w.shape[0])
        self.suffix = SUFFIX[checks.dtype_name(x.dtype)]
        self.options = lce_options(ignore_index, smoothing, z_coef, softcap, grad, row_scale)
        self.class_weight = class_weight
        self.class_weight_sum = None if class_weight is None else class_weight.sum()

    @functools.cached_property
    def column_sum(self):
        return get_function(SOURCE, f"lce_column_sum_{self.suffix}")

    def empty(self, shape, dtype):
        return self.cupy.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return self.cupy.zeros(shape, dtype=dtype)

    def ones(self, shape, dtype):
        return self.cupy.ones(shape, dtype=dtype)

    def astype(self, a, dtype):
        return a.astype(dtype)

    def contiguous(self, a):
        return self.cupy.ascontiguousarray(a)

    def mean_divisor(self, targets, ignore_index):
        valid = checks.valid_targets(targets, ignore_index)
        return mean_divisor(self.cupy, targets, valid, self.class_weight, self.cupy.float32)

    def free_bytes(self):
        return _free_bytes()

    def buffer(self, rows):
        return self.cupy.empty((rows, self.v), dtype=self.x.dtype)

    def chunk(self, buf, rows):
        return buf[:rows]

    def precision(self):
        return _float32_compute_type(self.allow_tf32)

    def logits(self, buf, xc, zc):
        self.cupy.matmul(xc, self.w.T, out=zc)

    def rows(self, buf, zc, targets, row_loss, lse, scale):
        name, grid, block, args = rows_launch(self.suffix, zc, self.bias, targets, row_loss, lse, scale,
                                              self.class_weight, self.class_weight_sum, self.v, self.options)
        get_function(SOURCE, name)(grid, block, args)

    def dx(self, zc, out):
        self.cupy.matmul(zc, self.w, out=out)

    def dw(self, acc, zc, xc):
        _gemm_accumulate(zc, xc, acc, self.allow_tf32)

    def db(self, acc, zc):
        blocks = -(-self.v // COLUMN_THREADS)
        self.column_sum((blocks,), (COLUMN_THREADS,), (zc, acc, np.int64(zc.shape[0]), np.int64(self.v)))
