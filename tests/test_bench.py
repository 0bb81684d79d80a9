"""The benchmark harness itself, on the CPU: counting, the check-before-timing FAIL path (device
and host checks), UNAVAILABLE reasons, the host figures and the CUDA-graph guard, results.json,
plots, `python -m bench --preset tiny` end to end, --report after a killed run, and the tuning
sweep (a fake registered op, then whatever the kernels register)."""
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is a top-level folder of the repository, not installed

from bench import common, harness, ops, plot, sweep  # noqa: E402

OPS_ARG = "softmax_cross_entropy,linear_backward,linear_cross_entropy,mlp_step,elementwise_chain,scalar_chain"


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
    deep = ops.Case("mlp_step", (128, 64, 256, 256, 10), "float32")  # no dx matmul for the first layer
    assert ops.MLPStep.flops(deep) == 2 * 128 * (2 * (64 * 256 + 256 * 256 + 256 * 10) + 256 * 256 + 256 * 10)
    assert deep.shape_dict() == {"B": 128, "D": 64, "H1": 256, "H2": 256, "C": 10}
    assert ops.mlp_params(deep) == ("w1", "b1", "w2", "b2", "w3", "b3")
    assert ops.ElementwiseChain.flops(ops.Case("elementwise_chain", (1000, 16), "float32")) == 48_000
    assert ops.ScalarChain.flops(ops.Case("scalar_chain", (1000, 16), "float32")) == 48_000
    lce = ops.Case("linear_cross_entropy", (8192, 4096, 128256), "bfloat16")
    assert ops.LinearCrossEntropy.flops(lce) == 6 * 8192 * 4096 * 128256 == 25_821_343_383_552  # bench/TARGETS.md: 25.8 T
    assert ops.LinearCrossEntropy.input_bytes(lce) == 2 * (8192 * 4096 + 128256 * 4096) + 8 * 8192


def test_rate_and_ceiling_from_counts():
    env = harness.Env(force_cpu=True)
    case = ops.Case("linear_backward", (64, 96, 80), "float32")
    ceilings = {"copy_GBps": 10.0, "matmul_TFLOPs": {"float32": 1.0}}
    (rec,) = harness.run([case], ["reference"], env, harness.Timing(cpu_min_reps=1, cpu_budget_s=0), ceilings,
                         progress=False)
    assert rec["status"] == "OK", rec["error"]
    assert rec["rate"] == pytest.approx(rec["flops"] / rec["ms"] / 1e9)
    assert rec["pct_ceiling"] == pytest.approx(100 * rec["rate"] / 1.0)


def test_lm_head_records_carry_the_model_time_at_the_run_ceilings():
    from bench import lm_head_model
    case = ops.Case("linear_cross_entropy", (8192, 4096, 128256), "bfloat16")
    ceilings = {"copy_GBps": 3000.0, "matmul_TFLOPs": {"bfloat16": 700.0}}
    recs = {}
    for impl in ("triton", "triton_dw", "torch"):
        rec = dict(harness.new_record(case, impl, "gpu", {}), status="OK", ms=50.0)
        recs[impl] = harness._with_rate(rec, ops.OPS[case.op], ceilings, None)
    sched = lm_head_model.token(8192, 4096, 128256, 2, 2048)
    zero_ms = 4 * 128256 * 4096 / 3000.0 / 1e6  # the bench zeroes the fp32 dw buffer in its call
    assert recs["triton"]["model_ms"] == pytest.approx(sched.ms(3000.0, 700.0) + zero_ms)
    own = lm_head_model.token(8192, 4096, 128256, 2, 2048, dw_accumulate=False)
    assert recs["triton_dw"]["model_ms"] == pytest.approx(own.ms(3000.0, 700.0))
    assert recs["torch"]["model_ms"] is None
    text = harness.table(list(recs.values()), ceilings)
    assert "model ms" in text.splitlines()[0] and f"{recs['triton']['model_ms']:.4f}" in text
    no_ceiling = dict(harness.new_record(case, "triton", "gpu", {}), status="OK", ms=50.0)
    assert harness._with_rate(no_ceiling, ops.OPS[case.op], {"copy_GBps": 3000.0}, None)["model_ms"] is None
    # the Triton impls: the schedule and chunk the launcher's tuning gives
    import importlib
    from gpuad.kernels import tuning
    importlib.import_module("gpuad.kernels.triton.linear_cross_entropy")
    with tuning.override("triton.linear_cross_entropy", schedule="token_lse", rows_per_chunk=4096):
        rec = harness._with_rate(dict(harness.new_record(case, "triton", "gpu", {}), status="OK", ms=50.0),
                                 ops.OPS[case.op], ceilings, None)
    lse = lm_head_model.token(8192, 4096, 128256, 2, 4096, lse_epilogue=True)
    assert rec["model_ms"] == pytest.approx(lse.ms(3000.0, 700.0) + zero_ms)


