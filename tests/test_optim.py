"""gpuad.optim against torch.optim, step by step: the same float64 parameters and the same
fresh random gradients at every step, parameters and optimizer state compared after each."""
import numpy as np
import pytest
import torch

import gpuad as ad
from gpuad import backend as B
from gpuad import optim

RTOL, ATOL = 1e-12, 1e-14
SHAPES = [(3, 4), (4,), ()]
STEPS = 6

CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.5, maximize=True)),
    ("Adam", dict()),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("Adam", dict(lr=0.01, amsgrad=True)),
    ("Adam", dict(lr=0.01, weight_decay=0.05, amsgrad=True, maximize=True)),
    ("AdamW", dict()),
    ("AdamW", dict(lr=0.01, weight_decay=0.3)),
    ("AdamW", dict(lr=0.01, betas=(0.5, 0.9), weight_decay=0.1, amsgrad=True)),
]
STATE_NAMES = {"SGD": ["momentum_buffer"], "Adam": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]}


def _pair(name, kwargs, seed=0):
    """gpuad parameters, torch parameters with the same values, and an optimizer on each."""
    rng = np.random.default_rng(seed)
    values = [rng.standard_normal(s) for s in SHAPES]
    ours = [ad.tensor(v, requires_grad=True) for v in values]
    theirs = [torch.tensor(v, requires_grad=True) for v in values]
    return ours, theirs, getattr(optim, name)(ours, **kwargs), getattr(torch.optim, name)(theirs, **kwargs)


def _set_grads(ours, theirs, rng, skip=()):
    for i, (p, q) in enumerate(zip(ours, theirs)):
        if i in skip:  # no gradient this step: both optimizers leave the parameter alone
            p.grad, q.grad = None, None
            continue
        g = rng.standard_normal(p.shape)
        p.grad, q.grad = B.module_for(ad.get_backend()).asarray(g), torch.tensor(g)


def _assert_same(ours, theirs, opt, ref, name, step):
    for i, (p, q) in enumerate(zip(ours, theirs)):
        np.testing.assert_allclose(p.numpy(), q.detach().numpy(), rtol=RTOL, atol=ATOL,
                                   err_msg=f"parameter {i} after step {step}")
        state, ref_state = opt.state.get(p, {}), ref.state.get(q, {})
        for key in STATE_NAMES["SGD" if name == "SGD" else "Adam"]:
            assert (key in state) == (key in ref_state and ref_state[key] is not None), (key, step)
            if key in state:
                np.testing.assert_allclose(B.to_host(state[key]), ref_state[key].numpy(), rtol=RTOL, atol=ATOL,
                                           err_msg=f"state {key} of parameter {i} after step {step}")


@pytest.mark.parametrize("name, kwargs", CASES, ids=[f"{n}-{'-'.join(map(str, k.items()))}" for n, k in CASES])
def test_steps_match_torch(backend, name, kwargs):
    ours, theirs, opt, ref = _pair(name, kwargs)
    rng = np.random.default_rng(1)
    for step in range(1, STEPS + 1):
        # parameter 1 has no gradient at step 3: skipped, and its step count (Adam) lags
        _set_grads(ours, theirs, rng, skip=(1,) if step == 3 else ())
        opt.step()
        ref.step()
        _assert_same(ours, theirs, opt, ref, name, step)
    if name != "SGD":
        assert [opt.state[p]["step"] for p in ours] == [int(ref.state[q]["step"]) for q in theirs] == [6, 5, 6]


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_defaults_are_torchs(name):
    ours = getattr(optim, name)([ad.tensor([1.0], requires_grad=True)]).defaults
    theirs = getattr(torch.optim, name)([torch.zeros(1, requires_grad=True)]).defaults
    assert ours == {k: theirs[k] for k in ours}
    assert ours["lr"] == 1e-3


