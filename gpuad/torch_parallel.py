"""Vocabulary-parallel cross-entropy and LM head over ``torch.distributed``.

Rank r of a process group holds a contiguous slice of the vocabulary, in rank order (slices
may differ in size, even be empty). The loss equals the single-process loss of the whole
vocabulary, on every rank; the gradients of the logits, weight and bias are this rank's
slices of the full ones. Use these through ``gpuad.torch`` (``process_group=pg``, or a weight
that is a DTensor sharded on dim 0 over a 1-D mesh); see docs/vocab-parallel.md.

Per call (per chunk of rows for the LM head) two all-reduces cross the group: MAX of the row
maxima (with a few metadata slots: the slice sizes, a checksum of the targets and the claimed
vocabulary size), then SUM of the rows' Σ exp(z - max), target logit and, with label
smoothing, Σ z (with class weights: Σ c·z, and the target's weight and Σ c as well). The LM
head all-reduces dx once more (unless ``reduce_dx=False``). The statistics are float32
(float64 for float64 inputs); the logits, their gradient and dW are computed in that dtype
too, one chunk of rows at a time. The collectives are functional
collectives, so ``torch.compile(fullgraph=True)`` traces them. Bad input that every rank sees
alike (a target outside the vocabulary, targets that differ between ranks, slices that do not
add up to the module's vocabulary) fails a device-side assertion on every rank after the
first all-reduce, so no rank waits on a collective the others never reach.
"""
import functools
import types
from typing import Optional

import torch
from torch.distributed import _functional_collectives as funcol

from gpuad.kernels import checks, reference
from gpuad.torch import (_check_weight, _compute_input, _cross_entropy_backward_body, _graph_kept, _loss_out,
                         _needs_grad, _refuse_double_backward)

__all__ = ["cross_entropy", "linear_cross_entropy", "vocab_slice", "local_rows", "shard_rows", "shard_head"]

_META = 4  # metadata slots after the slice sizes in the MAX all-reduce: h, -h, claim, -claim
_HASH_MOD = (1 << 23) - 15  # a prime: the target checksum stays exact in float32


