"""The ops: each forward next to its local derivative, as a VJP (reverse) and a JVP (forward).

One body serves numpy and CuPy: the array module ``xp`` comes from the inputs. Broadcasting
is undone in reverse mode by :func:`unbroadcast` alone.
"""
from __future__ import annotations

import functools
import math
import operator

import numpy as np

from . import backend as B
from .kernels.checks import ignore_index_arg
from .tensor import Tensor, adopt_view, as_tensor, is_grad_enabled, is_unit_seed, record

# numpy's own error for an axis out of range: a ValueError and an IndexError at once
AxisError = np.exceptions.AxisError if hasattr(np, "exceptions") else np.AxisError

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = math.sqrt(2.0 / math.pi)


# --- helpers --------------------------------------------------------------------------
def unbroadcast(g, shape):
    """Sum cotangent `g` down to `shape`, undoing numpy broadcasting (16-bit floats accumulate
    in float32: numpy sums fp16 over an outer axis in fp16, overflowing where the sum does not)."""
    shape = tuple(shape)
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    return _sum(g, axes, True).reshape(shape) if axes else g.reshape(shape)


def _same_shape_tensors(a, b) -> bool:
    """Whether a and b are Tensors holding arrays of one type (so one backend) and one shape:
    the common case of a binary op, which then needs none of _pair's work."""
    return type(a) is Tensor and type(b) is Tensor and type(a.data) is type(b.data) and a.data.shape == b.data.shape


def _pair(name, a, b):
    """Two operands as Tensors on one backend, with broadcast-compatible shapes."""
    like = a if isinstance(a, Tensor) else b if isinstance(b, Tensor) else None
    a, b = as_tensor(a, like), as_tensor(b, like)
    B.array_module(a.data, b.data)
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{name}: shapes {a.shape} and {b.shape} cannot be broadcast together") from None
    return a, b


def _is_int(a) -> bool:
    return isinstance(a, (int, np.integer)) and not isinstance(a, bool)


def _axes(axis, ndim, what):
    """A sorted tuple of non-negative axes (all of them for None). As numpy: an axis outside
    [-ndim, ndim) raises AxisError (a ValueError and an IndexError), a repeated one ValueError."""
    if axis is None:
        return tuple(range(ndim))
    if _is_int(axis):
        axis = (axis,)
    elif not (isinstance(axis, (tuple, list)) and all(_is_int(a) for a in axis)):
        raise TypeError(f"{what}: axis must be None, an int or a tuple of ints, got {axis!r}")
    for a in axis:
        if not -ndim <= a < ndim:
            raise AxisError(f"{what}: axis {a} is out of bounds for a tensor of dimension {ndim}")
    axes = sorted(int(a) % ndim for a in axis)
    if len(set(axes)) != len(axes):
        raise ValueError(f"{what}: axis {tuple(axis)} names an axis more than once")
    return tuple(axes)


def _is_half(dtype) -> bool:
    """fp16 or bf16: reductions over them accumulate in float32 (as torch does)."""
    return dtype.itemsize == 2 and (dtype.kind == "f" or str(dtype) == "bfloat16")


def _wide(a):
    """`a` in float32 when it is a 16-bit float, else `a` itself."""
    return a.astype(np.float32) if _is_half(a.dtype) else a


def _as_dtype_of(a, like):
    """`a` cast back to `like`'s dtype after a widened computation (a no-op otherwise)."""
    return a.astype(like.dtype) if _is_half(like.dtype) and a.dtype != like.dtype else a


def _view_of(x, y) -> tuple:
    """What a view op (output data `y`, maybe a view of x's data) guards: x, since a later op
    saving the view (an op's output) guards nothing, yet a write into x's data changes it."""
    adopt_view(x.data, y)
    return (x,) if getattr(y, "base", None) is not None else ()


def _expand(g, axes, shape):
    """Broadcast a reduced cotangent `g` back to `shape` (a fresh array)."""
    xp = B.array_module(g)
    g = xp.asarray(g)
    for a in axes:
        if g.ndim < len(shape):
            g = xp.expand_dims(g, a)
    return xp.broadcast_to(g, shape).copy()


def _unary(name, x, forward, derivative, uses="x"):
    """An elementwise op y = forward(xp, x) whose derivative multiplies: ``derivative(xp, s)``
    where s is the input (uses="x") or the output (uses="y"), the one array the VJP keeps.
    16-bit floats are computed in float32 and rounded once (as torch): a composite formula
    in fp16 would overflow (x³ in gelu) and round at every step."""
    x = as_tensor(x)
    xp, d = x.xp, x.data
    dtype = d.dtype  # captured alone: a closure on `d` would keep the input alive for uses="y"
    keep = (lambda a: a) if dtype.kind in "iub" else (lambda a: a.astype(dtype, copy=False))
    half = _is_half(d.dtype)
    y = keep(forward(xp, d.astype(np.float32) if half else d))  # CuPy too computes some bf16 functions in fp32
    s = d if uses == "x" else y  # kept in x's dtype, widened when used
    return record(name, y, (x,),
                  vjp=(lambda g: keep(g * derivative(xp, s.astype(np.float32) if half else s)),),
                  jvp=lambda t: keep(t * derivative(xp, s.astype(np.float32) if half else s)),
                  saved=(x,) if uses == "x" else ())


