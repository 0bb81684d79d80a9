"""The bench op of the fused LM head: linear + cross-entropy, forward and backward, with the
peak memory above the inputs (``peak_extra_bytes``, the record's ``peak_extra_bytes``).

Implementations: reference, triton, cupy (gpuad's kernels; dw accumulated into an fp32 [V, D]
buffer the bench owns, as a trainer's main grad, zeroed before each call), triton_dw (dw
returned in the input dtype: the fp32 accumulator is then gpuad's own, inside the peak), torch
(eager F.linear + F.cross_entropy), torch_compile, torch_lce (torch's own chunked
F.linear_cross_entropy, where this torch has it), liger (Liger Kernel's fused linear
cross-entropy) and cce (Cut Cross-Entropy), each when importable. Registered in
``bench.ops.OPS`` by ``bench/ops.py``.
"""
from __future__ import annotations

import importlib

import numpy as np

from . import lm_head_model
from .common import (SEED, SLICE_ROWS, Prepared, Unavailable, compile_fixed, gpuad_inputs, host64, itemsize,
                     normal, on_torch, rotating)

IGNORE = -100
IGNORE_EVERY = 17  # every 17th target is ignore_index: the padding rows of a real batch
#: impls whose schedule bench/lm_head_model.py models (gpuad's token chunks): a `model ms` figure
MODELLED = ("triton", "triton_dw", "cupy")
#: impls that hold device memory torch's allocator does not see (CuPy's pool): no peak figure
NO_TORCH_PEAK = ("cupy", "reference")


