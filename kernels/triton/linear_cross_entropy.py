"""Fused LM head on torch tensors: the chunk loop of ``gpuad.kernels.lm_head`` (its design,
memory and FLOPs) with torch's cuBLAS GEMMs and the Triton row kernel below.

    x [N, D], w [V, D] (PyTorch's layout), targets [N], bias [V] or None
    loss, dx = ∂loss/∂x, dw = ∂loss/∂w, db = ∂loss/∂bias  (and lse [N] on request)

The logits buffer's rows are padded to a multiple of ROW_PAD elements (aligned GEMM leading
dimension; the row kernel uses the padding as scratch). By default on an H100 a chunk is
min(N, 2048) rows (``linear_cross_entropy_chunk``); `chunk` changes it.

Numerics: every GEMM accumulates in fp32 (reduced-precision reductions off, fp32 products
exact unless allow_tf32); dw in fp32 across chunks whatever the input dtype: with fp16/bf16
inputs through torch.addmm(..., out_dtype=float32) where this torch supports an fp32
accumulator there (checked once a device), else through gpuad's Triton linear_backward with
dw_accumulate. Deterministic: no atomics, fixed-order sums. No host synchronisation (with
check_targets=False). 64-bit row offsets in the kernel.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from .. import checks
from ..lm_head import Steps, run_chunks
from .interop import as_given, as_torch, check_device
from .linear_backward import linear_backward as _triton_linear_backward
from .precision import pinned_fp32_accumulation

ROW_PAD = 64  # the buffer's row stride is a multiple of this many elements (aligned GEMM leading dim)
MAX_BLOCK = 4096  # columns a program handles per step of its loop over V


@triton.jit
def _tanh(y):
    """tanh through exp, finite at both ends (exp overflowing to inf gives ±1)."""
    return 1.0 - 2.0 / (tl.exp(2.0 * y) + 1.0)


@triton.jit
def _logits(row_ptr, b_ptr, cols, load_mask, col_ok, cap, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    """z for `cols` of one row in fp32: the GEMM's value (0 where not load_mask), + bias (of the
    columns in col_ok), soft-capped."""
    z = tl.load(row_ptr + cols, mask=load_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if SOFTCAP:
        z = cap * _tanh(z / cap)
    return z


@triton.jit
def _lce_rows_kernel(z_ptr, stride, b_ptr, t_ptr, loss_ptr, lse_ptr, scale_ptr, cw_ptr, cw_sum_ptr, n_cols,
                     ignore_index, eps, z_coef, cap, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_GRAD: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr, SOFTCAP: tl.constexpr,
                     ROW_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """One program per row of the chunk z [rows, V] (row stride `stride`).

    The rows are the launcher's buffer, padded to a multiple of ROW_PAD elements: columns
    [V, stride) are scratch that the kernel may read and write, so its loads and stores are
    masked by `cols < stride` (whole 16-byte vectors, whatever V) and only the arithmetic by
    `cols < V`. Pass 1 folds BLOCK-wide pieces into an online max and Σexp (and Σz for
    smoothing), giving lse; the row loss and lse go to loss_ptr / lse_ptr. Pass 2 (HAS_GRAD),
    last piece first (the likeliest still in L2), writes over z
        g = (softmax·(1 + 2·z_coef·lse) - eps/V - (1 - eps)·onehot) · (1 - (z/cap)²) · scale
    with scale = scale_ptr[row] (ROW_SCALE) or scale_ptr[0]; zeros on ignored rows, which
    pass 2 does not read. With class weights c (HAS_WEIGHT: cw_ptr [V] fp32, cw_sum_ptr their
    0-d sum; no z-loss) the row loss is m·lse - (1 - eps)·c_t·z_t - (eps/V)·Σ c·z and
    g = (m·softmax - (eps/V)·c - (1 - eps)·c_t·onehot)·(1 - (z/cap)²)·scale, with
    m = (1 - eps)·c_t + (eps/V)·Σ c. Out-of-range targets never address memory outside the row."""
    row = tl.program_id(0)
    t = tl.load(t_ptr + row).to(tl.int64)
    valid = t != ignore_index
    row_ptr = z_ptr + row.to(tl.int64) * stride
    lanes = tl.arange(0, BLOCK)
    n_blocks = tl.cdiv(n_cols, BLOCK)

    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    sz = tl.zeros((), tl.float32)
    for k in range(0, n_blocks):
        cols = k * BLOCK + lanes
        col_ok = cols < n_cols
        z = _logits(row_ptr, b_ptr, cols, cols < stride, col_ok, cap, HAS_BIAS, SOFTCAP)
        z = tl.where(col_ok, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
        m = m_new
        if SMOOTH:
            z = tl.where(col_ok, z, 0.0)
            if HAS_WEIGHT:  # Σ c·z
                z = z * tl.load(cw_ptr + cols, mask=col_ok, other=0.0)
            sz += tl.sum(z, axis=0)
    shift = tl.where(m == float("-inf"), 0.0, m)
    log_s = tl.log(s)
    lse = shift + log_s
    t_col = tl.minimum(tl.maximum(t, 0), n_cols - 1)  # clamped: never outside the row
    z_t = tl.load(row_ptr + t_col).to(tl.float32)
    if HAS_BIAS:
        z_t += tl.load(b_ptr + t_col).to(tl.float32)
    if SOFTCAP:
        z_t = cap * _tanh(z_t / cap)
    c_t = 1.0  # the target's class weight and the row's target mass
    mass = 1.0
    if HAS_WEIGHT:
        c_t = tl.load(cw_ptr + t_col)
        mass = (1.0 - eps) * c_t
        if SMOOTH:
            mass += eps / n_cols * tl.load(cw_sum_ptr)
    loss = mass * lse - (1.0 - eps) * c_t * z_t
    if SMOOTH:
        loss -= eps / n_cols * sz
    if ZLOSS:
        loss += z_coef * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + row, lse)

    if HAS_GRAD:
        if ROW_SCALE:
            scale = tl.load(scale_ptr + row)
        else:
            scale = tl.load(scale_ptr)
        coef = mass
        if ZLOSS:
            coef = 1.0 + 2.0 * z_coef * lse
        for i in range(0, n_blocks):
            cols = (n_blocks - 1 - i) * BLOCK + lanes
            in_row = cols < stride
            z = _logits(row_ptr, b_ptr, cols, in_row & valid, cols < n_cols, cap, HAS_BIAS, SOFTCAP)
            g = tl.exp((z - shift) - log_s) * coef
            if SMOOTH:
                if HAS_WEIGHT:
                    g -= eps / n_cols * tl.load(cw_ptr + cols, mask=cols < n_cols, other=0.0)
                else:
                    g -= eps / n_cols
            g = tl.where(cols == t, g - (1.0 - eps) * c_t, g)  # unclamped t: out of range matches nothing
            if SOFTCAP:
                g *= 1.0 - (z / cap) * (z / cap)
            g = tl.where(valid, g * scale, 0.0)
            tl.store(row_ptr + cols, g.to(z_ptr.dtype.element_ty), mask=in_row)


def _kernel_meta(n_cols: int, *, has_bias: bool, grad: bool, label_smoothing: float, z_loss: float,
                 softcap, row_scale: bool, has_weight: bool = False) -> dict:
    """Every constexpr and num_warps of a _lce_rows_kernel launch (a pure function of the shape
    and options, no device)."""
    block = min(triton.next_power_of_2(n_cols), MAX_BLOCK)
    return dict(BLOCK=block, HAS_BIAS=has_bias, HAS_GRAD=bool(grad), SMOOTH=float(label_smoothing) > 0.0,
                ZLOSS=float(z_loss) > 0.0, SOFTCAP=softcap is not None, ROW_SCALE=row_scale, HAS_WEIGHT=has_weight,
                num_warps=4 if block <= 1024 else 8)


def _free_bytes(device: torch.device) -> int | None:
    """Memory the caching allocator can still hand out on `device` (None off CUDA): the
    driver's free memory plus what torch holds reserved but unused. No stream sync."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


