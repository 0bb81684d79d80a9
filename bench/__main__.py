"""python -m bench [--ops OP,...] [--impls IMPL,...] [--preset tiny|quick|full] [--dtype DT,...] [--out DIR] [--threads N]
python -m bench --report DIR
python -m bench --sweep [--ops OP,...] [--out DIR] [--tuned-dir DIR]
python -m bench --host-overhead [--calls N]

Run from the repository root. Checks every implementation against the float64 reference
(the whole output, on the device where there is one, then its first rows again on the host),
times the ones that pass, measures the device's ceilings in the same run, prints a table
and writes meta.json, results.jsonl (one line per record, appended as it is measured),
results.json, table.txt and one PNG per op into --out. --report DIR rebuilds the table,
results.json and the plots from DIR's meta.json and results.jsonl (after an interrupted run).
Each record holds its time per call (on CUDA the L2-flushed median; on a CPU, where numpy's
BLAS and torch run on --threads threads, the fastest call, or for the engine cases the fastest
round of one loop that interleaves their impls; the table says which), the back-to-back time per
call, the time per call under a CUDA graph (or why the op cannot be captured) and the host time
per call.

--host-overhead prints the host (CPU) time of one public call of each launcher, with or without
a GPU: the real launch path with only the driver's kernel launch stubbed (see bench/host_overhead.py).

--sweep times every tuning candidate the kernels declare and writes one winner per op to
kernels/tuned/<GPU>.json (see bench/sweep.py); --ops then takes tuning op names too.

Presets: on a machine with a CUDA device, `quick` and `full` use the target shapes (full adds
vocab and M sweeps); bench/TARGETS.md lists them with their targets and anchor figures. Without
one, they switch to small CPU shapes (the numpy reference and torch on the CPU), and `tiny` is
the smallest set, for CI.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

from gpuad.cli import CommandError, number, writable_folder

from . import harness, ops, plot, sweep

TIMING = {
    "tiny": harness.Timing(warmup_ms=5, rep_ms=20, cpu_min_reps=3, cpu_max_reps=10, cpu_budget_s=0.02),
    "quick": harness.Timing(warmup_ms=25, rep_ms=100, cpu_min_reps=3, cpu_max_reps=20, cpu_budget_s=0.3,
                            cpu_interleaved_rounds=60),
    "full": harness.Timing(warmup_ms=25, rep_ms=200, cpu_min_reps=5, cpu_max_reps=50, cpu_budget_s=1.0,
                           cpu_interleaved_rounds=100),
}


def _csv(choices):
    def parse(text):
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if choices is not None and s not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(choices)}")
        return items
    return parse


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", type=_csv(None), default=None,
                   help=f"comma list of {', '.join(ops.OPS)} (default: all); with --sweep also tuning op names")
    p.add_argument("--impls", type=_csv(ops.IMPLS), default=None, help="comma list (default: all)")
    p.add_argument("--preset", choices=tuple(ops.PRESETS), default="quick")
    p.add_argument("--dtype", type=_csv(tuple(harness.TOLERANCE)), default=None,
                   help="comma list replacing each preset shape's dtype")
    p.add_argument("--out", default="bench-out", help="output folder (default ./bench-out)")
    p.add_argument("--cpu", action="store_true", help="ignore any CUDA device (CPU shapes and timing)")
    p.add_argument("--threads", type=number(int, 0), default=1,
                   help="CPU runs: threads for numpy's BLAS and torch (default 1: the engine cases compare "
                        "gpuad and torch on one thread each; 0 leaves the libraries' defaults)")
    p.add_argument("--report", metavar="DIR", help="rebuild table, results.json and plots from DIR, then exit")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="with --report: skip lines of results.jsonl that are not records (each named on stderr) "
                        "instead of refusing them")
    p.add_argument("--budget-s", type=number(float, 0, low_open=True), default=None,
                   help="start no new measurement after this many seconds (the rest are left out, with the reason)")
    p.add_argument("--sweep", action="store_true", help="time every tuning candidate and write the winners")
    p.add_argument("--tuned-dir", default=None,
                   help="with --sweep: where the GPU's table goes (default kernels/tuned on CUDA, OUT/tuned on a CPU)")
    p.add_argument("--host-overhead", action="store_true",
                   help="print the host time per call of each launcher, the kernel launch stubbed")
    p.add_argument("--calls", type=int, default=200, help="with --host-overhead: calls per timed round")
    args = p.parse_args(argv)
    if args.calls < 1:
        p.error(f"argument --calls: must be >= 1, got {args.calls}")
    if args.host_overhead:
        from . import host_overhead

        try:
            return host_overhead.main(args.calls)
        except RuntimeError as e:
            p.error(f"--host-overhead: {e}")
    if args.skip_corrupt and not args.report:
        p.error("--skip-corrupt needs --report DIR")
    bad = [o for o in args.ops or () if o not in ops.OPS]
    if bad and not args.sweep:
        p.error(f"argument --ops: unknown {', '.join(bad)}; choose from {', '.join(ops.OPS)}")
    folders = [("--tuned-dir", args.tuned_dir)] if args.sweep and args.tuned_dir else []
    if not args.report:
        folders.append(("--out", args.out))  # checked (and made) before any work: they take the results
    for flag, folder in folders:
        try:
            writable_folder(folder, f"{flag} {folder}", create=True)
        except CommandError as e:
            p.error(str(e))
    if args.sweep:
        try:
            return sweep.main(args)
        except ValueError as e:
            p.error(str(e))
    if args.report:
        try:
            meta, records = harness.read_partial(args.report, skip_corrupt=args.skip_corrupt)
        except (OSError, ValueError) as e:
            p.error(f"--report {args.report}: {e}")
        return report(records, meta, args.report)

    t0 = time.monotonic()
    env = harness.Env(force_cpu=args.cpu)
    deadline = t0 + args.budget_s if args.budget_s else None
    cases = ops.cases_for(args.preset, env.cuda, args.ops, args.dtype)
    where = "GPU shapes" if env.cuda else "no CUDA device: CPU shapes"
    cpu_threads = None
    if not env.cuda and args.threads > 0:
        cpu_threads, env.cpu_threads = harness.limit_cpu_threads(args.threads), args.threads
    print(f"bench: preset {args.preset} ({where}), {len(cases)} cases x {len(args.impls or ops.IMPLS)} impls on {env.device_name()}",
          file=sys.stderr, flush=True)
    timing = TIMING[args.preset]
    ceilings = harness.measure_ceilings(env, {c.dtype for c in cases}, timing)
    impls, skip = args.impls or list(ops.IMPLS), {}
    if args.impls is None and args.preset == "quick" and env.cuda:  # compile time would dominate the quick run
        skip = dict(ops.QUICK_GPU_SKIP)
    os.makedirs(args.out, exist_ok=True)
    meta = harness.run_meta(env, ceilings, args.preset, sys.argv[1:] if argv is None else argv, cpu_threads)
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, default=str)
    sink = os.path.join(args.out, "results.jsonl")
    open(sink, "w").close()
    # torch_compile last, after every other impl on every case: its compiles are the slowest part
    first = [i for i in impls if i != "torch_compile"]
    run = functools.partial(harness.run, env=env, timing=timing, ceilings=ceilings, skip=skip, sink=sink,
                            deadline=deadline)
    records = run(cases, first) if first else []
    if "torch_compile" in impls:
        records = harness.add_speedups(records + run(cases, ["torch_compile"]))
    rc = report(records, meta, args.out)
    print(f"bench: {len(records)} records in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return rc


def report(records, meta, out):
    """Write results.json, table.txt and the plots into `out`; print the table; 1 if any FAIL."""
    meta = harness.write_results(os.path.join(out, "results.json"), records, meta)
    text = harness.table(records, meta.get("ceilings"))
    if meta["linear_routes"]:
        text += "\nroute='auto' of the Triton linear_backward (fused vs cuBLAS, measured on first use):\n  "
        text += "\n  ".join(meta["linear_routes"])
    with open(os.path.join(out, "table.txt"), "w") as f:
        f.write(f"{meta['device']}  {meta['date']}  preset {meta['preset']}\n{text}\n")
    try:
        pngs = plot.plot_all(records, meta, out)
    except Exception as e:  # matplotlib missing or broken: the table and JSON still stand
        pngs = []
        print(f"bench: no plots ({type(e).__name__}: {e})", file=sys.stderr)
    print(text)
    print(f"bench: wrote results.json, table.txt and {len(pngs)} PNG(s) to {out}", file=sys.stderr)
    return 1 if any(r["status"] == "FAIL" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
