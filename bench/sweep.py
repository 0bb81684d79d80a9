"""python -m bench --sweep [--ops OP,...] [--out DIR] [--budget-s S] [--tuned-dir DIR] [--cpu]

Times every tuning candidate the kernels declare and writes one winner per op and GPU into
the GPU's tuned table, which the launchers then read as their defaults.

Which ops: the kernel modules (gpuad.kernels.triton, gpuad.kernels.cupy) are imported, then
``gpuad.kernels.tuning.spaces()`` lists what they registered. A tuning op is named
``<impl>.<bench op>``: "triton.softmax_cross_entropy" is swept through the bench op
softmax_cross_entropy with its impl "triton", whose call reaches the launcher, which reads its
parameters through ``tuning.value``; the sweep sets each candidate with ``tuning.override``
around every call. An op named otherwise, or whose impl cannot run here, is listed as not
swept, with the reason. ``--ops`` takes tuning op names or bench op names (all tuning ops of it).

Candidates: the full grid of the space when it has at most GRID_MAX points. Otherwise one
parameter at a time: the start point (what the launcher uses now on this GPU: its tuned table,
else the registered fallbacks), then each other value of each parameter with the rest held at
the start, the most promising parameters first and without the candidates that cannot change
anything at the sweep's shapes (bench/sweep_plan.py: order, and why each dropped one is
dropped; they are listed as DROPPED), then the combination of every parameter's best value
when that is a new point. A grid of a large space would outlast a GPU session; this is linear
in the number of values, and the combination catches the common case of parameters that act
independently.

Shapes: the target shapes (bench/TARGETS.md) of the bench op (its GPU quick-preset shapes). Without a
CUDA device, the small CPU_SHAPES run the Triton kernels in the interpreter (TRITON_INTERPRET=1,
set before the kernels are imported): that checks every candidate and the plumbing; its
times say nothing about a GPU.

Each candidate is checked on each shape against the float64 reference (on the device, the
whole output) before it is timed (L2-flushed median); one that fails is FAIL, is not run on
the remaining shapes and never wins. Every record is appended to OUT/sweep.jsonl as measured.
The winner of an op is the candidate measured OK on every shape with the smallest geometric
mean time. The table is printed and written to OUT/sweep.txt; the winners go into
``<tuned-dir>/<tuning.file_name(GPU name)>.json`` (default: this tree's kernels/tuned on a CUDA
device, OUT/tuned without one; a copy always lands in OUT/tuned), replacing the swept ops'
entries and keeping the others, with a "measured" section per op (see kernels/tuning.py). ``--budget-s`` stops starting new
measurements once spent; each op gets an equal share of what is left when its turn comes (an
op that finishes early leaves its rest to the next), so every op is swept; winners come from
the candidates complete by then.
"""
from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import shutil
import sys
import time

from . import harness, ops, sm90, sweep_plan
from .common import Unavailable, try_import

GRID_MAX = 8
KERNEL_MODULES = ("gpuad.kernels.triton", "gpuad.kernels.cupy")
ROOT_TUNED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "tuned")
CPU_SHAPES = {  # one row-kernel and one two-pass (V > 16384) cross-entropy shape; small matmuls
    ops.CrossEntropy.name: [((8, 300), "float32"), ((3, 20000), "float32")],
    ops.LinearBackward.name: [((8, 40, 24), "float32")],
    ops.MLPStep.name: [((8, 16, 32, 10), "float32")],
    ops.LinearCrossEntropy.name: [((20, 16, 150), "float32")],  # one chunk of 20 rows, 2 column tiles
}
TIMING = {"cuda": harness.Timing(warmup_ms=10, rep_ms=60),
          "cpu": harness.Timing(cpu_min_reps=1, cpu_max_reps=1, cpu_budget_s=0.0)}


def _tuning():
    from gpuad.kernels import tuning
    return tuning


def import_kernels():
    """Import the kernel modules so that they register their spaces; {module: error} of those
    that do not import."""
    failed = {}
    for name in KERNEL_MODULES:
        _, err = try_import(name)
        if err:
            failed[name] = err
    return failed


