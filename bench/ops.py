"""Op cases: shapes and presets, inputs, counting (FLOPs, minimum bytes), the float64
reference outputs, and one setup function per implementation.

An implementation setup ``setup(env, case, host, n_copies) -> harness.Prepared`` imports
its library lazily and raises ``harness.Unavailable`` with the reason when it cannot run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import lce_op
from .chain_op import ElementwiseChain, ScalarChain  # the engine's per-op cost, on the CPU
from .common import (SEED, SLICE_ROWS, Prepared, Unavailable, drop_device_copies, gpuad_inputs,  # noqa: F401
                     host64, import_kernels, itemsize, normal, on_torch, on_xp, rotating, to64)
from .lce_op import LinearCrossEntropy  # the fused LM head

IMPLS = ("reference", "triton", "triton_fused", "triton_dw", "cupy", "torch", "torch_lce", "liger", "cce",
         "torch_compile")  # compile last


@dataclass(frozen=True)
class Case:
    op: str
    dims: tuple  # CE (B, V); linear (M, K, N); LM head (N, D, V); mlp (B, D, H, C)
    dtype: str

    @property
    def label(self):
        return "x".join(str(d) for d in self.dims)

    def shape_dict(self):
        names = OPS[self.op].dim_names
        if len(names) != len(self.dims):  # an MLP with several hidden layers: H1, H2, ...
            names = (*names[:2], *(f"H{i}" for i in range(1, len(self.dims) - 2)), names[-1])
        return dict(zip(names, self.dims))


def _torch_device(env, who):
    torch = env.torch(who)
    return torch, env.device


def _torch_anchor(env, kind):
    """(torch, device) for the torch / torch_compile anchors of ops other than cross-entropy."""
    if kind == "liger":
        raise Unavailable("liger: Liger Kernel has no such op here (cross-entropy only)")
    if kind == "torch_compile":
        env.require_cuda(kind, "timed on CUDA only")
    return _torch_device(env, kind)


# --- softmax cross-entropy ---------------------------------------------------------------

class CrossEntropy:
    """Softmax cross-entropy, forward and backward (loss and dlogits), reduction "mean"."""
    name = "softmax_cross_entropy"
    dim_names = ("B", "V")
    metric = "GB/s"

    @staticmethod
    def flops(case):
        return None

    @staticmethod
    def min_bytes(case):
        """Read the logits once, write dlogits once, read the int64 targets."""
        b, v = case.dims
        return 2 * b * v * itemsize(case.dtype) + 8 * b

    input_bytes = min_bytes

    @staticmethod
    def make_inputs(case):
        b, v = case.dims
        targets = np.random.default_rng(SEED).integers(0, v, size=b, dtype=np.int64)
        return {"logits": normal((b, v), (SEED, 1), case.dtype, 2.0), "targets": targets}

    @staticmethod
    def expected(case, host, xp):
        """float64 loss and dlogits from gpuad.kernels.reference, computed in row chunks
        (dlogits kept in float32: its rounding is far below every tolerance)."""
        from gpuad.kernels import reference as K
        b, v = case.dims
        step = max(1, (1 << 25) // v)
        rows, dl = [], xp.empty((b, v), dtype=xp.float32)
        for r0 in range(0, b, step):
            lg = to64(xp, host["logits"][r0:r0 + step])
            tg = xp.asarray(host["targets"][r0:r0 + step])
            loss, g = K.softmax_cross_entropy(lg, tg, reduction="none")
            rows.append(loss)
            dl[r0:r0 + step] = g / b
            del lg, g
        return {"loss": xp.concatenate(rows).sum() / b, "dlogits": dl}

    @staticmethod
    def host_slice(case, host):
        """dlogits of the first SLICE_ROWS rows in float64 on the host: {name: (index, array)}.
        Every target is valid, so the mean divides by B."""
        from gpuad.kernels import reference as K
        b, _ = case.dims
        r = slice(0, min(b, SLICE_ROWS))
        _, g = K.softmax_cross_entropy(host64(host, "logits", r), host["targets"][r], reduction="none")
        return {"dlogits": (r, g / b)}


def _ce_gpuad(module):
    def setup(env, case, host, n):
        K, sets, dev = gpuad_inputs(env, module, host, [("logits", case.dtype), ("targets", None)], n)

        def call(logits, targets):
            return K.softmax_cross_entropy(logits, targets, check_targets=False)

        def outputs():
            loss, dl = call(*sets[0])
            return {"loss": loss, "dlogits": dl}
        return Prepared(rotating(sets, call), outputs, dev)
    return setup


def _ce_torch(kind):
    def setup(env, case, host, n):
        if kind != "torch":
            env.require_cuda(kind, "timed on CUDA only" if kind == "torch_compile" else "needs a CUDA device")
        torch, dev = _torch_device(env, kind)
        import torch.nn.functional as F
        if kind == "liger":
            try:
                from liger_kernel.transformers.functional import liger_cross_entropy as fn
            except Exception as e:
                raise Unavailable(f"liger: Liger Kernel is not importable ({type(e).__name__}: {e})"[:300])
        elif kind == "torch_compile":
            fn = compile_fixed(torch, F.cross_entropy)
        else:
            fn = F.cross_entropy
        sets = [(on_torch(torch, host, case.dtype, dev, "logits").requires_grad_(),
                 on_torch(torch, host, None, dev, "targets")) for _ in range(n)]

        def call(x, t):
            loss = fn(x, t)
            loss.backward()
            g, x.grad = x.grad, None
            return loss, g

        def outputs():
            loss, g = call(*sets[0])  # Liger writes its gradient over the logits: check the first call
            return {"loss": loss.detach(), "dlogits": g}
        return Prepared(rotating(sets, call), outputs, dev)
    return setup


CrossEntropy.impls = {
    "reference": _ce_gpuad("reference"),
    "triton": _ce_gpuad("triton"),
    "cupy": _ce_gpuad("cupy"),
    "torch": _ce_torch("torch"),
    "torch_compile": _ce_torch("torch_compile"),
    "liger": _ce_torch("liger"),
}


# --- linear backward ---------------------------------------------------------------------

class LinearBackward:
    """dx = dy w, dw = dyᵀ x, db = Σ dy for x [M, K], w [N, K], dy [M, N]."""
    name = "linear_backward"
    dim_names = ("M", "K", "N")
    metric = "TFLOP/s"

    @staticmethod
    def flops(case):
        m, k, n = case.dims
        return 4 * m * n * k

    @staticmethod
    def min_bytes(case):
        """Read x, w, dy once; write dx, dw, db once."""
        m, k, n = case.dims
        return itemsize(case.dtype) * (2 * m * k + 2 * n * k + m * n + n)

    @staticmethod
    def input_bytes(case):
        m, k, n = case.dims
        return itemsize(case.dtype) * (m * k + n * k + m * n)

    @staticmethod
    def make_inputs(case):
        m, k, n = case.dims
        return {"x": normal((m, k), (SEED, 1), case.dtype), "w": normal((n, k), (SEED, 2), case.dtype, k ** -0.5),
                "dy": normal((m, n), (SEED, 3), case.dtype)}

    @staticmethod
    def expected(case, host, xp):
        from gpuad.kernels import reference as K
        dx, dw, db = K.linear_backward(*(to64(xp, host[k]) for k in ("x", "w", "dy")))
        return {"dx": dx, "dw": dw, "db": db}

    @staticmethod
    def host_slice(case, host):
        """The first SLICE_ROWS rows of dx, dw and db in float64 on the host."""
        m, k, n = case.dims
        rm, rn = slice(0, min(m, SLICE_ROWS)), slice(0, min(n, SLICE_ROWS))
        dy_cols = np.asarray(host["dy"][:, rn], dtype=np.float64)
        return {"dx": (rm, host64(host, "dy", rm) @ host64(host, "w")),
                "dw": (rn, dy_cols.T @ host64(host, "x")), "db": (rn, dy_cols.sum(0))}


def _lin_gpuad(module, **kw):
    """gpuad's linear_backward from kernels `module`, called with keywords `kw`."""
    def setup(env, case, host, n):
        K, sets, dev = gpuad_inputs(env, module, host, [(k, case.dtype) for k in ("x", "w", "dy")], n)

        def call(x, w, dy):
            return K.linear_backward(x, w, dy, **kw)

        def outputs():
            return dict(zip(("dx", "dw", "db"), call(*sets[0])))
        return Prepared(rotating(sets, call), outputs, dev)
    return setup


