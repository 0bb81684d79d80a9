"""The general kernel of the fused softmax cross-entropy in Triton: F.cross_entropy's class
weights, probability targets and [C] and [B, C, d1, ...] layouts.

``_ce_general_kernel`` (not a tuning candidate) takes ROWS rows a program, two passes over
class chunks, the logits addressed through (batch, class, spatial) strides so that a [B, C, T]
tensor is read in place, rows side by side; it reads the weight vector and, for probability
targets, a second [B, C, ...] array in both passes. Its "mean" divisor (Σ w_t of the rows not
ignored) comes from ``_ce_denominator_kernel``, its sum from ``_ce_finish_denom_kernel``.
Everything computes in fp32, uses 64-bit element offsets, masks every access and skips the
reads of ignored rows. The launcher is ``cross_entropy.softmax_cross_entropy``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .cross_entropy_rows import _LOWEST, _sum_losses


@triton.jit
def _ce_denominator_kernel(t_ptr, w_ptr, out_ptr, n_rows, n_cols, ignore_index, HAS_WEIGHT: tl.constexpr,
                           BLOCK: tl.constexpr):
    """One program: out_ptr[0] = Σ w[t] (HAS_WEIGHT, fp64 lanes, a fixed order) or the number of
    rows whose target != ignore_index; 1 where that is 0 (every row ignored: loss 0)."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, n_rows, BLOCK):
        idx = start + offs
        t = tl.load(t_ptr + idx, mask=idx < n_rows, other=0).to(tl.int64)
        ok = (idx < n_rows) & (t != ignore_index)
        if HAS_WEIGHT:
            safe = tl.minimum(tl.maximum(t, 0), n_cols - 1)
            acc += tl.load(w_ptr + safe, mask=ok, other=0.0).to(tl.float64)
        else:
            acc += ok.to(tl.float64)
    total = tl.sum(acc, axis=0)
    tl.store(out_ptr, tl.where(total == 0.0, 1.0, total).to(tl.float32))


