"""Fused backward of a linear layer, y = x wᵀ + b, as ONE persistent Triton launch.

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
dW unit each while 68 share the 4096 short dX units, about the same work, so run 1's 0.29× there
is not load imbalance; the fixed split_dw values of the tuning space let a sweep rule on it.

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

Expected share of the ceilings (to be measured; bench/TARGETS.md has the targets). The FLOPs are 4·M·N·K,
half per family; db adds M·N additions. bf16/fp16 run on tensor cores (wgmma) with pointer loads,
no TMA: public Triton matmuls of this kind reach 0.6–0.75 of cuBLAS on an H100 (run 1: 447–542 TFLOP/s at the two large bf16 shapes, 0.64–0.81× torch); the fusion saves
the db pass and two launches, which matters only at launch-bound shapes (a few µs of GPU work). The
split adds one fp32 round trip of the split outputs through L2 (S × R × C × 4 bytes written and read
back), small next to the matmul at the shapes that split.

fp32 inputs with allow_tf32=False run on the FMA units (PRECISION "ieee"), never on tensor cores: at
most 67 TFLOP/s on an H100 SXM, and Triton's FMA dot reaches well under cuBLAS SGEMM's share of it.
So where such a problem is compute-bound (4·M·N·K ≥ FMA_COMPUTE_BOUND_FLOPS) route "auto" takes
cuBLAS without timing both (tuning parameter fp32_ieee_route); at launch-bound fp32 sizes one fused
launch can still win and "auto" measures. With allow_tf32=True fp32 runs on tensor cores as TF32.

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
tuning.override(...), or the defaults: today's behaviour (every tile of the element size timed on a
problem's first call, route "measure") plus split "auto" (timed against no split where it splits).

Per-call cost. Everything that depends only on the problem (shapes, strides, dtype, device, flags,
tuning values) is resolved once into a plan, cached by a key built from attributes the call reads
anyway; the argument checks, the route, the tile and split choice, the grid and the kernel's scalar
arguments all live in the plan. A call then costs the key, one dict lookup, the output allocations
and the launch (tests/test_triton_linear_backward.py measures it with the launch stubbed: 12–14 µs
of CPU time on a loaded 2-core CI machine). Triton's own launch path (argument binding and its
specialisation key) comes on top and is measured only on a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from gpuad.kernels import checks, tuning

from .interop import as_given, as_torch, device_info

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_DTYPES = ("float16", "bfloat16", "float32")
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


def _max_offset(t) -> int:
    return sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)


# --------------------------------------------------------------------------------------------
# Device, tuning values and the split workspace

def _autotune_enabled() -> bool:
    """Whether the first call of a problem may time candidates (on a GPU, GPUAD_TRITON_AUTOTUNE
    not 0; read when a problem is planned, see clear_plans)."""
    return not _INTERPRET and os.environ.get("GPUAD_TRITON_AUTOTUNE", "1") != "0"


_tuning_local = getattr(tuning, "_local", None)  # where tuning.override keeps this thread's values


def _overrides():
    """This thread's tuning.override(...) of this op, hashable (part of every plan key; cheap)."""
    over = getattr(_tuning_local, "overrides", None)
    mine = over.get(OP) if over else None
    return tuple(sorted(mine.items())) if mine else None


_workspaces: dict = {}  # (device index, stream) -> (fp32 workspace, int32 counters)
_outgrown: list = []    # workspaces replaced by larger ones, kept alive for captured CUDA graphs

try:
    _raw_stream = torch._C._cuda_getCurrentRawStream  # what Triton's launcher itself asks
except AttributeError:  # pragma: no cover - another torch
    def _raw_stream(index):
        return torch.cuda.current_stream(index).cuda_stream


def _workspace(device: torch.device, ws_elems: int, cnt_elems: int):
    """(fp32 workspace ≥ ws_elems, zeroed int32 counters ≥ cnt_elems) of the current stream."""
    key = (device.index, _raw_stream(device.index) if device.type == "cuda" else 0)
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

