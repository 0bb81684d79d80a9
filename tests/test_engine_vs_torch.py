"""Every engine op against torch's CPU autograd, the outside oracle.

Values and gradients are compared in float64 with random cotangents (``y.backward(u)`` on
both sides, never a ``.mean()`` that would hide a wrong rule behind a sum), and forward mode
(``ad.jvp``) against ``torch.func.jvp``. Each test runs once per backend (the ``backend``
fixture); arrays are made with ``ad.tensor`` and read back with ``.numpy()``.
"""
import zlib

import numpy as np
import pytest

import gpuad as ad
from gpuad import backend as B

torch = pytest.importorskip("torch")
F = torch.nn.functional

RTOL, ATOL = 1e-9, 1e-11


# --- helpers --------------------------------------------------------------------------
def _rng(*key):
    """A generator seeded by the test's own key (stable across runs and processes)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _randn(rng, shape, domain="real"):
    a = np.array(rng.standard_normal(shape), dtype=np.float64)
    if domain == "positive":
        a = np.abs(a) + 0.3
    elif domain == "nonzero":  # away from 0 (division, relu's kink)
        a = np.where(a < 0, a - 0.3, a + 0.3)
    return np.array(a, dtype=np.float64)


def _dev(a):
    """An array (index, mask, cotangent) on the active backend."""
    return B.module_for(ad.get_backend()).asarray(a)


def _close(got, expected, rtol=RTOL, atol=ATOL, what=""):
    got = B.to_host(got)
    expected = np.asarray(expected)
    assert tuple(got.shape) == tuple(expected.shape), f"{what}: shape {got.shape} != {expected.shape}"
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol, err_msg=what)


def compare(ad_fn, torch_fn, inputs, rng, *, rtol=RTOL, atol=ATOL, requires=None):
    """Run ad_fn on ad Tensors and torch_fn on torch tensors built from the same float64
    arrays; compare the outputs, then backpropagate one random cotangent through both and
    compare every input's gradient (None on both sides where an input needs none)."""
    requires = [True] * len(inputs) if requires is None else requires
    xs = [ad.tensor(a, requires_grad=r) for a, r in zip(inputs, requires)]
    ts = [torch.tensor(a, requires_grad=r) for a, r in zip(inputs, requires)]
    yt = torch_fn(*ts)  # first: torch.from_numpy warns on arrays that gpuad's graph holds read-only
    y = ad_fn(*xs)
    assert isinstance(y, ad.Tensor)
    assert y.dtype == np.float64
    _close(y.numpy(), yt.detach().numpy(), rtol, atol, "value")
    u = np.asarray(rng.standard_normal(y.shape))
    y.backward(ad.tensor(u))
    yt.backward(torch.from_numpy(u))
    for i, (x, t) in enumerate(zip(xs, ts)):
        if not requires[i]:
            assert x.grad is None
            continue
        expected = t.grad.numpy() if t.grad is not None else np.zeros(t.shape)
        assert x.grad is not None, f"input {i} got no gradient"
        assert B.backend_of(x.grad) == ad.get_backend()
        assert x.grad.dtype == np.float64
        _close(x.grad, expected, rtol, atol, f"grad of input {i}")
    return y


def compare_jvp(ad_fn, torch_fn, inputs, rng, rtol=RTOL, atol=ATOL):
    """ad.jvp vs torch.func.jvp at the same primals with the same random tangents."""
    tangents = [_randn(rng, np.shape(a)) for a in inputs]
    out, tout = ad.jvp(ad_fn, [ad.tensor(a) for a in inputs], [ad.tensor(t) for t in tangents])
    out_t, tout_t = torch.func.jvp(torch_fn, tuple(torch.tensor(a) for a in inputs),
                                   tuple(torch.tensor(t) for t in tangents))
    _close(out, out_t.numpy(), rtol, atol, "jvp primal out")
    _close(tout, tout_t.numpy(), rtol, atol, "jvp tangent out")


# --- arithmetic with broadcasting -----------------------------------------------------
BINARY = {
    "add": (ad.add, torch.add),
    "sub": (ad.sub, torch.sub),
    "mul": (ad.mul, torch.mul),
    "div": (ad.div, torch.div),
}
BROADCAST_SHAPES = [
    ((3, 4), (3, 4)),
    ((3, 4), (4,)),
    ((4,), (3, 4)),
    ((2, 1, 4), (3, 1)),
    ((5, 1), (1, 6)),
    ((), (2, 3)),
    ((2, 3), ()),
    ((1,), (2, 3)),
    ((2, 1, 3), (2, 4, 1)),
]


