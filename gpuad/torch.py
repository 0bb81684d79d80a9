"""gpuad's fused kernels as PyTorch ops: drop-in replacements for ``F.cross_entropy``,
``F.linear``, ``nn.CrossEntropyLoss`` and ``nn.Linear``, and the fused LM head
(``linear_cross_entropy``, ``LinearCrossEntropy``), that work under autograd,
``torch.compile(fullgraph=True)`` and ``DistributedDataParallel``.

    import gpuad.torch as gt
    layer = gt.Linear(512, 1000)                 # an nn.Linear whose backward is gpuad's kernel
    loss = gt.cross_entropy(layer(x), targets)   # fused softmax + cross-entropy
    loss.backward()
    head = gt.LinearCrossEntropy(512, 32000)     # an LM head that returns its loss, no logits
    loss = head(hidden, targets)

CUDA tensors run the Triton kernels (``gpuad.kernels.triton``); CPU tensors run the numpy
reference (``gpuad.kernels.reference``) on zero-copy numpy views, so the ops work everywhere.

The ops are registered with ``torch.library`` as opaque custom ops (``gpuad::cross_entropy``,
``gpuad::cross_entropy_backward``, ``gpuad::linear``, ``gpuad::linear_backward``,
``gpuad::linear_cross_entropy`` with ``_scale`` and ``_backward``), each with a
fake (shapes and dtypes only) and the forward ops with registered autograd whose backward is
itself one of the ops, so compiled graphs hold them without a graph break. They are custom
ops rather than ``triton_op``: the launchers choose their kernel at run time (a measured route
between the fused Triton kernel and cuBLAS, autotuned tiles, the numpy path on the CPU), which
is not traceable, and Inductor has nothing to fuse into a softmax + cross-entropy that already
reads its logits once. Each op is defined once (``_Op``: body, fake, setup, backward); in eager
mode the same body, setup and backward run as a ``torch.autograd.Function``, which skips the
custom-op dispatch (it costs tens of µs a call; see ``EAGER_BYPASS``).

Semantics beyond the torch functions they replace:

* ``cross_entropy``: F.cross_entropy's arguments and layouts (input [C], [B, C] or
  [B, C, d1, ...], fp16/bf16/fp32, fp64 on the CPU; class-index or probability targets; class
  weights). The gradient is computed with the loss in one fused pass and kept for the backward,
  which only scales it by the incoming gradient: per row for ``reduction="none"`` (exact per-row
  gradients); probability targets (and then the weight) get theirs in torch ops. Rows whose
  target is ``ignore_index`` have loss 0 and gradient 0 and leave the mean; when every row is
  ignored the loss is 0 and the gradient 0, not NaN. The number of valid rows stays on the
  device: no host sync. A target outside [0, V) raises ``IndexError``
  on the CPU; on CUDA it fails a device-side assertion (as torch's own CUDA kernel does).
* ``linear``: the forward is torch's matmul (``F.linear``); the backward is gpuad's fused
  ``linear_backward`` (dX, dW and db, fp32 accumulation). Dtype policy for mixed precision:
  the compute dtype is x's (or autocast's, when ``torch.autocast`` is on); a float32 weight
  (and bias) with fp16/bf16 activations is a master copy: it is cast for the matmul, and its
  gradient is accumulated in fp32 by the kernel (``dw_accumulate``) and returned in fp32,
  never rounded to bf16 on the way (``torch.autocast`` with ``F.linear`` rounds dW to bf16
  before casting it back).
* ``linear_cross_entropy``: cross-entropy of x weightᵀ + bias through the fused LM-head kernel,
  which holds one chunk of logits at a time. "mean" / "sum": the forward computes dx, dw, db
  with the loss and the backward scales them by the incoming 0-d gradient (in place in eager
  mode: no second copy of dW). "none": the forward computes the row losses only, and the
  backward runs the kernel again with the incoming gradient as per-row weights (grad_scale):
  exact for any cotangent. Weights as for ``linear`` (a float32 master weight's dW accumulated
  by the kernel in fp32, ``dw_accumulate``); ignored rows and no host sync as for
  ``cross_entropy``. A second backward through a retained graph (retain_graph=True) gets
  unscaled copies: the in-place scaling is for a backward that frees the graph.
* ``ignore_index`` (every entry point): an integer, or None (no row is ignored); anything
  else is a TypeError. Every target dtype compares exactly: an ignore_index that int32
  targets cannot hold matches no row.
* Second derivatives: ``linear``'s backward runs in differentiable torch ops under
  create_graph=True (exact gradient penalties). The fused losses' gradients are not
  differentiable: a backward with create_graph=True through ``cross_entropy`` or
  ``linear_cross_entropy`` raises, naming the op, rather than return a gradient without its
  second-order term. torch.func transforms (grad, vmap, ...) are refused by name: the kernels
  read the tensors' memory. Under torch.compile, torch refuses double backward itself.
"""
import functools
import inspect
import math
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from gpuad.kernels import checks, reference

