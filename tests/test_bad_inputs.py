"""Bad and edge inputs a careless user hits: each test is a regression that failed before its fix.

Grad mode per thread and re-entrant; transforms inside no_grad and nested; the guard on arrays
saved for backward; truthiness and comparisons; axes out of range; fp16 reductions; infinite
logsumexp rows; repeated argnums; NaN in ignored cross-entropy rows; empty sizes; clear errors
for torch tensors in the reference kernels and for numpy functions on Tensors.
"""
import gc
import threading

import numpy as np
import pytest

import gpuad as ad
from gpuad import backend as B
from gpuad.kernels import reference

torch = pytest.importorskip("torch")


def _dev(a):
    return B.module_for(ad.get_backend()).asarray(a)


# --- grad mode ------------------------------------------------------------------------
def test_no_grad_decorator_is_reentrant():
    @ad.no_grad()
    def countdown(n):
        assert not ad.is_grad_enabled()
        return countdown(n - 1) if n else ad.exp(ad.tensor([1.0], requires_grad=True))

    y = countdown(3)
    assert ad.is_grad_enabled(), "recording stayed off after a recursive @no_grad function"
    assert not y.requires_grad
    assert ad.exp(ad.tensor([1.0], requires_grad=True)).requires_grad


def test_one_no_grad_instance_entered_twice():
    block = ad.no_grad()
    with block:
        with block:
            assert not ad.is_grad_enabled()
        assert not ad.is_grad_enabled()
    assert ad.is_grad_enabled()


def test_enable_grad_inside_no_grad():
    with ad.no_grad():
        with ad.enable_grad():
            assert ad.exp(ad.tensor([1.0], requires_grad=True)).requires_grad
        assert not ad.is_grad_enabled()
    assert ad.is_grad_enabled()


def test_grad_mode_is_per_thread():
    inside, release, seen = threading.Event(), threading.Event(), {}

    def worker():
        with ad.no_grad():
            inside.set()
            release.wait(10)
            seen["worker"] = ad.is_grad_enabled()

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(10)
    seen["main while worker is in no_grad"] = ad.is_grad_enabled()
    seen["main records"] = ad.exp(ad.tensor([1.0], requires_grad=True)).requires_grad
    release.set()
    t.join()
    with ad.no_grad():  # a thread started inside no_grad starts with grad enabled, as in torch
        child = threading.Thread(target=lambda: seen.setdefault("new thread", ad.is_grad_enabled()))
        child.start()
        child.join()
    assert seen == {"worker": False, "main while worker is in no_grad": True, "main records": True,
                    "new thread": True}


# --- transforms inside no_grad, and nested ----------------------------------------------
def test_transforms_compute_derivatives_inside_no_grad(backend):
    x = _dev(np.array([1.0, 2.0, -0.5]))
    f = lambda v: ad.sum(v * v * v)  # noqa: E731
    with ad.no_grad():
        g = ad.grad(f)(x)
        value, g2 = ad.value_and_grad(f)(x)
        _, pullback = ad.vjp(lambda v: v * v, x)
        (ct,) = pullback(_dev(np.ones(3)))
        J = ad.jacobian(lambda v: v * v, mode="rev")(x)
        J_auto = ad.jacobian(lambda v: ad.sum(v * v), mode="auto")(x)
        assert not ad.is_grad_enabled()
    xs = B.to_host(x)
    np.testing.assert_allclose(B.to_host(g), 3 * xs ** 2)
    np.testing.assert_allclose(B.to_host(g2), 3 * xs ** 2)
    np.testing.assert_allclose(B.to_host(ct), 2 * xs)
    np.testing.assert_allclose(B.to_host(J), np.diag(2 * xs))
    np.testing.assert_allclose(B.to_host(J_auto), 2 * xs)


