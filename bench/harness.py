"""Devices, ceilings, checking, timing, records and the terminal table.

Nothing here imports torch, triton or CuPy at module level: each is imported when first
needed, and an implementation whose library or device is missing raises
:class:`Unavailable` with the reason, which becomes an UNAVAILABLE record.

Each timed record carries four figures of the same call: ``ms``, the L2-flushed median
(``triton.testing.do_bench``); ``ms_back_to_back``, the wall time per call of a loop of calls
synchronised only at its end (warm L2, host overhead included: what a training loop sees);
``ms_graph``, the time per call replayed from a CUDA graph (no host overhead), or None with
``graph_note`` saying why (no CUDA device, or not capturable: the op syncs or allocates);
and ``host_us``, the host time per call of calls issued without waiting for the device: the
launcher's Python overhead (checks, routing, autotuner lookup) plus the launches. Ops with a
``peak_extra_bytes(prepared, impl)`` (the LM head) add ``peak_extra_bytes``: the peak memory of
one call above what was allocated before it, on CUDA.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np

from . import ops
from .common import Unavailable, try_import

# Normalised error (max |got - ref| / max |ref|) allowed per dtype of the inputs.
TOLERANCE = {"float64": 1e-9, "float32": 2e-4, "float16": 5e-3, "bfloat16": 3e-2}
ROTATE_BYTES = {"cuda": 256 << 20, "cpu": 64 << 20}  # input copies cycled until they span this much
MAX_COPIES = 8
CHECK_ROWS = 1 << 26  # elements per row chunk when comparing large outputs
HOST_CALLS = 20  # calls issued without waiting for the device, for host_us
MAX_LOOP_CALLS = 2000  # calls of one back-to-back loop at most


# --- environment ------------------------------------------------------------------------

class Env:
    """What this machine offers: CUDA or not, and the libraries, imported on demand."""

    def __init__(self, force_cpu: bool = False, interpret: bool = False):
        self.cuda = False if force_cpu else _cuda_available()
        self.device = "cuda" if self.cuda else "cpu"
        # Without CUDA, run the Triton impls on CPU tensors (TRITON_INTERPRET=1 must have been
        # set before the kernels were imported); otherwise they are UNAVAILABLE on a CPU.
        self.interpret = bool(interpret) and not self.cuda
        self.cpu_threads = None  # the threads numpy's BLAS and torch run on, once limited (limit_cpu_threads)

    def torch(self, who):
        torch, err = try_import("torch")
        if torch is None:
            raise Unavailable(f"{who}: torch is not importable ({err})")
        return torch

    def require_cuda(self, who, why="needs a CUDA device"):
        if not self.cuda:
            raise Unavailable(f"{who}: {why}")

    def cupy(self, who):
        self.require_cuda(who)
        cupy, err = try_import("cupy")
        if cupy is None:
            raise Unavailable(f"{who}: cupy is not importable ({err})")
        return cupy

    def ref_xp(self):
        """Array module for the float64 reference outputs: CuPy on a CUDA machine that has it."""
        if self.cuda:
            cupy, _ = try_import("cupy")
            if cupy is not None:
                return cupy
        return np

    def n_copies(self, set_bytes: int) -> int:
        return max(1, min(MAX_COPIES, math.ceil(ROTATE_BYTES[self.device] / max(set_bytes, 1))))

    def device_name(self) -> str:
        if self.cuda:
            torch, _ = try_import("torch")
            if torch is not None and torch.cuda.is_available():
                return torch.cuda.get_device_name(0)
            cupy, _ = try_import("cupy")
            return cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        cores = f"{os.cpu_count()} cores"
        if self.cpu_threads is None:
            return f"CPU {platform.machine()} ({cores})"
        return f"CPU {platform.machine()} ({self.cpu_threads} thread{'s' * (self.cpu_threads != 1)} of {cores})"


def _cuda_available() -> bool:
    torch, _ = try_import("torch")
    if torch is not None:
        return bool(torch.cuda.is_available())
    cupy, _ = try_import("cupy")
    try:
        return cupy is not None and cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


_DISTS = {"cupy": ("cupy", "cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x"), "liger_kernel": ("liger-kernel",),
          "ml_dtypes": ("ml-dtypes", "ml_dtypes")}


def versions() -> dict:
    """Versions of the libraries that matter, without importing the heavy ones."""
    out = {"python": platform.python_version()}
    for mod in ("numpy", "torch", "triton", "cupy", "liger_kernel", "ml_dtypes", "matplotlib", "gpuad"):
        m = sys.modules.get(mod)
        v = getattr(m, "__version__", None) if m is not None else None
        for dist in (() if v else _DISTS.get(mod, (mod,))):
            try:
                v = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                pass
        if v:
            out[mod] = str(v)
    return out


# --- checking ----------------------------------------------------------------------

def to_host64(a) -> np.ndarray:
    """A float64 numpy copy of a numpy / CuPy / torch array or a Python scalar."""
    if type(a).__module__.partition(".")[0] == "torch":
        return a.detach().double().cpu().numpy()
    from gpuad.backend import to_host

    return to_host(a).astype(np.float64)


def max_error(got, ref) -> float:
    """max |got - ref| / max |ref|, inf when `got` holds a non-finite value; raises on a shape mismatch.

    With a CuPy reference (a CUDA machine) the whole comparison runs on the device in float64
    row chunks; otherwise on the host."""
    if got is None:
        raise AssertionError("no output")
    if tuple(getattr(got, "shape", ())) != tuple(ref.shape):
        raise AssertionError(f"shape {tuple(getattr(got, 'shape', ()))}, expected {tuple(ref.shape)}")
    xp, conv = np, to_host64
    if type(ref).__module__.partition(".")[0] == "cupy":
        import cupy as xp
        conv = _to_cupy64
    if len(ref.shape) == 0:
        g, r = float(conv(got)), float(conv(ref))
        return abs(g - r) / max(abs(r), 1e-30) if math.isfinite(g) else math.inf
    rows = ref.shape[0]
    step = max(1, CHECK_ROWS // max(1, int(np.prod(ref.shape[1:]))))
    err, scale = 0.0, 0.0
    for r0 in range(0, rows, step):
        g, r = conv(got[r0:r0 + step]), conv(ref[r0:r0 + step])
        if not bool(xp.all(xp.isfinite(g))):
            return math.inf
        if r.size:
            err = max(err, float(xp.abs(g - r).max()))
            scale = max(scale, float(xp.abs(r).max()))
    return err / max(scale, 1e-30)


def _to_cupy64(a):
    """A float64 CuPy array on the device from a CuPy or CUDA torch array (zero-copy hand-off)."""
    import cupy
    if type(a).__module__.partition(".")[0] == "torch":
        a = cupy.from_dlpack(a.detach().float().contiguous())
    return cupy.asarray(a).astype(cupy.float64)


class CheckFailed(AssertionError):
    """An output off the reference by more than the tolerance; ``max_error`` holds the error."""

    def __init__(self, message, max_error):
        super().__init__(message)
        self.max_error = max_error


def check(outs, expected, tolerance, where="") -> float:
    """The worst max_error over `expected`'s outputs (None if it is empty); CheckFailed naming
    the output when it exceeds `tolerance`. `expected` maps names to arrays, or to
    (index, array) pairs that compare ``outs[name][index]`` (the host slice check)."""
    errs = {}
    for name, ref in expected.items():
        got = outs[name]
        if isinstance(ref, tuple):
            index, ref = ref
            got = None if got is None else got[index]
        errs[name] = max_error(got, ref)
    if not errs:
        return None
    worst = max(errs, key=lambda k: errs[k])
    if not errs[worst] <= tolerance:
        raise CheckFailed(f"{worst}{where}: error {errs[worst]:.3g} (max |got - ref| / max |ref| "
                          f"vs float64 reference) > tolerance {tolerance:g}", errs[worst])
    return errs[worst]


# --- timing -----------------------------------------------------------------------------

@dataclass
class Timing:
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_min_reps: int = 5
    cpu_max_reps: int = 50
    cpu_budget_s: float = 0.3
    cpu_interleaved_rounds: int = 5  # at least this many rounds of an interleaved loop


def time_cuda(fn, timing: Timing):
    """Median ms of `fn` with triton.testing.do_bench (it flushes L2 between calls)."""
    try:
        from triton.testing import do_bench
    except Exception:
        return _time_cuda_events(fn, timing), "cuda-events-median"
    return float(do_bench(fn, warmup=timing.warmup_ms, rep=timing.rep_ms, return_mode="median")), "triton.testing.do_bench"


def _time_cuda_events(fn, timing):
    import torch
    fn(); torch.cuda.synchronize()
    times = []
    t_end = time.perf_counter() + timing.rep_ms / 1e3
    while len(times) < 5 or time.perf_counter() < t_end:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def time_cpu(fn, timing: Timing):
    """The fastest ms of repeated calls after one warm-up call: on a CPU shared with other work
    the slow calls are interference, so the minimum is the steadiest figure (as timeit's); the
    ceilings are measured the same way."""
    fn()
    times = []
    t_end = time.perf_counter() + timing.cpu_budget_s
    while len(times) < timing.cpu_min_reps or (time.perf_counter() < t_end and len(times) < timing.cpu_max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times), "cpu-min"


def time_cpu_interleaved(fns, timing: Timing):
    """The fastest and the median ms of each of `fns`, called in turn (one call of each per
    round) for the run's CPU budget times their number, and for at least
    ``timing.cpu_interleaved_rounds`` rounds, after one warm-up call each: [(min, median), ...].
    A slow spell of a shared CPU falls on every fn of a round alike, so both figures compare."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    t_end = time.perf_counter() + timing.cpu_budget_s * len(fns)
    n, least = 0, max(timing.cpu_min_reps, timing.cpu_interleaved_rounds)
    while n < least or (time.perf_counter() < t_end and n < timing.cpu_max_reps * 4):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        n += 1
    return [(min(ts), statistics.median(ts)) for ts in times]


def time_fn(fn, device, timing):
    return time_cuda(fn, timing) if device == "cuda" else time_cpu(fn, timing)


def _sync(device):
    if device != "cuda":
        return lambda: None
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.cuda.synchronize
    import cupy
    return cupy.cuda.Device().synchronize


def time_host(fn, device, timing: Timing) -> dict:
    """Figures without an L2 flush: ``host_us``, the host time per call of up to HOST_CALLS
    calls issued without waiting for the device (then one sync; on a CPU, the whole call), and
    ``ms_back_to_back``, the wall time per call of a loop of calls synchronised at its end."""
    sync = _sync(device)
    budget_s = timing.rep_ms / 1e3 / 2 if device == "cuda" else timing.cpu_budget_s
    t0 = time.perf_counter()
    fn()
    sync()
    one = max(time.perf_counter() - t0, 1e-7)
    k = HOST_CALLS if device == "cuda" else max(1, min(HOST_CALLS, int(budget_s / one)))
    t0 = time.perf_counter()
    for _ in range(k):
        fn()
    host_s = time.perf_counter() - t0
    sync()
    n = max(1, min(MAX_LOOP_CALLS, int(budget_s / one)))
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return {"host_us": host_s / k * 1e6, "ms_back_to_back": (time.perf_counter() - t0) / n * 1e3}


@contextlib.contextmanager
def _cupy_on(torch_stream):
    """CuPy launches go to `torch_stream` within the block (when CuPy is in use at all)."""
    cupy = sys.modules.get("cupy")
    if cupy is None:
        yield
        return
    with cupy.cuda.ExternalStream(torch_stream.cuda_stream):
        yield


def time_graph(fn, n_calls: int, timing: Timing):
    """(ms per call replayed from a CUDA graph of `n_calls` calls, None), or (None, the reason)
    when the calls cannot be captured (a host sync, an allocation outside the graph's pool, a
    launch on another stream): the failure is reported, never raised."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None, "needs torch with a CUDA device"
    current = torch.cuda.current_stream()
    graph = torch.cuda.CUDAGraph()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side), _cupy_on(side):  # warm-up off the default stream, as capture wants
            for _ in range(n_calls):
                fn()
        current.wait_stream(side)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=side):  # the warm-up's stream: CuPy's pool reuses its blocks
            with _cupy_on(side):
                for _ in range(n_calls):
                    fn()
    except Exception as e:
        torch.cuda.set_stream(current)  # a failed capture can leave its stream current
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
        return None, f"not capturable: {type(e).__name__}: {e}".splitlines()[0][:200]
    try:
        return time_host(graph.replay, "cuda", timing)["ms_back_to_back"] / n_calls, None
    finally:
        del graph


# --- ceilings ---------------------------------------------------------------------------

def measure_ceilings(env: Env, dtypes, timing: Timing) -> dict:
    """Copy bandwidth (bytes read + written, GB/s) and matmul rate per dtype (TFLOP/s),
    measured now on random data: torch on CUDA; numpy on the CPU (fp32/fp64 matmul only)."""
    out = {"copy_GBps": None, "matmul_TFLOPs": {}, "how": {}}
    try:
        if env.cuda:
            torch = env.torch("ceilings")
            a = torch.randn(64 << 20, device="cuda")  # 256 MiB
            b = torch.empty_like(a)
            ms, _ = time_cuda(lambda: b.copy_(a), timing)
            out["copy_GBps"] = 2 * a.numel() * 4 / ms / 1e6
            out["how"]["copy"] = "torch copy_ of 256 MiB fp32 on the device"
            del a, b
            n = 8192
            for dt in sorted(set(dtypes) | {"bfloat16", "float32"}):
                if dt == "float64":
                    continue
                x = torch.randn(n, n, device="cuda").to(getattr(torch, dt))
                y = torch.randn(n, n, device="cuda").to(getattr(torch, dt))
                prev = torch.backends.cuda.matmul.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = False
                try:
                    ms, _ = time_cuda(lambda: x @ y, timing)
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = prev
                out["matmul_TFLOPs"][dt] = 2 * n ** 3 / ms / 1e9
                del x, y
            out["how"]["matmul"] = f"torch {n}x{n} @ {n}x{n}, random data, TF32 off"
            torch.cuda.empty_cache()
        else:
            a = np.random.default_rng(0).standard_normal(16 << 20, dtype=np.float32)  # 64 MiB
            b = np.empty_like(a)
            best = Timing(cpu_min_reps=10, cpu_max_reps=50, cpu_budget_s=0.1)  # a ceiling: the fastest run
            ms, _ = time_cpu(lambda: np.copyto(b, a), best)
            out["copy_GBps"] = 2 * a.nbytes / ms / 1e6
            out["how"]["copy"] = "numpy copyto of 64 MiB fp32"
            n = 1024
            for dt in sorted(set(dtypes) | {"float32"}):
                if dt not in ("float32", "float64"):
                    continue
                x = np.random.default_rng(1).standard_normal((n, n)).astype(dt)
                ms, _ = time_cpu(lambda: x @ x, best)
                out["matmul_TFLOPs"][dt] = 2 * n ** 3 / ms / 1e9
            out["how"]["matmul"] = f"numpy {n}x{n} @ {n}x{n}, random data"
    except Exception as e:  # a missing ceiling leaves % empty, never stops the run
        out["error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def ceiling_for(metric, dtype, ceilings):
    if metric == "GB/s":
        return ceilings.get("copy_GBps")
    return ceilings.get("matmul_TFLOPs", {}).get(dtype)


# --- the run ----------------------------------------------------------------------------

class Progress:
    """A one-line progress bar on stderr (a line per step when stderr is not a terminal)."""

    def __init__(self, total, stream=None):
        self.total, self.done = max(total, 1), 0
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()

    def step(self, text):
        """Count one step; show `text` with the bar (None: count it without a line of its own)."""
        self.done += 1
        if text is None and not (self.tty and self.done == self.total):
            return
        text = text or ""
        n = int(30 * self.done / self.total)
        line = f"[{'#' * n}{'.' * (30 - n)}] {self.done}/{self.total} {text}"
        if self.tty:
            self.stream.write("\r\033[K" + line[:160])
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def new_record(case, impl, device_name, versions_):
    """A record of (case, impl) with every field, nothing measured yet."""
    op = ops.OPS[case.op]
    return dict(op=case.op, impl=impl, shape=case.shape_dict(), shape_str=case.label, dtype=case.dtype,
                device=device_name, versions=versions_, status=None, error=None, ms=None,
                ms_back_to_back=None, ms_graph=None, graph_note=None, host_us=None,
                flops=op.flops(case), bytes=op.min_bytes(case), metric=op.metric, rate=None, ceiling=None,
                pct_ceiling=None, speedup_vs_torch=None, max_error=None, max_error_host=None,
                tolerance=TOLERANCE.get(case.dtype), timer=None, n_copies=None, wall_s=None, peak_extra_bytes=None,
                model_ms=None)


def run(cases, impls, env: Env, timing: Timing | None = None, ceilings=None, progress=True, skip=None,
        sink=None, deadline=None, extras=True):
    """Check then time every (case, impl); return the list of records.

    `cases`: list of ops.Case; `impls`: list of impl names (those an op lacks are
    UNAVAILABLE for it); `skip`: {(op, impl): reason} left out on purpose, recorded as
    UNAVAILABLE with that reason. Ceilings are measured first unless given. `sink`: a path to
    which each record is appended as one JSON line the moment it is measured. `deadline`: a
    time.monotonic() value after which no (case, impl) starts (the rest are UNAVAILABLE with
    that reason). `extras`: also measure the host figures and the CUDA-graph time.

    The check before timing: the whole output against the float64 reference (on the device
    when there is one), then the first rows again against a float64 reference computed on the
    host from the host inputs (ops' host_slice)."""
    skip = skip or {}
    timing = timing or Timing()
    with _libraries_frozen(env):
        return _run(cases, impls, env, timing, ceilings, progress, skip, sink, deadline, extras)


@contextlib.contextmanager
def _libraries_frozen(env):
    """On a CPU, the objects alive before timing (the imported libraries: torch alone brings
    ~160k) are moved out of Python's garbage collector for the run, so that a full collection
    triggered by an engine's own objects costs what it would in a process of its own (~1 ms,
    against ~90 ms with every torch module walked again). gpuad's and torch's own objects are
    collected as usual. CUDA runs, and a process that froze objects itself, are left as they are."""
    if env.cuda or gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _run(cases, impls, env, timing, ceilings, progress, skip, sink, deadline, extras):
    if ceilings is None:
        ceilings = measure_ceilings(env, {c.dtype for c in cases}, timing)
    device_name, versions_ = env.device_name(), versions()
    bar = Progress(len(cases) * len(impls)) if progress else None
    records = []
    for case in cases:
        op = ops.OPS[case.op]
        host = expected = host_expected = None
        # the CPU engine cases: every impl timed in one interleaved loop (below), so that a
        # slow spell of a shared CPU falls on all of them alike and their ratio stands
        interleave, paired = getattr(op, "interleave_cpu", False) and not env.cuda, []
        for impl in impls:
            prep = outs = None
            rec = new_record(case, impl, device_name, versions_)
            t_start = time.monotonic()
            try:
                setup = op.impls.get(impl)
                if (case.op, impl) in skip:
                    raise Unavailable(f"{impl}: {skip[case.op, impl]}")
                if setup is None:
                    raise Unavailable(f"{impl}: not an implementation of {case.op}")
                if impl == "reference" and env.cuda:
                    raise Unavailable("reference: not timed at GPU sizes (it is the ground truth of every check)")
                if deadline is not None and t_start > deadline:
                    raise Unavailable(f"{impl}: not run, the run's time budget was spent")
                if host is None:
                    host = op.make_inputs(case)
                n = env.n_copies(op.input_bytes(case))
                prep = setup(env, case, host, n)
                outs = prep.outputs()
                if expected is None:
                    expected, host_expected = op.expected(case, host, env.ref_xp()), op.host_slice(case, host)
                for field, refs, where in (("max_error", expected, ""),
                                           ("max_error_host", host_expected, " (float64 host check, first rows)")):
                    try:
                        rec[field] = check(outs, refs, rec["tolerance"], where)
                    except CheckFailed as e:
                        rec[field] = e.max_error
                        raise
                outs = None
                if interleave:
                    paired.append((rec, prep.fn))  # timed below, with the case's other impls
                else:
                    rec["ms"], rec["timer"] = time_fn(prep.fn, prep.device, timing)
                rec["n_copies"] = n
                if hasattr(op, "peak_extra_bytes"):  # the ops whose memory is the point (the LM head)
                    rec["peak_extra_bytes"] = op.peak_extra_bytes(prep, impl)
                rec["status"] = "OK"
                if extras:
                    try:
                        rec.update(time_host(prep.fn, prep.device, timing))
                        if prep.device == "cuda":
                            rec["ms_graph"], rec["graph_note"] = time_graph(prep.fn, n, timing)
                        else:
                            rec["graph_note"] = "no CUDA device"
                    except Exception as e:  # the checked, timed record stands without these figures
                        rec["graph_note"] = f"host figures not measured: {type(e).__name__}: {e}"[:200]
            except Unavailable as e:
                rec["status"], rec["error"] = "UNAVAILABLE", str(e)
            except Exception as e:
                rec["status"] = "FAIL"
                rec["error"] = f"{type(e).__name__}: {e}".strip()[:500]
                if os.environ.get("BENCH_TRACEBACK"):
                    traceback.print_exc()
            rec["wall_s"] = round(time.monotonic() - t_start, 3)
            prep = outs = None
            if not (paired and paired[-1][0] is rec):  # measured (not left for the interleaved loop): record it now
                records.append(_with_rate(rec, op, ceilings, sink))
            if bar:  # what does not run here is listed once, under the table (unavailable_line)
                bar.step(None if rec["status"] == "UNAVAILABLE" else f"{case.op} {case.label} {case.dtype} {impl}: "
                         f"{rec['status']}")
        if paired:
            for (rec, _), (ms, median) in zip(paired, time_cpu_interleaved([fn for _, fn in paired], timing)):
                rec["ms"], rec["ms_median"], rec["timer"] = ms, median, "cpu-min-interleaved"
                records.append(_with_rate(rec, op, ceilings, sink))
        host = expected = host_expected = None
        free(env)
    return add_speedups(records)


def _with_rate(rec, op, ceilings, sink):
    """`rec` with its rate and share of the ceiling, appended to `sink` (a path, or None)."""
    if rec["ms"]:
        scale = 1e9 if op.metric == "TFLOP/s" else 1e6
        rec["rate"] = (rec["flops"] if op.metric == "TFLOP/s" else rec["bytes"]) / rec["ms"] / scale
        rec["ceiling"] = ceiling_for(op.metric, rec["dtype"], ceilings)
        if rec["ceiling"]:
            rec["pct_ceiling"] = 100.0 * rec["rate"] / rec["ceiling"]
        if hasattr(op, "model_ms"):  # the LM head: its schedule's modelled time at these ceilings
            rec["model_ms"] = op.model_ms(rec, ceilings)
    if sink:
        append_jsonl(sink, rec)
    return rec


def append_jsonl(path, rec):
    with open(path, "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")


def add_speedups(records):
    """Set each record's speed-up over torch eager on the same case in the same run."""
    for rec in records:
        base = next((r for r in records if r["impl"] == "torch" and r["status"] == "OK" and r["op"] == rec["op"]
                     and r["shape_str"] == rec["shape_str"] and r["dtype"] == rec["dtype"]), None)
        if base and rec["ms"]:
            rec["speedup_vs_torch"] = base["ms"] / rec["ms"]
    return records


def free(env):
    import gc
    gc.collect()
    if env.cuda and "torch" in sys.modules:
        sys.modules["torch"].cuda.empty_cache()
    if env.cuda and "cupy" in sys.modules:
        sys.modules["cupy"].get_default_memory_pool().free_all_blocks()


# --- output -----------------------------------------------------------------------------

_NOT_AN_IMPL = "not an implementation of the op"


def unavailable_line(records) -> str | None:
    """What did not run, in one line: each impl once, under its first reason that belongs to
    this machine or run ("needs a CUDA device"), else as not an implementation of the op (the
    records keep every reason). None when everything ran."""
    reason_of = {}  # impl -> reason
    for r in records:
        if r["status"] == "UNAVAILABLE":
            reason = re.sub(r"^\w+: ", "", r["error"])
            if reason.startswith("not an implementation of "):
                reason_of.setdefault(r["impl"], _NOT_AN_IMPL)
            elif reason_of.get(r["impl"], _NOT_AN_IMPL) == _NOT_AN_IMPL:
                reason_of[r["impl"]] = reason
    if not reason_of:
        return None
    groups = {}  # reason -> impls
    for impl, reason in reason_of.items():
        groups.setdefault(reason, []).append(impl)
    return "not run: " + "; ".join(f"{', '.join(impls)}: {reason}" for reason, impls in groups.items())


_STATISTICS = {"cpu-min": "the fastest of repeated calls", "cpu-min-interleaved": "the fastest round of "
               "an interleaved loop", "triton.testing.do_bench": "the median (L2 flushed)",
               "cuda-events-median": "the median"}


def statistic(records) -> str:
    """Which statistic the records' ms is ("the fastest of repeated calls", "the median (L2
    flushed)", ...), with the ops of each when the records were timed in more than one way."""
    timers = {}
    for r in records:
        if r["status"] == "OK" and r.get("timer"):
            ops_ = timers.setdefault(r["timer"], [])
            if r["op"] not in ops_:
                ops_.append(r["op"])
    if len(timers) == 1:
        timer = next(iter(timers))
        return _STATISTICS.get(timer, timer)
    return "; ".join(f"{_STATISTICS.get(t, t)} ({', '.join(o)})" for t, o in timers.items()) or "not timed"


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def text_table(head, rows) -> list[str]:
    """Plain aligned columns: the header, a rule, one line per row (cells are strings)."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    return lines + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


def graph_lines(records):
    """Why timed records have no CUDA-graph time: each reason once, with the impls (and ops)."""
    by_note = {}
    for r in records:
        if r["status"] == "OK" and r.get("graph_note"):
            by_note.setdefault(r["graph_note"], {}).setdefault(r["impl"], set()).add(r["op"])
    if len(by_note) == 1 and all(r.get("graph_note") for r in records if r["status"] == "OK"):
        return [f"all: {next(iter(by_note))}"]
    return [f"{impl} ({', '.join(sorted(ops_))}): {note}"
            for note, impls in by_note.items() for impl, ops_ in impls.items()]


def gb(n_bytes):
    return None if n_bytes is None else n_bytes / 1e9


def table(records, ceilings=None) -> str:
    """The terminal table, then FAILs and, in one line, what did not run.

    ms: the L2-flushed median on CUDA, the fastest call or round on a CPU (a line under the
    table names it); b2b ms: back to back, no flush; graph ms: replayed from a CUDA graph; host
    us: host time per call (see the module docstring); +peak GB: the peak memory of one call
    above what was allocated before it (ops that measure it, on CUDA); model ms: the time
    bench/lm_head_model.py gives the impl's schedule at the ceilings of the run (the LM head)."""
    head = ("op", "shape", "dtype", "impl", "status", "ms", "model ms", "b2b ms", "graph ms", "host us", "rate",
            "% ceil", "x torch", "+peak GB")
    rows = []
    for r in records:
        if r["status"] == "UNAVAILABLE":
            continue
        rate = f"{r['rate']:.3g} {r['metric']}" if r["rate"] else ""
        rows.append((r["op"], r["shape_str"], r["dtype"], r["impl"], r["status"], _fmt(r["ms"], ".4f"),
                     _fmt(r.get("model_ms"), ".4f"), _fmt(r.get("ms_back_to_back"), ".4f"), _fmt(r.get("ms_graph"), ".4f"),
                     _fmt(r.get("host_us"), ".1f"), rate, _fmt(r["pct_ceiling"], ".1f"),
                     _fmt(r["speedup_vs_torch"], ".2f"), _fmt(gb(r.get("peak_extra_bytes")), ".3f")))
    lines = text_table(head, rows)
    if rows:
        lines.append(f"ms: {statistic(records)}")
    if ceilings:
        mm = ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in ceilings.get("matmul_TFLOPs", {}).items())
        cp = ceilings.get("copy_GBps")
        lines.append(f"ceilings (measured in this run): copy {_fmt(cp, '.4g')} GB/s (read+write); matmul {mm}")
    medians = [r for r in records if r.get("ms_median") is not None]
    if medians:
        lines.append("interleaved CPU cases, median ms of their rounds (ms above: the fastest round):")
        lines += [f"  {r['op']} {r['shape_str']} {r['dtype']} {r['impl']}: {r['ms_median']:.4f}" for r in medians]
    graph = graph_lines(records)
    if graph:
        lines.append("no CUDA-graph time:")
        lines += [f"  {g}" for g in graph]
    fails = [r for r in records if r["status"] == "FAIL"]
    if fails:
        lines.append("FAIL (not timed):")
        lines += [f"  {r['op']} {r['shape_str']} {r['dtype']} {r['impl']}: {r['error']}" for r in fails]
    una = unavailable_line(records)
    if una:
        lines.append(una)
    return "\n".join(lines)


REQUIRED_KEYS = ("op", "impl", "shape", "shape_str", "dtype", "device", "versions", "status", "error", "ms",
                 "ms_back_to_back", "ms_graph", "graph_note", "host_us", "flops", "bytes", "metric", "rate", "ceiling",
                 "pct_ceiling", "speedup_vs_torch", "max_error", "max_error_host", "wall_s", "peak_extra_bytes", "model_ms")


def linear_routes() -> list[str]:
    """One line per problem on which gpuad's Triton linear_backward (route="auto") measured its
    fused kernel against cuBLAS in this process: the route it took and both medians."""
    module = sys.modules.get("gpuad.kernels.triton.linear_backward")
    lines = []
    for key, (route, times) in (module.route_choices().items() if module else ()):
        _, dtype, m, n, k = key[:5]
        both = ", ".join(f"{name} {ms:.4f} ms" for name, ms in sorted(times.items()))
        lines.append(f"linear_backward {m}x{k}x{n} {dtype}: route {route} ({both})")
    return lines


def limit_cpu_threads(n: int) -> str:
    """Run numpy's BLAS and torch's CPU ops on `n` threads from here on (what the CPU engine
    comparisons need: both sides on one thread). Returns what was limited, for the meta."""
    done = []
    torch, _ = try_import("torch")  # first: the thread pools it loads are limited below too
    if torch is not None:
        torch.set_num_threads(n)
        done.append("torch")
    threadpoolctl, _ = try_import("threadpoolctl")
    if threadpoolctl is not None:
        threadpoolctl.threadpool_limits(limits=n)  # process-wide from here on
        done.insert(0, "numpy BLAS/OpenMP")
    return f"{n} ({', '.join(done) or 'nothing limited: neither threadpoolctl nor torch imports'})"


def run_meta(env: Env, ceilings, preset, argv=None, cpu_threads=None) -> dict:
    return {"device": env.device_name(), "cuda": env.cuda, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "versions": versions(), "ceilings": ceilings, "preset": preset, "argv": list(argv or []),
            "tolerance": TOLERANCE, "cpu_threads": cpu_threads,
            "tuned_dir": os.environ.get("GPUAD_TUNED_DIR") or "kernels/tuned"}  # the launchers' tables


def write_results(path, records, meta):
    """results.json: the run's meta (with the linear routes taken) and every record."""
    meta = dict(meta, linear_routes=meta.get("linear_routes") or linear_routes())
    with open(path, "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1, default=str)
    return meta


META_KEYS = ("device", "date", "preset")  # what --report reads of meta.json
RECORD_KEYS = ("op", "impl", "shape_str", "dtype", "status", "ms")  # and of every record


def read_partial(out_dir, skip_corrupt=False):
    """(meta, records) of a run that may have been interrupted: meta.json and results.jsonl
    (see read_jsonl). Raises ValueError naming the file (and line) of what is not readable."""
    path = os.path.join(out_dir, "meta.json")
    with open(path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON ({e})") from None
    missing = _missing(meta, META_KEYS)
    if missing:
        raise ValueError(f"{path} is not a run's meta.json: {missing}")
    return meta, add_speedups(read_jsonl(os.path.join(out_dir, "results.jsonl"), skip_corrupt, RECORD_KEYS))


def _missing(obj, keys):
    """What `obj` lacks to be a JSON object holding `keys` (a phrase), or ""."""
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}, not an object"
    absent = [k for k in keys if k not in obj]
    return f"no {', '.join(absent)}" if absent else ""


def read_jsonl(path, skip_corrupt=False, required=()):
    """The records of a JSON-lines file: JSON objects holding the `required` keys. A last line
    without its newline that does not parse was cut short by a kill: skipped. Any other line
    that is not a record raises ValueError naming its number, or with `skip_corrupt` is
    skipped and named on stderr."""
    records = []
    with open(path) as f:
        lines = f.readlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = _missing(record, required)
        except json.JSONDecodeError as e:
            if number == len(lines) and not line.endswith("\n"):
                continue  # a kill cut the last record short
            record, problem = None, f"not JSON ({e})"
        if not problem:
            records.append(record)
        elif skip_corrupt:
            print(f"bench: skipped line {number} of {path}: {problem}", file=sys.stderr)
        else:
            raise ValueError(f"line {number} of {path} is not a record: {problem} (--skip-corrupt skips such lines)")
    return records
