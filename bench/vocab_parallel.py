"""The vocabulary-parallel LM head across CPU processes (gloo): time and peak memory per rank.

    python -m bench.vocab_parallel [--nproc 2] [--n 2048] [--d 256] [--v 32000] [--reps 5] [--chunk ROWS]

Run from the repository root. Each implementation runs in a fresh process group of --nproc
ranks (so that a process's peak RSS is its own): loss and dx, dW of this rank's rows for x
[N, D] (the same on every rank), weight [V, D] split by rows over the ranks, targets [N]
(every 17th ignored), float32:

  gpuad          gpuad.torch.linear_cross_entropy(..., process_group=pg): chunks of rows,
                 per-row statistics all-reduced, dx all-reduced
  loss_parallel  torch's DTensor route: F.linear of a Replicate x and a Shard(0) weight gives
                 Shard(1) logits, F.cross_entropy under torch.distributed.tensor.parallel.loss_parallel
  gather         the logits slices all-gathered into [N, V] on every rank, F.cross_entropy,
                 the slice of its gradient back through the local matmul, dx all-reduced

Prints, per implementation, the median time of a forward + backward over --reps calls (after
one warm-up) and the peak resident memory above the process's memory once the inputs exist
(ru_maxrss after the calls less the resident size before them, after a warm-up call on tiny
inputs; the largest over the ranks; glibc told to unmap freed blocks of 1 MiB and more, so
that the resident size follows the live tensors). A loss that differs from the first row's is flagged.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

IMPLS = ("gpuad", "loss_parallel", "gather")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _inputs(n, d, v, rank, world):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * d ** -0.5
    t = torch.randint(0, v, (n,), generator=g)
    t[::17] = -100
    per = -(-v // world)
    return x, w[rank * per:(rank + 1) * per].clone(), t


def _step_gpuad(x, w, t, pg, mesh, chunk):
    from gpuad import torch_parallel

    loss = torch_parallel.linear_cross_entropy(x, w, t, process_group=pg, chunk=chunk)
    loss.backward()
    return loss.detach()


def _step_loss_parallel(x, w, t, pg, mesh, chunk):
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import loss_parallel

    xd = DTensor.from_local(x, mesh, [Replicate()])
    wd = DTensor.from_local(w, mesh, [Shard(0)])
    with loss_parallel():
        loss = F.cross_entropy(F.linear(xd, wd), DTensor.from_local(t, mesh, [Replicate()]))
        loss.backward()
    return loss.detach().full_tensor()


def _step_gather(x, w, t, pg, mesh, chunk):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    local = x @ w.T
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(pg))]
    dist.all_gather(parts, local.detach(), group=pg)
    full = torch.cat(parts, 1).requires_grad_()
    loss = F.cross_entropy(full, t)
    loss.backward()
    rank, v_r = dist.get_rank(pg), local.shape[1]
    local.backward(full.grad[:, rank * v_r:(rank + 1) * v_r])
    dist.all_reduce(x.grad, group=pg)
    return loss.detach()


def worker(rank, world, store, impl, n, d, v, reps, chunk, out):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        pg = dist.group.WORLD
        step = globals()["_step_" + impl]
        tx, tw, tt = _inputs(8, 4, 4 * world, rank, world)  # imports and first collectives out of the peak
        step(tx.requires_grad_(), tw.requires_grad_(), tt, pg, mesh, chunk)
        x, w, t = _inputs(n, d, v, rank, world)
        base = _rss_bytes()
        times = []
        for _ in range(reps + 1):
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            dist.barrier()
            t0 = time.perf_counter()
            loss = step(xr, wr, t, pg, mesh, chunk)
            times.append(time.perf_counter() - t0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        with open(out, "w") as f:
            f.write(f"{statistics.median(times[1:])} {peak} {loss.item()}\n")
    finally:
        dist.destroy_process_group()


def run(impl, args, tmp):
    # glibc returns blocks of 1 MiB and more to the system when freed (no dynamic threshold):
    # the resident size then follows the live tensors instead of the heap's high-water mark
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    procs = [subprocess.Popen([sys.executable, "-m", "bench.vocab_parallel", "--worker", str(r), impl,
                               os.path.join(tmp, f"{impl}.store"), os.path.join(tmp, f"{impl}.{r}"),
                               *map(str, (args.nproc, args.n, args.d, args.v, args.reps, args.chunk or 0))], env=env)
             for r in range(args.nproc)]
    for p in procs:
        if p.wait(timeout=600) != 0:
            raise SystemExit(f"{impl}: a rank exited with {p.returncode}")
    rows = []
    for r in range(args.nproc):
        with open(os.path.join(tmp, f"{impl}.{r}")) as f:
            rows.append([float(s) for s in f.read().split()])
    return max(r[0] for r in rows), max(r[1] for r in rows), rows[0][2]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        rank, impl, store, out, world, n, d, v, reps, chunk = argv[1:]
        worker(int(rank), int(world), store, impl, int(n), int(d), int(v), int(reps), int(chunk) or None, out)
        return
    ap = argparse.ArgumentParser(prog="python -m bench.vocab_parallel", description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=None, help="gpuad's rows per chunk (default: its own choice)")
    ap.add_argument("--impls", default=",".join(IMPLS))
    args = ap.parse_args(argv)
    if args.v % args.nproc:
        ap.error("--v must be a multiple of --nproc (loss_parallel's DTensor is built from even slices)")
    print(f"N={args.n} D={args.d} V={args.v} float32, {args.nproc} CPU processes (gloo), 1 thread each")
    print(f"{'impl':<14} {'ms / fwd+bwd':>13} {'peak MiB / rank':>16} {'loss':>10}")
    first = None
    with tempfile.TemporaryDirectory() as tmp:
        for impl in args.impls.split(","):
            sec, peak, loss = run(impl, args, tmp)
            first = loss if first is None else first
            agree = "" if abs(loss - first) <= 1e-4 * max(1.0, abs(first)) else "  LOSS DIFFERS from the first row"
            print(f"{impl:<14} {sec * 1e3:13.1f} {peak / 2 ** 20:16.1f} {loss:10.6f}{agree}", flush=True)


if __name__ == "__main__":
    main()
