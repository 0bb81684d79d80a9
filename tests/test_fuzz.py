"""A fuzzer over every public op, transform and kernel entry point (reference; Triton under
the interpreter at tiny shapes).

Inputs: random shapes with 0 and 1 sizes; strides (contiguous, transposed, sliced, expanded
with stride 0, at an offset into a larger buffer); float64 / float32 / float16 (bfloat16 needs
ml_dtypes and the GPU); values normal, tiny (subnormals), huge (±1e4), or sprinkled with NaN,
±inf, ±1e4, subnormals and signed zeros. Every call must either match torch computed in float64
on the same values (rounded to the dtype, within its tolerance), or, for an input that is
invalid by numpy's and the API's rules, raise a ValueError / TypeError / IndexError /
RuntimeError from gpuad's own checks. No input, nor the buffer around a strided one, may change
(unless inplace=True), and every array's writeable flag must be as it was once the graph is gone.

Budgets: a fixed, derandomized example budget in CI (this file runs in well under a minute on
two cores); ``GPUAD_FUZZ=long`` multiplies every budget by 25 and draws fresh random examples.
``GPUAD_FUZZ_REPORT=1`` prints how many inputs of each kind were tried. A failure prints its
falsifying example (every array's shape, dtype, layout, values and seed; every drawn argument)
and the ``@reproduce_failure(...)`` line that replays it exactly under either profile.
"""
import collections
import gc
import math
import os
import re

import numpy as np
import pytest

import gpuad as ad
from gpuad import optim
from gpuad.kernels import reference

torch = pytest.importorskip("torch")
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

F = torch.nn.functional

PROFILE = os.environ.get("GPUAD_FUZZ", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"GPUAD_FUZZ must be 'ci' or 'long', got {PROFILE!r}")
BUDGET = {"ci": 1, "long": 25}[PROFILE]
TRIED = collections.Counter()  # what was tried -> how many times


def tried(entry, valid=True, *arrays):
    """Count one call of `entry` (valid input, or invalid and expected to raise) and the
    kinds of its input arrays (dtype, layout, values, empty or 0-d)."""
    TRIED[f"call  {entry}" + ("" if valid else " (invalid input: a clear error expected)")] += 1
    for spec in arrays:
        if spec is None:
            continue
        shape = spec["shape"]
        TRIED[f"array dtype {np.dtype(spec['dtype']).name}"] += 1
        TRIED[f"array layout {spec['layout']}"] += 1
        TRIED[f"array values {spec['values']}"] += 1
        TRIED["array with a 0-size axis" if 0 in shape else "array 0-d" if not shape else "array non-empty"] += 1


def fuzz(n):
    return settings(max_examples=n * BUDGET, deadline=None, database=None, derandomize=PROFILE == "ci",
                    print_blob=True, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if os.environ.get("GPUAD_FUZZ_REPORT"):
        print(f"\nfuzz ({PROFILE} profile): {sum(n for k, n in TRIED.items() if k.startswith('call'))} calls")
        for kind, n in sorted(TRIED.items()):
            print(f"  {n:6d}  {kind}")


# --- inputs ---------------------------------------------------------------------------
DTYPES = (np.float64, np.float32, np.float16)
LAYOUTS = ("contiguous", "transposed", "sliced", "offset", "expanded")
VALUES = ("special", "rows", "huge", "mixed", "normal", "tiny")
SIDES = (3, 2, 5, 4, 1, 3, 2, 0)  # hypothesis leans to the first; 1 and 0 are the edge sizes
SENTINEL = 7777.0  # fills the buffer around a strided input: a kernel reading it would show
ALLOWED_ERRORS = (ValueError, TypeError, IndexError, RuntimeError)
seeds = st.integers(0, 2 ** 32 - 1)


def _specials(dtype):
    tiny = float(np.finfo(dtype).smallest_subnormal)
    return np.array([np.nan, np.inf, -np.inf, 1e4, -1e4, tiny, -3 * tiny, 0.0, -0.0])


def _values(rng, shape, dtype, kind):
    """normal; tiny (×1e-3 and subnormals); huge (±1e4 and above, one sign); special (every special value once,
    then 30% more); mixed (10% specials); rows (along the last axis: a row of -inf, a row
    holding +inf, a row holding NaN, the rest normal)."""
    v = np.array(rng.standard_normal(shape))  # an array even for shape ()
    flat = v.reshape(-1)
    if kind == "tiny":
        v *= 1e-3
        flat[rng.random(flat.size) < 0.3] = float(np.finfo(dtype).smallest_subnormal) * 5
    elif kind == "huge":  # one sign: sums grow (an fp16 sum of 7 passes its range)
        v[...] = (np.abs(v) + 0.5) * 1e4 * rng.choice([-1.0, 1.0])
    elif kind in ("special", "mixed"):
        pick = rng.random(flat.size) < (0.3 if kind == "special" else 0.1)
        flat[pick] = rng.choice(_specials(dtype), size=int(pick.sum()))
        if kind == "special":
            first = rng.permutation(flat.size)[:9]
            flat[first] = rng.permutation(_specials(dtype))[:first.size]
    elif kind == "rows" and flat.size:
        rows = v.reshape(-1, shape[-1]) if len(shape) else flat.reshape(1, 1)
        rows[0] = -np.inf
        for r, value in ((1, np.inf), (2, np.nan)):
            if r < rows.shape[0] and rows.shape[1]:
                rows[r, rng.integers(rows.shape[1])] = value
    with np.errstate(over="ignore"):
        return np.asarray(v, dtype=dtype)


@st.composite
def specs(draw, shape=None, min_dims=0, max_dims=3, dtypes=DTYPES, values=VALUES, layouts=LAYOUTS):
    if shape is None:
        ndim = draw(st.sampled_from([n for n in (2, 3, 1, 0) if min_dims <= n <= max_dims]))
        shape = tuple(draw(st.sampled_from(SIDES)) for _ in range(ndim))
    return {"shape": tuple(shape), "dtype": draw(st.sampled_from(dtypes)), "layout": draw(st.sampled_from(layouts)),
            "values": draw(st.sampled_from(values)), "seed": draw(seeds)}


def build(spec):
    """(array with the spec's layout, the contiguous buffer behind it)."""
    rng = np.random.default_rng(spec["seed"])
    shape, dtype, layout = spec["shape"], np.dtype(spec["dtype"]), spec["layout"]
    vals = _values(rng, shape, dtype, spec["values"])
    if layout == "transposed" and len(shape) >= 2:
        buf = np.ascontiguousarray(np.swapaxes(vals, -1, -2))
        return np.swapaxes(buf, -1, -2), buf
    if layout == "sliced" and len(shape) >= 1:
        buf = np.full((2 * shape[0],) + shape[1:], SENTINEL, dtype)
        buf[::2] = vals
        return buf[::2], buf
    if layout == "offset":
        buf = np.full(vals.size + 3, SENTINEL, dtype)
        arr = buf[1:1 + vals.size].reshape(shape)
        arr[...] = vals
        return arr, buf
    if layout == "expanded" and len(shape) >= 1 and shape[0] != 1:
        buf = np.ascontiguousarray(vals[:1])
        return np.broadcast_to(buf, shape), buf
    return vals, vals


class Watch:
    """Remembers input buffers (bytes and writeable flags) to check they were left alone."""

    def __init__(self, *pairs):
        self.items = [(a, buf, buf.copy(), a.flags.writeable, buf.flags.writeable) for a, buf in pairs]

    def check(self, modified=()):
        for i, (a, buf, before, a_w, buf_w) in enumerate(self.items):
            if i not in modified:
                assert buf.tobytes() == before.tobytes(), f"input {i} (or the buffer around it) was modified"
            assert (a.flags.writeable, buf.flags.writeable) == (a_w, buf_w), f"input {i}: writeable flag not restored"


def t64(a):
    """A float64 torch copy of a numpy array (exact for every float dtype here)."""
    return torch.from_numpy(np.array(a, dtype=np.float64))


def oracle(torch_fn, inputs, requires, u=None, same_dtype=False):
    """torch's value of torch_fn at `inputs` (numpy arrays, or Python floats passed as they
    are) and, given the cotangent `u`, the gradient of each input in `requires` (None for the
    others): in float64, or with `same_dtype` in the inputs' own dtypes (None when torch has no
    such kernel)."""
    ts = [a if isinstance(a, float) else
          torch.from_numpy(np.array(a, dtype=a.dtype if same_dtype else np.float64)).requires_grad_(r)
          for a, r in zip(inputs, requires)]
    try:
        y = torch_fn(*ts)
        if u is not None and y.requires_grad:
            y.backward(torch.from_numpy(np.array(u, dtype=np.float64)).to(y.dtype))
    except (RuntimeError, NotImplementedError):  # e.g. no float16 kernel on the CPU
        if same_dtype:
            return None, [None] * len(ts)
        raise
    grads = [None if isinstance(t, float) or not r else (t.grad if t.grad is not None else torch.zeros(t.shape))
             for t, r in zip(ts, requires)]
    return y.detach(), grads


TOL = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 2e-5, np.dtype(np.float16): 4e-3}


def magnitude(*arrays):
    """The largest finite |value| among `arrays` (at least 1): scales the absolute slack."""
    m = 1.0
    for a in arrays:
        a = np.asarray(a, dtype=np.float64)
        finite = a[np.isfinite(a)]
        if finite.size:
            m = max(m, float(np.abs(finite).max()))
    return m


def _host(a):
    return np.asarray(a.detach().numpy() if isinstance(a, torch.Tensor) else a, dtype=np.float64)