# --- slices of the vocabulary ------------------------------------------------------------
def _group_info(group):
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def vocab_slice(vocab_size: int, process_group) -> tuple[int, int]:
    """(start, stop) of this rank's rows of a [vocab_size, ...] tensor: torch.chunk's split
    (⌈V / world⌉ rows a rank, the last ranks fewer or none), as a DTensor's Shard(0)."""
    rank, world = _group_info(process_group)
    per = -(-vocab_size // world)
    start = min(rank * per, vocab_size)
    return start, min(start + per, vocab_size)


def shard_rows(full: torch.Tensor, process_group) -> torch.Tensor:
    """This rank's rows (a copy) of a full [V, ...] tensor, per :func:`vocab_slice`."""
    start, stop = vocab_slice(full.shape[0], process_group)
    return full[start:stop].detach().clone()


# --- per-row statistics across the group ---------------------------------------------------
class _Meta:
    """What the first all-reduce tells every rank: the global vocabulary size V and this
    rank's first class id (0-d tensors on the device), after checking the inputs agree."""

    def __init__(self, reduced, rank, world, targets, valid, who):
        sizes = reduced[:world]
        h, h_neg, claim, claim_neg = reduced[world:world + _META]
        self.vocab = sizes.sum()  # in the statistics' dtype
        self.offset = sizes[:rank].sum().to(torch.int64)
        torch._assert_async(h == -h_neg, f"{who}: targets differ between the ranks of process_group: every "
                                         "rank must pass the same targets")
        torch._assert_async(claim == -claim_neg, f"{who}: the ranks disagree on the vocabulary size")
        torch._assert_async((claim < 0) | (claim == self.vocab),
                            f"{who}: the ranks' vocabulary slices do not add up to the vocabulary size")
        torch._assert_async(self.vocab > 0, f"{who}: every rank's vocabulary slice is empty")
        bad = valid & ((targets < 0) | (targets >= self.vocab))
        torch._assert_async(~bad.any(), f"{who}: a target is outside [0, V) of the whole vocabulary (V the sum "
                                        "of the ranks' slices) and is not ignore_index")


def _meta_slots(targets, claim, dtype):
    """The metadata after the slice sizes in the MAX all-reduce: a checksum h of the targets
    as (h, -h) and the claimed vocabulary size as (claim, -claim) (-1 for no claim). After the
    MAX, h == -(-h) exactly when every rank had the same h (likewise the claim)."""
    pos = torch.arange(1, targets.numel() + 1, device=targets.device, dtype=torch.int64)
    h = ((targets.to(torch.int64) + 2) * (pos * 2 + 1) % _HASH_MOD).sum() % _HASH_MOD
    h = h.to(dtype)
    c = float(claim if claim is not None else -1)
    claim_t = torch.full((), c, dtype=dtype, device=targets.device)  # a fill: no host-to-device copy
    return torch.stack([h, -h]), torch.stack([claim_t, -claim_t])


def _first_max(row_max, slice_size, targets, rank, world, claim, group):
    """row_max, the slice sizes (this rank's at slot `rank`, -1 elsewhere) and the metadata
    slots in one MAX all-reduce: (global row max, reduced sizes and slots)."""
    n = row_max.shape[0]
    sizes = torch.full((world,), -1.0, dtype=row_max.dtype, device=row_max.device)
    sizes[rank] = float(slice_size)
    reduced = funcol.all_reduce(torch.cat([row_max, sizes, *_meta_slots(targets, claim, row_max.dtype)]), "max",
                                group=group)
    return reduced[:n], reduced[n:]


def _row_max(z):
    if z.shape[1] == 0:
        return torch.full((z.shape[0],), float("-inf"), dtype=z.dtype, device=z.device)
    return z.amax(1)


def _local_target(z, targets, valid, meta):
    """(z_t where this rank holds the target else 0, the column in this slice or -1)."""
    col = targets - meta.offset
    here = valid & (col >= 0) & (col < z.shape[1])
    col = torch.where(here, col, -1)
    if z.shape[1] == 0:
        return torch.zeros(z.shape[0], dtype=z.dtype, device=z.device), col
    z_t = torch.gather(z, 1, col.clamp(min=0)[:, None])[:, 0]
    return torch.where(here, z_t, 0.0), col


def _global_stats(z, targets, valid, meta, eps, group, who, claim, cw=None):
    """z [n, V_r] (soft-capped, accumulation dtype): (lse [n], z_t [n], Σz [n] or None, meta,
    col [n], classes) of the whole vocabulary, by a MAX then a SUM all-reduce. With meta None
    (the first chunk) the MAX carries the metadata, checked and returned as a new meta;
    `targets` are then all the rows' targets (for the checksum), else this chunk's. With
    class weights cw (this rank's [V_r], accumulation dtype), Σz is Σ c·z and classes is
    [2, n]: each row's c_t (0 for an ignored row) and target mass (1 - ε)·c_t + (ε/V)·Σ c;
    else classes is None."""
    if meta is None:
        rank, world = _group_info(group)
        m, slots = _first_max(_row_max(z), z.shape[1], targets, rank, world, claim, group)
        meta = _Meta(slots, rank, world, targets, valid, who)
        targets, valid = targets[:z.shape[0]], valid[:z.shape[0]]
    else:
        m = funcol.all_reduce(_row_max(z), "max", group=group)
    m = torch.where(torch.isfinite(m), m, 0.0)
    z_t, col = _local_target(z, targets, valid, meta)
    parts = [(z - m[:, None]).exp_().sum(1), z_t] + ([z.sum(1) if cw is None else z @ cw] if eps else [])
    if cw is not None:  # the target's weight from the rank that holds it, and Σ c of every rank
        c_t = cw[col.clamp(min=0)] if cw.shape[0] else torch.zeros_like(z_t)
        parts += [torch.where(col >= 0, c_t, 0.0), cw.sum().expand(z.shape[0])]
    sums = funcol.all_reduce(torch.stack(parts), "sum", group=group)
    lse = m + torch.log(sums[0])
    classes = None
    if cw is not None:
        c_t = sums[-2]
        classes = torch.stack([c_t, (1.0 - eps) * c_t + eps / meta.vocab * sums[-1]])
    return lse, sums[1], (sums[2] if eps else None), meta, col, classes


def _row_losses(lse, z_t, sum_z, valid, eps, z_loss, vocab, classes=None):
    """Row losses (0 on ignored rows); with classes ([c_t, mass] of _global_stats) the
    class-weighted ones, mass·lse - (1 - ε)·c_t·z_t - (ε/V)·Σ c·z."""
    if classes is None:
        loss = lse - (1.0 - eps) * z_t
    else:
        loss = classes[1] * lse - (1.0 - eps) * classes[0] * z_t
    if eps:
        loss = loss - eps / vocab * sum_z
    if z_loss:
        loss = loss + z_loss * lse * lse
    return torch.where(valid, loss, 0.0)


def _row_grad(z, lse, col, scale, eps, z_loss, softcap, vocab, cw=None, classes=None):
    """d(Σ scale_n · loss_n)/dz for this rank's columns (z soft-capped, scale 0 on ignored
    rows), in place in one new [n, V_r] buffer (and one more for the softcap factor). With
    class weights cw [V_r] and classes ([c_t, mass] of _global_stats):
    mass·softmax - (ε/V)·c - (1 - ε)·c_t·onehot."""
    g = (z - lse[:, None]).exp_()
    if z_loss:
        g.mul_((1.0 + 2.0 * z_loss * lse)[:, None])
    if classes is not None:
        g.mul_(classes[1][:, None])
    if eps:
        g.sub_(eps / vocab if cw is None else cw * (eps / vocab))
    if g.shape[1]:
        target = (1.0 - eps) * (col >= 0).to(g.dtype) * (1.0 if classes is None else classes[0])
        g.scatter_add_(1, col.clamp(min=0)[:, None], -target[:, None])
    if softcap is not None:
        g.mul_(torch.square(z).mul_(-1.0 / softcap ** 2).add_(1.0))
    return g.mul_(scale[:, None]).masked_fill_((scale == 0)[:, None], 0.0)  # an ignored row: 0 even from NaN


_valid_rows = checks.valid_targets


def _row_scale(valid, reduction, dtype, grad_scale=None):
    """The per-row factor of the gradient: valid / n_valid for "mean", times grad_scale."""
    scale = valid.to(dtype)
    if reduction == "mean":
        scale = scale / valid.sum().clamp(min=1).to(dtype)
    return scale if grad_scale is None else scale * grad_scale.to(dtype)


def _first_order(who):
    """A backward of the vocabulary-parallel `who` that refuses to be differentiated
    (create_graph=True) with a clear error."""
    def decorate(backward):
        @functools.wraps(backward)
        def wrapped(ctx, *grads):
            _refuse_double_backward(f"{who} (vocabulary-parallel)")
            return backward(ctx, *grads)
        return wrapped
    return decorate


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- cross-entropy of vocabulary-sharded logits --------------------------------------------
def _ce_body(logits, targets, ignore_index, reduction, eps, group, claim, grad):
    """(loss, dlogits or None): loss float32 (float64 for float64 logits), 0-d or [B]; dlogits
    [B, V_r] in the logits' dtype, this rank's slice of d(loss)/d(logits)."""
    acc = _acc_dtype(logits.dtype)
    z = logits.to(acc)
    valid = _valid_rows(targets, ignore_index)
    lse, z_t, sum_z, meta, col, _ = _global_stats(z, targets, valid, None, eps, group,
                                                  "gpuad.torch.cross_entropy", claim)
    row = _row_losses(lse, z_t, sum_z, valid, eps, 0.0, meta.vocab)
    loss = reference.reduce_row_losses(row, reduction, valid.sum().clamp(min=1).to(acc))
    if not grad:
        return loss, None
    dz = _row_grad(z, lse, col, _row_scale(valid, reduction, acc), eps, 0.0, None, meta.vocab)
    return loss, dz.to(logits.dtype)


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction, eps, group, claim):
        loss, dlogits = _ce_body(logits, targets, ignore_index, reduction, eps, group, claim, True)
        ctx.save_for_backward(dlogits)
        return loss

    @staticmethod
    @_first_order("cross_entropy")
    def backward(ctx, grad_loss):
        (dlogits,) = ctx.saved_tensors
        return (_cross_entropy_backward_body(grad_loss, dlogits),) + (None,) * 6


