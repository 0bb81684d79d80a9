"""linear_cross_entropy (the fused LM head) against linear-then-cross-entropy.

Oracles: torch's autograd in float64 through x wᵀ + b, soft-capping, F.cross_entropy and the
z-loss written out (every option), and torch's own F.linear_cross_entropy (the options it has).
The numpy reference is held to them in float64; the Triton implementation (interpreter on the
CPU: fp32 / fp16, small shapes) and the CUDA C row kernel (emulated on the CPU) are held to the
reference. No [N, V] array: a torch dispatch mode records every tensor the Triton path
creates, and tracemalloc the reference's peak. The engine op is gradchecked in float64.
GPU tests (marker `gpu`): bf16 at real sizes, and peak memory against the targets.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import gpuad as ad
from gpuad.kernels import reference as ref

IGNORE = -100
OPTION_SETS = {  # name -> keyword arguments (bias=True means: pass a bias)
    "plain": {},
    "bias": {"bias": True},
    "smooth": {"label_smoothing": 0.15},
    "zloss": {"z_loss": 1e-2},
    "softcap": {"softcap": 2.5},
    "all": {"bias": True, "label_smoothing": 0.1, "z_loss": 3e-3, "softcap": 4.0},
}


def make(n, d, v, dtype=torch.float64, seed=0, ignore_every=0, bias=False):
    """x [n, d], w [v, d], targets [n] (every `ignore_every`-th ignored), bias [v] or None."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) * (2.0 / d ** 0.5)).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        t[::ignore_every] = IGNORE
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    return x, w, t, b


def options(name, b):
    kw = dict(OPTION_SETS[name])
    if kw.pop("bias", False):
        kw["bias"] = b
    return kw


def oracle(x, w, t, bias=None, *, ignore_index=IGNORE, reduction="mean", label_smoothing=0.0, z_loss=0.0,
           softcap=None, grad_scale=None):
    """(loss, dx, dw, db, lse) as float64 numpy from torch autograd on linear-then-CE."""
    x, w = (a.detach().double().clone().requires_grad_() for a in (x, w))
    b = None if bias is None else bias.detach().double().clone().requires_grad_()
    z = F.linear(x, w, b)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=1)
    valid = t != ignore_index
    rows = F.cross_entropy(z, t, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    rows = rows + z_loss * lse ** 2 * valid
    if reduction == "none":
        loss = rows
    else:
        loss = rows.sum() / (valid.sum().clamp(min=1) if reduction == "mean" else 1)
    weight = torch.ones_like(loss) if grad_scale is None else torch.as_tensor(grad_scale, dtype=torch.float64)
    (loss * weight).sum().backward()
    out = [loss.detach(), x.grad, w.grad, None if b is None else b.grad, lse.detach()]
    return [None if a is None else a.numpy() for a in out]


def as_np(a):
    return None if a is None else a.detach().cpu().double().numpy()


def assert_close(got, want, rtol, atol_rel, what):
    """|got - want| <= rtol·|want| + atol_rel·max(max|want|, 1) elementwise, got finite."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, want {want.shape}"
    assert np.isfinite(got).all(), f"{what}: non-finite values"
    atol = atol_rel * max(np.abs(want).max() if want.size else 0.0, 1.0)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)


def assert_outputs(got, want, rtol, atol_rel, names=("loss", "dx", "dw", "db", "lse")):
    for g, w, name in zip(got, want, names):
        if w is None:
            assert g is None, f"{name}: expected None"
            continue
        assert_close(as_np(g) if isinstance(g, torch.Tensor) else g, w, rtol, atol_rel, name)


# ---------------------------------------------------------------- reference (float64)

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", list(OPTION_SETS))
def test_reference_matches_torch_float64(reduction, opts):
    """Every option, ignored rows, V = 37 (not a multiple of 16), chunks of 4 rows over N = 13."""
    x, w, t, b = make(13, 6, 37, seed=len(opts) + len(reduction), ignore_every=4, bias=True)
    kw = options(opts, b)
    got = ref.linear_cross_entropy(x.numpy(), w.numpy(), t.numpy(), reduction=reduction, chunk=4, return_lse=True,
                                   **{k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    want = oracle(x, w, t, reduction=reduction, **kw)
    assert_outputs(got, want, 1e-10, 1e-12)
    assert got[0].dtype == np.float64 and got[1].dtype == np.float64


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="this torch has no F.linear_cross_entropy (2.13+)")
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_matches_torch_linear_cross_entropy(reduction, chunked):
    """torch's own F.linear_cross_entropy (reference path, and its chunked path)."""
    x, w, t, b = make(24, 8, 45, seed=3, ignore_every=5, bias=True)
    x, w, b = (a.requires_grad_() for a in (x, w, b))
    topts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=7) if chunked else None
    eps = 0.0 if chunked else 0.1  # torch's chunked path has no label smoothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback from the chunked path warns: fail instead
        loss = F.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, label_smoothing=eps,
                                      ignore_index=IGNORE, options=topts)
    loss.sum().backward()
    got = ref.linear_cross_entropy(x.detach().numpy(), w.detach().numpy(), t.numpy(), bias=b.detach().numpy(),
                                   reduction=reduction, label_smoothing=eps, chunk=5)
    assert_outputs(got, [as_np(a) for a in (loss, x.grad, w.grad, b.grad)], 1e-9, 1e-11)


def test_reference_float32_path_close_to_float64():
    """fp16 inputs: float32 accumulation, outputs in fp16, dw accumulated in float32."""
    x, w, t, b = make(16, 8, 50, torch.float16, seed=4, ignore_every=3, bias=True)
    got = ref.linear_cross_entropy(x.numpy(), w.numpy(), t.numpy(), bias=b.numpy(), chunk=5, z_loss=1e-3)
    assert got[0].dtype == np.float32 and got[1].dtype == got[2].dtype == got[3].dtype == np.float16
    want = oracle(x, w, t, b, z_loss=1e-3)
    assert_outputs(got, want, 2e-3, 2e-3)


