"""The fused Triton linear backward (dx, dw, db in one launch) against the float64 reference.

CPU tests run the real kernel under the Triton interpreter (small odd shapes, fp32/fp16), over
every tile and split variant the launcher can pick; GPU tests (marker `gpu`) run real sizes,
bf16 included, the split paths and CuPy arrays. Also here: the launch geometry (pure functions),
the plan cache, the per-call Python cost with the launch stubbed, and zero-size problems."""
import importlib
import math
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from gpuad.kernels import reference, tuning  # noqa: E402
from gpuad.kernels.triton import linear_backward  # noqa: E402

# the module itself (the package re-exports the function under the same name)
lb_module = importlib.import_module("gpuad.kernels.triton.linear_backward")
lb_kernel = importlib.import_module("gpuad.kernels.triton.linear_backward_kernel")
lb_plan = importlib.import_module("gpuad.kernels.triton.linear_backward_plan")
precision = importlib.import_module("gpuad.kernels.triton.precision")
OP = lb_module.OP
INTERPRET = lb_plan.INTERPRETED

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 5e-3}
TF32_TOL = 5e-3
SHAPES = [((33,), 70, 45), ((1,), 3, 2), ((2, 5), 17, 9), ((64,), 64, 64)]  # (leading, K, N)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
TILE_PARAM = {torch.float32: "tile_fp32", torch.float16: "tile_16bit", torch.bfloat16: "tile_16bit"}


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


