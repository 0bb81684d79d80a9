"""Level 1: the tape engine, every op gradchecked in float64 in both modes, regressions.

Each test runs once per backend (the `backend` fixture); the cupy half needs a GPU."""
import gc
import subprocess
import sys

import numpy as np
import pytest

import gpuad as ad
from gpuad.backend import to_host
from gpuad.tensor import Node

RNG = np.random.default_rng(1234)


def rand(*shape, positive=False):
    """A float64 array on the active backend, fresh random values (never zeros)."""
    a = RNG.standard_normal(shape)
    if positive:
        a = np.abs(a) + 0.5
    return ad.tensor(a).data


# (name, f, input shapes, positive inputs) — broadcasting and size-1 axes included
UNARY_CASES = [
    ("exp", ad.exp, False), ("log", ad.log, True), ("tanh", ad.tanh, False), ("sigmoid", ad.sigmoid, False),
    ("relu", ad.relu, False), ("gelu", ad.gelu, False), ("gelu_tanh", lambda x: ad.gelu(x, approximate="tanh"), False),
    ("neg", ad.neg, False), ("pow3", lambda x: x ** 3, False), ("pow_half", lambda x: x ** 0.5, True),
    ("pow_neg", lambda x: ad.pow(x, -1.5), True), ("softmax", ad.softmax, False),
    ("softmax_axis0", lambda x: ad.softmax(x, axis=0), False), ("log_softmax", ad.log_softmax, False),
    ("logsumexp", ad.logsumexp, False), ("logsumexp_keep", lambda x: ad.logsumexp(x, axis=0, keepdims=True), False),
    ("sum", lambda x: x.sum(), False), ("sum_axis", lambda x: ad.sum(x, axis=1, keepdims=True), False),
    ("mean", lambda x: x.mean(axis=(0,)), False), ("sq_norm", ad.sq_norm, False),
    ("reshape", lambda x: x.reshape(-1), False), ("transpose", lambda x: x.T, False),
    ("getitem", lambda x: x[np.array([0, 2, 0]), 1:], False), ("getitem_int", lambda x: x[1], False),
]
BINARY_CASES = [
    ("add", ad.add, (3, 1, 4), (2, 4)), ("sub", ad.sub, (1, 4), (3, 1)), ("mul", ad.mul, (3, 4), (4,)),
    ("div", ad.div, (2, 3), (1, 3)), ("matmul", ad.matmul, (3, 4), (4, 2)), ("matmul_batch", ad.matmul, (2, 3, 4), (4, 5)),
    ("matmul_vec", ad.matmul, (4,), (4, 3)), ("matmul_vec2", ad.matmul, (2, 4), (4,)),
    ("where", lambda a, b: ad.where(a > 0, a, b), (3, 4), (1, 4)),
]


@pytest.mark.parametrize("name,f,positive", UNARY_CASES, ids=[c[0] for c in UNARY_CASES])
def test_gradcheck_unary(backend, name, f, positive):
    x = rand(3, 4, positive=positive)
    if name == "relu":  # keep finite differences away from the kink
        x = x + 0.1 * ad.tensor(np.sign(to_host(x))).data
    assert ad.gradcheck(f, x)


@pytest.mark.parametrize("name,f,sa,sb", BINARY_CASES, ids=[c[0] for c in BINARY_CASES])
def test_gradcheck_binary(backend, name, f, sa, sb):
    a, b = rand(*sa), rand(*sb)
    if name == "div":
        b = ad.tensor(np.abs(to_host(b)) + 0.5).data
    assert ad.gradcheck(f, a, b)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_linear(backend, bias):
    x, W, b = rand(2, 3, 4), rand(5, 4), rand(5)
    if bias:
        assert ad.gradcheck(ad.linear, x, W, b)
    else:
        assert ad.gradcheck(ad.linear, x, W)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_gradcheck_softmax_cross_entropy(backend, reduction, smoothing):
    targets = ad.tensor(np.array([1, -100, 4, 0])).data
    f = lambda z: ad.softmax_cross_entropy(z, targets, reduction=reduction, label_smoothing=smoothing)
    assert ad.gradcheck(f, rand(4, 5))


