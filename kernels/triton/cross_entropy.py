"""Fused softmax cross-entropy (loss and dlogits) in Triton.

Two kernels share the work, picked by the width V of a row:

* ``_ce_rows_kernel`` (V small enough to sit on chip): a program loads ROWS whole rows
  into registers once and computes loss and gradient from them: one read, one write.
* ``_ce_online_kernel`` (wide rows): persistent programs walk over rows; per row a first
  pass folds BLOCK-wide chunks into an online max and sum (stable log-sum-exp), a second
  pass re-reads the chunks in *reverse* order (the last chunks read are still in L2) and
  writes the gradient. Rows whose start is not 16-byte aligned (V = 50257, say) are split
  into a small unaligned head and tail and an aligned middle, so the middle's loads and
  stores stay vectorised.

Both compute in fp32, use 64-bit element offsets (B·V ≥ 2³¹ is fine), mask every access,
and skip the reads of ignored rows. No float atomics: each program writes its own rows'
losses into an fp32 [B] buffer that torch sums, so results are the same bits every run.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .. import checks
from .interop import as_given, as_torch

# A row is held in registers (one read of the logits) when next_power_of_2(V) is at most
# this many elements: at 16 warps that is ≤ 32 fp32 values a thread, which does not spill.
# Wider rows (32000, 50257, 128256) use the two-pass kernel.
SINGLE_PASS_MAX = 16384
# Bytes of logits one two-pass program loads per chunk: 32 KiB keeps enough loads in flight
# per SM to cover HBM latency (bf16: 16384 elements, fp32: 8192; 16 warps, 16 B vectors).
TWO_PASS_CHUNK_BYTES = 32768
PROGRAMS_PER_SM = 1
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _ce_rows_kernel(x_ptr, g_ptr, t_ptr, loss_ptr, n_valid_ptr, n_rows, n_cols, stride, ignore_index, eps,
                    ROWS: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr,
                    HAS_GRAD: tl.constexpr, MEAN: tl.constexpr, SMOOTH: tl.constexpr):
    """ROWS whole rows per program, BLOCK = next_power_of_2(V) columns, one read of each row."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    t = tl.load(t_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    valid = row_ok & (t != ignore_index)
    starts = rows.to(tl.int64) * stride
    width = n_cols
    if ALIGNED:  # stride and V are multiples of 16 bytes: tell the compiler so it can vectorise
        starts = tl.multiple_of(starts, VEC)
        width = n_cols // VEC * VEC
    cols = tl.arange(0, BLOCK)
    col_ok = cols < width
    offs = starts[:, None] + cols[None, :]
    x = tl.load(x_ptr + offs, mask=valid[:, None] & col_ok[None, :], other=float("-inf")).to(tl.float32)

    m = tl.max(x, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)  # ignored rows are all -inf: keep them NaN-free
    shifted = x - m[:, None]
    e = tl.exp(shifted)
    s = tl.where(valid, tl.sum(e, axis=1), 1.0)  # 1 on ignored rows: no log(0) or 0/0
    is_t = cols[None, :] == t[:, None]  # an out-of-range target matches no column: no stray access
    loss = tl.log(s) - (1.0 - eps) * tl.sum(tl.where(is_t, shifted, 0.0), axis=1)
    if SMOOTH:
        loss -= eps / n_cols * tl.sum(tl.where(col_ok[None, :], shifted, 0.0), axis=1)
    tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=row_ok)

    if HAS_GRAD:
        scale = 1.0
        if MEAN:
            scale = 1.0 / tl.maximum(tl.load(n_valid_ptr), 1).to(tl.float32)
        g = e * (1.0 / s)[:, None]
        if SMOOTH:
            g -= eps / n_cols
        g = tl.where(is_t, g - (1.0 - eps), g) * scale
        g = tl.where(valid[:, None], g, 0.0)
        tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _fold(m, s, sx, x, mask, SMOOTH: tl.constexpr):
    """Fold a chunk x (fp32, -inf where masked) into the running max m, Σexp(x - m) s, Σx sx."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
    if SMOOTH:
        sx += tl.sum(tl.where(mask, x, 0.0), axis=0)
    return m_new, s, sx


@triton.jit
def _grad(x, offs, shift, log_s, target, eps, n_cols, scale, valid, SMOOTH: tl.constexpr):
    """dloss/dx for a chunk: (softmax - (1-eps)·onehot - eps/V) · scale, 0 on ignored rows.

    softmax = exp((x - max) - log Σexp(x - max)): subtracting the max first keeps huge
    logits (±1e4) exact, where x - logsumexp(x) would lose ~1e-3 to rounding."""
    g = tl.exp((x - shift) - log_s)
    if SMOOTH:
        g -= eps / n_cols
    g = tl.where(offs == target, g - (1.0 - eps), g)
    return tl.where(valid, g * scale, 0.0)


@triton.jit
def _ce_online_kernel(x_ptr, g_ptr, t_ptr, loss_ptr, n_valid_ptr, n_rows, n_cols, stride, ignore_index, eps,
                      BLOCK: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr,
                      HAS_GRAD: tl.constexpr, MEAN: tl.constexpr, SMOOTH: tl.constexpr):
    """Persistent: program p takes rows p, p + P, ...; two passes over BLOCK-wide chunks a row."""
    pid = tl.program_id(0)
    scale = 1.0
    if MEAN:
        scale = 1.0 / tl.maximum(tl.load(n_valid_ptr), 1).to(tl.float32)
    lanes = tl.arange(0, BLOCK)
    edge = tl.arange(0, 2 * VEC)
    for row in range(pid, n_rows, tl.num_programs(0)):
        t = tl.load(t_ptr + row).to(tl.int64)
        valid = t != ignore_index
        start = tl.cast(row, tl.int64) * stride
        end = start + n_cols
        # [lo, hi) is the row's 16-byte aligned middle; [start, lo) and [hi, end) are < VEC wide.
        if ALIGNED:
            lo = tl.multiple_of(start, VEC)
            hi = tl.multiple_of(start + n_cols // VEC * VEC, VEC)
        else:
            lo = tl.multiple_of((start + VEC - 1) // VEC * VEC, VEC)
            hi = tl.multiple_of(end // VEC * VEC, VEC)
            e_offs = tl.where(edge < VEC, start + edge, hi + edge - VEC)
            e_mask = valid & tl.where(edge < VEC, e_offs < lo, e_offs < end)
        # The middle is addressed from its own base pointer with int32 offsets.
        x_mid = x_ptr + lo
        g_mid = g_ptr + lo
        width = (hi - lo).to(tl.int32)
        n_chunks = tl.cdiv(width, BLOCK)

        # Pass 1: online max and sum of exp (chunks of ignored rows are not read).
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        sx = tl.zeros((), tl.float32)
        for k in range(0, tl.where(valid, n_chunks, 0)):
            cols = k * BLOCK + lanes
            mask = cols < width
            xc = tl.load(x_mid + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m, s, sx = _fold(m, s, sx, xc, mask, SMOOTH)
        if not ALIGNED:
            xe = tl.load(x_ptr + e_offs, mask=e_mask, other=float("-inf")).to(tl.float32)
            m, s, sx = _fold(m, s, sx, xe, e_mask, SMOOTH)
        target = start + tl.minimum(tl.maximum(t, 0), n_cols - 1)  # clamped: never out of the row
        x_t = tl.load(x_ptr + target, mask=valid, other=0.0).to(tl.float32)
        shift = tl.where(m == float("-inf"), 0.0, m)
        s = tl.where(valid, s, 1.0)  # ignored rows: s = 0; keep log finite
        loss = tl.log(s) - (1.0 - eps) * (x_t - shift)
        if SMOOTH:
            loss -= eps * (sx / n_cols - shift)
        tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))

        # Pass 2, last chunk first: the chunks read last in pass 1 are the likeliest in L2.
        if HAS_GRAD:
            log_s = tl.log(s)
            # Unclamped targets: an out-of-range one matches no column of this row.
            t_mid = t - (lo - start)
            for i in range(0, n_chunks):
                cols = (n_chunks - 1 - i) * BLOCK + lanes
                mask = cols < width
                xc = tl.load(x_mid + cols, mask=mask & valid, other=0.0).to(tl.float32)
                gc = _grad(xc, cols, shift, log_s, t_mid, eps, n_cols, scale, valid, SMOOTH)
                tl.store(g_mid + cols, gc.to(g_ptr.dtype.element_ty), mask=mask)
            if not ALIGNED:
                xe = tl.load(x_ptr + e_offs, mask=e_mask, other=0.0).to(tl.float32)
                ge = _grad(xe, e_offs, shift, log_s, start + t, eps, n_cols, scale, valid, SMOOTH)
                e_store = tl.where(edge < VEC, e_offs < lo, e_offs < end)  # ignored rows too: zeros
                tl.store(g_ptr + e_offs, ge.to(g_ptr.dtype.element_ty), mask=e_store)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device; the interpreter gets a pretend GPU of 4."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _kernel_config(n_rows: int, n_cols: int, stride: int, elem_size: int, *, grad: bool, reduction: str,
                   label_smoothing: float):
    """The one place where the kernel and its compile-time parameters are chosen: a pure
    function (no device), also used by the ahead-of-time compile test.

    Returns (kernel, meta): meta holds every constexpr and num_warps of the launch.

    * next_power_of_2(V) ≤ SINGLE_PASS_MAX: one read. ROWS rows a program so that a program
      holds ≥ 2048 elements (small V would otherwise leave most lanes idle); warps so that
      a thread holds ~16 elements (32 at the 16384-wide tile: up to 128 registers; unaligned
      rows with a gradient spill 4 to 64 bytes a thread when compiled for sm_90).
    * wider: two passes over chunks of TWO_PASS_CHUNK_BYTES with 16 warps (ptxas gives 64
      registers a thread at sm_90 and spills up to 36 bytes on unaligned rows) and a
      persistent grid (see _grid). tests/test_triton_compile.py holds every variant to a
      64-byte spill budget.
    """
    block_v = triton.next_power_of_2(n_cols)
    if block_v <= max(SINGLE_PASS_MAX, 16):
        rows = min(max(1, 2048 // block_v), 256, triton.next_power_of_2(n_rows))
        warps = min(16, max(1, rows * block_v // 512))
        kernel, meta = _ce_rows_kernel, dict(ROWS=rows, BLOCK=block_v, num_warps=warps)
    else:
        block = min(block_v, max(16, TWO_PASS_CHUNK_BYTES // elem_size))
        kernel, meta = _ce_online_kernel, dict(BLOCK=block, num_warps=16)
    vec = 16 // elem_size
    meta.update(VEC=vec, ALIGNED=stride % vec == 0 and n_cols % vec == 0, HAS_GRAD=bool(grad),
                MEAN=reduction == "mean", SMOOTH=float(label_smoothing) > 0.0)
    return kernel, meta


def _grid(kernel, meta: dict, n_rows: int, device: torch.device) -> tuple:
    """Row kernel: one program per ROWS rows. Two-pass kernel: persistent, PROGRAMS_PER_SM
    programs an SM. With one, the rows in flight are n_SM · row bytes (33 MB at V = 128256
    bf16 on H100/H200), under the 50 MB L2, so the second pass, run backwards, re-reads mostly
    from L2. Two would fit by registers (more loads in flight, but 66 MB of rows): the choice
    between them is for a measurement on the device."""
    if kernel is _ce_rows_kernel:
        return (triton.cdiv(n_rows, meta["ROWS"]),)
    return (min(n_rows, _sm_count(device) * PROGRAMS_PER_SM),)


def softmax_cross_entropy(logits, targets, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                          inplace=False, grad=True, check_targets=True):
    """Softmax cross-entropy and its gradient in one fused kernel.

    logits [B, V] float32/float16/bfloat16 and targets [B] integer: torch tensors on a CUDA
    device (CPU tensors under TRITON_INTERPRET=1) or CuPy arrays; results come back in the
    type given. Returns (loss, dlogits): loss float32, 0-d for reduction "mean"/"sum", [B]
    for "none"; dlogits = dloss/dlogits [B, V] in the logits' dtype (for "none": of the sum
    of the row losses), or None when grad=False (then the logits are read once and no
    B×V buffer is made). Label smoothing eps uses the target distribution
    (1 - eps)·onehot + eps/V. Rows whose target == ignore_index get loss 0 and gradient 0
    and are not counted in the mean (all ignored: loss 0). inplace=True writes dlogits over
    `logits` and returns that buffer.

    check_targets=True (default) raises IndexError for a target outside [0, V) that is not
    ignore_index; it is the only host synchronisation in the call. check_targets=False
    removes it (e.g. for CUDA-graph capture); out-of-range targets then give unspecified
    losses but never an out-of-bounds access.
    """
    x, from_cupy = as_torch(logits)
    t, _ = as_torch(targets)
    checks.check_cross_entropy_args(x, t, reduction, label_smoothing, allowed=("float16", "bfloat16", "float32"))
    if x.device != t.device:
        raise ValueError(f"logits and targets must be on one device, got {x.device} and {t.device}")
    if x.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")
    n_rows, n_cols = x.shape
    if check_targets:
        checks.check_targets(t, n_cols, ignore_index)
    eps = float(label_smoothing)

    target_buf = t.contiguous()
    # The kernel addresses logits and gradient with one row stride and unit column stride.
    work = x if x.stride(1) == 1 or n_rows == 0 else x.contiguous()
    if not grad:
        out = None
    elif inplace:
        out = work
    else:
        out = torch.empty_strided((n_rows, n_cols), (max(work.stride(0), 1), 1), dtype=x.dtype, device=x.device)
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    n_valid = (target_buf != ignore_index).sum()

    if n_rows > 0:
        stride = work.stride(0)
        kernel, meta = _kernel_config(n_rows, n_cols, stride, x.element_size(), grad=out is not None,
                                      reduction=reduction, label_smoothing=eps)
        kernel[_grid(kernel, meta, n_rows, x.device)](
            work, out if out is not None else work, target_buf, row_loss, n_valid,
            n_rows, n_cols, stride, ignore_index, eps, **meta)

    if reduction == "none":
        loss = row_loss
    else:
        loss = row_loss.sum()
        if reduction == "mean":
            loss = loss / n_valid.clamp(min=1).to(torch.float32)
    if out is None:
        dlogits = None
    elif inplace:
        if work is not x:  # a logits buffer with non-unit column stride: copy the gradient back
            x.copy_(work)
        dlogits = logits
    else:
        dlogits = as_given(out, from_cupy)
    return as_given(loss, from_cupy), dlogits
