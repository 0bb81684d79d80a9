"""gpuad.torch.linear_cross_entropy and gpuad.torch.LinearCrossEntropy: the fused LM head as a
PyTorch op, against torch's linear-then-cross-entropy.

On the CPU the op runs the numpy reference: values and gradients against torch's autograd in
float64 (every option, ignored rows, all ignored, random cotangents for reduction "none"),
against torch's own F.linear_cross_entropy where this torch has it, fp32 master weights with
bf16 activations, opcheck of the three registered ops, training against torch eagerly and under
torch.compile(fullgraph=True), and the Triton path once in the interpreter. GPU tests (marker
`gpu`): bf16 at real sizes, no host sync, peak memory.
"""
import os
import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
gt = pytest.importorskip("gpuad.torch")

from test_linear_cross_entropy import IGNORE, OPTION_SETS, make, oracle, options  # noqa: E402
from test_torch_custom_ops import _close, _compile_recording, _opcheck, _ops_in, eager_path  # noqa: E402,F401
from test_torch_custom_ops import _train as _train_model  # noqa: E402

OPS = torch.ops.gpuad


def _leaves(*tensors):
    return [None if a is None else a.detach().clone().requires_grad_() for a in tensors]


def _grads(loss, inputs, cotangent):
    """Gradients of `inputs` (None where an input is None) for the cotangent of `loss`."""
    present = [a for a in inputs if a is not None]
    got = iter(torch.autograd.grad(loss, present, cotangent))
    return [None if a is None else next(got) for a in inputs]


