"""Triton softmax cross-entropy against the float64 numpy reference.

CPU tests run the real kernels in the Triton interpreter (small shapes: it is slow). Every
kernel variant of the tuning space runs: the one-read row kernel, and the two wide kernels
("chunked", "lanes") with their thresholds lowered below the tuning space (rows wider than 16
columns, chunks of a few dozen elements) so that small rows take several chunks, persistent
programs several rows, and the lanes kernel several rows a program. Tests marked `gpu` use
real sizes and bf16, and time nothing.
"""
import contextlib
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuad.kernels import reference as ref
from gpuad.kernels import tuning
from gpuad.kernels.triton import cross_entropy as ce
from gpuad.kernels.triton import cross_entropy_rows as rows

IGNORE = -100
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
_SMALL = dict(single_pass_max=16, chunk_bytes=512)  # below the tuning space: CPU-sized chunks
#: name -> tuning parameters (over the defaults). "rows" is the defaults (small V: the row kernel).
VARIANTS = {
    "rows": {},
    "chunked": dict(_SMALL, wide_kernel="chunked"),
    "chunked-staged": dict(_SMALL, wide_kernel="chunked", num_stages=3, count="program", programs_per_sm=2),
    "lanes": dict(_SMALL, wide_kernel="lanes"),
    "lanes-rows": dict(_SMALL, wide_kernel="lanes", rows_per_program=4, num_stages=2, count="program"),
}


@contextlib.contextmanager
def use_variant(name):
    """The launcher reads VARIANTS[name] as its tuning parameters (values outside the declared
    space included, which tuning.override would refuse)."""
    params = dict(ce.DEFAULTS, **VARIANTS[name])
    ce.clear_plans()  # the launcher's plans hold the tuning values they were made with
    with mock.patch.object(tuning, "launch_values", lambda op, device_name: params):
        yield
    ce.clear_plans()


@pytest.fixture(params=list(VARIANTS))
def variant(request):
    """Which kernel variant runs: every one of VARIANTS."""
    with use_variant(request.param):
        yield request.param


@pytest.fixture(params=["rows", "chunked", "lanes"])
def kernel(request):
    """Which kernel runs, at its plainest variant (for the tests of argument handling, where
    the variants of one kernel differ in nothing the test reaches)."""
    with use_variant(request.param):
        yield request.param


def make(b, v, dtype=torch.float32, seed=0, scale=3.0, ignore_every=0, device="cpu"):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(b, v, generator=g) * scale).to(dtype).to(device)
    t = torch.randint(0, v, (b,), generator=g)
    if ignore_every:
        t[::ignore_every] = IGNORE
    return x, t.to(device)


def reference(x, t, **kw):
    """The numpy reference on float64 copies (fp16 → float64 is exact)."""
    kw = {k: v for k, v in kw.items() if k in ("ignore_index", "reduction", "label_smoothing", "grad")}
    return ref.softmax_cross_entropy(x.detach().cpu().double().numpy(), t.cpu().numpy(), **kw)


def assert_matches(loss, g, x, t, **kw):
    """loss (fp32) within 1e-5 relative; dlogits within the tolerance of the logits' dtype."""
    r_loss, r_g = reference(x, t, **kw)
    assert loss.dtype == torch.float32
    assert loss.shape == ((x.shape[0],) if kw.get("reduction") == "none" else ())
    np.testing.assert_allclose(loss.cpu().numpy(), r_loss, rtol=1e-5, atol=1e-5)
    if not kw.get("grad", True):
        assert g is None
        return
    assert g.dtype == x.dtype and g.shape == x.shape
    gn = g.detach().cpu().double().numpy()
    assert np.isfinite(gn).all()
    tol = GRAD_TOL[x.dtype]
    np.testing.assert_allclose(gn, r_g, rtol=tol, atol=tol * max(np.abs(r_g).max(), 1e-30))
    ignore_index = kw.get("ignore_index", IGNORE)
    if ignore_index is not None:
        ignored = t.cpu().numpy() == ignore_index
        assert (gn[ignored] == 0).all()  # exact zeros, not tiny values


# --------------------------------------------------------------------- CPU (interpreter)

#: (dtype, reduction, label smoothing): every pair of values occurs once (6 of the 12 combinations).
PAIRWISE = [(torch.float32, "mean", 0.0), (torch.float32, "sum", 0.1), (torch.float32, "none", 0.0),
            (torch.float16, "mean", 0.1), (torch.float16, "sum", 0.0), (torch.float16, "none", 0.1)]