def _lin_torch(kind):
    def setup(env, case, host, n):
        torch, dev = _torch_anchor(env, kind)

        def three_ops(x, w, dy):
            return dy @ w, dy.t() @ x, dy.sum(0)
        fn = compile_fixed(torch, three_ops) if kind == "torch_compile" else three_ops
        sets = [tuple(on_torch(torch, host, case.dtype, dev, k) for k in ("x", "w", "dy")) for _ in range(n)]
        return Prepared(rotating(sets, fn), lambda: dict(zip(("dx", "dw", "db"), fn(*sets[0]))), dev)
    return setup


LinearBackward.impls = {
    "reference": _lin_gpuad("reference"),
    "triton": _lin_gpuad("triton"),  # route "auto": the fused kernel or cuBLAS, whichever measured faster
    "triton_fused": _lin_gpuad("triton", route="fused"),  # the Triton-only figure
    "cupy": _lin_gpuad("cupy"),
    "torch": _lin_torch("torch"),
    "torch_compile": _lin_torch("torch_compile"),
    "liger": _lin_torch("liger"),
}


# --- one MLP training step ---------------------------------------------------------------

LR = 1e-3


def mlp_params(case):
    """The parameter names of an MLP case: w1, b1, ..., wL, bL for its L linear layers."""
    return tuple(f"{k}{i}" for i in range(1, len(case.dims) - 1) for k in ("w", "b"))