# --- values and gradients against torch (float64) -------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", list(OPTION_SETS))
def test_matches_torch_float64(eager_path, reduction, opts):
    """Every option, ignored rows, V = 37; the loss and dx, dw, db for a random cotangent (per
    row for "none": each row's own gradient, Liger #678 / #968)."""
    x, w, t, b = make(13, 6, 37, seed=len(opts) + len(reduction), ignore_every=4, bias=True)
    kw = options(opts, b)
    bias = kw.pop("bias", None)
    x, w, bias = _leaves(x, w, bias)
    loss = gt.linear_cross_entropy(x, w, t, bias, reduction=reduction, **kw)
    cot = torch.randn(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 1
    want = oracle(x, w, t, bias, reduction=reduction, grad_scale=cot, **kw)
    assert loss.dtype == torch.float64 and loss.shape == want[0].shape
    got = [loss] + _grads(loss, [x, w, bias], cot)
    for g, exp, name in zip(got, want, ("loss", "dx", "dw", "db")):
        if exp is None:
            assert g is None, name
            continue
        _close(g, torch.from_numpy(exp), 1e-10, 1e-12, name)
    assert got[1][::4].abs().max() == 0  # ignored rows: no gradient


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="this torch has no F.linear_cross_entropy (2.13+)")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_torch_linear_cross_entropy(reduction):
    x, w, t, b = make(24, 8, 45, seed=3, ignore_every=5, bias=True)
    x1, w1, b1 = _leaves(x, w, b)
    x2, w2, b2 = _leaves(x, w, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = F.linear_cross_entropy(x1, w1, t, linear_bias=b1, reduction=reduction, label_smoothing=0.1,
                                      ignore_index=IGNORE)
    got = gt.linear_cross_entropy(x2, w2, t, b2, reduction=reduction, label_smoothing=0.1)
    _close(got, want, 1e-12, 1e-12, "loss")
    cot = torch.rand(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for g, e, name in zip(_grads(got, [x2, w2, b2], cot), _grads(want, [x1, w1, b1], cot), ("dx", "dw", "db")):
        _close(g, e, 1e-12, 1e-12, name)


def test_leading_axes_and_frozen_inputs(eager_path):
    """x [B, T, D] with targets [B, T] ("none" gives [B, T]); a frozen weight or x gets no
    gradient and the others are unchanged."""
    x, w, t, _ = make(12, 5, 9, seed=4, ignore_every=5)
    x3, t3 = x.reshape(3, 4, 5), t.reshape(3, 4)
    loss = gt.linear_cross_entropy(x3, w, t3, reduction="none")
    assert loss.shape == (3, 4)
    _close(loss.reshape(-1), F.cross_entropy(F.linear(x, w), t, reduction="none"), 1e-12, 1e-12, "loss")
    for frozen in ("x", "w"):
        xs, ws = _leaves(x3, w)
        (xs if frozen == "x" else ws).requires_grad_(False)
        xr, wr = _leaves(x, w)
        gt.linear_cross_entropy(xs, ws, t3).backward()
        F.cross_entropy(F.linear(xr, wr), t).backward()
        live, ref = (ws, wr) if frozen == "x" else (xs, xr)
        assert (xs if frozen == "x" else ws).grad is None
        _close(live.grad.reshape(ref.shape), ref.grad, 1e-12, 1e-12, f"gradient with {frozen} frozen")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored_is_zero_not_nan(eager_path, reduction):
    x, w, _, b = make(5, 4, 7, dtype=torch.float32, bias=True)
    x, w, b = _leaves(x, w, b)
    loss = gt.linear_cross_entropy(x, w, torch.full((5,), -1), b, ignore_index=-1, reduction=reduction, z_loss=0.1)
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    for a in (x, w, b):
        assert torch.equal(a.grad, torch.zeros_like(a))


def test_no_grad_keeps_no_gradient():
    x, w, t, _ = make(6, 4, 7, dtype=torch.float32, ignore_every=3)
    x, w = _leaves(x, w)
    with torch.no_grad():
        loss = gt.linear_cross_entropy(x, w, t)
    assert not loss.requires_grad
    _close(loss, F.cross_entropy(F.linear(x, w), t), 1e-6, 1e-6, "loss")


# --- mixed precision ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_master_weight_gets_fp32_accumulated_gradient(eager_path, dtype):
    """bf16/fp16 activations with a float32 weight: dW in fp32, equal to the float64 gradient of
    the values the kernel read (no rounding to bf16 on the way); dx in x's dtype."""
    x, w, t, b = make(64, 24, 40, dtype=torch.float32, seed=6, ignore_every=7, bias=True)
    xl = x.to(dtype).requires_grad_()
    w, b = _leaves(w, b)
    loss = gt.linear_cross_entropy(xl, w, t, b, label_smoothing=0.1)
    assert loss.dtype == dtype
    loss.backward()
    assert (xl.grad.dtype, w.grad.dtype, b.grad.dtype) == (dtype, torch.float32, torch.float32)
    want = oracle(xl.double(), w.to(dtype).double(), t, b.to(dtype).double(), label_smoothing=0.1)
    _close(w.grad, torch.from_numpy(want[2]).float(), 1e-5, 1e-7, "dw")
    _close(b.grad, torch.from_numpy(want[3]).float(), 1e-2, 1e-4, "db")  # rounded once to x's dtype
    _close(xl.grad.float(), torch.from_numpy(want[1]).float(), 1e-2, 1e-4, "dx")


def test_autocast_casts_x_and_keeps_fp32_weight_gradients():
    x, w, t, _ = make(32, 16, 20, dtype=torch.float32, seed=7, ignore_every=4)
    w = w.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = gt.linear_cross_entropy(x, w, t)
        want = F.cross_entropy(F.linear(x, w), t)
    assert loss.dtype == torch.float32 == want.dtype
    _close(loss, want, 1e-2, 0, "loss")  # torch rounds the logits to bf16; the CPU reference keeps fp32
    loss.backward()
    assert w.grad.dtype == torch.float32
    ref = oracle(x.to(torch.bfloat16).double(), w.to(torch.bfloat16).double(), t)
    _close(loss, torch.from_numpy(ref[0]).float(), 1e-5, 0, "loss")
    _close(w.grad, torch.from_numpy(ref[2]).float(), 1e-5, 1e-7, "dw")


# --- bad input ---------------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    x, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    cases = [
        (dict(targets=torch.tensor([0, 9, 1])), IndexError, "target 9 at row 1"),
        (dict(targets=t[:2]), ValueError, "targets must have x's shape"),
        (dict(targets=t.float()), ValueError, "targets must be integers"),
        (dict(weight=torch.randn(5, 3)), ValueError, r"x \[..., D\] and weight \[V, D\]"),
        (dict(weight=w.double()), ValueError, "weight must have x's dtype"),
        (dict(bias=torch.randn(4)), ValueError, "bias must be"),
        (dict(x=x.long()), ValueError, "x must be floating point"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(z_loss=-1.0), ValueError, "z_loss"),
        (dict(softcap=0.0), ValueError, "softcap"),
    ]
    for kw, err, match in cases:
        args = dict(x=x, weight=w, targets=t) | kw
        with pytest.raises(err, match=match):
            gt.linear_cross_entropy(**args)
    with pytest.raises(ValueError, match="reduction"):
        gt.LinearCrossEntropy(4, 5, reduction="avg")


# --- torch.library registration --------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(reduction):
    x, w, t, b = make(10, 6, 13, dtype=torch.float32, seed=8, ignore_every=4, bias=True)
    x, w, b = _leaves(x, w, b)
    _opcheck(OPS.linear_cross_entropy.default, (x, w, t, b, IGNORE, reduction, 0.1, 1e-3, 5.0, True, True, True))
    _opcheck(OPS.linear_cross_entropy.default,
             (x, w.detach(), t, None, IGNORE, reduction, 0.0, 0.0, None, True, False, False))
    xb = x.detach().to(torch.bfloat16).requires_grad_()  # fp32 master weight
    _opcheck(OPS.linear_cross_entropy.default, (xb, w, t, b, IGNORE, reduction, 0.0, 0.0, None, True, True, True))
    _opcheck(OPS.linear_cross_entropy.default,
             (x.detach(), w.detach(), t, None, IGNORE, reduction, 0.0, 0.0, None, False, False, False))


def test_opcheck_backward_ops():
    x, w, t, b = make(10, 6, 13, dtype=torch.float32, seed=9, ignore_every=4, bias=True)
    g = torch.randn(10, generator=torch.Generator().manual_seed(0))
    _opcheck(OPS.linear_cross_entropy_backward.default, (g, x, w, t, b, IGNORE, 0.1, 1e-3, None, True, True, True))
    _opcheck(OPS.linear_cross_entropy_backward.default, (g, x, w, t, None, IGNORE, 0.0, 0.0, 3.0, False, True, False))
    _opcheck(OPS.linear_cross_entropy_scale.default, (g[0], x, w, b))
    _opcheck(OPS.linear_cross_entropy_scale.default, (g[0], x, w, x.new_empty(0)))


# --- the module and training --------------------------------------------------------------
def test_module_is_initialised_and_named_as_nn_linear():
    torch.manual_seed(0)
    ref = torch.nn.Linear(7, 11)
    torch.manual_seed(0)
    head = gt.LinearCrossEntropy(7, 11, bias=True, label_smoothing=0.1, z_loss=1e-3)
    assert head.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(head.parameters(), ref.parameters()))
    assert gt.LinearCrossEntropy(7, 11).bias is None
    x, t = torch.randn(5, 7), torch.tensor([0, 2, IGNORE, 10, 1])
    _close(head(x, t), gt.linear_cross_entropy(x, ref.weight, t, ref.bias, label_smoothing=0.1, z_loss=1e-3),
           0, 0, "loss")
    _close(head.logits(x), ref(x), 0, 0, "logits")
    assert "num_classes=11" in repr(head) and "z_loss=0.001" in repr(head)