def _reduction_flag(name):
    """(getter, setter) of one of torch's reduced-precision reduction flags, as plain bools."""
    getter = getattr(torch._C, f"_get_cublas_allow_{name}_reduced_precision_reduction")
    setter = getattr(torch._C, f"_set_cublas_allow_{name}_reduced_precision_reduction")
    if isinstance(getter(), tuple):  # torch >= 2.8: (allow, allow_splitk)
        return lambda: getter()[0], lambda on: setter(on, getter()[1])
    return getter, setter


@functools.lru_cache(maxsize=None)
def _precision_flags(dtype: torch.dtype) -> tuple:
    """((getter, setter, value for fp32 accumulation), ...) of the global torch flags that can take a
    cuBLAS matmul of `dtype` away from fp32 accumulation (TF32: _tf32_state and _set_tf32)."""
    if dtype == torch.float16:
        flags = [(*_reduction_flag("fp16"), False)]
        if hasattr(torch._C, "_get_cublas_allow_fp16_accumulation"):
            flags.append((torch._C._get_cublas_allow_fp16_accumulation,
                          torch._C._set_cublas_allow_fp16_accumulation, False))
        return tuple(flags)
    if dtype == torch.bfloat16:
        return ((*_reduction_flag("bf16"), False),)
    return ()


def _fp32_precision_getter():
    """A fast getter of torch's fp32 matmul precision ("tf32", "ieee" or "none", which is off), or
    None on a torch without that setting (before 2.9: the allow_tf32 flag alone)."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return None
    try:
        get = functools.partial(torch._C._get_fp32_precision_getter, "cuda", "matmul")
        get()
        return get
    except (AttributeError, TypeError, RuntimeError):  # pragma: no cover - another torch
        return lambda: torch.backends.cuda.matmul.fp32_precision


_tf32_state = _fp32_precision_getter()
if _tf32_state is not None:  # fp32_precision is the source of truth (mixing in allow_tf32 makes
    def _tf32_is_on(state) -> bool:  # torch refuse to read the legacy flag)
        return state == "tf32"

    def _set_tf32(state):
        """Set fp32_precision: True -> "tf32", False -> "ieee", or a value read before."""
        torch.backends.cuda.matmul.fp32_precision = {True: "tf32", False: "ieee"}.get(state, state)
else:  # pragma: no cover - torch < 2.9
    _tf32_state = torch._C._get_cublas_allow_tf32
    _set_tf32 = torch._C._set_cublas_allow_tf32

    def _tf32_is_on(state) -> bool:
        return bool(state)


def _pins(dtype: torch.dtype, allow_tf32: bool) -> list:
    """Set, for a cuBLAS call, the global torch flags that differ from fp32 accumulation (TF32
    only when allow_tf32); return the functions that restore them. Reads only, in the usual
    case where nothing differs. Global torch state: not thread-safe."""
    undo = []
    if dtype == torch.float32:
        old = _tf32_state()
        if _tf32_is_on(old) != allow_tf32:
            _set_tf32(bool(allow_tf32))
            undo.append(functools.partial(_set_tf32, old))
    for get, put, want in _precision_flags(dtype):
        old = get()
        if old != want:
            put(want)
            undo.append(functools.partial(put, old))
    return undo


@contextlib.contextmanager
def pinned_fp32_accumulation(dtype: torch.dtype, allow_tf32: bool = False):
    """Within the block, torch's cuBLAS matmuls of `dtype` accumulate in fp32 (TF32 for fp32 inputs
    only when allow_tf32); the global flags are restored on exit (see _pins)."""
    undo = _pins(dtype, allow_tf32)
    try:
        yield
    finally:
        for restore in undo:
            restore()


def _launch_cublas(x2, wt, dy2, dw_acc, need_dx, bias, allow_tf32):
    """(dx2, dw, db) through torch (cuBLAS on a GPU): dx2 = dy2 wt, dw = dy2ᵀ x2 (or dw_acc += it:
    fp32 inputs only, one GEMM with beta = 1), db = torch's column sum (fp32 accumulation)."""
    with pinned_fp32_accumulation(x2.dtype, allow_tf32):
        dx2 = torch.mm(dy2, wt) if need_dx else None
        dw = dw_acc.addmm_(dy2.t(), x2) if dw_acc is not None else torch.mm(dy2.t(), x2)
    return dx2, dw, (torch.sum(dy2, 0) if bias else None)


