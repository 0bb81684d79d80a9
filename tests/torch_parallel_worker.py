"""One rank of the vocabulary-parallel tests in test_torch_parallel.py (gloo, CPU).

    python tests/torch_parallel_worker.py RANK WORLD_SIZE STORE_FILE OUT_FILE [SECTION ...]

(gloo; NCCL with one GPU per rank when GPUAD_TEST_BACKEND=nccl.)
Every rank builds the same full inputs from fixed seeds, runs the vocabulary-parallel ops on
its slice and the single-process ops (gpuad.torch and F.cross_entropy on the gathered
logits) on the whole, and saves to OUT_FILE (torch.save) a dict: "diffs", a list of (case,
what, |difference|, tolerance); "errors", a list of (case, raised message or None); and
"failed", a section's traceback when one broke. The test asserts on them.
"""
import itertools
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

import gpuad.torch as gt
from gpuad import torch_parallel as tp

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


class Recorder:
    def __init__(self):
        self.diffs, self.errors, self.failed = [], [], {}

    def close(self, case, what, got, want, tol):
        got, want = torch.as_tensor(got).detach().double(), torch.as_tensor(want).detach().double()
        if got.shape != want.shape:
            self.diffs.append((case, what + f" shape {tuple(got.shape)} vs {tuple(want.shape)}", float("inf"), tol))
            return
        d = (got - want).abs().max().item() if got.numel() else 0.0
        self.diffs.append((case, what, d, tol * max(1.0, want.abs().max().item() if want.numel() else 1.0)))


def splits(world, kind):
    """Slice sizes: even, or uneven with (for 3 ranks) an empty slice."""
    if kind == "even":
        return [4] * world
    return {1: [5], 2: [3, 8], 3: [5, 0, 4]}[world]


def bounds(sizes, rank):
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def make_targets(g, n, v, pattern, ignore_index):
    t = torch.randint(0, v, (n,), generator=g)
    if pattern == "some" and ignore_index is not None:
        t[::3] = ignore_index
    elif pattern == "all":
        t[:] = ignore_index
    return t


def gather_cols(local, sizes, group):
    """The full [B, V] from every rank's [B, V_r] (padded to one width for all_gather)."""
    width = max(sizes)
    pad = torch.zeros(local.shape[0], width, dtype=local.dtype)
    pad[:, :local.shape[1]] = local
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad, group=group)
    return torch.cat([p[:, :s] for p, s in zip(parts, sizes)], 1)


def options():
    """(dtype, split, ignore_index, target pattern, reduction)."""
    ignores = [(-100, "some"), (-100, "all"), (None, "none"), (2, "some")]
    return itertools.product((torch.float64, torch.float32), ("even", "uneven"), ignores, ("mean", "sum", "none"))


def ce_cases(rec, group, rank, world):
    g = torch.Generator().manual_seed(1)
    for i, (dtype, split, (ignore, pattern), reduction) in enumerate(options()):
        sizes = splits(world, split)
        v, (a, b) = sum(sizes), bounds(sizes, rank)
        for eps in (0.0, 0.1):
            case = f"ce {dtype} {split} ignore={ignore}/{pattern} {reduction} eps={eps}"
            logits = torch.randn(7, v, generator=g, dtype=dtype) * 3
            t = make_targets(g, 7, v, pattern, ignore)
            cot = torch.randn(7 if reduction == "none" else (), generator=g, dtype=dtype)
            local = logits[:, a:b].clone().requires_grad_()
            loss = gt.cross_entropy(local, t, ignore_index=ignore, reduction=reduction, label_smoothing=eps,
                                   process_group=group)
            (loss * cot).sum().backward()
            full = logits.clone().requires_grad_()
            ref = gt.cross_entropy(full, t, ignore_index=-100 if ignore is None else ignore, reduction=reduction,
                                  label_smoothing=eps)
            (ref * cot).sum().backward()
            rec.close(case, "loss", loss, ref, TOL[dtype])
            rec.close(case, "dlogits", local.grad, full.grad[:, a:b], TOL[dtype])
            gathered = gather_cols(local.detach(), sizes, group)
            rec.close(case, "gathered logits", gathered, logits, 0.0)
            if not (pattern == "all" and reduction == "mean"):  # torch gives NaN there, gpuad 0
                want = F.cross_entropy(gathered, t, ignore_index=-100 if ignore is None else ignore,
                                       reduction=reduction, label_smoothing=eps)
                rec.close(case, "loss vs F.cross_entropy", loss, want, TOL[dtype])


