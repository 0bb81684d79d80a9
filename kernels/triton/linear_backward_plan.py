"""How a call of ``linear_backward`` is resolved: the route, the tile and split, the grid and the
kernel's scalar arguments, once per problem (a plan), with the tuning values and, on a GPU, the
measurements that choose between candidates.

Routes. route="fused" is the one Triton launch. route="cublas" is torch's matmuls (cuBLAS on a GPU)
for dX and dW plus torch's column sum for db (fp32 accumulation inside, one rounding), with fp32
accumulation pinned for the call (TF32 and reduced-precision cuBLAS reductions off, only where the
global torch state differs). route="auto" (the default) does what the tuning parameter "route" says:
"measure" (default) times the fused kernel (its tile and split candidates) and cuBLAS on the first call
of each problem, as an autotuner does, keeps the fastest and reports the timings in route_choices()
and fused_choices(). Without measuring (the interpreter, or GPUAD_TRITON_AUTOTUNE=0, read when a
problem is first planned) "auto" takes the fused route with the default tile. It takes the fused
route untimed when fp16/bf16 products go into an fp32 dw_accumulate (cuBLAS cannot add them to an
fp32 buffer without rounding them first). Under the Triton interpreter bf16 tl.dot returns wrong numbers (an
interpreter limit), so the fused route refuses bf16 there and "auto" takes cuBLAS (torch on the CPU).

Tuning. Every launch parameter is declared with gpuad.kernels.tuning as op "triton.linear_backward"
(TUNING_SPACE, defaults TUNING_DEFAULTS) and read per device: a checked-in table of the GPU, an active
tuning.override(...), or the defaults: every tile of the element size timed on a problem's first
call, route "measure", and split "auto" (timed against no split where it splits).

Per-call cost. Everything that depends only on the problem (shapes, strides, dtype, device, flags,
tuning values) is resolved once into a plan, cached by a key built from attributes the call reads
anyway; the argument checks, the route, the tile and split choice, the grid and the kernel's scalar
arguments all live in the plan, and its kernel is bound once (interop.Launch: later calls hand the
compiled kernel's launch function the argument list directly, without JITFunction.run). A call
then costs the key, one dict lookup, the output allocations and the launch: about 7 µs of CPU time
with only the driver's launch stubbed (python -m bench --host-overhead; bench/RESULTS.md).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import NamedTuple

import torch

from gpuad.kernels import checks, tuning

from .interop import INTERPRETED, Launch, as_torch, check_device, current_stream, device_info
from .linear_backward_kernel import (FMA_COMPUTE_BOUND_FLOPS, INTERPRETER_TILE, OP, TILE_PARAM, TILES, Tile,
                                     _linear_backward_kernel, constexprs, geometry, split_factors, tile_meta,
                                     tiles_for)
from .precision import pinned_fp32_accumulation


def _max_offset(t) -> int:
    return sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)



def _autotune_enabled() -> bool:
    """Whether the first call of a problem may time candidates (on a GPU, GPUAD_TRITON_AUTOTUNE
    not 0; read when a problem is planned, see clear_plans)."""
    return not INTERPRETED and os.environ.get("GPUAD_TRITON_AUTOTUNE", "1") != "0"


_workspaces: dict = {}  # (device index, stream) -> (fp32 workspace, int32 counters)
_outgrown: list = []    # workspaces replaced by larger ones, kept alive for captured CUDA graphs

def _workspace(device: torch.device, ws_elems: int, cnt_elems: int):
    """(fp32 workspace ≥ ws_elems, zeroed int32 counters ≥ cnt_elems) of the current stream."""
    key = (device.index, current_stream(device))
    have = _workspaces.get(key)
    if have is None or have[0].numel() < ws_elems or have[1].numel() < cnt_elems:
        if have is not None:
            _outgrown.append(have)
            ws_elems, cnt_elems = max(ws_elems, have[0].numel()), max(cnt_elems, have[1].numel())
        have = _workspaces[key] = (torch.empty(max(ws_elems, 1), dtype=torch.float32, device=device),
                                   torch.zeros(max(cnt_elems, 1), dtype=torch.int32, device=device))
    return have


# --------------------------------------------------------------------------------------------
# Routes
def _launch_cublas(x2, w, dy2, dw_acc, need_dx, bias, allow_tf32):
    """(dx2, dw, db) through torch (cuBLAS on a GPU): dx2 = dy2 @ w, dw = dy2ᵀ @ x2 (or dw_acc += it:
    fp32 inputs only, one GEMM with beta = 1), db = torch's column sum (fp32 accumulation)."""
    with pinned_fp32_accumulation(x2.dtype, allow_tf32):
        dx2 = torch.mm(dy2, w) if need_dx else None
        dw = dw_acc.addmm_(dy2.t(), x2) if dw_acc is not None else torch.mm(dy2.t(), x2)
    return dx2, dw, (torch.sum(dy2, 0) if bias else None)


