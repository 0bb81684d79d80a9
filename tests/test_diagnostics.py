"""Jacobian diagnostics: gpuad.diagnostics.layer_jacobians (Jacobians from the engine's VJPs and
JVPs), vanishing gradients through a plain stack, none through a residual one, and
python -m gpuad walk --depth."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import gpuad as ad
from gpuad import diagnostics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_layer_jacobians_are_the_analytic_ones_in_both_modes():
    rng = np.random.default_rng(0)
    Ws = [rng.standard_normal((5, 4)), rng.standard_normal((3, 5))]
    layers = [lambda h: ad.tanh(ad.linear(h, Ws[0])), lambda h: ad.linear(h, Ws[1])]
    x = rng.standard_normal(4)
    d = diagnostics.layer_jacobians(layers, x)
    h1 = np.tanh(Ws[0] @ x)
    J1, J2 = (1 - h1 ** 2)[:, None] * Ws[0], Ws[1]
    np.testing.assert_allclose(d.jacobians[0], J1, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(d.jacobians[1], J2, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(d.product, J2 @ J1, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(d.singular_values[0], np.linalg.svd(J1, compute_uv=False), rtol=1e-12)
    np.testing.assert_allclose(d.product_singular_values, np.linalg.svd(J2 @ J1, compute_uv=False), rtol=1e-12)
    np.testing.assert_allclose(d.activations[1], h1, rtol=1e-12)
    forward = diagnostics.layer_jacobians(layers, x, mode="fwd")
    for a, b in zip(forward.jacobians, d.jacobians):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    c = rng.standard_normal(3)
    np.testing.assert_allclose(d.gradients(c)[0], J1.T @ J2.T @ c, rtol=1e-12)
    with pytest.raises(ValueError, match="cotangent has 2 entries, the output 3"):
        d.gradients(np.ones(2))
    with pytest.raises(TypeError, match="non-empty sequence"):
        diagnostics.layer_jacobians([], x)


def _rotation_weights(depth, width, sigma, rng):
    """σ·P R Pᵀ with P random orthogonal and R 2×2 rotations by θ, cos θ = -σ/2: every singular
    value of W is σ, and I + W is orthogonal ((I + W)ᵀ(I + W) = (1 + σ²) I + σ·2cos θ·I = I)."""
    theta = np.arccos(-sigma / 2)
    block = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    R = np.kron(np.eye(width // 2), block)
    weights = []
    for _ in range(depth):
        P = np.linalg.qr(rng.standard_normal((width, width)))[0]
        weights.append(sigma * P @ R @ P.T)
    return weights


def _through(layers, h):
    for f in layers:
        h = f(h)
    return h


def test_plain_stack_vanishes_like_2_to_the_minus_depth_and_residual_does_not():
    """Layers W with σ₁ = 0.5 (all singular values 0.5), linear: the gradient at the first layer's
    input is 2⁻ᵈᵉᵖᵗʰ‖c‖ in the plain stack; with the same W, the residual stack y = x + W x has
    orthogonal Jacobians and keeps it at ‖c‖, as the last layer's."""
    depth, width = 100, 8
    rng = np.random.default_rng(0)
    weights = _rotation_weights(depth, width, 0.5, rng)
    x, c = rng.standard_normal(width), rng.standard_normal(width)
    for residual in (False, True):
        layers = diagnostics.stack_layers(weights, "linear", residual)
        d = diagnostics.layer_jacobians(layers, x)
        grads = [np.linalg.norm(g) for g in d.gradients(c)]
        sigma1 = [s[0] for s in d.singular_values]
        # the engine's own backward through the whole stack gives the same first-layer gradient
        engine = ad.grad(lambda v: (_through(layers, v) * c).sum())(x)
        np.testing.assert_allclose(engine, d.gradients(c)[0], rtol=1e-9, atol=1e-300)
        if not residual:
            np.testing.assert_allclose(sigma1, 0.5, rtol=1e-12)
            np.testing.assert_allclose(grads[0], 2.0 ** -depth * np.linalg.norm(c), rtol=1e-9)
            np.testing.assert_allclose(grads[:-1], np.linalg.norm(c) * 0.5 ** np.arange(depth, 0, -1), rtol=1e-9)
            np.testing.assert_allclose(d.product_singular_values, 2.0 ** -depth, rtol=1e-9)
        else:
            np.testing.assert_allclose(sigma1, 1.0, rtol=1e-12)
            assert grads[0] / grads[depth - 1] == pytest.approx(1.0, rel=1e-9)


def test_walk_depth_100_cli_with_plot(tmp_path):
    png = tmp_path / "grads.png"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "MPLBACKEND": "Agg"}
    out = subprocess.run([sys.executable, "-m", "gpuad", "walk", "--depth", "100", "--plot", str(png)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    ratio = {k: float(v) for k, v in re.findall(r"^(plain|residual): first layer's gradient / last layer's = (\S+)",
                                                 out.stdout, flags=re.M)}
    # tanh' ≤ 1 and σ = 0.5: the plain stack's ratio is at most 2⁻⁹⁹ (about it once activations are small)
    assert 2.0 ** -102 < ratio["plain"] <= 2.0 ** -99 * (1 + 1e-9)
    assert 1 / 30 < ratio["residual"] < 30
    with open(os.path.join(ROOT, "docs", "jacobians.md"), encoding="utf-8") as f:  # the page quotes this run
        quoted = dict(re.findall(r"^(plain|residual): first layer's gradient / last layer's = (\S+)", f.read(), re.M))
    assert ratio == pytest.approx({k: float(v) for k, v in quoted.items()}, rel=1e-3)
    rows = re.findall(r"^\s+(\d+)\s+(\S+)\s+(\S+)$", out.stdout, flags=re.M)
    assert [int(r[0]) for r in rows] == [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert all(float(r[2]) == pytest.approx(0.5, abs=5e-5) for r in rows)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(data) < 100_000


def test_stack_profile_agrees_with_layer_jacobians_and_keeps_exact_zeros():
    """The streaming, rescaled figures equal layer_jacobians' where float64 holds them; a layer
    whose Jacobian is 0 (every ReLU off) gives log10 -inf below it, not an error."""
    rng = np.random.default_rng(3)
    weights = diagnostics.orthogonal_weights(12, 5, 0.8, rng)
    x, c = rng.standard_normal(5), rng.standard_normal(5)
    for activation, residual in (("tanh", False), ("relu", True)):
        layers = diagnostics.stack_layers(weights, activation, residual)
        d, p = diagnostics.layer_jacobians(layers, x), diagnostics.stack_profile(layers, x, c)
        np.testing.assert_allclose(p.log10_grad_norms, [np.log10(np.linalg.norm(g)) for g in d.gradients(c)],
                                   rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(p.sigma1, [s[0] for s in d.singular_values], rtol=1e-12)
        sv = d.product_singular_values
        np.testing.assert_allclose(p.log10_product_sigma, np.log10([sv[0], sv[-1]]), rtol=1e-9)
    dead = [lambda h: ad.relu(h * 1.0), lambda h: ad.relu(h * -1.0), lambda h: h * 2.0]
    p = diagnostics.stack_profile(dead, np.ones(3), np.ones(3))
    assert p.log10_grad_norms[:2] == [-np.inf, -np.inf] and p.log10_product_sigma == (-np.inf, -np.inf)
    np.testing.assert_allclose(p.log10_grad_norms[2:], np.log10([2 * np.sqrt(3), np.sqrt(3)]))