def _check_group(process_group):
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise RuntimeError("process_group was given but torch.distributed is not initialised: call "
                           "torch.distributed.init_process_group first")
    if not isinstance(process_group, torch.distributed.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got {type(process_group).__name__}")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: Optional[int] = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, *, process_group,
                  vocab_size: Optional[int] = None) -> torch.Tensor:
    """Cross-entropy of logits whose vocabulary is split over process_group: logits_shard
    [B, V_r] (rank r's columns, in rank order; V_r may be 0), integer targets [B] of global
    class ids, the same on every rank. The loss (in the logits' dtype, as gpuad.torch's
    cross_entropy) is that of the concatenated logits, on every rank; the gradient is this
    rank's slice. ignore_index None ignores no row. vocab_size, when given, is checked
    against the sum of the slices."""
    _check_group(process_group)
    shape = (logits.shape[0], max(logits.shape[1], 1)) if logits.dim() == 2 else logits.shape  # V_r may be 0
    checks.check_cross_entropy_args(types.SimpleNamespace(shape=shape, dtype=logits.dtype), targets, reduction,
                                    label_smoothing)
    ignore_index = checks.ignore_index_arg(ignore_index)
    if targets.device != logits.device:
        raise ValueError(f"targets is on {targets.device}, logits on {logits.device}: they must share one device")
    args = (logits, targets, ignore_index, reduction, float(label_smoothing), process_group, vocab_size)
    if _needs_grad(logits):
        loss = _CrossEntropyFunction.apply(*args)
    else:
        loss = _ce_body(*args, False)[0]
    return _loss_out(loss, logits)


