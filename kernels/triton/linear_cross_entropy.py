"""Fused LM head on torch tensors: the chunk loop of ``gpuad.kernels.lm_head`` (its design,
memory and FLOPs) with torch's cuBLAS GEMMs and the Triton kernels below, in one of two
schedules (the tuning space OP, read per call):

- "token": cuBLAS writes each chunk's logits; _lce_rows_kernel reads them twice (lse, then
  the gradient) and writes the gradient over them (_TorchSteps).
- "token_lse": _lce_logits_kernel writes the chunk's logits (+ bias, soft-capped) and, from its
  epilogue, each row's (max, Σexp, Σz) per column tile; _lce_lse_rows_kernel combines them into
  lse and reads the logits once (_TorchLseSteps). dx, dw and db as "token".

    x [N, D], w [V, D] (PyTorch's layout), targets [N], bias [V] or None
    loss, dx = ∂loss/∂x, dw = ∂loss/∂w, db = ∂loss/∂bias  (and lse [N] on request)

The logits buffer's rows are padded to a multiple of ROW_PAD elements (aligned GEMM leading
dimension; the row kernels use the padding as scratch). By default a chunk is min(N,
rows_per_chunk) rows, 2048 unless the GPU's tuned table says 4096 (``linear_cross_entropy_chunk``,
with its memory caps); `chunk` changes it.

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

from .. import checks, tuning
from ..lm_head import Steps, run_chunks
from .interop import as_given, as_torch, check_device, device_info
from .linear_backward import linear_backward as _triton_linear_backward
from .precision import pinned_fp32_accumulation

ROW_PAD = 64  # the buffer's row stride is a multiple of this many elements (aligned GEMM leading dim)
MAX_BLOCK = 4096  # columns a program handles per step of its loop over V
MAX_TILES = 1024  # column tiles' statistics the "token_lse" row kernel combines per step
#: The "token_lse" logits GEMM's tile by input element size: (BM, BN, BK, warps, stages). BN is
#: the column tile of the row statistics (bench/lm_head_model.py's TILE_N).
GEMM_TILES = {2: (128, 128, 64, 8, 3), 4: (128, 128, 32, 8, 3)}

OP = "triton.linear_cross_entropy"
#: The tuning space (tuning.register). schedule: "token" (cuBLAS logits GEMM, then the row
#: kernel's two passes over each logits chunk) or "token_lse" (a Triton logits GEMM whose
#: epilogue writes per-row statistics of each column tile, then one pass); rows_per_chunk: the
#: chunk's rows when `chunk` is None (before the memory caps of linear_cross_entropy_chunk).
SPACE = {"schedule": ("token", "token_lse"), "rows_per_chunk": (2048, 4096)}
DEFAULTS = {"schedule": "token", "rows_per_chunk": 2048}
tuning.register(OP, SPACE, DEFAULTS)


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
def _row_scale(scale_ptr, row, ROW_SCALE: tl.constexpr):
    """The row's gradient factor: scale_ptr[row] (ROW_SCALE) or scale_ptr[0]."""
    if ROW_SCALE:
        scale = tl.load(scale_ptr + row)
    else:
        scale = tl.load(scale_ptr)
    return scale


