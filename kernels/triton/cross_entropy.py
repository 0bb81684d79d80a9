"""Fused softmax cross-entropy (loss and dlogits) in Triton: the launcher.

[B, V] logits with class-index targets and no class weight take the row kernels of the tuning
space "triton.softmax_cross_entropy" (``cross_entropy_rows``: a one-read row kernel, and the
"chunked" and "lanes" two-pass kernels for wide rows); class weights, probability targets and
the [C] and [B, C, d1, ...] layouts take the general kernel (``cross_entropy_general``).

Launches, all asynchronous (no host sync unless check_targets=True): an optional one-program
count of the valid rows (reduction "mean" with a gradient; or each persistent program counts
them itself, tuning "count": "program"), the row kernel (row losses, gradient scaled by
1/n_valid on the device), and for "mean"/"sum" a one-program fixed-order sum of the row losses
(``_ce_finish_kernel``); the general kernel's launches are the same with its "mean" divisor
(``_ce_denominator_kernel``) and sum (``_ce_finish_denom_kernel``). No float atomics: the same
inputs give the same bits every run. With check_targets=False the call is CUDA-graph
capturable. [B, V] calls of the row kernels are resolved once per problem into a plan
(_RowsPlan: checks, kernel choice, kernels bound through interop.Launch), so a repeated call
costs its key, its allocations and its launches.
"""
from __future__ import annotations

import torch
import triton

from .. import checks, tuning
from .cross_entropy_general import _ce_denominator_kernel, _ce_finish_denom_kernel, _general_config
from .cross_entropy_rows import (DEFAULTS, LANES_MAX_PER_THREAD, OP, REDUCE_BLOCK, SPACE,  # noqa: F401 (re-exported)
                                 _ce_chunked_kernel, _ce_count_kernel, _ce_finish_kernel, _ce_lanes_kernel,
                                 _ce_rows_kernel, _grid, _kernel_config)
from .interop import Launch, as_given, as_torch, check_device, current_stream, device_info


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
            checks.ignore_index_arg(ignore_index)
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
        self.dtype, self.device, self.n_rows, self.inplace = x.dtype, x.device, n_rows, inplace and grad
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
