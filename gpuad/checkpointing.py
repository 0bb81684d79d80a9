"""Activation checkpointing: trade compute for the memory that reverse mode keeps.

    h = ad.checkpoint(block, h)      # block's intermediates are not kept; backward recomputes them

A checkpointed function is one node on the tape that keeps only its inputs. Its VJP runs the
function again on those inputs, with recording on, and backpropagates through that fresh graph.
The recomputation must be the forward pass again: the same ops in the same order on the same
numbers, so the gradients are bit-identical to those without the checkpoint; the VJP checks the
op sequence and, while the forward output is alive, the output's values.
"""
from __future__ import annotations

import weakref

from . import backend as B
from .tensor import Node, Tensor, backward_pass, enable_grad, no_grad, record
from .tracing import listening


class _Ops:
    """A listener collecting the ops a function runs (name, shape, dtype) and the tensors from
    outside it that need a gradient: under no_grad every such input is from outside."""

    def __init__(self, args):
        self.ops, self.outside = [], {}
        self.arg_ids = {id(a) for a in args}

    def on_record(self, out, name, parents):
        self.ops.append((name, out.shape, str(out.dtype)))
        for p in parents:
            if p.requires_grad and id(p) not in self.arg_ids:
                self.outside[id(p)] = p

    def on_vjp(self, node, g, grads):
        pass


def checkpoint(fn, *args):
    """``fn(*args)``, keeping none of its intermediates for backward: the VJP recomputes them.

    `fn` takes `args` (Tensors, arrays or other values: only Tensors are differentiated) and
    returns one Tensor; it may use parameters of its own (a Module's, a closure's): they are
    found while it runs and get their gradients as usual. A tensor from outside that needs a
    gradient and is not a leaf (an intermediate of the enclosing graph) must be passed in
    `args`. fn must compute the same thing when it runs again (no randomness drawn inside):
    the VJP raises RuntimeError when the recomputation runs other ops or gives another
    output. Forward mode (tangents) passes through fn as it runs."""
    if not callable(fn):
        raise TypeError(f"checkpoint: fn must be callable, got {type(fn).__name__}")
    tensors = [a for a in args if isinstance(a, Tensor)]
    seen = _Ops(tensors)
    with no_grad(), listening(seen):
        y = fn(*args)
    if not isinstance(y, Tensor):
        raise TypeError(f"checkpoint: fn must return a Tensor, got {type(y).__name__}")
    for p in seen.outside.values():
        if type(p._node) is Node:
            raise ValueError(f"checkpoint: fn uses a tensor of shape {p.shape} from outside that needs a gradient "
                             "and is an intermediate of the graph (not a leaf): pass it to checkpoint as an argument")
    params = list(seen.outside.values())
    parents = tuple(tensors) + tuple(params)
    # what the VJP keeps: the inputs' arrays (not the Tensors, which hold the graph before them)
    others = [None if isinstance(a, Tensor) else a for a in args]
    arrays = [(i, a.data, a.requires_grad) for i, a in enumerate(args) if isinstance(a, Tensor)]
    forward_ops, forward_out = seen.ops, _weak(y.data)

    def vjp(g):
        xs = list(others)
        for i, data, requires_grad in arrays:
            xs[i] = Tensor(data, requires_grad=requires_grad)
        again = _Ops(())
        with enable_grad(), listening(again):
            y2 = fn(*xs)
        previous = forward_out()
        if again.ops != forward_ops or not isinstance(y2, Tensor) or (
                previous is not None and not B.array_module(previous).array_equal(previous, y2.data, equal_nan=True)):
            raise RuntimeError("checkpoint: recomputing fn ran other ops or gave another output than the forward "
                               "pass; fn must compute the same thing again (no randomness drawn inside it)")
        wrt = [xs[i] for i, _, _ in arrays] + params
        if not y2.requires_grad:
            return tuple(None for _ in wrt)
        return tuple(backward_pass(y2, g, inputs=wrt))

    def jvp(*_):  # fn ran on the tangents already
        return y.tangent if y.tangent is not None else y.xp.zeros_like(y.data)

    return record("checkpoint", y.data, parents, vjp=vjp, jvp=jvp, saved=parents)


def _weak(a):
    """A weak reference to array `a` (a function returning None when arrays take none)."""
    try:
        return weakref.ref(a)
    except TypeError:
        return lambda: None