def bench_target(tuning_op):
    """(bench op, impl) that exercises `tuning_op`, or raise Unavailable with the reason."""
    impl, _, bench_op = tuning_op.partition(".")
    op = ops.OPS.get(bench_op)
    if op is None or impl not in op.impls:
        raise Unavailable(f"no bench op and impl for {tuning_op!r} (expected '<impl>.<bench op>' with a bench "
                          f"op among {', '.join(ops.OPS)})")
    return bench_op, impl


def sweep_cases(bench_op, cuda):
    if cuda:
        return ops.cases_for("quick", True, [bench_op])
    return [ops.Case(bench_op, dims, dt) for dims, dt in CPU_SHAPES.get(bench_op, [])]


def label(params):
    return " ".join(f"{k}={v}" for k, v in params.items()) or "(no parameters)"


def grid(space):
    names = list(space)
    return [dict(zip(names, values)) for values in itertools.product(*(space[k] for k in names))]


def one_at_a_time(space, start):
    """The start point, then each other value of each parameter with the rest held."""
    out = [dict(start)]
    for k, values in space.items():
        out += [dict(start, **{k: v}) for v in values if v != start[k]]
    return out


def start_point(tuning_op, device_name, tuned_dir):
    """The op's values in the device's table in `tuned_dir` (the one the sweep rewrites), else
    its fallbacks: on a GPU with the default tuned dir, what the launcher uses now."""
    tuning = _tuning()
    start = tuning.defaults(tuning_op)
    try:
        start.update(tuning.load_table(device_name, tuned_dir)["ops"].get(tuning_op, {}))
    except ValueError as e:  # a broken table: start from the fallbacks, the sweep rewrites it
        print(f"sweep: {e}; starting {tuning_op} from its fallback defaults", file=sys.stderr)
    return start


class _Case:
    """One shape of the op, set up once for every candidate: the call (and its inputs) of the
    impl, and the references. `shared` {case: (host inputs, references)} is reused by the
    tuning ops of one bench op (the triton and cupy cross-entropy make the same inputs)."""

    def __init__(self, env, case, impl, shared):
        op = ops.OPS[case.op]
        if case not in shared:
            host = op.make_inputs(case)
            shared[case] = host, op.expected(case, host, env.ref_xp())
        host, self.expected = shared[case]
        self.case = case
        self.prep = op.impls[impl](env, case, host, env.n_copies(op.input_bytes(case)))
        ops.drop_device_copies(host)


def measure(tuning_op, params, c: _Case, timing, base):
    """Check then time one candidate on one shape: a sweep record."""
    rec = dict(base, params=params, candidate=label(params), shape_str=c.case.label, dtype=c.case.dtype,
               status=None, ms=None, max_error=None, error=None)
    t0 = time.monotonic()
    try:
        with _tuning().override(tuning_op, **params):
            outs = c.prep.outputs()
            rec["max_error"] = harness.check(outs, c.expected, harness.TOLERANCE[c.case.dtype])
            outs = None
            rec["ms"], _ = harness.time_fn(c.prep.fn, c.prep.device, timing)
        rec["status"] = "OK"
    except Exception as e:
        rec["status"], rec["error"] = "FAIL", f"{type(e).__name__}: {e}".strip()[:300]
    rec["wall_s"] = round(time.monotonic() - t0, 3)
    return rec