def test_reference_chunk_size_does_not_change_the_result():
    x, w, t, b = make(11, 5, 23, seed=5, ignore_every=3, bias=True)
    kw = dict(bias=b.numpy(), reduction="sum", label_smoothing=0.1, z_loss=1e-2, softcap=3.0, return_lse=True)
    runs = [ref.linear_cross_entropy(x.numpy(), w.numpy(), t.numpy(), chunk=c, **kw) for c in (1, 4, 11, 100)]
    for other in runs[1:]:
        assert_outputs(other, runs[0], 1e-13, 1e-14)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_all_ignored_gives_zeros(reduction):
    x, w, t, b = make(6, 4, 9, seed=6, bias=True)
    t[:] = IGNORE
    loss, dx, dw, db = ref.linear_cross_entropy(x.numpy(), w.numpy(), t.numpy(), bias=b.numpy(), reduction=reduction,
                                                z_loss=0.1, label_smoothing=0.2, softcap=2.0)
    for a in (loss, dx, dw, db):
        assert np.isfinite(a).all() and (a == 0).all()


def test_reference_grad_scale_dw_accumulate_need_dx_and_grad_false():
    x, w, t, b = make(9, 4, 13, seed=7, ignore_every=4, bias=True)
    xn, wn, tn, bn = x.numpy(), w.numpy(), t.numpy(), b.numpy()
    scale = np.linspace(-1.0, 2.0, 9)
    got = ref.linear_cross_entropy(xn, wn, tn, bias=bn, reduction="none", grad_scale=scale, chunk=2)
    assert_outputs(got, oracle(x, w, t, b, reduction="none", grad_scale=scale), 1e-10, 1e-12)
    got = ref.linear_cross_entropy(xn, wn, tn, reduction="mean", grad_scale=np.asarray(-3.0))
    assert_outputs(got, oracle(x, w, t, grad_scale=-3.0), 1e-10, 1e-12)
    acc = np.random.default_rng(0).standard_normal(wn.shape).astype(np.float32)
    acc0 = acc.copy()
    loss, dx, dw, db = ref.linear_cross_entropy(xn, wn, tn, dw_accumulate=acc, need_dx=False, chunk=4)
    want = oracle(x, w, t)
    assert dx is None and db is None and dw is acc
    assert_close(acc - acc0, want[2], 1e-5, 1e-6, "dw_accumulate")
    loss, dx, dw, db = ref.linear_cross_entropy(xn, wn, tn, grad=False)
    assert dx is None and dw is None and db is None
    assert_close(loss, want[0], 1e-12, 0, "loss")


def test_reference_never_holds_n_by_v():
    """The reference's peak memory stays far below one [N, V] float64 array."""
    x, w, t, _ = make(512, 8, 1000, seed=8)
    xn, wn, tn = x.numpy(), w.numpy(), t.numpy()
    tracemalloc.start()
    try:
        ref.linear_cross_entropy(xn, wn, tn, chunk=16, softcap=3.0, label_smoothing=0.1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    n_by_v = 512 * 1000 * 8
    assert peak < n_by_v / 4, f"peak {peak} bytes, one [N, V] float64 array is {n_by_v}"


def test_default_chunk():
    """min(N, 2048) rows, within 1 GiB and a quarter of the free memory, a multiple of 128."""
    chunk = ref.linear_cross_entropy_chunk
    assert chunk(8192, 128256, 2) == 2048 and chunk(16384, 32000, 2) == 2048
    assert chunk(100, 50, 4) == 100 and chunk(0, 50, 4) == 1
    assert chunk(8192, 128256, 4) == 2048  # 1.05 GB of fp32 logits: within 1 GiB
    assert chunk(8192, 256000, 4) == 1024  # 2.1 GB would not be: 1048 rows -> 1024
    c = chunk(8192, 128256, 2, free_bytes=1 << 30)  # a quarter of 1 GiB: 1046 rows -> 1024
    assert c == 1024 and c * 128256 * 2 <= (1 << 30) // 4
    assert chunk(10**6, 10**9, 2) == 1 and chunk(4096, 10**6, 4, free_bytes=10**8) == 6


@pytest.mark.parametrize("kw, match", [
    (dict(x=np.zeros((3, 4, 2))), "x must be"),
    (dict(w=np.zeros((5, 3))), "D = w.shape"),
    (dict(targets=np.zeros(2, np.int64)), "targets must have shape"),
    (dict(targets=np.zeros(3)), "integers"),
    (dict(bias=np.zeros(4)), "bias must have shape"),
    (dict(w=np.zeros((5, 4), np.float32)), "share one dtype"),
    (dict(reduction="avg"), "reduction"),
    (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(z_loss=-1.0), "z_loss"),
    (dict(softcap=0.0), "softcap"),
    (dict(dw_accumulate=np.zeros((5, 4))), "dw_accumulate"),
    (dict(chunk=0), "chunk"),
    (dict(grad_scale=np.ones(3)), "grad_scale"),
])
def test_bad_arguments_name_the_argument(kw, match):
    args = dict(x=np.zeros((3, 4)), w=np.zeros((5, 4)), targets=np.zeros(3, np.int64))
    args.update(kw)
    x, w, t = args.pop("x"), args.pop("w"), args.pop("targets")
    with pytest.raises(ValueError, match=match):
        ref.linear_cross_entropy(x, w, t, **args)


def test_bad_target_raises_index_error():
    x, w, t, _ = make(4, 3, 7, seed=9)
    t[2] = 7
    with pytest.raises(IndexError, match="target 7 at row 2"):
        ref.linear_cross_entropy(x.numpy(), w.numpy(), t.numpy())


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 9), d=st.integers(1, 6), v=st.integers(1, 40), chunk=st.integers(1, 10),
       reduction=st.sampled_from(["mean", "sum", "none"]), opts=st.sampled_from(list(OPTION_SETS)),
       ignore=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_reference_hypothesis_shapes(n, d, v, chunk, reduction, opts, ignore, seed):
    x, w, t, b = make(n, d, v, seed=seed, ignore_every=ignore, bias=True)
    kw = options(opts, b)
    got = ref.linear_cross_entropy(x.numpy(), w.numpy(), t.numpy(), reduction=reduction, chunk=chunk,
                                   return_lse=True,
                                   **{k: (a.numpy() if isinstance(a, torch.Tensor) else a) for k, a in kw.items()})
    assert_outputs(got, oracle(x, w, t, reduction=reduction, **kw), 1e-9, 1e-11)