@pytest.fixture
def fresh_plans():
    """No plan from an earlier test (their keys do not see monkeypatched module functions)."""
    lb_module.clear_plans()
    yield
    lb_module.clear_plans()


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """torch.empty hands out NaN-filled floating tensors while the test runs, so an output (or
    workspace) element the kernel fails to write before reading shows up as NaN."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", empty)


def _counters_are_reset():
    return all(int(cnt.count_nonzero()) == 0 for _, cnt in lb_plan._workspaces.values())


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


# Every variant the launcher can pick: (tile name, or None for the default, split_dw, split_dx).
# The interpreter's small default tile runs each split combination (dW only, dX only, both; no
# split is what every other test runs) on small shapes with the flags varied; each real tile runs
# once, split in both families, on shapes just large enough for that.
SPLIT_VARIANTS = [(None, 2, 1), (None, 1, 4), (None, 4, 2)]
TILE_VARIANTS = [(t.name, 2, 2) for t in lb_module.TILES]


def _variant_cases():
    out = []
    for tile, sw, sx in SPLIT_VARIANTS + TILE_VARIANTS:
        sizes = (2, 4) if tile is None else next(t.sizes for t in lb_module.TILES if t.name == tile)
        for dtype in (torch.float32, torch.float16):
            if dtype.itemsize in sizes:
                out.append(pytest.param(tile, sw, sx, dtype, id=f"{tile or 'default'}-split{sw}x{sx}-"
                                                                f"{DTYPE_IDS[dtype]}"))
    return out


@pytest.fixture
def variant_override():
    """tuning.override(...) for a (tile, split_dw, split_dx, dtype) variant."""
    def make(tile, sw, sx, dtype):
        params = dict(split_dw=sw, split_dx=sx)
        if tile is not None:
            params[TILE_PARAM[dtype]] = tile
        return tuning.override(OP, **params)
    return make


@pytest.mark.parametrize("tile,sw,sx,dtype", [c for c in _variant_cases() if c.values[0] is None])
def test_split_variants_match_reference(poisoned_outputs, variant_override, tile, sw, sx, dtype):
    """The default tile with each split: a 3-D x with a transposed w; strided x, transposed dy and
    dw_accumulate without dx or db; M = 1. Outputs and workspace poisoned; counters back at 0."""
    with variant_override(tile, sw, sx, dtype):
        x, w, dy = _make((3, 11), 21, 37, dtype, seed=1, w_transposed=True)  # M = 33: 3 steps of 16
        assert lb_module.plan_name(x, w, dy, route="fused").endswith(f"split {min(sw, 3)}x{min(sx, 3)}")
        _check(linear_backward(x, w, dy, route="fused"), _ref(x, w, dy), TOL[dtype])
        assert _counters_are_reset()

        xs = torch.randn(33, 42).to(dtype)[:, ::2]   # column stride 2
        dys = torch.randn(37, 33).to(dtype).T        # dy itself transposed
        buf = torch.randn(37, 21)
        old = buf.clone()
        dx, dw, db = linear_backward(xs, w, dys, dw_accumulate=buf, need_dx=False, bias=False, route="fused")
        assert dx is None and db is None and dw is buf
        assert _rel(dw - old, _ref(xs, w, dys)[1]) < 2e-5

        x1, dy1 = x[:1, :1], dy[:1, :1]  # M = 1: only dX can split
        _check(linear_backward(x1, w, dy1, route="fused"), _ref(x1, w, dy1), TOL[dtype])
        assert _counters_are_reset()


def test_split_bits_do_not_depend_on_the_grid():
    """A tile's sums run in an order fixed by its chunks alone: the same bits on every run and
    with twice the programs (another partition, other programs arriving last)."""
    x, w, dy = _make((33,), 21, 37, torch.float32, seed=5)
    with tuning.override(OP, split_dw=2, split_dx=2):
        a = linear_backward(x, w, dy, route="fused")
        b = linear_backward(x, w, dy, route="fused")
        with tuning.override(OP, programs_per_sm=2):
            c = linear_backward(x, w, dy, route="fused")
    _check(a, _ref(x, w, dy), TOL[torch.float32])
    for u, v, t in zip(a, b, c):
        assert torch.equal(u, v) and torch.equal(u, t)


@pytest.mark.parametrize("tile,sw,sx,dtype", [c for c in _variant_cases() if c.values[0] is not None])
def test_tile_variants_match_reference(poisoned_outputs, variant_override, tile, sw, sx, dtype):
    """Each real tile, split in both families: transposed w, transposed dy, 3-D x, bias and
    dw_accumulate on, outputs poisoned."""
    t = next(t for t in lb_module.TILES if t.name == tile)
    m, n = 2 * t.block_red + 3, 2 * t.block_red + 5  # two steps and a ragged third in each family
    x, w, dy = _make((1, m), 37, n, dtype, seed=2, w_transposed=True)
    dy = dy.reshape(m, n).T.contiguous().T.reshape(1, m, n)  # a transposed view inside a 3-D view
    buf = torch.randn(n, 37)
    old = buf.clone()
    with variant_override(tile, sw, sx, dtype):
        assert lb_module.plan_name(x, w, dy, dw_accumulate=buf, route="fused") == f"fused {tile} split 2x2"
        dx, dw, db = linear_backward(x, w, dy, dw_accumulate=buf, route="fused")
    rx, rw, rb = _ref(x, w, dy)
    assert dw is buf and _rel(dw - old, rw) < 2e-5
    assert _rel(dx, rx) < TOL[dtype] and _rel(db, rb) < TOL[dtype]
    assert _counters_are_reset()


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


@pytest.mark.parametrize("splits", [(1, 1), (2, 4)], ids=["no-split", "split"])
def test_int64_offsets_path(fresh_plans, monkeypatch, splits):
    """Force the 64-bit offset specialisation (real triggers need > 2**31 elements)."""
    monkeypatch.setattr(lb_plan, "_max_offset", lambda t: 2**31)
    x, w, dy = _make((2, 17), 17, 64, torch.float32, seed=6)  # 3 steps over M, 4 over N
    with tuning.override(OP, split_dw=splits[0], split_dx=splits[1]):
        plan = lb_plan.plan_for(x, w, dy, True, None, True, False, "fused")[0]
        assert plan.meta["INT64"] and plan.name.endswith(f"split {splits[0]}x{splits[1]}")
        _check(linear_backward(x, w, dy, route="fused"), _ref(x, w, dy), TOL[torch.float32])


def test_workspace_grows_and_keeps_what_it_outgrew(fresh_plans):
    """A larger split problem gets a larger workspace; the old one stays referenced (a captured
    CUDA graph may point at it), and the counters of both are 0 after the calls."""
    lb_plan._workspaces.clear()
    before = len(lb_plan._outgrown)
    with tuning.override(OP, split_dw=2, split_dx=2):
        small = _make((33,), 5, 4, torch.float32, seed=7)
        big = _make((40,), 21, 37, torch.float32, seed=8)
        _check(linear_backward(*small, route="fused"), _ref(*small), TOL[torch.float32])
        (ws_small, _), = lb_plan._workspaces.values()
        _check(linear_backward(*big, route="fused"), _ref(*big), TOL[torch.float32])
    (ws_big, _), = lb_plan._workspaces.values()
    assert ws_big.numel() > ws_small.numel()
    assert any(ws is ws_small for ws, _ in lb_plan._outgrown[before:])
    assert _counters_are_reset()


# ------------------------------------------------------------------ zero sizes: M, N or K = 0

@pytest.mark.parametrize("route", lb_module.ROUTES)
@pytest.mark.parametrize("m,k,n", [(0, 5, 3), (4, 0, 3), (4, 5, 0), (0, 0, 0), (4, 0, 0), (0, 5, 0)])
def test_zero_sizes_match_torch_autograd(poisoned_outputs, route, m, k, n):
    """M, N or K = 0 give what torch's autograd gives: zeros for the empty sums (db still sums dy
    when only K is 0); the reference agrees; dw_accumulate is left as it was."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(m, k, generator=g, requires_grad=True)
    w = torch.randn(n, k, generator=g, requires_grad=True)
    b = torch.randn(n, generator=g, requires_grad=True)
    dy = torch.randn(m, n, generator=g)
    torch.nn.functional.linear(x, w, b).backward(dy)
    dev = _device()
    xd, wd, dyd = (t.detach().to(dev) for t in (x, w, dy))
    got = linear_backward(xd, wd, dyd, route=route)
    assert lb_module.plan_name(xd, wd, dyd, route=route) == "empty"
    for name, g_, want in zip(("dx", "dw", "db"), got, (x.grad, w.grad, b.grad)):
        assert g_.shape == want.shape and g_.dtype == want.dtype, name
        assert torch.allclose(g_.cpu(), want, atol=1e-6), name
    ref = reference.linear_backward(x.detach().numpy(), w.detach().numpy(), dy.numpy())
    for name, r, want in zip(("dx", "dw", "db"), ref, (x.grad, w.grad, b.grad)):
        assert r.shape == tuple(want.shape) and np.allclose(r, want.numpy(), atol=1e-6), name
    buf = torch.randn(n, k, generator=g).to(dev)
    old = buf.clone()
    dx, dw, db = linear_backward(xd, wd, dyd, dw_accumulate=buf, need_dx=False, route=route)
    assert dx is None and dw is buf and torch.equal(buf, old)
    assert torch.allclose(db.cpu(), b.grad, atol=1e-6)


