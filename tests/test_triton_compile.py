"""Ahead-of-time compile of every Triton kernel variant the launchers can launch, for Hopper (sm_90).

The other Triton tests run the kernels in the CPU interpreter, which never lowers them: a tl.dot
the backend rejects, a constexpr or type error on a path the interpreter tolerates, more shared
memory than an H100 has, or register spills show only when the kernel is compiled for a GPU.
triton.compile runs the whole pipeline (TTIR → TTGIR → LLVM → PTX → cubin, with the ptxas that
ships in the triton wheel) for an explicit target, without a GPU.

The variants come from the launchers themselves: cross_entropy_rows._kernel_config and
cross_entropy_general._general_config pick the kernel, its tiles, warps and flags;
linear_backward.tiles_for gives the tiles of an element size (the
default first), geometry the grid, partition and split arguments, constexprs the flags. Signature
types and divisibility hints follow from representative launch arguments by the rules
JITFunction applies at a launch (_arg_type).

Cross-entropy (the launcher's tuning space, ce.SPACE, picks among the row kernel and the two
wide kernels): every dtype × each launched kernel × its shapes below (the row kernel at its
narrowest and widest tiles, the wide kernels at the common vocabularies, aligned and unaligned,
one row and many), every (grad, reduction, smoothing) combination on an aligned and an
unaligned shape and all on / all off on the others; each value of each tuning parameter that
changes the compiled code, all flags on, at V = 50257; the on-chip row tile (32768) with every
flag combination; int32 targets with an int64 ignore_index; the count and finish kernels; the
general kernel (weights, probabilities, N-d layouts) on its three tile shapes (see
CE_GENERAL_SHAPES) and its helpers. The
lanes kernel's widest tile (LANES_MAX_PER_THREAD values a thread) is its default. Dropped: the
products of non-default tuning values (each value is compiled with the others at their
defaults), and programs_per_sm, which changes only the grid. Linear backward: the full product
(tiles × need_dx × bias × dw_accumulate × precision × split dW × split dX, over 1000 kernels)
takes too long for CI, so it is a covering set: the default tile of each dtype with every
(need_dx, bias, dw_accumulate, precision) combination unsplit, and all flags on with each split
(dW, dX, both); every other tile with all flags and both splits on (the most code and registers)
and all off; the default tile, all on with both splits, in three more layouts (odd sizes with a
transposed w, M = 1, 64-bit offsets). Dropped: the mixed flag combinations on the non-default
tiles and with splits, and the non-default tiles in the non-contiguous layouts.

Each variant must compile, write to global memory (an st.global in the PTX) and fit the shared
memory of one H100/H200 block. Spills (ptxas -v, run by compiling past the cache) are held to
SPILL_BUDGET bytes of spill stores and of spill loads a thread, a few values that ptxas chose
to keep in L1 (it does so below its register cap: the two-pass CE kernel gets 64 registers at
512 threads and spills 28 bytes), where the launcher has no alternative: every CE variant, and
the default tile of the linear backward in the layouts with 16-divisible strides. The other
tiles, and the odd-strided layout (no vector loads: per-element addresses cost registers), are
compiled and their spills printed, not bounded: a problem's first call times every candidate
tile and keeps the fastest, spills included.
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import io
import itertools
import json
import os
import re
import selectors
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import pytest

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

TARGET_ARCH = 90  # Hopper: H100 / H200
MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
SPILL_BUDGET = 64  # bytes of spill stores, and of spill loads, a thread (see the docstring)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# Can this machine compile for a CUDA target at all?

def _cuda_compile_unavailable() -> str | None:
    """The reason triton cannot compile for a CUDA target here, or None."""
    try:
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"this triton has no ahead-of-time compile API: {e}"
    if "nvidia" not in backends:
        return "this triton has no NVIDIA backend"
    ptxas = _ptxas_path()
    if ptxas is None or not os.access(ptxas, os.X_OK):
        return f"no runnable ptxas (looked for {ptxas})"
    return None


def _ptxas_path() -> str | None:
    try:
        return triton.knobs.nvidia.ptxas.path
    except Exception:  # older triton: no knobs
        try:
            from triton.backends.nvidia.compiler import get_ptxas
            try:
                return get_ptxas(TARGET_ARCH).path
            except TypeError:
                return get_ptxas().path
        except Exception:
            return None


_UNAVAILABLE = _cuda_compile_unavailable()
if _UNAVAILABLE:
    pytest.skip(f"cannot compile Triton kernels for a CUDA target: {_UNAVAILABLE}", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


# --------------------------------------------------------------------------------------------
# The kernel modules, with compiled (not interpreted) kernels

@contextlib.contextmanager
def _env(**values):
    """Set environment variables for the duration, restoring the previous state after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _load_gpu_copy(name: str, *kernel_deps):
    """A fresh copy of gpuad.kernels.triton.<name> defined with the interpreter off.

    Without a GPU, conftest turns TRITON_INTERPRET on for the session and @triton.jit reads it
    when a kernel is defined: the imported modules hold interpreted kernels (and
    linear_backward the interpreter's single autotune config), which cannot be compiled. The
    package itself is imported first, under the session's setting, so the other tests keep
    their interpreted kernels; the copy lives beside it under a private name. kernel_deps are
    copies (made here) of the modules whose @triton.jit functions <name> calls: while the copy
    is defined they stand in for those modules, so its kernels call compilable functions."""
    package = importlib.import_module("gpuad.kernels.triton")
    importlib.import_module(f"gpuad.kernels.triton.{name}")
    path = Path(package.__file__).with_name(f"{name}.py")
    full = f"gpuad.kernels.triton._aot_{name}"
    spec = importlib.util.spec_from_file_location(full, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module
    real = {dep.__name__.replace("._aot_", "."): dep for dep in kernel_deps}
    saved = {key: sys.modules[key] for key in real}
    sys.modules.update(real)
    try:
        with _env(TRITON_INTERPRET="0"):
            spec.loader.exec_module(module)
    finally:
        sys.modules.update(saved)
    return module


ce = _load_gpu_copy("cross_entropy_rows")  # the row kernels, count and finish kernels, their launch geometry
ce_general = _load_gpu_copy("cross_entropy_general", ce)  # it calls the row module's _sum_losses
lb = _load_gpu_copy("linear_backward_kernel")
lce = _load_gpu_copy("linear_cross_entropy")


def _jit_function(kernel) -> JITFunction:
    """The JITFunction under any triton.autotune / triton.heuristics wrappers."""
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


# --------------------------------------------------------------------------------------------
# Launch arguments -> signature, constexprs, attrs

class Ptr(NamedTuple):
    """A tensor argument: its element type (torch's allocations are 16-byte aligned)."""
    dtype: str  # "fp32", "bf16", "i64", ...


def _arg_type(value):
    """(signature type, 16-divisible) of one launch argument, as JITFunction.run specialises it:
    a tensor → "*<dtype>", 16-byte aligned; an int → i32 (i64 outside int32), the constexpr 1
    when it equals 1, divisible when a multiple of 16; a float → fp32."""
    if isinstance(value, Ptr):
        return f"*{value.dtype}", True
    if isinstance(value, bool):
        raise TypeError("bools are passed as constexprs here")
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False
        return ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"unsupported argument {value!r}")


