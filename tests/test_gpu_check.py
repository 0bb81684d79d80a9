"""`bash bench/gpu_check.sh --dry-run OUTDIR` on the CPU: every step runs its plumbing and leaves
its log, JUnit XML and JSON in OUTDIR, and the summary prints last.

.ci/run runs the dry run once before pytest and names its folder in GPU_CHECK_DRY_RUN_DIR (with
the script's output in gpu_check.out and its exit status in gpu_check.rc); this test then reads
that folder instead of running the script a second time."""
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is a top-level folder of the repository, not installed
STEPS = ("install", "kernel tests", "sweep", "benchmark", "engine tests")
FILES = ("pip.log", "pytest-kernels.log", "junit-kernels.xml", "tests-kernels.jsonl", "bench.log", "meta.json",
         "results.jsonl", "results.json", "table.txt", "sweep.log", "sweep.jsonl", "sweep.txt", "pytest-engine.log",
         "junit-engine.xml", "tests-engine.jsonl", "steps.txt")


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


def test_dry_run_sweeps_before_the_benchmark_which_reads_its_table(dry_run):
    out, text, _ = dry_run
    assert text.index("== 3 python -m bench --sweep") < text.index("== 4 python -m bench")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tuned_dir"] == str(out / "tuned")
    assert list((out / "tuned").glob("*.json"))  # the table the sweep wrote there
    # a line a test, as each started and ended: as many test ids as the JUnit XML has test cases
    for step in ("kernels", "engine"):
        lines = [json.loads(line) for line in (out / f"tests-{step}.jsonl").read_text().splitlines()]
        cases = list(ET.parse(out / f"junit-{step}.xml").getroot().iter("testcase"))
        assert len({r["nodeid"] for r in lines}) == len(cases) > 0
        assert {r["outcome"] for r in lines} <= {"started", "passed", "failed", "skipped"}


def test_plan_prints_both_commands_and_fails_over_nine_minutes():
    ok = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--plan"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for part in ("bash bench/gpu_check.sh OUT", "bash bench/gpu_check.sh --bench-only OUT2", "sweep", "benchmark",
                 "triton.softmax_cross_entropy:", "cupy.softmax_cross_entropy:", "triton.linear_backward:"):
        assert part in ok.stdout, part
    totals = [line.split() for line in ok.stdout.splitlines() if line.strip().startswith("total")]
    assert len(totals) == 2 and all(int(t[1]) <= 540 for t in totals)
    over = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--plan"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, GPU_CHECK_SWEEP_S="400"))
    assert over.returncode == 1 and "OVER 540 s" in over.stdout
    bad = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--nonesuch"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--nonesuch" in bad.stderr


def test_a_killed_test_step_still_names_its_failures(tmp_path):
    """pytest with --test-lines killed mid-test: the summary names the failed test and the one
    that was running, with no JUnit XML."""
    tests = tmp_path / "t"
    tests.mkdir()
    (tests / "test_cut.py").write_text("import time\n\ndef test_a():\n    assert 1 == 2, 'broken'\n\n"
                                       "def test_b():\n    time.sleep(120)\n")
    lines = tmp_path / "tests-kernels.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "--test-lines", str(lines),
                             "--junitxml", str(tmp_path / "junit-kernels.xml"), str(tests)], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(ROOT / "tests")), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while "test_b" not in (lines.read_text() if lines.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "junit-kernels.xml").exists()
    from bench import summary
    text = "\n".join(summary.killed_step_lines(str(tmp_path)))
    assert "kernels tests: no JUnit XML" in text
    assert "FAILED" in text and "test_cut.py::test_a: AssertionError: broken" in text
    assert "RUNNING" in text and "test_cut.py::test_b" in text
    assert "passed    0  failed   1  skipped   0  running 1" in text


def test_bench_only_benches_on_the_committed_tables_without_sweep_or_tests(tmp_path):
    """--bench-only's plumbing, with a stand-in python that logs each call (bench.plan and
    bench.summary run for real)."""
    log = tmp_path / "calls.txt"
    fake = tmp_path / "py"
    fake.write_text(f"""#!/usr/bin/env bash
case "$1 $2" in "-m bench.plan"|"-m bench.summary") exec {sys.executable} "$@" ;; esac
echo "$* tuned=${{GPUAD_TUNED_DIR:-committed}}" >>{log}
""")
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--bench-only", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHON=str(fake), PATH="/usr/bin:/bin"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = log.read_text().splitlines()
    assert not any(c.startswith("-m pytest") or "--sweep" in c for c in calls), calls
    (bench,) = [c for c in calls if c.startswith("-m bench --preset quick")]
    assert bench.endswith("tuned=committed") and f"--out {tmp_path / 'out'}" in bench
    steps = (tmp_path / "out" / "steps.txt").read_text()
    assert [line.split(":")[0].strip() for line in steps.splitlines()] == ["install", "benchmark", "profiles"]
    assert "profiles: skipped" in steps and "no ncu on PATH" in proc.stdout


def test_the_gpu_run_doc_quotes_the_plan():
    """docs/gpu-run.md: its commands are the plan's, with the plan's limits and estimates."""
    import re
    from bench import plan
    doc = (ROOT / "docs" / "gpu-run.md").read_text()
    lines, ok = plan.plan()
    assert ok
    totals = [line.split() for line in lines if line.strip().startswith("total")]
    commands = [line for line in lines if line.startswith("bash ")]
    quoted = re.findall(r"\(limit (\d+) s, estimated (\d+) s\)", doc)
    assert quoted == [(t[1], t[2]) for t in totals]
    for command in commands:
        assert command.replace("OUT2", "gpu-out2").replace(" OUT", " gpu-out") in doc
    assert f"limits of {sum(int(t[1]) for t in totals)} s" in doc
    for key, limit in plan.limits({}).items():
        assert f"({limit} s" in doc, key
