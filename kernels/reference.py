"""The ground truth of every fused op, written with the array module so it runs on numpy
and, unchanged, on CuPy arrays. Given float64 inputs it computes in float64; otherwise it
accumulates in float32, as the GPU kernels do.
"""
from __future__ import annotations

import math

from gpuad.backend import array_module, backend_of

from . import checks


def _arrays(what, **arrays):
    """The reference takes numpy or CuPy arrays: anything else (a torch tensor, a list) is a
    TypeError naming the argument."""
    for name, a in arrays.items():
        if a is not None and backend_of(a) is None:
            hint = (" (convert a torch tensor with .numpy(), or with cupy.from_dlpack on the GPU)"
                    if type(a).__module__.partition(".")[0] == "torch" else "")
            raise TypeError(f"reference.{what}: {name} must be a numpy or CuPy array, got "
                            f"{type(a).__module__}.{type(a).__qualname__}{hint}")


def _acc_dtype(xp, dtype):
    return xp.float64 if dtype == xp.float64 else xp.float32


def softmax_cross_entropy(logits, targets, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                          inplace=False, grad=True, check_targets=True):
    """Softmax cross-entropy and its gradient, never differentiating log(p).

    logits [B, V] (fp16/bf16/fp32/fp64), targets [B] integer. Returns (loss, dlogits):
    loss is float32 (float64 for float64 logits), a scalar, or [B] for reduction "none";
    dlogits = dloss/dlogits in the logits' dtype (for "none": of the sum of the row losses),
    or None when grad=False. With label_smoothing eps the target distribution is
    (1 - eps)·onehot + eps/V. Rows whose target equals ignore_index have loss 0 and
    gradient 0 and are not counted in the mean; when every row is ignored the loss is 0.
    inplace=True writes dlogits over `logits` and returns that buffer. ignore_index=None
    ignores no row. An ignored row's gradient is exactly 0, whatever its logits (NaN included).
    """
    _arrays("softmax_cross_entropy", logits=logits, targets=targets)
    checks.check_cross_entropy_args(logits, targets, reduction, label_smoothing)
    checks.check_ignore_index(ignore_index)
    if inplace and grad and not getattr(getattr(logits, "flags", None), "writeable", True):
        raise ValueError("inplace=True writes the gradient over logits, which are read-only (a broadcast view, "
                         "or held by a graph): pass a writeable array, or inplace=False")
    xp = array_module(logits, targets)
    n_rows, n_classes = logits.shape
    if check_targets:
        checks.check_targets(targets, n_classes, ignore_index)
    eps = float(label_smoothing)
    acc = _acc_dtype(xp, logits.dtype)
    shifted = logits.astype(acc)  # a copy: z - max(z), row by row
    shifted -= shifted.max(axis=1, keepdims=True)
    log_sum_exp = xp.log(xp.exp(shifted).sum(axis=1))  # logsumexp(z) - max(z)
    valid = targets != ignore_index if ignore_index is not None else xp.ones(targets.shape, dtype=bool)
    safe_targets = xp.where(valid, targets, 0).astype(xp.int64)
    target_logit = xp.take_along_axis(shifted, safe_targets[:, None], axis=1)[:, 0]
    row_loss = log_sum_exp - (1.0 - eps) * target_logit
    if eps:
        row_loss = row_loss - (eps / n_classes) * shifted.sum(axis=1)
    row_loss = xp.where(valid, row_loss, 0.0).astype(acc)
    n_valid = xp.maximum(valid.sum(), 1).astype(acc)
    if reduction == "none":
        loss = row_loss
    else:
        loss = row_loss.sum()
        if reduction == "mean":
            loss = loss / n_valid
        loss = xp.asarray(loss, dtype=acc)
    if not grad:
        return loss, None
    dlogits = xp.exp(shifted - log_sum_exp[:, None], out=shifted)  # p
    if eps:
        dlogits -= eps / n_classes
    dlogits[xp.arange(n_rows), safe_targets] -= 1.0 - eps
    dlogits[~valid] = 0  # a select, not a multiply: NaN logits in an ignored row give 0
    if reduction == "mean":
        dlogits /= n_valid
    if inplace:
        logits[...] = dlogits.astype(logits.dtype)
        return loss, logits
    return loss, dlogits.astype(logits.dtype, copy=False)


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
    n, k = w.shape
    m = math.prod(x.shape[:-1])
    x2 = x.reshape(m, k).astype(acc)  # explicit sizes: -1 is ambiguous when K or N is 0
    dy2 = dy.reshape(m, n).astype(acc)
    dx = (dy2 @ w.astype(acc)).astype(x.dtype).reshape(x.shape) if need_dx else None
    dw = dy2.T @ x2
    if dw_accumulate is not None:
        dw_accumulate += dw
        dw = dw_accumulate
    else:
        dw = dw.astype(x.dtype)
    db = dy2.sum(axis=0).astype(x.dtype) if bias else None
    return dx, dw, db