def _specialize(fn: JITFunction, args: dict, constexprs: dict):
    """signature, constexprs and attrs (tt.divisibility=16 hints) for the launch arguments
    `args` and the constexprs the launcher passes."""
    unknown = set(args) - set(fn.arg_names)
    assert not unknown, f"arguments {fn.__name__} does not take: {unknown}"
    signature, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name], divisible = _arg_type(args[name])
        if signature[name] == "constexpr":
            consts[name] = args[name]
        elif divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


class Variant(NamedTuple):
    id: str
    fn: JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    spill_bounded: bool = True  # held to SPILL_BUDGET (see the module docstring)

    def key(self):
        return (self.fn.__name__, tuple(self.signature.items()), tuple(sorted(self.constexprs.items())),
                tuple(sorted(self.attrs)), tuple(sorted(self.options.items())))


def _dedupe(variants):
    """Drop variants that compile to the same kernel as an earlier one (same key)."""
    seen, out = set(), []
    for v in variants:
        if v.key() not in seen:
            seen.add(v.key())
            out.append(v)
    return out


def _covering(shapes, combos, extremes, full=()):
    """(shape, combo) pairs: every shape with each combination in `extremes` (all flags on:
    the most code and registers; all off); the shapes in `full` with every combination; each
    other combination dealt round-robin over the remaining shapes, so that it meets one."""
    pairs = [(s, c) for s in shapes for c in (combos if s in full else extremes)]
    rest = [s for s in shapes if s not in full] or list(shapes)
    for i, c in enumerate(c for c in combos if c not in extremes):
        pairs.append((rest[i % len(rest)], c))
    return list(dict.fromkeys(pairs))


# --------------------------------------------------------------------------------------------
# Cross-entropy variants

# (rows B, vocabulary V, row stride, what it stands for): the row kernel at its smallest and
# widest tiles, and the vocabularies of common tokenizers, contiguous and as a padded view.
SPM = ce.DEFAULTS["single_pass_max"]
CE_SHAPES = [
    (1, 5, 5, "one-row"),
    (8192, 5, 5, "tiny-V"),
    (8192, 1000, 1000, "V1000"),
    (8192, 1000, 1001, "V1000-padded"),
    (8192, SPM, SPM, "widest-rows"),
    (8192, SPM, SPM + 1, "widest-rows-padded"),
    (8192, 32000, 32000, "V32000"),
    (8192, 32000, 32001, "V32000-padded"),
    (8192, 50257, 50257, "V50257"),
    (8192, 128256, 128256, "V128256"),
    (1, 128256, 128256, "V128256-one-row"),
]
CE_BY_LABEL = {s[3]: s for s in CE_SHAPES}
CE_WIDE = [s for s in CE_SHAPES if s[1] > SPM]  # the shapes a wide kernel takes by default
# (grad, reduction, label_smoothing): every combination, all on first. "sum" and "none" give
# the same kernel (MEAN=False), and shapes that pick the same tiles and hints compile once.
CE_FLAGS = [(g, r, s) for g in (True, False) for r in ("mean", "sum", "none") for s in (0.1, 0.0)]
CE_LAUNCH_KERNELS = ("_ce_rows_kernel", "_ce_chunked_kernel", "_ce_lanes_kernel")