# --- the vocabulary-parallel LM head -------------------------------------------------------
class _Opts:
    """The options of one LM-head call (not tensors)."""

    def __init__(self, ignore_index, reduction, eps, z_loss, softcap, group, claim, reduce_dx, chunk,
                 class_weight=None):
        self.ignore_index, self.reduction, self.eps, self.z_loss = ignore_index, reduction, eps, z_loss
        self.softcap, self.group, self.claim, self.reduce_dx, self.chunk = softcap, group, claim, reduce_dx, chunk
        self.class_weight = class_weight  # this rank's [V_r], or None


def _chunk_logits(xc, wa, ba, softcap):
    z = xc @ wa.T if ba is None else torch.addmm(ba, xc, wa.T)
    return z if softcap is None else z.div_(softcap).tanh_().mul_(softcap)


def _lce_pass(x, weight, bias, targets, o, needs, scale=None, lse=None, meta=None, classes=None):
    """One walk over the row chunks. Without lse: the row losses and lse (the statistics
    all-reduced per chunk), and the gradients when `scale` is given. With lse, meta and
    classes (a saved forward): the gradients only. Returns (row_loss, lse, meta, dx, dw, db,
    classes); dx is this rank's partial sum (accumulation dtype), dw and db this rank's rows,
    classes [2, n] ([c_t, mass], with class weights) or None."""
    acc = _acc_dtype(x.dtype)
    n, v = x.shape[0], weight.shape[0]
    chunk = o.chunk or reference.linear_cross_entropy_chunk(n, max(v, 1), torch.finfo(acc).bits // 8)
    wa, ba = weight.to(acc), None if bias is None else bias.to(acc)
    cw = None if o.class_weight is None else o.class_weight.to(acc)
    valid = _valid_rows(targets, o.ignore_index)
    need_dx, need_dw, need_db = needs if scale is not None else (False, False, False)
    losses, lses, dxs, cls = [], [], [], []
    dw = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_dw else None
    db = torch.zeros(v, dtype=acc, device=x.device) if need_db else None
    for r0 in range(0, max(n, 1), chunk):
        rows = slice(r0, r0 + chunk)
        xc, ok = x[rows].to(acc), valid[rows]
        z = _chunk_logits(xc, wa, ba, o.softcap)
        if lse is None:
            stats_targets = targets if meta is None else targets[rows]
            lse_c, z_t, sum_z, meta, col, cls_c = _global_stats(z, stats_targets, valid if meta is None else ok, meta,
                                                                o.eps, o.group, "gpuad.torch.linear_cross_entropy",
                                                                o.claim, cw)
            losses.append(_row_losses(lse_c, z_t, sum_z, ok, o.eps, o.z_loss, meta.vocab, cls_c))
            lses.append(lse_c)
            cls.append(cls_c)
        else:
            lse_c, col = lse[rows], _local_target(z, targets[rows], ok, meta)[1]
            cls_c = None if classes is None else classes[:, rows]
        if scale is None:
            continue
        g = _row_grad(z, lse_c, col, scale[rows], o.eps, o.z_loss, o.softcap, meta.vocab, cw, cls_c)
        if need_dx:
            dxs.append(g @ wa)
        if need_dw:
            dw.addmm_(g.T, xc)
        if need_db:
            db += g.sum(0)
    cat = (lambda ts, dim=0: torch.cat(ts, dim)) if n else (lambda ts, dim=0: ts[0][..., :0])
    if cw is not None and cls:
        classes = cat(cls, 1)
    return (cat(losses) if losses else None, cat(lses) if lses else lse, meta, cat(dxs) if dxs else None, dw, db,
            classes)


def _mean_divisor(valid, classes, dtype):
    """The mean's divisor: the valid rows, or (class weights) their targets' weights; 0 counts as 1."""
    if classes is None:
        return valid.sum().clamp(min=1).to(dtype)
    total = torch.where(valid, classes[0], 0.0).sum()
    return torch.where(total == 0, 1.0, total)


def _lce_grads(x, weight, bias, dx, dw, db, o, needs):
    """The gradients in their tensors' dtypes: dx all-reduced (when o.reduce_dx), dw and db
    this rank's rows (a float32 master weight's dW in float32; db rounded once to x's dtype)."""
    if needs[0]:
        dx = dx.to(x.dtype)
        if o.reduce_dx:
            dx = funcol.all_reduce(dx, "sum", group=o.group)
    dw = dw.to(weight.dtype) if needs[1] else None
    db = db.to(x.dtype).to(bias.dtype) if needs[2] else None
    return dx if needs[0] else None, dw, db


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, targets, o):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        acc = _acc_dtype(x.dtype)
        valid = _valid_rows(targets, o.ignore_index)
        eager_grad = o.reduction != "none" and any(needs)
        weighted_mean = o.class_weight is not None and o.reduction == "mean"  # its divisor is known after the pass
        scale = _row_scale(valid, "sum" if weighted_mean else o.reduction, acc) if eager_grad else None
        row_loss, lse, meta, dx, dw, db, classes = _lce_pass(x, weight, bias, targets, o, needs, scale)
        divisor = _mean_divisor(valid, classes, acc)
        ctx.o, ctx.needs = o, needs
        if eager_grad:
            if weighted_mean:
                dx, dw, db = (None if g is None else g / divisor for g in (dx, dw, db))
            ctx.save_for_backward(*(g if g is not None else x.new_empty(0)
                                    for g in _lce_grads(x, weight, bias, dx, dw, db, o, needs)))
        else:
            ctx.meta = meta
            ctx.save_for_backward(x, weight, bias, targets, lse, classes)
        return reference.reduce_row_losses(row_loss, o.reduction, divisor)

    @staticmethod
    @_first_order("linear_cross_entropy")
    def backward(ctx, grad_loss):
        o, needs = ctx.o, ctx.needs
        if o.reduction != "none":  # the saved gradients scaled, in place unless the graph is kept for another backward
            in_place = not _graph_kept()
            grads = tuple((g.mul_(grad_loss.to(g.dtype)) if in_place else g * grad_loss.to(g.dtype)) if need else None
                          for g, need in zip(ctx.saved_tensors, needs))
        else:
            x, weight, bias, targets, lse, classes = ctx.saved_tensors
            scale = _row_scale(_valid_rows(targets, o.ignore_index), "none", lse.dtype, grad_loss.reshape(-1))
            dx, dw, db = _lce_pass(x, weight, bias, targets, o, needs, scale, lse, ctx.meta, classes)[3:6]
            grads = _lce_grads(x, weight, bias, dx, dw, db, o, needs)
        return grads + (None, None)