def _launch_kernel(launcher, args, meta):
    """The hand-off to Triton (one place, so a test can stub the launch)."""
    launcher(*args, **meta)


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
        self.launcher = _linear_backward_kernel[(g.grid,)]
        self.dx_shape, self.dw_shape, self.db_shape = prob.lead + (k,), (n, k), (n,)

    def launch(self, x2, wt, dy2, dx2, dw, db):
        """The fused launch into preallocated outputs (dx2 / db None: skipped)."""
        g = self.geo
        if g.ws_elems:
            ws, cnt = _workspace(x2.device, g.ws_elems, g.cnt_elems)
        else:
            ws = cnt = dw  # placeholders, never touched without a split
        _launch_kernel(self.launcher, (x2, wt, dy2, dw if dx2 is None else dx2, dw, dw if db is None else db,
                                       ws, cnt) + self.scalars, self.meta)

    def __call__(self, xt, wt, dyt, acc_t):
        p = self.prob
        if self.route == "fused":  # the kernel reads pointers and the plan's strides: no reshape when
            x2 = xt if self.views[0] else xt.reshape(p.m, p.k)  # the 2-D view of x (or dy) exists
            dy2 = dyt if self.views[1] else dyt.reshape(p.m, p.n)
            dtype, device = p.dtype, p.device
            dx = torch.empty(self.dx_shape, dtype=dtype, device=device) if p.need_dx else None
            dw = acc_t if p.accumulate else torch.empty(self.dw_shape, dtype=dtype, device=device)
            db = torch.empty(self.db_shape, dtype=dtype, device=device) if p.bias else None
            self.launch(x2, wt, dy2, dx, dw, db)
            return dx, dw, db
        flat = self.views[0] and xt.dim() == 2  # 2-D inputs: no reshape
        x2 = xt if flat else xt.reshape(p.m, p.k)
        dy2 = dyt if flat else dyt.reshape(p.m, p.n)
        if self.route == "cublas":
            dx2, dw, db = _launch_cublas(x2, wt, dy2, acc_t, p.need_dx, p.bias, p.allow_tf32)
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
_measured: dict = {}  # (route key, route, tuning values) -> name of the plan the timing chose
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
        tiles = [INTERPRETER_TILE if _INTERPRET else tiles_for(size)[0]]
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
        if _INTERPRET and prob.dtype == torch.bfloat16:
            raise NotImplementedError(
                "bfloat16 with dw_accumulate needs the fused route, which the Triton interpreter "
                "(TRITON_INTERPRET=1) cannot run: its tl.dot does not support bfloat16; run it on a GPU")
        return "fused"  # cuBLAS cannot add 16-bit products into fp32 without rounding them first
    if _INTERPRET and prob.dtype == torch.bfloat16:
        return "cublas"  # the interpreter's bf16 tl.dot returns wrong numbers
    rule = params["fp32_ieee_route"]
    if on_gpu and prob.dtype == torch.float32 and not prob.allow_tf32 and (
            rule == "cublas" or (rule == "cublas_if_compute_bound"
                                 and 4.0 * prob.m * prob.n * prob.k >= FMA_COMPUTE_BOUND_FLOPS)):
        return "cublas"  # FMA units either way, and cuBLAS SGEMM uses them better
    if params["route"] != "measure":
        return params["route"]
    return "measure" if measuring else "fused"


