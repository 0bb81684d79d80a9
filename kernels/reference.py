"""The ground truth of every fused op, written with the array module so it runs on numpy
and, unchanged, on CuPy arrays. Given float64 inputs it computes in float64; otherwise it
accumulates in float32, as the GPU kernels do.
"""
from __future__ import annotations

import math

import numpy as np

from gpuad.backend import array_module, backend_of

from . import checks


def _arrays(what, **arrays):
    """The reference takes numpy or CuPy arrays: anything else (a torch tensor, a list) is a
    TypeError naming the argument."""
    for name, a in arrays.items():
        if a is not None and type(a) is not np.ndarray and backend_of(a) is None:
            hint = (" (convert a torch tensor with .numpy(), or with cupy.from_dlpack on the GPU)"
                    if type(a).__module__.partition(".")[0] == "torch" else "")
            raise TypeError(f"reference.{what}: {name} must be a numpy or CuPy array, got "
                            f"{type(a).__module__}.{type(a).__qualname__}{hint}")


def _acc_dtype(xp, dtype):
    return xp.float64 if dtype == xp.float64 else xp.float32


def class_rows(xp, a):
    """F.cross_entropy's layout as rows of classes: [C] -> [1, C], [B, C] itself, [B, C, d1, ...]
    -> [B·d1·..., C] (a copy, classes last)."""
    if a.ndim == 1:
        return a[None, :]
    if a.ndim == 2:
        return a
    return xp.moveaxis(a, 1, -1).reshape(-1, a.shape[1])


def from_class_rows(xp, rows, shape):
    """The inverse of :func:`class_rows`: [N, C] rows back to the layout `shape`, C-contiguous."""
    if len(shape) <= 2:
        return rows.reshape(shape)
    moved = rows.reshape((shape[0],) + tuple(shape[2:]) + (shape[1],))
    return xp.ascontiguousarray(xp.moveaxis(moved, -1, 1))


def softmax_cross_entropy(logits, targets, *, weight=None, ignore_index=-100, reduction="mean",
                          label_smoothing=0.0, inplace=False, grad=True, check_targets=True):
    """Softmax cross-entropy and its gradient, never differentiating log(p): F.cross_entropy.

    logits [C], [B, C] or [B, C, d1, ...] (classes on axis 1; fp16/bf16/fp32/fp64); targets
    either integer class indices of the logits' shape without the class axis, or floating
    class probabilities of the logits' shape ("soft" targets); weight None or a floating [C]
    class weight. Per row (ε = label_smoothing, w = weight or ones, log p = log_softmax):
      indices:        loss = -(1 - ε)·w_t·log p_t - (ε / C)·Σ_c w_c·log p_c
      probabilities:  loss = -Σ_c w_c·q_c·log p_c,  q = (1 - ε)·targets + ε / C
    Reduction "mean" divides the sum by Σ w_t over the rows not ignored (index targets; the
    number of such rows without weight) or by the number of rows (probabilities); a divisor
    of 0 (every row ignored, or every target's weight 0) counts as 1 (torch: NaN). Rows whose
    index target equals ignore_index have loss 0 and gradient 0, whatever their logits (NaN
    included); ignore_index=None ignores no row; probability targets refuse an ignore_index
    >= 0. A class whose term's factor (w_c·q_c, or w_c) is 0 adds nothing, even where its
    logit is -inf (torch: NaN, from 0·(-inf)); a row whose target mass Σ_c of those factors
    is 0 has loss 0 and gradient 0. Returns (loss, dlogits): loss float32
    (float64 for float64 logits), 0-d, or the logits' shape without the class axis for
    "none"; dlogits = dloss/dlogits in the logits' shape and dtype (for "none": of the sum
    of the losses), or None when grad=False. inplace=True writes dlogits over `logits` and
    returns that buffer.
    """
    _arrays("softmax_cross_entropy", logits=logits, targets=targets, weight=weight)
    ignore_index = checks.ignore_index_arg(ignore_index)
    layout = checks.check_cross_entropy_layout(logits, targets, weight, reduction, label_smoothing, ignore_index)
    if inplace and grad and not getattr(getattr(logits, "flags", None), "writeable", True):
        raise ValueError("inplace=True writes the gradient over logits, which are read-only (a broadcast view, "
                         "or held by a graph): pass a writeable array, or inplace=False")
    if inplace and grad:
        checks.check_no_overlap("logits (written in place)", logits)
    xp = array_module(logits, targets, *(() if weight is None else (weight,)))
    rows = class_rows(xp, logits)
    if layout.soft:
        row_loss, dlogits, denom = _soft_rows(xp, rows, class_rows(xp, targets), weight, label_smoothing, grad)
    else:
        row_loss, dlogits, denom = _index_rows(xp, rows, targets.reshape(-1), weight, ignore_index,
                                               label_smoothing, grad, check_targets)
    acc = row_loss.dtype
    if reduction == "none":
        loss = row_loss.reshape(logits.shape[:1] + logits.shape[2:] if logits.ndim > 1 else ())
    else:
        loss = row_loss.sum()
        if reduction == "mean":
            loss = loss / denom
        loss = xp.asarray(loss, dtype=acc)
    if not grad:
        return loss, None
    if reduction == "mean":
        dlogits /= denom
    dlogits = from_class_rows(xp, dlogits, logits.shape)
    if inplace:
        logits[...] = dlogits.astype(logits.dtype)
        return loss, logits
    return loss, dlogits.astype(logits.dtype, copy=False)