class MLPStep:
    """One SGD step of an MLP, relu between its linear layers, into softmax cross-entropy,
    end to end. dims (B, D, H1, ..., C): batch, input width, hidden widths, classes.

    x [B, D] needs no gradient, so the first layer's backward has no dx matmul."""
    name = "mlp_step"
    dim_names = ("B", "D", "H", "C")  # (B, D, H1, H2, C) and deeper name the layers' widths in order
    metric = "TFLOP/s"
    interleave_cpu = True  # the CPU engine against torch: timed in one interleaved loop (bench.harness.run)

    @staticmethod
    def flops(case):
        """Forward 2B·in·out per layer; backward 2B·in·out (dW) per layer, and as much again
        (dx) for each layer but the first."""
        b, widths = case.dims[0], case.dims[1:]
        layers = [i * o for i, o in zip(widths, widths[1:])]
        return 2 * b * (2 * sum(layers) + sum(layers[1:]))

    @staticmethod
    def min_bytes(case):
        return None

    @staticmethod
    def input_bytes(case):
        return itemsize(case.dtype) * case.dims[0] * case.dims[1] + 8 * case.dims[0]

    @staticmethod
    def make_inputs(case):
        b, widths, dt = case.dims[0], case.dims[1:], case.dtype
        host = {"x": normal((b, widths[0]), (SEED, 1), dt),
                "targets": np.random.default_rng(SEED).integers(0, widths[-1], size=b, dtype=np.int64)}
        for i, (n_in, n_out) in enumerate(zip(widths, widths[1:]), start=1):
            host[f"w{i}"] = normal((n_out, n_in), (SEED, 2 * i), dt, n_in ** -0.5)
            host[f"b{i}"] = normal((n_out,), (SEED, 2 * i + 1), dt, 0.1)
        return host

    @staticmethod
    def expected(case, host, xp):
        """Loss and parameter gradients in float64 from the reference kernels."""
        from gpuad.kernels import reference as K
        names = mlp_params(case)
        p = {k: to64(xp, host[k]) for k in names}
        n_layers = len(names) // 2
        inputs, pre = [to64(xp, host["x"])], []
        for i in range(1, n_layers + 1):
            z = inputs[-1] @ p[f"w{i}"].T + p[f"b{i}"]
            pre.append(z)
            inputs.append(xp.maximum(z, 0.0))
        loss, g = K.softmax_cross_entropy(pre[-1], xp.asarray(host["targets"]))
        out = {"loss": loss}
        for i in range(n_layers, 0, -1):
            dx, out[f"w{i}"], out[f"b{i}"] = K.linear_backward(inputs[i - 1], p[f"w{i}"], g, need_dx=i > 1)
            if i > 1:
                g = dx * (pre[i - 2] > 0)
        return out

    @staticmethod
    def host_slice(case, host):
        """None: the loss and every gradient depend on all rows (the device check covers them)."""
        return {}