HEADS = [{}, {"label_smoothing": 0.1}, {"z_loss": 1e-2, "softcap": 3.0, "label_smoothing": 0.05}, {"softcap": 2.0},
         {"class_weight": True, "label_smoothing": 0.1}]


def nan_in_ignored_row(rec, group, rank, world):
    """An ignored row's loss and gradient are 0 whatever its logits (NaN included)."""
    v = 3 * world
    a, b = tp.vocab_slice(v, group)
    logits = torch.randn(4, v, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    logits[1, 0] = float("nan")
    t = torch.tensor([0, -100, 2, v - 1])
    local = logits[:, a:b].clone().requires_grad_()
    loss = gt.cross_entropy(local, t, process_group=group)
    loss.backward()
    keep = torch.tensor([0, 2, 3])
    full = logits[keep].clone().requires_grad_()
    ref = gt.cross_entropy(full, t[keep])
    ref.backward()
    rec.close("nan ignored", "loss", loss, ref, 1e-12)
    rec.close("nan ignored", "dlogits of the ignored row", local.grad[1], torch.zeros(b - a), 0.0)
    rec.close("nan ignored", "dlogits of the others", local.grad[keep], full.grad[:, a:b], 1e-12)


def lce_cases(rec, group, rank, world):
    g = torch.Generator().manual_seed(2)
    n, d = 7, 5
    for i, (dtype, split, (ignore, pattern), reduction) in enumerate(options()):
        kw = HEADS[i % len(HEADS)] if i % 7 else HEADS[2]
        sizes = splits(world, split)
        v, (a, b) = sum(sizes), bounds(sizes, rank)
        bias, chunk, reduce_dx = (i // 4) % 2 == 0, (None, 3)[i % 3 == 0], i % 5 != 0
        case = f"lce {dtype} {split} ignore={ignore}/{pattern} {reduction} {kw} bias={bias} chunk={chunk}"
        x0, w0 = torch.randn(n, d, generator=g, dtype=dtype), torch.randn(v, d, generator=g, dtype=dtype)
        b0 = torch.randn(v, generator=g, dtype=dtype) if bias else None
        t = make_targets(g, n, v, pattern, ignore)
        cot = torch.randn(n if reduction == "none" else (), generator=g, dtype=dtype)
        cw = torch.rand(v, generator=g, dtype=dtype) * (torch.rand(v, generator=g) < 0.8) if "class_weight" in kw \
            else None  # some classes weigh 0
        kw = dict(kw, class_weight=cw) if cw is not None else kw
        x, w = x0.clone().requires_grad_(), w0[a:b].clone().requires_grad_()
        bl = b0[a:b].clone().requires_grad_() if bias else None
        loss = tp.linear_cross_entropy(x, w, t, bl, ignore, reduction, process_group=group, chunk=chunk,
                                       reduce_dx=reduce_dx, **dict(kw, class_weight=None if cw is None else cw[a:b]))
        (loss * cot).sum().backward()
        xf, wf = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        bf = b0.clone().requires_grad_() if bias else None
        ref = gt.linear_cross_entropy(xf, wf, t, bf, -100 if ignore is None else ignore, reduction, **kw)
        (ref * cot).sum().backward()
        tol = TOL[dtype]
        rec.close(case, "loss", loss, ref, tol)
        dx = x.grad if reduce_dx else dist.all_reduce(x.grad, group=group) or x.grad
        rec.close(case, "dx" + ("" if reduce_dx else " (partials summed)"), dx, xf.grad, tol)
        rec.close(case, "dw", w.grad, wf.grad[a:b], tol)
        if bias:
            rec.close(case, "db", bl.grad, bf.grad[a:b], tol)


def master_weight_case(rec, group, rank, world):
    """bf16 x with a float32 weight: dW in float32, close to the single-process op."""
    g = torch.Generator().manual_seed(3)
    v = 4 * world
    a, b = tp.vocab_slice(v, group)
    x0 = torch.randn(9, 6, generator=g).bfloat16()
    w0 = torch.randn(v, 6, generator=g)
    t = torch.randint(0, v, (9,), generator=g)
    x, w = x0.clone().requires_grad_(), w0[a:b].clone().requires_grad_()
    loss = gt.linear_cross_entropy(x, w, t, z_loss=1e-3, process_group=group)
    loss.backward()
    xf, wf = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    ref = gt.linear_cross_entropy(xf, wf, t, z_loss=1e-3)
    ref.backward()
    rec.close("master weight", "loss dtype bf16", float(loss.dtype == torch.bfloat16), 1.0, 0.0)
    rec.close("master weight", "dw dtype fp32", float(w.grad.dtype == torch.float32), 1.0, 0.0)
    rec.close("master weight", "loss", loss.float(), ref.float(), 1e-2)
    rec.close("master weight", "dw", w.grad, wf.grad[a:b], 1e-2)
    rec.close("master weight", "dx", x.grad.float(), xf.grad.float(), 1e-2)


def expect_error(rec, group, case, fn):
    """Run fn, which must raise on this rank; record the message; then one all-reduce shows
    every rank got past the error (none is left waiting in a collective)."""
    try:
        fn()
        msg = None
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        msg = f"{type(e).__name__}: {e}"
    alive = torch.ones(())
    dist.all_reduce(alive, group=group)
    rec.errors.append((case, msg, alive.item()))


def error_cases(rec, group, rank, world):
    from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh

    g = torch.Generator().manual_seed(4)
    v = 4 * world
    a, b = tp.vocab_slice(v, group)
    logits, x, w = torch.randn(6, v, generator=g), torch.randn(6, 3, generator=g), torch.randn(v, 3, generator=g)
    t = torch.randint(0, v, (6,), generator=g)
    outside = t.clone()
    outside[1] = v
    expect_error(rec, group, "target outside", lambda: gt.cross_entropy(logits[:, a:b], outside, process_group=group))
    expect_error(rec, group, "target outside lce",
                 lambda: gt.linear_cross_entropy(x, w[a:b], outside - 2 * v, process_group=group))
    differ = t.clone()
    differ[2] = (differ[2] + rank) % v
    expect_error(rec, group, "targets differ", lambda: gt.cross_entropy(logits[:, a:b], differ, process_group=group))
    expect_error(rec, group, "slices do not add up",
                 lambda: tp.linear_cross_entropy(x, w[a:b], t, process_group=group, vocab_size=v + 1))
    head = gt.LinearCrossEntropy(3, 4 * world + (rank == world - 1), process_group=group)
    expect_error(rec, group, "ranks disagree on V", lambda: head(x, t))
    expect_error(rec, group, "not a group", lambda: gt.cross_entropy(logits[:, a:b], t, process_group="world"))
    expect_error(rec, group, "ignore_index bool",
                 lambda: tp.cross_entropy(logits[:, a:b], t, True, process_group=group))
    mesh = init_device_mesh("cpu", (world,))
    replicated = distribute_tensor(w, mesh, [Replicate()])
    expect_error(rec, group, "replicated DTensor", lambda: gt.linear_cross_entropy(x, replicated, t))

    def double_backward():
        local = logits[:, a:b].clone().requires_grad_()
        (grad,) = torch.autograd.grad(gt.cross_entropy(local, t, process_group=group), local, create_graph=True)
        grad.sum().backward()
    expect_error(rec, group, "double backward", double_backward)


def size_one_group(rec, group, rank, world):
    """A group of one rank is the single-process op."""
    solo = dist.new_group([0])
    if rank != 0:
        return
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 6, (5,), generator=g)
    rec.close("group of one", "loss", gt.linear_cross_entropy(x, w, t, process_group=solo),
              gt.linear_cross_entropy(x, w, t), 1e-12)
    grads = []
    for group in (solo, None):  # a second backward through a retained graph: 1 + 3 times the gradient
        leaf = w.clone().requires_grad_()
        loss = gt.linear_cross_entropy(x, leaf, t, process_group=group)
        loss.backward(retain_graph=True)
        (3 * loss).backward()
        grads.append(leaf.grad)
    rec.close("group of one", "dw after a retained graph's second backward", *grads, 1e-12)


def build_full(v, d, seed):
    torch.manual_seed(seed)
    return (torch.nn.Embedding(v, d, dtype=torch.float64),
            gt.LinearCrossEntropy(d, v, bias=True, label_smoothing=0.1, z_loss=1e-3, dtype=torch.float64))


def train(emb, head, batches, steps_lr=0.5):
    opt = torch.optim.SGD(list(emb.parameters()) + list(head.parameters()), lr=steps_lr)
    losses = []
    for tokens, t in batches:
        opt.zero_grad()
        loss = head(emb(tokens), t)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def token_batches(v, shape, steps, seed):
    """`steps` (tokens, targets) pairs of the given shape, the same in every process."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, v, shape, generator=g), torch.randint(0, v, shape, generator=g)) for _ in range(steps)]


def training(rec, group, rank, world):
    """Four SGD steps of embedding + vocabulary-parallel head match one process."""
    v, d = 3 * world + 2, 6
    batches = token_batches(v, (4, 5), 4, 6)
    emb1, head1 = build_full(v, d, 7)
    want = train(emb1, head1, batches)
    emb, full = build_full(v, d, 7)
    head = tp.shard_head(full, group)
    got = train(emb, head, batches)
    a, b = tp.vocab_slice(v, group)
    rec.close("training", "losses", got, want, 1e-12)
    rec.close("training", "weight rows", head.weight, head1.weight[a:b], 1e-12)
    rec.close("training", "bias rows", head.bias, head1.bias[a:b], 1e-12)
    rec.close("training", "embedding", emb.weight, emb1.weight, 1e-12)
    # class weights: a head holds its rows of them, built by shard_head or by the constructor
    cw = torch.rand(v, dtype=torch.float64, generator=torch.Generator().manual_seed(11)) + 0.1
    head1 = gt.LinearCrossEntropy(d, v, bias=True, label_smoothing=0.1, dtype=torch.float64, class_weight=cw)
    twin = tp.shard_head(head1, group)
    built = gt.LinearCrossEntropy(d, v, dtype=torch.float64, class_weight=cw, process_group=group)
    rec.close("training", "class_weight rows (shard_head)", twin.class_weight, cw[a:b], 0.0)
    rec.close("training", "class_weight rows (constructor)", built.class_weight, cw[a:b], 0.0)
    x = torch.randn(4, 5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    t = torch.randint(0, v, (4, 5), generator=torch.Generator().manual_seed(13))
    rec.close("training", "loss with class_weight", twin(x, t), head1(x, t), 1e-12)
    with torch.no_grad():
        rec.close("training", "loss with class_weight, no grad", twin(x, t), head1(x, t), 1e-12)


def dtensor_weight(rec, group, rank, world):
    """A weight given as a DTensor sharded on dim 0 over a 1-D mesh: its local rows' loss."""
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    emb1, head1 = build_full(4 * world + 1, 5, 8)
    head = gt.LinearCrossEntropy(5, 4 * world + 1, bias=True, label_smoothing=0.1, z_loss=1e-3, dtype=torch.float64)
    head.weight = torch.nn.Parameter(distribute_tensor(head1.weight.detach(), mesh, [Shard(0)]))
    head.bias = torch.nn.Parameter(distribute_tensor(head1.bias.detach(), mesh, [Shard(0)]))
    x = torch.randn(3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    t = torch.randint(0, 4 * world + 1, (3, 4), generator=torch.Generator().manual_seed(10))
    loss = head(x, t)
    loss.backward()
    want = head1(x, t)
    want.backward()
    a, b = tp.vocab_slice(4 * world + 1, group)
    rec.close("dtensor", "loss", loss, want, 1e-12)
    rec.close("dtensor", "dw", head.weight.grad.to_local(), head1.weight.grad[a:b], 1e-12)
    rec.close("dtensor", "db", head.bias.grad.to_local(), head1.bias.grad[a:b], 1e-12)


def compiled(rec, group, rank, world):
    """torch.compile(fullgraph=True) traces the functional collectives: no graph break, the
    same loss, dx and dW ("mean": gradients from the forward; "none": recomputed)."""
    g = torch.Generator().manual_seed(11)
    v = 3 * world + 1
    a, b = tp.vocab_slice(v, group)
    x0, w0 = torch.randn(6, 4, generator=g), torch.randn(v, 4, generator=g)
    t = torch.randint(0, v, (6,), generator=g)
    t[0] = -100
    cot = torch.randn(6, generator=g)
    for reduction in ("mean", "none"):
        def f(x, w):
            loss = gt.linear_cross_entropy(x, w, t, reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                                           softcap=3.0, process_group=group)
            return (loss * cot).sum()
        outs = []
        for fn in (torch.compile(f, fullgraph=True, backend="aot_eager"), f):
            x, w = x0.clone().requires_grad_(), w0[a:b].clone().requires_grad_()
            loss = fn(x, w)
            loss.backward()
            outs.append((loss, x.grad, w.grad))
        for what, c, e in zip(("loss", "dx", "dw"), *outs):
            rec.close(f"compiled {reduction}", what, c, e, 1e-6)


def fsdp2(rec, group, rank, world):
    """FSDP2 (fully_shard) over the "dp" axis of a (2, world / 2) mesh, the head's weight a
    DTensor sharded on the "tp" axis: three SGD steps match one process on the whole batch."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    v, d = 10, 6
    batches = token_batches(v, (4, 3), 3, 12)
    emb1, head1 = build_full(v, d, 13)
    want = train(emb1, head1, batches)
    emb, head = build_full(v, d, 13)
    head.weight = torch.nn.Parameter(distribute_tensor(head.weight.detach(), mesh["tp"], [Shard(0)]))
    head.bias = torch.nn.Parameter(distribute_tensor(head.bias.detach(), mesh["tp"], [Shard(0)]))
    fully_shard(head, mesh=mesh["dp"])
    fully_shard(emb, mesh=mesh["dp"])
    dp = mesh["dp"].get_local_rank()
    mine = [(tokens[2 * dp:2 * dp + 2], t[2 * dp:2 * dp + 2]) for tokens, t in batches]  # this dp rank's half
    got = train(emb, head, mine)
    dist.all_reduce(got, group=mesh["dp"].get_group())
    rec.close("fsdp2", "losses (mean over dp)", got / 2, want, 1e-12)
    rec.close("fsdp2", "head weight", head.weight.full_tensor(), head1.weight, 1e-12)
    rec.close("fsdp2", "head bias", head.bias.full_tensor(), head1.bias, 1e-12)
    rec.close("fsdp2", "embedding", emb.weight.full_tensor(), emb1.weight, 1e-12)


def cuda_head(rec, group, rank, world):
    """On this rank's GPU: the head in float32 and bf16 with a float32 master weight, compiled
    with Inductor too, against the single-process op (the fused Triton kernel); the eager
    forward and backward under torch.cuda.set_sync_debug_mode("error")."""
    g = torch.Generator().manual_seed(14)
    v = 1000 * world + 7
    a, b = tp.vocab_slice(v, group)
    x0, w0 = torch.randn(300, 64, generator=g), torch.randn(v, 64, generator=g) * 0.125
    t = torch.randint(0, v, (300,), generator=g)
    t[::9] = -100
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        def f(x, w, tc):
            return gt.linear_cross_entropy(x, w, tc, label_smoothing=0.1, z_loss=1e-4, softcap=30.0,
                                           process_group=group)
        for name, fn in (("eager", f), ("inductor", torch.compile(f, fullgraph=True))):
            x, w = x0.cuda().to(dtype).requires_grad_(), w0[a:b].cuda().requires_grad_()
            tc = t.cuda()
            torch.cuda.synchronize()
            if name == "eager":
                torch.cuda.set_sync_debug_mode("error")  # no host sync in the forward and backward
            try:
                loss = fn(x, w, tc)
                loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            xf, wf = x0.cuda().to(dtype).requires_grad_(), w0.cuda().requires_grad_()
            ref = gt.linear_cross_entropy(xf, wf, t.cuda(), label_smoothing=0.1, z_loss=1e-4, softcap=30.0)
            ref.backward()
            case = f"cuda {dtype} {name}"
            rec.close(case, "loss", loss.float().cpu(), ref.float().cpu(), tol)
            rec.close(case, "dx", x.grad.float().cpu(), xf.grad.float().cpu(), tol)
            rec.close(case, "dw", w.grad.cpu(), wf.grad[a:b].cpu(), tol)


SECTIONS = {f.__name__: f for f in (ce_cases, nan_in_ignored_row, lce_cases, master_weight_case, error_cases,
                                     size_one_group, training, dtensor_weight, compiled, fsdp2, cuda_head)}


def main(rank, world, store, out, sections):
    backend = os.environ.get("GPUAD_TEST_BACKEND", "gloo")  # "nccl": one GPU per rank
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method="file://" + store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    rec = Recorder()
    try:
        for name in sections:
            try:
                SECTIONS[name](rec, dist.group.WORLD, rank, world)
            except Exception:  # noqa: BLE001 - reported by the test
                rec.failed[name] = traceback.format_exc()
        torch.save({"diffs": rec.diffs, "errors": rec.errors, "failed": rec.failed}, out)
        dist.barrier()  # every rank's collectives are done before any rank tears the group down
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:])