def sweep_op(tuning_op, env, timing, tuned_dir, shared, sink=None, deadline=None):
    """Every candidate of `tuning_op` on every shape of its bench op; the records. `shared`:
    see _Case (a dict, empty or filled by a tuning op of the same bench op)."""
    tuning = _tuning()
    base = dict(tuning_op=tuning_op, bench_op=None, impl=None, device=env.device_name(), start=False,
                strategy=None, wall_s=None)
    records = []

    def emit(rec):
        records.append(rec)
        if sink:
            harness.append_jsonl(sink, rec)
        where = " ".join(x for x in (rec.get("candidate"), rec.get("shape_str")) if x)
        print(f"sweep: {tuning_op} {where}: {rec['status']}"
              + (f" {rec['ms']:.4f} ms" if rec.get("ms") else f" ({rec['error']})" if rec.get("error") else ""),
              file=sys.stderr, flush=True)

    space = tuning.spaces()[tuning_op]
    start = start_point(tuning_op, env.device_name(), tuned_dir)
    small = math.prod(len(v) for v in space.values()) <= GRID_MAX
    base["strategy"] = "grid" if small else "one parameter at a time"
    try:
        base["bench_op"], base["impl"] = bench_target(tuning_op)
        if deadline is not None and time.monotonic() > deadline:
            raise Unavailable("not run: the sweep's time budget was spent")
        cases = [_Case(env, case, base["impl"], shared) for case in sweep_cases(base["bench_op"], env.cuda)]
        if not cases:
            raise Unavailable(f"{tuning_op}: no sweep shapes for {base['bench_op']}")
    except Exception as e:  # the op cannot run here (UNAVAILABLE), or its setup broke (FAIL)
        status, reason = ("UNAVAILABLE", str(e)) if isinstance(e, Unavailable) else ("FAIL", f"{type(e).__name__}: {e}")
        emit(dict(base, params=start, candidate=label(start), status=status, error=reason[:300]))
        return records

    def run(candidates):
        for params in candidates:
            for c in cases:
                if deadline is not None and time.monotonic() > deadline:
                    return False
                rec = measure(tuning_op, params, c, timing, dict(base, start=params == start))
                emit(rec)
                if rec["status"] != "OK":
                    break
        return True

    dropped = []
    if small:
        run([start] + [p for p in grid(space) if p != start])
    else:
        kept, dropped = sweep_plan.candidates(tuning_op, space, start, [c.case for c in cases], _sm90_table())
        if run(kept):  # in time for the combination of the best values
            combined = _best_per_parameter(records, space, start)
            if combined not in one_at_a_time(space, start):
                run([combined])
    if not records:
        emit(dict(base, params=start, candidate=label(start), status="UNAVAILABLE",
                  error="not run: the sweep's time budget was spent"))
    for params, why in dropped:
        emit(dict(base, params=params, candidate=label(params), status="DROPPED", error=why))
    cases = None
    harness.free(env)
    return records


def _sm90_table():
    """bench/sm90_kernels.json, or None (then no candidate is dropped by occupancy)."""
    try:
        return sm90.load()
    except (OSError, ValueError) as e:
        print(f"sweep: no sm_90 resource table ({e}); programs_per_sm candidates are all kept", file=sys.stderr)
        return None


def _best_per_parameter(records, space, start):
    """Each parameter at the value whose one-at-a-time candidate had the best geometric mean."""
    scores = {r["candidate"]: r["geomean_ms"] for r in candidates_of(records) if r["geomean_ms"]}
    best = dict(start)
    for k, values in space.items():
        timed = [(scores[label(dict(start, **{k: v}))], v) for v in values if label(dict(start, **{k: v})) in scores]
        if timed:
            best[k] = min(timed, key=lambda t: t[0])[1]
    return best


def shapes_of(records):
    return list(dict.fromkeys(f"{r['shape_str']} {r['dtype']}" for r in records if r.get("shape_str")))


def candidates_of(records):
    """Per candidate of one op, in order: params, ms per shape (None: not measured OK), a cell
    per shape for the table (ms, FAIL or -), status (OK, FAIL or incomplete), geometric mean
    (None unless OK on every shape) and the error."""
    shapes = shapes_of(records)
    out = {}
    for r in records:
        if not r.get("shape_str"):
            continue
        c = out.setdefault(r["candidate"], dict(candidate=r["candidate"], params=r["params"], start=r["start"],
                                                ms=dict.fromkeys(shapes), cells=dict.fromkeys(shapes, "-"),
                                                status="OK", error=None))
        shape = f"{r['shape_str']} {r['dtype']}"
        c["ms"][shape] = r["ms"]
        c["cells"][shape] = f"{r['ms']:.4f}" if r["status"] == "OK" else r["status"]
        if r["status"] != "OK":
            c["status"], c["error"] = r["status"], f"{shape}: {r['error']}"
    for c in out.values():
        if c["status"] == "OK" and None in c["ms"].values():
            c["status"] = "incomplete"
        c["geomean_ms"] = (math.exp(sum(math.log(v) for v in c["ms"].values()) / len(shapes))
                           if c["status"] == "OK" else None)
    return list(out.values())