def _mlp_gpuad(kernels, who):
    def setup(env, case, host, n):
        if kernels is None and env.cuda:
            raise Unavailable(f"{who}: the numpy backend runs on the CPU; not timed at GPU shapes")
        if kernels is not None:
            xp = env.cupy(who)
        else:
            xp = np
        import gpuad as ad
        if kernels is not None:
            import_kernels(kernels, who)
        backend = "numpy" if kernels is None else "cupy"
        with ad.use_backend(backend):
            names = mlp_params(case)
            params = [ad.tensor(on_xp(xp, host[k], case.dtype), requires_grad=True) for k in names]
            sets = [(ad.tensor(on_xp(xp, host["x"], case.dtype)), on_xp(xp, host["targets"], None)) for _ in range(n)]
        layers = list(zip(params[::2], params[1::2]))

        def step(x, targets):
            with ad.use_backend(backend):
                if kernels is not None:
                    ad.set_kernels(kernels)
                for i, (w, b) in enumerate(layers):
                    x = ad.linear(x if i == 0 else ad.relu(x), w, b)
                loss = ad.softmax_cross_entropy(x, targets)
                loss.backward()
                grads = [p.grad for p in params]
                for p in params:
                    p.data -= LR * p.grad
                    p.grad = None
            return loss, grads

        def outputs():
            loss, grads = step(*sets[0])
            return {"loss": loss.data, **dict(zip(names, grads))}
        return Prepared(rotating(sets, step), outputs, "cuda" if kernels else "cpu")
    return setup


def _mlp_torch(kind):
    def setup(env, case, host, n):
        torch, dev = _torch_anchor(env, kind)
        import torch.nn.functional as F
        names = mlp_params(case)
        params = [on_torch(torch, host, case.dtype, dev, k).requires_grad_() for k in names]
        sets = [(on_torch(torch, host, case.dtype, dev, "x"), on_torch(torch, host, None, dev, "targets"))
                for _ in range(n)]

        def forward(x, t, *params):
            for i in range(0, len(params), 2):
                x = F.linear(x if i == 0 else F.relu(x), params[i], params[i + 1])
            return F.cross_entropy(x, t)
        fwd = compile_fixed(torch, forward) if kind == "torch_compile" else forward

        def step(x, t):
            loss = fwd(x, t, *params)
            loss.backward()
            grads = [p.grad for p in params]
            with torch.no_grad():
                for p in params:
                    p -= LR * p.grad
                    p.grad = None
            return loss, grads

        def outputs():
            loss, grads = step(*sets[0])
            return {"loss": loss.detach(), **dict(zip(names, grads))}
        return Prepared(rotating(sets, step), outputs, dev)
    return setup


MLPStep.impls = {
    "reference": _mlp_gpuad(None, "reference"),
    "triton": _mlp_gpuad("triton", "triton"),
    "cupy": _mlp_gpuad("cupy", "cupy"),
    "torch": _mlp_torch("torch"),
    "torch_compile": _mlp_torch("torch_compile"),
    "liger": _mlp_torch("liger"),
}


OPS = {op.name: op for op in (CrossEntropy, LinearBackward, LinearCrossEntropy, MLPStep, ElementwiseChain,
                              ScalarChain)}


# --- presets -----------------------------------------------------------------------------
# (op, dims, dtype). GPU shapes are the target shapes of bench/TARGETS.md; CPU shapes are small enough that
# the numpy reference and torch on the CPU finish quickly.

