"""python -m bench.plan [--limits]: the GPU check's two commands, each step's time limit and its
estimated seconds; exit status 1 when a command's limits add up to more than MAX_COMMAND_S.

Limits: the environment's GPU_CHECK_<STEP>_S, else LIMITS (bench/gpu_check.sh reads them from
``--limits``, which prints them as shell assignments). Estimates:
- install, kernel tests, benchmark, engine tests: the seconds each step took in the newest GPU
  run kept under bench/results (its steps.txt), or the limit where that run had no such step;
  a step that took longer than its limit is estimated at the limit (the benchmark stops
  starting measurements 20 s before it, and is cut there).
- sweep: per tuning op, the candidates bench/sweep_plan.py keeps at the GPU shapes (plus the
  combination of the best values) × shapes × the seconds a candidate takes on a shape (the
  sweep's warm-up and timing windows, and two calls at the time the newest GPU run measured for
  the op's impl at that shape: the check and the first call), plus the compiles: each distinct
  Triton launch of the kept candidates (the linear backward: each tile of the space, once; the
  LM head: each distinct Triton kernel its candidates' schedules launch) at
  the compile seconds measured on a CPU (bench/sm90_kernels.json). The linear backward's
  candidates with the "autotune" tile time every tile and cuBLAS on each shape's first call
  (AUTOTUNE_S each). The sweep stops starting measurements at four fifths of its limit; each op
  gets an equal share of that (what an op leaves goes to the next); an estimate above its share
  is cut there.
- profiles: their limit (nothing measured yet).
"""
from __future__ import annotations

import glob
import json
import os
import sys

from . import sm90, sweep_plan

MAX_COMMAND_S = 540  # 9 minutes: a command must leave room under a 10-minute call
LIMITS = {"install": 60, "kernel": 90, "sweep": 150, "bench": 160, "engine": 60, "profile": 120}
STEPS = {  # command -> [(step key, the name steps.txt gives it)]
    "bash bench/gpu_check.sh OUT": [("install", "install"), ("kernel", "kernel tests"), ("sweep", "sweep"),
                                    ("bench", "benchmark"), ("engine", "engine tests")],
    "bash bench/gpu_check.sh --bench-only OUT2": [("install", "install"), ("bench", "benchmark"),
                                                  ("profile", "profiles")],
}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
#: triton.autotune's default warm-up + repetition windows (25 + 100 ms) for one config
AUTOTUNE_S = 0.125


def limits(env=None) -> dict:
    env = os.environ if env is None else env
    out = {}
    for key, default in LIMITS.items():
        name = f"GPU_CHECK_{key.upper()}_S"
        text = env.get(name, str(default))
        if not text.isdigit():
            raise ValueError(f"{name} must be a whole number of seconds, got {text!r}")
        out[key] = int(text)
    return out


def last_run(results_dir=RESULTS):
    """(run folder name, {step name: seconds}, {(op, shape, dtype, impl): ms}) of the newest run."""
    runs = sorted(glob.glob(os.path.join(results_dir, "*", "steps.txt")))
    if not runs:
        return None, {}, {}
    folder = os.path.dirname(runs[-1])
    steps = {}
    for line in open(runs[-1]):
        name, _, rest = line.strip().partition(": ")
        if rest.endswith(" s"):
            steps[name] = int(rest.rsplit(",", 1)[1].strip()[:-2])
    ms = {}
    jsonl = os.path.join(folder, "results.jsonl")
    if os.path.exists(jsonl):
        for line in open(jsonl):
            r = json.loads(line)
            if r.get("ms"):
                ms[(r["op"], r["shape_str"], r["dtype"], r["impl"])] = r["ms"]
    return os.path.basename(folder), steps, ms


