"""One rank of the two-process DistributedDataParallel test in test_torch_custom_ops.py (gloo, CPU).

Run by the test with RANK and WORLD_SIZE set, as torchrun would:
    python tests/torch_ddp_worker.py OUT_FILE RENDEZVOUS_FILE
Each rank trains the model of `build_model` on its shard of every batch of `batches` with
gpuad's ops and saves its losses, its all-reduced gradients after every step and its final
parameters to OUT_FILE (torch.save). The test reruns the same steps in one process.

Teardown, which aborted a run once ("terminate called without an active exception", one rank
killed by SIGABRT): the ranks meet in a file (a FileStore), not on a TCP port that rank 0 would
serve, so no port can be taken between the test choosing it and rank 0 binding it, and neither
rank depends on a store server living in the other; both ranks pass a barrier before either
tears down, so neither closes its gloo connections while the other still uses them; and the
DDP module (whose reducer holds the process group) is released before destroy_process_group,
so the group's threads are joined there, on the main thread of a live interpreter, not at exit.
"""
import gc
import os
import sys

import torch

import gpuad.torch as gt

STEPS, LR = 3, 0.1


def build_model() -> torch.nn.Module:
    torch.manual_seed(5)
    return torch.nn.Sequential(gt.Linear(6, 16), torch.nn.Tanh(), gt.Linear(16, 5))


def batches(world_size: int):
    """STEPS batches of 8 rows a rank, some targets ignored, the same in every process."""
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(STEPS):
        x = torch.randn(8 * world_size, 6, generator=g)
        t = torch.randint(0, 5, (8 * world_size,), generator=g)
        t[torch.randperm(8 * world_size, generator=g)[:5]] = -100
        out.append((x, t))
    return out


def shard(batch, rank: int, world_size: int):
    x, t = batch
    return x[rank::world_size], t[rank::world_size]


def main(out_file: str, rendezvous_file: str):
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous_file}", rank=rank,
                                         world_size=world_size)
    try:
        model = torch.nn.parallel.DistributedDataParallel(build_model())
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        losses, grads = [], []
        for batch in batches(world_size):
            x, t = shard(batch, rank, world_size)
            loss = gt.cross_entropy(model(x), t)
            opt.zero_grad()
            loss.backward()  # DDP averages the gradients over the ranks here
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
            losses.append(loss.detach())
        params = [p.detach().clone() for p in model.parameters()]
        torch.save({"losses": losses, "grads": grads, "params": params}, out_file)
        del model, opt, loss
        gc.collect()
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
