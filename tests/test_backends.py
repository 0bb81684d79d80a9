"""The numpy <-> CuPy switch, kernel dispatch, DLPack bridges and backend parity."""
import sys

import numpy as np
import pytest

import gpuad as ad
from gpuad import backend as B


class FakeCupyArray:
    """Stands in for a CuPy array: only its module name matters to the backend check."""

    __module__ = "cupy._core.core"
    shape, dtype, ndim = (3,), np.dtype("float64"), 1


def test_unknown_backend_and_kernels_names():
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        ad.set_backend("jax")
    with pytest.raises(ValueError, match="unknown kernels 'cuda'"):
        ad.set_kernels("cuda")
    assert ad.get_backend() == "numpy" and ad.get_kernels() == "triton"


def test_missing_cupy_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy now raises ImportError
    with pytest.raises(RuntimeError, match=r"needs CuPy.*pip install \"gpuad\[gpu\]\""):
        ad.set_backend("cupy")
    with pytest.raises(RuntimeError, match="needs CuPy"):
        with ad.use_backend("cupy"):
            pass
    assert ad.get_backend() == "numpy"


def test_use_backend_restores_on_error(monkeypatch):
    monkeypatch.setattr(B, "_import_cupy", lambda: None)  # pretend CuPy and a device exist
    with pytest.raises(KeyError):
        with ad.use_backend("cupy"):
            assert ad.get_backend() == "cupy"
            raise KeyError("boom")
    assert ad.get_backend() == "numpy"


def test_mixed_backends_name_both():
    x = ad.tensor([1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="two backends in one op: numpy and cupy"):
        ad.add(x, FakeCupyArray())
    with pytest.raises(TypeError, match="numpy and cupy"):
        B.array_module(np.ones(2), FakeCupyArray())


def test_dispatch_numpy_uses_reference(monkeypatch):
    import gpuad.kernels.reference as reference

    assert B.kernel_module(np) is reference
    seen = []
    original = reference.linear_backward
    monkeypatch.setattr(reference, "linear_backward", lambda *a, **k: seen.append(k) or original(*a, **k))
    x = ad.tensor(np.random.randn(4, 3))  # an input that needs no gradient: no dX is computed
    W = ad.tensor(np.random.randn(2, 3), requires_grad=True)
    ad.sum(ad.linear(x, W)).backward()
    assert seen == [{"bias": False, "need_dx": False}]


def test_reductions_return_arrays_not_host_scalars(backend):
    x = ad.tensor(np.random.randn(3, 4))
    for y in (x.sum(), x.mean(), ad.sq_norm(x), ad.logsumexp(x.reshape(-1))):
        assert type(y.data) is type(x.data) and y.data.ndim == 0


def test_numpy_and_to(backend):
    x = ad.tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    assert isinstance(x.numpy(), np.ndarray)
    y = x.to("numpy")
    assert isinstance(y.data, np.ndarray)
    ad.sum(y * y).backward()  # the VJP of the copy comes back to x's backend
    assert type(x.grad) is type(x.data)
    np.testing.assert_allclose(B.to_host(x.grad), 2 * np.arange(6.0).reshape(2, 3))


def test_dlpack_with_torch_cpu_is_zero_copy():
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    x = ad.from_dlpack(t)
    assert isinstance(x.data, np.ndarray)
    t[0, 0] = 42.0
    assert x.data[0, 0] == 42.0  # shares memory
    back = torch.from_dlpack(ad.tensor(np.ones((2, 2), dtype=np.float32)))
    assert back.shape == (2, 2)
    y = ad.tensor(np.zeros(3))
    torch.from_dlpack(y)[1] = 5.0
    assert y.data[1] == 5.0


# --- GPU ------------------------------------------------------------------------------
@pytest.mark.gpu
def test_dlpack_cupy_torch_zero_copy():
    cupy = pytest.importorskip("cupy")
    torch = pytest.importorskip("torch")
    t = torch.randn(4, 5, device="cuda")
    x = ad.from_dlpack(t)
    assert isinstance(x.data, cupy.ndarray) and x.data.data.ptr == t.data_ptr()
    c = cupy.arange(4, dtype=cupy.float32)
    with ad.use_backend("cupy"):
        x = ad.from_dlpack(c)
        assert torch.from_dlpack(x).data_ptr() == c.data.ptr


@pytest.mark.gpu
def test_to_cupy_and_back_is_differentiable():
    pytest.importorskip("cupy")
    x = ad.tensor(np.random.randn(3, 2), requires_grad=True)
    y = x.to("cupy")
    assert y.backend == "cupy"
    ad.sum(ad.exp(y)).to("numpy").backward()
    assert isinstance(x.grad, np.ndarray)
    np.testing.assert_allclose(x.grad, np.exp(x.data), rtol=1e-12)


def mlp_loss_and_grads(backend_name, dtype, params, xs, ts, kernels="triton"):
    """One MLP forward/backward with cross-entropy on `backend_name`; host float64 results."""
    ad.set_kernels(kernels)
    with ad.use_backend(backend_name):
        P = [ad.tensor(p, dtype=dtype, requires_grad=True) for p in params]
        x, t = ad.tensor(xs, dtype=dtype), ad.tensor(ts)
        h = ad.gelu(ad.linear(x, P[0], P[1]))
        loss = ad.softmax_cross_entropy(ad.linear(h, P[2], P[3]), t, label_smoothing=0.05)
        loss.backward()
        return [float(loss.numpy())] + [B.to_host(p.grad).astype(np.float64) for p in P]


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["triton", "cupy"])
@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_mlp_parity_numpy_vs_cupy(kernels, dtype, rtol):
    pytest.importorskip("cupy")
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        dtype = ml_dtypes.bfloat16
    rng = np.random.default_rng(0)
    params = [rng.standard_normal((64, 32)) * 0.2, rng.standard_normal(64) * 0.1,
              rng.standard_normal((10, 64)) * 0.2, rng.standard_normal(10) * 0.1]
    xs, ts = rng.standard_normal((128, 32)), rng.integers(0, 10, 128)
    ts[::7] = -100
    if dtype != "float32":  # the float64 reference sees the same rounded inputs
        params = [p.astype(dtype).astype(np.float64) for p in params]
        xs = xs.astype(dtype).astype(np.float64)
    ref = mlp_loss_and_grads("numpy", np.float64, params, xs, ts)
    got = mlp_loss_and_grads("cupy", dtype, params, xs, ts, kernels)
    ad.set_kernels("triton")
    np.testing.assert_allclose(got[0], ref[0], rtol=rtol)
    for g, r in zip(got[1:], ref[1:]):
        assert np.linalg.norm(g - r) <= rtol * np.linalg.norm(r)
