"""gpuad.kernels.cupy against the float64 numpy reference.

GPU tests carry the marker ``gpu`` (tests/conftest.py skips them without CUDA) and also skip
when CuPy or ml_dtypes is missing. The reference runs in float64 on the very values the kernel
reads (rounded to fp16/bf16 first), so loss tolerances are those of fp32 arithmetic for every
dtype; gradient tolerances add one rounding to the output dtype. Each test is meant to take a
few seconds on an H100/H200. The tests at the top need no GPU: bad arguments fail before CuPy
is touched.
"""
import importlib

import numpy as np
import pytest

import closeness
from closeness import GRAD_RTOL, LOSS_RTOL, ROW_LOSS_ATOL, grad_atol
from gpuad.kernels import reference as ref
from gpuad.kernels.cupy import linear_backward, softmax_cross_entropy

gpu = pytest.mark.gpu
DTYPES = ("float32", "float16", "bfloat16")
REDUCTIONS = ("mean", "sum", "none")
V_LLAMA3 = 128256


# ---------------------------------------------------------------- CPU: checks before CuPy

@pytest.mark.parametrize("logits_shape, targets_shape", [((4, 5), (3,)), ((4,), (4,)), ((2, 3, 4), (2,))])
def test_ce_bad_shapes_raise_before_cupy(logits_shape, targets_shape):
    with pytest.raises(ValueError, match="shape"):
        softmax_cross_entropy(np.zeros(logits_shape, np.float32), np.zeros(targets_shape, np.int64))