@triton.jit
def _ce_finish_denom_kernel(row_loss_ptr, out_ptr, denom_ptr, n_rows, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """One program: out_ptr[0] = Σ row losses (fp64 lanes, a fixed order), / denom_ptr[0] for "mean"."""
    total = _sum_losses(row_loss_ptr, n_rows, BLOCK)
    if MEAN:
        total = total / tl.load(denom_ptr).to(tl.float64)
    tl.store(out_ptr, total.to(tl.float32))


@triton.jit
def _target_mass(q_ptr, q_offs, w_ptr, cols, col_ok, mask, t, w_t, eps, n_cols, SOFT: tl.constexpr,
                 HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr):
    """The row's weighted target distribution a on a [ROWS, BLOCK] chunk, 0 where masked:
    probabilities  a = w_c ((1 - eps) q_c + eps / C);  indices  a = (1 - eps) w_t [c = t] + (eps / C) w_c."""
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    else:
        w = 1.0
    if SOFT:
        a = tl.load(q_ptr + q_offs, mask=mask, other=0.0).to(tl.float32)
        if SMOOTH:
            a = a * (1.0 - eps) + eps / n_cols
        a = a * w
    else:
        a = tl.where(cols[None, :] == t[:, None], (1.0 - eps) * w_t[:, None], 0.0)
        if SMOOTH:
            a += eps / n_cols * w
    return tl.where(mask, a, 0.0)


@triton.jit
def _ce_general_kernel(x_ptr, g_ptr, t_ptr, q_ptr, w_ptr, loss_ptr, denom_ptr, n_rows, n_cols, n_spatial,
                       x_sb, x_sc, x_ss, g_sb, g_sc, g_ss, q_sb, q_sc, q_ss, ignore_index, eps,
                       ROWS: tl.constexpr, BLOCK: tl.constexpr, HAS_GRAD: tl.constexpr, MEAN: tl.constexpr,
                       SMOOTH: tl.constexpr, SOFT: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """F.cross_entropy in full: ROWS rows a program, row r = (b, s) of [B, C, S] logits addressed
    by strides (classes x_sc apart: [B, C, T] layouts are read in place, consecutive rows
    side by side), class weights w [C], probability targets q [B, C, S] (a second read) or
    class indices t [B·S]. Two passes over BLOCK-wide class chunks: an online max, Σexp, mass
    A = Σa and Σ a·(z - max) (shifted as the max grows); loss = A·log Σexp(z - max) - Σ a·(z - max),
    gradient (A·softmax - a) / denominator (MEAN; read from _ce_denominator_kernel)."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    b = rows // n_spatial
    sp = rows - b * n_spatial
    x_base = b * x_sb + sp * x_ss
    q_base = b * q_sb + sp * q_ss
    if SOFT:
        valid = row_ok
        t = tl.zeros((ROWS,), tl.int64)
        w_t = tl.zeros((ROWS,), tl.float32)
    else:
        t = tl.load(t_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        valid = row_ok & (t != ignore_index)
        if HAS_WEIGHT:  # clamped: an out-of-range target never reads outside w
            w_t = tl.load(w_ptr + tl.minimum(tl.maximum(t, 0), n_cols - 1), mask=valid, other=0.0).to(tl.float32)
        else:
            w_t = tl.full((ROWS,), 1.0, tl.float32)
    lanes = tl.arange(0, BLOCK)
    m = tl.full((ROWS,), _LOWEST, tl.float32)
    s = tl.zeros((ROWS,), tl.float32)
    mass = tl.zeros((ROWS,), tl.float32)
    sa = tl.zeros((ROWS,), tl.float32)  # Σ a·(z - m) over the chunks so far
    for k in range(0, n_cols, BLOCK):
        cols = k + lanes
        col_ok = cols < n_cols
        mask = valid[:, None] & col_ok[None, :]
        z = tl.load(x_ptr + x_base[:, None] + cols[None, :].to(tl.int64) * x_sc, mask=mask,
                    other=float("-inf")).to(tl.float32)
        a = _target_mass(q_ptr, q_base[:, None] + cols[None, :].to(tl.int64) * q_sc, w_ptr, cols, col_ok, mask,
                         t, w_t, eps, n_cols, SOFT, HAS_WEIGHT, SMOOTH)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        sa = tl.where(mass != 0.0, sa - (m_new - m) * mass, sa)
        sa += tl.sum(tl.where(a != 0.0, a * (z - m_new[:, None]), 0.0), axis=1)  # a = 0: nothing, -inf z too
        mass += tl.sum(a, axis=1)
        m = m_new
    s = tl.where(valid, s, 1.0)  # ignored rows: keep log finite
    m = tl.where(valid, m, 0.0)  # and exp below
    log_s = tl.log(s)
    loss = mass * log_s - sa
    live = valid & (mass != 0.0)  # no target mass (ignored, or every factor 0): loss and gradient 0
    tl.store(loss_ptr + rows, tl.where(live, loss, 0.0), mask=row_ok)

    if HAS_GRAD:
        scale = 1.0
        if MEAN:
            scale = 1.0 / tl.load(denom_ptr)
        g_base = b * g_sb + sp * g_ss
        for k in range(0, n_cols, BLOCK):
            cols = k + lanes
            col_ok = cols < n_cols
            mask = valid[:, None] & col_ok[None, :]
            z = tl.load(x_ptr + x_base[:, None] + cols[None, :].to(tl.int64) * x_sc, mask=mask,
                        other=0.0).to(tl.float32)
            a = _target_mass(q_ptr, q_base[:, None] + cols[None, :].to(tl.int64) * q_sc, w_ptr, cols, col_ok,
                             mask, t, w_t, eps, n_cols, SOFT, HAS_WEIGHT, SMOOTH)
            g = (mass[:, None] * tl.exp((z - m[:, None]) - log_s[:, None]) - a) * scale
            g = tl.where(live[:, None] & col_ok[None, :], g, 0.0)  # a select: NaN logits of an ignored row give 0
            tl.store(g_ptr + g_base[:, None] + cols[None, :].to(tl.int64) * g_sc, g.to(g_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])



def _general_config(n_rows: int, n_cols: int, class_stride: int, *, grad: bool, reduction: str,
                    label_smoothing: float, soft: bool, weighted: bool):
    """(kernel, meta) of the general kernel: classes adjacent in memory get chunks of up to
    4096 classes and enough rows for ~2048 elements a tile; classes apart ([B, C, T]) get 128
    rows a tile (adjacent in memory: coalesced) by 16 or more classes."""
    block_c = triton.next_power_of_2(n_cols)
    row_cap = triton.next_power_of_2(max(n_rows, 1))
    if class_stride == 1:
        block = min(block_c, 4096)
        rows = min(max(1, 2048 // block), row_cap)
    else:
        rows = min(128, row_cap)
        block = min(block_c, max(16, 2048 // rows))
    meta = dict(ROWS=rows, BLOCK=block, HAS_GRAD=bool(grad), MEAN=reduction == "mean",
                SMOOTH=float(label_smoothing) > 0.0, SOFT=bool(soft), HAS_WEIGHT=bool(weighted),
                num_warps=4 if rows * block <= 2048 else 8)
    return _ce_general_kernel, meta