# ---------------------------------------------------------------- engine op (numpy, float64)

def _engine_inputs(seed=10, shape=(2, 3)):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape + (5,))
    w = rng.standard_normal((11, 5)) * 0.7
    b = rng.standard_normal(11) * 0.3
    t = rng.integers(0, 11, shape)
    t.reshape(-1)[::4] = IGNORE
    return x, w, b, t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", ["plain", "all"])
def test_engine_op_gradcheck(reduction, opts):
    """VJP and JVP against central differences, x of shape [2, 3, D], chunks of 2 rows."""
    x, w, b, t = _engine_inputs()
    kw = {k: a for k, a in OPTION_SETS[opts].items() if k != "bias"}
    weights = np.random.default_rng(1).standard_normal(t.shape)

    def f(x, w, b):
        loss = ad.linear_cross_entropy(x, w, t, b, reduction=reduction, chunk=2, **kw)
        return ad.sum(ad.mul(loss, weights)) if reduction == "none" else ad.mul(loss, 1.7)
    assert ad.gradcheck(f, x, w, b)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_engine_op_matches_linear_then_cross_entropy(reduction):
    x, w, b, t = _engine_inputs(seed=11)
    fused = [ad.tensor(a, requires_grad=True) for a in (x, w, b)]
    composed = [ad.tensor(a, requires_grad=True) for a in (x, w, b)]
    cot = np.random.default_rng(2).standard_normal(t.shape) if reduction == "none" else None
    loss = ad.linear_cross_entropy(*fused[:2], t, fused[2], reduction=reduction, label_smoothing=0.1, chunk=4)
    want = ad.softmax_cross_entropy(ad.linear(*composed), t, reduction=reduction, label_smoothing=0.1)
    np.testing.assert_allclose(loss.numpy(), want.numpy(), rtol=1e-12)
    loss.backward(cot)
    want.backward(cot)
    for a, b_ in zip(fused, composed):
        np.testing.assert_allclose(a.grad, b_.grad, rtol=1e-10, atol=1e-13)


def test_engine_op_no_grad_and_constant_inputs():
    x, w, b, t = _engine_inputs(seed=12)
    with ad.no_grad():
        loss = ad.linear_cross_entropy(ad.tensor(x, requires_grad=True), w, t, b)
    assert loss._node is None
    want = ref.linear_cross_entropy(x.reshape(-1, 5), w, t.reshape(-1), bias=b)[0]
    np.testing.assert_allclose(loss.numpy(), want, rtol=1e-14)
    wt = ad.tensor(w, requires_grad=True)  # x constant: only W's gradient
    ad.linear_cross_entropy(x, wt, t).backward()
    np.testing.assert_allclose(wt.grad, ref.linear_cross_entropy(x.reshape(-1, 5), w, t.reshape(-1))[2], rtol=1e-12)
    with pytest.raises(ValueError, match="targets"):
        ad.linear_cross_entropy(x, w, t[:1])


# ---------------------------------------------------------------- Triton (interpreter)

class Recorder(TorchDispatchMode):
    """Records the bytes of the largest storage behind any tensor an aten op returns (the
    interpreter's own copies of kernel arguments included); fills fresh float buffers (empty,
    empty_strided) with NaN, so an output element nobody writes shows up."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.untyped_storage().nbytes())
                if func in (torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default) \
                        and o.is_floating_point():
                    o.fill_(float("nan"))
        return out


def _triton():
    return importlib.import_module("gpuad.kernels.triton.linear_cross_entropy")


@pytest.fixture(params=["one_block", "many_blocks"])
def block(request, monkeypatch):
    """Rows of V columns in one step of the kernel's loop, or in steps of 16 columns."""
    if request.param == "many_blocks":
        monkeypatch.setattr(_triton(), "MAX_BLOCK", 16)
    return request.param


def run_triton(x, w, t, b, dtype, **kw):
    """The Triton implementation under the recorder: (outputs, bytes of the largest storage)."""
    lce = _triton()
    kw = dict(kw)
    if kw.pop("bias", None) is not None:
        kw["bias"] = b.to(dtype)
    with Recorder() as rec:
        out = lce.linear_cross_entropy(x.to(dtype), w.to(dtype), t, return_lse=True, **kw)
    return out, rec.largest


TRITON_TOL = {torch.float32: (2e-5, 2e-6), torch.float16: (2e-2, 4e-3)}