@functools.lru_cache(maxsize=None)
def _scipy_erf():
    try:
        from scipy.special import erf
    except ImportError:
        return None
    return erf


def _erf(xp, z):
    """erf on either backend. numpy has none: scipy's when installed; otherwise math.erf per
    element for float64 (exact, slow) and Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, below
    float32 resolution) for narrower floats."""
    if xp is not np:
        import cupyx.scipy.special

        wide = z.astype(xp.float32) if z.dtype.itemsize < 4 else z  # 16-bit floats: erf in fp32
        return cupyx.scipy.special.erf(wide).astype(z.dtype)
    if _scipy_erf():
        return _scipy_erf()(z).astype(z.dtype)
    if z.dtype == np.float64:
        return np.frompyfunc(math.erf, 1, 1)(z).astype(np.float64)
    a = np.abs(z).astype(np.float64)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return (np.sign(z) * (1.0 - poly * np.exp(-a * a))).astype(z.dtype)


# --- arithmetic -----------------------------------------------------------------------
# The binary ops are the engine's hottest path (a chain of small elementwise ops is all
# bookkeeping), so their common case of operands of one shape makes no closures: VJPs are
# module functions (the identity where unbroadcast would have nothing to do) or bound methods.
def _identity(g):
    return g


_IDENTITIES = (_identity, _identity)


def _sum_to(shape, y):
    """The VJP of broadcasting an operand of `shape` to y's shape: unbroadcast, or the
    identity when the operand has y's shape already."""
    return _identity if shape == y.shape else lambda g: unbroadcast(g, shape)


# --- a Tensor and a Python scalar: unary ops on the Tensor (x * 0.5, x / n, lr * g, 1 - p) ---
# The scalar stays a Python number: NumPy 2 and CuPy cast it to the array's float dtype (NEP 50),
# the result the scalar as a 0-d constant of that dtype gives, without the constant's Tensor, its
# broadcast check, its guard and a second tape edge.
def _scalar_pair(a, b):
    """(Tensor of floats, its Python float or int operand) for op(a, b) or op(b, a); else None."""
    if type(b) is float or type(b) is int:
        t, c = a, b
    elif type(a) is float or type(a) is int:
        t, c = b, a
    else:
        return None
    return (t, c) if isinstance(t, Tensor) and t.data.dtype.kind == "f" else None


def _add_scalar(x, c):
    return record("add_scalar", x.data + c, (x,), (_identity,), _identity)


def _mul_scalar(x, c):
    scale = lambda g: g * c  # noqa: E731 (g ↦ c g: the VJP and the JVP)
    return record("mul_scalar", x.data * c, (x,), (scale,), scale)


def add(a, b):
    """a + b, with broadcasting."""
    pair = _scalar_pair(a, b)
    if pair is not None:
        return _add_scalar(*pair)
    if _same_shape_tensors(a, b):  # one shape: no broadcasting to undo
        return record("add", a.data + b.data, (a, b), _IDENTITIES, operator.add)
    a, b = _pair("add", a, b)
    y = a.data + b.data  # the VJP keeps shapes only, not the operands
    return record("add", y, (a, b), (_sum_to(a.data.shape, y), _sum_to(b.data.shape, y)), operator.add)


def sub(a, b):
    """a - b, with broadcasting."""
    pair = _scalar_pair(a, b)
    if pair is not None:  # x - c, or c - x
        x, c = pair
        if x is a:
            return record("sub_scalar", x.data - c, (x,), (_identity,), _identity)
        return record("rsub_scalar", c - x.data, (x,), (operator.neg,), operator.neg)
    if not _same_shape_tensors(a, b):
        a, b = _pair("sub", a, b)
    y = a.data - b.data
    sb = b.data.shape
    return record("sub", y, (a, b),
                  vjp=(_sum_to(a.data.shape, y), operator.neg if sb == y.shape else lambda g: unbroadcast(-g, sb)),
                  jvp=operator.sub)


def _mul_tangent(a_data, b_data, ta, tb):
    return ta * b_data + a_data * tb


def _mul_broadcast_vjp(a_data, b_data):
    """g·b and g·a summed back to each operand's shape, in float32 for 16-bit floats (the
    products of a sum may overflow where the sum does not)."""
    return (lambda g: _as_dtype_of(unbroadcast(_wide(g) * b_data, a_data.shape), g),
            lambda g: _as_dtype_of(unbroadcast(_wide(g) * a_data, b_data.shape), g))


