"""gpuad.torch: the fused kernels as PyTorch ops, against torch's own ops.

CPU tensors run the numpy reference; the registration is checked with torch.library.opcheck,
training with gpuad's ops against the same model with torch's, in eager mode, under
torch.compile(fullgraph=True) and under DistributedDataParallel (two gloo processes). One test
runs the Triton path on CPU tensors in the interpreter; the bf16 Triton tests are marked gpu.
"""
import os
import re
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
gt = pytest.importorskip("gpuad.torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = torch.ops.gpuad
# fp32 training: two runs of the same model through different kernels
LOSS_RTOL, PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-5, 1e-6


@pytest.fixture(params=["function", "custom_op"])
def eager_path(request, monkeypatch):
    """Eager calls through the autograd.Function bypass and through the registered ops."""
    monkeypatch.setattr(gt, "EAGER_BYPASS", request.param == "function")
    return request.param


def _targets(n, v, gen, ignored=(), ignore_index=-100):
    t = torch.randint(0, v, (n,), generator=gen)
    t[list(ignored)] = ignore_index
    return t


def _close(got, want, rtol, atol, what=""):
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# --- values and gradients against torch (float64, eager) ------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_cross_entropy_matches_torch(eager_path, reduction, label_smoothing):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 13, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = _targets(9, 13, gen, ignored=(0, 4, 5))
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    loss = gt.cross_entropy(logits, targets, **kw)
    want = F.cross_entropy(logits, targets, **kw)
    _close(loss, want, 1e-12, 1e-12, "loss")
    cot = torch.randn(want.shape, dtype=torch.float64, generator=gen)  # per-row weights for "none"
    (grad,) = torch.autograd.grad(loss, logits, cot)
    (grad_want,) = torch.autograd.grad(want, logits, cot)
    _close(grad, grad_want, 1e-12, 1e-13, "dlogits")
    assert grad[[0, 4, 5]].abs().max() == 0  # ignored rows: exactly zero


def test_cross_entropy_none_per_row_gradients_with_a_mask(eager_path):
    """Liger #678/#968: reduction="none" times a per-row mask must give each row its own
    gradient (zero where masked or ignored), not a shared or zero one."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = _targets(6, 7, gen, ignored=(1,))
    mask = torch.tensor([1.0, 1.0, 0.0, 3.0, 0.5, 1.0], dtype=torch.float64)
    (grad,) = torch.autograd.grad((gt.cross_entropy(logits, targets, reduction="none") * mask).sum(), logits)
    (want,) = torch.autograd.grad((F.cross_entropy(logits, targets, reduction="none") * mask).sum(), logits)
    _close(grad, want, 1e-12, 1e-13, "dlogits")
    assert grad[[1, 2]].abs().max() == 0 and grad[[0, 3, 4, 5]].abs().amin(dim=1).min() > 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_all_targets_ignored_is_zero_not_nan(eager_path, reduction):
    logits = torch.randn(4, 5, requires_grad=True)
    targets = torch.full((4,), -1, dtype=torch.int64)
    loss = gt.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("frozen", ["none", "x", "weight"])
def test_linear_matches_torch(eager_path, bias, frozen):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 7, dtype=torch.float64, generator=gen, requires_grad=frozen != "x")
    w = torch.randn(4, 7, dtype=torch.float64, generator=gen, requires_grad=frozen != "weight")
    b = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True) if bias else None
    names, inputs = zip(*[(n, t) for n, t in zip("xwb", (x, w, b)) if t is not None and t.requires_grad])
    y = gt.linear(x, w, b)
    want = F.linear(x, w, b)
    _close(y, want, 1e-13, 1e-13, "y")
    cot = torch.randn(want.shape, dtype=torch.float64, generator=gen)
    for got, exp, name in zip(torch.autograd.grad(y, inputs, cot), torch.autograd.grad(want, inputs, cot), names):
        _close(got, exp, 1e-12, 1e-12, f"d{name}")


def test_modules_are_drop_in():
    torch.manual_seed(0)
    ref = torch.nn.Linear(7, 3)
    torch.manual_seed(0)
    layer = gt.Linear(7, 3)
    assert isinstance(layer, torch.nn.Linear) and layer.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(layer.parameters(), ref.parameters()))  # same init
    x, t = torch.randn(5, 7), torch.tensor([0, 2, -100, 1, 1])
    loss = gt.CrossEntropyLoss(label_smoothing=0.1)(layer(x), t)
    _close(loss, torch.nn.CrossEntropyLoss(label_smoothing=0.1)(ref(x), t), 1e-6, 1e-6, "loss")
    assert "label_smoothing=0.1" in repr(gt.CrossEntropyLoss(label_smoothing=0.1))


def test_no_grad_calls_keep_no_gradient():
    logits, w = torch.randn(3, 4, requires_grad=True), torch.randn(4, 4, requires_grad=True)
    with torch.no_grad():
        assert not gt.cross_entropy(logits, torch.tensor([0, 1, 2])).requires_grad
        assert not gt.linear(logits, w).requires_grad


# --- bad input ---------------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    logits, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(IndexError, match="target 4 at row 1"):
        gt.cross_entropy(logits, torch.tensor([0, 4, 2]))
    with pytest.raises(ValueError, match="targets must have shape"):
        gt.cross_entropy(logits, t[:2])
    with pytest.raises(ValueError, match=r"targets of shape \[3\] must be integers"):
        gt.cross_entropy(logits, t.float())
    with pytest.raises(ValueError, match="reduction"):
        gt.cross_entropy(logits, t, reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        gt.CrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match=r"x \[..., K\] and weight \[N, K\]"):
        gt.linear(torch.randn(2, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="weight must have x's dtype"):
        gt.linear(torch.randn(2, 3), torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias must be"):
        gt.linear(torch.randn(2, 3), torch.randn(4, 3), torch.randn(5))
    with pytest.raises(ValueError, match="x must be floating point"):
        gt.linear(torch.ones(2, 3, dtype=torch.int64), torch.ones(4, 3, dtype=torch.int64))


# --- torch.library registration --------------------------------------------------------------
def _opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert result and all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_cross_entropy(reduction):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 11, generator=gen, requires_grad=True)
    targets = _targets(6, 11, gen, ignored=(2,))
    _opcheck(OPS.cross_entropy.default, (logits, targets, None, -100, reduction, 0.1, True))
    _opcheck(OPS.cross_entropy.default, (logits.detach(), targets, None, -100, reduction, 0.0, False))
    grad_loss = torch.randn((6,) if reduction == "none" else (), generator=gen)
    _opcheck(OPS.cross_entropy_backward.default, (grad_loss, torch.randn(6, 11, generator=gen)))


def test_opcheck_linear():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 7, generator=gen, requires_grad=True)
    w = torch.randn(5, 7, generator=gen, requires_grad=True)
    b = torch.randn(5, generator=gen, requires_grad=True)
    _opcheck(OPS.linear.default, (x, w, b))
    _opcheck(OPS.linear.default, (x, w, None))
    _opcheck(OPS.linear.default, (x.to(torch.bfloat16).detach().requires_grad_(), w, b))  # fp32 master weights
    dy = torch.randn(2, 3, 5, generator=gen)
    for flags in [(True, True, True), (False, True, False), (True, False, False)]:
        _opcheck(OPS.linear_backward.default, (dy, x.detach(), w.detach(), *flags))


# --- mixed precision ---------------------------------------------------------------------------
def _exact_dw(dy, x):
    """dyᵀ x in float64 from the (rounded) values the kernel read."""
    return (dy.double().reshape(-1, dy.shape[-1]).T @ x.double().reshape(-1, x.shape[-1])).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_master_weights_get_fp32_accumulated_gradients(eager_path, dtype):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(64, 24, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(8, 24, generator=gen, requires_grad=True)
    b = torch.randn(8, generator=gen, requires_grad=True)
    y = gt.linear(x, w, b)
    assert y.dtype == dtype
    dy = torch.randn(y.shape, generator=gen).to(dtype)
    y.backward(dy)
    assert (w.grad.dtype, b.grad.dtype, x.grad.dtype) == (torch.float32, torch.float32, dtype)
    _close(w.grad, _exact_dw(dy, x), 1e-5, 1e-5, "dw")  # fp32 accumulation, no bf16 rounding
    _close(b.grad, dy.double().sum(0).float(), 1e-5, 1e-5, "db")
    _close(x.grad.float(), (dy.double() @ w.to(dtype).double()).float(), 1e-2, 1e-2, "dx")


def test_autocast_follows_torch_and_keeps_fp32_weight_gradients():
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(0)
    layer = gt.Linear(16, 6)
    x, t = torch.randn(32, 16, generator=gen), _targets(32, 6, gen, ignored=(3,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        loss = gt.cross_entropy(logits, t)
        want = F.linear(x, layer.weight, layer.bias)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32  # as F.linear, F.cross_entropy
    _close(logits, want, 0, 0, "logits")
    logits.retain_grad()
    loss.backward()
    assert layer.weight.grad.dtype == torch.float32
    _close(layer.weight.grad, _exact_dw(logits.grad, x.to(torch.bfloat16)), 1e-5, 1e-6, "dw")


# --- training a small model: gpuad's ops against torch's -------------------------------------
def _mlp(kind: str, act=torch.nn.ReLU, sizes=(6, 16, 5), dtype=torch.float32, device="cpu"):
    """The same model (same seed, same init) with gpuad's Linear or torch's."""
    torch.manual_seed(1234)
    cls = gt.Linear if kind == "gpuad" else torch.nn.Linear
    layers = [cls(sizes[0], sizes[1])] + ([act()] if act else []) + [cls(sizes[1], sizes[2])]
    return torch.nn.Sequential(*layers).to(device=device, dtype=dtype)


def _batches(n_steps=4, rows=24, sizes=(6, 16, 5), dtype=torch.float32, device="cpu"):
    """Batches whose targets include ignored rows (every third row and a random few)."""
    gen = torch.Generator().manual_seed(99)
    out = []
    for _ in range(n_steps):
        x = torch.randn(rows, sizes[0], generator=gen)
        t = _targets(rows, sizes[-1], gen, ignored=range(0, rows, 3))
        t[torch.randint(0, rows, (2,), generator=gen)] = -100
        out.append((x.to(device=device, dtype=dtype), t.to(device)))
    return out


def _train(model, step, batches, lr=0.2):
    """SGD with momentum; returns the float32 losses of every step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for x, t in batches:
        loss = step(x, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().float())
    return torch.stack(losses)


def _torch_step(model):
    return lambda x, t: F.cross_entropy(model(x), t)


def _gpuad_step(model):
    return lambda x, t: gt.cross_entropy(model(x), t)


def _assert_same_training(got_model, got_losses, want_model, want_losses, rtol=LOSS_RTOL, prtol=PARAM_RTOL,
                          patol=PARAM_ATOL):
    _close(got_losses, want_losses, rtol, 0, "losses")
    for (name, p), q in zip(got_model.named_parameters(), want_model.parameters()):
        _close(p, q, prtol, patol, name)


def test_training_matches_torch_eager(eager_path):
    batches = _batches()
    ref = _mlp("torch")
    want = _train(ref, _torch_step(ref), batches)
    model = _mlp("gpuad")
    got = _train(model, _gpuad_step(model), batches)
    assert float(want[-1]) < float(want[0])  # it trains
    _assert_same_training(model, got, ref, want)


def _compile_recording(fn, backend):
    """torch.compile(fn, fullgraph=True) with `backend`, keeping the Dynamo graphs it was given."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        if backend == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        return torch._dynamo.backends.registry.lookup_backend(backend)(gm, example_inputs)

    return torch.compile(fn, fullgraph=True, backend=record), graphs


def _ops_in(graphs):
    """The gpuad ops called in Dynamo's graphs: ["gpuad.cross_entropy", "gpuad.linear"]."""
    names = {str(n.target).removesuffix(".default") for g in graphs for n in g.graph.nodes}
    return sorted(name for name in names if name.startswith("gpuad."))


def test_training_matches_torch_under_inductor_with_ignored_rows():
    """torch.compile(fullgraph=True) with Inductor; targets with ignored rows, with and without
    grad (Liger PR #1338: a fused loss silently wrong under compile exactly then). The model
    has no pointwise layer so that Inductor generates no C++ kernel (a cold C++ compile costs
    tens of seconds on a small CPU); test_training_matches_torch_under_aot_eager has one."""
    batches = _batches()
    ref = _mlp("torch", act=None)
    want = _train(ref, _torch_step(ref), batches)
    model = _mlp("gpuad", act=None)
    step, graphs = _compile_recording(_gpuad_step(model), "inductor")
    got = _train(model, step, batches)
    assert _ops_in(graphs) == ["gpuad.cross_entropy", "gpuad.linear"]
    _assert_same_training(model, got, ref, want)
    with torch.no_grad():
        x, t = batches[0]
        assert (t == -100).any()
        _close(step(x, t), F.cross_entropy(ref(x), t), 1e-6, 1e-6, "no-grad loss")


def test_training_matches_torch_under_aot_eager():
    """An MLP (ReLU) and a "none" reduction weighted per row, compiled with AOTAutograd (the
    registered fakes and autograd formulas) and run without Inductor's code generation."""
    batches = _batches()
    weights = torch.linspace(0.5, 1.5, 24)

    def loss_of(ce, model):
        return lambda x, t: (ce(model(x), t, reduction="none") * weights).sum() / 16

    ref = _mlp("torch")
    want = _train(ref, loss_of(F.cross_entropy, ref), batches)
    model = _mlp("gpuad")
    step, graphs = _compile_recording(loss_of(gt.cross_entropy, model), "aot_eager")
    got = _train(model, step, batches)
    assert _ops_in(graphs) == ["gpuad.cross_entropy", "gpuad.linear"]
    _assert_same_training(model, got, ref, want)


# --- DistributedDataParallel -----------------------------------------------------------------
def test_ddp_two_processes_match_one_process(tmp_path):
    """Two gloo ranks (as torchrun would start them) train with DDP; their all-reduced
    gradients and parameters equal one process stepping on the mean of the shard losses."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import torch_ddp_worker as worker

    world = 2
    env = dict(os.environ, WORLD_SIZE=str(world), PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    script = os.path.join(ROOT, "tests", "torch_ddp_worker.py")
    rendezvous = tmp_path / "rendezvous"  # a file store: no TCP port to choose (see the worker's docstring)
    procs = [subprocess.Popen([sys.executable, script, str(tmp_path / f"rank{r}.pt"), str(rendezvous)],
                              env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{out[-3000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    model = worker.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=worker.LR)
    for step, batch in enumerate(worker.batches(world)):
        shards = [worker.shard(batch, r, world) for r in range(world)]
        loss = sum(gt.cross_entropy(model(x), t) for x, t in shards) / world
        opt.zero_grad()
        loss.backward()
        for r, rank in enumerate(ranks):
            _close(rank["losses"][step], gt.cross_entropy(model(shards[r][0]), shards[r][1]).detach(), 1e-6, 1e-7,
                   f"rank {r} loss at step {step}")
            for p, g in zip(model.parameters(), rank["grads"][step]):
                _close(g, p.grad, 1e-5, 1e-7, f"rank {r} gradient at step {step}")
        opt.step()
    for rank in ranks:
        for p, q in zip(model.parameters(), rank["params"]):
            _close(q, p.detach(), 1e-5, 1e-7, "parameters")


# --- the Triton path, in the interpreter on CPU tensors --------------------------------------
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton interpreter on the CPU")
def test_triton_path_in_the_interpreter_matches_the_reference(monkeypatch):
    """The glue of the CUDA path (device-side target check, check_targets=False, fp32
    dw_accumulate for master weights) on small odd shapes, against the numpy path."""
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(7, 13, generator=gen).to(torch.float16)
    w = torch.randn(11, 13, generator=gen)
    b = torch.randn(11, generator=gen)
    t = _targets(7, 11, gen, ignored=(2, 5))
    results = []
    for on_triton in (False, True):
        monkeypatch.setattr(gt, "_TRITON_ON_CPU", on_triton)
        leaves = [a.clone().requires_grad_() for a in (x, w, b)]
        logits = gt.linear(*leaves)  # fp16 activations, fp32 master weights
        loss = gt.cross_entropy(logits.float(), t, reduction="none", label_smoothing=0.1)
        loss.backward(torch.linspace(0.5, 1.5, 7))
        results.append([loss] + [a.grad for a in leaves])
    for got, want, name in zip(results[1], results[0], ["loss", "dx", "dw", "db"]):
        _close(got.float(), want.float(), 2e-3 if name == "dx" else 1e-5, 1e-4 if name == "dx" else 1e-5, name)
    monkeypatch.setattr(gt, "_TRITON_ON_CPU", True)
    with pytest.raises(RuntimeError, match="outside"):  # the device-side check (synchronous on the CPU)
        gt.cross_entropy(torch.randn(3, 4), torch.tensor([0, 9, 1]))


# --- docs/pytorch.md -------------------------------------------------------------------------
def test_docs_example_runs(capsys):
    """The snippet of docs/pytorch.md, exactly as written, on the CPU."""
    with open(os.path.join(ROOT, "docs", "pytorch.md"), encoding="utf-8") as f:
        section = f.read()
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "docs/pytorch.md", "exec"), {})
    loss = float(re.fullmatch(r"loss (\S+)\n", capsys.readouterr().out).group(1))
    assert 0 <= loss < 0.5  # it learned the (random) labels


# --- GPU: the Triton kernels in bf16 ---------------------------------------------------------
@pytest.mark.gpu
def test_gpu_cross_entropy_bf16_matches_torch():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(300, 32000, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    targets = _targets(300, 32000, gen, ignored=range(0, 300, 7)).cuda()
    for reduction in ("mean", "sum", "none"):
        loss = gt.cross_entropy(logits, targets, reduction=reduction)
        want = F.cross_entropy(logits.float(), targets, reduction=reduction)
        assert loss.dtype == torch.bfloat16
        _close(loss.float(), want, 1e-2, 1e-2, f"loss {reduction}")
        cot = torch.rand(want.shape, generator=gen).cuda()
        (grad,) = torch.autograd.grad(loss.float(), logits, cot)
        (grad_want,) = torch.autograd.grad(want, logits, cot)
        _close(grad.float(), grad_want.float(), 2e-2, 1e-6 if reduction == "mean" else 1e-4, f"dlogits {reduction}")
    ignored = torch.full_like(targets, -100)
    loss = gt.cross_entropy(logits, ignored)
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == 0.0 and not grad.any()


@pytest.mark.gpu
def test_gpu_fp32_master_weights_bf16_activations():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(4096, 256, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    w = torch.randn(128, 256, generator=gen).cuda().requires_grad_()
    b = torch.randn(128, generator=gen).cuda().requires_grad_()
    y = gt.linear(x, w, b)
    dy = torch.randn(y.shape, generator=gen).to("cuda", torch.bfloat16)
    y.backward(dy)
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    _close(w.grad, _exact_dw(dy, x), 1e-4, 1e-3, "dw")  # fp32-accumulated: far inside bf16's 4e-3
    _close(b.grad, dy.double().sum(0).float(), 1e-4, 1e-3, "db")


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_training_bf16_autocast_matches_torch(compiled):
    """bf16 activations (torch.autocast) with fp32 master weights and ignored targets, eager
    and under torch.compile(fullgraph=True), against the same model with torch's ops: the
    losses of every step, and each parameter's total update, to bf16 tolerance."""
    sizes = (64, 256, 1000)
    batches = _batches(n_steps=3, rows=512, sizes=sizes, device="cuda")

    def autocast_step(model, ce):
        def step(x, t):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return ce(model(x), t)
        return step

    ref = _mlp("torch", sizes=sizes, device="cuda")
    start = [p.detach().clone() for p in ref.parameters()]
    want = _train(ref, autocast_step(ref, F.cross_entropy), batches, lr=0.5)
    model = _mlp("gpuad", sizes=sizes, device="cuda")
    step = autocast_step(model, gt.cross_entropy)
    if compiled:
        step, graphs = _compile_recording(step, "inductor")
    got = _train(model, step, batches, lr=0.5)
    if compiled:
        assert _ops_in(graphs) == ["gpuad.cross_entropy", "gpuad.linear"]
    _close(got, want, 2e-2, 0, "losses")
    for (name, p), q, p0 in zip(model.named_parameters(), ref.parameters(), start):
        step_got, step_want = p.detach() - p0, q.detach() - p0
        rel = float((step_got - step_want).norm() / step_want.norm())
        assert rel < 3e-2, f"{name}: the update differs from torch's by {rel:.3g} of its norm"