def test_cpu_engine_cases_in_the_cpu_preset_timed_interleaved():
    """The CPU engine against torch: the cases in the CPU quick preset, and their
    impls timed in one interleaved loop, one figure per impl."""
    quick = ops.cases_for("quick", cuda=False)
    assert ops.Case("mlp_step", (128, 64, 256, 256, 10), "float32") in quick
    assert ops.Case("elementwise_chain", (1000, 16), "float32") in quick
    assert ops.Case("scalar_chain", (1000, 16), "float32") in quick
    calls = []
    fns = [lambda: calls.append("a"), lambda: (calls.append("b"), time.sleep(0.002))]
    ms = harness.time_cpu_interleaved(fns, harness.Timing(cpu_min_reps=3, cpu_budget_s=0, cpu_interleaved_rounds=4))
    assert calls == ["a", "b"] * 5 and len(ms) == 2  # a warm-up call each, then 4 rounds
    (a_min, a_median), (b_min, b_median) = ms
    assert b_median >= b_min >= 2.0 > a_median >= a_min
    env = harness.Env(force_cpu=True)
    case = ops.Case("elementwise_chain", (50, 16), "float32")
    recs = harness.run([case], ["reference", "torch"], env, harness.Timing(cpu_min_reps=2, cpu_budget_s=0),
                       {"copy_GBps": 1.0, "matmul_TFLOPs": {}}, progress=False)
    assert [r["status"] for r in recs] == ["OK", "OK"], [r["error"] for r in recs]
    assert {r["timer"] for r in recs} == {"cpu-min-interleaved"} and all(0 < r["ms"] <= r["ms_median"] for r in recs)
    assert recs[1]["speedup_vs_torch"] == 1.0 and recs[0]["speedup_vs_torch"] == recs[1]["ms"] / recs[0]["ms"]


def test_cpu_runs_freeze_the_libraries_out_of_the_collector():
    """On a CPU the objects alive before timing are frozen for the run and thawed after it, so
    that a full collection walks only the engines' own objects."""
    import gc
    frozen_before = gc.get_freeze_count()
    with harness._libraries_frozen(harness.Env(force_cpu=True)):
        assert gc.get_freeze_count() > frozen_before
    assert gc.get_freeze_count() == 0


def test_bfloat16_quantize_matches_torch():
    torch = pytest.importorskip("torch")
    a = np.random.default_rng(0).standard_normal(10_000, dtype=np.float32) * 100
    want = torch.from_numpy(a).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(common.quantize(a, "bfloat16"), want)


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
        return common.Prepared(timed, outputs, "cpu")
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
    line = harness.unavailable_line(recs)
    assert line == ("not run: triton, cupy, liger: needs a CUDA device; torch_compile: timed on CUDA only; "
                    "nonesuch: not an implementation of the op")
    assert harness.table(recs).count(line) == 1


def test_presets_and_dtype_override():
    tiny = ops.cases_for("tiny", cuda=False)
    assert {c.op for c in tiny} == set(ops.OPS)
    assert ops.cases_for("quick", cuda=True)[0] == ops.Case("softmax_cross_entropy", (8192, 32000), "bfloat16")
    cpu = ops.cases_for("quick", cuda=False, ops=["linear_backward"], dtypes=["float32", "float64"])
    assert {c.dtype for c in cpu} == {"float32", "float64"} and all(c.op == "linear_backward" for c in cpu)