def mul(a, b):
    """a * b, with broadcasting. (No closures in the common same-shape case: every op of a
    long chain pays for what it builds.)"""
    pair = _scalar_pair(a, b)
    if pair is not None:
        return _mul_scalar(*pair)
    same = _same_shape_tensors(a, b)
    if not same:
        a, b = _pair("mul", a, b)
        same = a.data.shape == b.data.shape
    a_data, b_data = a.data, b.data
    if same:  # g -> g * b, g -> g * a; only where a gradient is needed, so as to keep no operand for nothing
        vjp = (b_data.__rmul__ if a.requires_grad else None, a_data.__rmul__ if b.requires_grad else None)
    else:
        vjp = _mul_broadcast_vjp(a_data, b_data)
    return record("mul", a_data * b_data, (a, b), vjp, functools.partial(_mul_tangent, a_data, b_data),
                  (b if a.requires_grad else None, a if b.requires_grad else None))


def div(a, b):
    """a / b, with broadcasting. For 16-bit floats the rules (g/b, -g·(a/b)/b, (ta - (a/b)·tb)/b)
    run in float32 and read a/b in float32, not y: rounding y or -g·y first could overflow
    where the result does not."""
    if (type(b) is float or type(b) is int) and isinstance(a, Tensor) and a.data.dtype.kind == "f":  # x / c
        scale = lambda g: g / b  # noqa: E731
        return record("div_scalar", a.data / b, (a,), (scale,), scale)
    if not _same_shape_tensors(a, b):
        a, b = _pair("div", a, b)
    sa, a_data, b_data = a.shape, a.data, b.data
    y = a_data / b_data
    half = _is_half(y.dtype)
    wide = _wide if half else (lambda v: v)
    quotient = (lambda: _wide(a_data) / b_data) if half else (lambda: y)
    return record("div", y, (a, b),
                  vjp=(lambda g: _as_dtype_of(unbroadcast(wide(g) / b_data, sa), g),
                       lambda g: _as_dtype_of(unbroadcast(-wide(g) * quotient() / b_data, b_data.shape), b_data)),
                  jvp=lambda ta, tb: _as_dtype_of((wide(ta) - quotient() * wide(tb)) / b_data, y),
                  saved=(a, b) if half and b.requires_grad else (b,))


def neg(x):
    """-x."""
    x = as_tensor(x)
    return record("neg", -x.data, (x,), vjp=(lambda g: -g,), jvp=lambda t: -t)


def pow(x, p):
    """x ** p for a scalar exponent p."""
    if isinstance(p, Tensor) or B.backend_of(p) is not None and getattr(p, "ndim", 0) != 0:
        raise TypeError("pow: the exponent must be a Python or 0-d scalar, not a Tensor or array")
    p = float(p)
    if p == 0.0:
        return _unary("pow", x, lambda xp, d: xp.ones_like(d), lambda xp, d: xp.zeros_like(d))
    return _unary("pow", x, lambda xp, d: d ** p, lambda xp, d: p * d ** (p - 1.0))