@pytest.mark.parametrize("dtype, reduction, eps", PAIRWISE, ids=lambda v: str(v).replace("torch.", ""))
def test_matches_reference(variant, dtype, reduction, eps):
    """37 × 1031 (unaligned rows for every dtype) on the row kernel; 7 × 517 on the wide
    ones (5 chunks a row in fp32, 3 in fp16; the lanes-rows variant's last group holds 3 rows)."""
    b, v = (37, 1031) if variant == "rows" else (7, 517)
    x, t = make(b, v, dtype, seed=b + int(eps * 10), ignore_every=4)
    loss, g = ce.softmax_cross_entropy(x, t, reduction=reduction, label_smoothing=eps)
    assert_matches(loss, g, x, t, reduction=reduction, label_smoothing=eps)


@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (3, 2), (4, 17), (6, 257), (3, 1025), (2, 1024), (0, 7)])
def test_edge_shapes(variant, shape):
    """Single rows and columns, V just past a power of two (rows) or a chunk (wide kernels)."""
    x, t = make(*shape, seed=sum(shape))
    kw = dict(reduction="none" if shape[0] % 2 else "mean", label_smoothing=0.05)
    loss, g = ce.softmax_cross_entropy(x, t, **kw)
    if shape[0] == 0:
        assert g.shape == (0, shape[1]) and float(loss) == 0.0
        return
    assert_matches(loss, g, x, t, **kw)


@pytest.mark.parametrize("v", [16384, 16385])
def test_default_config_either_side_of_threshold(v):
    """The real launch configuration: the widest one-read row, and the first two-pass row."""
    x, t = make(2, v, seed=v)
    loss, g = ce.softmax_cross_entropy(x, t, label_smoothing=0.1)
    assert_matches(loss, g, x, t, label_smoothing=0.1)


def test_every_tuning_value_is_a_launchable_config():
    """Each value of each parameter (the others at their defaults) picks a kernel whose
    constexprs are consistent, for the target shapes of bench/TARGETS.md and a small one."""
    for name, values in rows.SPACE.items():
        for value in values:
            params = dict(rows.DEFAULTS, **{name: value})
            for b, v, elem in ((8192, 32000, 2), (8192, 128256, 2), (16384, 50257, 2), (4096, 32000, 4), (3, 7, 4)):
                kernel, meta = rows._kernel_config(b, v, v, elem, grad=True, reduction="mean", label_smoothing=0.1,
                                                   params=params)
                grid = rows._grid(kernel, meta, b, 132, params)
                assert 1 <= grid[0] <= b, (name, value, grid)
                assert meta["num_warps"] in (1, 2, 4, 8, 16, 32)
                block = meta["BLOCK"] * meta.get("ROWS", 1)
                if kernel is rows._ce_lanes_kernel:
                    assert block <= rows.LANES_MAX_PER_THREAD * 32 * meta["num_warps"]
                if kernel is rows._ce_rows_kernel:
                    assert meta["BLOCK"] >= v


def test_tuning_override_reaches_the_launcher():
    """tuning.override (the sweep's switch) changes what the launcher launches, and the
    per-GPU cache does not hide it."""
    seen = []
    real = ce._kernel_config

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out[0])
        return out

    x, t = make(2, 20000, seed=1)
    ce.clear_plans()
    with mock.patch.object(ce, "_kernel_config", spy):
        ce.softmax_cross_entropy(x, t, grad=False)
        with tuning.override(ce.OP, wide_kernel="lanes", chunk_bytes=8192):
            loss, _ = ce.softmax_cross_entropy(x, t, grad=False)
        ce.softmax_cross_entropy(x, t, grad=False)  # the first call's plan
        tuning.reload()  # a table read anew: planned again
        ce.softmax_cross_entropy(x, t, grad=False)
    assert seen == [ce._ce_chunked_kernel, ce._ce_lanes_kernel, ce._ce_chunked_kernel]
    assert_matches(loss, None, x, t, grad=False)


def test_tuning_parameters_are_read_once_per_gpu(monkeypatch):
    """The launcher's per-call cost: tuning.launch_values resolves the values once per GPU
    name, then takes them from a cache (unless an override is active)."""
    calls = []
    real = tuning.values
    monkeypatch.setattr(tuning, "values", lambda *a: calls.append(a) or real(*a))
    tuning.reload()
    first = tuning.launch_values(ce.OP, "Some GPU")
    assert tuning.launch_values(ce.OP, "Some GPU") is first and len(calls) == 1
    with tuning.override(ce.OP, warps=8):
        assert tuning.launch_values(ce.OP, "Some GPU")["warps"] == 8 and len(calls) == 2
    assert tuning.launch_values(ce.OP, "Some GPU") is first and first == ce.DEFAULTS