def _ce_tuning_points():
    """Tuning parameter sets that change what a wide kernel compiles to: for each wide kernel,
    the defaults and each other value of each parameter it reads, one at a time (the lanes
    kernel's largest tile, LANES_MAX_PER_THREAD values a thread, is reached by its defaults;
    programs_per_sm changes only the grid)."""
    compiled = ("chunk_bytes", "warps", "num_stages", "count")
    points = []
    for wide in ce.SPACE["wide_kernel"]:
        base = dict(ce.DEFAULTS, wide_kernel=wide)
        points.append(base)
        for name in compiled + (("rows_per_program",) if wide == "lanes" else ()):
            points += [dict(base, **{name: v}) for v in ce.SPACE[name] if v != base[name]]
    return points


def _ce_variant(dtype: str, shape, flags, targets="i64", params=None, ignore_index=-100) -> Variant:
    n_rows, n_cols, stride, label = shape
    grad, reduction, smoothing = flags
    elem = DTYPES[dtype].itemsize
    kernel, meta = ce._kernel_config(n_rows, n_cols, stride, elem, grad=grad, reduction=reduction,
                                     label_smoothing=smoothing, params=params)
    meta = dict(meta)
    options = {"num_warps": meta.pop("num_warps")}
    if "num_stages" in meta:
        options["num_stages"] = meta.pop("num_stages")
    fn = _jit_function(kernel)
    # as softmax_cross_entropy passes them: logits, dlogits (the logits when grad=False),
    # targets, fp32 row losses, the int32 count of valid rows (the row losses as a placeholder
    # when no count kernel runs), then B, V, stride, ignore_index (int64 min for None), eps
    counted = meta["MEAN"] and meta["HAS_GRAD"] and not meta.get("COUNT", False)
    args = dict(x_ptr=Ptr(dtype), g_ptr=Ptr(dtype), t_ptr=Ptr(targets), loss_ptr=Ptr("fp32"),
                n_valid_ptr=Ptr("i32" if counted else "fp32"), n_rows=n_rows, n_cols=n_cols, stride=stride,
                ignore_index=ignore_index, eps=float(smoothing))
    signature, constexprs, attrs = _specialize(fn, args, meta)
    flag_id = "-".join(f"{k}{int(v)}" for k, v in meta.items() if isinstance(v, bool))
    tile = "-".join(f"{k}{meta[k]}" for k in ("ROWS", "BLOCK") if k in meta)
    kname = fn.__name__.split("_")[2]
    stages = f"-s{meta['NUM_STAGES']}" if "NUM_STAGES" in meta else ""
    return Variant(f"{dtype}-{kname}-{label}-{tile}-w{options['num_warps']}{stages}-{flag_id}-t{targets}"
                   f"{'-ign64' if ignore_index < -2**31 else ''}", fn, signature, constexprs, attrs, options)


def _ce_helper_variants():
    """The one-program count and finish kernels: int64 and int32 targets, an int32 and an
    int64 ignore_index, each reduction."""
    out = []
    for targets, ignore in (("i64", -100), ("i32", -2**63)):
        args = dict(t_ptr=Ptr(targets), n_valid_ptr=Ptr("i32"), n_rows=8192, ignore_index=ignore)
        fn = _jit_function(ce._ce_count_kernel)
        out.append(Variant(f"count-t{targets}-ign{ignore}", fn, *_specialize(fn, args, {"BLOCK": ce.REDUCE_BLOCK}),
                           {"num_warps": 4}))
        for mean in (True, False):
            fn = _jit_function(ce._ce_finish_kernel)
            args = dict(row_loss_ptr=Ptr("fp32"), out_ptr=Ptr("fp32"), t_ptr=Ptr(targets), n_rows=8191,
                        ignore_index=ignore)
            out.append(Variant(f"finish-MEAN{int(mean)}-t{targets}-ign{ignore}", fn,
                               *_specialize(fn, args, {"MEAN": mean, "BLOCK": ce.REDUCE_BLOCK}), {"num_warps": 4}))
    return out


def _ce_variants():
    """For each dtype and launched kernel, its default shapes × flag combinations: every
    combination on an aligned and an unaligned shape, the other shapes all on and all off. Then every tuning point on the unaligned V = 50257 (the most
    code), all flags on; the row kernel at single_pass_max 32768 (aligned V = 32000 held on
    chip) with every flag combination; int32 targets (with the int64 ignore_index that None
    maps to); the helper kernels."""
    combos = [f for f in CE_FLAGS if f[1] != "none"]  # "none" compiles as "sum"
    extremes = [CE_FLAGS[0], CE_FLAGS[-1]]  # all on; all off
    lanes = dict(ce.DEFAULTS, wide_kernel="lanes")
    narrow = [s for s in CE_SHAPES if s not in CE_WIDE]
    out = []
    for dtype in DTYPES:
        for shapes, full, params in ((narrow, ("V1000", "V1000-padded"), None),
                                     (CE_WIDE, ("V32000", "V50257"), None),
                                     (CE_WIDE, ("V32000", "V50257"), lanes)):
            out += [_ce_variant(dtype, shape, flags, params=params) for shape in shapes
                    for flags in (combos if shape[3] in full else extremes)]
        out += [_ce_variant(dtype, CE_BY_LABEL["V50257"], CE_FLAGS[0], params=point)
                for point in _ce_tuning_points()]
        on_chip = dict(ce.DEFAULTS, single_pass_max=32768)
        out += [_ce_variant(dtype, CE_BY_LABEL["V32000"], flags, params=on_chip) for flags in combos]
        # int32 targets (any integer dtype is accepted): once a kernel, all on
        for shape, params in ((CE_BY_LABEL["widest-rows"], None), (CE_BY_LABEL["V128256"], None),
                              (CE_BY_LABEL["V50257"], lanes)):
            out.append(_ce_variant(dtype, shape, CE_FLAGS[0], targets="i32", params=params, ignore_index=-2**63))
    return _dedupe(out + _ce_helper_variants())