def sweep_estimate(timing, run_ms, table, budget_s):
    """[(tuning op, seconds, how)] of the sweep at the GPU shapes, each within its share of
    `budget_s` as it comes (an equal part of what is left)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU here: define the kernels for the interpreter
    from . import sweep
    sweep.import_kernels()
    from gpuad.kernels import tuning
    spaces = tuning.spaces()
    out, left, n = [], budget_s, len(spaces)
    for i, op in enumerate(sweep.sweep_order(list(spaces), set(), sweep.space_sizes())):
        impl, _, bench_op = op.partition(".")
        cases = sweep_plan.gpu_cases(bench_op)
        start = tuning.defaults(op)
        kept, dropped = sweep_plan.candidates(op, spaces[op], start, cases, table)
        n_cand = len(kept) + 1  # and the combination of the best values
        per_shape = [(timing.warmup_ms + timing.rep_ms) / 1e3 + 2 * run_ms.get((bench_op, c.label, c.dtype, impl), 0) / 1e3
                     for c in cases]
        timing_s = n_cand * sum(per_shape)
        if op == "triton.linear_backward":
            tiles = [t for k in ("tile_16bit", "tile_fp32") for t in spaces[op][k] if t != "autotune"]
            auto = sum(1 for p in kept if "autotune" in (p["tile_16bit"], p["tile_fp32"]))
            timing_s += auto * len(cases) * (len(tiles) // 2 + 1) * AUTOTUNE_S
            compiles = len(tiles)
        elif op == "triton.linear_cross_entropy":
            compiles = len({k for p in kept for c in cases for k in sweep_plan.lce_kernels(c, p)})
        elif op in sweep_plan.LAUNCHES and impl == "triton":
            compiles = len({repr(sweep_plan.launch_key(op, c, p)[:2]) for p in kept for c in cases})  # not the grid
        else:
            compiles = 0  # CUDA C: one NVRTC compile of the source, kept in CuPy's cache
        compile_s = compiles * sm90.compile_seconds(table, op) if compiles else 0.0
        est = timing_s + compile_s
        share = left / (n - i)
        got = min(est, share)
        left -= got
        how = (f"{len(kept)}+1 candidates ({len(dropped)} dropped) x {len(cases)} shapes: {timing_s:.0f} s timing"
               + (f", {compiles} compiles x {sm90.compile_seconds(table, op):.2f} s" if compiles else "")
               + (f"; {est:.0f} s, cut at its share {share:.0f} s" if est > share else ""))
        out.append((op, got, how))
    return out


def plan(env=None, results_dir=RESULTS):
    """(lines, ok): the plan of both commands, and whether each fits MAX_COMMAND_S."""
    lim = limits(env)
    run, steps, run_ms = last_run(results_dir)
    from . import sweep
    lines, ok = [], True
    sweep_rows = None
    for command, step_list in STEPS.items():
        lines.append(f"{command}")
        lines.append(f"  {'step':14s} {'limit s':>8s} {'estimate s':>10s}  from")
        total_limit = total_est = 0
        for key, name in step_list:
            limit = lim[key]
            if key == "sweep":
                if sweep_rows is None:
                    sweep_rows = sweep_estimate(sweep.TIMING["cuda"], run_ms, sm90.load(), limit * 4 // 5)
                est = min(limit, sum(s for _, s, _ in sweep_rows))
                how = "per op below (each within its share of four fifths of the limit)"
            elif key == "install" and command.startswith("bash bench/gpu_check.sh --bench-only"):
                est, how = 0, "skipped: installed by the first command on the same machine (import check only)"
            elif name in steps:
                est = min(limit, steps[name])
                how = f"run {run}: {steps[name]} s" + (" (cut at the limit)" if steps[name] > limit else "")
            else:
                est, how = limit, "nothing measured: the limit"
            lines.append(f"  {name:14s} {limit:8d} {est:10.0f}  {how}")
            if key == "sweep":
                lines += [f"    {op}: {s:.0f} s ({how})" for op, s, how in sweep_rows]
            total_limit += limit
            total_est += est
        fits = total_limit <= MAX_COMMAND_S
        ok &= fits
        lines.append(f"  {'total':14s} {total_limit:8d} {total_est:10.0f}  "
                     + ("within" if fits else "OVER") + f" {MAX_COMMAND_S} s")
    return lines, ok


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv == ["--limits"]:
            print(" ".join(f"{k.upper()}_S={v}" for k, v in limits().items()))
            return 0
        if argv:
            print("usage: python -m bench.plan [--limits]", file=sys.stderr)
            return 2
        lines, ok = plan()
    except ValueError as e:
        print(f"bench.plan: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    if not ok:
        print(f"bench.plan: a command's limits pass {MAX_COMMAND_S} s", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
