"""gpuad.torch's vocabulary-parallel cross-entropy and LM head (gpuad/torch_parallel.py),
across 2 and 3 CPU processes with gloo: every rank of tests/torch_parallel_worker.py runs
many cases in one process group and the tests here read what it recorded."""
import os
import re
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "torch_parallel_worker.py")
TIMEOUT_S = 240

SECTIONS = ["ce_cases", "nan_in_ignored_row", "lce_cases", "master_weight_case", "error_cases", "size_one_group",
            "training", "dtensor_weight"]
COMPILED_WORLD = 2  # the torch.compile section (about 10 s of tracing) runs in one group size only
FSDP_WORLD = 4  # FSDP2 over a (dp 2, tp 2) mesh, in a group of its own


def sections_of(world):
    if world == FSDP_WORLD:
        return ["fsdp2"]
    return SECTIONS + (["compiled"] if world == COMPILED_WORLD else [])


def run_groups(tmp_path, worlds, backend="gloo"):
    """Run the worker in one process group of each size in `worlds`, all at once (a FileStore
    per group in tmp_path: no port to pick). {world: every rank's record}, or a failure with
    the ranks' output. A rank still running at TIMEOUT_S (a hang) is killed."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", GPUAD_TEST_BACKEND=backend)
    procs = {}  # (world, rank) -> (record file, log file, process); logs in files: no pipe to fill up
    for world in worlds:
        sections = sections_of(world) if backend == "gloo" else ["cuda_head"]
        for r in range(world):
            out, log = tmp_path / f"world{world}-rank{r}", tmp_path / f"world{world}-rank{r}.log"
            with open(log, "wb") as f:
                procs[world, r] = (out, log, subprocess.Popen(
                    [sys.executable, WORKER, str(r), str(world), str(tmp_path / f"store{world}"), str(out), *sections],
                    cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
    try:
        for _, _, p in procs.values():
            p.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank did not finish in {TIMEOUT_S} s (a hang)")
    finally:
        for _, _, p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for (world, r), (_, log, p) in procs.items():
        assert p.returncode == 0, f"rank {r} of {world} exited with {p.returncode}:\n{log.read_text()[-4000:]}"
    return {world: [torch.load(procs[world, r][0], weights_only=False) for r in range(world)] for world in worlds}


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    return run_groups(tmp_path_factory.mktemp("groups"), (2, 3, FSDP_WORLD))


def _diffs(groups, prefix, worlds=(2, 3)):
    """(world, rank, case, what, |difference|, tolerance) of the cases whose name starts with
    prefix, from the groups of the given sizes (each must have some)."""
    out = []
    for world in worlds:
        found = []
        for r, rec in enumerate(groups[world]):
            assert not rec["failed"], f"rank {r} of {world}: {rec['failed']}"
            found += [(world, r, *d) for d in rec["diffs"] if d[0].startswith(prefix)]
        assert found, f"no case recorded for {prefix!r} in the {world}-rank group"
        out += found
    return out


def _assert_close(groups, prefix, worlds=(2, 3)):
    bad = [d for d in _diffs(groups, prefix, worlds) if not d[4] <= d[5]]
    assert not bad, f"{len(bad)} differences above tolerance, e.g. {bad[:5]}"


def test_cross_entropy_matches_one_process(groups):
    """Loss and dlogits slices equal gpuad's single-process op (float64 within 1e-12) and
    F.cross_entropy of the gathered logits: even and uneven (an empty) slices, float64 and
    float32, ignore_index -100 / None / a class id, some and all rows ignored, mean / sum /
    none, label smoothing."""
    _assert_close(groups, "ce ")
    assert len(_diffs(groups, "ce ")) >= (2 + 3) * 96 * 3


def test_ignored_row_with_nan_logits(groups):
    """An ignored row's loss and gradient are 0 even when its logits hold a NaN."""
    _assert_close(groups, "nan ignored")


def test_lm_head_matches_one_process(groups):
    """Loss, dx (all-reduced, or partial with reduce_dx=False), dW and db rows equal the
    single-process fused head: bias, z-loss, softcap, label smoothing, class weights (each rank
    its slice), several chunks."""
    _assert_close(groups, "lce ")
    whats = {d[3] for d in _diffs(groups, "lce ")}
    assert {"loss", "dx", "dx (partials summed)", "dw", "db"} <= whats
    cases = {d[2] for d in _diffs(groups, "lce ")}
    for option in ("'softcap'", "'z_loss'", "'label_smoothing'", "'class_weight'", "chunk=3", "chunk=None",
                   "bias=True", "bias=False", "'none'", "/all", "ignore=None", "uneven"):
        assert any(option in c or option.strip("'") in c for c in cases), option


def test_master_weight_dw_in_float32(groups):
    """bf16 x with a float32 weight: bf16 loss, float32 dW close to the single-process op."""
    _assert_close(groups, "master weight")


def test_training_steps_match_one_process(groups):
    """Four SGD steps of an embedding and LinearCrossEntropy(D, V, process_group=pg) built by
    shard_head from the same seed: the losses and parameters of one process, within 1e-12; a
    head with class weights holds its rows of them and gives the one-process loss."""
    _assert_close(groups, "training")
    assert any("class_weight" in d[3] for d in _diffs(groups, "training"))


def test_dtensor_weight(groups):
    """A weight and bias given as DTensors sharded on dim 0 of a 1-D mesh: loss and grads."""
    _assert_close(groups, "dtensor")


def test_group_of_one_is_the_single_process_op(groups):
    """A group of one rank is accepted and gives the single-process loss."""
    _assert_close(groups, "group of one")


