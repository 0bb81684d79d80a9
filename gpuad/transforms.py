"""Function transforms in JAX's vocabulary: primals, tangents, cotangents.

Each accepts arrays or Tensors; `f` takes Tensors and returns a Tensor. Results are backend
arrays.

A transform is an explicit request for a derivative: it records `f` on the tape even inside
``ad.no_grad()``. Transforms are first-order: gpuad's VJPs compute on arrays and are not
recorded, so a transform called inside the function another transform is evaluating
(``grad(grad(f))``, ``jvp`` of ``grad``) raises RuntimeError rather than return a derivative
that would be silently zero."""
from __future__ import annotations

import numpy as np

from . import backend as B
from .tensor import Tensor, backward_pass, check_not_in_transform, transform_scope


def _primal(value, what):
    """A fresh leaf Tensor holding `value`'s array (shared, not copied)."""
    data = value.data if isinstance(value, Tensor) else value
    if B.backend_of(data) is None:
        data = B.module_for(B.get_backend()).asarray(data)
    if data.dtype.kind in "biu":
        raise ValueError(f"{what} is an integer array ({data.dtype}); only floating inputs can be differentiated")
    return Tensor(data, requires_grad=True)


def _argnums(argnums, n, what):
    """argnums as a tuple of distinct non-negative positions among `n` arguments.

    Naming one argument twice raises ValueError. (JAX has no such check; its placement of the
    differentiated arguments assumes distinct positions, and repeating one does not return its
    gradient twice.)"""
    if isinstance(argnums, (int, np.integer)) and not isinstance(argnums, bool):
        nums = (int(argnums),)
    elif isinstance(argnums, (tuple, list)) and argnums and all(
            isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in argnums):
        nums = tuple(int(a) for a in argnums)
    else:
        raise TypeError(f"{what}: argnums must be an int or a non-empty tuple of ints, got {argnums!r}")
    for a in nums:
        if not -n <= a < n:
            raise ValueError(f"{what}: argnums {argnums} out of range for {n} positional arguments")
    nums = tuple(a % n for a in nums)
    if len(set(nums)) != len(nums):
        raise ValueError(f"{what}: argnums {argnums} names an argument more than once")
    return nums


def _output(out, what):
    if not isinstance(out, Tensor):
        raise TypeError(f"{what}: f must return a Tensor, got {type(out).__name__}")
    return out


def vjp(f, *primals):
    """(out, vjp_fn): out = f(*primals) as an array; vjp_fn(cotangent) -> a tuple with one
    cotangent array per primal (cotangentᵀ J for each input). vjp_fn may be called repeatedly.

    f is recorded even inside ``ad.no_grad()``. While vjp_fn lives, the numpy arrays its VJPs
    saved (the primals among them, when f's VJPs read them) are read-only: a write into one
    raises at once instead of changing the derivative."""
    return _vjp(f, primals, "ad.vjp")


def _vjp(f, primals, what):
    leaves = [_primal(p, f"{what}: primal {i}") for i, p in enumerate(primals)]
    with transform_scope(what, record=True):
        out = _output(f(*leaves), what)

    def vjp_fn(cotangent):
        check_not_in_transform(f"the vjp_fn of {what}")
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
    with transform_scope("ad.jvp", record=False):
        out = _output(f(*inputs), "jvp")
    tangent = out.tangent if out.tangent is not None else out.xp.zeros_like(out.data)
    return out.data, tangent


def value_and_grad(f, argnums=0):
    """A function returning (f(*args), gradient): f must return one element; the gradient
    is an array, or a tuple of arrays when argnums is a tuple. f is recorded even inside
    ``ad.no_grad()``; argnums naming an argument twice raises ValueError."""
    def wrapped(*args):
        nums = _argnums(argnums, len(args), "grad")
        args = list(args)
        leaves = []
        for a in nums:
            args[a] = _primal(args[a], f"grad: argument {a}")
            leaves.append(args[a])
        with transform_scope("ad.grad", record=True):
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


def _jacobian_fwd(f_of_xs, xs):
    """J [m, n] for each input, column by column: one JVP per input element; records no tape.
    Returns (out, [J per input])."""
    out, columns = None, [[] for _ in xs]
    for k, x in enumerate(xs):
        basis = x.xp.eye(x.size, dtype=x.dtype)
        for i in range(x.size):
            tangents = [x_.xp.zeros_like(x_.data) for x_ in xs]
            tangents[k] = basis[i].reshape(x.shape)
            out, tangent = jvp(f_of_xs, [x_.data for x_ in xs], tangents)
            columns[k].append(tangent.reshape(-1))
    if out is None:  # every input is empty: evaluate once for the output's shape
        with transform_scope("ad.jacobian", record=False):
            out = _output(f_of_xs(*xs), "jacobian").data
    m = int(np.prod(out.shape))
    return out, [x.xp.stack(cols, axis=1) if cols else x.xp.zeros((m, 0), dtype=x.dtype)
                 for x, cols in zip(xs, columns)]


def _jacobian_rev(out, pullback, xs):
    """J [m, n] for each input, row by row: one VJP per output element of the taped `out`."""
    m = int(np.prod(out.shape))
    xp = B.array_module(out)
    basis = xp.eye(m, dtype=xs[0].dtype)
    rows = [pullback(basis[j].reshape(out.shape)) for j in range(m)]
    return [xp.stack([r[k].reshape(-1) for r in rows], axis=0) if rows else xp.zeros((0, x.size), dtype=x.dtype)
            for k, x in enumerate(xs)]


def jacobian(f, argnums=0, mode="auto"):
    """The Jacobian of f with respect to argument `argnums`: an array of shape
    out.shape + x.shape; a tuple of such arrays, one per argument, when argnums is a tuple
    (as JAX's jacfwd / jacrev).

    mode "fwd" builds it column by column (one JVP per input element, n products, no tape),
    "rev" row by row (one VJP per output element, m products); "auto" picks the cheaper:
    forward mode when the inputs have fewer elements than the output, reverse otherwise (cost
    min(n, m), plus the one taped forward pass that tells m). f is recorded even inside
    ``ad.no_grad()``."""
    if mode not in ("auto", "fwd", "rev"):
        raise ValueError(f"jacobian: mode must be 'auto', 'fwd' or 'rev', got {mode!r}")

    def wrapped(*args):
        nums = _argnums(argnums, len(args), "jacobian")
        xs = [_primal(args[a], f"jacobian: argument {a}") for a in nums]

        def f_of_xs(*vs):
            full = list(args)
            for a, v in zip(nums, vs):
                full[a] = v
            return f(*full)

        if mode == "fwd":
            out, Js = _jacobian_fwd(f_of_xs, xs)
        else:
            out, pullback = _vjp(f_of_xs, [x.data for x in xs], "ad.jacobian")
            if mode == "auto" and sum(x.size for x in xs) < int(np.prod(out.shape)):
                del pullback  # frees the tape before the forward-mode products
                out, Js = _jacobian_fwd(f_of_xs, xs)
            else:
                Js = _jacobian_rev(out, pullback, xs)
        Js = [J.reshape(tuple(out.shape) + x.shape) for J, x in zip(Js, xs)]
        return Js[0] if isinstance(argnums, (int, np.integer)) else tuple(Js)

    return wrapped