#: The general kernel (class weights, probability targets, the [C] and N-d layouts): classes
#: adjacent ([B, V] with a weight or probabilities: the widest chunks), classes T apart ([B, V, T]:
#: 128 rows a tile), and narrow rows.
CE_GENERAL_SHAPES = [(8192, 32000, 1, "V32000-rows"), (8 * 4096, 32000, 4096, "V32000-BVT"), (4096, 1000, 1, "V1000-rows")]
#: (grad, reduction, label_smoothing, soft, weighted): all on, all off, and the mixes a launch meets.
CE_GENERAL_FLAGS = [(True, "mean", 0.1, True, True), (False, "sum", 0.0, False, False),
                    (True, "mean", 0.0, False, True), (True, "sum", 0.1, True, False)]


def _ce_general_variant(dtype: str, shape, flags) -> Variant:
    n_rows, n_cols, class_stride, label = shape
    grad, reduction, smoothing, soft, weighted = flags
    kernel, meta = ce_general._general_config(n_rows, n_cols, class_stride, grad=grad, reduction=reduction,
                                              label_smoothing=smoothing, soft=soft, weighted=weighted)
    meta = dict(meta)
    options = {"num_warps": meta.pop("num_warps")}
    fn = _jit_function(kernel)
    # as _launch_general passes them: probabilities in the logits' dtype (the logits when
    # absent), targets (the probabilities when soft), an fp32 weight (the logits when absent),
    # an fp32 denominator (the row losses as a placeholder), then the sizes, strides, ignore, eps
    sb, ss = (n_cols, 0) if class_stride == 1 else (n_cols * class_stride, 1)
    args = dict(x_ptr=Ptr(dtype), g_ptr=Ptr(dtype), t_ptr=Ptr(dtype if soft else "i64"), q_ptr=Ptr(dtype),
                w_ptr=Ptr("fp32" if weighted else dtype), loss_ptr=Ptr("fp32"), denom_ptr=Ptr("fp32"),
                n_rows=n_rows, n_cols=n_cols, n_spatial=class_stride, x_sb=sb, x_sc=class_stride, x_ss=ss, g_sb=sb, g_sc=class_stride,
                g_ss=ss, q_sb=sb if soft else 0, q_sc=class_stride if soft else 0, q_ss=ss if soft else 0,
                ignore_index=-100, eps=float(smoothing))
    signature, constexprs, attrs = _specialize(fn, args, meta)
    flag_id = "-".join(f"{k}{int(v)}" for k, v in meta.items() if isinstance(v, bool))
    return Variant(f"{dtype}-general-{label}-ROWS{meta['ROWS']}-BLOCK{meta['BLOCK']}-w{options['num_warps']}-"
                   f"{flag_id}", fn, signature, constexprs, attrs, options)


def _ce_general_variants():
    """Every dtype x shape all on; fp32 every flag set on the two wide shapes; the denominator
    (with and without weights) and finish kernels."""
    out = [_ce_general_variant(d, shape, CE_GENERAL_FLAGS[0]) for d in DTYPES for shape in CE_GENERAL_SHAPES]
    out += [_ce_general_variant("fp32", shape, f) for shape in CE_GENERAL_SHAPES[:2] for f in CE_GENERAL_FLAGS[1:]]
    for weighted in (True, False):
        fn = _jit_function(ce_general._ce_denominator_kernel)
        args = dict(t_ptr=Ptr("i64"), w_ptr=Ptr("fp32"), out_ptr=Ptr("fp32"), n_rows=8192, n_cols=32000,
                    ignore_index=-100)
        out.append(Variant(f"general-denominator-W{int(weighted)}", fn, *_specialize(
            fn, args, {"HAS_WEIGHT": weighted, "BLOCK": ce.REDUCE_BLOCK}), {"num_warps": 4}))
    for mean in (True, False):
        fn = _jit_function(ce_general._ce_finish_denom_kernel)
        args = dict(row_loss_ptr=Ptr("fp32"), out_ptr=Ptr("fp32"), denom_ptr=Ptr("fp32"), n_rows=8191)
        out.append(Variant(f"general-finish-MEAN{int(mean)}", fn, *_specialize(
            fn, args, {"MEAN": mean, "BLOCK": ce.REDUCE_BLOCK}), {"num_warps": 4}))
    return _dedupe(out)


# --------------------------------------------------------------------------------------------
# Linear-backward variants

def _launchable_configs(dtype: str):
    """The tiles a launch with this dtype may take (the default first): those of its element size."""
    return list(lb.tiles_for(DTYPES[dtype].itemsize))


def _config_id(tile) -> str:
    return tile.name