if torch.distributed.is_available():
    # Imported here, before any process group exists (import gpuad.torch before
    # init_process_group): torch.distributed.nn.functional's functions take group=group.WORLD
    # as a default argument, evaluated on the module's first import, which torch._dynamo makes
    # (e.g. on gpuad.torch_parallel's first functional collective). Imported after
    # init_process_group, those defaults keep the default group alive past
    # destroy_process_group, so gloo's worker threads run on into interpreter shutdown, where one
    # freeing a finished collective's tensor takes the GIL and aborts the process ("terminate
    # called without an active exception").
    import torch.distributed.nn.functional  # noqa: F401

__all__ = ["cross_entropy", "linear", "linear_cross_entropy", "CrossEntropyLoss", "Linear", "LinearCrossEntropy",
           "EAGER_BYPASS"]

#: In eager mode, run the op bodies through torch.autograd.Function instead of the
#: torch.library dispatch. Measured on a CPU (4×8 inputs): the dispatch added about 55 µs to
#: one op call, 100 µs to a cross-entropy forward + backward and 40 µs to a linear one.
#: Under torch.compile the custom ops are always used.
EAGER_BYPASS = True

# Tests set this to run the Triton kernels on CPU tensors under TRITON_INTERPRET=1.
_TRITON_ON_CPU = False

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --- where the kernels run ---------------------------------------------------------------
def _use_triton(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" or _TRITON_ON_CPU


def _triton_kernels():
    import gpuad.kernels.triton as kernels  # imports triton: only when a CUDA tensor arrives

    return kernels


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view of a CPU tensor (bfloat16, which numpy lacks, goes through fp32)."""
    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _from_numpy(a, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a)).to(dtype)


def _new_empty(like: torch.Tensor, shape=None) -> torch.Tensor:
    """A contiguous tensor of like's dtype and device (a fake's output: the real ops' outputs
    are contiguous whatever the layout of their inputs)."""
    return like.new_empty(like.shape if shape is None else shape)


def _empty(like: torch.Tensor) -> torch.Tensor:
    """The placeholder for an output that was not asked for (op outputs are a fixed tuple)."""
    return like.new_empty(0)


def _loss_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def _eager() -> bool:
    return EAGER_BYPASS and not torch.compiler.is_compiling()


def _assert_targets_async(targets, n_classes, ignore_index, who):
    """A device-side assertion that every target lies in [0, n_classes) or is ignore_index (no
    host sync on CUDA; synchronous on the CPU)."""
    bad = checks.valid_targets(targets, ignore_index) & ((targets < 0) | (targets >= n_classes))
    torch._assert_async(~bad.any(), f"gpuad.torch.{who}: a target is outside [0, V) and is not ignore_index")


# --- op bodies (one per op, shared by the custom op and the eager autograd.Function) ----
def _cross_entropy_body(logits: torch.Tensor, targets: torch.Tensor, weight: Optional[torch.Tensor],
                        ignore_index: Optional[int], reduction: str, label_smoothing: float,
                        compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dlogits) of logits [C], [B, C] or [B, C, d1, ...] (classes on dim 1), targets
    class indices (the logits' shape without dim 1) or probabilities (the logits' shape),
    weight None or [C]: loss fp32 (fp64 for fp64 logits), 0-d, or the targets' index shape for
    "none"; dlogits in the logits' shape and dtype, or an empty tensor when not compute_grad."""
    kw = dict(weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
              grad=compute_grad)
    if _use_triton(logits):
        if not targets.is_floating_point():
            _assert_targets_async(targets, logits.shape[min(1, logits.dim() - 1)], ignore_index, "cross_entropy")
        loss, dlogits = _triton_kernels().softmax_cross_entropy(logits, targets, check_targets=False, **kw)
    else:
        kw["weight"] = None if weight is None else _as_numpy(weight)
        loss, dlogits = reference.softmax_cross_entropy(_as_numpy(logits), _as_numpy(targets), **kw)
        loss = _from_numpy(loss, _loss_dtype(logits.dtype))
        dlogits = None if dlogits is None else _from_numpy(dlogits, logits.dtype)
    return loss, (dlogits.contiguous() if dlogits is not None else _empty(logits))


def _cross_entropy_backward_body(grad_loss: torch.Tensor, dlogits: torch.Tensor) -> torch.Tensor:
    """∂/∂logits: dlogits scaled by the incoming gradient, row by row for reduction "none"
    (grad_loss [B] or [B, d1, ...] against dlogits [B, C, ...])."""
    scale = grad_loss.unsqueeze(1) if grad_loss.dim() >= 1 else grad_loss
    return dlogits * scale.to(dlogits.dtype)