def close(got, expected, dtype, scale=1.0, what="", ignore=None, alt=None):
    """`got` (computed in `dtype`) against the exact `expected` (float64) rounded to `dtype`:
    NaN where expected has NaN, the same infinities (a finite value at the edge of the range
    may round either way), and |got - want| <= tol (|want| + scale) elsewhere. An entry may
    instead match `alt`, torch computed in `dtype` itself (an intermediate overflow, inf - inf,
    is then NaN on both sides). `ignore`: a mask of entries not compared (the derivative where
    the function is NaN)."""
    dtype = np.dtype(dtype)
    got, expected = _host(got), _host(expected)
    with np.errstate(over="ignore", invalid="ignore"):
        want = expected.astype(dtype).astype(np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    keep = np.ones(got.shape, bool) if ignore is None else ~np.broadcast_to(ignore, got.shape)
    g, w = got[keep], want[keep]
    tol, big = TOL[dtype], 0.99 * float(np.finfo(dtype).max)

    def matches(w, exact):
        edge = np.isfinite(exact) & (np.abs(exact) >= big)
        ok = (np.isnan(g) & np.isnan(w)) | (g == w) | (edge & (np.abs(g) >= big))
        with np.errstate(invalid="ignore", over="ignore"):
            return ok | (np.isfinite(g) & np.isfinite(w) & (np.abs(g - w) <= tol * (np.abs(w) + scale)))

    ok = matches(w, expected[keep])
    if alt is not None and not ok.all():
        same = _host(alt)
        assert same.shape == got.shape, f"{what}: torch in {dtype} gives shape {same.shape}"
        ok |= matches(same[keep], same[keep])
    if not ok.all():
        i = int(np.argmin(ok))
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.size} entries differ ({dtype}, tol {tol}, "
                             f"scale {scale:.3g}); first: got {g[i]!r}, expected {w[i]!r} "
                             f"(exact {expected[keep][i]!r})")


def clear_error(exc):
    """An allowed type, raised by gpuad's own code (not leaked from numpy / torch internals)."""
    assert isinstance(exc, ALLOWED_ERRORS), f"{type(exc).__name__}: {exc}"
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_code.co_filename.replace("\\", "/")
    assert "/gpuad/" in where or "/kernels/" in where, f"{type(exc).__name__} raised in {where}: {exc}"
    assert str(exc), "an error without a message"


def run(call, valid, what):
    """call(); when `valid` it must succeed, otherwise raise a clear error. Returns the result
    or None (after an expected error)."""
    if valid:
        return call()
    with pytest.raises(ALLOWED_ERRORS) as info:
        call()
    note(f"{what}: {type(info.value).__name__}: {info.value}")
    clear_error(info.value)
    return None


def cotangent(rng, shape, dtype):
    return np.asarray(rng.standard_normal(shape), dtype=dtype)


def _axis_valid(axis, ndim):
    if axis is None:
        return True
    axes = (axis,) if isinstance(axis, int) else axis
    return all(-ndim <= a < ndim for a in axes) and len({a % ndim for a in axes}) == len(axes)


