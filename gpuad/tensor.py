"""The Tensor and the tape.

A Tensor wraps a backend array (numpy or CuPy). Every op on Tensors that need a gradient
records a :class:`Node` holding only what its VJP needs; ``backward`` walks those nodes in
reverse topological order (iteratively, so a chain of any length works), summing every
cotangent a node receives before it runs, and frees the graph as it goes.

Forward mode rides along: a Tensor may carry a ``tangent`` array, and every op that sees a
tangent on an input computes its output's tangent with the op's JVP rule.
"""
from __future__ import annotations

import contextlib
import weakref

import numpy as np

from . import backend as B


class Node:
    """One tape entry: where cotangents go, and the VJP that makes them.

    ``edges`` has one entry per op input: the input's own Node, the input Tensor itself when
    it is a leaf that requires grad, or None when it needs no gradient. A Node never holds
    its inputs' Tensors otherwise, so an intermediate array that no VJP saved is freed as
    soon as the user drops it (the logits before a fused cross-entropy, say).

    ``vjp`` is either a tuple with one function per input (``g -> cotangent of that input``;
    only those of inputs that need a gradient are called) or a single function
    ``g -> tuple of cotangents`` for fused ops that produce them together. ``shape`` and
    ``dtype`` describe the node's output; ``out`` is a weak reference to its Tensor."""

    __slots__ = ("name", "edges", "vjp", "shape", "dtype", "out", "__weakref__")

    def __init__(self, name, edges, vjp, out):
        self.name = name
        self.edges = edges
        self.vjp = vjp
        self.shape = tuple(out.data.shape)
        self.dtype = out.data.dtype
        self.out = weakref.ref(out)


_FREED = "freed"  # marks a Tensor whose graph was released by backward
_grad_mode = {"enabled": True}
_seed = {"unit": None}  # the default cotangent (ones) of the backward now running


def is_unit_seed(g) -> bool:
    """True when `g` is the implicit cotangent 1 of ``loss.backward()``: a VJP may then
    return its Jacobian row as it is, with no multiply."""
    return g is _seed["unit"]


class no_grad(contextlib.ContextDecorator):
    """``with ad.no_grad(): ...`` (or as a decorator): ops record nothing on the tape."""

    def __enter__(self):
        self._previous = _grad_mode["enabled"]
        _grad_mode["enabled"] = False
        return self

    def __exit__(self, *exc):
        _grad_mode["enabled"] = self._previous
        return False


def is_grad_enabled() -> bool:
    return _grad_mode["enabled"]


class Tensor:
    """A backend array with a place on the tape.

    ``data`` and ``grad`` are backend arrays (numpy.ndarray or cupy.ndarray)."""

    __slots__ = ("data", "grad", "requires_grad", "_node", "tangent", "__weakref__")
    __array_priority__ = 1000  # numpy defers `array + tensor` to Tensor.__radd__

    def __init__(self, data, requires_grad=False):
        if isinstance(data, np.generic):
            data = np.asarray(data)
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._node = None
        self.tangent = None
        if self.requires_grad and data.dtype.kind not in "fc" and str(data.dtype) != "bfloat16":
            raise ValueError(f"only floating-point tensors can require grad, got dtype {data.dtype}")

    # --- properties -------------------------------------------------------------------
    shape = property(lambda self: tuple(self.data.shape))
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: int(self.data.size))
    xp = property(lambda self: B.array_module(self.data))
    backend = property(lambda self: B.backend_of(self.data))
    is_leaf = property(lambda self: self._node is None)

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        flag = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({B.to_host(self.data)!r}, backend={self.backend}{flag})"

    def numpy(self) -> np.ndarray:
        """The values as a host numpy array (a copy for CuPy)."""
        return B.to_host(self.data)

    def item(self):
        return self.numpy().item()

    def detach(self) -> "Tensor":
        """The same data, off the tape."""
        return Tensor(self.data)

    def __dlpack__(self, *args, **kwargs):
        return self.data.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self.data.__dlpack_device__()

    def backward(self, cotangent=None, retain_graph=False):
        """Accumulate d(self)/d(leaf), contracted with `cotangent`, into every leaf's ``.grad``.

        `cotangent` defaults to 1 for a tensor of one element and must have self's shape
        otherwise. The graph is freed afterwards unless ``retain_graph=True``."""
        backward_pass(self, cotangent, retain_graph)


def as_tensor(value, like: Tensor | None = None) -> Tensor:
    """Tensors pass through; arrays become constant Tensors; Python scalars become 0-d
    constants in `like`'s floating dtype (so ``x * 2.0`` keeps x's precision)."""
    if isinstance(value, Tensor):
        return value
    if B.backend_of(value) is not None:
        return Tensor(value if not isinstance(value, np.generic) else np.asarray(value))
    if isinstance(value, (int, float, bool)) and like is not None:
        xp = like.xp
        dtype = like.dtype if like.dtype.kind == "f" or str(like.dtype) == "bfloat16" else None
        return Tensor(xp.asarray(value, dtype=dtype))
    if like is not None:
        return Tensor(like.xp.asarray(value))
    return Tensor(np.asarray(value))


