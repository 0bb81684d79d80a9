"""Class weights of the fused LM head (``class_weight=``, F.cross_entropy's `weight`): the numpy
reference and the Triton kernels (in the interpreter) against torch, and gpuad.torch's
linear_cross_entropy / LinearCrossEntropy in eager, custom-op and compiled modes. The CUDA C
row kernel runs emulated in tests/test_cuda_emulated.py, the vocabulary-parallel head in
tests/test_torch_parallel.py; bf16 on a GPU is marked gpu."""
import importlib
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
gt = pytest.importorskip("gpuad.torch")
from gpuad.kernels import reference as ref  # noqa: E402

N, D, V = 9, 6, 13
OPTIONS = [dict(), dict(label_smoothing=0.2), dict(softcap=2.0, label_smoothing=0.1)]


def _inputs(dtype=torch.float64, seed=0, zero_weights=True):
    g = torch.Generator().manual_seed(seed)
    x, w, b = (torch.randn(*s, dtype=dtype, generator=g) for s in ((N, D), (V, D), (V,)))
    t = torch.randint(0, V, (N,), generator=g)
    t[[1, 5]] = -100
    cw = torch.rand(V, dtype=dtype, generator=g) + 0.1
    if zero_weights:
        cw[t[0]] = 0.0  # a target class of weight 0
    return x, w, b, t, cw


def _torch_loss(x, w, b, t, cw, reduction, label_smoothing=0.0, softcap=None):
    z = F.linear(x, w, b)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z.reshape(-1, w.shape[0]), t.reshape(-1), weight=cw, reduction=reduction,
                           label_smoothing=label_smoothing).reshape(t.shape if reduction == "none" else ())


def _want(x, w, b, t, cw, reduction, cot, **kw):
    leaves = [a.detach().clone().requires_grad_() for a in (x, w, b)]
    loss = _torch_loss(*leaves, t, cw, reduction, **kw)
    return [loss.detach(), *torch.autograd.grad(loss, leaves, cot)]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_reference_matches_torch(reduction, opts):
    x, w, b, t, cw = _inputs()
    cot = torch.linspace(0.5, 1.5, N, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0).double()
    scale = cot.numpy() if reduction == "none" else None
    got = ref.linear_cross_entropy(x.numpy(), w.numpy(), t.numpy(), bias=b.numpy(), class_weight=cw.numpy(),
                                   reduction=reduction, chunk=4, grad_scale=scale, **opts)
    for g, want, what in zip(got, _want(x, w, b, t, cw, reduction, cot, **opts), ("loss", "dx", "dw", "db")):
        np.testing.assert_allclose(g, want.numpy(), rtol=1e-10, atol=1e-12, err_msg=what)


def test_weighted_mean_of_all_weights_zero_is_zero():
    """Every valid target's weight 0: the divisor counts as 1 (torch: NaN), the loss is 0."""
    x, w, b, t, cw = _inputs()
    cw[t[t != -100]] = 0.0
    loss, dx, dw, db = ref.linear_cross_entropy(x.numpy(), w.numpy(), t.numpy(), class_weight=cw.numpy())
    assert loss == 0.0 and not dx.any() and not dw.any()