# Layouts as linear_backward passes them (M, N, K and ten strides), all from contiguous tensors
# unless said otherwise. JITFunction turns a stride of 1 into the constexpr 1, so the layout
# decides which strides are specialised.
def _layout(name, m, n, k, *, w_t=False):
    sx = (k, 1)
    sw = (1, n) if w_t else (k, 1)  # w given as the transpose of a [K, N] tensor
    sdy = (n, 1)
    sdx = (k, 1)
    sdw = (k, 1)
    return name, (m, n, k) + sx + sw + sdy + sdx + sdw


LB_LAYOUTS = dict([
    _layout("contig", 8192, 4096, 4096),
    _layout("odd-wT", 1000, 777, 333, w_t=True),  # no divisibility; w a transposed view
    _layout("m1", 1, 4096, 4096),  # a single row: M is the constexpr 1 (dW cannot split)
    _layout("int64", 2**20, 4096, 4096),  # M·K ≥ 2³¹: the launcher asks for 64-bit offsets
])
LB_INT64 = {"int64"}
LB_ALIGNED = {"contig", "m1", "int64"}  # every stride a multiple of 16 elements (or the constexpr 1)
LB_PROGRAMS = 132  # an H100's SMs: the grid and partition as the launcher computes them there


def _lb_variant(dtype: str, tile, layout: str, flags, default: bool) -> Variant:
    """flags = (need_dx, bias, dw_accumulate, allow_tf32, split dW, split dX): the constexprs and
    the scalar arguments as the launcher derives them from lb.geometry (a split asked for where
    the reduction has one step only is no split)."""
    need_dx, bias, accumulate, allow_tf32, split_w, split_x = flags
    fn = _jit_function(lb._linear_backward_kernel)
    m, n, k = LB_LAYOUTS[layout][:3]
    g = lb.geometry(m, n, k, tile, (2 if split_w else 1, 2 if split_x else 1), LB_PROGRAMS, need_dx, bias)
    meta = lb.constexprs(DTYPES[dtype], need_dx=need_dx, bias=bias, accumulate=accumulate,
                         allow_tf32=allow_tf32, int64=layout in LB_INT64, split_w=g.splits_w > 1,
                         split_x=g.splits_x > 1)
    launch = lb.tile_meta(tile)
    options = {"num_warps": launch.pop("num_warps"), "num_stages": launch.pop("num_stages")}
    meta.update(launch)
    # as the launcher passes them: dw is the fp32 dw_accumulate buffer or a new one in the input
    # dtype; dx and db are that dw when skipped, and so are ws and cnt when nothing splits
    dw = "fp32" if accumulate else dtype
    split = meta["SPLIT_W"] or meta["SPLIT_X"]
    args = dict(x_ptr=Ptr(dtype), w_ptr=Ptr(dtype), dy_ptr=Ptr(dtype), dx_ptr=Ptr(dtype if need_dx else dw),
                dw_ptr=Ptr(dw), db_ptr=Ptr(dtype if bias else dw), ws_ptr=Ptr("fp32" if split else dw),
                cnt_ptr=Ptr("i32" if split else dw))
    names = ["M", "N", "K", "sx_m", "sx_k", "sw_n", "sw_k", "sdy_m", "sdy_n", "sdx_m", "sdx_k", "sdw_n", "sdw_k"]
    args.update(zip(names, LB_LAYOUTS[layout]))
    args.update(p_dw=g.p_dw, splits_w=g.splits_w, chunk_w=g.chunk_w, splits_x=g.splits_x, chunk_x=g.chunk_x,
                ws_db_off=g.ws_db_off, ws_dx_off=g.ws_dx_off, cnt_db_off=g.cnt_db_off, cnt_dx_off=g.cnt_dx_off)
    signature, constexprs, attrs = _specialize(fn, args, meta)
    flag_id = "-".join(f"{k}{int(v)}" for k, v in meta.items() if isinstance(v, bool))
    return Variant(f"{dtype}-{_config_id(tile)}{'(default)' if default else ''}-{layout}-{flag_id}"
                   f"-{meta['PRECISION']}", fn, signature, constexprs, attrs, options,
                   spill_bounded=default and layout in LB_ALIGNED)


def _lb_variants():
    """A covering set (the full product, 1000+ kernels, is too long for CI): the default tile of
    each dtype with every (need_dx, bias, dw_accumulate, precision) combination unsplit and with
    each split (dW, dX, both) all flags on; every other tile all on with both splits and all off;
    the default tile all on with both splits in the other layouts."""
    out = []
    for dtype in DTYPES:
        tf32 = (True, False) if dtype == "fp32" else (False,)  # allow_tf32 changes only fp32
        tiles = _launchable_configs(dtype)
        default = tiles[0]
        for t in tf32:
            for d, b, a in itertools.product((True, False), repeat=3):
                out.append(_lb_variant(dtype, default, "contig", (d, b, a, t, False, False), True))
            for sw, sx in ((True, False), (False, True), (True, True)):
                out.append(_lb_variant(dtype, default, "contig", (True, True, True, t, sw, sx), True))
            for tile in tiles[1:]:
                out.append(_lb_variant(dtype, tile, "contig", (True, True, True, t, True, True), False))
                out.append(_lb_variant(dtype, tile, "contig", (False,) * 3 + (t, False, False), False))
            for layout in LB_LAYOUTS:
                if layout != "contig":
                    out.append(_lb_variant(dtype, default, layout, (True, True, True, t, True, True), True))
    return _dedupe(out)