def _soft_target_grads(grad_loss, logits, targets, weight, reduction, label_smoothing, need_targets, need_weight):
    """(∂/∂targets, ∂/∂weight) of probability targets, in torch ops: each row's loss is
    -Σ_c w_c·((1 - ε)·q_c + ε / C)·log p_c, so ∂/∂q_c = -(1 - ε)·w_c·log p_c and
    ∂/∂w_c = -Σ_rows ((1 - ε)·q_c + ε / C)·log p_c, each times the row's cotangent."""
    dim = min(1, logits.dim() - 1)
    n_classes = logits.shape[dim]
    log_p = torch.log_softmax(logits.to(_loss_dtype(logits.dtype)), dim)
    row = grad_loss.to(log_p.dtype)
    if reduction == "mean":
        row = row / max(1, logits.numel() // max(1, n_classes))
    elif reduction == "none" and row.dim():
        row = row.unsqueeze(1)
    eps = float(label_smoothing)
    shape = [1] * logits.dim()
    shape[dim] = n_classes
    w = 1.0 if weight is None else weight.to(log_p.dtype).reshape(shape)
    d_targets = d_weight = None
    if need_targets:
        d_targets = (-(1.0 - eps) * w * log_p * row).to(targets.dtype)
    if need_weight:
        q = targets.to(log_p.dtype) * (1.0 - eps) + eps / n_classes
        d_weight = -(q * log_p * row).sum([d for d in range(logits.dim()) if d != dim]).to(weight.dtype)
    return d_targets, d_weight


def _linear_body(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    dtype = x.dtype
    return F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype)).contiguous()  # the fake's layout


def _linear_backward_body(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_dx: bool,
                          need_dw: bool, need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db) in the dtypes of x, weight and weight; each an empty tensor when not
    needed. A weight wider than x (fp32 master, bf16 x) gets its dw accumulated in fp32."""
    n, k = weight.shape
    master = weight.dtype != x.dtype
    w = weight.to(x.dtype)
    dx = dw = db = None
    if not (need_dw or need_db):
        if need_dx:
            dx = grad_y.matmul(w)
    else:
        acc = torch.zeros((n, k), dtype=torch.float32, device=x.device) if master else None
        fused_bias = need_db and not master
        if _use_triton(x):
            dx, dw, db = _triton_kernels().linear_backward(x, w, grad_y, bias=fused_bias, dw_accumulate=acc,
                                                            need_dx=need_dx)
        else:
            dx, dw, db = reference.linear_backward(_as_numpy(x), _as_numpy(w), _as_numpy(grad_y), bias=fused_bias,
                                                   dw_accumulate=None if acc is None else acc.numpy(),
                                                   need_dx=need_dx)
            dx = None if dx is None else _from_numpy(dx, x.dtype)
            dw = acc if master else _from_numpy(dw, weight.dtype)
            db = None if db is None else _from_numpy(db, weight.dtype)
        if need_db and master:
            db = grad_y.reshape(-1, n).sum(0, dtype=torch.float32).to(weight.dtype)
        if not need_dw:
            dw = None
    return _kept(dx, True, x), _kept(dw, True, weight), _kept(db, True, weight)


def _lce_body(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: Optional[torch.Tensor],
              ignore_index: Optional[int], reduction: str, label_smoothing: float, z_loss: float, softcap: Optional[float],
              need_dx: bool, need_dw: bool, need_db: bool,
              class_weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor]:
    """(loss, dx, dw, db) of the fused LM head for x [N, D], weight [V, D] and bias [V] (x's
    dtype, or its float32 master copy), targets [N], class_weight None or [V]. loss: float32
    (float64 for float64 x), 0-d or [N] for "none". The gradients are computed with the loss
    when one is needed and the reduction is not "none"; each is in its input's dtype (a master
    weight's accumulated in fp32 by the kernel), or an empty tensor."""
    return _lce(_LceInputs(x, weight, targets, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
                           need_dx, need_dw, need_db, class_weight), None)