def test_param_groups_and_changing_lr_match_torch():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 3)), rng.standard_normal(3)
    ours = [ad.tensor(a, requires_grad=True), ad.tensor(b, requires_grad=True)]
    theirs = [torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)]

    def groups(ps):
        return [{"params": [ps[0]]}, {"params": [ps[1]], "lr": 0.1, "weight_decay": 0.0}]

    opt = optim.AdamW(groups(ours), lr=0.01, weight_decay=0.5)
    ref = torch.optim.AdamW(groups(theirs), lr=0.01, weight_decay=0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.1]
    for step in range(1, 5):
        if step == 3:  # a schedule writes the groups' lr between steps
            for g in opt.param_groups + ref.param_groups:
                g["lr"] *= 0.5
        _set_grads(ours, theirs, rng)
        opt.step()
        ref.step()
        _assert_same(ours, theirs, opt, ref, "AdamW", step)


def test_zero_grad_semantics():
    params = [ad.tensor(np.ones(3), requires_grad=True), ad.tensor(np.ones(2), requires_grad=True)]
    opt = optim.SGD(params, lr=0.1)
    params[0].grad = np.full(3, 2.0)
    grad = params[0].grad
    opt.zero_grad(set_to_none=False)  # zeros, in the same array; a missing grad stays missing
    assert params[0].grad is grad and not grad.any() and params[1].grad is None
    opt.step()  # a zero gradient moves nothing
    np.testing.assert_array_equal(params[0].numpy(), np.ones(3))
    opt.zero_grad()
    assert params[0].grad is None
    # gradients accumulate across backward calls until zero_grad, as in torch
    x = params[0]
    ad.sum(x * x).backward()
    ad.sum(x * x).backward()
    np.testing.assert_array_equal(x.grad, np.full(3, 4.0))


def test_updates_in_place_and_keep_dtype():
    p = ad.tensor(np.ones((2, 2), dtype=np.float32), requires_grad=True)
    data = p.data
    for opt in (optim.SGD([p], lr=0.1, momentum=0.9), optim.Adam([p]), optim.AdamW([p])):
        p.grad = np.full((2, 2), 0.5, dtype=np.float32)
        opt.step()
        assert p.data is data and p.dtype == np.float32
        assert all(s.dtype == np.float32 for s in opt.state[p].values() if hasattr(s, "dtype"))


def test_bad_arguments_are_named():
    p = [ad.tensor([1.0], requires_grad=True)]
    with pytest.raises(ValueError, match="SGD: lr must be >= 0, got -1"):
        optim.SGD(p, lr=-1)
    with pytest.raises(ValueError, match="SGD: momentum must be >= 0"):
        optim.SGD(p, momentum=-0.5)
    with pytest.raises(ValueError, match="SGD: nesterov needs momentum > 0 and dampening = 0"):
        optim.SGD(p, nesterov=True)
    with pytest.raises(ValueError, match=r"Adam: betas\[1\] must lie in \[0, 1\), got 1.0"):
        optim.Adam(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="AdamW: eps must be >= 0"):
        optim.AdamW(p, eps=-1e-8)
    with pytest.raises(ValueError, match="Adam: weight_decay must be >= 0, got nan"):
        optim.Adam(p, weight_decay=float("nan"))
    with pytest.raises(ValueError, match="Adam: params is an empty list"):
        optim.Adam([])
    with pytest.raises(TypeError, match="SGD: params must be Tensors, got a ndarray"):
        optim.SGD([np.ones(2)])
    x = ad.tensor([1.0], requires_grad=True)
    with pytest.raises(ValueError, match="cannot optimize a Tensor computed by an op"):
        optim.SGD([x * 2.0])


