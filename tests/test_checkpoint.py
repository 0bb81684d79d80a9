"""The activation memory of reverse mode: ad.saved_bytes (what each op's VJP keeps) and
ad.checkpoint (keep a block's inputs only, recompute the rest in backward, same gradients)."""
import gc

import numpy as np
import pytest

import gpuad as ad
from gpuad import nn
from gpuad.tensor import Node

M, H, V = 16, 32, 10  # batch, width, classes
F64 = 8


def _mlp(activation="gelu"):
    return nn.MLP([H] * 20 + [V], activation=activation, dtype="float64", rng=np.random.default_rng(0))


def _blocks(model):
    """The 20-layer MLP as 20 blocks: (Linear, activation) nineteen times, then the last Linear."""
    layers = list(model)
    return [lambda h, a=layers[i], b=layers[i + 1]: b(a(h)) for i in range(0, 38, 2)] + [layers[38]]


def _loss(model, x, y, checkpointed):
    h = x
    for block in _blocks(model):
        h = ad.checkpoint(block, h) if checkpointed else block(h)
    return ad.softmax_cross_entropy(h, y)


def test_checkpointing_each_block_cuts_saved_bytes_with_bit_identical_gradients():
    """What each op keeps (parameters excluded, float64): linear its input [M, H], gelu its input
    [M, H], softmax_cross_entropy its gradient [M, V]; a checkpointed block its input [M, H].
    The input x needs a gradient: a leaf, like the parameters, it is not counted. Plain: 19
    gelu inputs + 19 linear inputs (h1 … h19) + dlogits; checkpointed: 19 block inputs + dlogits."""
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((M, H)), rng.integers(0, V, M)
    activation, dlogits = M * H * F64, M * V * F64
    results = {}
    gc.collect()
    elsewhere = ad.saved_bytes()  # graphs that other tests left alive
    for checkpointed in (False, True):
        model = _mlp()
        xt = ad.tensor(x, requires_grad=True)
        loss = _loss(model, xt, y, checkpointed)
        saved = ad.saved_bytes(loss)
        assert ad.saved_bytes() - elsewhere == saved  # every graph alive: ours is the new one
        loss.backward()
        assert ad.saved_bytes(loss) == 0 and ad.saved_bytes() == elsewhere
        results[checkpointed] = saved, loss.numpy(), xt.grad, [p.grad for p in model.parameters()]
    (plain, loss0, dx0, grads0), (ckpt, loss1, dx1, grads1) = results[False], results[True]
    assert plain == 38 * activation + dlogits
    assert ckpt == 19 * activation + dlogits
    assert plain / ckpt == pytest.approx((38 * activation + dlogits) / (19 * activation + dlogits))
    assert plain / ckpt > 1.9
    np.testing.assert_array_equal(loss1, loss0)
    np.testing.assert_array_equal(dx1, dx0)
    assert len(grads0) == len(grads1) == 40
    for g0, g1 in zip(grads0, grads1):
        np.testing.assert_array_equal(g1, g0)


def test_relu_keeps_its_output_which_the_next_linear_keeps_too():
    """relu's VJP reads its output (y > 0 where x > 0), the array the next linear saves as its
    input: one buffer for both, half of what an activation keeping its input costs."""
    model = _mlp("relu")
    rng = np.random.default_rng(3)
    x, y = ad.tensor(rng.standard_normal((M, H)), requires_grad=True), rng.integers(0, V, M)
    loss = _loss(model, x, y, checkpointed=False)
    assert ad.saved_bytes(loss) == 19 * M * H * F64 + M * V * F64
    loss.backward()
    assert ad.saved_bytes(loss) == 0


def test_mul_by_a_constant_keeps_only_the_constant():
    """h * c with c a constant: h's gradient needs c, and nothing needs h, so h is not kept."""
    rng = np.random.default_rng(4)
    x, c = ad.tensor(rng.standard_normal(1000), requires_grad=True), ad.tensor(rng.standard_normal(1000))
    h = x * 2.0  # keeps the Python number 2.0, no array (x is a leaf that needs a gradient: not counted)
    y = ad.sum(h * c)
    assert ad.saved_bytes(y) == 1000 * F64
    y.backward()
    np.testing.assert_allclose(x.grad, 2.0 * c.numpy(), rtol=1e-15)


