"""F.cross_entropy's options (class weights, probability targets, label smoothing, ignore_index,
reductions) and layouts ([C], [B, C], [B, C, d1, ...]) in the numpy reference, against torch's
F.cross_entropy and autograd in float64. The kernels are held to the reference elsewhere
(tests/test_triton_cross_entropy.py, tests/test_cuda_emulated.py)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from gpuad.kernels import reference as ref

torch = pytest.importorskip("torch")
F = torch.nn.functional

#: logits shapes: unbatched, rows, [B, C, T], two spatial axes, and the shapes of PyTorch's own
#: samples for F.cross_entropy (torch.testing's OpInfo: [2, 3] and [2, 3, 1, ...] up to three
#: spatial axes, singletons among them).
SHAPES = ((7,), (5, 7), (3, 7, 4), (2, 5, 3, 2), (2, 3), (2, 3, 1), (2, 3, 1, 2), (2, 3, 1, 2, 3))
REDUCTIONS = ("mean", "sum", "none")
IGNORE = -100


def make_case(shape, soft, rng, ignore_index=IGNORE):
    """(logits, targets) in float64: probability targets (rows summing to 1) or class indices
    with every third one ignore_index, the first one not."""
    x = rng.standard_normal(shape) * 3
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    if soft:
        q = rng.random(shape) ** 3
        return x, q / q.sum(axis=0 if len(shape) == 1 else 1, keepdims=True)
    t_shape = shape[:0] if len(shape) == 1 else shape[:1] + shape[2:]
    t = rng.integers(0, n_classes, t_shape)
    if ignore_index is not None and t.ndim:
        t.reshape(-1)[1::3] = ignore_index
        t.reshape(-1)[0] = 0 if ignore_index != 0 else 1  # one row counts: torch's mean over none is NaN
    return x, t


def torch_loss_and_grad(x, t, **kw):
    xt = torch.from_numpy(x).requires_grad_()
    loss = F.cross_entropy(xt, torch.from_numpy(np.asarray(t)), **{
        k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()})
    loss.sum().backward()
    return loss.detach().numpy(), xt.grad.numpy()


def check_against_torch(x, t, **kw):
    x0, t0 = x.copy(), np.copy(t)
    loss, g = ref.softmax_cross_entropy(x, t, **kw)
    want_loss, want_g = torch_loss_and_grad(x, t, **{k: v for k, v in kw.items() if v is not None})
    assert loss.shape == want_loss.shape and g.shape == x.shape
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g, want_g, rtol=1e-12, atol=1e-12)
    assert np.array_equal(x, x0) and np.array_equal(t, t0), "the inputs changed"
    loss_only, none = ref.softmax_cross_entropy(x, t, grad=False, **kw)
    assert none is None and np.array_equal(loss_only, loss)


@pytest.mark.parametrize("shape,soft,weighted", list(itertools.product(SHAPES, (False, True), (False, True))))
def test_reference_matches_torch(shape, soft, weighted):
    """Every reduction x label smoothing x ignore_index (index targets: -100 on every third
    target, a class index, None) for one layout, target kind and weight."""
    rng = np.random.default_rng(hash((shape, soft, weighted)) % 2**32)
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    weight = rng.random(n_classes) + 0.1 if weighted else None
    ignores = (IGNORE,) if soft else (IGNORE, 1, None)
    for reduction, eps, ignore_index in itertools.product(REDUCTIONS, (0.0, 0.1), ignores):
        x, t = make_case(shape, soft, rng, ignore_index)
        kw = dict(weight=weight, reduction=reduction, label_smoothing=eps)
        if ignore_index is not None:
            kw["ignore_index"] = ignore_index
        check_against_torch(x, t, **kw)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_reduced_precision_accumulates_in_float32(dtype):
    rng = np.random.default_rng(0)
    x, q = make_case((3, 9, 5), True, rng)
    w = rng.random(9).astype(np.float32)
    loss, g = ref.softmax_cross_entropy(x.astype(dtype), q.astype(dtype), weight=w, label_smoothing=0.2)
    want_loss, want_g = torch_loss_and_grad(x.astype(dtype).astype(np.float64), q.astype(dtype).astype(np.float64),
                                            weight=w.astype(np.float64), label_smoothing=0.2)
    assert loss.dtype == np.float32 and g.dtype == np.dtype(dtype)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(g.astype(np.float64), want_g, rtol=2e-3, atol=1e-6)


def test_mean_divisor_is_the_sum_of_the_target_weights():
    x = np.zeros((2, 3))
    loss, g = ref.softmax_cross_entropy(x, np.array([0, 2]), weight=np.array([1.0, 5.0, 3.0]))
    assert loss == pytest.approx(np.log(3.0))  # (1 + 3) log 3 / (1 + 3)
    assert g[1, 2] == pytest.approx(3.0 * (1 / 3 - 1) / 4)


@pytest.mark.parametrize("weighted", [False, True])
def test_divisor_zero_gives_zero_not_nan(weighted):
    """Every row ignored, or every target's weight 0: loss and gradient 0 (torch: NaN)."""
    x = np.random.default_rng(1).standard_normal((4, 3))
    weight = np.array([0.0, 2.0, 1.0]) if weighted else None
    for t in (np.full(4, IGNORE), np.zeros(4, np.int64) if weighted else np.full(4, IGNORE)):
        for eps in (0.0, 0.3):
            loss, g = ref.softmax_cross_entropy(x, t, weight=weight, label_smoothing=eps)
            if (t == IGNORE).all():
                assert loss == 0 and not g.any()
            else:  # weight 0 on every target, with smoothing the other classes still count
                assert np.isfinite(loss) and np.isfinite(g).all()