def test_all_rows_ignored(kernel):
    x, t = make(5, 300, seed=1)
    t[:] = IGNORE
    for reduction in ("mean", "sum", "none"):
        loss, g = ce.softmax_cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)
        assert (loss == 0).all() and not torch.isnan(loss).any()
        assert (g == 0).all()


def test_custom_ignore_index_and_int32_targets(kernel):
    x, t = make(8, 131, seed=2)
    t = t.to(torch.int32)
    t[3] = 7
    t[5] = 7
    loss, g = ce.softmax_cross_entropy(x, t, ignore_index=7)
    assert_matches(loss, g, x, t, ignore_index=7)


@pytest.mark.parametrize("ignore_index", [2**32 + 5, 2**40, -2**63, 2**70])
def test_ignore_index_outside_the_targets_dtype_matches_no_row(ignore_index):
    """int32 targets count rows as int64 ones do: torch would wrap 2**32 + 5 to 5 before
    comparing (rows with target 5 dropped from the mean); here no row is ignored."""
    x, t = make(8, 40, seed=3)
    t[::3] = 5
    want = ce.softmax_cross_entropy(x, t, ignore_index=None)
    for targets in (t, t.to(torch.int32)):
        for check in (True, False):
            loss, g = ce.softmax_cross_entropy(x, targets, ignore_index=ignore_index, check_targets=check)
            assert torch.equal(loss, want[0]) and torch.equal(g, want[1]), (targets.dtype, check)
    assert_matches(*want, x, t, ignore_index=None)


def test_ignore_index_none_ignores_no_row(kernel):
    """As the reference: None ignores nothing; a target of -100 is then out of range."""
    x, t = make(6, 50, seed=4)
    loss, g = ce.softmax_cross_entropy(x, t, ignore_index=None, label_smoothing=0.1)
    assert_matches(loss, g, x, t, ignore_index=None, label_smoothing=0.1)
    r_loss, r_g = ce.softmax_cross_entropy(x, t, label_smoothing=0.1)  # no -100 among the targets
    assert torch.equal(loss, r_loss) and torch.equal(g, r_g)
    t[2] = IGNORE
    with pytest.raises(IndexError, match="-100 at row 2"):
        ce.softmax_cross_entropy(x, t, ignore_index=None)


def test_inplace_overwrites_and_returns_the_buffer(variant):
    x, t = make(7, 301, seed=3, ignore_every=3)
    x0 = x.clone()
    loss_ref, g_ref = ce.softmax_cross_entropy(x0.clone(), t)
    loss, g = ce.softmax_cross_entropy(x, t, inplace=True)
    assert g is x
    assert torch.equal(x, g_ref) and torch.equal(loss, loss_ref)
    assert_matches(loss, g, x0, t)


def test_inputs_unchanged_when_not_inplace(kernel):
    x, t = make(6, 200, torch.float16, seed=4, ignore_every=2)
    x0, t0 = x.clone(), t.clone()
    ce.softmax_cross_entropy(x, t, label_smoothing=0.2)
    ce.softmax_cross_entropy(x, t, grad=False)
    assert torch.equal(x, x0) and torch.equal(t, t0)


