"""Modules for gpuad's own training loops, in PyTorch's shape.

    import gpuad as ad
    from gpuad import nn
    nn.manual_seed(0)
    model = nn.MLP([64, 128, 128, 10], activation="relu", residual=True)
    loss = nn.CrossEntropyLoss()(model(ad.tensor(x)), y)
    loss.backward()                       # each parameter's .grad is a backend array

A module's parameters are :class:`Parameter` Tensors (leaves that require grad) held as
attributes; sub-modules are attributes too. ``parameters()`` lists the module's own parameters
in the order they were assigned, then each sub-module's, depth first (PyTorch's order).
Parameters are drawn on the host from a numpy Generator (the module-level one that
:func:`manual_seed` resets, or ``rng=``) and placed on the active backend, so one seed gives
the same model on numpy and on CuPy. Every forward calls the engine ops (``ad.linear``,
``ad.relu``, ``ad.softmax_cross_entropy``, ...): one body for both backends.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from . import backend as B
from . import ops
from .kernels.checks import REDUCTIONS, ignore_index_arg
from .tensor import Tensor

_default_rng = {"rng": np.random.default_rng()}


def manual_seed(seed: int) -> None:
    """Reset the generator that draws new modules' parameters (like ``torch.manual_seed``)."""
    _default_rng["rng"] = np.random.default_rng(seed)


class Parameter(Tensor):
    """A leaf Tensor that requires grad and that a Module registers as its parameter."""

    __slots__ = ()

    def __init__(self, data, requires_grad=True):
        super().__init__(data, requires_grad=requires_grad)


def _uniform(shape, bound, dtype, rng):
    """A Parameter drawn from U(-bound, bound) on the host, placed on the active backend."""
    rng = _default_rng["rng"] if rng is None else rng
    values = rng.uniform(-bound, bound, size=shape) if bound > 0 else np.zeros(shape)
    return Parameter(B.module_for(B.get_backend()).asarray(values.astype(dtype)))


class Module:
    """Base class: subclasses assign Parameters and Modules as attributes and define ``forward``."""

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} defines no forward()")

    def named_children(self):
        return [(name, v) for name, v in vars(self).items() if isinstance(v, Module)]

    def named_parameters(self, prefix=""):
        """(dotted name, Parameter) pairs: own parameters first, then each child's; a
        parameter shared by two modules is listed once, under its first name."""
        seen, out = set(), []
        stack = [(prefix, self)]
        while stack:
            path, module = stack.pop()
            children = []
            for name, v in vars(module).items():
                if isinstance(v, Parameter):
                    if id(v) not in seen:
                        seen.add(id(v))
                        out.append((path + name, v))
                elif isinstance(v, Module):
                    children.append((path + name + ".", v))
            stack.extend(reversed(children))
        return out

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def zero_grad(self, set_to_none=True):
        """Clear every parameter's ``.grad`` (to None, or to zeros in place)."""
        for p in self.parameters():
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad[...] = 0

    def state_dict(self):
        """OrderedDict of dotted name -> numpy array (a host copy of each parameter)."""
        return OrderedDict((name, np.array(B.to_host(p.data))) for name, p in self.named_parameters())

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays (numpy, CuPy or anything np.asarray takes) into the parameters, keeping
        each parameter's dtype and backend. With ``strict``, the names must match exactly."""
        params = dict(self.named_parameters())
        missing = [k for k in params if k not in state_dict]
        unexpected = [k for k in state_dict if k not in params]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        for name, p in params.items():
            if name not in state_dict:
                continue
            value = B.to_host(state_dict[name])
            if tuple(value.shape) != p.shape:
                raise ValueError(f"load_state_dict: {name} has shape {tuple(value.shape)} in the state dict "
                                 f"and {p.shape} in the module")
            p.data = p.xp.array(value, dtype=p.dtype)
        return self

    def to(self, backend_name):
        """Move every parameter, in place, to backend "numpy" or "cupy" (their ``.grad`` is
        dropped). Build optimizers after moving: their state stays where it was made."""
        xp = B.module_for(backend_name)
        for p in self.parameters():
            p.data = xp.asarray(p.data) if backend_name == "cupy" else B.to_host(p.data)
            p.grad = None
        return self

    def extra_repr(self):
        return ""

    def __repr__(self):
        children = self.named_children()
        if not children:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"  ({name}): " + repr(m).replace("\n", "\n  ") for name, m in children]
        return f"{type(self).__name__}(\n" + "\n".join(lines) + "\n)"