@pytest.mark.parametrize("case", [
    (torch.float32, "mean", "plain"), (torch.float32, "none", "bias"), (torch.float32, "sum", "smooth"),
    (torch.float32, "mean", "zloss"), (torch.float32, "none", "softcap"), (torch.float32, "mean", "all"),
    (torch.float16, "mean", "all"), (torch.float16, "none", "plain"),
])
def test_triton_matches_reference(block, case):
    """N = 9 in chunks of 4, V = 37: the chunk and the kernel's block never divide evenly."""
    dtype, reduction, opts = case
    x, w, t, b = make(9, 16, 37, seed=20 + len(opts), ignore_every=4, bias=True)
    kw = options(opts, b)
    out, _ = run_triton(x, w, t, b, dtype, reduction=reduction, chunk=4, **kw)
    xq, wq = x.to(dtype).double(), w.to(dtype).double()
    bq = None if "bias" not in kw else b.to(dtype).double()
    want = ref.linear_cross_entropy(xq.numpy(), wq.numpy(), t.numpy(), reduction=reduction, return_lse=True,
                                    **{k: (bq.numpy() if k == "bias" else a) for k, a in kw.items()})
    assert out[0].dtype == torch.float32 and all(a.dtype == dtype for a in out[1:4] if a is not None)
    assert_outputs(out, want, *TRITON_TOL[dtype])


@pytest.mark.parametrize("shape", [(1, 1, 1), (0, 4, 7), (3, 2, 16), (2, 3, 65)])
def test_triton_edge_shapes(shape):
    """One class, no rows, V a power of two, V one past the padded stride of 64."""
    x, w, t, b = make(*shape, seed=sum(shape), bias=True)
    for reduction in ("mean", "none"):
        out, _ = run_triton(x, w, t, b, torch.float32, reduction=reduction, bias=b, label_smoothing=0.1)
        want = oracle(x, w, t, b, reduction=reduction, label_smoothing=0.1)
        assert_outputs(out, want, *TRITON_TOL[torch.float32])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_never_holds_n_by_v(reduction):
    """N = 48 rows in chunks of 4: no tensor (nor the interpreter's copy of one) is larger
    than the [4, V] chunk buffer (row stride padded to 64), a fraction of the [N, V] logits."""
    n, d, v, chunk = 48, 4, 37, 4
    x, w, t, b = make(n, d, v, seed=24, ignore_every=5, bias=True)
    out, largest = run_triton(x, w, t, b, torch.float32, reduction=reduction, chunk=chunk, bias=b, softcap=5.0)
    want = oracle(x, w, t, b, reduction=reduction, softcap=5.0)
    assert_outputs(out, want, *TRITON_TOL[torch.float32])
    buffer_bytes = chunk * 64 * 4
    assert largest <= buffer_bytes <= n * v * 4 / 6, f"largest storage {largest} B, [N, V] fp32 is {n * v * 4} B"


def test_triton_all_ignored_dw_accumulate_need_dx_false_grad_scale():
    x, w, t, b = make(6, 8, 21, torch.float32, seed=30, bias=True)
    lce = _triton()
    t_all = torch.full_like(t, IGNORE)
    for reduction in ("mean", "sum", "none"):
        loss, dx, dw, db = lce.linear_cross_entropy(x, w, t_all, bias=b, reduction=reduction, z_loss=0.1,
                                                    softcap=2.0, label_smoothing=0.1, chunk=4)
        for a in (loss, dx, dw, db):
            assert torch.isfinite(a).all() and (a == 0).all()
    acc = torch.randn(21, 8)
    acc0 = acc.clone()
    scale = torch.linspace(-1, 1, 6)
    for _ in range(2):  # accumulates: twice the gradient
        loss, dx, dw, db = lce.linear_cross_entropy(x, w, t, bias=b, reduction="none", dw_accumulate=acc,
                                                    need_dx=False, grad_scale=scale, chunk=4)
        assert dx is None and dw is acc
    want = oracle(x, w, t, b, reduction="none", grad_scale=scale)
    assert_close(as_np(acc - acc0), 2 * want[2], 1e-5, 1e-6, "dw_accumulate")
    assert_close(as_np(db), want[3], 1e-5, 1e-6, "db")
    loss, dx, dw, db = lce.linear_cross_entropy(x, w, t, grad=False)
    assert dx is None and dw is None and db is None
    assert_close(as_np(loss), oracle(x, w, t)[0], 1e-6, 0, "loss")


def test_triton_inputs_unchanged_and_deterministic():
    x, w, t, b = make(7, 8, 19, torch.float32, seed=31, ignore_every=3, bias=True)
    x0, w0, b0, t0 = x.clone(), w.clone(), b.clone(), t.clone()
    lce = _triton()
    first = lce.linear_cross_entropy(x, w, t, bias=b, softcap=3.0, chunk=3)
    second = lce.linear_cross_entropy(x, w, t, bias=b, softcap=3.0, chunk=3)
    assert all(torch.equal(p, q) for p, q in zip(first, second))
    assert torch.equal(x, x0) and torch.equal(w, w0) and torch.equal(b, b0) and torch.equal(t, t0)


def test_triton_checks_targets_and_arguments():
    x, w, t, _ = make(4, 8, 10, torch.float32, seed=32)
    lce = _triton()
    t[1] = 10
    with pytest.raises(IndexError, match="target 10"):
        lce.linear_cross_entropy(x, w, t)
    t[1] = -7  # unchecked: no out-of-bounds access, the other rows stay right
    loss, dx, dw, db = lce.linear_cross_entropy(x, w, t, reduction="none", check_targets=False)
    good = torch.tensor([0, 2, 3])
    want = oracle(x[good], w, t[good], reduction="none")
    assert_close(as_np(loss[good]), want[0], 1e-5, 1e-6, "loss")
    with pytest.raises(ValueError, match="share one dtype"):
        lce.linear_cross_entropy(x, w.double(), t)
    with pytest.raises(ValueError, match="float16, bfloat16, float32"):
        lce.linear_cross_entropy(x.double(), w.double(), t)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 6), d=st.sampled_from([4, 8]), v=st.integers(1, 70), chunk=st.integers(1, 7),
       reduction=st.sampled_from(["mean", "sum", "none"]), opts=st.sampled_from(list(OPTION_SETS)),
       seed=st.integers(0, 2**16))