def test_grad_false_returns_none(variant):
    x, t = make(6, 211, seed=5, ignore_every=4)
    for reduction in ("mean", "none"):
        loss, g = ce.softmax_cross_entropy(x, t, reduction=reduction, grad=False, label_smoothing=0.1)
        assert g is None
        assert_matches(loss, g, x, t, reduction=reduction, grad=False, label_smoothing=0.1)
        assert torch.equal(loss, ce.softmax_cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_huge_logits_stay_finite(kernel, dtype):
    g = torch.Generator().manual_seed(6)
    sign = torch.randint(0, 2, (5, 97), generator=g) * 2.0 - 1.0
    x = (sign * 1e4 + torch.randn(5, 97, generator=g) * 100).to(dtype)
    t = torch.randint(0, 97, (5,), generator=g)
    for eps in (0.0, 0.3):
        loss, grad = ce.softmax_cross_entropy(x, t, reduction="none", label_smoothing=eps)
        assert torch.isfinite(loss).all()
        assert_matches(loss, grad, x, t, reduction="none", label_smoothing=eps)


@pytest.mark.parametrize("layout", ["padded", "padded_aligned", "transposed"])
def test_strided_logits(variant, layout):
    """Row strides other than V (16-byte aligned and not) and a transposed buffer, inplace too."""
    b, v, stride = {"padded": (5, 203, 216), "padded_aligned": (5, 204, 208), "transposed": (5, 203, 203)}[layout]
    x, t = make(b, v, seed=7, ignore_every=4)
    big = torch.randn(b, stride)
    if layout == "transposed":
        view = x.t().contiguous().t()
    else:
        big[:, :v] = x
        view = big[:, :v]
    padding = big[:, v:].clone()
    loss, g = ce.softmax_cross_entropy(view, t, label_smoothing=0.1)
    assert_matches(loss, g, x, t, label_smoothing=0.1)
    loss2, g2 = ce.softmax_cross_entropy(view, t, label_smoothing=0.1, inplace=True)
    assert g2 is view and torch.equal(view, g) and torch.equal(loss2, loss)
    assert torch.equal(big[:, v:], padding)  # nothing written past the rows
    assert_matches(loss2, g2, x, t, label_smoothing=0.1)


@pytest.mark.parametrize("layout", ["expand", "as_strided"])
def test_overlapping_rows_are_copied_and_refused_inplace(kernel, layout):
    """Rows that share memory (a stride-0 expand; as_strided with row stride < V) give the
    loss and gradient of their values; inplace=True on them raises, naming the strides."""
    base, _ = make(1, 300, seed=8)
    t = torch.tensor([3, IGNORE, 250, 7, 0])
    if layout == "expand":
        view = base.expand(5, 300)
    else:
        view = torch.randn(600).as_strided((5, 300), (40, 1))
    before = view.clone()
    for reduction in ("mean", "none"):
        loss, g = ce.softmax_cross_entropy(view, t, reduction=reduction, label_smoothing=0.1)
        assert_matches(loss, g, before, t, reduction=reduction, label_smoothing=0.1)
    assert torch.equal(view, before)
    with pytest.raises(ValueError, match="inplace=True.*strides"):
        ce.softmax_cross_entropy(view, t, inplace=True)
    loss_only, none = ce.softmax_cross_entropy(view, t, inplace=True, grad=False)  # nothing to write
    assert none is None and torch.equal(loss_only, ce.softmax_cross_entropy(before, t, grad=False)[0])


def test_bad_target_raises_index_error_naming_it(kernel):
    x, t = make(4, 50, seed=8)
    t[2] = 53
    with pytest.raises(IndexError, match="53"):
        ce.softmax_cross_entropy(x, t)
    t[2] = -3
    with pytest.raises(IndexError, match="-3"):
        ce.softmax_cross_entropy(x, t)


def test_unchecked_out_of_range_targets_stay_in_bounds(kernel):
    """check_targets=False: bad rows give unspecified values, the other rows stay right."""
    x, t = make(6, 64, seed=9)
    bad = t.clone()
    bad[1], bad[4] = 64 + 1000, -1000
    x0 = x.clone()
    loss, g = ce.softmax_cross_entropy(x, bad, reduction="none", check_targets=False)
    good = torch.tensor([0, 2, 3, 5])
    assert_matches(loss[good], g[good], x[good], t[good], reduction="none")
    assert torch.equal(x, x0)


def test_bad_arguments_raise_value_error():
    x, t = make(4, 10)
    cases = [
        (x[0], t),                                 # logits not 2-D
        (x, t[:3]),                                # targets length mismatch
        (x, t[:, None]),                           # targets 2-D
        (x, t.float()),                            # float targets
        (x.double(), t),                           # float64 logits: the kernel has no fp64 path
        (x.int(), t),                              # integer logits
    ]
    for logits, targets in cases:
        with pytest.raises(ValueError):
            ce.softmax_cross_entropy(logits, targets)
    with pytest.raises(ValueError, match="reduction"):
        ce.softmax_cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        ce.softmax_cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(TypeError):
        ce.softmax_cross_entropy(x.numpy(), t)


@pytest.mark.parametrize("shape", [(4, 0), (0, 0)])
def test_zero_classes_raise_a_clear_error(shape):
    with pytest.raises(ValueError, match="at least one class"):
        ce.softmax_cross_entropy(torch.empty(shape), torch.zeros(shape[0], dtype=torch.int64))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 6), v=st.integers(1, 150), seed=st.integers(0, 2**16),
       reduction=st.sampled_from(["mean", "sum", "none"]), eps=st.sampled_from([0.0, 0.05, 0.5]),
       ignore_every=st.sampled_from([0, 1, 2, 3]), variant=st.sampled_from(list(VARIANTS)),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_fuzz(b, v, seed, reduction, eps, ignore_every, variant, dtype):
    x, t = make(b, v, dtype, seed=seed, ignore_every=ignore_every)
    with use_variant(variant):
        loss, g = ce.softmax_cross_entropy(x, t, reduction=reduction, label_smoothing=eps)
    assert_matches(loss, g, x, t, reduction=reduction, label_smoothing=eps)