@pytest.mark.parametrize("op", list(BINARY))
@pytest.mark.parametrize("shapes", BROADCAST_SHAPES, ids=str)
def test_binary_broadcast(backend, op, shapes):
    rng = _rng(op, shapes)
    a = _randn(rng, shapes[0])
    b = _randn(rng, shapes[1], "nonzero" if op == "div" else "real")
    compare(*BINARY[op], [a, b], rng)


@pytest.mark.parametrize("op", list(BINARY))
def test_binary_one_side_constant(backend, op):
    rng = _rng(op, "const")
    a, b = _randn(rng, (3, 4)), _randn(rng, (4,), "nonzero")
    compare(*BINARY[op], [a, b], rng, requires=[True, False])
    compare(*BINARY[op], [a, b], rng, requires=[False, True])


def test_neg(backend):
    rng = _rng("neg")
    compare(ad.neg, torch.neg, [_randn(rng, (3, 4))], rng)


@pytest.mark.parametrize("p", [2, 3, 1, 0, -1, 0.5, -1.5, 2.5])
def test_pow_scalar(backend, p):
    rng = _rng("pow", p)
    domain = "positive" if p != int(p) or p < 0 else "real"
    compare(lambda x: ad.pow(x, p), lambda x: torch.pow(x, p), [_randn(rng, (3, 4), domain)], rng)
    compare(lambda x: x ** p, lambda x: x ** p, [_randn(rng, (5,), domain)], rng)


# --- matmul and linear ----------------------------------------------------------------
MATMUL_SHAPES = [
    ((3, 4), (4, 5)),          # 2-D
    ((1, 4), (4, 1)),          # M = N = 1
    ((2, 3, 4), (4, 5)),       # batched @ matrix
    ((3, 4), (2, 4, 5)),       # matrix @ batched
    ((2, 3, 4), (2, 4, 5)),    # same batch
    ((2, 1, 3, 4), (5, 4, 6)),  # batch axes broadcast: (2, 1) with (5,) -> (2, 5)
    ((1, 3, 4), (2, 4, 5)),    # size-1 batch axis broadcast
    ((4,), (4, 5)),            # 1-D @ 2-D
    ((3, 4), (4,)),            # 2-D @ 1-D
    ((4,), (2, 4, 5)),         # 1-D @ batched
    ((2, 3, 4), (4,)),         # batched @ 1-D
]


@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=str)
def test_matmul(backend, shapes):
    rng = _rng("matmul", shapes)
    a, b = _randn(rng, shapes[0]), _randn(rng, shapes[1])
    compare(ad.matmul, torch.matmul, [a, b], rng)
    compare(lambda x, y: x @ y, lambda x, y: x @ y, [a, b], rng)


def test_matmul_vector_vector(backend):
    """1-D @ 1-D is an inner product (numpy semantics): a 0-d output and both gradients."""
    rng = _rng("matmul", "dot")
    compare(ad.matmul, torch.matmul, [_randn(rng, (4,)), _randn(rng, (4,))], rng)


@pytest.mark.parametrize("x_shape", [(5, 4), (2, 5, 4), (4,)], ids=str)
@pytest.mark.parametrize("bias,requires", [(True, "all"), (True, "x"), (True, "w"), (True, "b"),
                                           (False, "all"), (False, "x"), (False, "w")])
def test_linear(backend, x_shape, bias, requires):
    rng = _rng("linear", x_shape, bias, requires)
    inputs = [_randn(rng, x_shape), _randn(rng, (3, 4))] + ([_randn(rng, (3,))] if bias else [])
    req = [requires in ("all", name) for name in "xwb"][:len(inputs)]
    compare(ad.linear, F.linear, inputs, rng, requires=req)


# --- elementwise ----------------------------------------------------------------------
UNARY = {
    "exp": (ad.exp, torch.exp, "real"),
    "log": (ad.log, torch.log, "positive"),
    "tanh": (ad.tanh, torch.tanh, "real"),
    "sigmoid": (ad.sigmoid, torch.sigmoid, "real"),
    "relu": (ad.relu, torch.relu, "nonzero"),
    "gelu": (ad.gelu, F.gelu, "real"),
    "gelu_tanh": (lambda x: ad.gelu(x, approximate="tanh"), lambda x: F.gelu(x, approximate="tanh"), "real"),
}


@pytest.mark.parametrize("op", list(UNARY))
def test_unary(backend, op):
    ad_fn, torch_fn, domain = UNARY[op]
    rng = _rng("unary", op)
    x = _randn(rng, (3, 5), domain) * (2.0 if domain != "positive" else 1.0)
    compare(ad_fn, torch_fn, [x], rng)