def _models(kind, hidden=(6, 16), classes=9, act=torch.nn.ReLU):
    """(body, head) with the same init: torch's Linear + Linear, or gpuad's Linear + fused head."""
    torch.manual_seed(4321)
    cls = gt.Linear if kind == "gpuad" else torch.nn.Linear
    body = torch.nn.Sequential(*([cls(*hidden)] + ([act()] if act else [])))
    head = gt.LinearCrossEntropy(hidden[1], classes, bias=True) if kind == "gpuad" else torch.nn.Linear(hidden[1],
                                                                                                        classes)
    return body, head


def _batches(n_steps=4, rows=24, d=6, classes=9):
    """Two batches (every third target ignored), taken in turn for n_steps."""
    gen = torch.Generator().manual_seed(77)
    two = []
    for _ in range(2):
        t = torch.randint(0, classes, (rows,), generator=gen)
        t[::3] = IGNORE
        two.append((torch.randn(rows, d, generator=gen), t))
    return [two[i % 2] for i in range(n_steps)]


def _train(body, head, step, batches):
    """(losses, parameters) after SGD with momentum on body and head."""
    both = torch.nn.ModuleList([body, head])
    return _train_model(both, step, batches, lr=0.3), list(both.parameters())


def _torch_step(body, head, reduction="mean", weights=None):
    def step(x, t):
        loss = F.cross_entropy(head(body(x)), t, reduction=reduction)
        return loss if weights is None else (loss * weights).sum() / 16
    return step


def _gpuad_step(body, head, weights=None):
    def step(x, t):
        loss = head(body(x), t)
        return loss if weights is None else (loss * weights).sum() / 16
    return step