def _dims(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    return tuple(sorted({a % ndim for a in ((axis,) if isinstance(axis, int) else axis)}))


# --- one-input ops ----------------------------------------------------------------------
ELEMENTWISE = {
    "exp": (ad.exp, torch.exp), "log": (ad.log, torch.log), "tanh": (ad.tanh, torch.tanh),
    "sigmoid": (ad.sigmoid, torch.sigmoid), "relu": (ad.relu, torch.relu), "gelu": (ad.gelu, F.gelu),
    "gelu_tanh": (lambda x: ad.gelu(x, approximate="tanh"), lambda t: F.gelu(t, approximate="tanh")),
    "neg": (ad.neg, torch.neg), "operator neg": (lambda x: -x, lambda t: -t),
    "to numpy": (lambda x: ad.to(x, "numpy"), lambda t: t * 1.0),
}
POWERS = (2, 3, 0.5, -1.0, 0, 1.5)
SHAPED = ("sum", "mean", "softmax", "log_softmax", "logsumexp", "sq_norm", "reshape", "transpose", "getitem", "pow")


def _one_input_call(op, x_np, data):
    """(ad_fn, torch_fn, valid, elementwise) for `op` at x, its arguments drawn from `data`."""
    ndim = x_np.ndim
    if op in ELEMENTWISE:
        return (*ELEMENTWISE[op], True, True)
    if op == "pow":
        p = data.draw(st.sampled_from(POWERS), "p")
        return (lambda x: x ** p), (lambda t: torch.pow(t, p)), True, True
    if op in ("sum", "mean", "logsumexp"):
        axis = data.draw(st.one_of(st.none(), st.integers(-ndim - 1, ndim),
                                   st.lists(st.integers(-ndim - 1, ndim), max_size=ndim + 1).map(tuple)), f"{op} axis")
        keepdims = data.draw(st.booleans(), "keepdims")
        valid = _axis_valid(axis, ndim)
        dims = _dims(axis, ndim) if valid else ()
        torch_op = {"sum": torch.sum, "mean": torch.mean, "logsumexp": torch.logsumexp}[op]

        def torch_fn(t):
            if not dims:  # numpy's axis=(): reduce nothing
                return torch_op(t.unsqueeze(-1), dim=-1)
            return torch_op(t, dim=dims, keepdim=keepdims)
        return (lambda x: getattr(ad, op)(x, axis=axis, keepdims=keepdims)), torch_fn, valid, False
    if op in ("softmax", "log_softmax"):
        axis = data.draw(st.integers(-ndim - 1, ndim), f"{op} axis")
        return (lambda x: getattr(ad, op)(x, axis=axis)), (lambda t: getattr(torch, op)(t, dim=axis)), \
            _axis_valid(axis, ndim), False
    if op == "sq_norm":
        return ad.sq_norm, (lambda t: 0.5 * (t * t).sum()), True, False
    if op == "reshape":
        return (lambda x: x.reshape(-1)), (lambda t: t.reshape(-1)), True, False
    if op == "transpose":
        perm = tuple(data.draw(st.permutations(range(ndim)), "perm"))
        bad = data.draw(st.integers(0, 5), "bad axes") == 0
        perm = perm + (0,) if bad else perm
        return (lambda x: ad.transpose(x, perm)), (lambda t: t.permute(perm)), not bad, False
    # getitem: a basic slice, an int, an int array (repeats accumulate), a boolean mask
    index, valid = (), True
    if ndim:
        n = x_np.shape[0]
        kind = data.draw(st.sampled_from(["slice", "int", "array", "mask"]), "index kind")
        if kind == "slice":
            index = slice(data.draw(st.integers(-n - 1, n + 1)), data.draw(st.integers(-n - 1, n + 1)),
                          data.draw(st.integers(1, 3)))
        elif kind == "int":
            index = data.draw(st.integers(-n - 1, n), "int index")
            valid = -n <= index < n
        elif kind == "array":
            index = np.array(data.draw(st.lists(st.integers(0, n), max_size=4)), dtype=np.int64)
            valid = bool((index < n).all())
        else:
            index = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    tindex = torch.from_numpy(index.copy()) if isinstance(index, np.ndarray) else index
    return (lambda x: x[index]), (lambda t: t[tindex]), valid, False


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@fuzz(50)
@given(data=st.data())
def test_one_input_ops(dtype, data):
    """Every one-input op on one drawn input (arguments drawn per op)."""
    spec = data.draw(specs(dtypes=(dtype,)), "x")
    for op in sorted(ELEMENTWISE) + list(SHAPED):
        x_np, buf = build(spec)
        ad_fn, torch_fn, valid, elementwise = _one_input_call(op, x_np, data)
        if op == "getitem" and not valid:  # numpy's own IndexError names the axis and the size: clear enough
            with pytest.raises(IndexError):
                ad_fn(ad.Tensor(x_np, requires_grad=True))
            continue
        _check_one_input(op, spec, x_np, buf, ad_fn, torch_fn, valid, elementwise)


def _check_one_input(op, spec, x_np, buf, ad_fn, torch_fn, valid, elementwise):
    ndim, dtype = x_np.ndim, x_np.dtype
    tried(f"one-input op {op}", valid, spec)
    watch = Watch((x_np, buf))
    x = ad.Tensor(x_np, requires_grad=True)
    with np.errstate(all="ignore"):
        y = run(lambda: ad_fn(x), valid, op)
    if y is None:
        watch.check()
        return
    assert y.dtype == dtype, f"{op}: output dtype {y.dtype}, input {dtype}"
    u = cotangent(np.random.default_rng(spec["seed"] + 1), y.shape, dtype)
    yt, (gt,) = oracle(torch_fn, [x_np], [True], u)
    yd, (gd,) = oracle(torch_fn, [x_np], [True], u, same_dtype=True)
    scale = magnitude(x_np) * (max(x_np.size, 1) if op in ("sum", "sq_norm") else 1)
    if op == "sq_norm":
        scale *= magnitude(x_np)
    close(y.data, yt, dtype, scale, f"{op} value", alt=yd)
    with np.errstate(all="ignore"):
        y.backward(u)
    # elementwise: no gradient is compared where the function is NaN, nor at a pole on a signed
    # zero (d/dx x**-1 at -0.0: the sign of the infinity is the zero's; numpy and torch differ)
    ignore = (np.isnan(_host(yt)) | ((x_np == 0) & np.isinf(_host(gt)))) if elementwise else None
    close(x.grad, gt, dtype, scale * magnitude(u), f"{op} gradient", ignore=ignore, alt=gd)
    del y, x
    watch.check()


# --- two-input ops -----------------------------------------------------------------------
BINARY = {
    "add": (ad.add, torch.add), "sub": (ad.sub, torch.sub), "mul": (ad.mul, torch.mul), "div": (ad.div, torch.div),
    "+": (lambda a, b: a + b, lambda a, b: a + b), "/": (lambda a, b: a / b, lambda a, b: a / b),
    "matmul": (ad.matmul, torch.matmul), "@": (lambda a, b: a @ b, lambda a, b: a @ b),
    "where": (None, None),
}
COMPARISONS = {"==": np.equal, "!=": np.not_equal, "<": np.less, ">=": np.greater_equal}


@st.composite
def binary_specs(draw, dtype, matmul):
    """Two input specs: broadcastable shapes (sometimes not), or matmul operands (1-D, 2-D or
    batched; sometimes with mismatched inner sizes); b in another dtype now and then."""
    dtype_b = draw(st.sampled_from(DTYPES)) if draw(st.integers(0, 4)) == 0 else dtype
    side = st.sampled_from(SIDES)
    if matmul:
        k, lead = draw(side), tuple(draw(st.lists(st.sampled_from((2, 1)), max_size=2)))
        a_shape = lead + (draw(side), k) if draw(st.integers(0, 3)) else (k,)
        b_shape = (k, draw(side)) if draw(st.integers(0, 3)) else (k,)
        if draw(st.integers(0, 5)) == 0:
            b_shape = (k + 1,) + b_shape[1:]
    else:
        a_shape = tuple(draw(side) for _ in range(draw(st.sampled_from((2, 3, 1, 0)))))
        b_shape = a_shape[draw(st.integers(0, len(a_shape))):]
        b_shape = tuple(1 if draw(st.integers(0, 3)) == 0 else n for n in b_shape)
        if draw(st.integers(0, 8)) == 0:
            b_shape = (7,) + b_shape  # an extra leading axis (it may still broadcast)
        if draw(st.integers(0, 8)) == 0 and b_shape:
            b_shape = b_shape[:-1] + (b_shape[-1] + 2,)  # a trailing size that does not broadcast
    return draw(specs(shape=a_shape, dtypes=(dtype,))), draw(specs(shape=b_shape, dtypes=(dtype_b,)))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@fuzz(30)
@given(data=st.data())
def test_two_input_ops(dtype, data):
    """Every two-input op and comparison on one drawn pair (matmul on a matmul pair)."""
    pair, matmul_pair = data.draw(binary_specs(dtype, matmul=False), "pair"), data.draw(binary_specs(dtype, True), "mm")
    for op in sorted(BINARY) + sorted(COMPARISONS):
        requires = data.draw(st.sampled_from(["both", "a", "b"]), f"{op} requires")
        scalar_b = op not in ("matmul", "@") and data.draw(st.integers(0, 4), f"{op} scalar b") == 0
        _check_two_inputs(op, *(matmul_pair if op in ("matmul", "@") else pair), requires, scalar_b)


def _check_two_inputs(op, spec_a, spec_b, requires, scalar_b):
    a_np, buf_a = build(spec_a)
    b_np, buf_b = build(spec_b)
    if scalar_b:
        b_np = buf_b = np.asarray(np.random.default_rng(spec_b["seed"]).standard_normal() * 3)
    watch = Watch((a_np, buf_a), (b_np, buf_b))
    try:
        out_shape = (np.broadcast_shapes(a_np.shape, b_np.shape) if op not in ("matmul", "@")
                     else np.matmul(np.zeros(a_np.shape), np.zeros(b_np.shape)).shape)
        valid = True
    except ValueError:
        valid = False
    tried(f"two-input op {op}", valid, spec_a, None if scalar_b else spec_b)
    a = ad.Tensor(a_np, requires_grad=requires in ("both", "a"))
    b = float(b_np) if scalar_b else ad.Tensor(b_np, requires_grad=requires in ("both", "b"))
    cond = np.asarray(np.random.default_rng(spec_a["seed"]).random(out_shape if valid else ()) < 0.5)
    if op in COMPARISONS:
        expr = {"==": lambda p, q: p == q, "!=": lambda p, q: p != q, "<": lambda p, q: p < q,
                ">=": lambda p, q: p >= q}[op]
        with np.errstate(all="ignore"):
            got = run(lambda: expr(a, b), valid, op)
        if got is not None:
            np.testing.assert_array_equal(got.numpy(), COMPARISONS[op](a_np, b_np))
            assert not got.requires_grad
        watch.check()
        return
    ad_fn, torch_fn = BINARY[op]
    if op == "where":
        ad_fn = lambda p, q: ad.where(cond, p, q)  # noqa: E731
        torch_fn = lambda p, q: torch.where(torch.from_numpy(cond.copy()), p, q)  # noqa: E731
    with np.errstate(all="ignore"):
        y = run(lambda: ad_fn(a, b), valid, op)
    if y is None:
        watch.check()
        return
    dtype = a_np.dtype if scalar_b else np.result_type(a_np.dtype, b_np.dtype)
    inputs = [a_np, b if scalar_b else b_np]
    u = cotangent(np.random.default_rng(spec_b["seed"]), y.shape, dtype) if y.requires_grad else None
    need = [True, not scalar_b]
    yt, grads = oracle(torch_fn, inputs, need, u)
    yd, grads_d = oracle(torch_fn, inputs, need, u, same_dtype=True)
    assert y.dtype == dtype, f"{op}: {y.dtype}, expected {dtype}"
    k = a_np.shape[-1] if op in ("matmul", "@") and a_np.ndim else 1
    scale = magnitude(a_np) * magnitude(b_np) * max(k, 1)
    smallest_b = float(np.abs(b_np[np.isfinite(b_np) & (b_np != 0)]).min(initial=1.0))
    if op in ("div", "/"):
        scale = magnitude(a_np) / min(smallest_b, 1.0)
    close(y.data, yt, dtype, scale, f"{op} value", alt=yd)
    if not y.requires_grad:
        watch.check()
        return
    with np.errstate(all="ignore"):
        y.backward(u)
    for name, mine, theirs, same, arr in (("a", a, grads[0], grads_d[0], a_np), ("b", b, grads[1], grads_d[1], b_np)):
        if isinstance(mine, ad.Tensor) and mine.requires_grad:
            gscale = scale * magnitude(u) / magnitude(arr) * (max(y.size, 1) if op in ("matmul", "@") else 1)
            if op in ("div", "/"):
                gscale = scale * magnitude(u) / (min(smallest_b, 1.0) if name == "b" else 1.0)
            close(mine.grad, theirs, mine.dtype, gscale, f"{op} gradient of {name}", alt=same)
    del y, a, b
    watch.check()


# --- linear ------------------------------------------------------------------------------
@st.composite
def linear_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    k, n = draw(st.sampled_from(SIDES)), draw(st.sampled_from(SIDES))
    lead = tuple(draw(st.lists(st.sampled_from(SIDES), min_size=0, max_size=2)))
    w_shape = (n, k + 1) if draw(st.integers(0, 6)) == 0 else (n, k)  # sometimes mismatched
    return (draw(specs(shape=lead + (k,), dtypes=(dtype,))), draw(specs(shape=w_shape, dtypes=(dtype,))),
            draw(st.one_of(st.none(), specs(shape=(n,), dtypes=(dtype,)))),
            draw(st.sampled_from(["all", "x", "w", "b"])))


@fuzz(70)
@given(case=linear_case())
def test_linear(case):
    sx, sw, sb, requires = case
    (x_np, bx), (w_np, bw) = build(sx), build(sw)
    b_np, bb = build(sb) if sb is not None else (None, None)
    valid = w_np.shape[1] == x_np.shape[-1] and x_np.ndim >= 1
    tried("ad.linear", valid, sx, sw, sb)
    watch = Watch(*[(p, q) for p, q in ((x_np, bx), (w_np, bw), (b_np, bb)) if p is not None])
    req = {"x": requires in ("all", "x"), "w": requires in ("all", "w"), "b": requires in ("all", "b")}
    x, w = ad.Tensor(x_np, requires_grad=req["x"]), ad.Tensor(w_np, requires_grad=req["w"])
    b = ad.Tensor(b_np, requires_grad=req["b"]) if b_np is not None else None
    with np.errstate(all="ignore"):
        y = run(lambda: ad.linear(x, w, b), valid, "linear")
    if y is None:
        watch.check()
        return
    inputs = [x_np, w_np] + ([b_np] if b_np is not None else [])
    u = cotangent(np.random.default_rng(sx["seed"]), y.shape, x_np.dtype) if y.requires_grad else None
    yt, grads = oracle(F.linear, inputs, [True] * len(inputs), u)
    # in the dtype itself op by op, as gpuad computes it: x Wᵀ is rounded before + b (torch's fused
    # addmm rounds once: at fp16 overflow, -inf + inf is NaN here and inf there)
    yd, grads_d = oracle(lambda x, w, b=None: x @ w.T if b is None else x @ w.T + b, inputs, [True] * len(inputs),
                         u, same_dtype=True)
    scale = magnitude(x_np) * magnitude(w_np) * max(x_np.shape[-1], 1) + magnitude(b_np if b_np is not None else 0)
    close(y.data, yt, x_np.dtype, scale, "linear value", alt=yd)
    if y.requires_grad:
        with np.errstate(all="ignore"):
            y.backward(u)
        m = max(int(np.prod(x_np.shape[:-1])), 1)
        for i, (name, mine, other) in enumerate((("x", x, w_np), ("w", w, x_np), ("b", b, None))):
            if mine is not None and mine.requires_grad:
                gscale = magnitude(u) * (magnitude(other) * max(w_np.shape[0], m) if other is not None else m)
                close(mine.grad, grads[i], x_np.dtype, gscale, f"linear gradient of {name}", alt=grads_d[i])
    del y, x, w, b
    watch.check()


# --- softmax cross-entropy: the engine op and the reference kernel --------------------------
def torch_cross_entropy(logits, targets, ignore_index, reduction, label_smoothing):
    """torch in float64 with gpuad's contract where it differs on purpose: ignored rows have
    gradient 0 whatever their logits, and a mean over no valid row is 0."""
    valid = targets != (ignore_index if ignore_index is not None else np.iinfo(np.int64).min)
    lt = t64(logits).requires_grad_()
    safe = np.where(valid, targets, 0).astype(np.int64)
    z = lt.reshape(-1, lt.shape[-1]) if lt.shape[-1] else lt.reshape(-1, 0)
    rows = F.cross_entropy(z, torch.from_numpy(safe.reshape(-1)), reduction="none", label_smoothing=label_smoothing)
    rows = torch.where(torch.from_numpy(valid.reshape(-1)), rows, torch.zeros(()))
    n_valid = int(valid.sum())
    if reduction == "none":
        loss = rows.reshape(targets.shape)
    else:
        loss = rows.sum() / (max(n_valid, 1) if reduction == "mean" else 1)
    return lt, loss, torch.from_numpy(valid)


@st.composite
def ce_case(draw, ndim_choices=(2, 3), target_layouts=False):
    dtype = draw(st.sampled_from(DTYPES))
    v = draw(st.sampled_from(SIDES))
    lead = tuple(draw(st.lists(st.sampled_from(SIDES), min_size=ndim_choices[0] - 1, max_size=ndim_choices[-1] - 1)))
    logits = draw(specs(shape=lead + (v,), dtypes=(dtype,)))
    ignore_index = draw(st.sampled_from([-100, -1, 0, None]))
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, max(v, 1), size=lead).astype(draw(st.sampled_from([np.int64, np.int32])))
    ignored = rng.random(lead) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    if ignore_index is not None:
        targets[ignored] = ignore_index
    bad_target = draw(st.integers(0, 9)) == 0 and targets.size > 0
    if bad_target:
        targets.reshape(-1)[0] = draw(st.sampled_from([v, v + 3, -5]))
    reduction = draw(st.sampled_from(["mean", "sum", "none"] + (["avg"] if draw(st.integers(0, 15)) == 0 else [])))
    smoothing = draw(st.sampled_from([0.0, 0.0, 0.1, 1.0] + ([-0.1, 1.5] if draw(st.integers(0, 10)) == 0 else [])))
    return logits, targets, ignore_index, reduction, smoothing


