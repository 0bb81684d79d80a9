"""The CUDA C kernels of gpuad.kernels.cupy, run on the CPU, against the float64 numpy reference.

No GPU needed: the exact text CuPy would compile (``compile.source(...)``: the prelude
common.cuh, then the .cu file) is compiled as host C++20 with ``tests/cuda_emu.h``, a small
emulation of the CUDA builtins the kernels use:

- one ``std::thread`` per CUDA thread of a block (a pool, reused by every launch); the blocks
  of a grid run one after another; ``__shared__`` arrays are statics that one block owns at a
  time;
- ``__syncthreads`` is a ``std::barrier`` of the block, ``__shfl_xor_sync`` a ``std::barrier``
  of the warp (32 threads) around an exchange array, so every thread takes its real part in the
  reductions, in the kernel's own order;
- the prelude's three inline-PTX conversions (fp16 <-> fp32, fp32 -> bf16) are replaced, by
  text substitution, with host functions that round to nearest even. That the PTX itself
  compiles is checked separately, with nvcc and NVRTC, in tests/test_cuda_sources.py;
  ``test_prelude_conversions`` checks the host replacements bit by bit here.

The launch geometry (grid, block, split counts, kernel names) comes from the CuPy launchers'
own constants and functions (cross-entropy runs the launcher's own launch list,
cross_entropy.launches, for each candidate of its tuning space), and each emulated launch
repeats the launcher's sequence of kernels, with CuPy's argument convention (numpy scalars of the parameter's type; a wrapper
checks every argument's kind against the kernel's signature). Outputs are poisoned with NaN
before each launch, so an element a kernel forgets to write fails the comparison.

What this proves: indexing (64-bit offsets, 16-byte vector heads and tails, unaligned base
pointers, grid-stride loops over rows, split reductions), the reduction and barrier logic,
masking of ignored and out-of-range targets, and the numerics of the algorithm in fp32. What it
does NOT prove: anything about timing, memory coalescing or bank conflicts, real warp
scheduling (independent thread scheduling, lanes that run ahead between barriers), blocks
running concurrently, or GPU math: nvcc contracts a*b+c into FMA and CUDA's exp2f / logf
differ from libm in the last bits, so results are compared with tolerances, not bit for bit
with a GPU (the GPU tests in tests/test_cupy_kernels.py do that on a device).
"""
from __future__ import annotations

import ctypes
import importlib
import os
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest

import closeness
from closeness import GRAD_RTOL, LOSS_RTOL, grad_atol
from gpuad.kernels import checks
from gpuad.kernels import reference as ref
from gpuad.kernels.cupy import compile as cc

# by module path: the package re-exports functions under the names of the modules
ce = importlib.import_module("gpuad.kernels.cupy.cross_entropy")
lb = importlib.import_module("gpuad.kernels.cupy.linear_backward")
LAUNCHERS = (ce, lb)

HERE = pathlib.Path(__file__).resolve().parent
HEADER = "cuda_emu.h"

#: inline PTX of the prelude -> host code of cuda_emu.h. Each must be found, and no asm(
#: may remain, so that a change to the prelude fails here instead of being skipped.
ASM_SUBSTITUTIONS = {
    'asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));': "f = emu_f16_to_f32(h);",
    'asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));': "h = emu_f32_to_f16(f);",
    'asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(f));': "b = emu_f32_to_bf16(f);",
}
CXX_FLAGS = ("-std=c++20", "-O2", "-shared", "-fPIC", "-pthread",
             "-fno-strict-aliasing",  # the kernels read logits through 16-byte Pack16 structs
             # Export only the emu_* entry points: the two libraries define the same emulation
             # state, which the dynamic linker would otherwise bind to one copy process-wide
             # (inline variables are unique symbols, whatever RTLD_LOCAL says).
             "-fvisibility=hidden")

DTYPES = tuple(ce.SUFFIX)  # float32, float16, bfloat16
IGNORE = -100
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}  # bf16: bit patterns
POISON = {"float32": np.float32(np.nan), "float16": np.float16(np.nan), "bfloat16": np.uint16(0x7fc0)}

# Tolerances: the reference runs in float64 on the very values the kernel reads (rounded to
# the dtype first), so losses get fp32 tolerances for every dtype; gradients add one rounding
# to the output dtype.
LOSS_ATOL = closeness.ROW_LOSS_ATOL


# ---------------------------------------------------------------- the emulated source

def emulated_source(filename: str, substitutions=ASM_SUBSTITUTIONS) -> str:
    """compile.source(filename) with every inline-PTX conversion replaced by host code."""
    text = cc.source(filename)
    for asm, host in substitutions.items():
        assert asm in text, f"{filename}: the prelude no longer contains {asm!r}; update ASM_SUBSTITUTIONS"
        text = text.replace(asm, host)
    assert "asm(" not in text, f"{filename}: inline PTX left that the host emulation cannot compile"
    return text


def wrappers(launcher) -> str:
    """One exported emu_launch_<kernel> per kernel the launcher requests."""
    out = []
    for name in launcher.KERNEL_NAMES:
        out.append(
            f"EMU_EXPORT int emu_launch_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx,\n"
            f"        unsigned by, unsigned bz, void** args, const char* kinds, int n_args) {{\n"
            f"    return emu::launch_kernel(&{name}, dim3{{gx, gy, gz}}, dim3{{bx, by, bz}}, args, kinds,\n"
            f"                              n_args);\n}}\n")
    return "\n".join(out)


