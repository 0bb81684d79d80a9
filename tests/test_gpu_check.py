"""`bash bench/gpu_check.sh --dry-run OUTDIR` on the CPU: every step runs its plumbing and leaves
its log, JUnit XML and JSON in OUTDIR, and the summary prints last.

.ci/run runs the dry run once before pytest and names its folder in GPU_CHECK_DRY_RUN_DIR (with
the script's output in gpu_check.out and its exit status in gpu_check.rc); this test then reads
that folder instead of running the script a second time."""
import json
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("install", "kernel tests", "benchmark", "sweep", "engine tests")
FILES = ("pip.log", "pytest-kernels.log", "junit-kernels.xml", "bench.log", "meta.json", "results.jsonl",
         "results.json", "table.txt", "sweep.log", "sweep.jsonl", "sweep.txt", "pytest-engine.log",
         "junit-engine.xml", "steps.txt")


def run_dry(out: Path):
    """Run the dry run into `out`, keeping its output and exit status beside its files."""
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(out)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    (out / "gpu_check.out").write_text(proc.stdout)
    (out / "gpu_check.rc").write_text(str(proc.returncode))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    given = os.environ.get("GPU_CHECK_DRY_RUN_DIR")
    if given:
        out = Path(given)
    else:
        out = tmp_path_factory.mktemp("gpu-check-dry")
        run_dry(out)
    return out, (out / "gpu_check.out").read_text(), int((out / "gpu_check.rc").read_text())


def test_dry_run_passes_and_prints_the_summary_last(dry_run):
    out, text, rc = dry_run
    assert rc == 0, text[-4000:]
    summary = text[text.index("================ table, then summary"):]
    for part in ("install: ok", "op  ", "tests (per file):", "targets (", "sweep:", "steps:"):
        assert part in summary, part
    for step in STEPS:
        assert f"  {step}: rc 0," in summary


def test_dry_run_leaves_every_file(dry_run):
    out, text, _ = dry_run
    missing = [f for f in FILES if not (out / f).is_file()]
    assert not missing, (missing, text[-3000:])
    steps = (out / "steps.txt").read_text().splitlines()
    assert [line.split(":")[0].strip() for line in steps] == list(STEPS)
    for name in ("junit-kernels.xml", "junit-engine.xml"):
        root = ET.parse(out / name).getroot()
        assert len(list(root.iter("testcase"))) > 0, name
    lines = (out / "results.jsonl").read_text().splitlines()
    records = json.loads((out / "results.json").read_text())["records"]
    assert lines and len(lines) == len(records)
    assert any(r["status"] == "OK" for r in records)
    assert json.loads((out / "meta.json").read_text())["preset"] == "tiny"
    assert (out / "table.txt").read_text().count("\n") > 3
    assert (out / "sweep.txt").read_text().strip()
