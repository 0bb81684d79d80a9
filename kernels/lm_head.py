"""The chunk loop of the fused LM head (linear + softmax cross-entropy without the [N, V]
logits), shared by the Triton and the CUDA C implementations: each passes its library's
calls as a :class:`Steps` object and :func:`run_chunks` does the rest.

    x [N, D], w [V, D] (PyTorch's layout), targets [N], bias [V] or None
    loss, dx = ∂loss/∂x, dw = ∂loss/∂w, db = ∂loss/∂bias, lse [N]

For rows [r, r + c) of x, with one preallocated [c, V] buffer holding the only logits:

    1. logits  zc = x[r:r+c] @ wᵀ          a GEMM (fp32 accumulation) into the buffer
    2. rows    the row kernel (one program or block a row): adds the bias, soft-caps, computes
               the row's log-sum-exp, the loss (label smoothing, z-loss) and writes dloss/dz
               over zc in place (the mean's 1/n_valid and grad_scale folded in); a library may
               do part of it in step 1 (the Triton "token_lse" schedule: bias, soft-cap and
               per-tile row statistics in the GEMM's epilogue, then one pass over zc)
    3. dx      dx[r:r+c] = zc @ w           a GEMM straight into dx
    4. dw      dw += zcᵀ @ x[r:r+c]         one GEMM with beta = 1 into an fp32 [V, D] buffer
    5. db      db += Σ_rows zc              fp32 column sums in a fixed order

Why rows and not the vocabulary: a chunk of rows holds whole rows, so its log-sum-exp is final
when the gradient is written and each GEMM runs once: 3 GEMMs, 6·N·D·V FLOPs, the floor.
Chunking V instead would need each row's log-sum-exp before any dw slice could be formed, so
the logits GEMM would run twice (8·N·D·V FLOPs, 4/3 of the floor); its one gain is that each
dw slice would be complete in one GEMM (no fp32 [V, D] accumulator).

The chunk c (rows) sets the trade-off. Memory: the buffer is c·V·itemsize bytes (+ c·4·3 for
row losses, lse and scales). Speed: step 4 reads and writes the fp32 accumulator once a chunk
(8·V·D bytes against 2·c·V·D FLOPs, c/4 FLOP/byte), so c must be large enough for that GEMM to
stay compute-bound: 2048 rows give 512 FLOP/byte, above an H100's or H200's ridge. The
default (``gpuad.kernels.reference.linear_cross_entropy_chunk``) is min(N, 2048) rows, cut so
that the buffer is at most 1 GiB and a quarter of the free device memory; `chunk` overrides it.
At 8192×4096→128256 bf16: a 525 MB buffer (4 chunks), the fp32 dw accumulator 2.1 GB (none
when dw_accumulate is given), dx 67 MB, and dw in bf16 1.05 GB when no dw_accumulate is given
(the accumulator is freed after that cast; the buffer before it).

No host synchronisation here: the valid-target count and the mean's scale stay on the device.
"""
from __future__ import annotations

from .reference import LCE_ROWS_PER_CHUNK, linear_cross_entropy_chunk, reduce_row_losses