def _softmax_parts(xp, rows):
    """(z - max z, exp of it, Σ exp, log Σ exp) of [N, C] rows, in the accumulation dtype (a
    row-major copy, whatever the input's layout)."""
    shifted = rows.astype(_acc_dtype(xp, rows.dtype), order="C")
    shifted -= shifted.max(axis=1, keepdims=True)
    exp = xp.exp(shifted)
    sum_exp = exp.sum(axis=1)
    return shifted, exp, sum_exp, xp.log(sum_exp)


def _nonzero_times(xp, f, z):
    """f·z where f != 0, else 0 (0·(-inf) is 0 here, not NaN); f broadcasts against z."""
    with np.errstate(invalid="ignore"):
        return xp.where(f != 0, f * z, 0.0)


def _index_rows(xp, rows, targets, weight, ignore_index, label_smoothing, grad, check_targets):
    """Row losses [N], unscaled gradient [N, C] (None without grad) and the mean's divisor of
    class-index targets [N]."""
    n_rows, n_classes = rows.shape
    in_range = checks.check_targets(targets, n_classes, ignore_index) if check_targets else False
    smoothing = float(label_smoothing)
    acc = _acc_dtype(xp, rows.dtype)
    if ignore_index is None or (in_range and not 0 <= ignore_index < n_classes):
        valid = None  # no row is ignored
    else:
        valid = checks.valid_targets(targets, ignore_index)
    safe_targets = targets if valid is None else xp.where(valid, targets, 0)  # ignored rows are masked below
    if not check_targets:  # a bad target gives its own row unspecified values, never another row's
        safe_targets = xp.clip(safe_targets, 0, n_classes - 1)
    picked = xp.arange(0, n_rows * n_classes, n_classes) + safe_targets  # flat index of each row's target
    shifted, exp, sum_exp, row_loss = _softmax_parts(xp, rows)  # row_loss: logsumexp(z) - max(z) so far
    target_logit = shifted.ravel().take(picked)
    if weight is None:
        mass = 1.0  # Σ_c of the row's target distribution
        row_loss -= (1.0 - smoothing) * target_logit if smoothing else target_logit
        if smoothing:
            row_loss -= (smoothing / n_classes) * shifted.sum(axis=1)
        weights = None if valid is None else valid.astype(acc)
    else:
        w = weight.astype(acc)
        weights = w.take(safe_targets) if valid is None else xp.where(valid, w.take(safe_targets), 0.0)
        mass = (1.0 - smoothing) * weights + (smoothing / n_classes) * w.sum()
        row_loss = mass * row_loss - (1.0 - smoothing) * _nonzero_times(xp, weights, target_logit)
        if smoothing:
            row_loss -= (smoothing / n_classes) * _nonzero_times(xp, w, shifted).sum(axis=1)
        valid = mass != 0 if valid is None else valid & (mass != 0)  # no target mass: loss and gradient 0
    if valid is not None:
        row_loss = xp.where(valid, row_loss, 0.0).astype(acc, copy=False)
    denom = xp.asarray(n_rows if weights is None else weights.sum(), dtype=acc)
    denom = xp.where(denom == 0, xp.asarray(1.0, dtype=acc), denom)
    if not grad:
        return row_loss, None, denom
    dlogits = xp.divide(exp, sum_exp[:, None], out=exp)  # p
    if weight is None:
        if smoothing:
            dlogits -= smoothing / n_classes
        dlogits.ravel()[picked] -= 1.0 - smoothing
    else:
        dlogits *= mass[:, None]
        dlogits.ravel()[picked] -= (1.0 - smoothing) * weights
        if smoothing:
            dlogits -= (smoothing / n_classes) * w
    if valid is not None:
        dlogits[~valid] = 0  # a select, not a multiply: NaN logits in an ignored row give 0
    return row_loss, dlogits, denom