def _lce_backward_body(grad_loss: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       bias: Optional[torch.Tensor], ignore_index: Optional[int], label_smoothing: float, z_loss: float,
                       softcap: Optional[float], need_dx: bool, need_dw: bool, need_db: bool,
                       class_weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of reduction "none": the kernel again, the cotangent [N] as per-row weights."""
    return _lce(_LceInputs(x, weight, targets, bias, ignore_index, "none", label_smoothing, z_loss, softcap,
                           need_dx, need_dw, need_db, class_weight), grad_loss)[1:]


def _lce_scale_body(grad_loss: torch.Tensor, dx: torch.Tensor, dw: torch.Tensor,
                    db: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of "mean" / "sum" (computed by the forward) times the 0-d cotangent."""
    return tuple(_cross_entropy_backward_body(grad_loss, g) for g in (dx, dw, db))


def _lce(a: "_LceInputs", grad_scale):
    """_lce_body's outputs; with a grad_scale (0-d, or [N] for "none") the gradients are
    computed, whatever the reduction, and multiplied by it."""
    grad = (a.need_dx or a.need_dw or a.need_db) and (a.reduction != "none" or grad_scale is not None)
    x, dtype = a.x, a.x.dtype
    master = a.weight.dtype != dtype
    w = a.weight.to(dtype)
    b = None if a.bias is None else a.bias.to(dtype)
    acc = torch.zeros(w.shape, dtype=torch.float32, device=x.device) if grad and master else None
    kw = dict(ignore_index=a.ignore_index, reduction=a.reduction, label_smoothing=a.label_smoothing,
              z_loss=a.z_loss, softcap=a.softcap, need_dx=a.need_dx, grad=grad)
    if _use_triton(x):
        _assert_targets_async(a.targets, w.shape[0], a.ignore_index, "linear_cross_entropy")
        loss, dx, dw, db = _triton_kernels().linear_cross_entropy(x, w, a.targets, bias=b, dw_accumulate=acc,
                                                                  grad_scale=grad_scale, check_targets=False,
                                                                  class_weight=a.class_weight, **kw)
    else:
        loss, dx, dw, db = reference.linear_cross_entropy(
            _as_numpy(x), _as_numpy(w), _as_numpy(a.targets), bias=None if b is None else _as_numpy(b),
            class_weight=None if a.class_weight is None else _as_numpy(a.class_weight),
            dw_accumulate=None if acc is None else acc.numpy(),
            grad_scale=None if grad_scale is None else _as_numpy(grad_scale), **kw)
        loss = _from_numpy(loss, _loss_dtype(dtype))
        dx = None if dx is None else _from_numpy(dx, dtype)
        dw = acc if acc is not None else None if dw is None else _from_numpy(dw, dtype)
        db = None if db is None else _from_numpy(db, dtype)
    if db is not None:
        db = db.to(a.weight.dtype)  # a master bias: db was accumulated in fp32, rounded once to x's dtype

    return loss, _kept(dx, a.need_dx, x), _kept(dw, a.need_dw, a.weight), _kept(db, a.need_db, a.weight)


def _kept(g, need, like):
    """An op's gradient output: `g` contiguous (the layout the fakes give), or an empty tensor
    when it is not needed."""
    return g.contiguous() if need and g is not None else _empty(like)


class _LceInputs(NamedTuple):
    """The inputs of gpuad::linear_cross_entropy by name, in the op's order (the op takes them
    flat: a custom op's arguments are tensors and scalars)."""
    x: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    targets: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    ignore_index: Optional[int] = None
    reduction: Optional[str] = None
    label_smoothing: Optional[float] = None
    z_loss: Optional[float] = None
    softcap: Optional[float] = None
    need_dx: Optional[bool] = None
    need_dw: Optional[bool] = None
    need_db: Optional[bool] = None
    class_weight: Optional[torch.Tensor] = None


assert _LceInputs._fields == tuple(inspect.signature(_lce_body).parameters)


# --- one definition per op: the torch.library registration and the eager Function -------
class _Op:
    """One gpuad op, defined once from its body. ``op`` is the torch.library custom op
    (``gpuad::<name>``, what torch.compile traces) with `fake` (shapes and dtypes only) and, for
    a differentiable op, `setup` and `backward` as its autograd; ``function`` is a
    torch.autograd.Function with the same setup and backward around the body, which skips the
    custom-op dispatch in eager mode (``EAGER_BYPASS``). ``backward(ctx, eager, *grads)`` runs
    the backward ops, or their bodies when `eager`."""

    def __init__(self, name, body, fake, setup=None, backward=None):
        self.body = body
        self.op = torch.library.custom_op(f"gpuad::{name}", body, mutates_args=())
        self.op.register_fake(fake)
        if backward is not None:
            self.op.register_autograd(lambda ctx, *grads: backward(ctx, False, *grads), setup_context=setup)
            self.function = type(f"_{name}_function", (torch.autograd.Function,), dict(
                forward=staticmethod(body), setup_context=staticmethod(setup),
                backward=staticmethod(lambda ctx, *grads: backward(ctx, True, *grads))))

    def __call__(self, eager: bool, *args):
        """The outputs of the body (`eager`) or of the registered op: for backward ops."""
        return (self.body if eager else self.op)(*args)

    def run(self, needs_grad: bool, *args):
        """The outputs for a public call: the registered op under torch.compile or without
        EAGER_BYPASS; else the eager Function when a gradient is needed, the bare body when not."""
        if not _eager():
            return self.op(*args)
        return self.function.apply(*args) if needs_grad else self.body(*args)


def _cross_entropy_fake(logits, targets, weight, ignore_index, reduction, label_smoothing, compute_grad):
    loss_shape = (logits.shape[0], *logits.shape[2:]) if reduction == "none" and logits.dim() > 1 else ()
    loss = logits.new_empty(loss_shape, dtype=_loss_dtype(logits.dtype))
    return loss, (_new_empty(logits) if compute_grad else _empty(logits))


def _cross_entropy_setup(ctx, inputs, output):
    logits, targets, weight, ignore_index, reduction, label_smoothing, compute_grad = inputs
    ctx.compute_grad, ctx.reduction, ctx.label_smoothing = compute_grad, reduction, label_smoothing
    ctx.mark_non_differentiable(output[1])
    # probability targets (and then the weight) have a gradient of their own: it needs the logits
    ctx.soft_grads = targets.is_floating_point() and (targets.requires_grad or
                                                      (weight is not None and weight.requires_grad))
    ctx.save_for_backward(output[1], *((logits, targets, weight) if ctx.soft_grads else ()))


def _refuse_double_backward(who: str):
    """Raise when the backward runs with create_graph=True: `who`'s gradient comes from a fused
    kernel that is not itself differentiable, so a second derivative would silently miss its
    term (autograd would see a constant)."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"gpuad.torch.{who} has no double backward: its backward ran with create_graph=True "
                           "(torch.autograd.grad(..., create_graph=True) for a gradient penalty, or a torch.func "
                           "transform), and its fused gradient is not differentiable; use the torch function it "
                           "replaces where second derivatives are needed")


def _cross_entropy_backward(ctx, eager, grad_loss, _grad_dlogits):
    """(∂/∂logits, ∂/∂targets, ∂/∂weight, None...): the logits' from the kept gradient; those
    of probability targets and of the weight (with probability targets) in torch ops."""
    _refuse_double_backward("cross_entropy")
    if not ctx.compute_grad:
        raise RuntimeError("gpuad::cross_entropy ran with compute_grad=False: it kept no gradient to backpropagate")
    dlogits = ctx.saved_tensors[0]
    d_logits = _CROSS_ENTROPY_BACKWARD(eager, grad_loss, dlogits) if ctx.needs_input_grad[0] else None
    d_targets = d_weight = None
    if ctx.soft_grads:
        logits, targets, weight = ctx.saved_tensors[1:]
        d_targets, d_weight = _soft_target_grads(grad_loss, logits, targets, weight, ctx.reduction,
                                                 ctx.label_smoothing, ctx.needs_input_grad[1],
                                                 ctx.needs_input_grad[2])
    return d_logits, d_targets, d_weight, None, None, None, None


_CROSS_ENTROPY_BACKWARD = _Op("cross_entropy_backward", _cross_entropy_backward_body,
                              lambda grad_loss, dlogits: _new_empty(dlogits))
_CROSS_ENTROPY = _Op("cross_entropy", _cross_entropy_body, _cross_entropy_fake, _cross_entropy_setup,
                     _cross_entropy_backward)


def _grads_fake(x, weight, need_dx, need_dw, need_db):
    """The fake (dx, dw, db) of linear_backward and of the LM head."""
    return (_new_empty(x) if need_dx else _empty(x), _new_empty(weight) if need_dw else _empty(weight),
            _new_empty(weight, (weight.shape[0],)) if need_db else _empty(weight))


def _linear_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _linear_backward(ctx, eager, grad_y):
    """(dx, dw, db or None), None where not needed; in differentiable torch ops when the
    backward runs with create_graph=True (exact second derivatives)."""
    x, weight = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    need_db = need_db and ctx.has_bias
    args = (grad_y, x, weight, need_dx, need_dw, need_db)
    dx, dw, db = _linear_backward_differentiable(*args) if torch.is_grad_enabled() else _LINEAR_BACKWARD(eager, *args)
    return dx if need_dx else None, dw if need_dw else None, db if need_db else None


def _linear_backward_differentiable(grad_y, x, weight, need_dx, need_dw, need_db):
    """linear_backward's (dx, dw, db) in torch ops that autograd can differentiate again; a
    float32 master weight's dw and db accumulated in fp32, as the kernel does."""
    acc = torch.promote_types(x.dtype, weight.dtype)
    m = math.prod(x.shape[:-1])  # rows (reshape(-1, ...) cannot infer it when N or K is 0)
    g2 = grad_y.reshape(m, weight.shape[0]).to(acc)
    dx = grad_y.matmul(weight.to(x.dtype)) if need_dx else None
    dw = g2.t().matmul(x.reshape(m, x.shape[-1]).to(acc)).to(weight.dtype) if need_dw else None
    db = g2.sum(0).to(weight.dtype) if need_db else None
    return dx, dw, db


_LINEAR_BACKWARD = _Op("linear_backward", _linear_backward_body,
                       lambda grad_y, x, weight, need_dx, need_dw, need_db: _grads_fake(x, weight, need_dx,
                                                                                         need_dw, need_db))
_LINEAR = _Op("linear", _linear_body, lambda x, weight, bias: _new_empty(x, (*x.shape[:-1], weight.shape[0])),
              _linear_setup, _linear_backward)


def _lce_fake(*inputs):
    a = _LceInputs(*inputs)
    loss = a.x.new_empty((a.x.shape[0],) if a.reduction == "none" else (), dtype=_loss_dtype(a.x.dtype))
    grad = a.reduction != "none"
    return (loss, *_grads_fake(a.x, a.weight, a.need_dx and grad, a.need_dw and grad, a.need_db and grad))


def _lce_backward_fake(grad_loss, x, weight, targets, bias, ignore_index, label_smoothing, z_loss, softcap, need_dx,
                       need_dw, need_db, class_weight=None):
    return _grads_fake(x, weight, need_dx, need_dw, need_db)


def _lce_setup(ctx, inputs, output):
    a = _LceInputs(*inputs)
    ctx.options = a._replace(x=None, weight=None, targets=None, bias=None, class_weight=None)  # the tensors are saved
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*((a.x, a.weight, a.targets, a.bias, a.class_weight) if a.reduction == "none"
                            else output[1:]))