def _make_plan(xt, wt, dyt, acc_t, bias, need_dx, allow_tf32, route) -> _Plan:
    """Check the arguments and resolve the call (measuring routes and candidates on the GPU)."""
    checks.check_linear_backward_args(xt, wt, dyt, acc_t, allowed=_DTYPES)
    device = xt.device
    for name, t in (("w", wt), ("dy", dyt), ("dw_accumulate", acc_t)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, x on {device}: all arrays must share one device")
    if device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"the Triton kernels need CUDA tensors (got {device}); "
                         "CPU tensors run only under TRITON_INTERPRET=1")
    dtype = xt.dtype
    accumulate = acc_t is not None
    if route == "cublas" and accumulate and dtype != torch.float32:
        raise ValueError(f"route='cublas' cannot add {dtype} products into the fp32 dw_accumulate without "
                         "rounding them first: use route='fused' or 'auto'")
    n, k = wt.shape
    lead = tuple(xt.shape[:-1])
    m = math.prod(lead)
    tf32 = bool(allow_tf32) and dtype == torch.float32
    prob = _Problem(m, n, k, dtype, device, need_dx, bias, accumulate, tf32, lead)
    if m == 0 or n == 0 or k == 0:
        return _Plan(prob, "empty")
    interpreter_bf16 = _INTERPRET and dtype == torch.bfloat16
    if route == "fused" and interpreter_bf16:
        raise NotImplementedError(
            "bfloat16 inputs cannot take route='fused' under the Triton interpreter (TRITON_INTERPRET=1): "
            "its tl.dot does not support bfloat16 and returns wrong numbers; run bf16 on a GPU, or use "
            "route='cublas' (torch)")
    x2, dy2 = xt.reshape(m, k), dyt.reshape(m, n)
    # whether the 2-D views exist: then the kernel reads the given tensors with the views' strides
    views = tuple(a.data_ptr() == b.data_ptr() and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                  for a, b in ((x2, xt), (dy2, dyt)))
    index = device.index if device.type == "cuda" else None
    gpu_name, n_sm = device_info(device)
    params = tuning.values(OP, gpu_name)
    measuring = _autotune_enabled() and device.type == "cuda"
    key = (index, checks.dtype_name(dtype), m, n, k, need_dx, bias, accumulate, tf32,
           x2.stride(), wt.stride(), dy2.stride())

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
    strides = x2.stride() + wt.stride() + dy2.stride() + (k, 1) + tuple(dw_strides)
    biggest = max(_max_offset(x2), _max_offset(wt), _max_offset(dy2), m * k - 1,
                  _max_offset(acc_t) if accumulate else n * k - 1)

    def fused(tile, splits):
        plan = _Plan(prob, "fused", views, tile, splits, programs, strides, biggest >= 2**31 - 1)
        if plan.geo.ws_elems >= 2**31 - 1 and not plan.meta["INT64"]:  # the workspace's offsets too
            plan = _Plan(prob, "fused", views, tile, splits, programs, strides, True)
        return plan

    plans = [fused(tile, splits) for tile, splits in _candidates(prob, params, programs, measuring)]
    plans = list({p.name: p for p in plans}.values())  # candidates that came out the same
    if not measuring or (len(plans) == 1 and route == "fused"):
        return plans[0]
    memo = (key, route, tuple(params.items()))
    if memo in _measured:  # measured before (the plan was evicted or cleared since)
        return next((p for p in plans if p.name == _measured[memo]), None) or _Plan(prob, "cublas", views)
    # Time on scratch outputs (a copy of the caller's accumulation buffer, which is added to
    # exactly once, after the choice).
    dx_s = torch.empty((m, k), dtype=dtype, device=device) if need_dx else None
    dw_s = acc_t.clone() if accumulate else torch.empty((n, k), dtype=dtype, device=device)
    db_s = torch.empty((n,), dtype=dtype, device=device) if bias else None
    launchers = {p.name: functools.partial(p.launch, x2, wt, dy2, dx_s, dw_s, db_s) for p in plans}
    if route == "auto":
        cublas = _Plan(prob, "cublas", views)
        launchers["cublas"] = functools.partial(_launch_cublas, x2, wt, dy2, dw_s if accumulate else None,
                                                need_dx, bias, tf32)
    with torch.cuda.device(device):
        _, times = _fastest(launchers)
    fused_times = {name: ms for name, ms in times.items() if name != "cublas"}
    best = min(fused_times, key=fused_times.get)
    if len(plans) > 1:
        _fused_choices[key] = (best, fused_times)
    if route == "auto":
        route = "cublas" if times["cublas"] < fused_times[best] else "fused"
        _route_choices[key] = (route, {"fused": fused_times[best], "cublas": times["cublas"]})
        if route == "cublas":
            _measured[memo] = "cublas"
            return cublas
    _measured[memo] = best
    return next(p for p in plans if p.name == best)


