"""The fused backward of a linear layer, y = x wᵀ + b, as ONE persistent Triton launch: the
kernel, its tiles and its launch geometry (pure functions of the problem). The launcher is
``linear_backward``; how a call is planned, measured and tuned is ``linear_backward_plan``.

    x [..., K], w [N, K], dy [..., N]   (fp32 / fp16 / bf16, one dtype; leading dims flattened to M)
    dx = dy w     [..., K]   (skipped when need_dx=False)
    dw = dyᵀ x    [N, K]     (or dw_accumulate += dyᵀ x, an fp32 [N, K] buffer, in place)
    db = Σ_M dy   [N]        (skipped when bias=False)

Design
------
Both gradients are the same shape of problem, C[R, C] = A[R, RED] @ B[RED, C]:
  dX:  A = dy  [M, N],  B = w [N, K],  reduce over N      2·M·N·K FLOPs, half of the work
  dW:  A = dyᵀ [N, M],  B = x [M, K],  reduce over M      2·M·N·K FLOPs, the other half
so one tile routine serves both families; strides make the transposes (dyᵀ, or a w that is itself
a transposed view) free. db = the row sums of dyᵀ is M·N additions, nothing next to the matmuls.

Work units and split-K. Each family's output is cut into BLOCK_R × BLOCK_C tiles and each tile's
reduction into S contiguous chunks of whole BLOCK_RED steps (S = 1: no split). A work unit is one
chunk of one tile. Splitting matters where a family has few tiles against a long reduction: dX at
256×1024→1024 and at 64×512→512 (8 to 16 tiles, each a long serial loop over N while most SMs
idle), dW at 65536×1024→1024 without dx (64 tiles of 128×128 reducing over 65536 rows, for 132
SMs). The default S per family (split "auto", see split_factors) is the one whose launch has the
shortest makespan under a simple cost model (steps per unit, plus an epilogue, plus a split's
partial round trip). With dx at 65536×1024→1024 the model keeps S = 1: 64 programs take one long
dW unit each while 68 share the 4096 short dX units, about the same work, so the launch is not
load-imbalanced there; the fixed split_dw values of the tuning space let a sweep rule on it.

Persistent grid: min(programs_per_sm × #SMs, #units) programs, dealt between the two families so
that the busiest program does the least work; each program walks its family's units in grouped
(L2-friendly) order, split by split, stepping by the number of programs of that family.

Deterministic split reduction, no float atomics. A unit of a split tile stores its fp32 partial in a
workspace, then bumps the tile's arrival counter (one integer atomic, acquire-release, after a CTA
barrier). The unit that arrives last adds the S partials in the order s = 0, 1, ..., S-1 (its own
included, re-read from the workspace) and writes the tile (+= for dw_accumulate), then resets the
counter to 0 for the next launch. Whichever program arrives last, the sums are the same, so the bits
are the same on every run for a given (tile, S). The workspace (fp32, S × the family's output) and
the counters are cached per (device, stream) and only grow; buffers it outgrew stay allocated, so a
captured CUDA graph never points at freed memory. Two streams never share counters.

db is fused into the dW family. Without a split the dW tiles of the first K-block sum their A tiles
(the dy tiles they load anyway) over M. With S splits, split s's row sums are carried by the tiles of
K-block (s mod #K-blocks), and reduced like the tiles (their own counters): with S ≥ #K-blocks every
K-block carries an equal share, so no tile is left with all of db while the others wait.

Expected share of the ceilings. The FLOPs are 4·M·N·K, half per family; db adds M·N additions.
bf16/fp16 run on tensor cores (wgmma) with pointer loads, no TMA: public Triton matmuls of this
kind reach 0.6–0.75 of cuBLAS on an H100 (bench/RESULTS.md has the measured figures); the fusion
saves the db pass and two launches, which matters only at launch-bound shapes (a few µs of GPU
work). The split adds one fp32 round trip of the split outputs through L2 (S × R × C × 4 bytes
written and read back), small next to the matmul at the shapes that split.

fp32 inputs with allow_tf32=False run on the FMA units (PRECISION "ieee"), never on tensor cores: at
most 67 TFLOP/s on an H100 SXM, and Triton's FMA dot reaches well under cuBLAS SGEMM's share of it.
So where such a problem is compute-bound (4·M·N·K ≥ FMA_COMPUTE_BOUND_FLOPS) route "auto" takes
cuBLAS without timing both (tuning parameter fp32_ieee_route); at launch-bound fp32 sizes one fused
launch can still win and "auto" measures. With allow_tf32=True fp32 runs on tensor cores as TF32.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from gpuad.kernels import tuning

OP = "triton.linear_backward"


class Tile(NamedTuple):
    """An output tile BLOCK_R × BLOCK_C reduced in steps of BLOCK_RED, with its launch options and the
    input element sizes (bytes) it serves."""
    block_r: int
    block_c: int
    block_red: int
    stages: int
    warps: int
    sizes: tuple

    @property
    def name(self) -> str:
        return f"{self.block_r}x{self.block_c}x{self.block_red}-w{self.warps}-s{self.stages}"


# The first tile of each element size is its default. Picked from ahead-of-time compiles for sm_90
# (tests/test_triton_compile.py): the defaults spill nothing (or a few bytes) with 16-byte-aligned
# strides; fp32 tiles reduce over 32 because the fp32 / tf32 dots hold far more registers (the
# 128×128×64 and 64×128×64 fp32 tiles spilled 0.1 to 3.6 KB). The others are candidates the first
# call of a problem times (128×256×64 spills with bias: the timing decides whether it still wins).
TILES = (
    Tile(128, 128, 64, 3, 8, (2,)),    # fp16/bf16 default: wgmma tiles
    Tile(128, 64, 32, 4, 8, (4,)),     # fp32/tf32 default
    Tile(128, 256, 64, 3, 8, (2,)),    # large fp16/bf16 problems
    Tile(64, 128, 64, 4, 4, (2,)),     # mid-size fp16/bf16 problems: more tiles than SMs
    Tile(128, 128, 32, 3, 8, (4,)),    # large fp32 problems
    Tile(64, 64, 32, 4, 4, (2, 4)),    # small problems (e.g. 64×512×512)
)
#: The interpreter's default: small, so that small test shapes still have several tiles.
INTERPRETER_TILE = Tile(32, 32, 16, 1, 4, (2, 4))
GROUP = 8  # row-tiles walked together (L2 reuse of B); 2 under the interpreter
TILE_PARAM = {2: "tile_16bit", 4: "tile_fp32"}  # element size -> tuning parameter

SPLITS_DW = (1, 2, 4, 8, 16, 32)  # the fixed values the tuning space offers
SPLITS_DX = (1, 2, 4, 8, 16)
SPLIT_CHOICES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # what split "auto" considers
# The cost model of split "auto", in BLOCK_RED steps of a unit: each unit's epilogue (the tile
# store), and a split unit's fp32 partial written, counted, and read back by the last to arrive.
EPILOGUE_STEPS = 1
SPLIT_STEPS = 2
#: 4·M·N·K above which an fp32 problem without TF32 is compute-bound on the FMA units (about 30 µs of
#: SGEMM on an H100): there route "auto" takes cuBLAS without timing (fp32_ieee_route).
FMA_COMPUTE_BOUND_FLOPS = 2e9


def tiles_for(element_size: int) -> tuple:
    """The tiles that serve inputs of `element_size` bytes, the default first."""
    return tuple(t for t in TILES if element_size in t.sizes)


TUNING_SPACE = {
    "tile_16bit": ("autotune",) + tuple(t.name for t in tiles_for(2)),
    "tile_fp32": ("autotune",) + tuple(t.name for t in tiles_for(4)),
    "split_dw": ("auto",) + SPLITS_DW,
    "split_dx": ("auto",) + SPLITS_DX,
    "programs_per_sm": (1, 2),
    "route": ("measure", "fused", "cublas"),
    "fp32_ieee_route": ("cublas_if_compute_bound", "cublas", "as_route"),
}
TUNING_DEFAULTS = {
    "tile_16bit": "autotune",  # time every tile of the element size on a problem's first call
    "tile_fp32": "autotune",   # (without measuring: the first tile of the size)
    "split_dw": "auto",  # split_factors, timed against no split where they differ
    "split_dx": "auto",
    "programs_per_sm": 1,
    "route": "measure",  # what route="auto" does
    "fp32_ieee_route": "cublas_if_compute_bound",
}
tuning.register(OP, TUNING_SPACE, TUNING_DEFAULTS)


# --------------------------------------------------------------------------------------------
# The kernel

@triton.jit
def _tile_matmul(a_ptr, sa_r, sa_red, b_ptr, sb_red, sb_c, R, C, red_lo, red_hi, tile_r, tile_c,
                 ROWSUM: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_RED: tl.constexpr):
    """acc[BLOCK_R, BLOCK_C] = A[rows, red_lo:red_hi] @ B[red_lo:red_hi, cols] in fp32; with ROWSUM
    also the fp32 row sums of that slice of A (db for the dW family). Offsets take the width of
    the strides (int64 when the launcher asked for it)."""
    rows = tile_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tile_c * BLOCK_C + tl.arange(0, BLOCK_C)
    # Clamp rows/cols into range so their loads need no mask (the store masks them out).
    rows = rows % R
    cols = cols % C
    red = tl.arange(0, BLOCK_RED)
    a_ptrs = a_ptr + rows[:, None] * sa_r + (red_lo + red)[None, :] * sa_red
    b_ptrs = b_ptr + (red_lo + red)[:, None] * sb_red + cols[None, :] * sb_c
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    rowsum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for r0 in range(red_lo, red_hi, BLOCK_RED):
        in_red = red < red_hi - r0
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
def _store_rows(c_ptr, sc_r, sc_c, R, C, rows, cols, acc, ACCUMULATE: tl.constexpr):
    """C[rows, cols] = acc (C[...] += acc when ACCUMULATE), in C's dtype, masked to R × C."""
    ptrs = c_ptr + rows[:, None] * sc_r + cols[None, :] * sc_c
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    if ACCUMULATE:
        acc += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_tile(c_ptr, sc_r, sc_c, R, C, tile_r, tile_c, acc, ACCUMULATE: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """C[tile] = acc (C[tile] += acc when ACCUMULATE), in C's dtype, masked to R × C."""
    _store_rows(c_ptr, sc_r, sc_c, R, C, tile_r * BLOCK_R + tl.arange(0, BLOCK_R),
                tile_c * BLOCK_C + tl.arange(0, BLOCK_C), acc, ACCUMULATE)


@triton.jit
def _arrive(cnt_ptr):
    """Count this program's arrival at a split tile after every thread's workspace stores (CTA
    barrier, then one acquire-release integer atomic at GPU scope); returns the earlier count."""
    tl.debug_barrier()
    return tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")


@triton.jit
def _finish_split_tile(acc, ws_ptr, cnt_ptr, s, splits, R, C, tile_r, tile_c, c_ptr, sc_r, sc_c,
                       ACCUMULATE: tl.constexpr, INT64: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SUB_R: tl.constexpr):
    """Store split s's fp32 partial of the tile in the workspace ([splits, R, C]); the last of the
    `splits` units to arrive adds them in the order 0..splits-1 and writes the tile, SUB_R rows at
    a time (a fraction of the tile's registers: the partial's offsets are dead by then)."""
    if INT64:
        width = tl.cast(C, tl.int64)
        plane = tl.cast(R, tl.int64) * width
    else:
        width = C
        plane = R * C
    rows = tile_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tile_c * BLOCK_C + tl.arange(0, BLOCK_C)
    tl.store(ws_ptr + s * plane + rows[:, None] * width + cols[None, :], acc,
             mask=(rows[:, None] < R) & (cols[None, :] < C))
    if _arrive(cnt_ptr) == splits - 1:
        for r0 in tl.static_range(0, BLOCK_R, SUB_R):
            sub = tile_r * BLOCK_R + r0 + tl.arange(0, SUB_R)
            offs = sub[:, None] * width + cols[None, :]
            mask = (sub[:, None] < R) & (cols[None, :] < C)
            total = tl.zeros((SUB_R, BLOCK_C), dtype=tl.float32)
            for k in range(0, splits):  # .cg: read past L1, which may hold lines of a neighbour's partials
                total += tl.load(ws_ptr + k * plane + offs, mask=mask, other=0.0, cache_modifier=".cg")
            _store_rows(c_ptr, sc_r, sc_c, R, C, sub, cols, total, ACCUMULATE)
        tl.store(cnt_ptr, 0)  # ready for the next launch


@triton.jit
def _finish_split_rowsum(rowsum, ws_ptr, cnt_ptr, s, splits, R, tile_r, db_ptr, BLOCK_R: tl.constexpr):
    """The same for db: split s's row sums into ws [splits, R]; the last to arrive writes db."""
    rows = tile_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = rows < R
    tl.store(ws_ptr + s * R + rows, rowsum, mask=mask)
    if _arrive(cnt_ptr) == splits - 1:
        total = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k in range(0, splits):
            total += tl.load(ws_ptr + k * R + rows, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(db_ptr + rows, total.to(db_ptr.dtype.element_ty), mask=mask)
        tl.store(cnt_ptr, 0)


@triton.jit
def _family(pid, n_progs, a_ptr, sa_r, sa_red, b_ptr, sb_red, sb_c, c_ptr, sc_r, sc_c, R, RED, C,
            splits, chunk, ws_ptr, cnt_ptr, db_ptr, ws_db_ptr, cnt_db_ptr,
            HAS_DB: tl.constexpr, SPLIT: tl.constexpr, ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr,
            INT64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_RED: tl.constexpr,
            GROUP: tl.constexpr):
    """One program's share of a family's units (splits × tiles of C[R, C] = A @ B over RED), with
    db (the row sums of A) when HAS_DB."""
    tiles_r = tl.cdiv(R, BLOCK_R)
    tiles_c = tl.cdiv(C, BLOCK_C)
    tiles = tiles_r * tiles_c
    for u in range(pid, tiles * splits, n_progs):
        s = u // tiles
        t = u - s * tiles
        tile_r, tile_c = _grouped(t, tiles_r, tiles_c, GROUP)
        red_lo = s * chunk
        red_hi = tl.minimum(red_lo + chunk, RED)
        with_db = False
        if HAS_DB:  # split s's row sums ride on the tiles of K-block s mod tiles_c
            with_db = tile_c == s % tiles_c
        if with_db:
            acc, rowsum = _tile_matmul(a_ptr, sa_r, sa_red, b_ptr, sb_red, sb_c, R, C, red_lo, red_hi,
                                       tile_r, tile_c, True, PRECISION, BLOCK_R, BLOCK_C, BLOCK_RED)
        else:
            acc, rowsum = _tile_matmul(a_ptr, sa_r, sa_red, b_ptr, sb_red, sb_c, R, C, red_lo, red_hi,
                                       tile_r, tile_c, False, PRECISION, BLOCK_R, BLOCK_C, BLOCK_RED)
        if SPLIT:
            _finish_split_tile(acc, ws_ptr, cnt_ptr + t, s, splits, R, C, tile_r, tile_c, c_ptr, sc_r, sc_c,
                               ACCUMULATE, INT64, BLOCK_R, BLOCK_C, 32)  # 32 rows at a time
            if with_db:
                _finish_split_rowsum(rowsum, ws_db_ptr, cnt_db_ptr + tile_r, s, splits, R, tile_r, db_ptr,
                                     BLOCK_R)
        else:
            # this program owns the tile: accumulating is a plain read-modify-write
            _store_tile(c_ptr, sc_r, sc_c, R, C, tile_r, tile_c, acc, ACCUMULATE, BLOCK_R, BLOCK_C)
            if with_db:
                offs = tile_r * BLOCK_R + tl.arange(0, BLOCK_R)
                tl.store(db_ptr + offs, rowsum.to(db_ptr.dtype.element_ty), mask=offs < R)


@triton.jit
def _linear_backward_kernel(
        x_ptr, w_ptr, dy_ptr, dx_ptr, dw_ptr, db_ptr, ws_ptr, cnt_ptr, M, N, K,
        sx_m, sx_k, sw_n, sw_k, sdy_m, sdy_n, sdx_m, sdx_k, sdw_n, sdw_k,
        p_dw, splits_w, chunk_w, splits_x, chunk_x, ws_db_off, ws_dx_off, cnt_db_off, cnt_dx_off,
        NEED_DX: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
        SPLIT_W: tl.constexpr, SPLIT_X: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_RED: tl.constexpr, GROUP: tl.constexpr):
    """Programs [0, p_dw) do the dW units (and db), the rest the dX units. ws/cnt: the fp32
    workspace and int32 counters of the split families (placeholders when nothing splits): dW
    partials at 0, db partials at ws_db_off, dX partials at ws_dx_off; counters of the dW tiles at
    0, of the db row-blocks at cnt_db_off, of the dX tiles at cnt_dx_off."""
    if INT64:  # every offset (index × stride) then widens to 64 bits
        sx_m, sx_k, sw_n, sw_k = tl.cast(sx_m, tl.int64), tl.cast(sx_k, tl.int64), \
            tl.cast(sw_n, tl.int64), tl.cast(sw_k, tl.int64)
        sdy_m, sdy_n, sdx_m, sdx_k = tl.cast(sdy_m, tl.int64), tl.cast(sdy_n, tl.int64), \
            tl.cast(sdx_m, tl.int64), tl.cast(sdx_k, tl.int64)
        sdw_n, sdw_k = tl.cast(sdw_n, tl.int64), tl.cast(sdw_k, tl.int64)
    pid = tl.program_id(0)
    if pid < p_dw:
        _family(pid, p_dw, dy_ptr, sdy_n, sdy_m, x_ptr, sx_m, sx_k, dw_ptr, sdw_n, sdw_k, N, M, K,
                splits_w, chunk_w, ws_ptr, cnt_ptr, db_ptr, ws_ptr + ws_db_off, cnt_ptr + cnt_db_off,
                HAS_BIAS, SPLIT_W, ACCUMULATE, PRECISION, INT64, BLOCK_R, BLOCK_C, BLOCK_RED, GROUP)
    else:
        if NEED_DX:
            _family(pid - p_dw, tl.num_programs(0) - p_dw, dy_ptr, sdy_m, sdy_n, w_ptr, sw_n, sw_k,
                    dx_ptr, sdx_m, sdx_k, M, N, K, splits_x, chunk_x, ws_ptr + ws_dx_off, cnt_ptr + cnt_dx_off,
                    db_ptr, ws_ptr, cnt_ptr,
                    False, SPLIT_X, False, PRECISION, INT64, BLOCK_R, BLOCK_C, BLOCK_RED, GROUP)


# --------------------------------------------------------------------------------------------
# Launch geometry: pure functions of the problem (also used by the ahead-of-time compile test)

def constexprs(dtype: torch.dtype, *, need_dx: bool, bias: bool, accumulate: bool, allow_tf32: bool,
               int64: bool, split_w: bool = False, split_x: bool = False) -> dict:
    """The kernel's flag constexprs for a launch (the tile sizes come from the Tile)."""
    return dict(NEED_DX=bool(need_dx), HAS_BIAS=bool(bias), ACCUMULATE=bool(accumulate),
                SPLIT_W=bool(split_w), SPLIT_X=bool(split_x) and bool(need_dx),
                PRECISION="tf32" if (allow_tf32 and dtype == torch.float32) else "ieee", INT64=bool(int64))


def tile_meta(tile: Tile) -> dict:
    """A tile's block constexprs and launch options, as keyword arguments of a launch."""
    return dict(BLOCK_R=tile.block_r, BLOCK_C=tile.block_c, BLOCK_RED=tile.block_red,
                GROUP=2 if tile is INTERPRETER_TILE else GROUP, num_warps=tile.warps, num_stages=tile.stages)


def split_factors(m: int, n: int, k: int, tile: Tile, programs: int, need_dx: bool) -> tuple[int, int]:
    """Split "auto": the (S_w, S_x) of SPLIT_CHOICES whose geometry has the shortest makespan (the
    most work any one program does, in BLOCK_RED steps, counting each unit's epilogue and a split
    unit's partial round trip), the fewest splits among equals."""
    steps_w, steps_x = -(-m // tile.block_red), -(-n // tile.block_red)
    best = None
    for s_w in (s for s in SPLIT_CHOICES if s <= steps_w or s == 1):
        for s_x in (s for s in SPLIT_CHOICES if s <= steps_x or s == 1) if need_dx else (1,):
            g = geometry(m, n, k, tile, (s_w, s_x), programs, need_dx, False)
            score = (g.makespan, g.splits_w + g.splits_x)
            if best is None or score < best[0]:
                best = (score, (g.splits_w, g.splits_x))
    return best[1]


def chunking(red: int, splits: int, block_red: int) -> tuple[int, int]:
    """(splits, chunk): `red` cut into chunks of whole BLOCK_RED steps, at most `splits` of them."""
    steps = -(-red // block_red)
    chunk = -(-steps // max(1, min(splits, steps))) * block_red
    return -(-red // chunk), chunk


class Geometry(NamedTuple):
    """Everything a launch of one (problem, tile, splits) needs besides the tensors."""
    grid: int
    p_dw: int
    splits_w: int
    chunk_w: int
    splits_x: int
    chunk_x: int
    ws_elems: int   # fp32 workspace: dW partials, db partials, dX partials
    cnt_elems: int  # int32 counters: dW tiles, db row-blocks, dX tiles
    ws_db_off: int
    ws_dx_off: int
    cnt_db_off: int
    cnt_dx_off: int
    makespan: int   # the most work of one program, in BLOCK_RED steps (the cost model)


def _partition(grid: int, units_w: int, cost_w: int, units_x: int, cost_x: int) -> tuple[int, int]:
    """(programs on dW, makespan): the split of `grid` programs between the families whose busiest
    program does the least work (a family's program does ceil(units / programs) units). dW's time
    falls and dX's rises with the programs on dW: the best split is where they cross."""
    def times(p):
        return -(-units_w // p) * cost_w, -(-units_x // (grid - p)) * cost_x

    lo, hi = max(1, grid - units_x), min(units_w, grid - 1)
    while lo < hi:  # the first p at which dW's time no longer exceeds dX's
        mid = (lo + hi) // 2
        t_w, t_x = times(mid)
        if t_w > t_x:
            lo = mid + 1
        else:
            hi = mid
    best = min((max(times(p)), p) for p in {lo, max(lo - 1, max(1, grid - units_x))})
    return best[1], best[0]


def geometry(m: int, n: int, k: int, tile: Tile, splits: tuple[int, int], programs: int,
             need_dx: bool, bias: bool) -> Geometry:
    """Grid, family partition and workspace layout for `splits` = (S_w, S_x) asked for."""
    s_w, chunk_w = chunking(m, splits[0], tile.block_red)
    s_x, chunk_x = chunking(n, splits[1], tile.block_red) if need_dx else (1, n)
    tiles_c = -(-k // tile.block_c)
    tiles_n, tiles_m = -(-n // tile.block_r), -(-m // tile.block_r)
    units_w, units_x = s_w * tiles_n * tiles_c, (s_x * tiles_m * tiles_c if need_dx else 0)
    cost_w = chunk_w // tile.block_red + EPILOGUE_STEPS + (SPLIT_STEPS if s_w > 1 else 0)
    cost_x = chunk_x // tile.block_red + EPILOGUE_STEPS + (SPLIT_STEPS if s_x > 1 else 0)
    grid = min(programs, units_w + units_x)
    if need_dx:
        grid = max(2, grid)
        p_dw, makespan = _partition(grid, units_w, cost_w, units_x, cost_x)
    else:
        p_dw, makespan = grid, -(-units_w // grid) * cost_w
    ws_w = s_w * n * k if s_w > 1 else 0
    ws_db = s_w * n if (s_w > 1 and bias) else 0
    ws_x = s_x * m * k if s_x > 1 else 0
    cnt_w = tiles_n * tiles_c if s_w > 1 else 0
    cnt_db = tiles_n if (s_w > 1 and bias) else 0
    cnt_x = tiles_m * tiles_c if s_x > 1 else 0
    return Geometry(grid, p_dw, s_w, chunk_w, s_x, chunk_x, ws_w + ws_db + ws_x, cnt_w + cnt_db + cnt_x,
                    ws_w, ws_w + ws_db, cnt_w, cnt_w + cnt_db, makespan)