def _soft_rows(xp, rows, probs, weight, label_smoothing, grad):
    """Row losses [N], unscaled gradient [N, C] (None without grad) and the mean's divisor of
    probability targets [N, C]: with a = w·q, loss = Σa·logsumexp(z) - Σ a·z, gradient Σa·p - a."""
    n_rows, n_classes = rows.shape
    smoothing = float(label_smoothing)
    acc = _acc_dtype(xp, rows.dtype)
    shifted, exp, sum_exp, log_s = _softmax_parts(xp, rows)
    a = probs.astype(acc)  # a copy
    if smoothing:
        a *= 1.0 - smoothing
        a += smoothing / n_classes
    if weight is not None:
        a *= weight.astype(acc)
    mass = a.sum(axis=1)
    row_loss = mass * log_s - _nonzero_times(xp, a, shifted).sum(axis=1)
    live = mass != 0  # no target mass: loss and gradient 0
    row_loss = xp.where(live, row_loss, 0.0).astype(acc, copy=False)
    denom = xp.asarray(max(n_rows, 1), dtype=acc)
    if not grad:
        return row_loss, None, denom
    dlogits = xp.divide(exp, sum_exp[:, None], out=exp)
    dlogits *= mass[:, None]
    dlogits -= a
    dlogits[~live] = 0
    return row_loss, dlogits, denom


def linear_backward(x, w, dy, *, bias=True, dw_accumulate=None, need_dx=True, allow_tf32=False):
    """Gradients of y = x wᵀ + b.

    x [..., K], w [N, K], dy [..., N], one floating dtype. Returns (dx, dw, db):
    dx = dy w [..., K], dw = dyᵀ x [N, K], db = Σ dy over the leading axes [N], each in the
    input dtype, accumulated in float32 (float64 for float64 inputs). db is None when
    bias=False, dx is None when need_dx=False. dw_accumulate, an fp32 [N, K] buffer,
    receives dw += dyᵀ x in place and is returned as dw. allow_tf32 is accepted for a
    common signature and ignored: the reference is always exact.
    """
    _arrays("linear_backward", x=x, w=w, dy=dy, dw_accumulate=dw_accumulate)
    checks.check_linear_backward_args(x, w, dy, dw_accumulate)
    xp = array_module(x, w, dy)
    acc = _acc_dtype(xp, x.dtype)
    narrow = x.dtype != acc  # 16-bit inputs: computed in float32; float32 and float64 ones are not copied
    n, k = w.shape
    x2, dy2, wa = x, dy, w
    if x.ndim != 2:
        m = math.prod(x.shape[:-1])  # not reshape(-1, ...): K or N may be 0
        x2, dy2 = x.reshape(m, k), dy.reshape(m, n)
    if narrow:
        x2, dy2, wa = x2.astype(acc), dy2.astype(acc), w.astype(acc)
    dx = dy2 @ wa if need_dx else None
    dw = dy2.T @ x2
    db = xp.ones(dy2.shape[0], dtype=acc) @ dy2 if bias else None  # a GEMV: faster than sum
    if dw_accumulate is not None:
        dw_accumulate += dw
        dw = dw_accumulate
    elif narrow:
        dw = dw.astype(x.dtype)
    if narrow:
        dx = None if dx is None else dx.astype(x.dtype)
        db = None if db is None else db.astype(x.dtype)
    if dx is not None and x.ndim != 2:
        dx = dx.reshape(x.shape)
    return dx, dw, db


# --- fused LM head: linear + cross-entropy without the [N, V] logits ------------------------

LCE_ROWS_PER_CHUNK = 2048  # default rows of a chunk (enough for the dw GEMM to be compute-bound)
LCE_CHUNK_BYTES_MAX = 1 << 30  # default cap of the [chunk, V] logits buffer
LCE_CHUNK_ALIGN = 128  # default chunks above this many rows are a multiple of it


