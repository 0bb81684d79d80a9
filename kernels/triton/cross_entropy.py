"""Fused softmax cross-entropy (loss and dlogits) in Triton.

Bytes: the least any fused kernel can move is one read of the logits and one write of the
gradient (2·B·V·itemsize, "one copy"); a kernel whose second pass re-reads a row from HBM moves
1.5 copies. The target (bench/TARGETS.md) is ≤ 1.5× the time of one copy. Three row kernels, each a
tuning candidate (the tuning space "triton.softmax_cross_entropy", see below):

* ``_ce_rows_kernel`` — rows with next_power_of_2(V) ≤ ``single_pass_max``: a program loads
  ROWS whole rows into registers once and computes loss and gradient from them. One read, one
  write per element: it should run at the copy rate (1.0× copy, plus the per-row reductions).
  The widest tile (32768, 32 warps: 32 values a thread; 16-byte aligned rows only) is the
  "row kept on chip" candidate for V = 32000.
* ``_ce_chunked_kernel`` ("chunked", the default for wide rows) — persistent programs walk over
  rows; per row a first pass folds BLOCK-wide chunks into an online max and sum (two block
  reductions a chunk), a second pass re-reads the chunks in *reverse* order (the last chunks
  read are still in L2) and writes the gradient. Two reads and one write per element, the
  second read from L2 when the rows in flight fit it: 1.0× copy at best, 1.5× when the second
  read comes from HBM.
* ``_ce_lanes_kernel`` ("lanes") — the same two passes over ROWS rows at a time, with a
  running max and sum *per lane* (per tile element): a chunk costs one exp and no cross-lane
  reduction; each row takes one reduction at its end. Chunk loads are independent of the
  running state, so the software pipeliner (num_stages) can keep several in flight, and
  several rows per program put more loads in flight per SM. Same bytes as "chunked"
  (1.0–1.5× copy), fewer serial steps.

Class weights, probability targets and the [C] and [B, C, d1, ...] layouts of F.cross_entropy
take ``_ce_general_kernel`` (not a tuning candidate): ROWS rows a program, two passes over
class chunks, the logits addressed through (batch, class, spatial) strides so that a [B, C, T]
tensor is read in place, rows side by side; it reads the weight vector and, for probability
targets, a second [B, C, ...] array in both passes. Its "mean" divisor (Σ w_t of the rows not
ignored) comes from ``_ce_denominator_kernel``, its sum from ``_ce_finish_denom_kernel``.

Rows whose start is not 16-byte aligned (V = 50257, say) are split into a small unaligned
head and tail (< 16 bytes each, loaded masked) and an aligned middle, so the middle's loads
and stores stay 16-byte vectors. Everything computes in fp32, uses 64-bit element offsets
(B·V ≥ 2³¹ is fine), masks every access and skips the reads of ignored rows.

Launches, all asynchronous (no host sync unless check_targets=True): an optional one-program
count of the valid rows (reduction "mean" with a gradient; or each persistent program counts
them itself, tuning "count": "program"), the row kernel (row losses, gradient scaled by
1/n_valid on the device), and for "mean"/"sum" a one-program fixed-order sum of the row losses
(``_ce_finish_kernel``). No float atomics: the same inputs give the same bits every run. With
check_targets=False the call is CUDA-graph capturable. [B, V] calls of the row kernels are
resolved once per problem into a plan (_RowsPlan: checks, kernel choice, kernels bound through
interop.Launch), so a repeated call costs its key, its allocations and its launches.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import checks, tuning
from .interop import Launch, as_given, as_torch, check_device, current_stream, device_info

OP = "triton.softmax_cross_entropy"
#: The tuning space (tuning.register): every value is a candidate the sweep can time.
#: single_pass_max: rows with next_power_of_2(V) up to this go to the one-read row kernel.
#: wide_kernel: the kernel for wider rows ("chunked" or "lanes"). chunk_bytes: logits bytes a
#: program loads per step of a wide kernel (the lanes kernel caps its tile at
#: LANES_MAX_PER_THREAD values a thread). warps: of a wide-kernel program. rows_per_program:
#: rows a lanes program handles together. programs_per_sm: persistent wide-kernel programs an
#: SM. num_stages: software-pipelining depth of the wide kernels' chunk loops (tl.range: 1 is
#: none, as before; k keeps k - 1 chunks in flight through shared memory, cp.async).
#: count: who counts the valid rows for "mean" ("kernel": a one-program launch first;
#: "program": every persistent program, from the targets, which stay in L2).
SPACE = {
    "single_pass_max": (4096, 8192, 16384, 32768),
    "wide_kernel": ("chunked", "lanes"),
    "chunk_bytes": (8192, 16384, 32768),
    "warps": (4, 8, 16),
    "rows_per_program": (1, 2, 4),
    "programs_per_sm": (1, 2, 4),
    "num_stages": (1, 2, 3, 4),
    "count": ("kernel", "program"),
}
DEFAULTS = {"single_pass_max": 16384, "wide_kernel": "chunked", "chunk_bytes": 32768, "warps": 16,
            "rows_per_program": 1, "programs_per_sm": 1, "num_stages": 1, "count": "kernel"}
tuning.register(OP, SPACE, DEFAULTS)

#: The lanes kernel holds a running max and sum per tile element: at most this many tile
#: elements a thread (3 fp32 registers each, 4 with label smoothing).
LANES_MAX_PER_THREAD = 16
#: Elements a step of the one-program count and finish kernels.
REDUCE_BLOCK = 1024
_LOWEST = tl.constexpr(-3.4028234663852886e38)  # the lowest finite fp32: a running max never makes NaN


@triton.jit
def _count_valid(t_ptr, n_rows, ignore_index, BLOCK: tl.constexpr):
    """Number of rows whose target != ignore_index (compared as int64; integer sums: exact)."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, n_rows, BLOCK):
        idx = start + offs
        t = tl.load(t_ptr + idx, mask=idx < n_rows, other=0).to(tl.int64)
        acc += ((idx < n_rows) & (t != ignore_index)).to(tl.int32)
    return tl.sum(acc, axis=0)