def by_op(records):
    out = {}
    for r in records:
        out.setdefault(r["tuning_op"], []).append(r)
    return out


def winners(records):
    """{tuning op: the winning candidate (see candidates_of) with "vs_start"}, for ops that have one."""
    out = {}
    for op, recs in by_op(records).items():
        cands = [c for c in candidates_of(recs) if c["geomean_ms"]]
        if not cands:
            continue
        best = min(cands, key=lambda c: c["geomean_ms"])
        start = next((c for c in cands if c["start"]), None)
        out[op] = dict(best, vs_start=best["geomean_ms"] / start["geomean_ms"] if start else None)
    return out


def report_text(records):
    """The sweep's table: per op, every candidate's ms per shape and geometric mean, and the winner."""
    lines = []
    wins = winners(records)
    for op, recs in by_op(records).items():
        first = next((r for r in recs if r.get("shape_str")), recs[0])
        if not first.get("shape_str"):
            lines.append(f"{op}: not swept ({first['status']}): {first['error']}")
            continue
        shapes = shapes_of(recs)
        lines.append(f"{op} (bench op {first['bench_op']}, impl {first['impl']}) on {first['device']}: "
                     f"{first['strategy']}; ms: median (L2 flushed on a GPU)")
        cands = candidates_of(recs)
        start = next((c["geomean_ms"] for c in cands if c["start"]), None)
        rows = [[c["candidate"] + (" (start)" if c["start"] else ""), *c["cells"].values(),
                 f"{c['geomean_ms']:.4f}" if c["geomean_ms"] else c["status"],
                 f"{c['geomean_ms'] / start:.3f}" if c["geomean_ms"] and start else ""] for c in cands]
        lines += ["  " + line for line in harness.text_table(["candidate", *shapes, "geomean", "x start"], rows)]
        for c in cands:
            if c["error"]:
                lines.append(f"  FAIL {c['candidate']}: {c['error']}")
        lines += [f"  dropped {r['candidate']}: {r['error']}" for r in recs if r["status"] == "DROPPED"]
        w = wins.get(op)
        lines.append(f"  winner: {w['candidate']}: geomean {w['geomean_ms']:.4f} ms"
                     + (f" = {w['vs_start']:.3f}x the start" if w["vs_start"] else "") if w
                     else "  winner: none (no candidate measured OK on every shape)")
    return "\n".join(lines) or "nothing swept"