def test_triton_hypothesis_shapes(n, d, v, chunk, reduction, opts, seed):
    x, w, t, b = make(n, d, v, seed=seed, ignore_every=3, bias=True)
    kw = options(opts, b)
    out, _ = run_triton(x, w, t, b, torch.float32, reduction=reduction, chunk=chunk, **kw)
    want = oracle(x.float(), w.float(), t, **{k: (a.float() if k == "bias" else a) for k, a in kw.items()},
                  reduction=reduction)
    assert_outputs(out, want, *TRITON_TOL[torch.float32])


def test_triton_kernel_meta():
    lce = _triton()
    meta = lce._kernel_meta(128256, has_bias=False, grad=True, label_smoothing=0.0, z_loss=0.0, softcap=None,
                            row_scale=False)
    assert meta["BLOCK"] == lce.MAX_BLOCK and meta["num_warps"] == 8 and not meta["SOFTCAP"]
    assert lce._kernel_meta(37, has_bias=True, grad=False, label_smoothing=0.1, z_loss=1e-4, softcap=30.0,
                            row_scale=True)["BLOCK"] == 64
    assert lce.dw_route(torch.device("cpu"), torch.float16) == "upcast"
    assert lce.dw_route(torch.device("cpu"), torch.float32) == "cublas"


# The row kernel compiled ahead of time for Hopper (sm_90) in a worker process without the
# interpreter (whose definitions cannot be compiled): bf16 and fp32, all options on and all off,
# at V = 50257 (not a multiple of 16: the padded stride keeps the loads vectorised).
_AOT_SCRIPT = r"""
import importlib, itertools, json, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
L = importlib.import_module("gpuad.kernels.triton.linear_cross_entropy")  # the module, not the function
try:
    ptxas = triton.knobs.nvidia.ptxas.path
except Exception:
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas().path
fn, v = L._lce_rows_kernel, 50257
stride = triton.cdiv(v, L.ROW_PAD) * L.ROW_PAD
out = {}
for dt, on in itertools.product(("bf16", "fp32"), (True, False, "weighted")):
    weighted = on == "weighted"
    meta = L._kernel_meta(v, has_bias=bool(on), grad=bool(on), label_smoothing=0.1 * bool(on),
                          z_loss=0.0 if weighted else 1e-4 * on, softcap=30.0 if on else None, row_scale=bool(on),
                          has_weight=weighted)
    warps = meta.pop("num_warps")
    sig = dict(z_ptr="*" + dt, stride="i32", b_ptr="*" + dt, t_ptr="*i64", loss_ptr="*fp32", lse_ptr="*fp32",
               scale_ptr="*fp32", cw_ptr="*fp32", cw_sum_ptr="*fp32", n_cols="i32", ignore_index="i32",
               smoothing="fp32", z_coef="fp32", cap="fp32")
    sig.update({k: "constexpr" for k in meta})
    aligned = ("z_ptr", "b_ptr", "t_ptr", "loss_ptr", "lse_ptr", "scale_ptr", "cw_ptr", "cw_sum_ptr",
               "stride")  # as a launch sees them
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in aligned}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=meta, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        open(tmp + "/k.ptx", "w").write(ptx)
        log = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a" if "sm_90a" in ptx else "--gpu-name=sm_90",
                              tmp + "/k.ptx", "-o", tmp + "/k.o"], capture_output=True, text=True).stderr
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    vector_loads = len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]", ptx))
    name = f"{dt}-{on if weighted else 'on' if on else 'off'}"
    out[name] = dict(spills=spills, vector_loads=vector_loads, stores="st.global" in ptx)
print(json.dumps(out))
"""


