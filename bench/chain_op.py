"""The bench ops of the engine's per-op cost: a chain of elementwise multiply-adds on a short
vector, forward and backward, with tensor constants (elementwise_chain) and with Python scalars
(scalar_chain: y = y * 1.0001 + 0.001, as a learning rate or a `0.5 * x` is written). With 16
floats the arithmetic is nothing, so the time is the bookkeeping of each op (gpuad's tape
against torch's autograd), on the CPU.

Implementations: reference (gpuad's engine on the numpy backend) and torch (eager autograd),
both on the CPU only. Registered in ``bench.ops.OPS`` by ``bench/ops.py``.
"""
from __future__ import annotations

import numpy as np

from .common import SEED, Prepared, Unavailable, itemsize, np_dtype, rotating


class ElementwiseChain:
    """y = x; y = y·a + b, `ops` times; loss = Σ y; the gradient dloss/dx = a^ops.
    x, a, b [n] float; a near 1 so that a^ops stays near 1."""
    name = "elementwise_chain"
    dim_names = ("ops", "n")
    metric = "TFLOP/s"
    interleave_cpu = True  # its impls timed in one interleaved loop on a CPU (bench.harness.run)

    @staticmethod
    def flops(case):
        """Forward: a multiply and an add per element and step; backward: a multiply."""
        ops, n = case.dims
        return 3 * ops * n

    @staticmethod
    def min_bytes(case):
        return None

    @staticmethod
    def input_bytes(case):
        return 3 * case.dims[1] * itemsize(case.dtype)

    @staticmethod
    def make_inputs(case):
        rng = np.random.default_rng((SEED, 7))
        n, dt = case.dims[1], np_dtype(case.dtype)
        return {"x": rng.normal(size=n).astype(dt), "a": rng.uniform(0.999, 1.001, n).astype(dt),
                "b": (1e-3 * rng.normal(size=n)).astype(dt)}

    @staticmethod
    def expected(case, host, xp):
        """The float64 loss, stepped through the chain, and dx = a^ops."""
        x, a, b = (np.asarray(host[k], np.float64) for k in ("x", "a", "b"))
        y = x
        for _ in range(case.dims[0]):
            y = y * a + b
        return {"loss": np.asarray(y.sum()), "dx": a ** case.dims[0]}

    @staticmethod
    def host_slice(case, host):
        """None: the device check covers the whole (short) output."""
        return {}


class ScalarChain(ElementwiseChain):
    """y = x; y = y·A + C with the Python scalars A = 1.0001 and C = 0.001, `ops` times;
    loss = Σ y; dloss/dx = A^ops. x [n] float."""
    name = "scalar_chain"
    A, C = 1.0001, 0.001

    @staticmethod
    def input_bytes(case):
        return case.dims[1] * itemsize(case.dtype)

    @staticmethod
    def make_inputs(case):
        return {"x": ElementwiseChain.make_inputs(case)["x"]}

    @staticmethod
    def expected(case, host, xp):
        y = np.asarray(host["x"], np.float64)
        for _ in range(case.dims[0]):
            y = y * ScalarChain.A + ScalarChain.C
        return {"loss": np.asarray(y.sum()), "dx": np.full(y.shape, ScalarChain.A ** case.dims[0])}


def _setup(engine, scalars=False):
    def setup(env, case, host, n_copies):
        if env.cuda:
            raise Unavailable(f"{engine}: a CPU engine case; not timed on a CUDA machine")
        ops = case.dims[0]
        if engine == "reference":
            import gpuad as ad
            make = lambda k, grad=False: ad.tensor(host[k].copy(), requires_grad=grad)  # noqa: E731
        else:
            import torch
            make = lambda k, grad=False: torch.tensor(host[k]).requires_grad_(grad)  # noqa: E731

        def call(x, a, b):
            y = x
            for _ in range(ops):
                y = y * a + b
            loss = y.sum()
            loss.backward()
            grad, x.grad = x.grad, None
            return loss, grad

        if scalars:
            sets = [(make("x", True), ScalarChain.A, ScalarChain.C) for _ in range(n_copies)]
        else:
            sets = [(make("x", True), make("a"), make("b")) for _ in range(n_copies)]

        def outputs():
            loss, grad = call(*sets[0])
            return {"loss": loss.detach() if engine == "torch" else loss.data, "dx": grad}
        return Prepared(rotating(sets, call), outputs, "cpu")
    return setup


ElementwiseChain.impls = {"reference": _setup("reference"), "torch": _setup("torch")}
ScalarChain.impls = {"reference": _setup("reference", True), "torch": _setup("torch", True)}
