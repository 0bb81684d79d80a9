"""python -m bench [--ops OP,...] [--impls IMPL,...] [--preset tiny|quick|full] [--dtype DT,...] [--out DIR]

Run from the repository root. Checks every implementation against the float64 reference,
times the ones that pass, measures the device's ceilings in the same run, prints a table
and writes results.json, table.txt and one PNG per op into --out.

Presets: on a machine with a CUDA device, `quick` and `full` use the DESIGN.md shapes
(full adds vocab and M sweeps). Without one, they switch to small CPU shapes (the numpy
reference and torch on the CPU), and `tiny` is the smallest set, for CI.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from . import harness, ops, plot

TIMING = {
    "tiny": harness.Timing(warmup_ms=5, rep_ms=20, cpu_min_reps=3, cpu_max_reps=10, cpu_budget_s=0.02),
    "quick": harness.Timing(warmup_ms=25, rep_ms=100, cpu_min_reps=3, cpu_max_reps=20, cpu_budget_s=0.3),
    "full": harness.Timing(warmup_ms=25, rep_ms=200, cpu_min_reps=5, cpu_max_reps=50, cpu_budget_s=1.0),
}


def _csv(choices):
    def parse(text):
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(choices)}")
        return items
    return parse


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", type=_csv(tuple(ops.OPS)), default=list(ops.OPS), help="comma list (default: all)")
    p.add_argument("--impls", type=_csv(ops.IMPLS), default=None, help="comma list (default: all)")
    p.add_argument("--preset", choices=tuple(ops.PRESETS), default="quick")
    p.add_argument("--dtype", type=_csv(tuple(harness.TOLERANCE)), default=None,
                   help="comma list replacing each preset shape's dtype")
    p.add_argument("--out", default="bench-out", help="output folder (default ./bench-out)")
    p.add_argument("--cpu", action="store_true", help="ignore any CUDA device (CPU shapes and timing)")
    args = p.parse_args(argv)

    t0 = time.time()
    env = harness.Env(force_cpu=args.cpu)
    cases = ops.cases_for(args.preset, env.cuda, args.ops, args.dtype)
    where = "GPU shapes" if env.cuda else "no CUDA device: CPU shapes"
    print(f"bench: preset {args.preset} ({where}), {len(cases)} cases x {len(args.impls or ops.IMPLS)} impls on {env.device_name()}",
          file=sys.stderr, flush=True)
    timing = TIMING[args.preset]
    ceilings = harness.measure_ceilings(env, {c.dtype for c in cases}, timing)
    impls, skip = args.impls or list(ops.IMPLS), {}
    if args.impls is None and args.preset == "quick" and env.cuda:  # compile time would dominate the quick run
        skip = {(op, "torch_compile"): "left out of the quick preset on this op (compile time); add --impls"
                for op in ("linear_backward", "mlp_step")}
    records = harness.run(cases, impls, env, timing, ceilings, skip=skip)

    os.makedirs(args.out, exist_ok=True)
    meta = harness.write_results(os.path.join(args.out, "results.json"), records, env, ceilings, args.preset,
                                 sys.argv[1:] if argv is None else argv)
    text = harness.table(records, ceilings)
    if meta["linear_routes"]:
        text += "\nroute='auto' of the Triton linear_backward (fused vs cuBLAS, measured on first use):\n  "
        text += "\n  ".join(meta["linear_routes"])
    with open(os.path.join(args.out, "table.txt"), "w") as f:
        f.write(f"{meta['device']}  {meta['date']}  preset {args.preset}\n{text}\n")
    try:
        pngs = plot.plot_all(records, meta, args.out)
    except Exception as e:  # matplotlib missing or broken: the table and JSON still stand
        pngs = []
        print(f"bench: no plots ({type(e).__name__}: {e})", file=sys.stderr)
    print(text)
    print(f"bench: wrote results.json, table.txt and {len(pngs)} PNG(s) to {args.out} in {time.time() - t0:.1f} s",
          file=sys.stderr)
    return 1 if any(r["status"] == "FAIL" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
