"""gpuad.torch under edge inputs and uses: double backward (exact for linear, refused by name for
the fused losses), torch.func transforms (refused by name), arguments of the wrong type,
ignore_index's contract, zero features, a second backward through a retained graph, and
non-contiguous inputs under torch.compile(fullgraph=True) (the fakes' strides are the real ops')."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
gt = pytest.importorskip("gpuad.torch")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from test_torch_custom_ops import eager_path  # noqa: E402,F401

OPS = torch.ops.gpuad


def _inputs(seed=0, n=4, d=3, v=5, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    w = torch.randn(v, d, generator=gen, dtype=dtype)
    b = torch.randn(v, generator=gen, dtype=dtype)
    t = torch.randint(0, v, (n,), generator=gen)
    return x, w, b, t


def _penalty(fn, leaves, wrt):
    """A gradient penalty (WGAN-GP style): |∂ fn / ∂ wrt|² differentiated into every leaf."""
    g, = torch.autograd.grad(fn(*leaves), leaves[wrt], create_graph=True)
    return torch.autograd.grad(g.square().sum(), leaves, allow_unused=True)


# --- double backward -----------------------------------------------------------------------------
@pytest.mark.parametrize("wrt", [0, 1])
def test_double_backward_through_linear_is_exact(eager_path, wrt):
    x, w, b, _ = _inputs()
    leaves = [a.clone().requires_grad_() for a in (x, w, b)]
    ref = [a.clone().requires_grad_() for a in (x, w, b)]
    got = _penalty(lambda *a: gt.linear(*a).tanh().sum(), leaves, wrt)
    want = _penalty(lambda *a: F.linear(*a).tanh().sum(), ref, wrt)
    for g, e, name in zip(got, want, "xwb"):
        torch.testing.assert_close(g, e, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy mean", "linear_cross_entropy none"])
def test_double_backward_through_the_fused_losses_is_refused(eager_path, op):
    """Never a silent first-order answer: the gradient of a fused loss is not differentiable."""
    x, w, _, t = _inputs()
    if op == "cross_entropy":
        leaves, fn = [F.linear(x, w).requires_grad_()], lambda z: gt.cross_entropy(z.tanh(), t)
    else:
        reduction = op.split()[1]
        leaves, fn = [x.requires_grad_(), w], lambda x, w: gt.linear_cross_entropy(x, w, t, reduction=reduction).sum()
    with pytest.raises(RuntimeError, match=f"gpuad.torch.{op.split()[0]} has no double backward"):
        _penalty(fn, leaves, 0)


@pytest.mark.parametrize("transform", ["grad", "vmap"])
@pytest.mark.parametrize("op", ["cross_entropy", "linear", "linear_cross_entropy"])
def test_torch_func_transforms_are_refused_by_name(eager_path, transform, op):
    x, w, _, t = _inputs()
    fns = {"cross_entropy": lambda z: gt.cross_entropy(z, t), "linear": lambda x: gt.linear(x, w).sum(),
           "linear_cross_entropy": lambda x: gt.linear_cross_entropy(x, w, t)}
    arg = F.linear(x, w) if op == "cross_entropy" else x
    if transform == "vmap":
        arg = arg.expand(2, *arg.shape)
    with pytest.raises(RuntimeError, match=f"gpuad.torch.{op} does not support torch.func"):
        getattr(torch.func, transform)(fns[op])(arg)


# --- arguments -----------------------------------------------------------------------------------
def test_wrong_types_name_the_argument():
    x, w, b, t = _inputs()
    z = F.linear(x, w)
    calls = {
        "target": lambda: gt.cross_entropy(z, t.tolist()),  # F.cross_entropy's argument names
        "input": lambda: gt.cross_entropy(z.numpy(), t),
        "weight": lambda: gt.cross_entropy(z, t, w.tolist()),
        "x": lambda: gt.linear(x.numpy(), w),
        "weight ": lambda: gt.linear(x, w.tolist()),
        "bias": lambda: gt.linear_cross_entropy(x, w, t, b.tolist()),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=f"{name.strip()} must be a torch.Tensor"):
            call()
    with pytest.raises(TypeError, match="targets must be a torch.Tensor"):
        gt.LinearCrossEntropy(3, 5)(x.float(), t.tolist())


@pytest.mark.parametrize("bad", [1.7, 1.0, True, "1", [1], np.float64(1.0), torch.tensor(1.5)],
                         ids=lambda v: f"{type(v).__name__}({v!r})")
def test_ignore_index_is_an_integer_or_none(eager_path, bad):
    """A float is never truncated (1.7 used to ignore class 1); None ignores no row."""
    x, w, _, t = _inputs()
    z = F.linear(x, w)
    head = gt.LinearCrossEntropy(3, 5, dtype=torch.float64)
    calls = {"cross_entropy": lambda i: gt.cross_entropy(z, t, ignore_index=i),
             "CrossEntropyLoss": lambda i: gt.CrossEntropyLoss(ignore_index=i)(z, t),
             "linear_cross_entropy": lambda i: gt.linear_cross_entropy(x, w, t, ignore_index=i),
             "LinearCrossEntropy": lambda i: gt.LinearCrossEntropy(3, 5, ignore_index=i)}
    for name, call in calls.items():
        with pytest.raises(TypeError, match="ignore_index must be an integer or None"):
            call(bad)
    head.ignore_index = None
    want = F.cross_entropy(F.linear(x, head.weight), t)  # no target is -100: nothing ignored either way
    torch.testing.assert_close(head(x, t), want)
    for name in ("cross_entropy", "CrossEntropyLoss", "linear_cross_entropy"):
        torch.testing.assert_close(calls[name](None), F.cross_entropy(z, t), msg=lambda m: f"{name}: {m}")


def test_integer_ignore_index_of_any_integer_type_is_used():
    x, w, _, t = _inputs()
    t[1] = 2
    z = F.linear(x, w)
    want = F.cross_entropy(z, t, ignore_index=2)
    for i in (2, np.int64(2), np.int8(2), torch.tensor(2)):
        torch.testing.assert_close(gt.cross_entropy(z, t, ignore_index=i), want)
        torch.testing.assert_close(gt.linear_cross_entropy(x, w, t, ignore_index=i), want)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # nn.Linear's init, as torch's own
@pytest.mark.parametrize("bias", [False, True])
def test_zero_features_give_torch_answer(eager_path, bias):
    """D = 0: every logit is the bias (or 0): loss log V without bias, zero-size gradients."""
    x = torch.randn(4, 0, dtype=torch.float64, requires_grad=True)
    head = gt.LinearCrossEntropy(0, 7, bias=bias, dtype=torch.float64)
    t = torch.tensor([0, 3, 6, 1])
    loss = head(x, t)
    want = F.cross_entropy(F.linear(x, head.weight, head.bias), t)
    torch.testing.assert_close(loss, want)
    if not bias:
        assert math.isclose(loss.item(), math.log(7), rel_tol=1e-12)
    loss.backward()
    assert x.grad.shape == (4, 0) and head.weight.grad.shape == (7, 0)
    if bias:
        torch.testing.assert_close(head.bias.grad, torch.autograd.grad(want, head.bias)[0])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_second_backward_through_a_retained_graph_matches_torch(eager_path, reduction):
    x, w, b, t = _inputs()
    got = [a.clone().requires_grad_() for a in (x, w, b)]
    want = [a.clone().requires_grad_() for a in (x, w, b)]
    for leaves, loss_fn in ((got, gt.linear_cross_entropy),
                            (want, lambda x, w, t, b, reduction: F.cross_entropy(F.linear(x, w, b), t,
                                                                                 reduction=reduction))):
        loss = loss_fn(leaves[0], leaves[1], t, leaves[2], reduction=reduction).sum()
        loss.backward(retain_graph=True)
        (loss * 3).backward()  # accumulates 1 + 3 times the gradient
    for g, e, name in zip(got, want, "xwb"):
        torch.testing.assert_close(g.grad, e.grad, msg=lambda m: f"d{name}: {m}")


# --- layouts: eager, fakes and torch.compile -------------------------------------------------------
def _layouts(shape):
    """Values of `shape` as a contiguous, a transposed, a sliced (padded rows) and an expanded
    (stride-0 rows) tensor."""
    gen = torch.Generator().manual_seed(sum(shape))
    base = torch.randn(shape, generator=gen)
    return {"contiguous": base, "transposed": base.mT.contiguous().mT,
            "sliced": torch.cat([base, base], dim=-1)[..., :shape[-1]], "expanded": base[:1].expand(shape)}


def _real_and_fake(op, *args):
    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    return real, fake


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced", "expanded"])
def test_fakes_give_the_real_ops_strides(layout):
    """Inductor asserts the fakes' strides at run time: a transposed input used to fail there."""
    z, x, w = _layouts((4, 5))[layout], _layouts((4, 3))[layout], _layouts((5, 3))[layout]
    t = torch.tensor([0, 4, 2, 1])
    g = torch.randn(4, 5)
    cases = {
        "cross_entropy": (OPS.cross_entropy.default, z, t, None, -100, "mean", 0.0, True),
        "linear": (OPS.linear.default, x, w, None),
        "linear_backward": (OPS.linear_backward.default, g, x, w, True, True, True),
        "linear_cross_entropy": (OPS.linear_cross_entropy.default, x, w, t, None, -100, "mean", 0.0, 0.0, None,
                                 True, True, False),
        "linear_cross_entropy_backward": (OPS.linear_cross_entropy_backward.default, torch.ones(4), x, w, t, None,
                                          -100, 0.0, 0.0, None, True, True, False),
    }
    x3 = torch.randn(3, 2, 3).permute(1, 0, 2)  # leading axes out of order
    cases["linear 3-d"] = (OPS.linear.default, x3, w, None)
    cases["linear_backward 3-d"] = (OPS.linear_backward.default, torch.randn(2, 3, 5), x3, w, True, True, True)
    for name, (op, *args) in cases.items():
        real, fake = _real_and_fake(op, *args)
        for i, (r, f) in enumerate(zip(real if isinstance(real, tuple) else (real,),
                                       fake if isinstance(fake, tuple) else (fake,))):
            assert (tuple(r.shape), r.stride()) == (tuple(f.shape), f.stride()), f"{name} output {i} ({layout})"


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_compile_fullgraph_over_non_contiguous_inputs(layout):
    t = torch.tensor([0, 4, -100, 1])

    def step(z, x, w):
        return (gt.cross_entropy(z, t) + gt.linear(x, w).square().mean()
                + gt.linear_cross_entropy(x, w, t, reduction="none").sum())

    results = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        leaves = [_layouts(shape)[layout].detach().requires_grad_() for shape in ((4, 5), (4, 3), (5, 3))]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss] + [a.grad for a in leaves])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)