def _launch_kernel(launcher, args, meta):
    """The hand-off to Triton (one place, so a test can stub the launch): `launcher` is the
    plan's interop.Launch, bound to `meta`."""
    launcher(*args)


# --------------------------------------------------------------------------------------------
# Plans: everything resolved once per problem

class _Problem(NamedTuple):
    m: int
    n: int
    k: int
    dtype: torch.dtype
    device: torch.device
    need_dx: bool
    bias: bool
    accumulate: bool
    allow_tf32: bool  # only ever True for fp32
    lead: tuple  # x's leading dims (dx is reshaped to them)


class _Plan:
    """A resolved call: the route ("fused", "cublas", or "empty" when M, N or K is 0), and for the
    fused route the tile, splits, grid and the kernel's scalar arguments. __call__ takes the
    caller's torch tensors and returns (dx, dw, db)."""

    def __init__(self, prob: _Problem, route: str, views=(False, False), tile: Tile | None = None,
                 splits=(1, 1), programs: int = 1, strides: tuple = (), int64: bool = False):
        self.prob, self.route, self.views, self.tile, self.name = prob, route, views, tile, route
        # Triton launches on the current device: worth a check per call only with several GPUs
        self.switch_device = route == "fused" and prob.device.type == "cuda" and torch.cuda.device_count() > 1
        if route != "fused":
            return
        m, n, k = prob.m, prob.n, prob.k
        g = self.geo = geometry(m, n, k, tile, splits, programs, prob.need_dx, prob.bias)
        self.name = f"fused {tile.name} split {g.splits_w}x{g.splits_x}"
        self.meta = dict(constexprs(prob.dtype, need_dx=prob.need_dx, bias=prob.bias, accumulate=prob.accumulate,
                                    allow_tf32=prob.allow_tf32, int64=int64, split_w=g.splits_w > 1,
                                    split_x=g.splits_x > 1), **tile_meta(tile))
        self.scalars = (m, n, k) + strides + (g.p_dw, g.splits_w, g.chunk_w, g.splits_x, g.chunk_x,
                                              g.ws_db_off, g.ws_dx_off, g.cnt_db_off, g.cnt_dx_off)
        self.launcher = Launch(_linear_backward_kernel, (g.grid,), self.meta,
                               check=(0, 1, 2, 3, 4) if prob.accumulate else (0, 1, 2))  # the caller's buffers
        self.dx_shape, self.dw_shape, self.db_shape = prob.lead + (k,), (n, k), (n,)
        self.dx_strides = tuple(math.prod(self.dx_shape[i + 1:]) for i in range(len(self.dx_shape)))
        self.like = (False, False)  # set by _make_plan: whether x and w are contiguous (empty_like makes dx, dw)

    def launch(self, x2, w, dy2, dx2, dw, db):
        """The fused launch into preallocated outputs (dx2 / db None: skipped)."""
        g = self.geo
        if g.ws_elems:
            ws, cnt = _workspace(x2.device, g.ws_elems, g.cnt_elems)
        else:
            ws = cnt = dw  # placeholders, never touched without a split
        _launch_kernel(self.launcher, (x2, w, dy2, dw if dx2 is None else dx2, dw, dw if db is None else db,
                                       ws, cnt) + self.scalars, self.meta)

    def __call__(self, x, w, dy, acc_t):
        p = self.prob
        if self.route == "fused":  # the kernel reads pointers and the plan's strides: no reshape when
            x2 = x if self.views[0] else x.reshape(p.m, p.k)  # the 2-D view of x (or dy) exists
            dy2 = dy if self.views[1] else dy.reshape(p.m, p.n)
            # torch.empty_like of a plain contiguous input of the output's shape: the cheapest allocation
            dtype, device, like = p.dtype, p.device, self.like
            dx = ((torch.empty_like(x) if like[0] and type(x) is torch.Tensor else
                   torch.empty_strided(self.dx_shape, self.dx_strides, dtype=dtype, device=device))
                  if p.need_dx else None)
            dw = acc_t if p.accumulate else (
                torch.empty_like(w) if like[1] and type(w) is torch.Tensor else
                torch.empty_strided(self.dw_shape, (p.k, 1), dtype=dtype, device=device))
            db = torch.empty_strided(self.db_shape, (1,), dtype=dtype, device=device) if p.bias else None
            self.launch(x2, w, dy2, dx, dw, db)
            return dx, dw, db
        flat = self.views[0] and x.dim() == 2  # 2-D inputs: no reshape
        x2 = x if flat else x.reshape(p.m, p.k)
        dy2 = dy if flat else dy.reshape(p.m, p.n)
        if self.route == "cublas":
            dx2, dw, db = _launch_cublas(x2, w, dy2, acc_t, p.need_dx, p.bias, p.allow_tf32)
        else:  # "empty": the empty sums are zeros; db still sums dy when only K is 0
            dx2 = torch.zeros((p.m, p.k), dtype=p.dtype, device=p.device) if p.need_dx else None
            dw = acc_t if p.accumulate else torch.zeros((p.n, p.k), dtype=p.dtype, device=p.device)
            db = torch.sum(dy2, 0, dtype=torch.float32).to(p.dtype) if p.bias else None
        return (dx2 if flat or dx2 is None else dx2.view(p.lead + (p.k,))), dw, db