def test_empty_leading_dims():
    x, w, dy = _make((0,), 5, 3, torch.float32)
    dx, dw, db = linear_backward(x, w, dy)
    assert dx.shape == (0, 5) and torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))
    x3, dy3 = x.reshape(2, 0, 5), dy.reshape(2, 0, 3)
    dx, dw, db = linear_backward(x3, w, dy3)
    assert dx.shape == (2, 0, 5) and not dw.any() and not db.any()


# ------------------------------------------------------------------ bf16 under the interpreter: refused, or cuBLAS

@pytest.mark.skipif(not INTERPRET, reason="the interpreter's limit")
def test_interpreter_refuses_bf16_fused_and_auto_takes_torch():
    x, w, dy = _make((9,), 7, 5, torch.bfloat16, seed=12)
    with pytest.raises(NotImplementedError, match="bfloat16.*interpreter"):
        linear_backward(x, w, dy, route="fused")
    assert lb_module.plan_name(x, w, dy) == "cublas"
    _check(linear_backward(x, w, dy), _ref(x, w, dy), 1e-2)
    with pytest.raises(NotImplementedError, match="bfloat16.*dw_accumulate.*interpreter"):
        linear_backward(x, w, dy, dw_accumulate=torch.zeros(5, 7))


# ------------------------------------------------------------------ launch geometry (pure functions)

H100_SMS = 132
TILE_16 = lb_module.tiles_for(2)[0]
TILE_32 = lb_module.tiles_for(4)[0]


@pytest.mark.parametrize("m,k,n,tile,need_dx,want", [
    (65536, 1024, 1024, TILE_16, True, (1, 1)),     # 64 dW programs of 1024 steps against 68 dX programs
    (65536, 1024, 1024, TILE_16, False, (2, 1)),    # dW alone: 64 tiles for 132 SMs
    (256, 1024, 1024, TILE_16, True, (1, 4)),       # dX: 16 tiles of 16 steps over N
    (64, 512, 512, TILE_32, True, (1, 8)),          # dX: 8 tiles of 16 steps over N
    (8192, 4096, 4096, TILE_16, True, (1, 1)),      # enough tiles: no split
    (16384, 4096, 14336, TILE_16, True, (1, 1)),
    (4096, 1024, 1024, TILE_32, True, (1, 1)),
], ids=["65536x1024x1024", "65536-no-dx", "256x1024x1024", "64x512x512", "8192x4096x4096",
        "16384x4096x14336", "4096x1024x1024"])