def test_checkpoint_in_transforms_forward_mode_and_trace():
    model = _mlp()
    rng = np.random.default_rng(2)
    x, y, t = rng.standard_normal((4, H)), rng.integers(0, V, 4), rng.standard_normal((4, H))
    f = lambda checkpointed: (lambda v: _loss(model, v, y, checkpointed))  # noqa: E731
    np.testing.assert_array_equal(ad.grad(f(True))(x), ad.grad(f(False))(x))
    out1, tan1 = ad.jvp(f(True), (x,), (t,))
    out0, tan0 = ad.jvp(f(False), (x,), (t,))
    np.testing.assert_array_equal(out1, out0)
    np.testing.assert_array_equal(tan1, tan0)
    assert all(p.grad is None for p in model.parameters())  # ad.grad collects; it writes no .grad
    # the trace: one checkpoint op per block forward; in backward, each block's ops run again
    tr = ad.trace(f(True), x)
    assert [s.op for s in tr.forward] == ["checkpoint"] * 20 + ["softmax_cross_entropy"]
    assert [s.op for s in tr.recomputed] == ["linear"] + ["linear", "gelu"] * 19  # last block first
    assert tr.saved_bytes == 19 * 4 * H * F64 + 4 * V * F64  # as above: x is a leaf that needs a gradient
    assert tr.forward[0].formula == "y1 = f(x1_1, x2_1, x3_1), its intermediates dropped"
    assert tr.backward[-1].name == "checkpoint" and tr.backward[-1].rules == [
        f"∇{x} = ∂y1/∂{x}ᵀ ∇y1, f recomputed" for x in ("x1_1", "x2_1", "x3_1")]
    assert sum(s.recomputed for s in tr.backward) == 39


def test_checkpoint_frees_everything_and_guards_its_inputs():
    gc.collect()
    before = sum(type(o) is Node for o in gc.get_objects())
    model = _mlp()
    x = ad.tensor(np.random.default_rng(3).standard_normal((2, H)))
    loss = _loss(model, x, np.array([1, 2]), checkpointed=True)
    with pytest.raises(ValueError, match="read-only"):  # a saved input cannot change before backward
        x.data[0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):  # nor a parameter the block uses
        model[0].weight.data[0, 0] = 1.0
    loss.backward()
    x.data[0, 0] = 1.0
    model[0].weight.data[0, 0] = 1.0
    del loss
    gc.collect()
    assert sum(type(o) is Node for o in gc.get_objects()) == before


def test_checkpoint_refuses_what_it_cannot_recompute():
    calls = []

    def drifting(h):  # not the same computation twice
        calls.append(1)
        return ad.tanh(h) * float(len(calls))

    x = ad.tensor(np.ones(3), requires_grad=True)
    y = ad.checkpoint(drifting, x)
    with pytest.raises(RuntimeError, match="recomputing fn ran other ops or gave another output"):
        y.sum().backward()

    def branching(h):  # other ops the second time
        calls.append(1)
        return ad.tanh(h) if len(calls) % 2 else ad.exp(h)

    calls.clear()
    y = ad.checkpoint(branching, x)
    del x  # the forward output may be gone: the op sequence is checked all the same
    with pytest.raises(RuntimeError, match="ran other ops"):
        ad.sq_norm(y).backward()

    a = ad.tensor(np.ones(3), requires_grad=True)
    inner = ad.exp(a)  # an intermediate of the enclosing graph
    with pytest.raises(ValueError, match="pass it to checkpoint as an argument"):
        ad.checkpoint(lambda h: h * inner, ad.tensor(np.ones(3)))
    with pytest.raises(TypeError, match="must return a Tensor"):
        ad.checkpoint(lambda h: 1.0, a)
    with pytest.raises(TypeError, match="must be callable"):
        ad.checkpoint(None, a)


def test_nested_checkpoints_give_the_same_gradients():
    """A checkpointed block inside a checkpointed block: the outer forward finds the inner
    block's parameters too, and both recomputations give the plain gradients, bit for bit."""
    model = nn.MLP([8] * 5, dtype="float64", rng=np.random.default_rng(0))
    layers = list(model)
    x = np.random.default_rng(1).standard_normal((3, 8))

    def f(checkpointed):
        run = ad.checkpoint if checkpointed else (lambda fn, *args: fn(*args))

        def loss(v):
            inner = lambda h: layers[3](layers[2](h))  # noqa: E731
            outer = lambda h: run(inner, layers[1](layers[0](h)))  # noqa: E731
            return ad.sq_norm(layers[6](layers[5](layers[4](run(outer, v)))))
        return loss

    np.testing.assert_array_equal(ad.grad(f(True))(x), ad.grad(f(False))(x))
    grads = []
    for checkpointed in (False, True):
        f(checkpointed)(ad.tensor(x)).backward()
        grads.append([p.grad for p in model.parameters()])
        model.zero_grad()
    assert len(grads[0]) == 8
    for g0, g1 in zip(*grads):
        np.testing.assert_array_equal(g1, g0)