def test_quick_gpu_preset_has_the_lm_head_shapes_with_few_impls():
    """The GPU check's quick preset measures both LM-head target shapes with gpuad, torch
    eager, torch's F.linear_cross_entropy and Liger; the other impls are left out with a reason."""
    lce = [c.dims for c in ops.cases_for("quick", cuda=True, ops=["linear_cross_entropy"])]
    assert lce == [(8192, 4096, 128256), (16384, 2048, 32000)]
    kept = [i for i in ops.IMPLS if ("linear_cross_entropy", i) not in ops.QUICK_GPU_SKIP]
    assert kept == ["triton", "torch", "torch_lce", "liger"]
    assert ("linear_backward", "torch_compile") in ops.QUICK_GPU_SKIP
    cpu = [c.dims for c in ops.cases_for("quick", cuda=False, ops=["linear_cross_entropy"])]
    assert cpu and all(n * d * v <= 1 << 28 for n, d, v in cpu)  # small on the CPU


def _lce_record(impl, ms, peak, speedup=None, shape="8192x4096x128256", status="OK"):
    return dict(op="linear_cross_entropy", shape_str=shape, dtype="bfloat16", impl=impl, status=status, ms=ms,
                error=None, flops=6 * 8192 * 4096 * 128256, bytes=None, peak_extra_bytes=peak, host_us=50.0,
                speedup_vs_torch=speedup)


def test_summary_lm_head_targets():
    """Speed over torch eager, peak memory against Liger's in the same run, and the GEMM floor
    from the measured bf16 matmul rate (25.8 TFLOP at 700 TFLOP/s: 36.9 ms)."""
    from bench import summary
    ceilings = {"matmul_TFLOPs": {"bfloat16": 700.0}}
    recs = [_lce_record("torch", 48.8, 12.6e9, 1.0), _lce_record("liger", 54.8, 1.18e9, 0.89),
            _lce_record("triton", 40.0, 1.0e9, 1.22), _lce_record("cupy", 45.0, None, 1.08)]
    lines = summary.target_lines(recs, ceilings)
    triton = [line for line in lines if " triton " in line]
    assert len(triton) == 3 and all(line.rstrip().endswith("us/call") for line in triton)
    assert "1.22x torch" in triton[0] and " met" in triton[0]
    assert "+1.00/1.18 GB" in triton[1] and " met" in triton[1]
    assert "1.08x GEMMs" in triton[2] and " met" in triton[2]  # 40 ms / 36.9 ms
    assert "model" not in triton[2]
    recs[2]["model_ms"] = 44.3
    assert "1.08x GEMMs (model 1.20x)" in summary.target_lines(recs, ceilings)[2]  # 44.3 ms / 36.9 ms
    del recs[2]["model_ms"]
    cupy = [line for line in lines if " cupy " in line]
    assert "no peak figure" in cupy[1] and " ?" in cupy[1]
    assert "1.22x GEMMs" in cupy[2] and "MISSED" in cupy[2]  # 45 ms / 36.9 ms > 1.1
    recs[1]["peak_extra_bytes"] = 0.9e9
    assert "MISSED" in summary.target_lines(recs, ceilings)[1]
    assert "no matmul rate" in summary.target_lines(recs, {})[2]


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
    assert "[#" not in proc.stdout and "[#" in proc.stderr  # the progress bar goes to stderr
    # what ran, on how many threads, by which statistic; what did not run, once, in one line
    header = proc.stderr.splitlines()[0]
    assert header.endswith(f"on CPU {platform.machine()} (1 thread of {os.cpu_count()} cores)"), header
    assert "UNAVAILABLE" not in proc.stderr and "UNAVAILABLE" not in proc.stdout
    progress = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    assert len(progress) == 2 * len(ops.cases_for("tiny", cuda=False, ops=OPS_ARG.split(",")))  # reference, torch
    assert [line for line in proc.stdout.splitlines() if line.startswith("not run: ")] == [
        "not run: triton, liger: needs a CUDA device"]
    assert ("ms: the fastest of repeated calls (softmax_cross_entropy, linear_backward, linear_cross_entropy); "
            "the fastest round of an interleaved loop (mlp_step, elementwise_chain, scalar_chain)") in proc.stdout
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
        assert r["peak_extra_bytes"] is None  # measured on CUDA only
    assert "+peak GB" in (out / "table.txt").read_text()