def _assert_same_training(got, want):
    (got_losses, got_params), (want_losses, want_params) = got, want
    assert float(want_losses[-1]) < float(want_losses[0])  # it trains
    _close(got_losses, want_losses, 1e-5, 0, "losses")
    for i, (p, q) in enumerate(zip(got_params, want_params)):
        _close(p, q, 1e-5, 1e-6, f"parameter {i}")


def test_training_matches_torch_eager(eager_path):
    batches = _batches()
    body, head = _models("torch")
    want = _train(body, head, _torch_step(body, head), batches)
    body, head = _models("gpuad")
    got = _train(body, head, _gpuad_step(body, head), batches)
    _assert_same_training(got, want)


def test_training_matches_torch_under_inductor():
    """torch.compile(fullgraph=True) with Inductor, ignored rows; the gpuad ops in the graph.
    No pointwise layer, so that Inductor writes no C++ kernel (slow to compile on a small CPU)."""
    batches = _batches(n_steps=3)
    body, head = _models("torch", act=None)
    want = _train(body, head, _torch_step(body, head), batches)
    body, head = _models("gpuad", act=None)
    step, graphs = _compile_recording(_gpuad_step(body, head), "inductor")
    got = _train(body, head, step, batches)
    assert _ops_in(graphs) == ["gpuad.linear", "gpuad.linear_cross_entropy"]
    _assert_same_training(got, want)


def test_training_none_reduction_under_aot_eager():
    """reduction "none" weighted per row, compiled with AOTAutograd (the fakes and the
    registered backward op) and run without Inductor's code generation."""
    batches = _batches(n_steps=3)
    weights = torch.linspace(0.5, 1.5, 24)
    body, head = _models("torch")
    want = _train(body, head, _torch_step(body, head, "none", weights), batches)
    body, head = _models("gpuad")
    head.reduction = "none"
    step, graphs = _compile_recording(_gpuad_step(body, head, weights), "aot_eager")
    got = _train(body, head, step, batches)
    assert _ops_in(graphs) == ["gpuad.linear", "gpuad.linear_cross_entropy"]
    _assert_same_training(got, want)


# --- the Triton path, in the interpreter on CPU tensors --------------------------------------
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton interpreter on the CPU")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_path_in_the_interpreter_matches_the_reference(monkeypatch, reduction):
    """The glue of the CUDA path (device-side target check, fp32 master weight through
    dw_accumulate, grad_scale for "none") on small odd shapes, against the numpy path."""
    pytest.importorskip("triton")
    x, w, t, b = make(7, 13, 11, dtype=torch.float32, seed=8, ignore_every=3, bias=True)
    x = x.to(torch.float16)
    cot = torch.linspace(0.5, 1.5, 7) if reduction == "none" else torch.tensor(2.0)
    results = []
    for on_triton in (False, True):
        monkeypatch.setattr(gt, "_TRITON_ON_CPU", on_triton)
        leaves = _leaves(x, w, b)
        loss = gt.linear_cross_entropy(*leaves[:2], t, leaves[2], reduction=reduction, label_smoothing=0.1,
                                       softcap=4.0)
        results.append([loss] + _grads(loss, leaves, cot.to(loss.dtype)))
    assert [a.dtype for a in results[1]] == [torch.float16, torch.float16, torch.float32, torch.float32]
    for got, want, name in zip(results[1], results[0], ["loss", "dx", "dw", "db"]):
        _close(got.float(), want.float(), 2e-3, 5e-4, name)  # the Triton path's dlogits are fp16
    monkeypatch.setattr(gt, "_TRITON_ON_CPU", True)
    with pytest.raises(RuntimeError, match="outside"):  # the device-side check (synchronous on the CPU)
        gt.linear_cross_entropy(x.float(), w, torch.tensor([0, 99, 1, 2, 3, 4, 5]))


# --- docs/lm-head.md -------------------------------------------------------------------------
def test_docs_example_runs(capsys):
    """The snippet of docs/lm-head.md, exactly as written, on the CPU."""
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "lm-head.md"),
              encoding="utf-8") as f:
        section = f.read()
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(code, "docs/lm-head.md", "exec"), namespace)
    loss = float(re.fullmatch(r"loss (\S+)\n", capsys.readouterr().out).group(1))
    assert 0 <= loss < 2.0  # from ln(100) = 4.6: it learned the (random) next tokens
    assert namespace["logits"].shape == (8, 16, 100)


