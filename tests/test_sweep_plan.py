"""bench/sweep_plan.py and bench/sm90.py: the sweep's candidates by expected gain, the ones that
cannot change anything dropped (same launch at every shape, or more programs than an SM holds),
and the sm_90 occupancy and compile-time table they read."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import sm90, sweep_plan  # noqa: E402

CE = "triton.softmax_cross_entropy"


@pytest.mark.parametrize("regs, shared, warps, blocks", [
    (64, 64, 16, 2),        # 64 x 32 = 2048 registers a warp, 16 warps: 32 K of the 64 K
    (40, 64, 16, 3),        # 1280 a warp, 20 K a block
    (78, 64, 16, 1),        # 2496 rounds up to 2560 a warp: 40 K a block
    (32, 100000, 4, 2),     # shared memory: 228 K / (100000 + 1 K reserved)
    (16, 0, 32, 2),         # threads: 2048 / 1024
    (8, 0, 1, 32),          # the block limit
])
def test_blocks_per_sm_by_hand(regs, shared, warps, blocks):
    assert sm90.blocks_per_sm(regs, shared, warps) == blocks


def test_blocks_per_sm_refuses_nonsense():
    with pytest.raises(ValueError, match="registers"):
        sm90.blocks_per_sm(0, 0, 4)


def _ce_setup():
    from gpuad.kernels import tuning
    from gpuad.kernels.triton import cross_entropy_rows  # noqa: F401  (registers the space)
    return tuning.spaces()[CE], tuning.defaults(CE), sweep_plan.gpu_cases("softmax_cross_entropy")


def test_triton_ce_candidates_start_with_the_most_promising_and_drop_no_ops():
    space, start, cases = _ce_setup()
    kept, dropped = sweep_plan.candidates(CE, space, start, cases, table=None)
    assert kept[0] == start
    assert [k["num_stages"] for k in kept[1:4]] == [2, 3, 4]  # PRIORITY's first parameter
    why = {sweep_plan._label(p, start): reason for p, reason in dropped}
    # the chunked kernel ignores rows_per_program; no row of 32000 or more fits 4096 or 8192
    for name in ("rows_per_program=2", "rows_per_program=4", "single_pass_max=4096", "single_pass_max=8192"):
        assert "launches what the start point launches" in why[name]
    assert "single_pass_max=32768" not in why  # 32000-wide rows fit it: the row kernel runs
    assert all("programs_per_sm" not in k for k in why)  # no occupancy table: all kept
    assert len(kept) + len(dropped) == 1 + sum(len(v) - 1 for v in space.values())


def test_programs_an_sm_cannot_hold_are_dropped():
    space, start, cases = _ce_setup()
    table = sm90.load()
    kept, dropped = sweep_plan.candidates(CE, space, start, cases, table)
    assert {p["programs_per_sm"] for p in kept} == {1, 2}  # bf16 start kernel: 2 a SM, fp32: 3
    assert [p["programs_per_sm"] for p, _ in dropped if p["programs_per_sm"] != 1] == [4]
    one = {"kernels": [dict(k, blocks_per_sm=1) for k in table["kernels"]]}
    kept, dropped = sweep_plan.candidates(CE, space, start, cases, one)
    assert {p["programs_per_sm"] for p in kept} == {1}
    assert "at most 1 program" in next(r for p, r in dropped if p["programs_per_sm"] == 2)


def test_an_op_without_a_launch_function_keeps_every_candidate_in_priority_order():
    space = {"split_dw": (1, 2), "route": ("measure", "fused"), "other": (0, 1)}
    start = {"split_dw": 1, "route": "measure", "other": 0}
    kept, dropped = sweep_plan.candidates("triton.linear_backward", space, start, [], None)
    assert dropped == [] and [sweep_plan._label(p, start) for p in kept] == [
        "the start point", "route=fused", "split_dw=2", "other=1"]


def test_the_committed_table_matches_its_own_figures():
    table = sm90.load()
    assert [k["variant"] for k in table["kernels"]] == [sm90.parse_variant(t)["variant"] for _, t in sm90.MEASURED]
    for k in table["kernels"]:
        assert k["blocks_per_sm"] == sm90.blocks_per_sm(k["registers"], k["shared"], k["num_warps"])
        assert k["compile_s"] > 0
    for op in (CE, "triton.linear_backward", "triton.linear_cross_entropy"):
        assert sm90.compile_seconds(table, op) > 0


def test_variant_ids_and_logs_are_parsed():
    v = sm90.parse_variant("t[bf16-chunked-V50257-BLOCK16384-w16-s3-COUNT0-ALIGNED0-HAS_GRAD1-MEAN1-SMOOTH1-ti64]")
    assert (v["kernel"], v["dtype"], v["BLOCK"], v["ROWS"], v["num_warps"], v["num_stages"]) == (
        "_ce_chunked_kernel", "bfloat16", 16384, 1, 16, 3)
    lb = sm90.parse_variant("t[fp32-128x64x32-w8-s4(default)-contig-NEED_DX1]")
    assert (lb["kernel"], lb["tile"], lb["num_warps"], lb["num_stages"]) == ("linear_backward", "128x64x32", 8, 4)
    head = sm90.parse_variant("t[bf16-lce-logits-V128256-off-ieee]")
    assert (head["kernel"], head["dtype"], head["num_warps"]) == ("_lce_logits_kernel", "bfloat16", None)
    assert sm90.parse_variant("t[fp32-lce-lse-rows-V50257-on]")["kernel"] == "_lce_lse_rows_kernel"
    log = ("bf16-a-w4-x: {'registers': 40, 'shared': 64, 'st_global': True}\n"
           "1.50s call     tests/test_triton_compile.py::test_x[bf16-a-w4-x]\n")
    assert sm90.parse_log(log) == {"bf16-a-w4-x": {"registers": 40, "shared": 64, "st_global": True,
                                                   "compile_s": 1.5}}
    with pytest.raises(ValueError, match="no compile time"):
        sm90.compile_seconds({"kernels": []}, CE)


def test_plan_limits_from_the_environment():
    from bench import plan
    assert plan.limits({}) == plan.LIMITS
    assert plan.limits({"GPU_CHECK_SWEEP_S": "0"})["sweep"] == 0
    with pytest.raises(ValueError, match="GPU_CHECK_BENCH_S"):
        plan.limits({"GPU_CHECK_BENCH_S": "2m"})


def test_plan_estimates_from_the_newest_run_and_fails_over_the_limit(tmp_path):
    from bench import plan
    for name, text in (("2026-01-01-old", "  install: rc 0, 99 s\n"),
                       ("2026-02-01-new", "  install: rc 0, 7 s\n  benchmark: rc 124 (TIMED OUT), 300 s\n"
                                          "  engine tests: rc 0, 20 s\n  sweep: skipped\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "steps.txt").write_text(text)
    run, steps, ms = plan.last_run(str(tmp_path))
    assert (run, steps, ms) == ("2026-02-01-new", {"install": 7, "benchmark": 300, "engine tests": 20}, {})
    lines, ok = plan.plan({}, str(tmp_path))
    text = "\n".join(lines)
    assert ok and "run 2026-02-01-new: 7 s" in text
    assert "benchmark           160        160  run 2026-02-01-new: 300 s (cut at the limit)" in text
    assert "kernel tests         90         90  nothing measured: the limit" in text
    lines, ok = plan.plan({"GPU_CHECK_ENGINE_S": "100"}, str(tmp_path))
    assert not ok and "OVER 540 s" in "\n".join(lines)


def test_the_lm_head_sweep_counts_one_compile_per_distinct_triton_kernel():
    """"token" launches the row kernel (one BLOCK past 4096 columns); "token_lse" the logits GEMM
    (one tile a dtype) and the one-pass row kernel (its TILES follow V); rows_per_chunk compiles
    nothing new."""
    from bench import ops, plan
    cases = [ops.Case("linear_cross_entropy", (8192, 4096, 128256), "bfloat16"),
             ops.Case("linear_cross_entropy", (16384, 2048, 32000), "bfloat16")]
    kernels = {p["schedule"]: set().union(*(sweep_plan.lce_kernels(c, dict(p)) for c in cases))
               for p in ({"schedule": "token", "rows_per_chunk": 2048}, {"schedule": "token_lse", "rows_per_chunk": 4096})}
    assert sorted(k[0] for k in kernels["token"]) == ["_lce_rows_kernel"]
    assert sorted(k[0] for k in kernels["token_lse"]) == ["_lce_logits_kernel", "_lce_lse_rows_kernel",
                                                           "_lce_lse_rows_kernel"]
    from bench import sweep
    rows = plan.sweep_estimate(sweep.TIMING["cuda"], {}, sm90.load(), 1000)
    how = next(h for op, _, h in rows if op == "triton.linear_cross_entropy")
    assert f"4 compiles x {sm90.compile_seconds(sm90.load(), 'triton.linear_cross_entropy'):.2f} s" in how
