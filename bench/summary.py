"""python -m bench.summary OUTDIR: the last lines of the GPU check.

Per test file of each JUnit XML in OUTDIR: passed / failed / skipped. Per target
shape found in OUTDIR/results.jsonl: each gpuad impl's ms, its ratio to one copy of the logits
(cross-entropy), its speed-up over torch's three ops (linear backward), or for the LM head
(linear_cross_entropy) three lines: its speed-up over torch eager, its peak memory above the
inputs against Liger's, and its time against the GEMM floor (6·N·D·V FLOPs at the bf16 matmul
rate measured in the run); all measured in the same run, the target, met or missed, and the
host time per call. Then the sweep's table
(rebuilt from OUTDIR/sweep.jsonl), the benchmark's seconds per impl, and the time each step
took (OUTDIR/steps.txt).
"""
from __future__ import annotations

import glob
import os
import sys
import xml.etree.ElementTree as ET

from . import ops, sweep
from .harness import read_jsonl, read_partial

# (op, shape label, dtype) -> [(kind, bound), ...]: "copy" means ms / one-copy-ms <= bound,
# "torch" means torch ms / gpuad ms >= bound, "liger_memory" means peak extra bytes / Liger's
# (same case, same run) <= bound, "gemm_floor" means ms / (flops at the measured matmul rate of
# the dtype) <= bound.
TARGETS = {
    ("softmax_cross_entropy", "8192x32000", "bfloat16"): [("copy", 1.5)],
    ("softmax_cross_entropy", "8192x128256", "bfloat16"): [("copy", 1.5)],
    ("softmax_cross_entropy", "16384x50257", "bfloat16"): [("copy", 1.5)],
    ("softmax_cross_entropy", "4096x32000", "float32"): [("copy", 1.5)],
    ("linear_backward", "64x512x512", "float32"): [("torch", 1.3)],
    ("linear_backward", "256x1024x1024", "bfloat16"): [("torch", 1.3)],
    ("linear_backward", "4096x1024x1024", "float32"): [("torch", 1.0)],
    ("linear_backward", "8192x4096x4096", "bfloat16"): [("torch", 1.0)],
    ("linear_backward", "16384x4096x14336", "bfloat16"): [("torch", 1.0)],
    ("linear_backward", "65536x1024x1024", "bfloat16"): [("torch", 1.0)],
    ("linear_cross_entropy", "8192x4096x128256", "bfloat16"): [("torch", 1.0), ("liger_memory", 1.0),
                                                               ("gemm_floor", 1.1)],
    ("linear_cross_entropy", "16384x2048x32000", "bfloat16"): [("torch", 1.0), ("liger_memory", 1.0)],
}
GPUAD_IMPLS = ("triton", "triton_fused", "cupy")


def test_lines(out_dir):
    lines = []
    for path in sorted(glob.glob(os.path.join(out_dir, "junit-*.xml"))):
        try:
            root = ET.parse(path).getroot()
        except (ET.ParseError, OSError) as e:  # a run killed while writing
            lines.append(f"{os.path.basename(path)}: unreadable ({e})")
            continue
        per_file = {}
        for case in root.iter("testcase"):
            cls = case.get("classname") or "?"
            name = next((part for part in cls.split(".") if part.startswith("test_")), cls)
            state = ("failed" if case.find("failure") is not None or case.find("error") is not None
                     else "skipped" if case.find("skipped") is not None else "passed")
            counts = per_file.setdefault(name, {"passed": 0, "failed": 0, "skipped": 0})
            counts[state] += 1
        for name, c in per_file.items():
            lines.append(f"  {name:34s} passed {c['passed']:4d}  failed {c['failed']:3d}  skipped {c['skipped']:3d}")
    return lines