# --------------------------------------------------------------------------------------------
# LM head "token_lse" variants: the logits GEMM and the one-pass row kernel

#: (rows of a chunk, D, V) as the launcher sees them: the target shape (V a multiple of 16) and
#: GPT-2's vocabulary (V = 50257: odd, the padded stride keeps rows 16-aligned)
LCE_SHAPES = {"V128256": (4096, 4096, 128256), "V50257": (2048, 1024, 50257)}
#: (bias, label_smoothing, softcap, class weights): all on, all off
LCE_FLAGS = {"on": (True, 0.1, 30.0, True), "off": (False, 0.0, None, False)}


def _lce_gemm_variant(dtype: str, shape: str, flags: str) -> Variant:
    rows, d, v = LCE_SHAPES[shape]
    bias, smoothing, softcap, weighted = LCE_FLAGS[flags]
    meta = lce._gemm_meta(DTYPES[dtype], has_bias=bias, label_smoothing=smoothing, softcap=softcap,
                          has_weight=weighted, allow_tf32=False)
    options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
    fn = _jit_function(lce._lce_logits_kernel)
    # as _TorchLseSteps.logits passes them: contiguous x and w, the padded buffer's stride, the
    # logits buffer in place of an absent bias or class weight
    args = dict(x_ptr=Ptr(dtype), w_ptr=Ptr(dtype), z_ptr=Ptr(dtype), p_ptr=Ptr("fp32"), b_ptr=Ptr(dtype),
                cw_ptr=Ptr("fp32" if weighted else dtype), n_rows=rows, n_cols=v, n_k=d, sx_m=d, sx_k=1, sw_n=d,
                sw_k=1, stride=-(-v // lce.ROW_PAD) * lce.ROW_PAD, cap=float(softcap or 1.0))
    return Variant(f"{dtype}-lce-logits-{shape}-{flags}-{meta['PRECISION']}", fn, *_specialize(fn, args, meta),
                   options)


def _lce_rows_variant(dtype: str, shape: str, flags: str) -> Variant:
    rows, _, v = LCE_SHAPES[shape]
    _, smoothing, softcap, weighted = LCE_FLAGS[flags]
    n_tiles = lce._n_tiles(v, DTYPES[dtype].itemsize)
    meta = lce._lse_meta(v, n_tiles, grad=True, label_smoothing=smoothing, z_loss=0.0 if weighted else 1e-4,
                         softcap=softcap, row_scale=flags == "on", has_weight=weighted)
    options = {"num_warps": meta.pop("num_warps")}
    fn = _jit_function(lce._lce_lse_rows_kernel)
    args = dict(z_ptr=Ptr(dtype), stride=-(-v // lce.ROW_PAD) * lce.ROW_PAD, p_ptr=Ptr("fp32"), n_tiles=n_tiles,
                t_ptr=Ptr("i64"), loss_ptr=Ptr("fp32"), lse_ptr=Ptr("fp32"), scale_ptr=Ptr("fp32"),
                cw_ptr=Ptr("fp32"), cw_sum_ptr=Ptr("fp32"), n_cols=v, ignore_index=-100, smoothing=float(smoothing),
                z_coef=0.0 if weighted else 1e-4, cap=float(softcap or 1.0))
    return Variant(f"{dtype}-lce-lse-rows-{shape}-{flags}", fn, *_specialize(fn, args, meta), options)


def _lce_variants():
    """A few (each GEMM compile takes seconds): the GEMM in bf16 all on and all off at the
    target shape, fp16 all on at V = 50257, fp32 (IEEE) all on; the row kernel in bf16 all on
    at the target shape and all off at V = 50257, fp32 all on at V = 50257."""
    return _dedupe([_lce_gemm_variant("bf16", "V128256", "on"), _lce_gemm_variant("bf16", "V128256", "off"),
                    _lce_gemm_variant("fp16", "V50257", "on"), _lce_gemm_variant("fp32", "V128256", "on"),
                    _lce_rows_variant("bf16", "V128256", "on"), _lce_rows_variant("bf16", "V50257", "off"),
                    _lce_rows_variant("fp32", "V50257", "on")])


CE_VARIANTS = _ce_variants() + _ce_general_variants()
LB_VARIANTS = _lb_variants()
LCE_VARIANTS = _lce_variants()


# --------------------------------------------------------------------------------------------
# Compile and check, in a worker process
#
# Without a GPU, conftest sets TRITON_INTERPRET=1 before triton is imported, and then triton's
# own library (tl.max, tl.sum, ...) is defined as interpreted functions: nothing can be compiled
# in this process. One worker process, started without TRITON_INTERPRET, compiles the variants
# one at a time (this file run as a script: it builds the same variant lists).

_PTXAS_STATS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_VARIANTS = {v.id: v for v in CE_VARIANTS + LB_VARIANTS + LCE_VARIANTS}
_COMPILE_TIMEOUT_S = 600


def _ptxas_report(compiled, log: str) -> dict:
    """Registers, stack frame and spill bytes from ptxas -v: the log triton printed, or (when
    this triton prints none) a second ptxas run over the PTX."""
    stats, regs = _PTXAS_STATS.search(log), _PTXAS_REGS.search(log)
    if stats is None or regs is None:
        with tempfile.TemporaryDirectory() as tmp:
            ptx = Path(tmp, "k.ptx")
            ptx.write_text(compiled.asm["ptx"])
            arch = re.search(r"^\.target\s+(\S+)", compiled.asm["ptx"], re.M).group(1)
            log = subprocess.run([_ptxas_path(), "-v", f"--gpu-name={arch}", str(ptx), "-o", str(ptx) + ".o"],
                                 capture_output=True, text=True, check=True).stderr
        stats, regs = _PTXAS_STATS.search(log), _PTXAS_REGS.search(log)
    if not (stats and regs):
        raise RuntimeError(f"no ptxas -v report:\n{log}")
    stack, spill_stores, spill_loads = map(int, stats.groups())
    return dict(registers=int(regs.group(1)), stack=stack, spill_stores=spill_stores, spill_loads=spill_loads)


def _compile(v: Variant) -> dict:
    """Compile one variant for sm_90 (in the worker) and report what the test checks."""
    src = ASTSource(fn=v.fn, signature=v.signature, constexprs=v.constexprs, attrs=v.attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", TARGET_ARCH, 32), options=v.options)
    report = _ptxas_report(compiled, log.getvalue())
    report["shared"] = compiled.metadata.shared
    report["num_warps"], report["num_stages"] = compiled.metadata.num_warps, compiled.metadata.num_stages
    # what compiled.n_spills reads once the kernel is loaded on a GPU: local memory bytes / 4
    report["n_spills"] = report["stack"] // 4
    report["st_global"] = "st.global" in compiled.asm["ptx"]
    return report


def _serve():
    """The worker: a variant id a line on stdin, one JSON line back ({"report": ...} or {"error": ...})."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else written to stdout (triton, ptxas, MLIR) goes to stderr
    sys.stdout = sys.stderr
    for line in sys.stdin:
        vid = line.strip()
        try:
            reply = {"report": _compile(_VARIANTS[vid])}
        except BaseException as e:  # noqa: BLE001 - reported to the test, which fails with it
            reply = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


class _Worker:
    """The parent's end: starts the worker on first use (again after a crash)."""

    def __init__(self, cache_dir: str):
        self.cache_dir = cache_dir
        self.proc = None

    def _start(self):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(TRITON_ALWAYS_COMPILE="1",  # past any cache, so ptxas runs and prints -v
                   TRITON_DUMP_PTXAS_LOG="1", TRITON_CACHE_DIR=self.cache_dir,
                   PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.stderr = []
        threading.Thread(target=self._drain, args=(self.proc.stderr, self.stderr), daemon=True).start()

    @staticmethod
    def _drain(stream, lines):
        for line in stream:
            lines.append(line)
            del lines[:-200]

    def compile(self, vid: str) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(vid + "\n")
        self.proc.stdin.flush()
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout=_COMPILE_TIMEOUT_S)
        sel.close()
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise AssertionError(f"the compile worker died or hung on {vid}:\n{''.join(self.stderr[-40:])}")
        return json.loads(line)

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = _Worker(str(tmp_path_factory.mktemp("triton-cache")))
    yield w
    w.close()


def _check(vid: str, worker):
    reply = worker.compile(vid)
    assert "error" not in reply, f"{vid} does not compile for sm_{TARGET_ARCH}: {reply.get('error')}"
    r = reply["report"]
    print(f"{vid}: {r}")  # shown with -s / -rA: registers, stack, spills, shared memory
    if _VARIANTS[vid].spill_bounded:
        assert max(r["spill_stores"], r["spill_loads"]) <= SPILL_BUDGET, (
            f"{vid} spills more than {SPILL_BUDGET} bytes a thread: {r}")
    assert r["shared"] <= MAX_SHARED, f"{vid} needs {r['shared']} bytes of shared memory (> {MAX_SHARED})"
    assert r["st_global"], f"{vid}: no st.global in the PTX"


@pytest.mark.parametrize("vid", [v.id for v in CE_VARIANTS])
def test_cross_entropy_compiles_for_hopper(vid, worker):
    _check(vid, worker)


@pytest.mark.parametrize("vid", [v.id for v in LB_VARIANTS])
def test_linear_backward_compiles_for_hopper(vid, worker):
    _check(vid, worker)


@pytest.mark.parametrize("vid", [v.id for v in LCE_VARIANTS])
def test_lm_head_token_lse_compiles_for_hopper(vid, worker):
    _check(vid, worker)


# --------------------------------------------------------------------------------------------
# The variant lists cover what the launchers can pick

def _config_id_of(v: Variant) -> str:
    c = v.constexprs
    return f"{c['BLOCK_R']}x{c['BLOCK_C']}x{c['BLOCK_RED']}-w{v.options['num_warps']}-s{v.options['num_stages']}"


def test_variants_cover_every_dtype_kernel_and_config():
    ce_kernels = {(v.id.split("-")[0], v.fn.__name__) for v in CE_VARIANTS if v.fn.__name__ in CE_LAUNCH_KERNELS}
    assert ce_kernels == {(d, k) for d in DTYPES for k in CE_LAUNCH_KERNELS}
    for dtype in DTYPES:
        want = {_config_id(c) for c in _launchable_configs(dtype)}
        got = {_config_id_of(v) for v in LB_VARIANTS if v.id.startswith(dtype + "-")}
        assert want and want == got, (dtype, want, got)


def test_spill_budget_covers_every_ce_variant_and_each_default_in_every_aligned_layout():
    assert all(v.spill_bounded for v in CE_VARIANTS)
    bounded = {(v.id.split("-")[0], next(l for l in LB_LAYOUTS if f"-{l}-" in v.id)) for v in LB_VARIANTS
               if v.spill_bounded}
    assert bounded == {(d, l) for d in DTYPES for l in LB_ALIGNED}
    assert all("(default)" in v.id for v in LB_VARIANTS if v.spill_bounded)


def test_arg_types_match_this_triton():
    """_arg_type agrees with how this triton types launch arguments (where it says)."""
    mangle = getattr(importlib.import_module("triton.runtime.jit"), "mangle_type", None)
    if mangle is None:
        pytest.skip("this triton has no triton.runtime.jit.mangle_type to compare with")
    for value in (1, 5, 16, -100, 2**31 - 1, 2**31, 2**33, 0.1):
        assert _arg_type(value)[0] == mangle(value, True), value


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_linear_flag_and_split_is_compiled_with_the_default_tile(dtype):
    """The tile launched without timing candidates (the first of the element size, named in the
    tuning space) is compiled with every (need_dx, bias, dw_accumulate, precision) combination, and
    with each split flag on; every tile with both splits on."""
    default = _launchable_configs(dtype)[0]
    assert default.name in lb.TUNING_SPACE["tile_fp32" if dtype == "fp32" else "tile_16bit"]
    flags = ("NEED_DX", "HAS_BIAS", "ACCUMULATE", "PRECISION", "SPLIT_W", "SPLIT_X")
    seen = {tuple(v.constexprs[f] for f in flags) for v in LB_VARIANTS
            if v.id.startswith(f"{dtype}-{default.name}(default)-contig-")}
    precisions = ("tf32", "ieee") if dtype == "fp32" else ("ieee",)
    for d, b, a in itertools.product((True, False), repeat=3):
        for p in precisions:
            assert (d, b, a, p, False, False) in seen
    for p in precisions:
        for sw, sx in ((True, False), (False, True), (True, True)):
            assert (True, True, True, p, sw, sx) in seen
    both = {_config_id_of(v) for v in LB_VARIANTS
            if v.id.startswith(dtype + "-") and v.constexprs["SPLIT_W"] and v.constexprs["SPLIT_X"]}
    assert both == {t.name for t in _launchable_configs(dtype)}


def test_every_ce_flag_combination_is_compiled():
    """Each (HAS_GRAD, MEAN, SMOOTH, ALIGNED) combination of each kernel and dtype compiles somewhere."""
    seen = {(v.id.split("-")[0], v.fn.__name__,
             tuple(v.constexprs[k] for k in ("HAS_GRAD", "MEAN", "SMOOTH", "ALIGNED")))
            for v in CE_VARIANTS if v.fn.__name__ in CE_LAUNCH_KERNELS}
    for dtype, kernel in itertools.product(DTYPES, CE_LAUNCH_KERNELS):
        for flags in itertools.product((True, False), repeat=4):
            assert (dtype, kernel, flags) in seen, (dtype, kernel, flags)


def test_general_kernel_variants_cover_its_flags_and_layouts():
    """The general kernel compiles in every dtype on each of its shapes, and each of its flags
    compiles on and off."""
    general = [v for v in CE_VARIANTS if v.fn.__name__ == "_ce_general_kernel"]
    for d, shape in itertools.product(DTYPES, CE_GENERAL_SHAPES):
        assert any(v.id.startswith(f"{d}-general-{shape[3]}-") for v in general), (d, shape)
    for flag in ("HAS_GRAD", "MEAN", "SMOOTH", "SOFT", "HAS_WEIGHT"):
        assert {v.constexprs[flag] for v in general} == {True, False}, flag


def test_compiled_kernel_modules_import_no_launch_code():
    """The modules compiled here import, from the package, only the tuning registry and each
    other: a copy of one defines kernels and their launch geometry, and runs no launcher code
    (interop, plans, argument checks)."""
    copies = {m.__name__.rsplit("._aot_", 1)[1] for m in (ce, ce_general, lb)}
    for module in (ce, ce_general, lb):
        for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            names = [a.name for a in node.names]
            if node.level == 1:  # a sibling module of gpuad.kernels.triton
                assert node.module in copies, (module.__name__, node.module)
            elif node.level == 2 or node.module == "gpuad.kernels":
                assert names == ["tuning"], (module.__name__, node.module, names)
            else:
                assert not node.module.startswith("gpuad"), (module.__name__, node.module)


def test_every_ce_tuning_value_is_compiled():
    """Each value of each tuning parameter that changes the compiled code is among the tuning
    points compiled above (programs_per_sm changes only the grid; single_pass_max 32768 is
    the on-chip row kernel, the smaller ones send narrower rows to the wide kernels)."""
    points = _ce_tuning_points()
    for wide in ce.SPACE["wide_kernel"]:
        names = ("chunk_bytes", "warps", "num_stages", "count") + (("rows_per_program",) if wide == "lanes" else ())
        for name in names:
            got = {p[name] for p in points if p["wide_kernel"] == wide}
            assert got == set(ce.SPACE[name]), (wide, name, got)
    on_chip = {v.constexprs["BLOCK"] for v in CE_VARIANTS if v.fn.__name__ == "_ce_rows_kernel"}
    assert max(ce.SPACE["single_pass_max"]) in on_chip


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