def test_nested_transforms_raise_instead_of_returning_zeros():
    x = np.array([1.0, 2.0])
    f = lambda v: ad.sum(v * v * v)  # noqa: E731
    with pytest.raises(RuntimeError, match="ad.grad was called inside the function that ad.grad"):
        ad.grad(lambda v: ad.sum(ad.tensor(ad.grad(f)(v))))(x)
    with pytest.raises(RuntimeError, match="do not nest"):
        ad.jvp(lambda v: ad.tensor(ad.grad(f)(v)), (x,), (np.ones(2),))
    with pytest.raises(RuntimeError, match="ad.vjp was called inside the function that ad.jacobian"):
        ad.jacobian(lambda v: ad.tensor(ad.vjp(lambda u: u * u, v)[0]), mode="rev")(x)
    _, pullback = ad.vjp(lambda v: v * v, x)
    with pytest.raises(RuntimeError, match="vjp_fn of ad.vjp was called inside"):
        ad.grad(lambda v: ad.sum(ad.tensor(pullback(v.data)[0])))(x)
    # after the errors, transforms and recording work as before
    assert ad.is_grad_enabled()
    np.testing.assert_allclose(ad.grad(f)(x), 3 * x ** 2)


# --- the guard on saved arrays ----------------------------------------------------------
def test_write_into_a_saved_array_raises_not_wrong_gradient():
    a = ad.tensor([0.5, 1.5], requires_grad=True)
    y = (a * a).sum()
    with pytest.raises(ValueError, match="read-only"):
        a.data[...] = 10  # the example: before the guard, backward gave [20, 20]
    y.backward()
    np.testing.assert_allclose(a.grad, [1.0, 3.0])
    a.data[...] = 10  # the graph is gone: the array is writeable again
    a.data -= 0.5 * a.grad  # the SGD step of the demo
    np.testing.assert_allclose(a.data, [9.5, 8.5])


def test_lifting_the_guard_and_writing_raises_naming_the_op():
    a = ad.tensor([0.5, 1.5], requires_grad=True)
    y = ad.sum(ad.tanh(a) * a)
    a.data.setflags(write=True)
    a.data[...] = 10
    with pytest.raises(RuntimeError, match="^mul: an array saved for its backward"):
        y.backward()


def test_primal_changed_after_vjp_raises():
    x = np.array([0.5, 1.5])
    _, pullback = ad.vjp(lambda v: v * v, x)
    with pytest.raises(ValueError, match="read-only"):
        x[...] = 10
    np.testing.assert_allclose(pullback(np.ones(2))[0], [1.0, 3.0])
    del pullback
    gc.collect()
    x[...] = 10  # the graph died without a backward: released
    assert x[0] == 10


def test_guard_counts_graphs_and_covers_views_and_owners():
    owner = np.arange(6.0)
    x = ad.Tensor(owner[1:5], requires_grad=True)  # a view of the user's array
    y1 = ad.sum(ad.exp(x.reshape(2, 2)) * x.reshape(2, 2))  # saves views of owner
    y2 = ad.sum(x * x)  # a second graph holding the same memory
    for write in (lambda: owner.__setitem__(2, 0.0), lambda: x.data.__setitem__(0, 0.0)):
        with pytest.raises(ValueError, match="read-only"):
            write()
    y1.backward()
    with pytest.raises(ValueError, match="read-only"):  # y2 still holds the memory
        owner[2] = 0.0
    y2.backward()
    owner[2] = 0.0
    x.data[0] = 7.0
    r = ad.tensor(np.ones(4), requires_grad=True)
    square = r * r  # guards r's data
    view = r.reshape(2, 2)  # made from the guarded array: read-only, as numpy copies the flag
    assert not view.data.flags.writeable
    (ad.sum(square) + ad.sum(view)).backward()
    view.data[0, 0] = 5.0  # writeable again along with its source
    r.data[1] = 2.0