def test_bad_options_raise_errors_naming_the_argument():
    x, q = make_case((4, 5), True, np.random.default_rng(2))
    t = np.array([0, 1, 2, 3])
    cases = [
        (dict(targets=q, ignore_index=0), "ignore_index"),
        (dict(targets=t, weight=np.ones(4)), "weight"),
        (dict(targets=t, weight=np.ones(5, np.int64)), "weight"),
        (dict(targets=q[:, :4]), "targets"),
        (dict(targets=q.astype(np.int64)), "targets"),
        (dict(targets=t.astype(np.float64)), "targets"),
    ]
    for kw, name in cases:
        with pytest.raises(ValueError, match=name):
            ref.softmax_cross_entropy(x, **kw)
    with pytest.raises(ValueError, match="logits"):
        ref.softmax_cross_entropy(np.zeros(()), np.zeros((), np.int64))
    with pytest.raises(TypeError, match="weight"):
        ref.softmax_cross_entropy(x, t, weight=[1.0] * 5)


# ------------------------------------------------------------------ the engine's op and gpuad.nn

ENGINE_CASES = [  # (logits shape, class axis, probability targets, weighted)
    ((3, 7, 4), 1, False, True), ((3, 7, 4), 1, True, True), ((3, 4, 7), -1, True, True),
    ((3, 4, 7), -1, False, True), ((7,), 0, False, True), ((7, 2, 3), 0, True, False), ((2, 7, 3, 2), 1, False, False),
]


@pytest.mark.parametrize("shape,axis,soft,weighted", ENGINE_CASES)
def test_engine_op_matches_torch(backend, shape, axis, soft, weighted):
    """ad.softmax_cross_entropy with the classes on `axis`, weights and probability targets:
    loss, and the gradient of a random cotangent (the VJP of "none", the kernels' gradient for
    "mean"), against torch with the classes moved to axis 1."""
    import gpuad as ad
    from gpuad import backend as B

    rng = np.random.default_rng(len(shape) * 10 + axis)
    x = rng.standard_normal(shape) * 2
    moved = np.moveaxis(x, axis, 1) if len(shape) > 1 else x
    _, t_moved = make_case(moved.shape, soft, rng)
    t = np.moveaxis(t_moved, 1, axis) if soft and len(shape) > 1 else t_moved
    n_classes = shape[axis]
    weight = rng.random(n_classes) + 0.1 if weighted else None
    xp = B.module_for(backend)
    for reduction, eps in (("none", 0.1), ("mean", 0.0), ("sum", 0.2)):
        z = ad.tensor(x, requires_grad=True)
        loss = ad.softmax_cross_entropy(z, xp.asarray(t), reduction=reduction, label_smoothing=eps, axis=axis,
                                        weight=None if weight is None else xp.asarray(weight))
        u = rng.standard_normal(loss.shape)
        loss.backward(xp.asarray(u))
        xt = torch.from_numpy(moved).requires_grad_()
        want = F.cross_entropy(xt, torch.from_numpy(np.asarray(t_moved)), reduction=reduction, label_smoothing=eps,
                               weight=None if weight is None else torch.from_numpy(weight))
        want.backward(torch.from_numpy(u))
        want_grad = np.moveaxis(xt.grad.numpy(), 1, axis) if len(shape) > 1 else xt.grad.numpy()
        np.testing.assert_allclose(loss.numpy(), want.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(B.to_host(z.grad), want_grad, rtol=1e-10, atol=1e-12)


def test_engine_op_gradcheck_with_weights_and_probabilities(backend):
    import gpuad as ad
    from gpuad import backend as B

    rng = np.random.default_rng(3)
    xp = B.module_for(backend)
    _, q = make_case((2, 5, 3), True, rng)
    w = xp.asarray(rng.random(5) + 0.5)
    t = xp.asarray(np.array([[1, -100, 4], [0, 2, 3]]))
    for targets in (xp.asarray(q), t):
        for reduction in ("mean", "none"):
            f = lambda z: ad.softmax_cross_entropy(z, targets, reduction=reduction, label_smoothing=0.1, weight=w,
                                                   axis=1)
            assert ad.gradcheck(f, ad.tensor(rng.standard_normal((2, 5, 3))))


def test_nn_loss_takes_weight_and_axis(backend):
    from gpuad import backend as B
    from gpuad import nn

    import gpuad as ad

    rng = np.random.default_rng(4)
    x, t = make_case((4, 6, 3), False, rng)
    weight = rng.random(6) + 0.1
    xp = B.module_for(backend)
    loss_fn = nn.CrossEntropyLoss(weight=xp.asarray(weight), label_smoothing=0.1, axis=1)
    assert "weight=[6]" in repr(loss_fn) and "axis=1" in repr(loss_fn)
    z = ad.tensor(x, requires_grad=True)
    loss = loss_fn(z, xp.asarray(t))
    loss.backward()
    want_loss, want_grad = torch_loss_and_grad(x, t, weight=weight, label_smoothing=0.1)
    np.testing.assert_allclose(loss.numpy(), want_loss, rtol=1e-10)
    np.testing.assert_allclose(B.to_host(z.grad), want_grad, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="weight"):
        nn.CrossEntropyLoss(weight=np.ones((2, 3)))
    with pytest.raises(TypeError, match="axis"):
        ad.softmax_cross_entropy(z, xp.asarray(t), axis=None)
    with pytest.raises(ValueError, match="targets"):
        ad.softmax_cross_entropy(z, xp.asarray(t), axis=-1)


def test_docs_snippet_runs():
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "cross_entropy.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    blocks = text.split("```python\n")[1:]
    assert blocks, "docs/cross_entropy.md has no python snippet"
    for block in blocks:
        exec(compile(block.split("```")[0], "docs/cross_entropy.md", "exec"), {})