def _ce_valid(v, targets, ignore_index, reduction, smoothing):
    in_range = (targets >= 0) & (targets < v)
    if ignore_index is not None:
        in_range |= targets == ignore_index
    return v >= 1 and bool(in_range.all()) and reduction in ("mean", "sum", "none") and 0.0 <= smoothing <= 1.0


def _check_ce(loss, dlogits, logits_np, targets, ignore_index, reduction, smoothing, what, u=None):
    lt, loss_t, valid = torch_cross_entropy(logits_np, targets, ignore_index, reduction, smoothing)
    if dlogits is not None and not np.isfinite(logits_np[~valid.numpy()]).all():
        TRIED[f"case  {what} cross-entropy: an ignored row holding NaN or inf"] += 1
    acc = np.float64 if logits_np.dtype == np.float64 else np.float32
    scale = magnitude(logits_np) + math.log(max(logits_np.shape[-1], 1)) + 1
    close(loss, loss_t, acc, scale * (targets.size if reduction != "mean" else 1), f"{what} loss")
    if dlogits is None:
        return
    u = np.ones(loss_t.shape) if u is None else u
    loss_t.backward(torch.from_numpy(np.asarray(u, dtype=np.float64)))
    expected = lt.grad.reshape(logits_np.shape)
    # an ignored row's gradient is exactly 0, a NaN logit in it notwithstanding
    expected = torch.where(valid.reshape(valid.shape + (1,)), expected, torch.zeros(()))
    close(dlogits, expected, logits_np.dtype, magnitude(u), f"{what} dlogits")
    assert not np.any(np.asarray(dlogits)[~np.asarray(valid)]), f"{what}: an ignored row has a gradient"


@fuzz(90)
@given(case=ce_case())
def test_softmax_cross_entropy_op(case):
    spec, targets, ignore_index, reduction, smoothing = case
    logits_np, buf = build(spec)
    valid = _ce_valid(logits_np.shape[-1], targets, ignore_index, reduction, smoothing)
    tried("ad.softmax_cross_entropy", valid, spec)
    watch = Watch((logits_np, buf), (targets, targets))
    z = ad.Tensor(logits_np, requires_grad=True)
    kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing)
    with np.errstate(all="ignore"):
        loss = run(lambda: ad.softmax_cross_entropy(z, targets, **kw), valid, "cross-entropy")
    if loss is not None:
        u = cotangent(np.random.default_rng(spec["seed"]), loss.shape, loss.dtype)
        with np.errstate(all="ignore"):
            loss.backward(u)
            _check_ce(loss.data, z.grad, logits_np, targets, ignore_index, reduction, smoothing, "ad op", u)
            with ad.no_grad():  # the loss alone (no gradient buffer) is the same loss
                np.testing.assert_array_equal(ad.softmax_cross_entropy(z, targets, **kw).numpy(), loss.numpy())
    del loss, z
    watch.check()


@fuzz(70)
@given(case=ce_case(ndim_choices=(2,)), inplace=st.booleans(), target_layout=st.booleans())
def test_reference_cross_entropy_kernel(case, inplace, target_layout):
    spec, targets, ignore_index, reduction, smoothing = case
    logits_np, buf = build(spec)
    if target_layout:  # targets every other element of a larger buffer
        t_buf = np.full(2 * targets.size, 12345, dtype=targets.dtype)
        t_buf[::2] = targets
        targets = t_buf[::2]
    else:
        t_buf = targets
    valid = _ce_valid(logits_np.shape[-1], targets, ignore_index, reduction, smoothing)
    writes = inplace
    if writes and not logits_np.flags.writeable:
        valid = False  # an expanded (stride 0) input cannot take the gradient in place
    tried(f"reference.softmax_cross_entropy (inplace={inplace})", valid, spec)
    original = logits_np.copy()
    watch = Watch((logits_np, buf), (targets, t_buf))
    kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing)
    with np.errstate(all="ignore"):
        out = run(lambda: reference.softmax_cross_entropy(logits_np, targets, inplace=inplace, **kw), valid,
                  "reference CE")
    if out is not None:
        loss, dlogits = out
        if writes:
            assert dlogits is logits_np
        with np.errstate(all="ignore"):
            _check_ce(loss, dlogits.copy(), original, targets, ignore_index, reduction, smoothing, "reference")
            loss_only, none = reference.softmax_cross_entropy(original, targets, grad=False, **kw)
        assert none is None
        np.testing.assert_array_equal(loss_only, loss)
    watch.check(modified={0} if writes and out is not None else ())


@st.composite
def linear_backward_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    k, n = draw(st.sampled_from(SIDES)), draw(st.sampled_from(SIDES))
    lead = tuple(draw(st.lists(st.sampled_from(SIDES), min_size=1, max_size=2)))
    dy_lead = lead if draw(st.integers(0, 8)) else lead[:-1] + (lead[-1] + 1,)
    return (draw(specs(shape=lead + (k,), dtypes=(dtype,))), draw(specs(shape=(n, k), dtypes=(dtype,))),
            draw(specs(shape=dy_lead + (n,), dtypes=(dtype,))), draw(st.booleans()), draw(st.booleans()),
            draw(st.booleans()))


def _expected_linear_backward(x, w, dy):
    xt, wt, dyt = t64(x), t64(w), t64(dy)
    k, n, m = w.shape[1], w.shape[0], int(np.prod(x.shape[:-1]))
    dy2, x2 = dyt.reshape(m, n), xt.reshape(m, k)
    return (dy2 @ wt).reshape(x.shape), dy2.T @ x2, dy2.sum(0)


@fuzz(60)
@given(case=linear_backward_case())
def test_reference_linear_backward_kernel(case):
    sx, sw, sdy, bias, need_dx, accumulate = case
    (x, bx), (w, bw), (dy, bdy) = build(sx), build(sw), build(sdy)
    valid = dy.shape[:-1] == x.shape[:-1]
    acc = np.random.default_rng(sx["seed"]).standard_normal(w.shape).astype(np.float32) if accumulate else None
    acc_before = None if acc is None else acc.copy()
    tried(f"reference.linear_backward (dw_accumulate: {accumulate})", valid, sx, sw, sdy)
    watch = Watch((x, bx), (w, bw), (dy, bdy))
    with np.errstate(all="ignore"):
        out = run(lambda: reference.linear_backward(x, w, dy, bias=bias, dw_accumulate=acc, need_dx=need_dx),
                  valid, "reference linear_backward")
    if out is not None:
        dx, dw, db = out
        ex, ew, eb = _expected_linear_backward(x, w, dy)
        m = max(int(np.prod(x.shape[:-1])), 1)
        scale = magnitude(x, w) * magnitude(dy) * max(m, w.shape[0])
        if need_dx:
            close(dx, ex, x.dtype, scale, "dx")
        else:
            assert dx is None
        if accumulate:
            assert dw is acc
            close(dw, ew + t64(acc_before), np.float32, scale + magnitude(acc_before), "dw accumulated")
        else:
            close(dw, ew, x.dtype, scale, "dw")
        if bias:
            close(db, eb, x.dtype, magnitude(dy) * m, "db")
        else:
            assert db is None
    watch.check()


# --- transforms --------------------------------------------------------------------------
SMOOTH = {
    "exp sum": lambda v: ad.sum(ad.exp(v)), "tanh sq_norm": lambda v: ad.sq_norm(ad.tanh(v)),
    "softmax": lambda v: ad.softmax(v), "logsumexp": lambda v: ad.logsumexp(v),
    "gelu*sigmoid": lambda v: ad.gelu(v) * ad.sigmoid(v), "mean of squares": lambda v: ad.mean(v * v, axis=-1),
    "matmul": lambda v: ad.matmul(v, ad.tensor(np.arange(12.0).reshape(-1, 3)[:v.shape[-1]] / 7).data)
    if v.ndim else v * 2.0,
}


@fuzz(40)
@given(name=st.sampled_from(sorted(SMOOTH)), shape=st.lists(st.sampled_from((1, 2, 3)), min_size=1, max_size=2),
       seed=seeds, inside_no_grad=st.booleans(), argnums=st.sampled_from([0, (0,), -1, 1, (0, 0)]))