def _scale_in_place(grad_loss, *grads):
    """The eager "mean" / "sum" backward: the saved gradients scaled in place (no second copy
    of dW), for a backward that frees the graph."""
    return tuple(g.mul_(grad_loss.to(g.dtype)) for g in grads)


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True), so that the saved
    tensors must outlive it; True where this torch cannot tell, and in a traced backward (one
    graph for every later backward)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is None or torch.compiler.is_compiling() or keep_graph()


def _lce_backward(ctx, eager, grad_loss, *_):
    """The gradients of the op's inputs (dx, dw and db by name, None for the others): the "none"
    backward runs the kernel again; "mean" / "sum" scale the gradients the forward kept."""
    _refuse_double_backward("linear_cross_entropy")
    o, wanted = ctx.options, _LceInputs(*ctx.needs_input_grad)
    needs = (o.need_dx, o.need_dw, o.need_db)
    if any(w and not need for w, need in zip((wanted.x, wanted.weight, wanted.bias), needs)):
        raise RuntimeError("gpuad::linear_cross_entropy ran without computing a gradient that is now asked for "
                           f"(need_dx, need_dw, need_db = {needs})")
    if o.reduction == "none":
        x, weight, targets, bias, class_weight = ctx.saved_tensors
        grads = _LCE_BACKWARD(eager, grad_loss, x, weight, targets, bias, o.ignore_index, o.label_smoothing,
                              o.z_loss, o.softcap, *needs, class_weight)
    else:
        scale = _scale_in_place if eager and not _graph_kept() else functools.partial(_LCE_SCALE, eager)
        grads = scale(grad_loss, *ctx.saved_tensors)
    dx, dw, db = (g if w else None for g, w in zip(grads, (wanted.x, wanted.weight, wanted.bias)))
    return tuple(_LceInputs(x=dx, weight=dw, bias=db))