def _to_torch(x, w, dy, dw_accumulate):
    """(x, w, dy, dw_accumulate as torch tensors, from_cupy): CuPy arrays through DLPack."""
    given = [as_torch(a) for a in (x, w, dy)]
    acc_t, acc_cupy = as_torch(dw_accumulate) if dw_accumulate is not None else (None, given[0][1])
    if len({flag for _, flag in given} | {acc_cupy}) != 1:
        raise ValueError("x, w, dy and dw_accumulate must all be torch tensors or all CuPy arrays")
    return given[0][0], given[1][0], given[2][0], acc_t, given[0][1]


def _plan(x, w, dy, bias, dw_accumulate, need_dx, allow_tf32, route):
    """(plan, x, w, dy, dw_accumulate as torch tensors, from_cupy), the plan from the cache."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and isinstance(dy, torch.Tensor)
            and (dw_accumulate is None or isinstance(dw_accumulate, torch.Tensor))):
        xt, wt, dyt, acc_t, from_cupy = x, w, dy, dw_accumulate, False
    else:
        xt, wt, dyt, acc_t, from_cupy = _to_torch(x, w, dy, dw_accumulate)
    # Everything _make_plan checks and decides from is in the key, so a hit needs no checks.
    key = (xt.shape, xt.stride(), xt.dtype, xt.device, wt.shape, wt.stride(), wt.dtype, wt.device,
           dyt.shape, dyt.stride(), dyt.dtype, dyt.device,
           None if acc_t is None else (acc_t.shape, acc_t.stride(), acc_t.dtype, acc_t.device),
           bias, need_dx, allow_tf32, route, _overrides())
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= _MAX_PLANS:
            del _plans[next(iter(_plans))]
        plan = _plans[key] = _make_plan(xt, wt, dyt, acc_t, bool(bias), bool(need_dx), bool(allow_tf32), route)
    return plan, xt, wt, dyt, acc_t, from_cupy


def plan_name(x, w, dy, *, bias=True, dw_accumulate=None, need_dx=True, allow_tf32=False, route="auto") -> str:
    """What linear_backward with these arguments launches: "fused <tile> split <S_w>x<S_x>",
    "cublas", or "empty" (M, N or K is 0). Plans (and, on a GPU, measures) like the first call."""
    return _plan(x, w, dy, bias, dw_accumulate, need_dx, allow_tf32, route)[0].name


def linear_backward(x, w, dy, *, bias=True, dw_accumulate=None, need_dx=True, allow_tf32=False, route="auto"):
    """Gradients of y = x wᵀ + b: returns (dx, dw, db).

    x [..., K], w [N, K], dy [..., N]: torch tensors (CUDA, or CPU under TRITON_INTERPRET=1)
    or CuPy arrays, all fp32, all fp16 or all bf16, any strides. Accumulation is fp32; dx
    [..., K], dw [N, K] and db [N] come back in the input dtype and type (dx None when
    need_dx=False, db None when bias=False). dw_accumulate, an fp32 [N, K] buffer, receives
    dw += dyᵀ x in place and is itself returned as dw. fp32 inputs use exact fp32 products (FMA
    units) unless allow_tf32=True. M, N or K may be 0: the empty sums are zeros (db still sums dy
    when K = 0), as in torch. route: "auto" (see the module docstring), "fused" (the one Triton
    launch) or "cublas" (torch matmuls; fp32 inputs only with dw_accumulate).
    """
    plan, xt, wt, dyt, acc_t, from_cupy = _plan(x, w, dy, bias, dw_accumulate, need_dx, allow_tf32, route)
    if plan.switch_device and plan.prob.device.index != torch.cuda.current_device():
        with torch.cuda.device(plan.prob.device):  # Triton launches on the current device
            dx, dw, db = plan(xt, wt, dyt, acc_t)
    else:
        dx, dw, db = plan(xt, wt, dyt, acc_t)
    if acc_t is not None:
        dw = dw_accumulate
    elif from_cupy:
        dw = as_given(dw, True)
    if from_cupy:
        dx, db = as_given(dx, True), as_given(db, True)
    return dx, dw, db