@pytest.mark.parametrize("op", ["sigmoid", "tanh", "gelu", "gelu_tanh", "relu"])
def test_unary_saturated(backend, op):
    """Large |x|: the stable forms stay finite and match torch."""
    ad_fn, torch_fn, _ = UNARY[op]
    rng = _rng("saturated", op)
    x = np.array([-40.0, -12.0, -3.0, 0.5, 3.0, 12.0, 40.0])
    y = compare(ad_fn, torch_fn, [x], rng)
    assert np.all(np.isfinite(y.numpy()))


def test_relu_at_zero_has_zero_derivative(backend):
    x = ad.tensor([0.0, 1.0, -1.0], requires_grad=True)
    ad.relu(x).backward(ad.tensor([1.0, 1.0, 1.0]))
    xt = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64, requires_grad=True)
    torch.relu(xt).backward(torch.ones(3, dtype=torch.float64))
    _close(x.grad, xt.grad.numpy())


# --- reductions and shapes ------------------------------------------------------------
AXES = [None, 0, 1, -1, (0, 2), (2, 0), (0, 1, 2), (-1, -3)]


def _torch_dims(axis):
    return tuple(range(3)) if axis is None else axis


@pytest.mark.parametrize("axis", AXES, ids=str)
@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("op", ["sum", "mean"])
def test_reductions(backend, op, axis, keepdims):
    rng = _rng(op, axis, keepdims)
    ad_op = getattr(ad, op)
    torch_op = getattr(torch, op)
    compare(lambda x: ad_op(x, axis=axis, keepdims=keepdims),
            lambda x: torch_op(x, dim=_torch_dims(axis), keepdim=keepdims), [_randn(rng, (2, 3, 4))], rng)


def test_reduction_methods(backend):
    rng = _rng("reduction methods")
    x = _randn(rng, (2, 3, 4))
    compare(lambda t: t.sum(), lambda t: t.sum(), [x], rng)
    compare(lambda t: t.mean(), lambda t: t.mean(), [x], rng)
    compare(lambda t: t.sum(1), lambda t: t.sum(1), [x], rng)
    compare(lambda t: t.mean(axis=(0, 2), keepdims=True), lambda t: t.mean(dim=(0, 2), keepdim=True), [x], rng)


def test_sum_returns_array_not_host_scalar(backend):
    y = ad.sum(ad.tensor(np.ones((2, 3))))
    assert y.shape == () and B.backend_of(y.data) == ad.get_backend()


@pytest.mark.parametrize("shape", [(6, 4), (4, -1), (24,), (2, 3, 2, 2), (1, 24, 1)], ids=str)
def test_reshape(backend, shape):
    rng = _rng("reshape", shape)
    x = _randn(rng, (2, 3, 4))
    compare(lambda t: ad.reshape(t, shape), lambda t: t.reshape(shape), [x], rng)
    compare(lambda t: t.reshape(shape), lambda t: t.reshape(shape), [x], rng)
    compare(lambda t: t.reshape(*shape), lambda t: t.reshape(*shape), [x], rng)


@pytest.mark.parametrize("axes", [None, (1, 0, 2), (2, 0, 1), (0, 2, 1), (-1, 0, 1)], ids=str)
def test_transpose(backend, axes):
    rng = _rng("transpose", axes)
    x = _randn(rng, (2, 3, 4))
    torch_axes = (2, 1, 0) if axes is None else tuple(a % 3 for a in axes)
    compare(lambda t: ad.transpose(t, axes), lambda t: t.permute(torch_axes), [x], rng)
    if axes is None:
        compare(lambda t: t.transpose(), lambda t: t.permute(torch_axes), [x], rng)
    else:
        compare(lambda t: t.transpose(axes), lambda t: t.permute(torch_axes), [x], rng)
        compare(lambda t: t.transpose(*axes), lambda t: t.permute(torch_axes), [x], rng)


def test_dot_T(backend):
    rng = _rng("T")
    compare(lambda t: t.T, lambda t: t.T, [_randn(rng, (3, 5))], rng)
    compare(lambda t: t.T @ t, lambda t: t.T @ t, [_randn(rng, (3, 5))], rng)


# --- indexing -------------------------------------------------------------------------
def _idx_torch(index):
    if isinstance(index, tuple):
        return tuple(_idx_torch(i) for i in index)
    if isinstance(index, np.ndarray):
        return torch.from_numpy(index)
    return index


def _idx_dev(index):
    if isinstance(index, tuple):
        return tuple(_idx_dev(i) for i in index)
    if isinstance(index, np.ndarray):
        return _dev(index)
    return index