def test_triton_row_kernel_compiles_for_hopper(tmp_path):
    """Compiles, stores, loads whole vectors and spills nothing, with each dtype and option set
    (every option; none; class weights)."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) == 6
    for variant, r in report.items():
        assert r["stores"] and r["vector_loads"] > 0, (variant, r)
        assert r["spills"] and max(r["spills"]) == 0, (variant, r)


# ---------------------------------------------------------------- CUDA C kernels (emulated)

def _cupy_launcher():
    return importlib.import_module("gpuad.kernels.cupy.linear_cross_entropy")


def test_cuda_row_threads():
    """A multiple of 32 threads, 32 to 1024 (the emulated build below checks that every
    kernel the launcher names exists: its wrappers take their addresses)."""
    for n_cols in (1, 37, 32000, 128256, 10**7):
        threads = _cupy_launcher().row_threads(n_cols)
        assert threads % 32 == 0 and 32 <= threads <= 1024


@pytest.fixture(scope="module")
def emulated_lce(tmp_path_factory):
    """The CUDA C source of the launcher, built as host C++ with tests/cuda_emu.h."""
    emu = importlib.import_module("test_cuda_emulated")
    launcher = _cupy_launcher()
    work = tmp_path_factory.mktemp("lce_emu")
    cxx, why = emu._find_cxx(work)
    if cxx is None:
        pytest.skip(why)
    unit = work / "lce_emu.cpp"
    unit.write_text(f'#include "{emu.HEADER}"\n\n{emu.emulated_source(launcher.SOURCE)}\n\n{emu.wrappers(launcher)}')
    lib = work / "liblce_emu.so"
    cmd = [cxx, *emu.CXX_FLAGS, f"-I{emu.HERE}", str(unit), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return emu, emu.EmulatedModule(lib, launcher)


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("opts", ["plain", "all"])
def test_cuda_row_kernel_emulated(emulated_lce, name, opts):
    """lce_rows and lce_column_sum on one chunk of logits, against the reference's formulas on
    the very logits the kernel reads; rows and launch geometry as the launcher makes them."""
    emu, module = emulated_lce
    launcher = _cupy_launcher()
    suffix = launcher.SUFFIX[name]
    n, d, v = 5, 6, 75
    x, w, t, b = make(n, d, v, torch.float32, seed=40 + len(opts), ignore_every=3, bias=True)
    t[1] = v - 1
    kw = {k: a for k, a in OPTION_SETS[opts].items() if k != "bias"}
    has_bias = "bias" in OPTION_SETS[opts]
    z32 = (x @ w.T).numpy()
    z = emu.to_storage(z32, name).reshape(n, v).copy()
    bias = emu.to_storage(b.numpy(), name) if has_bias else None
    z_read, b_read = emu.to_f64(z, name), (emu.to_f64(bias, name) if has_bias else 0.0)
    row_loss, lse = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
    scale = np.asarray(np.float32(1.0 / 3.0))  # 1/n_valid of "mean" with 3 valid rows
    targets = t.numpy().astype(np.int64)
    module(f"lce_rows_{suffix}", (n,), (launcher.row_threads(v),),
           (z, bias, targets, row_loss, lse, scale, None, None, np.int64(n), np.int64(v), np.int64(IGNORE),
            np.float32(kw.get("label_smoothing", 0.0)), np.float32(kw.get("z_loss", 0.0)),
            np.float32(kw.get("softcap") or 0.0), np.int32(1), np.int32(0)))
    # the reference on the same logits: with x = I and w = zᵀ, x wᵀ = z, and dw = dzᵀ
    want = ref.linear_cross_entropy(np.eye(n), np.ascontiguousarray(z_read.T), targets,
                                    bias=(b_read if has_bias else None), reduction="none", return_lse=True,
                                    grad_scale=np.float64(1.0 / 3.0), **kw)
    assert_close(row_loss, want[0], 2e-5, 2e-6, "row losses")
    assert_close(lse, want[4], 2e-6, 1e-7, "lse")
    tol = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}[name]
    assert_close(emu.to_f64(z, name), want[2].T, tol, tol / 10, "dz")
    assert (emu.to_f64(z, name)[::3] == 0).all(), "ignored rows must be exact zeros"
    # loss only (write_grad 0: z untouched), and per-row scales (row_scale 1)
    z2 = emu.to_storage(z32, name).reshape(n, v).copy()
    z2_before = z2.copy()
    row_scales = np.linspace(-2.0, 2.0, n).astype(np.float32)
    for write_grad in (0, 1):
        module(f"lce_rows_{suffix}", (2,), (64,),  # a grid shorter than the rows: the grid-stride loop
               (z2, bias, targets, row_loss, lse, row_scales, None, None, np.int64(n), np.int64(v), np.int64(IGNORE),
                np.float32(kw.get("label_smoothing", 0.0)), np.float32(kw.get("z_loss", 0.0)),
                np.float32(kw.get("softcap") or 0.0), np.int32(write_grad), np.int32(1)))
        assert_close(row_loss, want[0], 2e-5, 2e-6, "row losses")
        if not write_grad:
            assert (z2 == z2_before).all(), "write_grad=0 wrote the logits"
    assert_close(emu.to_f64(z2, name), want[2].T * 3.0 * row_scales[:, None], tol, tol / 10, "dz, row scales")
    db = np.full(v, 0.5, np.float32)  # adds to what is there
    module(f"lce_column_sum_{suffix}", (-(-v // launcher.COLUMN_THREADS),), (launcher.COLUMN_THREADS,),
           (z, db, np.int64(n), np.int64(v)))
    assert_close(db - 0.5, emu.to_f64(z, name).sum(axis=0), 1e-5, 1e-6, "column sums")


class _HostDevice:
    """What the launcher reads of a CuPy array's device: an id, and a context to enter."""
    id = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _HostArray(np.ndarray):
    """A numpy array that passes for a CuPy one in the launcher (its .device)."""
    device = _HostDevice()


def _host_cupy():
    """The few CuPy functions the launcher calls, on numpy arrays that pass for CuPy ones."""
    import types

    def wrap(fn):
        return lambda *a, **k: np.asarray(fn(*a, **k)).view(_HostArray)
    return types.SimpleNamespace(
        int64=np.int64, float32=np.float32, matmul=np.matmul, ascontiguousarray=wrap(np.ascontiguousarray),
        maximum=wrap(np.maximum), ones=wrap(np.ones), empty=wrap(np.empty), zeros=wrap(np.zeros),
        clip=wrap(np.clip), where=wrap(np.where))


@pytest.mark.parametrize("name", ["float32", "float16"])
@pytest.mark.parametrize("case", [("mean", "all", None), ("none", "bias", "rows"), ("sum", "softcap", "scalar"),
                                  ("mean", "weighted", None), ("none", "weighted", "rows")])