class Linear(Module):
    """y = x Wᵀ + b: x [..., in_features] -> [..., out_features]; weight [out, in], bias [out].

    PyTorch's default initialisation: weight and bias from U(-1/√in, 1/√in) (its
    kaiming_uniform with a = √5, and its bias rule)."""

    def __init__(self, in_features, out_features, bias=True, *, dtype="float32", rng=None):
        for name, n in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(n, (int, np.integer)) or n < 0:
                raise ValueError(f"Linear: {name} must be a non-negative integer, got {n!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
        self.weight = _uniform((out_features, in_features), bound, dtype, rng)
        self.bias = _uniform((out_features,), bound, dtype, rng) if bias else None

    def forward(self, x):
        return ops.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class ReLU(Module):
    def forward(self, x):
        return ops.relu(x)


class Tanh(Module):
    def forward(self, x):
        return ops.tanh(x)


class GELU(Module):
    """x·Φ(x); ``approximate="tanh"`` for the tanh form, as in PyTorch."""

    def __init__(self, approximate="none"):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x):
        return ops.gelu(x, approximate=self.approximate)


ACTIVATIONS = {"relu": ReLU, "tanh": Tanh, "gelu": GELU}


class Sequential(Module):
    """Modules applied in order; they are named "0", "1", ... (as in PyTorch)."""

    def __init__(self, *modules):
        for i, m in enumerate(modules):
            if not isinstance(m, Module):
                raise TypeError(f"Sequential: argument {i} is a {type(m).__name__}, not a Module")
            setattr(self, str(i), m)

    def __len__(self):
        return len(self.named_children())

    def __getitem__(self, i):
        return self.named_children()[i][1]

    def __iter__(self):
        return iter(m for _, m in self.named_children())

    def forward(self, x):
        for m in self:
            x = m(x)
        return x


class Residual(Module):
    """y = x + body(x), for a body that keeps x's shape."""

    def __init__(self, body):
        self.body = body

    def forward(self, x):
        return ops.add(x, self.body(x))


class MLP(Sequential):
    """Linear layers of widths ``sizes`` (input, hidden..., output) with `activation` between
    them and none after the last. With ``residual=True``, each hidden layer whose input and
    output widths match becomes a block y = x + act(Linear(x)).

    Without residual blocks its children and parameter names are those of
    ``torch.nn.Sequential(Linear, act, Linear, act, ..., Linear)``: "0.weight", "0.bias", "2.weight", ...
    """

    def __init__(self, sizes, activation="relu", residual=False, bias=True, *, dtype="float32", rng=None):
        sizes = list(sizes)
        if len(sizes) < 2 or not all(isinstance(n, (int, np.integer)) and n > 0 for n in sizes):
            raise ValueError(f"MLP: sizes must be two or more positive integers (input, ..., output), got {sizes}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"MLP: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        layers = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            linear = Linear(n_in, n_out, bias, dtype=dtype, rng=rng)
            if i == len(sizes) - 2:
                layers.append(linear)
            elif residual and n_in == n_out:
                layers.append(Residual(Sequential(linear, ACTIVATIONS[activation]())))
            else:
                layers += [linear, ACTIVATIONS[activation]()]
        super().__init__(*layers)
        self.sizes, self.activation, self.residual = sizes, activation, residual


class CrossEntropyLoss(Module):
    """The fused softmax + cross-entropy: logits [..., V] float (classes on `axis`, last by
    default; axis=1 is nn.CrossEntropyLoss's [B, C, d1, ...]), targets class indices [...] or
    class probabilities of the logits' shape -> the loss (0-d for "mean" / "sum", the logits'
    shape without the class axis for "none"); weight None or a [V] class weight. See
    ``ad.softmax_cross_entropy``."""

    def __init__(self, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, axis=-1):
        if reduction not in REDUCTIONS:
            raise ValueError(f"CrossEntropyLoss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise ValueError(f"CrossEntropyLoss: label_smoothing must lie in [0, 1], got {label_smoothing}")
        if weight is not None and len(getattr(weight, "shape", ())) != 1:
            raise ValueError(f"CrossEntropyLoss: weight must be None or a [V] array, got {weight!r}")
        self.weight, self.axis = weight, int(axis)
        self.ignore_index, self.reduction, self.label_smoothing = (ignore_index_arg(ignore_index), reduction,
                                                                float(label_smoothing))

    def forward(self, logits, targets):
        return ops.softmax_cross_entropy(logits, targets, ignore_index=self.ignore_index, reduction=self.reduction,
                                         label_smoothing=self.label_smoothing, weight=self.weight, axis=self.axis)

    def extra_repr(self):
        weight = "" if self.weight is None else f"weight=[{self.weight.shape[0]}], "
        axis = "" if self.axis == -1 else f", axis={self.axis}"
        return (f"{weight}ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}{axis}")