INDICES = {
    "int": 1,
    "negative int": -1,
    "scalar element": (1, -2),
    "slices": (slice(1, None), slice(None, None, 2)),
    "negative step": (slice(None, None, -1), slice(3, 0, -2)),
    "ellipsis": (Ellipsis, 2),
    "int array": np.array([2, 0, 1]),
    "repeated int array": np.array([0, 2, 0, 0, 3]),
    "repeated int array, axis 1": (slice(None), np.array([1, 1, 4, 1])),
    "repeated pairs": (np.array([0, 0, 3, 0]), np.array([2, 2, 1, 2])),
    "repeated 2-D index": np.array([[1, 1], [3, 1]]),
    "array and slice": (np.array([3, 3, 0]), slice(1, 4)),
    "boolean mask rows": np.array([True, False, True, True]),
    "boolean mask full": "mask",
}


@pytest.mark.parametrize("name", list(INDICES))
def test_getitem(backend, name):
    rng = _rng("getitem", name)
    x = _randn(rng, (4, 5))
    index = INDICES[name]
    if isinstance(index, str):
        index = x > 0.2
    torch_fn = lambda t: t[_idx_torch(index)]  # noqa: E731
    if name == "negative step":  # torch has no negative steps: flip, then pick columns 3 and 1
        torch_fn = lambda t: t.flip(0)[:, torch.tensor([3, 1])]  # noqa: E731
    compare(lambda t: ad.getitem(t, _idx_dev(index)), torch_fn, [x], rng)
    compare(lambda t: t[_idx_dev(index)], torch_fn, [x], rng)


def test_getitem_repeated_indices_accumulate(backend):
    """x[[0, 0, 0]] with cotangent [1, 2, 3]: x.grad[0] is 6, not 3."""
    x = ad.tensor([10.0, 20.0], requires_grad=True)
    y = x[_dev(np.array([0, 0, 0, 1]))]
    y.backward(ad.tensor([1.0, 2.0, 3.0, 5.0]))
    _close(x.grad, np.array([6.0, 5.0]))


def test_getitem_mask_from_comparison(backend):
    """A boolean Tensor from a comparison works as a mask (read from .data)."""
    rng = _rng("mask tensor")
    x_np = _randn(rng, (3, 4))
    x = ad.tensor(x_np, requires_grad=True)
    mask = x > 0.0
    y = x[mask]
    u = rng.standard_normal(y.shape)
    y.backward(ad.tensor(u))
    expected = np.zeros_like(x_np)
    expected[x_np > 0] = u
    _close(y.numpy(), x_np[x_np > 0])
    _close(x.grad, expected)


# --- where ----------------------------------------------------------------------------
@pytest.mark.parametrize("shapes", [((3, 4), (3, 4), (3, 4)), ((3, 4), (4,), (3, 1)),
                                    ((3, 1), (3, 4), ()), ((2, 3, 4), (3, 4), (4,))], ids=str)
def test_where(backend, shapes):
    rng = _rng("where", shapes)
    cond = rng.standard_normal(shapes[0]) > 0
    a, b = _randn(rng, shapes[1]), _randn(rng, shapes[2])
    compare(lambda x, y: ad.where(_dev(cond), x, y), lambda x, y: torch.where(torch.from_numpy(cond), x, y),
            [a, b], rng)


def test_where_nan_in_untaken_branch(backend):
    """NaN in the untaken branch leaks neither into the value nor into either gradient."""
    rng = _rng("where nan")
    x_np = np.array([-1.0, 0.5, -2.0, 3.0])
    cond = x_np > 0
    with np.errstate(invalid="ignore"):  # log of the negative entries, in the untaken branch
        compare(lambda x: ad.where(_dev(cond), ad.log(x), ad.mul(x, 0.0)),
                lambda x: torch.where(torch.from_numpy(cond), torch.log(x), x * 0.0), [x_np], rng)
    a_np = np.array([np.nan, 1.0, np.nan, 2.0])
    b_np = np.array([5.0, np.nan, 6.0, np.nan])
    y = compare(lambda a, b: ad.where(_dev(np.isnan(b_np)), a, b),
                lambda a, b: torch.where(torch.from_numpy(np.isnan(b_np)), a, b), [a_np, b_np], rng)
    assert np.all(np.isfinite(y.numpy()))


def test_where_python_scalar_branch_and_tensor_condition(backend):
    rng = _rng("where scalar")
    x_np = _randn(rng, (3, 4))
    compare(lambda x: ad.where(x > 0, x, 0.0), lambda x: torch.where(x > 0, x, 0.0), [x_np], rng)