def test_gradcheck_reports_a_wrong_rule(backend):
    def bad_square(x):  # forward x², VJP and JVP of x³: a wrong local derivative
        from gpuad.tensor import record
        return record("bad", x.data ** 2, (x,), vjp=(lambda g: g * 3 * x.data ** 2,), jvp=lambda t: t * 3 * x.data ** 2)

    with pytest.raises(ad.GradcheckError, match=r"input 0, entry \(\d, \d\)"):
        ad.gradcheck(bad_square, rand(2, 2))
    with pytest.raises(ValueError, match="integer"):
        ad.gradcheck(ad.exp, np.arange(3))


def tall(x):  # R^2 -> R^6
    return ad.tanh(ad.matmul(ad.tensor(RNG_FIXED[:6, :2]).data, x) * 2.0)


def wide(x):  # R^6 -> R^2
    return ad.matmul(ad.tensor(RNG_FIXED[:2, :6]).data, ad.sigmoid(x))


RNG_FIXED = np.random.default_rng(7).standard_normal((6, 6))


@pytest.mark.parametrize("f,n", [(tall, 2), (wide, 6)], ids=["tall", "wide"])
def test_jacobian_modes_agree(backend, f, n):
    x = rand(n)
    jf, jr, ja = (to_host(ad.jacobian(f, mode=m)(x)) for m in ("fwd", "rev", "auto"))
    out_shape = to_host(f(ad.Tensor(x)).data).shape
    assert jf.shape == out_shape + (n,)
    np.testing.assert_allclose(jf, jr, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ja, jr, rtol=1e-12, atol=1e-12)
    # and against finite differences
    eps, xs = 1e-6, to_host(x)
    fd = np.stack([(to_host(f(ad.tensor(xs + eps * e)).data) - to_host(f(ad.tensor(xs - eps * e)).data)) / (2 * eps)
                   for e in np.eye(n)], axis=-1)
    np.testing.assert_allclose(jr, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mode,taped", [("fwd", False), ("rev", True), ("auto", True)])
def test_jacobian_tapes_only_in_reverse_mode(mode, taped):
    seen = []

    def f(x):
        seen.append(x.requires_grad)
        return ad.tanh(x) * 2.0

    x = np.random.default_rng(3).standard_normal(3)
    J = ad.jacobian(f, mode=mode)(x)
    np.testing.assert_allclose(J, np.diag(2.0 * (1.0 - np.tanh(x) ** 2)), rtol=1e-12, atol=1e-15)
    assert any(seen) == taped, f"mode {mode}: f saw requires_grad {seen}"


def test_jacobian_of_empty_input_forward_mode():
    J = ad.jacobian(lambda x: ad.sum(x) + 1.0, mode="fwd")(np.zeros((0,)))
    assert J.shape == (0,)


def test_jacobian_of_matrix_input_shape(backend):
    J = ad.jacobian(lambda x: ad.softmax(x), mode="auto")(rand(2, 3))
    assert J.shape == (2, 3, 2, 3)


def test_grad_value_and_grad_vjp_jvp(backend):
    x, W = rand(3, 4), rand(2, 4)
    f = lambda x, W: ad.sq_norm(ad.linear(x, W))
    gx, gW = ad.grad(f, argnums=(0, 1))(x, W)
    xh, Wh = to_host(x), to_host(W)
    np.testing.assert_allclose(to_host(gx), xh @ Wh.T @ Wh, rtol=1e-12)
    np.testing.assert_allclose(to_host(gW), (xh @ Wh.T).T @ xh, rtol=1e-12)
    value, g = ad.value_and_grad(f)(x, W)
    np.testing.assert_allclose(float(to_host(value)), 0.5 * ((xh @ Wh.T) ** 2).sum(), rtol=1e-12)
    out, pullback = ad.vjp(lambda x: ad.tanh(x), x)
    u = rand(3, 4)
    (ct,) = pullback(u)
    np.testing.assert_allclose(to_host(ct), to_host(u) * (1 - np.tanh(xh) ** 2), rtol=1e-12)
    (ct2,) = pullback(u)  # vjp_fn may be called again
    np.testing.assert_allclose(to_host(ct2), to_host(ct))
    out, tangent = ad.jvp(lambda x: ad.tanh(x), (x,), (u,))
    np.testing.assert_allclose(to_host(tangent), to_host(u) * (1 - np.tanh(xh) ** 2), rtol=1e-12)
    with pytest.raises(ValueError, match="single element"):
        ad.grad(lambda x: x * 2.0)(x)


# --- regressions ----------------------------------------------------------------------
def test_value_used_twice(backend):
    a = ad.tensor(3.0, requires_grad=True)
    b = a + a
    c = b * b
    c.backward()
    assert float(to_host(a.grad)) == 24.0  # c = 4a², dc/da = 8a


def test_diamond_graph_each_node_runs_once(backend):
    x = ad.tensor(rand(5), requires_grad=True)
    h = ad.tanh(x)
    y = ad.sum(h * h + ad.exp(h) - h)
    y.backward()
    th = np.tanh(to_host(x.data))
    np.testing.assert_allclose(to_host(x.grad), (2 * th + np.exp(th) - 1) * (1 - th ** 2), rtol=1e-12)


def test_ten_thousand_op_chain(backend):
    x = ad.tensor(1.0, requires_grad=True)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.backward()
    np.testing.assert_allclose(float(to_host(x.grad)), 1.0001 ** 10_000, rtol=1e-9)


def test_where_untaken_nan_branch_gives_no_nan(backend):
    x = ad.tensor(np.array([-2.0, -0.5, 0.5, 2.0]), requires_grad=True)
    with np.errstate(invalid="ignore"):
        y = ad.where(x > 0, ad.log(x), x * 3.0)  # log(x) is NaN where x < 0, and untaken there
    y.backward(ad.tensor(np.ones(4)).data)
    g = to_host(x.grad)
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, [3.0, 3.0, 2.0, 0.5])
    x.grad = None
    nan_const = ad.tensor(np.full(4, np.nan)).data
    ad.sum(ad.where(x > 0, x * 2.0, nan_const)).backward()
    np.testing.assert_allclose(to_host(x.grad), [0.0, 0.0, 2.0, 2.0])