def test_linear_cross_entropy_none_guards_what_its_backward_reads_again():
    """reduction="none" runs the kernel again in backward on x, W, b and the targets: a write
    into any of them between forward and backward raises instead of changing the gradient."""
    rng = np.random.default_rng(4)
    x = ad.tensor(rng.standard_normal((5, 3)), requires_grad=True)
    w = ad.tensor(rng.standard_normal((4, 3)), requires_grad=True)
    b = ad.tensor(rng.standard_normal(4), requires_grad=True)
    t = np.array([0, 3, 1, -100, 2])
    x0, w0, b0 = x.data.copy(), w.data.copy(), b.data.copy()
    loss = ad.linear_cross_entropy(x, w, t, b, reduction="none")
    for array in (x.data, w.data, b.data, t):
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 1
    ad.sum(loss * np.arange(1.0, 6.0)).backward()
    want = [ad.tensor(a, requires_grad=True) for a in (x0, w0, b0)]
    ad.sum(ad.softmax_cross_entropy(ad.linear(*want), t, reduction="none") * np.arange(1.0, 6.0)).backward()
    for got, ref in zip((x, w, b), want):
        np.testing.assert_allclose(got.grad, ref.grad, rtol=1e-12, atol=1e-12)
    for array in (x.data, w.data, b.data, t):
        array[0] = 1  # the graph is gone: writeable again
    loss = ad.linear_cross_entropy(x, w, t, reduction="none")
    w.data.setflags(write=True)
    w.data[...] = 0
    with pytest.raises(RuntimeError, match="^linear_cross_entropy: an array saved for its backward"):
        loss.sum().backward()


def test_no_guard_without_a_graph():
    a = ad.tensor([1.0, 2.0], requires_grad=True)
    with ad.no_grad():
        y = a * a
    a.data[0] = 3.0
    b = ad.tensor([1.0, 2.0])  # requires no grad: nothing is recorded
    z = b * b
    b.data[0] = 3.0
    assert y.is_leaf and z.is_leaf


# --- truthiness and comparisons ------------------------------------------------------------
def test_truthiness_as_numpy_and_torch(backend):
    assert bool(ad.tensor([-1.0]) > 0) is False
    assert bool(ad.tensor(1.0) > 0) is True  # 0-d comparison
    assert bool(ad.tensor([[2.0]]))
    assert float(ad.tensor([2.5])) == 2.5
    for t in (ad.tensor([1.0, 2.0]) > 0, ad.tensor(np.zeros(0)) > 0):
        with pytest.raises(ValueError, match="ambiguous"):
            bool(t)
    with pytest.raises(TypeError, match="0-d"):
        len(ad.tensor(1.0))


def test_equality_is_elementwise_and_hash_is_identity(backend):
    a, b = ad.tensor([1.0, 2.0, 3.0]), ad.tensor([1.0, 0.0, 3.0])
    np.testing.assert_array_equal((a == b).numpy(), [True, False, True])
    np.testing.assert_array_equal((a != b).numpy(), [False, True, False])
    np.testing.assert_array_equal((a == 2.0).numpy(), [False, True, False])
    np.testing.assert_array_equal((_dev(np.array([1.0, 5.0, 3.0])) == a).numpy(), [True, False, True])
    np.testing.assert_array_equal((a < b).numpy(), (a.numpy() < b.numpy()))
    assert (a == None) is False and (a != None) is True  # noqa: E711
    assert len({a, b, a}) == 2 and {a: 1}[a] == 1


# --- axes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("call", [
    lambda x: ad.sum(x, axis=2), lambda x: ad.sum(x, axis=(0, -3)), lambda x: ad.mean(x, axis=-3),
    lambda x: ad.logsumexp(x, axis=2), lambda x: ad.softmax(x, axis=2), lambda x: ad.log_softmax(x, axis=-3),
    lambda x: ad.transpose(x, (0, 2)), lambda x: x.sum(5),
], ids=["sum", "sum tuple", "mean", "logsumexp", "softmax", "log_softmax", "transpose", "method"])
def test_axis_out_of_range_raises_as_numpy(backend, call):
    x = ad.tensor(np.ones((2, 3)))
    with pytest.raises(IndexError, match="out of bounds for a tensor of dimension 2"):
        call(x)
    with pytest.raises(ValueError):  # numpy's AxisError is both
        call(x)