# --- softmax family -------------------------------------------------------------------
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax(backend, axis):
    rng = _rng("softmax", axis)
    x = _randn(rng, (3, 4, 5)) * 3
    compare(lambda t: ad.softmax(t, axis=axis), lambda t: torch.softmax(t, dim=axis), [x], rng)


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_log_softmax(backend, axis):
    rng = _rng("log_softmax", axis)
    x = _randn(rng, (3, 4, 5)) * 3
    compare(lambda t: ad.log_softmax(t, axis=axis), lambda t: torch.log_softmax(t, dim=axis), [x], rng)


@pytest.mark.parametrize("axis", [-1, 0, 1, (0, 2), None])
@pytest.mark.parametrize("keepdims", [False, True])
def test_logsumexp(backend, axis, keepdims):
    rng = _rng("logsumexp", axis, keepdims)
    x = _randn(rng, (3, 4, 5)) * 3
    dims = (0, 1, 2) if axis is None else axis
    compare(lambda t: ad.logsumexp(t, axis=axis, keepdims=keepdims),
            lambda t: torch.logsumexp(t, dim=dims, keepdim=keepdims), [x], rng)


def test_softmax_family_huge_logits(backend):
    rng = _rng("softmax huge")
    x = np.array([[1e4, -1e4, 0.0, 1e4 - 1.0], [-1e4, -1e4 + 2.0, -1e4, -1e4]])
    for ad_fn, torch_fn in ((ad.softmax, torch.softmax), (ad.log_softmax, torch.log_softmax),
                            (ad.logsumexp, torch.logsumexp)):
        y = compare(lambda t: ad_fn(t, axis=-1), lambda t: torch_fn(t, dim=-1), [x], rng, atol=1e-9)
        assert np.all(np.isfinite(y.numpy()))


def test_sq_norm(backend):
    rng = _rng("sq_norm")
    y = compare(ad.sq_norm, lambda t: 0.5 * (t * t).sum(), [_randn(rng, (3, 4))], rng)
    assert y.shape == ()


# --- softmax cross-entropy ------------------------------------------------------------
def _ce_case(rng, shape, n_ignored=0, ignore_index=-100):
    *lead, V = shape
    logits = _randn(rng, shape) * 2
    targets = rng.integers(0, V, size=lead).astype(np.int64)
    flat = targets.reshape(-1)
    if n_ignored:
        flat[rng.choice(flat.size, n_ignored, replace=False)] = ignore_index
    return logits, targets


