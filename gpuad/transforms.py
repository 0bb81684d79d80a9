"""Function transforms in JAX's vocabulary: primals, tangents, cotangents.

Each accepts arrays or Tensors; `f` takes Tensors and returns a Tensor. Results are backend
arrays. (Transforms do not nest: the VJPs are computed on arrays, not recorded.)"""
from __future__ import annotations

import numpy as np

from . import backend as B
from .tensor import Tensor, backward_pass, no_grad


def _primal(value, what):
    """A fresh leaf Tensor holding `value`'s array (shared, not copied)."""
    data = value.data if isinstance(value, Tensor) else value
    if B.backend_of(data) is None:
        data = B.module_for(B.get_backend()).asarray(data)
    if data.dtype.kind in "biu":
        raise ValueError(f"{what} is an integer array ({data.dtype}); only floating inputs can be differentiated")
    return Tensor(data, requires_grad=True)


def _argnums(argnums, n):
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    for a in nums:
        if not -n <= a < n:
            raise ValueError(f"argnums {argnums} out of range for {n} positional arguments")
    return tuple(a % n for a in nums)


def _output(out, what):
    if not isinstance(out, Tensor):
        raise TypeError(f"{what}: f must return a Tensor, got {type(out).__name__}")
    return out


def vjp(f, *primals):
    """(out, vjp_fn): out = f(*primals) as an array; vjp_fn(cotangent) -> a tuple with one
    cotangent array per primal (cotangentᵀ J for each input). vjp_fn may be called repeatedly."""
    leaves = [_primal(p, f"vjp: primal {i}") for i, p in enumerate(primals)]
    out = _output(f(*leaves), "vjp")

    def vjp_fn(cotangent):
        return tuple(backward_pass(out, cotangent, retain_graph=True, inputs=leaves))

    return out.data, vjp_fn


def jvp(f, primals, tangents):
    """(out, tangent_out): f evaluated once at `primals`, carrying `tangents` alongside
    (forward mode: J t). primals and tangents are sequences of matching shapes."""
    primals, tangents = tuple(primals), tuple(tangents)
    if len(primals) != len(tangents):
        raise ValueError(f"jvp: {len(primals)} primals but {len(tangents)} tangents")
    inputs = []
    for i, (p, t) in enumerate(zip(primals, tangents)):
        x = _primal(p, f"jvp: primal {i}")
        x.requires_grad = False
        t = t.data if isinstance(t, Tensor) else t
        t = x.xp.asarray(t, dtype=x.dtype)
        if t.shape != x.data.shape:
            raise ValueError(f"jvp: tangent {i} has shape {t.shape}, its primal {x.shape}")
        x.tangent = t
        inputs.append(x)
    with no_grad():
        out = _output(f(*inputs), "jvp")
    tangent = out.tangent if out.tangent is not None else out.xp.zeros_like(out.data)
    return out.data, tangent


def value_and_grad(f, argnums=0):
    """A function returning (f(*args), gradient): f must return one element; the gradient
    is an array, or a tuple of arrays when argnums is a tuple."""
    def wrapped(*args):
        nums = _argnums(argnums, len(args))
        args = list(args)
        leaves = []
        for a in nums:
            args[a] = _primal(args[a], f"grad: argument {a}")
            leaves.append(args[a])
        out = _output(f(*args), "grad")
        if out.size != 1:
            raise ValueError(f"grad: f must return a single element, got shape {out.shape}; use vjp or jacobian")
        grads = backward_pass(out, None, inputs=leaves)
        return out.data, grads[0] if isinstance(argnums, int) else tuple(grads)

    return wrapped


def grad(f, argnums=0):
    """The gradient of scalar-valued f with respect to argument(s) `argnums`, as arrays."""
    value_and_grad_f = value_and_grad(f, argnums)
    return lambda *args: value_and_grad_f(*args)[1]


def _jacobian_fwd(f_of_x, x):
    """J [m, n] column by column, one JVP per input element; records no tape. Returns (out, J)."""
    basis = x.xp.eye(x.size, dtype=x.dtype)
    pairs = [jvp(f_of_x, (x.data,), (basis[i].reshape(x.shape),)) for i in range(x.size)]
    if pairs:
        out = pairs[0][0]
    else:
        with no_grad():
            out = _output(f_of_x(x), "jacobian").data
    cols = [tangent.reshape(-1) for _, tangent in pairs]
    m = int(np.prod(out.shape))
    return out, x.xp.stack(cols, axis=1) if cols else x.xp.zeros((m, 0), dtype=x.dtype)


def _jacobian_rev(out, pullback, x):
    """J [m, n] row by row, one VJP per output element of the taped `out`."""
    m = int(np.prod(out.shape))
    basis = x.xp.eye(m, dtype=x.dtype)
    rows = [pullback(basis[j].reshape(out.shape))[0].reshape(-1) for j in range(m)]
    return x.xp.stack(rows, axis=0) if rows else x.xp.zeros((0, x.size), dtype=x.dtype)


def jacobian(f, argnums=0, mode="auto"):
    """The Jacobian of f with respect to argument `argnums`: an array of shape
    out.shape + x.shape.

    mode "fwd" builds it column by column (one JVP per input element, n products, no tape),
    "rev" row by row (one VJP per output element, m products); "auto" picks the cheaper:
    forward mode when the input has fewer elements than the output, reverse otherwise (cost
    min(n, m), plus the one taped forward pass that tells m)."""
    if mode not in ("auto", "fwd", "rev"):
        raise ValueError(f"jacobian: mode must be 'auto', 'fwd' or 'rev', got {mode!r}")

    def wrapped(*args):
        (a,) = _argnums(argnums, len(args))
        x = _primal(args[a], f"jacobian: argument {a}")

        def f_of_x(v):
            return f(*args[:a], v, *args[a + 1:])

        if mode == "fwd":
            out, J = _jacobian_fwd(f_of_x, x)
        else:
            out, pullback = vjp(f_of_x, x)
            if mode == "auto" and x.size < int(np.prod(out.shape)):
                del pullback  # frees the tape before the forward-mode products
                out, J = _jacobian_fwd(f_of_x, x)
            else:
                J = _jacobian_rev(out, pullback, x)
        return J.reshape(tuple(out.shape) + x.shape)

    return wrapped