def test_repeated_or_mismatched_axes_raise(backend):
    x = ad.tensor(np.ones((2, 3)))
    with pytest.raises(ValueError, match="more than once"):
        ad.sum(x, axis=(1, -1))
    with pytest.raises(ValueError, match="do not match"):
        ad.transpose(x, (1, 0, 2))
    with pytest.raises(ValueError, match="more than once"):
        ad.transpose(x, (1, 1))
    with pytest.raises(TypeError, match="axis must be"):
        ad.sum(x, axis=1.0)


# --- fp16 reductions -------------------------------------------------------------------------
def test_fp16_reductions_accumulate_in_fp32(backend):
    ones = ad.tensor(np.ones(70000), dtype="float16", requires_grad=True)
    m = ad.mean(ones)
    assert m.dtype == np.float16 and float(m.item()) == 1.0  # was inf
    m.backward()
    np.testing.assert_allclose(B.to_host(ones.grad), np.full(70000, 1 / 70000), rtol=2e-3)
    t = torch.ones(70000, dtype=torch.float16)
    with np.errstate(over="ignore"):
        assert float(ad.sum(ones).item()) == float(t.sum()) == np.inf  # 70000 is past fp16's range, as torch
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3000)).astype(np.float16) * 8
    xt = torch.from_numpy(x)
    for ad_fn, torch_fn in ((lambda v: ad.sum(v, axis=1), lambda v: v.sum(1)),
                            (lambda v: ad.mean(v, axis=1), lambda v: v.mean(1)),
                            (lambda v: ad.logsumexp(v, axis=1), lambda v: torch.logsumexp(v, 1)),
                            (lambda v: ad.softmax(v, axis=1), lambda v: torch.softmax(v, 1)),
                            (lambda v: ad.sq_norm(v), lambda v: 0.5 * (v.float() * v.float()).sum().half())):
        got, expected = ad_fn(ad.tensor(x)), torch_fn(xt)
        assert got.dtype == np.float16
        np.testing.assert_allclose(got.numpy().astype(np.float32), expected.float().numpy(), rtol=2e-3, atol=1e-6)