_LCE_SCALE = _Op("linear_cross_entropy_scale", _lce_scale_body,
                 lambda grad_loss, dx, dw, db: (_new_empty(dx), _new_empty(dw), _new_empty(db)))
_LCE_BACKWARD = _Op("linear_cross_entropy_backward", _lce_backward_body, _lce_backward_fake)
_LCE = _Op("linear_cross_entropy", _lce_body, _lce_fake, _lce_setup, _lce_backward)


# --- public functions and modules ------------------------------------------------------
def _check_tensors(who: str, optional=("bias",), **arrays):
    """Each named argument is a torch.Tensor (those named in `optional` may be None), outside
    torch.func transforms."""
    for name, t in arrays.items():
        if not isinstance(t, torch.Tensor) and not (name in optional and t is None):
            raise TypeError(f"gpuad.torch.{who}: {name} must be a torch.Tensor{' or None' if name in optional else ''}, "
                            f"got {type(t).__name__}")
    if not torch.compiler.is_compiling() and any(
            t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in arrays.values()):
        raise RuntimeError(f"gpuad.torch.{who} does not support torch.func transforms (vmap, grad, jacrev, ...): "
                           "its kernels read the tensors' memory; call it outside the transform, or use the torch "
                           "function it replaces")


def _check_device(name: str, t: torch.Tensor):
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on {t.device}: gpuad.torch runs on CPU and CUDA tensors")
    if t.device.type == "cuda" and t.dtype == torch.float64:
        raise ValueError(f"{name} is float64 on CUDA: the Triton kernels take float16, bfloat16 and float32")


def _check_same_device(name: str, t: Optional[torch.Tensor], like_name: str, like: torch.Tensor):
    if t is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, {like_name} on {like.device}: they must share one device")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _compute_input(x: torch.Tensor, weight: torch.Tensor, k: str, n: str) -> torch.Tensor:
    """x checked (device, floating point, x [..., k] against weight [n, k]) and cast to the
    autocast dtype when autocast is on."""
    _check_device("x", x)
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype != torch.float64:
        x = x.to(torch.get_autocast_dtype(device))
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x [..., {k}] and weight [{n}, {k}] do not match: x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    return x


def _check_weight(x, weight, bias):
    """The dtype policy of weight and bias (x's dtype, or a float32 master copy of fp16/bf16
    x), bias [N] and the device."""
    if weight.dtype != x.dtype and not (weight.dtype == torch.float32 and x.dtype in _LOW_PRECISION):
        raise ValueError(f"weight must have x's dtype, or be float32 with float16/bfloat16 x: "
                         f"got x {x.dtype}, weight {weight.dtype}")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(f"bias must be [N] = [{weight.shape[0]}] in weight's dtype {weight.dtype}, "
                         f"got {bias.dtype} {tuple(bias.shape)}")
    _check_same_device("weight", weight, "x", x)
    _check_same_device("bias", bias, "x", x)