_CE, _LIN, _MLP, _LCE = CrossEntropy.name, LinearBackward.name, MLPStep.name, LinearCrossEntropy.name
_CHAIN, _SCHAIN = ElementwiseChain.name, ScalarChain.name
_lce = lambda shapes: [(_LCE, dims, dt) for dims, dt in shapes]  # noqa: E731

GPU_QUICK = [  # every target shape (bench/TARGETS.md), then the MLP step
    (_CE, (8192, 32000), "bfloat16"), (_CE, (8192, 128256), "bfloat16"), (_CE, (16384, 50257), "bfloat16"),
    (_CE, (4096, 32000), "float32"),
    (_LIN, (64, 512, 512), "float32"), (_LIN, (256, 1024, 1024), "bfloat16"),
    (_LIN, (4096, 1024, 1024), "float32"), (_LIN, (8192, 4096, 4096), "bfloat16"),
    (_LIN, (16384, 4096, 14336), "bfloat16"), (_LIN, (65536, 1024, 1024), "bfloat16"),
    *_lce(lce_op.GPU_SHAPES),
    (_MLP, (4096, 1024, 1024, 8192), "float32"),
]
GPU_FULL = GPU_QUICK + [
    *[(_CE, (8192, v), "bfloat16") for v in (8192, 16384, 65536, 131072, 262144)],
    *[(_LIN, (m, 4096, 4096), "bfloat16") for m in (64, 256, 1024, 4096, 16384, 65536)],
    (_MLP, (8192, 4096, 4096, 32000), "bfloat16"),
]
CPU_QUICK = [
    (_CE, (256, 32000), "float32"), (_CE, (2048, 4096), "float32"),
    (_LIN, (64, 512, 512), "float32"), (_LIN, (512, 1024, 1024), "float32"),
    *_lce(lce_op.CPU_QUICK_SHAPES),
    (_MLP, (256, 512, 512, 1000), "float32"),
    # the CPU engine against torch: an MLP 64-256-256-10 step at batch 128, and 1000 multiply-adds
    # on 16 floats, forward and backward, with tensor constants and with Python scalars
    (_MLP, (128, 64, 256, 256, 10), "float32"), (_CHAIN, (1000, 16), "float32"), (_SCHAIN, (1000, 16), "float32"),
]
CPU_FULL = CPU_QUICK + [
    *[(_CE, (512, v), "float32") for v in (1024, 8192, 65536)],
    *[(_LIN, (m, 512, 512), "float32") for m in (16, 256, 4096)],
    *_lce(lce_op.CPU_FULL_SHAPES),
]
TINY = [
    (_CE, (64, 1000), "float32"), (_CE, (37, 1031), "float32"),
    (_LIN, (64, 96, 80), "float32"), (_LIN, (1, 33, 17), "float32"),
    *_lce(lce_op.TINY_SHAPES),
    (_MLP, (32, 64, 128, 10), "float32"), (_MLP, (8, 16, 32, 32, 10), "float32"), (_CHAIN, (50, 16), "float32"),
    (_SCHAIN, (50, 16), "float32"),
]
PRESETS = {"quick": (GPU_QUICK, CPU_QUICK), "full": (GPU_FULL, CPU_FULL), "tiny": (TINY, TINY)}
# (op, impl) left out of the quick preset on a GPU unless --impls names them: compile time, and
# the LM head's time budget (each of its calls takes tens of ms at the target shapes)
QUICK_GPU_SKIP = {
    **{(op, "torch_compile"): "left out of the quick preset on this op (compile time); add --impls"
       for op in (_LIN, _MLP)},
    **{(_LCE, impl): "left out of the quick preset on this op (its time budget); add --impls"
       for impl in IMPLS if impl not in lce_op.QUICK_GPU_IMPLS},
}


def cases_for(preset, cuda, ops=None, dtypes=None):
    """The cases of `preset` (its GPU shapes on CUDA, else its CPU shapes), filtered by op;
    `dtypes` replaces each shape's dtype by each of those given."""
    table = PRESETS[preset][0 if cuda else 1]
    out = []
    for op, dims, dt in table:
        if ops and op not in ops:
            continue
        for d in dtypes or [dt]:
            c = Case(op, dims, d)
            if c not in out:
                out.append(c)
    return out
