"""The row kernels of the fused softmax cross-entropy in Triton ([B, V] logits, class-index
targets, no class weight), their launch geometry and their tuning space.

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

Rows whose start is not 16-byte aligned (V = 50257, say) are split into a small unaligned
head and tail (< 16 bytes each, loaded masked) and an aligned middle, so the middle's loads
and stores stay 16-byte vectors. Everything computes in fp32, uses 64-bit element offsets
(B·V ≥ 2³¹ is fine), masks every access and skips the reads of ignored rows.

Beside them, two one-program kernels: ``_ce_count_kernel`` counts the valid rows for "mean"
(unless each persistent program counts them itself, tuning "count": "program") and
``_ce_finish_kernel`` sums the row losses in a fixed order. The launcher is
``cross_entropy.softmax_cross_entropy``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .. import tuning

OP = "triton.softmax_cross_entropy"
#: The tuning space (tuning.register): every value is a candidate the sweep can time.
#: single_pass_max: rows with next_power_of_2(V) up to this go to the one-read row kernel.
#: wide_kernel: the kernel for wider rows ("chunked" or "lanes"). chunk_bytes: logits bytes a
#: program loads per step of a wide kernel (the lanes kernel caps its tile at
#: LANES_MAX_PER_THREAD values a thread). warps: of a wide-kernel program. rows_per_program:
#: rows a lanes program handles together. programs_per_sm: persistent wide-kernel programs an
#: SM. num_stages: software-pipelining depth of the wide kernels' chunk loops (tl.range: 1 is
#: none; k keeps k - 1 chunks in flight through shared memory, cp.async).
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
#: Elements a step of the one-program count, denominator and finish kernels.
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