@triton.jit
def _ce_count_kernel(t_ptr, n_valid_ptr, n_rows, ignore_index, BLOCK: tl.constexpr):
    """One program: n_valid_ptr[0] = number of rows not ignored."""
    tl.store(n_valid_ptr, _count_valid(t_ptr, n_rows, ignore_index, BLOCK))


@triton.jit
def _sum_losses(row_loss_ptr, n_rows, BLOCK: tl.constexpr):
    """Σ of the fp32 row losses in fp64 lanes, in a fixed order."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, n_rows, BLOCK):
        idx = start + offs
        acc += tl.load(row_loss_ptr + idx, mask=idx < n_rows, other=0.0).to(tl.float64)
    return tl.sum(acc, axis=0)


@triton.jit
def _ce_finish_kernel(row_loss_ptr, out_ptr, t_ptr, n_rows, ignore_index, MEAN: tl.constexpr,
                      BLOCK: tl.constexpr):
    """One program: out_ptr[0] = Σ row losses (fp64 lanes, a fixed order), / max(n_valid, 1) for "mean"."""
    total = _sum_losses(row_loss_ptr, n_rows, BLOCK)
    if MEAN:
        total = total / tl.maximum(_count_valid(t_ptr, n_rows, ignore_index, BLOCK), 1).to(tl.float64)
    tl.store(out_ptr, total.to(tl.float32))


@triton.jit
def _mean_scale(t_ptr, n_valid_ptr, n_rows, ignore_index, MEAN: tl.constexpr, COUNT: tl.constexpr):
    """The gradient's scale: 1/max(n_valid, 1) for "mean" (counted here when COUNT, else read
    from the count kernel's output), 1 otherwise."""
    scale = 1.0
    if MEAN:
        if COUNT:
            n_valid = _count_valid(t_ptr, n_rows, ignore_index, 1024)
        else:
            n_valid = tl.load(n_valid_ptr)
        scale = 1.0 / tl.maximum(n_valid, 1).to(tl.float32)
    return scale