@functools.lru_cache(maxsize=None)
def _addmm_fp32_accumulator(device_index: int, dtype: torch.dtype) -> bool:
    """Whether this torch accepts torch.addmm(acc_fp32, a, b, out_dtype=float32, out=acc_fp32)
    for fp16/bf16 a, b on CUDA (cuBLAS with an fp32 C and beta = 1). Checked once with a tiny
    call; argument errors raise on the host, so this needs no synchronisation."""
    dev = torch.device("cuda", device_index)
    a = torch.zeros(16, 16, dtype=dtype, device=dev)
    acc = torch.zeros(16, 16, dtype=torch.float32, device=dev)
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return True


def dw_route(device: torch.device, dtype: torch.dtype) -> str:
    """How dw += dlogitsᵀ x runs for inputs of `dtype` on `device`: "cublas" (one torch GEMM
    into the fp32 buffer), "triton" (gpuad's linear_backward with dw_accumulate: torch has no
    fp32-accumulator GEMM for this dtype), or "upcast" (off CUDA: operands cast to fp32)."""
    if dtype == torch.float32:
        return "cublas"
    if device.type != "cuda":
        return "upcast"
    return "cublas" if _addmm_fp32_accumulator(device.index, dtype) else "triton"


def _accumulate_dw(acc, dl, xc, w, route: str):
    """acc [V, D] fp32 += dlᵀ [V, c] @ xc [c, D] (w [V, D]: the shape and dtype for linear_backward)."""
    if route == "triton":
        _triton_linear_backward(xc, w, dl, bias=False, dw_accumulate=acc, need_dx=False, route="fused")
    elif acc.dtype == dl.dtype:
        acc.addmm_(dl.t(), xc)
    elif route == "cublas":
        torch.addmm(acc, dl.t(), xc, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(dl.t().float(), xc.float())


def linear_cross_entropy(x, w, targets, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                         z_loss=0.0, softcap=None, dw_accumulate=None, need_dx=True, return_lse=False, chunk=None,
                         grad=True, grad_scale=None, check_targets=True, allow_tf32=False, class_weight=None):
    """Loss and gradients of cross_entropy(x wᵀ + bias, targets) with one [chunk, V] buffer.

    x [N, D], w [V, D], bias [V] or None: torch tensors of one dtype (fp32/fp16/bf16; CUDA, or
    CPU under TRITON_INTERPRET=1) or CuPy arrays; targets [N] integer; class_weight None or a
    floating [V] (read in fp32). Semantics, options and
    outputs are those of ``gpuad.kernels.reference.linear_cross_entropy``: returns (loss, dx,
    dw, db) (+ lse [N] fp32 when return_lse), loss fp32 (0-d, or [N] for "none"), gradients in
    the input dtype (dw = dw_accumulate when given: an fp32 [V, D] buffer that receives dw +=),
    grad=False gives (loss, None, None, None), grad_scale (0-d, or [N] for "none", on the
    device) multiplies the gradients. The chunk loop and its design: ``gpuad.kernels.lm_head``.

    Memory beyond inputs and outputs: one [c, V] buffer of the input dtype (c = `chunk` or
    ``gpuad.kernels.reference.linear_cross_entropy_chunk``; rows padded to ROW_PAD elements),
    12·N bytes, and an fp32 [V, D] accumulator when grad and no dw_accumulate (for fp32 inputs
    it is dw itself). FLOPs: 2·N·D·V (grad=False) or 6·N·D·V.

    check_targets=True raises IndexError for a target outside [0, V) that is not ignore_index
    (a host sync); False removes it: no host sync at all, and a bad target gives an
    unspecified loss but never an out-of-bounds access.
    """
    x, from_cupy = as_torch(x)
    w, targets = as_torch(w)[0], as_torch(targets)[0]
    bias = None if bias is None else as_torch(bias)[0]
    acc_t = None if dw_accumulate is None else as_torch(dw_accumulate)[0]  # the caller's buffer is returned
    grad_scale = None if grad_scale is None else as_torch(grad_scale)[0]
    class_weight = None if class_weight is None else as_torch(class_weight)[0]
    ignore_index = checks.ignore_index_arg(ignore_index)
    checks.check_linear_cross_entropy_args(x, w, targets, bias, reduction, label_smoothing, z_loss, softcap, acc_t,
                                           chunk, grad_scale, allowed=checks.GPU_DTYPES, class_weight=class_weight)
    device = x.device
    for name, a in (("w", w), ("targets", targets), ("bias", bias), ("dw_accumulate", acc_t),
                    ("grad_scale", grad_scale), ("class_weight", class_weight)):
        if a is not None and a.device != device:
            raise ValueError(f"{name} is on {a.device}, x on {device}: all arrays must share one device")
    check_device(device)
    if check_targets:
        checks.check_targets(targets, w.shape[0], ignore_index)
    kernel_ignore = checks.kernel_ignore_index(ignore_index, targets.dtype)  # the kernel compares in int64
    steps = _TorchSteps(x, w, bias, ignore_index=kernel_ignore, smoothing=float(label_smoothing), z_coef=float(z_loss),
                        softcap=softcap, grad=grad, row_scale=grad_scale is not None and grad_scale.dim() == 1,
                        allow_tf32=allow_tf32, class_weight=class_weight)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        out = run_chunks(steps, x, targets.contiguous(), v=w.shape[0], has_bias=bias is not None,
                         dw_accumulate=acc_t, grad_scale=grad_scale, ignore_index=ignore_index, reduction=reduction,
                         need_dx=need_dx, grad=grad, chunk=chunk)
    loss, dx, dw, db, lse = out
    result = (as_given(loss, from_cupy), as_given(dx, from_cupy),
              dw_accumulate if dw_accumulate is not None and grad else as_given(dw, from_cupy),
              as_given(db, from_cupy))
    return result + (as_given(lse, from_cupy),) if return_lse else result


class _TorchSteps(Steps):
    """The chunk loop's steps on torch tensors: torch.mm and the Triton row kernel."""
    float32 = torch.float32

    def __init__(self, x, w, bias, *, ignore_index, smoothing, z_coef, softcap, grad, row_scale, allow_tf32,
                 class_weight=None):
        self.x, self.w, self.device, self.itemsize = x, w, x.device, x.element_size()
        self.v = w.shape[0]
        self.stride = triton.cdiv(self.v, ROW_PAD) * ROW_PAD
        self.bias = bias.contiguous() if bias is not None else None
        self.class_weight = None if class_weight is None else class_weight.to(torch.float32).contiguous()
        self.class_weight_sum = None if class_weight is None else self.class_weight.sum()
        self.meta = _kernel_meta(self.v, has_bias=bias is not None, grad=grad, label_smoothing=smoothing, z_loss=z_coef,
                                 softcap=softcap, row_scale=row_scale, has_weight=class_weight is not None)
        self.scalars = (self.v, ignore_index, smoothing, z_coef, float(softcap) if softcap is not None else 1.0)
        self.allow_tf32 = allow_tf32

    def empty(self, shape, dtype):
        return torch.empty(shape, dtype=dtype, device=self.device)

    def zeros(self, shape, dtype):
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def ones(self, shape, dtype):
        return torch.ones(shape, dtype=dtype, device=self.device)

    def astype(self, a, dtype):
        return a.to(dtype)

    def contiguous(self, a):
        return a.contiguous()

    def mean_divisor(self, targets, ignore_index):
        valid = checks.valid_targets(targets, ignore_index)
        if self.class_weight is None:
            return valid.sum().clamp(min=1).to(torch.float32)
        t = targets.clamp(0, self.v - 1)  # an ignored or bad target reads a weight it does not use
        total = torch.where(valid, self.class_weight[t], 0.0).sum()
        return torch.where(total == 0, 1.0, total)

    def free_bytes(self):
        return _free_bytes(self.device)

    def buffer(self, rows):
        buf = torch.empty((rows, self.stride), dtype=self.x.dtype, device=self.device)
        buf[:, self.v:].zero_()  # the kernel's scratch columns: finite from the start
        return buf

    def chunk(self, buf, rows):
        return buf[:rows, :self.v]

    def precision(self):
        return pinned_fp32_accumulation(self.x.dtype, self.allow_tf32)

    def logits(self, xc, zc):
        torch.mm(xc, self.w.t(), out=zc)

    def rows(self, buf, zc, targets, row_loss, lse, scale):
        bias = self.bias if self.bias is not None else buf
        cw, cw_sum = (self.class_weight, self.class_weight_sum) if self.class_weight is not None else (scale, scale)
        _lce_rows_kernel[(zc.shape[0],)](zc, self.stride, bias, targets, row_loss, lse, scale, cw, cw_sum,
                                         *self.scalars, **self.meta)

    def dx(self, zc, out):
        torch.mm(zc, self.w, out=out)

    @functools.cached_property
    def route(self):
        return dw_route(self.device, self.x.dtype)

    def dw(self, acc, zc, xc):
        _accumulate_dw(acc, zc, xc, self.w, self.route)

    def db(self, acc, zc):
        acc += zc.sum(0, dtype=torch.float32)
