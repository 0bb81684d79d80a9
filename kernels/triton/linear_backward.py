"""Fused backward of a linear layer, y = x wᵀ + b, as ONE persistent Triton launch.

    x [..., K], w [N, K], dy [..., N]   (fp32 / fp16 / bf16, one dtype; leading dims flattened to M)
    dx = dy w     [..., K]   (skipped when need_dx=False)
    dw = dyᵀ x    [N, K]     (or dw_accumulate += dyᵀ x, an fp32 [N, K] buffer, in place)
    db = Σ_M dy   [N]        (skipped when bias=False)

Both gradients are the same shape of problem, C[rows, K] = A[rows, red] @ B[red, K]:
  dX tiles:  A = dy  [M, N],  B = w [N, K],  reduce over N
  dW tiles:  A = dyᵀ [N, M],  B = x [M, K],  reduce over M   (+ db = row sums of A)
so one tile routine serves both families; strides make transposes (dyᵀ, or a w that is itself
a transposed view) free. The grid is persistent: min(#SMs, #tiles) programs, split between the
two families in proportion to their work (the dW tiles reduce over M, the dX tiles over N, so a
tile of one family can cost far more than a tile of the other). Each program walks its family's
tiles in grouped (L2-friendly) order, stepping by the number of programs of that family.

db is fused into the dW family: the dW tiles of the first K-block already load every dy tile
of their N-rows (as A = dyᵀ), so they also sum them over M and write db. No extra pass over dy,
no atomics: every output tile is written by exactly one program, in a fixed reduction order,
so the result is the same bits on every run (for a given autotuned config).

Routes. `route="fused"` is that one launch. `route="cublas"` is torch's matmuls (cuBLAS on a
GPU) for dX and dW plus an fp32 column sum for db, with fp32 accumulation pinned for the call.
`route="auto"` (the default) measures both on the first call of each problem, as the autotuner
does for tile configs, keeps the faster, and reports the timings in `route_choices()`; it takes
the fused route without measuring under the interpreter, with GPUAD_TRITON_AUTOTUNE=0, and when
fp16/bf16 products go into an fp32 dw_accumulate (cuBLAS cannot add them to an fp32 buffer
without rounding them first).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from gpuad.kernels import checks

from .interop import as_given, as_torch

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_DTYPES = ("float16", "bfloat16", "float32")


# Tile configs: (BLOCK_R, BLOCK_C, BLOCK_RED, num_stages, num_warps) -> the input element sizes
# they serve. The first config of each size is its fixed default. Picked from ahead-of-time
# compiles for sm_90 (tests/test_triton_compile.py): the defaults spill nothing (or a few
# bytes) with 16-byte-aligned strides; fp32 tiles reduce over 32 because the fp32 / tf32 dots
# hold far more registers (the 128×128×64 and 64×128×64 fp32 tiles spilled 0.1 to 3.6 KB). The
# other configs are candidates the autotuner times (128×256×64 spills with bias: the sweep
# decides whether it still wins).
_TILES = {
    (128, 128, 64, 3, 8): (2,),    # fp16/bf16 default: wgmma tiles
    (128, 64, 32, 4, 8): (4,),     # fp32/tf32 default
    (128, 256, 64, 3, 8): (2,),    # large fp16/bf16 problems
    (64, 128, 64, 4, 4): (2,),     # mid-size fp16/bf16 problems: more tiles than SMs
    (128, 128, 32, 3, 8): (4,),    # large fp32 problems
    (64, 64, 32, 4, 4): (2, 4),    # small problems (e.g. 64×512×512)
}


def _tile_key(cfg) -> tuple:
    kw = cfg.kwargs
    return kw["BLOCK_R"], kw["BLOCK_C"], kw["BLOCK_RED"], cfg.num_stages, cfg.num_warps


def _configs():
    """Hopper-first configs (BLOCK_R × BLOCK_C output tile, BLOCK_RED reduction step), for
    every element size; _prune keeps those of the launch's.

    The interpreter gets one small config (no autotuning there). On the GPU, setting
    GPUAD_TRITON_AUTOTUNE=0 (read at each call) skips the sweep and launches a fixed
    default config, for quick checks."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_R": 32, "BLOCK_C": 32, "BLOCK_RED": 16, "GROUP": 2},
                              num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_R": br, "BLOCK_C": bc, "BLOCK_RED": bred, "GROUP": 8},
                          num_warps=warps, num_stages=stages)
            for br, bc, bred, stages, warps in _TILES]