class LinearCrossEntropy:
    """loss = cross_entropy(x wᵀ, targets) (mean over the valid rows), with dx and dw:
    x [N, D], w [V, D], targets [N]."""
    name = "linear_cross_entropy"
    dim_names = ("N", "D", "V")
    metric = "TFLOP/s"

    @staticmethod
    def flops(case):
        """Three GEMMs of 2·N·D·V each (logits, dx, dw)."""
        n, d, v = case.dims
        return 6 * n * d * v

    @staticmethod
    def min_bytes(case):
        return None

    @staticmethod
    def input_bytes(case):
        n, d, v = case.dims
        return itemsize(case.dtype) * (n * d + v * d) + 8 * n

    @staticmethod
    def make_inputs(case):
        n, d, v = case.dims
        t = np.random.default_rng(SEED).integers(0, v, size=n, dtype=np.int64)
        t[::IGNORE_EVERY] = IGNORE
        return {"x": normal((n, d), (SEED, 1), case.dtype), "w": normal((v, d), (SEED, 2), case.dtype, d ** -0.5),
                "targets": t}

    @staticmethod
    def expected(case, host, xp):
        """float64 loss, dx and dw from the chunked reference (no [N, V] array)."""
        from gpuad.kernels import reference as K
        loss, dx, dw, _ = K.linear_cross_entropy(
            *(xp.asarray(host[k]).astype(xp.float64) for k in ("x", "w")), xp.asarray(host["targets"]),
            check_targets=False, chunk=max(1, (1 << 24) // case.dims[2]))
        return {"loss": loss, "dx": dx, "dw": dw}

    @staticmethod
    def host_slice(case, host):
        """dx of the first SLICE_ROWS rows in float64 on the host, from the host inputs (w
        widened in pieces of V)."""
        from gpuad.kernels import reference as K
        n, _, v = case.dims
        r = slice(0, min(n, SLICE_ROWS))
        x, w, step = host64(host, "x", r), host["w"], 1 << 14
        pieces = range(0, v, step)
        z = np.concatenate([x @ np.asarray(w[i:i + step], np.float64).T for i in pieces], axis=1)
        _, g = K.softmax_cross_entropy(z, host["targets"][r], ignore_index=IGNORE, reduction="none")
        g /= max(int((host["targets"] != IGNORE).sum()), 1)
        return {"dx": (r, sum(g[:, i:i + step] @ np.asarray(w[i:i + step], np.float64) for i in pieces))}

    @staticmethod
    def peak_extra_bytes(prepared: Prepared, impl: str):
        """Bytes torch's allocator holds at the peak of one call above what it held before it
        (the inputs, and the bench's fp32 dw buffer); None off CUDA and for CuPy-array impls
        (CuPy's pool is not seen). Run after the timed calls: compiles and workspaces exist."""
        if prepared.device != "cuda" or impl in NO_TORCH_PEAK:
            return None
        import torch
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = prepared.fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del out
        return peak

    @staticmethod
    def model_ms(rec, ceilings):
        """The time bench/lm_head_model.py gives gpuad's current schedule (the Triton impls: the
        schedule and chunk their tuning table gives the record's GPU; "cupy": token chunks of the
        default chunk) at the run's measured ceilings, for the gpuad impls (the "triton" and
        "cupy" calls include the bench's zeroing of their fp32 dw buffer: a 4·V·D write); None
        for the others, or without both ceilings."""
        if rec["impl"] not in MODELLED:
            return None
        gbps = (ceilings or {}).get("copy_GBps")
        tflops = (ceilings or {}).get("matmul_TFLOPs", {}).get(rec["dtype"])
        if not (gbps and tflops):
            return None
        n, d, v, b = rec["shape"]["N"], rec["shape"]["D"], rec["shape"]["V"], itemsize(rec["dtype"])
        main_grad = rec["impl"] != "triton_dw"
        zero_ms = 4 * v * d / gbps / 1e6 if main_grad else 0.0
        tuned = _triton_schedule(rec["device"]) if rec["impl"].startswith("triton") else {}
        return lm_head_model.current(n, d, v, b, dw_accumulate=main_grad, **tuned).ms(gbps, tflops) + zero_ms


def _triton_schedule(device_name):
    """{schedule, rows_per_chunk} the Triton LM head runs with on `device_name` (its tuned
    table, else the fallbacks); {} where its module does not import."""
    try:
        importlib.import_module("gpuad.kernels.triton.linear_cross_entropy")  # registers the space
    except ImportError:
        return {}
    from gpuad.kernels import tuning
    return tuning.values("triton.linear_cross_entropy", device_name)


def _lce_gpuad(module, main_grad=True):
    """gpuad's kernels; main_grad: dw added into an fp32 [V, D] buffer made before the call
    (a trainer's main grad, zeroed each call), else dw returned in the input dtype."""
    def setup(env, case, host, n):
        K, sets, dev = gpuad_inputs(env, module, host, [("x", case.dtype), ("w", case.dtype), ("targets", None)], n)
        _, d, v = case.dims
        acc = None
        if main_grad and module == "triton":
            torch = env.torch(module)
            acc = torch.zeros((v, d), dtype=torch.float32, device=dev)
        elif main_grad:
            xp = env.cupy(module) if dev == "cuda" else np
            acc = xp.zeros((v, d), dtype=xp.float32)

        def call(x, w, t):
            if acc is not None:
                acc[...] = 0
            loss, dx, dw, _ = K.linear_cross_entropy(x, w, t, dw_accumulate=acc, check_targets=False)
            return loss, dx, dw

        def outputs():
            return dict(zip(("loss", "dx", "dw"), call(*sets[0])))
        return Prepared(rotating(sets, call), outputs, dev)
    return setup


def _peer(kind, torch):
    """(x, w, t) -> loss of a peer implementation, or Unavailable with the reason."""
    import torch.nn.functional as F
    if kind == "torch_lce":
        if not hasattr(F, "linear_cross_entropy"):
            raise Unavailable(f"torch_lce: torch {torch.__version__} has no F.linear_cross_entropy")
        opts = torch.nn.LinearCrossEntropyOptions()
        return lambda x, w, t: F.linear_cross_entropy(x, w, t, ignore_index=IGNORE, options=opts)
    if kind == "liger":
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as liger
        except Exception as e:
            raise Unavailable(f"liger: Liger Kernel is not importable ({type(e).__name__}: {e})"[:300])

        def fn(x, w, t):
            out = liger(x, w, t, ignore_index=IGNORE)
            return out[0] if isinstance(out, tuple) else out  # with extra outputs asked for: a tuple
        return fn
    if kind == "cce":
        try:
            from cut_cross_entropy import linear_cross_entropy as cce
        except Exception as e:
            raise Unavailable(f"cce: Cut Cross-Entropy is not importable ({type(e).__name__}: {e})"[:300])
        return lambda x, w, t: cce(x, w, t, ignore_index=IGNORE)

    def eager(x, w, t):
        return F.cross_entropy(F.linear(x, w), t, ignore_index=IGNORE)
    return compile_fixed(torch, eager) if kind == "torch_compile" else eager


def _lce_torch(kind):
    def setup(env, case, host, n):
        if kind not in ("torch", "torch_lce"):
            env.require_cuda(kind, "timed on CUDA only" if kind == "torch_compile" else "needs a CUDA device")
        torch = env.torch(kind)
        fn = _peer(kind, torch)
        dev = env.device
        sets = [(on_torch(torch, host, case.dtype, dev, "x").requires_grad_(),
                 on_torch(torch, host, case.dtype, dev, "w").requires_grad_(),
                 on_torch(torch, host, None, dev, "targets")) for _ in range(n)]

        def call(x, w, t):
            loss = fn(x, w, t)
            loss.backward()
            dx, dw, x.grad, w.grad = x.grad, w.grad, None, None
            return loss, dx, dw

        def outputs():
            loss, dx, dw = call(*sets[0])
            return {"loss": loss.detach(), "dx": dx, "dw": dw}
        return Prepared(rotating(sets, call), outputs, dev)
    return setup


LinearCrossEntropy.impls = {
    "reference": _lce_gpuad("reference"),
    "triton": _lce_gpuad("triton"),
    "triton_dw": _lce_gpuad("triton", main_grad=False),  # dw in the input dtype: + fp32 accumulator
    "cupy": _lce_gpuad("cupy"),
    "torch": _lce_torch("torch"),
    "torch_lce": _lce_torch("torch_lce"),
    "liger": _lce_torch("liger"),
    "cce": _lce_torch("cce"),
    "torch_compile": _lce_torch("torch_compile"),
}

#: GPU shapes (the LM-head target shapes of bench/TARGETS.md) and small CPU ones, as (dims, dtype)
GPU_SHAPES = [((8192, 4096, 128256), "bfloat16"), ((16384, 2048, 32000), "bfloat16")]
CPU_QUICK_SHAPES = [((256, 128, 4000), "float32")]
CPU_FULL_SHAPES = [((1024, 256, 8000), "float32"), ((100, 64, 50257), "float32")]
TINY_SHAPES = [((64, 32, 500), "float32"), ((37, 16, 1031), "float32")]
#: impls run on these shapes by the quick preset on a GPU (its time budget; the rest: --impls)
QUICK_GPU_IMPLS = ("triton", "torch", "torch_lce", "liger")