def record(name, data, parents, vjp, jvp) -> Tensor:
    """Make the output Tensor of an op on `parents` (a tuple of Tensors).

    Records a Node when grad mode is on and a parent requires grad; computes the output
    tangent with ``jvp(*parent_tangents)`` when a parent carries one (zeros stand in for
    parents that carry none)."""
    out = Tensor(data)
    if _grad_mode["enabled"] and any(p.requires_grad for p in parents):
        out.requires_grad = True
        edges = tuple((p if p._node is None else p._node) if p.requires_grad else None for p in parents)
        out._node = Node(name, edges, vjp, out)
    if any(p.tangent is not None for p in parents):
        tangents = [p.tangent if p.tangent is not None else p.xp.zeros_like(p.data) for p in parents]
        t = jvp(*tangents)
        out.tangent = out.xp.asarray(t, dtype=out.dtype)
    return out


def _coerce(g, shape, dtype, name: str):
    """A cotangent as an array of the given shape and dtype; a wrong shape is a bug in a rule."""
    g = B.array_module(g).asarray(g, dtype=dtype)
    if g.shape != shape:
        raise RuntimeError(f"internal error: VJP of {name} gave shape {g.shape} for an input of shape {shape}")
    return g


_FREED_MESSAGE = ("backward through a graph that was already freed; "
                  "pass retain_graph=True to the first backward to keep it")


def backward_pass(root: Tensor, cotangent=None, retain_graph=False, inputs=None):
    """Reverse mode from `root`.

    Without `inputs`, cotangents reaching leaves are added to their ``.grad``. With `inputs`
    (a list of Tensors), nothing is written to ``.grad``; the summed cotangent of each input
    is returned instead (zeros for an input that `root` does not depend on)."""
    if root._node is _FREED:
        raise RuntimeError(_FREED_MESSAGE)
    if cotangent is None:
        if root.size != 1:
            raise ValueError(f"backward of a tensor of shape {root.shape} needs a cotangent of that shape")
        g = root.xp.ones(root.data.shape, dtype=root.dtype)
    else:
        g = cotangent.data if isinstance(cotangent, Tensor) else cotangent
        B.array_module(g, root.data)
        g = root.xp.asarray(g, dtype=root.dtype)
        if g.shape != root.data.shape:
            raise ValueError(f"cotangent shape {g.shape} does not match the output's shape {root.shape}")
    collected = None if inputs is None else {id(t): None for t in inputs}
    if not root.requires_grad:
        if inputs is None:
            raise RuntimeError("backward of a tensor that does not require grad (no input requires grad)")
    else:
        _seed["unit"] = g if cotangent is None else None
        try:
            _walk(root, g, retain_graph, collected)
        finally:
            _seed["unit"] = None
    if inputs is None:
        return None
    return [collected[id(t)] if collected[id(t)] is not None else t.xp.zeros_like(t.data) for t in inputs]


def _deliver_to_leaf(leaf: Tensor, g, collected, shared):
    """Add cotangent `g` to a leaf. `shared` holds the ids of arrays that someone else may
    also hold (the caller's cotangent, arrays already handed to another leaf): a leaf's
    ``.grad`` never aliases those, a view, or a buffer that a retained graph keeps."""
    if collected is not None:
        if id(leaf) in collected:
            prev = collected[id(leaf)]
            collected[id(leaf)] = g if prev is None else prev + g
        return
    if leaf.grad is None:
        leaf.grad = g.copy() if id(g) in shared or getattr(g, "base", None) is not None else g
        shared.add(id(leaf.grad))
    else:
        leaf.grad = leaf.grad + g


def _walk(root: Tensor, g, retain_graph, collected):
    shared = {id(g)}
    if root._node is None:  # the root is itself a leaf
        _deliver_to_leaf(root, g, collected, shared)
        return
    # 1. count, for every node reachable from the root, how many edges lead into it
    pending = {id(root._node): 0}
    stack = [root._node]
    visited = [root._node]
    while stack:
        node = stack.pop()
        for e in node.edges:
            if e is _FREED:
                raise RuntimeError(_FREED_MESSAGE)
            if type(e) is not Node:
                continue
            k = id(e)
            if k in pending:
                pending[k] += 1
            else:
                pending[k] = 1
                visited.append(e)
                stack.append(e)
    # 2. run each node once all of its cotangents are summed (Kahn's order)
    cotangents = {id(root._node): g}
    ready = [root._node]
    while ready:
        node = ready.pop()
        g = cotangents.pop(id(node))
        edges = node.edges
        if isinstance(node.vjp, tuple):
            grads = [None if e is None else f(g) for f, e in zip(node.vjp, edges)]
        else:
            grads = node.vjp(g)
        del g
        if not retain_graph:
            node.vjp = node.edges = None
        for e, gp in zip(edges, grads):
            if gp is None or e is None:
                continue
            if type(e) is not Node:  # a leaf Tensor
                gp = _coerce(gp, e.data.shape, e.dtype, node.name)
                if retain_graph:
                    shared.add(id(gp))
                _deliver_to_leaf(e, gp, collected, shared)
                continue
            gp = _coerce(gp, e.shape, e.dtype, node.name)
            k = id(e)
            prev = cotangents.get(k)
            cotangents[k] = gp if prev is None else prev + gp
            pending[k] -= 1
            if pending[k] == 0:
                ready.append(e)
        del edges, grads
    if not retain_graph:  # release the graph: Tensors forget their nodes, so the nodes die
        for node in visited:
            t = node.out()
            if t is not None:
                t._node = _FREED