# --------------------------------------------------------------------- the general kernel

#: F.cross_entropy's layouts on the general kernel: rows (with weights or probabilities),
#: unbatched, [B, C, T] and [B, C, d1, d2] (classes apart), a [B, T, C] buffer seen as
#: [B, C, T] (classes adjacent, rows C apart) and spatial axes that cannot be walked as one
#: (copied).
GENERAL_LAYOUTS = ("rows", "unbatched", "BCT", "BCHW", "BTC-view", "uncollapsible")


def general_inputs(layout, soft, weighted, dtype, seed, c=37):
    """(logits, targets, weight) of one layout: 7 rows of c = 37 classes or so, every third
    index target ignored, probabilities summing to 1 over the classes."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"rows": (7, c), "unbatched": (c,), "BCT": (3, c, 5), "BCHW": (2, c, 3, 2), "BTC-view": (3, 5, c),
              "uncollapsible": (2, c, 2, 6)}
    x = torch.randn(shapes[layout], generator=g) * 3
    if layout == "BTC-view":
        x = x.transpose(1, 2)
    elif layout == "uncollapsible":
        x = x[:, :, :, ::2]
    x = x.to(dtype)
    class_axis = 0 if x.dim() == 1 else 1
    if soft:
        q = torch.rand(x.shape, generator=g) ** 2
        t = (q / q.sum(dim=class_axis, keepdim=True)).to(dtype)
    else:
        t = torch.randint(0, c, x.shape[:class_axis] + x.shape[class_axis + 1:], generator=g)
        if t.dim():
            t.view(-1)[1::3] = IGNORE
    w = torch.rand(c, generator=g) + 0.1 if weighted else None
    return x, t, w


def general_reference(x, t, w, **kw):
    return ref.softmax_cross_entropy(x.double().numpy(), t.double().numpy() if t.is_floating_point() else t.numpy(),
                                     weight=None if w is None else w.double().numpy(), **kw)


@contextlib.contextmanager
def poisoned_outputs():
    """torch.empty gives NaN-filled tensors: an output element a kernel does not write fails."""
    empty = torch.empty

    def nan_empty(*args, **kw):
        out = empty(*args, **kw)
        return out.fill_(float("nan")) if out.is_floating_point() else out.fill_(-7)

    with mock.patch.object(torch, "empty", nan_empty):
        yield


GENERAL_CASES = [(layout, soft, weighted, (torch.float32, torch.float16)[i % 2], ("mean", "sum", "none")[i % 3],
                  (0.0, 0.1)[(i // 2) % 2]) for i, (layout, soft, weighted) in enumerate(
                     (lay, s, w) for lay in GENERAL_LAYOUTS for s in (False, True) for w in (False, True))]


@pytest.mark.parametrize("layout, soft, weighted, dtype, reduction, eps", GENERAL_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_general_kernel_matches_reference(layout, soft, weighted, dtype, reduction, eps):
    x, t, w = general_inputs(layout, soft, weighted, dtype, seed=GENERAL_CASES.index(
        (layout, soft, weighted, dtype, reduction, eps)))
    x0, t0 = x.clone(), t.clone()
    with poisoned_outputs():
        loss, g = ce.softmax_cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=eps)
        loss_only, none = ce.softmax_cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=eps,
                                                   grad=False)
    r_loss, r_g = general_reference(x, t, w, reduction=reduction, label_smoothing=eps)
    assert loss.dtype == torch.float32 and loss.shape == r_loss.shape
    np.testing.assert_allclose(loss.numpy(), r_loss, rtol=1e-5, atol=1e-5)
    assert g.dtype == x.dtype and g.shape == x.shape
    tol = GRAD_TOL[dtype]
    np.testing.assert_allclose(g.double().numpy(), r_g, rtol=tol, atol=tol * np.abs(r_g).max())
    if not soft:
        assert (g.movedim(0 if x.dim() == 1 else 1, -1)[t == IGNORE] == 0).all()
    assert none is None and torch.equal(loss_only, loss)
    assert torch.equal(x, x0) and torch.equal(t, t0), "the inputs changed"


@pytest.mark.parametrize("layout", ["rows", "BCT", "BTC-view"])
def test_general_kernel_inplace(layout):
    x, t, w = general_inputs(layout, False, True, torch.float32, seed=3)
    _, want = ce.softmax_cross_entropy(x, t, weight=w, label_smoothing=0.1)
    if not x.is_contiguous() and x.dim() > 2:
        with pytest.raises(ValueError, match="inplace=True"):
            ce.softmax_cross_entropy(x, t, weight=w, inplace=True)
        return
    loss, g = ce.softmax_cross_entropy(x, t, weight=w, label_smoothing=0.1, inplace=True)
    assert g is x and torch.allclose(x, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("weighted", [False, True])
def test_general_kernel_divisor_zero(weighted):
    """Every row ignored, or every target's weight 0: loss and gradient 0, not NaN."""
    x = torch.randn(4, 6, 3)
    w = torch.tensor([0.0, 1, 1, 1, 1, 1]) if weighted else None
    t = torch.zeros(4, 3, dtype=torch.int64) if weighted else torch.full((4, 3), IGNORE)
    loss, g = ce.softmax_cross_entropy(x, t, weight=w)
    assert loss.item() == 0 and not g.any()


