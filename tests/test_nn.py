"""gpuad.nn: shapes, PyTorch's initialisation, parameter order and names, state dicts, the
residual MLP, and modules against torch.nn on the same weights (float64)."""
import numpy as np
import pytest
import torch

import gpuad as ad
from gpuad import backend as B
from gpuad import nn

RTOL, ATOL = 1e-10, 1e-12


def _torch_mlp(sizes, activation=torch.nn.ReLU):
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(n_in, n_out, dtype=torch.float64), activation()]
    return torch.nn.Sequential(*layers[:-1])


def _load_into_torch(model, torch_model):
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})


def test_linear_shapes_and_forward(backend):
    layer = nn.Linear(5, 3, dtype="float64", rng=np.random.default_rng(0))
    assert layer.weight.shape == (3, 5) and layer.bias.shape == (3,)
    assert layer.weight.backend == backend and layer.weight.requires_grad and layer.weight.is_leaf
    x = np.random.default_rng(1).standard_normal((2, 4, 5))  # leading axes pass through
    y = layer(ad.tensor(x))
    assert y.shape == (2, 4, 3)
    np.testing.assert_allclose(y.numpy(), x @ layer.weight.numpy().T + layer.bias.numpy(), rtol=RTOL, atol=ATOL)
    no_bias = nn.Linear(5, 3, bias=False)
    assert no_bias.bias is None and [n for n, _ in no_bias.named_parameters()] == ["weight"]
    assert no_bias(ad.tensor(x.astype(np.float32))).dtype == np.float32
    assert repr(no_bias) == "Linear(in_features=5, out_features=3, bias=False)"


def test_linear_init_is_pytorchs_uniform():
    """weight and bias ~ U(-1/sqrt(in), 1/sqrt(in)): the bound, mean and variance of the draws,
    with torch.nn.Linear's own draws under the same checks."""
    n_in, n_out = 400, 300
    bound = 1 / np.sqrt(n_in)
    layer = nn.Linear(n_in, n_out, rng=np.random.default_rng(0))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = torch.nn.Linear(n_in, n_out)
    for name, ours in (("weight", layer.weight.numpy()), ("bias", layer.bias.numpy())):
        ref = getattr(theirs, name).detach().numpy()
        for w in (ours, ref):
            assert w.dtype == np.float32
            assert np.abs(w).max() <= bound
            n = w.size
            # U(-b, b): mean 0, variance b²/3; allow 5 standard errors of each estimate
            assert abs(w.mean()) < 5 * bound / np.sqrt(3 * n)
            assert abs(w.var() - bound**2 / 3) < 5 * bound**2 * np.sqrt(4 / 45 / n)
            assert np.abs(w).max() > 0.9 * bound  # not a narrower distribution
    empty = nn.Linear(0, 4)  # no inputs: PyTorch's bias bound is 0 as well
    assert empty.weight.shape == (4, 0) and not empty.bias.numpy().any()


def test_manual_seed_and_rng_fix_the_draws():
    nn.manual_seed(3)
    a = nn.MLP([4, 8, 2]).state_dict()
    nn.manual_seed(3)
    b = nn.MLP([4, 8, 2]).state_dict()
    c = nn.MLP([4, 8, 2]).state_dict()  # the generator moved on
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["0.weight"], c["0.weight"])
    d = nn.MLP([4, 8, 2], rng=np.random.default_rng(3)).state_dict()
    e = nn.MLP([4, 8, 2], rng=np.random.default_rng(3)).state_dict()
    assert all(np.array_equal(d[k], e[k]) for k in d)


def test_parameter_names_and_order_match_torch_sequential():
    sizes = [3, 4, 4, 2]
    model = nn.MLP(sizes)
    names = [n for n, _ in model.named_parameters()]
    assert names == list(_torch_mlp(sizes).state_dict())
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert [id(p) for p in model.parameters()] == [id(p) for _, p in model.named_parameters()]
    assert [type(m).__name__ for m in model] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert len(model) == 5 and model[2] is model.named_children()[2][1]


def test_own_parameters_come_before_childrens_and_shared_ones_once():
    class Net(nn.Module):
        def __init__(self):
            self.encoder = nn.Linear(2, 3)
            self.scale = nn.Parameter(np.ones(3, dtype=np.float32))
            self.head = nn.Sequential(nn.Tanh(), nn.Linear(3, 1))
            self.tied = self.encoder  # the same module twice: its parameters are listed once
            self.not_a_parameter = ad.tensor([1.0])  # a constant Tensor is no parameter

        def forward(self, x):
            return self.head(self.encoder(x) * self.scale)

    net = Net()
    assert [n for n, _ in net.named_parameters()] == ["scale", "encoder.weight", "encoder.bias",
                                                      "head.1.weight", "head.1.bias"]
    assert net(ad.tensor(np.ones((5, 2), dtype=np.float32))).shape == (5, 1)
    assert "(head): Sequential(\n    (0): Tanh()" in repr(net)