def test_transforms(name, shape, seed, inside_no_grad, argnums):
    f = SMOOTH[name]
    x = np.random.default_rng(seed).standard_normal(tuple(shape))
    before = x.copy()
    valid_argnums = argnums in (0, (0,), -1)
    tried("transforms: jacobian fwd and rev, vjp, jvp, grad, value_and_grad, gradcheck"
          + (" inside no_grad" if inside_no_grad else ""), valid_argnums)
    ctx = ad.no_grad() if inside_no_grad else ad.enable_grad()
    with ctx:
        J_rev = run(lambda: ad.jacobian(f, argnums=argnums, mode="rev")(x), valid_argnums, "jacobian argnums")
        if J_rev is None:
            return
        if isinstance(argnums, tuple):
            (J_rev,) = J_rev
        J_fwd = ad.jacobian(f, mode="fwd")(x)
        out, pullback = ad.vjp(f, x)
        u = np.random.default_rng(seed + 1).standard_normal(out.shape)
        (ct,) = pullback(u)
        t = np.random.default_rng(seed + 2).standard_normal(x.shape)
        _, tangent = ad.jvp(f, (x,), (t,))
        if out.size == 1:
            value, g = ad.value_and_grad(f)(x)
            np.testing.assert_allclose(value, out, rtol=1e-12)
            np.testing.assert_allclose(g * u.reshape(-1)[0], ct, rtol=1e-9, atol=1e-12)
        assert ad.is_grad_enabled() == (not inside_no_grad)
    np.testing.assert_allclose(J_fwd, J_rev, rtol=1e-9, atol=1e-12)
    m = int(np.prod(out.shape))
    J = J_rev.reshape(m, x.size)
    np.testing.assert_allclose(ct.reshape(-1), u.reshape(-1) @ J, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(tangent.reshape(-1), J @ t.reshape(-1), rtol=1e-9, atol=1e-12)
    assert ad.gradcheck(f, x)
    del pullback
    gc.collect()
    np.testing.assert_array_equal(x, before)
    assert x.flags.writeable


# --- optimizers: arguments, parameter groups, gradients ------------------------------------
OPT_KEYS = {"SGD": ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"),
            "Adam": ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"),
            "AdamW": ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")}
REAL_KEYS = ("lr", "momentum", "dampening", "weight_decay", "eps")
FLAGS = ("nesterov", "maximize", "amsgrad")
GOOD_REAL = (0.1, 0.0, 0.5, 1, 1e-3)
BAD_REAL = (-0.1, float("nan"), "0.1", None, True, [0.1])
GOOD_BETAS = ((0.9, 0.999), (0.0, 0.5), [0.5, 0.9])
BAD_BETAS = ((0.9,), 0.9, (0.9, 1.0), (-0.1, 0.5), ("0.9", 0.99), (0.9, 0.99, 0.5), None)
LAYOUTS_OPT = ("list", "tuple", "generator", "groups", "group of one Tensor", "bare Tensor", "listed twice",
               "in two groups", "mixed", "group without params", "empty")
GRADS = ("right", "none", "broadcastable", "other shape", "list")
OPT_SHAPES = ((2,), (3, 2), ())


def _opt_valid_value(key, value):
    if key in FLAGS:
        return True
    if key == "betas":
        return (isinstance(value, (tuple, list)) and len(value) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in value))
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


@st.composite
def optimizer_case(draw):
    name = draw(st.sampled_from(sorted(OPT_KEYS)))
    kwargs = {}
    for key in OPT_KEYS[name]:
        kind = draw(st.sampled_from(["default", "good", "good", "good", "default", "good", "good", "bad"]), key)
        if kind == "default":
            continue
        if key in FLAGS:
            kwargs[key] = draw(st.booleans())
        elif key == "betas":
            kwargs[key] = draw(st.sampled_from(GOOD_BETAS if kind == "good" else BAD_BETAS))
        else:
            kwargs[key] = draw(st.sampled_from(GOOD_REAL if kind == "good" else BAD_REAL))
    shapes = draw(st.lists(st.sampled_from(OPT_SHAPES), min_size=2, max_size=3))
    group_lr = draw(st.sampled_from(GOOD_REAL + BAD_REAL[:2]))
    grads = draw(st.lists(st.sampled_from(GRADS), min_size=len(shapes), max_size=len(shapes)))
    return name, kwargs, shapes, draw(st.sampled_from(LAYOUTS_OPT)), group_lr, grads, draw(seeds)


def _opt_params(layout, ps, group_lr):
    """(params argument, whether it is valid): the parameters `ps` laid out as `layout`."""
    first, rest = ps[0], ps[1:]
    return {
        "list": (list(ps), True), "tuple": (tuple(ps), True), "generator": ((p for p in ps), True),
        "groups": ([{"params": [first]}, {"params": rest, "lr": group_lr}], _opt_valid_value("lr", group_lr)),
        "group of one Tensor": ([{"params": first}, {"params": rest}], True),
        "bare Tensor": (first, False), "listed twice": (list(ps) + [first], False),
        "in two groups": ([{"params": list(ps)}, {"params": [first]}], False),
        "mixed": ([{"params": [first]}] + list(rest), False),
        "group without params": ([{"params": list(ps)}, {}], False),
        "empty": ([], False),
    }[layout]


def _opt_grad(kind, shape, rng):
    """A .grad of `kind` for a parameter of `shape`: an array (of the right shape or not), a list or None."""
    if kind == "none":
        return None
    if kind == "list":
        return np.asarray(rng.standard_normal(shape)).reshape(-1).tolist()
    wrong = {"right": shape, "broadcastable": (1,) * len(shape) if shape else (2,), "other shape": shape + (2,)}
    return np.asarray(rng.standard_normal(wrong[kind]))


@fuzz(40)
@given(case=optimizer_case())
def test_optimizer_arguments_groups_and_grads(case):
    """Every optimizer built from drawn hyperparameters (good, default or bad in type or value),
    parameter layouts (lists, generators, groups; a parameter twice, a bare Tensor, mixed) and
    .grads (missing, of another shape, a list): a clear error before anything moves, or two
    steps equal to torch.optim's on the same groups."""
    name, kwargs, shapes, layout, group_lr, grad_kinds, seed = case
    rng = np.random.default_rng(seed)
    values = [rng.standard_normal(s) for s in shapes]
    ours = [ad.tensor(v, requires_grad=True) for v in values]
    valid = all(_opt_valid_value(k, v) for k, v in kwargs.items())
    if name == "SGD" and kwargs.get("nesterov") and valid:
        valid = kwargs.get("momentum", 0) > 0 and kwargs.get("dampening", 0) == 0
    params, layout_valid = _opt_params(layout, ours, group_lr)
    tried(f"optim.{name} ({layout})", valid and layout_valid)
    opt = run(lambda: getattr(optim, name)(params, **kwargs), valid and layout_valid, f"optim.{name}")
    if opt is None:
        return
    theirs = [torch.tensor(v, requires_grad=True) for v in values]
    torch_params = _opt_params(layout, theirs, group_lr)[0]
    ref = getattr(torch.optim, name)(torch_params, **kwargs)
    for step in range(2):
        grads = [_opt_grad(kind, s, rng) for kind, s in zip(grad_kinds, shapes)]
        for p, t, g in zip(ours, theirs, grads):
            p.grad = g
            t.grad = None if g is None or isinstance(g, list) or np.shape(g) != t.shape else torch.tensor(g)
        grads_valid = all(g is None or np.shape(g) == s and not isinstance(g, list) for g, s in zip(grads, shapes))
        before = [p.data.copy() for p in ours]
        tried(f"optim.{name}.step", grads_valid)
        if not grads_valid:
            run(opt.step, False, f"optim.{name}.step")
            for p, b in zip(ours, before):
                np.testing.assert_array_equal(p.data, b)  # nothing moved
            return
        opt.step()
        ref.step()
        for p, t in zip(ours, theirs):
            np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-12, atol=1e-14, equal_nan=True)


# --- the command lines: python -m gpuad train / walk, python -m bench -----------------------
# Each numeric flag's domain (kind, low, high, low_open), as --help states it. A command line
# of drawn flags must reach the work (a stub here) when every value lies in its domain, and
# otherwise exit 2 before any work with one line naming a bad flag.
CLI_NUMBERS = {
    "train": {"--epochs": (int, 1, None, False), "--batch-size": (int, 1, None, False),
              "--lr": (float, 0, None, True), "--momentum": (float, 0, None, False),
              "--weight-decay": (float, 0, None, False), "--label-smoothing": (float, 0, 1, False),
              "--test-fraction": (float, 0, 0.9, True), "--seed": (int, 0, 2 ** 32 - 1, False),
              "--threads": (int, 1, None, False)},
    "walk": {"--depth": (int, 1, 1000, False), "--width": (int, 1, 512, False), "--sigma": (float, 0, None, True),
             "--seed": (int, 0, 2 ** 32 - 1, False)},
    "bench": {"--threads": (int, 0, None, False), "--budget-s": (float, 0, None, True)},
}
CLI_TEXTS = ("1", "3", "0", "-1", "0.5", "0.95", "1e-3", "nan", "inf", "-inf", "abc", "", "4294967295",
             "4294967296", "1e400")
WALK_SIZES = ("1", "3", "0", "-2", "1001", "513", "x")  # small: a valid walk runs its forward pass for real
HIDDEN = {"32": True, "16,8": True, "none": True, "0": False, "8,x": False, "1000000,1000000": False}
PATHS = {"ok": True, "suffix": False, "missing folder": False, "read-only folder": False}


class _Worked(Exception):
    """Raised by the stubs standing in for the work: the flags were accepted."""


def _in_domain(text, kind, low, high, low_open):
    try:
        value = kind(text)
    except ValueError:
        return False
    return math.isfinite(value) and (value > low if low_open else value >= low) and (high is None or value <= high)


def _path(kind, tmp, name, suffix):
    return {"ok": str(tmp / f"{name}{suffix}"), "suffix": str(tmp / f"{name}.txt"),
            "missing folder": str(tmp / "no" / "such" / f"{name}{suffix}"),
            "read-only folder": f"/proc/{name}{suffix}"}[kind]


@st.composite
def command_line(draw, tmp):
    """(program, argv, the flags whose values are out of their domain)."""
    program = draw(st.sampled_from(sorted(CLI_NUMBERS)))
    argv, bad = [], []
    for flag, domain in CLI_NUMBERS[program].items():
        if draw(st.integers(0, 2)) == 0 and not (program == "walk" and flag == "--depth"):
            continue
        texts = WALK_SIZES if program == "walk" and flag in ("--depth", "--width") else CLI_TEXTS
        if draw(st.integers(0, 7)):  # mostly a value from the domain, so that whole lines are good too
            texts = [t for t in texts if _in_domain(t, *domain)]
        text = draw(st.sampled_from(texts), flag)
        argv += [f"{flag}={text}"]
        if not _in_domain(text, *domain):
            bad.append(flag)
    if program == "train" and draw(st.booleans()):
        hidden = draw(st.sampled_from(sorted(HIDDEN)), "--hidden")
        argv += [f"--hidden={hidden}"]
        bad += [] if HIDDEN[hidden] else ["--hidden"]
    if draw(st.booleans()):
        flag, suffix = ("--out", "") if program == "bench" else ("--plot", ".png")
        kind = draw(st.sampled_from(sorted(PATHS) if program != "bench" else ["ok", "read-only folder"]), flag)
        argv += [flag, _path(kind, tmp, "out", suffix)]
        bad += [] if PATHS[kind] else [flag]
    return program, argv, bad


def _cli_main(program, argv):
    from bench.__main__ import main as bench_main
    from gpuad.__main__ import main as gpuad_main
    try:
        return bench_main(argv) if program == "bench" else gpuad_main([program] + argv)
    except SystemExit as e:
        return e.code