def test_linear_routes_lines(monkeypatch):
    import types
    assert isinstance(harness.linear_routes(), list)
    fake = types.SimpleNamespace(route_choices=lambda: {
        (0, "bfloat16", 256, 1024, 512, True, True, False, False, (512, 1), (512, 1), (1024, 1)):
            ("cublas", {"fused": 0.0213, "cublas": 0.0187})})
    monkeypatch.setitem(sys.modules, "gpuad.kernels.triton.linear_backward", fake)
    assert harness.linear_routes() == [
        "linear_backward 256x512x1024 bfloat16: route cublas (cublas 0.0187 ms, fused 0.0213 ms)"]


def test_ops_do_not_import_the_harness():
    """No import circle: ops builds on common; harness imports ops, never the other way."""
    code = "import sys, bench.ops; assert 'bench.harness' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_normal_inputs_are_chunked_deterministic_and_quantized(monkeypatch):
    monkeypatch.setattr(common, "RANDOM_CHUNK", 1000)
    a = common.normal((37, 101), (0, 1), "bfloat16", 2.0)
    assert a.dtype == np.float32 and a.shape == (37, 101)
    np.testing.assert_array_equal(a, common.normal((37, 101), (0, 1), "bfloat16", 2.0))
    assert not np.array_equal(a.ravel()[:1000], a.ravel()[1000:2000])  # each chunk its own stream
    assert not (a.view(np.uint32) & 0xFFFF).any()  # bfloat16 values: low 16 bits clear
    assert 1.8 < a.std() < 2.2


def test_host_slice_check_catches_what_the_device_reference_missed(monkeypatch):
    """An output that matches a (wrong) full reference still fails the float64 host check on its
    first rows: the host check is independent of the device reference."""
    op = ops.CrossEntropy
    case = ops.Case(op.name, (37, 1031), "float32")
    true_expected = op.expected

    def skewed(case, host, xp):
        out = true_expected(case, host, xp)
        out["dlogits"] = out["dlogits"] * 1.5
        return out

    def impl(env, case, host, n):
        def outputs():
            ref = skewed(case, host, np)
            return {"loss": ref["loss"], "dlogits": ref["dlogits"]}
        return common.Prepared(lambda: None, outputs, "cpu")
    monkeypatch.setattr(op, "expected", staticmethod(skewed))
    monkeypatch.setitem(op.impls, "skewed", impl)
    (rec,) = harness.run([case], ["skewed"], harness.Env(force_cpu=True), harness.Timing(cpu_min_reps=1),
                         ceilings={}, progress=False)
    assert rec["status"] == "FAIL" and "float64 host check" in rec["error"], rec["error"]
    assert rec["max_error"] == 0.0 and rec["max_error_host"] > rec["tolerance"]


def test_deadline_leaves_the_rest_out_with_the_reason():
    cases = ops.cases_for("tiny", cuda=False, ops=["linear_backward"])
    recs = harness.run(cases, ["reference"], harness.Env(force_cpu=True), ceilings={}, progress=False,
                       deadline=0.0)
    assert all(r["status"] == "UNAVAILABLE" and "time budget" in r["error"] for r in recs)


def test_host_figures_on_cpu(tiny_run):
    _, out = tiny_run
    recs = [r for r in json.loads((out / "results.json").read_text())["records"] if r["status"] == "OK"]
    assert recs
    for r in recs:
        assert r["host_us"] > 0 and r["ms_back_to_back"] > 0 and r["wall_s"] > 0
        assert r["ms_graph"] is None and r["graph_note"] == "no CUDA device"
        if r["op"] not in ("mlp_step", "elementwise_chain", "scalar_chain"):  # no host slice: the whole output is checked
            assert r["max_error_host"] is not None and r["max_error_host"] <= r["tolerance"]
    assert "b2b ms" in (out / "table.txt").read_text() and "all: no CUDA device" in (out / "table.txt").read_text()