def test_cupy_launcher_emulated(emulated_lce, monkeypatch, name, case):
    """The CuPy launcher's own code (chunk loop, slices, scales, reductions, casts, the class
    weights' mean) with its CUDA C kernels emulated on the CPU and numpy standing in for CuPy:
    against the reference. cuBLAS is numpy's matmul (the fp32 gemmEx accumulation in float32)."""
    import sys
    emu, module = emulated_lce
    launcher = _cupy_launcher()
    reduction, opts, scale_kind = case
    monkeypatch.setitem(sys.modules, "cupy", _host_cupy())
    monkeypatch.setattr(launcher, "_require_cupy", lambda **arrays: None)
    monkeypatch.setattr(launcher, "_free_bytes", lambda: 1 << 40)
    monkeypatch.setattr(launcher, "_float32_compute_type", lambda allow_tf32: contextlib.nullcontext())
    monkeypatch.setattr(launcher, "get_function",
                        lambda source, kernel: lambda grid, block, args: module(kernel, grid, block, args))

    def gemm_accumulate(dy2, x2, out, allow_tf32):
        out += dy2.T.astype(np.float32) @ x2.astype(np.float32)
    monkeypatch.setattr(launcher, "_gemm_accumulate", gemm_accumulate)
    n, d, v = 10, 8, 45
    x, w, t, b = make(n, d, v, seed=50 + len(opts), ignore_every=4, bias=True)
    if opts == "weighted":  # class weights (one of 0), with label smoothing and a bias
        cw = np.linspace(0.0, 2.0, v).view(_HostArray)
        kw = dict(bias=b, label_smoothing=0.1, class_weight=cw)
    else:
        kw = options(opts, b)
    host = {k: a.to(getattr(torch, name)).numpy().view(_HostArray) for k, a in (("x", x), ("w", w), ("b", b))}
    if "bias" in kw:
        kw["bias"] = host["b"]
    scale = {None: None, "rows": np.linspace(-1, 1, n), "scalar": np.asarray(2.5)}[scale_kind]
    acc = np.zeros((v, d), np.float32).view(_HostArray)
    out = launcher.linear_cross_entropy(host["x"], host["w"], t.numpy().view(_HostArray), reduction=reduction,
                                        chunk=3, return_lse=True, dw_accumulate=acc if scale_kind else None,
                                        grad_scale=None if scale is None else scale.view(_HostArray), **kw)
    want = ref.linear_cross_entropy(*(host[k].astype(np.float64) for k in ("x", "w")), t.numpy(), reduction=reduction,
                                    return_lse=True, grad_scale=scale,
                                    **{k: (a.astype(np.float64) if k in ("bias", "class_weight") else a)
                                       for k, a in kw.items()})
    assert out[2] is acc if scale_kind else out[2].dtype == np.dtype(name)
    assert out[0].dtype == np.float32 and out[1].dtype == np.dtype(name)
    tol = {"float32": (2e-5, 2e-6), "float16": (2e-2, 4e-3)}[name]
    assert_outputs([np.asarray(a, np.float64) if a is not None else None for a in out], want, *tol)


# ---------------------------------------------------------------- GPU

gpu = pytest.mark.gpu
LIGER_EXTRA_BYTES = {(8192, 4096, 128256): 1.18e9, (16384, 2048, 32000): 0.26e9}  # bench/TARGETS.md: H200, bf16


def _cuda_inputs(n, d, v, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, d, device="cuda", generator=g, dtype=torch.float32).to(dtype)
    w = (torch.randn(v, d, device="cuda", generator=g, dtype=torch.float32) * d ** -0.5).to(dtype)
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    t[::7] = IGNORE
    return x, w, t


@gpu
@pytest.mark.parametrize("impl", ["triton", "cupy"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_matches_fp32_linear_then_ce(impl, dtype):
    """4096×1024→32003 (V odd), chunks of 1000 rows, every option, against torch in fp32
    (GEMMs on the dtype's own values, exact fp32 products)."""
    n, d, v = 4096, 1024, 32003
    x, w, t = _cuda_inputs(n, d, v, dtype, seed=1)
    b = (torch.randn(v, device="cuda") * 0.1).to(dtype)
    kw = dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0, reduction="mean")
    if impl == "cupy":
        cp = pytest.importorskip("cupy")
        out = _cupy_launcher().linear_cross_entropy(*(cp.from_dlpack(a) for a in (x, w, t)), bias=cp.from_dlpack(b),
                                                    chunk=1000, return_lse=True, check_targets=False, **kw)
        out = [None if a is None else torch.from_dlpack(a) for a in out]
    else:
        out = _triton().linear_cross_entropy(x, w, t, bias=b, chunk=1000, return_lse=True, check_targets=False, **kw)
    want = oracle_cuda(x.float(), w.float(), t, b.float(), **kw)
    tol = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}[dtype]
    for got, exp, name in zip(out, want, ("loss", "dx", "dw", "db", "lse")):
        err = (got.float() - exp).abs().max().item()
        assert err <= tol * max(exp.abs().max().item(), 1e-3), f"{name}: max error {err}"


def oracle_cuda(x, w, t, b, *, label_smoothing, z_loss, softcap, reduction):
    """(loss, dx, dw, db, lse) from torch autograd in fp32 on the GPU."""
    x, w, b = (a.clone().requires_grad_() for a in (x, w, b))
    z = softcap * torch.tanh(F.linear(x, w, b) / softcap)
    lse = torch.logsumexp(z, 1)
    valid = t != IGNORE
    rows = F.cross_entropy(z, t, reduction="none", label_smoothing=label_smoothing) + z_loss * lse ** 2 * valid
    loss = rows.sum() / valid.sum()
    loss.backward()
    return loss.detach(), x.grad, w.grad, b.grad, lse.detach()