@triton.jit
def _row_loss(row, row_ptr, b_ptr, t, valid, loss_ptr, lse_ptr, cw_ptr, cw_sum_ptr, n_cols, lse, sz, smoothing,
              z_coef, cap, HAS_BIAS: tl.constexpr, CAP: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr,
              HAS_WEIGHT: tl.constexpr):
    """Stores the row's loss (0 when not valid) and lse from lse and sz (Σz, or Σ c·z with class
    weights); the target's logit is row_ptr[t] (+ bias, soft-capped when CAP). Returns the
    gradient's softmax coefficient and the target's class weight c_t."""
    t_col = tl.minimum(tl.maximum(t, 0), n_cols - 1)  # clamped: never outside the row
    z_t = tl.load(row_ptr + t_col).to(tl.float32)
    if HAS_BIAS:
        z_t += tl.load(b_ptr + t_col).to(tl.float32)
    if CAP:
        z_t = cap * _tanh(z_t / cap)
    c_t = 1.0  # the target's class weight and the row's target mass
    mass = 1.0
    if HAS_WEIGHT:
        c_t = tl.load(cw_ptr + t_col)
        mass = (1.0 - smoothing) * c_t
        if SMOOTH:
            mass += smoothing / n_cols * tl.load(cw_sum_ptr)
    loss = mass * lse - (1.0 - smoothing) * c_t * z_t
    if SMOOTH:
        loss -= smoothing / n_cols * sz
    if ZLOSS:
        loss += z_coef * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + row, lse)
    coef = mass
    if ZLOSS:
        coef = 1.0 + 2.0 * z_coef * lse
    return coef, c_t


