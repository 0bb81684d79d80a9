"""gpuad.torch.cross_entropy as a drop-in for F.cross_entropy: PyTorch's own OpInfo samples of
``nn.functional.cross_entropy`` (class weights, probability targets, N-d layouts, reductions,
ignore_index) through the eager Function, the registered custom op and torch.compile, loss
and gradients against torch; the deprecated arguments, refusals, the module, the Triton path
in the interpreter; bf16 on a GPU (marked gpu)."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest")  # torch.testing._internal imports it
F = torch.nn.functional
gt = pytest.importorskip("gpuad.torch")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

OPINFO = next(op for op in op_db if op.name == "nn.functional.cross_entropy")


def _samples(dtype):
    return list(OPINFO.sample_inputs("cpu", dtype, requires_grad=True))


def _loss_and_grads(fn, sample):
    """The loss of fn on an OpInfo sample and the gradients of its inputs that require one."""
    loss = fn(sample.input, *sample.args, **sample.kwargs)
    inputs = [t for t in (sample.input, sample.args[0], sample.kwargs.get("weight"))
              if t is not None and t.requires_grad]
    cot = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)  # distinct per-row weights
    return loss, torch.autograd.grad(loss, inputs, cot)


def _check_against_torch(fn, sample):
    got, got_grads = _loss_and_grads(fn, sample)
    want, want_grads = _loss_and_grads(F.cross_entropy, sample)
    torch.testing.assert_close(got, want)
    assert len(got_grads) == len(want_grads)
    torch.testing.assert_close(got_grads, want_grads)


def test_opinfo_samples_cover_the_options():
    """The samples hold what the other tests claim to cover: weights, soft targets, N-d."""
    samples = _samples(torch.float32)
    assert any("weight" in s.kwargs for s in samples)
    assert any(s.args[0].is_floating_point() and s.args[0].requires_grad for s in samples)
    assert any(s.input.dim() > 2 for s in samples)
    assert any(s.kwargs.get("ignore_index", -100) != -100 for s in samples)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", ["function", "custom_op"])
def test_opinfo_samples_match_torch_eager(monkeypatch, path, dtype):
    monkeypatch.setattr(gt, "EAGER_BYPASS", path == "function")
    for sample in _samples(dtype):
        _check_against_torch(gt.cross_entropy, sample)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opinfo_samples_match_torch_compiled(dtype):
    """torch.compile(fullgraph=True) with aot_eager: the custom op, its fake and its autograd."""
    for sample in _samples(dtype):
        torch._dynamo.reset()
        compiled = torch.compile(gt.cross_entropy, fullgraph=True, backend="aot_eager")
        _check_against_torch(compiled, sample)


def test_nd_weighted_soft_targets_under_inductor():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, 2, generator=gen, requires_grad=True)
    probs = torch.rand(2, 5, 3, 2, generator=gen).softmax(1).requires_grad_()
    weight = torch.rand(5, generator=gen).requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(gt.cross_entropy, fullgraph=True, backend="inductor")
    kw = dict(weight=weight, label_smoothing=0.1)
    got = compiled(logits, probs, **kw)
    want = F.cross_entropy(logits, probs, **kw)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, (logits, probs, weight)),
                               torch.autograd.grad(want, (logits, probs, weight)))


@pytest.mark.parametrize("path", ["function", "custom_op"])
def test_weights_smoothing_ignore_index_and_layouts(monkeypatch, path):
    """Options the OpInfo samples leave out: weight with ignore_index and label smoothing,
    an unbatched [C] input, soft targets with smoothing, a transposed [B, C, T] input."""
    monkeypatch.setattr(gt, "EAGER_BYPASS", path == "function")
    gen = torch.Generator().manual_seed(1)
    w = torch.rand(7, dtype=torch.float64, generator=gen) + 0.1
    nd = torch.randn(3, 4, 7, dtype=torch.float64, generator=gen).transpose(1, 2)  # [B, C, T], not contiguous
    idx = torch.randint(0, 7, (3, 4), generator=gen)
    idx[0, 1] = idx[2, 3] = 2
    cases = [(torch.randn(7, dtype=torch.float64, generator=gen), torch.tensor(3), {}),
             (torch.randn(7, dtype=torch.float64, generator=gen), torch.rand(7, dtype=torch.float64, generator=gen),
              dict(weight=w, label_smoothing=0.3)),
             (nd, idx, dict(weight=w, ignore_index=2, label_smoothing=0.2)),
             (nd, torch.rand(3, 7, 4, dtype=torch.float64, generator=gen), dict(weight=w, label_smoothing=0.2))]
    for logits, target, kw in cases:
        for reduction in ("mean", "sum", "none"):
            x = logits.detach().requires_grad_()
            got = gt.cross_entropy(x, target, reduction=reduction, **kw)
            want_x = logits.detach().requires_grad_()
            want = F.cross_entropy(want_x, target, reduction=reduction, **kw)
            torch.testing.assert_close(got, want)
            cot = torch.rand(want.shape, dtype=torch.float64, generator=gen)
            torch.testing.assert_close(torch.autograd.grad(got, x, cot), torch.autograd.grad(want, want_x, cot))


def test_positional_order_and_deprecated_arguments_follow_torch():
    gen = torch.Generator().manual_seed(2)
    logits, t = torch.randn(4, 5, generator=gen), torch.tensor([0, 4, 1, 1])
    w = torch.rand(5, generator=gen)
    torch.testing.assert_close(gt.cross_entropy(logits, t, w, None, 1, None, "sum", 0.1),
                               F.cross_entropy(logits, t, w, None, 1, None, "sum", 0.1))
    for size_average, reduce in [(False, None), (None, False), (True, True), (False, True)]:
        with pytest.warns(UserWarning):
            want = F.cross_entropy(logits, t, w, size_average=size_average, reduce=reduce)
        with pytest.warns(UserWarning):
            got = gt.cross_entropy(logits, t, w, size_average=size_average, reduce=reduce)
        torch.testing.assert_close(got, want)


def test_refuses_what_torch_refuses():
    logits, t = torch.randn(2, 3, requires_grad=True), torch.tensor([0, 2])
    with pytest.raises(RuntimeError, match="weight"):  # torch: nll_loss is not differentiable in weight
        gt.cross_entropy(logits, t, torch.rand(3, requires_grad=True))
    with pytest.raises(ValueError, match="ignore_index"):  # torch: not supported for floating point target
        gt.cross_entropy(logits, torch.rand(2, 3), ignore_index=1)
    with pytest.raises(ValueError, match="reduction"):
        gt.cross_entropy(logits, t, reduction="avg")
    with pytest.raises(ValueError, match="weight"):
        gt.cross_entropy(logits, t, torch.rand(4))
    with pytest.raises(ValueError, match="targets"):
        gt.cross_entropy(logits, torch.rand(2, 4))
    with pytest.raises(ValueError, match="label_smoothing"):
        gt.cross_entropy(logits, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="process_group"):
        gt.cross_entropy(logits, t, torch.rand(3), process_group=object())


def test_module_is_a_drop_in_with_weight():
    gen = torch.Generator().manual_seed(3)
    w = torch.rand(5, generator=gen)
    ours, theirs = gt.CrossEntropyLoss(w, ignore_index=1, label_smoothing=0.1), \
        torch.nn.CrossEntropyLoss(w, ignore_index=1, label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss) and "weight" in ours.state_dict()
    logits, t = torch.randn(6, 5, 2, generator=gen, requires_grad=True), torch.randint(0, 5, (6, 2), generator=gen)
    torch.testing.assert_close(ours(logits, t), theirs(logits, t))
    with pytest.warns(UserWarning):
        assert gt.CrossEntropyLoss(size_average=False).reduction == "sum"
    with pytest.raises(ValueError, match="reduction"):
        gt.CrossEntropyLoss(reduction="avg")


def test_triton_path_in_the_interpreter_matches_torch(monkeypatch):
    """The Triton general kernel (weights, soft targets, N-d) behind the op, on CPU tensors."""
    monkeypatch.setattr(gt, "_TRITON_ON_CPU", True)
    gen = torch.Generator().manual_seed(4)
    w = torch.rand(6, generator=gen) + 0.1
    logits = torch.randn(2, 6, 3, generator=gen)
    for target, kw in [(torch.randint(0, 6, (2, 3), generator=gen), dict(weight=w, label_smoothing=0.1)),
                       (torch.rand(2, 6, 3, generator=gen).requires_grad_(), dict(weight=w, reduction="none"))]:
        x = logits.clone().requires_grad_()
        got = gt.cross_entropy(x, target, **kw)
        ins = (x, target) if target.requires_grad else (x,)
        want_x = logits.clone().requires_grad_()
        want = F.cross_entropy(want_x, target, **kw)
        want_ins = (want_x, target) if target.requires_grad else (want_x,)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), ins), torch.autograd.grad(want.sum(), want_ins),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("soft", [False, True])
def test_gpu_bf16_weighted_nd_matches_fp32_torch(soft):
    gen = torch.Generator(device="cuda").manual_seed(5)
    logits = torch.randn(4, 1000, 33, device="cuda", generator=gen).bfloat16().requires_grad_()
    w = torch.rand(1000, device="cuda", generator=gen) + 0.1
    if soft:
        target = torch.rand(4, 1000, 33, device="cuda", generator=gen).softmax(1)
    else:
        target = torch.randint(0, 1000, (4, 33), device="cuda", generator=gen)
    loss = gt.cross_entropy(logits, target, w, label_smoothing=0.1)
    (grad,) = torch.autograd.grad(loss, logits)
    ref_x = logits.detach().float().requires_grad_()
    want = F.cross_entropy(ref_x, target, w, label_smoothing=0.1)
    (want_grad,) = torch.autograd.grad(want, ref_x)
    assert loss.dtype == torch.bfloat16
    torch.testing.assert_close(loss.float(), want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad.float(), want_grad, rtol=2e-2, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_weighted_soft_nd(reduction):
    """The registration (schema, fake, autograd) with a weight, soft targets and N-d logits."""
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 5, 3, generator=gen, requires_grad=True)
    weight = torch.rand(5, generator=gen)
    probs = torch.rand(2, 5, 3, generator=gen).requires_grad_()
    index = torch.randint(0, 5, (2, 3), generator=gen)
    for target in (probs, index):
        result = torch.library.opcheck(torch.ops.gpuad.cross_entropy.default,
                                       (logits, target, weight, -100, reduction, 0.1, True))
        assert result and all(v == "SUCCESS" for v in result.values()), result