def test_no_tape_node_alive_after_backward(backend):
    gc.collect()
    before = sum(isinstance(o, Node) for o in gc.get_objects())
    x = ad.tensor(rand(4, 3), requires_grad=True)
    W = ad.tensor(rand(2, 3), requires_grad=True)
    loss = ad.softmax_cross_entropy(ad.relu(ad.linear(x, W)), ad.tensor(np.array([0, 1, 1, 0])).data)
    hidden = ad.tanh(x)  # a branch not on the loss's path is untouched
    loss.backward()
    gc.collect()
    alive = sum(isinstance(o, Node) for o in gc.get_objects()) - before
    assert alive == 1  # only `hidden`'s node, which the backward never reached
    del hidden
    gc.collect()
    assert sum(isinstance(o, Node) for o in gc.get_objects()) == before


def test_second_backward_needs_retain_graph(backend):
    x = ad.tensor(rand(3), requires_grad=True)
    y = ad.sum(ad.exp(x))
    y.backward(retain_graph=True)
    y.backward()  # the retained graph runs again; grads accumulate
    np.testing.assert_allclose(to_host(x.grad), 2 * np.exp(to_host(x.data)), rtol=1e-12)
    with pytest.raises(RuntimeError, match="already freed"):
        y.backward()


def test_no_grad_records_nothing(backend):
    x = ad.tensor(rand(3), requires_grad=True)
    with ad.no_grad():
        y = ad.exp(x) * 2.0
    assert not y.requires_grad and y.is_leaf
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward(ad.tensor(np.ones(3)).data)