def linear_cross_entropy_chunk(n_rows: int, n_cols: int, itemsize: int, free_bytes: int | None = None,
                               rows: int = LCE_ROWS_PER_CHUNK) -> int:
    """The default rows per chunk of ``linear_cross_entropy``: min(N, `rows`), cut so
    that the [chunk, V] buffer of `itemsize`-byte elements is at most LCE_CHUNK_BYTES_MAX and a
    quarter of `free_bytes` (when known), then rounded down to a multiple of LCE_CHUNK_ALIGN
    when above it. Shared by every implementation (a pure function)."""
    budget = LCE_CHUNK_BYTES_MAX if free_bytes is None else min(LCE_CHUNK_BYTES_MAX, free_bytes // 4)
    c = min(max(n_rows, 1), rows, max(1, budget // max(1, n_cols * itemsize)))
    return c - c % LCE_CHUNK_ALIGN if c > LCE_CHUNK_ALIGN else c


def reduce_row_losses(row_loss, reduction, n_valid):
    """The loss from the row losses: themselves ("none"), their sum, or the sum / n_valid
    ("mean"; n_valid already not 0: the number of valid rows, or their targets' class weights'
    sum). Any array library: numpy, CuPy, torch."""
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    return total / n_valid if reduction == "mean" else total


def linear_cross_entropy(x, w, targets, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                         z_loss=0.0, softcap=None, dw_accumulate=None, need_dx=True, return_lse=False, chunk=None,
                         grad=True, grad_scale=None, check_targets=True, allow_tf32=False, class_weight=None):
    """Cross-entropy of the logits z = x wᵀ + bias, and its gradients, in row chunks.

    x [N, D], w [V, D] (PyTorch's layout), targets [N] integer, bias [V] or None. Per row,
    with z optionally soft-capped first (softcap c: z <- c·tanh(z / c)) and lse = log Σ exp z:
        loss_n = lse - (1 - ε)·z_t - (ε / V)·Σ_v z_v + z_loss·lse²     (ε = label_smoothing)
    rows whose target is ignore_index have loss 0, gradient 0 and leave the mean; all ignored
    gives 0 (not NaN). class_weight (a floating [V], not with z_loss) weighs the classes as
    F.cross_entropy's weight: loss_n = m·lse - (1 - ε)·c_t·z_t - (ε / V)·Σ_v c_v·z_v with
    m = (1 - ε)·c_t + (ε / V)·Σ_v c_v, and "mean" divides by Σ c_t over the valid rows (a sum
    of 0 counts as 1). Returns (loss, dx, dw, db), plus lse [N] when return_lse:
      loss  float32 (float64 for float64 inputs): 0-d, or [N] for reduction "none";
      dx    [N, D] (None when need_dx=False), dw [V, D], db [V] (None without bias): gradients
            of the loss (for "none": of the sum of the row losses), each times grad_scale (a
            0-d array, or [N] per row for "none") when given, in the input dtype; dw is
            accumulated in float32 (float64 for float64 inputs) over all rows and, with
            dw_accumulate (float32 [V, D]), added into that buffer, which is returned as dw;
      lse   [N] float32 (float64 for float64 inputs), of every row, ignored ones included.
    grad=False returns (loss, None, None, None). At most `chunk` rows of logits exist at a
    time (default: :func:`linear_cross_entropy_chunk`). allow_tf32 is accepted for a
    common signature and ignored: the reference is exact.
    """
    ignore_index = checks.ignore_index_arg(ignore_index)
    checks.check_linear_cross_entropy_args(x, w, targets, bias, reduction, label_smoothing, z_loss, softcap,
                                           dw_accumulate, chunk, grad_scale, class_weight=class_weight)
    xp = array_module(x, w, targets, *(a for a in (bias, dw_accumulate, grad_scale, class_weight) if a is not None))
    (n, d), v = x.shape, w.shape[0]
    if check_targets:
        checks.check_targets(targets, v, ignore_index)
    acc = _acc_dtype(xp, x.dtype)
    smoothing, z_coef = float(label_smoothing), float(z_loss)
    chunk = chunk or linear_cross_entropy_chunk(n, v, xp.dtype(acc).itemsize)
    wa = w.astype(acc, copy=False)  # read only below: no copy in the accumulation dtype
    ba = None if bias is None else bias.astype(acc, copy=False)
    valid = checks.valid_targets(targets, ignore_index)
    cw = None if class_weight is None else class_weight.astype(acc)
    n_valid = mean_divisor(xp, targets, valid, cw, acc)
    # per-row factor of the gradient: 1/n_valid for "mean", times grad_scale
    row_scale = xp.ones(n, dtype=acc) / (n_valid if reduction == "mean" else 1)
    if grad_scale is not None:
        row_scale = row_scale * grad_scale.astype(acc)
    row_loss = xp.zeros(n, dtype=acc)
    lse = xp.zeros(n, dtype=xp.float64 if acc == xp.float64 else xp.float32)
    dx = xp.zeros((n, d), dtype=acc) if grad and need_dx else None
    dw = xp.zeros((v, d), dtype=acc) if grad else None
    db = xp.zeros(v, dtype=acc) if grad and bias is not None else None
    for r0 in range(0, n, chunk):
        rows = slice(r0, min(n, r0 + chunk))
        xc = x[rows].astype(acc, copy=False)
        ok = valid[rows]
        loss_c, lse[rows], g = _lce_rows(xp, xc @ wa.T, ba, targets[rows], ok, smoothing, z_coef, softcap, grad, cw)
        row_loss[rows] = xp.where(ok, loss_c, 0.0)
        if not grad:
            continue
        g *= (ok * row_scale[rows])[:, None]
        if dx is not None:
            dx[rows] = g @ wa
        dw += g.T @ xc
        if db is not None:
            db += g.sum(axis=0)
    loss = xp.asarray(reduce_row_losses(row_loss, reduction, n_valid), dtype=acc)
    if grad:
        dx = None if dx is None else dx.astype(x.dtype, copy=False)
        db = None if db is None else db.astype(x.dtype, copy=False)
        if dw_accumulate is not None:
            dw_accumulate += dw.astype(xp.float32, copy=False)
            dw = dw_accumulate
        else:
            dw = dw.astype(x.dtype, copy=False)
    out = (loss, dx, dw, db)
    return out + (lse,) if return_lse else out


def mean_divisor(xp, targets, valid, class_weight, dtype):
    """The divisor of reduction "mean": the number of valid rows, or (class_weight) the sum of
    their targets' class weights; 0 counts as 1. A 0-d array of `dtype`, on the device."""
    if class_weight is None:
        return xp.maximum(valid.sum(), 1).astype(dtype)
    t = xp.clip(targets, 0, class_weight.shape[0] - 1)  # an ignored or bad target reads a weight it does not use
    total = xp.where(valid, class_weight[t], 0).sum().astype(dtype)
    return xp.where(total == 0, xp.ones((), dtype=dtype), total)


def _lce_rows(xp, z, bias, targets, ok, smoothing, z_coef, softcap, grad, class_weight=None):
    """(row losses, lse, dloss/dz or None) of one chunk's logits z [c, V] (bias added and
    soft-capping done here), before the ignored rows and the gradient's scale are applied."""
    if bias is not None:
        z += bias
    if softcap is not None:
        z = softcap * xp.tanh(z / softcap)
    v = z.shape[1]
    m = z.max(axis=1)
    shifted = z - m[:, None]
    log_s = xp.log(xp.exp(shifted).sum(axis=1))
    lse = m + log_s
    t = xp.where(ok, targets, 0).astype(xp.int64, copy=False)
    z_t = xp.take_along_axis(z, t[:, None], axis=1)[:, 0]
    if class_weight is not None:
        return _weighted_lce_rows(xp, z, shifted, log_s, lse, t, smoothing, softcap, grad, class_weight)
    loss = lse - (1.0 - smoothing) * z_t
    if smoothing:
        loss -= smoothing / v * z.sum(axis=1)
    if z_coef:
        loss += z_coef * lse * lse
    if not grad:
        return loss, lse, None
    g = xp.exp(shifted - log_s[:, None])  # softmax
    if z_coef:
        g *= (1.0 + 2.0 * z_coef * lse)[:, None]
    if smoothing:
        g -= smoothing / v
    g[xp.arange(g.shape[0]), t] -= 1.0 - smoothing
    if softcap is not None:
        g *= 1.0 - (z / softcap) ** 2
    return loss, lse, g


def _weighted_lce_rows(xp, z, shifted, log_s, lse, t, smoothing, softcap, grad, class_weight):
    """_lce_rows with class weights c: loss = m·lse - (1 - ε)·c_t·z_t - (ε / V)·Σ c_v·z_v,
    gradient m·softmax - (ε / V)·c - (1 - ε)·c_t·onehot, m = (1 - ε)·c_t + (ε / V)·Σ c_v."""
    v = z.shape[1]
    c_t = class_weight[t]
    mass = (1.0 - smoothing) * c_t + (smoothing / v) * class_weight.sum()
    z_t = xp.take_along_axis(z, t[:, None], axis=1)[:, 0]
    loss = mass * lse - (1.0 - smoothing) * c_t * z_t
    if smoothing:
        loss -= smoothing / v * (z @ class_weight)
    if not grad:
        return loss, lse, None
    g = xp.exp(shifted - log_s[:, None]) * mass[:, None]
    if smoothing:
        g -= (smoothing / v) * class_weight
    g[xp.arange(g.shape[0]), t] -= (1.0 - smoothing) * c_t
    if softcap is not None:
        g *= 1.0 - (z / softcap) ** 2
    return loss, lse, g