# --- GPU: bf16 at real sizes ---------------------------------------------------------------------
def _cuda_case(n, d, v, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, d, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randn(v, d, device="cuda", generator=g) * d ** -0.5
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    t[::9] = IGNORE
    return x, w, t


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("master", [True, False])
def test_gpu_bf16_matches_fp32_torch(reduction, master):
    """4096×1024→32003 bf16 (weight bf16, or its fp32 master) against torch in fp32 on the
    same bf16 values; a random cotangent for "none"; no host sync (sync debug mode)."""
    x, w32, t = _cuda_case(4096, 1024, 32003, seed=1)
    w = w32 if master else w32.to(torch.bfloat16)
    b = torch.randn(32003, device="cuda", dtype=w.dtype) * 0.1
    x, w, b = _leaves(x, w, b)
    kw = dict(reduction=reduction, z_loss=1e-4, softcap=30.0, label_smoothing=0.05)
    gt.linear_cross_entropy(x, w, t, b, **kw).float().sum().backward()  # warm-up: compiles
    x.grad = w.grad = b.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = gt.linear_cross_entropy(x, w, t, b, **kw)
        cot = torch.rand(loss.shape, device="cuda", dtype=loss.dtype) + 0.5
        loss.backward(cot)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    xr, wr, br = _leaves(x.float(), w.to(torch.bfloat16).float(), b.to(torch.bfloat16).float())
    z = 30.0 * torch.tanh(F.linear(xr, wr, br) / 30.0)
    rows = F.cross_entropy(z, t, reduction="none", label_smoothing=0.05) + 1e-4 * torch.logsumexp(z, 1) ** 2 * (t != IGNORE)
    want = rows if reduction == "none" else rows.sum() / (t != IGNORE).sum()
    want.backward(cot.float())
    assert w.grad.dtype == w.dtype and x.grad.dtype == torch.bfloat16
    _close(loss.float(), want.detach(), 2e-2, 1e-2, "loss")
    for got, exp, name in ((x.grad, xr.grad, "dx"), (w.grad, wr.grad, "dw"), (b.grad, br.grad, "db")):
        err = (got.float() - exp).abs().max().item()
        assert err <= 2e-2 * exp.abs().max().item(), f"{name}: max error {err}"


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8192, 4096, 128256), (16384, 2048, 32000)])
def test_gpu_peak_memory_of_the_module(shape):
    """The module's forward + backward at the LM-head target shapes (bench/TARGETS.md), bf16 activations and an fp32
    master weight: peak memory above the inputs within the bf16 weight copy, the fp32 dW (the
    gradient itself), dx, one chunk of logits and 64 MiB (torch eager needs 12.6 GB more at the
    large shape, bench/TARGETS.md)."""
    from gpuad.kernels.reference import linear_cross_entropy_chunk
    n, d, v = shape
    x, _, t = _cuda_case(n, d, v, seed=2)
    head = gt.LinearCrossEntropy(d, v, device="cuda")
    x.requires_grad_()
    head(x, t).backward()  # warm-up: compiles, cuBLAS handles
    x.grad = head.weight.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = head(x, t)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    c = linear_cross_entropy_chunk(n, v, 2)
    budget = 2 * v * d + 4 * v * d + 2 * n * d + c * (v + 64) * 2 + 64 * 2**20
    assert torch.isfinite(loss) and head.weight.grad.dtype == torch.float32
    assert extra <= budget, f"peak extra {extra / 1e9:.3f} GB, budget {budget / 1e9:.3f} GB"


@pytest.mark.gpu
def test_gpu_module_compiled_matches_eager():
    """bf16 autocast around the fused head, torch.compile(fullgraph=True) against eager."""
    x, _, t = _cuda_case(2048, 512, 32000, seed=3)
    torch.manual_seed(0)
    head = gt.LinearCrossEntropy(512, 32000, device="cuda")

    def step(x, t):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return head(x, t)
    compiled, graphs = _compile_recording(step, "inductor")
    results = []
    for fn in (step, compiled):
        head.weight.grad = None
        loss = fn(x.float(), t)
        loss.backward()
        results.append((loss.detach(), head.weight.grad.clone()))
    assert _ops_in(graphs) == ["gpuad.linear_cross_entropy"]
    _close(results[1][0], results[0][0], 1e-6, 1e-6, "loss")
    _close(results[1][1], results[0][1], 1e-6, 1e-9, "dw")
    assert np.isfinite(results[0][0].item())
