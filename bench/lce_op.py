"""The bench op of the fused LM head (linear + cross-entropy), ready to be wired into
bench/ops.py: ``OPS[LinearCrossEntropy.name] = LinearCrossEntropy`` and its shapes into the
presets (``GPU_SHAPES`` below; ``CPU_SHAPES`` for the CPU presets). Same conventions as the
other ops there: setups return ``harness.Prepared``; each checks its outputs against the float64
reference before it is timed. ``peak_extra_bytes`` gives the peak-memory column: bytes allocated
at the peak of one call above what was allocated before it (inputs, and the caller's dw buffer).

Implementations: reference, triton, cupy (gpuad's kernels; dw accumulated into an fp32
buffer the bench owns, as a trainer's main grad), triton_dw (dw returned in the input dtype:
the fp32 accumulator is then gpuad's own, inside the peak), torch (eager F.linear + F.cross_entropy,
forward and backward), torch_compile, torch_lce (torch's own F.linear_cross_entropy, chunked,
where this torch has it), liger (LigerFusedLinearCrossEntropyFunction) and cce (Cut
Cross-Entropy), each when importable.
"""
from __future__ import annotations

import numpy as np

from .harness import Prepared, Unavailable, quantize, rotating
from .ops import SEED, _compile, _gpuad_inputs, _isz, on_torch

GPU_SHAPES = [((8192, 4096, 128256), "bfloat16"), ((16384, 2048, 32000), "bfloat16")]  # DESIGN.md
CPU_SHAPES = [((256, 128, 4000), "float32")]
IGNORE = -100


class LinearCrossEntropy:
    """loss = cross_entropy(x wᵀ, targets) (mean), with dx and dw: x [N, D], w [V, D]."""
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
        return _isz(case.dtype) * (n * d + v * d) + 8 * n

    @staticmethod
    def make_inputs(case):
        n, d, v = case.dims
        rng = np.random.default_rng(SEED)
        q = lambda *s, scale=1.0: quantize(rng.standard_normal(s, dtype=np.float32) * np.float32(scale), case.dtype)
        t = rng.integers(0, v, size=n, dtype=np.int64)
        t[::17] = IGNORE  # some padding rows, as in a real batch
        return {"x": q(n, d), "w": q(v, d, scale=d ** -0.5), "targets": t}

    @staticmethod
    def expected(case, host, xp):
        """float64 loss, dx, dw from the chunked reference (no [N, V] array)."""
        from gpuad.kernels import reference as K
        loss, dx, dw, _ = K.linear_cross_entropy(
            *(xp.asarray(host[k], dtype=xp.float64) for k in ("x", "w")), xp.asarray(host["targets"]),
            check_targets=False, chunk=max(1, (1 << 24) // case.dims[2]))
        return {"loss": loss, "dx": dx, "dw": dw}


def _lce_gpuad(module, main_grad=True):
    """gpuad's kernels; main_grad: dw added into an fp32 [V, D] buffer made before the call
    (a trainer's main grad, zeroed each call), else dw returned in the input dtype."""
    def setup(env, case, host, n):
        K, sets, dev = _gpuad_inputs(env, module, host, [("x", case.dtype), ("w", case.dtype), ("targets", None)], n)
        lib = type(sets[0][0]).__module__.split(".")[0]  # torch, cupy or numpy
        v, d = case.dims[2], case.dims[1]
        acc = None
        if main_grad and lib == "torch":
            torch = env.torch(module)
            acc = torch.zeros((v, d), dtype=torch.float32, device=dev)
        elif main_grad:
            xp = env.cupy(module) if lib == "cupy" else np
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


def _lce_torch(kind):
    def setup(env, case, host, n):
        if kind not in ("torch", "torch_lce"):
            env.require_cuda(kind, "timed on CUDA only")
        torch = env.torch(kind)
        dev = env.device
        import torch.nn.functional as F
        if kind == "torch_lce":
            if not hasattr(F, "linear_cross_entropy"):
                raise Unavailable(f"torch_lce: torch {torch.__version__} has no F.linear_cross_entropy")
            opts = torch.nn.LinearCrossEntropyOptions()
            fn = lambda x, w, t: F.linear_cross_entropy(x, w, t, ignore_index=IGNORE, options=opts)
        elif kind == "liger":
            try:
                from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as liger
            except Exception as e:
                raise Unavailable(f"liger: Liger Kernel is not importable ({type(e).__name__}: {e})"[:300])

            def fn(x, w, t):
                out = liger(x, w, t, ignore_index=IGNORE)
                return out[0] if isinstance(out, tuple) else out  # newer versions add extra outputs
        elif kind == "cce":
            try:
                from cut_cross_entropy import linear_cross_entropy as cce
            except Exception as e:
                raise Unavailable(f"cce: Cut Cross-Entropy is not importable ({type(e).__name__}: {e})"[:300])
            fn = lambda x, w, t: cce(x, w, t, ignore_index=IGNORE)
        else:
            def fn(x, w, t):
                return F.cross_entropy(F.linear(x, w), t, ignore_index=IGNORE)
            if kind == "torch_compile":
                fn = _compile(torch, fn)
        sets = [(on_torch(torch, host["x"], case.dtype, dev).requires_grad_(),
                 on_torch(torch, host["w"], case.dtype, dev).requires_grad_(),
                 on_torch(torch, host["targets"], None, dev)) for _ in range(n)]

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


def peak_extra_bytes(prepared: Prepared, torch) -> int | None:
    """Bytes torch's allocator holds at the peak of one call above what it held before (CUDA
    only; CuPy's pool is not seen, so None for the cupy impl). Run after the timed calls, so
    that compiles and workspaces are already in place."""
    if prepared.device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = prepared.fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak
