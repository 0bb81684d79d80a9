"""The Tensor and the tape.

A Tensor wraps a backend array (numpy or CuPy). Every op on Tensors that need a gradient
records a :class:`Node` holding only what its VJP needs; ``backward`` walks those nodes in
reverse topological order (iteratively, so a chain of any length works), summing every
cotangent a node receives before it runs, and frees the graph as it goes.

Forward mode rides along: a Tensor may carry a ``tangent`` array, and every op that sees a
tangent on an input computes its output's tangent with the op's JVP rule.

Grad mode (``no_grad`` / ``enable_grad``) is per thread, as in PyTorch. Arrays that a VJP saved
are guarded against in-place writes while their graph lives (see :func:`guard_saved`).
"""
from __future__ import annotations

import contextlib
import threading
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
    ``dtype`` describe the node's output array `data` (which the node does not keep).

    A backward without ``retain_graph`` frees each node it ran: ``vjp`` and ``edges`` become
    None, and a later backward reaching the node raises."""

    __slots__ = ("name", "edges", "vjp", "shape", "dtype", "guarded", "__weakref__")
    # made by record() alone, its slots set there (no __init__ frame per op); `guarded` holds the
    # _Guards of the arrays its VJP saved, dropped after its last VJP


_FREED = "freed"  # the node of a backward's root once its graph was freed (the root forgets its node)


class _ThreadState(threading.local):
    """What each thread has of its own: grad mode, the transform now evaluating a function,
    and the implicit cotangent of the backward now running."""

    def __init__(self):
        self.grad_enabled = True
        self.grad_stack = []  # the modes that the open no_grad / enable_grad blocks replaced
        self.transform = None  # name of the transform whose function is being evaluated
        self.unit_seed = None


_state = _ThreadState()


def is_unit_seed(g) -> bool:
    """True when `g` is the implicit cotangent 1 of ``loss.backward()``: a VJP may then
    return its Jacobian row as it is, with no multiply."""
    return g is _state.unit_seed


class _GradMode(contextlib.ContextDecorator):
    enabled = True

    def __enter__(self):
        state = _state
        state.grad_stack.append(state.grad_enabled)
        state.grad_enabled = self.enabled
        return self

    def __exit__(self, *exc):
        _state.grad_enabled = _state.grad_stack.pop()
        return False


class no_grad(_GradMode):
    """``with ad.no_grad(): ...`` (or ``@ad.no_grad()``): ops record nothing on the tape.

    Re-entrant (one instance may be entered again, by a recursive decorated function, say)
    and per thread, as in PyTorch: each entry saves the calling thread's mode on that
    thread's own stack and its exit restores it; a new thread starts with grad enabled.
    Transforms (``ad.grad``, ``ad.vjp``, ...) record inside no_grad: they are an explicit
    request for a derivative."""

    enabled = False


class enable_grad(_GradMode):
    """``with ad.enable_grad(): ...``: ops record again (inside a ``no_grad`` block, say)."""

    enabled = True


def is_grad_enabled() -> bool:
    """Whether ops record on the tape in the calling thread."""
    return _state.grad_enabled


@contextlib.contextmanager
def transform_scope(name: str, record: bool):
    """Evaluate a transform's function: recording on (`record`) or off whatever the caller's
    grad mode, and no second transform inside it.

    gpuad's VJPs compute on arrays and are not themselves recorded, so a transform nested in
    another (``grad(grad(f))``, a ``vjp`` inside the function ``jacobian`` differentiates)
    would return a constant to the outer one and its derivative would be silently zero:
    that raises RuntimeError instead."""
    check_not_in_transform(name)
    state = _state
    state.transform = name
    state.grad_stack.append(state.grad_enabled)
    state.grad_enabled = record
    try:
        yield
    finally:
        state.grad_enabled = state.grad_stack.pop()
        state.transform = None


def check_not_in_transform(name: str):
    """Raise, as transform_scope does, when called while a transform evaluates a function."""
    if _state.transform is not None:
        raise RuntimeError(f"{name} was called inside the function that {_state.transform} is evaluating: "
                           "gpuad's transforms are first-order and do not nest (the inner derivative would be "
                           "a constant to the outer transform, and its derivative silently zero)")


# --- the guard on saved arrays ----------------------------------------------------------
# A VJP reads arrays saved in the forward pass; writing into one of them between the forward
# and the backward would make the gradient silently wrong (y = (a*a).sum(); a.data[...] = 10;
# y.backward() would give [20, 20], not 2·a). numpy arrays carry a writeable flag: while a
# live node saved a leaf's data (a parameter, an input, a transform's primal), a constant
# operand (the user's array), an index or a mask, that array and the memory owner behind it
# (its .base) are read-only, so a write raises at once ("assignment destination is read-only"),
# and the flag comes back when the last node holding them runs its final VJP or is garbage
# collected. Owners are reference-counted across nodes and graphs. View ops (reshape,
# transpose, basic indexing) guard their leaf source, since their output shares its memory.
# Not guarded, to keep the per-op cost to a dictionary lookup: the data of an op's output
# (gpuad made the array and never writes Tensor data in place; a user writing into
# `h.data` of an intermediate is not caught), CuPy arrays and arrays whose memory numpy does
# not own (DLPack imports, buffers), which have no flag that can be set back.
_guards = {}  # id(array) -> weak reference to the _Guard holding it read-only (owners and views)
_guard_lock = threading.RLock()  # re-entrant: a garbage collection inside may finalize a guard


class _Guard:
    """The read-only flag on one memory owner and the views made read-only with it. Every node
    whose VJP saved the memory holds the guard; when the last one lets go (it ran its final
    VJP, or died unrun), Python's reference count drops it and the flags come back.

    A guard is made and dropped for every saved array of every graph, so the lock is taken
    with acquire/release (cheaper than ``with``) and setflags is called positionally."""

    __slots__ = ("owner", "views", "__weakref__")

    def __init__(self, owner):
        self.owner = owner
        self.views = ()

    def add_view(self, view):
        """Hold `view` (read-only already) too and make it writeable again with the owner."""
        self.views += (view,)
        _guards[id(view)] = _guards[id(self.owner)]

    def __del__(self):
        _guard_lock.acquire()
        try:
            # the owner first: numpy refuses a writeable view below a read-only owner
            for a in (self.owner, *self.views):
                _guards.pop(id(a), None)
                try:
                    a.setflags(True)  # write=True
                except ValueError:  # the user made the memory read-only meanwhile: leave it so
                    pass
        finally:
            _guard_lock.release()


def _new_guard(a):
    """A guard making numpy array `a` and its memory owner read-only, or None when there is
    nothing to guard (numpy does not own the memory, or it was read-only already)."""
    _guard_lock.acquire()
    try:
        owner = a.base
        if owner is None:
            owner = a
        elif type(owner) is not np.ndarray or owner.base is not None:
            return None  # numpy does not own the memory: the flag could not be set back
        ref = _guards.get(id(owner))  # looked up again under the lock: another thread may have guarded it
        guard = ref() if ref is not None else None
        if guard is None:
            if not owner.flags.writeable:
                return None  # read-only already, not by us
            guard = _Guard(owner)
            owner.setflags(False)  # write=False
            _guards[id(owner)] = weakref.ref(guard)
        if a is not owner and a.flags.writeable:
            a.setflags(False)
            guard.add_view(a)
        return guard
    finally:
        _guard_lock.release()


def guard_saved(items) -> tuple:
    """The guards (see above) on what a VJP saved: `items` holds Tensors, guarded when they
    are not an op's output, and arrays (an index, a mask); None entries are skipped."""
    held = ()
    for a in items:
        if isinstance(a, Tensor):  # Parameters (subclasses) too
            if a._node is not None:
                continue  # an op's output: gpuad made the array and never writes it
            a = a.data
        if type(a) is not np.ndarray:
            continue
        ref = _guards.get(id(a))
        guard = ref() if ref is not None else None
        if guard is None:
            guard = _new_guard(a)
        if guard is not None:
            held += (guard,)
    return held


def adopt_view(source, view):
    """`view` was just made from `source`: if the guard holds `source` read-only, the view is
    read-only too (numpy copies the flag); it comes back writeable along with `source`."""
    ref = _guards.get(id(source))
    if ref is None or type(view) is not np.ndarray or view.flags.writeable:
        return  # not from a guarded array, or a copy
    with _guard_lock:
        guard = ref()
        if guard is not None and id(view) not in _guards:
            guard.add_view(view)


def _raise_changed(node):
    """A saved array of `node` was made writeable again after the forward pass."""
    raise RuntimeError(f"{node.name}: an array saved for its backward was made writeable after the "
                       "forward pass and may have been changed in place, so the gradient would be wrong; "
                       "recompute the forward pass after changing inputs")


class Tensor:
    """A backend array with a place on the tape.

    ``data`` and ``grad`` are backend arrays (numpy.ndarray or cupy.ndarray)."""

    __slots__ = ("data", "grad", "requires_grad", "_node", "tangent", "__weakref__")
    # numpy's operators and ufuncs defer to Tensor (`array + tensor` is Tensor.__radd__) and
    # its other functions refuse Tensors (__array_function__), so nothing drops off the tape;
    # CuPy's operators defer by __array_priority__
    __array_ufunc__ = None
    __array_priority__ = 1000
    # `==` and `!=` compare elementwise (as numpy and torch do); hashing is by identity (as torch)
    __hash__ = object.__hash__

    def __init__(self, data, requires_grad=False):
        if isinstance(data, np.generic):
            data = np.asarray(data)
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad = bool(requires_grad)
        self._node = None
        self.tangent = None
        if requires_grad and data.dtype.kind not in "fc" and str(data.dtype) != "bfloat16":
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
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __bool__(self):
        """The truth of a one-element tensor (as numpy and torch); more or none is ambiguous."""
        if self.size != 1:
            raise ValueError(f"the truth value of a tensor of shape {self.shape} is ambiguous: it has "
                             f"{self.size} elements; use ad.where, or reduce it first (.numpy().any() / .all())")
        return bool(self.data.reshape(()))

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    def __array__(self, dtype=None, copy=None):
        """np.asarray(tensor): the values, a constant (as x.numpy()); CuPy tensors refuse it."""
        if B.is_cupy_array(self.data):
            raise TypeError("a cupy-backend Tensor does not convert to numpy implicitly; use x.numpy()")
        if copy:
            return np.array(self.data, dtype=dtype, copy=True)
        return self.data if dtype is None else self.data.astype(dtype, copy=False)

    def __array_function__(self, func, types, args, kwargs):
        name = getattr(func, "__name__", str(func))
        raise TypeError(f"numpy.{name} does not take gpuad Tensors: use gpuad's own op (ad.{name}, if it exists) "
                        f"to stay on the tape, or numpy.{name}(x.numpy()) for a constant result")

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


# The inspection hook (gpuad.tracing: ad.trace, ad.checkpoint): None, or an object whose
# on_record(out, name, parents) runs after every record() and on_vjp(node, g, grads) after every
# VJP of a backward walk. Unset, it costs each op and each VJP one global None check.
_inspector = None

_new_tensor = _new_node = object.__new__


def record(name, data, parents, vjp, jvp, saved=()) -> Tensor:
    """Make the output Tensor of an op on `parents` (a tuple of Tensors).

    Records a Node when grad mode is on and a parent requires grad; computes the output
    tangent with ``jvp(*parent_tangents)`` when a parent carries one (zeros stand in for
    parents that carry none). `saved` lists the parents whose data the VJP reads and the
    arrays it keeps (an index, a mask): they are guarded against in-place writes while the
    node lives (see guard_saved; None entries are skipped).

    Every op goes through here, so it is written for speed: plain loops, no generators."""
    out = _new_tensor(Tensor)  # Tensor(data) without its checks: `data` is an op's result
    if type(data) is not np.ndarray and isinstance(data, np.generic):
        data = np.asarray(data)  # a 0-d op gives a numpy scalar
    out.data = data
    out.grad = out.tangent = None
    if not _state.grad_enabled:
        edges = None
    elif len(parents) == 2:  # the binary ops, written out (see _edges)
        a, b = parents
        ea = (a if a._node is None else a._node) if a.requires_grad else None
        eb = (b if b._node is None else b._node) if b.requires_grad else None
        edges = None if ea is None and eb is None else (ea, eb)
    elif len(parents) == 1:  # the unary ops
        a = parents[0]
        edges = ((a if a._node is None else a._node),) if a.requires_grad else None
    else:
        edges = _edges(parents)
    if edges is None:
        out.requires_grad = False
        out._node = None
    else:
        out.requires_grad = True
        out._node = node = _new_node(Node)
        node.name = name
        node.edges = edges
        node.vjp = vjp
        node.shape = data.shape
        node.dtype = data.dtype
        node.guarded = guard_saved(saved) if saved else ()
    for p in parents:
        if p.tangent is not None:
            out.tangent = _tangent_out(jvp, parents, out)
            break
    if _inspector is not None:
        _inspector.on_record(out, name, parents)
    return out


def _edges(parents):
    """A node's edges to `parents` (see Node), or None when no parent requires grad."""
    edges = tuple([(p if p._node is None else p._node) if p.requires_grad else None for p in parents])
    return None if edges.count(None) == len(edges) else edges


def _tangent_out(jvp, parents, out):
    """The output tangent ``jvp(*parent_tangents)``, zeros standing in for parents without one."""
    tangents = [p.tangent if p.tangent is not None else p.xp.zeros_like(p.data) for p in parents]
    return out.xp.asarray(jvp(*tangents), dtype=out.dtype)


def _coerce(g, shape, dtype, name: str):
    """A cotangent as an array of the given shape and dtype; a wrong shape is a bug in a rule.
    The walk calls it only when `g` is not a numpy array of that dtype and shape already."""
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
        state = _state
        previous, state.unit_seed = state.unit_seed, (g if cotangent is None else None)
        try:
            _walk(root, g, retain_graph, collected)
        finally:
            state.unit_seed = previous
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
    elif getattr(leaf.grad, "shape", None) == g.shape:
        leaf.grad = leaf.grad + g
    else:  # a .grad set by hand: adding would broadcast it, or fail inside numpy
        raise ValueError(f"backward: a leaf of shape {leaf.shape} holds a .grad of {describe_grad(leaf.grad)}, "
                         "into which its gradient cannot be added; set .grad to None or to an array of the "
                         "leaf's shape")


def describe_grad(grad) -> str:
    """"shape (…)" of an array put in a ``.grad``, "type …" of anything else."""
    shape = getattr(grad, "shape", None)
    return f"type {type(grad).__name__}" if shape is None else f"shape {tuple(shape)}"


def _walk(root: Tensor, g, retain_graph, collected):
    """Reverse mode from `root` with cotangent `g`, in one rule: a node runs its VJP once all
    of its cotangents are summed (Kahn's order over the counts of _count_uses), and each input
    cotangent it gives goes to one of three cases, named below: a leaf (added to its gradient at
    once), a node's last cotangent (the node is ready), or a node's earlier one (kept summed).
    The loop is written out: every op of a long chain passes through it."""
    shared = {id(g)}
    if root._node is None:  # the root is itself a leaf
        _deliver_to_leaf(root, g, collected, shared)
        return
    pending = _count_uses(root._node)
    partial = {}  # the summed cotangents of nodes still waiting for some
    ready = [(root._node, g)]  # (node, its summed cotangent)
    while ready:
        node, g = ready.pop()
        edges, vjp = node.edges, node.vjp
        for guard in node.guarded:  # each saved array must still be read-only (the user can lift the flag)
            if guard.owner.flags.writeable:
                _raise_changed(node)
        # the VJP: one function per input, called only for inputs that need a gradient (the
        # binary ops written out), or one function giving every input's cotangent
        if type(vjp) is not tuple:
            grads = vjp(g)
        elif len(vjp) == 2:
            e0, e1 = edges
            grads = (None if e0 is None else vjp[0](g), None if e1 is None else vjp[1](g))
        else:
            grads = []
            for f, e in zip(vjp, edges):
                grads.append(None if e is None else f(g))
        if _inspector is not None:
            _inspector.on_vjp(node, g, grads)
        del g
        if not retain_graph:
            node.vjp = node.edges = None
        for e, gp in zip(edges, grads):
            if gp is None or e is None:
                continue
            leaf = type(e) is not Node
            like = e.data if leaf else e  # what the cotangent must match: shape and dtype
            if type(gp) is not np.ndarray or gp.dtype is not like.dtype or gp.shape != like.shape:
                gp = _coerce(gp, like.shape, like.dtype, node.name)
            if leaf:  # case "leaf": a leaf Tensor (of any subclass) takes its share now
                if retain_graph:
                    shared.add(id(gp))
                _deliver_to_leaf(e, gp, collected, shared)
                continue
            waiting = pending[e]
            if waiting == 1:  # case "last": e's last cotangent, so e is ready
                prev = partial.pop(e, None) if partial else None
                ready.append((e, gp if prev is None else prev + gp))
            else:  # case "earlier": e waits for more; its sum so far is kept
                pending[e] = waiting - 1
                prev = partial.get(e)
                partial[e] = gp if prev is None else prev + gp
        if not retain_graph:
            node.guarded = ()  # after its last VJP: the arrays it saved may be written again
        del edges, vjp, grads
    if not retain_graph:  # the graph is released: its nodes die with the walk, the root's too
        root._node = _FREED


def _count_uses(root_node) -> dict:
    """{node: how many edges lead into it} for every node reachable from `root_node` (nodes are
    their own dictionary keys: they hash by identity). Raises on a node a backward freed."""
    pending = {root_node: 0}
    stack = [root_node]
    while stack:
        edges = stack.pop().edges
        if edges is None:  # a node that a backward freed
            raise RuntimeError(_FREED_MESSAGE)
        for e in edges:
            if type(e) is not Node:  # no input (None), a leaf Tensor (of any subclass), or freed
                if e is _FREED:
                    raise RuntimeError(_FREED_MESSAGE)
            elif e in pending:
                pending[e] += 1
            else:
                pending[e] = 1
                stack.append(e)
    return pending
