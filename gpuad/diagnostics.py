"""Vanishing and exploding gradients, seen through the layers' Jacobians.

Backprop multiplies the layers' Jacobians: the gradient at layer i's input is
Jᵢᵀ ⋯ J_Lᵀ ∇y. When every Jᵢ shrinks vectors (σ₁ < 1) the gradient of the first layers
vanishes exponentially in the depth; a residual layer y = x + f(x) has Jacobian I + J_f, whose
identity carries the gradient through.

    d = layer_jacobians([f1, f2, f3], x)      # f: Tensor -> Tensor, one per layer
    d.singular_values[i]                      # σ of layer i+1's Jacobian, largest first
    d.product_singular_values                 # σ of J_L ⋯ J_1
    d.gradients(c)                            # ∇ at each layer's input and at the output

The Jacobians are built with the engine's VJPs (``ad.jacobian``), never by finite differences.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import backend as B
from .ops import add, linear, relu, tanh
from .tensor import Tensor, no_grad
from .transforms import jacobian


@dataclass
class LayerJacobians:
    """``activations[i]`` is layer i+1's input (``activations[-1]`` the output), flattened, on
    the host; ``jacobians[i]`` layer i+1's Jacobian as an [out, in] float64 matrix and
    ``singular_values[i]`` its singular values (largest first); ``product`` is J_L ⋯ J_1 and
    ``product_singular_values`` its singular values."""

    activations: list
    jacobians: list
    singular_values: list
    product: np.ndarray
    product_singular_values: np.ndarray

    def gradients(self, cotangent):
        """The gradient at every layer's input and at the output (L + 1 vectors, the first at
        x): ∇ᵢ₋₁ = Jᵢᵀ ∇ᵢ from ∇_L = `cotangent` (the output's shape or flat)."""
        g = np.asarray(B.to_host(cotangent), dtype=np.float64).reshape(-1)
        if g.size != self.activations[-1].size:
            raise ValueError(f"gradients: cotangent has {g.size} entries, the output {self.activations[-1].size}")
        grads = [g]
        for J in reversed(self.jacobians):
            grads.append(J.T @ grads[-1])
        return grads[::-1]


def layer_jacobians(f_layers, x, mode="rev") -> LayerJacobians:
    """Each layer's Jacobian at the point the forward pass reaches, its singular values, and
    those of their product.

    `f_layers` is a sequence of functions Tensor -> Tensor applied in order from `x` (an
    array, list or Tensor; one example: a batch's Jacobian is block-diagonal over its rows).
    `mode` is ``ad.jacobian``'s: "rev" (one VJP per output entry), "fwd" (one JVP per input
    entry) or "auto"."""
    layers, h = _layers_and_input(f_layers, x, "layer_jacobians")
    activations, jacobians = [np.array(B.to_host(h), dtype=np.float64).reshape(-1)], []
    product = None
    for i, f in enumerate(layers):
        J = jacobian(f, mode=mode)(h)
        n_out = int(np.prod(J.shape[:J.ndim - h.ndim]))
        J = np.array(B.to_host(J), dtype=np.float64).reshape(n_out, h.size)
        h = f(Tensor(h)).data
        jacobians.append(J)
        activations.append(np.array(B.to_host(h), dtype=np.float64).reshape(-1))
        product = J if product is None else J @ product
    return LayerJacobians(activations=activations, jacobians=jacobians,
                          singular_values=[np.linalg.svd(J, compute_uv=False) for J in jacobians],
                          product=product, product_singular_values=np.linalg.svd(product, compute_uv=False))


def _layers_and_input(f_layers, x, what):
    layers = list(f_layers)
    if not layers or not all(callable(f) for f in layers):
        raise TypeError(f"{what}: f_layers must be a non-empty sequence of functions Tensor -> Tensor")
    h = x.data if isinstance(x, Tensor) else x
    if B.backend_of(h) is None:
        h = B.module_for(B.get_backend()).asarray(h, dtype=np.float64)
    return layers, h


@dataclass
class StackProfile:
    """One stack's figures in log10 where float64 would underflow or overflow:
    ``log10_grad_norms`` (L + 1 entries: log10 ‖∇‖ at each layer's input, then at the output;
    -inf where the gradient is exactly 0), ``sigma1`` (σ₁ of each layer's Jacobian) and
    ``log10_product_sigma`` (log10 of the largest and the smallest σ of J_L ⋯ J_1)."""

    log10_grad_norms: list
    sigma1: list
    log10_product_sigma: tuple


def stack_profile(f_layers, x, cotangent, progress=None) -> StackProfile:
    """layer_jacobians' figures for the loss ⟨cotangent, output⟩ at any depth and scale: one
    Jacobian at a time (the last layer's first), the gradient ∇ᵢ₋₁ = Jᵢᵀ ∇ᵢ and the product
    J_L ⋯ J_i divided by their largest entry after every layer, the scales summed as log10.
    Memory: the L layer inputs and a few width×width matrices. ``progress(k)`` is called after
    the k-th Jacobian."""
    layers, h = _layers_and_input(f_layers, x, "stack_profile")
    inputs = [h]
    with no_grad():
        for f in layers[:-1]:
            inputs.append(f(Tensor(inputs[-1])).data)
    g, log_g = _rescaled(np.asarray(B.to_host(cotangent), dtype=np.float64).reshape(-1))
    log_norms, sigma1 = [_log10_norm(g, log_g)], [0.0] * len(layers)
    product, log_p = None, 0.0
    for k, i in enumerate(reversed(range(len(layers)))):
        h = inputs[i]
        J = np.array(B.to_host(jacobian(layers[i], mode="rev")(h)), dtype=np.float64).reshape(-1, h.size)
        if not np.isfinite(J).all():
            raise FloatingPointError(f"stack_profile: layer {i + 1}'s Jacobian is not finite (the forward pass "
                                     "overflowed)")
        sigma1[i] = float(np.linalg.svd(J, compute_uv=False)[0])
        g, scale = _rescaled(J.T @ g)
        log_g += scale
        log_norms.append(_log10_norm(g, log_g))
        product, scale = _rescaled(J if product is None else product @ J)
        log_p += scale
        if progress is not None:
            progress(k + 1)
    with np.errstate(divide="ignore"):
        log_sv = log_p + np.log10(np.linalg.svd(product, compute_uv=False))
    return StackProfile(log10_grad_norms=log_norms[::-1], sigma1=sigma1,
                        log10_product_sigma=(float(log_sv[0]), float(log_sv[-1])))


def _rescaled(a):
    """(a / m, log10 m) for m the largest |entry| of `a`; (a, -inf) when `a` is 0."""
    m = float(np.abs(a).max(initial=0.0))
    return (a, -math.inf) if m == 0.0 else (a / m, math.log10(m))


def _log10_norm(a, log_scale):
    """log10 ‖a·10^log_scale‖ for `a` from _rescaled."""
    return -math.inf if log_scale == -math.inf else log_scale + math.log10(float(np.linalg.norm(a)))


# --- the stacks of `python -m gpuad walk --depth` ----------------------------------------------
ACTIVATIONS = {"tanh": tanh, "relu": relu, "linear": None}


def orthogonal_weights(depth, width, sigma, rng, dtype=np.float64):
    """`depth` matrices σ·Q (Q orthogonal, drawn uniformly): every singular value is `sigma`."""
    weights = []
    for _ in range(depth):
        q, r = np.linalg.qr(rng.standard_normal((width, width)))
        weights.append((sigma * q * np.sign(np.diag(r))).astype(dtype))  # the sign fix makes Q uniform (Haar)
    return weights


def stack_layers(weights, activation="tanh", residual=False):
    """One function per weight: h -> act(W h) (plain) or h -> h + act(W h) (residual)."""
    act = ACTIVATIONS[activation]

    def layer(W):
        def f(h):
            z = linear(h, W)
            y = z if act is None else act(z)
            return add(h, y) if residual else y
        return f

    return [layer(W) for W in weights]