def test_bad_class_weight_names_the_argument():
    x, w, b, t, cw = _inputs()
    with pytest.raises(ValueError, match="class_weight"):
        ref.linear_cross_entropy(x.numpy(), w.numpy(), t.numpy(), class_weight=cw[:-1].numpy())
    with pytest.raises(ValueError, match="class_weight with z_loss"):
        ref.linear_cross_entropy(x.numpy(), w.numpy(), t.numpy(), class_weight=cw.numpy(), z_loss=1e-3)
    with pytest.raises(ValueError, match="class_weight"):
        gt.linear_cross_entropy(x, w, t, class_weight=torch.ones(V, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="class_weight"):
        gt.linear_cross_entropy(x.requires_grad_(), w, t, class_weight=cw.requires_grad_())


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton interpreter on the CPU")
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("opts", OPTIONS[1:], ids=str)
def test_triton_matches_torch(reduction, opts):
    """The Triton row kernel with class weights (and its chunk loop's weighted mean)."""
    pytest.importorskip("triton")
    lce = importlib.import_module("gpuad.kernels.triton.linear_cross_entropy")
    x, w, b, t, cw = _inputs(torch.float32, seed=1)
    cot = torch.linspace(0.5, 1.5, N) if reduction == "none" else torch.tensor(1.0)
    got = lce.linear_cross_entropy(x, w, t, bias=b, class_weight=cw, reduction=reduction, chunk=4,
                                   grad_scale=cot if reduction == "none" else None, **opts)
    want = _want(x.double(), w.double(), b.double(), t, cw.double(), reduction, cot.double(), **opts)
    for g, exp, what in zip(got, want, ("loss", "dx", "dw", "db")):
        torch.testing.assert_close(g.double(), exp, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("path", ["function", "custom_op"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gpuad_torch_matches_torch(monkeypatch, path, reduction):
    monkeypatch.setattr(gt, "EAGER_BYPASS", path == "function")
    x, w, b, t, cw = _inputs(seed=2)
    x3, t3 = x.reshape(3, 3, D), t.reshape(3, 3)  # leading axes
    cot = torch.rand((3, 3) if reduction == "none" else (), dtype=torch.float64)
    leaves = [a.clone().requires_grad_() for a in (x3, w, b)]
    loss = gt.linear_cross_entropy(*leaves[:2], t3, leaves[2], reduction=reduction, label_smoothing=0.1,
                                   class_weight=cw)
    got = [loss.detach(), *torch.autograd.grad(loss, leaves, cot)]
    for g, exp in zip(got, _want(x3, w, b, t3, cw, reduction, cot, label_smoothing=0.1)):
        torch.testing.assert_close(g, exp)


def test_compiled_matches_torch():
    """torch.compile(fullgraph=True), aot_eager: class_weight through the op's schema and fake."""
    x, w, b, t, cw = _inputs(seed=3)
    torch._dynamo.reset()
    compiled = torch.compile(gt.linear_cross_entropy, fullgraph=True, backend="aot_eager")
    for reduction in ("mean", "none"):
        cot = torch.rand(N if reduction == "none" else (), dtype=torch.float64)
        leaves = [a.clone().requires_grad_() for a in (x, w, b)]
        loss = compiled(*leaves[:2], t, leaves[2], reduction=reduction, class_weight=cw)
        got = [loss.detach(), *torch.autograd.grad(loss, leaves, cot)]
        for g, exp in zip(got, _want(x, w, b, t, cw, reduction, cot)):
            torch.testing.assert_close(g, exp)


def test_opcheck():
    x, w, b, t, cw = _inputs(torch.float32, seed=4)
    args = (x.requires_grad_(), w.requires_grad_(), t, b, -100, "none", 0.1, 0.0, None, True, True, False, cw)
    result = torch.library.opcheck(torch.ops.gpuad.linear_cross_entropy.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_module_holds_class_weight_as_a_buffer():
    x, w, b, t, cw = _inputs(torch.float32, seed=5)
    head = gt.LinearCrossEntropy(D, V, class_weight=cw, label_smoothing=0.1)
    assert torch.equal(head.state_dict()["class_weight"], cw)
    loss = head(x, t)
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(x, head.weight), t, weight=cw, label_smoothing=0.1))
    with pytest.raises(ValueError, match="class_weight"):
        gt.LinearCrossEntropy(D, V, class_weight=torch.ones(V + 1))


@pytest.mark.gpu
def test_gpu_bf16_matches_fp32_torch():
    g = torch.Generator(device="cuda").manual_seed(6)
    x = torch.randn(512, 256, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(5000, 256, device="cuda", generator=g) * 0.05).requires_grad_()  # fp32 master weight
    t = torch.randint(0, 5000, (512,), device="cuda", generator=g)
    t[::7] = -100
    cw = torch.rand(5000, device="cuda", generator=g) + 0.1
    loss = gt.linear_cross_entropy(x, w, t, label_smoothing=0.1, class_weight=cw)
    dx, dw = torch.autograd.grad(loss, (x, w))
    xf, wf = x.detach().float().requires_grad_(), w.detach().clone().requires_grad_()
    want = F.cross_entropy(F.linear(xf, wf.bfloat16().float()), t, weight=cw, label_smoothing=0.1)
    want_dx, want_dw = torch.autograd.grad(want, (xf, wf))
    assert dw.dtype == torch.float32 and dx.dtype == torch.bfloat16
    torch.testing.assert_close(loss.float(), want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dx.float(), want_dx, rtol=3e-2, atol=1e-4)
    torch.testing.assert_close(dw, want_dw, rtol=3e-2, atol=1e-5)
