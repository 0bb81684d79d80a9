"""gpuad.torch's vocabulary-parallel cross-entropy and LM head (gpuad/torch_parallel.py),
across 2 and 3 CPU processes with gloo: every rank of tests/torch_parallel_worker.py runs
many cases in one process group and the tests here read what it recorded."""
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "torch_parallel_worker.py")
TIMEOUT_S = 240

ALL = ["ce_cases", "lce_cases", "master_weight_case", "error_cases", "size_one_group", "training", "dtensor_weight"]


def run_group(tmp_path, world, sections):
    """Run the worker on `world` ranks (a FileStore in tmp_path: no port to pick); every rank's
    record, or a failure with the ranks' output. A rank left waiting is killed at TIMEOUT_S."""
    store, env = tmp_path / "store", dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), str(world), str(store), str(tmp_path / f"out{r}"),
                               *sections], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT_S)[0].decode(errors="replace"))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank of {world} did not finish in {TIMEOUT_S} s (a hang)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} of {world} exited with {p.returncode}:\n{out[-4000:]}"
    return [torch.load(tmp_path / f"out{r}", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3])
def records(request, tmp_path_factory):
    world = request.param
    return world, run_group(tmp_path_factory.mktemp(f"world{world}"), world, ALL)


def _diffs(records, prefix):
    world, recs = records
    out = []
    for r, rec in enumerate(recs):
        assert not rec["failed"], f"rank {r}: {rec['failed']}"
        out += [(r, *d) for d in rec["diffs"] if d[0].startswith(prefix)]
    assert out, f"no case recorded for {prefix!r}"
    return out


def _assert_close(records, prefix):
    bad = [d for d in _diffs(records, prefix) if not d[3] <= d[4]]
    assert not bad, f"{len(bad)} differences above tolerance, e.g. {bad[:5]}"