def test_general_kernel_bad_arguments():
    x, q, _ = general_inputs("BCT", True, False, torch.float32, seed=0)
    with pytest.raises(ValueError, match="ignore_index"):
        ce.softmax_cross_entropy(x, q, ignore_index=0)
    with pytest.raises(ValueError, match="weight"):
        ce.softmax_cross_entropy(x, q, weight=torch.ones(5))
    with pytest.raises(ValueError, match="targets"):
        ce.softmax_cross_entropy(x, q[:, :, :4])
    with pytest.raises(TypeError):
        ce.softmax_cross_entropy(x, q, weight=[1.0] * 37)


# --------------------------------------------------------------------- GPU (real sizes)

def torch_reference(x, t, *, reduction="mean", label_smoothing=0.0, ignore_index=IGNORE, acc=torch.float64):
    """The reference's formulas in torch on the GPU (acc precision), for sizes numpy is slow at."""
    z = x.to(acc)
    z = z - z.amax(dim=1, keepdim=True)
    lse = torch.logsumexp(z, dim=1)
    valid = t != ignore_index
    safe = torch.where(valid, t, 0).long()
    eps, v = label_smoothing, x.shape[1]
    row = lse - (1 - eps) * z.gather(1, safe[:, None])[:, 0] - (eps / v) * z.sum(dim=1)
    row = torch.where(valid, row, 0.0)
    n = valid.sum().clamp(min=1)
    loss = row if reduction == "none" else (row.sum() / n if reduction == "mean" else row.sum())
    g = torch.exp(z - lse[:, None]) - eps / v
    g[torch.arange(len(t), device=x.device), safe] -= 1 - eps
    g *= valid[:, None]
    if reduction == "mean":
        g /= n
    return loss, g


def assert_close_gpu(loss, g, r_loss, r_g, dtype):
    torch.testing.assert_close(loss.double(), r_loss.double(), rtol=1e-4, atol=1e-4)
    tol = GRAD_TOL[dtype]
    torch.testing.assert_close(g.double(), r_g.double(), rtol=tol, atol=tol * r_g.abs().max().item())


def poison_allocator(shape, dtype):
    """Leave a NaN-filled block in torch's caching allocator: the kernel's output buffer is
    likely to reuse it, so an element the kernel fails to write shows up as NaN."""
    torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    torch.cuda.synchronize()


