"""The ops: each forward next to its local derivative, as a VJP (reverse) and a JVP (forward).

One body serves numpy and CuPy: the array module ``xp`` comes from the inputs. Broadcasting
is undone in reverse mode by :func:`unbroadcast` alone.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from . import backend as B
from .tensor import Tensor, as_tensor, is_grad_enabled, is_unit_seed, record

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = math.sqrt(2.0 / math.pi)


# --- helpers --------------------------------------------------------------------------
def unbroadcast(g, shape):
    """Sum cotangent `g` down to `shape`, undoing numpy broadcasting."""
    shape = tuple(shape)
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    return g.sum(axis=axes, keepdims=True).reshape(shape) if axes else g.reshape(shape)


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


def _axes(axis, ndim):
    """A normalised tuple of axes (all of them for None)."""
    if axis is None:
        return tuple(range(ndim))
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axis)) if ndim else ()


def _expand(g, axes, shape):
    """Broadcast a reduced cotangent `g` back to `shape` (a fresh array)."""
    xp = B.array_module(g)
    g = xp.asarray(g)
    for a in axes:
        if g.ndim < len(shape):
            g = xp.expand_dims(g, a)
    return xp.broadcast_to(g, shape).copy()


def _unary(name, x, forward, derivative):
    """An elementwise op y = forward(x) whose derivative `derivative(x, y)` multiplies."""
    x = as_tensor(x)
    xp, d = x.xp, x.data
    keep = (lambda a: a) if d.dtype.kind in "iub" else (lambda a: a.astype(d.dtype, copy=False))
    y = keep(forward(xp, d))  # CuPy computes some bfloat16 functions in float32: keep x's dtype
    return record(name, y, (x,),
                  vjp=(lambda g: keep(g * derivative(xp, d, y)),),
                  jvp=lambda t: keep(t * derivative(xp, d, y)))


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
def add(a, b):
    """a + b, with broadcasting."""
    a, b = _pair("add", a, b)
    sa, sb = a.shape, b.shape  # the VJP keeps shapes only, not the operands
    return record("add", a.data + b.data, (a, b),
                  vjp=(lambda g: unbroadcast(g, sa), lambda g: unbroadcast(g, sb)),
                  jvp=lambda ta, tb: ta + tb)


def sub(a, b):
    """a - b, with broadcasting."""
    a, b = _pair("sub", a, b)
    sa, sb = a.shape, b.shape
    return record("sub", a.data - b.data, (a, b),
                  vjp=(lambda g: unbroadcast(g, sa), lambda g: unbroadcast(-g, sb)),
                  jvp=lambda ta, tb: ta - tb)


def mul(a, b):
    """a * b, with broadcasting."""
    a, b = _pair("mul", a, b)
    ad_, bd = a.data, b.data
    return record("mul", ad_ * bd, (a, b),
                  vjp=(lambda g: unbroadcast(g * bd, ad_.shape), lambda g: unbroadcast(g * ad_, bd.shape)),
                  jvp=lambda ta, tb: ta * bd + ad_ * tb)


def div(a, b):
    """a / b, with broadcasting."""
    a, b = _pair("div", a, b)
    sa, bd = a.shape, b.data
    y = a.data / bd
    return record("div", y, (a, b),
                  vjp=(lambda g: unbroadcast(g / bd, sa), lambda g: unbroadcast(-g * y / bd, bd.shape)),
                  jvp=lambda ta, tb: (ta - y * tb) / bd)


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
        return _unary("pow", x, lambda xp, d: xp.ones_like(d), lambda xp, d, y: xp.zeros_like(d))
    return _unary("pow", x, lambda xp, d: d ** p, lambda xp, d, y: p * d ** (p - 1.0))


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
                  jvp=lambda ta, tb: xp.matmul(ta, b.data) + xp.matmul(a.data, tb))


# --- elementwise ----------------------------------------------------------------------
def exp(x):
    """e ** x."""
    return _unary("exp", x, lambda xp, d: xp.exp(d), lambda xp, d, y: y)


def log(x):
    """Natural logarithm."""
    return _unary("log", x, lambda xp, d: xp.log(d), lambda xp, d, y: 1.0 / d)


def tanh(x):
    return _unary("tanh", x, lambda xp, d: xp.tanh(d), lambda xp, d, y: 1.0 - y * y)


def sigmoid(x):
    """1 / (1 + e^-x), computed stably as exp(-log(1 + e^-x))."""
    return _unary("sigmoid", x, lambda xp, d: xp.exp(-xp.logaddexp(0, -d)).astype(d.dtype),
                  lambda xp, d, y: y * (1.0 - y))


def relu(x):
    """max(x, 0); the derivative at 0 is taken as 0, as in PyTorch."""
    return _unary("relu", x, lambda xp, d: xp.maximum(d, 0), lambda xp, d, y: (d > 0).astype(d.dtype))


def gelu(x, approximate="none"):
    """x·Φ(x) (exact, with erf) or its tanh approximation (``approximate="tanh"``), as in PyTorch."""
    if approximate == "none":
        def forward(xp, d):
            return 0.5 * d * (1.0 + _erf(xp, d * _SQRT_HALF))

        def derivative(xp, d, y):
            return 0.5 * (1.0 + _erf(xp, d * _SQRT_HALF)) + d * _INV_SQRT_2PI * xp.exp(-0.5 * d * d)
    elif approximate == "tanh":
        def forward(xp, d):
            return 0.5 * d * (1.0 + xp.tanh(_TANH_C * (d + 0.044715 * d ** 3)))

        def derivative(xp, d, y):
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
                  jvp=lambda ta, tb: xp.where(cond, ta, tb))


# --- reductions and shapes ------------------------------------------------------------
def sum(x, axis=None, keepdims=False):
    """Sum over `axis` (all axes by default); a 0-d array, never a host scalar."""
    x = as_tensor(x)
    axes, shape = _axes(axis, x.ndim), x.shape
    y = x.xp.asarray(x.data.sum(axis=axes, keepdims=keepdims))
    return record("sum", y, (x,),
                  vjp=(lambda g: _expand(g, () if keepdims else axes, shape),),
                  jvp=lambda t: t.sum(axis=axes, keepdims=keepdims))


def mean(x, axis=None, keepdims=False):
    """Mean over `axis` (all axes by default)."""
    x = as_tensor(x)
    axes = _axes(axis, x.ndim)
    count = int(np.prod([x.shape[a] for a in axes])) if axes else 1
    return mul(sum(x, axis, keepdims), 1.0 / max(count, 1))


def reshape(x, *shape):
    """x with a new shape (``reshape(x, 2, 3)`` or ``reshape(x, (2, 3))``)."""
    x = as_tensor(x)
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    old_shape = x.shape
    return record("reshape", x.data.reshape(shape), (x,),
                  vjp=(lambda g: g.reshape(old_shape),), jvp=lambda t: t.reshape(shape))


def transpose(x, axes=None):
    """Permute axes (reverse them by default)."""
    x = as_tensor(x)
    axes = tuple(range(x.ndim))[::-1] if axes is None else tuple(a % x.ndim for a in axes)
    inverse = tuple(np.argsort(axes))
    return record("transpose", x.data.transpose(axes), (x,),
                  vjp=(lambda g: g.transpose(inverse),), jvp=lambda t: t.transpose(axes))


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

    return record("getitem", x.data[index], (x,), vjp=(vjp,), jvp=lambda t: t[index])


# --- softmax family -------------------------------------------------------------------
def _stable_softmax(xp, d, axis):
    e = xp.exp(d - d.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def softmax(x, axis=-1):
    """exp(x) / Σ exp(x) along `axis`."""
    x = as_tensor(x)
    xp = x.xp
    y = _stable_softmax(xp, x.data, axis)

    def jvp(t):  # also the VJP: the softmax Jacobian is symmetric
        return y * (t - (t * y).sum(axis=axis, keepdims=True))

    return record("softmax", y, (x,), vjp=(jvp,), jvp=jvp)


def log_softmax(x, axis=-1):
    """x - logsumexp(x) along `axis`."""
    x = as_tensor(x)
    xp = x.xp
    shifted = x.data - x.data.max(axis=axis, keepdims=True)
    y = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
    p = xp.exp(y)
    return record("log_softmax", y, (x,),
                  vjp=(lambda g: g - p * g.sum(axis=axis, keepdims=True),),
                  jvp=lambda t: t - (p * t).sum(axis=axis, keepdims=True))


def logsumexp(x, axis=-1, keepdims=False):
    """log Σ exp(x) along `axis`, stably."""
    x = as_tensor(x)
    xp = x.xp
    axes, shape = _axes(axis, x.ndim), x.shape
    m = x.data.max(axis=axes, keepdims=True)
    y = xp.log(xp.exp(x.data - m).sum(axis=axes, keepdims=True)) + m
    p = xp.exp(x.data - y)
    out = y if keepdims else y.reshape(tuple(n for i, n in enumerate(x.shape) if i not in axes))
    return record("logsumexp", out, (x,),
                  vjp=(lambda g: _expand(g, () if keepdims else axes, shape) * p,),
                  jvp=lambda t: (p * t).sum(axis=axes, keepdims=keepdims))


def sq_norm(x):
    """½‖x‖², a 0-d array."""
    x = as_tensor(x)
    xp, d = x.xp, x.data
    return record("sq_norm", xp.asarray(0.5 * (d * d).sum()), (x,),
                  vjp=(lambda g: g * d,), jvp=lambda t: (d * t).sum())


# --- fused ops ------------------------------------------------------------------------
def linear(x, W, b=None):
    """y = x Wᵀ + b. x [..., K], W [N, K] (PyTorch's [out, in]), b [N] or None -> [..., N].

    The VJP is one fused ``linear_backward`` call (the reference on numpy, the Triton or CuPy
    kernel on the cupy backend) computing only the gradients that are needed."""
    x, W = as_tensor(x), as_tensor(W)
    parents = (x, W) if b is None else (x, W, as_tensor(b))
    xp = B.array_module(*(p.data for p in parents))
    if W.ndim != 2 or x.ndim < 1 or x.shape[-1] != W.shape[1]:
        raise ValueError(f"linear: x {x.shape} and W {W.shape} do not match: need x [..., K] and W [N, K]")
    if b is not None and parents[2].shape != (W.shape[0],):
        raise ValueError(f"linear: b {parents[2].shape} does not match W {W.shape}: need b [N] = [{W.shape[0]}]")
    if len({p.dtype for p in parents}) != 1:
        raise ValueError(f"linear: x, W and b must share one dtype, got {[str(p.dtype) for p in parents]}")
    xd, Wd, has_bias = x.data, W.data, b is not None
    y = xp.matmul(xd, Wd.T)
    if has_bias:
        y = y + parents[2].data
    need_dx = x.requires_grad
    need_params = W.requires_grad or (has_bias and parents[2].requires_grad)

    def vjp(g):
        if not need_params:
            return (xp.matmul(g, Wd), None, None)
        kernels = B.kernel_module(xp, xd.dtype)
        return kernels.linear_backward(xd, Wd, g, bias=has_bias, need_dx=need_dx)

    def jvp(tx, tW, tb=None):
        ty = xp.matmul(tx, Wd.T) + xp.matmul(xd, tW.T)
        return ty if tb is None else ty + tb

    return record("linear", y, parents, vjp=vjp, jvp=jvp)


def softmax_cross_entropy(logits, targets, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """Softmax + cross-entropy in one op.

    logits [..., V] float, targets [...] integer (a Tensor or array, not differentiated).
    Returns the loss: a 0-d tensor for "mean" / "sum", targets' shape for "none". Rows whose
    target equals ignore_index count for nothing; when all are ignored the loss and the
    gradient are 0 in every reduction. The gradient p − y* (smoothed y* when
    label_smoothing > 0) is computed in the forward pass by the fused kernel and reused by
    the VJP; when no gradient is needed, the loss alone is computed (no [B, V] buffer)."""
    logits = as_tensor(logits)
    t = targets.data if isinstance(targets, Tensor) else targets
    xp = B.array_module(logits.data, t)
    t = xp.asarray(t)
    if logits.ndim < 1 or tuple(t.shape) != logits.shape[:-1]:
        raise ValueError(f"softmax_cross_entropy: targets {tuple(t.shape)} must have the shape of logits "
                         f"{logits.shape} without its last (class) axis")
    n_classes = logits.shape[-1]
    need_grad = (is_grad_enabled() and logits.requires_grad) or logits.tangent is not None
    kernels = B.kernel_module(xp, logits.dtype)
    loss, dlogits = kernels.softmax_cross_entropy(
        logits.data.reshape(-1, n_classes), t.reshape(-1), ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, grad=need_grad)
    if reduction == "none":
        loss = loss.reshape(t.shape)
    if dlogits is not None and dlogits.shape != logits.shape:
        dlogits = dlogits.reshape(logits.shape)

    def vjp(g):
        if is_unit_seed(g):  # loss.backward(): the kernel's gradient is the answer, no extra pass
            return dlogits
        g = g.astype(dlogits.dtype)
        return g[..., None] * dlogits if reduction == "none" else g * dlogits

    def jvp(tl):
        return (dlogits * tl).sum(axis=-1) if reduction == "none" else (dlogits * tl).sum()

    return record("softmax_cross_entropy", loss, (logits,), vjp=(vjp,), jvp=jvp)


def to(x, backend_name):
    """A copy of x on backend `backend_name`; differentiable (the VJP copies back)."""
    x = as_tensor(x)
    source = x.backend
    target_xp = B.module_for(backend_name)
    move = (lambda a, xp: xp.asarray(a)) if backend_name == "cupy" else (lambda a, xp: B.to_host(a))
    back_xp = B.module_for(source)
    back = (lambda a: back_xp.asarray(a)) if source == "cupy" else B.to_host
    return record("to", move(x.data, target_xp), (x,), vjp=(back,), jvp=lambda t: move(t, target_xp))


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
for _name, _cmp in (("__lt__", "less"), ("__le__", "less_equal"), ("__gt__", "greater"), ("__ge__", "greater_equal")):
    # comparisons give constant boolean Tensors (for ad.where), never recorded
    setattr(Tensor, _name, (lambda fn: lambda self, other: Tensor(getattr(self.xp, fn)(
        self.data, other.data if isinstance(other, Tensor) else other)))(_cmp))


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

    return record("linear_cross_entropy", loss, parents, vjp=vjp, jvp=jvp)
