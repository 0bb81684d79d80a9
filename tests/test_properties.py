"""Property tests (hypothesis) against torch: broadcasting arithmetic on random shape pairs,
and softmax cross-entropy on random sizes, reductions, smoothing and ignored rows.

Few examples, small sizes: the file runs in seconds. Values come from a numpy generator
seeded by hypothesis, so a failure shrinks to a shape and a seed."""
import numpy as np
import pytest

import gpuad as ad
from gpuad import backend as B

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import mutually_broadcastable_shapes  # noqa: E402

F = torch.nn.functional

# the backend fixture only selects the active backend, so sharing it across examples is safe
SETTINGS = settings(max_examples=50, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _dev(a):
    return B.module_for(ad.get_backend()).asarray(a)


def _close(got, expected, rtol=1e-9, atol=1e-11, what=""):
    got = B.to_host(got)
    expected = np.asarray(expected)
    assert tuple(got.shape) == tuple(expected.shape), f"{what}: shape {got.shape} != {expected.shape}"
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol, err_msg=what)


BINARY = {"add": (ad.add, torch.add), "sub": (ad.sub, torch.sub), "mul": (ad.mul, torch.mul),
          "div": (ad.div, torch.div)}


@pytest.mark.parametrize("op", list(BINARY))
@SETTINGS
@given(shapes=mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, min_side=1, max_side=4),
       seed=st.integers(0, 2 ** 32 - 1), operator=st.booleans(), requires=st.sampled_from(["both", "a", "b"]))
def test_binary_broadcast_matches_torch(backend, op, shapes, seed, operator, requires):
    (shape_a, shape_b), out_shape = shapes
    rng = np.random.default_rng(seed)
    a_np = rng.standard_normal(shape_a)
    b_np = rng.standard_normal(shape_b)
    if op == "div":  # keep the divisor away from 0
        b_np = np.where(b_np < 0, b_np - 0.5, b_np + 0.5)
    a_np, b_np = np.asarray(a_np, np.float64), np.asarray(b_np, np.float64)
    req_a, req_b = requires in ("both", "a"), requires in ("both", "b")
    ad_fn, torch_fn = BINARY[op]
    if operator:
        ad_fn = torch_fn = {"add": lambda x, y: x + y, "sub": lambda x, y: x - y,
                            "mul": lambda x, y: x * y, "div": lambda x, y: x / y}[op]
    a, b = ad.tensor(a_np, requires_grad=req_a), ad.tensor(b_np, requires_grad=req_b)
    at, bt = torch.tensor(a_np, requires_grad=req_a), torch.tensor(b_np, requires_grad=req_b)
    y, yt = ad_fn(a, b), torch_fn(at, bt)
    assert y.shape == tuple(out_shape) == tuple(yt.shape)
    _close(y.numpy(), yt.detach().numpy(), what="value")
    u = np.asarray(rng.standard_normal(out_shape))
    y.backward(ad.tensor(u))
    yt.backward(torch.from_numpy(u))
    for x, xt, req, name in ((a, at, req_a, "a"), (b, bt, req_b, "b")):
        if req:
            _close(x.grad, xt.grad.numpy(), what=f"grad of {name}")
        else:
            assert x.grad is None


@SETTINGS
@given(B_=st.integers(1, 6), V=st.integers(1, 7), seed=st.integers(0, 2 ** 32 - 1),
       reduction=st.sampled_from(["mean", "sum", "none"]),
       label_smoothing=st.one_of(st.just(0.0), st.floats(0.0, 1.0, allow_nan=False)),
       ignore_fraction=st.sampled_from([0.0, 0.3, 1.0]), ignore_index=st.sampled_from([-100, -1]),
       scale=st.sampled_from([1.0, 30.0]), unit_seed=st.booleans())
def test_softmax_cross_entropy_matches_torch(backend, B_, V, seed, reduction, label_smoothing, ignore_fraction,
                                             ignore_index, scale, unit_seed):
    rng = np.random.default_rng(seed)
    logits_np = np.asarray(rng.standard_normal((B_, V)) * scale, dtype=np.float64)
    targets = rng.integers(0, V, size=B_).astype(np.int64)
    ignored = rng.random(B_) < ignore_fraction
    targets[ignored] = ignore_index
    kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)

    z = ad.tensor(logits_np, requires_grad=True)
    loss = ad.softmax_cross_entropy(z, _dev(targets), **kw)
    zt = torch.tensor(logits_np, requires_grad=True)
    loss_t = F.cross_entropy(zt, torch.from_numpy(targets), **kw)
    assert loss.shape == tuple(loss_t.shape)
    assert loss.dtype == np.float64

    if unit_seed and loss.size == 1:
        loss.backward()
        u = np.ones(loss.shape)
    else:
        u = np.asarray(rng.standard_normal(loss.shape))
        loss.backward(ad.tensor(u))
    grad = B.to_host(z.grad)
    assert np.all(np.isfinite(B.to_host(loss.data))) and np.all(np.isfinite(grad))

    if ignored.all() and reduction == "mean":
        # torch's mean over zero rows is NaN; gpuad's contract is loss 0, gradient 0
        _close(loss.numpy(), np.zeros(()))
        _close(grad, np.zeros_like(logits_np))
        return
    loss_t.backward(torch.from_numpy(u))
    _close(loss.numpy(), loss_t.detach().numpy(), what="loss")
    _close(grad, zt.grad.numpy(), what="dlogits")
    assert not np.any(grad[ignored]), "ignored rows must get an exact zero gradient"
