"""Tensors with Python scalars (x * 0.5, 1 - p, x / n): one tape edge, no constant Tensor, and the
values, dtypes, gradients and tangents of the same op with the scalar as a 0-d constant array."""
import numpy as np
import pytest

import gpuad as ad

CASES = {
    "x + c": lambda x, c: x + c, "c + x": lambda x, c: c + x,
    "x - c": lambda x, c: x - c, "c - x": lambda x, c: c - x,
    "x * c": lambda x, c: x * c, "c * x": lambda x, c: c * x,
    "x / c": lambda x, c: x / c, "c / x": lambda x, c: c / x,
}


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("scalar", [0.37, 3])
@pytest.mark.parametrize("expr", CASES)
def test_scalar_operand_matches_a_constant_array(expr, scalar, dtype):
    f = CASES[expr]
    rng = np.random.default_rng(0)
    x_np = rng.uniform(0.5, 2.0, (3, 4)).astype(dtype)
    g_np, t_np = rng.standard_normal((2, 3, 4)).astype(dtype)
    results = []
    for c in (scalar, ad.tensor(np.asarray(scalar, dtype=dtype))):
        x = ad.tensor(x_np, requires_grad=True)
        y = f(x, c)
        y.backward(g_np)
        _, tangent = ad.jvp(lambda v: f(v, c), (x_np,), (t_np,))
        results.append((y.data, x.grad, tangent))
    for got, want in zip(results[0], results[1]):
        assert got.dtype == want.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, want)


def test_scalar_is_not_a_tape_input():
    """x * c records one edge (to x) and keeps no array; c / x still keeps x and its output."""
    x = ad.tensor(np.ones(4, np.float32), requires_grad=True)
    for y in (x * 2.0, 2 * x, x + 1, 1 - x, x - 1.5, x / 4):
        assert len(y._node.edges) == 1 and ad.saved_bytes(y) == 0
    assert ad.saved_bytes(1.0 / x) > 0


def test_scalar_ops_in_a_trace():
    steps = ad.trace(lambda x: ((1 - x * 0.5) / 4 + 2).sum(), np.ones(3)).forward
    assert [s.formula for s in steps[:4]] == ["y1 = c x1", "y2 = c − y1", "y3 = y2 / c", "y4 = y3 + c"]


def test_parameter_with_a_scalar():
    """A Parameter (a Tensor subclass) takes the same one-edge path."""
    from gpuad import nn
    w = nn.Parameter(np.ones(3, np.float32))
    y = 0.5 * w
    assert len(y._node.edges) == 1 and y.dtype == np.float32
    ad.sum(y).backward()
    np.testing.assert_array_equal(w.grad, np.full(3, 0.5, np.float32))


def test_integer_tensor_with_a_scalar_keeps_numpy_promotion():
    """An integer tensor and a Python float: numpy's promotion (float64), through the general path."""
    y = ad.tensor(np.arange(3)) * 0.5
    assert y.dtype == np.float64 and y.data.tolist() == [0.0, 0.5, 1.0]