# The prelude's conversions, exported from the cross-entropy library for test_prelude_conversions.
CONVERSIONS = ("f16_to_f32", "f32_to_f16", "bf16_to_f32", "f32_to_bf16")
CONVERT_WRAPPER = """
EMU_EXPORT void emu_convert(int which, const void* in, void* out, long long n) {
    for (long long i = 0; i < n; ++i) {
        if (which == 0) ((float*)out)[i] = f16_to_f32(((const u16*)in)[i]);
        else if (which == 1) ((u16*)out)[i] = f32_to_f16(((const float*)in)[i]);
        else if (which == 2) ((float*)out)[i] = bf16_to_f32(((const u16*)in)[i]);
        else ((u16*)out)[i] = f32_to_bf16(((const float*)in)[i]);
    }
}
"""


def _find_cxx(work: pathlib.Path):
    """(compiler, None), or (None, why not): the first of $CXX, g++, c++, clang++ that compiles
    a C++20 file using <barrier>, <semaphore> and _Float16 into a shared library."""
    probe = work / "probe.cpp"
    probe.write_text("#include <barrier>\n#include <semaphore>\n"
                     "int probe() { std::barrier<> b(1); b.arrive_and_wait(); _Float16 h = (_Float16)1.5f;"
                     " return (int)(float)h; }\n")
    tried = []
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        path = shutil.which(name) if name else None
        if not path or path in tried:
            continue
        tried.append(path)
        proc = subprocess.run([path, *CXX_FLAGS, str(probe), "-o", str(work / "probe.so")],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            return path, None
    return None, (f"no C++20 compiler with <barrier>, <semaphore> and _Float16 found (tried "
                  f"{', '.join(tried) or '$CXX, g++, c++, clang++: none on PATH'})")


# CuPy's argument convention: arrays (or None, a null pointer) and numpy scalars of the
# parameter's type. Kinds as cuda_emu.h's kind_of: P pointer, q int64, i int32, f float.
_SCALARS = ((np.int64, ctypes.c_int64, "q"), (np.int32, ctypes.c_int32, "i"), (np.float32, ctypes.c_float, "f"))


def _kernel_arg(kernel, a):
    """(ctypes value, kind) of one kernel argument."""
    if a is None or isinstance(a, np.ndarray):
        return ctypes.c_void_p(None if a is None else a.ctypes.data), "P"
    for np_type, c_type, kind in _SCALARS:
        if isinstance(a, np_type):
            return c_type(a.item()), kind
    raise TypeError(f"{kernel}: an argument of type {type(a).__name__}")


class EmulatedModule:
    """The emulated counterpart of a cupy.RawModule: ``module(name, grid, block, args)``
    launches the kernel `name` as ``get_function(SOURCE, name)(grid, block, args)`` would."""

    def __init__(self, path, launcher):
        self.cdll = ctypes.CDLL(str(path))
        self.kernels = {}
        for name in launcher.KERNEL_NAMES:
            fn = getattr(self.cdll, f"emu_launch_{name}")
            fn.argtypes = [ctypes.c_uint] * 6 + [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_int]
            fn.restype = ctypes.c_int
            self.kernels[name] = fn

    def __call__(self, name, grid, block, args):
        assert name in self.kernels, f"{name} is not among the launcher's KERNEL_NAMES"
        values, kinds = zip(*(_kernel_arg(name, a) for a in args)) if args else ((), ())
        kinds = "".join(kinds)
        argv = (ctypes.c_void_p * max(1, len(values)))(
            *[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        grid3 = (tuple(grid) + (1, 1))[:3]
        block3 = (tuple(block) + (1, 1))[:3]
        rc = self.kernels[name](*grid3, *block3, argv, kinds.encode(), len(values))
        assert rc == 0, (f"{name}: the arguments do not match the kernel's parameters (rc {rc}: -1 = count, "
                         f"-2-i = kind of argument i; given {kinds!r})")


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """SOURCE -> EmulatedModule: one shared library per .cu file (both hold the prelude, so
    they cannot be linked together), compiled in parallel."""
    work = tmp_path_factory.mktemp("cuda_emu")
    cxx, why = _find_cxx(work)
    if cxx is None:
        pytest.skip(why)
    jobs = []
    for launcher in LAUNCHERS:
        stem = launcher.SOURCE[:-3]
        unit = work / f"{stem}_emu.cpp"
        extra = CONVERT_WRAPPER if launcher is ce else ""
        unit.write_text(f'#include "{HEADER}"\n\n{emulated_source(launcher.SOURCE)}\n\n{wrappers(launcher)}{extra}')
        lib = work / f"lib{stem}_emu.so"
        cmd = [cxx, *CXX_FLAGS, f"-I{HERE}", str(unit), "-o", str(lib)]
        jobs.append((launcher, lib, cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                          text=True)))
    modules = {}
    for launcher, lib, cmd, proc in jobs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"building the emulation of {launcher.SOURCE} failed:\n{' '.join(cmd)}\n{out}"
        modules[launcher.SOURCE] = EmulatedModule(lib, launcher)
    return modules


# ---------------------------------------------------------------- host arrays

def aligned(n, name, offset=0, fill=None):
    """A 1-D array of n elements of dtype `name` (bf16 as uint16 bits) that starts `offset`
    elements past a 64-byte boundary."""
    dtype = np.dtype(STORAGE[name])
    raw = np.empty((n + offset) * dtype.itemsize + 64, np.uint8)
    start = -raw.ctypes.data % 64
    a = raw[start:start + (n + offset) * dtype.itemsize].view(dtype)[offset:]
    assert n == 0 or a.ctypes.data % 64 == offset * dtype.itemsize % 64  # (numpy moves empty arrays)
    if fill is not None:
        a[...] = fill
    return a


def f32_to_bf16_bits(a):
    """float32 -> bf16 bit patterns (uint16), round to nearest even (for building inputs)."""
    a = np.asarray(a, np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(a), np.uint16(0x7FC0), r)


def bf16_bits_to_f32(b):
    return (np.asarray(b, np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_storage(a32, name):
    return f32_to_bf16_bits(a32) if name == "bfloat16" else np.asarray(a32).astype(STORAGE[name])


def to_f64(a, name):
    a = np.asarray(a)
    return (bf16_bits_to_f32(a) if name == "bfloat16" else a).astype(np.float64)


def close(got, want, rtol, atol, what, name=None):
    """closeness.assert_close on host arrays, bf16 given as bit patterns when `name` says so."""
    closeness.assert_close(to_f64(got, name) if name else got, want, rtol, atol, what)


# ---------------------------------------------------------------- the launchers, emulated

def ce_emulated(module, logits, name, targets, *, ignore_index=IGNORE, reduction="mean", label_smoothing=0.0,
                inplace=False, grad=True, params=None, sm_count=132):
    """cross_entropy.softmax_cross_entropy on host arrays (logits C-contiguous, of dtype
    `name`): its own launch list (ce.launches, with the tuning parameters `params` and
    `sm_count` SMs), run on poisoned outputs."""
    n_rows, n_cols = (int(d) for d in logits.shape)
    assert logits.flags.c_contiguous
    t = np.ascontiguousarray(targets, dtype=np.int64)
    row_loss = np.full(n_rows, np.nan, np.float32)
    n_valid = np.full((), -5, np.int64) if reduction == "mean" else None
    loss = row_loss if reduction == "none" else np.full((), np.nan, np.float32)
    dlogits = None
    if grad:  # like cupy.empty_like: a fresh, aligned buffer
        dlogits = logits if inplace else aligned(logits.size, name, fill=POISON[name]).reshape(logits.shape)
    for kernel, grid, block, args in ce.launches(
            logits, dlogits, t, row_loss, n_valid, None if reduction == "none" else loss, dtype_name=name,
            reduction=reduction, ignore=checks.kernel_ignore_index(ignore_index, t.dtype), eps=label_smoothing,
            params=params,
            sm_count=sm_count):
        module(kernel, grid, block, args)
    return loss, dlogits


def bias_grad_emulated(module, dy, name):
    """The launch sequence of linear_backward.bias_grad: (db, number of row splits)."""
    m, n = (int(d) for d in dy.shape)
    suffix = lb.SUFFIX[name]
    db = aligned(n, name, fill=POISON[name])
    if n == 0:
        return db, 0
    splits, rows_per_split = lb.bias_grad_splits(m, n)
    partial = np.full((splits, n), np.nan, np.float32) if splits > 1 else None
    module(f"bias_grad_{suffix}", (-(-n // lb.TILE_N), splits), (lb.TILE_N, lb.ROWS),
           (dy, partial, db, np.int64(m), np.int64(n), np.int64(rows_per_split)))
    if partial is not None:
        module(f"bias_grad_finish_{suffix}", (-(-n // lb.FINISH_THREADS),), (lb.FINISH_THREADS,),
               (partial, db, np.int64(n), np.int64(splits)))
    return db, splits


# ---------------------------------------------------------------- checks without the build

def _define(source, macro):
    found = re.findall(rf"^\s*#\s*define\s+{macro}\s+(\d+)\s*$", cc.source(source), flags=re.M)
    assert len(found) == 1, f"{source}: expected one #define {macro} <integer>, found {found}"
    return int(found[0])


def test_launch_constants_match_the_sources():
    assert (lb.TILE_N, lb.ROWS) == (_define(lb.SOURCE, "BG_TILE_N"), _define(lb.SOURCE, "BG_ROWS")), \
        "linear_backward.TILE_N / ROWS must equal BG_TILE_N / BG_ROWS of bias_grad.cu"
    assert lb.TILE_N * lb.ROWS <= 1024 and lb.FINISH_THREADS <= 1024
    ce_max = _define(ce.SOURCE, "CE_MAX_THREADS")
    assert ce.REDUCE_THREADS <= ce_max and ce.REDUCE_THREADS % 32 == 0
    for name in DTYPES:  # the row kernel needs a multiple of 32 threads, at most CE_MAX_THREADS
        for n_cols in (*VOCABS, 100, 70, 10**6):
            threads = ce.threads_per_row(n_cols, name)
            assert threads % 32 == 0 and 32 <= threads <= ce_max, (name, n_cols, threads)


@pytest.mark.parametrize("source", sorted({launcher.SOURCE for launcher in LAUNCHERS}))
def test_substitutions_leave_no_inline_ptx(source):
    text = emulated_source(source)
    for host in ASM_SUBSTITUTIONS.values():
        assert host in text


def test_arguments_are_checked_against_the_kernel(emulated):
    module = emulated[ce.SOURCE]
    t, out = np.zeros(4, np.int64), np.full((), -5, np.int64)
    with pytest.raises(AssertionError, match=r"rc -3\b"):  # argument 1 (n_rows) as int32; the kernel takes i64
        module("ce_count_valid", (1,), (32,), (t, np.int32(4), np.int64(IGNORE), out))
    with pytest.raises(AssertionError, match=r"rc -1\b"):
        module("ce_count_valid", (1,), (32,), (t, np.int64(4), np.int64(IGNORE)))
    module("ce_count_valid", (1,), (32,), (t, np.int64(4), np.int64(IGNORE), out))
    assert out == 4


# ---------------------------------------------------------------- conversions of the prelude

def _nearest_bf16_bits(a):
    """Independent reference for fp32 -> bf16: the nearer of the two neighbouring bf16 values,
    computed in float64 (ties to the even pattern; beyond the largest bf16, 2^128 stands for inf)."""
    a = np.asarray(a, np.float32)
    finite = np.isfinite(a)
    a = np.where(finite, a, np.float32(0))  # NaN and inf: flagged, checked apart
    u = a.view(np.uint32)
    sign = (u >> 16) & 0x8000
    mag = np.abs(a).astype(np.float64)
    lo = ((u & 0x7FFFFFFF) >> 16).astype(np.uint32)  # bf16 magnitude bits, truncated
    hi = lo + 1

    def value(bits):
        v = ((bits.astype(np.uint32) << 16)).view(np.float32).astype(np.float64)
        return np.where(bits == 0x7F80, 2.0**128, v)

    d_lo, d_hi = mag - value(lo), value(hi) - mag
    up = (d_hi < d_lo) | ((d_hi == d_lo) & (lo % 2 == 1))
    out = (np.where(up, hi, lo) | sign).astype(np.uint16)
    return out, ~finite


def test_prelude_conversions(emulated):
    """The host replacements of the inline PTX, called through the prelude's own functions,
    against numpy (fp16) and an independent float64 reference (bf16), bit for bit."""
    lib = emulated[ce.SOURCE].cdll

    def convert(which, a, out_dtype):
        a = np.ascontiguousarray(a)
        out = np.empty(a.shape, out_dtype)
        lib.emu_convert(ctypes.c_int(CONVERSIONS.index(which)), ctypes.c_void_p(a.ctypes.data),
                        ctypes.c_void_p(out.ctypes.data), ctypes.c_longlong(a.size))
        return out

    def same(got, want, what):
        nan_got, nan_want = np.isnan(got), np.isnan(want)
        assert (nan_got == nan_want).all(), f"{what}: NaN where none is expected, or the reverse"
        ok = got[~nan_got].view(f"u{got.itemsize}") == want[~nan_want].view(f"u{want.itemsize}")
        assert ok.all(), f"{what}: {np.count_nonzero(~ok)} differ, e.g. got {got[~nan_got][~ok][:3]}, " \
                         f"want {want[~nan_want][~ok][:3]}"

    every16 = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    same(convert("f16_to_f32", every16, np.float32), every16.view(np.float16).astype(np.float32), "f16_to_f32")
    same(convert("bf16_to_f32", every16, np.float32), bf16_bits_to_f32(every16), "bf16_to_f32")

    rng = np.random.default_rng(0)
    random_bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    halves = every16.view(np.float16)
    finite = np.sort(halves[np.isfinite(halves) & (halves >= 0)].astype(np.float64))
    mids = ((finite[:-1] + finite[1:]) / 2).astype(np.float32)  # exact in fp32: the ties of fp16
    near = np.concatenate([mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(np.inf))])
    bf_ties = ((every16.astype(np.uint32) << 16) | 0x8000).view(np.float32)  # the ties of bf16
    bf_ties = bf_ties[np.isfinite(bf_ties)]
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, 1e-8, 6e-8,
                         3.4028235e38, -3.4028235e38, 1.1754944e-38], np.float32)
    f32 = np.concatenate([random_bits, near, -near, bf_ties, np.nextafter(bf_ties, np.float32(0)), specials])
    f32 = f32.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        same(convert("f32_to_f16", f32, np.uint16).view(np.float16), f32.astype(np.float16), "f32_to_f16")
    got = convert("f32_to_bf16", f32, np.uint16)
    want, special = _nearest_bf16_bits(f32)
    same(bf16_bits_to_f32(got[~special]), bf16_bits_to_f32(want[~special]), "f32_to_bf16")
    assert (np.isnan(bf16_bits_to_f32(got)) == np.isnan(f32)).all(), "f32_to_bf16: NaN not kept"
    inf = np.isinf(f32)
    assert (bf16_bits_to_f32(got[inf]) == f32[inf]).all(), "f32_to_bf16: inf not kept"


# ---------------------------------------------------------------- cross-entropy

VOCABS = (1, 7, 33, 1031, 4099)
REDUCTIONS = ("mean", "sum", "none")
#: (label_smoothing, row offset of the logits in elements, inplace): a strength-2 orthogonal
#: array, so every pair of values of these three flags occurs.
FLAGS = ((0.0, 0, False), (0.0, 1, True), (0.1, 0, True), (0.1, 1, False))
EMU_SMS = 2  # the emulated GPU's SMs: blocks_per_sm = 2 gives a grid of 4 blocks
#: Row-kernel candidates of the tuning space (ce.SPACE), each value of each parameter at least
#: once: layouts, vector widths, pass-2 orders, persistent grids (fewer blocks, or warps, than
#: the 9 rows: the grid-stride loop over rows runs) and explicit block sizes.
CE_VARIANTS = {
    "block": {},
    "block-persistent-v8-reverse": dict(blocks_per_sm=2, vec_bytes=8, pass2="reverse", threads_per_row=128),
    "block-persistent-v4-256": dict(vec_bytes=4, threads_per_row=256, blocks_per_sm=1),
    "warp": dict(warp_row_max_cols=8192, warps_per_block=4),
    "warp-persistent-v4-reverse": dict(warp_row_max_cols=8192, warps_per_block=4, blocks_per_sm=1, vec_bytes=4,
                                       pass2="reverse"),
}
# Every variant x dtype x vocabulary, with reduction (i + d + v) % 3 and flag row (i + d) % 4:
# every pair of values of any two factors occurs (test_ce_cases_cover_every_pair).
CE_CASES = [(variant, dtype, V, REDUCTIONS[(i + d + v) % 3], *FLAGS[(i + d) % 4])
            for v, variant in enumerate(CE_VARIANTS) for d, dtype in enumerate(DTYPES) for i, V in enumerate(VOCABS)]
CE_ROWS = 9


def test_ce_cases_cover_every_pair():
    factors = [tuple(CE_VARIANTS), DTYPES, VOCABS, REDUCTIONS, (0.0, 0.1), (0, 1), (False, True)]
    for a in range(len(factors)):
        for b in range(a + 1, len(factors)):
            seen = {(case[a], case[b]) for case in CE_CASES}
            missing = {(u, v) for u in factors[a] for v in factors[b]} - seen
            assert not missing, f"factors {a} and {b}: pairs {sorted(missing)} never occur"


def test_ce_variants_cover_the_tuning_space():
    """Both layouts, every vector width and pass-2 order, automatic and explicit block sizes,
    and one-block-a-row and persistent grids occur among the variants; each variant launches
    the layout its name says, and the persistent ones hold fewer rows at once than CE_ROWS
    (so the loop over rows runs)."""
    full = [dict(ce.DEFAULTS, **params) for params in CE_VARIANTS.values()]
    assert {p["vec_bytes"] for p in full} == set(ce.SPACE["vec_bytes"])
    assert {p["pass2"] for p in full} == set(ce.SPACE["pass2"])
    assert {p["threads_per_row"] > 0 for p in full} == {p["blocks_per_sm"] > 0 for p in full} == {True, False}
    for variant, params in CE_VARIANTS.items():
        kernel, grid, block = ce.row_launch(CE_ROWS, max(VOCABS), "float32", params, EMU_SMS)
        assert kernel.startswith(f"ce_{variant.split('-')[0]}_") and kernel in ce.KERNEL_NAMES, (variant, kernel)
        rows_at_once = grid[0] * (block[0] // 32 if kernel.startswith("ce_warp") else 1)
        assert (rows_at_once < CE_ROWS) == ("persistent" in variant), (variant, grid, block)


def _ce_id(case):
    variant, dtype, V, red, eps, off, inplace = case
    return f"{variant}-{dtype}-V{V}-{red}-eps{eps}-off{off}" + ("-inplace" if inplace else "")


@pytest.mark.parametrize("case", CE_CASES, ids=[_ce_id(c) for c in CE_CASES])
def test_cross_entropy(emulated, case):
    variant, dtype, V, red, eps, off, inplace = case
    module = emulated[ce.SOURCE]
    rng = np.random.default_rng(CE_CASES.index(case))
    B = CE_ROWS
    x = aligned(B * V, dtype, offset=off).reshape(B, V)  # off = 1: an unaligned base pointer
    x[...] = to_storage(rng.standard_normal((B, V), dtype=np.float32) * 3, dtype)
    pristine = x.copy()
    x64 = to_f64(x, dtype)
    t = rng.integers(0, V, B)
    t[1::3] = IGNORE
    want_loss, want_grad = ref.softmax_cross_entropy(x64, t, reduction=red, label_smoothing=eps)

    params = CE_VARIANTS[variant]
    loss, dl = ce_emulated(module, x, dtype, t, reduction=red, label_smoothing=eps, inplace=inplace,
                           params=params, sm_count=EMU_SMS)
    close(loss, want_loss, LOSS_RTOL, LOSS_ATOL, "loss")
    unit = 1.0 / max(1, np.count_nonzero(t != IGNORE)) if red == "mean" else 1.0
    close(dl, want_grad, GRAD_RTOL[dtype], grad_atol(dtype, want_grad, unit), "dlogits", dtype)
    assert (to_f64(dl, dtype)[t == IGNORE] == 0).all(), "ignored rows: gradient not exactly 0"
    if inplace:
        assert dl is x
    else:
        assert x.tobytes() == pristine.tobytes(), "the logits changed"

    # grad=False, on the same values at the same offset: the same loss bits, and the logits
    # are only read.
    x2 = aligned(B * V, dtype, offset=off, fill=pristine.ravel()).reshape(B, V)
    loss2, none = ce_emulated(module, x2, dtype, t, reduction=red, label_smoothing=eps, grad=False,
                              params=params, sm_count=EMU_SMS)
    assert none is None
    assert loss2.tobytes() == loss.tobytes(), f"grad=False changed the loss: {loss2} vs {loss}"
    assert x2.tobytes() == pristine.tobytes(), "grad=False wrote the logits"


@pytest.mark.parametrize("ignore_index", [None, 2**32 + 5, 2**70])
def test_ce_ignore_index_that_matches_no_target(emulated, ignore_index):
    """None, or a value no int32 target can hold: no row is ignored, int32 and int64 targets
    alike (the launcher's own mapping, checks.kernel_ignore_index)."""
    module = emulated[ce.SOURCE]
    rng = np.random.default_rng(4)
    x = _logits(rng, (6, 40), "float32")
    t = rng.integers(0, 40, 6)
    t[::2] = 5
    want_loss, want_grad = ref.softmax_cross_entropy(x.astype(np.float64), t)
    for targets in (t, t.astype(np.int32)):
        loss, dl = ce_emulated(module, x, "float32", targets, ignore_index=ignore_index)
        close(loss, want_loss, LOSS_RTOL, 1e-6, "loss")
        close(dl, want_grad, GRAD_RTOL["float32"], grad_atol("float32", want_grad, 1 / 6), "dlogits")


def _logits(rng, shape, dtype):
    x = aligned(int(np.prod(shape)), dtype).reshape(shape)
    x[...] = to_storage(rng.standard_normal(shape, dtype=np.float32) * 3, dtype)
    return x


@pytest.mark.parametrize("dtype", DTYPES)
def test_ce_all_rows_ignored_and_no_rows(emulated, dtype):
    module = emulated[ce.SOURCE]
    x = _logits(np.random.default_rng(1), (5, 100), dtype)
    for red in REDUCTIONS:
        loss, dl = ce_emulated(module, x, dtype, np.full(5, IGNORE), reduction=red,
                               params=CE_VARIANTS["block-persistent-v8-reverse"], sm_count=1)
        assert (np.asarray(loss) == 0).all(), (red, loss)
        assert (to_f64(dl, dtype) == 0).all(), red
    empty = aligned(0, dtype).reshape(0, 7)
    for red in REDUCTIONS:
        loss, dl = ce_emulated(module, empty, dtype, np.zeros(0, np.int64), reduction=red)
        assert loss.shape == ((0,) if red == "none" else ()) and dl.shape == (0, 7)
        assert (np.asarray(loss) == 0).all(), (red, loss)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ce_out_of_range_targets_unchecked(emulated, dtype):
    """check_targets=False: a target outside [0, V) is never read; its row loss is NaN and its
    gradient is the softmax without the one-hot term; the other rows are unaffected."""
    module = emulated[ce.SOURCE]
    rng = np.random.default_rng(2)
    x = _logits(rng, (5, 100), dtype)
    x64 = to_f64(x, dtype)
    t = rng.integers(0, 100, 5)
    t[2], t[3] = 100, -7
    loss, dl = ce_emulated(module, x, dtype, t, reduction="none", params=CE_VARIANTS["warp"])
    assert np.isnan(loss[2]) and np.isnan(loss[3]), loss
    good, bad = [0, 1, 4], [2, 3]
    want_loss, want_grad = ref.softmax_cross_entropy(x64[good], t[good], reduction="none")
    close(loss[good], want_loss, LOSS_RTOL, LOSS_ATOL, "good rows: loss")
    g = to_f64(dl, dtype)
    close(g[good], want_grad, GRAD_RTOL[dtype], grad_atol(dtype, want_grad, 1.0), "good rows: dlogits")
    p = np.exp(x64[bad] - x64[bad].max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    close(g[bad], p, GRAD_RTOL[dtype], grad_atol(dtype, p, 1.0), "bad rows: dlogits = softmax")


@pytest.mark.parametrize("dtype", DTYPES)
def test_ce_masked_vocabulary_and_nan_row(emulated, dtype):
    """-inf logits (a masked vocabulary) add exactly 0; a NaN logit makes its row's loss NaN
    and leaves the other rows alone."""
    module = emulated[ce.SOURCE]
    rng = np.random.default_rng(3)
    x = _logits(rng, (3, 70), dtype)
    x[:, :40] = to_storage(np.float32(-np.inf), dtype)
    x[2, 50] = to_storage(np.float32(np.nan), dtype)
    x64 = to_f64(x, dtype)
    t = np.array([45, 60, 41])
    loss, dl = ce_emulated(module, x, dtype, t, reduction="none")
    want_loss, want_grad = ref.softmax_cross_entropy(x64[:2], t[:2], reduction="none")
    close(loss[:2], want_loss, LOSS_RTOL, LOSS_ATOL, "-inf: loss")
    g = to_f64(dl, dtype)
    close(g[:2], want_grad, GRAD_RTOL[dtype], grad_atol(dtype, want_grad, 1.0), "-inf: dlogits")
    assert (g[:2, :40] == 0).all(), "masked logits: gradient not exactly 0"
    assert np.isnan(loss[2]), loss


# ---------------------------------------------------------------- cross-entropy, general case

def _element_strides(a):
    return checks.class_strides(a.shape, tuple(st // a.itemsize for st in a.strides))


def general_emulated(module, x, name, targets, *, weight=None, soft=False, reduction="mean", label_smoothing=0.0,
                     inplace=False, grad=True, ignore_index=IGNORE):
    """The general case of cross_entropy.softmax_cross_entropy on host arrays: x [C] / [B, C] /
    [B, C, d1, ...] (any strides d1, ... can be walked as one axis), targets class indices or
    probabilities in x's storage dtype, weight fp32 [C] or None; its own launch list
    (ce.general_launches), run on NaN-poisoned outputs."""
    n_classes = x.shape[0] if x.ndim == 1 else x.shape[1]
    n_spatial = int(np.prod(x.shape[2:])) if x.ndim > 2 else 1
    n_rows = (1 if x.ndim == 1 else x.shape[0]) * n_spatial
    row_loss = np.full(n_rows, np.nan, np.float32)
    denom = None
    if reduction == "mean":
        denom = np.full((), float(max(n_rows, 1)) if soft else np.nan, np.float32)
    loss = None if reduction == "none" else np.full((), np.nan, np.float32)
    dlogits = None
    if grad:
        dlogits = x if inplace else aligned(x.size, name, fill=POISON[name]).reshape(x.shape)
    t = None if soft else np.ascontiguousarray(targets.reshape(-1), dtype=np.int64)
    q = targets if soft else None
    strides = (_element_strides(x), (0, 0, 0) if dlogits is None else _element_strides(dlogits),
               _element_strides(q) if soft else (0, 0, 0))
    for kernel, grid, block, args in ce.general_launches(
            x, dlogits, t, q, weight, row_loss, denom, loss, strides=strides, n_rows=n_rows, n_cols=n_classes,
            n_spatial=n_spatial, dtype_name=name, reduction=reduction,
            ignore=checks.kernel_ignore_index(ignore_index, np.dtype(np.int64)), eps=label_smoothing):
        module(kernel, grid, block, args)
    return (row_loss.reshape(x.shape[:1] + x.shape[2:] if x.ndim > 1 else ()) if loss is None else loss), dlogits


#: logits layouts: rows, unbatched, [B, C, T] and [B, C, d1, d2] (a thread a row), and a
#: [B, T, C] buffer seen as [B, C, T] (classes adjacent, rows C apart: a block a row).
GENERAL_LAYOUTS = {"rows": (7, 37), "unbatched": (37,), "BCT": (3, 37, 5), "BCHW": (2, 37, 3, 2),
                   "BTC-view": (3, 37, 5)}
GENERAL_CASES = [(layout, soft, weighted, DTYPES[i % 3], REDUCTIONS[(i // 3) % 3], (0.0, 0.1)[i % 2], i % 4 == 1)
                 for i, (layout, soft, weighted) in enumerate(
                     (lay, s, w) for lay in GENERAL_LAYOUTS for s in (False, True) for w in (False, True))]


def _general_inputs(rng, layout, dtype, soft, weighted):
    shape = GENERAL_LAYOUTS[layout]
    if layout == "BTC-view":
        b, c, t = shape
        x = np.moveaxis(_logits(rng, (b, t, c), dtype), 2, 1)
    else:
        x = _logits(rng, shape, dtype)
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    if soft:
        q = rng.random(shape) ** 2
        q /= q.sum(axis=0 if len(shape) == 1 else 1, keepdims=True)
        targets = aligned(q.size, dtype).reshape(shape)
        targets[...] = to_storage(q.astype(np.float32), dtype)
    else:
        targets = rng.integers(0, n_classes, shape[:0] if len(shape) == 1 else shape[:1] + shape[2:])
        if targets.ndim:
            targets.reshape(-1)[1::3] = IGNORE
    weight = (rng.random(n_classes) + 0.1).astype(np.float32) if weighted else None
    return x, targets, weight


@pytest.mark.parametrize("case", GENERAL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cross_entropy_general(emulated, case):
    """Class weights, probability targets, label smoothing and every layout through the
    ce_general_* kernels (both layouts of a row: a block, a thread) against the reference."""
    layout, soft, weighted, dtype, red, eps, inplace = case
    module = emulated[ce.SOURCE]
    rng = np.random.default_rng(GENERAL_CASES.index(case))
    x, targets, weight = _general_inputs(rng, layout, dtype, soft, weighted)
    inplace = inplace and x.flags.c_contiguous
    pristine, pristine_t = x.copy(), targets.copy()
    t_ref = to_f64(targets, dtype) if soft else targets
    want_loss, want_grad = ref.softmax_cross_entropy(to_f64(x, dtype), t_ref, weight=weight, reduction=red,
                                                     label_smoothing=eps)
    loss, dl = general_emulated(module, x, dtype, targets, weight=weight, soft=soft, reduction=red,
                                label_smoothing=eps, inplace=inplace)
    close(loss, want_loss, LOSS_RTOL, LOSS_ATOL, "loss")
    close(dl, want_grad, GRAD_RTOL[dtype], grad_atol(dtype, want_grad, 0.1), "dlogits", dtype)
    assert targets.tobytes() == pristine_t.tobytes(), "the targets changed"
    if inplace:
        assert dl is x
    else:
        assert x.tobytes() == pristine.tobytes(), "the logits changed"
    loss2, none = general_emulated(module, pristine.copy() if inplace else x, dtype, targets, weight=weight,
                                   soft=soft, reduction=red, label_smoothing=eps, grad=False)
    assert none is None and loss2.tobytes() == loss.tobytes(), "grad=False changed the loss"


@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_general_all_ignored_and_zero_weights(emulated, weighted):
    """Every row ignored (or, weighted, every target's weight 0): the mean's divisor counts 1,
    loss and gradient 0."""
    module = emulated[ce.SOURCE]
    x = _logits(np.random.default_rng(5), (4, 6, 3), "float32")
    weight = np.array([0, 1, 1, 1, 1, 1], np.float32) if weighted else None
    targets = np.zeros((4, 3), np.int64) if weighted else np.full((4, 3), IGNORE)
    loss, dl = general_emulated(module, x, "float32", targets, weight=weight)
    assert loss == 0 and not dl.any()


@pytest.mark.parametrize("layout", ["rows", "BCT"])
def test_cross_entropy_general_masked_classes_and_bad_targets(emulated, layout):
    """-inf logits with weight 0 (or probability 0) add nothing; a row with no target mass has
    loss and gradient 0; an unchecked out-of-range target is never read (its row loss NaN)
    and leaves the other rows alone."""
    module = emulated[ce.SOURCE]
    rng = np.random.default_rng(6)
    x, targets, _ = _general_inputs(rng, layout, "float32", False, False)
    x = np.ascontiguousarray(x)
    x[:, :3] = -np.inf  # classes 0-2 masked
    weight = np.ones(x.shape[1], np.float32)
    weight[:3] = 0
    targets = np.where(targets == IGNORE, IGNORE, np.maximum(targets, 3))
    targets.reshape(-1)[0] = 0  # weight 0, no smoothing: no target mass
    for eps in (0.0, 0.1):
        want_loss, want_grad = ref.softmax_cross_entropy(x.astype(np.float64), targets, weight=weight,
                                                         reduction="none", label_smoothing=eps)
        loss, dl = general_emulated(module, x, "float32", targets, weight=weight, reduction="none",
                                    label_smoothing=eps)
        close(loss, want_loss, LOSS_RTOL, LOSS_ATOL, "loss")
        close(dl, want_grad, GRAD_RTOL["float32"], 1e-7, "dlogits")
    q = np.where(np.isinf(x), 0.0, rng.random(x.shape)).astype(np.float32)
    want_loss, want_grad = ref.softmax_cross_entropy(x.astype(np.float64), q.astype(np.float64), reduction="none")
    loss, dl = general_emulated(module, x, "float32", q, soft=True, reduction="none")
    close(loss, want_loss, LOSS_RTOL, LOSS_ATOL, "probabilities: loss")
    close(dl, want_grad, GRAD_RTOL["float32"], 1e-7, "probabilities: dlogits")
    bad = targets.copy()
    bad.reshape(-1)[2] = x.shape[1] + 4
    loss, _ = general_emulated(module, np.where(np.isinf(x), 0, x).astype(np.float32), "float32", bad,
                               weight=weight, reduction="none")
    flat = loss.reshape(-1)
    assert np.isnan(flat[2]) and np.isfinite(np.delete(flat, 2)).all(), flat


# ---------------------------------------------------------------- bias gradient

BG_SHAPES = ((0, 5), (1, 1), (37, 70), (300, 33), (4000, 40), (70000, 3))


def test_bias_grad_shapes_cover_both_paths():
    splits = [lb.bias_grad_splits(m, n)[0] for m, n in BG_SHAPES]
    assert 1 in splits, "no shape takes the one-kernel path"
    assert any(s > 1 for s in splits), "no shape takes the split + finish path"


@pytest.mark.parametrize("M, N", BG_SHAPES, ids=[f"{m}x{n}" for m, n in BG_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_grad(emulated, dtype, M, N):
    module = emulated[lb.SOURCE]
    rng = np.random.default_rng(M * 131 + N)
    dy = aligned(M * N, dtype).reshape(M, N)
    dy[...] = to_storage(rng.standard_normal((M, N), dtype=np.float32), dtype)
    want = to_f64(dy, dtype).sum(axis=0)
    db, splits = bias_grad_emulated(module, dy, dtype)
    assert splits == lb.bias_grad_splits(M, N)[0]
    atol = 1e-5 * max(1.0, float(np.abs(want).max()) if want.size else 1.0)
    close(db, want, GRAD_RTOL[dtype], atol, f"db ({splits} splits)", dtype)
    again, _ = bias_grad_emulated(module, dy, dtype)
    assert again.tobytes() == db.tobytes(), "a second run gave other bits"