GPU_SHAPES = [(4096, 32000), (512, 50257), (256, 128256), (1024, 8192), (3000, 1000)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gpu_matches_reference(shape, dtype):
    x, t = make(*shape, dtype, seed=shape[1], ignore_every=7, device="cuda")
    for reduction, eps in (("mean", 0.0), ("none", 0.1)):
        poison_allocator(shape, dtype)
        loss, g = ce.softmax_cross_entropy(x, t, reduction=reduction, label_smoothing=eps)
        assert torch.isfinite(g).all() and torch.isfinite(loss).all()
        assert (g[t == IGNORE] == 0).all()
        r_loss, r_g = torch_reference(x, t, reduction=reduction, label_smoothing=eps)
        assert_close_gpu(loss, g, r_loss, r_g, dtype)
        loss_only, none = ce.softmax_cross_entropy(x, t, reduction=reduction, label_smoothing=eps, grad=False)
        assert none is None and torch.equal(loss_only, loss)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(16800, 128256), (262400, 8192)], ids=["two-pass", "one-read"])
def test_gpu_offsets_past_2_pow_31(shape):
    """B·V > 2³¹ in bf16 (~4.3 GB, in place): rows on both sides of element 2³¹ are right."""
    b, v = shape
    assert b * v > 2**31
    g = torch.Generator(device="cuda").manual_seed(11)
    x = torch.randn(b, v, device="cuda", dtype=torch.bfloat16, generator=g)
    t = torch.randint(0, v, (b,), device="cuda", generator=g)
    t[-2] = IGNORE
    first_far = 2**31 // v
    check = torch.tensor([0, 1, first_far - 1, first_far, first_far + 1, b - 2, b - 1], device="cuda")
    x_check, t_check = x[check].clone(), t[check].clone()
    loss, gbuf = ce.softmax_cross_entropy(x, t, reduction="none", inplace=True)
    assert gbuf is x
    assert torch.isfinite(loss).all() and bool(torch.isfinite(gbuf).all())
    assert (gbuf[b - 2] == 0).all()
    r_loss, r_g = torch_reference(x_check, t_check, reduction="none", acc=torch.float32)
    assert_close_gpu(loss[check], gbuf[check], r_loss, r_g, torch.bfloat16)
    del x, gbuf
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 32000), (2048, 50257), (8192, 4096)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_gpu_same_bits_every_run(shape):
    x, t = make(*shape, torch.bfloat16, seed=12, ignore_every=5, device="cuda")
    first = ce.softmax_cross_entropy(x, t, label_smoothing=0.1)
    for _ in range(3):
        again = ce.softmax_cross_entropy(x, t, label_smoothing=0.1)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


