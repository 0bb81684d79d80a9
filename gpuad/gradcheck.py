"""Finite-difference checking of both modes of differentiation."""
from __future__ import annotations

import numpy as np

from . import backend as B
from .tensor import Tensor
from .transforms import jvp, vjp


class GradcheckError(AssertionError):
    """A derivative disagrees with central finite differences."""


def gradcheck(f, *inputs, eps=1e-6, atol=1e-5, rtol=1e-3, seed=0):
    """Check f's VJP and JVP against float64 central differences at `inputs`.

    Every input element i is perturbed by ±eps. Reverse mode: the VJP of a random cotangent u
    must match uᵀ(f(x + eps eᵢ) − f(x − eps eᵢ))/2eps at entry i. Forward mode: the JVP of eᵢ
    must match that difference quotient at every output entry. Returns True, or raises
    GradcheckError naming the input, the entry and both values. Inputs are cast to float64;
    integer inputs are refused."""
    arrays = []
    for k, v in enumerate(inputs):
        data = v.data if isinstance(v, Tensor) else v
        if B.backend_of(data) is None:
            data = np.asarray(data)
        if data.dtype.kind in "biu":
            raise ValueError(f"gradcheck: input {k} is an integer array ({data.dtype}); give floating inputs")
        arrays.append(B.array_module(data).asarray(data, dtype="float64"))
    out, pullback = vjp(f, *arrays)
    xp = B.array_module(out)
    u = xp.asarray(np.random.default_rng(seed).standard_normal(out.shape))
    reverse = pullback(u)

    def f_at(k, x):
        return f(*(Tensor(x) if j == k else Tensor(a) for j, a in enumerate(arrays))).data

    for k, x in enumerate(arrays):
        flat = x.reshape(-1)
        for i in range(flat.size):
            entry = tuple(int(e) for e in np.unravel_index(i, x.shape))
            step = xp.zeros_like(x)
            step.reshape(-1)[i] = eps
            numeric = (f_at(k, x + step) - f_at(k, x - step)) / (2 * eps)
            expected = float((u * numeric).sum())
            got = float(reverse[k].reshape(-1)[i])
            if not abs(got - expected) <= atol + rtol * abs(expected):
                raise GradcheckError(f"input {k}, entry {entry}: reverse mode (VJP) gives {got!r}, "
                                     f"finite differences give {expected!r}")
            tangents = [xp.zeros_like(a) for a in arrays]
            tangents[k] = step / eps
            forward = jvp(f, arrays, tangents)[1]
            bad = xp.abs(forward - numeric) > atol + rtol * xp.abs(numeric)
            if bool(bad.any()):
                j = int(xp.argmax(bad.reshape(-1)))
                out_entry = tuple(int(e) for e in np.unravel_index(j, numeric.shape))
                raise GradcheckError(f"input {k}, entry {entry}, output entry {out_entry}: forward mode (JVP) gives "
                                     f"{float(forward.reshape(-1)[j])!r}, finite differences give "
                                     f"{float(numeric.reshape(-1)[j])!r}")
    return True