class _Stream:
    def __init__(self, name):
        self.name, self.cuda_stream = name, 0

    def wait_stream(self, other):
        pass


class _FakeCuda:
    """Just enough of torch.cuda for harness.time_graph: streams, a graph whose capture runs the
    calls, synchronize; set_stream is recorded."""

    def __init__(self):
        self.default = self.now = _Stream("default")
        self.set_to = []

    def is_available(self):
        return True

    def current_stream(self):
        return self.now

    def Stream(self):
        return _Stream("side")

    def stream(self, s):
        return contextlib.nullcontext()

    def set_stream(self, s):
        self.set_to.append(s.name)

    def synchronize(self):
        pass

    def CUDAGraph(self):
        return types.SimpleNamespace(replay=lambda: time.sleep(0.001))

    @contextlib.contextmanager
    def graph(self, g, stream=None):
        self.now = _Stream("capture")  # torch leaves the capture stream current when capture_end raises
        yield


def test_graph_timing_reports_an_op_that_cannot_be_captured(monkeypatch):
    cuda = _FakeCuda()
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    calls = []

    def syncs():  # fine in the warm-up, raises while capturing, as a host sync does
        calls.append(cuda.now.name)
        if cuda.now.name == "capture":
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
    ms, note = harness.time_graph(syncs, 2, harness.Timing(rep_ms=20))
    assert ms is None and note.startswith("not capturable: RuntimeError: CUDA error: operation not permitted")
    assert cuda.set_to == ["default"] and calls == ["default", "default", "capture"]
    cuda.now = cuda.default
    ms, note = harness.time_graph(lambda: None, 2, harness.Timing(rep_ms=20))
    assert note is None and 0.3 < ms < 50  # 1 ms sleep per replay of 2 captured calls