# --- logsumexp at infinity --------------------------------------------------------------------
def test_logsumexp_infinite_rows_as_torch(backend):
    inf = np.inf
    x = np.array([[-inf, -inf, -inf], [inf, 1.0, 2.0], [1.0, -inf, 3.0], [1.0, 2.0, 3.0]])
    a = ad.tensor(x, requires_grad=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = ad.logsumexp(a, axis=1)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.logsumexp(xt, 1)
    np.testing.assert_array_equal(y.numpy()[:2], [-inf, inf])
    np.testing.assert_allclose(y.numpy(), yt.detach().numpy())
    u = np.array([1.0, 2.0, -1.0, 0.5])
    y.backward(_dev(u))
    yt.backward(torch.from_numpy(u))
    np.testing.assert_allclose(B.to_host(a.grad), xt.grad.numpy())  # NaN where torch has NaN, the same zeros
    assert np.isnan(B.to_host(a.grad)[0]).all() and not np.isnan(B.to_host(a.grad)[2:]).any()


# --- argnums --------------------------------------------------------------------------------
def test_argnums_naming_an_argument_twice_raises():
    x = np.array([1.0, 2.0])
    for transform in (ad.grad, ad.value_and_grad, ad.jacobian):
        with pytest.raises(ValueError, match="more than once"):
            transform(lambda v: ad.sum(v * v), argnums=(0, 0))(x)
    with pytest.raises(ValueError, match="more than once"):
        ad.grad(lambda v, w: ad.sum(v * w), argnums=(1, -1))(x, x)
    with pytest.raises(TypeError, match="argnums must be"):
        ad.grad(lambda v: ad.sum(v), argnums="0")(x)


# --- cross-entropy --------------------------------------------------------------------------
def test_reference_cross_entropy_nan_in_ignored_rows_gives_zero_gradient():
    logits = np.array([[np.nan, 1.0, 2.0], [0.5, np.inf, -1.0], [0.1, 0.2, 0.3]])
    targets = np.array([-100, 7, 2])
    loss, dlogits = reference.softmax_cross_entropy(logits, np.array([-100, -100, 2]), reduction="sum")
    assert np.isfinite(loss) and np.all(dlogits[:2] == 0) and np.isfinite(dlogits).all()
    z = ad.tensor(logits, requires_grad=True)
    ad.softmax_cross_entropy(z, np.array([-100, -100, 2])).backward()
    assert np.all(z.grad[:2] == 0) and np.isfinite(z.grad).all()
    with pytest.raises(IndexError, match="target 7 at row 1"):
        reference.softmax_cross_entropy(logits, targets)


def test_reference_unchecked_bad_targets_touch_only_their_own_rows():
    """check_targets=False: a target outside [0, V) gives its row unspecified values; every other
    row's loss and gradient are those of the checked call on the good rows alone."""
    rng = np.random.default_rng(4)
    logits, targets = rng.standard_normal((6, 5)), rng.integers(0, 5, 6)
    bad = targets.copy()
    bad[1], bad[4] = 5, -7  # the next row's first entry and a wrap-around, were the index flat
    loss, dlogits = reference.softmax_cross_entropy(logits, bad, reduction="none", check_targets=False)
    good = [0, 2, 3, 5]
    want_loss, want_d = reference.softmax_cross_entropy(logits[good], targets[good], reduction="none")
    np.testing.assert_array_equal(loss[good], want_loss)
    np.testing.assert_array_equal(dlogits[good], want_d)


def test_reference_ignore_index_inside_the_classes():
    """ignore_index in [0, V): rows whose target is that class count for nothing."""
    rng = np.random.default_rng(5)
    logits, targets = rng.standard_normal((5, 4)), np.array([0, 2, 1, 2, 3])
    loss, dlogits = reference.softmax_cross_entropy(logits, targets, ignore_index=2)
    keep = targets != 2
    want_loss, want_d = reference.softmax_cross_entropy(logits[keep], targets[keep])
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    np.testing.assert_allclose(dlogits[keep], want_d, rtol=1e-12)
    assert np.all(dlogits[~keep] == 0)


def test_zero_classes_raise_clearly(backend):
    with pytest.raises(ValueError, match="no classes"):
        ad.softmax_cross_entropy(ad.tensor(np.ones((3, 0))), _dev(np.zeros(3, dtype=np.int64)))
    with pytest.raises(ValueError, match="at least one class"):
        reference.softmax_cross_entropy(np.ones((3, 0)), np.zeros(3, dtype=np.int64))


def test_reference_ignore_index_none_and_bad_ignore_index():
    logits = np.random.default_rng(1).standard_normal((3, 4))
    targets = np.array([0, 3, 1])
    loss, dlogits = reference.softmax_cross_entropy(logits, targets, ignore_index=None)
    loss_t = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets))
    np.testing.assert_allclose(loss, loss_t.item(), rtol=1e-12)
    with pytest.raises(IndexError, match="not ignore_index \\(None\\)"):
        reference.softmax_cross_entropy(logits, np.array([0, -100, 1]), ignore_index=None)
    with pytest.raises(TypeError, match="ignore_index must be an integer"):
        reference.softmax_cross_entropy(logits, targets, ignore_index=1.5)


# --- empty sizes --------------------------------------------------------------------------
@pytest.mark.parametrize("x_shape,w_shape", [((3, 0), (4, 0)), ((3, 2), (0, 2)), ((0, 2), (4, 2)),
                                             ((2, 0, 3), (5, 3)), ((0, 0), (0, 0))], ids=str)
