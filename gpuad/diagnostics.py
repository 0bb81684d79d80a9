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

from dataclasses import dataclass

import numpy as np

from . import backend as B
from .ops import add, linear, relu, tanh
from .tensor import Tensor
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
    layers = list(f_layers)
    if not layers or not all(callable(f) for f in layers):
        raise TypeError("layer_jacobians: f_layers must be a non-empty sequence of functions Tensor -> Tensor")
    h = x.data if isinstance(x, Tensor) else x
    if B.backend_of(h) is None:
        h = B.module_for(B.get_backend()).asarray(h, dtype=np.float64)
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