def _loss_out(loss, x):
    """The loss in x's dtype, as torch's loss of x's logits would be (float32 or wider under
    autocast)."""
    autocast = torch.is_autocast_enabled(x.device.type)
    return loss.to(torch.promote_types(x.dtype, torch.float32) if autocast else x.dtype)


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                  size_average: Optional[bool] = None, ignore_index: int = -100, reduce: Optional[bool] = None,
                  reduction: str = "mean", label_smoothing: float = 0.0, *, process_group=None) -> torch.Tensor:
    """F.cross_entropy (same arguments, order and semantics) through gpuad's fused kernel.

    input [C], [B, C] or [B, C, d1, ...] (classes on dim 1); target class indices (input's
    shape without dim 1) or class probabilities (input's shape, floating); weight None or
    [C]. size_average and reduce are the deprecated spellings of reduction, mapped as torch
    maps them. Returns the loss in the input's dtype (float32 under autocast, as torch does):
    0-d, or target's index shape for reduction "none". Gradients flow to input, to
    probability targets and (with probability targets) to weight. With process_group, input
    is this rank's vocabulary slice [B, V_r] of index targets [B], without weight: see
    gpuad.torch_parallel.cross_entropy."""
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    _check_tensors("cross_entropy", ("weight",), input=input, target=target, weight=weight)
    ignore_index = checks.ignore_index_arg(ignore_index)
    if process_group is not None:
        if weight is not None:
            raise ValueError("weight is not supported with process_group (vocabulary-parallel cross_entropy)")
        from gpuad import torch_parallel
        return torch_parallel.cross_entropy(input, target, ignore_index, reduction, label_smoothing,
                                            process_group=process_group)
    _check_device("input", input)
    _check_same_device("target", target, "input", input)
    _check_same_device("weight", weight, "input", input)
    if isinstance(reduction, str) and reduction not in checks.REDUCTIONS:
        raise ValueError(f"reduction must be one of {checks.REDUCTIONS}, got {reduction!r}")
    layout = checks.check_cross_entropy_layout(input, target, weight, reduction, label_smoothing, ignore_index)
    if weight is not None and weight.requires_grad and not layout.soft and torch.is_grad_enabled():
        raise RuntimeError("cross_entropy is not differentiable with respect to weight with class-index targets "
                           "(as F.cross_entropy): pass weight.detach()")
    needs_grad = _needs_grad(input, *((target, weight) if layout.soft else ()))
    loss, _ = _CROSS_ENTROPY.run(needs_grad, input, target, weight, ignore_index, reduction,
                                 float(label_smoothing), needs_grad)
    return _loss_out(loss, input)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear (y = x weightᵀ + bias; x [..., K], weight [N, K], bias [N]) whose backward is
    gpuad's fused linear_backward. weight and bias share one dtype: x's, or float32 as the
    master copy of fp16/bf16 activations (its gradient is accumulated and returned in fp32).
    Under torch.autocast, x is cast to the autocast dtype, as F.linear would be."""
    _check_tensors("linear", x=x, weight=weight, bias=bias)
    x = _compute_input(x, weight, "K", "N")
    _check_weight(x, weight, bias)
    return _LINEAR.run(_needs_grad(x, weight, bias), x, weight, bias)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: Optional[float] = None, *,
                         class_weight: Optional[torch.Tensor] = None, process_group=None) -> torch.Tensor:
    """F.cross_entropy(F.linear(x, weight, bias), targets) without the [N, V] logits: the fused
    LM head (row chunks of logits, three GEMMs, dW accumulated in fp32).

    x [..., D], weight [V, D], bias [V] or None, integer targets x.shape[:-1]. weight and bias
    share one dtype: x's, or float32 as the master copy of fp16/bf16 activations (then dW is
    accumulated in fp32 and returned in fp32; a bias's gradient is rounded once to x's dtype).
    Under torch.autocast, x is cast to the autocast dtype. z_loss adds z_loss·lse² per row
    (PaLM); softcap c applies c·tanh(z / c) to the logits first (Gemma 2). Returns the loss in
    x's dtype (float32 under autocast): a scalar, or targets' shape for reduction "none".
    class_weight (a floating [V], F.cross_entropy's `weight`, named apart from the LM head's
    weight matrix; not with z_loss) weighs the classes as F.cross_entropy does: "mean" divides
    by the sum of the valid targets' class weights. It takes no gradient.
    With process_group (or a weight that is a DTensor sharded on dim 0), weight, bias and
    class_weight are this rank's vocabulary rows: see gpuad.torch_parallel.linear_cross_entropy."""
    _check_tensors("linear_cross_entropy", ("bias", "class_weight"), x=x, weight=weight, targets=targets, bias=bias,
                   class_weight=class_weight)
    ignore_index = checks.ignore_index_arg(ignore_index)
    if class_weight is not None and class_weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("linear_cross_entropy is not differentiable with respect to class_weight (as "
                           "F.cross_entropy's weight): pass class_weight.detach()")
    if process_group is not None or type(weight).__name__ == "DTensor":
        from gpuad import torch_parallel
        return torch_parallel.linear_cross_entropy(x, weight, targets, bias, ignore_index, reduction, label_smoothing,
                                                   z_loss, softcap, class_weight=class_weight,
                                                   process_group=process_group)
    x = _compute_input(x, weight, "D", "V")
    if tuple(targets.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"targets must have x's shape without its last axis, {tuple(x.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    _check_weight(x, weight, bias)
    _check_same_device("targets", targets, "x", x)
    checks.check_integer_targets(targets)
    checks.check_lce_options(reduction, label_smoothing, z_loss, softcap)
    checks.check_class_weight(class_weight, weight.shape[0], z_loss)
    _check_same_device("class_weight", class_weight, "x", x)
    a = _LceInputs(x.reshape(targets.numel(), x.shape[-1]), weight, targets.reshape(-1), bias,  # D = 0 allowed
                   ignore_index=ignore_index, reduction=reduction, label_smoothing=float(label_smoothing),
                   z_loss=float(z_loss), softcap=None if softcap is None else float(softcap), need_dx=_needs_grad(x),
                   need_dw=_needs_grad(weight), need_db=_needs_grad(bias), class_weight=class_weight)
    loss = _LCE.run(a.need_dx or a.need_dw or a.need_db, *a)[0]
    return _loss_out(loss.reshape(targets.shape) if reduction == "none" else loss, x)


class Linear(torch.nn.Linear):
    """nn.Linear (same arguments, initialisation and state_dict) whose backward runs gpuad's
    fused linear_backward. Keep its parameters in float32 and feed it bf16 activations (or
    run it under torch.autocast) for fp32 master weights with fp32-accumulated gradients."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """nn.CrossEntropyLoss (same arguments, attributes, weight buffer and state_dict) whose
    forward is gpuad's fused :func:`cross_entropy`: every layout, class weights and
    probability targets."""

    def __init__(self, weight: Optional[torch.Tensor] = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        if self.reduction not in checks.REDUCTIONS:
            raise ValueError(f"reduction must be one of {checks.REDUCTIONS}, got {self.reduction!r}")
        self.ignore_index = checks.ignore_index_arg(ignore_index)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                             label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"


class LinearCrossEntropy(torch.nn.Module):
    """An LM head that returns its loss: ``forward(x, targets)`` is
    ``linear_cross_entropy(x, self.weight, targets, self.bias, ...)``, so the [N, V] logits
    never exist. It owns the weight [num_classes, in_features] (initialised and named as
    nn.Linear's, so an nn.Linear's state_dict loads), so that a wrapper that shards
    parameters (FSDP) has gathered the weight when the loss runs in this forward.
    ``logits(x)`` gives the logits for inference. Keep the weight in float32 and feed bf16
    activations (or use torch.autocast) for fp32 master weights with fp32-accumulated dW.
    class_weight [num_classes] (a buffer, in the state_dict) weighs the classes as
    nn.CrossEntropyLoss's weight. With process_group, it holds only this rank's rows of the
    vocabulary (gpuad.torch_parallel.vocab_slice), and of class_weight, and its loss is the
    vocabulary-parallel one."""

    def __init__(self, in_features: int, num_classes: int, bias: bool = False, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                 softcap: Optional[float] = None, device=None, dtype=None, *,
                 class_weight: Optional[torch.Tensor] = None, process_group=None):
        super().__init__()
        if reduction not in checks.REDUCTIONS:
            raise ValueError(f"reduction must be one of {checks.REDUCTIONS}, got {reduction!r}")
        self.in_features, self.num_classes = in_features, num_classes
        self.ignore_index = checks.ignore_index_arg(ignore_index)
        self.reduction, self.label_smoothing = reduction, label_smoothing
        self.z_loss, self.softcap, self.process_group = z_loss, softcap, process_group
        rows = num_classes
        if class_weight is not None:
            checks.check_class_weight(class_weight, num_classes, z_loss)
        if process_group is not None:  # this rank's rows only
            from gpuad import torch_parallel
            rows = torch_parallel.local_rows(num_classes, process_group)
            if class_weight is not None:
                class_weight = torch_parallel.shard_rows(class_weight, process_group)
        self.register_buffer("class_weight", None if class_weight is None else class_weight.detach().clone())
        self.weight = torch.nn.Parameter(torch.empty((rows, in_features), device=device, dtype=dtype))
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(rows, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        torch.nn.Linear.reset_parameters(self)  # U(-1/√in, 1/√in), as nn.Linear

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.process_group is not None:
            from gpuad import torch_parallel
            return torch_parallel.head_loss(self, x, targets)
        return linear_cross_entropy(x, self.weight, targets, self.bias, self.ignore_index, self.reduction,
                                    self.label_smoothing, self.z_loss, self.softcap, class_weight=self.class_weight)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> the logits [..., V] (for inference: this one holds them)."""
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, bias={self.bias is not None}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}")