def test_huge_logits_finite(backend):
    logits = ad.tensor(np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4]]), requires_grad=True)
    loss = ad.softmax_cross_entropy(logits, ad.tensor(np.array([1, 2])).data)
    loss.backward()
    assert np.isfinite(to_host(loss.data)) and np.isfinite(to_host(logits.grad)).all()
    np.testing.assert_allclose(float(to_host(loss.data)), 1e4, rtol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_targets_give_zero(backend, reduction):
    logits = ad.tensor(rand(3, 4), requires_grad=True)
    loss = ad.softmax_cross_entropy(logits, ad.tensor(np.full(3, -100)).data, reduction=reduction)
    ad.sum(loss).backward()
    assert (to_host(loss.data) == 0).all()
    assert (to_host(logits.grad) == 0).all()


def test_cross_entropy_without_grad_makes_no_gradient_buffer(backend, monkeypatch):
    logits, t = ad.tensor(rand(2, 3), requires_grad=True), ad.tensor(np.array([0, 2])).data
    kernels = ad.backend.kernel_module(logits.xp, logits.dtype)
    calls = []
    original = kernels.softmax_cross_entropy
    monkeypatch.setattr(kernels, "softmax_cross_entropy", lambda *a, **k: calls.append(k["grad"]) or original(*a, **k))
    with ad.no_grad():
        ad.softmax_cross_entropy(logits, t)
    ad.softmax_cross_entropy(logits.detach(), t)
    ad.softmax_cross_entropy(logits, t)
    assert calls == [False, False, True]


def test_float32_precision_kept(backend):
    x = ad.tensor(rand(3), requires_grad=True, dtype="float32")
    y = ad.sum(2.0 * x + 1 - x / 3.0)
    y.backward()
    assert y.dtype == np.float32 and x.grad.dtype == np.float32


# --- bad input ------------------------------------------------------------------------
def test_shape_mismatch_names_both_shapes(backend):
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(5, 4\)"):
        ad.matmul(rand(3, 4), rand(5, 4))
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(3,\)"):
        ad.add(ad.tensor(rand(3, 4)), rand(3))
    with pytest.raises(ValueError, match=r"x \(2, 3\) and W \(4, 5\)"):
        ad.linear(rand(2, 3), rand(4, 5))


def test_cross_entropy_bad_input(backend):
    logits = rand(3, 4)
    with pytest.raises(IndexError, match="target 7 at row 1"):
        ad.softmax_cross_entropy(logits, ad.tensor(np.array([0, 7, 1])).data)
    with pytest.raises(IndexError, match="target -3"):
        ad.softmax_cross_entropy(logits, ad.tensor(np.array([0, -3, 1])).data)
    with pytest.raises(ValueError, match="reduction"):
        ad.softmax_cross_entropy(logits, ad.tensor(np.array([0, 1, 1])).data, reduction="avg")
    with pytest.raises(ValueError, match="floating point"):
        ad.softmax_cross_entropy(ad.tensor(np.ones((3, 4), dtype=np.int64)).data, ad.tensor(np.array([0, 1, 1])).data)
    with pytest.raises(ValueError, match="targets"):
        ad.softmax_cross_entropy(logits, ad.tensor(np.array([0, 1])).data)


def test_integer_tensors_cannot_require_grad(backend):
    with pytest.raises(ValueError, match="floating"):
        ad.tensor([1, 2], requires_grad=True)
    with pytest.raises(ValueError, match="integer"):
        ad.grad(lambda x: ad.sum(x))(ad.tensor([1, 2]).data)


def test_import_loads_numpy_only():
    code = "import sys, gpuad; bad = [m for m in ('torch', 'triton', 'cupy') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tape_keeps_only_what_vjps_need():
    """The fused cross-entropy saves dlogits, not its input: the logits array is freed once
    the forward pass drops it, and so is the addend of an add."""
    import weakref

    x = ad.tensor(rand(6, 4), requires_grad=True)
    W = ad.tensor(rand(5, 4), requires_grad=True)
    logits = ad.linear(x, W)
    logits_data = weakref.ref(logits.data)
    shifted = logits + 1.0
    shifted_data = weakref.ref(shifted.data)
    loss = ad.softmax_cross_entropy(shifted, ad.tensor(np.array([0, 1, 2, 3, 4, 0])).data)
    del logits, shifted
    gc.collect()
    assert logits_data() is None and shifted_data() is None
    loss.backward()
    assert x.grad.shape == (6, 4) and W.grad.shape == (5, 4)


@pytest.mark.parametrize("op", [ad.exp, ad.tanh, ad.sigmoid])
def test_unary_ops_that_save_their_output_free_their_input(op):
    """exp, tanh and sigmoid differentiate from their output: the tape does not keep the input."""
    import weakref

    x = ad.tensor(rand(3, 4), requires_grad=True)
    h = x * 2.0
    h_data = weakref.ref(h.data)
    y = op(h)
    del h
    gc.collect()
    assert h_data() is None
    y.sum().backward()
    kept = ad.tensor(x.data.copy(), requires_grad=True)  # the same graph with the input kept
    op(kept * 2.0).sum().backward()
    np.testing.assert_array_equal(to_host(x.grad), to_host(kept.grad))