def test_mlp_matches_torch_forward_and_backward(backend):
    """Same weights (through the state dict), same input: outputs and every parameter's
    gradient agree with torch.nn, with a random cotangent."""
    sizes = [6, 16, 16, 4]
    for activation, torch_act in (("relu", torch.nn.ReLU), ("tanh", torch.nn.Tanh), ("gelu", torch.nn.GELU)):
        model = nn.MLP(sizes, activation=activation, dtype="float64", rng=np.random.default_rng(0))
        ref = _torch_mlp(sizes, torch_act)
        _load_into_torch(model, ref)
        rng = np.random.default_rng(1)
        x, u = rng.standard_normal((7, 6)), rng.standard_normal((7, 4))
        y = model(ad.tensor(x))
        y.backward(B.module_for(backend).asarray(u))
        y_ref = ref(torch.from_numpy(x))
        y_ref.backward(torch.from_numpy(u))
        np.testing.assert_allclose(y.numpy(), y_ref.detach().numpy(), rtol=RTOL, atol=ATOL)
        for (name, p), (ref_name, q) in zip(model.named_parameters(), ref.named_parameters()):
            assert name == ref_name
            np.testing.assert_allclose(B.to_host(p.grad), q.grad.numpy(), rtol=RTOL, atol=ATOL, err_msg=name)


def test_residual_mlp_blocks_where_widths_match(backend):
    model = nn.MLP([3, 5, 5, 5, 2], activation="tanh", residual=True, dtype="float64",
                   rng=np.random.default_rng(0))
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Linear", "Tanh", "Residual", "Residual", "Linear"]  # 3->5 can't be residual
    assert [n for n, _ in model.named_parameters()] == [
        "0.weight", "0.bias", "2.body.0.weight", "2.body.0.bias", "3.body.0.weight", "3.body.0.bias",
        "4.weight", "4.bias"]
    sd = model.state_dict()
    x = np.random.default_rng(1).standard_normal((4, 3))
    h = np.tanh(x @ sd["0.weight"].T + sd["0.bias"])
    for block in ("2", "3"):
        h = h + np.tanh(h @ sd[f"{block}.body.0.weight"].T + sd[f"{block}.body.0.bias"])
    want = h @ sd["4.weight"].T + sd["4.bias"]
    np.testing.assert_allclose(model(ad.tensor(x)).numpy(), want, rtol=RTOL, atol=ATOL)
    # the skip path carries gradient: the input's against central differences, the
    # parameters' against torch running the same blocks
    assert ad.gradcheck(lambda v: ad.sq_norm(model(v)), B.module_for(backend).asarray(x))
    loss = ad.sq_norm(model(ad.tensor(x)))
    loss.backward()
    t = {k: torch.from_numpy(v).requires_grad_() for k, v in sd.items()}
    h = torch.tanh(torch.from_numpy(x) @ t["0.weight"].T + t["0.bias"])
    for block in ("2", "3"):
        h = h + torch.tanh(h @ t[f"{block}.body.0.weight"].T + t[f"{block}.body.0.bias"])
    (0.5 * ((h @ t["4.weight"].T + t["4.bias"]) ** 2).sum()).backward()
    for name, p in model.named_parameters():
        np.testing.assert_allclose(B.to_host(p.grad), t[name].grad.numpy(), rtol=RTOL, atol=ATOL, err_msg=name)


def test_state_dict_round_trip_and_copies(backend):
    model = nn.MLP([4, 6, 3], rng=np.random.default_rng(0))
    other = nn.MLP([4, 6, 3], rng=np.random.default_rng(1))
    sd = model.state_dict()
    assert list(sd) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert all(type(v) is np.ndarray and v.dtype == np.float32 for v in sd.values())
    x = ad.tensor(np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32))
    assert not np.allclose(model(x).numpy(), other(x).numpy())
    identity = [id(p) for p in other.parameters()]
    assert other.load_state_dict(sd) is other
    assert [id(p) for p in other.parameters()] == identity  # loaded in place: optimizers keep working
    np.testing.assert_array_equal(model(x).numpy(), other(x).numpy())
    sd["0.weight"][...] = 0  # the state dict holds copies, and loading copied it
    assert model.parameters()[0].numpy().any() and other.parameters()[0].numpy().any()
    float64_sd = {k: v.astype(np.float64) for k, v in model.state_dict().items()}
    other.load_state_dict(float64_sd)  # the parameter's dtype and backend stay
    assert other.parameters()[0].dtype == np.float32 and other.parameters()[0].backend == backend