def write_tuned(records, device_name, tuned_dir):
    """Write the winners into the GPU's table in `tuned_dir`; its path, or None without a winner."""
    tuning = _tuning()
    wins = winners(records)
    if not wins:
        return None
    path = os.path.join(tuned_dir, tuning.file_name(device_name))
    table = {"gpu": device_name, "ops": {}, "measured": {}}
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = tuning.validate(json.load(f), path)
            table["ops"].update(old["ops"])
            table["measured"].update(old.get("measured", {}))
        except (ValueError, OSError) as e:
            print(f"sweep: replacing {path}: {e}", file=sys.stderr)
    date = datetime.date.today().isoformat()
    versions = harness.versions()
    for op, w in wins.items():
        recs = by_op(records)[op]
        table["ops"][op] = w["params"]
        table["measured"][op] = {
            "date": date, "versions": versions, "strategy": recs[0]["strategy"], "bench_op": recs[0]["bench_op"],
            "impl": recs[0]["impl"], "shapes": shapes_of(recs), "winner": w["candidate"], "vs_start": w["vs_start"],
            "candidates": [{"params": c["params"], "ms": list(c["ms"].values()), "geomean_ms": c["geomean_ms"],
                            "status": c["status"], **({"error": c["error"]} if c["error"] else {})}
                           for c in candidates_of(recs)]}
    tuning.validate(json.loads(json.dumps(table)), path)  # what a launcher will read back
    os.makedirs(tuned_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    tuning.reload()
    return path


def select(requested, registered):
    """The tuning ops named by `requested` (tuning op or bench op names; None: all)."""
    if not requested:
        return list(registered)
    out = []
    for name in requested:
        hits = [op for op in registered if op == name or op.partition(".")[2] == name]
        if not hits:
            raise ValueError(f"--ops: {name!r} is neither a registered tuning op nor a bench op with one "
                             f"(registered: {', '.join(registered) or 'none'})")
        out += [h for h in hits if h not in out]
    return out


def _measured_ops(device_name, tuned_dir):
    """The ops the device's table in `tuned_dir` holds measurements of."""
    try:
        with open(os.path.join(tuned_dir, _tuning().file_name(device_name))) as f:
            return set(json.load(f).get("measured", {}))
    except (OSError, ValueError, AttributeError):
        return set()


def sweep_order(tuning_ops, measured, sizes=None):
    """The tuning ops of one bench op in a row (they share its inputs). Bench ops with an op the
    table has no measurement of go first (a rerun after a sweep cut short by its time budget
    starts where that one stopped); then the smaller spaces (`sizes`: {tuning op: points of its
    space}, summed per bench op): an op that finishes within its share of the budget leaves the
    rest to the larger ones after it; then in the order first seen."""
    bench = [o.partition(".")[2] for o in tuning_ops]
    first_seen = list(dict.fromkeys(bench))
    todo = {b for b, o in zip(bench, tuning_ops) if o not in measured}
    size = dict.fromkeys(first_seen, 0)
    for b, o in zip(bench, tuning_ops):
        size[b] += (sizes or {}).get(o, 0)

    def key(o):
        b = o.partition(".")[2]
        return b not in todo, size[b], first_seen.index(b)
    return sorted(tuning_ops, key=key)


def space_sizes():
    """{tuning op: the number of points of its space} of every registered op."""
    return {op: math.prod(len(v) for v in s.values()) for op, s in _tuning().spaces().items()}


def main(args):
    """The --sweep command (args from bench.__main__'s parser); exit status 1 if a candidate FAILed."""
    t0 = time.monotonic()
    deadline = t0 + args.budget_s if args.budget_s else None
    env = harness.Env(force_cpu=args.cpu, interpret=True)
    if not env.cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels are defined
    for name, err in import_kernels().items():
        print(f"sweep: {name} does not import ({err}); its ops are not swept", file=sys.stderr)
    registered = list(_tuning().spaces())
    tuning_ops = select(args.ops, registered)
    os.makedirs(args.out, exist_ok=True)
    sink = os.path.join(args.out, "sweep.jsonl")
    open(sink, "w").close()
    print(f"sweep: {len(tuning_ops)} op(s) on {env.device_name()}: {', '.join(tuning_ops) or 'none registered'}",
          file=sys.stderr, flush=True)
    timing = TIMING[env.device]
    tuned_dir = args.tuned_dir or (ROOT_TUNED if env.cuda else os.path.join(args.out, "tuned"))
    records = []
    shared = {}
    order = sweep_order(tuning_ops, _measured_ops(env.device_name(), tuned_dir), space_sizes())
    for i, op in enumerate(order):
        if shared and next(iter(shared)).op != op.partition(".")[2]:
            shared.clear()
            harness.free(env)
        now = time.monotonic()  # this op's share: an equal part of what is left
        share = None if deadline is None else now + max(0.0, deadline - now) / (len(order) - i)
        records += sweep_op(op, env, timing, tuned_dir, shared, sink, share)
    text = report_text(records) if tuning_ops else "nothing swept: no kernel module registered a tuning space"
    if deadline is not None and time.monotonic() > deadline:
        text += f"\n(the time budget of {args.budget_s:g} s ran out: candidates not measured are left out)"
    path = write_tuned(records, env.device_name(), tuned_dir)
    text += f"\ntuned table: {path}" if path else "\ntuned table: not written (no winner)"
    copy_dir = os.path.join(args.out, "tuned")
    if path and os.path.abspath(tuned_dir) != os.path.abspath(copy_dir):  # a copy travels with OUT
        os.makedirs(copy_dir, exist_ok=True)
        shutil.copy(path, copy_dir)
        text += f" (a copy in {copy_dir})"
    with open(os.path.join(args.out, "sweep.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"sweep: {len(records)} records in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 1 if any(r["status"] == "FAIL" for r in records) else 0