def _local_shards(weight, bias, process_group):
    """(weight, bias, group, vocabulary size or None): a DTensor weight (and bias) sharded on
    dim 0 over a 1-D mesh gives its local rows, its mesh's group and its global size."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(weight, DTensor):
        if isinstance(bias, DTensor):
            raise ValueError("bias is a DTensor but weight is not: give both as DTensors or neither")
        return weight, bias, process_group, None
    if weight.device_mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise ValueError(f"a DTensor weight must be sharded on dim 0 over a 1-D mesh (placements (Shard(0),)), "
                         f"got mesh {weight.device_mesh} placements {weight.placements}")
    group = weight.device_mesh.get_group()
    if process_group is not None and process_group is not group:
        raise ValueError("process_group differs from the group of the DTensor weight's mesh: pass one or neither")
    if bias is not None:
        if not isinstance(bias, DTensor) or bias.device_mesh != weight.device_mesh or \
                tuple(bias.placements) != (Shard(0),):
            raise ValueError("bias must be a DTensor sharded like weight (Shard(0) on the same mesh)")
        bias = bias.to_local()
    return weight.to_local(), bias, group, weight.shape[0]


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, ignore_index: Optional[int] = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: Optional[float] = None, *, class_weight: Optional[torch.Tensor] = None,
                         process_group=None, reduce_dx: bool = True, vocab_size: Optional[int] = None,
                         chunk: Optional[int] = None) -> torch.Tensor:
    """The LM head of gpuad.torch.linear_cross_entropy with its vocabulary split over
    process_group: x [..., D] the same on every rank, weight [V_r, D] and bias [V_r] this
    rank's rows (or DTensors sharded on dim 0 over a 1-D mesh, whose group is then used),
    targets x.shape[:-1] of global class ids, the same on every rank. At most `chunk` rows of
    [chunk, V_r] logits exist at a time. The loss is the single-process loss over the whole
    vocabulary, on every rank; dW and db are this rank's rows; dx is the full dx on every
    rank, or this rank's partial sum with reduce_dx=False (for the caller's reduce-scatter).
    vocab_size, when given, is checked against the sum of the slices. class_weight, when
    given, is this rank's slice [V_r] of the class weights (a DTensor sharded like weight gives
    its local rows); "mean" then divides by the sum of the valid targets' class weights."""
    if type(class_weight).__name__ == "DTensor":
        class_weight = class_weight.to_local()
    weight, bias, group, dt_vocab = _local_shards(weight, bias, process_group)
    if group is None:
        raise ValueError("process_group is None and weight is not a sharded DTensor: nothing to split over")
    _check_group(group)
    if vocab_size is not None and dt_vocab is not None and vocab_size != dt_vocab:
        raise ValueError(f"vocab_size {vocab_size} differs from the DTensor weight's {dt_vocab} rows")
    x = _compute_input(x, weight, "D", "V_r")
    if tuple(targets.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"targets must have x's shape without its last axis, {tuple(x.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    _check_weight(x, weight, bias)
    if targets.device != x.device:
        raise ValueError(f"targets is on {targets.device}, x on {x.device}: they must share one device")
    ignore_index = checks.ignore_index_arg(ignore_index)
    x2, t2 = x.reshape(targets.numel(), x.shape[-1]), targets.reshape(-1)  # D = 0 allowed
    checks.check_integer_targets(t2)
    checks.check_lce_options(reduction, label_smoothing, z_loss, softcap)
    checks.check_class_weight(class_weight, weight.shape[0], z_loss)
    if class_weight is not None and class_weight.device != x.device:
        raise ValueError(f"class_weight is on {class_weight.device}, x on {x.device}: they must share one device")
    checks.check_chunk(chunk)
    o = _Opts(ignore_index, reduction, float(label_smoothing), float(z_loss),
              None if softcap is None else float(softcap), group, dt_vocab or vocab_size, bool(reduce_dx), chunk,
              class_weight)
    if _needs_grad(x, weight, bias):
        loss = _LinearCrossEntropyFunction.apply(x2, weight, bias, t2, o)
    else:
        out = _lce_pass(x2, weight, bias, t2, o, (False, False, False))
        row_loss, classes = out[0], out[6]
        divisor = _mean_divisor(_valid_rows(t2, ignore_index), classes, row_loss.dtype)
        loss = reference.reduce_row_losses(row_loss, reduction, divisor)
    return _loss_out(loss.reshape(targets.shape) if reduction == "none" else loss, x)


# --- the module: gpuad.torch.LinearCrossEntropy(D, V, process_group=pg) --------------------
def local_rows(vocab_size: int, process_group) -> int:
    """How many of the vocabulary's rows this rank holds (:func:`vocab_slice`)."""
    _check_group(process_group)
    start, stop = vocab_slice(vocab_size, process_group)
    return stop - start


def head_loss(head, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The forward of a LinearCrossEntropy built with a process_group: its rows' loss, with
    the slices checked to add up to head.num_classes."""
    return linear_cross_entropy(x, head.weight, targets, head.bias, head.ignore_index, head.reduction,
                                head.label_smoothing, head.z_loss, head.softcap, class_weight=head.class_weight,
                                process_group=head.process_group, vocab_size=head.num_classes)


def shard_head(head, process_group):
    """A LinearCrossEntropy with head's options holding this rank's rows of head's weight
    and bias (copies): the vocabulary-parallel twin of a single-process head, so that N
    processes that build the same full head (same seed) start where one process starts. It
    draws no random numbers (the twin is built on the meta device, then given the rows)."""
    from gpuad.torch import LinearCrossEntropy

    twin = LinearCrossEntropy(head.in_features, head.num_classes, head.bias is not None, head.ignore_index,
                              head.reduction, head.label_smoothing, head.z_loss, head.softcap, device="meta",
                              dtype=head.weight.dtype, process_group=process_group)
    if head.class_weight is not None:  # a buffer: this rank's rows (a module built on meta holds none)
        twin.class_weight = shard_rows(head.class_weight, process_group)
    twin.weight = torch.nn.Parameter(shard_rows(head.weight, process_group), head.weight.requires_grad)
    if head.bias is not None:
        twin.bias = torch.nn.Parameter(shard_rows(head.bias, process_group), head.bias.requires_grad)
    return twin