def _torch_ce(logits, targets, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    t = torch.from_numpy(targets)
    if logits.ndim == 3:  # torch wants the class axis second: [B, V, T]
        out = F.cross_entropy(logits.permute(0, 2, 1), t, ignore_index=ignore_index, reduction=reduction,
                              label_smoothing=label_smoothing)
        return out
    return F.cross_entropy(logits, t, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("n_ignored", [0, 2])
def test_softmax_cross_entropy(backend, reduction, label_smoothing, n_ignored):
    rng = _rng("ce", reduction, label_smoothing, n_ignored)
    logits, targets = _ce_case(rng, (6, 7), n_ignored)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    compare(lambda z: ad.softmax_cross_entropy(z, _dev(targets), **kw),
            lambda z: _torch_ce(z, targets, **kw), [logits], rng)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_softmax_cross_entropy_custom_ignore_index(backend, reduction):
    rng = _rng("ce ignore", reduction)
    logits, targets = _ce_case(rng, (5, 4), n_ignored=2, ignore_index=-1)
    compare(lambda z: ad.softmax_cross_entropy(z, _dev(targets), ignore_index=-1, reduction=reduction),
            lambda z: _torch_ce(z, targets, ignore_index=-1, reduction=reduction), [logits], rng)
    # a class index used as ignore_index: rows with that target are dropped
    targets = np.array([0, 3, 3, 1, 2])
    compare(lambda z: ad.softmax_cross_entropy(z, _dev(targets), ignore_index=3, reduction=reduction),
            lambda z: _torch_ce(z, targets, ignore_index=3, reduction=reduction), [logits], rng)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_softmax_cross_entropy_all_ignored(backend, reduction, label_smoothing):
    """Every row ignored: loss 0 and gradient 0 in every reduction (torch's mean is NaN)."""
    rng = _rng("ce all ignored", reduction)
    logits = ad.tensor(_randn(rng, (4, 5)), requires_grad=True)
    targets = _dev(np.full(4, -100))
    loss = ad.softmax_cross_entropy(logits, targets, reduction=reduction, label_smoothing=label_smoothing)
    assert loss.shape == (() if reduction != "none" else (4,))
    _close(loss.numpy(), np.zeros(loss.shape))
    loss.backward(ad.tensor(rng.standard_normal(loss.shape)))
    grad = B.to_host(logits.grad)
    assert not np.any(np.isnan(grad))
    _close(grad, np.zeros((4, 5)))
    if reduction == "mean":
        logits.grad = None
        loss = ad.softmax_cross_entropy(logits, targets)
        loss.backward()
        _close(logits.grad, np.zeros((4, 5)))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_softmax_cross_entropy_huge_logits(backend, reduction, label_smoothing):
    rng = _rng("ce huge", reduction, label_smoothing)
    logits = np.array([[1e4, -1e4, 0.0, 3.0], [-1e4, -1e4, -1e4 + 1.0, -1e4], [1e4, 1e4, -1e4, 1e4 - 5.0]])
    targets = np.array([1, 2, 2])
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    y = compare(lambda z: ad.softmax_cross_entropy(z, _dev(targets), **kw),
                lambda z: _torch_ce(z, targets, **kw), [logits], rng, rtol=1e-9, atol=1e-8)
    assert np.all(np.isfinite(y.numpy()))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_softmax_cross_entropy_3d(backend, reduction, label_smoothing):
    """Logits [B, T, V] with targets [B, T] (a language model's shapes)."""
    rng = _rng("ce 3d", reduction, label_smoothing)
    logits, targets = _ce_case(rng, (2, 3, 5), n_ignored=2)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    y = compare(lambda z: ad.softmax_cross_entropy(z, _dev(targets), **kw),
                lambda z: _torch_ce(z, targets, **kw), [logits], rng)
    assert y.shape == ((2, 3) if reduction == "none" else ())


def test_softmax_cross_entropy_backward_without_cotangent(backend):
    """loss.backward() (the unit seed path) equals torch's gradient; so does a scaled loss."""
    rng = _rng("ce unit")
    logits_np, targets = _ce_case(rng, (5, 6), n_ignored=1)
    for scale in (None, 3.0):
        z = ad.tensor(logits_np, requires_grad=True)
        zt = torch.tensor(logits_np, requires_grad=True)
        loss = ad.softmax_cross_entropy(z, _dev(targets), label_smoothing=0.05)
        loss_t = _torch_ce(zt, targets, label_smoothing=0.05)
        if scale is not None:
            loss, loss_t = loss * scale, loss_t * scale
        loss.backward()
        loss_t.backward()
        _close(z.grad, zt.grad.numpy())


# --- forward mode ---------------------------------------------------------------------
JVP_CASES = {
    "mul broadcast": (lambda a, b: a * b, lambda a, b: a * b, [(3, 4), (4,)]),
    "div": (ad.div, torch.div, [(3, 4), (3, 1)]),
    "sub": (lambda a, b: 2.0 - a - b, lambda a, b: 2.0 - a - b, [(3, 4), (3, 4)]),
    "matmul batched": (ad.matmul, torch.matmul, [(2, 3, 4), (4, 5)]),
    "matmul 1-D": (ad.matmul, torch.matmul, [(4,), (4, 5)]),
    "linear": (ad.linear, F.linear, [(2, 5, 4), (3, 4), (3,)]),
    "tanh": (ad.tanh, torch.tanh, [(3, 4)]),
    "sigmoid": (ad.sigmoid, torch.sigmoid, [(3, 4)]),
    "gelu": (ad.gelu, F.gelu, [(3, 4)]),
    "gelu tanh": (lambda x: ad.gelu(x, approximate="tanh"), lambda x: F.gelu(x, approximate="tanh"), [(3, 4)]),
    "exp log": (lambda x: ad.log(ad.exp(x) + 1.0), lambda x: torch.log(torch.exp(x) + 1.0), [(3, 4)]),
    "pow": (lambda x: ad.exp(x) ** 1.5, lambda x: torch.exp(x) ** 1.5, [(3, 4)]),
    "softmax": (lambda x: ad.softmax(x, axis=0), lambda x: torch.softmax(x, dim=0), [(3, 4)]),
    "log_softmax": (ad.log_softmax, lambda x: torch.log_softmax(x, dim=-1), [(3, 4)]),
    "logsumexp": (lambda x: ad.logsumexp(x, axis=(0, 2)), lambda x: torch.logsumexp(x, dim=(0, 2)), [(2, 3, 4)]),
    "sum mean": (lambda x: x.sum(axis=1) + x.mean(axis=1), lambda x: x.sum(1) + x.mean(1), [(3, 4)]),
    "reshape transpose": (lambda x: x.reshape(4, 3).T, lambda x: x.reshape(4, 3).T, [(3, 4)]),
    "getitem repeated": (lambda x: x[np.array([0, 0, 2])], lambda x: x[torch.tensor([0, 0, 2])], [(3, 4)]),
    "sq_norm": (ad.sq_norm, lambda x: 0.5 * (x * x).sum(), [(3, 4)]),
}


@pytest.mark.parametrize("name", list(JVP_CASES))
def test_jvp(backend, name):
    ad_fn, torch_fn, shapes = JVP_CASES[name]
    rng = _rng("jvp", name)
    if name == "getitem repeated":
        idx = np.array([0, 0, 2])
        ad_fn = lambda x: x[_dev(idx)]  # noqa: E731
    compare_jvp(ad_fn, torch_fn, [_randn(rng, s) for s in shapes], rng)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_jvp_softmax_cross_entropy(backend, reduction):
    rng = _rng("jvp ce", reduction)
    logits, targets = _ce_case(rng, (5, 6), n_ignored=1)
    kw = dict(reduction=reduction, label_smoothing=0.1)
    compare_jvp(lambda z: ad.softmax_cross_entropy(z, _dev(targets), **kw),
                lambda z: _torch_ce(z, targets, **kw), [logits], rng)


def test_jvp_where(backend):
    rng = _rng("jvp where")
    cond = rng.standard_normal((3, 4)) > 0
    compare_jvp(lambda a, b: ad.where(_dev(cond), a, b), lambda a, b: torch.where(torch.from_numpy(cond), a, b),
                [_randn(rng, (3, 4)), _randn(rng, (4,))], rng)


# --- operators, constants, dtypes -----------------------------------------------------
def test_operator_expression(backend):
    """An expression with every operator, Python scalars and numpy arrays as constants."""
    rng = _rng("operators")
    arr = _randn(rng, (3, 4))
    col = _randn(rng, (3, 1), "nonzero")
    idx = np.array([0, 2, 2])

    def f(lib, x, w, v):
        c = _dev(arr) if lib is ad else torch.from_numpy(arr)
        k = _dev(col) if lib is ad else torch.from_numpy(col)
        i = _dev(idx) if lib is ad else torch.from_numpy(idx)
        h = (2.0 - x) * c + x / 3 - (-x) ** 2 + 1 / (k + 0.0) * x - c / k + x * k
        h = h @ w + 0.5 * v            # [3, 5]
        h = (h.T[1:4] - 1).reshape(3, 3, 1)
        return h[i] * 2 + h.sum() / 7 - h.mean() + (c * x).sum()

    x, w, v = _randn(rng, (3, 4)), _randn(rng, (4, 5)), _randn(rng, (5,))
    compare(lambda *a: f(ad, *a), lambda *a: f(torch, *a), [x, w, v], rng)


@pytest.mark.parametrize("expr", [
    lambda x, c: x + c, lambda x, c: c + x, lambda x, c: x - c, lambda x, c: c - x,
    lambda x, c: x * c, lambda x, c: c * x, lambda x, c: x / c, lambda x, c: c / x,
    lambda x, c: x @ c, lambda x, c: c @ x,
], ids=["add", "radd", "sub", "rsub", "mul", "rmul", "div", "rdiv", "matmul", "rmatmul"])
@pytest.mark.parametrize("const", ["python", "array"])
def test_constants_mix_with_tensors(backend, expr, const, request):
    """Python scalars and backend arrays on either side of an operator are constants
    (matmul takes arrays only)."""
    rng = _rng("constants", const)
    if const == "python" and "matmul" in request.node.callspec.id:
        with pytest.raises(ValueError, match="at least one axis"):
            expr(ad.tensor(_randn(rng, (4, 4))), 1.5)
        return
    if const == "python":
        c_ad = c_t = 1.5
    else:
        c_np = _randn(rng, (4, 4), "nonzero")
        c_ad, c_t = _dev(c_np), torch.from_numpy(c_np)
    x = _randn(rng, (4, 4), "nonzero")
    y = compare(lambda t: expr(t, c_ad), lambda t: expr(t, c_t), [x], rng)
    assert isinstance(y, ad.Tensor)


def test_broadcast_size_one_axes(backend):
    """Size-1 axes on both sides broadcast, and the gradient sums back to size 1."""
    rng = _rng("size-1")
    a, b = _randn(rng, (1, 3, 1)), _randn(rng, (2, 1, 4), "nonzero")
    compare(lambda x, y: x * y + x / y - y, lambda x, y: x * y + x / y - y, [a, b], rng)
    y = ad.tensor(a, requires_grad=True) * ad.tensor(b)
    assert y.shape == (2, 3, 4)


FLOAT32_EXPRS = {
    "x + 1": lambda x: x + 1, "1 + x": lambda x: 1 + x, "x - 0.5": lambda x: x - 0.5,
    "2.0 - x": lambda x: 2.0 - x, "x * 3": lambda x: x * 3, "0.1 * x": lambda x: 0.1 * x,
    "x / 7": lambda x: x / 7, "1 / x": lambda x: 1 / x, "x ** 2": lambda x: x ** 2,
    "x ** 0.5": lambda x: ad.exp(x) ** 0.5, "-x": lambda x: -x, "mean": lambda x: x.mean(axis=0),
    "sum": lambda x: x.sum(), "exp": ad.exp, "log": lambda x: ad.log(ad.exp(x)), "tanh": ad.tanh,
    "sigmoid": ad.sigmoid, "relu": ad.relu, "gelu": ad.gelu,
    "gelu tanh": lambda x: ad.gelu(x, approximate="tanh"),
    "where": lambda x: ad.where(x > 0, x, 0.0), "softmax": ad.softmax, "log_softmax": ad.log_softmax,
    "logsumexp": ad.logsumexp, "sq_norm": ad.sq_norm, "matmul": lambda x: x @ x.T,
    "linear": lambda x: ad.linear(x, x, x[0]), "getitem": lambda x: x[1:, _dev(np.array([0, 0]))],
    "np.float32 scalar": lambda x: np.float32(2.0) * x,
    "softmax_cross_entropy": lambda x: ad.softmax_cross_entropy(x, _dev(np.array([0, 2, 1])), label_smoothing=0.1),
}


@pytest.mark.parametrize("name", list(FLOAT32_EXPRS))
def test_float32_stays_float32(backend, name):
    """float32 Tensors stay float32 when mixed with Python scalars, in value, grad and tangent."""
    rng = _rng("float32", name)
    x_np = rng.standard_normal((3, 3)).astype(np.float32)
    x = ad.tensor(x_np, requires_grad=True)
    y = FLOAT32_EXPRS[name](x)
    assert y.dtype == np.float32, f"{name}: value is {y.dtype}"
    y.backward(ad.tensor(rng.standard_normal(y.shape).astype(np.float32)))
    assert x.grad.dtype == np.float32, f"{name}: grad is {x.grad.dtype}"
    _, t = ad.jvp(FLOAT32_EXPRS[name], [ad.tensor(x_np)], [ad.tensor(np.ones((3, 3), np.float32))])
    assert t.dtype == np.float32, f"{name}: tangent is {t.dtype}"


def test_float32_matches_torch(backend):
    """A float32 chain agrees with torch's float32 to float32 precision."""
    rng = _rng("float32 torch")
    x_np = rng.standard_normal((4, 6)).astype(np.float32)
    w_np = rng.standard_normal((5, 6)).astype(np.float32)
    targets = np.array([0, 4, -100, 2])
    u = np.float32(rng.standard_normal())
    x, w = ad.tensor(x_np, requires_grad=True), ad.tensor(w_np, requires_grad=True)
    xt, wt = torch.tensor(x_np, requires_grad=True), torch.tensor(w_np, requires_grad=True)
    loss = ad.softmax_cross_entropy(ad.gelu(ad.linear(x, w)) * 2.0 - 0.5, _dev(targets))
    loss_t = F.cross_entropy(F.gelu(F.linear(xt, wt)) * 2.0 - 0.5, torch.from_numpy(targets))
    assert loss.dtype == np.float32
    loss.backward(ad.tensor(np.asarray(u)))
    loss_t.backward(torch.tensor(u))
    _close(loss.numpy(), loss_t.detach().numpy(), 1e-5, 1e-6)
    _close(x.grad, xt.grad.numpy(), 1e-4, 1e-6)
    _close(w.grad, wt.grad.numpy(), 1e-4, 1e-6)


def test_leaf_grads_do_not_alias_cotangent_or_each_other(backend):
    """.grad is each leaf's own array: not the caller's cotangent, not another leaf's grad."""
    u_np = np.arange(3.0) + 1.0
    a = ad.tensor(np.ones(3), requires_grad=True)
    b = ad.tensor(np.ones(3), requires_grad=True)
    u = ad.tensor(u_np)
    (a + b).backward(u)
    _close(a.grad, u_np)
    _close(b.grad, u_np)
    xp = B.array_module(a.grad)
    assert not xp.shares_memory(a.grad, b.grad), "two leaves share one .grad buffer"
    assert not xp.shares_memory(a.grad, u.data), ".grad aliases the cotangent passed to backward"
    a.grad *= 0.0  # zeroing one leaf's grad in place must not touch the other's
    _close(b.grad, u_np)