@fuzz(40)
@given(data=st.data())
def test_command_lines(data, tmp_path, monkeypatch, capsys):
    """python -m gpuad train / walk --depth and python -m bench on drawn flags: the work starts
    exactly when every flag is good; otherwise one line naming a bad flag, exit status 2."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/ is not installed
    from bench import harness
    from gpuad import train, walk

    def work(*_, **__):
        raise _Worked
    for module, name in ((train, "train"), (walk, "run_depth"), (harness, "Env")):
        monkeypatch.setattr(module, name, work)
    monkeypatch.chdir(tmp_path)  # bench's default --out is made here
    program, argv, bad = data.draw(command_line(tmp_path), "command line")
    tried(f"command line: {program}", not bad)
    capsys.readouterr()
    if not bad:
        try:
            code = _cli_main(program, argv)
        except _Worked:
            return
        # walk's one refusal that depends on the numbers: a --sigma whose stack leaves float64
        assert code == 2 and program == "walk", code
        assert re.search(r"error: --sigma \S+ (saturates|overflows|underflows)", capsys.readouterr().err)
        return
    assert _cli_main(program, argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and lines, captured
    assert any(flag in lines[-1] for flag in bad), (bad, lines[-1])
    assert lines[-1].startswith(f"python -m {'bench' if program == 'bench' else 'gpuad ' + program}: error:"), lines


# --- Triton kernels under the interpreter --------------------------------------------------
try:  # the engine and reference fuzzing above runs without triton
    from gpuad.kernels import triton as tk
except ImportError:
    tk = None
# CPU tensors under the Triton interpreter (tests/conftest.py sets it when there is no CUDA device)
needs_triton = pytest.mark.skipif(tk is None or torch.cuda.is_available(),
                                  reason="needs triton, and the interpreter (CPU tensors, no CUDA device)")

TORCH = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}


def torch_layout(arr, layout):
    """A torch tensor holding `arr`'s values with `layout`'s strides, and its storage buffer."""
    base = torch.from_numpy(np.array(arr))  # a copy: an inplace kernel must not write the caller's array
    if layout == "transposed" and base.ndim == 2:
        buf = base.T.contiguous()
        return buf.T, buf
    if layout == "sliced" and base.ndim >= 1:
        buf = torch.full((2 * base.shape[0],) + tuple(base.shape[1:]), SENTINEL, dtype=base.dtype)
        buf[::2] = base
        return buf[::2], buf
    if layout == "expanded" and base.ndim >= 1:  # rows sharing memory (stride 0); values of row 0
        buf = base[:1].clone()
        return buf.expand(base.shape), buf
    if layout == "offset":
        buf = torch.full((base.numel() + 3,), SENTINEL, dtype=base.dtype)
        t = buf[1:1 + base.numel()].view(base.shape)
        t.copy_(base)
        return t, buf
    return base, base


def same_bits(a, b):
    """Bitwise equality of two float tensors (NaN equals itself)."""
    view = torch.int16 if a.dtype == torch.float16 else torch.int32
    return torch.equal(a.view(view), b.view(view))


TRITON_LAYOUTS = ("contiguous", "transposed", "sliced", "offset", "expanded")


def layout_values(arr, layout):
    """The values a tensor built by torch_layout(arr, layout) holds (expanded: row 0 repeated)."""
    return np.broadcast_to(arr[:1], arr.shape).copy() if layout == "expanded" and arr.ndim >= 1 else arr


@st.composite
def triton_ce_case(draw):
    dtype = draw(st.sampled_from((np.float32, np.float16)))
    b, v = draw(st.sampled_from((0, 1, 2, 3))), draw(st.sampled_from((1, 2, 5, 9)))
    spec = draw(specs(shape=(b, v), dtypes=(dtype,), layouts=("contiguous",)))
    rng = np.random.default_rng(draw(seeds))
    targets = rng.integers(0, v, size=b).astype(draw(st.sampled_from([np.int64, np.int32])))
    ignore_index = draw(st.sampled_from([-100, 0, None, 2 ** 32 + 1]))
    if ignore_index is not None and np.iinfo(targets.dtype).min <= ignore_index <= np.iinfo(targets.dtype).max:
        targets[rng.random(b) < draw(st.sampled_from([0.0, 0.5, 1.0]))] = ignore_index
    return (spec, targets, ignore_index, draw(st.sampled_from(TRITON_LAYOUTS)),
            draw(st.sampled_from(["mean", "sum", "none"])), draw(st.sampled_from([0.0, 0.1])), draw(st.booleans()),
            draw(st.booleans()))


@needs_triton
@fuzz(12)
@given(case=triton_ce_case())
def test_triton_cross_entropy_kernel(case):
    spec, targets, ignore_index, layout, reduction, smoothing, grad, inplace = case
    logits_np, _ = build(spec)
    logits, buf = torch_layout(logits_np, layout)
    logits_np = layout_values(logits_np, layout)
    t = torch.from_numpy(targets)
    before, t_before = buf.clone(), t.clone()
    tried(f"triton.softmax_cross_entropy (interpreter, inplace={inplace})", True, dict(spec, layout=layout))
    kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing, grad=grad)
    if inplace and grad and layout == "expanded" and logits.shape[0] > 1:
        with pytest.raises(ValueError, match="logits"):  # rows sharing memory cannot take one gradient each
            tk.softmax_cross_entropy(logits, t, inplace=True, **kw)
        assert same_bits(buf, before), "logits modified"
        return
    loss, dlogits = tk.softmax_cross_entropy(logits, t, inplace=inplace, **kw)
    with np.errstate(all="ignore"):
        _check_ce(loss.numpy(), None if dlogits is None else dlogits.float().numpy().astype(logits_np.dtype),
                  logits_np, targets, ignore_index, reduction, smoothing, "triton")
    if not (grad and inplace):
        assert same_bits(buf, before), "logits modified"
    assert torch.equal(t, t_before)


@st.composite
def triton_linear_case(draw):
    dtype = draw(st.sampled_from((np.float32, np.float16)))
    m, k, n = (draw(st.sampled_from((0, 1, 2, 3, 5))) for _ in range(3))
    return (draw(specs(shape=(m, k), dtypes=(dtype,), values=("normal", "huge", "tiny"))),
            draw(specs(shape=(n, k), dtypes=(dtype,), values=("normal",))),
            draw(specs(shape=(m, n), dtypes=(dtype,), values=("normal",))),
            [draw(st.sampled_from(TRITON_LAYOUTS)) for _ in range(3)], draw(st.booleans()), draw(st.booleans()),
            draw(st.sampled_from(["fused", "cublas"])))


@needs_triton
@fuzz(10)
@given(case=triton_linear_case())
def test_triton_linear_backward_kernel(case):
    sx, sw, sdy, layouts, bias, need_dx, route = case
    arrays = [build(s)[0] for s in (sx, sw, sdy)]
    tensors = [torch_layout(a, layout) for a, layout in zip(arrays, layouts)]
    arrays = [layout_values(a, layout) for a, layout in zip(arrays, layouts)]
    befores = [buf.clone() for _, buf in tensors]
    tried(f"triton.linear_backward (interpreter, route={route})", True,
          *(dict(s, layout=layout) for s, layout in zip((sx, sw, sdy), layouts)))
    dx, dw, db = tk.linear_backward(*(t for t, _ in tensors), bias=bias, need_dx=need_dx, route=route)
    x, w, dy = arrays
    ex, ew, eb = _expected_linear_backward(x, w, dy)
    scale = magnitude(x, w) * magnitude(dy) * 5
    if need_dx:
        close(dx.float().numpy(), ex, x.dtype, scale, "triton dx")
    close(dw.float().numpy(), ew, x.dtype, scale, "triton dw")
    if bias:
        close(db.float().numpy(), eb, x.dtype, magnitude(dy) * 5, "triton db")
    for (_, buf), before in zip(tensors, befores):
        assert torch.equal(buf, before), "an input was modified"


# --- bugs the fuzzer found in the Triton launchers, fixed there: one reproducer each -----------


def _ce_reference(logits, targets, **kw):
    return reference.softmax_cross_entropy(np.array(logits, dtype=np.float64), np.asarray(targets), **kw)


@needs_triton
def test_triton_cross_entropy_overlapping_rows():
    logits = torch.randn(1, 5, generator=torch.Generator().manual_seed(0)).expand(3, 5)
    targets = torch.tensor([0, 2, 4])
    loss, dlogits = tk.softmax_cross_entropy(logits, targets)
    ref_loss, ref_grad = _ce_reference(logits.numpy(), targets.numpy())
    np.testing.assert_allclose(loss.numpy(), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(dlogits.numpy(), ref_grad, rtol=1e-5, atol=1e-7)


@needs_triton
def test_triton_cross_entropy_inplace_on_overlapping_rows():
    logits = torch.randn(1, 5, generator=torch.Generator().manual_seed(0)).expand(3, 5)
    targets = torch.tensor([0, 2, 4])
    _, ref_grad = _ce_reference(logits.numpy(), targets.numpy())
    try:
        _, dlogits = tk.softmax_cross_entropy(logits, targets, inplace=True)
    except (ValueError, RuntimeError) as e:  # a clear refusal is a fix too
        assert "logits" in str(e)
        return
    np.testing.assert_allclose(dlogits.numpy(), ref_grad, rtol=1e-5, atol=1e-7)


@needs_triton
def test_triton_cross_entropy_int32_targets_ignore_index_outside_int32():
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 1, 2, 1], dtype=torch.int32)
    loss32, _ = tk.softmax_cross_entropy(logits, targets, ignore_index=2 ** 32 + 1)
    loss64, _ = tk.softmax_cross_entropy(logits, targets.long(), ignore_index=2 ** 32 + 1)
    ref_loss, _ = _ce_reference(logits.numpy(), targets.numpy(), ignore_index=2 ** 32 + 1)
    np.testing.assert_allclose(loss64.numpy(), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(loss32.numpy(), ref_loss, rtol=1e-5)


@needs_triton
def test_triton_cross_entropy_ignore_index_none():
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 1, 2, 3])
    loss, dlogits = tk.softmax_cross_entropy(logits, targets, ignore_index=None)
    ref_loss, ref_grad = _ce_reference(logits.numpy(), targets.numpy(), ignore_index=None)
    np.testing.assert_allclose(loss.numpy(), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(dlogits.numpy(), ref_grad, rtol=1e-5, atol=1e-7)


@needs_triton
@pytest.mark.parametrize("route", ["fused", "cublas"])
@pytest.mark.parametrize("m,k,n", [(3, 0, 4), (3, 2, 0)], ids=["K=0", "N=0"])
def test_triton_linear_backward_empty_k_or_n(route, m, k, n):
    g = torch.Generator().manual_seed(0)
    x, w, dy = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(m, n, generator=g)
    dx, dw, db = tk.linear_backward(x, w, dy, route=route)
    ex, ew, eb = reference.linear_backward(x.numpy(), w.numpy(), dy.numpy())
    for got, want in ((dx, ex), (dw, ew), (db, eb)):
        assert tuple(got.shape) == want.shape
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


@needs_triton
def test_triton_linear_backward_bf16_under_the_interpreter_refuses():
    g = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(*s, generator=g).bfloat16() for s in ((3, 4), (5, 4), (3, 5)))
    try:
        dx, dw, db = tk.linear_backward(x, w, dy, route="fused")
    except (ValueError, RuntimeError, TypeError) as e:  # a clear refusal is the fix the issue asks for
        assert "bfloat16" in str(e) or "bf16" in str(e)
        return
    ex, ew, _ = reference.linear_backward(x.float().numpy(), w.float().numpy(), dy.float().numpy())
    np.testing.assert_allclose(dw.float().numpy(), ew, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(dx.float().numpy(), ex, rtol=2e-2, atol=2e-2)


@needs_triton
def test_triton_cross_entropy_inplace_on_empty_logits_with_zero_strides():
    """An empty [0, V] tensor (numpy gives it zero strides) shares no memory: inplace works."""
    logits = torch.from_numpy(np.zeros((0, 2), np.float32))
    loss, dlogits = tk.softmax_cross_entropy(logits, torch.zeros(0, dtype=torch.int64), inplace=True)
    assert dlogits.shape == (0, 2) and float(loss) == 0.0


# --- F.cross_entropy's options: class weights, probability targets, the [C] and N-d layouts ---
@st.composite
def full_ce_case(draw, dtypes=DTYPES, layouts=LAYOUTS, values=VALUES):
    """(logits spec, targets, weight, ignore_index, reduction, label_smoothing): logits [C] or
    [B, C, d1, ...] (up to two d's); class indices (int64 / int32, some ignored) or
    probabilities (unnormalised, some 0) of the logits' shape; weight None, positive, or with
    zeros."""
    dtype = draw(st.sampled_from(dtypes))
    c = draw(st.sampled_from((3, 1, 5, 2)))
    unbatched = draw(st.integers(0, 5)) == 0
    extra = tuple(draw(st.lists(st.sampled_from(SIDES), max_size=2)))
    shape = (c,) if unbatched else (draw(st.sampled_from(SIDES)), c) + extra
    spec = draw(specs(shape=shape, dtypes=(dtype,), layouts=layouts, values=values))
    rng = np.random.default_rng(draw(seeds))
    ignore_index = draw(st.sampled_from([-100, 0, None]))
    if draw(st.booleans()):  # probabilities
        targets = (rng.random(shape) * (rng.random(shape) < 0.7)).astype(dtype)
    else:
        t_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
        targets = rng.integers(0, c, size=t_shape).astype(draw(st.sampled_from([np.int64, np.int32])))
        if ignore_index is not None:
            targets[rng.random(t_shape) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = ignore_index
    weight = draw(st.sampled_from([None, "positive", "zeros"]))
    if weight is not None:
        weight = (rng.random(c) + 0.1) * ((rng.random(c) < 0.6) if weight == "zeros" else 1.0)
        weight = weight.astype(draw(st.sampled_from([np.float64, np.float32])))
    return (spec, targets, weight, ignore_index, draw(st.sampled_from(["mean", "sum", "none"])),
            draw(st.sampled_from([0.0, 0.1, 1.0])))


def torch_full_cross_entropy(logits, targets, weight, ignore_index, reduction, eps):
    """torch's formulas for F.cross_entropy in float64, with gpuad's contract where it differs on
    purpose: a term whose factor (w_c·q_c) is 0 adds 0 even at a -inf logit, a row without
    target mass (every factor 0) has loss and gradient 0, a mean's divisor of 0 counts as 1.
    Returns (logits tensor, loss, rows with a gradient, divisor)."""
    lt = t64(logits).requires_grad_()
    cls = 0 if lt.dim() == 1 else 1
    c = lt.shape[cls]
    logp = torch.log_softmax(lt, cls)
    w = (torch.ones(c, dtype=torch.float64) if weight is None else t64(weight)).view(
        [c if i == cls else 1 for i in range(lt.dim())])
    if np.issubdtype(targets.dtype, np.floating):
        a = (t64(targets) * (1 - eps) + eps / c) * w
        valid = torch.ones(lt.shape[:cls] + lt.shape[cls + 1:], dtype=torch.bool)
        denom = float(max(valid.numel(), 1))
    else:
        tt = torch.from_numpy(targets.astype(np.int64))
        valid = tt != ignore_index if ignore_index is not None else torch.ones(tt.shape, dtype=torch.bool)
        onehot = F.one_hot(torch.where(valid, tt, 0), c).movedim(-1, cls).double()
        w_t = (w * onehot).sum(cls)
        a = ((1 - eps) * w_t.unsqueeze(cls) * onehot + eps / c * w) * valid.unsqueeze(cls)
        denom = float((w_t * valid).sum()) or 1.0
    rows = -torch.where(a != 0, a * logp, torch.zeros(())).sum(cls)
    valid = valid & (a.sum(cls) != 0)
    rows = torch.where(valid, rows, torch.zeros(()))
    loss = rows if reduction == "none" else rows.sum() / (denom if reduction == "mean" else 1.0)
    return lt, loss, valid, denom


def _check_full_ce(loss, dlogits, logits_np, targets, weight, ignore_index, reduction, eps, what, u=None):
    lt, loss_t, valid, denom = torch_full_cross_entropy(logits_np, targets, weight, ignore_index, reduction, eps)
    acc = np.float64 if logits_np.dtype == np.float64 else np.float32
    w_max = 1.0 if weight is None else max(float(np.max(weight)), 1e-3)
    spread = w_max * max(1, valid.numel()) / (denom if reduction == "mean" else 1.0)
    scale = (magnitude(logits_np) + math.log(max(lt.shape[0 if lt.dim() == 1 else 1], 1)) + 1) * w_max
    close(loss, loss_t, acc, scale * (spread if reduction != "none" else 1.0), f"{what} loss")
    if dlogits is None:
        return
    u = np.ones(loss_t.shape) if u is None else u
    loss_t.backward(torch.from_numpy(np.asarray(u, dtype=np.float64)))
    cls = 0 if lt.dim() == 1 else 1
    expected = torch.where(valid.unsqueeze(cls), lt.grad, torch.zeros(()))  # ignored rows: exactly 0
    close(dlogits, expected, logits_np.dtype, magnitude(u) * w_max * max(1.0, 1.0 / denom), f"{what} dlogits")
    assert not np.any(np.moveaxis(np.asarray(dlogits), cls, -1)[~valid.numpy()]), f"{what}: an ignored row has a gradient"


def _full_ce_valid(targets, ignore_index):
    soft = np.issubdtype(targets.dtype, np.floating)
    return not (soft and ignore_index is not None and ignore_index >= 0)


@fuzz(40)
@given(case=full_ce_case(), inplace=st.booleans())
def test_reference_cross_entropy_options(case, inplace):
    spec, targets, weight, ignore_index, reduction, eps = case
    logits_np, buf = build(spec)
    valid = _full_ce_valid(targets, ignore_index) and not (inplace and not logits_np.flags.writeable)
    tried(f"reference.softmax_cross_entropy, options (inplace={inplace})", valid, spec)
    original = logits_np.copy()
    watch = Watch((logits_np, buf), (targets, targets), *(() if weight is None else ((weight, weight),)))
    kw = dict(weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=eps)
    with np.errstate(all="ignore"):
        out = run(lambda: reference.softmax_cross_entropy(logits_np, targets, inplace=inplace, **kw), valid,
                  "reference CE options")
    if out is not None:
        loss, dlogits = out
        assert not inplace or dlogits is logits_np
        with np.errstate(all="ignore"):
            _check_full_ce(loss, dlogits.copy(), original, targets, weight, ignore_index, reduction, eps,
                           "reference")
            loss_only, none = reference.softmax_cross_entropy(original, targets, grad=False, **kw)
        assert none is None
        np.testing.assert_array_equal(loss_only, loss)
    watch.check(modified={0} if inplace and out is not None else ())


@needs_triton
@fuzz(12)
@given(case=full_ce_case(dtypes=(np.float32, np.float16), layouts=("contiguous", "sliced", "offset")),
       grad=st.booleans())
def test_triton_cross_entropy_options(case, grad):
    spec, targets, weight, ignore_index, reduction, eps = case
    logits_np, _ = build(spec)
    logits, buf = torch_layout(logits_np, spec["layout"])
    t = torch.from_numpy(targets)
    w = None if weight is None else torch.from_numpy(weight)
    before, t_before = buf.clone(), t.clone()
    valid = _full_ce_valid(targets, ignore_index)
    tried("triton.softmax_cross_entropy, options (interpreter)", valid, spec)
    kw = dict(weight=w, ignore_index=ignore_index, reduction=reduction, label_smoothing=eps, grad=grad)
    with np.errstate(all="ignore"):
        out = run(lambda: tk.softmax_cross_entropy(logits, t, **kw), valid, "triton CE options")
    if out is not None:
        loss, dlogits = out
        with np.errstate(all="ignore"):
            _check_full_ce(loss.numpy(), None if dlogits is None else dlogits.float().numpy().astype(logits_np.dtype),
                           logits_np, targets, weight, ignore_index, reduction, eps, "triton")
    assert same_bits(buf, before) and torch.equal(t, t_before), "an input was modified"


@fuzz(25)
@given(case=full_ce_case(dtypes=(np.float64, np.float32), layouts=("contiguous", "sliced", "offset", "expanded")),
       bypass=st.booleans())
def test_torch_cross_entropy_options(case, bypass):
    """gpuad.torch.cross_entropy (the eager Function or the registered op) over weights,
    probability targets and N-d layouts: the loss and ∂/∂logits against torch's formulas."""
    import gpuad.torch as gt

    spec, targets, weight, ignore_index, reduction, eps = case
    logits_np, _ = build(spec)
    logits, buf = torch_layout(logits_np, spec["layout"])
    logits.requires_grad_()
    t = torch.from_numpy(targets)
    w = None if weight is None else torch.from_numpy(weight)
    before = buf.detach().clone()
    valid = _full_ce_valid(targets, ignore_index)
    tried(f"gpuad.torch.cross_entropy, options (bypass={bypass})", valid, spec)
    index = -100 if ignore_index is None else ignore_index  # torch's ignore_index is an int: -100 matches none here
    saved, gt.EAGER_BYPASS = gt.EAGER_BYPASS, bypass
    try:
        with np.errstate(all="ignore"):
            loss = run(lambda: gt.cross_entropy(logits, t, w, ignore_index=index, reduction=reduction,
                                                label_smoothing=eps), valid, "gpuad.torch CE options")
        if loss is not None:
            (dlogits,) = torch.autograd.grad(loss, logits, torch.ones_like(loss))
            with np.errstate(all="ignore"):
                _check_full_ce(loss.detach().numpy(), dlogits.numpy(), logits_np, targets, weight, ignore_index,
                               reduction, eps, "gpuad.torch")
    finally:
        gt.EAGER_BYPASS = saved
    assert buf.numel() == 0 or same_bits(buf.detach(), before), "an input was modified"


# --- gpuad.torch: eager Function, registered custom op, compiled; first and second order ----------
gt = pytest.importorskip("gpuad.torch")
TORCH_OPS = ("cross_entropy", "linear", "linear_cross_entropy")
GT_LAYOUTS = ("contiguous", "transposed", "sliced", "offset", "expanded")


@st.composite
def torch_op_case(draw, valid_only=False):
    """(op, named numpy arrays with their layouts, options, targets): valid inputs, and now and then
    an ignore_index of the wrong type, an unknown reduction or an out-of-range target."""
    op = draw(st.sampled_from(TORCH_OPS))
    dtype = draw(st.sampled_from((np.float64, np.float32)))
    n, d, v = (draw(st.sampled_from(SIDES)) for _ in range(3))
    shapes = {"cross_entropy": {"logits": (n, v)},
              "linear": {"x": (n, d), "weight": (v, d)},
              "linear_cross_entropy": {"x": (n, d), "weight": (v, d)}}[op]
    if op != "cross_entropy" and draw(st.booleans()):
        shapes["bias"] = (v,)
    arrays = {name: draw(specs(shape=shape, dtypes=(dtype,), values=("normal",), layouts=GT_LAYOUTS))
              for name, shape in shapes.items()}
    rare = not valid_only and draw(st.integers(0, 7)) == 0
    ignore_index = draw(st.sampled_from([-100, 1, None] + ([1.5, True] if rare else [])))
    reduction = draw(st.sampled_from(["mean", "sum", "none"] + (["avg"] if rare else [])))
    rng = np.random.default_rng(draw(seeds))
    targets = rng.integers(0, max(v, 1), size=n).astype(draw(st.sampled_from([np.int64, np.int32])))
    if isinstance(ignore_index, int) and not isinstance(ignore_index, bool) and n:
        targets[rng.random(n) < 0.3] = ignore_index
    if rare and n and draw(st.booleans()):
        targets[0] = v + 2
    return op, arrays, dict(ignore_index=ignore_index, reduction=reduction,
                            label_smoothing=draw(st.sampled_from([0.0, 0.1]))), targets


def _torch_op_valid(op, arrays, opts, targets):
    if op == "linear":
        return True
    ignore_index = opts["ignore_index"]
    v = arrays["logits"]["shape"][1] if op == "cross_entropy" else arrays["weight"]["shape"][0]
    in_range = (targets >= 0) & (targets < v) | ((targets == ignore_index) if ignore_index is not None else False)
    return (v >= 1 and bool(np.all(in_range)) and opts["reduction"] in ("mean", "sum", "none")
            and (ignore_index is None or type(ignore_index) is int))


def _torch_op_oracle(op, values, opts, targets, u):
    """torch in float64 (gpuad's contract for ignored rows and an empty mean), and its gradients."""
    leaves = {k: t64(a).requires_grad_() for k, a in values.items()}
    if op == "linear":
        y = F.linear(leaves["x"], leaves["weight"], leaves.get("bias"))
    else:
        z = leaves["logits"] if op == "cross_entropy" else F.linear(leaves["x"], leaves["weight"], leaves.get("bias"))
        ignore = opts["ignore_index"]
        valid = torch.from_numpy(targets != ignore if ignore is not None else np.ones(targets.shape, bool))
        safe = torch.from_numpy(np.where(valid.numpy(), targets, 0).astype(np.int64))
        rows = F.cross_entropy(z, safe, reduction="none", label_smoothing=opts["label_smoothing"]) * valid
        y = rows if opts["reduction"] == "none" else rows.sum() / (
            max(int(valid.sum()), 1) if opts["reduction"] == "mean" else 1)
    grads = torch.autograd.grad(y, list(leaves.values()), t64(u), allow_unused=True)
    return y.detach(), dict(zip(leaves, grads))


def _gt_call(op, tensors, opts, targets):
    if op == "cross_entropy":
        return gt.cross_entropy(tensors["logits"], targets, **opts)
    if op == "linear":
        return gt.linear(tensors["x"], tensors["weight"], tensors.get("bias"))
    return gt.linear_cross_entropy(tensors["x"], tensors["weight"], targets, tensors.get("bias"), **opts)


def _check_torch_op(op, arrays, opts, targets, path, order):
    """One call of gpuad.torch's `op` on the `path` ("function", "custom_op", "compiled"):
    the loss and gradients against torch in float64 (order 1), or the second-order
    gradients of a gradient penalty (order 2): exact for linear, a clear refusal for the
    fused losses; a clear error for invalid input; the inputs left alone."""
    valid = _torch_op_valid(op, arrays, opts, targets)
    tried(f"gpuad.torch.{op} ({path}, order {order})", valid, *arrays.values())
    built = {k: torch_layout(build(spec)[0], spec["layout"]) for k, spec in arrays.items()}
    values = {k: layout_values(build(spec)[0], spec["layout"]) for k, spec in arrays.items()}
    before = {k: buf.clone() for k, (_, buf) in built.items()}
    leaves = {k: t.detach().requires_grad_() for k, (t, _) in built.items()}
    t = torch.from_numpy(targets)
    call = (lambda *a: _gt_call(*a)) if path != "compiled" else torch.compile(_gt_call, backend="aot_eager",
                                                                               fullgraph=True)
    y = run(lambda: call(op, leaves, opts, t), valid, f"gpuad.torch.{op}")
    if y is not None:
        dtype = arrays[next(iter(arrays))]["dtype"]
        u = cotangent(np.random.default_rng(arrays[next(iter(arrays))]["seed"]), tuple(y.shape), np.float64)
        y_t, grads_t = _torch_op_oracle(op, values, opts, targets, u)
        width = max(values[next(iter(values))].shape[-1], 1)
        scale = magnitude(*values.values()) ** 2 * (1 + max(targets.size, 1) * width)
        close(y, y_t, dtype, scale, f"{op} ({path}) value")
        if order == 1:
            got = torch.autograd.grad(y, list(leaves.values()), torch.from_numpy(u).to(y.dtype), allow_unused=True)
            for k, g in zip(leaves, got):
                close(g if g is not None else torch.zeros(leaves[k].shape), grads_t[k], dtype, scale * magnitude(u),
                      f"{op} ({path}) d{k}")
        else:
            _check_second_order(op, path, y, leaves, values, u, dtype, scale)
    for k, (_, buf) in built.items():
        assert buf.numpy().tobytes() == before[k].numpy().tobytes(), f"{op} ({path}): input {k} was modified"
    assert torch.equal(t, torch.from_numpy(targets)), f"{op} ({path}): targets were modified"


def _check_second_order(op, path, y, leaves, values, u, dtype, scale):
    """A gradient penalty through `op`: |∂(y·u)/∂first input|² differentiated again."""
    first = next(iter(leaves))

    def penalty(y, leaves):
        g, = torch.autograd.grad((y * torch.from_numpy(u).to(y.dtype)).sum(), leaves[first], create_graph=True)
        if path == "compiled":  # torch's own refusal, in its node behind g (autograd.grad(.., x) prunes it)
            g.square().sum().backward()
        return torch.autograd.grad(g.square().sum(), list(leaves.values()), allow_unused=True)

    if op != "linear" or path == "compiled":
        with pytest.raises(RuntimeError, match="no double backward" if path != "compiled" else "double backward"):
            penalty(y, leaves)
        return
    ref = {k: t64(a).requires_grad_() for k, a in values.items()}
    want = penalty(F.linear(ref["x"], ref["weight"], ref.get("bias")), ref)
    for k, g, e in zip(leaves, penalty(y, leaves), want):
        zeros = torch.zeros(leaves[k].shape)
        close(zeros if g is None else g, zeros if e is None else e, dtype, scale * magnitude(u) ** 2,
              f"linear ({path}) second-order d{k}")


@fuzz(60)
@given(case=torch_op_case(), path=st.sampled_from(["function", "custom_op"]), order=st.sampled_from([1, 1, 2]))
def test_torch_ops(case, path, order):
    op, arrays, opts, targets = case
    gt.EAGER_BYPASS = path == "function"
    try:
        _check_torch_op(op, arrays, opts, targets, path, order)
    finally:
        gt.EAGER_BYPASS = True


@fuzz(6)
@given(case=torch_op_case(valid_only=True), order=st.sampled_from([1, 2]))
def test_torch_ops_compiled(case, order):
    """Valid inputs only: under fullgraph=True, torch wraps gpuad's own error in its Unsupported."""
    assume(_torch_op_valid(*case))
    torch._dynamo.reset()  # a fresh compile per example (no recompile limit across examples)
    _check_torch_op(*case, "compiled", order)