def test_linear_with_empty_sizes_gives_torch_zeros(backend, x_shape, w_shape):
    rng = np.random.default_rng(2)
    x_np, w_np, b_np = rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[0])
    x, w, b = (ad.tensor(a, requires_grad=True) for a in (x_np, w_np, b_np))
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x_np, w_np, b_np))
    y, yt = ad.linear(x, w, b), torch.nn.functional.linear(xt, wt, bt)
    u = rng.standard_normal(yt.shape)
    y.backward(_dev(u))
    yt.backward(torch.from_numpy(u))
    np.testing.assert_allclose(y.numpy(), yt.detach().numpy())
    for mine, theirs in ((x, xt), (w, wt), (b, bt)):
        np.testing.assert_allclose(B.to_host(mine.grad), theirs.grad.numpy(), atol=1e-12)
    dx, dw, db = reference.linear_backward(x_np, w_np, u)
    np.testing.assert_allclose(dx, xt.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(dw, wt.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(db, bt.grad.numpy(), atol=1e-12)


def test_softmax_family_over_an_empty_axis_as_torch(backend):
    x = ad.tensor(np.ones((3, 0)), requires_grad=True)
    assert ad.softmax(x).shape == (3, 0) and ad.log_softmax(x).shape == (3, 0)
    with np.errstate(divide="ignore"):
        y = ad.logsumexp(x)
    np.testing.assert_array_equal(y.numpy(), torch.logsumexp(torch.ones(3, 0), 1).numpy())  # -inf
    ad.sum(ad.softmax(x)).backward()
    assert x.grad.shape == (3, 0)
    assert ad.softmax(ad.tensor(np.ones((0, 4)))).shape == (0, 4)


# --- transforms: several arguments ----------------------------------------------------------
@pytest.mark.parametrize("mode", ["fwd", "rev", "auto"])
def test_jacobian_of_several_arguments(mode):
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal(3), rng.standard_normal((2, 3))
    f = lambda x, w: ad.tanh(ad.matmul(w, x))  # noqa: E731
    Jx, Jw = ad.jacobian(f, argnums=(0, 1), mode=mode)(x, w)
    Jx_t, Jw_t = torch.autograd.functional.jacobian(lambda a, b: torch.tanh(b @ a),
                                                   (torch.from_numpy(x), torch.from_numpy(w)))
    assert Jx.shape == (2, 3) and Jw.shape == (2, 2, 3)
    np.testing.assert_allclose(Jx, Jx_t.numpy(), rtol=1e-12)
    np.testing.assert_allclose(Jw, Jw_t.numpy(), rtol=1e-12)
    np.testing.assert_allclose(ad.jacobian(f, argnums=1, mode=mode)(x, w), Jw, rtol=1e-12)


# --- foreign objects -------------------------------------------------------------------------
def test_reference_kernels_refuse_torch_tensors_clearly():
    x, w, dy = torch.ones(2, 3), torch.ones(4, 3), torch.ones(2, 4)
    with pytest.raises(TypeError, match="x must be a numpy or CuPy array, got torch.Tensor"):
        reference.linear_backward(x, w, dy)
    with pytest.raises(TypeError, match="logits must be a numpy or CuPy array"):
        reference.softmax_cross_entropy(torch.ones(2, 3), torch.zeros(2, dtype=torch.int64))


def test_numpy_functions_on_tensors(backend):
    t = ad.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(TypeError, match=r"numpy.sum does not take gpuad Tensors: use gpuad's own op \(ad.sum"):
        np.sum(t)
    with pytest.raises(TypeError, match="ufunc"):
        np.exp(t)
    if backend == "numpy":
        np.testing.assert_array_equal(np.asarray(t), [1.0, 2.0])  # the values, as x.numpy()
    # numpy's operators still defer to Tensor, and stay on the tape
    y = _dev(np.array([3.0, 4.0])) * t + np.float64(1.0)
    assert isinstance(y, ad.Tensor) and y.requires_grad


def test_cross_entropy_of_rows_sharing_memory(backend):
    """Logits whose rows share memory (a broadcast row: stride 0) give each row its own
    gradient (the GPU kernels get a copy: they address rows by one stride)."""
    rng = np.random.default_rng(4)
    row = _dev(rng.standard_normal((1, 5)))
    xp = B.array_module(row)
    targets = _dev(np.array([0, 2, 4]))
    shared = ad.Tensor(xp.broadcast_to(row, (3, 5)), requires_grad=True)
    apart = ad.Tensor(xp.ascontiguousarray(xp.broadcast_to(row, (3, 5))), requires_grad=True)
    for z in (shared, apart):
        ad.softmax_cross_entropy(z, targets, reduction="sum").backward()
    np.testing.assert_allclose(B.to_host(shared.grad), B.to_host(apart.grad), rtol=1e-12)
    assert len({tuple(r) for r in B.to_host(shared.grad).round(12)}) == 3


def test_fp16_composite_rules_do_not_overflow_midway(backend):
    """fp16 elementwise rules with several steps run in float32 and round once, as torch: the
    tanh-gelu derivative at 1e4 is 1 (x·x overflowed fp16: NaN), and d(a/b)/db = -g·a/b² at
    a = 3e4, b = 2, g = 8 is -60000 (-g·y overflowed first: -inf)."""
    x = ad.tensor([1e4, -1e4, 3.0], dtype="float16", requires_grad=True)
    ad.gelu(x, approximate="tanh").backward(_dev(np.ones(3, np.float16)))
    xt = torch.tensor([1e4, -1e4, 3.0], dtype=torch.float16, requires_grad=True)
    torch.nn.functional.gelu(xt, approximate="tanh").backward(torch.ones(3, dtype=torch.float16))
    np.testing.assert_allclose(B.to_host(x.grad).astype(np.float32), xt.grad.float().numpy(), rtol=2e-3)
    a = ad.tensor([3e4], dtype="float16", requires_grad=True)
    b = ad.tensor([2.0], dtype="float16", requires_grad=True)
    (a / b).backward(_dev(np.array([8.0], np.float16)))
    assert float(B.to_host(b.grad)[0]) == -60000.0
    zero, eight = _dev(np.array([0.0], np.float16)), _dev(np.array([8.0], np.float16))
    _, tangent = ad.jvp(lambda p, q: p / q, (a.data, b.data), (zero, eight))
    assert float(B.to_host(tangent)[0]) == -60000.0


def test_fp16_broadcast_gradients_accumulate_in_fp32(backend):
    """The long fuzz profile's failure (test_two_input_ops[float16], gradient of b inf where
    -18336 was expected): a gradient summed over a broadcast axis was accumulated in fp16 (numpy
    reduces fp16 over an outer axis in fp16), overflowing where the sum is -18000; and
    d(a/b)/db read the fp16 quotient, inf at 6e4 / 0.9, where -g·a/b² is -18519."""
    column = np.array([[6e4], [3e4], [-6e4], [-4.8e4]], np.float16)
    for op in ("mul", "div"):
        a = ad.tensor(np.repeat(column, 3, axis=1), requires_grad=True)
        b = ad.tensor(np.ones(3), dtype="float16", requires_grad=True)
        getattr(ad, op)(a, b).backward(_dev(np.ones((4, 3), np.float16)))
        want = -18000.0 if op == "mul" else 18000.0  # Σ g·a, and Σ -g·a/b² at b = 1
        np.testing.assert_array_equal(B.to_host(b.grad), np.full(3, want, np.float16))
    a = ad.tensor([[6e4], [1.0]], dtype="float16", requires_grad=True)
    b = ad.tensor([0.9, -0.9], dtype="float16", requires_grad=True)
    y = a / b  # [[inf, -inf], [1.11, -1.11]] in fp16
    y.backward(_dev(np.full((2, 2), 0.25, np.float16)))
    exact = -0.25 * (6e4 + 1.0) / np.float64(np.float16(0.9)) ** 2
    np.testing.assert_allclose(B.to_host(b.grad).astype(np.float64), [exact, exact], rtol=1e-3)
    np.testing.assert_allclose(B.to_host(a.grad).astype(np.float64), [[0.0], [0.0]], atol=1e-3)
    _, tangent = ad.jvp(lambda p, q: p / q, (_dev(np.array([6e4], np.float16)), _dev(np.array([0.9], np.float16))),
                        (_dev(np.zeros(1, np.float16)), _dev(np.array([0.25], np.float16))))
    np.testing.assert_allclose(B.to_host(tangent).astype(np.float64), [-0.25 * 6e4 / np.float64(np.float16(0.9)) ** 2],
                               rtol=1e-3)  # the tangent too read the fp16 quotient (-inf)