def test_ce_bad_arguments_raise_before_cupy():
    logits, targets = np.zeros((4, 5), np.float32), np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="reduction"):
        softmax_cross_entropy(logits, targets, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        softmax_cross_entropy(logits, targets, label_smoothing=1.5)
    with pytest.raises(ValueError, match="integers"):
        softmax_cross_entropy(logits, targets.astype(np.float32))
    with pytest.raises(ValueError, match="floating point"):
        softmax_cross_entropy(logits.astype(np.float64), targets)  # the CUDA kernels take fp32/fp16/bf16
    with pytest.raises(TypeError, match="CuPy arrays"):
        softmax_cross_entropy(logits, targets)


def test_ce_zero_classes_raise_before_cupy():
    for shape in ((4, 0), (0, 0)):
        with pytest.raises(ValueError, match="at least one class"):
            softmax_cross_entropy(np.zeros(shape, np.float32), np.zeros(shape[0], np.int64))


def test_ce_row_launch_follows_the_tuning_parameters():
    """No GPU needed: the launch each tuning value asks for (layout, width, grid, block)."""
    ce = importlib.import_module("gpuad.kernels.cupy.cross_entropy")
    assert ce.row_launch(8192, 32000, "bfloat16") == ("ce_block_bf16_v16", (8192,), (512,))
    assert ce.row_launch(8192, 1000, "float32", dict(warp_row_max_cols=1024, warps_per_block=4)) == \
        ("ce_warp_f32_v16", (2048,), (128,))
    assert ce.row_launch(8192, 128256, "bfloat16", dict(blocks_per_sm=2, vec_bytes=8, threads_per_row=1024),
                         sm_count=132) == ("ce_block_bf16_v8", (264,), (1024,))
    for name, values in ce.SPACE.items():
        for value in values:
            kernel, grid, block = ce.row_launch(5, 50257, "float16", {name: value}, sm_count=4)
            assert kernel in ce.KERNEL_NAMES and 1 <= grid[0] <= 5 and block[0] % 32 == 0 and block[0] <= 1024


def test_linear_backward_bad_arguments_raise_before_cupy():
    x, w, dy = np.zeros((6, 4), np.float32), np.zeros((3, 4), np.float32), np.zeros((6, 3), np.float32)
    with pytest.raises(ValueError, match="K = w.shape"):
        linear_backward(np.zeros((6, 5), np.float32), w, dy)
    with pytest.raises(ValueError, match="N = w.shape"):
        linear_backward(x, w, np.zeros((6, 2), np.float32))
    with pytest.raises(ValueError, match="leading axes"):
        linear_backward(x, w, np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError, match="one dtype"):
        linear_backward(x, w.astype(np.float16), dy)
    with pytest.raises(ValueError, match="dw_accumulate"):
        linear_backward(x, w, dy, dw_accumulate=np.zeros((4, 3), np.float32))
    with pytest.raises(TypeError, match="CuPy arrays"):
        linear_backward(x, w, dy)


# ---------------------------------------------------------------- GPU helpers

@pytest.fixture(scope="module")
def cp():
    cupy = pytest.importorskip("cupy")
    pytest.importorskip("ml_dtypes")
    return cupy


def host_dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def to64(a):
    """float64 numpy copy of a CuPy or numpy array (any float dtype, bf16 included)."""
    if type(a).__module__.startswith("cupy"):
        a = a.get()
    return np.asarray(a).astype(np.float64)


def assert_close(got, want, rtol, atol, what):
    closeness.assert_close(to64(got), want, rtol, atol, what)


def bits(a):
    return a.get().tobytes() if hasattr(a, "get") else np.asarray(a).tobytes()


def make_ce(n_rows, n_cols, dtype, seed=0, ignore_every=5, ignore_index=-100, scale=3.0):
    """Host logits [n_rows, n_cols] in `dtype` and int64 targets with every k-th row ignored."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((n_rows, n_cols), dtype=np.float32) * scale).astype(host_dtype(dtype))
    targets = rng.integers(0, n_cols, size=n_rows)
    if ignore_every:
        targets[1::ignore_every] = ignore_index
    return logits, targets


def poison_pool(cp, nbytes):
    """Leave a freed NaN-filled block of `nbytes` in CuPy's pool, so an output the kernel
    forgets to write shows up as NaN (the pool hands the block to the next same-size empty)."""
    junk = cp.full(-(-nbytes // 4), np.nan, dtype=cp.float32)
    del junk


def check_ce(cp, logits_host, targets_host, loss, dlogits, dtype, **kw):
    want_loss, want_grad = ref.softmax_cross_entropy(logits_host.astype(np.float64), targets_host, **kw)
    atol = ROW_LOSS_ATOL if kw.get("reduction") == "none" else 1e-6
    assert loss.dtype == cp.float32
    assert_close(loss, want_loss, LOSS_RTOL, atol, "loss")
    if dlogits is not None:
        assert dlogits.dtype == logits_host.dtype and dlogits.shape == logits_host.shape
        n_valid = np.count_nonzero(targets_host != kw.get("ignore_index", -100))
        unit = 1.0 / max(n_valid, 1) if kw.get("reduction", "mean") == "mean" else 1.0
        assert_close(dlogits, want_grad, GRAD_RTOL[dtype], grad_atol(dtype, want_grad, unit), "dlogits")


# ---------------------------------------------------------------- GPU: cross-entropy

@gpu
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ce_matches_reference(cp, dtype, reduction, smoothing):
    logits_host, targets_host = make_ce(24, V_LLAMA3, dtype, seed=10 * DTYPES.index(dtype) + REDUCTIONS.index(reduction))
    logits, targets = cp.asarray(logits_host), cp.asarray(targets_host)
    poison_pool(cp, logits.nbytes)
    loss, dlogits = softmax_cross_entropy(logits, targets, reduction=reduction, label_smoothing=smoothing)
    check_ce(cp, logits_host, targets_host, loss, dlogits, dtype, reduction=reduction, label_smoothing=smoothing)
    assert loss.shape == ((24,) if reduction == "none" else ())
    assert (to64(logits) == logits_host.astype(np.float64)).all(), "the logits were modified"


@gpu
@pytest.mark.parametrize("n_cols", [1, 7, 1031, 50257])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ce_odd_sizes_and_unaligned_rows(cp, dtype, n_cols):
    # rows of 50257 or 1031 elements start at every 16-byte phase; n_cols = 1 gives loss 0
    logits_host, targets_host = make_ce(37, n_cols, dtype, seed=n_cols, ignore_every=4)
    logits, targets = cp.asarray(logits_host), cp.asarray(targets_host.astype(np.int32))
    loss, dlogits = softmax_cross_entropy(logits, targets, label_smoothing=0.05)
    check_ce(cp, logits_host, targets_host, loss, dlogits, dtype, label_smoothing=0.05)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_ce_offset_view_and_custom_ignore_index(cp, dtype):
    # logits[1:] starts 2 or 4 bytes past an allocation: the gradient rows get another 16-byte
    # phase than the logits rows (the scalar gradient path)
    base_host, targets_host = make_ce(41, 4099, dtype, ignore_every=3, ignore_index=7)
    base = cp.asarray(base_host.reshape(-1))
    flat = base[1:1 + 40 * 4099]
    logits = flat.reshape(40, 4099)
    logits_host = base_host.reshape(-1)[1:1 + 40 * 4099].reshape(40, 4099)
    targets_host = targets_host[:40]
    loss, dlogits = softmax_cross_entropy(logits, cp.asarray(targets_host), ignore_index=7, reduction="sum")
    check_ce(cp, logits_host, targets_host, loss, dlogits, dtype, ignore_index=7, reduction="sum")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_ce_inplace_and_grad_false(cp, dtype):
    logits_host, targets_host = make_ce(32, V_LLAMA3, dtype, seed=3)
    targets = cp.asarray(targets_host)
    logits = cp.asarray(logits_host)
    loss, dlogits = softmax_cross_entropy(logits, targets, label_smoothing=0.1)
    loss_nograd, none = softmax_cross_entropy(logits, targets, label_smoothing=0.1, grad=False)
    assert none is None
    assert bits(loss_nograd) == bits(loss)
    loss_in, dlogits_in = softmax_cross_entropy(logits, targets, label_smoothing=0.1, inplace=True)
    assert dlogits_in is logits
    assert bits(loss_in) == bits(loss)
    assert bits(dlogits_in) == bits(dlogits), "inplace gives other bits"
    check_ce(cp, logits_host, targets_host, loss_in, dlogits_in, dtype, label_smoothing=0.1)


@gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ce_all_rows_ignored(cp, reduction):
    logits = cp.asarray(np.random.default_rng(0).standard_normal((8, 1000), dtype=np.float32))
    targets = cp.full(8, -100, dtype=cp.int64)
    poison_pool(cp, logits.nbytes)
    loss, dlogits = softmax_cross_entropy(logits, targets, reduction=reduction)
    assert (to64(loss) == 0).all() and (to64(dlogits) == 0).all()


@gpu
def test_ce_same_bits_every_run(cp):
    logits_host, targets_host = make_ce(256, V_LLAMA3, "bfloat16", seed=5)
    logits, targets = cp.asarray(logits_host), cp.asarray(targets_host)
    first = softmax_cross_entropy(logits, targets, label_smoothing=0.1)
    for _ in range(3):
        again = softmax_cross_entropy(logits, targets, label_smoothing=0.1)
        assert bits(again[0]) == bits(first[0])
        assert bits(again[1]) == bits(first[1])


@gpu
def test_ce_bad_targets(cp):
    logits_host, targets_host = make_ce(6, 100, "float32", ignore_every=0)
    logits = cp.asarray(logits_host)
    for bad in (100, -1, 10**12):
        targets = targets_host.copy()
        targets[2] = bad
        with pytest.raises(IndexError, match=f"target {bad} at row 2"):
            softmax_cross_entropy(logits, cp.asarray(targets))
        # unchecked: no out-of-bounds access; the bad row's loss is NaN, the others are right
        loss, dlogits = softmax_cross_entropy(logits, cp.asarray(targets), reduction="none", check_targets=False)
        rows = np.array([0, 1, 3, 4, 5])
        got = to64(loss)
        assert np.isnan(got[2])
        want, want_grad = ref.softmax_cross_entropy(logits_host[rows].astype(np.float64), targets_host[rows],
                                                    reduction="none")
        assert_close(got[rows], want, LOSS_RTOL, ROW_LOSS_ATOL, "loss of the good rows")
        assert_close(dlogits[cp.asarray(rows)], want_grad, GRAD_RTOL["float32"], grad_atol("float32", want_grad),
                     "dlogits of the good rows")
        assert np.isfinite(to64(dlogits[2])).all()


@gpu
def test_ce_bad_arguments_on_gpu(cp):
    logits, targets = cp.zeros((4, 5), cp.float32), cp.zeros(4, cp.int64)
    with pytest.raises(ValueError, match="shape"):
        softmax_cross_entropy(logits, targets[:3])
    with pytest.raises(ValueError, match="floating point"):
        softmax_cross_entropy(logits.astype(cp.int32), targets)
    with pytest.raises(ValueError, match="floating point"):
        softmax_cross_entropy(logits.astype(cp.float64), targets)
    with pytest.raises(ValueError, match="integers"):
        softmax_cross_entropy(logits, targets.astype(cp.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        softmax_cross_entropy(cp.zeros((5, 4), cp.float32).T, targets, inplace=True)
    with pytest.raises(TypeError, match="CuPy arrays"):
        softmax_cross_entropy(logits, np.zeros(4, np.int64))


#: Row-kernel candidates of the tuning space checked at real sizes (each value occurs).
CE_CANDIDATES = {
    "defaults": {},
    "persistent-reverse-1024": dict(blocks_per_sm=1, pass2="reverse", threads_per_row=1024),
    "persistent-v8-256": dict(blocks_per_sm=4, vec_bytes=8, threads_per_row=256),
    "v4-128": dict(vec_bytes=4, threads_per_row=128, blocks_per_sm=8),
    "warp-4": dict(warp_row_max_cols=8192, warps_per_block=4),
    "warp-16-persistent-reverse": dict(warp_row_max_cols=2048, warps_per_block=16, blocks_per_sm=2, pass2="reverse"),
    "warp-8-v8": dict(warp_row_max_cols=2048, vec_bytes=8, threads_per_row=512),
}


@gpu
@pytest.mark.parametrize("candidate", list(CE_CANDIDATES))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_ce_tuning_candidates(cp, candidate, dtype):
    """Every candidate the sweep may pick, on unaligned wide rows and on narrow rows (both
    layouts), poisoned outputs; inplace and loss-only give the same bits."""
    from gpuad.kernels import tuning

    ce = importlib.import_module("gpuad.kernels.cupy.cross_entropy")
    for n_rows, n_cols in ((300, 50257), (1000, 1031), (64, V_LLAMA3)):
        logits_host, targets_host = make_ce(n_rows, n_cols, dtype, seed=n_cols)
        logits, targets = cp.asarray(logits_host), cp.asarray(targets_host)
        with tuning.override(ce.OP, **CE_CANDIDATES[candidate]):
            poison_pool(cp, logits.nbytes)
            loss, dlogits = softmax_cross_entropy(logits, targets, label_smoothing=0.1)
            loss_only, _ = softmax_cross_entropy(logits, targets, label_smoothing=0.1, grad=False)
            loss_in, dl_in = softmax_cross_entropy(logits.copy(), targets, label_smoothing=0.1, inplace=True)
        check_ce(cp, logits_host, targets_host, loss, dlogits, dtype, label_smoothing=0.1)
        assert bits(loss_only) == bits(loss) == bits(loss_in) and bits(dl_in) == bits(dlogits)


@gpu
def test_ce_ignore_index_none_and_outside_the_targets_dtype(cp):
    """None ignores no row; 2**32 + 5 matches no int32 target (CuPy would wrap it to 5)."""
    logits_host, targets_host = make_ce(12, 300, "float32", ignore_every=0)
    targets_host[::3] = 5
    logits = cp.asarray(logits_host)
    want = ref.softmax_cross_entropy(logits_host.astype(np.float64), targets_host, ignore_index=None)
    for ignore_index in (None, 2**32 + 5, 2**70):
        for dtype in (np.int64, np.int32):
            loss, dlogits = softmax_cross_entropy(logits, cp.asarray(targets_host.astype(dtype)),
                                                  ignore_index=ignore_index)
            check_ce(cp, logits_host, targets_host, loss, dlogits, "float32", ignore_index=None)
            assert_close(loss, want[0], LOSS_RTOL, 1e-6, f"loss, ignore_index {ignore_index}, {dtype.__name__}")
    targets_host[4] = -100
    with pytest.raises(IndexError, match="-100 at row 4"):
        softmax_cross_entropy(logits, cp.asarray(targets_host), ignore_index=None)


@gpu
def test_ce_overlapping_rows(cp):
    """Rows that share memory (broadcast, as_strided) are read as their values; inplace=True
    on them is refused."""
    logits_host, targets_host = make_ce(5, 300, "float32", ignore_every=2)
    row = cp.asarray(logits_host[0])
    for view in (cp.broadcast_to(row, (5, 300)),
                 cp.lib.stride_tricks.as_strided(cp.asarray(logits_host.reshape(-1)), (5, 300), (160, 4))):
        before = cp.asnumpy(view)
        loss, dlogits = softmax_cross_entropy(view, cp.asarray(targets_host), label_smoothing=0.1)
        check_ce(cp, before, targets_host, loss, dlogits, "float32", label_smoothing=0.1)
        assert (cp.asnumpy(view) == before).all()
        with pytest.raises(ValueError, match="C-contiguous"):
            softmax_cross_entropy(view, cp.asarray(targets_host), inplace=True)


@gpu
def test_ce_beyond_2_to_the_31_elements(cp):
    """bf16 [16800, 128256]: 2.15e9 elements, rows from 16744 on start past 2^31."""
    n_rows, n_cols = 16800, V_LLAMA3
    need = n_rows * n_cols * 2 + 2 * 2**30
    if cp.cuda.runtime.memGetInfo()[0] < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free device memory")
    bf16 = host_dtype("bfloat16")
    logits = cp.empty((n_rows, n_cols), dtype=bf16)
    rng = cp.random.default_rng(0)
    for start in range(0, n_rows, 2048):
        stop = min(n_rows, start + 2048)
        logits[start:stop] = (rng.standard_normal((stop - start, n_cols), dtype=cp.float32) * 3).astype(bf16)
    targets_host = np.random.default_rng(1).integers(0, n_cols, size=n_rows)
    targets_host[::7] = -100
    targets = cp.asarray(targets_host)
    first_beyond = -(-2**31 // n_cols)
    rows = np.array([0, 1, n_rows // 2, first_beyond - 1, first_beyond, first_beyond + 1, n_rows - 2, n_rows - 1])
    rows = rows[targets_host[rows] != -100].tolist() + [7 * 2399]  # plus one ignored row past 2^31
    assert 7 * 2399 > first_beyond
    before = cp.asnumpy(logits[cp.asarray(rows)])

    row_loss, none = softmax_cross_entropy(logits, targets, reduction="none", grad=False, check_targets=False)
    assert none is None
    loss, dlogits = softmax_cross_entropy(logits, targets, inplace=True, check_targets=False)
    assert dlogits is logits
    want_rows, want_grad = ref.softmax_cross_entropy(before.astype(np.float64), targets_host[rows], reduction="none")
    n_valid = int(np.count_nonzero(targets_host != -100))
    assert_close(row_loss[cp.asarray(rows)], want_rows, LOSS_RTOL, ROW_LOSS_ATOL, "row losses")
    want_grad /= n_valid
    assert_close(dlogits[cp.asarray(rows)], want_grad, GRAD_RTOL["bfloat16"],
                 grad_atol("bfloat16", want_grad, 1.0 / n_valid), "dlogits rows")
    assert_close(loss, to64(row_loss).sum() / n_valid, 1e-5, 1e-6, "mean loss")
    tail = to64(dlogits[-64:])
    assert np.isfinite(tail).all()


# ---------------------------------------------------------------- GPU: linear backward

LIN_TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}  # relative to the largest |element|


def make_linear(lead, k, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    dt = host_dtype(dtype)
    x = rng.standard_normal(lead + (k,), dtype=np.float32).astype(dt)
    w = (rng.standard_normal((n, k), dtype=np.float32) / np.sqrt(k)).astype(dt)
    dy = rng.standard_normal(lead + (n,), dtype=np.float32).astype(dt)
    return x, w, dy


def assert_rel(got, want, tol, what):
    want = np.asarray(want, dtype=np.float64)
    scale = max(float(np.abs(want).max()), 1e-30) if want.size else 1.0
    assert_close(got, want, 0.0, tol * scale, what)


def check_linear(cp, x_h, w_h, dy_h, got, dtype, **kw):
    want = ref.linear_backward(x_h.astype(np.float64), w_h.astype(np.float64), dy_h.astype(np.float64), **kw)
    for name, g, r in zip(("dx", "dw", "db"), got, want):
        if r is None:
            assert g is None, f"{name} should be None"
            continue
        assert g.dtype == (np.float32 if (name == "dw" and kw.get("dw_accumulate") is not None)
                           else host_dtype(dtype)), f"{name} dtype {g.dtype}"
        assert_rel(g, r, LIN_TOL[dtype], name)


@gpu
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_backward_matches_reference(cp, dtype, bias):
    x_h, w_h, dy_h = make_linear((3, 97), 1024, 321, dtype)  # 3-D x, odd M and N; K = 1024 exposes TF32
    got = linear_backward(cp.asarray(x_h), cp.asarray(w_h), cp.asarray(dy_h), bias=bias)
    assert got[0].shape == x_h.shape and got[1].shape == w_h.shape
    check_linear(cp, x_h, w_h, dy_h, got, dtype, bias=bias)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_backward_accumulate_and_no_dx(cp, dtype):
    x_h, w_h, dy_h = make_linear((300,), 257, 129, dtype, seed=1)
    acc_h = np.random.default_rng(2).standard_normal((129, 257), dtype=np.float32)
    acc = cp.asarray(acc_h)
    dx, dw, db = linear_backward(cp.asarray(x_h), cp.asarray(w_h), cp.asarray(dy_h), dw_accumulate=acc,
                                 need_dx=False)
    assert dx is None and dw is acc and dw.dtype == cp.float32
    want = acc_h.astype(np.float64) + dy_h.astype(np.float64).T @ x_h.astype(np.float64)
    assert_rel(dw, want, 1e-5 if dtype == "float32" else 1e-4, "dw_accumulate")  # fp32 GEMM precision
    assert_rel(db, dy_h.astype(np.float64).sum(axis=0), LIN_TOL[dtype], "db")


@gpu
def test_linear_backward_tf32_only_when_allowed(cp):
    from cupy._core import _routines_linalg as linalg

    x_h, w_h, dy_h = make_linear((512,), 1024, 512, "float32", seed=4)
    x, w, dy = cp.asarray(x_h), cp.asarray(w_h), cp.asarray(dy_h)
    old = linalg.get_compute_type(np.float32)
    linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32)  # as if CUPY_TF32=1
    try:
        got = linear_backward(x, w, dy)
        check_linear(cp, x_h, w_h, dy_h, got, "float32")  # fp32-tight: TF32 was kept off
        loose = linear_backward(x, w, dy, allow_tf32=True)
        want = ref.linear_backward(x_h.astype(np.float64), w_h.astype(np.float64), dy_h.astype(np.float64))
        assert_rel(loose[0], want[0], 1e-2, "dx with TF32")
        assert_rel(loose[1], want[1], 1e-2, "dw with TF32")
        assert linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_TF32, "compute type not restored"
    finally:
        linalg.set_compute_type(np.float32, old)


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bias_grad_many_rows_same_bits(cp, dtype):
    # 65536 x 1024 takes the two-kernel path (row splits); the bits must not change run to run
    rng = cp.random.default_rng(7)
    dy = rng.standard_normal((65536, 1024), dtype=cp.float32).astype(host_dtype(dtype))
    x = cp.ones((65536, 8), dtype=dy.dtype)
    w = cp.ones((1024, 8), dtype=dy.dtype)
    _, _, db = linear_backward(x, w, dy, need_dx=False)
    assert_rel(db, to64(dy).sum(axis=0), LIN_TOL[dtype] if dtype != "float32" else 1e-5, "db")
    for _ in range(2):
        _, _, again = linear_backward(x, w, dy, need_dx=False)
        assert bits(again) == bits(db)


@gpu
def test_linear_backward_empty_batch(cp):
    x, w, dy = cp.zeros((0, 16), cp.float32), cp.ones((8, 16), cp.float32), cp.zeros((0, 8), cp.float32)
    dx, dw, db = linear_backward(x, w, dy)
    assert dx.shape == (0, 16) and (to64(dw) == 0).all() and (to64(db) == 0).all()


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,n", [((0,), 5, 3), ((4,), 0, 3), ((4,), 5, 0), ((2, 3), 0, 0), ((0,), 0, 0)])
def test_linear_backward_zero_sizes(cp, dtype, lead, k, n):
    """K = 0 or N = 0 (and M = 0): the empty sums are zeros and db still sums dy when only K is 0,
    as torch gives; dw_accumulate is left as it was."""
    x_h, w_h, dy_h = make_linear(lead, k, n, dtype, seed=5)
    got = linear_backward(cp.asarray(x_h), cp.asarray(w_h), cp.asarray(dy_h))
    for name, g, want in zip(("dx", "dw", "db"), got, ref.linear_backward(x_h, w_h, dy_h)):
        assert g.shape == want.shape and g.dtype == host_dtype(dtype), name
        assert_rel(g, to64(want), LIN_TOL[dtype], name)
    acc = cp.asarray(np.random.default_rng(6).standard_normal((n, k), dtype=np.float32))
    old = acc.copy()
    dx, dw, db = linear_backward(cp.asarray(x_h), cp.asarray(w_h), cp.asarray(dy_h), dw_accumulate=acc,
                                 need_dx=False)
    assert dx is None and dw is acc and bits(acc) == bits(old)


@gpu
def test_linear_backward_bad_arguments_on_gpu(cp):
    x, w, dy = cp.zeros((6, 4), cp.float32), cp.zeros((3, 4), cp.float32), cp.zeros((6, 3), cp.float32)
    with pytest.raises(ValueError, match="K = w.shape"):
        linear_backward(cp.zeros((6, 5), cp.float32), w, dy)
    with pytest.raises(ValueError, match="one dtype"):
        linear_backward(x, w, dy.astype(cp.float16))
    with pytest.raises(ValueError, match="floating point"):
        linear_backward(x.astype(cp.float64), w.astype(cp.float64), dy.astype(cp.float64))
    with pytest.raises(ValueError, match="dw_accumulate"):
        linear_backward(x, w, dy, dw_accumulate=cp.zeros((3, 4), cp.float16))
    with pytest.raises(ValueError, match="C-contiguous"):
        linear_backward(x, w, dy, dw_accumulate=cp.zeros((4, 3), cp.float32).T)


# ---------------------------------------------------------------- GPU: F.cross_entropy's options

GENERAL_GPU_CASES = [  # (logits shape, probability targets, weighted): rows with weights or probabilities
    ((64, V_LLAMA3), True, True), ((64, 32000), False, True),  # (a block a row), [B, C, T] (a thread a row)
    ((4, 1000, 512), False, True), ((4, 1000, 512), True, False), ((2, 19, 64, 64), False, False)]


@gpu
@pytest.mark.parametrize("shape, soft, weighted", GENERAL_GPU_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ce_general_matches_reference(cp, dtype, shape, soft, weighted):
    """Class weights, probability targets (in the logits' dtype) and the N-d layout at real
    sizes, bf16 included, against the float64 reference; outputs on a poisoned pool."""
    rng = np.random.default_rng(len(shape) + shape[1])
    logits_host = (rng.standard_normal(shape, dtype=np.float32) * 3).astype(host_dtype(dtype))
    if soft:
        targets_host = (rng.random(shape, dtype=np.float32) ** 4).astype(host_dtype(dtype))
    else:
        targets_host = rng.integers(0, shape[1], size=shape[:1] + shape[2:])
        targets_host.reshape(-1)[1::5] = -100
    weight_host = (rng.random(shape[1]) + 0.1).astype(np.float32) if weighted else None
    logits, targets = cp.asarray(logits_host), cp.asarray(targets_host)
    weight = None if weight_host is None else cp.asarray(weight_host)
    for reduction, smoothing in (("mean", 0.1), ("none", 0.0)):
        poison_pool(cp, logits.nbytes)
        loss, dlogits = softmax_cross_entropy(logits, targets, weight=weight, reduction=reduction,
                                              label_smoothing=smoothing)
        want_loss, want_grad = ref.softmax_cross_entropy(
            logits_host.astype(np.float64), targets_host.astype(np.float64) if soft else targets_host,
            weight=weight_host, reduction=reduction, label_smoothing=smoothing)
        assert loss.dtype == cp.float32 and loss.shape == want_loss.shape
        assert_close(loss, want_loss, LOSS_RTOL, ROW_LOSS_ATOL if reduction == "none" else 1e-6, "loss")
        assert dlogits.dtype == logits.dtype and dlogits.shape == logits.shape
        assert_close(dlogits, want_grad, GRAD_RTOL[dtype], grad_atol(dtype, want_grad, 1e-3), "dlogits")
        assert (to64(logits) == logits_host.astype(np.float64)).all(), "the logits were modified"
