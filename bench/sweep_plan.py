"""The sweep's candidates of an op, in order of expected gain, without the ones that cannot
change anything at the sweep's shapes.

Order: the start point first; then one parameter at a time (the rest held at the start), the
parameters in PRIORITY's order (the most promising first), each parameter's values in its
space's order. A parameter PRIORITY does not name comes after those it names.

Dropped, with the reason (bench/sweep.py prints each):
- a candidate that launches, at every sweep shape, what an earlier kept candidate launches:
  same kernel, compile-time constants, warps, stages and grid (ops with a pure launch function
  here, LAUNCHES: the Triton and the CUDA C cross-entropy). E.g. single_pass_max where no row
  fits, rows_per_program on the chunked kernel, chunk_bytes or warps where the row kernel runs.
- programs_per_sm values above what an SM holds of the start point's wide kernel at every
  shape that runs one, by the registers and shared memory of its sm_90 compile
  (bench/sm90_kernels.json): programs beyond those an SM holds wait for a slot and add no
  loads in flight.
"""
from __future__ import annotations

from . import ops, sm90

#: Parameters by expected gain, most first. Cross-entropy is memory-bound (run 1 on an H100: the
#: Triton kernel moved 1.66 TB/s at 8192x32000 bf16 against a 2.95 TB/s copy), so the loads in
#: flight decide: software pipelining (num_stages), more resident programs, wider loads, then
#: the kernel's shape; the count launch and the on-chip row threshold last. The linear backward:
#: the route (fused or cuBLAS) decides most, then the tile, the splits, the persistent grid.
PRIORITY = {
    "triton.softmax_cross_entropy": ("num_stages", "programs_per_sm", "chunk_bytes", "warps", "wide_kernel",
                                     "rows_per_program", "count", "single_pass_max"),
    "cupy.softmax_cross_entropy": ("blocks_per_sm", "vec_bytes", "threads_per_row", "pass2", "warps_per_block",
                                   "warp_row_max_cols"),
    "triton.linear_backward": ("route", "tile_16bit", "split_dw", "split_dx", "programs_per_sm", "tile_fp32",
                               "fp32_ieee_route"),
    # The LM head: the schedule first (the byte-and-FLOP model, bench/lm_head_model.py, puts the
    # one-pass "token_lse" ahead of "token" at every chunk: one read of each logits chunk less),
    # then the chunk (4096 rows halve the fp32 dw accumulator's passes; the buffer doubles). Its
    # 2 x 2 space is within the sweep's GRID_MAX, so the sweep times the full grid in any order.
    "triton.linear_cross_entropy": ("schedule", "rows_per_chunk"),
}
SM_COUNT = 132  # H100 SXM and H200: the grids of the launch functions


def _triton_ce(case, params, sm_count):
    from gpuad.kernels.triton import cross_entropy_rows as rows
    n_rows, n_cols = case.dims
    elem = 2 if case.dtype in ("bfloat16", "float16") else 4
    kernel, meta = rows._kernel_config(n_rows, n_cols, n_cols, elem, grad=True, reduction="mean",
                                       label_smoothing=0.0, params=params)
    grid = rows._grid(kernel, meta, n_rows, sm_count, params)
    return kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__, meta, grid


def _cupy_ce(case, params, sm_count):
    from gpuad.kernels.cupy import cross_entropy as cce
    name, grid, block = cce.row_launch(*case.dims, case.dtype, params, sm_count)
    return name, {"block": block, "pass2": params["pass2"]}, grid


def lce_kernels(case, params):
    """{(kernel name, dtype, compile-time meta)}: the Triton kernels the LM head launches at a
    bench case (the bench's options: no bias, smoothing, z-loss, soft-cap or class weights) in
    `params`' schedule, from its steps' own kernel_metas; cuBLAS does the rest."""
    import importlib

    import torch
    lce = importlib.import_module("gpuad.kernels.triton.linear_cross_entropy")  # the module, not the function
    metas = lce.STEPS[params["schedule"]].kernel_metas(
        case.dims[2], getattr(torch, case.dtype), has_bias=False, smoothing=0.0, z_coef=0.0, softcap=None, grad=True,
        row_scale=False, allow_tf32=False, has_weight=False)
    return {(name, case.dtype, tuple(sorted(meta.items()))) for name, meta in metas.items()}


#: tuning op -> (case, params, sm_count) -> (kernel name, compile-time meta, grid): what the
#: launcher launches, from its own pure launch function.
LAUNCHES = {"triton.softmax_cross_entropy": _triton_ce, "cupy.softmax_cross_entropy": _cupy_ce}


def launch_key(tuning_op, case, params, sm_count=SM_COUNT):
    fn = LAUNCHES.get(tuning_op)
    if fn is None:
        return None
    name, meta, grid = fn(case, params, sm_count)
    return name, tuple(sorted(meta.items())), tuple(grid)


def ordered(space, start, tuning_op):
    """The start point, then one parameter at a time in PRIORITY's order."""
    prio = PRIORITY.get(tuning_op, ())
    names = sorted(space, key=lambda k: prio.index(k) if k in prio else len(prio))
    out = [dict(start)]
    for k in names:
        out += [dict(start, **{k: v}) for v in space[k] if v != start[k]]
    return out


def _max_programs(tuning_op, cases, start, table):
    """Programs an SM holds of the start point's wide kernel, the most over the cases that run
    one; None when unknown (a kernel the table lacks) or when no case runs a wide kernel."""
    if tuning_op != "triton.softmax_cross_entropy" or table is None:
        return None
    most = None
    for case in cases:
        name, meta, _ = _triton_ce(case, start, SM_COUNT)
        if name == "_ce_rows_kernel":
            continue
        entry = sm90.lookup(table, name, case.dtype, meta)
        if entry is None:
            return None
        most = max(most or 0, entry["blocks_per_sm"])
    return most


def candidates(tuning_op, space, start, cases, table=None):
    """(kept, dropped): the candidates to time in order, and [(params, reason)] of the others."""
    kept, dropped, seen = [], [], {}
    most = _max_programs(tuning_op, cases, start, table)
    for params in ordered(space, start, tuning_op):
        if most is not None and params.get("programs_per_sm", 0) > max(most, start.get("programs_per_sm", 1)):
            dropped.append((params, f"an SM holds at most {most} program(s) of the start point's wide kernel "
                                    "(registers and shared memory of its sm_90 compile)"))
            continue
        keys = [launch_key(tuning_op, c, params) for c in cases] if tuning_op in LAUNCHES else None
        if keys is not None and tuple(map(repr, keys)) in seen:
            dropped.append((params, f"launches what {seen[tuple(map(repr, keys))]} launches at every sweep shape"))
            continue
        if keys is not None:
            seen[tuple(map(repr, keys))] = _label(params, start)
        kept.append(params)
    return kept, dropped


def _label(params, start):
    diff = {k: v for k, v in params.items() if start.get(k) != v}
    return " ".join(f"{k}={v}" for k, v in diff.items()) or "the start point"


def gpu_cases(bench_op):
    return ops.cases_for("quick", True, [bench_op])