class Steps:
    """One library's calls for :func:`run_chunks`, on its own arrays (torch tensors, CuPy
    arrays). `float32` is its float32 dtype and `itemsize` the bytes of an input element."""

    float32 = None
    itemsize = 0
    rows_per_chunk = LCE_ROWS_PER_CHUNK  # the chunk's rows when no `chunk` is given (before the memory caps)

    def empty(self, shape, dtype):
        raise NotImplementedError

    def zeros(self, shape, dtype):
        raise NotImplementedError

    def ones(self, shape, dtype):
        raise NotImplementedError

    def astype(self, a, dtype):
        """`a` in `dtype` (no copy where the library allows)."""
        raise NotImplementedError

    def contiguous(self, a):
        raise NotImplementedError

    def mean_divisor(self, targets, ignore_index):
        """The divisor of reduction "mean", a 0-d float32: the number of targets that are not
        ignore_index, or (with class weights) the sum of their classes' weights; 0 counts as 1."""
        raise NotImplementedError

    def free_bytes(self):
        """Device memory that can still be allocated (None: unknown)."""
        raise NotImplementedError

    def buffer(self, rows: int):
        """The logits buffer of `rows` rows."""
        raise NotImplementedError

    def chunk(self, buf, rows: int):
        """The [rows, V] view of the buffer that holds one chunk's logits."""
        raise NotImplementedError

    def precision(self):
        """A context manager under which the GEMMs accumulate in fp32."""
        raise NotImplementedError

    def logits(self, buf, xc, zc):
        """Step 1: zc = xc @ wᵀ (zc's rows lie in buf)."""
        raise NotImplementedError

    def rows(self, buf, zc, targets, row_loss, lse, scale):
        """Step 2: the row kernel over zc (whose rows lie in buf), writing the chunk's row_loss
        and lse, and dloss/dz over zc when there is a gradient; scale is 0-d or per row."""
        raise NotImplementedError

    def dx(self, zc, out):
        """Step 3: out = zc @ w."""
        raise NotImplementedError

    def dw(self, acc, zc, xc):
        """Step 4: acc (fp32 [V, D]) += zcᵀ @ xc."""
        raise NotImplementedError

    def db(self, acc, zc):
        """Step 5: acc (fp32 [V]) += the column sums of zc."""
        raise NotImplementedError


def run_chunks(steps: Steps, x, targets, *, v: int, has_bias: bool, dw_accumulate, grad_scale, ignore_index,
               reduction: str, need_dx: bool, grad: bool, chunk):
    """(loss, dx, dw, db, lse) of the LM head for x [N, D] and targets [N] (contiguous, on
    the device), V classes, arguments already checked. loss fp32 (0-d, or [N] for "none");
    dx, dw, db None without grad (dx None without need_dx, db None without a bias), else in
    x's dtype, except dw = dw_accumulate (fp32 [V, D], added into) when given."""
    n, d = x.shape
    f32 = steps.float32
    n_valid = steps.mean_divisor(targets, ignore_index)
    scale = steps.ones((), f32)  # the gradient's factor, for all rows or (grad_scale [N]) per row
    if reduction == "mean":
        scale = scale / n_valid
    if grad_scale is not None:
        scale = steps.contiguous(scale * steps.astype(grad_scale, f32))
    row_scale = len(scale.shape) == 1
    row_loss = steps.empty(n, f32)
    lse = steps.empty(n, f32)
    dx = dw = db = None
    if grad:
        dx = steps.empty((n, d), x.dtype) if need_dx else None
        dw = dw_accumulate if dw_accumulate is not None else steps.zeros((v, d), f32)
        db = steps.zeros(v, f32) if has_bias else None
    if n > 0:
        c = min(n, chunk or linear_cross_entropy_chunk(n, v, steps.itemsize, steps.free_bytes(), steps.rows_per_chunk))
        buf = steps.buffer(c)
        with steps.precision():
            for r0 in range(0, n, c):
                r1 = min(n, r0 + c)
                zc, xc = steps.chunk(buf, r1 - r0), x[r0:r1]
                steps.logits(buf, xc, zc)
                steps.rows(buf, zc, targets[r0:r1], row_loss[r0:r1], lse[r0:r1],
                           scale[r0:r1] if row_scale else scale)
                if not grad:
                    continue
                if dx is not None:
                    steps.dx(zc, dx[r0:r1])
                steps.dw(dw, zc, xc)
                if db is not None:
                    steps.db(db, zc)
        del buf  # before the casts below: the peak holds the buffer or the cast dw, not both
    loss = reduce_row_losses(row_loss, reduction, n_valid)
    if grad:
        if dw_accumulate is None and x.dtype != f32:
            dw = steps.astype(dw, x.dtype)
        if db is not None:
            db = steps.astype(db, x.dtype)
    return loss, dx, dw, db, lse