#: route key -> (route taken, {route: median ms}), filled by route="auto" on first use.
_route_choices: dict = {}
#: route key -> (fused candidate taken, {candidate: median ms}), filled when candidates were timed.
_fused_choices: dict = {}
_plans: dict = {}  # plan key (see linear_backward) -> _Plan
_measured: dict = {}  # (route key, candidate launch ids) -> name of the plan the timing chose
_times: dict = {}  # route key -> {launch id: median ms}, every launch timed so far
_MAX_PLANS = 4096
ROUTES = ("auto", "fused", "cublas")


def clear_plans() -> None:
    """Forget the resolved plans (not the measurements): the next call of each problem plans
    again, reading GPUAD_TRITON_AUTOTUNE and the tuning tables anew."""
    _plans.clear()


def route_choices() -> dict:
    """What route="auto" chose so far: {(device, dtype, M, N, K, need_dx, bias, accumulate, tf32,
    x strides, w strides, dy strides): (route, {route: median ms})}; {} of timings where the route
    was taken without measuring (fp32 without TF32 at compute-bound sizes)."""
    return dict(_route_choices)


def fused_choices() -> dict:
    """The fused candidates timed so far (same keys): (candidate taken, {candidate: median ms}),
    a candidate named "fused <tile> split <S_w>x<S_x>"."""
    return dict(_fused_choices)


def _fastest(launchers: dict) -> tuple[str, dict]:
    """(name of the fastest, {name: median ms}) of no-argument launchers, each called once first
    (compiles) and then timed with triton.testing.do_bench."""
    from triton.testing import do_bench

    times = {}
    for name, launch in launchers.items():
        launch()
        times[name] = float(do_bench(launch, warmup=5, rep=30, return_mode="median"))
    return min(times, key=times.get), times


