"""Optimizers with PyTorch's update rules and defaults: SGD, Adam, AdamW.

    opt = optim.AdamW(model.parameters(), lr=1e-3)
    opt.zero_grad(); loss.backward(); opt.step()

They update each parameter's ``.data`` in place from its ``.grad`` (parameters whose grad is
None are skipped, as in PyTorch), with one body for numpy and CuPy arrays. ``params`` is an
iterable of Tensors, or of dicts {"params": [...], "lr": ..., ...} (parameter groups whose
keys override the defaults). ``param_groups[i]["lr"]`` may be changed between steps.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

from .tensor import Tensor, describe_grad


class Optimizer:
    """Parameter groups, per-parameter ``state``, ``zero_grad`` and a ``step`` that calls
    ``_update(p, grad, state, group)`` for every parameter with a gradient."""

    def __init__(self, params, defaults):
        name = type(self).__name__
        if isinstance(params, (Tensor, dict)) or not isinstance(params, Iterable):
            raise TypeError(f"{name}: params must be an iterable of Tensors or of dicts (parameter groups), got "
                            f"a {type(params).__name__}; wrap a single one in a list")
        groups = list(params)
        if not groups:
            raise ValueError(f"{name}: params is an empty list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.defaults = defaults
        self.param_groups = []
        self.state = {}  # Tensor -> dict of buffers, created at its first step
        seen = set()
        for i, group in enumerate(groups):
            group = {**defaults, **self._group(group, i)}
            for p in group["params"]:
                if not isinstance(p, Tensor):
                    raise TypeError(f"{name}: params must be Tensors, got a {type(p).__name__}")
                if not p.is_leaf:
                    raise ValueError(f"{name}: cannot optimize a Tensor computed by an op "
                                     f"(a non-leaf); pass the parameters themselves")
                if id(p) in seen:  # it would be updated twice a step
                    raise ValueError(f"{name}: a parameter of shape {p.shape} appears more than once in params "
                                     f"(in one group or in two): list each parameter once")
                seen.add(id(p))
            self._check(group)
            self.param_groups.append(group)

    def _group(self, group, i) -> dict:
        """Parameter group `i` as given: a dict holding "params" (a Tensor or an iterable of them)."""
        name = type(self).__name__
        if not isinstance(group, dict):
            raise TypeError(f"{name}: params mixes dicts (parameter groups) and {type(group).__name__}s; "
                            f"pass Tensors alone or groups alone")
        if "params" not in group:
            raise ValueError(f"{name}: parameter group {i} has no 'params' entry")
        params = group["params"]
        if isinstance(params, Tensor):
            params = [params]  # as torch: a group may name one Tensor
        elif isinstance(params, dict) or not isinstance(params, Iterable):
            raise TypeError(f"{name}: parameter group {i}'s 'params' must be a Tensor or an iterable of "
                            f"Tensors, got a {type(params).__name__}")
        return {**group, "params": list(params)}

    def _check(self, group):
        """Refuse hyperparameters that are not numbers, negative, or (betas) outside [0, 1)."""
        name = type(self).__name__
        for key in ("lr", "weight_decay", "eps", "momentum", "dampening"):
            if key in group:
                value = group[key]
                if not _is_real(value):
                    raise TypeError(f"{name}: {key} must be a real number, got {value!r}")
                if not value >= 0.0:
                    raise ValueError(f"{name}: {key} must be >= 0, got {value}")
        if "betas" in group:
            betas = group["betas"]
            if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(_is_real(b) for b in betas):
                raise TypeError(f"{name}: betas must be a pair of real numbers (beta1, beta2), got {betas!r}")
            for i, beta in enumerate(betas):
                if not 0.0 <= beta < 1.0:
                    raise ValueError(f"{name}: betas[{i}] must lie in [0, 1), got {beta}")

    def zero_grad(self, set_to_none=True):
        """Clear every parameter's ``.grad`` (to None, or to zeros in place)."""
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none or p.grad is None:
                    p.grad = None
                else:
                    p.grad[...] = 0

    def step(self):
        """One update of every parameter with a ``.grad``; nothing moves when a group or a
        ``.grad`` is bad (param_groups may have been changed since the last step)."""
        for group in self.param_groups:
            self._check(group)
            for p in group["params"]:
                if p.grad is not None and getattr(p.grad, "shape", None) != p.data.shape:
                    raise ValueError(f"{type(self).__name__}: a parameter of shape {p.shape} has a .grad of "
                                     f"{describe_grad(p.grad)}: .grad must be an array of the parameter's shape")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = -p.grad if group.get("maximize") else p.grad
                self._update(p, grad, self.state.setdefault(p, {}), group)

    def _update(self, p, grad, state, group):
        raise NotImplementedError


def _is_real(value) -> bool:
    """A real number (int, float, numpy scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum (PyTorch's form: the buffer starts
    as the first gradient), dampening, Nesterov momentum and L2 weight decay."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 maximize=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize))
        if nesterov and (momentum <= 0 or dampening != 0):  # the numbers are checked above
            raise ValueError("SGD: nesterov needs momentum > 0 and dampening = 0")

    def _update(self, p, grad, state, group):
        if group["weight_decay"]:
            grad = grad + group["weight_decay"] * p.data
        momentum = group["momentum"]
        if momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = p.xp.array(grad)  # a copy; an array also for 0-d
            else:
                buf *= momentum
                buf += (1.0 - group["dampening"]) * grad
            grad = grad + momentum * buf if group["nesterov"] else buf
        p.data -= group["lr"] * grad


class Adam(Optimizer):
    """Adam (Kingma & Ba) as PyTorch computes it, with L2 weight decay added to the gradient;
    ``amsgrad`` keeps the running maximum of the second moment."""

    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 maximize=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize))

    def _update(self, p, grad, state, group):
        lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
        if wd and self.decoupled:
            p.data *= 1.0 - lr * wd
        elif wd:
            grad = grad + wd * p.data
        if not state:
            xp = p.xp
            state.update(step=0, exp_avg=xp.zeros_like(p.data), exp_avg_sq=xp.zeros_like(p.data))
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = xp.zeros_like(p.data)
        state["step"] += 1
        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        m += (1.0 - beta1) * (grad - m)
        v *= beta2
        v += (1.0 - beta2) * grad * grad
        if group["amsgrad"]:
            p.xp.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
            v = state["max_exp_avg_sq"]
        step_size = lr / (1.0 - beta1 ** t)
        denom = p.xp.sqrt(v) / math.sqrt(1.0 - beta2 ** t) + group["eps"]
        p.data -= step_size * m / denom


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p ← p·(1 − lr·wd) before the
    Adam step. PyTorch's default weight_decay for AdamW is 1e-2."""

    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 maximize=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize)