def test_compile_fullgraph(groups):
    """torch.compile(fullgraph=True) traces the functional collectives: the same loss, dx, dW."""
    _assert_close(groups, "compiled", (COMPILED_WORLD,))


def test_fsdp2_on_a_2d_mesh(groups):
    """fully_shard over the data-parallel axis, the head vocabulary-parallel over the other:
    the losses and parameters of one process, within 1e-12 (gloo, CPU)."""
    _assert_close(groups, "fsdp2", (FSDP_WORLD,))


EXPECTED_ERRORS = {
    "target outside": "a target is outside [0, V) of the whole vocabulary",
    "target outside lce": "a target is outside [0, V) of the whole vocabulary",
    "targets differ": "targets differ between the ranks",
    "slices do not add up": "slices do not add up to the vocabulary size",
    "ranks disagree on V": "the ranks disagree on the vocabulary size",
    "not a group": "process_group must be a torch.distributed.ProcessGroup",
    "ignore_index bool": "ignore_index must be an integer or None",
    "replicated DTensor": "must be sharded on dim 0 over a 1-D mesh",
    "double backward": "gpuad.torch.cross_entropy (vocabulary-parallel) has no double backward",
}


def test_bad_input_fails_on_every_rank(groups):
    """Each bad input raises its error on every rank, and every rank then reaches the next
    collective (none is left waiting)."""
    for world, r, rec in ((w, r, rec) for w in (2, 3) for r, rec in enumerate(groups[w])):
        got = {case: (msg, alive) for case, msg, alive in rec["errors"]}
        assert set(got) == set(EXPECTED_ERRORS), f"rank {r}: {sorted(got)}"
        for case, text in EXPECTED_ERRORS.items():
            msg, alive = got[case]
            assert msg is not None and text in msg, f"rank {r}, {case}: {msg}"
            assert alive == world, f"rank {r}, {case}: {alive} of {world} ranks reached the next all-reduce"


@pytest.mark.gpu
def test_nccl_on_two_gpus(tmp_path):
    """NCCL, one GPU per rank: float32 and bf16 (float32 master weight), eager and Inductor,
    against the single-process fused kernel."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    groups = run_groups(tmp_path, (2,), backend="nccl")
    _assert_close(groups, "cuda ", (2,))


def test_process_group_without_init_process_group():
    """A process_group given while torch.distributed is not initialised: a clear error."""
    if torch.distributed.is_initialized():
        pytest.skip("this process has a default group")
    import gpuad.torch as gt

    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        gt.cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), process_group=object())
    with pytest.raises(ValueError, match="process_group is None and weight is not a sharded DTensor"):
        from gpuad import torch_parallel
        torch_parallel.linear_cross_entropy(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.int64))


#: One rank: a gpuad collective (its first functional collective imports torch._dynamo), then
#: destroy_process_group with nothing else holding the group; prints the process's threads
#: just before and just after it.
DESTROY_SCRIPT = """
import os, sys
import torch
import torch.distributed as dist
import gpuad.torch as gt

def threads():
    return len(os.listdir("/proc/self/task"))

def step():
    x = torch.randn(4, 10, requires_grad=True)
    gt.cross_entropy(x, torch.randint(0, 10, (4,)), process_group=dist.group.WORLD).backward()

dist.init_process_group("gloo", store=dist.FileStore(sys.argv[1], 1), rank=0, world_size=1)
step()
assert "torch._dynamo" in sys.modules
before = threads()
dist.destroy_process_group()
print("threads", before, threads())
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc/self/task (Linux)")
def test_destroy_process_group_ends_the_group_after_gpuad_collectives(tmp_path):
    """destroy_process_group frees the group, joining gloo's threads while Python runs: nothing
    (torch.distributed.nn.functional's default arguments among them, imported by gpuad.torch
    before the group exists) keeps it alive into interpreter shutdown, where a gloo thread can
    abort the process."""
    run = subprocess.run([sys.executable, "-c", DESTROY_SCRIPT, str(tmp_path / "store")], cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    before, after = map(int, re.search(r"threads (\d+) (\d+)", run.stdout).groups())
    assert after < before, f"gloo's threads still run after destroy_process_group: {before} -> {after}"


def test_docs_torchrun_example(tmp_path):
    """docs/vocab-parallel.md's snippet, exactly as written, under torchrun with 2 ranks: both
    print the loss one process gets with the full head (the same seed, data and steps)."""
    with open(os.path.join(ROOT, "docs", "vocab-parallel.md"), encoding="utf-8") as f:
        section = f.read().split("## A torchrun example", 1)[1]
    script = tmp_path / "vp_head.py"
    script.write_text(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    logs = tmp_path / "logs"  # each rank's stdout in a file of its own: no interleaved lines
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "--log-dir", str(logs), "--redirects", "1", str(script)], cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"), capture_output=True,
                         text=True, timeout=TIMEOUT_S)
    stdout = "".join(sorted(p.read_text() for p in logs.rglob("stdout.log")))
    printed = re.findall(r"rank (\d): rows \((\d+), 64\) loss (\S+)", stdout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    got = {rank: loss for rank, _, loss in printed}
    assert sorted(got) == ["0", "1"] and [rows for _, rows, _ in printed] == ["500", "500"], stdout
    import gpuad.torch as gt

    torch.manual_seed(0)
    head = gt.LinearCrossEntropy(64, 1000, bias=True, label_smoothing=0.1)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    x, targets = torch.randn(4, 8, 64), torch.randint(0, 1000, (4, 8))
    for _ in range(3):
        loss = head(x, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for rank, value in got.items():
        assert abs(float(value) - loss.item()) <= 1e-5, (rank, value, loss.item())
