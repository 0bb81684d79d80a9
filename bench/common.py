"""What the op definitions (``ops``) and the measuring code (``harness``, ``sweep``) share:
the Unavailable error, a prepared implementation, dtypes, and the random inputs.

It imports nothing of the bench itself, so ``ops`` and ``harness`` both import it and not
each other's internals in a circle (``harness`` imports ``ops``; ``ops`` imports this)."""
from __future__ import annotations

import importlib
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

#: Elements per random chunk: each chunk has its own generator, so inputs are the same on every
#: machine whatever its thread count, and threads fill chunks in parallel.
RANDOM_CHUNK = 1 << 22


class Unavailable(Exception):
    """An implementation that cannot run here; the message is the reason."""


@dataclass
class Prepared:
    """An implementation ready to run on one case.

    ``fn()`` runs one timed call (cycling the input copies); ``outputs()`` runs one call
    on the first copy and returns ``{name: array}`` for the check; ``device`` is "cuda" or "cpu"."""
    fn: Callable[[], object]
    outputs: Callable[[], dict]
    device: str


def rotating(sets, call):
    """A no-argument function calling ``call(*s)`` on each input set in turn."""
    counter = itertools.count()
    n = len(sets)
    return lambda: call(*sets[next(counter) % n])


def try_import(name):
    """(module, None), or (None, a one-line reason) when it does not import."""
    try:
        return importlib.import_module(name), None
    except Exception as e:  # ImportError, or a broken install raising anything else
        return None, f"{type(e).__name__}: {e}".splitlines()[0][:160]


def np_dtype(name: str):
    if name == "bfloat16":
        ml, err = try_import("ml_dtypes")
        if ml is None:
            raise Unavailable(f"numpy bfloat16 needs ml_dtypes ({err})")
        return np.dtype(ml.bfloat16)
    return np.dtype(name)


def itemsize(dtype: str) -> int:
    return {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}[dtype]


def quantize(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values exactly representable in `dtype`, so every impl and the float64
    reference see the same inputs."""
    if dtype in ("float32", "float64"):
        return a
    if dtype == "float16":
        return a.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":  # round to nearest even on the upper 16 bits
        u = a.view(np.uint32)
        return ((u + (0x7FFF + ((u >> 16) & 1))) & np.uint32(0xFFFF0000)).view(np.float32)
    raise ValueError(f"unknown dtype {dtype!r}")


def normal(shape, seed, dtype: str, scale: float = 1.0) -> np.ndarray:
    """float32 N(0, scale²) samples of `shape`, rounded to values of `dtype` (see quantize).

    `seed` is an int or a tuple of ints. Chunk i of RANDOM_CHUNK elements comes from its own
    generator (spawned from ``SeedSequence(seed)``), and a pool of threads fills the chunks:
    numpy releases the GIL while it draws, so the billion-element logits of the GPU shapes take
    a fraction of the single-thread time, and the values do not depend on the thread count."""
    out = np.empty(int(np.prod(shape)), dtype=np.float32)
    n_chunks = max(1, -(-out.size // RANDOM_CHUNK))
    seqs = np.random.SeedSequence(seed).spawn(n_chunks)

    def fill(i):
        part = out[i * RANDOM_CHUNK:(i + 1) * RANDOM_CHUNK]
        np.random.default_rng(seqs[i]).standard_normal(out=part, dtype=np.float32)
        if scale != 1.0:
            part *= np.float32(scale)
        part[...] = quantize(part, dtype)

    if n_chunks == 1:
        fill(0)
    else:
        with ThreadPoolExecutor(min(n_chunks, os.cpu_count() or 1)) as pool:
            list(pool.map(fill, range(n_chunks)))
    return out.reshape(shape)
