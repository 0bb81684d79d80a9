"""The benchmark harness itself, on the CPU: counting, the check-before-timing FAIL path,
UNAVAILABLE reasons, results.json, plots, and `python -m bench --preset tiny` end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is a top-level folder of the repository, not installed

from bench import harness, ops, plot  # noqa: E402

OPS_ARG = "softmax_cross_entropy,linear_backward,mlp_step"


def test_counting_exact():
    ce = ops.Case("softmax_cross_entropy", (8192, 32000), "bfloat16")
    assert ops.CrossEntropy.min_bytes(ce) == 2 * 8192 * 32000 * 2 + 8 * 8192 == 1_048_641_536
    assert ops.CrossEntropy.flops(ce) is None
    lin = ops.Case("linear_backward", (64, 512, 512), "float32")
    assert ops.LinearBackward.flops(lin) == 4 * 64 * 512 * 512 == 67_108_864
    # read x, w, dy + write dx, dw, db
    assert ops.LinearBackward.min_bytes(lin) == 4 * (64 * 512 + 512 * 512 + 64 * 512 + 64 * 512 + 512 * 512 + 512)
    assert ops.LinearBackward.min_bytes(lin) == 2_492_416
    big = ops.Case("linear_backward", (8192, 4096, 4096), "bfloat16")
    assert ops.LinearBackward.flops(big) == 549_755_813_888
    mlp = ops.Case("mlp_step", (32, 64, 128, 10), "float32")
    assert ops.MLPStep.flops(mlp) == 4 * 32 * 64 * 128 + 6 * 32 * 128 * 10 == 1_294_336


def test_rate_and_ceiling_from_counts():
    env = harness.Env(force_cpu=True)
    case = ops.Case("linear_backward", (64, 96, 80), "float32")
    ceilings = {"copy_GBps": 10.0, "matmul_TFLOPs": {"float32": 1.0}}
    (rec,) = harness.run([case], ["reference"], env, harness.Timing(cpu_min_reps=1, cpu_budget_s=0), ceilings,
                         progress=False)
    assert rec["status"] == "OK", rec["error"]
    assert rec["rate"] == pytest.approx(rec["flops"] / rec["ms"] / 1e9)
    assert rec["pct_ceiling"] == pytest.approx(100 * rec["rate"] / 1.0)


def test_bfloat16_quantize_matches_torch():
    torch = pytest.importorskip("torch")
    a = np.random.default_rng(0).standard_normal(10_000, dtype=np.float32) * 100
    want = torch.from_numpy(a).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(harness.quantize(a, "bfloat16"), want)


def _wrong_impl(calls):
    """Cross-entropy whose gradient is off by a factor of two; counts its timed calls."""
    def setup(env, case, host, n):
        from gpuad.kernels import reference as K
        logits, targets = host["logits"], host["targets"]

        def timed():
            calls.append(1)

        def outputs():
            loss, dl = K.softmax_cross_entropy(logits, targets)
            return {"loss": loss, "dlogits": 2 * dl}
        return harness.Prepared(timed, outputs, "cpu")
    return setup


def test_wrong_impl_is_fail_and_not_timed(monkeypatch):
    calls = []
    monkeypatch.setitem(ops.CrossEntropy.impls, "wrong", _wrong_impl(calls))

    def raising(env, case, host, n):
        raise RuntimeError("kernel exploded")
    monkeypatch.setitem(ops.CrossEntropy.impls, "raising", raising)
    case = ops.Case("softmax_cross_entropy", (37, 1031), "float32")
    recs = harness.run([case], ["reference", "wrong", "raising"], harness.Env(force_cpu=True),
                       harness.Timing(cpu_min_reps=1, cpu_budget_s=0), ceilings={}, progress=False)
    by = {r["impl"]: r for r in recs}
    assert by["reference"]["status"] == "OK" and by["reference"]["ms"] > 0
    wrong = by["wrong"]
    assert wrong["status"] == "FAIL" and wrong["ms"] is None and calls == []
    assert "dlogits" in wrong["error"] and "tolerance" in wrong["error"]
    assert wrong["max_error"] > wrong["tolerance"]
    assert by["raising"]["status"] == "FAIL" and "kernel exploded" in by["raising"]["error"]
    text = harness.table(recs)
    assert "FAIL (not timed):" in text and "kernel exploded" in text


def test_unavailable_listed_once_with_reason():
    cases = ops.cases_for("tiny", cuda=False, ops=["softmax_cross_entropy", "linear_backward"])
    recs = harness.run(cases, ["triton", "cupy", "torch_compile", "liger", "nonesuch"], harness.Env(force_cpu=True),
                       ceilings={}, progress=False)
    assert recs and all(r["status"] == "UNAVAILABLE" and r["error"] and r["ms"] is None for r in recs)
    lines = harness.unavailable_lines(recs)
    assert sorted(line.split(":")[0] for line in lines) == ["cupy", "liger", "nonesuch", "torch_compile", "triton"]
    assert "triton: needs a CUDA device" in lines
    assert any(line.startswith("liger:") and "cross-entropy only" in line for line in lines)
    text = harness.table(recs)
    for line in lines:
        assert text.count(line) == 1


def test_presets_and_dtype_override():
    tiny = ops.cases_for("tiny", cuda=False)
    assert {c.op for c in tiny} == set(ops.OPS)
    assert ops.cases_for("quick", cuda=True)[0] == ops.Case("softmax_cross_entropy", (8192, 32000), "bfloat16")
    cpu = ops.cases_for("quick", cuda=False, ops=["linear_backward"], dtypes=["float32", "float64"])
    assert {c.dtype for c in cpu} == {"float32", "float64"} and all(c.op == "linear_backward" for c in cpu)


def test_plot_writes_one_png_per_op(tmp_path):
    recs = []
    for op, shape in (("softmax_cross_entropy", {"B": 4, "V": 8}), ("linear_backward", {"M": 1, "K": 2, "N": 3})):
        for impl, status in (("torch", "OK"), ("triton", "UNAVAILABLE")):
            recs.append(dict(op=op, impl=impl, shape=shape, shape_str="x".join(map(str, shape.values())),
                             dtype="float32", status=status, ms=1.0 if status == "OK" else None, pct_ceiling=42.0,
                             metric="GB/s"))
    paths = plot.plot_all(recs, {"device": "test", "date": "2000-01-01"}, str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["linear_backward.png", "softmax_cross_entropy.png"]
    for p in paths:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-m", "bench", "--preset", "tiny", "--cpu", "--ops", OPS_ARG,
                           "--impls", "reference,torch,triton,liger", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return proc, out


def test_end_to_end_tiny(tiny_run):
    proc, out = tiny_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "op" in proc.stdout and "% ceil" in proc.stdout and "x torch" in proc.stdout
    assert "triton: needs a CUDA device" in proc.stdout
    assert "[#" not in proc.stdout and "[#" in proc.stderr  # the progress bar goes to stderr
    data = json.loads((out / "results.json").read_text())
    recs = data["records"]
    cases = ops.cases_for("tiny", cuda=False, ops=OPS_ARG.split(","))
    assert len(recs) == len(cases) * 4
    ok = {(r["op"], r["impl"]) for r in recs if r["status"] == "OK"}
    for op in OPS_ARG.split(","):
        assert (op, "reference") in ok and (op, "torch") in ok, (op, [r["error"] for r in recs if r["op"] == op])
    for op in OPS_ARG.split(","):
        png = out / f"{op}.png"
        assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    assert (out / "table.txt").exists()


def test_results_json_schema(tiny_run):
    _, out = tiny_run
    data = json.loads((out / "results.json").read_text())
    meta = data["meta"]
    for key in ("device", "date", "versions", "ceilings", "preset"):
        assert key in meta
    assert meta["preset"] == "tiny" and "numpy" in meta["versions"]
    assert meta["ceilings"]["copy_GBps"] > 0 and meta["ceilings"]["matmul_TFLOPs"]["float32"] > 0
    for r in data["records"]:
        missing = [k for k in harness.REQUIRED_KEYS if k not in r]
        assert not missing, missing
        assert r["status"] in ("OK", "FAIL", "UNAVAILABLE")
        assert (r["error"] is None) == (r["status"] == "OK")
        assert (r["ms"] is not None) == (r["status"] == "OK")
        if r["status"] == "OK":
            assert r["rate"] > 0 and r["max_error"] <= r["tolerance"]
            if r["impl"] == "torch":
                assert r["speedup_vs_torch"] == pytest.approx(1.0)
        assert r["metric"] in ("GB/s", "TFLOP/s")
        assert isinstance(r["shape"], dict) and r["device"] == meta["device"]


def test_linear_routes_lines(monkeypatch):
    import types
    assert isinstance(harness.linear_routes(), list)
    fake = types.SimpleNamespace(route_choices=lambda: {
        (0, "bfloat16", 256, 1024, 512, True, True, False, False, (512, 1), (512, 1), (1024, 1)):
            ("cublas", {"fused": 0.0213, "cublas": 0.0187})})
    monkeypatch.setitem(sys.modules, "gpuad.kernels.triton.linear_backward", fake)
    assert harness.linear_routes() == [
        "linear_backward 256x512x1024 bfloat16: route cublas (cublas 0.0187 ms, fused 0.0213 ms)"]
