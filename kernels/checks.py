"""Argument checks shared by every implementation of the fused kernels.

They read only shapes and dtypes (numpy, CuPy and torch alike), so they cost no device
work; the one check that reads data, :func:`check_targets`, synchronises with the device
and can be turned off with ``check_targets=False``.
"""
from __future__ import annotations

import operator
from typing import NamedTuple

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
GPU_DTYPES = ("float16", "bfloat16", "float32")  # what the Triton and CUDA C kernels take
REDUCTIONS = ("mean", "sum", "none")


_DTYPE_NAMES: dict = {}  # dtype -> name; a plain dict, which torch.compile traces without a warning


def dtype_name(dtype) -> str:
    """'float32', 'bfloat16', 'int64', ... for numpy, CuPy and torch dtypes alike (memoised: every
    kernel call checks its dtypes, and numpy builds a dtype's name anew each time)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).replace("torch.", "")
    return name


def is_float(dtype) -> bool:
    return dtype_name(dtype) in FLOAT_DTYPES


def is_integer(dtype) -> bool:
    return dtype_name(dtype).startswith(("int", "uint"))


def check_cross_entropy_args(logits, targets, reduction, label_smoothing, allowed=FLOAT_DTYPES):
    """Shapes [B, V] and [B], floating logits, integer targets, a known reduction."""
    if len(logits.shape) != 2:
        raise ValueError(f"logits must have shape [B, V], got {tuple(logits.shape)}")
    if dtype_name(logits.dtype) not in allowed:
        raise ValueError(f"logits must be floating point ({', '.join(allowed)}), got {dtype_name(logits.dtype)}")
    if len(targets.shape) != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"targets must have shape [B] = [{logits.shape[0]}] to match logits "
                         f"{tuple(logits.shape)}, got {tuple(targets.shape)}")
    check_integer_targets(targets)
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")


class CELayout(NamedTuple):
    """logits [C] (n_batch 1), [B, C] or [B, C, d1, ...] hold n_batch · n_spatial rows of
    n_classes logits (n_spatial = d1·d2·..., 1 without them); soft: the targets are
    probabilities of the logits' shape, else class indices."""
    n_batch: int
    n_classes: int
    n_spatial: int
    soft: bool

    @property
    def n_rows(self) -> int:
        return self.n_batch * self.n_spatial