def _candidates(prob: _Problem, params: dict, programs: int, measuring: bool) -> list:
    """[(tile, (S_w, S_x))] the fused route may take, the default first."""
    size = prob.dtype.itemsize
    choice = params[TILE_PARAM[size]]
    if choice != "autotune":
        tiles = [t for t in TILES if t.name == choice]
    elif measuring:
        tiles = list(tiles_for(size))
    else:
        tiles = [INTERPRETER_TILE if INTERPRETED else tiles_for(size)[0]]
    out = []
    for tile in tiles:
        auto = split_factors(prob.m, prob.n, prob.k, tile, programs, prob.need_dx)
        asked = tuple(auto[i] if params[p] == "auto" else params[p]
                      for i, p in enumerate(("split_dw", "split_dx")))
        out.append((tile, asked))
        if measuring and asked != (1, 1) and "auto" in (params["split_dw"], params["split_dx"]):
            out.append((tile, tuple(1 if params[p] == "auto" else asked[i]
                                    for i, p in enumerate(("split_dw", "split_dx")))))
    return list(dict.fromkeys(out))


def auto_route(prob: _Problem, params: dict, *, on_gpu: bool, measuring: bool) -> str:
    """What route="auto" does for a problem: "fused", "cublas", or "measure" (time both)."""
    if prob.accumulate and prob.dtype != torch.float32:
        if INTERPRETED and prob.dtype == torch.bfloat16:
            raise NotImplementedError(
                "bfloat16 with dw_accumulate needs the fused route, which the Triton interpreter "
                "(TRITON_INTERPRET=1) cannot run: its tl.dot does not support bfloat16; run it on a GPU")
        return "fused"  # cuBLAS cannot add 16-bit products into fp32 without rounding them first
    if INTERPRETED and prob.dtype == torch.bfloat16:
        return "cublas"  # the interpreter's bf16 tl.dot returns wrong numbers
    rule = params["fp32_ieee_route"]
    if on_gpu and prob.dtype == torch.float32 and not prob.allow_tf32 and (
            rule == "cublas" or (rule == "cublas_if_compute_bound"
                                 and 4.0 * prob.m * prob.n * prob.k >= FMA_COMPUTE_BOUND_FLOPS)):
        return "cublas"  # FMA units either way, and cuBLAS SGEMM uses them better
    if params["route"] != "measure":
        return params["route"]
    return "measure" if measuring else "fused"