def test_report_after_a_killed_run(tmp_path):
    """Kill a run once it has written a few records; --report rebuilds results.json and the table
    from meta.json and results.jsonl (a line cut short by the kill is skipped)."""
    out = tmp_path / "killed"
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.Popen([sys.executable, "-m", "bench", "--preset", "tiny", "--cpu", "--ops", OPS_ARG,
                             "--impls", "reference,torch", "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sink = out / "results.jsonl"
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if sink.exists() and len(sink.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    lines = sink.read_text().splitlines()
    assert len(lines) >= 3 and not (out / "results.json").exists(), "the run ended before it was killed"
    with open(sink, "a") as f:
        f.write(lines[0][:40])  # a record cut short
    rep = subprocess.run([sys.executable, "-m", "bench", "--report", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    recs = json.loads((out / "results.json").read_text())["records"]
    assert [json.loads(line) | {"speedup_vs_torch": None} for line in lines] == \
        [r | {"speedup_vs_torch": None} for r in recs]
    assert (out / "table.txt").exists() and "softmax_cross_entropy" in rep.stdout
    bad = subprocess.run([sys.executable, "-m", "bench", "--report", str(tmp_path / "nothing")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--report" in bad.stderr


def _run_dir(path, lines, meta=None):
    """A run's folder: meta.json (the H100 run's unless given) and results.jsonl of `lines`."""
    path.mkdir()
    h100 = ROOT / "bench" / "results" / "2026-11-27-h100"
    (path / "meta.json").write_text(meta if meta is not None else (h100 / "meta.json").read_text())
    (path / "results.jsonl").write_text("".join(lines))
    return path


def test_report_names_a_corrupt_line_and_refuses_it_unless_told_to_skip(tmp_path, capsys):
    """A corrupt line of results.jsonl was dropped in silence; it is named by its number and the
    report exits 2, or with --skip-corrupt skips it (named on stderr) and reports the rest."""
    from bench.__main__ import main
    good = (ROOT / "bench" / "results" / "2026-11-27-h100" / "results.jsonl").read_text().splitlines(True)[:3]
    for bad, why in (("{\"op\": \"softmax_cross_entropy\", \"impl\n", "not JSON"),
                     ("[1, 2]\n", "a list, not an object"), ('{"op": "x"}\n', "no impl, shape_str, dtype, status, ms")):
        run = _run_dir(tmp_path / f"run{len(why)}", [good[0], bad, good[1], good[2]])
        with pytest.raises(SystemExit) as e:
            main(["--report", str(run)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"line 2 of {run / 'results.jsonl'} is not a record: {why}" in err, err
        assert not (run / "results.json").exists()
        assert main(["--report", str(run), "--skip-corrupt"]) == 0
        assert f"bench: skipped line 2 of {run / 'results.jsonl'}: {why}" in capsys.readouterr().err
        recs = json.loads((run / "results.json").read_text())["records"]
        assert [(r["op"], r["impl"]) for r in recs] == [(json.loads(g)["op"], json.loads(g)["impl"]) for g in good]
    for meta, why in (("{", "is not JSON"), ("[]", "is not a run's meta.json: a list, not an object"),
                      ('{"device": "x"}', "is not a run's meta.json: no date, preset")):
        run = _run_dir(tmp_path / f"meta{len(why)}", good, meta=meta)
        with pytest.raises(SystemExit) as e:
            main(["--report", str(run)])
        assert e.value.code == 2 and f"{run / 'meta.json'} {why}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--threads", "-1"], "argument --threads: must be >= 0, got -1"),
    (["--budget-s", "nan"], "argument --budget-s: must be a finite number > 0, got nan"),
    (["--budget-s", "0"], "argument --budget-s: must be a finite number > 0, got 0"),
    (["--out", "/proc/bench-out"], "--out /proc/bench-out: cannot create folder /proc/bench-out"),
    (["--out", str(ROOT / "README.md")], f"--out {ROOT / 'README.md'}: {ROOT / 'README.md'} is not a folder"),
    (["--sweep", "--tuned-dir", "/proc/tuned"], "--tuned-dir /proc/tuned: cannot create folder"),
    (["--skip-corrupt"], "--skip-corrupt needs --report DIR"),
    (["--report", "/proc/no-such-run"], "--report /proc/no-such-run: [Errno 2] No such file"),
])
def test_bad_flags_are_refused_before_any_work(argv, message, monkeypatch, capsys, tmp_path):
    """Negative --threads and NaN --budget-s were accepted; an unwritable --out failed after the
    ceilings were measured."""
    from bench.__main__ import main

    def work(*_, **__):
        raise AssertionError("work started before the flags were checked")
    monkeypatch.setattr(harness, "Env", work)
    monkeypatch.chdir(tmp_path)  # the default --out is made in the working folder
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


# --- the tuning sweep ------------------------------------------------------------------------

FAKE = "fake.softmax_cross_entropy"
FAKE_KEPT = "fake.linear_backward"
COST_MS = {"block": {1: 8, 2: 2, 4: 6}, "warps": {1: 8, 8: 2}}  # the best: block=2, warps=8 (4 ms)


def _fake_ce(env, case, host, n):
    """Cross-entropy that sleeps by its tuned parameters and is wrong when bad=1."""
    from gpuad.kernels import reference as K
    from gpuad.kernels import tuning
    loss, dl = K.softmax_cross_entropy(host["logits"].astype(np.float64), host["targets"])

    def call():
        p = tuning.values(FAKE)
        time.sleep((COST_MS["block"][p["block"]] + COST_MS["warps"][p["warps"]]) / 1e3)
        return {"loss": loss, "dlogits": dl * (2 if p["bad"] else 1)}
    return common.Prepared(call, call, "cpu")


@pytest.fixture
def fake_op(monkeypatch):
    from gpuad.kernels import tuning
    tuning.register(FAKE, {"block": (1, 2, 4), "warps": (1, 8), "bad": (0, 1)}, {"block": 1, "warps": 1, "bad": 0})
    tuning.register(FAKE_KEPT, {"tile": ((64, 64), (128, 64))}, {"tile": (64, 64)})
    monkeypatch.setitem(ops.CrossEntropy.impls, "fake", _fake_ce)
    monkeypatch.setitem(sweep.CPU_SHAPES, "softmax_cross_entropy", [((4, 50), "float32"), ((3, 70), "float32")])
    monkeypatch.setitem(sweep.TIMING, "cpu", harness.Timing(cpu_min_reps=3, cpu_max_reps=3, cpu_budget_s=0))
    yield tuning
    for op in (FAKE, FAKE_KEPT):
        tuning._SPACES.pop(op, None)
        tuning._DEFAULTS.pop(op, None)
    tuning.reload()


@pytest.mark.parametrize("grid_max", [100, 8])
def test_sweep_with_a_fake_op(fake_op, monkeypatch, tmp_path, capsys, grid_max):
    """12 candidates: the full grid, or (GRID_MAX 8) one parameter at a time from the start plus
    the combination of the best values, which is the winner; bad=1 FAILs and never wins; the
    table keeps the ops it did not sweep."""
    from bench.__main__ import main
    tuning = fake_op
    monkeypatch.setattr(sweep, "GRID_MAX", grid_max)
    device = harness.Env(force_cpu=True).device_name()
    path = tmp_path / "tuned" / tuning.file_name(device)
    path.parent.mkdir()
    path.write_text(json.dumps({"gpu": device, "ops": {FAKE_KEPT: {"tile": [128, 64]}, FAKE: {"block": 4}}}))
    rc = main(["--sweep", "--cpu", "--ops", FAKE, "--out", str(tmp_path / "out"), "--tuned-dir", str(path.parent)])
    text = capsys.readouterr().out
    assert rc == 1  # a candidate failed its check
    recs = harness.read_jsonl(tmp_path / "out" / "sweep.jsonl")
    by_cand = {}
    for r in recs:
        by_cand.setdefault(r["candidate"], []).append(r["status"])
    fails = {c: s for c, s in by_cand.items() if "bad=1" in c}
    assert fails and all(s == ["FAIL"] for s in fails.values())  # not run on the second shape
    assert all(s == ["OK", "OK"] for c, s in by_cand.items() if "bad=0" in c)
    start = "block=4 warps=1 bad=0"  # the table's value for block, the fallbacks for the rest
    assert recs[0]["candidate"] == start and recs[0]["start"]
    if grid_max == 100:
        assert len(by_cand) == 12 and recs[0]["strategy"] == "grid"
    else:
        # start, block=1, block=2, warps=8, bad=1, then the combination
        assert list(by_cand) == [start, "block=1 warps=1 bad=0", "block=2 warps=1 bad=0", "block=4 warps=8 bad=0",
                                 "block=4 warps=1 bad=1", "block=2 warps=8 bad=0"]
    table = tuning.load_table(device, str(path.parent))
    assert table["ops"] == {FAKE: {"block": 2, "warps": 8, "bad": 0}, FAKE_KEPT: {"tile": (128, 64)}}
    measured = table["measured"][FAKE]
    assert measured["winner"] == "block=2 warps=8 bad=0" and measured["shapes"] == ["4x50 float32", "3x70 float32"]
    assert len(measured["candidates"]) == len(by_cand) and measured["vs_start"] < 1
    assert {c["status"] for c in measured["candidates"]} == {"OK", "FAIL"}
    assert "winner: block=2 warps=8 bad=0" in text and (tmp_path / "out" / "sweep.txt").read_text().strip()
    assert "FAIL block=4 warps=1 bad=1: 4x50 float32: CheckFailed: dlogits" in text


def test_sweep_budget_and_unsweepable_ops(fake_op, tmp_path, capsys):
    from bench.__main__ import main
    rc = main(["--sweep", "--cpu", "--ops", f"{FAKE},{FAKE_KEPT}", "--out", str(tmp_path), "--budget-s", "1e-9"])
    text = capsys.readouterr().out
    assert rc == 0 and f"{FAKE}: not swept (UNAVAILABLE): not run: the sweep's time budget was spent" in text
    assert "not written" in text
    assert f"{FAKE_KEPT}: not swept (UNAVAILABLE)" in text  # the fake impl does not exist for linear_backward
    assert not (tmp_path / "tuned").exists()
    with pytest.raises(SystemExit):
        main(["--sweep", "--cpu", "--ops", "nonesuch", "--out", str(tmp_path)])


def test_each_op_gets_its_share_of_the_sweep_budget(fake_op, monkeypatch, tmp_path, capsys):
    """Two ops, a budget that the first would spend alone (12 candidates x 2 shapes of 4 calls,
    a check and 3 timed, of 60 ms): the first stops at half of it, the second is measured in
    the rest. The sweep's clock counts only the fake kernels' sleeps, so the outcome does not
    depend on how busy the machine is."""
    from bench.__main__ import main
    sweep.import_kernels()  # imported before the budget starts
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(sweep, "time", types.SimpleNamespace(monotonic=lambda: clock.now))
    monkeypatch.setattr(time, "sleep", lambda s: setattr(clock, "now", clock.now + s))
    monkeypatch.setitem(COST_MS, "block", {1: 30, 2: 30, 4: 30})
    monkeypatch.setitem(COST_MS, "warps", {1: 30, 8: 30})
    second = "fake2.softmax_cross_entropy"
    fake_op.register(second, {"block": (1, 2, 4), "warps": (1, 8), "bad": (0, 1)}, {"block": 1, "warps": 1, "bad": 0})
    monkeypatch.setitem(ops.CrossEntropy.impls, "fake2", _fake_ce)
    try:
        main(["--sweep", "--cpu", "--ops", f"{FAKE},{second}", "--out", str(tmp_path), "--budget-s", "1.2"])
    finally:
        fake_op._SPACES.pop(second, None)
        fake_op._DEFAULTS.pop(second, None)
    recs = harness.read_jsonl(tmp_path / "sweep.jsonl")
    ok = {op: [r for r in recs if r["tuning_op"] == op and r["status"] == "OK"] for op in (FAKE, second)}
    assert ok[FAKE] and ok[second], [(r["tuning_op"], r["status"]) for r in recs]
    assert len(ok[FAKE]) < 12 * 2  # cut at its share


def test_sweep_runs_what_the_kernels_register(tmp_path):
    """The real kernels' spaces, swept end to end in the Triton interpreter at small shapes:
    every candidate must pass its check; ops that cannot run here are listed with the reason."""
    from gpuad.kernels import tuning
    sweep.import_kernels()
    registered = [op for op in tuning.spaces() if not op.startswith("fake.")]
    if not registered:
        pytest.skip("no kernel module registers a tuning space yet")
    proc = subprocess.run([sys.executable, "-m", "bench", "--sweep", "--cpu", "--out", str(tmp_path / "out"),
                           "--tuned-dir", str(tmp_path / "tuned")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    text = (tmp_path / "out" / "sweep.txt").read_text()
    swept = [op for op in registered if f"{op}: not swept" not in text]
    for op in registered:
        assert op in text
    for op in swept:
        assert f"{op} (bench op" in text
    wins = [line for line in text.splitlines() if line.strip().startswith("winner:") and "none" not in line]
    assert len(wins) == len(swept), text
    if swept:
        (path,) = (tmp_path / "tuned").iterdir()
        table = tuning.validate(json.loads(path.read_text()), str(path))
        assert sorted(table["ops"]) == sorted(swept)


def test_sweep_order_groups_bench_ops_and_starts_where_a_cut_sweep_stopped():
    ops_ = ["triton.softmax_cross_entropy", "triton.linear_backward", "cupy.softmax_cross_entropy"]
    assert sweep.sweep_order(ops_, set()) == [ops_[0], ops_[2], ops_[1]]
    assert sweep.sweep_order(ops_, {ops_[0], ops_[2]}) == [ops_[1], ops_[0], ops_[2]]
    # the smaller spaces first (summed per bench op), so that what a small one leaves of its
    # share of the budget goes to the larger ones
    sizes = {ops_[0]: 10, ops_[1]: 30, ops_[2]: 25, "triton.linear_cross_entropy": 4}
    assert sweep.sweep_order(ops_ + ["triton.linear_cross_entropy"], set(), sizes) == [
        "triton.linear_cross_entropy", ops_[1], ops_[0], ops_[2]]
    assert sweep.sweep_order(ops_, {ops_[1]}, sizes) == [ops_[0], ops_[2], ops_[1]]