def check_cross_entropy_layout(logits, targets, weight, reduction, label_smoothing, ignore_index,
                               allowed=FLOAT_DTYPES) -> CELayout:
    """F.cross_entropy's layouts: logits [C], [B, C] or [B, C, d1, ...] (classes on axis 1, or
    0 for [C]) with targets of the logits' shape without the class axis (integer class
    indices) or of the logits' own shape (floating: class probabilities); weight None or a
    floating [C]. Probability targets refuse an ignore_index >= 0, as torch does."""
    shape = tuple(logits.shape)
    if len(shape) < 1:
        raise ValueError("logits must have shape [C], [B, C] or [B, C, d1, ...], got a 0-d array")
    if dtype_name(logits.dtype) not in allowed:
        raise ValueError(f"logits must be floating point ({', '.join(allowed)}), got {dtype_name(logits.dtype)}")
    class_axis = 0 if len(shape) == 1 else 1
    n_classes = shape[class_axis]
    if n_classes < 1:
        raise ValueError(f"logits must have at least one class (axis {class_axis}), got shape {shape}")
    soft = tuple(targets.shape) == shape and is_float(targets.dtype)
    if not soft:
        want = shape[:class_axis] + shape[class_axis + 1:]
        if tuple(targets.shape) != want:
            raise ValueError(f"targets must have shape {list(want)} (class indices) or {list(shape)} (class "
                             f"probabilities) to match logits {shape}, got {tuple(targets.shape)}")
        if not is_integer(targets.dtype):
            raise ValueError(f"targets of shape {list(want)} must be integers, got {dtype_name(targets.dtype)}")
    elif ignore_index is not None and int(ignore_index) >= 0:
        raise ValueError(f"ignore_index ({ignore_index}) is not supported with probability targets: pass a "
                         f"negative one, or None")
    if weight is not None and (tuple(weight.shape) != (n_classes,) or not is_float(weight.dtype)):
        raise ValueError(f"weight must be None or a floating array of shape [C] = [{n_classes}], got "
                         f"{dtype_name(weight.dtype)} {tuple(weight.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    n_batch = 1 if len(shape) == 1 else shape[0]
    n_spatial = 1
    for d in shape[2:]:
        n_spatial *= d
    return CELayout(n_batch, n_classes, n_spatial, soft)


def class_strides(shape, strides):
    """(batch, class, spatial) strides of F.cross_entropy's layout [C], [B, C] or [B, C, d1, ...]
    from its per-axis `strides`: d1, ... walked as one axis (size-1 axes skipped; spatial 0
    without any), or None when their strides do not allow it."""
    if len(shape) == 1:
        return (0, strides[0], 0)
    kept = [(n, st) for n, st in zip(shape[2:], strides[2:]) if n != 1]
    for (_, st), (n2, st2) in zip(kept, kept[1:]):
        if st != st2 * n2:
            return None
    return (strides[0], strides[1], kept[-1][1] if kept else 0)


def ignore_index_arg(value, name: str = "ignore_index"):
    """The one contract of every ignore_index argument: an integer (a Python, numpy or integer
    0-d tensor one), returned as an int, or None (no row is ignored). Anything else (a float,
    a bool, a string, an array) raises TypeError naming the argument: a float is never
    truncated."""
    if value is None:
        return None
    if not isinstance(value, bool) and hasattr(value, "__index__"):
        try:
            return operator.index(value)
        except TypeError:  # a floating 0-d tensor has __index__ but refuses it
            pass
    raise TypeError(f"{name} must be an integer or None, got {type(value).__name__} {value!r}")


def check_chunk(chunk):
    """chunk (rows of x per chunk of an LM head): None or a positive int."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be None or a positive int (rows of x per chunk), got {chunk!r}")


def check_targets(targets, num_classes: int, ignore_index: int | None) -> bool:
    """Raise IndexError naming the first target outside [0, V) that is not ignore_index
    (None: every target must lie in [0, V)). Returns whether every target lies in [0, V):
    then no row is ignored unless ignore_index itself lies there.

    Reads the targets on the host (one device sync on the GPU)."""
    if targets.shape[0] == 0 or bool((targets.min() >= 0) & (targets.max() < num_classes)):
        return True  # the common case, in two reductions
    bad = (targets < 0) | (targets >= num_classes)
    if can_equal_a_target(ignore_index, targets.dtype):
        bad &= targets != ignore_index
    if bool(bad.any()):
        row = int((bad * 1).argmax())
        value = int(targets[row])
        raise IndexError(f"target {value} at row {row} is outside [0, {num_classes}) "
                         f"and is not ignore_index ({ignore_index})")
    return False


def can_equal_a_target(ignore_index, dtype) -> bool:
    """Whether a target of integer `dtype` can equal ignore_index. None (no row ignored), or a
    value outside the dtype's range, can not; torch would wrap such a value into the dtype
    before comparing (an int32 target -100 would equal 2**32 - 100), so callers check here."""
    if ignore_index is None:
        return False
    low, high = _INT_RANGES[dtype_name(dtype)]
    return low <= int(ignore_index) <= high


_INT_RANGES = {f"{sign}int{bits}": ((0, 2**bits - 1) if sign else (-2**(bits - 1), 2**(bits - 1) - 1))
               for sign in ("", "u") for bits in (8, 16, 32, 64)}  # name -> (lowest, highest)


def kernel_ignore_index(ignore_index, targets_dtype) -> int:
    """The int64 a kernel compares targets with: ignore_index itself, or the lowest int64 when
    no target of `targets_dtype` can equal it (None; a value outside the dtype's range). An
    int64 target equal to that lowest value then reads as ignored, which only matters with
    check_targets=False (check_targets rejects it as out of range)."""
    if can_equal_a_target(ignore_index, targets_dtype):
        return int(ignore_index)
    return -2**63


def valid_targets(targets, ignore_index):
    """The boolean mask targets != ignore_index, exact for every integer dtype and value (numpy,
    CuPy or torch targets): an ignore_index no target of targets' dtype can hold (None, or a
    value outside the dtype's range, which torch would wrap) matches no target."""
    if can_equal_a_target(ignore_index, targets.dtype):
        return targets != int(ignore_index)
    return targets == targets  # all True: integer targets equal themselves


def check_no_overlap(name: str, a):
    """Refuse an output or accumulator whose elements share memory (a stride-0 expand, an
    as_strided view): writing it would race or sum into one place, as torch refuses for
    in-place writes. Strides of torch (elements), numpy and CuPy (bytes) arrays alike."""
    strides = a.stride() if callable(getattr(a, "stride", None)) else tuple(s // a.itemsize for s in a.strides)
    axes = sorted((abs(st), n) for st, n in zip(strides, a.shape) if n > 1)
    if 0 in tuple(a.shape):
        return  # an empty array holds no element to share
    extent = 0  # the furthest element offset reached by the axes so far
    for stride, n in axes:
        if stride <= extent:
            raise ValueError(f"{name} has elements that share memory (shape {tuple(a.shape)}, strides "
                             f"{tuple(strides)}): it is written in place, so pass a tensor or array with "
                             f"its own memory for each element (e.g. .contiguous())")
        extent += stride * (n - 1)


def check_linear_backward_args(x, w, dy, dw_accumulate, allowed=FLOAT_DTYPES):
    """x [..., K], w [N, K], dy [..., N] of one floating dtype; dw_accumulate fp32 [N, K]."""
    if len(w.shape) != 2:
        raise ValueError(f"w must have shape [N, K], got {tuple(w.shape)}")
    if len(x.shape) < 1 or len(dy.shape) < 1:
        raise ValueError(f"x and dy need at least one axis, got x {tuple(x.shape)} and dy {tuple(dy.shape)}")
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last axis must be K = w.shape[1] = {k}: x {tuple(x.shape)}, w {tuple(w.shape)}")
    if dy.shape[-1] != n:
        raise ValueError(f"dy's last axis must be N = w.shape[0] = {n}: dy {tuple(dy.shape)}, w {tuple(w.shape)}")
    if tuple(dy.shape[:-1]) != tuple(x.shape[:-1]):
        raise ValueError(f"x and dy must share their leading axes: x {tuple(x.shape)}, dy {tuple(dy.shape)}")
    if not x.dtype == w.dtype == dy.dtype:
        raise ValueError(f"x, w and dy must share one dtype, got x {dtype_name(x.dtype)}, "
                         f"w {dtype_name(w.dtype)}, dy {dtype_name(dy.dtype)}")
    if dtype_name(x.dtype) not in allowed:
        raise ValueError(f"x, w and dy must be floating point ({', '.join(allowed)}), got {dtype_name(x.dtype)}")
    if dw_accumulate is not None:
        if tuple(dw_accumulate.shape) != (n, k) or dtype_name(dw_accumulate.dtype) != "float32":
            raise ValueError(f"dw_accumulate must be a float32 buffer of shape [N, K] = {(n, k)}, got "
                             f"{dtype_name(dw_accumulate.dtype)} {tuple(dw_accumulate.shape)}")
        check_no_overlap("dw_accumulate", dw_accumulate)


def check_linear_cross_entropy_args(x, w, targets, bias, reduction, label_smoothing, z_loss, softcap,
                                    dw_accumulate, chunk, grad_scale, allowed=FLOAT_DTYPES, class_weight=None):
    """Shapes, dtypes and option values of ``linear_cross_entropy`` (no data is read).

    x [N, D], w [V, D], targets [N] integer, bias None or [V]; x, w, bias one floating dtype;
    dw_accumulate None or float32 [V, D]; chunk None or a positive int; grad_scale None, 0-d,
    or [N] (reduction "none" only); class_weight as :func:`check_class_weight`."""
    if len(x.shape) != 2 or len(w.shape) != 2:
        raise ValueError(f"x must be [N, D] and w [V, D], got x {tuple(x.shape)} and w {tuple(w.shape)}")
    (n, d), (v, dw_) = x.shape, w.shape
    if d != dw_:
        raise ValueError(f"x's last axis must be D = w.shape[1] = {dw_}: x {tuple(x.shape)}, w {tuple(w.shape)}")
    if v < 1:
        raise ValueError(f"w must have at least one row (class), got w {tuple(w.shape)}")
    if len(targets.shape) != 1 or targets.shape[0] != n:
        raise ValueError(f"targets must have shape [N] = [{n}] to match x {tuple(x.shape)}, "
                         f"got {tuple(targets.shape)}")
    check_integer_targets(targets)
    if bias is not None and tuple(bias.shape) != (v,):
        raise ValueError(f"bias must have shape [V] = [{v}] to match w {tuple(w.shape)}, got {tuple(bias.shape)}")
    names = {dtype_name(a.dtype) for a in (x, w, bias) if a is not None}
    if len(names) != 1:
        raise ValueError("x, w and bias must share one dtype, got " + ", ".join(
            f"{k} {dtype_name(a.dtype)}" for k, a in (("x", x), ("w", w), ("bias", bias)) if a is not None))
    if names.pop() not in allowed:
        raise ValueError(f"x and w must be floating point ({', '.join(allowed)}), got {dtype_name(x.dtype)}")
    check_lce_options(reduction, label_smoothing, z_loss, softcap)
    check_class_weight(class_weight, v, z_loss)
    if dw_accumulate is not None and (tuple(dw_accumulate.shape) != (v, d)
                                      or dtype_name(dw_accumulate.dtype) != "float32"):
        raise ValueError(f"dw_accumulate must be a float32 buffer of shape [V, D] = {(v, d)}, got "
                         f"{dtype_name(dw_accumulate.dtype)} {tuple(dw_accumulate.shape)}")
    if dw_accumulate is not None:
        check_no_overlap("dw_accumulate", dw_accumulate)
    check_chunk(chunk)
    if grad_scale is not None:
        shapes = ((), (n,)) if reduction == "none" else ((),)
        if tuple(grad_scale.shape) not in shapes or not is_float(grad_scale.dtype):
            raise ValueError(f"grad_scale must be a floating array of shape {' or '.join(map(str, shapes))} for "
                             f"reduction {reduction!r}, got {dtype_name(grad_scale.dtype)} "
                             f"{tuple(grad_scale.shape)}")


def check_lce_options(reduction, label_smoothing, z_loss, softcap):
    """The option values of ``linear_cross_entropy``: a known reduction, label_smoothing in
    [0, 1], z_loss finite and >= 0, softcap None or finite and > 0."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if not 0.0 <= float(z_loss) < float("inf"):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    if softcap is not None and not 0.0 < float(softcap) < float("inf"):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")


def check_class_weight(class_weight, n_classes: int, z_loss=0.0):
    """The LM head's class weights: None or a floating [V]; not with a z-loss (torch has no
    z-loss, so no divisor for a weighted mean of it to follow)."""
    if class_weight is None:
        return
    if tuple(class_weight.shape) != (n_classes,) or not is_float(class_weight.dtype):
        raise ValueError(f"class_weight must be None or a floating array of shape [V] = [{n_classes}], got "
                         f"{dtype_name(class_weight.dtype)} {tuple(class_weight.shape)}")
    if float(z_loss):
        raise ValueError("class_weight with z_loss > 0 is not supported: pass one or the other")


def check_integer_targets(targets):
    """targets has an integer dtype."""
    if not is_integer(targets.dtype):
        raise ValueError(f"targets must be integers, got {dtype_name(targets.dtype)}")