def test_a_parameter_listed_twice_is_refused_as_torch_does():
    a, b = ad.tensor([1.0], requires_grad=True), ad.tensor([2.0], requires_grad=True)
    ta = torch.tensor([1.0], requires_grad=True)
    with pytest.raises(ValueError, match="more than one parameter group"):
        torch.optim.SGD([{"params": [ta]}, {"params": [ta], "lr": 0.5}], lr=0.1)
    for params in ([{"params": [a, b]}, {"params": [a], "lr": 0.5}], [a, b, a]):
        with pytest.raises(ValueError, match=r"SGD: a parameter of shape \(1,\) appears more than once"):
            optim.SGD(params, lr=0.1)  # it would be updated twice a step
    opt = optim.Adam([{"params": a}, {"params": (b,), "lr": 0.5}])  # one Tensor or any iterable in a group
    assert [g["params"] for g in opt.param_groups] == [[a], [b]]


def test_a_grad_of_another_shape_is_refused_in_step_and_in_backward():
    p, q = ad.tensor(np.ones(3), requires_grad=True), ad.tensor(np.ones(3), requires_grad=True)
    opt = optim.SGD([q, p], lr=0.1)
    q.grad = np.ones(3)
    for grad, what in ((np.ones(1), r"shape \(1,\)"), (np.ones((2, 3)), r"shape \(2, 3\)"), ([1.0] * 3, "type list")):
        p.grad = grad  # broadcastable (or a list): it used to be broadcast into the update
        with pytest.raises(ValueError, match=rf"SGD: a parameter of shape \(3,\) has a .grad of {what}"):
            opt.step()
        np.testing.assert_array_equal(q.data, np.ones(3))  # nothing moved, q included
    p.grad = np.ones(1)
    with pytest.raises(ValueError, match=r"backward: a leaf of shape \(3,\) holds a .grad of shape \(1,\)"):
        ad.sum(p * p).backward()  # used to leave p.grad = 1 + 2p, broadcast
    p.grad = np.ones(3)
    ad.sum(p * p).backward()
    np.testing.assert_array_equal(p.grad, np.full(3, 3.0))


def test_wrong_typed_arguments_are_named():
    p = ad.tensor([1.0], requires_grad=True)
    for kwargs, error, message in [
        (dict(lr="0.1"), TypeError, "SGD: lr must be a real number, got '0.1'"),
        (dict(lr=None), TypeError, "SGD: lr must be a real number, got None"),
        (dict(momentum=True), TypeError, "SGD: momentum must be a real number, got True"),
        (dict(weight_decay=[0.1]), TypeError, r"SGD: weight_decay must be a real number, got \[0.1\]"),
    ]:
        with pytest.raises(error, match=message):
            optim.SGD([p], **kwargs)
    for betas in (0.9, (0.9,), (0.9, 0.99, 0.5), ("0.9", "0.99"), None):
        with pytest.raises(TypeError, match=r"Adam: betas must be a pair of real numbers \(beta1, beta2\), got"):
            optim.Adam([p], betas=betas)
    with pytest.raises(TypeError, match="AdamW: betas must be a pair"):
        optim.AdamW([{"params": [p], "betas": 0.9}])
    for params, kind in ((p, "Tensor"), ({"params": [p]}, "dict"), (3, "int"), (None, "NoneType")):
        with pytest.raises(TypeError, match=f"SGD: params must be an iterable of Tensors or of dicts .*got a {kind}"):
            optim.SGD(params, lr=0.1)
    with pytest.raises(TypeError, match="SGD: params mixes dicts"):
        optim.SGD([{"params": [p]}, ad.tensor([2.0], requires_grad=True)])
    with pytest.raises(ValueError, match="SGD: parameter group 1 has no 'params' entry"):
        optim.SGD([{"params": [p]}, {"lr": 0.1}])
    with pytest.raises(TypeError, match="SGD: parameter group 0's 'params' must be a Tensor or an iterable"):
        optim.SGD([{"params": 3}])
    opt = optim.SGD([p], lr=0.1)
    p.grad = np.ones(1)
    opt.param_groups[0]["lr"] = "fast"
    with pytest.raises(TypeError, match="SGD: lr must be a real number, got 'fast'"):
        opt.step()
    assert p.data[0] == 1.0