def _prune(configs, named_args, **kwargs):
    """The configs for the inputs' element size (all of them under the interpreter)."""
    size = named_args["x_ptr"].element_size()
    keep = [c for c in configs if size in _TILES.get(_tile_key(c), (size,))]
    return keep or configs[:1]


@triton.jit
def _tile_matmul(a_ptr, sa_r, sa_red, b_ptr, sb_red, sb_c, R, RED, C, tile_r, tile_c,
                 ROWSUM: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_RED: tl.constexpr):
    """acc[BLOCK_R, BLOCK_C] = A[rows, :] @ B[:, cols] in fp32, reducing over RED;
    with ROWSUM also the fp32 row sums of A (db for the dW family). Offsets take the
    width of the strides (int64 when the launcher asked for it)."""
    rows = tile_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tile_c * BLOCK_C + tl.arange(0, BLOCK_C)
    # Clamp rows/cols into range so their loads need no mask (the store masks them out).
    rows = rows % R
    cols = cols % C
    red = tl.arange(0, BLOCK_RED)
    a_ptrs = a_ptr + rows[:, None] * sa_r + red[None, :] * sa_red
    b_ptrs = b_ptr + red[:, None] * sb_red + cols[None, :] * sb_c
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    rowsum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for r0 in range(0, RED, BLOCK_RED):
        in_red = red < RED - r0
        a = tl.load(a_ptrs, mask=in_red[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=in_red[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if ROWSUM:
            rowsum += tl.sum(a.to(tl.float32), axis=1)
        a_ptrs += BLOCK_RED * sa_red
        b_ptrs += BLOCK_RED * sb_red
    return acc, rowsum


@triton.jit
def _grouped(t, tiles_r, tiles_c, GROUP: tl.constexpr):
    """Tile id -> (tile_r, tile_c), GROUP row-tiles at a time so neighbours share A and B in L2."""
    per_group = GROUP * tiles_c
    first_r = (t // per_group) * GROUP
    size = tl.minimum(tiles_r - first_r, GROUP)
    tile_r = first_r + (t % per_group) % size
    tile_c = (t % per_group) // size
    return tile_r, tile_c


@triton.jit
def _store_tile(c_ptr, sc_r, sc_c, R, C, tile_r, tile_c, acc, ACCUMULATE: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """C[tile] = acc (C[tile] += acc when ACCUMULATE), in C's dtype, masked to R × C."""
    rows = tile_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tile_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ptrs = c_ptr + rows[:, None] * sc_r + cols[None, :] * sc_c
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    if ACCUMULATE:
        acc += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


_CONFIGS = _configs()


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "PRECISION", "NEED_DX"],
                 prune_configs_by={"early_config_prune": _prune}, restore_value=["dw_ptr"])
@triton.jit
def _linear_backward_kernel(
        x_ptr, w_ptr, dy_ptr, dx_ptr, dw_ptr, db_ptr, M, N, K,
        sx_m, sx_k, sw_n, sw_k, sdy_m, sdy_n, sdx_m, sdx_k, sdw_n, sdw_k,
        NEED_DX: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
        PRECISION: tl.constexpr, INT64: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_RED: tl.constexpr, GROUP: tl.constexpr):
    if INT64:  # every offset (index × stride) then widens to 64 bits
        sx_m, sx_k, sw_n, sw_k = tl.cast(sx_m, tl.int64), tl.cast(sx_k, tl.int64), \
            tl.cast(sw_n, tl.int64), tl.cast(sw_k, tl.int64)
        sdy_m, sdy_n, sdx_m, sdx_k = tl.cast(sdy_m, tl.int64), tl.cast(sdy_n, tl.int64), \
            tl.cast(sdx_m, tl.int64), tl.cast(sdx_k, tl.int64)
        sdw_n, sdw_k = tl.cast(sdw_n, tl.int64), tl.cast(sdw_k, tl.int64)
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    tiles_c = tl.cdiv(K, BLOCK_C)
    tiles_n = tl.cdiv(N, BLOCK_R)
    tiles_m = tl.cdiv(M, BLOCK_R)
    n_dw = tiles_n * tiles_c
    # Programs [0, p_dw) do dW tiles, the rest dX tiles, split by work (tiles × reduction steps).
    # (Scalars are computed in float: M, N, K may be specialised to constexpr 1 on the GPU.)
    n_dx = tiles_m * tiles_c
    if NEED_DX:
        work_dw = n_dw * 1.0 * tl.cdiv(M, BLOCK_RED)
        work_dx = n_dx * 1.0 * tl.cdiv(N, BLOCK_RED)
        p_dw = (n_progs * (work_dw / (work_dw + work_dx)) + 0.5).to(tl.int32)
        p_dw = tl.minimum(tl.maximum(p_dw, tl.maximum(1, n_progs - n_dx)), tl.minimum(n_dw, n_progs - 1))
    else:
        p_dw = n_progs
    if pid < p_dw:
        for t in range(pid, n_dw, p_dw):
            tile_n, tile_k = _grouped(t, tiles_n, tiles_c, GROUP)
            with_db = False
            if HAS_BIAS:
                with_db = tile_k == 0
            if with_db:  # the first K-block of dW also sums its dy tiles over M: db
                acc, dbsum = _tile_matmul(dy_ptr, sdy_n, sdy_m, x_ptr, sx_m, sx_k, N, M, K, tile_n, tile_k,
                                          True, PRECISION, BLOCK_R, BLOCK_C, BLOCK_RED)
                offs_db = tile_n * BLOCK_R + tl.arange(0, BLOCK_R)
                tl.store(db_ptr + offs_db, dbsum.to(db_ptr.dtype.element_ty), mask=offs_db < N)
            else:
                acc, dbsum = _tile_matmul(dy_ptr, sdy_n, sdy_m, x_ptr, sx_m, sx_k, N, M, K, tile_n, tile_k,
                                          False, PRECISION, BLOCK_R, BLOCK_C, BLOCK_RED)
            # this program owns the tile: accumulating is a plain read-modify-write
            _store_tile(dw_ptr, sdw_n, sdw_k, N, K, tile_n, tile_k, acc, ACCUMULATE, BLOCK_R, BLOCK_C)
    else:
        for t in range(pid - p_dw, n_dx, n_progs - p_dw):
            tile_m, tile_k = _grouped(t, tiles_m, tiles_c, GROUP)
            acc, unused = _tile_matmul(dy_ptr, sdy_m, sdy_n, w_ptr, sw_n, sw_k, M, N, K, tile_m, tile_k,
                                       False, PRECISION, BLOCK_R, BLOCK_C, BLOCK_RED)
            _store_tile(dx_ptr, sdx_m, sdx_k, M, K, tile_m, tile_k, acc, False, BLOCK_R, BLOCK_C)


def _fixed_config(dtype: torch.dtype) -> triton.Config:
    """The config launched without the sweep (GPUAD_TRITON_AUTOTUNE=0): the first of the
    dtype's element size."""
    return _prune(_CONFIGS, {"x_ptr": torch.empty(0, dtype=dtype)})[0]


def _constexprs(dtype: torch.dtype, *, need_dx: bool, bias: bool, accumulate: bool, allow_tf32: bool,
                int64: bool) -> dict:
    """The kernel's flag constexprs for a launch (the tile sizes come from the config): a pure
    function, also used by the ahead-of-time compile test."""
    return dict(NEED_DX=bool(need_dx), HAS_BIAS=bool(bias), ACCUMULATE=bool(accumulate),
                PRECISION="tf32" if (allow_tf32 and dtype == torch.float32) else "ieee", INT64=bool(int64))


@functools.lru_cache(maxsize=None)
def _num_programs_max(device_index) -> int:
    """Persistent grid size: one program per SM (a few under the interpreter)."""
    if _INTERPRET or device_index is None:
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


ROUTES = ("auto", "fused", "cublas")
#: route key -> (route taken, {route: median ms}), filled by route="auto" on first use.
_route_choices: dict = {}


def route_choices() -> dict:
    """What route="auto" measured and chose so far: {(device, dtype, M, N, K, need_dx, bias,
    accumulate, tf32, x strides, w strides, dy strides): (route, {route: median ms})}."""
    return dict(_route_choices)


def _autotune_enabled() -> bool:
    return not _INTERPRET and os.environ.get("GPUAD_TRITON_AUTOTUNE", "1") != "0"


@contextlib.contextmanager
def _pinned_matmul_precision(allow_tf32: bool):
    """torch matmuls with fp32 accumulation for the call: fp32 products in ieee unless
    allow_tf32, and no reduced-precision (fp16/bf16) reductions. Global torch state: not
    thread-safe, restored on exit."""
    mm = torch.backends.cuda.matmul
    names = ["allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction"]
    wanted = [False, False]
    if hasattr(mm, "fp32_precision"):  # torch >= 2.9
        names.append("fp32_precision")
        wanted.append("tf32" if allow_tf32 else "ieee")
    else:
        names.append("allow_tf32")
        wanted.append(bool(allow_tf32))
    old = [getattr(mm, name) for name in names]
    try:
        for name, value in zip(names, wanted):
            setattr(mm, name, value)
        yield
    finally:
        for name, value in zip(names, old):
            setattr(mm, name, value)


def _launch_cublas(x2, wt, dy2, dx2, dw, db, accumulate, allow_tf32):
    """dx2 = dy2 wt, dw (+)= dy2ᵀ x2 through torch.mm (cuBLAS on a GPU), db = fp32 column sums
    of dy2; every output preallocated. Accumulating needs fp32 inputs (one GEMM with beta = 1)."""
    with _pinned_matmul_precision(allow_tf32):
        if dx2 is not None:
            torch.mm(dy2, wt, out=dx2)
        if accumulate:
            dw.addmm_(dy2.t(), x2)
        else:
            torch.mm(dy2.t(), x2, out=dw)
    if db is not None:
        db.copy_(dy2.sum(0, dtype=torch.float32))


def _faster_route(launchers: dict) -> tuple[str, dict]:
    """(name of the fastest, {name: median ms}) of no-argument launchers, each called once first
    (compiles, autotunes) and then timed with triton.testing.do_bench."""
    from triton.testing import do_bench

    times = {}
    for name, launch in launchers.items():
        launch()
        times[name] = float(do_bench(launch, warmup=5, rep=30, return_mode="median"))
    return min(times, key=times.get), times


def _max_offset(t) -> int:
    return sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)


def _launch_fused(x2, wt, dy2, dx2, dw, db, accumulate, allow_tf32):
    """The one persistent launch: dx2 [M, K] (None: skipped), dw [N, K] (+= when accumulate),
    db [N] (None: skipped), all preallocated; x2 [M, K], wt [N, K], dy2 [M, N] any strides."""
    (m, k), n = x2.shape, wt.shape[0]
    need_dx, bias = dx2 is not None, db is not None
    int64 = max(_max_offset(t) for t in (x2, wt, dy2, dw) + ((dx2,) if need_dx else ())) >= 2**31 - 1
    max_progs = _num_programs_max(x2.device.index if x2.device.type == "cuda" else None)

    def grid(meta):
        tiles_c = triton.cdiv(k, meta["BLOCK_C"])
        tiles = triton.cdiv(n, meta["BLOCK_R"]) * tiles_c
        if need_dx:
            tiles += triton.cdiv(m, meta["BLOCK_R"]) * tiles_c
            return (max(2, min(max_progs, tiles)),)
        return (min(max_progs, tiles),)

    kernel, fixed = _linear_backward_kernel, {}
    if not _INTERPRET and not _autotune_enabled():
        cfg = _fixed_config(x2.dtype)
        kernel, fixed = _linear_backward_kernel.fn, dict(cfg.kwargs, num_warps=cfg.num_warps,
                                                            num_stages=cfg.num_stages)
    dxa = dx2 if need_dx else dw  # a placeholder pointer when dx is skipped (never written)
    kernel[grid](
        x2, wt, dy2, dxa, dw, db if bias else dw, m, n, k,
        x2.stride(0), x2.stride(1), wt.stride(0), wt.stride(1),
        dy2.stride(0), dy2.stride(1), dxa.stride(0), dxa.stride(1), dw.stride(0), dw.stride(1),
        **_constexprs(x2.dtype, need_dx=need_dx, bias=bias, accumulate=accumulate,
                      allow_tf32=allow_tf32, int64=int64), **fixed)


def _auto_route(x2, wt, dy2, dx2, dw, db, accumulate, allow_tf32) -> str:
    """The route for this problem: measured on scratch outputs the first time (on a GPU, with
    autotuning on), then taken from route_choices(); "fused" where there is nothing to measure."""
    if not _autotune_enabled() or x2.device.type != "cuda" or (accumulate and x2.dtype != torch.float32):
        return "fused"
    key = (x2.device.index, str(x2.dtype).rpartition(".")[2], x2.shape[0], wt.shape[0], x2.shape[1],
           dx2 is not None, db is not None, accumulate, bool(allow_tf32 and x2.dtype == torch.float32),
           x2.stride(), wt.stride(), dy2.stride())
    if key not in _route_choices:
        scratch = [None if t is None else torch.empty_like(t) for t in (dx2, dw, db)]
        if accumulate:
            scratch[1] = dw.clone()  # the caller's buffer is added to once, after the choice
        launchers = {name: functools.partial(launch, x2, wt, dy2, *scratch, accumulate, allow_tf32)
                     for name, launch in (("fused", _launch_fused), ("cublas", _launch_cublas))}
        _route_choices[key] = _faster_route(launchers)
    return _route_choices[key][0]


def linear_backward(x, w, dy, *, bias=True, dw_accumulate=None, need_dx=True, allow_tf32=False, route="auto"):
    """Gradients of y = x wᵀ + b: returns (dx, dw, db).

    x [..., K], w [N, K], dy [..., N]: torch tensors (CUDA, or CPU under TRITON_INTERPRET=1)
    or CuPy arrays, all fp32, all fp16 or all bf16, any strides. Accumulation is fp32; dx
    [..., K], dw [N, K] and db [N] come back in the input dtype and type (dx None when
    need_dx=False, db None when bias=False). dw_accumulate, an fp32 [N, K] buffer, receives
    dw += dyᵀ x in place and is itself returned as dw. fp32 inputs use exact fp32 products
    unless allow_tf32=True. route: "auto" (measure once per problem, keep the faster),
    "fused" (the one Triton launch) or "cublas" (torch matmuls; fp32 inputs only with
    dw_accumulate); see the module docstring.
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    checks.check_linear_backward_args(x, w, dy, dw_accumulate, allowed=_DTYPES)
    given = [as_torch(a) for a in (x, w, dy)]
    acc_t, acc_cupy = as_torch(dw_accumulate) if dw_accumulate is not None else (None, given[0][1])
    if len({flag for _, flag in given} | {acc_cupy}) != 1:
        raise ValueError("x, w, dy and dw_accumulate must all be torch tensors or all CuPy arrays")
    from_cupy = given[0][1]
    xt, wt, dyt = (t for t, _ in given)
    device = xt.device
    for name, t in (("w", wt), ("dy", dyt), ("dw_accumulate", acc_t)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, x on {device}: all arrays must share one device")
    if device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"the Triton kernels need CUDA tensors (got {device}); "
                         "CPU tensors run only under TRITON_INTERPRET=1")

    if route == "cublas" and acc_t is not None and xt.dtype != torch.float32:
        raise ValueError(f"route='cublas' cannot add {xt.dtype} products into the fp32 dw_accumulate without "
                         "rounding them first: use route='fused' or 'auto'")

    n, k = wt.shape
    x2 = xt.reshape(-1, k)  # a view whenever the strides allow it
    dy2 = dyt.reshape(-1, n)
    m = x2.shape[0]
    dtype = xt.dtype
    dx2 = torch.empty((m, k), dtype=dtype, device=device) if need_dx else None
    dw = acc_t if acc_t is not None else torch.empty((n, k), dtype=dtype, device=device)
    db = torch.empty((n,), dtype=dtype, device=device) if bias else None

    if m == 0 or n == 0 or k == 0:  # nothing for the tiles to do; keep the contract's values
        if dx2 is not None:
            dx2.zero_()
        if acc_t is None:
            dw.zero_()
        if db is not None:
            db.copy_(dy2.float().sum(0) if m else torch.zeros_like(db))
    else:
        accumulate = acc_t is not None
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            if route == "auto":
                route = _auto_route(x2, wt, dy2, dx2, dw, db, accumulate, allow_tf32)
            launch = _launch_cublas if route == "cublas" else _launch_fused
            launch(x2, wt, dy2, dx2, dw, db, accumulate, allow_tf32)

    dx = dx2.reshape(xt.shape) if need_dx else None
    dw_out = dw_accumulate if dw_accumulate is not None else as_given(dw, from_cupy)
    return as_given(dx, from_cupy), dw_out, as_given(db, from_cupy)