def _check_args(x, w, dy, acc_t, route):
    """The checks of a call that depend on more than shapes and dtypes: devices, the route."""
    checks.check_linear_backward_args(x, w, dy, acc_t, allowed=checks.GPU_DTYPES)
    device = x.device
    for name, t in (("w", w), ("dy", dy), ("dw_accumulate", acc_t)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, x on {device}: all arrays must share one device")
    check_device(device)
    dtype = x.dtype
    accumulate = acc_t is not None
    if route == "cublas" and accumulate and dtype != torch.float32:
        raise ValueError(f"route='cublas' cannot add {dtype} products into the fp32 dw_accumulate without "
                         "rounding them first: use route='fused' or 'auto'")


def _make_plan(x, w, dy, acc_t, bias, need_dx, allow_tf32, route) -> _Plan:
    """Check the arguments and resolve the call (measuring routes and candidates on the GPU)."""
    _check_args(x, w, dy, acc_t, route)
    device, dtype, accumulate = x.device, x.dtype, acc_t is not None
    n, k = w.shape
    lead = tuple(x.shape[:-1])
    m = math.prod(lead)
    tf32 = bool(allow_tf32) and dtype == torch.float32
    prob = _Problem(m, n, k, dtype, device, need_dx, bias, accumulate, tf32, lead)
    if m == 0 or n == 0 or k == 0:
        return _Plan(prob, "empty")
    interpreter_bf16 = INTERPRETED and dtype == torch.bfloat16
    if route == "fused" and interpreter_bf16:
        raise NotImplementedError(
            "bfloat16 inputs cannot take route='fused' under the Triton interpreter (TRITON_INTERPRET=1): "
            "its tl.dot does not support bfloat16 and returns wrong numbers; run bf16 on a GPU, or use "
            "route='cublas' (torch)")
    x2, dy2 = x.reshape(m, k), dy.reshape(m, n)
    # whether the 2-D views exist: then the kernel reads the given tensors with the views' strides
    views = tuple(a.data_ptr() == b.data_ptr() and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                  for a, b in ((x2, x), (dy2, dy)))
    index = device.index if device.type == "cuda" else None
    gpu_name, n_sm = device_info(device)
    params = tuning.values(OP, gpu_name)
    measuring = _autotune_enabled() and device.type == "cuda"
    key = (index, checks.dtype_name(dtype), m, n, k, need_dx, bias, accumulate, tf32,
           x2.stride(), w.stride(), dy2.stride())

    if route == "auto":
        route = auto_route(prob, params, on_gpu=device.type == "cuda", measuring=measuring)
        if route == "cublas" and not interpreter_bf16:
            _route_choices[key] = ("cublas", {})  # taken by rule, nothing timed
        elif route == "measure":
            route = "auto"  # measured below, with the fused candidates
    if route == "cublas":
        return _Plan(prob, "cublas", views)

    programs = n_sm * params["programs_per_sm"]
    dw_strides = acc_t.stride() if accumulate else (k, 1)
    strides = x2.stride() + w.stride() + dy2.stride() + (k, 1) + tuple(dw_strides)
    biggest = max(_max_offset(x2), _max_offset(w), _max_offset(dy2), m * k - 1,
                  _max_offset(acc_t) if accumulate else n * k - 1)

    def fused(tile, splits):
        plan = _Plan(prob, "fused", views, tile, splits, programs, strides, biggest >= 2**31 - 1)
        if plan.geo.ws_elems >= 2**31 - 1 and not plan.meta["INT64"]:  # the workspace's offsets too
            plan = _Plan(prob, "fused", views, tile, splits, programs, strides, True)
        return plan

    plans = [fused(tile, splits) for tile, splits in _candidates(prob, params, programs, measuring)]
    for plan in plans:
        plan.like = (x.is_contiguous(), w.is_contiguous())
    plans = list({p.name: p for p in plans}.values())  # candidates that came out the same
    if not measuring or (len(plans) == 1 and route == "fused"):
        return plans[0]
    return _measure(plans, route, key, x2, w, dy2, acc_t)


def _measure(plans: list, route: str, key: tuple, x2, w, dy2, acc_t) -> _Plan:
    """The fastest of the fused `plans` (and, for route "auto", of cuBLAS) on the 2-D inputs.
    Times are kept per problem and launch (a sweep's candidates share the tiles they have in
    common, and cuBLAS is timed once a problem): only launches not yet timed are timed. The
    choice is kept per (problem, set of candidate launches); the timings go to fused_choices and
    route_choices."""
    prob = plans[0].prob
    views = plans[0].views
    ids = {p.name: _launch_id(p) for p in plans}
    if route == "auto":
        ids["cublas"] = "cublas"
    memo = (key, frozenset(ids.values()))
    if memo in _measured:  # chosen before (the plan was evicted or cleared since)
        return next((p for p in plans if p.name == _measured[memo]), None) or _Plan(prob, "cublas", views)
    timed = _times.setdefault(key, {})  # launch id (_launch_id) -> median ms
    todo = [name for name, i in ids.items() if i not in timed]
    if todo:
        timed.update((ids[name], ms) for name, ms in _time_launches(plans, todo, x2, w, dy2, acc_t).items())
    times = {name: timed[i] for name, i in ids.items()}
    fused_times = {name: ms for name, ms in times.items() if name != "cublas"}
    best = min(fused_times, key=fused_times.get)
    if len(plans) > 1:
        _fused_choices[key] = (best, fused_times)
    if route == "auto":
        route = "cublas" if times["cublas"] < fused_times[best] else "fused"
        _route_choices[key] = (route, {"fused": fused_times[best], "cublas": times["cublas"]})
        if route == "cublas":
            _measured[memo] = "cublas"
            return _Plan(prob, "cublas", views)
    _measured[memo] = best
    return next(p for p in plans if p.name == best)


def _launch_id(plan: _Plan) -> tuple:
    """What makes two fused plans of one problem the same launch: the tile, the splits, the grid
    and every scalar argument (programs_per_sm changes the grid, not the name)."""
    return plan.name, plan.geo.grid, plan.scalars, tuple(sorted(plan.meta.items()))


def _time_launches(plans: list, names: list, x2, w, dy2, acc_t) -> dict:
    """{name: median ms} of the named fused plans (and "cublas") on scratch outputs (a copy of
    the caller's accumulation buffer, which is added to exactly once, after the choice)."""
    prob = plans[0].prob
    m, n, k, dtype, device = prob.m, prob.n, prob.k, prob.dtype, prob.device
    dx_s = torch.empty((m, k), dtype=dtype, device=device) if prob.need_dx else None
    dw_s = acc_t.clone() if prob.accumulate else torch.empty((n, k), dtype=dtype, device=device)
    db_s = torch.empty((n,), dtype=dtype, device=device) if prob.bias else None
    launchers = {p.name: functools.partial(p.launch, x2, w, dy2, dx_s, dw_s, db_s) for p in plans if p.name in names}
    if "cublas" in names:
        launchers["cublas"] = functools.partial(_launch_cublas, x2, w, dy2, dw_s if prob.accumulate else None,
                                                prob.need_dx, prob.bias, prob.allow_tf32)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return _fastest(launchers)[1]


def _to_torch(x, w, dy, dw_accumulate):
    """(x, w, dy, dw_accumulate as torch tensors, from_cupy): CuPy arrays through DLPack."""
    given = [as_torch(a) for a in (x, w, dy)]
    acc_t, acc_cupy = as_torch(dw_accumulate) if dw_accumulate is not None else (None, given[0][1])
    if len({flag for _, flag in given} | {acc_cupy}) != 1:
        raise ValueError("x, w, dy and dw_accumulate must all be torch tensors or all CuPy arrays")
    return given[0][0], given[1][0], given[2][0], acc_t, given[0][1]


def plan_for(x, w, dy, bias, dw_accumulate, need_dx, allow_tf32, route):
    """(plan, (x, w, dy, dw_accumulate) as torch tensors, from_cupy), the plan from the cache."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and isinstance(dy, torch.Tensor)
            and (dw_accumulate is None or isinstance(dw_accumulate, torch.Tensor))):
        acc, from_cupy = dw_accumulate, False
    else:
        x, w, dy, acc, from_cupy = _to_torch(x, w, dy, dw_accumulate)
    # Everything _make_plan checks and decides from is in the key, so a hit needs no checks.
    key = (x.shape, x.stride(), x.dtype, x.device, w.shape, w.stride(), w.dtype, w.device,
           dy.shape, dy.stride(), dy.dtype, dy.device,
           None if acc is None else (acc.shape, acc.stride(), acc.dtype, acc.device),
           bias, need_dx, allow_tf32, route, tuning.active_overrides(OP), tuning.generation)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= _MAX_PLANS:
            del _plans[next(iter(_plans))]
        plan = _plans[key] = _make_plan(x, w, dy, acc, bool(bias), bool(need_dx), bool(allow_tf32), route)
    return plan, (x, w, dy, acc), from_cupy


def plan_name(x, w, dy, *, bias=True, dw_accumulate=None, need_dx=True, allow_tf32=False, route="auto") -> str:
    """What linear_backward with these arguments launches: "fused <tile> split <S_w>x<S_x>",
    "cublas", or "empty" (M, N or K is 0). Plans (and, on a GPU, measures) like the first call."""
    return plan_for(x, w, dy, bias, dw_accumulate, need_dx, allow_tf32, route)[0].name