@triton.jit
def _grad_pass(row_ptr, b_ptr, cw_ptr, t, valid, scale, coef, c_t, shift, log_s, n_cols, stride, smoothing, cap,
               BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, CAP: tl.constexpr, SMOOTH: tl.constexpr,
               SOFTCAP: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """Writes dloss/dz over one row, BLOCK columns a step, last piece first (the likeliest still
    in L2); z is row_ptr's value (+ bias, soft-capped when CAP), lse = shift + log_s:
        g = (softmax·coef - (smoothing/V)·c - (1 - smoothing)·c_t·onehot) · (1 - (z/cap)²) · scale
    (c = 1 without class weights; the soft-cap factor with SOFTCAP); zeros on rows not valid,
    which it does not read. Loads and stores cover `cols < stride`, the arithmetic `cols < V`."""
    lanes = tl.arange(0, BLOCK)
    n_blocks = tl.cdiv(n_cols, BLOCK)
    for i in range(0, n_blocks):
        cols = (n_blocks - 1 - i) * BLOCK + lanes
        in_row = cols < stride
        z = _logits(row_ptr, b_ptr, cols, in_row & valid, cols < n_cols, cap, HAS_BIAS, CAP)
        g = tl.exp((z - shift) - log_s) * coef
        if SMOOTH:
            if HAS_WEIGHT:
                g -= smoothing / n_cols * tl.load(cw_ptr + cols, mask=cols < n_cols, other=0.0)
            else:
                g -= smoothing / n_cols
        g = tl.where(cols == t, g - (1.0 - smoothing) * c_t, g)  # unclamped t: out of range matches nothing
        if SOFTCAP:
            g *= 1.0 - (z / cap) * (z / cap)
        g = tl.where(valid, g * scale, 0.0)
        tl.store(row_ptr + cols, g.to(row_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _lce_rows_kernel(z_ptr, stride, b_ptr, t_ptr, loss_ptr, lse_ptr, scale_ptr, cw_ptr, cw_sum_ptr, n_cols,
                     ignore_index, smoothing, z_coef, cap, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_GRAD: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr, SOFTCAP: tl.constexpr,
                     ROW_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """One program per row of the chunk z [rows, V] (row stride `stride`), schedule "token".

    The rows are the launcher's buffer, padded to a multiple of ROW_PAD elements: columns
    [V, stride) are scratch that the kernel may read and write, so its loads and stores are
    masked by `cols < stride` (whole 16-byte vectors, whatever V) and only the arithmetic by
    `cols < V`. Pass 1 folds BLOCK-wide pieces of z (+ bias, soft-capped) into an online max
    and Σexp (and Σz, or Σ c·z with class weights, for smoothing), giving lse; the row loss
    and lse go to loss_ptr / lse_ptr (_row_loss). Pass 2 (HAS_GRAD) writes the gradient over
    z (_grad_pass) with scale = scale_ptr[row] (ROW_SCALE) or scale_ptr[0]. With class weights
    c (HAS_WEIGHT: cw_ptr [V] fp32, cw_sum_ptr their 0-d sum; no z-loss) the row loss is
    m·lse - (1 - ε)·c_t·z_t - (ε/V)·Σ c·z and the softmax coefficient m = (1 - ε)·c_t +
    (ε/V)·Σ c (ε = smoothing); with z-loss it is 1 + 2·z_coef·lse. Out-of-range targets never
    address memory outside the row."""
    row = tl.program_id(0)
    t = tl.load(t_ptr + row).to(tl.int64)
    valid = t != ignore_index
    row_ptr = z_ptr + row.to(tl.int64) * stride
    lanes = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    sz = tl.zeros((), tl.float32)
    for k in range(0, tl.cdiv(n_cols, BLOCK)):
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
    coef, c_t = _row_loss(row, row_ptr, b_ptr, t, valid, loss_ptr, lse_ptr, cw_ptr, cw_sum_ptr, n_cols,
                          shift + log_s, sz, smoothing, z_coef, cap, HAS_BIAS, SOFTCAP, SMOOTH, ZLOSS, HAS_WEIGHT)
    if HAS_GRAD:
        _grad_pass(row_ptr, b_ptr, cw_ptr, t, valid, _row_scale(scale_ptr, row, ROW_SCALE), coef, c_t, shift, log_s,
                   n_cols, stride, smoothing, cap, BLOCK, HAS_BIAS, SOFTCAP, SMOOTH, SOFTCAP, HAS_WEIGHT)


@triton.jit
def _tile_stats(acc, z_ptr, p_ptr, b_ptr, cw_ptr, rows, cols, row_ok, col_ok, stride, n_tiles, tile, cap,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """The logits GEMM's epilogue: z = acc (+ bias, soft-capped) stored in z's dtype at
    z_ptr[rows, cols], and per row, from the stored values, the tile's (max, Σexp(z - max), Σz
    (or Σ c·z with class weights; SMOOTH only)) at p_ptr[row, tile, 0:3]."""
    z = acc
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        z = cap * _tanh(z / cap)
    zq = z.to(z_ptr.dtype.element_ty)
    rows64 = rows.to(tl.int64)
    tl.store(z_ptr + rows64[:, None] * stride + cols[None, :], zq, mask=row_ok[:, None] & col_ok[None, :])
    z = tl.where(col_ok[None, :], zq.to(tl.float32), float("-inf"))
    m = tl.max(z, axis=1)
    shift = tl.where(m == float("-inf"), 0.0, m)
    p = p_ptr + (rows64 * n_tiles + tile) * 3
    tl.store(p, m, mask=row_ok)
    tl.store(p + 1, tl.sum(tl.exp(z - shift[:, None]), axis=1), mask=row_ok)
    if SMOOTH:
        z = tl.where(col_ok[None, :], z, 0.0)
        if HAS_WEIGHT:
            z = z * tl.load(cw_ptr + cols, mask=col_ok, other=0.0)[None, :]
        tl.store(p + 2, tl.sum(z, axis=1), mask=row_ok)


@triton.jit
def _lce_logits_kernel(x_ptr, w_ptr, z_ptr, p_ptr, b_ptr, cw_ptr, n_rows, n_cols, n_k, sx_m, sx_k, sw_n, sw_k,
                       stride, cap, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr,
                       SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Schedule "token_lse", step 1: z [rows, V] (row stride `stride`) = x [rows, D] @ w [V, D]ᵀ
    (+ bias, soft-capped) with fp32 accumulation, one BM×BN tile a program, and the tile's row
    statistics from its epilogue (_tile_stats) into p [rows, cdiv(V, BN), 3] fp32. Row tiles
    vary fastest, so the programs that share a tile of w run together (its re-reads hit L2).
    Every tile owns its outputs: no atomics."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(n_rows, BM)
    pid_m = pid % n_m
    pid_n = pid // n_m
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    a_ptrs = x_ptr + rows.to(tl.int64)[:, None] * sx_m + ks[None, :] * sx_k
    b_ptrs = w_ptr + cols.to(tl.int64)[:, None] * sw_n + ks[None, :] * sw_k
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, tl.cdiv(n_k, BK)):
        k_ok = k * BK + ks < n_k
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        a_ptrs += BK * sx_k
        b_ptrs += BK * sw_k
    _tile_stats(acc, z_ptr, p_ptr, b_ptr, cw_ptr, rows, cols, row_ok, col_ok, stride, tl.cdiv(n_cols, BN), pid_n,
                cap, HAS_BIAS, SOFTCAP, SMOOTH, HAS_WEIGHT)


@triton.jit
def _combine_stats(p_ptr, n_tiles, TILES: tl.constexpr, SMOOTH: tl.constexpr):
    """(shift, log Σexp(z - shift), Σz) of one row from its tiles' (max, Σexp, Σz) at p_ptr
    [n_tiles, 3], TILES a step (Σz 0 without SMOOTH)."""
    lanes = tl.arange(0, TILES)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    sz = tl.zeros((), tl.float32)
    for k in range(0, tl.cdiv(n_tiles, TILES)):
        j = k * TILES + lanes
        ok = j < n_tiles
        m_j = tl.load(p_ptr + j * 3, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(m_j, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_j = tl.load(p_ptr + j * 3 + 1, mask=ok, other=0.0)
        s = s * tl.exp(m - shift) + tl.sum(s_j * tl.exp(m_j - shift), axis=0)
        m = m_new
        if SMOOTH:
            sz += tl.sum(tl.load(p_ptr + j * 3 + 2, mask=ok, other=0.0), axis=0)
    return tl.where(m == float("-inf"), 0.0, m), tl.log(s), sz


@triton.jit
def _lce_lse_rows_kernel(z_ptr, stride, p_ptr, n_tiles, t_ptr, loss_ptr, lse_ptr, scale_ptr, cw_ptr, cw_sum_ptr,
                         n_cols, ignore_index, smoothing, z_coef, cap, BLOCK: tl.constexpr, TILES: tl.constexpr,
                         HAS_GRAD: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr, SOFTCAP: tl.constexpr,
                         ROW_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """Schedule "token_lse", step 2: one program per row of the chunk z [rows, V], which
    _lce_logits_kernel wrote with bias and soft-cap applied. The row's lse comes from its tiles'
    statistics p [rows, n_tiles, 3] (_combine_stats); the row loss and lse go to loss_ptr /
    lse_ptr; then (HAS_GRAD) one pass over z writes the gradient over it, as _lce_rows_kernel's
    pass 2 (the soft-cap factor from the capped z). Same padding and targets contract."""
    row = tl.program_id(0)
    t = tl.load(t_ptr + row).to(tl.int64)
    valid = t != ignore_index
    row_ptr = z_ptr + row.to(tl.int64) * stride
    shift, log_s, sz = _combine_stats(p_ptr + row.to(tl.int64) * n_tiles * 3, n_tiles, TILES, SMOOTH)
    coef, c_t = _row_loss(row, row_ptr, z_ptr, t, valid, loss_ptr, lse_ptr, cw_ptr, cw_sum_ptr, n_cols,
                          shift + log_s, sz, smoothing, z_coef, cap, False, False, SMOOTH, ZLOSS, HAS_WEIGHT)
    if HAS_GRAD:
        _grad_pass(row_ptr, z_ptr, cw_ptr, t, valid, _row_scale(scale_ptr, row, ROW_SCALE), coef, c_t, shift, log_s,
                   n_cols, stride, smoothing, cap, BLOCK, False, False, SMOOTH, SOFTCAP, HAS_WEIGHT)


def _kernel_meta(n_cols: int, *, has_bias: bool, grad: bool, label_smoothing: float, z_loss: float,
                 softcap, row_scale: bool, has_weight: bool = False) -> dict:
    """Every constexpr and num_warps of a _lce_rows_kernel launch (a pure function of the shape
    and options, no device)."""
    block = min(triton.next_power_of_2(n_cols), MAX_BLOCK)
    return dict(BLOCK=block, HAS_BIAS=has_bias, HAS_GRAD=bool(grad), SMOOTH=float(label_smoothing) > 0.0,
                ZLOSS=float(z_loss) > 0.0, SOFTCAP=softcap is not None, ROW_SCALE=row_scale, HAS_WEIGHT=has_weight,
                num_warps=4 if block <= 1024 else 8)


def _lse_meta(n_cols: int, n_tiles: int, **options) -> dict:
    """Every constexpr and num_warps of a _lce_lse_rows_kernel launch over rows of `n_tiles`
    column tiles (options: _kernel_meta's but has_bias)."""
    meta = _kernel_meta(n_cols, has_bias=False, **options)
    del meta["HAS_BIAS"]  # the logits kernel added the bias
    return dict(meta, TILES=min(triton.next_power_of_2(n_tiles), MAX_TILES))


def _n_tiles(n_cols: int, itemsize: int) -> int:
    """Column tiles of the "token_lse" logits GEMM (each BN wide) for inputs of `itemsize` bytes."""
    return triton.cdiv(n_cols, GEMM_TILES[itemsize][1])


def _gemm_meta(dtype: torch.dtype, *, has_bias: bool, label_smoothing: float, softcap, has_weight: bool,
               allow_tf32: bool) -> dict:
    """Every constexpr, num_warps and num_stages of a _lce_logits_kernel launch."""
    bm, bn, bk, warps, stages = GEMM_TILES[torch.finfo(dtype).bits // 8]
    return dict(BM=bm, BN=bn, BK=bk, HAS_BIAS=has_bias, SOFTCAP=softcap is not None,
                SMOOTH=float(label_smoothing) > 0.0, HAS_WEIGHT=has_weight,
                PRECISION="tf32" if allow_tf32 and dtype == torch.float32 else "ieee", num_warps=warps,
                num_stages=stages)


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
    it is dw itself); schedule "token_lse" adds 12 bytes a row of the chunk and tile of
    GEMM_TILES' BN columns. FLOPs: 2·N·D·V (grad=False) or 6·N·D·V.

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
    params = tuning.launch_values(OP, device_info(device)[0])
    row_scale = grad_scale is not None and grad_scale.dim() == 1
    steps = STEPS[params["schedule"]](x, w, bias, ignore_index=kernel_ignore, smoothing=float(label_smoothing),
                                      z_coef=float(z_loss), softcap=softcap, grad=grad, row_scale=row_scale,
                                      allow_tf32=allow_tf32, class_weight=class_weight)
    steps.rows_per_chunk = params["rows_per_chunk"]
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
        self.metas = self.kernel_metas(self.v, x.dtype, has_bias=bias is not None, smoothing=smoothing, z_coef=z_coef,
                                       softcap=softcap, grad=grad, row_scale=row_scale, allow_tf32=allow_tf32,
                                       has_weight=class_weight is not None)
        self.scalars = (self.v, ignore_index, smoothing, z_coef, float(softcap) if softcap is not None else 1.0)
        self.allow_tf32 = allow_tf32

    @staticmethod
    def kernel_metas(v, dtype, *, has_bias, smoothing, z_coef, softcap, grad, row_scale, allow_tf32, has_weight):
        """{kernel name: its constexprs and launch options} of each Triton kernel this schedule
        launches on [rows, v] chunks of `dtype` inputs (a pure function of the shape and
        options, no device; the sweep's plan counts compiles with it)."""
        return {"_lce_rows_kernel": _kernel_meta(v, has_bias=has_bias, grad=grad, label_smoothing=smoothing,
                                                 z_loss=z_coef, softcap=softcap, row_scale=row_scale,
                                                 has_weight=has_weight)}

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

    def logits(self, buf, xc, zc):
        torch.mm(xc, self.w.t(), out=zc)

    def rows(self, buf, zc, targets, row_loss, lse, scale):
        bias = self.bias if self.bias is not None else buf
        cw, cw_sum = (self.class_weight, self.class_weight_sum) if self.class_weight is not None else (scale, scale)
        _lce_rows_kernel[(zc.shape[0],)](zc, self.stride, bias, targets, row_loss, lse, scale, cw, cw_sum,
                                         *self.scalars, **self.metas["_lce_rows_kernel"])

    def dx(self, zc, out):
        torch.mm(zc, self.w, out=out)

    @functools.cached_property
    def route(self):
        return dw_route(self.device, self.x.dtype)

    def dw(self, acc, zc, xc):
        _accumulate_dw(acc, zc, xc, self.w, self.route)

    def db(self, acc, zc):
        acc += zc.sum(0, dtype=torch.float32)


class _TorchLseSteps(_TorchSteps):
    """Schedule "token_lse": the logits GEMM in Triton (_lce_logits_kernel: bias and soft-cap
    applied, row statistics per column tile from its epilogue), then _lce_lse_rows_kernel's one
    pass; dx, dw and db as "token". The buffer is (logits [rows, stride], statistics [rows,
    tiles, 3] fp32): 12 bytes a row and column tile more than "token"."""

    def __init__(self, x, w, bias, **options):
        """Options: _TorchSteps's."""
        super().__init__(x, w, bias, **options)
        self.n_tiles = _n_tiles(self.v, self.itemsize)

    @staticmethod
    def kernel_metas(v, dtype, *, has_bias, smoothing, z_coef, softcap, grad, row_scale, allow_tf32, has_weight):
        """As _TorchSteps.kernel_metas: the logits GEMM and the one-pass row kernel."""
        return {"_lce_logits_kernel": _gemm_meta(dtype, has_bias=has_bias, label_smoothing=smoothing, softcap=softcap,
                                                 has_weight=has_weight, allow_tf32=allow_tf32),
                "_lce_lse_rows_kernel": _lse_meta(v, _n_tiles(v, dtype.itemsize), grad=grad, label_smoothing=smoothing,
                                                  z_loss=z_coef, softcap=softcap, row_scale=row_scale,
                                                  has_weight=has_weight)}

    def buffer(self, rows):
        return super().buffer(rows), torch.empty((rows, self.n_tiles, 3), dtype=torch.float32, device=self.device)

    def chunk(self, buf, rows):
        return super().chunk(buf[0], rows)

    def logits(self, buf, xc, zc):
        m = self.metas["_lce_logits_kernel"]
        grid = (triton.cdiv(xc.shape[0], m["BM"]) * self.n_tiles,)
        bias = self.bias if self.bias is not None else zc
        cw = self.class_weight if self.class_weight is not None else zc
        _lce_logits_kernel[grid](xc, self.w, zc, buf[1], bias, cw, xc.shape[0], self.v, xc.shape[1], *xc.stride(),
                                 *self.w.stride(), self.stride, self.scalars[4], **m)

    def rows(self, buf, zc, targets, row_loss, lse, scale):
        cw, cw_sum = (self.class_weight, self.class_weight_sum) if self.class_weight is not None else (scale, scale)
        _lce_lse_rows_kernel[(zc.shape[0],)](zc, self.stride, buf[1], self.n_tiles, targets, row_loss, lse, scale, cw,
                                             cw_sum, *self.scalars, **self.metas["_lce_lse_rows_kernel"])


#: The Steps of each schedule of the tuning space.
STEPS = {"token": _TorchSteps, "token_lse": _TorchLseSteps}