def test_split_factors_at_the_design_shapes(m, k, n, tile, need_dx, want):
    assert lb_module.split_factors(m, n, k, tile, H100_SMS, need_dx) == want
    chosen = lb_module.geometry(m, n, k, tile, want, H100_SMS, need_dx, True)
    unsplit = lb_module.geometry(m, n, k, tile, (1, 1), H100_SMS, need_dx, True)
    assert chosen.makespan <= unsplit.makespan
    if want != (1, 1):
        assert chosen.makespan < unsplit.makespan


def test_partition_is_the_best_split_of_the_programs():
    rng = np.random.default_rng(3)
    for _ in range(3000):
        units_w, units_x, cost_w, cost_x = (int(v) for v in rng.integers(1, 400, size=4))
        grid = min(int(rng.integers(2, 300)), units_w + units_x)
        if grid < 2:
            continue
        p, t = lb_kernel._partition(grid, units_w, cost_w, units_x, cost_x)
        each = {q: max(-(-units_w // q) * cost_w, -(-units_x // (grid - q)) * cost_x)
                for q in range(max(1, grid - units_x), min(units_w, grid - 1) + 1)}
        assert t == each[p] == min(each.values())


def _units(m, n, k, tile, g, need_dx):
    tiles_c = -(-k // tile.block_c)
    return (g.splits_w * -(-n // tile.block_r) * tiles_c,
            g.splits_x * -(-m // tile.block_r) * tiles_c if need_dx else 0)


@pytest.mark.parametrize("seed", range(4))
def test_geometry_invariants(seed):
    """Over random problems and splits: chunks are whole steps and none is empty, both families get
    programs, no program of a family is left without a unit, the workspace regions do not overlap."""
    rng = np.random.default_rng(seed)
    for _ in range(300):
        m, n, k = (int(v) for v in rng.integers(1, 5000, size=3))
        tile = lb_module.TILES[int(rng.integers(len(lb_module.TILES)))]
        need_dx, bias = bool(rng.integers(2)), bool(rng.integers(2))
        asked = (int(rng.choice(lb_module.SPLITS_DW)), int(rng.choice(lb_module.SPLITS_DX)))
        programs = int(rng.integers(1, 300))
        g = lb_module.geometry(m, n, k, tile, asked, programs, need_dx, bias)
        for red, s, chunk, ask in ((m, g.splits_w, g.chunk_w, asked[0]), (n, g.splits_x, g.chunk_x, asked[1])):
            if red is n and not need_dx:
                continue
            assert chunk % tile.block_red == 0 and 1 <= s <= ask
            assert (s - 1) * chunk < red <= s * chunk, "an empty or a missing chunk"
        units_w, units_x = _units(m, n, k, tile, g, need_dx)
        assert 1 <= g.grid <= max(programs, 2)
        if need_dx:
            assert 1 <= g.p_dw <= units_w and 1 <= g.grid - g.p_dw <= units_x
        else:
            assert g.p_dw == g.grid <= units_w
        split_w, split_x = g.splits_w > 1, need_dx and g.splits_x > 1
        tiles_c = -(-k // tile.block_c)
        assert g.ws_db_off == (g.splits_w * n * k if split_w else 0)
        assert g.ws_dx_off - g.ws_db_off == (g.splits_w * n if split_w and bias else 0)
        assert g.ws_elems - g.ws_dx_off == (g.splits_x * m * k if split_x else 0)
        assert g.cnt_db_off == (-(-n // tile.block_r) * tiles_c if split_w else 0)
        assert g.cnt_elems - g.cnt_dx_off == (-(-m // tile.block_r) * tiles_c if split_x else 0)


def test_auto_split_is_timed_against_no_split():
    """With measuring on, split "auto" offers the heuristic's split and no split, for every tile of
    the element size; without measuring, the default tile and the heuristic only."""
    prob = lb_plan._Problem(256, 1024, 1024, torch.bfloat16, torch.device("cpu"), True, True, False, False,
                              (256,))
    params = lb_module.TUNING_DEFAULTS
    measured = lb_plan._candidates(prob, params, H100_SMS, measuring=True)
    assert {t for t, _ in measured} == set(lb_module.tiles_for(2))
    assert (TILE_16, (1, 4)) in measured and (TILE_16, (1, 1)) in measured
    (tile, splits), = lb_plan._candidates(prob, params, H100_SMS, measuring=False)
    assert tile == (lb_module.INTERPRETER_TILE if INTERPRET else TILE_16)
    assert splits == lb_module.split_factors(256, 1024, 1024, tile, H100_SMS, True)
    pinned = lb_plan._candidates(prob, dict(params, split_dx=8, tile_16bit=TILE_16.name), H100_SMS, True)
    assert pinned == [(TILE_16, (1, 8))]  # split_dw "auto" gives 1 here: nothing else to time


def test_tuning_space_is_registered_and_names_real_tiles():
    space = tuning.spaces()[OP]
    assert space == {k: tuple(v) for k, v in lb_module.TUNING_SPACE.items()}
    assert tuning.defaults(OP) == lb_module.TUNING_DEFAULTS
    for param, size in (("tile_16bit", 2), ("tile_fp32", 4)):
        assert set(space[param]) - {"autotune"} == {t.name for t in lb_module.tiles_for(size)}
    tuning.validate({"ops": {OP: lb_module.TUNING_DEFAULTS}})


# ------------------------------------------------------------------ routes: fused / cublas / auto

def _prob(m, n, k, dtype=torch.float32, tf32=False, accumulate=False):
    return lb_plan._Problem(m, n, k, dtype, torch.device("cuda"), True, True, accumulate, tf32, (m,))


@pytest.mark.parametrize("prob,rule,on_gpu,measuring,want", [
    (_prob(4096, 1024, 1024), "cublas_if_compute_bound", True, True, "cublas"),   # FMA-bound: known
    (_prob(64, 512, 512), "cublas_if_compute_bound", True, True, "measure"),      # launch-bound
    (_prob(64, 512, 512), "cublas", True, True, "cublas"),
    (_prob(4096, 1024, 1024), "as_route", True, True, "measure"),
    (_prob(4096, 1024, 1024, tf32=True), "cublas_if_compute_bound", True, True, "measure"),  # tensor cores
    (_prob(4096, 1024, 1024, torch.float16), "cublas_if_compute_bound", True, True, "measure"),
    (_prob(4096, 1024, 1024), "cublas_if_compute_bound", False, False, "fused"),  # the interpreter
    (_prob(64, 512, 512), "cublas_if_compute_bound", True, False, "fused"),       # not measuring
    (_prob(64, 512, 512, torch.float16, accumulate=True), "cublas", True, True, "fused"),
], ids=["fp32-large", "fp32-small", "fp32-always-cublas", "fp32-as-route", "tf32", "fp16", "interpreter",
        "no-measuring", "fp16-accumulate"])
def test_auto_route_rules(prob, rule, on_gpu, measuring, want):
    params = dict(lb_module.TUNING_DEFAULTS, fp32_ieee_route=rule)
    assert lb_module.auto_route(prob, params, on_gpu=on_gpu, measuring=measuring) == want


@pytest.fixture
def launched(monkeypatch):
    """The routes launched during the test, in order (the launchers still run)."""
    names = []
    real_kernel, real_cublas = lb_plan._launch_kernel, lb_plan._launch_cublas
    monkeypatch.setattr(lb_plan, "_launch_kernel", lambda *a: names.append("fused") or real_kernel(*a))
    monkeypatch.setattr(lb_plan, "_launch_cublas", lambda *a: names.append("cublas") or real_cublas(*a))
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
    assert got[0].shape == x.shape
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


def test_auto_route_takes_the_fused_kernel_when_not_measuring(fresh_plans, monkeypatch, launched):
    """Nothing is measured under the interpreter, nor on a GPU with GPUAD_TRITON_AUTOTUNE=0."""
    monkeypatch.setenv("GPUAD_TRITON_AUTOTUNE", "0")
    x, w, dy = _make((33,), 70, 45, torch.float16, seed=24)
    before = lb_module.route_choices()
    _check(linear_backward(x, w, dy), _ref(x, w, dy), TOL[torch.float16])
    assert launched == ["fused"] and lb_module.route_choices() == before


def test_fastest_warms_each_launcher_then_keeps_the_fastest(monkeypatch):
    import triton.testing
    calls = []
    medians = {"fused": 0.30, "cublas": 0.20}

    def fake_do_bench(fn, warmup, rep, return_mode):
        assert return_mode == "median"
        name = fn()
        return medians[name]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    launchers = {name: (lambda name=name: calls.append(name) or name) for name in medians}
    best, times = lb_plan._fastest(launchers)
    assert best == "cublas" and times == medians
    assert calls == ["fused", "fused", "cublas", "cublas"], "each launcher runs once before it is timed"


def _flag_state():
    """torch's global matmul flags that _pins may touch, as torch reports them."""
    c = torch._C
    state = {"tf32": precision._tf32_state(),
             "fp16": c._get_cublas_allow_fp16_reduced_precision_reduction(),
             "bf16": c._get_cublas_allow_bf16_reduced_precision_reduction()}
    if hasattr(c, "_get_cublas_allow_fp16_accumulation"):
        state["fp16_acc"] = c._get_cublas_allow_fp16_accumulation()
    return state


def _first(v):
    return v[0] if isinstance(v, tuple) else v


@pytest.fixture
def restore_flags():
    before = _flag_state()
    yield before
    mm = torch.backends.cuda.matmul
    precision._set_tf32(before["tf32"])
    mm.allow_fp16_reduced_precision_reduction = before["fp16"]
    mm.allow_bf16_reduced_precision_reduction = before["bf16"]
    if "fp16_acc" in before:
        mm.allow_fp16_accumulation = before["fp16_acc"]
    assert _flag_state() == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("allow_tf32", [False, True])
def test_precision_pins_set_what_differs_and_restore_it_exactly(restore_flags, dtype, allow_tf32):
    """A user's state with every flag the other way: the pins give fp32 accumulation for the dtype
    (TF32 only when allowed) and then restore that state exactly."""
    mm = torch.backends.cuda.matmul
    mm.allow_fp16_reduced_precision_reduction = True
    mm.allow_bf16_reduced_precision_reduction = True
    if "fp16_acc" in restore_flags:
        mm.allow_fp16_accumulation = True
    precision._set_tf32(not allow_tf32)
    user = _flag_state()
    undo = precision._pins(dtype, allow_tf32)
    inside = _flag_state()
    if dtype == torch.float32:
        assert precision._tf32_is_on(inside["tf32"]) == allow_tf32 and len(undo) == 1
    elif dtype == torch.float16:
        assert _first(inside["fp16"]) is False and inside.get("fp16_acc", False) is False
    else:
        assert _first(inside["bf16"]) is False and len(undo) == 1
    for restore in undo:
        restore()
    assert _flag_state() == user


def test_precision_pins_only_read_when_nothing_differs(restore_flags):
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = (False, False)  # split-K flags
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = (False, False)  # are kept as set
    if "fp16_acc" in restore_flags:
        torch.backends.cuda.matmul.allow_fp16_accumulation = False
    precision._set_tf32(False)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert precision._pins(dtype, False) == []


# ------------------------------------------------------------------ the plan cache and the per-call cost

def test_plan_cache_hit_still_refuses_bad_input_of_other_shapes_and_dtypes():
    x, w, dy = _make((4,), 6, 3, torch.float32, seed=25)
    linear_backward(x, w, dy)  # planned
    with pytest.raises(ValueError, match="one dtype"):
        linear_backward(x, w.half(), dy)
    with pytest.raises(ValueError, match="K = w.shape"):
        linear_backward(x[:, :5], w, dy)
    with pytest.raises(ValueError, match="dw_accumulate"):
        linear_backward(x, w, dy, dw_accumulate=torch.zeros(3, 6, dtype=torch.float64, device=x.device))


def test_tuning_override_changes_the_plan():
    x, w, dy = _make((40,), 21, 37, torch.float32, seed=26)
    with tuning.override(OP, split_dw=2, split_dx=1):
        assert lb_module.plan_name(x, w, dy, route="fused").endswith("split 2x1")
    with tuning.override(OP, split_dw=1, split_dx=2):
        assert lb_module.plan_name(x, w, dy, route="fused").endswith("split 1x2")
    with tuning.override(OP, route="cublas"):
        assert lb_module.plan_name(x, w, dy) == "cublas"


#: The most CPU-µs a call may cost with its launches stubbed: checks, device context, route key, plan lookup.
OVERHEAD_BOUND_US = 20.0


def _per_call_us(cases: dict, calls=200, rounds=25) -> dict:
    """{name: fewest CPU-µs of this thread per call} over `rounds` batches of each case, the cases
    interleaved. Robust to a loaded machine: time spent waiting for a core is not counted, and
    each case keeps its least disturbed batch."""
    clock = getattr(time, "thread_time_ns", time.perf_counter_ns)
    best = dict.fromkeys(cases, math.inf)
    for fn in cases.values():
        fn()
    for _ in range(rounds):
        for name, fn in cases.items():
            start = clock()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (clock() - start) / calls / 1e3)
    return best


def test_python_overhead_per_call_with_the_launch_stubbed(monkeypatch, capsys):
    """The launcher's own cost per call, with the kernel launch and the cuBLAS calls stubbed out:
    the fused route (2-D, 3-D, split), the cuBLAS route, and route "auto". The shapes are small
    so that the CPU tensors' allocations cost what the CUDA caching allocator's do (a large CPU
    buffer goes to the kernel and back, which says nothing of the launcher); the path through
    the launcher does not depend on the sizes. Bound: 20 µs; the figures are printed (pytest -s)."""
    monkeypatch.setattr(lb_plan, "_launch_kernel", lambda launcher, args, meta: None)
    dev = _device()
    made = {}  # the stubs' outputs, made once (their cost is not the launcher's)

    def fake_mm(a, b):
        key = (a.shape[0], b.shape[1])
        if key not in made:
            made[key] = torch.empty(key, device=dev)
        return made[key]

    def fake_sum(t, dim):
        if "db" not in made:
            made["db"] = torch.empty(t.shape[1], device=dev)
        return made["db"]

    monkeypatch.setattr(torch, "mm", fake_mm)
    monkeypatch.setattr(torch, "sum", fake_sum)
    cases = {}
    x, w, dy = _make((64,), 32, 48, torch.float32, seed=27)
    cases["fp32 fused"] = lambda: linear_backward(x, w, dy, route="fused")
    cases["fp32 cublas"] = lambda: linear_backward(x, w, dy, route="cublas")
    xh, wh, dyh = _make((64,), 32, 48, torch.float16, seed=28)
    cases["fp16 auto"] = lambda: linear_backward(xh, wh, dyh)
    x3, dy3 = xh.view(8, 8, 32), dyh.view(8, 8, 48)
    cases["fp16 3-D x"] = lambda: linear_backward(x3, wh, dy3)
    with tuning.override(OP, split_dw=2, split_dx=2):
        cases["fp32 split 2x2"] = lambda: linear_backward(x, w, dy, route="fused")
        assert lb_module.plan_name(x, w, dy, route="fused").endswith("split 2x2")
        for attempt in range(3):  # a busy spell on a shared CI core can spoil one attempt, not three
            figures = _per_call_us(cases)
            if max(figures.values()) <= OVERHEAD_BOUND_US:
                break
    with capsys.disabled():
        print("\nlinear_backward Python cost per call, launch stubbed (µs, this machine's CPU): "
              + ", ".join(f"{name} {us:.1f}" for name, us in figures.items()))
    for name, us in figures.items():
        assert us <= OVERHEAD_BOUND_US, f"{name}: {us:.1f} µs per call > {OVERHEAD_BOUND_US} µs"


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


# ------------------------------------------------------------------ GPU: real sizes, bf16, splits, CuPy
# Most GPU tests launch the default tile without timing candidates (GPUAD_TRITON_AUTOTUNE=0) to stay
# quick; test_gpu_autotune_accumulate and the auto-route test time them once.

@pytest.fixture
def fixed_config(monkeypatch, fresh_plans):
    monkeypatch.setenv("GPUAD_TRITON_AUTOTUNE", "0")


@pytest.fixture
def autotuned(monkeypatch, fresh_plans):
    monkeypatch.setenv("GPUAD_TRITON_AUTOTUNE", "1")


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
    got = linear_backward(x, w, dy, allow_tf32=tf32, route="fused")
    for a, c in zip((x, w, dy), copies):
        assert torch.equal(a, c)
    _check_gpu(got, _ref_gpu(x, w, dy), TF32_TOL if tf32 else TOL[dtype])
    again = linear_backward(x, w, dy, allow_tf32=tf32, route="fused")  # same bits on a second run
    for u, v in zip(got, again):
        assert torch.equal(u, v)


def _poison(*shapes_dtypes):
    """Leave NaN-filled blocks in torch's caching allocator: outputs of those sizes are likely to
    reuse them, so an element a route fails to write shows up as NaN."""
    for shape, dtype in shapes_dtypes:
        torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,lead,k,n,splits", [
    (torch.float32, (64,), 512, 512, "auto"),          # launch-bound fp32: dX split (1x4 on an H100)
    (torch.bfloat16, (256,), 1024, 1024, "auto"),      # launch-bound bf16: dX split
    (torch.bfloat16, (65536,), 1024, 1024, (8, 1)),    # dW over a long M
    (torch.float16, (3, 1000), 777, 1031, (4, 2)),     # both split, nothing a multiple of a tile
    (torch.float32, (2000,), 300, 700, (16, 16)),      # more splits than K-blocks: db on every block
], ids=["64x512x512-fp32", "256x1024x1024-bf16", "65536x1024x1024-bf16", "odd-fp16", "fp32-16x16"])
def test_gpu_split_variants(poisoned_outputs, fixed_config, dtype, lead, k, n, splits):
    """The split paths on the GPU (the interpreter runs programs one after another, so only here do
    the arrival counters race): parity, every element written, the same bits on every run and
    with other work queued between, counters back at 0, dw_accumulate added exactly once."""
    params = {} if splits == "auto" else dict(split_dw=splits[0], split_dx=splits[1])
    x, w, dy = _make(lead, k, n, dtype, seed=40, device="cuda", w_transposed=True)
    with tuning.override(OP, **params):
        name = lb_module.plan_name(x, w, dy, route="fused")
        assert "split 1x1" not in name, name
        got = linear_backward(x, w, dy, route="fused")
        ref = _ref_gpu(x, w, dy)
        _check_gpu(got, ref, TOL[dtype])
        for _ in range(3):
            torch.cuda._sleep(1000)  # other timing on the stream
            again = linear_backward(x, w, dy, route="fused")
            for u, v in zip(got, again):
                assert torch.equal(u, v)
        buf = torch.randn(n, k, device="cuda")
        old = buf.clone()
        dx, dw, db = linear_backward(x, w, dy, dw_accumulate=buf, route="fused")
        assert _rel_gpu(dw - old, ref[1]) < (1e-5 if dtype == torch.float32 else 1e-4)
    torch.cuda.synchronize()
    assert _counters_are_reset()


@pytest.mark.gpu
def test_gpu_split_workspaces_are_per_stream(fixed_config):
    """Two streams never share arrival counters: the same split problem on two streams at once."""
    x, w, dy = _make((256,), 1024, 1024, torch.bfloat16, seed=41, device="cuda")
    with tuning.override(OP, split_dw=2, split_dx=4):
        want = linear_backward(x, w, dy, route="fused")
        streams = [torch.cuda.Stream(), torch.cuda.Stream()]
        torch.cuda.synchronize()
        outs = []
        for s in streams:
            with torch.cuda.stream(s):
                outs.append([linear_backward(x, w, dy, route="fused") for _ in range(20)])
        torch.cuda.synchronize()
    assert len(lb_plan._workspaces) >= 3
    for per_stream in outs:
        for got in per_stream:
            for u, v in zip(got, want):
                assert torch.equal(u, v)


@pytest.mark.gpu
def test_gpu_autotune_accumulate(autotuned):
    """The first call on a shape times the candidates (each runs): the buffer must still receive
    dyᵀx exactly once. Transposed w, no dx; the chosen plan then gives the same bits."""
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
def test_gpu_auto_route_measures_once_and_accumulates_once(autotuned):
    """route="auto" with timing on: the first call times the fused candidates and cuBLAS on scratch
    outputs and records the choice; the caller's fp32 buffer still receives dyᵀx exactly once."""
    x, w, dy = _make((512,), 384, 640, torch.float32, seed=31, device="cuda")  # fp32 but launch-bound
    buf = torch.randn(640, 384, device="cuda")
    old = buf.clone()
    before = set(lb_module.route_choices())
    dx, dw, db = linear_backward(x, w, dy, dw_accumulate=buf)
    new = set(lb_module.route_choices()) - before
    assert len(new) == 1, "one problem, one measurement"
    key = new.pop()
    route, times = lb_module.route_choices()[key]
    assert route in ("fused", "cublas") and set(times) == {"fused", "cublas"}
    assert all(t > 0 for t in times.values()) and times[route] == min(times.values())
    if key in lb_module.fused_choices():
        best, cands = lb_module.fused_choices()[key]
        assert times["fused"] == cands[best] == min(cands.values())
    ref = _ref_gpu(x, w, dy)
    assert _rel_gpu(dw - old, ref[1]) < 1e-5
    _check_gpu((dx, None, db), (ref[0], None, ref[2]), TOL[torch.float32])
    lb_module.clear_plans()
    linear_backward(x, w, dy, dw_accumulate=buf)  # planned again: the measurement is reused
    assert len(lb_module.route_choices()) == len(before) + 1


@pytest.mark.gpu
def test_gpu_fp32_compute_bound_takes_cublas_untimed(autotuned, launched):
    x, w, dy = _make((4096,), 1024, 1024, torch.float32, seed=32, device="cuda")
    assert lb_module.plan_name(x, w, dy) == "cublas"
    key = next(k for k in lb_module.route_choices() if k[1:5] == ("float32", 4096, 1024, 1024) and not k[8])
    assert lb_module.route_choices()[key] == ("cublas", {})
    _check_gpu(linear_backward(x, w, dy), _ref_gpu(x, w, dy), TOL[torch.float32])
    assert launched == ["cublas"]
