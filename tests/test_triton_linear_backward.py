"""The fused Triton linear backward (dx, dw, db in one launch) against the float64 reference.

CPU tests run the real kernel under the Triton interpreter (small odd shapes, fp32/fp16);
GPU tests (marker `gpu`) run real sizes, bf16 included, and CuPy arrays."""
import importlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from gpuad.kernels import reference  # noqa: E402
from gpuad.kernels.triton import linear_backward  # noqa: E402

# the module itself (the package re-exports the function under the same name)
lb_module = importlib.import_module("gpuad.kernels.triton.linear_backward")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 5e-3}
TF32_TOL = 5e-3
SHAPES = [((33,), 70, 45), ((1,), 3, 2), ((2, 5), 17, 9), ((64,), 64, 64)]  # (leading, K, N)


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _make(lead, k, n, dtype, seed=0, device=None, w_transposed=False):
    """Random x [*lead, K], w [N, K] (optionally a transposed view), dy [*lead, N]; never zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g)
    dy = torch.randn(*lead, n, generator=g)
    if w_transposed:
        w = torch.randn(k, n, generator=g).to(dtype).to(device or _device()).T  # strides (1, N)
    else:
        w = torch.randn(n, k, generator=g).to(dtype).to(device or _device())
    return x.to(dtype).to(device or _device()), w, dy.to(dtype).to(device or _device())


def _ref(x, w, dy, **kw):
    """Reference on float64 numpy copies of the same (already rounded) inputs."""
    f64 = [a.detach().cpu().double().numpy() for a in (x, w, dy)]
    return reference.linear_backward(*f64, **kw)


def _rel(out, ref):
    out = out.detach().cpu().double().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    assert out.shape == ref.shape
    assert np.isfinite(out).all()
    denom = np.linalg.norm(ref)
    return np.linalg.norm(out - ref) / (denom if denom > 0 else 1.0)


def _check(got, ref, tol):
    for name, g, r in zip(("dx", "dw", "db"), got, ref):
        if r is None:
            assert g is None, name
            continue
        assert _rel(g, r) < tol, (name, _rel(g, r))


# ------------------------------------------------------------------ CPU (interpreter) and GPU alike

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead,k,n", SHAPES, ids=lambda v: str(v))
def test_matches_reference(dtype, lead, k, n):
    x, w, dy = _make(lead, k, n, dtype)
    copies = [a.clone() for a in (x, w, dy)]
    dx, dw, db = linear_backward(x, w, dy)
    for a, c in zip((x, w, dy), copies):  # inputs untouched
        assert torch.equal(a, c)
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == (n,)
    assert dx.dtype == dw.dtype == db.dtype == dtype
    _check((dx, dw, db), _ref(x, w, dy), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_transposed_w_and_strided_inputs(dtype):
    x, w, dy = _make((37,), 21, 19, dtype, seed=1, w_transposed=True)
    assert not w.is_contiguous()
    xs = torch.randn(37, 42).to(dtype).to(x.device)[:, ::2]    # column stride 2
    dys = torch.randn(19, 37).to(dtype).to(x.device).T          # dy itself transposed
    for xx, dd in ((x, dy), (xs, dys)):
        got = linear_backward(xx, w, dd)
        _check(got, _ref(xx, w, dd), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_no_bias_and_no_dx(dtype):
    x, w, dy = _make((2, 5), 17, 9, dtype, seed=2)
    ref = _ref(x, w, dy, bias=False)
    dx, dw, db = linear_backward(x, w, dy, bias=False)
    assert db is None
    _check((dx, dw, db), ref, TOL[dtype])
    dx, dw, db = linear_backward(x, w, dy, need_dx=False)
    assert dx is None
    _check((dx, dw, db), _ref(x, w, dy, need_dx=False), TOL[dtype])
    dx, dw, db = linear_backward(x, w, dy, need_dx=False, bias=False)
    assert dx is None and db is None
    assert _rel(dw, ref[1]) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_dw_accumulate(dtype):
    x, w, dy = _make((33,), 70, 45, dtype, seed=3)
    buf = torch.randn(45, 70, generator=torch.Generator().manual_seed(9)).to(x.device)
    old = buf.clone()
    dx, dw, db = linear_backward(x, w, dy, dw_accumulate=buf)
    assert dw is buf and dw.dtype == torch.float32
    _, rw, _ = _ref(x, w, dy)
    assert _rel(dw, old.double().cpu().numpy() + rw) < 1e-5
    assert _rel(dw - old, rw) < 2e-5
    rx, _, rb = _ref(x, w, dy)
    assert _rel(dx, rx) < TOL[dtype] and _rel(db, rb) < TOL[dtype]


def test_allow_tf32_accepted():
    x, w, dy = _make((33,), 70, 45, torch.float32, seed=4)
    _check(linear_backward(x, w, dy, allow_tf32=True), _ref(x, w, dy), TF32_TOL)


def test_deterministic():
    x, w, dy = _make((33,), 70, 45, torch.float32, seed=5)
    a = linear_backward(x, w, dy)
    b = linear_backward(x, w, dy)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_int64_offsets_path(monkeypatch):
    """Force the 64-bit offset specialisation (real triggers need > 2**31 elements)."""
    monkeypatch.setattr(lb_module, "_max_offset", lambda t: 2**31)
    x, w, dy = _make((2, 5), 17, 9, torch.float32, seed=6)
    _check(linear_backward(x, w, dy), _ref(x, w, dy), TOL[torch.float32])


def test_empty_leading_dims():
    x, w, dy = _make((0,), 5, 3, torch.float32)
    dx, dw, db = linear_backward(x, w, dy)
    assert dx.shape == (0, 5) and torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))


# ------------------------------------------------------------------ routes: fused / cublas / auto

@pytest.fixture
def launched(monkeypatch):
    """The routes launched during the test, in order (the launchers still run)."""
    names = []
    for name in ("fused", "cublas"):
        real = getattr(lb_module, f"_launch_{name}")
        monkeypatch.setattr(lb_module, f"_launch_{name}",
                            lambda *a, real=real, name=name: names.append(name) or real(*a))
    return names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead,k,n", SHAPES, ids=lambda v: str(v))
def test_cublas_route_matches_reference(launched, dtype, lead, k, n):
    x, w, dy = _make(lead, k, n, dtype, seed=20)
    copies = [a.clone() for a in (x, w, dy)]
    got = linear_backward(x, w, dy, route="cublas")
    assert launched == ["cublas"]
    for a, c in zip((x, w, dy), copies):
        assert torch.equal(a, c)
    assert all(t.dtype == dtype for t in got)
    _check(got, _ref(x, w, dy), TOL[dtype])
    dx, dw, db = linear_backward(x, w, dy, route="cublas", need_dx=False, bias=False)
    assert dx is None and db is None
    assert _rel(dw, _ref(x, w, dy)[1]) < TOL[dtype]


def test_cublas_route_transposed_w_and_fp32_accumulate(launched):
    x, w, dy = _make((37,), 21, 19, torch.float32, seed=21, w_transposed=True)
    buf = torch.randn(19, 21, generator=torch.Generator().manual_seed(22)).to(x.device)
    old = buf.clone()
    dx, dw, db = linear_backward(x, w, dy, dw_accumulate=buf, route="cublas")
    assert launched == ["cublas"]
    rx, rw, rb = _ref(x, w, dy)
    assert dw is buf
    assert _rel(dw - old, rw) < 2e-5
    assert _rel(dx, rx) < TOL[torch.float32] and _rel(db, rb) < TOL[torch.float32]


def test_cublas_route_refuses_16_bit_accumulate_and_bad_route():
    x, w, dy = _make((5,), 6, 3, torch.float16, seed=23)
    buf = torch.zeros(3, 6, device=x.device)
    with pytest.raises(ValueError, match="route='cublas'.*float16"):
        linear_backward(x, w, dy, dw_accumulate=buf, route="cublas")
    assert torch.equal(buf, torch.zeros_like(buf)), "the buffer was touched before the error"
    with pytest.raises(ValueError, match="route must be one of"):
        linear_backward(x, w, dy, route="cuBLAS")


def test_auto_route_takes_the_fused_kernel_when_not_measuring(monkeypatch, launched):
    """Nothing is measured under the interpreter, nor on a GPU with GPUAD_TRITON_AUTOTUNE=0."""
    monkeypatch.setenv("GPUAD_TRITON_AUTOTUNE", "0")
    x, w, dy = _make((33,), 70, 45, torch.float32, seed=24)
    before = lb_module.route_choices()
    _check(linear_backward(x, w, dy), _ref(x, w, dy), TOL[torch.float32])
    assert launched == ["fused"] and lb_module.route_choices() == before


def test_faster_route_warms_each_launcher_then_keeps_the_fastest(monkeypatch):
    import triton.testing
    calls = []
    medians = {"fused": 0.30, "cublas": 0.20}

    def fake_do_bench(fn, warmup, rep, return_mode):
        assert return_mode == "median"
        name = fn()
        return medians[name]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    launchers = {name: (lambda name=name: calls.append(name) or name) for name in medians}
    best, times = lb_module._faster_route(launchers)
    assert best == "cublas" and times == medians
    assert calls == ["fused", "fused", "cublas", "cublas"], "each launcher runs once before it is timed"


def test_pinned_matmul_precision_sets_and_restores():
    mm = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(mm, "fp32_precision") else "allow_tf32"
    before = (getattr(mm, name), mm.allow_fp16_reduced_precision_reduction,
              mm.allow_bf16_reduced_precision_reduction)
    for allow_tf32, inside in ((False, ("ieee", False)), (True, ("tf32", True))):
        with pytest.raises(RuntimeError, match="boom"):
            with lb_module._pinned_matmul_precision(allow_tf32):
                assert getattr(mm, name) in inside
                assert not mm.allow_fp16_reduced_precision_reduction
                assert not mm.allow_bf16_reduced_precision_reduction
                raise RuntimeError("boom")
        after = (getattr(mm, name), mm.allow_fp16_reduced_precision_reduction,
                 mm.allow_bf16_reduced_precision_reduction)
        assert after == before


# ------------------------------------------------------------------ bad input

def _bad_cases():
    dev = _device()
    f32 = dict(dtype=torch.float32, device=dev)
    x, w, dy = torch.randn(4, 6, **f32), torch.randn(3, 6, **f32), torch.randn(4, 3, **f32)
    return [
        ("mismatched K", (torch.randn(4, 7, **f32), w, dy), {}, r"\(4, 7\).*\(3, 6\)"),
        ("mismatched N", (x, w, torch.randn(4, 5, **f32)), {}, r"\(4, 5\).*\(3, 6\)"),
        ("w rank 1", (x, torch.randn(6, **f32), dy), {}, r"\(6,\)"),
        ("w rank 3", (x, torch.randn(1, 3, 6, **f32), dy), {}, r"\(1, 3, 6\)"),
        ("x rank 0", (torch.tensor(1.0, **f32), w, dy), {}, r"\(\)"),
        ("leading axes", (torch.randn(5, 6, **f32), w, dy), {}, r"\(5, 6\).*\(4, 3\)"),
        ("mixed dtypes", (x.half(), w, dy), {}, r"float16.*float32"),
        ("float64", (x.double(), w.double(), dy.double()), {}, r"float64"),
        ("acc shape", (x, w, dy), {"dw_accumulate": torch.zeros(6, 3, **f32)}, r"\(3, 6\).*\(6, 3\)"),
        ("acc dtype", (x, w, dy), {"dw_accumulate": torch.zeros(3, 6, dtype=torch.float16, device=dev)},
         r"float16"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input(case):
    _, args, kw, pattern = case
    with pytest.raises(ValueError, match=pattern):
        linear_backward(*args, **kw)


# ------------------------------------------------------------------ GPU: real sizes, bf16, CuPy
# Most GPU tests launch the fixed default config (GPUAD_TRITON_AUTOTUNE=0) to stay quick;
# test_gpu_autotune_accumulate runs the autotuner once.

@pytest.fixture
def fixed_config(monkeypatch):
    monkeypatch.setenv("GPUAD_TRITON_AUTOTUNE", "0")


def _ref_gpu(x, w, dy, bias=True, need_dx=True):
    """float64 reference computed on the GPU (torch), from the same rounded inputs."""
    n, k = w.shape
    x2, dy2, w64 = x.reshape(-1, k).double(), dy.reshape(-1, n).double(), w.double()
    dx = (dy2 @ w64).reshape(x.shape) if need_dx else None
    return dx, dy2.T @ x2, (dy2.sum(0) if bias else None)


def _rel_gpu(out, ref):
    assert out.shape == ref.shape
    assert bool(torch.isfinite(out).all())
    return float(torch.linalg.norm(out.double() - ref) / torch.linalg.norm(ref))


def _check_gpu(got, ref, tol):
    for name, g, r in zip(("dx", "dw", "db"), got, ref):
        if r is None:
            assert g is None, name
        else:
            assert _rel_gpu(g, r) < tol, (name, _rel_gpu(g, r))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tf32,lead,k,n", [
    (torch.float32, False, (4096,), 1024, 1024),
    (torch.float32, True, (4096,), 1024, 1024),
    (torch.bfloat16, False, (2048,), 4096, 4096),
    (torch.float16, False, (2048,), 4096, 4096),
    (torch.bfloat16, False, (8, 257), 1024, 768),   # 3-D x, M not a multiple of the tile
    (torch.float16, False, (1,), 1000, 333),        # one row, odd sizes
], ids=["fp32", "tf32", "bf16", "fp16", "bf16-3d", "fp16-m1"])
def test_gpu_real_sizes(fixed_config, dtype, tf32, lead, k, n):
    x, w, dy = _make(lead, k, n, dtype, seed=10, device="cuda")
    copies = [a.clone() for a in (x, w, dy)]
    got = linear_backward(x, w, dy, allow_tf32=tf32)
    for a, c in zip((x, w, dy), copies):
        assert torch.equal(a, c)
    _check_gpu(got, _ref_gpu(x, w, dy), TF32_TOL if tf32 else TOL[dtype])
    again = linear_backward(x, w, dy, allow_tf32=tf32)  # same bits on a second run
    for u, v in zip(got, again):
        assert torch.equal(u, v)


@pytest.mark.gpu
def test_gpu_autotune_accumulate(monkeypatch):
    """The first call on a shape autotunes (each config runs): the buffer must still receive
    dyᵀx exactly once. Transposed w, no dx; the cached config then gives the same bits."""
    monkeypatch.setenv("GPUAD_TRITON_AUTOTUNE", "1")
    x, w, dy = _make((4096,), 1024, 2048, torch.bfloat16, seed=11, device="cuda", w_transposed=True)
    buf = torch.randn(2048, 1024, device="cuda")
    old = buf.clone()
    dx, dw, db = linear_backward(x, w, dy, dw_accumulate=buf, need_dx=False)
    ref = _ref_gpu(x, w, dy, need_dx=False)
    assert dx is None and dw is buf
    assert _rel_gpu(dw - old, ref[1]) < 1e-4
    assert _rel_gpu(db, ref[2]) < TOL[torch.bfloat16]
    buf2 = old.clone()
    linear_backward(x, w, dy, dw_accumulate=buf2, need_dx=False)
    assert torch.equal(buf, buf2)


@pytest.mark.gpu
def test_gpu_transposed_w_with_dx(fixed_config):
    x, w, dy = _make((4096,), 1024, 2048, torch.bfloat16, seed=11, device="cuda", w_transposed=True)
    _check_gpu(linear_backward(x, w, dy), _ref_gpu(x, w, dy), TOL[torch.bfloat16])


@pytest.mark.gpu
def test_gpu_cupy_in_cupy_out(fixed_config):
    cupy = pytest.importorskip("cupy")
    x, w, dy = _make((512,), 256, 384, torch.float16, seed=12, device="cuda")
    xc, wc, dyc = (cupy.from_dlpack(a) for a in (x, w, dy))
    buf = cupy.zeros((384, 256), dtype=cupy.float32)
    dx, dw, db = linear_backward(xc, wc, dyc, dw_accumulate=buf)
    assert isinstance(dx, cupy.ndarray) and isinstance(db, cupy.ndarray) and dw is buf
    ref = _ref_gpu(x, w, dy)
    _check_gpu((torch.from_dlpack(dx), torch.from_dlpack(dw), torch.from_dlpack(db)), ref, TOL[torch.float16])
    dx2, dw2, _ = linear_backward(xc, wc, dyc)
    assert isinstance(dw2, cupy.ndarray) and dw2.dtype == cupy.float16
    with pytest.raises(ValueError, match="torch tensors or all CuPy"):
        linear_backward(x, wc, dyc)


def _poison(*shapes_dtypes):
    """Leave NaN-filled blocks in torch's caching allocator: outputs of those sizes are likely to
    reuse them, so an element a route fails to write shows up as NaN."""
    for shape, dtype in shapes_dtypes:
        torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("route", ["fused", "cublas"])
@pytest.mark.parametrize("dtype,tf32", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False),
                                        (torch.float16, False)], ids=["fp32", "tf32", "bf16", "fp16"])
def test_gpu_routes_write_everything_and_repeat_bits(fixed_config, launched, route, dtype, tf32):
    lead, k, n = (1000,), 768, 1536  # no dimension a multiple of 128 × 3
    x, w, dy = _make(lead, k, n, dtype, seed=30, device="cuda")
    _poison(((1000, 768), dtype), ((1536, 768), dtype), ((1536,), dtype))
    got = linear_backward(x, w, dy, allow_tf32=tf32, route=route)
    assert launched == [route]
    _check_gpu(got, _ref_gpu(x, w, dy), TF32_TOL if tf32 else TOL[dtype])
    again = linear_backward(x, w, dy, allow_tf32=tf32, route=route)
    for u, v in zip(got, again):
        assert torch.equal(u, v)


@pytest.mark.gpu
def test_gpu_auto_route_measures_once_and_accumulates_once(monkeypatch):
    """route="auto" with autotuning on: the first call times both routes on scratch outputs and
    records the choice; the caller's fp32 buffer still receives dyᵀx exactly once."""
    monkeypatch.setenv("GPUAD_TRITON_AUTOTUNE", "1")
    x, w, dy = _make((512,), 384, 640, torch.float32, seed=31, device="cuda")
    buf = torch.randn(640, 384, device="cuda")
    old = buf.clone()
    before = set(lb_module.route_choices())
    dx, dw, db = linear_backward(x, w, dy, dw_accumulate=buf)
    new = set(lb_module.route_choices()) - before
    assert len(new) == 1, "one problem, one measurement"
    route, times = lb_module.route_choices()[new.pop()]
    assert route in ("fused", "cublas") and set(times) == {"fused", "cublas"}
    assert all(t > 0 for t in times.values()) and times[route] == min(times.values())
    ref = _ref_gpu(x, w, dy)
    assert _rel_gpu(dw - old, ref[1]) < 1e-5
    _check_gpu((dx, None, db), (ref[0], None, ref[2]), TOL[torch.float32])
    linear_backward(x, w, dy, dw_accumulate=buf)  # cached: no new measurement
    assert len(lb_module.route_choices()) == len(before) + 1
