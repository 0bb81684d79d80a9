"""The main job on the CPU: train a small MLP with gpuad's tape and fused ops on numpy.

    python -m gpuad.demo [--steps 300] [--backend numpy|cupy]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import gpuad as ad
from gpuad.cli import number


def make_spirals(n_per_class=200, n_classes=3, seed=0):
    """Interleaved 2-D spirals: x [n, 2] float32, y [n] int64."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(n_classes):
        r = np.linspace(0.05, 1.0, n_per_class)
        theta = np.linspace(c * 4.0, (c + 1) * 4.0, n_per_class) + rng.normal(0, 0.2, n_per_class)
        xs.append(np.stack([r * np.sin(theta), r * np.cos(theta)], axis=1))
        ys.append(np.full(n_per_class, c))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64)


def init_mlp(sizes, seed=0):
    """[W1, b1, W2, b2, ...] with W [out, in] (PyTorch's layout), He-scaled."""
    rng = np.random.default_rng(seed)
    params = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        params.append(ad.tensor(rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in), dtype="float32",
                                requires_grad=True))
        params.append(ad.tensor(np.zeros(n_out), dtype="float32", requires_grad=True))
    return params


def mlp(params, x):
    h = x
    for i in range(0, len(params) - 2, 2):
        h = ad.gelu(ad.linear(h, params[i], params[i + 1]))
    return ad.linear(h, params[-2], params[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=number(int, 0), default=300)
    parser.add_argument("--lr", type=number(float, 0, low_open=True), default=0.5)
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    args = parser.parse_args(argv)
    ad.set_backend(args.backend)
    xs, ys = make_spirals()
    x, y = ad.tensor(xs), ad.tensor(ys)
    params = init_mlp([2, 64, 64, 3])
    start = time.perf_counter()
    for step in range(args.steps + 1):
        loss = ad.softmax_cross_entropy(mlp(params, x), y)
        for p in params:
            p.grad = None
        loss.backward()
        for p in params:
            p.data -= args.lr * p.grad
        if step % 50 == 0:
            print(f"step {step:4d}  loss {float(loss.numpy()):.4f}")
    with ad.no_grad():
        accuracy = float((mlp(params, x).numpy().argmax(axis=1) == ys).mean())
    print(f"train accuracy {accuracy:.3f} after {args.steps} steps ({time.perf_counter() - start:.1f} s, "
          f"backend {ad.get_backend()})")

    # The chain rule as matrices: one Jacobian, two orders of multiplication.
    f = lambda v: ad.tanh(ad.linear(v, params[0], params[1]))  # R^2 -> R^64: tall, forward mode wins
    point = xs[:1]
    J_fwd, J_rev = ad.jacobian(f, mode="fwd")(point), ad.jacobian(f, mode="rev")(point)
    print(f"Jacobian of the first layer at one point: shape {tuple(J_fwd.shape)}, forward vs reverse max "
          f"difference {float(abs(ad.backend.to_host(J_fwd - J_rev)).max()):.1e}")
    return accuracy


if __name__ == "__main__":
    main()