def matmul(a, b):
    """a @ b with numpy semantics (1-D operands, broadcast batch axes)."""
    a, b = as_tensor(a), as_tensor(b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: operands need at least one axis, got shapes {a.shape} and {b.shape}")
    B.array_module(a.data, b.data)
    if a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not match (inner dimensions differ)")
    xp = a.xp
    try:
        y = xp.matmul(a.data, b.data)
    except ValueError:
        raise ValueError(f"matmul: batch axes of shapes {a.shape} and {b.shape} cannot be broadcast") from None

    def as_matrices(g):
        # promote 1-D operands to matrices so one pair of formulas covers every case
        a2 = a.data[None, :] if a.ndim == 1 else a.data
        b2 = b.data[:, None] if b.ndim == 1 else b.data
        if a.ndim == 1 and b.ndim == 1:  # a dot product: g is 0-d
            return a2, b2, g.reshape(1, 1)
        if a.ndim == 1:
            g = xp.expand_dims(g, -2)
        if b.ndim == 1:
            g = xp.expand_dims(g, -1)
        return a2, b2, g

    def vjp_a(g):
        a2, b2, g = as_matrices(g)
        ga = xp.matmul(g, xp.swapaxes(b2, -1, -2))
        return unbroadcast(ga[..., 0, :] if a.ndim == 1 else ga, a.shape)

    def vjp_b(g):
        a2, b2, g = as_matrices(g)
        gb = xp.matmul(xp.swapaxes(a2, -1, -2), g)
        return unbroadcast(gb[..., :, 0] if b.ndim == 1 else gb, b.shape)

    return record("matmul", y, (a, b), vjp=(vjp_a, vjp_b),
                  jvp=lambda ta, tb: xp.matmul(ta, b.data) + xp.matmul(a.data, tb),
                  saved=(b if a.requires_grad else None, a if b.requires_grad else None))


# --- elementwise ----------------------------------------------------------------------
def exp(x):
    """e ** x."""
    return _unary("exp", x, lambda xp, d: xp.exp(d), lambda xp, y: y, uses="y")


def log(x):
    """Natural logarithm."""
    return _unary("log", x, lambda xp, d: xp.log(d), lambda xp, d: 1.0 / d)


def tanh(x):
    return _unary("tanh", x, lambda xp, d: xp.tanh(d), lambda xp, y: 1.0 - y * y, uses="y")


def sigmoid(x):
    """1 / (1 + e^-x), computed stably as exp(-log(1 + e^-x))."""
    return _unary("sigmoid", x, lambda xp, d: xp.exp(-xp.logaddexp(0, -d)).astype(d.dtype),
                  lambda xp, y: y * (1.0 - y), uses="y")


def relu(x):
    """max(x, 0); the derivative at 0 is taken as 0, as in PyTorch. Exact in every dtype, so
    16-bit floats are not widened. The VJP keeps the output (as torch; the next op usually
    keeps it too): y > 0 exactly where x > 0."""
    x = as_tensor(x)
    d = x.data
    xp = B.array_module(d)
    # numpy: against a zero array, its vectorised loop (~2x its loop against a scalar); CuPy: one kernel
    y = xp.maximum(d, np.zeros(d.shape, d.dtype) if xp is np else 0)
    return record("relu", y, (x,), vjp=(lambda g: g * (y > 0),), jvp=lambda t: t * (y > 0))


def gelu(x, approximate="none"):
    """x·Φ(x) (exact, with erf) or its tanh approximation (``approximate="tanh"``), as in PyTorch."""
    if approximate == "none":
        def forward(xp, d):
            return 0.5 * d * (1.0 + _erf(xp, d * _SQRT_HALF))

        def derivative(xp, d):
            return 0.5 * (1.0 + _erf(xp, d * _SQRT_HALF)) + d * _INV_SQRT_2PI * xp.exp(-0.5 * d * d)
    elif approximate == "tanh":
        def forward(xp, d):
            return 0.5 * d * (1.0 + xp.tanh(_TANH_C * (d + 0.044715 * d ** 3)))

        def derivative(xp, d):
            t = xp.tanh(_TANH_C * (d + 0.044715 * d ** 3))
            return 0.5 * (1.0 + t) + 0.5 * d * (1.0 - t * t) * _TANH_C * (1.0 + 3 * 0.044715 * d * d)
    else:
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _unary("gelu", x, forward, derivative)


def where(condition, a, b):
    """a where `condition` holds, else b. The untaken branch gets an exact zero cotangent
    (selected, never multiplied), so a NaN there cannot leak into the gradient."""
    cond = condition.data if isinstance(condition, Tensor) else condition
    a, b = _pair("where", a, b)
    xp = B.array_module(cond, a.data, b.data)
    cond = xp.asarray(cond, dtype=bool)
    zero = xp.zeros((), dtype=a.dtype)
    sa, sb = a.shape, b.shape
    return record("where", xp.where(cond, a.data, b.data), (a, b),
                  vjp=(lambda g: unbroadcast(xp.where(cond, g, zero), sa),
                       lambda g: unbroadcast(xp.where(cond, zero, g), sb)),
                  jvp=lambda ta, tb: xp.where(cond, ta, tb), saved=(cond,))


# --- reductions and shapes ------------------------------------------------------------
def _sum_wide(a, axes, keepdims):
    """a summed over `axes`: in float32 for 16-bit floats (the result too), else in a's dtype."""
    if not _is_half(a.dtype):
        return a.sum(axis=axes, keepdims=keepdims)
    if a.dtype.kind == "f":  # fp16: the reduction reads it as float32, no copy
        return a.sum(axis=axes, keepdims=keepdims, dtype=np.float32)
    return a.astype(np.float32).sum(axis=axes, keepdims=keepdims)  # bf16 (ml_dtypes)


def _sum(a, axes, keepdims):
    """a summed over `axes` in a's dtype, accumulated in float32 for 16-bit floats."""
    return _as_dtype_of(_sum_wide(a, axes, keepdims), a)


def sum(x, axis=None, keepdims=False):
    """Sum over `axis` (all axes by default); a 0-d array, never a host scalar. fp16 / bf16
    accumulate in float32 and the result keeps the input dtype (as torch)."""
    x = as_tensor(x)
    axes, shape = _axes(axis, x.ndim, "sum"), x.shape
    y = x.xp.asarray(_sum(x.data, axes, keepdims))
    return record("sum", y, (x,),
                  vjp=(lambda g: _expand(g, () if keepdims else axes, shape),),
                  jvp=lambda t: _sum(t, axes, keepdims))


def mean(x, axis=None, keepdims=False):
    """Mean over `axis` (all axes by default). fp16 / bf16 accumulate in float32 and the
    result keeps the input dtype (the mean of 70000 fp16 ones is 1, as in torch); the mean
    over no elements is NaN (as numpy and torch)."""
    x = as_tensor(x)
    xp, d = x.xp, x.data
    axes, shape = _axes(axis, x.ndim, "mean"), x.shape
    count = int(np.prod([shape[a] for a in axes]))
    scale = 1.0 / count if count else float("nan")
    wide = _sum_wide(d, axes, keepdims)
    dtype = d.dtype if d.dtype.kind in "fc" or _is_half(d.dtype) else np.dtype(np.float64)
    y = xp.asarray(wide * scale if count else xp.full(xp.asarray(wide).shape, scale)).astype(dtype, copy=False)
    return record("mean", y, (x,),
                  vjp=(lambda g: _expand(g * scale if count else g, () if keepdims else axes, shape),),
                  jvp=lambda t: _sum(t, axes, keepdims) * scale)


def reshape(x, *shape):
    """x with a new shape (``reshape(x, 2, 3)`` or ``reshape(x, (2, 3))``)."""
    x = as_tensor(x)
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    old_shape = x.shape
    y = x.data.reshape(shape)
    return record("reshape", y, (x,), vjp=(lambda g: g.reshape(old_shape),), jvp=lambda t: t.reshape(shape),
                  saved=_view_of(x, y))


def transpose(x, axes=None):
    """Permute axes (reverse them by default); `axes` must be a permutation of the axes
    (negative ones count from the end), as in numpy."""
    x = as_tensor(x)
    if axes is None:
        axes = tuple(range(x.ndim))[::-1]
    else:
        given = axes
        if not (isinstance(given, (tuple, list)) and all(_is_int(a) for a in given)):
            raise TypeError(f"transpose: axes must be None or a tuple of ints, got {given!r}")
        if len(given) != x.ndim:
            raise ValueError(f"transpose: axes {tuple(given)} do not match a tensor of dimension {x.ndim}")
        axes = _axes(given, x.ndim, "transpose")  # range and repeats checked
        axes = tuple(int(a) % x.ndim for a in given)
    inverse = tuple(int(i) for i in np.argsort(axes))
    y = x.data.transpose(axes)
    return record("transpose", y, (x,), vjp=(lambda g: g.transpose(inverse),), jvp=lambda t: t.transpose(axes),
                  saved=_view_of(x, y))


def getitem(x, index):
    """x[index]; the VJP scatter-adds, so repeated indices accumulate."""
    x = as_tensor(x)
    if isinstance(index, Tensor):
        index = index.data
    elif isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    xp, shape, dtype = x.xp, x.shape, x.dtype

    def vjp(g):
        full = xp.zeros(shape, dtype=dtype)
        if xp is np:
            np.add.at(full, index, g)
        else:
            import cupyx

            cupyx.scatter_add(full, index, g)
        return full

    y = x.data[index]
    arrays = tuple(i for i in (index if isinstance(index, tuple) else (index,)) if B.backend_of(i) is not None)
    return record("getitem", y, (x,), vjp=(vjp,), jvp=lambda t: t[index], saved=arrays + _view_of(x, y))


# --- softmax family -------------------------------------------------------------------
# Each takes `axis` as numpy does (an int or a tuple; out of range raises AxisError), works
# over an empty axis (softmax: an empty result; logsumexp: -inf, as torch), and computes
# 16-bit floats in float32 (the result keeps the input dtype).
def _max_kept(xp, d, axes):
    """max over `axes` with the axes kept (size 1); 0 where they are empty (nothing to shift)."""
    if any(d.shape[a] == 0 for a in axes):
        return xp.zeros(tuple(1 if i in axes else n for i, n in enumerate(d.shape)), dtype=d.dtype)
    return d.max(axis=axes, keepdims=True)


def softmax(x, axis=-1):
    """exp(x) / Σ exp(x) along `axis`."""
    x = as_tensor(x)
    xp = x.xp
    axes = _axes(axis, x.ndim, "softmax")
    d = _wide(x.data)
    e = xp.exp(d - _max_kept(xp, d, axes))
    y = _as_dtype_of(e / e.sum(axis=axes, keepdims=True), x.data)

    def jvp(t):  # also the VJP: the softmax Jacobian is symmetric
        yw, t = _wide(y), _wide(t)
        return _as_dtype_of(yw * (t - (t * yw).sum(axis=axes, keepdims=True)), y)

    return record("softmax", y, (x,), vjp=(jvp,), jvp=jvp)


def log_softmax(x, axis=-1):
    """x - logsumexp(x) along `axis`."""
    x = as_tensor(x)
    xp = x.xp
    axes = _axes(axis, x.ndim, "log_softmax")
    d = _wide(x.data)
    shifted = d - _max_kept(xp, d, axes)
    y = shifted - xp.log(xp.exp(shifted).sum(axis=axes, keepdims=True))
    p = xp.exp(y)
    return record("log_softmax", _as_dtype_of(y, x.data), (x,),
                  vjp=(lambda g: _as_dtype_of(_wide(g) - p * _wide(g).sum(axis=axes, keepdims=True), g),),
                  jvp=lambda t: _as_dtype_of(_wide(t) - (p * _wide(t)).sum(axis=axes, keepdims=True), t))


def logsumexp(x, axis=-1, keepdims=False):
    """log Σ exp(x) along `axis`, stably. As torch: a row of -inf gives -inf, a row holding
    +inf gives +inf, an empty axis -inf; the gradient exp(x - y) is then NaN where torch's is
    (the -inf row, the +inf entry) and 0 elsewhere."""
    x = as_tensor(x)
    xp = x.xp
    axes, shape = _axes(axis, x.ndim, "logsumexp"), x.shape
    d = _wide(x.data)
    m = _max_kept(xp, d, axes)
    m = xp.where(xp.isinf(m), 0, m).astype(m.dtype)  # an infinite max shifts nothing (torch's rule)
    y = xp.log(xp.exp(d - m).sum(axis=axes, keepdims=True)) + m
    p = xp.exp(d - y)
    out = y if keepdims else y.reshape(tuple(n for i, n in enumerate(shape) if i not in axes))
    return record("logsumexp", _as_dtype_of(out, x.data), (x,),
                  vjp=(lambda g: _as_dtype_of(_expand(_wide(g), () if keepdims else axes, shape) * p, g),),
                  jvp=lambda t: _as_dtype_of((p * _wide(t)).sum(axis=axes, keepdims=keepdims), t))


def sq_norm(x):
    """½‖x‖², a 0-d array (accumulated in float32 for 16-bit floats)."""
    x = as_tensor(x)
    xp, d = x.xp, x.data
    w = _wide(d)
    return record("sq_norm", _as_dtype_of(xp.asarray(0.5 * (w * w).sum()), d), (x,),
                  vjp=(lambda g: g * d,), jvp=lambda t: _as_dtype_of((w * _wide(t)).sum(), t), saved=(x,))


# --- fused ops ------------------------------------------------------------------------
def linear(x, W, b=None):
    """y = x Wᵀ + b. x [..., K], W [N, K] (PyTorch's [out, in]), b [N] or None -> [..., N].
    x Wᵀ is rounded to the dtype before b is added (torch's fused addmm rounds once: for fp16
    at overflow, -inf + inf is NaN here where torch has inf).

    The VJP is one fused ``linear_backward`` call (the reference on numpy, the Triton or CuPy
    kernel on the cupy backend) computing only the gradients that are needed."""
    x, W = as_tensor(x), as_tensor(W)
    parents = (x, W) if b is None else (x, W, as_tensor(b))
    xd, Wd, has_bias = x.data, W.data, b is not None
    bd = parents[2].data if has_bias else None
    xp = B.array_module(xd, Wd, bd)
    ws = Wd.shape
    if len(ws) != 2 or xd.ndim < 1 or xd.shape[-1] != ws[1]:
        raise ValueError(f"linear: x {x.shape} and W {W.shape} do not match: need x [..., K] and W [N, K]")
    if has_bias and bd.shape != ws[:1]:
        raise ValueError(f"linear: b {parents[2].shape} does not match W {W.shape}: need b [N] = [{ws[0]}]")
    if xd.dtype != Wd.dtype or (has_bias and bd.dtype != Wd.dtype):
        raise ValueError(f"linear: x, W and b must share one dtype, got {[str(p.dtype) for p in parents]}")
    y = xp.matmul(xd, Wd.T)
    if has_bias:
        y += bd  # in place: y is the product just made
    need_dx = x.requires_grad
    need_params = W.requires_grad or (has_bias and parents[2].requires_grad)

    def vjp(g):
        if not need_params:
            return (xp.matmul(g, Wd), None, None)
        # an empty product (M, N or K = 0) has nothing for a GPU kernel to do: the reference
        # (written with the array module, it runs on CuPy too) gives its zeros and db
        kernels = B.kernel_module(xp, xd.dtype if xd.size and Wd.size else np.float64)
        return kernels.linear_backward(xd, Wd, g, bias=has_bias, need_dx=need_dx)

    def jvp(tx, tW, tb=None):
        ty = xp.matmul(tx, Wd.T) + xp.matmul(xd, tW.T)
        return ty if tb is None else ty + tb

    return record("linear", y, parents, vjp=vjp, jvp=jvp,
                  saved=(x if need_params else None, W if need_dx else None))


def softmax_cross_entropy(logits, targets, ignore_index=-100, reduction="mean", label_smoothing=0.0, *, weight=None,
                          axis=-1):
    """Softmax + cross-entropy in one op: F.cross_entropy with the classes on `axis`.

    logits [..., V] float (classes last; axis=1 takes F.cross_entropy's [B, C, d1, ...]);
    targets (a Tensor or array, not differentiated) either integer class indices of the
    logits' shape without the class axis, or floating class probabilities of the logits'
    shape; weight None or a [V] class weight (not differentiated). Returns the loss: a 0-d
    tensor for "mean" / "sum", the logits' shape without the class axis for "none". The
    formulas (weighted mean over the target classes' weights, label smoothing with weights
    and with probabilities) are those of ``gpuad.kernels.reference.softmax_cross_entropy``:
    rows whose target equals ignore_index count for nothing; when all are ignored the loss
    and the gradient are 0 in every reduction. The gradient is computed in the forward pass
    by the fused kernel and reused by the VJP; when no gradient is needed, the loss alone is
    computed (no gradient buffer)."""
    logits = as_tensor(logits)
    ignore_index = ignore_index_arg(ignore_index)
    t = targets.data if isinstance(targets, Tensor) else targets
    w = weight.data if isinstance(weight, Tensor) else weight
    xp = B.array_module(logits.data, t)
    t = xp.asarray(t)
    w = None if w is None else xp.asarray(w)
    if logits.ndim < 1:
        raise ValueError("softmax_cross_entropy: logits must have a class axis, got a 0-d tensor")
    if not _is_int(axis):
        raise TypeError(f"softmax_cross_entropy: axis must be an int (the class axis), got {axis!r}")
    cls = _axes(axis, logits.ndim, "softmax_cross_entropy")[0]
    soft = tuple(t.shape) == logits.shape and t.dtype.kind == "f"
    if not soft and tuple(t.shape) != logits.shape[:cls] + logits.shape[cls + 1:]:
        raise ValueError(f"softmax_cross_entropy: targets {tuple(t.shape)} must have the shape of logits "
                         f"{logits.shape} without its class axis {cls} (class indices) or the logits' own shape "
                         f"(class probabilities)")
    n_classes = logits.shape[cls]
    if n_classes < 1:
        raise ValueError(f"softmax_cross_entropy: logits {logits.shape} have no classes (V = 0 on axis {cls})")
    need_grad = (is_grad_enabled() and logits.requires_grad) or logits.tangent is not None
    kernels = B.kernel_module(xp, logits.dtype)
    z, kt = _class_layout(xp, logits.data, t, cls, soft)
    loss, dlogits = kernels.softmax_cross_entropy(
        z, kt, weight=w, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
        grad=need_grad)
    out_shape = logits.shape[:cls] + logits.shape[cls + 1:]
    if reduction == "none":
        loss = loss.reshape(out_shape)
    if dlogits is not None:
        dlogits = _from_class_layout(xp, dlogits, logits.shape, cls)

    def vjp(g):
        if is_unit_seed(g):  # loss.backward(): the kernel's gradient is the answer, no extra pass
            return dlogits
        g = g.astype(dlogits.dtype)
        return xp.expand_dims(g, cls) * dlogits if reduction == "none" else g * dlogits

    def jvp(tl):
        return (dlogits * tl).sum(axis=cls) if reduction == "none" else (dlogits * tl).sum()

    return record("softmax_cross_entropy", loss, (logits,), vjp=(vjp,), jvp=jvp)


def _class_layout(xp, z, t, cls, soft):
    """(logits, targets) in the kernels' layout: classes last -> [N, V] rows (a reshape);
    otherwise [C] or F.cross_entropy's [B, C, d1, ...] with the classes moved to axis 1 (a view)."""
    if z.ndim == 1:
        return z, t
    if cls == z.ndim - 1:
        n_rows = math.prod(z.shape[:-1])
        rows = z.reshape(n_rows, z.shape[-1])
        if 0 in rows.strides and rows.size > z.shape[-1]:  # rows sharing memory (expand): the GPU kernels want them apart
            rows = xp.ascontiguousarray(rows)
        return rows, t.reshape(rows.shape if soft else (n_rows,))
    return xp.moveaxis(z, cls, 1), (xp.moveaxis(t, cls, 1) if soft else t)


def _from_class_layout(xp, g, shape, cls):
    """The kernels' gradient back in the logits' layout (the inverse of _class_layout)."""
    if len(shape) == 1:
        return g
    if cls == len(shape) - 1:
        return g.reshape(shape) if g.shape != shape else g
    return xp.moveaxis(g, 1, cls)


def to(x, backend_name):
    """x on backend `backend_name` (a copy, or x's own array when it is there already);
    differentiable (the VJP copies back)."""
    x = as_tensor(x)
    source = x.backend
    target_xp = B.module_for(backend_name)
    move = (lambda a, xp: xp.asarray(a)) if backend_name == "cupy" else (lambda a, xp: B.to_host(a))
    back_xp = B.module_for(source)
    back = (lambda a: back_xp.asarray(a)) if source == "cupy" else B.to_host
    y = move(x.data, target_xp)
    return record("to", y, (x,), vjp=(back,), jvp=lambda t: move(t, target_xp),
                  saved=(x,) if y is x.data else _view_of(x, y))


# --- Tensor operators -----------------------------------------------------------------
def _reflected(op):
    return lambda self, other: op(other, self)


Tensor.__add__, Tensor.__radd__ = add, _reflected(add)
Tensor.__sub__, Tensor.__rsub__ = sub, _reflected(sub)
Tensor.__mul__, Tensor.__rmul__ = mul, _reflected(mul)
Tensor.__truediv__, Tensor.__rtruediv__ = div, _reflected(div)
Tensor.__matmul__, Tensor.__rmatmul__ = matmul, _reflected(matmul)
Tensor.__pow__ = pow
Tensor.__neg__ = neg
Tensor.__getitem__ = getitem
Tensor.T = property(lambda self: transpose(self))
Tensor.sum = sum
Tensor.mean = mean
Tensor.reshape = reshape
Tensor.transpose = lambda self, *axes: transpose(
    self, axes[0] if len(axes) == 1 and (axes[0] is None or isinstance(axes[0], (tuple, list))) else (axes or None))
Tensor.to = to


def _comparison(fn):
    def compare(self, other):
        if other is None or isinstance(other, str):
            return NotImplemented  # `t == None` is False, as in torch
        other = other.data if isinstance(other, Tensor) else other
        xp = B.array_module(self.data, other)
        return Tensor(xp.asarray(getattr(xp, fn)(self.data, other)))

    return compare


# Comparisons, `==` and `!=` included, are elementwise (as numpy and torch) and give constant
# boolean Tensors (for ad.where and masks), never recorded. Tensors hash by identity.
for _name, _fn in (("__lt__", "less"), ("__le__", "less_equal"), ("__gt__", "greater"),
                   ("__ge__", "greater_equal"), ("__eq__", "equal"), ("__ne__", "not_equal")):
    setattr(Tensor, _name, _comparison(_fn))


# --- fused LM head ----------------------------------------------------------------------
def linear_cross_entropy(x, W, targets, b=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                         z_loss=0.0, softcap=None, chunk=None):
    """softmax_cross_entropy(linear(x, W, b), targets, ...) without ever holding the logits.

    x [..., D], W [V, D] (PyTorch's [out, in]), b [V] or None, targets x.shape[:-1] integer
    (a Tensor or array, not differentiated). z_loss adds z_loss·lse² per row (PaLM);
    softcap c applies c·tanh(z / c) to the logits first (Gemma 2). Returns the loss: 0-d
    for "mean" / "sum", targets' shape for "none"; ignored rows count for nothing (all
    ignored: loss and gradients 0). The kernel (``linear_cross_entropy`` of the reference on
    numpy, of the Triton or CuPy kernels on cupy) works through `chunk` rows at a time.

    "mean" / "sum": the gradients are computed with the loss and the VJP scales them.
    "none": the forward computes the losses only, and the VJP runs the kernel again with the
    cotangent as per-row weights (exact for any cotangent). Forward mode of "none" runs the
    kernel on [x, 0] and [W, tW] side by side, so that dx's second half is dlogits·tW."""
    x, W = as_tensor(x), as_tensor(W)
    ignore_index = ignore_index_arg(ignore_index)
    parents = (x, W) if b is None else (x, W, as_tensor(b))
    t = targets.data if isinstance(targets, Tensor) else targets
    xp = B.array_module(*(p.data for p in parents), t)
    t = xp.asarray(t)
    if W.ndim != 2 or x.ndim < 1 or x.shape[-1] != W.shape[1]:
        raise ValueError(f"linear_cross_entropy: x {x.shape} and W {W.shape} do not match: need x [..., D] "
                         f"and W [V, D]")
    if tuple(t.shape) != x.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: targets {tuple(t.shape)} must have the shape of x {x.shape} "
                         f"without its last axis")
    d = W.shape[1]
    x2, t2, Wd = x.data.reshape(-1, d), t.reshape(-1), W.data
    bd = parents[2].data if b is not None else None
    kernels = B.kernel_module(xp, x.dtype)
    opts = dict(bias=bd, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                z_loss=z_loss, softcap=softcap, chunk=chunk)
    forward_mode = any(p.tangent is not None for p in parents)
    recording = is_grad_enabled() and any(p.requires_grad for p in parents)
    eager = reduction != "none" and (recording or forward_mode)
    loss, dx, dW, db = kernels.linear_cross_entropy(x2, Wd, t2, grad=eager, need_dx=x.requires_grad or forward_mode,
                                                    **opts)
    if reduction == "none":
        loss = loss.reshape(t.shape)

    def vjp(g):
        if reduction == "none":
            scale = None if is_unit_seed(g) else g.reshape(-1)
            _, gx, gW, gb = kernels.linear_cross_entropy(x2, Wd, t2, grad=True, need_dx=x.requires_grad,
                                                         grad_scale=scale, check_targets=False, **opts)
        elif is_unit_seed(g):
            gx, gW, gb = dx, dW, db
        else:
            gx, gW, gb = (None if a is None else g.astype(a.dtype) * a for a in (dx, dW, db))
        return (None if gx is None else gx.reshape(x.shape), gW, gb)

    def jvp(tx, tW, tb=None):
        if reduction != "none":
            out = (dx.reshape(x.shape) * tx).sum() + (dW * tW).sum()
            return out if tb is None else out + (db * tb).sum()
        # dloss_n = g_n·(tx_n Wᵀ + x_n tWᵀ + tb) for g_n = ∂loss_n/∂z_n: with x' = [x, 0] and
        # W' = [W, tW] (logits unchanged), dx' = g W' = [g W, g tW]; tb rides as one more column.
        tx2 = tx.reshape(-1, d)
        zeros = xp.zeros((x2.shape[0], d + (tb is not None)), dtype=x2.dtype)
        w_cols = [Wd, tW] + ([tb.reshape(-1, 1)] if tb is not None else [])
        _, gx, _, _ = kernels.linear_cross_entropy(xp.concatenate([x2, zeros], axis=1),
                                                   xp.concatenate(w_cols, axis=1).astype(x2.dtype), t2,
                                                   check_targets=False, **opts)
        out = (gx[:, :d] * tx2).sum(axis=1) + (gx[:, d:2 * d] * x2).sum(axis=1)
        if tb is not None:
            out = out + gx[:, 2 * d]
        return out.reshape(t.shape)

    # "none" runs the kernel again in the VJP on x, W, b and the targets: they are guarded
    return record("linear_cross_entropy", loss, parents, vjp=vjp, jvp=jvp,
                  saved=(*parents, t) if reduction == "none" else ())