def _measure(kind, bound, r, records, ceilings):
    """(what was measured, the goal, met: True / False / None when it cannot be told)."""
    if kind == "copy":
        copy = (ceilings or {}).get("copy_GBps")
        ratio = r["ms"] / (r["bytes"] / copy / 1e6) if copy else None
        return (f"{ratio:.2f}x copy" if ratio else "no copy ceiling"), f"<= {bound}x copy", \
            None if ratio is None else ratio <= bound
    if kind == "torch":
        ratio = r.get("speedup_vs_torch")
        return (f"{ratio:.2f}x torch" if ratio else "no torch time"), f">= {bound}x torch", \
            None if ratio is None else ratio >= bound
    if kind == "liger_memory":
        liger = next((q for q in records if q["impl"] == "liger" and q["status"] == "OK" and q["op"] == r["op"]
                      and q["shape_str"] == r["shape_str"] and q["dtype"] == r["dtype"]), None)
        mine, theirs = r.get("peak_extra_bytes"), (liger or {}).get("peak_extra_bytes")
        if mine is None or not theirs:
            return ("no peak figure" if mine is None else f"+{mine / 1e9:.2f} GB, no Liger"), \
                f"<= {bound}x Liger mem", None
        return f"+{mine / 1e9:.2f}/{theirs / 1e9:.2f} GB", f"<= {bound}x Liger mem", mine <= bound * theirs
    rate = (ceilings or {}).get("matmul_TFLOPs", {}).get(r["dtype"])  # kind "gemm_floor"
    ratio = r["ms"] / (r["flops"] / rate / 1e9) if rate and r.get("flops") else None
    return (f"{ratio:.2f}x GEMMs" if ratio else "no matmul rate"), f"<= {bound}x GEMMs", \
        None if ratio is None else ratio <= bound


def target_lines(records, ceilings):
    lines = []
    for (op, shape, dtype), targets in TARGETS.items():
        for r in records:
            if ((r["op"], r["shape_str"], r["dtype"]) != (op, shape, dtype) or r["impl"] not in GPUAD_IMPLS
                    or r["impl"] not in ops.OPS[op].impls):
                continue
            if r["status"] != "OK":
                lines.append(f"  {op:22s} {shape:17s} {dtype:8s} {r['impl']:12s} {r['status']}: {(r['error'] or '')[:80]}")
                continue
            host = f"  host {r['host_us']:.0f} us/call" if r.get("host_us") is not None else ""
            for kind, bound in targets:
                what, goal, verdict = _measure(kind, bound, r, records, ceilings)
                mark = "met" if verdict else "MISSED" if verdict is False else "?"
                lines.append(f"  {op:22s} {shape:17s} {dtype:8s} {r['impl']:12s} {r['ms']:9.4f} ms  {what:18s} "
                             f"target {goal:18s} {mark}{host}")
    return lines


def seconds_per_impl(records):
    """Where the benchmark's time went: seconds per impl (setup, compile, check and timing)."""
    total = {}
    for r in records:
        if r.get("wall_s") is not None:
            total[r["impl"]] = total.get(r["impl"], 0.0) + r["wall_s"]
    return "  " + ", ".join(f"{impl} {s:.0f} s" for impl, s in sorted(total.items(), key=lambda t: -t[1]))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.summary OUTDIR", file=sys.stderr)
        return 2
    out_dir = argv[0]
    print("tests (per file):")
    print("\n".join(test_lines(out_dir)) or "  no JUnit XML")
    try:
        meta, records = read_partial(out_dir)
    except OSError:
        meta, records = {}, []
    print(f"targets ({meta.get('device', 'no benchmark run')}; ceilings measured in the run: "
          f"copy {(meta.get('ceilings') or {}).get('copy_GBps') or 0:.4g} GB/s):")
    print("\n".join(target_lines(records, meta.get("ceilings"))) or "  no target shape measured")
    if any(r.get("wall_s") is not None for r in records):
        print("benchmark seconds per impl:")
        print(seconds_per_impl(records))
    sweep_path = os.path.join(out_dir, "sweep.jsonl")
    if os.path.exists(sweep_path):
        print("sweep:")
        text = sweep.report_text(read_jsonl(sweep_path)) if os.path.getsize(sweep_path) else "nothing swept"
        print("\n".join("  " + line for line in text.splitlines()))
    steps = os.path.join(out_dir, "steps.txt")
    if os.path.exists(steps):
        print("steps:")
        print(open(steps).read().rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