@gpu
def test_gpu_no_host_sync_and_both_dw_routes():
    """check_targets=False: not one synchronising CUDA call (torch's sync debug mode raises on
    any); the Triton fallback for dw (linear_backward into the fp32 buffer) gives the cuBLAS
    route's dw; which route this torch takes is printed."""
    lce = _triton()
    x, w, t = _cuda_inputs(2048, 512, 32000, seed=3)
    b = torch.randn(32000, device="cuda").to(torch.bfloat16)
    kw = dict(bias=b, z_loss=1e-4, softcap=30.0, chunk=700, check_targets=False)
    first = lce.linear_cross_entropy(x, w, t, **kw)  # warm-up: compiles, the route check
    print("dw route for bf16:", lce.dw_route(x.device, torch.bfloat16))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = lce.linear_cross_entropy(x, w, t, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(p, q) for p, q in zip(first, again)), "not the same bits on a second run"
    route = lce.dw_route(x.device, torch.bfloat16)
    other = "triton" if route == "cublas" else "cublas"
    if other == "cublas" and not lce._addmm_fp32_accumulator(x.device.index, torch.bfloat16):
        pytest.skip("this torch has no fp32-accumulator GEMM for bf16: only the Triton route runs")
    original = lce.dw_route
    lce.dw_route = lambda device, dtype: other
    try:
        forced = lce.linear_cross_entropy(x, w, t, **kw)
    finally:
        lce.dw_route = original
    err = (forced[2].float() - first[2].float()).abs().max().item()
    assert err <= 1e-2 * first[2].float().abs().max().item(), f"dw of the two routes differ by {err}"


@gpu
def test_gpu_engine_op_on_cupy_backend():
    """ad.linear_cross_entropy on CuPy arrays (Triton kernels, then the CUDA C ones) against
    the float64 reference."""
    cp = pytest.importorskip("cupy")
    x, w, t, b = make(300, 64, 5003, torch.float32, seed=4, ignore_every=6, bias=True)
    want = ref.linear_cross_entropy(x.double().numpy(), w.double().numpy(), t.numpy(), bias=b.double().numpy(),
                                    label_smoothing=0.1)
    previous = ad.get_kernels()
    try:
        for kernels in ("triton", "cupy"):
            ad.set_kernels(kernels)
            with ad.use_backend("cupy"):
                xs, ws, bs = (ad.tensor(cp.asarray(a.numpy()), requires_grad=True) for a in (x, w, b))
                loss = ad.linear_cross_entropy(xs, ws, cp.asarray(t.numpy()), bs, label_smoothing=0.1, chunk=128)
                loss.backward()
            got = [loss.numpy(), xs.grad.get(), ws.grad.get(), bs.grad.get()]
            assert_outputs(got, want, 1e-4, 1e-5)
    finally:
        ad.set_kernels(previous)


@gpu
@pytest.mark.parametrize("shape", list(LIGER_EXTRA_BYTES))
def test_gpu_peak_memory_within_target(shape):
    """bf16 at the LM-head target shapes (bench/TARGETS.md), dw into an fp32 buffer the caller owns (its main grad):
    peak memory above the inputs ≤ Liger's extra memory; without it, within the documented
    budget (fp32 accumulator + buffer + dx, then + the bf16 dw). Same bits on a second run."""
    n, d, v = shape
    lce = _triton()
    x, w, t = _cuda_inputs(n, d, v, seed=2)
    acc = torch.zeros(v, d, device="cuda", dtype=torch.float32)
    lce.linear_cross_entropy(x, w, t, dw_accumulate=acc, check_targets=False)  # warm-up: compile, cuBLAS handles
    acc.zero_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, dx, dw, _ = lce.linear_cross_entropy(x, w, t, dw_accumulate=acc, check_targets=False)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(loss) and dw is acc
    assert extra <= LIGER_EXTRA_BYTES[shape], f"peak extra {extra / 1e9:.3f} GB"
    first = acc.clone()
    acc.zero_()
    lce.linear_cross_entropy(x, w, t, dw_accumulate=acc, check_targets=False)
    assert torch.equal(acc, first), "dw differs between two runs"
    del dx, acc, first
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = lce.linear_cross_entropy(x, w, t, check_targets=False)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    c = ref.linear_cross_entropy_chunk(n, v, 2)
    budget = 4 * v * d + 2 * n * d + max(c * v * 2, 2 * v * d) + 64 * 2**20  # + cuBLAS workspace, small buffers
    assert extra <= budget, f"peak extra {extra / 1e9:.3f} GB, budget {budget / 1e9:.3f} GB"
    assert out[2].dtype == torch.bfloat16


# ---------------------------------------------------------------- the bench op (CPU, tiny)

@pytest.mark.parametrize("impl", ["reference", "torch", "torch_lce", "triton_dw"])
def test_bench_op_outputs_match_expected(impl):
    """bench/lce_op.py: each implementation's outputs against the op's float64 expectation
    (triton_dw only where a GPU is: the bench's triton impls need CUDA)."""
    from bench import harness
    from bench.lce_op import LinearCrossEntropy as Op
    from bench.ops import Case
    case = Case(Op.name, (40, 16, 300), "float32")
    host = Op.make_inputs(case)
    want = Op.expected(case, host, np)
    try:
        prepared = Op.impls[impl](harness.Env(), case, host, 1)
    except harness.Unavailable as e:
        pytest.skip(str(e))
    got = prepared.outputs()
    assert set(got) == {"loss", "dx", "dw"}
    for name, w in want.items():
        g = got[name]
        g = g.detach().cpu().double().numpy() if isinstance(g, torch.Tensor) else np.asarray(g, np.float64)
        assert_close(g, w, 1e-4, 1e-5, f"{impl} {name}")
    prepared.fn()


def test_kernel_packages_export_the_function():
    """gpuad.kernels.{reference, triton, cupy}.linear_cross_entropy is the function (the engine
    op calls it through the package), not the submodule of the same name."""
    for name in ("reference", "triton", "cupy"):
        package = importlib.import_module(f"gpuad.kernels.{name}")
        fn = package.linear_cross_entropy
        assert callable(fn) and fn.__name__ == "linear_cross_entropy", name
        assert "linear_cross_entropy" in getattr(package, "__all__", ["linear_cross_entropy"])