def test_load_state_dict_errors_name_the_keys():
    model = nn.MLP([4, 6, 3])
    sd = model.state_dict()
    with pytest.raises(KeyError, match=r"missing keys \['2.bias'\], unexpected keys \['extra'\]"):
        model.load_state_dict({**{k: v for k, v in sd.items() if k != "2.bias"}, "extra": np.zeros(1)})
    with pytest.raises(ValueError, match=r"0.weight has shape \(4, 6\) in the state dict and \(6, 4\)"):
        model.load_state_dict({**sd, "0.weight": np.zeros((4, 6))})
    partial = {"2.bias": np.full(3, 7.0)}
    model.load_state_dict(partial, strict=False)
    np.testing.assert_array_equal(model.state_dict()["2.bias"], np.full(3, 7.0, dtype=np.float32))
    np.testing.assert_array_equal(model.state_dict()["0.weight"], sd["0.weight"])


def test_zero_grad_to_none_or_zeros():
    model = nn.MLP([3, 4, 2])
    out = model(ad.tensor(np.ones((2, 3), dtype=np.float32)))
    ad.sum(out).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.any() for g in grads)
    model.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), grads))  # zeroed in place
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_to_numpy_and_bad_backend():
    model = nn.MLP([3, 4, 2])
    params = model.parameters()
    assert model.to("numpy") is model and model.parameters() == params
    assert all(p.backend == "numpy" for p in params)
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        model.to("jax")


@pytest.mark.gpu
def test_to_cupy_and_back_keeps_values_and_objects():
    pytest.importorskip("cupy")
    model = nn.MLP([3, 4, 2], rng=np.random.default_rng(0))
    sd, params = model.state_dict(), model.parameters()
    model.to("cupy")
    assert model.parameters() == params and all(p.backend == "cupy" for p in params)
    x = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)
    with ad.use_backend("cupy"):
        y_gpu = model(ad.tensor(x)).numpy()
    model.to("numpy")
    assert all(np.array_equal(sd[k], v) for k, v in model.state_dict().items())
    np.testing.assert_allclose(y_gpu, model(ad.tensor(x)).numpy(), rtol=1e-5, atol=1e-6)


def test_cross_entropy_loss_matches_torch(backend):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((9, 5))
    targets = rng.integers(0, 5, 9)
    targets[[1, 4]] = -1
    for reduction in ("mean", "sum", "none"):
        for smoothing in (0.0, 0.2):
            ours = nn.CrossEntropyLoss(ignore_index=-1, reduction=reduction, label_smoothing=smoothing)
            theirs = torch.nn.CrossEntropyLoss(ignore_index=-1, reduction=reduction, label_smoothing=smoothing)
            x = ad.tensor(logits, requires_grad=True)
            loss = ours(x, B.module_for(backend).asarray(targets))
            u = rng.standard_normal(loss.shape)
            loss.backward(B.module_for(backend).asarray(u))
            tx = torch.from_numpy(logits).requires_grad_()
            ref = theirs(tx, torch.from_numpy(targets))
            ref.backward(torch.from_numpy(u))
            np.testing.assert_allclose(loss.numpy(), ref.detach().numpy(), rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(B.to_host(x.grad), tx.grad.numpy(), rtol=RTOL, atol=ATOL)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="reduction must be one of"):
        nn.CrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        nn.CrossEntropyLoss(label_smoothing=1.5)
    with pytest.raises(ValueError, match="MLP: sizes must be two or more positive integers"):
        nn.MLP([4])
    with pytest.raises(ValueError, match="MLP: sizes"):
        nn.MLP([4, 0, 2])
    with pytest.raises(ValueError, match="MLP: activation must be one of"):
        nn.MLP([4, 2], activation="swish")
    with pytest.raises(ValueError, match="Linear: out_features must be a non-negative integer"):
        nn.Linear(3, -1)
    with pytest.raises(ValueError, match="GELU: approximate"):
        nn.GELU("exact")
    with pytest.raises(TypeError, match="Sequential: argument 1 is a ufunc, not a Module"):
        nn.Sequential(nn.ReLU(), np.tanh)
    with pytest.raises(ValueError, match="only floating-point tensors can require grad"):
        nn.Parameter(np.arange(3))
    with pytest.raises(NotImplementedError, match="Module defines no forward"):
        nn.Module()(1)


def test_parameters_are_guarded_while_a_graph_holds_them():
    """A Parameter (a Tensor subclass) saved for backward is read-only until backward, and its
    gradient arrives as for a plain leaf."""
    p = nn.Parameter(np.array([0.5, 1.5]))
    y = (p * p).sum()
    with pytest.raises(ValueError, match="read-only"):
        p.data[...] = 10.0
    y.backward()
    np.testing.assert_allclose(p.grad, [1.0, 3.0])
    p.data[...] = 10.0  # writable again once the graph is gone