@pytest.mark.gpu
def test_gpu_unchecked_bad_targets_do_not_fault():
    x, t = make(64, 50257, torch.bfloat16, seed=13, device="cuda")
    bad = t.clone()
    bad[0], bad[63] = 2**40, -(2**40)
    loss, g = ce.softmax_cross_entropy(x, bad, reduction="none", check_targets=False)
    torch.cuda.synchronize()  # an illegal access would surface here
    r_loss, r_g = torch_reference(x[1:63], t[1:63], reduction="none")
    assert_close_gpu(loss[1:63], g[1:63], r_loss, r_g, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_cupy_in_cupy_out():
    cupy = pytest.importorskip("cupy")
    for dtype in (torch.float32, torch.float16):
        x, t = make(300, 32000, dtype, seed=14, ignore_every=6, device="cuda")
        xc, tc = cupy.from_dlpack(x.clone()), cupy.from_dlpack(t.clone())
        loss, g = ce.softmax_cross_entropy(xc, tc, label_smoothing=0.1)
        assert isinstance(loss, cupy.ndarray) and isinstance(g, cupy.ndarray)
        t_loss, t_g = ce.softmax_cross_entropy(x, t, label_smoothing=0.1)
        assert torch.equal(torch.from_dlpack(loss), t_loss) and torch.equal(torch.from_dlpack(g), t_g)
        loss_none, none = ce.softmax_cross_entropy(xc, tc, reduction="none", grad=False)
        assert none is None and isinstance(loss_none, cupy.ndarray) and loss_none.shape == (300,)
        loss_ip, g_ip = ce.softmax_cross_entropy(xc, tc, label_smoothing=0.1, inplace=True)
        assert g_ip is xc and torch.equal(torch.from_dlpack(xc), t_g)


#: Tuning points checked on the GPU at real sizes (each value of each parameter occurs).
GPU_CANDIDATES = {
    "defaults": {},
    "chunked-staged": dict(num_stages=3, chunk_bytes=16384, programs_per_sm=2, count="program"),
    "chunked-4-stages-8-warps": dict(num_stages=4, warps=8, chunk_bytes=8192, programs_per_sm=4),
    "lanes": dict(wide_kernel="lanes"),
    "lanes-2-rows": dict(wide_kernel="lanes", rows_per_program=2, num_stages=2, warps=8, count="program"),
    "lanes-4-rows": dict(wide_kernel="lanes", rows_per_program=4, num_stages=3, warps=4, programs_per_sm=2),
    "on-chip-32768": dict(single_pass_max=32768),
    "wide-from-4096": dict(single_pass_max=4096, wide_kernel="lanes"),
    "wide-from-8192": dict(single_pass_max=8192),
}


@pytest.mark.gpu
@pytest.mark.parametrize("candidate", list(GPU_CANDIDATES))
@pytest.mark.parametrize("shape", [(1024, 32000), (300, 50257), (64, 128256), (500, 5000)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_gpu_tuning_candidates_match_reference(candidate, shape):
    """Every candidate the sweep may pick, at real sizes in bf16 (and fp32 for the first shape),
    poisoned outputs, mean with smoothing and ignored rows; loss-only gives the same loss."""
    for dtype in (torch.bfloat16, torch.float32) if shape[1] == 32000 else (torch.bfloat16,):
        x, t = make(*shape, dtype, seed=shape[0], ignore_every=5, device="cuda")
        with tuning.override(ce.OP, **GPU_CANDIDATES[candidate]):
            poison_allocator(shape, dtype)
            loss, g = ce.softmax_cross_entropy(x, t, label_smoothing=0.1)
            loss_only, _ = ce.softmax_cross_entropy(x, t, label_smoothing=0.1, grad=False)
        assert torch.isfinite(g).all() and (g[t == IGNORE] == 0).all()
        r_loss, r_g = torch_reference(x, t, label_smoothing=0.1)
        assert_close_gpu(loss, g, r_loss, r_g, dtype)
        assert torch.equal(loss_only, loss)


@pytest.mark.gpu
@pytest.mark.parametrize("candidate", ["defaults", "lanes-2-rows", "on-chip-32768"])
def test_gpu_cuda_graph_capture(candidate):
    """check_targets=False: no host sync, so the call records into a CUDA graph; replays on
    new values give the eager results (the valid-row count is taken on the device)."""
    x, t = make(512, 32000, torch.bfloat16, seed=15, ignore_every=3, device="cuda")
    with tuning.override(ce.OP, **GPU_CANDIDATES[candidate]):
        ce.softmax_cross_entropy(x, t, check_targets=False)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss, g = ce.softmax_cross_entropy(x, t, check_targets=False)
        x2, t2 = make(512, 32000, torch.bfloat16, seed=16, ignore_every=4, device="cuda")
        x.copy_(x2)
        t.copy_(t2)
        graph.replay()
        want = ce.softmax_cross_entropy(x2, t2, check_targets=False)
    torch.cuda.synchronize()
    assert torch.equal(loss, want[0]) and torch.equal(g, want[1])


GENERAL_GPU_CASES = [((64, 128256), True, True), ((64, 32000), False, True), ((4, 1000, 512), False, True),
                     ((4, 1000, 512), True, False), ((2, 19, 64, 64), False, False)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape, soft, weighted", GENERAL_GPU_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_general_kernel_matches_reference(shape, soft, weighted, dtype):
    """The general kernel at real sizes in bf16 and fp32: class weights, probability targets,
    [B, C, T] and [B, C, H, W] read in place, against the float64 reference on the host."""
    g = torch.Generator().manual_seed(shape[1])
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    if soft:
        t = (torch.rand(shape, generator=g) ** 4).to(dtype)
    else:
        t = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g)
        t.view(-1)[1::5] = IGNORE
    w = torch.rand(shape[1], generator=g) + 0.1 if weighted else None
    for reduction, eps in (("mean", 0.1), ("none", 0.0)):
        poison_allocator(shape, dtype)
        loss, dl = ce.softmax_cross_entropy(x.cuda(), t.cuda(), weight=None if w is None else w.cuda(),
                                            reduction=reduction, label_smoothing=eps)
        r_loss, r_g = general_reference(x.float(), t.float() if soft else t, w, reduction=reduction,
                                        label_smoothing=eps)
        np.testing.assert_allclose(loss.cpu().numpy(), r_loss, rtol=1e-4, atol=1e-4)
        tol = GRAD_TOL[dtype]
        np.testing.assert_allclose(dl.cpu().double().numpy(), r_g, rtol=tol, atol=tol * np.abs(r_g).max())