@triton.jit
def _ce_rows_kernel(x_ptr, g_ptr, t_ptr, loss_ptr, n_valid_ptr, n_rows, n_cols, stride, ignore_index, eps,
                    ROWS: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr,
                    HAS_GRAD: tl.constexpr, MEAN: tl.constexpr, SMOOTH: tl.constexpr):
    """ROWS whole rows per program, BLOCK = next_power_of_2(V) columns, one read of each row.
    The valid-row count comes from _ce_count_kernel (MEAN with HAS_GRAD)."""
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
        scale = _mean_scale(t_ptr, n_valid_ptr, n_rows, ignore_index, MEAN, False)
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
def _ce_chunked_kernel(x_ptr, g_ptr, t_ptr, loss_ptr, n_valid_ptr, n_rows, n_cols, stride, ignore_index, eps,
                       BLOCK: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr, HAS_GRAD: tl.constexpr,
                       MEAN: tl.constexpr, SMOOTH: tl.constexpr, COUNT: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Persistent: program p takes rows p, p + P, ...; two passes over BLOCK-wide chunks a row,
    the first folding each chunk into the row's max and sum with two block reductions."""
    pid = tl.program_id(0)
    scale = 1.0
    if HAS_GRAD:
        scale = _mean_scale(t_ptr, n_valid_ptr, n_rows, ignore_index, MEAN, COUNT)
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
        for k in tl.range(0, tl.where(valid, n_chunks, 0), num_stages=NUM_STAGES):
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
            for i in tl.range(0, n_chunks, num_stages=NUM_STAGES):
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


@triton.jit
def _lanes_pass1(x_rows, lanes, valid, width, n_chunks, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                 SMOOTH: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Pass 1 of the lanes kernel over the rows' aligned middles: (row max, Σexp(x - max), Σx) of
    each row, from a running max and sum per lane (masked lanes load -inf: they add 0) merged
    across the lanes once (lanes never raised keep m = lowest, s = 0: they add 0)."""
    m = tl.full((ROWS, BLOCK), _LOWEST, tl.float32)
    s = tl.zeros((ROWS, BLOCK), tl.float32)
    sx = tl.zeros((ROWS, BLOCK), tl.float32)
    for k in tl.range(0, n_chunks, num_stages=NUM_STAGES):
        cols = k * BLOCK + lanes
        mask = valid[:, None] & (cols[None, :] < width[:, None])
        x = tl.load(x_rows + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        d = tl.exp(-tl.abs(x - m))
        s = tl.where(x > m, s * d + 1.0, s + d)
        m = tl.maximum(m, x)
        if SMOOTH:
            sx += tl.where(mask, x, 0.0)
    row_max = tl.max(m, axis=1)
    return row_max, tl.sum(s * tl.exp(m - row_max[:, None]), axis=1), tl.sum(sx, axis=1)


@triton.jit
def _ce_lanes_kernel(x_ptr, g_ptr, t_ptr, loss_ptr, n_valid_ptr, n_rows, n_cols, stride, ignore_index, eps,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr,
                     HAS_GRAD: tl.constexpr, MEAN: tl.constexpr, SMOOTH: tl.constexpr, COUNT: tl.constexpr,
                     NUM_STAGES: tl.constexpr):
    """Persistent: program p takes row groups p, p + P, ... of ROWS rows; per group, pass 1
    keeps a running max m and sum s per tile element (one exp an element: with d =
    exp(-|x - m|), s ← s·d + 1 when x > m, else s + d) and merges the lanes once at the end
    of the row; pass 2 writes the gradient, last chunk first. The targets of the next group
    are loaded a group ahead, and the target logit before the chunks: no chunk load waits on
    a dependent load."""
    pid = tl.program_id(0)
    scale = 1.0
    if HAS_GRAD:
        scale = _mean_scale(t_ptr, n_valid_ptr, n_rows, ignore_index, MEAN, COUNT)
    lanes = tl.arange(0, BLOCK)
    edge = tl.arange(0, 2 * VEC)
    n_prog = tl.num_programs(0)
    next_rows = pid * ROWS + tl.arange(0, ROWS)
    t_next = tl.load(t_ptr + next_rows, mask=next_rows < n_rows, other=0)
    for group in range(pid, tl.cdiv(n_rows, ROWS), n_prog):
        rows = group * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        t = t_next.to(tl.int64)
        # The next group's targets, loaded now: its chunk loads will not wait on them.
        next_rows = rows + n_prog * ROWS
        t_next = tl.load(t_ptr + next_rows, mask=next_rows < n_rows, other=0)
        valid = row_ok & (t != ignore_index)
        start = rows.to(tl.int64) * stride
        end = start + n_cols
        # The target logit: one load a row, issued before the chunk loads (it does not wait on them).
        target = start + tl.minimum(tl.maximum(t, 0), n_cols - 1)  # clamped: never out of the row
        x_t = tl.load(x_ptr + target, mask=valid, other=0.0).to(tl.float32)
        # [lo, lo + width) is each row's 16-byte aligned middle; the rest (< VEC a side) is the edge.
        if ALIGNED:
            lo = tl.multiple_of(start, VEC)
            width = tl.zeros((ROWS,), tl.int64) + n_cols
        else:
            lo = tl.multiple_of((start + VEC - 1) // VEC * VEC, VEC)
            hi = end // VEC * VEC
            width = tl.maximum(hi - lo, 0)
            e_offs = tl.where(edge[None, :] < VEC, start[:, None] + edge[None, :], hi[:, None] + edge[None, :] - VEC)
            e_in = tl.where(edge[None, :] < VEC, (e_offs < lo[:, None]) & (e_offs < end[:, None]),
                            (e_offs < end[:, None]) & (e_offs >= lo[:, None]))
            e_mask = valid[:, None] & e_in
        x_rows = x_ptr + lo[:, None]
        g_rows = g_ptr + lo[:, None]
        n_chunks = tl.cdiv(n_cols, BLOCK)
        row_max, row_sum, row_x = _lanes_pass1(x_rows, lanes, valid, width, n_chunks, ROWS, BLOCK, SMOOTH,
                                               NUM_STAGES)
        if not ALIGNED:
            xe = tl.load(x_ptr + e_offs, mask=e_mask, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(row_max, tl.max(xe, axis=1))
            row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(xe - new_max[:, None]), axis=1)
            row_max = new_max
            if SMOOTH:
                row_x += tl.sum(tl.where(e_mask, xe, 0.0), axis=1)
        row_sum = tl.where(valid, row_sum, 1.0)  # ignored rows: keep log finite
        loss = tl.log(row_sum) - (1.0 - eps) * (x_t - row_max)
        if SMOOTH:
            loss -= eps * (row_x / n_cols - row_max)
        tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=row_ok)

        # Pass 2, last chunk first: the chunks read last in pass 1 are the likeliest in L2.
        if HAS_GRAD:
            log_s = tl.log(row_sum)[:, None]
            shift = tl.where(valid, row_max, 0.0)[:, None]  # ignored rows: no exp overflow
            t_mid = (t - (lo - start))[:, None]  # unclamped: an out-of-range target matches no column
            for i in tl.range(0, n_chunks, num_stages=NUM_STAGES):
                cols = (n_chunks - 1 - i) * BLOCK + lanes
                in_row = cols[None, :] < width[:, None]
                x = tl.load(x_rows + cols[None, :], mask=in_row & valid[:, None], other=0.0).to(tl.float32)
                g = _grad(x, cols[None, :], shift, log_s, t_mid, eps, n_cols, scale, valid[:, None], SMOOTH)
                tl.store(g_rows + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=in_row & row_ok[:, None])
            if not ALIGNED:
                xe = tl.load(x_ptr + e_offs, mask=e_mask, other=0.0).to(tl.float32)
                ge = _grad(xe, e_offs, shift, log_s, (start + t)[:, None], eps, n_cols, scale, valid[:, None],
                           SMOOTH)
                tl.store(g_ptr + e_offs, ge.to(g_ptr.dtype.element_ty), mask=e_in & row_ok[:, None])


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


WIDE_KERNELS = {"chunked": _ce_chunked_kernel, "lanes": _ce_lanes_kernel}


def _kernel_config(n_rows: int, n_cols: int, stride: int, elem_size: int, *, grad: bool, reduction: str,
                   label_smoothing: float, params: dict | None = None):
    """The one place where the kernel and its compile-time parameters are chosen: a pure
    function of the shape and the tuning parameters `params` (default: the fallbacks), also
    used by the ahead-of-time compile test.

    Returns (kernel, meta): meta holds every constexpr and the launch option num_warps.

    * next_power_of_2(V) ≤ single_pass_max (≤ 16384 for rows that are not 16-byte aligned):
      the row kernel, ROWS rows a program so that a program holds ≥ 2048 elements (small V
      would otherwise leave most lanes idle); warps so that a thread holds ~16 values, at most
      32 (16 warps up to 16384 columns, 32 warps at 32768).
    * wider: ``params["wide_kernel"]`` with chunks of ``chunk_bytes`` (the lanes kernel's tile
      is ROWS × BLOCK with at most LANES_MAX_PER_THREAD elements a thread).
    tests/test_triton_compile.py holds every variant to a 64-byte spill budget.
    """
    p = dict(DEFAULTS, **(params or {}))
    block_v = triton.next_power_of_2(n_cols)
    vec = 16 // elem_size
    mean, has_grad = reduction == "mean", bool(grad)
    aligned = stride % vec == 0 and n_cols % vec == 0
    # Tiles past 16384 hold rows on chip only when they are 16-byte aligned: unaligned rows
    # would load element by element, whose addresses alone spill at 32 values a thread.
    on_chip_max = p["single_pass_max"] if aligned else min(p["single_pass_max"], 16384)
    if block_v <= max(on_chip_max, 16):
        rows = min(max(1, 2048 // block_v), 256, triton.next_power_of_2(n_rows))
        warps = min(16 if block_v <= 16384 else 32, max(1, rows * block_v // 512))
        kernel, meta = _ce_rows_kernel, dict(ROWS=rows, BLOCK=block_v, num_warps=warps)
    else:
        warps = p["warps"]
        kernel = WIDE_KERNELS[p["wide_kernel"]]
        block = min(block_v, max(16, p["chunk_bytes"] // elem_size))
        meta = dict(COUNT=p["count"] == "program" and mean and has_grad, NUM_STAGES=p["num_stages"],
                    num_warps=warps)
        if kernel is _ce_lanes_kernel:
            rows = min(p["rows_per_program"], triton.next_power_of_2(n_rows))
            block = max(16, min(block // rows, LANES_MAX_PER_THREAD * 32 * warps // rows))
            meta.update(ROWS=rows)
        meta.update(BLOCK=block)
    meta.update(VEC=vec, ALIGNED=aligned, HAS_GRAD=has_grad, MEAN=mean,
                SMOOTH=float(label_smoothing) > 0.0)
    return kernel, meta


def _grid(kernel, meta: dict, n_rows: int, sm_count: int, params: dict | None = None) -> tuple:
    """Row kernel: one program per ROWS rows. Wide kernels: persistent, programs_per_sm programs
    an SM (at most one a row group). With one, the rows in flight are n_SM · row bytes (33 MB at
    V = 128256 bf16 on H100/H200), under the 50 MB L2, so the second pass, run backwards,
    re-reads mostly from L2; more programs put more loads in flight and more rows in L2."""
    groups = triton.cdiv(n_rows, meta.get("ROWS", 1))
    if kernel is _ce_rows_kernel:
        return (groups,)
    p = dict(DEFAULTS, **(params or {}))
    return (min(groups, sm_count * p["programs_per_sm"]),)


def _may_overlap(x: torch.Tensor) -> bool:
    """Whether two elements of the 2-D `x` may share memory (a stride-0 expand, or as_strided
    with a row stride < V): True unless one axis's stride steps over the other axis's whole
    extent (contiguous, padded and transposed layouts). An empty `x` holds nothing to share."""
    axes = sorted((abs(st), n) for st, n in zip(x.stride(), x.shape) if n > 1)
    if not axes or x.numel() == 0:
        return False
    if axes[0][0] == 0:
        return True
    return len(axes) == 2 and (axes[0][1] - 1) * axes[0][0] + 1 > axes[1][0]


def _class_strides(a: torch.Tensor):
    """(a, (batch, class, spatial) strides) of F.cross_entropy's layout [C], [B, C] or
    [B, C, d1, ...]: d1, ... are walked as one axis in place when their strides allow it,
    else `a` becomes a contiguous copy (the only copy of the N-d layout)."""
    strides = checks.class_strides(a.shape, a.stride())
    if strides is None:
        a = a.contiguous()
        strides = checks.class_strides(a.shape, a.stride())
    return a, strides


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


def softmax_cross_entropy(logits, targets, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                          inplace=False, grad=True, check_targets=True):
    """Softmax cross-entropy and its gradient in one fused row kernel (plus, for "mean" and
    "sum", a one-program sum of the row losses; see the module docstring): F.cross_entropy.

    logits [C], [B, C] or [B, C, d1, ...] (classes on axis 1) float32/float16/bfloat16;
    targets integer class indices of the logits' shape without the class axis, or floating
    class probabilities of the logits' shape; weight None or a floating [C] class weight;
    torch tensors on a CUDA device (CPU tensors under TRITON_INTERPRET=1) or CuPy arrays,
    results in the type given. Semantics (formulas, the mean's divisor) are those of
    ``gpuad.kernels.reference.softmax_cross_entropy``. Returns (loss, dlogits): loss float32,
    0-d for reduction "mean"/"sum", the logits' shape without the class axis for "none";
    dlogits = dloss/dlogits in the logits' shape and dtype (for "none": of the sum of the
    losses), or None when grad=False (then the logits are read once and no gradient buffer
    is made). Rows whose target == ignore_index get loss 0 and gradient 0 and leave the mean
    (all ignored: loss 0); ignore_index=None ignores no row, and an ignore_index no target of
    the targets' dtype can hold matches no row. inplace=True writes dlogits over `logits` and
    returns that buffer; [B, C] logits whose rows overlap in memory (a stride-0 expand, say)
    are copied first and refused with inplace=True (ValueError), as are N-d logits that are
    not contiguous.

    Kernels: [B, C] logits with class-index targets and no weight take the row kernels of the
    tuning space; class weights, probability targets and the [C] and N-d layouts take
    ``_ce_general_kernel``, which reads the N-d layout in place through its strides (a
    contiguous copy only when d1, ... cannot be walked as one axis).

    check_targets=True (default) raises IndexError for a target outside [0, C) that is not
    ignore_index; it is the only host synchronisation in the call. check_targets=False
    removes it (the call is then CUDA-graph capturable); out-of-range targets then give
    unspecified losses but never an out-of-bounds access.
    """
    plan = _rows_plan(logits, targets, weight, ignore_index, reduction, label_smoothing, inplace, grad)
    if plan is not None:
        return plan(logits, targets, check_targets)
    x, from_cupy = as_torch(logits)
    t, _ = as_torch(targets)
    w = None if weight is None else as_torch(weight)[0]
    ignore_index = checks.ignore_index_arg(ignore_index)
    layout = checks.check_cross_entropy_layout(x, t, w, reduction, label_smoothing, ignore_index,
                                               allowed=("float16", "bfloat16", "float32"))
    for name, a in (("targets", t), ("weight", w)):
        if a is not None and a.device != x.device:
            raise ValueError(f"logits and {name} must be on one device, got {x.device} and {a.device}")
    check_device(x.device)
    if check_targets and not layout.soft:
        checks.check_targets(t.reshape(-1), layout.n_classes, ignore_index)
    if w is None and not layout.soft and x.dim() == 2:
        loss, out = _launch_rows(x, t, ignore_index, reduction, label_smoothing, inplace, grad)
    else:
        loss, out = _launch_general(x, t, w, layout, ignore_index, reduction, label_smoothing, inplace, grad)
    if out is None:
        dlogits = None
    elif inplace:
        if out is not x:  # the kernel wrote a contiguous copy: copy the gradient back
            x.copy_(out)
        dlogits = logits
    else:
        dlogits = as_given(out, from_cupy)
    return as_given(loss, from_cupy), dlogits


def _launch_general(x, t, w, layout, ignore_index, reduction, label_smoothing, inplace, grad):
    """(loss, gradient buffer or None) from _ce_general_kernel and its one-program helpers."""
    if inplace and grad and (_may_overlap(x) if x.dim() <= 2 else not x.is_contiguous()):
        raise ValueError(f"inplace=True needs logits whose elements do not share memory (N-d: contiguous), got "
                         f"shape {tuple(x.shape)} with strides {x.stride()}")
    n_rows, n_cols = layout.n_rows, layout.n_classes
    work, x_strides = _class_strides(x)
    out = None
    if grad:
        out = work if inplace else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    g_strides = _class_strides(out)[1] if out is not None else (0, 0, 0)
    if layout.soft:
        q, q_strides = _class_strides(t)
        t_flat, ignore = q, 0
    else:
        q, q_strides = work, (0, 0, 0)  # placeholders, never read
        t_flat, ignore = t.reshape(-1).contiguous(), checks.kernel_ignore_index(ignore_index, t.dtype)
    w_buf = work if w is None else w.contiguous()
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    denom = row_loss  # a placeholder, never read but for "mean"
    if reduction == "mean":
        if layout.soft:
            denom = torch.full((), float(max(n_rows, 1)), dtype=torch.float32, device=x.device)
        else:
            denom = torch.empty((), dtype=torch.float32, device=x.device)
            _ce_denominator_kernel[(1,)](t_flat, w_buf, denom, n_rows, n_cols, ignore, HAS_WEIGHT=w is not None,
                                         BLOCK=REDUCE_BLOCK)
    if n_rows > 0:
        kernel, meta = _general_config(n_rows, n_cols, x_strides[1], grad=out is not None, reduction=reduction,
                                       label_smoothing=label_smoothing, soft=layout.soft, weighted=w is not None)
        kernel[(triton.cdiv(n_rows, meta["ROWS"]),)](
            work, work if out is None else out, t_flat, q, w_buf, row_loss, denom, n_rows, n_cols, layout.n_spatial,
            *x_strides, *g_strides, *q_strides, ignore, float(label_smoothing), **meta)
    if reduction == "none":
        loss = row_loss.reshape(x.shape[:1] + x.shape[2:] if x.dim() > 1 else ())
    else:
        loss = torch.empty((), dtype=torch.float32, device=x.device)
        _ce_finish_denom_kernel[(1,)](row_loss, loss, denom, n_rows, MEAN=reduction == "mean", BLOCK=REDUCE_BLOCK)
    return loss, out


def _launch_rows(x, t, ignore_index, reduction, label_smoothing, inplace, grad):
    """(loss, gradient buffer or None) of [B, V] logits and class indices without weight,
    from the row kernels of the tuning space."""
    overlap = _may_overlap(x)
    if inplace and grad and overlap:
        raise ValueError(f"inplace=True needs logits whose elements do not share memory, got shape "
                         f"{tuple(x.shape)} with strides {x.stride()}")
    n_rows, n_cols = x.shape
    ignore = checks.kernel_ignore_index(ignore_index, t.dtype)
    eps = float(label_smoothing)

    target_buf = t.contiguous()
    # The kernel addresses logits and gradient with one row stride ≥ V and unit column stride.
    work = x if (x.stride(1) == 1 or n_cols == 1) and not overlap else x.contiguous()
    stride = work.stride(0) if n_rows > 1 else n_cols
    if not grad:
        out = None
    elif inplace:
        out = work
    else:
        out = torch.empty_strided((n_rows, n_cols), (max(stride, 1), 1), dtype=x.dtype, device=x.device)
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=x.device)

    device_name, sm_count = device_info(x.device)
    params = tuning.launch_values(OP, device_name)
    if n_rows > 0:
        kernel, meta = _kernel_config(n_rows, n_cols, stride, x.element_size(), grad=out is not None,
                                      reduction=reduction, label_smoothing=eps, params=params)
        n_valid = row_loss  # a placeholder, never read, unless the count kernel runs first
        if meta["MEAN"] and meta["HAS_GRAD"] and not meta.get("COUNT", False):
            n_valid = torch.empty((), dtype=torch.int32, device=x.device)
            _ce_count_kernel[(1,)](target_buf, n_valid, n_rows, ignore, BLOCK=REDUCE_BLOCK)
        kernel[_grid(kernel, meta, n_rows, sm_count, params)](
            work, out if out is not None else work, target_buf, row_loss, n_valid,
            n_rows, n_cols, stride, ignore, eps, **meta)

    if reduction == "none":
        loss = row_loss
    else:
        loss = torch.empty((), dtype=torch.float32, device=x.device)
        _ce_finish_kernel[(1,)](row_loss, loss, target_buf, n_rows, ignore, MEAN=reduction == "mean",
                                BLOCK=REDUCE_BLOCK)
    return loss, out


# --------------------------------------------------------------------------------------------
# Plans: a [B, V] call with class-index targets and no weight, resolved once per problem

_plans: dict = {}  # key (see _rows_plan) -> _RowsPlan, or None where the call takes the general path
_MAX_PLANS = 1024


def clear_plans() -> None:
    """Forget the resolved row-kernel plans: the next call of each problem plans again."""
    _plans.clear()


def _rows_plan(logits, targets, weight, ignore_index, reduction, label_smoothing, inplace, grad):
    """The cached _RowsPlan of a call, or None (the call takes the full path: other types,
    layouts or options, bad arguments, logits the kernel cannot address in place)."""
    if weight is not None or type(logits) is not torch.Tensor or type(targets) is not torch.Tensor:
        return None
    key = (logits.shape, logits.stride(), logits.dtype, logits.device, targets.shape, targets.stride(),
           targets.dtype, targets.device, type(ignore_index), ignore_index, reduction, type(label_smoothing),
           label_smoothing, bool(inplace), bool(grad), tuning.active_overrides(OP), tuning.generation)
    try:
        return _plans[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable option: the full path checks it
        return None
    if len(_plans) >= _MAX_PLANS:
        del _plans[next(iter(_plans))]
    plan = _plans[key] = _RowsPlan.make(logits, targets, ignore_index, reduction, label_smoothing, inplace, grad)
    return plan


class _RowsPlan:
    """softmax_cross_entropy of one problem of the row kernels: the checks done once, the kernels
    bound once (interop.Launch); a call allocates the outputs and launches (plus the targets'
    check when asked)."""

    @classmethod
    def make(cls, x, t, ignore_index, reduction, label_smoothing, inplace, grad):
        """The plan, or None for what the plan does not serve (checked by the full path)."""
        try:
            checks.check_ignore_index(ignore_index)
            layout = checks.check_cross_entropy_layout(x, t, None, reduction, label_smoothing, ignore_index,
                                                       allowed=("float16", "bfloat16", "float32"))
            check_device(x.device)
        except (ValueError, TypeError, IndexError):
            return None
        n_rows, n_cols = x.shape if x.dim() == 2 else (0, 0)
        if (layout.soft or x.dim() != 2 or t.device != x.device or n_rows == 0 or _may_overlap(x)
                or not (x.stride(1) == 1 or n_cols == 1) or not t.is_contiguous()):
            return None
        return cls(x, t, ignore_index, reduction, float(label_smoothing), bool(inplace), bool(grad))

    def __init__(self, x, t, ignore_index, reduction, eps, inplace, grad):
        n_rows, n_cols = x.shape
        self.n_classes, self.ignore_index = n_cols, ignore_index
        ignore = checks.kernel_ignore_index(ignore_index, t.dtype)
        stride = x.stride(0) if n_rows > 1 else n_cols
        self.dtype, self.device, self.n_rows, self.inplace = x.dtype, x.device, n_rows, inplace
        self.grad_alloc = None if not grad or inplace else ((n_rows, n_cols), (max(stride, 1), 1))
        self.like = x.is_contiguous()  # then torch.empty_like(x) makes the gradient
        device_name, sm_count = device_info(x.device)
        params = tuning.launch_values(OP, device_name)
        kernel, meta = _kernel_config(n_rows, n_cols, stride, x.element_size(), grad=grad, reduction=reduction,
                                      label_smoothing=eps, params=params)
        self.count = None
        if meta["MEAN"] and meta["HAS_GRAD"] and not meta.get("COUNT", False):
            self.count = Launch(_ce_count_kernel, (1,), dict(BLOCK=REDUCE_BLOCK), check=(0,))
            self.count_args = (n_rows, ignore)
        self.main = Launch(kernel, _grid(kernel, meta, n_rows, sm_count, params), meta, check=(0, 1, 2))
        self.main_args = (n_rows, n_cols, stride, ignore, eps)
        self.finish, self.scratch = None, {}
        self.loss_like = torch.empty((), dtype=torch.float32, device=x.device)  # empty_like of it makes the loss
        if reduction != "none":
            self.finish = Launch(_ce_finish_kernel, (1,), dict(MEAN=reduction == "mean", BLOCK=REDUCE_BLOCK),
                                 check=(2,))
            self.finish_args = (n_rows, ignore)

    def _scratch(self, device):
        """(fp32 row losses, int32 valid-row count) of the current stream: kernels of one stream
        run in order, so a call's launches use them before the next call's do; kept (never freed),
        so a captured CUDA graph never points at freed memory."""
        stream = current_stream(device)
        bufs = self.scratch.get(stream)
        if bufs is None:
            bufs = self.scratch[stream] = (torch.empty(self.n_rows, dtype=torch.float32, device=device),
                                           torch.empty((), dtype=torch.int32, device=device))
        return bufs

    def __call__(self, x, t, check_targets):
        """(loss, dlogits) of the row kernels, as softmax_cross_entropy returns them."""
        if check_targets:
            checks.check_targets(t, self.n_classes, self.ignore_index)
        device, empty = self.device, torch.empty_strided  # the cheapest of torch's allocations but empty_like
        if self.grad_alloc is not None:
            out = (torch.empty_like(x) if self.like and type(x) is torch.Tensor
                   else empty(*self.grad_alloc, dtype=self.dtype, device=device))
        else:
            out = x if self.inplace else None
        if self.finish is None:  # "none": the row losses are the result
            row_loss = n_valid = empty((self.n_rows,), (1,), dtype=torch.float32, device=device)
        else:
            row_loss, n_valid = self._scratch(device)
        if self.count is not None:
            self.count(t, n_valid, *self.count_args)
        self.main(x, x if out is None else out, t, row_loss, n_valid, *self.main_args)
        if self.finish is None:
            return row_loss, out
        loss = torch.empty_like(self.loss_like)
        self.finish(row_loss, loss, t, *self.finish_args)
        return loss, out
